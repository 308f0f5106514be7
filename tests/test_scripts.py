"""The launch scripts: they stop before launching on a missing train list and check (not install) the
dependencies."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train.sh", "slurm_train.sh"])
def test_train_script_without_data_path_stops_before_launch(tmp_path, script):
    env = {k: v for k, v in os.environ.items() if k != "DATA_PATH"}
    env.update(GPUS="1", PROJECT_PATH=str(ROOT), EXP_NAME=f"review_{tmp_path.name}")
    run = subprocess.run(["bash", str(ROOT / "scripts" / script), "--data_path", str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"{tmp_path / 'nowhere'}/train.csv not found" in run.stderr and "DATA_PATH" in run.stderr
    assert not (ROOT / "checkpoints" / env["EXP_NAME"]).exists()


@pytest.mark.parametrize("mode", ["--check", "test"])
def test_install_deps_refuses_a_torch_older_than_requirements_and_never_replaces_it(tmp_path, mode):
    # a torch 2.4.1 found first on the path (its metadata is all the check reads)
    dist = tmp_path / "torch-2.4.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.4.1\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "install_deps.sh"), mode], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 3
    assert "torch 2.4.1 is older than 2.5, the oldest svt runs on (requirements.txt)" in run.stderr
    assert "never replaces a torch you have" in run.stderr


def test_the_torchcodec_of_each_torch_is_the_one_built_for_it():
    """TorchCodec's README table (0.10: torch 2.10, 0.12 and later: torch >= 2.11) and constraints.txt's tested
    pair; a torch older than the first torchcodec svt can use (requirements.txt's floor) gets none."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import torchcodec_for_torch as pick
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert [pick.requirement(v) for v in ("2.5.1+cu124", "2.9.1", "2.10.0", "2.11.0", "2.13.1", "2.15.0")] == [
        "", "", "torchcodec==0.10.*", "torchcodec>=0.12", "torchcodec>=0.12", "torchcodec>=0.12"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pick.minor(pins["torchcodec"]) >= (0, 12) and pick.requirement(pins["torch"]) == "torchcodec>=0.12"
    assert f"torchcodec>={pick.OLDEST}\n" in (ROOT / "requirements.txt").read_text()
    given = subprocess.run([sys.executable, str(ROOT / "scripts" / "torchcodec_for_torch.py"), "2.10.1"],
                           capture_output=True, text=True, check=True)
    assert given.stdout == "torchcodec==0.10.*\n"  # the torch named on the command line, not the installed one


@pytest.mark.parametrize("torch_version, codec", [("2.5.1", None), ("2.10.1", "torchcodec==0.10.*"),
                                                  ("2.14.1", "torchcodec>=0.12")])
def test_install_deps_installs_the_torchcodec_of_the_torch_there(tmp_path, torch_version, codec):
    """A torch 2.5.1 kept by install_deps.sh got the newest torchcodec (0.17), which does not load. Now pip is given
    requirements.txt with the torchcodec of that torch, or none (a note says so). A stand-in python records the pip call (nothing is installed) and reports einops missing; the torch version is the
    package metadata found first on the path; a stand-in ldconfig finds FFmpeg (no apt)."""
    dist = tmp_path / f"torch-{torch_version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ldconfig").write_text("#!/bin/sh\necho 'libavcodec.so.61 (libc6,x86-64) => /usr/lib/libavcodec.so.61'\n")
    (bin_dir / "python").write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" > {tmp_path / "pip_args"}; '
        f'while [ $# -gt 0 ]; do [ "$1" = "-r" ] && cp "$2" {tmp_path / "requirements.txt"}; shift; done; exit 0; fi\n'
        'case "$2" in *find_spec*) echo einops; exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n')
    for tool in ("ldconfig", "python"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHON": str(bin_dir / "python"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "install_deps.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "-m pip install" in (tmp_path / "pip_args").read_text()
    installed = (tmp_path / "requirements.txt").read_text().splitlines()
    assert [line for line in installed if line.startswith("torchcodec")] == ([codec] if codec else [])
    assert "timm>=0.9" in installed and "torch>=2.5" in installed
    assert ("no torchcodec release svt can use (>= 0.10) is built for this torch" in run.stderr) == (codec is None)


@pytest.mark.parametrize("script", ["train.sh", "slurm_train.sh", "eval_knn.sh", "eval_linear.sh"])
def test_launch_script_without_the_packages_stops_naming_install_deps(tmp_path, script):
    python = tmp_path / "python"  # an interpreter without site-packages: no torch, timm, ...
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "GPUS": "1", "PROJECT_PATH": str(ROOT),
           "CHECKPOINT": str(tmp_path / "c.pth"), "DATA_PATH": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 3
    assert "missing Python packages: torch" in run.stderr and "bash scripts/install_deps.sh" in run.stderr


REQUEUE_CASES = [  # (srun_status, requeue, signal_it, status, requeued)
    (3, "1", False, 3, True),      # the tasks stopped on a signal: requeue
    (3, "0", False, 3, False),     # REQUEUE=0 (or a cluster without requeue): exit 3, resubmit by hand
    (137, "1", True, 3, True),     # the warning reached the script; the launcher ended the others after the first
    (1, "1", False, 1, False),     # an error: no requeue
]


# slurm_eval.sh shares slurm_train.sh's requeue logic (common.sh run_requeueable): only its signal path is its own
@pytest.mark.parametrize("launcher, forwarded, srun_status, requeue, signal_it, status, requeued",
                         [("slurm_train.sh", "USR1", *case) for case in REQUEUE_CASES]
                         + [("slurm_eval.sh", "TERM", *REQUEUE_CASES[2])])
def test_slurm_script_requeues_a_job_stopped_on_a_signal(tmp_path, launcher, forwarded, srun_status, requeue, signal_it,
                                                         status, requeued):
    """scripts/slurm_train.sh (srun train_ssl.py) and scripts/slurm_eval.sh scripts/eval_linear.sh (which execs
    torchrun, `$PYTHON -m torch.distributed.run`) with a fake srun / torchrun (exits with srun_status, after the
    signal the script passes on if signal_it: USR1 to srun, TERM to torchrun) and a fake scontrol that records its
    arguments."""
    import signal
    import time
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ready, got = tmp_path / "launcher_started", tmp_path / "launcher_got"
    tool = "srun" if launcher == "slurm_train.sh" else "torchrun"  # bin/torchrun: run by a python stand-in
    fake = "#!/bin/bash\n"
    fake += (f"trap 'echo USR1 > {got}; exit {srun_status}' USR1\ntrap 'echo TERM > {got}; exit {srun_status}' TERM\n"
             f"touch {ready}\nwhile :; do sleep 0.05; done\n" if signal_it else f"exit {srun_status}\n")
    (bin_dir / tool).write_text(fake)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.txt'}\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "torch.distributed.run" ]; then '
                                    f'exec {bin_dir / "torchrun"}; fi\nexec {sys.executable} "$@"\n')
    for name in (tool, "scontrol", "python"):
        (bin_dir / name).chmod(0o755)
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    (tmp_path / "splits").mkdir()
    (tmp_path / "c.pth").touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROJECT_PATH": str(ROOT),
           "DATA_PATH": str(tmp_path), "EXP_NAME": f"review_{tmp_path.name}", "SLURM_JOB_ID": "77",
           "REQUEUE": requeue, "CHECKPOINT": str(tmp_path / "c.pth"), "PYTHON": str(bin_dir / "python")}
    args = ["scripts/eval_linear.sh"] if launcher == "slurm_eval.sh" else []
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / launcher), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if signal_it:
            deadline = time.time() + 60
            while not ready.exists() and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        if launcher == "slurm_train.sh":
            (ROOT / "checkpoints" / env["EXP_NAME"]).rmdir()
    assert proc.returncode == status, out + err
    assert not signal_it or got.read_text() == f"{forwarded}\n"
    assert ((tmp_path / "scontrol.txt").read_text() == "requeue 77\n") if requeued else \
        not (tmp_path / "scontrol.txt").exists()
    if status == 3:
        assert ("job 77 requeued: it resumes there" in out) if requeued else \
            ("not requeued" in err and "submit the same command again to resume" in err)


