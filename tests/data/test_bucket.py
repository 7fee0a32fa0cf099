"""Tar shards in a bucket (`wds:s3://...`), against a real S3 server on the loopback: moto's, started in a
process of its own (DALI's S3 client holds the GIL while it waits, so a server thread in this process would
never answer it), behind a proxy that can make the store go away (tests/support/store_proxy.py). Nothing here reaches
outside this machine."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENV, ROOT, TINY, free_port, make_folder, run_cli, train_here

from simclr_dali.errors import UserError
from simclr_dali.pipelines.sources import load_folder, load_source
from simclr_dali.pipelines.webdataset import TEST_PREFIX, write_shards

pytestmark = pytest.mark.slow  # a server in a process of its own

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}
SPEC = "wds:s3://data/shards/shard-*.tar"


class Proxy:
    """tests/support/store_proxy.py in a process of its own, between the tests and the server."""

    def __init__(self, server_port: int, log: Path):
        self.port, self.log = free_port(), log
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "store_proxy.py"),
                                         str(self.port), str(server_port), str(log)], stdin=subprocess.PIPE, text=True)

    def say(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def state(self) -> dict:
        return json.loads(self.log.read_text())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=10)


def moto_server(**env: str) -> tuple[subprocess.Popen, int]:
    """moto's S3 server in a process of its own on a free loopback port, and the port."""
    port = free_port()
    return subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def wait_for(url: str) -> None:
    """Until a server answers `url` (whatever it says)."""
    for _ in range(400):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(endpoint, local shards folder, proxy): a moto S3 server with bucket `data` holding shards/ (4 training
    shards with their indexes, 2 test shards), reached through a proxy at `endpoint`, and the same files on
    local disk."""
    root = tmp_path_factory.mktemp("bucket")
    server, port = moto_server()
    proxy = Proxy(port, root / "proxy.json")
    endpoint = f"http://127.0.0.1:{proxy.port}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train.py's processes here (ENV): the runs compared bit for bit mix both
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(key, value)
        wait_for(f"{endpoint}/moto-api/")  # moto's own page: no request to S3
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
        yield endpoint, shards, proxy
    torch.set_num_threads(threads)
    proxy.stop()
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def gcs(store):
    """The endpoint of a GCS emulator (gcp-storage-emulator's) in a process of its own, with bucket `data` holding
    the same shards/, named to the clients as they expect (STORAGE_EMULATOR_HOST)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("gcp-storage-emulator")), "start", "--host",
                               "127.0.0.1", "--port", str(port), "--in-memory"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", endpoint)
        wait_for(endpoint)
        bucket = storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket("data")
        for file in sorted(store[1].iterdir()):
            bucket.blob(f"shards/{file.name}").upload_from_filename(str(file))
        yield endpoint
        for key in ("DALI_GCS_ENDPOINT_URL", "DALI_GCS_ANONYMOUS"):  # what bucket.patient() set for DALI
            os.environ.pop(key, None)
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(params=["s3", "gs"])
def scheme(request, store):
    """Each store in turn: S3 (moto's, behind the proxy) and GCS (the emulator)."""
    if request.param == "gs":
        request.getfixturevalue("gcs")
    return request.param


@pytest.fixture(scope="module")
def on_disk(store, tmp_path_factory):
    """The oracle of the runs from the bucket: backbone.safetensors of the same run (2 epochs) on the local copy of
    the shards, uninterrupted."""
    out = tmp_path_factory.mktemp("disk") / "run"
    assert train_here("--data", f"wds:{store[1]}/shard-*.tar", "--out", str(out), "--epochs", "2") == 0
    return out / "backbone.safetensors"


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_in_a_bucket_read_as_the_same_shards_on_disk(scheme, store):
    from simclr_dali.pipelines.loader import eval_loader

    _, local, _ = store
    for split in ("train", "test"):
        remote = load_source(f"wds:{scheme}://data/shards/shard-*.tar", split)
        here = load_source(f"wds:{local}/shard-*.tar", split)
        assert remote.shards == [f"{scheme}://data/shards/{Path(s).name}" for s in here.shards]
        assert remote.indexes == [f"{scheme}://data/shards/{Path(s).stem}.idx" for s in here.shards]
        assert (remote.counts, remote.nbytes) == (here.counts, here.nbytes)
        kwargs = dict(batch_size=5, size=32, workers=1, device_id=None)
        got = [(v, y) for v, y in eval_loader(remote, **kwargs)]
        want = [(v, y) for v, y in eval_loader(here, **kwargs)]
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(got, want))
        assert sum(len(y) for _, y in got) == len(here)


