"""What an evaluation's sections read: :class:`EvalOutputs` (what the user asked for beyond
the metrics) and :class:`Evaluation` (the members, the data, the sharding and the scored sums)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble.config.schema import DataConfig, EvalConfig
from ensemble.core.combining import HEADLINE
from ensemble.core.data import EvalBlocks, PreparedData
from ensemble.core.loading import LoadedMember
from ensemble.core.members import is_complete_member
from ensemble.core.metrics import BOOT, BOOTSTRAPPED, SUMS, percentile_interval, row_result
from ensemble.errors import EnsembleError
from ensemble.evaluate.scoring import Scorer
from ensemble.evaluate.token_export import HTML_TOKENS, TokenWriter
from ensemble.runtime.sharding import Sharding


@dataclass(frozen=True)
class EvalOutputs:
    """What an evaluation adds on request (`launch/evaluate.py` options); none by default."""

    ood: tuple[Path, ...] = ()
    """Text files to tell apart from the evaluated split (out-of-domain detection, see ensemble/evaluate/ood.py)."""
    tokens_out: Path | None = None
    """The per-token Parquet export (see ensemble/evaluate/token_export.py)."""
    html: Path | None = None
    """The HTML view of the first ``html_tokens`` tokens, shaded by epistemic uncertainty."""
    html_tokens: int = HTML_TOKENS
    student: Path | None = None
    """A distilled student (launch/distill.py) evaluated beside the members: the `student` row."""
    save_soup: Path | None = None
    """Where to save the members' weight soup in Hugging Face format (see ensemble/core/soup.py)."""

    def __post_init__(self) -> None:
        if self.student is not None and not is_complete_member(Path(self.student)):
            raise EnsembleError(
                f"--student {self.student} is not a finished student (no member.json); distil one with "
                "launch/distill.py RUN_DIR"
            )
        if self.html_tokens < 1:
            raise EnsembleError(f"--html-tokens {self.html_tokens}: show at least 1 token")
        for path in self.ood:
            if not Path(path).is_file():
                raise EnsembleError(f"--ood: file {path} not found; fix the path")

    @property
    def requested(self) -> bool:
        """Whether anything needing the per-block or per-token uncertainty was asked for."""
        return bool(self.ood or self.tokens_out or self.html)

    @property
    def tokens_path(self) -> Path | None:
        """Where the per-token rows go: --tokens-out, or with --html alone a temporary export
        the page is made from (a name every process derives alike: each writes its part next
        to it)."""
        if self.tokens_out is not None:
            return Path(self.tokens_out)
        return self.html.with_name(f".{self.html.name}.tokens.parquet") if self.html else None


@dataclass
class Evaluation:
    """One evaluation after its scoring pass: what every section of results.json is built from."""

    members: list[LoadedMember]
    scorer: Scorer
    cfg: EvalConfig
    split: str
    blocks: EvalBlocks
    data_info: dict[str, Any]
    """The split's fingerprint: its source, token count and hash."""
    sharding: Sharding
    device: torch.device = torch.device("cpu")
    outputs: EvalOutputs = field(default_factory=EvalOutputs)
    data_cfg: DataConfig | None = None
    load: Callable[[DataConfig, str], PreparedData] | None = None
    """Loads a split of a data config in every process (the out-of-domain sets)."""
    tokens: TokenWriter | None = None
    """This process's per-token writer, when an export was asked for."""

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def member_paths(self) -> list[Path]:
        return [m.path for m in self.members]

    @property
    def tokens_evaluated(self) -> int:
        return int(self.rows[HEADLINE]["tokens"])

    @cached_property
    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row's metrics; with one member every combination is that member."""
        s = self.scorer
        rows = {name: row_result(s.sums[r]) for name, r in s.index.items()}
        if self.n == 1:
            rows.update({c: rows[self.members[0].name] for c in s.combiners})
        return rows

    @cached_property
    def boot(self) -> dict[str, Any]:
        """Every row's 95% intervals (and the gains', under "gain:*"); empty without a bootstrap."""
        return bootstrap_intervals(self.scorer, self.n) if self.scorer.bootstrap_samples else {}

    def with_ci(self, name: str) -> dict[str, Any]:
        out = dict(self.rows[name])
        if name in self.boot:
            out["ci95"] = self.boot[name]
        return out

    @cached_property
    def tokens_file(self) -> Path:
        """The per-token export, its processes' parts joined into one file (done once, by
        whichever section reads it first)."""
        return self.tokens.finish(-(-len(self.blocks) // self.cfg.per_device_batch_size))

    @cached_property
    def member_entropy(self) -> dict[str, float]:
        s = self.scorer
        return {m.name: s.sums[r, SUMS.entropy] / self.tokens_evaluated for r, m in enumerate(self.members)}


def bootstrap_intervals(scorer: Scorer, n: int) -> dict[str, Any]:
    """95% intervals of accuracy and NLL for every row, and of the gains (under "gain:*")."""
    keep = scorer.boot_tokens > 0
    with np.errstate(divide="ignore", invalid="ignore"):  # [replicates, rows] per metric
        means = {
            metric: (scorer.boot[:, :, BOOT[value]] / scorer.boot_tokens[:, None])[keep]
            for metric, value in BOOTSTRAPPED.items()
        }
    out = {
        name: {metric: percentile_interval(m[:, r]) for metric, m in means.items()}
        for name, r in scorer.index.items()
    }
    if n > 1:
        acc, nll = means["accuracy"], means["nll"]
        members = list(range(n))
        point_nll = scorer.sums[members, SUMS.nll] / scorer.sums[members, SUMS.tokens]
        point_acc = scorer.sums[members, SUMS.correct] / scorer.sums[members, SUMS.tokens]
        ens = scorer.index[HEADLINE]
        best_nll, best_acc = int(np.argmin(point_nll)), int(np.argmax(point_acc))
        out["gain:best"] = {
            "nll": percentile_interval(nll[:, ens] - nll[:, best_nll]),
            "accuracy": percentile_interval(acc[:, ens] - acc[:, best_acc]),
        }
        out["gain:mean"] = {
            "nll": percentile_interval(nll[:, ens] - nll[:, members].mean(axis=1)),
            "accuracy": percentile_interval(acc[:, ens] - acc[:, members].mean(axis=1)),
        }
    return out
