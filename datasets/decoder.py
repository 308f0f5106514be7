"""Frame-exact video decoding (torchcodec, decord or PyAV behind one interface) and the original's index maths.

Frame `i` of a video is its i-th frame in presentation (timestamp) order, counted from 0 over the
frames the file actually holds; `fps` is the stream's average rate. Every backend returns exactly the
frames its indices name, upright (the display rotation of the container is applied), as uint8 RGB
(K, H, W, 3). This is tested on generated files whose frames carry their own index in their pixels
(tests/frame_code.py, tests/test_data_frame_exact.py): H.264 mp4 with B-frames, MPEG-4 Part 2 AVI with
and without B-frames, variable frame rate, rotated, truncated, shorter than a clip, VP9 WebM, H.264 in
Matroska, mp4 starting at 10 s, a stream-copied cut (edit list), open GOPs at 60 fps, HEVC, AVI without
its index, audio as stream 0, an mp4 cut off inside a GOP with B-frames, cover art as the first video stream,
two video streams; and H.264 and HEVC at 10 bits, AV1, VP8, MJPEG (full range), MPEG-2 in .mpg and .ts, .mov,
yuv444p and odd frame sizes.

The video is the first video stream that is not an attached picture (cover art), on every backend
(`_video_stream`). The original reads `streams.video[0]`, the first video stream (so a cover picture stored
first made it read one still image). FFmpeg's "best stream", the default of torchcodec and decord, is not
that: it prefers a stream flagged default, then one with more frames seen while the file was probed, then a
higher bit rate, and the rules and what is seen differ between FFmpeg versions (decord bundles FFmpeg 4.1,
torchcodec uses the system's, PyAV its own); on two video streams it picks the second when that one has
B-frames and the first has none, or (decord) when it has the higher bit rate. torchcodec is told the stream;
decord cannot be, so it is not used on a file with two or more video streams.

`open_video` first probes the file with PyAV: it reads every video packet (no decoding) for the
presentation timestamps, frame count and damage, and decodes the first frame (rotation, and a file
that does not decode at all fails here). Packets the demuxer marks discard (before the start of an edit
list: decoded for reference, never shown) are not frames. Random access is then used unless it cannot be
trusted:
- container facts: B-frames in AVI (no presentation timestamps in the container: the order of the
  frames cannot be known before decoding), packets without or with duplicate timestamps, damaged
  packets or an index that lists more frames than the file holds (a truncated file);
- backend facts: the backend counts another number of frames than the probe (decord counts the frames an
  edit list hides) or cannot open the file, or decord on a file with more than one video stream, on a
  rotated video (it ignores the display matrix) or on open GOPs (it returns wrong frames for those shown
  before a keyframe they are decoded after), torchcodec or decord on an MPEG program or transport stream
  (.mpg, .vob, .ts, .m2ts: no index, FFmpeg seeks them by bisecting byte positions; decord then returns other
  frames, silently, torchcodec's exact mode frames with other timestamps). Where torchcodec's exact mode
  cannot open a file (an mp4 whose stream 0 is cover art: its scan fails), it is given the probe's frame table
  instead (`frame_mappings`);
- a decoder error, a missing frame or (torchcodec) a frame with another timestamp than the probe's during
  random access.
Such a file is decoded sequentially instead, the original's way: from its first packet, in order,
picking frames by timestamp (a frame without a usable timestamp takes the next position), converting
only the frames asked for. `VideoReader.sequential` says so, and the datasets count such files
(`sequential_decodes`).
"""
import functools
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata
from typing import Sequence

import av
import numpy as np
import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torchcodec", "decord", "pyav")
_LOGGED_SEQUENTIAL: set = set()


class DecodeError(RuntimeError):
    """A video that is missing, cannot be opened, or has no decodable frames."""


class _Untrusted(Exception):
    """Random access cannot be trusted on this file (the reason is the message)."""


