"""DATA.DECODE_DEVICE cuda: plans drawn in the workers, views decoded and rendered on a device. On the CPU the
same code path must give the CPU path's views for the same per-sample seed (within the resize's rounding)."""
import dataclasses
import logging
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import train_ssl
from datasets import VideoDataAugmentationDINO, build_dataset, decoder, device_views, transform
from datasets.device_views import (DecodeThreads, DeviceViewLoader, DeviceViews, collate_plans, render_views,
                                   resize_as_uint8)
from datasets.seeding import SeededDataset
from datasets.synthetic import write_video
from tests.frame_code import require_backend

# One uint8 level after normalisation is 1 / 255 / std ~ 0.0175; the device resize is within 1-2 levels of
# torchvision's uint8 kernel (its fixed-point weights: a level apart for ~0.3% of the values of a generic
# downscale, ~5% of an upscale, as the small crops of these 64 x 64 videos do, ~13% of the exact halving and
# quartering of DATA.NO_SPATIAL here), and jitter factors up to 1.4 scale that. A wrong crop, frame or jitter
# is many levels off.
LEVEL = 1 / 255 / min(transform.IMAGENET_STD)


@pytest.fixture
def torchcodec_works():
    """Skips a test of DATA.DECODE_DEVICE's decoding (torchcodec, on the CPU here) where torchcodec does not work,
    e.g. a release built for another torch than this one (requirements.txt lets a cluster keep an older torch)."""
    require_backend("torchcodec")


def _aug(**kw):
    return VideoDataAugmentationDINO(global_size=32, local_size=16, global_frames=(4, 8),
                                     local_frames=(2, 2, 4, 4, 8, 8, 16, 16), **kw)


def _datasets(synthetic_cfg, aug, key: str = "DATA.DECODE_DEVICE"):
    """The CPU path's dataset and the plans' (DATA.DECODE_DEVICE cuda: bytes; DATA.AUGMENT_DEVICE cuda: frames
    decoded by the worker), both seeded per sample."""
    cpu = build_dataset("kinetics400", synthetic_cfg(), "train", ssl_aug=aug)
    plans = build_dataset("kinetics400", synthetic_cfg(**{key: "cuda"}), "train", ssl_aug=aug)
    return SeededDataset(cpu), SeededDataset(plans)


def _assert_views_close(device_views, cpu_views):
    assert [tuple(v.shape) for v in device_views] == [tuple(v.shape) for v in cpu_views]
    for d, c in zip(device_views, cpu_views):
        diff = (d.cpu() - c).abs()
        assert diff.max() < 3 * LEVEL and diff.mean() < 0.2 * LEVEL


@pytest.mark.parametrize("key", ["DATA.DECODE_DEVICE", "DATA.AUGMENT_DEVICE"])
@pytest.mark.parametrize("no_spatial", [False, True])
def test_device_path_on_cpu_gives_the_cpu_views_for_the_same_seed(synthetic_cfg, device, no_spatial, key):
    if key == "DATA.DECODE_DEVICE":
        require_backend("torchcodec")
    aug = _aug(no_spatial=no_spatial)
    cpu, plans = _datasets(synthetic_cfg, aug, key)
    items = [(i % len(cpu), 1000 + i) for i in range(5)]
    expected = [torch.stack(views) for views in zip(*(cpu[item][0] for item in items))]
    batch = collate_plans([plans[item] for item in items])
    stage = DeviceViews(aug.sizes, device, decode_timeout=0)
    views, skipped = stage(batch[0])
    assert all(v.device.type == device.type for v in views)
    assert skipped.tolist() == [0] * 5 and stage.failed == 0 and stage.cpu_fallbacks == 0
    if device.type == "cuda":  # NVDEC's colour conversion is not FFmpeg's swscale: compare on average
        for d, c in zip(views, expected):
            assert (d.cpu() - c).abs().mean() < 2 * LEVEL
    else:
        _assert_views_close(views, expected)


