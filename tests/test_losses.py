"""dpo_loss against hand-computed values."""

import math

import pytest
import torch

from fastdpo import dpo_loss


def log1pexp(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
def test_sigmoid_loss_and_rewards_by_hand(label_smoothing):
    pc = torch.tensor([-10.0, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-12.0, -2.5], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-11.0, -3.2], dtype=torch.float64)
    rr = torch.tensor([-11.0, -2.0], dtype=torch.float64)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=label_smoothing)
    # h = (pc - pr) - (rc - rr): pair 0: 2 - 0 = 2; pair 1: -0.5 - (-1.2) = 0.7
    for i, h in enumerate([2.0, 0.7]):
        want = (1 - label_smoothing) * log1pexp(-0.1 * h) + label_smoothing * log1pexp(0.1 * h)
        assert losses[i].item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(cr, torch.tensor([0.1, 0.02], dtype=torch.float64))
    assert torch.allclose(rj, torch.tensor([-0.1, -0.05], dtype=torch.float64))
    assert not cr.requires_grad and not rj.requires_grad
    losses.sum().backward()
    # dL/dpc = -β (1-ε) σ(-βh) + β ε σ(βh)
    sig = lambda x: 1 / (1 + math.exp(-x))
    want_grad = [-0.1 * (1 - label_smoothing) * sig(-0.1 * h) + 0.1 * label_smoothing * sig(0.1 * h) for h in (2.0, 0.7)]
    assert torch.allclose(pc.grad, torch.tensor(want_grad, dtype=torch.float64))
    assert torch.allclose(pr.grad, -pc.grad)


def test_reference_free_ignores_reference():
    pc, pr = torch.tensor([-4.0]), torch.tensor([-6.0])
    losses, cr, _ = dpo_loss(pc, pr, torch.tensor([-100.0]), torch.tensor([3.0]), beta=0.5, reference_free=True)
    assert losses.item() == pytest.approx(log1pexp(-1.0), rel=1e-6)
    assert cr.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "hinge2"}, "unknown loss_type"),
    ({"beta": 0.0}, "beta must be positive"),
    ({"label_smoothing": 0.7}, r"label_smoothing must be in \[0, 0.5\]"),
])
def test_bad_arguments(kwargs, match):
    x = torch.zeros(2) - 1.0
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(x, x, x, torch.zeros(3))
