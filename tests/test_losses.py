"""dpo_loss against hand-computed values (parity with TRL's own code is tests/test_losses_trl.py)."""

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


def batch(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2, b), generator=g)
    pc, pr = (-(torch.rand(b, generator=g, dtype=torch.float64) + 0.1) * lengths[i] for i in (0, 1))
    rc, rr = (x + torch.randn(b, generator=g, dtype=torch.float64) for x in (pc, pr))
    return pc.requires_grad_(), pr.requires_grad_(), rc, rr, lengths[0], lengths[1]


def test_rpo_alpha_is_trl_0_28_formula():
    """TRL <= 0.28: ``losses = dpo_losses + rpo_alpha * nll_loss``, nll_loss the cross-entropy over the batch's
    chosen completion tokens (their mean NLL)."""
    pc, pr, rc, rr, nc, nr = batch(1)
    nll = -pc.sum() / nc.sum()
    dpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    rpo, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.3, rpo_alpha=0.6, chosen_lengths=nc, rejected_lengths=nr,
                          chosen_nll=-pc)
    assert torch.allclose(rpo, dpo + 0.6 * nll, rtol=1e-14)
    assert torch.equal(cr, 0.3 * (pc - rc).detach()) and torch.equal(rj, 0.3 * (pr - rr).detach())
    explicit, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, rpo_alpha=0.6, chosen_nll=-pc * 2, nll_tokens=5.0)
    assert torch.allclose(explicit, dpo + 0.6 * (-2 * pc.sum() / 5), rtol=1e-14)


def test_nll_shares_add_up_to_the_effective_batch_mean():
    """Under gradient accumulation each micro-batch passes its share of the effective batch's NLL tokens
    (tokens × its pairs / all pairs): the micro-batches' summed losses over all pairs are then the token mean
    over the whole effective batch, whatever the split (fastdpo.DPOTrainer)."""
    pc, pr, rc, rr, nc, nr = batch(2, b=6)
    whole, _, _ = dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_lengths=nc, rejected_lengths=nr, chosen_nll=-pc)
    assert whole.mean().item() == pytest.approx((-pc.sum() / nc.sum()).item(), rel=1e-14)
    total = 0
    for part in (slice(0, 1), slice(1, 6)):
        share = nc.sum() * (part.stop - part.start) / 6
        total = total + dpo_loss(pc[part], pr[part], rc[part], rr[part], loss_type="sft", chosen_lengths=nc[part],
                                 rejected_lengths=nr[part], nll_tokens=share, chosen_nll=-pc[part])[0].sum() / 6
    assert total.item() == pytest.approx(whole.mean().item(), rel=1e-14)


def test_simpo_and_orpo_by_hand():
    pc, pr, _, _, nc, nr = batch(3)
    ac, ar = pc / nc, pr / nr
    nll = -pc.sum() / nc.sum()
    losses, cr, _ = dpo_loss(pc, pr, None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.4, cpo_alpha=0.5,
                             chosen_lengths=nc, rejected_lengths=nr, chosen_nll=-pc)
    assert torch.allclose(losses, torch.nn.functional.softplus(-(2.0 * (ac - ar) - 0.4)) + 0.5 * nll, rtol=1e-12)
    assert torch.allclose(cr, 2.0 * ac.detach())
    odds = lambda a: a - torch.log1p(-torch.exp(a))       # noqa: E731
    losses, cr, _ = dpo_loss(pc, pr, None, None, loss_type="orpo", beta=0.25, chosen_lengths=nc, rejected_lengths=nr,
                             chosen_nll=-pc, nll_tokens=nc.sum())
    want = nll - 0.25 * torch.nn.functional.logsigmoid(odds(ac) - odds(ar))
    assert torch.allclose(losses.double(), want, rtol=1e-6)


def test_pair_weights_scale_each_pair_and_carry_no_gradient():
    pc, pr, rc, rr, nc, nr = batch(4)
    weights = torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], chosen_lengths=nc, rejected_lengths=nr)
    weighted, _, _ = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], chosen_lengths=nc, rejected_lengths=nr,
                              pair_weights=weights)
    assert torch.equal(weighted, plain * weights.detach())
    weighted.sum().backward()
    assert weights.grad is None


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "hinge2"}, "unknown loss_type"),
    ({"loss_type": []}, "unknown loss_type"),
    ({"beta": 0.0}, "beta must be positive"),
    ({"label_smoothing": 0.7}, r"label_smoothing must be in \[0, 0.5\]"),
    ({"loss_type": "ipo"}, "needs chosen_lengths and rejected_lengths"),
    ({"loss_type": "sft"}, "needs chosen_lengths and rejected_lengths"),
    ({"loss_type": "orpo", "chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(2)},
     r"has an NLL term and needs chosen_nll"),
    ({"loss_type": "orpo", "chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(2),
      "chosen_nll": torch.ones(2)}, "orpo needs nll_tokens"),
    # averaged log-probs would make a wrong NLL silently: the NLL is never derived from policy_chosen_logps
    ({"loss_type": "sft", "chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(2)},
     r"pass chosen_nll=-policy_chosen_logps when those are summed"),
    ({"chosen_lengths": torch.ones(3), "rejected_lengths": torch.ones(3)}, r"chosen_lengths must be a tensor of shape"),
    ({"pair_weights": torch.ones(1)}, r"pair_weights must be a tensor of shape \(2,\)"),
])
def test_bad_arguments(kwargs, match):
    x = torch.zeros(2) - 1.0
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)
    with pytest.raises(ValueError, match=r"ref_rejected_logps must be a tensor of shape \(2,\), got \(3,\)"):
        dpo_loss(x, x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="ref_chosen_logps must be a tensor"):
        dpo_loss(x, x, None, None)
