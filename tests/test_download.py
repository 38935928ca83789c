"""Resumable downloads against a local HTTP server (127.0.0.1) that supports Range and can drop connections."""
import hashlib
import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from distillsr.data import download as dl
from distillsr.data.download import DownloadError, download_file, extract_archive
from http_helpers import FileServer


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


def _png(arr) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def _zip(entries) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return b.getvalue()


def _archive():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    lr = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    return _zip({"benchmark/Set5/HR/baby.png": _png(hr),
                 "benchmark/Set5/LR_bicubic/X2/babyx2.png": _png(lr),
                 "benchmark/Set5/notes.txt": rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()}), hr


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


Q = dict(progress=False, log=lambda m: None)


def test_interrupted_transfer_resumes_with_range_and_verifies(server, tmp_path):
    blob, _ = _archive()
    server.files["benchmark.zip"] = blob
    server.drop_next = len(blob) * 2 // 5
    dest = tmp_path / "benchmark.zip"
    with pytest.raises(DownloadError, match="run again to resume"):
        download_file(server.url + "benchmark.zip", dest, size=len(blob), sha256=_sha(blob), retries=0, **Q)
    part = tmp_path / "benchmark.zip.part"
    assert not dest.exists() and part.stat().st_size == len(blob) * 2 // 5
    # the rerun asks only for the rest and completes
    download_file(server.url + "benchmark.zip", dest, size=len(blob), sha256=_sha(blob), retries=0, **Q)
    assert server.requests == [None, f"bytes={len(blob) * 2 // 5}-"]
    assert dest.read_bytes() == blob and not part.exists()
    # a third call finds the checked file and downloads nothing
    download_file(server.url + "benchmark.zip", dest, sha256=_sha(blob), **Q)
    assert len(server.requests) == 2


def test_dropped_connection_is_retried_in_the_same_call(server, tmp_path):
    blob = bytes(range(256)) * 1000
    server.files["f.bin"] = blob
    server.drop_next = 100_000
    msgs = []
    download_file(server.url + "f.bin", tmp_path / "f.bin", sha256=_sha(blob), md5=hashlib.md5(blob).hexdigest(),
                  retries=2, progress=False, log=msgs.append)
    assert (tmp_path / "f.bin").read_bytes() == blob
    assert server.requests == [None, "bytes=100000-"] and any("retrying (1/2)" in m for m in msgs)


def test_checksum_mismatch_deletes_and_fails(server, tmp_path):
    server.files["f.bin"] = b"x" * 5000
    with pytest.raises(DownloadError, match="sha256 .* does not match.*deleted"):
        download_file(server.url + "f.bin", tmp_path / "f.bin", sha256="0" * 64, **Q)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="size 5000 bytes, expected 4999"):
        download_file(server.url + "f.bin", tmp_path / "f.bin", size=4999, **Q)


def test_server_without_range_restarts_and_complete_part_is_accepted(server, tmp_path):
    blob = b"abc" * 10_000
    server.files["f.bin"] = blob
    server.support_range = False
    (tmp_path / "f.bin.part").write_bytes(b"zzz")  # stale partial data
    download_file(server.url + "f.bin", tmp_path / "f.bin", sha256=_sha(blob), **Q)
    assert (tmp_path / "f.bin").read_bytes() == blob
    # killed after the last byte but before the rename: the server answers 416 and the part is used
    server.support_range = True
    (tmp_path / "f.bin").rename(tmp_path / "g.bin.part")
    server.files["g.bin"] = blob
    download_file(server.url + "g.bin", tmp_path / "g.bin", sha256=_sha(blob), **Q)
    assert server.requests[-1] == f"bytes={len(blob)}-" and (tmp_path / "g.bin").read_bytes() == blob


def test_missing_file_is_a_clear_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url + "nope.zip", tmp_path / "nope.zip", **Q)


def test_extract_refuses_paths_outside_the_target(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip({"../evil.txt": b"x"}))
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(bad, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "evil.txt").exists()


def test_cli_download_benchmark_from_mirror(server, tmp_path, monkeypatch, capsys):
    blob, hr = _archive()
    server.files["benchmark.zip"] = blob
    server.drop_next = len(blob) // 2  # first attempt dies half-way, the command's retry resumes it
    spec = dl.DATASETS["benchmark"]
    monkeypatch.setitem(dl.DATASETS, "benchmark", dl.DatasetSpec(
        spec.name, "http://invalid.example/", {"benchmark": dl.Remote("benchmark.zip", size=len(blob),
                                                                      sha256=_sha(blob))},
        spec.default_parts, spec.description, spec.benchmark_root))
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    from distillsr.cli.main import main
    rc = main(["data", "download", "benchmark", "--to", str(tmp_path / "d"), "--mirror", server.url,
               "--scales", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert server.requests == [None, f"bytes={len(blob) // 2}-"]
    root = tmp_path / "d" / "benchmark" / "Set5"
    assert np.array_equal(np.asarray(Image.open(root / "HR" / "baby.png")), hr)
    assert (root / "LR_bicubic" / "X2" / "babyx2.png").is_file()
    assert (tmp_path / "d" / "archives" / "benchmark.zip").read_bytes() == blob
    # rerun: nothing downloaded or extracted again
    rc = main(["data", "download", "benchmark", "--to", str(tmp_path / "d"), "--mirror", server.url,
               "--scales", "2", "--quiet"])
    assert rc == 0 and len(server.requests) == 2
    assert "already extracted" in capsys.readouterr().out
    # a wrong checksum is an error with a non-zero exit
    monkeypatch.setitem(dl.DATASETS, "benchmark", dl.DatasetSpec(
        spec.name, server.url, {"benchmark": dl.Remote("benchmark.zip", sha256="1" * 64)},
        spec.default_parts, spec.description, spec.benchmark_root))
    rc = main(["data", "download", "benchmark", "--to", str(tmp_path / "e"), "--quiet"])
    assert rc == 1 and "does not match" in capsys.readouterr().err


def test_benchmark_lr_is_made_when_missing(tmp_path):
    pytest.importorskip("distillsr.data.imresize")
    from distillsr.data.train_data import downscale
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (25, 31, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    d = tmp_path / "benchmark" / "SetX" / "HR"
    d.mkdir(parents=True)
    Image.fromarray(hr).save(d / "a.png")
    Image.fromarray(grey).save(d / "g.png")
    n = dl.make_benchmark_lr(tmp_path / "benchmark", scales=(2, 3), log=lambda m: None)
    assert n == 4
    lr = np.asarray(Image.open(tmp_path / "benchmark" / "SetX" / "LR_bicubic" / "X3" / "ax3.png"))
    assert lr.shape == (8, 10, 3) and np.array_equal(lr, downscale(hr, 3))
    g = Image.open(tmp_path / "benchmark" / "SetX" / "LR_bicubic" / "X2" / "gx2.png")
    assert g.mode == "L" and g.size == (12, 12)
    assert dl.make_benchmark_lr(tmp_path / "benchmark", scales=(2, 3), log=lambda m: None) == 0


def test_a_mirror_that_is_not_a_url_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from distillsr.cli.main import main
    assert main(["data", "download", "benchmark", "--to", str(tmp_path), "--mirror", "notaurl"]) == 2
    err = capsys.readouterr().err
    assert "--mirror 'notaurl' is not a URL" in err and "Traceback" not in err
    monkeypatch.setenv("DISTILLSR_MIRROR", "notaurl")
    with pytest.raises(DownloadError, match="mirror 'notaurl' is not a URL"):
        dl.download_dataset("benchmark", tmp_path, progress=False, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
