"""Fine-tuning of an SVT checkpoint: the whole TimeSformer plus a new linear head, trained on labels.

The paper's fine-tuning numbers come from TimeSformer's recipe (the authors ran it in the TimeSformer
repository): SGD, momentum 0.9 (Nesterov, TimeSformer's default), weight decay 1e-4 on every parameter,
lr 0.005 for an effective batch of 64 (8 clips per iteration, gradients accumulated over 8 iterations), x0.1 at
epochs 11 and 14, 15 epochs, drop path 0.1, plain cross-entropy (no label smoothing, no mixup), 8 frames x stride 32
at 224, random short side 256-320 + crop + flip. Those are the defaults here; the lr is scaled with the effective
batch (lr x batch / 64; scripts/finetune.sh picks --accum_iter to reach 64). The test scores
TEST.NUM_ENSEMBLE_VIEWS x TEST.NUM_SPATIAL_CROPS clips per video (1 x 3) with summed logits, as
eval_linear.py; `--slowfast_eval True` uses the paper's slow-fast clips.

An undecodable training video is replaced by another, each replaced draw counted ("train_replaced_samples"); an
undecodable val/test video is left out of the accuracy and counted once ("val_skipped_videos",
"test_multiview_skipped_videos"), as in the other evaluation scripts.

SIGTERM / SIGUSR1 (SLURM preemption, time limit, `--signal` warning) stop the run cleanly, as in eval_linear.py:
every rank stops at the same optimizer step of training, or batch of a validation or the final test (which it
abandons), at most preemption.CHECK_EVERY after the signal; checkpoint.pth then holds the training done (a stopped
validation's epoch as trained to its last step) and the process exits with status 3. A rerun of the same command
continues exactly there and runs the abandoned pass again. `--evaluate` has nothing to save: a signal ends it as
usual.

    torchrun --nproc_per_node=8 eval_finetune.py --arch vit_base --pretrained_weights kinetics400_vitb_ssl.pth \
        --batch_size_per_gpu 1 --accum_iter 8 --dataset ucf101 --output_dir checkpoints/finetune/ucf101 \
        --opts DATA.PATH_TO_DATA_DIR data/ucf101/splits DATA.PATH_PREFIX data/ucf101/videos
"""
import argparse
import contextlib
import datetime
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from datasets import DATASET_LISTS, DATASETS, build_dataset
from datasets.loader_watchdog import WatchedLoader
from datasets.seeding import SeededDataset, SeededDistributedSampler, resume_start_iteration
from datasets.video_dataset import (checkpoint_sequential_videos, replaced_warning, restore_sequential_videos,
                                    sequential_decodes)
from models import ARCHS, VisionTransformer, build_backbone
from utils import preemption, run_dir, utils
from utils.checkpoint import (atomic_save, gather_objects, gather_rng_states, load_imagenet_init,
                              load_pretrained_weights, output_dir_lock, remove_stale_temp_files, restore_epoch_meters,
                              restore_rng)
from utils.evaluation import (ReturnIndexLabelDataset, backbone_fingerprint, check_backbone_load, check_evaluated_split,
                              check_same_run, dataset_labels, extract_features_and_labels, keeping_the_epoch,
                              make_loader, multi_view_stats, note_ssl_view_keys, resolve_num_labels, run_record,
                              single_clip_config, single_view_stats, split_files, to_device, topk_hits,
                              unreadable_videos)
from utils.parser import add_config_args, check_clip_sizes, load_config

