"""Distribution applied to an ordinary model, in one place (the model file knows nothing of it).

`init_distributed` reads torchrun's environment (NCCL on GPUs, gloo on CPU); `parallelize` applies, per config,
activation checkpointing per DiT block, torch.compile (per block or of the whole network), then FSDP2 (fully_shard
per block, then at the root, with bf16 parameters/compute and fp32 gradient reduction) or DDP (the composable
`replicate`). Both act in place: the network keeps its class's interface and parameter names (no wrapper to unwrap),
and both take `set_requires_gradient_sync` to skip the all-reduce of all but the last micro-batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

PARALLEL_MODES = ("none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")  # resolve_device's names
# none: eager; blocks: torch.compile each DiT block; model: the whole network (one graph per call shape); step: the
# whole loss of a step, its three calls and the loss math, one graph (soflow_fast.step.compiled_loss; parallel none);
# auto: model on CUDA, none elsewhere (this project's 2-core CPU, digits config: 84 s to compile, then no faster).
COMPILE_MODES = ("auto", "none", "blocks", "model", "step")
GPUS_PER_NODE = 8  # FSDP2 worlds up to one node keep the blocks gathered after forward (resolve_reshard_after_forward)


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


def resolve_compile(name: str, device: torch.device | str) -> str:
    """'auto' -> 'model' on CUDA, 'none' elsewhere; the other modes are taken as asked."""
    if name not in COMPILE_MODES:
        raise ValueError(f"compile: unknown value {name!r}; expected one of {list(COMPILE_MODES)}")
    if name == "auto":
        return "model" if torch.device(device).type == "cuda" else "none"
    return name


def check_cuda_graphs(compile: str, device: torch.device | str, parallel: str) -> None:
    """cuda_graphs: true needs the whole network or step compiled (a resolved compile 'model' or 'step'), on CUDA,
    without FSDP (whose 'model' compiles each block between its hooks); raises ValueError naming cuda_graphs
    otherwise."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs = true needs a CUDA device, not {torch.device(device).type}; set it false")
    if compile not in ("model", "step") or parallel == "fsdp":
        why = f"parallel {parallel}" if compile in ("model", "step") else f"compile {compile}"
        raise ValueError(f"cuda_graphs = true needs compile model (or auto) or step without FSDP, not {why}")


def compile_backend() -> str:
    """torch.compile's backend: inductor, unless SOFLOW_COMPILE_BACKEND names another (tests use aot_eager: the same
    graphs run by eager kernels, compiled in seconds on a CPU)."""
    return os.environ.get("SOFLOW_COMPILE_BACKEND", "inductor")


def resolve_reshard_after_forward(value: Optional[bool], world_size: int) -> bool:
    """Whether FSDP2 frees each block's gathered weights after its forward (None = auto: only beyond one node).

    A step makes three network calls and one backward. Resharding after every forward all-gathers each block's
    weights four times per step; keeping them gathered all-gathers them once, and costs holding the whole unsharded
    network on every rank from the first call to the end of the backward: (1 - 1/W) of the parameters more memory
    (XL/2: about 2.7 GB in fp32). On one node that is small beside the activations, and worth three all-gathers.
    Larger worlds are used where memory is the constraint, so auto keeps FSDP's default (reshard) there; set false
    to trade that memory for the all-gathers, which then cross nodes and cost more.
    """
    return world_size > GPUS_PER_NODE if value is None else value


