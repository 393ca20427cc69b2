"""results.json, results.md and the plots (ensemble_size.png, reliability.png)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .combining import COMBINERS, HEADLINE
from .files import atomic_write_json, atomic_write_text, tmp_name

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SIZE_PLOT = "ensemble_size.png"
RELIABILITY_PLOT = "reliability.png"


def _ci(row: dict[str, Any], key: str, digits: int) -> str:
    ci = row.get("ci95", {}).get(key)
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def _row(label: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {r['accuracy']:.4f}{_ci(r, 'accuracy', 4)} | {r['top5_accuracy']:.4f} "
        f"| {r['nll']:.4f}{_ci(r, 'nll', 4)} | {r['perplexity']:.3f} | {r['ece']:.4f} | {r['brier']:.4f} "
        f"| {r['tokens']:,} |"
    )


def format_table(results: dict[str, Any]) -> str:
    """Markdown: members, then the ensemble's combinations, then what the ensemble gains."""
    data = results["data"]
    lines = [
        f"# Ensemble results: {data.get('source', '')} ({results['split']} split, "
        f"{results['evaluation']['precision']} forward passes)",
        "",
        f"{data['tokens_evaluated']:,} predicted tokens in {data['blocks']:,} blocks of up to "
        f"{data['block_size']} tokens. Accuracy is top-1 next-token accuracy; NLL is the mean "
        "negative log-likelihood per token (nats); perplexity = exp(NLL); ECE uses 15 bins of top-1 "
        "confidence; Brier is over the full vocabulary. [brackets]: 95% bootstrap intervals over blocks.",
        "",
        "| Model | Accuracy | Top-5 accuracy | NLL | Perplexity | ECE | Brier | Tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results["members"]:
        seed = f" (seed {m['seed']})" if m.get("seed") is not None else ""
        temp = f", T={m['temperature']:.3g}" if m.get("temperature", 1.0) != 1.0 else ""
        lines.append(_row(f"{m['name']}{seed}{temp}", m))
    for name, row in results["combiners"].items():
        label = COMBINERS[name].label if name in COMBINERS else name
        if "weights" in row:
            label += " w=" + ",".join(f"{w:.3f}" for w in row["weights"])
        lines.append(_row(label, row))
    gain = results.get("gain")
    if gain:
        best, mean = gain["vs_best_member"], gain["vs_mean_member"]

        def interval(block: dict[str, Any], key: str) -> str:
            ci = block.get("ci95", {}).get(key)
            return f" (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}])" if ci else ""

        lines += [
            "",
            f"Ensemble (mean probability) vs the best member: NLL {best['nll']:+.4f}{interval(best, 'nll')} "
            f"({best['best_member_by_nll']}), perplexity x{best['perplexity_ratio']:.3f}, accuracy "
            f"{best['accuracy']:+.4f}{interval(best, 'accuracy')} ({best['best_member_by_accuracy']}).",
            f"Ensemble vs the average member: NLL {mean['nll']:+.4f}{interval(mean, 'nll')}, accuracy "
            f"{mean['accuracy']:+.4f}{interval(mean, 'accuracy')}.",
        ]
        div = results["diversity"]
        lines.append(
            f"Diversity: mean member NLL - ensemble NLL = {div['nll_gap']:.4f}; mean KL(member || mixture) = "
            f"{div['mean_kl_to_mixture']:.4f} nats; pairwise top-1 disagreement {div['disagreement']['mean']:.4f}."
        )
        lines += ["", "| Members (first k) | Accuracy | Perplexity |", "| ---: | ---: | ---: |"]
        lines += [f"| {p['k']} | {p['accuracy']:.4f} | {p['perplexity']:.3f} |" for p in results["curve"]]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    """JSON has no infinity or NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write both files atomically: a failed evaluation leaves the previous results intact."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    atomic_write_json(json_path, _json_safe(results))
    atomic_write_text(md_path, format_table(results))
    return json_path, md_path


def write_plots(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Accuracy and perplexity against ensemble size; a reliability diagram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []
    curve = results["curve"]
    ks = [p["k"] for p in curve]
    fig, (ax_acc, ax_ppl) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_acc.plot(ks, [p["accuracy"] for p in curve], marker="o")
    ax_acc.set(xlabel="members in the ensemble (first k)", ylabel="top-1 accuracy", title="Accuracy")
    ax_ppl.plot(ks, [p["perplexity"] for p in curve], marker="o", color="tab:red")
    ax_ppl.set(xlabel="members in the ensemble (first k)", ylabel="perplexity", title="Perplexity")
    for ax in (ax_acc, ax_ppl):
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, out / SIZE_PLOT))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, rel in results["reliability"]["rows"].items():
        points = [(c, a) for c, a in zip(rel["confidence"], rel["accuracy"], strict=True) if c is not None]
        if points:
            label = COMBINERS[HEADLINE].label.replace("*", "") if name == HEADLINE else name
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label,
                    linewidth=2 if name == HEADLINE else 1)  # fmt: skip
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title="Reliability (15 bins)")  # fmt: skip
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, out / RELIABILITY_PLOT))
    plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    tmp = tmp_name(path)
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path
