"""results.json, results.md and the plots (ensemble_size.png, reliability.png, risk_coverage.png,
ood.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ensemble.core.combining import COMBINERS, HEADLINE
from ensemble.core.paths import RESULTS_JSON, RESULTS_MD, STUDENT
from ensemble.core.results import Results, json_safe
from ensemble.core.soup import SOUP
from ensemble.files import atomic_write_json, atomic_write_text, tmp_name

SIZE_PLOT = "ensemble_size.png"
RELIABILITY_PLOT = "reliability.png"
RISK_COVERAGE_PLOT = "risk_coverage.png"
OOD_PLOT = "ood.png"


def _label(name: str) -> str:
    """A row's name for tables and legends: a member's own, a combiner's label."""
    return COMBINERS[name].label.replace("*", "") if name in COMBINERS else name


def _ci(row: dict[str, Any], key: str, digits: int) -> str:
    ci = row.get("ci95", {}).get(key)
    return f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def _row(label: str, r: dict[str, Any]) -> str:
    return (
        f"| {label} | {r['accuracy']:.4f}{_ci(r, 'accuracy', 4)} | {r['top5_accuracy']:.4f} "
        f"| {r['nll']:.4f}{_ci(r, 'nll', 4)} | {r['perplexity']:.3f} | {r['ece']:.4f} | {r['brier']:.4f} "
        f"| {r['tokens']:,} |"
    )


def format_table(results: Results) -> str:
    """Markdown: members, then the ensemble's combinations, then what the ensemble gains."""
    lines = _header_lines(results) + _row_lines(results)
    if results.get("gain"):
        lines += _gain_lines(results)
    lines += _one_model_lines(results)
    lines += _uncertainty_lines(results)
    return "\n".join(lines) + "\n"


