"""Datasets: list formats, errors, retries, view indices through the whole pipeline, eval modes, loader."""
import logging
import re
import shlex

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import DATASET_LISTS, DATASETS, ReturnIndexDataset, build_dataset, dataset_lists, decoder, video_dataset
from datasets.synthetic import write_video
from datasets.transform import IMAGENET_MEAN, IMAGENET_STD, VideoDataAugmentationDINO, ssl_view_frames
from datasets.seeding import SeededDataset, SeededDistributedSampler
from datasets.video_dataset import parse_list_file
from tests.conftest import DAMAGED_FRAMES, build_cfg, damaged_video, write_ssv2

LEVELS = [10 + 6 * i for i in range(40)]   # frame i is a flat grey image of level 10 + 6 i


def _frame_ids(clip: torch.Tensor, mean: float, std: float) -> list[int]:
    """Frame ids of a normalised (C, T, H, W) clip of flat grey frames."""
    level = (clip.mean(dim=(0, 2, 3)) * std + mean) * 255
    return ((level - 10) / 6).round().long().tolist()


def _ssl(cfg, no_spatial=False):
    g, l = ssl_view_frames(cfg, 8)
    return VideoDataAugmentationDINO(global_size=cfg.DATA.TRAIN_CROP_SIZE, local_size=cfg.DATA.LOCAL_CROP_SIZE,
                                     global_frames=g, local_frames=l, no_spatial=no_spatial)


# ----------------------------------------------------------------------------------------- list formats
def test_list_formats_space_comma_and_prefix(tmp_path):
    (tmp_path / "a.csv").write_text("x/a.mp4 3\n\ny/b c.mp4 0\n")
    (tmp_path / "b.csv").write_text("x/a.mp4,3\ny/b.mp4,12\n")
    assert parse_list_file(str(tmp_path / "a.csv")) == [("x/a.mp4", 3), ("y/b c.mp4", 0)]
    assert parse_list_file(str(tmp_path / "b.csv")) == [("x/a.mp4", 3), ("y/b.mp4", 12)]


@pytest.mark.parametrize("content, line", [("a.mp4 1\nb.mp4 x\n", 2), ("a.mp4 1\nb.mp4\n", 2), ("a.mp4\n", 1)])
def test_malformed_line_names_file_number_and_line(tmp_path, content, line):
    path = tmp_path / "train.csv"
    path.write_text(content)
    bad = content.splitlines()[line - 1]
    with pytest.raises(ValueError, match=f"train.csv:{line}: malformed line '{bad}'"):
        parse_list_file(str(path))


@pytest.mark.parametrize("header", ["path,label", "video label", "filename,label"])
def test_header_line_is_named_as_one_with_the_fix(tmp_path, header):
    path = tmp_path / "train.csv"
    path.write_text(f"{header}\nx/a.mp4,3\n")
    with pytest.raises(ValueError, match=f"train.csv:1: malformed line '{header}'.*no header line: if this is one, "
                                         "delete it"):
        parse_list_file(str(path))


def test_kinetics_annotation_csv_is_named_with_the_list_to_write(tmp_path):
    # The official Kinetics-400 csv lists YouTube ids; TimeSformer's / mmaction2's lists are 'path label'.
    path = tmp_path / "train.csv"
    path.write_text("label,youtube_id,time_start,time_end,split\nabseiling,0347ZoDXyP0,95,105,train\n")
    with pytest.raises(ValueError, match=r"train.csv:1: .*Kinetics annotation csv .* '<class>/<file>.mp4 <label>'"):
        parse_list_file(str(path))


@pytest.mark.parametrize("content, number", [("move_left/move_left_002.mp4\n", 1), ("a/x.mp4 0\nb/y.avi,\n", 2),
                                             ("clip.webm\n", 1)])
def test_a_path_without_a_label_is_named_as_such_not_as_a_header(tmp_path, content, number):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"train\.csv:{number}: malformed line .*The line is a path with no label: "
                                         r"every line is '<path> <label>'") as err:
        parse_list_file(str(path))
    assert "header" not in str(err.value)


SSV2_FRAME_LINE = '1007 0 0 1007/1007_000001.jpg ""'