def test_plan_holds_bytes_frames_and_the_cpu_path_draws(synthetic_cfg):
    aug = _aug()
    cpu, plans = _datasets(synthetic_cfg, aug)
    plan, label, index, meta = plans[(2, 7)]
    assert label == cpu[(2, 7)][1] and index == 2 and meta == {"skipped": 0}
    assert plan["video"].dtype == torch.uint8 and plan["video"].numel() > 1000 and plan["decoded"] is None
    assert [len(p) for p in plan["positions"]] == [4, 8, 2, 2, 4, 4, 8, 8, 16, 16]
    assert torch.equal(plan["frames"], plan["frames"].unique())  # sorted, unique: one decode of the union
    rows = plan["params"]
    assert rows.shape == (10, transform.PARAM_COLUMNS)
    # the CPU path's draws, replayed under the sample's seed (the synthetic videos are 64 x 64)
    data = synthetic_cfg().DATA
    torch.manual_seed(7)
    with decoder.open_video(plans.dataset.video_paths[2]) as reader:
        clip = decoder.clip_size_frames(data.NUM_FRAMES, data.SAMPLING_RATE, data.TARGET_FPS, reader.fps)
        first, length = decoder.clip_window(reader.num_frames, clip, -1, 1)
    assert plan["info"].num_frames == reader.num_frames and np.array_equal(plan["info"].pts, reader.info.pts)
    views = decoder.ssl_view_indices(length, aug.global_frames, aug.local_frames)
    union, _ = decoder.union_positions(first, views)
    expected = torch.tensor([p.as_row() for p in aug.draw_params(64, 64)], dtype=torch.float64)
    assert torch.equal(plan["frames"], union) and torch.equal(rows, expected)


def test_augment_device_plan_holds_the_workers_frames_and_the_cpu_path_draws(synthetic_cfg):
    # DATA.AUGMENT_DEVICE cuda: the worker decodes the union as the CPU path does and ships it with the parameters
    # the CPU path draws (the NVDEC plan's, checked against the CPU path above), leaving the RNG where it does.
    aug = _aug()
    cpu, nvdec_plans = _datasets(synthetic_cfg, aug)
    _, decoded_plans = _datasets(synthetic_cfg, aug, "DATA.AUGMENT_DEVICE")
    reference = nvdec_plans[(2, 7)][0]
    plan, label, index, meta = decoded_plans[(2, 7)]
    assert (label, index, meta) == (cpu[(2, 7)][1], 2, {"skipped": 0})
    assert plan["video"] is None and plan["info"] is None and plan["decoded"].dtype == torch.uint8
    assert torch.equal(plan["params"], reference["params"])
    assert all(torch.equal(a, b) for a, b in zip(plan["positions"], reference["positions"]))
    with decoder.open_video(decoded_plans.dataset.video_paths[2]) as reader:
        assert torch.equal(plan["decoded"], reader.get_frames(reference["frames"].tolist()))
    for dataset in (cpu.dataset, decoded_plans.dataset):
        torch.manual_seed(7)
        dataset[2]
        dataset.after = torch.rand(())
    assert torch.equal(cpu.dataset.after, decoded_plans.dataset.after)


def test_augment_device_says_once_to_resize_videos_whose_frames_are_large(synthetic_cfg, monkeypatch, caplog):
    from datasets import video_dataset
    monkeypatch.setattr(video_dataset, "LARGE_PLAN_BYTES", 1000)
    monkeypatch.setattr(video_dataset, "_LOGGED_FAILURES", set())
    _, plans = _datasets(synthetic_cfg, _aug(), "DATA.AUGMENT_DEVICE")
    with caplog.at_level(logging.WARNING, logger="datasets.video_dataset"):
        plans[(0, 1)], plans[(1, 2)]
    warned = [r.getMessage() for r in caplog.records if "AUGMENT_DEVICE" in r.getMessage()]
    assert len(warned) == 1 and "resize the videos to short side 256" in warned[0] and "64x64 frames" in warned[0]


@pytest.mark.usefixtures("torchcodec_works")
def test_a_device_out_of_memory_is_raised_not_decoded_on_the_cpu(synthetic_cfg, monkeypatch):
    # An OOM is the device's state, not the file's: decoding the video sequentially on the CPU (and flagging it so
    # for the rest of the run) would hide it.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(0, 3)]])[0]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(decoder, "_open_torchcodec", out_of_memory)
    stage = DeviceViews(aug.sizes, "cpu", decode_timeout=0)
    with pytest.raises(torch.OutOfMemoryError):
        stage(batch)
    stage.close()
    assert stage.sequential_total == 0 and stage.failed == 0


def test_render_matches_cpu_apply_for_each_operation(device):
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (6, 40, 56, 3), dtype=torch.uint8)
    cases = [transform.ViewParams((3, 5, 30, 40)),  # upscale
             transform.ViewParams((0, 0, 40, 56), flip=True),  # downscale, flip
             transform.ViewParams((4, 2, 20, 24), jitter=(1.3, 0.7, 1.15), order=(2, 0, 1)),
             transform.ViewParams((4, 2, 36, 24), jitter=(0.65, 1.35, 0.85), order=(1, 2, 0), gray=True)]
    positions = torch.tensor([0, 2, 2, 5])
    for size in (16, 48):
        expected = torch.stack([transform.apply_view_params(frames, p, size, positions) for p in cases])
        params = torch.tensor([[p.as_row()] for p in cases], dtype=torch.float64)
        (views,) = render_views([frames.to(device)] * len(cases), [[positions]] * len(cases), params, [size])
        _assert_views_close([views], [expected])


