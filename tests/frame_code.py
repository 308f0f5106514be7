"""Test videos whose frames carry their own index, in the containers users have.

Frame k shows its index as a coarse binary code: BANDS bands stacked along the short side of the
displayed picture, each band spanning the whole long side: a start band (white), 6 index bits (most
significant first, white = 1) and a stop band (black). Crops of the evaluation modes only cut the long
side and resizes keep relative positions, so `read_index` recovers k from any clip these tests make;
a frame that is not the one asked for, or a picture that is not upright, does not read back (the start
and stop bands catch a reversed or transposed code).

`write_fixtures(root)` writes one file per case of FIXTURES (64x48, 30 fps unless said), all made with
PyAV at test time:
- h264_bframes.mp4   H.264 with B-frames (3), keyframe every 10 frames.
- mpeg4_bframes.avi  MPEG-4 Part 2 with B-frames (2) in AVI (DivX-style packed B-frames).
- mpeg4_plain.avi    MPEG-4 Part 2 without B-frames in AVI (Xvid-style).
- vfr.mp4            H.264, variable frame rate (frame durations cycle through 1, 2, 3 and 1 ticks of 1/60 s).
- rotated.mp4        H.264 stored 64x48 with a 90-degree display matrix: displayed upright as 48x64.
- truncated.mp4      H.264 mp4 (index first) cut inside the keyframe of frame 30: the index lists 48 frames,
                     frames 0..29 are there.
- short.mp4          H.264, 6 frames: shorter than one clip.
- vp9.webm           VP9 in WebM.
- h264.mkv           H.264 with B-frames in Matroska (millisecond timestamps: 0, 33, 67, ...).
- offset_10s.mp4     H.264 whose first frame is at 10 s (a clip cut from a longer video and re-encoded).
- cut_editlist.mp4   A stream-copied cut (as `ffmpeg -ss 7/30 -i src.mp4 -c copy` writes it): the packets start
                     at the keyframe before the cut point, and an edit list drops the CUT_PREROLL frames before
                     it (the demuxer marks them discard; they are decoded for reference and never shown).
- open_gop_60fps.mp4 H.264 at 60 fps with open GOPs (x264 --open-gop, keyframe every 12 frames, 3 B-frames):
                     frames shown before a keyframe are decoded after it.
- hevc.mp4           HEVC (libx265 defaults: open GOPs, B-frames), keyframe every 10 frames; not written when
                     this FFmpeg has no libx265 (`missing_encoder`).
- noindex.avi        MPEG-4 Part 2 AVI at 25 fps (UCF-101's format) whose idx1 index is cut off and whose
                     has-index flag is cleared: a damaged download.
- audio_first.mp4    AAC audio as stream 0, H.264 video as stream 1 at 30000/1001 fps (NTSC, like most
                     YouTube clips).
- truncated_bframes.mp4 h264_bframes.mp4 (index first) cut half-way into the packet of frame BFRAMES_CUT_AT = 38,
                     inside a GOP with B-frames (decoding order 30 34 32 31 33 38 ...): the frames before it in
                     decoding order, 0..34, are there; the last of them, 31..33, are B-frames shown before 34.
- cover_art.mp4      A cover picture (PNG, 32x32, disposition attached_pic, showing code 63) as stream 0, the
                     H.264 video as stream 1: the cover's iTunes `covr` tag is moved before the video track in
                     the moov box (FFmpeg numbers streams in the order it reads them; its own muxer writes the
                     tag last).
- two_video_streams.mkv Stream 0: H.264 without B-frames, frame k shows k; stream 1: H.264 with B-frames at
                     96x72, frame k shows 47 - k. FFmpeg's "best stream" is stream 1 here (more frames seen while
                     probing); the original reads stream 0 (`streams.video[0]`).

`write_format_fixtures(root)` writes one file per case of FORMATS: the codecs, pixel formats and containers of
real collections, FORMAT_FRAMES frames each (64x48 unless said, closed GOPs of 10, B-frames where the codec
has them):
- h264_10bit.mp4     H.264 High 10 (yuv420p10le), as in newer Kinetics re-downloads.
- hevc_10bit.mp4     HEVC Main 10 (yuv420p10le, x265 defaults: open GOPs).
- av1.mp4            AV1 (SVT-AV1), YouTube's current format.
- vp8.webm           VP8 in WebM.
- mjpeg.avi          Motion JPEG in AVI, full range (yuvj420p): cameras, older datasets.
- mpeg2.mpg          MPEG-2 video in an MPEG program stream (DVD-style; closed GOPs, 2 B-frames).
- mpeg2.ts           The same in an MPEG transport stream (broadcast, camcorders' .m2ts).
- h264.mov           H.264 with B-frames in QuickTime (phones, cameras).
- odd_size_444.mp4   H.264 High 4:4:4 (yuv444p) at 65x49: odd dimensions.
- odd_size.webm      VP9 4:2:0 at 65x49 (the chroma planes are rounded up).

`write_colour_bars` writes COLOUR_BARS straight as YUV planes (no RGB conversion on the way in), tagged with a
colour matrix and range; `bars_rgb` is what they are in RGB under that matrix and range (the reference maths).
"""
import os
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from datasets import decoder

