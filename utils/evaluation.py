"""Evaluation shared by eval_knn.py, eval_linear.py, eval_finetune.py and train_ssl.py's online kNN: frozen
backbone loading, the run record a resumed evaluation checks, sharded extraction of per-clip outputs (features, or
the fine-tuned model's logits) gathered on every rank, the weighted kNN vote, top-k accuracy, the multi-view
aggregation of clip scores and the checks and counts of unreadable videos.

A video that cannot be decoded comes back from the dataset with label -1 (datasets/video_dataset.py): it is
left out of banks, queries and accuracies, and counted.
"""
import contextlib
import hashlib
import math
import os
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from datasets import ReturnIndexDataset, build_dataset
from datasets.loader_watchdog import WatchedLoader
from datasets.video_dataset import SKIPPED_LABEL, SPLITS, DatasetLists, dataset_lists
from models import build_backbone
from utils import preemption, utils
from utils.checkpoint import image_model_advice, load_imagenet_init, load_pretrained_weights
from utils.parser import note_unused_keys


# Elements of one query-chunk x bank-chunk similarity matrix (64 MiB in fp32).
SIM_BUDGET = 1 << 24
# Rows of the train bank compared at once; the running top-k is merged across bank chunks.
BANK_CHUNK = 1 << 16


# ----------------------------------------------------------------------------------------------------
# Backbone and data
# ----------------------------------------------------------------------------------------------------
def load_backbone(arch: str, cfg, device: torch.device, pretrained_weights: str = "",
                  checkpoint_key: str = "teacher", patch_size: int = 16) -> nn.Module:
    """The frozen backbone of `arch` / `patch_size` with `pretrained_weights` (any checkpoint kind) loaded, its
    `pos_embed` / `time_embed` at their stored size (resized once to each clip as it runs, whatever
    DATA.TRAIN_CROP_SIZE and DATA.NUM_FRAMES say); without them the TIMESFORMER.PRETRAINED_MODEL init (if set) or
    a random one."""
    model = build_backbone(arch, cfg, patch_size=patch_size)
    if pretrained_weights:
        summary = load_pretrained_weights(model, pretrained_weights, checkpoint_key, stored_embeddings=True)
        check_backbone_load(summary, pretrained_weights, arch)
    elif cfg.TIMESFORMER.PRETRAINED_MODEL:
        load_imagenet_init(model, cfg.TIMESFORMER.PRETRAINED_MODEL)
    else:
        print("WARNING: --pretrained_weights is empty, evaluating a randomly initialised backbone.")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def backbone_fingerprint(model: nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """SHA-1 of a backbone's weights (names and bytes, leaving out the keys starting with `exclude`): which
    features a classifier trained on it has seen, whatever file or path they came from."""
    digest = hashlib.sha1()
    for name, value in model.state_dict().items():
        if name.startswith(exclude):
            continue
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def list_fingerprint(path: str) -> dict:
    """A list file's path and the SHA-1 of its bytes: which videos and labels a classifier was trained or
    validated on (the digest identifies them; the path is for messages: the same list elsewhere is the same)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": path, "sha1": digest.hexdigest()}


# The config keys that shape the clips an evaluation trains and scores on, recorded with its run (`run_record`;
# DATA.LOCAL_CROP_SIZE only with --slowfast_eval, whose fast clip is the only one it sizes).
CLIP_KEYS = ("DATA.NUM_FRAMES", "DATA.SAMPLING_RATE", "DATA.TARGET_FPS", "DATA.TRAIN_JITTER_SCALES",
             "DATA.INV_UNIFORM_SAMPLE", "DATA.TRAIN_CROP_SIZE", "DATA.TEST_CROP_SIZE", "DATA.MEAN", "DATA.STD",
             "DATA.RANDOM_FLIP", "TIMESFORMER.ATTENTION_TYPE")
# Keys a run record gained after svt's first releases, with the value every run had before: a record without one
# is compared with that value (an SSv2 run of before INV_UNIFORM_SAMPLE sampled uniformly).
RECORD_VALUE_BEFORE = {"DATA.INV_UNIFORM_SAMPLE": False}


class UnreadableSplit(RuntimeError):
    """No video of an evaluation split could be read."""


@contextlib.contextmanager
def keeping_the_epoch(save: Callable[[], None], path, epoch: int):
    """Around the validation after `epoch`'s training: when no val video can be read (UnreadableSplit, raised on
    every rank alike), `save` the checkpoint after the epoch's last iteration first, so the rerun after the fix
    validates it without training the epoch again."""
    try:
        yield
    except UnreadableSplit as error:
        save()
        raise UnreadableSplit(f"{error} The training of epoch {epoch} is kept in {path}: once the videos can be read "
                              "(the same lists; DATA.PATH_PREFIX may change), the same command resumes there and "
                              "validates it.") from error


CHECK_VIDEOS_ADVICE = "check DATA.PATH_PREFIX and run python -m datasets.preprocessing.check_videos on the list"
ONLINE_KNN_FLAGS = ("DATA.PATH_TO_DATA_DIR and DATA.PATH_PREFIX of the online kNN are train_ssl.py's --knn_data_path "
                    "and --knn_path_prefix")


def run_record(args, cfg, flags: Sequence[str], lists: dict[str, str]) -> dict:
    """What a trained evaluation's score depends on besides its initial weights, saved in its checkpoint (`run`):
    the `flags` (argparse names) of `args`, the CLIP_KEYS of `cfg` and the `lists` ({name: list file}) as
    list_fingerprint's digests."""
    run = {f"--{name}": getattr(args, name) for name in flags}
    for key in CLIP_KEYS + (("DATA.LOCAL_CROP_SIZE",) if getattr(args, "slowfast_eval", False) else ()):
        node, name = key.split(".")
        run[key] = cfg[node][name]
    run.update({name: list_fingerprint(path) for name, path in lists.items()})
    return run


