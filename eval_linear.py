"""Linear probe on frozen SVT features, with single-view validation and the multi-view / slow-fast test.

A val/test clip that cannot be decoded comes back with label -1: it is left out of the accuracy and of the
per-video aggregation (a video whose clips all failed is left out). An unreadable train video is replaced by
another. The results count them apart: "train_replaced_samples" the training draws of the last epoch that were
replaced (an unreadable video drawn twice counts twice), "skipped_videos" the val/test videos left out, each once
(the multi-view test reads the val list unless it has its own). A split without any readable video is an error.

SIGTERM / SIGUSR1 (SLURM preemption, time limit, `--signal` warning) stop training cleanly: every rank stops at the
same iteration (at most preemption.CHECK_EVERY after the signal), the mid-epoch checkpoint.pth.tar is written and
the process exits with status 3; a rerun of the same command continues exactly there. A signal during a
validation or the final test abandons that pass (within 5 of its batches) after saving what training did; the
rerun runs it again. `--evaluate` has nothing to save: a signal ends it as usual. With --saveckp_iters N the
same mid-epoch checkpoint is also written every N iterations, so that a kill without a signal first (kill -9, a
node crash) loses at most N iterations: the rerun continues exactly from the last one.

    torchrun --nproc_per_node=1 eval_linear.py --n_last_blocks 1 --arch vit_base \
        --pretrained_weights ckpt.pth --epochs 20 --lr 0.001 --batch_size_per_gpu 16 --num_labels 101 \
        --dataset ucf101 --output_dir checkpoints/eval/le_001 \
        --opts DATA.PATH_TO_DATA_DIR data/ucf101/splits DATA.PATH_PREFIX data/ucf101/videos
"""
import argparse
import functools
import json
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from datasets import DATASETS, build_dataset
from datasets.loader_watchdog import WatchedLoader
from datasets.seeding import SeededDataset, SeededDistributedSampler, resume_start_iteration
from datasets.video_dataset import (checkpoint_sequential_videos, replaced_warning, restore_sequential_videos,
                                    sequential_decodes)
from models import ARCHS
from utils import preemption, run_dir, utils
from utils.checkpoint import (atomic_save, gather_objects, output_dir_lock, remove_stale_temp_files,
                              restore_epoch_meters, safe_torch_load)
from utils.evaluation import (ReturnIndexLabelDataset, backbone_fingerprint, check_evaluated_split, check_same_run,
                              clip_features, dataset_labels, extract_features_and_labels, keeping_the_epoch,
                              load_backbone, make_loader, multi_view_stats, note_ssl_view_keys, resolve_num_labels,
                              run_record, single_clip_config, single_view_stats, split_files, to_device,
                              unreadable_videos)
from utils.parser import LISTS_FROM_OPTS, add_config_args, add_dropped_args, check_clip_sizes, load_config

