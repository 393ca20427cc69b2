"""Out-of-domain detection: does the ensemble's uncertainty tell text unlike its data apart?

Every block of text gets a score per row (each member, and the ensemble), higher meaning "more
out-of-domain"; each is registered once, in :data:`BLOCK_SCORES`:
- ``mean_entropy``: the mean entropy of the row's next-token distributions over the block;
- ``mean_mutual_information``: the ensemble's mean epistemic uncertainty (the ensemble only);
- ``mean_nll``: the mean negative log-likelihood of the block's tokens.

The blocks of the evaluated split are the negatives, the blocks of each ``--ood`` file the
positives. For every score and row: the AUROC (the probability that an out-of-domain block scores
above an in-domain one, ties counting half: 0.5 is chance) and the FPR at 95% TPR (the share of
in-domain blocks flagged when the threshold flags 95% of the out-of-domain ones).

The per-block sums come from the evaluator's single pass (`Scorer.keep_blocks`): a few numbers
per block, never per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ensemble.core.metrics import BOOT

TPR = 0.95
HISTOGRAM_BINS = 30


@dataclass(frozen=True)
class BlockScore:
    name: str
    label: str
    of: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    """(the row's per-block sums [blocks, BOOT.size], the ensemble's epistemic sums [blocks],
    predicted positions [blocks]) -> the score of each block."""
    ensemble_only: bool = False


BLOCK_SCORES: dict[str, BlockScore] = {}


def register_block_score(score: BlockScore) -> BlockScore:
    BLOCK_SCORES[score.name] = score
    return score


register_block_score(
    BlockScore("mean_entropy", "mean entropy", lambda row, mi, tokens: row[:, BOOT.entropy] / tokens)
)
register_block_score(
    BlockScore(
        "mean_mutual_information",
        "mean mutual information",
        lambda row, mi, tokens: mi / tokens,
        ensemble_only=True,
    )
)
register_block_score(BlockScore("mean_nll", "mean NLL", lambda row, mi, tokens: row[:, BOOT.nll] / tokens))


def block_scores(
    blocks: np.ndarray, tokens: np.ndarray, epistemic: np.ndarray, rows: list[str], ensemble_row: str | None
) -> dict[str, dict[str, np.ndarray]]:
    """Every row's block scores, from a scorer's kept block sums ([blocks, rows, BOOT.size] in
    ``rows`` order, the members first); blocks without a predicted position are left out."""
    keep = tokens > 0
    blocks, tokens, epistemic = blocks[keep], tokens[keep], epistemic[keep]
    out: dict[str, dict[str, np.ndarray]] = {}
    for r, row in enumerate(rows):
        out[row] = {
            name: score.of(blocks[:, r], epistemic, tokens)
            for name, score in BLOCK_SCORES.items()
            if not score.ensemble_only or row == ensemble_row
        }
    return out


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(positive > negative) + P(equal) / 2, by the Mann-Whitney U statistic (average ranks)."""
    if not len(negatives) or not len(positives):
        return math.nan
    values = np.concatenate([negatives, positives])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # the average rank (1-based) of each distinct value, ties sharing it
    upper = np.cumsum(counts)
    average = upper - (counts - 1) / 2.0
    ranks = average[inverse]
    n_neg, n_pos = len(negatives), len(positives)
    u = ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_neg * n_pos))


def fpr_at_tpr(negatives: np.ndarray, positives: np.ndarray, tpr: float = TPR) -> float:
    """The share of negatives at or above the highest threshold that keeps at least ``tpr`` of
    the positives at or above it."""
    if not len(negatives) or not len(positives):
        return math.nan
    ordered = np.sort(positives)[::-1]
    threshold = ordered[max(math.ceil(tpr * len(positives)) - 1, 0)]
    return float(np.mean(negatives >= threshold))


def detection(
    in_domain: dict[str, dict[str, np.ndarray]], out_domain: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """AUROC and FPR at 95% TPR for every row and score, with the histograms the plot draws."""
    out: dict[str, Any] = {}
    for row, scores in in_domain.items():
        out[row] = {}
        for name, negatives in scores.items():
            positives = out_domain[row][name]
            finite = np.concatenate([negatives, positives])
            finite = finite[np.isfinite(finite)]
            edges = np.histogram_bin_edges(finite if len(finite) else [0.0, 1.0], bins=HISTOGRAM_BINS)
            out[row][name] = {
                "auroc": auroc(negatives, positives),
                "fpr_at_95_tpr": fpr_at_tpr(negatives, positives),
                "in_domain_mean": float(np.mean(negatives)),
                "out_of_domain_mean": float(np.mean(positives)),
                "histogram": {
                    "edges": edges.tolist(),
                    "in_domain": np.histogram(negatives, edges)[0].tolist(),
                    "out_of_domain": np.histogram(positives, edges)[0].tolist(),
                },
            }
    return out