def split_files(**splits) -> dict[str, str]:
    """The `lists` of run_record for datasets given by split name (train=..., val=...): each one's list file
    ("<split> list") and the annotation files its labels come from besides (SSv2, whose frame lists hold no
    labels: "labels json", "train json", "validation json")."""
    files = {}
    for split, dataset in splits.items():
        files[f"{split} list"] = dataset.list_file
        files.update(dataset.annotation_files)
    return files


def run_differences(saved: dict, run: dict, where: str) -> tuple[list[str], list[str]]:
    """How a saved `run_record` differs from this command's `run`: ('key: <where> X, this run Y' for each key both
    hold with other values, the keys of `run` that `saved` lacks). A list counts as the same when its content does
    (a moved data folder is the same list)."""
    def same(key):
        if isinstance(run[key], dict):
            return saved[key]["sha1"] == run[key]["sha1"]
        return saved[key] == run[key]

    def show(value):
        return f"{value['path']} (sha1 {value['sha1'][:12]})" if isinstance(value, dict) else repr(value)

    saved = {**{key: value for key, value in RECORD_VALUE_BEFORE.items() if key in run}, **saved}
    differ = [f"{key}: {where} {show(saved[key])}, this run {show(run[key])}" for key in run
              if key in saved and not same(key)]
    return differ, [key for key in run if key not in saved]


def check_same_run(saved: dict | None, run: dict, path: str, what: str, output_hint: str) -> None:
    """Resume only the run this command describes (`run_record`): with any other value, resuming would continue
    another run's training and report its score as this one's (run_differences). A file without a run record (the
    original SVT's, an older svt one) cannot tell: a note.
    `what`: the kind of run, `output_hint`: how the launch script names another output folder."""
    if saved is None:
        print(f"Note: {path} has no run record (dataset, lists, hyper-parameters): an original SVT file or an older "
              "svt one; resuming it unchecked.")
        return
    differ, unchecked = run_differences(saved, run, "checkpoint")
    if unchecked and not differ:
        print(f"Note: {path}'s run record has no {', '.join(unchecked)} (written by an older svt): resuming "
              "without checking them.")
    if differ:
        raise ValueError(f"{path} holds another {what} run: {'; '.join(differ)}. Resuming it would continue that "
                         f"run's training and report its score as this one's. Give this run another --output_dir "
                         f"({output_hint}), or pass the checkpoint's values to continue it.")


