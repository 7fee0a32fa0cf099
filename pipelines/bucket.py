"""Tar shards in object storage: `--data "wds:s3://BUCKET/PREFIX/shard-*.tar"`, in S3 or any S3-compatible
store (MinIO, Ceph; `AWS_ENDPOINT_URL` names its endpoint), or `wds:gs://...` in Google Cloud Storage.

Objects are listed and index files read with each store's own client (boto3; google-cloud-storage), whose
credential chain is the standard one: for S3 the environment, ~/.aws and an instance role; for GCS
GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login and the instance's service account. DALI's
webdataset reader then reads the shards and their indexes itself, with the same chains. A failure of the store
is one sentence naming the URL and the cause.

S3: both clients retry a request the store fails or does not answer, in the SDKs' "standard" mode: up to
AWS_MAX_ATTEMPTS tries (RETRIES unless the environment says otherwise, AWS_RETRY_MODE likewise), with a
backoff that doubles up to 20 s. DALI's client left to its own default gives up within seconds; with 10
tries it waits about a minute or more (docs/results.md, A store that goes away: python -m
bench.store_outage). GCS: STORAGE_EMULATOR_HOST (the client libraries' name for an emulator's address) is
passed on to DALI as DALI_GCS_ENDPOINT_URL, read without credentials (DALI_GCS_ANONYMOUS), as emulators take
none.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import re

from simclr_dali.errors import UserError

SCHEMES = ("s3://", "gs://")
RETRIES = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "10"}


def is_remote(path: str) -> bool:
    return path.startswith(SCHEMES)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of s3://BUCKET/KEY or gs://BUCKET/KEY."""
    bucket, _, key = url.split("://", 1)[1].partition("/")
    return bucket, key


def in_gcs(url: str) -> bool:
    return url.startswith("gs://")


def patient() -> None:
    """The retry policy of RETRIES, where the environment sets none, for boto3's clients and DALI's (which
    reads the environment once, when this process first reads a bucket: call it before any pipeline is built);
    a GCS emulator's address for DALI's GCS client."""
    for key, value in RETRIES.items():
        os.environ.setdefault(key, value)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.setdefault("DALI_GCS_ENDPOINT_URL", os.environ["STORAGE_EMULATOR_HOST"])
        os.environ.setdefault("DALI_GCS_ANONYMOUS", "1")


def attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS", RETRIES["AWS_MAX_ATTEMPTS"]))


@functools.lru_cache(maxsize=None)
def _s3(endpoint: str | None, _key_id: str | None):
    import boto3
    from botocore.config import Config

    # a session of its own: the credentials resolved now, not those boto3's default session cached
    patient()
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                          config=Config(connect_timeout=5, read_timeout=30))


@functools.lru_cache(maxsize=None)
def _gcs(emulator: str | None, _credentials: str | None):
    from google.cloud import storage

    patient()
    if emulator:  # the library reads STORAGE_EMULATOR_HOST itself; an emulator takes no credentials
        from google.auth.credentials import AnonymousCredentials
        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))  # reads need no project


def endpoint(url: str) -> str | None:
    """The store the environment names for `url`'s scheme (None: the cloud's own)."""
    if in_gcs(url):
        return os.environ.get("STORAGE_EMULATOR_HOST")
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def client(url: str):
    """The store's client for `url`: one per endpoint and credentials in the environment (made once: a client
    costs more than a request)."""
    if in_gcs(url):
        return _gcs(endpoint(url), os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))
    return _s3(endpoint(url), os.environ.get("AWS_ACCESS_KEY_ID"))


def where(url: str) -> str:
    """' at ENDPOINT' for a sentence, where the environment names one."""
    return f" at {endpoint(url)}" if endpoint(url) else ""


def failure(url: str, err: Exception) -> UserError:
    """The store's error as one sentence naming the URL and the cause."""
    return (_gcs_failure if in_gcs(url) else _s3_failure)(url, err)


