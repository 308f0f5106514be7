"""The launch scripts: they stop before launching on a missing train list and check (not install) the
dependencies."""
import os
import subprocess
import sys
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


@pytest.mark.parametrize("mode", ["--check", "test"])
def test_install_deps_refuses_a_torch_older_than_requirements_and_never_replaces_it(tmp_path, mode):
    # a torch 2.4.1 found first on the path (its metadata is all the check reads)
    dist = tmp_path / "torch-2.4.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.4.1\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "install_deps.sh"), mode], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 3
    assert "torch 2.4.1 is older than 2.5, the oldest svt runs on (requirements.txt)" in run.stderr
    assert "never replaces a torch you have" in run.stderr


@pytest.mark.parametrize("script", ["train.sh", "slurm_train.sh", "eval_knn.sh", "eval_linear.sh"])
def test_launch_script_without_the_packages_stops_naming_install_deps(tmp_path, script):
    python = tmp_path / "python"  # an interpreter without site-packages: no torch, timm, ...
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "GPUS": "1", "PROJECT_PATH": str(ROOT),
           "CHECKPOINT": str(tmp_path / "c.pth"), "DATA_PATH": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 3
    assert "missing Python packages: torch" in run.stderr and "bash scripts/install_deps.sh" in run.stderr