def check_evaluated_split(saved: dict | None, lists: DatasetLists, path: str) -> None:
    """--evaluate of a UCF-101 / HMDB-51 model (`saved`: its run_record, read from `path`) trained on another official
    split than the one DATA.SPLIT reads (`lists`): an error, as that split's test videos are largely among the
    model's training videos. The trained split is the one whose train list the record names; other list changes
    (a cleaned list of the same split) and files without a record (the original's, older svt's) are tested."""
    if saved is None or lists.split is None:
        return
    trained = os.path.basename(saved.get("train list", {}).get("path", ""))
    split = next((s for s in SPLITS if trained == dataset_lists(lists.name, s).train), lists.split)
    if split != lists.split:
        raise ValueError(f"{path} was trained on split {split} of {lists.name} ({saved['train list']['path']}); this "
                         f"--evaluate tests split {lists.split} (DATA.SPLIT), whose test videos are largely among "
                         f"split {split}'s training videos. Pass --opts DATA.SPLIT {split} to test it, or train a "
                         f"model on split {lists.split} in another --output_dir.")


def check_backbone_load(summary, path: str, arch: str) -> None:
    """Evaluation needs every backbone weight from the file: missing keys (random weights) or blocks the
    model does not have mean the checkpoint is of another depth (MODEL.DEPTH) or architecture (--arch)."""
    extra_blocks = [k for k in summary.unexpected if k.startswith("blocks.")]
    if not summary.missing and not extra_blocks:
        return
    if summary.image_model:
        raise ValueError(image_model_advice(path, "--pretrained_weights"))
    file_depth = _num_blocks(summary.matched + summary.unexpected)
    model_depth = _num_blocks(summary.matched + summary.missing)
    if file_depth != model_depth and all(k.startswith("blocks.") for k in summary.missing):
        raise ValueError(
            f"{path} has {file_depth} blocks but --arch {arch} builds {model_depth} here: the checkpoint was "
            f"trained with another depth. Pass --opts MODEL.DEPTH {file_depth} (with the same --arch).")
    raise ValueError(
        f"{path} does not fit --arch {arch}: {len(summary.missing)} backbone "
        f"weights missing from the file {summary.missing[:4]}, {len(extra_blocks)} block weights the "
        f"model lacks {extra_blocks[:4]}. Pass the --arch (and DATA.NUM_FRAMES / crop size) the "
        f"checkpoint was trained with, or --checkpoint_key to pick its teacher/student entry.")


def _num_blocks(keys) -> int:
    """Number of transformer blocks named in backbone state-dict keys (`blocks.<i>.`)."""
    indices = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def dataset_labels(dataset) -> torch.Tensor:
    """Per-sample labels of a dataset (or of the dataset a ReturnIndexDataset wraps)."""
    inner = getattr(dataset, "dataset", dataset)
    return torch.as_tensor(list(inner.labels), dtype=torch.long)


def make_loader(dataset, batch_size: int, num_workers: int, decode_timeout: float) -> DataLoader:
    """Sequential loader over this rank's shard (every sample once across ranks); a batch that does not come
    within `decode_timeout` minutes stops the run naming the videos being read (datasets/loader_watchdog.py)."""
    return WatchedLoader(dataset, sampler=ShardSampler(len(dataset)), batch_size=batch_size, shuffle=False,
                         num_workers=num_workers, pin_memory=torch.cuda.is_available(), drop_last=False,
                         worker_init_fn=utils.seed_worker, persistent_workers=False, decode_timeout=decode_timeout)


