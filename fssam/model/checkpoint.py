"""Checkpoint loading: official SAM 2 / 2.1, official DINOv2 hub, official FSSAM training files.

All loads are strict: missing or unexpected keys, shape mismatches and non-floating tensors for
floating parameters raise one CheckpointError that lists them. Files are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fssam.errors import CheckpointError, first_line
from fssam.model.dino import convert_dinov2_state_dict
from fssam.runtime.manifest import file_sha256  # noqa: F401  (re-exported)

FORMATS = ("fssam", "sam2", "dinov2")
_MAX_LISTED = 12


def read_checkpoint(path: str) -> dict:
    """The object stored in `path`, read safely; a clear error for missing or corrupt files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on damaged files
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read: corrupt, not a PyTorch file, or holding Python objects "
            f"that weights_only=True refuses ({first_line(error)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def detect_format(obj: dict) -> str:
    """'fssam' ({"state_dict": sam2.*/dino.*}), 'sam2' ({"model": ...}) or 'dinov2' (bare hub keys)."""
    if isinstance(obj.get("state_dict"), dict):
        return "fssam"
    if isinstance(obj.get("model"), dict):
        return "sam2"
    if "pos_embed" in obj and "patch_embed.proj.weight" in obj:
        return "dinov2"
    keys = ", ".join(list(obj)[:5])
    raise CheckpointError(
        "unrecognised checkpoint layout (keys: "
        f"{keys}): expected an FSSAM training file {{'state_dict': ...}}, a SAM 2 file {{'model': ...}} "
        "or a DINOv2 hub state dict"
    )


def _strip_module(state: dict) -> dict:
    return {key[len("module.") :] if key.startswith("module.") else key: value for key, value in state.items()}


def _to_model_keys(obj: dict, kind: str, model: nn.Module) -> tuple[dict, str]:
    """(state dict in the model's key space, prefix of the part of the model it covers)."""
    grid = model.config.dino_grid
    if kind == "fssam":
        state = _strip_module(obj["state_dict"])
        sam2 = {k: v for k, v in state.items() if k.startswith("sam2.")}
        dino = {k[len("dino.") :]: v for k, v in state.items() if k.startswith("dino.")}
        other = {k: v for k, v in state.items() if not k.startswith(("sam2.", "dino."))}
        out = dict(sam2)
        out.update(other)
        out.update({"dino." + k: v for k, v in convert_dinov2_state_dict(dino, grid).items()})
        return out, ""
    if kind == "sam2":
        return {"sam2." + k: v for k, v in obj["model"].items()}, "sam2."
    return {"dino." + k: v for k, v in convert_dinov2_state_dict(_strip_module(obj), grid).items()}, "dino."


def _raw_state(obj: dict, kind: str) -> dict:
    """The file's own state dict (before key conversion) of a checkpoint in format `kind`."""
    return obj["state_dict"] if kind == "fssam" else obj["model"] if kind == "sam2" else obj


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else f" ({len(keys)} in all)")


def _check_values(path: str, state: dict) -> None:
    """Every value a tensor, every floating tensor finite: one CheckpointError naming the keys."""
    not_tensors = sorted(f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"checkpoint {path!r} holds values that are not tensors where tensors are expected: "
                              f"{_listed(not_tensors)}")
    non_finite = sorted(str(k) for k, v in state.items()
                        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise CheckpointError(f"checkpoint {path!r} holds tensors with NaN or Inf values: {_listed(non_finite)}")


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _misfits(state: dict, expected: dict) -> list[tuple[str, list[str]]]:
    """(title, keys) of what keeps `state` from loading into a model whose state is `expected`:
    missing and unexpected keys, shape mismatches, and non-floating tensors (int64, bool, ...) for
    floating parameters, which load_state_dict would silently cast into meaningless weights."""
    shared = sorted(set(state) & set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shared
                  if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape]
    kinds = [f"{k}: file {_dtype(state[k])} vs model {_dtype(expected[k])}" for k in shared
             if isinstance(state[k], torch.Tensor) and expected[k].is_floating_point() and not state[k].is_floating_point()]
    return [("missing keys", sorted(set(expected) - set(state))), ("unexpected keys", sorted(set(state) - set(expected))),
            ("shape mismatches", mismatched), ("non-floating tensors for floating parameters", kinds)]


def load_checkpoint(model: nn.Module, path: str, kind: str | None = None) -> dict:
    """Load `path` into `model` strictly. Returns {"file" (the file name, no folder), "format", "sha256"}."""
    obj = read_checkpoint(path)
    found = detect_format(obj)
    if kind is not None and kind != found:
        raise CheckpointError(f"checkpoint {path!r} is in {found!r} format, but {kind!r} was asked for")
    _check_values(path, _raw_state(obj, found))
    try:
        state, prefix = _to_model_keys(obj, found, model)
    except (ValueError, TypeError, AttributeError, RuntimeError, IndexError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path!r}: a tensor of the wrong shape or kind ({error})") from None
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    problems = []
    for title, items in _misfits(state, expected):
        if items:
            shown = ", ".join(items[:_MAX_LISTED]) + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path!r} ({found} format) does not fit config {model.config.name!r}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=(prefix == ""))
    return {"file": os.path.basename(path), "format": found, "sha256": file_sha256(path)}


def save_fssam_checkpoint(model: nn.Module, path: str) -> None:
    """Write the model in the official FSSAM training layout ({"state_dict": sam2.*, dino.*}, hub DINOv2 keys)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("dino.vit."):
            key = "dino." + key[len("dino.vit.") :]
        state[key] = value.detach().clone()
    torch.save({"state_dict": state}, path)
