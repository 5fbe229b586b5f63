"""Layer 4, train: ``DPOConfig`` and ``DPOTrainer`` on ``transformers.Trainer`` — the packed forward to per-pair
log-probs, reference strategies and their cache, the loss, metrics and checkpoints. Imports the layers below it."""

from .config import DPOConfig
from .dpo_trainer import DPOTrainer
from .forward import PairLogps, pair_logps
from .packed_config import PackedConfig
from .ref_sync import SyncRefModelCallback
from .trainer import PreferenceTrainer

__all__ = ["DPOConfig", "DPOTrainer", "PackedConfig", "PairLogps", "PreferenceTrainer", "SyncRefModelCallback", "pair_logps"]