def derived_config(cfg, **overrides):
    """A frozen copy of `cfg` with `NODE__KEY=value` overrides, e.g. derived_config(cfg, TEST__NUM_SPATIAL_CROPS=1)."""
    cfg = cfg.clone()
    cfg.defrost()
    for name, value in overrides.items():
        node, key = name.split("__")
        cfg[node][key] = value
    cfg.freeze()
    return cfg


# Config keys that shape only train_ssl.py's SSL views: an evaluation script notes them when set.
SSL_VIEW_KEYS = ("DATA.RAND_FR", "DATA.GLOBAL_NUM_FRAMES", "DATA.LOCAL_NUM_FRAMES", "DATA.NO_SPATIAL",
                 "DATA.DECODE_DEVICE", "DATA.DEVICE_DECODE_THREADS", "DATA.AUGMENT_DEVICE")


def note_ssl_view_keys(cfg) -> str | None:
    """The notes of an evaluation script whose config sets SSL_VIEW_KEYS or DATA.NO_RGB_AUG (no effect there)."""
    notes = [note_unused_keys(cfg, SSL_VIEW_KEYS, "only train_ssl.py's SSL views read them: evaluation clips have "
                                                  "DATA.NUM_FRAMES frames and are decoded in the DataLoader workers "
                                                  "(DATA.DECODING_BACKEND)."),
             note_unused_keys(cfg, ("DATA.NO_RGB_AUG",), "the evaluation scripts train on one plain clip per sample "
                                                         "whatever it says (what True asked of the original's Kinetics "
                                                         "train mode).")]
    return "\n".join(note for note in notes if note) or None


def single_clip_config(cfg):
    """One clip per video, centre crop after the short-side resize (the original forces 1 spatial crop)."""
    return derived_config(cfg, TEST__NUM_ENSEMBLE_VIEWS=1, TEST__NUM_SPATIAL_CROPS=1)


def _one_based_fix(name: str) -> str | None:
    """How to make the `name` lists' 1-based labels 0-based (the end of a sentence); None for SSv2, whose labels
    are the ids of its labels JSON (a subset may leave class 0 unused)."""
    if name == "ssv2":
        return None
    if name in ("ucf101", "hmdb51"):
        return ("as in UCF-101's classInd.txt / trainlist01.txt: the lists take 0-based labels (MMAction2's "
                f"{name}_*_split_*_videos.txt); subtract 1 from every label.")
    return ("the lists take 0-based labels, the position of the video's class in the sorted class names "
            "(datasets/DATASET.md); subtract 1 from every label.")


def resolve_num_labels(num_labels: int | None, datasets: Sequence, name: str) -> int:
    """`num_labels`, or max label + 1 of the lists when None (with a note when no label is 0: 1-based lists give
    a class that no video has); an error when a list has a label the head lacks (naming the lists, and saying so
    when the labels look 1-based). `name`: the --dataset (SSv2's ids come from its labels JSON: no 1-based note)."""
    labels = [dataset_labels(d) for d in datasets]
    needed = max(int(y.max()) for y in labels) + 1
    fix = _one_based_fix(name)
    no_zero = min(int(y.min()) for y in labels) == 1 and fix is not None
    files = sorted({getattr(getattr(d, "dataset", d), "list_file", name) for d in datasets})
    if num_labels is None:
        if no_zero:
            print(f"Note: no label of the {name} lists {files} is 0: they look 1-based, {fix} As they are, "
                  f"the head has {needed} classes (max label + 1), class 0 of which no video has.")
        return needed
    if needed > num_labels:
        hint = (f" The labels look 1-based (none is 0, the largest equals the class count), {fix}"
                if no_zero and needed - 1 == num_labels else
                " Pass the class count as --num_labels (NUM_LABELS in the launch scripts) or fix the labels.")
        raise ValueError(f"--num_labels {num_labels} but the {name} lists {files} have labels up to "
                         f"{needed - 1}.{hint}")
    return num_labels


