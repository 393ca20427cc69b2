"""The GPU benchmark runs on CPU at small sizes and reports every figure (its speed is not tested)."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO

pytestmark = pytest.mark.slow


def test_gpu_benchmark_reports_every_figure_and_ratio(tmp_path, shared_data: Path):
    out = tmp_path / "figures.json"
    cmd = [PYTHON, "benchmarks/gpu.py", "--size", "small", "--steps", "2", "--members", "2", "--eval-tokens", "2048", "--json", str(out),
           "--text", str(shared_data / "tinyshakespeare.txt"), "--tokenizer", str(shared_data / "gpt2-tokenizer")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["size"] == "small" and figures["device"].startswith("CPU")

    training = figures["training"]
    assert set(training) == {"main", "tiny"}
    for model, rows in training.items():
        assert set(rows) == {"minimal, eager", "minimal, compiled", "ours"}
        for loop, row in rows.items():
            assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1, (model, loop)
            assert (
                f"| {model} | {loop} | {row['tokens_per_s']:,.0f} | {100 * row['mfu']:.1f}% |" in proc.stdout
            )
        assert rows["ours"]["windows"] >= 2  # steady-state windows, the start-up ones left out
        assert rows["ours"]["compiled"] is False  # train.compile=auto: off on CPU

    evaluation = figures["evaluation"]
    assert set(evaluation) == {
        "bare bf16 forward, 1 member",
        "ours, 1 member",
        "ours, 2 members",
        "naive, 2 members",
    }
    tokens = evaluation["ours, 1 member"]["tokens"]
    assert (
        tokens > 0
        and evaluation["ours, 2 members"]["tokens"]
        == evaluation["bare bf16 forward, 1 member"]["tokens"]
        == tokens
    )
    assert 0 < evaluation["naive, 2 members"]["tokens"] < tokens  # a smaller slice: it holds every logit
    for label, row in evaluation.items():
        assert f"| {label} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} |" in proc.stdout

    ratios = figures["ratios"]
    expected = {
        "training, main model: ours / minimal compiled": training["main"]["ours"]["tokens_per_s"]
        / training["main"]["minimal, compiled"]["tokens_per_s"],
        "evaluation: ours N members / (ours 1 member / N)": evaluation["ours, 2 members"]["tokens_per_s"]
        / (evaluation["ours, 1 member"]["tokens_per_s"] / 2),
        "evaluation: ours 1 member / bare bf16 forward": evaluation["ours, 1 member"]["tokens_per_s"]
        / evaluation["bare bf16 forward, 1 member"]["tokens_per_s"],
    }
    for label, value in expected.items():
        assert math.isclose(ratios[label], value, rel_tol=1e-9), label
    printed = dict(re.findall(r"^- (.+?): (\d+\.\d\d) \(", proc.stdout, flags=re.M))
    assert set(printed) == set(ratios)
    for label, target in (
        ("training, main model: ours / minimal compiled", 0.9),
        ("evaluation: ours N members / (ours 1 member / N)", 0.9),
        ("evaluation: ours 1 member / bare bf16 forward", 0.7),
    ):
        verdict = "met" if ratios[label] >= target else "NOT met"
        assert f"- {label}: {ratios[label]:.2f} (target >= {target}: {verdict})" in proc.stdout


def test_adapter_benchmark_reports_memory_and_speed(tmp_path, shared_data: Path):
    out = tmp_path / "adapters.json"
    cmd = [PYTHON, "benchmarks/adapters.py", "--size", "tiny", "--members", "2", "3", "--batches", "1",
           "--batch", "2", "--block", "64", "--train-members", "2", "--train-steps", "2",
           "--tokenizer", str(shared_data / "gpt2-tokenizer"), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert [row["members"] for row in figures["rows"]] == [2, 3]
    for row in figures["rows"]:
        m, n = row["memory"], row["members"]
        assert m["full_members_bytes"] == n * m["one_full_member_bytes"]  # N full copies
        assert m["one_full_member_bytes"] < m["adapters_bytes"] < 1.2 * m["one_full_member_bytes"]
        assert all(v > 0 for v in row["member_tokens_per_s"].values())
        assert f"| {n} | {m['adapters_vs_one_member']}x | {m['full_vs_one_member']}x |" in proc.stdout
    train = figures["training"]
    assert train["members"] == 2
    assert train["adapters"]["member_disk_mib"] < train["full"]["member_disk_mib"]  # an adapter, not a model
    for kind in ("adapters", "full"):
        t = train[kind]
        assert 0 < t["members_training_seconds"] < t["wall_seconds"] and t["peak_rss_mib"] > 0
        assert f"| {kind} | {t['wall_seconds']} | {t['members_training_seconds']} |" in proc.stdout


def test_the_finetune_regime_study_evaluates_base_members_ensemble_soup_and_student(tmp_path):
    out = tmp_path / "regime.json"
    cmd = [PYTHON, "benchmarks/finetune_regime.py", "--root", str(tmp_path / "runs"),
           "--base-set", "model.gpt2_config={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 128}", "train.max_steps=10",
           "--set", "train.max_steps=4", "eval.bootstrap_samples=20", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    every = json.loads(out.read_text())
    assert len({every[k]["data"]["sha256"] for k in ("base", "full", "lora")}) == 1  # the same test blocks
    for regime in ("full", "lora"):
        results = every[regime]
        assert len(results["members"]) == 3 and "nll" in results["soup"] and "nll" in results["student"]
        for name in ("soup", "student"):
            kept = results[name]["gain_kept"]
            assert kept["nll_vs_ensemble"] == pytest.approx(results[name]["nll"] - results["ensemble"]["nll"])
            assert f"| {name} | {results[name]['nll']:.4f} |" in proc.stdout
        assert f"**{regime}** ({results['data']['tokens_evaluated']:,} test tokens)" in proc.stdout
    assert proc.stdout.count(f"| base (not fine-tuned) | {every['base']['members'][0]['nll']:.4f} |") == 2
