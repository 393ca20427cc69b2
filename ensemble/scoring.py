"""The evaluator's inner loop: a chunk of positions scored over the whole vocabulary by every
member and combiner, and the sums that accumulate across chunks.

The full-vocabulary work (log-softmax, mixtures, top-1/top-5, Brier, KL) is done by one function,
:func:`chunk_scores`, that turns [positions, vocab] logits into a few [positions] tensors per row;
:class:`Scorer` adds those to float64 sums kept on the device, so nothing waits on the host until
a batch ends. The function runs in one of two forms:

- eager, with the [positions, vocab] tensors in a :class:`Workspace` of buffers allocated once.
  On CPU a fresh tensor of that size is mostly page faults (glibc returns big blocks to the
  kernel on free, and the next allocation gets them zero-filled again): for a 50,257-token
  vocabulary that cost more than the arithmetic (a chunk's exp: 81 ms allocated, 22 ms into a
  buffer). On CPU, ties are resolved with `nonzero` on the few rows that have them.
- compiled (`eval.compile`, on by default on CUDA): inductor fuses each row's reductions into
  a pass or two over the logits and plans its own memory. Ties then use the branch-free exact
  rule, with no host synchronisation (also used eagerly on GPUs).
Both give the metrics defined in :mod:`metrics`; the tests check each against brute force.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .combining import COMBINERS, HEADLINE, MeanProb
from .compute import FLOAT32, FirstCallFallback
from .metrics import (
    BOOT,
    SIZE,
    SUMS,
    PositionStats,
    add_light,
    add_row,
    kl_per_position,
    light_stats,
    poisson_weights,
    position_stats,
)

# --------------------------------------------------------------------------------------------
# Buffers


class Workspace:
    """Named [positions, vocab] float32 buffers, allocated at the first chunk and reused (a
    shorter chunk uses the first rows). At most members + 4 of them are live: the members'
    log-probabilities, the mixture, one mean, and two scratch buffers."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, vocab: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != vocab:
            buf = self._buffers[name] = torch.empty((rows, vocab), dtype=torch.float32, device=self.device)
        return buf[:rows]

    def member(self, i: int, rows: int, vocab: int) -> torch.Tensor:
        """Where member ``i``'s logits of the chunk go (and then its log-probabilities)."""
        return self.get(f"member-{i}", rows, vocab)

    def hold(self, i: int, logits: torch.Tensor) -> torch.Tensor:
        """Member ``i``'s logits in its buffer (as float32), copied there unless they already are."""
        buf = self.member(i, *logits.shape)
        if buf.data_ptr() != logits.data_ptr():
            buf.copy_(logits)
        return buf


# --------------------------------------------------------------------------------------------
# One chunk


@dataclass(frozen=True)
class ScorePlan:
    """What to compute for every chunk of one evaluation (constants, for the compiler too)."""

    members: int
    temperatures: tuple[float, ...]
    combiners: tuple[str, ...]
    log_weights: tuple[float, ...] | None  # fitted, for the combiners that need them
    branch_free: bool  # the exact tie rules without host synchronisation (see metrics)


class ChunkScores(NamedTuple):
    members: list[PositionStats]
    combined: dict[str, PositionStats]  # by combiner name
    curve: dict[int, tuple[torch.Tensor, torch.Tensor]]  # k -> (correct, log p(target)) of the first k
    kl: list[torch.Tensor]  # per member: KL(p_i || mixture) at each position


def _scaled_logits(i: int, logits: torch.Tensor, temperature: float, ws: Workspace | None) -> torch.Tensor:
    """Member ``i``'s logits divided by its temperature, as float32: in its workspace buffer
    (overwritten), or a new tensor without a workspace."""
    z = ws.hold(i, logits) if ws is not None else logits.float()
    if temperature != 1.0:
        z = torch.div(z, temperature, out=z if ws is not None else None)
    return z


def _log_softmax(z: torch.Tensor, ws: Workspace | None) -> torch.Tensor:
    """log_softmax over the vocabulary, in place when ``z`` is a workspace buffer."""
    return torch.log_softmax(z, dim=-1, out=z if ws is not None else None)


