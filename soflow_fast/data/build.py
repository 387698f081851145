"""The config's dataset as a loader of this rank's rows, with the shape and class count the model is built for."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, TrainConfig
from ..parallel import DistInfo
from .loader import Loader

log = logging.getLogger("soflow_fast")

BAD_IMAGES_RECORD = "bad_images.jsonl"


@dataclass(frozen=True)
class Data:
    loader: Loader
    in_channels: int
    num_classes: int  # 0: unconditional


def build_data(cfg: TrainConfig, dist: DistInfo, run_dir: Path) -> Data:
    """The loader for dataset_type (per-rank batches of batch_size / world size rows: data/loader.py), checked
    against data_size and num_classes (None: the dataset's own count); a mismatch is a ConfigError naming the key.
    An ImageFolder's undecodable images follow bad_images, recorded in run_dir/bad_images.jsonl."""
    local = cfg.batch_size // dist.world_size
    kind = cfg.dataset_type
    if kind != "digits" and not cfg.dataset_path:
        raise ConfigError(f"config: dataset_path is empty; point it at {_WANTS[kind]}")
    if kind == "Imagenet":
        from .latents import LatentLoader

        loader = LatentLoader(cfg.dataset_path, local, cfg.seed, dist.rank, dist.world_size, dist.device)
        size = loader.sample_shape[-1]
        if size != cfg.data_size:
            raise ConfigError(f"config: data_size = {cfg.data_size} but the latents in {cfg.dataset_path} are "
                              f"{size}x{size}")
        classes = loader.num_classes if cfg.num_classes is None else cfg.num_classes
        if classes != loader.num_classes:
            raise ConfigError(f"config: num_classes = {classes} but {cfg.dataset_path} has {loader.num_classes}")
        log.info("data: %s", loader.description)
        return Data(loader, loader.sample_shape[0], classes)
    if kind in ("ImageFolder", "CIFAR10"):  # pixel space; ImageFolder at data_size, one class per folder
        from .imagefolder import BadImages, PixelLoader

        cifar = kind == "CIFAR10"
        if cifar and cfg.data_size != 32:
            raise ConfigError(f"config: data_size = {cfg.data_size}: CIFAR-10 images are 32x32")
        # CIFAR-10 is unconditional unless num_classes says otherwise, as the reference
        classes = (0 if cifar else None) if cfg.num_classes is None else cfg.num_classes
        try:
            loader = PixelLoader(cfg.dataset_path, None if cifar else cfg.data_size, local, cfg.seed, dist.rank,
                                 dist.world_size, dist.device, kind=kind.lower(), labelled=classes != 0,
                                 bad_images=BadImages(cfg.bad_images, Path(run_dir) / BAD_IMAGES_RECORD))
        except FileNotFoundError as e:
            raise ConfigError(f"config: dataset_path = {cfg.dataset_path!r}: {e}") from None
        classes = loader.num_classes if classes is None else classes
        if classes not in (0, loader.num_classes):
            raise ConfigError(f"config: num_classes = {classes}: {cfg.dataset_path} has {loader.num_classes} "
                              "classes (or 0: unconditional)")
        return Data(loader, 3, classes)
    from .digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_split
    from .loader import TensorLoader

    if cfg.data_size != IMAGE_SHAPE[-1]:
        raise ConfigError(f"config: data_size = {cfg.data_size}: the digits are {IMAGE_SHAPE[-1]}x{IMAGE_SHAPE[-1]}")
    x, y, _, _ = load_digits_split()
    classes = NUM_CLASSES if cfg.num_classes is None else cfg.num_classes
    if classes not in (0, NUM_CLASSES):
        raise ConfigError(f"config: num_classes = {classes}: the digits have {NUM_CLASSES} classes (or 0)")
    return Data(TensorLoader(x, y if classes else None, local, cfg.seed, dist.device, dist.rank, dist.world_size),
                IMAGE_SHAPE[0], classes)


_WANTS = {"Imagenet": "a folder made by `soflow-fast prepare-latents` or `convert-latents`",
          "ImageFolder": "a folder with one sub-folder per class",
          "CIFAR10": "a local CIFAR-10 folder (torchvision's cifar-10-batches-py layout; nothing is downloaded)"}
