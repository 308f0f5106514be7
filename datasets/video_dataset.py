"""The video dataset of svt: list reading, clip sampling and retries for Kinetics-400, UCF-101, HMDB-51
and Something-Something-v2. What differs between them is data (DATASET_LISTS): the list file of each mode
and, for SSv2, lists of JPEG frame folders instead of videos.

List layouts in DATA.PATH_TO_DATA_DIR (paths joined to DATA.PATH_PREFIX):
- Kinetics-400: `{train,val,test}.csv`, lines `path label` (space, tab or comma; the label is split off the
  right, so a path may hold spaces).
- UCF-101 / HMDB-51: the MMAction2 split lists `{ucf101,hmdb51}_{train,val}_split_{N}_videos.txt`, N the official
  split DATA.SPLIT (1, as the original, 2 or 3; `Class/video.avi label`, 0-based); mode "test" reads the val list
  (multi-view).
- SSv2 (TimeSformer's layout): `something-something-v2-labels.json` ({template: "class id"}),
  `something-something-v2-{train,validation}.json` ([{"id", "template", ...}]; val/test read validation),
  and the frame lists `{train,val}.csv`: a header line starting `original_vido_id`, then lines
  `original_vido_id video_id frame_id path labels` (space separated). Frames are matched to the annotation
  by `original_vido_id` == json "id". A clip is NUM_FRAMES segments of the frame list: a random frame per
  segment in train, the middle frame otherwise; spatial sampling and normalisation as the videos. SSv2 has
  no SSL mode.

Modes:
- "train" with an SSL augmentation: the SVT views (2 globals first), cut from one decode; with
  DATA.DECODE_DEVICE cuda a plan of them instead (bytes + parameters; datasets/device_views.py).
- "train" without: one linear-probe clip (random window, short side U(TRAIN_JITTER_SCALES) (1 / U(1 / max,
  1 / min) with DATA.INV_UNIFORM_SAMPLE), random crop TRAIN_CROP_SIZE, flip).
- "val": one clip per video from frame 0, short side TRAIN_JITTER_SCALES[0], centre crop.
- "test": NUM_ENSEMBLE_VIEWS temporal x NUM_SPATIAL_CROPS spatial clips per video; 3 crops are
  left/centre/right at short side TEST_CROP_SIZE, 1 crop is the "val" centre crop (SSv2: at short side
  TEST_CROP_SIZE, as TimeSformer's ssv2.py).
Evaluation clips use DATA.MEAN/STD; `slowfast=True` gives [NUM_FRAMES x TEST_CROP_SIZE,
8*NUM_FRAMES x LOCAL_CROP_SIZE] clips of the same window and crop.
A video that cannot be read is skipped and counted, never a crash in the middle of a run: in "train" it
is replaced by a random other one (logged once, counted in meta["skipped"] and `num_skipped`; only a list that is
(almost) entirely unreadable exhausts the NUM_RETRIES replacements of a sample, an error naming check_videos); in
"val"/"test" (where a substitute would carry the wrong label) each of its clips is a placeholder of zeros
of the clip shape with label SKIPPED_LABEL (-1) and meta {"skipped": 1}, logged once and counted in
`num_skipped` (per process: DataLoader workers count in their own copy). Consumers drop label -1 rows.
A video whose random access cannot be trusted is decoded sequentially (datasets/decoder.py) and flagged in
`sequential_videos` (shared memory, so DataLoader workers' flags reach the main process);
`sequential_decodes(*datasets)` counts the flagged videos over all ranks; a training checkpoint keeps them
(`checkpoint_sequential_videos` / `restore_sequential_videos`).
"""
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from datasets import decoder, transform
from datasets.path_lists import PathList, PathLists, return_freed_heap
from utils import utils

logger = logging.getLogger(__name__)

MODES = ("train", "val", "test")
_LOGGED_FAILURES: set = set()
SKIPPED_LABEL = -1
# The official train/test splits of UCF-101 and HMDB-51, the values of DATA.SPLIT (utils/parser.py checks it).
SPLITS = (1, 2, 3)
SPLIT_DATASETS = ("ucf101", "hmdb51")
# The values of DATA.DECODE_DEVICE and DATA.AUGMENT_DEVICE (utils/parser.py checks them).
DECODE_DEVICES = ("cpu", "cuda")
# DATA.AUGMENT_DEVICE cuda ships each sample's decoded frames through shared and pinned memory: above this many
# bytes (a 256x340 union is ~18 MB; full-resolution 1080p, ~400 MB) a worker says once to resize the videos.
LARGE_PLAN_BYTES = 100 * 2 ** 20
# A training sample whose video cannot be read draws a random other one, up to NUM_RETRIES times; then the run
# stops. With a fraction q of the list unreadable, all NUM_RETRIES + 1 draws fail with probability q^501: 1e-23
# at q = 0.9 (a list 10 % readable), 7e-12 at q = 0.95 (2e-4 over 100 Kinetics epochs of 240k samples), while an
# entirely unreadable list stops at its first sample, after NUM_RETRIES + 1 failed draws whose cost depends on the
# failure (measured on a shared 2-core machine, every backend alike): ~0.01 ms a missing file, ~0.1 ms a truncated
# mp4, but 40-90 ms a present file no demuxer recognises (1 MB of random bytes: FFmpeg probes it), i.e. 20-45 s per
# sample in each loader worker before the error (longer on a network file system), with a warning line for each
# distinct path. The draws are seeded per sample (datasets/seeding.py), so a rerun replays the same chain: a limit
# that a mostly readable list could reach would stop every resume at the same sample. The original retries 10
# times, then raises.
NUM_RETRIES = 500
# An epoch whose training draws were replaced more often than this prints a warning naming check_videos.
REPLACED_WARNING = 0.05


