"""SVT self-supervised pretraining: DINO self-distillation of a TimeSformer on multi-view video clips.

The student sees every view of a clip (2 global + `--local_crops_number` local views, each with its own
frame count, frame rate and crop); the EMA teacher sees the 2 global views. One cross-entropy loss over
all (teacher global, student view) pairs holds both of the paper's objectives: global/global is the
motion correspondence, local/global the cross-view correspondence.

    torchrun --nproc_per_node=4 train_ssl.py --arch timesformer --batch_size_per_gpu 8 \
        --data_path /data/k400/annotations --output_dir checkpoints/svt --opts DATA.PATH_PREFIX /data/k400/videos
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from datasets import build_dataset
from datasets.device_views import DeviceViewLoader, DeviceViews, collate_plans
from datasets.loader_watchdog import WatchedLoader
from datasets.seeding import SeededDataset, SeededDistributedSampler, preserved_rng_state, resume_start_iteration
from datasets.transform import VideoDataAugmentationDINO, ssl_view_frames
from datasets.video_dataset import (check_split, checkpoint_sequential_videos, missing_list_hint, replaced_warning,
                                     restore_sequential_videos, sequential_decodes)
from models import ARCHS, DINOHead, DINOLoss, MultiCropWrapper, build_backbone
from utils import preemption, run_dir, utils
from utils.checkpoint import (PrefixedState, atomic_copy, atomic_save, gather_objects,
                              gather_rng_states, image_model_advice, load_imagenet_init, load_pretrained_weights,
                              output_dir_lock, remove_stale_temp_files, restart_from_checkpoint, restore_epoch_meters,
                              restore_rng, safe_torch_load)
from utils.evaluation import OnlineKNN
from utils.parser import add_config_args, check_clip_sizes, load_config, note_unused_keys

ARCH_ALIASES = {"deit_tiny": "vit_tiny", "deit_small": "vit_small"}
# what a pretraining writes in --output_dir, for the error on a folder it cannot write
OUTPUT_WRITES = "checkpoint.pth, log.txt and tensorboard files are written there from the first epoch on"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SVT", add_help=False)

    # backbone and head
    parser.add_argument("--arch", default="timesformer", type=str, choices=[*ARCHS, *ARCH_ALIASES],
                        help="""Backbone. `timesformer` (= vit_base, TimeSformer-B/16 divided space-time attention)
        is the paper's model; vit_small / vit_tiny are smaller TimeSformers for quick runs.""")
    parser.add_argument("--patch_size", default=16, type=int, help="""Patch side in pixels. 16 matches the
        ImageNet ViT-B/16 init and the released weights; smaller patches multiply the token count.""")
    parser.add_argument("--out_dim", default=65536, type=int, help="""Number of prototypes K of the DINO head
        (65536 in SVT). Large K suits large datasets; a few thousand is enough for small ones.""")
    parser.add_argument("--norm_last_layer", default=True, type=utils.bool_flag,
                        help="""Keep the gain of the head's weight-normalised last layer fixed at 1
        (True, SVT's setting for ViT-B). False lets it learn: sometimes better, but less stable.""")
    parser.add_argument("--momentum_teacher", default=0.996, type=float, help="""Teacher EMA momentum at the
        start; a cosine schedule raises it to 1. DINO's advice: higher with small batches (e.g. 0.9995 at batch
        256). Very short runs (a few hundred steps, like the CPU demo) need a lower one (0.99), or the teacher
        barely leaves its initialisation (docs/demo_notes.md).""")
    parser.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag,
                        help="""BatchNorm after the hidden layers of the DINO head (off in SVT). With several
        processes it is SyncBatchNorm on GPUs (statistics of the global batch); on CPU each process normalises
        with its own batch (SyncBatchNorm needs CUDA).""")
    parser.add_argument("--teacher_drop_path", default=True, type=utils.bool_flag, help="""True (the original):
        the teacher's backbone keeps MODEL.DROP_PATH_RATE (train mode), so its forward is stochastic.
        False: DINO's deterministic teacher (backbone in eval mode: no drop path; the head stays in train mode, so
        a --use_bn_in_head BatchNorm normalises with the batch statistics, as DINO's).""")

    # teacher sharpening
    parser.add_argument("--warmup_teacher_temp", default=0.04, type=float,
                        help="""Teacher temperature at the start of its warm-up (0.04 in SVT). Used only when
        --warmup_teacher_temp_epochs > 0; with SVT's 0, --teacher_temp is the temperature from the first epoch, and
        that is the one to lower if the loss does not go down (collapse).""")
    parser.add_argument("--teacher_temp", default=0.04, type=float, help="""Teacher temperature after the warm-up.
        Sharper (lower) targets avoid collapse; values above about 0.07 tend to be unstable.""")
    parser.add_argument("--warmup_teacher_temp_epochs", default=0, type=int,
                        help="Epochs of linear teacher-temperature warm-up (0 in SVT: constant temperature).")
    parser.add_argument("--center_momentum", default=0.9, type=float,
                        help="""EMA momentum of the centre subtracted from the teacher's outputs (0.9 in SVT and
        DINO, which have no flag for it). The centre then averages about the last 10 batches; with small batches
        and a sharp teacher its noise can move the targets: the CPU demo (batch 16, teacher temp 0.015) uses 0.95;
        0.99 with a teacher at 0.01 sent every clip to one prototype, a low loss that means nothing (watch
        train_target_mean_entropy in log.txt; docs/demo_notes.md).""")

    # optimisation
    parser.add_argument("--use_fp16", type=utils.bool_flag, default=True, help="""Mixed precision (the original's
        name; see --amp_dtype for the type). Faster and lighter; turn it off if the loss turns non-finite.""")
    parser.add_argument("--amp_dtype", default="auto", choices=["auto", "bf16", "fp16"], help="""Mixed
        precision type when --use_fp16 is on. auto: bf16 on GPUs that support it (no loss scaling needed),
        else fp16 with a GradScaler; on CPU bf16 only where the CPU has native bf16 (AVX-512 BF16 / AMX),
        else fp32 (emulated bf16 is 3-5x slower on AVX-512 CPUs without BF16, e.g. Skylake to Ice Lake Xeons,
        ~60x on AVX2-only ones). The run prints its choice.""")
    parser.add_argument("--weight_decay", type=float, default=0.04, help="""Weight decay at the start of
        its cosine schedule (biases and norm parameters are never decayed).""")
    parser.add_argument("--weight_decay_end", type=float, default=0.4, help="""Weight decay at the end of
        the cosine schedule (the code's default 0.4; the paper reports 0.1).""")
    parser.add_argument("--clip_grad", type=float, default=3.0, help="""Largest gradient norm of
        each parameter tensor (clipped one by one, as the original; not a global norm). 0 turns it off.""")
    parser.add_argument("--batch_size_per_gpu", default=64, type=int,
                        help="Videos per GPU per step (the original script: 8 on each of 4 GPUs).")
    parser.add_argument("--epochs", default=100, type=int,
                        help="Training epochs (the original's default 100; the paper: 20).")
    parser.add_argument("--freeze_last_layer", default=1, type=int, help="""Epochs during which the head's last
        layer gets no updates; holding it one epoch steadies the start. Raise it if the loss stays flat.""")
    parser.add_argument("--lr", default=0.0005, type=float, help="""Peak learning rate for a global
        batch of 256; the run uses lr * batch_size_per_gpu * world_size / 256 (6.25e-5 at SVT's batch 32).""")
    parser.add_argument("--warmup_epochs", default=10, type=int,
                        help="""Epochs of linear learning-rate warm-up from 0 (the original's default 10; the paper:
        5). At most --epochs: a short run (EPOCHS=2 ./scripts/train.sh) passes e.g. --warmup_epochs 1.""")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="""Learning rate at the end of the
        cosine schedule.""")
    parser.add_argument("--optimizer", default="adamw", type=str, choices=["adamw", "sgd", "lars"],
                        help="""Optimizer; AdamW is SVT's (and suits ViTs).""")
    parser.add_argument("--grad_checkpointing", default=False, type=utils.bool_flag,
                        help="Recompute the student's blocks in the backward pass: less memory, ~30%% slower.")
    parser.add_argument("--compile", default=False, type=utils.bool_flag,
                        help="""torch.compile the student and teacher backbones: the first iterations
        are slow (a compilation per view shape, e.g. 8 with the paper's views, and per kNN batch shape).""")

    # views
    parser.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.),
                        help="""Area range of the 2 global views' random crops, as a fraction of the frame. With
        --local_crops_number 0 a wider range (e.g. 0.14 1.0) keeps the task hard enough.""")
    parser.add_argument("--local_crops_number", type=int, default=8, help="""Local (small, short) views per video
        (8 in SVT; DATA.LOCAL_NUM_FRAMES, when set, must have this many entries). 0 trains on the 2 globals only.""")
    parser.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4),
                        help="""Area range of the local views' random crops, as a fraction of the frame.""")

    # data, outputs, launch
    parser.add_argument("--data_path", default=None, type=str, help="""Folder with the Kinetics train.csv
        (copied into DATA.PATH_TO_DATA_DIR; default: the value of that config key). Video paths in the csv are
        joined to DATA.PATH_PREFIX.""")
    parser.add_argument("--pretrained_rgb", default=None, type=str, help="""An SVT training checkpoint (or the
        released teacher file) whose teacher backbone initialises both student and teacher backbones; it must hold
        every backbone weight (a strict load, as the original's). For the paper's ImageNet init use
        --opts TIMESFORMER.PRETRAINED_MODEL /path/to/dino_vitbase16_pretrain.pth.""")
    parser.add_argument("--resume_from", default=None, type=str, help="""A training checkpoint (e.g. an earlier
        checkpointNNNN.pth of a run that diverged) to continue from when --output_dir has no checkpoint.pth yet
        (a new folder, or the file's own one for a checkpointNNNN.pth): weights, optimizer, loss centre, epoch and
        RNG, with this run's flags (e.g. a lower --lr). A checkpoint.pth in --output_dir always wins (a rerun resumes
        its own run). A weights-only file (the released teacher) holds no training state: pass it as
        --pretrained_rgb.""")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="""Folder for checkpoints (checkpoint.pth, checkpointNNNN.pth), log.txt, config and
        tensorboard. A rerun resumes its checkpoint.pth; any other start (from scratch, or --resume_from a file of
        another folder) needs a folder where no other run left its log.txt or checkpointNNNN.pth.""")
    parser.add_argument("--saveckp_freq", default=20, type=int,
                        help="Keep a numbered checkpointNNNN.pth every x epochs (0: none).")
    parser.add_argument("--saveckp_iters", default=0, type=utils.non_negative_int,
                        help="""Also rewrite checkpoint.pth every x iterations inside an epoch (0: off), so long
        epochs can resume mid-way.""")
    parser.add_argument("--log_freq", default=10, type=int, help="Print/tensorboard every x iterations.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    parser.add_argument("--num_workers", default=10, type=int, help="""DataLoader worker processes per GPU
        (decoding is CPU-bound: give it cores; with DATA.AUGMENT_DEVICE cuda the workers only decode, with
        DATA.DECODE_DEVICE cuda they only read bytes and draw parameters; log.txt's train_data_wait says whether
        the step waited for them).""")
    utils.add_decode_timeout_arg(parser)
    utils.add_distributed_args(parser)

    # Online kNN on a held-out list
    parser.add_argument("--knn_freq", default=0, type=int, help="""Run a kNN evaluation of the teacher backbone
        every x epochs and after the last one (0: off). Needs --knn_data_path. It runs after the epoch's checkpoint:
        a stop signal during it exits (status 3) within 5 batches, and the rerun runs it again.""")
    parser.add_argument("--knn_dataset", default="ucf101", type=str,
                        help="Dataset of the kNN lists (a name known to datasets.build_dataset).")
    parser.add_argument("--knn_data_path", default="", type=str,
                        help="""Folder with the kNN train/val lists (e.g. UCF-101 knn_splits; --opts DATA.SPLIT N
                        reads UCF-101 / HMDB-51's split N lists).""")
    parser.add_argument("--knn_path_prefix", default="", type=str,
                        help="Prefix joined to the kNN list paths (the videos folder).")
    parser.add_argument("--eval_batch_size_per_gpu", default=128, type=int,
                        help="Clips per GPU when extracting kNN features.")
    parser.add_argument("--nb_knn", default=5, type=int, help="Number of nearest neighbours of the kNN.")
    parser.add_argument("--temperature", default=0.07, type=float, help="Temperature of the kNN vote.")
    add_config_args(parser)
    return parser


def train_svt(args, stop_signals: tuple = preemption.STOP_SIGNALS, exit_after_stop: bool = False) -> None:
    """Pretraining. `stop_signals` end it cleanly (preemption.Preempted after the checkpoint); with
    `exit_after_stop` (the command line) they stay ignored after such a stop, until the process exits."""
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    args.arch = ARCH_ALIASES.get(args.arch, args.arch)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = prepare_config(args)
    check_args(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    output_dir = Path(args.output_dir)
    if utils.is_main_process():
        utils.check_writable_dir(output_dir, writes=OUTPUT_WRITES)
    with output_dir_lock(output_dir):  # one run writes a folder (README "Reliability")
        train_in_output_dir(args, cfg, device, stop_signals, exit_after_stop)


def train_in_output_dir(args, cfg, device: torch.device, stop_signals: tuple, exit_after_stop: bool) -> None:
    """train_svt's run, holding --output_dir: the checkpoint to resume (checked before anything is written), data,
    networks, resume, log.txt and config files, epochs."""
    output_dir = Path(args.output_dir)
    own_checkpoint = (output_dir / "checkpoint.pth").is_file()
    resume_path = output_dir / "checkpoint.pth" if own_checkpoint else args.resume_from
    if not own_checkpoint:  # nor another run's history in the folder, unless the file is of that run
        run_dir.check_fresh_start(output_dir, args.resume_from or None)
    if resume_path:
        checkpoint = read_resume_checkpoint(Path(resume_path), own_checkpoint, args)
        if own_checkpoint and args.resume_from:
            print(f"Note: --resume_from {args.resume_from} is ignored: {resume_path} is there and loads, and a run's "
                  "own checkpoint always wins (move it aside to continue from the other file).")
    if utils.is_main_process():
        remove_stale_temp_files(output_dir)

    # ============ data, networks, loss, optimizer, schedules ... ============
    data_loader = build_train_loader(args, cfg, device)
    niter = len(data_loader)
    state = build_train_state(args, cfg, device, niter)
    print("Loss, optimizer and schedules built.")

    # ============ optionally resume training ... ============
    to_restore = {"epoch": 0, "iteration": 0, "rng": None, "epoch_meters": None, "epoch_log": None,
                  "num_threads": None, "sequential_videos": None, "args": None}
    if resume_path:
        resume_checkpoint(state, resume_path, checkpoint, to_restore)
        del checkpoint  # its tensors are in the state now
    start_epoch = to_restore["epoch"]
    start_iter = resume_start_iteration(to_restore["iteration"], to_restore["args"], args.batch_size_per_gpu,
                                        utils.get_world_size(), what=f"epoch {start_epoch}")
    finished = bool(resume_path) and start_epoch >= args.epochs
    if resume_path and not finished:  # (a stop at an epoch's last iteration resumes at iteration niter)
        lr_now = state.lr_schedule[min(niter * start_epoch + start_iter, len(state.lr_schedule) - 1)]
        note_changed_flags(to_restore["args"], args, lr_now)
    if utils.is_main_process():
        run_dir.tidy_epoch_log(output_dir, start_epoch)
        if not finished:  # a run that trains nothing leaves the folder's config as it is
            run_dir.write_config_files(output_dir, {"config.txt": json.dumps(vars(args), indent=2, default=str)
                                                    + "\n", "config.yaml": cfg.dump()})
    restore_rng(to_restore["rng"])
    restore_sequential_videos(data_loader.dataset, to_restore["sequential_videos"])
    if to_restore["num_threads"] not in (None, torch.get_num_threads()):
        print(f"Note: the checkpoint was written with {to_restore['num_threads']} CPU threads per process, this run "
              f"has {torch.get_num_threads()}: CPU float reductions are summed in another order, so the resumed run "
              "matches an uninterrupted one to ~1e-6, not bit for bit (set OMP_NUM_THREADS to match).")

    if utils.is_main_process() and not own_checkpoint and not (args.resume_from and run_dir.is_own_numbered(
            output_dir, args.resume_from)):  # a new run in the folder: not an earlier start's curves in tb/
        run_dir.set_aside_tensorboard(output_dir)
    state.writer = writer = SummaryWriter(str(output_dir / run_dir.TB_NAME)) if utils.is_main_process() else None
    knn = None
    if args.knn_freq > 0:
        knn = OnlineKNN(cfg, device, args.knn_dataset, args.knn_data_path, args.knn_path_prefix, args.nb_knn,
                        args.temperature, args.eval_batch_size_per_gpu, args.num_workers, args.decode_timeout)

    # ============ training ... ============
    start_time = time.time()
    if finished:
        planned = getattr(to_restore["args"], "epochs", start_epoch)
        where = (f"already finished (at epoch {start_epoch} of {planned})" if start_epoch >= planned else
                 f"at epoch {start_epoch} of {planned}, past --epochs {args.epochs}")
        run = f"The run in {output_dir}" if own_checkpoint else f"The run of --resume_from {resume_path}"
        print(f"{run} is {where}: nothing to train. To train on, pass a larger --epochs (the schedules are then "
              "recomputed for the new length).")
    else:
        print(f"SVT pretraining from epoch {start_epoch} to {args.epochs}.")
    # A stop signal (SLURM preemption / time limit, --signal warning) saves the step reached and exits with
    # preemption.PREEMPTED_EXIT_STATUS; the default handlers are back after training.
    with preemption.StopSignals(stop_signals, ignore_after_stop=exit_after_stop) as stop:
        knn_pass = functools.partial(online_knn, knn, state, args, niter, stop)
        if own_checkpoint and to_restore["epoch_log"] is not None:
            finish_epoch_end(output_dir, to_restore["epoch_log"], args, writer, knn_pass)
        for epoch in range(start_epoch, args.epochs):
            data_loader.sampler.set_epoch(epoch)
            data_loader.sampler.skip = start_iter * args.batch_size_per_gpu if epoch == start_epoch else 0
            epoch_start = time.time()

            resumed = epoch == start_epoch and start_iter > 0
            train_stats = train_one_epoch(state, data_loader, epoch, niter, args,
                                          start_iter=start_iter if resumed else 0,
                                          epoch_meters=to_restore["epoch_meters"] if resumed else None, stop=stop)

            warning = "loss" in train_stats and collapse_warning(train_stats["loss"],
                                                                 train_stats["target_mean_entropy"], args.out_dim,
                                                                 args.warmup_teacher_temp_epochs)
            if warning:
                print(f"Epoch {epoch}: {warning}")
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                         "sequential_decodes": sequential_decodes(data_loader.dataset),
                         "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(state.precision, "fp32"),
                         "epoch_time": round(time.time() - epoch_start, 3)}
            # The epoch-end checkpoint comes before the (possibly long) kNN pass and carries the epoch's log record:
            # if a stop signal or the job's end comes before log.txt or the numbered checkpoint is written, the
            # resumed run does what is left, kNN pass included, and trains no step again (finish_epoch_end).
            save_checkpoint(state, args, epoch + 1, 0, data_loader.dataset, numbered=is_numbered(epoch, args),
                            epoch_log=log_stats)
            utils.write_epoch_log(output_dir, {**log_stats, **knn_pass(epoch),
                                               "epoch_time": round(time.time() - epoch_start, 3)}, writer)
    if writer is not None:
        writer.close()
    total_time = time.time() - start_time
    print(f"Pretraining took {datetime.timedelta(seconds=int(total_time))}.")


def train_one_epoch(state: TrainState, data_loader: DataLoader, epoch: int, niter: int, args,
                    start_iter: int = 0, epoch_meters: list[dict] | None = None,
                    stop: preemption.StopSignals | None = None) -> dict:
    """One epoch (from `start_iter` when resuming mid-epoch, with the `epoch_meters` of the interrupted part,
    so the means cover the whole epoch). Returns the averaged meters, the wait for data and `replaced_samples`: the
    draws replaced because their video could not be read (a video drawn twice counts twice; past 5 % of the draws a
    warning names check_videos). When a `stop` signal
    reached any rank, every rank ends the step where they learn it (at most preemption.CHECK_EVERY iterations
    later), writes the mid-epoch checkpoint and raises preemption.Preempted."""
    stop = stop if stop is not None else preemption.StopSignals(())
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    device = state.device
    state.student.train()
    set_teacher_mode(state.teacher, state.teacher_without_ddp.backbone, args.teacher_drop_path)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    recent_losses: list[torch.Tensor] = []
    replaced = torch.zeros((), dtype=torch.long)
    if epoch_meters is not None:
        replaced += restore_epoch_meters(metric_logger, epoch_meters)
    global_batch = args.batch_size_per_gpu * utils.get_world_size()
    last_log_time, last_log_it = time.time(), start_iter
    for it_in_epoch, (views, _, _, meta) in enumerate(
            metric_logger.log_every(data_loader, args.log_freq, header, total=niter, start=start_iter),
            start=start_iter):
        it = niter * epoch + it_in_epoch  # global training iteration
        views = [v.to(device, non_blocking=True) for v in views]
        loss, momentum = train_step(state, views, epoch, it, args)
        nonfinite |= ~torch.isfinite(loss)
        recent_losses.append(loss)

        metric_logger.update(loss=loss)
        target_entropy = state.dino_loss.target_entropy
        metric_logger.update(target_entropy=target_entropy[0], target_mean_entropy=target_entropy[1])
        metric_logger.update(lr=state.optimizer.param_groups[0]["lr"])
        metric_logger.update(wd=state.optimizer.param_groups[0]["weight_decay"])
        replaced += meta["skipped"].sum()
        log_step = (it_in_epoch - start_iter) % args.log_freq == 0 or it_in_epoch == niter - 1
        save_step = preemption.is_save_step(it_in_epoch + 1, niter, args.saveckp_iters)
        stop_now = False
        if log_step or save_step or preemption.is_check_step(it_in_epoch + 1, niter):
            # the only host sync of the loop: one all-reduce for "a non-finite loss" and "a stop signal"
            stop_now, (bad,) = stop.requested(nonfinite)
            stop_if_nonfinite(bad, recent_losses, epoch, it, args)
            recent_losses.clear()
        if log_step and state.writer is not None:
            now = time.time()
            clips_per_s = global_batch * (it_in_epoch + 1 - last_log_it) / max(now - last_log_time, 1e-9)
            last_log_time, last_log_it = now, it_in_epoch + 1
            scalars = {"loss": metric_logger.loss.value, "lr": state.lr_schedule[it], "wd": state.wd_schedule[it],
                       "momentum": momentum, "teacher_temp": state.dino_loss.teacher_temp_schedule[epoch],
                       "clips_per_s": clips_per_s}
            for name, value in scalars.items():
                state.writer.add_scalar(f"train/{name}", value, it)
        if save_step or stop_now:
            # a stop at the epoch's last iteration saves iteration == niter: the resumed run only ends the epoch
            save_checkpoint(state, args, epoch, it_in_epoch + 1, data_loader.dataset,
                            epoch_meters={"meters": metric_logger.totals(), "skipped": int(replaced)})
        if stop_now:
            if state.writer is not None:
                state.writer.flush()
            preemption.finish(preemption.stop_message(stop.names(), epoch, it_in_epoch + 1, niter,
                                                      Path(args.output_dir) / "checkpoint.pth"), stop)

    # average the meters over ranks
    metric_logger.synchronize_between_processes()
    if utils.get_world_size() > 1:
        replaced = replaced.to(device)
        dist.all_reduce(replaced)
    print("Epoch means:", metric_logger.global_averages())
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["data_wait"] = utils.data_wait(metric_logger, f"Epoch {epoch}", args.num_workers)
    stats["replaced_samples"] = int(replaced.item())
    warning = replaced_warning(f"Epoch {epoch}", stats["replaced_samples"], niter * global_batch,
                               getattr(data_loader, "dataset", None))
    if warning:
        print(warning)
    return stats


def train_step(state: TrainState, views: list[torch.Tensor], epoch: int, it: int, args) -> tuple[torch.Tensor, float]:
    """One SVT iteration on a batch of views already on the device: schedules, teacher forward on the 2 global
    views, student forward on all views, DINO loss, backward, per-parameter clipping, optimizer step and
    teacher EMA. Returns the detached loss (no host sync) and the EMA momentum used."""
    for i, param_group in enumerate(state.optimizer.param_groups):
        param_group["lr"] = float(state.lr_schedule[it])
        if i == 0:  # group 0 holds the decayed weights
            param_group["weight_decay"] = float(state.wd_schedule[it])

    with utils.autocast_context(state.precision, state.device):
        with torch.no_grad():
            teacher_output = state.teacher(views[:2])  # the teacher sees the 2 global views
        student_output = state.student(views)
        loss = state.dino_loss(student_output, teacher_output, epoch)

    # backward, clip, drop the frozen last layer's grads, step
    state.optimizer.zero_grad(set_to_none=True)
    if state.fp16_scaler is None:
        loss.backward()
        if args.clip_grad:
            utils.clip_gradients(state.student_without_ddp, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, state.student_without_ddp, args.freeze_last_layer)
        state.optimizer.step()
    else:
        state.fp16_scaler.scale(loss).backward()
        if args.clip_grad:
            state.fp16_scaler.unscale_(state.optimizer)  # clip the true gradients, not the scaled ones
            utils.clip_gradients(state.student_without_ddp, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, state.student_without_ddp, args.freeze_last_layer)
        state.fp16_scaler.step(state.optimizer)
        state.fp16_scaler.update()

    # teacher <- m * teacher + (1 - m) * student
    momentum = float(state.momentum_schedule[it])
    ema_update(state.ema_teacher, state.ema_student, momentum)
    return loss.detach(), momentum


@dataclass
class TrainState:
    """What one training step needs: the networks (DDP-wrapped and bare), the loss, the optimizer, the
    per-iteration schedules, the precision and the tensorboard writer (main process only)."""

    student: nn.Module
    teacher: nn.Module
    student_without_ddp: MultiCropWrapper
    teacher_without_ddp: MultiCropWrapper
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    fp16_scaler: torch.amp.GradScaler | None
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    precision: torch.dtype | None
    device: torch.device
    writer: SummaryWriter | None = None
    ema_student: list[torch.Tensor] = field(init=False, repr=False)
    ema_teacher: list[torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # EMA pairs, in the same order in student and teacher.
        self.ema_student = [p.detach() for p in self.student_without_ddp.parameters()]
        self.ema_teacher = [p.detach() for p in self.teacher_without_ddp.parameters()]


def build_train_state(args, cfg, device: torch.device, niter: int, fused: bool | None = None) -> TrainState:
    """Student, teacher, DINO loss, optimizer (`fused`: see build_optimizer), precision and the lr / weight
    decay / teacher momentum schedules of `args.epochs` epochs of `niter` iterations."""
    student, teacher, student_without_ddp, teacher_without_ddp = build_networks(args, cfg, device)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs,
                         center_momentum=args.center_momentum).to(device)
    optimizer = build_optimizer(args, student_without_ddp, device, fused)
    precision, why = utils.choose_precision(args.use_fp16, args.amp_dtype, device)
    fp16_scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    print(f"Mixed precision: {utils.PRECISION_NAMES[precision]} ({why})")
    global_batch = args.batch_size_per_gpu * utils.get_world_size()
    lr_schedule = utils.cosine_scheduler(args.lr * global_batch / 256., args.min_lr, args.epochs, niter,
                                         warmup_epochs=args.warmup_epochs)
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter)
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, niter)
    return TrainState(student=student, teacher=teacher, student_without_ddp=student_without_ddp,
                      teacher_without_ddp=teacher_without_ddp, dino_loss=dino_loss, optimizer=optimizer,
                      fp16_scaler=fp16_scaler, lr_schedule=lr_schedule, wd_schedule=wd_schedule,
                      momentum_schedule=momentum_schedule, precision=precision, device=device)


