"""Speed on one device: our training and evaluation against what plain PyTorch reaches there.

Everything is measured in one run on one device (the GPU when there is one, else the CPU with
small sizes), so that only the ratios matter:

training, for the main model (GPT-2 small built from its config, block 1024, batch 16, the real
GPT-2 tokenizer, tinyshakespeare; `--size small`: 2 layers, 64 wide, block 128, batch 8) and for
configs/tiny.yaml:
  - minimal loop, eager: the same Hugging Face model and batch, AdamW (fused on CUDA), gradient
    clipping, TF32 and bf16 autocast on GPUs;
  - minimal loop, compiled: the same under torch.compile;
  - ours: `accelerate launch launch/train.py` training N members one after another (checkpoints
    and evaluation off), tokens/s of its logging windows from TensorBoard, each member's first
    window left out (it holds compilation and start-up); the median is reported.
evaluation, on the N members of the main model trained above:
  - bare bf16 forward: one member, bf16 autocast, float32 log-softmax, the targets' log-probs;
  - ours, 1 member and N members (default combiners, whose weights fit on a validation slice
    1/16 the size is included; eval.compile at its default, and on CUDA also the other way);
  - naive, N members: full logits of every member on the host, then averaged (on a smaller
    slice: it holds them all).
Each timing is the second of two passes (the first compiles and warms up).

    python benchmarks/gpu.py                        # sizes from the device
    python benchmarks/gpu.py --size small --steps 6 # what the test runs on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED = Path(os.environ.get("ENSEMBLE_SHARED_DATA", REPO.parent / "shared" / "data"))

SIZES = {
    "full": {
        "model": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
        "block": 1024, "batch": 16, "eval_batch": 64, "eval_tokens": 262_144, "naive_tokens": 16_384,
        "steps": 60, "warmup": 10, "logging": 5,
    },
    "small": {
        "model": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128},
        "block": 128, "batch": 8, "eval_batch": 16, "eval_tokens": 8_192, "naive_tokens": 4_096,
        "steps": 6, "warmup": 2, "logging": 2,
    },
}  # fmt: skip
TINY = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 128}  # configs/tiny.yaml's model
TINY_VOCAB, TINY_BLOCK, TINY_BATCH = 2048, 128, 16
TARGETS = {  # ratio name -> target (on a GPU)
    "training, main model: ours / minimal compiled": 0.9,
    "evaluation: ours N members / (ours 1 member / N)": 0.9,
    "evaluation: ours 1 member / bare bf16 forward": 0.7,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


# --------------------------------------------------------------------------------------------
# Training


def minimal_loop(
    model_kwargs: dict,
    vocab: int,
    block: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    compiled: bool,
    tokens: torch.Tensor,
) -> float:
    """Tokens/s of the shortest correct training loop for this model and batch."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from ensemble.runtime.compute import tf32

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, **model_kwargs)
    model = AutoModelForCausalLM.from_config(config).to(device).train()
    if compiled:
        model.compile()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_precision(device) == "bf16")
    n_batches = (len(tokens) - 1) // (block * batch)
    data = tokens[: n_batches * block * batch].view(n_batches, batch, block)
    if cuda:
        data = data.pin_memory()

    def step(i: int) -> None:
        x = data[i % n_batches].to(device, non_blocking=True)
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with tf32(True):
        for i in range(warmup):
            step(i)
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        _sync(device)
        return steps * batch * block / (time.perf_counter() - start)