def build_train_bank_dataset(name: str, cfg, train_aug: bool = False):
    """The train split; unless `train_aug`, each video gives its val-mode clip (frame-0 window, centre crop)."""
    dataset = build_dataset(name, cfg, "train")
    if not train_aug:
        dataset.mode = "val"  # the list stays the train split; sampling and transform become val's
    return dataset


# ----------------------------------------------------------------------------------------------------
# Sharded extraction, gathered on every rank
# ----------------------------------------------------------------------------------------------------
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

    Rows travel in chunks (bounded device memory) and are written into the result as they arrive (host memory:
    the result and one chunk, not the result and a copy of every rank's rows); an index produced twice (padding
    duplicates) is harmless. Raises when some row of the result was produced by no rank.
    """
    local = local.float().cpu()
    index = index.long().cpu()
    dim = local.shape[1] if local.dim() == 2 else -1
    distributed = utils.is_dist_avail_and_initialized()
    if distributed:
        comm = utils.comm_device()
        world = dist.get_world_size()
        meta = torch.tensor([local.shape[0], dim if local.shape[0] else -1], device=comm)
        metas = [torch.zeros_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta)
        longest = max(int(m[0]) for m in metas)
        dim = max(int(m[1]) for m in metas)
    if dim < 0:  # every rank alike
        raise RuntimeError("gather_rows: no rank produced any row (empty dataset?).")
    out = torch.zeros(total, dim)
    filled = torch.zeros(total, dtype=torch.bool)

    def place(feats: torch.Tensor, idx: torch.Tensor) -> None:
        out.index_copy_(0, idx, feats)
        filled[idx] = True

    if not distributed:
        place(local, index)
    else:
        local = local.reshape(-1, dim)
        rows = max(1, SIM_BUDGET // (max(dim, 1) * world))
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
                place(f.cpu()[i >= 0], i[i >= 0])
    if not bool(filled.all()):
        missing = (~filled).nonzero().flatten()[:10].tolist()
        raise RuntimeError(f"gather_rows: {int((~filled).sum())} of {total} rows were produced by no rank "
                           f"(first: {missing}); the sampler must cover the whole dataset.")
    return out


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


@torch.no_grad()
def extract_features_and_labels(model: Callable, loader: Iterable, device: torch.device,
                                check_stop: Callable[[], None] | None = None,
                                header: str = "Extracting features:") -> tuple[torch.Tensor, torch.Tensor]:
    """((N, D) float32 CPU outputs of `model`, (N,) labels as returned by the dataset, -1 for a skipped video)
    for every sample of `loader.dataset`, rows in index order.

    `loader` yields (frames, index, label) (a ReturnIndexLabelDataset); with torch.distributed each rank runs
    its shard (make_loader) and the rows of all ranks are gathered on every rank, so every rank drops the same
    rows. `frames` may be a list of clips when `model` takes one. `check_stop` (a collective that may end the
    pass by raising, e.g. on a stop signal) is called by every rank after the same batches: every
    preemption.CHECK_EVERY batches of the shortest shard and at its last. `header` labels the progress lines.
    """
    total = len(loader.dataset)
    # the batches of the shortest shard (ShardSampler: total // world samples), which every rank reaches
    common = math.ceil(total // utils.get_world_size() / loader.batch_size) if check_stop is not None else 0
    metric_logger = utils.MetricLogger(delimiter="  ")
    feats, idxs = [], []
    for i, (frames, index, label) in enumerate(metric_logger.log_every(loader, 10, header)):
        out = model(to_device(frames, device)).float().cpu()
        # the label travels as an extra column (exact in float32 for any class id)
        feats.append(torch.cat([out, torch.as_tensor(label).float().view(-1, 1)], dim=1))
        idxs.append(torch.as_tensor(index).long().cpu())
        if i < common and preemption.is_check_step(i + 1, common):
            check_stop()
    local = torch.cat(feats) if feats else torch.zeros(0, 0)
    index = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long)
    rows = gather_rows(local, index, total)
    return rows[:, :-1].contiguous(), rows[:, -1].round().long()


def drop_skipped(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(features, labels, number of rows dropped) without the rows of label -1 (undecodable videos)."""
    keep = labels != SKIPPED_LABEL
    return features[keep], labels[keep], int((~keep).sum())


