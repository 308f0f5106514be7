"""Video datasets of svt: one VideoDataset for Kinetics-400, UCF-101, HMDB-51 and SSv2 (their list layouts in
DATASET_LISTS), and the index wrapper of feature extraction."""
from torch.utils.data import Dataset

from datasets.transform import VideoDataAugmentationDINO, ssl_view_frames
from datasets.video_dataset import DATASET_LISTS, VideoDataset, dataset_lists

DATASETS = tuple(DATASET_LISTS)


def build_dataset(name: str, cfg, mode: str, **kwargs) -> VideoDataset:
    """Dataset `name` (one of DATASETS) in mode train/val/test; kwargs go to VideoDataset."""
    if name not in DATASET_LISTS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return VideoDataset(cfg, mode, name, **kwargs)


class ReturnIndexDataset(Dataset):
    """Wraps a dataset to return (frames, index) for kNN feature extraction; other attributes
    (labels, num_videos, ...) are read through from the wrapped dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        frames, _, _, _ = self.dataset[index]
        return frames, index

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


__all__ = ["DATASETS", "DATASET_LISTS", "build_dataset", "dataset_lists", "ReturnIndexDataset", "VideoDataset",
           "VideoDataAugmentationDINO", "ssl_view_frames"]
