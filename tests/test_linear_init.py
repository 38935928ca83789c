"""Least-squares initialisation of ASID's linear path."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distillsr
from distillsr.engine.linear_init import apply_linear_init, fit_subpixel_filter


def _filter_output(lr, weight, bias, scale):
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float()
    y = F.conv2d(x, torch.from_numpy(weight).float(), torch.from_numpy(bias).float(), padding=1)
    return F.pixel_shuffle(y, scale)


@pytest.mark.parametrize("scale", [2, 3])
def test_fit_recovers_a_known_subpixel_filter(scale):
    rng = np.random.default_rng(0)
    true_w = rng.normal(0, 0.2, (3 * scale * scale, 3, 3, 3))
    true_b = rng.normal(0, 0.1, 3 * scale * scale)
    pairs = []
    for _ in range(3):
        lr = rng.random((20, 24, 3))
        hr = _filter_output(lr, true_w, true_b, scale)[0].permute(1, 2, 0).double().numpy()
        pairs.append((lr, hr))
    w, b = fit_subpixel_filter(pairs, scale, samples_per_image=0, ridge=0)
    np.testing.assert_allclose(w, true_w, atol=1e-4)
    np.testing.assert_allclose(b, true_b, atol=1e-4)


def test_initialised_asid_computes_exactly_the_filter():
    scale = 2
    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.2, (12, 3, 3, 3))
    bias = rng.normal(0, 0.1, 12)
    torch.manual_seed(0)
    model = apply_linear_init(distillsr.create_model("asid", scale), weight, bias).eval()
    lr = rng.random((16, 24, 3))
    with torch.no_grad():
        got = model(torch.from_numpy(lr).permute(2, 0, 1)[None].float())
    torch.testing.assert_close(got, _filter_output(lr, weight, bias, scale), atol=1e-5, rtol=0)
    # nothing is frozen: the deep body gets gradients once fuse has moved
    model.train()
    model(torch.rand(1, 3, 16, 16)).mean().backward()
    assert model.fuse.weight.grad is not None and model.fuse.weight.grad.abs().sum() > 0


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="not x2"):
        fit_subpixel_filter([(np.zeros((8, 8, 3)), np.zeros((15, 16, 3)))], 2)
    with pytest.raises(TypeError, match="linear init"):
        apply_linear_init(torch.nn.Conv2d(3, 3, 1), np.zeros((12, 3, 3, 3)), np.zeros(12))
