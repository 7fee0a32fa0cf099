"""What a bucket costs a run when it misbehaves, against moto's S3 server on the loopback behind the tests' proxy
(tests/support/store_proxy.py): the most DALI requests in flight at once during a 2-epoch training run (the next epoch's
pipeline is built ahead while the last steps of an epoch train), then how long DALI's client retries before it
gives up on a store gone for good, in the middle of an epoch.

    python -m bench.store_outage [--images 400]      (AWS_MAX_ATTEMPTS / AWS_RETRY_MODE as the run would take them)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="store-outage-"))
    port, proxy_port = free_port(), free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "store_proxy.py"), str(proxy_port), str(port),
                              str(work / "proxy.json")], stdin=subprocess.PIPE, text=True)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        for _ in range(400):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        import boto3

        from simclr_dali import training
        from simclr_dali.pipelines import bucket, pack
        from simclr_dali.pipelines.failures import StoreLost
        from simclr_dali.pipelines.loader import eval_loader
        from simclr_dali.pipelines.sources import load_source
        from simclr_dali.tools.benchmark.startup import make_folder

        boto3.client("s3").create_bucket(Bucket="data")
        make_folder(work, args.images, 10)
        pack.main([str(work / f"images-{args.images}-10"), "s3://data/shards", "--shard-size", "50", "--holdout", "0"])
        spec = "wds:s3://data/shards/shard-*.tar"
        training.main(["--data", spec, "--out", str(work / "run"), "--backbone", "test_resnet", "--image-size", "32",
                       "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--workers", "1"])
        peak = json.loads((work / "proxy.json").read_text())["peak"]

        batches = iter(eval_loader(load_source(spec, "train"), batch_size=8, size=32, workers=1, device_id=None))
        next(batches)
        proxy.stdin.write("down 0\n")
        proxy.stdin.flush()
        start = time.monotonic()
        try:
            for _ in batches:
                pass
            print("the epoch ended without an error: --images too few to outlast the prefetch")
            return
        except StoreLost as err:
            waited, said = time.monotonic() - start, str(err)
        mode = os.environ.get("AWS_RETRY_MODE")
        print(f"DALI requests in flight at once, 2-epoch training run: at most {peak}")
        print(f"store gone mid-epoch: DALI's client gave up after {waited:.1f} s "
              f"(AWS_MAX_ATTEMPTS={bucket.attempts()}, AWS_RETRY_MODE={mode}): {said}")
    finally:
        proxy.stdin.close()
        proxy.wait(timeout=10)
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
