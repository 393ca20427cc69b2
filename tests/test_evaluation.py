"""Evaluator metrics against direct, obviously correct computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.combining import MeanProb
from ensemble.config import ExperimentConfig, ModelConfig
from ensemble.data import EvalBlocks
from ensemble.errors import EnsembleError
from ensemble.evaluation import evaluate_members, load_members
from ensemble.members import MemberSpec, build_model, fit_model_config, load_model_config, save_member
from ensemble.metrics import TokenMetrics
from ensemble.tokenization import load_tokenizer


def brute_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """probs [n, V] float64, loops only."""
    n = len(targets)
    correct = top5 = 0
    nll = 0.0
    for i in range(n):
        row = probs[i]
        best = max(range(len(row)), key=lambda v: row[v])
        correct += best == targets[i]
        order = sorted(range(len(row)), key=lambda v: -row[v])
        top5 += targets[i] in order[:5]
        nll += -math.log(row[targets[i]])
    return {
        "accuracy": correct / n,
        "top5_accuracy": top5 / n,
        "nll": nll / n,
        "perplexity": math.exp(nll / n),
        "tokens": n,
    }


def assert_close(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert got["tokens"] == want["tokens"]
    for key in ("accuracy", "top5_accuracy", "nll", "perplexity"):
        assert got[key] == pytest.approx(want[key], rel=rel), key


def test_token_metrics_match_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 17, generator=g) * 3
    targets = torch.randint(0, 17, (300,), generator=g)
    m = TokenMetrics()
    logp = torch.log_softmax(logits, -1)
    m.update(logp[:100], targets[:100])  # in two parts: sums must add up
    m.update(logp[100:], targets[100:])
    probs = torch.softmax(logits.double(), -1).numpy()
    assert_close(m.result(), brute_metrics(probs, targets.numpy()))


def test_mean_prob_is_the_mixture_of_probabilities():
    g = torch.Generator().manual_seed(1)
    members = [torch.randn(40, 11, generator=g) * s for s in (1.0, 4.0, 0.3)]
    mix = MeanProb()
    for logits in members:
        mix.add(torch.log_softmax(logits, -1))
    want = np.mean([torch.softmax(x.double(), -1).numpy() for x in members], axis=0)
    np.testing.assert_allclose(mix.logprobs().exp().numpy(), want, rtol=1e-5)


def _tiny_member(dest: Path, seed: int, tokenizer, n_layer: int = 1) -> Path:
    model_cfg = ModelConfig(
        gpt2_config={"n_layer": n_layer, "n_embd": 16, "n_head": 2, "n_positions": 32}, tokenizer="byte"
    )
    config = fit_model_config(model_cfg, load_model_config(model_cfg), tokenizer)
    model = build_model(model_cfg, config, seed)
    save_member(dest, model, tokenizer, MemberSpec(0, seed), ExperimentConfig(model=model_cfg), {})
    return dest


@pytest.fixture(scope="module")
def byte_members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    tok = load_tokenizer(ModelConfig(tokenizer="byte"))
    return [_tiny_member(root / f"member-{i}", seed, tok) for i, seed in enumerate((3, 4, 5))]


@pytest.mark.parametrize("batch_size, chunk_tokens", [(3, 7), (64, 4096)])
def test_evaluator_matches_brute_force_on_real_models(byte_members, batch_size, chunk_tokens):
    members = load_members(byte_members, "cpu")
    g = torch.Generator().manual_seed(2)
    stream = torch.randint(0, 259, (32 * 5 + 6,), generator=g).numpy()  # last block of 6 tokens
    blocks = EvalBlocks(stream, 32)
    per_member, ensemble = evaluate_members(
        members, blocks, batch_size, chunk_tokens, "cpu", show_progress=False
    )

    member_probs = [[] for _ in members]
    targets = []
    with torch.no_grad():
        for i in range(len(blocks)):
            block = blocks[i]
            targets.append(block[1:].numpy())
            for k, m in enumerate(members):  # whole-model logits, one unpadded block at a time
                member_probs[k].append(
                    torch.softmax(m.model(block[None]).logits[0, :-1].double(), -1).numpy()
                )
    targets = np.concatenate(targets)
    probs = [np.concatenate(p) for p in member_probs]
    assert len(targets) == 32 * 5 - 5 + 5 == blocks.num_predictions
    for k in range(len(members)):
        assert_close(per_member[k].result(), brute_metrics(probs[k], targets), rel=1e-5)
    assert_close(ensemble.result(), brute_metrics(np.mean(probs, axis=0), targets), rel=1e-5)


def test_members_with_different_tokenizers_are_refused(byte_members, gpt2_tokenizer_dir, tmp_path):
    gpt2_tok = load_tokenizer(ModelConfig(tokenizer=str(gpt2_tokenizer_dir)))
    model_cfg = ModelConfig(
        gpt2_config={"n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16},
        tokenizer=str(gpt2_tokenizer_dir),
    )
    odd = tmp_path / "member-odd"
    save_member(
        odd,
        build_model(model_cfg, fit_model_config(model_cfg, load_model_config(model_cfg), gpt2_tok), 0),
        gpt2_tok,
        MemberSpec(3, 9),
        ExperimentConfig(model=model_cfg),
        {},
    )
    with pytest.raises(
        EnsembleError, match=r"member member-3 \(.*member-odd\) uses a different tokenizer than member-0"
    ):
        load_members([*byte_members, odd], "cpu")


def test_directory_without_member_info_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(EnsembleError, match="is not a finished member"):
        load_members([tmp_path / "half"], "cpu")
