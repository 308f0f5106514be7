"""Checkpoint files: safe loading, backbone weights from any SVT / TimeSformer file or, as the spatial init, an
ImageNet ViT (the model's `checkpoint_filter_fn` maps the keys and shapes), atomic saves, DINO-style resume and the RNG
state that makes a resume exact."""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pickle
import random
import re
import secrets
import shutil
import socket
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models.timesformer import ARCH_OF_WIDTH, backbone_state, checkpoint_filter_fn
from utils import utils

try:
    import fcntl
except ImportError:  # not POSIX (Windows): output folders are not locked
    fcntl = None

DINO_VITB16_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


def _is_safetensors(path: str, head: bytes) -> bool:
    """Whether a file that is not in a torch.save format (`head`: its first bytes) is a safetensors file, as timm
    (>= 0.9) and the Hugging Face Hub ship weights (model.safetensors): named *.safetensors, or an 8-byte
    little-endian header length then the JSON header's '{'."""
    return path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"
                                              and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path))


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on CPU; a truncated or damaged one is an error saying so."""
    from safetensors.torch import load_file  # a dependency of timm >= 0.9

    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise RuntimeError(f"could not read safetensors file {path} ({type(e).__name__}: {e}); it is not complete "
                           "or is damaged: re-download or re-copy it (compare its size).") from e


class IncompleteFileError(RuntimeError):
    """A file that is not a complete torch.save one: truncated, damaged, or not a checkpoint at all."""


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load` on CPU with `weights_only=True`, allowing the pickled `argparse.Namespace` that
    training checkpoints carry under `args`; a safetensors file (timm / Hugging Face Hub weights) gives its
    tensors. A file torch.save did not complete raises IncompleteFileError. With `mmap` (torch.save's zip format)
    the tensors are mapped, not read: a look at a large checkpoint's other entries costs its pickle, not its size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch.save format
        if _is_safetensors(path, head):
            return _load_safetensors(path)
        raise IncompleteFileError(f"{path} is not a complete file written by torch.save or safetensors (it starts "
                                  f"with {head[:2]!r}): re-download or re-copy it, e.g. not an HTML error page or a "
                                  "partial download.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"could not load {path} with weights_only=True: {e}\nOnly tensors, containers and "
            "argparse.Namespace are accepted; re-save the file from a trusted source without other "
            "Python objects.") from e
    except Exception as e:  # a truncated or foreign file
        raise IncompleteFileError(f"could not read checkpoint {path} ({type(e).__name__}: {e}); it is not a "
                                  "complete file written by torch.save: re-download or re-copy it (compare its "
                                  "size).") from e


def _select_state_dict(ckpt: Any, checkpoint_key: str | None, path: str) -> tuple[Mapping[str, Any], str]:
    """The state dict inside a checkpoint file and a word on where it was found."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint dict")
    where = "top level"
    if checkpoint_key and checkpoint_key in ckpt:
        ckpt, where = ckpt[checkpoint_key], f"'{checkpoint_key}'"
    else:
        for key in ("model_state", "state_dict", "model"):
            if key in ckpt and isinstance(ckpt[key], Mapping):
                ckpt, where = ckpt[key], f"'{key}'"
                break
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: entry {where} is a {type(ckpt).__name__}, not a state dict; pick another "
                         f"entry with the checkpoint key (--checkpoint_key student / teacher).")
    # a key other than the default: asked for on purpose (the default, teacher, is what a flat file holds)
    if checkpoint_key and checkpoint_key != "teacher" and where != f"'{checkpoint_key}'":
        flat = " (a flat file such as the released kinetics400_vitb_ssl.pth is the teacher's weights)"
        print(f"Note: checkpoint key '{checkpoint_key}': {path} has no such entry; its {where} is used instead"
              f"{flat if where == 'top level' else ''}.")
    return ckpt, where


