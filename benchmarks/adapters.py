"""Adapter members against full members, in one run on one device: memory and forward speed.

For N adapter members (LoRA, `adapter.r`) on one base of `--size` (random weights: speed and
memory do not depend on them):
- memory: the bytes of parameters and buffers a process holds for the N members loaded as the
  evaluator loads them (one base, N adapters beside it), against one full member, and against
  the N full members (the adapters merged) loaded the same way (target for N = 3: <= 1.2x one
  member);
- speed: member-tokens/s of the evaluator's forward (the body, then the head) for one full
  member; for the N adapter members one after another (each through its own view); and for
  the N in one forward pass (the batch repeated once per member, each copy through its own
  adapter: our grouped LoRA layer, what the evaluator runs, `core.adapters.batched_hidden_states`;
  and PEFT's mixed-batch forward, `adapter_names`). ratio = one-pass member-tokens/s / one
  member's tokens/s (1.0: N adapter members cost N members; target >= 0.9);
- training: N adapter members against N full fine-tunes of the same base, each set in one
  process through the real entry point (`launch/train.py`, `--train-steps` steps per member, no
  checkpoints or evaluation): wall seconds, the members' own training seconds, the process's
  peak resident memory (on a GPU: host memory only) and a member's size on disk.

    python benchmarks/adapters.py                      # GPT-2 small base, N = 3 and 8
    python benchmarks/adapters.py --size tiny --members 3 --batches 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.generation import SHARED, SIZES  # noqa: E402


def save_base(root: Path, size: str, tokenizer_dir: str) -> Path:
    """A GPT-2 of ``size`` with random weights and the tokenizer, in Hugging Face format."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base_dir = root / "base"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **SIZES[size])).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return base_dir


