"""Evaluation throughput and memory: our evaluator vs what users write today, in one run.

Measured on this device, each figure in a fresh process (so its peak memory is its own):
- ours, one member: tokens/s of the evaluator with a single member;
- ours, N members: tokens/s of the N-member ensemble evaluation (all metrics, combiners
  mean_prob/mean_logit/geometric, bootstrap; the validation fits are a separate pass and are
  not timed);
- ours without uncertainty: the same with `eval.uncertainty=false` (no entropies, no
  decomposition, no selective-prediction histograms): the baseline of the uncertainty's cost;
- ours with every output: uncertainty plus the per-block sums of `--ood` and the per-token
  Parquet export of `--tokens-out`;
- naive: each member evaluated separately with its full logits collected on the host, then
  the probabilities averaged (what the reference tutorial attempts with `Trainer`).
Memory: the evaluation's own peak (peak RSS, or peak CUDA memory, above what the process held
before the evaluation started), for a test set and for one 4x larger.

    python benchmarks/evaluation.py                  # trains small members first
    python benchmarks/evaluation.py --run runs/tiny  # or uses a run's members
    python benchmarks/evaluation.py --size gpt2 --cost-only  # the uncertainty's cost, GPT-2 small
    python benchmarks/evaluation.py --size gpt2 --compare cpu cuda  # the same numbers on both?
Targets: ensemble tokens/s >= 0.9 x (single-member tokens/s / N); the uncertainty costs at most
10% of the throughput; our memory flat when the test set grows 4x (with every output too), while
the naive baseline's grows.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ensemble.core.data import EvalBlocks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/generation.py's random members
KINDS = {
    "ours": "evaluation, uncertainty included (the default)",
    "ours-plain": "eval.uncertainty=false",
    "ours-all": "uncertainty, per-block sums (--ood) and the per-token export (--tokens-out)",
    "naive": "full logits on the host, averaged at the end",
}


def _reset_peak() -> None:
    """Start the peak-memory count afresh, so data preparation's peak does not count."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset this process's peak RSS (VmHWM)


def _peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _held_bytes() -> int:
    import psutil
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    return psutil.Process().memory_info().rss


def naive_ensemble(loaded: list, blocks: EvalBlocks, batch_size: int, device: str) -> int:
    """What users write today: each member evaluated separately, its full logits collected on
    the host, the probabilities averaged at the end (what the reference tutorial attempts with
    `Trainer`). Returns the tokens scored."""
    import torch

    from ensemble.core.data import collate_eval

    all_logits, targets = [], torch.empty(0)
    with torch.inference_mode():
        for m in loaded:
            chunks, ys = [], []
            for s in range(0, len(blocks), batch_size):
                batch = collate_eval([blocks[i] for i in range(s, min(s + batch_size, len(blocks)))])
                ids, mask = batch["input_ids"].to(device), batch["target_mask"].to(device)
                logits = m.model(ids, attention_mask=batch["attention_mask"].to(device)).logits
                chunks.append(logits[:, :-1][mask].float().cpu())
                ys.append(ids[:, 1:][mask].cpu())
            all_logits.append(torch.cat(chunks))
            targets = torch.cat(ys)
        probs = torch.stack([lg.softmax(-1) for lg in all_logits]).mean(0)
        accuracy = (probs.argmax(-1) == targets).double().mean().item()
        nll = -probs.gather(1, targets[:, None]).log().mean().item()
    assert 0 <= accuracy <= 1 and nll > 0
    return len(targets)


