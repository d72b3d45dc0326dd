"""The prior backbone: a frozen DINOv2 ViT (timm's implementation of the same network)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fssam.model.config import DinoConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PriorBackbone(nn.Module):
    """Images (n, 3, S, S) in 0..255 RGB -> last-layer normed patch features (n, D, g, g)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.image_size = config.image_size
        self.grid = config.image_size // config.patch_size
        self.vit = VisionTransformer(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            init_values=1e-5,
            num_classes=0,
            global_pool="",
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        x = (x - self.mean) / self.std
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]  # (n, g*g, D), final norm applied
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, self.grid, self.grid)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's resampling of a (1, 1 + M*M, D) pos_embed to a grid x grid patch layout.

    Bicubic with the scale factor (grid + 0.1) / M and no antialias, as DINOv2's hub models do at
    run time (`interpolate_offset=0.1`); done once at load time here.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    m = int(math.sqrt(patch_pos.shape[1]))
    if m * m != patch_pos.shape[1]:
        raise ValueError(f"pos_embed has {patch_pos.shape[1]} patch positions, not a square grid")
    if m == grid:
        return pos_embed
    dim = patch_pos.shape[-1]
    scale = (grid + 0.1) / m
    resized = F.interpolate(
        patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        antialias=False,
    )
    if resized.shape[-2:] != (grid, grid):
        raise ValueError(f"pos_embed resampling gave {tuple(resized.shape[-2:])}, expected {(grid, grid)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, resized], dim=1)


def convert_dinov2_state_dict(state: dict, grid: int) -> dict:
    """Official DINOv2 hub keys -> this module's keys (`vit.` prefix, pos_embed on our grid).

    `mask_token` (used only in DINOv2's own training) is dropped.
    """
    out = {}
    for key, value in state.items():
        if key == "mask_token":
            continue
        if key == "pos_embed":
            value = interpolate_pos_embed(value, grid)
        out["vit." + key] = value
    return out