class FrameError(decoder.DecodeError):
    """A JPEG frame of a frame-folder video (SSv2) that cannot be read; `path` names it."""

    def __init__(self, path: str, err: Exception):
        super().__init__(f"{path}: cannot read the frame ({err})")
        self.path = path


@dataclass(frozen=True)
class DatasetLists:
    """The list file of each mode (in DATA.PATH_TO_DATA_DIR), whether the lists name videos or folders of JPEG
    frames (SSv2) and the official split they are of (UCF-101 / HMDB-51; None: one list per mode)."""

    name: str
    train: str
    val: str
    test: str
    frame_folders: bool = False
    split: int | None = None


def _split_lists(prefix: str, split: int) -> DatasetLists:
    """The MMAction2 lists of split `split` of UCF-101 / HMDB-51 (mode "test" reads the val list)."""
    val = f"{prefix}_val_split_{split}_videos.txt"
    return DatasetLists(prefix, f"{prefix}_train_split_{split}_videos.txt", val, val, split=split)


# UCF-101 / HMDB-51 at split 1, the original's; dataset_lists gives the split of DATA.SPLIT.
_KINETICS = DatasetLists("kinetics400", "train.csv", "val.csv", "test.csv")
DATASET_LISTS = {
    "kinetics400": _KINETICS,
    "kinetics": _KINETICS,
    "ucf101": _split_lists("ucf101", 1),
    "hmdb51": _split_lists("hmdb51", 1),
    "ssv2": DatasetLists("ssv2", "train.csv", "val.csv", "val.csv", frame_folders=True),
}


def dataset_lists(name: str, split: int) -> DatasetLists:
    """The lists of dataset `name` (a key of DATASET_LISTS); `split` (DATA.SPLIT) picks the official split of
    UCF-101 / HMDB-51, and the other datasets, one list per mode, leave it 1 (check_split)."""
    return _split_lists(name, split) if name in SPLIT_DATASETS else DATASET_LISTS[name]


def check_split(name: str, split: int) -> None:
    """DATA.SPLIT `split` other than 1 for dataset `name` without official splits: an error."""
    if split != 1 and name not in SPLIT_DATASETS:
        raise ValueError(f"DATA.SPLIT {split} applies only to {'/'.join(SPLIT_DATASETS)} (their official splits "
                         f"{', '.join(map(str, SPLITS))}); {name} has one list per mode: leave DATA.SPLIT 1.")


