"""ops: fused LM-head log-probs (``linear_logps``, ``linear_logps_with_stats``) and cross-entropy
(``linear_cross_entropy``), log-probs from logits, per-sequence sums and TRL's ``get_batch_logps`` drop-ins, on the
backends of ``dispatch``. Imports torch and ``fastdpo.kernels`` only."""

from .batch_logps import get_batch_logps, get_batch_logps_from_hidden
from .cross_entropy import linear_cross_entropy
from .dispatch import BACKENDS, Backend
from .linear_logps import STATS, LogpsWithStats, linear_logps, linear_logps_with_stats
from .logits_logps import logits_logps
from .sequence import sequence_logps
from .transform import LogitTransform

__all__ = ["BACKENDS", "STATS", "Backend", "LogitTransform", "LogpsWithStats", "get_batch_logps",
           "get_batch_logps_from_hidden", "linear_cross_entropy", "linear_logps", "linear_logps_with_stats",
           "logits_logps", "sequence_logps"]
