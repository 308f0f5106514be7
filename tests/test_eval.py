"""Evaluation building blocks: weighted k-NN against hand-computed votes, distributed extraction,
multi-view / slow-fast aggregation, the linear classifier and strict checkpoint loading."""
import argparse
import math
import os
import signal
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

import eval_knn
import eval_linear
from eval_linear import LinearClassifier, load_classifier_state
from models import VisionTransformer, build_backbone
from tests.conftest import HostReads
from utils import evaluation, preemption
from utils.evaluation import (ShardSampler, aggregate_views, clip_features, drop_skipped, extract_features_and_labels,
                              gather_rows, knn_classifier, knn_votes, load_backbone, multi_view_stats, run_knn,
                              video_labels)
from utils.parser import load_config_from

E = math.exp


# ------------------------------------------------------------------------------------------------------
# k-NN
# ------------------------------------------------------------------------------------------------------
TRAIN = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0], [0.8, 0.6, 0]])
TRAIN_LABELS = torch.tensor([0, 1, 2, 1, 0])
TEST = torch.tensor([[1, 0, 0], [0, 1, 0], [0.28, 0, 0.96]])
TEST_LABELS = torch.tensor([0, 0, 2])


def test_knn_votes_match_hand_computation():
    # T = 0.5: weights exp(2 * cos). Sims q0 [1,0,0,.6,.8], q1 [0,1,0,.8,.6], q2 [.28,0,.96,.168,.224].
    votes1 = knn_votes(TRAIN, TRAIN_LABELS, TEST, k=1, T=0.5, num_classes=3)
    expected1 = torch.tensor([[E(2), 0, 0], [0, E(2), 0], [0, 0, E(1.92)]])
    torch.testing.assert_close(votes1, expected1)
    votes3 = knn_votes(TRAIN, TRAIN_LABELS, TEST, k=3, T=0.5, num_classes=3)
    expected3 = torch.tensor([[E(2) + E(1.6), E(1.2), 0],
                              [E(1.2), E(2) + E(1.6), 0],
                              [E(0.56) + E(0.448), 0, E(1.92)]])
    torch.testing.assert_close(votes3, expected3)
    votes5 = knn_votes(TRAIN, TRAIN_LABELS, TEST, k=5, T=0.5, num_classes=4)
    torch.testing.assert_close(votes5[0], torch.tensor([E(2) + E(1.6), E(0) + E(1.2), E(0), 0]))
    # k larger than the bank uses the whole bank.
    torch.testing.assert_close(knn_votes(TRAIN, TRAIN_LABELS, TEST, k=50, T=0.5, num_classes=4), votes5)


def test_knn_accuracy_several_k_small_test_set():
    # 3 queries (< 100: the original's chunking crashed here). q1 is labelled 0 but its nearest is class 1.
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=1, T=0.07, num_classes=3)
    assert top1 == pytest.approx(200 / 3) and top5 == pytest.approx(200 / 3)  # top-5 looks at min(5, k) = 1
    top1, top5 = knn_classifier(TRAIN, TRAIN_LABELS, TEST, TEST_LABELS, k=3, T=0.07, num_classes=3)
    assert top1 == pytest.approx(200 / 3) and top5 == pytest.approx(100.0)  # class 0 is q1's second
    top1, _ = knn_classifier(TRAIN, TRAIN_LABELS, TEST[:1], TEST_LABELS[:1], k=2, T=0.07, num_classes=3)
    assert top1 == 100.0


def test_knn_vote_ties_go_to_the_lower_class():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    votes = knn_votes(train, torch.tensor([1, 0]), query, k=2, T=0.07, num_classes=2)
    assert votes[0, 0] == votes[0, 1]
    assert knn_classifier(train, torch.tensor([1, 0]), query, torch.tensor([0]), 2, 0.07, 2) == (100.0, 100.0)
    assert knn_classifier(train, torch.tensor([1, 0]), query, torch.tensor([1]), 2, 0.07, 2) == (0.0, 100.0)
    # Tied neighbours at the k-th place with the same label: the vote does not depend on which is taken.
    train3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    v = knn_votes(train3, torch.tensor([0, 1, 1]), torch.tensor([[0.0, 1.0]]), k=2, T=1.0, num_classes=2)
    torch.testing.assert_close(v, torch.tensor([[0.0, 2 * E(1)]]))


def test_topk_hits_counts_on_the_scores_device_with_ties_to_the_lower_class(device):
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], device=device)
    labels = torch.tensor([1, 1, 2], device=device)
    # row 0: classes 1 and 2 tie, 1 ranks first (hit); row 1: label second (top-2 hit); row 2: label third
    hits = evaluation.topk_hits(scores, labels, max_rank=2)
    assert hits.device.type == device.type and hits.tolist() == [1, 2]
    assert evaluation.top1_top5(scores, labels, max_rank=2) == (100 / 3, 200 / 3)
    assert evaluation.top1_top5(scores, labels) == (100 / 3, 100.0)


