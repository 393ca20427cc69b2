"""Selective prediction: how accurate the model is on the positions it is most confident about.

Positions are ranked by a confidence score; keeping the most confident fraction c of them (the
coverage), the risk is the top-1 error rate among those kept. The risk-coverage curve, its area
(AURC: the mean risk over every coverage 1/T, 2/T, ..., 1) and the accuracy at 50/80/90% coverage
are reported for each member and for the ensemble.

Every score is registered once, in :data:`SCORES`, as an *uncertainty* u >= 0 (low = confident):
- ``max_prob``: 1 - the top-1 probability (confidence: the max probability);
- ``entropy``: the distribution's entropy (confidence: the negative entropy);
- ``mutual_information``: the members' disagreement, the ensemble's epistemic uncertainty
  (confidence: the negative mutual information); the ensemble only.

Streaming with bounded memory: per row and score, a histogram of u over :data:`BINS` equal bins
of [0, its largest value], with the positions and top-1 hits per bin. These are integer sums, so
they are the same whatever the number of processes. Positions in one bin count as tied, and every
figure is its exact expectation over a random order of the tied positions (closed form below):
what a brute-force sort of the binned scores gives, averaged over tie orders. With 2,000 bins the
binning moves the AURC by less than 1e-3 on the tests' data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ensemble.core.metrics import PositionStats
from ensemble.core.uncertainty import Uncertainty

BINS = 2000
COVERAGES = (0.5, 0.8, 0.9)
CURVE_POINTS = 50  # coverages 1/50, 2/50, ..., 1 in results.json and the plots


@dataclass(frozen=True)
class Score:
    name: str
    label: str
    """For tables and plots: what ranks the positions."""
    upper: Callable[[int, int], float]
    """The largest value, given (vocabulary size, members): the histogram's range."""
    of: Callable[[PositionStats, Uncertainty | None], torch.Tensor]
    """The uncertainty at each position of a row (a member or the ensemble)."""
    ensemble_only: bool = False


SCORES: dict[str, Score] = {}


def register_score(score: Score) -> Score:
    SCORES[score.name] = score
    return score


register_score(Score("max_prob", "max probability", lambda v, n: 1.0, lambda s, u: 1.0 - s.best.exp()))
register_score(Score("entropy", "negative entropy", lambda v, n: math.log(v), lambda s, u: s.entropy))
register_score(
    Score(
        "mutual_information",
        "negative mutual information",
        lambda v, n: math.log(max(n, 2)),
        lambda s, u: u.epistemic,
        ensemble_only=True,
    )
)


def bin_of(u: torch.Tensor, upper: float) -> torch.Tensor:
    """The histogram bin of each uncertainty value (values outside [0, upper] go to the ends)."""
    return (u.double() * (BINS / upper)).long().clamp_(0, BINS - 1)


def _harmonic_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """H(b) - H(a) = sum_{i=a+1}^{b} 1/i for integer arrays 0 <= a <= b, without summing every
    term: digamma(b + 1) - digamma(a + 1), by the recurrence below 10 and the asymptotic series
    above (error < 1e-16)."""

    def digamma(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        shift = np.zeros_like(x)
        for _ in range(10):  # digamma(x) = digamma(x + 1) - 1/x, until x >= 10
            small = x < 10
            shift -= np.where(small, 1.0 / np.where(small, x, 1.0), 0.0)
            x = np.where(small, x + 1, x)
        inv2 = 1.0 / (x * x)
        series = np.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 / 240)))
        return series + shift

    return digamma(np.asarray(b) + 1.0) - digamma(np.asarray(a) + 1.0)


@dataclass(frozen=True)
class RiskCoverage:
    """The selective-prediction figures of one row and score, from its histogram: positions
    ``counts[b]`` and top-1 hits ``correct[b]`` per bin, most confident bin first."""

    counts: np.ndarray
    correct: np.ndarray

    @property
    def total(self) -> int:
        return int(round(self.counts.sum()))

    def expected_correct(self, k: np.ndarray) -> np.ndarray:
        """The expected top-1 hits among the k most confident positions (ties in random order)."""
        before = np.concatenate([[0.0], np.cumsum(self.counts)])
        hits_before = np.concatenate([[0.0], np.cumsum(self.correct)])
        b = np.searchsorted(before[1:], k, side="left")  # the bin where the k-th position lies
        b = np.minimum(b, len(self.counts) - 1)
        taken = k - before[b]
        rate = np.divide(self.correct[b], self.counts[b], out=np.zeros(len(b)), where=self.counts[b] > 0)
        return hits_before[b] + taken * rate

    def accuracy_at(self, coverage: float) -> float:
        """Top-1 accuracy of the most confident ``coverage`` of the positions (at least one)."""
        k = max(1, round(coverage * self.total))
        return float(self.expected_correct(np.array([k]))[0] / k)

    def risk_curve(self, points: int = CURVE_POINTS) -> tuple[list[float], list[float]]:
        """(coverages, risks) at coverages 1/points, ..., 1."""
        coverages = np.arange(1, points + 1) / points
        k = np.maximum(1, np.round(coverages * self.total))
        return coverages.tolist(), (1.0 - self.expected_correct(k) / k).tolist()

    def aurc(self) -> float:
        """The mean risk over the coverages 1/T, ..., T/T.

        For a bin of m positions with c hits after K positions and C hits, the j-th of its
        positions is expected to bring the hits to C + j r (r = c/m), so the bin adds
        sum_j (C + j r)/(K + j) = m r + (C - r K)(H(K + m) - H(K)) to the sum of accuracies."""
        total = self.total
        if total == 0:
            raise ValueError("no positions were scored")
        keep = self.counts > 0
        m, c = self.counts[keep], self.correct[keep]
        before = np.concatenate([[0.0], np.cumsum(m)[:-1]])
        hits_before = np.concatenate([[0.0], np.cumsum(c)[:-1]])
        r = c / m
        accuracy_sum = m * r + (hits_before - r * before) * _harmonic_difference(before, before + m)
        return float(1.0 - accuracy_sum.sum() / total)

    def summary(self) -> dict:
        return {
            "aurc": self.aurc(),
            "accuracy_at": {f"{c:g}": self.accuracy_at(c) for c in COVERAGES},
            "risk": self.risk_curve()[1],
        }


def selective_results(histograms: np.ndarray, rows: list[str], ensemble_row: str | None) -> dict:
    """results.json's "selective" section from the [rows, scores, 2, BINS] histograms
    (positions, hits), rows in ``rows`` order; ``ensemble_row``: the row that is the ensemble
    (the only one with ensemble-only scores), None with one member."""
    out: dict = {
        "bins": BINS,
        "coverage": (np.arange(1, CURVE_POINTS + 1) / CURVE_POINTS).tolist(),
        "scores": {name: s.label for name, s in SCORES.items()},
        "rows": {},
    }
    for r, row in enumerate(rows):
        out["rows"][row] = {
            name: RiskCoverage(histograms[r, s, 0], histograms[r, s, 1]).summary()
            for s, (name, score) in enumerate(SCORES.items())
            if not score.ensemble_only or row == ensemble_row
        }
    return out
