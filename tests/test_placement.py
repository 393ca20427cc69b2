"""Placement of members on ranks, DeepSpeed ZeRO, and failure handling, through the real launcher.

Every multi-process run goes through `torchrun` with the gloo backend on CPU. Parity: a member
trained by a group of k ranks with per-device batch b must equal the same member trained alone
by one process with batch k·b (dropout off, so that nothing depends on the rank).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ensemble.cli.train import train_main
from ensemble.config.schema import ExperimentConfig, ParallelConfig
from ensemble.errors import EnsembleError
from ensemble.runtime.placement import Placement, estimate_bytes_per_device, parallel_group_size, plan_layout
from ensemble.runtime.zero import check_batch, load_zero

from .conftest import PYTHON, REPO, free_port, tiny_overrides

NO_DROPOUT = (
    "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64, resid_pdrop: 0, embd_pdrop: 0, attn_pdrop: 0}"
)
SEEDS = [11, 12, 13]

# --------------------------------------------------------------------------------------------
# The layout rules (no processes)


@pytest.mark.parametrize(
    "world, members, group_size",
    [(1, 3, 1), (2, 2, 1), (4, 2, 2), (8, 2, 4), (2, 3, 1), (4, 3, 2), (6, 4, 2), (4, 6, 1), (3, 2, 3)],
)
def test_parallel_group_size_rule(world, members, group_size):
    assert parallel_group_size(world, members) == group_size


def test_layout_assigns_members_in_rounds():
    layout = plan_layout(
        ParallelConfig(placement="parallel"), world_size=4, num_members=5, local_world_size=4
    )
    assert (layout.mode, layout.group_size, layout.num_groups, layout.rounds) == ("parallel", 1, 4, 2)
    assert [layout.members_of(g) for g in range(4)] == [[0, 4], [1], [2], [3]]
    assert [layout.group_of(r) for r in range(4)] == [0, 1, 2, 3]
    two = plan_layout(ParallelConfig(placement="parallel"), world_size=4, num_members=2, local_world_size=4)
    assert [two.ranks_of(g) for g in range(2)] == [[0, 1], [2, 3]]
    assert [two.rank_in_group(r) for r in range(4)] == [0, 1, 0, 1]
    assert two.describe()[1:] == [
        "  group 0 (ranks 0-1) trains member-0",
        "  group 1 (ranks 2-3) trains member-1",
    ]
    seq = plan_layout(ParallelConfig(placement="sequential"), world_size=4, num_members=3, local_world_size=4)
    assert (seq.mode, seq.group_size, seq.members_of(0)) == ("sequential", 4, [0, 1, 2])


def test_auto_falls_back_to_sequential_when_a_member_does_not_fit():
    cfg = ParallelConfig(placement="auto")
    asked = []

    def fits(k: int) -> bool:
        asked.append(k)
        return False

    assert plan_layout(cfg, 4, 2, 4, fits=fits).mode == "sequential"
    assert asked == [2]
    assert plan_layout(cfg, 4, 2, 4, fits=lambda k: True).mode == "parallel"


@pytest.mark.parametrize(
    "cfg, world, members, local, message",
    [
        (ParallelConfig(placement="parallel", group_size=3), 4, 2, 4,
         "parallel.group_size=3 does not divide the 4 launched processes; use a divisor of 4"),
        (ParallelConfig(placement="parallel", group_size=1), 4, 2, 4,
         "4 groups of 1 ranks for 2 member(s) would leave groups idle; set parallel.group_size to at least 2"),
        (ParallelConfig(placement="parallel", group_size=4, groups_within_node=True), 8, 2, 6,
         "parallel.groups_within_node=true needs the group size (4) to divide the processes per node (6)"),
    ],
)  # fmt: skip
def test_impossible_layouts_name_the_numbers(cfg, world, members, local, message):
    with pytest.raises(EnsembleError) as e:
        plan_layout(cfg, world, members, local)
    assert message in str(e.value)


def test_layout_dataclass_validates_itself():
    with pytest.raises(EnsembleError, match="group size 3 does not divide the 4 processes"):
        Placement("parallel", 4, 2, 3)
    with pytest.raises(EnsembleError, match="sequential placement trains on all 4 processes"):
        Placement("sequential", 4, 2, 2)


def test_launch_info_and_process_group_settings_come_from_the_launchers_environment(monkeypatch):
    import datetime as dt

    from ensemble.runtime.distributed import accelerator_kwargs, backend, state_kwargs
    from ensemble.runtime.launch_env import launch_info

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    launch_info.cache_clear()  # read once per process: read again under this test's environment
    try:
        alone = launch_info()
        assert (alone.rank, alone.world_size, alone.local_world_size, alone.distributed) == (0, 1, 1, False)
        assert state_kwargs(deepspeed=False, timeout_s=60) == {"cpu": not torch.cuda.is_available()}
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        launch_info.cache_clear()
        info = launch_info()
        assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
        assert backend() == ("nccl" if torch.cuda.is_available() else "gloo")
        kwargs = state_kwargs(deepspeed=False, timeout_s=60)
        assert kwargs["backend"] == backend() and kwargs["timeout"] == dt.timedelta(seconds=60)
        assert state_kwargs(deepspeed=True, timeout_s=60)["cpu"] is False  # DeepSpeed: told the backend
        (handler,) = accelerator_kwargs(deepspeed=False, timeout_s=60)["kwargs_handlers"]
        assert handler.timeout == dt.timedelta(seconds=60) and handler.backend == backend()
    finally:
        launch_info.cache_clear()


def test_memory_estimate_shrinks_with_zero_sharding():
    from transformers import GPT2Config

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    n = 124_000_000
    plain = estimate_bytes_per_device(config, n, 8, 1024, 4, 0, True)
    zero2 = estimate_bytes_per_device(config, n, 8, 1024, 4, 2, True)
    zero3 = estimate_bytes_per_device(config, n, 8, 1024, 4, 3, True)
    assert plain > zero2 > zero3
    assert plain - zero3 == pytest.approx(n * (16 - 16 / 4), rel=1e-6)


# --------------------------------------------------------------------------------------------
# DeepSpeed config checks (no processes)


def _zero_cfg(tmp_path: Path, content: dict, **train) -> ExperimentConfig:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    cfg = ExperimentConfig()
    cfg.parallel.deepspeed = str(path)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_deepspeed_json_batch_values_must_match_ours(tmp_path):
    cfg = _zero_cfg(
        tmp_path, {"train_batch_size": 32, "zero_optimization": {"stage": 3}}, per_device_batch_size=4
    )
    zero = load_zero(cfg)
    check_batch(zero, cfg, group_size=8)  # 4 x 1 x 8 = 32: consistent
    with pytest.raises(EnsembleError) as e:
        check_batch(zero, cfg, group_size=2)
    assert (
        "sets train_batch_size=32 but this layout needs 4 per device x 1 accumulation x 2 data-parallel ranks = 8"
        in str(e.value)
    )
    assert zero.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero.config["train_micro_batch_size_per_gpu"] == "auto"


def test_deepspeed_json_may_not_bring_its_own_optimizer(tmp_path):
    cfg = _zero_cfg(tmp_path, {"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}})
    with pytest.raises(
        EnsembleError,
        match="defines a optimizer; remove it: the optimizer and learning-rate schedule come from train",
    ):
        load_zero(cfg)
    with pytest.raises(EnsembleError, match="has no zero_optimization.stage"):
        load_zero(_zero_cfg(tmp_path, {"bf16": {"enabled": True}}))
    cfg.parallel.deepspeed = str(tmp_path / "missing.json")
    with pytest.raises(EnsembleError, match="missing.json not found"):
        load_zero(cfg)


def test_shipped_deepspeed_configs_load():
    for stage in (2, 3):
        cfg = ExperimentConfig()
        cfg.parallel.deepspeed = str(REPO / "configs" / "deepspeed" / f"zero{stage}.json")
        zero = load_zero(cfg)
        assert zero.stage == stage
        check_batch(zero, cfg, group_size=8)


# --------------------------------------------------------------------------------------------
# Through the real launcher


def _weights(run: Path, member: int) -> dict[str, torch.Tensor]:
    return load_file(run / "members" / f"member-{member}" / "model.safetensors")


def _training(run: Path, member: int) -> dict:
    return json.loads((run / "members" / f"member-{member}" / "member.json").read_text())["training"]


def assert_same_member(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a.keys() & b.keys():  # a ZeRO checkpoint may also hold the tied lm_head copy
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert "transformer.wte.weight" in a.keys() & b.keys()


@pytest.fixture(scope="module")
def solo(tmp_path_factory, datasets_cache) -> dict[int, Path]:
    """Each seed trained alone by this one process, with global batch 4 and 8."""
    root = tmp_path_factory.mktemp("solo")
    runs = {}
    for batch in (4, 8):
        out = root / f"batch{batch}"
        argv = tiny_overrides(
            out,
            datasets_cache,
            members__seeds=str(SEEDS),
            model__gpt2_config=NO_DROPOUT,
            train__per_device_batch_size=batch,
        )
        assert train_main(argv) == 0
        runs[batch] = out
    return runs


def _torchrun(procs: int, out: Path, cache: Path, timeout: int = 600, env: dict | None = None, **extra):
    torchrun = Path(PYTHON).with_name("torchrun")
    argv = tiny_overrides(out, cache, model__gpt2_config=NO_DROPOUT, **extra)
    cmd = [str(torchrun), "--nproc_per_node", str(procs), "launch/train.py", *argv]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - start


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def check_run(out: Path, expected_ranks: list[list[int]], reference: Path) -> None:
    """Which ranks trained each member; members differ; each loads; each equals its solo twin."""
    from transformers import AutoModelForCausalLM

    assert [_training(out, i)["ranks"] for i in range(len(expected_ranks))] == expected_ranks
    weights = [_weights(out, i) for i in range(len(expected_ranks))]
    for i, w in enumerate(weights):
        assert_same_member(w, _weights(reference, i))
        model = AutoModelForCausalLM.from_pretrained(out / "members" / f"member-{i}")
        assert model.transformer.wte.weight.shape == (259, 32)
    key = "transformer.wte.weight"
    for i in range(1, len(weights)):
        assert not torch.equal(weights[0][key], weights[i][key]), f"member-0 and member-{i} are equal"


@pytest.mark.slow
def test_two_ranks_two_members_one_rank_each(tmp_path, datasets_cache, solo):
    out = tmp_path / "run"
    proc, _ = _torchrun(2, out, datasets_cache, members__seeds="[11, 12]", parallel__placement="parallel")
    _ok(proc)
    assert "group 0 (rank 0) trains member-0" in proc.stderr
    assert "group 1 (rank 1) trains member-1" in proc.stderr
    check_run(out, [[0], [1]], solo[4])


@pytest.mark.slow
def test_four_ranks_two_members_in_groups_of_two(tmp_path, datasets_cache, solo):
    out = tmp_path / "run"
    proc, _ = _torchrun(4, out, datasets_cache, members__seeds="[11, 12]")  # placement auto
    _ok(proc)
    assert (
        "placement parallel: 4 process(es), 2 member(s), 2 group(s) of 2 rank(s), 1 round(s)" in proc.stderr
    )
    check_run(out, [[0, 1], [2, 3]], solo[8])  # DDP over 2 ranks x batch 4 == one process x batch 8
    assert [_training(out, i)["processes"] for i in (0, 1)] == [2, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == {
        "mode": "parallel",
        "processes": 4,
        "group_size": 2,
        "groups": 2,
        "rounds": 1,
    }
    assert manifest["timing"]["train_seconds"] > 0


@pytest.mark.slow
def test_two_ranks_three_members_in_rounds(tmp_path, datasets_cache, solo):
    out = tmp_path / "run"
    proc, _ = _torchrun(2, out, datasets_cache, members__seeds=str(SEEDS), parallel__placement="parallel")
    _ok(proc)
    assert "2 group(s) of 1 rank(s), 2 round(s)" in proc.stderr
    assert "group 0 (rank 0) trains member-0, member-2" in proc.stderr
    check_run(out, [[0], [1], [0]], solo[4])


@pytest.mark.slow
def test_sequential_two_ranks(tmp_path, datasets_cache, solo):
    out = tmp_path / "run"
    proc, _ = _torchrun(2, out, datasets_cache, members__seeds="[11, 12]", parallel__placement="sequential")
    _ok(proc)
    check_run(out, [[0, 1], [0, 1]], solo[8])


@pytest.mark.slow
@pytest.mark.parametrize(
    "placement, stage", [("sequential", 2), ("sequential", 3), ("parallel", 2)], ids=lambda v: str(v)
)
def test_deepspeed_zero_on_two_ranks(tmp_path, datasets_cache, solo, stage, placement):
    """sequential: ZeRO shards each member over both ranks; parallel: 3 members in rounds, so
    one process trains two DeepSpeed members one after the other (ZeRO-3 with a rank per member:
    test_accelerate_launch_with_the_shipped_zero3_config)."""
    out = tmp_path / "run"
    seeds = "[11, 12]" if placement == "sequential" else str(SEEDS)
    proc, _ = _torchrun(
        2,
        out,
        datasets_cache,
        members__seeds=seeds,
        parallel__placement=placement,
        parallel__deepspeed=str(REPO / "configs" / "deepspeed" / f"zero{stage}.json"),
    )
    _ok(proc)
    if placement == "sequential":  # gathered full weights, equal to the member trained alone
        check_run(out, [[0, 1], [0, 1]], solo[8])
    else:
        check_run(out, [[0], [1], [0]], solo[4])
    assert {_training(out, i)["zero_stage"] for i in (0, 1)} == {stage}


@pytest.mark.slow
@pytest.mark.parametrize("zero", [None, 2], ids=["ddp", "zero2"])
def test_compiled_members_in_a_group_of_two_ranks(tmp_path, datasets_cache, solo, zero):
    """train.compile=true (forced on CPU) under DDP and under DeepSpeed ZeRO-2, both ranks training
    each member: the members equal their eager solo twins up to float rounding, and load."""
    out = tmp_path / "run"
    extra = {"parallel__deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")} if zero else {}
    proc, _ = _torchrun(
        2,
        out,
        datasets_cache,
        members__seeds="[11, 12]",
        parallel__placement="sequential",
        train__compile="true",
        **extra,
    )
    _ok(proc)
    assert "torch.compile on (train.compile=True)" in proc.stderr
    check_run(out, [[0, 1], [0, 1]], solo[8])
    assert [(_training(out, i)["compiled"], _training(out, i)["zero_stage"]) for i in (0, 1)] == [
        (True, zero)
    ] * 2


def _two_nodes(out: Path, cache: Path, **extra) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents on this machine acting as two nodes of 2 processes each."""
    port = free_port()
    torchrun = Path(PYTHON).with_name("torchrun")
    argv = tiny_overrides(out, cache, model__gpt2_config=NO_DROPOUT, **extra)
    agents = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "launch/train.py",
                *argv,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


