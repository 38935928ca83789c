"""MATLAB-compatible bicubic imresize: bit-exact against the benchmark LR files (MATLAB's
own outputs), hand-derived weights, and a slow loop-by-loop reference implementation."""
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_path
from distillsr.data.benchmark import make_lr, modcrop
from distillsr.data.imresize import imresize, imresize_torch, resize_weights


# ------------------------------------------------------------------ oracle: MATLAB's files

def _benchmark_pairs():
    root = shared_path("data", "benchmark")
    pairs = []
    for hr_path in sorted(root.glob("*/HR/*.png")):
        set_dir = hr_path.parent.parent
        for s in (2, 3, 4):
            pairs.append((hr_path, set_dir / "LR_bicubic" / f"X{s}" / f"{hr_path.stem}x{s}.png", s))
    return pairs


def _read(p):
    return np.asarray(Image.open(p))


def test_numpy_reproduces_every_benchmark_lr_bit_for_bit():
    pairs = _benchmark_pairs()
    assert len(pairs) == 119 * 3
    for hr_path, lr_path, s in pairs:
        hr, lr = _read(hr_path), _read(lr_path)
        out = imresize(modcrop(hr, s), 1 / s)
        assert out.dtype == np.uint8 and out.shape == lr.shape, (lr_path, out.shape, lr.shape)
        n_diff = int((out != lr).sum())
        assert n_diff == 0, f"{lr_path}: {n_diff} pixels differ"


@pytest.fixture
def one_thread():
    # many small element-wise ops: on the shared CI machine, intra-op threads mostly wait on each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_torch_reproduces_every_benchmark_lr_bit_for_bit_batched(one_thread):
    # images of one size go through as N x C x H x W batches (of up to 8 of B100's landscape ones, ...)
    groups = defaultdict(list)
    for hr_path, lr_path, s in _benchmark_pairs():
        hr = modcrop(_read(hr_path), s)
        hr = hr[:, :, None] if hr.ndim == 2 else hr
        groups[(hr.shape, s)].append((hr, _read(lr_path)))
    batches = [(s, items[i:i + 8]) for (_, s), items in groups.items() for i in range(0, len(items), 8)]
    assert max(len(b) for _, b in batches) == 8
    checked = 0
    for s, items in batches:
        x = torch.from_numpy(np.stack([h for h, _ in items])).permute(0, 3, 1, 2)
        out = imresize_torch(x, 1 / s)
        assert out.dtype == torch.uint8
        out = out.permute(0, 2, 3, 1).numpy()
        for o, (_, lr) in zip(out, items):
            lr = lr[:, :, None] if lr.ndim == 2 else lr
            assert o.shape == lr.shape and (o == lr).all()
            checked += 1
    assert checked == 119 * 3


def test_make_lr_is_modcrop_then_imresize():
    hr = _read(shared_path("data", "benchmark", "Set14", "HR", "comic.png"))  # 250 x 360: not a multiple of 3 or 4
    lr = _read(shared_path("data", "benchmark", "Set14", "LR_bicubic", "X3", "comicx3.png"))
    assert (make_lr(hr, 3) == lr).all()


# ------------------------------------------------------------------ hand-derived weights

