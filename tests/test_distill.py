"""Distillation into a student and weight soups: the loss against a direct computation, the
teacher against the evaluator's mixture, the stage end to end (in one process, killed and
resumed, in two processes with either sharding of the teacher), soups, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ensemble.cli.distill import distill_main
from ensemble.cli.evaluate import evaluate_main
from ensemble.cli.train import train_main
from ensemble.config.schema import EvalConfig
from ensemble.core.combining import HEADLINE
from ensemble.core.data import EvalBlocks, TrainBlocks, prepare_data
from ensemble.core.loading import load_members
from ensemble.core.metrics import SUMS
from ensemble.core.paths import RunPaths, run_config
from ensemble.core.soup import make_soup
from ensemble.distill.run import Teacher, distill_run, distillation_loss
from ensemble.evaluate.stream import evaluate_members
from ensemble.runtime.sharding import Sharding

from .conftest import PYTHON, REPO, tiny_overrides

# --------------------------------------------------------------------------------------------
# The loss


def direct_loss(logits, teacher_probs, targets, alpha, t) -> float:
    """float64, per position and token, with loops where it helps to read."""
    z = logits.astype(np.float64)
    total_kl, total_ce = 0.0, 0.0
    for row, p, y in zip(z, teacher_probs, targets, strict=True):
        q = np.exp(row / t - np.log(np.exp(row / t).sum()))
        total_kl += sum(pv * (np.log(pv) - np.log(qv)) for pv, qv in zip(p, q, strict=True) if pv > 0)
        total_ce += -(row[y] - np.log(np.exp(row).sum()))
    n = len(targets)
    return alpha * t * t * total_kl / n + (1 - alpha) * total_ce / n


@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.7, 2.5), (0.3, 0.5)])
def test_distillation_loss_matches_a_direct_computation(alpha, temperature):
    g = np.random.default_rng(0)
    n, vocab = 40, 11
    logits = (g.normal(size=(n, vocab)) * 3).astype(np.float32)
    members = [np.exp(g.normal(size=(n, vocab)) * 2) for _ in range(3)]
    for m in members:
        m[:, 3] = 0.0  # a token every member rules out: its KL term is 0, not 0 x inf
    probs = [m / m.sum(1, keepdims=True) for m in members]
    teacher = np.mean(probs, axis=0)
    y = g.integers(0, vocab, n)
    with np.errstate(divide="ignore"):
        teacher_logp = torch.tensor(np.log(teacher), dtype=torch.float32)
    got = distillation_loss(
        torch.tensor(logits, requires_grad=True), teacher_logp, torch.tensor(y), alpha, temperature
    )
    assert got.item() == pytest.approx(direct_loss(logits, teacher, y, alpha, temperature), rel=1e-5)
    z = torch.tensor(logits, requires_grad=True)
    distillation_loss(z, teacher_logp, torch.tensor(y), alpha, temperature).backward()
    assert torch.isfinite(z.grad).all()
    if alpha == 1.0:  # the student that is the teacher (at T) has zero loss
        exact = torch.tensor(np.log(np.clip(teacher, 1e-30, None)) * temperature, dtype=torch.float32)
        assert distillation_loss(exact, teacher_logp, torch.tensor(y), 1.0, temperature).item() < 1e-5


# --------------------------------------------------------------------------------------------
# A small trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory, datasets_cache) -> Path:
    """Two 1-layer members, trained for a few steps in this process."""
    out = tmp_path_factory.mktemp("distill") / "run"
    assert (
        train_main(tiny_overrides(out, datasets_cache, eval__bootstrap_samples=0, eval__plots="false")) == 0
    )
    return out


def test_teacher_is_the_evaluators_mixture(run):
    cfg = run_config(RunPaths(run))
    members = load_members(sorted((run / "members").iterdir()), "cpu")
    data = prepare_data(cfg.data, members[0].tokenizer, 64, splits=("test",))
    stream = data.streams["test"][: 64 * 6]  # whole blocks, as the trainer's
    blocks = TrainBlocks(stream, 64).blocks
    scorer = evaluate_members(
        members,
        EvalBlocks(stream, 64),
        EvalConfig(bootstrap_samples=0, combiners=["mean_prob"]),
        "cpu",
        show_progress=False,
    )
    teacher = Teacher(
        members, Sharding("data", 0, 1, 2), 1.0, torch.device("cpu"), "float32", chunk_tokens=100
    )
    logp = teacher.logprobs(blocks)
    targets = blocks[:, 1:].reshape(-1)
    ens = scorer.sums[scorer.index[HEADLINE]]
    assert len(logp) == ens[SUMS.tokens] == scorer.tokens
    nll = -logp.gather(1, targets[:, None]).double().sum().item()
    assert nll == pytest.approx(ens[SUMS.nll], rel=1e-6)
    entropy = -(logp.exp() * logp).double().sum().item()
    assert entropy == pytest.approx(ens[SUMS.entropy], rel=1e-6)
    # and the full distribution, at another temperature, against the members' own forward passes
    hot = Teacher(members, Sharding("data", 0, 1, 2), 2.0, torch.device("cpu"), "float32", chunk_tokens=1000)
    with torch.no_grad():
        probs = [
            torch.softmax(m.model(blocks).logits[:, :-1].double() / 2.0, -1).reshape(len(logp), -1)
            for m in members
        ]
    torch.testing.assert_close(hot.logprobs(blocks).double(), torch.log(sum(probs) / 2), rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------
# The stage


def distil(run: Path, *argv: str, fault: str | None = None, procs: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ENSEMBLE_FAULT"}
    if fault:
        env["ENSEMBLE_FAULT"] = fault
    launcher = (
        [PYTHON] if procs == 1 else [str(Path(PYTHON).with_name("torchrun")), "--nproc_per_node", str(procs)]
    )
    return subprocess.run(
        [*launcher, "launch/distill.py", str(run), *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def student_weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"students differ in {different[:3]}"


def copy_members(run: Path, dest: Path) -> Path:
    """The run without its student and checkpoints (a fresh place to distil into)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("student", "checkpoints", "results.*"))
    return dest


