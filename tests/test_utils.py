"""utils/utils.py: flags, schedules, gradient helpers, param groups, meters, distributed setup."""
import argparse
import datetime
import math

import numpy as np
import pytest
import torch
from torch import nn

from utils import utils


def test_bool_flag(capsys):
    for value in ("on", "TRUE", "1", "yes", "True"):
        assert utils.bool_flag(value) is True
    for value in ("off", "False", "0", "no", "FALSE"):
        assert utils.bool_flag(value) is False
    with pytest.raises(argparse.ArgumentTypeError, match="invalid boolean 'maybe'"):
        utils.bool_flag("maybe")
    parser = argparse.ArgumentParser()
    parser.add_argument("--flag", type=utils.bool_flag, default=True)
    assert parser.parse_args(["--flag", "false"]).flag is False
    with pytest.raises(SystemExit):  # a clean argparse error, not a NameError
        parser.parse_args(["--flag", "nope"])
    assert "argument --flag: invalid boolean 'nope'" in capsys.readouterr().err


def test_cosine_scheduler_warmup_first_last():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], np.linspace(0, 1, 5))  # inclusive linear warm-up
    assert s[5] == pytest.approx(1.0)  # cosine starts at the base value
    n = 15
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (n - 1) / n)))
    assert s[5 + 7] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 7 / n)))
    m = utils.cosine_scheduler(0.996, 1.0, epochs=2, niter_per_ep=3)
    assert m[0] == pytest.approx(0.996) and np.all(np.diff(m) > 0) and m[-1] < 1.0


def test_clip_gradients_per_parameter():
    model = nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)  # norm sqrt(24) ~ 4.9 -> clipped to 3
    model.bias.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> unchanged
    norms = utils.clip_gradients(model, 3.0)
    torch.testing.assert_close(norms, torch.tensor([math.sqrt(24.0), 0.5]))
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 2.0 * 3.0 / (math.sqrt(24.0) + 1e-6)))
    torch.testing.assert_close(model.bias.grad, torch.tensor([0.3, 0.4]))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.last_layer = nn.Linear(4, 2, bias=False)
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


def test_get_params_groups_split():
    model = _Toy()
    reg, not_reg = utils.get_params_groups(model)
    ids = lambda group: {id(p) for p in group["params"]}
    assert ids(reg) == {id(model.cls_token), id(model.fc.weight), id(model.last_layer.weight)}
    assert ids(not_reg) == {id(model.norm.weight), id(model.norm.bias), id(model.fc.bias)}
    assert not_reg["weight_decay"] == 0.0 and "weight_decay" not in reg


def test_cancel_gradients_last_layer():
    model = _Toy()
    for p in (model.fc.weight, model.last_layer.weight):
        p.grad = torch.ones_like(p)
    utils.cancel_gradients_last_layer(epoch=1, model=model, freeze_last_layer=1)
    assert model.last_layer.weight.grad is not None
    utils.cancel_gradients_last_layer(epoch=0, model=model, freeze_last_layer=1)
    assert model.last_layer.weight.grad is None and model.fc.weight.grad is not None


def test_smoothed_value_and_metric_logger(capsys):
    meter = utils.SmoothedValue(window_size=2)
    for v in (1.0, torch.tensor(2.0), torch.tensor(4.0)):
        meter.update(v)
    assert meter.count == 1 and meter.total == 1.0  # tensors are read back lazily
    assert meter.global_avg == pytest.approx(7 / 3) and meter.median == pytest.approx(3.0)
    logger = utils.MetricLogger()
    for _ in logger.log_every(range(3), 2, header="Epoch: [0/1]"):
        logger.update(loss=torch.tensor(0.5), lr=0.1)
    out = capsys.readouterr().out
    assert "Epoch: [0/1]  [0/3]" in out and "[2/3]" in out and "[1/3]" not in out
    assert "eta: " in out and "loss: 0.500000" in out and "time: " in out and "data: " in out