@pytest.mark.parametrize("content, hint", [
    ("abseiling/a.mp4 abseiling\nzumba/b.mp4 zumba\n",
     r"The label 'abseiling' is not an integer: class names must be mapped to 0-based class ids, the position of "
     r"each class in the sorted class names"),
    ("path label\nabseiling/a.mp4 abseiling\n", r"The label 'label' is not an integer: class names must be mapped"),
    ("a.mp4 0 x\nb.mp4 1 y\n", r"The line has 3 fields: lists have two, '<path> <label>', the integer label last"),
    ("a.mp4 1.0\nb.mp4 2.0\n", r"The label '1\.0' is not an integer: labels are class indices 0, 1, \.\.\., written"),
    ("1.0\n2.0\n", r"The line has one field: every line is '<path> <label>'"),
    ("abseiling/a.mp4;0\nzumba/b.mp4;1\n",
     r"Its fields are separated by ';': lists take DATA.PATH_LABEL_SEPARATOR \(' '\), a comma or whitespace\. Pass "
     r"--opts DATA.PATH_LABEL_SEPARATOR ';'"),
    (f"original_vido_id video_id frame_id path labels\n{SSV2_FRAME_LINE}\n", r"This is an SSv2 frame list"),
    (f"{SSV2_FRAME_LINE}\n{SSV2_FRAME_LINE}\n", r"This is an SSv2 frame list .* --dataset ssv2 of eval_linear.py"),
    ("abseiling/a.mp4,0,\nzumba/b.mp4,1,\n", r"The line ends with a separator or has an empty field"),
])
def test_a_malformed_first_line_is_told_what_is_wrong_not_called_a_header(tmp_path, content, hint):
    """Only a first line that looks like a header (no number, no file name) before good lines is called one;
    any other gets what is wrong with it: a class name or a float for the label, a third field, an unknown
    separator, an SSv2 frame list (header or not) given as a video list."""
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"train\.csv:1: malformed line .*{hint}") as err:
        parse_list_file(str(path))
    assert "header line" not in str(err.value)


@pytest.mark.parametrize("separator", [" ", "\t"])
def test_paths_with_spaces_parse_with_tab_and_space_separators(tmp_path, separator):
    """Kinetics class folders hold spaces ('air drumming'): the label is split off the right, so a tab- or
    space-separated list reads whatever DATA.PATH_LABEL_SEPARATOR says."""
    for sep in (" ", "\t"):
        path = tmp_path / "train.csv"
        path.write_text(f"air drumming/x.mp4{sep}1\nabseiling/y z.mp4{sep}0\n")
        assert parse_list_file(str(path), separator) == [("air drumming/x.mp4", 1), ("abseiling/y z.mp4", 0)]


def test_a_malformed_line_past_the_first_is_not_called_a_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("x/a.mp4 3\ny/b.mp4 z\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: malformed line 'y/b\.mp4 z'") as err:
        parse_list_file(str(path))
    assert "header" not in str(err.value)


@pytest.mark.parametrize("label", ["-1", "-2"])
def test_negative_label_names_file_and_line(tmp_path, label):
    # -1 is the internal "unreadable video" marker of evaluation: a list must never produce it.
    path = tmp_path / "val.csv"
    path.write_text(f"a.mp4 0\nb.mp4,{label}\n")
    with pytest.raises(ValueError, match=f"val.csv:2: label {label} in 'b.mp4,{label}' is negative"):
        parse_list_file(str(path))


