"""The authors' released weights by name: the release table, pull through a local mirror
(127.0.0.1), resume, cache reuse, hash checks, offline use, concurrent pulls, the default choice."""
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, shared_path
from distillsr.checkpoint import load_model
from distillsr.cli.main import main
from distillsr.pretrained import (PACKAGE_WEIGHTS_DIR, PretrainedError, choose_default, list_pretrained,
                                  load_pretrained, save_pretrained, sha256_file)
from distillsr import create_model, releases
from distillsr.releases import ReleaseError, better_release, find_release, get_release, list_releases, pull
from http_helpers import FileServer


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _release_path(name: str, scale: int) -> str:
    """The server path under which the mirror serves a release (its URL less https://github.com/)."""
    return get_release(name, scale).url[len("https://github.com/"):]


def _official_asid_bytes(scale: int) -> bytes:
    """An ASID file in the release's format: a plain state dict saved by torch.save, official keys."""
    sd = torch.load(shared_path("fixtures", "asid", f"asid_x{scale}_official_random.pth"), weights_only=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@pytest.fixture
def mirror(monkeypatch):
    """A local server standing in for github.com, serving the released FDIWN x4 file."""
    srv = FileServer()
    srv.files[_release_path("fdiwn-release", 4)] = shared_path("weights", "official", "fdiwn_x4.pt").read_bytes()
    monkeypatch.setenv("DISTILLSR_WEIGHTS_MIRROR", srv.url.rstrip("/"))
    yield srv
    srv.close()


def _cache() -> Path:
    return releases.cache_dir()


# ----------------------------------------------------------------------------- the table

def test_release_table_names_urls_and_hashes():
    rows = list_releases()
    assert {(r.name, r.scale) for r in rows} == {
        *((n, s) for n in ("asid-release", "asid-d8-release", "fdiwn-release") for s in (2, 3, 4)),
        ("e-rfdn-release", 4)}
    for r in rows:
        m = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)/raw/([0-9a-f]{40})/(.+)", r.url)
        assert m and m.groups() == (r.repo, r.commit, r.path), r.url
        assert r.licence and r.eval.startswith(f"distillsr eval --model {r.name} --scale {r.scale} --protocol release")
    assert get_release("asid-release", 2).commit.startswith("eb5af3b4") and get_release("asid-release", 4).commit.startswith("e488abcf")
    assert get_release("asid-d8-release", 2).commit.startswith("e488abcf")
    assert get_release("asid-d8-release", 3).path == "train_logs/ASIDd8_X3_DIV2K/checkpoints/epoch0_ASID.pth"
    assert get_release("fdiwn-release", 3).sha256 == "759ab8ed5fcf8c85fdd0006738dccc27f3a1882a1d49cbab152f2b4d974be20a"
    assert get_release("asid-release", 4).sha256 is None  # not known in advance: recorded at first download
    assert get_release("asid-release", 4).published_psnr["Set5"] == 32.39
    with pytest.raises(ReleaseError, match="released for x4, not x2"):
        get_release("e-rfdn-release", 2)
    with pytest.raises(ReleaseError, match="no release named 'asid-relase'; known: asid-d8-release, asid-release"):
        get_release("asid-relase", 4)


def test_release_hashes_match_the_shared_official_files():
    for name, scale, file in [("fdiwn-release", 2, "fdiwn_x2.pt"), ("fdiwn-release", 3, "fdiwn_x3.pt"),
                              ("fdiwn-release", 4, "fdiwn_x4.pt"), ("e-rfdn-release", 4, "rfdn_aim_x4.pth")]:
        path = shared_path("weights", "official", file)
        rel = get_release(name, scale)
        assert sha256_file(path) == rel.sha256 and path.stat().st_size == rel.size


