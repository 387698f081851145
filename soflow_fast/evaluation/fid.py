"""FID, sFID, Inception Score, precision and recall of generated images, the ADM evaluator's way, offline.

Images come as uint8 NHWC (an .npz whose arr_0 is the ADM layout, a folder of image files, or a sampling function
during training); the FID Inception (inception.py, weights from a local file) turns them into pool_3 features,
logits and spatial features; the Frechet distance is frechet.py's float64 one. A reference is either a statistics
.npz (mu / sigma, and mu_s / sigma_s for sFID: the layout of ADM's reference batches such as
VIRTUAL_imagenet256_labeled.npz, which also carry arr_0 but whose precomputed statistics win, as in the ADM
evaluator) or real images in either form above.

Precision and recall (manifold.py) need the reference's pool features themselves, not only their statistics. A
reference given as images provides them; ADM's reference batches carry their images as arr_0, from which they are
computed once per call (as the ADM evaluator does); `evaluate --save-ref-stats` stores them as `pool` beside the
statistics, so a later run (or the trainer's periodic FID) reads them instead. A statistics file without `pool` or
arr_0 gives FID, sFID and IS only.

During training (`evaluate_model_fid`) the samples are drawn in chunks whose noise depends on the chunk index alone;
rank r samples chunks r, r + W, ..., and the features are gathered to rank 0 in chunk order, so the numbers are the
same on any world size.

The .npz images are streamed from the zip member in batches, so 50K ImageNet-256 samples (~10 GB) never sit in
memory at once; only the features do (50K x 2048 float32 = 400 MB).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..fileio import atomic_open
from ..parallel import DistInfo, host_group
from .frechet import frechet_distance, gaussian_stats
from .inception import InceptionFeatures, InceptionV3FID
from .manifold import precision_recall

ImageBatch = Union[np.ndarray, Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IS_SPLIT_SIZE = 5000  # the ADM evaluator scores splits of 5000 samples (10 splits for 50K) and averages


@dataclasses.dataclass
class ReferenceStats:
    """Gaussian statistics of a reference set: pool_3 (FID) and, when known, spatial (sFID) statistics and the pool
    features themselves (precision and recall)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    source: str = ""
    pool: Optional[np.ndarray] = None  # [N, D] float32

    def save(self, path: str | os.PathLike) -> None:
        """Write the ADM reference layout (mu, sigma, mu_s, sigma_s), plus `pool` when known, so that later runs
        and training can reuse it."""
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.mu_s is not None:
            arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
        if self.pool is not None:
            arrays.update(pool=self.pool)
        with atomic_open(path) as fh:
            np.savez(fh, **arrays)


@dataclasses.dataclass
class Features:
    pool: np.ndarray     # [N, D] float32
    logits: np.ndarray   # [N, 1008] float32
    spatial: np.ndarray  # [N, S] float32

    def stats(self, source: str = "") -> ReferenceStats:
        return ReferenceStats(*gaussian_stats(self.pool), *gaussian_stats(self.spatial), source=source,
                              pool=self.pool)

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        return Features(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Features)))


# ---------------------------------------------------------------- image sources

def _check_images(shape: tuple, dtype: object, where: str, min_images: int = 2) -> None:
    if dtype != np.uint8:
        raise ValueError(f"{where} has dtype {dtype}; expected uint8 images [N, H, W, 3] (the ADM layout)")
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(f"{where} has shape {tuple(shape)}; expected uint8 images [N, H, W, 3] (NHWC, RGB; "
                         "[N, H, W, 1] is read as grayscale)")
    if shape[0] < min_images:
        raise ValueError(f"{where} holds {shape[0]} image(s); need at least {min_images}")


