"""results.json and results.md: the table of members and their ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def _row(label: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {r['accuracy']:.4f} | {r['top5_accuracy']:.4f} | {r['nll']:.4f} "
        f"| {r['perplexity']:.3f} | {r['tokens']:,} |"
    )


def format_table(results: dict[str, Any]) -> str:
    """Markdown: one row per member, then the ensemble, then its gain over the members."""
    data = results["data"]
    lines = [
        f"# Ensemble results: {data.get('source', '')} ({results['split']} split)",
        "",
        f"{data['tokens_evaluated']:,} predicted tokens in {data['blocks']:,} blocks of up to "
        f"{data['block_size']} tokens. Accuracy is top-1 next-token accuracy; NLL is the mean "
        "negative log-likelihood per token (nats); perplexity = exp(NLL).",
        "",
        "| Model | Accuracy | Top-5 accuracy | NLL | Perplexity | Tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results["members"]:
        seed = f" (seed {m['seed']})" if m.get("seed") is not None else ""
        lines.append(_row(f"{m['name']}{seed}", m))
    ens = results["ensemble"]
    lines.append(_row(f"**Ensemble** (mean probability of {ens['members']} members)", ens))
    best_ppl = min(m["perplexity"] for m in results["members"])
    best_acc = max(m["accuracy"] for m in results["members"])
    lines += [
        "",
        f"Ensemble vs best member: perplexity {ens['perplexity']:.3f} vs {best_ppl:.3f} "
        f"({ens['perplexity'] - best_ppl:+.3f}), accuracy {ens['accuracy']:.4f} vs {best_acc:.4f} "
        f"({ens['accuracy'] - best_acc:+.4f}).",
    ]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write both files atomically: a failed evaluation leaves the previous results intact."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    atomic_write_json(json_path, results)
    atomic_write_text(md_path, format_table(results))
    return json_path, md_path