def test_render_sends_a_batch_of_views_to_the_device_in_two_copies(monkeypatch):
    # On CUDA every copy from pageable host memory first waits for the device's queued work (torch's sync debug
    # mode does not see it): the positions and parameters of all samples and views go over in two pinned copies.
    copies = []

    def counted(tensor, device):
        copies.append(tuple(tensor.shape))
        return tensor.to(device)

    monkeypatch.setattr(device_views, "host_to_device", counted)
    frames = torch.randint(0, 256, (6, 40, 56, 3), dtype=torch.uint8)
    view = transform.ViewParams((4, 2, 20, 24), True, (1.3, 0.7, 1.15), (2, 0, 1), True).as_row()
    params = torch.tensor([[view] * 3] * 2, dtype=torch.float64)
    positions = [[torch.tensor([0, 2, 2, 5]), torch.tensor([1, 3]), torch.tensor([4, 5])]] * 2
    views = render_views([frames, frames], positions, params, [16, 8, 8])
    assert [tuple(v.shape) for v in views] == [(2, 3, 4, 16, 16), (2, 3, 2, 8, 8), (2, 3, 2, 8, 8)]
    assert copies == [(16,), (2 * 3 * transform.PARAM_COLUMNS + 6,)]


def test_resize_as_uint8_is_torchvisions_uint8_resize_within_a_level():
    torch.manual_seed(1)
    for h, w, size in ((20, 30, 32), (90, 80, 32), (64, 40, 32)):
        x = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8)
        ours = resize_as_uint8(x.permute(0, 3, 1, 2).float(), size)
        assert (ours - transform.resize_uint8(x, size).float()).abs().max() <= 2


@pytest.mark.usefixtures("torchcodec_works")
def test_undecodable_sample_takes_another_samples_views(synthetic_cfg):
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i, i)] for i in range(3)])[0]
    batch["video"][1] = torch.zeros(5000, dtype=torch.uint8)  # not a video any more
    stage = DeviceViews(aug.sizes, "cpu", decode_timeout=0)
    views, skipped = stage(batch)
    assert skipped.tolist() == [0, 1, 0] and stage.failed == 1
    assert all(torch.equal(v[1], v[2]) for v in views)  # sample 1 took sample 2's views
    for b in range(3):
        batch["video"][b] = torch.zeros(10, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="no video of the batch decoded on cpu"):
        stage(batch)


@pytest.mark.usefixtures("torchcodec_works")
def test_a_video_torchcodec_fails_on_is_decoded_sequentially_not_skipped(synthetic_cfg, monkeypatch):
    # torchcodec raises on sample 1 (a file it cannot open, or frames whose timestamps are not the probe's):
    # the stage decodes that video sequentially on the CPU from the same bytes, its views are the ones a
    # working torchcodec gives, and the loader flags the video as decoded sequentially.
    from datasets.video_dataset import sequential_decodes
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    order = [(i, 70 + i) for i in range(3)]
    batches = DataLoader(plans, sampler=order, batch_size=3, collate_fn=collate_plans)
    (expected, *_), = list(DeviceViewLoader(batches, DeviceViews(aug.sizes, "cpu", decode_timeout=0)))
    real, failing = decoder.decode_on_device, plans.dataset.video_paths[1]

    def flaky(data, indices, info, device, path):
        if path == failing:
            raise decoder.DecodeError(f"{path}: torchcodec on cpu returned other frames than the probe's (test)")
        return real(data, indices, info, device, path)

    monkeypatch.setattr(decoder, "decode_on_device", flaky)
    stage = DeviceViews(aug.sizes, "cpu", decode_timeout=0)
    (views, _, _, meta), = list(DeviceViewLoader(batches, stage))
    assert stage.sequential == [1] and stage.sequential_total == 1 and stage.failed == 0
    assert meta["skipped"].tolist() == [0, 0, 0]
    for got, want in zip(views, expected):
        assert (got - want).abs().max() < 3 * LEVEL                # the same frames, whichever decoder
    assert sequential_decodes(plans) == 1


