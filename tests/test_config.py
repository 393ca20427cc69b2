"""Config: every shipped file loads, overrides and types are checked, help covers every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ensemble.config.docs import describe, field_docs
from ensemble.config.loading import config_from_dict, load_config
from ensemble.config.schema import ExperimentConfig
from ensemble.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((REPO / "configs").rglob("*.yaml"))
EXPERIMENTS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_directory_is_not_empty():
    assert REPO / "configs" / "tiny.yaml" in EXPERIMENTS
    assert REPO / "configs" / "gpt2-enlightened.yaml" in EXPERIMENTS


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_in_configs_loads(path: Path):
    if path.parent.name == "lm_eval":  # harness tasks: the harness's own index finds them
        from lm_eval.tasks import TaskManager

        assert path.stem in TaskManager(include_path=str(path.parent)).all_tasks
        return
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw
    if path.parent.name == "configs":
        cfg = load_config(path)
        assert cfg.members.seeds
    elif path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        launcher = load_config_from_file(str(path))  # Accelerate's own loader rejects unknown keys
        assert launcher.num_processes >= 1


def test_reference_config_matches_the_reference_setup():
    cfg = load_config(REPO / "configs" / "gpt2-enlightened.yaml")
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.data.dataset == "lonestar108/enlightenedllm"
    assert cfg.members.seeds == [42, 123, 456]
    assert (cfg.train.num_epochs, cfg.train.max_steps) == (1, None)
    assert cfg.train.per_device_batch_size == 16
    assert cfg.eval.per_device_batch_size == 64
    assert cfg.train.warmup_steps == 500
    assert cfg.train.weight_decay == 0.01
    assert cfg.train.logging_steps == 10


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["train.lr=3e-4", "members.seeds=[1,2]", "model.gpt2_config.n_layer=1", "train.max_steps=null"],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.members.seeds == [1, 2]
    assert cfg.model.gpt2_config["n_layer"] == 1
    assert cfg.model.gpt2_config["n_embd"] == 128  # the rest of the mapping is kept
    assert cfg.train.max_steps is None


def test_yaml_float_without_dot_is_a_float(tmp_path: Path):
    # PyYAML reads 5e-5 as a string; the loader must still give a float.
    path = tmp_path / "c.yaml"
    path.write_text("model: {tokenizer: byte}\ndata: {dataset: builtin:python-docs}\ntrain: {lr: 5e-5}\n")
    assert load_config(path).train.lr == 5e-5


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key train.lrr (did you mean lr?)"),
        ("trian.lr=1", "unknown config key trian"),
        ("train.lr=fast", "train.lr expects float, got 'fast'"),
        ("train.per_device_batch_size=1.5", "train.per_device_batch_size expects int, got 1.5"),
        ("members.seeds=[1,x]", "members.seeds[1] expects int"),
        ("members.seeds=[7,7]", "duplicate seeds [7]"),
        ("members.seeds=[]", "members.seeds is empty"),
        ("data.txt_sample_by=word", "data.txt_sample_by='word' is not one of document, paragraph, line"),
        ("train.lr=-1", "train.lr=-1.0 must be a positive number"),
        ("data.test_fraction=1.5", "data.test_fraction=1.5 must be between 0 and 1"),
        (
            "model.gpt2_config.n_layers=2",
            "unknown GPT2Config field model.gpt2_config.n_layers (did you mean n_layer?)",
        ),
        ("data.block_size=1", "data.block_size=1 is too small"),
        ("train.num_epochs=0", "train.num_epochs=0 must be at least 1"),
        ("noequals", "not of the form section.key=value"),
    ],
)
def test_bad_config_gives_one_clear_line(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file_and_invalid_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["members.seeds=[5,6]"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_field_has_a_docstring_and_appears_in_help():
    text = describe()
    top = field_docs(ExperimentConfig)
    for section in dataclasses.fields(ExperimentConfig):
        assert top.get(section.name), section.name
        cls = type(getattr(ExperimentConfig(), section.name))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring"
            assert f"{section.name}.{f.name}=" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["runs/tiny", "--data", "book.txt", "eval.per_device_batch_size=8", "data.block_size=16"],
        ["eval.per_device_batch_size=8", "runs/tiny", "--data", "book.txt", "data.block_size=16"],
        [
            "--data",
            "book.txt",
            "eval.per_device_batch_size=8",
            "--split",
            "test",
            "data.block_size=16",
            "runs/tiny",
        ],
    ],
)
def test_evaluate_takes_overrides_before_or_after_the_options(argv: list[str]):
    from ensemble.cli.evaluate import evaluate_args

    args = evaluate_args(argv)
    assert args.run_dir == "runs/tiny"
    assert args.data == ["book.txt"]
    assert args.overrides == ["eval.per_device_batch_size=8", "data.block_size=16"]
