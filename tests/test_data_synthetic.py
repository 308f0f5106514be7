"""Synthetic generator (determinism, layout) and the preprocessing scripts."""
import csv
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from datasets import decoder
from datasets.preprocessing import check_videos, resize_videos
from datasets.synthetic import MOTIONS, _particle_paths, generate, render_particles, render_video


def test_render_is_deterministic_and_seed_dependent():
    a = render_video("rotate_cw", 8, 32, np.random.default_rng([0, 4, 1]))
    b = render_video("rotate_cw", 8, 32, np.random.default_rng([0, 4, 1]))
    c = render_video("rotate_cw", 8, 32, np.random.default_rng([1, 4, 1]))
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="unknown motion"):
        render_video("jump", 8, 32, np.random.default_rng(0))


@pytest.mark.parametrize("motion, axis, sign", [("move_right", 1, 1), ("move_left", 1, -1),
                                                 ("move_down", 0, 1), ("move_up", 0, -1)])
def test_translations_move_the_object_the_right_way(motion, axis, sign):
    frames = render_video(motion, 16, 64, np.random.default_rng(7)).astype(np.float32)
    # Pixels that change between consecutive frames lie around the object: their centroid moves with it.
    start = np.argwhere(np.abs(frames[0] - frames[1]).sum(-1) > 0).mean(0)[axis]
    end = np.argwhere(np.abs(frames[-1] - frames[-2]).sum(-1) > 0).mean(0)[axis]
    assert sign * (end - start) > 5


def test_particles_are_deterministic_and_shaped():
    a = render_particles("zoom_in", 6, 32, np.random.default_rng([0, 1]), width=48)
    assert a.shape == (6, 32, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_particles("zoom_in", 6, 32, np.random.default_rng([0, 1]), width=48))
    assert not np.array_equal(a, render_particles("zoom_in", 6, 32, np.random.default_rng([1, 1]), width=48))
    with pytest.raises(ValueError, match="unknown motion"):
        render_particles("jump", 4, 32, np.random.default_rng(0))


def _best_shift(a: np.ndarray, b: np.ndarray, reach: int = 8) -> tuple[int, int]:
    """(dy, dx) such that rolling frame a by it matches frame b best (the field wraps around the edges)."""
    errors = {(dy, dx): np.abs(np.roll(a, (dy, dx), axis=(0, 1)) - b).sum()
              for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)}
    return min(errors, key=errors.get)


@pytest.mark.parametrize("motion, expected", [("move_right", (0, 1)), ("move_left", (0, -1)),
                                              ("move_down", (1, 0)), ("move_up", (-1, 0))])
def test_particle_field_translates_as_a_whole(motion, expected):
    frames = render_particles(motion, 9, 64, np.random.default_rng(3)).astype(np.float32).mean(-1)
    # 0.6-1.4 px per frame: 8 frames move the whole field by 5-11 px along the motion only.
    dy, dx = _best_shift(frames[0], frames[8], reach=12)
    assert np.sign([dy, dx]).tolist() == list(expected) and 4 <= abs(dy + dx) <= 12


@pytest.mark.parametrize("motion", ["rotate_cw", "rotate_ccw", "zoom_in", "zoom_out"])
def test_polar_particle_motions(motion):
    paths = _particle_paths(motion, 64, 64, 200, 1.0, np.random.default_rng(0))
    xy0, xy1 = paths(np.array(10.0)) - 32, paths(np.array(11.0)) - 32
    r0, r1 = np.hypot(*xy0.T), np.hypot(*xy1.T)
    turn = np.angle(np.exp(1j * (np.arctan2(xy1[:, 1], xy1[:, 0]) - np.arctan2(xy0[:, 1], xy0[:, 0]))))
    if motion.startswith("rotate"):
        # Image y points down, so clockwise on screen is a growing angle.
        assert np.allclose(r0, r1) and np.allclose(turn, 0.04 if motion == "rotate_cw" else -0.04)
    else:
        # Radii scale by exp(+-0.035) per frame, except the few that wrap around to the other end.
        ratio = r1 / r0
        assert np.mean(np.isclose(ratio, np.exp(0.035 if motion == "zoom_in" else -0.035))) > 0.9
        assert np.allclose(turn, 0)


