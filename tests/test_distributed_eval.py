"""The distributed evaluator through the real launcher: exactly the single-process results.

Data-sharded with 2 and 3 processes (uneven shards, and fewer batches than processes) and
member-sharded (one group per member; groups of 1 and of 2 processes). Every number in
results.json must equal the single-process one to 1e-6 relative, token counts exactly,
including fitted temperatures and weights, intervals, the ensemble-size curve, the uncertainty
decomposition, selective prediction and out-of-domain detection (--ood); and the per-token
export (--tokens-out) must hold the same rows.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ensemble.config.schema import DataConfig, EvalConfig, ExperimentConfig, ModelConfig
from ensemble.core.members import MemberSpec, build_model, fit_model_config, load_model_config, save_member
from ensemble.core.tokenization import load_tokenizer

from .conftest import PYTHON, REPO, eval_blocks

pytestmark = pytest.mark.slow
IGNORED = {"created", "processes", "mode", "path", "tokens_out"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sherlock, datasets_cache):
    """3 small members (different seeds) and a config whose data is slices of a real book."""
    root = tmp_path_factory.mktemp("dist-eval")
    text = sherlock.read_text()
    for name, (start, stop) in {
        "train": (0, 4000),
        "validation": (4000, 16000),
        "test": (16000, 40000),
    }.items():
        (root / f"{name}.txt").write_text(text[start:stop])
    (root / "ood.txt").write_text(text[60000:66000])
    model_cfg = ModelConfig(
        gpt2_config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}, tokenizer="byte"
    )
    tok = load_tokenizer(model_cfg)
    config = fit_model_config(model_cfg, load_model_config(model_cfg), tok)
    cfg = ExperimentConfig(
        model=model_cfg,
        data=DataConfig(
            train_files=[str(root / "train.txt")],
            validation_files=[str(root / "validation.txt")],
            test_files=[str(root / "test.txt")],
            txt_sample_by="paragraph",
            block_size=32,
            cache_dir=str(datasets_cache),
        ),
        eval=EvalConfig(
            per_device_batch_size=64, chunk_tokens=500, temperature_scaling=True, bootstrap_samples=200
        ),
    )
    members = []
    for i, seed in enumerate((5, 6, 7)):
        dest = root / "members" / f"member-{i}"
        save_member(dest, build_model(model_cfg, config, seed), tok, MemberSpec(i, seed), cfg, {})
        members.append(dest)
    cfg_path = root / "config.yaml"
    cfg_path.write_text(cfg.to_yaml())
    return root, members, cfg_path


def _evaluate(setup, procs: int, out: Path, members: list[Path], *overrides: str) -> dict:
    root, _, cfg_path = setup
    args = ["launch/evaluate.py", "--members", *map(str, members), "--config", str(cfg_path), "--output", str(out),
            "--ood", str(root / "ood.txt"), "--tokens-out", str(out / "tokens.parquet"), *overrides]  # fmt: skip
    if procs == 1:
        cmd = [PYTHON, *args]
    else:
        cmd = [str(Path(PYTHON).with_name("torchrun")), "--nproc_per_node", str(procs), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    results["tokens_table"] = tokens_table(out / "tokens.parquet")
    assert not list(out.glob(".*"))  # no part files left
    return results


def tokens_table(path: Path) -> dict:
    """The per-token export as {column: array}; floats compare to 1e-6 like every other number."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def assert_same(a, b, where: str = "") -> int:
    """Every number equal to 1e-6 relative (integers exactly); returns how many were compared."""
    if isinstance(a, np.ndarray):  # a column of the token export
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-12, err_msg=where)
        else:
            assert np.array_equal(a, b), where
        return a.size
    if isinstance(a, dict):
        assert set(a) == set(b), where
        return sum(assert_same(a[k], b[k], f"{where}.{k}") for k in a if k not in IGNORED)
    if isinstance(a, list):
        assert len(a) == len(b), where
        return sum(assert_same(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, bool) or a is None or isinstance(a, str):
        assert a == b, where
        return 0
    if isinstance(a, int):
        assert a == b, where
        return 1
    if math.isinf(a):
        assert a == b, where
    else:
        assert b == pytest.approx(a, rel=1e-6, abs=1e-12), where
    return 1


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    _, members, _ = setup
    out = tmp_path_factory.mktemp("ref")
    return {
        "three": _evaluate(setup, 1, out / "three", members),
        "big-batches": _evaluate(setup, 1, out / "big", members, "eval.per_device_batch_size=512"),
        "two": _evaluate(setup, 1, out / "two", members[:2]),
    }


def test_reference_is_meaningful(reference):
    r = reference["three"]
    assert r["data"]["blocks"] == eval_blocks(r["data"]["tokens"], 32) > 512  # more than 1 big batch
    assert all(m["temperature"] != 1.0 for m in r["members"])
    assert len(r["combiners"]["weighted"]["weights"]) == 3


@pytest.mark.parametrize("procs", [2, 3])
def test_data_sharded_equals_single_process(setup, reference, tmp_path, procs):
    _, members, _ = setup
    got = _evaluate(setup, procs, tmp_path / "out", members)
    assert got["evaluation"]["processes"] == procs
    assert got["ensemble"]["tokens"] == reference["three"]["ensemble"]["tokens"]
    assert assert_same(reference["three"], got) > 200


def test_fewer_batches_than_processes(setup, reference, tmp_path):
    _, members, _ = setup
    assert math.ceil(reference["big-batches"]["data"]["blocks"] / 512) == 2  # 2 batches, 3 processes
    got = _evaluate(setup, 3, tmp_path / "out", members, "eval.per_device_batch_size=512")
    assert_same(reference["big-batches"], got)


@pytest.mark.parametrize("procs, members_used, key", [(3, 3, "three"), (4, 2, "two")])
def test_member_sharded_equals_single_process(setup, reference, tmp_path, procs, members_used, key):
    _, members, _ = setup
    got = _evaluate(setup, procs, tmp_path / "out", members[:members_used], "eval.mode=member")
    assert got["evaluation"]["mode"] == "member"
    assert assert_same(reference[key], got) > 100


def test_member_mode_needs_a_multiple_of_the_members(setup, tmp_path):
    root, members, cfg_path = setup
    cmd = [str(Path(PYTHON).with_name("torchrun")), "--nproc_per_node", "2", "launch/evaluate.py", "--members",
           *map(str, members), "--config", str(cfg_path), "--output", str(tmp_path / "o"), "eval.mode=member"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (
        "eval.mode=member needs the number of processes (2) to be a multiple of the number of members (3)"
        in proc.stderr
    )
    assert not (tmp_path / "o" / "results.json").exists()
