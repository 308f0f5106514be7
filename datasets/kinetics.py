"""Kinetics-400: `{DATA.PATH_TO_DATA_DIR}/{train,val,test}.csv`, lines `path label` (space or comma),
paths joined to DATA.PATH_PREFIX. Train mode with `ssl_aug` (and DATA.NO_RGB_AUG False) gives the SVT
views; otherwise the evaluation sampling of `datasets.video_dataset`."""
from datasets.video_dataset import VideoDataset


class Kinetics(VideoDataset):
    dataset_name = "kinetics400"

    @staticmethod
    def list_name(mode: str) -> str:
        return f"{mode}.csv"