class NpzImages:
    """arr_0 of an .npz, validated from its header and read in batches straight from the zip member."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0") -> None:
        self.path, self.key = str(path), key
        with self._open() as fh:
            self.shape, self._fortran, self.dtype = _read_npy_header(fh, self.path, key)
        _check_images(self.shape, self.dtype, f"{self.path}: array {key!r}")

    def __len__(self) -> int:
        return self.shape[0]

    @contextlib.contextmanager
    def _open(self) -> Iterator:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{self.path}: not an .npz file ({e})") from e
        with zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if self.key not in names:
                raise ValueError(f"{self.path}: no array {self.key!r} (it holds {names}); expected arr_0 = uint8 "
                                 "images [N, H, W, 3], the ADM evaluator's layout")
            with zf.open(self.key + ".npy") as fh:
                yield fh

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        with self._open() as fh:
            _read_npy_header(fh, self.path, self.key)
            if self._fortran:  # rare (hand-made files); the column-major data cannot be sliced by rows
                arr = np.load(self.path)[self.key]
                yield from (arr[i:i + batch_size] for i in range(0, len(arr), batch_size))
                return
            per_image = int(np.prod(self.shape[1:]))
            for start in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - start)
                buf = bytearray(fh.read(n * per_image))  # writable, so torch can wrap it without a warning
                if len(buf) != n * per_image:
                    raise ValueError(f"{self.path}: array {self.key!r} is truncated (ends inside image {start})")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(n, *self.shape[1:])


def _read_npy_header(fh, path: str, key: str) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"{path}: array {key!r} has .npy format version {version}, which this reader does not know")
    shape, fortran, dtype = read(fh)
    return tuple(shape), fortran, dtype


class FolderImages:
    """Image files under a folder (recursively, sorted), all of one size, read as RGB."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(self.files) < 2:
            raise ValueError(f"{self.path}: found {len(self.files)} image file(s) ({', '.join(IMAGE_SUFFIXES)}); "
                             "need at least 2")
        self.size = self._read(self.files[0]).shape

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.files), batch_size):
            images = []
            for f in self.files[start:start + batch_size]:
                img = self._read(f)
                if img.shape != self.size:  # batching needs one size; ADM-style sets are center-cropped beforehand
                    raise ValueError(f"{f}: size {img.shape[1]}x{img.shape[0]} differs from {self.files[0]} "
                                     f"({self.size[1]}x{self.size[0]}); resize/crop the folder to one size first")
                images.append(img)
            yield np.stack(images)


def open_images(path: str | os.PathLike) -> Union[NpzImages, FolderImages]:
    if os.path.isdir(path):
        return FolderImages(path)
    return NpzImages(path)


# ---------------------------------------------------------------- features and scores

