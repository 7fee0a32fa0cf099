"""DALI failing on data once a run reads it, as one sentence: a file or shard member damaged after it was
screened or packed (UnreadableData), or the bucket it is read from gone (StoreLost). DALI's own words are
parsed here, and only here."""
from __future__ import annotations

import contextlib
import re

from simclr_dali.errors import UserError
from simclr_dali.pipelines.sources import Source


class UnreadableData(UserError):
    """Data that DALI cannot read met once training runs (a file or shard member damaged after it was
    screened or packed). `pipeline_failed`: DALI raised, and its pipeline is no longer valid (DALI's words):
    a command exits at once after the sentence (errors.leave), without tearing that pipeline down."""

    def __init__(self, message: str, pipeline_failed: bool):
        super().__init__(message)
        self.pipeline_failed = pipeline_failed


class StoreLost(UserError):
    """The bucket a source is read from stopped answering, and DALI's client gave up after its retries
    (pipelines.bucket.RETRIES). Its pipeline is no longer valid, as UnreadableData's; a training run adds where
    its last checkpoint is and how to go on."""
    pipeline_failed = True


def store_lost(source: Source, text: str, said: str) -> StoreLost:
    """The sentence for DALI's reader failing on a bucket (`text`, its error; `said`, the line after
    "encountered:"): the object it names and curl's cause, where DALI's words hold them."""
    from simclr_dali.pipelines import bucket

    first = source.shards[0]
    at = bucket.where(first)
    named = re.search(r"bucket=(\S+) object=(\S+?):?(?:\s|$)", text)
    url = f"{first.split('://')[0]}://{named[1]}/{named[2]}" if named else source.name
    network = re.search(r"curlCode: \d+, [^;]*", text)
    if network:
        tries = "" if bucket.in_gcs(first) else f" after {bucket.attempts()} tries (AWS_MAX_ATTEMPTS)"
        return StoreLost(f"the store{at} stopped answering while DALI read {url} ({network[0].strip()}), and its "
                         f"client gave up{tries}")
    return StoreLost(f"the store{at} refused DALI's read of {url} ({said.rstrip(':')})")


def check_again(source: Source) -> str:
    return f"python -m simclr_dali.pipelines.{'pack' if source.shards is not None else 'verify'}"


@contextlib.contextmanager
def dali_errors(feeder, candidates=lambda: ()):
    """DALI raising, as a pipeline is built or run, is one sentence, never DALI's traceback: on data it cannot
    decode (truncated, damaged past its signature), naming the file or shard member found among `candidates()`
    (the paths or members it may have been reading), with DALI's own words where none is found; on a bucket
    whose reads failed past the retries, StoreLost. Other build errors (a checkpoint's state refused) pass."""
    try:
        yield
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        if not lines or not lines[0].startswith(("Critical error in pipeline", "Critical error when building")):
            raise
        source = feeder.source
        where = next((line.rstrip(",") for line in lines if line.startswith("Error in")), "DALI")
        said = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else lines[-1]
        if source.remote and "readers." in where:  # the reader's, not the decoder's: the store failed it
            raise store_lost(source, " ".join(lines), said) from None
        if not lines[0].startswith("Critical error in pipeline"):  # a build refused (a checkpoint's state)
            raise
        found = first_unreadable(candidates())
        if found is not None:
            name, reason = found
            raise UnreadableData(f"{name}, read from {source.name}, is {reason}: the data changed "
                                 f"after it was checked; check it again with {check_again(source)}", True) from None
        raise UnreadableData(f"DALI could not read a batch of {source.name} ({where}: {said}): the data changed "
                             f"after it was checked; check it again with {check_again(source)}", True) from None


def first_unreadable(candidates, check=None) -> tuple[str, str] | None:
    """(name, reason) of the first candidate DALI cannot decode: a file path, or a (name, read(n bytes)) pair
    for a shard member; `check` (on the first bytes) in place of a whole decode (verify.check_bytes)."""
    from simclr_dali.pipelines.verify import HEAD_BYTES, check_bytes, check_image

    for candidate in candidates:
        if isinstance(candidate, str):
            name = candidate
            if check is None:
                reason = check_image(candidate)
            else:
                with open(candidate, "rb") as f:
                    reason = check(f.read(HEAD_BYTES))
        else:
            name, read = candidate
            reason = check_bytes(read(None)) if check is None else check(read(HEAD_BYTES))
        if reason is not None:
            return name, reason
    return None