def ours_training(overrides: list[str], out: Path, members: int, device: torch.device) -> dict:
    """Train N members through the real entry point; steady-state tokens/s from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launcher = "one-gpu" if device.type == "cuda" else "cpu"
    seeds = [42, 123, 456, 7, 8, 9, 10, 11][:members]
    cmd = [  # `accelerate launch` of this interpreter (GPU images may keep console scripts elsewhere)
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{launcher}.yaml",
        "launch/train.py",
        *overrides, f"members.seeds={seeds}", "checkpoint.every_steps=null", "checkpoint.at_epoch_end=false",
        "tracking.report_to=[tensorboard]", f"output.dir={out}", "--no-eval",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"our training failed:\n{proc.stderr[-4000:]}")
    windows = []
    for i in range(members):
        acc = EventAccumulator(str(out / "logs" / f"member-{i}"))
        acc.Reload()
        windows += [e.value for e in acc.Scalars("train/tokens_per_s")][1:]  # the first holds start-up
    info = json.loads((out / "members" / "member-0" / "member.json").read_text())["training"]
    return {
        "tokens_per_s": statistics.median(windows),
        "windows": len(windows),
        "compiled": info["compiled"],
        "first_step_seconds": info["first_step_seconds"],
        "wall_seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# Evaluation


def timed(fn, device: torch.device) -> tuple[int, float]:
    """(tokens, tokens/s) of the second of two calls."""
    fn()
    _sync(device)
    start = time.perf_counter()
    tokens = fn()
    _sync(device)
    return tokens, tokens / (time.perf_counter() - start)


def bare_forward(member, blocks, batch_size: int, device: torch.device) -> int:
    """One member's bf16 forward and float32 log-softmax of every position, nothing else."""
    from ensemble.core.data import collate_eval

    total = torch.zeros((), device=device)
    tokens = 0
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        for s in range(0, len(blocks), batch_size):
            batch = collate_eval([blocks[i] for i in range(s, min(s + batch_size, len(blocks)))])
            ids, mask = batch["input_ids"].to(device), batch["target_mask"].to(device)
            logits = member.model(ids, attention_mask=batch["attention_mask"].to(device)).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            total += logp.gather(2, ids[:, 1:, None]).squeeze(2)[mask].sum()
            tokens += int(mask.sum())
    assert torch.isfinite(total)
    return tokens


