"""Fault injection, for the tests of failure handling: ``ENSEMBLE_FAULT`` names faults as
comma-separated ``kind:member:step[:rank]`` (rank: the launch rank; default every rank; member
-1 is the distilled student):

- ``raise``: the member raises a RuntimeError after that optimizer step;
- ``nan``: the member's loss at that step becomes NaN (a divergence, as far as training can tell);
- ``kill``: the process SIGKILLs itself after that step, before any checkpoint of that step;
- ``kill-checkpoint``: SIGKILL while the checkpoint of that step is half written (its files are
  written, it is not yet renamed into place);
- ``kill-save``: SIGKILL while the finished member is being written (``step`` is ignored: use 0).

The kills are real: nothing is cleaned up, exactly as when a scheduler or the OOM killer strikes.
"""

from __future__ import annotations

import os
import signal

KINDS = ("raise", "nan", "kill", "kill-checkpoint", "kill-save")


def _faults() -> list[tuple[str, int, int, int | None]]:
    spec = os.environ.get("ENSEMBLE_FAULT", "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in KINDS:
            raise ValueError(
                f"ENSEMBLE_FAULT item {item!r} is not kind:member:step[:rank] with kind in {KINDS}"
            )
        out.append((parts[0], int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else None))
    return out


def armed(kind: str, member: int, step: int) -> bool:
    """Whether fault ``kind`` is set for this member, step and process."""
    if "ENSEMBLE_FAULT" not in os.environ:
        return False
    from ensemble.runtime.launch_env import launch_info

    rank = launch_info().rank  # the launch rank (RANK is rewritten inside member groups)
    return any(
        k == kind and m == member and (s == step or kind == "kill-save") and (r is None or r == rank)
        for k, m, s, r in _faults()
    )


def inject(kind: str, member: int, step: int) -> None:
    """Carry out fault ``kind`` if it is armed here (``nan`` is applied by the caller)."""
    if not armed(kind, member, step):
        return
    if kind == "raise":
        raise RuntimeError(f"injected failure in member-{member} at step {step} (ENSEMBLE_FAULT)")
    if kind.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
