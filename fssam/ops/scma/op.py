"""SCMA as a `torch.library` custom op: `torch.ops.fssam.scma(q, k, v, support_masks, mode)`.

  * CUDA: the fused Triton kernel (`fssam.ops.scma.triton_kernel.triton_scma`);
  * CPU (and any other device): the reference `fssam.ops.scma.reference.scma_reference`; inside
    `triton_on_cpu()` with TRITON_INTERPRET=1 the CPU kernel runs the Triton kernel in the
    interpreter instead (for tests);
  * fake (meta) kernel for torch.compile / torch.export tracing;
  * autograd: the backward differentiates the reference (recomputed), so training through the
    op works on every device.
Which implementation ran is not counted here: tests wrap `scma_reference` / `triton_scma` (the
names this module calls at run time) with a counting mock.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

from fssam.ops.scma.reference import scma_reference

OP_NAME = "fssam::scma"
MODES = ("paper", "official")

_triton_on_cpu: contextvars.ContextVar[bool] = contextvars.ContextVar("fssam_scma_triton_on_cpu", default=False)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Within the block, the CPU kernel of the op runs the Triton kernel in the interpreter
    (TRITON_INTERPRET=1 must have been set before triton was imported)."""
    from fssam.ops.scma.triton_kernel import interpreting

    if enabled and not interpreting():
        raise RuntimeError("triton_on_cpu needs TRITON_INTERPRET=1 set before triton is imported")
    token = _triton_on_cpu.set(bool(enabled))
    try:
        yield
    finally:
        _triton_on_cpu.reset(token)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"scma mode {mode!r}: expected 'paper' or 'official'")


def _run_triton(q, k, v, support_masks, mode):
    from fssam.ops.scma import triton_kernel  # triton is imported only when the kernel runs

    return triton_kernel.triton_scma(q, k, v, support_masks, mode)


def _reference(q, k, v, support_masks, mode):
    """The reference with k and v in q's dtype, as the Triton kernel reads them (so every device takes
    the same mixed-dtype inputs; the casts are differentiable, so gradients keep k's and v's dtypes)."""
    return scma_reference(q, k.to(q.dtype), v.to(q.dtype), support_masks, mode)


@torch.library.custom_op(OP_NAME, mutates_args=())
def scma_op(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    """Support-Calibrated Memory Attention: (B, H, N, c). Default (CPU) kernel: the reference."""
    _check_mode(mode)
    if q.device.type == "cpu" and _triton_on_cpu.get():
        return _run_triton(q, k, v, support_masks, mode)
    return _reference(q, k, v, support_masks, mode).contiguous()


@scma_op.register_kernel("cuda")
def _scma_cuda(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    _check_mode(mode)
    return _run_triton(q, k, v, support_masks, mode)


@scma_op.register_fake
def _scma_fake(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "scma: q, k, v must be 4-D")
    torch._check(support_masks.dim() == 3, lambda: "scma: support_masks must be (B, K, N)")
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, support_masks, mode = inputs
    ctx.save_for_backward(q, k, v, support_masks)
    ctx.mode = mode


def _backward(ctx, grad_out):
    q, k, v, support_masks = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), wanted)]
        out = _reference(*leaves, support_masks, ctx.mode)
        targets = [t for t, need in zip(leaves, wanted) if need]
        grads = iter(torch.autograd.grad(out, targets, grad_out, allow_unused=True)) if targets else iter(())
    result = [next(grads) if need else None for need in wanted]
    return (*result, None, None)


scma_op.register_autograd(_backward, setup_context=_setup_context)
