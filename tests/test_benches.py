"""The CPU benchmark scripts run and write the figures they promise (a few steps, no timing claims)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # each bench runs as a script in its own process
BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_speed_reports_both_contestants_and_the_peak_it_divides_by(tmp_path):
    figures = run_bench("train_speed.py", "--steps", "1", "--warmup", "0", tmp_path=tmp_path)
    assert figures["n_params"] == 4_868_352  # the peer config of the issue: vocab 8192, d 256, 4 layers
    assert figures["matmul_peak_gflops"] == max(figures["matmul_peaks_gflops"].values()) > 0
    for name in ("lmforge", "transformers"):
        assert figures[name]["tokens_per_s"] > 0 and 0 < figures[name]["mfu"] < 1
    assert figures["speedup"] == pytest.approx(
        figures["lmforge"]["tokens_per_s"] / figures["transformers"]["tokens_per_s"])


def test_scaling_reports_tokens_per_second_and_memory_per_size(tmp_path):
    (row,) = run_bench("scaling.py", "--sizes", "1M", "--steps", "1", tmp_path=tmp_path)
    assert row["size"] == "1M" and row["n_params"] == 1_049_728  # the embedded default's model
    assert row["batch"] * row["seq"] == 16 * 128
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    assert row["peak_rss_mb"] > row["base_rss_mb"] > 0
