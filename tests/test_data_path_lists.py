"""PathList / PathLists (datasets/path_lists.py): the compact path storage of VideoDataset reads as the lists of
str it replaces, survives pickling into DataLoader workers, and the datasets hold the paths their lists name."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets import build_dataset
from datasets.path_lists import PathList, PathLists
from datasets.video_dataset import load_frame_lists
from tests.conftest import build_cfg, write_ssv2

PATHS = ["/data/k400/air drumming/a b.mp4", "rel/x.mp4", "", "/data/été/ü.mp4", "/data/日本/動画.mp4",
         "/data/emoji/\U0001F600.mp4", "last.avi"]
GROUPS = [["1/000001.jpg", "1/000002.jpg"], ["2/000001.jpg"], [], ["/abs/é/1.jpg", "/abs/é/2.jpg", "/abs/é/3.jpg"]]


def test_path_list_reads_as_the_list_it_was_made_of():
    paths = PathList(PATHS)
    assert len(paths) == len(PATHS) and list(paths) == PATHS and paths == PATHS and PATHS == paths
    assert [paths[i] for i in range(len(PATHS))] == PATHS
    assert [paths[-i] for i in range(1, len(PATHS) + 1)] == [PATHS[-i] for i in range(1, len(PATHS) + 1)]
    for cut in (slice(None), slice(1, 4), slice(2, 3), slice(3, 3), slice(5, 1), slice(None, None, 2),
                slice(None, None, -1), slice(-3, None), slice(1, 100)):
        assert paths[cut] == PATHS[cut], cut
    assert paths[torch.tensor(3).item()] == PATHS[3] and paths[np.int64(4)] == PATHS[4]
    assert PATHS[1] in paths and paths.index(PATHS[5]) == 5 and paths != PATHS[:-1] and paths != PATHS[::-1]
    for bad in (len(PATHS), -len(PATHS) - 1):
        with pytest.raises(IndexError, match=rf"^PathList index {bad} out of range \(7 paths\)$"):
            paths[bad]
    assert list(PathList([])) == [] and len(PathList([])) == 0 and PathList([""])[0] == ""
    assert PathList(["a", "b"]) != "ab" and PathList(["a", "b"]) != b"ab"  # a str is no sequence of paths


def test_a_path_with_a_nul_is_refused_by_name():
    with pytest.raises(ValueError, match="'a\\\\x00b.mp4' holds a NUL"):
        PathList(["ok.mp4", "a\0b.mp4"])


def test_path_lists_read_as_the_lists_they_were_made_of():
    lists = PathLists(iter(GROUPS))
    assert len(lists) == len(GROUPS) and lists == GROUPS
    for v, group in enumerate(GROUPS):
        assert lists[v] == group and isinstance(lists[v], list) and lists[v - len(GROUPS)] == group
    assert lists[1:3] == GROUPS[1:3] and lists[::-1] == GROUPS[::-1]
    lists[0].append("changed")  # a read is a new list: the storage does not change
    assert lists[0] == GROUPS[0] and lists == [tuple(g) for g in GROUPS]
    with pytest.raises(IndexError, match=r"^PathLists index 4 out of range \(4 lists\)$"):
        lists[len(GROUPS)]


def test_path_lists_of_path_lists_are_joined_from_their_texts():
    """PathList.chain (what PathLists does with PathList groups, as SSv2's frame lists are) reads as the paths of
    its lists in turn, empty lists and non-ASCII paths included."""
    groups = [PathList(g) for g in GROUPS + [[], PATHS]]
    assert PathList.chain(groups) == [p for g in GROUPS + [PATHS] for p in g]
    assert PathList.chain([]) == [] and PathList.chain([PathList([]), PathList([])]) == []
    assert PathList.chain([PathList([""]), PathList(["", "a"])]) == ["", "", "a"]
    lists = PathLists(groups)
    assert lists == GROUPS + [[], PATHS] and lists._paths._text == PathLists(GROUPS + [[], PATHS])._paths._text
    assert np.array_equal(lists._paths._offsets, PathLists(GROUPS + [[], PATHS])._paths._offsets)
    mixed = [PathList(GROUPS[0]), GROUPS[1], PathList(GROUPS[2]), tuple(GROUPS[3])]  # PathLists and plain lists
    assert PathLists(mixed) == GROUPS


class _Reads(Dataset):
    """The paths of video i, as a DataLoader worker reads them."""

    def __init__(self, paths, lists):
        self.paths, self.lists = paths, lists

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[i], self.lists[i % len(self.lists)]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_same_paths(context):
    data = _Reads(PathList(PATHS), PathLists(GROUPS))
    assert pickle.loads(pickle.dumps(data.paths)) == PATHS and pickle.loads(pickle.dumps(data.lists)) == GROUPS
    loader = DataLoader(data, batch_size=None, num_workers=2, multiprocessing_context=context)
    assert [(p, g) for p, g in loader] == [(PATHS[i], GROUPS[i % len(GROUPS)]) for i in range(len(PATHS))]


def test_datasets_hold_the_paths_of_their_lists(tmp_path, synthetic_cfg):
    for name, list_dir in (("kinetics400", "annotations"), ("ucf101", "splits")):
        ds = build_dataset(name, synthetic_cfg(list_dir), "test")
        assert isinstance(ds.video_paths, PathList) and ds.frame_paths is None
        assert ds.video_paths == [r["path"] for r in ds.load_data_list()]
    write_ssv2(tmp_path, num_videos=3, frames=5)
    ds = build_dataset("ssv2", build_cfg(tmp_path, tmp_path / "frames"), "train")
    records = ds.load_data_list()
    assert ds.video_paths == ["100", "101", "102"] == [r["path"] for r in records]
    assert ds.frame_paths == [r["frames"] for r in records]
    assert ds.frame_paths[1] == [str(tmp_path / "frames" / "101" / f"{f:06d}.jpg") for f in range(5)]


def test_videos_of_a_class_share_its_label_object(tmp_path):
    """A worker reading a label writes its reference count: labels > 256 (each line's int, an object of its own)
    are one object per class, so that an epoch's reads write a few pages, not one per video (240k in K400)."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").touch()
    (tmp_path / "train.csv").write_text("".join(f"{v}.mp4 {y}\n" for v, y in zip("abcdef", [300, 7, 300, 399, 7, 300])))
    ds = build_dataset("kinetics400", build_cfg(tmp_path, tmp_path / "videos"), "train")
    assert ds.video_labels == [300, 7, 300, 399, 7, 300] and ds.labels == ds.video_labels
    assert len({id(y) for y in ds.video_labels}) == 3 and ds.labels[5] is ds.video_labels[0]


@pytest.mark.parametrize("prefix", ["", "/data/frames", "/data/frames/", "frames"])
def test_frame_list_paths_are_joined_to_the_prefix_as_os_path_join_does(tmp_path, prefix):
    """load_frame_lists' fast join: the prefix and a '/' before a relative path, an absolute path as it is."""
    (tmp_path / "train.csv").write_text('original_vido_id video_id frame_id path labels\n7 0 0 7/000001.jpg ""\n'
                                        '7 0 1 /abs/7/000002.jpg ""\n8 1 0 8/000001.jpg ""\n')
    assert load_frame_lists(str(tmp_path / "train.csv"), prefix) == {
        "7": [os.path.join(prefix, "7/000001.jpg"), "/abs/7/000002.jpg"], "8": [os.path.join(prefix, "8/000001.jpg")]}


def test_a_video_whose_frame_lines_resume_after_another_keeps_them_all_in_file_order(tmp_path):
    """Each video's frames become a PathList when another video's lines start: lines of a video that come back
    later (not SSv2's order, but a csv may have it) are appended to it, not put in place of it."""
    lines = [("7", 1), ("8", 1), ("7", 2), ("9", 1), ("7", 3), ("8", 2)]
    (tmp_path / "val.csv").write_text("".join(f'{v} 0 {k} {v}/{k:06d}.jpg ""\n' for v, k in lines))
    frames = load_frame_lists(str(tmp_path / "val.csv"), "/f")
    assert frames == {"7": ["/f/7/000001.jpg", "/f/7/000002.jpg", "/f/7/000003.jpg"],
                      "8": ["/f/8/000001.jpg", "/f/8/000002.jpg"], "9": ["/f/9/000001.jpg"]}
    assert all(isinstance(p, PathList) for p in frames.values())
