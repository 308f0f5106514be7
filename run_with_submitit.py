"""Submit SVT pretraining (train_ssl.py) to SLURM with submitit; a preempted or timed-out job is requeued and
resumes from <output_dir>/checkpoint.pth.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 4320 \
        --data_path /data/k400/annotations --output_dir checkpoints/svt_k400 --opts DATA.PATH_PREFIX /data/k400/videos

Every train_ssl.py argument is accepted, with the launch scripts' recipe as defaults (scripts/common.sh
recipe_defaults: 8 clips per GPU, outputs in checkpoints/svt_test, the train list in data/kinetics400/annotations).
submitit is optional: `pip install submitit`. Without SLURM (no `srun`), submitit runs the job on this machine.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shlex
import signal
from pathlib import Path

import train_ssl
from datasets.video_dataset import read_video_list
from utils import preemption, utils

ROOT = Path(__file__).resolve().parent
# scripts/common.sh recipe_defaults, where they differ from train_ssl.py's argparse defaults (the original's).
RECIPE_DEFAULTS = {"batch_size_per_gpu": 8, "output_dir": str(ROOT / "checkpoints" / "svt_test"),
                   "data_path": str(ROOT / "data" / "kinetics400" / "annotations")}
JOB_NAME = "svt"
# Seconds between SLURM's warning signal and the kill: time for submitit to requeue the job.
SIGNAL_DELAY_S = 120


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "SVT pretraining with submitit", parents=[train_ssl.get_args_parser()],
        epilog="Defaults that differ from train_ssl.py's (scripts/common.sh's recipe): "
               + ", ".join(f"--{k} {v}" for k, v in RECIPE_DEFAULTS.items()) + ".")
    parser.set_defaults(**RECIPE_DEFAULTS)
    group = parser.add_argument_group("submitit / SLURM")
    group.add_argument("--ngpus", default=4, type=int, help="""GPUs per node; one process (task) per GPU.
        The global batch is --batch_size_per_gpu x ngpus x nodes (the original: 8 x 4 x 1 = 32). Each process
        gets --num_workers CPU cores for its decoders (10 by default, as scripts/slurm_train.sh).""")
    group.add_argument("--nodes", default=1, type=int, help="Nodes to request.")
    group.add_argument("--timeout", default=4320, type=int, help="""Job time limit in minutes (4320 = 72 h, as
        scripts/slurm_train.sh). A job that reaches it is requeued and resumes from checkpoint.pth at most
        --max_num_timeout times; preemptions are always requeued. Nothing is redone: on submitit's signal (120 s
        before the end) every rank stops at the same step and writes checkpoint.pth first. --saveckp_iters only
        guards against a kill that comes without that signal (a node failure, a job killed out of memory).""")
    group.add_argument("--max_num_timeout", default=3, type=int, help="""How many times a job that reached
        --timeout is requeued (submitit's default 3). Raise it when the run needs more than (1 + this) time
        limits, e.g. on a partition capped at 24 h.""")
    group.add_argument("--partition", default=None, type=str, help="SLURM partition (default: the cluster's).")
    group.add_argument("--constraint", default=None, type=str,
                       help="SLURM node constraint, e.g. volta32gb for the 32 GB V100s of clusters that label them so.")
    group.add_argument("--comment", default=None, type=str,
                       help="SLURM comment, e.g. the reason some clusters ask for on a priority partition.")
    group.add_argument("--mem_gb", default=None, type=int, help="""Memory per node in GB (default: the
        partition's). Each GPU's process and its --num_workers decoders hold videos in memory: if jobs die
        out of memory, ask for more.""")
    group.add_argument("--job_dir", default=None, type=str, help="""Folder for submitit's job files and the
        logs of every task (default: <output_dir>/submitit). It must be on a filesystem every node can read.""")
    return parser


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise SystemExit("run_with_submitit.py needs submitit (optional, not in requirements.txt): "
                         "pip install submitit") from None
    return submitit


def preemption_signal(submitit) -> signal.Signals:
    """The signal submitit requeues on: SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another."""
    return signal.Signals["SIG" + getattr(submitit.JobEnvironment, "USR_SIG", "USR2")]


def set_distributed_env(job_env) -> None:
    """The torchrun variables utils.init_distributed_mode reads, from a submitit.JobEnvironment: the rank,
    world size and local rank of this task, the job's first host as MASTER_ADDR and a port derived from the
    job id (the same on every node, and different for two jobs that share a node)."""
    os.environ["RANK"] = str(job_env.global_rank)
    os.environ["WORLD_SIZE"] = str(job_env.num_tasks)
    os.environ["LOCAL_RANK"] = str(job_env.local_rank)
    os.environ["MASTER_ADDR"] = job_env.hostnames[0]
    job_number = int(re.sub(r"\D", "", str(job_env.job_id)) or 0)
    os.environ["MASTER_PORT"] = str(20000 + job_number % 10000)


class Trainer:
    """What every task of the job runs. On preemption or timeout submitit calls `checkpoint` (in the rank-0
    task) and requeues what it returns: the same arguments, so train_ssl resumes from its checkpoint.pth."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> None:
        submitit = import_submitit()
        set_distributed_env(submitit.JobEnvironment())
        args = copy.deepcopy(self.args)  # train_svt writes rank, gpu, ... into its args; a requeue starts clean
        # submitit's preemption / timeout signal first makes every rank stop at the same step and write the
        # mid-epoch checkpoint (nothing is lost); then submitit's own handler, back in place, gets the signal and
        # requeues the job from rank 0 as it always did. SIGTERM stays submitit's (ignored).
        requeue_signal = preemption_signal(submitit)
        try:
            with utils.named_rank_failures(args.dist_timeout):
                train_ssl.train_svt(args, stop_signals=(requeue_signal,))
        except preemption.Preempted:
            signal.raise_signal(requeue_signal)  # submitit's handler: requeue (rank 0) and end the task
            raise

    def checkpoint(self):
        submitit = import_submitit()
        print(f"Requeued: the job resumes from {Path(self.args.output_dir) / 'checkpoint.pth'}.", flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.args))


def main(argv: list[str] | None = None, cluster: str | None = None):
    """Submit the job (`cluster`: submitit's choice by default; "local" runs it on this machine)."""
    args = get_args_parser().parse_args(argv)
    submitit = import_submitit()
    args.output_dir = os.path.abspath(args.output_dir)
    job_dir = os.path.abspath(args.job_dir or os.path.join(args.output_dir, "submitit"))
    # Fail here rather than after the wait in the queue: the train list and its video paths under
    # DATA.PATH_PREFIX (checked to exist, not decoded), the config and --opts keys, the flags, the folders.
    cfg = train_ssl.prepare_config(copy.deepcopy(args))
    read_video_list(os.path.join(cfg.DATA.PATH_TO_DATA_DIR, "train.csv"), cfg.DATA.PATH_PREFIX,
                    cfg.DATA.PATH_LABEL_SEPARATOR)
    train_ssl.check_args(args)
    utils.check_writable_dir(args.output_dir, writes=train_ssl.OUTPUT_WRITES)
    utils.check_writable_dir(job_dir, "--job_dir")

    executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster, slurm_max_num_timeout=args.max_num_timeout,
                                     local_max_num_timeout=args.max_num_timeout)
    # The job runs `python -m submitit.core._submit`, which must find this repository's modules.
    setup = [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    executor.update_parameters(
        name=JOB_NAME, nodes=args.nodes, tasks_per_node=args.ngpus, gpus_per_node=args.ngpus,
        cpus_per_task=max(args.num_workers, 1), timeout_min=args.timeout, mem_gb=args.mem_gb,
        slurm_partition=args.partition, slurm_constraint=args.constraint, slurm_comment=args.comment,
        slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_setup=setup, local_setup=setup)
    job = executor.submit(Trainer(args))
    print(f"Submitted job {job.job_id}: logs in {job_dir}, checkpoints and log.txt in {args.output_dir}.")
    return job


if __name__ == "__main__":
    main()