OPTS = ("checkpoint.every_steps=1", "distill.alpha=0.7", "distill.temperature=2.0")


@pytest.fixture(scope="module")
def distilled(run, tmp_path_factory) -> Path:
    out = copy_members(run, tmp_path_factory.mktemp("distilled") / "run")
    assert distill_main([str(out), *OPTS]) == 0
    return out


def test_distil_then_evaluate(distilled):
    student = distilled / "student"
    info = json.loads((student / "member.json").read_text())
    assert info["role"] == "student" and info["distill"] == {"alpha": 0.7, "temperature": 2.0}
    assert sorted(info["teachers"]) == ["members/member-0", "members/member-1"]
    assert info["training"]["steps"] == 4  # the members' budget (train.max_steps)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.n_layer == 1
    results = json.loads((distilled / "results.json").read_text())
    row = results["student"]
    assert row["tokens"] == results["ensemble"]["tokens"] and row["seed"] == 0
    kept = row["gain_kept"]
    member_nll = np.mean([m["nll"] for m in results["members"]])
    assert kept["share"] == pytest.approx(
        (member_nll - row["nll"]) / (member_nll - results["ensemble"]["nll"])
    )
    assert kept["nll_vs_ensemble"] == pytest.approx(row["nll"] - results["ensemble"]["nll"])
    assert "soup" in results and "trained from scratch" in results["soup"]["skipped"]
    md = (distilled / "results.md").read_text()
    assert "| Student (distilled) (seed 0) |" in md and "Soup (mean of the weights): not evaluated" in md
    # evaluate.py finds the run's student by itself, with a bootstrap interval this time
    assert evaluate_main([str(distilled), "eval.bootstrap_samples=50"]) == 0
    again = json.loads((distilled / "results.json").read_text())["student"]
    assert again["nll"] == pytest.approx(row["nll"], rel=1e-9)
    lo, hi = again["gain_kept"]["ci95"]
    assert lo <= again["gain_kept"]["share"] <= hi
    lo, hi = again["gain_kept"]["nll_vs_ensemble_ci95"]  # paired replicates: a narrow interval round it
    assert lo < again["gain_kept"]["nll_vs_ensemble"] < hi
    assert not any(".tmp-" in p.name for p in distilled.rglob("*"))


