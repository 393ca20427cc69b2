"""results.json: its typed schema, its version, and the readers the stages use.

The evaluator builds each section (ensemble/evaluate/sections.py) as one of the types below;
the report, generation (the fitted temperatures and weights) and the docs read them from here.
The schema lives in core, not in the evaluate stage, because generation reads results.json and
a stage never imports another. A JSON Schema generated from these types
(:func:`json_schema`, written to docs/results.schema.json) is what the tests validate every
results.json they write against.

Bump :data:`SCHEMA_VERSION` when a field changes meaning or goes away; adding an optional
field keeps it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from typing_extensions import NotRequired, TypedDict

from ensemble.errors import EnsembleError

SCHEMA_VERSION = 1

# The lower and upper ends of a 95% percentile interval (Poisson bootstrap over blocks).
Interval = list[float]


class Intervals(TypedDict):
    accuracy: NotRequired[Interval]
    nll: NotRequired[Interval]


class Metrics(TypedDict):
    """One model's (or combination's) metrics over the evaluated positions."""

    accuracy: float
    top5_accuracy: float
    nll: float
    perplexity: float
    ece: float
    brier: float
    tokens: int
    ci95: NotRequired[Intervals]


class MemberRow(Metrics):
    name: str
    seed: int | None
    path: str
    temperature: float


class CombinerRow(Metrics):
    weights: NotRequired[list[float]]
    """The fitted mixture weights, for a fitted combiner."""


class EnsembleRow(CombinerRow):
    combiner: str
    members: int


class DataInfo(TypedDict):
    source: str
    tokens: int
    sha256: str
    blocks: int
    block_size: int
    tokens_evaluated: int


class Bootstrap(TypedDict):
    samples: int
    seed: int
    method: str


class EvaluationInfo(TypedDict):
    mode: Literal["data", "member"]
    processes: int
    combiners: list[str]
    precision: str
    compiled: bool
    temperature_scaling: bool
    bootstrap: Bootstrap


class CurvePoint(TypedDict):
    """The first k members' ensemble (the headline combiner); the uncertainty fields with
    eval.uncertainty."""

    k: int
    accuracy: float
    nll: float
    perplexity: float
    total: NotRequired[float]
    aleatoric: NotRequired[float]
    epistemic: NotRequired[float]


class PairDisagreement(TypedDict):
    members: list[str]
    rate: float


class Disagreement(TypedDict):
    pairs: list[PairDisagreement]
    mean: float


class Diversity(TypedDict):
    nll_gap: float
    mean_kl_to_mixture: float
    disagreement: Disagreement


class VsBest(TypedDict):
    nll: float
    accuracy: float
    perplexity_ratio: float
    best_member_by_nll: str
    best_member_by_accuracy: str
    ci95: NotRequired[Intervals]


class VsMean(TypedDict):
    nll: float
    accuracy: float
    ci95: NotRequired[Intervals]


class Gain(TypedDict):
    """Empty with one member."""

    vs_best_member: NotRequired[VsBest]
    vs_mean_member: NotRequired[VsMean]


class Uncertainty(TypedDict):
    unit: str
    total: float
    aleatoric: float
    epistemic: float
    expected_pairwise_kl: float
    member_entropy: dict[str, float]


class RiskCoverage(TypedDict):
    aurc: float
    accuracy_at: dict[str, float]
    risk: list[float]


class Selective(TypedDict):
    bins: int
    coverage: list[float]
    scores: dict[str, str]
    rows: dict[str, dict[str, RiskCoverage]]
    """Row -> confidence score -> its risk-coverage summary."""


class ReliabilityRow(TypedDict):
    count: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]


class Reliability(TypedDict):
    bins: int
    rows: dict[str, ReliabilityRow]


class GainKept(TypedDict):
    share: float | None
    ensemble_gain_nll: float
    nll_vs_mean_member: float
    nll_vs_best_member: float
    perplexity_ratio_vs_best_member: float
    best_member: str
    nll_vs_ensemble: float
    """Its NLL minus the ensemble's (positive: the ensemble is better)."""
    ci95: NotRequired[Interval]
    """Of ``share``."""
    nll_vs_ensemble_ci95: NotRequired[Interval]
    """Paired: both NLLs from the same bootstrap replicate of the blocks."""


