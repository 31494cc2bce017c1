"""flex_attention as torch.library custom ops, so torch.compile(fullgraph=True) keeps it in the graph.

The mods are Python callables, which an op cannot take: ``mods_key`` (evaluated once by dynamo
while it traces, ``assume_constant_result``) translates them and registers them under an int,
and the ops get that int. Only plain functions without closure cells are passed to it
(``plain_mod``): dynamo cannot hand it a closure made inside the compiled region over a tensor
(it fails while converting the cell). Only mods that translate and capture no tensor are
registered: a captured tensor would have to enter the graph as an input, and a rebound capture
would not be seen by the compiled graph. For the others, ``mods_key`` gives -1; the call then
stays a graph break.

The BlockMask enters as its eight lists (the op rebuilds it around them with the registered
mask_mod). The forward op runs the eager path (``dispatch.run_eager``: the router, the kernels or
the reference); the backward op runs it again under autograd and differentiates it, so a
backward costs one more forward than the eager autograd path.
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from torch import Tensor

_MODS: dict = {}  # key -> (score_mod, mask_mod)


def plain_mod(mod) -> bool:
    """None, or a Python function with no closure cells (dynamo evaluates this while tracing)."""
    return mod is None or (isinstance(mod, types.FunctionType) and not mod.__code__.co_freevars)


@torch._dynamo.assume_constant_result
def mods_key(score_mod: Optional[Callable], mask_mod: Optional[Callable]) -> int:
    """An int naming (score_mod, mask_mod) for the ops, or -1 if the pair cannot run as one
    (a mod the translator refuses or one that captures a tensor)."""
    from fastattn.ops.flex.translate import translate

    try:
        tr = translate(score_mod, mask_mod)
    except ValueError:
        return -1
    if tr.captures:
        return -1
    for key, mods in _MODS.items():
        if mods[0] is score_mod and mods[1] is mask_mod:
            return key
    _MODS[len(_MODS)] = (score_mod, mask_mod)
    return len(_MODS) - 1


def _block_mask(lists: list, block_size: list, seq_lengths: list, mask_mod):
    from torch.nn.attention.flex_attention import BlockMask

    if not lists:
        return None
    return BlockMask(tuple(seq_lengths), *lists, BLOCK_SIZE=tuple(block_size), mask_mod=mask_mod)


def _run(q, k, v, lists, block_size, seq_lengths, key, scale, enable_gqa):
    from fastattn.ops.flex.dispatch import run_eager

    score_mod, mask_mod = _MODS[key]
    block_mask = _block_mask(lists, block_size, seq_lengths, mask_mod)
    return run_eager("flex_attention", q, k, v, score_mod, block_mask, scale, enable_gqa, True)


@torch.library.custom_op("fastattn::flex_fwd", mutates_args=())
def flex_fwd(q: Tensor, k: Tensor, v: Tensor, lists: list[Optional[Tensor]], block_size: list[int],
             seq_lengths: list[int], key: int, scale: float, enable_gqa: bool) -> tuple[Tensor, Tensor]:
    """(out, lse) of flex_attention with the registered mods ``key``; ``lists``: the BlockMask's
    eight lists in its constructor's order (None where it has none), empty for no block_mask."""
    return _run(q, k, v, lists, block_size, seq_lengths, key, scale, enable_gqa)


@flex_fwd.register_fake
def _(q, k, v, lists, block_size, seq_lengths, key, scale, enable_gqa):
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastattn::flex_bwd", mutates_args=())
def flex_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lists: list[Optional[Tensor]], block_size: list[int],
             seq_lengths: list[int], key: int, scale: float, enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``flex_fwd``'s out for its gradient ``do``: the forward run again under
    autograd."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = _run(q, k, v, lists, block_size, seq_lengths, key, scale, enable_gqa)
        return torch.autograd.grad(out, (q, k, v), do)


@flex_bwd.register_fake
def _(do, q, k, v, lists, block_size, seq_lengths, key, scale, enable_gqa):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, lists, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *lists)


def _backward(ctx, dout, _dlse):
    # dlse is not propagated: lse is returned for merging partial results, not for training.
    q, k, v, *lists = ctx.saved_tensors
    dq, dk, dv = flex_bwd(dout, q, k, v, lists, *ctx.args)
    return dq, dk, dv, [None] * len(lists), None, None, None, None, None


flex_fwd.register_autograd(_backward, setup_context=_setup_context)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, key: int, scale: float, enable_gqa: bool):
    """(out, lse) through the ops, for a torch BlockMask or None and mods registered as ``key``."""
    if block_mask is None:
        lists, block_size, seq_lengths = [], [0, 0], [0, 0]
    else:
        lists = [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                 block_mask.full_kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
                 block_mask.full_q_num_blocks, block_mask.full_q_indices]
        block_size, seq_lengths = list(block_mask.BLOCK_SIZE), list(block_mask.seq_lengths)
    return flex_fwd(q, k, v, lists, block_size, seq_lengths, key, scale, enable_gqa)
