"""Weighted k-NN classification on frozen SVT features (DINO's protocol on video clips).

Train and test clips go through the frozen backbone; their L2-normalised CLS features form a bank and
queries. Each query votes with its k most similar train features, weighted by exp(cos / T).
A video that cannot be decoded comes back from the dataset with label -1 (see datasets/video_dataset.py):
it is left out of the bank and of the queries, and counted as "skipped_videos".

    torchrun --nproc_per_node=1 eval_knn.py --arch vit_base --pretrained_weights ckpt.pth \
        --nb_knn 5 --dataset ucf101 --opts DATA.PATH_TO_DATA_DIR data/ucf101/knn_splits \
        DATA.PATH_PREFIX data/ucf101/videos
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from datasets import DATASETS, build_dataset
from datasets.video_dataset import sequential_decodes
from models import ARCHS
from utils import utils
from utils.evaluation import (ReturnIndexLabelDataset, build_train_bank_dataset, describe_split, drop_unreadable,
                              extract_features_and_labels, load_backbone, make_loader, note_ssl_view_keys, run_knn,
                              single_clip_config, unreadable_advice)
from utils.parser import add_config_args, check_clip_sizes, load_config

DUMP_NAMES = ("trainfeat", "testfeat", "trainlabels", "testlabels")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on video features", add_help=False)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Clips per GPU during extraction.")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Numbers of nearest neighbours (one accuracy per k). The original script uses 5.")
    parser.add_argument("--temperature", default=0.07, type=float, help="Temperature of the exp(cos / T) votes.")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Checkpoint to evaluate: a full train_ssl.py checkpoint.pth, the released flat "
                             "file, a TimeSformer `model_state` file or a bare backbone dict. Empty: random init "
                             "(a warning is printed), or the ImageNet init of TIMESFORMER.PRETRAINED_MODEL (a "
                             "baseline).")
    parser.add_argument("--use_cuda", default=True, type=utils.bool_flag,
                        help="Keep the feature bank and the similarity on the GPU (when there is one).")
    parser.add_argument("--arch", default="vit_base", type=str, choices=ARCHS,
                        help="Backbone: timesformer / vit_base (TimeSformer-B, the paper's), vit_small, "
                             "vit_tiny. The original always built TimeSformer-B whatever this said.")
    parser.add_argument("--patch_size", default=16, type=int,
                        help="Patch side of the backbone in pixels: the train_ssl.py --patch_size it was "
                             "pretrained with (16 for the released checkpoint).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Entry of a full training checkpoint to evaluate ("teacher" or "student").')
    parser.add_argument("--train_aug", default=False, type=utils.bool_flag,
                        help="False (default): the train bank uses the deterministic val-style clip of each "
                             "train video (centre clip, test transform), as DINO's kNN does; the result is "
                             "reproducible. True: randomly augmented train clips, the original SVT behaviour "
                             "(changes from run to run).")
    parser.add_argument("--dump_features", default=None,
                        help="Directory where trainfeat.pth, testfeat.pth, trainlabels.pth and "
                             "testlabels.pth are saved (an earlier dump's four files there are deleted first).")
    parser.add_argument("--load_features", default=None,
                        help="Directory with the four files of --dump_features; skips the extraction.")
    parser.add_argument("--num_workers", default=10, type=int,
                        help="DataLoader worker processes per GPU (decoding is CPU-bound).")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the random-init backbone (no --pretrained_weights).")
    parser.add_argument("--dataset", default="ucf101", type=str, choices=DATASETS,
                        help="Evaluation dataset (train split = bank, val split = queries; ssv2: a --train_aug bank "
                             "without flips, DATASET_OPTS in utils/parser.py).")
    parser.add_argument("--output_dir", default=".", type=str, help="Where knn_results.json is written.")
    utils.add_distributed_args(parser)
    add_config_args(parser)
    return parser


def main(args) -> dict | None:
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    cfg = load_config(args)
    if not args.load_features:  # clips are decoded
        check_clip_sizes(cfg, args.patch_size, train_clips=args.train_aug)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    note_ssl_view_keys(cfg)
    device = utils.default_device()
    utils.check_writable_dir(args.output_dir)
    if args.dump_features:
        utils.check_writable_dir(args.dump_features, "--dump_features")
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_dumped_features(args.load_features)
        sequential = 0
        splits = [(f"the {split} split dumped in --load_features {args.load_features}",
                   "they were dumped so: fix the data, then extract the features again (--dump_features)")
                  for split in ("train", "val")]
    else:
        train_features, test_features, train_labels, test_labels, sequential, splits = \
            extract_feature_pipeline(args, cfg, device)
    # Every rank holds the same gathered labels, so every rank drops the same rows.
    train_features, train_labels, skipped_train = drop_unreadable(train_features, train_labels, *splits[0])
    test_features, test_labels, skipped_test = drop_unreadable(test_features, test_labels, *splits[1])
    skipped = skipped_train + skipped_test
    print(f"Skipped videos (unreadable, left out): {skipped} ({skipped_train} of the train bank, "
          f"{skipped_test} of the val queries).")
    results = None
    if utils.is_main_process():
        knn_device = device if args.use_cuda else torch.device("cpu")
        acc = run_knn(train_features, test_features, train_labels, test_labels, args.nb_knn,
                      args.temperature, knn_device)
        results = {
            "dataset": args.dataset, "pretrained_weights": args.pretrained_weights,
            "checkpoint_key": args.checkpoint_key, "temperature": args.temperature,
            "train_aug": args.train_aug, "num_train": int(train_features.shape[0]),
            "num_test": int(test_features.shape[0]), "skipped_videos": skipped, "sequential_decodes": sequential,
            "train_skipped_videos": skipped_train, "val_skipped_videos": skipped_test,
            "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in acc.items()},
        }
        with open(os.path.join(args.output_dir, "knn_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if utils.is_dist_avail_and_initialized():
        dist.barrier()
    return results


def extract_feature_pipeline(args, cfg, device: torch.device):
    """L2-normalised CLS features and returned labels of the train bank and the val queries (rows in list
    order; label -1 marks an unreadable video), dumped to --dump_features when set; also the number of videos
    decoded sequentially and the two splits' (name, advice when unreadable): describe_split, unreadable_advice."""
    cfg = single_clip_config(cfg)
    dataset_train = ReturnIndexLabelDataset(build_train_bank_dataset(args.dataset, cfg, args.train_aug))
    dataset_val = ReturnIndexLabelDataset(build_dataset(args.dataset, cfg, "val"))
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val clips.")
    model = load_backbone(args.arch, cfg, device, args.pretrained_weights, args.checkpoint_key, args.patch_size)
    train_loader, val_loader = (make_loader(d, args.batch_size_per_gpu, args.num_workers)
                                for d in (dataset_train, dataset_val))
    print("Extracting features for the train set...")
    train_features, train_labels = extract_features_and_labels(model, train_loader, device)
    print("Extracting features for the val set...")
    test_features, test_labels = extract_features_and_labels(model, val_loader, device)
    train_features = F.normalize(train_features, dim=1, p=2)
    test_features = F.normalize(test_features, dim=1, p=2)
    sequential = sequential_decodes(dataset_train, dataset_val)
    print(f"Videos decoded sequentially (random access not trusted on them): {sequential}.")
    # Dumped rows stay aligned with the list lines; skipped videos keep label -1 (dropped in main).
    if args.dump_features and utils.is_main_process():
        dump_features(args.dump_features, (train_features, test_features, train_labels, test_labels))
    splits = [(describe_split(d), unreadable_advice(d)) for d in (dataset_train, dataset_val)]
    return train_features, test_features, train_labels, test_labels, sequential, splits


