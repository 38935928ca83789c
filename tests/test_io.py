"""distillsr.io: every kind of image round-trips with its size, mode, bit depth, alpha, ICC."""
import os
import struct
import zlib

import numpy as np
import png  # pypng: an independent 16-bit PNG reader / writer
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps

from distillsr import io as imgio
from distillsr.io import ImageReadError, ImageWriteError, read_image, read_image_native, write_image

RNG = np.random.default_rng(0)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def rand(h, w, c, dtype):
    hi = 255 if dtype == np.uint8 else 65535
    return RNG.integers(0, hi + 1, (h, w, c)).astype(dtype)


def listing(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- 8-bit kinds written by Pillow

@pytest.mark.parametrize("mode,channels,ext", [
    ("L", 1, "png"), ("L", 1, "tif"), ("LA", 2, "png"), ("LA", 2, "tif"),
    ("RGB", 3, "png"), ("RGB", 3, "tif"), ("RGBA", 4, "png"), ("RGBA", 4, "tif"),
    ("RGBA", 4, "webp")])
def test_8bit_modes_round_trip(tmp_path, mode, channels, ext):
    a = rand(13, 17, channels, np.uint8)
    src = tmp_path / f"in.{ext}"
    kw = {"lossless": True} if ext == "webp" else {}
    Image.fromarray(a[:, :, 0] if channels == 1 else a, mode).save(src, **kw)
    arr, info = read_image(src)
    assert arr.dtype == np.float32 and arr.shape == (13, 17, channels)
    assert (info.width, info.height, info.channels, info.bit_depth) == (17, 13, channels, 8)
    np.testing.assert_array_equal(np.rint(arr * 255).astype(np.uint8), a)
    dst = write_image(tmp_path / f"out.{ext}", arr, bit_depth=info.bit_depth, quality=100)  # webp lossless
    back = Image.open(dst)
    assert back.mode == mode and back.size == (17, 13)
    got = np.asarray(back)
    np.testing.assert_array_equal(got.reshape(a.shape), a)


def test_palette_and_1bit_become_rgb_and_grey(tmp_path):
    a = rand(10, 12, 3, np.uint8)
    p = Image.fromarray(a).quantize(16)
    p.save(tmp_path / "p.png")
    arr, info = read_image_native(tmp_path / "p.png")
    assert info.source_mode == "P" and info.channels == 3
    np.testing.assert_array_equal(arr, np.asarray(p.convert("RGB")))
    # palette with a transparent index -> RGBA
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    arr, info = read_image_native(tmp_path / "pt.png")
    assert info.channels == 4 and info.has_alpha
    assert set(np.unique(arr[:, :, 3])) <= {0, 255} and (arr[:, :, 3] == 0).any()
    # 1-bit -> 8-bit grey 0 / 255
    b = Image.fromarray(a[:, :, 0] > 127)
    b.save(tmp_path / "b.png")
    arr, info = read_image_native(tmp_path / "b.png")
    assert info.channels == 1 and info.bit_depth == 8
    np.testing.assert_array_equal(arr[:, :, 0], np.where(a[:, :, 0] > 127, 255, 0))


# ---------------------------------------------------------------- 16-bit kinds

@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grey_stays_16bit(tmp_path, ext):
    a = rand(11, 9, 1, np.uint16)
    Image.fromarray(a[:, :, 0]).save(tmp_path / f"g.{ext}")
    arr, info = read_image_native(tmp_path / f"g.{ext}")
    assert info.bit_depth == 16 and info.channels == 1 and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr, a)
    write_image(tmp_path / f"o.{ext}", arr)
    back = Image.open(tmp_path / f"o.{ext}")
    assert back.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(back).astype(np.uint16), a[:, :, 0])


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_png_read_and_write(tmp_path, channels):
    a = rand(7, 10, channels, np.uint16)
    # written by pypng (independent of our encoder)
    with open(tmp_path / "in.png", "wb") as f:
        png.Writer(10, 7, greyscale=channels <= 2, alpha=channels in (2, 4), bitdepth=16).write(
            f, a.reshape(7, -1))
    arr, info = read_image(tmp_path / "in.png")
    assert info.bit_depth == 16 and info.channels == channels
    np.testing.assert_array_equal(np.rint(arr * 65535).astype(np.uint16), a)
    # our encoder, read back by pypng
    write_image(tmp_path / "out.png", arr, bit_depth=16, icc_profile=SRGB)
    w, h, rows, meta = png.Reader(filename=str(tmp_path / "out.png")).asDirect()
    assert (w, h, meta["bitdepth"], meta["planes"]) == (10, 7, 16, channels)
    np.testing.assert_array_equal(np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(a.shape), a)
    assert Image.open(tmp_path / "out.png").info["icc_profile"] == SRGB


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16bit_colour_tiff_read_and_write(tmp_path, channels):
    a = rand(6, 8, channels, np.uint16)
    kw = {"extrasamples": ["unassalpha"]} if channels in (2, 4) else {}
    tifffile.imwrite(tmp_path / "in.tif", a, photometric="rgb" if channels >= 3 else "minisblack", **kw)
    arr, info = read_image_native(tmp_path / "in.tif")
    assert info.bit_depth == 16 and info.channels == channels
    np.testing.assert_array_equal(arr, a)
    write_image(tmp_path / "out.tif", arr, icc_profile=SRGB)
    with tifffile.TiffFile(tmp_path / "out.tif") as tf:
        page = tf.pages[0]
        np.testing.assert_array_equal(page.asarray().reshape(a.shape), a)
        assert page.dtype == np.uint16
        assert bytes(page.tags["InterColorProfile"].value) == SRGB