def read_backbone_state(path: str | os.PathLike, checkpoint_key: str | None = "teacher") -> tuple[dict, str]:
    """The backbone state of a checkpoint file (models.timesformer.backbone_state of its `checkpoint_key` entry, or
    else of its model_state / state_dict / model entry or its top level) and a word on where it was found."""
    path = os.fspath(path)
    entry, where = _select_state_dict(safe_torch_load(path), checkpoint_key, path)
    return backbone_state(entry), where


def _kind_hint(state: Mapping[str, Any]) -> str:
    """A sentence naming what a non-matching state dict looks like, or ''."""
    keys = list(state)
    if keys and all(k.startswith("linear.") for k in keys):
        return (" This is a linear classifier saved by eval_linear.py (checkpoint.pth.tar), not a backbone;"
                " pass it as --lc_pretrained_weights of eval_linear.py.")
    if not keys:
        return " The selected entry holds no tensors."
    return ""


def file_model_hint(state: Mapping[str, torch.Tensor]) -> str:
    """'The file holds ...': width, depth and patch size of a (mapped) backbone state dict, with the options
    and torch.hub keyword arguments that build that model; '' when the state does not tell."""
    cls, proj = state.get("cls_token"), state.get("patch_embed.proj.weight")
    if cls is None or proj is None or proj.ndim != 4:
        return ""
    width, patch = cls.shape[-1], proj.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    arch, heads = ARCH_OF_WIDTH.get(width, (None, None))
    flags = (f"--arch {arch} --patch_size {patch} --opts MODEL.DEPTH {depth}; torch.hub: embed_dim={width}, "
             f"depth={depth}, num_heads={heads}, patch_size={patch}" if arch else
             f"torch.hub: embed_dim={width}, depth={depth}, patch_size={patch} and its num_heads")
    return f"The file holds a {width}-wide, {depth}-block model with {patch}-px patches ({flags})."


