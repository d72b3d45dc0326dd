"""fssam.data: readers, official episode draws and metrics on a tiny synthetic data set."""

import os
import random
import shutil

import cv2
import numpy as np
import pytest
import torch

from fssam.data import (
    IoUAccumulator,
    fold_classes,
    intersection_and_union,
    load_episode,
    load_fold,
    resize_pair,
    sample_episodes,
    scan_fold,
    write_fold,
)
from fssam.data.episodes import binarize_label
from fssam.errors import ConfigError, DataError, InputError

H, W = 64, 96  # every synthetic image
COLOR = (200, 10, 30)  # RGB of every synthetic image
SHARED_PASCAL_LISTS = "/work/shared/data/fssam-lists/pascal"


def make_label(objects):
    """objects: [(class, top, left, height, width)]; a 2-pixel ignore border all round.  # (H, W) uint8"""
    label = np.zeros((H, W), np.uint8)
    for c, top, left, height, width in objects:
        label[top : top + height, left : left + width] = c
    label[:2], label[-2:], label[:, :2], label[:, -2:] = 255, 255, 255, 255
    return label


BIG = (4, 4, 48, 48)  # 2304 pixels >= 2048: counts for its class
RIGHT = (4, 52, 48, 42)  # 2016 pixels < 2048: too small
SMALL = (50, 60, 10, 10)  # 100 pixels


def pascal_images():
    """name -> label for PASCAL-5i fold 0 (novel 1..5, base 6..20)."""
    images = {f"c{c}_{k}": make_label([(c, *BIG)]) for c in range(1, 6) for k in range(3)}
    images["multi"] = make_label([(2, *BIG), (3, 4, 52, 50, 42)])  # 2 and 3 both count (2100 px)
    images["right"] = make_label([(1, *BIG), (4, *RIGHT)])  # 4 too small for the lists
    images["mixed"] = make_label([(1, *BIG), (5, *SMALL)])  # 5 too small for the lists
    images["tiny"] = make_label([(4, *SMALL), (9, *BIG)])  # no novel class big enough
    images["base"] = make_label([(9, *BIG)])
    return images


def write_pair(image_path, label_path, label):
    os.makedirs(os.path.dirname(image_path), exist_ok=True)
    os.makedirs(os.path.dirname(label_path), exist_ok=True)
    image = np.empty((H, W, 3), np.uint8)
    image[:] = COLOR[::-1]  # cv2 writes BGR
    cv2.imwrite(image_path, image)
    cv2.imwrite(label_path, label)


@pytest.fixture(scope="session")
def pascal(tmp_path_factory):
    """Official layout: data/VOCdevkit2012/VOC2012/{JPEGImages,SegmentationClassAug}, lists/pascal/val.txt."""
    top = tmp_path_factory.mktemp("pascal")
    root = str(top / "data" / "VOCdevkit2012" / "VOC2012")
    lists = str(top / "lists" / "pascal")
    os.makedirs(lists)
    with open(os.path.join(lists, "val.txt"), "w") as f:
        for name, label in pascal_images().items():
            write_pair(f"{root}/JPEGImages/{name}.jpg", f"{root}/SegmentationClassAug/{name}.png", label)
            f.write(f"JPEGImages/{name}.jpg SegmentationClassAug/{name}.png\n")
    return root, lists


