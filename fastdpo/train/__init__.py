"""Layer 5, train: the base of every packed trainer on ``transformers.Trainer`` (``PackedConfig``, ``PackedTrainer``,
the packed forward ``label_logps``, ``Metrics``, atomic checkpoints) and DPO on it (``DPOConfig``, ``DPOTrainer``:
per-pair log-probs, reference strategies and their cache, the loss). Imports the layers below it."""

from .config import DPOConfig
from .dpo_trainer import DPOTrainer
from .forward import LabelLogps, PairLogps, label_logps, pair_logps
from .metrics import Mean, Metrics, metric
from .packed_config import PackedConfig
from .packed_trainer import PackedTrainer
from .ref_sync import SyncRefModelCallback
from .trainer import PreferenceTrainer

__all__ = ["DPOConfig", "DPOTrainer", "LabelLogps", "Mean", "Metrics", "PackedConfig", "PackedTrainer", "PairLogps",
           "PreferenceTrainer", "SyncRefModelCallback", "label_logps", "metric", "pair_logps"]