def check_paths_resolve(paths: list[str], list_file: str, prefix: str, probes: int = 16,
                        frames: bool = False) -> None:
    """Fail early when none of a spread of `probes` list entries exists on disk: that is a wrong
    DATA.PATH_PREFIX (or a list written for another machine), not a few corrupt videos. `frames`: the paths are
    the first frames of frame-folder videos (SSv2), joined to the frame list's path column."""
    step = max(len(paths) // probes, 1)
    sample = paths[::step][:probes]
    if any(os.path.isfile(p) for p in sample):
        return
    stray_f = ""
    if prefix.startswith("f") and any(p.startswith(prefix) and os.path.isfile(prefix[1:] + p[len(prefix):])
                                      for p in sample):
        stray_f = (f" The videos are under {prefix[1:]!r}: drop the leading 'f' of DATA.PATH_PREFIX (the original's"
                   f" eval scripts pass f\"${{DATA_PATH}}/videos\", a Python f-string prefix that bash keeps).")
    if frames:
        raise FileNotFoundError(
            f"{list_file}: none of the first frames of {len(sample)} checked videos exists, e.g. {sample[0]!r} "
            f"(DATA.PATH_PREFIX={prefix!r} joined to the frame list's path column). Set DATA.PATH_PREFIX to the "
            f"folder of the extracted JPEG frames, which holds a folder per video id (e.g. --opts DATA.PATH_PREFIX "
            f"/data/ssv2/frames; the scripts' VIDEO_DIR), or extract the frames (datasets/DATASET.md)." + stray_f)
    raise FileNotFoundError(
        f"{list_file}: none of {len(sample)} checked videos exists, e.g. {sample[0]!r} "
        f"(DATA.PATH_PREFIX={prefix!r} joined to the list path). Set DATA.PATH_PREFIX to the folder the "
        f"list's paths are relative to (e.g. --opts DATA.PATH_PREFIX /data/k400/videos), or fix the list." + stray_f)


def read_video_list(list_file: str, prefix: str, separator: str = " ") -> list[dict]:
    """The lines of a `path<sep>label` list as [{"path", "label"}], each path joined to `prefix` (DATA.PATH_PREFIX);
    a prefix under which none of the checked paths is a file is an error (check_paths_resolve). Opens no video."""
    records = [{"path": os.path.join(prefix, p), "label": y} for p, y in parse_list_file(list_file, separator)]
    check_paths_resolve([r["path"] for r in records], list_file, prefix)
    return records


_SEPARATORS = (",", None)  # tried after DATA.PATH_LABEL_SEPARATOR: a comma, then whitespace


def _fields(line: str, separator: str, label_ok=bool) -> tuple[str, str] | None:
    """(path, label) of a list line, the label split off the right (a path may hold spaces, e.g. Kinetics' 'air
    drumming/') at the first of `separator`, a comma or whitespace that leaves a non-empty path and a label
    for which `label_ok` holds; None if none does."""
    for sep in dict.fromkeys((separator,) + _SEPARATORS):
        fields = [f.strip() for f in line.rsplit(sep, 1)]
        if len(fields) == 2 and fields[0] and label_ok(fields[1]):
            return fields[0], fields[1]
    return None


def _split_line(line: str, separator: str) -> tuple[str, int] | None:
    """(path, integer label) of a `path<sep>label` line; None when the line is not one."""
    fields = _fields(line, separator, lambda label: label.lstrip("-").isdigit())
    return None if fields is None else (fields[0], int(fields[1]))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _malformed_hint(line: str, number: int, separator: str, next_parses: bool) -> str:
    """The likely cause of a malformed list line, and the fix. `next_parses`: the line after it is a good one
    (a first line is then called a header only when it looks like one)."""
    words = line.replace(",", " ").split()
    if "youtube_id" in line:
        return ("This is the Kinetics annotation csv (label,youtube_id,time_start,time_end,split): it names "
                "YouTube clips, not files. Write one line per downloaded video, '<class>/<file>.mp4 <label>', "
                "labels indexing the sorted class names (datasets/DATASET.md).")
    if line.startswith("original_vido_id") or (len(words) == 5 and all(w.isdigit() for w in words[:3])
                                               and words[3].lower().endswith((".jpg", ".jpeg", ".png"))):
        return ("This is an SSv2 frame list (original_vido_id video_id frame_id path labels): it names JPEG frames "
                "and holds no labels. SSv2 is evaluated with --dataset ssv2 of eval_linear.py, eval_knn.py or "
                "eval_finetune.py, which read it with the annotation JSONs (datasets/DATASET.md); train_ssl.py "
                "pretrains on a video list ('<path> <label>', e.g. Kinetics-400's train.csv).")
    odd = re.fullmatch(r"(.*[^\s;|:])\s*([;|:])\s*-?\d+", line)
    if odd:
        sep = odd.group(2)
        return (f"Its fields are separated by {sep!r}: lists take DATA.PATH_LABEL_SEPARATOR ({separator!r}), a "
                f"comma or whitespace. Pass --opts DATA.PATH_LABEL_SEPARATOR '{sep}', or rewrite the list (e.g. "
                f"sed -i 's/{sep}/ /' <list>).")
    if len(words) == 1:
        if "/" in line or "\\" in line or os.path.splitext(line)[1] and not _is_number(line):
            return ("The line is a path with no label: every line is '<path> <label>', the label the class index "
                    "(0-based: the position of the video's class in the sorted class names, datasets/DATASET.md).")
        return "The line has one field: every line is '<path> <label>' (datasets/DATASET.md)."
    looks_like_header = not any(_is_number(w) or os.path.splitext(w)[1] for w in words)
    if number == 1 and looks_like_header and next_parses:
        return "Lists have no header line: if this is one, delete it (e.g. sed -i 1d <list>)."
    fields = _fields(line, separator)
    if fields is None:  # every split leaves an empty field, e.g. a trailing comma ('a.mp4,0,')
        return ("The line ends with a separator or has an empty field: every line is '<path> <label>', nothing "
                "after the label (datasets/DATASET.md).")
    label = fields[1]
    if _is_number(label):
        return (f"The label {label!r} is not an integer: labels are class indices 0, 1, ..., written as "
                "integers.")
    if any(w.lstrip("-").isdigit() for w in words[1:-1]):
        return (f"The line has {len(words)} fields: lists have two, '<path> <label>', the integer label last "
                "(datasets/DATASET.md).")
    return (f"The label {label!r} is not an integer: class names must be mapped to 0-based class ids, the position "
            "of each class in the sorted class names (datasets/DATASET.md).")


def missing_list_hint(list_file: str) -> str:
    """Why `list_file` is not a file: a folder given for the list, a list given for its folder, or a folder
    holding other lists (another --dataset)."""
    folder = os.path.dirname(list_file) or "."
    if os.path.isdir(list_file):
        return f"{list_file} is a folder: pass the list file in it, not the folder."
    if os.path.isfile(folder):
        return (f"{folder} is a file, and the setting names the folder that holds the lists: "
                f"use {os.path.dirname(folder) or '.'}")
    if not os.path.isdir(folder):
        return f"The folder {folder} does not exist."
    lists = sorted(f for f in os.listdir(folder) if f.endswith((".csv", ".txt", ".json")))
    if os.path.basename(list_file) == "test.csv" and "val.csv" in lists:
        return (f"{folder} holds val.csv but no test.csv: Kinetics-400 has no labelled test split, so test on val "
                f"as TimeSformer does: cp {shlex.quote(os.path.join(folder, 'val.csv'))} "
                f"{shlex.quote(list_file)} (datasets/DATASET.md).")
    split = re.fullmatch(r"(ucf101|hmdb51)_(train|val)_split_(\d)_videos\.txt", os.path.basename(list_file))
    if split:
        hint = _split_list_hint(folder, lists, *split.groups())
        if hint:
            return hint
    return (f"{folder} holds {', '.join(lists)} (lists of another --dataset?)." if lists
            else f"{folder} holds no list files (.csv/.txt).")


def _split_list_hint(folder: str, lists: list[str], dataset: str, mode: str, split: str) -> str | None:
    """Why a folder lacks `{dataset}_{mode}_split_{split}_videos.txt` when it holds MMAction2 lists of that dataset:
    its frame lists (rawframes) instead of its video lists, or the video lists of other splits only. None
    otherwise."""
    own = [f for f in lists if re.fullmatch(rf"{dataset}_{mode}_split_\d_(videos|rawframes)\.txt", f)]
    rawframes = f"{dataset}_{mode}_split_{split}_rawframes.txt"
    splits = sorted({f.split("_")[3] for f in own if f.endswith("_videos.txt")})  # {dataset}_{mode}_split_N_...
    if rawframes in own or own and not splits:
        return (f"{folder} holds {rawframes if rawframes in own else ', '.join(own)}: MMAction2's list of extracted "
                f"frames ('folder num_frames label'). svt reads the videos, listed by MMAction2's video lists (step 4 "
                f"of its {dataset} preparation, tools/data/{dataset}/generate_videos_filelist.sh; no frame "
                f"extraction), 'Class/video.avi label' (datasets/DATASET.md).")
    if splits:
        return (f"{folder} holds {', '.join(own)}: the {mode} list of split{'s' * (len(splits) > 1)} "
                f"{' and '.join(splits)}, not of split {split}, which DATA.SPLIT names (1 by default, as in the "
                f"original). To evaluate split {splits[0]}, pass --opts DATA.SPLIT {splits[0]}; to evaluate split "
                f"{split}, add its lists to the folder.")
    return None


def parse_list_file(list_file: str, separator: str = " ") -> list[tuple[str, int]]:
    """Lines `path<sep>label` (the separator, a comma or whitespace); empty lines and a UTF-8 byte-order mark
    are skipped. Labels are class indices (integers >= 0). A malformed line or a negative label raises
    ValueError naming the file, the line number and the line."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file} not found; check DATA.PATH_TO_DATA_DIR. "
                                + missing_list_hint(list_file))
    with open(list_file, encoding="utf-8-sig") as f:
        lines = [(number, raw.strip()) for number, raw in enumerate(f, start=1) if raw.strip()]
    items = []
    for i, (number, line) in enumerate(lines):
        parts = _split_line(line, separator)
        if parts is None:
            next_parses = i + 1 < len(lines) and _split_line(lines[i + 1][1], separator) is not None
            raise ValueError(f"{list_file}:{number}: malformed line {line!r}; expected "
                             f"'<path><separator><integer label>' (separator {separator!r}, a comma or whitespace). "
                             + _malformed_hint(line, number, separator, next_parses))
        if parts[1] < 0:
            raise ValueError(f"{list_file}:{number}: label {parts[1]} in {line!r} is negative; labels are class "
                             "indices 0, 1, ... (the first class is 0).")
        items.append(parts)
    if not items:
        raise ValueError(f"list file {list_file} has no entries.")
    return items


def load_frame_lists(csv_file: str, prefix: str) -> dict[str, PathList]:
    """{video id: its frame paths in file order} from a frame-list csv."""
    if not os.path.isfile(csv_file):
        raise FileNotFoundError(f"SSv2 frame list {csv_file} not found; check DATA.PATH_TO_DATA_DIR.")
    # os.path.join(prefix, path) is head + path for a relative path: SSv2's 7.6M train frames read in 6 s, not 12
    head = os.path.join(prefix, "")
    # A video's paths are a list while its lines are read, then a PathList: SSv2's train list (7.6M frames) never
    # holds a str per frame, which the dataset's one joined text would double (a build peak ~600 MB higher).
    frames, video, paths = {}, None, []
    with open(csv_file, encoding="utf-8-sig") as f:
        for number, raw in enumerate(f, start=1):
            fields = raw.split()
            if not fields or (number == 1 and fields[0].startswith("original_vido_id")):
                continue
            if len(fields) != 5:
                raise ValueError(f"{csv_file}:{number}: malformed line {raw.strip()!r}; expected 5 space-separated "
                                 f"columns 'original_vido_id video_id frame_id path labels'.")
            if fields[0] != video:
                if video is not None:
                    frames[video] = PathList(paths)
                video = fields[0]
                paths = list(frames.get(video, ()))  # a video whose lines resume after another's continues
            path = fields[3]
            paths.append(path if os.path.isabs(path) else head + path)
    if video is not None:
        frames[video] = PathList(paths)
    return frames


def ssv2_annotation_files(root: str, mode: str) -> dict[str, str]:
    """The SSv2 annotation JSONs in `root` that the labels of `mode` come from, by name: the class ids of the
    templates ("labels json") and the split's videos with their templates ("train json"; val and test read the
    "validation json")."""
    split = "train" if mode == "train" else "validation"
    return {"labels json": os.path.join(root, "something-something-v2-labels.json"),
            f"{split} json": os.path.join(root, f"something-something-v2-{split}.json")}


def load_ssv2_list(root: str, mode: str, frame_list: str, prefix: str) -> list[dict]:
    """[{"path": video id, "label", "frames": JPEG paths}] of the SSv2 annotation of `mode` (val and test
    read validation), each video's frames taken from the frame-list csv `frame_list`."""
    label_file, anno_file = ssv2_annotation_files(root, mode).values()
    for f in (label_file, anno_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"SSv2 annotation {f} not found; check DATA.PATH_TO_DATA_DIR.")
    with open(label_file, encoding="utf-8-sig") as f:
        label_dict = json.load(f)
    with open(anno_file, encoding="utf-8-sig") as f:
        annotations = json.load(f)
    frame_lists = load_frame_lists(frame_list, prefix)
    records = []
    for item in annotations:
        if "template" not in item:
            raise ValueError(f"{anno_file}: video {item.get('id')!r} has no 'template' (its label): this is the shape "
                             "of the SSv2 test JSON (ids only, no labels), which cannot be scored. Put the labelled "
                             f"{os.path.basename(anno_file)} of the dataset there.")
        template = item["template"].replace("[", "").replace("]", "")
        if template not in label_dict:
            raise ValueError(f"{anno_file}: video {item['id']}: template {template!r} is not in {label_file}")
        label = int(label_dict[template])
        if label < 0:
            raise ValueError(f"{label_file}: class {template!r} has the negative id {label}; ids are 0, 1, ...")
        vid = str(item["id"])
        records.append({"path": vid, "label": label, "frames": frame_lists.get(vid)})
    if not records:
        raise ValueError(f"{anno_file} lists no videos: the {mode} split of SSv2 is something-something-v2-"
                         f"{'train' if mode == 'train' else 'validation'}.json from the official download.")
    missing = [r["path"] for r in records if r["frames"] is None]
    if missing:
        raise ValueError(f"{anno_file}: {len(missing)} of its {len(records)} videos have no frames in {frame_list}, "
                         f"e.g. {missing[:5]}. Use the frame list of this split (train.csv for the train JSON, "
                         "val.csv for validation), extract and list the frames of these videos (datasets/DATASET.md), "
                         "or, to use a subset, remove them from the JSON.")
    check_paths_resolve([r["frames"][0] for r in records], frame_list, prefix, frames=True)
    return records


