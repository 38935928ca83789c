"""Fuzz targets shared by tests/test_fuzz.py (a few hundred cases each, in CI) and
benchmarks/fuzz.py (as many as fit in N minutes).

Each target is a Hypothesis strategy of inputs and a check. The property every check asserts:
the input either works (and the result is sane) or raises the project's documented error
type (``ImageReadError``, ``CheckpointError``, ``ConfigError``) with a message naming the
file (the override, for configs); never another exception, never code run from the input.
The per-case deadline and the memory bound are the callers' (Hypothesis ``deadline``, the
peak resident memory checked around a run).
"""
from __future__ import annotations

import io
import pickle
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
from hypothesis import strategies as st
from PIL import Image

import train_helpers  # noqa: F401  (registers the tiny test network)
from distillsr import io as imgio
from distillsr.checkpoint import CheckpointError, load_model, save_model
from distillsr.engine.config import ConfigError, load_config
from distillsr.registry import create_model

# read_image's decompression-bomb guard, kept small so that absurd sizes are refused cheaply
MAX_PIXELS = 1_000_000


# ----------------------------------------------------------------------------- seed files

def _png16(arr: np.ndarray) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed.png"
        imgio.write_image(path, arr, bit_depth=16)
        return path.read_bytes()


def _pil_bytes(arr, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, fmt, **kw)
    return buf.getvalue()


def _tiff16(arr: np.ndarray) -> bytes:
    import tifffile
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="rgb", compression="zlib")
    return buf.getvalue()