def evaluation(run: Path, text: Path, size: dict, device: torch.device) -> dict:
    from evaluation import naive_ensemble

    from ensemble.config.schema import DataConfig, EvalConfig
    from ensemble.core.data import EvalBlocks, prepare_data
    from ensemble.core.loading import load_members
    from ensemble.core.members import find_members
    from ensemble.evaluate.stream import evaluate_members

    members = load_members(find_members(run), device)
    n = len(members)
    stream = prepare_data(
        DataConfig(test_files=[str(text)]), members[0].tokenizer, size["block"], splits=("test",)
    ).streams["test"]
    fit_tokens = size["eval_tokens"] // 16
    blocks = EvalBlocks(stream[: size["eval_tokens"]], size["block"])
    fit = EvalBlocks(stream[size["eval_tokens"] : size["eval_tokens"] + fit_tokens], size["block"])
    naive_blocks = EvalBlocks(stream[: size["naive_tokens"]], size["block"])
    eb = size["eval_batch"]

    def ours(which: list, compile_setting: bool | str = "auto"):
        cfg = EvalConfig(per_device_batch_size=eb, compile=compile_setting)
        return lambda: evaluate_members(which, blocks, cfg, device, fit=fit, show_progress=False).tokens

    rows = {
        "bare bf16 forward, 1 member": timed(lambda: bare_forward(members[0], blocks, eb, device), device),
        "ours, 1 member": timed(ours(members[:1]), device),
        f"ours, {n} members": timed(ours(members), device),
    }
    if device.type == "cuda":  # the default compiles the scoring on CUDA: also show it eager
        rows["ours, 1 member, eval.compile=false"] = timed(ours(members[:1], False), device)
        rows[f"ours, {n} members, eval.compile=false"] = timed(ours(members, False), device)
    rows[f"naive, {n} members"] = timed(lambda: naive_ensemble(members, naive_blocks, eb, device), device)
    return {label: {"tokens": t, "tokens_per_s": r} for label, (t, r) in rows.items()}


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size",
        choices=["full", "small", "auto"],
        default="auto",
        help="full: GPT-2 small (auto on a GPU); small: a 2-layer stand-in (auto on CPU)",
    )
    p.add_argument("--steps", type=int, help="measured steps of the minimal loops, and our steps per member")
    p.add_argument("--members", type=int, default=3)
    p.add_argument(
        "--eval-tokens",
        type=int,
        help="tokens of the evaluation section (default: the size's; the naive "
        "baseline holds every logit, so it scores at most half of them)",
    )
    p.add_argument("--text", default=str(SHARED / "tinyshakespeare.txt"))
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from ensemble.runtime.throughput import flops_per_token, peak_tflops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size_name = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "small")
    size = dict(SIZES[size_name])
    if args.eval_tokens:
        size["eval_tokens"] = args.eval_tokens
        size["naive_tokens"] = min(size["naive_tokens"], args.eval_tokens // 2)
    steps = args.steps or size["steps"]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    precision = _precision(device)
    peak, peak_source = peak_tflops(device, precision, None)
    print(
        f"device: {name}; training precision {precision}; peak {peak:.4g} TFLOP/s ({peak_source})", flush=True
    )

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    text = Path(args.text)
    gpt2_tokens = torch.tensor(tokenizer(text.read_text())["input_ids"], dtype=torch.long)
    vocab = len(tokenizer)
    from transformers import GPT2Config

    models = {
        "main": (size["model"], vocab, size["block"], size["batch"], gpt2_tokens),
        "tiny": (TINY, TINY_VOCAB, TINY_BLOCK, TINY_BATCH, gpt2_tokens % TINY_VOCAB),
    }
    figures: dict = {
        "device": name,
        "size": size_name,
        "precision": precision,
        "training": {},
        "evaluation": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, (kwargs, v, block, batch, tokens) in models.items():
            fpt = flops_per_token(GPT2Config(vocab_size=v, **kwargs), block)
            rows = {}
            for compiled in (False, True):
                print(
                    f"training {label}: minimal loop, {'compiled' if compiled else 'eager'} ...", flush=True
                )
                rows[f"minimal, {'compiled' if compiled else 'eager'}"] = {
                    "tokens_per_s": minimal_loop(
                        kwargs, v, block, batch, steps, size["warmup"], device, compiled, tokens
                    )
                }
            print(f"training {label}: ours ({args.members} members) ...", flush=True)
            if label == "main":
                overrides = [
                    f"model.gpt2_config={json.dumps(kwargs)}", f"model.tokenizer={args.tokenizer}",
                    f"data.train_files=[{text}]", "data.txt_sample_by=paragraph", f"data.block_size={block}",
                    f"train.per_device_batch_size={batch}",
                ]  # fmt: skip
            else:
                overrides = ["--config", "configs/tiny.yaml"]
            overrides += [
                f"train.max_steps={size['warmup'] + steps}",
                f"train.logging_steps={size['logging']}",
            ]
            rows["ours"] = ours_training(overrides, tmp / label, args.members, device)
            for row in rows.values():
                row["mfu"] = fpt * row["tokens_per_s"] / (peak * 1e12) if peak else None
            figures["training"][label] = rows
        print("evaluation ...", flush=True)
        figures["evaluation"] = evaluation(tmp / "main", text, size, device)

    t, e, n = figures["training"], figures["evaluation"], args.members
    ratios = {
        "training, main model: ours / minimal compiled": t["main"]["ours"]["tokens_per_s"]
        / t["main"]["minimal, compiled"]["tokens_per_s"],
        "training, main model: ours / minimal eager": t["main"]["ours"]["tokens_per_s"]
        / t["main"]["minimal, eager"]["tokens_per_s"],
        "training, tiny: ours / minimal compiled": t["tiny"]["ours"]["tokens_per_s"]
        / t["tiny"]["minimal, compiled"]["tokens_per_s"],
        "evaluation: ours N members / (ours 1 member / N)": e[f"ours, {n} members"]["tokens_per_s"]
        / (e["ours, 1 member"]["tokens_per_s"] / n),
        "evaluation: ours 1 member / bare bf16 forward": e["ours, 1 member"]["tokens_per_s"]
        / e["bare bf16 forward, 1 member"]["tokens_per_s"],
        "evaluation: ours N members / naive N members": e[f"ours, {n} members"]["tokens_per_s"]
        / e[f"naive, {n} members"]["tokens_per_s"],
    }
    figures["ratios"] = ratios

    print(f"\n## Training (tokens/s, MFU of {peak:.4g} TFLOP/s)\n")
    print("| model | loop | tokens/s | MFU |\n| --- | --- | ---: | ---: |")
    for label, rows in t.items():
        for loop, row in rows.items():
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "?"
            print(f"| {label} | {loop} | {row['tokens_per_s']:,.0f} | {mfu} |")
    print("\n## Evaluation (tokens/s)\n")
    print("| what | tokens | tokens/s |\n| --- | ---: | ---: |")
    for label, row in e.items():
        print(f"| {label} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} |")
    print(f"\n## Ratios (targets are for a GPU; this ran on {name})\n")
    for label, value in ratios.items():
        target = TARGETS.get(label)
        verdict = f"target >= {target}: {'met' if value >= target else 'NOT met'}" if target else "no target"
        print(f"- {label}: {value:.2f} ({verdict})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
