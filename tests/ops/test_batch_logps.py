"""get_batch_logps / get_batch_logps_from_hidden against TRL's legacy function, and sequence_logps."""

import pytest
import torch

import fastdpo
from _reference import rel_err, trl_legacy_get_batch_logps


def batch(b, t, v, *, seed, pad=-100, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    for i in range(b):   # a prompt prefix and right padding of random lengths
        labels[i, : torch.randint(0, t // 2 + 1, (1,), generator=g)] = pad
        labels[i, t - torch.randint(0, t // 3 + 1, (1,), generator=g).item():] = pad
    return logits, labels, torch.randn(b, generator=g)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("is_encoder_decoder", [False, True])
@pytest.mark.parametrize("pad", [-100, 0])
def test_get_batch_logps_matches_trl(average, is_encoder_decoder, pad):
    logits, labels, upstream = batch(3, 11, 97, seed=1, pad=pad)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.double().requires_grad_()
    labels_before = labels.clone()
    ours = fastdpo.get_batch_logps(ours_in, labels, average, pad, is_encoder_decoder)
    ref = trl_legacy_get_batch_logps(ref_in, labels, average, pad, is_encoder_decoder)
    (ours * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    assert torch.equal(labels, labels_before)
    assert ours.shape == (3,) and ours.dtype == torch.float32
    assert rel_err(ours, ref) <= 1e-6
    assert rel_err(ours_in.grad, ref_in.grad) <= 1e-6


def test_get_batch_logps_bf16_keeps_dtype_of_gradient():
    logits, labels, upstream = batch(2, 9, 301, seed=2, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    out = fastdpo.get_batch_logps(x, labels)
    (out * upstream).sum().backward()
    ref_in = logits.double().requires_grad_()
    ref = trl_legacy_get_batch_logps(ref_in, labels)
    (ref * upstream.double()).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 1e-2 and rel_err(x.grad, ref_in.grad) <= 1e-2


def test_get_batch_logps_all_masked_row_average_is_nan_like_trl():
    logits, labels, _ = batch(2, 6, 20, seed=3)
    labels[1] = -100
    ours = fastdpo.get_batch_logps(logits, labels, average_log_prob=True)
    ref = trl_legacy_get_batch_logps(logits, labels, average_log_prob=True)
    assert torch.isnan(ours[1]) and torch.isnan(ref[1])
    assert rel_err(ours[:1], ref[:1]) <= 1e-6


def test_get_batch_logps_shape_error_is_trls():
    with pytest.raises(ValueError, match="Logits \\(batch and sequence length dim\\) and labels must have the same"):
        fastdpo.get_batch_logps(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="Logits \\(batch and sequence length dim\\)"):
        fastdpo.get_batch_logps_from_hidden(torch.randn(2, 5, 8), torch.randn(7, 8), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("is_encoder_decoder", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_get_batch_logps_from_hidden_matches_trl_on_logits(average, is_encoder_decoder, backend, monkeypatch):
    pytest.importorskip("triton") if backend == "triton" else None
    monkeypatch.setenv("FASTDPO_BACKEND", backend)
    g = torch.Generator().manual_seed(4)
    b, t, h, v = 3, 10, 24, 150
    _, labels, upstream = batch(b, t, v, seed=5)
    hidden = torch.randn(b, t, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    ours = fastdpo.get_batch_logps_from_hidden(hidden, weight, labels, average, -100, is_encoder_decoder, bias)
    (ours * upstream).sum().backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    logits = ref_leaves[0] @ ref_leaves[1].T + ref_leaves[2]
    ref = trl_legacy_get_batch_logps(logits, labels, average, -100, is_encoder_decoder)
    (ref * upstream.double()).sum().backward()
    assert rel_err(ours, ref) <= 1e-5
    for mine, theirs in zip((hidden, weight, bias), ref_leaves):
        assert rel_err(mine.grad, theirs.grad) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logits_logps_strided_and_masked_vocab(backend, dtype):
    pytest.importorskip("triton") if backend == "triton" else None
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(3, 8, 70, generator=g) * 3).to(dtype)
    base[..., 60:] = float("-inf")              # masked vocabulary entries, as some models emit
    logits = base[:, 1:7]                       # a strided view: no copy expected
    labels = torch.randint(0, 60, (3, 6), generator=g)
    labels[0, :2] = -100
    x = logits.detach().clone().requires_grad_()
    out = fastdpo.logits_logps(x, labels, backend=backend)
    upstream = torch.randn(3, 6, generator=g)
    (out * upstream).sum().backward()
    ref_x = logits.double().requires_grad_()
    ref = torch.log_softmax(ref_x, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ref = torch.where(labels == -100, 0.0, ref)
    (ref * upstream.double()).sum().backward()
    assert torch.all(out[labels == -100] == 0)
    assert rel_err(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert x.grad.dtype == dtype and rel_err(x.grad, ref_x.grad) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_sequence_logps_sum_and_mean():
    g = torch.Generator().manual_seed(7)
    token_logps = (-torch.rand(12, generator=g, dtype=torch.float64)).requires_grad_()
    cu = torch.tensor([0, 3, 3, 10, 12], dtype=torch.int32)
    sums = fastdpo.sequence_logps(token_logps, cu)
    want = torch.stack([token_logps[0:3].sum(), token_logps.new_zeros(()), token_logps[3:10].sum(),
                        token_logps[10:12].sum()])
    assert torch.allclose(sums, want)
    means = fastdpo.sequence_logps(token_logps, cu, average=True)
    assert torch.isnan(means[1]) and torch.allclose(means[[0, 2, 3]], want[[0, 2, 3]] / torch.tensor([3., 7., 2.],
                                                                                                      dtype=torch.float64))
    upstream = torch.randn(4, generator=g, dtype=torch.float64)
    (sums * upstream).sum().backward()
    assert torch.allclose(token_logps.grad, upstream.repeat_interleave(torch.tensor([3, 0, 7, 2])))


@pytest.mark.parametrize("cu", [[1, 3, 12], [0, 5, 4, 12], [0, 3, 11], [[0, 12]]])
def test_sequence_logps_rejects_bad_cu_seqlens(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        fastdpo.sequence_logps(torch.randn(12), torch.tensor(cu, dtype=torch.int32))
