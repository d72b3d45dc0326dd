"""Calibration image/mask pairs for int8 quantization: a user folder or a synthetic set.

A calibration folder holds `images/` and `masks/` with matching file stems (masks 0/1, 255 =
ignore, as support masks). The last K+1 pairs are held out: they form the int8 gate's episode;
the others form the calibration episodes (each pair a query once, its neighbours the supports).
"""

from __future__ import annotations

import hashlib
import os

import cv2
import numpy as np
import torch

from fssam.data.preprocess import check_mask, image_tensor, mask_tensor, read_image, read_mask, write_png
from fssam.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SYNTHETIC_PAIRS = 8


def minimum_pairs(shots: int) -> int:
    return 2 * (shots + 1)  # calibration episodes need K+1 pairs, the held-out gate episode K+1 more


def write_synthetic(folder: str, size: int, pairs: int = SYNTHETIC_PAIRS, seed: int = 0) -> str:
    """Images of coloured shapes on smooth backgrounds with noise; the mask is one shape."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "masks"))
    for index in range(pairs):
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        image = low + (high - low) * ramp[None, :, None] * ramp[:, None, None]  # (S, S, 3) smooth background
        mask = np.zeros((size, size), np.uint8)
        for shape in range(3):
            colour = rng.uniform(0, 255, 3).tolist()
            centre = tuple(int(v) for v in rng.integers(size // 6, 5 * size // 6, 2))
            axes = tuple(int(v) for v in rng.integers(size // 10, size // 4, 2))
            layer = np.zeros((size, size), np.uint8)
            cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
            image[layer == 1] = colour
            if shape == 0:
                mask = layer
            else:
                mask[layer == 1] = 0  # later shapes occlude the object
        if not mask.any():
            mask[size // 3 : size // 2, size // 3 : size // 2] = 1
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        write_png(os.path.join(folder, "images", f"{index:04d}.png"), image)
        write_png(os.path.join(folder, "masks", f"{index:04d}.png"), mask)
    return folder


def _pairs(folder: str) -> list[tuple[str, str]]:
    images_dir, masks_dir = os.path.join(folder, "images"), os.path.join(folder, "masks")
    for needed in (images_dir, masks_dir):
        if not os.path.isdir(needed):
            raise InputError(f"calibration folder {folder!r} has no {os.path.basename(needed)}/ folder: "
                             "expected images/ and masks/ with matching file names")
    masks = {os.path.splitext(name)[0]: os.path.join(masks_dir, name) for name in os.listdir(masks_dir)
             if name.lower().endswith(".png")}
    pairs, unmatched = [], []
    for name in sorted(os.listdir(images_dir)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if stem in masks:
            pairs.append((os.path.join(images_dir, name), masks[stem]))
        else:
            unmatched.append(name)
    if unmatched:
        raise InputError(f"calibration images without a mask (masks/<name>.png): {', '.join(unmatched[:5])}")
    return pairs


def read_set(folder: str, size: int, shots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(image (3, S, S) 0..255, mask (S, S) 0/1)] of a calibration folder, checked."""
    pairs = _pairs(folder)
    if len(pairs) < minimum_pairs(shots):
        raise InputError(f"calibration folder {folder!r} has {len(pairs)} image/mask pair(s); {shots}-shot "
                         f"int8 needs at least {minimum_pairs(shots)} (K+1 to calibrate, K+1 held out for the gate)")
    out = []
    for image_path, mask_path in pairs:
        image = read_image(image_path)
        mask = check_mask(read_mask(mask_path), mask_path, image.shape)
        out.append((image_tensor(image, size), mask_tensor(mask, size)))
    return out


def describe(folder: str, source: str) -> dict:
    """The manifest's record of a calibration set: where, how many pairs, one sha256 over its files."""
    digest = hashlib.sha256()
    pairs = _pairs(folder)
    for image_path, mask_path in pairs:
        for path in (image_path, mask_path):
            digest.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return {"source": source, "folder": os.path.basename(os.path.normpath(folder)), "pairs": len(pairs),
            "sha256": digest.hexdigest()}


def episodes(pairs: list, shots: int) -> tuple[list[tuple], tuple]:
    """(calibration episodes, held-out gate episode); each (query (1,3,S,S), supports (1,K,3,S,S), masks (1,K,S,S))."""

    def episode(query, supports):
        return (query[0].unsqueeze(0), torch.stack([s[0] for s in supports]).unsqueeze(0),
                torch.stack([s[1] for s in supports]).unsqueeze(0))

    held = pairs[-(shots + 1):]
    train = pairs[: -(shots + 1)]
    calibration = [episode(train[i], [train[(i + j) % len(train)] for j in range(1, shots + 1)]) for i in range(len(train))]
    return calibration, episode(held[0], held[1:])
