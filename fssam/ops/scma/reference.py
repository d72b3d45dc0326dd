"""Support-Calibrated Memory Attention (SCMA): the reference implementation, in PyTorch.

One cross-attention with the score calibration of FSSAM (ARCHITECTURE.md section 2).
Keys/values are laid out as [K support blocks of N tokens, 1 pseudo-query block of N tokens,
P object-pointer tokens]; queries are the N query-image tokens.

Every other SCMA implementation in this package is this math, fused, and tested against it:
the ONNX custom node (and so the TensorRT plugin) gets its inputs from `calibration_inputs` and
`calibration_term` here; the op's CUDA path (`triton_kernel.triton_scma`) computes the same
calibration inputs in a Triton kernel (tests compare them with `calibration_inputs`); the custom
op's CPU kernel and its backward are `scma_reference`. The prior generator (PPG)
and the memory refinement (IMR) share `masked_average` and `min_max_normalise`.
"""

from __future__ import annotations

import math

import torch

CALIBRATION_SCALE = 10.0  # bias range [-10, 0]
PROTOTYPE_EPS = 5e-4  # masked average pooling, as the prior generator
COSINE_EPS = 1e-7


def masked_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Prototype sum_j m[j] f[j] / (sum_j m[j] + 5e-4): features (..., N, c), masks (..., N)."""
    weighted = (masks.unsqueeze(-1) * features).sum(dim=-2)  # (..., c)
    return weighted / (masks.sum(dim=-1, keepdim=True) + PROTOTYPE_EPS)


def min_max_normalise(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low + COSINE_EPS)


def support_weight(keys_support: torch.Tensor, keys_query: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """w[j] in [0, 1]: similarity of pseudo-query key j to each shot's FG prototype, averaged.

    keys_support (B, H, K, N, c), keys_query (B, H, N, c), masks (B, K, N) -> (B, H, N).
    """
    prototypes = masked_average(keys_support, masks[:, None].to(keys_support.dtype))  # (B, H, K, c)
    dots = torch.einsum("bhkc,bhnc->bhkn", prototypes, keys_query)
    norms = prototypes.norm(dim=-1).unsqueeze(-1) * keys_query.norm(dim=-1).unsqueeze(-2)  # (B, H, K, N)
    cosine = dots / (norms + COSINE_EPS)
    return min_max_normalise(cosine).mean(dim=2)


def shot_mean_keys_values(k: torch.Tensor, v: torch.Tensor, num_shots: int, num_tokens: int):
    """Average the K support blocks token by token: (B, H, K*N + N + P, c) -> (B, H, 2N + P, c)."""
    b, h, _, c = k.shape
    support_len = num_shots * num_tokens
    k_support = k[:, :, :support_len].reshape(b, h, num_shots, num_tokens, c).mean(dim=2)
    v_support = v[:, :, :support_len].reshape(b, h, num_shots, num_tokens, c).mean(dim=2)
    return (
        torch.cat([k_support, k[:, :, support_len:]], dim=2),
        torch.cat([v_support, v[:, :, support_len:]], dim=2),
    )


def calibration_inputs(k: torch.Tensor, v: torch.Tensor, support_masks: torch.Tensor, mode: str = "paper"):
    """What any SCMA implementation needs besides q: (keys, values, w, N).

    keys/values (B, H, 2N + P', c) with the calibrated block at [N, 2N); w (B, H, N) fp32.
    mode "official": the released code passes only the first support mask, so it sees one
    shot: the support block is shot 0 and the calibrated block is the next N keys (the
    second support memory when K > 1), and nothing is averaged.
    """
    if mode == "official":
        support_masks = support_masks[:, :1]
    elif mode != "paper":
        raise ValueError(f"scma mode {mode!r}: expected 'paper' or 'official'")
    b, h, _, c = k.shape
    num_shots, num_tokens = support_masks.shape[1], support_masks.shape[2]
    support_len = num_shots * num_tokens
    keys_support = k[:, :, :support_len].reshape(b, h, num_shots, num_tokens, c).float()
    keys_query = k[:, :, support_len : support_len + num_tokens].float()
    w = support_weight(keys_support, keys_query, support_masks.float())
    keys, values = shot_mean_keys_values(k, v, num_shots, num_tokens)
    return keys, values, w, num_tokens


def calibration_term(w: torch.Tensor) -> torch.Tensor:
    """cal[j] = 10 * (w[j] - 1), fp32 (B, H, N), contiguous: what the fused kernel adds to the
    normalised pseudo-query scores, bias = min(10 a + cal, 0)."""
    return (CALIBRATION_SCALE * (w.float() - 1.0)).contiguous()


def calibrated_scores(scores: torch.Tensor, w: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Add 10 * min(a + w - 1, 0) to the pseudo-query block [N, 2N) of the scores (..., N, 2N + P)."""
    block = scores[..., num_tokens : 2 * num_tokens]
    a = min_max_normalise(block)
    bias = CALIBRATION_SCALE * torch.clamp(a + w.unsqueeze(-2).to(a.dtype) - 1.0, max=0.0)
    return torch.cat([scores[..., :num_tokens], block + bias, scores[..., 2 * num_tokens :]], dim=-1)


def scma_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, support_masks: torch.Tensor, mode: str = "paper"
) -> torch.Tensor:
    """q (B, H, N, c); k, v (B, H, K*N + N + P, c) rotated; support_masks (B, K, N) binary.

    Returns (B, H, N, c). The scores are formed and the softmax taken in q's dtype (the
    calibration statistics in fp32), as the official module does.
    """
    keys, values, w, num_tokens = calibration_inputs(k, v, support_masks, mode)
    scores = (q @ keys.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, N, 2N + P)
    scores = calibrated_scores(scores, w, num_tokens)
    return torch.softmax(scores, dim=-1) @ values
