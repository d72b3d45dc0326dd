"""Write a synthetic 1-shot episode (support.jpg/png, query.jpg) into a folder: a textured disc on noise."""

import os
import sys

import cv2
import numpy as np


def scene(rng, height, width, center, radius):
    image = (rng.random((height, width, 3)) * 60 + 40).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, center, radius, 1, -1)
    stripes = ((np.indices((height, width)).sum(0) // 6) % 2 * 120 + 100).astype(np.uint8)
    image[mask == 1] = np.stack([stripes, stripes // 2, 255 - stripes], -1)[mask == 1]
    return image, mask


class EpisodeError(Exception):
    pass


def _write(path, array):
    try:
        written = cv2.imwrite(path, array)
    except cv2.error as error:
        raise EpisodeError(f"cannot write {path!r}: {' '.join(str(error).split())}") from None
    if not written:
        raise EpisodeError(f"cannot write {path!r} (cv2.imwrite failed: no permission, disk full or bad name?)")


def main(folder):
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise EpisodeError(f"folder {parent!r} does not exist")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    support, support_mask = scene(rng, 375, 500, (220, 180), 90)
    query, _ = scene(rng, 333, 480, (300, 150), 70)
    _write(os.path.join(folder, "support.jpg"), cv2.cvtColor(support, cv2.COLOR_RGB2BGR))
    _write(os.path.join(folder, "support.png"), support_mask)
    _write(os.path.join(folder, "query.jpg"), cv2.cvtColor(query, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: make_episode.py DIR (made if missing, its parent must exist; writes support.jpg, support.png, query.jpg)",
              file=sys.stderr)
        sys.exit(2)
    try:
        main(sys.argv[1])
    except EpisodeError as error:
        print(f"make_episode.py: error: {error}", file=sys.stderr)
        sys.exit(1)