@pytest.fixture(scope="session")
def coco(tmp_path_factory):
    """Official layout: data/MSCOCO2014/{val2014,annotations/val2014}, lists written as the official ones."""
    top = tmp_path_factory.mktemp("coco")
    root = str(top / "data" / "MSCOCO2014")
    lists = str(top / "lists" / "coco")
    listed = "../data/MSCOCO2014"
    novel, _ = fold_classes("coco", 0, use_split_coco=True)  # 1, 5, 9, ...
    class_files = {c: [] for c in novel}
    lines = []
    for n, c in enumerate([1, 1, 1, 5, 5, 9, 9, 9]):
        name = f"COCO_val2014_{n:012d}"
        label = make_label([(c, *BIG), (2, *RIGHT)])
        write_pair(f"{root}/val2014/{name}.jpg", f"{root}/annotations/val2014/{name}.png", label)
        pair = (f"{listed}/val2014/{name}.jpg", f"{listed}/annotations/val2014/{name}.png")
        lines.append(" ".join(pair) + "\n")
        class_files[c].append(pair)
    os.makedirs(f"{lists}/fss_list/val")
    with open(f"{lists}/fss_list/val/data_list_0.txt", "w") as f:
        f.writelines(lines)
    with open(f"{lists}/fss_list/val/sub_class_file_list_0.txt", "w") as f:
        f.write(str(class_files))
    return root, lists


@pytest.fixture(scope="session")
def pascal_fold(pascal, tmp_path_factory):
    """Fold 0 scanned from val.txt, written as official lists and read back."""
    root, lists = pascal
    scanned = scan_fold("pascal", root, os.path.join(lists, "val.txt"), 0, progress=False)
    write_fold(scanned, lists)
    return load_fold("pascal", root, lists, 0)


# ---------------------------------------------------------------- readers


def test_fold_classes():
    assert fold_classes("pascal", 0) == ([1, 2, 3, 4, 5], list(range(6, 21)))
    assert fold_classes("pascal", 3)[0] == [16, 17, 18, 19, 20]
    assert fold_classes("coco", 1)[0] == list(range(21, 41))
    novel, base = fold_classes("coco", 2, use_split_coco=True)
    assert novel == [3 + 4 * i for i in range(20)] and len(base) == 60 and not set(novel) & set(base)
    with pytest.raises(ConfigError, match="fold 4"):
        fold_classes("pascal", 4)
    with pytest.raises(ConfigError, match="'voc'"):
        fold_classes("voc", 0)


def test_scan_filters_like_the_official_lists(pascal, pascal_fold):
    root, _ = pascal
    names = [os.path.basename(image)[:-4] for image, _ in pascal_fold.items]
    assert names == [f"c{c}_{k}" for c in range(1, 6) for k in range(3)] + ["multi", "right", "mixed"]
    files = {c: [os.path.basename(i)[:-4] for i, _ in pairs] for c, pairs in pascal_fold.class_files.items()}
    assert files == {
        1: ["c1_0", "c1_1", "c1_2", "right", "mixed"],
        2: ["c2_0", "c2_1", "c2_2", "multi"],
        3: ["c3_0", "c3_1", "c3_2", "multi"],
        4: ["c4_0", "c4_1", "c4_2"],
        5: ["c5_0", "c5_1", "c5_2"],
    }
    assert pascal_fold.classes == (1, 2, 3, 4, 5)
    assert pascal_fold.items[0] == (f"{root}/JPEGImages/c1_0.jpg", f"{root}/SegmentationClassAug/c1_0.png")


def test_written_lists_use_the_official_prefix(pascal, pascal_fold):
    _, lists = pascal
    with open(f"{lists}/fss_list/val/data_list_0.txt") as f:
        first = f.readline()
    prefix = "../data/VOCdevkit2012/VOC2012"
    assert first == f"{prefix}/JPEGImages/c1_0.jpg {prefix}/SegmentationClassAug/c1_0.png\n"


def test_scan_train_keeps_base_only_images(pascal):
    root, lists = pascal
    train = scan_fold("pascal", root, os.path.join(lists, "val.txt"), 0, mode="train", progress=False)
    assert [os.path.basename(i) for i, _ in train.items] == ["base.jpg"]
    assert train.classes == tuple(range(6, 21)) and len(train.class_files[9]) == 1