def drop_unreadable(features: torch.Tensor, labels: torch.Tensor, split: str,
                    advice: str = CHECK_VIDEOS_ADVICE) -> tuple[torch.Tensor, torch.Tensor, int]:
    """drop_skipped of a kNN bank or query set of one row per video, `split` naming it (describe_split): an error
    when no row is left (require_readable, with `advice`), where a kNN would divide by zero or score 0 over 0
    videos."""
    features, labels, skipped = drop_skipped(features, labels)
    require_readable(features.shape[0] + skipped, skipped, split, advice)
    return features, labels, skipped


def clip_features(model: nn.Module, frames, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """CLS of the last n blocks (+ mean patch token of the last), concatenated: (B, D * (n + avgpool)).

    `frames` may be a list of clips of the same videos (slow-fast): their features are averaged.
    """
    if isinstance(frames, (list, tuple)):
        return torch.stack([clip_features(model, f, n_last_blocks, avgpool) for f in frames]).mean(0)
    blocks = model.get_intermediate_layers(frames, n_last_blocks)
    out = [x[:, 0] for x in blocks]
    if avgpool:
        out.append(blocks[-1][:, 1:].mean(dim=1))
    return torch.cat(out, dim=-1).float()


# ----------------------------------------------------------------------------------------------------
# k-NN and accuracy
# ----------------------------------------------------------------------------------------------------
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


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, max_rank: int = 5) -> torch.Tensor:
    """(2,) counts of the rows whose label is the top-1 and among the top-`max_rank` scores, on the scores' device
    (no host sync); ties between scores go to the lower class index."""
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :min(max_rank, scores.shape[1])]
    correct = order.eq(labels.long().view(-1, 1))
    return torch.stack((correct[:, 0].sum(), correct.sum()))


def top1_top5(scores: torch.Tensor, labels: torch.Tensor, max_rank: int = 5) -> tuple[float, float]:
    """Top-1 and top-`max_rank` accuracy in percent (`topk_hits`)."""
    n = max(1, scores.shape[0])
    top1, top5 = (hits * 100.0 / n for hits in topk_hits(scores, labels, max_rank).tolist())
    return top1, top5


def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, k: int, T: float, num_classes: int,
                   device: torch.device | None = None) -> tuple[float, float]:
    """Weighted k-NN top-1 / top-5 accuracy (%) on L2-normalised features (DINO's classifier).

    As in DINO, top-5 counts only the first min(5, k) ranked classes (no more than k classes get votes).
    """
    votes = knn_votes(train_features, train_labels, test_features, k, T, num_classes, device)
    return top1_top5(votes, test_labels.cpu(), max_rank=min(5, k))


def run_knn(train_features, test_features, train_labels, test_labels, nb_knn: Sequence[int], T: float,
            device: torch.device) -> dict:
    """{k: (top1, top5)} for each k; the bank is moved to `device` once. A k above the bank's size votes with the
    whole bank (a note says so)."""
    num_classes = int(max(train_labels.max(), test_labels.max() if test_labels.numel() else 0)) + 1
    train_features = train_features.to(device)
    bank = train_features.shape[0]
    results = {}
    for k in nb_knn:
        if k > bank:
            print(f"Note: k={k} is larger than the train bank ({bank} videos): the {k}-NN votes use all {bank}.")
        top1, top5 = knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes)
        print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
        results[k] = (top1, top5)
    return results


