"""Two processes on the CPU over gloo, started as users start them: `accelerate launch`."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port, make_folder, panel_words, run_cli
from support.error_bounds import gamma, unit_roundoff

from simclr_dali.pipelines.sources import load_folder
from simclr_dali.pipelines.webdataset import TEST_PREFIX, write_shards

pytestmark = pytest.mark.slow  # two processes through accelerate launch

LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
TINY = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "4", "--warmup-epochs", "1",
        "--log-every", "1", "--workers", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    folder = make_folder(root / "images", per_class=6)  # 18 images
    source = load_folder(str(folder), "all")
    write_shards(source.files, source.labels, root / "shards", shard_size=5)  # 4 shards: 5, 5, 5, 3
    write_shards(source.files, source.labels, root / "shards", shard_size=3, prefix=TEST_PREFIX)  # the monitor's
    return folder, str(root / "shards" / "shard-*.tar")


def test_two_processes_read_disjoint_shards_and_match_one_process(data):
    _, shards = data
    r = run_cli(*LAUNCH, "tests/support/dist_worker.py", shards)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["world"] == 2
    a, b = result["arrays"]
    assert len(a) == len(b) == 16 and not set(a) & set(b) and sorted(a + b) == list(range(32))
    # WebDataset: 18 samples, 9 per process, 2 full batches of 4 each; labels 0..2 by class folder
    a, b = result["wds"]
    assert len(a) == len(b) == 8
    assert sorted(set(a + b)) == [0, 1, 2]
    gathered = result["gathered"]  # rank 0's: 7 rows, one process's empty part, placed in reverse
    assert gathered["rows"] == [[2.0 * i, 2.0 * i + 1] for i in range(7)][::-1]
    assert gathered["labels"] == [0, 1, 1, 2, 3, 4, 5, 6]  # rank 0's 0..1, rank 1's 1..6, in rank order
    bounds = gradient_bounds(result)
    assert abs(sum(result["rank_losses"]) / 2 - result["single_loss"]) <= bounds["loss"]
    for i, (err, scale, two_ranks) in enumerate(result["grads"]):  # max |difference|, max |single|, max |two|
        if scale == 0:  # behind a zero-initialised last BN weight every term is multiplied by an exact 0
            assert two_ranks == 0, i
        else:
            assert err <= bounds["grad"] * scale, (i, err / (bounds["grad"] * scale))


def gradient_bounds(result: dict) -> dict:
    """Bounds on |two ranks - one process| for dist_worker's float64 comparison: the loss, and each
    parameter's gradient as a fraction of its largest entry. Largest observed fractions of them: loss
    5e-7, gradients 2e-5 (20 seeds, 1 and 2 threads per process); without DDP's all-reduce a gradient
    would be off by 1 to 9 times its largest entry, 4e8 x the bound."""
    u = unit_roundoff(getattr(torch, result["dtype"]))
    k, layers, dim, tau, m = (result[key] for key in ("longest_sum", "layers", "dim", "tau", "pairs"))
    m *= 2  # embeddings: columns of the similarity matrix
    # A whole network is an allowance, not a proof: each of the `layers` sums on a path adds at most gamma(k)
    # of its activations' scale, carried on without growth (eval BN rescales; ReLU, residual adds do not
    # amplify). sqrt(dim) takes an embedding's max-norm to its 2-norm. In float64 this is ~1e-10.
    z_rel = math.sqrt(dim) * layers * gamma(k, u)
    # a cosine moves by <= 2 z_rel (the normalisation's Jacobian is 1/|z|) + its own rounding (dot product of
    # dim terms, norms), a logit by that over tau; lse - pos moves by <= 2 logits, plus the sums of lse and mean
    logit = (2 * z_rel + 2 * gamma(dim, u) + 4 * u) / tau
    loss = 2 * logit + gamma(2 * m, u) * (result["single_loss"] + 2 / tau)
    # dL/dz: the softmax moves by <= 2 logits relative; then `layers` sums back, the activations' own
    # z_rel-type error, and each weight gradient's sum: 2 * layers + 1 sums of at most k terms
    grad = 2 * logit + gamma(m, u) + (2 * layers + 1) * gamma(k, u)
    # two computations (one process, two ranks) each within its bound; the ranks' mean rounds once more
    return {"loss": 2 * loss + u * result["single_loss"], "grad": 2 * grad + u}


@pytest.mark.parametrize("source", ["folder", "wds"])
def test_two_process_training_writes_one_set_of_outputs(data, source, tmp_path):
    """Also: the online kNN, its extraction split over the processes, scores what one process scores."""
    folder, shards = data
    spec = str(folder) if source == "folder" else f"wds:{shards}"
    out = tmp_path / "run"
    knn = ["--knn-every", "2", "--knn-per-class", "2", "--knn-train", "6", "--knn-test", "5"]
    r = run_cli(*LAUNCH, "train.py", "--data", spec, "--out", str(out), *TINY, *knn)
    assert r.returncode == 0, r.stderr[-3000:]
    two = [json.loads(line)["knn_top1"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "knn"]
    one, fragile = one_process_monitor(out, spec)
    assert len(two) == 1 and abs(two[0] - one) * 5 <= fragile
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 8
    # global BN is the default where several CUDA processes train; these are CPU processes (gloo)
    per_process = "per process (2 CPU processes: SyncBatchNorm runs on GPUs only)"
    assert (cfg["sync_bn"], cfg["batch_norm"]) == (True, per_process)
    assert f"batch norm {per_process}" in panel_words(r.stdout)  # the panel says so
    n_train = 16 if source == "folder" else 18  # a test split aside: 10% of a folder; shards without test shards: none
    assert cfg["n_train"] == n_train and cfg["steps_per_epoch"] == (n_train // 2) // 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec["step"] for rec in records if rec["kind"] == "step"]
    assert steps == list(range(1, 2 * cfg["steps_per_epoch"] + 1))  # one writer: no line twice
    if source == "folder":  # evaluate.py under accelerate launch: each process extracts its part
        ev = run_cli(*LAUNCH, "evaluate.py", "--run", str(out), "--no-plots", "--probe-epochs", "2")
        assert ev.returncode == 0, ev.stderr[-3000:]
        two = json.loads((out / "eval.json").read_text())
        assert two["processes"] == 2 and two["n_train"] == 16
        assert two["protocol"]["features"].endswith("extracted by 2 process(es)")
        one, fragile = one_process_knn(out, folder, two["n_test"])
        assert abs(two["knn_top1"] - one) * two["n_test"] <= fragile
        assert ev.stdout.count("linear probe top-1") == 1  # one table
    assert r.stdout.count("SimCLR run") == 1  # one console
    assert (out / "backbone.safetensors").is_file() and (out / "checkpoint" / "progress.json").is_file()


def one_process_monitor(out, spec: str) -> tuple[float, int]:
    """The online kNN of the run's final backbone computed by one process (the same draw, seed 0), and how
    many of its 5 decisions two computations' roundings could change (test_evaluate.knn_fragile)."""
    from support.error_bounds import feature_error, knn_fragile

    from simclr_dali.evaluation.backbone import load_backbone
    from simclr_dali.models.features import extract
    from simclr_dali.pipelines.loader import eval_loader
    from simclr_dali.pipelines.sources import load_source
    from simclr_dali.training.monitor import KnnMonitor

    backbone = load_backbone(json.loads((out / "config.json").read_text()), out / "backbone.safetensors")
    train, test = load_source(spec, "train"), load_source(spec, "test")
    monitor = KnnMonitor(train, test, per_class=2, n_train=6, n_test=5, size=32, batch_size=4, workers=1,
                         device_id=None)
    top1 = monitor(backbone, torch.device("cpu"))
    kwargs = dict(batch_size=4, size=32, workers=1, device_id=None)
    bx, by = extract(backbone, eval_loader(monitor.bank.source, **kwargs), torch.device("cpu"))
    tx, _ = extract(backbone, eval_loader(monitor.test.source, **kwargs), torch.device("cpu"))
    pick = lambda x, keep: x if keep is None else x[torch.from_numpy(keep)]  # noqa: E731
    rel = bx.shape[1] ** 0.5 * (2 * feature_error(backbone, torch.float32) + 2 * unit_roundoff(torch.float16))
    return top1, knn_fragile(pick(bx, monitor.bank.keep).float(), pick(by, monitor.bank.keep),
                             pick(tx, monitor.test.keep).float(), monitor.k, 0.1, rel)