def test_coco_reader_maps_official_paths(coco):
    root, lists = coco
    data = load_fold("coco", root, lists, 0, use_split_coco=True)
    assert data.classes == tuple(range(1, 78, 4))
    assert len(data.items) == 8 and data.items[0][0] == f"{root}/val2014/COCO_val2014_000000000000.jpg"
    assert data.items[0][1] == f"{root}/annotations/val2014/COCO_val2014_000000000000.png"
    assert [len(data.class_files[c]) for c in (1, 5, 9, 13)] == [3, 2, 3, 0]
    with pytest.raises(DataError, match="sub_class_file_list_0.txt lists classes"):
        load_fold("coco", root, lists, 0, use_split_coco=False)


@pytest.mark.skipif(not os.path.isdir(SHARED_PASCAL_LISTS), reason="official PASCAL lists not present")
def test_official_pascal_lists_parse():
    sizes = []
    for fold in range(4):
        data = load_fold("pascal", "/data/VOC2012", SHARED_PASCAL_LISTS, fold, check_files=False)
        assert data.classes == tuple(range(5 * fold + 1, 5 * fold + 6))
        sizes.append(len(data.items))
    assert sizes == [364, 445, 592, 336]
    assert data.items[0][0].startswith("/data/VOC2012/JPEGImages/")


# ---------------------------------------------------------------- missing inputs


def copy_tree(pascal, tmp_path):
    root, lists = pascal
    shutil.copytree(os.path.dirname(os.path.dirname(root)), tmp_path / "data")
    shutil.copytree(lists, tmp_path / "lists")
    return str(tmp_path / "data/VOCdevkit2012/VOC2012"), str(tmp_path / "lists")


def test_missing_folders_and_lists_name_the_path(pascal, pascal_fold, tmp_path):
    root, lists = copy_tree(pascal, tmp_path)
    for bad_root, bad_lists, path in [
        (root + "x", lists, root + "x"),
        (root, lists + "x", lists + "x"),
    ]:
        with pytest.raises(DataError, match=path):
            load_fold("pascal", bad_root, bad_lists, 0)
    with pytest.raises(DataError, match=f"{lists}/fss_list/val/data_list_1.txt"):
        load_fold("pascal", root, lists, 1)
    os.remove(f"{lists}/fss_list/val/sub_class_file_list_0.txt")
    with pytest.raises(DataError, match=f"{lists}/fss_list/val/sub_class_file_list_0.txt"):
        load_fold("pascal", root, lists, 0)
    with pytest.raises(DataError, match=f"{lists}/fss_list/train"):
        load_fold("pascal", root, lists, 0, mode="train")
    with pytest.raises(DataError, match=f"{tmp_path}/nothing.txt"):
        scan_fold("pascal", root, str(tmp_path / "nothing.txt"), 0)


def test_missing_image_folder_names_it(pascal, pascal_fold, tmp_path):
    root, lists = copy_tree(pascal, tmp_path)
    shutil.rmtree(f"{root}/JPEGImages")
    with pytest.raises(DataError, match=f"folder not found: {root}/JPEGImages"):
        load_fold("pascal", root, lists, 0)
    assert len(load_fold("pascal", root, lists, 0, check_files=False).items) == 18


def test_foreign_list_prefix_is_rejected(pascal, pascal_fold, tmp_path):
    root, lists = copy_tree(pascal, tmp_path)
    path = f"{lists}/fss_list/val/data_list_0.txt"
    with open(path, "a") as f:
        f.write("/elsewhere/x.jpg data/x.png\n")
    with pytest.raises(DataError, match=f"{path} line 19: list path 'data/x.png'"):
        load_fold("pascal", root, lists, 0)


# ---------------------------------------------------------------- episodes


def as_tuples(specs):
    return [(s.query, s.class_id, s.supports) for s in specs]


def test_sampler_is_deterministic(pascal_fold):
    first = sample_episodes(pascal_fold, shot=1, episodes=50)
    assert as_tuples(first) == as_tuples(sample_episodes(pascal_fold, shot=1, episodes=50))
    assert as_tuples(first) != as_tuples(sample_episodes(pascal_fold, shot=1, episodes=50, seed=322))
    assert as_tuples(first) != as_tuples(sample_episodes(pascal_fold, shot=1, episodes=50, workers=0))
    assert as_tuples(first[:20]) == as_tuples(sample_episodes(pascal_fold, shot=1, episodes=20))


