"""Training utilities in the style of DINO's utils.py: schedules, gradient helpers, logging, distributed setup."""
import argparse
import builtins
import contextlib
import datetime
import errno
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
import traceback
from collections import defaultdict, deque
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

_TRUE = {"on", "true", "1", "yes"}
_FALSE = {"off", "false", "0", "no"}


def bool_flag(value: str) -> bool:
    """argparse type for booleans: on/true/1/yes or off/false/0/no, any case."""
    lowered = str(value).lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {value!r}: use true/false (or on/off, 1/0)")


def non_negative_int(value: str) -> int:
    """argparse type of a count where 0 means off (--saveckp_iters)."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{number} is negative: give 0 (off) or a positive number")
    return number


# A DataLoader wait above 2**31 ms (35,791 min) overflows (OverflowError at the first batch; 'inf' alike).
MAX_DECODE_TIMEOUT_MIN = 35000


def decode_timeout_minutes(value: str) -> float:
    """argparse type of --decode_timeout: minutes in [0, MAX_DECODE_TIMEOUT_MIN], 0 meaning no limit."""
    number = float(value)
    if not 0 <= number <= MAX_DECODE_TIMEOUT_MIN:
        raise argparse.ArgumentTypeError(f"{value} is not a number of minutes from 0 to {MAX_DECODE_TIMEOUT_MIN} "
                                         "(the longest wait a DataLoader takes); 0: wait forever")
    return number


def fix_random_seeds(seed: int = 31) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and random from the worker's torch seed (distinct per worker), and
    keep the worker alive through SLURM's stop signals (preemption.shield_loader_worker)."""
    from utils import preemption  # it imports this module
    preemption.shield_loader_worker()
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warm-up from start_warmup_value to base_value, then a cosine to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Per-parameter clipping (DINO): each grad is scaled by min(1, clip / (||g|| + 1e-6)). Returns the norms.

    Runs without a host sync (foreach kernels, device-side clamp).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return norms


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the grads of the head's last layer during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def get_params_groups(model: nn.Module) -> list[dict]:
    """Two groups: weight-decayed (ndim > 1, not a bias; includes cls/pos/time embeddings as in the original)
    and not decayed (biases and 1-D params such as LayerNorm). Frozen params are skipped."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for name, p in trainable if name.endswith(".bias") or p.ndim == 1]
    ids = {id(p) for p in no_decay}
    return [{"params": [p for _, p in trainable if id(p) not in ids]}, {"params": no_decay, "weight_decay": 0.0}]


def has_batchnorms(model: nn.Module) -> bool:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


class LARS(torch.optim.Optimizer):
    """LARS (DINO's version): SGD with momentum and a layer-wise trust ratio; 1-D params get neither
    weight decay nor the trust ratio. The momentum is kept under DINO's state key `mu`, so a DINO / SVT LARS
    checkpoint resumes with its momentum; so does one of our earlier LARS, which kept it as `momentum_buffer`."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    def __setstate__(self, state: dict) -> None:
        """(load_state_dict ends here) An older checkpoint's `momentum_buffer` becomes `mu`."""
        super().__setstate__(state)
        for param_state in self.state.values():
            if "momentum_buffer" in param_state:
                param_state.setdefault("mu", param_state.pop("momentum_buffer"))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if param.ndim > 1:  # weights: decay, then scale by the layer's trust ratio
                    update = update.add(param, alpha=group["weight_decay"])
                    w_norm, u_norm = param.norm(), update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update * trust
                mu = self.state[param].setdefault("mu", torch.zeros_like(param))  # DINO's state key
                mu.mul_(group["momentum"]).add_(update)
                param.add_(mu, alpha=-group["lr"])


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
# Values of oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, or its old name DNNL_MAX_CPU_ISA) below AVX512_CORE_BF16:
# under them oneDNN emulates bf16 even on a CPU that has it.
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native_bf16() -> bool:
    """True where this CPU runs bf16 matmuls natively. On x86: it has AVX-512 BF16 or AMX and oneDNN may use
    them (no ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16). oneDNN's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) says yes for any AVX-512 core CPU (Skylake, Cascade Lake,
    Ice Lake Xeons), where it emulates bf16: ~3-5x slower than fp32 there, ~60x on AVX2-only CPUs. Elsewhere
    (ARM bf16) oneDNN's check decides, as it does on x86 with a torch that lacks the CPU flag queries."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False
    flags = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in X86_MACHINES or None in flags:
        return onednn
    isa_cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return onednn and isa_cap not in ONEDNN_ISAS_WITHOUT_BF16 and any(flag() for flag in flags)


PRECISION_NAMES = {None: "off, fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def choose_precision(use_fp16: bool, amp_dtype: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for `--use_fp16` / `--amp_dtype` on a device (None means fp32), and why.

    auto: on CUDA bf16 where the GPU has it natively (Ampere and later), else fp16 (with a GradScaler); on CPU
    bf16 only where the CPU has native bf16 (`cpu_has_native_bf16`), else fp32. An explicit bf16 on a GPU
    without native bf16 is an error; on a CPU without it, it runs emulated, with a warning.
    """
    if not use_fp16:
        return None, "--use_fp16 false"
    if amp_dtype == "auto":
        if device.type == "cuda":
            # Not torch's default including_emulation=True: it says yes on V100 / T4, which only emulate bf16.
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return torch.bfloat16, "auto: this GPU supports bf16"
            return torch.float16, "auto: this GPU has no native bf16, fp16 with loss scaling"
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16, "auto: this CPU has native bf16 (AVX-512 BF16, AMX or ARM bf16)"
        return None, (f"auto: no native bf16 on this {device.type.upper()} (bf16 would be emulated, "
                      "many times slower than fp32)")
    if amp_dtype == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ValueError("--amp_dtype bf16: this GPU has no native bf16 (compute capability below 8.0, e.g. V100 "
                             "or T4): emulated bf16 is slower than fp32, and cuDNN has no bf16 convolution there "
                             "(the patch embedding). Use --amp_dtype auto (fp16 with loss scaling here) or "
                             "--use_fp16 false (fp32).")
        if device.type == "cpu" and not cpu_has_native_bf16():
            print("WARNING: --amp_dtype bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX), so bf16 is emulated, "
                  "several times slower than fp32; use --amp_dtype auto or --use_fp16 false for fp32.")
        return torch.bfloat16, "--amp_dtype bf16"
    if amp_dtype == "fp16":
        if device.type != "cuda":
            raise ValueError("--amp_dtype fp16 needs a CUDA device; on CPU use --amp_dtype auto (bf16 where "
                             "the CPU supports it natively) or --use_fp16 false.")
        return torch.float16, "--amp_dtype fp16"
    raise ValueError(f"--amp_dtype {amp_dtype!r}: use auto, bf16 or fp16")


def default_device() -> torch.device:
    """This process's CUDA device (with cudnn autotuning), or the CPU."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_context(precision: torch.dtype | None, device: torch.device):
    """torch.autocast for `precision` on `device`, or a no-op context for fp32 (None)."""
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------
class SmoothedValue:
    """A window median/average and a global average of a series. Values may be device tensors; they are
    read back to the host in one batch only when a statistic is asked for (no sync per update)."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"
        self._pending: list[tuple[torch.Tensor, int]] = []

    def update(self, value, n: int = 1) -> None:
        if isinstance(value, torch.Tensor):
            self._pending.append((value.detach().reshape(()).double(), n))  # exact: the value .item() gives
            return
        self._add(float(value), n)

    def _add(self, value: float, n: int) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def flush(self) -> None:
        """Read pending tensor values back to the host (one sync)."""
        if not self._pending:
            return
        values = torch.stack([v for v, _ in self._pending]).tolist()
        for value, (_, n) in zip(values, self._pending):
            self._add(value, n)
        self._pending = []

    @property
    def median(self) -> float:
        self.flush()
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self) -> float:
        self.flush()
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        self.flush()
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        self.flush()
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        self.flush()
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues and DINO's progress line: `Epoch: [e/E] [it/N] eta ... loss ... time ... data ...`."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.waited_s = self.looped_s = 0.0  # log_every's time waiting for items / in the loop, from item 2 on

    def update(self, **kwargs) -> None:
        for name, value in kwargs.items():
            self.meters[name].update(value)

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Sum every meter's count and total over the ranks (the windows are not synced). The ranks first agree
        on the sorted union of their meter names and add the ones they lack with a zero count: a rank may hold
        meters the others have not (a mid-epoch resume with another number of processes gives rank 0 the saved
        means of the epoch; when none of its iterations is left, the other ranks have no meter at all), and
        every rank must reduce the same meters in the same order."""
        for meter in self.meters.values():
            meter.flush()
        if not is_dist_avail_and_initialized() or get_world_size() == 1:
            return
        names = [None] * get_world_size()
        dist.all_gather_object(names, sorted(self.meters))
        union = sorted(set().union(*names))
        if not union:
            return
        sums = torch.tensor([[self.meters[name].count, self.meters[name].total] for name in union],
                            dtype=torch.float64, device=comm_device())
        dist.all_reduce(sums)
        for name, (count, total) in zip(union, sums.tolist()):
            self.meters[name].count, self.meters[name].total = int(count), total

    def global_averages(self) -> str:
        """`name: mean` of every meter over all its values (after synchronize_between_processes: the epoch's, on
        every rank). Not the window medians of the progress line, which a resumed epoch with no iteration left has
        none of on a rank."""
        return self.delimiter.join(f"{name}: {meter.global_avg:.6f}" for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def totals(self) -> dict[str, list[float]]:
        """{name: [count, total]} of every meter (what the global averages are made of), for a checkpoint."""
        out = {}
        for name, meter in self.meters.items():
            meter.flush()
            out[name] = [meter.count, meter.total]
        return out

    def add_totals(self, totals: dict[str, list[float]]) -> None:
        """Start the global averages from `totals()` of an interrupted epoch (mid-epoch resume)."""
        for name, (count, total) in totals.items():
            meter = self.meters[name]
            meter.flush()
            meter.count, meter.total = meter.count + int(count), meter.total + float(total)

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", total: int | None = None,
                  start: int = 0) -> Iterator:
        """Yield from `iterable`, printing the progress line every `print_freq` iterations and at the last.

        `total` is the epoch length and `start` the index of the first item (mid-epoch resume).
        """
        total = len(iterable) if total is None else total
        i = start
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        parts = [header, "[{0:>" + str(width) + "}/{1}]", "eta: {eta}", "{meters}", "time: {time}",
                 "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        line = self.delimiter.join(parts)
        mb = 1024.0 * 1024.0
        for obj in iterable:
            waited = time.time() - end
            data_time.update(waited)
            yield obj
            elapsed = time.time() - end
            iter_time.update(elapsed)
            if i > start:  # the first item also waits for the workers to start
                self.waited_s, self.looped_s = self.waited_s + waited, self.looped_s + elapsed
            if (i - start) % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - 1 - i)))
                memory = torch.cuda.max_memory_allocated() / mb if torch.cuda.is_available() else 0.0
                print(line.format(i, total, eta=eta, meters=str(self), time=str(iter_time),
                                  data=str(data_time), memory=memory))
            i += 1
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f"{header} Total time: {total_time} ({(time.time() - start_time) / max(i - start, 1):.4f} s / it)")


def _os_error(err: BaseException) -> OSError | None:
    """The OSError in `err`'s chain of causes (torch.save reports a failed write as a RuntimeError whose context
    is the OSError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def storage_fault(path: str | os.PathLike, err: BaseException, kept: str) -> str:
    """The error for a write of `path` that failed with `err`: the file, the cause in words (the disk is full, the
    folder is not writable, else `err`), what is `kept` and what to do, instead of torch.save's or the OS's message
    without the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    cause = _os_error(err)
    code = cause.errno if cause is not None else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        why, fix = f"the disk of {folder} is full: {cause.strerror}", f"Free space in {folder} (df -h {folder})"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, fix = (f"{folder} is not writable: {cause.strerror}",
                    f"Make {folder} writable (its permissions, a read-only mount) or pass another output folder")
    else:
        why, fix = str(err), f"If the disk is full, free space in {folder} (df -h {folder})"
    return (f"{path}: could not be written ({why}); {kept}. {fix} and run the same command again (a training run "
            "resumes from its last checkpoint).")


def write_epoch_log(output_dir: str | os.PathLike, stats: dict, writer=None) -> None:
    """On the main process: append `stats` to output_dir/log.txt as one JSON line and, with a tensorboard `writer`,
    add its numbers as epoch/<key> scalars at step stats["epoch"] (flushed). A failed append (a full disk, a
    folder made read-only) cuts log.txt back to its earlier lines and raises storage_fault's error."""
    if not is_main_process():
        return
    path = os.path.join(output_dir, "log.txt")
    size = os.path.getsize(path) if os.path.isfile(path) else None
    try:
        with open(path, "a") as f:
            f.write(json.dumps(stats) + "\n")
    except OSError as err:
        with contextlib.suppress(OSError):  # no partial line after the earlier ones, nor a log.txt made here
            if size is not None:
                os.truncate(path, size)
            elif os.path.isfile(path):
                os.remove(path)
        raise OSError(storage_fault(path, err, "its earlier lines are intact" if size else "nothing was written")
                      ) from err
    if writer is not None:
        for k, v in stats.items():
            if k != "epoch" and isinstance(v, (int, float)):
                writer.add_scalar(f"epoch/{k}", v, stats["epoch"])
        writer.flush()


