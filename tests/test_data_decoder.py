"""Decoding backends and the frame-index maths of the original."""
import re

import numpy as np
import pytest
import torch

from datasets import decoder
from datasets.synthetic import write_video
from tests.conftest import DAMAGED_FRAMES, damaged_video
from tests.frame_code import BACKENDS, backend_unavailable, code_frame, read_index, require_backend


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [3, 7, 11, 17, 22, 23], [17, 18, 23], [5]])
def test_backends_return_the_same_frames_on_h264_mp4(tmp_path, indices):
    # Frames that carry their index (tests/frame_code.py): every backend here returns exactly the frames asked
    # for, and the backends' pixels agree frame by frame within 2 levels (their RGB conversions may differ by a
    # level or two), far below what a neighbouring frame differs by (a whole band of the code).
    path = str(tmp_path / "coded.mp4")
    write_video(path, np.stack([code_frame(i, 64, 64) for i in range(24)]))
    frames = {}
    for backend in (b for b in BACKENDS if not backend_unavailable(b)):
        with decoder.open_video(path, backend) as reader:
            assert reader.num_frames == 24 and reader.fps == 30.0 and not reader.sequential
            frames[backend] = reader.get_frames(indices)
        assert frames[backend].dtype == torch.uint8 and frames[backend].shape == (len(indices), 64, 64, 3)
        assert [read_index(f) for f in frames[backend]] == indices, backend
    reference = frames["pyav"].float()
    for backend, got in frames.items():
        assert (got.float() - reference).abs().mean(dim=(1, 2, 3)).max() < 2, backend
    with decoder.open_video(path, "pyav") as reader:
        neighbours = reader.get_frames([i + 1 for i in indices if i < 23]).float()
    assert ((neighbours - reference[:len(neighbours)]).abs().mean(dim=(1, 2, 3)) > 20).all()


@pytest.mark.parametrize("gop", [None, 4])   # one keyframe, or a keyframe every 4 frames (real seeks)
@pytest.mark.parametrize("backend", decoder.BACKENDS)
def test_frames_come_back_in_order(tmp_path, make_video, backend, gop):
    require_backend(backend)
    levels = [10 + 6 * i for i in range(30)]
    path = make_video(tmp_path / "levels.mp4", levels=levels, gop=gop)
    for indices in ([2, 9, 25, 29], [13, 14, 22], [0, 1]):
        with decoder.open_video(str(path), backend) as reader:
            frames = reader.get_frames(indices)
        assert ((frames.float().mean(dim=(1, 2, 3)) - 10) / 6).round().long().tolist() == indices


@pytest.mark.parametrize("backend", decoder.BACKENDS)
def test_missing_and_corrupt_files_raise_decode_error(tmp_path, backend):
    require_backend(backend)
    with pytest.raises(decoder.DecodeError, match="no such file"):
        decoder.open_video(str(tmp_path / "none.mp4"), backend)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(decoder.DecodeError, match="bad.mp4"):
        with decoder.open_video(str(bad), backend) as reader:
            reader.get_frames([0])


@pytest.mark.parametrize("backend", decoder.BACKENDS)
def test_a_video_damaged_mid_stream_names_the_frames_that_do_not_decode(tmp_path, backend):
    # It opens and its first frames decode; the frames inside the damage are an error naming them, not
    # frames made up (black or repeated) that would train or score as real ones.
    require_backend(backend)
    path = tmp_path / "damaged.mp4"
    inside = damaged_video(path)
    assert len(inside) >= 3 and inside[0] > 2
    with decoder.open_video(str(path), backend) as reader:
        assert reader.num_frames == DAMAGED_FRAMES
        assert reader.get_frames([0, 1, 2]).shape == (3, 48, 64, 3)
        message = f"{path}: frames {inside[:3]} of {DAMAGED_FRAMES} do not decode"
        with pytest.raises(decoder.DecodeError, match=re.escape(message)):
            reader.get_frames([0] + inside[:3])


def test_start_end_idx():
    assert decoder.get_start_end_idx(300, 256, 0, 1) == (0, 255)
    assert decoder.get_start_end_idx(300, 256, 1, 3) == (44 / 3, 44 / 3 + 255)
    assert decoder.get_start_end_idx(100, 256, 0, 1) == (0, 255)   # shorter than the clip: start 0
    torch.manual_seed(0)
    starts = [decoder.get_start_end_idx(300, 256, -1, 1)[0] for _ in range(200)]
    assert 0 <= min(starts) and max(starts) <= 44 and max(starts) - min(starts) > 30


