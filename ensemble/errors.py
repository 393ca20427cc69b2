"""The one exception type for mistakes a user can fix.

Entry points print these as a single line (``error: ...``) and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class EnsembleError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for a one-line error), or its type's name when
    the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def did_you_mean(name: str, options: Iterable[object]) -> str:
    """ " (did you mean X?)" for the option closest to a misspelt ``name``, or nothing."""
    import difflib

    close = difflib.get_close_matches(name, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless n is 1: "1 token", "3 tokens"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


class ConfigError(EnsembleError):
    """The configuration is invalid (unknown key, wrong type, impossible value)."""


PREEMPTED_EXIT = 75
"""Exit status after a stop signal (SIGTERM, SIGUSR1) was honoured: a checkpoint of every member
in training was saved and the job can be requeued (75 is sysexits' EX_TEMPFAIL, "try again")."""


class Preempted(Exception):
    """Training stopped on request (a signal) after saving checkpoints; not an error."""
