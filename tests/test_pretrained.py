"""Fine-tuning a pretrained model: the Hub-loading code path, on a local copy in HF format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ensemble.cli.train import train_main

from .conftest import scored_tokens, tiny_overrides


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A small GPT-2 with the real GPT-2 tokenizer, saved as `save_pretrained` would for `gpt2`."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("local-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_dir).save_pretrained(out)
    return out


def _argv(out: Path, cache: Path, pretrained: Path, sherlock: Path, **extra) -> list[str]:
    return tiny_overrides(
        out, cache,
        model__gpt2_config="{}", model__tokenizer="null", model__name_or_path=str(pretrained),
        data__dataset="null", data__train_files=f"[{sherlock}]", data__txt_sample_by="paragraph",
        members__seeds="[1, 2]", train__max_steps=3, eval__chunk_tokens=1024, **extra,
    )  # fmt: skip


@pytest.mark.slow
def test_fine_tunes_a_local_pretrained_model(tmp_path, datasets_cache, pretrained_dir, sherlock):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert train_main(_argv(out, datasets_cache, pretrained_dir, sherlock)) == 0
    start = load_file(pretrained_dir / "model.safetensors")
    members = [load_file(out / f"members/member-{i}/model.safetensors") for i in (0, 1)]
    key = "transformer.h.0.attn.c_attn.weight"
    for weights in members:
        step = (weights[key] - start[key]).abs().max()
        assert 0 < step < 0.05  # 3 small steps away from the pretrained weights, not a new init
    assert not torch.equal(members[0][key], members[1][key])  # seeds changed data order
    model = AutoModelForCausalLM.from_pretrained(out / "members/member-0")
    tok = AutoTokenizer.from_pretrained(out / "members/member-0")
    assert model.config.vocab_size == len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]
    results = json.loads((out / "results.json").read_text())
    assert results["ensemble"]["tokens"] == scored_tokens(results["data"])


def test_block_size_beyond_the_pretrained_context(tmp_path, capsys, datasets_cache, pretrained_dir, sherlock):
    argv = _argv(tmp_path / "run", datasets_cache, pretrained_dir, sherlock, data__block_size=65)
    assert train_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data.block_size=65 exceeds the model's context of 64 tokens; set data.block_size <= 64"
    )