def worker(
    kind: str, members: list[str], data: str, batch_size: int, combiners: list[str], repeats: int
) -> dict:
    import gc

    import torch

    from ensemble.config.schema import DataConfig, EvalConfig
    from ensemble.core.architecture import context_length
    from ensemble.core.data import prepare_data
    from ensemble.core.loading import load_members
    from ensemble.evaluate.stream import Collect, evaluate_members

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_members([Path(m) for m in members], device)
    cfg = DataConfig(test_files=[data], txt_sample_by="paragraph")
    block_size = min(context_length(m.config) for m in loaded)
    blocks = prepare_data(cfg, loaded[0].tokenizer, block_size, splits=("test",)).eval_blocks("test")

    compiled = []

    def ours() -> int:
        eval_cfg = EvalConfig(
            per_device_batch_size=batch_size, combiners=combiners, uncertainty=kind != "ours-plain"
        )
        if kind != "ours-all":
            scorer = evaluate_members(loaded, blocks, eval_cfg, device, show_progress=False)
            compiled.append(scorer.compiled)
            return scorer.tokens
        from ensemble.evaluate.token_export import TokenWriter

        with tempfile.TemporaryDirectory() as tmp:
            names = [m.name for m in loaded]
            writer = TokenWriter(
                Path(tmp) / "t.parquet", names, loaded[0].tokenizer, loaded[0].config.vocab_size, 0, 1
            )
            scorer = evaluate_members(
                loaded,
                blocks,
                eval_cfg,
                device,
                collect=Collect(blocks=True, tokens=writer),
                show_progress=False,
            )
            writer.finish(-(-len(blocks) // batch_size))
            compiled.append(scorer.compiled)
            return scorer.tokens

    def naive() -> int:  # full logits of every member on the host, averaged at the end
        return naive_ensemble(loaded, blocks, batch_size, device)

    run = naive if kind == "naive" else ours
    gc.collect()
    _reset_peak()
    before = _held_bytes()
    times, peak, tokens = [], 0, 0
    for repeat in range(repeats):  # the first pass doubles as warm-up; the best pass is reported
        start = time.perf_counter()
        tokens = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if repeat == 0:
            peak = max(_peak_bytes() - before, 0)  # the memory of one evaluation
    seconds = min(times)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "eval_peak_bytes": peak,
        "compiled": all(compiled) if compiled else None,
    }


def run_worker(
    kind: str, members: list[Path], data: Path, args: argparse.Namespace, combiners: list[str]
) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--combiners", *combiners, "--members", *map(str, members)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _numbers(node: object, path: str = "") -> dict[str, float]:
    """Every finite number of a results document by its path (timestamps and paths aside)."""
    if isinstance(node, dict):
        return {
            k: v
            for key, value in node.items()
            if key not in ("created", "path")
            for k, v in _numbers(value, f"{path}.{key}").items()
        }
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in _numbers(value, f"{path}[{i}]").items()}
    if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
        return {path: float(node)}
    return {}