def _checkpointed(forward: Callable) -> Callable:
    """`forward` under non-reentrant activation checkpointing. A plain function that torch.compile traces (into its
    checkpoint operator), unlike the composable checkpoint's module hooks; the module keeps its parameter names."""
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def parallelize(model: nn.Module, mode: str, *, param_dtype: Optional[torch.dtype], activation_checkpointing: bool,
                compile: str, device: torch.device, reshard_after_forward: Optional[bool] = None,
                cuda_graphs: bool = False) -> nn.Module:
    """Apply AC, torch.compile and FSDP2 / DDP to a network; AC and per-block work act on its `.blocks` (the DiT's).

    compile: a resolved mode ('none' | 'blocks' | 'model' | 'step', see resolve_compile; 'step' compiles no module
    here: the trainer compiles the loss, soflow_fast.step.compiled_loss). reshard_after_forward: FSDP2's
    choice for the blocks (None = auto: resolve_reshard_after_forward); the root never reshards after forward (the
    backward needs it at once). cuda_graphs: compile with mode "reduce-overhead" (CUDA graph trees; checked by
    check_cuda_graphs; UNTESTED ON A GPU).
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel: unknown value {mode!r}; expected one of {list(PARALLEL_MODES)}")
    if compile not in COMPILE_MODES[1:]:
        raise ValueError(f"compile: expected a resolved mode {list(COMPILE_MODES[1:])}, got {compile!r}")
    blocks = list(getattr(model, "blocks", []))
    if compile == "blocks" and not blocks:
        raise ValueError(f"compile: 'blocks' compiles each block, and {type(model).__name__} has none; use 'model'")
    if compile == "step" and mode != "none":  # FSDP2 and replicate hooks (dynamo-disabled) break a whole-step graph
        raise ValueError(f"compile: 'step' runs on one process (parallel none), not parallel {mode}; use 'model'")
    if activation_checkpointing:
        for block in blocks:
            block.forward = _checkpointed(block.forward)
    # Under FSDP2 'model' compiles each block too, as torchtitan does: each sharded block's FSDP hooks are
    # dynamo-disabled, so a whole-network graph breaks at every block (measured on CPU with gloo: fullgraph=True
    # fails there; without it the root's block loop falls back to eager). A root without blocks compiles whole.
    per_block = compile == "blocks" or (compile == "model" and mode == "fsdp" and blocks)
    # cuda_graphs: cudagraph trees record each compiled call once per shape and replay it, with no per-kernel launch
    # cost on the host. Only the network is captured: the step's random draws (host-seeded generators) and the
    # optimizer and EMA updates run outside the graphs. dynamic=False: a step's calls have fixed shapes, one graph
    # each, reused every step.
    options = dict(backend=compile_backend(), dynamic=False, fullgraph=True)
    if cuda_graphs:
        options["mode"] = "reduce-overhead"
    if per_block:
        for block in blocks:
            block.compile(**options)
    elif compile == "model":  # the forward, not the module's call: replicate's hooks (dynamo-disabled) stay outside
        model.forward = torch.compile(model.forward, **options)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # cast_forward_inputs=False: x, t and s reach the network in fp32. With the default (True) t and s would be
        # rounded to bf16, whose spacing near 0.7 is 0.004: t and l would collapse to one value (docs/precision.md).
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        reshard = resolve_reshard_after_forward(reshard_after_forward, dist.get_world_size())
        for block in blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    elif mode == "ddp":
        from torch.distributed._composable import replicate

        # A compiled network runs its backward as one autograd node: DDP's all-reduce starts after it, without overlap
        # (DDP is the choice for small models; FSDP2 for large ones).
        replicate(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


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


_host_group: Optional[tuple[object, object]] = None  # (the default group it was made for, a gloo group)


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Collective: each flag OR-ed over all ranks (unchanged on one process).

    Reduced as CPU tensors over gloo (a gloo group beside NCCL, made at the first call), so it never waits for the
    device: its cost is one small host-to-host round trip (tens of microseconds on one node, about a millisecond
    across nodes) plus the wait for the slowest rank's host to reach it."""
    if not (dist.is_available() and dist.is_initialized()):
        return tuple(bool(f) for f in flags)
    values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=host_group())
    return tuple(bool(v) for v in values.tolist())


def host_group() -> object:
    """Collective at its first call: a gloo group of all ranks (the default group itself when that is gloo), for
    collectives of CPU tensors and objects that should not touch the device."""
    global _host_group
    world = dist.group.WORLD
    if _host_group is None or _host_group[0] is not world:  # a new process group (tests make several)
        _host_group = (world, world if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))
    return _host_group[1]


def from_main(value: object) -> object:
    """Collective: rank 0's `value` on every rank (unchanged on one process); a small picklable object of our own
    (never user data), sent over the host group."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]
