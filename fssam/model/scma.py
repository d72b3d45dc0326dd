"""The helpers the prior generator (PPG) and the memory refinement (IMR) share with SCMA.

SCMA itself (reference, Triton kernel, custom op, ONNX node, TensorRT plugin) lives in
`fssam.ops.scma`; this module only re-exports, from `fssam.ops.scma.reference`, the pieces of
math that `fssam.model.prior` and `fssam.model.refine` import from here, so that each is written
once. (It can go once those two modules import from `fssam.ops.scma.reference` themselves.)
"""

from __future__ import annotations

from fssam.ops.scma.reference import COSINE_EPS, PROTOTYPE_EPS, masked_average, min_max_normalise

__all__ = ["COSINE_EPS", "PROTOTYPE_EPS", "masked_average", "min_max_normalise"]