def compare_devices(members: list[Path], data: Path, devices: list[str], batch_size: int) -> None:
    """results.json's numbers from both devices: the largest relative difference per section."""
    from ensemble.config.schema import DataConfig, EvalConfig
    from ensemble.core.architecture import context_length
    from ensemble.core.data import prepare_data
    from ensemble.core.loading import load_members
    from ensemble.evaluate.context import Evaluation
    from ensemble.evaluate.sections import build_results
    from ensemble.evaluate.stream import Collect, evaluate_members
    from ensemble.runtime.sharding import Sharding

    results = {}
    for device in devices:
        loaded = load_members(members, device)
        blocks = prepare_data(
            DataConfig(test_files=[str(data)], txt_sample_by="paragraph"),
            loaded[0].tokenizer,
            min(context_length(m.config) for m in loaded),
            splits=("test",),
        ).eval_blocks("test")
        cfg = EvalConfig(
            per_device_batch_size=batch_size,
            combiners=["mean_prob", "mean_logit"],
            precision="float32",
            bootstrap_samples=0,
        )
        scorer = evaluate_members(
            loaded, blocks, cfg, device, collect=Collect(blocks=True), show_progress=False
        )
        ev = Evaluation(loaded, scorer, cfg, "test", blocks, {}, Sharding("data", 0, 1, len(loaded)), device)
        results[device] = build_results(ev)
        results[device]["compiled"] = scorer.compiled
    a, b = (_numbers(results[d]) for d in devices)
    print(
        f"{devices[0]} (scoring {'compiled' if results[devices[0]]['compiled'] else 'eager'}) against "
        f"{devices[1]} (scoring {'compiled' if results[devices[1]]['compiled'] else 'eager'}), "
        f"{results[devices[0]]['ensemble']['tokens']:,} tokens, float32 forward passes:"
    )
    worst: dict[str, tuple[float, str]] = {}
    for key in sorted(a.keys() & b.keys()):
        section = key.split(".")[1].split("[")[0]
        diff = abs(a[key] - b[key]) / max(abs(a[key]), 1e-3)
        if diff >= worst.get(section, (-1.0, ""))[0]:
            worst[section] = (diff, key)
    for section, (diff, key) in worst.items():
        print(f"  {section:<12} largest relative difference {diff:.2e}  ({key})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="run directory whose members to use (default: train small ones)")
    p.add_argument(
        "--size",
        choices=["trained", "gpt2", "tiny"],
        default="trained",
        help="without --run: small members trained here (trained), or 3 random GPT-2s with the "
        "GPT-2 tokenizer: small (gpt2) or 2 layers of 64 (tiny)",
    )
    p.add_argument(
        "--tokenizer",
        default=str(REPO.parent / "shared" / "data" / "gpt2-tokenizer"),
        help="the tokenizer of --size gpt2 members",
    )
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "sherlock_holmes.txt"))
    p.add_argument("--chars", type=int, default=60_000, help="size of the smaller test set, in characters")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="passes per measurement; the best is reported")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only the N-member rows with and without the uncertainty (and with every output)",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar="DEVICE",
        help="instead: evaluate the members on the 1x test set on both devices (float32 forward "
        "passes, each device's default scoring) and print the largest differences per section",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--members", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--combiners", nargs="*", default=["mean_prob"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(
            json.dumps(
                worker(args.worker, args.members, args.data, args.batch_size, args.combiners, args.repeats)
            )
        )
        return

    all_combiners = ["mean_prob", "mean_logit", "geometric"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else tmp / "run"
        if not args.run and args.size in ("gpt2", "tiny"):
            from generation import random_run

            random_run(run, args.size, 3, args.tokenizer)
        elif not args.run:
            print("training small members (configs/tiny.yaml, 50 steps each) ...", flush=True)
            subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.yaml", "train.max_steps=50",
                            "tracking.report_to=[none]", f"output.dir={run}"], cwd=REPO, check=True,
                           capture_output=True)  # fmt: skip
        members = sorted((run / "members").glob("member-*"))
        text = Path(args.text).read_text()
        files = {}
        for label, chars in {"1x": args.chars, "4x": 4 * args.chars}.items():
            files[label] = tmp / f"test-{label}.txt"
            files[label].write_text(text[:chars])
        if args.compare:
            compare_devices(members, files["1x"], args.compare, args.batch_size)
            return
        n = len(members)
        cost = {
            f"ours, {n} members, 3 combiners": ("ours", all_combiners),
            f"ours, {n} members, 3 combiners, no uncertainty": ("ours-plain", all_combiners),
            f"ours, {n} members, 3 combiners, every output": ("ours-all", all_combiners),
        }
        wanted = (
            cost
            if args.cost_only
            else {
                "ours, 1 member": ("ours", ["mean_prob"]),
                f"ours, {n} members, mean_prob": ("ours", ["mean_prob"]),
                **cost,
                f"naive, {n} members": ("naive", []),
            }
        )
        rows = {
            label: run_worker(
                kind, members[:1] if label == "ours, 1 member" else members, files["4x"], args, comb
            )
            for label, (kind, comb) in wanted.items()
        }
        memory = {
            (who, size): run_worker(who, members, files[size], args, all_combiners)["eval_peak_bytes"]
            for who in ("ours", "ours-all", "naive")
            for size in ("1x", "4x")
            if not args.cost_only
        }
    first = next(iter(rows.values()))
    print(f"\nthroughput on the 4x test set ({first['tokens']:,} tokens), best of {args.repeats}:")
    print(f"{'':<48} {'seconds':>8} {'tokens/s':>9}")
    for label, r in rows.items():
        note = {True: "  (scoring compiled)", False: "  (scoring eager)"}.get(r["compiled"], "")
        print(f"{label:<48} {r['seconds']:>8.2f} {r['tokens_per_s']:>9,.0f}{note}")
    full = rows[f"ours, {n} members, 3 combiners"]["tokens_per_s"]
    if "ours, 1 member" in rows:
        single = rows["ours, 1 member"]["tokens_per_s"]
        for label in (f"ours, {n} members, mean_prob", f"ours, {n} members, 3 combiners"):
            ratio = rows[label]["tokens_per_s"] / (single / n)
            print(f"{label}: tokens/s / (single-member tokens/s / {n}) = {ratio:.2f} (target >= 0.9)")
        print(
            f"ours ({n} members, 3 combiners) / naive tokens/s: {full / rows[f'naive, {n} members']['tokens_per_s']:.2f}"
        )
    plain = rows[f"ours, {n} members, 3 combiners, no uncertainty"]["tokens_per_s"]
    every = rows[f"ours, {n} members, 3 combiners, every output"]["tokens_per_s"]
    print(
        f"the uncertainty's cost: {100 * (1 - full / plain):.1f}% of the throughput without it (target <= 10%)"
    )
    print(f"with every output (--ood block sums, --tokens-out): {100 * (1 - every / plain):.1f}%")
    if memory:
        print("\nevaluation peak memory (one pass, above what the process held before it):")
        for who in ("ours", "ours-all", "naive"):
            small, big = memory[(who, "1x")] / 2**20, memory[(who, "4x")] / 2**20
            print(
                f"{who:<9} 1x {small:8.1f} MiB   4x {big:8.1f} MiB   (x{big / max(small, 1e-9):.2f})  {KINDS[who]}"
            )


if __name__ == "__main__":
    main()
