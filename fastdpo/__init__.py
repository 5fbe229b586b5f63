"""fastdpo: fused, memory-lean log-probabilities for DPO-family preference fine-tuning."""

from . import attention  # registers the "packed_sdpa" attention with transformers
from .batch_logps import get_batch_logps, get_batch_logps_from_hidden, sequence_logps
from .config import DPOConfig
from .linear_logps import STATS, linear_logps
from .losses import LOSS_TYPES, dpo_loss
from .logits_logps import logits_logps
from .online import OnlineDPOConfig, OnlineDPOTrainer
from .trainer import DPOTrainer
from .transform import LogitTransform

__version__ = "0.1.0"

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "LOSS_TYPES",
    "LogitTransform",
    "OnlineDPOConfig",
    "OnlineDPOTrainer",
    "STATS",
    "dpo_loss",
    "get_batch_logps",
    "get_batch_logps_from_hidden",
    "linear_logps",
    "logits_logps",
    "sequence_logps",
]
