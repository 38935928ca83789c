"""distillsr upscale / distillsr.upscale: real image kinds, batches, bad inputs, tiling, memory.

Most tests use ``Toy``, a tiny SRNet (one 3x3 conv + pixel shuffle on top of a nearest
upscale), so they run in milliseconds; the CLI ones save it as a checkpoint (``--weights``).
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms

import distillsr
from distillsr import io as imgio
from distillsr import register_model, save_model
from distillsr.cli.main import main
from distillsr.engine import upscale as eng
from distillsr.engine import upscaler as upscaler_mod
from distillsr.engine.records import MANIFEST
from distillsr.engine.upscale import DEFAULT_OVERLAP, Upscaler, choose_tile, collect_inputs, upscale_files
from distillsr.models.base import SRNet
from distillsr.registry import list_models

REPO = Path(__file__).resolve().parents[1]
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
RNG = np.random.default_rng(1)


class Toy(SRNet):
    """Local (3x3 receptive field) network: nearest upscale + a learned 3x3 residual."""

    def __init__(self, scale=2, seed=0):
        super().__init__()
        self.scale = scale
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3 * scale * scale, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.zero_()
        self.shuffle = torch.nn.PixelShuffle(scale)

    def forward_native(self, x):
        return F.interpolate(x, scale_factor=self.scale, mode="nearest") + self.shuffle(self.conv(x))


@pytest.fixture(scope="module", autouse=True)
def toy_arch():
    """"toy-upscale-test" in the registry while this module runs (checkpoints name it)."""
    from distillsr import registry
    if "toy-upscale-test" not in list_models():
        register_model("toy-upscale-test", scales=(2, 3, 4))(lambda scale, **o: Toy(scale, **o))
    yield
    registry._REGISTRY.pop("toy-upscale-test", None)


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory, toy_arch):
    """Toy x2 weights as a checkpoint file, for the CLI's --weights."""
    model = distillsr.create_model("toy-upscale-test", 2)
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "toy_x2.safetensors")


def listed(folder):
    """A folder's files, but for upscale's record of its outputs (temporary files do show)."""
    return sorted(set(os.listdir(folder)) - {MANIFEST})


def rand(h, w, c, dtype=np.uint8):
    hi = 255 if dtype == np.uint8 else 65535
    return RNG.integers(0, hi + 1, (h, w, c)).astype(dtype)