def aggregate_views(scores: torch.Tensor, video_ids: torch.Tensor, num_videos: int,
                    ensemble: str = "sum") -> torch.Tensor:
    """(num_videos, C) per-video scores from (N_clips, C) clip logits: summed logits or mean softmax."""
    if ensemble == "softmax":
        scores = scores.softmax(dim=1)
    elif ensemble != "sum":
        raise ValueError(f"ensemble must be 'sum' or 'softmax', got {ensemble!r}")
    out = torch.zeros(num_videos, scores.shape[1], dtype=scores.dtype).index_add_(0, video_ids, scores)
    if ensemble == "softmax":
        out /= torch.bincount(video_ids, minlength=num_videos).clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def video_labels(clip_labels: torch.Tensor, num_clips: int) -> torch.Tensor:
    """One label per video from the per-clip labels (clip i belongs to video i // num_clips)."""
    per_video = clip_labels.view(-1, num_clips)
    if not bool((per_video == per_video[:, :1]).all()):
        raise RuntimeError("multi-view test: the clips of one video have different labels; the dataset must "
                           "list the clips of video v at indices v * num_clips ... (v + 1) * num_clips - 1.")
    return per_video[:, 0]


def accuracy_stats(scores: torch.Tensor, labels: torch.Tensor, num_labels: int, prefix: str = "") -> dict:
    """Top-1 (and top-5 with at least 5 classes) accuracy in percent."""
    top1, top5 = top1_top5(scores, labels)
    stats = {f"{prefix}acc1": top1}
    if num_labels >= 5:
        stats[f"{prefix}acc5"] = top5
    return stats


