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
Both give the metrics defined in :mod:`ensemble.core.metrics`; the tests check each against brute force.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ensemble.core.combining import COMBINERS, HEADLINE, MeanProb
from ensemble.core.metrics import (
    BOOT,
    SIZE,
    SUMS,
    LightStats,
    PositionStats,
    add_light,
    add_row,
    kl_per_position,
    light_stats,
    poisson_weights,
    position_stats,
    weighted_sum,
)
from ensemble.core.uncertainty import Uncertainty
from ensemble.evaluate.selective import BINS, SCORES, bin_of
from ensemble.runtime.compute import FirstCallFallback

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
    uncertainty: bool = True  # entropies, the decomposition and the pairwise KL (eval.uncertainty)


class ChunkScores(NamedTuple):
    members: list[PositionStats]
    combined: dict[str, PositionStats]  # by combiner name
    curve: dict[int, LightStats]  # k -> the mixture of the first k
    kl: list[torch.Tensor]  # per member: KL(p_i || mixture) at each position
    uncertainty: Uncertainty | None  # with plan.uncertainty and two members or more


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

    def stats(logp: torch.Tensor, with_entropy: bool = False) -> tuple[PositionStats, torch.Tensor]:
        return position_stats(logp, targets, plan.branch_free, buf("p"), buf("tmp"), with_entropy)

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
        return ChunkScores([stats(logps[0], plan.uncertainty)[0]], {}, {}, [], None)

    mixture = MeanProb(out=buf("mixture"))
    curve = {}
    for k, lp in enumerate(logps, start=1):
        mixture.add(lp)
        if 2 <= k < n:  # the curve needs accuracy, NLL and entropy only
            curve[k] = light_stats(
                mixture.logprobs(out=buf("tmp")), targets, plan.branch_free, plan.uncertainty, buf("p")
            )
    mix = mixture.result()  # in place: no member is added any more
    headline, p_mix = stats(mix, plan.uncertainty)
    combined = {HEADLINE: headline}
    # sum_j sum_v m(v) log p_j(v), m the mixture, while its probabilities are in their buffer:
    # the pairwise KL's cross term (see _decompose)
    cross = (
        sum(weighted_sum(p_mix, lp, plan.branch_free, out=buf("tmp")) for lp in logps)
        if plan.uncertainty
        else None
    )
    members, kl = [], []
    for lp in logps:
        row, p = stats(lp, plan.uncertainty)
        members.append(row)
        kl.append(kl_per_position(p, lp, mix, plan.branch_free, out=buf("tmp")))
    uncertainty = _decompose(headline, members, cross) if cross is not None else None
    for c, acc in zip(of_logits, logit_accs, strict=True):
        combined[c.name] = stats(acc.result())[0]
    for c in others:
        if c.reads == "logprobs" and not (c.fitted and log_weights is None):
            acc = c.start(buf("mean"), log_weights)  # one at a time: they share a buffer
            for lp in logps:
                acc.add(lp, tmp=buf("tmp"))
            combined[c.name] = stats(acc.result())[0]
    return ChunkScores(members, combined, curve, kl, uncertainty)


def _decompose(mixture: PositionStats, members: list[PositionStats], cross: torch.Tensor) -> Uncertainty:
    """total, aleatoric, epistemic and the mean pairwise KL from the entropies.

    Over the N(N-1) ordered pairs, sum_{i,j} KL(p_i || p_j) = -N sum_i H_i - N sum_v m sum_j log p_j
    (m the mixture), so the mean is (-sum_i H_i - cross) / (N - 1): N passes over the vocabulary
    instead of N(N-1). It is +inf where a member gives 0 to a token another member predicts."""
    n = len(members)
    entropies = torch.stack([m.entropy for m in members])
    aleatoric = entropies.mean(0)
    total = mixture.entropy
    pairwise = ((-entropies.sum(0) - cross) / (n - 1)).clamp_min(0.0)
    return Uncertainty(total, aleatoric, (total - aleatoric).clamp_min(0.0), pairwise)


