"""Benchmark problems: LM-head shapes of real models, the token layout, inputs, the default matrices.

A problem is N tokens of hidden size H against a vocabulary of V, in one dtype on one device. Every
implementation gets the same hidden [N, H], weight [V, H] and labels [N] (every token a completion
token, no ``-100``). Where a layout matters (TRL's [B, T, V] logits, Liger's DPO loss) the N tokens
are ``sequences`` rows of ``seq_len`` tokens, the first half of the rows the chosen completions and
the second half the rejected ones (Liger's order): 2 pairs up to N = 4096, then pairs of 1024-token
sequences.

Inputs are random with unit-scale logits (``distribution="random"``: nearly flat softmax rows, so gradient filtering
finds almost nothing to skip), or ``"peaked"``: logits shaped like a trained LM's (``peaked_inputs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int     # H, the LM head's input features
    vocab: int      # V, its output rows


MODELS = {m.name: m for m in (
    Model("SmolLM2-135M", 576, 49152),
    Model("Qwen2.5-0.5B", 896, 151936),
    Model("Llama-3-8B", 4096, 128256),
    Model("Gemma-2-2B", 2304, 256000),
)}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Problem:
    n: int
    h: int
    v: int
    dtype: str = "float32"
    device: str = "cpu"
    model: str = "custom"
    distribution: str = "random"     # or "peaked" (see make_inputs)

    def __post_init__(self):
        if self.n % (2 * self.pairs):
            raise ValueError(f"N={self.n} does not split into 2·max(2, N // 2048) = {self.sequences} equal "
                             "sequences")

    @property
    def pairs(self) -> int:
        return max(2, self.n // 2048)

    @property
    def sequences(self) -> int:
        return 2 * self.pairs

    @property
    def seq_len(self) -> int:
        return self.n // self.sequences

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def flop(self) -> int:
        """6·N·H·V: the forward GEMM and the two gradient GEMMs, the floor of a fused fwd+bwd."""
        return 6 * self.n * self.h * self.v

    @property
    def itemsize(self) -> int:
        return torch.finfo(self.torch_dtype).bits // 8

    @property
    def grad_bytes(self) -> int:
        """Bytes of the two gradients of the hidden states and the weight, d hidden and d weight."""
        return (self.n + self.v) * self.h * self.itemsize

    def label(self) -> str:
        return f"{self.model} N={self.n} H={self.h} V={self.v} {self.dtype}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Inputs:
    hidden: torch.Tensor     # [N, H], requires grad
    weight: torch.Tensor     # [V, H], requires grad
    labels: torch.Tensor     # [N] int64
    upstream: torch.Tensor   # [N] fp32, d loss / d logp of each token (random: any DPO pattern)

    def clear_grads(self) -> None:
        self.hidden.grad = self.weight.grad = None


def make_inputs(problem: Problem, seed: int = 0) -> Inputs:
    """Random inputs whose logits have unit scale (h, w ~ N(0, H^-1/2) per feature), or peaked ones
    (``peaked_inputs``)."""
    dev = problem.device
    g = torch.Generator(device=dev).manual_seed(seed)
    if problem.distribution == "peaked":
        hidden, weight, labels = peaked_inputs(problem.n, problem.h, problem.v, g, dev)
    else:
        scale = problem.h ** -0.25
        hidden = torch.randn(problem.n, problem.h, generator=g, device=dev) * scale
        weight = torch.randn(problem.v, problem.h, generator=g, device=dev) * scale
        labels = torch.randint(0, problem.v, (problem.n,), generator=g, device=dev)
    return Inputs(
        hidden=hidden.to(problem.torch_dtype).requires_grad_(),
        weight=weight.to(problem.torch_dtype).requires_grad_(),
        labels=labels,
        upstream=torch.randn(problem.n, generator=g, device=dev),
    )


#: The peaked distribution's knobs, fitted on the CPU to SmolLM2-135M-Instruct's final hidden states over 4096 tokens
#: of HH-RLHF harmless text (the model and data of ../shared; nothing of them is stored here): there, the label's mean
#: probability is 0.32, the mean entropy 2.54 nats, and the bf16 filter (eps 2^-8/32) skips 10.8% of 64x128 and 23.0%
#: of 64x64 tiles; these knobs give 0.34, 2.69 nats, 8.6% and 20.8% at that shape (H 576, V 49152).
PEAKED = {"zipf": 1.3, "noise": 2.5, "boost": 5.0}


def peaked_inputs(n: int, h: int, v: int, g: torch.Generator, device: str):
    """hidden [N, H], weight [V, H] (fp32) and labels [N] whose logits look like a trained LM's, documented
    synthetic data rather than a real model's states: z[t, v] = prior[v] + noise + boost·[v = label[t]].

    The prior is Zipf's law over token ids (BPE vocabularies put frequent tokens at low ids), carried by the last
    feature (weight[:, -1] = prior, hidden[:, -1] = 1); the noise is N(0, noise²) from the other features; labels
    are drawn from the prior, and each token's hidden state leans towards its label's weight row by ``boost``.
    """
    prior = -PEAKED["zipf"] * torch.log(torch.arange(1, v + 1, device=device, dtype=torch.float64))
    labels = torch.multinomial(torch.softmax(prior, 0).float(), n, replacement=True, generator=g)
    scale = (PEAKED["noise"] ** 2 / (h - 1)) ** 0.25       # per-feature std giving logit noise of std ``noise``
    weight = torch.randn(v, h, generator=g, device=device) * scale
    weight[:, -1] = prior.float()
    hidden = torch.randn(n, h, generator=g, device=device) * scale
    hidden[:, -1] = 1.0
    toward = weight[labels, :-1]
    hidden[:, :-1] += PEAKED["boost"] * toward / toward.square().sum(1, keepdim=True)
    return hidden, weight, labels


def sample(count: int, limit: int, seed: int, device: str, include: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted distinct indices in [0, count): all when ``count <= limit``, else ``limit`` random ones
    plus ``include``."""
    if count <= limit:
        return torch.arange(count, device=device)
    picked = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].to(device)
    if include is not None:
        picked = torch.cat([picked, include])
    return picked.unique()      # sorted


