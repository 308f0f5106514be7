"""A clean stop on a termination signal (SLURM preemption or time limit, `#SBATCH --signal`, torchrun forwarding
SIGTERM): the training loops checkpoint where they are and exit with PREEMPTED_EXIT_STATUS instead of losing the
work done since their last checkpoint.

While training runs, `StopSignals` replaces the handlers of its signals by one that only records the signal (a
Python handler runs between bytecodes of the main thread; it prints nothing, so it cannot re-enter a write in
progress). The loop asks `requested` at steps where every rank synchronises anyway, at most `CHECK_EVERY`
iterations apart: all ranks see the same answer (a signal may reach the ranks at slightly different times) and
stop after the same iteration. Outside training the previous handlers are back.
"""
from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from utils import utils

# SLURM sends SIGTERM at a preemption or the time limit (SIGKILL follows after KillWait, ~30 s), torchrun forwards
# it to its workers; SIGUSR1 is the usual `#SBATCH --signal=USR1@120` warning. (submitit keeps SIGUSR2.)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Exit status of a process that stopped on a signal after writing its checkpoint: "resume me" (requeue the job
# or run the same command again). Errors exit with 1, argparse with 2.
PREEMPTED_EXIT_STATUS = 3
# The longest run of iterations without a stop check: the stop comes at most this many iterations after the
# signal reached the last rank (fewer with a smaller --log_freq). Each check is one small all-reduce.
CHECK_EVERY = 5


class Preempted(SystemExit):
    """Raised by a training loop after it saved its checkpoint on a stop signal; exits with PREEMPTED_EXIT_STATUS.
    `signals`: the stop signals some rank received."""

    def __init__(self, message: str, signals: list[signal.Signals]):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.message, self.signals = message, signals


class StopSignals:
    """Context manager: inside it, `signals` only set a flag (in the main thread; elsewhere nothing is installed).
    `requested(extra)` is the collective answer (did any rank get one). On leaving, the previous handlers are
    back; with `ignore_after_stop`, a Preempted exit leaves the signals ignored instead (for a process that exits
    next)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, ignore_after_stop: bool = False):
        self.signals = tuple(signals)
        self.ignore_after_stop = ignore_after_stop
        self._received = [False] * len(self.signals)
        self._previous: dict = {}
        self.agreed: list[signal.Signals] = []  # the signals some rank received, once `requested` said True

    def _record(self, signum: int, frame) -> None:
        self._received[self.signals.index(signum)] = True

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A process about to exit after a stop ignores the signals: a launcher that stops the other ranks when the
        # first one exits (torchrun, srun --kill-on-bad-exit) sends them one, which must not change their status.
        ignore = self.ignore_after_stop and isinstance(exc, Preempted)
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if ignore else handler)
        self._previous.clear()

    def requested(self, *flags: torch.Tensor) -> tuple[bool, list[bool]]:
        """Whether any rank received a stop signal, and the other boolean scalars `flags` (device tensors, e.g.
        "a non-finite loss") OR-ed over the ranks, in one all-reduce. Every rank must call it at the same step."""
        device = flags[0].device if flags else utils.comm_device()  # NCCL reduces no CPU tensor
        own = torch.tensor(self._received, dtype=torch.int32, device=device)
        values = torch.cat([own, *(f.reshape(1).to(torch.int32) for f in flags)])
        if utils.get_world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        values = [bool(v) for v in values.tolist()]
        self.agreed = [sig for sig, hit in zip(self.signals, values) if hit]
        return bool(self.agreed), values[len(self.signals):]

    def names(self) -> str:
        return "/".join(signal.Signals(sig).name for sig in self.agreed)


def shield_loader_worker() -> None:
    """In a DataLoader worker (utils.seed_worker calls it): outlive the stop signals, which the training process
    turns into a clean stop. slurmstepd signals every process of a job step (SIGTERM at the time limit or a
    preemption, the USR1 that srun passes on), loader workers included, and a worker killed by it makes the
    DataLoader raise in the training process before it can save. SIGUSR1 is ignored; SIGTERM is ignored unless its
    sender is the worker's parent (torch's own rule for its workers: the DataLoader's terminate() of a worker
    stuck at shutdown still ends it, unless a native thread from before this call took the signal)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # Ignored by any thread that takes it (native threads may predate this call and block nothing) ...
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS
        return
    parent = os.getppid()
    # ... but blocked in this thread and the ones it starts, so that a SIGTERM is queued (not dropped) for the
    # thread below, which learns the sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_parent, name="svt-sigterm", daemon=True).start()


def is_check_step(done: int, total: int) -> bool:
    """Whether the step after which `done` of the epoch's `total` iterations are done checks for a stop: every
    CHECK_EVERY iterations and at the last one."""
    return done % CHECK_EVERY == 0 or done == total


def is_save_step(done: int, total: int, every: int, group: int = 1) -> bool:
    """Whether the step after which `done` of the epoch's `total` iterations are done writes a mid-epoch checkpoint
    (--saveckp_iters `every`, 0: never): the `group` iterations the step ended (eval_finetune.py's --accum_iter
    batches of an optimizer step, 1 elsewhere) reached a multiple of `every`, counted from the epoch's start (a
    resumed epoch saves where the uninterrupted one did), and the epoch is not over (the epoch-end save follows)."""
    return every > 0 and done < total and done // every > (done - group) // every


def stop_message(names: str, epoch: int, done: int, total: int, path, interrupted: str = "") -> str:
    """What every rank prints after a stop; `interrupted`: the evaluation pass the stop abandoned (a resume runs
    it again)."""
    during = f" (in {interrupted}, which a resume runs again)" if interrupted else ""
    return (f"Stop signal {names}: every rank stopped after iteration {done}/{total} of epoch {epoch}{during} and "
            f"{path} holds it. Exiting with status {PREEMPTED_EXIT_STATUS}: run the same command again (or requeue "
            "the job) to resume exactly there.")


def stop_check(stop: StopSignals, path, epoch: int, niter: int, interrupted: str, save=None):
    """The `check_stop` of an evaluation pass after the `niter` iterations of `epoch`'s training
    (utils.evaluation.extract_features_and_labels: every rank calls it after the same batches): on a stop signal
    every rank calls `save` (if any: what `path` must hold for a resume), then ends the run (Preempted), abandoning
    the pass `interrupted`, which a resume runs again."""
    def check() -> None:
        if stop.requested()[0]:
            if save is not None:
                save()
            finish(stop_message(stop.names(), epoch, niter, niter, path, interrupted), stop)
    return check


def finish(message: str, stop: StopSignals) -> None:
    """After the checkpoint is written: wait until every rank got here (rank 0 has finished its save, so a
    launcher that stops the job at the first exit cannot cut it short), print, raise Preempted."""
    if utils.get_world_size() > 1:
        dist.barrier()
    print(message, force=True, flush=True)  # every rank: each SLURM task's log says why it ended
    raise Preempted(message, stop.agreed)
