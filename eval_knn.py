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
import glob
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from datasets import DATASETS, build_dataset, dataset_lists
from datasets.video_dataset import sequential_decodes, ssv2_annotation_files
from models import ARCHS
from utils import utils
from utils.checkpoint import atomic_save, atomic_write_text
from utils.evaluation import (ReturnIndexLabelDataset, backbone_fingerprint, build_train_bank_dataset, describe_split,
                              drop_unreadable, extract_features_and_labels, load_backbone, make_loader,
                              note_ssl_view_keys, run_differences, run_knn, run_record, single_clip_config,
                              unreadable_advice)
from utils.parser import LISTS_FROM_OPTS, add_config_args, add_dropped_args, check_clip_sizes, load_config

DUMP_NAMES = ("trainfeat", "testfeat", "trainlabels", "testlabels")
RECORD_NAME = "dump_record.json"  # what a dump's features are of (dump_record), beside its four files


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
                             "testlabels.pth are saved (torch.load reads each), with dump_record.json: the "
                             "checkpoint, its fingerprint, the lists, the clip keys and the row counts they are of "
                             "(an earlier dump's files there are deleted first).")
    parser.add_argument("--load_features", default=None,
                        help="Directory with the files of --dump_features; skips the extraction. The dump must "
                             "be of this run's lists, clip keys, --dataset and --train_aug and, with "
                             "--pretrained_weights, of those weights, else an error; without --pretrained_weights "
                             "the dump's checkpoint is evaluated (named in the output).")
    parser.add_argument("--num_workers", default=10, type=int,
                        help="DataLoader worker processes per GPU (decoding is CPU-bound).")
    utils.add_decode_timeout_arg(parser)
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the random-init backbone (no --pretrained_weights).")
    parser.add_argument("--dataset", default="ucf101", type=str, choices=DATASETS,
                        help="Evaluation dataset (train split = bank, val split = queries; ssv2: a --train_aug bank "
                             "without flips, DATASET_OPTS in utils/parser.py).")
    parser.add_argument("--output_dir", default=".", type=str, help="Where knn_results.json is written.")
    utils.add_distributed_args(parser)
    add_dropped_args(parser, {"--data_path": LISTS_FROM_OPTS})
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
    source = {"pretrained_weights": args.pretrained_weights, "checkpoint_key": args.checkpoint_key}
    if args.load_features:
        tensors, record = load_dumped_features(args.load_features)
        source = check_dump(args.load_features, record, tensors, args, cfg, device)
        train_features, test_features, train_labels, test_labels = tensors
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
        print(f"k-NN classification on {knn_device.type}"
              f"{' (--use_cuda: no GPU here)' if args.use_cuda and knn_device.type != 'cuda' else ''}.")
        acc = run_knn(train_features, test_features, train_labels, test_labels, args.nb_knn,
                      args.temperature, knn_device)
        results = {
            "dataset": args.dataset, "split": dataset_lists(args.dataset, cfg.DATA.SPLIT).split, **source,
            "temperature": args.temperature, "train_aug": args.train_aug, "num_train": int(train_features.shape[0]),
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
    train_loader, val_loader = (make_loader(d, args.batch_size_per_gpu, args.num_workers, args.decode_timeout)
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
        record = dump_record(args, cfg, backbone_fingerprint(model), len(train_labels), len(test_labels))
        dump_features(args.dump_features, (train_features, test_features, train_labels, test_labels), record)
    splits = [(describe_split(d), unreadable_advice(d)) for d in (dataset_train, dataset_val)]
    return train_features, test_features, train_labels, test_labels, sequential, splits


def dump_lists(dataset: str, cfg) -> dict[str, str]:
    """The files a kNN's labels come from ({name: path}, as utils.evaluation.split_files names them): the train
    and val lists in DATA.PATH_TO_DATA_DIR and, for SSv2, its annotation JSONs. Read from the config alone: a
    --load_features run builds no dataset."""
    root, lists = cfg.DATA.PATH_TO_DATA_DIR, dataset_lists(dataset, cfg.DATA.SPLIT)
    files = {"train list": os.path.join(root, lists.train), "val list": os.path.join(root, lists.val)}
    if lists.frame_folders:
        files.update({**ssv2_annotation_files(root, "train"), **ssv2_annotation_files(root, "val")})
    return files


DUMP_FLAGS = ("dataset", "train_aug")  # the run_record flags a dump's features depend on


def dump_record(args, cfg, fingerprint: str, num_train: int, num_test: int) -> dict:
    """What the features of a dump are of, saved beside them (RECORD_NAME) and checked by check_dump: the
    checkpoint (--pretrained_weights, --checkpoint_key, TIMESFORMER.PRETRAINED_MODEL without one) with the
    backbone's `fingerprint` (utils.evaluation.backbone_fingerprint, as a probe's checkpoint records it), the `run`
    (utils.evaluation.run_record, as a probe's: --dataset, --train_aug, the clip keys and the lists' digests) and the
    rows of each split."""
    return {"pretrained_weights": args.pretrained_weights, "checkpoint_key": args.checkpoint_key,
            "TIMESFORMER.PRETRAINED_MODEL": cfg.TIMESFORMER.PRETRAINED_MODEL, "backbone": fingerprint,
            "arch": args.arch, "patch_size": args.patch_size,
            "run": run_record(args, cfg, DUMP_FLAGS, dump_lists(args.dataset, cfg)),
            "num_train": num_train, "num_test": num_test}


def dump_features(folder: str, tensors: tuple[torch.Tensor, ...], record: dict) -> None:
    """The four tensors of --dump_features (train/test features, train/test labels) as one set with their
    `record` (dump_record): an earlier dump's files go first, the record is written before the tensors, and each
    file atomically (utils.checkpoint.atomic_save), so a dump cut short (a kill, a full disk) leaves some of them
    missing, which --load_features names, never a partial file nor this run's train features beside an earlier
    run's (another backbone's) test features."""
    os.makedirs(folder, exist_ok=True)
    for name in [f"{name}.pth" for name in DUMP_NAMES] + [RECORD_NAME]:
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
        for tmp in glob.glob(os.path.join(glob.escape(folder), f".{name}.*.tmp")):  # of a killed dump
            os.remove(tmp)
    atomic_write_text(json.dumps(record, indent=2) + "\n", os.path.join(folder, RECORD_NAME))
    for name, tensor in zip(DUMP_NAMES, tensors):
        atomic_save(tensor.cpu(), os.path.join(folder, f"{name}.pth"))


def load_dumped_features(folder: str) -> tuple[tuple[torch.Tensor, ...], dict | None]:
    """The four tensors of --dump_features (train/test features, train/test labels) and the dump's record (None
    for a dump of an older svt, which has none)."""
    tensors = []
    for name in DUMP_NAMES:
        path = os.path.join(folder, f"{name}.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load_features {folder}: {name}.pth is missing (written by "
                                    "--dump_features; a dump cut short leaves some of its files out: extract the "
                                    "features again).")
        tensors.append(torch.load(path, map_location="cpu", weights_only=True))
    record_path = os.path.join(folder, RECORD_NAME)
    if not os.path.isfile(record_path):
        return tuple(tensors), None
    with open(record_path) as f:
        return tuple(tensors), json.load(f)


def check_dump(folder: str, record: dict | None, tensors: tuple[torch.Tensor, ...], args, cfg,
               device: torch.device) -> dict:
    """--load_features: the dump's features are scored only as what this run describes. Its files must be one
    dump's (the rows its record counts), and its record's run must match this one's (run_differences: --dataset,
    --train_aug, the clip keys, the lists found on this machine, by content) and, with --pretrained_weights (or
    TIMESFORMER.PRETRAINED_MODEL), the fingerprint of that backbone, built and loaded here. Returns the checkpoint
    the results name (the dump's when this run names none). A dump without a record (older svt) loads with a
    warning."""
    given = {"pretrained_weights": args.pretrained_weights, "checkpoint_key": args.checkpoint_key}
    files = ", ".join(f"{name}.pth" for name in DUMP_NAMES)
    if record is None:
        print(f"WARNING: --load_features {folder} has no {RECORD_NAME} (a dump of an older svt): nothing tells which "
              "checkpoint and lists its features are of, so they are scored unchecked as those of this run's "
              "arguments. Dump them again (--dump_features) to have them checked.")
        return given
    rows = {"trainfeat.pth": (tensors[0].shape[0], record["num_train"]), "testfeat.pth": (tensors[1].shape[0],
            record["num_test"]), "trainlabels.pth": (tensors[2].shape[0], record["num_train"]),
            "testlabels.pth": (tensors[3].shape[0], record["num_test"])}
    mixed = [f"{name} has {have} rows, the record {want}" for name, (have, want) in rows.items() if have != want]
    if mixed:
        raise ValueError(f"--load_features {folder}: its files are not of one dump ({'; '.join(mixed)}): files of "
                         f"another dump were copied in. Extract the features again (--dump_features {folder}).")
    lists = {name: path for name, path in dump_lists(args.dataset, cfg).items() if os.path.isfile(path)}
    differ, _ = run_differences(record["run"], run_record(args, cfg, DUMP_FLAGS, lists), "dump")
    dumped = (f"{record['pretrained_weights']} ({record['checkpoint_key']!r})" if record["pretrained_weights"] else
              record["TIMESFORMER.PRETRAINED_MODEL"] or "a random init")
    if args.pretrained_weights or cfg.TIMESFORMER.PRETRAINED_MODEL:
        fingerprint = backbone_fingerprint(load_backbone(args.arch, cfg, device, args.pretrained_weights,
                                                         args.checkpoint_key, args.patch_size))
        if fingerprint != record["backbone"]:
            ours_name = (f"{args.pretrained_weights} ({args.checkpoint_key!r})" if args.pretrained_weights else
                         cfg.TIMESFORMER.PRETRAINED_MODEL)
            differ.append(f"backbone: dump {dumped}, sha1 {record['backbone'][:12]}, this run {ours_name}, sha1 "
                          f"{fingerprint[:12]} (other weights, or the file changed since)")
    else:
        print(f"Note: --load_features {folder}: the features are of {dumped} (no --pretrained_weights given: "
              "the dump's checkpoint is evaluated).")
        given = {key: record[key] for key in given}
    if differ:
        raise ValueError(f"--load_features {folder}: its features ({files}, described by {RECORD_NAME}) are not "
                         f"those of this run: {'; '.join(differ)}. Scoring them would report them as this run's. "
                         "Pass the dump's values, or extract this run's features: drop --load_features (with "
                         "--dump_features DIR to keep them; another DIR keeps this dump).")
    return given


if __name__ == "__main__":
    utils.line_buffered_output()
    args = argparse.ArgumentParser("Evaluation with weighted k-NN on video features",
                                   parents=[get_args_parser()]).parse_args()
    with utils.named_rank_failures(args.dist_timeout):
        main(args)