def toy_reference(arr_float, scale=2):
    """What the pipeline must give for RGB float input: the model on the whole image."""
    x = torch.from_numpy(np.ascontiguousarray(arr_float)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return Toy(scale)(x)[0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- image kinds through the CLI

def _make_inputs(folder: Path):
    """One file of every kind; returns {name: (stored array, expected output mode check)}."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    a = rand(12, 10, 3)
    Image.fromarray(a).save(folder / "rgb.png", icc_profile=SRGB)
    made["rgb.png"] = a
    g = rand(12, 10, 1)
    Image.fromarray(g[:, :, 0]).save(folder / "grey.png")
    made["grey.png"] = g
    la = rand(12, 10, 2)
    Image.fromarray(la, "LA").save(folder / "la.png")
    made["la.png"] = la
    rgba = rand(12, 10, 4)
    Image.fromarray(rgba).save(folder / "rgba.png")
    made["rgba.png"] = rgba
    Image.fromarray(a).quantize(8).save(folder / "pal.png")
    g16 = rand(12, 10, 1, np.uint16)
    Image.fromarray(g16[:, :, 0]).save(folder / "grey16.tif")
    made["grey16.tif"] = g16
    c16 = rand(12, 10, 3, np.uint16)
    imgio.write_image(folder / "rgb16.png", c16)
    made["rgb16.png"] = c16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(a).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return made


def test_cli_every_kind(tmp_path, toy_ckpt, capsys):
    made = _make_inputs(tmp_path / "in")
    rc = main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights", str(toy_ckpt),
               "--device", "cpu", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "8 upscaled, 0 skipped" in out.out and "0 failed" in out.out
    o = tmp_path / "out"
    expect = {"rgb.png": ("RGB", (20, 24)), "grey.png": ("L", (20, 24)), "la.png": ("LA", (20, 24)),
              "rgba.png": ("RGBA", (20, 24)), "pal.png": ("RGB", (20, 24)),
              "grey16.tif": ("I;16", (20, 24)), "rotated.jpg": ("RGB", (24, 20))}
    for name, (mode, size) in expect.items():
        im = Image.open(o / name)
        assert (im.mode, im.size) == (mode, size), name
    assert Image.open(o / "rgb.png").info["icc_profile"] == SRGB
    arr, info = imgio.read_image_native(o / "rgb16.png")
    assert info.bit_depth == 16 and info.channels == 3 and arr.shape == (24, 20, 3)
    # the 16-bit output really uses 16 bits (not 8-bit values scaled up)
    assert (arr % 257 != 0).mean() > 0.5
    # the values: RGB output is the network's output
    np.testing.assert_allclose(np.asarray(Image.open(o / "rgb.png")) / 255.0,
                               np.clip(toy_reference(made["rgb.png"] / 255.0), 0, 1), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(arr / 65535.0, np.clip(toy_reference(made["rgb16.png"] / 65535.0), 0, 1),
                               atol=0.5 / 65535 + 1e-6)


def test_grey_and_alpha_handling():
    up = Upscaler(Toy(2), "cpu", tile=None)
    g = rand(9, 11, 1).astype(np.float32) / 255
    out = up.upscale_array(g, np.float32)
    ref = toy_reference(np.repeat(g, 3, axis=2)).mean(axis=2, keepdims=True)
    np.testing.assert_allclose(out, np.clip(ref, 0, 1), atol=1e-6)
    rgba = rand(9, 11, 4).astype(np.float32) / 255
    out = up.upscale_array(rgba, np.float32)
    alpha = F.interpolate(torch.from_numpy(rgba[:, :, 3])[None, None], scale_factor=2, mode="bicubic",
                          align_corners=False)[0, 0].clamp(0, 1).numpy()
    np.testing.assert_allclose(out[:, :, 3], alpha, atol=1e-6)
    # colour: the network's output on premultiplied colour, divided by the upscaled alpha
    premul = toy_reference(rgba[:, :, :3] * rgba[:, :, 3:])
    seen = alpha > 0.02  # (the division magnifies float rounding where alpha is tiny)
    expect = np.clip(premul / np.where(alpha > 0, alpha, 1)[:, :, None], 0, 1)
    np.testing.assert_allclose(out[:, :, :3][seen], expect[seen], atol=1e-5)
    assert (out[:, :, :3][alpha == 0] == 0).all()


def _edge_image(noise: bool):
    """A 24 x 32 RGBA image: the left half opaque orange, the right half fully transparent,
    with random noise (or the same orange) as the colour stored under alpha 0."""
    rng = np.random.default_rng(5)
    x = np.empty((24, 32, 4), np.uint8)
    x[:, :, :3] = rng.integers(0, 256, (24, 32, 3)) if noise else (230, 120, 40)
    x[:, :16, :3] = (230, 120, 40)
    x[:, :, 3] = 0
    x[:, :16, 3] = 255
    return x


def test_transparent_noise_leaves_no_fringe():
    """Colour under alpha 0 is noise: premultiplied upscaling gives the visible pixels exactly
    what an image with the opaque colour underneath gives (the hidden colour cannot leak into
    the edge), where upscaling the straight colour (the old way) drags the noise into the
    visible pixels along the edge."""
    noisy, plain = _edge_image(noise=True), _edge_image(noise=False)
    out = distillsr.upscale(noisy, 2, "asid", device="cpu")
    ref = distillsr.upscale(plain, 2, "asid", device="cpu")
    np.testing.assert_array_equal(out[:, :, 3], ref[:, :, 3])
    visible = out[:, :, 3] > 0
    assert visible[:, :33].all() and not visible[:, 40:].any()
    diff = np.abs(out[:, :, :3].astype(int) - ref[:, :, :3].astype(int)).max(axis=2)
    assert diff[visible].max() <= 1
    # the straight colour: noise shows in the visible edge pixels
    old_noisy = distillsr.upscale(noisy[:, :, :3], 2, "asid", device="cpu")
    old_plain = distillsr.upscale(plain[:, :, :3], 2, "asid", device="cpu")
    old_diff = np.abs(old_noisy.astype(int) - old_plain.astype(int)).max(axis=2)
    assert old_diff[visible].max() > 40 and old_diff[:, 30:33].mean() > 10
    # and inside the opaque part, away from the edge, the colour is the opaque colour
    err = np.abs(out[4:-4, 4:26, :3].astype(int) - (230, 120, 40)).max()
    assert err <= 6


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_opaque_alpha_changes_no_colour(dtype):
    """Alpha 1 everywhere: the colour is exactly that of the image without alpha (16-bit too,
    and at x3, where bicubic's weights sum to 1 only within float rounding)."""
    peak = np.iinfo(dtype).max
    rgb = (rand(10, 13, 3).astype(np.float64) / 255 * peak).astype(dtype)
    rgba = np.concatenate([rgb, np.full((10, 13, 1), peak, dtype)], axis=2)
    up = Upscaler(Toy(3), "cpu", tile=None)
    a, b = up.upscale_array(rgba, dtype), up.upscale_array(rgb, dtype)
    np.testing.assert_array_equal(a[:, :, :3], b)
    assert (a[:, :, 3] == peak).all()


def test_self_ensemble_is_the_mean_of_the_eight_transforms():
    model = Toy(2)
    x = rand(8, 13, 3).astype(np.float32) / 255
    got = Upscaler(model, "cpu", tile=None, self_ensemble=True).upscale_array(x, np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    outs = []
    with torch.no_grad():
        for k in range(4):
            for flip in (False, True):
                y = torch.rot90(t, k, (2, 3))
                y = model(y.flip(3) if flip else y)
                y = y.flip(3) if flip else y
                outs.append(torch.rot90(y, -k, (2, 3)))
    ref = torch.stack(outs).mean(0)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    plain = Upscaler(model, "cpu", tile=None).upscale_array(x, np.float32)
    assert np.abs(plain - got).max() > 1e-3  # the toy is not rotation invariant


# ---------------------------------------------------------------- batches

def test_bad_files_reported_others_done(tmp_path, toy_ckpt, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(rand(8, 8, 3)).save(src / f"good{i}.png")
    data = (src / "good0.png").read_bytes()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    (src / "zero.png").write_bytes(b"")
    rc = main(["upscale", str(src), str(tmp_path / "missing.png"), "-o", str(tmp_path / "out"),
               "--weights", str(toy_ckpt), "--device", "cpu", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1
    assert listed(tmp_path / "out") == ["good0.png", "good1.png"]
    assert "truncated.png: truncated or corrupt PNG" in cap.err
    assert "zero.png: empty file (0 bytes)" in cap.err
    assert "missing.png: no such file or folder" in cap.err
    assert "FAILED: 2 upscaled, 0 skipped" in cap.out and "3 failed, of 5 inputs" in cap.out


def test_skip_existing_unless_overwrite_and_relative_paths(tmp_path, toy_ckpt, capsys):
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    Image.fromarray(rand(6, 6, 3)).save(src / "top.png")
    Image.fromarray(rand(6, 6, 3)).save(src / "a" / "b" / "deep.jpg")
    Image.fromarray(rand(6, 6, 3)).save(tmp_path / "single.webp")
    out = tmp_path / "out"
    args = ["upscale", str(src), "-o", str(out), "--weights", str(toy_ckpt), "--device", "cpu",
            "--no-progress", "--recursive", "--suffix", "_x2", "--format", "png"]
    assert main(args) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST) == [
        "a/b/deep_x2.png", "top_x2.png"]
    (out / "top_x2.png").write_bytes(b"keep me")
    assert main(args) == 0
    assert "0 upscaled, 2 skipped" in capsys.readouterr().out
    assert (out / "top_x2.png").read_bytes() == b"keep me"
    assert main(args + ["--overwrite"]) == 0
    assert Image.open(out / "top_x2.png").size == (12, 12)
    # globs keep the path below the pattern's fixed part; a named file keeps its name
    items, problems = collect_inputs([str(src / "**" / "*.jpg"), str(tmp_path / "single.webp")], recursive=True)
    assert [str(r) for _, r in items] == ["a/b/deep.jpg", "single.webp"] and problems == []
    # without --recursive only the top folder
    items, _ = collect_inputs([str(src)])
    assert [str(r) for _, r in items] == ["top.png"]


def _up(args, toy_ckpt):
    return main(["upscale", *map(str, args), "--weights", str(toy_ckpt), "--device", "cpu", "--no-progress"])


def test_outputs_inside_the_inputs_are_left_out_of_the_next_run(tmp_path, toy_ckpt, capsys):
    """``upscale nest -o nest/up --recursive`` and ``upscale dir -o dir --suffix _x4`` (and a glob)
    run twice: the second run finds its own outputs and leaves them out of its inputs."""
    nest = tmp_path / "nest"
    (nest / "sub").mkdir(parents=True)
    Image.fromarray(rand(6, 6, 3)).save(nest / "a.png")
    Image.fromarray(rand(6, 6, 3)).save(nest / "sub" / "b.png")
    for _ in range(2):
        assert _up([nest, "-o", nest / "up", "--recursive"], toy_ckpt) == 0
    out = capsys.readouterr()
    assert not (nest / "up" / "up").exists()
    assert sorted(p.relative_to(nest).as_posix() for p in nest.rglob("*.png")) == [
        "a.png", "sub/b.png", "up/a.png", "up/sub/b.png"]
    assert "0 upscaled, 2 skipped" in out.out and "left out 2 file(s) under" in out.err
    flat = tmp_path / "dir"
    flat.mkdir()
    Image.fromarray(rand(6, 6, 3)).save(flat / "c.png")
    Image.fromarray(rand(6, 6, 3)).save(flat / "d.jpg")
    for _ in range(2):
        assert _up([flat, "-o", flat, "--suffix", "_x4"], toy_ckpt) == 0
        assert _up([flat / "*.png", "-o", flat, "--suffix", "_x4"], toy_ckpt) == 0
    assert listed(flat) == ["c.png", "c_x4.png", "d.jpg", "d_x4.jpg"]
    # outputs recorded in the folder are left out even under another suffix
    assert _up([flat, "-o", flat, "--suffix", "_big"], toy_ckpt) == 0
    assert listed(flat) == ["c.png", "c_big.png", "c_x4.png", "d.jpg", "d_big.jpg", "d_x4.jpg"]
    # a file named on the command line is the user's choice, even in the output folder
    items, _ = collect_inputs([flat / "c_x4.png", flat], out_dir=flat, suffix="_x4")
    assert [r.name for _, r in items] == ["c_x4.png", "c.png", "c_big.png", "d.jpg", "d_big.jpg"]


@pytest.mark.parametrize("suffix", ["/../../x", "..", "_x4/", "a\\b"])
def test_suffix_that_leaves_the_output_folder_is_refused(tmp_path, toy_ckpt, suffix, capsys):
    Image.fromarray(rand(6, 6, 3)).save(tmp_path / "x.png")
    # a missing checkpoint: the suffix is refused before the model is loaded
    rc = main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "a" / "b" / "o"), "--suffix", suffix,
               "--weights", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --suffix") and "may not contain a path separator or '..'" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["x.png"]
    with pytest.raises(ValueError, match="may not contain"):
        upscale_files([tmp_path / "x.png"], tmp_path / "o", Upscaler(Toy(2), "cpu"), suffix=suffix)


def test_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, toy_ckpt, capsys):
    Image.fromarray(rand(6, 6, 3)).save(tmp_path / "x.png")
    (tmp_path / "taken").write_bytes(b"a file")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        rc = main(["upscale", str(tmp_path / "x.png"), "-o", str(out), "--weights", str(tmp_path / "none.pth")])
        err = capsys.readouterr().err
        assert rc == 2 and f"output folder {out}" in err and "is an existing file" in err
        with pytest.raises(ValueError, match="is an existing file"):
            upscale_files([tmp_path / "x.png"], out, Upscaler(Toy(2), "cpu"))
    assert (tmp_path / "taken").read_bytes() == b"a file"


def test_skip_only_outputs_made_with_the_same_settings(tmp_path, monkeypatch, capsys):
    """An x3 run, then an x2 run into the same folder: the x2 run redoes the x3 outputs (and
    says why); a second x2 run skips them (and says why); a changed input or other weights
    are made again; a file the user put there is kept."""
    from distillsr.pretrained import save_pretrained
    for scale in (2, 3):
        save_pretrained(distillsr.create_model("toy-upscale-test", scale), "toy", tmp_path / "w")
    save_pretrained(distillsr.create_model("toy-upscale-test", 2, seed=1), "toy2", tmp_path / "w")
    monkeypatch.setenv("DISTILLSR_WEIGHTS_DIR", str(tmp_path / "w"))
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(rand(5, 7, 3)).save(src / "x.png")
    Image.fromarray(rand(5, 7, 3)).save(src / "y.jpg")

    def run(*extra):
        rc = main(["upscale", str(src), "-o", str(out), "--device", "cpu", "--no-progress", *extra])
        assert rc == 0
        return capsys.readouterr()

    run("--model", "toy", "--scale", "3")
    assert Image.open(out / "x.png").size == (21, 15)
    cap = run("--model", "toy", "--scale", "2")
    assert "2 upscaled, 0 skipped" in cap.out and Image.open(out / "x.png").size == (14, 10)
    assert f"redo: {out / 'x.png'}: was made with x3 toy, now x2 toy" in cap.err
    assert f"redo: {out / 'y.jpg'}: was made with x3 toy at quality 95, now x2 toy at quality 95" in cap.err
    cap = run("--model", "toy", "--scale", "2")
    assert "0 upscaled, 2 skipped (2 made with the same settings; --overwrite redoes them)" in cap.out
    assert f"skip: {out / 'x.png'}: made already from this input with x2 toy" in cap.err
    cap = run("--model", "toy", "--scale", "2", "--quality", "80")
    assert "1 upscaled, 1 skipped" in cap.out and "at quality 95, now x2 toy at quality 80" in cap.err
    Image.fromarray(rand(5, 7, 3)).save(src / "x.png")
    os.utime(src / "x.png", ns=(1, 1))  # a new input, whatever the clock's resolution
    cap = run("--model", "toy", "--scale", "2", "--quality", "80")
    assert "1 upscaled, 1 skipped" in cap.out and f"its input {src / 'x.png'} changed since" in cap.err
    cap = run("--model", "toy2", "--scale", "2", "--quality", "80")
    assert "2 upscaled, 0 skipped" in cap.out and "was made with x2 toy at quality 80, now x2 toy2" in cap.err
    (out / "x.png").write_bytes(b"the user's own file")
    cap = run("--model", "toy2", "--scale", "2", "--quality", "80")
    assert "0 upscaled, 2 skipped (1 made with the same settings, 1 not recorded as made by upscale" in cap.out
    assert (f"skip: {out / 'x.png'}: exists, and is not recorded as made by distillsr upscale (or was changed "
            "since)") in cap.err
    assert (out / "x.png").read_bytes() == b"the user's own file"
    import json
    record = json.loads((out / MANIFEST).read_text())["outputs"]["y.jpg"]
    assert (record["scale"], record["model"], record["quality"], record["input"]) == (
        2, "toy2", 80, str((src / "y.jpg").resolve()))


def test_name_collisions_follow_a_rule_and_hint_what_works(tmp_path, toy_ckpt, capsys):
    """Inputs that map to one output: the one already in the output's format wins, else the
    first by path, whatever the order they are named in; the others get a hint that works."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "a.jpg", "b.bmp", "b.png"):
        Image.fromarray(rand(6, 6, 3)).save(d / name)
    expect = Upscaler(Toy(2), "cpu", tile=None).upscale_array(np.asarray(Image.open(d / "a.png")), np.uint8)
    for order in (["a.jpg", "a.png"], ["a.png", "a.jpg"]):
        out = tmp_path / ("o" + order[0])
        assert _up([*(d / n for n in order), "-o", out, "--format", "png"], toy_ckpt) == 1
        err = capsys.readouterr().err
        np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), expect)
        assert (f"{d / 'a.jpg'}: its output {out / 'a.png'} is also the output of {d / 'a.png'}, which is "
                "upscaled") in err
        assert "leave out --format: each output then keeps its input's format and extension" in err
    assert _up([d / "a.jpg", d / "a.png", "-o", tmp_path / "kept"], toy_ckpt) == 0  # the hint works
    assert listed(tmp_path / "kept") == ["a.jpg", "a.png"]
    assert _up([d / "b.bmp", d / "b.png", "-o", tmp_path / "bmp"], toy_ckpt) == 1  # BMP is written as PNG
    assert "rename one of the inputs, or upscale it into another -o folder" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for sub in ("y", "x"):
        Image.fromarray(rand(6, 6, 3)).save(tmp_path / sub / "c.png")
    assert _up([tmp_path / "y" / "c.png", tmp_path / "x" / "c.png", "-o", tmp_path / "xy"], toy_ckpt) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'y' / 'c.png'}: its output" in err and "upscale them into separate -o folders" in err


def test_output_never_replaces_its_input(tmp_path, toy_ckpt, capsys):
    Image.fromarray(rand(6, 6, 3)).save(tmp_path / "x.png")
    before = (tmp_path / "x.png").read_bytes()
    rc = main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path), "--weights", str(toy_ckpt),
               "--device", "cpu", "--no-progress", "--overwrite"])
    assert rc == 1 and "would replace its own input" in capsys.readouterr().err
    assert (tmp_path / "x.png").read_bytes() == before


def test_jpeg_output_of_alpha_input_is_reported(tmp_path, toy_ckpt, capsys):
    Image.fromarray(rand(6, 6, 4)).save(tmp_path / "a.png")
    rc = main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--weights", str(toy_ckpt),
               "--device", "cpu", "--no-progress", "--format", "jpg"])
    assert rc == 1 and "alpha channel, which JPEG cannot store" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_wrong_scale_for_checkpoint_is_a_clear_error(tmp_path, toy_ckpt, capsys):
    Image.fromarray(rand(6, 6, 3)).save(tmp_path / "x.png")
    rc = main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--weights", str(toy_ckpt),
               "--scale", "4", "--device", "cpu"])
    assert rc == 2 and "upscales x2, not x4" in capsys.readouterr().err


def test_pretrained_model_by_name(tmp_path, monkeypatch, capsys):
    from distillsr.pretrained import save_pretrained
    save_pretrained(distillsr.create_model("toy-upscale-test", 3), "toy", tmp_path / "w")
    monkeypatch.setenv("DISTILLSR_WEIGHTS_DIR", str(tmp_path / "w"))
    Image.fromarray(rand(5, 7, 3)).save(tmp_path / "x.png")
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--model", "toy",
                 "--scale", "3", "--device", "cpu", "--no-progress"]) == 0
    assert Image.open(tmp_path / "o" / "x.png").size == (21, 15)
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--model", "toy",
                 "--scale", "2", "--device", "cpu"]) == 2
    assert "no pretrained weights 'toy' x2 are installed" in capsys.readouterr().err


def test_interrupted_batch_leaves_no_partial_output(tmp_path, monkeypatch):
    """Ctrl-C while the second image is being written: the first output is complete, the
    second leaves neither a file nor a temporary file, and the interrupt propagates."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(rand(16, 16, 3)).save(src / f"im{i}.png")
    real_encode = imgio._encode
    calls = []

    def encode(tmp, *a, **k):
        calls.append(tmp)
        if len(calls) == 2:
            with open(tmp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n half an image")
            raise KeyboardInterrupt
        return real_encode(tmp, *a, **k)

    monkeypatch.setattr(imgio, "_encode", encode)
    up = Upscaler(Toy(2), "cpu", tile=None)
    with pytest.raises(KeyboardInterrupt):
        upscale_files([src], tmp_path / "out", up, progress=False)
    assert listed(tmp_path / "out") == ["im0.png"]
    assert Image.open(tmp_path / "out" / "im0.png").size == (32, 32)


def test_bicubic_model_is_matlab_imresize(tmp_path, capsys):
    """``--model bicubic`` (as in eval) is MATLAB's bicubic resize, no network involved."""
    from distillsr.data.imresize import imresize
    img = rand(13, 11, 3)
    Image.fromarray(img).save(tmp_path / "x.png")
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"), "--model", "bicubic",
                 "--scale", "3", "--device", "cpu", "--no-progress"]) == 0
    assert "(x3, bicubic, cpu)" in capsys.readouterr().out
    got = np.asarray(Image.open(tmp_path / "o" / "x.png")).astype(int)
    matlab = imresize(img, 3).astype(int)  # MATLAB rounds each 1-D pass on uint8 data: within a level
    assert got.shape == (39, 33, 3) and np.abs(got - matlab).max() <= 1 and (got == matlab).mean() > 0.9
    f = rand(13, 11, 3).astype(np.float64) / 255
    y = distillsr.upscale(f, 4, "bicubic", device="cpu")
    rows = np.clip(imresize(f, size=(52, 11)), 0, 1)  # rows first, clipped between the passes
    np.testing.assert_allclose(y, np.clip(imresize(rows, size=(52, 44)), 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="takes no weights and no backend"):
        eng.load_runner("bicubic", 2, backend="onnxruntime")


def test_onnxruntime_export_is_announced_cached_and_onnx_weights_need_no_backend(tmp_path, toy_ckpt, capsys):
    """The first onnxruntime run says it exports once and where it caches the file (written with
    the user's file mode); later runs reuse it; a .onnx file runs without --backend, in the
    CLI and in distillsr.upscale."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    img = rand(9, 7, 3)
    Image.fromarray(img).save(tmp_path / "x.png")
    args = ["upscale", str(tmp_path / "x.png"), "--weights", str(toy_ckpt), "--backend", "onnxruntime",
            "--device", "cpu", "--no-progress"]
    old = os.umask(0o022)
    try:
        assert main(args + ["-o", str(tmp_path / "o1")]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    cached = list((Path(os.environ["DISTILLSR_CACHE"]) / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    assert f"exporting toy-upscale-test x2 to ONNX for onnxruntime (once; it can take a minute or more), " \
           f"cached as {cached[0]}" in err
    assert cached[0].stat().st_mode & 0o777 == 0o644
    assert main(args + ["-o", str(tmp_path / "o2")]) == 0
    assert "exporting" not in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o3"), "--weights", str(cached[0]),
                 "--device", "cpu", "--no-progress"]) == 0
    first = np.asarray(Image.open(tmp_path / "o1" / "x.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o3" / "x.png")), first)
    np.testing.assert_array_equal(distillsr.upscale(img, 2, cached[0], device="cpu"), first)
    np.testing.assert_array_equal(distillsr.upscale(img, 2, str(cached[0]), device="cpu"), first)
    assert main(["upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "o4"), "--weights",
                 str(tmp_path / "none.onnx")]) == 2
    assert f"error: {tmp_path / 'none.onnx'}: no such ONNX file" in capsys.readouterr().err


# ---------------------------------------------------------------- Python API

def test_api_returns_the_same_kind():
    model = Toy(2)
    pil = Image.fromarray(rand(7, 9, 4))
    out = distillsr.upscale(pil, 2, model, device="cpu")
    assert isinstance(out, Image.Image) and out.mode == "RGBA" and out.size == (18, 14)
    for dtype in (np.uint8, np.uint16):
        a = rand(7, 9, 3, dtype)
        y = distillsr.upscale(a, 2, model, device="cpu")
        assert y.dtype == dtype and y.shape == (14, 18, 3)
    g = rand(7, 9, 1)[:, :, 0].astype(np.float64) / 255
    y = distillsr.upscale(g, 2, model, device="cpu")
    assert y.dtype == np.float64 and y.shape == (14, 18) and 0 <= y.min() and y.max() <= 1
    t = torch.rand(2, 3, 7, 9)
    y = distillsr.upscale(t, 2, model, device="cpu")
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 14, 18) and y.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(y, model(t).clamp(0, 1), atol=1e-6, rtol=0)
    t8 = (torch.rand(3, 7, 9) * 255).to(torch.uint8)
    y = distillsr.upscale(t8, 2, model, device="cpu")
    assert y.dtype == torch.uint8 and y.shape == (3, 14, 18)
    with pytest.raises(ValueError, match="x2, not x4"):
        distillsr.upscale(t, 4, model, device="cpu")
    with pytest.raises(TypeError, match="PIL image, a numpy array or a torch tensor"):
        distillsr.upscale([1, 2, 3], 2, model, device="cpu")


def test_api_refuses_float_input_outside_0_1():
    """A float image in 0..255 would come back white: it is refused, saying what to do."""
    model = Toy(2)
    a255 = rand(7, 9, 3).astype(np.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], but they run from .* to 2\d\d; divide a "
                                         r"0\.\.255 image by 255 \(or pass it as uint8\)"):
        distillsr.upscale(a255, 2, model, device="cpu")
    with pytest.raises(ValueError, match="divide a 0..255 image by 255"):
        distillsr.upscale(torch.from_numpy(a255).permute(2, 0, 1), 2, model, device="cpu")
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        distillsr.upscale(torch.rand(3, 7, 9) * 2 - 1, 2, model, device="cpu")
    with pytest.raises(ValueError, match=r"from 1.01 to 1.01; clip it to \[0, 1\] first"):
        distillsr.upscale(np.full((7, 9), 1.01), 2, model, device="cpu")
    nan = np.zeros((7, 9, 3))
    nan[3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        distillsr.upscale(nan, 2, model, device="cpu")
    ok = distillsr.upscale(np.ones((7, 9, 3), np.float32), 2, model, device="cpu")  # the ends are fine
    assert ok.shape == (14, 18, 3)


def test_api_defaults_use_the_best_weights_present():
    """``distillsr.upscale(img, scale=4)``: with an empty cache the bundled e-rfdn-release x4."""
    from distillsr.pretrained import choose_default, load_pretrained
    assert choose_default(4).name == "e-rfdn-release"
    img = rand(12, 10, 3)
    out = distillsr.upscale(img, scale=4)
    net = load_pretrained("e-rfdn-release", 4)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        ref = imgio.from_float(net(x)[0].permute(1, 2, 0), np.uint8)
    assert out.dtype == np.uint8 and out.shape == (48, 40, 3)
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------- tiling and memory

class Local(SRNet):
    """Two 3x3 convolutions (a 5x5 receptive field: output pixels see 2 LR pixels around them)
    with strong weights: a tile edge changes the output near it, so misplaced tiles, a lost
    row of blend sums or a missing halo show."""

    def __init__(self, scale=2, seed=0):
        super().__init__()
        self.scale = scale
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 3 * scale * scale, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
        self.shuffle = torch.nn.PixelShuffle(scale)

    def forward_native(self, x):
        return self.shuffle(self.conv2(torch.relu(self.conv1(x))))


RADIUS = 2  # LR pixels Local reads around an output pixel


def _starts(length, tile, overlap):
    """Tile starts along an axis: every tile - overlap, the last one flush with the border."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def _ramp(n, r, left, right):
    w = np.ones(n)
    r = min(r, n // 2)
    up = np.arange(1, r + 1) / (r + 1)
    if left and r:
        w[:r] = up
    if right and r:
        w[n - r:] = up[::-1]
    return w


def whole_image_tiled(model, x, tile, overlap, blend, clip=True):
    """Reference: all tiles of the image blended at once (float64 sums), each tile side clamped
    to its own axis. ``x`` is H x W x 3 float; returns the H*s x W*s x 3 output (clipped)."""
    h, w, _ = x.shape
    s = model.scale
    th, tw = min(tile, h), min(tile, w)
    acc = np.zeros((h * s, w * s, 3))
    wsum = np.zeros((h * s, w * s, 1))
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()
    for i in _starts(h, th, overlap):
        for j in _starts(w, tw, overlap):
            with torch.no_grad():
                y = model(t[..., i:i + th, j:j + tw])[0].permute(1, 2, 0).double().numpy()
            if blend == "mean":
                wt = np.ones((th * s, tw * s, 1))
            else:
                wy = _ramp(th * s, overlap * s, i > 0, i + th < h)
                wx = _ramp(tw * s, overlap * s, j > 0, j + tw < w)
                wt = (wy[:, None] * wx[None, :])[:, :, None]
            acc[i * s:(i + th) * s, j * s:(j + tw) * s] += y * wt
            wsum[i * s:(i + th) * s, j * s:(j + tw) * s] += wt
    return np.clip(acc / wsum, 0, 1) if clip else acc / wsum


def clean_mask(length, tile, overlap, radius, scale):
    """Output positions along an axis that no tile sees within ``radius`` LR pixels of one of
    its inner edges (there, tiled and whole-image outputs must agree)."""
    ok = np.ones(length, bool)
    for i in _starts(length, min(tile, length), overlap):
        t = min(tile, length)
        if i > 0:
            ok[i:i + radius] = False
        if i + t < length:
            ok[i + t - radius:i + t] = False
    return ok.repeat(scale)


def model_output(model, x):
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return model(t)[0].permute(1, 2, 0).clamp(0, 1).numpy()


@pytest.mark.parametrize("blend", ["mean", "feather"])
@pytest.mark.parametrize("scale", [2, 3])
def test_tile_rows_equal_the_whole_image_tiled_at_once(monkeypatch, blend, scale):
    """Tiles are run one row of tiles at a time, and alpha in bands of rows: the result is the
    image's tiles blended all at once, equal to the whole-image output away from tile edges."""
    model = Local(scale).eval()
    x = rand(53, 41, 4).astype(np.float32) / 255
    monkeypatch.setattr(upscaler_mod, "ALPHA_BAND_BYTES", 1)  # alpha one LR row per band
    up = Upscaler(model, "cpu", tile=16, tile_overlap=4, blend=blend)
    tiled = up.upscale_array(x[:, :, :3], np.float32)
    assert up.last_tile == 16 and up.plan(53, 41) == (16, 16)
    np.testing.assert_allclose(tiled, whole_image_tiled(model, x[:, :, :3], 16, 4, blend), atol=1e-5)
    whole = model_output(model, x[:, :, :3])
    clean = np.outer(clean_mask(53, 16, 4, RADIUS, scale), clean_mask(41, 16, 4, RADIUS, scale))
    diff = np.abs(tiled[:, :, :3] - whole).max(axis=2)
    assert diff[clean].max() < 1e-5
    assert diff[~clean].max() > 1e-3  # tile edges do change the output: the checks above can fail
    alpha = F.interpolate(torch.from_numpy(x[:, :, 3])[None, None], scale_factor=scale, mode="bicubic",
                          align_corners=False)[0, 0].clamp(0, 1).numpy()
    # with alpha: colour tiled premultiplied, divided by the alpha of its own band
    rgba = up.upscale_array(x, np.float32)
    # 1e-5: a band's bicubic source coordinates (1/3 steps at x3) round apart from the whole image's
    np.testing.assert_allclose(rgba[:, :, 3], alpha, atol=1e-5)
    premul = whole_image_tiled(model, x[:, :, :3] * x[:, :, 3:], 16, 4, blend, clip=False)
    expect = np.clip(premul / np.where(alpha > 0, alpha, 1)[:, :, None], 0, 1)
    seen = alpha > 0.05
    np.testing.assert_allclose(rgba[:, :, :3][seen], expect[seen], atol=1e-4)


class Recording(torch.nn.Module):
    """Runs a model and records the shape of every input it is given (one per tile)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.scale, self.shapes = model, model.scale, []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[-2:]))
        return self.model(x)


def test_thin_images_get_tiles_clamped_to_each_side():
    """A 3x200 image at tile 64 runs as five 3x64 tiles (not 100 tiles of 3x3); a 20x192 strip
    has tile edges only across its width, so every pixel away from them is the whole image's."""
    rec = Recording(Local(2).eval())
    up = Upscaler(rec, "cpu", tile=64)
    up.upscale_array(rand(3, 200, 3).astype(np.float32) / 255, np.float32)
    assert rec.shapes == [(3, 64)] * 5 and up.tile_count(3, 200) == 5
    rec.shapes.clear()
    strip = rand(20, 192, 3).astype(np.float32) / 255
    tiled = up.upscale_array(strip, np.float32)
    assert rec.shapes == [(20, 64)] * 5
    whole = model_output(rec.model, strip)
    clean = clean_mask(192, 64, DEFAULT_OVERLAP, RADIUS, 2)
    diff = np.abs(tiled - whole).max(axis=2)
    assert diff[:, clean].max() < 1e-5
    np.testing.assert_allclose(tiled, whole_image_tiled(rec.model, strip, 64, DEFAULT_OVERLAP, "feather"),
                               atol=1e-5)


class FixedEstimate:
    """A runner stand-in with a known memory estimate (choose_tile arithmetic)."""
    scale = 2

    def memory_estimate(self, device):
        return eng.MemoryEstimate(per_pixel=1000.0, fixed=0.0)


def test_choose_tile_from_budget():
    r = FixedEstimate()
    budget = int(1.5 * 1000 * 100 * 100)  # exactly 100x100 LR pixels after the 1.5 safety factor
    assert choose_tile(r, 100, 100, "cpu", budget=budget) is None  # whole image fits
    assert choose_tile(r, 101, 100, "cpu", budget=budget) == 96    # sqrt(10000) -> multiple of 8
    assert choose_tile(r, 5000, 5000, "cpu", budget=1000) == eng.MIN_AUTO_TILE


def test_memory_estimate_measures_live_tensors():
    # Toy x2 keeps at most three 3 x 2h x 2w float maps alive: 3 * 3 * 4 * 4 = 144 bytes per LR pixel
    est = eng.estimate_memory(Toy(2).eval(), "cpu")
    assert est.per_pixel == pytest.approx(144, rel=0.1)
    # Local x2 peaks while shuffling: conv2's 12 maps of h x w and their shuffled copy, 2 * 12 * 4 bytes
    assert eng.estimate_memory(Local(2).eval(), "cpu").per_pixel == pytest.approx(96, rel=0.1)


def test_free_memory_from_meminfo_and_the_cgroup_limit(tmp_path):
    from distillsr.engine.device import cgroup_memory_available, host_memory_available
    (tmp_path / "meminfo").write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert host_memory_available(tmp_path / "meminfo") == 8000000 * 1024
    assert host_memory_available(tmp_path / "missing") is None
    cg = tmp_path / "cg"
    cg.mkdir()
    assert cgroup_memory_available(cg) is None  # no cgroup files
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("1000\n")
    assert cgroup_memory_available(cg) is None  # no limit
    (cg / "memory.max").write_text("5000\n")
    assert cgroup_memory_available(cg) == 4000
    (cg / "memory.current").write_text("9000\n")
    assert cgroup_memory_available(cg) == 0


def test_auto_tile_uses_whole_image_when_it_fits_and_tiles_otherwise():
    model = Local(2).eval()
    x = rand(100, 120, 3).astype(np.float32) / 255
    est = eng.estimate_memory(model, "cpu")
    budget = int(1.5 * est.bytes_for(80 * 80)) + 1  # room for an 80x80 tile, not the whole image
    big = Upscaler(model, "cpu", tile="auto", memory_budget=1 << 30)
    small = Upscaler(model, "cpu", tile="auto", memory_budget=budget)
    a, b = big.upscale_array(x, np.float32), small.upscale_array(x, np.float32)
    assert big.last_tile is None and small.last_tile == 80
    np.testing.assert_allclose(a, model_output(model, x), atol=1e-6)
    np.testing.assert_allclose(b, whole_image_tiled(model, x, 80, DEFAULT_OVERLAP, "feather"), atol=1e-5)


PEAK_GROWTH_BOUND = 1000 << 20  # bytes; see the README section "upscale" for what it covers


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc (Linux)")
def test_4000x3000_runs_tiled_within_memory_bound(tmp_path):
    """A 4000x3000 RGB input upscaled x2 on CPU with tile="auto" under a 64 MiB budget for the
    model: peak RSS growth stays under PEAK_GROWTH_BOUND (the image buffers: float input,
    uint8 output, the encoder's copy, one band of tiles). Whole-image inference of the same
    model grows it by more than PEAK_GROWTH_BOUND (benchmarks/upscale_memory.py, README)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import upscale_memory  # the worker runs in a fresh process; same script as the benchmark
    finally:
        sys.path.pop(0)
    upscale_memory.make_input(tmp_path / "big.png")
    tile, growth = upscale_memory.run_worker(tmp_path / "big.png", tmp_path / "big_x2.jpg", "auto", 64 << 20)
    assert tile != "None"
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth >> 20} MiB"
    with Image.open(tmp_path / "big_x2.jpg") as im:
        assert im.size == (8000, 6000)
