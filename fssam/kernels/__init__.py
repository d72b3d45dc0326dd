"""SCMA implementations behind one dispatcher."""

from __future__ import annotations

from fssam.model.scma import scma_reference


def scma(q, k, v, support_masks, mode: str = "paper"):
    """Support-Calibrated Memory Attention: (B, H, N, c) from rotated q, k, v and (B, K, N) masks."""
    return scma_reference(q, k, v, support_masks, mode)
