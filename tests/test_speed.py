"""The prepared (fast) inference path, the paper modules and the training path of ASID
give the official outputs; what preparation changes and what undoes it; bf16; the
benchmark's plain baseline is the same network (so its speed-up ratios are fair)."""
import importlib.util

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distillsr
from distillsr import kernels
from distillsr.kernels import ops
from distillsr.kernels.prepare import FusedForm
from distillsr.models import asid
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


def _copy(model):
    twin = distillsr.create_model(model.arch_name, model.scale, **model.arch_options)
    twin.load_state_dict(model.state_dict())
    return twin.set_pixel_range(*model.pixel_range).eval()


@pytest.mark.parametrize("arch, scale", [("asid", 2), ("asid_d8", 4)])
def test_every_path_reproduces_the_official_outputs(arch, scale, monkeypatch):
    model = distillsr.load_model(_fixture(f"{arch}_x{scale}_official_random.pth"))
    x = _load(_fixture("input_37x45.npy"))
    ref = _load(_fixture(f"{arch}_x{scale}_out_37x45.npy"))
    plain = _plain()
    outs = {}
    with torch.inference_mode():
        outs["paper modules"] = model.forward_native(x)
        outs["plain baseline"] = plain.forward_native(model, x)
        model.prepare_for_inference()
        outs["prepared"] = model.forward_native(x)  # the C kernels and oneDNN post-ops
        with monkeypatch.context() as m:
            m.setattr(kernels, "enabled", False)
            outs["prepared, kernels off"] = model.forward_native(x)  # merged products, op by op
        with monkeypatch.context() as m:  # a machine without a C compiler
            m.setattr(kernels, "_lib", None)
            m.setattr(kernels, "_tried", True)
            outs["prepared, oneDNN only"] = model.forward_native(x)
    with torch.enable_grad():  # autograd through the prepared model: its paper forms run
        outs["prepared, autograd"] = model.forward_native(x).detach()
    model.train()
    with torch.enable_grad():  # the training path
        outs["training"] = model.forward_native(x).detach()
    for path, got in outs.items():
        assert (got - ref).abs().max() <= ATOL, path


class Ops(TorchDispatchMode):
    """Records (op name, dtype of its first tensor argument) of every op that runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.seen.append((func.overloadpacket.__name__, None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))

    def names(self):
        return {name for name, _ in self.seen}


def test_fused_ops_run_in_prepared_inference_only():
    if not ops.HAS_ONEDNN:
        pytest.skip("this torch build has no oneDNN fused ops")
    model = distillsr.create_model("asid", 2, blocks=1)
    x = torch.rand(1, 3, 16, 16)
    fused = {"_linear_pointwise", "_convolution_pointwise", "_convolution_pointwise_"}
    with Ops() as training:
        model(x).sum().backward()
    model.eval()
    with torch.inference_mode(), Ops() as paper:
        model(x)
    model.prepare_for_inference()
    with Ops() as autograd:  # prepared, but gradients wanted: the paper forms
        model(x).sum().backward()
    with torch.inference_mode(), Ops() as prepared:
        model(x)
    for seen in (training, paper, autograd):
        assert not seen.names() & fused
    assert "_convolution_pointwise_" in prepared.names()  # fuse's conv summed into F0
    if not kernels.built():  # the 1x1 convs: in the C kernel where it is built, else oneDNN
        assert "_linear_pointwise" in prepared.names()


def test_preparation_keeps_parameters_and_state():
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2, blocks=2)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.prepare_for_inference() is model
    assert not model.training and kernels.is_prepared(model)
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fused = {type(m).__name__ for m in model.modules() if isinstance(m, FusedForm)}
    assert fused == {"FusedASID", "FusedLM", "FusedAttentionUnit", "FusedCAM", "FusedESA", "FusedIDB",
                     "FusedConvNHWC"}
    # every fused module is still an instance of its paper class
    assert all(isinstance(m, type(m).paper) for m in model.modules() if isinstance(m, FusedForm))


def test_train_mode_restores_the_paper_modules():
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2, blocks=2).prepare_for_inference()
    model.train()
    assert not kernels.is_prepared(model)
    assert type(model.blocks[0].lm1) is asid.LM and type(model.blocks[0].sam1.meso) is asid.AttentionUnit
    assert all("_fused_cache" not in m.__dict__ for m in model.modules())
    model.eval()  # eval() alone does not prepare again
    assert not kernels.is_prepared(model)


def _perturb_merge_sources(model, optimiser=None):
    """Change the weights an attention unit's merges come from (value and output projections)."""
    unit = model.blocks[1].sam1.meso.attn  # a sharing unit: v and proj are merged into one matrix
    if optimiser is not None:
        loss = unit.v.weight.sum() + unit.proj.weight.sum() + model.blocks[0].sam1.meso.attn.proj.weight.sum()
        loss.backward()
        optimiser.step()
        return
    with torch.no_grad():
        unit.v.weight.mul_(1.5)
        model.blocks[0].sam1.meso.attn.proj.weight.add_(0.1)


