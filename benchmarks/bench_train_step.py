"""Throughput of one full SVT training step, against the matmul peak measured in the same process.

The step is `train_ssl.train_step` itself (what training runs): teacher forward on the 2 global views,
student forward + backward on all views, DINO loss, per-parameter clipping, optimizer step, teacher EMA.
Networks, loss, optimizer and precision come from `train_ssl.build_train_state`, as in training.

FLOPs: fvcore's count of the student forward (all views) plus the teacher forward (2 global views),
fvcore counting one multiply-add as one flop, so multiplied by 2 here. The backward is accounted as 2x the
student forward (grads w.r.t. activations and weights), so step FLOPs = 2 * (3 * student_fwd + teacher_fwd)
in fvcore units. Element-wise ops (softmax, norms, GELU, the loss, AdamW, EMA) are not counted.

    python benchmarks/bench_train_step.py --size base --batch 1 --views original --json base_fp32.json
    python benchmarks/bench_train_step.py --size tiny --batch 2 --crop 64 --out_dim 4096 --precision bf16
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_ssl  # noqa: E402
from models.timesformer import Attention  # noqa: E402
from utils.defaults import get_cfg  # noqa: E402

SIZES = {"tiny": "vit_tiny", "small": "vit_small", "base": "vit_base"}
LOCAL_FRAMES = (2, 2, 4, 4, 8, 8, 16, 16)
VIEW_PRESETS = {  # (global frames, local frames) as train_ssl's data pipeline makes them
    "original": ((8, 8), (8,) * 8),  # with --num_frames other than 8: that count everywhere
    "rand_fr": ((4, 8), LOCAL_FRAMES),
    "paper": ((8, 16), LOCAL_FRAMES),
}
PRECISIONS = ("fp32", "bf16", "fp16")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base", choices=SIZES, help="Backbone: vit_tiny / vit_small / vit_base "
                   "(TimeSformer-B, the paper's).")
    p.add_argument("--batch", type=int, default=1, help="Videos per step (each gives all views).")
    p.add_argument("--views", default="original", choices=VIEW_PRESETS, help="Frames per view: original "
                   "(8 everywhere), rand_fr (DATA.RAND_FR: 4, 8 | 2,2,4,4,8,8,16,16) or paper (8, 16 | 2,...,16).")
    p.add_argument("--num_frames", type=int, default=8, help="Frames of every view in the `original` preset "
                   "(DATA.NUM_FRAMES; the demo uses 4).")
    p.add_argument("--crop", type=int, default=224, help="Global crop side; local = round(crop * 96/224) "
                   "to a multiple of the patch size (224 -> 96).")
    p.add_argument("--out_dim", type=int, default=65536, help="Prototypes K of the DINO head.")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "explicit"], help="Attention kernel: torch's "
                   "scaled_dot_product_attention (training's) or the explicit softmax(QK^T)V.")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="Autocast dtype (train_ssl "
                   "--amp_dtype; fp16 needs CUDA); fp32: --use_fp16 false.")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones (train_ssl --compile).")
    p.add_argument("--grad_checkpointing", action="store_true", help="train_ssl --grad_checkpointing True.")
    p.add_argument("--fused_adamw", default="auto", choices=["auto", "on", "off"],
                   help="auto: train_ssl's choice (fused on CUDA and CPU).")
    p.add_argument("--channels_last", action="store_true", help="channels_last patch-embedding conv and input.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps first (compile, allocator, caches).")
    p.add_argument("--matmul_n", type=int, default=2048, help="Side of the square matmuls of the peak.")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default).")
    p.add_argument("--profile", action="store_true", help="torch.profiler on one extra step: time in ops vs "
                   "step time (the rest is Python/dispatch overhead) and the top ops.")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when there is "
                   "one.")
    p.add_argument("--json", default=None, help="Write the result here.")
    p.add_argument("--note", default="", help="Free text stored in the JSON (e.g. machine shared).")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Best FLOP/s of n x n x n matmuls (2 n^3 flop each)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    sync(device)
    best = math.inf
    inner = 10 if device.type == "cuda" else 1
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / best


def measure_peaks(device: torch.device, n: int) -> dict:
    return {name: matmul_peak(device, dtype, n, reps=3) for name, dtype in (("fp32", torch.float32),
                                                                          ("bf16", torch.bfloat16))}


def local_crop(crop: int, patch: int = 16) -> int:
    return max(patch, round(crop * 96 / 224 / patch) * patch)


def view_frames(preset: str, num_frames: int) -> tuple[tuple, tuple]:
    if preset == "original":
        return (num_frames,) * 2, (num_frames,) * 8
    return VIEW_PRESETS[preset]


def make_views(batch: int, preset: str, crop: int, device: torch.device, channels_last: bool, num_frames: int):
    g_frames, l_frames = view_frames(preset, num_frames)
    lc = local_crop(crop)
    shapes = [(t, crop) for t in g_frames] + [(t, lc) for t in l_frames]
    views = [torch.randn(batch, 3, t, s, s, device=device) for t, s in shapes]
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
    return views, shapes


def build_state(opt, device: torch.device):
    """The TrainState of train_ssl.build_train_state (what training builds) for the benchmark's sizes; its
    schedules are those of a 10-epoch run of 100 iterations per epoch without warm-up."""
    amp_dtype = {"fp32": "auto", "bf16": "bf16", "fp16": "fp16"}[opt.precision]
    args = train_ssl.get_args_parser().parse_args([
        "--arch", SIZES[opt.size], "--out_dim", str(opt.out_dim), "--epochs", "10", "--warmup_epochs", "0",
        "--freeze_last_layer", "0",  # the common case: last layer trained
        "--local_crops_number", str(len(VIEW_PRESETS[opt.views][1])), "--grad_checkpointing",
        str(opt.grad_checkpointing), "--compile", str(opt.compile), "--use_fp16", str(opt.precision != "fp32"),
        "--amp_dtype", amp_dtype])
    cfg = get_cfg()
    cfg.DATA.TRAIN_CROP_SIZE = opt.crop
    cfg.DATA.NUM_FRAMES = opt.num_frames
    cfg.DATA.LOCAL_CROP_SIZE = local_crop(opt.crop)
    fused = {"auto": None, "on": True, "off": False}[opt.fused_adamw]
    state = train_ssl.build_train_state(args, cfg, device, niter=100, fused=fused)
    for net in (state.student_without_ddp, state.teacher_without_ddp):
        net.backbone.set_fused_attention(opt.attn == "sdpa")
        if opt.channels_last:
            net.backbone.patch_embed.proj.to(memory_format=torch.channels_last)
    return state, args


def count_flops(state, views: list[torch.Tensor], batch: int) -> dict:
    """fvcore counts (multiply-adds) of the student and teacher forwards, traced at batch 1 with explicit
    attention (fvcore has no SDPA handle; both compute the same matmuls) and scaled to `batch`."""
    from fvcore.nn import FlopCountAnalysis
    one = [v[:1].float().contiguous() for v in views]
    nets = (state.student_without_ddp, state.teacher_without_ddp)
    fused = [next(a.fused for a in net.backbone.modules() if isinstance(a, Attention)) for net in nets]
    compiled = [net.backbone._compiled_call_impl for net in nets]  # fvcore traces the eager modules
    counts = {}
    with torch.no_grad():
        for name, net, inputs in (("student", nets[0], one), ("teacher", nets[1], one[:2])):
            net.backbone.set_fused_attention(False)
            net.backbone._compiled_call_impl = None
            fca = FlopCountAnalysis(net, (inputs,))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            counts[name] = fca.total() * batch
    for net, f, c in zip(nets, fused, compiled):
        net.backbone.set_fused_attention(f)
        net.backbone._compiled_call_impl = c
    student_fwd, teacher_fwd = 2 * counts["student"], 2 * counts["teacher"]
    return {"student_fwd": student_fwd, "teacher_fwd": teacher_fwd, "student_bwd": 2 * student_fwd,
            "step": 3 * student_fwd + teacher_fwd}


def profile_step(state, views, args, device) -> dict:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    for _ in range(2):  # the first profiled step pays the profiler's own start-up
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            train_ssl.train_step(state, views, 0, 0, args)
            sync(device)
            wall = time.perf_counter() - t0
    events = prof.key_averages()
    op_time = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"step_s_profiled": wall, "aten_self_cpu_s": op_time,
            "overhead_fraction": max(0.0, 1 - op_time / wall),
            "top_ops": [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4), "calls": e.count}
                        for e in top]}


def main() -> None:
    opt = get_parser().parse_args()
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if opt.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(opt.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; bf16 is the fast path
    torch.manual_seed(0)
    state, args = build_state(opt, device)
    views, shapes = make_views(opt.batch, opt.views, opt.crop, device, opt.channels_last, opt.num_frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    it = 0
    for _ in range(opt.warmup):
        train_ssl.train_step(state, views, 0, it, args)
        it += 1
    sync(device)
    # The matmul peaks are measured around every timed step, so that the fraction compares the step with
    # what the machine gave this process at that moment (it is shared).
    peaks = [measure_peaks(device, opt.matmul_n)]
    times, losses = [], []
    for _ in range(opt.steps):
        t0 = time.perf_counter()
        loss, _ = train_ssl.train_step(state, views, 0, it, args)
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        it += 1
        peaks.append(measure_peaks(device, opt.matmul_n))
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
        mem_kind = "cuda_max_allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem_kind = "cpu_peak_rss"
    prof = profile_step(state, views, args, device) if opt.profile else None
    flops = count_flops(state, views, opt.batch)

    step_s = statistics.median(times)
    achieved = flops["step"] / step_s
    ref = "bf16" if opt.precision in ("bf16", "fp16") else "fp32"
    fractions = {k: [flops["step"] / t / ((peaks[i][k] + peaks[i + 1][k]) / 2) for i, t in enumerate(times)]
                 for k in ("fp32", "bf16")}
    fraction = {k: statistics.median(v) for k, v in fractions.items()}
    peak = {k: statistics.median(p[k] for p in peaks) for k in ("fp32", "bf16")}
    result = {
        "size": opt.size, "batch": opt.batch, "crop": [opt.crop, local_crop(opt.crop)], "views": opt.views,
        "view_shapes_t_side": shapes,
        "out_dim": opt.out_dim, "attn": opt.attn, "precision": opt.precision, "compile": opt.compile,
        "grad_checkpointing": opt.grad_checkpointing, "fused_adamw": opt.fused_adamw,
        "optimizer": {k: v for k, v in state.optimizer.defaults.items() if k in ("fused", "foreach")},
        "channels_last": opt.channels_last, "device": str(device),
        "step_s_median": step_s, "step_s_min": min(times), "step_s_all": times,
        "fraction_of_peak_best_step": {k: max(v) for k, v in fractions.items()}, "clips_per_s": opt.batch / step_s,
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "flops": flops, "flops_note": "multiply-adds x 2 (fvcore x 2); bwd = 2 x student fwd; step = 3 x student "
                                      "fwd + teacher fwd; element-wise ops not counted",
        "achieved_flop_per_s": achieved,
        "matmul_peak_flop_per_s": {"around_steps": peaks, "median": peak, "n": opt.matmul_n},
        "fraction_of_peak": fraction, "fraction_of_peak_per_step": fractions, "fraction_reference": ref,
        "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind,
        "profile": prof,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
        "note": opt.note, "command": " ".join(sys.argv),
    }
    print(f"{opt.size} b{opt.batch} {opt.views} crop {opt.crop}/{local_crop(opt.crop)} K={opt.out_dim} "
          f"{opt.precision} {opt.attn}{' compile' if opt.compile else ''}"
          f"{' ckpt' if opt.grad_checkpointing else ''} adamw={opt.fused_adamw}: "
          f"step {step_s:.3f} s median, {min(times):.3f} s best ({', '.join(f'{t:.3f}' for t in times)}), "
          f"{opt.batch / step_s:.3f} clips/s")
    print(f"  step {flops['step'] / 1e12:.3f} TFLOP (student fwd {flops['student_fwd'] / 1e12:.3f}, teacher fwd "
          f"{flops['teacher_fwd'] / 1e12:.3f}, bwd = 2x student fwd), achieved {achieved / 1e9:.1f} GFLOP/s")
    around = {k: ", ".join(f"{p[k] / 1e9:.0f}" for p in peaks) for k in ("fp32", "bf16")}
    print(f"  matmul peak around the steps fp32 {around['fp32']}, bf16 {around['bf16']} GFLOP/s -> "
          f"{fraction[ref]:.1%} of the {ref} peak "
          f"(fp32 {fraction['fp32']:.1%}, bf16 {fraction['bf16']:.1%}; best step: fp32 "
          f"{max(fractions['fp32']):.1%}, bf16 {max(fractions['bf16']):.1%}); peak memory {peak_mem / 2 ** 30:.2f} GiB "
          f"({mem_kind})")
    if prof:
        print(f"  profiled step {prof['step_s_profiled']:.3f} s, aten self time {prof['aten_self_cpu_s']:.3f} s, "
              f"overhead {prof['overhead_fraction']:.1%}")
        for e in prof["top_ops"]:
            print(f"    {e['op']:<40} {e['self_cpu_s']:8.4f} s  x{e['calls']}")
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # a killed run keeps its last lines
    main()
