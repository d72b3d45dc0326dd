"""Few-shot segmentation metrics as the official FSSAM test computes them.

Per episode, intersection and union of background (0) and foreground (1) over the pixels
whose label is not 255. Class-wise mIoU: foreground intersections and unions summed per
episode class, IoU per class, mean over the fold's classes. A class without episodes counts
as 0 by default, as in the official test; `result(skip_missing=True)` gives it no IoU and leaves
it out of the mean instead (what `fssam eval` reports: a short run draws only some classes).
FB-IoU: background and foreground IoU over all episodes, averaged. Sums are exact integers (the
official test sums float32 counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fssam.data.datasets import IGNORE_LABEL
from fssam.errors import InputError

EPSILON = 1e-10  # the official denominator guard


def intersection_and_union(
    pred, label, num_classes: int = 2, ignore_label: int = IGNORE_LABEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts (intersection, union, label area) over pixels not labelled `ignore_label`."""
    pred, label = _as_numpy(pred), _as_numpy(label)
    if pred.shape != label.shape:
        raise InputError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    if np.issubdtype(pred.dtype, np.floating) and np.any(pred != np.round(pred)):
        raise InputError("prediction must hold class indices (threshold the sigmoid at 0.5 first), got fractions")
    pred, label = pred.reshape(-1).astype(np.int64), label.reshape(-1).astype(np.int64)
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise InputError(f"prediction values must lie in 0..{num_classes - 1}, got {np.unique(pred)[:8].tolist()}")
    valid = label != ignore_label
    pred, label = pred[valid], label[valid]
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        found = np.unique(label)[:8].tolist()
        raise InputError(f"label values must lie in 0..{num_classes - 1} or be {ignore_label}, got {found}")
    area_intersection = np.bincount(pred[pred == label], minlength=num_classes)  # (num_classes,) int64
    area_pred = np.bincount(pred, minlength=num_classes)
    area_label = np.bincount(label, minlength=num_classes)
    return area_intersection, area_pred + area_label - area_intersection, area_label


class IoUAccumulator:
    """Accumulates episodes of one fold; `result()` gives class-wise mIoU and FB-IoU."""

    def __init__(self, classes: Sequence[int], ignore_label: int = IGNORE_LABEL):
        self.classes = [int(c) for c in classes]  # the fold's novel classes
        self.ignore_label = ignore_label
        self.intersection = np.zeros(2, np.int64)  # (background, foreground), all episodes
        self.union = np.zeros(2, np.int64)
        self.class_intersection = dict.fromkeys(self.classes, 0)  # foreground, per episode class
        self.class_union = dict.fromkeys(self.classes, 0)
        self.class_episodes = dict.fromkeys(self.classes, 0)

    def update(self, pred, label, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Add one episode: binary prediction and label (0/1, 255 ignore) of the same shape, e.g. the ori_label."""
        if class_id not in self.class_episodes:
            raise InputError(f"class {class_id} is not one of the fold's classes {self.classes}")
        intersection, union, _ = intersection_and_union(pred, label, 2, self.ignore_label)
        self.intersection += intersection
        self.union += union
        self.class_intersection[class_id] += int(intersection[1])
        self.class_union[class_id] += int(union[1])
        self.class_episodes[class_id] += 1
        return intersection, union  # (2,), (2,)

    def result(self, skip_missing: bool = False) -> dict:
        """miou (class-wise, the paper's mIoU), fbiou, piou (pooled foreground IoU), per-class IoU and counts.

        A class without episodes counts as IoU 0, as in the official test; `skip_missing`: it has
        no IoU (None) and mIoU is the mean over the classes that had episodes (None when none had),
        so a short run reports no made-up zeros. With every class drawn both give the same."""
        class_iou = {c: self.class_intersection[c] / (self.class_union[c] + EPSILON) for c in self.classes}
        if skip_missing:
            class_iou = {c: v if self.class_episodes[c] else None for c, v in class_iou.items()}
        measured = [v for v in class_iou.values() if v is not None]
        fb_iou = self.intersection / (self.union + EPSILON)  # (background, foreground)
        return {
            "miou": float(np.mean(measured)) if measured else (None if skip_missing else 0.0),
            "fbiou": float(fb_iou.mean()),
            "piou": float(fb_iou[1]),
            "class_iou": {c: None if v is None else float(v) for c, v in class_iou.items()},
            "class_episodes": dict(self.class_episodes),
            "episodes": sum(self.class_episodes.values()),
        }


def _as_numpy(array) -> np.ndarray:
    """numpy view of an array or a (possibly CUDA) torch tensor; booleans become 0/1."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    return array.astype(np.uint8) if array.dtype == bool else array
