"""linear_logps against its float64 definition: forward and every gradient, every backend."""

import importlib.util
import itertools

import pytest
import torch

import fastdpo
from _reference import TOL, linear_logps64, random_inputs, rel_err, stats64
from fastdpo.ops import chunked

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TRITON_BACKENDS = [pytest.param(b, marks=needs_triton) for b in ("chunked", "triton")]
#: Scratch for 300 fp32 logits: 2 tokens x 128 vocabulary rows a tile, so many token tiles and vocabulary chunks.
TINY_SCRATCH = {"cpu": 4 * 300, "cuda": 4 * 300}


def check_against_reference(n, h, v, dtype, backend, *, seed, bias=False, ignore_frac=0.0, stats=(), scale=1.0,
                            **transform):
    hidden, weight, b, labels, upstream = random_inputs(n, h, v, dtype, seed=seed, bias=bias, ignore_frac=ignore_frac,
                                                        scale=scale)
    inputs = [t.clone().requires_grad_() for t in (hidden, weight, b) if t is not None]
    ref_inputs = [t.double().requires_grad_() for t in (hidden, weight, b) if t is not None]

    if stats:
        out, got_stats = fastdpo.linear_logps_with_stats(*inputs[:2], labels, stats, *inputs[2:], backend=backend,
                                                         **transform)
    else:
        out, got_stats = fastdpo.linear_logps(*inputs[:2], labels, *inputs[2:], backend=backend, **transform), {}
    (out * upstream).sum().backward()
    ref = linear_logps64(*ref_inputs[:2], labels, *ref_inputs[2:], **transform)
    (ref * upstream.double()).sum().backward()

    tol = TOL[dtype]
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert torch.all(out[labels == -100] == 0.0)
    assert rel_err(out, ref) <= tol, ("logps", rel_err(out, ref))
    for name, t, r in zip(("hidden", "weight", "bias"), inputs, ref_inputs):
        assert t.grad.dtype == t.dtype, name
        err = rel_err(t.grad, r.grad)
        assert err <= tol, (f"grad {name}", err)
    if stats:
        want = stats64(hidden, weight, labels, b, **transform)
        for name in stats:
            if name == "is_argmax":
                assert torch.equal(got_stats[name], want[name])
            else:
                assert rel_err(got_stats[name], want[name]) <= tol, (name, rel_err(got_stats[name], want[name]))
            assert not got_stats[name].requires_grad


# ---------------------------------------------------------------- PyTorch path, full grid of shapes
@pytest.mark.parametrize("n,h,v", list(itertools.product([1, 7, 300], [8, 65, 576], [1, 17, 1000, 49152])))
def test_torch_fp32_shapes(n, h, v):
    check_against_reference(n, h, v, torch.float32, "torch", seed=n * 7 + h * 13 + v, bias=(h == 65))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v", [(1, 65, 17), (7, 576, 1000), (300, 65, 49152), (300, 576, 1000)])