def chunk_scores(
    logits: list[torch.Tensor], targets: torch.Tensor, plan: ScorePlan, ws: Workspace | None
) -> ChunkScores:
    """Every row's per-position statistics for one chunk: the members' ``logits`` [n, vocab]
    (any float dtype), ``targets`` [n]. With a workspace every [n, vocab] tensor lives in its
    buffers (the members' logits are overwritten); without, they are allocated (compiled)."""
    rows, vocab = logits[0].shape
    n = plan.members

    def buf(name: str) -> torch.Tensor | None:
        return ws.get(name, rows, vocab) if ws is not None else None

    def stats(logp: torch.Tensor) -> tuple[PositionStats, torch.Tensor]:
        return position_stats(logp, targets, plan.branch_free, buf("p"), buf("tmp"))

    others = [COMBINERS[c] for c in plan.combiners if c != HEADLINE] if n > 1 else []
    log_weights = np.array(plan.log_weights) if plan.log_weights is not None else None
    # Combiners of logits accumulate while the members' logits still exist (log-softmax then
    # overwrites them in place), each in a buffer of its own.
    of_logits = [c for c in others if c.reads == "logits"]
    logit_accs = [
        c.start(buf("mean" if k == 0 else f"mean-{k}"), log_weights) for k, c in enumerate(of_logits)
    ]
    logps = []
    for i, lg in enumerate(logits):
        z = _scaled_logits(i, lg, plan.temperatures[i], ws)
        for acc in logit_accs:
            acc.add(z)
        logps.append(_log_softmax(z, ws))
    if n == 1:
        return ChunkScores([stats(logps[0])[0]], {}, {}, [])

    mixture = MeanProb(out=buf("mixture"))
    curve = {}
    for k, lp in enumerate(logps, start=1):
        mixture.add(lp)
        if 2 <= k < n:  # the curve needs accuracy and NLL only
            curve[k] = light_stats(mixture.logprobs(out=buf("tmp")), targets)
    mix = mixture.result()  # in place: no member is added any more
    combined = {HEADLINE: stats(mix)[0]}
    members, kl = [], []
    for lp in logps:
        row, p = stats(lp)
        members.append(row)
        kl.append(kl_per_position(p, lp, mix, plan.branch_free, out=buf("tmp")))
    for c, acc in zip(of_logits, logit_accs, strict=True):
        combined[c.name] = stats(acc.result())[0]
    for c in others:
        if c.reads == "logprobs" and not (c.fitted and log_weights is None):
            acc = c.start(buf("mean"), log_weights)  # one at a time: they share a buffer
            for lp in logps:
                acc.add(lp, tmp=buf("tmp"))
            combined[c.name] = stats(acc.result())[0]
    return ChunkScores(members, combined, curve, kl)


# --------------------------------------------------------------------------------------------
# Sums over chunks