CHECKPOINT_NAME = "checkpoint.pth.tar"
RESULTS_NAME = "linear_results.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Linear evaluation of video features", add_help=False)
    parser.add_argument("--n_last_blocks", default=4, type=int,
                        help="Concatenate the CLS tokens of the last n blocks (each through the final norm). "
                             "The original script uses 1 (the paper's setting).")
    parser.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag,
                        help="Also concatenate the average of the last block's patch tokens.")
    parser.add_argument("--arch", default="vit_base", type=str, choices=ARCHS,
                        help="Backbone: timesformer / vit_base (TimeSformer-B, the paper's), vit_small, vit_tiny.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="Patch side of the backbone in pixels: the train_ssl.py --patch_size it was "
                             "pretrained with (16 for the released checkpoint).")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Checkpoint to evaluate (full train_ssl.py checkpoint, released flat file, "
                             "TimeSformer `model_state` file or bare backbone dict). Empty: random init, or the "
                             "ImageNet init of TIMESFORMER.PRETRAINED_MODEL (a baseline).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Entry of a full training checkpoint to evaluate ("teacher" or "student").')
    parser.add_argument("--lc_pretrained_weights", default="", type=str,
                        help="A trained linear classifier (checkpoint.pth.tar of this script): skip training "
                             "and only evaluate it (as the original).")
    parser.add_argument("--epochs", default=100, type=int, help="Training epochs (the original script: 20).")
    parser.add_argument("--lr", default=0.001, type=float,
                        help="Learning rate at a global batch of 256 (scaled linearly with the batch size).")
    parser.add_argument("--feature_bn", default=False, type=utils.bool_flag,
                        help="Standardise the frozen features with a BatchNorm1d(affine=False, eps=1e-6) before the "
                             "linear layer, as MAE's linear probing does (batch statistics in training, running "
                             "ones at evaluation). Use it when SGD on raw features barely moves or diverges: "
                             "features dominated by a direction shared by every video, or probes of backbones "
                             "without a final norm. Default False: SVT's protocol (raw features). A classifier "
                             "trained with it needs it again under --evaluate.")
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Clips per GPU (original script: 16).")
    utils.add_distributed_args(parser)
    parser.add_argument("--num_workers", default=10, type=int,
                        help="DataLoader worker processes per GPU (decoding is CPU-bound).")
    utils.add_decode_timeout_arg(parser)
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the random-init backbone (no --pretrained_weights) and of the probe training "
                             "(classifier init, clip order; each clip's augmentation is drawn under its own seed, "
                             "so a resumed run draws the same clips).")
    parser.add_argument("--val_freq", default=1, type=int, help="Validate every N epochs (and after the last).")
    parser.add_argument("--output_dir", default=".",
                        help="checkpoint.pth.tar, log.txt and results are written here; a checkpoint.pth.tar found "
                             "here is resumed, also one written mid-epoch by --saveckp_iters or on SIGTERM/SIGUSR1 "
                             "(exit status 3: run the same command again, or requeue the job). A training start "
                             "without one needs a folder where no other run left its log.txt or "
                             "linear_results.json; --evaluate writes only its results beside a run's files.")
    parser.add_argument("--saveckp_iters", default=0, type=utils.non_negative_int,
                        help="Also rewrite checkpoint.pth.tar every N iterations inside an epoch (0: off), with "
                             "what a stop signal's mid-epoch checkpoint holds, so that a run killed without a "
                             "signal first (kill -9, a node crash, the OOM killer) resumes exactly from there "
                             "instead of from the epoch's start. Each save is a host sync, a gather of the running "
                             "means over the ranks and an atomic write of the classifier and its SGD state (no "
                             "backbone: small). Use it when an epoch takes long (Kinetics-400: hours), e.g. every "
                             "few hundred iterations.")
    parser.add_argument("--num_labels", default=None, type=int,
                        help="Classes of the classifier (101 UCF-101, 51 HMDB-51, 400 Kinetics-400, 174 SSv2). "
                             "Default: max label + 1 of the dataset (the original defaulted to 1000).")
    parser.add_argument("--dataset", default="ucf101", type=str, choices=DATASETS,
                        help="Evaluation dataset (ssv2 trains without flips: DATASET_OPTS, utils/parser.py).")
    parser.add_argument("--evaluate", action="store_true",
                        help="Only evaluate a trained classifier (--lc_pretrained_weights, else the output_dir "
                             "checkpoint): single-view val and the multi-view test, on the DATA.SPLIT it was trained "
                             "on (another split is refused).")
    parser.add_argument("--ensemble", default="sum", choices=("sum", "softmax"),
                        help="Multi-view aggregation per video: sum of the clip logits (the original's "
                             "TestMeter) or the mean of the clip softmax probabilities.")
    parser.add_argument("--slowfast_eval", default=False, type=utils.bool_flag,
                        help="Evaluate each clip as the mean feature of a NUM_FRAMES x TEST_CROP_SIZE and an "
                             "8*NUM_FRAMES x LOCAL_CROP_SIZE clip (the paper's slow-fast inference).")
    add_dropped_args(parser, {"--data_path": LISTS_FROM_OPTS,
                              "--use_flow": "the optical-flow branch of the original is not ported (its config keys "
                                            "are accepted only as False)"})
    add_config_args(parser)
    return parser


def eval_linear(args, exit_after_stop: bool = False) -> dict:
    """Train the probe (unless --evaluate), validate, test. preemption.STOP_SIGNALS during training, validation
    or the final test end it cleanly (preemption.Preempted after the checkpoint); with `exit_after_stop` (the
    command line) they stay ignored after such a stop, until the process exits."""
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    cfg = load_config(args)
    evaluate_only = args.evaluate or bool(args.lc_pretrained_weights)
    check_clip_sizes(cfg, args.patch_size, train_clips=not evaluate_only, slowfast=args.slowfast_eval)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    note_ssl_view_keys(cfg)
    device = utils.default_device()
    utils.check_writable_dir(args.output_dir, writes="its checkpoint and log are written there every epoch")
    # one training run writes a folder (README "Reliability"); an --evaluate next to it writes only the results
    with output_dir_lock(args.output_dir, enabled=not evaluate_only):
        return probe_in_output_dir(args, cfg, device, evaluate_only, exit_after_stop)


