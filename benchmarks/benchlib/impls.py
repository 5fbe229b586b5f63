"""The implementations compared, each reduced to a forward closure over the same inputs.

``output`` says what the forward returns and what the backward receives:
  * ``"logps"``: per-token label log-probabilities [N] (fp32 or the input dtype); the backward is
    ``out.backward(upstream)`` with the problem's random upstream gradient.
  * ``"dpo_loss"``: the mean sigmoid DPO loss (β = 0.1, no reference model) over the problem's pairs;
    the backward is ``loss.backward()``.
  * ``"none"``: a GEMM floor, which has no output to check.
Every timed step produces d hidden, and d weight unless the row is ``frozen`` (the head's weight needs no
gradient, as under LoRA without ``lm_head``: the step is then 6·N·H·V of GEMMs, not 8, counting the recompute).
``design`` names the row's design in the roofline model (``benchlib.roofline``, where present).
"""

from __future__ import annotations

import importlib.util
import os
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
    requires: tuple[tuple[str, str], ...] = ()   # (module, why it is missing: "<pip package> is not installed")
    needs_cuda: bool = False        # Triton kernels without a CPU path
    triton: bool = False            # fastdpo's Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1
    frozen: bool = False            # no d weight: the head is frozen
    design: str | None = None       # the roofline model's design for this row
    extras: Callable | None = None  # (Inputs, Problem) -> dict of further figures for the row

    def unavailable(self, device: str) -> str | None:
        """Why this implementation cannot run on ``device``, or None."""
        for module, missing in self.requires:
            if importlib.util.find_spec(module) is None:
                return missing
        if self.needs_cuda and device != "cuda":
            return f"Triton kernels only, need a CUDA device (this run: {device})"
        if self.triton and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels: need a CUDA device, or TRITON_INTERPRET=1 on the CPU"
        return None

    def grad_bytes(self, problem: Problem) -> int:
        """Bytes of the gradients the step returns: d hidden, and d weight unless frozen."""
        return problem.n * problem.h * problem.itemsize if self.frozen else problem.grad_bytes

    def floor_flop(self, problem: Problem) -> int:
        """GEMM FLOP of the step with the logits recomputed in the backward: 8·N·H·V, 6·N·H·V frozen."""
        return (6 if self.frozen else 8) * problem.n * problem.h * problem.v

    def backward(self, out: torch.Tensor, inputs: Inputs) -> None:
        if self.output == "logps":
            out.backward(inputs.upstream)
        elif self.output == "dpo_loss":
            out.backward()
        else:   # a floor: z again, then dz·W (and dzᵀ·h), the forward's product (random, unit scale) standing in for dz
            h, w = inputs.hidden.detach(), inputs.weight.detach()
            torch.mm(h, w.T)
            torch.mm(out, w)
            if not self.frozen:
                torch.mm(out.T, h)


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


def _liger_per_token(x: Inputs, p: Problem):
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    return lambda: -LigerFusedLinearScaledCrossEntropyFunction.apply(x.hidden, x.weight, x.labels)


def _fastdpo_on(backend: str, filter_eps: str | None = None, frozen: bool = False):
    """fastdpo.linear_logps with an explicit backend and filtering (exact unless ``filter_eps``)."""
    def build(x: Inputs, p: Problem):
        import fastdpo

        weight = x.weight.detach() if frozen else x.weight
        return lambda: fastdpo.linear_logps(x.hidden, weight, x.labels, backend=backend, filter_eps=filter_eps)

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


def _filter_counts(x: Inputs, p: Problem) -> dict:
    """What gradient filtering skips on these inputs: the Triton backward's tile counts at filter_eps="auto"
    (CCE's finfo(dtype).eps / 32 for 16-bit inputs; fp32 is never filtered)."""
    from fastdpo import kernels
    from fastdpo.ops.transform import LogitTransform

    h, w = x.hidden.detach(), x.weight.detach()
    if h.dtype not in (torch.bfloat16, torch.float16):
        return {}
    transform = LogitTransform()
    _, lse, _ = kernels.linear_forward(h, w, None, x.labels, transform, ())
    counts: dict[str, int] = {}
    kernels.linear_backward(h, w, None, x.labels, lse, x.upstream, transform, (True, True, False),
                            filter_eps=torch.finfo(h.dtype).eps / 32, tile_counts=counts)
    return {"tile_counts": counts, "skipped_fraction": {"d_hidden": counts["dh_skipped"] / counts["dh_tiles"],
                                                        "d_weight": counts["dw_skipped"] / counts["dw_tiles"]}}


def _gemm_floor(x: Inputs, p: Problem):
    h, w = x.hidden.detach(), x.weight.detach()
    return lambda: h @ w.T


_TRL = (("trl", "trl is not installed"),)
_LIGER = (("liger_kernel", "liger-kernel is not installed"),)
_CCE = (("cut_cross_entropy", "cut-cross-entropy is not installed"),)
# Liger's per-token kernel is CuTe DSL (sm_90 only); nvidia-cutlass-dsl's CUDA 13 library wheel is 92 MB, over what
# a GPU call can carry (64 MiB in all)
_CUTE = (*_LIGER, ("cutlass", "needs nvidia-cutlass-dsl (CuTe DSL; its CUDA 13 wheel is 92 MB, over the 64 MiB "
                              "that travels to the GPU machine)"))

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
    Impl("liger-per-token", "LigerFusedLinearScaledCrossEntropyFunction (CuTe DSL on sm_90, any per-token upstream "
         "gradient: the DPO primitive) → −NLL per token", "logps", _liger_per_token, requires=_CUTE, needs_cuda=True),
    Impl("fastdpo", "fastdpo.linear_logps(h, W, labels, backend='auto', filter_eps=None) → per-token log-probs, "
         "exact (the default design on the device)", "logps", _fastdpo_on("auto"), design="chunked"),
    Impl("fastdpo-frozen", "as fastdpo with W.requires_grad False: d hidden only", "logps",
         _fastdpo_on("auto", frozen=True), frozen=True, design="chunked"),
    Impl("fastdpo-fused", "fastdpo.linear_logps(..., backend='triton', filter_eps=None): the fused Triton kernels "
         "(online-LSE forward, two-kernel backward), exact", "logps", _fastdpo_on("triton"), triton=True,
         design="fused"),
    Impl("fastdpo-filtered", "fastdpo.linear_logps(..., backend='triton', filter_eps='auto'): the fused kernels "
         "with 16-bit gradient filtering", "logps", _fastdpo_on("triton", "auto"), triton=True, design="fused",
         extras=_filter_counts),
    Impl("fastdpo-torch", "fastdpo.linear_logps(..., backend='torch'): the PyTorch tile path on the same device",
         "logps", _fastdpo_on("torch"), design="torch"),
    Impl("fastdpo-dpo", "fastdpo.linear_logps → per-sequence sums → fastdpo.dpo_loss (β 0.1), mean: "
         "the same loss as liger-dpo", "dpo_loss", _fastdpo_dpo),
    Impl("gemm-floor", "4 plain GEMMs of the step's sizes (8·N·H·V): z = h·Wᵀ forward; z again, dz·W and dzᵀ·h "
         "backward", "none", _gemm_floor, materialises=True, design="gemm-floor"),
    Impl("gemm-floor-frozen", "3 plain GEMMs (6·N·H·V): z = h·Wᵀ forward; z again and dz·W backward", "none",
         _gemm_floor, materialises=True, frozen=True, design="gemm-floor"),
)}

FLOOR = "gemm-floor"
EAGER = "eager"
