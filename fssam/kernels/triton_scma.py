"""Fused Support-Calibrated Memory Attention (SCMA) in OpenAI Triton.

Same contract as `fssam.model.scma.scma_reference(q, k, v, support_masks, mode)`:
q (B, H, N, c); k, v (B, H, K*N + N + P, c) already rotary-encoded; support_masks (B, K, N).

Split of the work (ARCHITECTURE.md section 2):
  * PyTorch, O(K N c): `calibration_inputs` (shot-mean keys/values, w in fp32) and the per-key
    calibration term cal[j] = 10 * (w[j] - 1) (fp32, (B, H, N)).
  * Triton, per (query tile, batch*head), never materialising the N x (2N + P) scores:
      loop 1 over the pseudo-query keys [N, 2N): fp32 row min/max of S = q k^T / sqrt(c);
      loop 2, FlashAttention-2 online softmax over the 2N + P keys in three ranges
      [0, N) support-mean, [N, 2N) pseudo-query (calibrated), [2N, 2N + P) pointers, where the
      calibrated range gets S + min(0, (S - min) * 10 / (max - min + 1e-7) + cal[j]).
    Tails (N or P not a multiple of the block, P = 0) are masked; head dims that are not a
    power of two (or < 16, the smallest tl.dot) are zero-padded in registers.
    Accumulation (dots, statistics, softmax) is fp32 for fp32/fp16/bf16 inputs; fp32 dots use
    input_precision="ieee" (no TF32), P is cast to the value dtype before P @ V as in FA-2.

`scma_fused(q, keys, values, cal)` is the kernel alone (used by the TensorRT plugin, whose
ONNX node carries exactly these four inputs); `triton_scma(q, k, v, support_masks, mode)` is
the full drop-in replacement of the reference. Under TRITON_INTERPRET=1 (set before importing
triton) both run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from fssam.model.scma import CALIBRATION_SCALE, COSINE_EPS, calibration_inputs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _attend_range(
    acc, m_i, l_i, q,
    k_base, v_base, stride_kn, stride_vn,
    lo, hi,
    cal_base, row_min, row_scale,
    offs_n, offs_d, d_mask,
    SQRT_C: tl.constexpr, CAL_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CALIBRATE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax accumulation over keys [lo, hi) (FlashAttention-2 inner loop)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        valid = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=valid[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) / SQRT_C  # fp32 (BLOCK_M, BLOCK_N)
        if CALIBRATE:
            cal = tl.load(cal_base + (cols - lo), mask=valid, other=0.0)
            a = (s - row_min[:, None]) * row_scale[:, None]
            s = s + tl.minimum(CAL_SCALE * a + cal[None, :], 0.0)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid column
        alpha = tl.exp2((m_i - m_new) * 1.4426950408889634)
        p = tl.exp2((s - m_new[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _scma_fwd_kernel(
    # inputs (this order - inputs, int32 scalars, output - is the TensorRT AOT launch order)
    Q, K, V, CAL,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_cb, stride_ch,
    stride_ob, stride_oh, stride_on,
    H, N, L,
    # output
    O,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SQRT_C: tl.constexpr, CAL_SCALE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head). Last dims are contiguous (stride 1);
    keys/values hold [N support-mean, N pseudo-query, L - 2N pointer] tokens; CAL (B, H, N)
    fp32 with unit stride along N."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    cal_base = CAL + b * stride_cb + h * stride_ch

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # loop 1: row min / max of the pseudo-query scores (fp32)
    row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start in range(N, 2 * N, BLOCK_N):
        cols = start + offs_n
        valid = cols < 2 * N
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=valid[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) / SQRT_C
        row_min = tl.minimum(row_min, tl.min(tl.where(valid[None, :], s, float("inf")), 1))
        row_max = tl.maximum(row_max, tl.max(tl.where(valid[None, :], s, float("-inf")), 1))
    row_scale = 1.0 / (row_max - row_min + EPS)

    # loop 2: online softmax over support-mean, calibrated pseudo-query, pointer keys
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, N,
                                  cal_base, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, False, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, N, 2 * N,
                                  cal_base, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, True, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 2 * N, L,
                                  cal_base, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, False, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


def kernel_config(head_dim: int, num_tokens: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """Block sizes / launch options (no autotuning: one fixed choice per head dim)."""
    interpret = interpreting() if interpret is None else interpret
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret:  # the interpreter pays per block op: few, mid-sized tiles
        block = max(16, min(32, triton.next_power_of_2(num_tokens)))
        return dict(BLOCK_D=block_d, BLOCK_M=block, BLOCK_N=block, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # fp32 tiles take twice the registers: smaller tiles, 8 warps (no spills on sm_90)
        block_m, block_n = (64, 64) if block_d <= 64 else (32, 32) if block_d <= 128 else (32, 16)
        return dict(BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8, num_stages=2)
    block_n = 64 if block_d <= 128 else 32
    return dict(BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=block_n, num_warps=4 if block_d <= 64 else 8, num_stages=2)


def constexprs(head_dim: int, dtype: torch.dtype, config: dict) -> dict:
    """The constexpr arguments of `_scma_fwd_kernel` (shared by the JIT launch and the AOT compile)."""
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=config["BLOCK_D"],
        BLOCK_M=config["BLOCK_M"],
        BLOCK_N=config["BLOCK_N"],
        SQRT_C=math.sqrt(head_dim),
        CAL_SCALE=CALIBRATION_SCALE,
        EPS=COSINE_EPS,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def scma_fused(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cal: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel alone. q (B, H, N, c); keys/values (B, H, 2N + P, c) as laid out by
    `calibration_inputs`; cal (B, H, N) = 10 * (w - 1) in fp32. Returns (B, H, N, c) in q's dtype
    (written into `out` when given: same shape and dtype as q, last dim contiguous)."""
    if q.dim() != 4 or keys.dim() != 4 or values.dim() != 4:
        raise ValueError(f"scma: q, keys, values must be 4-D (B, H, T, c), got {tuple(q.shape)}, "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}")
    b, h, n, c = q.shape
    total = keys.shape[2]
    if keys.shape[:2] != (b, h) or keys.shape[-1] != c or values.shape != keys.shape or total < 2 * n:
        raise ValueError(f"scma: keys/values {tuple(keys.shape)} do not fit q {tuple(q.shape)} "
                         "(expected (B, H, 2N + P, c))")
    if tuple(cal.shape) != (b, h, n):
        raise ValueError(f"scma: calibration term {tuple(cal.shape)}, expected {(b, h, n)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scma: unsupported dtype {q.dtype}; expected one of {SUPPORTED_DTYPES}")
    if not (q.device == keys.device == values.device == cal.device):
        raise ValueError("scma: all tensors must be on one device")
    if not q.is_cuda and not interpreting():
        raise RuntimeError("scma Triton kernel: CPU tensors need TRITON_INTERPRET=1 (set before importing triton)")
    keys = _last_dim_contiguous(keys.to(q.dtype))
    values = _last_dim_contiguous(values.to(q.dtype))
    q = _last_dim_contiguous(q)
    cal = cal.float()
    if cal.stride(-1) != 1:
        cal = cal.contiguous()
    if out is None:
        out = torch.empty((b, h, n, c), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError("scma: out must match q's shape, dtype and device, with a contiguous last dim")
    if out.numel() == 0:
        return out
    config = kernel_config(c, n, q.dtype)
    if block_m is not None:
        config["BLOCK_M"] = block_m
    if block_n is not None:
        config["BLOCK_N"] = block_n
    grid = (triton.cdiv(n, config["BLOCK_M"]), b * h)
    # Triton launches on the current CUDA device, not on the tensors' one: make them the same
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _scma_fwd_kernel[grid](
            q, keys, values, cal,
            q.stride(0), q.stride(1), q.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            cal.stride(0), cal.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            h, n, total,
            out,
            **constexprs(c, q.dtype, config),
            num_warps=config["num_warps"],
            num_stages=config["num_stages"],
        )
    return out


def calibration_term(w: torch.Tensor) -> torch.Tensor:
    """cal[j] = 10 * (w[j] - 1), fp32 (B, H, N), contiguous."""
    return (CALIBRATION_SCALE * (w.float() - 1.0)).contiguous()


def triton_scma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support_masks: torch.Tensor,
    mode: str = "paper",
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Drop-in replacement of `scma_reference` running the fused Triton kernel."""
    keys, values, w, num_tokens = calibration_inputs(k, v, support_masks, mode)
    if q.shape[2] != num_tokens:
        raise ValueError(f"scma: q has {q.shape[2]} tokens, support masks have {num_tokens}")
    return scma_fused(q, keys, values, calibration_term(w), block_m=block_m, block_n=block_n)