# One rank of test_metric_logger_sync_reduces_the_union_of_the_ranks_meters: a 2-process gloo group (file://
# rendezvous, 20 s collective timeout), two syncs, each rank's meters after each printed as a JSON line.
SYNC_RANK = """
import datetime, json, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from utils import utils
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=20))
def report(logger):
    str(logger)  # the log line of meters with no value anywhere
    print(json.dumps({{n: [m.count, m.total, m.global_avg] for n, m in logger.meters.items()}}), flush=True)
# a resumed epoch with no iteration left, after a change of world size: rank 0 has the saved means, rank 1 nothing
logger = utils.MetricLogger()
if rank == 0:
    logger.add_totals({{"loss": [6, 3.0], "acc": [6, 60.0]}})
logger.synchronize_between_processes()
report(logger)
# other names and insertion orders on each rank, and a meter that no rank updated
logger = utils.MetricLogger()
logger.add_meter("idle", utils.SmoothedValue(window_size=1, fmt="{{value:.6f}}"))
if rank == 0:
    logger.update(loss=torch.tensor(2.0), acc=50.0)
else:
    logger.update(lr=0.5)
    logger.update(loss=1.0)
logger.synchronize_between_processes()
report(logger)
dist.destroy_process_group()
"""


def test_metric_logger_sync_reduces_the_union_of_the_ranks_meters(tmp_path):
    """synchronize_between_processes sums each meter over the ranks by name, whatever meters each rank holds and in
    whatever order it made them: every rank ends with the union, summed (a meter no rank updated: count 0, mean 0,
    not a division by zero). Per-meter all-reduces in each rank's own order hung when a rank had fewer meters."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "sync_rank.py"
    script.write_text(SYNC_RANK.format(root=str(Path(__file__).resolve().parents[1])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "rendezvous")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        outs.append([json.loads(line) for line in out.splitlines()])
    first = {"acc": [6, 60.0, 10.0], "loss": [6, 3.0, 0.5]}
    second = {"acc": [1, 50.0, 50.0], "idle": [0, 0.0, 0.0], "loss": [2, 3.0, 1.5], "lr": [1, 0.5, 0.5]}
    for rank_out in outs:
        assert rank_out == [first, second]


@pytest.mark.parametrize("loader_s, step_s, warned", [(3.0, 1.0, True), (0.1, 0.9, False)])
def test_data_wait_is_the_loop_time_spent_waiting_for_batches(monkeypatch, capsys, loader_s, step_s, warned):
    # A fake clock: the loader takes `loader_s` per batch (the first, with the workers' start, 10 s more and
    # left out), the step `step_s`.
    clock = [0.0]
    monkeypatch.setattr(utils.time, "time", lambda: clock[0])

    def batches(n):
        for i in range(n):
            clock[0] += loader_s + (10.0 if i == 0 else 0.0)
            yield i

    logger = utils.MetricLogger()
    for _ in logger.log_every(batches(5), 10, header="Epoch: [0/1]", total=5):
        clock[0] += step_s
    assert (logger.waited_s, logger.looped_s) == pytest.approx((4 * loader_s, 4 * (loader_s + step_s)))
    frac = utils.data_wait(logger, "Epoch 0", num_workers=3)
    assert frac == round(loader_s / (loader_s + step_s), 3)
    out = capsys.readouterr().out
    assert ("Epoch 0: the training step waited for data 75% of the time" in out) == warned
    assert ("3 loader workers and may use" in out) == warned
    # GPU decoding is not advised: on an H200 it fed 3.4 samples/s, less than a few CPU workers
    assert ("or resize the videos to short side 256" in out) == warned and "DECODE_DEVICE" not in out
    # JPEG frames (SSv2) are not videos to resize
    utils.data_wait(logger, "Epoch 0", num_workers=3, frames=True)
    out = capsys.readouterr().out
    assert "resize" not in out and ("copy the JPEG frames to a local disk" in out) == warned


def test_choose_precision_explicit_dtypes_and_autocast():
    cpu = torch.device("cpu")
    assert utils.choose_precision(False, "bf16", cpu)[0] is None
    assert utils.choose_precision(True, "bf16", cpu)[0] is torch.bfloat16
    with pytest.raises(ValueError, match="--amp_dtype fp16 needs a CUDA device"):
        utils.choose_precision(True, "fp16", cpu)
    with pytest.raises(ValueError, match="use auto, bf16 or fp16"):
        utils.choose_precision(True, "fp8", cpu)
    with utils.autocast_context(torch.bfloat16, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with utils.autocast_context(None, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def simulate_cpu(monkeypatch, machine="x86_64", onednn=True, avx512_bf16=False, amx=False, isa_cap=None):
    """Make this process see another CPU: its architecture, oneDNN's bf16 check (true for any AVX-512 core CPU),
    the AVX-512 BF16 / AMX flags, and an ONEDNN_MAX_CPU_ISA cap (None: unset)."""
    monkeypatch.setattr(utils.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if isa_cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)


NATIVE_REASON = "auto: this CPU has native bf16 (AVX-512 BF16, AMX or ARM bf16)"
EMULATED_REASON = "auto: no native bf16 on this CPU (bf16 would be emulated, many times slower than fp32)"


@pytest.mark.parametrize("cpu, native", [
    # Skylake / Cascade Lake / Ice Lake Xeons: AVX-512 core, so oneDNN's check says yes, but bf16 is emulated
    # there (measured with ONEDNN_MAX_CPU_ISA=AVX512_CORE: a train step 3x slower than fp32)
    (dict(onednn=True), False),
    (dict(onednn=True, avx512_bf16=True), True),  # Cooper Lake, Zen 4
    (dict(onednn=True, amx=True), True),  # Sapphire Rapids and later
    (dict(onednn=True, avx512_bf16=True, amx=True), True),
    (dict(onednn=False), False),  # AVX2 only
    # oneDNN capped below its bf16 ISA emulates bf16 on any CPU
    (dict(onednn=True, avx512_bf16=True, amx=True, isa_cap="avx512_core"), False),
    (dict(onednn=True, avx512_bf16=True, amx=True, isa_cap="AVX512_CORE_VNNI"), False),
    (dict(onednn=False, avx512_bf16=True, amx=True, isa_cap="AVX2"), False),
    (dict(onednn=True, avx512_bf16=True, amx=True, isa_cap="AVX512_CORE_AMX"), True),
    (dict(onednn=True, avx512_bf16=True, isa_cap="AVX512_CORE_BF16"), True),
    (dict(machine="AMD64", onednn=True), False),  # Windows' name for x86-64
    (dict(machine="AMD64", onednn=True, amx=True), True),
    # ARM: oneDNN's check is the one that knows (the x86 flags say no there)
    (dict(machine="aarch64", onednn=True), True),
    (dict(machine="arm64", onednn=False), False),
])
def test_auto_precision_on_cpu_follows_native_bf16(monkeypatch, cpu, native):
    simulate_cpu(monkeypatch, **cpu)
    assert utils.cpu_has_native_bf16() is native
    dtype, why = utils.choose_precision(True, "auto", torch.device("cpu"))
    assert dtype is (torch.bfloat16 if native else None)
    assert why == (NATIVE_REASON if native else EMULATED_REASON)
    assert utils.choose_precision(False, "auto", torch.device("cpu")) == (None, "--use_fp16 false")


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, capsys, native):
    # An AVX-512 core CPU (oneDNN says yes) with or without the BF16 extension: bf16 runs either way, as asked,
    # but where it is emulated the run says so and how to get fp32.
    simulate_cpu(monkeypatch, onednn=True, avx512_bf16=native)
    assert utils.choose_precision(True, "bf16", torch.device("cpu")) == (torch.bfloat16, "--amp_dtype bf16")
    out = capsys.readouterr().out
    if native:
        assert out == ""
    else:
        assert out.count("\n") == 1
        assert out.startswith("WARNING: --amp_dtype bf16: this CPU has no native bf16")
        assert "emulated, several times slower than fp32; use --amp_dtype auto or --use_fp16 false" in out
    assert utils.choose_precision(False, "bf16", torch.device("cpu"))[0] is None
    assert capsys.readouterr().out == ""  # --use_fp16 false: fp32, nothing to warn about


def test_cpu_flags_missing_from_an_older_torch_leave_onednn_to_decide(monkeypatch):
    simulate_cpu(monkeypatch, onednn=True)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert utils.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert utils.cpu_has_native_bf16() is False


@pytest.mark.parametrize("bf16_ok", [True, False])
def test_auto_precision_on_cuda(monkeypatch, bf16_ok):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # the CPU plays no part
    dtype, why = utils.choose_precision(True, "auto", torch.device("cuda", 0))
    assert dtype is (torch.bfloat16 if bf16_ok else torch.float16)
    assert ("supports bf16" in why) is bf16_ok and ("loss scaling" in why) is not bf16_ok


@pytest.mark.parametrize("major, expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_auto_precision_uses_fp16_on_gpus_that_only_emulate_bf16(monkeypatch, major, expected):
    # torch.cuda.is_bf16_supported() itself (not replaced): on a V100 (7.0) / T4 (7.5) a bf16 tensor can be made,
    # which torch's default including_emulation=True counts as support; bf16 is emulated there (no bf16 tensor
    # cores), so auto must pick the original's fp16 + loss scaling. A100 (8.x) and H100 (9.x) have native bf16.
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: argparse.Namespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    dtype, why = utils.choose_precision(True, "auto", torch.device("cuda", 0))
    assert dtype is expected
    assert ("loss scaling" in why) is (expected is torch.float16)


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_on_a_gpu_without_native_bf16_is_an_error(monkeypatch, native):
    # On a V100 / T4 bf16 is emulated (slower than fp32) and cuDNN has no bf16 convolution, which autocast would
    # give the patch embedding: say so before any work instead of failing deep in cuDNN.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    cuda = torch.device("cuda", 0)
    if native:
        assert utils.choose_precision(True, "bf16", cuda) == (torch.bfloat16, "--amp_dtype bf16")
    else:
        with pytest.raises(ValueError, match="no native bf16 .*--amp_dtype auto \\(fp16 with loss scaling here\\)"):
            utils.choose_precision(True, "bf16", cuda)
    assert utils.choose_precision(False, "bf16", cuda)[0] is None


def test_cpu_has_native_bf16_without_onednn(monkeypatch):
    def missing():
        raise RuntimeError("mkldnn not built")
    simulate_cpu(monkeypatch, avx512_bf16=True, amx=True)  # the CPU has bf16, but torch cannot use it
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert utils.cpu_has_native_bf16() is False


def reference_lars(params: list[list[float]], matrix: list[bool], grads: list[list[list[float]]], lr: float,
                   weight_decay: float, momentum: float, eta: float) -> list[list[float]]:
    """DINO's LARS on flat lists of floats, one step per entry of `grads`: a >1-D (`matrix`) parameter's update
    is (g + wd p) times eta |p| / |g + wd p| (1 when either norm is 0); a 1-D one's is g alone. The update goes
    into a momentum buffer that starts at zero (mu = momentum mu + update), and p -= lr mu."""
    params = [list(p) for p in params]
    buffers = [[0.0] * len(p) for p in params]
    for step in grads:
        for p, mu, g, is_matrix in zip(params, buffers, step, matrix):
            update = list(g)
            if is_matrix:
                update = [gi + weight_decay * pi for gi, pi in zip(g, p)]
                p_norm = math.sqrt(sum(x * x for x in p))
                u_norm = math.sqrt(sum(x * x for x in update))
                trust = eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
                update = [trust * x for x in update]
            for i, u in enumerate(update):
                mu[i] = momentum * mu[i] + u
                p[i] -= lr * mu[i]
    return params


def test_lars_steps_match_dinos_definition():
    # A weight matrix, a zero matrix (trust ratio 1 at its first step) and a bias (1-D: no decay, no trust
    # ratio) in one group with weight decay, over three steps: decay, trust ratio and momentum all show.
    start = [[3.0, 4.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]
    shapes = [(2, 2), (2, 2), (3,)]
    grads = [[[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -1.0, 2.0], [0.3, -0.2, 1.0]],
             [[-1.5, 0.5, 0.5, 1.0], [0.5, 0.5, 0.0, -1.0], [-0.4, 0.1, 0.2]],
             [[0.2, 0.2, -0.3, 0.7], [0.0, 1.0, 1.0, 0.0], [0.6, 0.6, -0.6]]]
    hyper = dict(lr=0.5, weight_decay=0.3, momentum=0.9, eta=0.02)
    params = [nn.Parameter(torch.tensor(v, dtype=torch.float64).reshape(s)) for v, s in zip(start, shapes)]
    opt = utils.LARS(params, **hyper)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = torch.tensor(g, dtype=torch.float64).reshape(p.shape)
        opt.step()
    expected = reference_lars(start, [len(s) > 1 for s in shapes], grads, **hyper)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("key", ["mu", "momentum_buffer"])
def test_lars_resumes_the_momentum_of_a_dino_or_an_older_checkpoint(key):
    # DINO's LARS keeps its momentum as state["mu"], our LARS before 20be214 as state["momentum_buffer"]: loaded
    # from either checkpoint, the next step continues it (an older one's started a zero "mu" and kept the stale key).
    matrix = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = utils.LARS([matrix, bias])
    saved = {"state": {0: {key: torch.tensor([[1.0, 1.0]], dtype=torch.float64)},
                       1: {key: torch.tensor([2.0, -4.0], dtype=torch.float64)}},
             "param_groups": [{"lr": 0.1, "weight_decay": 0.5, "momentum": 0.9, "eta": 0.02, "params": [0, 1],
                               "weight_decay_filter": None, "lars_adaptation_filter": None}]}
    opt.load_state_dict(saved)
    matrix.grad = torch.tensor([[0.5, -2.0]], dtype=torch.float64)
    bias.grad = torch.tensor([0.5, 0.25], dtype=torch.float64)
    opt.step()
    # matrix: update g + 0.5 p = (2, 0), trust 0.02 * |p| 5 / |update| 2 = 0.05 -> (0.1, 0);
    # mu = 0.9 (1, 1) + (0.1, 0) = (1, 0.9); p = (3, 4) - 0.1 mu
    torch.testing.assert_close(opt.state[matrix]["mu"], torch.tensor([[1.0, 0.9]], dtype=torch.float64))
    torch.testing.assert_close(matrix.detach(), torch.tensor([[2.9, 3.91]], dtype=torch.float64))
    # bias (1-D: no decay, no trust ratio): mu = 0.9 (2, -4) + (0.5, 0.25) = (2.3, -3.35); p = (1, -2) - 0.1 mu
    torch.testing.assert_close(opt.state[bias]["mu"], torch.tensor([2.3, -3.35], dtype=torch.float64))
    torch.testing.assert_close(bias.detach(), torch.tensor([0.77, -1.665], dtype=torch.float64))
    assert all(state.keys() == {"mu"} for state in opt.state.values())
    assert opt.state_dict()["state"].keys() == {0, 1}


def test_first_slurm_host():
    assert utils.first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert utils.first_slurm_host("node17") == "node17"
    assert utils.first_slurm_host("a1,b2") == "a1"


@pytest.fixture
def launcher_env(monkeypatch):
    """No launcher variable set; each one restored after the test, also one that init_distributed_mode sets
    (MASTER_ADDR, MASTER_PORT; monkeypatch.delenv alone restores only the variables that were set before)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "SLURM_NODELIST", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


