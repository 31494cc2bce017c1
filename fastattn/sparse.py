"""Block-sparse attention layouts and the pattern builders that make them.

A layout says, for every (query block, key block) pair of one head, whether that block of
scores is computed. ``fastattn.sparse_attention`` then does work only for the kept blocks:
the kernels walk, for each query block, the list of its key blocks (compressed rows), and the
backward walks the transposed lists (for each key block, its query blocks).

Every length argument of the builders is in tokens; ``block_size`` tokens make one block. All
builders return a square layout for self-attention over ``seq_len`` tokens; ``from_dense``
builds any rectangular one. ``causal=True`` in a builder drops the key blocks above the block
diagonal; pass ``causal=True`` to ``sparse_attention`` as well to mask inside the diagonal
blocks token by token. Layouts combine with ``union`` (or ``|``) and ``stack`` (one layout per
head). In the pictures below each character is one block: ``#`` kept, ``.`` dropped, query
blocks down, key blocks across.

Pure PyTorch (no Triton import); everything is kept on the CPU and copied to a device once.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "BlockSparseLayout", "from_dense", "local", "strided", "fixed", "longformer", "bigbird",
    "dilated", "union", "stack",
]

SeqLen = Union[int, Sequence[int]]


def _seq_pair(seq_len: SeqLen, what: str = "seq_len") -> tuple[int, int]:
    if isinstance(seq_len, int) and not isinstance(seq_len, bool):
        pair = (seq_len, seq_len)
    elif isinstance(seq_len, (tuple, list)) and len(seq_len) == 2:
        pair = tuple(seq_len)
    else:
        raise ValueError(f"{what} must be an int or (q_len, k_len), got {seq_len!r}")
    for n in pair:
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
            raise ValueError(f"{what} must hold positive ints, got {seq_len!r}")
    return pair


def _check_block_size(block_size) -> int:
    if not (isinstance(block_size, int) and not isinstance(block_size, bool)
            and block_size >= 16 and block_size & (block_size - 1) == 0):
        raise ValueError(
            f"block_size must be a power of two >= 16 (the kernels tile by it and tl.dot needs "
            f"at least 16), got {block_size!r}")
    return block_size


def _csr(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(H, R, C) bool -> (crow (H*R+1,), col (nnz,)) int32, rows in (head, row) order."""
    flat = mask.reshape(-1, mask.shape[-1])
    counts = flat.sum(-1)
    crow = torch.zeros(flat.shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    col = flat.nonzero()[:, 1]  # nonzero is row-major, so each row's columns come sorted
    return crow.to(torch.int32), col.to(torch.int32)


class BlockSparseLayout:
    """Which (query block, key block) pairs attention computes, per head or shared by all heads.

    Stored in compressed-row form, the form the kernels walk:

    * ``crow_indices``: int32 ``(num_heads * num_q_blocks + 1,)``; the key blocks of query
      block ``r`` of head ``h`` are ``col_indices[crow[h * num_q_blocks + r] : crow[... + 1]]``.
    * ``col_indices``: int32 ``(nnz,)``, ascending within each row.

    ``num_heads`` is 1 for a layout shared by every head, else the number of query heads it
    will be used with. ``seq_len = (q_len, k_len)`` is the token count it is built for; the
    last block of each side may be partial. ``block_size`` is a power of two >= 16.

    Build one with ``from_dense`` or a pattern builder rather than by hand; the constructor
    checks the arrays and raises ``ValueError`` saying what is wrong.
    """

    def __init__(self, crow_indices: Tensor, col_indices: Tensor, *, block_size: int,
                 seq_len: SeqLen, num_heads: int = 1):
        self.block_size = _check_block_size(block_size)
        self.q_len, self.k_len = _seq_pair(seq_len)
        if not (isinstance(num_heads, int) and num_heads >= 1):
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        self.num_heads = num_heads
        self.num_q_blocks = -(-self.q_len // block_size)
        self.num_k_blocks = -(-self.k_len // block_size)
        crow = torch.as_tensor(crow_indices).cpu()
        col = torch.as_tensor(col_indices).cpu()
        rows = num_heads * self.num_q_blocks
        if crow.dtype.is_floating_point or col.dtype.is_floating_point or crow.dtype == torch.bool:
            raise ValueError("crow_indices and col_indices must be integer tensors")
        if crow.dim() != 1 or crow.numel() != rows + 1:
            raise ValueError(
                f"crow_indices must have num_heads * num_q_blocks + 1 = {num_heads} * "
                f"{self.num_q_blocks} + 1 = {rows + 1} entries (q_len {self.q_len}, block_size "
                f"{block_size}), got shape {tuple(crow.shape)}")
        crow, col = crow.long(), col.long().reshape(-1)
        if crow[0] != 0 or crow[-1] != col.numel() or bool((crow[1:] < crow[:-1]).any()):
            raise ValueError(
                f"crow_indices must start at 0, never decrease and end at len(col_indices) = "
                f"{col.numel()}; got start {int(crow[0])}, end {int(crow[-1])}")
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= self.num_k_blocks):
            raise ValueError(
                f"col_indices must lie in [0, {self.num_k_blocks}) (k_len {self.k_len}, block_size "
                f"{block_size}), got values in [{int(col.min())}, {int(col.max())}]")
        row_of = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
        if col.numel() > 1 and bool(((col[1:] <= col[:-1]) & (row_of[1:] == row_of[:-1])).any()):
            raise ValueError("col_indices must be strictly increasing within each query-block row")
        self.crow_indices = crow.to(torch.int32)
        self.col_indices = col.to(torch.int32)
        self._device_cache: dict = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, mask: Tensor, block_size: int, seq_len: Optional[SeqLen] = None) -> "BlockSparseLayout":
        """From a bool block mask ``(num_q_blocks, num_k_blocks)`` (shared by all heads) or
        ``(num_heads, num_q_blocks, num_k_blocks)``; True keeps a block. ``seq_len`` (int or
        (q_len, k_len)) defaults to whole blocks; a given one must need exactly the mask's
        block counts (the last block may be partial)."""
        _check_block_size(block_size)
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a bool Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (True = keep the block), got {mask.dtype}")
        if mask.dim() not in (2, 3):
            raise ValueError(
                f"mask must be (num_q_blocks, num_k_blocks) or (num_heads, num_q_blocks, "
                f"num_k_blocks), got shape {tuple(mask.shape)}")
        mask = mask.detach().cpu()
        if mask.dim() == 2:
            mask = mask[None]
        h, nq, nk = mask.shape
        if min(h, nq, nk) == 0:
            raise ValueError(f"mask has an empty dimension: shape {tuple(mask.shape)}")
        if seq_len is None:
            seq_len = (nq * block_size, nk * block_size)
        q_len, k_len = _seq_pair(seq_len)
        for side, n, blocks in (("query", q_len, nq), ("key", k_len, nk)):
            if -(-n // block_size) != blocks:
                raise ValueError(
                    f"block_size {block_size} does not tile the {side} side as the mask claims: "
                    f"{n} tokens need {-(-n // block_size)} blocks, the mask has {blocks}")
        crow, col = _csr(mask)
        return cls(crow, col, block_size=block_size, seq_len=(q_len, k_len), num_heads=h)

    @classmethod
    def from_block_mask(cls, block_mask) -> "BlockSparseLayout":
        """From torch's FlexAttention ``BlockMask`` (torch >= 2.5): its full and partial blocks
        are kept. The batch dimension must be 1 (layouts are shared across the batch).

        Raises:
            ValueError: partial blocks with a ``mask_mod`` other than torch's ``noop_mask`` (a
                layout keeps whole blocks, so the mask_mod would be dropped: run the BlockMask
                with ``fastattn.flex_attention``), non-square blocks, a batch size other than 1."""
        from torch.nn.attention.flex_attention import noop_mask

        partial = int(block_mask.kv_num_blocks.sum())
        if partial and block_mask.mask_mod is not noop_mask:
            raise ValueError(f"BlockMask has {partial} partial blocks whose mask_mod "
                             f"{getattr(block_mask.mask_mod, '__name__', block_mask.mask_mod)} a layout cannot "
                             "hold (it keeps whole blocks); run it with fastattn.flex_attention(q, k, v, "
                             "block_mask=...), or build it without a mask_mod (BlockMask.from_kv_blocks)")
        bs = block_mask.BLOCK_SIZE
        bs = (bs, bs) if isinstance(bs, int) else tuple(bs)
        if bs[0] != bs[1]:
            raise ValueError(f"BlockMask has BLOCK_SIZE {bs}; a layout needs square blocks")
        dense = block_mask.to_dense()  # (B, H, nq, nk) int, full and partial blocks
        if dense.shape[0] != 1:
            raise ValueError(f"BlockMask has batch size {dense.shape[0]}; a layout needs 1")
        q_len, k_len = block_mask.seq_lengths
        mask = dense[0].bool()[:, : -(-q_len // bs[0]), : -(-k_len // bs[0])]
        return cls.from_dense(mask, bs[0], (q_len, k_len))

    def to_block_mask(self, mask_mod=None):
        """torch's FlexAttention ``BlockMask`` with the same blocks (every kept block as a
        partial block with ``mask_mod``, default: keep everything)."""
        from torch.nn.attention.flex_attention import BlockMask

        dense = self.to_dense()
        counts = dense.sum(-1).to(torch.int32)  # (H, nq)
        # Kept block indices first (ascending), then the unused slots.
        order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return BlockMask.from_kv_blocks(counts[None], order[None], BLOCK_SIZE=self.block_size,
                                        mask_mod=mask_mod, seq_lengths=(self.q_len, self.k_len))

    # ------------------------------------------------------------------ views
    @property
    def seq_len(self) -> tuple[int, int]:
        return (self.q_len, self.k_len)

    @property
    def nnz(self) -> int:
        """Kept blocks, summed over the layout's heads."""
        return int(self.col_indices.numel())

    def to_dense(self) -> Tensor:
        """Bool ``(num_heads, num_q_blocks, num_k_blocks)``, True where a block is kept."""
        rows = self.num_heads * self.num_q_blocks
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        row_of = torch.repeat_interleave(torch.arange(rows), counts)
        dense = torch.zeros(rows, self.num_k_blocks, dtype=torch.bool)
        dense[row_of, self.col_indices.long()] = True
        return dense.view(self.num_heads, self.num_q_blocks, self.num_k_blocks)

    def to_element_mask(self) -> Tensor:
        """Bool ``(num_heads, q_len, k_len)``: the token-level mask the layout stands for."""
        bs = self.block_size
        return self.to_dense().repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, : self.q_len, : self.k_len]

    @property
    def density(self) -> float:
        """Fraction of blocks kept, over all heads (1.0 = dense)."""
        return self.nnz / (self.num_heads * self.num_q_blocks * self.num_k_blocks)

    def transposed(self) -> tuple[Tensor, Tensor]:
        """(ccol, row) int32: for each key block of each head, its query blocks, ascending."""
        return _csr(self.to_dense().transpose(1, 2))

    def expand_heads(self, num_heads: int) -> "BlockSparseLayout":
        """This layout as a per-head one for ``num_heads`` heads (a shared layout repeated)."""
        if self.num_heads == num_heads:
            return self
        if self.num_heads != 1:
            raise ValueError(f"a layout for {self.num_heads} heads cannot become one for {num_heads}")
        return BlockSparseLayout.from_dense(self.to_dense().expand(num_heads, -1, -1), self.block_size, self.seq_len)

    def causal(self) -> "BlockSparseLayout":
        """The same layout without blocks wholly above the block diagonal (bottom-right
        aligned when q_len != k_len, as ``sparse_attention(causal=True)``)."""
        dense = self.to_dense() & _causal_blocks(self.q_len, self.k_len, self.block_size)
        return BlockSparseLayout.from_dense(dense, self.block_size, self.seq_len)

    def __or__(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        return union(self, other)

    def __eq__(self, other) -> bool:
        return (isinstance(other, BlockSparseLayout) and self.block_size == other.block_size
                and self.seq_len == other.seq_len and self.num_heads == other.num_heads
                and torch.equal(self.crow_indices, other.crow_indices)
                and torch.equal(self.col_indices, other.col_indices))

    __hash__ = None  # mutable-looking tensors inside; compare with ==

    def __repr__(self) -> str:
        return (f"BlockSparseLayout(block_size={self.block_size}, seq_len={self.seq_len}, "
                f"num_heads={self.num_heads}, blocks={self.num_q_blocks}x{self.num_k_blocks}, "
                f"density={self.density:.3f})")

    def picture(self, head: int = 0) -> str:
        """ASCII picture of one head: ``#`` kept block, ``.`` dropped; query blocks down."""
        return "\n".join("".join("#" if x else "." for x in row) for row in self.to_dense()[head].tolist())

    # ------------------------------------------------------------------ for the ops
    def check_for(self, op: str, q: Tensor, k: Tensor) -> None:
        """ValueError unless this layout fits q (B, Hq, Lq, D) and k (B, Hkv, Lk, D)."""
        hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
        if self.num_heads not in (1, hq):
            raise ValueError(
                f"{op}: layout has {self.num_heads} heads but q has {hq} query heads; a layout "
                f"must have 1 (shared) or {hq} heads")
        if (lq, lk) != self.seq_len:
            raise ValueError(
                f"{op}: layout is for seq_len (q_len, k_len) = {self.seq_len} but q has Lq={lq} "
                f"and k has Lk={lk}")

    def device_tensors(self, device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(crow, col, ccol, row, dense) on ``device``, copied once and cached."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            ccol, row = self.transposed()
            self._device_cache[key] = tuple(
                t.to(device) for t in (self.crow_indices, self.col_indices, ccol, row, self.to_dense()))
        return self._device_cache[key]


# ---------------------------------------------------------------------- helpers
def _blocks(seq_len: int, block_size: int) -> int:
    _check_block_size(block_size)
    if not (isinstance(seq_len, int) and seq_len > 0):
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return -(-seq_len // block_size)


def _causal_blocks(q_len: int, k_len: int, block_size: int) -> Tensor:
    """(nq, nk) bool: blocks holding at least one pair with key <= query + (k_len - q_len)."""
    nq, nk = -(-q_len // block_size), -(-k_len // block_size)
    last_q = torch.clamp(torch.arange(nq) * block_size + block_size - 1, max=q_len - 1)
    first_k = torch.arange(nk) * block_size
    return first_k[None, :] <= last_q[:, None] + (k_len - q_len)


def _window_blocks(window, block_size: int, name: str = "window") -> int:
    if not (isinstance(window, int) and window >= 0):
        raise ValueError(f"{name} must be an int >= 0 (tokens), got {window!r}")
    return -(-window // block_size)


def _multiple(value, block_size: int, name: str) -> int:
    if not (isinstance(value, int) and value > 0 and value % block_size == 0):
        raise ValueError(f"{name} must be a positive multiple of block_size {block_size} (tokens), got {value!r}")
    return value // block_size


def _finish(mask: Tensor, seq_len: int, block_size: int, causal: bool) -> BlockSparseLayout:
    if causal:
        mask = mask & _causal_blocks(seq_len, seq_len, block_size)
    return BlockSparseLayout.from_dense(mask, block_size, seq_len)


def _dist(n: int) -> Tensor:
    """(n, n) query block minus key block."""
    i = torch.arange(n)
    return i[:, None] - i[None, :]


# ---------------------------------------------------------------------- patterns
def local(seq_len: int, window: int, *, block_size: int = 64, causal: bool = False) -> BlockSparseLayout:
    """Sliding window: each query block sees the key blocks within ``window`` tokens on each
    side, rounded up to whole blocks (``w = ceil(window / block_size)`` blocks each side).

    ``local(512, 64, block_size=64)`` and with ``causal=True``::

        ##......      #.......
        ###.....      ##......
        .###....      .##.....
        ..###...      ..##....
        ...###..      ...##...
        ....###.      ....##..
        .....###      .....##.
        ......##      ......##
    """
    n, w = _blocks(seq_len, block_size), _window_blocks(window, block_size)
    return _finish(_dist(n).abs() <= w, seq_len, block_size, causal)


def strided(seq_len: int, stride: int, *, block_size: int = 64, causal: bool = False) -> BlockSparseLayout:
    """Sparse Transformer strided pattern (Child et al. 2019), both of its heads in one layout:
    the previous ``stride`` tokens (local part) and every ``stride``-th block before and after
    (strided part). ``stride`` is in tokens, a multiple of ``block_size``; with ``s = stride /
    block_size`` blocks, query block i keeps key block j iff ``|i - j| < s`` or
    ``(i - j) % s == 0``.

    ``strided(512, 192, block_size=64)`` and with ``causal=True``::

        ####..#.      #.......
        #####..#      ##......
        ######..      ###.....
        #######.      ####....
        .#######      .####...
        ..######      ..####..
        #..#####      #..####.
        .#..####      .#..####

    (``s = 3`` blocks: ``|i - j| < 3`` plus every third diagonal.)
    """
    n, s = _blocks(seq_len, block_size), _multiple(stride, block_size, "stride")
    d = _dist(n)
    return _finish((d.abs() < s) | (d % s == 0), seq_len, block_size, causal)


def fixed(seq_len: int, stride: int, *, summary: Optional[int] = None, block_size: int = 64,
          causal: bool = False) -> BlockSparseLayout:
    """Sparse Transformer fixed pattern (Child et al. 2019): the sequence is cut into chunks of
    ``stride`` tokens; a query sees its own chunk, and the last ``summary`` tokens of every
    chunk (default one block) are summary positions that every query sees. Both lengths are in
    tokens and multiples of ``block_size``.

    ``fixed(512, 192, block_size=64)`` and with ``causal=True``::

        ###..#.#      #.......
        ###..#.#      ##......
        ###..#.#      ###.....
        ..####.#      ..##....
        ..####.#      ..###...
        ..####.#      ..####..
        ..#..###      ..#..##.
        ..#..###      ..#..###

    (chunks of 3 blocks; blocks 2 and 5 are summaries; block 7 is the partial last chunk's
    summary).
    """
    n, s = _blocks(seq_len, block_size), _multiple(stride, block_size, "stride")
    c = 1 if summary is None else _multiple(summary, block_size, "summary")
    if c > s:
        raise ValueError(f"summary ({c} blocks) must not exceed stride ({s} blocks)")
    i = torch.arange(n)
    same_chunk = (i[:, None] // s) == (i[None, :] // s)
    # The last c blocks of each chunk (or of the final partial chunk) summarise it.
    chunk_end = torch.clamp((i // s + 1) * s, max=n)
    is_summary = i >= chunk_end - c
    return _finish(same_chunk | is_summary[None, :], seq_len, block_size, causal)


def _global_blocks(global_tokens: Iterable[int], seq_len: int, block_size: int) -> Tensor:
    idx = torch.as_tensor(list(global_tokens), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= seq_len):
        raise ValueError(f"global_tokens must lie in [0, {seq_len}), got {idx.tolist()}")
    g = torch.zeros(_blocks(seq_len, block_size), dtype=torch.bool)
    g[idx // block_size] = True
    return g


def longformer(seq_len: int, window: int, global_tokens: Iterable[int] = (0,), *,
               block_size: int = 64, causal: bool = False) -> BlockSparseLayout:
    """Longformer (Beltagy et al. 2020): a sliding window of ``window`` tokens each side (as
    ``local``) plus global tokens that attend to everything and that everything attends to.
    At block granularity the whole block holding a global token is global.

    ``longformer(512, 64, global_tokens=[0, 300], block_size=64)`` and with ``causal=True``::

        ########      #.......
        ###.#...      ##......
        #####...      ###.....
        #.###...      #.##....
        ########      #####...
        #...###.      #...##..
        #...####      #...###.
        #...#.##      #...#.##
    """
    n, w = _blocks(seq_len, block_size), _window_blocks(window, block_size)
    g = _global_blocks(global_tokens, seq_len, block_size)
    mask = (_dist(n).abs() <= w) | g[:, None] | g[None, :]
    return _finish(mask, seq_len, block_size, causal)


def bigbird(seq_len: int, window: int, num_global: int = 1, num_random: int = 1, *,
            block_size: int = 64, causal: bool = False, seed: int = 0, num_heads: int = 1) -> BlockSparseLayout:
    """BigBird (Zaheer et al. 2020): a sliding window of ``window`` tokens each side, the first
    ``num_global`` tokens global in both directions (rounded up to whole blocks), and
    ``num_random`` extra key blocks per query block drawn at random (without repeats, among
    the blocks not already kept; with ``causal`` only from the past). ``seed`` makes it
    repeatable; with ``num_heads > 1`` every head draws its own random blocks.

    ``bigbird(512, 64, num_global=64, num_random=1, block_size=64)`` and with ``causal=True``::

        ########      #.......
        ###....#      ##......
        ####.#..      ###.....
        #.###..#      ####....
        #..###.#      ##.##...
        #...####      #.#.##..
        #..#.###      #..#.##.
        #...#.##      #...#.##
    """
    n, w = _blocks(seq_len, block_size), _window_blocks(window, block_size)
    if not (isinstance(num_global, int) and num_global >= 0):
        raise ValueError(f"num_global must be an int >= 0 (tokens), got {num_global!r}")
    if not (isinstance(num_random, int) and num_random >= 0):
        raise ValueError(f"num_random must be an int >= 0 (blocks per query block), got {num_random!r}")
    if not (isinstance(num_heads, int) and num_heads >= 1):
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    g = torch.zeros(n, dtype=torch.bool)
    g[: -(-num_global // block_size)] = True
    allowed = _causal_blocks(seq_len, seq_len, block_size) if causal else torch.ones(n, n, dtype=torch.bool)
    base = ((_dist(n).abs() <= w) | g[:, None] | g[None, :]) & allowed
    gen = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(num_heads):
        # Random scores, -1 where a block is already kept or not allowed; the top num_random
        # of each row that are >= 0 become its random blocks.
        r = torch.rand(n, n, generator=gen).masked_fill(~(allowed & ~base), -1.0)
        top = torch.topk(r, min(num_random, n), dim=-1)
        pick = torch.zeros(n, n, dtype=torch.bool)
        pick.scatter_(1, top.indices, top.values >= 0)
        heads.append(base | pick)
    return BlockSparseLayout.from_dense(torch.stack(heads), block_size, seq_len)


def dilated(seq_len: int, window: int, dilation: int, *, block_size: int = 64,
            causal: bool = False) -> BlockSparseLayout:
    """Dilated sliding window: key blocks up to ``window`` tokens away on each side (rounded up
    to whole blocks), keeping only every ``dilation``-th block counted from the diagonal, so
    the same number of blocks covers ``dilation`` times the span.

    ``dilated(512, 256, 2, block_size=64)`` and with ``causal=True``::

        #.#.#...      #.......
        .#.#.#..      .#......
        #.#.#.#.      #.#.....
        .#.#.#.#      .#.#....
        #.#.#.#.      #.#.#...
        .#.#.#.#      .#.#.#..
        ..#.#.#.      ..#.#.#.
        ...#.#.#      ...#.#.#
    """
    n, w = _blocks(seq_len, block_size), _window_blocks(window, block_size)
    if not (isinstance(dilation, int) and dilation >= 1):
        raise ValueError(f"dilation must be an int >= 1 (blocks), got {dilation!r}")
    d = _dist(n)
    return _finish((d.abs() <= w) & (d % dilation == 0), seq_len, block_size, causal)


def from_dense(mask: Tensor, block_size: int, seq_len: Optional[SeqLen] = None) -> BlockSparseLayout:
    """``BlockSparseLayout.from_dense``: a layout from a bool block mask."""
    return BlockSparseLayout.from_dense(mask, block_size, seq_len)


def union(*layouts: BlockSparseLayout) -> BlockSparseLayout:
    """Blocks kept by any of the layouts. They must agree in block size and seq_len; a shared
    layout combines with a per-head one by applying to every head."""
    if not layouts or not all(isinstance(x, BlockSparseLayout) for x in layouts):
        raise ValueError("union needs one or more BlockSparseLayout")
    first = layouts[0]
    heads = {x.num_heads for x in layouts} - {1}
    if len(heads) > 1:
        raise ValueError(f"cannot combine layouts for different head counts {sorted(heads)}")
    for x in layouts[1:]:
        if x.block_size != first.block_size or x.seq_len != first.seq_len:
            raise ValueError(
                f"cannot combine layouts with block_size/seq_len {first.block_size}/{first.seq_len} "
                f"and {x.block_size}/{x.seq_len}")
    dense = layouts[0].to_dense()
    for x in layouts[1:]:
        dense = dense | x.to_dense()
    return BlockSparseLayout.from_dense(dense, first.block_size, first.seq_len)


def stack(layouts: Sequence[BlockSparseLayout]) -> BlockSparseLayout:
    """One layout per head: head h uses ``layouts[h]`` (each must be shared, 1 head)."""
    if not layouts or not all(isinstance(x, BlockSparseLayout) for x in layouts):
        raise ValueError("stack needs a non-empty sequence of BlockSparseLayout")
    first = layouts[0]
    for x in layouts:
        if x.num_heads != 1:
            raise ValueError(f"stack takes single-head layouts, got one with {x.num_heads} heads")
        if x.block_size != first.block_size or x.seq_len != first.seq_len:
            raise ValueError(
                f"cannot stack layouts with block_size/seq_len {first.block_size}/{first.seq_len} "
                f"and {x.block_size}/{x.seq_len}")
    return BlockSparseLayout.from_dense(torch.cat([x.to_dense() for x in layouts]), first.block_size, first.seq_len)
