"""Writing latent directories (format: latents.py): ImageNet-style folders through DALI and an SD-VAE, or an import
of the reference implementation's imagenet_latent.hdf5.

Preparation is resumable and rank-parallel: shard k covers inputs [k * shard_size, (k + 1) * shard_size) of the
sorted file list and belongs to rank k % world_size; each shard's arrays are written under a temporary name and
renamed, then its small JSON record (the completion mark) likewise. A rerun skips complete shards; rank 0 writes
manifest.json once every shard is complete. Options are fixed in prepare.json: a rerun with others is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..fileio import atomic_open, sha256_file
from ..vae import LATENT_SCALE, VAEError, encode, load_vae
from .latents import FORMAT, MANIFEST, LatentDataError, check_npy, shard_names

log = logging.getLogger("soflow_fast")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class PrepareError(ValueError):
    """A bad input to latent preparation (image folder, image, VAE directory, options)."""


# -- small pieces ----------------------------------------------------------------------------------------------------
def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to root, label)]) of an ImageFolder tree, sorted as torchvision sorts it."""
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise PrepareError(f"image folder {root} has no class sub-folders")
    items = []
    for label, c in enumerate(classes):
        files = sorted(str(p.relative_to(root)) for p in (root / c).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise PrepareError(f"class folder {root / c} has no images ({'/'.join(IMAGE_EXTENSIONS)})")
        items += [(f, label) for f in files]
    return classes, items


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    data = buf.getvalue()
    _atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_shard(out: Path, k: int, latents: np.ndarray, labels: np.ndarray, extra: Optional[dict] = None) -> dict:
    """Both arrays, then the shard record (written last: its presence means the shard is complete)."""
    file, lfile = shard_names(k)
    record = {"file": file, "labels": lfile, "count": int(len(labels)),
              "sha256": _atomic_save_npy(out / file, latents),
              "labels_sha256": _atomic_save_npy(out / lfile, labels.astype(np.int64)), **(extra or {})}
    _atomic_write_bytes(out / f"shard-{k:05d}.json", json.dumps(record).encode())
    return record


def complete_shard(out: Path, k: int, sample_shape: Sequence[int], dtype: np.dtype) -> Optional[dict]:
    """The record of shard k if it was completed (and its files still have the recorded shapes), else None."""
    rpath = out / f"shard-{k:05d}.json"
    if not rpath.is_file():
        return None
    record = json.loads(rpath.read_text())
    check_npy(out / record["file"], (record["count"], *sample_shape), dtype, f"shard {k} of {out}")
    check_npy(out / record["labels"], (record["count"],), np.dtype(np.int64), f"shard {k} of {out}")
    return record


def _fix_options(out: Path, options: dict) -> None:
    path = out / "prepare.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != options:
            diff = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
            raise PrepareError(f"{out} was prepared with other options ({', '.join(diff)} differ); use a new output "
                               "directory or the same options")
    else:
        _atomic_write_bytes(path, json.dumps(options, indent=1).encode())


def write_manifest(out: Path, num_shards: int, sample_shape: Sequence[int], dtype: np.dtype, info: dict) -> dict:
    records = []
    for k in range(num_shards):
        r = complete_shard(out, k, sample_shape, dtype)
        if r is None:
            raise PrepareError(f"{out}: shard {k} is not complete; rerun the preparation to finish it")
        records.append(r)
    skipped = [s for r in records for s in r.pop("skipped", [])]
    manifest = {"format": FORMAT, "count": sum(r["count"] for r in records), "sample_shape": list(sample_shape),
                "dtype": np.dtype(dtype).name, **info, "skipped": skipped, "shards": records}
    _atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _dist_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # a barrier only: gloo works beside CUDA and without it
        dist.barrier()


# -- ImageFolder -> latents --------------------------------------------------------------------------------------------
class _Decoder:
    """DALI decode + ADM crop of a list of files; names the files it cannot read."""

    def __init__(self, root: Path, size: int, batch_size: int, device: torch.device, num_threads: int, on_error: str):
        from . import dali

        self.dali, self.root, self.size, self.batch_size = dali, root, size, batch_size
        self.device, self.num_threads, self.on_error = device, num_threads, on_error
        self.pipe = self._pipe(batch_size)

    def _pipe(self, batch_size: int):
        return self.dali.decode_crop_pipeline(batch_size, self.size, self.device, self.num_threads)

    def _run(self, pipe, encoded: list[bytes], sizes: list) -> torch.Tensor:
        self.dali.feed_images(pipe, encoded, sizes)
        return self.dali.run_to_torch(pipe, self.device)[0]

    def _bad(self, rel: str, err: str, skipped: list) -> None:
        msg = f"image {self.root / rel}: cannot be decoded ({err})"
        if self.on_error == "stop":
            raise PrepareError(msg + "; pass --on-error skip to leave it out")
        log.warning("%s; skipped", msg)
        skipped.append({"file": rel, "error": err})

    def __call__(self, files: list[str], skipped: list) -> tuple[torch.Tensor, list[int]]:
        """uint8 [n, size, size, 3] on the device and the positions (in `files`) of the images that decoded."""
        from PIL import Image

        encoded, sizes, keep = [], [], []
        for i, rel in enumerate(files):
            try:
                data = (self.root / rel).read_bytes()
                with Image.open(io.BytesIO(data)) as im:  # header only: the size drives the crop parameters
                    w, h = im.size
            except Exception as e:  # noqa: BLE001 -- OSError, PIL's UnidentifiedImageError, ...
                self._bad(rel, f"{type(e).__name__}: {e}", skipped)
                continue
            encoded.append(data)
            sizes.append(self.dali.adm_crop_sizes(h, w, self.size))
            keep.append(i)
        if not keep:
            return torch.zeros((0, self.size, self.size, 3), dtype=torch.uint8, device=self.device), []
        try:
            return self._run(self.pipe, encoded, sizes), keep
        except RuntimeError:
            self.pipe = self._pipe(self.batch_size)  # a failed DALI pipeline is not reusable
        # find the culprit(s) one image at a time
        out, kept = [], []
        for data, size, i in zip(encoded, sizes, keep):
            try:
                out.append(self._run(self._pipe(1), [data], [size]))
                kept.append(i)
            except RuntimeError as e:
                first = next((line for line in str(e).splitlines() if "rror" in line), str(e)[:200])
                self._bad(files[i], first.strip()[:300], skipped)
        if not out:
            return torch.zeros((0, self.size, self.size, 3), dtype=torch.uint8, device=self.device), []
        return torch.cat(out), kept


def prepare_latents(src: str | os.PathLike, out: str | os.PathLike, vae_dir: str | os.PathLike,
                    image_size: int = 256, shard_size: int = 1024, dtype: str = "float16", batch_size: int = 32,
                    on_error: str = "stop", device: torch.device | str = "cpu", num_threads: int = 4,
                    rank: Optional[int] = None, world_size: Optional[int] = None,
                    max_new_shards: Optional[int] = None) -> Optional[dict]:
    """Encode an ImageFolder into a latent directory. Returns the manifest (rank 0, once complete), else None.
    max_new_shards stops early (without a manifest) after that many new shards: work in slices, or test resume."""
    env_rank, env_world = _dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if image_size % 8 or image_size <= 0:
        raise PrepareError(f"image size {image_size}: must be a positive multiple of 8 (the VAE downsamples 8x)")
    if on_error not in ("stop", "skip"):
        raise PrepareError(f"on_error {on_error!r}: expected 'stop' or 'skip'")
    np_dtype = np.dtype(dtype)
    if np_dtype not in (np.float16, np.float32):
        raise PrepareError(f"dtype {dtype!r}: expected float16 or float32")
    device = torch.device(device)
    src, out = Path(src), Path(out)
    classes, items = scan_image_folder(src)
    try:
        vae = load_vae(vae_dir, device)
    except VAEError as e:
        raise PrepareError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    listing = hashlib.sha256("\n".join(f"{f}\t{y}" for f, y in items).encode()).hexdigest()
    options = {"source": str(src.resolve()), "vae": str(Path(vae_dir).resolve()), "image_size": image_size,
               "shard_size": shard_size, "dtype": np_dtype.name, "files": len(items), "file_list_sha256": listing}
    if rank == 0:
        _fix_options(out, options)
    _barrier(world_size)
    if rank != 0:
        _fix_options(out, options)
    sample_shape = (8, image_size // 8, image_size // 8)
    num_shards = (len(items) + shard_size - 1) // shard_size
    decode = _Decoder(src, image_size, batch_size, device, num_threads, on_error)
    new = 0
    for k in range(rank, num_shards, world_size):
        if complete_shard(out, k, sample_shape, np_dtype) is not None:
            continue
        if max_new_shards is not None and new >= max_new_shards:
            return None
        part = items[k * shard_size:(k + 1) * shard_size]
        latents, labels, skipped = [], [], []
        for b in range(0, len(part), batch_size):
            chunk = part[b:b + batch_size]
            images, kept = decode([f for f, _ in chunk], skipped)
            if kept:
                latents.append(encode(vae, images).cpu().numpy().astype(np_dtype))
                labels += [chunk[i][1] for i in kept]
        lat = np.concatenate(latents) if latents else np.zeros((0, *sample_shape), np_dtype)
        if lat.shape[1:] != sample_shape:
            raise PrepareError(f"VAE {vae_dir} gives latents {list(lat.shape[1:])}, expected {list(sample_shape)} "
                               "(an SD-style AutoencoderKL with 4 latent channels and 8x downsampling)")
        write_shard(out, k, lat, np.asarray(labels, np.int64),
                    {"inputs": [k * shard_size, k * shard_size + len(part)], "skipped": skipped})
        new += 1
        log.info("rank %d: shard %d/%d: %d latents%s", rank, k + 1, num_shards, len(labels),
                 f", {len(skipped)} skipped" if skipped else "")
    _barrier(world_size)
    if rank != 0:
        return None
    info = {"image_size": image_size, "latent_scale": LATENT_SCALE, "classes": classes, "num_classes": len(classes),
            "shard_size": shard_size, "source": str(src.resolve()), "vae": str(Path(vae_dir).resolve())}
    manifest = write_manifest(out, num_shards, sample_shape, np_dtype, info)
    log.info("wrote %s: %d latents in %d shards%s", out / MANIFEST, manifest["count"], num_shards,
             f" ({len(manifest['skipped'])} images skipped)" if manifest["skipped"] else "")
    return manifest


# -- the reference implementation's HDF5 -> latents ----------------------------------------------------------------
def convert_hdf5(src: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1024, dtype: str = "float32",
                 num_classes: Optional[int] = None) -> dict:
    """imagenet_latent.hdf5 (latents [N, 8, h, w] float32, labels [N] int64, amount, latent_size) -> shards."""
    try:
        import h5py
    except ImportError as e:
        raise PrepareError("convert-latents needs h5py (pip install h5py)") from e
    src, out = Path(src), Path(out)
    if src.is_dir():
        src = src / "imagenet_latent.hdf5"
    if not src.is_file():
        raise PrepareError(f"{src} does not exist")
    np_dtype = np.dtype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as f:
        for key in ("latents", "labels"):
            if key not in f:
                raise PrepareError(f"{src}: no dataset {key!r}; not a reference imagenet_latent.hdf5")
        lat, lab = f["latents"], f["labels"]
        n = int(f["amount"][()]) if "amount" in f else lat.shape[0]
        if lat.ndim != 4 or lat.shape[1] != 8 or lab.shape[0] < n or lat.shape[0] < n:
            raise PrepareError(f"{src}: latents {list(lat.shape)} / labels {list(lab.shape)} / amount {n}: expected "
                               "latents [N, 8, h, w] and labels [N] with N >= amount")
        sample_shape = tuple(int(v) for v in lat.shape[1:])
        if "latent_size" in f and int(f["latent_size"][()]) != sample_shape[-1]:
            raise PrepareError(f"{src}: latent_size {int(f['latent_size'][()])} but latents are {list(sample_shape)}")
        _fix_options(out, {"source": str(src.resolve()), "shard_size": shard_size, "dtype": np_dtype.name,
                           "count": n})
        num_shards = (n + shard_size - 1) // shard_size
        max_label = -1
        for k in range(num_shards):
            a, b = k * shard_size, min((k + 1) * shard_size, n)
            labels = np.asarray(lab[a:b], np.int64)
            max_label = max(max_label, int(labels.max(initial=-1)))
            if complete_shard(out, k, sample_shape, np_dtype) is None:
                write_shard(out, k, np.asarray(lat[a:b]).astype(np_dtype), labels, {"inputs": [a, b]})
    classes = num_classes if num_classes is not None else max_label + 1
    if max_label >= classes:
        raise PrepareError(f"{src}: label {max_label} is outside 0..{classes - 1} (--num-classes)")
    info = {"image_size": sample_shape[-1] * 8, "latent_scale": LATENT_SCALE, "classes": None, "num_classes": classes,
            "shard_size": shard_size, "source": str(src.resolve()), "vae": None}
    manifest = write_manifest(out, num_shards, sample_shape, np_dtype, info)
    log.info("converted %s: %d latents in %d shards -> %s", src, n, num_shards, out)
    return manifest


def verify(out: str | os.PathLike) -> dict:
    """Check every shard against the manifest, checksums included; returns the manifest."""
    from .latents import LatentShards

    return LatentShards.open(out, checksums=True).manifest


__all__ = ["PrepareError", "LatentDataError", "scan_image_folder", "prepare_latents", "convert_hdf5", "verify",
           "write_shard", "sha256_file"]
