"""Generation throughput of the ensemble against its members, in one run on one device.

For batch 1 and batch 8 (greedy, a fixed number of new tokens, no early stop):
- one member: tokens/s of a member's own `generate` (transformers, its own KV cache), the
  mean over the members;
- ensemble: tokens/s of `EnsembleForCausalLM.generate` (N members, one KV cache each, the
  mixture of their distributions at every step);
- ratio: ensemble tokens/s / (one member's tokens/s / N): 1.0 means the ensemble costs exactly
  N member generations (target >= 0.9);
- no cache: the ensemble recomputing every prefix from scratch (`use_cache=False`); the
  KV-cache speedup is ensemble tokens/s / this.

    python benchmarks/generation.py                    # GPT-2 small members (random weights)
    python benchmarks/generation.py --run runs/tiny    # a run's members
Members are random when no run is given: speed does not depend on the weights, and nothing is
downloaded. GPU: bfloat16 weights; CPU: float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

SIZES = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024),  # GPT-2 small, 124M
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, n_positions=256),
}


def random_run(root: Path, size: str, members: int, tokenizer_dir: str) -> Path:
    """A run directory of ``members`` random GPT-2 members of ``size`` (also used by
    benchmarks/evaluation.py)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ensemble.config.schema import ExperimentConfig
    from ensemble.core.members import MemberSpec, save_member

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for i in range(members):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **SIZES[size]))
        save_member(
            root / "members" / f"member-{i}", model, tokenizer, MemberSpec(i, i), ExperimentConfig(), {}
        )
    return root


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tokens_per_s(
    model: torch.nn.Module, inputs: dict, new: int, repeats: int, warm_up: bool = True, **kwargs
) -> float:
    """New tokens per second of ``model.generate`` (the median of ``repeats`` timed runs)."""
    if warm_up:
        model.generate(**inputs, **kwargs)  # allocator, kernels
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        model.generate(**inputs, **kwargs)
        _sync()
        times.append(time.perf_counter() - start)
    return len(inputs["input_ids"]) * new / statistics.median(times)


def measure(run: Path, prompt_tokens: int, new: int, batches: list[int], repeats: int, dtype: str) -> dict:
    from ensemble.generate.model import load_ensemble

    ensemble, tokenizer = load_ensemble(run, dtype=dtype)
    n = len(ensemble.members)
    device = ensemble.device
    generator = torch.Generator().manual_seed(0)
    figures: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)",
        "members": n,
        "dtype": str(next(ensemble.members[0].parameters()).dtype).removeprefix("torch."),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new,
        "rows": {},
    }
    fixed = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    for batch in batches:
        ids = torch.randint(0, len(tokenizer), (batch, prompt_tokens), generator=generator).to(device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.inference_mode():
            single = statistics.mean(
                _tokens_per_s(m, inputs, new, repeats, **fixed) for m in ensemble.members
            )
            ours = _tokens_per_s(ensemble, inputs, new, repeats, **fixed)
            # Recomputing is slow (the point); one run, the cached runs of the same model warmed up
            no_cache = _tokens_per_s(ensemble, inputs, new, 1, warm_up=False, use_cache=False, **fixed)
        figures["rows"][batch] = {
            "one_member_tokens_per_s": single,
            "ensemble_tokens_per_s": ours,
            "ratio_to_one_member_over_n": ours / (single / n),
            "no_cache_tokens_per_s": no_cache,
            "kv_cache_speedup": ours / no_cache,
        }
    return figures


def check(run: Path, devices: list[str], steps: int = 8) -> dict:
    """Correctness on this device, before any timing (float32 members): the logits of every step
    of a cached greedy generation against the ensemble recomputed without any cache, and the
    same tokens with the members spread over ``devices`` (one per member, e.g. cuda:0 cpu
    cuda:0) as with all on the first."""
    from ensemble.generate.model import load_ensemble

    together, tokenizer = load_ensemble(run, devices=devices[0], dtype="float32")
    spread, _ = load_ensemble(run, devices=devices, dtype="float32")
    ids = tokenizer(["The history of the world is"] * 2, return_tensors="pt").to(together.device)
    kwargs = dict(max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        out = together.generate(**ids, **kwargs)
        length = ids["input_ids"].shape[1]
        diff = max(
            float(
                (logits - together(out.sequences[:, : length + t], use_cache=False).logits[:, -1]).abs().max()
            )
            for t, logits in enumerate(out.logits)
        )
        other = spread.generate(**ids, **kwargs)
    return {
        "devices": devices,
        "max_abs_diff_cached_vs_recomputed": diff,
        "spread_same_tokens": bool(torch.equal(out.sequences.cpu(), other.sequences.cpu())),
        "max_abs_diff_spread_vs_together": max(
            float((a.cpu() - b.cpu()).abs().max()) for a, b in zip(out.logits, other.logits, strict=True)
        ),
    }


def table(f: dict) -> str:
    lines = [
        f"Generation on {f['device']}, {f['members']} members ({f['dtype']}), prompt {f['prompt_tokens']} "
        f"tokens, {f['new_tokens']} new tokens, greedy:",
        "",
        "| Batch | One member (tokens/s) | Ensemble (tokens/s) | Ensemble / (member / N) | No cache (tokens/s) | KV-cache speedup |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch, r in f["rows"].items():
        lines.append(
            f"| {batch} | {r['one_member_tokens_per_s']:,.1f} | {r['ensemble_tokens_per_s']:,.1f} | "
            f"{r['ratio_to_one_member_over_n']:.2f} | {r['no_cache_tokens_per_s']:,.1f} | {r['kv_cache_speedup']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="a run directory (default: random members of --size)")
    p.add_argument("--size", choices=list(SIZES), default="gpt2")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument(
        "--check",
        nargs="+",
        metavar="DEVICE",
        help="first check correctness with the members on these devices, one per member (e.g. cuda:0 cpu cuda:0)",
    )
    args = p.parse_args()
    dtype = "auto"  # bfloat16 on a GPU, float32 on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or random_run(Path(tmp) / "run", args.size, args.members, args.tokenizer)
        checked = check(run, args.check) if args.check else None
        if checked:
            print(json.dumps(checked))
        figures = measure(run, args.prompt_tokens, args.new_tokens, args.batches, args.repeats, dtype)
    figures["size"] = "run" if args.run else args.size
    figures["check"] = checked
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
