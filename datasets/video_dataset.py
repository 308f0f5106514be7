"""Shared list parsing, retry logic and clip sampling of the video datasets (Kinetics, UCF-101, HMDB-51).

Modes:
- "train" with an SSL augmentation: the SVT views (2 globals first), cut from one decode.
- "train" without: one linear-probe clip (random window, short side U(TRAIN_JITTER_SCALES), random
  crop TRAIN_CROP_SIZE, flip).
- "val": one clip per video from frame 0, short side TRAIN_JITTER_SCALES[0], centre crop.
- "test": NUM_ENSEMBLE_VIEWS temporal x NUM_SPATIAL_CROPS spatial clips per video; 3 crops are
  left/centre/right at short side TEST_CROP_SIZE, 1 crop is the "val" centre crop.
Evaluation clips use DATA.MEAN/STD; `slowfast=True` gives [NUM_FRAMES x TEST_CROP_SIZE,
8*NUM_FRAMES x LOCAL_CROP_SIZE] clips of the same window and crop.
A video that cannot be read is skipped and counted, never a crash in the middle of a run: in "train" it
is replaced by a random other one (logged once, counted in meta["skipped"] and `num_skipped`); in
"val"/"test" (where a substitute would carry the wrong label) each of its clips is a placeholder of zeros
of the clip shape with label SKIPPED_LABEL (-1) and meta {"skipped": 1}, logged once and counted in
`num_skipped` (per process: DataLoader workers count in their own copy). Consumers drop label -1 rows.
"""
import logging
import os

import torch
from torch.utils.data import Dataset

from datasets import decoder, transform

logger = logging.getLogger(__name__)

MODES = ("train", "val", "test")
_LOGGED_FAILURES: set = set()
SKIPPED_LABEL = -1