def one_process_knn(out, folder, n_test: int) -> tuple[float, int]:
    """evaluate.py's kNN top-1 of the run's backbone computed by one process, and how many of its decisions
    two computations' roundings could change."""
    from support.error_bounds import feature_error, knn_fragile

    from simclr_dali.evaluation.backbone import load_backbone
    from simclr_dali.models.features import extract, knn_top1
    from simclr_dali.pipelines.loader import eval_loader
    from simclr_dali.pipelines.sources import load_source

    backbone = load_backbone(json.loads((out / "config.json").read_text()), out / "backbone.safetensors")
    kwargs = dict(batch_size=8, size=32, workers=1, device_id=None)
    tx, ty = extract(backbone, eval_loader(load_source(str(folder), "train"), **kwargs), torch.device("cpu"))
    qx, qy = extract(backbone, eval_loader(load_source(str(folder), "test"), **kwargs), torch.device("cpu"))
    assert len(qx) == n_test
    rel = tx.shape[1] ** 0.5 * (2 * feature_error(backbone, torch.float32) + 2 * unit_roundoff(torch.float16))
    return knn_top1(tx, ty, qx, qy), knn_fragile(tx.float(), ty, qx.float(), 200, 0.1, rel)


def test_sync_bn_asked_for_on_cpu_processes_is_a_clear_error(data, tmp_path):
    folder, _ = data
    r = run_cli(*LAUNCH, "train.py", "--data", str(folder), "--out", str(tmp_path / "x"), *TINY, "--sync-bn")
    assert r.returncode != 0 and r.stderr.count("--sync-bn needs GPUs") == 1  # both refuse; the first says so


