"""Mask agreement between two eval runs on the same episodes: saved masks (packed bits, npz),
per-episode mask IoU when the other run saved its masks, identical-mask fraction from the hashes otherwise."""

from __future__ import annotations

import os

import numpy as np

from fssam.errors import DataError

AGREEMENT_IOU = 0.999  # an episode "agrees" when the two masks' foreground IoU reaches this


def save_masks(folder: str, stem: str, masks: list, result: dict) -> str:
    """Write the masks as one compressed npz of packed bits; returns its absolute path."""
    packed = [np.packbits(m.reshape(-1).astype(bool)) for m in masks]
    offsets = np.cumsum([0] + [p.size for p in packed]).astype(np.int64)
    path = os.path.abspath(os.path.join(folder, f"{stem}_masks.npz"))
    tmp = path + ".tmp.npz"
    np.savez_compressed(
        tmp,
        bits=np.concatenate(packed) if packed else np.zeros(0, np.uint8),
        offsets=offsets,
        shapes=np.array([m.shape for m in masks], np.int64).reshape(-1, 2),
        indices=np.array([r["index"] for r in result["per_episode"]], np.int64),
        episodes_sha256=np.array(result["episodes_sha256"]),
    )
    os.replace(tmp, path)
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
        "class_iou_delta_max": max(abs(result["classes"][c]["iou"] - other["classes"][c]["iou"])
                                   for c in result["classes"]),
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
