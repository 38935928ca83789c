"""Full disks and read-only folders, on a small tmpfs mounted by the test (skipped, with the
reason, where mounting is not permitted); one training per run folder."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillsr.checkpoint import read_state_dict, save_model
from distillsr.cli.main import main
from distillsr.engine import TrainError, load_config, train
from distillsr.engine import state as st
from distillsr.io import FileWriteError
from distillsr.registry import create_model
from train_helpers import TINY, make_paired, tiny_config

QUIET = dict(log=lambda m: None)


def _mount(folder: Path, size: str, *extra: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({(p.stderr or p.stdout).strip()}); needs root or CAP_SYS_ADMIN")


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "mnt"
    _mount(mnt, "2m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up to ``leave`` free bytes; returns the filler file."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        block = b"\0" * 4096
        try:
            while True:
                free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                if free <= leave:
                    break
                f.write(block[:min(4096, free - leave)] if free - leave < 4096 else block)
                f.flush()
        except OSError:
            pass
    return filler


def _temps(folder: Path):
    return [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".part")]


def _cfg(tmp, data, **over):
    return load_config(None, tiny_config(tmp, data, **over))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_paired(root, n=3, size=48, scale=2)
    return root


def test_full_disk_during_a_checkpoint_write(small_fs, data, tmp_path):
    over = {"train.iters": 8, "train.ckpt_every": 2, "train.log_every": 100}
    ref = train(_cfg(tmp_path, data, name="ref", **over), **QUIET)

    def fill_at_6(trainer, done):  # the disk fills up just before the checkpoint at 6
        if done == 6:
            _fill(small_fs)

    cfg = _cfg(small_fs, data, name="run", **over)
    with pytest.raises(FileWriteError, match=r"iter_00000006.*no space left on device") as e:
        train(cfg, callbacks=[fill_at_6], **QUIET)
    assert "no partial file" in str(e.value)
    ck = small_fs / "runs" / "run" / "checkpoints"
    assert [i for i, _ in st.list_checkpoints(ck)] == [2, 4]
    assert st.find_resumable(ck, log=print)["iteration"] == 4  # the previous checkpoint is intact
    assert not _temps(small_fs)
    (small_fs / "filler.bin").unlink()
    r = train(cfg, resume="auto", **QUIET)
    assert r.completed
    a, _ = read_state_dict(ref.final_weights)
    b, _ = read_state_dict(r.final_weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_command_on_a_full_disk_is_a_one_line_error(small_fs, data, tmp_path, capsys):
    _fill(small_fs)
    config = tmp_path / "tiny.yaml"
    config.write_text("seed: 3\n")
    code = main(["train", "--config", str(config), *tiny_config(small_fs, data, name="full")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert "no space left on device" in err or "cannot be written" in err, err


def _noise_images(folder: Path, n: int, size: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"n{i}.png")


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    return save_model(create_model(TINY, 2, channels=8), tmp_path / "tiny.safetensors")


def test_full_disk_during_upscale_outputs(small_fs, tmp_path, weights, capsys):
    src = tmp_path / "in"
    _noise_images(src, 6, 96)  # each output (192 x 192 noise) is about 110 KB
    out = small_fs / "out"
    _fill(small_fs, leave=300_000)
    code = main(["upscale", str(src), "-o", str(out), "--weights", str(weights), "--scale", "2",
                 "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "no space left on device" in err and "Traceback" not in err, err
    written = sorted(p for p in out.glob("*.png"))
    assert 0 < len(written) < 6
    for p in written:  # what is there is whole
        with Image.open(p) as im:
            im.load()
            assert im.size == (192, 192)
    assert not _temps(small_fs)


def test_read_only_output_folder_is_refused_before_any_work(tmp_path, capsys, data):
    ro = tmp_path / "ro"
    _mount(ro, "1m")
    try:
        (ro / "runs" / "old").mkdir(parents=True)  # a run folder made before the remount
        p = subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot remount read-only here ({p.stderr.strip()})")
        src = tmp_path / "in"
        _noise_images(src, 1, 8)
        # the weights named do not exist: the output folder is refused before they would be read
        code = main(["upscale", str(src), "-o", str(ro / "out"), "--weights", str(tmp_path / "none.safetensors")])
        err = capsys.readouterr().err
        assert code == 2 and "cannot be written" in err and "read-only" in err, err
        assert "none.safetensors" not in err
        for name in ("run", "old"):
            with pytest.raises(TrainError, match=f"{name} cannot be written.*read-only"):
                train(_cfg(ro, data, name=name), **QUIET)
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_two_trainings_sharing_a_run_folder_are_refused(tmp_path, data):
    refused = []

    def second(trainer, done):
        if done == 3:
            with pytest.raises(TrainError, match="in use by another training") as e:
                train(_cfg(tmp_path, data, **{"train.iters": 6}), resume="auto", **QUIET)
            refused.append(str(e.value))

    r = train(_cfg(tmp_path, data, **{"train.iters": 6}), callbacks=[second], **QUIET)
    assert r.completed and len(refused) == 1
    # once the first has ended, the folder is free again
    r2 = train(_cfg(tmp_path, data, **{"train.iters": 8}), resume="auto", **QUIET)
    assert r2.completed and r2.start_iter == 6
