"""DeepSpeed ZeRO: the JSON config, checked against our config, and one plugin per member.

Batch size, gradient accumulation and clipping are set in one place, our `train.*`; the JSON
says "auto" for them and Accelerate fills them in. The optimizer and the schedule also come
from `train.*`, so a JSON that defines its own is refused rather than silently overridden.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble.config.schema import ExperimentConfig
from ensemble.errors import EnsembleError


@dataclass(frozen=True)
class ZeroSetup:
    """A validated DeepSpeed config."""

    config: dict[str, Any]
    source: str

    @property
    def stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])


def load_zero(cfg: ExperimentConfig) -> ZeroSetup | None:
    """The DeepSpeed config of this run: `parallel.deepspeed`, else the one `accelerate launch`
    was given, else None (no DeepSpeed)."""
    env = os.environ
    launcher_ds = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    path = cfg.parallel.deepspeed or (env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if launcher_ds else None)
    if path and path != "none":
        p = Path(path)
        if not p.is_file():
            raise EnsembleError(
                f"DeepSpeed config {path} not found; fix parallel.deepspeed or the launcher config"
            )
        try:
            config = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise EnsembleError(f"DeepSpeed config {path} is not valid JSON ({e}); fix it") from None
        source = str(p)
    elif launcher_ds:  # an Accelerate config with zero_stage but no JSON file
        config = {"zero_optimization": {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
        source = "accelerate launch (zero_stage)"
    else:
        return None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise EnsembleError(
                f"DeepSpeed config {source} defines a {section}; remove it: the optimizer and "
                "learning-rate schedule come from train.* (AdamW, train.lr_scheduler)"
            )
    if "zero_optimization" not in config or "stage" not in config["zero_optimization"]:
        raise EnsembleError(f"DeepSpeed config {source} has no zero_optimization.stage; add one (0-3)")
    config = copy.deepcopy(config)
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        config.setdefault(key, "auto")
    for precision in ("bf16", "fp16"):
        config.setdefault(precision, {"enabled": "auto"})
    if int(config["zero_optimization"]["stage"]) == 3:
        # Members are saved as full Hugging Face checkpoints: gather the shards on save.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ZeroSetup(config=config, source=source)


def check_batch(zero: ZeroSetup, cfg: ExperimentConfig, group_size: int) -> None:
    """Fail before training when explicit JSON values contradict our batch settings."""
    t = cfg.train
    expected = {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * group_size,
    }
    for key, ours in expected.items():
        theirs = zero.config.get(key, "auto")
        if theirs != "auto" and int(theirs) != ours:
            how = (
                f"{t.per_device_batch_size} per device x {t.gradient_accumulation_steps} accumulation "
                f"x {group_size} data-parallel ranks = {ours}"
                if key == "train_batch_size"
                else f"train.* gives {ours}"
            )
            raise EnsembleError(
                f"DeepSpeed config {zero.source} sets {key}={theirs} but this layout needs {how}; "
                f'set it to "auto" so that train.* decides'
            )


def make_plugin(zero: ZeroSetup, cfg: ExperimentConfig) -> Any:
    """A fresh DeepSpeed plugin for one member (Accelerate fills "auto" values in place, so
    members must not share one)."""
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(
        hf_ds_config=copy.deepcopy(zero.config),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        gradient_clipping=cfg.train.max_grad_norm or 0.0,  # 0 disables clipping in DeepSpeed
        zero3_init_flag=False,
    )


def deepspeed_setup(cfg: ExperimentConfig) -> ZeroSetup | None:
    """The run's DeepSpeed setup (None without one), and the environment Accelerate needs for it."""
    zero = load_zero(cfg)
    if zero:
        if "LOCAL_RANK" not in os.environ:
            raise EnsembleError(
                "DeepSpeed needs a distributed launcher, even for one process: run with "
                "`accelerate launch` or `torchrun`"
            )
        # What `accelerate launch` sets for a DeepSpeed config; without it Accelerate's process
        # state would not treat the world as distributed (its barriers would do nothing).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return zero
