"""One device check of svt on a CUDA machine (run through benchmarks/device_check.sh, which installs what is
missing first). Every stage runs as its own process under a time limit, inside one overall budget (default
450 s from the start of device_check.sh, its install included: the whole check stays under 8 minutes on one
H100/H200); a stage that fails, hangs or does not fit in what is left of the budget is recorded as such and the
next one runs. A stage at its limit gets SIGABRT first (PYTHONFAULTHANDLER=1: every Python thread's stack goes
to its log), SIGKILL 3 s later. Results: OUT/device_check.json, a short table in OUT/device_check.md (printed
at the end), each stage's log in OUT/logs/; both files (and with --export, the exported three) are rewritten
before and after every stage and every 20 s during one, so a check killed from outside keeps what it measured.

Stages, in order (the most telling first: the data path, the open question of the last run, before the
step; torch.compile last as it takes longest):
- env (its own process, like every stage): torch, CUDA, GPU and CPU names, core count, whether the GPU has
  bf16 (else the steps run fp16), free space in /dev/shm (the fed GPU paths pass decoded frames through it),
  which torchcodec wheel device_check.sh installed;
- gpu_tests: `pytest -m gpu` (the GPU-only tests: NVDEC decode, NVDEC's crop of videos sharing a coded size,
  no host sync and every tensor on the GPU in the train step, rendering views without host syncs, NVDEC threads
  decoding beside a busy training stream, the CUDA RNG kept across seeded samples, SDPA past 65535 sequences);
- data: bench_data.py (one round), each measurement on its own (one that fails is recorded, the next runs):
  for the GPU decode path (DATA.DECODE_DEVICE cuda) the CPU cost of a plan, where its main-process stage's
  time goes per sample (NVDEC decoder open, get frames, view rendering; open and decode with torchcodec's NVDEC
  cache on and off), the stage with 1, 8 and 16 videos decoded at once (DATA.DEVICE_DECODE_THREADS) and its
  loader with all-core workers (cut at 12 s), the same loader with DATA.AUGMENT_DEVICE cuda (the workers
  decode, the GPU renders); then the ViT-B step fed by the default CPU loader, the GPU decode loader and the
  AUGMENT_DEVICE loader, each with min(8, cores) workers (share of the step spent waiting on data; each cut at
  12 s); last (what the stage's limit cuts first), DataLoader samples/s with 1, 4 and all-core workers per
  CPU decoder;
- step_b16: bench_train_step.py, ViT-B, original views, bf16, SDPA, fused AdamW: step time, TFLOP/s,
  fraction of the bf16 matmul peak measured in the same run, peak memory;
- train_knn: a 1-GPU train_ssl.py run of ~100 steps on generated videos with the GPU decode path, then kNN:
  the loss must fall, kNN must report, and no video may fall back to CPU decoding;
- step_b8: the step at batch 8 (the H200 run measured it: 213 ms);
- cuda_capable_tests: the suite's device-generic tests with SVT_TEST_DEVICE=cuda (among them: CUDA-only tensors in
  the linear probe's NCCL all-reduce, no host read per step in the linear probe);
- step_b16_compile, step_b8_compile: the step with --compile;
- demo_gpu: DEMO_SCALE=gpu bash scripts/demo.sh, when demo.sh knows DEMO_SCALE (~5 minutes: it fits only
  in a larger --budget_s, or alone with --only demo_gpu).
Verdict: per data path, "compute-bound" when its loader with all cores delivers at least the ViT-B step's
clips/s at batch 16 (best of eager and compiled), else "data-bound"; and per fed path, the measured wait
share of the fed step (< 5 %: compute-bound).

--dry-run: every stage tiny on the CPU (vit_tiny, 32 px crops, small videos, SVT_TEST_DEVICE=cpu; compile and
demo stages skipped: minutes on a CPU), so that the script itself is tested without a GPU
(tests/test_device_check.py).

    bash benchmarks/device_check.sh                 # on the GPU machine
    python benchmarks/device_check.py --dry-run --out /tmp/dc --only env step_b16 data
"""
import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # utils.collect_env, when run as a script
WAIT_OK = 0.05  # a fed step waiting less than this share on data is compute-bound
STAGES = ("env", "gpu_tests", "data", "step_b16", "train_knn", "step_b8", "cuda_capable_tests",
          "step_b16_compile", "step_b8_compile", "demo_gpu")