def test_x2_downscale_weights_by_hand():
    # h(t) = 0.5 * cubic(0.5 t) at t = +-0.5, 1.5, 2.5, 3.5 (the +-4.5 taps are 0 for every output):
    # cubic(0.25) = 0.8671875, cubic(0.75) = 0.2265625, cubic(1.25) = -0.0703125, cubic(1.75) = -0.0234375
    interior = [-0.01171875, -0.03515625, 0.11328125, 0.43359375,
                0.43359375, 0.11328125, -0.03515625, -0.01171875]
    idx, w = resize_weights(20, 10, 0.5)
    assert w.shape == (10, 8)
    np.testing.assert_array_equal(w[4], interior)
    # output 5 (1-based) samples u = 9.5: input pixels 6..13 (1-based)
    np.testing.assert_array_equal(idx[4], np.arange(5, 13))
    # output 1: u = 1.5, pixels -2..5 clamped to 1..5 (replicated edge)
    np.testing.assert_array_equal(idx[0], [0, 0, 0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(w[0], interior)


def test_x2_upscale_weights_by_hand():
    # u = x/2 + 0.25; odd x: distances 1.75, 0.75, -0.25, -1.25; even x: 1.25, 0.25, -0.75, -1.75
    idx, w = resize_weights(5, 10, 2.0)
    assert w.shape == (10, 4)
    np.testing.assert_array_equal(w[2], [-0.0234375, 0.2265625, 0.8671875, -0.0703125])
    np.testing.assert_array_equal(w[3], [-0.0703125, 0.8671875, 0.2265625, -0.0234375])
    np.testing.assert_array_equal(idx[4], [0, 1, 2, 3])   # x = 5: u = 2.75, pixels 1..4 (1-based)
    np.testing.assert_array_equal(idx[2], [0, 0, 1, 2])   # x = 3: u = 1.75, pixels 0..3 clamped
    np.testing.assert_array_equal(idx[0], [0, 0, 0, 1])   # x = 1: u = 0.75, pixels -1..2 clamped


def test_rounding_is_half_away_from_zero_and_clipped():
    # a step 0 | 1 between pixels 7 and 8 (1-based) shrunk x2: output 4 samples u = 7.5, right on
    # the step, and is exactly 0.4336 + 0.1133 - 0.0352 - 0.0117 = 0.5 (dyadic weights), which
    # MATLAB rounds to 1 (numpy's half-to-even would give 0); outputs 3 and 5 are -0.047 -> 0
    # and 1.047 -> 1.
    row = np.array([[0] * 7 + [1] * 9], dtype=np.uint8)
    np.testing.assert_array_equal(imresize(row, 0.5), [[0, 0, 0, 1, 1, 1, 1, 1]])
    # 255 | 0: 127.5 -> 128, the overshoot 255 * 1.047 is clipped to 255 and -11.95 to 0
    row = np.array([[255] * 7 + [0] * 9], dtype=np.uint8)
    np.testing.assert_array_equal(imresize(row, 0.5), [[255, 255, 255, 128, 0, 0, 0, 0]])


# ------------------------------------------------------------------ slow reference

def _ref_resize_1d(v, out_len, scale):
    """MATLAB's rules written out pixel by pixel, in plain Python floats."""
    def cubic(t):
        a = abs(t)
        if a <= 1:
            return 1.5 * a ** 3 - 2.5 * a ** 2 + 1
        if a <= 2:
            return -0.5 * a ** 3 + 2.5 * a ** 2 - 4 * a + 2
        return 0.0
    n = len(v)
    kw = 4 / scale if scale < 1 else 4.0
    out = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kw / 2)
        taps = [(left + k, (scale * cubic(scale * (u - left - k)) if scale < 1 else cubic(u - left - k)))
                for k in range(math.ceil(kw) + 2)]
        total = sum(wt for _, wt in taps)
        out.append(sum(wt / total * v[min(max(i, 1), n) - 1] for i, wt in taps))
    return out


def _ref_imresize_u8(img, out_h, out_w, sh, sw):
    def rnd(a):
        return min(max(math.floor(a + 0.5), 0), 255)
    h, w = img.shape
    passes = [(0, out_h, sh), (1, out_w, sw)] if sh <= sw else [(1, out_w, sw), (0, out_h, sh)]
    cur = [[int(p) for p in r] for r in img]
    for axis, n, s in passes:
        if axis == 0:
            cols = [_ref_resize_1d([r[j] for r in cur], n, s) for j in range(len(cur[0]))]
            cur = [[rnd(cols[j][i]) for j in range(len(cols))] for i in range(n)]
        else:
            cur = [[rnd(a) for a in _ref_resize_1d(r, n, s)] for r in cur]
    return np.array(cur, dtype=np.uint8)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4, 2, 3, 4])
