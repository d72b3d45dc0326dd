"""How the six stages compose into one episode, written once for every backend.

`stages` is anything with the six stage methods (the eager FSSAM module, the ONNX Runtime or
TensorRT runners of fssam.export), taking and returning torch tensors.
"""

from __future__ import annotations

import torch


def encode_support(stages, support_images: torch.Tensor, support_masks: torch.Tensor) -> dict:
    """The support side of an episode, cacheable: support_images (B, K, 3, S, S), masks (B, K, S, S) 0/1."""
    b, k = support_images.shape[:2]
    flat_images = support_images.flatten(0, 1)  # (BK, 3, S, S)
    flat_masks = support_masks.flatten(0, 1).unsqueeze(1)  # (BK, 1, S, S)
    dino_features = stages.prior_backbone(flat_images)
    s0, s1, s2 = stages.image_encoder(flat_images)
    memory, pointers = stages.memory_encoder(s0, s1, s2, flat_masks)
    return {
        "dino_features": dino_features.unflatten(0, (b, k)),  # (B, K, D, g, g)
        "memory": memory.unflatten(0, (b, k)),  # (B, K, M, h, w)
        "pointers": pointers.unflatten(0, (b, k)),  # (B, K, C)
        "masks": support_masks,  # (B, K, S, S)
    }


def segment(stages, query_images: torch.Tensor, support: dict) -> torch.Tensor:
    """Query mask logits (B, 1, S, S) from query images (B, 3, S, S) and an encoded support set."""
    query_dino = stages.prior_backbone(query_images)
    s0, s1, s2 = stages.image_encoder(query_images)
    prior_fg, prior_ae = stages.prior(query_dino, support["dino_features"], support["masks"])
    fg_memory, _ = stages.memory_encoder(s0, s1, s2, prior_fg)
    ae_memory, ae_pointer = stages.memory_encoder(s0, s1, s2, prior_ae)
    refined_memory, _ = stages.refine(support["memory"], support["masks"], fg_memory, ae_memory, prior_fg, prior_ae)
    return stages.head(s0, s1, s2, support["memory"], support["pointers"], refined_memory, ae_pointer, support["masks"])


def binary_masks(support_masks: torch.Tensor) -> torch.Tensor:
    """0/1 float masks; 255 (ignore) becomes background, as in the official code."""
    masks = support_masks if support_masks.is_floating_point() else support_masks.float()
    return torch.where(masks == 255, torch.zeros_like(masks), masks)


def run_episode(stages, query_images, support_images, support_masks) -> torch.Tensor:
    return segment(stages, query_images, encode_support(stages, support_images, binary_masks(support_masks)))
