"""Pseudo Prompt Generator (PPG): DINOv2 priors `prior_fg` and `prior_ae` for the query image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fssam.model.scma import COSINE_EPS, masked_average, min_max_normalise


def prototype_similarity(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Min-max normalised cosine similarity of each query location to the masked support prototype.

    query (B, C, h, w), support (B, C, h, w), masks (B, 1, h, w) weights -> (B, 1, h, w).
    """
    b, c, h, w = query.shape
    prototype = masked_average(support.flatten(2).transpose(1, 2), masks.flatten(1))  # (B, C)
    query_tokens = query.flatten(2)  # (B, C, hw)
    # one dtype for both operands: under bf16 autocast the prototype is fp32 (the mask weights)
    # and the tokens bf16; autocast computes einsum's inner product in bf16 either way
    dots = torch.einsum("bc,bcn->bn", prototype.to(query_tokens.dtype), query_tokens)
    cosine = dots / (prototype.norm(dim=1, keepdim=True) * query_tokens.norm(dim=1) + COSINE_EPS)
    return min_max_normalise(cosine).view(b, 1, h, w)


def pseudo_prompts(
    query_features: torch.Tensor, support_features: torch.Tensor, support_masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """prior_fg, prior_ae (B, 1, S, S) from DINOv2 features and binary support masks.

    query_features (B, D, g, g), support_features (B, K, D, g, g), support_masks (B, K, S, S).
    Per shot: FG and BG prototypes by masked average pooling; `prior_fg` is the normalised FG
    similarity, `prior_ae` the normalised positive part of FG minus BG similarity, both
    upsampled to S; shots are averaged.
    """
    size = support_masks.shape[-2:]
    grid = query_features.shape[-2:]
    fg_list, ae_list = [], []
    for shot in range(support_features.shape[1]):
        mask = F.interpolate(support_masks[:, shot : shot + 1], size=grid, mode="bilinear", align_corners=True)
        features = support_features[:, shot]
        fg = prototype_similarity(query_features, features, mask)
        bg = prototype_similarity(query_features, features, 1 - mask)
        fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=True)  # (B, 1, S, S)
        bg = F.interpolate(bg, size=size, mode="bilinear", align_corners=True)
        ae = torch.clamp(fg - bg, min=0).flatten(1)
        ae = min_max_normalise(ae).view_as(fg)
        fg_list.append(fg)
        ae_list.append(ae)
    prior_fg = torch.cat(fg_list, dim=1).mean(dim=1, keepdim=True)
    prior_ae = torch.cat(ae_list, dim=1).mean(dim=1, keepdim=True)
    return prior_fg, prior_ae