def _header_lines(results: Results) -> list[str]:
    data = results["data"]
    return [
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


def _row_lines(results: Results) -> list[str]:
    """The members, the combinations, and the ensemble in one model (student, soup)."""
    lines = []
    for m in results["members"]:
        seed = f" (seed {m['seed']})" if m.get("seed") is not None else ""
        temp = f", T={m['temperature']:.3g}" if m.get("temperature", 1.0) != 1.0 else ""
        lines.append(_row(f"{m['name']}{seed}{temp}", m))
    alone = results["members"][0]["name"] if len(results["members"]) == 1 else None
    for name, row in results["combiners"].items():
        label = COMBINERS[name].label if name in COMBINERS else name
        if alone:
            label += f", of one member (= {alone})"
        if "weights" in row:
            label += " w=" + ",".join(f"{w:.3f}" for w in row["weights"])
        lines.append(_row(label, row))
    for name, label in ONE_MODEL_ROWS.items():
        row = results.get(name)
        if row and "skipped" not in row:
            seed = f" (seed {row['seed']})" if row.get("seed") is not None else ""
            lines.append(_row(f"{label}{seed}", row))
    return lines


def _gain_lines(results: Results) -> list[str]:
    """What the ensemble gains over the best and the average member, its diversity, and the
    metrics of the first k members."""
    gain = results["gain"]
    best, mean = gain["vs_best_member"], gain["vs_mean_member"]

    def interval(block: dict[str, Any], key: str) -> str:
        ci = block.get("ci95", {}).get(key)
        return f" (95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}])" if ci else ""

    div = results["diversity"]
    epistemic = "epistemic" in results["curve"][0]
    return [
        "",
        f"Ensemble (mean probability) vs the best member: NLL {best['nll']:+.4f}{interval(best, 'nll')} "
        f"({best['best_member_by_nll']}), perplexity x{best['perplexity_ratio']:.3f}, accuracy "
        f"{best['accuracy']:+.4f}{interval(best, 'accuracy')} ({best['best_member_by_accuracy']}).",
        f"Ensemble vs the average member: NLL {mean['nll']:+.4f}{interval(mean, 'nll')}, accuracy "
        f"{mean['accuracy']:+.4f}{interval(mean, 'accuracy')}.",
        f"Diversity: mean member NLL - ensemble NLL = {div['nll_gap']:.4f}; mean KL(member || mixture) = "
        f"{div['mean_kl_to_mixture']:.4f} nats; pairwise top-1 disagreement {div['disagreement']['mean']:.4f}.",
        "",
        "| Members (first k) | Accuracy | Perplexity |" + (" Epistemic (nats) |" if epistemic else ""),
        "| ---: | ---: | ---: |" + (" ---: |" if epistemic else ""),
    ] + [
        f"| {p['k']} | {p['accuracy']:.4f} | {p['perplexity']:.3f} |"
        + (f" {p['epistemic']:.4f} |" if epistemic else "")
        for p in results["curve"]
    ]


# results.json's sections of the ensemble in one model, and their labels
ONE_MODEL_ROWS = {STUDENT: "Student (distilled)", SOUP: "Soup (mean of the weights)"}


def _one_model_lines(results: Results) -> list[str]:
    """How much of the ensemble's gain the student and the soup keep (or why there is no soup)."""
    lines = []
    for name, label in ONE_MODEL_ROWS.items():
        row = results.get(name)
        if not row:
            continue
        if "skipped" in row:
            lines.append(f"{label}: not evaluated: {row['skipped']}.")
            continue
        kept = row.get("gain_kept")
        if not kept or kept["share"] is None:
            continue
        ci = kept.get("ci95")
        interval = f" (95% CI [{100 * ci[0]:.0f}%, {100 * ci[1]:.0f}%])" if ci else ""
        lines.append(
            f"{label}: keeps {100 * kept['share']:.0f}%{interval} of the ensemble's NLL gain over the mean "
            f"member ({kept['ensemble_gain_nll']:.4f} nats); NLL {kept['nll_vs_best_member']:+.4f} vs the best "
            f"member ({kept['best_member']}), perplexity x{kept['perplexity_ratio_vs_best_member']:.3f}."
        )
    return ["", *lines] if lines else []


def _uncertainty_lines(results: Results) -> list[str]:
    """The decomposition, selective prediction and (with --ood) out-of-domain detection."""
    u, selective = results.get("uncertainty"), results.get("selective")
    if not u or not selective:
        return []
    lines = [
        "",
        f"Uncertainty (nats per token): total {u['total']:.4f} = aleatoric {u['aleatoric']:.4f} + "
        f"epistemic {u['epistemic']:.4f} (mutual information); expected pairwise KL between members "
        f"{u['expected_pairwise_kl']:.4f}.",
        "",
        "Selective prediction: AURC (mean top-1 error over all coverages; lower is better) when "
        "positions are ranked by each confidence score, and the accuracy of the most confident "
        "50/80/90% by max probability.",
        "",
        "| Model | AURC: max probability | AURC: -entropy | AURC: -mutual information | Acc@50% | Acc@80% | Acc@90% |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, scores in selective["rows"].items():
        aurc = [f"{scores[s]['aurc']:.4f}" if s in scores else "" for s in selective["scores"]]
        at = scores["max_prob"]["accuracy_at"]
        lines.append(
            f"| {_label(row)} | {' | '.join(aurc)} | {at['0.5']:.4f} | {at['0.8']:.4f} | {at['0.9']:.4f} |"
        )
    for ood in (results.get("ood") or {}).get("sets", []):
        lines += [
            "",
            f"Out-of-domain: {ood['path']} ({ood['blocks']:,} blocks) against the {results['split']} split "
            f"({results['ood']['in_domain']['blocks']:,} blocks): AUROC / FPR at 95% TPR per block score.",
            "",
            "| Model | " + " | ".join(results["ood"]["scores"].values()) + " |",
            "| --- |" + " ---: |" * len(results["ood"]["scores"]),
        ]
        for row, scores in ood["rows"].items():
            cells = [
                f"{scores[s]['auroc']:.3f} / {scores[s]['fpr_at_95_tpr']:.3f}" if s in scores else ""
                for s in results["ood"]["scores"]
            ]
            lines.append(f"| {_label(row)} | {' | '.join(cells)} |")
    return lines


def write_results(results: Results, out_dir: str | Path) -> tuple[Path, Path]:
    """Write both files atomically: a failed evaluation leaves the previous results intact."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    atomic_write_json(json_path, json_safe(results))
    atomic_write_text(md_path, format_table(results))
    return json_path, md_path


def write_plots(results: Results, out_dir: str | Path) -> list[Path]:
    """Accuracy and perplexity against ensemble size; a reliability diagram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []
    curve = results["curve"]
    ks = [p["k"] for p in curve]
    epistemic = "epistemic" in curve[0]
    fig, axes = plt.subplots(1, 3 if epistemic else 2, figsize=(13 if epistemic else 9, 3.6))
    ax_acc, ax_ppl = axes[0], axes[1]
    ax_acc.plot(ks, [p["accuracy"] for p in curve], marker="o")
    ax_acc.set(xlabel="members in the ensemble (first k)", ylabel="top-1 accuracy", title="Accuracy")
    ax_ppl.plot(ks, [p["perplexity"] for p in curve], marker="o", color="tab:red")
    ax_ppl.set(xlabel="members in the ensemble (first k)", ylabel="perplexity", title="Perplexity")
    if epistemic:
        axes[2].plot(ks, [p["epistemic"] for p in curve], marker="o", color="tab:purple")
        axes[2].set(
            xlabel="members in the ensemble (first k)",
            ylabel="nats per token",
            title="Epistemic uncertainty (mutual information)",
        )
    for ax in axes:
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
            ax.plot(
                *zip(*points, strict=True),
                marker="o",
                markersize=3,
                label=_label(name),
                linewidth=2 if name == HEADLINE else 1,
            )
    ax.set(
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Reliability (15 bins)",
    )
    _legend(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, out / RELIABILITY_PLOT))
    plt.close(fig)
    if results.get("selective"):
        written.append(_risk_coverage_plot(plt, results["selective"], out / RISK_COVERAGE_PLOT))
    if results.get("ood"):
        written.append(_ood_plot(plt, results["ood"], out / OOD_PLOT))
    return written


def _risk_coverage_plot(plt: Any, selective: dict[str, Any], path: Path) -> Path:
    """One panel per confidence score: every row's risk against coverage, AURC in the legend."""
    scores = selective["scores"]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.4 * len(scores), 3.8), squeeze=False)
    for ax, (score, label) in zip(axes[0], scores.items(), strict=True):
        for row, by_score in selective["rows"].items():
            if score in by_score:
                ensemble = row == HEADLINE
                ax.plot(
                    selective["coverage"],
                    by_score[score]["risk"],
                    linewidth=2 if ensemble else 1,
                    label=f"{_label(row)} (AURC {by_score[score]['aurc']:.3f})",
                )
        ax.set(
            xlabel="coverage (most confident first)",
            ylabel="top-1 error among those kept",
            title=f"Ranked by {label}",
            xlim=(0, 1),
        )
        _legend(ax)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _ood_plot(plt: Any, ood: dict[str, Any], path: Path) -> Path:
    """Per out-of-domain set (rows) and block score (columns): the ensemble's histograms of
    in-domain and out-of-domain blocks, AUROC in the title."""
    sets, scores = ood["sets"], ood["scores"]
    fig, axes = plt.subplots(
        len(sets), len(scores), figsize=(4.4 * len(scores), 3.2 * len(sets)), squeeze=False
    )
    for r, ood_set in enumerate(sets):
        row = HEADLINE if HEADLINE in ood_set["rows"] else next(iter(ood_set["rows"]))
        for ax, (score, label) in zip(axes[r], scores.items(), strict=True):
            if score not in ood_set["rows"][row]:
                ax.axis("off")
                continue
            d = ood_set["rows"][row][score]
            edges = d["histogram"]["edges"]
            for key, color in (("in_domain", "tab:blue"), ("out_of_domain", "tab:red")):
                ax.stairs(
                    d["histogram"][key],
                    edges,
                    fill=True,
                    alpha=0.45,
                    color=color,
                    label=key.replace("_", "-"),
                )
            ax.set(
                xlabel=f"{label} per block",
                ylabel="blocks",
                title=f"{Path(ood_set['path']).name}: AUROC {d['auroc']:.3f}",
            )
            _legend(ax)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _legend(ax: Any) -> None:
    """A legend, on a panel that has a labelled line (an empty one makes matplotlib warn)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig: Any, path: Path) -> Path:
    tmp = tmp_name(path)
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(path)
    return path