BANDS = 8                     # start band, 6 bits, stop band
BITS = BANDS - 2
HIGH, LOW = 215, 40
NUM_FRAMES = 48
SHORT_FRAMES = 6
TRUNCATED_AT = 30             # truncated.mp4 holds frames 0..29 (closed GOPs of 10)
BFRAMES_CUT_AT = 38           # truncated_bframes.mp4 is cut inside this frame's packet ...
BFRAMES_HELD = 35             # ... and holds frames 0..34
COVER_CODE = 63               # what the cover picture of cover_art.mp4 shows
CUT_PREROLL = 7               # cut_editlist.mp4: frames decoded before the cut point, dropped by the edit list
FIXTURES = ("h264_bframes.mp4", "mpeg4_bframes.avi", "mpeg4_plain.avi", "vfr.mp4", "rotated.mp4",
            "truncated.mp4", "short.mp4", "vp9.webm", "h264.mkv", "offset_10s.mp4", "cut_editlist.mp4",
            "open_gop_60fps.mp4", "hevc.mp4", "noindex.avi", "audio_first.mp4", "truncated_bframes.mp4",
            "cover_art.mp4", "two_video_streams.mkv")
FORMATS = ("h264_10bit.mp4", "hevc_10bit.mp4", "av1.mp4", "vp8.webm", "mjpeg.avi", "mpeg2.mpg", "mpeg2.ts",
           "h264.mov", "odd_size_444.mp4", "odd_size.webm")
FORMAT_FRAMES = 24
ODD_SIZE = (49, 65)           # height, width of the odd_size fixtures
# Fixtures made with an encoder (and pixel format) FFmpeg builds may lack.
ENCODERS = {"hevc.mp4": ("libx265", "yuv420p"), "hevc_10bit.mp4": ("libx265", "yuv420p10le"),
            "h264_10bit.mp4": ("libx264", "yuv420p10le"), "av1.mp4": ("libsvtav1", "yuv420p"),
            "vp8.webm": ("libvpx", "yuv420p")}
VFR_TICKS = (1, 2, 3, 1)      # frame durations in 1/60 s, cycled
BACKENDS = ("torchcodec", "decord", "pyav")


def backend_unavailable(backend: str) -> str:
    """Why `backend` cannot be used here ("" when it can; PyAV always can)."""
    return {"torchcodec": decoder.torchcodec_status, "decord": decoder.decord_status}.get(backend, lambda: "")()


def require_backend(backend: str) -> None:
    """Skip the calling test when `backend` cannot be used here (saying why)."""
    why = backend_unavailable(backend)
    if why:
        pytest.skip(f"{backend} unavailable here: {why}")


def missing_encoder(name: str) -> str:
    """Why fixture `name` cannot be made here ("" when it can)."""
    if name not in ENCODERS:
        return ""
    codec, pix_fmt = ENCODERS[name]
    if codec not in av.codecs_available:
        return f"this FFmpeg has no {codec} encoder"
    if pix_fmt not in {f.name for f in av.Codec(codec, "w").video_formats or ()}:
        return f"this FFmpeg's {codec} does not encode {pix_fmt}"
    return ""


MADE = tuple(name for name in FIXTURES if not missing_encoder(name))   # the fixtures write_fixtures makes here
FORMATS_MADE = tuple(name for name in FORMATS if not missing_encoder(name))