# ---------------------------------------------------------------------------------------------
# Waiting for data (log_every's timings)
# ---------------------------------------------------------------------------------------------
DATA_WAIT_WARNING = 0.2


def data_wait(logger: MetricLogger, header: str, num_workers: int, frames: bool = False) -> float:
    """The fraction of `logger.log_every`'s loop spent waiting for the next batch, on the process that waited
    most (the others wait for it in their gradient all-reduce); a collective when distributed. From
    DATA_WAIT_WARNING on, prints what to do about it (not DATA.DECODE_DEVICE cuda: measured on an H200 it feeds
    less than the CPU path, benchmarks/README.md). `frames`: the data are JPEG frames (SSv2), not videos."""
    frac = torch.tensor(logger.waited_s / logger.looped_s if logger.looped_s > 0 else 0.0, dtype=torch.float64,
                        device=comm_device())
    if is_dist_avail_and_initialized():
        dist.all_reduce(frac, op=dist.ReduceOp.MAX)
    frac = round(float(frac), 3)
    if frac >= DATA_WAIT_WARNING:
        faster = ("or copy the JPEG frames to a local disk (many small files read slowly from network storage)"
                   if frames else "or resize the videos to short side 256 (python -m "
                                  "datasets.preprocessing.resize_videos)")
        print(f"{header}: the training step waited for data {frac:.0%} of the time: loading limits this run. This "
              f"process has {num_workers} loader workers and may use {available_cores()} CPU cores; give it more "
              f"cores (SLURM --cpus-per-task) and --num_workers up to them, {faster}.")
    return frac


