"""PASCAL-5i and COCO-20i readers: fold class splits and the official FSSAM split lists.

Layout (as in the official repository):
    <list_root>/fss_list/<mode>/data_list_<fold>.txt          one "image label" pair a line
    <list_root>/fss_list/<mode>/sub_class_file_list_<fold>.txt  {class: [(image, label), ...]}
Paths in those lists start with the official data root (`OFFICIAL_ROOTS`, e.g.
"../data/VOCdevkit2012/VOC2012/JPEGImages/x.jpg"); `map_list_path` swaps that prefix for
the caller's `root`, the folder holding JPEGImages/ and SegmentationClassAug/ (PASCAL) or
train2014/, val2014/ and annotations/ (COCO).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

from fssam.errors import ConfigError, DataError

DATASETS = ("pascal", "coco")
MODES = ("val", "train")
IGNORE_LABEL = 255
MIN_AREA = 2 * 32 * 32  # a class counts in an image only with at least this many pixels
# The `data_root` of the official configs: the prefix of every path in the official lists.
OFFICIAL_ROOTS = {"pascal": "../data/VOCdevkit2012/VOC2012", "coco": "../data/MSCOCO2014"}

Pair = tuple[str, str]  # (image path, label path)


@dataclass(frozen=True)
class FoldData:
    """One fold of a data set: the query list and, per class, the images holding it."""

    dataset: str  # "pascal" or "coco"
    fold: int  # the official `split`, 0..3
    mode: str  # "val" (novel classes) or "train" (base classes)
    root: str
    classes: tuple[int, ...]  # episode classes: novel for "val", base for "train"
    items: tuple[Pair, ...] = field(repr=False)  # queries, in list order
    class_files: dict[int, tuple[Pair, ...]] = field(repr=False)  # support candidates, in list order


def fold_classes(dataset: str, fold: int, use_split_coco: bool = False) -> tuple[list[int], list[int]]:
    """(novel, base) class ids of a fold: the official `sub_val_list` and `sub_list`.

    PASCAL-5i: fold i holds out classes 5i+1..5i+5. COCO-20i: 20i+1..20i+20, or with
    `use_split_coco` (the FWB split the official COCO configs use) every 4th class from i+1.
    """
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("fold", fold, (0, 1, 2, 3))
    if dataset == "pascal":
        all_classes, novel = range(1, 21), list(range(5 * fold + 1, 5 * fold + 6))
    elif use_split_coco:
        all_classes, novel = range(1, 81), list(range(fold + 1, 81, 4))
    else:
        all_classes, novel = range(1, 81), list(range(20 * fold + 1, 20 * fold + 21))
    base = [c for c in all_classes if c not in novel]
    return novel, base


def map_list_path(path: str, root: str, official_root: str) -> str:
    """Map a list path to `root`: strip `official_root` ("" = paths relative to root); absolute paths stay."""
    prefix = official_root.rstrip("/")
    if not prefix:
        return path if os.path.isabs(path) else os.path.join(root, path)
    if path.startswith(prefix + "/"):
        return os.path.join(root, path[len(prefix) + 1 :])
    if os.path.isabs(path):
        return path
    raise DataError(
        f"list path {path!r} does not start with {prefix + '/'!r}: give the prefix the list uses with "
        "--list-prefix PREFIX ('' for paths relative to --root; official_root= in fssam.data.load_fold)"
    )


def read_label(path: str) -> np.ndarray:
    """Read a label PNG as the official loader does (grayscale).  # (H, W) uint8"""
    label = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if label is None:
        raise DataError(f"cannot read label image {path}")
    return label


def load_fold(
    dataset: str,
    root: str,
    list_root: str,
    fold: int,
    mode: str = "val",
    use_split_coco: bool = False,
    official_root: str | None = None,
    check_files: bool = True,
) -> FoldData:
    """Read the official split lists of one fold and map their paths to `root`.

    `list_root` holds fss_list/ (e.g. the official lists/pascal). `official_root` is the
    prefix to strip (default `OFFICIAL_ROOTS[dataset]`). The lists' classes must be the
    fold's novel (val) or base (train) classes, as the official generator wrote them.
    `check_files`: check that `root` and every listed file exist (False: read the lists only).
    """
    _check_choice("mode", mode, MODES)
    novel, base = fold_classes(dataset, fold, use_split_coco)
    classes = novel if mode == "val" else base
    prefix = OFFICIAL_ROOTS[dataset] if official_root is None else official_root
    if check_files:
        _require_dir(root, "data root")
    list_dir = os.path.join(list_root, "fss_list", mode)
    _require_dir(list_root, "list root")
    _require_dir(list_dir, "split list folder")
    data_list = os.path.join(list_dir, f"data_list_{fold}.txt")
    class_list = os.path.join(list_dir, f"sub_class_file_list_{fold}.txt")

    def mapped(pair: Pair, where: str) -> Pair:
        try:
            return map_list_path(pair[0], root, prefix), map_list_path(pair[1], root, prefix)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None

    items = tuple(mapped(pair, f"{data_list} line {n}") for n, pair in _read_pairs(data_list))
    raw = _read_class_files(class_list)
    if sorted(raw) != classes:
        raise DataError(
            f"{class_list} lists classes {sorted(raw)} but {dataset} fold {fold} ({mode}, "
            f"use_split_coco={use_split_coco}) uses {classes}"
        )
    class_files = {c: tuple(mapped(pair, class_list) for pair in raw[c]) for c in classes}
    if check_files:
        _require_files([p for pair in items for p in pair], f"{data_list}, root {root}")
        support_paths = [p for pairs in class_files.values() for pair in pairs for p in pair]
        _require_files(support_paths, f"{class_list}, root {root}")
    return FoldData(dataset, fold, mode, root, tuple(classes), items, class_files)


