"""Float64 references, on a sample of rows and vocabulary rows so that they stay cheap at real sizes.

The check step of a measurement scores only the sampled token rows: per-token implementations get an
upstream gradient that is zero elsewhere, DPO losses get ``-100`` labels elsewhere. The exact
gradients then involve those rows alone: d hidden on the sampled rows, d weight on every vocabulary
row, of which the sampled ones (the rows' labels and random others) are compared. At the pytest
shape the samples are everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .problems import Inputs, Problem, sample

BETA = 0.1                 # DPO β of the loss-level comparisons
CHECK_ROWS = 256           # token rows scored by the check step
CHECK_VOCAB = 2048         # random vocabulary rows compared in d weight (besides the labels)
_CHUNK_BYTES = 256 << 20   # float64 weight copied per chunk


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.detach().double().to(ref.device), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@dataclass
class Reference:
    rows: torch.Tensor          # [R] sampled token rows
    vocab_rows: torch.Tensor    # [C] sampled vocabulary rows
    output: torch.Tensor        # [R] log-probs, or the scalar DPO loss
    d_hidden: torch.Tensor      # [R, H]
    d_weight: torch.Tensor      # [C, H]


def _vocab_chunks(weight: torch.Tensor):
    step = max(1, _CHUNK_BYTES // (8 * weight.shape[1]))
    for v0 in range(0, weight.shape[0], step):
        yield v0, weight[v0:v0 + step].detach().double()


class References:
    """The float64 references of one problem's inputs, computed on first use."""

    def __init__(self, problem: Problem, inputs: Inputs, seed: int = 0):
        self.problem, self.inputs = problem, inputs
        self.rows = sample(problem.n, CHECK_ROWS, seed, problem.device)
        self.vocab_rows = sample(problem.v, CHECK_VOCAB, seed + 1, problem.device,
                                 include=inputs.labels[self.rows])
        self._logits = None
        self._cache: dict[str, Reference] = {}

    def check_upstream(self) -> torch.Tensor:
        """The upstream gradient of the check step: the inputs' on the sampled rows, 0 elsewhere."""
        g = torch.zeros_like(self.inputs.upstream)
        g[self.rows] = self.inputs.upstream[self.rows]
        return g

    def check_labels(self) -> torch.Tensor:
        """The labels of the check step of a loss: the inputs' on the sampled rows, -100 elsewhere."""
        labels = torch.full_like(self.inputs.labels, -100)
        labels[self.rows] = self.inputs.labels[self.rows]
        return labels

    def get(self, output: str) -> Reference:
        if output not in self._cache:
            self._cache[output] = self._logps() if output == "logps" else self._dpo_loss()
        return self._cache[output]

    # [R, V] float64 logits of the sampled rows and their logsumexp
    def _z(self):
        if self._logits is None:
            h = self.inputs.hidden[self.rows].detach().double()
            z = torch.cat([h @ w.T for _, w in _vocab_chunks(self.inputs.weight)], 1)
            self._logits = z, torch.logsumexp(z, 1)
        return self._logits

    def _token_logps(self) -> torch.Tensor:
        z, lse = self._z()
        return z.gather(1, self.inputs.labels[self.rows, None]).squeeze(1) - lse

    def _grads(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d hidden [R, H] and d weight [C, H] for upstream g [R] on the sampled rows' log-probs:
        dz = g · (onehot(label) − softmax(z))."""
        z, lse = self._z()
        dz = (z - lse[:, None]).exp_().mul_(-g[:, None])
        dz.scatter_add_(1, self.inputs.labels[self.rows, None], g[:, None])
        d_hidden = sum(dz[:, v0:v0 + w.shape[0]] @ w for v0, w in _vocab_chunks(self.inputs.weight))
        h = self.inputs.hidden[self.rows].detach().double()
        return d_hidden, dz[:, self.vocab_rows].T @ h

    def _logps(self) -> Reference:
        g = self.inputs.upstream[self.rows].double()
        return Reference(self.rows, self.vocab_rows, self._token_logps(), *self._grads(g))

    def _dpo_loss(self) -> Reference:
        logps = self._token_logps().requires_grad_()
        loss = dpo_loss_from_tokens(logps, self.rows, self.problem)
        (g,) = torch.autograd.grad(loss, logps)
        return Reference(self.rows, self.vocab_rows, loss.detach(), *self._grads(g))


def dpo_loss_from_tokens(token_logps: torch.Tensor, rows: torch.Tensor, problem: Problem) -> torch.Tensor:
    """Mean sigmoid DPO loss (reference-free, β = BETA) over the problem's pairs, from the log-probs
    of the token rows ``rows`` (the other tokens count as masked out)."""
    seq = torch.zeros(problem.sequences, dtype=token_logps.dtype, device=token_logps.device)
    seq = seq.index_add(0, rows // problem.seq_len, token_logps)
    chosen, rejected = seq[:problem.pairs], seq[problem.pairs:]
    return -F.logsigmoid(BETA * (chosen - rejected)).mean()