# ------------------------------------------------------------------------------------- backend choice
@functools.lru_cache(maxsize=None)
def torchcodec_status() -> str:
    """"" when torchcodec imports, finds FFmpeg and decodes a 2-frame video made in memory; else why not."""
    try:
        from torchcodec.decoders import VideoDecoder
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as out:
            stream = out.add_stream("mpeg4", rate=30)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for _ in range(2):
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8))):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        frames = VideoDecoder(buffer.getvalue(), seek_mode="exact").get_frames_at([0, 1]).data
        if tuple(frames.shape) != (2, 3, 32, 32):
            return f"torchcodec returned frames of shape {tuple(frames.shape)} for a 2x32x32 test video"
        return ""
    except Exception as err:  # ImportError, missing FFmpeg libraries, an ABI mismatch with this torch, ...
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        try:  # an installed torchcodec that fails: its version and torch's (each release is built for one torch)
            return f"{why} (torchcodec {metadata.version('torchcodec')}, torch {torch.__version__})"
        except metadata.PackageNotFoundError:
            return why


def decord_status() -> str:
    """"" when decord imports, else why not."""
    try:
        import decord  # noqa: F401
        return ""
    except Exception as err:
        return f"{type(err).__name__}: {err}"


_LOGGED_CHOICE: set = set()


def resolve_backend(name: str) -> str:
    """The backend DATA.DECODING_BACKEND `name` means here. `auto`: torchcodec (exact seek mode) when it
    works, else decord, else PyAV; the choice is logged once per process. An explicit backend that
    cannot be used raises ImportError naming the fix."""
    if name not in BACKENDS:
        raise ValueError(f"DATA.DECODING_BACKEND {name!r} is not one of {BACKENDS}")
    if name == "auto":
        reasons = {"torchcodec": torchcodec_status(), "decord": decord_status()}
        chosen = next((b for b, why in reasons.items() if not why), "pyav")
        if name not in _LOGGED_CHOICE:
            _LOGGED_CHOICE.add(name)
            passed = [f"{b} unavailable: {why}" for b, why in reasons.items() if why]
            logger.info("DATA.DECODING_BACKEND auto -> %s%s", chosen, f" ({'; '.join(passed)})" if passed else "")
        return chosen
    why = {"torchcodec": torchcodec_status, "decord": decord_status}.get(name, lambda: "")()
    if why:
        fix = ("pip install torchcodec (a version matching your torch, see constraints.txt) and FFmpeg's "
               "shared libraries (scripts/install_deps.sh; without root, lend it PyAV's: export LD_LIBRARY_PATH="
               "$(python datasets/pyav_ffmpeg.py --always):$LD_LIBRARY_PATH)" if name == "torchcodec" else
               "pip install decord (x86-64 wheels only)")
        raise ImportError(f"DATA.DECODING_BACKEND {name} cannot be used: {why}. Fix: {fix}, or use "
                          f"DATA.DECODING_BACKEND auto (falls back to what works).")
    return name


# ------------------------------------------------------------------------------------- probe
@dataclass
class VideoInfo:
    """What the probe knows about a file. `pts[i]` is the timestamp (stream time base) of frame i;
    `seek_pts[i]` the timestamp to seek to (backward) for decoding to reach frame i: the earlier of the
    presentation and decoding timestamps of the last keyframe shown at or before it, or pts[i] when none is;
    `rotation` is ffmpeg's display rotation (degrees counter-clockwise); `open_gop`: some frame is shown
    before the keyframe it is decoded after (open GOPs: x265's default, x264 --open-gop); `unsafe` says why
    random access cannot be trusted ("" when it can); `stream_index` is the container index of the video
    stream read (`_video_stream`), `video_streams` how many video streams are not attached pictures;
    `key_pts`: the timestamps of the keyframe packets; `time_base`: the stream's (seconds per pts unit);
    `container`: FFmpeg's name of the container format (the first if it has several: "mov" for mp4)."""
    num_frames: int
    fps: float
    rotation: int
    pts: np.ndarray
    seek_pts: np.ndarray
    key_pts: np.ndarray
    time_base: Fraction
    height: int
    width: int
    open_gop: bool
    unsafe: str
    stream_index: int
    video_streams: int
    container: str


