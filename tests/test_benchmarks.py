"""The benchmark scripts the README's numbers come from still run (tiny settings; no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_open_times_both_ways_of_opening(tmp_path):
    out = tmp_path / "open.json"
    run = subprocess.run([sys.executable, "benchmarks/bench_open.py", "--videos", "1", "--seconds", "1", "--height",
                          "64", "--width", "80", "--rounds", "1", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    times = json.loads(out.read_text())["ms_per_video_median"]
    assert {"1s_exact_scan_open", "1s_frame_table", "1s_exact_scan", "1s_probe"} <= set(times)
    assert all(ms > 0 for ms in times.values())
