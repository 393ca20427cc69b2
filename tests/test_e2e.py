"""End to end through the real launcher: `accelerate launch launch/train.py`, then evaluate.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from . import wandb_records
from .conftest import PYTHON, REPO, scored_tokens

pytestmark = pytest.mark.slow

SEEDS = [42, 123, 456]
STEPS, LOGGING_STEPS = 150, 25  # the shipped default on a smaller budget


def _accelerate_cpu_config(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "NO",
                "num_machines": 1,
                "num_processes": 1,
                "machine_rank": 0,
                "mixed_precision": "no",
                "use_cpu": True,
            }
        )
    )
    return path


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, datasets_cache) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    out = root / "run"
    accelerate_bin = Path(PYTHON).with_name("accelerate")
    _run(
        [
            str(accelerate_bin),
            "launch",
            "--config_file",
            str(_accelerate_cpu_config(root / "cpu.yaml")),
            "launch/train.py",
            "--config",
            "configs/tiny.yaml",
            f"data.cache_dir={datasets_cache}",
            f"train.max_steps={STEPS}",
            f"train.logging_steps={LOGGING_STEPS}",
            "tracking.report_to=[tensorboard]",
            f"output.dir={out}",
        ]
    )
    return out


def test_members_exist_and_load_with_auto_classes(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for i, seed in enumerate(SEEDS):
        d = run_dir / "members" / f"member-{i}"
        assert (d / "model.safetensors").is_file()
        info = json.loads((d / "member.json").read_text())
        assert (info["index"], info["seed"]) == (i, seed)
        assert info["training"]["steps"] == STEPS
        saved_cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert saved_cfg["members"]["seeds"] == SEEDS
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.vocab_size == len(tok) == 2048  # the run's trained BPE
        assert model.config.n_layer == 2
        assert tok.get_vocab() == AutoTokenizer.from_pretrained(run_dir / "tokenizer").get_vocab()
    assert not [p for p in (run_dir / "members").iterdir() if p.name.startswith(".")]


def test_manifest_records_members_data_and_versions(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(m["seed"], m["status"]) for m in manifest["members"]] == [(s, "complete") for s in SEEDS]
    splits = manifest["data_fingerprint"]["splits"]
    assert set(splits) == {"train", "validation", "test"}
    assert all(len(s["sha256"]) == 64 and s["tokens"] > 0 for s in splits.values())
    assert {"torch", "transformers", "accelerate", "datasets"} <= set(manifest["versions"])
    env = manifest["environment"]
    assert env["cpu"] and env["torch_threads"] >= 1
    # CI installs with -c constraints.txt: the run must say it matches the lock
    assert env["lock"] == "matches constraints.txt", env["lock"]


def test_results_are_sane(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    data = results["data"]
    expected_tokens = scored_tokens(data)
    rows = results["members"] + [results["ensemble"]]
    assert [m["seed"] for m in results["members"]] == SEEDS
    for r in rows:
        assert r["tokens"] == expected_tokens
        assert 0.03 < r["accuracy"] <= r["top5_accuracy"] <= 1.0  # chance is 1/2048
        assert r["perplexity"] == pytest.approx(math.exp(r["nll"]))
        assert 0 < r["nll"] < math.log(2048) - 1  # far better than uniform
    mean_member_nll = sum(m["nll"] for m in results["members"]) / len(SEEDS)
    assert results["ensemble"]["nll"] <= mean_member_nll  # a mixture never loses to its average member
    table = (run_dir / "results.md").read_text()
    for i, seed in enumerate(SEEDS):
        assert f"| member-{i} (seed {seed}) |" in table
    assert "| **Ensemble** (mean probability) |" in table
    for combiner in ("(mean logit)", "(geometric mean)", "(fitted weights)"):
        assert f"| Ensemble {combiner}" in table
    for plot in ("ensemble_size.png", "reliability.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_ensemble_model_scores_the_test_split_as_results_json_and_generates(run_dir, tmp_path):
    """`EnsembleForCausalLM` loaded from the run, with the temperatures and weights its evaluation
    fitted: its NLL over the test blocks is the one in results.json, and launch/generate.py
    continues a prompt with it."""
    import torch

    from ensemble.config.loading import config_from_dict
    from ensemble.core.data import prepare_data
    from ensemble.generate.model import load_ensemble

    results = json.loads((run_dir / "results.json").read_text())
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    for combiner in ("mean_prob", "weighted"):
        model, tokenizer = load_ensemble(run_dir, combiner=combiner)
        blocks = prepare_data(cfg.data, tokenizer, cfg.data.block_size, splits=("test",)).eval_blocks("test")
        with torch.no_grad():
            total = sum(
                float(model(b[None], labels=b[None], use_cache=False).loss) * (len(b) - 1)
                for b in (blocks[i] for i in range(len(blocks)))
                if len(b) > 1  # the last block may be one token: nothing to predict
            )
        assert total / blocks.num_predictions == pytest.approx(
            results["combiners"][combiner]["nll"], rel=1e-5
        )

    out = tmp_path / "generated.jsonl"
    proc = _run([PYTHON, "launch/generate.py", str(run_dir), "--prompt", "The list", "--max-new-tokens", "12",
                 "--show-uncertainty", "--output", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    assert len(record["tokens"]) == 12 and record["continuation"]
    assert proc.stdout.startswith("The list[") and "epistemic uncertainty" in proc.stdout


def test_tensorboard_recorded_each_members_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for i in range(len(SEEDS)):
        acc = EventAccumulator(str(run_dir / "logs" / f"member-{i}"))
        acc.Reload()
        for tag in ("train/loss", "train/lr", "train/tokens_per_s"):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS)), tag
            assert all(math.isfinite(e.value) for e in events)


def test_evaluate_reproduces_results_and_never_clobbers_them(run_dir, sherlock, tmp_path):
    before = json.loads((run_dir / "results.json").read_text())
    _run([PYTHON, "launch/evaluate.py", str(run_dir), "--output", str(run_dir / "again")])
    again = json.loads((run_dir / "again" / "results.json").read_text())
    for a, b in zip(
        before["members"] + [before["ensemble"]], again["members"] + [again["ensemble"]], strict=True
    ):
        for key in ("accuracy", "top5_accuracy", "nll", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-9), key

    # an override after a list option (--data) is still an override; a fifth of the book, to be quick
    excerpt = tmp_path / sherlock.name
    excerpt.write_text(sherlock.read_text()[:110_000])
    proc = _run(
        [PYTHON, "launch/evaluate.py", str(run_dir), "--data", str(excerpt), "eval.bootstrap_samples=0"]
    )
    other = run_dir / "eval" / "sherlock_holmes.txt-test" / "results.json"
    book = json.loads(other.read_text())
    assert book["data"]["source"] == str(excerpt)
    assert (
        book["ensemble"]["tokens"] == scored_tokens(book["data"]) > 20_000
    )  # the file whole, not a split of it
    assert book["evaluation"]["bootstrap"]["samples"] == 0
    assert "| **Ensemble**" in proc.stdout
    assert json.loads((run_dir / "results.json").read_text()) == before


def test_wandb_without_credentials_runs_offline_and_records_metrics(tmp_path, datasets_cache):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"))
    out = tmp_path / "run"
    _run(
        [
            PYTHON,
            "launch/train.py",
            "--config",
            "configs/tiny.yaml",
            "model.gpt2_config={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
            "data.block_size=64",
            f"data.cache_dir={datasets_cache}",
            "members.seeds=[7]",
            "train.max_steps=4",
            "train.logging_steps=2",
            "tracking.report_to=[wandb]",
            "tracking.run_name=offline-check",
            f"output.dir={out}",
        ],
        env=env,
    )
    runs = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "logs").rglob("*"))
    (run_file,) = runs[0].glob("run-*.wandb")
    rows = wandb_records.history(run_file)
    assert [r["_step"] for r in rows] == [2, 4]
    for r in rows:
        assert math.isfinite(r["train/loss"]) and 0 < r["train/loss"] < 10
        assert r["train/lr"] > 0 and r["train/tokens_per_s"] > 0
    assert wandb_records.config(run_file)["member.seed"] == 7


def test_bf16_evaluation_agrees_with_float32(run_dir, tmp_path):
    """eval.precision=bf16 (CPU autocast) against the run's own float32 results: within the
    tolerances the README states, and not identical (the members really ran in bf16)."""
    out = tmp_path / "bf16"
    _run([PYTHON, "launch/evaluate.py", str(run_dir), "eval.precision=bf16", "--output", str(out)])
    f32 = json.loads((run_dir / "results.json").read_text())
    bf16 = json.loads((out / "results.json").read_text())
    assert (f32["evaluation"]["precision"], bf16["evaluation"]["precision"]) == ("float32", "bf16")
    assert "(test split, bf16 forward passes)" in (out / "results.md").read_text()
    assert "(test split, float32 forward passes)" in (run_dir / "results.md").read_text()
    rows = [
        (a, b)
        for part in ("members", "combiners")
        for a, b in zip(
            f32[part] if part == "members" else f32[part].values(),
            bf16[part] if part == "members" else bf16[part].values(),
            strict=True,
        )
    ]
    assert len(rows) == 7
    for a, b in rows:
        assert b["tokens"] == a["tokens"]
        assert b["nll"] == pytest.approx(a["nll"], rel=1e-3)
        for key in ("accuracy", "top5_accuracy", "ece"):
            assert abs(b[key] - a[key]) <= 5e-3, key
        assert abs(b["brier"] - a["brier"]) <= 1e-3
    assert any(a["nll"] != b["nll"] for a, b in rows)


def test_torchrun_processes_form_one_job_on_cpu(tmp_path, datasets_cache):
    """Several CPU ranks must train a member together (gloo), not each on its own."""
    torchrun = Path(PYTHON).with_name("torchrun")
    out = tmp_path / "run"
    proc = _run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "launch/train.py",
            "--config",
            "configs/tiny.yaml",
            "model.gpt2_config={n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
            "data.block_size=64",
            f"data.cache_dir={datasets_cache}",
            "members.seeds=[3, 4]",
            "train.max_steps=3",
            "train.logging_steps=1",
            "tracking.report_to=[none]",
            f"output.dir={out}",
            "parallel.placement=sequential",
        ]
    )
    for i in (0, 1):
        training = json.loads((out / "members" / f"member-{i}" / "member.json").read_text())["training"]
        assert (training["processes"], training["ranks"], training["steps"]) == (2, [0, 1], 3)
    assert proc.stdout.count("| **Ensemble**") == 1  # evaluated once, by the main process


def test_out_of_domain_detection_on_the_trained_run(run_dir, sherlock, tmp_path):
    """A text against itself scores AUROC 0.5 for every score and row (the same blocks); against
    the same tokens shuffled, the ensemble's mean NLL per block tells them apart."""
    import numpy as np
    from transformers import AutoTokenizer

    book = tmp_path / "book.txt"
    book.write_text(sherlock.read_text()[:40_000])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "members" / "member-0")
    ids = np.array(tokenizer(book.read_text())["input_ids"])
    np.random.default_rng(0).shuffle(ids)
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text(tokenizer.decode(ids.tolist()))
    out = tmp_path / "out"
    _run([PYTHON, "launch/evaluate.py", str(run_dir), "--data", str(book), "--ood", str(book), str(shuffled),
          "--output", str(out), "eval.bootstrap_samples=0"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    same, other = results["ood"]["sets"]
    assert same["blocks"] == results["ood"]["in_domain"]["blocks"] > 50
    assert {s["auroc"] for row in same["rows"].values() for s in row.values()} == {0.5}
    ensemble = other["rows"]["mean_prob"]
    assert ensemble["mean_nll"]["auroc"] > 0.95 and ensemble["mean_nll"]["fpr_at_95_tpr"] < 0.3, ensemble
    assert (out / "ood.png").stat().st_size > 10_000
    # the uncertainty decomposition adds up, and the members disagree somewhat
    u = results["uncertainty"]
    assert u["total"] == pytest.approx(u["aleatoric"] + u["epistemic"], rel=1e-5)
    assert 0 < u["epistemic"] < u["total"]
    assert u["epistemic"] == pytest.approx(results["diversity"]["mean_kl_to_mixture"], rel=1e-4)