@pytest.mark.parametrize("change", ["in place", "optimiser step", "load_state_dict", "dtype round trip"])
def test_prepared_model_follows_weight_changes(change):
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2, blocks=2).prepare_for_inference()
    x = torch.rand(1, 3, 16, 24)
    with torch.inference_mode():
        before = model(x)
    if change == "in place":
        _perturb_merge_sources(model)
    elif change == "optimiser step":
        _perturb_merge_sources(model, torch.optim.SGD(model.parameters(), lr=0.05))
    elif change == "load_state_dict":
        other = _copy(model)
        _perturb_merge_sources(other)
        model.load_state_dict(other.state_dict())
    else:
        model.double()
        _perturb_merge_sources(model)
        model.float()
    assert kernels.is_prepared(model)
    with torch.inference_mode():
        after = model(x)
        expected = _copy(model)(x)  # the paper modules with the new weights
    assert (before - expected).abs().max() > 1e-3  # the change matters
    torch.testing.assert_close(after, expected, atol=2e-6, rtol=0)


def test_merges_of_inference_tensors_are_redone_at_every_call():
    # weights made in inference mode keep no version counter: nothing is cached for them
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 24)
    with torch.inference_mode():
        model = distillsr.create_model("asid", 2, blocks=2).prepare_for_inference()
        before = model(x)
        _perturb_merge_sources(model)
        after, expected = model(x), _copy(model)(x)
    assert (before - expected).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=2e-6, rtol=0)


def test_preparing_again_redoes_the_merges():
    # edits through .data bypass the version counters: preparing again takes them in
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2, blocks=2).prepare_for_inference()
    x = torch.rand(1, 3, 16, 16)
    model.blocks[1].sam2.glob.attn.v.weight.data.mul_(2)
    model.prepare_for_inference()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _copy(model)(x), atol=2e-6, rtol=0)


def test_prepared_units_return_what_the_paper_units_return():
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2, blocks=2).eval()
    x = torch.rand(1, 16, 24, 36)
    unit, sharing = model.blocks[0].sam1.meso, model.blocks[1].sam1.meso
    with torch.inference_mode():
        y, a = unit(x)
        ys, _ = sharing(x, a)
        model.prepare_for_inference()
        y2, a2 = unit(x)
        ys2, _ = sharing(x, a2)
        with pytest.raises(RuntimeError, match="needs the matrix"):
            sharing(x)
    with torch.enable_grad():
        y3, a3 = unit(x)
    for got, want in [(y2, y), (a2, a), (ys2, ys), (y3, y), (a3, a)]:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