def test_knn_chunking_equals_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    test = torch.nn.functional.normalize(torch.randn(57, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (300,), generator=g)
    monkeypatch.setattr(evaluation, "BANK_CHUNK", 64)   # 5 bank chunks, the last one short
    monkeypatch.setattr(evaluation, "SIM_BUDGET", 640)  # 10 queries per chunk
    for k in (1, 5, 20, 70):
        sim, idx = (test @ train.T).topk(k, dim=1)
        brute = torch.zeros(57, 7).scatter_add_(1, labels[idx], (sim / 0.07).exp())
        torch.testing.assert_close(knn_votes(train, labels, test, k, 0.07, 7), brute, rtol=1e-5, atol=0)


def test_run_knn_takes_num_classes_from_labels():
    acc = run_knn(TRAIN, TEST, TRAIN_LABELS, TEST_LABELS, [1, 3], 0.07, torch.device("cpu"))
    assert set(acc) == {1, 3}
    assert acc[3] == (pytest.approx(200 / 3), pytest.approx(100.0))


def test_run_knn_notes_a_k_larger_than_the_train_bank(capsys):
    acc = run_knn(TRAIN, TEST, TRAIN_LABELS, TEST_LABELS, [5, 7], 0.07, torch.device("cpu"))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    assert notes == ["Note: k=7 is larger than the train bank (5 videos): the 7-NN votes use all 5."]
    assert acc[7] == acc[5]  # the whole bank either way


class _Rows(Dataset):
    """(row, index, label) samples (a ReturnIndexLabelDataset's layout): with an identity backbone the rows are the
    features."""

    def __init__(self, rows: torch.Tensor, labels: list[int]):
        self.rows, self.labels = rows, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.rows[index], index, self.labels[index]


def test_online_knn_votes_with_l2_normalised_rows():
    # Bank rows of norms 2, 3 and 4.24 (classes 0, 1, 2): once each row is unit length, query (1, 0.1) is nearest to
    # class 0's direction and (0.1, 1) to class 1's. Normalising the columns instead (dim 0) sends both to class 2.
    online = object.__new__(evaluation.OnlineKNN)  # its datasets come from video lists; the vote is what is tested
    online.device, online.k, online.temperature, online.num_classes = torch.device("cpu"), 1, 0.07, 3
    bank, queries = torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 3.0]]), torch.tensor([[1.0, 0.1], [0.1, 1.0]])
    online.loaders = [DataLoader(_Rows(bank, [0, 1, 2]), batch_size=2),
                      DataLoader(_Rows(queries, [0, 1]), batch_size=2)]
    online.splits = [("bank list", "advice"), ("query list", "advice")]
    assert online.evaluate(torch.nn.Identity()) == (100.0, 100.0)


def test_accuracy_stats_top5_from_five_classes():
    # Labels ranked 1st, 5th and 2nd of 5 classes: top-1 1/3, top-5 3/3; with 4 classes no top-5 is reported.
    scores = torch.tensor([[5.0, 4, 3, 2, 1], [5.0, 4, 3, 2, 1], [1.0, 5, 2, 3, 4]])
    stats = evaluation.accuracy_stats(scores, torch.tensor([0, 4, 4]), num_labels=5)
    assert stats == {"acc1": pytest.approx(100 / 3), "acc5": 100.0}
    assert evaluation.accuracy_stats(scores[:, :4], torch.tensor([0, 3, 3]), num_labels=4) == {
        "acc1": pytest.approx(100 / 3)}


# ------------------------------------------------------------------------------------------------------
# Gathering and distributed extraction
# ------------------------------------------------------------------------------------------------------
def test_shard_sampler_covers_once_without_padding():
    shards = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(7, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]


def test_gather_rows_orders_by_index_and_rejects_holes():
    local = torch.arange(12.0).view(4, 3)
    out = gather_rows(local, torch.tensor([2, 0, 3, 1]), 4)
    torch.testing.assert_close(out, local[[1, 3, 0, 2]])
    with pytest.raises(RuntimeError, match="produced by no rank"):
        gather_rows(local[:3], torch.tensor([2, 0, 3]), 4)


class TinyLabelledClips(Dataset):
    """Deterministic (frames, index, label) samples like ReturnIndexLabelDataset: (3, 2, 32, 32) clips;
    samples 2 and 5 are skipped videos (label -1)."""

    LABELS = [0, 1, -1, 3, 0, -1, 2]

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.clips = torch.randn(len(self.LABELS), 3, 2, 32, 32, generator=g)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i):
        return self.clips[i], i, self.LABELS[i]


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_frames=2, drop_path_rate=0.0)
    return VisionTransformer(**{**cfg, **kw}).eval()