# Time limit of each stage (s) on a GPU; the overall budget cuts them further. The stages up to train_knn add up
# to 435 s: with device_check.sh's install (INSTALL_S) they fit in the default budget whatever they do; the later
# ones run in what the earlier ones leave.
LIMITS = {"env": 40, "gpu_tests": 75, "data": 170, "step_b16": 60, "train_knn": 90, "step_b8": 60,
          "cuda_capable_tests": 120, "step_b16_compile": 180, "step_b8_compile": 150, "demo_gpu": 420}
BUDGET_S = 450  # the whole check, from device_check.sh's start: under 8 minutes with a last stage's kill
INSTALL_S = 15  # device_check.sh: the wheels installed offline, then torchcodec checked (~15 s on the H200)
MIN_STAGE_S = 15  # a stage is not started with less than this left of the budget
ABORT_GRACE_S = 3.0  # a stage at its limit: SIGABRT (its stacks to the log), SIGKILL this much later
TICK_S = 20.0  # while a stage runs, the report and the export are refreshed this often
TAIL_LINES = 30  # lines of a failed stage's log kept in the report and printed
EXPORT_MAX_BYTES = 4 * 2 ** 20  # a longer file is exported as its last 4 MiB


class Stopped(Exception):
    """The check itself was told to stop (SIGTERM, e.g. a device's timeout)."""


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` is still running (zombies, which hold no GPU memory, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def wait_group_gone(pgid: int, timeout: float = 10.0) -> bool:
    """Wait up to `timeout` s for every process of a SIGKILLed group to exit (a kill is delivered, not instant)."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_group(proc: subprocess.Popen) -> None:
    """End a stage: SIGABRT to its process group, so that every Python process of it (PYTHONFAULTHANDLER=1)
    writes the stack of each of its threads to the stage's log (where a hang hangs), then, ABORT_GRACE_S later,
    SIGKILL to what is left (the stage and everything it started: loader workers); returns once the whole group
    has exited, so that the next stage does not share the GPU with a dying one."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGABRT)
    deadline = time.monotonic() + ABORT_GRACE_S
    while group_alive(proc.pid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_group_gone(proc.pid)


def _stage_limits() -> None:
    """In a stage's process, before it starts: no core file when SIGABRT ends it (a GPU process's is GiBs)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_stage(name: str, cmd: list[str], limit: float, out: Path, env: dict | None = None,
              tick=lambda: None) -> dict:
    """Run `cmd` in its own process group with a time limit; its output goes to out/logs/<name>.log. `tick()`
    is called every TICK_S seconds while it runs. Never raises for the stage's sake: the result says ok /
    failed (with the exit code) / timeout (stopped with stop_group), the seconds and the log's tail. If the
    check itself is stopped meanwhile (Stopped, KeyboardInterrupt), the stage is stopped first."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
                                    preexec_fn=_stage_limits)
        except OSError as err:
            return {"status": "failed", "error": str(err), "seconds": 0.0, "log": str(log)}
        try:
            while True:
                left = start + limit - time.perf_counter()
                try:
                    rc = proc.wait(timeout=max(0.0, min(TICK_S, left)))
                    status = "ok" if rc == 0 else "failed"
                    break
                except subprocess.TimeoutExpired:
                    if left <= TICK_S:
                        stop_group(proc)
                        rc, status = None, "timeout"
                        break
                    tick()
        except BaseException:
            stop_group(proc)
            raise
    lines = log.read_text(errors="replace").splitlines()
    result = {"status": status, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "limit_s": round(limit),
              "log": str(log)}
    if status != "ok":
        result["tail"] = lines[-TAIL_LINES:]
    return result


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest --junitxml file (empty when missing)."""
    if not path.is_file():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def load_json(path: Path) -> dict | None:
    """The JSON a stage wrote; None when it wrote none or only part of one (killed while writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file: a reader (or a check killed meanwhile) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- stages
def step_precision(env: dict) -> str:
    """The steps' autocast: bf16, or fp16 where the env stage found a GPU without native bf16 (a V100)."""
    return "fp16" if env.get("cuda_bf16") is False else "bf16"


def step_cmd(opt, out: Path, batch: int, compile_: bool, precision: str = "bf16") -> list[str]:
    name = f"step_b{batch}{'_compile' if compile_ else ''}"
    if opt.dry_run:
        size = ["--size", "tiny", "--batch", str(max(1, batch // 8)), "--crop", "32", "--num_frames", "2",
                "--out_dim", "256", "--precision", "fp32", "--device", "cpu", "--steps", "1", "--threads", "1"]
    else:
        size = ["--size", "base", "--batch", str(batch), "--precision", precision, "--device", "cuda",
                "--steps", "5", "--warmup", "3" if compile_ else "2"]
    return [sys.executable, "benchmarks/bench_train_step.py", *size, "--views", "original", "--attn", "sdpa",
            "--fused_adamw", "on", *(["--compile"] if compile_ else []), "--json", str(out / f"{name}.json")]


def data_cmd(opt, out: Path) -> list[str]:
    cores = os.cpu_count() or 1
    if opt.dry_run:
        shape = ["--videos", "2", "--frames", "40", "--height", "64", "--width", "80", "--samples", "12",
                 "--rounds", "1",
                 "--crop", "32", "16", "--workers", "0", "1", "--device_decode", "cpu", "--decode_threads", "1", "2",
                 "--feed_step", "tiny",
                 "--feed_batch", "2", "--feed_workers", "1", "--feed_steps", "1", "--max_s", "20"]
    else:
        workers = sorted({1, 4, cores})
        shape = ["--videos", "8", "--samples", str(max(64, 8 * cores)), "--rounds", "1",
                 "--workers", *map(str, workers), "--device_decode", "cuda", "--feed_step", "base",
                 "--feed_batch", "16", "--feed_workers", str(min(8, cores)), "--feed_steps", "10", "--max_s", "12"]
    return [sys.executable, "benchmarks/bench_data.py", "--loader_only", *shape, "--out", str(out / "data.json")]


def train_knn_cmd(opt, out: Path) -> list[str]:
    """Generate the videos, pretrain ~100 steps, kNN after the last epoch; checked by check_train_knn."""
    data, run = out / "train_knn_data", out / "train_knn"
    if opt.dry_run:
        gen, epochs, batch, decode, workers = ["--classes", "3", "--per_class", "4"], 2, 4, "cpu", 0
    else:
        gen, epochs, batch, decode = ["--classes", "6", "--per_class", "24"], 6, 8, "cuda"
        workers = min(8, os.cpu_count() or 1)
    opts = ["DATA.PATH_PREFIX", f"{data}/videos", "DATA.NUM_FRAMES", "4", "DATA.SAMPLING_RATE", "16",
            "DATA.TRAIN_CROP_SIZE", "64", "DATA.LOCAL_CROP_SIZE", "32", "DATA.TEST_CROP_SIZE", "64",
            "DATA.TRAIN_JITTER_SCALES", "[64, 64]", "TEST.NUM_SPATIAL_CROPS", "1", "MODEL.DROP_PATH_RATE", "0.0",
            "MODEL.DEPTH", "4", "DATA.DECODE_DEVICE", decode]
    script = (f"set -e; {sys.executable} -m datasets.synthetic --out {data} --scene particles --motions move_right "
              f"move_up move_down rotate_cw zoom_in zoom_out --frames 64 --size 64 {' '.join(gen)}; "
              f"{sys.executable} train_ssl.py --arch vit_tiny --out_dim 512 --epochs {epochs} --batch_size_per_gpu "
              f"{batch} --lr 0.01 --warmup_epochs 1 --min_lr 1e-5 --momentum_teacher 0.99 --use_bn_in_head True "
              f"--teacher_temp 0.01 --warmup_teacher_temp 0.01 --local_crops_number 2 --num_workers {workers} "
              f"--log_freq 10 --knn_freq {epochs} --knn_data_path {data}/knn_splits --knn_path_prefix {data}/videos "
              f"--eval_batch_size_per_gpu 16 --data_path {data}/annotations --output_dir {run} --opts "
              + " ".join(f"'{o}'" for o in opts))
    return ["bash", "-c", script]


def check_train_knn(out: Path, stage: dict) -> dict:
    """The loss falls from the first to the last epoch, kNN reported, no CPU fallback or failed GPU decode."""
    from utils.run_dir import read_epoch_log
    epochs = read_epoch_log(out / "train_knn")  # a run killed at the stage's limit may leave a partial last line
    losses = [e["train_loss"] for e in epochs if "train_loss" in e]
    text = Path(stage["log"]).read_text(errors="replace") if "log" in stage else ""
    fallbacks = len(re.findall(r"not with NVDEC", text))
    failed = len(re.findall(r"cannot be decoded on", text))
    sequential = len(re.findall(r"decoded sequentially on the CPU instead", text))
    knn = [e.get("knn_top1") for e in epochs if "knn_top1" in e]
    checks = {"losses": losses, "loss_falls": len(losses) >= 2 and losses[-1] < losses[0],
              "knn_top1": knn[-1] if knn else None, "nvdec_cpu_fallbacks": fallbacks, "failed_gpu_decodes": failed,
              "sequential_cpu_decodes": sequential}
    ok = stage["status"] == "ok" and checks["loss_falls"] and checks["knn_top1"] is not None and not fallbacks \
        and not failed and not sequential
    if stage["status"] == "ok" and not ok:
        stage["status"] = "failed"
    stage["checks"] = checks
    return stage


def pytest_cmd(out: Path, name: str, marker: str) -> list[str]:
    """pytest on the tests of `marker`; a test running over 60 s has every thread's stack written to the log
    (a hang killed at the stage's limit never writes its junit XML)."""
    return [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider",
            "-o", "faulthandler_timeout=60", f"--junitxml={out / (name + '.xml')}"]


def env_cmd(opt, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--env_json", str(out / "env.json"),
            *(["--dry-run"] if opt.dry_run else [])]


def env_info(opt) -> dict:
    """utils/collect_env.py's record of the machine, whether the GPU has native bf16, and the run's date (the
    env stage's process writes it)."""
    import torch
    from utils.collect_env import collect_env
    info = {**collect_env(), "dry_run": opt.dry_run, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if torch.cuda.is_available():
        info["cuda_bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    return info


def shm_space(path: str = "/dev/shm") -> dict | str:
    """Size and free space of /dev/shm: DataLoader workers hand their batches over through it, and the fed
    AUGMENT_DEVICE path queues ~4.6 GB of decoded frames there (a container's default is 64 MiB)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as err:
        return f"missing ({err})"
    return {"total_gib": round(usage.total / 2 ** 30, 2), "free_gib": round(usage.free / 2 ** 30, 2)}


def check_torchcodec() -> int:
    """For device_check.sh: print one line, `torchcodec VERSION: decodes` or why it does not (torchcodec_status:
    it decodes a video made in memory); 0 when it decodes."""
    from importlib import metadata
    try:
        from datasets.decoder import torchcodec_status
        why = torchcodec_status()
    except Exception as err:  # datasets does not import (PyAV missing, ...)
        why = f"{type(err).__name__}: {err}"
    try:
        version = metadata.version("torchcodec")
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    print(f"torchcodec {version}: {why or 'decodes'}")
    return 1 if why else 0


def demo_supports_scale() -> bool:
    demo = ROOT / "scripts" / "demo.sh"
    return demo.is_file() and "DEMO_SCALE" in demo.read_text()


# ----------------------------------------------------------------------------------------------- summary
STAGE_LIMITED = ("device_", "augment_")  # data paths whose rate is the training process's stage, not the workers'


def verdicts(results: dict) -> dict:
    """Step clips/s at batch 16 (best of eager / compiled) against each data path's loader rate."""
    steps = [results.get(s, {}).get("result") or {} for s in ("step_b16", "step_b16_compile")]
    clips = max((s.get("clips_per_s", 0) for s in steps), default=0)
    data = (results.get("data", {}).get("result") or {}).get("samples_per_s", {})
    if not clips or not data:
        return {}
    out = {"step_clips_per_s_b16": round(clips, 2), "step_size": steps[0].get("size") or steps[1].get("size")}
    by_path: dict[str, dict[int, float]] = {}
    for key, rate in data.items():
        m = re.fullmatch(r"loader_(.+)_(\d+)_workers", key)
        if m:
            by_path.setdefault(m.group(1), {})[int(m.group(2))] = rate
    for path, rates in by_path.items():
        most = max(rates)
        out[path] = {"samples_per_s": rates, "verdict": "compute-bound" if rates[most] >= clips else "data-bound"}
        if path.startswith(STAGE_LIMITED):  # more workers do not raise it: no cores-per-GPU figure
            out[path]["limited_by"] = "the training process's stage"
        else:
            per_worker = rates.get(1) or rates[most] / max(most, 1)
            out[path]["cores_per_gpu_needed"] = round(clips / per_worker, 1) if per_worker else None
    feed = (results.get("data", {}).get("result") or {}).get("feed_step") or {}
    for path, fed in feed.get("paths", {}).items():
        if "wait_fraction" in fed:  # else it failed: the data row says why
            out[f"fed_step_{path}"] = {**fed, "workers": feed["workers"],
                                       "verdict": "compute-bound" if fed["wait_fraction"] < WAIT_OK else "data-bound"}
    return out


def stage_label(ms: dict) -> str:
    """What the GPU decode path's stage timings are: "GPU stage" only when NVDEC decoded every video of it
    (torchcodec falls back to CPU decoding quietly on a GPU without NVDEC)."""
    fallbacks, sequential = ms.get("nvdec_cpu_fallbacks", 0), ms.get("sequential_cpu_decodes", 0)
    if str(ms.get("device", "cuda")).startswith("cuda") and not fallbacks and not sequential:
        return "GPU stage"
    label = f"stage on {ms.get('device')}"
    if fallbacks or sequential:
        label += f" (torchcodec decoded on the CPU: {fallbacks} NVDEC fallbacks, {sequential} sequential decodes)"
    return label


def stage_split(ms: dict, cache: dict | None) -> str:
    """The GPU decode path's main-process stage per sample, in one line of the table."""
    text = (f"{stage_label(ms)} {ms['stage_ms']:.1f} ms/sample = decode {ms['decode_ms']:.1f} (torchcodec open "
            f"{ms['open_ms']:.1f} + get frames {ms['get_frames_ms']:.1f}) + render {ms['render_ms']:.1f}")
    if cache and "cache_on" in cache:
        text += (f"; NVDEC cache on/off: open {cache['cache_on']['open_ms']:.0f}/{cache['cache_off']['open_ms']:.0f}"
                 f" ms, get frames {cache['cache_on']['get_frames_ms']:.0f}/{cache['cache_off']['get_frames_ms']:.0f}"
                 " ms")
    return text


def data_detail(res: dict) -> str:
    """The data stage's row: what it measured, and what failed."""
    parts = [", ".join(f"{k} {v}" for k, v in res.get("samples_per_s", {}).items())]
    split = res.get("device_stage_ms")
    if split:
        parts.append(stage_split(split, res.get("nvdec_cache")))
    if res.get("device_stage_threads_ms"):
        parts.append(f"{stage_label(split or {})} ms/sample with " + ", ".join(
            f"{t} threads {ms:.1f}" for t, ms in res["device_stage_threads_ms"].items()))
    feed = res.get("feed_step") or {}
    for path, fed in feed.get("paths", {}).items():
        parts.append(f"fed step ({path}, {feed.get('precision', 'bf16')}) waits {fed['wait_fraction']:.1%}"
                     if "wait_fraction" in fed else f"fed step ({path}) failed: {fed.get('error')}")
    record = res.get("device_decode") or {}
    if record.get("nvdec_cpu_fallbacks") or record.get("sequential_cpu_decodes"):
        parts.append(f"GPU decode loader: {record['nvdec_cpu_fallbacks']} NVDEC CPU fallbacks, "
                     f"{record['sequential_cpu_decodes']} sequential CPU decodes")
    parts += [f"{name} failed: {why}" for name, why in (res.get("errors") or {}).items()]
    return "; ".join(p for p in parts if p)


def env_detail(res: dict) -> str:
    gpu = res.get("gpu", "")
    if "driver" in res:
        gpu += f" (driver {res['driver']}, NCCL {res.get('nccl')}, NVDEC library {res.get('nvcuvid')})"
    if res.get("cuda_bf16") is False:
        gpu += ", no native bf16: the steps run fp16"
    shm = res.get("dev_shm")
    shm = f"{shm['free_gib']} of {shm['total_gib']} GiB free" if isinstance(shm, dict) else shm
    return (f"{gpu}; {res.get('cpu')}, {res.get('cpu_count')} cores, /dev/shm {shm}; torch {res.get('torch')}, "
            f"{res.get('amp_dtype_auto')}; torchcodec {res.get('torchcodec')} (wheel: {res.get('torchcodec_wheel')}), "
            f"decord {res.get('decord')}, PyAV {res.get('av')}, auto decoder {res.get('decoding_backend_auto')}")


def table(report: dict) -> str:
    rows = [f"Installed: {report.get('install')} (rc {report.get('install_rc')}); "
            f"{report.get('torchcodec_wheel', 'torchcodec not recorded')}", "",
            "| stage | status | s | result |", "|---|---|---|---|"]
    for name, r in report["stages"].items():
        res = r.get("result") or {}
        if name.startswith("step_") and res:
            frac = res.get("fraction_of_peak", {}).get(res.get("fraction_reference", "bf16"), 0)
            detail = (f"{res['size']} {res.get('precision')}: {res['step_s_median'] * 1000:.0f} ms/step, "
                      f"{res['clips_per_s']:.1f} clips/s, {res['achieved_flop_per_s'] / 1e12:.3g} TFLOP/s, "
                      f"{frac:.1%} of the {res.get('fraction_reference')} peak, "
                      f"{res['peak_memory_bytes'] / 2 ** 30:.1f} GiB")
        elif name.endswith("tests") and res:
            detail = ", ".join(f"{k} {v}" for k, v in res.items())
        elif name == "data" and res:
            detail = data_detail(res)
        elif name == "train_knn" and r.get("checks"):
            c = r["checks"]
            losses = c["losses"]
            detail = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, " if losses else "no loss, ") + \
                f"kNN top-1 {c['knn_top1']}, NVDEC CPU fallbacks {c['nvdec_cpu_fallbacks']}"
        elif name == "env" and "cpu" in res:
            detail = env_detail(res)
        else:
            detail = r.get("reason", "") or (r.get("tail", [""])[-1] if r.get("tail") else "")
        if r.get("status") not in ("ok", "skipped", "running") and r.get("tail") and detail != r["tail"][-1]:
            detail += f" (log: {r['tail'][-1]})"
        detail = detail.replace("|", "/").replace("\n", " ")
        rows.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {detail} |")
    v = report.get("verdict") or {}
    if v:
        rows.append("")
        rows.append(f"{v['step_size']} step at batch 16: {v['step_clips_per_s_b16']} clips/s")
        for path, d in v.items():
            if isinstance(d, dict) and "verdict" in d:
                if "cores_per_gpu_needed" in d:
                    extra = f", {d['cores_per_gpu_needed']} worker cores per GPU needed"
                elif "limited_by" in d:
                    extra = f", limited by {d['limited_by']} (more workers do not raise it)"
                else:
                    extra = f", step waits {d['wait_fraction']:.1%} on data with {d['workers']} workers"
                rows.append(f"- {path}: **{d['verdict']}**{extra}")
    return "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="device_check_out", help="Output folder.")
    p.add_argument("--budget_s", type=float, default=BUDGET_S,
                   help="Seconds for the whole check, counted from --started (device_check.sh's start).")
    p.add_argument("--started", type=float, default=None,
                   help="When the check started, in seconds since the epoch (device_check.sh passes its start, so "
                        "the budget covers its install); default: now.")
    p.add_argument("--only", nargs="*", choices=STAGES, default=None, help="Run only these stages.")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="Every stage tiny on the CPU (tests the script without a GPU).")
    p.add_argument("--install", default="not recorded", help="What the .sh installed, and how (from the .sh).")
    p.add_argument("--install_rc", type=int, default=0, help="Exit code of that install (from the .sh).")
    p.add_argument("--torchcodec_wheel", default="not recorded",
                   help="Which torchcodec wheel the .sh installed and whether it decodes (from the .sh).")
    p.add_argument("--export", default=None,
                   help="Also write device_check.json, device_check.md and logs.tar.gz (stage logs, junit xml, "
                        "stage json, the run's log.txt) to this folder: three files, as a device's $OUT takes. "
                        "Rewritten before and after every stage and every 20 s during one.")
    p.add_argument("--env_json", default=None, help="Internal (the env stage's process): write the env record here.")
    p.add_argument("--check_torchcodec", action="store_true",
                   help="Internal (device_check.sh): whether torchcodec decodes here, in one line; exit 1 if not.")
    opt = p.parse_args(argv)
    if opt.check_torchcodec:
        sys.exit(check_torchcodec())
    if opt.env_json:
        write_text(Path(opt.env_json), json.dumps(env_info(opt), indent=2, default=str) + "\n")
        return {}
    out = Path(opt.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time() if opt.started is None else opt.started
    deadline = time.monotonic() + opt.budget_s - (time.time() - started)
    test_device = "cpu" if opt.dry_run else "cuda"
    env_record: dict = {}
    commands = {
        "env": lambda: env_cmd(opt, out),
        "gpu_tests": lambda: pytest_cmd(out, "gpu_tests", "gpu"),
        "step_b16": lambda: step_cmd(opt, out, 16, False, step_precision(env_record)),
        "step_b8": lambda: step_cmd(opt, out, 8, False, step_precision(env_record)),
        "data": lambda: data_cmd(opt, out),
        "train_knn": lambda: train_knn_cmd(opt, out),
        "cuda_capable_tests": lambda: pytest_cmd(out, "cuda_capable_tests", "cuda_capable"),
        "step_b16_compile": lambda: step_cmd(opt, out, 16, True, step_precision(env_record)),
        "step_b8_compile": lambda: step_cmd(opt, out, 8, True, step_precision(env_record)),
        "demo_gpu": lambda: ["bash", "scripts/demo.sh"],
    }
    stage_env = {"SVT_TEST_DEVICE": test_device, "HF_HUB_OFFLINE": "1",
                 "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache"),
                 "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    report = {"install": opt.install, "install_rc": opt.install_rc, "torchcodec_wheel": opt.torchcodec_wheel,
              "budget_s": opt.budget_s, "stages": {}}

    def save() -> None:
        """device_check.json and .md, and the export, as they stand (a check killed later keeps them)."""
        try:
            report["verdict"] = verdicts(report["stages"])
            write_text(out / "device_check.json", json.dumps(report, indent=2, default=str) + "\n")
            write_text(out / "device_check.md", table(report))
            if opt.export:
                export(out, Path(opt.export))
        except Exception as err:  # a report that cannot be written must not end the check
            print(f"[device_check] writing the report failed: {type(err).__name__}: {err}", flush=True)

    def collect(name: str, result: dict) -> dict:
        """A stage's result with what it wrote: the env record, the junit counts, its JSON, train_knn's checks."""
        nonlocal env_record
        if name == "env":
            env_record = {**(load_json(out / "env.json") or {}), "dev_shm": shm_space(),
                          "torchcodec_wheel": opt.torchcodec_wheel}
            result["result"] = env_record
        elif name.endswith("tests"):
            result["result"] = junit_counts(out / f"{name}.xml")
        elif name.startswith("step_"):
            result["result"] = load_json(out / f"{name}.json")
        elif name == "data":
            result["result"] = load_json(out / "data.json")
        elif name == "train_knn":
            result = check_train_knn(out, result)
        return result

    running = None
    try:
        for name in STAGES:
            if opt.only is not None and name not in opt.only:
                continue
            left = deadline - time.monotonic()
            if opt.dry_run and (name.endswith("_compile") or name == "demo_gpu"):
                result = {"status": "skipped", "reason": "dry run: minutes on a CPU"}
            elif name == "demo_gpu" and not demo_supports_scale():
                result = {"status": "skipped", "reason": "scripts/demo.sh has no DEMO_SCALE (demo branch not merged)"}
            elif left < MIN_STAGE_S and name != "env":  # env runs whatever the budget: it is the machine's record
                result = {"status": "skipped",
                          "reason": f"out of budget ({left:.0f} s left of --budget_s {opt.budget_s:.0f})"}
            else:
                env = {**stage_env, **({"DEMO_SCALE": "gpu", "DEMO_OUT": str(out / "demo")} if name == "demo_gpu"
                                       else {})}
                limit = LIMITS[name] * (3 if opt.dry_run else 1)
                limit = limit if name == "env" else min(limit, left)
                print(f"[device_check] {name} (limit {limit:.0f} s)", flush=True)
                report["stages"][name] = {"status": "running", "limit_s": round(limit),
                                          "started_utc": time.strftime("%H:%M:%S", time.gmtime())}
                save()
                running = name
                result = collect(name, run_stage(name, commands[name](), limit, out, env, tick=save))
                running = None
            report["stages"][name] = result
            save()
            print(f"[device_check] {name}: {result['status']} ({result.get('seconds', 0)} s)", flush=True)
            if result.get("tail"):  # what comes back of a device run whose files are lost: its printed output
                print("\n".join(f"    {line[:200]}" for line in result["tail"]), flush=True)
    except (Stopped, KeyboardInterrupt) as err:
        if running:  # run_stage stopped it: keep what it wrote and its log's end, as for a timeout
            log = out / "logs" / f"{running}.log"
            tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.is_file() else []
            report["stages"][running] = collect(running, {
                **report["stages"][running], "status": "stopped", "log": str(log), "tail": tail,
                "reason": f"the check was stopped ({type(err).__name__} {err})"})
            print("\n".join(f"    {line[:200]}" for line in tail), flush=True)
        save()
        print(table(report))
        raise SystemExit(f"[device_check] stopped during {running or 'the report'}")
    text = table(report)
    print(text)
    return report


def export(out: Path, dest: Path) -> None:
    """device_check.json and .md, and one logs.tar.gz of the small text files the stages wrote (no videos,
    checkpoints or compiler caches; of a file over EXPORT_MAX_BYTES its end), to `dest`, each file replaced
    whole (a check killed meanwhile leaves the previous one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("device_check.json", "device_check.md"):
        write_text(dest / name, (out / name).read_text())
    keep = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".log", ".xml", ".json", ".txt", ".md")
            and "inductor_cache" not in p.parts and p.resolve().parent != dest.resolve()]
    tmp = dest / "logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(keep):
            with contextlib.suppress(OSError):  # a file removed meanwhile
                data = tail_bytes(path, EXPORT_MAX_BYTES)
                info = tarfile.TarInfo(str(path.relative_to(out)))
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest / "logs.tar.gz")


def tail_bytes(path: Path, limit: int) -> bytes:
    """The last `limit` bytes of a file (all of a shorter one)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read()


def _stop(signum, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: the stage is being stopped and the report written
    raise Stopped(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    signal.signal(signal.SIGTERM, _stop)
    main()
