"""The implementations compared, each reduced to a forward closure over the same inputs.

``output`` says what the forward returns and what the backward receives:
  * ``"logps"``: per-token label log-probabilities [N] (fp32 or the input dtype); the backward is
    ``out.backward(upstream)`` with the problem's random upstream gradient.
  * ``"dpo_loss"``: the mean sigmoid DPO loss (β = 0.1, no reference model) over the problem's pairs;
    the backward is ``loss.backward()``.
  * ``"none"``: the GEMM floor, which has no output to check.
Every timed step produces d hidden and d weight.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .problems import Inputs, Problem
from .reference import BETA


@dataclass(frozen=True)
class Impl:
    name: str
    what: str                       # what exactly is timed (one line, for the report)
    output: str                     # "logps", "dpo_loss" or "none"
    build: Callable                 # (Inputs, Problem) -> forward closure
    materialises: bool = False      # builds [N, V] logits (the runner's memory estimate)
    requires: tuple[tuple[str, str], ...] = ()   # (module, pip package)
    needs_cuda: bool = False        # Triton kernels without a CPU path

    def unavailable(self, device: str) -> str | None:
        """Why this implementation cannot run on ``device``, or None."""
        for module, package in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{package} is not installed"
        if self.needs_cuda and device != "cuda":
            return f"Triton kernels only, need a CUDA device (this run: {device})"
        return None

    def backward(self, out: torch.Tensor, inputs: Inputs) -> None:
        if self.output == "logps":
            out.backward(inputs.upstream)
        elif self.output == "dpo_loss":
            out.backward()
        else:   # the floor: the two gradient GEMMs, with the forward's product standing in for dz
            torch.mm(out, inputs.weight.detach())
            torch.mm(out.T, inputs.hidden.detach())


def _rows(p: Problem, t: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [sequences, T, ...], the layout of a padded batch."""
    return t.view(p.sequences, p.seq_len, *t.shape[1:])


def _eager(x: Inputs, p: Problem):
    return lambda: torch.log_softmax((x.hidden @ x.weight.T).float(), -1).gather(1, x.labels[:, None]).squeeze(1)


def _trl_selective(x: Inputs, p: Problem):
    from trl.trainer.utils import selective_log_softmax

    return lambda: selective_log_softmax(_rows(p, x.hidden @ x.weight.T), _rows(p, x.labels)).reshape(-1)


def _trl_chunked(x: Inputs, p: Problem):
    # exactly the call of trl.trainer.utils.add_fused_lm_head's fused forward (no bias, softcap, scale)
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    return lambda: _ChunkedLogProbFunction.apply(
        x.hidden, x.weight, None, x.labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]


def _liger_dpo(x: Inputs, p: Problem):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)
    return lambda: loss(x.weight, _rows(p, x.hidden), _rows(p, x.labels))[0]


def _liger_flce(x: Inputs, p: Problem):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    ce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda: -ce(x.weight, x.hidden, x.labels)


def _cce(impl: str):
    def build(x: Inputs, p: Problem):
        from cut_cross_entropy import linear_cross_entropy

        return lambda: -linear_cross_entropy(x.hidden, x.weight, x.labels, reduction="none", impl=impl)

    return build


def _fastdpo_on(backend: str | None):
    def build(x: Inputs, p: Problem):
        import fastdpo

        return lambda: fastdpo.linear_logps(x.hidden, x.weight, x.labels, backend=backend)

    return build


def _fastdpo_dpo(x: Inputs, p: Problem):
    import fastdpo

    def forward():
        logps = fastdpo.linear_logps(x.hidden, x.weight, x.labels)
        seq = _rows(p, logps).sum(1)
        chosen, rejected = seq[:p.pairs], seq[p.pairs:]
        zero = torch.zeros_like(chosen)
        return fastdpo.dpo_loss(chosen, rejected, zero, zero, beta=BETA)[0].mean()

    return forward


def _gemm_floor(x: Inputs, p: Problem):
    h, w = x.hidden.detach(), x.weight.detach()
    return lambda: h @ w.T


_TRL = (("trl", "trl"),)
_LIGER = (("liger_kernel", "liger-kernel"),)
_CCE = (("cut_cross_entropy", "cut-cross-entropy"),)

IMPLS = {impl.name: impl for impl in (
    Impl("eager", "fp32 logits h·Wᵀ → log_softmax → gather (TRL's legacy get_batch_logps)", "logps", _eager,
         materialises=True),
    Impl("trl-selective", "logits h·Wᵀ in the input dtype as [B, T, V] → trl selective_log_softmax", "logps",
         _trl_selective, materialises=True, requires=_TRL),
    Impl("trl-chunked", "trl _ChunkedLogProbFunction as add_fused_lm_head calls it (vocab chunk 32768)",
         "logps", _trl_chunked, requires=_TRL),
    Impl("liger-dpo", "LigerFusedLinearDPOLoss(β 0.1, no reference model, compiled) → DPO loss; "
         "its forward also computes the gradients", "dpo_loss", _liger_dpo, requires=_LIGER),
    Impl("liger-flce", "LigerFusedLinearCrossEntropyLoss(reduction='none') → −CE per token", "logps",
         _liger_flce, requires=_LIGER, needs_cuda=True),
    Impl("cce", "cut_cross_entropy.linear_cross_entropy(impl='cce', reduction='none') → −CE per token "
         "(default gradient filtering)", "logps", _cce("cce"), requires=_CCE, needs_cuda=True),
    Impl("cce-compile", "cut_cross_entropy.linear_cross_entropy(impl='torch_compile', reduction='none') → "
         "−CE per token", "logps", _cce("torch_compile"), materialises=True, requires=_CCE),
    Impl("fastdpo", "fastdpo.linear_logps(h, W, labels) → per-token log-probs (backend auto: Triton on CUDA, "
         "16-bit gradient filtering on)", "logps", _fastdpo_on(None)),
    Impl("fastdpo-torch", "fastdpo.linear_logps(..., backend='torch'): the PyTorch tile path on the same device",
         "logps", _fastdpo_on("torch")),
    Impl("fastdpo-dpo", "fastdpo.linear_logps → per-sequence sums → fastdpo.dpo_loss (β 0.1), mean: "
         "the same loss as liger-dpo", "dpo_loss", _fastdpo_dpo),
    Impl("gemm-floor", "3 plain GEMMs of the step's sizes: h·Wᵀ forward; dz·W and dzᵀ·h backward",
         "none", _gemm_floor, materialises=True),
)}

FLOOR = "gemm-floor"
EAGER = "eager"
