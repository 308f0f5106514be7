"""One device check of svt on a CUDA machine (run through benchmarks/device_check.sh, which installs what is
missing first). Every stage runs as its own process under a time limit, inside one overall budget (default
450 s: the whole check stays under 8 minutes on one H100/H200); a stage that fails, hangs or does not fit in
what is left of the budget is recorded as such and the next one runs. Results: OUT/device_check.json, a short
table in OUT/device_check.md (also printed), each stage's log in OUT/logs/.

Stages, in order (the most telling first: the data path, the open question of the last run, before the
step; torch.compile last as it takes longest):
- env: torch, CUDA, GPU and CPU names, core count;
- gpu_tests: `pytest -m gpu` (the GPU-only tests: NVDEC decode, NVDEC's crop of videos sharing a coded size,
  no host sync and every tensor on the GPU in the train step, rendering views without host syncs, NVDEC threads
  decoding beside a busy training stream, the CUDA RNG kept across seeded samples, SDPA past 65535 sequences);
- data: bench_data.py: for the GPU decode path (DATA.DECODE_DEVICE cuda) the CPU cost of a plan, where its
  main-process stage's time goes per sample (NVDEC decoder open, get frames, view rendering; open and decode
  with torchcodec's NVDEC cache on and off), the stage with 1, 8 and 16 videos decoded at once
  (DATA.DEVICE_DECODE_THREADS) and its loader with all-core workers (cut at 12 s), the same loader with
  DATA.AUGMENT_DEVICE cuda (the workers decode, the GPU renders); DataLoader samples/s with 1, 4 and
  all-core workers per CPU decoder (never cut); then the ViT-B step fed by the default CPU loader, the GPU
  decode loader and the AUGMENT_DEVICE loader, each with min(8, cores) workers (share of the step spent
  waiting on data; each cut at 12 s);
- step_b16, step_b8: bench_train_step.py, ViT-B, original views, bf16, SDPA, fused AdamW: step time, TFLOP/s,
  fraction of the bf16 matmul peak measured in the same run, peak memory;
- train_knn: a 1-GPU train_ssl.py run of ~100 steps on generated videos with the GPU decode path, then kNN:
  the loss must fall, kNN must report, and no video may fall back to CPU decoding;
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
import json
import os
import re
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
STAGES = ("env", "gpu_tests", "data", "step_b16", "step_b8", "train_knn", "cuda_capable_tests",
          "step_b16_compile", "step_b8_compile", "demo_gpu")
# time limit of each stage (s) on a GPU; the overall budget cuts them further
LIMITS = {"env": 30, "gpu_tests": 90, "step_b16": 90, "step_b8": 75, "data": 180, "train_knn": 120,
          "cuda_capable_tests": 120, "step_b16_compile": 180, "step_b8_compile": 150, "demo_gpu": 420}
MIN_STAGE_S = 15  # a stage is not started with less than this left of the budget


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


def run_stage(name: str, cmd: list[str], limit: float, out: Path, env: dict | None = None) -> dict:
    """Run `cmd` in its own process group with a time limit; its output goes to out/logs/<name>.log.
    Never raises: the result says ok / failed (with the exit code) / timeout, the seconds and the log's tail."""
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env={**os.environ, **(env or {})})
        except OSError as err:
            return {"status": "failed", "error": str(err), "seconds": 0.0, "log": str(log)}
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started (loader workers)
            proc.wait()
            wait_group_gone(proc.pid)  # so that the next stage does not share the GPU with a dying one
            rc, status = None, "timeout"
    lines = log.read_text(errors="replace").splitlines()
    result = {"status": status, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "limit_s": round(limit),
              "log": str(log)}
    if status != "ok":
        result["tail"] = lines[-15:]
    return result


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped of a pytest --junitxml file (empty when missing)."""
    if not path.is_file():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------- stages
def step_cmd(opt, out: Path, batch: int, compile_: bool) -> list[str]:
    name = f"step_b{batch}{'_compile' if compile_ else ''}"
    if opt.dry_run:
        size = ["--size", "tiny", "--batch", str(max(1, batch // 8)), "--crop", "32", "--num_frames", "2",
                "--out_dim", "256", "--precision", "fp32", "--device", "cpu", "--steps", "1", "--threads", "1"]
    else:
        size = ["--size", "base", "--batch", str(batch), "--precision", "bf16", "--device", "cuda", "--steps", "5",
                "--warmup", "3" if compile_ else "2"]
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
        shape = ["--videos", "8", "--samples", str(max(64, 8 * cores)), "--workers", *map(str, workers),
                 "--device_decode", "cuda", "--feed_step", "base", "--feed_batch", "16",
                 "--feed_workers", str(min(8, cores)), "--feed_steps", "10", "--max_s", "12"]
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
    log_txt = out / "train_knn" / "log.txt"
    epochs = [json.loads(line) for line in log_txt.read_text().splitlines()] if log_txt.is_file() else []
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
    return [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider",
            f"--junitxml={out / (name + '.xml')}"]


def env_info(opt) -> dict:
    """utils/collect_env.py's record of the machine, with the run's date."""
    from utils.collect_env import collect_env
    return {**collect_env(), "dry_run": opt.dry_run, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def demo_supports_scale() -> bool:
    demo = ROOT / "scripts" / "demo.sh"
    return demo.is_file() and "DEMO_SCALE" in demo.read_text()


# ----------------------------------------------------------------------------------------------- summary
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
        per_worker = rates.get(1) or rates[most] / max(most, 1)
        out[path] = {"samples_per_s": rates, "verdict": "compute-bound" if rates[most] >= clips else "data-bound",
                     "cores_per_gpu_needed": round(clips / per_worker, 1) if per_worker else None}
    feed = (results.get("data", {}).get("result") or {}).get("feed_step") or {}
    for path, fed in feed.get("paths", {}).items():
        out[f"fed_step_{path}"] = {**fed, "workers": feed["workers"],
                                   "verdict": "compute-bound" if fed["wait_fraction"] < WAIT_OK else "data-bound"}
    return out


def stage_split(ms: dict, cache: dict | None) -> str:
    """The GPU decode path's main-process stage per sample, in one line of the table."""
    text = (f"GPU stage {ms['stage_ms']:.1f} ms/sample = decode {ms['decode_ms']:.1f} (torchcodec open "
            f"{ms['open_ms']:.1f} + get frames {ms['get_frames_ms']:.1f}) + render {ms['render_ms']:.1f}")
    if cache and "cache_on" in cache:
        text += (f"; NVDEC cache on/off: open {cache['cache_on']['open_ms']:.0f}/{cache['cache_off']['open_ms']:.0f}"
                 f" ms, get frames {cache['cache_on']['get_frames_ms']:.0f}/{cache['cache_off']['get_frames_ms']:.0f}"
                 " ms")
    return text


