"""Throughput of `parallel` vs `sequential` placement, measured in one run on this machine.

Trains the same N members with W processes (torchrun, gloo on CPU or NCCL on GPU) once per
placement, each member for the same number of epochs (so for the same tokens), and prints
tokens/s and MFU per member, total tokens/s (all members' tokens / wall time of the training
phase, from the manifest), and the ratio parallel / sequential.

    python benchmarks/placement.py --processes 2 --members 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(placement: str, args: argparse.Namespace, out: Path) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    seeds = [42, 123, 456, 7, 8, 9, 10, 11][: args.members]
    cmd = [
        str(torchrun), "--nproc_per_node", str(args.processes), "launch/train.py", "--config", args.config,
        f"members.seeds={seeds}", f"parallel.placement={placement}", f"train.num_epochs={args.epochs}",
        "tracking.report_to=[none]", f"output.dir={out}", *args.overrides,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{placement} run failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    members = [json.loads((out / m["path"] / "member.json").read_text()) for m in manifest["members"]]
    tokens = sum(m["training"]["tokens"] for m in members)
    seconds = manifest["timing"]["train_seconds"]
    return {
        "layout": manifest["layout"],
        "members": members,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    args = p.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for placement in ("parallel", "sequential"):
            results[placement] = run(placement, args, Path(tmp) / placement)

    print(
        f"{args.members} members, {args.processes} processes, {args.epochs} epoch(s) each, config {args.config}"
    )
    print(
        f"{'placement':<11} {'member':<9} {'ranks':<10} {'tokens':>9} {'seconds':>8} {'tokens/s':>9} {'MFU':>7}"
    )
    for placement, r in results.items():
        for m in r["members"]:
            t = m["training"]
            mfu = f"{t['mfu']:.2%}" if t.get("mfu") is not None else "n/a"
            ranks = ",".join(map(str, t["ranks"]))
            print(
                f"{placement:<11} {m['name']:<9} {ranks:<10} {t['tokens']:>9,} {t['seconds']:>8.1f} "
                f"{t['tokens_per_s']:>9,.0f} {mfu:>7}"
            )
        print(
            f"{placement:<11} {'total':<9} {'':<10} {r['tokens']:>9,} {r['seconds']:>8.1f} {r['tokens_per_s']:>9,.0f}"
        )
    ratio = results["parallel"]["tokens_per_s"] / results["sequential"]["tokens_per_s"]
    print(f"total tokens/s, parallel / sequential: {ratio:.2f}")
    peak = results["parallel"]["members"][0]["training"]
    print(
        f"MFU: {peak['flops_per_token']:.3g} FLOPs/token (6N + 6·L·C·T) over peak {peak['peak_tflops']:.3g} "
        f"TFLOP/s per device ({peak['peak_source']})"
    )


if __name__ == "__main__":
    main()
