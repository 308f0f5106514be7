"""The benchmark scripts the README's numbers come from still run (tiny settings; no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.frame_code import require_backend

ROOT = Path(__file__).resolve().parents[1]


def _run_bench(script: str, out: Path, *args: str) -> dict:
    """Run benchmarks/<script> on 64x80 videos with one round; its JSON report."""
    run = subprocess.run([sys.executable, f"benchmarks/{script}", *args, "--height", "64", "--width", "80",
                          "--rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_open_times_both_ways_of_opening(tmp_path):
    require_backend("torchcodec")  # it times torchcodec's two ways of opening a video
    report = _run_bench("bench_open.py", tmp_path / "open.json", "--videos", "1", "--seconds", "1")
    times = report["ms_per_video_median"]
    assert {"1s_exact_scan_open", "1s_frame_table", "1s_exact_scan", "1s_probe"} <= set(times)
    assert all(ms > 0 for ms in times.values())


def test_bench_augment_times_the_views_alone(tmp_path):
    report = _run_bench("bench_augment.py", tmp_path / "augment.json", "--videos", "1", "--samples", "2")
    assert report["views"] == {"global_frames": [8, 8], "local_frames": [8] * 8} and report["samples"] == 2
    assert report["ms_per_sample"]["this"]["best"] > 0 and report["minor_page_faults_per_sample"]["this"] >= 0


def test_bench_lists_builds_the_dataset_and_reads_each_worker_memory(tmp_path):
    for layout, as_lists in (("k400", []), ("ssv2", ["--as_lists"])):
        out = tmp_path / f"{layout}.json"
        run = subprocess.run([sys.executable, "benchmarks/bench_lists.py", "--layout", layout, "--videos", "50",
                              "--workers", "1", *as_lists, "--out", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        report = json.loads(out.read_text())
        assert (report["layout"], report["videos"], report["workers"], report["samples"]) == (layout, 50, 1, 50)
        assert report["as_lists"] == bool(as_lists)
        assert report["path_types"] == (["list", "list"] if as_lists else ["PathList", "NoneType"])
        assert report["build_s"] > 0 and report["parse_s"] > 0 and report["epoch_s"] > 0
        assert report["build_peak_mb"] >= 0 and report["rss_after_build_mb"] > 0
        assert len(report["worker_private_growth_mb"]) == 1 and report["worker_private_growth_mb"][0] >= 0
    assert 50 * 30 <= report["frames"] <= 50 * 60  # SSv2: 30-60 frames per video
