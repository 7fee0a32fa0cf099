"""benchmark.py's loss section, end to end through the CLI at a tiny size."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # benchmark.py loss, in a process of its own

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_section_writes_json(tmp_path):
    out = tmp_path / "loss.json"
    cmd = [sys.executable, "benchmark.py", "loss", "--sizes", "64", "--dim", "32", "--device", "cpu",
           "--impls", "reference", "tiled", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "NT-Xent forward+backward" in proc.stdout  # the rich table

    report = json.loads(out.read_text())
    assert report["section"] == "loss"
    hw = report["hardware"]
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and hw["versions"]["torch"]
    assert "triton" in hw["versions"] and "gpus" in hw
    assert report["settings"]["sizes"] == [64]

    [matmul] = [r for r in report["results"] if r["impl"] == "matmul"]
    assert (matmul["status"], matmul["dtype"], matmul["size"]) == ("ok", "float32", 4096) and matmul["gflops"] > 0
    assert matmul["gflops"] == 2 * 4096 ** 3 / matmul["min_s"] / 1e9
    rows = {r["impl"]: r for r in report["results"] if r["impl"] != "matmul"}
    assert set(rows) == {"reference", "tiled"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert (r["n"], r["embeddings"], r["dim"], r["dtype"], r["device"]) == (64, 128, 32, "float32", "cpu")
        assert r["repeats"] == 2
        for key in ("median_s", "min_s", "peak_extra_mb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["min_s"] <= r["median_s"]
        flop = 4 * 128 ** 2 * 32  # the similarity tiles twice (half each, by symmetry) and the gradient product
        assert r["gflops"] == flop / r["median_s"] / 1e9 and r["fraction_of_matmul"] == r["gflops"] / matmul["gflops"]
        assert r["fraction_of_matmul_best"] >= r["fraction_of_matmul"]
    assert rows["reference"]["speedup_vs_reference"] == 1.0