def code_frame(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 RGB (height, width, 3) picture of `index`: bands stacked along the short side."""
    if not 0 <= index < 2 ** BITS:
        raise ValueError(f"index {index} does not fit in {BITS} bits")
    bits = [1] + [(index >> (BITS - 1 - b)) & 1 for b in range(BITS)] + [0]
    short, long = min(height, width), max(height, width)
    edges = np.linspace(0, short, BANDS + 1).round().astype(int)
    profile = np.empty(short, np.uint8)
    for bit, lo, hi in zip(bits, edges[:-1], edges[1:]):
        profile[lo:hi] = HIGH if bit else LOW
    plane = np.broadcast_to(profile[:, None], (short, long))
    plane = plane if height <= width else plane.T
    return np.repeat(plane[:, :, None], 3, axis=2).copy()


def read_index(picture, portrait: bool | None = None) -> int:
    """Index shown by one picture: (H, W), (H, W, C) or (C, H, W), any value scale (uint8, or normalised:
    bits are split at the midrange of the band values). The bands are read along the short side, or
    along the width when `portrait` (for square outputs of a portrait video). -1 when the picture carries
    no valid code (another picture, not upright, blank)."""
    a = np.asarray(picture, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=0) if a.shape[0] in (1, 3) and a.shape[2] not in (1, 3) else a.mean(axis=2)
    height, width = a.shape
    portrait = height > width if portrait is None else portrait
    profile = a.mean(axis=0) if portrait else a.mean(axis=1)
    short = len(profile)
    centres = ((np.arange(BANDS) + 0.5) * short / BANDS).astype(int)
    mid = (profile.max() + profile.min()) / 2
    if profile.max() - profile.min() < 1e-6:
        return -1
    bits = [int(profile[c] > mid) for c in centres]
    if bits[0] != 1 or bits[-1] != 0:
        return -1
    return int("".join(map(str, bits[1:-1])), 2)


def read_clip(clip, time_dim: int, portrait: bool | None = None) -> list[int]:
    """Indices of every frame of a clip; `time_dim` is the axis of time (0 for (T, H, W, C), 1 for (C, T, H, W))."""
    a = np.moveaxis(np.asarray(clip, dtype=np.float64), time_dim, 0)
    if time_dim == 1:
        a = np.moveaxis(a, 1, -1)          # (T, C, H, W) -> (T, H, W, C)
    return [read_index(frame, portrait) for frame in a]


def encode_frames(path: str, codec: str, frames, options: dict, rate=30, time_base=None, pts=None,
            codec_tag=None, container_options=None, audio_first: bool = False, pix_fmt: str = "yuv420p",
            container_format: str | None = None) -> None:
    with av.open(path, "w", format=container_format, options=container_options or {}) as out:
        audio = out.add_stream("aac", rate=16000, layout="mono") if audio_first else None   # stream 0
        stream = out.add_stream(codec, rate=rate, options=options)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if codec_tag:
            stream.codec_tag = codec_tag
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if audio is not None:
            _mux_tone(out, audio, float(len(frames) / rate))
        for k, picture in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[k], time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _mux_tone(out, audio, seconds: float) -> None:
    """A quiet tone of `seconds` on the (mono) audio stream `audio` of `out`."""
    tone = (0.1 * np.sin(np.arange(int(seconds * audio.rate)) * 0.1)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
    frame.sample_rate, frame.pts = audio.rate, 0
    for packet in [*audio.encode(frame), *audio.encode()]:
        out.mux(packet)


def _cut_by_stream_copy(src: str, dst: str, cut: int) -> None:
    """What `ffmpeg -ss` + `-c copy` does to an mp4 at frame `cut`: copy the packets from the keyframe before
    it, shifted so that the cut frame is at 0; the frames before it get negative timestamps, which the mp4
    muxer hides behind an edit list."""
    with av.open(src) as video, av.open(dst, "w") as out:
        stream = video.streams.video[0]
        copy = out.add_stream_from_template(stream)
        shift = int(cut / (stream.average_rate * stream.time_base))
        packets = [p for p in video.demux(stream) if p.size]
        start = max(i for i, p in enumerate(packets) if p.is_keyframe and p.pts <= shift)
        for packet in packets[start:]:
            packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, copy
            out.mux(packet)


def truncate_inside(path: str, index: int) -> None:
    """Cut an mp4 whose index comes first half-way into the packet of frame `index` (30 fps), in place: a
    download that stopped."""
    with av.open(path) as video:
        cut = next(p.pos + p.size // 2 for p in video.demux(video=0) if p.size and
                   round(float(p.pts * p.time_base) * 30) == index)
    with open(path, "r+b") as f:
        f.truncate(cut)


def _encode_two_streams(path: str, first: list, second: list, first_options: dict, second_options: dict) -> None:
    """Two H.264 video streams of frames `first` and `second` (each with its options), interleaved, in `path`."""
    with av.open(path, "w") as out:
        streams = []
        for frames, options in ((first, first_options), (second, second_options)):
            stream = out.add_stream("libx264", rate=30, options=options)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            streams.append(stream)
        for pictures in zip(first, second):
            for stream, picture in zip(streams, pictures):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        for stream in streams:
            out.mux(stream.encode())


def _with_cover_first(src: str, dst: str) -> None:
    """Copy the video of mp4 `src` to `dst` with a PNG cover picture (attached_pic) that becomes stream 0."""
    with av.open(src) as video, av.open(dst, "w") as out:
        cover = out.add_stream("png")
        cover.width, cover.height, cover.pix_fmt = 32, 32, "rgb24"
        cover.disposition = av.stream.Disposition.attached_pic
        stream = video.streams.video[0]
        copy = out.add_stream_from_template(stream)
        out.mux(cover.encode(av.VideoFrame.from_ndarray(code_frame(COVER_CODE, 32, 32), format="rgb24")))
        out.mux(cover.encode())
        for packet in video.demux(stream):
            if packet.size:
                packet.stream = copy
                out.mux(packet)
    _move_udta_first(dst)


def _move_udta_first(path: str) -> None:
    """Move the udta box (where the mp4 muxer puts the cover) to the front of the moov box, in place. The moov
    box comes after the media data (no faststart), so no media offset changes."""
    data = bytearray(open(path, "rb").read())
    moov = data.find(b"moov") - 4
    end = moov + struct.unpack_from(">I", data, moov)[0]
    boxes, at = [], moov + 8
    while at < end:
        size = struct.unpack_from(">I", data, at)[0]
        boxes.append(bytes(data[at:at + size]))
        at += size
    boxes.sort(key=lambda box: box[4:8] != b"udta")   # stable: the other boxes keep their order
    data[moov + 8:end] = b"".join(boxes)
    open(path, "wb").write(bytes(data))


def _strip_avi_index(path: str) -> None:
    """Cut the idx1 chunk off the end of an AVI and clear the avih has-index flag, in place."""
    data = bytearray(open(path, "rb").read())
    flags_at = data.find(b"avih") + 8 + 12          # dwMicroSecPerFrame, dwMaxBytesPerSec, dwPaddingGranularity
    flags = struct.unpack_from("<I", data, flags_at)[0]
    struct.pack_into("<I", data, flags_at, flags & ~0x10)   # AVIF_HASINDEX
    open(path, "wb").write(bytes(data[:data.find(b"idx1")]))


def _set_rotation(path: str, degrees: int) -> None:
    """Write a rotation into the display matrix of the (first) track header of an mp4, in place."""
    data = bytearray(open(path, "rb").read())
    at = data.find(b"tkhd")
    version = data[at + 4]
    matrix_at = at + 4 + 4 + (32 if version == 1 else 20) + 16
    c, s = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees]
    fixed = lambda v: struct.pack(">i", int(v * 65536))
    data[matrix_at:matrix_at + 8] = fixed(c) + fixed(s)          # a, b (u follows)
    data[matrix_at + 12:matrix_at + 20] = fixed(-s) + fixed(c)   # c, d
    open(path, "wb").write(bytes(data))


def write_fixtures(root: str) -> dict[str, str]:
    """Write every FIXTURES file this FFmpeg can make (MADE) under root; returns {name: path}."""
    os.makedirs(root, exist_ok=True)
    frames = [code_frame(k) for k in range(NUM_FRAMES)]
    x264 = {"preset": "veryfast", "crf": "12", "g": "10", "bf": "3", "threads": "1",
            "x264-params": "b-adapt=0:scenecut=0"}
    paths = {name: os.path.join(root, name) for name in FIXTURES}
    encode_frames(paths["h264_bframes.mp4"], "libx264", frames, x264)
    encode_frames(paths["mpeg4_bframes.avi"], "mpeg4", frames, {"g": "10", "bf": "2", "qscale": "2"}, codec_tag="DX50")
    encode_frames(paths["mpeg4_plain.avi"], "mpeg4", frames, {"g": "10", "bf": "0", "qscale": "2"}, codec_tag="XVID")
    ticks = np.concatenate([[0], np.cumsum([VFR_TICKS[k % len(VFR_TICKS)] for k in range(NUM_FRAMES - 1)])])
    encode_frames(paths["vfr.mp4"], "libx264", frames, x264, rate=60, time_base=Fraction(1, 60), pts=ticks.tolist())
    upright = [code_frame(k, 64, 48) for k in range(NUM_FRAMES)]     # what the viewer sees: 48 wide, 64 tall
    stored = [np.ascontiguousarray(np.rot90(p, k=1)) for p in upright]  # stored picture before the display turn
    encode_frames(paths["rotated.mp4"], "libx264", stored, x264)
    _set_rotation(paths["rotated.mp4"], 90)
    encode_frames(paths["truncated.mp4"], "libx264", frames, x264, container_options={"movflags": "faststart"})
    with av.open(paths["truncated.mp4"]) as video:   # cut 10 bytes into the keyframe of frame TRUNCATED_AT
        cut = next(p.pos for p in video.demux(video=0) if p.is_keyframe and p.pts and p.pts > 0 and
                   round(float(p.pts * p.time_base) * 30) == TRUNCATED_AT) + 10
    with open(paths["truncated.mp4"], "r+b") as f:
        f.truncate(cut)
    encode_frames(paths["short.mp4"], "libx264", frames[:SHORT_FRAMES], x264)
    encode_frames(paths["vp9.webm"], "libvpx-vp9", frames, {"g": "10", "crf": "10", "b": "0", "deadline": "realtime",
                                                      "cpu-used": "8", "threads": "1"})
    encode_frames(paths["h264.mkv"], "libx264", frames, x264)
    encode_frames(paths["offset_10s.mp4"], "libx264", frames, x264, time_base=Fraction(1, 30),
                  pts=list(range(300, 300 + NUM_FRAMES)))
    source = os.path.join(root, "cut_source.mp4")   # grey pre-roll (no code) then the coded frames
    encode_frames(source, "libx264", [np.full_like(frames[0], 128)] * CUT_PREROLL + frames, x264)
    _cut_by_stream_copy(source, paths["cut_editlist.mp4"], CUT_PREROLL)
    os.remove(source)
    encode_frames(paths["open_gop_60fps.mp4"], "libx264", frames,
                  {**x264, "g": "12", "x264-params": "b-adapt=0:scenecut=0:open-gop=1"}, rate=60)
    if not missing_encoder("hevc.mp4"):
        encode_frames(paths["hevc.mp4"], "libx265", frames, {"preset": "ultrafast", "crf": "12", "x265-params":
                      "log-level=error:keyint=10:min-keyint=10:bframes=3:scenecut=0:pools=1:frame-threads=1"})
    encode_frames(paths["noindex.avi"], "mpeg4", frames, {"g": "10", "bf": "0", "qscale": "2"}, rate=25,
                  codec_tag="XVID")
    _strip_avi_index(paths["noindex.avi"])
    encode_frames(paths["audio_first.mp4"], "libx264", frames, x264, rate=Fraction(30000, 1001), audio_first=True)
    encode_frames(paths["truncated_bframes.mp4"], "libx264", frames, x264, container_options={"movflags": "faststart"})
    truncate_inside(paths["truncated_bframes.mp4"], BFRAMES_CUT_AT)
    _with_cover_first(paths["h264_bframes.mp4"], paths["cover_art.mp4"])
    reversed_large = [code_frame(NUM_FRAMES - 1 - k, 72, 96) for k in range(NUM_FRAMES)]
    _encode_two_streams(paths["two_video_streams.mkv"], frames, reversed_large, {**x264, "bf": "0"}, x264)
    return {name: path for name, path in paths.items() if name in MADE}


def write_format_fixtures(root: str) -> dict[str, str]:
    """Write every FORMATS file this FFmpeg can make (FORMATS_MADE) under root; returns {name: path}."""
    os.makedirs(root, exist_ok=True)
    frames = [code_frame(k) for k in range(FORMAT_FRAMES)]
    odd = [code_frame(k, *ODD_SIZE) for k in range(FORMAT_FRAMES)]
    x264 = {"preset": "veryfast", "crf": "12", "g": "10", "bf": "3", "threads": "1",
            "x264-params": "b-adapt=0:scenecut=0"}
    vpx = {"g": "10", "crf": "10", "deadline": "realtime", "cpu-used": "8", "threads": "1"}
    mpeg2 = {"g": "10", "bf": "2", "qscale": "2", "flags": "+cgop", "sc_threshold": "1000000000"}
    paths = {name: os.path.join(root, name) for name in FORMATS_MADE}
    makers = {
        "h264_10bit.mp4": lambda p: encode_frames(p, "libx264", frames, x264, pix_fmt="yuv420p10le"),
        "hevc_10bit.mp4": lambda p: encode_frames(p, "libx265", frames, {"preset": "ultrafast", "crf": "12",
            "x265-params": "log-level=error:keyint=10:min-keyint=10:bframes=3:scenecut=0:pools=1:frame-threads=1"},
            pix_fmt="yuv420p10le"),
        "av1.mp4": lambda p: encode_frames(p, "libsvtav1", frames, {"g": "10", "crf": "20", "preset": "12",
                                                                   "svtav1-params": "lp=1"}),
        "vp8.webm": lambda p: encode_frames(p, "libvpx", frames, {**vpx, "b": "1M"}),
        "mjpeg.avi": lambda p: encode_frames(p, "mjpeg", frames, {"qscale": "2"}, pix_fmt="yuvj420p"),
        "mpeg2.mpg": lambda p: encode_frames(p, "mpeg2video", frames, mpeg2, container_format="mpeg"),
        "mpeg2.ts": lambda p: encode_frames(p, "mpeg2video", frames, mpeg2, container_format="mpegts"),
        "h264.mov": lambda p: encode_frames(p, "libx264", frames, x264),
        "odd_size_444.mp4": lambda p: encode_frames(p, "libx264", odd, x264, pix_fmt="yuv444p"),
        "odd_size.webm": lambda p: encode_frames(p, "libvpx-vp9", odd, {**vpx, "b": "0"}),
    }
    for name, path in paths.items():
        makers[name](path)
    return paths


# 8 vertical bars, (Y, U, V) at 8 bits: a grey ramp from black to white (U = V = 128), then four colours whose
# RGB differs by 15-39 levels between the BT.601 and BT.709 matrices.
COLOUR_BARS = ((16, 128, 128), (60, 128, 128), (128, 128, 128), (235, 128, 128),
               (81, 90, 240), (145, 54, 34), (41, 240, 110), (170, 166, 16))
BAR_WIDTH, BAR_HEIGHT = 16, 32


def write_colour_bars(path: str, codec: str, pix_fmt: str, options: dict, colorspace: int | None = None,
                      color_range: int | None = None, frames: int = 3) -> None:
    """`frames` frames of the COLOUR_BARS side by side (BAR_WIDTH x BAR_HEIGHT each), their YUV values written as
    they are (scaled to 10 bits for a ...10le `pix_fmt`), the stream tagged with `colorspace` (AVColorSpace: also
    written as primaries and transfer) and `color_range` (1 limited, 2 full) when given."""
    yuv = np.asarray(COLOUR_BARS, dtype=np.int64)
    if pix_fmt.endswith("10le"):
        yuv, dtype = yuv * 4, np.uint16
    else:
        dtype = np.uint8
    luma = np.repeat(np.repeat(yuv[None, :, 0], BAR_HEIGHT, 0), BAR_WIDTH, 1)
    chroma = [np.repeat(np.repeat(yuv[None, :, c], BAR_HEIGHT // 2, 0), BAR_WIDTH // 2, 1) for c in (1, 2)]
    height, width = luma.shape
    planes = np.concatenate([luma.ravel()] + [c.ravel() for c in chroma]).astype(dtype).reshape(height * 3 // 2, width)
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=30, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        context = stream.codec_context
        if colorspace is not None:
            context.colorspace = context.color_primaries = context.color_trc = colorspace
        if color_range is not None:
            context.color_range = color_range
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(planes, format=pix_fmt)
            if colorspace is not None:
                frame.colorspace = colorspace
            if color_range is not None:
                frame.color_range = color_range
            frame.pts = k
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def bars_rgb(matrix: str, full_range: bool) -> np.ndarray:
    """(8, 3) RGB of COLOUR_BARS under `matrix` ("bt601" or "bt709": Kr, Kb) and range: limited range maps
    Y 16..235 and U, V 16..240 onto 0..255; rounded and clipped as uint8."""
    kr, kb = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}[matrix]
    y, u, v = (np.asarray(COLOUR_BARS, dtype=np.float64).T - [[0], [128], [128]])
    if not full_range:
        y, u, v = (y - 16) * 255 / 219, u * 255 / 224, v * 255 / 224
    r, b = y + 2 * (1 - kr) * v, y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], axis=1), 0, 255).round()


def read_bars(frame) -> np.ndarray:
    """(8, 3) RGB at the centre of each bar of a decoded (H, W, 3) colour-bars frame."""
    a = np.asarray(frame, dtype=np.float64)
    return a[BAR_HEIGHT // 2, BAR_WIDTH // 2::BAR_WIDTH]
