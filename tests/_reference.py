"""Float64 references and comparison helpers shared by the tests."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; ||out|| itself where the reference is exactly zero
    (V = 1, all positions ignored), so rounding noise around an exact 0 is still bounded."""
    out, ref = out.double(), ref.double()
    denom = ref.norm()
    return ((out - ref).norm() / denom).item() if denom > 0 else out.norm().item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def transform64(z, logit_scale=1.0, softcap=None, temperature=1.0):
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logits64(hidden, weight, bias=None, **transform):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return transform64(z, **transform)


def linear_logps64(hidden, weight, labels, bias=None, ignore_index=-100, **transform):
    """hidden @ W.T -> transform -> log_softmax -> gather, all in float64; 0 at ignore_index."""
    logp = torch.log_softmax(logits64(hidden, weight, bias, **transform), -1)
    valid = labels != ignore_index
    picked = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def stats64(hidden, weight, labels, bias=None, ignore_index=-100, **transform):
    """The statistics' float64 definitions (0 / False at ignored positions)."""
    z = logits64(hidden, weight, bias, **transform)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    z_label = z.gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros_like(z_label)
    return {
        "entropy": torch.where(valid, -(p * logp).sum(-1), zero),
        "log_sum_p2": torch.where(valid, torch.log((p * p).sum(-1)), zero),
        "mean_logit": torch.where(valid, z.mean(-1), zero),
        "is_argmax": valid & (z_label == z.max(-1).values),
    }


def random_inputs(n, h, v, dtype, *, seed, bias=False, ignore_frac=0.0, device="cpu", scale=1.0):
    """Fresh random hidden/weight/labels (never zeros), logits of order `scale`."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale / h ** 0.25).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.25).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        labels[torch.rand(n, generator=g) < ignore_frac] = -100
    upstream = torch.randn(n, generator=g)
    to = lambda t: t.to(device) if t is not None else None
    return to(hidden), to(weight), to(b), to(labels), to(upstream)


def trl_legacy_get_batch_logps(logits, labels, average_log_prob=False, label_pad_token_id=-100,
                               is_encoder_decoder=False):
    """TRL <= 0.9 ``DPOTrainer.get_batch_logps``, restated verbatim (labels cloned first so the
    encoder-decoder branch's in-place pad overwrite does not touch the caller's tensor)."""
    labels = labels.clone()
    if logits.shape[:-1] != labels.shape:
        raise ValueError("Logits (batch and sequence length dim) and labels must have the same shape.")

    if not is_encoder_decoder:
        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id

    # dummy token; we'll ignore the losses on these tokens later
    labels[labels == label_pad_token_id] = 0

    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)

    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    else:
        return (per_token_logps * loss_mask).sum(-1)
