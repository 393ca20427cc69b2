"""Checkpoints of members in training, resuming from them, and stopping on a scheduler's signal.

A member's checkpoints live in ``<checkpoint.dir>/member-<i>/step-<NNNNNNN>/``: what Accelerate's
``save_state`` writes (weights, optimizer, scheduler, every rank's RNG states, the training
progress below as a registered custom object) plus ``checkpoint.json``, which records the step,
the number of processes and the config the member was trained with.

We keep Accelerate's ``save_state``/``load_state`` but not its automatic checkpoint folders
(``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K)``): those are written in
place, so a kill during a save leaves a folder that looks complete, and the oldest is deleted
*before* the new one exists. Here a checkpoint is written under a hidden temporary name, synced to
disk and renamed; older ones are pruned only once the new one is complete.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ensemble.config.schema import DEFAULT_ARCHITECTURE, ExperimentConfig
from ensemble.errors import EnsembleError, Preempted
from ensemble.files import TMP_MARK, atomic_write_json, fsync_tree, read_record
from ensemble.runtime.faults import inject

logger = logging.getLogger(__name__)

CHECKPOINT_INFO = "checkpoint.json"
STEP_DIR_RE = re.compile(r"^step-(\d+)$")
FAILED = "failed.json"

# Config keys that do not change what a member becomes: a resume may change them freely.
# (`train.compile` changes float rounding only: a resume that switches it continues the same
# member, though no longer bitwise equal to an uninterrupted run.)
NEUTRAL_KEYS = {
    "train.logging_steps",
    "train.peak_tflops",
    "train.compile",
    "data.cache_dir",
}


@dataclass
class Progress:
    """Where one member's training stands. Saved in every checkpoint through Accelerate
    (``register_for_checkpointing``), so a resumed loop continues exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already trained on (the data position)
    tokens: int = 0  # tokens of the logging windows already closed
    seconds: float = 0.0  # training time before this process took over
    last_loss: float = math.nan
    window_loss: float = 0.0  # sum of the micro-batch losses since the last log
    window_batches: int = 0
    window_tokens: int = 0
    checked_step: int = 0  # the last step at which the loss was seen to be finite

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def trajectory_config(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """The parts of the config that decide what a member becomes (model, data, training, its
    seed), flattened to dotted keys: a checkpoint may only be resumed under the same values.

    A model built from scratch is recorded by what it is, whichever keys gave it: a GPT-2 (from
    `model.gpt2_config`, or `model.architecture: gpt2` with `model.config`) as
    `model.gpt2_config`, the key checkpoints have always used; any other architecture as
    `model.architecture` and `model.config`. Config fields stay one value each."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix not in ("model.gpt2_config", "model.config"):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif prefix not in NEUTRAL_KEYS:
            flat[prefix] = value

    full = cfg.to_dict()
    model = {k: v for k, v in full["model"].items() if k not in ("architecture", "config", "gpt2_config")}
    if cfg.model.model_type == DEFAULT_ARCHITECTURE:
        if cfg.model.scratch_fields:  # (an empty mapping was never recorded)
            model["gpt2_config"] = cfg.model.scratch_fields
    elif cfg.model.model_type:
        model.update(architecture=cfg.model.model_type, config=cfg.model.scratch_fields)
    full["model"] = model
    for section in ("model", "data", "train"):
        walk(section, full[section])
    if cfg.adapter.method:  # (full fine-tunes never recorded the section)
        walk("adapter", full["adapter"])
    flat["members.seed"] = seed
    return flat


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The keys on which two trajectory configs differ, as `key: old -> new` (the first three),
    or None when they agree."""
    keys = sorted(saved.keys() | now.keys())
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if not changed:
        return None
    return "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """Whether ``flag`` is set on any rank of the current world. A collective: every rank of the
    world calls it at the same point, so that all take the same branch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def checkpoints_root(cfg: ExperimentConfig) -> Path:
    """The folder holding one checkpoint folder per member."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output.dir) / "checkpoints"


class MemberCheckpoints:
    """The checkpoints of one member: which exist, saving one atomically, pruning old ones."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = Path(root) / name

    @staticmethod
    def step_of(path: Path) -> int:
        m = STEP_DIR_RE.match(Path(path).name)
        if not m:
            raise EnsembleError(f"{path} is not a checkpoint folder (step-<N>); pass one written by training")
        return int(m.group(1))

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of interrupted saves are not)."""
        if not self.dir.is_dir():
            return []
        found = [
            (int(m.group(1)), p)
            for p in self.dir.iterdir()
            if (m := STEP_DIR_RE.match(p.name)) and (p / CHECKPOINT_INFO).is_file()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def failure(self) -> dict[str, Any] | None:
        path = self.dir / FAILED
        return json.loads(path.read_text()) if path.is_file() else None

    def record_failure(self, info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / FAILED, info)

    def clear_failure(self) -> None:
        (self.dir / FAILED).unlink(missing_ok=True)

    def drop_after(self, step: int) -> list[Path]:
        """Delete the checkpoints later than ``step`` (a member resumed from an earlier one
        continues a new history; a later checkpoint of the old one must not be resumed)."""
        dropped = [p for p in self.complete() if self.step_of(p) > step]
        for p in dropped:
            _remove(p)
        return dropped

    def save(
        self,
        accelerator: Any,
        progress: Progress,
        info: dict[str, Any],
        keep_last: int,
        member_index: int,
    ) -> Path:
        """Save the state of every rank of the member's group (all must call this) as
        ``step-<N>``; visible under that name only once complete. Returns its path."""
        final = self.dir / f"step-{progress.step:07d}"
        # One name for every rank (they all write into it), hence no pid in it.
        tmp = self.dir / f".{final.name}{TMP_MARK}save"
        main = accelerator.is_main_process
        failure: OSError | None = None
        accelerator.wait_for_everyone()
        if main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = e
        failure = _agree(accelerator, failure)
        if failure is None:
            try:
                accelerator.save_state(str(tmp), safe_serialization=True)
                inject("kill-checkpoint", member_index, progress.step)  # tests: SIGKILL mid-save
                if main:
                    atomic_write_json(
                        tmp / CHECKPOINT_INFO,
                        {
                            **info,
                            "step": progress.step,
                            "epoch": progress.epoch,
                            "batch_in_epoch": progress.batch_in_epoch,
                            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        },
                    )
                    fsync_tree(tmp)
            except OSError as e:
                failure = e
            failure = _agree(accelerator, failure)
        if failure is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.latest()
            raise EnsembleError(
                f"{self.name}: could not write its checkpoint at step {progress.step} in {self.dir} "
                f"({failure.strerror or failure}); nothing partial was kept"
                f"{f' and {last} is intact' if last else ''}: free disk space or fix the permissions "
                "(or set checkpoint.dir), then rerun with --resume auto"
            )
        if main:
            if final.exists():  # a resumed member passes a step it had saved before
                _remove(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            for old in self.complete()[:-keep_last]:
                _remove(old)
        accelerator.wait_for_everyone()
        return final


def _agree(accelerator: Any, failure: OSError | None) -> OSError | None:
    """Every rank of the group learns whether any rank failed, so that all stop together."""
    if any_rank(failure is not None, accelerator.device) and failure is None:
        return OSError("another rank of the group failed to write its part")
    return failure


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: renamed out of view first, so a kill half-way through the
    deletion cannot leave something that looks like a complete checkpoint."""
    doomed = path.with_name(f".{path.name}{TMP_MARK}delete")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint_info(path: Path) -> dict[str, Any]:
    return read_record(
        path,
        CHECKPOINT_INFO,
        f"{path} is not a complete checkpoint (no {CHECKPOINT_INFO}); pass a step-<N> folder under the "
        "run's checkpoints/member-<i>/",
    )


