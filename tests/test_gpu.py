"""The CUDA backends (chunked: cuBLAS + Triton row kernels; triton: the fused kernels) on a real GPU at full model
size against float64, and an FSDP2 launch (skipped without CUDA).

Needs nothing outside the repository: no ../shared, no GGUF; the FSDP2 launch trains a tiny random model written by
the test, with a byte-level tokenizer that needs no files, and skips where datasets (fastdpo train's loader) is
missing."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdpo
from _reference import TOL, linear_logps64, random_inputs, rel_err
from _shared import byte_tokenizer, write_tiny_run

ROOT = Path(__file__).resolve().parents[1]   # `python -m fastdpo` from the root imports this checkout, installed or not

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def chunked_reference(hidden, weight, labels, upstream, bias=None, chunk=1024, **transform):
    """float64 forward and gradients, by autograd over token chunks (the full float64 logits of a
    Llama-3-sized problem would not fit beside everything else)."""
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if bias is not None else None
    outs, dh = [], []
    for i in range(0, hidden.shape[0], chunk):
        h64 = hidden[i:i + chunk].double().requires_grad_()
        out = linear_logps64(h64, w64, labels[i:i + chunk], b64, **transform)
        (out * upstream[i:i + chunk].double()).sum().backward()
        outs.append(out.detach())
        dh.append(h64.grad)
    return torch.cat(outs), torch.cat(dh), w64.grad, (b64.grad if b64 is not None else None)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype,n,h,v,scale", [
    (torch.bfloat16, 8192, 4096, 128256, 1.0),    # Llama-3-8B head, a full micro-batch
    (torch.bfloat16, 2048, 4096, 128256, 8.0),    # peaked logits (|z| up to ~60): where bf16 logits would fail
    (torch.bfloat16, 1, 576, 49152, 1.0),         # one token: the vocabulary-split launch
    (torch.float16, 300, 576, 49152, 1.0),
    (torch.float32, 1000, 896, 151936, 1.0),      # Qwen2.5-0.5B head, fp32 (IEEE products unless TF32 is on)
])
def test_against_float64(backend, dtype, n, h, v, scale):
    hidden, weight, bias, labels, upstream = random_inputs(n, h, v, dtype, seed=n, bias=(n == 300),
                                                           ignore_frac=0.1, device="cuda", scale=scale)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = fastdpo.linear_logps(leaves[0], leaves[1], labels, *leaves[2:], backend=backend, softcap=30.0)
    (out * upstream).sum().backward()
    ref, dh, dw, db = chunked_reference(hidden, weight, labels, upstream, bias, softcap=30.0)
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol
    assert rel_err(leaves[0].grad, dh) <= tol
    assert rel_err(leaves[1].grad, dw) <= tol
    if bias is not None:
        assert rel_err(leaves[2].grad, db) <= tol


@pytest.mark.parametrize("frozen", [False, True])
def test_chunked_token_tiles_and_frozen_head(monkeypatch, frozen):
    """Tokens tiled (8 MiB of scratch: 1024 tokens x 1024 vocabulary rows, d weight summed over 4 tiles in fp32),
    and a frozen head (no d weight) on the default path."""
    from fastdpo.ops import chunked

    monkeypatch.setitem(chunked.SCRATCH_BYTES, "cuda", 8 << 20)
    assert chunked.chunk_plan(4096, 128256, 4096, 8 << 20) == chunked.ChunkPlan(1024, 1024)
    hidden, weight, _, labels, upstream = random_inputs(4096, 4096, 128256, torch.bfloat16, seed=6, device="cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen)
    out = fastdpo.linear_logps(h, w, labels)
    (out * upstream).sum().backward()
    ref, dh, dw, _ = chunked_reference(hidden, weight, labels, upstream)
    assert rel_err(out, ref) <= 1e-2 and rel_err(h.grad, dh) <= 1e-2
    assert w.grad is None if frozen else rel_err(w.grad, dw) <= 1e-2


@pytest.mark.parametrize("backend,filter_eps", [("chunked", None), ("triton", "auto"), ("triton", None)])
def test_deterministic_and_filtered_on_gpu(backend, filter_eps):
    """Bitwise equal across two runs at a Llama-3-sized head (the chunked path's fixed chunk order, the fused
    backward's owned rows), filtered or exact, and within bf16 tolerance of float64 either way."""
    hidden, weight, _, labels, upstream = random_inputs(2048, 4096, 128256, torch.bfloat16, seed=5, device="cuda")
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
        out = fastdpo.linear_logps(*leaves, labels, backend=backend, deterministic=True, filter_eps=filter_eps)
        (out * upstream).sum().backward()
        runs.append([out.detach(), leaves[0].grad, leaves[1].grad])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    ref, dh, dw, _ = chunked_reference(hidden, weight, labels, upstream)
    for got, want in zip(runs[0], (ref, dh, dw)):
        assert rel_err(got, want) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_stats_on_gpu(backend):
    hidden, weight, _, labels, _ = random_inputs(513, 576, 49152, torch.bfloat16, seed=3, device="cuda")
    _, got = fastdpo.linear_logps_with_stats(hidden, weight, labels, tuple(fastdpo.STATS), backend=backend)
    _, want = fastdpo.linear_logps_with_stats(hidden, weight, labels, tuple(fastdpo.STATS), backend="torch")
    for name in fastdpo.STATS:
        if name == "is_argmax":
            assert (got[name] == want[name]).float().mean() > 0.99
        else:
            assert rel_err(got[name], want[name]) <= 1e-2


def test_get_batch_logps_on_gpu_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4, 512, 49152, generator=g, device="cuda").bfloat16()
    labels = torch.randint(0, 49152, (4, 512), generator=g, device="cuda")
    labels[:, :100] = -100
    out = fastdpo.get_batch_logps(logits, labels)
    shifted = labels[:, 1:]
    ref = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, shifted.clamp_min(0)[..., None]).squeeze(-1)
    ref = (ref * (shifted != -100)).sum(-1)
    assert rel_err(out, ref) <= 1e-5


