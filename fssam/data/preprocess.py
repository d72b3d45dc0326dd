"""Reading and preprocessing images and masks as the official FSSAM test does.

Images: RGB, float 0..255, resized to S x S with cv2 INTER_LINEAR. Masks: 0 background,
1 foreground, 255 ignore; resized with INTER_NEAREST. Predicted logits go back to the
original size with bilinear (align_corners=True) before the 0.5 sigmoid threshold.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fssam.errors import InputError

IGNORE = 255
MAX_IMAGE_SIDE = 8192


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; InputError for missing or unreadable files."""
    if not os.path.isfile(path):
        raise InputError(f"image {path!r} does not exist")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"image {path!r} cannot be decoded (corrupt or not an image)")
    if max(image.shape[:2]) > MAX_IMAGE_SIDE:
        raise InputError(f"image {path!r} is {image.shape[1]}x{image.shape[0]}, larger than {MAX_IMAGE_SIDE} px a side")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str) -> np.ndarray:
    """(H, W) int64 label values; palette PNGs give their indices. InputError if unreadable."""
    if not os.path.isfile(path):
        raise InputError(f"mask {path!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA"):
                array = np.asarray(image)[..., :3]
                if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
                    raise InputError(f"mask {path!r} is a colour image: expected a single-channel label image")
                return array[..., 0].copy()
            return np.asarray(image).astype(np.int64)  # mode '1' gives 0/1, 'L'/'P' their values
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InputError(f"mask {path!r} cannot be decoded: {error}") from None


def check_mask(mask: np.ndarray, name: str, image_shape=None) -> np.ndarray:
    """Validate a support mask: values in {0, 1, 255}, some foreground, same size as its image."""
    values = np.unique(mask)
    bad = [int(v) for v in values if v not in (0, 1, IGNORE)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8])
        raise InputError(f"mask {name!r} has values {shown}: expected 0 (background), 1 (foreground), 255 (ignore)")
    if not (mask == 1).any():
        raise InputError(
            f"mask {name!r} is empty: it has no foreground pixel (value 1; 255 means ignore, not foreground)"
        )
    if image_shape is not None and tuple(mask.shape[:2]) != tuple(image_shape[:2]):
        raise InputError(
            f"mask {name!r} is {mask.shape[1]}x{mask.shape[0]} but its image is {image_shape[1]}x{image_shape[0]}"
        )
    return mask.astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(image.astype(np.float32), dsize=(size, size), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), dsize=(size, size), interpolation=cv2.INTER_NEAREST)


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """(3, S, S) float32 0..255."""
    return torch.from_numpy(resize_image(image, size)).permute(2, 0, 1).contiguous()


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """(S, S) float32 with 255 (ignore) mapped to background, as the official model input."""
    resized = resize_mask(mask, size)
    if not (resized == 1).any():
        raise InputError(f"support mask foreground vanishes when resized to {size}x{size}: it is too small")
    return torch.from_numpy((resized == 1).astype(np.float32))


def load_episode(support_images, support_masks, query_image, size: int):
    """Tensors for one episode from file paths: query (1, 3, S, S), supports (1, K, 3, S, S),
    masks (1, K, S, S), plus the query image (H, W, 3) uint8."""
    if not support_images:
        raise InputError("no support image given: at least one --support/--support-mask pair is needed")
    if len(support_images) != len(support_masks):
        raise InputError(
            f"{len(support_images)} support image(s) but {len(support_masks)} support mask(s): give them in pairs"
        )
    images, masks = [], []
    for image_path, mask_path in zip(support_images, support_masks):
        image = read_image(image_path)
        mask = check_mask(read_mask(mask_path), mask_path, image.shape)
        images.append(image_tensor(image, size))
        masks.append(mask_tensor(mask, size))
    query = read_image(query_image)
    return (
        image_tensor(query, size).unsqueeze(0),
        torch.stack(images).unsqueeze(0),
        torch.stack(masks).unsqueeze(0),
        query,
    )


def logits_to_mask(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(1, 1, S, S) logits -> (H, W) uint8 0/1 mask at the original size (official test rule)."""
    resized = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=True)
    return (torch.sigmoid(resized)[0, 0] >= 0.5).numpy().astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with the mask tinted red and its contour drawn, (H, W, 3) uint8 RGB."""
    out = image.astype(np.float32).copy()
    red = np.array([255.0, 0.0, 0.0])
    out[mask == 1] = (1 - alpha) * out[mask == 1] + alpha * red
    out = out.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 0), 1)
    return out


def write_png(path: str, array: np.ndarray) -> None:
    """Write atomically: a temp file in the same folder, renamed at the end."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"output folder {folder!r} does not exist")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.png")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