def check_resumable(
    path: Path,
    info: dict[str, Any],
    cfg: ExperimentConfig,
    name: str,
    seed: int,
    processes: int,
) -> None:
    """Refuse, in one line, a checkpoint that does not belong to this member under this config
    and this number of processes (the training data are checked by :func:`check_training_data`,
    once they are prepared)."""
    if info.get("member") == name and info.get("seed") != seed:
        raise EnsembleError(
            f"checkpoint {path} of {name} was trained with seed {info.get('seed')} but the config gives "
            f"{name} seed {seed}; keep members.seeds as they were (append new seeds at the end)"
        )
    if info.get("member") != name or info.get("seed") != seed:
        raise EnsembleError(
            f"checkpoint {path} is of {info.get('member')} (seed {info.get('seed')}), not {name} "
            f"(seed {seed}); pass a checkpoint of {name}"
        )
    changed = config_differences(info.get("config", {}), trajectory_config(cfg, seed))
    if changed:
        raise EnsembleError(
            f"checkpoint {path} was written with a different config ({changed}); resume with the "
            "config it was trained with (the run's config.yaml), or train into a new output.dir"
        )
    check_processes(path, info, name, processes)


def check_processes(path: Path, info: dict[str, Any], name: str, processes: int) -> None:
    """Refuse a checkpoint of ``name`` written by another number of processes."""
    if info.get("processes") != processes:
        raise EnsembleError(
            f"checkpoint {path} was written by {info.get('processes')} process(es) training {name}, "
            f"but this launch gives it {processes}; relaunch with the same number of processes per "
            "member (the data order and optimizer shards depend on it)"
        )


