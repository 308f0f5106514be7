"""What the launch scripts pass: the command each one builds (recorded by a stand-in launcher, nothing is
trained) parsed by the real argparse parser and config loader, i.e. the run the script would start."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.parser import load_config

ROOT = Path(__file__).resolve().parents[1]
RECORD = 'printf "%s\\n" "$@" > "$ARGV_OUT"'


def _launch(tmp_path, script, args=(), expect_rc=0, **env_vars):
    """Run scripts/`script` with `$PYTHON -m torch.distributed.run` replaced by a recorder (a bare `torchrun`, which
    may belong to another interpreter than the one check_deps checked, fails); returns (argv after the .py program,
    the program name, stderr), or only stderr when the script is to stop with `expect_rc` before launching."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text("#!/bin/sh\necho 'launched with torchrun, not $PYTHON' >&2\nexit 97\n")
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "torch.distributed.run" ]; then shift 2; {RECORD}; '
                      f'exit 0; fi\nexec {sys.executable} "$@"\n')
    for tool in (bin_dir / "torchrun", python):
        tool.chmod(0o755)
    project = tmp_path / "project"  # train.sh makes checkpoints/$EXP_NAME under PROJECT_PATH: not in the repo
    project.mkdir(exist_ok=True)
    if not (project / "scripts").exists():
        (project / "scripts").symlink_to(ROOT / "scripts")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.csv").write_text("a.mp4 0\n")
    for lists in ("splits", "knn_splits"):
        (data / lists).mkdir(exist_ok=True)
    (tmp_path / "c.pth").touch()
    (tmp_path / "argv.txt").unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), "GPUS": "1",
           "PROJECT_PATH": str(project), "DATA_PATH": str(data), "CHECKPOINT": str(tmp_path / "c.pth"),
           "ARGV_OUT": str(tmp_path / "argv.txt"), **env_vars}
    for name in ("BATCH_SIZE", "EPOCHS", "NNODES", "EXTRA_OPTS", "LIST_DIR", "VIDEO_DIR", "OUTPUT_DIR", "MASTER_PORT"):
        if name not in env_vars:
            env.pop(name, None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == expect_rc, run.stderr
    if expect_rc:
        assert not (tmp_path / "argv.txt").exists()  # nothing was launched
        return run.stderr
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    program = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    return argv[program + 1:], Path(argv[program]).name, run.stderr


def _parse(program: str, argv: list[str]):
    module = __import__(program.removesuffix(".py"))
    args = module.get_args_parser().parse_args(argv)
    return args, load_config(args)


@pytest.mark.parametrize("script, list_dir", [("eval_knn.sh", "knn_splits"), ("eval_linear.sh", "splits"),
                                              ("finetune.sh", "splits")])
def test_eval_script_takes_the_users_opts_after_its_own(tmp_path, script, list_dir):
    argv, program, _ = _launch(tmp_path, script, ["--num_workers", "2", "--opts", "DATA.NUM_FRAMES", "16"],
                               EXTRA_OPTS="TEST.NUM_SPATIAL_CROPS 1")
    assert argv.count("--opts") == 1
    args, cfg = _parse(program, argv)
    assert args.num_workers == 2 and cfg.DATA.NUM_FRAMES == 16 and cfg.TEST.NUM_SPATIAL_CROPS == 1
    assert cfg.DATA.PATH_TO_DATA_DIR == str(tmp_path / "data" / list_dir)
    assert cfg.DATA.PATH_PREFIX == str(tmp_path / "data" / "videos")


@pytest.mark.parametrize("script, list_dir", [("eval_knn.sh", "knn_splits"), ("eval_linear.sh", "splits"),
                                              ("finetune.sh", "splits")])
def test_eval_script_checks_its_inputs_before_launching(tmp_path, script, list_dir):
    data = tmp_path / "my data"  # a space in the path, as users have them
    # VIDEO_DIR sets the prefix; the list folder and the checkpoint may hold spaces.
    data.mkdir()
    (data / list_dir).mkdir()
    argv, program, _ = _launch(tmp_path, script, DATA_PATH=str(data), VIDEO_DIR="/v ideos")
    _, cfg = _parse(program, argv)
    assert cfg.DATA.PATH_TO_DATA_DIR == str(data / list_dir) and cfg.DATA.PATH_PREFIX == "/v ideos"
    # A DATA_PATH without the list folder: stopped, naming the folder and the variables that set it.
    err = _launch(tmp_path, script, expect_rc=2, DATA_PATH=str(tmp_path / "k400"))
    assert f"list folder {tmp_path / 'k400' / list_dir} not found" in err and "LIST_DIR=" in err and "DATA_PATH" in err
    # ... unless the user's --opts name the folder (the program checks it then).
    argv, program, _ = _launch(tmp_path, script, ["--opts", "DATA.PATH_TO_DATA_DIR", "/lists"],
                               DATA_PATH=str(tmp_path / "k400"))
    assert _parse(program, argv)[1].DATA.PATH_TO_DATA_DIR == "/lists"
    err = _launch(tmp_path, script, expect_rc=2, CHECKPOINT=str(tmp_path / "nope.pth"))
    assert f"CHECKPOINT={tmp_path / 'nope.pth'} is not a file" in err


def test_eval_scripts_pass_the_originals_settings(tmp_path):
    argv, program, _ = _launch(tmp_path, "eval_linear.sh")
    args, _ = _parse(program, argv)
    assert (args.n_last_blocks, args.arch, args.epochs, args.lr, args.batch_size_per_gpu, args.num_workers,
            args.num_labels) == (1, "vit_base", 20, 0.001, 16, 4, 101)
    argv, program, _ = _launch(tmp_path, "eval_knn.sh")
    args, _ = _parse(program, argv)
    assert (args.arch, args.nb_knn, args.temperature, args.batch_size_per_gpu, args.num_workers) \
        == ("vit_base", [5], 0.07, 128, 4)


@pytest.mark.parametrize("script", ["eval_linear.sh", "finetune.sh"])
def test_eval_scripts_take_the_class_count_of_the_dataset(tmp_path, script):
    (tmp_path / "data" / "annotations").mkdir(parents=True)  # finetune.sh's Kinetics lists
    for dataset, labels in (("hmdb51", 51), ("kinetics400", 400), ("ssv2", 174)):
        argv, program, _ = _launch(tmp_path, script, DATASET=dataset)
        assert _parse(program, argv)[0].num_labels == labels
    argv, program, _ = _launch(tmp_path, script, DATASET="hmdb51", NUM_LABELS="7")  # NUM_LABELS wins
    assert _parse(program, argv)[0].num_labels == 7
    assert "unknown DATASET=ucf" in _launch(tmp_path, script, expect_rc=2, DATASET="ucf")


def test_train_script_runs_the_originals_recipe(tmp_path):
    argv, program, _ = _launch(tmp_path, "train.sh", ["--opts", "DATA.PATH_PREFIX", "/videos"])
    args, cfg = _parse(program, argv)
    assert (args.arch, args.batch_size_per_gpu, args.epochs, args.warmup_epochs, args.weight_decay_end) \
        == ("timesformer", 8, 100, 10, 0.4)
    assert args.data_path == str(tmp_path / "data") and cfg.DATA.PATH_PREFIX == "/videos"
    assert not cfg.DATA.RAND_FR and list(cfg.DATA.LOCAL_NUM_FRAMES) == []


@pytest.mark.parametrize("gpus, nnodes, batch", [("4", "1", 8), ("8", "1", 4), ("4", "2", 4), ("2", "1", 8)])
def test_paper_script_keeps_the_papers_global_batch(tmp_path, gpus, nnodes, batch):
    extra = {"NNODES": nnodes, "NODE_RANK": "0", "MASTER_ADDR": "node0"} if nnodes != "1" else {}
    argv, program, stderr = _launch(tmp_path, "train_paper.sh", ["--opts", "DATA.PATH_PREFIX", "/videos"],
                                    GPUS=gpus, **extra)
    args, cfg = _parse(program, argv)
    assert args.batch_size_per_gpu == batch
    assert ("not the paper's 32" in stderr) == (batch * int(gpus) * int(nnodes) != 32)
    assert (args.epochs, args.warmup_epochs, args.weight_decay, args.weight_decay_end) == (20, 5, 0.04, 0.1)
    assert list(cfg.DATA.GLOBAL_NUM_FRAMES) == [8, 16] and list(cfg.DATA.LOCAL_NUM_FRAMES) == [2, 2, 4, 4, 8, 8, 16, 16]
    assert cfg.DATA.PATH_PREFIX == "/videos"
    argv, program, _ = _launch(tmp_path, "train_paper.sh", GPUS=gpus, BATCH_SIZE="2", **extra)
    assert _parse(program, argv)[0].batch_size_per_gpu == 2  # an explicit BATCH_SIZE wins


@pytest.mark.parametrize("script", ["eval_knn.sh", "eval_linear.sh", "finetune.sh"])
def test_eval_scripts_read_ssv2_frames_from_the_frames_folder(tmp_path, script):
    """DATASET=ssv2: DATA.PATH_PREFIX defaults to $DATA_PATH/frames (the extracted JPEG frames DATASET.md puts
    there), not videos/, in every evaluation launcher."""
    (tmp_path / "data" / "annotations").mkdir(parents=True)  # finetune.sh's SSv2 lists
    argv, program, _ = _launch(tmp_path, script, DATASET="ssv2")
    assert _parse(program, argv)[1].DATA.PATH_PREFIX == str(tmp_path / "data" / "frames")


@pytest.mark.parametrize("env, batch, accum, effective", [
    ({"GPUS": "8"}, 1, 8, 64), ({"GPUS": "4"}, 2, 8, 64), ({"GPUS": "4", "BATCH_SIZE": "1"}, 1, 16, 64),
    ({"GPUS": "1"}, 8, 8, 64), ({"GPUS": "1", "BATCH_SIZE": "4"}, 4, 16, 64), ({"GPUS": "16"}, 1, 4, 64),
    ({"GPUS": "3"}, 1, 22, 66), ({"GPUS": "128"}, 1, 1, 128), ({"GPUS": "8", "ACCUM_ITER": "2"}, 1, 2, 16)])
def test_finetune_script_reaches_timesformers_effective_batch_of_64(tmp_path, env, batch, accum, effective):
    """TimeSformer accumulates gradients to GLOBAL_BATCH_SIZE 64 (8 clips an iteration x 8 iterations) for its lr
    0.005: finetune.sh's defaults do the same on any GPU count, rounding the accumulation up (and saying so) where
    64 clips do not divide; an explicit ACCUM_ITER wins. The run's lr is then --lr x effective / 64."""
    argv, program, stderr = _launch(tmp_path, "finetune.sh", **env)
    args, _ = _parse(program, argv)
    assert (args.batch_size_per_gpu, args.accum_iter, args.lr) == (batch, accum, 0.005)
    assert (f"an effective batch of {effective}, not TimeSformer's 64" in stderr) == (effective != 64)


@pytest.mark.parametrize("args, variable", [(["--batch_size_per_gpu", "2"], "BATCH_SIZE"),
                                            (["--evaluate", "--accum_iter=4"], "ACCUM_ITER"),
                                            (["--batch_size", "2"], "BATCH_SIZE"), (["--acc", "2"], "ACCUM_ITER")])
def test_finetune_script_refuses_batch_flags_that_would_override_its_effective_batch(tmp_path, args, variable):
    """finetune.sh derives ACCUM_ITER's default and the effective-batch warning from BATCH_SIZE / ACCUM_ITER; the
    same flags (or argparse's abbreviations of them) among the user's arguments would come after its own and win,
    e.g. `finetune.sh --batch_size_per_gpu 2` on 8 GPUs training at 128 without a word. They are refused, naming
    the variable to set instead."""
    flag = next(a for a in args if a.startswith(("--b", "--ac"))).split("=")[0]
    parsed = _parse("eval_finetune.py", args)[0]  # what eval_finetune.py would take them for
    assert (parsed.batch_size_per_gpu, parsed.accum_iter) != (8, 1)
    stderr = _launch(tmp_path, "finetune.sh", args, expect_rc=2, GPUS="8")
    assert f"finetune.sh: set {variable}=... instead of passing {flag}:" in stderr


@pytest.mark.parametrize("script", ["eval_knn.sh", "eval_linear.sh", "finetune.sh"])
def test_eval_scripts_rendezvous_on_a_free_port_unless_master_port_is_set(tmp_path, script):
    """Evaluations side by side on one machine (checkpoints scored in parallel, one per GPU): without MASTER_PORT
    each launch is --standalone (torchrun takes a free port); a fixed default port failed the second one with
    EADDRINUSE. A MASTER_PORT that is set (scripts/slurm_eval.sh's, from the job id) is used."""
    def launcher_args(**env_vars) -> list[str]:
        _launch(tmp_path, script, **env_vars)
        argv = (tmp_path / "argv.txt").read_text().splitlines()
        return argv[:next(i for i, a in enumerate(argv) if a.endswith(".py"))]

    assert launcher_args() == ["--standalone", "--nnodes=1", "--nproc_per_node=1"]
    assert launcher_args(MASTER_PORT="15077", GPUS="2") == ["--master_port=15077", "--nproc_per_node=2"]


def test_finetune_script_evaluates_without_checkpoint(tmp_path):
    """`finetune.sh --evaluate` tests OUTPUT_DIR's checkpoint.pth, which holds every weight: it needs no CHECKPOINT
    and passes no --pretrained_weights then; a fine-tuning without CHECKPOINT still stops, naming it."""
    argv, program, _ = _launch(tmp_path, "finetune.sh", ["--evaluate"], CHECKPOINT="")
    args, _ = _parse(program, argv)
    assert args.evaluate and args.pretrained_weights == ""
    argv, program, _ = _launch(tmp_path, "finetune.sh", ["--evaluate"])
    assert _parse(program, argv)[0].pretrained_weights == str(tmp_path / "c.pth")
    stderr = _launch(tmp_path, "finetune.sh", expect_rc=1, CHECKPOINT="")
    assert "set CHECKPOINT to the checkpoint to fine-tune" in stderr