def adapter_run(root: Path, size: str, members: int, r: int, tokenizer_dir: str) -> list[Path]:
    """A base of ``size`` and ``members`` adapter member directories on it (B drawn at random,
    so that every adapter changes the model, as a trained one does)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from ensemble.config.schema import AdapterConfig, ExperimentConfig, ModelConfig
    from ensemble.core.adapters import attach_adapter, base_record
    from ensemble.core.members import MemberSpec, save_member

    base_dir = save_base(root, size, tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapter = AdapterConfig("lora", r=r)
    cfg = ExperimentConfig(model=ModelConfig(name_or_path=str(base_dir)), adapter=adapter)
    record = {"base": base_record(str(base_dir))}
    paths = []
    for i in range(members):
        model = attach_adapter(GPT2LMHeadModel.from_pretrained(base_dir), adapter, i, str(base_dir))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        paths.append(root / "members" / f"member-{i}")
        save_member(paths[-1], model, tokenizer, MemberSpec(i, i), cfg, record)
    return paths


def held_bytes(members: list) -> int:
    """Bytes of the distinct parameters and buffers of the members' models."""
    seen = {}
    for m in members:
        for t in [*m.model.parameters(), *m.model.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def member_tokens_per_s(parts: dict, ids: torch.Tensor, batches: int, mode: str) -> float:
    """Member-tokens/s of the evaluator's forward for ``parts`` (a ChunkedHead per member), the
    members' bodies run one after another (``apart``) or in one pass (``grouped``: our grouped
    LoRA layer, what the evaluator runs; ``peft``: PEFT's mixed-batch forward)."""
    from ensemble.core.adapters import batched_hidden_states
    from ensemble.core.heads import autocast

    mask = torch.ones_like(ids)
    first = next(iter(parts.values()))

    def bodies() -> dict:
        if mode == "apart":
            return {i: p.hidden_states(ids, mask) for i, p in parts.items()}
        with autocast(first.precision, first.device):
            views = [p.model for p in parts.values()]
            states = batched_hidden_states(views, ids, mask, grouped=mode == "grouped")
        return dict(zip(parts, states, strict=True))

    def step() -> None:
        for i, h in bodies().items():
            flat = h.reshape(-1, h.shape[-1])
            for span in parts[i].spans(len(flat)):
                parts[i].logits(flat[span])

    device = ids.device
    with torch.inference_mode():
        step()  # warm-up
        _sync(device)
        started = time.perf_counter()
        for _ in range(batches):
            step()
        _sync(device)
    return len(parts) * batches * ids.numel() / (time.perf_counter() - started)


def training(root: Path, base_dir: Path, n: int, args: argparse.Namespace, adapter: bool) -> dict:
    """Train ``n`` members on ``base_dir`` in one process, as LoRA adapters or full fine-tunes."""
    out = root / ("adapters" if adapter else "full")
    cmd = [
        sys.executable, "launch/train.py", f"model.name_or_path={base_dir}", "model.gpt2_config={}",
        "model.tokenizer=null", "data.dataset=builtin:python-docs", f"data.block_size={args.block}",
        f"data.cache_dir={root / 'datasets'}", f"members.seeds={list(range(n))}",
        f"train.max_steps={args.train_steps}", f"train.per_device_batch_size={args.batch}",
        f"train.logging_steps={args.train_steps}", "checkpoint.every_steps=null", "checkpoint.at_epoch_end=false",
        "tracking.report_to=[none]", f"output.dir={out}", "--no-eval",
        *(["adapter.method=lora", f"adapter.r={args.r}"] if adapter else []),
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"training failed:\n{proc.stderr.read()[-4000:]}")
    members = sorted((out / "members").glob("member-*"))
    seconds = [json.loads((m / "member.json").read_text())["training"]["seconds"] for m in members]
    return {
        "wall_seconds": round(wall, 1),
        "members_training_seconds": round(sum(seconds), 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # KiB on Linux
        "member_disk_mib": round(sum(f.stat().st_size for f in members[0].rglob("*")) / 2**20, 2),
    }


def measure(root: Path, args: argparse.Namespace, n: int, device: torch.device) -> dict:
    from ensemble.core.adapters import save_merged
    from ensemble.core.heads import ChunkedHead
    from ensemble.core.loading import load_members

    paths = adapter_run(root / f"n{n}", args.size, n, args.r, str(args.tokenizer))
    merged = []
    for p in paths:
        merged.append(p.parent.parent / "merged" / p.name)
        save_merged(p, merged[-1])
    precision = "bfloat16" if device.type == "cuda" else "float32"

    def heads(members: list) -> dict:
        return {i: ChunkedHead.of(m.model, 4096, precision, device) for i, m in enumerate(members)}

    adapters = load_members(paths, device)
    adapter_bytes = held_bytes(adapters)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, adapters[0].config.vocab_size, (args.batch, args.block), generator=g).to(device)
    sequential = member_tokens_per_s(heads(adapters), ids, args.batches, "apart")
    one_pass = member_tokens_per_s(heads(adapters), ids, args.batches, "grouped")
    peft_pass = member_tokens_per_s(heads(adapters), ids, args.batches, "peft")
    del adapters
    full = load_members(merged, device)
    full_bytes = held_bytes(full)
    one_member_bytes = held_bytes(full[:1])
    single = member_tokens_per_s(heads(full[:1]), ids, args.batches, "apart")
    return {
        "members": n,
        "memory": {
            "adapters_bytes": adapter_bytes,
            "one_full_member_bytes": one_member_bytes,
            "full_members_bytes": full_bytes,
            "adapters_vs_one_member": round(adapter_bytes / one_member_bytes, 3),
            "full_vs_one_member": round(full_bytes / one_member_bytes, 3),
        },
        "member_tokens_per_s": {
            "one_full_member": round(single, 1),
            "adapters_one_after_another": round(sequential, 1),
            "adapters_one_pass": round(one_pass, 1),
            "adapters_one_pass_peft_mixed_batch": round(peft_pass, 1),
        },
        "one_pass_ratio": round(one_pass / single, 3),
        "one_after_another_ratio": round(sequential / single, 3),
        "peft_mixed_batch_ratio": round(peft_pass / single, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2")
    p.add_argument("--members", type=int, nargs="+", default=[3, 8])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batches", type=int, default=5, help="timed batches (after one warm-up)")
    p.add_argument("--train-members", type=int, default=3, help="N for the training comparison (0: none)")
    p.add_argument("--train-steps", type=int, default=10, help="optimizer steps per trained member")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "gpt2-tokenizer")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(Path(tmp), args, n, device) for n in args.members]
        train = {}
        if args.train_members:
            base_dir = save_base(Path(tmp) / "train", args.size, str(args.tokenizer))
            for kind, adapter in (("adapters", True), ("full", False)):
                train[kind] = training(Path(tmp) / "train", base_dir, args.train_members, args, adapter)
    report = {
        "device": name,
        "size": args.size,
        "r": args.r,
        "batch": args.batch,
        "block": args.block,
        "rows": rows,
        "training": {"members": args.train_members, "steps": args.train_steps, **train},
    }
    print(f"{name}, GPT-2 {args.size} base, LoRA r={args.r}, batch {args.batch} x {args.block} tokens")
    print(
        "| N | memory vs one member: adapters | full members | member-tokens/s: one member | "
        "adapters one after another | one pass (grouped) | one pass (PEFT mixed batch) | "
        "ratio: one after another | grouped | PEFT |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        m, t = row["memory"], row["member_tokens_per_s"]
        print(
            f"| {row['members']} | {m['adapters_vs_one_member']}x | {m['full_vs_one_member']}x | "
            f"{t['one_full_member']:,.0f} | {t['adapters_one_after_another']:,.0f} | "
            f"{t['adapters_one_pass']:,.0f} | {t['adapters_one_pass_peft_mixed_batch']:,.0f} | "
            f"{row['one_after_another_ratio']} | {row['one_pass_ratio']} | {row['peft_mixed_batch_ratio']} |"
        )
    if train:
        print(f"\nTraining {args.train_members} members, {args.train_steps} steps each, in one process")
        print("| Members | wall s | members' training s | peak RSS MiB | a member on disk MiB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for kind, t in train.items():
            print(
                f"| {kind} | {t['wall_seconds']} | {t['members_training_seconds']} | "
                f"{t['peak_rss_mib']:,} | {t['member_disk_mib']} |"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
