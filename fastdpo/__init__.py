"""fastdpo: fused, memory-lean log-probabilities and trainers for DPO-family preference fine-tuning.

Layers, each importing only its own and lower ranks (``tests/test_layout.py`` enforces them): 0 ``fastdpo.kernels``,
1 ``fastdpo.ops`` (fused log-probs), 2 ``fastdpo.losses``, 3 ``fastdpo.data``, 4 ``fastdpo.models``, 5 ``fastdpo.train``
(the packed-training base and DPO), 6 ``fastdpo.online``, ``fastdpo.sft`` and ``fastdpo.kto``, 7
``fastdpo.integrations`` and ``fastdpo.cli``. The names below load their layer on first use (PEP 562), so ``from
fastdpo import linear_logps`` imports torch and nothing of transformers.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

# bitsandbytes' import probes for Hugging Face's `kernels` package on CPUs with AVX512-BF16 and logs a failure when it
# is absent, then uses its own CPU path. peft and transformers' Trainer import bitsandbytes whenever it is installed,
# so without this every `fastdpo train` would print that failure. Its prefix, verified with bitsandbytes 0.50:
_BNB_PROBE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _demote_bnb_probe(record: logging.LogRecord) -> bool:
    """A logging filter: the harmless probe failure becomes a DEBUG record, shown only where DEBUG is enabled."""
    if not str(record.msg).startswith(_BNB_PROBE):
        return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_demote_bnb_probe)

_EXPORTS = {
    "LogitTransform": "ops", "STATS": "ops", "get_batch_logps": "ops", "get_batch_logps_from_hidden": "ops",
    "linear_logps": "ops", "linear_logps_with_stats": "ops", "LogpsWithStats": "ops", "logits_logps": "ops",
    "sequence_logps": "ops", "linear_cross_entropy": "ops",
    "LOSS_TYPES": "losses", "LossSpec": "losses", "dpo_loss": "losses",
    "DPOConfig": "train", "DPOTrainer": "train", "PackedConfig": "train", "PackedTrainer": "train",
    "OnlineDPOConfig": "online", "OnlineDPOTrainer": "online",
    "SFTConfig": "sft", "SFTTrainer": "sft",
    "KTOConfig": "kto", "KTOTrainer": "kto", "kto_loss": "losses",
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
