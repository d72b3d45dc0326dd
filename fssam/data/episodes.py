"""Deterministic few-shot episodes, drawn as the official FSSAM test draws them.

The official test walks the query list in order (episode n uses query n mod len(list)),
for as many passes as it needs, inside a torch DataLoader with `workers` processes. Each
pass draws one int64 `base_seed` from torch's generator (seeded with the val seed, 321);
worker w seeds Python's `random` with base_seed + w and serves queries w, w + workers, ...
Per query it picks a class present in the query label, then K supports of that class,
each different from the query and from each other. `sample_episodes` replays exactly
those draws (workers=0: one `random.Random(seed)` stream, as a loader without workers).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from fssam.data.datasets import IGNORE_LABEL, FoldData, Pair, read_label
from fssam.errors import ConfigError, DataError, InputError

VAL_SEED = 321  # the official test's seed_array
EPISODES = 1000
WORKERS = 32  # `workers` of the official configs


@dataclass(frozen=True)
class EpisodeSpec:
    """Which files make one episode."""

    index: int  # episode number, 0..episodes-1
    query: Pair
    class_id: int  # data set class id
    class_index: int  # position in the fold's classes (the official `subcls`)
    supports: tuple[Pair, ...]  # K pairs, in the order the official loader stacks them


@dataclass(frozen=True, eq=False)
class Episode:
    """One loaded episode; labels are binarised for `class_id` (0/1, 255 ignore)."""

    spec: EpisodeSpec
    query_image: np.ndarray  # (H, W, 3) uint8 RGB
    query_label: np.ndarray  # (H, W) uint8, original size
    support_images: tuple[np.ndarray, ...]  # K x (h, w, 3) uint8 RGB
    support_labels: tuple[np.ndarray, ...]  # K x (h, w) uint8

    @property
    def class_id(self) -> int:
        return self.spec.class_id

    @property
    def ori_label(self) -> np.ndarray:
        """The official evaluation target ("ori_label"): the binarised label at original size."""
        return self.query_label  # (H, W) uint8


def sample_episodes(
    data: FoldData, shot: int = 1, episodes: int = EPISODES, seed: int = VAL_SEED, workers: int = WORKERS
) -> list[EpisodeSpec]:
    """Draw `episodes` episodes of `shot` supports; same arguments -> same episodes."""
    if shot < 1 or episodes < 1 or workers < 0:
        raise ConfigError(f"need shot >= 1, episodes >= 1, workers >= 0; got {shot}, {episodes}, {workers}")
    if not data.items:
        raise DataError(f"{data.dataset} fold {data.fold} ({data.mode}) has no query images")
    present: dict[Pair, list[int]] = {}  # query -> its episode classes, ascending
    specs = []
    for index, (query, rng) in enumerate(_query_streams(data.items, episodes, seed, workers)):
        if query not in present:
            label_classes = np.unique(read_label(query[1])).tolist()
            present[query] = [c for c in label_classes if c in data.classes]
            if not present[query]:
                raise DataError(f"query label {query[1]} holds none of the classes {list(data.classes)}")
        classes = present[query]
        class_id = classes[rng.randint(1, len(classes)) - 1]
        supports = _draw_supports(rng, query, class_id, data.class_files.get(class_id, ()), shot)
        specs.append(EpisodeSpec(index, query, class_id, data.classes.index(class_id), supports))
    return specs


def load_episode(spec: EpisodeSpec) -> Episode:
    """Read the images of an episode and binarise its labels for the episode class."""
    query_image, query_label = _read_pair(spec.query, spec.class_id)
    supports = [_read_pair(pair, spec.class_id) for pair in spec.supports]
    return Episode(
        spec,
        query_image,
        query_label,
        tuple(image for image, _ in supports),
        tuple(label for _, label in supports),
    )


def binarize_label(label: np.ndarray, class_id: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """1 where label == class_id, ignore_label kept, 0 elsewhere.  # (H, W) uint8"""
    binary = (label == class_id).astype(np.uint8)
    binary[label == ignore_label] = ignore_label
    return binary


def resize_pair(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize as the official val transform: image bilinear (as float32), label nearest, to size x size."""
    if image.ndim != 3 or label.ndim != 2 or image.shape[:2] != label.shape:
        raise InputError(
            f"expected image (H, W, 3) and label (H, W) of the same size, got {image.shape} and {label.shape}"
        )
    image = image.astype(np.float32)  # the official loader resizes float32 images
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)  # (size, size, 3) float32
    label = cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)  # (size, size)
    return image, label


def _query_streams(items, episodes: int, seed: int, workers: int) -> Iterator[tuple[Pair, random.Random]]:
    """(query, the Random that serves it) for each episode, in the official loop order."""
    if workers == 0:
        rng = random.Random(seed)
        for n in range(episodes):
            yield items[n % len(items)], rng
        return
    import torch

    generator = torch.Generator().manual_seed(seed)
    n = 0
    while n < episodes:  # one DataLoader pass
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        streams: dict[int, random.Random] = {}
        for position, query in enumerate(items):
            if n == episodes:
                return
            worker = position % workers
            if worker not in streams:
                streams[worker] = random.Random(base_seed + worker)
            yield query, streams[worker]
            n += 1


def _draw_supports(rng: random.Random, query: Pair, class_id: int, files, shot: int) -> tuple[Pair, ...]:
    """K distinct list entries of the class, none the query; stacked last-drawn first like the official loader."""
    if sum(pair != query for pair in files) < shot:
        raise DataError(f"class {class_id} has fewer than {shot} support images besides the query {query[0]}")
    picked: list[int] = []
    for _ in range(shot):
        index = rng.randint(1, len(files)) - 1  # the official loader draws once before its loop
        pair = query
        while pair == query or index in picked:
            index = rng.randint(1, len(files)) - 1
            pair = files[index]
        picked.append(index)
    return tuple(files[i] for i in reversed(picked))


def _read_pair(pair: Pair, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(pair[0], cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image {pair[0]}")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)  # (H, W, 3) uint8 RGB
    label = read_label(pair[1])
    if image.shape[:2] != label.shape:
        raise DataError(f"image {pair[0]} is {image.shape[:2]} but label {pair[1]} is {label.shape}")
    return image, binarize_label(label, class_id)