def probe_in_output_dir(args, cfg, device: torch.device, evaluate_only: bool, exit_after_stop: bool) -> dict:
    """eval_linear's run, holding --output_dir unless it only evaluates: data, backbone, probe, resume, test."""
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    if not evaluate_only and not os.path.isfile(ckpt_path):  # nor another probe's log and results in the folder
        run_dir.check_fresh_start(args.output_dir, checkpoint=CHECKPOINT_NAME, results=(RESULTS_NAME,))
    if utils.is_main_process() and not evaluate_only:
        remove_stale_temp_files(args.output_dir)  # not next to a training run, whose save it could be

    # Data: linear-probe training clips (Kinetics: the plain clip, not the SSL views), single-view val,
    # multi-view test (NUM_ENSEMBLE_VIEWS x NUM_SPATIAL_CROPS clips per video) of the same val list (the
    # original's multi_crop_val; Kinetics' test.csv is eval_finetune's).
    val_set = build_dataset(args.dataset, single_clip_config(cfg), "val", slowfast=args.slowfast_eval)
    test_set = build_dataset(args.dataset, cfg, "test", slowfast=args.slowfast_eval, list_mode="val")
    train_set = None if evaluate_only else build_dataset(args.dataset, cfg, "train")
    trained_path = args.lc_pretrained_weights or os.path.join(args.output_dir, CHECKPOINT_NAME)
    trained = load_trained_classifier(trained_path, own=not args.lc_pretrained_weights) if evaluate_only else None
    if trained is not None and args.num_labels is None:
        bias = trained["state_dict"].get("module.linear.bias", trained["state_dict"].get("linear.bias"))
        args.num_labels = None if bias is None else int(bias.shape[0])
    labelled = [d for d in (train_set, val_set) if d is not None]
    args.num_labels = resolve_num_labels(args.num_labels, labelled, args.dataset)
    print(f"Data loaded: {len(train_set) if train_set else 0} train clips, {len(val_set)} val clips, "
          f"{len(test_set)} test clips ({test_set.num_clips_per_video} per video); {args.num_labels} classes.")

    model = load_backbone(args.arch, cfg, device, args.pretrained_weights, args.checkpoint_key, args.patch_size)
    dim = model.embed_dim * (args.n_last_blocks + int(args.avgpool_patchtokens))
    if not 1 <= args.n_last_blocks <= len(model.blocks):
        raise ValueError(f"--n_last_blocks {args.n_last_blocks}: the backbone has {len(model.blocks)} blocks; pass "
                         f"--n_last_blocks {len(model.blocks)} or less (SVT's scripts pass 1).")
    classifier = LinearClassifier(dim, args.num_labels, args.feature_bn).to(device)
    fingerprint = backbone_fingerprint(model)

    if evaluate_only:
        return evaluate_trained(model, classifier, fingerprint, trained, trained_path, val_set, test_set, args,
                                device)

    distributed = utils.is_dist_avail_and_initialized()
    if distributed:
        classifier = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader = build_train_loader(train_set, args, device)
    niter = len(train_loader)  # before any skip
    # the clips an epoch trains on, over the processes (each shard padded to the same length)
    samples = (niter * args.batch_size_per_gpu if train_loader.drop_last else train_loader.sampler.num_samples
               ) * utils.get_world_size()
    optimizer, scheduler = build_probe_optimizer(classifier, args)
    run = probe_run(args, cfg, train_set, val_set)

    start_epoch, start_iter, epoch_meters, best_acc, val_ids, train_replaced, epoch_log = resume_probe(
        ckpt_path, classifier.module if distributed else classifier, optimizer, scheduler, fingerprint, run,
        train_set, args)
    if utils.is_main_process():
        run_dir.tidy_epoch_log(args.output_dir, start_epoch)
    run_dir.write_missing_epoch_line(args.output_dir, epoch_log)
    write_config(args, evaluate_only)

    save = functools.partial(save_checkpoint, ckpt_path, classifier, optimizer, scheduler, args, fingerprint, run,
                             train_set)
    # A stop signal saves the training done and exits with status 3 (README "Reliability").
    with preemption.StopSignals(ignore_after_stop=exit_after_stop) as stop:
        for epoch in range(start_epoch, args.epochs):
            resumed = epoch == start_epoch and start_iter > 0
            train_loader.sampler.set_epoch(epoch)
            train_loader.sampler.skip = start_iter * args.batch_size_per_gpu if resumed else 0
            save_mid_epoch = functools.partial(save, epoch, best_acc, epoch_iterations=niter)
            train_stats, own_meters = train_one_epoch(model, classifier, optimizer, train_loader, epoch, niter, args,
                                                      device, start_iter=start_iter if resumed else 0,
                                                      epoch_meters=epoch_meters if resumed else None,
                                                      save_mid_epoch=save_mid_epoch, stop=stop)
            train_replaced = train_stats["replaced_samples"]
            warning = replaced_warning(f"Epoch {epoch}", train_replaced, samples, train_set)
            if warning:
                print(warning)
            log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
            if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
                # a stop here keeps the epoch's training: a checkpoint after its last iteration, as a stop there
                check = preemption.stop_check(stop, ckpt_path, epoch, niter, f"the validation of epoch {epoch}",
                                              functools.partial(save_mid_epoch, iteration=niter,
                                                                epoch_meters=own_meters))
                with keeping_the_epoch(functools.partial(save_mid_epoch, iteration=niter,
                                                                    epoch_meters=own_meters), ckpt_path, epoch):
                    test_stats, val_ids = validate_network(model, classifier, val_set, args, device, check)
                best_acc = max(best_acc, test_stats["acc1"])
                print(f"Accuracy at epoch {epoch} of the network on the {len(val_set) - len(val_ids)} val clips: "
                      f"{test_stats['acc1']:.1f}%  (max {best_acc:.2f}%); skipped videos: {len(val_ids)}")
                log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
            with warnings.catch_warnings():  # after a resume past epoch 0's last step no optimizer step came first
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            save(epoch + 1, best_acc, skipped={"train": train_replaced, "val": sorted(val_ids)}, epoch_log=log_stats)
            utils.write_epoch_log(args.output_dir, log_stats)

        check = preemption.stop_check(stop, ckpt_path, args.epochs - 1, niter, "the multi-view test")
        stats, test_ids = final_test(model, classifier, test_set, args, device, check)
    stats["best_acc"] = best_acc
    stats = with_unreadable_counts(stats, train_replaced, val_ids, test_ids, val_set, test_set)
    stats["sequential_decodes"] = sequential_decodes(*(d for d in (train_set, val_set, test_set) if d is not None))
    print(f"Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy (best single view): {best_acc:.1f}")
    utils.write_epoch_log(args.output_dir, {f"test_{k}": v for k, v in stats.items()})
    _write_results(args, test_set, stats)
    return stats