COMPILE_GRAPH_LIMIT = 32  # compiled graphs of the backbones' forward (--compile), with room to spare


def build_networks(args, cfg, device: torch.device):
    """Student = MultiCropWrapper(backbone, DINOHead); teacher = the same, initialised from the student."""
    student_backbone = build_backbone(args.arch, cfg, patch_size=args.patch_size)
    embed_dim = student_backbone.embed_dim
    if cfg.TIMESFORMER.PRETRAINED_MODEL:
        load_imagenet_init(student_backbone, cfg.TIMESFORMER.PRETRAINED_MODEL)
    if args.pretrained_rgb:
        load_pretrained_rgb(student_backbone, args.pretrained_rgb)
    teacher_backbone = copy.deepcopy(student_backbone)
    student = MultiCropWrapper(student_backbone, DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                                                          norm_last_layer=args.norm_last_layer))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    if args.grad_checkpointing:
        student.backbone.set_grad_checkpointing(True)
    student, teacher = student.to(device), teacher.to(device)
    distributed = utils.get_world_size() > 1
    device_ids = [device.index] if device.type == "cuda" else None
    if utils.has_batchnorms(student) and distributed:
        if device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        else:  # SyncBatchNorm runs on GPUs only
            print(f"Note: on CPU the head's BatchNorm statistics are per process (each of the {utils.get_world_size()} "
                  "normalises with its own batch); SyncBatchNorm, which pools them, needs CUDA.")
        teacher = nn.parallel.DistributedDataParallel(teacher, device_ids=device_ids)
        teacher_without_ddp = teacher.module
    else:
        teacher_without_ddp = teacher
    student_without_ddp = student
    if distributed:
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids, find_unused_parameters=False)
    teacher_without_ddp.load_state_dict(student_without_ddp.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    set_teacher_mode(teacher, teacher_without_ddp.backbone, args.teacher_drop_path)
    if args.compile:
        # Static shapes: one graph per view shape, no dynamic-shape recompiles. Both backbones share dynamo's
        # cache, where each (view shape, grad mode, train/eval mode) is a graph: the paper's and DATA.RAND_FR's
        # views need 8 in training (+1: einops invalidates the first), the online kNN a few more. Past the limit
        # (torch's default: 8) dynamo runs the other shapes eagerly for the rest of the run. torch < 2.7 names
        # the limit cache_size_limit.
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), COMPILE_GRAPH_LIMIT))
        student_without_ddp.backbone.compile(dynamic=False)
        teacher_without_ddp.backbone.compile(dynamic=False)
    n_params = sum(p.numel() for p in student_without_ddp.parameters())
    print(f"Student and teacher: {args.arch} TimeSformer + DINO head, {n_params / 1e6:.1f}M parameters each.")
    return student, teacher, student_without_ddp, teacher_without_ddp