@pytest.mark.usefixtures("torchcodec_works")
def test_frames_of_another_size_than_the_probes_are_decoded_sequentially(synthetic_cfg, monkeypatch):
    # The crop boxes are drawn on the probe's upright frame: a decoder that returns another size (torchcodec's
    # CUDA path has had such bugs with odd sizes and crops) would shift or cut every view. Such a video is
    # decoded sequentially on the CPU instead.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i, 90 + i)] for i in range(2)])[0]
    real_open = decoder._open_torchcodec

    def one_column_short(*args, **kwargs):
        video = real_open(*args, **kwargs)
        real_get = video.get_frames_at

        def get_frames_at(indices):
            batch = real_get(indices)
            return dataclasses.replace(batch, data=batch.data[:, :, 1:])

        video.get_frames_at = get_frames_at
        return video

    monkeypatch.setattr(decoder, "_open_torchcodec", one_column_short)
    info = batch["info"][0]
    with pytest.raises(decoder.DecodeError, match=f"returned {info.width - 1}x{info.height} frames, the probe's "
                                                  f"are {info.width}x{info.height}"):
        decoder.decode_on_device(batch["video"][0], batch["frames"][0].tolist(), info, "cpu", "v.mp4")
    stage = DeviceViews(aug.sizes, "cpu", decode_timeout=0)
    frames = stage.decode(batch, 0)
    assert stage.sequential == [0] and tuple(frames.shape[1:3]) == (info.height, info.width)


@pytest.mark.usefixtures("torchcodec_works")
def test_threads_give_the_one_thread_views_and_counts(synthetic_cfg, monkeypatch):
    # A batch with a video torchcodec fails on (decoded sequentially instead) and one that does not decode at all,
    # decoded one video at a time and four at once: the same views bit for bit, the same counts and flags.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i % len(plans), 20 + i)] for i in range(6)])[0]
    batch["video"][4] = torch.zeros(5000, dtype=torch.uint8)  # not a video any more
    real, failing = decoder.decode_on_device, batch["path"][1]

    def flaky(data, indices, info, device, path):
        if path == failing:
            raise decoder.DecodeError(f"{path}: torchcodec on cpu returned other frames than the probe's (test)")
        return real(data, indices, info, device, path)

    monkeypatch.setattr(decoder, "decode_on_device", flaky)
    results = []
    for threads in (1, 4):
        stage = DeviceViews(aug.sizes, "cpu", threads=threads, decode_timeout=0)
        views, skipped = stage(batch)
        stage.close()
        results.append((views, skipped, stage.sequential, stage.sequential_total, stage.failed))
    (views_1, *counts_1), (views_4, *counts_4) = results
    assert all(torch.equal(a, b) for a, b in zip(views_1, views_4))
    assert [c.tolist() if torch.is_tensor(c) else c for c in counts_1] == \
        [c.tolist() if torch.is_tensor(c) else c for c in counts_4]
    assert counts_4[0].tolist() == [0, 0, 0, 0, 1, 0] and counts_4[3] == 1
    assert 1 in counts_4[1] and counts_4[2] == len(counts_4[1])


@pytest.mark.usefixtures("torchcodec_works")
def test_a_batch_decodes_its_videos_at_once_and_a_pass_ends_its_threads(synthetic_cfg, monkeypatch):
    # NVDEC decodes one frame at a time per video, so the stage keeps DATA.DEVICE_DECODE_THREADS videos in
    # flight: three decodes must be running together to pass the barrier (one at a time, it breaks).
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    barrier, real = threading.Barrier(3, timeout=20), decoder.decode_on_device

    def together(*args):
        barrier.wait()
        return real(*args)

    monkeypatch.setattr(decoder, "decode_on_device", together)
    before = set(threading.enumerate())
    stage = DeviceViews(aug.sizes, "cpu", threads=3, decode_timeout=0)
    order = [(i, 40 + i) for i in range(3)] * 2
    loader = DeviceViewLoader(DataLoader(plans, sampler=order, batch_size=3, collate_fn=collate_plans), stage)
    batches = list(loader)
    assert len(batches) == 2 and all(meta["skipped"].sum() == 0 for *_, meta in batches)
    # the threads end with the pass: none is alive when the next pass's DataLoader forks its workers
    assert stage._pool is None and not [t for t in set(threading.enumerate()) - before if t.name.startswith("svt")]
    with pytest.raises(ValueError, match="DATA.DEVICE_DECODE_THREADS must be >= 1, got 0"):
        DeviceViews(aug.sizes, "cpu", threads=0, decode_timeout=0)