def test_generate_particles_and_scene_errors(tmp_path):
    root = generate(str(tmp_path / "p"), num_classes=2, per_class=2, num_frames=4, size=64, scene="particles",
                    motions=["move_up", "zoom_in"])
    with decoder.open_video(str(root / "videos" / "zoom_in" / "zoom_in_001.mp4"), "pyav") as reader:
        assert reader.num_frames == 4 and reader.get_frames(range(4)).shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="unknown scene"):
        generate(str(tmp_path / "x"), num_classes=1, per_class=2, scene="stars")
    with pytest.raises(ValueError, match="colour_drift applies to the object scene"):
        generate(str(tmp_path / "x"), num_classes=1, per_class=2, scene="particles", colour_drift=True)


def test_generate_layout_and_determinism(tmp_path):
    # size 64: below that x264 output was observed to vary between runs (see datasets/synthetic.py).
    a = generate(str(tmp_path / "a"), num_classes=2, per_class=3, num_frames=6, size=64, seed=5)
    b = generate(str(tmp_path / "b"), num_classes=2, per_class=3, num_frames=6, size=64, seed=5)
    assert (a / "classes.txt").read_text().split() == list(MOTIONS[:2])
    train = (a / "annotations" / "train.csv").read_text().splitlines()
    assert train == ["move_left/move_left_000.mp4 0", "move_left/move_left_001.mp4 0",
                     "move_right/move_right_000.mp4 1", "move_right/move_right_001.mp4 1"]
    assert (a / "annotations" / "val.csv").read_text() == (a / "annotations" / "test.csv").read_text()
    for folder in ("splits", "knn_splits"):
        for ds in ("ucf101", "hmdb51"):
            assert (a / folder / f"{ds}_train_split_1_videos.txt").read_text().splitlines() == train
    for rel in ("move_left/move_left_002.mp4", "move_right/move_right_000.mp4"):
        with decoder.open_video(str(a / "videos" / rel), "pyav") as ra, \
                decoder.open_video(str(b / "videos" / rel), "pyav") as rb:
            assert ra.num_frames == 6 and torch.equal(ra.get_frames(range(6)), rb.get_frames(range(6)))


def test_crf_0_is_lossless_so_every_generation_decodes_to_the_same_frames(tmp_path):
    # libx264's lossy output varies between processes; lossless (--crf 0) cannot: the decoded
    # yuv420p planes are exactly the encoder's input, whatever bitstream it chose.
    from datasets.synthetic import write_video
    frames = render_particles("rotate_cw", 8, 64, np.random.default_rng(3))
    write_video(str(tmp_path / "v.mp4"), frames, crf=0)
    want = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in frames]
    with av.open(str(tmp_path / "v.mp4")) as video:
        got = list(video.decode(video=0))
    assert len(got) == 8
    for g, w in zip(got, want):
        assert g.format.name == "yuv420p" and np.array_equal(g.to_ndarray(), w.to_ndarray())


def test_generate_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "datasets.synthetic", "--out", str(tmp_path), "--classes", "2",
                          "--per_class", "2", "--frames", "4", "--size", "32", "--scene", "particles"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote 4 videos" in out.stdout and len(list((tmp_path / "videos").rglob("*.mp4"))) == 4


def test_check_videos_report_and_clean_list(tmp_path, make_video):
    make_video(tmp_path / "ok.mp4", num_frames=12)
    make_video(tmp_path / "short.mp4", num_frames=3)
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 64)
    (tmp_path / "list.csv").write_text("ok.mp4 0\nmissing.mp4 1\nbad.mp4 2\nshort.mp4 3\n")
    check_videos.main(["--list", str(tmp_path / "list.csv"), "--prefix", str(tmp_path), "--workers", "2",
                       "--min_frames", "8"])
    with open(tmp_path / "list.report.csv") as f:
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(f)}
    assert {k: r["status"] for k, r in rows.items()} == {"ok.mp4": "ok", "missing.mp4": "missing",
                                                         "bad.mp4": "undecodable", "short.mp4": "too_short"}
    assert rows["ok.mp4"]["frames"] == "12" and rows["ok.mp4"]["fps"] == "30.000"
    assert (rows["ok.mp4"]["height"], rows["ok.mp4"]["width"]) == ("48", "64")
    assert (tmp_path / "list.clean.csv").read_text() == "ok.mp4 0\n"
    # The cleaned list named as training reads it, in a folder of its own that does not exist yet.
    check_videos.main(["--list", str(tmp_path / "list.csv"), "--prefix", str(tmp_path), "--workers", "1",
                       "--out_list", str(tmp_path / "clean lists" / "train.csv"),
                       "--report", str(tmp_path / "reports" / "train.csv")])
    assert (tmp_path / "clean lists" / "train.csv").read_text() == "ok.mp4 0\n"
    assert (tmp_path / "reports" / "train.csv").read_text() == (tmp_path / "list.report.csv").read_text()