def set_teacher_mode(teacher: nn.Module, backbone: nn.Module, drop_path: bool) -> None:
    """The teacher (DDP-wrapped or not) in train mode, as DINO's: a BatchNorm of its head normalises with the
    batch statistics (its running ones are never trained: the EMA updates parameters only). Without `drop_path`
    its `backbone` in eval mode: no drop path, a deterministic forward."""
    teacher.train()
    backbone.train(drop_path)


def load_pretrained_rgb(backbone: nn.Module, path: str) -> None:
    """--pretrained_rgb: the backbone of the checkpoint's teacher (or the released flat file), every weight, as
    the original's strict load; a file that lacks some (an image ViT, another depth) or has extra ones is an error."""
    summary = load_pretrained_weights(backbone, path, checkpoint_key="teacher")
    if summary.image_model:
        raise ValueError(image_model_advice(path, "--pretrained_rgb"))
    if summary.missing or summary.unexpected:
        raise ValueError(
            f"--pretrained_rgb {path}: its teacher backbone does not fit --arch with this config: "
            f"{len(summary.missing)} weights missing from the file {summary.missing[:4]}, {len(summary.unexpected)} "
            f"the model lacks {summary.unexpected[:4]}. Pass an SVT checkpoint of the same --arch, --patch_size and "
            "MODEL.DEPTH; for ImageNet ViT weights use --opts TIMESFORMER.PRETRAINED_MODEL instead.")