@pytest.mark.usefixtures("torchcodec_works")
def test_the_stage_renders_what_render_views_renders_from_its_frames(synthetic_cfg):
    # The stage crops and resizes each sample in its decode threads and colours the batch in this one:
    # bit for bit render_views of the same frames.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i % len(plans), 30 + i)] for i in range(3)])[0]
    stage = DeviceViews(aug.sizes, "cpu", threads=2, decode_timeout=0)
    views, _ = stage(batch)
    stage.close()
    frames = [stage.decode(batch, b) for b in range(3)]
    expected = render_views(frames, batch["positions"], batch["params"], aug.sizes)
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    batch["params"] = batch["params"][..., :11]
    with pytest.raises(ValueError, match="plans carry 11 parameter columns, expected 12"):
        stage(batch)


def test_decode_streams_are_made_once_and_each_pass_gives_its_threads_distinct_ones(monkeypatch):
    # The caching allocator reuses a freed block only on the stream it was made on: streams made anew each pass
    # would leave the blocks cached on the last pass's streams idle. CUDA streams stand in for fakes here.
    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    stage = DeviceViews([16], "cpu", threads=3, decode_timeout=0)
    for _ in range(2):  # two passes, each with three new threads
        barrier = threading.Barrier(3, timeout=20)

        def take(_):
            barrier.wait()  # three distinct threads
            return stage._stream()

        stage._pool = DecodeThreads(3, "test")
        streams = [future.result() for future in [stage._pool.submit(take, k) for k in range(3)]]
        stage.close()
        assert len({id(s) for s in streams}) == 3
    assert len(made) == 3


def test_decode_threads_give_results_and_errors_drop_jobs_not_begun_and_leave_a_stuck_one_behind():
    """DeviceViews' pool: each job's result or exception through its future; close cancels the jobs no thread has
    begun, waits for the running ones at most grace_s, and returns the threads still running then (daemon threads,
    which the interpreter does not join at exit)."""
    pool = DecodeThreads(2, "test")
    assert all(thread.daemon for thread in pool.threads) and len(pool.threads) == 2
    assert pool.submit(lambda a, b: a * b, 6, 7).result(timeout=20) == 42
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=20)
    release, began = threading.Event(), threading.Barrier(3, timeout=20)

    def stuck() -> str:
        began.wait()
        release.wait()
        return "ended"

    running = [pool.submit(stuck) for _ in range(2)]
    queued = pool.submit(lambda: "never run")
    began.wait()  # both threads are inside their jobs
    start = time.monotonic()
    left = pool.close(grace_s=0.5)
    assert 0.4 < time.monotonic() - start < 10
    assert left == pool.threads and queued.cancelled() and not any(f.done() for f in running)
    release.set()
    assert [f.result(timeout=20) for f in running] == ["ended", "ended"]
    for thread in pool.threads:
        thread.join(timeout=20)
        assert not thread.is_alive()  # the stop sent at close ends each thread after its job
    idle = DecodeThreads(3, "test")
    assert idle.close(grace_s=20) == []