class OneModelRow(Metrics):
    """The ensemble in one model (the student or the soup), scored on the same blocks."""

    path: str
    gain_kept: NotRequired[GainKept]


class DistillInfo(TypedDict):
    alpha: NotRequired[float]
    temperature: NotRequired[float]
    teachers: list[str]


class StudentRow(OneModelRow):
    seed: int | None
    distill: DistillInfo


class SoupRow(OneModelRow):
    members: int


class Skipped(TypedDict):
    skipped: str
    """Why the section was not computed."""


class Histogram(TypedDict):
    edges: list[float]
    in_domain: list[int]
    out_of_domain: list[int]


class Detection(TypedDict):
    auroc: float
    fpr_at_95_tpr: float
    in_domain_mean: float
    out_of_domain_mean: float
    histogram: Histogram


class OodSet(TypedDict):
    path: str
    blocks: int
    tokens_evaluated: int
    rows: dict[str, dict[str, Detection]]
    """Row -> block score -> how well it tells this set apart from the evaluated split."""


class InDomain(TypedDict):
    blocks: int
    split: str


class OutOfDomain(TypedDict):
    in_domain: InDomain
    tpr: float
    scores: dict[str, str]
    sets: list[OodSet]


class Results(TypedDict):
    """The whole document. The optional sections are there when asked for (see
    ensemble/evaluate/sections.py for when each one is)."""

    schema_version: int
    created: str
    split: str
    data: DataInfo
    evaluation: EvaluationInfo
    members: list[MemberRow]
    ensemble: EnsembleRow
    combiners: dict[str, CombinerRow]
    curve: list[CurvePoint]
    diversity: Diversity
    gain: Gain
    uncertainty: NotRequired[Uncertainty]
    selective: NotRequired[Selective]
    reliability: Reliability
    student: NotRequired[StudentRow]
    soup: NotRequired[SoupRow | Skipped]
    ood: NotRequired[OutOfDomain]
    html: NotRequired[str]
    tokens_out: NotRequired[str]


# --------------------------------------------------------------------------------------------
# Readers


def read_results(path: Path) -> Results:
    """A results.json, checked to be one the evaluator wrote (any version up to this one's)."""
    try:
        results = json.loads(Path(path).read_text())
        version = results.get("schema_version", 0)  # 0: written before the field existed
        results["members"][0]["name"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise EnsembleError(
            f"{path} is not a results.json written by the evaluator; re-run launch/evaluate.py"
        ) from None
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise EnsembleError(
            f"{path} has schema_version {version!r}, newer than this version of the package reads "
            f"({SCHEMA_VERSION}); upgrade seed-ensemble or re-run launch/evaluate.py"
        )
    return results


def member_temperatures(results: Results) -> dict[str, float]:
    """The temperature each member was evaluated at (1 where none was fitted)."""
    return {m["name"]: float(m.get("temperature", 1.0)) for m in results["members"]}


def fitted_weights(results: Results) -> list[float] | None:
    """The fitted mixture weights (in the order of ``results["members"]``), or None."""
    return next((c["weights"] for c in results.get("combiners", {}).values() if "weights" in c), None)


def json_safe(obj: Any) -> Any:
    """JSON has no infinity or NaN: written as the strings of :data:`NON_FINITE`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# The JSON Schema


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Results`, with no properties allowed beyond the declared ones.
    Built by pydantic (installed with wandb), imported here only: nothing else needs it."""
    from pydantic import TypeAdapter

    schema = TypeAdapter(Results).json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    _closed(schema)
    return schema


NON_FINITE = ["inf", "-inf", "nan"]
"""How results.json writes a float that JSON cannot hold (evaluate/report.py)."""


def _closed(node: Any) -> None:
    """Every object with declared properties refuses undeclared ones (a misspelt key fails);
    every number may also be one of :data:`NON_FINITE`."""
    if isinstance(node, dict):
        if "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed(value)
        if node.get("type") == "number":
            del node["type"]
            node["anyOf"] = [{"type": "number"}, {"enum": NON_FINITE}]
    elif isinstance(node, list):
        for value in node:
            _closed(value)


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results.schema.json")
    out.write_text(json.dumps(json_schema(), indent=1) + "\n")