def load_trained_classifier(path: str, own: bool) -> dict:
    """The checkpoint.pth.tar that --evaluate scores (the run's own, `own`, or --lc_pretrained_weights), checked to
    hold a classifier; a note says how much training a mid-epoch one holds."""
    if not os.path.isfile(path) and not own:
        raise FileNotFoundError(f"--lc_pretrained_weights {path}: no such file; pass the checkpoint.pth.tar of an "
                                "eval_linear.py run.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--evaluate: no trained classifier at {path}; train one first or pass "
                                "--lc_pretrained_weights.")
    trained = run_dir.read_own_checkpoint(path, True, (RESULTS_NAME,)) if own else safe_torch_load(path)
    if not isinstance(trained, dict) or "state_dict" not in trained:
        raise KeyError(f"{path} has no 'state_dict' entry; pass a checkpoint.pth.tar of eval_linear.py.")
    if "iteration" in trained:
        print(mid_epoch_note(trained, path))
    return trained


def evaluate_trained(model, classifier, fingerprint: str, trained: dict, path: str, val_set, test_set, args,
                     device) -> dict:
    """--evaluate: the classifier of `trained` (read from `path`) on the features of its own backbone (`fingerprint`
    checked), scored on one val clip and the multi-view test clips of each video; written to linear_results.json."""
    check_same_backbone(trained.get("backbone"), fingerprint, path, args.pretrained_weights)
    check_evaluated_split(trained.get("run"), test_set.lists, path)
    load_classifier_state(classifier, trained["state_dict"], path)
    write_config(args, evaluate_only=True)
    val_stats, val_ids = validate_network(model, classifier, val_set, args, device)
    test_stats, test_ids = final_test(model, classifier, test_set, args, device)
    print(f"Single-view val top-1: {val_stats['acc1']:.2f}; skipped videos: {len(val_ids)}")
    stats = with_unreadable_counts({**val_stats, **test_stats}, 0, val_ids, test_ids, val_set, test_set)
    stats["sequential_decodes"] = sequential_decodes(val_set, test_set)
    _write_results(args, test_set, stats)
    return stats


