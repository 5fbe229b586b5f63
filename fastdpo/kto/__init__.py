"""Layer 6, kto: ``KTOConfig`` and ``KTOTrainer``, KTO on unpaired (thumbs-up / thumbs-down) rows, packed with each row's
KL completion as a branch off its prompt, on the fused LM head. Imports the layers below it: losses (``kto_loss``),
data (``fastdpo.data.unpaired``) and train (the packed-training base and the reference strategies)."""

from .config import KTOConfig
from .trainer import KTOTrainer

__all__ = ["KTOConfig", "KTOTrainer"]
