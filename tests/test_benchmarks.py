"""The GPU benchmark's CPU mode runs end to end and writes what it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_bench_gpu_cpu_mode_writes_json_and_table(tmp_path):
    # The CPU mode at its smallest: a few 64 px images, one repeat, K = 1 and 2 runs at once.
    subprocess.run([sys.executable, str(SCRIPT), "--mode", "cpu", "--size", "64", "--train-images", "8",
                    "--test-images", "4", "--repeats", "1", "--worker-epochs", "1", "--runs-per-gpu", "1", "2",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "bench_gpu_cpu.json").read_text())
    rows = {(r["precision"], r["compile"]): r for r in result["settings_rows"]}
    assert set(rows) == {("fp32", False), ("bf16", False)}
    for row in rows.values():
        assert row["epoch_s"] > 0 and row["test_images_per_s"] > 0
        # the projection counts 100 epochs, the one-off extraction and 25 evaluations
        assert row["projected_class_s"] > 99 * row["epoch_s"] + 25 * 4 / row["test_images_per_s"]
    ways = result["ways_fp32_epoch_s"]
    assert set(ways) == {"cached", "anomalib_no_grad_backbone", "reference_autograd_backbone"}
    assert [p["runs"] for p in result["packing"]] == [1, 2]
    assert len(result["packing"][1]["per_run_images_per_s"]) == 2
    table = (tmp_path / "bench_gpu_cpu.md").read_text()
    assert "| bf16 | no |" in table and "reference_autograd_backbone" in table
