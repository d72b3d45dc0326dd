"""Write a synthetic 1-shot episode (support.jpg/png, query.jpg) into a folder: a textured disc on noise."""

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


def main(folder):
    rng = np.random.default_rng(0)
    support, support_mask = scene(rng, 375, 500, (220, 180), 90)
    query, _ = scene(rng, 333, 480, (300, 150), 70)
    cv2.imwrite(f"{folder}/support.jpg", cv2.cvtColor(support, cv2.COLOR_RGB2BGR))
    cv2.imwrite(f"{folder}/support.png", support_mask)
    cv2.imwrite(f"{folder}/query.jpg", cv2.cvtColor(query, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main(sys.argv[1])