def test_one_process_meets_a_damaged_image_and_the_run_stops(tmp_path):
    """Rank 1's part of the first epoch holds damaged images inside its shards (past what the indexes
    check), rank 0's none: rank 1 says so in one sentence and exits 2; rank 0, whose collective breaks,
    exits 1 without a traceback; the launcher ends with a non-zero status, naming rank 1 as the cause."""
    from simclr_dali.pipelines.loader import Shard, ShardReader
    from simclr_dali.pipelines.sources import load_source

    folder = make_folder(tmp_path / "images", per_class=12)  # 36 images in 6 shards of 6
    source = load_folder(str(folder), "all")
    write_shards(source.files, source.labels, tmp_path / "shards", shard_size=6)
    pattern = f"wds:{tmp_path / 'shards' / 'shard-*.tar'}"
    reader = ShardReader(load_source(pattern, "train"), 4, Shard(1, 2), shuffle=True, drop_last=True)
    epoch = []  # (shard, a sample's index line, whether the index check reads its tar header), in order
    for shard, index in zip(reader.paths, reader.index_paths):
        lines = open(index).read().splitlines()[1:]
        epoch += [(shard, line, line in (lines[0], lines[-1])) for line in lines]
    damaged = 0
    for shard, line, checked in epoch[len(epoch) // 2:]:  # rank 1 of 2 reads the second half
        if not checked:
            _, offset, size = line.split()[:3]
            with open(shard, "r+b") as tar:
                tar.seek(int(offset))
                tar.write(bytes(int(size)))
            damaged += 1
    assert damaged >= 8
    r = run_cli(*LAUNCH, "train.py", "--data", pattern, "--out", str(tmp_path / "run"), *TINY,
                "--backbone", "test_resnet", timeout=120)  # a rank left waiting would hang past this
    assert r.returncode != 0
    assert r.stderr.count(f", read from {pattern}, is not an image in a format DALI decodes") == 1, \
        r.stderr[-3000:]
    assert re.search(rf"error: {re.escape(str(tmp_path / 'shards'))}/shard-\d+\.tar:\d+\.(jpg|png), read ", r.stderr)
    assert r.stderr.count("Traceback (most recent call last)") == 1  # the launcher's own (ChildFailedError)
    root_cause = r.stderr[r.stderr.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 2" in root_cause
    assert "rank      : 0 (local_rank: 0)" in r.stderr[:r.stderr.index("Root Cause")]  # it failed too


@pytest.mark.parametrize("method", ["supcon", "moco", "byol"])
def test_two_processes_train_each_method(data, method, tmp_path):
    """SupCon reads its labels from the shards' .cls entries; MoCo's queue advances by the global batch
    (the keys of both processes), and a one-process resume of its two-process run goes on filling it."""
    from safetensors.torch import load_file

    folder, shards = data
    out = tmp_path / "run"
    flags = ["--method", method, "--queue-size", "5", "--proj-hidden", "32", "--pred-hidden", "32"]
    r = run_cli(*LAUNCH, "train.py", "--data", f"wds:{shards}" if method == "supcon" else str(folder),
                "--out", str(out), *TINY, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["method"], cfg["world_size"], cfg["global_batch"]) == (method, 2, 8)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "step"]
    assert len(losses) == 2 * cfg["steps_per_epoch"] and all(math.isfinite(v) for v in losses)
    if method != "moco":
        return
    assert load_file(str(out / "checkpoint" / "model.safetensors"))["queue_next"].item() == (4 * 8) % 5
    r = run_cli("train.py", "--data", str(folder), "--out", str(out), *TINY, *flags, "--epochs", "3",
                "--batch-size", "8", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_file(str(out / "checkpoint" / "model.safetensors"))["queue_next"].item() == (6 * 8) % 5


@pytest.mark.slow
def test_two_machines_on_the_loopback_train_checkpoint_and_resume(tmp_path):
    """Two `accelerate launch` commands, machine ranks 0 and 1 of 2, one process each, over 127.0.0.1: they train,
    checkpoint and resume as one run. Files are written once, by the run's main process; each process takes its
    threads from its own machine (LOCAL_WORLD_SIZE 1: both of this machine's cores), not from the run's world."""
    folder = make_folder(tmp_path / "images", per_class=8)
    out = tmp_path / "run"

    def launch(*extra: str) -> list[tuple[int, str]]:
        port = str(free_port())
        runs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines",
                                  "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip",
                                  "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                                  "--dynamo_backend", "no", "train.py", "--data", str(folder), "--out", str(out),
                                  "--backbone", "test_resnet", "--image-size", "32", "--batch-size", "4",
                                  "--log-every", "1", *extra],
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        return [(run.wait(timeout=300), run.stderr.read()) for run in runs]

    for code, err in launch("--epochs", "1"):
        assert code == 0, err[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_sizes"] == [[2, 0]] and config["workers_resolved"] == len(os.sched_getaffinity(0))
    for code, err in launch("--epochs", "2", "--resume"):
        assert code == 0, err[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = config["steps_per_epoch"]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 2 * steps + 1))  # each once
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["step"] == 2 * steps
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "checkpoint", "checkpoint.prev",
                                                    "config.json", "metrics.jsonl"]
