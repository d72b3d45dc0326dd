"""Reading and preprocessing images and masks as the official FSSAM test does.

Images: RGB, float 0..255, resized to S x S with cv2 INTER_LINEAR. Masks: 0 background,
1 foreground, 255 ignore (or two values 0/k: k foreground, see `check_mask`); resized with
INTER_NEAREST. Predicted logits go back to the
original size with bilinear (align_corners=True) before the 0.5 sigmoid threshold.
"""

from __future__ import annotations

import io
import os
import warnings

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fssam.errors import InputError

IGNORE = 255
MAX_IMAGE_SIDE = 8192


def _too_large(kind: str, path: str, width, height) -> InputError:
    size = f"{width}x{height}" if width is not None else "too large"
    return InputError(
        f"{kind} {path!r} is {size} by its file header, larger than {MAX_IMAGE_SIDE} px a side: "
        f"downscale it first"
    )


def _png_header_size(data: bytes):
    """(width, height) from a PNG IHDR chunk, or (None, None) when the data is not a PNG."""
    head = data[:24]
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None, None


def _unreadable(kind: str, path: str, error: OSError) -> InputError:
    """The one-line error of a file the system will not read (not a statement about its content)."""
    reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error)).lower()
    return InputError(f"{kind} {path!r} cannot be read: {reason}")


def _read_file(path: str, kind: str) -> bytes:
    """The bytes of an existing file; InputError for a folder, a missing or an unreadable path."""
    if os.path.isdir(path):
        raise InputError(f"{kind} {path!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise InputError(f"{kind} {path!r} does not exist")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise _unreadable(kind, path, error) from None


def _open_checked(data: bytes, name: str, kind: str):
    """PIL image opened lazily (header only, nothing decoded), its size checked against
    MAX_IMAGE_SIDE; None when PIL does not know the format. The caller closes it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_large(kind, name, *_png_header_size(data)) from None
    except (OSError, SyntaxError, ValueError):
        return None
    width, height = image.size
    if max(width, height) > MAX_IMAGE_SIDE:
        image.close()
        raise _too_large(kind, name, width, height)
    return image


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; InputError for missing, unreadable (permission), folder, corrupt or too
    large files (the size is checked from the file header before anything is decoded)."""
    return decode_image(_read_file(path, "image"), path)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file's bytes (`name` in the messages); InputError when it is
    corrupt or larger than MAX_IMAGE_SIDE by its header (checked before anything is decoded)."""
    header = _open_checked(data, name, "image")
    if header is not None:
        header.close()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if len(data) else None
    if image is None:
        raise InputError(f"image {name!r} cannot be decoded (corrupt or not an image)")
    if max(image.shape[:2]) > MAX_IMAGE_SIDE:
        raise InputError(f"image {name!r} is {image.shape[1]}x{image.shape[0]}, larger than {MAX_IMAGE_SIDE} px a side")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


ACCEPTED_MASKS = (
    "expected 0 (background), 1 (foreground), 255 (ignore), or exactly two values 0 and one other "
    "(0 = background, the other = foreground, e.g. 0/255)"
)


def _is_binary_mask(values) -> bool:
    """Whether sorted unique `values` read unambiguously as a mask (see `check_mask`)."""
    values = [int(v) for v in values]
    if 1 in values:
        return set(values) <= {0, 1, IGNORE}
    return len(values) == 2 and values[0] == 0


def _pick_channel(channels) -> np.ndarray:
    """The first channel that reads as a mask; else the first one that varies; else the first."""
    uniques = [np.unique(channel) for channel in channels]
    for channel, values in zip(channels, uniques):
        if _is_binary_mask(values):
            return channel
    for channel, values in zip(channels, uniques):
        if len(values) > 1:
            return channel
    return channels[0]


def read_mask(path: str) -> np.ndarray:
    """(H, W) int64 label values of a mask file; InputError if missing, unreadable or too large.

    Single-channel images give their values (16-bit PNGs included); palette ("P") PNGs their
    indices; LA the L channel when it reads as a mask, else the alpha channel; RGB(A) the grey
    channel (a colour image is an error), or alpha when alpha is the only information."""
    return decode_mask(_read_file(path, "mask"), path)


def decode_mask(data: bytes, path: str) -> np.ndarray:
    """`read_mask` of a mask file's bytes (`path` names it in the messages)."""
    image = _open_checked(data, path, "mask")
    if image is None:
        raise InputError(f"mask {path!r} cannot be decoded (corrupt or not an image)")
    try:
        with image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise _unreadable("mask", path, error) from None
        message = " ".join(str(error).split())
        raise InputError(f"mask {path!r} cannot be decoded: {message}") from None
    if mode in ("LA", "La", "PA"):
        return _pick_channel([array[..., 0], array[..., 1]]).astype(np.int64)
    if mode in ("RGB", "RGBA", "RGBX", "RGBa"):
        rgb = array[..., :3]
        grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        alpha = array[..., 3] if mode in ("RGBA", "RGBa") else None
        if not grey:
            raise InputError(f"mask {path!r} is a colour image: expected a single-channel label image")
        channels = [rgb[..., 0]] + ([alpha] if alpha is not None and (alpha != 255).any() else [])
        return _pick_channel(channels).astype(np.int64)
    if array.ndim != 2:
        raise InputError(f"mask {path!r} has {array.shape[-1]} channels (mode {mode}): expected a single-channel label image")
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"mask {path!r} has non-integer values (mode {mode}): expected integer labels")
    return array.astype(np.int64)  # mode '1' gives 0/1, 'L'/'P'/'I;16' their values


