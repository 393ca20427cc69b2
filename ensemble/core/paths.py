"""The names of the files and folders of a run directory::

    <output_dir>/config.yaml            the resolved config
    <output_dir>/manifest.json          members, seeds, status, data fingerprint, versions
    <output_dir>/members/member-<i>/    Hugging Face format + member.json + config.yaml
    <output_dir>/checkpoints/           the members' checkpoints while they train (or checkpoint.dir)
    <output_dir>/results.json, results.md
    <output_dir>/logs/                  TensorBoard / wandb files

Each name is spelled here once; modules ask :class:`RunPaths` (or these constants, for a
directory that is not a run's, such as a member's or an evaluation's --output) for it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ensemble.config.loading import load_config
from ensemble.errors import EnsembleError

if TYPE_CHECKING:
    from ensemble.config.schema import ExperimentConfig
    from ensemble.core.members import MemberSpec

CONFIG = "config.yaml"  # a run's resolved config, and the config a member was trained with
MANIFEST = "manifest.json"
MEMBER_INFO = "member.json"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: marks an adapter member (see core/adapters.py)
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
STUDENT = "student"  # the distilled student's name: its role, its directory in the run
MEMBER_DIR_RE = re.compile(r"^member-(\d+)$")


@dataclass(frozen=True)
class RunPaths:
    """Every file name of a run directory, in one place."""

    root: Path

    @property
    def members(self) -> Path:
        return self.root / "members"

    def member(self, spec: MemberSpec) -> Path:
        return self.members / spec.name

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def student(self) -> Path:
        """The distilled student's default directory (launch/distill.py)."""
        return self.root / STUDENT

    @property
    def run_id(self) -> Path:
        """The run's id (trackers resume by it), written once."""
        return self.root / "run_id"

    @property
    def results_json(self) -> Path:
        """The evaluation's document (see :mod:`ensemble.evaluate.report`)."""
        return self.root / RESULTS_JSON

    @property
    def results_md(self) -> Path:
        return self.root / RESULTS_MD


def check_run_dir(root: str | Path) -> Path:
    """``root`` as a Path, refused with the fix when it is not a directory (torch-free, so
    that a mistyped path is reported in a fraction of a second)."""
    root = Path(root)
    if not root.is_dir():
        raise EnsembleError(f"run directory {root} not found; pass the output.dir of a training run")
    return root


def run_config(paths: RunPaths, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The run's config.yaml with ``overrides`` applied."""
    check_run_dir(paths.root)
    if not paths.config.is_file():
        raise EnsembleError(
            f"{paths.root} has no config.yaml; pass the output.dir of a run trained with launch/train.py"
        )
    cfg = load_config(paths.config, overrides)
    # The run's directory is where it is now (it may have been moved since training).
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(paths.root)))