def resume_probe(path: str, classifier: nn.Module, optimizer, scheduler, fingerprint: str, run: dict, train_set,
                 args) -> tuple[int, int, list[dict] | None, float, set[int], int, dict | None]:
    """Where training starts: (epoch, iteration, the interrupted epoch's meters, best top-1, the val videos its last
    validation left out, the draws its last epoch replaced, the log record of the epoch an epoch-end checkpoint
    ended), the two before last for the summary when no epoch is left.
    From scratch without `path` (this run's checkpoint.pth.tar); else from that checkpoint, checked to be of this
    backbone and run, whose state the classifier (not DDP-wrapped), optimizer and scheduler get."""
    if not os.path.isfile(path):
        return 0, 0, None, 0.0, set(), 0, None
    ckpt = run_dir.read_own_checkpoint(path, True, (RESULTS_NAME,))
    check_same_backbone(ckpt.get("backbone"), fingerprint, path, args.pretrained_weights)
    check_same_run(ckpt.get("run"), run, path, "linear probe", "eval_linear.sh: EXP_NAME=... or OUTPUT_DIR=...")
    load_classifier_state(classifier, ckpt["state_dict"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    epoch, best_acc = ckpt["epoch"], ckpt["best_acc"]
    skipped = ckpt.get("skipped_videos", {"train": 0, "val": []})
    # a mid-epoch checkpoint (--saveckp_iters or a stop signal): `iteration` batches of `epoch` done
    iteration = resume_start_iteration(ckpt.get("iteration", 0), ckpt.get("args"), args.batch_size_per_gpu,
                                       utils.get_world_size(), what=f"epoch {epoch}")
    restore_sequential_videos(train_set, ckpt.get("sequential_videos"))
    print(f"Resumed from {path}: epoch {epoch} from iteration {iteration}, best top-1 {best_acc:.2f}")
    return (epoch, iteration, ckpt.get("epoch_meters"), best_acc, set(skipped["val"]), skipped["train"],
            None if iteration else ckpt.get("epoch_log"))


def write_config(args, evaluate_only: bool) -> None:
    """The run's arguments, written once the checkpoint it continues or evaluates was accepted (a refused run
    leaves the folder's record alone): config.json, an earlier training start's that differs kept
    (run_dir.write_config_files), or config_evaluate.json beside it, the last evaluation's (as linear_results.json)."""
    if not utils.is_main_process():
        return
    if evaluate_only:
        with open(os.path.join(args.output_dir, "config_evaluate.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    else:
        run_dir.write_config_files(args.output_dir, {"config.json": json.dumps(vars(args), indent=2)})


def mid_epoch_note(trained: dict, path: str) -> str:
    """What --evaluate of a mid-epoch checkpoint (a stop signal, a kill after a --saveckp_iters save, or a run
    still training) evaluates: how much of which epoch it holds, and whether the classifier's training is done
    (a stop in the last epoch's validation saves after its last iteration)."""
    epoch, done, niter = trained["epoch"], trained["iteration"], trained.get("epoch_iterations")
    epochs = getattr(trained.get("args"), "epochs", None)
    held = f"{done} of {niter} iterations" if niter else f"{done} iterations"
    where = f"epoch {epoch}" + (f" (of {epochs}, counted from 0)" if epochs else "")
    if niter and done >= niter and epochs and epoch == epochs - 1:
        return (f"Note: {path} holds all {niter} iterations of the last epoch ({epoch}); the run that wrote it "
                "stopped in that epoch's validation: the classifier's training is complete.")
    return (f"Note: {path} holds {held} of {where}, written by a run that stopped, was killed or is still "
            "training: evaluating a partly trained classifier; rerun without --evaluate to finish its training.")


def build_probe_optimizer(classifier: nn.Module, args):
    """The original's probe optimisation: SGD (momentum 0.9, no weight decay) at lr x global batch / 256,
    cosine-annealed to 0 over the epochs (the scheduler is stepped once per epoch)."""
    lr = args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.0
    optimizer = torch.optim.SGD(classifier.parameters(), lr, momentum=0.9, weight_decay=0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)


def build_train_loader(train_set, args, device: torch.device) -> DataLoader:
    """Shuffled per epoch (--seed), every clip drawn under its own seed (datasets/seeding.py), so a mid-epoch
    resume that skips the consumed batches (`sampler.skip`) draws the same clips; no drop_last (as the original)
    unless --feature_bn would leave a last batch of one clip (no batch statistics)."""
    sampler = SeededDistributedSampler(train_set, shuffle=True, seed=args.seed)
    drop_last = args.feature_bn and len(sampler) % args.batch_size_per_gpu == 1
    return WatchedLoader(SeededDataset(train_set), sampler=sampler, batch_size=args.batch_size_per_gpu,
                         num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=drop_last,
                         worker_init_fn=utils.seed_worker, decode_timeout=args.decode_timeout)


def train_one_epoch(model, classifier, optimizer, loader, epoch: int, niter: int, args, device, start_iter: int = 0,
                    epoch_meters: list[dict] | None = None, save_mid_epoch=None,
                    stop: preemption.StopSignals | None = None) -> tuple[dict, dict]:
    """One epoch over the loader's `niter` batches (from `start_iter` when resuming mid-epoch, with the
    `epoch_meters` of the interrupted part, so the means cover the whole epoch). `save_mid_epoch(iteration=,
    epoch_meters=)` writes the mid-epoch checkpoint at each preemption.is_save_step (--saveckp_iters). A `stop`
    signal on any rank ends the epoch at the same iteration on every rank (checked every preemption.CHECK_EVERY
    iterations and at the last): the same save (one, also at a save step), then preemption.Preempted. Returns the
    epoch means with `replaced_samples` (the draws replaced because their video could not be read), and this rank's
    share of them for a checkpoint (`epoch_meters`)."""
    stop = stop if stop is not None else preemption.StopSignals(())
    classifier.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    replaced = torch.zeros((), dtype=torch.long)
    if epoch_meters is not None:
        replaced += restore_epoch_meters(metric_logger, epoch_meters)
    for it, (frames, target, _, meta) in enumerate(
            metric_logger.log_every(loader, 20, header, total=niter, start=start_iter), start=start_iter):
        replaced += meta["skipped"].sum()
        frames = to_device(frames, device)
        target = target.to(device, non_blocking=True)
        with torch.no_grad():
            features = clip_features(model, frames, args.n_last_blocks, args.avgpool_patchtokens)
        loss = nn.functional.cross_entropy(classifier(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss.detach())  # read back when a progress line is printed: no sync per step
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        stop_now = preemption.is_check_step(it + 1, niter) and stop.requested()[0]
        if stop_now or preemption.is_save_step(it + 1, niter, args.saveckp_iters):
            save_mid_epoch(iteration=it + 1, epoch_meters={"meters": metric_logger.totals(), "skipped": int(replaced)})
        if stop_now:
            preemption.finish(preemption.stop_message(stop.names(), epoch, it + 1, niter,
                                                      os.path.join(args.output_dir, CHECKPOINT_NAME)), stop)
    own = {"meters": metric_logger.totals(), "skipped": int(replaced)}
    metric_logger.synchronize_between_processes()
    if utils.get_world_size() > 1:
        replaced = replaced.to(device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(replaced)
    print("Averaged stats:", metric_logger.global_averages(),
          f" replaced samples (unreadable videos): {int(replaced)}")
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    return {**stats, "replaced_samples": int(replaced)}, own


def save_checkpoint(path: str, classifier: nn.Module, optimizer, scheduler, args, fingerprint: str, run: dict,
                    train_set, epoch: int, best_acc: float, iteration: int = 0, epoch_iterations: int | None = None,
                    epoch_meters: dict | None = None, skipped: dict | None = None, epoch_log: dict | None = None
                    ) -> None:
    """checkpoint.pth.tar, written atomically by rank 0: the classifier, its optimizer and scheduler, the
    backbone's `fingerprint` and the probe's `run` (a resume checks both) and the `train_set` videos decoded
    sequentially so far. At an epoch end `epoch` is the next epoch to run and `skipped` the draws its training
    replaced (a count, "train") and the videos its last validation left out (ids, "val"), which the final summary
    reports, and `epoch_log` the ended epoch's log.txt record (a resume writes it if a kill left it out). A mid-epoch
    save
    (`iteration` batches of `epoch` done, this rank's `epoch_meters`) adds what an exact resume needs:
    `iteration`, every rank's running meters and `args` (the global batch), and the epoch's `epoch_iterations` for
    --evaluate's note. Every rank calls it (parts are gathered from all ranks)."""
    state = {"epoch": epoch, "state_dict": classifier.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "best_acc": best_acc, "backbone": fingerprint, "run": run,
             "pretrained_weights": args.pretrained_weights,
             "sequential_videos": checkpoint_sequential_videos(train_set)}
    if skipped is not None:
        state["skipped_videos"] = skipped
    if epoch_log is not None:
        state["epoch_log"] = epoch_log
    if iteration:
        state.update(iteration=iteration, epoch_iterations=epoch_iterations,
                     epoch_meters=gather_objects(epoch_meters), args=args)
    if utils.is_main_process():
        atomic_save(state, path)


@torch.no_grad()
def validate_network(model, classifier, dataset, args, device, check_stop=None) -> tuple[dict, set[int]]:
    """Single-view accuracy: one clip per video; undecodable videos (label -1) are left out and returned."""
    logits, labels = clip_logits(model, classifier, dataset, args, device, check_stop)
    skipped = unreadable_videos(dataset, labels)
    return single_view_stats(logits, labels, args.num_labels), skipped


@torch.no_grad()
def validate_network_multi_view(model, classifier, dataset, args, device, check_stop=None) -> tuple[dict, set[int]]:
    """Per-video accuracy over NUM_ENSEMBLE_VIEWS x NUM_SPATIAL_CROPS clips, aggregated by `args.ensemble`;
    also the videos without any decoded clip."""
    logits, returned = clip_logits(model, classifier, dataset, args, device, check_stop)
    skipped = unreadable_videos(dataset, returned)
    return multi_view_stats(logits, returned, dataset_labels(dataset), dataset.num_clips_per_video, args.ensemble,
                            args.num_labels), skipped


def final_test(model, classifier, test_set, args, device, check_stop=None) -> tuple[dict, set[int]]:
    stats, skipped = validate_network_multi_view(model, classifier, test_set, args, device, check_stop)
    print(f"Multi-view test ({stats['num_clips_per_video']} clips x {stats['num_videos']} videos, "
          f"{args.ensemble}): top-1 {stats['multiview_acc1']:.2f}"
          + (f", top-5 {stats['multiview_acc5']:.2f}" if "multiview_acc5" in stats else "")
          + f"; skipped videos (unreadable, left out): {stats['multiview_skipped_videos']}")
    return stats, skipped


class LinearClassifier(nn.Module):
    """One linear layer on the flattened features (weight N(0, 0.01), bias 0), optionally after a parameter-free
    BatchNorm (`feature_bn`, MAE's linear probe; its running statistics are saved as `feature_bn.*`)."""

    def __init__(self, dim: int, num_labels: int = 1000, feature_bn: bool = False):
        super().__init__()
        self.num_labels = num_labels
        self.feature_bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if feature_bn else None
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        if self.feature_bn is not None:
            x = self.feature_bn(x)
        return self.linear(x)


def check_same_backbone(saved: str | None, fingerprint: str, path: str, pretrained_weights: str) -> None:
    """A classifier is only scored on the backbone it was trained on (`backbone_fingerprint`; a file without one,
    the original SVT's checkpoint.pth.tar or an older svt one, cannot tell and passes). Otherwise resuming or
    testing it would report its numbers as this checkpoint's."""
    if saved is not None and saved != fingerprint:
        raise ValueError(f"{path} is a linear classifier trained on the features of another backbone than "
                         f"--pretrained_weights {pretrained_weights or '(none: random init)'}; resuming or testing it "
                         "would report its scores for this checkpoint. Give this evaluation its own --output_dir "
                         f"(eval_linear.sh: EXP_NAME=... or OUTPUT_DIR=...), or delete "
                         f"{run_dir.delete_to_restart(path, (RESULTS_NAME,))} to train a new one.")


def probe_run(args, cfg, train_set, val_set) -> dict:
    """What a probe's score depends on besides the backbone, saved in its checkpoint (`run`, checked on resume):
    the dataset and its train/val lists (SSv2: and annotation JSONs), the classes, the hyper-parameters of its
    training and validation and the clip keys. Not the batch size or process count: a resume may change them
    (resume_start_iteration)."""
    flags = ("dataset", "num_labels", "lr", "epochs", "n_last_blocks", "avgpool_patchtokens", "feature_bn",
             "slowfast_eval", "seed")
    return run_record(args, cfg, flags, split_files(train=train_set, val=val_set))


def load_classifier_state(classifier: LinearClassifier, state: dict, path: str) -> None:
    """Load `linear.*` (or DDP's `module.linear.*`) weights; a shape mismatch is an error naming the fix."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = classifier.state_dict()
    if set(state) != set(expected):
        if all(k.startswith("feature_bn.") for k in set(state) ^ set(expected)):
            has = any(k.startswith("feature_bn.") for k in state)
            raise KeyError(f"{path} was trained {'with' if has else 'without'} --feature_bn: pass "
                           f"--feature_bn {has} to evaluate it.")
        raise KeyError(f"{path}: expected the keys {sorted(expected)} of a linear classifier, found "
                       f"{sorted(state)[:6]}. Pass a checkpoint.pth.tar written by eval_linear.py.")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but this run builds "
                             f"{tuple(expected[key].shape)} (num_labels x feature dim): a classifier of another run "
                             "(another dataset or list, --num_labels, --n_last_blocks, --avgpool_patchtokens or "
                             "--arch). To resume or evaluate it, rerun the command that trained it; for this run, "
                             "use another --output_dir (eval_linear.sh: EXP_NAME=...) or --lc_pretrained_weights.")
    classifier.load_state_dict(state)


def clip_logits(model: nn.Module, classifier: nn.Module, dataset, args, device: torch.device,
                check_stop=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_clips, C) classifier logits and (N_clips,) returned labels (-1: undecodable) of every clip, each
    rank its shard, gathered in index order on every rank; `check_stop`: see extract_features_and_labels. The
    progress lines say "Val:" or "Test:" (the multi-view test), by the dataset's mode."""
    classifier.eval()
    head = classifier.module if hasattr(classifier, "module") else classifier

    def score(frames):
        return head(clip_features(model, frames, args.n_last_blocks, args.avgpool_patchtokens))

    loader = make_loader(ReturnIndexLabelDataset(dataset), args.batch_size_per_gpu, args.num_workers,
                         args.decode_timeout)
    return extract_features_and_labels(score, loader, device, check_stop, "Test:" if dataset.mode == "test" else "Val:")


def with_unreadable_counts(stats: dict, train_replaced: int, val_ids: set[int], test_ids: set[int], val_set,
                           test_set) -> dict:
    """`stats` with the unreadable videos: train_replaced_samples (`train_replaced`: the draws of the last epoch
    replaced, not videos), val_skipped_videos (`val_ids`) and skipped_videos, each val/test video left out once
    (the multi-view test of UCF-101/HMDB-51 reads the val list: a video left out of both counts once)."""
    same_list = val_set.list_file == test_set.list_file
    evaluated = len(val_ids | test_ids) if same_list else len(val_ids) + len(test_ids)
    return {**stats, "train_replaced_samples": train_replaced, "val_skipped_videos": len(val_ids),
            "skipped_videos": evaluated}


def _write_results(args, test_set, stats: dict) -> None:
    if utils.is_main_process():
        with open(os.path.join(args.output_dir, RESULTS_NAME), "w") as f:
            json.dump({"dataset": args.dataset, "split": test_set.lists.split,
                       "pretrained_weights": args.pretrained_weights, "ensemble": args.ensemble,
                       "slowfast_eval": args.slowfast_eval, **stats}, f, indent=2)
    if utils.is_dist_avail_and_initialized():
        dist.barrier()


if __name__ == "__main__":
    utils.line_buffered_output()
    args = argparse.ArgumentParser("Linear evaluation of video features", parents=[get_args_parser()]).parse_args()
    with utils.named_rank_failures(args.dist_timeout):
        eval_linear(args, exit_after_stop=True)