def test_bundled_e_rfdn_is_the_release_with_its_licence():
    entry = next(e for e in list_pretrained() if e.name == "e-rfdn-release")
    assert entry.bundled and entry.scale == 4 and entry.arch == "e-rfdn"
    assert sha256_file(entry.file) == entry.sha256
    assert entry.source["sha256"] == get_release("e-rfdn-release", 4).sha256 and entry.source["sha256_pinned"]
    notice = (PACKAGE_WEIGHTS_DIR / "LICENSE-RFDN.txt").read_text()
    assert "MIT License" in notice and "Permission is hereby granted" in notice and "njulj/RFDN" in notice
    assert "weights/*.txt" in (REPO / "pyproject.toml").read_text()  # the notice ships with the package
    # same tensors as the authors' file
    ours, theirs = load_pretrained("e-rfdn-release", 4), load_model(shared_path("weights", "official", "rfdn_aim_x4.pth"))
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    # only the MIT release is bundled
    assert {e.name for e in list_pretrained() if e.bundled and find_release(e.name)} == {"e-rfdn-release"}


# ----------------------------------------------------------------------------- pull

def test_pull_then_eval_release_protocol_gives_the_published_set5(mirror, tmp_path, capsys):
    bench = shared_path("data", "benchmark")
    assert main(["weights", "pull", "fdiwn-release", "--scale", "4"]) == 0
    assert "fdiwn-release x4: ready" in capsys.readouterr().out
    card = json.loads((_cache() / "weights" / "fdiwn-release_x4.json").read_text())
    assert card["source"]["sha256"] == get_release("fdiwn-release", 4).sha256 and card["source"]["sha256_pinned"]
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "fdiwn-release", "--scale", "4", "--protocol", "release", "--data", str(bench),
                 "--datasets", "Set5", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["chop"] is True and result["tile"] is None and result["ssim_variant"] == "wang"
    assert result["protocol"] == "release"
    assert abs(result["results"][0]["psnr"] - 32.227) <= 0.003
    assert len(mirror.requests) == 1  # eval used the cache, it did not download again


def test_dropped_connection_resumes_with_a_range_request(mirror):
    mirror.drop_next = 1_000_000
    entry = pull("fdiwn-release", 4, log=lambda m: None)
    assert entry.installed and sha256_file(_cache() / "downloads" / "fdiwn-release_x4" / "model_best.pt") == \
        get_release("fdiwn-release", 4).sha256
    assert mirror.requests == [None, "bytes=1000000-"]


def test_cache_is_reused_and_works_offline(mirror):
    pull("fdiwn-release", 4, log=lambda m: None)
    mirror.close()  # the network is gone
    assert pull("fdiwn-release", 4).installed
    model = load_pretrained("fdiwn-release", 4)
    assert model.arch_name == "fdiwn" and model.pretrained_name == "fdiwn-release"
    assert len(mirror.requests) == 1


def test_wrong_hash_is_refused_and_the_file_deleted(mirror, capsys):
    data = bytearray(mirror.files[_release_path("fdiwn-release", 4)])
    data[len(data) // 2] ^= 0x01
    mirror.files[_release_path("fdiwn-release", 4)] = bytes(data)
    assert main(["weights", "pull", "fdiwn-release", "--scale", "4"]) == 1
    err = capsys.readouterr().err
    assert "does not match the one pinned by distillsr" in err and "the file was refused" in err
    folder = _cache() / "downloads" / "fdiwn-release_x4"
    assert not any(p.name.startswith("model_best") for p in folder.iterdir())
    assert not (_cache() / "weights" / "fdiwn-release_x4.json").exists()
    with pytest.raises(PretrainedError, match="sha256"):
        load_pretrained("fdiwn-release", 4)


def test_tampered_cache_files_are_refused_at_load(mirror, capsys):
    entry = pull("fdiwn-release", 4, log=lambda m: None)
    original = _cache() / "downloads" / "fdiwn-release_x4" / "model_best.pt"
    good = original.read_bytes()
    original.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ReleaseError, match="model_best.pt: sha256 .* does not match"):
        load_pretrained("fdiwn-release", 4)
    assert main(["weights", "verify"]) == 1
    assert "FAILED fdiwn-release x4" in capsys.readouterr().out
    original.write_bytes(good)
    data = bytearray(entry.file.read_bytes())
    data[-1] ^= 0xFF
    entry.file.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="does not match the model card"):
        load_pretrained("fdiwn-release", 4)


