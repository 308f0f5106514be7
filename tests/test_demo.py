"""scripts/demo.sh end to end in its reduced mode (REDUCED=1: 3 classes x 6 videos, 2 SSL epochs, 2 probe
epochs; the same commands as the full demo): the files it writes and the table it prints."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

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
    assert "Mixed precision: torch.bfloat16" in log and "Epoch: [1/2]" in log

    # Both baselines were evaluated: the SSL teacher loaded, the random one said so.
    assert "WARNING: --pretrained_weights is empty" in log
    for model in ("ssl", "random"):
        assert (out / f"knn_{model}" / "knn_results.json").is_file()
        assert (out / f"linear_{model}" / "linear_results.json").is_file()

    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 1 and results["wall_seconds"] > 0
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
    assert "kNN top-1 (k=5)" in log and "linear top-1" in log