def _video_stream(container, path: str):
    """(the video stream every backend reads, the number of video streams that are not attached pictures):
    the first video stream that is not an attached picture (cover art); see the module docstring."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        raise DecodeError(f"{path}: no video stream")
    return streams[0], len(streams)


def _probe(container, path: str) -> VideoInfo:
    stream, video_streams = _video_stream(container, path)
    header_frames = stream.frames
    pts, missing, damaged, discarded, reordered, last = [], 0, 0, 0, False, None
    key_pts, open_gop, keys = None, False, []
    first = None
    first_error = None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:   # the end: flush the decoder when no frame came out yet
                if first is None:
                    first = next(iter(packet.decode()), None)
                continue
            if packet.is_corrupt:
                damaged += 1
                continue
            if packet.pts is not None:   # a frame shown before the keyframe it is decoded after: an open GOP
                if packet.is_keyframe:
                    key_pts = packet.pts
                    keys.append((packet.pts, min(packet.pts, packet.pts if packet.dts is None else packet.dts)))
                else:
                    open_gop |= key_pts is not None and packet.pts < key_pts
            if packet.is_discard:   # before the start of an edit list: decoded for reference, never shown
                discarded += 1
                if first is None:
                    packet.decode()
                continue
            if packet.pts is None:
                missing += 1
            else:
                reordered |= last is not None and packet.pts < last
                last = packet.pts
                pts.append(packet.pts)
            if first is None:
                try:
                    first = next(iter(packet.decode()), None)
                except av.error.FFmpegError as err:
                    first_error = err
    except av.error.FFmpegError as err:
        damaged += 1
        first_error = first_error or err
    count = len(pts) + missing
    if count == 0:
        raise DecodeError(f"{path}: the video has no frames")
    if first is None:
        raise DecodeError(f"{path}: the first frame does not decode ({first_error or 'no frame out of the decoder'})")
    table = np.sort(np.asarray(pts, dtype=np.int64))
    seek_table = table
    keys = np.asarray(sorted(keys), dtype=np.int64).reshape(-1, 2)
    if len(keys):
        last_key = np.searchsorted(keys[:, 0], table, side="right") - 1
        seek_table = np.where(last_key >= 0, keys[np.maximum(last_key, 0), 1], table)
    reasons = []
    if missing:
        reasons.append(f"{missing} packets without timestamps")
    if len(table) > 1 and (np.diff(table) == 0).any():
        reasons.append("duplicate timestamps")
    if damaged or (header_frames and header_frames > count + discarded):
        reasons.append(f"damaged or truncated file (the index lists {header_frames or '?'} frames, "
                       f"{count + discarded} are readable)")
    if container.format.name == "avi" and (reordered or stream.codec_context.has_b_frames):
        reasons.append("B-frames in AVI (no presentation timestamps in the container)")
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        fps = float(rate)
    elif len(table) > 1 and table[-1] > table[0]:
        fps = (len(table) - 1) / float((table[-1] - table[0]) * stream.time_base)
    else:
        fps = 30.0
    rotation = int(round(getattr(first, "rotation", 0) or 0)) % 360
    height, width = (first.width, first.height) if rotation in (90, 270) else (first.height, first.width)
    return VideoInfo(num_frames=count, fps=fps, rotation=rotation, pts=table, seek_pts=seek_table,
                     key_pts=keys[:, 0], time_base=Fraction(stream.time_base), height=height, width=width,
                     open_gop=open_gop, unsafe="; ".join(reasons), stream_index=stream.index,
                     video_streams=video_streams, container=container.format.name.split(",")[0])


def probe(path: str) -> VideoInfo:
    """Probe `path` (see the module docstring); raises DecodeError for missing or undecodable files."""
    if not os.path.isfile(path):
        raise DecodeError(f"{path}: no such file")
    try:
        container = av.open(path)
    except Exception as err:
        raise DecodeError(f"{path}: cannot open the video ({err})") from err
    with container:
        return _probe(container, path)


def _upright(frames: torch.Tensor, rotation: int) -> torch.Tensor:
    """Apply ffmpeg's display rotation (counter-clockwise degrees) to (K, H, W, 3) frames."""
    turns = (rotation // 90) % 4
    return torch.rot90(frames, k=turns, dims=(1, 2)).contiguous() if turns else frames


# ------------------------------------------------------------------------------------- random access
# Containers without an index, which FFmpeg seeks by bisecting byte positions: torchcodec's exact mode and decord
# land on other frames there (decord silently; measured on MPEG-2 .mpg and .ts, tests/test_data_frame_exact.py).
_BYTE_SEEKED = {"mpeg": "an MPEG program stream", "mpegts": "an MPEG transport stream"}


def frame_mappings(info: VideoInfo) -> str:
    """The probe's frame table as torchcodec's `custom_frame_mappings` (ffprobe -show_frames JSON: per frame
    pts, duration, key_frame): torchcodec then seeks as in its exact mode without scanning the file, and its
    frame i is the probe's frame i by construction. A frame lasts until the next one; the last as long as the
    one before it."""
    durations = np.diff(info.pts, append=info.pts[-1] + (info.pts[-1] - info.pts[-2] if len(info.pts) > 1 else 1))
    rows = zip(info.pts.tolist(), durations.tolist(), np.isin(info.pts, info.key_pts).astype(int).tolist())
    return '{"frames": [' + ", ".join(f'{{"pts": {p}, "duration": {d}, "key_frame": {k}}}' for p, d, k in rows) + "]}"


def _open_torchcodec(source, info: VideoInfo, device: str = "cpu"):
    """torchcodec's VideoDecoder on the probe's stream. Exact mode (it scans the file's packets itself: cheaper
    than parsing the probe's table, benchmarks/bench_open.py) where that scan works; where it fails (an mp4
    whose stream 0 is cover art: it seeks stream 0), given the probe's frame table (`frame_mappings`). A decoder
    that counts other frames than the probe raises _Untrusted."""
    from torchcodec.decoders import VideoDecoder
    if info.container in _BYTE_SEEKED:
        raise _Untrusted(f"torchcodec seeks {_BYTE_SEEKED[info.container]} to other frames")
    opts = {"stream_index": info.stream_index, "device": device, "dimension_order": "NHWC", "num_ffmpeg_threads": 1}
    try:
        video = VideoDecoder(source, seek_mode="exact", **opts)
    except RuntimeError:
        video = VideoDecoder(source, custom_frame_mappings=frame_mappings(info), **opts)
    if video.metadata.num_frames != info.num_frames:
        raise _Untrusted(f"torchcodec counts {video.metadata.num_frames} frames, the file holds {info.num_frames}")
    return video


def _wrong_frames(pts_seconds: torch.Tensor, info: VideoInfo, indices: list[int]) -> str:
    """"" when torchcodec's frames have the probe's timestamps for `indices`, else which do not (the seek found
    another frame: a file torchcodec reads otherwise than PyAV)."""
    got = np.round(pts_seconds.cpu().double().numpy() / float(info.time_base)).astype(np.int64)
    wrong = np.flatnonzero(got != info.pts[indices])
    return ", ".join(f"frame {indices[k]}: pts {got[k]}, not {info.pts[indices[k]]}" for k in wrong[:3])


class _TorchcodecAccess:
    """torchcodec on the probe's stream (`_open_torchcodec`; it applies the display rotation itself). Frames
    whose timestamps are not the probe's are not trusted."""

    def __init__(self, path: str, info: VideoInfo):
        self._info = info
        try:
            self._decoder = _open_torchcodec(path, info)
        except _Untrusted:
            raise
        except Exception as err:
            raise _Untrusted(f"torchcodec cannot open it ({err})") from err

    def get(self, indices: list[int]) -> torch.Tensor:
        batch = self._decoder.get_frames_at(indices)
        wrong = _wrong_frames(batch.pts_seconds, self._info, indices)
        if wrong:
            raise _Untrusted(f"torchcodec returned other frames than the probe's ({wrong})")
        return batch.data

    def close(self) -> None:
        self._decoder = None


class _DecordAccess:
    """decord's frame-index random access (it does not apply the display rotation, and reads FFmpeg's best
    video stream: it cannot be told which)."""

    def __init__(self, path: str, info: VideoInfo):
        import decord
        if info.video_streams > 1:
            raise _Untrusted(f"decord cannot be told which of the {info.video_streams} video streams to read")
        if info.rotation:
            raise _Untrusted(f"decord ignores the display rotation ({info.rotation} degrees)")
        if info.open_gop:   # it returns a frame 2-3 later for frames shown before a keyframe, silently
            raise _Untrusted("decord returns wrong frames around the keyframes of open GOPs")
        if info.container in _BYTE_SEEKED:
            raise _Untrusted(f"decord seeks {_BYTE_SEEKED[info.container]} to other frames")
        try:
            self._reader = decord.VideoReader(path, num_threads=1)
        except Exception as err:
            raise _Untrusted(f"decord cannot open it ({err})") from err
        if len(self._reader) != info.num_frames:
            raise _Untrusted(f"decord counts {len(self._reader)} frames, the file holds {info.num_frames}")

    def get(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self._reader.get_batch(indices).asnumpy())

    def close(self) -> None:
        self._reader = None


class _PyAVAccess:
    """Seek to the last keyframe shown at or before the first wanted frame (by the probe's table: a seek to the
    frame's own timestamp can land on a later keyframe, as mp4 seeks by decoding timestamp, or on one whose
    open GOP shows that frame without decoding it) and decode forward; a frame is identified by its timestamp
    (the probe's table), so no frame is repeated or shifted, on constant or variable frame rate."""

    def __init__(self, path: str, info: VideoInfo):
        try:
            self._container = av.open(path)
        except Exception as err:
            raise _Untrusted(f"PyAV cannot open it ({err})") from err
        self._stream = self._container.streams[info.stream_index]
        self._info = info

    def get(self, indices: list[int]) -> torch.Tensor:
        pts = self._info.pts
        position = {int(pts[i]): k for k, i in enumerate(indices)}
        out: list = [None] * len(indices)
        self._container.seek(int(self._info.seek_pts[indices[0]]), stream=self._stream, backward=True,
                             any_frame=False)
        stop = int(pts[indices[-1]])
        found = 0
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                raise _Untrusted("a decoded frame has no timestamp")
            if found == 0 and frame.pts > pts[indices[0]]:
                raise _Untrusted("the seek landed after the first wanted frame")
            k = position.get(frame.pts)
            if k is not None and out[k] is None:
                out[k] = frame.to_ndarray(format="rgb24")
                found += 1
            if frame.pts >= stop:
                break
        if found < len(indices):
            raise _Untrusted(f"{len(indices) - found} wanted frames did not come out of the decoder")
        return _upright(torch.from_numpy(np.stack(out)), self._info.rotation)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


_ACCESS = {"torchcodec": _TorchcodecAccess, "decord": _DecordAccess, "pyav": _PyAVAccess}


# ------------------------------------------------------------------------------------- reader
class VideoReader:
    """An open video: `num_frames`, `fps`, `info`, `sequential`, `get_frames(indices)`. A context manager."""

    def __init__(self, path: str, backend: str):
        self.path, self.backend = path, backend
        self.info = probe(path)
        self.num_frames, self.fps = self.info.num_frames, self.info.fps
        self.sequential_reason = self.info.unsafe
        self._access = None
        if not self.sequential_reason:
            try:
                self._access = _ACCESS[backend](path, self.info)
            except _Untrusted as err:
                self.sequential_reason = str(err)

    @property
    def sequential(self) -> bool:
        """True when this file is (or turned out to need to be) decoded sequentially."""
        return bool(self.sequential_reason)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 (len(indices), H, W, 3) upright RGB frames for sorted, unique frame indices."""
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no frame indices")
        if any(b <= a for a, b in zip(indices, indices[1:])) or indices[0] < 0 or indices[-1] >= self.num_frames:
            raise ValueError(f"{self.path}: frame indices must be sorted, unique and in [0, {self.num_frames}), "
                             f"got {indices[:4]}...{indices[-2:]}")
        if self._access is not None:
            try:
                frames = self._access.get(indices)
                if frames.shape[0] == len(indices):
                    return frames
                raise _Untrusted(f"{self.backend} returned {frames.shape[0]} of {len(indices)} frames")
            except Exception as err:  # a decoder error or an untrusted result: the sequential decode is the truth
                self._access.close()
                self._access = None
                self.sequential_reason = f"{self.backend} random access failed ({err})"
        if self.path not in _LOGGED_SEQUENTIAL:
            _LOGGED_SEQUENTIAL.add(self.path)
            logger.info("%s: decoding sequentially (%s)", self.path, self.sequential_reason)
        return _upright(decode_sequential(self.path, self.info, indices), self.info.rotation)

    def close(self) -> None:
        if self._access is not None:
            self._access.close()
            self._access = None

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_sequential(path: str, info: VideoInfo, indices: Sequence[int], source=None) -> torch.Tensor:
    """Frames `indices` (sorted, unique) decoded from the first packet on, in order (no seeking): a
    frame is identified by its timestamp in the probe's table; one without a usable timestamp takes
    the position after the previous frame. A packet the decoder rejects is skipped. Frames are stored
    as decoded (not rotated). `source` (a file object) is read instead of `path`, which errors still name."""
    rank = {int(p): i for i, p in enumerate(info.pts)}
    position = {i: k for k, i in enumerate(indices)}
    out: list = [None] * len(indices)
    last, current, found = indices[-1], -1, 0
    try:
        with av.open(path if source is None else source) as container:
            stream = container.streams[info.stream_index]
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    continue
                for frame in frames:
                    i = rank.get(frame.pts) if frame.pts is not None else None
                    current = i if i is not None and i > current else current + 1
                    k = position.get(current)
                    if k is not None:
                        out[k] = frame.to_ndarray(format="rgb24")
                        found += 1
                    if current >= last:
                        break
                if current >= last:
                    break
    except av.error.FFmpegError as err:
        raise DecodeError(f"{path}: PyAV failed while decoding sequentially ({err})") from err
    if found < len(indices):
        missing = [i for i, frame in zip(indices, out) if frame is None]
        raise DecodeError(f"{path}: frames {missing[:6]} of {info.num_frames} do not decode")
    return torch.from_numpy(np.stack(out))


def decode_bytes_sequentially(data: torch.Tensor, indices: Sequence[int], info: VideoInfo, path: str) -> torch.Tensor:
    """`decode_sequential` on the bytes of the video at `path` (what a loader worker read), upright, on the CPU:
    the device path's fallback for a file torchcodec cannot decode or be trusted on."""
    frames = decode_sequential(path, info, [int(i) for i in indices], source=io.BytesIO(data.numpy().tobytes()))
    return _upright(frames, info.rotation)


def open_video(path: str, backend: str = "auto") -> VideoReader:
    """Open `path` for frame-exact decoding with `backend` (auto/torchcodec/decord/pyav, resolved with
    `resolve_backend`); raises DecodeError for missing, unopenable or undecodable files."""
    return VideoReader(path, resolve_backend(backend))


def read_video_bytes(path: str) -> torch.Tensor:
    """The bytes of a video file as a uint8 tensor (what a DataLoader worker hands to a device decoder)."""
    try:
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as err:
        raise DecodeError(f"{path}: cannot read the file ({err})") from err


# torchcodec before 0.17 keeps NVDEC decoders in a cache keyed on the coded (macroblock-padded) size and decodes a
# video with the crop of the first video of that coded size it saw: frames of the right shape with a band of wrong
# rows and shifted colours, and no error (torchcodec#1704, fixed in 0.17 by #1706). Kinetics resized to short side
# 256 has many widths that share a coded one (454, 456 -> 464). An empty cache avoids it (the workaround).
NVDEC_MIN_TORCHCODEC = (0, 17)
_CACHE_SETTERS = ("set_nvdec_cache_capacity", "set_nvdec_cache_size")  # the name differed between releases


def guard_nvdec_cache(version: str | None = None, decoders=None) -> bool:
    """Make NVDEC decoding safe from torchcodec#1704 in this process. torchcodec (`version` / its `decoders`
    module, by default the installed ones) from NVDEC_MIN_TORCHCODEC on: nothing to do (False). Older: its
    decoder cache is emptied for good (True; each video then creates its NVDEC decoder, tens of ms), or, when it
    has no such setter, an ImportError naming the fix. Nothing when torchcodec does not import, or not with
    this torch (decode_on_device names that fix)."""
    if version is None:
        try:
            from torchcodec import __version__ as version, decoders
        except Exception:  # not installed, or built for another torch than this one (an OSError of its library)
            return False
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found >= NVDEC_MIN_TORCHCODEC:
        return False
    need = ".".join(map(str, NVDEC_MIN_TORCHCODEC))
    setter = next((getattr(decoders, name) for name in _CACHE_SETTERS if hasattr(decoders, name)), None)
    if setter is None:
        raise ImportError(f"DATA.DECODE_DEVICE cuda needs torchcodec >= {need}, this is {version}: older releases "
                          "decode some videos on NVDEC with the crop of an earlier video of the same coded size, "
                          f"silently (torchcodec issue 1704). Fix: pip install 'torchcodec>={need}' with the torch "
                          "it matches (constraints.txt), or leave DATA.DECODE_DEVICE at cpu.")
    setter(0)
    logger.warning("torchcodec %s: its NVDEC decoder cache is off (it can crop a video like an earlier one of the "
                   "same coded size, torchcodec issue 1704), so every video creates its decoder; torchcodec >= %s "
                   "decodes faster.", version, need)
    return True


def decode_on_device(data: torch.Tensor, indices: Sequence[int], info: VideoInfo, device: torch.device | str,
                     path: str) -> tuple[torch.Tensor, str]:
    """Frames `indices` (sorted, unique) of the video whose bytes are `data` and whose probe is `info`, decoded by
    torchcodec on `device` (NVDEC on a CUDA device; it applies the display rotation) on the probe's stream
    (`_open_torchcodec`): upright uint8 (K, H, W, 3) on `device`, and why torchcodec decoded on the CPU instead
    of NVDEC ("" when it did not). Another frame count, frames whose timestamps are not the probe's or frames of
    another size than the probe's upright one are a DecodeError."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (the import error names the fix)
    except Exception as err:  # not installed, or built for another torch than this one (an OSError of its library)
        raise ImportError("DATA.DECODE_DEVICE cuda decodes with torchcodec: " + torchcodec_status() + ". Fix: "
                          "pip install the torchcodec release that matches your torch (see constraints.txt) and "
                          "FFmpeg's shared libraries.") from err
    device, indices = torch.device(device), [int(i) for i in indices]
    try:
        video = _open_torchcodec(data, info, str(device))
        batch = video.get_frames_at(indices)
        fallback = str(video.cpu_fallback) if device.type == "cuda" and video.cpu_fallback else ""
    except _Untrusted as err:
        raise DecodeError(f"{path}: on {device}, {err}") from err
    except torch.OutOfMemoryError:
        raise  # the device's state, not the file's: not a reason to decode this video on the CPU from now on
    except Exception as err:  # torchcodec raises RuntimeError / ValueError for streams it cannot decode
        raise DecodeError(f"{path}: torchcodec cannot decode it on {device} ({err})") from err
    wrong = _wrong_frames(batch.pts_seconds, info, indices)
    if wrong:
        raise DecodeError(f"{path}: torchcodec on {device} returned other frames than the probe's ({wrong})")
    height, width = batch.data.shape[1:3]
    if (height, width) != (info.height, info.width):  # the views' crop boxes are the probe's upright frame's
        raise DecodeError(f"{path}: torchcodec on {device} returned {width}x{height} frames, the probe's are "
                          f"{info.width}x{info.height}")
    return batch.data.to(device, non_blocking=True), fallback


# ------------------------------------------------------------------------------------- index maths
def get_start_end_idx(video_size: int, clip_size: float, clip_idx: int, num_clips: int) -> tuple[float, float]:
    """Start/end frame of a clip of `clip_size` frames: random start when clip_idx == -1, else the
    clip_idx-th of num_clips evenly spaced starts. delta = max(video_size - clip_size, 0)."""
    delta = max(video_size - clip_size, 0)
    if clip_idx == -1:
        start = float(torch.rand(()) * delta)
    else:
        start = delta * clip_idx / num_clips
    return start, start + clip_size - 1


def temporal_indices(start: float, end: float, num_samples: int, length: int) -> torch.Tensor:
    """linspace(start, end, num_samples), clamped to [0, length-1] and truncated to int (original rule)."""
    return torch.linspace(start, end, num_samples).clamp(0, length - 1).long()


def clip_size_frames(num_frames: int, sampling_rate: int, target_fps: float, fps: float) -> float:
    """Source-fps frames spanned by NUM_FRAMES * SAMPLING_RATE frames at TARGET_FPS."""
    return num_frames * sampling_rate / target_fps * fps


def clip_window(num_video_frames: int, clip_size: float, clip_idx: int, num_clips: int) -> tuple[int, int]:
    """The [first, first+length) frame window a sample works on: the frames the original decodes.

    With the real-valued start s and end e = s + clip_size - 1 of `get_start_end_idx`, the original
    keeps the frames whose timestamps lie in [s, e] plus the next one: first = ceil(s), last =
    floor(e) + 1. That is clip_size frames for a fractional start (every random training window) and
    clip_size + 1 for a whole-number one (e.g. the evaluation window from frame 0); all cut to the video."""
    start, end = get_start_end_idx(num_video_frames, clip_size, clip_idx, num_clips)
    first = min(math.ceil(start - 1e-9), num_video_frames - 1)
    last = min(math.floor(end + 1e-9) + 1, num_video_frames - 1)
    return first, max(1, last - first + 1)


def ssl_view_indices(length: int, global_frames: Sequence[int], local_frames: Sequence[int]) -> list[torch.Tensor]:
    """Frame indices (relative to the window) of the SVT views over a window of `length` frames.

    Global 1 spreads over [0, L-5], global 2 over [5, L]. Each local view covers a random sub-window of
    width L//8 with a start in [0, L-W-1], independently per view."""
    if len(global_frames) != 2:
        raise ValueError(f"SVT has 2 global views, got global frame counts {list(global_frames)}")
    views = [temporal_indices(0, length - 5, global_frames[0], length),
             temporal_indices(5, length, global_frames[1], length)]
    width = length // 8
    for n in local_frames:
        start = int(torch.randint(0, max(length - width, 1), ()))
        views.append(temporal_indices(start, start + width, n, length))
    return views


def union_positions(first: int, view_indices: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sorted unique absolute frame indices of all views, per-view positions into them)."""
    absolute = [first + idx for idx in view_indices]
    union, inverse = torch.unique(torch.cat(absolute), sorted=True, return_inverse=True)
    return union, list(torch.split(inverse, [len(idx) for idx in absolute]))


def decode_union(reader: VideoReader, first: int, view_indices: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Decode the union of all views' frames once: (uint8 frames (K, H, W, 3), per-view positions into
    them). Consumers crop before gathering, so full frames are never copied per view."""
    union, positions = union_positions(first, view_indices)
    return reader.get_frames(union.tolist()), positions


def decode_views(reader: VideoReader, first: int, view_indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Decode the union of all views' frames once and cut each view: list of uint8 (T_v, H, W, 3)."""
    frames, positions = decode_union(reader, first, view_indices)
    return [frames[pos] for pos in positions]
