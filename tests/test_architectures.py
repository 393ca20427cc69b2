"""Members of other causal-LM architectures, built from scratch through `model.architecture` and
`model.config`: a tiny Llama and a tiny GPT-NeoX train, are SIGKILLed and resume bitwise, are
saved in Hugging Face format, load with `AutoModelForCausalLM`, and are evaluated; their FLOPs
count is checked against torch's own count of one training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ensemble.config.loading import config_from_dict, load_config
from ensemble.core.architecture import build_config, count_parameters, model_shape
from ensemble.errors import ConfigError
from ensemble.runtime.throughput import flops_per_token

from .conftest import assert_same_members
from .test_resume import killed, ok, overrides, small_text, train  # noqa: F401 (small_text: a fixture)

# Tiny, with dropout on, so that a resume must also continue the dropout stream exactly.
CONFIGS = {
    "llama": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "attention_dropout": 0.1,
    },
    "gpt_neox": {
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 64, "hidden_dropout": 0.1, "attention_dropout": 0.1,
    },
}  # fmt: skip
CLASSES = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


def arch_overrides(out: Path, cache: Path, text: Path, architecture: str) -> list[str]:
    return overrides(
        out,
        cache,
        text,
        model__gpt2_config="null",
        model__architecture=architecture,
        model__config=json.dumps(CONFIGS[architecture]),
        members__seeds="[42, 123]",
        train__num_epochs=2,
    )


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_flops_per_token_matches_a_direct_count(architecture: str):
    """torch's FlopCounterMode over one forward and backward (eager attention, so that every
    product is a counted matmul) against 6·N + 6·L·A·T. The direct count differs from ours in
    two known terms only: it counts the full T x T attention products, where a causal model needs
    half (ours), and it has no FLOPs for the 1-D parameters (biases, norm gains), which 6·N counts."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    block = 64
    config = build_config(architecture, CONFIGS[architecture], vocab_size=259, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 259, (2, block), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    direct = counter.get_total_flops() / ids.numel()
    shape = model_shape(config)
    masked_half = 6 * shape.layers * shape.attention_width * block
    one_dimensional = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert direct == pytest.approx(
        flops_per_token(config, block) + masked_half - 6 * one_dimensional, rel=1e-9
    )
    # the untied input embedding is a lookup: not in N
    assert count_parameters(config) - count_parameters(config, lookups=False) == 259 * 32


def test_model_config_is_validated_against_the_architecture():
    base = ["model.tokenizer=byte", "data.dataset=builtin:python-docs"]
    with pytest.raises(
        ConfigError, match=r"model.architecture=lama is not a causal-LM .*\(did you mean llama\?\)"
    ):
        load_config(None, [*base, "model.architecture=lama"])
    with pytest.raises(
        ConfigError,
        match=r"unknown LlamaConfig field model.config.hidden_sise \(did you mean hidden_size\?\)",
    ):
        load_config(None, [*base, "model.architecture=llama", "model.config={hidden_sise: 8}"])
    with pytest.raises(ConfigError, match="model.gpt2_config describes a GPT-2 but model.architecture=llama"):
        load_config(None, [*base, "model.architecture=llama", "model.gpt2_config={n_layer: 1}"])
    with pytest.raises(
        ConfigError, match="model.config.vocab_size is set, but the vocabulary size comes from the tokenizer"
    ):
        load_config(None, [*base, "model.architecture=llama", "model.config={vocab_size: 100}"])
    with pytest.raises(ConfigError, match="model.name_or_path and model.architecture are both set"):
        load_config(None, [*base, "model.architecture=llama", "model.name_or_path=gpt2"])
    # model.gpt2_config is architecture gpt2 with those fields, for the resume check too
    from ensemble.runtime.checkpointing import trajectory_config

    old = load_config(None, [*base, "model.gpt2_config={n_layer: 1}"])
    new = load_config(None, [*base, "model.architecture=gpt2", "model.config={n_layer: 1}"])
    assert trajectory_config(old, 1) == trajectory_config(new, 1)


@pytest.mark.parametrize("architecture", list(CONFIGS))
@pytest.mark.slow
def test_member_trains_resumes_bitwise_loads_and_evaluates(
    architecture: str,
    tmp_path: Path,
    datasets_cache: Path,
    small_text: Path,  # noqa: F811
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ensemble.core.data import prepare_data

    twin = tmp_path / "twin"
    ok(train(arch_overrides(twin, datasets_cache, small_text, architecture)))
    run = tmp_path / "run"
    argv = arch_overrides(run, datasets_cache, small_text, architecture)
    killed(train(argv, fault="kill:1:7"))  # member-1, after its checkpoint at step 6
    ok(train([*argv, "--resume", "auto"]))
    assert_same_members(twin, run, [0, 1])

    member = run / "members" / "member-0"
    model = AutoModelForCausalLM.from_pretrained(member)
    assert type(model).__name__ == CLASSES[architecture] and model.config.model_type == architecture
    assert model.config.hidden_size == CONFIGS[architecture]["hidden_size"]
    info = json.loads((member / "member.json").read_text())
    assert info["training"]["flops_per_token"] == flops_per_token(model.config, 64)

    # The run's evaluation against the member's own loss on the test blocks, one at a time.
    results = json.loads((run / "results.json").read_text())
    assert [m["name"] for m in results["members"]] == ["member-0", "member-1"]
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    blocks = prepare_data(cfg.data, AutoTokenizer.from_pretrained(member), 64, splits=("test",)).eval_blocks(
        "test"
    )
    model.eval()
    with torch.no_grad():
        total = sum(
            model(input_ids=blocks[i][None], labels=blocks[i][None]).loss.double() * (len(blocks[i]) - 1)
            for i in range(len(blocks))
        )
    assert results["members"][0]["tokens"] == blocks.num_predictions
    assert results["members"][0]["nll"] == pytest.approx(float(total) / blocks.num_predictions, rel=1e-5)
    assert results["ensemble"]["nll"] < max(m["nll"] for m in results["members"])
