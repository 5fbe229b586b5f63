"""The atomic-free Triton backward under the interpreter: float64 agreement, bitwise reproducibility, and
gradient filtering (exact one-hot part, skipped tiles) on random and on real SmolLM2 hidden states."""

import gzip
import importlib.util
import json

import pytest
import torch

import fastdpo
from _reference import TOL, linear_logps64, random_inputs, rel_err
from _shared import HH_HARMLESS, SMOLLM2_GGUF

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _grads(hidden, weight, bias, labels, upstream, **kw):
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = fastdpo.linear_logps(leaves[0], leaves[1], labels, *leaves[2:], **kw)
    (out * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _grads64(hidden, weight, bias, labels, upstream, **transform):
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = linear_logps64(leaves[0], leaves[1], labels, *leaves[2:], **transform)
    (out * upstream.double()).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_deterministic_bitwise_and_exact(dtype):
    """deterministic=True stays on Triton; two runs agree bit for bit and match float64."""
    inputs = random_inputs(45, 40, 300, dtype, seed=21, bias=True, ignore_frac=0.2)
    runs = [_grads(*inputs, backend="triton", deterministic=True, softcap=4.0) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    for got, want in zip(runs[0], _grads64(*inputs, softcap=4.0)):
        assert rel_err(got, want) <= TOL[dtype]


def _peaked(n, h, v, seed, dtype=torch.float32):
    """Logits with a few large values per row over a flat tail: most vocabulary tiles hold only tiny p."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g) * 0.05
    hot = torch.randint(0, 96, (n,), generator=g)          # rows point at vocabulary rows < 96
    weight[:96] += torch.randn(96, h, generator=g)
    hidden = weight[hot] * 0.6 + torch.randn(n, h, generator=g) * 0.1
    labels = torch.where(torch.rand(n, generator=g) < 0.5, hot, torch.randint(0, v, (n,), generator=g))
    return hidden.to(dtype), weight.to(dtype), None, labels, torch.randn(n, generator=g)


def _kept_tiles(p: torch.Tensor, block_n: int, block_v: int, eps: float) -> torch.Tensor:
    """[tiles_n, tiles_v] bool: the tiles of p [N, V] holding a probability >= eps (those the filter keeps)."""
    n, v = p.shape
    padded = torch.nn.functional.pad(p, (0, -v % block_v, 0, -n % block_n))
    return padded.view(padded.shape[0] // block_n, block_n, -1, block_v).amax((1, 3)) >= eps


def _tile_mask(kept: torch.Tensor, n: int, v: int, block_n: int, block_v: int) -> torch.Tensor:
    return kept.repeat_interleave(block_n, 0)[:n].repeat_interleave(block_v, 1)[:, :v]


def _label_tiles(labels: torch.Tensor, v: int, block_n: int, block_v: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(labels, v).double()
    return _kept_tiles(onehot, block_n, block_v, 0.5)


def test_filter_drops_only_the_softmax_part_of_tiny_tiles():
    """fp32 with an explicit filter_eps equals the float64 gradient of the filtered dz to 1e-5: the label part
    is kept in every tile (labels here fall into filtered tiles too), the softmax part only in kept tiles; the
    kernels skip exactly the filtered tiles that hold no label."""
    from fastdpo import kernels
    from fastdpo.kernels import launch
    from fastdpo.ops.transform import LogitTransform

    n, v, eps = 40, 640, 1e-6
    hidden, weight, _, labels, upstream = _peaked(n, 32, v, seed=22)
    z = hidden.double() @ weight.double().T
    lse = torch.logsumexp(z, 1)
    p = torch.exp(z - lse[:, None])
    bn, bv = launch.INTERPRETER.block_n, launch.INTERPRETER.block_v
    kept = _kept_tiles(p, bn, bv, eps)
    dz = upstream.double()[:, None] * (torch.nn.functional.one_hot(labels, v).double() - p * _tile_mask(kept, n, v, bn, bv))
    counts = {}
    dh, dw, _ = kernels.linear_backward(hidden, weight, None, labels, lse.float(), upstream, LogitTransform(),
                                        (True, True, False), filter_eps=eps, tile_counts=counts)
    skipped = int((~kept & ~_label_tiles(labels, v, bn, bv)).sum())
    assert 0 < skipped < kept.numel() and counts["dh_skipped"] == counts["dw_skipped"] == skipped
    assert rel_err(dh, dz @ weight.double()) <= 1e-5
    assert rel_err(dw, dz.T @ hidden.double()) <= 1e-5
    exact = kernels.linear_backward(hidden, weight, None, labels, lse.float(), upstream, LogitTransform(),
                                    (True, False, False))[0]
    assert not torch.equal(exact, dh)                      # the filter did drop something


@pytest.mark.parametrize("bad", ["sometimes", -1.0, float("nan"), True])
def test_filter_eps_validation(bad):
    hidden, weight, _, labels, _ = random_inputs(4, 8, 17, torch.float32, seed=1)
    with pytest.raises(ValueError, match="filter_eps"):
        fastdpo.linear_logps(hidden, weight, labels, filter_eps=bad)


@pytest.fixture(scope="module")
def smollm2_batch(smollm2_cache):
    """Final hidden states of the shared SmolLM2 on 256 tokens of real HH text, its LM head and the next-token
    labels (fp32; loaded once for the module)."""
    from _shared import smollm2_tokenizer
    from fastdpo.models import load_causal_lm, resolve_model

    if not SMOLLM2_GGUF.exists():
        pytest.skip("shared SmolLM2 model not present")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDPO_CACHE", str(smollm2_cache))
        model = load_causal_lm(resolve_model(str(SMOLLM2_GGUF))).eval()
    with gzip.open(HH_HARMLESS, "rt") as f:
        text = json.loads(f.readline())["chosen"]
    ids = smollm2_tokenizer()(text, return_tensors="pt").input_ids[:, :257]
    with torch.no_grad():
        hidden = model.model(input_ids=ids[:, :-1]).last_hidden_state[0]
    return hidden, model.get_output_embeddings().weight.detach(), ids[0, 1:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_filtering_on_real_model_logits(smollm2_batch, monkeypatch, dtype):
    """Default filtering (auto) on SmolLM2's peaked distributions over real HH text: within 1e-2 of float64 for
    the forward and both gradients. Reports the fraction of tiles skipped at the GPU's 16-bit tile shapes."""
    from fastdpo.kernels import launch
    from fastdpo.ops.linear_logps import resolve_filter_eps

    hidden, weight, labels = smollm2_batch
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    # The kernels on the first 16 tokens: wide interpreter tiles keep the vocabulary sweep (V 49152) to a few
    # dozen Python iterations. The skip fractions below are counted over all 256 tokens.
    few = slice(0, 16)
    upstream = torch.randn(16, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(launch, "INTERPRETER", launch.TileConfig(16, 2048, 64, 1, 1))
    inputs = (hidden[few], weight, None, labels[few], upstream)
    got = _grads(*inputs, backend="triton")
    for name, g, w in zip(("logps", "hidden", "weight"), got, _grads64(*inputs)):
        assert rel_err(g, w) <= 1e-2, name
    z = hidden.double() @ weight.double().T
    p = torch.exp(z - torch.logsumexp(z, 1, keepdim=True))
    eps = resolve_filter_eps("auto", dtype)
    for kernel in ("backward_dh", "backward_dw"):
        for arch in (80, 90):
            cfg = launch.default_config(kernel, "16bit", arch)
            live = _kept_tiles(p, cfg.block_n, cfg.block_v, eps) | _label_tiles(labels, p.shape[1], cfg.block_n,
                                                                                 cfg.block_v)
            print(f"\n{dtype} {kernel} sm_{arch} {cfg.block_n}x{cfg.block_v}: {1 - live.float().mean():.1%} of "
                  f"{live.numel()} tiles skipped")
