"""Per-sample seeding (datasets/seeding.py): the draws of a sample depend on (seed, epoch, position in the
epoch's order), not on the number of ranks or loader workers; a mid-epoch resume continues after the videos
already done, whatever the new global batch."""
import argparse
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets.seeding import SeededDataset, SeededDistributedSampler, resume_start_iteration


class RandomDraws(Dataset):
    """Sample i: (i, a torch, a numpy and a python random draw)."""

    def __len__(self) -> int:
        return 15

    def __getitem__(self, i):
        return i, torch.rand(()).item(), float(np.random.rand()), random.random()


def _by_position(world: int, epoch: int = 3, num_workers: int = 0) -> dict[int, tuple]:
    """{global position: sample} of one epoch, each rank's loader run in turn."""
    out = {}
    for rank in range(world):
        sampler = SeededDistributedSampler(RandomDraws(), seed=7, num_replicas=world, rank=rank, shuffle=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(SeededDataset(RandomDraws()), sampler=sampler, batch_size=None,
                            num_workers=num_workers)
        for i, sample in enumerate(loader):
            out[rank + i * world] = tuple(float(x) for x in sample)
    return out


def test_samples_do_not_depend_on_ranks_or_workers():
    one = _by_position(1)
    assert sorted(int(s[0]) for s in one.values()) == list(range(15))
    assert len({s[1] for s in one.values()}) == 15  # every sample its own draws
    for world, workers in ((2, 0), (3, 0), (1, 2)):
        other = _by_position(world, num_workers=workers)
        # 15 videos over 2 ranks: position 15 repeats the first video (DistributedSampler's padding)
        assert {p: other[p] for p in range(15)} == one
    assert _by_position(1, epoch=4) != one


def test_skip_drops_the_first_samples_of_each_rank():
    sampler = SeededDistributedSampler(RandomDraws(), seed=7, num_replicas=2, rank=1)
    full = list(sampler)
    sampler.skip = 3
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3


@pytest.mark.parametrize("saved, now, multiple, start", [
    ((4, 2), (4, 2), 1, 3),   # same global batch: same iteration
    ((8, 1), (4, 2), 1, 3),   # same global batch, other split over processes
    ((4, 2), (4, 1), 1, 6),   # a process lost: 24 videos done = 6 iterations of 4
    ((4, 1), (4, 2), 1, 1),   # 12 videos done, 1 iteration of 8 (4 videos seen again)
    ((2, 1), (4, 1), 2, 0),   # with accumulation: whole optimizer steps of this run only
    ((2, 1), (1, 1), 2, 6),
])
def test_resume_start_iteration_counts_the_videos_done(saved, now, multiple, start, capsys):
    saved_args = argparse.Namespace(batch_size_per_gpu=saved[0], world_size=saved[1])
    assert resume_start_iteration(3, saved_args, *now, multiple=multiple) == start
    assert ("Note:" in capsys.readouterr().out) == (saved[0] * saved[1] != now[0] * now[1])
    assert resume_start_iteration(0, saved_args, *now, multiple=multiple, what="epoch 5") == 0
    # at an epoch boundary nothing of the epoch is done: no "0 videos of epoch 5 were done"
    boundary = (f"Note: the checkpoint was written at an epoch boundary with a global batch of {saved[0] * saved[1]} "
                f"videos ({saved[1]} process{'es' if saved[1] > 1 else ''} x {saved[0]}), this run {now[0] * now[1]}: "
                "epoch 5 runs with the new batch from its start.\n")
    assert capsys.readouterr().out == (boundary if saved[0] * saved[1] != now[0] * now[1] else "")


def test_resume_start_iteration_with_another_accumulation_only_says_so(capsys):
    """A checkpoint saved after 13 iterations of 8 videos (a run without accumulation), resumed with the same global
    batch and --accum_iter 8: the run goes back to iteration 8, where its optimizer step starts, and says why (not
    'a global batch of 8 videos, this run 8'). With another global batch as well, the note says both."""
    saved_args = argparse.Namespace(batch_size_per_gpu=8, world_size=1)
    assert resume_start_iteration(13, saved_args, 8, 1, multiple=8, what="epoch 2") == 8
    assert capsys.readouterr().out == (
        "Note: the mid-epoch checkpoint was written after 13 iterations of epoch 2, not a whole number of this run's "
        "optimizer steps of 8 iterations (--accum_iter): continuing at iteration 8, where the step starts (40 videos "
        "are seen again).\n")
    assert resume_start_iteration(16, saved_args, 8, 1, multiple=8) == 16 and capsys.readouterr().out == ""
    assert resume_start_iteration(13, saved_args, 4, 1, multiple=8, what="epoch 2") == 24
    assert capsys.readouterr().out == (
        "Note: the mid-epoch checkpoint was written with a global batch of 8 videos (1 process x 8), this run 4: 104 "
        "videos of epoch 2 were done; continuing at iteration 24, where one of this run's optimizer steps of 8 "
        "iterations starts (8 videos are seen again).\n")
