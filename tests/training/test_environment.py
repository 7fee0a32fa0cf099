"""Environment variables the trainer reads or hands on (accelerate's, torch.distributed's, ours) are checked
before any work: a value their reader would misread is one sentence naming the variable, its value and what
it accepts."""
import pytest
from conftest import make_folder, train_here

from simclr_dali.environment import check_environment
from simclr_dali.errors import UserError
from simclr_dali.pipelines.sources import load_source

BAD = [  # (variables, the sentence's start, what it says is accepted), written by hand
    ({"ACCELERATE_MIXED_PRECISION": "bfloat16"}, "ACCELERATE_MIXED_PRECISION is 'bfloat16'", "one of no, fp16, bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "BF16"}, "ACCELERATE_MIXED_PRECISION is 'BF16'", "one of no, fp16, bf16"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "ACCELERATE_MIXED_PRECISION is 'fp8'", "one of no, fp16, bf16"),
    ({"ACCELERATE_USE_CPU": "maybe"}, "ACCELERATE_USE_CPU is 'maybe'", "one of 1, 0, true, false"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE is 'abc'", "a whole number of at least 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE is '0'", "a whole number of at least 1"),
    ({"RANK": "-1"}, "RANK is '-1'", "a whole number of at least 0"),
    ({"LOCAL_RANK": "1.5"}, "LOCAL_RANK is '1.5'", "a whole number of at least 0"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT is '99999'", "a whole number from 1 to 65535"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT is 'http'", "a whole number from 1 to 65535"),
    ({"MASTER_ADDR": "host name"}, "MASTER_ADDR is 'host name'", "a host name or address"),
    ({"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS is '0'", "a whole number of at least 1"),
    ({"XDG_CACHE_HOME": "cache"}, "XDG_CACHE_HOME is 'cache'", "an absolute path"),
]


@pytest.mark.parametrize("variables,start,accepts", BAD, ids=[next(iter(v)) + "=" + next(iter(v.values()))
                                                               for v, _, _ in BAD])
def test_a_value_its_reader_would_misread_is_one_sentence(variables, start, accepts):
    with pytest.raises(UserError) as err:
        check_environment(variables)
    assert str(err.value).startswith(f"environment variable {start}, which is not accepted: it takes {accepts}")
    assert str(err.value).endswith("(or unset it)")


def test_ranks_must_fit_their_counts():
    with pytest.raises(UserError, match=r"^environment variable RANK is 4, but WORLD_SIZE is 4: a rank counts from 0 "
                                        r"to 3$"):
        check_environment({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match=r"^environment variable LOCAL_RANK is 8, but LOCAL_WORLD_SIZE is 8"):
        check_environment({"LOCAL_RANK": "8", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"})
    with pytest.raises(UserError, match=r"^environment variable LOCAL_WORLD_SIZE is 8, more than WORLD_SIZE 4"):
        check_environment({"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "4"})


def test_what_accelerate_launch_and_torchrun_set_passes():
    check_environment({"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "False", "WORLD_SIZE": "16",
                       "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1", "GROUP_RANK": "1",
                       "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "OMP_NUM_THREADS": "4",
                       "XDG_CACHE_HOME": "/home/u/.cache"})
    check_environment({})


def test_train_checks_the_environment_before_anything_else(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bfloat16")  # accelerate alone would train in fp32
    with pytest.raises(SystemExit) as stop:
        train_here("--data", "digits", "--out", str(tmp_path / "run"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: environment variable ACCELERATE_MIXED_PRECISION is 'bfloat16'")
    assert not (tmp_path / "run").exists()


def test_a_folder_matched_as_a_shard_is_named_as_a_folder(tmp_path):
    make_folder(tmp_path / "data" / "images.tar")  # a folder whose name ends in .tar
    with pytest.raises(UserError) as err:
        load_source(f"wds:{tmp_path}/data/*.tar", "train", f"wds:{tmp_path}/data/*.tar")
    assert str(err.value).startswith(f"{tmp_path / 'data' / 'images.tar'}, which '{tmp_path}/data/*.tar' matches, is "
                                     f"a folder, not a tar shard: ")
