"""fastattn.nn: modules built only on fastattn's public functions."""
from fastattn.nn.kv_cache import KVCache, PagedKVCache

from fastattn.nn.kinds import (AttentionKind, ContextParallelAttention, Flash, Linear, Linformer, Performer, Sparse,
                               Supports)
from fastattn.nn.attention import MultiHeadAttention, attention_weights
from fastattn.nn.mla import LatentCache, MultiHeadLatentAttention
from fastattn.nn.positional import (LearnedPositionalEmbedding, RelativePositionBias, RotaryEmbedding,
                                    SinusoidalPositionalEmbedding, alibi_slopes)
from fastattn.nn.layers import (FeedForward, MoEConfig, MoEFeedForward, RMSNorm, TransformerDecoder,
                                TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer, aux_loss)

__all__ = ["KVCache", "PagedKVCache"]
__all__ += ["AttentionKind", "ContextParallelAttention", "Flash", "Linear", "Linformer", "Performer", "Sparse",
            "Supports"]
__all__ += ["MultiHeadAttention", "attention_weights", "LatentCache", "MultiHeadLatentAttention",
            "LearnedPositionalEmbedding", "RelativePositionBias", "RotaryEmbedding", "SinusoidalPositionalEmbedding", "alibi_slopes", "FeedForward", "MoEConfig",
            "MoEFeedForward", "RMSNorm", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
            "TransformerEncoderLayer", "aux_loss"]