def test_16bit_to_8bit_formats_rounds(tmp_path):
    a = np.array([[[0, 257 * 128, 65535]]], np.uint16)
    write_image(tmp_path / "o.webp", a, quality=100)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.webp"))[0, 0], [0, 128, 255])


# ---------------------------------------------------------------- EXIF orientation, ICC

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_and_dropped(tmp_path, orientation):
    a = rand(5, 8, 3, np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "TestCam"  # Make: must survive
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif.tobytes())
    arr, info = read_image_native(tmp_path / "o.png")
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    np.testing.assert_array_equal(arr, expected)
    assert (info.width, info.height) == (expected.shape[1], expected.shape[0])
    assert info.orientation == orientation
    write_image(tmp_path / "w.jpg", arr, exif=info.exif)
    out_exif = Image.open(tmp_path / "w.jpg").getexif()
    assert 0x0112 not in out_exif and out_exif[0x010F] == "TestCam"


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "tif"])
def test_icc_profile_carried(tmp_path, ext):
    a = rand(9, 9, 3, np.uint8)
    Image.fromarray(a).save(tmp_path / f"i.{ext}", icc_profile=SRGB)
    arr, info = read_image(tmp_path / f"i.{ext}")
    assert info.icc_profile == SRGB
    write_image(tmp_path / f"o.{ext}", arr, icc_profile=info.icc_profile)
    assert Image.open(tmp_path / f"o.{ext}").info.get("icc_profile") == SRGB


def test_output_gets_normal_file_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_image(tmp_path / "p.png", rand(4, 4, 3, np.uint8))
    finally:
        os.umask(mask)
    assert (os.stat(tmp_path / "p.png").st_mode & 0o777) == 0o644


def test_jpeg_quality_option(tmp_path):
    a = rand(64, 64, 3, np.uint8)
    write_image(tmp_path / "lo.jpg", a, quality=20)
    write_image(tmp_path / "hi.jpg", a, quality=98)
    assert os.path.getsize(tmp_path / "lo.jpg") < os.path.getsize(tmp_path / "hi.jpg")
    err = lambda p: np.abs(np.asarray(Image.open(p)).astype(int) - a).mean()  # noqa: E731
    assert err(tmp_path / "hi.jpg") < err(tmp_path / "lo.jpg")


def test_jpeg_refuses_alpha(tmp_path):
    with pytest.raises(ImageWriteError, match="alpha"):
        write_image(tmp_path / "x.jpg", rand(4, 4, 4, np.uint8))
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- bad inputs

def test_empty_and_truncated_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    Image.fromarray(rand(64, 64, 3, np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: truncated or corrupt"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"text\.png: not a readable image"):
        read_image(tmp_path / "text.png")


def _png_claiming(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def test_decompression_bomb_refused_unless_allowed(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_claiming(30000, 30000))  # 900 MP in 100 bytes
    with pytest.raises(ImageReadError, match=r"bomb\.png: 30000x30000 = 900,000,000 pixels.*max-pixels"):
        read_image(tmp_path / "bomb.png")
    Image.fromarray(rand(100, 100, 3, np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(ImageReadError, match="10,000 pixels is more than the limit of 5,000"):
        read_image(tmp_path / "ok.png", max_pixels=5000)
    assert read_image(tmp_path / "ok.png", max_pixels=10000)[0].shape == (100, 100, 3)
    assert read_image(tmp_path / "ok.png", max_pixels=None)[0].shape == (100, 100, 3)


# ---------------------------------------------------------------- atomic writing

@pytest.mark.parametrize("ext,channels,dtype", [("png", 3, np.uint8), ("png", 4, np.uint16),
                                                ("tif", 3, np.uint16), ("jpg", 3, np.uint8)])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, ext, channels, dtype):
    """The encoder dies after writing part of the file: no output and no temporary file remain,
    and an existing output is left as it was."""
    real_open = open

    class Boom(KeyboardInterrupt):
        pass

    real_encode = imgio._encode

    def encode_then_die(tmp, *a, **k):
        real_encode(tmp, *a, **k)
        assert os.path.getsize(tmp) > 0  # a real partial/complete temp file exists at this point
        with real_open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
        raise Boom()

    monkeypatch.setattr(imgio, "_encode", encode_then_die)
    with pytest.raises(Boom):
        write_image(tmp_path / f"new.{ext}", rand(20, 20, channels, dtype))
    assert listing(tmp_path) == []
    (tmp_path / f"old.{ext}").write_bytes(b"previous content")
    with pytest.raises(Boom):
        write_image(tmp_path / f"old.{ext}", rand(20, 20, channels, dtype))
    assert listing(tmp_path) == [f"old.{ext}"]
    assert (tmp_path / f"old.{ext}").read_bytes() == b"previous content"


def test_cmyk_becomes_rgb_without_its_profile(tmp_path):
    a = rand(8, 8, 4, np.uint8)
    Image.fromarray(a, "CMYK").save(tmp_path / "c.jpg", icc_profile=b"cmyk profile bytes", quality=95)
    arr, info = read_image_native(tmp_path / "c.jpg")
    assert info.source_mode == "CMYK" and info.channels == 3 and info.icc_profile is None
    np.testing.assert_array_equal(arr, np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")))
