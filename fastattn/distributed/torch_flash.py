"""fastattn as torch's flash-attention implementation (``torch.nn.attention``'s registry).

    import fastattn.distributed.torch_flash as tf
    tf.register()                                               # registers, never activates
    torch.nn.attention.activate_flash_attention_impl("fastattn")  # the user opts in
    ...   # F.scaled_dot_product_attention's flash backend, torch's context_parallel (which rings
          # aten's flash op) and torch.nn.attention.varlen.varlen_attn now run fastattn
    torch.nn.attention.restore_flash_attention_impl()

Activating overrides four aten ops for one dispatch key (CUDA by default):
``_scaled_dot_product_flash_attention`` and ``_flash_attention_forward`` (dense (B, L, H, D) or
packed with ``cum_seq_q``), and their backwards. The forwards run ``ring.piece_forward`` on one
whole block (dense) or ``fastattn.flash_attention_varlen`` (packed); the backwards
``ring.piece_backward`` given the forward's out and lse (packed: the kernels' varlen backward in
one call, or the reference once per sequence): the kernels or the reference, as
``fastattn.use_backend`` decides. Causal is bottom-right, as in
FlashAttention 2; windows of -1 or None are open. Dropout and ALiBi are refused (RuntimeError, as
torch's FA3/FA4 do): aten's backward carries torch's Philox state, not fastattn's seed, and no
slopes.
"""
from __future__ import annotations

import torch
from torch.library import Library

from fastattn import backend
from fastattn.distributed.ring import Features, Piece, piece_backward, piece_forward
from fastattn.validation import band_from, default_scale

IMPL = "fastattn"
_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
        "_flash_attention_forward", "_flash_attention_backward")


class _Handle:
    """What ``activate_flash_attention_impl`` keeps: ``remove()`` deregisters the overrides."""

    def __init__(self, library: Library):
        self.library = library

    def remove(self) -> None:
        self.library._destroy()


def _window(side):
    return None if side is None or side < 0 else int(side)