def is_image_model(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a (mapped) backbone state dict is an image ViT (ImageNet / DINO weights): blocks with spatial
    attention, but no `time_embed` and no `temporal_fc` (checkpoint_filter_fn copies `temporal_attn` /
    `temporal_norm1` from the spatial ones, so those do not tell)."""
    return ("time_embed" not in state and not any(".temporal_fc." in k for k in state)
            and any(k.startswith("blocks.") and ".attn." in k for k in state))


def image_model_advice(path: str, given_as: str) -> str:
    """The error for an image ViT passed where a video checkpoint is expected (`given_as`: the flag or argument)."""
    return (f"{path} is an image model (an ImageNet/DINO ViT: its blocks have attn/norm1 weights, but it has no "
            f"time_embed or temporal_fc), not a video checkpoint, so {given_as} cannot take it (if it is a "
            "space-only TimeSformer, build that model: --opts TIMESFORMER.ATTENTION_TYPE space_only). To start from "
            f"it, pass it as the spatial init, --opts TIMESFORMER.PRETRAINED_MODEL {path} (scripts/train_paper.sh: "
            f"PRETRAINED={path}): train_ssl.py then pretrains SVT from it, eval_finetune.py fine-tunes it, and "
            "eval_linear.py / eval_knn.py evaluate its spatial weights as a video model in which nothing temporal "
            "is trained (time_embed and temporal_fc stay at their zero init).")


@dataclass
class LoadSummary:
    """What `load_pretrained_weights` did."""

    path: str
    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # embeddings taken at their stored size (stored_embeddings)
    file_model: str = ""   # file_model_hint of the file's backbone
    image_model: bool = False  # is_image_model of the file's backbone, for a model with temporal weights

    def __str__(self) -> str:
        lines = [f"loaded {len(self.matched)} tensors from {self.path} ({self.source}); "
                 f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"]
        if self.missing:
            lines.append(f"  missing: {self.missing}")
        if self.unexpected:
            lines.append(f"  unexpected: {self.unexpected}")
        if self.resized:
            lines.append(f"  resized (nearest): {self.resized}")
        if self.kept:
            lines.append(f"  kept at the stored size (the model's -> the file's; resized to each input as it runs): "
                         f"{self.kept}")
        return "\n".join(lines)


SVT_FILES = ("an SVT checkpoint (train_ssl.py checkpoint.pth, the released kinetics400_vitb_ssl.pth) or a "
             "TimeSformer one; an ImageNet/DINO ViT is the spatial init, --opts TIMESFORMER.PRETRAINED_MODEL")


def load_pretrained_weights(model: nn.Module, path: str | os.PathLike, checkpoint_key: str | None = "teacher",
                            expected: str = SVT_FILES, stored_embeddings: bool = False,
                            report: bool = True) -> LoadSummary:
    """Load backbone weights into `model` (a TimeSformer VisionTransformer) from any of:

    - the released `kinetics400_vitb_ssl.pth` (flat teacher state: `backbone.*` + `head.*`);
    - a training checkpoint (`student` / `teacher` entries, chosen by `checkpoint_key`);
    - a TimeSformer checkpoint (`model_state`, keys `model.*`), or a bare backbone state dict;
    - an image ViT (DINO or timm ImageNet weights, possibly under `model` / `state_dict`).

    The keys and shapes are mapped by `models.timesformer.checkpoint_filter_fn` (prefixes, DINO head,
    nearest resize of `pos_embed` / `time_embed`, the image-to-video init). With `stored_embeddings` (the frozen
    evaluations) those two are not resized: the model takes them at their stored size (`take_embeddings`) and
    resizes them once from there to each input, as the model of the trained size does; resized at load, then again
    to an input of the trained size, a nearest round trip would lose rows (4 -> 14 -> 4 keeps rows 0, 0, 2, 2).
    Fine-tuning and --pretrained_rgb resize at load (TimeSformer's way: the resized parameter is trained).
    Raises when no key matches or
    when any other shape differs (`expected`: the files the caller takes, for that error). The summary says
    whether the file is an image ViT: callers that need a video checkpoint reject one with `image_model_advice`.
    The summary is printed unless `report` is False (a caller that prints it under its own heading).
    """
    path = os.fspath(path)
    entry, where = read_backbone_state(path, checkpoint_key)
    try:
        state, resized = checkpoint_filter_fn(entry, model, resize_embeddings=not stored_embeddings)
    except ValueError as e:  # an embedding it cannot resize: name the file
        raise ValueError(f"{path} ({where}): {e}") from e
    kept = model.take_embeddings(state) if stored_embeddings else []
    target = model.state_dict()
    # an image ViT only where the model has temporal weights to miss (a space-only TimeSformer has none)
    temporal = any(k == "time_embed" or ".temporal_fc." in k for k in target)
    summary = LoadSummary(path=path, source=where, resized=resized, kept=kept, file_model=file_model_hint(state),
                          image_model=temporal and is_image_model(state))
    summary.unexpected = [k for k in state if k not in target]
    summary.missing = [k for k in target if k not in state]
    summary.matched = [k for k in state if k in target]
    if not summary.matched:
        raise ValueError(
            f"no key of {path} ({where}) matches the model: file keys start with "
            f"{sorted(state)[:5]}, model keys with {list(target)[:5]}.{_kind_hint(state)} Pass {expected} "
            f"(checkpoint_key={checkpoint_key!r}).")
    for k in summary.matched:
        if state[k].shape != target[k].shape:
            raise ValueError(f"{path}: shape of '{k}' is {tuple(state[k].shape)} in the file but "
                             f"{tuple(target[k].shape)} in the model: the checkpoint is of another model size; "
                             "pass the --arch (width), --patch_size and MODEL.DEPTH it was trained with (through "
                             "torch.hub, pass the model size as keyword arguments: embed_dim, depth, num_heads, "
                             f"patch_size; ViT-B/16: 768, 12, 12, 16). {file_model_hint(state)}"
                             + (" It is an image ViT: pass it as the spatial init, --opts TIMESFORMER.PRETRAINED_MODEL,"
                                " not as a video checkpoint." if summary.image_model and expected is SVT_FILES else ""))
    model.load_state_dict({k: state[k] for k in summary.matched}, strict=False)
    if report:
        print(summary)
    return summary


def load_imagenet_init(model: nn.Module, path: str | os.PathLike) -> LoadSummary:
    """TIMESFORMER.PRETRAINED_MODEL: initialise a TimeSformer from a local image ViT file (the paper uses DINO
    ViT-B/16); spatial weights 1:1, temporal attention from the spatial one (see `load_pretrained_weights`)."""
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"TIMESFORMER.PRETRAINED_MODEL must be a local file, got the URL {path}; "
                         "download it once and pass its path (nothing is downloaded at run time)")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet init file not found: {path} (TIMESFORMER.PRETRAINED_MODEL). Download the DINO "
            f"ViT-B/16 weights from {DINO_VITB16_URL} and put them at that path, or set "
            "TIMESFORMER.PRETRAINED_MODEL to '' for a random init.")
    summary = load_pretrained_weights(model, path, expected="an image ViT (DINO or timm ImageNet weights, e.g. "
                                                            "dino_vitbase16_pretrain.pth)", report=False)
    print(f"{_init_heading(summary)}\n{summary}")
    return summary


def _init_heading(summary: LoadSummary) -> str:
    """What TIMESFORMER.PRETRAINED_MODEL loaded: an image ViT's spatial weights (the ImageNet init) or, as the
    original also takes, a video backbone's weights temporal ones included (the released SVT file, a train_ssl.py
    checkpoint's teacher, a TimeSformer one)."""
    temporal = [k for k in summary.matched if k == "time_embed" or ".temporal_" in k]
    if summary.image_model:  # its temporal_attn / temporal_norm1 are copies of the spatial ones
        return (f"ImageNet init from {summary.path}: an image ViT's spatial weights, "
                f"{len(summary.matched) - len(temporal)} tensors; temporal_attn / temporal_norm1 start as copies of "
                f"the spatial ones ({len(temporal)} tensors), time_embed and temporal_fc at their zero init:")
    if temporal:
        return (f"Video backbone init from {summary.path} (TIMESFORMER.PRETRAINED_MODEL; a video model's weights, "
                f"not an ImageNet image ViT's): {len(summary.matched)} tensors, {len(temporal)} of them temporal, "
                "all from the file:")
    return f"Spatial init from {summary.path} (TIMESFORMER.PRETRAINED_MODEL, a space-only model):"


TEMP_PATTERNS = (".checkpoint*.tmp", ".log.txt*.tmp", ".config.*.tmp")  # the temporary files of the atomic writes


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`, so a
    crash never leaves a truncated checkpoint behind (a kill leaves at most a `.NAME.*.tmp` file, which
    `remove_stale_temp_files` deletes). The file's mode follows the umask, as any file the user writes."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy `src` to `path` with `atomic_save`'s guarantees."""
    with open(src, "rb") as source:
        _atomic_write(path, lambda f: shutil.copyfileobj(source, f, 1 << 24))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write `text` (UTF-8) to `path` with `atomic_save`'s guarantees: a kill leaves the old file or the new one."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, unlike mkstemp's 0o600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):  # a folder made read-only since: the error says so
                os.remove(tmp)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
            raise OSError(utils.storage_fault(path, err, kept)) from err
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files (TEMP_PATTERNS: `.checkpoint*.tmp`, and of log.txt and the config files) a killed
    atomic write left in `folder` (call it before this run writes anything there); returns their names."""
    removed = []
    folder = glob.escape(os.fspath(folder))
    for tmp in sorted({tmp for pattern in TEMP_PATTERNS for tmp in glob.glob(os.path.join(folder, pattern))}):
        os.remove(tmp)
        removed.append(os.path.basename(tmp))
    if removed:
        print(f"Removed {len(removed)} temporary file(s) of an interrupted save: {removed}")
    return removed


LOCK_NAME = ".lock"
_held_locks: set[int] = set()  # descriptors of the output-folder locks this process holds


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): drop its copy of the parent's lock descriptors, so that a lock
    ends with the process that took it; a kill -9 frees it at once, not when the orphaned workers exit."""
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _take_lock(folder: str | os.PathLike) -> tuple[int | None, str | None]:
    """(descriptor holding `folder`/.lock, None), (None, None) where the file system has no flock (a note), or
    (None, the error) when another process holds it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.fspath(folder), LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a run that just started"
        os.close(fd)
        host = re.match(r"pid \d+ on (\S+),", holder)
        stale = (f" If {host[1]} is down (a network file system can keep a crashed node's lock), delete {path} and "
                 "rerun." if host and host[1] != socket.gethostname() else "")
        return None, (f"--output_dir {folder} is in use by another run ({holder}; lock: {path}). Two runs writing "
                      "one folder overwrite each other's checkpoints and logs. Wait for that run to end, stop it "
                      "(after a kill of torchrun its worker processes may still run), or pass another --output_dir."
                      + stale)
    except OSError as err:  # e.g. ENOLCK on a network file system without locks
        os.close(fd)
        print(f"Note: could not lock {path} ({err.strerror or err}): nothing stops a second run from writing "
              f"{folder} at the same time.")
        return None, None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    return fd, None


@contextlib.contextmanager
def output_dir_lock(folder: str | os.PathLike, enabled: bool = True):
    """Hold `folder`/.lock for the block (in the main process, the one that writes; not where `enabled` is
    False): a second training run writing the same folder (a rerun while the first still runs, torchrun workers
    that outlived a `kill -9` of torchrun) stops at once with an error naming the holder (pid, host), instead of
    both overwriting each other's checkpoints; every rank raises (one all-reduce), not only the main process.
    flock: the kernel frees it when its holder dies, even by SIGKILL (a network file system may keep a crashed
    node's lock: the error then says how to clear it). A file system without flock gets a note and no lock."""
    if not (enabled and fcntl is not None):
        yield
        return
    fd, refused = _take_lock(folder) if utils.is_main_process() else (None, None)
    if utils.get_world_size() > 1:  # the other ranks stop now, not at their first collective (--dist_timeout)
        flag = torch.tensor(int(refused is not None), device=utils.comm_device())
        dist.all_reduce(flag)
        if flag.item() and refused is None:
            refused = f"--output_dir {folder} is in use by another run: the main process could not lock it (its error)."
    if refused is not None:
        raise RuntimeError(refused)
    if fd is None:
        yield
        return
    _held_locks.add(fd)
    try:
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)  # releases the lock


# Param-group options that pick an optimizer's kernels, not its maths. Optimizer.load_state_dict takes the
# checkpoint's, None where its writer had none (the original code's AdamW), which left this run's fused AdamW
# unfused after a resume; this run's choice (train_ssl.build_optimizer's) stands instead.
KERNEL_OPTIONS = ("fused", "foreach")


def with_kernel_options(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state dict `state` with `optimizer`'s own KERNEL_OPTIONS in its param groups: loading it
    keeps them, and gives a fused optimizer its step counts where its kernel needs them (float32 on the
    parameter's device). A state of another group count is returned as is, for load_state_dict to refuse."""
    saved = state.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(optimizer.param_groups):
        return state
    groups = [{**old, **{k: group[k] for k in KERNEL_OPTIONS if k in group}}
              for old, group in zip(saved, optimizer.param_groups)]
    return {**state, "param_groups": groups}


def restart_from_checkpoint(ckp_path: str | os.PathLike, run_variables: dict | None = None,
                            loaded: Mapping[str, Any] | None = None, **objects: Any) -> Mapping[str, Any] | None:
    """Resume: each keyword object (module, optimizer, GradScaler, DINOLoss, ...) loads the entry of
    the same name (modules strictly: every key, every shape; optimizers keep their fused / foreach choice; an
    entry the checkpoint lacks is left as built, with a note: callers that need one check first);
    `run_variables` entries (e.g. `epoch`) are filled from the checkpoint. An entry that does not fit raises
    ValueError naming it. `loaded`: the file's content when the caller has read it already. A missing file does
    nothing (a fresh run). Returns the loaded checkpoint or None."""
    ckp_path = os.fspath(ckp_path)
    if loaded is None and not os.path.isfile(ckp_path):
        return None
    print(f"Resuming from {ckp_path}")
    ckpt = safe_torch_load(ckp_path) if loaded is None else loaded
    for key, obj in objects.items():
        if obj is None:
            continue
        if key not in ckpt or ckpt[key] is None:
            print(f"  {key}: not in the checkpoint, left as built")
            continue
        value = ckpt[key]
        if isinstance(obj, torch.optim.Optimizer) and isinstance(value, dict):
            value = with_kernel_options(value, obj)
        try:
            obj.load_state_dict(value)
        except (RuntimeError, ValueError, KeyError) as err:
            detail = str(err).strip().splitlines()
            raise ValueError(f"{ckp_path}: its '{key}' does not fit this run "
                             f"({' '.join(detail[:3])[:400]}).") from err
        print(f"  {key}: restored")
    if run_variables is not None:
        for name in run_variables:
            if name in ckpt:
                run_variables[name] = ckpt[name]
    return ckpt


class PrefixedState:
    """state_dict / load_state_dict of a module under a key prefix: the student is stored with the original's
    DDP `module.` prefix whether or not it is DDP-wrapped in this run."""

    def __init__(self, module: nn.Module, prefix: str = "module."):
        self.module, self.prefix = module, prefix

    def state_dict(self) -> dict:
        return {self.prefix + k: v for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict, strict: bool = True):
        return self.module.load_state_dict({k.removeprefix(self.prefix): v for k, v in state.items()},
                                           strict=strict)


def get_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states, in a form `safe_torch_load` can read back."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a `get_rng_state` result."""
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"],
                         np_s["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """The RNG states of all ranks (index = rank)."""
    return gather_objects(get_rng_state())


def gather_objects(obj: Any) -> list:
    """`obj` of every rank (index = rank), on every rank."""
    if utils.get_world_size() == 1:
        return [obj]
    objects = [None] * utils.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def restore_rng(states: list[dict] | None) -> None:
    """Set this rank's RNG state from `gather_rng_states` output (nothing when None or another world size)."""
    if states is None:
        return
    rank, world = utils.get_rank(), utils.get_world_size()
    if len(states) != world:
        print(f"Checkpoint RNG states are from {len(states)} processes, this run has {world}: "
              "random streams restart from the seed (training continues, not bit-identically).")
        return
    set_rng_state(states[rank])


def restore_epoch_meters(metric_logger: utils.MetricLogger, per_rank: list[dict]) -> int:
    """Start `metric_logger` from this rank's share of a mid-epoch checkpoint's `epoch_meters` (one
    {"meters": MetricLogger.totals(), "skipped": n} per rank), so the resumed epoch's means cover the whole
    epoch; returns this rank's skipped-video count. With another world size, rank 0 takes the sum of all (the
    epoch means stay whole) and the others start from zero: they may then hold no meter at all (no iteration of the
    epoch left), which MetricLogger.synchronize_between_processes allows for."""
    rank, world = utils.get_rank(), utils.get_world_size()
    if len(per_rank) == world:
        mine = per_rank[rank]
    else:
        mine = {"meters": {}, "skipped": 0}
        if rank == 0:
            for entry in per_rank:
                mine["skipped"] += entry["skipped"]
                for name, (count, total) in entry["meters"].items():
                    c, t = mine["meters"].get(name, (0, 0.0))
                    mine["meters"][name] = [c + count, t + total]
    metric_logger.add_totals(mine["meters"])
    return int(mine["skipped"])