@pytest.mark.slow
def test_two_nodes_one_group_per_node(tmp_path, datasets_cache, solo):
    out = tmp_path / "run"
    node0, node1 = _two_nodes(
        out, datasets_cache, members__seeds=str(SEEDS), parallel__groups_within_node="true"
    )
    _ok(node0)
    _ok(node1)
    assert "group 0 (ranks 0-1) trains member-0, member-2" in node0.stderr
    check_run(out, [[0, 1], [2, 3], [0, 1]], solo[8])  # node 0: members 0 and 2; node 1: member 1

    # a group of 4 would span both nodes: refused when groups must stay within a node
    node0, node1 = _two_nodes(
        tmp_path / "spanning",
        datasets_cache,
        members__seeds="[11]",
        parallel__group_size=4,
        parallel__groups_within_node="true",
    )
    assert node0.returncode != 0 and node1.returncode != 0
    assert "needs the group size (4) to divide the processes per node (2)" in node0.stderr


@pytest.mark.slow
def test_a_failing_member_ends_the_job_quickly_with_its_error_first(tmp_path, datasets_cache):
    import os

    out = tmp_path / "run"
    env = {**os.environ, "ENSEMBLE_FAULT": "raise:1:3"}
    proc, elapsed = _torchrun(
        2,
        out,
        datasets_cache,
        timeout=300,
        env=env,
        members__seeds="[11, 12]",
        parallel__placement="parallel",
        train__max_steps=2000,
        parallel__timeout_s=60,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0] == (
        "error: [rank 1/2] RuntimeError: injected failure in member-1 at step 3 (ENSEMBLE_FAULT)"
    )
    assert elapsed < 120, f"the job took {elapsed:.0f}s to stop"  # member-0 alone needs 2000 steps
    assert not (out / "members" / "member-1").exists()
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_bad_layout_and_deepspeed_batch_fail_before_training(tmp_path, datasets_cache):
    proc, _ = _torchrun(2, tmp_path / "a", datasets_cache, members__seeds="[11, 12]", parallel__group_size=3)
    assert proc.returncode != 0
    assert "error: [rank 0/2] parallel.group_size=3 does not divide the 2 launched processes" in proc.stderr
    assert not (tmp_path / "a" / "members").exists()

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    proc, _ = _torchrun(
        2,
        tmp_path / "b",
        datasets_cache,
        members__seeds="[11, 12]",
        parallel__placement="sequential",
        parallel__deepspeed=str(ds),
    )
    assert proc.returncode != 0
    assert (
        "sets train_batch_size=32 but this layout needs 4 per device x 1 accumulation x 2 data-parallel ranks = 8"
        in proc.stderr
    )
    assert not (tmp_path / "b" / "members").exists()


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_zero3_config(tmp_path, datasets_cache, solo):
    """The launcher path: `accelerate launch` with configs/accelerate/zero3.yaml (on 2 CPU processes)."""
    import yaml

    launcher = yaml.safe_load((REPO / "configs" / "accelerate" / "zero3.yaml").read_text())
    launcher.update(num_processes=2, use_cpu=True)
    config_file = tmp_path / "zero3-cpu.yaml"
    config_file.write_text(yaml.safe_dump(launcher))
    out = tmp_path / "run"
    argv = tiny_overrides(out, datasets_cache, model__gpt2_config=NO_DROPOUT, members__seeds="[11, 12]")
    accelerate = Path(PYTHON).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config_file), "launch/train.py", *argv]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    _ok(proc)
    assert [_training(out, i)["ranks"] for i in (0, 1)] == [[0], [1]]  # auto: parallel, a rank each
    for i in (0, 1):
        assert _training(out, i)["zero_stage"] == 3
        assert_same_member(_weights(out, i), _weights(solo[4], i))


@pytest.mark.slow
def test_shipped_cpu_debug_config_starts_two_ranks(tmp_path, datasets_cache):
    import os

    out = tmp_path / "run"
    argv = tiny_overrides(out, datasets_cache, members__seeds="[11, 12]")
    accelerate = Path(PYTHON).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--config_file",
        "configs/accelerate/cpu-debug.yaml",
        "launch/train.py",
        *argv,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    _ok(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env))
    assert [_training(out, i)["ranks"] for i in (0, 1)] == [[0], [1]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slow", "dead"])
def test_long_waits_are_bounded_by_liveness_not_by_time(mode):
    """A peer that is slower than parallel.timeout_s is waited for; one that is gone is not."""
    torchrun = Path(PYTHON).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "tests/helpers/worlds_probe.py", mode]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("rank 0"))
    seconds = float(line.split(" after ")[1].split("s")[0])
    if mode == "slow":
        assert "passed" in line and seconds > 5  # waited past the 3 s timeout for a live peer
    else:
        assert "rank 1 gave no sign of life for 3s" in line
        assert seconds < 20  # heartbeats stop: noticed after ~timeout + one beat
