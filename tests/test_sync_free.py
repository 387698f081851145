"""A training step never waits for the device: no host read of a device value (soflow_fast/train.py).

On a CPU nothing can wait for a GPU, so the guard below fails on the host reads that would: every op that brings a
tensor's value to the host (.item(), bool(), int(), float(), .tolist(), .numpy(), a copy to the CPU; at the
dispatcher, the scalar read they end in) and every op whose output size depends on values (nonzero, masked_select,
unique), which syncs on CUDA. One exemption: the step counters that torch's non-capturable, non-fused optimizers read
(the CPU 'adamw' and 'radam'). On CUDA those counters are CPU tensors, so reading them waits for nothing; and the
trainer builds its CUDA optimizers fused or capturable (soflow_fast/optim.py), which read none.

A non-finite step must leave the weights, the optimizer state and the EMA bit for bit as they were, decided on the
device; it is counted, and reported at the next host read (a logging step or a save).
"""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from soflow_fast import optim
from soflow_fast.config import TrainConfig
from soflow_fast.metrics import NonFiniteError
from soflow_fast.train import Trainer

SMALL = dict(model_type="DiT-S/2", hidden_size=32, depth=1, num_heads=2, dataset_type="digits", data_size=8,
             batch_size=16, micro_batch_size=8, total_steps=10, cfg_scale=2.0, cfg_drop_rate=0.2, mix_ratio=0.5,
             cfg_decay_time=0.8, learning_rate=1e-3, logging_steps=100, ckpt_saving_steps=100, eval_demo_steps=0,
             ema_decay_rate=0.9, quality_report=False, device="cpu", kernels="eager", precision="fp32", seed=5,
             on_nonfinite="skip")
KINDS = [dict(optimizer="adamw"), dict(optimizer="radam", ema_every=2),
         pytest.param(dict(optimizer="fused_adamw_ema"),
                      marks=pytest.mark.skipif(optim._fused_optim is None, reason=optim.BUILD_HINT))]
READ_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
                torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
READ_OPS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
            "unique_consecutive"}


class HostRead(AssertionError):
    pass


def host_counters(optimizer) -> list:
    """The step counters a torch optimizer keeps on the host (non-capturable, non-fused groups)."""
    return [optimizer.state[p]["step"] for g in optimizer.param_groups if not g.get("capturable") and not g.get("fused")
            for p in g["params"] if "step" in optimizer.state[p]]


class _NoReadMethods(TorchFunctionMode):
    def __init__(self, exempt):
        super().__init__()
        self.exempt = exempt

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_cpu = func in (torch.Tensor.cpu, torch.Tensor.to) and args[0].device.type != "cpu" and (
            func is torch.Tensor.cpu or "cpu" in map(str, [*args[1:], *kwargs.values()]))
        if (func in READ_METHODS or to_cpu) and not self.exempt(args[0]):
            raise HostRead(f"host read: Tensor.{func.__name__}")
        return func(*args, **kwargs)


class _NoReadOps(TorchDispatchMode):
    def __init__(self, exempt):
        super().__init__()
        self.exempt = exempt

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        mask_index = name.startswith("index") and isinstance(args[1], (list, tuple)) and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])  # a nonzero inside the op
        if (name in READ_OPS or mask_index) and not self.exempt(args[0]):
            raise HostRead(f"host read: aten.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads(optimizer):
    def exempt(t) -> bool:
        return any(t is c for c in host_counters(optimizer))

    with _NoReadMethods(exempt), _NoReadOps(exempt):
        yield


def make(tmp_path, name, **kw) -> Trainer:
    return Trainer(TrainConfig.from_dict({**SMALL, **kw}), tmp_path / name)


def poisoned(batch):
    x, y = batch
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    return x, y


def state(tr: Trainer) -> list[torch.Tensor]:
    """Weights, EMA and every tensor of the optimizer state."""
    opt = [v for s in tr.optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in tr.params] + [e.clone() for e in tr.ema.tensors] + [v.clone() for v in opt]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                       y.reshape(-1).view(torch.uint8))
                                    for x, y in zip(a, b))


def skip_on_the_host(tr: Trainer) -> None:
    """All a skipped step may change: the step number, and a step count the optimizer keeps as a Python int
    (FusedAdamWEMA's lives on the host and counts the skipped step, see optimizer_step)."""
    tr.step += 1
    if isinstance(tr.optimizer, optim.FusedAdamWEMA):
        for s in tr.optimizer.state.values():
            if "step" in s:  # parameters that have had a gradient
                s["step"] += 1


def test_the_guard_catches_host_reads():
    """The guard is not vacuous: each kind of read it must catch raises."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.all()), lambda: float(x[0]), lambda: x.tolist(),
                 lambda: x.numpy(), lambda: x[x > 0], lambda: torch.equal(x, x), lambda: int(x.sum())):
        with pytest.raises(HostRead), no_host_reads(opt):
            read()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k["optimizer"])
def test_steps_issue_no_host_reads_and_a_nonfinite_step_changes_nothing(tmp_path, kind):
    tr = make(tmp_path, "run", **kind)
    batches = [tr.loader.next() for _ in range(4)]
    batches[2] = poisoned(batches[2])  # step 3: an EMA step for ema_every 1 and 2 alike
    outs = []
    with no_host_reads(tr.optimizer):
        for b in batches[:2]:
            outs.append(tr.train_step(*b))
    before = state(tr)
    with no_host_reads(tr.optimizer):
        outs.append(tr.train_step(*batches[2]))
    after_skip = state(tr)
    with no_host_reads(tr.optimizer):
        outs.append(tr.train_step(*batches[3]))

    assert same_bits(before, after_skip)  # weights, EMA and optimizer state untouched by the non-finite step
    assert not same_bits(after_skip, state(tr))  # ... and the next step moved them again
    assert [float(o["nonfinite"]) for o in outs] == [0, 0, 1, 0]
    assert tr.skipped == 0  # not read yet: the host learns of it at a logging step or save
    tr._take_nonfinite()
    assert tr.skipped == 1 and tr.step == 4

    # Exact: the same run with step 3 skipped on the host, as if it never happened
    ref = make(tmp_path, "ref", **kind)
    for i, b in enumerate(batches):
        if i == 2:
            skip_on_the_host(ref)
        else:
            ref.train_step(*b)
    assert same_bits(state(ref), state(tr))


def test_stop_raises_at_the_logging_step_with_the_bad_update_skipped(tmp_path):
    tr = make(tmp_path, "run", on_nonfinite="stop", logging_steps=3)
    real, calls = tr.loader.next, []

    def loader_next():
        calls.append(1)
        return poisoned(real()) if len(calls) == 2 else real()

    tr.loader.next = loader_next
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss \(nan\); the weights were not updated"):
        tr.fit(progress=False)
    assert tr.step == 3 and tr.skipped == 1  # found at the logging step after it
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    ref = make(tmp_path, "ref")
    for i in range(3):
        batch = ref.loader.next()
        if i == 1:
            skip_on_the_host(ref)
        else:
            ref.train_step(*batch)
    assert same_bits(state(ref), state(tr))
