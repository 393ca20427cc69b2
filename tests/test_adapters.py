"""Adapter members: seeded LoRA adapters (PEFT) on one frozen pretrained base.

The base is a tiny GPT-2 saved in Hugging Face format here (the Hub is unreachable); the members
are trained on it for a few steps, saved as PEFT adapter directories, and loaded back on one
shared base. Their scores must equal those of each member merged into a plain model."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.cli.train import train_main
from ensemble.config.schema import AdapterConfig, DataConfig, EvalConfig, ExperimentConfig, ModelConfig
from ensemble.core.adapters import AdapterView, attach_adapter, base_digest, merged_model
from ensemble.core.data import EvalBlocks
from ensemble.core.loading import load_members
from ensemble.core.members import build_model, fit_model_config, load_model_config
from ensemble.core.metrics import row_result
from ensemble.core.tokenization import load_tokenizer
from ensemble.errors import ConfigError, EnsembleError
from ensemble.evaluate.stream import evaluate_members

from .conftest import tiny_overrides
from .test_evaluation import assert_row, brute_row, softmax64

STEPS = 6


def _save_base(dest: Path, seed: int = 0) -> Path:
    model_cfg = ModelConfig(
        gpt2_config={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}, tokenizer="byte"
    )
    tokenizer = load_tokenizer(model_cfg)
    model = build_model(model_cfg, fit_model_config(model_cfg, load_model_config(model_cfg), tokenizer), seed)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _save_base(tmp_path_factory.mktemp("base") / "tiny-gpt2")


def _adapter_overrides(out: Path, cache: Path, base: Path, **extra: object) -> list[str]:
    return tiny_overrides(
        out,
        cache,
        model__name_or_path=str(base),
        model__gpt2_config="{}",
        model__tokenizer="null",
        adapter__method="lora",
        adapter__r=4,
        train__max_steps=STEPS,
        checkpoint__every_steps=3,
        eval__bootstrap_samples=0,
        **extra,
    )


@pytest.fixture(scope="module")
def run(base, tmp_path_factory, datasets_cache) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train_main([*_adapter_overrides(out, datasets_cache, base), "--no-eval"]) == 0
    return out


def _members(run: Path) -> list[Path]:
    return sorted((run / "members").glob("member-*"))


def test_members_are_peft_adapter_directories_that_record_their_base(run, base):
    for member in _members(run):
        assert (member / "adapter_config.json").is_file() and (member / "adapter_model.safetensors").is_file()
        assert not (member / "model.safetensors").exists()  # the base is not copied into each member
        info = json.loads((member / "member.json").read_text())
        assert info["base"] == {"name_or_path": str(base.resolve()), "sha256": base_digest(str(base))}
        adapter = json.loads((member / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(base.resolve()) and adapter["r"] == 4


def test_each_loader_gives_the_merged_member(run, base):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.arange(40)[None] % 250
    base_logits = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    for member in _members(run):
        merged = merged_model(member).eval()
        assert "lora" not in " ".join(n for n, _ in merged.named_parameters())  # a plain model
        expected = merged(ids).logits
        assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter was trained
        with torch.no_grad():
            for loaded in (
                AutoPeftModelForCausalLM.from_pretrained(member),
                AutoModelForCausalLM.from_pretrained(member),  # transformers' own adapter loading
            ):
                torch.testing.assert_close(loaded.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_pass", [False, True], ids=["one-after-another", "one-pass"])
def test_the_ensemble_holds_one_base_and_scores_each_member_as_its_merged_model(run, one_pass, monkeypatch):
    # on CPU the evaluator runs adapter members one after another; on GPUs in one pass (forced here)
    from ensemble.core import heads
    from ensemble.evaluate import stream

    if one_pass:
        monkeypatch.setattr(
            stream, "hidden_states_of", functools.partial(heads.hidden_states_of, one_pass=True)
        )
    members = load_members(_members(run), "cpu")
    views = [m.model for m in members]
    assert all(isinstance(v, AdapterView) for v in views) and views[0].shared is views[1].shared
    base_params = sum(p.numel() for n, p in views[0].shared.named_parameters() if "lora_" not in n)
    held = sum(p.numel() for p in {id(p): p for v in views for p in v.parameters()}.values())
    assert held < 1.2 * base_params  # one base, two small adapters
    g = torch.Generator().manual_seed(0)
    blocks = EvalBlocks(torch.randint(0, 250, (64 * 3,), generator=g).numpy(), 64)
    cfg = EvalConfig(per_device_batch_size=2, chunk_tokens=50, combiners=["mean_prob"], bootstrap_samples=0)
    scorer = evaluate_members(members, blocks, cfg, "cpu", show_progress=False)
    probs = []
    with torch.no_grad():
        for path in _members(run):
            merged = merged_model(path).eval()
            probs.append(
                np.concatenate(
                    [
                        softmax64(merged(blocks[i][None]).logits[0, :-1].double().numpy())
                        for i in range(len(blocks))
                    ]
                )
            )
    targets = np.concatenate([blocks[i][1:].numpy() for i in range(len(blocks))])
    for m, p in zip(members, probs, strict=True):
        assert_row(row_result(scorer.sums[scorer.index[m.name]]), brute_row(p, targets))
    assert_row(row_result(scorer.sums[scorer.index["mean_prob"]]), brute_row(np.mean(probs, axis=0), targets))


def test_an_adapter_depends_on_its_seed_only(base):
    from transformers import AutoModelForCausalLM

    def lora_a(seed: int) -> torch.Tensor:
        model = attach_adapter(
            AutoModelForCausalLM.from_pretrained(base), AdapterConfig("lora", r=4), seed, str(base)
        )
        torch.manual_seed(1234)  # the process RNG is not what the adapter draws from
        return next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()

    torch.manual_seed(0)
    first = lora_a(7)
    torch.rand(100)  # a shifted process RNG changes nothing
    assert torch.equal(first, lora_a(7))
    assert not torch.equal(first, lora_a(8))


def test_a_resumed_adapter_member_is_bitwise_the_uninterrupted_one(
    run, base, tmp_path, datasets_cache, monkeypatch
):
    out = tmp_path / "resumed"
    monkeypatch.setenv("ENSEMBLE_FAULT", "raise:0:4")  # after the checkpoint at step 3
    with pytest.raises(RuntimeError, match="injected failure in member-0 at step 4"):
        train_main([*_adapter_overrides(out, datasets_cache, base), "--no-eval"])
    monkeypatch.delenv("ENSEMBLE_FAULT")
    assert train_main([*_adapter_overrides(out, datasets_cache, base), "--no-eval", "--resume", "auto"]) == 0
    for done, resumed in zip(_members(run), _members(out), strict=True):
        assert (done / "adapter_model.safetensors").read_bytes() == (
            resumed / "adapter_model.safetensors"
        ).read_bytes()


def test_a_member_trained_after_another_on_the_shared_base_is_the_member_trained_alone(
    base, tmp_path, datasets_cache, monkeypatch
):
    # Trained in one process, member-1 gets the base member-0 hands back (BaseCache) instead of
    # loading it again; alone, it loads the base from disk. The two must not differ in a bit.
    from transformers import AutoModelForCausalLM

    loads: list[str] = []
    load = AutoModelForCausalLM.from_pretrained

    def counting(path: str, *args: object, **kwargs: object) -> torch.nn.Module:
        loads.append(str(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert train_main([*_adapter_overrides(both, datasets_cache, base), "--no-eval"]) == 0
    assert loads == [str(base)]  # once for both members
    assert train_main([*_adapter_overrides(alone, datasets_cache, base), "--no-eval", "--member", "1"]) == 0
    (only,) = _members(alone)
    second = _members(both)[1]
    assert only.name == second.name
    assert (only / "adapter_model.safetensors").read_bytes() == (
        second / "adapter_model.safetensors"
    ).read_bytes()


# --------------------------------------------------------------------------------------------
# Bad input: one line each, nothing half-written


def test_an_adapter_without_a_pretrained_model_is_refused():
    cfg = ExperimentConfig(
        model=ModelConfig(gpt2_config={"n_layer": 1}, tokenizer="byte"),
        data=DataConfig(dataset="builtin:python-docs"),
        adapter=AdapterConfig("lora"),
    )
    with pytest.raises(
        ConfigError, match="adapter.method=lora adapts a pretrained model, but model.name_or_path is empty"
    ):
        cfg.validate()


def test_target_modules_that_match_nothing_name_the_layers_there_are(base, tmp_path, datasets_cache, capsys):
    out = tmp_path / "run"
    assert train_main(_adapter_overrides(out, datasets_cache, base, adapter__target_modules="[q_proj]")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "adapter.target_modules: q_proj matches no linear layer of the base (gpt2)" in err
    assert "c_attn" in err and "c_fc" in err
    assert not out.exists()


def test_members_on_another_base_are_refused(run, base, tmp_path):
    moved = tmp_path / "members"
    other_base = _save_base(tmp_path / "other-base", seed=1)
    paths = []
    for member in _members(run):
        dest = moved / member.name
        dest.mkdir(parents=True)
        for f in member.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
        config = json.loads((dest / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(other_base)
        (dest / "adapter_config.json").write_text(json.dumps(config))
        paths.append(dest)
    with pytest.raises(
        EnsembleError, match=r"member member-0 .* was trained on base .*tiny-gpt2.*not on .*other-base"
    ):
        load_members(paths, "cpu")
    # a different base directory for each member: no shared model
    config = json.loads((paths[1] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (paths[1] / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EnsembleError, match="adapter members of different bases"):
        load_members(paths, "cpu")


def test_the_soup_of_adapter_members_averages_their_merged_updates(run):
    from ensemble.core.soup import make_soup, soup_reason

    paths = _members(run)
    assert soup_reason(paths) is None  # fine-tuned from one base
    soup = make_soup(paths).state_dict()
    merged = [merged_model(p).state_dict() for p in paths]
    assert set(soup) == set(merged[0])  # a plain model: no adapter factors averaged
    key = "transformer.h.0.attn.c_attn.weight"  # the adapted layer: base + mean of the B·A updates
    torch.testing.assert_close(soup[key], (merged[0][key] + merged[1][key]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(soup[key], merged[0][key])


def test_the_reference_lora_config_is_the_reference_with_adapters():
    from transformers import GPT2Config

    from ensemble.config.loading import load_config
    from ensemble.core.adapters import check_adapter

    configs = Path(__file__).resolve().parents[1] / "configs"
    full = load_config(configs / "gpt2-enlightened.yaml").to_dict()
    lora = load_config(configs / "gpt2-enlightened-lora.yaml")
    assert lora.adapter.method == "lora" and lora.model.name_or_path == "gpt2"
    changed = {
        f"{section}.{key}"
        for section, values in lora.to_dict().items()
        for key, value in values.items()
        if full[section][key] != value
    }
    assert changed == {
        "adapter.method",
        "adapter.target_modules",
        "train.lr",
        "tracking.run_name",
        "output.dir",
    }, changed
    check_adapter(lora.adapter, GPT2Config())  # its layers exist in GPT-2 small (checked weightless)


def test_merge_writes_full_members_that_load_without_peft(run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from ensemble.cli.merge import merge_main

    out = tmp_path / "merged"
    assert merge_main([str(run), "--output", str(out)]) == 0
    ids = torch.arange(30)[None] % 250
    for member in _members(run):
        merged = out / member.name
        assert not (merged / "adapter_config.json").exists() and (merged / "model.safetensors").is_file()
        info = json.loads((merged / "member.json").read_text())
        assert (
            info["merged_from"] == str(member.resolve())
            and info["seed"] == json.loads((member / "member.json").read_text())["seed"]
        )
        with torch.no_grad():
            torch.testing.assert_close(
                AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits,
                merged_model(member).eval()(ids).logits,
                rtol=1e-6,
                atol=1e-6,
            )
    loaded = load_members(sorted(out.iterdir()), "cpu")  # full members now, verified by checksum
    assert not any(isinstance(m.model, AdapterView) for m in loaded)
    before = (out / "member-0" / "model.safetensors").read_bytes()
    assert merge_main([str(run), "--output", str(out)]) == 2  # nothing is overwritten
    assert "exist(s); remove them or pass another --output" in capsys.readouterr().err
    assert (out / "member-0" / "model.safetensors").read_bytes() == before


def test_the_adapter_keys_are_part_of_the_trajectory_a_resume_checks(run):
    from ensemble.config.loading import load_config
    from ensemble.runtime.checkpointing import config_differences, trajectory_config

    cfg = load_config(run / "config.yaml")
    other = load_config(run / "config.yaml", ["adapter.r=2"])
    assert "adapter.r" in config_differences(trajectory_config(cfg, 42), trajectory_config(other, 42))
    full = load_config(run / "config.yaml", ["adapter.method=null"])
    assert not any(k.startswith("adapter.") for k in trajectory_config(full, 42))  # as before adapters


def test_an_adapter_ensemble_distils_into_one_full_student(run, tmp_path):
    import shutil

    from ensemble.cli.distill import distill_main

    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints"))
    assert distill_main([str(out), "train.max_steps=2", "--no-eval"]) == 0
    student = out / "student"
    assert (student / "model.safetensors").is_file() and not (student / "adapter_config.json").exists()
    teachers = json.loads((student / "member.json").read_text())["teachers"]
    assert sorted(teachers) == ["members/member-0", "members/member-1"]


def test_generation_with_adapter_members_equals_generation_with_them_merged(run, tmp_path):
    from ensemble.cli.merge import merge_main
    from ensemble.generate.model import load_ensemble

    assert merge_main([str(run), "--output", str(tmp_path / "merged")]) == 0
    outputs = []
    for source in (str(run), [str(p) for p in sorted((tmp_path / "merged").iterdir())]):
        model, tokenizer = load_ensemble(source, dtype="float32")
        scores = model(**tokenizer(["The list type"], return_tensors="pt")).logits
        ids = model.generate(
            **tokenizer(["The list type"], return_tensors="pt"), max_new_tokens=8, do_sample=False
        )
        outputs.append((scores, ids))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[0][1], outputs[1][1])


def test_one_forward_pass_gives_each_adapter_members_own_hidden_states(run, monkeypatch):
    from ensemble.core import adapters
    from ensemble.core.heads import ChunkedHead, hidden_states_of

    members = load_members(_members(run), "cpu")
    parts = {i: ChunkedHead.of(m.model, 50, "float32", torch.device("cpu")) for i, m in enumerate(members)}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 250, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    calls = []
    batched = adapters.batched_hidden_states
    monkeypatch.setattr(adapters, "batched_hidden_states", lambda *a: calls.append(a) or batched(*a))
    with torch.no_grad():
        assert hidden_states_of(parts, ids, mask).keys() == parts.keys() and not calls  # CPU: one by one
        states = hidden_states_of(parts, ids, mask, one_pass=True)
        assert len(calls) == 1  # both members in one pass
        for i, part in parts.items():
            own = part.hidden_states(ids, mask)  # this member alone, through its view's body
            torch.testing.assert_close(states[i], own, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(states[0], states[1])


def test_the_grouped_lora_pass_equals_peft_mixed_batch_and_each_adapter_alone(run):
    # Our grouped LoRA layer (one batched matmul per layer for all members) against PEFT's
    # mixed-batch forward and against each adapter on its own, with a third adapter of another
    # rank on only some of the layers (zero-padded in the grouped pass).
    from peft import LoraConfig

    from ensemble.core.adapters import batched_hidden_states

    members = load_members(_members(run), "cpu")
    shared = members[0].model.shared
    shared.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in shared.named_parameters():
            if "lora_B" in name and ".other." in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    shared.eval()
    views = [m.model for m in members] + [AdapterView(shared, "other")]
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        grouped = batched_hidden_states(views, ids, mask)
        peft_mixed = batched_hidden_states(views, ids, mask, grouped=False)
        for view, g, p in zip(views, grouped, peft_mixed, strict=True):
            view.activate()
            alone = shared.get_base_model().base_model(ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(g, alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(p, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grouped[2], grouped[0])
    assert not any("forward" in vars(m) for m in shared.modules())  # every layer restored