def test_clip_size_resamples_to_target_fps():
    assert decoder.clip_size_frames(8, 32, 30, 30.0) == 256
    assert decoder.clip_size_frames(8, 32, 30, 15.0) == 128
    assert decoder.clip_size_frames(8, 32, 30, 60.0) == 512


def test_temporal_indices_linspace_clamp_truncate():
    assert decoder.temporal_indices(0, 255, 8, 256).tolist() == [0, 36, 72, 109, 145, 182, 218, 255]
    assert decoder.temporal_indices(0, 15, 4, 10).tolist() == [0, 5, 9, 9]   # clamped to length - 1


def test_ssl_view_indices_match_original_for_l256():
    torch.manual_seed(0)
    views = decoder.ssl_view_indices(256, (8, 8), (8,) * 8)
    assert views[0].tolist() == [0, 35, 71, 107, 143, 179, 215, 251]
    assert views[1].tolist() == [5, 40, 76, 112, 148, 184, 220, 255]
    for local in views[2:]:
        start = int(local[0])
        assert 0 <= start <= 256 - 32 - 1
        assert local.tolist() == torch.linspace(start, start + 32, 8).long().tolist()
    assert len({int(v[0]) for v in views[2:]}) > 1   # independent windows


def test_local_view_windows_start_anywhere_in_0_to_l_minus_w_minus_1():
    # L = 64, W = L // 8 = 8: a local view's window starts uniformly in [0, L - W - 1] = [0, 55], each of the 56
    # starts reached (2400 draws), none later (its last frame, start + W, stays below L).
    torch.manual_seed(0)
    starts = [int(v[0]) for _ in range(300) for v in decoder.ssl_view_indices(64, (2, 2), (2,) * 8)[2:]]
    assert set(starts) == set(range(56))


def test_ssl_view_indices_rand_fr_counts():
    views = decoder.ssl_view_indices(256, (4, 8), (2, 2, 4, 4, 8, 8, 16, 16))
    assert [len(v) for v in views] == [4, 8, 2, 2, 4, 4, 8, 8, 16, 16]
    assert views[0].tolist() == [0, 83, 167, 251]


def test_clip_window():
    assert decoder.clip_window(300, 256, 0, 1) == (0, 257)        # whole-number start: the trailing frame too
    assert decoder.clip_window(300, 256, 1, 3) == (15, 256)       # start 14.67 -> frames 15..270
    assert decoder.clip_window(100, 256, 0, 1) == (0, 100)
    assert decoder.clip_window(300, 29.97 * 256 / 30, 0, 1) == (0, 256)   # 255.74 frames at 29.97 fps: 0..255


def _original_window(num_frames: int, start: float, clip_size: float) -> list[int]:
    """The original's PyAV selection on a constant-rate video: frames with timestamps in [start, end]
    (end = start + clip_size - 1, in frame units) plus the one after, within the video."""
    inside = [k for k in range(num_frames) if start <= k <= start + clip_size - 1]
    return inside + [k for k in range(inside[-1] + 1, min(inside[-1] + 2, num_frames))]


@pytest.mark.parametrize("clip_size", [256.0, 255.744, 64.0])
def test_random_window_starts_where_the_original_does(clip_size):
    # The original's first frame is the first at or after the real-valued start (ceil), not floor.
    for seed in range(40):
        torch.manual_seed(seed)
        first, length = decoder.clip_window(300, clip_size, -1, 1)
        torch.manual_seed(seed)
        start, _ = decoder.get_start_end_idx(300, clip_size, -1, 1)
        assert list(range(first, first + length)) == _original_window(300, start, clip_size)
        assert start != int(start) and first == int(start) + 1


