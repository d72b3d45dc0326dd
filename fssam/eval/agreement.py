"""Mask agreement between two eval runs on the same episodes: saved masks (packed bits, npz),
per-episode mask IoU when the other run saved its masks, identical-mask fraction from the hashes otherwise."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from fssam.errors import DataError
from fssam.files import whole_file

MASKS_FORMAT = "fssam-eval-masks/1"  # the npz's "format" entry: --save-masks replaces only such a file
AGREEMENT_IOU = 0.999  # an episode "agrees" when the two masks' foreground IoU reaches this


def masks_path(folder: str, stem: str) -> str:
    """Where save_masks writes: `<folder>/<stem>_masks.npz` (stem: the result file's)."""
    return os.path.join(folder, f"{stem}_masks.npz")


def is_masks_file(path: str) -> bool:
    """A file save_masks wrote (its `format` entry says so): the only file --save-masks may replace."""
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            return "format" in data.files and str(data["format"]) == MASKS_FORMAT
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def save_masks(folder: str, stem: str, masks: list, result: dict) -> str:
    """Write the masks as one compressed npz of packed bits; returns its absolute path. Written whole
    or not at all (fssam.files.whole_file: a temporary file beside it, renamed over it, removed on
    any failure, Ctrl-C and SIGTERM included)."""
    packed = [np.packbits(m.reshape(-1).astype(bool)) for m in masks]
    offsets = np.cumsum([0] + [p.size for p in packed]).astype(np.int64)
    path = os.path.abspath(masks_path(folder, stem))
    with whole_file(path, "wb") as handle:  # a file object: numpy adds no ".npz" to the name
        np.savez_compressed(
            handle,
            format=np.array(MASKS_FORMAT),
            bits=np.concatenate(packed) if packed else np.zeros(0, np.uint8),
            offsets=offsets,
            shapes=np.array([m.shape for m in masks], np.int64).reshape(-1, 2),
            indices=np.array([r["index"] for r in result["per_episode"]], np.int64),
            episodes_sha256=np.array(result["episodes_sha256"]),
        )
    return path


def load_masks(path: str) -> tuple[list, str]:
    """(masks, episodes fingerprint) from a file written by save_masks."""
    if not os.path.isfile(path):
        raise DataError(f"mask file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            bits, offsets, shapes = data["bits"], data["offsets"], data["shapes"]
            fingerprint = str(data["episodes_sha256"])
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"{path} is not an fssam eval mask file: {error}") from None
    masks = []
    for n, (h, w) in enumerate(shapes):
        flat = np.unpackbits(bits[offsets[n] : offsets[n + 1]], count=int(h * w))
        masks.append(flat.reshape(int(h), int(w)))
    return masks, fingerprint


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Foreground IoU of two 0/1 masks; two empty masks agree fully (1.0)."""
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def compare(result: dict, masks: list, other: dict, other_path: str) -> dict:
    """Agreement of this run's masks with another run on the same episodes."""
    keys = ("dataset", "fold", "shots", "seed", "workers", "episodes", "use_split_coco")
    if other.get("episodes_sha256") != result["episodes_sha256"]:
        differing = [f"{k} {other.get(k)!r} vs {result.get(k)!r}" for k in keys if other.get(k) != result.get(k)]
        raise DataError(f"{other_path} ran other episodes than this run "
                        f"({'; '.join(differing) or 'same settings, other lists or data'}): masks cannot be compared")
    mine, theirs = result["per_episode"], other["per_episode"]
    identical = [a["mask_sha256"] == b["mask_sha256"] for a, b in zip(mine, theirs)]
    agreement = {
        "other": os.path.abspath(other_path),
        "other_backend": other.get("backend"),
        "episodes": len(mine),
        "identical_masks": sum(identical),
        "identical_fraction": sum(identical) / max(len(mine), 1),
        "foreground_pixels_differ_max": max((abs(a["foreground"] - b["foreground"]) for a, b in zip(mine, theirs)),
                                            default=0),
        "miou_delta": result["miou"] - other["miou"],
        "fbiou_delta": result["fbiou"] - other["fbiou"],
        "class_iou_delta_max": _class_iou_delta_max(result["classes"], other["classes"]),
        "mask_iou": None,
    }
    masks_file = other.get("masks_file")
    if masks_file and os.path.isfile(masks_file):
        theirs_masks, fingerprint = load_masks(masks_file)
        if fingerprint != result["episodes_sha256"] or len(theirs_masks) != len(masks):
            raise DataError(f"{masks_file} holds masks of other episodes than {other_path} says")
        ious = np.array([mask_iou(a, b) for a, b in zip(masks, theirs_masks)])
        pixels = np.array([float((a == b).mean()) for a, b in zip(masks, theirs_masks)])
        worst = np.argsort(ious, kind="stable")[:5]
        agreement["mask_iou"] = {
            "mean": float(ious.mean()),
            "min": float(ious.min()),
            "fraction_at_least": {str(AGREEMENT_IOU): float((ious >= AGREEMENT_IOU).mean())},
            "pixel_agreement_mean": float(pixels.mean()),
            "worst": [{"index": int(mine[i]["index"]), "iou": float(ious[i])} for i in worst],
            "per_episode": [round(float(v), 6) for v in ious],
        }
    else:
        agreement["note"] = (f"{other_path} has no saved masks (run it with --save-masks DIR): agreement is from "
                             "mask hashes and foreground counts only")
    return agreement


def _class_iou_delta_max(mine: dict, theirs: dict) -> float | None:
    """Largest per-class IoU difference over the classes both runs measured: a class without
    episodes has no IoU (null; 0.0 in results written before that), so it is no difference."""
    deltas = [abs(entry["iou"] - theirs[c]["iou"]) for c, entry in mine.items()
              if entry["iou"] is not None and theirs.get(c, {}).get("iou") is not None]
    return max(deltas, default=None)


def format_agreement(agreement: dict) -> str:
    line = (f"agreement with {agreement['other_backend']} ({agreement['other']}): "
            f"{agreement['identical_masks']}/{agreement['episodes']} identical masks "
            f"({100 * agreement['identical_fraction']:.1f}%)")
    if agreement["mask_iou"]:
        iou = agreement["mask_iou"]
        line += (f", mask IoU mean {iou['mean']:.5f} min {iou['min']:.5f}, "
                 f"{100 * iou['fraction_at_least'][str(AGREEMENT_IOU)]:.1f}% of episodes >= {AGREEMENT_IOU}")
    else:
        line += f"; {agreement['note']}"
    return line + f"; mIoU delta {100 * agreement['miou_delta']:+.3f} points"
