"""benchmark.py's sections (`all`: pipeline, model, train, loss) at a tiny size: every figure is written; no timing
is asserted."""
import json
import math

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # every section of benchmark.py, in a process of its own


def test_all_sections_write_their_json_keys(tmp_path):
    out = tmp_path / "all.json"
    r = run_cli("benchmark.py", "all", "--image-size", "32", "--batch-size", "8", "--batches", "2",
                "--steps", "2", "--epochs", "2", "--workers", "1", "--repeats", "1", "--sizes", "32",
                "--dim", "16", "--queue", "100", "--backbone", "test_resnet", "--matmul-size", "512", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads(out.read_text())
    rows = {row["section"]: row for row in payload["results"] if row["section"] != "loss"}
    pipeline, model, train = rows["pipeline"], rows["model"], rows["train"]
    for row, keys in ((pipeline, ("dali_images_per_s", "torchvision_images_per_s", "speedup")),
                      (model, ("model_images_per_s",)),
                      (train, ("train_images_per_s", "model_images_per_s", "efficiency"))):
        for key in keys:
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
    assert pipeline["speedup"] == pipeline["dali_images_per_s"] / pipeline["torchvision_images_per_s"]
    by_style = pipeline["torchvision_by_style"]  # each of torchvision's styles measured; the faster is the baseline
    assert set(by_style) == {"tensor", "pil"} and all(v > 0 for v in by_style.values())
    assert pipeline["torchvision_images_per_s"] == by_style[pipeline["torchvision_style"]] == max(by_style.values())
    assert train["efficiency"] == train["train_images_per_s"] / train["model_images_per_s"]
    assert len(train["model_runs"]) == 2 and train["model_images_per_s"] == sum(train["model_runs"]) / 2  # before, after
    hw = payload["hardware"]
    assert hw["cpu_cores"] >= 1 and hw["versions"]["torch"] and hw["versions"]["nvidia-dali-cuda130"]
    assert hw["cpu"] and "triton" in hw["versions"] and "gpus" in hw
    assert "Losses forward+backward" in r.stdout  # the loss section's rich table

    loss = [row for row in payload["results"] if row["section"] == "loss"]
    [matmul] = [row for row in loss if row["impl"] == "matmul"]  # the loss rows' ceiling: this machine's rate
    assert (matmul["status"], matmul["dtype"], matmul["size"]) == ("ok", "float32", 512) and matmul["gflops"] > 0
    assert matmul["gflops"] == 2 * 512 ** 3 / matmul["min_s"] / 1e9
    rows = {(row["loss"], row["impl"]): row for row in loss if row["impl"] != "matmul"}
    assert set(rows) == {(lo, i) for lo in ("ntxent", "supcon", "moco") for i in ("reference", "tiled")}
    for (kind, _), row in rows.items():
        assert row["status"] == "ok", row
        assert (row["n"], row["embeddings"], row["dim"], row["dtype"], row["device"]) == (32, 64, 16, "float32", "cpu")
        assert row["repeats"] == 1
        for key in ("median_s", "min_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert isinstance(row["peak_extra_mb"], float) and row["peak_extra_mb"] >= 0  # 64 embeddings: under a page
        assert row["min_s"] <= row["median_s"]
        # the similarity tiles twice (half each, by symmetry) and the gradient product; MoCo: 64 queries
        # against 100 keys, the logits twice and the gradient product
        flop = 6 * 64 * 100 * 16 if kind == "moco" else 4 * 64 ** 2 * 16
        assert row["gflops"] == flop / row["median_s"] / 1e9
        assert row["fraction_of_matmul"] == row["gflops"] / matmul["gflops"] > 0
        assert row["fraction_of_matmul_best"] >= row["fraction_of_matmul"]
    assert all(rows[kind, "reference"]["speedup_vs_reference"] == 1.0 for kind in ("ntxent", "supcon", "moco"))


def test_a_failed_measurement_is_named_and_the_exit_status_says_so(tmp_path, capsys):
    # a backbone timm does not know: the measurement's own process stops on it, in its one sentence
    from simclr_dali.tools.benchmark import command as benchmark

    out = tmp_path / "model.json"
    status = benchmark.main(["model", "--backbone", "resnet18x", "--image-size", "32", "--batch-size", "2",
                             "--steps", "1", "--repeats", "1", "--json", str(out)])
    err = capsys.readouterr().err
    [row] = json.loads(out.read_text())["results"]  # written all the same, with the reason
    sentence = "unknown backbone 'resnet18x': not a timm model name (did you mean resnet18, "
    assert status == 1 and row["status"] == "failed" and row["reason"].startswith(sentence), row
    assert err.splitlines()[-1].startswith(f"error: benchmark.py model: backbone=resnet18x failed: {sentence}"), err