CHECKPOINT_NAME = "checkpoint.pth"
RESULTS_NAME = "finetune_results.json"
# The effective batch the reference lr is given for: TimeSformer's GLOBAL_BATCH_SIZE (64 in its config defaults,
# not overridden by its Kinetics YAMLs). Its train_net.py accumulates the gradients of GLOBAL_BATCH_SIZE //
# (NUM_SHARDS x TRAIN.BATCH_SIZE) iterations, divided by their number, before each SGD step: with the YAML's
# TRAIN.BATCH_SIZE 8 (one clip on each of 8 GPUs), lr 0.005 is for 8 iterations of 8 clips.
REFERENCE_BATCH = 64


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Fine-tuning of SVT video features", add_help=False)
    parser.add_argument("--arch", default="vit_base", type=str, choices=ARCHS,
                        help="Backbone: timesformer / vit_base (TimeSformer-B, the paper's), vit_small, vit_tiny.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="Patch side of the backbone in pixels: the train_ssl.py --patch_size it was "
                             "pretrained with (16 for the released checkpoint).")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Initialisation: the released kinetics400_vitb_ssl.pth, a train_ssl.py checkpoint.pth "
                             "(see --checkpoint_key), a TimeSformer `model_state` file or a bare backbone dict; "
                             "its head, if any, is dropped. Empty: random init, or the ImageNet init of "
                             "TIMESFORMER.PRETRAINED_MODEL (a baseline).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Entry of a full training checkpoint to start from ("teacher", the paper\'s, or '
                             '"student").')
    parser.add_argument("--dataset", default="ucf101", type=str, choices=DATASETS,
                        help="ucf101, hmdb51 (the split of --opts DATA.SPLIT, 1 by default), kinetics400 or ssv2 "
                             "(no horizontal flip).")
    parser.add_argument("--num_labels", default=None, type=int,
                        help="Classes of the new head (101 UCF-101, 51 HMDB-51, 400 Kinetics-400, 174 SSv2). "
                             "Default: max label + 1 of the lists.")
    parser.add_argument("--epochs", default=15, type=int, help="Training epochs (TimeSformer's recipe: 15).")
    parser.add_argument("--lr", default=0.005, type=float,
                        help="Learning rate for an effective batch of 64 (TimeSformer's recipe: 8 clips per "
                             "iteration, 8 iterations accumulated per step); the run uses "
                             "lr * batch_size_per_gpu * GPUs * accum_iter / 64.")
    parser.add_argument("--lr_decay_epochs", default=[11, 14], type=int, nargs="*",
                        help="Epochs at whose start the learning rate is multiplied by --lr_decay.")
    parser.add_argument("--lr_decay", default=0.1, type=float, help="Factor of each learning-rate step.")
    parser.add_argument("--momentum", default=0.9, type=float, help="SGD momentum.")
    parser.add_argument("--nesterov", default=True, type=utils.bool_flag,
                        help="Nesterov momentum (TimeSformer's SOLVER.NESTEROV default).")
    parser.add_argument("--weight_decay", default=1e-4, type=float,
                        help="L2 weight decay, applied to every parameter as in TimeSformer (which decays "
                             "only non-BatchNorm parameters, i.e. all of a ViT's).")
    parser.add_argument("--batch_size_per_gpu", default=8, type=int,
                        help="Clips per GPU per forward (TimeSformer's recipe: 8 per iteration over all GPUs, "
                             "one per GPU on 8; scripts/finetune.sh passes 8 / GPUS); the lr scales with the "
                             "effective batch, batch_size_per_gpu * GPUs * accum_iter.")
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="Forwards whose gradients are averaged before each optimizer step: the effective "
                             "batch is batch_size_per_gpu * GPUs * accum_iter. The recipe's is 64 (TimeSformer "
                             "accumulates 8 iterations of 8 clips): e.g. 8 with 8 GPUs x 1 clip, 8 with 1 GPU x 8 "
                             "clips; scripts/finetune.sh picks it.")
    parser.add_argument("--use_fp16", default=True, type=utils.bool_flag,
                        help="Mixed precision (type chosen by --amp_dtype); off: fp32.")
    parser.add_argument("--amp_dtype", default="auto", choices=["auto", "bf16", "fp16"],
                        help="auto: bf16 on GPUs that support it, else fp16 with loss scaling; on CPU bf16 where "
                             "the CPU has it natively (AVX-512 BF16 / AMX), else fp32 (emulated bf16, e.g. on AVX-512 "
                             "CPUs without BF16 or AVX2-only ones, is many times slower). The run prints its choice.")
    parser.add_argument("--grad_checkpointing", default=False, type=utils.bool_flag,
                        help="Recompute each block in the backward pass: far less activation memory "
                             "(ViT-B fits 16 GB cards), about 30%% slower.")
    parser.add_argument("--slowfast_eval", default=False, type=utils.bool_flag,
                        help="Validate and test each clip as the mean CLS feature of a NUM_FRAMES x "
                             "TEST_CROP_SIZE and an 8*NUM_FRAMES x LOCAL_CROP_SIZE clip of the same window, then "
                             "the head (the paper's slow-fast inference). Training is unchanged.")
    parser.add_argument("--ensemble", default="sum", choices=("sum", "softmax"),
                        help="Multi-view aggregation per video: sum of the clip logits (the original's "
                             "TestMeter) or the mean of the clip softmax probabilities.")
    parser.add_argument("--evaluate", action="store_true",
                        help="Only run the multi-view test of the model in output_dir/checkpoint.pth, which holds "
                             "every weight (no --pretrained_weights needed), on the DATA.SPLIT it was trained on "
                             "(another split is refused).")
    parser.add_argument("--val_freq", default=1, type=int,
                        help="Single-view validation every N epochs (and after the last).")
    parser.add_argument("--output_dir", default=".", type=str,
                        help="checkpoint.pth, log.txt, tensorboard (tb/), config and results are written here; "
                             "a checkpoint.pth found here is resumed, also one written on SIGTERM/SIGUSR1 (exit "
                             "status 3: run the same command again, or requeue the job). A training start without "
                             "one needs a folder where no other run left its log.txt or finetune_results.json; "
                             "--evaluate writes only its results beside a run's files.")
    parser.add_argument("--saveckp_iters", default=0, type=utils.non_negative_int,
                        help="""Also rewrite checkpoint.pth every x iterations inside an epoch (0: off), so long
        epochs can resume mid-way. With --accum_iter the save waits for the optimizer step that ends the x-th
        iteration's accumulation group.""")
    parser.add_argument("--log_freq", default=20, type=int, help="Print / tensorboard every N iterations.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed (head init, data order, augmentation).")
    parser.add_argument("--num_workers", default=10, type=int,
                        help="DataLoader worker processes per GPU (decoding is CPU-bound).")
    utils.add_decode_timeout_arg(parser)
    utils.add_distributed_args(parser)
    add_config_args(parser)
    return parser


