"""ONNX export (dynamic batch/height/width) and the onnxruntime backend: parity with PyTorch."""
import os
import pytest
import torch

import distillsr
from distillsr.cli.main import main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from distillsr.engine.onnx_backend import OnnxModel  # noqa: E402

PARITY = 1e-4  # max abs difference on [0, 1] images (measured: about 3e-7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export (it takes a while): ASID x3 with two blocks (so both computing and
    sharing attention units), weights perturbed, [-1, 1] pixel range like the release,
    exported through the CLI from a checkpoint."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 3, blocks=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.set_pixel_range(-1.0, 1.0).eval()
    ckpt = distillsr.save_model(model, d / "m.safetensors")
    out = d / "m.onnx"
    assert main(["export", "--weights", str(ckpt), "-o", str(out)]) == 0
    return distillsr.load_model(ckpt), out


@pytest.mark.parametrize("shape", [(1, 3, 37, 45), (2, 3, 24, 16), (1, 3, 5, 9)])
def test_onnxruntime_matches_pytorch_at_other_sizes(exported, shape):
    model, path = exported
    runner = OnnxModel(path, threads=2)
    torch.manual_seed(1)
    x = torch.rand(*shape)
    with torch.inference_mode():
        ref = model(x)
    y = runner(x)
    assert y.shape == ref.shape == (shape[0], 3, 3 * shape[2], 3 * shape[3])
    assert (y - ref).abs().max().item() <= PARITY


def test_metadata_and_interface(exported):
    _, path = exported
    runner = OnnxModel(path)
    assert runner.scale == 3 and runner.arch_name == "asid"
    assert runner.eval() is runner
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        runner(torch.rand(3, 8, 8))


def test_upscale_backend_uses_the_onnx_file(exported):
    pytest.importorskip("distillsr.engine.upscale")
    from distillsr.engine.upscale import BACKENDS, Upscaler, load_runner
    model, path = exported
    assert "onnxruntime" in BACKENDS
    runner = load_runner(weights=path, backend="onnxruntime", scale=3)
    with pytest.raises(ValueError, match="x3, not x2"):
        load_runner(weights=path, backend="onnxruntime", scale=2)
    image = torch.rand(20, 28, 3).numpy()
    up = Upscaler(runner, tile=None).upscale_array(image)
    with torch.inference_mode():
        ref = model(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert up.shape == (60, 84, 3)
    assert abs(up - ref.clip(0, 1)).max() <= PARITY


def test_export_refuses_bad_requests(tmp_path, capsys):
    assert main(["export", "--model", "asid", "-o", str(tmp_path / "a.onnx")]) == 2
    assert "--scale" in capsys.readouterr().err
    assert main(["export", "--model", "asid", "--scale", "2", "-o", str(tmp_path / "a.txt")]) == 2
    assert ".onnx" in capsys.readouterr().err
    assert main(["export", "--weights", str(tmp_path / "none.pth"), "-o", str(tmp_path / "b.onnx")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    # --model/--scale means the shipped weights; a name that ships none says how to get a random one
    assert main(["export", "--model", "rfdn", "--scale", "4", "-o", str(tmp_path / "r.onnx")]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_onnx_model_refuses_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        OnnxModel(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(RuntimeError, match="cannot load"):
        OnnxModel(bad)


def test_cli_upscale_with_the_onnxruntime_backend(exported, tmp_path):
    from PIL import Image
    model, path = exported
    image = (torch.rand(14, 19, 3) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "in.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "in.png"), "-o", str(out), "--scale", "3",
                 "--backend", "onnxruntime", "--weights", str(path), "--no-progress"]) == 0
    got = torch.from_numpy(__import__("numpy").array(Image.open(next(out.iterdir())))).float()
    with torch.inference_mode():
        ref = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]
    ref = (ref.clamp(0, 1) * 255).round().permute(1, 2, 0)
    assert got.shape == (42, 57, 3)
    assert (got - ref).abs().max().item() <= 1  # 8-bit rounding of a <= 1e-4 difference


def test_a_prepared_model_exports_its_paper_modules_and_stays_prepared(monkeypatch):
    from distillsr import kernels
    from distillsr.engine.export import ExportError, export_onnx
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2, blocks=1).prepare_for_inference()
    traced = []

    def exporter(net, args, **kwargs):  # stands in for torch.onnx.export: runs the network, then fails
        traced.extend(type(m).__name__ for m in net.modules())
        net(*args)
        raise RuntimeError("stop here")
    monkeypatch.setattr(torch.onnx, "export", exporter)
    with pytest.raises(ExportError, match="stop here"):
        export_onnx(model, "unused.onnx")
    assert {"IDB", "LM", "AttentionUnit", "CAM", "ConvNHWC"} <= set(traced)
    assert not any(name.startswith("Fused") for name in traced)
    assert kernels.is_prepared(model) and type(model.blocks[0].lm1).__name__ == "FusedLM"


def test_the_exported_file_gets_the_users_umask(exported):
    _, path = exported
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask
