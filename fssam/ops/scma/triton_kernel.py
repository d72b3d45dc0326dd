"""Fused Support-Calibrated Memory Attention (SCMA) in OpenAI Triton.

Same contract as `fssam.ops.scma.reference.scma_reference(q, k, v, support_masks, mode)`:
q (B, H, N, c); k, v (B, H, K*N + N + P, c) already rotary-encoded; support_masks (B, K, N).

Split of the work (ARCHITECTURE.md section 2):
  * PyTorch, O(K N c): `calibration_inputs` (shot-mean keys/values, w in fp32) and the per-key
    calibration term cal[j] = 10 * (w[j] - 1) (fp32, (B, H, N)), both from the reference module.
  * Triton, never materialising the N x (2N + P) scores, one of two paths:
    - one pass per (query tile, batch*head), `_scma_fwd_kernel`:
        loop 1 over the pseudo-query keys [N, 2N): fp32 row min/max of S = q k^T / sqrt(c);
        loop 2, FlashAttention-2 online softmax over the 2N + P keys in three ranges
        [0, N) support-mean, [N, 2N) pseudo-query (calibrated), [2N, 2N + P) pointers, where the
        calibrated range gets S + min(0, (S - min) * 10 / (max - min + 1e-7) + cal[j]);
    - split over the key axis (FlashDecoding-style), for launches that would leave most SMs idle
      (batch 1 at the serving shape: N = 1024, H = 1 is 16 query tiles on 132 SMs):
        `_scma_stats_kernel`: partial row min/max over slices of the pseudo-query keys;
        `_scma_split_kernel`: per (query tile, batch*head, key chunk) the exact row min/max
          (the min/max of the partials: min and max are exact in any order), then the same
          online softmax over the chunk's part of the three ranges; writes the chunk's
          normalised output and log-sum-exp (fp32);
        `_scma_combine_kernel`: the softmax-weighted sum of the chunks' outputs.
    Tails (N or P not a multiple of the block, P = 0) are masked; head dims that are not a
    power of two (or < 16, the smallest tl.dot) are zero-padded in registers.
    Accumulation (dots, statistics, softmax) is fp32 for fp32/fp16/bf16 inputs; fp32 dots use
    input_precision="ieee" (no TF32), P is cast to the value dtype before P @ V as in FA-2.
Block sizes, warps and stages are autotuned (`triton.autotune`) from a small table per head dim
and dtype class (`AUTOTUNE_CONFIGS`), each entry checked for sm_90 (registers, spills, shared
memory) by tests/test_kernels.py; under the interpreter one small fixed config is used.

`scma_fused(q, keys, values, cal)` is the kernel alone (used by the TensorRT plugin, whose
ONNX node carries exactly these four inputs); `triton_scma(q, k, v, support_masks, mode)` is
the full drop-in replacement of the reference. Under TRITON_INTERPRET=1 (set before importing
triton) both run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import torch
import triton
import triton.language as tl

from fssam.ops.scma.reference import CALIBRATION_SCALE, COSINE_EPS, calibration_inputs, calibration_term

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- device code


@triton.jit
def _row_min_max(
    q, k_base, stride_kn, lo, hi, offs_n, offs_d, d_mask,
    SQRT_C: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 row min / max of S = q k^T / sqrt(c) over the keys [lo, hi) (the calibration's pass 1)."""
    row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        valid = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=valid[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) / SQRT_C  # fp32 (BLOCK_M, BLOCK_N)
        row_min = tl.minimum(row_min, tl.min(tl.where(valid[None, :], s, float("inf")), 1))
        row_max = tl.maximum(row_max, tl.max(tl.where(valid[None, :], s, float("-inf")), 1))
    return row_min, row_max