@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """TF32 off while extracting: the graph ran in true fp32, and TF32 convs (torch's default) move FID."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def extract_features(batches: Iterable[ImageBatch], extractor: Callable[[Tensor], InceptionFeatures],
                     total: Optional[int] = None, desc: str = "features", progress: bool = False) -> Features:
    """Run uint8 NHWC batches (numpy or torch, any device) through the extractor on its own device."""
    device = _device_of(extractor)
    parts: list[InceptionFeatures] = []
    # Autocast off too: the trainer may call this from inside its bf16 region, and the graph's numbers are fp32.
    with _full_fp32(), torch.autocast(device.type, enabled=False), \
            tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for batch in batches:
            x = torch.as_tensor(batch)
            _check_images(tuple(x.shape), np.dtype(np.uint8) if x.dtype == torch.uint8 else x.dtype,
                          f"{desc}: image batch", min_images=1)
            x = x.to(device, non_blocking=True).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # grayscale as RGB, as PIL's convert("RGB") would
            out = extractor(x)
            parts.append(InceptionFeatures(*(t.float().cpu() for t in out)))
            bar.update(x.shape[0])
    if not parts:
        raise ValueError(f"{desc}: no images")
    return Features(*(torch.cat(ts).numpy() for ts in zip(*parts)))


def inception_score(logits: np.ndarray | Tensor, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) over consecutive splits of split_size of exp(E_x KL(p(y|x) || p(y))), as the ADM evaluator.

    float64, log_softmax and 0 log 0 = 0: the evaluator's log(softmax) turns underflowed probabilities into NaN.
    """
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"logits: expected [N, classes], got shape {tuple(z.shape)}")
    scores = []
    for part in z.split(split_size):
        logp = part.log_softmax(dim=1)
        p = logp.exp()
        log_py = p.mean(dim=0).log()
        kl = torch.where(p > 0, p * (logp - log_py), 0.0)  # 0 log 0 = 0 (a class no sample gives any mass)
        scores.append(float(kl.sum(dim=1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _check_pool_dim(ref: ReferenceStats, d: int) -> None:
    if ref.mu.shape != (d,):
        raise ValueError(f"reference {ref.source}: mu has shape {ref.mu.shape} but the Inception gives {d}-d pool "
                         "features (statistics from another network?)")


def scores_against(features: Features, ref: ReferenceStats,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """FID (and sFID when the reference has spatial statistics) of features, their Inception Score, and precision
    and recall (on `device`) when the reference has its pool features."""
    _check_pool_dim(ref, features.pool.shape[1])
    mu, sigma = gaussian_stats(features.pool)
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ref.mu_s is not None:
        s = features.spatial.shape[1]
        if ref.mu_s.shape != (s,):
            raise ValueError(f"reference {ref.source}: mu_s has shape {ref.mu_s.shape} but the Inception gives "
                             f"{s}-d spatial features")
        out["sfid"] = frechet_distance(*gaussian_stats(features.spatial), ref.mu_s, ref.sigma_s)
    out["inception_score"], out["inception_score_std"] = inception_score(features.logits)
    if ref.pool is not None:
        if ref.pool.shape[1] != features.pool.shape[1]:
            raise ValueError(f"reference {ref.source}: pool has {ref.pool.shape[1]}-d features but the Inception "
                             f"gives {features.pool.shape[1]}")
        out.update(precision_recall(torch.as_tensor(ref.pool, device=device), features.pool))
    return out


# ---------------------------------------------------------------- entry points

def load_reference_stats(path: str | os.PathLike) -> ReferenceStats:
    """mu / sigma (and mu_s / sigma_s, pool if present) from a statistics .npz (ADM reference batch layout)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with np.load(path) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: no 'mu'/'sigma' arrays (it holds {list(z.keys())}); not reference statistics")
        spatial = "mu_s" in z and "sigma_s" in z
        return ReferenceStats(z["mu"], z["sigma"], z["mu_s"] if spatial else None, z["sigma_s"] if spatial else None,
                              source=str(path), pool=z["pool"] if "pool" in z else None)


def reference_stats(path: str | os.PathLike, extractor: Callable[[Tensor], InceptionFeatures],
                    batch_size: int = 100, progress: bool = False) -> ReferenceStats:
    """Statistics of a reference: read from a statistics .npz, or computed from real images (.npz or folder). The
    pool features come from the file, else from its arr_0 images (an ADM reference batch: its statistics win)."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with np.load(path) as z:
            has_stats, has_images = "mu" in z and "sigma" in z, "arr_0" in z
        if has_stats:
            ref = load_reference_stats(path)
            if ref.pool is None and has_images:
                images = NpzImages(path)
                ref.pool = extract_features(images.batches(batch_size), extractor, len(images), "reference pool",
                                            progress).pool
            return ref
    images = open_images(path)
    feats = extract_features(images.batches(batch_size), extractor, len(images), "reference", progress)
    return feats.stats(source=str(path))


def evaluate_npz(samples: str | os.PathLike, reference: ReferenceStats,
                 extractor: Callable[[Tensor], InceptionFeatures], batch_size: int = 100,
                 progress: bool = False) -> dict[str, float]:
    """FID / sFID / IS of the arr_0 images of an .npz against reference statistics."""
    images = NpzImages(samples)
    if isinstance(extractor, InceptionV3FID):  # a mismatch is known now; say so before the long pass
        _check_pool_dim(reference, extractor.feature_dim)
    feats = extract_features(images.batches(batch_size), extractor, len(images), "samples", progress)
    return {**scores_against(feats, reference, _device_of(extractor)), "num_samples": len(images)}


def _device_of(extractor: Callable) -> torch.device:
    return next(extractor.parameters()).device if isinstance(extractor, torch.nn.Module) else torch.device("cpu")


def evaluate_model_fid(sample_fn: Callable[[int, int], ImageBatch], n: int, reference_stats: Optional[ReferenceStats],
                       feature_extractor: Callable[[Tensor], InceptionFeatures], batch_size: int,
                       dist: Optional[DistInfo] = None) -> Optional[dict[str, float]]:
    """Periodic evaluation during training: FID (sFID when the reference has spatial stats), IS, and precision and
    recall (when it has pool features) of n samples, drawn by all ranks. Collective under torchrun.

    The n samples are chunks c = 0, 1, ... of batch_size; sample_fn(c, k) returns chunk c's k images as uint8 NHWC
    (numpy or a tensor on any device), its noise drawn from a generator seeded by c alone. Rank r takes chunks r,
    r + W, ...; rank 0 gathers the features in chunk order and scores them (reference_stats is needed there only),
    so the result does not depend on the world size. Returns, on rank 0, fid, [sfid], inception_score,
    inception_score_std, [precision, recall], fid_num_samples: ready to merge into a metrics.jsonl record; None on
    the other ranks.
    """
    if n < 2:
        raise ValueError(f"evaluate_model_fid: n = {n}; a covariance needs at least 2 samples")
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    total = (n + batch_size - 1) // batch_size
    chunks = range(rank, total, world)

    def batches() -> Iterator[ImageBatch]:
        for c in chunks:
            k = min(batch_size, n - c * batch_size)
            images = sample_fn(c, k)
            if len(images) != k:
                raise ValueError(f"evaluate_model_fid: sample_fn({c}, {k}) returned {len(images)} images")
            yield images

    mine = [extract_features([b], feature_extractor, desc="fid samples") for b in batches()]
    if world > 1:
        import torch.distributed as torch_dist

        every: Optional[list] = [None] * world if rank == 0 else None
        torch_dist.gather_object(mine, every, dst=0, group=host_group())  # CPU arrays over gloo
        if rank != 0:
            return None
        mine = [every[c % world][c // world] for c in range(total)]
    feats = Features.concat(mine)
    return {**scores_against(feats, reference_stats, _device_of(feature_extractor)), "fid_num_samples": n}
