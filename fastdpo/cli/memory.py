"""How much memory a training run will need, and the token budget and activation checkpointing that make it fit.

``estimate_peak_bytes`` is a pure function of the model's shape and the run's settings; ``plan_memory`` picks the
settings the user left open. The estimate adds up what is resident at the peak (the start of the backward): the
runtime, the weights, the gradients and AdamW moments of the trainable parameters, the fused LM head's scratch and
the activations the decoder layers saved for backward, counted per token from the layer's widths; one constant,
the allocator's retention, is fitted to whole runs on a CPU (``benchmarks/results/cpu-memory-plan.md``'s calibration
rows) and applied as is to CUDA's caching allocator, unmeasured there. It is an estimate, not a bound.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..ops.chunked import SCRATCH_BYTES

GIB = 1 << 30
#: Resident memory of a process that has imported torch, transformers, peft and datasets and holds the tokenised
#: dataset and the Trainer (CPU: 0.59 GiB after the imports alone), or a CUDA context.
RUNTIME_BYTES = {"cpu": int(0.7 * GIB), "cuda": int(0.6 * GIB)}
#: Tensors a Llama-style decoder layer saves for backward, per token, in elements of hidden, kv-hidden and
#: intermediate width: each RMSNorm's input and output, the rotated queries, the attention output and o_proj's input;
#: the rotated keys and the values; gate, SiLU(gate), up and their product (counted with
#: ``torch.autograd.graph.saved_tensors_hooks`` on SmolLM2's layer: 10.7k elements a token, these give 10.6k).
SAVED_WIDTHS = (7, 2, 4)
#: Bytes adapter dropout keeps per element beyond its dropped-out copy of the input (counted with
#: ``saved_tensors_hooks``: 0.4 on SmolLM2's layer, 0.85 on one a quarter as wide).
DROPOUT_EXTRA_BYTES = 1
#: Bytes per trainable parameter beside its weight: its gradient and AdamW's two fp32 moments.
TRAINABLE_STATE_BYTES = 12
#: Heap the allocator keeps beyond the live tensors, as a share of the activations a micro-batch's forward allocates
#: (checkpointed or not): freed blocks of earlier micro-batches, each a different length, that the next cannot reuse,
#: split by the optimiser's moments allocated among them after the first. The estimator's one fitted constant:
#: ``benchmarks/bench_memory_plan.py --fit`` on the calibration rows of ``benchmarks/results/cpu-memory-plan.md``
#: (0.44 without checkpointing, 0.60 with; their mean).
ALLOCATOR_RETENTION = 0.52
#: A plan fits when its estimate is at most this share of the available memory (room for the estimate's error).
FIT_FRACTION = 0.6
#: The budget fastdpo picks on a CPU: bigger micro-batches buy no speed there (README: 148 tokens/s at 512-token
#: micro-batches, 66 at 16k), only memory; gradient accumulation keeps DPOConfig's tokens per optimiser step.
CPU_TOKENS_PER_BATCH = 1024


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: decoder widths, and bytes of weights and of trainable parameters.

    Attributes:
        dropout_width: elements per token and layer that adapter dropout copies (the summed input widths of the
            trainable LoRA layers with dropout, per decoder layer); 0 without dropout.
        element_bytes: bytes of an activation element (the compute dtype).
    """

    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    weight_bytes: int
    trainable_params: int
    element_bytes: int = 4
    dropout_width: int = 0

    @classmethod
    def of(cls, model) -> ModelShape:
        """The shape of a transformers (or peft-wrapped) causal LM."""
        config = model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        params = list(model.parameters())
        dtype = next((p.dtype for p in params if p.is_floating_point()), None)
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, kv_hidden=kv_heads * head_dim,
            intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            trainable_params=sum(p.numel() for p in params if p.requires_grad),
            element_bytes=dtype.itemsize if dtype is not None else 4,
            dropout_width=_dropout_width(model) // config.num_hidden_layers,
        )

    def saved_bytes_per_token(self) -> int:
        """Bytes one decoder layer saves for backward per token: ``SAVED_WIDTHS``, and the dropped-out copies of
        the adapters' inputs."""
        widths = sum(w * n for w, n in zip(SAVED_WIDTHS, (self.hidden, self.kv_hidden, self.intermediate)))
        return widths * self.element_bytes + self.dropout_width * (self.element_bytes + DROPOUT_EXTRA_BYTES)


def _dropout_width(model) -> int:
    """Summed input widths of the LoRA layers whose trainable adapter has dropout (a frozen reference adapter runs
    without gradient, so saves nothing)."""
    import torch

    width = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            width += sum(module.in_features for name, dropout in dropouts.items()
                         if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and name in module.lora_A
                         and module.lora_A[name].weight.requires_grad)
    return width


