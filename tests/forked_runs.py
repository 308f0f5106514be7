"""kill -9 tests: one python process runs a script's entry point once per job, each in a forked child that the
job may kill (SIGKILL) at a chosen point. torch is imported once, in the parent, which runs no torch op, so every
child computes alike and starts fast."""
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_forked(jobs: list, child) -> list[int]:
    """In the runner process: `child(kill_at, argv)` for each (kill_at, log file, argv) job, one after the other,
    each in a forked child whose stdout and stderr go to the log file (what it printed survives a kill). A child
    exits with 0 when `child` returns, 1 (traceback logged) when it raises. Returns the exit statuses, -N for a
    child killed by signal N."""
    statuses = []
    for kill_at, log_file, argv in jobs:
        pid = os.fork()
        if pid == 0:
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            status = 0
            try:
                child(kill_at, argv)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        statuses.append(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
    return statuses


def run_jobs(runner: str, folder: Path, jobs: list[tuple[str, Path, list[str]]], env: dict | None = None) -> list[int]:
    """Run the `runner` script (its source: formatted with root=, it reads a JSON list of (kill_at, log file, argv)
    jobs from argv[1], calls run_forked and prints the statuses as JSON) in a fresh one-thread process outside any
    torchrun environment, `env` added to its environment; returns the exit statuses (-9: killed)."""
    path = folder / "kill_runner.py"
    path.write_text(runner.format(root=str(ROOT)))
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env = {**base, "OMP_NUM_THREADS": "1", **(env or {})}
    jobs = [(kill_at, str(log), argv) for kill_at, log, argv in jobs]
    proc = subprocess.run([sys.executable, str(path), json.dumps(jobs)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])
