"""Tokens/s and model FLOPs utilisation (MFU).

FLOPs per trained token (forward + backward) = 6·N + 6·L·A·T, where N counts the parameters
that multiply activations: all but the embedding tables read by lookup (position embeddings, and
token embeddings not tied to the output layer; a tied one is the output layer's matmul), L is
the number of layers, A the width of attention (heads x head dimension; the model width for
GPT-2 and most others) and T the block size. The first term is the matmuls with the weights, the
second attention's score and value products (causal: half of 12·L·A·T). Any architecture: the
facts come from `core.architecture.model_shape`.

MFU = FLOPs per token x tokens/s / (peak FLOP/s per device x devices). The peak is
`train.peak_tflops` when set; else the dense peak of a known GPU at the precision in use; on
CPU, the float32 matmul rate measured once per process (so MFU there is relative to what this
CPU reaches on a large matmul, not a datasheet number).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from ensemble.core.architecture import count_parameters, model_shape

# Dense (no sparsity) peak TFLOP/s per device, from NVIDIA's datasheets.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},  # SXM
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def flops_per_token(model_config: Any, block_size: int) -> float:
    """6·N + 6·L·A·T for the model a config describes (counted on the meta device, so it does
    not depend on how the weights are sharded)."""
    n = count_parameters(model_config, lookups=False)
    shape = model_shape(model_config)
    return 6.0 * n + 6.0 * shape.layers * shape.attention_width * block_size


@functools.cache
def measured_cpu_tflops(size: int = 1024, repeats: int = 5) -> float:
    # A private generator: drawing from the process RNG here would shift the random stream of
    # the member being trained (its dropout) depending on whether it is the first in the process.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(
    device: torch.device, mixed_precision: str, override: float | None
) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device, where the number comes from); None when unknown."""
    if override:
        return override, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = mixed_precision if mixed_precision in ("bf16", "fp16") else "fp32"
        for key, table in GPU_PEAK_TFLOPS.items():  # the more specific names come first
            if key in name and precision in table:
                return table[precision], f"{name} {precision} dense datasheet peak"
        return None, f"unknown peak for {name}; set train.peak_tflops"
    if device.type == "cpu":
        return measured_cpu_tflops(), f"measured float32 matmul on CPU ({torch.get_num_threads()} threads)"
    return None, f"unknown peak for {device.type}; set train.peak_tflops"


def mfu(flops_per_tok: float, tokens_per_s: float, peak: float | None, devices: int) -> float | None:
    if not peak:
        return None
    return flops_per_tok * tokens_per_s / (peak * 1e12 * devices)
