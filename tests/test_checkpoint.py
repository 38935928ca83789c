"""load_model / save_model: formats, detection from keys, and refusal of bad files."""
import pickle

import pytest
import torch

import distillsr
from distillsr import CheckpointError
from conftest import shared_path


def _same_output(a, b, size=(1, 3, 17, 21)):
    torch.manual_seed(0)
    x = torch.rand(*size)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("name, scale, options", [
    ("asid", 2, {}), ("asid-d8", 4, {}), ("asid", 3, {"sharing": "none"}),
    ("asid", 2, {"sharing": "intra", "blocks": 2}), ("asid", 2, {"channel_split": False}),
    ("asid-baseline", 4, {}), ("asid", 2, {"blocks": 5}),
])
def test_safetensors_round_trip_and_bare_state_dict_detection(tmp_path, name, scale, options):
    torch.manual_seed(1)
    model = distillsr.create_model(name, scale, **options).eval()
    path = distillsr.save_model(model, tmp_path / "m.safetensors")
    loaded = distillsr.load_model(path)
    assert loaded.arch_name == name and loaded.scale == scale and not loaded.training
    assert _same_output(model, loaded)
    # a plain torch state dict without our metadata: architecture found from keys and shapes
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    bare = distillsr.load_model(tmp_path / "bare.pth")
    assert bare.arch_name == name and bare.num_parameters() == model.num_parameters()
    assert _same_output(model, bare)


def test_container_and_module_prefix_are_unwrapped(tmp_path):
    model = distillsr.create_model("asid", 2, blocks=2).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"params_ema": sd, "iter": torch.tensor(3)}, tmp_path / "c.pth")
    assert _same_output(model, distillsr.load_model(tmp_path / "c.pth"))


def test_save_is_atomic_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = distillsr.create_model("asid", 2, blocks=2)
    path = distillsr.save_model(model, tmp_path / "w.safetensors")
    before = path.read_bytes()
    import safetensors.torch as st

    def broken(*a, **k):
        with open(a[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError):
        distillsr.save_model(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_truncated_files_are_named(tmp_path):
    model = distillsr.create_model("asid", 2, blocks=2)
    good = distillsr.save_model(model, tmp_path / "w.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        distillsr.load_model(cut)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.pth"):
        distillsr.load_model(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        distillsr.load_model(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no such"):
        distillsr.load_model(tmp_path / "missing.pth")


def test_unknown_architecture_is_named(tmp_path):
    torch.save({"encoder.weight": torch.zeros(4, 4), "decoder.bias": torch.zeros(4)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth: not a known architecture"):
        distillsr.load_model(tmp_path / "x.pth")


def test_wrong_shapes_are_reported(tmp_path):
    sd = distillsr.create_model("asid", 2).state_dict()
    sd["blocks.0.pw1.weight"] = torch.zeros(47, 48, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        distillsr.load_model(tmp_path / "bad.pth")


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_objects_are_refused_not_executed(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"head.weight": Payload()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        distillsr.load_model(tmp_path / "evil.pth")
    assert "code ran" not in capsys.readouterr().out


def test_official_file_detected_without_flags():
    path = shared_path("fixtures", "asid", "asid_d8_x3_official_random.pth")
    model = distillsr.load_model(path)
    assert (model.arch_name, model.scale, len(model.blocks)) == ("asid-d8", 3, 8)
    assert model.checkpoint_source.startswith("official ASID")


def test_a_state_file_or_run_folder_names_the_weights_meant(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    distillsr.save_model(distillsr.create_model("asid", 2, blocks=1), run / "checkpoints" / "iter_10.safetensors")
    (run / "checkpoints" / "iter_10.state.pt").write_bytes(b"state")
    create_model, save_model, load_model = distillsr.create_model, distillsr.save_model, distillsr.load_model
    with pytest.raises(CheckpointError, match=r"training state file .* the weights of that checkpoint are "
                       r".*iter_10\.safetensors"):
        load_model(run / "checkpoints" / "iter_10.state.pt")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file; did you mean .*iter_10\.safetensors"):
        load_model(run)
    save_model(create_model("asid", 2, blocks=1), run / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"did you mean .*run/model\.safetensors\?"):
        load_model(run)
