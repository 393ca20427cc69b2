"""Every results.json the tests write is checked against the JSON Schema generated from the
typed schema in ensemble/core/results.py (see tests/conftest.py for when)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ensemble.core.paths import RESULTS_JSON
from ensemble.core.results import json_schema


@functools.cache
def _validator():
    import jsonschema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(results: dict) -> list[str]:
    """Where ``results`` departs from the schema, one line per error (none: it conforms)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
        for e in _validator().iter_errors(results)
    ]


def invalid_results(root: Path) -> list[str]:
    """Every results.json under ``root`` that does not conform, with its first errors."""
    bad = []
    for path in sorted(Path(root).rglob(RESULTS_JSON)):
        try:
            errors = schema_errors(json.loads(path.read_text()))
        except (OSError, ValueError) as e:  # (a file another process is replacing, or not JSON)
            errors = [f"unreadable: {e}"]
        if errors:
            bad.append(f"{path}: " + "; ".join(errors[:3]))
    return bad


def results_document(temperatures: list[float], weights: list[float] | None) -> dict:
    """A conforming results.json for members member-0.. with these fitted temperatures and
    mixture weights, the metrics zero: for tests of what reads the fitted values."""
    from ensemble.core.results import SCHEMA_VERSION

    metrics = {
        "accuracy": 0.0,
        "top5_accuracy": 0.0,
        "nll": 0.0,
        "perplexity": 1.0,
        "ece": 0.0,
        "brier": 0.0,
        "tokens": 1,
    }
    names = [f"member-{i}" for i in range(len(temperatures))]
    combiners = {"mean_prob": dict(metrics)}
    if weights is not None:
        combiners["weighted"] = {**metrics, "weights": list(weights)}
    return {
        "schema_version": SCHEMA_VERSION,
        "created": "2026-01-01T00:00:00+00:00",
        "split": "test",
        "data": {
            "source": "x",
            "tokens": 2,
            "sha256": "0" * 64,
            "blocks": 1,
            "block_size": 2,
            "tokens_evaluated": 1,
        },
        "evaluation": {
            "mode": "data",
            "processes": 1,
            "combiners": list(combiners),
            "precision": "float32",
            "compiled": False,
            "temperature_scaling": True,
            "bootstrap": {"samples": 0, "seed": 0, "method": "none"},
        },
        "members": [
            {"name": n, "seed": i, "path": n, "temperature": t, **metrics}
            for i, (n, t) in enumerate(zip(names, temperatures, strict=True))
        ],
        "ensemble": {"combiner": "mean_prob", "members": len(names), **metrics},
        "combiners": combiners,
        "curve": [{"k": 1, "accuracy": 0.0, "nll": 0.0, "perplexity": 1.0}],
        "diversity": {"nll_gap": 0.0, "mean_kl_to_mixture": 0.0, "disagreement": {"pairs": [], "mean": 0.0}},
        "gain": {},
        "reliability": {"bins": 15, "rows": {}},
    }
