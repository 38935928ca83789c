"""ASID / ASID-D8: equality with the authors' code (fixtures), parameter counts, variants."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import distillsr
from distillsr import kernels
from distillsr.models import asid
from distillsr.models.asid import ASID
from conftest import REPO, shared_path

ATOL = 2e-6  # fixtures/asid/README.md: 4x the largest difference between equivalent runs


def fixture(name):
    return shared_path("fixtures", "asid", name)


def as_tensor(name):
    return torch.from_numpy(np.load(fixture(name)))


@pytest.mark.parametrize("prepared", [False, True], ids=["paper", "prepared"])
@pytest.mark.parametrize("arch", ["asid", "asid_d8"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_released_format_reproduces_official_outputs(arch, scale, prepared):
    model = distillsr.load_model(fixture(f"{arch}_x{scale}_official_random.pth"))
    assert model.arch_name == arch.replace("_", "-") and model.scale == scale
    assert model.pixel_range == (-1.0, 1.0)
    assert not model.training
    if prepared:
        model.prepare_for_inference()
    with torch.no_grad():
        for inp, out in [("input_37x45.npy", f"{arch}_x{scale}_out_37x45.npy"),
                         ("input_b2_24x32.npy", f"{arch}_x{scale}_out_b2_24x32.npy")]:
            got = model.forward_native(as_tensor(inp))
            ref = as_tensor(out)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prepared", [False, True], ids=["paper", "prepared"])
def test_shared_attention_matrices_match_official(prepared):
    model = distillsr.load_model(fixture("asid_x2_official_random.pth"))
    if prepared:
        model.prepare_for_inference()
    ref = np.load(fixture("asid_x2_attn_37x45.npz"))
    x = as_tensor("input_37x45.npy")
    with torch.no_grad():
        _, mats = model.features(model.pad(x))
    assert len(mats) == 6
    for i, a in enumerate(mats, start=1):
        expected = torch.from_numpy(ref[f"a{i}"])[:, 0]  # (windows, heads=1, 64, 64)
        assert a.shape == expected.shape == (30, 64, 64)
        torch.testing.assert_close(a, expected, atol=ATOL, rtol=0)


def test_public_forward_uses_unit_range_for_released_weights():
    model = distillsr.load_model(fixture("asid_x4_official_random.pth"))
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        y = model(x)
        y_native = model.forward_native(2 * x - 1)
    torch.testing.assert_close(y, (y_native + 1) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, scale, options, expected", [
    ("asid", 2, {}, 297_516), ("asid", 3, {}, 304_011), ("asid", 4, {}, 313_104),
    ("asid-d8", 2, {}, 732_146), ("asid-d8", 3, {}, 738_641), ("asid-d8", 4, {}, 747_734),
    ("asid", 2, {"sharing": "none"}, 316_344),
    ("asid", 2, {"sharing": "intra"}, 305_004),
    ("asid", 2, {"sharing": "none", "channel_split": False}, 400_764),
    ("asid", 2, {"channel_split": False}, 364_656),
    ("asid-baseline", 2, {}, 288_264),
])
def test_parameter_counts(name, scale, options, expected):
    model = distillsr.create_model(name, scale, **options)
    assert model.num_parameters() == expected == sum(p.numel() for p in model.parameters())


def test_depth_option_changes_count_linearly():
    counts = [distillsr.create_model("asid", 2, blocks=n).num_parameters() for n in range(2, 9)]
    steps = np.diff(counts)
    assert (steps == steps[0]).all() and steps[0] > 0
    assert counts[-1] == 732_146  # 8 blocks is ASID-D8


class CountCalls(TorchFunctionMode):
    def __init__(self, names):
        super().__init__()
        self.names, self.calls = names, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.names:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sharing, blocks, spatial_softmaxes", [
    ("inter", 3, 6), ("inter", 8, 6), ("none", 3, 18), ("intra", 3, 6)])
@pytest.mark.parametrize("path", ["paper", "prepared", "prepared, C kernels"])
def test_sharing_blocks_skip_query_key_and_softmax(sharing, blocks, spatial_softmaxes, path, monkeypatch):
    c_kernels = path == "prepared, C kernels"
    if c_kernels and kernels.compiler() is None:
        pytest.skip("no C compiler here")
    model = distillsr.create_model("asid", 2, blocks=blocks, sharing=sharing).eval()
    if path != "paper":
        model.prepare_for_inference()
    in_c = []  # the C kernel computes scores and softmax of a computing unit in one call
    real = kernels.attention_scores
    monkeypatch.setattr(kernels, "attention_scores", lambda *a: in_c.append(1) or real(*a))
    in_ca = []  # and a channel attention's matrices, softmax and output in one call
    real_ca = kernels.channel_attention
    monkeypatch.setattr(kernels, "channel_attention", lambda *a: in_ca.append(1) or real_ca(*a))
    monkeypatch.setattr(kernels, "enabled", c_kernels)
    with CountCalls({"softmax"}) as counter, torch.no_grad():
        model(torch.rand(1, 3, 16, 16))
    channel_softmaxes = 2 * blocks  # CAM: meso and global channel attention in every block
    assert len(counter.calls) + len(in_c) + len(in_ca) == spatial_softmaxes + channel_softmaxes
    assert len(in_c) == (spatial_softmaxes if c_kernels else 0)
    assert len(in_ca) == (channel_softmaxes if c_kernels else 0)
    later = [n for n, _ in model.blocks[1:].named_parameters() if "qkv" in n and "attn" in n]
    if sharing == "inter":
        assert later == []
        assert not any("rel_pos_bias" in n for n, _ in model.blocks[1:].named_parameters())


@pytest.mark.parametrize("prepared", [False, True], ids=["paper", "prepared"])
def test_sharing_units_really_reuse_the_first_blocks_matrices(prepared):
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2).eval()
    if prepared:
        model.prepare_for_inference()
    x = torch.rand(1, 3, 16, 24)
    seen = []
    unit = model.blocks[2].sam2.glob  # an attention unit returns (map, attention matrices)
    hook = unit.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    with torch.no_grad():
        _, first = model.features(model.pad(x))
    hook.remove()
    assert seen[0] is first[3]  # SAM2 global of block 3 uses A4 of block 1


def test_a_module_returns_the_same_in_every_mode():
    torch.manual_seed(0)
    attn = asid.WindowAttention(24, computes=True)
    t = torch.randn(6, 64, 24)
    with torch.no_grad():
        out, a = attn(t)
    out2, a2 = attn(t)  # with autograd
    assert out.shape == out2.shape == (6, 64, 24) and a.shape == a2.shape == (6, 64, 64)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(a2, a, atol=0, rtol=0)


def test_the_model_file_holds_no_kernel_code():
    # the paper modules: no oneDNN ops, no ctypes, no switches between implementations
    text = Path(asid.__file__).read_text()
    for word in ("torch.ops", "mkldnn", "ctypes", "import kernels", "kernels.available", "enabled",
                 "fused_kernels", "_ckernels", "_fusable", "_shortcuts", "is_grad_enabled", "is_tracing"):
        assert word not in text, word


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (8, 8), (9, 15), (15, 16), (23, 17)])
@pytest.mark.parametrize("name", ["asid", "asid-baseline"])
def test_any_input_size(name, size):
    model = distillsr.create_model(name, 3).eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, *size))
    assert y.shape == (2, 3, size[0] * 3, size[1] * 3)
    assert torch.isfinite(y).all()


def test_batch_equals_single_images():
    torch.manual_seed(1)
    model = distillsr.create_model("asid", 2).eval()
    x = torch.rand(3, 3, 21, 30)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_padding_matches_release_for_inputs_it_accepts():
    """For H, W >= 9 our padding is the release's (multiple of 8): cropping the input
    of a padded run gives the same top-left output as padding explicitly."""
    torch.manual_seed(2)
    model = distillsr.create_model("asid", 2).eval()
    x = torch.rand(1, 3, 13, 19)
    with torch.no_grad():
        y = model(x)
        y_padded = model(torch.nn.functional.pad(x, (0, 5, 0, 3)))
    torch.testing.assert_close(y, y_padded[..., :26, :38], atol=1e-5, rtol=0)


# bf16 autocast. Measured on an AMD EPYC with AVX-512 bf16: max |bf16 - fp32| 0.0036 (paper
# modules and prepared), mean 6.4e-4 and 6.9e-4. fp32 paths differ by about 1e-7; rounding
# only the output to bf16 gives a mean of 2.4e-4, below the lower bound.
AUTOCAST_MAX, AUTOCAST_MEAN_MIN = 0.006, 4e-4


@pytest.mark.parametrize("prepared", [False, True], ids=["paper", "prepared"])
def test_bf16_autocast_cpu(prepared):
    torch.manual_seed(3)
    model = distillsr.create_model("asid", 2).eval()
    if prepared:
        model.prepare_for_inference()
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.dtype == torch.bfloat16  # the last conv ran in bf16
    diff = (y.float() - ref).abs()
    assert torch.isfinite(diff).all()
    assert diff.max() < AUTOCAST_MAX
    assert diff.mean() > AUTOCAST_MEAN_MIN  # bf16 rounding shows throughout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(4)
    model = distillsr.create_model("asid", 4).eval()
    x = torch.rand(2, 3, 19, 27)
    with torch.no_grad():
        ref = model(x)
        got = model.cuda()(x.cuda()).cpu()
        prepared = model.prepare_for_inference()(x.cuda()).cpu()  # merged products on CUDA
        torch.testing.assert_close(prepared, ref, atol=1e-4, rtol=0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x.cuda())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_gradients_flow_to_every_parameter():
    model = distillsr.create_model("asid", 2, blocks=2)
    model(torch.rand(2, 3, 16, 16)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="sharing"):
        distillsr.create_model("asid", 2, sharing="sideways")
    with pytest.raises(ValueError, match="x5"):
        distillsr.create_model("asid", 5)
    with pytest.raises(KeyError, match="unknown model 'asdi'"):
        distillsr.create_model("asdi", 2)


def test_import_needs_no_torchvision():
    code = ("import sys, distillsr; m = distillsr.create_model('asid', 4); print(m.__class__.__name__); "
            "assert 'torchvision' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": ""}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ASID"
    assert isinstance(ASID, type)
