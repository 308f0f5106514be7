"""run_with_submitit.py: the parser, the executor's SLURM parameters, the distributed environment of a task,
the requeue, the missing-package message. A small fake `submitit` stands in for the optional package, so these
run without it; with submitit installed, one tiny two-process training also runs as a real local job."""
import builtins
import importlib.util
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import run_with_submitit
import train_ssl
from utils import preemption, utils

ROOT = Path(__file__).resolve().parents[1]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *utils.NCCL_ERROR_ENV)


class FakeExecutor:
    created = []

    def __init__(self, folder, cluster=None, **kwargs):
        self.folder, self.cluster, self.kwargs = folder, cluster, kwargs
        self.parameters, self.submitted = {}, []
        FakeExecutor.created.append(self)

    def update_parameters(self, **params):
        self.parameters.update(params)

    def submit(self, function):
        self.submitted.append(function)
        return types.SimpleNamespace(job_id="4242")


class FakeDelayedSubmission:
    def __init__(self, function, *args, **kwargs):
        self.function, self.args, self.kwargs = function, args, kwargs


@pytest.fixture
def fake_submitit(monkeypatch):
    """A `submitit` module with AutoExecutor (records what it is given), JobEnvironment (the `job_env`
    namespace, editable by the test) and helpers.DelayedSubmission."""
    job_env = types.SimpleNamespace(global_rank=3, num_tasks=8, local_rank=1, hostnames=["gpu007", "gpu008"],
                                    job_id="4242_1")
    helpers = types.ModuleType("submitit.helpers")
    helpers.DelayedSubmission = FakeDelayedSubmission
    module = types.ModuleType("submitit")
    module.AutoExecutor, module.JobEnvironment, module.helpers = FakeExecutor, lambda: job_env, helpers
    module.job_env = job_env
    monkeypatch.setitem(sys.modules, "submitit", module)
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    monkeypatch.setattr(FakeExecutor, "created", [])
    _unset(monkeypatch, DIST_ENV)
    return module


def _unset(monkeypatch, names) -> None:
    """Unset these variables for the test only (delenv alone would not remove what the test sets later)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """annotations/train.csv naming videos/a.mp4 by its absolute path (found with no DATA.PATH_PREFIX), an empty
    file: the submission only checks that it exists, a decode would fail."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").touch()
    (tmp_path / "annotations" / "train.csv").write_text(f"{tmp_path / 'videos' / 'a.mp4'} 0\n")
    return tmp_path / "annotations"


def _option_actions(parser):
    return {action.dest: action for action in parser._actions if action.option_strings}


def test_parser_takes_every_train_ssl_argument_with_its_default_and_the_launcher_options():
    launcher = run_with_submitit.get_args_parser()
    train_actions = _option_actions(train_ssl.get_args_parser())
    launcher_actions = _option_actions(launcher)
    for dest, action in train_actions.items():
        assert set(action.option_strings) <= set(launcher_actions[dest].option_strings), dest
        want = run_with_submitit.RECIPE_DEFAULTS.get(dest, action.default)
        assert launcher.get_default(dest) == want, dest
    own = set(launcher_actions) - set(train_actions)
    assert own == {"help", "ngpus", "nodes", "timeout", "max_num_timeout", "partition", "constraint", "comment",
                   "mem_gb", "job_dir"}

    args = launcher.parse_args(["--nodes", "2", "--ngpus", "8", "--partition", "learnfair", "--timeout", "60",
                                "--arch", "vit_small", "--lr", "0.001", "--use_fp16", "false",
                                "--opts", "DATA.PATH_PREFIX", "/v", "DATA.RAND_FR", "True"])
    assert (args.nodes, args.ngpus, args.partition, args.timeout) == (2, 8, "learnfair", 60)
    assert (args.arch, args.lr, args.use_fp16) == ("vit_small", 0.001, False)
    assert args.opts == ["DATA.PATH_PREFIX", "/v", "DATA.RAND_FR", "True"]


