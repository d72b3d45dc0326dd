"""Fused Support-Calibrated Memory Attention (SCMA) in OpenAI Triton.

Same contract as `fssam.ops.scma.reference.scma_reference(q, k, v, support_masks, mode)`:
q (B, H, N, c); k, v (B, H, K*N + N + P, c) already rotary-encoded; support_masks (B, K, N).

Two entry points, one set of device functions:
  * `triton_scma(q, k, v, support_masks, mode)`, what torch.ops.fssam.scma runs on CUDA (the
    triton_op's body: `traceable=True` launches through torch.library.wrap_triton, so torch.compile
    and AOTInductor compile these kernels into their own code), all in Triton with no PyTorch
    arithmetic in between, only allocations and views (two calibration launches, then the attention):
    - `_scma_prototype_kernel`, grid (K x slices + mean tiles, B*H), O(K N c): per shot and slice
      of its N support keys the masked sum and mask count (fp32 partials; up to MAX_SLICES
      programs per shot side by side); with K > 1 also the shot-mean support keys/values
      (B, H, N, c). With one shot the support keys are read in place.
    - `_scma_calibration_kernel`, grid (K x slices, B*H): per shot s the prototype p_s (masked
      average of the shot's keys) from those partials, then per slice of the pseudo-query keys
      their cosines with p_s and the slice's min / max (fp32; no program reads what another of
      the same launch wrote).
    - `_scma_kernel` (one pass) or the split kernels: the attention below, reading the support-mean keys from that buffer (or k),
      the pseudo-query and pointer keys from k itself, and per key tile the K cosines, min-max
      normalised with the per-shot min / max reduced from the slices (`_shot_ranges`, once per
      program) and averaged: w[j] = mean_s a_s[j].
  * `scma_fused(q, keys, values, cal)`, the ONNX node fssam::SCMA and the TensorRT plugin: the
    calibration inputs come from standard ops in front of it (`calibration_inputs`,
    `calibration_term` of the reference: keys/values concatenated [N support-mean, N
    pseudo-query, P pointers], cal[j] = 10 (w[j] - 1)); `_scma_fwd_kernel` is the attention alone.
The attention, never materialising the N x (2N + P) scores, one of two paths:
    - one pass per (query tile, batch*head), `_one_pass`:
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

Under TRITON_INTERPRET=1 (set before importing triton) both entry points run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading

import torch
import triton
import triton.language as tl

from fssam.ops.scma.reference import CALIBRATION_SCALE, COSINE_EPS, PROTOTYPE_EPS

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's interpreter. Triton decides that when `triton.jit`
    decorates them (TRITON_INTERPRET at import), so this reads the kernels, not today's environment."""
    return _INTERPRETED


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter module: its environment switch
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return isinstance(kernel, InterpretedFunction)


# ----------------------------------------------------------------------------- device code


