"""The stage contract: stage names, tensor specs and the one composition of an episode.

Written once for every backend: the eager FSSAM module (torch tensors), the exported runners of
fssam.runtime (numpy arrays or torch tensors) and the served pipeline. Only the array methods
`reshape` and `shape` are used, so the same code runs on torch and numpy. This module imports
neither torch, sam2, timm nor triton.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STAGE_ORDER = ("prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head")
RUNS_PER_EPISODE = {
    "prior_backbone": "K support + 1 query",
    "image_encoder": "K support + 1 query",
    "prior": "1",
    "memory_encoder": "K support + 2 query",
    "refine": "1",
    "head": "1",
}
PER_IMAGE_STAGES = ("prior_backbone", "image_encoder", "memory_encoder")  # batch = images, not episodes
BATCH = "batch"  # the dynamic dimension 0 of every stage tensor
IGNORE = 255  # mask value of ignored pixels


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


def stage_specs(cfg, shots: int, dtype: str = "float32") -> dict[str, StageSpec]:
    """The tensors of every stage for a config (fssam.model.FSSAMConfig) and shot count."""
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


def _merge(x, b: int, k: int):
    return x.reshape(b * k, *x.shape[2:])  # (B, K, ...) -> (BK, ...)


def _split(x, b: int, k: int):
    return x.reshape(b, k, *x.shape[1:])  # (BK, ...) -> (B, K, ...)


def encode_support(stages, support_images, support_masks) -> dict:
    """The support side of an episode, cacheable: support_images (B, K, 3, S, S), masks (B, K, S, S) 0/1."""
    b, k = support_images.shape[:2]
    flat_images = _merge(support_images, b, k)  # (BK, 3, S, S)
    flat_masks = support_masks.reshape(b * k, 1, *support_masks.shape[2:])  # (BK, 1, S, S)
    dino_features = stages.prior_backbone(flat_images)
    s0, s1, s2 = stages.image_encoder(flat_images)
    memory, pointers = stages.memory_encoder(s0, s1, s2, flat_masks)
    return {
        "dino_features": _split(dino_features, b, k),  # (B, K, D, g, g)
        "memory": _split(memory, b, k),  # (B, K, M, h, w)
        "pointers": _split(pointers, b, k),  # (B, K, C)
        "masks": support_masks,  # (B, K, S, S)
    }


def segment(stages, query_images, support: dict):
    """Query mask logits (B, 1, S, S) from query images (B, 3, S, S) and an encoded support set."""
    query_dino = stages.prior_backbone(query_images)
    s0, s1, s2 = stages.image_encoder(query_images)
    prior_fg, prior_ae = stages.prior(query_dino, support["dino_features"], support["masks"])
    fg_memory, _ = stages.memory_encoder(s0, s1, s2, prior_fg)
    ae_memory, ae_pointer = stages.memory_encoder(s0, s1, s2, prior_ae)
    refined_memory, _ = stages.refine(support["memory"], support["masks"], fg_memory, ae_memory, prior_fg, prior_ae)
    return stages.head(s0, s1, s2, support["memory"], support["pointers"], refined_memory, ae_pointer, support["masks"])


def binary_masks(support_masks):
    """0/1 float masks (torch or numpy; integer masks become float32); 255 (ignore) becomes background,
    as in the official code."""
    masks = support_masks * (support_masks != IGNORE)
    if hasattr(masks, "is_floating_point"):  # torch
        return masks if masks.is_floating_point() else masks.float()
    return masks if masks.dtype.kind == "f" else masks.astype("float32")


def run_episode(stages, query_images, support_images, support_masks):
    return segment(stages, query_images, encode_support(stages, support_images, binary_masks(support_masks)))