@pytest.mark.usefixtures("torchcodec_works")
def test_on_cuda_each_sample_is_made_on_its_threads_stream_and_handed_to_the_current_one(synthetic_cfg,
                                                                                        monkeypatch):
    # The stage's CUDA-only branch (_on_stream, _collect), which no CPU device runs: torch.cuda's stream calls are
    # recorded here (the tensors stay on the CPU). Each sample is decoded and cropped inside its thread's stream
    # and the stage's device, an event is recorded on that stream after the work, the current stream waits for
    # every event, and every tensor handed over is recorded on the current stream (else the caching allocator
    # could reuse its memory while the current stream still reads it).
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i % len(plans), 70 + i)] for i in range(3)])[0]
    expected, _ = DeviceViews(aug.sizes, "cpu", decode_timeout=0)(batch)
    cuda, local, calls = torch.device("cuda", 0), threading.local(), []

    class Stream:
        def __init__(self, device):
            self.device = device

        def record_event(self):
            event = object()
            calls.append(("event", self, event))
            return event

    class Current:
        def wait_event(self, event):
            calls.append(("wait", event))

    def within(name, value):
        class Context:
            def __enter__(self):
                setattr(local, name, value)

            def __exit__(self, *exc):
                setattr(local, name, None)
        return Context()

    def on(name, real):
        def call(*args):
            calls.append((name, getattr(local, "stream", None), getattr(local, "device", None)))
            return real(*args)
        return call

    current = Current()
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: within("stream", stream))
    monkeypatch.setattr(torch.cuda, "device", lambda device: within("device", device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current if device == cuda else None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: calls.append(("handed", stream)))
    monkeypatch.setattr(device_views, "host_to_device", lambda tensor, device: tensor)
    real_decode = decoder.decode_on_device
    monkeypatch.setattr(decoder, "decode_on_device", on("decode", lambda data, indices, info, device, path: real_decode(
        data, indices, info, "cpu" if device == cuda else device, path)))
    monkeypatch.setattr(device_views, "crop_and_resize", on("crop", device_views.crop_and_resize))
    stage = DeviceViews(aug.sizes, "cpu", threads=2, decode_timeout=0)
    stage.device = cuda  # as built for a CUDA device, without its NVDEC check
    views, skipped = stage(batch)
    stage.close()
    assert all(torch.equal(a, b) for a, b in zip(views, expected)) and skipped.tolist() == [0, 0, 0]
    work = [c for c in calls if c[0] in ("decode", "crop")]
    assert len(work) == 6 and all(isinstance(s, Stream) and s.device == cuda and d == cuda for _, s, d in work)
    for stream in stage._streams:  # on each stream, every sample's decode, then its crops, then its event
        made = [c[0] for c in calls if c[0] in ("decode", "crop", "event") and c[1] is stream]
        assert made == ["decode", "crop", "event"] * (len(made) // 3)
    events = [c[2] for c in calls if c[0] == "event"]
    waited = [c[1] for c in calls if c[0] == "wait"]
    assert len(events) == 3 and sorted(map(id, waited)) == sorted(map(id, events))
    handed = [c for c in calls if c[0] == "handed"]
    assert len(handed) == 3 * len(aug.sizes) and all(stream is current for _, stream in handed)


@pytest.mark.usefixtures("torchcodec_works")
def test_the_loader_decodes_the_next_batch_while_one_is_trained_on(synthetic_cfg, monkeypatch):
    # One batch ahead: when a batch reaches the training step, the next one's videos are already decoding.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    stage = DeviceViews(aug.sizes, "cpu", threads=2, decode_timeout=0)
    submitted, real = [], stage.submit
    monkeypatch.setattr(stage, "submit", lambda batch: submitted.append(batch["path"]) or real(batch))
    order = [(i % len(plans), 80 + i) for i in range(6)]
    batches = iter(DeviceViewLoader(DataLoader(plans, sampler=order, batch_size=2, collate_fn=collate_plans), stage))
    for yielded in (1, 2, 3):
        next(batches)
        assert len(submitted) == min(yielded + 1, 3)
    with pytest.raises(StopIteration):
        next(batches)
    assert stage._pool is None


@pytest.mark.usefixtures("torchcodec_works")
def test_device_view_loader_yields_what_the_cpu_loader_yields(synthetic_cfg):
    aug = _aug()
    cpu, plans = _datasets(synthetic_cfg, aug)
    order = [(i, 50 + i) for i in range(4)]
    cpu_loader = DataLoader(cpu, sampler=order, batch_size=2)
    device_loader = DeviceViewLoader(DataLoader(plans, sampler=order, batch_size=2, num_workers=1,
                                                collate_fn=collate_plans),
                                     DeviceViews(aug.sizes, "cpu", decode_timeout=0))
    assert len(device_loader) == 2 and device_loader.sampler is order
    for (views_c, label_c, index_c, meta_c), (views_d, label_d, index_d, meta_d) in zip(cpu_loader, device_loader):
        _assert_views_close(views_d, views_c)
        assert torch.equal(label_c, label_d) and torch.equal(index_c, index_d)
        assert torch.equal(meta_c["skipped"], meta_d["skipped"])


def test_decode_device_errors(synthetic_cfg, monkeypatch):
    args = train_ssl.get_args_parser().parse_args(["--local_crops_number", "8", "--batch_size_per_gpu", "2",
                                                   "--num_workers", "0"])
    with pytest.raises(ValueError, match="DECODE_DEVICE cuda .* no CUDA device"):
        train_ssl.build_train_loader(args, synthetic_cfg(**{"DATA.DECODE_DEVICE": "cuda"}), torch.device("cpu"))
    with pytest.raises(ValueError, match="DATA.AUGMENT_DEVICE cuda .* no CUDA device; leave DATA.AUGMENT_DEVICE at"):
        train_ssl.build_train_loader(args, synthetic_cfg(**{"DATA.AUGMENT_DEVICE": "cuda"}), torch.device("cpu"))


@pytest.mark.parametrize("decode, augment", [("cpu", "cpu"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_only_the_cpu_decode_paths_pin_their_batches(synthetic_cfg, monkeypatch, decode, augment):
    # Pinned batches copy to the GPU asynchronously: the CPU path's views, and the frames the workers decode with
    # DATA.AUGMENT_DEVICE cuda. The GPU decode path's batches are plans: every video's bytes, which the decoder
    # reads on the host; pinning them would only copy them once more per batch. Only that path touches NVDEC.
    monkeypatch.setattr(decoder, "guard_nvdec_cache", lambda: guarded.append(1))
    guarded = []
    args = train_ssl.get_args_parser().parse_args(["--local_crops_number", "8", "--batch_size_per_gpu", "2",
                                                   "--num_workers", "0", "--decode_timeout", "7"])
    dist.init_process_group("gloo", store=dist.HashStore(), world_size=1, rank=0)
    try:
        cfg = synthetic_cfg(**{"DATA.DECODE_DEVICE": decode, "DATA.AUGMENT_DEVICE": augment,
                               "DATA.DEVICE_DECODE_THREADS": 3})
        loader = train_ssl.build_train_loader(args, cfg, torch.device("cuda", 0))
    finally:
        dist.destroy_process_group()
    assert isinstance(loader, DeviceViewLoader) is ("cuda" in (decode, augment))
    assert getattr(loader, "loader", loader).pin_memory is (decode == "cpu")
    assert guarded == ([1] if decode == "cuda" else [])
    if isinstance(loader, DeviceViewLoader):
        assert loader.stage.threads == 3 and loader.dataset.dataset.decode_plans is (decode == "cpu")
        assert loader.stage.decode_timeout == 7


def test_nvdec_cache_is_emptied_or_refused_before_torchcodec_0_17(monkeypatch, caplog):
    # torchcodec < 0.17 decodes a video on NVDEC with the crop of an earlier video of the same coded size, silently
    # (torchcodec#1704): when the GPU stage is built, before any batch, an older torchcodec gets its decoder cache
    # emptied (the workaround), or is refused when it cannot; 0.17 on is left alone.
    class Decoders:
        def __init__(self, setter=None):
            self.capacity = 20
            if setter:
                setattr(self, setter, lambda n: setattr(self, "capacity", n))

    for new in ("0.17.0+cu130", "0.18.1", "1.0.0"):
        untouched = Decoders("set_nvdec_cache_capacity")
        assert decoder.guard_nvdec_cache(new, untouched) is False and untouched.capacity == 20
    for old, setter in (("0.16.1+cu128", "set_nvdec_cache_capacity"), ("0.12.0", "set_nvdec_cache_size")):
        old_decoders = Decoders(setter)
        with caplog.at_level(logging.WARNING, logger="datasets.decoder"):
            assert decoder.guard_nvdec_cache(old, old_decoders) is True
        assert old_decoders.capacity == 0 and f"torchcodec {old}: its NVDEC decoder cache is off" in caplog.text
    with pytest.raises(ImportError, match=r"torchcodec >= 0.17, this is 0.10.0:.*leave DATA.DECODE_DEVICE at cpu"):
        decoder.guard_nvdec_cache("0.10.0", Decoders())
    # the stage reads the installed torchcodec: here a stand-in (whether or not a real one works with this torch)
    installed = types.ModuleType("torchcodec")
    installed.__version__ = "0.16.0"
    installed.decoders = types.SimpleNamespace(
        set_nvdec_cache_capacity=lambda n: pytest.fail("built on the CPU, the stage must not touch NVDEC"))
    monkeypatch.setitem(sys.modules, "torchcodec", installed)
    assert DeviceViews([32, 16], "cpu", decode_timeout=0).device.type == "cpu"
    installed.decoders = types.SimpleNamespace()  # neither setter
    with pytest.raises(ImportError, match="this is 0.16.0"):
        DeviceViews([32, 16], torch.device("cuda", 1), decode_timeout=0)


@pytest.mark.gpu
def test_nvdec_gives_videos_of_one_coded_size_their_own_crop(tmp_path):
    # NVDEC decoders are cached by coded size: 120 and 114 rows are both coded as 128. Before torchcodec 0.17 the
    # second video came back with the first one's crop: a band of wrong rows, no error (torchcodec#1704), unless the
    # cache is emptied (what DeviceViews does then). Grey stripes 8 rows high: a shift by one row is off by ~160
    # levels on some rows.
    decoder.guard_nvdec_cache()
    t, y, x = np.meshgrid(np.arange(8), np.arange(120), np.arange(160), indexing="ij")
    grey = (np.where((y // 8) % 2 == 1, 200, 40) + x // 4 + t).astype(np.uint8)
    frames = np.repeat(grey[..., None], 3, axis=-1)
    for rows in (120, 114):
        path = str(tmp_path / f"{rows}.mp4")
        write_video(path, np.ascontiguousarray(frames[:, :rows]))
        decoded, fallback = decoder.decode_on_device(decoder.read_video_bytes(path), range(8), decoder.probe(path),
                                                     "cuda", path)
        assert fallback == "" and tuple(decoded.shape) == (8, rows, 160, 3)
        row_error = (decoded.cpu().float() - torch.from_numpy(frames[:, :rows]).float()).abs().mean(dim=(0, 2, 3))
        assert row_error.max() < 12, f"{rows} rows: row {int(row_error.argmax())} is off by {row_error.max():.0f}"


@pytest.mark.gpu
def test_nvdec_decodes_the_union_on_the_gpu_without_cpu_fallback(synthetic_cfg):
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i, i)] for i in range(4)])[0]
    stage = DeviceViews(aug.sizes, "cuda", decode_timeout=0)
    frames = stage.decode(batch, 0)
    assert frames.device.type == "cuda" and frames.dtype == torch.uint8 and frames.shape[-1] == 3
    cpu_frames = DeviceViews(aug.sizes, "cpu", decode_timeout=0).decode(batch, 0)
    assert frames.shape == cpu_frames.shape
    assert (frames.cpu().float() - cpu_frames.float()).abs().mean() < 3  # NVDEC's YUV->RGB differs slightly
    views, skipped = stage(batch)
    assert stage.cpu_fallbacks == 0, "torchcodec fell back to CPU decoding (see the log for why)"
    assert all(v.is_cuda for v in views) and skipped.sum() == 0


@pytest.mark.gpu
def test_nvdec_threads_decode_beside_the_busy_training_stream(synthetic_cfg):
    # Each decode thread has its own CUDA stream: with the current (training) stream busy for seconds, the stage
    # decodes and queues the views without waiting for it, and gives the one-thread views.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i % len(plans), 60 + i)] for i in range(4)])[0]
    expected, _ = DeviceViews(aug.sizes, "cuda", threads=1, decode_timeout=0)(batch)
    stage = DeviceViews(aug.sizes, "cuda", threads=4, decode_timeout=0)
    assert stage.device == torch.device("cuda", torch.cuda.current_device())  # decode threads start on device 0
    stage(batch)  # warm-up: NVDEC sessions, streams
    stage.close()  # a pass ends: the next pass's threads decode on the same 4 streams
    torch.cuda.synchronize()
    torch.cuda._sleep(10 ** 10)  # ~5 s of GPU clock cycles on the current stream
    views, skipped = stage(batch)
    waited = torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    stage.close()
    assert len(stage._streams) == 4
    assert skipped.sum() == 0 and stage.cpu_fallbacks == 0
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    from torchcodec import __version__ as version
    if waited and decoder.guard_nvdec_cache(version, _NoCacheSetter()):
        # Before 0.17 every video creates and destroys its NVDEC decoder (the cache is off, torchcodec#1704);
        # whether the driver synchronizes the device there is what this records, not a fault of the stage.
        pytest.xfail(f"torchcodec {version} (NVDEC cache off): a decoder's creation or destruction waited for "
                     "the device")
    assert not waited, "the stage waited for the work queued on the current stream"


class _NoCacheSetter:
    """A torchcodec.decoders stand-in for guard_nvdec_cache's version check alone (its setter does nothing)."""

    @staticmethod
    def set_nvdec_cache_capacity(capacity: int) -> None:
        pass


@pytest.mark.gpu
def test_the_stages_training_thread_part_has_no_host_sync(synthetic_cfg):
    # What the training thread runs per batch once the decode threads are done (the waits on their events,
    # record_stream, the batched colour operations) must not hold the host up behind the queued step.
    aug = _aug()
    _, plans = _datasets(synthetic_cfg, aug)
    batch = collate_plans([plans[(i % len(plans), 90 + i)] for i in range(4)])[0]
    stage = DeviceViews(aug.sizes, "cuda", threads=2, decode_timeout=0)
    stage(batch)  # warm-up
    pending = stage.submit(batch)
    for future in pending:
        future.result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views, skipped = stage.finish(batch, pending)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        stage.close()
    assert all(v.is_cuda for v in views) and skipped.sum() == 0


@pytest.mark.gpu
def test_render_views_on_cuda_has_no_host_sync():
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (6, 40, 56, 3), dtype=torch.uint8, device="cuda")
    params = torch.tensor([[transform.ViewParams((4, 2, 20, 24), True, (1.3, 0.7, 1.15), (2, 0, 1), True).as_row()]]
                          * 2, dtype=torch.float64)
    positions = [[torch.tensor([0, 2, 2, 5]).pin_memory()]] * 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (views,) = render_views([frames, frames], positions, params, [16])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views.shape == (2, 3, 4, 16, 16) and views.is_cuda