def test_reference_fingerprint_on_the_gpu_equals_the_cpu_one_without_a_copy():
    """The reference cache's weight digest runs where the weights are, in integers mod 2^64 (so the CPU's result
    exactly): on the GPU its peak memory grows by a few 16 MiB chunks, not by the 128 MiB of weights."""
    from fastdpo.train.reference_cache import weights_fingerprint

    model = torch.nn.Linear(8192, 8192, bias=False, dtype=torch.bfloat16)
    on_cpu = weights_fingerprint(model, exclude_adapters=True)
    model.cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    assert weights_fingerprint(model, exclude_adapters=True) == on_cpu
    assert torch.cuda.max_memory_allocated() - before < 64 * 2**20


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets (fastdpo train's loader) not installed")
def test_fsdp2_launch_equals_plain_run(tmp_path):
    """`accelerate launch` with examples/accelerate/fsdp2.yaml (one GPU process: FSDP2 wrapping, DTensor
    parameters, sharded checkpoints) trains like a plain run."""
    model_dir, data = write_tiny_run(tmp_path, tokenizer=byte_tokenizer())
    config = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch"]   # not the `accelerate` script: it may not be on PATH
    traces = []
    for name, launcher in (("plain", [sys.executable]),
                           ("fsdp2", [*launch, "--config_file", str(config), "--num_processes", "1"])):
        out = tmp_path / name
        cmd = [*launcher, "-m", "fastdpo", "train", "--model", str(model_dir), "--dataset", str(data),
               "--max-tokens-per-batch", "64", "--max-steps", "3", "--logging-steps", "1", "--optim", "sgd",
               "--learning-rate", "0.5", "--use-peft", "--lora-dropout", "0", "--attn-implementation", "sdpa",
               "--output-dir", str(out), "--report-to", "none", "--save-strategy", "steps", "--save-steps", "3",
               "--disable-tqdm", "true"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        traces.append([h["loss"] for h in history if "loss" in h])
        assert (out / "checkpoint-3").is_dir()
    assert len(traces[0]) == 3 and traces[1] == pytest.approx(traces[0], rel=1e-4)
