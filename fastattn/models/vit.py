"""ViT: a vision transformer (Dosovitskiy et al. 2021), patch embedding + class token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.models.common import Positional, StackConfig, encoder_layer, final_norm, init_weights
from fastattn.nn.layers import TransformerEncoder, aux_loss


@dataclass
class ViTConfig(StackConfig):
    """StackConfig plus the image geometry: square ``image_size`` cut into ``patch_size``
    patches, ``channels`` and ``num_classes``. ``max_seq_len`` is raised to the patch count + 1
    when smaller."""
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        self.max_seq_len = max(self.max_seq_len, self.num_patches + 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    """images (B, C, S, S) -> patches (B, N, E) by a strided convolution -> [cls; patches]
    (+ positions) -> bidirectional encoder -> final norm -> linear head on the class token.

    forward(images, labels=None) -> (logits (B, num_classes), loss or None).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch = nn.Conv2d(cfg.channels, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos = Positional(cfg, bidirectional=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = TransformerEncoder(encoder_layer(cfg, self.pos, causal=False), cfg.n_layers, final_norm(cfg))
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        init_weights(self, cfg)
        nn.init.normal_(self.cls, std=cfg.init_std)
        # patch embedding as a linear layer on flattened patches (fan-in init, as ViT)
        nn.init.trunc_normal_(self.patch.weight, std=(cfg.channels * cfg.patch_size ** 2) ** -0.5)
        nn.init.zeros_(self.patch.bias)
        nn.init.zeros_(self.head.weight)

    def forward(self, images: Tensor, labels: Optional[Tensor] = None):
        cfg = self.config
        if images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"ViT: images must be (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(images.shape)}")
        x = self.patch(images)  # (B, E, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, E, N) -> (B, N, E)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, E)
        x = self.drop(self.pos.add(x))
        bias = self.pos.bias(x.shape[1], x.shape[1], x.dtype)
        x = self.blocks(x, attn_bias=bias)
        logits = self.head(x[:, 0])  # class token -> (B, classes)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels) + aux_loss(self).to(logits.device)
        return logits, loss