def test_the_distillation_hands_its_student_to_what_follows(run, tmp_path):
    """distill_run calls ``then`` once, in its processes, with the teachers, the student and the
    config it ran with, and returns what ``then`` returned (how launch/distill.py evaluates)."""
    out = copy_members(run, tmp_path / "run")
    handed = []
    result = distill_run(out, list(OPTS), then=lambda trained: handed.append(trained) or {"seen": 1})
    (trained,) = handed
    assert result == {"seen": 1}
    assert trained.members == [out / "members" / "member-0", out / "members" / "member-1"]
    assert trained.student == RunPaths(out).student and (trained.student / "member.json").is_file()
    assert trained.cfg.output.dir == str(out) and trained.cfg.distill.alpha == 0.7
    assert "train" in trained.data.streams and not (out / "results.json").exists()


@pytest.mark.slow
def test_killed_then_resumed_is_bitwise_identical(run, distilled, tmp_path, capsys):
    out = copy_members(run, tmp_path / "run")
    killed = distil(out, *OPTS, "--no-eval", fault="kill:-1:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (out / "student").exists()
    assert distill_main([str(out), *OPTS]) == 2
    assert "holds checkpoints of an interrupted distillation; pass --resume auto" in capsys.readouterr().err
    assert distill_main([str(out), "distill.alpha=0.2", "--resume", "auto", "--no-eval"]) == 2
    assert "was written by another distillation (distill.alpha: 0.7 -> 0.2;" in capsys.readouterr().err
    resumed = distil(out, *OPTS, "--no-eval", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumes from" in resumed.stderr
    assert_same_weights(student_weights(out / "student"), student_weights(distilled / "student"))


@pytest.mark.slow
def test_two_processes_data_and_member_sharded_teacher(run, tmp_path):
    """Two processes train one student (data-parallel); its teacher comes from both members on
    each process (data) or one member per process (member): the same student either way, up to
    the order of a sum."""
    students = {}
    for mode in ("data", "member"):
        out = copy_members(run, tmp_path / mode)
        proc = distil(out, f"distill.mode={mode}", "--no-eval", procs=2)
        assert proc.returncode == 0, proc.stderr[-4000:]
        students[mode] = student_weights(out / "student")
        assert json.loads((out / "student/member.json").read_text())["training"]["processes"] == 2
    for key, value in students["data"].items():
        torch.testing.assert_close(students["member"][key], value, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Soups


def fine_tuned_member(dest: Path, base: Path, tokenizer, seed: int, noise: float = 0.0) -> Path:
    """A member directory as training writes one for a model fine-tuned from ``base``."""
    from transformers import AutoModelForCausalLM

    from ensemble.config.loading import load_config
    from ensemble.core.members import MemberSpec, save_member

    model = AutoModelForCausalLM.from_pretrained(base)
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    cfg = load_config(None, [f"model.name_or_path={base}", "data.dataset=builtin:python-docs"])
    save_member(dest, model, tokenizer, MemberSpec(0, seed), cfg, {})
    return dest


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, datasets_cache):
    """A tiny 'pretrained' GPT-2 with a byte tokenizer, saved in Hugging Face format."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from ensemble.config.schema import ModelConfig
    from ensemble.core.tokenization import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(tokenizer="byte"))
    path = tmp_path_factory.mktemp("pretrained") / "base"
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def test_soup_of_identical_members_is_the_member(pretrained, tmp_path, sherlock):
    base, tokenizer = pretrained
    a = fine_tuned_member(tmp_path / "a", base, tokenizer, 1, noise=0.01)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    text = tmp_path / "text.txt"
    text.write_text(sherlock.read_text()[:3000])
    argv = ["--members", str(a), str(b), "--data", str(text), "--output", str(tmp_path / "out")]
    assert evaluate_main([*argv, "--save-soup", str(tmp_path / "soup"), "data.block_size=64"]) == 0
    results = json.loads((tmp_path / "out/results.json").read_text())
    soup, member = results["soup"], results["members"][0]
    for key in ("nll", "accuracy", "top5_accuracy", "brier", "ece"):
        assert soup[key] == member[key], key
    assert_same_weights(student_weights(tmp_path / "soup"), student_weights(a))
    assert "Soup (mean of the weights)" in (tmp_path / "out/results.md").read_text()


def test_soup_is_the_mean_of_the_weights(pretrained, tmp_path):
    base, tokenizer = pretrained
    members = [fine_tuned_member(tmp_path / f"m{i}", base, tokenizer, i, noise=0.05) for i in range(3)]
    soup = make_soup(members).state_dict()
    weights = [load_file(m / "model.safetensors") for m in members]
    for key in weights[0]:
        expected = sum(w[key].double() for w in weights) / 3
        torch.testing.assert_close(soup[key].double(), expected, rtol=0, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def refused(capsys, run: Path, *argv: str) -> str:
    capsys.readouterr()  # only what this call writes
    assert distill_main([str(run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    assert not (run / "student").exists() and not (run / "checkpoints" / "student").exists()
    return err


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, gpt2_tokenizer_dir):
    out = copy_members(run, tmp_path / "run")
    assert "distill.alpha=1.5 must be in [0, 1]" in refused(capsys, out, "distill.alpha=1.5")
    assert "distill.alpha=-0.1 must be in [0, 1]" in refused(capsys, out, "distill.alpha=-0.1")
    assert "distill.temperature=0.0 must be a positive" in refused(capsys, out, "distill.temperature=0")
    assert "distill.temperature=-1.0 must be a positive" in refused(capsys, out, "distill.temperature=-1")
    assert "unknown GPT2Config field distill.config.n_layerz" in refused(
        capsys, out, "distill.config={n_layerz: 1}"
    )
    assert "distillation takes distill.*" in refused(capsys, out, "model.tokenizer=byte")
    # a student with another tokenizer (GPT-2's), or with the members' tokenizer but another vocabulary
    from transformers import AutoModelForCausalLM, GPT2Config

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)
    ).save_pretrained(other)
    for f in gpt2_tokenizer_dir.iterdir():
        shutil.copy(f, other / f.name)
    assert "uses a different tokenizer" in refused(capsys, out, f"distill.name_or_path={other}")
    wider = tmp_path / "wider"
    vocab = json.loads((run / "members/member-0/config.json").read_text())["vocab_size"]
    # special tokens inside the vocabulary: transformers warns otherwise
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=vocab + 8, bos_token_id=0, eos_token_id=0
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    load_members([run / "members/member-0"], "cpu")[0].tokenizer.save_pretrained(
        wider
    )  # the members' tokenizer
    err = refused(capsys, out, f"distill.name_or_path={wider}")
    assert f"over {vocab + 8} tokens but the members over {vocab}" in err
    # an unfinished member
    (out / "members/member-1/member.json").unlink()
    assert "member-1 of" in refused(capsys, out) and "is not finished" in refused(capsys, out)


def test_an_existing_student_is_kept(distilled, capsys):
    before = student_weights(distilled / "student")
    assert distill_main([str(distilled)]) == 2
    assert "already holds a distilled student; pass --overwrite" in capsys.readouterr().err
    assert_same_weights(student_weights(distilled / "student"), before)