class Scorer:
    """All sums of one evaluation: per-row metric sums, diversity (on the device), bootstrap
    replicates (on the host, folded in once per batch).

    ``compile``: the `eval.compile` setting already resolved for this platform (True, False, or
    "auto" to fall back to eager if compiling the chunk function fails). ``branch_free``: which
    form of the tie rules (see metrics); by default branch-free where host synchronisations cost
    (GPUs) or cannot be compiled."""

    def __init__(
        self,
        member_names: list[str],
        combiners: list[str],
        temperatures: np.ndarray,
        weights: np.ndarray | None,
        bootstrap_samples: int,
        bootstrap_seed: int,
        device: torch.device | str = "cpu",
        compile: bool | str = False,
        precision: str = FLOAT32,
        branch_free: bool | None = None,
    ):
        n = len(member_names)
        self.member_names, self.combiners = list(member_names), list(combiners)
        self.temperatures, self.weights = temperatures, weights
        self.bootstrap_samples, self.bootstrap_seed = bootstrap_samples, bootstrap_seed
        self.device = torch.device(device)
        self.precision = precision  # of the members' forward passes, for the results
        prefix_rows = [f"first-{k}" for k in range(2, n)]  # k = 1 and k = N are rows already
        self.rows = list(self.member_names) + (list(self.combiners) + prefix_rows if n > 1 else [])
        self.index = {name: r for r, name in enumerate(self.rows)}
        self.pairs = list(itertools.combinations(range(n), 2))
        self._sums = torch.zeros((len(self.rows), SIZE), dtype=torch.float64, device=self.device)
        self._kl = torch.zeros(1, dtype=torch.float64, device=self.device)  # sum_t mean_i KL(p_i || mix)
        self._disagree = torch.zeros(len(self.pairs), dtype=torch.float64, device=self.device)
        self.boot_tokens = np.zeros(self.bootstrap_samples)
        self.boot = np.zeros((self.bootstrap_samples, len(self.rows), BOOT.size))  # see metrics.BOOT
        self._block: torch.Tensor | None = None  # [blocks of the batch, rows, BOOT.size]
        self._block_tokens: torch.Tensor | None = None  # [blocks of the batch]
        compiled = bool(compile)
        self.plan = ScorePlan(
            members=n,
            temperatures=tuple(float(t) for t in temperatures),
            combiners=tuple(self.combiners),
            log_weights=tuple(float(w) for w in np.log(weights)) if weights is not None else None,
            branch_free=(compiled or self.device.type != "cpu") if branch_free is None else branch_free,
        )
        self._workspace = None if compiled else Workspace(self.device)
        self._chunk_scores = (
            FirstCallFallback(chunk_scores, compile, "eval.compile", dynamic=None)
            if compiled
            else chunk_scores
        )

    @property
    def compiled(self) -> bool:
        """Whether chunks are scored by compiled code (False after a fallback to eager)."""
        return isinstance(self._chunk_scores, FirstCallFallback) and self._chunk_scores.compiled is not None

    @property
    def sums(self) -> np.ndarray:
        """[rows, metrics.SIZE] sums, addressed by metrics.SUMS."""
        return self._sums.cpu().numpy()

    @property
    def kl(self) -> np.ndarray:
        return self._kl.cpu().numpy()

    @property
    def disagree(self) -> np.ndarray:
        return self._disagree.cpu().numpy()

    def workspace(self, member: int, rows: int, vocab: int) -> torch.Tensor | None:
        """The buffer that member ``member``'s logits for a chunk of ``rows`` positions should
        be written to, or None when chunks are compiled (the compiler plans memory)."""
        return self._workspace.member(member, rows, vocab) if self._workspace is not None else None

    @property
    def tokens(self) -> int:
        """Positions scored (every row scores the same ones)."""
        return int(self.sums[0, SUMS.tokens])

    def begin_batch(self, n_blocks: int, device: torch.device | str) -> None:
        self._block = torch.zeros((n_blocks, len(self.rows), BOOT.size), dtype=torch.float64, device=device)
        self._block_tokens = torch.zeros(n_blocks, dtype=torch.float64, device=device)

    def _add(self, name: str, stats: PositionStats, block_of: torch.Tensor) -> None:
        r = self.index[name]
        self._block[:, r].index_add_(0, block_of, add_row(self._sums[r], stats))

    def score(self, logits: list[torch.Tensor], targets: torch.Tensor, block_of: torch.Tensor) -> None:
        """Add a chunk: every member's ``logits`` [n, vocab], the ``targets`` [n] and the
        batch-local block of each position [n]."""
        n = len(logits)
        self._block_tokens.index_add_(0, block_of, torch.ones_like(targets, dtype=torch.float64))
        out = self._chunk_scores(logits, targets, self.plan, self._workspace)
        for name, stats in zip(self.member_names, out.members, strict=True):
            self._add(name, stats, block_of)
        for name, stats in out.combined.items():
            self._add(name, stats, block_of)
        for k, (correct, target_logp) in out.curve.items():
            r = self.index[f"first-{k}"]
            self._block[:, r].index_add_(0, block_of, add_light(self._sums[r], correct, target_logp))
        for per_position in out.kl:
            self._kl += per_position.double().sum() / n
        for q, (i, j) in enumerate(self.pairs):
            self._disagree[q] += (out.members[i].pred != out.members[j].pred).sum()

    def end_batch(self, first_block: int) -> None:
        """Fold the batch's per-block sums into the bootstrap replicates (the one host
        synchronisation per batch)."""
        stats, tokens = self._block.cpu().numpy(), self._block_tokens.cpu().numpy()
        self._block = self._block_tokens = None
        if not self.bootstrap_samples:
            return
        w = poisson_weights(
            self.bootstrap_seed, np.arange(first_block, first_block + len(stats)), self.bootstrap_samples
        )
        self.boot_tokens += w @ tokens
        # 0 x inf must stay 0 (a block left out of a replicate cannot make its NLL infinite)
        with np.errstate(invalid="ignore"):  # the 0 x inf products are discarded by the where
            weighted = np.where(w[:, :, None, None] > 0, w[:, :, None, None] * stats[None], 0.0)
        self.boot += weighted.sum(axis=1)

    def pack(self) -> np.ndarray:
        return np.concatenate(
            [self.sums.ravel(), self.kl, self.disagree, self.boot_tokens, self.boot.ravel()]
        )

    def unpack(self, flat: np.ndarray) -> None:
        sizes = [self._sums.numel(), 1, self._disagree.numel(), self.boot_tokens.size, self.boot.size]
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        for tensor, part in zip((self._sums, self._kl, self._disagree), parts[:3], strict=True):
            tensor.copy_(torch.from_numpy(part.reshape(tensor.shape)))
        self.boot_tokens = parts[3]
        self.boot = parts[4].reshape(self.boot.shape)


def log_probs_of_targets(
    logits: list[torch.Tensor], targets: torch.Tensor, temperatures: np.ndarray, ws: Workspace | None
) -> torch.Tensor:
    """[n, members] log p_i(target) (float64), for fitting mixture weights; the members' logits
    are overwritten when they sit in ``ws``."""
    out = []
    for i, (lg, t) in enumerate(zip(logits, temperatures, strict=True)):
        lp = _log_softmax(_scaled_logits(i, lg, float(t), ws), ws)
        out.append(lp.gather(1, targets[:, None]).squeeze(1))
    return torch.stack(out, 1).double()