def test_check_videos_with_a_wrong_prefix_names_the_flag(tmp_path, make_video, capsys):
    make_video(tmp_path / "videos" / "a" / "v.mp4", num_frames=5)
    (tmp_path / "list.csv").write_text("a/v.mp4 0\n")
    assert check_videos.main(["--list", str(tmp_path / "list.csv"), "--prefix", str(tmp_path), "--workers", "1"]) == 1
    assert (f"None of the videos exists, e.g. '{tmp_path / 'a' / 'v.mp4'}' (--prefix '{tmp_path}' joined to the list "
            "path): set --prefix to the folder the list's paths are relative to") in capsys.readouterr().err
    assert check_videos.main(["--list", str(tmp_path / "list.csv"), "--prefix", str(tmp_path / "videos"),
                              "--workers", "1"]) == 0


def test_check_videos_with_an_empty_list_names_it(tmp_path, capsys):
    # It raised ValueError out of main (a traceback) and wrote nothing; now one line on stderr and exit 1.
    (tmp_path / "list.csv").write_text("\n  \n")
    assert check_videos.main(["--list", str(tmp_path / "list.csv"), "--workers", "1"]) == 1
    assert f"list file {tmp_path / 'list.csv'} has no entries" in capsys.readouterr().err
    assert not (tmp_path / "list.report.csv").exists()


def test_preprocessing_scripts_run_by_path_too(tmp_path):
    """The messages write `python -m datasets.preprocessing.X`; `python datasets/preprocessing/X.py` from another
    folder works too."""
    root = Path(__file__).resolve().parents[1]
    for name in ("check_videos", "resize_videos"):
        done = subprocess.run([sys.executable, str(root / "datasets" / "preprocessing" / f"{name}.py"), "--help"],
                              cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith(f"usage: {name}.py"), done.stderr


def test_resize_videos_short_side(tmp_path, make_video):
    make_video(tmp_path / "src" / "a" / "v.mp4", num_frames=5, size=(48, 64))
    assert resize_videos.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"),
                               "--short_side", "32", "--workers", "1"]) == 0
    with av.open(str(tmp_path / "dst" / "a" / "v.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.frames, float(s.average_rate)) == (42, 32, 5, 30.0)
    assert resize_videos.target_size(340, 256, 256) == (340, 256)


def test_resize_videos_rerun_counts_what_is_there_and_refuses_another_short_side(tmp_path, make_video, capsys):
    make_video(tmp_path / "src" / "a" / "v.avi", num_frames=5, size=(48, 64))
    make_video(tmp_path / "src" / "w.mp4", num_frames=5, size=(48, 64))
    (tmp_path / "list.txt").write_text("a/v.avi 1\nw.mp4 0\n")

    def run(short_side: int, *extra: str) -> int:
        return resize_videos.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--list",
                                   str(tmp_path / "list.txt"), "--short_side", str(short_side), "--workers", "1",
                                   *extra])

    def short_side(name: str) -> int:
        with av.open(str(tmp_path / "dst" / name)) as c:
            return min(c.streams.video[0].width, c.streams.video[0].height)

    assert run(32) == 0 and "2 videos: 2 written, 0 already there (short side 32), 0 failed." in capsys.readouterr().out
    (tmp_path / "dst" / "w.mp4").unlink()  # an interrupted run: the rerun finishes it
    assert run(32) == 0 and "2 videos: 1 written, 1 already there (short side 32), 0 failed." in capsys.readouterr().out
    (tmp_path / "dst" / "w.mp4").unlink()
    assert run(16) == 1
    out = capsys.readouterr()
    assert "2 videos: 1 written, 0 already there (short side 16), 1 failed." in out.out
    assert (f"{tmp_path / 'src' / 'a' / 'v.avi'}: error: the output {tmp_path / 'dst' / 'a' / 'v.mp4'} is already "
            "there with short side 32, not --short_side 16") in out.err and "--overwrite to re-encode it" in out.err
    assert (tmp_path / "dst" / "list.txt").read_text() == "w.mp4 0\n"  # not a line naming a 32-px video
    assert (short_side("a/v.mp4"), short_side("w.mp4")) == (32, 16)
    assert run(16, "--overwrite") == 0 and "2 videos: 2 written, 0 already there" in capsys.readouterr().out
    assert (short_side("a/v.mp4"), short_side("w.mp4")) == (16, 16)
    assert (tmp_path / "dst" / "list.txt").read_text() == "a/v.mp4 1\nw.mp4 0\n"


