"""Layer 5, sft: ``SFTConfig`` and ``SFTTrainer``, supervised fine-tuning (the step before DPO) on packed sequences and the
fused LM head. Imports the layers below it: data (``fastdpo.data.sft``), models and train (forward, metrics, checkpoints)."""

from .config import SFTConfig
from .trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