def build_optimizer(args, model: nn.Module, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (the fused kernel on CUDA and CPU, where it is the fastest; foreach elsewhere or with
    `fused=False`), SGD or LARS."""
    params_groups = utils.get_params_groups(model)
    if args.optimizer == "adamw":
        if fused is None:
            fused = device.type in ("cuda", "cpu")
        if fused:
            return torch.optim.AdamW(params_groups, fused=True)
        return torch.optim.AdamW(params_groups, foreach=True)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr and wd are set by the schedulers
    return utils.LARS(params_groups)


def build_train_loader(args, cfg, device: torch.device) -> DataLoader | DeviceViewLoader:
    """Kinetics train list with the SVT views, each sample drawn under its own seed (datasets/seeding.py);
    with DATA.DECODE_DEVICE or DATA.AUGMENT_DEVICE cuda the views are made on the GPU in this process
    (datasets/device_views.py)."""
    on_device = "cuda" in (cfg.DATA.DECODE_DEVICE, cfg.DATA.AUGMENT_DEVICE)
    if on_device and device.type != "cuda":
        key = "DECODE_DEVICE" if cfg.DATA.DECODE_DEVICE == "cuda" else "AUGMENT_DEVICE"
        raise ValueError(f"DATA.{key} cuda makes the views on the GPU, but this run has no CUDA device; leave "
                         f"DATA.{key} at cpu.")
    # plans of bytes (DECODE_DEVICE cuda) are read on the host: no pinning; decoded frames are copied to the GPU
    pin = device.type == "cuda" and cfg.DATA.DECODE_DEVICE == "cpu"
    global_frames, local_frames = ssl_view_frames(cfg, args.local_crops_number)
    transform = VideoDataAugmentationDINO(
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_scale=tuple(args.local_crops_scale),
        local_crops_number=args.local_crops_number,
        global_size=cfg.DATA.TRAIN_CROP_SIZE,
        local_size=cfg.DATA.LOCAL_CROP_SIZE,
        global_frames=global_frames,
        local_frames=local_frames,
        no_spatial=cfg.DATA.NO_SPATIAL,
        random_flip=cfg.DATA.RANDOM_FLIP,
    )
    dataset = build_dataset("kinetics400", cfg, "train", ssl_aug=transform)
    sampler = SeededDistributedSampler(dataset, seed=args.seed, shuffle=True)
    cuda = device.type == "cuda"
    loader = WatchedLoader(
        SeededDataset(dataset),
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        collate_fn=collate_plans if on_device else None,
        pin_memory=pin,  # pinned batches copy to the GPU asynchronously
        drop_last=True,
        persistent_workers=cuda and args.num_workers > 0,
        worker_init_fn=utils.seed_worker,
        # The loader's own generator: creating an iterator never consumes the global RNG.
        generator=torch.Generator().manual_seed(args.seed + utils.get_rank()),
        decode_timeout=args.decode_timeout,
    )
    if len(loader) == 0:
        raise ValueError(f"{cfg.DATA.PATH_TO_DATA_DIR}/train.csv has {len(dataset)} videos, fewer than one "
                         f"global batch ({args.batch_size_per_gpu} x {utils.get_world_size()} processes); "
                         "lower --batch_size_per_gpu.")
    print(f"{len(dataset)} training videos, {len(loader)} steps per epoch; {args.num_workers} loader workers, "
          f"{utils.available_cores()} CPU cores available to this process.")
    if on_device:
        # The workers hand over bytes (or decoded frames) + drawn parameters; this process decodes with NVDEC
        # (unless the worker decoded) and augments on the GPU.
        stage = DeviceViews(transform.sizes, device, cfg.DATA.DEVICE_DECODE_THREADS,
                            nvdec=cfg.DATA.DECODE_DEVICE == "cuda", decode_timeout=args.decode_timeout)
        return DeviceViewLoader(loader, stage)
    return loader


def check_args(args) -> None:
    """Flag values that cannot work together, each an error naming the flag and the fix (before any work)."""
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs"):
        if getattr(args, name) > args.epochs:
            raise ValueError(f"--{name} {getattr(args, name)} is larger than --epochs {args.epochs}: pass "
                             f"--{name} {args.epochs} or less (the ramps are laid out over the run's epochs).")
    for name in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(args, name)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"--{name} {' '.join(map(str, scale))}: give two area fractions MIN MAX with "
                             "0 < MIN <= MAX <= 1 (SVT's: --global_crops_scale 0.4 1.0, --local_crops_scale 0.05 0.4).")
    if args.knn_freq > 0 and not args.knn_data_path:
        raise ValueError("--knn_freq needs --knn_data_path (the folder with the kNN train/val lists).")


def prepare_config(args):
    """The fvcore config with --data_path applied; checks that the train list exists."""
    cfg = load_config(args).clone()
    check_clip_sizes(cfg, args.patch_size, eval_clips=args.knn_freq > 0, ssl_views=True)
    cfg.defrost()
    if args.data_path:
        cfg.DATA.PATH_TO_DATA_DIR = args.data_path
    train_csv = Path(cfg.DATA.PATH_TO_DATA_DIR) / "train.csv"
    if not train_csv.is_file():
        raise FileNotFoundError(f"{train_csv} not found: --data_path (or DATA.PATH_TO_DATA_DIR) must be the folder "
                                f"with the Kinetics train.csv ('path label' per line). "
                                + missing_list_hint(str(train_csv)))
    if cfg.DATA.NO_RGB_AUG:
        raise ValueError("DATA.NO_RGB_AUG True asks for one plain clip per video instead of the SSL views (the "
                         "original's Kinetics linear probe needed it); self-supervised training needs the views, so "
                         "leave it False.")
    note_unused_keys(cfg, ("DATA.MEAN", "DATA.STD"), "the SSL views are normalised with the ImageNet statistics, "
                     "as in the original; DATA.MEAN/STD normalise evaluation clips (the online kNN, eval_*.py).")
    if args.knn_freq > 0:  # DATA.SPLIT picks the online kNN's lists; the Kinetics train.csv has no splits
        check_split(args.knn_dataset, cfg.DATA.SPLIT)
    else:
        note_unused_keys(cfg, ("DATA.SPLIT",), "it picks the UCF-101 / HMDB-51 split of the online kNN lists, which "
                         "--knn_freq 0 turns off.")
    note_unused_keys(cfg, ("DATA.INV_UNIFORM_SAMPLE",), "it draws the short side of the clips the evaluation scripts "
                     "train on; the SSL views are sized by their crop scales (--global_crops_scale, "
                     "--local_crops_scale).")
    cfg.freeze()
    return cfg


def save_checkpoint(state: TrainState, args, epoch: int, iteration: int, dataset, numbered: bool = False,
                    epoch_meters: dict | None = None, epoch_log: dict | None = None) -> None:
    """checkpoint.pth in the original's layout (+ `iteration`, the RNG states of all ranks and the training
    `dataset`'s sequentially decoded videos, for an exact resume); `numbered` also keeps
    checkpoint{epoch - 1:04}.pth. A mid-epoch save keeps every rank's `epoch_meters` (the running means), an
    epoch-end save the epoch's `epoch_log` record (written to log.txt on resume if the job died before).
    Stops the run instead of saving non-finite weights."""
    stop_if_nonfinite_weights(state, epoch, iteration, args)
    save_dict = {
        "student": PrefixedState(state.student_without_ddp).state_dict(),
        "teacher": state.teacher_without_ddp.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "args": args,
        "dino_loss": state.dino_loss.state_dict(),
        "rng": gather_rng_states(),
        "epoch_meters": gather_objects(epoch_meters) if epoch_meters is not None else None,
        "epoch_log": epoch_log,
        "sequential_videos": checkpoint_sequential_videos(dataset),
        "num_threads": torch.get_num_threads(),
    }
    if state.fp16_scaler is not None:  # only with fp16, as the original (its resume would load a None)
        save_dict["fp16_scaler"] = state.fp16_scaler.state_dict()
    if utils.is_main_process():
        output_dir = Path(args.output_dir)
        atomic_save(save_dict, output_dir / "checkpoint.pth")
        if numbered:
            atomic_copy(output_dir / "checkpoint.pth", output_dir / f"checkpoint{epoch - 1:04}.pth")


def is_numbered(epoch: int, args) -> bool:
    """Whether the end of `epoch` keeps a checkpointNNNN.pth (--saveckp_freq)."""
    return bool(args.saveckp_freq) and epoch % args.saveckp_freq == 0


def finish_epoch_end(output_dir: Path, epoch_log: dict, args, writer: SummaryWriter | None, knn_pass) -> None:
    """On resume from an epoch-end checkpoint: do what a stop or kill after its save left undone, so the run ends
    as an uninterrupted one: the numbered copy and, unless log.txt has the epoch's line (run_dir.tidy_epoch_log has
    dropped a partial last line), the epoch's kNN pass (`knn_pass(epoch)`: the keys it adds to `epoch_log`) and that
    line. Every rank calls it (the kNN pass is collective; rank 0's log.txt decides)."""
    epoch = epoch_log["epoch"]
    logged = False
    if utils.is_main_process():
        numbered = output_dir / f"checkpoint{epoch:04}.pth"
        if is_numbered(epoch, args) and not numbered.is_file():
            atomic_copy(output_dir / "checkpoint.pth", numbered)
            print(f"Wrote {numbered}, missing after an interrupted end of epoch {epoch}.")
        logged = run_dir.has_epoch_line(output_dir, epoch)
    if not gather_objects(logged)[0]:
        utils.write_epoch_log(output_dir, {**epoch_log, **knn_pass(epoch)}, writer)
        print(f"Wrote the log.txt line of epoch {epoch}, missing after an interrupted end of epoch.")


def online_knn(knn: OnlineKNN | None, state: TrainState, args, niter: int, stop: preemption.StopSignals,
               epoch: int) -> dict:
    """The kNN top-1 / top-5 of the teacher backbone after `epoch` (log.txt's knn_top1 / knn_top5) when the online
    kNN is on and due (every --knn_freq epochs and after the last), else {}. It runs after the epoch-end checkpoint
    and leaves the training's random streams alone; a stop signal ends it within preemption.CHECK_EVERY batches
    (preemption.Preempted: checkpoint.pth already holds the epoch, and the resumed run runs the pass again)."""
    if knn is None or not (epoch % args.knn_freq == 0 or epoch + 1 == args.epochs):
        return {}
    flush = state.writer.flush if state.writer is not None else None
    check = preemption.stop_check(stop, Path(args.output_dir) / "checkpoint.pth", epoch, niter,
                                  f"the kNN evaluation of epoch {epoch}", flush)
    with preserved_rng_state():
        top1, top5 = knn.evaluate(state.teacher_without_ddp.backbone, state.precision, check)
    print(f"Epoch {epoch}: kNN top1 {top1:.2f} top5 {top5:.2f}")
    return {"knn_top1": top1, "knn_top5": top5}


# The flags that shape the trained model (and its optimizer state): a checkpoint of other values does not load.
MODEL_FLAGS = ("arch", "patch_size", "out_dim", "use_bn_in_head", "norm_last_layer", "optimizer")
# The entries a resumed checkpoint must hold: without them a resume would go on from random weights.
TRAINING_ENTRIES = ("student", "teacher", "optimizer")


def read_resume_checkpoint(path: Path, own: bool, args) -> dict:
    """The checkpoint this run resumes (its --output_dir's checkpoint.pth when `own`, else --resume_from), checked
    before anything is built or written: a file torch.save completed, a train_ssl.py checkpoint (TRAINING_ENTRIES),
    of this run's MODEL_FLAGS. Each failure is an error naming the file and the way on."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume_from {path}: no such file.")
    # an own checkpoint that does not load is not a download to fetch again: its run's last state is lost
    checkpoint = run_dir.read_own_checkpoint(path) if own else safe_torch_load(path)
    missing = [key for key in TRAINING_ENTRIES if not (isinstance(checkpoint, dict) and checkpoint.get(key))]
    if missing:
        raise ValueError(not_a_training_checkpoint(path, checkpoint, missing, own))
    saved = vars(checkpoint.get("args") or argparse.Namespace())
    flags = [f"--{k} {saved[k]} (this run: {getattr(args, k)})" for k in MODEL_FLAGS
             if k in saved and ARCH_ALIASES.get(saved[k], saved[k]) != getattr(args, k)]
    if flags:
        raise ValueError(another_model(path, f"{path} is a checkpoint of other model flags.", flags))
    return checkpoint


def not_a_training_checkpoint(path: Path, checkpoint, missing: list[str], own: bool) -> str:
    """The error for a file without the TRAINING_ENTRIES: what it holds, and where its weights can go instead."""
    if not isinstance(checkpoint, dict):
        holds = f"it holds a {type(checkpoint).__name__}"
    elif "model_state" in checkpoint:
        holds = "it holds model_state: the weights of a TimeSformer or eval_finetune.py model"
    elif checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        holds = (f"it is a flat state dict of {len(checkpoint)} tensors: weights only, as the released "
                 "kinetics400_vitb_ssl.pth")
    else:
        holds = f"its entries: {sorted(map(str, checkpoint))[:8]}"
    weights = (f"To start a pretraining from its weights, pass --pretrained_rgb {path} (an SVT / TimeSformer video "
               f"backbone) or --opts TIMESFORMER.PRETRAINED_MODEL {path} (an ImageNet / DINO image ViT)")
    head = f"{path} is not a train_ssl.py training checkpoint: it has no {' / '.join(missing)} entry ({holds})"
    if own:
        return (f"{head}, so --output_dir {path.parent} is another program's folder; resuming it would train from "
                f"random weights and overwrite that file. Pass another --output_dir. {weights}.")
    return f"{head}, so there is no training to continue from it. {weights}, without --resume_from."


def another_model(path: str | Path, problem: str, flags: list[str]) -> str:
    """The error for a checkpoint written by another model: `problem`, then the `flags` that differ and the way on."""
    opts = " Also compare MODEL.* / DATA.* in its config.yaml." if not flags else ""
    return (f"{problem}\nThat checkpoint was written by another model: {', '.join(flags) or 'see above'}.{opts} "
            f"Resume with the same flags, or use a new --output_dir for a new model (--pretrained_rgb {path} starts "
            "it from that checkpoint's teacher backbone).")


# Flags a resume takes without a note: those that cannot change the training, those another note covers (the global
# batch: --batch_size_per_gpu and the world size) and MODEL_FLAGS (read_resume_checkpoint: an error).
UNNOTED_FLAGS = ("output_dir", "resume_from", "pretrained_rgb", "num_workers", "log_freq", "saveckp_freq",
                 "saveckp_iters", "dist_url", "dist_timeout", "decode_timeout", "local_rank", "rank", "gpu",
                 "world_size", "batch_size_per_gpu", *MODEL_FLAGS)


def note_changed_flags(saved_args, args, lr_now: float) -> None:
    """On resume: a note for each flag (but UNNOTED_FLAGS) whose value differs from that of the checkpoint's run
    (`saved_args`): this run goes on with its own, mixing two runs' settings. --epochs also recomputes the schedules
    (as DINO's resume does; `lr_now`: the new schedule's lr where the run goes on), and another global batch the
    lr (resume_start_iteration notes where in the epoch the run goes on)."""
    def plain(value):  # a default tuple and the list a command line gives compare equal
        return list(value) if isinstance(value, tuple) else value

    saved = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else {}
    for key, value in vars(args).items():
        old = saved.get(key)
        if key in UNNOTED_FLAGS or key not in saved or plain(old) == plain(value):
            continue
        note = f"Note: --{key} {value} on resume, where the checkpoint's run had {old}: this run goes on with {value}."
        if key == "epochs":
            note += (f" The lr, weight decay, teacher momentum and teacher temperature schedules are recomputed for "
                     f"{value} epochs (as DINO's resume does): the lr goes on at {lr_now:.3g}, on the new schedule "
                     "(after a finished run it jumps back up).")
        print(note)
    if "batch_size_per_gpu" in saved and "world_size" in saved and "lr" in saved:
        before = saved["batch_size_per_gpu"] * saved["world_size"]
        now = args.batch_size_per_gpu * utils.get_world_size()
        if before != now:
            print(f"Note: the lr is rescaled for the new global batch: --lr x global batch / 256 = {args.lr} x {now} "
                  f"/ 256 = {args.lr * now / 256:.3g} at the peak (the checkpoint's run: {saved['lr']} x {before} / "
                  f"256 = {saved['lr'] * before / 256:.3g}).")


def resume_checkpoint(state: TrainState, path: str | Path, checkpoint: dict, to_restore: dict) -> None:
    """Load the `checkpoint` read from `path` (read_resume_checkpoint) into the state and `to_restore`; an entry
    that does not fit (e.g. another MODEL.DEPTH) is an error."""
    try:
        restart_from_checkpoint(path, run_variables=to_restore, loaded=checkpoint,
                                student=PrefixedState(state.student_without_ddp), teacher=state.teacher_without_ddp,
                                optimizer=state.optimizer, fp16_scaler=state.fp16_scaler, dino_loss=state.dino_loss)
    except ValueError as err:
        raise ValueError(another_model(path, str(err), [])) from err


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], m: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s for every parameter pair."""
    torch._foreach_mul_(teacher_params, m)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - m)


