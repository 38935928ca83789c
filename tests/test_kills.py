"""SIGKILL at random moments: ``distillsr train`` (checkpoint writes included) resumes with
``--resume auto`` and ends bitwise equal to a run never interrupted; a folder ``upscale``
never shows a partial output and its rerun completes the set, identical, without stale temp
files; ``weights pull`` killed mid-download completes on the next run with a verified file.
The commands run in forked processes (tests/kill_helpers.py)."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from distillsr.checkpoint import read_state_dict, save_model
from distillsr.engine import state as st
from distillsr.io import sha256_file
from distillsr.pretrained import load_pretrained
from distillsr.registry import create_model
from http_helpers import FileServer
from kill_helpers import ForkServer
from train_helpers import TINY, make_paired, smooth_image, tiny_config

ITERS = 12


def _temp_files(folder: Path):
    return sorted(p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".part"))


def _same_tree(a, b, where="") -> None:
    """Equal nested dicts / lists of tensors and plain values (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _same_weights(a: Path, b: Path) -> None:
    """Bitwise the same tensors and the same metadata (safetensors orders its header freely)."""
    sa, ma = read_state_dict(a)
    sb, mb = read_state_dict(b)
    _same_tree(sa, sb, a.name)
    assert ma == mb, (ma, mb)


def _check_committed(ckpt_dir: Path) -> None:
    """Every checkpoint whose state file exists is complete (its weights match their hashes)."""
    for _, path in st.list_checkpoints(ckpt_dir):
        st.read_state(path)


def test_training_killed_at_random_moments_resumes_bitwise_exact(tmp_path):
    make_paired(tmp_path / "data", n=3, size=48, scale=2)
    config = tmp_path / "tiny.yaml"
    config.write_text("seed: 3\n")

    def argv(name):
        over = tiny_config(tmp_path, tmp_path / "data", name=name, **{
            "train.iters": ITERS, "train.ckpt_every": 2, "train.keep_ckpts": 2, "train.threads": 1})
        return ["train", "--config", str(config), *over, "--resume", "auto"]

    kills, inside_write, chains = 0, 0, 0
    with ForkServer() as fs:
        ref = fs.run(argv("ref"), slow_rename=0.05, log=tmp_path / "ref.log")
        assert ref["code"] == 0, (tmp_path / "ref.log").read_text()[-3000:]
        span = ref["seconds"]
        seed = 0
        while (kills < 24 or chains < 3) and chains < 12:  # chains of kills, each ended by a clean run
            rng = random.Random(seed)
            name = f"s{seed}"
            seed += 1
            ckpt = tmp_path / "runs" / name / "checkpoints"
            log = tmp_path / f"{name}.log"
            for _ in range(6):
                done = max([i for i, _ in st.list_checkpoints(ckpt)], default=0)
                if done >= ITERS:
                    break
                # a moment within what is left of the run (the reference's time, pro rata)
                left = span * (ITERS - done) / ITERS
                r = fs.run(argv(name), kill_after=rng.uniform(0.02, max(0.1, 0.8 * left)), slow_rename=0.05,
                           log=log)
                if not r["killed"]:
                    assert r["code"] == 0, log.read_text()[-3000:]
                    continue
                kills += 1
                inside_write += bool(_temp_files(ckpt)) if ckpt.is_dir() else 0
                _check_committed(ckpt)
            r = fs.run(argv(name), log=log)
            assert r["code"] == 0 and not r["killed"], log.read_text()[-3000:]
            chains += 1
            assert not _temp_files(tmp_path / "runs" / name), "a temp file outlived the resumed run"
            a, b = tmp_path / "runs" / "ref", tmp_path / "runs" / name
            last = f"iter_{ITERS:08d}"
            for f in ("model.safetensors", f"checkpoints/{last}.safetensors", f"checkpoints/{last}_ema.safetensors"):
                _same_weights(a / f, b / f)
            sa = torch.load(a / "checkpoints" / f"{last}.state.pt", weights_only=True)
            sb = torch.load(b / "checkpoints" / f"{last}.state.pt", weights_only=True)
            # not "sha256" (safetensors orders its header freely) nor "rng": the global torch RNG is
            # drawn by each new DataLoader iterator, which no training result depends on
            for key in ("optimizer", "iteration", "best", "samples_seen"):
                _same_tree(sa[key], sb[key], key)
    print(f"training: reference run {span:.2f} s; {kills} kills over {chains} runs, {inside_write} inside a "
          "checkpoint write")
    assert kills >= 24 and chains >= 3 and inside_write >= 3, (kills, chains, inside_write)


@pytest.fixture
def upscale_setup(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(smooth_image(rng, 40 + 4 * i, 36)).save(src / f"p{i:02d}.png")
    torch.manual_seed(0)
    weights = save_model(create_model(TINY, 2, channels=8), tmp_path / "tiny.safetensors")

    def argv(out):
        return ["upscale", str(src), "-o", str(out), "--weights", str(weights), "--scale", "2",
                "--device", "cpu", "--no-progress"]
    return src, argv


def _images(folder: Path):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".png" and not p.name.startswith(".")}


def test_upscale_killed_at_random_moments_never_shows_a_partial_file(tmp_path, upscale_setup):
    src, argv = upscale_setup
    with ForkServer() as fs:
        ref = fs.run(argv(tmp_path / "ref"), slow_rename=0.1, log=tmp_path / "ref.log")
        assert ref["code"] == 0, (tmp_path / "ref.log").read_text()[-3000:]
        expected = _images(tmp_path / "ref")
        assert len(expected) == 8
        span = ref["seconds"]
        rng = random.Random(7)
        kills, temp_left, out = 0, 0, tmp_path / "out"
        attempts = 0
        while kills < 12 and attempts < 40:
            attempts += 1
            r = fs.run(argv(out), kill_after=rng.uniform(0.01, span), slow_rename=0.1, log=tmp_path / "run.log")
            if not r["killed"]:
                assert r["code"] == 0
                for p in out.glob("*.png"):  # start the set again
                    p.unlink()
                continue
            kills += 1
            temp_left += bool(_temp_files(out)) if out.is_dir() else 0
            if out.is_dir():
                for name, data in _images(out).items():  # whatever is visible is whole
                    assert data == expected[name], f"{name}: partial or different output after a kill"
        r = fs.run(argv(out), log=tmp_path / "run.log")
        assert r["code"] == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert _images(out) == expected
    assert not _temp_files(out), "stale temp files were left in the output folder"
    print(f"upscale: reference run {span:.2f} s; {kills} kills, {temp_left} left a temp file behind, all cleared by the rerun")
    assert kills >= 12 and temp_left >= 2, (kills, temp_left)


def test_two_upscales_into_one_folder_never_tear_a_file(tmp_path, upscale_setup):
    src, argv = upscale_setup
    out = tmp_path / "shared_out"
    with ForkServer() as fs:
        ref = fs.run(argv(tmp_path / "ref"), log=tmp_path / "ref.log")
        assert ref["code"] == 0
        for _ in range(3):  # both write every output, at the same moments
            codes = fs.run_together([argv(out) + ["--overwrite"]] * 2, log=tmp_path / "two.log")
            assert codes == [0, 0], (tmp_path / "two.log").read_text()[-3000:]
    expected = _images(tmp_path / "ref")
    got = _images(out)
    assert got == expected
    for name in got:
        with Image.open(out / name) as im:
            im.load()
    assert not _temp_files(out)


def test_weights_pull_killed_mid_download_completes_verified(tmp_path, monkeypatch):
    from distillsr import releases
    rel = releases.get_release("fdiwn-release", 4)
    data = shared_path("weights", "official", "fdiwn_x4.pt").read_bytes()
    srv = FileServer()
    srv.files[rel.url[len("https://github.com/"):]] = data
    srv.delay = 0.05  # about 2.3 s for the file (written to disk 1 MiB at a time)
    monkeypatch.setenv("DISTILLSR_WEIGHTS_MIRROR", srv.url.rstrip("/"))
    argv = ["weights", "pull", "fdiwn-release", "--scale", "4"]
    dest = releases._download_path(rel)
    try:
        with ForkServer() as fs:
            rng = random.Random(3)
            part = dest.with_name(dest.name + ".part")
            partial = kills = attempts = 0
            while kills < 3 and attempts < 10:
                attempts += 1
                r = fs.run(argv, kill_after=rng.uniform(0.6, 2.0), log=tmp_path / "pull.log")
                if not r["killed"]:  # the rest of a resumed download came in before the kill: start again
                    assert r["code"] == 0, (tmp_path / "pull.log").read_text()[-2000:]
                    assert dest.read_bytes() == data
                    dest.unlink()
                    for f in releases.cache_weights_dir().rglob("*"):
                        if f.is_file():
                            f.unlink()
                    continue
                kills += 1
                partial += part.is_file() and 0 < part.stat().st_size < len(data)
                assert not dest.exists() or dest.read_bytes() == data  # never a partial file under its name
                assert not any(releases.cache_weights_dir().glob("*.safetensors")) if \
                    releases.cache_weights_dir().exists() else True
            r = fs.run(argv, log=tmp_path / "pull.log")
            assert r["code"] == 0, (tmp_path / "pull.log").read_text()[-2000:]
            assert kills >= 3 and partial >= 1, (kills, partial, "no kill landed mid-download")
    finally:
        srv.close()
    assert sha256_file(dest) == rel.sha256
    assert any(h for h in srv.requests[1:]), ("no rerun continued the partial download (Range request)",
                                              srv.requests, (tmp_path / "pull.log").read_text()[-2000:])
    assert load_pretrained("fdiwn-release", 4).scale == 4