def test_slurm_train_jobs_packed_on_one_node_get_their_own_port(tmp_path):
    """Two 4-GPU scripts/slurm_train.sh jobs on one 8-GPU node: each rendezvous at its own MASTER_PORT (derived
    from the job id, the same on every node of a job), not both at 29500. A fake srun records the port."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "$MASTER_PORT" >> {tmp_path / "ports.txt"}\n')
    (bin_dir / "srun").chmod(0o755)
    (tmp_path / "train.csv").write_text("a.mp4 0\n")
    for job in ("77", "78"):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROJECT_PATH": str(ROOT),
               "DATA_PATH": str(tmp_path), "EXP_NAME": f"port_{tmp_path.name}", "SLURM_JOB_ID": job}
        env.pop("MASTER_PORT", None)
        try:
            run = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_train.sh")], env=env, capture_output=True,
                                 text=True, timeout=120)
        finally:
            (ROOT / "checkpoints" / env["EXP_NAME"]).rmdir()
        assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "ports.txt").read_text().split() == ["15077", "15078"]


def test_every_environment_variable_a_script_reads_is_in_its_header():
    """`${NAME:-...}` / `${NAME:?...}` reads of each user-facing script, with those of the scripts/common.sh
    functions it calls, are documented in its header comment (train_paper.sh: "same environment as train.sh")."""
    import re

    def reads(text: str) -> set[str]:
        return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-?+=]", text))

    def header(name: str) -> str:
        lines = (ROOT / "scripts" / name).read_text().splitlines()[1:]
        return "\n".join(line for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))])

    common = (ROOT / "scripts" / "common.sh").read_text()
    functions = dict(re.findall(r"^(\w+)\(\) \{\n(.*?)^\}", common, re.S | re.M))
    # set by the system and SLURM, not by users
    system = {"LD_LIBRARY_PATH", "PYTHONPATH", "SLURM_SUBMIT_DIR", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE"}
    for name in ("train.sh", "train_paper.sh", "slurm_train.sh", "eval_knn.sh", "eval_linear.sh", "finetune.sh",
                 "demo.sh", "test.sh", "install_deps.sh", "slurm_eval.sh"):
        text = (ROOT / "scripts" / name).read_text()
        used = reads(text).union(*(reads(body) for fn, body in functions.items() if re.search(rf"\b{fn}\b", text)))
        documented = set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", header(name)))
        if name == "train_paper.sh":
            documented |= set(re.findall(r"\b[A-Z][A-Z0-9_]+\b", header("train.sh")))
        assert used - system - documented == set(), name


def test_slurm_eval_jobs_sharing_a_node_get_their_own_rendezvous_port(tmp_path):
    """1-GPU linear probes are packed onto multi-GPU nodes: two scripts/slurm_eval.sh jobs there must not both
    bind torchrun's default port (the second one would fail with EADDRINUSE). A python stand-in records the
    arguments of `$PYTHON -m torch.distributed.run`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "torch.distributed.run" ]; then '
                                    f'echo "$@" >> {tmp_path / "torchrun.txt"}; exit 0; fi\n'
                                    f'exec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    (tmp_path / "splits").mkdir()
    (tmp_path / "c.pth").touch()
    for job in ("77", "78"):
        env = {**os.environ, "PROJECT_PATH": str(ROOT), "DATA_PATH": str(tmp_path), "SLURM_JOB_ID": job,
               "CHECKPOINT": str(tmp_path / "c.pth"), "PYTHON": str(bin_dir / "python")}
        env.pop("MASTER_PORT", None)
        run = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_eval.sh"), "scripts/eval_linear.sh"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
    ports = [next(a for a in line.split() if a.startswith("--master_port="))
             for line in (tmp_path / "torchrun.txt").read_text().splitlines()]
    assert len(ports) == 2 and ports[0] != ports[1], ports