# --------------------------------------------------------------------------------------------
# Sums over chunks


class Fitted(NamedTuple):
    """What the evaluation fits on the validation split: one temperature per member (ones when
    none is fitted) and the mixture weights (None unless a fitted combiner is evaluated)."""

    temperatures: np.ndarray
    weights: np.ndarray | None

    @classmethod
    def none(cls, members: int) -> Fitted:
        return cls(np.ones(members), None)


class BootstrapPlan(NamedTuple):
    samples: int
    """Poisson-bootstrap replicates (0: no intervals)."""
    seed: int


NO_BOOTSTRAP = BootstrapPlan(0, 0)


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
        fitted: Fitted,
        bootstrap: BootstrapPlan = NO_BOOTSTRAP,
        device: torch.device | str = "cpu",
        compile: bool | str = False,
        branch_free: bool | None = None,
        uncertainty: bool = True,
    ):
        n = len(member_names)
        self.member_names, self.combiners = list(member_names), list(combiners)
        temperatures, weights = self.temperatures, self.weights = fitted.temperatures, fitted.weights
        self.bootstrap_samples, self.bootstrap_seed = bootstrap
        self.device = torch.device(device)
        prefix_rows = [f"first-{k}" for k in range(2, n)]  # k = 1 and k = N are rows already
        self.rows = list(self.member_names) + (list(self.combiners) + prefix_rows if n > 1 else [])
        self.index = {name: r for r, name in enumerate(self.rows)}
        self.pairs = list(itertools.combinations(range(n), 2))
        self._sums = torch.zeros((len(self.rows), SIZE), dtype=torch.float64, device=self.device)
        self._kl = torch.zeros(1, dtype=torch.float64, device=self.device)  # sum_t mean_i KL(p_i || mix)
        self._disagree = torch.zeros(len(self.pairs), dtype=torch.float64, device=self.device)
        # the uncertainty decomposition's sums, and selective prediction's histograms, for the
        # members and the ensemble (the headline combination)
        self._decomposition = torch.zeros(len(Uncertainty._fields), dtype=torch.float64, device=self.device)
        self.selective_rows = list(self.member_names) + ([HEADLINE] if n > 1 else [])
        self._selective = torch.zeros(
            (len(self.selective_rows), len(SCORES), 2, BINS) if uncertainty else (0,),
            dtype=torch.float64,
            device=self.device,
        )
        self._block_epistemic: torch.Tensor | None = None  # [blocks of the batch]
        # per-block sums of the whole split, kept only for out-of-domain detection (keep_blocks)
        self.blocks: np.ndarray | None = None  # [blocks, selective rows, BOOT.size]
        self.blocks_tokens: np.ndarray | None = None
        self.blocks_epistemic: np.ndarray | None = None
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
            uncertainty=uncertainty,
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

    @property
    def decomposition(self) -> dict[str, float]:
        """Sums over positions of the ensemble's total, aleatoric and epistemic uncertainty and
        of the mean pairwise KL (zeros with one member or without eval.uncertainty)."""
        return dict(zip(Uncertainty._fields, self._decomposition.cpu().tolist(), strict=True))

    @property
    def ensemble_row(self) -> str | None:
        """The row that is the ensemble for the uncertainty (the headline mixture; None with one
        member): the only one with ensemble-only scores."""
        return HEADLINE if HEADLINE in self.selective_rows else None

    @property
    def selective(self) -> np.ndarray:
        """[selective rows, scores, (positions, top-1 hits), bins]: see :mod:`ensemble.evaluate.selective`."""
        return self._selective.cpu().numpy()

    def keep_blocks(self, n_blocks: int) -> None:
        """Keep every block's sums (for the out-of-domain block scores): a few numbers per block
        and row, never per token."""
        self.blocks = np.zeros((n_blocks, len(self.selective_rows), BOOT.size))
        self.blocks_tokens = np.zeros(n_blocks)
        self.blocks_epistemic = np.zeros(n_blocks)

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
        self._block_epistemic = torch.zeros(n_blocks, dtype=torch.float64, device=device)

    def _add(self, name: str, stats: PositionStats, block_of: torch.Tensor) -> None:
        r = self.index[name]
        self._block[:, r].index_add_(0, block_of, add_row(self._sums[r], stats))

    def score(self, logits: list[torch.Tensor], targets: torch.Tensor, block_of: torch.Tensor) -> ChunkScores:
        """Add a chunk: every member's ``logits`` [n, vocab], the ``targets`` [n] and the
        batch-local block of each position [n]. Returns the chunk's per-position values."""
        n, vocab = len(logits), logits[0].shape[1]
        self._block_tokens.index_add_(0, block_of, torch.ones_like(targets, dtype=torch.float64))
        out = self._chunk_scores(logits, targets, self.plan, self._workspace)
        for name, stats in zip(self.member_names, out.members, strict=True):
            self._add(name, stats, block_of)
        for name, stats in out.combined.items():
            self._add(name, stats, block_of)
        for k, light in out.curve.items():
            r = self.index[f"first-{k}"]
            self._block[:, r].index_add_(0, block_of, add_light(self._sums[r], light))
        for per_position in out.kl:
            self._kl += per_position.double().sum() / n
        for q, (i, j) in enumerate(self.pairs):
            self._disagree[q] += (out.members[i].pred != out.members[j].pred).sum()
        if self.plan.uncertainty:
            self._add_uncertainty(out, block_of, vocab)
        return out

    def _add_uncertainty(self, out: ChunkScores, block_of: torch.Tensor, vocab: int) -> None:
        u = out.uncertainty
        if u is not None:
            for f, values in enumerate(u):
                self._decomposition[f] += values.double().sum()
            self._block_epistemic.index_add_(0, block_of, u.epistemic.double())
        rows = out.members + ([out.combined[HEADLINE]] if u is not None else [])
        for r, stats in enumerate(rows):
            is_ensemble = self.selective_rows[r] == self.ensemble_row
            correct = stats.correct.double()
            for s, score in enumerate(SCORES.values()):
                if score.ensemble_only and not is_ensemble:
                    continue
                bins = bin_of(score.of(stats, u), score.upper(vocab, self.plan.members))
                self._selective[r, s, 0].index_add_(0, bins, torch.ones_like(correct))
                self._selective[r, s, 1].index_add_(0, bins, correct)

    def end_batch(self, first_block: int) -> None:
        """Fold the batch's per-block sums into the bootstrap replicates (the one host
        synchronisation per batch)."""
        stats, tokens = self._block.cpu().numpy(), self._block_tokens.cpu().numpy()
        if self.blocks is not None:
            mine = slice(first_block, first_block + len(stats))
            self.blocks[mine] = stats[:, [self.index[r] for r in self.selective_rows]]
            self.blocks_tokens[mine] = tokens
            self.blocks_epistemic[mine] = self._block_epistemic.cpu().numpy()
        self._block = self._block_tokens = self._block_epistemic = None
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

    def _state(self) -> tuple[list[torch.Tensor], list[str]]:
        """What the all-reduce adds up: the sums on the device, then the arrays on the host
        (by attribute name; the per-block ones only when kept)."""
        host = ["boot_tokens", "boot"] + (
            ["blocks", "blocks_tokens", "blocks_epistemic"] if self.blocks is not None else []
        )
        return [self._sums, self._kl, self._disagree, self._decomposition, self._selective], host

    def pack(self) -> np.ndarray:
        device, host = self._state()
        return np.concatenate(
            [t.cpu().numpy().ravel() for t in device] + [getattr(self, name).ravel() for name in host]
        )

    def unpack(self, flat: np.ndarray) -> None:
        device, host = self._state()
        sizes = [t.numel() for t in device] + [getattr(self, name).size for name in host]
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        for tensor, part in zip(device, parts, strict=False):
            tensor.copy_(torch.from_numpy(part.reshape(tensor.shape)))
        for name, part in zip(host, parts[len(device) :], strict=True):
            setattr(self, name, part.reshape(getattr(self, name).shape))


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
