"""Y-channel PSNR / SSIM against values derived by hand and a slow window-by-window SSIM."""
import math

import numpy as np
import pytest

from distillsr.metrics import mean_scores, psnr, psnr_ssim, rgb_to_y, ssim, to_uint8, y_channel


def _px(rgb):
    return np.array(rgb, dtype=np.uint8).reshape(1, 1, 3)


def test_y_of_pure_colours():
    # Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 with R, G, B in 0..255
    for rgb, y in [((0, 0, 0), 16.0), ((255, 255, 255), 235.0), ((255, 0, 0), 16 + 65.481),
                   ((0, 255, 0), 16 + 128.553), ((0, 0, 255), 16 + 24.966), ((10, 20, 30), 16 + (654.81 + 2571.06 + 748.98) / 255)]:
        assert rgb_to_y(_px(rgb))[0, 0] == pytest.approx(y, abs=2e-5)  # float32 step near 235 is 1.5e-5


def test_grey_conventions():
    g = np.full((2, 2), 128, np.uint8)
    assert y_channel(g, "raw")[0, 0] == 128.0
    assert y_channel(g, "replicate")[0, 0] == pytest.approx(16 + 219 * 128 / 255, abs=2e-5)
    # an RGB SR of a greyscale test image, with R = G = B, is its grey value under raw
    rgb = np.full((2, 2, 3), 77, np.uint8)
    assert y_channel(rgb, "raw", grey_image=True)[0, 0] == pytest.approx(77.0, abs=1e-12)
    # an RGB test image is always scored on Y, also under raw
    assert y_channel(rgb, "raw")[0, 0] == pytest.approx(16 + 219 * 77 / 255, abs=2e-5)
    with pytest.raises(ValueError, match="grey convention"):
        y_channel(g, "gray")


def test_psnr_by_hand():
    a = np.arange(400, dtype=np.float64).reshape(20, 20) % 200
    assert psnr(a, a + 5) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-12)  # 34.1514 dB
    b = a.copy()
    b[::2] += 2  # half the pixels off by 2: MSE = 2
    assert psnr(a, b) == pytest.approx(10 * math.log10(65025 / 2), abs=1e-12)
    assert psnr(a, a) == math.inf


def _ramp_image(h=24, w=30, channels=None):
    y, x = np.mgrid[0:h, 0:w]
    img = (40 + 3 * x + 2 * y + 7 * ((x * y) % 5)).astype(np.uint8)
    return img if channels is None else np.repeat(img[:, :, None], channels, axis=2)


def test_psnr_ssim_on_grey_images_follows_the_convention():
    hr = _ramp_image()
    sr = hr + 5
    p_raw, s_raw = psnr_ssim(sr, hr, 2, grey="raw")
    assert p_raw == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)
    p_rep, _ = psnr_ssim(sr, hr, 2, grey="replicate")
    # replicated to RGB, a grey step of 5 is a Y step of 5 * 219 / 255
    assert p_rep == pytest.approx(20 * math.log10(255 / (5 * 219 / 255)), abs=1e-4)
    # SR as three equal channels scores as the grey SR
    p3, s3 = psnr_ssim(np.repeat(sr[:, :, None], 3, 2), hr, 2, grey="raw")
    assert p3 == pytest.approx(p_raw, abs=1e-9) and s3 == pytest.approx(s_raw, abs=1e-12)


def test_psnr_on_rgb_uses_y():
    hr = _ramp_image(channels=3)
    hr[:, :, 1] //= 2
    sr = hr.copy()
    sr[:, :, 0] += 10  # Y moves by 10 * 65.481 / 255 everywhere
    p, _ = psnr_ssim(sr, hr, 3)
    assert p == pytest.approx(20 * math.log10(255 / (10 * 65.481 / 255)), abs=1e-4)


def test_psnr_and_ssim_take_images_and_crop():
    hr = _ramp_image(channels=3)
    sr = hr.copy()
    sr[5:9, 7:12, 2] += 9
    sr[0, :, :] = 0  # inside the border crop
    p, s = psnr_ssim(sr, hr, 2)
    assert psnr(sr, hr, crop=2) == p and ssim(sr, hr, crop=2) == s
    assert ssim(sr, hr, "matlab", crop=2) == psnr_ssim(sr, hr, 2, ssim_variant="matlab")[1]
    assert psnr(sr, hr) < p


def test_border_crop_is_scale_pixels():
    hr = _ramp_image(channels=3)
    sr = hr.copy()
    sr[:3] = 0
    sr[-3:] = 255
    sr[:, :3] = 0
    sr[:, -3:] = 255
    p, s = psnr_ssim(sr, hr, 3)
    assert p == math.inf and s == 1.0
    sr[3, 3] = 0  # first pixel inside the crop
    p, s = psnr_ssim(sr, hr, 3)
    assert p < 60 and s < 1.0


def test_ssim_of_constant_images_by_hand():
    a = np.full((20, 20), 100.0)
    b = np.full((20, 20), 110.0)
    c1 = (0.01 * 255) ** 2
    # no variance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1); the same on [0, 1] with L = 1
    want = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert ssim(a, b, "wang") == pytest.approx(want, abs=1e-12)
    assert ssim(a, b, "matlab") == pytest.approx(want, abs=1e-12)
    assert ssim(a, a, "wang") == 1.0


def _window():
    x = np.arange(11) - 5.0
    g = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * 1.5 ** 2))
    return g / g.sum()


def _ssim_loops(a, b, L, pad):
    """SSIM window by window with weighted two-pass (co)variances."""
    if pad:
        a, b = np.pad(a, 5, mode="edge"), np.pad(b, 5, mode="edge")
    g = _window()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (g * pa).sum(), (g * pb).sum()
            va, vb = (g * (pa - ma) ** 2).sum(), (g * (pb - mb) ** 2).sum()
            cov = (g * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals)), len(vals)


def test_ssim_matches_window_by_window_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 19)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    want, n = _ssim_loops(a, b, 255.0, pad=False)
    assert n == 6 * 9  # 'valid'
    assert ssim(a, b, "wang") == pytest.approx(want, rel=1e-10)
    want, n = _ssim_loops(a / 255, b / 255, 1.0, pad=True)
    assert n == 16 * 19  # map of the image's size
    assert ssim(a, b, "matlab") == pytest.approx(want, rel=1e-10)
    assert ssim(a, b, "wang") != pytest.approx(ssim(a, b, "matlab"), abs=1e-4)


def test_mean_and_quantisation():
    m = mean_scores([(30.0, 0.9), (32.0, 0.8)])
    assert m == {"psnr": 31.0, "ssim": pytest.approx(0.85)}
    assert math.isnan(mean_scores([])["psnr"])
    np.testing.assert_array_equal(to_uint8(np.array([-0.1, 0.0, 0.2, 0.999, 1.0, 1.3])), [0, 0, 51, 255, 255, 255])


def test_bad_arguments():
    a = np.zeros((20, 20), np.uint8)
    with pytest.raises(ValueError, match="SSIM variant"):
        psnr_ssim(a, a, 2, ssim_variant="skimage")
    with pytest.raises(ValueError, match="20x20"):
        psnr_ssim(np.zeros((20, 22), np.uint8), a, 2)
    with pytest.raises(TypeError, match="uint8"):
        psnr_ssim(a.astype(np.float32), a, 2)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
