"""Shared test fixtures: a tiny synthetic video set and config factories pointing at it.

- `synthetic_root`: Path of a generated set (4 classes x 6 videos, 24 frames, 64x64, layout of
  datasets/synthetic.py), built once per test session.
- `synthetic_cfg(list_dir="annotations", tiny=True, **opts)`: a frozen cfg whose DATA paths point at
  it; tiny=True shrinks crops (32 global / 16 local / 32 test, jitter [36, 40]) and clips (4 frames,
  sampling rate 2) for fast tests; opts are "DATA.KEY"-style overrides, e.g. {"DATA.RAND_FR": True}.
- `make_video(path, frames=None, num_frames=16, size=(48, 64), fps=30, levels=None)`: write an mp4;
  `levels` makes frame i a flat grey image of that level (frame identity readable after decoding).
- `damaged_video(path)`: a 24-frame H.264 mp4 that opens (its index is intact) but whose middle third of
  packet bytes is random (a damaged download or disk); returns the frames whose packets lie wholly in it.
- `write_ssv2(root, num_videos=3, frames=12)`: a tiny SSv2 layout (annotation JSONs, frame lists, JPEG frames).
- `log_records(folder)`: the JSON lines of folder/log.txt without the wall-clock keys (`WALL_CLOCK_KEYS`).
- `HostReads`: a dispatch mode counting the reads of a tensor's value by the host (`.item()`, `float()`,
  `bool()`, ...), each of which waits for the GPU on CUDA: a training loop's count must not grow with its steps.
- `signal_at_call(monkeypatch, owner, name, nth, sig)`: a real stop signal sent by the process to itself at the
  `nth` call of owner.<name>; `assert_stopped(...)`: what a run ended by it shows (exit status 3, message, handlers).
- `device`: the device of the cuda-capable tests: cpu, or cuda with SVT_TEST_DEVICE=cuda
  (benchmarks/device_check.sh runs them so: `SVT_TEST_DEVICE=cuda pytest -m cuda_capable`). Tests that
  take it are marked `cuda_capable`; tests marked `gpu` skip without CUDA.
- `on_free_port(launch)`: `launch(port)` (a subprocess.CompletedProcess) on a port free a moment ago, once more
  on another when something took it first (TCPStore's EADDRINUSE); for a launch that rendezvous at MASTER_PORT.
- Every test, whatever the order: one intra-op thread (a test that needs more sets and restores it), no model
  hub download (HF_HUB_OFFLINE=1 unless set, also under a plain `pytest`), and no process group or DINO print
  wrapper left by an entry point run in-process (removed after each test), not even a destroyed group that a
  reference cycle keeps alive (the cyclic garbage is collected before and after each test).
"""
import builtins
import gc
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from datasets.synthetic import generate, write_video
from utils.defaults import get_cfg

# before any test module imports timm (huggingface_hub reads it once, at its import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_PRINT = builtins.print

WALL_CLOCK_KEYS = ("epoch_time", "train_data_wait")


def log_records(folder: Path) -> list[dict]:
    """log.txt's records without the keys that measure time (they differ between a run and its resume)."""
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_KEYS}
            for line in (Path(folder) / "log.txt").read_text().splitlines()]


class HostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense, which every `.item()` / `float(t)` / `int(t)` / `bool(t)` calls (on a CUDA
    tensor: a host sync), and `.tolist()` of a tensor off the CPU (a host sync too; it does not pass through the
    dispatcher, so Tensor.tolist is wrapped while the mode is on; on CPU tensors it reads memory, not counted)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist, reads = torch.Tensor.tolist, self

        def tolist(tensor):
            reads.count += tensor.device.type != "cpu"
            return reads._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def signal_at_call(monkeypatch, owner, name: str, nth: int, sig: signal.Signals = signal.SIGTERM) -> list:
    """Replace owner.<name> by a wrapper that raises `sig` in this process at its `nth` call, then calls the
    original (test code, no hook in the scripts); returns the list that gets an entry per call."""
    real, calls = getattr(owner, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)
    return calls


def assert_stopped(stopped: pytest.ExceptionInfo, out: str, message: str, checkpoint: Path) -> None:
    """A run ended in-process by SIGTERM: exit status 3, the default handlers back, and the printed message
    (`message`: where it stopped) naming the `checkpoint` that holds it."""
    assert stopped.value.code == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert f"Stop signal SIGTERM: every rank stopped {message} {checkpoint} holds it. Exiting with status 3" in out


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """One intra-op thread for the whole session: the tests' models are tiny and gain nothing from more, and on a
    busy 2-core machine OpenMP's spinning threads make each step several times slower. Set once, so that every
    test computes alike whatever ran before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def session_objects_out_of_gc_sight():
    """What is alive when the first test starts (the imported modules, the collected tests: ~400k objects) stays
    alive to the end: out of the cyclic garbage collector's sight (gc.freeze), the collections around each test
    (no_leftover_process_group) cost a few ms instead of 0.2-0.7 s."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def no_leftover_process_group():
    """The entry points run in-process create a (one-process) group and replace print (setup_for_distributed):
    after each test, destroy a group still there and put the builtin print back.

    A destroyed group lives on while a reference cycle holds it (a DDP module references itself; a pytest.raises
    ExceptionInfo in a test's frame holds the traceback through the run): only a collection of the cyclic garbage
    frees it, and its destructor must run in this process, where gloo's threads are. Run by the collection of a
    forked child (a DataLoader worker of a later test), ~ProcessGroupGloo waits forever on a condition variable of
    threads the fork did not copy (the test hangs) or the worker crashes. So the garbage is collected before each
    test (that of module and session fixtures: an uninterrupted reference run) and after it."""
    gc.collect()
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    builtins.print = _PRINT
    gc.collect()