def test_torch_half_shapes(n, h, v, dtype):
    check_against_reference(n, h, v, dtype, "torch", seed=v + n, bias=True, ignore_frac=0.3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("chunked", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_and_token_tiles(monkeypatch, backend, dtype):
    """Tiles far smaller than the problem: token tiles and vocabulary chunks (a partial last one), the online lse
    across chunks, d hidden summed over chunks and d weight over token tiles."""
    monkeypatch.setattr(chunked, "SCRATCH_BYTES", TINY_SCRATCH)
    monkeypatch.setattr(chunked, "MIN_CHUNK", 128)
    assert chunked.chunk_plan(37, 1000, 65, TINY_SCRATCH["cpu"]) == chunked.ChunkPlan(n_tile=1, v_chunk=128)
    check_against_reference(37, 65, 1000, dtype, backend, seed=3, bias=True, ignore_frac=0.2,
                            stats=tuple(fastdpo.STATS), softcap=3.0, logit_scale=1.5)


@pytest.mark.parametrize("n,v,scratch,plan", [
    (8192, 128256, 64 << 20, (8192, 2048)),     # the Llama-3 head on CUDA: all tokens in one tile, 63 chunks
    (16384, 128256, 64 << 20, (16384, 1024)),
    (32768, 128256, 64 << 20, (12288, 1024)),   # tokens tiled; 16 MiB of the 64 go to the fp32 d weight chunk
    (300, 1000, 64 << 20, (300, 1000)),         # one chunk
    (1, 5, 4, (1, 5)),
])
def test_chunk_plan(n, v, scratch, plan):
    got = chunked.chunk_plan(n, v, 4096, scratch)
    assert (got.n_tile, got.v_chunk) == plan
    tiled = got.n_tile < n
    assert got.v_chunk == v or got.n_tile * got.v_chunk * 4 + tiled * 4096 * got.v_chunk * 4 <= scratch


@pytest.mark.parametrize("transform", [
    {"logit_scale": 0.0625}, {"softcap": 2.0}, {"temperature": 0.7},
    {"logit_scale": 2.0, "softcap": 5.0, "temperature": 1.3},
])
def test_torch_transforms(transform):
    check_against_reference(33, 65, 1000, torch.float32, "torch", seed=11, bias=True, scale=4.0, **transform)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_stats(dtype):
    check_against_reference(50, 65, 1000, dtype, "torch", seed=5, bias=True, ignore_frac=0.25,
                            stats=tuple(fastdpo.STATS), softcap=4.0)


def test_ignore_all_and_one():
    check_against_reference(9, 65, 1000, torch.float32, "torch", seed=1, ignore_frac=1.0, stats=("entropy",))
    hidden, weight, _, labels, upstream = random_inputs(9, 65, 1000, torch.float32, seed=2)
    labels[:] = -100
    labels[4] = 123
    hidden.requires_grad_()
    out = fastdpo.linear_logps(hidden, weight, labels)
    (out * upstream).sum().backward()
    ref_h = hidden.detach().double().requires_grad_()
    ref = linear_logps64(ref_h, weight.double(), labels)
    (ref * upstream.double()).sum().backward()
    assert torch.count_nonzero(out) == 1 and rel_err(out, ref) <= 1e-5
    assert rel_err(hidden.grad, ref_h.grad) <= 1e-5
    assert torch.count_nonzero(hidden.grad.abs().sum(1)) == 1


def test_tied_embeddings():
    """One tensor as input embedding and LM head: both gradient paths reach it."""
    g = torch.Generator().manual_seed(4)
    v, h, n = 1000, 65, 31
    ids = torch.randint(0, v, (n,), generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    mix = torch.randn(h, h, generator=g) / h ** 0.5
    upstream = torch.randn(n, generator=g)
    base = torch.randn(v, h, generator=g) / h ** 0.25

    def run(weight, fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix.to(weight.dtype))
        (fn(hidden, weight) * upstream.to(weight.dtype)).sum().backward()

    w = base.clone().requires_grad_()
    run(w, lambda hid, wt: fastdpo.linear_logps(hid, wt, labels))
    w64 = base.double().requires_grad_()
    run(w64, lambda hid, wt: linear_logps64(hid, wt, labels))
    assert rel_err(w.grad, w64.grad) <= 1e-5


def test_nan_row_stays_in_its_row():
    hidden, weight, _, labels, _ = random_inputs(6, 65, 1000, torch.float32, seed=8)
    hidden[2, 5] = float("nan")
    out = fastdpo.linear_logps(hidden, weight, labels)
    assert torch.isnan(out[2]) and torch.isfinite(out[torch.arange(6) != 2]).all()
    ref = linear_logps64(hidden, weight, labels)
    keep = torch.arange(6) != 2
    assert rel_err(out[keep], ref[keep]) <= 1e-5


def test_upstream_gradient_of_any_layout():
    """grad of out.sum() arrives as an expanded (stride-0) tensor; a per-sequence gradient too."""
    hidden, weight, _, labels, _ = random_inputs(12, 65, 1000, torch.float32, seed=9)
    hidden.requires_grad_()
    out = fastdpo.linear_logps(hidden, weight, labels)
    per_seq = torch.tensor([0.3, -1.7, 2.0])
    (out.view(3, 4).sum(1) * per_seq).sum().backward()
    ref_h = hidden.detach().double().requires_grad_()
    (linear_logps64(ref_h, weight.double(), labels).view(3, 4).sum(1) * per_seq.double()).sum().backward()
    assert rel_err(hidden.grad, ref_h.grad) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", *TRITON_BACKENDS])
def test_deterministic_bitwise(backend):
    n, v = (64, 1000) if backend == "torch" else (33, 150)
    hidden, weight, b, labels, upstream = random_inputs(n, 65, v, torch.float32, seed=10, bias=True)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        out = fastdpo.linear_logps(leaves[0], leaves[1], labels, leaves[2], deterministic=True, backend=backend)
        (out * upstream).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_autocast_runs_in_autocast_dtype():
    hidden, weight, _, labels, _ = random_inputs(20, 65, 1000, torch.float32, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastdpo.linear_logps(hidden, weight, labels)
    ref = linear_logps64(hidden.bfloat16(), weight.bfloat16(), labels)
    assert rel_err(out, ref) <= 1e-2


# ---------------------------------------------------- Triton kernels under the interpreter (small)
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", [(1, 8, 1), (7, 65, 17), (37, 65, 200), (18, 8, 129)])
def test_triton_shapes(n, h, v, dtype, backend):
    check_against_reference(n, h, v, dtype, backend, seed=n + h + v, bias=(n % 2 == 1), ignore_frac=0.2)


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("transform", [{"softcap": 2.0}, {"logit_scale": 2.0, "softcap": 5.0, "temperature": 1.3}])
def test_triton_transforms_and_stats(transform, backend):
    check_against_reference(21, 40, 150, torch.float32, backend, seed=13, bias=True, ignore_frac=0.2,
                            scale=4.0, stats=tuple(fastdpo.STATS), **transform)


@needs_triton
def test_triton_vocab_splits_merge():
    """Several vocabulary splits per token tile (the small-N GPU launch) merge to the same values."""
    from fastdpo import kernels
    from fastdpo.ops.transform import LogitTransform

    hidden, weight, b, labels, _ = random_inputs(5, 32, 300, torch.float32, seed=14, bias=True)
    prims = tuple(fastdpo.STATS.values())
    label_logit, lse, acc = kernels.linear_forward(hidden, weight, b, labels, LogitTransform(softcap=3.0), prims,
                                                   num_splits=3)
    z = torch.tanh((hidden.double() @ weight.double().T + b.double()) / 3.0) * 3.0
    assert rel_err(lse, torch.logsumexp(z, 1)) <= 1e-6
    assert rel_err(label_logit, z.gather(1, labels[:, None]).squeeze(1)) <= 1e-6
    want = stats64(hidden, weight, labels, b, softcap=3.0)
    got = fastdpo.linear_logps_with_stats(hidden, weight, labels, tuple(fastdpo.STATS), b, softcap=3.0,
                                          backend="torch").stats
    merged = fastdpo.linear_logps.__globals__["_finalize_stats"](tuple(fastdpo.STATS), label_logit, lse, acc, 300)
    for name in fastdpo.STATS:
        if name == "is_argmax":
            assert torch.equal(merged[name], want[name]) and torch.equal(got[name], want[name])
        else:
            assert rel_err(merged[name], want[name]) <= 1e-5


@needs_triton
def test_triton_weight_grad_in_vocab_chunks():
    """A 16-bit weight's gradient accumulates in fp32 one vocabulary chunk at a time."""
    from fastdpo import kernels
    from fastdpo.ops.transform import LogitTransform

    hidden, weight, b, labels, upstream = random_inputs(19, 32, 300, torch.float16, seed=15, bias=True)
    ref_w, ref_b = weight.double().requires_grad_(), b.double().requires_grad_()
    ref_lse = torch.logsumexp(hidden.double() @ ref_w.T + ref_b, 1)
    (linear_logps64(hidden, ref_w, labels, ref_b) * upstream.double()).sum().backward()
    dh, dw, db = kernels.linear_backward(hidden, weight, b, labels, ref_lse.detach().float(), upstream, LogitTransform(),
                                         (True, True, True), scratch_bytes=64 * 32 * 4)
    assert rel_err(db, ref_b.grad) <= 1e-2
    assert dw.dtype == torch.float16 and rel_err(dw, ref_w.grad) <= 1e-2
