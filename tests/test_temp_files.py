"""The temp files of distillsr.io.atomic_write: named with the writer's pid and locked while
written, so that a run clears those of killed writers and never one another process is
writing."""
import fcntl
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from distillsr import io as imgio


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temp_name_carries_the_pid_and_is_locked_while_written(tmp_path):
    seen = {}

    def write(tmp):
        seen["name"] = os.path.basename(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the writer holds the lock
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert imgio.remove_stale_temp_files(tmp_path) == []
        open(tmp, "w").write("x")

    imgio.atomic_write(tmp_path / "a.txt", write)
    assert seen["name"].startswith(f".a.txt.{os.getpid()}.") and seen["name"].endswith(".part")
    assert (tmp_path / "a.txt").read_text() == "x"


def test_only_stale_temp_files_of_our_naming_are_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".p16.png.{dead}.ofu4wfci.part"
    locked = tmp_path / f".q.png.{dead}.abcd1234.part"   # dead pid in the name, but someone holds its lock
    live = tmp_path / f".r.png.{os.getppid()}.abcd1234.part"  # a running process's
    legacy_new = tmp_path / ".s.png.ofu4wfci.part"      # no pid (older versions): kept while recent
    legacy_old = tmp_path / ".t.png.ofu4wfci.part"
    others = [tmp_path / ".u.png.part", tmp_path / "v.png.1.abcdefgh.part", tmp_path / ".w.png.12.abc.part",
              tmp_path / "x.png"]
    for p in [stale, locked, live, legacy_new, legacy_old, *others]:
        p.write_bytes(b"partial")
    old = time.time() - imgio.STALE_TEMP_SECONDS - 60
    os.utime(legacy_old, (old, old))
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = imgio.remove_stale_temp_files(tmp_path)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([stale, legacy_old])
    assert all(p.exists() for p in [locked, live, legacy_new, *others])


def test_a_temp_file_being_written_by_another_process_survives_a_batch(tmp_path):
    """Another process writes slowly into the folder while a batch starts there: its temp file
    is left alone and its output lands whole."""
    code = ("import sys, time\nfrom distillsr import io\n"
            "def w(tmp):\n    open(tmp, 'wb').write(b'a' * 1000)\n    print('writing', flush=True)\n"
            "    time.sleep(3)\n    open(tmp, 'ab').write(b'b')\n"
            "io.atomic_write(sys.argv[1], w)\n")
    env = dict(os.environ, PYTHONPATH=str(imgio.Path(imgio.__file__).parents[1]))
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "slow.bin")], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    temps = [x for x in tmp_path.iterdir() if x.name.endswith(".part")]
    assert len(temps) == 1
    assert imgio.remove_stale_temp_files(tmp_path) == []
    assert p.wait(timeout=60) == 0
    assert (tmp_path / "slow.bin").read_bytes() == b"a" * 1000 + b"b"


def test_a_16bit_tiff_claiming_a_huge_size_is_refused_before_decoding(tmp_path):
    """Found by reading the code: the 16-bit TIFF path checked the pixel limit after decoding."""
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "bomb.tif"
    # 16-bit grey + alpha: a layout Pillow cannot open, read by tifffile
    tifffile.imwrite(path, np.zeros((4, 4, 2), np.uint16), photometric="minisblack", extrasamples=["unassalpha"])
    with tifffile.TiffFile(path) as tf:
        tags = tf.pages[0].tags
        offsets = [tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
        kinds = [tags[name].dtype for name in ("ImageWidth", "ImageLength")]
    data = bytearray(path.read_bytes())
    for off, kind in zip(offsets, kinds):
        fmt = "<I" if int(kind) == 4 else "<H"
        data[off:off + (4 if fmt == "<I" else 2)] = (60000).to_bytes(4 if fmt == "<I" else 2, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(imgio.ImageReadError, match=r"bomb\.tif: 60000x60000 .* more than the limit"):
        imgio.read_image(path)