def available_cores() -> int:
    """CPU cores this process may run on (its affinity: what SLURM's --cpus-per-task or taskset grant)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------
def comm_device() -> torch.device:
    """Where tensors of a collective live: the current GPU under NCCL (which cannot reduce CPU tensors), else the
    CPU."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


_BUILTIN_PRINT = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Only the main process prints, unless `print(..., force=True)`."""

    def print_(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = print_


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


DEFAULT_DIST_TIMEOUT_MIN = 30.0
# NCCL: a collective that fails or outlives the timeout aborts the communicator and ends the process (with
# a "[Rank N] Watchdog caught collective operation timeout" line), instead of hanging. The older name is
# read by torch < 2.2.
NCCL_ERROR_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_ASYNC_ERROR_HANDLING": "1"}


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """--dist_url, --dist_timeout and the legacy --local_rank, shared by every entry point."""
    parser.add_argument("--dist_url", default="env://", type=str, help="""Rendezvous URL of a run with
        several processes (torchrun or SLURM): env:// (MASTER_ADDR/MASTER_PORT, set by torchrun; under SLURM
        the first host of SLURM_NODELIST and port 15000 + SLURM_JOB_ID %% 15000 unless set, as
        scripts/slurm_train.sh), or e.g. file:///shared/dir/init or tcp://host:port. A one-process run (also a
        one-task SLURM job) needs none.""")
    parser.add_argument("--dist_timeout", default=DEFAULT_DIST_TIMEOUT_MIN, type=float, help="""Minutes a
        collective (all-reduce, barrier, ...) may wait for the other processes before the job ends with an
        error naming the process that stopped answering (a stalled or dead rank would otherwise hang the job).
        Raise it if one rank legitimately works alone for longer (e.g. a very large kNN on rank 0). It also
        bounds the start-up rendezvous: every process must have started within this time.""")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored (torch.distributed.launch passes it; torchrun sets LOCAL_RANK instead).")


DEFAULT_DECODE_TIMEOUT_MIN = 15.0


def add_decode_timeout_arg(parser: argparse.ArgumentParser) -> None:
    """--decode_timeout (datasets/loader_watchdog.py), shared by every entry point."""
    parser.add_argument("--decode_timeout", default=DEFAULT_DECODE_TIMEOUT_MIN, type=decode_timeout_minutes,
                        help="""Minutes a process waits for a batch from its DataLoader workers (and, with
        DATA.DECODE_DEVICE cuda, for each video from its decode threads) before it stops with an error naming the
        videos being decoded, the decoder and the fix (a decode that never returns, e.g. decord's get_batch on a
        few H.264 files, would otherwise hang the run without a word): delete or re-encode that file, or pick
        another DATA.DECODING_BACKEND (DATA.DECODE_DEVICE cpu for the decode threads), then rerun the same command
        to resume. Raise it only if one batch legitimately takes longer (long 4K videos decoded sequentially on a
        slow file system); keep it below --dist_timeout, so that the stuck process is the one that names the
        video. 0: wait forever. The workers' limit needs --num_workers >= 1: without workers their decode runs in
        the training process, where nothing can stop it.""")


def slurm_default_port() -> int:
    """The rendezvous port of a SLURM job without MASTER_PORT: 15000 + SLURM_JOB_ID % 15000, as scripts/slurm_*.sh
    set it (one per job, below Linux's ephemeral ports), so jobs sharing a node do not collide."""
    return 15000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 15000


def init_distributed_mode(args) -> None:
    """Set args.rank / args.world_size / args.gpu and create the process group.

    Order: torchrun / torch.distributed.launch env (RANK, WORLD_SIZE, LOCAL_RANK); SLURM with SLURM_NTASKS > 1
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; for env:// MASTER_ADDR from the env or the first host of
    SLURM_NODELIST, MASTER_PORT from the env or slurm_default_port()); else one process (no rendezvous). Both
    multi-process cases rendezvous at `args.dist_url`; under SLURM, tasks missing there (a job started without
    srun) are an error that says so. A group is always created (nccl on CUDA, gloo on CPU), so
    collectives work the same everywhere. Collectives time out after `args.dist_timeout` minutes (default
    DEFAULT_DIST_TIMEOUT_MIN); NCCL's asynchronous error handling is on unless the environment says otherwise.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout", DEFAULT_DIST_TIMEOUT_MIN))
    for name, value in NCCL_ERROR_ENV.items():
        os.environ.setdefault(name, value)
    if is_dist_avail_and_initialized():
        args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
        dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                                timeout=timeout, **_set_device(args.gpu))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_slurm_host(os.environ.get("SLURM_NODELIST", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", str(slurm_default_port()))
        try:
            dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                                    timeout=timeout, **_set_device(args.gpu))
        except (dist.DistStoreError, dist.DistNetworkError) as err:  # the rendezvous timed out: a task is missing
            where = (f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}" if args.dist_url == "env://"
                     else args.dist_url)
            if isinstance(err, dist.DistStoreError):  # process 0's store waited for the others
                joined = re.search(r"(\d+)/\d+ clients joined", str(err))
                who = (f"only {joined.group(1)} process{'es' if joined.group(1) != '1' else ''}" if joined else
                       "not every process")
                problem = f"{who} joined the rendezvous at {where}"
            elif args.rank > 0 and "timed out" in str(err):  # no process 0 serves the rendezvous
                problem = f"process 0 did not answer at {where} (this process is SLURM_PROCID {args.rank})"
            else:  # e.g. process 0 finds the port taken: not a missing task
                raise
            raise RuntimeError(
                f"SLURM_NTASKS={args.world_size} but {problem} within --dist_timeout {timeout.total_seconds() / 60:g} "
                "min: start the job with srun (one task per GPU), or unset SLURM_NTASKS for a single process.") from err
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0
        # A one-process group (also a one-task SLURM job) needs no rendezvous: an in-memory store avoids port
        # clashes, e.g. between one-GPU jobs packed on one node.
        dist.init_process_group(backend, store=dist.HashStore(), world_size=1, rank=0, timeout=timeout,
                                **_set_device(args.gpu))
    print(f"| distributed init (rank {args.rank}/{args.world_size}, backend {backend}, local device "
          f"{args.gpu}, collective timeout {timeout})", flush=True)
    if args.world_size > 1:
        dist.barrier()
    setup_for_distributed(args.rank == 0)


# Messages of a collective that timed out or lost a peer (gloo, NCCL, the c10d store).
_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)|pair closure|broken pipe|"
                                 r"NCCL", re.IGNORECASE)


def unresponsive_ranks(wait_s: float) -> list[int] | None:
    """Ranks that do not check in on the process group's store within `wait_s` seconds, each surviving rank
    having checked in itself; None when the store cannot tell (e.g. it lived in the process that died)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"svt_alive/{get_rank()}", "1")
        keys = [f"svt_alive/{r}" for r in range(get_world_size())]
        deadline = time.time() + wait_s
        while True:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing or time.time() > deadline:
                return missing
            time.sleep(0.2)
    except Exception:  # the store itself is gone or stuck: nothing more to learn
        return None


