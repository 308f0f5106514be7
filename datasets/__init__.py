"""Video datasets of svt: Kinetics-400, UCF-101, HMDB-51, SSv2, and the kNN index wrapper."""
from torch.utils.data import Dataset

from datasets.hmdb51 import HMDB51
from datasets.kinetics import Kinetics
from datasets.ssv2 import Ssv2
from datasets.transform import VideoDataAugmentationDINO, ssl_view_frames
from datasets.ucf101 import UCF101

_REGISTRY = {"kinetics400": Kinetics, "kinetics": Kinetics, "ucf101": UCF101, "hmdb51": HMDB51, "ssv2": Ssv2}
DATASETS = tuple(_REGISTRY)


def build_dataset(name: str, cfg, mode: str, **kwargs) -> Dataset:
    """Dataset `name` (one of DATASETS) in mode train/val/test; kwargs go to the class."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return _REGISTRY[name](cfg, mode, **kwargs)


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


__all__ = ["DATASETS", "build_dataset", "ReturnIndexDataset", "Kinetics", "UCF101", "HMDB51", "Ssv2",
           "VideoDataAugmentationDINO", "ssl_view_frames"]
