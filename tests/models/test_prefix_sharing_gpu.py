"""Shared-prefix layout on CUDA's attention paths: flash-attention varlen (gathered keys, bottom-right causal) and
flex_attention (BlockMask per layer type), forward and every gradient against the unshared layout under eager
attention, on SmolLM2's architecture, a Mistral window shorter than the prompts and Gemma-2. Skipped without CUDA
(and without flash-attn for its test)."""

import importlib.util

import pytest
import torch
from test_prefix_sharing import ARCHS, logps_and_grads, rows

from _reference import rel_err
from fastdpo.data.packing import pack_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# bf16 kernels against an fp32 eager reference: errors of bf16's resolution, accumulated over two layers
TOL = {"fp32": 1e-5, "bf16": 3e-2}


def assert_gpu_parity(arch, implementation, dtype, tol):
    reference = ARCHS[arch]("eager").to("cuda")
    data = rows(reference.config.vocab_size, seed=1)
    want, want_grads = logps_and_grads(reference, pack_pairs(data).to("cuda"))
    model = ARCHS[arch]("eager").to("cuda", dtype)
    model.config._attn_implementation = implementation   # same weights, the implementation under test
    got, got_grads = logps_and_grads(model, pack_pairs(data, prefix_sharing=True).to("cuda"))
    assert rel_err(got, want) <= tol, f"log-probs {rel_err(got, want):.2e}"
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name].float(), grad) <= tol, f"{name}: {rel_err(got_grads[name].float(), grad):.2e}"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
@pytest.mark.parametrize("arch", ["smollm2", "mistral_window", "gemma2"])
def test_flash_attention_varlen_forward_and_backward(arch):
    assert_gpu_parity(arch, "flash_attention_2", torch.bfloat16, TOL["bf16"])


@pytest.mark.parametrize("arch", ["smollm2", "mistral_window", "qwen2_bias", "gemma2"])
def test_flex_attention_forward_and_backward(arch):
    assert_gpu_parity(arch, "flex_attention", torch.float32, TOL["fp32"])
