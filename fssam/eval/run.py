"""The evaluation loop: every episode through one backend, IoU accumulated as the official test,
with a hash and foreground count of every predicted mask."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from fssam.errors import InputError

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip  (label value c is the c-th COCO category, 1-based)


def class_name(dataset: str, class_id: int) -> str:
    names = PASCAL_CLASSES if dataset == "pascal" else COCO_CLASSES
    return names[class_id - 1] if 1 <= class_id <= len(names) else str(class_id)


def episode_tensors(episode, size: int):
    """query (1, 3, S, S), supports (1, K, 3, S, S), masks (1, K, S, S) 0/1/255, as the official val transform."""
    import torch

    from fssam.data import resize_pair

    query, _ = resize_pair(episode.query_image, episode.query_label, size)
    pairs = [resize_pair(image, label, size) for image, label in zip(episode.support_images, episode.support_labels)]
    supports = np.stack([image for image, _ in pairs]).transpose(0, 3, 1, 2)  # (K, 3, S, S) float32
    masks = np.stack([label for _, label in pairs]).astype(np.float32)  # (K, S, S)
    return (
        torch.from_numpy(np.ascontiguousarray(query.transpose(2, 0, 1)))[None],
        torch.from_numpy(np.ascontiguousarray(supports))[None],
        torch.from_numpy(masks)[None],
    )


def episodes_fingerprint(specs, root: str) -> str:
    """sha256 of the episode list (paths relative to the data root, so other machines match)."""
    rows = [[s.index, _rel(s.query[0], root), s.class_id, [_rel(p[0], root) for p in s.supports]] for s in specs]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root)


def mask_digest(mask: np.ndarray) -> str:
    h = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}:".encode())
    h.update(np.packbits(mask.reshape(-1).astype(bool)).tobytes())
    return h.hexdigest()[:16]


def run_eval(backend, specs, classes, root: str, dataset: str, progress: bool = True) -> tuple[dict, list]:
    """Run every episode; (result dict, list of (H, W) uint8 0/1 predicted masks in episode order)."""
    from tqdm import tqdm

    from fssam.data import IoUAccumulator, load_episode
    from fssam.data.preprocess import logits_to_mask

    size = backend.image_size
    meter = IoUAccumulator(classes)
    records, masks = [], []
    model_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(specs, desc=f"eval {backend.name}", unit="episode", disable=not progress, file=sys.stderr)
    for spec in bar:
        episode = load_episode(spec)
        query, supports, support_masks = episode_tensors(episode, size)
        tick = time.perf_counter()
        logits = backend(query, supports, support_masks)
        model_seconds += time.perf_counter() - tick
        if tuple(logits.shape) != (1, 1, size, size):
            raise InputError(f"backend {backend.name} returned logits of shape {tuple(logits.shape)}, "
                             f"expected (1, 1, {size}, {size})")
        label = episode.ori_label
        mask = logits_to_mask(logits, *label.shape)  # (H, W) uint8 0/1
        intersection, union = meter.update(mask, label, spec.class_id)
        masks.append(mask)
        records.append({
            "index": spec.index,
            "class": spec.class_id,
            "query": _rel(spec.query[0], root),
            "supports": [_rel(pair[0], root) for pair in spec.supports],
            "size": list(label.shape),
            "foreground": int(mask.sum()),
            "mask_sha256": mask_digest(mask),
            "intersection": [int(v) for v in intersection],
            "union": [int(v) for v in union],
        })
        if progress and len(records) % 10 == 0:
            bar.set_postfix_str(f"mIoU {meter.result(skip_missing=True)['miou']:.4f}")
    bar.close()
    elapsed = time.perf_counter() - start
    metrics = meter.result(skip_missing=True)  # a class the run drew no episode of has no IoU (null)
    result = {
        "backend": backend.name,
        "backend_details": backend.extra,
        "config": backend.config,
        "weights": backend.weights,
        "random_init": backend.random_init,
        "episodes": len(specs),
        "episodes_sha256": episodes_fingerprint(specs, root),
        "miou": metrics["miou"],
        "fbiou": metrics["fbiou"],
        "piou": metrics["piou"],
        "classes": {
            str(c): {"name": class_name(dataset, c), "iou": metrics["class_iou"][c],
                     "episodes": metrics["class_episodes"][c]}
            for c in classes
        },
        "seconds": {"total": round(elapsed, 3), "model": round(model_seconds, 3),
                    "model_per_episode": round(model_seconds / max(len(specs), 1), 5)},
        "per_episode": records,
    }
    return result, masks
