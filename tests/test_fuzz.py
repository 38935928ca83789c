"""Property-based fuzzing (Hypothesis) of everything that reads what users hand over: image
files, checkpoints, config overrides; and write_image round trips. Each target runs 300
derandomized cases here (benchmarks/fuzz.py runs them for minutes). Inputs that once broke
a property are kept as explicit examples."""
import resource
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings

import fuzz_targets as ft
from distillsr.checkpoint import CheckpointError, load_model
from distillsr.engine.config import ConfigError, load_config

CASES = 300
FUZZ = settings(max_examples=CASES, derandomize=True, database=None, deadline=timedelta(seconds=10),
                suppress_health_check=list(HealthCheck), print_blob=True)
# a case may not raise the process's peak memory by more than this (a decompression bomb,
# a header that claims 2^62 bytes...)
MAX_GROWTH_KB = 1_500_000


@pytest.fixture
def memory_bound():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < MAX_GROWTH_KB, f"peak memory grew by {grown / 1024:.0f} MiB during the fuzz run"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_read_image_random_bytes(folder, memory_bound):
    @FUZZ
    @given(ft.random_bytes)
    def run(data):
        ft.check_read(data, folder / "case.img")
    run()


def test_read_image_mutated_files(folder, memory_bound):
    @FUZZ
    @given(ft.mutated_image())
    def run(data):
        ft.check_read(data, folder / "case.img")
    run()


def test_write_image_round_trips(folder, memory_bound):
    @FUZZ
    @given(ft.image_to_write())
    def run(case):
        ft.check_roundtrip(case, folder)
    run()


def test_load_model_mutated_safetensors(folder, memory_bound):
    seed = ft.safetensors_seed(folder)
    sentinel = folder / "sentinel"

    @FUZZ
    @given(ft.safetensors_edit(seed))
    def run(data):
        ft.check_load(data, folder / "case.safetensors", sentinel)
    run()


def test_load_model_mutated_torch_files(folder, memory_bound):
    seeds = ft.torch_seeds()
    sentinel = folder / "sentinel"

    @FUZZ
    @given(ft.torch_file_edit(seeds, sentinel))
    def run(data):
        ft.check_load(data, folder / "case.pt", sentinel)
    run()


def test_config_overrides():
    @FUZZ
    @given(ft.overrides())
    @example(["train.iters=.inf"])  # found by fuzzing: OverflowError
    @example(["train.iters=.nan"])  # found by fuzzing: ValueError
    @example(["optim.lr=.nan"])     # accepted, and trained to NaN
    def run(over):
        ft.check_config(over)
    run()


@pytest.mark.parametrize("key,value", [  # found by fuzzing: ValueError, TypeError, JSONDecodeError
    ("distillsr.scale", ""), ("distillsr.scale", "x"), ("distillsr.options", "{"),
    ("distillsr.options", "[]"), ("distillsr.pixel_range", "2"), ("distillsr.pixel_range", "[1]"),
    ("distillsr.options", '{"channels": 100000}'),  # would allocate 360 GB without the shape check
])
def test_bad_metadata_is_a_checkpoint_error_naming_the_file(tmp_path, key, value):
    import json
    import struct
    data = ft.safetensors_seed(tmp_path)
    n = struct.unpack("<Q", data[:8])[0]
    doc = json.loads(data[8:8 + n])
    doc["__metadata__"][key] = value
    h = json.dumps(doc).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + data[8 + n:])
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(path)


def test_non_finite_numbers_in_overrides_are_refused():
    for over in ("train.iters=.inf", "train.iters=.nan", "optim.lr=.nan", "optim.lr=-.inf", "sched.gamma=1e400"):
        with pytest.raises(ConfigError, match=over.split("=")[0]):
            load_config(None, [over])


def test_the_injected_payloads_do_run_under_a_plain_unpickler(tmp_path):
    """The malicious pickles of the torch-file target are real: a plain pickle.loads runs them
    (so the fuzz target's 'sentinel never made' is a meaningful check)."""
    import pickle
    sentinel = tmp_path / "sentinel"
    for proto in (0, 2, 4):
        for payload in ft._payloads(sentinel)[:5]:
            pickle.loads(ft._inject(b"", ft._global_call(*payload, proto=proto), "whole"))
            assert sentinel.exists(), (payload, proto)
            sentinel.unlink()
