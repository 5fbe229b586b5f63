"""Every documented error: raised as ValueError naming the problem, before any kernel runs."""

import pytest
import torch

import fastdpo
from fastdpo.ops import dispatch as backend

H, V = 16, 50


def inputs(n=4):
    return torch.randn(n, H), torch.randn(V, H), torch.randint(0, V, (n,))


@pytest.mark.parametrize("bad_label", [V, -1, 10**6])
def test_label_out_of_vocabulary(bad_label):
    h, w, y = inputs()
    y[2] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} at position \(2,\) is outside the vocabulary \[0, {V}\)"):
        fastdpo.linear_logps(h, w, y)


def test_ignore_index_is_not_out_of_range():
    h, w, y = inputs()
    y[1] = -7
    assert fastdpo.linear_logps(h, w, y, ignore_index=-7)[1] == 0.0


@pytest.mark.parametrize("make,match", [
    (lambda h, w, y: (h[:, :-1], w, y), "hidden has 15 features but weight has 16"),
    (lambda h, w, y: (h, w, y[:-1]), r"labels must have shape \(4,\)"),
    (lambda h, w, y: (h, w, y.float()), "labels must be int64"),
    (lambda h, w, y: (h[None], w, y), "hidden must have 2 dimensions"),
    (lambda h, w, y: (h, w[None], y), "weight must have 2 dimensions"),
    (lambda h, w, y: (h, w.half(), y), "weight dtype torch.float16 differs from hidden dtype torch.float32"),
    (lambda h, w, y: (h.double(), w.double(), y), "hidden must be float32, bfloat16 or float16"),
    (lambda h, w, y: (h, w[:0], y), r"weight must be non-empty \[V, H\]"),
    (lambda h, w, y: (h[:, :0], w[:, :0], y), r"weight must be non-empty \[V, H\]"),
    (lambda h, w, y: (h, w.to("meta"), y), "weight is on meta but the inputs are on cpu"),
    (lambda h, w, y: (h, w, y.to("meta")), "labels is on meta but the inputs are on cpu"),
    (lambda h, w, y: (h.numpy(), w, y), "hidden must be a torch.Tensor"),
])
def test_shape_dtype_device(make, match):
    with pytest.raises(ValueError, match=match):
        fastdpo.linear_logps(*make(*inputs()))


@pytest.mark.parametrize("bias,match", [
    (torch.randn(V - 1), r"bias must be \[50\] torch.float32"),
    (torch.randn(V).half(), r"bias must be \[50\] torch.float32"),
    (torch.randn(V, 1), "bias must have 1 dimensions"),
])
def test_bad_bias(bias, match):
    h, w, y = inputs()
    with pytest.raises(ValueError, match=match):
        fastdpo.linear_logps(h, w, y, bias)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature must be a finite positive number"),
    ({"softcap": -1.0}, "softcap must be None or a finite positive number"),
    ({"logit_scale": float("nan")}, "logit_scale must be finite and non-zero"),
    ({"backend": "cuda"}, "backend must be one of"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdpo.linear_logps(*inputs(), **kwargs)


def test_unknown_statistic():
    with pytest.raises(ValueError, match=r"unknown stats \['perplexity'\]"):
        fastdpo.linear_logps_with_stats(*inputs(), ("entropy", "perplexity"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        backend.select(torch.device("cpu"), "triton")


@pytest.mark.parametrize("filter_eps", ["always", -1.0, float("nan"), float("inf")])
def test_bad_filter_eps(filter_eps):
    with pytest.raises(ValueError, match="filter_eps must be 'auto', None or a finite number >= 0"):
        fastdpo.linear_logps(*inputs(), filter_eps=filter_eps)


def test_logits_logps_errors():
    with pytest.raises(ValueError, match=r"logits must be a \[B, T, V\] or \[N, V\] tensor"):
        fastdpo.logits_logps(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 3\)"):
        fastdpo.logits_logps(torch.randn(2, 3, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty vocabulary"):
        fastdpo.logits_logps(torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long))
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = 7
    with pytest.raises(ValueError, match=r"label 7 at position \(1, 2\) is outside the vocabulary \[0, 7\)"):
        fastdpo.logits_logps(torch.randn(2, 3, 7), labels)


def test_get_batch_logps_names_bad_label_after_shift():
    labels = torch.tensor([[-100, 3, -1, 2]])
    with pytest.raises(ValueError, match=r"label -1 at position \(0, 1\)"):   # position in the shifted labels
        fastdpo.get_batch_logps(torch.randn(1, 4, 9), labels)