def check_paths_resolve(paths: list[str], list_file: str, prefix: str, probes: int = 16) -> None:
    """Fail early when none of a spread of `probes` list entries exists on disk: that is a wrong
    DATA.PATH_PREFIX (or a list written for another machine), not a few corrupt videos."""
    step = max(len(paths) // probes, 1)
    sample = paths[::step][:probes]
    if any(os.path.isfile(p) for p in sample):
        return
    raise FileNotFoundError(
        f"{list_file}: none of {len(sample)} checked videos exists, e.g. {sample[0]!r} "
        f"(DATA.PATH_PREFIX={prefix!r} joined to the list path). Set DATA.PATH_PREFIX to the folder the "
        f"list's paths are relative to (e.g. --opts DATA.PATH_PREFIX /data/k400/videos), or fix the list.")


def parse_list_file(list_file: str, separator: str = " ") -> list[tuple[str, int]]:
    """Lines `path<sep>label` (the separator, a comma or whitespace); empty lines are skipped.
    A malformed line raises ValueError naming the file, the line number and the line."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file} not found; check DATA.PATH_TO_DATA_DIR.")
    items = []
    with open(list_file) as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = None
            for sep in dict.fromkeys((separator, ",", None)):
                fields = line.rsplit(sep, 1) if sep else line.split()
                if len(fields) == 2 and fields[0].strip() and fields[1].strip().lstrip("-").isdigit():
                    parts = fields
                    break
            if parts is None:
                raise ValueError(f"{list_file}:{number}: malformed line {line!r}; expected "
                                 f"'<path><separator><integer label>' (separator {separator!r} or ',').")
            items.append((parts[0].strip(), int(parts[1])))
    if not items:
        raise ValueError(f"list file {list_file} has no entries.")
    return items


class VideoDataset(Dataset):
    """Base class: subclasses set `list_name(mode)`. `__getitem__` -> (frames, label, index, meta)."""

    dataset_name = "video"

    def __init__(self, cfg, mode: str, num_retries: int = 10, ssl_aug=None, slowfast: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        self.cfg, self.mode, self.num_retries = cfg, mode, num_retries
        self.ssl_aug = ssl_aug if (mode == "train" and not cfg.DATA.NO_RGB_AUG) else None
        self.slowfast = slowfast
        self.backend = cfg.DATA.DECODING_BACKEND
        self.num_clips_per_video = (cfg.TEST.NUM_ENSEMBLE_VIEWS * cfg.TEST.NUM_SPATIAL_CROPS
                                    if mode == "test" else 1)
        self.num_skipped = 0
        list_file = os.path.join(cfg.DATA.PATH_TO_DATA_DIR, self.list_name(mode))
        entries = parse_list_file(list_file, cfg.DATA.PATH_LABEL_SEPARATOR)
        self.video_paths = [os.path.join(cfg.DATA.PATH_PREFIX, p) for p, _ in entries]
        self.video_labels = [y for _, y in entries]
        self.num_videos = len(entries)
        self.labels = [y for y in self.video_labels for _ in range(self.num_clips_per_video)]
        self.list_file = list_file
        check_paths_resolve(self.video_paths, list_file, cfg.DATA.PATH_PREFIX)

    @staticmethod
    def list_name(mode: str) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.num_videos * self.num_clips_per_video

    # ----------------------------------------------------------------------------------- sampling
    def _clip_position(self, index: int) -> tuple[int, int, int]:
        """(temporal clip_idx, num temporal clips, spatial_idx) of a dataset index."""
        if self.mode == "train":
            return -1, 1, -1
        if self.mode == "val":
            return 0, 1, 1
        crops = self.cfg.TEST.NUM_SPATIAL_CROPS
        within = index % self.num_clips_per_video
        return within // crops, self.cfg.TEST.NUM_ENSEMBLE_VIEWS, (within % crops) if crops > 1 else 1

    def _load(self, index: int):
        path = self.video_paths[index // self.num_clips_per_video]
        data = self.cfg.DATA
        clip_idx, num_clips, spatial_idx = self._clip_position(index)
        with decoder.open_video(path, self.backend) as reader:
            clip_size = decoder.clip_size_frames(data.NUM_FRAMES, data.SAMPLING_RATE, data.TARGET_FPS, reader.fps)
            first, length = decoder.clip_window(reader.num_frames, clip_size, clip_idx, num_clips)
            if self.ssl_aug is not None:
                views = decoder.ssl_view_indices(length, self.ssl_aug.global_frames, self.ssl_aug.local_frames)
                return self.ssl_aug.from_union(*decoder.decode_union(reader, first, views))
            counts = [data.NUM_FRAMES] + ([8 * data.NUM_FRAMES] if self.slowfast else [])
            # The original re-bases the decoded window: linspace(0, clip_size - 1) clamped to the window.
            views = [decoder.temporal_indices(0, clip_size - 1, n, length) for n in counts]
            clips = decoder.decode_views(reader, first, views)
        return self._eval_spatial(clips, spatial_idx)

    def _eval_spatial(self, clips: list[torch.Tensor], spatial_idx: int):
        data = self.cfg.DATA
        if spatial_idx == -1:
            (min_scale, max_scale), crop = data.TRAIN_JITTER_SCALES, data.TRAIN_CROP_SIZE
        elif self.mode == "test" and self.cfg.TEST.NUM_SPATIAL_CROPS > 1:
            min_scale = max_scale = crop = data.TEST_CROP_SIZE
        else:
            min_scale = max_scale = data.TRAIN_JITTER_SCALES[0]
            crop = data.TEST_CROP_SIZE
        height, width = clips[0].shape[1:3]
        resized, offset, flip = transform.eval_crop_box(height, width, spatial_idx, min_scale, max_scale, crop,
                                                        data.RANDOM_FLIP)
        sizes = [crop, data.LOCAL_CROP_SIZE]
        out = [transform.apply_eval_crop(c, resized, offset, flip, crop, size, data.MEAN, data.STD)
               for c, size in zip(clips, sizes)]
        return out if self.slowfast else out[0]

    # ----------------------------------------------------------------------------------- retries
    def _replacement(self, index: int) -> int:
        """Another random training video (evaluation modes never substitute)."""
        return int(torch.randint(0, self.num_videos, ()))

    def placeholder_frames(self):
        """Zeros of the shape of a good evaluation sample: (3, NUM_FRAMES, TEST_CROP_SIZE, TEST_CROP_SIZE),
        or with `slowfast` that clip and (3, 8 * NUM_FRAMES, LOCAL_CROP_SIZE, LOCAL_CROP_SIZE)."""
        data = self.cfg.DATA
        clips = [torch.zeros(3, data.NUM_FRAMES, data.TEST_CROP_SIZE, data.TEST_CROP_SIZE)]
        if self.slowfast:
            clips.append(torch.zeros(3, 8 * data.NUM_FRAMES, data.LOCAL_CROP_SIZE, data.LOCAL_CROP_SIZE))
        return clips if self.slowfast else clips[0]

    def _log_failure(self, path: str, err: Exception, action: str) -> None:
        """Count the failure (train: every replaced sample; val/test: each video once) and log it once."""
        if self.mode == "train":
            self.num_skipped += 1
        else:
            failed = self.__dict__.setdefault("_failed_videos", set())
            if path not in failed:
                failed.add(path)
                self.num_skipped += 1
        if path not in _LOGGED_FAILURES:
            _LOGGED_FAILURES.add(path)
            logger.warning("skipping unreadable video %s (%s); %s", path, err, action)

    def __getitem__(self, index: int):
        tried = []
        for _ in range(self.num_retries + 1):
            try:
                frames = self._load(index)
            except decoder.DecodeError as err:
                path = self.video_paths[index // self.num_clips_per_video]
                if self.mode != "train":
                    # A substitute would be scored under the wrong label: return a placeholder that the
                    # evaluation drops (label -1) and count the video as skipped.
                    self._log_failure(path, err, f"{self.mode} clip left out of the evaluation (label -1)")
                    return self.placeholder_frames(), SKIPPED_LABEL, index, {"skipped": 1}
                tried.append(path)
                self._log_failure(path, err, "using another sample")
                index = self._replacement(index)
                continue
            label = self.video_labels[index // self.num_clips_per_video]
            return frames, label, index, {"skipped": len(tried)}
        missing = sum(not os.path.isfile(p) for p in tried)
        raise RuntimeError(f"{self.dataset_name}: {len(tried)} videos failed to decode in a row "
                           f"(num_retries={self.num_retries}, {missing} of them missing on disk); tried: "
                           f"{tried[:4]}{' ...' if len(tried) > 4 else ''}. Check DATA.PATH_PREFIX "
                           f"({self.cfg.DATA.PATH_PREFIX!r}) and run datasets/preprocessing/check_videos.py "
                           f"on {self.list_file}.")