def test_train_py_on_a_bucket_rides_out_a_store_gone_for_a_second_stops_resumes_and_ends_as_on_disk(
        store, on_disk, tmp_path):
    """The store goes away for a second in the middle of the first epoch (DALI's client retries through it); the
    run stops after that epoch and resumes; it ends bit for bit as the run on disk, and evaluate.py scores it on
    the bucket's test shards."""
    from simclr_dali.evaluation.evaluate import evaluate_run, parse_args

    _, _, proxy = store
    out = tmp_path / "bucket"
    cut_before = proxy.state()["cut"]
    proxy.say("down 20 1")
    assert train_here("--data", SPEC, "--out", str(out), "--epochs", "2", "--stop-after", "1") == 0
    assert proxy.state()["cut"] > cut_before and not proxy.state()["down"]  # it went away, and came back
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["epoch"] == 0
    assert train_here("--data", SPEC, "--out", str(out), "--epochs", "2", "--resume") == 0
    assert same_weights(out / "backbone.safetensors", on_disk)
    result = evaluate_run(parse_args(["--run", str(out), "--no-plots", "--probe-epochs", "2"]))
    assert (result["n_train"], result["n_test"], result["data"]) == (24, 12, SPEC)


def test_a_store_gone_past_the_retries_is_one_sentence_and_the_run_resumes_once_it_is_back(store, on_disk, tmp_path):
    """The store goes away in the middle of the first epoch and stays away: train.py (a process of its own: it
    leaves at once, its pipeline no longer valid) says so in one sentence naming the store, the checkpoint it
    leaves and how to go on; once the store is back, --resume ends bit for bit as the run on disk."""
    endpoint, _, proxy = store
    out = tmp_path / "run"
    args = ("--data", SPEC, "--out", str(out), "--epochs", "2", "--save-every-steps", "1")
    proxy.say(f"down-when {out / 'checkpoint' / 'progress.json'}")  # the first checkpoint's, at step 1
    try:
        run = run_cli("train.py", *args, *TINY, env={**ENV, "AWS_MAX_ATTEMPTS": "2"})
        assert proxy.state()["cut"] > 0
    finally:
        proxy.say("up")
    assert run.returncode == 2, run.stderr
    step = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert 0 < step < 6  # before the end (of 2 epochs of 3 steps)
    assert "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    read = r"(wds:s3://data/shards/shard-\*\.tar|s3://data/shards/(shard|test)-00000\d\.tar)"  # DALI names one or none
    assert re.match(rf"error: the store at {endpoint} stopped answering while DALI read {read} \(curlCode: \d+, \w",
                    line), line
    assert line.endswith(f"), and its client gave up after 2 tries (AWS_MAX_ATTEMPTS); the checkpoint of step "
                         f"{step} in {out / 'checkpoint'} is whole: once the store answers, continue with  python "
                         f"train.py --data '{SPEC}' --out {out} --epochs 2 --save-every-steps 1 {' '.join(TINY)} "
                         f"--resume")
    assert train_here(*args, "--resume") == 0
    assert same_weights(out / "backbone.safetensors", on_disk)


def test_two_processes_train_from_a_bucket_and_one_goes_on_from_the_epoch_boundary(store, tmp_path):
    """Several processes on one bucket (the main one lists the shards and checks the indexes; each process's
    DALI reader reads its own shards from the store), then an elastic resume on one process at the epoch
    boundary. Each epoch trains on all 24 images, 8 of each class (dist_elastic.py records the labels)."""
    from support.elastic import launch, seen_per_epoch

    out, record = tmp_path / "run", tmp_path / "seen"
    record.mkdir()
    first = launch(2, SPEC, out, record, "first", "--batch-size", "4", "--epochs", "2", "--stop-after", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    rest = launch(1, SPEC, out, record, "rest", "--epochs", "2", "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    epochs = seen_per_epoch(record)
    assert sorted(epochs) == [0, 1] and all(counts == {0: 8, 1: 8, 2: 8} for counts in epochs.values()), epochs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_sizes"] == [[2, 0], [1, 3]] and cfg["data"] == SPEC


def test_train_py_on_gcs_ends_bit_for_bit_as_on_disk(gcs, on_disk, tmp_path):
    spec = "wds:gs://data/shards/shard-*.tar"
    assert train_here("--data", spec, "--out", str(tmp_path / "run"), "--epochs", "2") == 0
    assert same_weights(tmp_path / "run" / "backbone.safetensors", on_disk)


@pytest.mark.parametrize("spec,sentence", [
    ("wds:{}://missing/shards/*.tar", "bucket missing does not exist at http://127.0.0.1:"),
    ("wds:{}://data/none/shard-*.tar", "no tar shards match '{}://data/none/shard-*.tar' at http://127.0.0.1:"),
])
def test_a_missing_bucket_or_no_shard_is_one_sentence_before_any_training(scheme, spec, sentence, tmp_path, capsys):
    spec, sentence = spec.format(scheme), sentence.format(scheme)
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


def test_access_denied_by_the_store_is_one_sentence_before_any_training(tmp_path, monkeypatch, capsys):
    """A server of its own that checks credentials against its IAM users (moto's INITIAL_NO_AUTH_ACTION_COUNT: the
    first requests, which make the bucket and the user, go unchecked): a user whose policy grants another bucket,
    then a key the store does not know."""
    import boto3
    server, port = moto_server(INITIAL_NO_AUTH_ACTION_COUNT="4")
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        wait_for(f"{endpoint}/moto-api/")
        boto3.client("s3").create_bucket(Bucket="secret")
        iam = boto3.client("iam")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="another-bucket", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::another/*"}]}))
        for key_id, secret, code in ((key["AccessKeyId"], key["SecretAccessKey"], "AccessDenied"),
                                     ("unknown", "unknown", "InvalidAccessKeyId")):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            with pytest.raises(SystemExit) as stop:
                train_here("--data", "wds:s3://secret/shards/*.tar", "--out", str(tmp_path / code), "--epochs", "1")
            err = capsys.readouterr().err
            assert stop.value.code == 2 and err == (f"error: access to s3://secret/shards/*.tar is denied at {endpoint} "
                                                    f"({code}): check the credentials and the bucket's policy\n")
            assert not (tmp_path / code / "checkpoint").exists()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_pack_writes_shards_straight_into_a_bucket_and_refuses_to_mix_them_with_old_ones(scheme, tmp_path, capsys):
    from simclr_dali.pipelines import pack
    folder = make_folder(tmp_path / "images", per_class=5)  # 15 images: 12 train, 3 test
    assert pack.main([str(folder), f"{scheme}://data/packed", "--shard-size", "5"]) == 0
    assert "wrote 12 samples in 3 shard(s) and 3 test samples" in capsys.readouterr().out
    train, test = (load_source(f"wds:{scheme}://data/packed/shard-*.tar", split) for split in ("train", "test"))
    assert (train.counts, test.counts) == ([5, 5, 2], [3])
    from simclr_dali.pipelines.loader import eval_loader
    labels = torch.cat([y for s in (train, test) for _, y in eval_loader(s, batch_size=4, size=32, workers=1,
                                                                           device_id=None)])
    assert sorted(labels.tolist()) == sorted(load_folder(str(folder), "all").labels.tolist())
    with pytest.raises(SystemExit) as stop:
        pack.main([str(folder), f"{scheme}://data/packed"])
    assert stop.value.code == 2 and f"{scheme}://data/packed already holds shards (shard-000000.tar and 3 more)" in \
        capsys.readouterr().err
