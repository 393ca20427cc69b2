"""How members compute on a device: training precision, evaluation precision, torch.compile, TF32.

Every choice is made once, before any work, from the config and the device, and is logged; a
setting the platform cannot honour is a one-line error naming the setting and the fix (or, for
`auto`, a logged fallback).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ensemble.errors import EnsembleError, first_line
from ensemble.runtime.distributed import on_cpu

logger = logging.getLogger(__name__)

BF16 = "bf16"
FLOAT32 = "float32"


def resolve_mixed_precision(setting: str) -> str:
    """Training precision: `auto` is what `accelerate launch --mixed_precision` said, else bf16
    on GPUs that support it, fp16 on other GPUs, full precision on CPU."""
    if setting != "auto":
        return setting
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher  # chosen with `accelerate launch --mixed_precision`
    if not on_cpu():
        return BF16 if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_eval_precision(setting: str, device: torch.device) -> str:
    """Evaluation precision of the members' bodies and heads (log-softmax and every sum stay
    float32): `auto` is bf16 on GPUs that support it, float32 elsewhere."""
    if setting == "auto":
        return BF16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else FLOAT32
    if setting == BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EnsembleError(
            f"eval.precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "set eval.precision=float32 (or auto)"
        )
    return setting


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the members' forward passes, or nothing in float32."""
    if precision == BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions on CUDA while the block runs; restored after,
    so that a float32 evaluation in the same process stays float32."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms while the block runs (restored after). Eager CPU code is
    deterministic already, but code compiled for the CPU is not: inductor accumulates scatters
    (the embedding's gradient) with parallel atomic adds in whatever order threads arrive,
    unless this is on, when it keeps the sequential kernel. Costs little on CPU."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# --------------------------------------------------------------------------------------------
# torch.compile


@functools.cache
def compile_failure(device_type: str) -> str | None:
    """Why torch.compile cannot run on this platform (no C++ compiler for CPU kernels, no Triton
    for GPU ones, an unsupported Python), or None when it can: a tiny function is compiled and
    run once per process, so that a broken toolchain is found before training, not at step 1."""
    import torch._dynamo

    def probe(x: torch.Tensor) -> torch.Tensor:
        return (x * 2.0).sin().sum()

    x = torch.arange(8, dtype=torch.float32, device=device_type)
    try:
        compiled = torch.compile(probe, backend="inductor", fullgraph=True)
        if not torch.allclose(compiled(x), probe(x)):
            return "a compiled probe computed a wrong value"
    except Exception as e:  # any failure of the toolchain: inductor raises many kinds
        return _what_failed(e)
    finally:
        torch._dynamo.reset()  # the probe's graph must not count against the model's cache
    return None


def _what_failed(e: BaseException) -> str:
    """`Type: first line of the message` (the type alone when there is no message)."""
    line = first_line(e)
    return line if line == type(e).__name__ else f"{type(e).__name__}: {line}"


def resolve_compile(setting: bool | str, device: torch.device, key: str) -> bool:
    """Whether to compile: `auto` is on for CUDA and off elsewhere, and falls back to eager
    with a warning where compile fails; `true` where it fails is a one-line error."""
    wanted = device.type == "cuda" if setting == "auto" else bool(setting)
    if not wanted:
        return False
    started = time.perf_counter()
    failure = compile_failure(device.type)
    if failure is None:
        logger.debug("torch.compile probe passed in %.1f s", time.perf_counter() - started)
        return True
    if setting == "auto":
        logger.warning(
            "%s=auto: torch.compile fails on this %s (%s); running eager", key, device.type, failure
        )
        return False
    raise EnsembleError(
        f"{key}=true but torch.compile fails on this {device.type} ({failure}); install what it "
        f"needs (a C++ compiler for CPU, Triton for GPU) or set {key}=false"
    )


class FirstCallFallback:
    """A compiled function that, with `auto`, falls back to the eager one (logged) if its first
    call fails: compilation happens there, and a graph the compiler cannot handle should cost
    speed, not the run. With `true` the failure is a one-line error."""

    def __init__(self, fn: Callable[..., Any], setting: bool | str, key: str, **compile_kwargs: Any):
        self.eager = fn
        self.compiled: Callable[..., Any] | None = torch.compile(fn, **compile_kwargs)
        self.setting, self.key = setting, key
        self.compiled_once = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        if self.compiled_once:
            return self.compiled(*args, **kwargs)
        started = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:
            if self.setting != "auto":
                raise EnsembleError(
                    f"{self.key}=true but compiling failed ({_what_failed(e)}); set {self.key}=false"
                ) from e
            logger.warning("%s=auto: compiling failed (%s); running eager", self.key, type(e).__name__)
            self.compiled = None
            return self.eager(*args, **kwargs)
        self.compiled_once = True
        logger.info("%s: compiled in %.1f s", self.key, time.perf_counter() - started)
        return out