@pytest.mark.parametrize("shot", [1, 2])
def test_episodes_follow_the_official_rules(pascal_fold, shot):
    specs = sample_episodes(pascal_fold, shot=shot, episodes=54, workers=4)
    items = pascal_fold.items
    for n, spec in enumerate(specs):
        assert spec.index == n and spec.query == items[n % len(items)]  # queries walk the list, pass after pass
        present = set(np.unique(cv2.imread(spec.query[1], cv2.IMREAD_GRAYSCALE)).tolist())
        assert spec.class_id in present and spec.class_index == spec.class_id - 1
        assert len(spec.supports) == shot and len(set(spec.supports)) == shot
        assert all(s in pascal_fold.class_files[spec.class_id] and s != spec.query for s in spec.supports)
    mixed = [s.class_id for s in specs if s.query[0].endswith("mixed.jpg")]
    assert set(mixed) <= {1, 5}


class OfficialDraws(torch.utils.data.Dataset):
    """Test reference: the random draws of the official val __getitem__, on the global `random`."""

    def __init__(self, data, shot):
        self.data, self.shot = data, shot

    def __len__(self):
        return len(self.data.items)

    def __getitem__(self, i):
        query = self.data.items[i]
        classes = [c for c in np.unique(cv2.imread(query[1], cv2.IMREAD_GRAYSCALE)).tolist() if c in self.data.classes]
        class_id = classes[random.randint(1, len(classes)) - 1]
        files = self.data.class_files[class_id]
        chosen = []
        for _ in range(self.shot):
            index, pair = random.randint(1, len(files)) - 1, query
            while pair == query or index in chosen:
                index = random.randint(1, len(files)) - 1
                pair = files[index]
            chosen.append(index)
        return query, class_id, tuple(files[i] for i in reversed(chosen))


