"""Experiment trackers: hyperparameters as dotted scalar keys, a TensorBoard run per member in its
own directory, and wandb's credentials found in the environment or ~/.netrc (else it runs
offline). The trackers recording a real training run are tested end to end in test_e2e.py."""

from __future__ import annotations

import dataclasses

from ensemble.config.schema import ExperimentConfig, TrackingConfig
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
