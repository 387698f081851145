"""UserError: a mistake in what the user gave (a flag, a config key, a file). The CLI prints its message as one line
and exits with status 2. RunFailed: a run that cannot go on (a diverged run); one line and status 1. Any other
exception is a bug and keeps its traceback."""
from __future__ import annotations

import contextlib
from typing import Iterator


class UserError(Exception):
    """Bad user input; the message names the flag, key or file at fault."""


class RunFailed(Exception):
    """A run stopped because it cannot go on (not a bug, not bad input); the message says why and what to do."""


def one_line(e: BaseException) -> str:
    """The message on one line: a library's text embedded in it (YAML, torch.load) may span several."""
    return " ".join(str(e).split())


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Re-raise `types` as UserError around a call whose module reports bad input with built-in exception types.

    Wrap only the call that reads the user's input, so that the same types raised by a bug elsewhere keep their
    traceback."""
    try:
        yield
    except types as e:
        # str(KeyError) quotes its message; the message is the first argument
        raise UserError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
