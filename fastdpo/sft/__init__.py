"""Layer 6, sft: ``SFTConfig`` and ``SFTTrainer``, supervised fine-tuning (the step before DPO) on packed sequences and the
fused LM head. Imports the layers below it: data (``fastdpo.data.sft``) and train (the packed-training base)."""

from .config import SFTConfig
from .trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
