"""Shared fixtures: the real text and GPT-2 tokenizer from ../shared/data, tiny configs."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ENSEMBLE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        message = f"{path} not found: the shared test data (../shared/data, or set ENSEMBLE_SHARED_DATA)"
        if os.environ.get("REQUIRE_SHARED_DATA"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def sherlock(shared_data: Path) -> Path:
    return _need(shared_data / "sherlock_holmes.txt")


@pytest.fixture(scope="session")
def shakespeare(shared_data: Path) -> Path:
    return _need(shared_data / "tinyshakespeare.txt")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real GPT-2 tokenizer as a local directory in Hugging Face format (what
    `AutoTokenizer.from_pretrained('gpt2')` would give, without the Hub)."""
    import shutil

    from transformers import AutoTokenizer, GPT2Tokenizer

    src = _need(shared_data / "gpt2-tokenizer")
    hub_layout = tmp_path_factory.mktemp("gpt2-files")  # vocab.json + merges.txt, as in the Hub repo
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, hub_layout / name)
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    GPT2Tokenizer.from_pretrained(hub_layout).save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("Hello world")["input_ids"] == [15496, 995]
    return out


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-datasets-cache")


def tiny_overrides(out: Path, cache: Path, **extra: object) -> list[str]:
    """A run small enough for a test: 1-layer GPT-2, byte tokenizer, Python docs, a few steps."""
    values: dict[str, object] = {
        "model.gpt2_config": "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 64}",
        "model.tokenizer": "byte",
        "data.dataset": "builtin:python-docs",
        "data.block_size": 64,
        "data.cache_dir": str(cache),
        "members.seeds": "[42, 123]",
        "train.max_steps": 4,
        "train.per_device_batch_size": 4,
        "train.lr": 1e-3,
        "train.logging_steps": 2,
        "eval.per_device_batch_size": 64,
        "tracking.report_to": "[none]",
        "output.dir": str(out),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


PYTHON = sys.executable


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_blocks(tokens: int, block_size: int) -> int:
    """The blocks an evaluation cuts a split of ``tokens`` into: the last may be short, but a last
    block of one token (nothing in it is predicted) is not a block."""
    full, rest = divmod(tokens, block_size)
    return full + (rest > 1)


def scored_tokens(data: dict) -> int:
    """The tokens an evaluation scores, from results.json's "data": every block predicts all but
    its first token (a dropped one-token tail, none)."""
    assert data["blocks"] == eval_blocks(data["tokens"], data["block_size"])
    return data["tokens"] - data["blocks"] - (data["tokens"] % data["block_size"] == 1)


def weights(run: Path, member: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "members" / f"member-{member}" / "model.safetensors")


def assert_same_members(a: Path, b: Path, members) -> None:
    """The members of runs ``a`` and ``b`` with these indices are bitwise equal."""
    import torch

    for i in members:
        wa, wb = weights(a, i), weights(b, i)
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not different, f"member-{i} differs from its uninterrupted twin in {different[:3]}"


# --------------------------------------------------------------------------------------------
# Every results.json a test writes conforms to the schema (ensemble/core/results.py)


@pytest.fixture(autouse=True)
def _results_json_conforms(request: pytest.FixtureRequest):
    """After each test that has a tmp_path: its results.json files validate against the JSON
    Schema. (Module- and session-scoped directories are swept at the end of the session.)"""
    # asked for here, so that the directory outlives this fixture's teardown
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None:
        from tests.helpers.results_schema import invalid_results

        bad = invalid_results(root)
        if bad:
            pytest.fail("results.json does not conform to the schema:\n" + "\n".join(bad), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or session.config.option.collectonly:
        return
    from tests.helpers.results_schema import invalid_results

    bad = invalid_results(factory.getbasetemp())
    if bad:
        session.config.get_terminal_writer().line(
            "results.json files that do not conform to the schema:\n" + "\n".join(bad), red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
