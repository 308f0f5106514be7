"""benchmarks/device_check.py without a GPU: stages are time-boxed and a failure is recorded, not fatal; the
verdict and table come from the stage results; a --dry-run of a few stages runs end to end on the CPU."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import device_check  # noqa: E402


def test_run_stage_records_ok_failure_and_timeout_and_kills_the_process_group(tmp_path):
    ok = device_check.run_stage("ok", [sys.executable, "-c", "print('hi')"], 20, tmp_path)
    assert ok["status"] == "ok" and ok["rc"] == 0 and "hi" in Path(ok["log"]).read_text()
    bad = device_check.run_stage("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 20, tmp_path)
    assert bad["status"] == "failed" and bad["rc"] == 3 and bad["tail"][-1] == "boom"
    # a hang: the child and its own child (a loader worker, say) are both killed at the limit
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    hung = device_check.run_stage("hang", [sys.executable, "-c", script], 6, tmp_path)
    assert hung["status"] == "timeout" and hung["seconds"] < 20
    child = int(pid_file.read_text())
    try:  # run_stage returns only once the whole group has exited: the child is gone or a zombie
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X")


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
    assert v["device_cuda"]["verdict"] == "compute-bound"
    assert v["fed_step_torchcodec"]["verdict"] == "compute-bound"
    assert v["fed_step_device_cuda"] == {"wait_fraction": 0.3, "workers": 8, "verdict": "data-bound"}
    table = device_check.table({"install": "none", "install_rc": 0, "stages": {}, "verdict": v})
    assert "- fed_step_device_cuda: **data-bound**, step waits 30.0% on data with 8 workers" in table
    assert device_check.verdicts({"step_b16": {"status": "timeout"}}) == {}


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


def test_out_of_budget_stages_are_skipped_not_run(tmp_path):
    report = device_check.main(["--dry-run", "--out", str(tmp_path), "--budget_s", "1", "--only", "env", "step_b8",
                                "demo_gpu"])
    stages = report["stages"]
    assert stages["env"]["status"] == "ok" and stages["env"]["result"]["cpu_count"] >= 1
    assert stages["step_b8"]["status"] == "skipped" and "out of budget" in stages["step_b8"]["reason"]
    assert stages["demo_gpu"]["status"] == "skipped"
    assert json.loads((tmp_path / "device_check.json").read_text())["stages"].keys() == stages.keys()


@pytest.mark.slow
def test_dry_run_of_the_step_and_data_stages(tmp_path):
    report = device_check.main(["--dry-run", "--out", str(tmp_path), "--only", "env", "step_b16", "data"])
    stages = report["stages"]
    assert stages["step_b16"]["status"] == "ok", stages["step_b16"]
    assert stages["step_b16"]["result"]["size"] == "tiny" and stages["step_b16"]["result"]["clips_per_s"] > 0
    assert stages["data"]["status"] == "ok", stages["data"]
    rates = stages["data"]["result"]["samples_per_s"]
    assert rates["plan_sample"] > 0 and rates["loader_device_cpu_1_workers"] > 0
    assert rates["decoded_plan_sample"] > 0 and rates["loader_augment_cpu_1_workers"] > 0
    assert rates["decoded_plan_sample"] > 0 and rates["loader_augment_cpu_1_workers"] > 0
    assert stages["data"]["result"]["device_decode"] == {"device": "cpu", "threads": 8, "nvdec_cpu_fallbacks": 0,
                                                         "sequential_cpu_decodes": 0, "failed_videos": 0}
    assert "device_cpu" in report["verdict"]
    assert set(report["verdict"]) >= {"fed_step_torchcodec", "fed_step_device_cpu", "fed_step_augment_cpu"}
    assert list(stages["data"]["result"]["device_stage_threads_ms"]) == ["1", "2"]
    # the stage's time split: its parts are timed in separate passes over the same batches, so they add up to
    # the whole stage only if the split covers it (nothing left out, nothing counted twice)
    split = stages["data"]["result"]["device_stage_ms"]
    assert split["samples"] == 8 and all(split[k] > 0 for k in ("stage_ms", "decode_ms", "render_ms", "open_ms",
                                                                  "get_frames_ms"))
    assert 0.75 < (split["decode_ms"] + split["render_ms"]) / split["stage_ms"] < 1.33, split
    assert split["open_ms"] + split["get_frames_ms"] < 1.5 * split["decode_ms"], split  # torchcodec's part of it
    assert "nvdec_cache" not in stages["data"]["result"]  # NVDEC's cache only on CUDA
    table = (tmp_path / "device_check.md").read_text()
    assert "| step_b16 | ok |" in table and "step at batch 16" in table
    assert f"GPU stage {split['stage_ms']:.1f} ms/sample = decode" in table
    assert "GPU stage ms/sample with 1 threads" in table and "fed step (torchcodec) waits" in table


def _tiny_wheel(folder: Path) -> Path:
    """A one-module wheel (what benchmarks/device_wheels.sh would carry), written by hand."""
    import zipfile
    wheel = folder / "svt_probe_pkg-1.0-py3-none-any.whl"
    files = {"svt_probe_pkg/__init__.py": "VALUE = 7\n",
             "svt_probe_pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: svt-probe-pkg\nVersion: 1.0\n",
             "svt_probe_pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + "svt_probe_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, "svt_probe_pkg-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return wheel


def _run_sh(tmp_path: Path, extra: list[str], env: dict) -> dict:
    import os, subprocess
    out, exported = tmp_path / "out", tmp_path / "exported"
    run = subprocess.run(["bash", "benchmarks/device_check.sh", *extra, "--dry-run", "--budget_s", "1", "--only",
                          "env", "step_b8", "--out", str(out), "--export", str(exported)],
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
    # what a device's $OUT takes back: at most 8 plain files, simple names, one folder down at most
    assert sorted(p.name for p in got["exported"].iterdir()) == ["device_check.json", "device_check.md",
                                                                  "logs.tar.gz"]
    with tarfile.open(got["exported"] / "logs.tar.gz") as tar:
        assert "device_check.json" in tar.getnames()
    assert (got["exported"] / "device_check.md").read_text().startswith("Installed: wheels from")


def test_sh_installs_nothing_and_says_why_when_no_index_is_reachable(tmp_path):
    got = _run_sh(tmp_path, [], {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null", "PIP_FIND_LINKS": ""})
    assert got["report"]["install"].startswith("nothing: pip reaches no index here and no --wheels was given")
    assert got["report"]["stages"]["step_b8"]["status"] == "skipped"


def test_data_stage_keeps_the_numbers_measured_before_its_time_limit(tmp_path):
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
