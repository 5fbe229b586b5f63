"""The chunked path's Triton row kernels under the interpreter: ``logits_grad_`` narrowing an fp32 logit chunk into
16-bit ``dz`` over its own memory, and ``update_lse`` folding chunks, against float64."""

import importlib.util

import pytest
import torch

from _reference import TOL, rel_err, transform64
from fastdpo.ops import chunked
from fastdpo.ops.transform import LogitTransform

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
TRANSFORM = {"logit_scale": 1.5, "softcap": 4.0, "temperature": 0.8}


def _chunk(n, v_c, v0, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v_c, generator=g) * 3
    bias = torch.randn(v_c, generator=g).bfloat16()
    labels = torch.randint(v0 - v_c, v0 + 2 * v_c, (n,), generator=g)     # a third of them in this chunk
    return z, bias, labels, torch.randn(n, generator=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,v_c", [(37, 300), (5, 600), (16, 128)])    # 256-column blocks: 2, 3 and 1 of them
def test_logits_grad_narrows_in_place(n, v_c, dtype):
    from fastdpo.kernels import logit_chunks

    v0 = 1000
    z, bias, labels, grad = _chunk(n, v_c, v0, seed=n + v_c)
    zt = transform64(z.double() + bias.double(), **TRANSFORM)
    lse = (torch.logsumexp(zt, 1) + 0.5).float()     # any lse: the kernel takes the forward's
    scratch = z.clone()
    dz = logit_chunks.logits_grad_(scratch, bias, labels, v0, lse, grad, LogitTransform(**TRANSFORM), dtype)
    assert dz.dtype == dtype and dz.shape == (n, v_c) and dz.data_ptr() == scratch.data_ptr()
    onehot = torch.zeros(n, v_c, dtype=torch.float64)
    hit = ((labels >= v0) & (labels < v0 + v_c)).nonzero().squeeze(1)
    onehot[hit, labels[hit] - v0] = 1.0
    t = zt * 0.8 / 4.0
    want = grad.double()[:, None] * (onehot - torch.exp(zt - lse.double()[:, None])) * (1 - t * t) * 1.5 / 0.8
    # every element checked: a block the kernel did not write would still hold half of an fp32 value's bytes
    assert rel_err(dz, want) <= TOL[dtype]
    assert ((dz.double() - want).abs() <= 1e-2 * want.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("primitives", [(), ("expected_logit", "lse_2z", "sum_logit", "max_other")])
def test_update_lse_folds_chunks(primitives):
    from fastdpo.kernels import logit_chunks

    n, v, v_c = 23, 700, 300
    g = torch.Generator().manual_seed(7)
    z = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    transform = LogitTransform(**TRANSFORM)
    state = chunked.LseState.start(n, primitives, z.device)
    for v0 in range(0, v, v_c):
        logit_chunks.update_lse(z[:, v0:v0 + v_c].contiguous(), None, labels, v0, transform, state)
    label_logit, lse, prims = state.finish()
    zt = transform64(z.double(), **TRANSFORM)
    assert rel_err(lse, torch.logsumexp(zt, 1)) <= 1e-6
    assert rel_err(label_logit, zt.gather(1, labels[:, None]).squeeze(1)) <= 1e-6
    if primitives:
        p = torch.softmax(zt, 1)
        assert rel_err(prims["expected_logit"], (p * zt).sum(1)) <= 1e-6
        assert rel_err(prims["lse_2z"], torch.logsumexp(2 * zt, 1)) <= 1e-6
        assert rel_err(prims["sum_logit"], zt.sum(1)) <= 1e-6
        others = zt.scatter(1, labels[:, None], float("-inf"))
        assert rel_err(prims["max_other"], others.amax(1)) <= 1e-6
