"""Per-sample seeding: every sample is drawn under its own seed, so augmentations depend only on (seed, epoch,
position in the global shuffled order) - not on the number of workers or ranks - and a resumed run replays them."""
import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


@contextlib.contextmanager
def preserved_rng_state():
    """Restore the torch (CPU, and this process's GPU once CUDA is initialised here), numpy and python RNG
    states on exit. torch.manual_seed also reseeds the GPU: without the GPU's state, samples drawn in the
    training process (--num_workers 0) would reseed the drop-path stream on every clip."""
    np_state, py_state = np.random.get_state(), random.getstate()
    # never in a DataLoader worker: CUDA is not initialised there (and must not be)
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class SeededDistributedSampler(DistributedSampler):
    """DistributedSampler yielding (index, seed) pairs; `skip` drops the first batches (mid-epoch resume; it may
    exceed the epoch when a resume continues after its last batch)."""

    def __init__(self, dataset: Dataset, seed: int = 0, **kwargs):
        super().__init__(dataset, seed=seed, **kwargs)
        self.skip = 0

    def __iter__(self):
        for i, index in enumerate(super().__iter__()):
            if i < self.skip:
                continue
            position = self.rank + i * self.num_replicas
            sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0])
            yield index, sample_seed

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


class SeededDataset(Dataset):
    """Calls `dataset[index]` with torch/numpy/random seeded by the sampler's per-sample seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with preserved_rng_state():
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            return self.dataset[index]


def resume_start_iteration(iteration: int, saved_args, batch_size_per_gpu: int, world_size: int,
                           multiple: int = 1, what: str = "") -> int:
    """The iteration of the interrupted epoch at which this run continues from a mid-epoch checkpoint written
    after `iteration` iterations by a run with `saved_args` (its --batch_size_per_gpu and world size).

    The sampler's order of the epoch does not depend on the batch size or the number of processes, so the
    videos already done are the first `iteration` x (its global batch) of that order. With the same global
    batch that is `iteration`; with another one (fewer or more processes, another --batch_size_per_gpu) it is
    the iterations of this run those videos fill. Either is rounded down to a multiple of `multiple` (e.g.
    --accum_iter, which the checkpoint's run may have had another value of): fewer than one of this run's
    optimizer steps of videos is seen twice, none is left out. `what` names the epoch in the note printed when
    the start moves (also at an epoch boundary, `iteration` 0, where that epoch starts whole)."""
    saved_batch = getattr(saved_args, "batch_size_per_gpu", batch_size_per_gpu)
    saved_world = getattr(saved_args, "world_size", world_size)
    saved_global, global_batch = saved_batch * saved_world, batch_size_per_gpu * world_size
    done = iteration * saved_global
    start = done // (global_batch * multiple) * multiple
    if start * global_batch == done and saved_global == global_batch:
        return start
    processes = f"{saved_world} process{'es' if saved_world > 1 else ''} x {saved_batch}"
    if iteration == 0:
        print(f"Note: the checkpoint was written at an epoch boundary with a global batch of {saved_global} videos "
              f"({processes}), this run {global_batch}: {what or 'the epoch'} runs with the new batch from its start.")
        return 0
    again = f" ({done - start * global_batch} videos are seen again)." if done > start * global_batch else "."
    if saved_global == global_batch:  # only the accumulation differs: the save is inside one of this run's steps
        print(f"Note: the mid-epoch checkpoint was written after {iteration} iterations of {what or 'the epoch'}, not "
              f"a whole number of this run's optimizer steps of {multiple} iterations (--accum_iter): continuing at "
              f"iteration {start}, where the step starts" + again)
        return start
    print(f"Note: the mid-epoch checkpoint was written with a global batch of {saved_global} videos ({processes}), "
          f"this run {global_batch}: {done} videos of {what or 'the epoch'} were done; continuing at iteration {start}"
          + (f", where one of this run's optimizer steps of {multiple} iterations starts" if multiple > 1 else "")
          + again)
    return start
