"""Tar shards in a bucket (`wds:s3://...`), against a real S3 server on the loopback: moto's, started in a
process of its own (DALI's S3 client holds the GIL while it waits, so a server thread in this process would
never answer it). Nothing here reaches outside this machine."""
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, make_folder, train_here

from pipelines.sources import load_folder, load_source
from pipelines.webdataset import TEST_PREFIX, write_shards
from simclr_dali.errors import UserError

pytestmark = pytest.mark.slow  # a server in a process of its own

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(endpoint, local shards folder): a moto S3 server with bucket `data` holding shards/ (4 training shards
    with their indexes, 2 test shards) and the same files on local disk."""
    root = tmp_path_factory.mktemp("bucket")
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(key, value)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        import boto3
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        source = load_folder(str(make_folder(root / "images", per_class=8)), "all")  # 3 classes of 8
        order = np.random.default_rng(0).permutation(len(source))
        shards = root / "shards"
        write_shards(source.files, source.labels, shards, shard_size=6, order=order)
        write_shards(source.files, source.labels, shards, shard_size=6, order=order[:12], prefix=TEST_PREFIX)
        for file in sorted(shards.iterdir()):
            s3.upload_file(str(file), "data", f"shards/{file.name}")
        yield endpoint, shards
    server.terminate()
    server.wait(timeout=10)


def test_shards_in_a_bucket_read_as_the_same_shards_on_disk(store):
    from pipelines.loader import eval_loader

    _, local = store
    for split in ("train", "test"):
        remote = load_source("wds:s3://data/shards/shard-*.tar", split)
        here = load_source(f"wds:{local}/shard-*.tar", split)
        assert remote.shards == [f"s3://data/shards/{Path(s).name}" for s in here.shards]
        assert remote.indexes == [f"s3://data/shards/{Path(s).stem}.idx" for s in here.shards]
        assert (remote.counts, remote.nbytes) == (here.counts, here.nbytes)
        kwargs = dict(batch_size=5, size=32, workers=1, device_id=None)
        got = [(v, y) for v, y in eval_loader(remote, **kwargs)]
        want = [(v, y) for v, y in eval_loader(here, **kwargs)]
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(got, want))
        assert sum(len(y) for _, y in got) == len(here)


def test_train_py_on_a_bucket_stops_resumes_and_ends_bit_for_bit_as_on_disk(store, tmp_path):
    """The oracle: the same run on the local copy of the shards, uninterrupted. The run from the bucket stops
    after its first epoch and resumes; then evaluate.py scores it on the bucket's test shards."""
    from safetensors.torch import load_file

    from simclr_dali.evaluation.evaluate import evaluate_run, parse_args

    _, local = store
    spec = "wds:s3://data/shards/shard-*.tar"
    assert train_here("--data", f"wds:{local}/shard-*.tar", "--out", str(tmp_path / "disk"), "--epochs", "2") == 0
    assert train_here("--data", spec, "--out", str(tmp_path / "bucket"), "--epochs", "2", "--stop-after", "1") == 0
    assert json.loads((tmp_path / "bucket" / "checkpoint" / "progress.json").read_text())["epoch"] == 0
    assert train_here("--data", spec, "--out", str(tmp_path / "bucket"), "--epochs", "2", "--resume") == 0
    disk, bucket = (load_file(tmp_path / run / "backbone.safetensors") for run in ("disk", "bucket"))
    assert disk.keys() == bucket.keys() and all(torch.equal(disk[k], bucket[k]) for k in disk)
    result = evaluate_run(parse_args(["--run", str(tmp_path / "bucket"), "--no-plots", "--probe-epochs", "2"]))
    assert (result["n_train"], result["n_test"], result["data"]) == (24, 12, spec)


@pytest.mark.parametrize("spec,sentence", [
    ("wds:s3://missing/shards/*.tar", "bucket missing does not exist at http://127.0.0.1:"),
    ("wds:s3://data/none/shard-*.tar", "no tar shards match 's3://data/none/shard-*.tar' at http://127.0.0.1:"),
])
def test_a_missing_bucket_or_no_shard_is_one_sentence_before_any_training(store, spec, sentence, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_here("--data", spec, "--out", str(tmp_path / "run"), "--epochs", "1")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and sentence in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_a_shard_without_its_index_and_missing_credentials_are_one_sentence_each(store, monkeypatch):
    import boto3
    boto3.client("s3").upload_file(str(store[1] / "shard-000000.tar"), "data", "lone/shard-000000.tar")
    with pytest.raises(UserError, match=r"^s3://data/lone/shard-000000.tar has no index beside it "
                                        r"\(s3://data/lone/shard-000000.idx\): index the shards"):
        load_source("wds:s3://data/lone/shard-*.tar", "train")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    with pytest.raises(UserError, match=r"^no credentials to read s3://data/shards/shard-\*\.tar: set AWS_ACCESS_KEY_ID"):
        load_source("wds:s3://data/shards/shard-*.tar", "train")


def test_pack_writes_shards_straight_into_a_bucket_and_refuses_to_mix_them_with_old_ones(store, tmp_path, capsys):
    from pipelines import pack
    folder = make_folder(tmp_path / "images", per_class=5)  # 15 images: 12 train, 3 test
    assert pack.main([str(folder), "s3://data/packed", "--shard-size", "5"]) == 0
    assert "wrote 12 samples in 3 shard(s) and 3 test samples" in capsys.readouterr().out
    train, test = (load_source("wds:s3://data/packed/shard-*.tar", split) for split in ("train", "test"))
    assert (train.counts, test.counts) == ([5, 5, 2], [3])
    from pipelines.loader import eval_loader
    labels = torch.cat([y for s in (train, test) for _, y in eval_loader(s, batch_size=4, size=32, workers=1,
                                                                           device_id=None)])
    assert sorted(labels.tolist()) == sorted(load_folder(str(folder), "all").labels.tolist())
    with pytest.raises(SystemExit) as stop:
        pack.main([str(folder), "s3://data/packed"])
    assert stop.value.code == 2 and "s3://data/packed already holds shards (shard-000000.tar and 3 more)" in \
        capsys.readouterr().err
