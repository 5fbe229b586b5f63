"""Layer 6, online: online DPO (sample two completions per prompt, rank them with a reward model or an LLM judge,
train on the ranked pair) and its judges. Imports the train layer and those below it."""

from .config import OnlineDPOConfig
from .judges import LLMJudge, PairwiseJudge, RewardModelScorer
from .trainer import OnlineDPOTrainer, SampledPairs

__all__ = ["LLMJudge", "OnlineDPOConfig", "OnlineDPOTrainer", "PairwiseJudge", "RewardModelScorer", "SampledPairs"]