def test_defaults_are_the_launch_scripts_recipe():
    """scripts/common.sh recipe_defaults (what train.sh and slurm_train.sh pass) = the launcher's defaults."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_PATH", "EXP_NAME", "BATCH_SIZE", "EPOCHS",
                                                             "NUM_WORKERS")}
    script = f'PROJECT_PATH="{ROOT}"; source scripts/common.sh; recipe_defaults; printf "%s\\n" "${{train_args[@]}}"'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    recipe = train_ssl.get_args_parser().parse_args(out.stdout.splitlines())
    recipe.output_dir = str(ROOT / recipe.output_dir)  # train.sh runs from PROJECT_PATH
    defaults = run_with_submitit.get_args_parser().parse_args([])
    for name in ("arch", "batch_size_per_gpu", "epochs", "num_workers", "data_path", "output_dir"):
        assert getattr(defaults, name) == getattr(recipe, name), name
    assert defaults.batch_size_per_gpu != train_ssl.get_args_parser().get_default("batch_size_per_gpu")


def test_submission_gets_the_slurm_parameters_and_a_trainer_of_the_args(fake_submitit, data_dir, tmp_path):
    out = tmp_path / "run"
    job = run_with_submitit.main(["--nodes", "2", "--ngpus", "8", "--timeout", "4320", "--partition", "gpu",
                                  "--constraint", "volta32gb", "--comment", "deadline", "--mem_gb", "400",
                                  "--max_num_timeout", "10", "--num_workers", "6", "--data_path", str(data_dir),
                                  "--output_dir", str(out), "--epochs", "20"])
    assert job.job_id == "4242"
    [executor] = FakeExecutor.created
    assert executor.folder == str(out / "submitit") and executor.cluster is None
    assert executor.kwargs == {"slurm_max_num_timeout": 10, "local_max_num_timeout": 10}
    params = dict(executor.parameters)
    setup = params.pop("slurm_setup")
    assert params.pop("local_setup") == setup == [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    assert params == {"name": "svt", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 6,
                      "timeout_min": 4320, "mem_gb": 400, "slurm_partition": "gpu", "slurm_constraint": "volta32gb",
                      "slurm_comment": "deadline", "slurm_signal_delay_s": 120}
    [trainer] = executor.submitted
    assert isinstance(trainer, run_with_submitit.Trainer)
    assert (trainer.args.output_dir, trainer.args.epochs, trainer.args.batch_size_per_gpu) == (str(out), 20, 8)
    assert out.is_dir() and (out / "submitit").is_dir()


def test_job_dir_and_relative_output_dir(fake_submitit, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_with_submitit.main(["--data_path", str(data_dir), "--output_dir", "exp", "--job_dir", "jobs"])
    [executor] = FakeExecutor.created
    assert executor.folder == str(tmp_path / "jobs")
    assert executor.submitted[0].args.output_dir == str(tmp_path / "exp")  # the job's cwd may differ
    assert executor.parameters["nodes"] == 1 and executor.parameters["tasks_per_node"] == 4
    assert executor.parameters["mem_gb"] is None  # None: not set, the partition's default


@pytest.mark.parametrize("argv, error", [
    ([], "train.csv not found"),
    (["--opts", "DATA.NOT_A_KEY", "1"], "unknown config key"),
    (["--epochs", "2"], "--warmup_epochs 10 is larger than --epochs 2"),
])
def test_bad_input_fails_at_submission_not_in_the_queue(fake_submitit, data_dir, tmp_path, argv, error):
    if error != "train.csv not found":
        argv = ["--data_path", str(data_dir), *argv]
    with pytest.raises((FileNotFoundError, KeyError, ValueError), match=error):
        run_with_submitit.main(["--output_dir", str(tmp_path / "run"), *argv])
    assert FakeExecutor.created == []


def test_a_wrong_path_prefix_fails_at_submission_and_the_right_one_submits(fake_submitit, tmp_path):
    """The train list's paths are relative (as Kinetics lists are): without DATA.PATH_PREFIX, or with a wrong one,
    none of them exists and nothing is queued; with the videos' folder the job is submitted, its (empty) videos
    never opened."""
    (tmp_path / "annotations").mkdir()
    (tmp_path / "videos" / "abseiling").mkdir(parents=True)
    lines = [f"abseiling/{i}.mp4 0" for i in range(3)]
    (tmp_path / "annotations" / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "videos" / "abseiling" / "1.mp4").touch()
    argv = ["--data_path", str(tmp_path / "annotations"), "--output_dir", str(tmp_path / "run")]
    for prefix in ([], ["--opts", "DATA.PATH_PREFIX", str(tmp_path / "annotations")]):
        with pytest.raises(FileNotFoundError, match=r"train\.csv: none of 3 checked videos exists, e\.g\. "
                                                    r"'.*abseiling/0\.mp4'.*Set DATA\.PATH_PREFIX"):
            run_with_submitit.main([*argv, *prefix])
        assert FakeExecutor.created == []
    job = run_with_submitit.main([*argv, "--opts", "DATA.PATH_PREFIX", str(tmp_path / "videos")])
    assert job.job_id == "4242" and len(FakeExecutor.created[0].submitted) == 1


def test_task_environment_is_what_init_distributed_mode_reads(fake_submitit, monkeypatch):
    """__call__ on task 3 of 8 (local rank 1, first host gpu007) -> init_distributed_mode's env:// branch makes
    it rank 3 of 8 on device 1 with gpu007 as the rendezvous host; train_svt gets the arguments."""
    groups = []
    monkeypatch.setattr(utils.dist, "init_process_group", lambda backend, **kw: groups.append(kw))
    monkeypatch.setattr(utils.dist, "barrier", lambda: None)
    monkeypatch.setattr(utils, "is_dist_avail_and_initialized", lambda: False)
    monkeypatch.setattr(utils, "_set_device", lambda local_rank: {})
    monkeypatch.setattr(builtins, "print", builtins.print)  # setup_for_distributed silences rank 3's prints
    seen = []

    def fake_train_svt(args, stop_signals):
        utils.init_distributed_mode(args)
        seen.append(args)

    monkeypatch.setattr(train_ssl, "train_svt", fake_train_svt)
    args = run_with_submitit.get_args_parser().parse_args(["--epochs", "7"])
    run_with_submitit.Trainer(args)()

    [got] = seen
    assert (got.rank, got.world_size, got.gpu, got.epochs) == (3, 8, 1, 7)
    [group] = groups
    assert (group["init_method"], group["rank"], group["world_size"]) == ("env://", 3, 8)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu007", str(20000 + 42421 % 10000))


def test_another_job_on_the_node_gets_another_port(fake_submitit):
    ports = []
    for job_id in ("4242", "4243", "4242"):
        fake_submitit.job_env.job_id = job_id
        run_with_submitit.set_distributed_env(fake_submitit.job_env)
        ports.append(int(os.environ["MASTER_PORT"]))
    assert ports[0] == ports[2] != ports[1] and all(20000 <= p < 30000 for p in ports)


def test_checkpoint_requeues_a_fresh_trainer_with_the_same_args(fake_submitit, monkeypatch):
    def mutating_train_svt(args, stop_signals):  # as the real one does (rank, gpu, arch alias)
        args.rank, args.arch = 0, "vit_small"

    monkeypatch.setattr(train_ssl, "train_svt", mutating_train_svt)
    args = run_with_submitit.get_args_parser().parse_args(["--arch", "deit_small", "--output_dir", "/ckpt/run"])
    before = dict(vars(args))
    trainer = run_with_submitit.Trainer(args)
    trainer()
    delayed = trainer.checkpoint()
    assert isinstance(delayed, FakeDelayedSubmission) and (delayed.args, delayed.kwargs) == ((), {})
    requeued = delayed.function
    assert isinstance(requeued, run_with_submitit.Trainer) and requeued is not trainer
    assert vars(requeued.args) == before  # train_ssl resumes from /ckpt/run/checkpoint.pth by itself


def test_a_stop_on_submitits_signal_then_hands_it_to_submitits_requeue_handler(fake_submitit, monkeypatch):
    """train_svt stops cleanly on submitit's preemption signal (SIGUSR2), not on SIGTERM (submitit ignores it);
    after the checkpoint, the handler in place before (submitit's requeue) gets the signal, then the task exits
    with status 3."""
    seen, handled = [], []

    def stopping_train_svt(args, stop_signals):
        seen.append(stop_signals)
        raise preemption.Preempted("stopped", list(stop_signals))

    monkeypatch.setattr(train_ssl, "train_svt", stopping_train_svt)
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: handled.append(signum))
    try:
        with pytest.raises(SystemExit) as stop:
            run_with_submitit.Trainer(run_with_submitit.get_args_parser().parse_args([]))()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2,)] and handled == [signal.SIGUSR2] and stop.value.code == 3


def test_without_submitit_one_line_names_the_install(monkeypatch, data_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit) as err:
        run_with_submitit.main(["--data_path", str(data_dir), "--output_dir", str(tmp_path / "run")])
    message = str(err.value.code)
    assert "pip install submitit" in message and "\n" not in message
    assert not (tmp_path / "run").exists()  # nothing done before the check

    code = ("import runpy, sys; sys.modules['submitit'] = None; sys.argv = ['run_with_submitit.py']; "
            "runpy.run_path('run_with_submitit.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [message]


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed (optional)")
def test_real_local_job_trains_and_its_requeue_resumes(synthetic_root, tmp_path, monkeypatch):
    """A two-process tiny pretraining as a submitit job on this machine, submitted from another folder
    without PYTHONPATH (the job finds the repository through its setup line); then what a timeout would
    requeue (checkpoint(), pickled and loaded as submitit does) runs as a job and resumes from checkpoint.pth."""
    import submitit

    out = tmp_path / "run"
    argv = ["--arch", "vit_tiny", "--out_dim", "64", "--batch_size_per_gpu", "4", "--epochs", "1",
            "--warmup_epochs", "1", "--local_crops_number", "2", "--num_workers", "0", "--ngpus", "2",
            "--timeout", "10", "--data_path", str(synthetic_root / "annotations"), "--output_dir", str(out),
            "--opts", "DATA.PATH_PREFIX", str(synthetic_root / "videos"), "MODEL.DEPTH", "1", "DATA.NUM_FRAMES",
            "2", "DATA.SAMPLING_RATE", "2", "DATA.TRAIN_CROP_SIZE", "32", "DATA.LOCAL_CROP_SIZE", "16",
            "DATA.LOCAL_NUM_FRAMES", "[2, 2]"]
    _unset(monkeypatch, ("PYTHONPATH", *DIST_ENV))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    job = run_with_submitit.main(argv, cluster="local")
    assert job.results() == [None, None], job.task(0).stderr()
    for rank in range(2):
        assert f"distributed init (rank {rank}/2" in job.task(rank).stdout()
    assert len((out / "log.txt").read_text().splitlines()) == 1

    requeue = job.submission().function.checkpoint()
    requeue.dump(tmp_path / "requeue.pkl")
    trainer = submitit.helpers.DelayedSubmission.load(tmp_path / "requeue.pkl").function
    assert vars(trainer.args) == vars(job.submission().function.args)
    executor = submitit.AutoExecutor(out / "submitit", cluster="local")
    executor.update_parameters(timeout_min=10, local_setup=[f"export PYTHONPATH={ROOT}"])
    resumed = executor.submit(trainer)
    assert resumed.result() is None, resumed.stderr()
    text = resumed.stdout()
    assert f"Resuming from {out / 'checkpoint.pth'}" in text
    assert f"The run in {out} is already finished (at epoch 1 of 1): nothing to train." in text
