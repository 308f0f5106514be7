"""scripts/demo.sh end to end in its reduced mode (REDUCED=1: 3 classes x 6 videos, 2 SSL epochs, 2 probe
epochs; the same commands as the full demo): the files it writes, the pictures and the table it prints; and
the GPU scale's commands, checked against the scripts' own argument parsers."""
import argparse
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from utils import utils

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_reduced_end_to_end(tmp_path):
    out, data = tmp_path / "demo", tmp_path / "data"
    env = {**os.environ, "REDUCED": "1", "DEMO_OUT": str(out), "DATA_PATH": str(data), "SEED": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert "generating the synthetic motion videos" in log

    # The data set was generated (3 flip-distinct motions, 4 train + 2 held-out videos each).
    assert (data / "classes.txt").read_text().split() == ["move_right", "move_up", "move_down"]
    assert len((data / "annotations" / "train.csv").read_text().splitlines()) == 12
    assert len((data / "knn_splits" / "ucf101_val_split_1_videos.txt").read_text().splitlines()) == 6

    # SSL training: checkpoint with both networks, one log line per epoch, tensorboard events.
    ssl = out / "ssl"
    assert (ssl / "checkpoint.pth").is_file()
    epochs = [json.loads(line) for line in (ssl / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1] and all("train_loss" in e for e in epochs)
    assert list((ssl / "tb").glob("events.out.tfevents.*"))
    # auto precision: bf16 only on a CPU with native bf16, fp32 elsewhere, and the run says which
    expected = "bf16 (auto: this CPU has native bf16" if utils.cpu_has_native_bf16() else "off, fp32 (auto: no native"
    assert f"Mixed precision: {expected}" in log and "Epoch: [1/2]" in log
    assert [e["epoch"] for e in epochs if "knn_top1" in e] == [0, 1]  # online kNN every epoch

    # Both baselines were evaluated: the SSL teacher loaded, the random one said so.
    assert "WARNING: --pretrained_weights is empty" in log
    for model in ("ssl", "random"):
        assert (out / f"knn_{model}" / "knn_results.json").is_file()
        assert (out / f"linear_{model}" / "linear_results.json").is_file()

    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 1 and results["wall_seconds"] > 0 and results["cpu"]
    assert results["precision"] == ("bf16" if utils.cpu_has_native_bf16() else "fp32")
    assert all(e["precision"] == results["precision"] for e in epochs)
    assert results["classes"] == ["move_right", "move_up", "move_down"] and results["chance"] == pytest.approx(100 / 3)
    assert (results["linear_lr"], results["linear_epochs"], results["epochs"]) == (0.064, 2, 2)
    assert results["linear_feature_bn"] is True and "feature_bn: True" in log
    curve = results["pretraining"]
    assert curve["epoch"] == [0, 1] and curve["loss"] == [e["train_loss"] for e in epochs]
    assert curve["knn_top1"] == [e["knn_top1"] for e in epochs]
    for model in ("ssl", "random"):
        assert set(results[model]["knn_top1"]) == {"5", "10"}
        for acc in [*results[model]["knn_top1"].values(), results[model]["linear_top1"]]:
            assert 0.0 <= acc <= 100.0
    assert results["knn_gain"] == pytest.approx(results["ssl"]["knn_top1"]["5"] - results["random"]["knn_top1"]["5"])

    # The printed table matches the JSON (one decimal).
    for model, name in (("ssl", "SVT (SSL)"), ("random", "random init")):
        row = re.search(rf"^{re.escape(name)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", log, re.M)
        assert row, log[-2000:]
        r = results[model]
        expected = [r["knn_top1"]["5"], r["knn_top1"]["10"], r["linear_top1"]]
        assert [float(v) for v in row.groups()] == pytest.approx(expected, abs=0.051)
    assert "kNN top-1 (k=5)" in log and "linear top-1" in log and "(chance 33.3 %; 3 classes)" in log

    # report.png: the curves, the bars and the attention maps, drawn at 90 dpi on a 13 x 7.5 inch figure
    report = Image.open(out / "report.png")
    assert report.format == "PNG" and report.size == (1170, 675)
    pixels = report.convert("L").getextrema()
    assert pixels[0] < 64 and pixels[1] > 200  # not a blank canvas


def test_demo_gpu_scale_commands_parse(tmp_path):
    """DEMO_SCALE=gpu DRY_RUN=1 prints the commands; each must parse with its script's own parser and config, with
    the user's arguments passed on to train_ssl.py and their `--opts` to every step (after the demo's, so they win)."""
    import eval_knn
    import eval_linear
    import train_ssl
    from scripts import demo_report
    from utils.parser import load_config

    env = {**os.environ, "DEMO_SCALE": "gpu", "DRY_RUN": "1", "DEMO_OUT": str(tmp_path / "out"),
           "DATA_PATH": str(tmp_path / "data"), "PYTHON": "python3"}
    user = ["--saveckp_freq", "5", "--opts", "MODEL.DROP_PATH_RATE", "0.1", "MODEL.DEPTH", "6", "DATA.NUM_FRAMES", "4"]
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *user], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # nothing was run
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("python3 ")]
    by_script = {}
    for cmd in commands:
        by_script.setdefault(cmd[1], []).append(cmd[2:])
    assert len(by_script["eval_knn.py"]) == len(by_script["eval_linear.py"]) == 2

    gen = by_script["-m"][0]
    assert gen[0] == "datasets.synthetic" and gen[gen.index("--per_class") + 1] == "150"
    parsers = {"train_ssl.py": train_ssl.get_args_parser(), "eval_knn.py": eval_knn.get_args_parser(),
               "eval_linear.py": eval_linear.get_args_parser(), "scripts/demo_report.py": demo_report.get_args_parser()}
    parsed = {name: [argparse.ArgumentParser(parents=[parser]).parse_args(argv) for argv in by_script[name]]
              for name, parser in parsers.items()}
    train = parsed["train_ssl.py"][0]
    assert (train.arch, train.epochs, train.batch_size_per_gpu, train.amp_dtype) == ("vit_small", 60, 64, "auto")
    assert train.saveckp_freq == 5 and train.knn_freq == 1  # extra arguments reach train_ssl.py
    assert train.opts.count("MODEL.DROP_PATH_RATE") == 2  # the demo's 0.0, then the user's 0.1
    cfg = load_config(train)
    assert (cfg.DATA.NUM_FRAMES, cfg.DATA.SAMPLING_RATE, cfg.MODEL.DEPTH) == (4, 8, 6)
    assert cfg.MODEL.DROP_PATH_RATE == 0.1 and cfg.DATA.PATH_PREFIX == str(tmp_path / "data" / "videos")
    for args in parsed["eval_knn.py"] + parsed["eval_linear.py"]:  # the user's model reaches the evaluations
        eval_cfg = load_config(args)
        assert args.arch == "vit_small" and (eval_cfg.MODEL.DEPTH, eval_cfg.DATA.NUM_FRAMES) == (6, 4)
    assert [bool(a.pretrained_weights) for a in parsed["eval_linear.py"]] == [True, False]
    assert load_config(parsed["eval_linear.py"][0]).DATA.RANDOM_FLIP is False
    report = parsed["scripts/demo_report.py"][0]
    assert (report.num_frames, report.sampling_rate) == (4, 8) and json.loads(report.notes)["scale"] == "gpu"


