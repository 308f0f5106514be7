"""SVT views decoded and augmented on the training device (DATA.DECODE_DEVICE cuda), or augmented there from
frames the DataLoader workers decoded (DATA.AUGMENT_DEVICE cuda).

Where each part runs:
- DataLoader workers (CPU, no CUDA): probe the video (decoder.probe: its packets for the frame count, fps,
  upright size and whether random access can be trusted), read its bytes, and draw everything random under
  the sample's seed exactly as the CPU path does (temporal window, view frame indices, then per view crop
  box, flip, jitter factors and order, grayscale: `VideoDataset` in "plan" mode). A sample is a plan:
  {"path", "video" (the file's bytes), "decoded" (None; the union's frames, decoded sequentially on the
  CPU, for the rare file whose random access cannot be trusted), "frames" (the union of the views' frame
  indices), "positions" (per view, into the union), "info" (the probe's VideoInfo: the stream and frame table
  torchcodec is given), "params" (V, 12)}. With DATA.AUGMENT_DEVICE cuda the worker decodes the union as the
  CPU path does (DATA.DECODING_BACKEND) and its plan carries the frames ("decoded"; "video" and "info" None).
- The main process (`DeviceViewLoader`, after the loader hands over a batch of plans): torchcodec decodes
  each video's union of frames on the device (NVDEC on CUDA, DATA.DEVICE_DECODE_THREADS videos at once; a video
  it cannot decode, or whose frames' timestamps are not the probe's, is decoded sequentially on the CPU from
  the same bytes and flagged in the dataset's `sequential_videos`, as a worker flags the files it decodes so),
  or copies the worker's frames there, then makes every view of the batch with tensor ops there: per sample
  and view, in the same decode thread, a crop and a bicubic resize (`crop_and_resize`: two passes
  rounded to uint8 levels, as the CPU path's uint8 resize), then in the training thread flip, colour jitter,
  grayscale and the ImageNet normalisation batched over the samples (`colour_views`; `render_views` is the
  two). No RNG is drawn here, so the views depend on the sample's seed only, as on the CPU path.
On a CPU device the same code runs (torchcodec's CPU decoder): tests/test_device_views.py checks it gives
the CPU path's views within interpolation tolerance for the same seed.
"""
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from datasets import decoder
from datasets.loader_watchdog import DecodeHang, stuck_videos_message
from datasets.transform import IMAGENET_MEAN, IMAGENET_STD, PARAM_COLUMNS
from datasets.video_dataset import mark_sequential

logger = logging.getLogger(__name__)
_LOGGED: set = set()
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def collate_plans(batch: list) -> tuple:
    """DataLoader collate of (plan, label, index, meta) samples: the plans as lists (videos differ in
    size), their parameters stacked (B, V, 12); label, index and meta collated as usual."""
    plans = [sample[0] for sample in batch]
    collated = {key: [p[key] for p in plans] for key in ("path", "video", "decoded", "frames", "positions", "info")}
    collated["params"] = torch.stack([p["params"] for p in plans])
    return (collated, *default_collate([sample[1:] for sample in batch]))


# How long closing the decode threads waits for the videos they are decoding (a stopped run's batch ahead) before
# it leaves them behind: a stop's checkpoint is written, and SLURM's kill follows its warning within minutes.
CLOSE_GRACE_S = 20.0


class DecodeThreads:
    """`num` daemon threads that run submitted jobs, each returning a concurrent.futures.Future. Unlike a
    ThreadPoolExecutor's threads, which the interpreter joins at exit, a thread stuck in a decode that never
    returns does not keep the process from exiting (a stopped run's exit status, DecodeHang's)."""

    def __init__(self, num: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(num)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # the caller's future.result() raises it
                    future.set_exception(err)

    def submit(self, fn, *args) -> Future:
        future = Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self, grace_s: float) -> list[threading.Thread]:
        """Cancel the jobs not begun and end the threads, waiting at most `grace_s` seconds in all for the jobs
        they run; returns the threads still running one then (left behind)."""
        while True:
            try:
                self._jobs.get_nowait()[0].cancel()
            except queue.Empty:
                break
        for _ in self.threads:
            self._jobs.put(None)
        deadline = time.monotonic() + grace_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread for thread in self.threads if thread.is_alive()]


def _grayscale(clip: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) with torchvision's RGB weights."""
    r, g, b = clip.unbind(dim=-3)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(-3)


