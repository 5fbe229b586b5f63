"""fastdpo: fused, memory-lean log-probabilities and trainers for DPO-family preference fine-tuning.

Layers, each importing only those before it: ``fastdpo.kernels`` and ``fastdpo.ops`` (fused log-probs) and
``fastdpo.losses``, ``fastdpo.data``, ``fastdpo.models``, ``fastdpo.train``, ``fastdpo.online`` and
``fastdpo.sft``, then
``fastdpo.integrations`` and ``fastdpo.cli``. The names below load their layer on first use (PEP 562), so
``from fastdpo import linear_logps`` imports torch and nothing of transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LogitTransform": "ops", "STATS": "ops", "get_batch_logps": "ops", "get_batch_logps_from_hidden": "ops",
    "linear_logps": "ops", "logits_logps": "ops", "sequence_logps": "ops", "linear_cross_entropy": "ops",
    "LOSS_TYPES": "losses", "LossSpec": "losses", "dpo_loss": "losses",
    "DPOConfig": "train", "DPOTrainer": "train",
    "OnlineDPOConfig": "online", "OnlineDPOTrainer": "online",
    "SFTConfig": "sft", "SFTTrainer": "sft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value   # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
