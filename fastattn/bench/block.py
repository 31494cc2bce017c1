"""One full transformer block, forward+backward in training mode: torch's
nn.TransformerEncoderLayer as is, and the same layer after fastattn.convert (same weights),
so the difference is the attention alone, seen at the scale of a whole block."""
from __future__ import annotations

import copy

import torch
from torch import nn

import fastattn
from fastattn.bench.common import Case, attention_flops

SUITE = "block"


def cases(device, quick=False):
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    width, heads = (2048, 16) if cuda else (256, 4)
    lengths = ([1024, 4096] if quick else [512, 1024, 2048, 4096, 8192]) if cuda else ([128, 256] if quick else [128, 256, 512, 1024])
    tokens = 16384 if cuda else 1024
    out = []
    for l in lengths:
        b = max(1, tokens // l)
        torch_layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                                 norm_first=True, device=device, dtype=dtype)
        fast_layer = fastattn.convert(copy.deepcopy(torch_layer))
        x = torch.randn(b, l, width, device=device, dtype=dtype, requires_grad=True)
        # Linear layers: 2 FLOPs per multiply-add, QKV + output (4 w^2) and the MLP (8 w^2) per token.
        linear = 2 * b * l * 12 * width * width
        flops = 3 * linear + attention_flops(b, heads, l, l, width // heads, causal=True, backward=True)
        params = {"seq_len": l, "width": width}
        for impl, layer in (("fastattn", fast_layer), ("torch-layer", torch_layer)):
            def step(layer=layer):
                y = layer(x, is_causal=True, src_mask=nn.Transformer.generate_square_subsequent_mask(
                    l, device=device, dtype=dtype))
                y.sum().backward()
            out.append(Case(SUITE, f"b{b}-l{l}-w{width}-causal", impl, step, flops=flops, params=params))
    return out
