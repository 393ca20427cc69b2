"""Device choices made before any work: evaluation precision, torch.compile, determinism.

GPUs are faked where a choice depends on one (CI has none): only `device.type` and the
monkeypatched capability checks are consulted.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ensemble.errors import EnsembleError
from ensemble.runtime import compute

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def test_eval_precision_auto_and_bf16(monkeypatch):
    assert compute.resolve_eval_precision("auto", CPU) == "float32"
    assert compute.resolve_eval_precision("bf16", CPU) == "bf16"  # CPU autocast has bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute.resolve_eval_precision("auto", CUDA) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-16GB")
    assert compute.resolve_eval_precision("auto", CUDA) == "float32"
    with pytest.raises(EnsembleError) as e:
        compute.resolve_eval_precision("bf16", CUDA)
    assert str(e.value) == (
        "eval.precision=bf16 but Tesla V100-SXM2-16GB has no bfloat16 support; "
        "set eval.precision=float32 (or auto)"
    )


def test_compile_auto_is_off_on_cpu_and_falls_back_where_compile_fails(monkeypatch, caplog):
    def no_probe(device_type: str) -> str | None:
        raise AssertionError("compile was not asked for: nothing should be probed")

    monkeypatch.setattr(compute, "compile_failure", no_probe)
    assert compute.resolve_compile("auto", CPU, "train.compile") is False
    assert compute.resolve_compile(False, CUDA, "train.compile") is False

    monkeypatch.setattr(compute, "compile_failure", lambda device_type: None)
    assert compute.resolve_compile("auto", CUDA, "train.compile") is True
    assert compute.resolve_compile(True, CPU, "train.compile") is True

    monkeypatch.setattr(compute, "compile_failure", lambda device_type: "InvalidCxxCompiler: no g++")
    with caplog.at_level(logging.WARNING):
        assert compute.resolve_compile("auto", CUDA, "eval.compile") is False
    assert (
        "eval.compile=auto: torch.compile fails on this cuda (InvalidCxxCompiler: no g++); running eager"
        in (caplog.text)
    )
    with pytest.raises(EnsembleError) as e:
        compute.resolve_compile(True, CPU, "train.compile")
    assert str(e.value) == (
        "train.compile=true but torch.compile fails on this cpu (InvalidCxxCompiler: no g++); install what "
        "it needs (a C++ compiler for CPU, Triton for GPU) or set train.compile=false"
    )


def test_first_call_fallback(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("inductor could not lower this graph\nmore detail")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    fn = compute.FirstCallFallback(lambda x: x + 1, "auto", "eval.compile")
    with caplog.at_level(logging.WARNING):
        assert fn(1) == 2 and fn(2) == 3  # eager from the first call on
    assert fn.compiled is None
    assert "eval.compile=auto: compiling failed (RuntimeError); running eager" in caplog.text
    strict = compute.FirstCallFallback(lambda x: x + 1, True, "eval.compile")
    with pytest.raises(
        EnsembleError,
        match=r"^eval.compile=true but compiling failed \(RuntimeError: inductor "
        r"could not lower this graph\); set eval.compile=false$",
    ):
        strict(1)


def test_deterministic_mode_is_scoped():
    before = torch.are_deterministic_algorithms_enabled()
    with compute.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with compute.deterministic(False):
        assert torch.are_deterministic_algorithms_enabled() == before
