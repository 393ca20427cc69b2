"""Experiment trackers (TensorBoard, wandb) for one member's training.

Each member gets its own tracker run: TensorBoard writes to ``<run>/logs/<member>/``; wandb logs
a run named ``<run_name>/<member>`` in the group ``<run_name>``. wandb runs offline when it has
no credentials, so a run on an air-gapped node still records its metrics (``wandb sync`` later).
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ensemble.config.schema import ExperimentConfig

logger = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted keys with scalar values, the shape trackers accept as hyperparameters."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:  # lists and None: TensorBoard's hparams only take scalars
            flat[prefix] = str(value)

    walk("", cfg.to_dict())
    return flat


def make_trackers(
    cfg: ExperimentConfig, member_name: str, logs_dir: Path, run_id: str | None = None
) -> list[Any]:
    """Tracker instances for `Accelerator(log_with=...)` (an empty list logs nowhere). With the
    run's ``run_id``, a resumed member continues its wandb run instead of starting another."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    names = [n for n in cfg.tracking.report_to if n != "none"]
    run_name = cfg.tracking.run_name or Path(cfg.output.dir).resolve().name
    trackers: list[Any] = []
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker(run_name=member_name, logging_dir=logs_dir))
    if "wandb" in names:
        if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
            logger.info("wandb: no credentials found, logging offline (sync later with `wandb sync`)")
            os.environ["WANDB_MODE"] = "offline"
        logs_dir.mkdir(parents=True, exist_ok=True)
        trackers.append(
            WandBTracker(
                run_name=cfg.tracking.project,
                name=f"{run_name}/{member_name}",
                group=run_name,
                dir=str(logs_dir),
                **({"id": f"{run_id}-{member_name}", "resume": "allow"} if run_id else {}),
            )
        )
    return trackers