@pytest.mark.parametrize("backend", decoder.BACKENDS)
def test_decode_views_decodes_union_once(tmp_path, make_video, backend):
    require_backend(backend)
    path = make_video(tmp_path / "levels.mp4", levels=[10 + 6 * i for i in range(30)])
    calls = []
    with decoder.open_video(str(path), backend) as reader:
        original = reader.get_frames
        reader.get_frames = lambda idx: calls.append(list(idx)) or original(idx)
        views = decoder.decode_views(reader, 4, [torch.tensor([0, 5, 10]), torch.tensor([5, 6, 6])])
    assert calls == [[4, 9, 10, 14]]
    got = [((v.float().mean(dim=(1, 2, 3)) - 10) / 6).round().long().tolist() for v in views]
    assert got == [[4, 9, 14], [9, 10, 10]]


def test_auto_prefers_torchcodec_and_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(decoder, "_LOGGED_CHOICE", set())
    monkeypatch.setattr(decoder, "torchcodec_status", lambda: "")
    monkeypatch.setattr(decoder, "decord_status", lambda: "")
    with caplog.at_level("INFO", logger="datasets.decoder"):
        assert decoder.resolve_backend("auto") == "torchcodec"
        assert decoder.resolve_backend("auto") == "torchcodec"
    assert [r.getMessage() for r in caplog.records] == ["DATA.DECODING_BACKEND auto -> torchcodec"]   # once
    monkeypatch.setattr(decoder, "torchcodec_status", lambda: "RuntimeError: Could not load libtorchcodec")
    assert decoder.resolve_backend("auto") == "decord"
    monkeypatch.setattr(decoder, "decord_status", lambda: "ImportError: no decord")
    assert decoder.resolve_backend("auto") == "pyav"
    with pytest.raises(ImportError, match="torchcodec cannot be used: RuntimeError.*install_deps.sh"):
        decoder.resolve_backend("torchcodec")
    with pytest.raises(ValueError, match="'nvdec' is not one of"):
        decoder.resolve_backend("nvdec")


def test_broken_torchcodec_install_is_reported_not_raised(monkeypatch):
    # An incompatible torchcodec (here: its module fails to import) gives a reason, so `auto` falls back.
    import sys
    decoder.torchcodec_status.cache_clear()
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    try:
        assert decoder.torchcodec_status().startswith(("ImportError", "ModuleNotFoundError"))
    finally:
        decoder.torchcodec_status.cache_clear()


def test_a_torchcodec_built_for_another_torch_is_passed_over_and_named(tmp_path, monkeypatch, caplog):
    # requirements.txt lets an older torch keep a torchcodec built for a newer one (torchcodec 0.17 on torch 2.5):
    # its import raises an OSError of its library. `auto` falls back with one line that says why (with both
    # versions), DATA.DECODE_DEVICE cuda gets the ImportError that names the reason and the fix, and the NVDEC
    # cache guard leaves it to that error.
    import sys
    fake = tmp_path / "torchcodec"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libnvrtc.so.13: cannot open shared object file (simulated)')\n")
    (tmp_path / "torchcodec-0.99.0.dist-info").mkdir()  # its installed version, which the reason names
    (tmp_path / "torchcodec-0.99.0.dist-info" / "METADATA").write_text("Name: torchcodec\nVersion: 0.99.0\n")
    for name in [m for m in sys.modules if m == "torchcodec" or m.startswith("torchcodec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    decoder.torchcodec_status.cache_clear()
    try:
        assert decoder.guard_nvdec_cache() is False
        with pytest.raises(ImportError, match=r"DATA.DECODE_DEVICE cuda decodes with torchcodec: OSError: libnvrtc"
                                              r".*\(simulated\) \(torchcodec 0\.99\.0, torch .*\)\. Fix: pip install "
                                              r"the torchcodec release that matches"):
            decoder.decode_on_device(torch.zeros(1, dtype=torch.uint8), [0], None, "cpu", "v.mp4")
        why = "OSError: libnvrtc.so.13: cannot open shared object file (simulated) (torchcodec 0.99.0, torch "
        assert decoder.torchcodec_status() == f"{why}{torch.__version__})"
        monkeypatch.setattr(decoder, "_LOGGED_CHOICE", set())
        with caplog.at_level("INFO", logger="datasets.decoder"):
            backend = decoder.resolve_backend("auto")
        assert backend in ("decord", "pyav") and len(caplog.records) == 1
        assert caplog.records[0].getMessage().startswith(f"DATA.DECODING_BACKEND auto -> {backend} (torchcodec "
                                                         f"unavailable: {why}{torch.__version__})")
    finally:
        decoder.torchcodec_status.cache_clear()
