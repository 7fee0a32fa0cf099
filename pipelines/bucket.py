"""Tar shards in object storage: `--data "wds:s3://BUCKET/PREFIX/shard-*.tar"`, in S3 or any S3-compatible
store (MinIO, Ceph; `AWS_ENDPOINT_URL` names its endpoint).

Objects are listed and index files read with boto3, whose credential chain is the standard one (the
environment, ~/.aws, an instance role); DALI's webdataset reader then reads the shards and their indexes
itself, with the same chain and endpoint. A failure of the store is one sentence naming the URL and the
cause.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import re

from simclr_dali.errors import UserError

SCHEMES = ("s3://",)


def is_remote(path: str) -> bool:
    return path.startswith(SCHEMES)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of s3://BUCKET/KEY."""
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


@functools.lru_cache(maxsize=None)
def _client(endpoint: str | None, _key_id: str | None):
    import boto3
    from botocore.config import Config

    # a session of its own: the credentials resolved now, not those boto3's default session cached; retried
    # with backoff (the store going away for a moment), bounded: about 10 attempts, then a sentence
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                          config=Config(retries={"max_attempts": 10, "mode": "standard"},
                                                        connect_timeout=5, read_timeout=30))


def endpoint() -> str | None:
    """The S3-compatible store the environment names (None: AWS's own)."""
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def client():
    """boto3's S3 client, one per endpoint and access key in the environment (made once: a client costs more
    than a request)."""
    return _client(endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"))


def where() -> str:
    """' at ENDPOINT' for a sentence, where the environment names one."""
    return f" at {endpoint()}" if endpoint() else ""


def failure(url: str, err: Exception) -> UserError:
    """The store's error as one sentence naming the URL and the cause."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_url(url)
    if isinstance(err, NoCredentialsError):
        return UserError(f"no credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, write "
                         f"them to ~/.aws/credentials, or run where an instance role grants them")
    if isinstance(err, EndpointConnectionError):
        return UserError(f"cannot reach the store{where()} to read {url}: check AWS_ENDPOINT_URL and the network")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return UserError(f"bucket {bucket} does not exist{where()} (reading {url})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            return UserError(f"access to {url} is denied{where()} ({code}): check the credentials and the bucket's "
                             f"policy")
        if code in ("NoSuchKey", "404"):
            return UserError(f"{url} does not exist{where()}")
        return UserError(f"the store{where()} refused to read {url}: {code or err}")
    return UserError(f"cannot read {url}{where()}: {err}")


def _calls(url: str):
    """Runs a store call, its failure turned into a sentence about `url`."""
    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                return fn(*args, **kwargs)
            except (BotoCoreError, ClientError) as err:
                raise failure(url, err) from None
        return wrapper
    return decorator


def list_matching(pattern: str) -> dict[str, tuple[int, int]]:
    """{url: (size, modification time in ns)} of the objects whose keys match `pattern`'s glob, by listing the
    prefix before its first wildcard."""
    bucket, key = split_url(pattern)
    prefix = re.split(r"[*?\[]", key, maxsplit=1)[0]

    @_calls(pattern)
    def listing():
        found = {}
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if fnmatch.fnmatchcase(obj["Key"], key):
                    found[f"s3://{bucket}/{obj['Key']}"] = (obj["Size"], int(obj["LastModified"].timestamp() * 1e9))
        return found
    return listing()


def read_bytes(url: str, start: int = 0, size: int | None = None) -> bytes:
    """The object's bytes, or `size` of them from `start` (a ranged read)."""
    bucket, key = split_url(url)

    @_calls(url)
    def read():
        extra = {} if size is None and not start else {"Range": f"bytes={start}-{'' if size is None else start + size - 1}"}
        return client().get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
    return read()


class RangedObject:
    """seek and read on an object in a bucket, each read a ranged GET: the tar headers the index check reads."""

    def __init__(self, url: str):
        self.url, self.at = url, 0

    def seek(self, offset: int) -> None:
        self.at = offset

    def read(self, n: int) -> bytes:
        data = read_bytes(self.url, self.at, n)
        self.at += len(data)
        return data


def indexes_beside(shards: list[str]) -> tuple[list[str], list[tuple[int, int, int, int]]]:
    """Shards in a bucket: the index beside each (SHARD.idx, which DALI reads from the bucket too) and the
    (size, modification time) of both, from one listing of each folder."""
    listed = {}
    for folder in sorted({s.rsplit("/", 1)[0] for s in shards}):
        listed.update(list_matching(folder + "/*"))
    indexes, keys = [], []
    for shard in shards:
        index = shard[:-len(".tar")] + ".idx"
        if index not in listed:
            raise UserError(f"{shard} has no index beside it ({index}): index the shards with 'python -m "
                            f"pipelines.index' (or write them with 'python -m pipelines.pack') and upload each .idx "
                            f"beside its .tar")
        indexes.append(index)
        keys.append(listed[shard] + listed[index])
    return indexes, keys


def upload(path: str | os.PathLike, url: str) -> None:
    """A local file to the object at `url` (boto3's transfer: multipart for large files, retried)."""
    bucket, key = split_url(url)

    @_calls(url)
    def put():
        client().upload_file(str(path), bucket, key)
    put()