def estimate_peak_bytes(shape: ModelShape, tokens: int, *, checkpointing: bool, extra_weight_bytes: int = 0,
                        device: str = "cpu") -> int:
    """Estimated peak memory (bytes) of training ``shape`` on micro-batches of ``tokens`` packed tokens.

    The peak is at the start of the backward: the runtime, the weights, the trainable parameters' gradients and
    AdamW moments, the fused head's scratch, and the activations saved for backward (every layer's; with
    checkpointing, each layer's input) plus one layer's worth of backward transients (with checkpointing, the layer
    recomputed); and the heap the allocator keeps, a share of the activations a forward allocates.

    Args:
        checkpointing: activation (gradient) checkpointing (layers recompute their activations in backward).
        extra_weight_bytes: weights beside the policy's: a separate reference model or a frozen copy.
        device: "cpu" (peak resident memory of the process) or "cuda" (device memory).
    """
    per_layer = shape.saved_bytes_per_token()
    saved = shape.hidden * shape.element_bytes if checkpointing else per_layer
    live = tokens * (shape.layers * saved + per_layer)
    # the layers allocate the same activations with checkpointing or without; checkpointing only frees them sooner
    allocated = tokens * shape.layers * per_layer
    return (RUNTIME_BYTES.get(device, RUNTIME_BYTES["cuda"]) + shape.weight_bytes + extra_weight_bytes
            + shape.trainable_params * TRAINABLE_STATE_BYTES + SCRATCH_BYTES.get(device, SCRATCH_BYTES["cuda"])
            + live + int(allocated * ALLOCATOR_RETENTION))


def available_bytes(device: str = "cpu") -> int | None:
    """Memory available to this process now: free device memory on CUDA; on a CPU ``MemAvailable`` (Linux),
    lowered to the cgroup's limit when one is set; None where neither can be read."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen settings, their estimate, and whether it fits the available memory."""

    tokens: int
    checkpointing: bool
    estimate: int
    available: int | None
    fits: bool


def plan_memory(estimate: Callable[[int, bool], int], available: int | None, *, tokens: int | None,
                checkpointing: bool | None, default_tokens: int, min_tokens: int) -> MemoryPlan:
    """Pick the token budget and checkpointing where the user left them open (None), given as fixed otherwise.

    The first that fits (``estimate <= FIT_FRACTION * available``) of: without checkpointing, ``default_tokens``
    then budgets halved down to ``min_tokens`` (the longest pair); then the same with checkpointing (which costs
    a recomputed forward, about a third more compute). When nothing fits, the leanest candidate is returned with
    ``fits=False``.

    Args:
        estimate: bytes for (tokens, checkpointing), e.g. a partial of ``estimate_peak_bytes``.
        available: bytes available (None: unknown; the first candidate is taken, ``fits`` True).
    """
    budgets = [tokens] if tokens is not None else _halvings(default_tokens, min_tokens)
    candidates = [(b, c) for c in ([False, True] if checkpointing is None else [checkpointing]) for b in budgets]
    if available is None:
        return MemoryPlan(*candidates[0], estimate(*candidates[0]), None, True)
    for candidate in candidates:
        need = estimate(*candidate)
        if need <= FIT_FRACTION * available:
            return MemoryPlan(*candidate, need, available, True)
    leanest = min(candidates, key=lambda c: estimate(*c))
    return MemoryPlan(*leanest, estimate(*leanest), available, False)