def table(report: dict) -> str:
    rows = [f"Installed: {report.get('install')} (rc {report.get('install_rc')})", "",
            "| stage | status | s | result |", "|---|---|---|---|"]
    for name, r in report["stages"].items():
        res = r.get("result") or {}
        if name.startswith("step_") and res:
            frac = res.get("fraction_of_peak", {}).get(res.get("fraction_reference", "bf16"), 0)
            detail = (f"{res['size']}: {res['step_s_median'] * 1000:.0f} ms/step, {res['clips_per_s']:.1f} clips/s, "
                      f"{res['achieved_flop_per_s'] / 1e12:.3g} TFLOP/s, {frac:.1%} of the "
                      f"{res.get('fraction_reference')} peak, {res['peak_memory_bytes'] / 2 ** 30:.1f} GiB")
        elif name.endswith("tests") and res:
            detail = ", ".join(f"{k} {v}" for k, v in res.items())
        elif name == "data" and res:
            detail = ", ".join(f"{k} {v}" for k, v in res.get("samples_per_s", {}).items())
            if res.get("device_stage_ms"):
                detail += "; " + stage_split(res["device_stage_ms"], res.get("nvdec_cache"))
            if res.get("device_stage_threads_ms"):
                detail += "; GPU stage ms/sample with " + ", ".join(
                    f"{t} threads {ms:.1f}" for t, ms in res["device_stage_threads_ms"].items())
            for path, fed in (res.get("feed_step") or {}).get("paths", {}).items():
                detail += f"; fed step ({path}) waits {fed['wait_fraction']:.1%}"
        elif name == "train_knn" and r.get("checks"):
            c = r["checks"]
            losses = c["losses"]
            detail = (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, " if losses else "no loss, ") + \
                f"kNN top-1 {c['knn_top1']}, NVDEC CPU fallbacks {c['nvdec_cpu_fallbacks']}"
        elif name == "env":
            gpu = res.get("gpu", "")
            if "driver" in res:
                gpu += f" (driver {res['driver']}, NCCL {res.get('nccl')}, NVDEC library {res.get('nvcuvid')})"
            detail = (f"{gpu}; {res.get('cpu')}, {res.get('cpu_count')} cores; torch {res.get('torch')}, "
                      f"{res.get('amp_dtype_auto')}; torchcodec {res.get('torchcodec')}, decord {res.get('decord')}, "
                      f"PyAV {res.get('av')}, auto decoder {res.get('decoding_backend_auto')}")
        else:
            detail = r.get("reason", "") or (r.get("tail", [""])[-1] if r.get("tail") else "")
        rows.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {detail} |")
    v = report.get("verdict") or {}
    if v:
        rows.append("")
        rows.append(f"{v['step_size']} step at batch 16: {v['step_clips_per_s_b16']} clips/s")
        for path, d in v.items():
            if isinstance(d, dict) and "verdict" in d:
                extra = f", {d['cores_per_gpu_needed']} worker cores per GPU needed" if "cores_per_gpu_needed" in d \
                    else f", step waits {d['wait_fraction']:.1%} on data with {d['workers']} workers"
                rows.append(f"- {path}: **{d['verdict']}**{extra}")
    return "\n".join(rows) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="device_check_out", help="Output folder.")
    p.add_argument("--budget_s", type=float, default=450, help="Seconds for all stages together.")
    p.add_argument("--only", nargs="*", choices=STAGES, default=None, help="Run only these stages.")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="Every stage tiny on the CPU (tests the script without a GPU).")
    p.add_argument("--install", default="not recorded", help="What the .sh installed, and how (from the .sh).")
    p.add_argument("--install_rc", type=int, default=0, help="Exit code of that install (from the .sh).")
    p.add_argument("--export", default=None,
                   help="Also write device_check.json, device_check.md and logs.tar.gz (stage logs, junit xml, "
                        "stage json, the run's log.txt) to this folder: three files, as a device's $OUT takes.")
    opt = p.parse_args(argv)
    out = Path(opt.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + opt.budget_s
    test_device = "cpu" if opt.dry_run else "cuda"
    commands = {
        "gpu_tests": lambda: pytest_cmd(out, "gpu_tests", "gpu"),
        "step_b16": lambda: step_cmd(opt, out, 16, False),
        "step_b8": lambda: step_cmd(opt, out, 8, False),
        "data": lambda: data_cmd(opt, out),
        "train_knn": lambda: train_knn_cmd(opt, out),
        "cuda_capable_tests": lambda: pytest_cmd(out, "cuda_capable_tests", "cuda_capable"),
        "step_b16_compile": lambda: step_cmd(opt, out, 16, True),
        "step_b8_compile": lambda: step_cmd(opt, out, 8, True),
        "demo_gpu": lambda: ["bash", "scripts/demo.sh"],
    }
    stage_env = {"SVT_TEST_DEVICE": test_device, "HF_HUB_OFFLINE": "1",
                 "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache"),
                 "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    report = {"install": opt.install, "install_rc": opt.install_rc, "stages": {}}
    for name in STAGES:
        if opt.only is not None and name not in opt.only:
            continue
        left = deadline - time.monotonic()
        if name == "env":
            result = {"status": "ok", "result": env_info(opt), "seconds": 0.0}
        elif opt.dry_run and (name.endswith("_compile") or name == "demo_gpu"):
            result = {"status": "skipped", "reason": "dry run: minutes on a CPU"}
        elif name == "demo_gpu" and not demo_supports_scale():
            result = {"status": "skipped", "reason": "scripts/demo.sh has no DEMO_SCALE (demo branch not merged)"}
        elif left < MIN_STAGE_S:
            result = {"status": "skipped",
                      "reason": f"out of budget ({left:.0f} s left of --budget_s {opt.budget_s:.0f})"}
        else:
            env = {**stage_env, **({"DEMO_SCALE": "gpu", "DEMO_OUT": str(out / "demo")} if name == "demo_gpu" else {})}
            limit = min(LIMITS[name] * (3 if opt.dry_run else 1), left)
            print(f"[device_check] {name} (limit {limit:.0f} s)", flush=True)
            result = run_stage(name, commands[name](), limit, out, env)
            if name.endswith("tests"):
                result["result"] = junit_counts(out / f"{name}.xml")
            elif name.startswith("step_"):
                result["result"] = load_json(out / f"{name}.json")
            elif name == "data":
                result["result"] = load_json(out / "data.json")
            elif name == "train_knn":
                result = check_train_knn(out, result)
        report["stages"][name] = result
        print(f"[device_check] {name}: {result['status']} ({result.get('seconds', 0)} s)", flush=True)
    report["verdict"] = verdicts(report["stages"])
    (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = table(report)
    (out / "device_check.md").write_text(text)
    print(text)
    if opt.export:
        export(out, Path(opt.export))
    return report


def export(out: Path, dest: Path) -> None:
    """device_check.json and .md, and one logs.tar.gz of the small text files the stages wrote (no videos,
    checkpoints or compiler caches), to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("device_check.json", "device_check.md"):
        shutil.copyfile(out / name, dest / name)
    keep = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".log", ".xml", ".json", ".txt", ".md")
            and "inductor_cache" not in p.parts and p.stat().st_size < 4 * 2 ** 20]
    with tarfile.open(dest / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(keep):
            tar.add(path, arcname=str(path.relative_to(out)))


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    main()