def collapse_warning(epoch_loss: float, mean_target_entropy: float, out_dim: int, warmup_teacher_temp_epochs: int = 0,
                     tolerance: float = 0.005, one_prototype: float = 0.1) -> str | None:
    """A warning when the epoch shows one of DINO's two collapses: the mean loss within `tolerance`
    (relative) of ln(out_dim), the cross-entropy of uniform targets; or the entropy of the batch-mean
    teacher target below `one_prototype` x ln(out_dim), i.e. every clip gets (almost) the same prototype.
    --warmup_teacher_temp is advised only when its warm-up runs (`warmup_teacher_temp_epochs` > 0)."""
    uniform = math.log(out_dim)
    if abs(epoch_loss - uniform) <= tolerance * uniform:
        warmup = (f", and --warmup_teacher_temp, where its {warmup_teacher_temp_epochs}-epoch warm-up starts"
                  if warmup_teacher_temp_epochs > 0 else "")
        return (f"WARNING: the loss ({epoch_loss:.4f}) sits at ln(out_dim) = {uniform:.4f}: the teacher's targets "
                f"are uniform (collapse) and the features stop improving. Sharpen the teacher (lower "
                f"--teacher_temp{warmup}), add --use_bn_in_head True, or give the data more "
                "variety (common with small, uniform-looking data sets and small batches).")
    if mean_target_entropy < one_prototype * uniform:
        return (f"WARNING: the batch-mean teacher target has an entropy of {mean_target_entropy:.3f} nats "
                f"(ln(out_dim) = {uniform:.2f}): nearly every clip gets the same prototype (collapse), however low "
                "the loss. Centre more (lower --center_momentum) or sharpen less (raise --teacher_temp).")
    return None


