"""Seeding and determinism: a member is a function of the config and its seed alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ensemble.cli.train import train_main
from ensemble.config.schema import ModelConfig
from ensemble.core.members import build_model, fit_model_config, load_model_config
from ensemble.core.tokenization import load_tokenizer

from .conftest import PYTHON, REPO, tiny_overrides


def _weights(member_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(member_dir / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_model(gpt2_config: str) -> tuple[ModelConfig, object]:
    import yaml

    cfg = ModelConfig(gpt2_config=yaml.safe_load(gpt2_config), tokenizer="byte")
    return cfg, fit_model_config(cfg, load_model_config(cfg), load_tokenizer(cfg))


def test_initialisation_depends_on_the_seed_only():
    cfg = ModelConfig(
        gpt2_config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}, tokenizer="byte"
    )
    config = fit_model_config(cfg, load_model_config(cfg), load_tokenizer(cfg))
    before = torch.random.get_rng_state()
    a, b, c = (build_model(cfg, config, s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), before)  # the process RNG is left alone
    assert _same(a, b)
    assert not _same(a, c)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, datasets_cache):
    """The same two-member config trained twice, plus seed 123 trained alone, each in a fresh
    process (so anything that happens only for the first member of a process shows up)."""
    root = tmp_path_factory.mktemp("determinism")
    out = {}
    # dropout on, so that its stream matters too
    dropout = "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0.1, embd_pdrop: 0.1, attn_pdrop: 0.1}"
    for name, seeds in (("a", "[42, 123]"), ("b", "[42, 123]"), ("alone", "[123]")):
        argv = tiny_overrides(root / name, datasets_cache, members__seeds=seeds, model__gpt2_config=dropout)
        proc = subprocess.run([PYTHON, "launch/train.py", *argv], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_member(runs):
    for i in (0, 1):
        a = _weights(runs["a"] / "members" / f"member-{i}")
        b = _weights(runs["b"] / "members" / f"member-{i}")
        assert _same(a, b), f"member-{i} differs between identical runs"


@pytest.mark.slow
def test_different_seeds_give_different_members(runs):
    assert not _same(_weights(runs["a"] / "members/member-0"), _weights(runs["a"] / "members/member-1"))


@pytest.mark.slow
def test_a_member_does_not_depend_on_the_members_trained_before_it(runs):
    # seed 123 is the second member in "a" and the only one in "alone": no shared RNG stream
    assert _same(_weights(runs["a"] / "members/member-1"), _weights(runs["alone"] / "members/member-0"))


@pytest.mark.slow
def test_training_moved_the_weights(runs, datasets_cache):
    cfg = ModelConfig(
        gpt2_config={
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "n_positions": 64,
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
        },
        tokenizer="byte",
    )
    init = build_model(
        cfg, fit_model_config(cfg, load_model_config(cfg), load_tokenizer(cfg)), 42
    ).state_dict()
    trained = _weights(runs["a"] / "members/member-0")
    assert not torch.equal(
        init["transformer.h.0.mlp.c_fc.weight"], trained["transformer.h.0.mlp.c_fc.weight"]
    )


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, datasets_cache):
    """2 micro-batches of 2 per step must train like one batch of 4 (dropout off)."""
    model = (
        "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}"
    )
    common = {"members__seeds": "[5]", "model__gpt2_config": model, "train__max_steps": 6}
    assert (
        train_main(tiny_overrides(tmp_path / "big", datasets_cache, train__per_device_batch_size=4, **common))
        == 0
    )
    assert (
        train_main(
            tiny_overrides(
                tmp_path / "acc",
                datasets_cache,
                train__per_device_batch_size=2,
                train__gradient_accumulation_steps=2,
                **common,
            )
        )
        == 0
    )
    big = _weights(tmp_path / "big/members/member-0")
    acc = _weights(tmp_path / "acc/members/member-0")
    init = build_model(*_tiny_model(model), 5).state_dict()
    key = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(big[key], init[key])
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-4, atol=1e-5)


def test_block_size_defaults_to_the_context_and_only_weight_matrices_decay():
    import dataclasses

    from ensemble.config.schema import DataConfig, ExperimentConfig, TrainConfig
    from ensemble.core.architecture import resolve_block_size
    from ensemble.errors import EnsembleError
    from ensemble.runtime.trainer import _optimizer

    model_cfg, config = _tiny_model("{n_layer: 1, n_embd: 16, n_head: 2, n_positions: 32}")
    cfg = ExperimentConfig(model=model_cfg, train=TrainConfig(weight_decay=0.01))
    assert resolve_block_size(cfg, config) == 32  # data.block_size unset: the model's context
    assert resolve_block_size(dataclasses.replace(cfg, data=DataConfig(block_size=16)), config) == 16
    with pytest.raises(EnsembleError, match=r"data.block_size=64 exceeds the model's context of 32 tokens"):
        resolve_block_size(dataclasses.replace(cfg, data=DataConfig(block_size=64)), config)

    model = build_model(model_cfg, config, 0)
    decayed, undecayed = _optimizer(model, cfg, fused=False).param_groups
    assert decayed["weight_decay"] == 0.01 and undecayed["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in undecayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))
