"""HMDB-51: the MMAction2 split lists `{DATA.PATH_TO_DATA_DIR}/hmdb51_{train,val}_split_1_videos.txt`
(`class/video.avi label`, 0-based); mode "test" reads the val list (multi-view)."""
from datasets.video_dataset import VideoDataset


class HMDB51(VideoDataset):
    dataset_name = "hmdb51"

    @staticmethod
    def list_name(mode: str) -> str:
        return f"hmdb51_{'train' if mode == 'train' else 'val'}_split_1_videos.txt"
