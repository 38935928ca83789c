"""Inference strategies (tiles, self-ensemble), the evaluation loop and ``distillsr eval`` /
``distillsr degrade``, with small deterministic toy models instead of real networks."""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import shared_path
from distillsr.cli.main import main
from distillsr.data.benchmark import make_lr, write_png
from distillsr.data.imresize import imresize
from distillsr.engine.evaluate import evaluate, format_table
from distillsr.engine.infer import make_forward, self_ensemble, tile_starts, tiled_forward
from distillsr.metrics import psnr_ssim
from distillsr.models.base import SRNet


class Pointwise(SRNet):
    """Each output pixel depends on one input pixel: tiling cannot change anything.
    (With ``plain=True`` it is nearest upsampling, whose outputs stay k/255 exactly after
    averaging, so that even their uint8 quantisation does not depend on the tiling.)"""

    def __init__(self, scale, plain=False):
        super().__init__()
        self.scale = scale
        gain = [1.0, 1.0, 1.0] if plain else [0.9, 1.0, 1.1]
        self.gain = nn.Parameter(torch.tensor(gain).view(1, 3, 1, 1))
        self.bias = 0.0 if plain else 0.02

    def forward_native(self, x):
        return F.interpolate(x * self.gain + self.bias, scale_factor=self.scale, mode="nearest")