def first_item(batch):
    return batch[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_sampler_replays_a_seeded_dataloader(pascal_fold, workers):
    shot, episodes, seed = 2, 45, 321  # 45 episodes: three passes over 18 queries
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the official setup_seed(val_seed)
        random.seed(seed)
        loader = torch.utils.data.DataLoader(
            OfficialDraws(pascal_fold, shot), batch_size=1, shuffle=False, num_workers=workers, collate_fn=first_item
        )
        expected = []
        while len(expected) < episodes:
            for episode in loader:
                if len(expected) == episodes:
                    break
                expected.append(episode)
    random.setstate(python_state)
    assert as_tuples(sample_episodes(pascal_fold, shot, episodes, seed=seed, workers=workers)) == expected


def test_too_few_supports(pascal_fold):
    with pytest.raises(DataError, match="class .* fewer than 4 support images"):
        sample_episodes(pascal_fold, shot=4, episodes=20)
    with pytest.raises(ConfigError):
        sample_episodes(pascal_fold, shot=0)


def test_load_episode(pascal_fold):
    spec = next(s for s in sample_episodes(pascal_fold, shot=2, episodes=18) if s.query[0].endswith("multi.jpg"))
    episode = load_episode(spec)
    assert episode.query_image.shape == (H, W, 3) and episode.query_image.dtype == np.uint8
    assert np.abs(episode.query_image.astype(int) - COLOR).max() <= 4  # RGB, not BGR
    raw = make_label([(2, *BIG), (3, 4, 52, 50, 42)])
    expected = np.where(raw == 255, 255, raw == spec.class_id).astype(np.uint8)
    assert np.array_equal(episode.query_label, expected) and episode.ori_label is episode.query_label
    assert set(np.unique(episode.query_label).tolist()) == {0, 1, 255}
    assert len(episode.support_images) == len(episode.support_labels) == 2
    for image, label in zip(episode.support_images, episode.support_labels):
        assert image.shape == (H, W, 3) and label.shape == (H, W) and label.dtype == np.uint8
        assert (label[:2] == 255).all() and int((label == 1).sum()) >= 2048
        assert set(np.unique(label).tolist()) <= {0, 1, 255}


def test_load_episode_missing_image(pascal, pascal_fold, tmp_path):
    root, lists = copy_tree(pascal, tmp_path)
    data = load_fold("pascal", root, lists, 0)
    spec = sample_episodes(data, episodes=1)[0]
    os.remove(spec.supports[0][0])
    with pytest.raises(DataError, match=spec.supports[0][0]):
        load_episode(spec)


def test_binarize_and_resize():
    label = np.array([[0, 3, 255], [7, 3, 0]], np.uint8)
    assert binarize_label(label, 3).tolist() == [[0, 1, 255], [0, 1, 0]]
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    label = np.random.default_rng(1).choice(np.array([0, 1, 255], np.uint8), (30, 40))
    resized_image, resized_label = resize_pair(image, label, 16)
    assert resized_image.shape == (16, 16, 3) and resized_image.dtype == np.float32
    assert np.array_equal(resized_image, cv2.resize(image.astype(np.float32), (16, 16), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(resized_label, cv2.resize(label, (16, 16), interpolation=cv2.INTER_NEAREST))
    assert set(np.unique(resized_label).tolist()) <= {0, 1, 255}
    with pytest.raises(InputError, match=r"\(30, 40, 3\) and \(30, 41\)"):
        resize_pair(image, np.zeros((30, 41), np.uint8), 16)


# ---------------------------------------------------------------- metrics


def test_intersection_and_union_by_hand():
    label = np.array([[255, 255, 255, 255], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
    pred = np.array([[1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], np.uint8)
    # 12 valid pixels; foreground: label 4, pred 4, both 3 -> union 5; background: 8, 8, both 7 -> union 9
    intersection, union, area = intersection_and_union(pred, label)
    assert intersection.tolist() == [7, 3] and union.tolist() == [9, 5] and area.tolist() == [8, 4]
    intersection, union, _ = intersection_and_union(torch.from_numpy(pred).bool(), torch.from_numpy(label))
    assert intersection.tolist() == [7, 3] and union.tolist() == [9, 5]


def test_accumulator_by_hand():
    metric = IoUAccumulator([1, 2, 3, 4, 5])
    label = np.array([[255, 255, 255, 255], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
    pred = np.array([[1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]], np.uint8)
    metric.update(pred, label, 1)  # bg 7/9, fg 3/5
    metric.update(np.zeros((2, 2)), np.array([[1, 0], [0, 0]]), 1)  # bg 3/4, fg 0/1
    metric.update(np.array([[1, 1], [0, 1]]), np.array([[1, 1], [0, 255]]), 2)  # bg 1/1, fg 2/2
    result = metric.result()
    # class 1: 3 / (5 + 1) = 0.5; class 2: 2 / 2 = 1; classes 3..5 have no episode and count as 0
    assert result["class_iou"] == pytest.approx({1: 0.5, 2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0})
    assert result["miou"] == pytest.approx(1.5 / 5)
    # pooled: background 11 / 14, foreground 5 / 8
    assert result["fbiou"] == pytest.approx((11 / 14 + 5 / 8) / 2)
    assert result["piou"] == pytest.approx(5 / 8)
    assert result["episodes"] == 3 and result["class_episodes"] == {1: 2, 2: 1, 3: 0, 4: 0, 5: 0}


def test_metric_input_errors():
    metric = IoUAccumulator([1, 2])
    with pytest.raises(InputError, match=r"\(2, 2\) differs from label shape \(2, 3\)"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(InputError, match="class 7"):
        metric.update(np.zeros((2, 2)), np.zeros((2, 2)), 7)
    with pytest.raises(InputError, match="threshold"):
        metric.update(np.full((2, 2), 0.7), np.zeros((2, 2)), 1)
    with pytest.raises(InputError, match="label values"):
        metric.update(np.zeros((2, 2)), np.full((2, 2), 3), 1)
