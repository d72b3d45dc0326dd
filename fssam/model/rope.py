"""Axial rotary position encoding in real arithmetic (cos/sin), for export.

sam2 rotates (x[2i], x[2i+1]) pairs as complex numbers times exp(i*theta); here the same
rotation is written with real tensors so that ONNX and TensorRT can run it.
"""

from __future__ import annotations

import torch
from sam2.modeling.position_encoding import init_t_xy


def axial_rotary_angles(dim: int, end_x: int, end_y: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (end_x*end_y, dim // 2): the arguments of sam2's `compute_axial_cis`."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim))  # (dim/4,)
    t_x, t_y = init_t_xy(end_x, end_y)
    return torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)  # (N, dim/2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of x (..., T, dim) by angles given as cos/sin (T', dim/2), T = r*T'."""
    tokens = x.shape[-2]
    repeats = tokens // cos.shape[0]
    if repeats != 1:  # keys hold several memories laid out one after another
        cos = cos.repeat(repeats, 1)
        sin = sin.repeat(repeats, 1)
    x_float = x.float()
    x_even = x_float[..., 0::2]  # (..., T, dim/2)
    x_odd = x_float[..., 1::2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