def check_mask(mask: np.ndarray, name: str, image_shape=None) -> np.ndarray:
    """Validate a support mask and return it as uint8 0/1/255.

    Accepted: values in {0, 1, 255} with some 1 (0 background, 1 foreground, 255 ignore); or,
    with no 1, exactly two values one of which is 0: 0 = background, the other = foreground
    (0/255 as `fssam predict` writes, 0/65535 16-bit, 0/k). It must match its image's size."""
    values = [int(v) for v in np.unique(mask)]
    if values in ([0], [IGNORE]):
        raise InputError(
            f"mask {name!r} is empty: it has no foreground pixel (value 1; 255 alone means ignore, not foreground)"
        )
    if not _is_binary_mask(values):
        shown = ", ".join(str(v) for v in values[:8]) + (f", ... ({len(values)} values)" if len(values) > 8 else "")
        raise InputError(f"mask {name!r} has values {shown}: {ACCEPTED_MASKS}")
    if image_shape is not None and tuple(mask.shape[:2]) != tuple(image_shape[:2]):
        raise InputError(
            f"mask {name!r} is {mask.shape[1]}x{mask.shape[0]} but its image is {image_shape[1]}x{image_shape[0]}"
        )
    if 1 not in values:  # two-valued 0/k: k is the foreground
        return (mask != 0).astype(np.uint8)
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
    return _episode(support_images, support_masks, query_image, size, read_image, read_mask, str)


def decode_episode(support_images, support_masks, query_image, size: int):
    """`load_episode` of files' bytes: each argument a (name, bytes) pair or a list of them; the
    names are what the messages call the files (the server's uploads)."""
    return _episode(support_images, support_masks, query_image, size, lambda item: decode_image(item[1], item[0]),
                    lambda item: decode_mask(item[1], item[0]), lambda item: item[0])


def _episode(support_images, support_masks, query_image, size, image_of, mask_of, name_of):
    if not support_images:
        raise InputError("no support image given: at least one --support/--support-mask pair is needed")
    if len(support_images) != len(support_masks):
        raise InputError(
            f"{len(support_images)} support image(s) but {len(support_masks)} support mask(s): give them in pairs"
        )
    images, masks = [], []
    for image_file, mask_file in zip(support_images, support_masks):
        image = image_of(image_file)
        mask = check_mask(mask_of(mask_file), name_of(mask_file), image.shape)
        images.append(image_tensor(image, size))
        masks.append(mask_tensor(mask, size))
    query = image_of(query_image)
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


PNG_SOFTWARE = "fssam predict"  # the PNG "Software" text of the files predict writes: they may be replaced


def written_by_predict(path: str) -> bool:
    """True for a PNG that `fssam predict` wrote (its "Software" text), which predict may replace."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PNG_SOFTWARE
    except (OSError, ValueError, SyntaxError):
        return False


def write_pngs(arrays: dict[str, np.ndarray], software: str | None = None) -> None:
    """Write PNGs together and atomically: every file to a temp file in its folder first, then all
    renamed; the temp files are removed if a write fails or is interrupted. `software`: the PNG
    "Software" text (PNG_SOFTWARE marks predict's own files)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if software:
        info.add_text("Software", software)
    temps = {}
    try:
        for path, array in arrays.items():
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise InputError(f"output folder {folder!r} does not exist")
            temps[path] = os.path.join(folder, f".{os.path.basename(path)}.partial-{os.getpid()}.png")
            Image.fromarray(array).save(temps[path], format="PNG", pnginfo=info)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def write_png(path: str, array: np.ndarray) -> None:
    """One PNG, written atomically (write_pngs)."""
    write_pngs({path: array})
