"""Distribution applied to an ordinary model, in one place (the model file knows nothing of it).

`init_distributed` reads torchrun's environment (NCCL on GPUs, gloo on CPU); `parallelize` applies, per config,
activation checkpointing and torch.compile per DiT block, then FSDP2 (fully_shard per block, then at the root, with
bf16 parameters/compute and fp32 gradient reduction) or DDP.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE is set (any size, so a 1-rank torchrun is valid too)."""
    want_cuda = resolve_device(device).type == "cuda"
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=dev if want_cuda else None)
    return DistInfo(rank, world, local, dev)


def parallelize(model: nn.Module, mode: str, *, param_dtype: Optional[torch.dtype], activation_checkpointing: bool,
                compile_blocks: bool, device: torch.device) -> nn.Module:
    """Apply AC, compile and FSDP2 / DDP to a DiT-like model (anything with a `.blocks` ModuleList)."""
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel: unknown value {mode!r}; expected one of {list(PARALLEL_MODES)}")
    blocks = getattr(model, "blocks", [])
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint  # composable: parameter names stay unchanged

        for block in blocks:
            checkpoint(block)
    if compile_blocks:
        for block in blocks:
            block.compile()
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # cast_forward_inputs=False: x, t and s reach the network in fp32. With the default (True) t and s would be
        # rounded to bf16, whose spacing near 0.7 is 0.004: t and l would collapse to one value (docs/precision.md).
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a DTensor shard into the whole tensor (a collective: every rank must call it); plain tensors pass."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