def scan_fold(
    dataset: str,
    root: str,
    list_file: str,
    fold: int,
    mode: str = "val",
    use_split_coco: bool = False,
    progress: bool = True,
) -> FoldData:
    """Build a fold from a plain list (e.g. val.txt, paths relative to `root`) by reading every label.

    Same filter as the official list generator: an image joins a class when it holds at least
    `MIN_AREA` pixels of it; for "train" only images whose classes are all base classes count.
    """
    _check_choice("mode", mode, MODES)
    novel, base = fold_classes(dataset, fold, use_split_coco)
    classes = novel if mode == "val" else base
    _require_dir(root, "data root")
    pairs = [(map_list_path(i, root, ""), map_list_path(l, root, "")) for _, (i, l) in _read_pairs(list_file)]
    items: list[Pair] = []
    class_files: dict[int, list[Pair]] = {c: [] for c in classes}
    for pair in tqdm(pairs, desc=f"scan {dataset} fold {fold}", disable=not progress):
        label = read_label(pair[1])
        present = [int(c) for c in np.unique(label) if c not in (0, IGNORE_LABEL)]
        if mode == "train" and not set(present) <= set(classes):
            continue
        kept = [c for c in present if c in class_files and int((label == c).sum()) >= MIN_AREA]
        if kept:
            items.append(pair)
            for c in kept:
                class_files[c].append(pair)
    frozen = {c: tuple(pairs) for c, pairs in class_files.items()}
    return FoldData(dataset, fold, mode, root, tuple(classes), tuple(items), frozen)


def write_fold(data: FoldData, list_root: str, official_root: str | None = None) -> tuple[str, str]:
    """Write `data` in the official list format under list_root/fss_list/<mode>/; returns the two paths."""
    prefix = (OFFICIAL_ROOTS[data.dataset] if official_root is None else official_root).rstrip("/")

    def listed(path: str) -> str:
        relative = os.path.relpath(path, data.root)
        if relative.startswith(".."):
            raise DataError(f"{path} is not under the data root {data.root}")
        return f"{prefix}/{relative}" if prefix else relative

    list_dir = os.path.join(list_root, "fss_list", data.mode)
    os.makedirs(list_dir, exist_ok=True)
    data_list = os.path.join(list_dir, f"data_list_{data.fold}.txt")
    class_list = os.path.join(list_dir, f"sub_class_file_list_{data.fold}.txt")
    with open(data_list, "w") as f:
        f.writelines(f"{listed(i)} {listed(l)}\n" for i, l in data.items)
    with open(class_list, "w") as f:
        f.write(repr({c: [(listed(i), listed(l)) for i, l in pairs] for c, pairs in data.class_files.items()}))
    return data_list, class_list


def _read_pairs(path: str) -> list[tuple[int, Pair]]:
    """(line number, (image, label)) for each non-empty line of an "image label" list."""
    _require_file(path, "split list")
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(f"{path} line {n}: expected 'image label', got {line.strip()!r}")
            pairs.append((n, (fields[0], fields[1])))
    return pairs


def _read_class_files(path: str) -> dict[int, list[Pair]]:
    """Parse a sub_class_file_list (a Python dict literal) without evaluating code."""
    _require_file(path, "class file list")
    with open(path) as f:
        text = f.read()
    try:
        raw = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise DataError(f"{path} is not a dict literal of class -> [(image, label), ...]: {error}") from None
    valid = isinstance(raw, dict) and all(
        isinstance(c, int) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs)
        for c, pairs in raw.items()
    )
    if not valid:
        raise DataError(f"{path} is not a dict of class -> [(image, label), ...]")
    return {c: [(str(i), str(l)) for i, l in pairs] for c, pairs in raw.items()}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {list(choices)}")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{what} not found: {path}")


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")


def _require_files(paths: list[str], source: str) -> None:
    """Raise for the first missing file, naming its folder when the folder itself is missing."""
    for path in dict.fromkeys(paths):
        if not os.path.isfile(path):
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):
                raise DataError(f"folder not found: {folder} (needed by {path}, listed in {source})")
            raise DataError(f"file not found: {path} (listed in {source})")