def test_demo_report_skips_a_log_line_that_is_not_a_record(tmp_path, capsys):
    """A log.txt line glued to a partial one (a kill while it was written, by an earlier version) stopped the
    report with a JSONDecodeError, while README says such lines are skipped; now it is skipped with a note."""
    from scripts import demo_report
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "classes.txt").write_text("a\nb\n")
    for name in ("ssl", "random"):
        for kind, result in (("knn", {"results": {"20": {"top1": 60.0 if name == "ssl" else 50.0}}}),
                             ("linear", {"multiview_acc1": 70.0})):
            (tmp_path / f"{kind}_{name}").mkdir()
            (tmp_path / f"{kind}_{name}" / f"{kind}_results.json").write_text(json.dumps(result))
    records = [{"epoch": epoch, "train_loss": 4.0 - epoch, "knn_top1": 50.0 + epoch} for epoch in range(2)]
    lines = [json.dumps(record) for record in records]
    (tmp_path / "ssl").mkdir()
    (tmp_path / "ssl" / "log.txt").write_text(f"{lines[0]}\n{lines[1][:15]}{lines[1]}\n{lines[1]}\n")
    results = demo_report.collect(tmp_path, tmp_path / "data", seed=0, seconds=1, notes={})
    assert results["pretraining"] == {"epoch": [0, 1], "loss": [4.0, 3.0], "knn_top1": [50.0, 51.0]}
    assert results["knn_gain"] == 10.0
    assert f"Note: {tmp_path / 'ssl' / 'log.txt'}:2 is not a JSON record, skipped: " in capsys.readouterr().out
