"""Support-Calibrated Memory Attention (SCMA, ARCHITECTURE.md section 2) in one package.

Modules (the math is defined once, in `reference`; the kernels are fused versions tested against it):
  reference        the PyTorch reference, and the calibration inputs of the ONNX node / TensorRT plugin
  triton_kernel    the fused OpenAI-Triton kernels: calibration + attention for the op, the attention alone
                   for the ONNX node (one pass, or split over the keys), autotuned
  op               `torch.ops.fssam.scma`, a torch.library.triton_op: CUDA -> Triton kernels (through
                   wrap_triton: torch.compile / AOTInductor compile them in), CPU -> reference, fake, autograd
  onnx_node        the ONNX custom node fssam::SCMA and the per-export switch `onnx_custom_node`
  tensorrt_plugin  the TensorRT plugin running the Triton kernel for fssam::SCMA nodes

`scma(q, k, v, support_masks, mode)` (what the model calls) dispatches:
  * eager / torch.compile / torch.export: the custom op `torch.ops.fssam.scma`;
  * while `torch.onnx.export` runs: the reference, i.e. a decomposition into standard ONNX ops
    (the default), or, inside an exporter's `with onnx_custom_node():` block, one custom node
    fssam::SCMA (for the TensorRT plugin).
Inside `reference_scma()` the model calls the reference in every mode (an AOTInductor package
compiled there holds the decomposed math, no Triton kernel: the fall-back of `fssam deploy
--device cuda` where the kernel fails to compile into a package).
Importing this package needs neither triton nor tensorrt; `triton_kernel` and
`tensorrt_plugin` import them when used.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from fssam.ops.scma import op  # noqa: F401  (importing it registers torch.ops.fssam.scma)
from fssam.ops.scma.onnx_node import active_custom_node, onnx_custom_node, scma_onnx_node
from fssam.ops.scma.op import triton_on_cpu
from fssam.ops.scma.reference import scma_reference

__all__ = ["scma", "scma_reference", "onnx_custom_node", "triton_on_cpu", "reference_scma"]

_reference_only: contextvars.ContextVar[bool] = contextvars.ContextVar("fssam_scma_reference_only", default=False)


@contextlib.contextmanager
def reference_scma():
    """Within the block, `scma` is the reference (standard torch ops) instead of the custom op."""
    token = _reference_only.set(True)
    try:
        yield
    finally:
        _reference_only.reset(token)


def scma(q, k, v, support_masks, mode: str = "paper"):
    """Support-Calibrated Memory Attention: (B, H, N, c) from rotated q, k, v and (B, K, N) masks."""
    if torch.onnx.is_in_onnx_export():
        node = active_custom_node()
        if node is not None:
            return scma_onnx_node(q, k, v, support_masks, mode, aot=node.aot)
        return scma_reference(q, k, v, support_masks, mode)
    if _reference_only.get():
        return op._reference(q, k, v, support_masks, mode)  # what the op's CPU kernel runs
    return torch.ops.fssam.scma(q, k, v, support_masks, mode)