class Local3x3(SRNet):
    """A fixed 3x3 conv + pixel shuffle: outputs depend on a 1-pixel LR neighbourhood,
    and it is not flip/transpose equivariant."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(self.conv.weight.shape, generator=g) / 10)
            self.conv.bias.zero_()
        self.shuffle = nn.PixelShuffle(scale)

    def forward_native(self, x):
        return self.shuffle(self.conv(x))


# ------------------------------------------------------------------ tiles

def test_tile_starts_rule():
    assert tile_starts(200, 64, 24) == [0, 40, 80, 120, 136]
    assert tile_starts(104, 64, 24) == [0, 40]        # 40 is already flush with the border
    assert tile_starts(105, 64, 24) == [0, 40, 41]
    assert tile_starts(64, 64, 24) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 20, 24)


class Recorder(nn.Module):
    """Remembers where each tile came from (the input encodes its coordinates)."""

    def __init__(self, scale):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x):
        self.calls.append((round(float(x[0, 0, 0, 0]) * 1000), round(float(x[0, 1, 0, 0]) * 1000),
                           tuple(x.shape[-2:])))
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


def _coords(h, w):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    return torch.stack([yy / 1000, xx / 1000, torch.zeros_like(yy)])[None]


@pytest.mark.parametrize("h,w,tile,starts_h,starts_w", [
    (150, 200, 64, [0, 40, 80, 86], [0, 40, 80, 120, 136]),
    (57, 86, 64, [0], [0, 29]),  # smaller than a tile (Set5 woman at x4): tiles of 57 x 57
])
def test_tiles_follow_the_release_grid(h, w, tile, starts_h, starts_w):
    rec = Recorder(2)
    out = tiled_forward(rec, _coords(h, w), 2, tile, 24)
    t = min(tile, h, w)
    assert rec.calls == [(i, j, (t, t)) for i in starts_h for j in starts_w]
    assert torch.allclose(out, F.interpolate(_coords(h, w), scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("blend", ["mean", "feather"])
def test_tiled_pointwise_model_equals_whole_image(blend):
    model = Pointwise(3).eval()
    x = torch.rand(2, 3, 70, 93, generator=torch.Generator().manual_seed(1))
    whole = model(x)
    tiled = tiled_forward(model, x, 3, 32, 8, blend=blend)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-6)


def _clean_1d(length, tile, overlap):
    """LR positions that no covering tile sees within 1 pixel of one of its inner edges."""
    ok = np.ones(length, bool)
    for i in tile_starts(length, tile, overlap):
        if i > 0:
            ok[i] = False
        if i + tile < length:
            ok[i + tile - 1] = False
    return ok


def test_tiled_local_model_equals_whole_image_away_from_tile_edges():
    s, tile, ov = 2, 24, 6
    model = Local3x3(s).eval()
    x = torch.rand(1, 3, 50, 61, generator=torch.Generator().manual_seed(2))
    whole = model(x)
    tiled = tiled_forward(model, x, s, tile, ov)
    clean = np.outer(_clean_1d(50, tile, ov), _clean_1d(61, tile, ov))
    clean = torch.from_numpy(clean.repeat(s, 0).repeat(s, 1))
    diff = (tiled - whole).abs().amax(dim=1)[0]
    assert diff[clean].max() < 1e-6
    assert diff[~clean].max() > 1e-4  # the edge effects are real, so the check above means something


def test_feather_blend_hides_seams():
    class Offset(nn.Module):  # each tile adds its own constant: seams where tiles meet
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="nearest") + x[..., :1, :1] * 0.5

    x = torch.linspace(0, 1, 80)[None, None, None, :].expand(1, 1, 40, 80).contiguous()
    base = F.interpolate(x, scale_factor=2, mode="nearest")
    steps = {}
    for blend in ("mean", "feather"):
        off = tiled_forward(Offset(), x, 2, 40, 16, blend=blend) - base
        steps[blend] = off.diff(dim=-1).abs().max().item()
    assert steps["feather"] < steps["mean"] / 4


# ------------------------------------------------------------------ self-ensemble

def test_self_ensemble_of_equivariant_model_is_the_model():
    model = Pointwise(2).eval()
    x = torch.rand(1, 3, 9, 14)
    assert torch.allclose(self_ensemble(model, x), model(x), atol=1e-6)


def test_self_ensemble_averages_the_eight_transforms():
    model = Local3x3(2).eval()
    x = torch.rand(1, 3, 9, 14, generator=torch.Generator().manual_seed(3))
    # the same group written with rotations: rot90^k, with and without a flip first
    outs = []
    with torch.no_grad():
        for flip in (False, True):
            for k in range(4):
                xi = x.flip(-1) if flip else x
                y = model(torch.rot90(xi, k, dims=(-2, -1))).detach()
                y = torch.rot90(y, -k, dims=(-2, -1))
                outs.append(y.flip(-1) if flip else y)
    want = torch.stack(outs).mean(0)
    got = self_ensemble(model, x)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, model(x).detach(), atol=1e-3)


def test_chop_flag_uses_engine_chop():
    model = Pointwise(2).eval()
    if importlib.util.find_spec("distillsr.engine.chop") is None:
        with pytest.raises(RuntimeError, match="distillsr.engine.chop"):
            make_forward(model, 2, chop=True)
    else:
        x = torch.rand(1, 3, 40, 30)
        assert torch.allclose(make_forward(model, 2, chop=True)(x), model(x), atol=1e-6)
    res = {"model": "m", "weights": None, "scale": 2, "ssim_variant": "wang", "grey": "raw", "tile": None,
           "self_ensemble": False, "results": [{"dataset": "Set5", "psnr": 30.0, "ssim": 0.9, "num_images": 5,
                                                 "seconds": 1.0, "images": []}]}
    assert "chop" in format_table(res, chop=True).splitlines()[0]
    assert "chop" in format_table(dict(res, chop=True)).splitlines()[0]
    assert "whole image" in format_table(res).splitlines()[0]


# ------------------------------------------------------------------ evaluation on a temp dataset

def _smooth(h, w, channels, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, channels), dtype=np.uint8)
    big = imresize(small, 8)[:h, :w]
    return big[:, :, 0] if channels == 1 else big


@pytest.fixture
def tiny_root(tmp_path):
    """Tiny/HR: colour.png (RGB, LR given), grey.png (L, LR missing), broken.png (truncated)."""
    hr = tmp_path / "data" / "Tiny" / "HR"
    hr.mkdir(parents=True)
    colour = _smooth(41, 50, 3, 0)   # odd height: mod-crop matters
    grey = _smooth(36, 46, 1, 1)
    Image.fromarray(colour).save(hr / "colour.png")
    Image.fromarray(grey).save(hr / "grey.png")
    Image.fromarray(_smooth(30, 30, 3, 2)).save(tmp_path / "ok.png")
    (hr / "broken.png").write_bytes((tmp_path / "ok.png").read_bytes()[:200])
    write_png(tmp_path / "data" / "Tiny" / "LR_bicubic" / "X2" / "colourx2.png", make_lr(colour, 2))
    return tmp_path / "data", colour, grey


def test_eval_reports_corrupt_file_and_fails(tiny_root, capsys):
    root, _, _ = tiny_root
    rc = main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(root), "--datasets", "Tiny",
               "--no-progress"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "--skip-bad" in err


def test_eval_skip_bad_scores_grey_and_generates_missing_lr(tiny_root, tmp_path, capsys):
    root, colour, grey = tiny_root
    out_json, saved = tmp_path / "r.json", tmp_path / "sr"
    rc = main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(root), "--datasets", "Tiny",
               "--skip-bad", "--json", str(out_json), "--save-images", str(saved), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "broken.png" in cap.out + cap.err            # the skipped file is named
    assert "made from HR" in cap.err                     # the missing LR was generated
    assert "Tiny" in cap.out and "PSNR" in cap.out       # the table

    res = json.loads(out_json.read_text())
    assert list(res) == ["model", "weights", "scale", "ssim_variant", "grey", "tile", "tile_overlap", "blend", "chop",
                         "self_ensemble", "device", "results", "protocol"]
    assert (res["tile_overlap"], res["chop"], res["device"], res["protocol"]) == (24, False, "cpu", None)
    assert res["model"] == "bicubic" and res["weights"] is None and res["scale"] == 2
    assert (res["ssim_variant"], res["grey"], res["tile"], res["self_ensemble"]) == ("wang", "replicate", None, False)
    (r,) = res["results"]
    assert list(r) == ["dataset", "psnr", "ssim", "num_images", "seconds", "images"]
    assert r["dataset"] == "Tiny" and r["num_images"] == 2 and isinstance(r["seconds"], float)
    assert [im["name"] for im in r["images"]] == ["colour", "grey"]
    assert all(list(im) == ["name", "psnr", "ssim"] for im in r["images"])

    # each score is what the metric gives on the bicubic upscaling of the MATLAB LR
    for im, hr in zip(r["images"], (colour, grey)):
        lr = make_lr(hr if hr.ndim == 3 else hr[:, :, None], 2)
        sr = imresize(lr, 2)
        crop = hr[:sr.shape[0], :sr.shape[1]]
        assert (im["psnr"], im["ssim"]) == psnr_ssim(sr, crop, 2)
        assert np.array_equal(np.asarray(Image.open(saved / "Tiny" / "X2" / f"{im['name']}.png")),
                              sr[:, :, 0] if sr.shape[2] == 1 else sr)
    assert r["psnr"] == pytest.approx(np.mean([im["psnr"] for im in r["images"]]), abs=1e-12)
    assert Image.open(saved / "Tiny" / "X2" / "grey.png").mode == "L"


def test_grey_convention_changes_only_the_grey_image(tiny_root):
    root, _, _ = tiny_root
    runs = {g: evaluate("bicubic", 2, root, ["Tiny"], grey=g, skip_bad=True, progress=False, log=lambda m: None)
            for g in ("replicate", "raw")}
    rep, raw = ({im["name"]: im["psnr"] for im in runs[g]["results"][0]["images"]} for g in ("replicate", "raw"))
    assert raw["colour"] == rep["colour"]
    # replicated, Y = 16 + 219/255 grey: errors shrink by 219/255, PSNR rises by 20 log10(255/219)
    assert rep["grey"] - raw["grey"] == pytest.approx(20 * math.log10(255 / 219), abs=1e-4)


# ------------------------------------------------------------------ models through the CLI

@pytest.fixture
def toy_registered():
    from distillsr import registry
    name = "toy-pointwise-evaltest"
    registry.register_model(name, scales=(2, 3))(lambda scale: Pointwise(scale, plain=True))
    yield name
    registry._REGISTRY.pop(name, None)


class ShapeRecorder(Local3x3):
    """Local3x3 (not flip-invariant) that records the shape of every input it sees."""
    seen = []

    def forward_native(self, x):
        ShapeRecorder.seen.append(tuple(x.shape[-2:]))
        return super().forward_native(x)


@pytest.fixture
def recorder_registered():
    from distillsr import registry
    name = "toy-recorder-evaltest"
    registry.register_model(name, scales=(2, 3))(lambda scale: ShapeRecorder(scale))
    ShapeRecorder.seen = []
    yield name
    registry._REGISTRY.pop(name, None)


def test_eval_weights_tiles_chop_and_ensemble_reach_the_model(recorder_registered, tiny_root, tmp_path, capsys):
    from distillsr import create_model, save_model
    root, _, _ = tiny_root  # Tiny: colour (LR 20x25) and grey (LR 18x23), x2
    ckpt = save_model(create_model(recorder_registered, 2), tmp_path / "toy.safetensors")
    results, shapes = {}, {}
    for extra in ([], ["--tile", "12", "--tile-overlap", "4"], ["--self-ensemble"], ["--chop"]):
        out = tmp_path / "r.json"
        ShapeRecorder.seen = []
        rc = main(["eval", "--weights", str(ckpt), "--data", str(root), "--datasets", "Tiny",
                   "--skip-bad", "--json", str(out), "--device", "cpu", *extra])
        assert rc == 0, capsys.readouterr().err
        res = json.loads(out.read_text())
        assert res["model"] == recorder_registered and res["weights"] == str(ckpt) and res["scale"] == 2
        results[tuple(extra)], shapes[tuple(extra)] = res, list(ShapeRecorder.seen)
    assert shapes[()] == [(20, 25), (18, 23)]  # whole images (the scale came from the checkpoint)
    assert set(shapes[("--tile", "12", "--tile-overlap", "4")]) == {(12, 12)}
    assert results[("--tile", "12", "--tile-overlap", "4")]["tile"] == 12
    assert len(shapes[("--self-ensemble",)]) == 16 and (25, 20) in shapes[("--self-ensemble",)]
    assert results[("--self-ensemble",)]["self_ensemble"] is True
    assert len(shapes[("--chop",)]) == 8 and (20 // 2 + 10, 25 // 2 + 10) in shapes[("--chop",)]
    assert results[("--chop",)]["chop"] is True
    whole = results[()]["results"][0]["images"]
    assert results[("--self-ensemble",)]["results"][0]["images"] != whole  # not flip-invariant
    # a checkpoint at another scale is refused
    rc = main(["eval", "--weights", str(ckpt), "--scale", "3", "--data", str(root), "--no-progress"])
    assert rc != 0 and "x2" in capsys.readouterr().err


def test_eval_json_and_header_name_every_inference_setting(recorder_registered, tiny_root, tmp_path, capsys):
    from distillsr import create_model, save_model
    root, _, _ = tiny_root
    ckpt = save_model(create_model(recorder_registered, 2), tmp_path / "toy.safetensors")
    out = tmp_path / "r.json"
    assert main(["eval", "--weights", str(ckpt), "--data", str(root), "--datasets", "Tiny", "--skip-bad",
                 "--tile", "12", "--tile-overlap", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["tile"], res["tile_overlap"], res["blend"], res["chop"], res["device"]) == (12, 4, "mean", False, "cpu")
    header = capsys.readouterr().out.splitlines()[0]
    assert "tiles 12 overlap 4" in header and "cpu" in header
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_eval_device_errors_are_one_line(tiny_root, capsys):
    root, _, _ = tiny_root
    for dev, want in [("gpu", "--device 'gpu' is not a device"), ("cuda", "cuda")]:
        if dev == "cuda" and torch.cuda.is_available():
            continue
        rc = main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(root), "--device", dev])
        err = capsys.readouterr().err
        assert rc == 2 and want in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_eval_progress_bar_only_on_a_terminal(tiny_root, capsys, monkeypatch):
    root, _, _ = tiny_root
    assert main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(root), "--skip-bad"]) == 0
    assert "\r" not in capsys.readouterr().err  # stderr is no terminal here: no bar
    evaluate("bicubic", 2, root, ["Tiny"], skip_bad=True, log=lambda m: None)
    assert "\r" not in capsys.readouterr().err  # the library prints no bar unless asked
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(root), "--skip-bad"]) == 0
    assert "\r" in capsys.readouterr().err


def test_eval_needs_a_scale_without_weights(tiny_root, capsys):
    root, _, _ = tiny_root
    assert main(["eval", "--model", "bicubic", "--data", str(root)]) == 2
    assert "give --scale" in capsys.readouterr().err


def test_eval_model_name_uses_shipped_weights_or_fails(toy_registered, tiny_root, tmp_path, monkeypatch, capsys):
    root, _, _ = tiny_root
    monkeypatch.setenv("DISTILLSR_WEIGHTS_DIR", str(tmp_path / "weights"))
    rc = main(["eval", "--model", toy_registered, "--scale", "2", "--data", str(root), "--no-progress"])
    assert rc != 0 and "no weights ship" in capsys.readouterr().err
    pretrained = pytest.importorskip("distillsr.pretrained")
    from distillsr import create_model
    entry = pretrained.save_pretrained(create_model(toy_registered, 2), toy_registered, tmp_path / "weights")
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", toy_registered, "--scale", "2", "--data", str(root), "--skip-bad",
               "--json", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["model"] == toy_registered and res["weights"] == str(entry.file)
    rc = main(["eval", "--model", "no-such-model", "--scale", "2", "--data", str(root), "--no-progress"])
    assert rc != 0 and "no-such-model" in capsys.readouterr().err
    rc = main(["eval", "--model", "bicubic", "--scale", "2", "--data", str(root), "--datasets", "Nope",
               "--no-progress"])
    assert rc != 0 and "Nope" in capsys.readouterr().err


# ------------------------------------------------------------------ degrade

def test_degrade_writes_matlab_lr_layout(tmp_path, capsys):
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    a = _smooth(37, 42, 3, 5)
    Image.fromarray(a).save(hr_dir / "0001.png")
    Image.fromarray(_smooth(20, 24, 1, 6)).save(hr_dir / "0002.png")
    (hr_dir / "0003.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    rc = main(["degrade", str(hr_dir), str(out), "--scale", "2", "4", "--no-progress"])
    assert rc == 1 and "0003.png" in capsys.readouterr().err  # the bad file is named, the others written
    for s in (2, 4):
        lr = np.asarray(Image.open(out / "LR_bicubic" / f"X{s}" / f"0001x{s}.png"))
        assert np.array_equal(lr, make_lr(a, s))
        assert Image.open(out / "LR_bicubic" / f"X{s}" / f"0002x{s}.png").mode == "L"
    assert not list(out.rglob("*.tmp"))


def test_bicubic_set14_x2_matches_protocol():
    root = shared_path("data", "benchmark")
    rep = evaluate("bicubic", 2, root, ["Set14"], grey="replicate", progress=False)["results"][0]
    raw = evaluate("bicubic", 2, root, ["Set14"], grey="raw", progress=False)["results"][0]
    assert round(rep["psnr"], 2) == 30.33  # docs/protocol.md
    # only the greyscale image (bridge) changes, by 20 log10(255/219) dB
    changed = {a["name"]: a["psnr"] - b["psnr"] for a, b in zip(rep["images"], raw["images"])
               if a["psnr"] != b["psnr"]}
    assert list(changed) == ["bridge"]
    assert changed["bridge"] == pytest.approx(20 * math.log10(255 / 219), abs=1e-4)