@triton.jit
def _attend_range(
    acc, m_i, l_i, q,
    k_base, v_base, stride_kn, stride_vn,
    lo, hi,
    cal_base, cal_origin, row_min, row_scale,
    offs_n, offs_d, d_mask,
    SQRT_C: tl.constexpr, CAL_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CALIBRATE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax accumulation over keys [lo, hi) (FlashAttention-2 inner loop); key j of the
    calibrated range reads cal[j - cal_origin]."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        valid = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=valid[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) / SQRT_C  # fp32 (BLOCK_M, BLOCK_N)
        if CALIBRATE:
            cal = tl.load(cal_base + (cols - cal_origin), mask=valid, other=0.0)
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
    """One program: BLOCK_M queries of one (batch, head), all keys. Last dims are contiguous
    (stride 1); keys/values hold [N support-mean, N pseudo-query, L - 2N pointer] tokens; CAL
    (B, H, N) fp32 with unit stride along N."""
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
    row_min, row_max = _row_min_max(q, k_base, stride_kn, N, 2 * N, offs_n, offs_d, d_mask,
                                    SQRT_C, DOT_PRECISION, BLOCK_M, BLOCK_N)
    row_scale = 1.0 / (row_max - row_min + EPS)

    # loop 2: online softmax over support-mean, calibrated pseudo-query, pointer keys
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 0, N,
                                  cal_base, N, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, False, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, N, 2 * N,
                                  cal_base, N, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, True, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, 2 * N, L,
                                  cal_base, N, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, False, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _scma_stats_kernel(
    Q, K, ROW_MIN, ROW_MAX,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    H, N, CHUNK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SQRT_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split path, pass 1. Program (query tile, batch*head, slice s): the row min / max of the
    pseudo-query scores over keys [N + s CHUNK, N + (s + 1) CHUNK) into ROW_MIN / ROW_MAX
    (B*H, num_slices, N) fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    lo = N + pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, 2 * N)
    row_min, row_max = _row_min_max(q, k_base, stride_kn, lo, hi, offs_n, offs_d, d_mask,
                                    SQRT_C, DOT_PRECISION, BLOCK_M, BLOCK_N)
    part = (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * N
    tl.store(ROW_MIN + part + offs_m, row_min, mask=m_mask)
    tl.store(ROW_MAX + part + offs_m, row_max, mask=m_mask)


@triton.jit
def _scma_split_kernel(
    Q, K, V, CAL, ROW_MIN, ROW_MAX, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_cb, stride_ch,
    H, N, L, CHUNK, NUM_STAT_SLICES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SQRT_C: tl.constexpr, CAL_SCALE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Split path, pass 2. Program (query tile, batch*head, chunk s): online softmax over keys
    [s CHUNK, (s + 1) CHUNK) with the exact row min / max reduced from the stats kernel's slices;
    writes out / l to O_PART (B*H, num_chunks, N, HEAD_DIM) and m log2(e) + log2(l) to LSE_PART
    (B*H, num_chunks, N), both fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    cal_base = CAL + b * stride_cb + h * stride_ch

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < N
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    # exact row min / max of the pseudo-query scores: min / max over the stats slices
    row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    stats = pid_bh.to(tl.int64) * NUM_STAT_SLICES * N
    for s in range(0, NUM_STAT_SLICES):
        row_min = tl.minimum(row_min, tl.load(ROW_MIN + stats + s * N + offs_m, mask=m_mask, other=0.0))
        row_max = tl.maximum(row_max, tl.load(ROW_MAX + stats + s * N + offs_m, mask=m_mask, other=0.0))
    row_scale = 1.0 / (row_max - row_min + EPS)

    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                  lo, tl.minimum(hi, N),
                                  cal_base, N, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, False, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                  tl.maximum(lo, N), tl.minimum(hi, 2 * N),
                                  cal_base, N, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, True, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                  tl.maximum(lo, 2 * N), hi,
                                  cal_base, N, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SQRT_C, CAL_SCALE, DOT_PRECISION, False, BLOCK_N)
    part = pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s
    o_part = O_PART + part * N * HEAD_DIM
    tl.store(o_part + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None],
             mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE_PART + part * N + offs_m, m_i * 1.4426950408889634 + tl.log2(l_i), mask=m_mask)


@triton.jit
def _scma_combine_kernel(
    O_PART, LSE_PART,
    stride_ob, stride_oh, stride_on,
    H, N, NUM_CHUNKS,
    O,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split path, pass 3. out = sum_s 2^(lse_s - lse) o_s with lse = log2 sum_s 2^lse_s."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    parts = pid_bh.to(tl.int64) * NUM_CHUNKS
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, NUM_CHUNKS):
        m = tl.maximum(m, tl.load(LSE_PART + (parts + s) * N + offs_m, mask=m_mask, other=0.0))
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for s in range(0, NUM_CHUNKS):
        weight = tl.exp2(tl.load(LSE_PART + (parts + s) * N + offs_m, mask=m_mask, other=0.0) - m)
        o_s = tl.load(O_PART + (parts + s) * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=mask, other=0.0)
        acc += weight[:, None] * o_s
        total += weight
    out = acc / total[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch configs

KERNELS = ("fwd", "stats", "split")  # the autotuned kernels (combine has one fixed config)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, dtype class and BLOCK_D class. Every entry
# is compiled for sm_90 by tests/test_kernels.py (registers <= 255 per thread and within the 64K
# register file, no spills, shared memory <= 227 KiB): see the report there before adding one.
# BLOCK_M <= 64 everywhere (the split decision counts query tiles of NOMINAL_BLOCK_M) and
# BLOCK_N divides SPLIT_ALIGN (so the split chunks are whole key tiles).
AUTOTUNE_CONFIGS: dict[tuple[str, str, int], tuple[tuple[int, int, int, int], ...]] = {
    # fp16 / bf16: tensor-core dots. c = 256 is the serving head dim (SAM 2's memory attention:
    # one head of 256); 64 / 128 keep one or two candidates.
    ("fwd", "16bit", 64): ((64, 64, 4, 2), (32, 64, 4, 2)),
    ("fwd", "16bit", 128): ((64, 64, 8, 2), (64, 32, 4, 3)),
    ("fwd", "16bit", 256): ((64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)),
    ("stats", "16bit", 64): ((64, 64, 4, 2),),
    ("stats", "16bit", 128): ((64, 64, 4, 2),),
    ("stats", "16bit", 256): ((64, 64, 4, 2), (64, 32, 4, 2)),
    ("split", "16bit", 64): ((64, 64, 4, 2),),
    ("split", "16bit", 128): ((64, 64, 4, 2), (64, 32, 4, 2)),
    ("split", "16bit", 256): ((64, 32, 8, 2), (32, 64, 4, 2)),
    # fp32: FMA dots (input_precision="ieee"), twice the registers per element; ptxas spills a few
    # bytes on several 32 x 32 tiles (e.g. fwd c = 128 / 256 with 8 warps): only spill-free ones here
    ("fwd", "fp32", 64): ((64, 32, 4, 2), (32, 32, 4, 2)),
    ("fwd", "fp32", 128): ((32, 16, 4, 2), (16, 32, 4, 2)),
    ("fwd", "fp32", 256): ((32, 16, 8, 2), (16, 16, 4, 2)),
    ("stats", "fp32", 64): ((32, 32, 4, 2),),
    ("stats", "fp32", 128): ((32, 32, 4, 2),),
    ("stats", "fp32", 256): ((32, 32, 8, 2),),
    ("split", "fp32", 64): ((32, 32, 4, 2),),
    ("split", "fp32", 128): ((32, 32, 4, 2), (16, 32, 4, 2)),
    ("split", "fp32", 256): ((16, 32, 4, 2), (16, 16, 4, 2)),
}
# Register spills (in 4-byte words, Triton's n_spills) accepted for a config, keyed by the test id of
# tests/test_kernels.py::test_config_fits_sm90, each with its reason. None today: every config compiles
# for sm_90 without spills.
DOCUMENTED_SPILLS: dict[str, int] = {}
NOMINAL_BLOCK_M = 64  # query tile the split decision counts programs with
SPLIT_ALIGN = 64  # split chunks are multiples of this many keys (every autotuned BLOCK_N divides it)
MIN_CHUNK = 128  # keys per chunk / pseudo-query keys per stats slice, at least
MAX_SPLITS = 16
PROGRAMS_PER_SM = 2  # the split path aims at this many programs per SM


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def block_d_for(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def autotune_configs(kernel: str, head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The autotune candidates of `kernel` ("fwd", "stats", "split") for this head dim and dtype."""
    table = AUTOTUNE_CONFIGS[(kernel, dtype_class(dtype), _head_dim_class(block_d_for(head_dim)))]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in table]


def combine_config(head_dim: int) -> dict:
    return dict(BLOCK_M=32 if block_d_for(head_dim) <= 128 else 16, num_warps=4, num_stages=1)


def interpreter_config(num_tokens: int) -> dict:
    """The interpreter pays per block op: few, mid-sized tiles; no autotuning."""
    block = max(16, min(32, triton.next_power_of_2(num_tokens)))
    return dict(BLOCK_M=block, BLOCK_N=block, num_warps=1, num_stages=1)


def kernel_config(head_dim: int, num_tokens: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """A fixed launch config of `_scma_fwd_kernel` (with BLOCK_D): the interpreter's, else the first
    autotune candidate. The TensorRT AOT plugin starts from it; the JIT launch autotunes."""
    interpret = interpreting() if interpret is None else interpret
    config = interpreter_config(num_tokens) if interpret else autotune_configs("fwd", head_dim, dtype)[0]
    return dict(config, BLOCK_D=block_d_for(head_dim))


def constexprs(head_dim: int, dtype: torch.dtype, config: dict | None = None, kernel=None) -> dict:
    """The constexpr arguments of a kernel (default `_scma_fwd_kernel`): BLOCK_M / BLOCK_N from
    `config` (left out when None: the autotuner supplies them)."""
    kernel = _scma_fwd_kernel if kernel is None else kernel
    values = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d_for(head_dim),
        SQRT_C=math.sqrt(head_dim),
        CAL_SCALE=CALIBRATION_SCALE,
        EPS=COSINE_EPS,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    if config is not None:
        values.update(BLOCK_M=config["BLOCK_M"], BLOCK_N=config.get("BLOCK_N"))
    return {name: value for name, value in values.items() if name in kernel.arg_names and value is not None}


_FP32_POINTERS = ("CAL", "ROW_MIN", "ROW_MAX", "O_PART", "LSE_PART")
_DATA_POINTERS = ("Q", "K", "V", "O")
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def kernel_signature(kernel, dtype: torch.dtype, consts: dict) -> dict:
    """Triton compile signature: data tensors of `dtype`, workspaces and CAL fp32, int32 scalars."""
    return {name: "constexpr" if name in consts else "*fp32" if name in _FP32_POINTERS
            else "*" + _TRITON_TYPE[dtype] if name in _DATA_POINTERS else "i32" for name in kernel.arg_names}


def compile_for_target(kernel, dtype: torch.dtype, head_dim: int, config: dict, target, *, aligned=None):
    """`triton.compile` one kernel for an explicit target (e.g. GPUTarget("cuda", 90, 32)): needs no GPU,
    only the real compiler (TRITON_INTERPRET unset). Pointers (and `aligned` scalars) are declared
    16-divisible, as the JIT launch specialises them for torch allocations."""
    consts = constexprs(head_dim, dtype, config, kernel)
    signature = kernel_signature(kernel, dtype, consts)
    if aligned is None:
        aligned = [name for name in kernel.arg_names if name in _DATA_POINTERS + _FP32_POINTERS]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=target,
                          options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        wanted = autotune_configs(kernel, kwargs["HEAD_DIM"], named_args["Q"].dtype)
        keys = {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]) for c in wanted}
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keys]

    return prune


def _autotuned(kernel: str, fn, key: list[str]):
    union = sorted({entry for (name, _, _), table in AUTOTUNE_CONFIGS.items() if name == kernel for entry in table})
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in union]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


# autotune keys: the shapes that change the best tile (the dtypes are added by triton itself)
_AUTOTUNED = {
    "fwd": _autotuned("fwd", _scma_fwd_kernel, ["N", "L", "HEAD_DIM"]),
    "stats": _autotuned("stats", _scma_stats_kernel, ["N", "CHUNK", "HEAD_DIM"]),
    "split": _autotuned("split", _scma_split_kernel, ["N", "L", "CHUNK", "HEAD_DIM"]),
}
KERNEL_FUNCTIONS = {"fwd": _scma_fwd_kernel, "stats": _scma_stats_kernel, "split": _scma_split_kernel,
                    "combine": _scma_combine_kernel}


# ----------------------------------------------------------------------------- split decision


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    num_chunks: int  # key chunks of the attention pass (1: the one-pass kernel)
    chunk: int  # keys per chunk
    num_stat_slices: int  # slices of the pseudo-query keys for the row min / max pass
    stat_chunk: int  # pseudo-query keys per slice


# Measured on an NVIDIA H200 (benchmarks/results/gpu-h200-20261126, N=1024, c=256): the split
# kernels (0.17-0.43 ms) were slower than the one-pass kernel (0.13 ms) at batch 1, 4 and 16, so the
# heuristic split is off until a faster split kernel is measured; `auto=True` or num_splits use it.
AUTO_SPLIT = False


def split_plan(batch_heads: int, num_tokens: int, num_keys: int, sm_count: int | None,
               num_splits: int | None = None, auto: bool | None = None) -> SplitPlan:
    """How to cut the key axis. Heuristic (num_splits None): split only when the one-pass launch,
    batch_heads * cdiv(N, NOMINAL_BLOCK_M) programs, would leave most SMs idle (at most half of
    `sm_count` busy); then aim at PROGRAMS_PER_SM programs per SM with chunks of at least
    MIN_CHUNK keys rounded to SPLIT_ALIGN, at most MAX_SPLITS. No SM count (CPU, interpreter):
    no split. num_splits forces the number of chunks (tests): chunks rounded to 16 keys only.
    `auto` (default AUTO_SPLIT, off): whether the heuristic may split at all."""
    one_pass = SplitPlan(1, num_keys, 1, num_tokens)
    if num_splits is None:
        if not sm_count or not (AUTO_SPLIT if auto is None else auto):
            return one_pass
        programs = batch_heads * triton.cdiv(num_tokens, NOMINAL_BLOCK_M)
        if 2 * programs > sm_count:
            return one_pass
        target = min(MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sm_count, programs))
        align, least = SPLIT_ALIGN, MIN_CHUNK
    else:
        if num_splits < 1:
            raise ValueError(f"scma: num_splits must be >= 1, got {num_splits}")
        target, align, least = num_splits, 16, 16
    if target <= 1:
        return one_pass
    chunk = max(least, triton.cdiv(triton.cdiv(num_keys, target), align) * align)
    stat_chunk = max(least, triton.cdiv(triton.cdiv(num_tokens, target), align) * align)
    num_chunks = triton.cdiv(num_keys, chunk)
    if num_chunks == 1 and num_splits is None:
        return one_pass
    return SplitPlan(num_chunks, chunk, triton.cdiv(num_tokens, stat_chunk), stat_chunk)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (None for CPU tensors: no split heuristic)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- host entry points


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(kernel: str, grid, args: tuple, head_dim: int, dtype: torch.dtype, config: dict | None):
    """Launch `kernel` with an explicit config, or autotuned when `config` is None."""
    fn = KERNEL_FUNCTIONS[kernel]
    if config is None:
        _AUTOTUNED[kernel][grid](*args, **constexprs(head_dim, dtype, None, fn))
    else:
        grid_args = grid(config) if callable(grid) else grid
        fn[grid_args](*args, **constexprs(head_dim, dtype, config, fn),
                      num_warps=config["num_warps"], num_stages=config["num_stages"])


def scma_fused(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cal: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused kernel alone. q (B, H, N, c); keys/values (B, H, 2N + P, c) as laid out by
    `calibration_inputs`; cal (B, H, N) = 10 * (w - 1) in fp32. Returns (B, H, N, c) in q's dtype
    (written into `out` when given: same shape and dtype as q, last dim contiguous).
    block_m / block_n: fixed tiles instead of autotuning; num_splits: force the split path with
    that many key chunks (default: `split_plan`'s heuristic on CUDA, one pass on CPU)."""
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
    config = None  # autotuned
    if interpreting():
        config = interpreter_config(n)
    elif block_m is not None or block_n is not None:
        config = autotune_configs("fwd", c, q.dtype)[0]
    if config is not None:
        config = dict(config, BLOCK_M=block_m or config["BLOCK_M"], BLOCK_N=block_n or config["BLOCK_N"])
    plan = split_plan(b * h, n, total, sm_count(q.device), num_splits)
    q_strides = (q.stride(0), q.stride(1), q.stride(2))
    k_strides = (keys.stride(0), keys.stride(1), keys.stride(2))
    v_strides = (values.stride(0), values.stride(1), values.stride(2))
    c_strides = (cal.stride(0), cal.stride(1))
    o_strides = (out.stride(0), out.stride(1), out.stride(2))
    # Triton launches on the current CUDA device, not on the tensors' one: make them the same
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if plan.num_chunks == 1:
            _launch("fwd", lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h),
                    (q, keys, values, cal, *q_strides, *k_strides, *v_strides, *c_strides, *o_strides,
                     h, n, total, out), c, q.dtype, config)
            return out
        row_min = torch.empty((b * h, plan.num_stat_slices, n), dtype=torch.float32, device=q.device)
        row_max = torch.empty_like(row_min)
        o_part = torch.empty((b * h, plan.num_chunks, n, c), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b * h, plan.num_chunks, n), dtype=torch.float32, device=q.device)
        _launch("stats", lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h, plan.num_stat_slices),
                (q, keys, row_min, row_max, *q_strides, *k_strides, h, n, plan.stat_chunk), c, q.dtype, config)
        _launch("split", lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h, plan.num_chunks),
                (q, keys, values, cal, row_min, row_max, o_part, lse_part, *q_strides, *k_strides, *v_strides,
                 *c_strides, h, n, total, plan.chunk, plan.num_stat_slices), c, q.dtype, config)
        combine = combine_config(c)
        _launch("combine", (triton.cdiv(n, combine["BLOCK_M"]), b * h),
                (o_part, lse_part, *o_strides, h, n, plan.num_chunks, out), c, q.dtype, combine)
    return out


def triton_scma(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support_masks: torch.Tensor,
    mode: str = "paper",
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Drop-in replacement of `scma_reference` running the fused Triton kernel."""
    keys, values, w, num_tokens = calibration_inputs(k, v, support_masks, mode)
    if q.shape[2] != num_tokens:
        raise ValueError(f"scma: q has {q.shape[2]} tokens, support masks have {num_tokens}")
    return scma_fused(q, keys, values, calibration_term(w), block_m=block_m, block_n=block_n,
                      num_splits=num_splits)
