"""The launch scripts stop before launching on set-up mistakes."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["train.sh", "slurm_train.sh"])
def test_train_script_without_data_path_stops_before_launch(tmp_path, script):
    env = {k: v for k, v in os.environ.items() if k != "DATA_PATH"}
    env.update(GPUS="1", PROJECT_PATH=str(ROOT), EXP_NAME=f"review_{tmp_path.name}")
    run = subprocess.run(["bash", str(ROOT / "scripts" / script), "--data_path", str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert f"{tmp_path / 'nowhere'}/train.csv not found" in run.stderr and "DATA_PATH" in run.stderr
    assert not (ROOT / "checkpoints" / env["EXP_NAME"]).exists()