def kernel_matrix(device: str, models=None, ns=None, dtypes=None) -> list[Problem]:
    """The kernel-level matrix: each model at each N and dtype, plus the device's target shape.

    Defaults: every model; on CUDA at N = 1k..32k in bf16 and fp32; on CPU (no bf16 units) at N = 1k
    and 4k in fp32, where the runner skips what would take too long (N in between is the scaling
    sweep's job).
    """
    cuda = device == "cuda"
    models = models or list(MODELS)
    ns = ns or ([1024, 2048, 4096, 8192, 16384, 32768] if cuda else [1024, 4096])
    dtypes = dtypes or (["bfloat16", "float32"] if cuda else ["float32"])
    problems = [target_problem(device)]
    for dtype in dtypes:
        for name in models:
            m = MODELS[name]
            problems += [Problem(n, m.hidden, m.vocab, dtype, device, name) for n in ns]
    return list(dict.fromkeys(problems))


def target_problem(device: str) -> Problem:
    """The shape the issue's targets are stated at."""
    if device == "cuda":
        return Problem(8192, 4096, 128256, "bfloat16", "cuda", "Llama-3-8B")
    return Problem(4096, 256, 32000, "float32", "cpu", "target")


def scaling_sweeps(device: str) -> dict[str, list[Problem]]:
    """Problems for the scaling plots: N swept at fixed H, V and V swept at fixed N, H."""
    if device == "cuda":
        h, v, n, dtype = 4096, 128256, 8192, "bfloat16"
        n_axis, v_axis = [1024, 2048, 4096, 8192, 16384, 32768], [32000, 64000, 128256, 256000]
    else:
        h, v, n, dtype = 256, 32000, 2048, "float32"
        n_axis, v_axis = [512, 1024, 2048, 4096], [8000, 16000, 32000, 64000]
    return {
        "n": [Problem(x, h, v, dtype, device, "sweep-N") for x in n_axis],
        "v": [Problem(n, h, x, dtype, device, "sweep-V") for x in v_axis],
    }
