"""An exclusive lock on a run directory, held for a trainer's whole lifetime.

Two trainers on one run directory (a requeued job overlapping a manual restart) race on checkpoint renames and write
every metric twice, so the second must stop at once and say who holds the directory. RUN_DIR/run.lock records the
holder (host, pid, start time, SLURM job), and the holder keeps an flock on that file:

- A live holder keeps the flock: a second trainer fails at once with RunLockError naming host and pid.
- A holder that died without cleaning up (kill -9, out of memory, a node crash) leaves the file but not the flock,
  which the kernel drops with the process. On the same host that proves it gone (where the filesystem has no flock,
  its pid no longer running does): the lock is taken over with a warning. On another host a free flock proves
  nothing (network filesystems differ in whether flock reaches across hosts), so the lock is taken over only from an
  earlier run of the same SLURM job (a requeue: SLURM never runs two at once); otherwise the error names that host
  and says to remove the file.

The file is created with O_CREAT | O_EXCL, atomic on local and network filesystems, so two trainers starting
together cannot both create it. A takeover rewrites the record in place while holding the flock, and only the flock
holder ever unlinks the file, so the file at the path is always the one whose flock decides.

Call site: the CLI's `train` (cli.py), before the Trainer is built, so that nothing reads or writes the run directory
unlocked; under torchrun rank 0 takes the lock and every rank learns the outcome, so all exit together. RunLockError
is a UserError: one line, exit status 2.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from .errors import UserError
from .parallel import any_rank

log = logging.getLogger("soflow_fast")

LOCK_NAME = "run.lock"


class RunLockError(UserError, RuntimeError):
    """The run directory is held by another trainer, or cannot be locked; the message says which and what to do."""


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


def _describe(holder: Optional[dict]) -> str:
    if holder is None:
        return "a trainer that left no readable record"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}{job})"


def _flock(fd: int) -> Optional[bool]:
    """Try the exclusive flock without waiting: True (got it), False (someone holds it), None (no flock here)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _read(fd: int) -> Optional[dict]:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _pid_running(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """Context manager: hold RUN_DIR/run.lock from __enter__ to __exit__ (see the module docstring).

    is_main: under torchrun, True on rank 0 only; rank 0 locks and all ranks agree on the outcome (a collective)."""

    def __init__(self, run_dir: str | os.PathLike, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.is_main = is_main
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        error = None
        if self.is_main:
            try:
                self._acquire()
            except RunLockError as e:
                error = e
        (failed,) = any_rank(error is not None)
        if failed:
            raise error or RunLockError(f"run directory {self.run_dir}: rank 0 could not lock it (see its message)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        # Unlink while still holding the flock: a trainer that opened the old file before this finds it no longer
        # at the path once it gets the flock, and starts over.
        if _same_file(self._fd, self.path):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def _acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunLockError(f"run directory {self.run_dir}: exists and is not a directory") from None
        except OSError as e:
            raise RunLockError(f"run directory {self.run_dir}: cannot be created ({e.strerror})") from None
        for _ in range(10):  # another trainer may release or create the file between our calls: look again
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:
                    continue
            except OSError as e:
                raise RunLockError(f"run directory {self.run_dir}: cannot write its lock file {self.path} "
                                   f"({e.strerror})") from None
            try:
                if self._take(fd, created):
                    self._fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise RunLockError(f"run directory {self.run_dir}: could not lock {self.path} (other trainers keep "
                           "taking and releasing it)")

    def _take(self, fd: int, created: bool) -> bool:
        """Make fd's file ours and write our record; False when it is no longer the file at the path."""
        got = _flock(fd)
        if got is False:
            raise RunLockError(self._held_message(_read(fd)))
        if not _same_file(fd, self.path):
            return False
        if not created:
            holder = _read(fd)
            why = self._stale(holder, got)
            if why is None:
                raise RunLockError(self._held_message(holder))
            log.warning("run directory %s: taking over the lock of %s: %s", self.run_dir, _describe(holder), why)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        os.fsync(fd)
        return True

    def _held_message(self, holder: Optional[dict]) -> str:
        if holder is None or holder.get("host") == socket.gethostname():
            return (f"run directory {self.run_dir} is in use by {_describe(holder)}; a second trainer would "
                    "overwrite its checkpoints and duplicate its metrics")
        return (f"run directory {self.run_dir} is locked by {_describe(holder)}, another host, whose process cannot "
                f"be checked from {socket.gethostname()}; if no trainer runs there any more, remove {self.path} and "
                "start again")

    @staticmethod
    def _stale(holder: Optional[dict], got_flock: Optional[bool]) -> Optional[str]:
        """Why the (unflocked) holder is known to be gone, or None when that cannot be known from here."""
        if holder is None:  # killed between creating the file and writing it (a creator now would hold no flock yet)
            return "its record is unreadable"
        if holder.get("host") == socket.gethostname():
            if got_flock:
                return "it no longer holds the lock (the process ended without releasing it)"
            return None if _pid_running(holder.get("pid")) else "that process is no longer running"
        job, restart = holder.get("slurm_job"), holder.get("slurm_restart", 0)
        if job and job == os.environ.get("SLURM_JOB_ID") and restart < int(os.environ.get("SLURM_RESTART_COUNT", 0)):
            return f"an earlier run (restart {restart}) of this SLURM job, which SLURM has ended"
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
