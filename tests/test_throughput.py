"""FLOPs per token, peak and MFU arithmetic."""

from __future__ import annotations

import pytest
import torch

from ensemble.core.architecture import count_parameters
from ensemble.runtime.throughput import flops_per_token, mfu, peak_tflops


def test_gpt2_small_parameter_count_and_flops():
    from transformers import GPT2Config

    config = GPT2Config()  # the 124M model: 12 layers, width 768, 1024 positions, 50257 tokens
    assert count_parameters(config) == 124_439_808  # tied lm_head counted once
    n = 124_439_808 - 1024 * 768  # without position embeddings
    assert flops_per_token(config, 1024) == 6 * n + 6 * 12 * 768 * 1024


def test_mfu_arithmetic_and_peaks():
    assert mfu(1e9, 1e4, peak=100.0, devices=2) == pytest.approx(1e13 / (200e12))
    assert mfu(1e9, 1e4, peak=None, devices=1) is None
    assert peak_tflops(torch.device("cpu"), "no", 12.5) == (12.5, "train.peak_tflops")
    value, source = peak_tflops(torch.device("cpu"), "no", None)
    assert value > 0 and source.startswith("measured float32 matmul on CPU")