def dump_features(folder: str, tensors: tuple[torch.Tensor, ...]) -> None:
    """The four tensors of --dump_features (train/test features, train/test labels) as one set: an earlier dump's
    files go first, so a dump cut short (a kill, a full disk) leaves some missing, which --load_features names,
    never this run's train features beside an earlier run's (another backbone's) test features."""
    os.makedirs(folder, exist_ok=True)
    for name in DUMP_NAMES:
        if os.path.isfile(os.path.join(folder, f"{name}.pth")):
            os.remove(os.path.join(folder, f"{name}.pth"))
    for name, tensor in zip(DUMP_NAMES, tensors):
        torch.save(tensor.cpu(), os.path.join(folder, f"{name}.pth"))


def load_dumped_features(folder: str):
    """The four tensors of --dump_features: train/test features, train/test labels."""
    tensors = []
    for name in DUMP_NAMES:
        path = os.path.join(folder, f"{name}.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load_features {folder}: {name}.pth is missing (written by "
                                    "--dump_features; a dump cut short leaves some of its files out: extract the "
                                    "features again).")
        tensors.append(torch.load(path, map_location="cpu", weights_only=True))
    return tuple(tensors)


if __name__ == "__main__":
    utils.line_buffered_output()
    args = argparse.ArgumentParser("Evaluation with weighted k-NN on video features",
                                   parents=[get_args_parser()]).parse_args()
    with utils.named_rank_failures(args.dist_timeout):
        main(args)