# bf16 (weights and input cast). Measured on an AMD EPYC with AVX-512 bf16, where oneDNN
# runs the prepared products in bf16, and with the kernels off (PyTorch's bf16 ops): max
# |bf16 - fp32| 0.0041 (prepared) and 0.0048 (paper modules, kernels off), mean 7.0e-4 on
# every path. fp32 paths differ from each other by about 1e-7; rounding only the input and
# the output to bf16 (products in fp32) gives a mean of 3.2e-4, below the lower bound.
BF16_MAX, BF16_MEAN_MIN = 0.0075, 4.5e-4
# matrix products and convs as a dispatch mode sees them (in inference mode undecomposed)
PRODUCTS = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "conv2d", "convolution",
            "_linear_pointwise", "_convolution_pointwise"}


@pytest.mark.parametrize("path", ["prepared", "paper", "kernels off"])
def test_bf16_inference_stays_close(path, monkeypatch):
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 4).eval()
    x = torch.rand(1, 3, 24, 40)
    with torch.inference_mode():
        ref = model(x)
        if path != "paper":
            model.prepare_for_inference()
        monkeypatch.setattr(kernels, "enabled", path != "kernels off")
        with Ops() as seen:
            y = model.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    products = [(n, d) for n, d in seen.seen if n in PRODUCTS]
    assert products and all(d == torch.bfloat16 for _, d in products)  # every product ran in bf16
    if path == "prepared" and torch.bfloat16 in ops.ONEDNN_DTYPES:
        assert {"_linear_pointwise", "_convolution_pointwise"} <= {n for n, _ in products}
    diff = (y.float() - ref).abs()
    assert torch.isfinite(diff).all()
    assert diff.max() < BF16_MAX
    assert diff.mean() > BF16_MEAN_MIN  # bf16 rounding shows: bf16 really was used


def test_channel_slices_feed_the_fused_products_correctly(monkeypatch):
    torch.manual_seed(0)
    x = torch.rand(2, 8, 16, 48)
    w, b = torch.randn(24, 36), torch.randn(24)
    r = torch.rand(2, 8, 16, 60)[..., 12:36]  # a strided residual too
    with torch.inference_mode():
        fused = ops.linear(x[..., 12:], w, b, add=r)
        monkeypatch.setattr(kernels, "enabled", False)
        plain = ops.linear(x[..., 12:], w, b, add=r)
    ref = x[..., 12:].contiguous() @ w.t() + b + r
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------- the entry points prepare
def _small():
    torch.manual_seed(0)
    return distillsr.create_model("asid", 2, blocks=1)


def test_upscale_backends_prepare_the_network():
    from distillsr.engine.upscale import load_runner
    runner = load_runner(_small(), 2)
    assert kernels.is_prepared(runner) and not runner.training
    net = _small()
    image = np.random.default_rng(0).random((12, 20, 3), dtype=np.float32)
    y = distillsr.upscale(image, 2, model=net, tile=0)
    assert kernels.is_prepared(net)
    with torch.inference_mode():
        ref = _copy(net)(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(y - ref.clip(0, 1)).max() < 1e-5


def test_eval_and_profile_prepare_the_network():
    from distillsr.engine.evaluate import EvalModel, make_upscaler
    from distillsr.engine.profile import profile_model
    net = _small()
    make_upscaler(EvalModel("asid", None, net), 2)(np.zeros((16, 16, 3), np.uint8))
    assert kernels.is_prepared(net)
    net = _small()
    profile_model(net, (32, 32), repeats=1, warmup=0)
    assert kernels.is_prepared(net)


@pytest.mark.parametrize("training", [True, False])
def test_validation_runs_prepared_and_leaves_the_network_as_it_was(training):
    from distillsr.engine.validate import evaluate_pairs
    net = _small().train(training)
    seen = []
    net.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(type(m).__name__))
    rng = np.random.default_rng(0)
    pairs = [("a", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))]
    evaluate_pairs(net, pairs, 2, torch.device("cpu"))
    assert seen == ["FusedIDB"]
    assert not kernels.is_prepared(net) and net.training == training
