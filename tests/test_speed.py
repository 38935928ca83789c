"""The fast inference path and the training path of ASID give the official outputs; the
benchmark's plain baseline is the same network (so its speed-up ratios are fair)."""
import importlib.util

import numpy as np
import pytest
import torch

import distillsr
from distillsr import kernels
from distillsr.models.asid import fused_kernels
from conftest import REPO, shared_path

ATOL = 2e-6


def _fixture(name):
    return shared_path("fixtures", "asid", name)


def _load(path):
    return torch.from_numpy(np.load(path))


def _plain():
    spec = importlib.util.spec_from_file_location("asid_plain", REPO / "benchmarks" / "asid_plain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch, scale", [("asid", 2), ("asid_d8", 4)])
def test_every_path_reproduces_the_official_outputs(arch, scale):
    model = distillsr.load_model(_fixture(f"{arch}_x{scale}_official_random.pth"))
    x = _load(_fixture("input_37x45.npy"))
    ref = _load(_fixture(f"{arch}_x{scale}_out_37x45.npy"))
    plain = _plain()
    with torch.inference_mode():
        fused = model.forward_native(x)  # oneDNN post-ops and the C kernels
        with fused_kernels(False):
            unfused = model.forward_native(x)
        kernels.enabled = False
        try:
            onednn_only = model.forward_native(x)
        finally:
            kernels.enabled = True
        baseline = plain.forward_native(model, x)
    with torch.enable_grad():  # the training path: autograd through plain ops
        trained = model.forward_native(x).detach()
    for got in (fused, unfused, onednn_only, baseline, trained):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_fused_path_is_used_in_inference_only(monkeypatch):
    from distillsr.models import asid
    calls = []
    real = asid._MKLDNN
    if real is None or not asid._HAS_FUSED:
        pytest.skip("this torch build has no oneDNN fused ops")

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)
    monkeypatch.setattr(asid, "_MKLDNN", Spy())
    model = distillsr.create_model("asid", 2, blocks=1)
    x = torch.rand(1, 3, 16, 16)
    model(x).sum().backward()
    assert calls == []
    with torch.inference_mode():
        model(x)
    assert "_linear_pointwise" in calls and "_convolution_pointwise" in calls


def test_bf16_inference_stays_close():
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 4).eval()
    x = torch.rand(1, 3, 24, 40)
    with torch.inference_mode():
        ref = model(x)
        y = model.to(torch.bfloat16)(x.bfloat16()).float()
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert (y - ref).abs().max() < 0.05


def test_channel_slices_feed_the_fused_products_correctly():
    from distillsr.models.asid import pointwise
    torch.manual_seed(0)
    x = torch.rand(2, 8, 16, 48)
    w, b = torch.randn(24, 36), torch.randn(24)
    r = torch.rand(2, 8, 16, 60)[..., 12:36]  # a strided residual too
    with torch.inference_mode():
        fused = pointwise(x[..., 12:], w, b, add=r)
        with fused_kernels(False):
            plain = pointwise(x[..., 12:], w, b, add=r)
    ref = x[..., 12:].contiguous() @ w.t() + b + r
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)
