"""The fine-tuning regime offline: members fine-tuned from one pretrained base, fully and with LoRA.

The Hub is unreachable here, so the regime of the reference setup (three seeds fine-tuned from
one pretrained `gpt2`) is rebuilt from texts that ship with Python. The steps, each through the
real entry points:
1. pretrain the base (configs/finetune-base.yaml: the standard library's source);
2. fine-tune three seeded members from it on the reference manual, in full
   (configs/finetune-full.yaml) and as LoRA adapters (configs/finetune-lora.yaml);
3. distil each ensemble into one full student started from the base, and evaluate the members,
   the ensemble, the soup and the student together (`launch/distill.py`);
4. evaluate the base on the same test blocks (`launch/evaluate.py --members BASE`).
It prints one table per regime (NLL with its 95% bootstrap interval, accuracy) and the gains:
the ensemble against its best member (paired interval), against the soup and what the soup and
the student keep of the ensemble's gain (intervals).

    python benchmarks/finetune_regime.py                    # ~15 min on 2 CPU cores
    python benchmarks/finetune_regime.py --root DIR --set train.max_steps=5   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGIMES = {"full": "configs/finetune-full.yaml", "lora": "configs/finetune-lora.yaml"}


def run(cmd: list[str]) -> None:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    print(f"  {time.perf_counter() - started:6.1f} s  {' '.join(cmd)}", file=sys.stderr)


def steps(root: Path, base_sets: list[str], sets: list[str]) -> dict[str, Path]:
    base_run = root / "base"
    base = base_run / "members" / "member-0"
    if not (base / "member.json").exists():
        run(
            [
                "launch/train.py",
                "--config",
                "configs/finetune-base.yaml",
                f"output.dir={base_run}",
                "--no-eval",
                *base_sets,
            ]
        )
    shared = [f"model.name_or_path={base}", f"distill.name_or_path={base}", *sets]
    out = {}
    for regime, config in REGIMES.items():
        out[regime] = root / regime
        if not (out[regime] / "student" / "member.json").exists():
            run(["launch/train.py", "--config", config, f"output.dir={out[regime]}", "--no-eval", *shared])
            run(["launch/distill.py", str(out[regime]), *sets])
    out["base"] = root / "base-eval"
    evals = [s for s in sets if s.startswith(("data.", "eval."))]
    run(
        [
            "launch/evaluate.py",
            "--members",
            str(base),
            "--config",
            REGIMES["full"],
            "--output",
            str(out["base"]),
            *evals,
        ]
    )
    return out


def _ci(row: dict) -> str:
    ci = row.get("ci95", {}).get("nll")
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-"


def _share(row: dict) -> str:
    kept = row.get("gain_kept", {})
    if kept.get("share") is None:
        return "-"
    ci = kept.get("ci95")
    return f"{kept['share']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def table(regime: str, results: dict, base: dict) -> list[str]:
    (base_row,) = base["members"]
    rows = [("base (not fine-tuned)", base_row)]
    rows += [(f"{m['name']} (seed {m['seed']})", m) for m in results["members"]]
    rows += [("ensemble (mean_prob)", results["ensemble"])]
    for name in ("soup", "student"):
        if name in results and "nll" in results[name]:
            rows.append((name, results[name]))
    lines = [
        f"**{regime}** ({results['data']['tokens_evaluated']:,} test tokens)",
        "",
        "| Model | NLL | 95% interval | Accuracy | Share of the ensemble's gain kept |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    lines += [f"| {n} | {r['nll']:.4f} | {_ci(r)} | {r['accuracy']:.4f} | {_share(r) if n in ('soup', 'student') else ''} |" for n, r in rows]  # fmt: skip
    best = results["gain"]["vs_best_member"]
    ci = best.get("ci95", {}).get("nll")
    lines += ["", f"- ensemble - best member ({best['best_member_by_nll']}): NLL {best['nll']:+.4f}"
              + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "") + f", accuracy {best['accuracy']:+.4f}"]  # fmt: skip
    for name in ("soup", "student"):
        kept = results.get(name, {}).get("gain_kept")
        if kept is None:
            lines.append(f"- {name}: {results.get(name, {}).get('skipped', 'not evaluated')}")
            continue
        ci = kept.get("nll_vs_ensemble_ci95")
        lines.append(
            f"- {name} - ensemble: NLL {kept['nll_vs_ensemble']:+.4f}"
            + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "finetune-regime", help="where the runs go")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the fine-tuning steps"
    )
    p.add_argument("--base-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the base")
    p.add_argument("--json", type=Path, help="also write every results.json here, by regime")
    args = p.parse_args()
    out = steps(args.root, args.base_set, args.set)
    base = json.loads((out["base"] / "results.json").read_text())
    every = {"base": base}
    for regime in REGIMES:
        every[regime] = json.loads((out[regime] / "results.json").read_text())
        print("\n".join(table(regime, every[regime], base)) + "\n")
    if args.json:
        args.json.write_text(json.dumps(every, indent=2))


if __name__ == "__main__":
    main()