def image_seeds() -> Dict[str, bytes]:
    """Small valid files of every input format (and the 16-bit and alpha layouts)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 6), dtype=np.uint8)
    rgb16 = rng.integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    return {
        "png": _pil_bytes(rgb, "PNG"),
        "png_rgba": _pil_bytes(rgba, "PNG"),
        "png_palette": _pil_bytes(Image.fromarray(rgb).quantize(8), "PNG"),
        "png16": _png16(rgb16),
        "jpeg": _pil_bytes(rgb, "JPEG", quality=90),
        "jpeg_grey": _pil_bytes(grey, "JPEG", quality=80),
        "webp": _pil_bytes(rgb, "WEBP", quality=80),
        "webp_lossless": _pil_bytes(rgba, "WEBP", lossless=True),
        "tiff": _pil_bytes(rgb, "TIFF"),
        "tiff_deflate": _pil_bytes(grey, "TIFF", compression="tiff_adobe_deflate"),
        "tiff16": _tiff16(rgb16),
        "bmp": _pil_bytes(rgb, "BMP"),
        "bmp_grey": _pil_bytes(grey, "BMP"),
    }


IMAGE_SEEDS = image_seeds()


# ----------------------------------------------------------------------------- mutations

def _png_chunks(data: bytes):
    pos, out = 8, []
    while pos + 8 <= len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        out.append([data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]])
        pos += 12 + n
    return out


def _png_join(chunks) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(imgio._png_chunk(k, d) for k, d in chunks)


@st.composite
def mutation(draw, size: int):
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert", "delete", "bigint"]))
    pos = draw(st.integers(0, max(0, size - 1)))
    if kind == "flip":
        return ("flip", pos, draw(st.integers(0, 7)))
    if kind == "truncate":
        return ("truncate", pos)
    if kind == "overwrite":
        return ("overwrite", pos, draw(st.binary(min_size=1, max_size=8)))
    if kind == "insert":
        return ("insert", pos, draw(st.binary(min_size=1, max_size=32)))
    if kind == "delete":
        return ("delete", pos, draw(st.integers(1, 64)))
    # an absurd or edge number where a header field may be
    value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x10000, 20000, 0x7FFFFFFF, 0xFFFFFFFF]))
    return ("bigint", min(pos, 64), value, draw(st.sampled_from([">I", "<I", ">H", "<H"])))


def apply_mutation(data: bytes, m) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(b)
    kind = m[0]
    if kind == "flip":
        pos = m[1] % len(b)
        b[pos] ^= 1 << m[2]
    elif kind == "truncate":
        del b[m[1]:]
    elif kind == "overwrite":
        pos = m[1] % len(b)
        b[pos:pos + len(m[2])] = m[2]
    elif kind == "insert":
        b[m[1]:m[1]] = m[2]
    elif kind == "delete":
        del b[m[1]:m[1] + m[2]]
    elif kind == "bigint":
        pos = m[1] % len(b)
        packed = struct.pack(m[3], m[2] & (0xFFFF if m[3].endswith("H") else 0xFFFFFFFF))
        b[pos:pos + len(packed)] = packed
    return bytes(b)


@st.composite
def png_chunk_edit(draw, data: bytes) -> bytes:
    """Edits that keep the chunk CRCs valid, so that decoders look past them: absurd IHDR
    sizes and depths, chunks dropped, repeated or reordered, IDAT data changed."""
    chunks = _png_chunks(data)
    kind = draw(st.sampled_from(["ihdr_size", "ihdr_field", "drop", "dup", "swap", "idat"]))
    if kind == "ihdr_size":
        w = draw(st.sampled_from([0, 1, 7, 20000, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF]))
        h = draw(st.sampled_from([0, 1, 9, 20000, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF]))
        chunks[0][1] = struct.pack(">II", w, h) + chunks[0][1][8:]
    elif kind == "ihdr_field":
        i = draw(st.integers(8, 12))
        d = bytearray(chunks[0][1])
        d[i] = draw(st.integers(0, 255))
        chunks[0][1] = bytes(d)
    elif kind == "drop" and len(chunks) > 1:
        del chunks[draw(st.integers(0, len(chunks) - 1))]
    elif kind == "dup":
        i = draw(st.integers(0, len(chunks) - 1))
        chunks.insert(i, list(chunks[i]))
    elif kind == "swap" and len(chunks) > 1:
        i = draw(st.integers(0, len(chunks) - 2))
        chunks[i], chunks[i + 1] = chunks[i + 1], chunks[i]
    elif kind == "idat":
        idx = [i for i, c in enumerate(chunks) if c[0] == b"IDAT"]
        if idx:
            i = idx[0]
            # the first IDAT may hold only the start of the stream (our 16-bit writer splits it)
            raw = bytearray(zlib.decompressobj().decompress(chunks[i][1])) if draw(st.booleans()) else None
            if raw:
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
                chunks[i][1] = zlib.compress(bytes(raw))
            else:
                chunks[i][1] = draw(st.binary(max_size=64))
    return _png_join(chunks)


@st.composite
def mutated_image(draw) -> bytes:
    name = draw(st.sampled_from(sorted(IMAGE_SEEDS)))
    data = IMAGE_SEEDS[name]
    if name.startswith("png") and draw(st.booleans()):
        data = draw(png_chunk_edit(data))
    for m in draw(st.lists(mutation(len(data)), min_size=0 if name.startswith("png") else 1, max_size=4)):
        data = apply_mutation(data, m)
    return data


random_bytes = st.one_of(
    st.binary(max_size=512),
    # random bytes behind a real format signature, so every decoder's parser is reached
    st.tuples(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x01\x00\x00WEBPVP8 ",
                               b"II*\x00", b"MM\x00*", b"BM", b"P6\n", b"P5\n", b"GIF89a"]),
              st.binary(max_size=512)).map(lambda t: t[0] + t[1]),
)


# ----------------------------------------------------------------------------- image reading

def check_read(data: bytes, path: Path) -> str:
    """read_image on ``data`` written to ``path``: a sane image, or ImageReadError naming it."""
    path.write_bytes(data)
    try:
        arr, info = imgio.read_image(path, max_pixels=MAX_PIXELS)
    except imgio.ImageReadError as e:
        assert str(path) in str(e), f"the message does not name the file: {e}"
        return "refused"
    assert arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[2] in (1, 2, 3, 4), arr.shape
    assert arr.shape[:2] == (info.height, info.width) and arr.shape[2] == info.channels
    assert 0 < info.width * info.height <= MAX_PIXELS
    assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
    return "read"


# ----------------------------------------------------------------------------- image writing

@st.composite
def image_to_write(draw):
    channels = draw(st.integers(1, 4))
    depth = draw(st.sampled_from([8, 16]))
    fmt = draw(st.sampled_from(["png", "tiff", "webp", "jpg"] if channels in (1, 3) else ["png", "tiff", "webp"]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    dtype = np.uint16 if depth == 16 else np.uint8
    arr = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, (h, w, channels), dtype=dtype)
    special = draw(st.sampled_from(["random", "zeros", "max", "constant_alpha"]))
    if special == "zeros":
        arr[:] = 0
    elif special == "max":
        arr[:] = np.iinfo(dtype).max
    elif special == "constant_alpha" and channels in (2, 4):
        arr[..., -1] = np.iinfo(dtype).max
    return arr, fmt


def check_roundtrip(case, folder: Path) -> str:
    """write_image then read_image: lossless formats give the pixels back exactly (JPEG and
    WebP hold 8 bits; WebP stores grey as RGB), JPEG keeps the size and channels."""
    arr, fmt = case
    path = folder / f"out.{fmt}"
    quality = 100 if fmt == "webp" else 95
    imgio.write_image(path, arr, quality=quality)
    back, info = imgio.read_image_native(path)
    h, w, c = arr.shape
    expect = arr
    if fmt in ("webp", "jpg") and arr.dtype == np.uint16:
        expect = imgio._to8(arr)
    if fmt == "webp" and c in (1, 2):  # grey is written as RGB(A)
        expect = np.concatenate([np.repeat(expect[..., :1], 3, axis=2), expect[..., 1:]], axis=2)
    if fmt == "webp" and c in (2, 4) and (expect[..., -1] == 255).all():
        expect = expect[..., :-1]  # an opaque alpha channel is not kept by libwebp
    assert back.shape[:2] == (h, w), (back.shape, arr.shape)
    if fmt == "jpg":
        assert back.shape[2] == c and back.dtype == np.uint8
        return "jpeg"
    assert back.dtype == expect.dtype and back.shape == expect.shape, (back.dtype, back.shape, expect.shape)
    assert np.array_equal(back, expect)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left
    return fmt


# ----------------------------------------------------------------------------- checkpoints

def _tiny_model():
    torch.manual_seed(0)
    return create_model(train_helpers.TINY, 2, channels=4)


def safetensors_seed(folder: Path) -> bytes:
    path = folder / "seed.safetensors"
    save_model(_tiny_model(), path)
    data = path.read_bytes()
    path.unlink()
    return data


def torch_seeds() -> Dict[str, bytes]:
    sd = _tiny_model().state_dict()
    out = {}
    for name, zipped in (("zip", True), ("legacy", False)):
        buf = io.BytesIO()
        torch.save(sd, buf, _use_new_zipfile_serialization=zipped)
        out[name] = buf.getvalue()
    return out


@st.composite
def safetensors_edit(draw, data: bytes) -> bytes:
    """Edits of the header length, of the JSON header (dtype, shape, offsets, metadata) and of
    the bytes."""
    import json
    n = struct.unpack("<Q", data[:8])[0]
    header, body = data[8:8 + n], data[8 + n:]
    kind = draw(st.sampled_from(["length", "json_text", "dtype", "shape", "offsets", "metadata", "bytes"]))
    if kind == "length":
        n2 = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(data), 1 << 31, 1 << 62, (1 << 64) - 1]))
        return struct.pack("<Q", n2 % (1 << 64)) + data[8:]
    if kind == "json_text":
        h = bytearray(header)
        for _ in range(draw(st.integers(1, 4))):
            h[draw(st.integers(0, len(h) - 1))] = draw(st.sampled_from(b'{}[]",:0123456789-eE. \\ax'))
        return struct.pack("<Q", len(h)) + bytes(h) + body
    doc = json.loads(header)
    names = sorted(k for k in doc if k != "__metadata__")
    name = draw(st.sampled_from(names))
    if kind == "dtype":
        doc[name]["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3",
                                                   "X99", "", "f32"]))
    elif kind == "shape":
        doc[name]["shape"] = draw(st.lists(st.sampled_from([0, 1, 3, 4, 1 << 20, 1 << 40, -1]), max_size=5))
    elif kind == "offsets":
        a, b = doc[name]["data_offsets"]
        doc[name]["data_offsets"] = draw(st.sampled_from([
            [b, a], [a, a], [a, b + 4], [a + 1, b + 1], [0, len(body) + 1], [-1, b], [a, 1 << 62],
            [a, None], "x", [a]]))
    elif kind == "metadata":
        meta = doc.setdefault("__metadata__", {})
        key = draw(st.sampled_from(["distillsr.arch", "distillsr.scale", "distillsr.options",
                                    "distillsr.pixel_range"]))
        meta[key] = draw(st.sampled_from(["", "x", "2", "0", "-4", "1e9", "99999999999999999999", "[]",
                                          "{", "{\"channels\": -3}", "{\"nope\": 1}", "[0, 255]", "[1]",
                                          "null", "rfdn", "asid", train_helpers.TINY, "\u00e9\u0000"]))
    else:
        return apply_mutation(data, draw(mutation(len(data))))
    h = json.dumps(doc).encode()
    return struct.pack("<Q", len(h)) + h + body


# callables a malicious pickle may name, each with arguments that would create the sentinel
def _payloads(sentinel: Path) -> List[tuple]:
    s = str(sentinel)
    return [
        ("posix", "system", (f"touch {s}",)),
        ("os", "system", (f"touch {s}",)),
        ("builtins", "exec", (f"open({s!r}, 'w').close()",)),
        ("builtins", "eval", (f"open({s!r}, 'w')",)),
        ("builtins", "open", (s, "w")),
        ("subprocess", "call", ([ "touch", s],)),
        ("pathlib", "Path.touch", ()),
        ("torch.serialization", "load", (s,)),
        ("__builtin__", "eval", (f"open({s!r}, 'w')",)),
    ]


def _global_call(module: str, name: str, args: tuple, proto: int) -> bytes:
    """Pickle opcodes that call ``module.name(*args)``."""
    out = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return out + pickle.dumps(args, protocol=proto)[2 if proto >= 2 else 0:].rstrip(b".") + b"R"


def _inject(pkl: bytes, call: bytes, where: str) -> bytes:
    """Put a call into a pickle: as the whole object, or just after the protocol header (its
    result left on the stack, then popped)."""
    if where == "whole":
        return b"\x80\x02" + call + b"."
    head = 2 if pkl[:1] == b"\x80" else 0
    return pkl[:head] + call + b"0" + pkl[head:]


def _rezip(data: bytes, edit: Callable[[str, bytes], bytes]) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info, edit(info.filename, src.read(info.filename)))
    return out.getvalue()


@st.composite
def torch_file_edit(draw, seeds: Dict[str, bytes], sentinel: Path) -> bytes:
    """A torch file (zip archive or legacy pickle) with its pickle mutated or a malicious call
    injected (valid archive around it), or its bytes mutated."""
    kind = draw(st.sampled_from(["zip_pickle", "zip_inject", "legacy_inject", "legacy_bytes", "zip_bytes",
                                 "raw_pickle"]))
    payload = draw(st.sampled_from(_payloads(sentinel)))
    proto = draw(st.sampled_from([0, 2, 4]))
    call = _global_call(*payload, proto=proto)
    where = draw(st.sampled_from(["whole", "prefix"]))
    if kind == "zip_pickle":
        muts = draw(st.lists(mutation(400), min_size=1, max_size=3))

        def edit(name, blob):
            if name.endswith("data.pkl"):
                for m in muts:
                    blob = apply_mutation(blob, m)
            return blob
        return _rezip(seeds["zip"], edit)
    if kind == "zip_inject":
        return _rezip(seeds["zip"], lambda name, blob: _inject(blob, call, where) if name.endswith("data.pkl")
                      else blob)
    if kind == "legacy_inject":  # the legacy format starts with a pickled magic number
        return _inject(seeds["legacy"], call, where)
    if kind == "raw_pickle":
        return _inject(b"\x80\x02}q\x00.", call, "whole")
    data = seeds["legacy" if kind == "legacy_bytes" else "zip"]
    for m in draw(st.lists(mutation(len(data)), min_size=1, max_size=3)):
        data = apply_mutation(data, m)
    return data


def check_load(data: bytes, path: Path, sentinel: Path) -> str:
    """load_model: a model, or CheckpointError naming the file; never runs code from it."""
    path.write_bytes(data)
    try:
        model = load_model(path)
    except CheckpointError as e:
        assert str(path) in str(e), f"the message does not name the file: {e}"
        outcome = "refused"
    else:
        assert isinstance(model, torch.nn.Module) and model.scale in (2, 3, 4)
        outcome = "loaded"
    assert not sentinel.exists(), "code from the checkpoint was run"
    return outcome


# ----------------------------------------------------------------------------- config overrides

_KEYS = ["name", "out_dir", "seed", "init_from", "init_strict", "init_linear", "init_upsampler",
         "model.arch", "model.scale", "model.options", "model.options.channels", "model.options.nope",
         "data.kind", "data.root", "data.lr_root", "data.patch_size", "data.batch_size", "data.flip",
         "data.repeat", "data.num_workers", "val.dir", "val.every", "val.ssim", "optim.name", "optim.lr",
         "optim.betas", "optim.eps", "optim.grad_clip", "sched.name", "sched.milestones", "sched.gamma",
         "sched.warmup_iters", "train.iters", "train.loss", "train.ema_decay", "train.amp", "train.device",
         "train.threads", "train.ckpt_every", "train.keep_ckpts", "train.progress", "model", "train",
         "train.iters.x", "modle.arch", ".", "a..b", "", "base"]
_VALUES = ["", "0", "1", "-1", "2", "4", "3.5", "1e400", "-1e400", ".inf", "-.inf", ".nan", "nan", "inf",
           "1e-300", "99999999999999999999999", "0x10", "0o7", "true", "false", "null", "~", "[]", "[1]",
           "[0.9, 0.999]", "[0.5, 2]", "[.nan, .inf]", "{}", "{a: 1}", "{channels: 4}", "[[1]]", "'5'",
           "abc", "asid", "rfdn", "cosine", "l1", "bf16", "cpu", "cuda:9", "{", "[", "'", "!!python/name:os.system",
           "&a [*a]", "\u00e9", "a\x00b", "- 1", "2020-01-01", "1_000", "+5"]


@st.composite
def overrides(draw) -> List[str]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        key = draw(st.one_of(st.sampled_from(_KEYS), st.text(max_size=12)))
        value = draw(st.one_of(st.sampled_from(_VALUES), st.text(max_size=12)))
        sep = draw(st.sampled_from(["=", "=", "=", "", "=="]))
        out.append(f"{key}{sep}{value}")
    return out


def check_config(over: List[str]) -> str:
    """load_config with overrides: a valid config, or ConfigError (never another exception)."""
    try:
        cfg = load_config(None, over)
    except ConfigError as e:
        assert str(e).strip()
        return "refused"
    assert cfg.train.iters > 0 and cfg.model.scale > 0
    return "loaded"