@triton.jit
def _row_min_max(
    q, k_base, stride_kn, lo, hi, offs_n, offs_d, d_mask,
    SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 row min / max of S = q k^T / sqrt(c) over the keys [lo, hi) (the calibration's pass 1)."""
    row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        valid = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=valid[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * SCALE  # fp32 (BLOCK_M, BLOCK_N)
        row_min = tl.minimum(row_min, tl.min(tl.where(valid[None, :], s, float("inf")), 1))
        row_max = tl.maximum(row_max, tl.max(tl.where(valid[None, :], s, float("-inf")), 1))
    return row_min, row_max


@triton.jit
def _attend_range(
    acc, m_i, l_i, q,
    k_base, v_base, stride_kn, stride_vn,
    lo, hi,
    cal_base, cal_origin, stride_cs, shot_low, shot_span, row_min, row_scale,
    offs_n, offs_d, d_mask,
    SCALE: tl.constexpr, CAL_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CALIBRATE: tl.constexpr, CAL_SHOTS: tl.constexpr, SHOTS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax accumulation over keys [lo, hi) (FlashAttention-2 inner loop). In the
    calibrated range key j reads its calibration term at index j - cal_origin: the term itself
    (CAL_SHOTS 0: cal[j] = 10 (w[j] - 1)), or, from `_scma_calibration_kernel`, the raw cosine
    c_s[j] of each of CAL_SHOTS shots (rows stride_cs apart), with each shot's min and
    max - min + 1e-7 over its N cosines (`_shot_ranges`: shot_low, shot_span, (SHOTS_P2,)):
    a_s[j] = (c_s[j] - min_s) / (max_s - min_s + 1e-7), cal[j] = 10 (mean_s a_s[j] - 1)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        valid = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=valid[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * SCALE  # fp32 (BLOCK_M, BLOCK_N)
        if CALIBRATE:
            if CAL_SHOTS > 0:
                shots = tl.arange(0, SHOTS_P2)
                real = shots < CAL_SHOTS
                cosine = tl.load(cal_base + shots[:, None] * stride_cs + (cols - cal_origin)[None, :],
                                 mask=real[:, None] & valid[None, :], other=0.0)  # (SHOTS_P2, BLOCK_N)
                a = (cosine - shot_low[:, None]) / shot_span[:, None]
                cal = CAL_SCALE * (tl.sum(tl.where(real[:, None], a, 0.0), 0) / CAL_SHOTS - 1.0)
            else:
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
def _shot_ranges(stats_base, num_slices, EPS: tl.constexpr, CAL_SHOTS: tl.constexpr, SHOTS_P2: tl.constexpr,
                 MAX_SLICES: tl.constexpr):
    """Per shot the min and max - min + EPS of its cosines, from the calibration kernel's per-slice
    partials (stats_base: (CAL_SHOTS, MAX_SLICES, 2), num_slices written): two (SHOTS_P2,) vectors
    (padding shots: 0 and 1). Once per program, outside the key loops."""
    shots = tl.arange(0, SHOTS_P2)
    slices = tl.arange(0, MAX_SLICES)
    written = (shots < CAL_SHOTS)[:, None] & (slices < num_slices)[None, :]
    partial = stats_base + (shots[:, None] * MAX_SLICES + slices[None, :]) * 2
    low = tl.min(tl.load(partial, mask=written, other=float("inf")), 1)
    high = tl.max(tl.load(partial + 1, mask=written, other=float("-inf")), 1)
    real = shots < CAL_SHOTS
    return tl.where(real, low, 0.0), tl.where(real, high - low + EPS, 1.0)


@triton.jit
def _attend_keys(
    acc, m_i, l_i, q,
    sk_base, sv_base, stride_skn, stride_svn,
    k_base, v_base, stride_kn, stride_vn,
    lo, hi, N,
    cal_base, stride_cs, shot_low, shot_span, row_min, row_scale,
    offs_n, offs_d, d_mask,
    SCALE: tl.constexpr, CAL_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAL_SHOTS: tl.constexpr, SHOTS_P2: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The keys [lo, hi) of the three ranges: [0, N) support-mean keys from sk/sv, [N, 2N)
    pseudo-query (calibrated) and [2N, L) pointers from k/v (rows indexed from 0 = key 0)."""
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, sk_base, sv_base, stride_skn, stride_svn,
                                  lo, tl.minimum(hi, N),
                                  cal_base, N, stride_cs, shot_low, shot_span, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SCALE, CAL_SCALE, DOT_PRECISION, False, CAL_SHOTS, SHOTS_P2, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                  tl.maximum(lo, N), tl.minimum(hi, 2 * N),
                                  cal_base, N, stride_cs, shot_low, shot_span, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SCALE, CAL_SCALE, DOT_PRECISION, True, CAL_SHOTS, SHOTS_P2, BLOCK_N)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                  tl.maximum(lo, 2 * N), hi,
                                  cal_base, N, stride_cs, shot_low, shot_span, row_min, row_scale, offs_n, offs_d, d_mask,
                                  SCALE, CAL_SCALE, DOT_PRECISION, False, CAL_SHOTS, SHOTS_P2, BLOCK_N)
    return acc, m_i, l_i


@triton.jit
def _tile_offsets(pid_m, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """An attention program's query-tile offsets and masks. No pointer goes in: torch's analysis of
    which arguments a kernel writes (for wrap_triton) counts every pointer passed to a helper whose
    results reach a store's address as written, and then copies it before each launch."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return offs_m, tl.arange(0, BLOCK_N), offs_d, offs_d < HEAD_DIM, offs_m < N


@triton.jit
def _query_tile(
    Q, SK, SV, K, V, CAL, STATS, b, h, pid_bh, offs_m, offs_d, d_mask, m_mask,
    stride_qb, stride_qh, stride_qn,
    stride_skb, stride_skh,
    stride_svb, stride_svh,
    stride_kb, stride_kh,
    stride_vb, stride_vh,
    stride_cb, stride_ch,
    CAL_SHOTS: tl.constexpr, MAX_SLICES: tl.constexpr,
):
    """What every attention program reads first: the (batch, head) bases of the key/value and
    calibration tensors (for loads only) and its BLOCK_M queries."""
    sk_base = SK + b * stride_skb + h * stride_skh
    sv_base = SV + b * stride_svb + h * stride_svh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    cal_base = CAL + b * stride_cb + h * stride_ch
    stats_base = STATS + pid_bh.to(tl.int64) * CAL_SHOTS * MAX_SLICES * 2
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    return q, sk_base, sv_base, k_base, v_base, cal_base, stats_base


@triton.jit
def _one_pass(
    Q, SK, SV, K, V, CAL, STATS, O,
    stride_qb, stride_qh, stride_qn,
    stride_skb, stride_skh, stride_skn,
    stride_svb, stride_svh, stride_svn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_cb, stride_ch, stride_cs, num_slices,
    stride_ob, stride_oh, stride_on,
    H, N, L,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE: tl.constexpr, CAL_SCALE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAL_SHOTS: tl.constexpr, SHOTS_P2: tl.constexpr, MAX_SLICES: tl.constexpr,
):
    """One program of the one-pass kernels: BLOCK_M queries of one (batch, head), all L keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m, offs_n, offs_d, d_mask, m_mask = _tile_offsets(pid_m, N, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
    q, sk_base, sv_base, k_base, v_base, cal_base, stats_base = _query_tile(
        Q, SK, SV, K, V, CAL, STATS, b, h, pid_bh, offs_m, offs_d, d_mask, m_mask, stride_qb, stride_qh, stride_qn,
        stride_skb, stride_skh, stride_svb, stride_svh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb,
        stride_ch, CAL_SHOTS, MAX_SLICES)
    o_base = O + b * stride_ob + h * stride_oh

    # loop 1: row min / max of the pseudo-query scores (fp32)
    row_min, row_max = _row_min_max(q, k_base, stride_kn, N, 2 * N, offs_n, offs_d, d_mask,
                                    SCALE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    row_scale = 1.0 / (row_max - row_min + EPS)

    # loop 2: online softmax over support-mean, calibrated pseudo-query, pointer keys
    shot_low, shot_span = _shot_ranges(stats_base, num_slices, EPS, CAL_SHOTS, SHOTS_P2, MAX_SLICES)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, sk_base, sv_base, stride_skn, stride_svn,
                                 k_base, v_base, stride_kn, stride_vn, 0, L, N,
                                 cal_base, stride_cs, shot_low, shot_span, row_min, row_scale,
                                 offs_n, offs_d, d_mask,
                                 SCALE, CAL_SCALE, DOT_PRECISION, CAL_SHOTS, SHOTS_P2, BLOCK_N)
    out = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


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
    SCALE: tl.constexpr, CAL_SCALE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The fssam::SCMA node's kernel (`scma_fused`, the TensorRT plugin). One program: BLOCK_M
    queries of one (batch, head), all keys. Last dims are contiguous (stride 1); keys/values hold
    [N support-mean, N pseudo-query, L - 2N pointer] tokens; CAL (B, H, N) fp32 = 10 (w - 1), unit
    stride along N."""
    _one_pass(Q, K, V, K, V, CAL, CAL, O,
              stride_qb, stride_qh, stride_qn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_cb, stride_ch, 0, 0,
              stride_ob, stride_oh, stride_on,
              H, N, L,
              HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, SCALE, CAL_SCALE, EPS, DOT_PRECISION, 0, 1, 1)


@triton.jit(do_not_specialize=["BH_BUCKET"])  # an autotune key only: no recompile per batch size class
def _scma_kernel(
    Q, SK, SV, K, V, W, STATS,
    stride_qb, stride_qh, stride_qn,
    stride_skb, stride_skh, stride_skn,
    stride_svb, stride_svh, stride_svn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, L, NUM_SLICES, BH_BUCKET,
    O,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE: tl.constexpr, CAL_SCALE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SHOTS: tl.constexpr, SHOTS_P2: tl.constexpr, MAX_SLICES: tl.constexpr,
):
    """The op's one-pass kernel (`triton_scma`): reads the inputs where they are. Support-mean
    keys/values from SK/SV (the rotated k/v themselves at one shot), pseudo-query and pointer keys
    from K/V (views starting (K - 1) N keys into k/v, so that key N is the first pseudo-query
    key), and the raw per-shot cosines W (B*H, SHOTS, N) with their per-slice min / max STATS
    (B*H, SHOTS, MAX_SLICES, 2), both fp32, of `_scma_calibration_kernel`: normalised and averaged
    per key here. BH_BUCKET (B*H rounded up to a power of two) is read only by the autotuner: the
    best tile depends on how many programs there are to fill the SMs."""
    _one_pass(Q, SK, SV, K, V, W, STATS, O,
              stride_qb, stride_qh, stride_qn,
              stride_skb, stride_skh, stride_skn,
              stride_svb, stride_svh, stride_svn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              H * SHOTS * N, SHOTS * N, N, NUM_SLICES,
              stride_ob, stride_oh, stride_on,
              H, N, L,
              HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, SCALE, CAL_SCALE, EPS, DOT_PRECISION, SHOTS, SHOTS_P2,
              MAX_SLICES)


@triton.jit
def _key_tiles(H, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """What both calibration kernels start with: program ids, the (batch, head), and the row /
    head-dim offsets of a BLOCK_T-row tile with its head-dim mask (no pointer: see _tile_offsets)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    return pid, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), tl.arange(0, BLOCK_T), offs_d, \
        offs_d < HEAD_DIM


@triton.jit
def _scma_prototype_kernel(
    K, V, MASKS, PROTO_PART, COUNT_PART, SK, SV,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mk,
    stride_sb, stride_sh, stride_sn,
    H, N, NUM_SHOTS, NUM_SLICES, SLICE,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MAX_SLICES: tl.constexpr,
):
    """Calibration, launch 1 of 2, grid (NUM_SHOTS * NUM_SLICES + mean tiles, B*H), every program
    writing only:
      * program s * NUM_SLICES + p: over the support keys [p SLICE, (p + 1) SLICE) of shot s, the
        masked sum sum_j m_s[j] k_s[j] into PROTO_PART (B*H, NUM_SHOTS, MAX_SLICES, HEAD_DIM) and
        sum_j m_s[j] into COUNT_PART (B*H, NUM_SHOTS, MAX_SLICES), fp32, accumulated element-wise
        over the tiles and reduced once at the end;
      * program NUM_SHOTS * NUM_SLICES + t (launched only when NUM_SHOTS > 1): keys/values
        t*BLOCK_T.. of the shot mean into SK/SV (B, H, N, c), in k's dtype (fp32 sums).
    MASKS (B, >= NUM_SHOTS, N) fp32, fp16 or bf16 (read as fp32: exact), unit stride along N."""
    pid, pid_bh, b, h, offs_t, offs_d, d_mask = _key_tiles(H, HEAD_DIM, BLOCK_D, BLOCK_T)
    k_base = K + b * stride_kb + h * stride_kh
    if pid < NUM_SHOTS * NUM_SLICES:
        shot = pid // NUM_SLICES
        part = pid % NUM_SLICES
        mask_base = MASKS + b * stride_mb + shot * stride_mk
        weighted = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        count = tl.zeros([BLOCK_T], tl.float32)
        first = part * SLICE
        last = tl.minimum(first + SLICE, N)
        for start in range(first, last, BLOCK_T):
            rows = start + offs_t
            valid = rows < last
            m = tl.load(mask_base + rows, mask=valid, other=0.0).to(tl.float32)
            f = tl.load(k_base + (shot * N + rows)[:, None] * stride_kn + offs_d[None, :],
                        mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            weighted += f * m[:, None]
            count += m
        slot = (pid_bh.to(tl.int64) * NUM_SHOTS + shot) * MAX_SLICES + part
        tl.store(PROTO_PART + slot * HEAD_DIM + offs_d, tl.sum(weighted, 0), mask=d_mask)
        tl.store(COUNT_PART + slot, tl.sum(count, 0))
    else:
        rows = (pid - NUM_SHOTS * NUM_SLICES) * BLOCK_T + offs_t
        valid = rows < N
        tile = valid[:, None] & d_mask[None, :]
        v_base = V + b * stride_vb + h * stride_vh
        sum_k = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        sum_v = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for shot in range(0, NUM_SHOTS):
            sum_k += tl.load(k_base + (shot * N + rows)[:, None] * stride_kn + offs_d[None, :],
                             mask=tile, other=0.0).to(tl.float32)
            sum_v += tl.load(v_base + (shot * N + rows)[:, None] * stride_vn + offs_d[None, :],
                             mask=tile, other=0.0).to(tl.float32)
        out = b * stride_sb + h * stride_sh + rows[:, None] * stride_sn + offs_d[None, :]
        tl.store(SK + out, (sum_k / NUM_SHOTS).to(SK.dtype.element_ty), mask=tile)
        tl.store(SV + out, (sum_v / NUM_SHOTS).to(SV.dtype.element_ty), mask=tile)


@triton.jit
def _scma_calibration_kernel(
    K, PROTO_PART, COUNT_PART, W, STATS,
    stride_kb, stride_kh, stride_kn,
    H, N, NUM_SHOTS, NUM_SLICES, SLICE,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MAX_SLICES: tl.constexpr,
    PROTO_EPS: tl.constexpr, EPS: tl.constexpr,
):
    """Calibration, launch 2 of 2 (the reference's `calibration_inputs`), grid (NUM_SHOTS *
    NUM_SLICES, B*H): program s * NUM_SLICES + p sums shot s's NUM_SLICES partials of
    `_scma_prototype_kernel` into its prototype p_s = sum_j m_s[j] k_s[j] / (sum_j m_s[j] + 5e-4),
    then for the pseudo-query keys [p SLICE, (p + 1) SLICE) of the N (k rows NUM_SHOTS N + j) writes
    the cosine with p_s into W (B*H, NUM_SHOTS, N) and its min / max over the slice into STATS
    (B*H, NUM_SHOTS, MAX_SLICES, 2), all fp32. The attention kernels take the min / max over the
    slices and normalise (`_attend_range`)."""
    pid, pid_bh, b, h, offs_t, offs_d, d_mask = _key_tiles(H, HEAD_DIM, BLOCK_D, BLOCK_T)
    k_base = K + b * stride_kb + h * stride_kh
    shot = pid // NUM_SLICES
    part = pid % NUM_SLICES
    slices = tl.arange(0, MAX_SLICES)
    written = slices < NUM_SLICES
    shot_slots = (pid_bh.to(tl.int64) * NUM_SHOTS + shot) * MAX_SLICES
    partial = tl.load(PROTO_PART + (shot_slots + slices)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=written[:, None] & d_mask[None, :], other=0.0)  # (MAX_SLICES, BLOCK_D)
    count = tl.sum(tl.load(COUNT_PART + shot_slots + slices, mask=written, other=0.0), 0)
    proto = tl.sum(partial, 0) / (count + PROTO_EPS)
    proto_norm = tl.sqrt(tl.sum(proto * proto, 0))
    w_base = W + (pid_bh.to(tl.int64) * NUM_SHOTS + shot) * N
    low = tl.full([BLOCK_T], float("inf"), tl.float32)
    high = tl.full([BLOCK_T], float("-inf"), tl.float32)
    first = part * SLICE
    last = tl.minimum(first + SLICE, N)
    for start in range(first, last, BLOCK_T):
        rows = start + offs_t
        valid = rows < last
        f = tl.load(k_base + (NUM_SHOTS * N + rows)[:, None] * stride_kn + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        dots = tl.sum(f * proto[None, :], 1)
        cosine = dots / (proto_norm * tl.sqrt(tl.sum(f * f, 1)) + EPS)
        low = tl.minimum(low, tl.where(valid, cosine, float("inf")))
        high = tl.maximum(high, tl.where(valid, cosine, float("-inf")))
        tl.store(w_base + rows, cosine, mask=valid)
    stats = STATS + (shot_slots + part) * 2
    tl.store(stats, tl.min(low, 0))
    tl.store(stats + 1, tl.max(high, 0))


@triton.jit
def _scma_stats_kernel(
    Q, K, ROW_MIN, ROW_MAX,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    H, N, CHUNK,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
                                    SCALE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    part = (pid_bh.to(tl.int64) * tl.num_programs(2) + pid_s) * N
    tl.store(ROW_MIN + part + offs_m, row_min, mask=m_mask)
    tl.store(ROW_MAX + part + offs_m, row_max, mask=m_mask)


@triton.jit
def _scma_split_kernel(
    Q, SK, SV, K, V, CAL, STATS, ROW_MIN, ROW_MAX, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qn,
    stride_skb, stride_skh, stride_skn,
    stride_svb, stride_svh, stride_svn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_cb, stride_ch, stride_cs, NUM_SLICES,
    H, N, L, CHUNK, NUM_STAT_SLICES,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SCALE: tl.constexpr, CAL_SCALE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    CAL_SHOTS: tl.constexpr, SHOTS_P2: tl.constexpr, MAX_SLICES: tl.constexpr,
):
    """Split path, pass 2. Program (query tile, batch*head, chunk s): online softmax over keys
    [s CHUNK, (s + 1) CHUNK) with the exact row min / max reduced from the stats kernel's slices;
    writes out / l to O_PART (B*H, num_chunks, N, HEAD_DIM) and m log2(e) + log2(l) to LSE_PART
    (B*H, num_chunks, N), both fp32. Keys and the calibration input as in the one-pass kernels
    (`_one_pass`): support-mean keys from SK/SV, the rest from K/V; CAL the term (CAL_SHOTS 0) or
    the per-shot raw cosines, CAL_SHOTS rows stride_cs apart, with their per-slice min / max STATS
    (NUM_SLICES of MAX_SLICES used)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m, offs_n, offs_d, d_mask, m_mask = _tile_offsets(pid_m, N, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N)
    q, sk_base, sv_base, k_base, v_base, cal_base, stats_base = _query_tile(
        Q, SK, SV, K, V, CAL, STATS, b, h, pid_bh, offs_m, offs_d, d_mask, m_mask, stride_qb, stride_qh, stride_qn,
        stride_skb, stride_skh, stride_svb, stride_svh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb,
        stride_ch, CAL_SHOTS, MAX_SLICES)

    # exact row min / max of the pseudo-query scores: min / max over the stats slices
    row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    stats = pid_bh.to(tl.int64) * NUM_STAT_SLICES * N
    for s in range(0, NUM_STAT_SLICES):
        row_min = tl.minimum(row_min, tl.load(ROW_MIN + stats + s * N + offs_m, mask=m_mask, other=0.0))
        row_max = tl.maximum(row_max, tl.load(ROW_MAX + stats + s * N + offs_m, mask=m_mask, other=0.0))
    row_scale = 1.0 / (row_max - row_min + EPS)

    shot_low, shot_span = _shot_ranges(stats_base, NUM_SLICES, EPS, CAL_SHOTS, SHOTS_P2, MAX_SLICES)
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, sk_base, sv_base, stride_skn, stride_svn,
                                 k_base, v_base, stride_kn, stride_vn, lo, hi, N,
                                 cal_base, stride_cs, shot_low, shot_span, row_min, row_scale,
                                 offs_n, offs_d, d_mask,
                                 SCALE, CAL_SCALE, DOT_PRECISION, CAL_SHOTS, SHOTS_P2, BLOCK_N)
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


_INTERPRETED = _is_interpreted(_scma_fwd_kernel)

# ----------------------------------------------------------------------------- launch configs

KERNELS = ("fwd", "scma", "stats", "split")  # the autotuned kernels (prototype, calibration, combine: one fixed config)
# the table an autotuned kernel takes its candidates from where it has no entry of its own: the op's
# one-pass kernel shares the node's except at the serving shape (c = 256, 16-bit), where it has its own
TABLE_OF = {"fwd": "fwd", "scma": "fwd", "stats": "stats", "split": "split"}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, dtype class and BLOCK_D class ("fwd" also serves
# the op's `_scma_kernel`: TABLE_OF). Every entry is compiled for sm_90 by tests/test_kernels.py
# (registers <= 255 per thread and within the 64K register file, no spills, shared memory <= 227 KiB):
# see the report there before adding one. Every entry was also checked spill-free with the ptxas of
# Triton 3.6.0 (the lent H200 image's; its spills failed six fp32 entries of an earlier table):
#   pip install --no-deps --target /tmp/triton36 triton==3.6.0
#   PYTHONPATH=/tmp/triton36 python -m pytest tests/test_kernels.py -k sm90
# BLOCK_M <= 64 in the split path's tables (the split decision counts query tiles of NOMINAL_BLOCK_M),
# up to 128 in the one-pass kernels' ("fwd", "scma"), and BLOCK_N divides SPLIT_ALIGN everywhere (so the
# split chunks are whole key tiles).
AUTOTUNE_CONFIGS: dict[tuple[str, str, int], tuple[tuple[int, int, int, int], ...]] = {
    # fp16 / bf16: tensor-core dots (wgmma on sm_90). c = 256 is the serving head dim (SAM 2's memory
    # attention: one head of 256); 64 / 128 keep one or two candidates.
    # (c = 64: the 4-warp 32-row entries spilled a word once the scale became a multiply; 8 warps do not)
    ("fwd", "16bit", 64): ((64, 64, 4, 2), (32, 64, 8, 2)),
    ("fwd", "16bit", 128): ((64, 64, 8, 2), (64, 32, 4, 3)),
    # (the two 128-row entries won at batch 16 for the op's kernel, same attention code; not yet timed here.
    # The first entry is the TensorRT AOT plugin's fixed config)
    ("fwd", "16bit", 256): ((64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)),
    # the op's kernel at the serving shape: the batch is part of its autotune key (BH_BUCKET), so small
    # tiles (more programs) can win at batch 1 and large ones at batch 16
    # (benchmarks/results/gpu-h200-20261126b, sweep: m16n64w4s2 was fastest at batch 1, m64n32w4s2 at 4,
    # m128n64w8s2 at 16, m128n32w8s3 second there; the other four candidates swept lost everywhere)
    ("scma", "16bit", 256): ((16, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3)),
    ("stats", "16bit", 64): ((64, 64, 4, 2),),
    ("stats", "16bit", 128): ((64, 64, 4, 2),),
    ("stats", "16bit", 256): ((64, 64, 4, 2), (64, 32, 4, 2)),
    ("split", "16bit", 64): ((64, 64, 4, 2),),
    ("split", "16bit", 128): ((64, 64, 4, 2), (64, 32, 4, 2)),
    ("split", "16bit", 256): ((64, 32, 8, 2), (32, 32, 8, 2)),
    # fp32: FMA dots (input_precision="ieee"), twice the registers per element: 4-warp tiles of 32 x 32
    # and up spill at c >= 128 (with Triton 3.6's ptxas also at c = 64), so 8 warps and small tiles there
    ("fwd", "fp32", 64): ((64, 32, 8, 2), (32, 32, 8, 2)),
    ("fwd", "fp32", 128): ((32, 16, 8, 2), (16, 16, 8, 2)),
    ("fwd", "fp32", 256): ((16, 32, 8, 2), (16, 16, 8, 2)),
    ("stats", "fp32", 64): ((32, 32, 4, 2),),
    ("stats", "fp32", 128): ((32, 32, 4, 2),),
    ("stats", "fp32", 256): ((32, 32, 8, 2),),
    ("split", "fp32", 64): ((32, 16, 8, 2),),
    ("split", "fp32", 128): ((32, 16, 8, 2), (16, 16, 4, 2)),
    ("split", "fp32", 256): ((16, 32, 8, 2), (16, 16, 8, 2)),
}
# Register spills (in 4-byte words, Triton's n_spills) accepted for a config, keyed by the test id of
# tests/test_kernels.py::test_config_fits_sm90, each with its reason. None today: every config compiles
# for sm_90 without spills.
DOCUMENTED_SPILLS: dict[str, int] = {}
# The query tile the split decision counts programs with. Not the autotuner's pick (unknown before the
# launch; the op's c = 256 16-bit table also has 16-row tiles): a calibrated threshold. In the H200
# sweep (benchmarks/results/gpu-h200-20261126b, fp16, N = 1024, H = 1) the split won at batch 1
# (16 nominal tiles) and 4 (64) and lost at 16 (256 > 132 SMs), which this count reproduces, while
# counting 16-row tiles would not split at batch 4 (256 tiles).
NOMINAL_BLOCK_M = 64
MAX_SLICES = 16  # slices per shot of the support keys (prototype kernel) and pseudo-query keys (calibration), at most
SPLIT_ALIGN = 64  # split chunks are multiples of this many keys (every autotuned BLOCK_N divides it)
MIN_CHUNK = 128  # keys per chunk / pseudo-query keys per stats slice, at least
MAX_SPLITS = 16
PROGRAMS_PER_SM = 2  # the split path aims at this many programs per SM


# Host-side integer helpers: triton.cdiv / next_power_of_2 are constexpr functions in Triton 3.6+, a
# couple of microseconds a call, and the launch path of one op call makes some twenty of them.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def block_d_for(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def autotune_configs(kernel: str, head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The autotune candidates of `kernel` (one of KERNELS) for this head dim and dtype."""
    klass, dim = dtype_class(dtype), _head_dim_class(block_d_for(head_dim))
    table = AUTOTUNE_CONFIGS.get((kernel, klass, dim)) or AUTOTUNE_CONFIGS[(TABLE_OF[kernel], klass, dim)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in table]


def combine_config(head_dim: int) -> dict:
    return dict(BLOCK_M=32 if block_d_for(head_dim) <= 128 else 16, num_warps=4, num_stages=1)


def calibration_config(head_dim: int, dtype: torch.dtype = torch.float16, interpret: bool | None = None) -> dict:
    """The one config of `_scma_prototype_kernel` and `_scma_calibration_kernel`: streaming sweeps over
    slices of the keys, bound by how many bytes one SM has in flight: the largest tiles that fit,
    BLOCK_T x BLOCK_D = 16384 elements with 16 warps for fp16 / bf16 (32 KiB a step), 8192 with 8 warps
    for fp32 (16384 spills at c = 256); 32 fp32 registers per thread and tile. Small tiles in the
    interpreter."""
    interpret = interpreting() if interpret is None else interpret
    block_d = block_d_for(head_dim)
    if interpret:
        return dict(BLOCK_T=16, num_warps=1, num_stages=1)
    elements, warps = (8192, 8) if dtype == torch.float32 else (16384, 16)
    return dict(BLOCK_T=max(16, min(256, elements // block_d)), num_warps=warps, num_stages=1)


def interpreter_config(num_tokens: int) -> dict:
    """The interpreter pays per block op: few, mid-sized tiles; no autotuning."""
    block = max(16, min(32, _next_pow2(num_tokens)))
    return dict(BLOCK_M=block, BLOCK_N=block, num_warps=1, num_stages=1)


def kernel_config(head_dim: int, num_tokens: int, dtype: torch.dtype, interpret: bool | None = None) -> dict:
    """A fixed launch config of `_scma_fwd_kernel` (with BLOCK_D): the interpreter's, else the first
    autotune candidate. The TensorRT AOT plugin starts from it; the JIT launch autotunes."""
    interpret = interpreting() if interpret is None else interpret
    config = interpreter_config(num_tokens) if interpret else autotune_configs("fwd", head_dim, dtype)[0]
    return dict(config, BLOCK_D=block_d_for(head_dim))


def constexprs(head_dim: int, dtype: torch.dtype, config: dict | None = None, kernel=None,
               shots: int = 0) -> dict:
    """The constexpr arguments of a kernel (default `_scma_fwd_kernel`): BLOCK_M / BLOCK_N / BLOCK_T
    from `config` (left out when None: the autotuner supplies them); shots: SHOTS / CAL_SHOTS, the
    shots of the op's per-shot similarities (0: the split kernel reads the node's term). A new dict
    each call, built once per distinct arguments (the launch path asks five times per op call)."""
    kernel = _scma_fwd_kernel if kernel is None else kernel
    tiles = (None, None, None) if config is None else (config.get("BLOCK_M"), config.get("BLOCK_N"),
                                                       config.get("BLOCK_T"))
    return dict(_constexprs(int(head_dim), dtype, tiles, kernel, int(shots)))


@functools.lru_cache(maxsize=1024)
def _constexprs(head_dim: int, dtype: torch.dtype, tiles: tuple, kernel, shots: int) -> dict:
    values = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d_for(head_dim),
        SCALE=1.0 / math.sqrt(head_dim),
        CAL_SCALE=CALIBRATION_SCALE,
        EPS=COSINE_EPS,
        PROTO_EPS=PROTOTYPE_EPS,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        SHOTS=shots,
        CAL_SHOTS=shots,
        SHOTS_P2=_next_pow2(max(1, shots)),
        MAX_SLICES=MAX_SLICES,
    )
    values.update(zip(("BLOCK_M", "BLOCK_N", "BLOCK_T"), tiles))
    return {name: value for name, value in values.items() if name in kernel.arg_names and value is not None}


_FP32_POINTERS = ("CAL", "W", "STATS", "ROW_MIN", "ROW_MAX", "O_PART", "LSE_PART", "PROTO_PART",
                  "COUNT_PART")
_DATA_POINTERS = ("Q", "K", "V", "O", "SK", "SV", "MASKS")  # masks in the features' dtype, as the model passes them
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def kernel_signature(kernel, dtype: torch.dtype, consts: dict) -> dict:
    """Triton compile signature: data tensors and masks of `dtype`, workspaces and CAL / W fp32, int32 scalars."""
    return {name: "constexpr" if name in consts else "*fp32" if name in _FP32_POINTERS
            else "*" + _TRITON_TYPE[dtype] if name in _DATA_POINTERS else "i32" for name in kernel.arg_names}


def compile_for_target(kernel, dtype: torch.dtype, head_dim: int, config: dict, target, *, aligned=None,
                       shots: int = 5):
    """`triton.compile` one kernel for an explicit target (e.g. GPUTarget("cuda", 90, 32)): needs no GPU,
    only the real compiler (TRITON_INTERPRET unset). Pointers (and `aligned` scalars) are declared
    16-divisible, as the JIT launch specialises them for torch allocations."""
    consts = constexprs(head_dim, dtype, config, kernel, shots)
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
    union = sorted({entry for (name, _, _), table in AUTOTUNE_CONFIGS.items() if name in (kernel, TABLE_OF[kernel])
                    for entry in table})
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in union]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


KERNEL_FUNCTIONS = {"fwd": _scma_fwd_kernel, "scma": _scma_kernel, "stats": _scma_stats_kernel,
                    "split": _scma_split_kernel, "combine": _scma_combine_kernel,
                    "prototype": _scma_prototype_kernel, "calibration": _scma_calibration_kernel}
# autotune keys: the shapes that change the best tile (the dtypes are added by triton itself)
AUTOTUNE_KEYS = {"fwd": ("N", "L", "HEAD_DIM"), "scma": ("N", "L", "HEAD_DIM", "BH_BUCKET"),
                 "stats": ("N", "CHUNK", "HEAD_DIM"), "split": ("N", "L", "CHUNK", "HEAD_DIM")}
_AUTOTUNED = {name: _autotuned(name, KERNEL_FUNCTIONS[name], list(keys)) for name, keys in AUTOTUNE_KEYS.items()}
# where each kernel's positional autotune key arguments are (HEAD_DIM is a constexpr: keyed separately)
_KEY_POSITIONS = {name: tuple(KERNEL_FUNCTIONS[name].arg_names.index(key) for key in keys if key != "HEAD_DIM")
                  for name, keys in AUTOTUNE_KEYS.items()}
# The autotuner's pick per (kernel, dtype, head dim, shots, key values), read from it after its first
# launch of that key; later launches go to the kernel with that config directly, skipping
# Autotuner.run's per-call key building (about 18 us of host time per launch, two per split op call).
_PICKED: dict[tuple, triton.Config] = {}
_PICK_LOCK = threading.Lock()  # best_config is the autotuner's last pick: read it under the launch that set it


# ----------------------------------------------------------------------------- split decision


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    num_chunks: int  # key chunks of the attention pass (1: the one-pass kernel)
    chunk: int  # keys per chunk
    num_stat_slices: int  # slices of the pseudo-query keys for the row min / max pass
    stat_chunk: int  # pseudo-query keys per slice


# Whether the heuristic may split (`auto=None`). Measured on an NVIDIA H200 (benchmarks/results/
# gpu-h200-20261126b, N=1024, c=256, fp16, GPU time of CUDA-graph replays), with the earlier one-launch
# calibration (run 2): at batch 1, K=1 the op took 0.116 ms split in 8 chunks against 0.160 ms in one
# pass with the best tile (0.162 in 2 chunks against 0.179 at batch 4); the node's kernel 0.040 (11
# chunks) against 0.109 ms. With the committed calibration (run 3) the split op took 0.055 ms at batch 1.
# The split's workspace raises the peak memory at batch 1 from 0.5 to 11.6 MiB. Launched from Python,
# its five launches (prototype, calibration, stats, split, combine) took 0.35-0.38 ms of host time per op
# call at batch 1, against 0.18 ms for the earlier two-launch one-pass op: a launch-bound eager model
# pays that; CUDA graphs, torch.compile's graph modes and TensorRT see the GPU time. Since then the
# op's own Python per call fell from 169 to 74 us at batch 1, K=1 (split; one pass 104 to 47 us), measured
# without a GPU by benchmarks/bench_scma_host.py (Triton's launcher stubbed: no C launcher, no CUDA
# allocations; benchmarks/results/cpu-scma-host): host integer maths, cached constexprs, the
# autotuner's pick reused, masks not cast.
AUTO_SPLIT = True


def split_plan(batch_heads: int, num_tokens: int, num_keys: int, sm_count: int | None,
               num_splits: int | None = None, auto: bool | None = None) -> SplitPlan:
    """How to cut the key axis. Heuristic (num_splits None): split only when the one-pass launch,
    batch_heads * cdiv(N, NOMINAL_BLOCK_M) programs, would leave most SMs idle (at most half of
    `sm_count` busy); then aim at PROGRAMS_PER_SM programs per SM with chunks of at least
    MIN_CHUNK keys rounded to SPLIT_ALIGN, at most MAX_SPLITS. No SM count (CPU, interpreter):
    no split. num_splits forces the number of chunks (tests): chunks rounded to 16 keys only.
    `auto` (default AUTO_SPLIT, on): whether the heuristic may split at all."""
    one_pass = SplitPlan(1, num_keys, 1, num_tokens)
    if num_splits is None:
        if not sm_count or not (AUTO_SPLIT if auto is None else auto):
            return one_pass
        programs = batch_heads * _cdiv(num_tokens, NOMINAL_BLOCK_M)
        if 2 * programs > sm_count:
            return one_pass
        target = min(MAX_SPLITS, _cdiv(PROGRAMS_PER_SM * sm_count, programs))
        align, least = SPLIT_ALIGN, MIN_CHUNK
    else:
        if num_splits < 1:
            raise ValueError(f"scma: num_splits must be >= 1, got {num_splits}")
        target, align, least = num_splits, 16, 16
    if target <= 1:
        return one_pass
    chunk = max(least, _cdiv(_cdiv(num_keys, target), align) * align)
    stat_chunk = max(least, _cdiv(_cdiv(num_tokens, target), align) * align)
    num_chunks = _cdiv(num_keys, chunk)
    if num_chunks == 1 and num_splits is None:
        return one_pass
    return SplitPlan(num_chunks, chunk, _cdiv(num_tokens, stat_chunk), stat_chunk)


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


def _wrap_triton_enabled() -> bool:
    """Whether wrap_triton would wrap now: off in eager around a triton_op's body. torch's switch
    (private) read directly: wrap_triton's own checks cost microseconds per launch; a torch without
    it: True (then `wrap_triton(kernel) is kernel` decides)."""
    enabled = getattr(getattr(torch._library, "triton", None), "is_wrap_triton_enabled", None)
    return True if enabled is None else enabled()


def _traced_launcher(kernel: str, config: dict | None):
    """`torch.library.wrap_triton` of the kernel (its autotuner when `config` is None) where that
    records the launch into a graph (the fssam::scma triton_op's body traced by torch.compile /
    AOTInductor); None where it would launch as is: eager (triton_op turns wrap_triton off around its
    body), or kernels run by the interpreter (never traced)."""
    if _INTERPRETED or not _wrap_triton_enabled():
        return None
    raw = KERNEL_FUNCTIONS[kernel] if config is not None else _AUTOTUNED[kernel]
    launcher = torch.library.wrap_triton(raw)
    return None if launcher is raw else launcher


def _launch(kernel: str, grid, args: tuple, head_dim: int, dtype: torch.dtype, config: dict | None,
            shots: int = 0, traceable: bool = False):
    """Launch `kernel` with an explicit config, or autotuned when `config` is None. traceable: through
    `torch.library.wrap_triton` (`_traced_launcher`): what the triton_op's body does; a traced launch
    is the kernel (or its autotuner, candidates pruned as for an eager launch) with `grid`, the
    positional `args` (tensors and shape-derived ints) and the constexprs as keyword arguments, and
    never reads or records the eager autotuner's pick (`_PICKED`)."""
    fn = KERNEL_FUNCTIONS[kernel]
    consts = constexprs(head_dim, dtype, config, fn, shots)
    launcher = _traced_launcher(kernel, config) if traceable else None
    if launcher is not None:
        if config is None:
            launcher[grid](*args, **consts)
        else:
            launcher[grid(config) if callable(grid) else grid](*args, **consts, num_warps=config["num_warps"],
                                                               num_stages=config["num_stages"])
        return
    if config is None:
        key = (kernel, dtype, head_dim, shots, *(args[i] for i in _KEY_POSITIONS[kernel]))
        picked = _PICKED.get(key)
        if picked is None:
            tuner = _AUTOTUNED[kernel]
            with _PICK_LOCK:
                tuner[grid](*args, **consts)
                _PICKED[key] = tuner.best_config
        else:
            fn[grid](*args, **consts, **picked.all_kwargs())
    else:
        grid_args = grid(config) if callable(grid) else grid
        fn[grid_args](*args, **consts, num_warps=config["num_warps"], num_stages=config["num_stages"])


def _strides(x: torch.Tensor, dims: int = 3) -> tuple:
    return x.stride()[:dims]


def _tile_config(head_dim: int, dtype: torch.dtype, num_tokens: int, block_m, block_n) -> dict | None:
    """The attention kernels' launch config: None (autotuned), the interpreter's, or fixed tiles."""
    config = None
    if interpreting():
        config = interpreter_config(num_tokens)
    elif block_m is not None or block_n is not None:
        config = autotune_configs("fwd", head_dim, dtype)[0]
    if config is not None:
        config = dict(config, BLOCK_M=block_m or config["BLOCK_M"], BLOCK_N=block_n or config["BLOCK_N"])
    return config


def _check_device(q: torch.Tensor, *tensors: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scma: unsupported dtype {q.dtype}; expected one of {SUPPORTED_DTYPES}")
    if any(t.device != q.device for t in tensors):
        raise ValueError("scma: all tensors must be on one device")
    if not q.is_cuda and not interpreting():
        raise RuntimeError("scma Triton kernel: CPU tensors need TRITON_INTERPRET=1 (set before importing triton)")


def _split_pass(plan: SplitPlan, q, sk, sv, k, v, cal: tuple, length: int, out, config, shots: int,
                traceable: bool = False) -> None:
    """The split path: stats, split and combine kernels (one pass is `_one_pass`'s kernels). cal: the
    calibration arguments of `_scma_split_kernel` (CAL, STATS, stride_cb, stride_ch, stride_cs,
    NUM_SLICES)."""
    b, h, n, c = q.shape
    row_min = torch.empty((b * h, plan.num_stat_slices, n), dtype=torch.float32, device=q.device)
    row_max = torch.empty_like(row_min)
    o_part = torch.empty((b * h, plan.num_chunks, n, c), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((b * h, plan.num_chunks, n), dtype=torch.float32, device=q.device)
    _launch("stats", lambda meta: (_cdiv(n, meta["BLOCK_M"]), b * h, plan.num_stat_slices),
            (q, k, row_min, row_max, *_strides(q), *_strides(k), h, n, plan.stat_chunk), c, q.dtype, config,
            traceable=traceable)
    _launch("split", lambda meta: (_cdiv(n, meta["BLOCK_M"]), b * h, plan.num_chunks),
            (q, sk, sv, k, v, *cal[:2], row_min, row_max, o_part, lse_part, *_strides(q), *_strides(sk),
             *_strides(sv), *_strides(k), *_strides(v), *cal[2:], h, n, length, plan.chunk, plan.num_stat_slices),
            c, q.dtype, config, shots, traceable=traceable)
    combine = combine_config(c)
    _launch("combine", (_cdiv(n, combine["BLOCK_M"]), b * h),
            (o_part, lse_part, *_strides(out), h, n, plan.num_chunks, out), c, q.dtype, combine,
            traceable=traceable)


def scma_fused(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cal: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    auto_split: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fssam::SCMA node's kernel (what the TensorRT plugin launches). q (B, H, N, c);
    keys/values (B, H, 2N + P, c) as laid out by `calibration_inputs`; cal (B, H, N) = 10 (w - 1)
    in fp32. Returns (B, H, N, c) in q's dtype (written into `out` when given: same shape and dtype
    as q, last dim contiguous). block_m / block_n: fixed tiles instead of autotuning; num_splits:
    force the split path with that many key chunks; auto_split: let `split_plan`'s heuristic split
    on CUDA (default AUTO_SPLIT: on); one pass on CPU."""
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
    _check_device(q, keys, values, cal)
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
    config = _tile_config(c, q.dtype, n, block_m, block_n)
    plan = split_plan(b * h, n, total, sm_count(q.device), num_splits, auto_split)
    # Triton launches on the current CUDA device, not on the tensors' one: make them the same
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if plan.num_chunks == 1:
            _launch("fwd", lambda meta: (_cdiv(n, meta["BLOCK_M"]), b * h),
                    (q, keys, values, cal, *_strides(q), *_strides(keys), *_strides(values), *_strides(cal, 2),
                     *_strides(out), h, n, total, out), c, q.dtype, config)
        else:
            _split_pass(plan, q, keys, values, keys, values, (cal, cal, *_strides(cal, 2), 0, 0), total, out,
                        config, shots=0)
    return out


def calibration_slices(num_tokens: int, block_t: int) -> tuple[int, int]:
    """(slices, keys per slice) of a shot's N keys, the same for its support keys in
    `_scma_prototype_kernel` and for the pseudo-query keys in `_scma_calibration_kernel`: up to
    MAX_SLICES programs per shot, each a whole number of BLOCK_T tiles."""
    tiles = _cdiv(num_tokens, block_t)
    per_slice = _cdiv(tiles, min(MAX_SLICES, tiles)) * block_t
    return _cdiv(num_tokens, per_slice), per_slice


def _calibration_pass(k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, shots: int, num_tokens: int,
                      traceable: bool = False):
    """`_scma_prototype_kernel` then `_scma_calibration_kernel` on rotated k, v (B, H, >= (shots + 1) N,
    c, last dims contiguous) and masks (B, >= shots, N; fp32, fp16 or bf16): (cosines (B*H, shots, N), stats (B*H,
    shots, MAX_SLICES, 2) of which `num_slices` are written, num_slices, support-mean keys, values).
    With one shot the support-mean keys/values are k and v themselves (their first N rows)."""
    b, h, _, c = k.shape
    config = calibration_config(c, k.dtype)
    num_slices, per_slice = calibration_slices(num_tokens, config["BLOCK_T"])
    proto_part = torch.empty((b * h, shots, MAX_SLICES, c), dtype=torch.float32, device=k.device)
    count_part = torch.empty((b * h, shots, MAX_SLICES), dtype=torch.float32, device=k.device)
    cosines = torch.empty((b * h, shots, num_tokens), dtype=torch.float32, device=k.device)
    stats = torch.empty((b * h, shots, MAX_SLICES, 2), dtype=torch.float32, device=k.device)
    # one shot: no support-mean to write (k and v are it); the launch gets empty buffers in its place,
    # not k and v, which torch's tracing would take as written and copy
    mean = num_tokens if shots > 1 else 0
    sk = torch.empty((b, h, mean, c), dtype=k.dtype, device=k.device)
    sv = torch.empty_like(sk)
    mean_tiles = _cdiv(num_tokens, config["BLOCK_T"]) if shots > 1 else 0
    _launch("prototype", (shots * num_slices + mean_tiles, b * h),
            (k, v, masks, proto_part, count_part, sk, sv, *_strides(k), *_strides(v), *_strides(masks, 2),
             *_strides(sk), h, num_tokens, shots, num_slices, per_slice), c, k.dtype, config, traceable=traceable)
    if shots == 1:
        sk, sv = k, v
    _launch("calibration", (shots * num_slices, b * h),
            (k, proto_part, count_part, cosines, stats, *_strides(k), h, num_tokens, shots, num_slices, per_slice),
            c, k.dtype, config, traceable=traceable)
    return cosines, stats, num_slices, sk, sv


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
    auto_split: bool | None = None,
    config: dict | None = None,
    traceable: bool = False,
) -> torch.Tensor:
    """Drop-in replacement of `scma_reference`, all in Triton: `_scma_prototype_kernel` and
    `_scma_calibration_kernel` (the calibration inputs: per-shot cosines with their min / max and,
    with several shots, the shot-mean support keys/values), then the attention (`_scma_kernel`, or the split path), reading k and v
    in place: no concatenated key tensor and no PyTorch arithmetic in between. block_m, block_n,
    num_splits, auto_split: as `scma_fused`; config: one whole launch config of the one-pass
    attention kernel (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of autotuning, with
    num_splits=1 only (bench_scma.py --sweep). traceable: launch through `torch.library.wrap_triton`, as
    the fssam::scma triton_op's body does, so that make_fx / torch.compile / AOTInductor tracing records
    the launches (in eager it launches as without it); launch grids and arguments come from shapes
    and strides only, never from tensor contents."""
    if mode not in ("paper", "official"):
        raise ValueError(f"scma mode {mode!r}: expected 'paper' or 'official'")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or support_masks.dim() != 3:
        raise ValueError(f"scma: q, k, v must be 4-D and support_masks 3-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(support_masks.shape)}")
    b, h, n, c = q.shape
    if support_masks.shape[0] != b or support_masks.shape[2] != n:
        raise ValueError(f"scma: q has {n} tokens and batch {b}, support masks are {tuple(support_masks.shape)}")
    shots = 1 if mode == "official" else support_masks.shape[1]  # official: the first support mask only
    total = k.shape[2]
    if k.shape[:2] != (b, h) or k.shape[-1] != c or v.shape != k.shape or total < (shots + 1) * n:
        raise ValueError(f"scma: k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} with {shots} shot(s) "
                         "(expected (B, H, K*N + N + P, c))")
    if config is not None and num_splits != 1:
        raise ValueError("scma: config= fixes the one-pass kernel's launch: pass num_splits=1 with it")
    _check_device(q, k, v, support_masks)
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k.to(q.dtype))
    v = _last_dim_contiguous(v.to(q.dtype))
    # fp32 / fp16 / bf16 masks are read as they are (the kernel widens them, exactly); others as fp32
    masks = support_masks if support_masks.dtype in SUPPORTED_DTYPES else support_masks.float()
    masks = _last_dim_contiguous(masks)
    out = torch.empty((b, h, n, c), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    shift = (shots - 1) * n  # k[:, :, shift:] starts N keys before the pseudo-query block
    kc, vc = (k[:, :, shift:], v[:, :, shift:]) if shift else (k, v)
    length = total - shift
    config = dict(config) if config is not None else _tile_config(c, q.dtype, n, block_m, block_n)
    plan = split_plan(b * h, n, length, sm_count(q.device), num_splits, auto_split)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        cosines, stats, num_slices, sk, sv = _calibration_pass(k, v, masks, shots, n, traceable)
        if plan.num_chunks == 1:
            _launch("scma", lambda meta: (_cdiv(n, meta["BLOCK_M"]), b * h),
                    (q, sk, sv, kc, vc, cosines, stats, *_strides(q), *_strides(sk), *_strides(sv), *_strides(kc),
                     *_strides(vc), *_strides(out), h, n, length, num_slices, _next_pow2(b * h), out),
                    c, q.dtype, config, shots, traceable=traceable)
        else:
            cal = (cosines, stats, h * shots * n, shots * n, n, num_slices)
            _split_pass(plan, q, sk, sv, kc, vc, cal, length, out, config, shots=shots, traceable=traceable)
    return out