def stop_if_nonfinite(nonfinite_on_any_rank: bool, losses: list[torch.Tensor], epoch: int, it: int, args) -> None:
    """On check steps: if any rank saw a non-finite loss since the last check, every rank stops."""
    if not nonfinite_on_any_rank:
        return
    values = torch.stack(losses).tolist() if losses else []
    stop_training(f"Loss is {values}, stopping training (rank {utils.get_rank()}, epoch {epoch}, iteration {it}): "
                  "non-finite loss on at least one process.", args)


def stop_if_nonfinite_weights(state: TrainState, epoch: int, iteration: int, args) -> None:
    """Before every save: a non-finite weight or loss centre on any rank stops the run, so a checkpoint never
    holds one."""
    tensors = {f"student.{k}": v for k, v in state.student_without_ddp.state_dict().items()}
    tensors.update({f"teacher.{k}": v for k, v in state.teacher_without_ddp.state_dict().items()})
    tensors.update({f"dino_loss.{k}": v for k, v in state.dino_loss.state_dict().items()})
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    finite = torch.stack([v.isfinite().all() for v in floats.values()])
    if not any_rank(~finite.all()):
        return
    bad = [k for k, ok in zip(floats, finite.tolist()) if not ok]
    stop_training(f"Non-finite weights before saving epoch {epoch} iteration {iteration} "
                  f"(rank {utils.get_rank()}: {bad[:3]}{' ...' if len(bad) > 3 else ''}), stopping training.", args)