def segment_indices(num_frames: int, num_segments: int, random: bool) -> torch.Tensor:
    """One index per segment of (num_frames - 1) / num_segments frames: random in train, middle otherwise."""
    seg = (num_frames - 1) / num_segments
    out = []
    for i in range(num_segments):
        start, end = int(round(seg * i)), int(round(seg * (i + 1)))
        out.append(int(torch.randint(start, end + 1, ())) if random else (start + end) // 2)
    return torch.tensor(out)


def _flagged(dataset):
    """The dataset holding the `sequential_videos` flags: `dataset` or the one it wraps (None if none has)."""
    while not hasattr(dataset, "sequential_videos") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset if hasattr(dataset, "sequential_videos") else None


def _flags(dataset) -> torch.Tensor:
    """The `sequential_videos` flags of a dataset, or of the dataset it wraps (empty if it has none)."""
    flagged = _flagged(dataset)
    return torch.zeros(0, dtype=torch.int32) if flagged is None else flagged.sequential_videos


def mark_sequential(dataset, index: int) -> None:
    """Flag the video of sample `index` of `dataset` (or of the dataset it wraps) as decoded sequentially (the
    device path's main process does so for the files it falls back on)."""
    flagged = _flagged(dataset)
    if flagged is not None:
        flagged.sequential_videos[index // flagged.num_clips_per_video] = 1


def sequential_video_flags(*datasets) -> torch.Tensor:
    """One int32 flag per video of these datasets (concatenated): 1 when some rank decoded it sequentially.
    A collective when distributed: every rank calls it."""
    flags = torch.cat([_flags(d) for d in datasets])
    if utils.is_dist_avail_and_initialized():
        flags = flags.to(utils.comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.cpu()


def sequential_decodes(*datasets) -> int:
    """Videos of these datasets (or of the datasets they wrap) decoded sequentially so far, over all ranks; a
    file in two of them (the val and test splits of one list) counts once."""
    flags = sequential_video_flags(*datasets).tolist()
    paths = [path for d in datasets for path in getattr(_flagged(d), "video_paths", [])]
    return len({path for path, flag in zip(paths, flags) if flag})


def checkpoint_sequential_videos(dataset) -> dict:
    """What a training checkpoint keeps of the flags (so that a resumed epoch still counts the videos decoded
    sequentially before the interruption): the list length and the flagged indices. A collective."""
    flags = sequential_video_flags(dataset)
    return {"num_videos": len(flags), "indices": flags.nonzero().flatten().tolist()}


def restore_sequential_videos(dataset, saved: dict | None) -> bool:
    """Set the flags saved by `checkpoint_sequential_videos`; False (nothing set) when the list has another
    length (the run was resumed on another list)."""
    flags = _flags(dataset)
    if not saved or saved["num_videos"] != len(flags):
        return False
    flags[saved["indices"]] = 1
    return True


class VideoDataset(Dataset):
    """Dataset `dataset` (a key of DATASET_LISTS) in mode train/val/test, read from the list of `list_mode`
    (default: the mode's own; the linear probe's multi-view test reads the val list, as the original's).
    `__getitem__` -> (frames, label, index, meta). `load_data_list` reads the list; override it for another
    list format."""

    def __init__(self, cfg, mode: str, dataset: str = "kinetics400", num_retries: int = NUM_RETRIES, ssl_aug=None,
                 slowfast: bool = False, list_mode: str | None = None):
        list_mode = list_mode or mode
        if mode not in MODES or list_mode not in MODES:
            raise ValueError(f"mode {mode!r} / list_mode {list_mode!r}: each is one of {MODES}")
        self.lists = dataset_lists(dataset, cfg.DATA.SPLIT)
        self.dataset_name = self.lists.name
        if ssl_aug is not None and self.lists.frame_folders:
            raise ValueError(f"{self.dataset_name} has no SSL mode (SVT pretrains on Kinetics); pass ssl_aug=None.")
        self.cfg, self.mode, self.num_retries = cfg, mode, num_retries
        self.ssl_aug = ssl_aug if mode == "train" else None
        self.slowfast = slowfast
        # DECODE_DEVICE cuda: training samples are plans that the main process decodes and augments on the GPU;
        # AUGMENT_DEVICE cuda (DECODE_DEVICE cpu): plans whose frames the worker decoded, augmented on the GPU.
        self.ssl_plans = self.ssl_aug is not None and "cuda" in (cfg.DATA.DECODE_DEVICE, cfg.DATA.AUGMENT_DEVICE)
        self.decode_plans = self.ssl_plans and cfg.DATA.DECODE_DEVICE == "cpu"
        self.backend = decoder.resolve_backend(cfg.DATA.DECODING_BACKEND)
        self.num_clips_per_video = (cfg.TEST.NUM_ENSEMBLE_VIEWS * cfg.TEST.NUM_SPATIAL_CROPS
                                    if mode == "test" else 1)
        self.num_skipped = 0
        self.num_draws = 0  # "train": the videos drawn by this process (DataLoader worker) so far, failed ones included
        self.list_file = os.path.join(cfg.DATA.PATH_TO_DATA_DIR, getattr(self.lists, list_mode))
        # the files the labels come from besides the list (SSv2's frame lists have none): a run record holds them
        self.annotation_files = (ssv2_annotation_files(cfg.DATA.PATH_TO_DATA_DIR, mode) if self.lists.frame_folders
                                 else {})
        records = self.load_data_list()
        # Paths as PathList / PathLists, not lists of str: DataLoader workers reading them copy no memory pages
        self.video_paths = PathList(r["path"] for r in records)
        # One int object per class, not per video: a worker reading a label writes its reference count, and a
        # label > 256 parsed per line is an object of its own (K400's 240k: ~2.6 MB of pages each worker copies).
        classes = {}
        self.video_labels = [classes.setdefault(r["label"], r["label"]) for r in records]
        self.frame_paths = PathLists(r["frames"] for r in records) if self.lists.frame_folders else None
        self.num_videos = len(records)
        self.sequential_videos = torch.zeros(self.num_videos, dtype=torch.int32).share_memory_()
        self.decode_slots = None  # a WatchedLoader's (datasets/loader_watchdog.py): what its workers read
        self.labels = [y for y in self.video_labels for _ in range(self.num_clips_per_video)]
        if self.lists.frame_folders:
            del records
            return_freed_heap()

    def load_data_list(self) -> list[dict]:
        """The samples of `self.list_file`: [{"path", "label"}], plus "frames" (the JPEG paths) for frame
        folders. Video paths are joined to DATA.PATH_PREFIX and checked to resolve."""
        data = self.cfg.DATA
        if self.lists.frame_folders:
            return load_ssv2_list(data.PATH_TO_DATA_DIR, self.mode, self.list_file, data.PATH_PREFIX)
        return read_video_list(self.list_file, data.PATH_PREFIX, data.PATH_LABEL_SEPARATOR)

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
        if self.frame_paths is not None:
            return self._load_frames(index)
        path = self.video_paths[index // self.num_clips_per_video]
        data = self.cfg.DATA
        clip_idx, num_clips, spatial_idx = self._clip_position(index)
        if self.ssl_plans and not self.decode_plans:
            return self._ssl_plan(index // self.num_clips_per_video)
        with decoder.open_video(path, self.backend) as reader:
            clip_size = decoder.clip_size_frames(data.NUM_FRAMES, data.SAMPLING_RATE, data.TARGET_FPS, reader.fps)
            first, length = decoder.clip_window(reader.num_frames, clip_size, clip_idx, num_clips)
            if self.ssl_aug is not None:
                views = decoder.ssl_view_indices(length, self.ssl_aug.global_frames, self.ssl_aug.local_frames)
                union = decoder.decode_union(reader, first, views)
            else:
                counts = [data.NUM_FRAMES] + ([8 * data.NUM_FRAMES] if self.slowfast else [])
                # The original re-bases the decoded window: linspace(0, clip_size - 1) clamped to the window.
                views = [decoder.temporal_indices(0, clip_size - 1, n, length) for n in counts]
                clips = decoder.decode_views(reader, first, views)
            if reader.sequential:
                mark_sequential(self, index)
        if self.decode_plans:
            return self._decoded_plan(path, *union)
        if self.ssl_aug is not None:
            return self.ssl_aug.from_union(*union)
        return self._eval_spatial(clips, spatial_idx)

    def _decoded_plan(self, path: str, frames: torch.Tensor, positions: list[torch.Tensor]) -> dict:
        """A plan (see `_ssl_plan`) of the SSL views of frames decoded here (DATA.AUGMENT_DEVICE cuda): the union
        of the views' frames (K, H, W, 3), and the views' parameters drawn as `ssl_aug.from_union` draws them,
        after the window and frame indices, so the views are the CPU path's for the same seed."""
        params = self.ssl_aug.draw_params(frames.shape[1], frames.shape[2])
        if frames.numel() > LARGE_PLAN_BYTES and "large plan" not in _LOGGED_FAILURES:
            _LOGGED_FAILURES.add("large plan")
            logger.warning("DATA.AUGMENT_DEVICE cuda: %s's %d decoded %dx%d frames take %d MB per sample through "
                           "shared and pinned memory; resize the videos to short side 256 first (python -m "
                           "datasets.preprocessing.resize_videos), as the original's Kinetics is.", path,
                           len(frames), frames.shape[2], frames.shape[1], frames.numel() // 2 ** 20)
        return {"path": path, "frames": torch.arange(len(frames)), "positions": positions, "info": None,
                "params": torch.tensor([p.as_row() for p in params], dtype=torch.float64),
                "video": None, "decoded": frames}

    def _ssl_plan(self, video: int) -> dict:
        """The SSL views of a video as a plan for the device (datasets/device_views.py): its bytes (or, for a
        file whose random access cannot be trusted, its union of frames decoded here), the union of the views'
        frame indices, the positions of each view in it and the views' parameters, drawn in the CPU path's
        order (window, frame indices, then per view the spatial parameters)."""
        data, path = self.cfg.DATA, self.video_paths[video]
        info = decoder.probe(path)  # reads the packets, decodes the first frame: counts, fps, upright size
        clip_size = decoder.clip_size_frames(data.NUM_FRAMES, data.SAMPLING_RATE, data.TARGET_FPS, info.fps)
        first, length = decoder.clip_window(info.num_frames, clip_size, -1, 1)
        views = decoder.ssl_view_indices(length, self.ssl_aug.global_frames, self.ssl_aug.local_frames)
        frames, positions = decoder.union_positions(first, views)
        params = self.ssl_aug.draw_params(info.height, info.width)
        plan = {"path": path, "frames": frames, "positions": positions, "info": info,
                "params": torch.tensor([p.as_row() for p in params], dtype=torch.float64),
                "video": None, "decoded": None}
        if info.unsafe:  # random access cannot be trusted: decoded here, sequentially, as on the CPU path
            with decoder.open_video(path, self.backend) as reader:
                plan["decoded"] = reader.get_frames(frames.tolist())
            self.sequential_videos[video] = 1
        else:
            plan["video"] = decoder.read_video_bytes(path)
        return plan

    def _load_frames(self, index: int):
        """A clip of NUM_FRAMES segments (and the 8x slow-fast clip) read from a folder of JPEG frames."""
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
                raise FrameError(paths[i], err) from err
        frames = torch.stack(images)
        clips, pos = [], 0
        for v in views:
            clips.append(frames[inverse[pos:pos + len(v)]])
            pos += len(v)
        return self._eval_spatial(clips, spatial_idx)

    def _eval_spatial(self, clips: list[torch.Tensor], spatial_idx: int):
        data = self.cfg.DATA
        if spatial_idx == -1:
            (min_scale, max_scale), crop = data.TRAIN_JITTER_SCALES, data.TRAIN_CROP_SIZE
        elif self.mode == "test" and (self.cfg.TEST.NUM_SPATIAL_CROPS > 1 or self.dataset_name == "ssv2"):
            # TimeSformer's ssv2.py resizes every test clip to short side TEST_CROP_SIZE, also with 1 crop
            min_scale = max_scale = crop = data.TEST_CROP_SIZE
        else:
            min_scale = max_scale = data.TRAIN_JITTER_SCALES[0]
            crop = data.TEST_CROP_SIZE
        height, width = clips[0].shape[1:3]
        resized, offset, flip = transform.eval_crop_box(height, width, spatial_idx, min_scale, max_scale, crop,
                                                        data.RANDOM_FLIP, data.INV_UNIFORM_SAMPLE)
        sizes = [crop, data.LOCAL_CROP_SIZE]
        out = [transform.apply_eval_crop(c, resized, offset, flip, crop, size, data.MEAN, data.STD)
               for c, size in zip(clips, sizes)]
        return out if self.slowfast else out[0]

    # ----------------------------------------------------------------------------------- retries
    def _replacement(self) -> int:
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

    def check_command(self) -> str | None:
        """The check_videos command that reports on this dataset's list (None for frame folders: it reads videos)."""
        if self.frame_paths is not None:
            return None
        data = self.cfg.DATA
        check = ["python", "-m", "datasets.preprocessing.check_videos", "--list", self.list_file]
        check += ["--prefix", data.PATH_PREFIX] if data.PATH_PREFIX else []
        check += ["--separator", data.PATH_LABEL_SEPARATOR] if data.PATH_LABEL_SEPARATOR != " " else []
        return shlex.join(check)

    def __getitem__(self, index: int):
        try:
            return self._draw(index)
        finally:
            if self.decode_slots is not None:
                self.decode_slots.end()

    def _draw(self, index: int):
        """The sample `index` (see the module docstring: skipped, replaced or a placeholder when unreadable)."""
        tried = []
        for _ in range(self.num_retries + 1):
            self.num_draws += self.mode == "train"
            if self.decode_slots is not None:
                self.decode_slots.begin(index // self.num_clips_per_video)
            try:
                frames = self._load(index)
            except decoder.DecodeError as err:
                path = self.video_paths[index // self.num_clips_per_video]
                if self.mode != "train":
                    # A substitute would be scored under the wrong label: return a placeholder that the
                    # evaluation drops (label -1) and count the video as skipped.
                    self._log_failure(path, err, f"its clips of {os.path.basename(self.list_file)} are left out of "
                                                 "the evaluation (label -1)")
                    return self.placeholder_frames(), SKIPPED_LABEL, index, {"skipped": 1}
                tried.append(getattr(err, "path", path))  # a frame folder's: the frame that failed
                self._log_failure(path, err, "using another sample")
                index = self._replacement()
                continue
            label = self.video_labels[index // self.num_clips_per_video]
            return frames, label, index, {"skipped": len(tried)}
        distinct = list(dict.fromkeys(tried))
        missing = sum(not os.path.isfile(p) for p in distinct)
        data = self.cfg.DATA
        failed = (f"{self.dataset_name}: the {len(tried)} draws of a sample (num_retries={self.num_retries}) all "
                  f"failed, as {self.num_skipped} of the {self.num_draws} draws of this loader process did "
                  f"({self.num_skipped / self.num_draws:.0%}): the list is (almost) entirely unreadable. ")
        shown = f"{distinct[:4]}{' ...' if len(distinct) > 4 else ''}"
        if self.frame_paths is not None:
            raise RuntimeError(f"{failed}The {len(distinct)} frames that failed, {missing} of them missing on disk: "
                               f"{shown}. Check DATA.PATH_PREFIX ({data.PATH_PREFIX!r}): joined to the frame lists' "
                               "paths, it must be the folder of the extracted JPEG frames; and that the frames were "
                               "extracted as the frame lists name them (datasets/DATASET.md).")
        raise RuntimeError(f"{failed}The {len(distinct)} videos tried, {missing} of them missing on disk: {shown}. "
                           f"Check DATA.PATH_PREFIX ({data.PATH_PREFIX!r}) and the videos, which this command reports "
                           f"on:\n  {self.check_command()}")


def video_dataset_of(dataset) -> VideoDataset | None:
    """The VideoDataset `dataset` is or wraps (`.dataset`, e.g. SeededDataset, ReturnIndexDataset), or None."""
    while dataset is not None and not isinstance(dataset, VideoDataset):
        dataset = getattr(dataset, "dataset", None)
    return dataset


def replaced_warning(header: str, replaced: int, samples: int, dataset=None) -> str | None:
    """The warning of an epoch of `samples` training samples of which `replaced` draws hit an unreadable video
    (None up to REPLACED_WARNING of the draws): the run trains on the readable rest of the list, each video seen
    more often. `dataset` (a VideoDataset, or a wrapper of one) names the check_videos command of its list."""
    draws = samples + replaced
    if not draws or replaced / draws <= REPLACED_WARNING:
        return None
    dataset = video_dataset_of(dataset)
    command = dataset.check_command() if dataset is not None else None
    check = (f"list them with `{command}` and train on its cleaned list" if command else
             "check DATA.PATH_PREFIX and the files of the list (datasets/DATASET.md)")
    return (f"{header}: {replaced} of the {draws} training draws ({replaced / draws:.0%}) were unreadable videos, "
            f"replaced by others: the epoch trained on the readable rest of the list; {check}.")
