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
import math
import os
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from datasets import DATASETS, ReturnIndexDataset, build_dataset
from datasets.video_dataset import SKIPPED_LABEL
from models import ARCHS, build_backbone
from utils import utils
from utils.checkpoint import load_pretrained_weights
from utils.parser import add_config_args, load_config

# Elements of one query-chunk x bank-chunk similarity matrix (64 MiB in fp32).
SIM_BUDGET = 1 << 24
# Rows of the train bank compared at once; the running top-k is merged across bank chunks.
BANK_CHUNK = 1 << 16


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on video features", add_help=False)
    parser.add_argument("--batch_size_per_gpu", default=128, type=int, help="Clips per GPU during extraction.")
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                        help="Numbers of nearest neighbours (one accuracy per k). The original script uses 5.")
    parser.add_argument("--temperature", default=0.07, type=float, help="Temperature of the exp(cos / T) votes.")
    parser.add_argument("--pretrained_weights", default="", type=str,
                        help="Checkpoint to evaluate: a full train_ssl.py checkpoint.pth, the released flat "
                             "file, a TimeSformer `model_state` file or a bare backbone dict. Empty: a randomly "
                             "initialised backbone (a baseline; a warning is printed).")
    parser.add_argument("--use_cuda", default=True, type=utils.bool_flag,
                        help="Keep the feature bank and the similarity on the GPU (when there is one).")
    parser.add_argument("--arch", default="vit_base", type=str, choices=ARCHS,
                        help="Backbone: timesformer / vit_base (TimeSformer-B, the paper's), vit_small, "
                             "vit_tiny. The original always built TimeSformer-B whatever this said.")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help='Entry of a full training checkpoint to evaluate ("teacher" or "student").')
    parser.add_argument("--train_aug", default=False, type=utils.bool_flag,
                        help="False (default): the train bank uses the deterministic val-style clip of each "
                             "train video (centre clip, test transform), as DINO's kNN does; the result is "
                             "reproducible. True: randomly augmented train clips, the original SVT behaviour "
                             "(changes from run to run).")
    parser.add_argument("--dump_features", default=None,
                        help="Directory where trainfeat.pth, testfeat.pth, trainlabels.pth and "
                             "testlabels.pth are saved.")
    parser.add_argument("--load_features", default=None,
                        help="Directory with the four files of --dump_features; skips the extraction.")
    parser.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes per GPU (decoding is CPU-bound).")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the random-init backbone (no --pretrained_weights).")
    parser.add_argument("--dataset", default="ucf101", type=str, choices=DATASETS,
                        help="Evaluation dataset (train split = bank, val split = queries).")
    parser.add_argument("--output_dir", default=".", type=str, help="Where knn_results.json is written.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="Rendezvous address for torch.distributed (env:// reads what torchrun sets).")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Legacy torch.distributed.launch argument; torchrun's LOCAL_RANK is used instead.")
    add_config_args(parser)
    return parser


# ------------------------------------------------------------------------------------------------------
# Distributed helpers
# ------------------------------------------------------------------------------------------------------
class ShardSampler(Sampler):
    """Every `world_size`-th index from `rank`: disjoint shards covering the dataset once, no padding."""

    def __init__(self, num_samples: int, rank: int | None = None, world_size: int | None = None):
        self.num_samples = num_samples
        self.rank = utils.get_rank() if rank is None else rank
        self.world_size = utils.get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def gather_rows(local: torch.Tensor, index: torch.Tensor, total: int) -> torch.Tensor:
    """Place each rank's row `local[i]` at row `index[i]` of a (total, D) float32 CPU tensor, on every rank.

    Rows travel in chunks (bounded device memory); an index produced twice (padding duplicates) is
    harmless. Raises when some row of the result was produced by no rank.
    """
    local = local.float().cpu()
    index = index.long().cpu()
    parts = [(local, index)]
    dim = local.shape[1] if local.dim() == 2 else -1
    if utils.is_dist_avail_and_initialized():
        comm = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                else torch.device("cpu"))
        world = dist.get_world_size()
        meta = torch.tensor([local.shape[0], dim if local.shape[0] else -1], device=comm)
        metas = [torch.zeros_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta)
        longest = max(int(m[0]) for m in metas)
        dim = max(int(m[1]) for m in metas)
        local = local.reshape(-1, max(dim, 0))
        rows = max(1, SIM_BUDGET // (max(dim, 1) * world))
        parts = []
        for start in range(0, longest, rows):
            n = min(rows, longest - start)
            feats = torch.zeros(n, dim, device=comm)
            idx = torch.full((n,), -1, dtype=torch.long, device=comm)
            mine = local[start:start + n]
            feats[:mine.shape[0]] = mine.to(comm)
            idx[:mine.shape[0]] = index[start:start + n].to(comm)
            all_feats = [torch.empty_like(feats) for _ in range(world)]
            all_idx = [torch.empty_like(idx) for _ in range(world)]
            dist.all_gather(all_feats, feats)
            dist.all_gather(all_idx, idx)
            for f, i in zip(all_feats, all_idx):
                i = i.cpu()
                parts.append((f.cpu()[i >= 0], i[i >= 0]))
    if dim < 0:
        raise RuntimeError("gather_rows: no rank produced any row (empty dataset?).")
    out = torch.zeros(total, dim)
    filled = torch.zeros(total, dtype=torch.bool)
    for feats, idx in parts:
        out.index_copy_(0, idx, feats)
        filled[idx] = True
    if not bool(filled.all()):
        missing = (~filled).nonzero().flatten()[:10].tolist()
        raise RuntimeError(f"gather_rows: {int((~filled).sum())} of {total} rows were produced by no rank "
                           f"(first: {missing}); the sampler must cover the whole dataset.")
    return out


# ------------------------------------------------------------------------------------------------------
# Feature extraction and k-NN
# ------------------------------------------------------------------------------------------------------
def to_device(frames, device: torch.device):
    if isinstance(frames, (list, tuple)):
        return [f.to(device, non_blocking=True) for f in frames]
    return frames.to(device, non_blocking=True)


class ReturnIndexLabelDataset(ReturnIndexDataset):
    """(frames, index, label) of the wrapped dataset: the label is the one the dataset returned, so -1
    marks a video that could not be decoded."""

    def __getitem__(self, index: int):
        frames, label, _, _ = self.dataset[index]
        return frames, index, label


def _extract(model: Callable, loader: Iterable, device: torch.device, with_labels: bool) -> torch.Tensor:
    total = len(loader.dataset)
    metric_logger = utils.MetricLogger(delimiter="  ")
    feats, idxs = [], []
    for batch in metric_logger.log_every(loader, 10, "Extracting features:"):
        frames, index = batch[0], batch[1]
        out = model(to_device(frames, device)).float().cpu()
        if with_labels:  # the label travels as an extra column (exact in float32 for any class id)
            out = torch.cat([out, torch.as_tensor(batch[2]).float().view(-1, 1)], dim=1)
        feats.append(out)
        idxs.append(torch.as_tensor(index).long().cpu())
    local = torch.cat(feats) if feats else torch.zeros(0, 0)
    index = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long)
    return gather_rows(local, index, total)


@torch.no_grad()
def extract_features(model: Callable, loader: Iterable, device: torch.device) -> torch.Tensor:
    """(N, D) float32 CPU outputs of `model` for every sample of `loader.dataset`, rows in index order.

    `loader` yields (frames, index); with torch.distributed each rank runs its shard and the rows of all
    ranks are gathered on every rank. `frames` may be a list of clips when `model` takes one.
    """
    return _extract(model, loader, device, with_labels=False)


@torch.no_grad()
def extract_features_and_labels(model: Callable, loader: Iterable,
                                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """As `extract_features` for a loader yielding (frames, index, label) (a ReturnIndexLabelDataset):
    ((N, D) features, (N,) labels as returned by the dataset, -1 for a skipped video), both gathered in
    index order on every rank, so every rank drops the same rows."""
    rows = _extract(model, loader, device, with_labels=True)
    return rows[:, :-1].contiguous(), rows[:, -1].round().long()


def drop_skipped(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features, labels, number of rows dropped) without the rows of label -1 (undecodable videos)."""
    keep = labels != SKIPPED_LABEL
    return features[keep], labels[keep], int((~keep).sum())


@torch.no_grad()
def knn_votes(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
              k: int, T: float, num_classes: int, device: torch.device | None = None) -> torch.Tensor:
    """(N_test, num_classes) sums of exp(sim / T) over each query's k most similar train features.

    Similarities are computed in query x bank chunks (at most SIM_BUDGET elements at a time) with a running
    top-k, so neither N_test x N_train nor the whole bank on the device is ever needed.
    """
    device = train_features.device if device is None else device
    n_train = train_features.shape[0]
    k = min(k, n_train)
    bank_chunk = min(n_train, BANK_CHUNK)
    query_chunk = max(1, SIM_BUDGET // bank_chunk)
    train_labels = train_labels.to(device, torch.long)
    votes = []
    for q in range(0, test_features.shape[0], query_chunk):
        query = test_features[q:q + query_chunk].to(device, torch.float32)
        best_sim = torch.full((query.shape[0], 0), -math.inf, device=device)
        best_idx = torch.zeros((query.shape[0], 0), dtype=torch.long, device=device)
        for b in range(0, n_train, bank_chunk):
            bank = train_features[b:b + bank_chunk].to(device, torch.float32)
            sim, idx = (query @ bank.T).topk(min(k, bank.shape[0]), dim=1)
            merged = torch.cat([best_sim, sim], 1)
            best_sim, pos = merged.topk(min(k, merged.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx + b], 1).gather(1, pos)
        neighbour_labels = train_labels[best_idx]
        chunk_votes = torch.zeros(query.shape[0], num_classes, device=device)
        chunk_votes.scatter_add_(1, neighbour_labels, (best_sim / T).exp())
        votes.append(chunk_votes.cpu())
    return torch.cat(votes) if votes else torch.zeros(0, num_classes)


def top1_top5(scores: torch.Tensor, labels: torch.Tensor, max_rank: int = 5) -> tuple[float, float]:
    """Top-1 and top-`max_rank` accuracy in percent; ties between scores go to the lower class index."""
    order = scores.sort(dim=1, descending=True, stable=True).indices
    correct = order.eq(labels.long().view(-1, 1))
    n = max(1, scores.shape[0])
    top1 = correct[:, :1].sum().item() * 100.0 / n
    top5 = correct[:, :min(max_rank, scores.shape[1])].sum().item() * 100.0 / n
    return top1, top5


def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int,
                   device: torch.device | None = None) -> tuple[float, float]:
    """Weighted k-NN top-1 / top-5 accuracy (%) on L2-normalised features (DINO's classifier).

    As in DINO, top-5 counts only the first min(5, k) ranked classes (no more than k classes get votes).
    """
    votes = knn_votes(train_features, train_labels, test_features, k, T, num_classes, device)
    return top1_top5(votes, test_labels.cpu(), max_rank=min(5, k))


# ------------------------------------------------------------------------------------------------------
# Script
# ------------------------------------------------------------------------------------------------------
def load_backbone(args, cfg, device: torch.device) -> torch.nn.Module:
    """The frozen backbone of `args.arch` with `args.pretrained_weights` (any checkpoint kind) loaded."""
    model = build_backbone(args.arch, cfg)
    if args.pretrained_weights:
        summary = load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key)
        check_backbone_load(summary, args)
    else:
        print("WARNING: --pretrained_weights is empty, evaluating a randomly initialised backbone.")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_backbone_load(summary, args) -> None:
    """Evaluation needs every backbone weight from the file: missing keys (random weights) or blocks the
    model does not have (another depth) mean the checkpoint is not of `--arch`."""
    extra_blocks = [k for k in summary.unexpected if k.startswith("blocks.")]
    if summary.missing or extra_blocks:
        raise ValueError(
            f"{args.pretrained_weights} does not fit --arch {args.arch}: {len(summary.missing)} backbone "
            f"weights missing from the file {summary.missing[:4]}, {len(extra_blocks)} block weights the "
            f"model lacks {extra_blocks[:4]}. Pass the --arch (and DATA.NUM_FRAMES / crop size) the "
            f"checkpoint was trained with, or --checkpoint_key to pick its teacher/student entry.")


def dataset_labels(dataset) -> torch.Tensor:
    """Per-sample labels of a dataset (or of the dataset a ReturnIndexDataset wraps)."""
    inner = getattr(dataset, "dataset", dataset)
    return torch.as_tensor(list(inner.labels), dtype=torch.long)


def make_loader(dataset, args) -> DataLoader:
    """Sequential loader over this rank's shard (every sample once across ranks)."""
    return DataLoader(dataset, sampler=ShardSampler(len(dataset)), batch_size=args.batch_size_per_gpu, shuffle=False,
                      num_workers=args.num_workers, pin_memory=torch.cuda.is_available(), drop_last=False,
                      worker_init_fn=utils.seed_worker, persistent_workers=False)


def knn_config(cfg):
    """One clip per video, centre crop after the short-side resize (the original forces 1 spatial crop)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.NUM_SPATIAL_CROPS = 1
    cfg.TEST.NUM_ENSEMBLE_VIEWS = 1
    cfg.freeze()
    return cfg


def build_train_bank_dataset(args, cfg):
    """The train split; unless --train_aug, each video gives its val-mode clip (frame-0 window, centre crop)."""
    dataset = build_dataset(args.dataset, cfg, "train")
    if not args.train_aug:
        dataset.mode = "val"  # the list stays the train split; sampling and transform become val's
    return dataset


def extract_feature_pipeline(args, cfg, device: torch.device):
    cfg = knn_config(cfg)
    dataset_train = ReturnIndexLabelDataset(build_train_bank_dataset(args, cfg))
    dataset_val = ReturnIndexLabelDataset(build_dataset(args.dataset, cfg, "val"))
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val clips.")
    model = load_backbone(args, cfg, device)
    print("Extracting features for the train set...")
    train_features, train_labels = extract_features_and_labels(model, make_loader(dataset_train, args), device)
    print("Extracting features for the val set...")
    test_features, test_labels = extract_features_and_labels(model, make_loader(dataset_val, args), device)
    train_features = F.normalize(train_features, dim=1, p=2)
    test_features = F.normalize(test_features, dim=1, p=2)
    # Dumped rows stay aligned with the list lines; skipped videos keep label -1 (dropped in main).
    if args.dump_features and utils.is_main_process():
        os.makedirs(args.dump_features, exist_ok=True)
        for name, tensor in (("trainfeat", train_features), ("testfeat", test_features),
                             ("trainlabels", train_labels), ("testlabels", test_labels)):
            torch.save(tensor.cpu(), os.path.join(args.dump_features, f"{name}.pth"))
    return train_features, test_features, train_labels, test_labels


def load_dumped_features(folder: str):
    tensors = []
    for name in ("trainfeat", "testfeat", "trainlabels", "testlabels"):
        path = os.path.join(folder, f"{name}.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--load_features {folder}: {name}.pth is missing (written by "
                                    "--dump_features).")
        tensors.append(torch.load(path, map_location="cpu", weights_only=True))
    return tuple(tensors)


def run_knn(train_features, test_features, train_labels, test_labels, nb_knn: Sequence[int], T: float,
            device: torch.device) -> dict:
    """{k: (top1, top5)} for each k; the bank is moved to `device` once."""
    num_classes = int(max(train_labels.max(), test_labels.max() if test_labels.numel() else 0)) + 1
    train_features = train_features.to(device)
    results = {}
    for k in nb_knn:
        top1, top5 = knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes)
        print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
        results[k] = (top1, top5)
    return results


def main(args) -> dict | None:
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    cfg = load_config(args)
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    device = utils.default_device()
    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_dumped_features(args.load_features)
    else:
        train_features, test_features, train_labels, test_labels = extract_feature_pipeline(args, cfg, device)
    # Every rank holds the same gathered labels, so every rank drops the same rows.
    train_features, train_labels, skipped_train = drop_skipped(train_features, train_labels)
    test_features, test_labels, skipped_test = drop_skipped(test_features, test_labels)
    skipped = skipped_train + skipped_test
    print(f"Skipped videos (unreadable, left out): {skipped} ({skipped_train} of the train bank, "
          f"{skipped_test} of the val queries).")
    if train_features.shape[0] == 0:
        raise RuntimeError(f"no train video of {args.dataset} could be decoded ({skipped_train} skipped); "
                           "check DATA.PATH_PREFIX and run datasets/preprocessing/check_videos.py.")
    results = None
    if utils.is_main_process():
        knn_device = device if args.use_cuda else torch.device("cpu")
        acc = run_knn(train_features, test_features, train_labels, test_labels, args.nb_knn,
                      args.temperature, knn_device)
        results = {
            "dataset": args.dataset, "pretrained_weights": args.pretrained_weights,
            "checkpoint_key": args.checkpoint_key, "temperature": args.temperature,
            "train_aug": args.train_aug, "num_train": int(train_features.shape[0]),
            "num_test": int(test_features.shape[0]), "skipped_videos": skipped,
            "skipped_train_videos": skipped_train, "skipped_val_videos": skipped_test,
            "results": {str(k): {"top1": t1, "top5": t5} for k, (t1, t5) in acc.items()},
        }
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "knn_results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if utils.is_dist_avail_and_initialized():
        dist.barrier()
    return results


if __name__ == "__main__":
    main(argparse.ArgumentParser("Evaluation with weighted k-NN on video features",
                                 parents=[get_args_parser()]).parse_args())