def any_rank(flag: torch.Tensor) -> bool:
    """True when `flag` (a boolean scalar) is set on any rank."""
    flag = flag.to(torch.int32)
    if utils.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def stop_training(reason: str, args) -> None:
    """Every rank prints `reason` and how to continue from a checkpoint before the divergence, then exits 1."""
    output_dir = Path(args.output_dir)
    numbered = run_dir.numbered_checkpoints(output_dir)
    last = output_dir / "checkpoint.pth"
    saved = (f"The last checkpoint, {last}, has finite weights (nothing non-finite is ever saved) but may "
             f"already be diverging" if last.is_file() else "No checkpoint was saved yet")
    if numbered:
        saved += f"; earlier ones: {', '.join(p.name for p in numbered[-3:])}"
    print(f"{reason} No checkpoint is written. {saved}. Do not rerun in this --output_dir (it would resume the "
          f"same state): continue in a fresh one from a checkpoint before the divergence, e.g. --output_dir "
          f"{output_dir}_restart --resume_from {numbered[-1] if numbered else last} with a lower --lr, "
          "--clip_grad 3, --use_fp16 false (or --amp_dtype bf16 on a GPU with native bf16: A100, H100), or a larger "
          "--freeze_last_layer.",
          force=True, flush=True)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """The command line: exit status 0 when the run ends, preemption.PREEMPTED_EXIT_STATUS (3) when a stop signal
    ended it after writing checkpoint.pth (run it again to resume), 1 on an error."""
    utils.line_buffered_output()
    parser = argparse.ArgumentParser("SVT", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    utils.check_writable_dir(args.output_dir, writes=OUTPUT_WRITES)
    with utils.named_rank_failures(args.dist_timeout):
        train_svt(args, exit_after_stop=True)


if __name__ == "__main__":
    main()
