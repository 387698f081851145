"""NVIDIA DALI pipelines (optional dependency `nvidia-dali-cuda130`): shard rows with readers.numpy, image decoding
with the ADM center crop. A pipeline runs on the GPU when the target device is CUDA, on the CPU otherwise."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

_TORCH_DTYPES = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.UINT8: torch.uint8,
                 types.INT32: torch.int32, types.INT64: torch.int64}


def _device_id(device: torch.device):
    if device.type != "cuda":
        return None  # a CPU-only pipeline
    return device.index if device.index is not None else torch.cuda.current_device()


def run_to_torch(pipe, device: torch.device) -> list[torch.Tensor]:
    """Run one iteration; every output as a dense torch tensor on `device` (DALI's copy on the GPU, no host trip)."""
    outs = []
    for tl in pipe.run():
        t = tl.as_tensor()
        if device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(t.shape(), dtype=_TORCH_DTYPES[t.dtype], device=device)
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        else:
            out = torch.from_numpy(np.array(t))
        outs.append(out)
    return outs


class _Rows:
    """External source: the ROI start [row, 0, 0, 0] of each sample of iteration i."""

    def __init__(self, rows: np.ndarray, batch_size: int, ndim: int):
        self.starts = np.zeros((len(rows), ndim), np.int32)
        self.starts[:, 0] = rows
        self.batch_size = batch_size

    def __call__(self, i: int):
        if (i + 1) * self.batch_size > len(self.starts):
            raise StopIteration
        return list(self.starts[i * self.batch_size:(i + 1) * self.batch_size])


def numpy_rows_pipeline(root: str, files: Sequence[str], rows: np.ndarray, batch_size: int,
                        sample_shape: Sequence[int], device: torch.device, num_threads: int = 2):
    """Sample j is row rows[j] of file files[j] (a region-of-interest read, so only that row leaves the disk); on
    CUDA the reader is readers.numpy(device='gpu'), which uses GPUDirect Storage (cuFile) where the file system
    supports it. The order is the given one: the caller owns shuffling and rank sharding."""
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=_device_id(device), prefetch_queue_depth=2)
    def pipe():
        start = fn.external_source(source=_Rows(rows, batch_size, 1 + len(sample_shape)), batch=True,
                                   dtype=types.INT32)
        return fn.readers.numpy(file_root=root, files=list(files), random_shuffle=False, roi_start=start,
                                roi_shape=[1, *sample_shape], out_of_bounds_policy="error",
                                device="gpu" if gpu else "cpu", name="shards")

    p = pipe()
    p.build()
    return p


def adm_crop_sizes(height: int, width: int, size: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The ADM center crop (guided-diffusion's center_crop_arr) as sizes: ((h, w) after the 2x box halvings,
    (h, w) after the bicubic resize of the short side to `size`, (top, left) of the center crop)."""
    h, w = height, width
    while min(h, w) >= 2 * size:
        h, w = h // 2, w // 2
    scale = size / min(h, w)
    h2, w2 = round(h * scale), round(w * scale)
    return (h, w), (h2, w2), ((h2 - size) // 2, (w2 - size) // 2)


def decode_crop_pipeline(batch_size: int, size: int, device: torch.device, num_threads: int = 2):
    """Encoded images (fed as 'encoded'), with per-sample 'halved' [h, w], 'resized' [h, w] and 'anchor' [top, left]
    from adm_crop_sizes -> uint8 [size, size, 3] RGB. Decoding is 'mixed' (nvJPEG) on CUDA, 'cpu' otherwise.

    The repeated 2x box halvings of ADM become one antialiased linear resize to the same size (an area-like
    filter; equal for a single halving up to rounding), then an antialiased bicubic resize, as PIL's."""
    gpu = device.type == "cuda"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=_device_id(device), prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        halved = fn.external_source(name="halved", dtype=types.FLOAT, ndim=1)
        resized = fn.external_source(name="resized", dtype=types.FLOAT, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                adjust_orientation=False)  # PIL (and so ADM) ignores EXIF orientation
        img = fn.resize(img, size=halved, interp_type=types.INTERP_LINEAR, antialias=True)
        img = fn.resize(img, size=resized, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.slice(img, start=anchor, shape=[size, size], axes=[0, 1], out_of_bounds_policy="error")

    p = pipe()
    p.build()
    return p


def feed_images(pipe, encoded: Sequence[bytes], sizes: Sequence[tuple]) -> None:
    pipe.feed_input("encoded", [np.frombuffer(e, np.uint8) for e in encoded])
    pipe.feed_input("halved", [np.array(s[0], np.float32) for s in sizes])
    pipe.feed_input("resized", [np.array(s[1], np.float32) for s in sizes])
    pipe.feed_input("anchor", [np.array(s[2], np.int32) for s in sizes])
