"""SCMA in ONNX: the standard-op decomposition (default) or one custom node fssam::SCMA.

What `fssam.ops.scma.scma` emits while `torch.onnx.export` traces it is chosen per export, by
the exporter, with a context manager around that one export call:

    with onnx_custom_node(aot=True):
        torch.onnx.export(model, args, dynamo=True)

Outside such a block (and in every other thread or context) the export is the decomposition
into standard ONNX ops (the reference, traced). Nothing happens when `onnx_custom_node(...)` is
only constructed, and the previous choice is restored when the block exits.

The custom node (`scma_onnx_node`): the O(K N c) calibration inputs as standard ONNX ops
(`calibration_inputs`, `calibration_term` of the reference), then one node, domain "fssam",
op "SCMA":
    inputs  q (B, H, N, c), keys (B, H, 2N + P', c), values (B, H, 2N + P', c),
            cal (B, H, N) float32 = 10 * (w - 1)
    outputs out (B, H, N, c), q's dtype
    attrs   plugin_namespace = "fssam" (the TensorRT ONNX parser's plugin lookup),
            aot = 1 / 0 (TensorRT: use the plugin's ahead-of-time Triton kernel, or its JIT impl)
The node is exactly the fused kernel, so the TensorRT plugin (`fssam.ops.scma.tensorrt_plugin`)
is a single AOT-compiled Triton launch. (P' = P, or (K - 1) N + P in "official" mode, which
calibrates the block after the first support; the node does not need to know.)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import torch
from torch import Tensor

from fssam.ops.scma.reference import calibration_inputs, calibration_term

ONNX_DOMAIN = "fssam"
ONNX_OP = "SCMA"
ONNX_OPSET_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CustomNode:
    """The fssam::SCMA node's options: aot is its "aot" attribute."""

    aot: bool = True


_custom_node: contextvars.ContextVar[CustomNode | None] = contextvars.ContextVar("fssam_scma_onnx_node", default=None)


@contextlib.contextmanager
def onnx_custom_node(enabled: bool = True, *, aot: bool = True):
    """Within the block, `torch.onnx.export` emits one fssam::SCMA node per SCMA call
    (enabled=True) or the standard-op decomposition (enabled=False). aot: the node's "aot"
    attribute (TensorRT picks the plugin's AOT Triton kernel, else its JIT impl)."""
    token = _custom_node.set(CustomNode(aot=bool(aot)) if enabled else None)
    try:
        yield
    finally:
        _custom_node.reset(token)


def active_custom_node() -> CustomNode | None:
    """The custom node asked for by the enclosing `onnx_custom_node` block, if any."""
    return _custom_node.get()


def scma_onnx_node(q: Tensor, k: Tensor, v: Tensor, support_masks: Tensor, mode: str = "paper", *, aot: bool = True):
    """Calibration inputs as standard ops + one fssam::SCMA node (meant for torch.onnx.export)."""
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