def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago (bound, then closed: another process may take it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_free_port(launch) -> subprocess.CompletedProcess:
    """`launch(port)` on a free_port(); when its output says the port was taken before it bound it (TCPStore's
    EADDRINUSE), once more on another one. Returns the last launch's CompletedProcess."""
    proc = launch(free_port())
    if "EADDRINUSE" in (proc.stdout or "") + (proc.stderr or ""):
        proc = launch(free_port())
    return proc


TINY_OPTS = {"DATA.TRAIN_CROP_SIZE": 32, "DATA.LOCAL_CROP_SIZE": 16, "DATA.TEST_CROP_SIZE": 32,
             "DATA.TRAIN_JITTER_SCALES": [36, 40], "DATA.NUM_FRAMES": 4, "DATA.SAMPLING_RATE": 2}


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return generate(str(tmp_path_factory.mktemp("synthetic")), num_classes=4, per_class=6, num_frames=24, size=64)


def build_cfg(data_dir, prefix, tiny: bool = True, **opts):
    """A frozen cfg with DATA.PATH_TO_DATA_DIR / PATH_PREFIX set, TINY_OPTS when tiny, then opts."""
    cfg = get_cfg()
    cfg.DATA.PATH_TO_DATA_DIR, cfg.DATA.PATH_PREFIX = str(data_dir), str(prefix)
    for key, value in {**(TINY_OPTS if tiny else {}), **opts}.items():
        node, name = key.split(".")
        cfg[node][name] = value
    cfg.freeze()
    return cfg


@pytest.fixture
def synthetic_cfg(synthetic_root):
    def factory(list_dir: str = "annotations", tiny: bool = True, **opts):
        return build_cfg(synthetic_root / list_dir, synthetic_root / "videos", tiny, **opts)
    return factory


def _make_video(path, frames=None, num_frames: int = 16, size=(48, 64), fps: int = 30, levels=None, gop=None):
    if levels is not None:
        frames = np.broadcast_to(np.asarray(levels, dtype=np.uint8)[:, None, None, None],
                                 (len(levels), size[0], size[1], 3)).copy()
    elif frames is None:
        rng = np.random.default_rng(0)
        frames = rng.integers(0, 256, (num_frames, size[0], size[1], 3), dtype=np.uint8)
    write_video(str(path), frames, fps=fps, gop=gop)
    return Path(path)


@pytest.fixture
def make_video():
    return _make_video


DAMAGED_FRAMES = 24


def damaged_video(path) -> list[int]:
    """Write a noise H.264 mp4 of DAMAGED_FRAMES frames (one keyframe, so every later frame refers back) to
    `path` and overwrite the middle third of its packet bytes with random ones (seeded); the container and its
    index stay intact, so the file opens and its first frames decode. Returns the frames whose packets lie
    wholly inside the damaged bytes, in display order."""
    _make_video(path, num_frames=DAMAGED_FRAMES)
    with av.open(str(path)) as video:
        packets = [(p.pos, p.size, round(float(p.pts * p.time_base) * 30)) for p in video.demux(video=0) if p.size]
    first, last = packets[0][0], packets[-1][0] + packets[-1][1]
    lo, hi = first + (last - first) // 3, first + 2 * (last - first) // 3
    data = bytearray(Path(path).read_bytes())
    data[lo:hi] = np.random.default_rng(7).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    return sorted(index for pos, size, index in packets if lo <= pos and pos + size <= hi)


SSV2_LABELS = {"Pushing something": "0", "Pulling something": "1"}


def write_ssv2(root, num_videos: int = 3, frames: int = 12) -> None:
    """TimeSformer's SSv2 layout in `root`: the labels JSON (SSV2_LABELS), train and validation JSONs of the same
    videos (ids 100, 101, ...; class v % 2, templates with brackets as the official files'), the frame lists
    `{train,val}.csv` (header line, then `id index frame path ""`) and the frames root/frames/<id>/<f>.jpg, frame f
    a flat grey 48x40 image of level 10 + 6 f."""
    annos = [{"id": str(100 + v), "template": ["[Pushing] something", "Pulling [something]"][v % 2]}
             for v in range(num_videos)]
    rows = ["original_vido_id video_id frame_id path labels"]
    for v in range(num_videos):
        folder = Path(root) / "frames" / str(100 + v)
        folder.mkdir(parents=True)
        for f in range(frames):
            Image.new("RGB", (48, 40), (10 + 6 * f,) * 3).save(folder / f"{f:06d}.jpg", quality=100)
            rows.append(f"{100 + v} {v} {f} {100 + v}/{f:06d}.jpg \"\"")
    (Path(root) / "something-something-v2-labels.json").write_text(json.dumps(SSV2_LABELS))
    for split in ("train", "validation"):
        (Path(root) / f"something-something-v2-{split}.json").write_text(json.dumps(annos))
    for split in ("train", "val"):
        (Path(root) / f"{split}.csv").write_text("\n".join(rows) + "\n")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/device_check.sh on a GPU machine)")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda_capable)
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    name = os.environ.get("SVT_TEST_DEVICE", "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("SVT_TEST_DEVICE=cuda but torch sees no CUDA device")
        # true fp32 so that the CPU tolerances hold (cuDNN convolutions default to TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(name)
