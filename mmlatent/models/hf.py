"""The names this module held before the model families moved to :mod:`mmlatent.models.backbones` and the
rollout's attention routing to :mod:`mmlatent.models.attention`; they stay importable from here."""
from .attention import (ATTENTION_PREFIX, AttentionLease, EagerProbabilities, RolloutScores, attention_name,
                        eager_attention, fast_implementation, install_attention, mmlatent_attention,
                        restore_attention, wrapped_implementation)
from .backbones import VLMBackbone

__all__ = ["VLMBackbone", "RolloutScores", "EagerProbabilities", "AttentionLease", "mmlatent_attention",
           "eager_attention", "fast_implementation", "attention_name", "wrapped_implementation", "install_attention",
           "restore_attention", "ATTENTION_PREFIX"]