def check_training_data(path: Path, info: dict[str, Any], train_sha256: str) -> None:
    """Refuse a checkpoint trained on other tokens than this run's (same files, new content)."""
    if info.get("train_sha256") and info["train_sha256"] != train_sha256:
        raise EnsembleError(
            f"checkpoint {path} was trained on different data (training tokens sha256 "
            f"{info['train_sha256'][:12]}... now {train_sha256[:12]}...); resume with the data it "
            "was trained on, or train into a new output.dir"
        )


# --------------------------------------------------------------------------------------------
# Stopping on a signal


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A launcher forwards the Ctrl-C it got from the terminal to its workers, which got it too,
# within milliseconds; a person pressing Ctrl-C again to stop at once takes longer than this.
CTRL_C_REPEAT_WINDOW_S = 0.5


class StopRequest:
    """While active, SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) ask training to save a checkpoint at the
    next step boundary and exit with :data:`errors.PREEMPTED_EXIT` (so a scheduler can requeue the
    job, and a person can continue with --resume auto).

    ``publish`` and ``seen`` connect the processes of a launch (through its store): a request
    seen by one is published to all, so every group of ranks stops, not only the one that was
    signalled. A second signal while a stop is pending is taken as "stop now" and ends the
    process at once, unless it comes within ``repeat_window_s`` of the first: that is the same
    request delivered twice (Slurm signals every process of a job step, and the launcher, which
    is one of them, forwards what it got to its workers); for Ctrl-C the window is
    :data:`CTRL_C_REPEAT_WINDOW_S`, so that pressing it twice stops at once.
    """

    def __init__(
        self,
        publish: Callable[[], None] | None = None,
        seen: Callable[[], bool] | None = None,
        repeat_window_s: float = 10.0,
    ):
        self._publish = publish
        self._seen = seen
        self._repeat_window_s = repeat_window_s
        self._first_at = 0.0
        self.signal: int | None = None
        self._published = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.signal is not None:
            window = self._repeat_window_s
            if signum == signal.SIGINT:
                window = min(window, CTRL_C_REPEAT_WINDOW_S)
            if time.monotonic() - self._first_at < window:
                return
            raise Preempted(
                f"second {name} while stopping: stopped at once, without a checkpoint of the steps "
                "since the last one"
            )
        self.signal, self._first_at = signum, time.monotonic()
        logger.warning(
            "received %s: saving a checkpoint at the next step boundary, then exiting%s",
            name,
            " (Ctrl-C again to stop at once, losing the steps since the last checkpoint)"
            if signum == signal.SIGINT
            else "",
        )

    def requested(self) -> bool:
        if self.signal is not None:
            if self._publish and not self._published:
                self._published = True
                self._publish()
            return True
        return bool(self._seen and self._seen())

    def agreed(self, device: torch.device | str) -> bool:
        """Whether any process of the current world asks to stop (a collective, see
        :func:`any_rank`): all ranks of a group stop at the same step."""
        return any_rank(self.requested(), device)

    def reason(self) -> str:
        return (
            signal.Signals(self.signal).name
            if self.signal is not None
            else "a stop request from another rank"
        )
