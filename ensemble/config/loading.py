"""Loading a config: YAML file -> dict, dotted overrides -> dict, dict -> typed, validated
dataclasses (:mod:`ensemble.config.schema`). Every mistake is one :class:`ConfigError` line."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ensemble.config.schema import ExperimentConfig
from ensemble.errors import ConfigError, did_you_mean


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, type-check,
    validate. Raises :class:`ConfigError` with a one-line message on any problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where else ""
            raise ConfigError(f"config file {path} is not valid YAML{at}; fix its syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}"
            )
        raw = loaded
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(ExperimentConfig, raw, "")
    cfg.validate()
    return cfg


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a plain dict (e.g. one saved in a run directory)."""
    cfg = from_dict(ExperimentConfig, raw, "")
    cfg.validate()
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw config dict; the value is parsed as YAML
    (so ``[1,2]`` is a list, ``null`` is empty, ``true`` a bool)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket): keep the literal string
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


# Names users bring from transformers' TrainingArguments and run_clm.py, and ours for them: an
# unknown key that is one of these is answered with ours (difflib would not find lr from
# learning_rate).
FOREIGN_NAMES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.num_epochs",
    "epochs": "train.num_epochs",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "batch_size": "train.per_device_batch_size",
    "lr_scheduler_type": "train.lr_scheduler",
    "adam_epsilon": "train.adam_eps",
    "torch_compile": "train.compile",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep_last",
    "per_device_eval_batch_size": "eval.per_device_batch_size",
    "output_dir": "output.dir",
    "overwrite_output_dir": "output.overwrite",
    "seed": "members.seeds",
    "report_to": "tracking.report_to",
    "run_name": "tracking.run_name",
    "model_name_or_path": "model.name_or_path",
    "dataset_name": "data.dataset",
    "dataset_config_name": "data.dataset_config",
    "train_file": "data.train_files",
    "validation_file": "data.validation_files",
}


def _suggestion(key: str, names: set[str]) -> str:
    if key in FOREIGN_NAMES:
        return f" (did you mean {FOREIGN_NAMES[key]}?)"
    return did_you_mean(key, names)


def from_dict(cls: type, raw: Any, where: str) -> Any:
    """Turn a raw mapping into dataclass ``cls``, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            place = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                f"unknown config key {place}{_suggestion(str(key), names)}; "
                f"valid keys{' in ' + where if where else ''}: {', '.join(sorted(names))}"
            )
    kwargs = {}
    for name in names:
        if name in raw:
            place = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(raw[name], hints[name], place)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, where)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {_show(value)} does not fit {tp}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(str, args))}")
    if origin is list:
        (item_tp,) = args
        if value is None:
            return []
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} expects a mapping, got {_show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "3e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. run_name=2024, which YAML reads as a number
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp} at {where}")
    raise ConfigError(f"{where} expects {tp.__name__}, got {_show(value)}; fix the value")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
