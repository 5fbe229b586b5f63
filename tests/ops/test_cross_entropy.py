"""linear_cross_entropy against float64 F.cross_entropy: value and every gradient, reductions, shift, both backends."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from _reference import TOL, logits64, random_inputs, rel_err

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def cross_entropy64(hidden, weight, targets, bias=None, *, reduction="mean", shift=0, **transform):
    """CCE's definition in float64: shift the inputs, then F.cross_entropy on materialised logits."""
    if shift:
        hidden, targets = hidden[..., :-shift, :], targets[..., shift:]
    z = logits64(hidden.reshape(-1, hidden.shape[-1]), weight, bias, **transform)
    loss = F.cross_entropy(z, targets.reshape(-1), reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


def check(shape, h, v, dtype, *, seed, reduction="mean", shift=0, bias=False, ignore_frac=0.3, backend="torch",
          **transform):
    n = int(torch.tensor(shape).prod())
    hidden, weight, b, labels, _ = random_inputs(n, h, v, dtype, seed=seed, bias=bias, ignore_frac=ignore_frac)
    hidden, labels = hidden.view(*shape, h), labels.view(shape)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b) if t is not None]
    refs = [t.double().requires_grad_() for t in (hidden, weight, b) if t is not None]
    out = fastdpo.linear_cross_entropy(*leaves[:2], labels, *leaves[2:], reduction=reduction, shift=shift,
                                       backend=backend, **transform)
    ref = cross_entropy64(*refs[:2], labels, *refs[2:], reduction=reduction, shift=shift, **transform)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype], ("loss", rel_err(out, ref))
    for name, t, r in zip(("hidden", "weight", "bias"), leaves, refs):
        assert t.grad.dtype == t.dtype and rel_err(t.grad, r.grad) <= TOL[dtype], (name, rel_err(t.grad, r.grad))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,h,v", [((37,), 65, 1000), ((3, 11), 8, 17), ((2, 3, 7), 576, 4099)])
def test_fp32_reductions_and_shapes(shape, h, v, reduction):
    check(shape, h, v, torch.float32, seed=v + len(shape), reduction=reduction, bias=(h == 65))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half(dtype, reduction):
    check((4, 9), 65, 1000, dtype, seed=7, reduction=reduction, bias=True, softcap=5.0)


@pytest.mark.parametrize("shift", [1, True, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_as_cce(shift, reduction):
    check((3, 13), 65, 1000, torch.float32, seed=11, reduction=reduction, shift=shift, logit_scale=0.5)


def test_shift_equals_shifting_by_hand():
    hidden, weight, _, labels, _ = random_inputs(20, 65, 1000, torch.float32, seed=3)
    hidden, labels = hidden.view(2, 10, 65), labels.view(2, 10)
    got = fastdpo.linear_cross_entropy(hidden, weight, labels, shift=1, reduction="none")
    want = fastdpo.linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], reduction="none")
    assert got.shape == (2, 9) and torch.equal(got, want)


def test_all_ignored_rows():
    """reduction='none': exactly 0 at ignored tokens, the rest exact; 'mean' with nothing left: 0, zero gradients."""
    check((5, 6), 65, 1000, torch.float32, seed=5, reduction="none", ignore_frac=0.6)
    hidden, weight, _, labels, _ = random_inputs(12, 65, 1000, torch.float32, seed=6)
    labels = labels.view(3, 4)
    labels[1] = -100
    per_token = fastdpo.linear_cross_entropy(hidden.view(3, 4, 65), weight, labels, reduction="none")
    assert torch.all(per_token[1] == 0) and torch.all(per_token[[0, 2]] > 0)
    labels[:] = -100
    hidden.requires_grad_()
    loss = fastdpo.linear_cross_entropy(hidden.view(3, 4, 65), weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_bad_input():
    hidden, weight, _, labels, _ = random_inputs(6, 65, 100, torch.float32, seed=2)
    with pytest.raises(ValueError, match="reduction"):
        fastdpo.linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="targets must have shape"):
        fastdpo.linear_cross_entropy(hidden.view(2, 3, 65), weight, labels)
    with pytest.raises(ValueError, match="shift"):
        fastdpo.linear_cross_entropy(hidden.view(2, 3, 65), weight, labels.view(2, 3), shift=3)
    with pytest.raises(ValueError, match="filter_eps"):
        fastdpo.linear_cross_entropy(hidden, weight, labels, filter_eps="often")
    labels[4] = 100
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fastdpo.linear_cross_entropy(hidden, weight, labels)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction,shift", [("mean", 1), ("none", 0), ("sum", 2)])
def test_triton(dtype, reduction, shift):
    check((2, 9), 32, 130, dtype, seed=13, reduction=reduction, shift=shift, bias=True, backend="triton")