def _blend(clip: torch.Tensor, other: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * clip + (1 - ratio) * other, clamped to [0, 1] (torchvision's blend); ratio 1 is the identity."""
    return (clip * ratio + other * (1 - ratio)).clamp_(0, 1)


def _jitter_op(clip: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """Brightness (0), contrast (1, against each frame's grayscale mean) or saturation (2) on (B, T, 3, H, W)."""
    if op == 0:
        return _blend(clip, 0.0, factor)
    gray = _grayscale(clip)
    return _blend(clip, gray.mean(dim=(-3, -2, -1), keepdim=True) if op == 1 else gray, factor)


def resize_as_uint8(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Float (T, 3, h, w) with uint8 values -> (T, 3, size, size), bicubic without antialiasing, as torchvision
    resizes uint8 images on the CPU (the CPU path): the horizontal pass, rounded to uint8 levels, then the
    vertical pass, rounded (within 1-2 levels of it; one pass without the rounding differs by up to ~30 on noise)."""
    for out in ((clip.shape[-2], size), (size, size)):
        if tuple(clip.shape[-2:]) != out:
            clip = F.interpolate(clip, size=out, mode="bicubic", align_corners=False)
            clip = clip.round_().clamp_(0, 255)
    return clip


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a CPU tensor on `device` that does not hold the host up: on CUDA from page-locked memory (a copy
    from pageable memory first waits for all the work queued on the device, which torch's sync debug mode does not
    report)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def crop_and_resize(frames: torch.Tensor, positions: Sequence[torch.Tensor], rows: Sequence[Sequence[float]],
                    sizes: Sequence[int]) -> list[torch.Tensor]:
    """One sample's views before the colour operations: frames uint8 (K, H, W, 3) on the device, positions[v]
    (T_v,) into them on the device, rows[v] its transform.ViewParams.as_row -> per view float (T_v, 3, S_v, S_v)
    of uint8 levels: the crop box's frames resized (`resize_as_uint8`)."""
    out = []
    for v, size in enumerate(sizes):
        top, left, h, w = (int(x) for x in rows[v][:4])
        crop = frames[:, top:top + h, left:left + w].index_select(0, positions[v])
        out.append(resize_as_uint8(crop.permute(0, 3, 1, 2).float(), size))
    return out


def colour_views(crops: Sequence[Sequence[torch.Tensor]], params: torch.Tensor) -> list[torch.Tensor]:
    """crops[b][v] of `crop_and_resize` and params (B, V, 12) on the CPU -> per view float (B, 3, T_v, S_v, S_v):
    flip, colour jitter, grayscale and the normalisation, batched over the samples. The parameters and the
    normalisation reach the device in one copy."""
    device = crops[0][0].device
    params = params.to(torch.float32)
    packed = host_to_device(torch.cat([params.flatten(), torch.tensor(IMAGENET_MEAN + IMAGENET_STD)]), device)
    params_device = packed[:params.numel()].view(params.shape)
    mean, std = (x.view(1, 3, 1, 1, 1) for x in packed[params.numel():].split(3))
    views = []
    for v in range(params.shape[1]):
        clip = torch.stack([sample[v] for sample in crops]).div_(255)
        p, p_device = params[:, v], params_device[:, v]  # decisions on the host, factors from the device copy
        if p[:, 4].any():
            clip = torch.where(p_device[:, 4].bool().view(-1, 1, 1, 1, 1), clip.flip(-1), clip)
        order, order_device = p[:, 8:11].long(), p_device[:, 8:11].long()
        for slot in range(3):
            for op in range(3):
                # samples that skip this op in this slot keep factor 1: the identity
                if (torch.where(order[:, slot] == op, p[:, 5 + op], 1.0) != 1).any():
                    factor = torch.where(order_device[:, slot] == op, p_device[:, 5 + op], 1.0)
                    clip = _jitter_op(clip, op, factor.view(-1, 1, 1, 1, 1))
        if p[:, 11].any():
            clip = torch.where(p_device[:, 11].bool().view(-1, 1, 1, 1, 1), _grayscale(clip).expand_as(clip), clip)
        views.append(((clip.permute(0, 2, 1, 3, 4) - mean) / std).contiguous())
    return views


def render_views(frames: Sequence[torch.Tensor], positions: Sequence[Sequence[torch.Tensor]],
                 params: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Every view of a batch: frames[b] uint8 (K_b, H_b, W_b, 3) on the device, positions[b][v] (T_v,) into
    them, params (B, V, 12) rows of transform.ViewParams.as_row on the CPU -> per view float (B, 3, T_v, S_v, S_v).
    The batch's small tensors reach the device in two copies (positions; parameters with the normalisation).
    (`crop_and_resize` of each sample, then `colour_views`; DeviceViews runs the first in its decode threads.)"""
    device = frames[0].device
    rows = params.tolist()
    num, num_views = params.shape[:2]
    lengths = [len(x) for p in positions for x in p]
    pos_device = host_to_device(torch.cat([x for p in positions for x in p]), device).split(lengths)
    crops = [crop_and_resize(frames[b], pos_device[b * num_views:(b + 1) * num_views], rows[b], sizes)
             for b in range(num)]
    return colour_views(crops, params)


class DeviceViews:
    """The main-process stage: decode a batch of plans on `device` and render their views. Counts videos
    torchcodec decoded on the CPU instead of NVDEC (`cpu_fallbacks`, logged); a video torchcodec cannot
    decode or be trusted on is decoded sequentially on the CPU from the same bytes (`sequential`: the batch
    positions of the last call; `sequential_total`; logged); one that does not decode at all (`failed`) takes
    another sample's views of the same batch and counts as skipped.

    `threads` videos of a batch are decoded at once (DATA.DEVICE_DECODE_THREADS), each in a thread of its own
    (torchcodec releases the GIL while it decodes). NVDEC decodes one frame at a time per video and the call
    waits for each (torchcodec maps every frame as it is decoded), so one video at a time leaves its engines
    mostly idle. On CUDA every thread decodes on a CUDA stream of its own: the frame copies and colour
    conversion neither wait for the training step queued on the current stream nor hold it up, and the current
    stream waits for each video's decode before the views are rendered on it. A thread also crops and resizes
    its sample's views (the per-sample part of the rendering, most of its kernel launches), so the training
    thread only colours the batch. `submit` starts a batch's decoding and `finish` colours it, so a caller can
    keep a batch decoding ahead (DeviceViewLoader).

    `finish` waits at most `decode_timeout` minutes (--decode_timeout; 0: forever) for each sample, then raises
    DecodeHang naming the videos the threads are decoding (each thread notes its sample, the time it began and its
    decoder: a few scalars per sample, read only then). A stuck thread cannot be stopped: the error is marked
    `stuck_threads`, and utils.named_rank_failures ends the process."""

    def __init__(self, sizes: Sequence[int], device: torch.device | str, threads: int = 1, nvdec: bool = True, *,
                 decode_timeout: float):
        if threads < 1:
            raise ValueError(f"DATA.DEVICE_DECODE_THREADS must be >= 1, got {threads}")
        self.sizes, self.device, self.threads, self.nvdec = list(sizes), torch.device(device), threads, nvdec
        self.decode_timeout = decode_timeout
        if self.device.type == "cuda" and self.device.index is None:  # a decode thread starts on device 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda" and nvdec:  # nvdec False: the workers decode (DATA.AUGMENT_DEVICE cuda)
            decoder.guard_nvdec_cache()
        self.cpu_fallbacks = 0
        self.failed = 0
        self.sequential: list[int] = []
        self.sequential_total = 0
        self._pool: DecodeThreads | None = None
        self._local = threading.local()
        self._streams: list[torch.cuda.Stream] = []  # made once: a pass's threads take them in turn
        self._taken = 0
        self._lock = threading.Lock()
        self._decoding: dict[int, list] = {}  # decode thread id -> [path, time.time() at its start, decoder]

    def _stream(self) -> torch.cuda.Stream:
        """This thread's decode stream: one of `threads` streams made once for the stage, so that every pass
        decodes on the same streams (the caching allocator reuses a freed block only on the stream it was made
        on; streams new each pass would leave the last pass's cached blocks idle)."""
        if getattr(self._local, "stream", None) is None:
            with self._lock:
                slot = self._taken % self.threads
                if slot == len(self._streams):
                    self._streams.append(torch.cuda.Stream(self.device))
                self._local.stream = self._streams[slot]
                self._taken += 1
        return self._local.stream

    def _on_stream(self, fn, *args) -> tuple:
        """(fn(*args), event): on CUDA run on this thread's decode stream (and device: a new thread starts on
        device 0), `event` marking the end of its work there; elsewhere (fn(*args), None)."""
        if self.device.type != "cuda":
            return fn(*args), None
        stream = self._stream()
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return fn(*args), stream.record_event()

    def _prepare(self, plans: dict, b: int) -> tuple:
        """A decode thread's job: ((crops, how, why), event) of sample b, `crops` its views cropped and resized
        (`crop_and_resize`) or the DecodeError of a video that did not decode. No shared state is touched, so
        samples run in parallel threads. how: "" (decoded on the device), "fallback" (torchcodec decoded it on
        the CPU) or "sequential" (decoded sequentially on the CPU here)."""
        def decode_and_crop():
            frames, how, why = self._decode_frames(plans, b)
            if isinstance(frames, decoder.DecodeError):
                return frames, how, why
            positions = plans["positions"][b]
            pos = host_to_device(torch.cat(positions), self.device).split([len(x) for x in positions])
            return crop_and_resize(frames, pos, plans["params"][b].tolist(), self.sizes), how, why
        thread = threading.get_ident()
        self._decoding[thread] = [plans["path"][b], time.time(), ""]
        try:
            return self._on_stream(decode_and_crop)
        finally:
            del self._decoding[thread]

    def _decode_frames(self, plans: dict, b: int) -> tuple:
        if plans["decoded"][b] is not None:
            self._now(f"a copy to {self.device} of the frames its loader worker decoded")
            return host_to_device(plans["decoded"][b], self.device), "", ""
        path, indices = plans["path"][b], plans["frames"][b].tolist()
        self._now(f"torchcodec on {self.device}")
        try:
            frames, fallback = decoder.decode_on_device(plans["video"][b], indices, plans["info"][b], self.device,
                                                        path)
        except decoder.DecodeError as err:
            self._now("the sequential CPU decode (PyAV, from its bytes)")
            try:
                frames = decoder.decode_bytes_sequentially(plans["video"][b], indices, plans["info"][b], path)
            except decoder.DecodeError as failed:
                return failed, "", ""
            return host_to_device(frames, self.device), "sequential", str(err)
        return frames, "fallback" if fallback else "", fallback

    def _now(self, decoder_name: str) -> None:
        """In a decode thread: the decoder its sample is now in (DecodeHang names it); elsewhere nothing."""
        entry = self._decoding.get(threading.get_ident())
        if entry is not None:
            entry[2] = decoder_name

    def _collect(self, plans: dict, b: int, prepared: tuple):
        """Sample b's tensors (its frames or crops), ready for the current stream, after counting and logging how
        they were decoded; raises the DecodeError of a video that did not decode."""
        (out, how, why), event = prepared
        path = plans["path"][b]
        if isinstance(out, decoder.DecodeError):
            raise out
        if how == "sequential":
            self.sequential.append(b)
            self.sequential_total += 1
            self._log(path, f"decoded sequentially on the CPU instead ({why})")
        elif how == "fallback":
            self.cpu_fallbacks += 1
            self._log(path, f"torchcodec decodes it on the CPU, not with NVDEC ({why})")
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in out if isinstance(out, list) else [out]:
                tensor.record_stream(current)  # made on the decode stream, read and freed on this one
        return out

    def decode(self, plans: dict, b: int) -> torch.Tensor:
        """Sample b's union of frames on the device, decoded in this thread: decoded there from its bytes, or
        copied when the worker decoded it (a file whose random access cannot be trusted, or DATA.AUGMENT_DEVICE
        cuda), or decoded sequentially here on the CPU when torchcodec fails on it."""
        return self._collect(plans, b, self._on_stream(self._decode_frames, plans, b))

    def __call__(self, plans: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(views, per-sample count of replaced samples) of a collated batch of plans."""
        return self.finish(plans, self.submit(plans))

    def submit(self, plans: dict) -> list[Future]:
        """Start decoding a batch of plans in the decode threads; `finish` takes the futures."""
        if plans["params"].shape[-1] != PARAM_COLUMNS:
            raise ValueError(f"plans carry {plans['params'].shape[-1]} parameter columns, expected {PARAM_COLUMNS}")
        if self._pool is None:
            self._pool = DecodeThreads(self.threads, "svt-decode")
        return [self._pool.submit(self._prepare, plans, b) for b in range(len(plans["video"]))]

    def finish(self, plans: dict, pending: list[Future]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`__call__` of a batch whose decoding `submit` started: wait for it, count, render the views."""
        num = len(plans["video"])
        crops, good = [None] * num, []
        self.sequential = []
        for b, future in enumerate(pending):
            try:
                prepared = future.result(timeout=self.decode_timeout * 60 or None)
            except TimeoutError:
                if not future.done():
                    raise self._hang() from None
                prepared = future.result()  # it ended just then (or raised a TimeoutError of its own)
            try:
                crops[b] = self._collect(plans, b, prepared)
                good.append(b)
            except decoder.DecodeError as err:
                self.failed += 1
                self._log(plans["path"][b], f"cannot be decoded on {self.device} ({err}); the sample takes "
                                            "another sample's views of the batch")
        if not good:
            raise RuntimeError(f"no video of the batch decoded on {self.device}: {plans['path'][:4]}")
        source = [b if crops[b] is not None else good[b % len(good)] for b in range(num)]
        skipped = torch.tensor([int(s != b) for b, s in enumerate(source)])
        return colour_views([crops[s] for s in source], plans["params"][source]), skipped

    def _hang(self) -> DecodeHang:
        """The error of a sample not decoded within --decode_timeout, naming the videos the threads are decoding,
        the longest first; the thread pool is let go without waiting for them."""
        now, busy = time.time(), sorted(self._decoding.values(), key=lambda entry: entry[1])
        key = "DECODE_DEVICE" if self.nvdec else "AUGMENT_DEVICE"  # without NVDEC the threads copy decoded frames
        head = (f"A video did not finish decoding in this process's decode threads (DATA.{key} cuda) within "
                f"--decode_timeout {self.decode_timeout:g} min")
        if not busy:  # its decode ended just after the wait ran out
            return DecodeHang(f"{head}; it ended just after, so it was only slow: raise --decode_timeout (0: wait "
                              "forever).")
        self._pool.close(grace_s=0)
        self._pool = None
        decoders = " or ".join(dict.fromkeys(name for _, _, name in busy[:3]))
        why = ("A decode that never returns is a file the decoder hangs on (in NVDEC or FFmpeg) or a file system that "
               "stopped answering; a stuck decode thread cannot be stopped, so the run ends here.")
        switch = f"{'decode' if self.nvdec else 'augment'} in the loader workers (--opts DATA.{key} cpu)"
        return DecodeHang(stuck_videos_message(f"{head}. The videos the threads are decoding, with {decoders}",
                                               [(path, now - start) for path, start, _ in busy], why, switch),
                          stuck_threads=True)

    def close(self) -> None:
        """Stop the decode threads (made again on the next call): DeviceViewLoader does it at the end of each
        pass, so that no idle thread is alive when the next pass's DataLoader forks its workers. A pass left early
        (a stop signal, an error) drops the batches not begun; a video still decoding after CLOSE_GRACE_S is left
        to its thread, named in a warning: the process can exit without it."""
        if self._pool is None:
            return
        pool, self._pool, self._taken = self._pool, None, 0
        left = {thread.ident for thread in pool.close(CLOSE_GRACE_S)}
        busy = sorted((entry for ident, entry in list(self._decoding.items()) if ident in left), key=lambda e: e[1])
        if busy:
            now = time.time()
            rows = "; ".join(f"{path} ({name}, {(now - start) / 60:.1f} min)" for path, start, name in busy[:3])
            logger.warning("%d decode thread(s) still decoding %.0f s after their pass ended, left behind: %s. A "
                           "decode that never returns is a file the decoder hangs on or a file system that stopped "
                           "answering; if the run goes on, expect DecodeHang to name it.", len(busy), CLOSE_GRACE_S,
                           rows)

    def _log(self, path: str, message: str) -> None:
        if path not in _LOGGED:
            _LOGGED.add(path)
            logger.warning("%s: %s", path, message)


class DeviceViewLoader:
    """A DataLoader of plans (VideoDataset in plan mode, `collate_plans`) that yields what the CPU path's
    loader yields, (views, label, index, meta), with the views already on the device. `sampler`, `dataset`
    and len() are the wrapped loader's."""

    def __init__(self, loader: DataLoader, stage: DeviceViews):
        self.loader, self.stage = loader, stage
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        return self.views(iter(self.loader))

    def views(self, batches: Iterator) -> Iterator:
        """What __iter__ yields, from `batches` (the wrapped loader's, e.g. an iterator a caller has advanced).
        One batch ahead: the next batch's videos are decoding in the stage's threads while this one is rendered
        and trained on, so the decode's wall time hides behind the step's launch and GPU time."""
        ahead = None
        try:
            for plans, *rest in batches:
                submitted = (plans, self.stage.submit(plans), *rest)
                if ahead is not None:
                    yield self._finish(*ahead)
                ahead = submitted
            if ahead is not None:
                yield self._finish(*ahead)
        finally:
            self.stage.close()

    def _finish(self, plans: dict, pending: list[Future], label, index, meta) -> tuple:
        views, skipped = self.stage.finish(plans, pending)
        for b in self.stage.sequential:
            mark_sequential(self.dataset, int(index[b]))
        meta["skipped"] = meta["skipped"] + skipped
        return views, label, index, meta
