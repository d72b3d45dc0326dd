"""The stage contract: stage names, tensor specs and the one composition of an episode.

Written once for every backend: the eager FSSAM module (torch tensors), the exported runners of
fssam.runtime (numpy arrays or torch tensors) and the served pipeline. Only the array methods
`reshape` and `shape` are used, so the same code runs on torch and numpy. This module imports
neither torch, sam2, timm nor triton.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

STAGE_ORDER = ("prior_backbone", "image_encoder", "prior", "memory_encoder", "refine", "head")
GRAPH_ORDER = ("support_encoder", "query_segmenter")  # the deployable graphs (what a server runs)
RUNS_PER_EPISODE = {
    "prior_backbone": "K support + 1 query",
    "image_encoder": "K support + 1 query",
    "prior": "1",
    "memory_encoder": "K support + 2 query (one batch)",
    "refine": "1",
    "head": "1",
    "support_encoder": "1 (cacheable: support images and masks only)",
    "query_segmenter": "1",
}
PER_IMAGE_STAGES = ("prior_backbone", "image_encoder", "memory_encoder")  # batch = images, not episodes
BATCH = "batch"  # the dynamic dimension 0 of every stage tensor
DEFAULT_MAX_BATCH = 8  # episodes per call an export admits (`fssam export --max-batch`)
MAX_BATCH_LIMIT = 64  # the largest --max-batch of an export and of a served repository
IGNORE = 255  # mask value of ignored pixels


def batch_limit(name: str, max_batch: int, shots: int) -> int:
    """The largest dimension 0 that unit `name` receives when episodes come `max_batch` at a time:
    the per-image stages see B*K support images or the query's 2B memory encodings, so
    max_batch * max(K, 2); the per-episode stages and the two graphs see max_batch."""
    return max_batch * max(shots, 2) if name in PER_IMAGE_STAGES else max_batch


MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 1, DEFAULT_MAX_BATCH  # a profile's defaults, in episodes


def batch_profile(name: str, max_batch: int, shots: int) -> tuple[int, int, int]:
    """(min, opt, max) of dimension 0 of unit `name`: max from the export's limit
    (contract.batch_limit), opt what one episode sends (the serving case: K support images, or
    the query's 2 memory encodings, for the per-image stages; 1 elsewhere)."""
    high = batch_limit(name, max_batch, shots)
    return MIN_BATCH, min(high, batch_limit(name, OPT_BATCH, shots)), high


def profile_shapes(units: dict, max_batch: int, shots: int) -> dict:
    """{unit: {input name: (min shape, opt shape, max shape)}}: the optimisation profile each
    engine is built with, from the manifest's stage/graph entries (or StageSpec.to_dict()s):
    dimension 0 ("batch") from `batch_profile`, the other dimensions as exported."""
    profiles = {}
    for name, entry in units.items():
        low, opt, high = batch_profile(name, max_batch, shots)
        shapes = {}
        for tensor in entry["inputs"]:
            if tensor["shape"][0] != BATCH:
                raise ValueError(f"{name} input {tensor['name']}: dimension 0 is {tensor['shape'][0]!r}, expected "
                                 f"{BATCH!r}")
            rest = [int(d) for d in tensor["shape"][1:]]
            shapes[tensor["name"]] = ([low, *rest], [opt, *rest], [high, *rest])
        profiles[name] = shapes
    return profiles


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


def graph_specs(cfg, shots: int, dtype: str = "float32") -> dict[str, StageSpec]:
    """The two deployable graphs: images and masks enter as uint8 (pixels 0..255, masks 0/1)."""
    stages = stage_specs(cfg, shots, dtype)
    s, k = cfg.image_size, shots
    support_images = TensorSpec("support_images", (BATCH, k, 3, s, s), "uint8")
    support_masks = TensorSpec("support_masks", (BATCH, k, s, s), "uint8")
    features = TensorSpec("support_features", (BATCH, k, *stages["prior_backbone"].outputs[0].shape[1:]), dtype)
    memory, pointers = stages["head"].inputs[3:5]
    specs = [
        StageSpec("support_encoder", (support_images, support_masks), (features, memory, pointers)),
        StageSpec("query_segmenter", (TensorSpec("query", (BATCH, 3, s, s), "uint8"), features, memory, pointers,
                                      support_masks), stages["head"].outputs),
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


def _concat(a, b):
    """[a; b] along dimension 0, torch or numpy."""
    if hasattr(a, "is_floating_point"):
        import torch  # only reached with torch tensors, so torch is loaded already

        return torch.cat([a, b])
    import numpy as np

    return np.concatenate([a, b])


def segment(stages, query_images, support: dict):
    """Query mask logits (B, 1, S, S) from query images (B, 3, S, S) and an encoded support set.

    The query's two memory encodings (under prior_fg and prior_ae) run as one batch of 2B."""
    b = query_images.shape[0]
    query_dino = stages.prior_backbone(query_images)
    s0, s1, s2 = stages.image_encoder(query_images)
    prior_fg, prior_ae = stages.prior(query_dino, support["dino_features"], support["masks"])
    memory, pointers = stages.memory_encoder(_concat(s0, s0), _concat(s1, s1), _concat(s2, s2),
                                             _concat(prior_fg, prior_ae))
    fg_memory, ae_memory, ae_pointer = memory[:b], memory[b:], pointers[b:]
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


# ---------------------------------------------------------------- the deployable graphs

def support_encoder(stages, support_images, support_masks) -> tuple:
    """Graph 1 over float inputs (the caller casts uint8): (support_features, support_memory, support_pointers)."""
    support = encode_support(stages, support_images, support_masks)
    return support["dino_features"], support["memory"], support["pointers"]


def query_segmenter(stages, query, support_features, support_memory, support_pointers, support_masks):
    """Graph 2 over float inputs: query mask logits (B, 1, S, S)."""
    support = {"dino_features": support_features, "memory": support_memory, "pointers": support_pointers,
               "masks": support_masks}
    return segment(stages, query, support)


def to_uint8(array):
    """Pixels or masks (torch or numpy) as uint8; values must already be whole numbers in 0..255."""
    if hasattr(array, "is_floating_point"):
        import torch

        return array if array.dtype == torch.uint8 else array.round().clamp(0, 255).to(torch.uint8)
    import numpy as np

    return array if array.dtype == np.uint8 else np.clip(np.rint(array), 0, 255).astype(np.uint8)


def run_graphs(graphs, query, support_images, support_masks):
    """An episode through the two deployable graphs (`graphs.support_encoder`, `graphs.query_segmenter`),
    as the served ensemble runs it: uint8 images, uint8 0/1 masks (255 = ignore becomes 0)."""
    masks = to_uint8(binary_masks(support_masks))
    features, memory, pointers = graphs.support_encoder(to_uint8(support_images), masks)
    return graphs.query_segmenter(to_uint8(query), features, memory, pointers, masks)
