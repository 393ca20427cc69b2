"""What a training stage hands to the evaluation that follows it in the same processes.

`launch/train.py` and `launch/distill.py` evaluate right after training, in the same world and
with the data already tokenized. The stages do not import each other: the command line passes
the evaluation in as an :data:`AfterTraining` callback, and the training stage calls it with a
:class:`Trained` record.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble.config.schema import ExperimentConfig
from ensemble.core.data import PreparedData


@dataclass(frozen=True)
class Trained:
    cfg: ExperimentConfig
    """The config the stage ran with (its data, eval and output sections)."""
    members: list[Path]
    """The finished member directories, in member order."""
    data: PreparedData
    """The data the training stage prepared (the evaluation reuses its test split)."""
    main_first: Callable[[str], AbstractContextManager[None]]
    """The stage's world's "rank 0 first" block (for caches the evaluation fills)."""
    student: Path | None = None
    """A distilled student to evaluate beside the members."""


AfterTraining = Callable[[Trained], dict[str, Any] | None]
