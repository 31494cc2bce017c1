"""Context-parallel attention on torch.distributed: one sequence sharded across ranks.

    import fastattn.distributed as fd
    q, k, v = (fd.shard_sequence(t, rank, world, zigzag=True) for t in (q, k, v))
    out = fd.ring_attention(q, k, v, causal=True)        # or fd.ulysses_attention(...)
    out = fd.varlen_attention(q, k, v, cu_seqlens, causal=True)   # packed documents, any shard lengths

Not imported by ``import fastattn``; import ``fastattn.distributed`` explicitly. Importing it
has no side effects (it creates no process group).
"""
from fastattn.distributed.ring import merge_partials, ring_attention
from fastattn.distributed.sharding import (chunk_ids, gather_sequence, packed_bounds, shard_positions,
                                           shard_sequence, unshard_sequence)
from fastattn.distributed.switch import ContextParallel, context_parallel, current
from fastattn.distributed.ulysses import ulysses_attention
from fastattn.distributed.varlen import varlen_attention

__all__ = ["ring_attention", "ulysses_attention", "varlen_attention",
           "shard_sequence", "unshard_sequence", "gather_sequence", "shard_positions", "chunk_ids", "merge_partials",
           "packed_bounds",
           "context_parallel", "ContextParallel", "current"]