def record_for_launcher(err: BaseException) -> None:
    """Write `err` (with the traceback being handled) to the error file torchrun names in TORCHELASTIC_ERROR_FILE,
    which its closing "Root Cause" summary prints; nothing outside torchrun. Does what torch's `@record` does."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": f"{type(err).__name__}: {err}",
                          "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:  # the launcher's summary is a courtesy: never hide the error itself
        pass


@contextlib.contextmanager
def named_rank_failures(timeout_min: float = DEFAULT_DIST_TIMEOUT_MIN):
    """Around an entry point's main: when a collective times out or loses its peer (a stalled, stopped or
    dead process), print which rank saw it and which ranks stopped answering, then end this process with
    exit code 1 (the launcher then stops the others) instead of a bare backend traceback or a hang. Any other
    error is handed to torchrun (its error file), so the summary it prints last names the error instead of
    `error_file: <N/A>`; then it propagates as usual, except an error that leaves threads stuck in native code
    (`stuck_threads`: loader_watchdog.DecodeHang of DeviceViews' decode threads), which nothing can stop and the
    interpreter would join at exit: its traceback is printed and the process ends at once (exit code 1)."""
    try:
        yield
    except Exception as err:
        if getattr(err, "stuck_threads", False):
            record_for_launcher(err)
            sys.stderr.write(traceback.format_exc())  # not print: on ranks > 0 setup_for_distributed muted it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        if not (isinstance(err, RuntimeError) and get_world_size() >= 2 and _COLLECTIVE_FAILURE.search(str(err))):
            record_for_launcher(err)
            raise
        rank, world = get_rank(), get_world_size()
        silent = unresponsive_ranks(min(30.0, timeout_min * 60))
        who = (f"rank(s) {silent} did not answer (stalled, stopped or dead)" if silent else
               "the other ranks could not be reached" if silent is None else
               "every rank answered afterwards (a slow rank, or a network error)")
        _BUILTIN_PRINT(f"rank {rank}/{world}: a collective operation failed: {str(err).strip()[:300]}\n"
                       f"rank {rank}/{world}: {who}. Collectives wait at most --dist_timeout {timeout_min:g} "
                       "min; check the log of the rank(s) named above (out of memory, a stuck data loader, a "
                       "preempted node), then resume: the last checkpoint.pth is intact.", file=sys.stderr,
                       flush=True)
        sys.stdout.flush()
        os._exit(1)  # the process group cannot be torn down cleanly once a peer is gone


def line_buffered_output() -> None:
    """Flush stdout and stderr at every newline, also when redirected to a file (a killed job keeps its last
    lines; no `python -u` needed)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def check_writable_dir(path: str | os.PathLike, flag: str = "--output_dir",
                       writes: str = "results are written there at the end of the run") -> None:
    """Create `path` if needed and make sure a file can be written in it, before any long work; raises
    PermissionError naming `flag` and saying what the run `writes` there otherwise."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PermissionError(f"{flag} {path} is not writable ({err.strerror or err}); pass a folder you can "
                              f"write to ({writes}).") from err


def _set_device(local_rank: int) -> dict:
    """Make this process's GPU the current device; returns the init_process_group keyword that binds the
    NCCL group to it ({} on CPU). Unbound, NCCL's first barrier (before any collective) runs on GPU
    rank % device_count, not on this process's GPU, and warns that this may hang."""
    if not torch.cuda.is_available():
        return {}
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return {"device_id": device}