def test_slurm_eval_passes_a_repeated_warning_on_once(tmp_path):
    """Two USR1s to scripts/slurm_eval.sh (SLURM's warning and a user's `scancel --signal=USR1`) reach torchrun as
    one TERM: a second TERM would end torchrun's shutdown wait and kill the processes before their checkpoint."""
    import signal
    import time
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ready, got = tmp_path / "launcher_started", tmp_path / "launcher_got"
    release = tmp_path / "release"
    (bin_dir / "torchrun").write_text(f"#!/bin/bash\ntrap 'echo TERM >> {got}' TERM\ntouch {ready}\n"
                                      f"for i in $(seq 1200); do [ -e {release} ] && exit 3; sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "torch.distributed.run" ]; then '
                                    f'exec {bin_dir / "torchrun"}; fi\nexec {sys.executable} "$@"\n')
    for name in ("torchrun", "scontrol", "python"):
        (bin_dir / name).chmod(0o755)
    (tmp_path / "splits").mkdir()
    (tmp_path / "c.pth").touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROJECT_PATH": str(ROOT),
           "DATA_PATH": str(tmp_path), "EXP_NAME": f"review_{tmp_path.name}", "SLURM_JOB_ID": "77",
           "REQUEUE": "0", "CHECKPOINT": str(tmp_path / "c.pth"), "PYTHON": str(bin_dir / "python")}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm_eval.sh"), "scripts/eval_linear.sh"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        while not got.exists() and time.time() < deadline:  # the first warning reached torchrun
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)  # room for a second TERM to arrive (none must)
        release.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, out + err
    assert got.read_text() == "TERM\n"
