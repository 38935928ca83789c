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


def test_train_option_init_linear_starts_from_the_fitted_filter(tmp_path):
    from distillsr.engine import Trainer, load_config
    from train_helpers import make_paired, tiny_config
    make_paired(tmp_path / "data", n=3, size=48, scale=2)
    cfg = load_config(None, tiny_config(tmp_path, tmp_path / "data", **{
        "model.arch": "asid", "model.options": "{blocks: 1}", "init_linear": True, "train.iters": 1}))
    trainer = Trainer(cfg, log=lambda m: None)
    model = trainer.model.eval()
    pairs = [trainer.dataset.store.load(i) for i in range(3)]
    w, b = fit_subpixel_filter(((lr / 255.0, hr / 255.0) for lr, hr in pairs), 2, seed=3)
    lr = pairs[0][0] / 255.0
    with torch.no_grad():
        got = model(torch.from_numpy(lr).permute(2, 0, 1)[None].float())
    torch.testing.assert_close(got, _filter_output(lr, w, b, 2), atol=1e-5, rtol=0)
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def _teacher_pairs(teacher, n=3, size=24, scale=2, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        lr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            hr = teacher(torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255)[0]
        pairs.append((lr, (hr.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()))
    return pairs


def test_fit_upsampler_recovers_the_upsampler_of_a_body():
    from distillsr.engine.linear_init import fit_upsampler
    torch.manual_seed(0)
    teacher = distillsr.create_model("asid", 2, blocks=1).eval()
    with torch.no_grad():  # a mild upsampler, so that outputs stay inside [0, 1]
        teacher.upsampler[0].weight.mul_(0.1)
        teacher.upsampler[0].bias.fill_(0.5)
    pairs = _teacher_pairs(teacher)
    student = distillsr.create_model("asid", 2, blocks=1).eval()
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith("upsampler")},
                            strict=False)
    x = torch.from_numpy(pairs[0][0]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        ref = teacher(x)
        before = (student(x) - ref).abs().mean().item()
        fit_upsampler(student, pairs, 2, samples_per_image=0, ridge=1e-9)
        after = (student(x) - ref).abs().mean().item()
    assert after < 2 / 255 < before  # the 8-bit rounding of the targets is all that is left
    with pytest.raises(ValueError, match="not x2"):
        fit_upsampler(student, [(pairs[0][0], pairs[0][1][:-1])], 2)
    with pytest.raises(TypeError, match="ASID-like"):
        fit_upsampler(torch.nn.Conv2d(3, 3, 1), pairs, 2)


def test_train_option_init_upsampler(tmp_path):
    from distillsr.engine import ConfigError, Trainer, load_config
    from train_helpers import make_paired, tiny_config
    make_paired(tmp_path / "data", n=3, size=48, scale=2)
    logs = []
    cfg = load_config(None, tiny_config(tmp_path, tmp_path / "data", **{
        "model.arch": "asid", "model.options": "{blocks: 1}", "init_upsampler": True, "train.iters": 1}))
    trainer = Trainer(cfg, log=logs.append)
    assert any("upsampler fitted" in m for m in logs)
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in trainer.model.state_dict().items())
    with pytest.raises(ConfigError, match="choose one"):
        load_config(None, tiny_config(tmp_path, tmp_path / "data", **{
            "model.arch": "asid", "init_upsampler": True, "init_linear": True}))
