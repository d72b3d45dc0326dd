"""FSSAM in PyTorch on sam2 + DINOv2. Public API: `build`, `get_config`, `FSSAM`, `CONFIGS`."""

from __future__ import annotations

import logging

import torch

from fssam.model.checkpoint import load_checkpoint
from fssam.model.config import CONFIGS, FSSAMConfig, get_config
from fssam.model.fssam import FSSAM

__all__ = ["build", "get_config", "FSSAM", "FSSAMConfig", "CONFIGS", "describe_weights"]

log = logging.getLogger("fssam")


def build(config: str | FSSAMConfig = "small", checkpoint=None, seed: int = 0, **overrides) -> FSSAM:
    """An FSSAM model in eval mode.

    checkpoint: a path or a list of paths (an official FSSAM training file, or SAM 2 and DINOv2
    files); loaded strictly. Without one, the weights are a seeded random init: the model says so
    in `model.weights` and every output of the CLI repeats it.
    """
    cfg = get_config(config, **overrides)
    torch.manual_seed(seed)
    model = FSSAM(cfg).eval()
    paths = [] if checkpoint is None else [checkpoint] if isinstance(checkpoint, (str, bytes)) else list(checkpoint)
    loaded = [load_checkpoint(model, str(path)) for path in paths]
    covered = {entry["format"] for entry in loaded}
    model.checkpoints = loaded  # {"file" (name only), "format", "sha256"}: what a manifest records
    if "fssam" in covered or {"sam2", "dinov2"} <= covered:
        model.random_init_seed = None
    else:
        model.random_init_seed = seed
    log.info(describe_weights(model))
    return model


def describe_weights(model: FSSAM) -> str:
    """One line saying where the weights come from; random weights are never presented as trained."""
    parts = [f"{entry['format']} checkpoint {entry['file']} (sha256 {entry['sha256'][:12]})" for entry in model.checkpoints]
    if model.random_init_seed is not None:
        untouched = "all weights" if not parts else "weights not covered by " + ", ".join(parts)
        return f"RANDOM-INIT model (seed {model.random_init_seed}): {untouched} are untrained; outputs are not meaningful"
    return "weights: " + ", ".join(parts)
