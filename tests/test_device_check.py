"""benchmarks/device_check.py without a GPU: stages are time-boxed and a failure is recorded, not fatal; the
verdict and table come from the stage results; a --dry-run of a few stages runs end to end on the CPU."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_check  # noqa: E402
from tests.frame_code import require_backend  # noqa: E402


def test_run_stage_records_ok_failure_and_timeout_and_kills_the_process_group(tmp_path):
    ok = device_check.run_stage("ok", [sys.executable, "-c", "print('hi')"], 20, tmp_path)
    assert ok["status"] == "ok" and ok["rc"] == 0 and "hi" in Path(ok["log"]).read_text()
    bad = device_check.run_stage("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 20, tmp_path)
    assert bad["status"] == "failed" and bad["rc"] == 3 and bad["tail"][-1] == "boom"
    # a hang: the child and its own child (a loader worker, say) are both killed at the limit
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    hung = device_check.run_stage("hang", [sys.executable, "-c", script], 2, tmp_path)  # no torch: starts fast
    assert hung["status"] == "timeout" and hung["seconds"] < 60
    child = int(pid_file.read_text())
    try:  # run_stage returns only once the whole group has exited: the child is gone or a zombie
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X")


def test_a_stage_at_its_limit_writes_every_threads_stack_to_its_log_then_is_killed(tmp_path):
    # a hang: SIGABRT first, so that faulthandler (PYTHONFAULTHANDLER=1, set for every stage) writes where each
    # thread hangs to the stage's log; no core file (a GPU process's is GiBs)
    script = ("import resource, threading, time\n"
              "print('core limit', resource.getrlimit(resource.RLIMIT_CORE), flush=True)\n"
              "def waits_in_a_thread(): time.sleep(60)\n"
              "def hangs_in_main(): time.sleep(60)\n"
              "threading.Thread(target=waits_in_a_thread, daemon=True).start()\n"
              "hangs_in_main()\n")
    hung = device_check.run_stage("hang", [sys.executable, "-c", script], 4, tmp_path)
    log = Path(hung["log"]).read_text()
    assert hung["status"] == "timeout" and "core limit (0, 0)" in log
    assert "Fatal Python error: Aborted" in log and "waits_in_a_thread" in log and "hangs_in_main" in log
    assert any("hangs_in_main" in line for line in hung["tail"])  # the main thread's stack is the log's end
    # a process that ignores SIGABRT is killed ABORT_GRACE_S later
    script = "import signal, time; signal.signal(signal.SIGABRT, signal.SIG_IGN); print('ready', flush=True); " \
             "time.sleep(60)"
    deaf = device_check.run_stage("deaf", [sys.executable, "-c", script], 4, tmp_path)
    assert deaf["status"] == "timeout" and 4 + device_check.ABORT_GRACE_S - 0.5 < deaf["seconds"] < 60


def test_pytest_stages_dump_the_stacks_of_a_test_that_hangs(tmp_path):
    cmd = device_check.pytest_cmd(tmp_path, "gpu_tests", "gpu")
    assert cmd[cmd.index("-o") + 1] == "faulthandler_timeout=60"


def test_wait_group_gone_waits_for_a_killed_group_and_gives_up_on_a_live_one():
    import os, signal, subprocess, time
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert device_check.group_alive(proc.pid)
        start = time.monotonic()
        assert device_check.wait_group_gone(proc.pid, timeout=0.3) is False  # still running: gives up
        assert time.monotonic() - start >= 0.3
        os.killpg(proc.pid, signal.SIGKILL)
        assert device_check.wait_group_gone(proc.pid, timeout=10)  # a zombie until reaped: does not count
        assert not device_check.group_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def _step(size, clips):
    return {"status": "ok", "result": {"size": size, "clips_per_s": clips}}


def test_verdicts_per_data_path_and_fed_step():
    stages = {"step_b16": _step("base", 60.0), "step_b16_compile": _step("base", 80.0),
              "data": {"status": "ok", "result": {
                  "samples_per_s": {"loader_decord_1_workers": 10.0, "loader_decord_16_workers": 70.0,
                                    "loader_device_cuda_1_workers": 100.0, "loader_device_cuda_16_workers": 300.0,
                                    "plan_sample": 150.0},
                  "feed_step": {"workers": 8, "paths": {"torchcodec": {"wait_fraction": 0.02},
                                                        "device_cuda": {"wait_fraction": 0.3}}}}}}
    v = device_check.verdicts(stages)
    assert v["step_clips_per_s_b16"] == 80.0  # the best of eager and compiled
    assert v["decord"]["verdict"] == "data-bound" and v["decord"]["cores_per_gpu_needed"] == 8.0
    # the GPU decode path's rate is its stage's in the training process: no worker cores per GPU from it
    assert v["device_cuda"]["verdict"] == "compute-bound" and "cores_per_gpu_needed" not in v["device_cuda"]
    assert v["fed_step_torchcodec"]["verdict"] == "compute-bound"
    assert v["fed_step_device_cuda"] == {"wait_fraction": 0.3, "workers": 8, "verdict": "data-bound"}
    table = device_check.table({"install": "none", "install_rc": 0, "stages": {}, "verdict": v})
    assert "- fed_step_device_cuda: **data-bound**, step waits 30.0% on data with 8 workers" in table
    assert "- decord: **data-bound**, 8.0 worker cores per GPU needed" in table
    assert "- device_cuda: **compute-bound**, limited by the training process's stage" in table
    assert device_check.verdicts({"step_b16": {"status": "timeout"}}) == {}
    # a fed path that failed has no verdict; the data row says why
    stages["data"]["result"]["feed_step"]["paths"]["augment_cuda"] = {"error": "RuntimeError: no NVDEC"}
    assert "fed_step_augment_cuda" not in device_check.verdicts(stages)
    row = device_check.data_detail(stages["data"]["result"])
    assert "fed step (augment_cuda) failed: RuntimeError: no NVDEC" in row


def test_the_data_row_says_when_torchcodec_decoded_on_the_cpu_instead_of_nvdec():
    split = {"samples": 8, "stage_ms": 40.0, "decode_ms": 30.0, "render_ms": 10.0, "open_ms": 5.0,
             "get_frames_ms": 20.0, "device": "cuda:0", "nvdec_cpu_fallbacks": 0, "sequential_cpu_decodes": 0}
    assert device_check.data_detail({"device_stage_ms": split}).startswith("GPU stage 40.0 ms/sample = decode 30.0")
    quiet_fallback = {**split, "nvdec_cpu_fallbacks": 20}
    row = device_check.data_detail({"device_stage_ms": quiet_fallback, "device_stage_threads_ms": {"1": 41.0},
                                    "device_decode": {"nvdec_cpu_fallbacks": 64, "sequential_cpu_decodes": 0}})
    assert "GPU stage" not in row
    assert row.startswith("stage on cuda:0 (torchcodec decoded on the CPU: 20 NVDEC fallbacks, 0 sequential "
                          "decodes) 40.0 ms/sample")
    assert "GPU decode loader: 64 NVDEC CPU fallbacks" in row


def test_train_knn_check_needs_a_falling_loss_knn_and_no_cpu_fallback(tmp_path):
    run = tmp_path / "train_knn"
    run.mkdir()
    log = tmp_path / "stage.log"
    log.write_text("training...\n")
    (run / "log.txt").write_text("\n".join(json.dumps(e) for e in (
        {"epoch": 0, "train_loss": 6.2}, {"epoch": 1, "train_loss": 5.9, "knn_top1": 40.0})) + "\n")
    assert device_check.check_train_knn(tmp_path, {"status": "ok", "log": str(log)})["status"] == "ok"
    log.write_text("WARNING x.mp4: torchcodec decodes it on the CPU, not with NVDEC (no nvcuvid)\n")
    checked = device_check.check_train_knn(tmp_path, {"status": "ok", "log": str(log)})
    assert checked["status"] == "failed" and checked["checks"]["nvdec_cpu_fallbacks"] == 1
    log.write_text("")
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 6.2}) + "\n" +
                                 json.dumps({"epoch": 1, "train_loss": 6.3, "knn_top1": 20.0}) + "\n")
    assert device_check.check_train_knn(tmp_path, {"status": "ok", "log": str(log)})["status"] == "failed"


def test_train_knn_check_reads_a_log_cut_by_the_stage_limit(tmp_path):
    run = tmp_path / "train_knn"
    run.mkdir()
    log = tmp_path / "stage.log"
    log.write_text("training...\n")
    (run / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 6.2}) + "\n" +
                                 json.dumps({"epoch": 1, "train_loss": 5.9, "knn_top1": 40.0}) + "\n" +
                                 '{"epoch": 2, "train_lo')
    checked = device_check.check_train_knn(tmp_path, {"status": "ok", "log": str(log)})
    assert checked["status"] == "ok" and checked["checks"]["losses"] == [6.2, 5.9]


def test_out_of_budget_stages_are_skipped_not_run(tmp_path):
    # the budget counts from --started (device_check.sh's start: its install is in the budget); env always runs
    import time
    report = device_check.main(["--dry-run", "--out", str(tmp_path), "--budget_s", "300", "--started",
                                str(time.time() - 295), "--only", "env", "step_b8", "demo_gpu"])
    stages = report["stages"]
    env = stages["env"]
    assert env["status"] == "ok" and env["result"]["cpu_count"] >= 1 and env["seconds"] > 0.5  # its real time
    assert 0 <= env["result"]["dev_shm"]["free_gib"] <= env["result"]["dev_shm"]["total_gib"]
    assert stages["step_b8"]["status"] == "skipped" and "out of budget" in stages["step_b8"]["reason"]
    assert stages["demo_gpu"]["status"] == "skipped"
    assert json.loads((tmp_path / "device_check.json").read_text())["stages"].keys() == stages.keys()


def test_a_failing_env_stage_is_recorded_and_the_check_goes_on(tmp_path, monkeypatch, capsys):
    # the env record runs in a process of its own: a broken install (here `import av` fails) is the stage's
    # failure, with its error printed and in the report, not the end of the check
    fake = tmp_path / "noav"
    fake.mkdir()
    (fake / "av.py").write_text("raise ImportError('No module named av (simulated: the wheels did not install)')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake}:{ROOT}")
    out = tmp_path / "out"
    report = device_check.main(["--dry-run", "--out", str(out), "--budget_s", "1", "--only", "env", "step_b8"])
    env = report["stages"]["env"]
    assert env["status"] == "failed" and "simulated: the wheels did not install" in env["tail"][-1]
    assert env["result"]["dev_shm"]["total_gib"] > 0 and env["seconds"] > 0
    assert report["stages"]["step_b8"]["status"] == "skipped"  # the check went on
    assert "| env | failed |" in (out / "device_check.md").read_text()
    assert "simulated: the wheels did not install" in capsys.readouterr().out


def test_the_report_and_export_are_rewritten_at_every_stage(tmp_path, monkeypatch, capsys):
    # the device returns only what is in the export dir: it must hold every finished stage and the running
    # one's logs at any time, also when the check is then killed
    out, exported = tmp_path / "out", tmp_path / "exported"
    seen = {}

    def exported_report() -> dict:
        return json.loads((exported / "device_check.json").read_text())["stages"]

    def fake_run_stage(name, cmd, limit, out_dir, env=None, tick=lambda: None):
        log = out_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        seen[name] = exported_report()
        if name == "env":
            (out_dir / "env.json").write_text(json.dumps({"cpu": "test cpu", "cpu_count": 3}))
            log.write_text("env ok\n")
            return {"status": "ok", "rc": 0, "seconds": 1.0, "log": str(log)}
        if name == "data":
            (out_dir / "data.json").write_text(json.dumps({"samples_per_s": {"plan_sample": 99.0}}))
            log.write_text("measured plan_sample\n")
            tick()  # while the stage runs: its log so far is exported
            import tarfile
            with tarfile.open(exported / "logs.tar.gz") as tar:
                seen["data_log_while_running"] = tar.extractfile("logs/data.log").read().decode()
            log.write_text("measured plan_sample\nTraceback: the stage failed here\n")
            return {"status": "failed", "rc": 1, "seconds": 2.0, "log": str(log),
                    "tail": ["measured plan_sample", "Traceback: the stage failed here"]}
        log.write_text("epoch 0 ...\nThread 0x7f (most recent call first): where train_knn was\n")
        raise device_check.Stopped("SIGTERM")  # the device's timeout, during train_knn

    monkeypatch.setattr(device_check, "run_stage", fake_run_stage)
    with pytest.raises(SystemExit):
        device_check.main(["--dry-run", "--out", str(out), "--export", str(exported), "--only", "env", "data",
                           "train_knn", "step_b8"])
    assert seen["env"]["env"]["status"] == "running"
    assert seen["data"]["env"]["result"]["cpu"] == "test cpu" and seen["data"]["data"]["status"] == "running"
    assert seen["data_log_while_running"] == "measured plan_sample\n"
    assert seen["train_knn"]["data"]["result"] == {"samples_per_s": {"plan_sample": 99.0}}
    final = exported_report()
    assert final["data"]["status"] == "failed" and final["train_knn"]["status"] == "stopped"
    assert final["train_knn"]["tail"][-1] == "Thread 0x7f (most recent call first): where train_knn was"
    assert "step_b8" not in final
    assert "| data | failed | 2.0 | plan_sample 99.0 (log: Traceback: the stage failed here) |" in \
        (exported / "device_check.md").read_text()
    printed = capsys.readouterr().out  # a failed or stopped stage's log tail is printed
    assert "Traceback: the stage failed here" in printed and "where train_knn was" in printed


def test_export_takes_the_end_of_a_long_log_and_leaves_caches_out(tmp_path):
    import tarfile
    out, dest = tmp_path / "out", tmp_path / "dest"
    (out / "logs").mkdir(parents=True)
    (out / "inductor_cache").mkdir()
    (out / "inductor_cache" / "graph.txt").write_text("cache")
    (out / "device_check.json").write_text("{}")
    (out / "device_check.md").write_text("table")
    big = b"x" * (5 * 2 ** 20) + b"the stack of the hang\n"
    (out / "logs" / "data.log").write_bytes(big)
    device_check.export(out, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["device_check.json", "device_check.md", "logs.tar.gz"]
    with tarfile.open(dest / "logs.tar.gz") as tar:
        assert "inductor_cache/graph.txt" not in tar.getnames()
        assert tar.extractfile("logs/data.log").read() == big[-device_check.EXPORT_MAX_BYTES:]


def test_the_stages_up_to_train_knn_fit_in_the_budget_by_their_limits():
    # the next device run gets one try of ~8 minutes: the stages that answer its questions come first, and
    # their limits (with the install) add up to the default budget, whatever they do
    stages = device_check.STAGES
    assert stages[:5] == ("env", "gpu_tests", "data", "step_b16", "train_knn") and "step_b8" in stages[5:]
    assert sum(device_check.LIMITS[s] for s in stages[:5]) + device_check.INSTALL_S <= device_check.BUDGET_S
    # the budget, a last stage's stop (SIGABRT, the grace, SIGKILL, its group's exit) and the report: < 8 min
    assert device_check.BUDGET_S + device_check.ABORT_GRACE_S + 10 + 5 < 8 * 60
    opt = type("Opt", (), {"dry_run": False})()
    cmd = device_check.data_cmd(opt, Path("/tmp/out"))
    assert cmd[cmd.index("--rounds") + 1] == "1"


def test_steps_run_fp16_on_a_gpu_without_bf16():
    opt = type("Opt", (), {"dry_run": False})()
    assert device_check.step_precision({"cuda_bf16": True}) == "bf16"
    assert device_check.step_precision({}) == "bf16"  # no env record: as before
    precision = device_check.step_precision({"cuda_bf16": False})
    cmd = device_check.step_cmd(opt, Path("/tmp/out"), 16, False, precision)
    assert cmd[cmd.index("--precision") + 1] == "fp16"


@pytest.mark.slow
def test_dry_run_of_the_step_and_data_stages(tmp_path):
    require_backend("torchcodec")  # the decode path of DATA.DECODE_DEVICE is measured (torchcodec)
    report = device_check.main(["--dry-run", "--out", str(tmp_path), "--only", "env", "step_b16", "data"])
    stages = report["stages"]
    assert stages["step_b16"]["status"] == "ok", stages["step_b16"]
    assert stages["step_b16"]["result"]["size"] == "tiny" and stages["step_b16"]["result"]["clips_per_s"] > 0
    assert stages["data"]["status"] == "ok", stages["data"]
    rates = stages["data"]["result"]["samples_per_s"]
    assert rates["plan_sample"] > 0 and rates["loader_device_cpu_1_workers"] > 0
    assert rates["decoded_plan_sample"] > 0 and rates["loader_augment_cpu_1_workers"] > 0
    assert stages["data"]["result"]["errors"] == {}
    assert stages["data"]["result"]["device_decode"] == {"device": "cpu", "threads": 8, "nvdec_cpu_fallbacks": 0,
                                                         "sequential_cpu_decodes": 0, "failed_videos": 0}
    assert "device_cpu" in report["verdict"]
    assert set(report["verdict"]) >= {"fed_step_torchcodec", "fed_step_device_cpu", "fed_step_augment_cpu"}
    assert list(stages["data"]["result"]["device_stage_threads_ms"]) == ["1", "2"]
    # the stage's time split: every part measured, on the CPU, with no decode fallback; how the parts compare is
    # a measurement (separate timed passes, disturbed by the machine's load), not asserted here
    split = stages["data"]["result"]["device_stage_ms"]
    times = ("stage_ms", "decode_ms", "render_ms", "open_ms", "get_frames_ms")
    assert set(split) == {"samples", *times, "device", "nvdec_cpu_fallbacks", "sequential_cpu_decodes"}, split
    assert split["samples"] == 8 and all(split[k] > 0 for k in times), split
    assert split["device"] == "cpu" and split["nvdec_cpu_fallbacks"] == split["sequential_cpu_decodes"] == 0
    assert "nvdec_cache" not in stages["data"]["result"]  # NVDEC's cache only on CUDA
    table = (tmp_path / "device_check.md").read_text()
    assert "| step_b16 | ok |" in table and "step at batch 16" in table
    assert f"stage on cpu {split['stage_ms']:.1f} ms/sample = decode" in table  # not "GPU stage": a CPU run
    assert "stage on cpu ms/sample with 1 threads" in table and "fed step (torchcodec, fp32) waits" in table


def _tiny_wheel(folder: Path, name: str = "svt_probe_pkg", version: str = "1.0", modules: dict | None = None) -> Path:
    """A pure-Python wheel of `modules` ({path in the wheel: text}; by default one module), what
    benchmarks/device_wheels.sh would carry, written by hand."""
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {**(modules or {f"{name}/__init__.py": "VALUE = 7\n"}),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(path, text)
    return wheel


def _run_sh(tmp_path: Path, extra: list[str], env: dict, stages: tuple = ("env", "step_b8")) -> dict:
    import os, subprocess
    out, exported = tmp_path / "out", tmp_path / "exported"
    run = subprocess.run(["bash", "benchmarks/device_check.sh", *extra, "--dry-run", "--budget_s", "1", "--only",
                          *stages, "--out", str(out), "--export", str(exported)],
                         cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path), **env}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return {"report": json.loads((exported / "device_check.json").read_text()), "exported": exported}


def test_sh_installs_carried_wheels_offline_and_exports_three_files(tmp_path):
    import tarfile
    (tmp_path / "whl").mkdir()
    _tiny_wheel(tmp_path / "whl")
    got = _run_sh(tmp_path, ["--wheels", str(tmp_path / "whl")], {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null"})
    report = got["report"]
    assert report["install"].startswith(f"wheels from {tmp_path / 'whl'} (1 files)") and report["install_rc"] == 0
    assert (tmp_path / "svt_device_site" / "svt_probe_pkg" / "__init__.py").read_text() == "VALUE = 7\n"
    assert report["stages"]["env"]["result"]["torchcodec"]          # decoder versions recorded
    wheel = report["torchcodec_wheel"]  # checked after the install, in the report and the env record
    assert wheel.startswith("torchcodec ") and report["stages"]["env"]["result"]["torchcodec_wheel"] == wheel
    # what a device's $OUT takes back: at most 8 plain files, simple names, one folder down at most
    assert sorted(p.name for p in got["exported"].iterdir()) == ["device_check.json", "device_check.md",
                                                                  "logs.tar.gz"]
    with tarfile.open(got["exported"] / "logs.tar.gz") as tar:
        assert "device_check.json" in tar.getnames()
    assert (got["exported"] / "device_check.md").read_text().startswith("Installed: wheels from")


def test_sh_installs_the_fallback_torchcodec_when_the_carried_one_does_not_decode(tmp_path):
    # fake torchcodecs: the main wheel's fails as one built for another torch would; the fallback's decodes
    # (a stand-in returning frames of the right shape for decoder.torchcodec_status's test video)
    broken = {"torchcodec/__init__.py": "__version__ = '0.17.0'\n",
              "torchcodec/decoders/__init__.py": "raise RuntimeError('undefined symbol: a torch 2.12 function')\n"}
    works = {"torchcodec/__init__.py": "__version__ = '0.16.0'\n",
             "torchcodec/decoders/__init__.py": (
                 "import torch\n"
                 "class VideoDecoder:\n"
                 "    def __init__(self, source, **kwargs): pass\n"
                 "    def get_frames_at(self, indices):\n"
                 "        return type('Batch', (), {'data': torch.zeros(len(indices), 3, 32, 32)})()\n")}
    _tiny_wheel(tmp_path / "whl", "svt_probe_pkg")
    _tiny_wheel(tmp_path / "whl", "torchcodec", "0.17.0", broken)
    _tiny_wheel(tmp_path / "whl" / "fallback", "torchcodec", "0.16.0", works)
    got = _run_sh(tmp_path, ["--wheels", str(tmp_path / "whl")], {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null"},
                  ("step_b8",))
    assert got["report"]["torchcodec_wheel"] == (
        "torchcodec 0.16.0: decodes, from fallback/ (the main wheel's torchcodec 0.17.0: RuntimeError: undefined "
        f"symbol: a torch 2.12 function (torchcodec 0.17.0, torch {torch.__version__}))")
    site = tmp_path / "svt_device_site"
    assert (site / "torchcodec-0.16.0.dist-info").is_dir() and not (site / "torchcodec-0.17.0.dist-info").exists()
    assert (site / "svt_probe_pkg").is_dir()  # the other wheels stay


def test_sh_installs_nothing_and_says_why_when_no_index_is_reachable(tmp_path):
    got = _run_sh(tmp_path, [], {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": ""},
                  ("step_b8",))
    assert got["report"]["install"].startswith("nothing: pip reaches no index here and no --wheels was given")
    assert got["report"]["stages"]["step_b8"]["status"] == "skipped"


def test_data_stage_keeps_the_numbers_measured_before_its_time_limit(tmp_path):
    require_backend("torchcodec")  # the decode path of DATA.DECODE_DEVICE is measured (torchcodec)
    # bench_data.py rewrites its JSON after each loader, the GPU decode path first and most workers first:
    # killed at the stage's limit, the numbers measured so far stay readable.
    import subprocess, time
    out = tmp_path / "data.json"
    proc = subprocess.Popen([sys.executable, "benchmarks/bench_data.py", "--loader_only", "--videos", "2",
                             "--frames", "40", "--height", "64", "--width", "80", "--samples", "8", "--rounds", "1",
                             "--crop", "32", "16", "--workers", "0", "1", "--device_decode", "cpu",
                             "--feed_batch", "2", "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and "loader_device_cpu_1_workers" in out.read_text():
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    rates = json.loads(out.read_text())["samples_per_s"]
    assert rates["plan_sample"] > 0 and rates["loader_device_cpu_1_workers"] > 0
    # the workers' costs, then the GPU decode path's loader, first
    assert list(rates)[:3] == ["plan_sample", "decoded_plan_sample", "loader_device_cpu_1_workers"]


@pytest.mark.slow
def test_data_stage_goes_on_after_a_failed_measurement_and_feeds_the_step_before_the_cpu_loaders(tmp_path):
    require_backend("torchcodec")  # the decode path of DATA.DECODE_DEVICE is measured (torchcodec)
    # torchcodec unable to open the plans' bytes on the stage's device (a CPU-only build on a GPU machine, no
    # FFmpeg for it): the stage's time split fails; every other measurement, the fed step's three paths among
    # them, is still made (the stage decodes those videos sequentially on the CPU and counts them)
    out = tmp_path / "data.json"
    wrapper = tmp_path / "broken_torchcodec.py"
    wrapper.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from datasets import decoder\n"
        "opens = decoder._open_torchcodec\n"
        "def broken(source, info, device='cpu'):\n"
        "    if isinstance(source, str):\n"
        "        return opens(source, info, device)  # the CPU path's readers (paths) keep working\n"
        "    raise RuntimeError('Unsupported device (simulated)')\n"
        "decoder._open_torchcodec = broken\n"
        "sys.argv = ['bench_data.py'] + sys.argv[1:]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_data.py')!r}, run_name='__main__')\n")
    import subprocess
    run = subprocess.run([sys.executable, str(wrapper), "--loader_only", "--videos", "2", "--frames", "40",
                          "--height", "64", "--width", "80", "--samples", "8", "--rounds", "1", "--crop", "32", "16",
                          "--workers", "0", "--backends", "torchcodec", "--device_decode", "cpu",
                          "--decode_threads", "1", "--feed_step", "tiny", "--feed_batch", "2", "--feed_workers", "0",
                          "--feed_steps", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["errors"]) == ["device_stage_ms"] and "simulated" in data["errors"]["device_stage_ms"]
    assert set(data["samples_per_s"]) == {"plan_sample", "decoded_plan_sample", "loader_device_cpu_0_workers",
                                          "loader_augment_cpu_0_workers", "loader_torchcodec_0_workers"}
    assert set(data["feed_step"]["paths"]) == {"torchcodec", "device_cpu", "augment_cpu"}
    assert all("wait_fraction" in fed for fed in data["feed_step"]["paths"].values())
    assert data["device_decode"]["sequential_cpu_decodes"] > 0 and data["device_stage_threads_ms"]["1"] > 0
    # the fed step is measured before the CPU loaders (what a stage cut at its limit loses first)
    order = list(data["seconds"])
    assert order.index("feed_step") < order.index("loader_torchcodec_0_workers")
    # the GPU loaders batch as the step they feed; the CPU loaders as before
    assert data["loader_batch"] == {"loader_<decoder>_*": 4, "loader_device_*, loader_augment_*": 2}


def test_the_fed_step_runs_fp16_on_a_gpu_without_bf16(monkeypatch):
    import torch
    import bench_data
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bench_data.step_precision(torch.device("cuda", 0)) == "fp16"
    assert bench_data.step_precision(torch.device("cpu")) == "fp32"
