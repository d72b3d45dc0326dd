"""The six export stages: tensor contracts and thin wrappers over the eager model's own methods.

Dimension 0 of every tensor is the dynamic batch ("batch": images for the per-image stages,
episodes for the others); the other sizes are fixed by the config and the shot count.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fssam.model.config import FSSAMConfig

STAGE_ORDER = ("prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head")
RUNS_PER_EPISODE = {
    "prior_backbone": "K support + 1 query",
    "image_encoder": "K support + 1 query",
    "prior": "1",
    "memory_encoder": "K support + 2 query",
    "refine": "1",
    "head": "1",
}
BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # BATCH for the dynamic dimension 0, then ints
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return asdict(self) | {"shape": list(self.shape)}


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "runs_per_episode": RUNS_PER_EPISODE[self.name],
        }


def stage_specs(cfg: FSSAMConfig, shots: int, dtype: str = "float32") -> dict[str, StageSpec]:
    s, g, d, c, m, h = cfg.image_size, cfg.dino_grid, cfg.dino.embed_dim, cfg.hidden_dim, cfg.memory_dim, cfg.feature_size
    k = shots

    def t(name, *shape):
        return TensorSpec(name, (BATCH, *shape), dtype)

    feats = (t("feat_s0", c // 8, 4 * h, 4 * h), t("feat_s1", c // 4, 2 * h, 2 * h), t("feat_s2", c, h, h))
    specs = [
        StageSpec("prior_backbone", (t("images", 3, s, s),), (t("dino_features", d, g, g),)),
        StageSpec("image_encoder", (t("images", 3, s, s),), feats),
        StageSpec(
            "prior",
            (t("query_features", d, g, g), t("support_features", k, d, g, g), t("support_masks", k, s, s)),
            (t("prior_fg", 1, s, s), t("prior_ae", 1, s, s)),
        ),
        StageSpec("memory_encoder", (*feats, t("mask", 1, s, s)), (t("memory", m, h, h), t("pointer", c))),
        StageSpec(
            "refine",
            (
                t("support_memory", k, m, h, h),
                t("support_masks", k, s, s),
                t("query_fg_memory", m, h, h),
                t("query_ae_memory", m, h, h),
                t("prior_fg", 1, s, s),
                t("prior_ae", 1, s, s),
            ),
            (t("refined_memory", m, h, h), t("refined_prior_ae", 1, h, h)),
        ),
        StageSpec(
            "head",
            (
                *feats,
                t("support_memory", k, m, h, h),
                t("support_pointers", k, c),
                t("query_memory", m, h, h),
                t("query_pointer", c),
                t("support_masks", k, s, s),
            ),
            (t("logits", 1, s, s),),
        ),
    ]
    return {spec.name: spec for spec in specs}


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


STAGE_MODULES = {
    "prior_backbone": PriorBackboneStage,
    "image_encoder": ImageEncoderStage,
    "prior": PriorStage,
    "memory_encoder": MemoryEncoderStage,
    "refine": RefineStage,
    "head": HeadStage,
}


class StageRunner:
    """Base of the backends that run exported stages: subclasses implement `run_stage(name, *tensors)`;
    this gives them the six stage methods and the episode composition of the eager model."""

    def run_stage(self, name: str, *args):
        raise NotImplementedError

    def prior_backbone(self, images):
        return self.run_stage("prior_backbone", images)

    def image_encoder(self, images):
        return self.run_stage("image_encoder", images)

    def prior(self, query_features, support_features, support_masks):
        return self.run_stage("prior", query_features, support_features, support_masks)

    def memory_encoder(self, feat_s0, feat_s1, feat_s2, mask):
        return self.run_stage("memory_encoder", feat_s0, feat_s1, feat_s2, mask)

    def refine(self, support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae):
        return self.run_stage("refine", support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae)

    def head(self, feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks):
        return self.run_stage(
            "head", feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks
        )

    def encode_support(self, support_images, support_masks) -> dict:
        from fssam.model.episode import encode_support

        return encode_support(self, support_images, support_masks)

    def segment(self, query_images, support: dict):
        from fssam.model.episode import segment

        return segment(self, query_images, support)

    def __call__(self, query_images, support_images, support_masks):
        from fssam.model.episode import run_episode

        return run_episode(self, query_images, support_images, support_masks)


class RecordingStages:
    """The eager model's stages, recording every call's inputs and outputs."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.records: dict[str, list[tuple[tuple, tuple]]] = {name: [] for name in STAGE_ORDER}

    def __getattr__(self, name):
        if name not in STAGE_ORDER:
            raise AttributeError(name)

        def run(*args):
            out = getattr(self.model, name)(*args)
            self.records[name].append((args, out if isinstance(out, tuple) else (out,)))
            return out

        return run


def stage_samples(model: nn.Module, query, supports, masks) -> dict[str, list[tuple[tuple, tuple]]]:
    """Real inputs/outputs of every stage call in one eager episode: {stage: [(inputs, outputs), ...]}."""
    from fssam.model.episode import run_episode

    recorder = RecordingStages(model)
    with torch.no_grad():
        run_episode(recorder, query, supports, masks)
    return recorder.records
