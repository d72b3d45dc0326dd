"""The six export stages and the two deployable graphs as modules: thin wrappers over the eager model's own methods.

The tensor contracts (names, shapes, dtypes) are fssam.runtime.contract's.

Dimension 0 of every tensor is the dynamic batch ("batch": images for the per-image stages,
episodes for the others); the other sizes are fixed by the config and the shot count.
"""

from __future__ import annotations

import torch
from torch import nn

from fssam.runtime.contract import BATCH, GRAPH_ORDER, STAGE_ORDER, StageSpec, TensorSpec, graph_specs, stage_specs  # noqa: F401


class _Stage(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class PriorBackboneStage(_Stage):
    def forward(self, images):
        return self.model.prior_backbone(images)


class ImageEncoderStage(_Stage):
    def forward(self, images):
        return self.model.image_encoder(images)


class PriorStage(_Stage):
    def forward(self, query_features, support_features, support_masks):
        return self.model.prior(query_features, support_features, support_masks)


class MemoryEncoderStage(_Stage):
    def forward(self, feat_s0, feat_s1, feat_s2, mask):
        return self.model.memory_encoder(feat_s0, feat_s1, feat_s2, mask)


class RefineStage(_Stage):
    def forward(self, support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae):
        return self.model.refine(support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae)


class HeadStage(_Stage):
    def forward(self, feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks):
        return self.model.head(
            feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks
        )


class SupportEncoderGraph(_Stage):
    """Deployable graph 1: the cacheable support side of an episode."""

    def forward(self, support_images, support_masks):
        return self.model.support_encoder(support_images, support_masks)


class QuerySegmenterGraph(_Stage):
    """Deployable graph 2: query image + encoded support -> logits (IMR rounds unrolled)."""

    def forward(self, query, support_features, support_memory, support_pointers, support_masks):
        return self.model.query_segmenter(query, support_features, support_memory, support_pointers, support_masks)


class BF16Autocast(nn.Module):
    """A stage or graph at the official precision: the fp32 module under bf16 autocast, as the
    official FSSAM test runs the model. Tensors in and out stay fp32 (a bf16 result is widened,
    exactly), so nothing is rounded at a stage boundary that autocast keeps in fp32; the exported
    graph holds autocast's casts: bf16 convolutions and matrix products, fp32 elsewhere as
    autocast has it."""

    def __init__(self, stage: nn.Module, device_type: str = "cpu"):
        super().__init__()
        self.stage = stage
        self.device_type = device_type

    def forward(self, *args):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.stage(*args)
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()


def batch_dynamic_shapes(names, batch, autocast: bool):
    """torch.export's dynamic_shapes for a stage or graph module whose inputs `names` share the
    dynamic batch dimension `batch` (BF16Autocast takes them as *args)."""
    shapes = {name: {0: batch} for name in names}
    return {"args": tuple(shapes.values())} if autocast else shapes


STAGE_MODULES = {
    "prior_backbone": PriorBackboneStage,
    "image_encoder": ImageEncoderStage,
    "prior": PriorStage,
    "memory_encoder": MemoryEncoderStage,
    "refine": RefineStage,
    "head": HeadStage,
    "support_encoder": SupportEncoderGraph,
    "query_segmenter": QuerySegmenterGraph,
}