def test_utf8_byte_order_mark_is_not_part_of_the_first_path(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffx/a.mp4 3\ny/b.mp4 0\n".encode("utf-8"))
    assert parse_list_file(str(path)) == [("x/a.mp4", 3), ("y/b.mp4", 0)]


def test_missing_list_file_names_key(tmp_path, synthetic_root):
    cfg = build_cfg(tmp_path, synthetic_root / "videos")
    with pytest.raises(FileNotFoundError, match="train.csv.*DATA.PATH_TO_DATA_DIR"):
        build_dataset("kinetics400", cfg, "train")


def test_list_file_given_for_its_folder_names_the_folder(tmp_path):
    # LIST_DIR=/data/ucf101/splits/ucf101_train_split_1_videos.txt: the folder setting names a file.
    listed = tmp_path / "ucf101_train_split_1_videos.txt"
    listed.write_text("a.mp4 0\n")
    with pytest.raises(FileNotFoundError, match=f"{listed} is a file, and the setting names the folder that holds "
                                                f"the lists: use {tmp_path}$"):
        parse_list_file(str(listed / "ucf101_train_split_1_videos.txt"))


def test_folder_given_for_a_list_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a folder: pass the list file in it"):
        parse_list_file(str(tmp_path))


def test_missing_list_names_the_lists_the_folder_holds(tmp_path, synthetic_root):
    # --dataset kinetics400 pointed at UCF-style split lists.
    cfg = build_cfg(synthetic_root / "splits", synthetic_root / "videos")
    with pytest.raises(FileNotFoundError, match=r"splits holds hmdb51_train_split_1_videos.txt, .*"
                                                r"ucf101_val_split_1_videos.txt \(lists of another --dataset\?\)"):
        build_dataset("kinetics400", cfg, "train")
    with pytest.raises(FileNotFoundError, match=f"The folder {tmp_path / 'nope'} does not exist"):
        parse_list_file(str(tmp_path / "nope" / "train.csv"))


@pytest.mark.parametrize("listed, split, said", [
    (["hmdb51_{}_split_1_rawframes.txt"], 1,
     r"hmdb51_train_split_1_rawframes.txt: MMAction2's list of extracted frames .*svt reads the videos, listed by "
     r"MMAction2's video lists \(step 4"),
    (["hmdb51_{}_split_2_rawframes.txt"], 1, r"holds hmdb51_train_split_2_rawframes.txt: MMAction2's list of extracted"),
    (["hmdb51_{}_split_2_videos.txt"], 1,
     r"holds hmdb51_train_split_2_videos.txt: the train list of split 2, not of split 1, which DATA.SPLIT names \(1 by "
     r"default, as in the original\)\. To evaluate split 2, pass --opts DATA.SPLIT 2; to evaluate split 1, add its "
     r"lists to the folder\.$"),
    (["hmdb51_{}_split_1_videos.txt", "hmdb51_{}_split_2_videos.txt"], 3,
     r"holds hmdb51_train_split_1_videos.txt, hmdb51_train_split_2_videos.txt: the train list of splits 1 and 2, not "
     r"of split 3, .*pass --opts DATA.SPLIT 1;")])
def test_mmaction2_frame_lists_or_another_splits_lists_are_named_as_such(tmp_path, synthetic_root, listed, split,
                                                                         said):
    """A folder of MMAction2's rawframes lists, or of other splits' video lists only: the error says what they are
    and what svt reads (the DATA.SPLIT that reads them), not 'lists of another --dataset?'."""
    for mode in ("train", "val"):
        for name in listed:
            (tmp_path / name.format(mode)).write_text("brush_hair/a 30 0\n")
    with pytest.raises(FileNotFoundError, match=said) as err:
        build_dataset("hmdb51", build_cfg(tmp_path, synthetic_root / "videos", **{"DATA.SPLIT": split}), "train")
    assert "another --dataset" not in str(err.value)


@pytest.mark.parametrize("dataset", ["ucf101", "hmdb51"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_data_split_picks_the_lists_of_that_split(tmp_path, synthetic_root, dataset, split):
    """DATA.SPLIT N reads MMAction2's split-N lists of UCF-101 / HMDB-51 (mode test: the val list)."""
    lists = dataset_lists(dataset, split)
    assert (lists.train, lists.val, lists.test, lists.split) == (
        f"{dataset}_train_split_{split}_videos.txt", f"{dataset}_val_split_{split}_videos.txt",
        f"{dataset}_val_split_{split}_videos.txt", split)
    videos = (synthetic_root / "splits" / f"{dataset}_train_split_1_videos.txt").read_text().splitlines()
    for n in (1, 2, 3):  # split n lists the first n + 1 videos
        for mode in ("train", "val"):
            (tmp_path / f"{dataset}_{mode}_split_{n}_videos.txt").write_text("\n".join(videos[:n + 1]) + "\n")
    cfg = build_cfg(tmp_path, synthetic_root / "videos", **{"DATA.SPLIT": split})
    for mode in ("train", "test"):
        ds = build_dataset(dataset, cfg, mode)
        assert ds.list_file == str(tmp_path / getattr(lists, mode)) and ds.num_videos == split + 1


@pytest.mark.parametrize("dataset", ["kinetics400", "kinetics", "ssv2"])
def test_datasets_without_splits_keep_their_lists(dataset):
    assert dataset_lists(dataset, 1) == DATASET_LISTS[dataset] and DATASET_LISTS[dataset].split is None


def test_kinetics_without_test_csv_is_told_to_copy_val(tmp_path, synthetic_root):
    """eval_finetune's final test reads test.csv, which Kinetics-400 does not have: copy val.csv (TimeSformer's
    convention), not 'lists of another --dataset?'."""
    for name in ("train.csv", "val.csv"):
        (tmp_path / name).write_text((synthetic_root / "annotations" / name).read_text())
    with pytest.raises(FileNotFoundError, match=rf"holds val.csv but no test.csv: Kinetics-400 has no labelled test "
                                                rf"split, so test on val as TimeSformer does: cp {tmp_path}/val.csv "
                                                rf"{tmp_path}/test.csv") as err:
        build_dataset("kinetics400", build_cfg(tmp_path, synthetic_root / "videos"), "test")
    assert "another --dataset" not in str(err.value)


def test_every_video_list_layout_is_read(synthetic_cfg):
    kin = {m: build_dataset("kinetics400", synthetic_cfg("annotations"), m) for m in ("train", "val", "test")}
    assert [kin[m].num_videos for m in ("train", "val", "test")] == [16, 8, 8]
    assert kin["train"].video_labels == [y for y in range(4) for _ in range(4)]
    for name in ("ucf101", "hmdb51"):
        for folder in ("splits", "knn_splits"):
            train = build_dataset(name, synthetic_cfg(folder), "train")
            test = build_dataset(name, synthetic_cfg(folder), "test")
            assert train.num_videos == 16 and test.num_videos == 8
            assert test.video_paths == kin["val"].video_paths
    assert set(DATASETS) == {"kinetics400", "kinetics", "ucf101", "hmdb51", "ssv2"}
    with pytest.raises(ValueError, match="unknown dataset 'k700'"):
        build_dataset("k700", synthetic_cfg(), "train")


def test_ssv2_layout(tmp_path):
    write_ssv2(tmp_path)
    cfg = build_cfg(tmp_path, tmp_path / "frames", **{"DATA.MEAN": [0.0] * 3, "DATA.STD": [1.0] * 3})
    val = build_dataset("ssv2", cfg, "val")
    assert val.num_videos == 3 and val.video_labels == [0, 1, 0]
    frames, label, index, meta = val[1]
    assert frames.shape == (3, 4, 32, 32) and label == 1 and index == 1 and meta == {"skipped": 0}
    # segments of (12 - 1) / 4 = 2.75 frames, middle frame: (0+3)//2, (3+6)//2, (6+8)//2, (8+11)//2
    assert _frame_ids(frames, 0.0, 1.0) == [1, 4, 7, 9]
    test = build_dataset("ssv2", cfg, "test", slowfast=True)
    assert len(test) == 9 and [tuple(c.shape) for c in test[0][0]] == [(3, 4, 32, 32), (3, 32, 16, 16)]
    (tmp_path / "val.csv").write_text("original_vido_id video_id frame_id path labels\n100 0 0 a.jpg\n")
    with pytest.raises(ValueError, match="val.csv:2: malformed line"):
        build_dataset("ssv2", cfg, "val")


# ----------------------------------------------------------------------------------------- failures
def _mixed_list(tmp_path, synthetic_root, good=2):
    videos = sorted((synthetic_root / "videos").rglob("*.mp4"))[:good]
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00garbage" * 64)
    lines = ["missing.mp4 0", "corrupt.mp4 1"] + [f"{v} 2" for v in videos]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return build_cfg(tmp_path, tmp_path)


def test_missing_and_corrupt_are_skipped_counted_and_logged_once(tmp_path, synthetic_root, caplog):
    cfg = _mixed_list(tmp_path, synthetic_root)
    ds = build_dataset("kinetics400", cfg, "train", ssl_aug=_ssl(cfg))
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        results = [ds[i] for i in (0, 1, 0, 1)]
    for views, label, index, meta in results:
        assert len(views) == 10 and label == 2 and index >= 2 and meta["skipped"] >= 1
    assert ds.num_skipped == sum(r[3]["skipped"] for r in results)
    logged = [r.getMessage() for r in caplog.records]
    assert sum("missing.mp4" in m for m in logged) <= 1 and sum("corrupt.mp4" in m for m in logged) <= 1
    assert any("missing.mp4" in m for m in logged) and any("corrupt.mp4" in m for m in logged)


def test_a_train_list_video_skipped_by_the_knn_bank_is_logged_as_such(tmp_path, synthetic_root, caplog):
    """The kNN bank reads the train list in val mode: an unreadable video is logged as a clip of train.csv left
    out, not as a 'val clip'."""
    from utils.evaluation import build_train_bank_dataset
    bank = build_train_bank_dataset("kinetics400", _mixed_list(tmp_path, synthetic_root))
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        assert bank[0][1] == -1
    message = caplog.records[-1].getMessage()
    assert "missing.mp4" in message and "its clips of train.csv are left out of the evaluation" in message
    assert "val clip" not in message


def test_all_retries_failing_raises_with_paths(tmp_path, synthetic_root):
    cfg = _mixed_list(tmp_path, synthetic_root, good=0)
    ds = build_dataset("kinetics400", cfg, "train", num_retries=3)
    with pytest.raises(RuntimeError, match=r"the 4 draws of a sample \(num_retries=3\) all failed, as 4 of the 4 "
                                           r"draws of this loader process did \(100%\).*The [12] videos? tried, [01] "
                                           r"of them missing on disk: \['\S+/(missing|corrupt)\.mp4'") as failed:
        ds[0]
    # a command to paste: the paths quoted where they need it, nothing after them
    command = str(failed.value).splitlines()[-1].strip()
    assert shlex.split(command) == ["python", "-m", "datasets.preprocessing.check_videos", "--list", ds.list_file,
                                    "--prefix", cfg.DATA.PATH_PREFIX]


def _mostly_unreadable(tmp_path, synthetic_root, good: int, bad: int):
    """A train list of `good` synthetic videos and `bad` files that do not open (garbage bytes), shuffled."""
    videos = sorted((synthetic_root / "videos").rglob("*.mp4"))[:good]
    for i in range(bad):
        (tmp_path / f"junk{i}.mp4").write_bytes(b"\x00garbage" * 64)
    lines = [f"{v} 1" for v in videos] + [f"junk{i}.mp4 0" for i in range(bad)]
    np.random.default_rng(0).shuffle(lines)
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return build_cfg(tmp_path, tmp_path)


def _seeded_epoch(ds, epoch: int, seed: int = 1, skip: int = 0) -> list[tuple[int, int]]:
    """(index read, replaced draws) of each sample of `epoch` drawn as train_ssl.py draws them (per-sample seeds)."""
    sampler = SeededDistributedSampler(ds, seed=seed, num_replicas=1, rank=0, shuffle=True)
    sampler.set_epoch(epoch)
    sampler.skip = skip
    loader = DataLoader(SeededDataset(ds), sampler=sampler, batch_size=5, num_workers=0)
    return [(i, s) for _, _, index, meta in loader for i, s in zip(index.tolist(), meta["skipped"].tolist())]


def test_a_mostly_unreadable_training_list_goes_through_an_epoch(tmp_path, synthetic_root):
    """80 % of the list does not open: every sample is a readable video, found by replaced draws (the original's
    10 retries would stop this epoch: ~8 % of its samples fail 11 draws in a row)."""
    ds = build_dataset("kinetics400", _mostly_unreadable(tmp_path, synthetic_root, 10, 40), "train")
    samples = _seeded_epoch(ds, epoch=0)
    assert len(samples) == 50 and all(ds.video_labels[i] == 1 for i, _ in samples)
    assert sum(s for _, s in samples) == ds.num_skipped == ds.num_draws - 50 > 100


def test_replaced_draws_replay_per_seed_epoch_and_position(tmp_path, synthetic_root):
    """The replacement chain of a sample is a function of (seed, epoch, position): a rerun, and a resume that
    skips the first samples, read the same videos; another epoch draws others."""
    ds = build_dataset("kinetics400", _mostly_unreadable(tmp_path, synthetic_root, 5, 15), "train")
    first = _seeded_epoch(ds, epoch=0)
    assert _seeded_epoch(ds, epoch=0) == first and _seeded_epoch(ds, epoch=0, skip=10) == first[10:]
    assert sum(s for _, s in first) > 20 and _seeded_epoch(ds, epoch=1) != first


def test_an_entirely_unreadable_training_list_stops_naming_the_fraction_and_check_videos(tmp_path, synthetic_root):
    ds = build_dataset("kinetics400", _mostly_unreadable(tmp_path, synthetic_root, 0, 8), "train")
    assert ds.num_retries == video_dataset.NUM_RETRIES == 500
    with pytest.raises(RuntimeError, match=r"kinetics400: the 501 draws of a sample \(num_retries=500\) all failed, "
                                           r"as 501 of the 501 draws of this loader process did \(100%\): the list "
                                           r"is \(almost\) entirely unreadable\. The 8 videos tried, 0 of them "
                                           r"missing on disk: \['\S+/junk\d\.mp4', .* \.\.\.\. Check "
                                           r"DATA\.PATH_PREFIX") as failed:
        _seeded_epoch(ds, epoch=0)
    assert str(failed.value).splitlines()[-1].split()[:4] == ["python", "-m", "datasets.preprocessing.check_videos",
                                                             "--list"]


def test_replaced_warning_past_five_percent_of_the_draws_names_check_videos(tmp_path, synthetic_root):
    ds = build_dataset("kinetics400", _mixed_list(tmp_path, synthetic_root), "train")
    assert video_dataset.replaced_warning("Epoch 3", 5, 95, SeededDataset(ds)) is None  # 5 % of the draws
    warning = video_dataset.replaced_warning("Epoch 3", 6, 94, SeededDataset(ds))
    assert warning == (f"Epoch 3: 6 of the 100 training draws (6%) were unreadable videos, replaced by others: the "
                       f"epoch trained on the readable rest of the list; list them with `{ds.check_command()}` and "
                       "train on its cleaned list.")
    assert ds.check_command() == shlex.join(["python", "-m", "datasets.preprocessing.check_videos", "--list",
                                             ds.list_file, "--prefix", str(tmp_path)])
    assert "check DATA.PATH_PREFIX" in video_dataset.replaced_warning("Epoch 3", 1, 1)
    assert video_dataset.replaced_warning("Epoch 3", 0, 0) is None


# ----------------------------------------------------------------------------------------- indices
@pytest.fixture
def level_video_cfg(tmp_path):
    frames = np.broadcast_to(np.asarray(LEVELS, np.uint8)[:, None, None, None], (40, 48, 64, 3)).copy()
    write_video(str(tmp_path / "v30.mp4"), frames, fps=30)
    write_video(str(tmp_path / "v15.mp4"), frames, fps=15)
    for name in ("train.csv", "val.csv", "test.csv"):
        (tmp_path / name).write_text("v30.mp4 0\nv15.mp4 1\n")
    return lambda **opts: build_cfg(tmp_path, tmp_path, **{"DATA.MEAN": [0.0] * 3, "DATA.STD": [1.0] * 3, **opts})


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_eval_clip_indices_and_fps_resampling(level_video_cfg, backend):
    # NUM_FRAMES 4 x SAMPLING_RATE 4 = 16 target frames: 16 frames at 30 fps, 8 frames at 15 fps.
    cfg = level_video_cfg(**{"DATA.SAMPLING_RATE": 4, "DATA.DECODING_BACKEND": backend})
    val = build_dataset("kinetics400", cfg, "val")
    assert _frame_ids(val[0][0], 0, 1) == [0, 5, 10, 15]      # linspace(0, 15, 4) from frame 0
    assert _frame_ids(val[1][0], 0, 1) == [0, 2, 4, 7]        # linspace(0, 7, 4)
    cfg = level_video_cfg(**{"DATA.SAMPLING_RATE": 4, "DATA.DECODING_BACKEND": backend,
                             "TEST.NUM_ENSEMBLE_VIEWS": 3, "TEST.NUM_SPATIAL_CROPS": 1})
    test = build_dataset("kinetics400", cfg, "test")
    assert len(test) == 6 and test.labels == [0, 0, 0, 1, 1, 1] and test.num_clips_per_video == 3
    # starts delta * i / 3 with delta = 40 - 16 = 24: 0, 8, 16
    assert [_frame_ids(test[i][0], 0, 1) for i in range(3)] == [[0, 5, 10, 15], [8, 13, 18, 23], [16, 21, 26, 31]]


def test_ssl_view_indices_through_the_dataset(level_video_cfg):
    # Window of NUM_FRAMES 4 x SAMPLING_RATE 8 = 32 frames in a 40-frame video at 30 fps (start in [0, 8]).
    cfg = level_video_cfg(**{"DATA.SAMPLING_RATE": 8})
    ds = build_dataset("kinetics400", cfg, "train", ssl_aug=_ssl(cfg, no_spatial=True))
    torch.manual_seed(3)
    views, _, _, _ = ds[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    ids = [_frame_ids(v * std + mean, 0, 1) for v in views]
    first = ids[0][0]
    assert 0 <= first <= 8
    assert ids[0] == [first + i for i in (0, 9, 18, 27)]        # linspace(0, 27, 4)
    assert ids[1] == [first + i for i in (5, 14, 23, 31)]       # linspace(5, 32, 4) clamped to 31
    for local in ids[2:]:                                       # width 32 // 8 = 4
        s = local[0] - first
        assert 0 <= s <= 27 and local == [first + s + i for i in (0, 1, 2, 4)]


# ----------------------------------------------------------------------------------------- eval modes
@pytest.mark.parametrize("name", ["kinetics400", "ucf101", "hmdb51"])
def test_eval_modes_shapes_and_clip_counts(synthetic_cfg, name):
    folder = "annotations" if name.startswith("kinetics") else "splits"
    cfg = synthetic_cfg(folder)
    train = build_dataset(name, cfg, "train")
    frames, label, index, meta = train[5]
    assert frames.shape == (3, 4, 32, 32) and label == 1 and index == 5 and meta == {"skipped": 0}
    val = build_dataset(name, cfg, "val")
    assert len(val) == 8 and val[0][0].shape == (3, 4, 32, 32)
    test = build_dataset(name, cfg, "test")
    assert test.num_clips_per_video == 3 and len(test) == 24 and test.labels[:4] == [0, 0, 0, 0]
    crops = [test[i][0] for i in range(3)]
    assert all(c.shape == (3, 4, 32, 32) for c in crops)
    assert [test[i][2] for i in range(3)] == [0, 1, 2]
    sf = build_dataset(name, cfg, "test", slowfast=True)[1][0]
    assert [tuple(c.shape) for c in sf] == [(3, 4, 32, 32), (3, 32, 16, 16)]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_three_spatial_crops_left_centre_right(tmp_path, make_video, backend):
    make_video(tmp_path / "v.mp4", num_frames=20, size=(48, 64))
    (tmp_path / "test.csv").write_text("v.mp4 0\n")
    cfg = build_cfg(tmp_path, tmp_path, **{"DATA.DECODING_BACKEND": backend})
    ds = build_dataset("kinetics400", cfg, "test")
    crops = [ds[i][0] for i in range(3)]
    with decoder.open_video(str(tmp_path / "v.mp4"), backend) as reader:   # linspace(0, 7, 4) from frame 0
        frames = reader.get_frames([0, 2, 4, 7])
    full = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(32, 42),
                                           mode="bilinear", align_corners=False)
    full = ((full - 0.45) / 0.225).permute(1, 0, 2, 3)
    for crop, left in zip(crops, (0, 5, 10)):       # short side 32: width 42, offsets 0, ceil(10/2), 10
        assert torch.allclose(crop, full[..., left:left + 32], atol=1e-5)


def test_val_is_deterministic_and_kinetics_train_without_ssl_views_gives_plain_clip(synthetic_cfg):
    cfg = synthetic_cfg()
    ds = build_dataset("kinetics400", cfg, "train")  # the evaluation scripts' training clips
    assert ds.ssl_aug is None and ds[0][0].shape == (3, 4, 32, 32)
    assert build_dataset("kinetics400", cfg, "val", ssl_aug=_ssl(cfg)).ssl_aug is None  # SSL views: train only
    val = build_dataset("kinetics400", synthetic_cfg(), "val")
    torch.manual_seed(0)
    first = val[2][0]
    torch.manual_seed(1)  # another RNG state: val draws nothing (clip 0 of 1, centre crop, no flip)
    assert torch.equal(val[2][0], first)


def test_return_index_dataset(synthetic_cfg):
    ds = ReturnIndexDataset(build_dataset("ucf101", synthetic_cfg("knn_splits"), "val"))
    frames, index = ds[3]
    assert frames.shape == (3, 4, 32, 32) and index == 3 and ds.labels == ds.dataset.labels and len(ds) == 8


# ----------------------------------------------------------------------------------------- loader
@pytest.mark.parametrize("rand_fr", [False, True])
def test_ssl_dataloader_with_two_workers(synthetic_cfg, rand_fr):
    cfg = synthetic_cfg(**{"DATA.RAND_FR": rand_fr})
    ds = build_dataset("kinetics400", cfg, "train", ssl_aug=_ssl(cfg))
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=True, drop_last=True)
    batches = list(loader)
    assert len(batches) == 4
    views, labels, index, meta = batches[0]
    frames = (4, 8, 2, 2, 4, 4, 8, 8, 16, 16) if rand_fr else (4,) * 10
    assert [tuple(v.shape) for v in views] == [(4, 3, t, s, s) for t, s in zip(frames, [32] * 2 + [16] * 8)]
    assert labels.shape == (4,) and meta["skipped"].tolist() == [0] * 4
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(16))


def test_workers_draw_different_augmentations(synthetic_cfg):
    cfg = synthetic_cfg()
    ds = build_dataset("kinetics400", cfg, "train", ssl_aug=_ssl(cfg))
    loader = DataLoader(ds, batch_size=1, num_workers=2, sampler=[0, 0])   # one sample per worker
    first, second = [batch[0][0] for batch in loader]
    assert not torch.equal(first, second)


def test_wrong_path_prefix_fails_at_construction_naming_the_key(synthetic_root, tmp_path):
    cfg = build_cfg(synthetic_root / "annotations", tmp_path / "not_the_videos")
    with pytest.raises(FileNotFoundError, match=r"train\.csv: none of \d+ checked videos exists.*DATA\.PATH_PREFIX"):
        build_dataset("kinetics400", cfg, "train")


def test_a_prefix_with_the_original_scripts_stray_f_is_named(synthetic_root):
    """The original's eval scripts pass DATA.PATH_PREFIX f"${DATA_PATH}/videos": bash keeps the f, so a user who
    copies them gets 'f/data/...'. The error says to drop it; a prefix that is merely wrong does not."""
    videos = str(synthetic_root / "videos")
    cfg = build_cfg(synthetic_root / "annotations", "f" + videos)
    with pytest.raises(FileNotFoundError, match=re.escape(f"The videos are under {videos!r}: drop the leading 'f'")):
        build_dataset("kinetics400", cfg, "train")
    cfg = build_cfg(synthetic_root / "annotations", "f" + videos + "_elsewhere")
    with pytest.raises(FileNotFoundError, match="joined to the list path") as err:
        build_dataset("kinetics400", cfg, "train")
    assert "leading 'f'" not in str(err.value)


def _list_with_a_missing_video(synthetic_root, tmp_path, split, first="gone/absent.mp4", **opts):
    """The synthetic `split` list with `first` (label 0) in front of it."""
    lines = (synthetic_root / "annotations" / f"{split}.csv").read_text().splitlines()
    (tmp_path / f"{split}.csv").write_text("\n".join([f"{first} 0"] + lines) + "\n")
    return build_cfg(tmp_path, synthetic_root / "videos", **opts), len(lines) + 1


def _list_with_a_damaged_video(synthetic_root, tmp_path, split):
    """The synthetic `split` list with a video damaged mid-stream (conftest.damaged_video) in front, and clips
    of 8 frames spread over its 24 (sampling rate 3), so every clip asks for frames inside the damage."""
    inside = damaged_video(tmp_path / "damaged.mp4")
    assert set(decoder.temporal_indices(0, DAMAGED_FRAMES - 1, 8, DAMAGED_FRAMES).tolist()) & set(inside)
    return _list_with_a_missing_video(synthetic_root, tmp_path, split, tmp_path / "damaged.mp4",
                                      **{"DATA.NUM_FRAMES": 8, "DATA.SAMPLING_RATE": 3})[0]


def test_a_missing_training_video_is_replaced_and_counted(synthetic_root, tmp_path):
    cfg, n = _list_with_a_missing_video(synthetic_root, tmp_path, "train")
    ds = build_dataset("kinetics400", cfg, "train")
    assert len(ds) == n
    _, label, index, meta = ds[0]
    assert meta["skipped"] == 1 and index != 0 and label == ds.video_labels[index]


def test_a_training_video_damaged_mid_stream_is_replaced_and_counted(synthetic_root, tmp_path):
    # It opens, then frames of the clip do not decode: another video, as for one that does not open.
    ds = build_dataset("kinetics400", _list_with_a_damaged_video(synthetic_root, tmp_path, "train"), "train")
    torch.manual_seed(0)
    frames, label, index, meta = ds[0]
    assert meta["skipped"] == 1 and index != 0 and label == ds.video_labels[index] and ds.num_skipped == 1
    assert frames.shape == (3, 8, 32, 32)


@pytest.mark.parametrize("mode", ["val", "test"])
def test_an_evaluation_video_damaged_mid_stream_is_a_label_minus_one_placeholder(synthetic_root, tmp_path, mode):
    cfg = _list_with_a_damaged_video(synthetic_root, tmp_path, mode)
    ds = build_dataset("kinetics400", cfg, mode)
    frames, label, index, meta = ds[0]
    assert label == -1 and index == 0 and meta == {"skipped": 1} and ds.num_skipped == 1
    assert frames.shape == (3, 8, 32, 32) and not frames.any()
    assert ds[ds.num_clips_per_video][1] >= 0  # the next video is read


@pytest.mark.parametrize("slowfast", [False, True])
@pytest.mark.parametrize("mode", ["val", "test"])
def test_an_unreadable_evaluation_video_is_a_label_minus_one_placeholder(synthetic_root, tmp_path, mode, slowfast,
                                                                        caplog):
    cfg, _ = _list_with_a_missing_video(synthetic_root, tmp_path, "test" if mode == "test" else "val")
    ds = build_dataset("kinetics400", cfg, mode, slowfast=slowfast)
    video_dataset._LOGGED_FAILURES.discard(ds.video_paths[0])
    good_frames, good_label, _, good_meta = ds[ds.num_clips_per_video]
    assert good_label >= 0 and good_meta["skipped"] == 0
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        samples = [ds[i] for i in range(ds.num_clips_per_video)]  # every clip of the unreadable video
    for i, (frames, label, index, meta) in enumerate(samples):
        assert label == -1 and index == i and meta == {"skipped": 1}
        if slowfast:
            assert isinstance(frames, list) and len(frames) == 2
            assert [f.shape for f in frames] == [g.shape for g in good_frames]
            assert frames[1].shape == (3, 32, 16, 16) and all(not f.any() for f in frames)
        else:
            assert frames.shape == good_frames.shape == (3, 4, 32, 32) and not frames.any()
    assert ds.num_skipped == 1  # one video, however many clips
    logged = [r for r in caplog.records if "gone/absent.mp4" in r.getMessage()]
    assert len(logged) == 1 and "label -1" in logged[0].getMessage()  # once, with the path
