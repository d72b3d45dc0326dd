"""Iterative Memory Refinement (IMR): fuse more query-FG memory into the pseudo query memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fssam.model.prior import prototype_similarity
from fssam.model.scma import min_max_normalise


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def iterative_memory_refinement(
    support_memory: torch.Tensor,
    support_masks: torch.Tensor,
    query_fg_memory: torch.Tensor,
    query_ae_memory: torch.Tensor,
    prior_fg: torch.Tensor,
    prior_ae: torch.Tensor,
    num_refine: int = 3,
    version: str = "v1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined pseudo query memory (B, M, h, w) and refined prior_ae (B, 1, h, w).

    support_memory (B, K, M, h, w); support_masks (B, K, S, S); query memories (B, M, h, w)
    encoded with prior_fg and prior_ae; priors (B, 1, S, S). Each round weighs every location by
    (similarity to the support FG memory prototype) + (similarity to the current refined
    memory) - 1, clipped at 0 ("v2" also min-max normalises the weight), and mixes query-FG
    memory and prior_fg in with that weight.
    """
    size = query_fg_memory.shape[-2:]
    masks = _resize(support_masks, size)  # (B, K, h, w)
    prior_fg = _resize(prior_fg, size)
    prior_ae = _resize(prior_ae, size)
    to_support = torch.stack(
        [
            prototype_similarity(query_fg_memory, support_memory[:, shot], masks[:, shot : shot + 1])
            for shot in range(support_memory.shape[1])
        ],
        dim=1,
    ).mean(dim=1)  # (B, 1, h, w)
    for _ in range(num_refine):
        to_refined = prototype_similarity(query_fg_memory, query_ae_memory, prior_ae)
        weight = torch.clamp(to_refined + to_support - 1.0, min=0)
        if version == "v2":
            weight = min_max_normalise(weight.flatten(1)).view_as(weight)
        query_ae_memory = query_fg_memory * weight + query_ae_memory * (1.0 - weight)
        prior_ae = prior_fg * weight + prior_ae * (1.0 - weight)
        prior_ae = min_max_normalise(prior_ae.flatten(1)).view_as(prior_ae)
    return query_ae_memory, prior_ae
