"""SCMA implementations behind one dispatcher.

`scma(q, k, v, support_masks, mode)` (what the model calls):
  * eager / torch.compile / torch.export: the custom op `torch.ops.fssam.scma`
    (CUDA -> fused Triton kernel, CPU -> reference; see `fssam.kernels.op`);
  * while `torch.onnx.export` runs: the reference, i.e. a decomposition into standard ONNX ops
    (the default), or, inside / after `onnx_custom_node(True)`, one custom node fssam::SCMA
    (for the TensorRT plugin in `fssam.kernels.tensorrt_plugin`).
"""

from __future__ import annotations

import torch

from fssam.kernels import op as _op  # registers torch.ops.fssam.scma
from fssam.kernels.op import CALLS, scma_onnx_node, triton_on_cpu
from fssam.model.scma import scma_reference

__all__ = ["scma", "onnx_custom_node", "onnx_custom_node_enabled", "CALLS", "triton_on_cpu", "scma_reference"]

_onnx_node = {"enabled": False, "aot": True}


class onnx_custom_node:
    """Select what `scma` emits during ONNX export: the fssam::SCMA custom node (enabled=True)
    or the standard-op decomposition (False, the default).

    Takes effect when called; used as a context manager it restores the previous setting on exit:
        with fssam.kernels.onnx_custom_node(True):
            torch.onnx.export(model, args, dynamo=True)
    aot: the node's "aot" attribute (TensorRT picks the plugin's AOT Triton kernel, else its JIT impl).
    """

    def __init__(self, enabled: bool = True, aot: bool = True):
        self._previous = dict(_onnx_node)
        _onnx_node.update(enabled=bool(enabled), aot=bool(aot))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _onnx_node.update(self._previous)
        return False


def onnx_custom_node_enabled() -> bool:
    return _onnx_node["enabled"]


def scma(q, k, v, support_masks, mode: str = "paper"):
    """Support-Calibrated Memory Attention: (B, H, N, c) from rotated q, k, v and (B, K, N) masks."""
    if torch.onnx.is_in_onnx_export():
        if _onnx_node["enabled"]:
            return scma_onnx_node(q, k, v, support_masks, mode, aot=_onnx_node["aot"])
        return scma_reference(q, k, v, support_masks, mode)
    return torch.ops.fssam.scma(q, k, v, support_masks, mode)