@pytest.fixture
def fake_dist(monkeypatch, launcher_env):
    """Record init_process_group calls instead of creating a group."""
    calls = []
    monkeypatch.setattr(utils.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(utils.dist, "barrier", lambda: None)
    monkeypatch.setattr(utils, "setup_for_distributed", lambda is_master: None)
    return calls


def test_init_distributed_torchrun_env(fake_dist, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (3, 8, 1)
    (a, kw), = fake_dist
    # without --dist_timeout (a script that lacks it): the 30-minute default
    assert kw == {"init_method": "env://", "world_size": 8, "rank": 3, "timeout": datetime.timedelta(minutes=30)}


def _setenv(monkeypatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_init_distributed_slurm_env(fake_dist, monkeypatch):
    _setenv(monkeypatch, SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NODELIST="gpu[12-13]",
            SLURM_JOB_ID="123456")
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (5, 8, 1)
    import os
    # the port scripts/slurm_*.sh derive from the job id (15000 + 123456 % 15000), not a fixed 29500 that two
    # jobs sharing a node would both bind
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == "18456"
    (a, kw), = fake_dist
    assert kw["world_size"] == 8 and kw["rank"] == 5
    _setenv(monkeypatch, MASTER_ADDR="head", MASTER_PORT="29400")  # an explicit address and port win
    utils.init_distributed_mode(args)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("head", "29400")


def test_slurm_default_port_is_the_slurm_scripts_one(launcher_env, monkeypatch):
    import subprocess
    from pathlib import Path
    line = next(l for l in (Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sh").read_text()
                .splitlines() if l.startswith("export MASTER_PORT="))
    for job in ("0", "77", "14999", "15000", "987654"):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        script = subprocess.run(["bash", "-c", f"{line.split('#')[0]}\necho $MASTER_PORT"], capture_output=True,
                                text=True, timeout=30, env={"SLURM_JOB_ID": job, "PATH": "/usr/bin:/bin"})
        assert str(utils.slurm_default_port()) == script.stdout.strip(), job


def test_a_one_task_slurm_job_needs_no_rendezvous_port(fake_dist, monkeypatch):
    """SLURM_NTASKS=1 (a one-GPU job): the in-memory store of a one-process run, not a TCP rendezvous at a
    MASTER_PORT that another one-GPU job packed on the node may hold."""
    import os
    _setenv(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_ID="77")
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (0, 1, 0)
    (a, kw), = fake_dist
    assert isinstance(kw["store"], utils.dist.HashStore) and kw["world_size"] == 1
    assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ


@pytest.mark.parametrize("procid, problem, cause", [
    ("0", "only 1 process joined the rendezvous at {where}", utils.dist.DistStoreError),
    ("1", "process 0 did not answer at {where} \\(this process is SLURM_PROCID 1\\)", utils.dist.DistNetworkError)])
def test_slurm_ntasks_without_srun_names_the_fix(launcher_env, monkeypatch, procid, problem, cause):
    """SLURM_NTASKS=2 in a batch script run without srun (one process, SLURM_PROCID 0, or 1 where the script sets
    it): the rendezvous times out after --dist_timeout with an error that says why and what to do, not a bare
    DistStoreError '1/2 clients joined' (process 0: its store waits for the others) or DistNetworkError 'The client
    socket has timed out' (another process: nothing serves the rendezvous)."""
    from tests.conftest import free_port
    port = free_port()
    _setenv(monkeypatch, SLURM_PROCID=procid, SLURM_NTASKS="2", SLURM_LOCALID="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port))
    args = argparse.Namespace(dist_url="env://", dist_timeout=0.05)
    problem = problem.format(where=rf"127\.0\.0\.1:{port}")
    with pytest.raises(RuntimeError, match=rf"^SLURM_NTASKS=2 but {problem} within --dist_timeout 0\.05 min: start "
                                           r"the job with srun \(one task per GPU\), or unset SLURM_NTASKS for a "
                                           r"single process\.$") as err:
        utils.init_distributed_mode(args)
    assert isinstance(err.value.__cause__, cause)
    assert not utils.dist.is_initialized()


def test_a_taken_rendezvous_port_is_not_called_a_missing_srun(launcher_env, monkeypatch):
    """Process 0 of a SLURM job whose MASTER_PORT another program holds: torch's error (EADDRINUSE) as it is, not
    the advice about srun, which is for a rendezvous that timed out. (torch 2.14 raises a DistNetworkError, torch 2.5 a
    plain RuntimeError, its base class.)"""
    import socket
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        _setenv(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(holder.getsockname()[1]))
        with pytest.raises(RuntimeError, match="EADDRINUSE") as raised:
            utils.init_distributed_mode(argparse.Namespace(dist_url="env://", dist_timeout=0.05))
    assert "srun" not in str(raised.value) and not utils.dist.is_initialized()


@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "single"])
def test_init_distributed_binds_the_nccl_group_to_the_local_gpu(fake_dist, monkeypatch, launcher):
    # On CUDA the group is bound to this process's GPU (device_id): NCCL's first barrier, which comes before
    # any collective, otherwise runs on GPU global_rank % device_count (here GPU 1 for rank 5 of a node with
    # 4 GPUs, while this process works on GPU 2) and warns that it may hang. The device is current before the
    # group is made.
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setattr(utils.dist, "init_process_group",
                        lambda *a, **kw: fake_dist.append((a, kw, list(current))))
    env = {"torchrun": {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "2"},
           "slurm": {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "6"}, "single": {}}[launcher]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    utils.init_distributed_mode(argparse.Namespace(dist_url="env://"))
    gpu = torch.device("cuda", 0 if launcher == "single" else 2)  # SLURM_LOCALID 6 % 4 GPUs
    (a, kw, current_at_init), = fake_dist
    assert a == ("nccl",) and kw["device_id"] == gpu and current_at_init == [gpu]


def test_init_distributed_single_process(fake_dist):
    args = argparse.Namespace(dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (0, 1, 0)
    (a, kw), = fake_dist
    assert a == ("nccl" if torch.cuda.is_available() else "gloo",) and kw["world_size"] == 1
    assert isinstance(kw["store"], utils.dist.HashStore)


@pytest.mark.parametrize("argv", [["--local_rank", "1"], ["--local-rank=1"]])
def test_legacy_local_rank_without_a_launcher_is_one_process_on_device_0(fake_dist, monkeypatch, argv):
    # --local_rank as torch.distributed.launch passes it, but no launcher environment (LOCAL_RANK, RANK and
    # SLURM_* unset): one process, rank 0, on GPU 0 of a 4-GPU node (the flag is ignored, not GPU 1).
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    parser = argparse.ArgumentParser()
    utils.add_distributed_args(parser)
    args = parser.parse_args(argv)
    assert args.local_rank == 1
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu) == (0, 1, 0)
    (a, kw), = fake_dist
    assert (kw["world_size"], kw["rank"], kw["device_id"]) == (1, 0, torch.device("cuda", 0))
    assert current == [torch.device("cuda", 0)]


def test_collect_env_reports_versions_precision_and_the_decoder_auto_picks(monkeypatch):
    import importlib.metadata
    import importlib.util
    import torch
    from datasets import decoder
    from utils import collect_env
    env = collect_env.collect_env()
    assert env["torch"] == torch.__version__ and env["torchvision"] == importlib.metadata.version("torchvision")
    assert env["cuda_available"] == torch.cuda.is_available()
    assert env["decoding_backend_auto"].split(";")[0] == decoder.resolve_backend("auto")
    assert env["amp_dtype_auto"].startswith(("torch.bfloat16 (auto", "None (auto", "torch.float16 (auto"))
    # torchcodec without an FFmpeg: the report says why and how to lend it PyAV's
    monkeypatch.setattr(decoder, "torchcodec_status", lambda: "RuntimeError: Could not load libtorchcodec")
    env = collect_env.collect_env()
    assert "torchcodec unavailable: RuntimeError: Could not load libtorchcodec" in env["decoding_backend_auto"]
    if importlib.util.find_spec("torchcodec") and collect_env.pyav_ffmpeg.pyav_libs_dir() is not None:
        assert "datasets/pyav_ffmpeg.py --always" in env["torchcodec_hint"]
    else:  # no torchcodec to lend an FFmpeg to (torch < 2.10 gets none), or no FFmpeg in PyAV's wheel to lend
        assert "torchcodec_hint" not in env


def test_comm_device_is_the_gpu_under_nccl_else_the_cpu(monkeypatch):
    assert utils.comm_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(utils, "is_dist_avail_and_initialized", lambda: True)
    monkeypatch.setattr(utils.dist, "get_backend", lambda *a: "gloo")
    assert utils.comm_device() == torch.device("cpu")
    monkeypatch.setattr(utils.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert utils.comm_device() == torch.device("cuda", 3)


def test_save_steps_are_the_multiples_of_saveckp_iters_the_steps_reach_before_the_last():
    """--saveckp_iters 3 over 10 iterations: after 3, 6 and 9 (not the last: the epoch-end save follows); off at 0.
    With steps of 4 batches (eval_finetune's --accum_iter 4, 12 batches) the step that reaches or passes a multiple
    of 3 saves: after 4 (3), 8 (6), not 12 (the last)."""
    from utils import preemption
    assert [d for d in range(1, 11) if preemption.is_save_step(d, 10, 3)] == [3, 6, 9]
    assert not any(preemption.is_save_step(d, 10, 0) for d in range(1, 11))
    assert [d for d in range(4, 13, 4) if preemption.is_save_step(d, 12, 3, group=4)] == [4, 8]


def test_stop_check_without_flags_reduces_on_the_comm_device(monkeypatch):
    """eval_finetune asks `requested()` with no device flag; under NCCL (which reduces no CPU tensor) its
    all-reduce must still get a tensor on the collective's device."""
    from utils import preemption

    class Reduced(Exception):
        pass

    seen = []

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        raise Reduced

    monkeypatch.setattr(utils, "comm_device", lambda: torch.device("meta"), raising=False)
    monkeypatch.setattr(utils, "get_world_size", lambda: 2)
    monkeypatch.setattr(preemption.dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        preemption.StopSignals().requested()
    assert seen == [torch.device("meta")]


class _SlowRange(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> int:
        import time
        time.sleep(0.01)
        return i


# The parent's terminate() of a worker, in a fresh interpreter (no native thread in the worker from before
# worker_init_fn; see below): exit status 0, as torch's own handler gives.
PARENT_TERMINATES = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_utils import _SlowRange
from utils import utils
batches = iter(torch.utils.data.DataLoader(_SlowRange(), batch_size=2, num_workers=1, worker_init_fn=utils.seed_worker))
next(batches)
worker = batches._workers[0]
worker.terminate()
worker.join(timeout=20)
print("exitcode", worker.exitcode)
"""


def test_loader_workers_outlive_the_stop_signals_slurm_sends_to_every_process():
    """slurmstepd signals every process of a job step (SIGTERM at the time limit or a preemption, the USR1 that srun
    passes on), so the loader workers get the stop signal too, from a process that is not their parent. A worker
    that died of it would make the DataLoader raise in the training process before its clean stop; the workers
    keep serving instead, and their parent's terminate() (a stuck worker at shutdown) still ends them."""
    import signal
    import subprocess
    import sys
    from pathlib import Path
    # After a change of torch's thread count in the parent, a forked worker has a native thread from before
    # worker_init_fn, which blocks no signal (the full suite's order made it so, and the shield failed then).
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    torch.set_num_threads(threads)
    loader = torch.utils.data.DataLoader(_SlowRange(), batch_size=2, num_workers=2, worker_init_fn=utils.seed_worker)
    batches = iter(loader)
    got = [next(batches), next(batches)]  # one from each worker: both have run worker_init_fn
    workers = [str(w.pid) for w in batches._workers]
    for sig in ("TERM", "USR1"):
        subprocess.run(["kill", f"-{sig}", *workers], check=True)
    got += list(batches)
    assert torch.cat(got).tolist() == list(range(24))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the training process's own handling is untouched

    root = str(Path(__file__).resolve().parents[1])
    run = subprocess.run([sys.executable, "-c", PARENT_TERMINATES, root], capture_output=True, text=True, timeout=120)
    assert "exitcode 0" in run.stdout, run.stdout + run.stderr


def test_host_reads_counts_scalar_reads_and_tolist_off_the_cpu(device):
    # tests/conftest.HostReads backs the "no host read per step" tests; on CUDA (SVT_TEST_DEVICE=cuda) a tolist()
    # of a device tensor is a host sync too, which the dispatcher never sees.
    from tests.conftest import HostReads
    real, x = torch.Tensor.tolist, torch.ones(2, device=device)
    with HostReads() as reads:
        assert torch.ones(2).tolist() == [1.0, 1.0]  # a CPU tensor's memory: no sync
        float(x[0])
    assert reads.count == 1
    with HostReads() as reads:
        assert x.tolist() == [1.0, 1.0]
    assert reads.count == int(device.type != "cpu") and torch.Tensor.tolist is real


@pytest.mark.parametrize("script", ["train_ssl", "eval_linear", "eval_finetune"])
def test_saveckp_iters_is_zero_for_off_or_positive(script, capsys):
    # A negative count was silently off in one script and a save every |N| iterations in another.
    import importlib
    parser = importlib.import_module(script).get_args_parser()
    assert parser.parse_args(["--saveckp_iters", "0"]).saveckp_iters == 0
    assert parser.parse_args(["--saveckp_iters", "50"]).saveckp_iters == 50
    with pytest.raises(SystemExit):
        parser.parse_args(["--saveckp_iters", "-5"])
    assert "argument --saveckp_iters: -5 is negative: give 0 (off) or a positive number" in capsys.readouterr().err