def _extract_worker(rank: int, world: int, init_file: str, out_dir: str, budget: int) -> None:
    # no destroy_process_group, as tests/test_checkpoint.py's _lock_worker (a deadlock before torch 2.8)
    evaluation.SIM_BUDGET = budget  # rows per gather round: budget // (49 columns * 2 ranks)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dataset = TinyLabelledClips()
    loader = DataLoader(dataset, sampler=ShardSampler(len(dataset)), batch_size=2)
    torch.save(extract_features_and_labels(tiny_vit(), loader, torch.device("cpu")),
               os.path.join(out_dir, f"rank{rank}.pth"))


@pytest.mark.parametrize("budget", [evaluation.SIM_BUDGET, 2 * 49 * 2])  # one gather round; 2 rows a round
def test_distributed_extraction_matches_single_process(tmp_path, budget):
    # forked, not spawned: a spawned child imports this module (eval_linear, torch, ...) again, seconds each
    mp.start_processes(_extract_worker, args=(2, str(tmp_path / "init"), str(tmp_path), budget), nprocs=2,
                       join=True, start_method="fork")
    dataset = TinyLabelledClips()
    single, labels = extract_features_and_labels(tiny_vit(), DataLoader(dataset, batch_size=3), torch.device("cpu"))
    with torch.no_grad():
        direct = tiny_vit()(dataset.clips)
    torch.testing.assert_close(single, direct, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == TinyLabelledClips.LABELS
    # Labels travel with the rows: every rank holds all rows and drops the same skipped (-1) ones.
    keep = [0, 1, 3, 4, 6]
    for rank in range(2):
        feats, labels, skipped = drop_skipped(*torch.load(tmp_path / f"rank{rank}.pth"))
        assert labels.tolist() == [0, 1, 3, 0, 2] and skipped == 2
        torch.testing.assert_close(feats, single[keep], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Linear probe pieces
# ------------------------------------------------------------------------------------------------------
def test_linear_classifier_init_keys_and_forward():
    torch.manual_seed(0)
    clf = LinearClassifier(768 * 4, 101)
    assert list(clf.state_dict()) == ["linear.weight", "linear.bias"]
    assert clf.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.count_nonzero(clf.linear.bias) == 0
    x = torch.randn(2, 768 * 4)
    torch.testing.assert_close(clf(x), x @ clf.linear.weight.T + clf.linear.bias)


def test_probe_optimizer_is_sgd_with_scaled_lr_and_per_epoch_cosine(monkeypatch):
    # The original script's settings: lr 0.001 at batch 16 per GPU; here 2 processes -> 0.001 * 32 / 256.
    monkeypatch.setattr(eval_linear.utils, "get_world_size", lambda: 2)
    args = eval_linear.get_args_parser().parse_args(["--lr", "0.001", "--batch_size_per_gpu", "16", "--epochs", "4"])
    optimizer, scheduler = eval_linear.build_probe_optimizer(LinearClassifier(8, 3), args)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"], group["dampening"]) == (0.9, 0, False, 0)
    base = 0.001 * 32 / 256
    lrs = []
    for _ in range(4):
        lrs.append(group["lr"])
        optimizer.step()  # no gradients: a no-op, in the order the scheduler expects
        scheduler.step()
    lrs.append(group["lr"])
    assert lrs == pytest.approx([base * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(5)], abs=1e-12)
    assert lrs[-1] == pytest.approx(0, abs=1e-12)


def test_linear_classifier_feature_bn_standardises_features():
    """--feature_bn (MAE's probe): training standardises with the batch mean and biased variance (eps 1e-6) and
    updates running statistics (momentum 0.1, unbiased variance); evaluation uses the running ones."""
    torch.manual_seed(0)
    clf = LinearClassifier(3, 2, feature_bn=True)
    assert list(clf.state_dict()) == ["feature_bn.running_mean", "feature_bn.running_var",
                                      "feature_bn.num_batches_tracked", "linear.weight", "linear.bias"]
    assert not any(n.startswith("feature_bn") for n, _ in clf.named_parameters())  # affine=False
    x = torch.tensor([[1.0, 10.0, 100.0], [3.0, 10.0, 104.0], [5.0, 10.0, 90.0], [7.0, 10.0, 94.0]])
    mean = torch.tensor([4.0, 10.0, 97.0])
    var = torch.tensor([5.0, 0.0, 29.0])  # biased: ((-3)^2 + (-1)^2 + 1 + 3^2) / 4 = 5; (9 + 49 + 49 + 9) / 4
    standardised = (x - mean) / torch.sqrt(var + 1e-6)
    w, b = clf.linear.weight, clf.linear.bias
    torch.testing.assert_close(clf(x), standardised @ w.T + b)
    torch.testing.assert_close(clf.feature_bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(clf.feature_bn.running_var, 0.9 + 0.1 * var * 4 / 3)
    clf.eval()
    run_mean, run_var = 0.1 * mean, 0.9 + 0.1 * var * 4 / 3
    torch.testing.assert_close(clf(x), (x - run_mean) / torch.sqrt(run_var + 1e-6) @ w.T + b)


def test_linear_probe_steps_never_read_a_value_back_to_the_host(device):
    # On CUDA each .item() / synchronize waits for the GPU: the loss stays a device tensor until a progress line
    # is printed, so the host reads of an epoch do not grow with its batches.
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, embed_dim=48, depth=1, num_heads=2, num_frames=4).to(device).eval()
    classifier = LinearClassifier(48, 3).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    args = argparse.Namespace(n_last_blocks=1, avgpool_patchtokens=False, saveckp_iters=0)

    def host_reads(batches: int) -> int:
        loader = [(torch.randn(2, 3, 4, 32, 32), torch.tensor([0, 2]), torch.tensor([0, 1]),
                   {"skipped": torch.tensor([0, 1])}) for _ in range(batches)]
        with HostReads() as reads:
            stats, _ = eval_linear.train_one_epoch(model, classifier, optimizer, loader, 0, batches, args, device)
        assert stats["replaced_samples"] == batches and "skipped_videos" not in stats and math.isfinite(stats["loss"])
        return reads.count

    assert host_reads(6) == host_reads(2)


def test_linear_probe_epoch_reduces_only_tensors_on_its_device(monkeypatch, device):
    # Two NCCL ranks cannot share the device check's one GPU: the world of 2 is faked, and the all-reduce enforces
    # NCCL's rule on CUDA (CUDA tensors only; gloo takes CPU ones, so a CPU run cannot see it). Device-generic
    # rather than GPU-only, so that the CPU suite runs the same code path (a GPU-only test that no CPU run calls
    # goes stale unseen).
    reduced = []

    def nccl_all_reduce(tensor, *args, **kwargs):
        assert tensor.device.type == device.type, f"all_reduce of a {tensor.device} tensor on {device}"
        reduced.append(tensor)

    monkeypatch.setattr(evaluation.utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluation.utils, "is_dist_avail_and_initialized", lambda: False)  # meters stay local
    monkeypatch.setattr(evaluation.utils, "comm_device", lambda: device)  # what it says under NCCL / gloo
    monkeypatch.setattr(dist, "all_reduce", nccl_all_reduce)
    model = VisionTransformer(img_size=32, embed_dim=48, depth=2, num_heads=2, num_frames=4).to(device).eval()
    classifier = LinearClassifier(48, 3).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    frames = torch.randn(2, 3, 4, 32, 32)
    batch = (frames.pin_memory() if device.type == "cuda" else frames, torch.tensor([0, 2]), torch.tensor([0, 1]),
             {"skipped": torch.tensor([0, 1])})
    args = argparse.Namespace(n_last_blocks=1, avgpool_patchtokens=False, saveckp_iters=0)
    stats, _ = eval_linear.train_one_epoch(model, classifier, optimizer, [batch], 0, 1, args, device)
    assert stats["replaced_samples"] == 1 and len(reduced) == 2  # the stop check at the last step, the count


class _Stopped(Exception):
    """Stands for preemption.finish (the exit after a stop's checkpoint)."""


def _probe_epoch(every: int, start: int = 0, signalled: bool = False, niter: int = 7) -> list[tuple]:
    """eval_linear.train_one_epoch over batches `start`..`niter` - 1 of a fixed epoch (a resume starts at
    `start`), --saveckp_iters `every`, SIGTERM received before it when `signalled`: each mid-epoch save as
    (iteration, epoch_meters, classifier weight at that point), then ("stop", its message) if it stopped."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, embed_dim=48, depth=1, num_heads=2, num_frames=4).eval()
    classifier = LinearClassifier(48, 3)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(2, 3, 4, 32, 32), torch.tensor([0, i % 3]), torch.tensor([0, 1]),
                {"skipped": torch.tensor([0, int(i == 1)])}) for i in range(niter)]
    args = argparse.Namespace(n_last_blocks=1, avgpool_patchtokens=False, saveckp_iters=every, output_dir="out")
    events = []

    def save_mid_epoch(iteration, epoch_meters):
        events.append((iteration, epoch_meters, classifier.linear.weight.detach().clone()))

    with preemption.StopSignals() as stop:
        if signalled:
            signal.raise_signal(signal.SIGTERM)
        try:
            eval_linear.train_one_epoch(model, classifier, optimizer, batches[start:], 0, niter, args,
                                        torch.device("cpu"), start_iter=start, save_mid_epoch=save_mid_epoch,
                                        stop=stop)
        except _Stopped as stopped:
            events.append(("stop", str(stopped)))
    return events


@pytest.mark.parametrize("every, start, saved", [(0, 0, []), (2, 0, [2, 4, 6]), (3, 0, [3, 6]), (7, 0, []),
                                                 (8, 0, []), (2, 3, [4, 6]), (3, 6, [])])
def test_linear_probe_saves_every_saveckp_iters_counted_from_the_epoch_start(monkeypatch, every, start, saved):
    """7 iterations: a save after every `every`-th, counted from the epoch's start also in a resumed epoch (so it
    saves where the uninterrupted one did), none at the last (the epoch-end save follows), none with 0 (off).
    Each holds the running meters of the iterations this call ran and the 'skipped' count."""
    monkeypatch.setattr(preemption, "finish", lambda message, stop: pytest.fail(message))
    events = _probe_epoch(every, start)
    assert [it for it, _, _ in events] == saved
    for it, meters, _ in events:
        assert meters["meters"]["loss"][0] == it - start and meters["skipped"] == int(start <= 1 < it)


def test_a_saveckp_iters_save_is_the_mid_epoch_checkpoint_a_stop_signal_writes(monkeypatch):
    """--saveckp_iters 5 and a SIGTERM (stop at the check after iteration 5) call the same save at the same
    point with the same content: iteration, running meters, weights. Both at once: one save, then the stop."""
    def finish(message, stop):
        raise _Stopped(message)

    monkeypatch.setattr(preemption, "finish", finish)
    (by_iters,), (by_signal, stop) = _probe_epoch(5), _probe_epoch(0, signalled=True)
    assert by_iters[0] == by_signal[0] == 5 and by_iters[1] == by_signal[1]
    assert torch.equal(by_iters[2], by_signal[2])
    assert stop[0] == "stop" and "after iteration 5/7 of epoch 0" in stop[1]
    both = _probe_epoch(5, signalled=True)
    assert [e[0] for e in both] == [5, "stop"] and torch.equal(both[0][2], by_signal[2])


@pytest.mark.parametrize("epoch, done, niter, complete", [(1, 5, 9, False), (0, 9, 9, False), (1, 9, 9, True)])
def test_evaluate_notes_how_much_of_which_epoch_a_mid_epoch_checkpoint_holds(epoch, done, niter, complete):
    """--evaluate of a mid-epoch checkpoint of a 2-epoch run: a stop in training or in epoch 0's validation
    leaves a partly trained classifier; a stop in the last epoch's validation (saved after its last iteration)
    leaves a complete one, and the note says so instead of asking for a rerun."""
    trained = {"epoch": epoch, "iteration": done, "epoch_iterations": niter, "args": argparse.Namespace(epochs=2)}
    note = eval_linear.mid_epoch_note(trained, "ckpt.pth.tar")
    if complete:
        assert "all 9 iterations of the last epoch (1)" in note and "training is complete" in note
        assert "rerun" not in note
    else:
        assert f"holds {done} of 9 iterations of epoch {epoch} (of 2, counted from 0)" in note
        assert "partly trained" in note and "rerun without --evaluate" in note
    old = eval_linear.mid_epoch_note({"epoch": 1, "iteration": 9, "args": None}, "ckpt.pth.tar")
    assert "holds 9 iterations of epoch 1," in old and "partly trained" in old  # written before the count was kept


def test_run_record_holds_the_local_crop_size_only_for_slow_fast(tmp_path):
    """DATA.LOCAL_CROP_SIZE sizes only the slow-fast clip of an evaluation: a resume without --slowfast_eval is not
    refused over it; with it, another size is. Lists are recorded by the SHA-1 of their bytes."""
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    cfg = load_config_from(None, ["DATA.LOCAL_CROP_SIZE", "64"])
    plain = evaluation.run_record(argparse.Namespace(slowfast_eval=False), cfg, ("slowfast_eval",),
                                  {"train list": str(tmp_path / "train.csv")})
    assert "DATA.LOCAL_CROP_SIZE" not in plain and plain["DATA.TEST_CROP_SIZE"] == 224
    assert plain["train list"]["sha1"] == "6b474fc3247c4b8f612f93f09773fe5120756461"
    slowfast = evaluation.run_record(argparse.Namespace(slowfast_eval=True), cfg, ("slowfast_eval",), {})
    assert slowfast["DATA.LOCAL_CROP_SIZE"] == 64
    evaluation.check_same_run({**plain, "DATA.LOCAL_CROP_SIZE": 96}, plain, "ckpt", "linear probe", "hint")
    with pytest.raises(ValueError, match=r"DATA.LOCAL_CROP_SIZE: checkpoint 96, this run 64"):
        evaluation.check_same_run({**slowfast, "DATA.LOCAL_CROP_SIZE": 96}, slowfast, "ckpt", "linear probe", "hint")


def test_a_dump_is_checked_against_what_this_machine_holds_of_its_lists(synthetic_root, tmp_path, capsys):
    """--load_features where the lists are not (only the dump was copied there): the lists cannot be compared and are
    not, the rest of the record is; a list there with the dump's content is the dump's list wherever it lies."""
    args = argparse.ArgumentParser(parents=[eval_knn.get_args_parser()]).parse_args(["--dataset", "ucf101"])
    cfg = load_config_from(None, ["DATA.PATH_TO_DATA_DIR", str(synthetic_root / "knn_splits")])
    record = eval_knn.dump_record(args, cfg, "0" * 40, 2, 1)
    tensors = (torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(2), torch.zeros(1))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "ucf101_train_split_1_videos.txt").write_bytes(
        (synthetic_root / "knn_splits" / "ucf101_train_split_1_videos.txt").read_bytes())
    elsewhere = load_config_from(None, ["DATA.PATH_TO_DATA_DIR", str(moved)])  # no val list there
    with pytest.raises(ValueError, match=r"not of one dump \(testlabels.pth has 2 rows, the record 1\)"):
        eval_knn.check_dump("feats", record, tensors[:3] + (torch.zeros(2),), args, elsewhere, torch.device("cpu"))
    given = eval_knn.check_dump("feats", record, tensors, args, elsewhere, torch.device("cpu"))
    assert given == {"pretrained_weights": "", "checkpoint_key": "teacher"}
    assert "the features are of a random init" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"this run: DATA.NUM_FRAMES: dump 8, this run 4\. Scoring"):
        eval_knn.check_dump("feats", record, tensors, args, load_config_from(None, [
            "DATA.PATH_TO_DATA_DIR", str(moved), "DATA.NUM_FRAMES", "4"]), torch.device("cpu"))


def test_num_labels_error_names_the_lists_and_spots_one_based_labels(capsys):
    def lists(path, labels):
        return types.SimpleNamespace(list_file=path, labels=labels)

    mmaction = [lists("/d/splits/ucf101_train_split_1_videos.txt", [0, 5, 100]),
                lists("/d/splits/ucf101_val_split_1_videos.txt", [3])]
    assert evaluation.resolve_num_labels(101, mmaction, "ucf101") == 101
    assert evaluation.resolve_num_labels(None, mmaction, "ucf101") == 101
    assert "Note" not in capsys.readouterr().out
    official = [lists("/d/splits/ucf101_train_split_1_videos.txt", [1, 5, 101]),
                lists("/d/splits/ucf101_val_split_1_videos.txt", [1])]
    assert evaluation.resolve_num_labels(None, official, "ucf101") == 102  # without --num_labels: a note, not silence
    assert ("Note: no label of the ucf101 lists ['/d/splits/ucf101_train_split_1_videos.txt', "
            "'/d/splits/ucf101_val_split_1_videos.txt'] is 0: they look 1-based" in capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"ucf101_train_split_1_videos.txt.*up to 101\. The labels look 1-based"
                                         r".*subtract 1"):
        evaluation.resolve_num_labels(101, official, "ucf101")
    with pytest.raises(ValueError, match=r"up to 100\. Pass the class count as --num_labels") as err:
        evaluation.resolve_num_labels(51, mmaction, "hmdb51")
    assert "1-based" not in str(err.value)


def test_one_based_label_advice_fits_the_dataset(capsys):
    """The 1-based advice names the dataset's own label convention: MMAction2's split lists for UCF/HMDB, the
    sorted class names for Kinetics (no MMAction2 file); none for SSv2, whose ids are its labels JSON's (a subset
    may leave class 0 unused: subtracting 1 would be wrong)."""
    one_based = [types.SimpleNamespace(list_file="/d/train.csv", labels=[1, 2, 4])]
    with pytest.raises(ValueError, match=r"look 1-based .*the lists take 0-based labels, the position of the "
                                         r"video's class in the sorted class names .* subtract 1") as err:
        evaluation.resolve_num_labels(4, one_based, "kinetics400")
    assert "MMAction2" not in str(err.value) and "UCF" not in str(err.value)
    assert evaluation.resolve_num_labels(None, one_based, "kinetics400") == 5
    assert "sorted class names" in capsys.readouterr().out
    assert evaluation.resolve_num_labels(None, one_based, "ssv2") == 5
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match=r"up to 4\. Pass the class count as --num_labels") as err:
        evaluation.resolve_num_labels(4, one_based, "ssv2")
    assert "1-based" not in str(err.value)


def test_load_classifier_state_strips_ddp_prefix_and_checks_shape():
    src = LinearClassifier(10, 4)
    dst = LinearClassifier(10, 4)
    load_classifier_state(dst, {f"module.{k}": v for k, v in src.state_dict().items()}, "ckpt")
    torch.testing.assert_close(dst.linear.weight, src.linear.weight)
    with pytest.raises(ValueError, match="--num_labels"):
        load_classifier_state(LinearClassifier(10, 5), src.state_dict(), "ckpt")
    with pytest.raises(KeyError, match="linear classifier"):
        load_classifier_state(dst, {"fc.weight": src.linear.weight}, "ckpt")
    # A classifier trained with --feature_bn and one without: the error names the flag to pass.
    with pytest.raises(KeyError, match="--feature_bn True"):
        load_classifier_state(dst, LinearClassifier(10, 4, feature_bn=True).state_dict(), "ckpt")
    with pytest.raises(KeyError, match="--feature_bn False"):
        load_classifier_state(LinearClassifier(10, 4, feature_bn=True), src.state_dict(), "ckpt")


def test_multi_view_aggregation_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0],   # video 0
                           [0.0, 5.0], [2.0, 1.0], [1.0, 1.0]])  # video 1
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(aggregate_views(logits, ids, 2, "sum"), torch.tensor([[4.0, 2.0], [3.0, 7.0]]))
    p = logits.softmax(1)
    expected = torch.stack([p[:3].mean(0), p[3:].mean(0)])
    torch.testing.assert_close(aggregate_views(logits, ids, 2, "softmax"), expected)
    # By hand for video 0: softmax rows (0.2689, 0.7311), (0.9526, 0.0474), (0.5, 0.5).
    torch.testing.assert_close(aggregate_views(logits, ids, 2, "softmax")[0],
                               torch.tensor([(0.26894 + 0.95257 + 0.5) / 3, (0.73106 + 0.04743 + 0.5) / 3]),
                               atol=1e-4, rtol=0)
    assert video_labels(torch.tensor([3, 3, 3, 1, 1, 1]), 3).tolist() == [3, 1]


def test_multi_view_leaves_out_skipped_clips_and_videos():
    """3 videos x 2 clips: video 0 has one unreadable clip (scored on the other), video 1 none decoded
    (left out), video 2 fine."""
    logits = torch.tensor([[5.0, 0.0], [-9.0, 9.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
    returned = torch.tensor([0, -1, -1, -1, 1, 1])
    stats = multi_view_stats(logits, returned, torch.tensor([0, 0, 1, 1, 1, 1]), num_clips=2, ensemble="sum",
                             num_labels=2)
    # video 0: [5, 0] -> class 0 (right); video 2: [2, 1] -> class 0 (wrong, label 1).
    assert stats["multiview_acc1"] == 50.0 and stats["num_videos"] == 2
    assert (stats["multiview_skipped_videos"], stats["multiview_skipped_clips"]) == (1, 3)
    with pytest.raises(RuntimeError, match="different labels"):
        video_labels(torch.tensor([3, 3, 1, 1, 1, 1]), 3)


def test_multi_view_of_fully_decoded_clips_scores_every_video_and_leaves_the_logits_as_they_were():
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 1.0]])  # video 0: [1, 3] -> 1; video 1: [2, 1] -> 0
    before = logits.clone()
    for ensemble in ("sum", "softmax"):
        stats = multi_view_stats(logits, torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]), num_clips=2,
                                 ensemble=ensemble, num_labels=2)
        assert stats["multiview_acc1"] == 50.0 and stats["num_videos"] == 2 and stats["multiview_skipped_clips"] == 0
        assert torch.equal(logits, before)


def test_clip_features_last_blocks_avgpool_and_slowfast():
    model = tiny_vit(depth=3)
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        blocks = model.get_intermediate_layers(x, 3)
        f1 = clip_features(model, x, 1, False)
        f3 = clip_features(model, x, 3, True)
        torch.testing.assert_close(f1, model(x))  # the last CLS through the final norm
        assert f3.shape == (2, 48 * 4)
        torch.testing.assert_close(f3[:, :48], blocks[0][:, 0])
        torch.testing.assert_close(f3[:, 96:144], blocks[2][:, 0])
        torch.testing.assert_close(f3[:, 144:], blocks[2][:, 1:].mean(1))
        # Slow-fast: a 2-frame 32x32 clip and an 8-frame 16x16 clip, features averaged.
        fast = torch.randn(2, 3, 8, 16, 16)
        sf = clip_features(model, [x, fast], 2, False)
        assert sf.shape == (2, 96)
        torch.testing.assert_close(sf, (clip_features(model, x, 2, False) + clip_features(model, fast, 2, False)) / 2)


# ------------------------------------------------------------------------------------------------------
# Strict checkpoint loading
# ------------------------------------------------------------------------------------------------------
def _cfg():
    return load_config_from(None, ["DATA.TRAIN_CROP_SIZE", "32", "DATA.NUM_FRAMES", "2"])


def _load(path, arch: str = "vit_tiny"):
    return load_backbone(arch, _cfg(), torch.device("cpu"), str(path), "teacher")


def test_load_backbone_reads_a_training_checkpoint(tmp_path):
    src = build_backbone("vit_tiny", _cfg())
    teacher = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(8, 1)
    student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 3, "args": argparse.Namespace(lr=1)},
               tmp_path / "checkpoint.pth")
    model = _load(tmp_path / "checkpoint.pth")
    torch.testing.assert_close(model.state_dict(), src.state_dict())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_load_backbone_rejects_wrong_architecture_and_foreign_files(tmp_path):
    torch.save({"backbone." + k: v for k, v in build_backbone("vit_small", _cfg()).state_dict().items()},
               tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"small\.pth: shape of 'cls_token' is \(1, 1, 384\) in the file but "
                                         r"\(1, 1, 192\) in the model.*The file holds a 384-wide, 12-block model "
                                         r"with 16-px patches \(--arch vit_small --patch_size 16 --opts MODEL.DEPTH 12; "
                                         r"torch.hub: embed_dim=384, depth=12, num_heads=6, patch_size=16\)"):
        _load(tmp_path / "small.pth")
    torch.save({"backbone." + k: v for k, v in build_backbone("vit_tiny", _cfg(), depth=2).state_dict().items()},
               tmp_path / "shallow.pth")
    with pytest.raises(ValueError, match=r"has 2 blocks but --arch vit_tiny builds 12 .*--opts MODEL.DEPTH 2"):
        _load(tmp_path / "shallow.pth")
    torch.save({"backbone." + k: v for k, v in build_backbone("vit_tiny", _cfg(), depth=2).state_dict().items()
                if k.startswith("blocks.")}, tmp_path / "blocks_only.pth")
    with pytest.raises(ValueError, match="does not fit --arch vit_tiny"):  # non-block weights missing too
        _load(tmp_path / "blocks_only.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"no key of .*resnet\.pth .*matches the model"):
        _load(tmp_path / "resnet.pth")


def test_a_missing_classifier_file_names_the_flag_that_gave_it(tmp_path):
    """--lc_pretrained_weights of a file that is not there is named as such; it used to be reported as '--evaluate:
    ... pass --lc_pretrained_weights', the flag the user had passed."""
    given = str(tmp_path / "typo.pth.tar")
    with pytest.raises(FileNotFoundError, match=rf"^--lc_pretrained_weights {given}: no such file"):
        eval_linear.load_trained_classifier(given, own=False)
    with pytest.raises(FileNotFoundError, match="^--evaluate: no trained classifier at .*pass --lc_pretrained_weights"):
        eval_linear.load_trained_classifier(given, own=True)


