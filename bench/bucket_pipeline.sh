#!/usr/bin/env bash
# The training pipeline reading the same tar shards from local disk and from an S3 server on the loopback
# (moto's): images/s of each and their ratio, `benchmark.py pipeline`. N hard-linked 500x375 JPEGs (100
# classes), packed into shards of SHARD (500) samples.
#   bash bench/bucket_pipeline.sh [N] [ROOT] [IMAGE_SIZE]     (default 2000 /tmp/bucket-pipeline 224)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${1:-2000}; ROOT=${2:-/tmp/bucket-pipeline}; SIZE=${3:-224}
mkdir -p "$ROOT"
"$PY" -c "
import sys; from pathlib import Path
from simclr_dali.tools.benchmark.startup import make_folder
make_folder(Path('$ROOT'), $N, 100)"
[ -f "$ROOT/shards/shard-000000.tar" ] || "$PY" -m simclr_dali.pipelines.pack "$ROOT/images-$N-100" "$ROOT/shards" --shard-size "${SHARD:-500}" --holdout 0
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$(dirname "$PY")/moto_server" -H 127.0.0.1 -p "$PORT" > /dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
export AWS_ENDPOINT_URL=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
sleep 2
"$PY" -c "
import boto3, glob, os
s3 = boto3.client('s3'); s3.create_bucket(Bucket='data')
for f in sorted(glob.glob('$ROOT/shards/shard-*')):
    s3.upload_file(f, 'data', 'shards/' + os.path.basename(f))"
for place in disk s3; do
  data="wds:$ROOT/shards/shard-*.tar"; [ "$place" = s3 ] && data="wds:s3://data/shards/shard-*.tar"
  "$PY" benchmark.py pipeline --data "$data" --image-size "$SIZE" --batch-size 64 --repeats ${REPEATS:-3} --json "$ROOT/$place.json" > /dev/null
done
"$PY" -c "
import json
disk, s3 = (json.load(open(f'$ROOT/{k}.json'))['results'][0]['dali_images_per_s'] for k in ('disk', 's3'))
print(f'$SIZE px, $N images: local disk {disk:.0f} images/s, S3 on the loopback {s3:.0f} images/s, ratio {s3 / disk:.2f}')"
