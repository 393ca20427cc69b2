"""Experiment trackers: hyperparameters as dotted scalar keys, a TensorBoard run per member in its
own directory, and wandb's credentials found in the environment or ~/.netrc (else it runs
offline). The trackers recording a real training run are tested end to end in test_e2e.py.
Progress off a terminal: a log line at an interval, not tqdm's redraws."""

from __future__ import annotations

import dataclasses
import logging

from ensemble.config.schema import ExperimentConfig, TrackingConfig
from ensemble.runtime import progress as progress_module
from ensemble.runtime.tracking import flat_config, make_trackers, wandb_has_credentials


def test_hyperparameters_are_dotted_keys_with_scalar_values():
    cfg = ExperimentConfig()
    flat = flat_config(cfg)
    assert flat["train.lr"] == cfg.train.lr and flat["train.per_device_batch_size"] == 16
    # lists and None as text: TensorBoard's hyperparameters are scalars
    assert flat["members.seeds"] == str(cfg.members.seeds) and flat["data.block_size"] == "None"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert not any(isinstance(v, dict) for v in flat.values()) and "train" not in flat


def test_one_tensorboard_run_per_member_and_none_logs_nowhere(tmp_path):
    cfg = ExperimentConfig()
    none = dataclasses.replace(cfg, tracking=TrackingConfig(report_to=["none"]))
    assert make_trackers(none, "member-0", tmp_path / "logs" / "member-0") == []
    (tracker,) = make_trackers(cfg, "member-1", tmp_path / "logs" / "member-1")
    tracker.start()  # what Accelerator.init_trackers does
    tracker.log({"train/loss": 1.5}, step=3)
    tracker.finish()
    written = list((tmp_path / "logs" / "member-1").rglob("events.out.tfevents.*"))
    assert written, sorted(p.name for p in tmp_path.rglob("*"))


def test_wandb_credentials_from_the_environment_or_netrc(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_has_credentials()  # no file
    netrc.write_text("machine example.org login user password secret\n")
    netrc.chmod(0o600)
    assert not wandb_has_credentials()  # a file without wandb's host
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    assert wandb_has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not wandb_has_credentials()  # credentials for another host than the one in use
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_has_credentials()


def test_progress_off_a_terminal_is_a_log_line_per_interval(monkeypatch, caplog):
    # the clock's readings: the start, six updates, the close
    clock = iter([0.0, 1.0, 2.0, 11.0, 12.0, 13.0, 14.0, 26.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="ensemble.progress"):
        bar = progress_module.progress(total=14, desc="member-0 (seed 42)", unit="step")
        assert isinstance(bar, progress_module.LogProgress)  # pytest's stderr is not a terminal
        with bar:
            for step in range(6):
                bar.update(2)
                bar.set_postfix(loss=f"{5 - step:.1f}")
    # t=11 is the first reading 10 s past the start; the close writes the last update
    assert [r.getMessage() for r in caplog.records] == [
        "member-0 (seed 42): 6/14 steps (43%), 0.545 steps/s, 15 s left, loss=4.0",
        "member-0 (seed 42): 12/14 steps (86%), 0.462 steps/s, 4 s left, loss=0.0",
    ]


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(progress_module, "_on_terminal", lambda: True)
    bar = progress_module.progress(range(3), total=3, desc="eval", unit="batch")
    assert not isinstance(bar, progress_module.LogProgress) and list(bar) == [0, 1, 2]