def _halvings(start: int, floor: int) -> list[int]:
    budgets = [start]
    while budgets[-1] > floor:
        budgets.append(max(floor, budgets[-1] // 2))
    return budgets


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class BatchShape:
    """What the plan needs of a command's micro-batches.

    Attributes:
        row_tokens: the most tokens one row (a pair, a sequence) can take.
        row: what a row needs, for the warning ("a pair needs up to 2 × --max-length").
        rows_per_batch: micro-batches of this many rows, so no token budget to choose; None: whole rows under
            ``max_tokens_per_batch``.
        frozen_copy: a fully fine-tuned policy gets a frozen copy of itself as its reference.
    """

    row_tokens: int
    row: str
    rows_per_batch: int | None = None
    frozen_copy: bool = False


def _longest(args, sequences: int) -> int:
    return sequences * args.max_length if args.max_length else _default_budget(args)


def _default_budget(args) -> int:
    return type(args).__dataclass_fields__["max_tokens_per_batch"].default


def pair_shape(args) -> BatchShape:
    """``fastdpo train``: pairs of up to 2 × ``max_length`` tokens under the token budget."""
    return BatchShape(_longest(args, 2), "a pair needs up to 2 × --max-length",
                      frozen_copy=args.loss_spec().needs_reference)


def prompt_shape(args) -> BatchShape:
    """``fastdpo train-online``: ``per_device_train_batch_size`` prompts × 2 completions of up to ``max_length``."""
    return replace(pair_shape(args), rows_per_batch=args.per_device_train_batch_size)


def sequence_shape(args) -> BatchShape:
    """``fastdpo sft``: sequences of up to ``max_length`` tokens, packed under the budget or ``per_device_train_batch_size``
    at a time."""
    return BatchShape(_longest(args, 1), "a sequence needs up to --max-length",
                      rows_per_batch=None if args.packing else args.per_device_train_batch_size)


def unpaired_shape(args) -> BatchShape:
    """``fastdpo kto``: whole KL groups of ``per_device_train_batch_size`` rows, each of up to 2 × ``max_length``
    tokens (prompt and completion, and prompt and KL completion), under the token budget; without the KL term, rows of
    up to ``max_length``."""
    group = args.per_device_train_batch_size if args.kl else 1
    return BatchShape(_longest(args, 2 * group if args.kl else 1),
                      "a KL group needs up to per_device_train_batch_size × 2 × --max-length" if args.kl
                      else "a row needs up to --max-length", frozen_copy=True)


def apply_memory_plan(args, given: set[str], model, shape: BatchShape, ref_model=None):
    """Estimate the run's peak memory, choose what the user left open (``max_tokens_per_batch``, with
    ``gradient_accumulation_steps`` raised to keep the config's default tokens per optimiser step, and
    ``activation_checkpointing``), print the estimate and the choices, and warn on stderr when the run will not fit.

    Args:
        args: the run's config (a ``PackedConfig``), not changed.
        given: the fields the user set (``fastdpo.cli.options.parse_command``).
        shape: its micro-batches; with ``rows_per_batch`` only checkpointing is chosen.

    Returns:
        (a copy of ``args`` with the choices, validated as the config validates itself; the ``MemoryPlan``).
    """
    device = "cuda" if args.device.type == "cuda" else "cpu"
    model_shape = ModelShape.of(model)
    peft = hasattr(model, "peft_config")
    if ref_model is not None:
        extra = ModelShape.of(ref_model).weight_bytes
    else:
        extra = model_shape.weight_bytes if shape.frozen_copy and not peft else 0
    budget_default, longest = _default_budget(args), shape.row_tokens
    if shape.rows_per_batch is not None:
        tokens = shape.rows_per_batch * longest
    else:
        tokens = args.max_tokens_per_batch if "max_tokens_per_batch" in given else None
    checkpointing = (bool(args.activation_checkpointing)
                     if given & {"activation_checkpointing", "gradient_checkpointing"} else None)
    default = max(longest, CPU_TOKENS_PER_BATCH if device == "cpu" else budget_default)
    plan = plan_memory(lambda t, c: estimate_peak_bytes(model_shape, t, checkpointing=c, extra_weight_bytes=extra,
                                                        device=device),
                       available_bytes(device), tokens=tokens, checkpointing=checkpointing,
                       default_tokens=default, min_tokens=min(longest, default))
    settings, chosen = {}, []
    if tokens is None:
        settings["max_tokens_per_batch"] = plan.tokens
        chosen.append(f"--max-tokens-per-batch {plan.tokens}")
        if "gradient_accumulation_steps" not in given and plan.tokens < budget_default:
            settings["gradient_accumulation_steps"] = -(-budget_default // plan.tokens)
            chosen.append(f"--gradient-accumulation-steps {settings['gradient_accumulation_steps']} "
                          f"(~{budget_default} tokens per optimiser step)")
    if checkpointing is None:
        settings["activation_checkpointing"] = plan.checkpointing
        chosen.append(f"--activation-checkpointing {str(plan.checkpointing).lower()}")
    if device == "cpu" and "dataloader_pin_memory" not in given:
        settings["dataloader_pin_memory"] = False   # pinned memory needs an accelerator; torch warns otherwise
    where = f" of {_gib(plan.available)} available" if plan.available is not None else ""
    print(f"[fastdpo] memory: estimated peak {_gib(plan.estimate)}{where} ({model_shape.layers} layers × "
          f"{model_shape.hidden}, {model_shape.trainable_params / 1e6:.1f}M trainable parameters, {plan.tokens}-token "
          f"micro-batches, activation checkpointing {'on' if plan.checkpointing else 'off'})", flush=True)
    if chosen:
        print(f"[fastdpo] memory: chose {', '.join(chosen)}; give them to override", flush=True)
    if not plan.fits:
        print(f"[fastdpo] warning: the estimated peak {_gib(plan.estimate)} is over {FIT_FRACTION:.0%} of the "
              f"{_gib(plan.available)} available: the run may be killed for memory.\nWhat to do: lower "
              f"{'--per-device-train-batch-size' if shape.rows_per_batch is not None else '--max-tokens-per-batch'} "
              f"({shape.row} = {longest} tokens), set --activation-checkpointing true"
              f"{', or train LoRA adapters (--use-peft)' if not peft else ''}.", file=sys.stderr, flush=True)
    return replace(args, **settings), plan
