"""RFDN / E-RFDN: parameter counts, the authors' outputs, sizes, batches, pixel range."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distillsr
from distillsr.models.rfdn import ESA, ESA_MIN_SIZE, RFDN
from conftest import shared_path

ATOL = 2e-3  # on 0..255, from the fixtures' MANIFEST tolerance advice


@pytest.fixture(autouse=True)
def _one_thread():
    # these networks run many tiny convs; on the shared 2-core CI machine the hand-offs
    # between two threads cost more than they save (x5-x10 slower measured)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name, scale, count", [
    ("rfdn", 2, 534_036), ("rfdn", 3, 540_531), ("rfdn", 4, 549_624),
    ("e-rfdn", 4, 433_448),
])
def test_parameter_counts(name, scale, count):
    assert distillsr.create_model(name, scale).num_parameters() == count


def test_e_rfdn_builds_at_every_scale_and_rfdn_uses_cca():
    for s in (2, 3, 4):
        m = distillsr.create_model("e-rfdn", s)
        assert m.upsampler[0].out_channels == 3 * s * s and len(m.blocks) == 4
    m = distillsr.create_model("rfdn", 2)
    assert len(m.blocks) == 6 and m.head.out_channels == 48
    assert type(m.blocks[0].attention).__name__ == "CCA"


def test_released_e_rfdn_matches_the_authors_output():
    path = shared_path("weights", "official", "rfdn_aim_x4.pth")
    x = torch.from_numpy(np.load(shared_path("fixtures", "rfdn", "rfdn_aim_x4_input.npy")))
    ref = torch.from_numpy(np.load(shared_path("fixtures", "rfdn", "rfdn_aim_x4_output.npy")))
    model = distillsr.load_model(path)
    assert (model.arch_name, model.scale, model.pixel_range) == ("e-rfdn", 4, (0.0, 255.0))
    assert model.num_parameters() == 433_448
    with torch.no_grad():
        native = model.forward_native(x)
        public = model(x / 255) * 255  # the [0, 1] API gives the same result
    assert (native - ref).abs().max().item() < ATOL
    assert (public - ref).abs().max().item() < ATOL


def test_default_pixel_range_is_0_255_and_forward_maps_it():
    torch.manual_seed(0)
    m = distillsr.create_model("rfdn", 2).eval()
    assert m.pixel_range == (0.0, 255.0)
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        assert torch.allclose(m(x), m.forward_native(x * 255) / 255, atol=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (14, 20), (15, 15)])
@pytest.mark.parametrize("name", ["rfdn", "e-rfdn"])
def test_any_input_size(name, size):
    torch.manual_seed(0)
    m = distillsr.create_model(name, 3).eval()
    with torch.no_grad():
        y = m(torch.rand(1, 3, *size))
    assert y.shape == (1, 3, 3 * size[0], 3 * size[1]) and torch.isfinite(y).all()


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (3, 30), (14, 14)])
def test_esa_pads_small_inputs_as_if_the_input_were_replicated(size):
    # ESA(x) on an input below 15 px equals ESA of x extended to 15 px by replicating
    # its last row / column, cropped back: the mask is the one of that extension.
    torch.manual_seed(0)
    esa = ESA(8).eval()
    x = torch.randn(2, 8, *size)
    h, w = size
    big = F.pad(x, (0, max(0, ESA_MIN_SIZE - w), 0, max(0, ESA_MIN_SIZE - h)), mode="replicate")
    with torch.no_grad():
        assert torch.allclose(esa(x), esa(big)[..., :h, :w], atol=1e-6)


def test_batch_equals_single_images():
    torch.manual_seed(0)
    m = distillsr.create_model("e-rfdn", 2).eval()
    x = torch.rand(3, 3, 17, 16)
    with torch.no_grad():
        batch = m(x)
        single = torch.cat([m(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch, single, atol=1e-5)


def test_block_wiring_has_no_block_residual():
    # the released RFDB adds no block input to its output: zero fusion weights give 0 * mask
    torch.manual_seed(0)
    m = RFDN(2, channels=8, blocks=1)
    block = m.blocks[0]
    torch.nn.init.zeros_(block.fuse.weight)
    torch.nn.init.zeros_(block.fuse.bias)
    with torch.no_grad():
        assert block(torch.randn(1, 8, 16, 16)).abs().max() == 0


@pytest.mark.parametrize("dataset, want", [("Set5", 32.161), ("Set14", 28.650)])
def test_released_e_rfdn_reproduces_the_authors_numbers(dataset, want):
    # the authors' code gives 32.161 / 28.650 dB (Y, border 4, whole image); we measure 32.1607 / 28.6503
    from distillsr.engine.evaluate import evaluate
    model = distillsr.load_model(shared_path("weights", "official", "rfdn_aim_x4.pth"))
    res = evaluate(model, 4, shared_path("data", "benchmark"), [dataset], device="cpu")
    assert abs(res["results"][0]["psnr"] - want) < 0.003