def test_resize_videos_two_inputs_of_one_output_name_both(tmp_path, make_video):
    for ext in ("avi", "mkv"):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "a" / f"x.{ext}").write_bytes(b"")  # never read: the check comes first
    make_video(tmp_path / "src" / "y.mp4", num_frames=2, size=(48, 64))
    src = tmp_path / "src"
    with pytest.raises(ValueError, match=rf"1 output would be written by several inputs .*: {src / 'a' / 'x.avi'} and "
                                         rf"{src / 'a' / 'x.mkv'} -> {tmp_path / 'dst' / 'a' / 'x.mp4'}\. Rename one"):
        resize_videos.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--workers", "1"])
    assert not (tmp_path / "dst").exists()


def test_resize_videos_absolute_list_paths_are_resized_into_dst(tmp_path, make_video):
    # An absolute path used to be joined to --dst as itself: the input was "already there" and kept unresized.
    src = tmp_path / "src"
    make_video(src / "a b" / "v.avi", num_frames=5, size=(48, 64))
    make_video(src / "w.mp4", num_frames=5, size=(48, 64))
    (tmp_path / "list.txt").write_text(f"{src / 'a b' / 'v.avi'} 1\nw.mp4 0\n")
    assert resize_videos.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--list", str(tmp_path / "list.txt"),
                               "--short_side", "32", "--workers", "1"]) == 0
    assert (tmp_path / "dst" / "list.txt").read_text() == "a b/v.mp4 1\nw.mp4 0\n"
    for name in ("a b/v.mp4", "w.mp4"):
        with av.open(str(tmp_path / "dst" / name)) as c:
            assert (c.streams.video[0].width, c.streams.video[0].height) == (42, 32)
    assert not (src / "a b" / "v.mp4").exists()
    (tmp_path / "other.txt").write_text(f"{tmp_path / 'elsewhere.mp4'} 0\n")
    with pytest.raises(ValueError, match=f"other.txt: the absolute path {tmp_path / 'elsewhere.mp4'} is not under "
                                         f"--src {src}; set --src to the folder that holds the videos"):
        resize_videos.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--list", str(tmp_path / "other.txt")])
    assert resize_videos.target_size(480, 640, 256) == (256, 342)


def test_resize_videos_list_leaves_out_the_videos_that_failed(tmp_path, make_video, capsys):
    src = tmp_path / "src"
    make_video(src / "clap" / "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", num_frames=5, size=(48, 64))
    (src / "clap" / "garbage.avi").write_bytes(b"\x00not a video" * 100)
    (tmp_path / "list.txt").write_text("clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 2\nclap/garbage.avi 2\n"
                                       "clap/gone.avi 2\n")
    assert resize_videos.main(["--src", str(src), "--dst", str(tmp_path / "dst"), "--list", str(tmp_path / "list.txt"),
                               "--short_side", "32", "--workers", "1"]) == 1
    assert (tmp_path / "dst" / "list.txt").read_text() == "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.mp4 2\n"
    out = capsys.readouterr()
    assert "(2 lines of videos that failed left out)" in out.out
    assert f"{src / 'clap' / 'gone.avi'}: error:" in out.err and "3 videos: 1 written" in out.out