# ---------------------------------------------------------------------------------------------
# Config, data and model
# ---------------------------------------------------------------------------------------------
def build_model(args, cfg, num_labels: int, initialise: bool = True) -> VisionTransformer:
    """The backbone of `args.arch` initialised from `args.pretrained_weights` (or TIMESFORMER.PRETRAINED_MODEL),
    with a new linear head; without `initialise` (a model whose every weight a checkpoint then replaces) only
    from --pretrained_weights, when given."""
    model = build_backbone(args.arch, cfg, patch_size=args.patch_size)
    if args.pretrained_weights:  # the model has no head yet: a file's head is left out
        summary = load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key)
        check_backbone_load(summary, args.pretrained_weights, args.arch)
    elif initialise and cfg.TIMESFORMER.PRETRAINED_MODEL:
        load_imagenet_init(model, cfg.TIMESFORMER.PRETRAINED_MODEL)
    elif initialise:
        print("WARNING: no --pretrained_weights and no TIMESFORMER.PRETRAINED_MODEL: fine-tuning from a "
              "random initialisation.")
    model.reset_classifier(num_labels)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_train_loader(train_set, args, device: torch.device) -> DataLoader:
    """Shuffled per epoch, incomplete last batch dropped (as TimeSformer). Each clip is drawn under its own
    seed (datasets/seeding.py), so a mid-epoch resume that skips the consumed batches (`sampler.skip`) draws
    the same clips; the loader's own generator keeps its worker-seed draw off the global stream (drop path),
    which a mid-epoch resume restores."""
    sampler = SeededDistributedSampler(train_set, shuffle=True, seed=args.seed)
    loader = WatchedLoader(SeededDataset(train_set), sampler=sampler, batch_size=args.batch_size_per_gpu,
                           num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                           worker_init_fn=utils.seed_worker, generator=torch.Generator().manual_seed(args.seed),
                           decode_timeout=args.decode_timeout)
    if len(loader) < args.accum_iter:
        raise ValueError(f"{len(train_set)} training videos give {len(loader)} batches per process, fewer than "
                         f"one optimizer step (--accum_iter {args.accum_iter} x --batch_size_per_gpu "
                         f"{args.batch_size_per_gpu} x {utils.get_world_size()} processes); lower them.")
    return loader


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: each epoch's randomness (augmentation, drop path, worker seeds)
    depends only on it, so a run resumed at an epoch boundary replays the uninterrupted run exactly."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def effective_batch(args) -> int:
    """Clips per optimizer step: batch_size_per_gpu x processes x accum_iter."""
    return args.batch_size_per_gpu * utils.get_world_size() * args.accum_iter


def lr_at_epoch(args, epoch: int) -> float:
    """The recipe's steps: --lr scaled linearly from REFERENCE_BATCH to the effective batch, x lr_decay per decay
    epoch reached."""
    steps = sum(epoch >= e for e in args.lr_decay_epochs)
    return args.lr * effective_batch(args) / REFERENCE_BATCH * args.lr_decay ** steps