def test_matches_loop_reference(scale):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(13, 17), dtype=np.uint8)
    img[4:9, 5:12] = 255  # strong edges: overshoots that are clipped between the passes
    out = imresize(img, scale)
    oh, ow = math.ceil(round(13 * scale, 9)), math.ceil(round(17 * scale, 9))
    assert out.shape == (oh, ow)
    np.testing.assert_array_equal(out, _ref_imresize_u8(img, oh, ow, scale, scale))


def test_size_argument_and_pass_order_follow_matlab():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(12, 20), dtype=np.uint8)
    # shrink width (scale 0.35) more than height (0.75): columns pass first
    out = imresize(img, size=(9, 7))
    np.testing.assert_array_equal(out, _ref_imresize_u8(img, 9, 7, 9 / 12, 7 / 20))
    # output size is ceil(scale * size)
    assert imresize(np.zeros((481, 321), np.uint8), 1 / 3).shape == (161, 107)


def test_colour_channels_are_resized_independently():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, size=(16, 12, 3), dtype=np.uint8)
    out = imresize(img, 1 / 2)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], imresize(img[:, :, c], 1 / 2))


# ------------------------------------------------------------------ float and torch paths

def test_float_resize_is_unrounded_and_linear():
    rng = np.random.default_rng(1)
    a = rng.random((24, 20))
    b = rng.random((24, 20))
    for s in (1 / 4, 3):
        ra, rb = imresize(a, s), imresize(b, s)
        assert ra.dtype == np.float64
        np.testing.assert_allclose(imresize(2 * a - b, s), 2 * ra - rb, atol=1e-12)
        np.testing.assert_allclose(imresize(np.full((24, 20), 0.3), s), 0.3, atol=1e-12)
    # float values on the uint8 scale, resized without rounding, round to the uint8 result
    # except where a pass would have rounded (so only compare loosely: within 1 grey level)
    u8 = rng.integers(0, 256, size=(24, 20), dtype=np.uint8)
    assert np.abs(imresize(u8.astype(np.float64), 1 / 2) - imresize(u8, 1 / 2)).max() <= 1.5


def test_torch_float_path_matches_numpy_float_and_batches():
    rng = np.random.default_rng(2)
    imgs = rng.random((3, 2, 30, 22)).astype(np.float32)
    for s in (1 / 2, 1 / 3, 4):
        out = imresize_torch(torch.from_numpy(imgs), s)
        assert out.dtype == torch.float32
        for n in range(3):
            for c in range(2):
                np.testing.assert_allclose(out[n, c].numpy(), imresize(imgs[n, c].astype(np.float64), s),
                                           atol=2e-6)
    # 2-D and 3-D inputs
    t = torch.from_numpy(imgs[0, 0])
    assert imresize_torch(t, 1 / 2).shape == (15, 11)
    assert imresize_torch(torch.from_numpy(imgs[0]), size=(10, 10)).shape == (2, 10, 10)


def test_torch_rounded_float_equals_uint8():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(2, 3, 27, 31), dtype=np.uint8)
    ref = imresize_torch(torch.from_numpy(img), 1 / 3)
    out = imresize_torch(torch.from_numpy(img).float(), 1 / 3, round_uint8=True)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref.float())
    np.testing.assert_array_equal(ref[1].permute(1, 2, 0).numpy(),
                                  imresize(np.ascontiguousarray(img[1].transpose(1, 2, 0)), 1 / 3))


def test_bad_input_is_refused_clearly():
    with pytest.raises(TypeError, match="int32"):
        imresize(np.zeros((4, 4), np.int32), 0.5)
    with pytest.raises(ValueError, match="shape"):
        imresize(np.zeros((2, 4, 4, 3), np.uint8), 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(np.zeros((4, 4), np.uint8), 0.5, size=(2, 2))
    with pytest.raises(ValueError, match="positive"):
        imresize(np.zeros((4, 4), np.uint8), -2)
    with pytest.raises(ValueError, match="uint8"):
        imresize_torch(torch.zeros(4, 4, dtype=torch.uint8), 2, round_uint8=False)