def _s3_failure(url: str, err: Exception) -> UserError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_url(url)
    if isinstance(err, NoCredentialsError):
        return UserError(f"no credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, write "
                         f"them to ~/.aws/credentials, or run where an instance role grants them")
    if isinstance(err, EndpointConnectionError):
        return UserError(f"cannot reach the store{where(url)} to read {url}: check AWS_ENDPOINT_URL and the network")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return UserError(f"bucket {bucket} does not exist{where(url)} (reading {url})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
            return UserError(f"access to {url} is denied{where(url)} ({code}): check the credentials and the "
                             f"bucket's policy")
        if code in ("NoSuchKey", "404"):
            return UserError(f"{url} does not exist{where(url)}")
        return UserError(f"the store{where(url)} refused to read {url}: {code or err}")
    return UserError(f"cannot read {url}{where(url)}: {err}")


def _gcs_failure(url: str, err: Exception) -> UserError:
    from google.api_core import exceptions
    from google.auth.exceptions import DefaultCredentialsError

    bucket, _ = split_url(url)
    if isinstance(err, DefaultCredentialsError):
        return UserError(f"no credentials to read {url}: set GOOGLE_APPLICATION_CREDENTIALS to a key file, run "
                         f"'gcloud auth application-default login', or run where a service account grants them")
    if isinstance(err, exceptions.NotFound):
        if "object" in str(err).lower():
            return UserError(f"{url} does not exist{where(url)}")
        return UserError(f"bucket {bucket} does not exist{where(url)} (reading {url})")
    if isinstance(err, (exceptions.Forbidden, exceptions.Unauthorized)):
        return UserError(f"access to {url} is denied{where(url)} ({err.code}): check the credentials and the "
                         f"bucket's IAM policy")
    if isinstance(err, exceptions.GoogleAPIError) and getattr(err, "code", None):
        return UserError(f"the store{where(url)} refused to read {url}: {err.code} {err.message}")
    return UserError(f"cannot reach the store{where(url)} to read {url}: {type(err).__name__}")


def _store_errors(url: str) -> tuple[type[Exception], ...]:
    if in_gcs(url):
        import requests
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError
        return GoogleAPIError, GoogleAuthError, requests.RequestException
    from botocore.exceptions import BotoCoreError, ClientError
    return BotoCoreError, ClientError


def _calls(url: str):
    """Runs a store call, its failure turned into a sentence about `url`."""
    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except _store_errors(url) as err:
                raise failure(url, err) from None
        return wrapper
    return decorator


def list_matching(pattern: str) -> dict[str, tuple[int, int]]:
    """{url: (size, modification time in ns)} of the objects whose keys match `pattern`'s glob, by listing the
    prefix before its first wildcard."""
    bucket, key = split_url(pattern)
    prefix = re.split(r"[*?\[]", key, maxsplit=1)[0]

    scheme = pattern.split("://", 1)[0]

    def ns(when) -> int:
        return int(when.timestamp() * 1e9)

    @_calls(pattern)
    def listing():
        if in_gcs(pattern):
            objects = ((b.name, b.size, ns(b.updated)) for b in client(pattern).list_blobs(bucket, prefix=prefix))
        else:
            pages = client(pattern).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            objects = ((o["Key"], o["Size"], ns(o["LastModified"])) for page in pages for o in page.get("Contents", []))
        return {f"{scheme}://{bucket}/{name}": (size, when) for name, size, when in objects
                if fnmatch.fnmatchcase(name, key)}
    return listing()


def read_bytes(url: str, start: int = 0, size: int | None = None) -> bytes:
    """The object's bytes, or `size` of them from `start` (a ranged read)."""
    bucket, key = split_url(url)

    end = None if size is None else start + size - 1  # the last byte, inclusive (HTTP's ranges)

    @_calls(url)
    def read():
        if in_gcs(url):
            return client(url).bucket(bucket).blob(key).download_as_bytes(start=start or None, end=end)
        extra = {} if end is None and not start else {"Range": f"bytes={start}-{'' if end is None else end}"}
        return client(url).get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
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
                            f"simclr_dali.pipelines.index' (or write them with 'python -m simclr_dali.pipelines.pack') "
                            f"and upload each .idx beside its .tar")
        indexes.append(index)
        keys.append(listed[shard] + listed[index])
    return indexes, keys


def upload(path: str | os.PathLike, url: str) -> None:
    """A local file to the object at `url` (multipart or resumable for large files, retried)."""
    bucket, key = split_url(url)

    @_calls(url)
    def put():
        if in_gcs(url):
            client(url).bucket(bucket).blob(key).upload_from_filename(str(path))
        else:
            client(url).upload_file(str(path), bucket, key)
    put()