def test_parsers_accept_legacy_local_rank():
    for parser in (eval_knn.get_args_parser(), eval_linear.get_args_parser()):
        assert parser.parse_args(["--local-rank=3"]).local_rank == 3
        assert parser.parse_args(["--local_rank", "2"]).local_rank == 2


@pytest.mark.parametrize("script, argv", [(eval_linear, ["--data_path", "/data/ucf101"]),
                                          (eval_linear, ["--use_flow", "False"]), (eval_linear, ["--use_flow"]),
                                          (eval_knn, ["--data_path=/data/ucf101"])])
def test_the_original_s_dropped_options_are_errors_saying_what_to_pass(script, argv, capsys):
    """The original's eval_linear.py --data_path / --use_flow and eval_knn.py --data_path (DINO's scripts read
    --data_path) did nothing there; argparse only said 'unrecognized arguments'. Without them the args hold no such
    attribute (config files and run records stay as they were)."""
    parser = script.get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--opts", "DATA.NUM_FRAMES", "4"])
    err = capsys.readouterr().err
    assert f"{argv[0].split('=')[0]} is an option of the original that svt does not take: " in err
    assert ("DATA.PATH_TO_DATA_DIR" if "data_path" in argv[0] else "optical-flow branch") in err
    args = parser.parse_args(["--opts", "DATA.NUM_FRAMES", "4"])
    assert not hasattr(args, "data_path") and not hasattr(args, "use_flow")


def test_linear_results_count_replaced_train_samples_and_skipped_eval_videos_apart():
    """Replaced training draws and val/test videos left out are two counts under their own keys, never added. A
    video left out of the val pass and of the multi-view test of the same list counts once."""
    same = types.SimpleNamespace(list_file="/d/ucf101_val_split_1_videos.txt")
    other = types.SimpleNamespace(list_file="/d/test.csv")
    stats = eval_linear.with_unreadable_counts({"acc1": 50.0}, 6, {3, 4}, {4, 7, 9}, same, same)
    assert stats == {"acc1": 50.0, "train_replaced_samples": 6, "val_skipped_videos": 2, "skipped_videos": 4}
    stats = eval_linear.with_unreadable_counts({}, 0, {3, 4}, {4}, same, other)
    assert (stats["val_skipped_videos"], stats["skipped_videos"]) == (2, 3)
