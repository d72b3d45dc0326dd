"""Few-shot evaluation data: PASCAL-5i / COCO-20i folds, official episodes, mIoU and FB-IoU."""

from fssam.data.datasets import FoldData, fold_classes, load_fold, scan_fold, write_fold
from fssam.data.episodes import Episode, EpisodeSpec, load_episode, resize_pair, sample_episodes
from fssam.data.metrics import IoUAccumulator, intersection_and_union

__all__ = [
    "FoldData",
    "fold_classes",
    "load_fold",
    "scan_fold",
    "write_fold",
    "Episode",
    "EpisodeSpec",
    "sample_episodes",
    "load_episode",
    "resize_pair",
    "IoUAccumulator",
    "intersection_and_union",
]