def skipped_video_ids(returned: torch.Tensor, num_clips: int) -> set[int]:
    """Videos none of whose `num_clips` consecutive clips was decoded (returned label -1)."""
    failed = (returned[:returned.numel() // num_clips * num_clips] == SKIPPED_LABEL).view(-1, num_clips)
    return set(failed.all(dim=1).nonzero().flatten().tolist())


def unreadable_videos(dataset, returned: torch.Tensor) -> set[int]:
    """skipped_video_ids of the labels `dataset` returned (its num_clips_per_video clips per video); an error when
    they are all of its videos (require_readable)."""
    skipped = skipped_video_ids(returned, dataset.num_clips_per_video)
    require_readable(dataset.num_videos, len(skipped), describe_split(dataset), unreadable_advice(dataset))
    return skipped


def describe_split(dataset) -> str:
    """The list file of `dataset` (or of the dataset it wraps) and its DATA.PATH_PREFIX, for require_readable."""
    inner = getattr(dataset, "dataset", dataset)
    return f"{inner.list_file} (DATA.PATH_PREFIX={inner.cfg.DATA.PATH_PREFIX!r})"


def unreadable_advice(dataset) -> str:
    """What to check when no video of `dataset` could be read: its videos (check_videos), or for a dataset of
    extracted frames (SSv2), the frames folder."""
    if getattr(getattr(dataset, "dataset", dataset), "frame_paths", None) is not None:
        return ("check that DATA.PATH_PREFIX is the folder of the extracted frames and that the frames match the "
                "frame lists (datasets/DATASET.md, SSv2)")
    return CHECK_VIDEOS_ADVICE


def require_readable(num_videos: int, num_skipped: int, split: str, advice: str = CHECK_VIDEOS_ADVICE) -> None:
    """An evaluation split in which no video could be read is an error (UnreadableSplit), not an accuracy of 0 over
    0 videos nor a kNN vote of an empty bank. `split` names its list (describe_split), `advice` what to check."""
    if num_skipped >= num_videos:
        raise UnreadableSplit(f"none of the {num_videos} videos of {split} could be read; {advice}.")


def single_view_stats(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """Accuracy and cross-entropy of one clip per video; clips of label -1 (undecodable) are left out and
    counted in "skipped_videos"."""
    keep = labels != SKIPPED_LABEL
    logits, labels = logits[keep], labels[keep]
    loss = F.cross_entropy(logits, labels).item() if labels.numel() else float("nan")
    return {**accuracy_stats(logits, labels, num_labels), "loss": loss, "skipped_videos": int((~keep).sum())}


def multi_view_stats(logits: torch.Tensor, returned: torch.Tensor, clip_labels: torch.Tensor, num_clips: int,
                     ensemble: str, num_labels: int) -> dict:
    """Per-video accuracy from (N_clips, C) clip logits, `num_clips` consecutive clips per video, aggregated
    by `ensemble`. `returned` are the labels the dataset returned (-1: undecodable clip), `clip_labels` the
    list's labels.

    Clips of label -1 are left out of the aggregation; a video without any decoded clip is left out of the
    accuracy and counted in "multiview_skipped_videos"."""
    num_videos = logits.shape[0] // num_clips
    n = num_videos * num_clips
    video_ids = torch.arange(n) // num_clips
    keep = returned[:n] != SKIPPED_LABEL
    kept = slice(None) if bool(keep.all()) else keep  # every clip: a view, not a copy of 0.9 GB (20k x 30 x 400)
    scores = aggregate_views(logits[:n][kept], video_ids[kept], num_videos, ensemble)
    labels = video_labels(clip_labels[:n], num_clips)
    scored = torch.bincount(video_ids[keep], minlength=num_videos) > 0
    stats = accuracy_stats(scores[scored], labels[scored], num_labels, prefix="multiview_")
    stats.update(num_videos=int(scored.sum()), num_clips_per_video=num_clips,
                 multiview_skipped_videos=int((~scored).sum()), multiview_skipped_clips=int((~keep).sum()))
    return stats


# ----------------------------------------------------------------------------------------------------
# Online kNN during training
# ----------------------------------------------------------------------------------------------------
class OnlineKNN:
    """Weighted kNN (eval_knn's protocol: one centre clip per video, train split as the bank) of a backbone's
    CLS features on a held-out train/val list (the lists of `dataset` in `data_path`)."""

    def __init__(self, cfg, device: torch.device, dataset: str, data_path: str, path_prefix: str, k: int,
                 temperature: float, batch_size: int, num_workers: int, decode_timeout: float):
        knn_cfg = single_clip_config(derived_config(cfg, DATA__PATH_TO_DATA_DIR=data_path,
                                                    DATA__PATH_PREFIX=path_prefix))
        try:  # a list or videos not found: the error names the DATA.* keys, which these flags set here
            datasets = (ReturnIndexLabelDataset(build_train_bank_dataset(dataset, knn_cfg)),
                        ReturnIndexLabelDataset(build_dataset(dataset, knn_cfg, "val")))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{ONLINE_KNN_FLAGS}, here {data_path!r} and {path_prefix!r}. {err}") from err
        self.device, self.k, self.temperature = device, k, temperature
        self.loaders = [make_loader(ds, batch_size, num_workers, decode_timeout) for ds in datasets]
        self.splits = [(describe_split(ds), f"{unreadable_advice(ds)} ({ONLINE_KNN_FLAGS})") for ds in datasets]
        self.num_classes = int(max(int(dataset_labels(ds).max()) for ds in datasets)) + 1
        print(f"Online kNN on {dataset}: {len(datasets[0])} train and {len(datasets[1])} val videos.")

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, precision: torch.dtype | None = None,
                 check_stop: Callable[[], None] | None = None) -> tuple[float, float]:
        """kNN top-1 / top-5 (%) of `backbone`'s features; `check_stop`: see extract_features_and_labels (called in
        the extraction of the bank and of the queries)."""
        was_training = backbone.training
        backbone.eval()
        with utils.autocast_context(precision, self.device):
            # label -1 marks an unreadable video: left out of the bank and the queries, as in eval_knn.py
            (bank, bank_labels, _), (queries, query_labels, _) = [
                drop_unreadable(*extract_features_and_labels(backbone, loader, self.device, check_stop), *split)
                for loader, split in zip(self.loaders, self.splits)]
        backbone.train(was_training)
        return knn_classifier(F.normalize(bank, dim=1), bank_labels, F.normalize(queries, dim=1), query_labels,
                              self.k, self.temperature, self.num_classes)
