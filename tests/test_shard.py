"""Collections shared between processes (engine.shard): the share of each rank, and
``torchrun --nproc_per_node 2 -m distillsr upscale`` on CPU: every output written once,
identical to one process, a merged summary, a rerun that skips, a failure in any rank
failing the run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from distillsr.cli.main import main
from distillsr.engine.shard import Ranks, owner, rank_device, shard_key, split_cpu_threads
from distillsr.io import write_image


def test_ranks_from_env():
    assert Ranks.from_env({}) == Ranks(0, 1, 0, 1)
    r = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (r.rank, r.world, r.local_rank, r.local_world, r.distributed) == (3, 4, 1, 2, True)
    with pytest.raises(ValueError, match="RANK=4 with WORLD_SIZE=4"):
        Ranks.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        Ranks.from_env({"WORLD_SIZE": "two"})


def test_each_input_has_one_owner_and_outputs_that_may_collide_share_it():
    from pathlib import Path
    keys = [shard_key(Path(f"sub/img{i}.png")) for i in range(200)]
    for world in (1, 2, 3, 8):
        owners = [owner(k, world) for k in keys]
        assert all(0 <= o < world for o in owners)
        assert owners == [owner(k, world) for k in keys]  # the same in every process
        assert set(owners) == set(range(world))            # everyone gets work
    assert shard_key(Path("a/b.png")) == shard_key(Path("a/b.jpg")) != shard_key(Path("b.png"))


def test_device_and_threads_per_rank():
    one = Ranks()
    assert rank_device("auto", one) == "auto"
    assert rank_device("cpu", Ranks(1, 2, 1, 2)) == "cpu"
    import torch
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert split_cpu_threads(Ranks(0, 2, 0, 2)) == max(1, cores // 2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _torchrun(src, out, summary, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "distillsr", "upscale", str(src), "-o", str(out), "--model", "bicubic", "--scale", "2",
           "--tile", "0", "--no-progress", "--summary", str(summary), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_each_output_once_identical_merged_rerun_skips(tmp_path):
    src = tmp_path / "in"
    rng = np.random.default_rng(0)
    for i in range(10):
        write_image(src / ("sub" if i % 3 == 0 else "") / f"img{i}.png",
                    rng.integers(0, 256, (12 + i, 16, 3), dtype=np.uint8))
    # one process, as the reference
    assert main(["upscale", str(src), "-o", str(tmp_path / "one"), "--model", "bicubic", "--scale", "2",
                 "--tile", "0", "--no-progress", "--recursive"]) == 0
    r = _torchrun(src, tmp_path / "two", tmp_path / "summary.json", "--recursive")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["ok"] is True
    outputs = [e["output"] for e in summary["done"]]
    assert len(outputs) == 10 and len(set(outputs)) == 10          # each output written exactly once
    assert {e["rank"] for e in summary["done"]} == {0, 1}          # by both processes
    ref = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.png"))
    got = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.png"))
    assert got == ref and len(ref) == 10
    for rel in ref:
        assert (tmp_path / "two" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes()
    assert "10 upscaled" in r.stdout and "2 processes" in r.stdout and r.stdout.count("done:") == 1
    mtimes = {rel: (tmp_path / "two" / rel).stat().st_mtime_ns for rel in ref}

    # a rerun skips all ten; a broken input added meanwhile fails the whole run, whichever rank had it
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = _torchrun(src, tmp_path / "two", tmp_path / "summary.json", "--recursive")
    assert r.returncode != 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (len(summary["done"]), len(summary["skipped"]), summary["ok"]) == (0, 10, False)
    assert [os.path.basename(e["input"]) for e in summary["failed"]] == ["broken.png"]
    assert {rel: (tmp_path / "two" / rel).stat().st_mtime_ns for rel in ref} == mtimes
