"""SCMA as a `torch.library` custom op, and its ONNX custom node.

`torch.ops.fssam.scma(q, k, v, support_masks, mode)`:
  * CUDA: the fused Triton kernel (`fssam.kernels.triton_scma.triton_scma`);
  * CPU (and any other device): the reference `fssam.model.scma.scma_reference`; inside
    `triton_on_cpu()` with TRITON_INTERPRET=1 the CPU kernel runs the Triton kernel in the
    interpreter instead (for tests);
  * fake (meta) kernel for torch.compile / torch.export tracing;
  * autograd: the backward differentiates the reference (recomputed), so training through the
    op works on every device.
`CALLS` counts which implementation ran ("reference" / "triton"): the model tests use it to
prove that the model goes through the op.

`scma_onnx_node(q, k, v, support_masks, mode)` is what the dispatcher emits while exporting to
ONNX with `onnx_custom_node(True)`: the O(K N c) calibration inputs as standard ONNX ops, then
one node, domain "fssam", op "SCMA":
    inputs  q (B, H, N, c), keys (B, H, 2N + P', c), values (B, H, 2N + P', c),
            cal (B, H, N) float32 = 10 * (w - 1)
    outputs out (B, H, N, c), q's dtype
    attrs   plugin_namespace = "fssam" (the TensorRT ONNX parser's plugin lookup),
            aot = 1 / 0 (TensorRT: use the plugin's ahead-of-time Triton kernel, or its JIT impl)
The node is exactly the fused kernel, so the TensorRT plugin (`fssam.kernels.tensorrt_plugin`)
is a single AOT-compiled Triton launch. (P' = P, or (K - 1) N + P in "official" mode, which
calibrates the block after the first support; the node does not need to know.)
"""

from __future__ import annotations

import collections
import contextlib
import threading

import torch
from torch import Tensor

from fssam.model.scma import calibration_inputs, scma_reference

OP_NAME = "fssam::scma"
ONNX_DOMAIN = "fssam"
ONNX_OP = "SCMA"
ONNX_OPSET_VERSION = 1

CALLS: collections.Counter = collections.Counter()
_state = threading.local()


def _triton_on_cpu_enabled() -> bool:
    return getattr(_state, "triton_on_cpu", False)


@contextlib.contextmanager
def triton_on_cpu(enabled: bool = True):
    """Make the CPU kernel of the op run the Triton kernel in the interpreter (TRITON_INTERPRET=1)."""
    from fssam.kernels.triton_scma import interpreting

    if enabled and not interpreting():
        raise RuntimeError("triton_on_cpu needs TRITON_INTERPRET=1 set before triton is imported")
    previous = _triton_on_cpu_enabled()
    _state.triton_on_cpu = enabled
    try:
        yield
    finally:
        _state.triton_on_cpu = previous


def _run_triton(q, k, v, support_masks, mode):
    from fssam.kernels.triton_scma import triton_scma

    CALLS["triton"] += 1
    return triton_scma(q, k, v, support_masks, mode)


@torch.library.custom_op(OP_NAME, mutates_args=())
def scma_op(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    """Support-Calibrated Memory Attention: (B, H, N, c). Default (CPU) kernel: the reference."""
    if mode not in ("paper", "official"):
        raise ValueError(f"scma mode {mode!r}: expected 'paper' or 'official'")
    if q.device.type == "cpu" and _triton_on_cpu_enabled():
        return _run_triton(q, k, v, support_masks, mode)
    CALLS["reference"] += 1
    return scma_reference(q, k, v, support_masks, mode).contiguous()


@scma_op.register_kernel("cuda")
def _scma_cuda(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str) -> Tensor:
    if mode not in ("paper", "official"):
        raise ValueError(f"scma mode {mode!r}: expected 'paper' or 'official'")
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
        out = scma_reference(*leaves, support_masks, ctx.mode)
        targets = [t for t, need in zip(leaves, wanted) if need]
        grads = iter(torch.autograd.grad(out, targets, grad_out, allow_unused=True)) if targets else iter(())
    result = [next(grads) if need else None for need in wanted]
    return (*result, None, None)


scma_op.register_autograd(_backward, setup_context=_setup_context)


def scma_onnx_node(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str = "paper", *, aot: bool = True):
    """Calibration inputs as standard ops + one fssam::SCMA node (meant for torch.onnx.export)."""
    from fssam.kernels.triton_scma import calibration_term

    if q.dtype == torch.bfloat16 and not aot:
        # the JIT plugin sees TensorRT buffers through __cuda_array_interface__, which has no bfloat16
        raise ValueError("fssam::SCMA node: bf16 needs the plugin's AOT kernel (aot=True), not the JIT one")
    keys, values, w, _ = calibration_inputs(k, v, support_masks, mode)
    cal = calibration_term(w)
    return torch.onnx.ops.symbolic(
        f"{ONNX_DOMAIN}::{ONNX_OP}",
        (q, keys.to(q.dtype), values.to(q.dtype), cal),
        {"plugin_namespace": ONNX_DOMAIN, "aot": int(bool(aot))},
        dtype=q.dtype,
        shape=q.shape,
        version=ONNX_OPSET_VERSION,
    )