def predict(model: VisionTransformer, frames) -> torch.Tensor:
    """Class logits; a list of clips of the same videos (slow-fast) is classified from their mean CLS."""
    if isinstance(frames, (list, tuple)):
        return model.head(torch.stack([model.forward_features(f)[:, 0] for f in frames]).mean(dim=0))
    return model(frames)


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer, scaler, epoch: int, niter: int, args,
                    precision, device: torch.device, writer=None, start_iter: int = 0,
                    epoch_meters: list[dict] | None = None, save_mid_epoch=None,
                    stop: preemption.StopSignals | None = None) -> tuple[dict, dict]:
    """One epoch of cross-entropy training over the loader's `niter` batches; an optimizer step every
    `accum_iter` batches (a trailing group of fewer batches is dropped). A mid-epoch resume starts at
    `start_iter` (the loader skips the consumed batches) with the `epoch_meters` of the interrupted part;
    `save_mid_epoch(iteration=, epoch_meters=)` is called every --saveckp_iters iterations, at an optimizer step.
    Returns the epoch means (loss, top-1/5 on the training clips, lr) with `replaced_samples` (the draws replaced
    because their video could not be read), and this rank's share of them for a checkpoint (`epoch_meters`).
    A `stop` signal on any rank ends the epoch at an optimizer step
    (checked every preemption.CHECK_EVERY of them and at the last): mid-epoch checkpoint, then
    preemption.Preempted."""
    stop = stop if stop is not None else preemption.StopSignals(())
    model.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    num_batches = niter // args.accum_iter * args.accum_iter
    header = f"Epoch: [{epoch}/{args.epochs}]"
    replaced = torch.zeros((), dtype=torch.long)
    if epoch_meters is not None:
        replaced += restore_epoch_meters(metric_logger, epoch_meters)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    optimizer.zero_grad(set_to_none=True)
    for it, (frames, target, _, meta) in enumerate(
            metric_logger.log_every(loader, args.log_freq, header, total=num_batches, start=start_iter),
            start=start_iter):
        if it == num_batches:
            break
        frames, target = to_device(frames, device), target.to(device, non_blocking=True)
        step = (it + 1) % args.accum_iter == 0
        with model.no_sync() if ddp and not step else contextlib.nullcontext():
            with utils.autocast_context(precision, device):
                logits = model(frames)
            loss = F.cross_entropy(logits.float(), target)
            scaled = loss / args.accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if step:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # device tensors (no host sync per batch): the meters read them back when a progress line is printed;
        # float64 hits * 100.0 / n as the host computed them (a divisor on the device: CUDA multiplies by the
        # reciprocal of a host number, 1 ulp off)
        n = torch.full((), target.numel(), dtype=torch.float64, device=target.device)
        top1, top5 = topk_hits(logits.detach().float(), target).double() * 100.0 / n
        metric_logger.meters["acc1"].update(top1, n=target.numel())
        if args.num_labels >= 5:
            metric_logger.meters["acc5"].update(top5, n=target.numel())
        replaced += meta["skipped"].sum()
        metric_logger.update(loss=loss.detach())
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        if writer is not None and it % args.log_freq == 0:
            writer.add_scalar("train/loss", loss.item(), epoch * num_batches + it)
        stop_now = step and preemption.is_check_step((it + 1) // args.accum_iter, num_batches // args.accum_iter) \
            and stop.requested()[0]
        save_step = step and preemption.is_save_step(it + 1, num_batches, args.saveckp_iters, args.accum_iter)
        if stop_now or save_step:
            save_mid_epoch(iteration=it + 1, epoch_meters={"meters": metric_logger.totals(), "skipped": int(replaced)})
        if stop_now:
            preemption.finish(preemption.stop_message(stop.names(), epoch, it + 1, num_batches,
                                                      Path(args.output_dir) / CHECKPOINT_NAME), stop)
    own = {"meters": metric_logger.totals(), "skipped": int(replaced)}
    metric_logger.synchronize_between_processes()
    if utils.get_world_size() > 1:
        replaced = replaced.to(device)
        dist.all_reduce(replaced)
    print("Averaged stats:", metric_logger.global_averages())
    check_finite_loss(metric_logger.meters["loss"].global_avg, epoch, args)
    return {**{k: meter.global_avg for k, meter in metric_logger.meters.items()}, "replaced_samples": int(replaced),
            "data_wait": utils.data_wait(metric_logger, f"Epoch {epoch}", args.num_workers,
                                         frames=DATASET_LISTS[args.dataset].frame_folders)}, own


def check_finite_loss(loss: float, epoch: int, args) -> None:
    """Stop (before any save) when the training loss is not finite."""
    if not np.isfinite(loss):
        raise FloatingPointError(f"epoch {epoch}: the training loss is {loss}. The last good checkpoint is "
                                 f"{Path(args.output_dir) / CHECKPOINT_NAME} (if any); try a lower --lr, "
                                 "--use_fp16 False, or --amp_dtype bf16 on a GPU with native bf16 (A100, H100).")


def write_config(args, cfg) -> None:
    """The run's arguments and config, written once the checkpoint it continues or tests was accepted (a refused
    run leaves the folder's record alone): config.json / .yaml, an earlier training start's that differs kept
    (run_dir.write_config_files), or config_evaluate.* beside them, the last --evaluate's (as its results file)."""
    if not utils.is_main_process():
        return
    files = {"json": json.dumps(vars(args), indent=2, default=str) + "\n", "yaml": cfg.dump()}
    if args.evaluate:
        for suffix, text in files.items():
            (Path(args.output_dir) / f"config_evaluate.{suffix}").write_text(text)
    else:
        run_dir.write_config_files(args.output_dir, {f"config.{suffix}": text for suffix, text in files.items()})


def finetune_run(args, cfg, train_set, val_set) -> dict:
    """What a fine-tuning's score depends on besides its initialisation, saved in its checkpoint (`run`, checked
    on resume): the dataset and its train/val lists (SSv2: and annotation JSONs), the classes, the seed, the
    slow-fast test and the clip keys. Not the lr, the epochs or the global batch: a resume applies new ones from
    its epoch on (README; note_another_step names another lr or effective batch)."""
    return run_record(args, cfg, ("dataset", "num_labels", "seed", "slowfast_eval"),
                      split_files(train=train_set, val=val_set))


def save_checkpoint(path: Path, model: nn.Module, optimizer, scaler, epoch: int, best_acc1: float, args, cfg,
                    init_backbone: str, run: dict, iteration: int = 0, epoch_meters: dict | None = None,
                    train_set=None, epoch_log: dict | None = None) -> None:
    """checkpoint.pth, written atomically by rank 0. At an epoch end `epoch` is the next epoch to run and
    `epoch_log` the ended epoch's log.txt record (a resume writes it if a kill left it out); a
    mid-epoch save (`iteration` batches of `epoch` done, this rank's `epoch_meters`) adds what an exact resume
    needs: `iteration`, every rank's RNG states and running meters, and the `train_set` videos decoded
    sequentially; `init_backbone` is the fingerprint of the initialisation and `run` the fine-tuning's
    (finetune_run; a resume checks both). Every rank calls it (the mid-epoch part is gathered from all ranks); a
    non-finite running loss on any rank stops every rank instead."""
    state = {"epoch": epoch, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "best_acc1": best_acc1, "args": args, "cfg": cfg.dump(), "init_backbone": init_backbone, "run": run}
    if epoch_log is not None:
        state["epoch_log"] = epoch_log
    if iteration:
        per_rank = gather_objects(epoch_meters)
        for entry in per_rank:
            count, total = entry["meters"]["loss"]
            check_finite_loss(total / count, epoch, args)
        state.update(iteration=iteration, rng=gather_rng_states(), epoch_meters=per_rank,
                     sequential_videos=checkpoint_sequential_videos(train_set))
    if utils.is_main_process():
        atomic_save(state, path)


@torch.no_grad()
def evaluate(model: VisionTransformer, dataset, args, precision, device: torch.device, check_stop=None,
             header: str = "") -> dict:
    """Accuracy on the dataset's clips, each rank running its shard: single-view stats in val mode (one clip
    per video), per-video stats over NUM_ENSEMBLE_VIEWS x NUM_SPATIAL_CROPS clips aggregated by
    `args.ensemble` in test mode (keys multiview_*). Undecodable videos are left out and counted.
    `check_stop`: see utils.evaluation.extract_features_and_labels; `header` labels the progress lines ("Val:"
    or "Test:", by the dataset's mode, when empty)."""
    model.eval()

    def score(frames):
        with utils.autocast_context(precision, device):
            return predict(model, frames).float()

    loader = make_loader(ReturnIndexLabelDataset(dataset), args.batch_size_per_gpu, args.num_workers,
                         args.decode_timeout)
    header = header or ("Test:" if dataset.mode == "test" else "Val:")
    logits, returned = extract_features_and_labels(score, loader, device, check_stop, header)
    unreadable_videos(dataset, returned)
    if dataset.mode != "test":
        return single_view_stats(logits, returned, args.num_labels)
    return multi_view_stats(logits, returned, dataset_labels(dataset), dataset.num_clips_per_video, args.ensemble,
                            args.num_labels)


def final_test(model, test_set, args, precision, device, output_dir: Path, extra: dict, check_stop=None) -> dict:
    """The multi-view test, printed and written to finetune_results.json (rank 0)."""
    stats = evaluate(model, test_set, args, precision, device, check_stop)
    print(f"Multi-view test ({stats['num_clips_per_video']} clips x {stats['num_videos']} videos, {args.ensemble}"
          f"{', slow-fast' if args.slowfast_eval else ''}): top-1 {stats['multiview_acc1']:.2f}"
          + (f", top-5 {stats['multiview_acc5']:.2f}" if "multiview_acc5" in stats else "")
          + f"; skipped videos (unreadable, left out): {stats['multiview_skipped_videos']}")
    results = {"dataset": args.dataset, "split": test_set.lists.split, "pretrained_weights": args.pretrained_weights,
               "checkpoint_key": args.checkpoint_key, "ensemble": args.ensemble,
               "slowfast_eval": args.slowfast_eval, **{f"test_{k}": v for k, v in stats.items()}, **extra}
    if utils.is_main_process():
        with (output_dir / RESULTS_NAME).open("w") as f:
            json.dump(results, f, indent=2)
    return results


def eval_finetune(args, exit_after_stop: bool = False) -> dict:
    """Fine-tune, validate, test. preemption.STOP_SIGNALS during training, a validation or the final test end it
    cleanly (preemption.Preempted after the checkpoint); with `exit_after_stop` (the command line) they stay
    ignored after such a stop, until the process exits."""
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    if args.accum_iter < 1:
        raise ValueError(f"--accum_iter must be at least 1, got {args.accum_iter}")
    cfg = load_config(args)
    check_clip_sizes(cfg, args.patch_size, train_clips=not args.evaluate, slowfast=args.slowfast_eval)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    note_ssl_view_keys(cfg)
    device = utils.default_device()
    output_dir = Path(args.output_dir)
    if utils.is_main_process():
        utils.check_writable_dir(output_dir, writes="its checkpoint and log are written there every epoch")
    # one training run writes a folder (README "Reliability"); an --evaluate next to it writes only the results
    with output_dir_lock(output_dir, enabled=not args.evaluate):
        return finetune_in_output_dir(args, cfg, device, exit_after_stop)


def load_finetuned(model: VisionTransformer, ckpt: dict, path: Path, init_backbone: str, args) -> None:
    """The fine-tuned weights of `ckpt` (the run's checkpoint.pth, read from `path`) into `model`, for a resume or
    --evaluate: an error when its head has another class count, or when a resume would continue the fine-tuning of
    another initialisation than this run's (`init_backbone`, the fingerprint of --pretrained_weights' backbone; a
    file without one passes). --evaluate tests the checkpoint's weights, every one of which it holds: it needs no
    --pretrained_weights, and another one only gets a note."""
    if ckpt["model_state"]["head.bias"].shape[0] != args.num_labels:
        raise ValueError(f"{path} has a {ckpt['model_state']['head.bias'].shape[0]}-class head but this run has "
                         f"{args.num_labels} classes; use another --output_dir or --num_labels.")
    if ckpt.get("init_backbone", init_backbone) != init_backbone:
        if not args.evaluate:
            raise ValueError(f"{path} is a fine-tuning of another initialisation than --pretrained_weights "
                             f"{args.pretrained_weights or '(none)'}; resuming it would report its scores for this "
                             "checkpoint. Give this run its own --output_dir (finetune.sh: EXP_NAME=... or "
                             f"OUTPUT_DIR=...), or delete {run_dir.delete_to_restart(path, (RESULTS_NAME,))} to "
                             "start a new one.")
        if args.pretrained_weights:
            print(f"Note: {path} is a fine-tuning of another initialisation than --pretrained_weights "
                  f"{args.pretrained_weights}; --evaluate tests the weights of {path} (all of them), so "
                  "--pretrained_weights is not used.")
    model.load_state_dict(ckpt["model_state"])


def note_another_step(ckpt: dict, path: Path, args) -> None:
    """On resume: one note when this run steps with another effective batch or lr than the run of `ckpt` (read from
    `path`) did, e.g. another --batch_size_per_gpu, process count, --accum_iter or --lr, or a checkpoint of a version
    whose lr was for a batch of 8. Compared at the epoch its optimizer trained last: the lr of its param group (the
    one that run used) vs this run's lr_at_epoch. This run goes on with its own from the resumed epoch."""
    saved = ckpt.get("args")
    then = (getattr(saved, "batch_size_per_gpu", args.batch_size_per_gpu),
            getattr(saved, "world_size", utils.get_world_size()), getattr(saved, "accum_iter", 1))
    now = (args.batch_size_per_gpu, utils.get_world_size(), args.accum_iter)
    epoch = ckpt["epoch"] if ckpt.get("iteration") else max(ckpt["epoch"] - 1, 0)  # an epoch end saves epoch + 1
    lr_then, lr_now = ckpt["optimizer_state"]["param_groups"][0]["lr"], lr_at_epoch(args, epoch)
    if math.prod(then) == math.prod(now) and math.isclose(lr_then, lr_now, rel_tol=1e-6):
        return

    def batch(clips: int, processes: int, accumulated: int) -> str:
        return (f"an effective batch of {clips * processes * accumulated} ({clips} clips x {processes} "
                f"process{'es' if processes > 1 else ''} x {accumulated} accumulated)")

    print(f"Note: {path}'s run trained epoch {epoch} with {batch(*then)} at lr {lr_then:g}; this run has {batch(*now)} "
          f"and lr {lr_now:g} for that epoch (--lr {args.lr:g} x {math.prod(now)} / {REFERENCE_BATCH}, with its decay "
          f"steps) and goes on with them from epoch {ckpt['epoch']}.")


def resume_finetune(ckpt: dict | None, path: Path, optimizer, scaler, run: dict, train_set,
                    args) -> tuple[int, int, float, list[dict] | None, list[dict] | None, dict | None]:
    """Where training starts: (epoch, iteration, best val top-1, the interrupted epoch's RNG states and meters, the
    log record of the epoch an epoch-end checkpoint ended).
    From scratch without `ckpt`; else from it (the run's checkpoint.pth, read from `path`, checked to be of this
    run), whose state the optimizer and the fp16 `scaler` get."""
    if ckpt is None:
        return 0, 0, 0.0, None, None, None
    check_same_run(ckpt.get("run"), run, str(path), "fine-tuning", "finetune.sh: EXP_NAME=... or OUTPUT_DIR=...")
    note_another_step(ckpt, path, args)
    optimizer.load_state_dict(ckpt["optimizer_state"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    epoch, best_acc1 = ckpt["epoch"], ckpt["best_acc1"]
    # a mid-epoch checkpoint (--saveckp_iters or a stop signal): `iteration` batches of `epoch` done
    iteration = resume_start_iteration(ckpt.get("iteration", 0), ckpt.get("args"), args.batch_size_per_gpu,
                                       utils.get_world_size(), args.accum_iter, f"epoch {epoch}")
    restore_sequential_videos(train_set, ckpt.get("sequential_videos"))
    print(f"Resumed from {path}: epoch {epoch} from iteration {iteration}, best val top-1 {best_acc1:.2f}")
    return (epoch, iteration, best_acc1, ckpt.get("rng"), ckpt.get("epoch_meters"),
            None if iteration else ckpt.get("epoch_log"))


def finetune_in_output_dir(args, cfg, device: torch.device, exit_after_stop: bool) -> dict:
    """eval_finetune's run, holding --output_dir unless --evaluate: data, model, resume, epochs, test."""
    output_dir = Path(args.output_dir)
    ckpt_path = output_dir / CHECKPOINT_NAME
    if not args.evaluate and not ckpt_path.is_file():  # nor another fine-tuning's log, results and tb/ in the folder
        run_dir.check_fresh_start(output_dir, checkpoint=CHECKPOINT_NAME, results=(RESULTS_NAME,))
    if utils.is_main_process() and not args.evaluate:
        remove_stale_temp_files(output_dir)  # not next to a training run, whose save it could be

    # Data: training clips (Kinetics: the plain clip, not the SSL views), single-view val, multi-view test.
    val_set = build_dataset(args.dataset, single_clip_config(cfg), "val", slowfast=args.slowfast_eval)
    test_set = build_dataset(args.dataset, cfg, "test", slowfast=args.slowfast_eval)
    train_set = None if args.evaluate else build_dataset(args.dataset, cfg, "train")
    ckpt = run_dir.read_own_checkpoint(ckpt_path, True, (RESULTS_NAME,)) if ckpt_path.is_file() else None
    if args.evaluate and ckpt is None:
        raise FileNotFoundError(f"--evaluate: no fine-tuned model at {ckpt_path}; train one first (same --output_dir).")
    labelled = [d for d in (train_set, val_set) if d is not None]
    if ckpt is not None and args.num_labels is None:
        args.num_labels = int(ckpt["model_state"]["head.bias"].shape[0])
    args.num_labels = resolve_num_labels(args.num_labels, labelled, args.dataset)
    print(f"Data: {len(train_set) if train_set else 0} train videos, {len(val_set)} val videos, "
          f"{test_set.num_videos} test videos x {test_set.num_clips_per_video} clips; {args.num_labels} classes.")

    precision, why = utils.choose_precision(args.use_fp16, args.amp_dtype, device)
    print(f"Mixed precision: {utils.PRECISION_NAMES[precision]} ({why})")
    model = build_model(args, cfg, args.num_labels, initialise=not args.evaluate)
    init_backbone = backbone_fingerprint(model, exclude=("head.",))
    if ckpt is not None:  # resume or --evaluate: the saved weights replace the initialisation
        load_finetuned(model, ckpt, ckpt_path, init_backbone, args)
    model.to(device)

    if args.evaluate:
        check_evaluated_split(ckpt.get("run"), test_set.lists, str(ckpt_path))
        write_config(args, cfg)
        # the tested model's initialisation is the fine-tuning's, not this command's --pretrained_weights (unused)
        trained = ckpt.get("args")
        init = {key: getattr(trained, key) for key in ("pretrained_weights", "checkpoint_key") if hasattr(trained, key)}
        return final_test(model, test_set, args, precision, device, output_dir,
                          {**init, "epoch": ckpt["epoch"], "best_val_acc1": ckpt["best_acc1"],
                           "sequential_decodes": sequential_decodes(test_set)})

    model_ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at_epoch(args, 0), momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov,
                                fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    train_loader = build_train_loader(train_set, args, device)
    niter = len(train_loader)  # before any skip
    num_batches = niter // args.accum_iter * args.accum_iter  # those an epoch trains on (whole accumulation groups)
    run = finetune_run(args, cfg, train_set, val_set)
    start_epoch, start_iter, best_acc1, rng, epoch_meters, epoch_log = resume_finetune(ckpt, ckpt_path, optimizer,
                                                                                         scaler, run, train_set, args)
    if utils.is_main_process():
        run_dir.tidy_epoch_log(output_dir, start_epoch)
    write_config(args, cfg)
    if utils.is_main_process() and ckpt is None:  # a start from scratch: not an earlier start's curves in tb/
        run_dir.set_aside_tensorboard(output_dir)
    del ckpt
    writer = SummaryWriter(str(output_dir / run_dir.TB_NAME)) if utils.is_main_process() else None
    run_dir.write_missing_epoch_line(output_dir, epoch_log, writer)

    print(f"Fine-tuning from epoch {start_epoch} to {args.epochs}: {len(train_loader) // args.accum_iter} steps "
          f"per epoch, effective batch {effective_batch(args)} ({args.batch_size_per_gpu} clips x "
          f"{utils.get_world_size()} processes x {args.accum_iter} accumulated): lr --lr {args.lr:g} x "
          f"{effective_batch(args)} / {REFERENCE_BATCH} = {args.lr * effective_batch(args) / REFERENCE_BATCH:g} "
          "before its decay steps.")
    start_time = time.time()
    # A stop signal saves the training done and exits with status 3 (README "Reliability").
    with preemption.StopSignals(ignore_after_stop=exit_after_stop) as stop:
        for epoch in range(start_epoch, args.epochs):
            utils.fix_random_seeds(epoch_seed(args.seed, epoch, utils.get_rank()))
            resumed = epoch == start_epoch and start_iter > 0
            if resumed:  # continue the interrupted epoch's random streams (drop path)
                restore_rng(rng)
            train_loader.sampler.set_epoch(epoch)
            train_loader.sampler.skip = start_iter * args.batch_size_per_gpu if resumed else 0
            for group in optimizer.param_groups:
                group["lr"] = lr_at_epoch(args, epoch)
            save_mid_epoch = functools.partial(save_checkpoint, ckpt_path, model, optimizer, scaler, epoch, best_acc1,
                                               args, cfg, init_backbone, run, train_set=train_set)
            train_stats, own_meters = train_one_epoch(model_ddp, train_loader, optimizer, scaler, epoch, niter, args,
                                                      precision, device, writer,
                                                      start_iter=start_iter if resumed else 0,
                                                      epoch_meters=epoch_meters if resumed else None,
                                                      save_mid_epoch=save_mid_epoch, stop=stop)
            # the epoch trains on whole batches (drop_last) of whole accumulation groups, on every process
            warning = replaced_warning(f"Epoch {epoch}", train_stats["replaced_samples"],
                                       num_batches * args.batch_size_per_gpu * utils.get_world_size(), train_set)
            if warning:
                print(warning)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                         "sequential_decodes": sequential_decodes(train_set, val_set)}
            if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
                # a stop here keeps the epoch's training: a checkpoint after its last iteration, as a stop there
                check = preemption.stop_check(stop, ckpt_path, epoch, num_batches, f"the validation of epoch {epoch}",
                                              functools.partial(save_mid_epoch, iteration=num_batches,
                                                                epoch_meters=own_meters))
                with keeping_the_epoch(functools.partial(save_mid_epoch, iteration=num_batches,
                                                                    epoch_meters=own_meters), ckpt_path, epoch):
                    val_stats = evaluate(model, val_set, args, precision, device, check, f"Val (epoch {epoch}):")
                best_acc1 = max(best_acc1, val_stats["acc1"])
                print(f"Epoch {epoch}: val top-1 {val_stats['acc1']:.2f} (best {best_acc1:.2f}); skipped videos: "
                      f"{val_stats['skipped_videos']}")
                log_stats.update({f"val_{k}": v for k, v in val_stats.items()})
            save_checkpoint(ckpt_path, model, optimizer, scaler, epoch + 1, best_acc1, args, cfg, init_backbone, run,
                            epoch_log=log_stats)
            utils.write_epoch_log(output_dir, log_stats, writer)
        print(f"Fine-tuning took {datetime.timedelta(seconds=int(time.time() - start_time))}.")
        if writer is not None:
            writer.close()

        # a stop here leaves the last epoch-end checkpoint: the rerun runs only the test
        check = preemption.stop_check(stop, ckpt_path, args.epochs - 1, num_batches, "the multi-view test")
        results = final_test(model, test_set, args, precision, device, output_dir,
                             {"epoch": args.epochs, "best_val_acc1": best_acc1,
                              "sequential_decodes": sequential_decodes(*(d for d in (train_set, val_set, test_set)
                                                                         if d is not None))}, check)
    utils.write_epoch_log(output_dir, {k: v for k, v in results.items() if k.startswith("test_")})
    if utils.is_dist_avail_and_initialized():
        dist.barrier()
    return results


if __name__ == "__main__":
    utils.line_buffered_output()
    args = argparse.ArgumentParser("Fine-tuning of SVT video features", parents=[get_args_parser()]).parse_args()
    with utils.named_rank_failures(args.dist_timeout):
        eval_finetune(args, exit_after_stop=True)