def _refuse_dropout(op: str, dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise RuntimeError(f"fastattn {op}: dropout_p must be 0 (got {dropout_p}); torch's backward "
                           "replays its own Philox state, which fastattn's kernels do not draw from")


def _whole(q, is_causal, scale, left, right):
    """The one piece (every query x every key) and its options."""
    band = band_from(is_causal, (_window(left), _window(right)))
    return Piece(slice(None), slice(None), 0, 0, band[0], band[1]), \
        Features(default_scale(q.shape[-1], scale), None, None, 0.0, None)


def _dense(q, k, v, dropout_p, is_causal, scale, left, right):
    """(out, lse) of (B, H, L, D) inputs."""
    _refuse_dropout("flash attention", dropout_p)
    piece, f = _whole(q, is_causal, scale, left, right)
    kernels = backend.route("flash_attention", "flash", q, k, v).impl == "kernel"
    out, lse = piece_forward(q, k, v, f, piece, kernels)
    return out.to(q.dtype), lse.float()


def _dense_grads(do, q, k, v, out, lse, dropout_p, is_causal, scale, left, right):
    _refuse_dropout("flash attention backward", dropout_p)
    piece, f = _whole(q, is_causal, scale, left, right)
    kernels = backend.route("flash_attention", "flash", q, k, v).impl == "kernel"
    grads = piece_backward(do, q, k, v, out, lse, f, piece, kernels)[:3]
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def _no_rng(q):
    return torch.zeros(2, dtype=torch.uint64, device=q.device), torch.zeros((), dtype=torch.uint64, device=q.device)


def _sdpa_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention: (B, H, L, D) in, (B, H, L, Dv) out."""
    out, lse = _dense(query, key, value, dropout_p, is_causal, scale, None, None)
    seed, offset = _no_rng(query)
    empty = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, lse, None, None, query.shape[2], key.shape[2], seed, offset, empty


def _sdpa_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, philox_seed, philox_offset, *, scale=None):
    return _dense_grads(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, scale, None, None)




def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
                   *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                   block_table=None, num_splits=None):
    """aten::_flash_attention_forward: (B, L, H, D) dense, or (total, H, D) with ``cum_seq_q``."""
    if seqused_k is not None or block_table is not None or alibi_slopes is not None:
        raise RuntimeError("fastattn _flash_attention_forward: seqused_k, block_table and alibi_slopes are not "
                           "supported")
    if cum_seq_q is not None:
        import fastattn

        _refuse_dropout("flash attention", dropout_p)
        out, lse = fastattn.flash_attention_varlen(
            query, key, value, cum_seq_q, cum_seq_k, causal=is_causal, scale=scale,
            window=(_window(window_size_left), _window(window_size_right)), return_lse=True)
    else:
        out, lse = _dense(*(t.transpose(1, 2) for t in (query, key, value)), dropout_p, is_causal, scale,
                          window_size_left, window_size_right)
        out = out.transpose(1, 2)
    seed, offset = _no_rng(query)
    return out, lse, seed, offset, torch.empty(0, dtype=query.dtype, device=query.device)


def _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
    if cum_seq_q is None or cum_seq_q.numel() == 0:
        grads = _dense_grads(*(t.transpose(1, 2) for t in (grad_out, query, key, value, out)), logsumexp, dropout_p,
                             is_causal, scale, window_size_left, window_size_right)
        return tuple(g.transpose(1, 2) for g in grads)
    return _packed_grads(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, dropout_p, is_causal,
                         scale, window_size_left, window_size_right)


def _packed_grads(grad_out, query, key, value, out, lse, cum_seq_q, cum_seq_k, dropout_p, is_causal, scale, left,
                  right):
    """(dq, dk, dv) of packed (total, H, D) sequences, lse (Hq, total_q): the kernels' varlen
    backward in one call over every sequence; without kernels, the reference per sequence."""
    _refuse_dropout("flash attention backward", dropout_p)
    views = [t.transpose(0, 1)[None] for t in (grad_out, query, key, value, out)]  # (1, H, total, D)
    if backend.route("flash_attention_varlen", "flash", *views[1:4]).impl == "kernel":
        from fastattn.ops.flash.op import flash_bwd  # imports triton, so only when used

        band = band_from(is_causal, (_window(left), _window(right)))
        grads = flash_bwd(*views, lse[None].float().contiguous(), None, None, None, None, cum_seq_q.contiguous(),
                          cum_seq_k.contiguous(), default_scale(query.shape[-1], scale), None, 0.0, band[0], band[1],
                          False)[:3]
        return tuple(g[0].transpose(0, 1) for g in grads)  # (1, H, total, D) -> (total, H, D)
    grads = [torch.zeros_like(t) for t in (query, key, value)]
    cq, ck = cum_seq_q.tolist(), cum_seq_k.tolist()
    for b in range(len(cq) - 1):  # each packed sequence as a (1, H, L, D) block
        rows, keys = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        seq = [t[part].transpose(0, 1)[None] for t, part in
               ((grad_out, rows), (query, rows), (key, keys), (value, keys), (out, rows))]
        for g, part, piece in zip(grads, (rows, keys, keys),
                                  _dense_grads(*seq, lse[None, :, rows], dropout_p, is_causal, scale, left, right)):
            g[part] = piece[0].transpose(0, 1)
    return tuple(grads)


def _activate(dispatch_key: str) -> _Handle:
    library = Library("aten", "IMPL", dispatch_key)
    for name, fn in zip(_OPS, (_sdpa_forward, _sdpa_backward, _flash_forward, _flash_backward)):
        library.impl(name, fn, dispatch_key)
    return _Handle(library)


def register(name: str = IMPL, *, dispatch_key: str = "CUDA") -> None:
    """Register fastattn with ``torch.nn.attention.register_flash_attention_impl`` under ``name``
    for tensors of ``dispatch_key``. Nothing changes until the user calls
    ``torch.nn.attention.activate_flash_attention_impl(name)``.

    Raises:
        ValueError: this torch has no flash-implementation registry."""
    attention = torch.nn.attention
    if not hasattr(attention, "register_flash_attention_impl"):
        raise ValueError(f"register: torch {torch.__version__} has no torch.nn.attention."
                         "register_flash_attention_impl")
    attention.register_flash_attention_impl(name, register_fn=lambda: _activate(dispatch_key))
