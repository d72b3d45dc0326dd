"""SCMA as a `torch.library.triton_op`: `torch.ops.fssam.scma(q, k, v, support_masks, mode)`.

  * CUDA: the fused Triton kernels, launched through `torch.library.wrap_triton`
    (`fssam.ops.scma.triton_kernel.triton_scma(..., traceable=True)`). The op's body (`scma_op`)
    is what torch.compile and AOTInductor trace: they decompose the op into its kernel launches
    (triton_kernel_wrapper HOPs) and compile the kernels into their own code, so an AOTInductor
    package runs them without this Python registration. torch.export keeps the op as one node
    `torch.ops.fssam.scma.default` (a triton_op is decomposed only when compiled);
  * CPU: the reference `fssam.ops.scma.reference.scma_reference` (the `register_kernel("cpu")`
    kernel in eager; the body's non-CUDA branch where the op is decomposed, e.g. a CPU AOTInductor
    package); inside `triton_on_cpu()` with TRITON_INTERPRET=1 the CPU kernel runs the Triton
    kernels in the interpreter instead (for tests);
  * fake (meta) kernel for torch.compile / torch.export tracing: the output's shape and dtype
    (registered over the body, which triton_op would use: it needs a CUDA device to trace);
  * autograd: the backward differentiates the reference (recomputed), so training through the
    op works on every device.
triton_op / wrap_triton are public since torch 2.6. Importing this module imports no triton:
`triton_kernel` is imported when the kernels first run (or torch.compile asks for them).
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


def _run_triton(q, k, v, support_masks, mode, traceable: bool = False):
    from fssam.ops.scma import triton_kernel  # triton is imported only when the kernel runs

    return triton_kernel.triton_scma(q, k, v, support_masks, mode, traceable=traceable)


def _reference(q, k, v, support_masks, mode):
    """The reference with k and v in q's dtype, as the Triton kernel reads them (so every device takes
    the same mixed-dtype inputs; the casts are differentiable, so gradients keep k's and v's dtypes)."""
    return scma_reference(q, k.to(q.dtype), v.to(q.dtype), support_masks, mode)


@contextlib.contextmanager
def _without_source_scan():
    """While triton_op registers the op: no scan of its body's source. triton_op records a new op's
    kernels by reading the body for `wrap_triton(<kernel>)` calls
    (`torch._library.triton.get_inner_triton_kernels`); the scan imports triton and torch._inductor
    (seconds, where importing this package took 0.05 s) and finds nothing here: the launches are
    made by name in `triton_kernel`, imported lazily. `_record_kernels` fills the record instead.
    A torch without the scan: nothing to skip."""
    from torch._library import triton as library_triton

    scan = getattr(library_triton, "get_inner_triton_kernels", None)
    if scan is None:
        yield
        return
    library_triton.get_inner_triton_kernels = lambda fn: []
    try:
        yield
    finally:
        library_triton.get_inner_triton_kernels = scan


def scma_op(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    """Support-Calibrated Memory Attention: (B, H, N, c). The default kernel and what compilers trace:
    CUDA tensors -> the Triton kernels through wrap_triton (in eager, triton_op turns wrap_triton
    off: plain launches); other devices -> the reference (eager CPU calls `_scma_cpu` instead)."""
    _check_mode(mode)
    if q.device.type == "cuda":
        return _run_triton(q, k, v, support_masks, mode, traceable=True)
    return _reference(q, k, v, support_masks, mode).contiguous()


with _without_source_scan():
    scma_op = torch.library.triton_op(OP_NAME, scma_op, mutates_args=())


@scma_op.register_kernel("cpu")
def _scma_cpu(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    """CPU kernel: the reference (or, inside `triton_on_cpu()`, the Triton kernels interpreted)."""
    _check_mode(mode)
    if _triton_on_cpu.get():
        return _run_triton(q, k, v, support_masks, mode)
    return _reference(q, k, v, support_masks, mode).contiguous()


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


def op_kernels() -> list:
    """The Triton kernels the op's CUDA body launches (the compiled JITFunctions; none when they
    run interpreted, where the body is never traced), importing `triton_kernel` on first use."""
    try:
        from fssam.ops.scma import triton_kernel
    except ImportError:  # no triton: the op never launches a kernel
        return []
    return [] if triton_kernel.interpreting() else list(triton_kernel.KERNEL_FUNCTIONS.values())


class _KernelsOnDemand(list):
    """torch's record of a triton_op's kernels (`torch._library.triton.get_triton_kernels_for_op`;
    torch.compile's AOTAutograd cache key hashes their source, so an edited kernel is never served
    from a stale cache entry), filled by triton_op from its scan of the body's source (skipped here,
    `_without_source_scan`). This list reads the kernels when iterated (`op_kernels`), so the record
    holds them without importing `triton_kernel` with this module."""

    def __iter__(self):
        return iter(op_kernels())

    def __len__(self):
        return len(op_kernels())


def _record_kernels() -> None:
    try:
        from torch._library import triton as library_triton

        table = library_triton.triton_ops_to_kernels  # torch's private record; absent: nothing to fill
    except (ImportError, AttributeError):
        return
    table[OP_NAME] = _KernelsOnDemand()


_record_kernels()
