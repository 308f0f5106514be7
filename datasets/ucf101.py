"""UCF-101: the MMAction2 split lists `{DATA.PATH_TO_DATA_DIR}/ucf101_{train,val}_split_1_videos.txt`
(`Class/video.avi label`, 0-based); mode "test" reads the val list (multi-view)."""
from datasets.video_dataset import VideoDataset


class UCF101(VideoDataset):
    dataset_name = "ucf101"

    @staticmethod
    def list_name(mode: str) -> str:
        return f"ucf101_{'train' if mode == 'train' else 'val'}_split_1_videos.txt"
