"""Something-Something-v2 from extracted JPEG frames (TimeSformer's layout).

In DATA.PATH_TO_DATA_DIR:
- `something-something-v2-labels.json`: {template: "class id"};
- `something-something-v2-{train,validation}.json`: [{"id", "template", ...}] (val/test read validation);
- `{train,val}.csv`: frame lists, a header line starting `original_vido_id`, then lines
  `original_vido_id video_id frame_id path labels` (space separated), paths joined to DATA.PATH_PREFIX.
Frames are matched to the annotation by `original_vido_id` == json "id". A clip is NUM_FRAMES segments of
the frame list: a random frame per segment in train, the middle frame otherwise; spatial sampling and
normalisation as the video datasets.
"""
import json
import os
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from datasets import decoder
from datasets.video_dataset import MODES, VideoDataset


def load_frame_lists(csv_file: str, prefix: str) -> dict[str, list[str]]:
    """{video id: [frame paths in file order]} from a frame-list csv."""
    if not os.path.isfile(csv_file):
        raise FileNotFoundError(f"SSv2 frame list {csv_file} not found; check DATA.PATH_TO_DATA_DIR.")
    frames = defaultdict(list)
    with open(csv_file) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or (number == 1 and line.startswith("original_vido_id")):
                continue
            fields = line.split()
            if len(fields) != 5:
                raise ValueError(f"{csv_file}:{number}: malformed line {line!r}; expected 5 space-separated "
                                 f"columns 'original_vido_id video_id frame_id path labels'.")
            frames[fields[0]].append(os.path.join(prefix, fields[3]))
    return frames


def segment_indices(num_frames: int, num_segments: int, random: bool) -> torch.Tensor:
    """One index per segment of (num_frames - 1) / num_segments frames: random in train, middle otherwise."""
    seg = (num_frames - 1) / num_segments
    out = []
    for i in range(num_segments):
        start, end = int(round(seg * i)), int(round(seg * (i + 1)))
        out.append(int(torch.randint(start, end + 1, ())) if random else (start + end) // 2)
    return torch.tensor(out)


class Ssv2(VideoDataset):
    dataset_name = "ssv2"

    def __init__(self, cfg, mode: str, num_retries: int = 10, ssl_aug=None, slowfast: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if ssl_aug is not None:
            raise ValueError("Ssv2 has no SSL mode (SVT pretrains on Kinetics); pass ssl_aug=None.")
        self.cfg, self.mode, self.num_retries = cfg, mode, num_retries
        self.ssl_aug, self.slowfast, self.num_skipped = None, slowfast, 0
        self.num_clips_per_video = (cfg.TEST.NUM_ENSEMBLE_VIEWS * cfg.TEST.NUM_SPATIAL_CROPS
                                    if mode == "test" else 1)
        root = cfg.DATA.PATH_TO_DATA_DIR
        split = "train" if mode == "train" else "validation"
        label_file = os.path.join(root, "something-something-v2-labels.json")
        anno_file = os.path.join(root, f"something-something-v2-{split}.json")
        for f in (label_file, anno_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"SSv2 annotation {f} not found; check DATA.PATH_TO_DATA_DIR.")
        with open(label_file) as f:
            label_dict = json.load(f)
        with open(anno_file) as f:
            annotations = json.load(f)
        self.list_file = os.path.join(root, f"{'train' if mode == 'train' else 'val'}.csv")
        frame_lists = load_frame_lists(self.list_file, cfg.DATA.PATH_PREFIX)
        self.video_paths, self.video_labels, self.frame_paths = [], [], []
        for item in annotations:
            template = item["template"].replace("[", "").replace("]", "")
            if template not in label_dict:
                raise ValueError(f"{anno_file}: video {item['id']}: template {template!r} is not in {label_file}")
            vid = str(item["id"])
            if vid not in frame_lists:
                raise ValueError(f"{anno_file}: video {vid} has no frames in {self.list_file}")
            self.video_paths.append(vid)
            self.video_labels.append(int(label_dict[template]))
            self.frame_paths.append(frame_lists[vid])
        self.num_videos = len(self.video_paths)
        self.labels = [y for y in self.video_labels for _ in range(self.num_clips_per_video)]

    def _load(self, index: int):
        paths = self.frame_paths[index // self.num_clips_per_video]
        _, _, spatial_idx = self._clip_position(index)
        counts = [self.cfg.DATA.NUM_FRAMES] + ([8 * self.cfg.DATA.NUM_FRAMES] if self.slowfast else [])
        views = [segment_indices(len(paths), n, self.mode == "train") for n in counts]
        union, inverse = torch.unique(torch.cat(views), sorted=True, return_inverse=True)
        images = []
        for i in union.tolist():
            try:
                with Image.open(paths[i]) as image:
                    images.append(torch.from_numpy(np.array(image.convert("RGB"))))
            except OSError as err:
                raise decoder.DecodeError(f"{paths[i]}: cannot read the frame ({err})") from err
        frames = torch.stack(images)
        clips, pos = [], 0
        for v in views:
            clips.append(frames[inverse[pos:pos + len(v)]])
            pos += len(v)
        return self._eval_spatial(clips, spatial_idx)