def test_official_asid_file_pulls_records_its_hash_and_matches_the_fixtures(mirror, capsys):
    blob = _official_asid_bytes(4)
    mirror.files[_release_path("asid-release", 4)] = blob
    assert main(["weights", "pull", "asid-release", "--scale", "4"]) == 0
    err = capsys.readouterr().err
    assert "not pinned by distillsr" in err and _sha(blob) in err
    recorded = json.loads((_cache() / "recorded_sha256.json").read_text())
    assert recorded[get_release("asid-release", 4).url] == _sha(blob)
    model = load_pretrained("asid-release", 4)
    x = torch.from_numpy(np.load(shared_path("fixtures", "asid", "input_37x45.npy")))
    want = torch.from_numpy(np.load(shared_path("fixtures", "asid", "asid_x4_out_37x45.npy")))
    assert model.pixel_range == (-1.0, 1.0)  # the release's own input range, kept through the conversion
    with torch.no_grad():
        got = model.forward_native(x)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 2e-6
    # a different file at the same URL later is refused against the recorded hash
    mirror.files[_release_path("asid-release", 4)] = _official_asid_bytes(3)
    with pytest.raises(ReleaseError, match="recorded at its first download"):
        pull("asid-release", 4, force=True, log=lambda m: None)


def test_a_checkpoint_is_never_executed(mirror, tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buf = io.BytesIO()
    torch.save({"input.weight": torch.zeros(1), "x": Evil()}, buf)
    mirror.files[_release_path("asid-release", 3)] = buf.getvalue()
    with pytest.raises(ReleaseError):
        pull("asid-release", 3, log=lambda m: None)
    assert not marker.exists()


def test_offline_pull_names_the_url_and_the_way_to_add_by_hand(capsys, tmp_path):
    assert main(["weights", "pull", "fdiwn-release", "--scale", "3"]) == 1
    err = capsys.readouterr().err
    url = "http://127.0.0.1:9/24wenjie-li/FDIWN/raw/3590f0cc4a212e101559486ae847d060b79ec41d/" \
          "FDIWN_TrainCode/experiment/FDIWNx3/model/model_best.pt"
    assert url in err and "distillsr weights add fdiwn-release FILE --scale 3" in err
    # ... and adding it by hand works offline; a wrong file is refused
    assert main(["weights", "add", "fdiwn-release", str(shared_path("weights", "official", "fdiwn_x2.pt")),
                 "--scale", "3"]) == 2
    assert "bytes, but fdiwn-release x3 is" in capsys.readouterr().err
    assert main(["weights", "add", "fdiwn-release", str(shared_path("weights", "official", "fdiwn_x3.pt")),
                 "--scale", "3"]) == 0
    assert load_pretrained("fdiwn-release", 3).scale == 3


def test_offline_upscale_uses_the_bundled_e_rfdn_and_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "4",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "x4: using e-rfdn-release (bundled; Set5 32.16 dB measured)" in out
    assert Image.open(tmp_path / "out" / "x.png").size == (128, 96)
    assert not any((_cache() / "downloads").glob("*")) if (_cache() / "downloads").exists() else True


def test_two_concurrent_pulls_download_once_and_agree(mirror):
    mirror.delay = 0.02  # about 1 s for the file: the two processes overlap
    cmd = [sys.executable, "-m", "distillsr", "weights", "pull", "fdiwn-release", "--scale", "4"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(mirror.requests) == 1
    assert sha256_file(_cache() / "downloads" / "fdiwn-release_x4" / "model_best.pt") == \
        get_release("fdiwn-release", 4).sha256
    assert load_pretrained("fdiwn-release", 4).scale == 4


# ----------------------------------------------------------------------------- the default

def test_default_is_the_best_present_by_set5_and_never_the_network(capsys):
    assert choose_default(4).name == "e-rfdn-release"  # bundled, measured 32.16 > our ASID x4
    assert choose_default(2).name == "asid"  # the only x2 weights present
    assert better_release(choose_default(2)).name == "asid-d8-release"  # best published x2
    assert main(["weights", "add", "fdiwn-release", str(shared_path("weights", "official", "fdiwn_x4.pt")),
                 "--scale", "4"]) == 0
    assert choose_default(4).name == "fdiwn-release"  # measured 32.227 beats 32.161
    assert better_release(choose_default(4)).name == "asid-d8-release"


def test_default_ties_go_to_the_first_name(tmp_path):
    for name in ("zeta", "alpha"):
        save_pretrained(create_model("asid", 2, blocks=1), name, tmp_path, psnr={"Set5": 30.0})
    save_pretrained(create_model("asid", 2, blocks=1), "beta", tmp_path, psnr={"Set5": 29.0})
    assert choose_default(2, tmp_path).name == "alpha"
    with pytest.raises(PretrainedError, match="no pretrained weights for x3 are installed"):
        choose_default(3, tmp_path)


def test_models_shows_published_and_measured_side_by_side(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rel = next(l for l in out.splitlines() if l.strip().startswith("fdiwn-release") and " x4 " in l)
    assert "32.23 / 32.23" in rel and "28.66 / 28.66" in rel and "not pulled" in rel
    asid = next(l for l in out.splitlines() if l.strip().startswith("asid-release") and " x4 " in l)
    assert "- / 32.39" in asid
    mine = next(l for l in out.splitlines() if l.strip().startswith("e-rfdn-release*"))
    assert "32.16 / -" in mine and "bundled" in mine


def test_eval_protocol_release_refuses_conflicting_options(capsys):
    assert main(["eval", "--model", "asid", "--scale", "2", "--protocol", "release", "--tile", "32",
                 "--data", "."]) == 2
    assert "--protocol release sets --tile itself" in capsys.readouterr().err


def test_upscale_hints_at_better_weights_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    args = [str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--scale", "2", "--no-progress", "--overwrite"]
    assert main(["upscale", *args]) == 0
    assert "hint" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["upscale", *args]) == 0
    hints = [l for l in capsys.readouterr().err.splitlines() if l.startswith("hint:")]
    assert hints == ["hint: better x2 weights can be pulled: distillsr weights pull asid-d8-release --scale 2 "
                     "(Set5 38.32 dB)"]


def test_readme_opens_with_the_weights_table_of_the_release_table(capsys):
    readme = (REPO / "README.md").read_text()
    assert main(["weights", "list", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table in readme
    first_section = readme.split("\n## ")[1]
    assert first_section.startswith("The best weights for each scale") and table in first_section


def test_model_name_pulls_on_first_use_in_upscale_profile_and_export(mirror, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--model", "fdiwn-release",
                 "--scale", "4", "--no-progress"]) == 0
    assert "fdiwn" in capsys.readouterr().out and len(mirror.requests) == 1
    assert main(["profile", "--model", "fdiwn-release", "--scale", "4", "--count-only", "--size", "64x64"]) == 0
    assert "MACs" in capsys.readouterr().out
    (_cache() / "weights" / "fdiwn-release_x4.json").unlink()  # gone from the cache: export pulls again
    seen = {}

    def fake_export(model, path, opset=None):  # the export itself is tested in test_export.py
        seen["model"] = model
        Path(path).write_bytes(b"onnx")
    monkeypatch.setattr("distillsr.engine.export.export_onnx", fake_export)
    assert main(["export", "--model", "fdiwn-release", "--scale", "4", "-o", str(tmp_path / "f.onnx"),
                 "--no-check"]) == 0
    assert seen["model"].pretrained_name == "fdiwn-release" and (tmp_path / "f.onnx").exists()
    assert len(mirror.requests) == 1  # the downloaded file was still there and checked, not fetched again
