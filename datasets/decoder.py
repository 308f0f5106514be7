"""Video decoding (decord or PyAV behind one interface) and the frame-index maths of the original.

A sample opens its video once (`open_video`), picks every frame index its views need from the
video length and fps, and decodes the union of those indices in one call (`VideoReader.get_frames`).
Both backends return uint8 RGB frames (K, H, W, 3) in presentation order; on H.264 mp4 they are
bit-identical for the same indices (tests/test_data_decoder.py).
"""
import os
from typing import Sequence

import numpy as np
import torch

BACKENDS = ("decord", "pyav")


class DecodeError(RuntimeError):
    """A video that is missing, cannot be opened, or has no decodable frames."""


class VideoReader:
    """An open video: `num_frames`, `fps`, `get_frames(indices)`. Use as a context manager."""

    num_frames: int
    fps: float

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 (len(indices), H, W, 3) RGB for the given (sorted, unique) frame indices."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecordReader(VideoReader):
    def __init__(self, path: str):
        try:
            import decord
        except ImportError as err:
            raise ImportError("DATA.DECODING_BACKEND decord needs the decord package (x86-64 wheels only); "
                              "install it or pass --opts DATA.DECODING_BACKEND pyav.") from err
        try:
            self._vr = decord.VideoReader(path, num_threads=1)
        except Exception as err:  # decord raises DECORDError / RuntimeError for bad files
            raise DecodeError(f"{path}: decord cannot open the video ({err})") from err
        self.path = path
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps() or 30.0)

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        try:
            frames = self._vr.get_batch(list(indices)).asnumpy()
        except Exception as err:
            raise DecodeError(f"{self.path}: decord failed to decode frames ({err})") from err
        return torch.from_numpy(frames)

    def close(self) -> None:
        self._vr = None


class PyAVReader(VideoReader):
    """Seeks to the first needed frame (previous keyframe) and decodes forward, keeping only the
    needed frames. Frame index = round((pts - start) * time_base * fps), as a constant-fps stream has."""

    def __init__(self, path: str):
        import av
        try:
            self._container = av.open(path)
            self._stream = self._container.streams.video[0]
        except Exception as err:
            raise DecodeError(f"{path}: PyAV cannot open the video ({err})") from err
        self.path = path
        stream = self._stream
        self.fps = float(stream.average_rate or stream.guessed_rate or 30.0)
        self._tb = float(stream.time_base)
        self._start = stream.start_time or 0
        self._all = None
        self.num_frames = stream.frames
        if not self.num_frames and stream.duration:
            self.num_frames = int(round(stream.duration * self._tb * self.fps))
        if not self.num_frames:
            # No frame count or duration in the container: decode everything once, as the original does.
            self._all = self._decode_range(0, None)
            self.num_frames = len(self._all)
        if not self.num_frames:
            raise DecodeError(f"{path}: the video has no frames")

    def _index(self, pts: int) -> int:
        return int(round((pts - self._start) * self._tb * self.fps))

    def _decode_range(self, first: int, wanted: set | None) -> dict:
        """Frames {index: ndarray} for the indices in `wanted` (all frames when None), from `first` on."""
        out = {}
        try:
            target = self._start + int(first / self.fps / self._tb)
            self._container.seek(target, backward=True, any_frame=False, stream=self._stream)
            last = max(wanted) if wanted else None
            for frame in self._container.decode(self._stream):
                if frame.pts is None:
                    continue
                idx = self._index(frame.pts)
                if wanted is None or idx in wanted:
                    out[idx] = frame.to_ndarray(format="rgb24")
                if last is not None and idx >= last:
                    break
        except Exception as err:
            raise DecodeError(f"{self.path}: PyAV failed to decode ({err})") from err
        return out if wanted is not None else {i: f for i, f in enumerate(out[k] for k in sorted(out))}

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        indices = list(indices)
        if self._all is not None:
            frames = self._all
        else:
            frames = self._decode_range(min(indices), set(indices))
            missing = set(indices) - set(frames)
            if missing and (not frames or min(missing) < max(frames)):
                # The seek landed past a needed frame (inexact index): decode those from the start.
                frames.update(self._decode_range(0, missing))
        if not frames:
            raise DecodeError(f"{self.path}: PyAV decoded no frames")
        # A frame count from the container can overshoot by a frame or two (or a timestamp be skipped):
        # such an index takes the nearest decoded frame.
        keys = np.array(sorted(frames))
        nearest = [i if i in frames else int(keys[np.abs(keys - i).argmin()]) for i in indices]
        return torch.from_numpy(np.stack([frames[i] for i in nearest]))

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def open_video(path: str, backend: str = "decord") -> VideoReader:
    """Open `path` with backend "decord" or "pyav"; raises DecodeError for missing or broken files."""
    if backend not in BACKENDS:
        raise ValueError(f"DATA.DECODING_BACKEND {backend!r} is not one of {BACKENDS}")
    if not os.path.isfile(path):
        raise DecodeError(f"{path}: no such file")
    return DecordReader(path) if backend == "decord" else PyAVReader(path)


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
    """The [first, first+length) frame window a sample works on (the part the original decodes).

    length = min(round(clip_size), frames left after the start); the original's PyAV reader also keeps
    one trailing frame, which is not reproduced (DATASET.md)."""
    start, _ = get_start_end_idx(num_video_frames, clip_size, clip_idx, num_clips)
    first = min(int(start), num_video_frames - 1)
    length = max(1, min(int(round(clip_size)), num_video_frames - first))
    return first, length


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


def decode_union(reader: VideoReader, first: int, view_indices: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Decode the union of all views' frames once: (uint8 frames (K, H, W, 3), per-view positions into
    them). Consumers crop before gathering, so full frames are never copied per view."""
    absolute = [first + idx for idx in view_indices]
    union, inverse = torch.unique(torch.cat(absolute), sorted=True, return_inverse=True)
    frames = reader.get_frames(union.tolist())
    return frames, list(torch.split(inverse, [len(idx) for idx in absolute]))


def decode_views(reader: VideoReader, first: int, view_indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Decode the union of all views' frames once and cut each view: list of uint8 (T_v, H, W, 3)."""
    frames, positions = decode_union(reader, first, view_indices)
    return [frames[pos] for pos in positions]
