"""Stop gracefully on request: save a checkpoint at the next step boundary, then exit with EXIT_STOPPED.

SLURM sends SIGTERM before a time limit or a preemption (docs/cluster.md: the sbatch script asks for it 120 s ahead),
a user presses Ctrl-C (SIGINT), or sends SIGUSR1 by hand (`scancel --signal=USR1`). Each only sets a flag; the loop
reads it at step boundaries, where all ranks agree (one rank may be the only one signalled) and save the same step.
A second SIGINT at least SIGINT_REPEAT_S after the first aborts at once (KeyboardInterrupt): a person pressing Ctrl-C
twice. A second SIGINT sooner is the same keypress arriving twice (from the terminal and forwarded by torchrun's
agent) and is ignored; repeated SIGTERMs and SIGUSR1s are ignored too.

Agreement cost: `GracefulStop.at_step` OR-s the flags over ranks with `parallel.any_rank`: CPU tensors on a gloo group,
so it never waits for the device (a step queues its work without a host read; train.py's docstring). What it costs is
a host round trip (tens of microseconds on one node, about a millisecond across nodes) plus waiting for the slowest
rank's host. Beside a step of 0.1-1 s that is negligible, but a host-bound run (small model, CUDA graphs, steps of
~10 ms) would feel it, so under torchrun it runs every CHECK_EVERY = 10 steps: at most 10 steps of delay before the
save, far inside SLURM's warning time. On one process there is nothing to agree on and it checks every step.

An optional SaveTimer adds time-based saves (a run never loses more than `minutes` of work, whatever the step time);
its decision is agreed in the same all-reduce.

Exit code EXIT_STOPPED = 143 means "checkpoint saved, stopped on request: resume me". It is what a shell reports for
a process ended by SIGTERM, so wrappers that requeue a job killed by SIGTERM (and Kubernetes, which reads 143 as a
graceful termination) treat it alike; it differs from 0 (finished), 1 (crashed) and 2 (a user error, soflow-fast's
one-line errors): the two a requeue must not repeat. Under torchrun the agent's own exit status is 1 whenever it was
signalled, whatever the workers returned; the sbatch script (docs/slurm/train.sbatch) decides from the signal it
forwarded instead.

Call site: Trainer.fit (train.py; the handlers must be installed from the main thread). After each step it calls
`at_step`; on `save` it saves (before that step's evaluation), on `stop` it returns True, and the CLI's `train`
exits with EXIT_STOPPED.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch.distributed as dist

from .parallel import any_rank

EXIT_STOPPED = 143
CHECK_EVERY = 10
SIGINT_REPEAT_S = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class SaveTimer:
    """Due once `minutes` have passed since it was made or last restarted; never due when minutes <= 0."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock = minutes * 60.0, clock
        self.restart()

    def restart(self) -> None:
        self.since = self.clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.since >= self.seconds


@dataclass(frozen=True)
class Boundary:
    """What a step boundary asks of the trainer: save a checkpoint now, and then stop."""

    save: bool
    stop: bool


class GracefulStop:
    """Context manager: SIGTERM / SIGINT / SIGUSR1 set a flag while inside (the previous handlers come back on exit).

    check_every: agree every this many steps under torchrun (one process: every step). save_minutes: > 0 adds a
    save whenever that long has passed since the last timed save."""

    def __init__(self, check_every: int = CHECK_EVERY, save_minutes: float = 0.0):
        if check_every < 1:
            raise ValueError(f"check_every = {check_every}; expected a positive number of steps")
        self.check_every = check_every
        self.timer = SaveTimer(save_minutes)
        self.received: Optional[str] = None  # the first stop signal this process got
        self._sigint_at: Optional[float] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._sigint_at is not None and now - self._sigint_at >= SIGINT_REPEAT_S:
                self.__exit__()
                raise KeyboardInterrupt
            self._sigint_at = self._sigint_at if self._sigint_at is not None else now
        if self.received is None:
            self.received = signal.Signals(signum).name

    def at_step(self, step: int) -> Boundary:
        """Call once after each finished step, on every rank. A collective on check steps under torchrun (step a
        multiple of check_every); the same answer on every rank."""
        if step % self.check_every and dist.is_available() and dist.is_initialized():
            return Boundary(False, False)
        stop, timed = any_rank(self.received is not None, self.timer.due())
        if timed:
            self.timer.restart()
        return Boundary(save=stop or timed, stop=stop)
