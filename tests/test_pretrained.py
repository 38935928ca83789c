"""The pretrained-weights table: model cards, sha256 checks, clear errors, `distillsr models`."""
import json

import pytest
import torch

from distillsr import create_model
from distillsr.cli.main import main
from distillsr.pretrained import (PretrainedError, get_pretrained, list_pretrained, load_pretrained,
                                  save_pretrained, weights_dirs)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A weights folder holding random-init ASID x2 weights, found through the env variable."""
    torch.manual_seed(0)
    model = create_model("asid", 2)
    entry = save_pretrained(model, "asid", tmp_path, training_data="test data",
                            psnr={"Set5": 30.5, "Set14": 28.25, "B100": 27.0}, psnr_protocol="Y, test")
    monkeypatch.setenv("DISTILLSR_WEIGHTS_DIR", str(tmp_path))
    return tmp_path, model, entry


def test_card_written_and_listed(table):
    folder, model, entry = table
    card = json.loads((folder / "asid_x2.json").read_text())
    assert card["file"] == "asid_x2.safetensors" and card["arch"] == "asid" and card["scale"] == 2
    assert card["params"] == 297_516 and len(card["sha256"]) == 64
    assert weights_dirs()[0] == folder
    entries = list_pretrained()
    assert [(e.name, e.scale) for e in entries if e.card.parent == folder] == [("asid", 2)]
    assert get_pretrained("ASID", 2).psnr == {"Set5": 30.5, "Set14": 28.25, "B100": 27.0}


def test_load_pretrained_gives_the_same_network(table):
    _, model, _ = table
    loaded = load_pretrained("asid", 2)
    assert loaded.scale == 2 and not loaded.training
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_missing_scale_or_name_is_a_clear_error(table):
    folder = table[0]  # only this folder is searched: the package's own weights stay out of it
    with pytest.raises(PretrainedError, match=r"no pretrained weights 'asid' x4 are installed.*available: asid x2"):
        load_pretrained("asid", 4, weights_dir=folder)
    with pytest.raises(PretrainedError, match="'nosuch' x2"):
        load_pretrained("nosuch", 2)


def test_sha256_mismatch_is_refused(table):
    folder, _, _ = table
    data = bytearray((folder / "asid_x2.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    (folder / "asid_x2.safetensors").write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match="sha256 .* does not match the model card"):
        load_pretrained("asid", 2)


def test_missing_weight_file_and_bad_card(table):
    folder, _, _ = table
    (folder / "asid_x2.safetensors").unlink()
    with pytest.raises(PretrainedError, match="names weight file asid_x2.safetensors, which is missing"):
        load_pretrained("asid", 2)
    (folder / "broken_x3.json").write_text('{"name": "broken"}')
    with pytest.raises(PretrainedError, match="broken_x3.json: model card lacks scale, arch, file, sha256"):
        list_pretrained()


def test_card_arch_must_match_weights(table):
    folder, _, _ = table
    card = json.loads((folder / "asid_x2.json").read_text())
    card["arch"] = "asid-d8"
    (folder / "asid_x2.json").write_text(json.dumps(card))
    with pytest.raises(PretrainedError, match="holds asid x2, but its card says asid-d8 x2"):
        load_pretrained("asid", 2)


def test_weights_dir_argument_wins_over_env(table, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    save_pretrained(create_model("asid", 3), "asid", other)
    assert [(e.name, e.scale) for e in list_pretrained(other)] == [("asid", 3)]
    assert load_pretrained("asid", 3, weights_dir=other).scale == 3


def test_models_command_lists_table_and_architectures(table, capsys):
    folder = table[0]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("asid") and " x2 " in l and str(folder) in l)
    assert "30.50 / -" in line and "28.25 / -" in line and "27.00 / -" in line and "test data" in line
    arch = next(l for l in out.splitlines() if l.strip().startswith("asid ") and "params" in l)
    assert "x2 297,516" in arch and "x3 304,011" in arch and "x4 313,104" in arch
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"name": "asid", "scale": 2}.items() <= next(e for e in data["pretrained"]).items()
    assert next(a for a in data["architectures"] if a["name"] == "asid")["params"]["4"] == 313_104


def test_import_distillsr_is_enough_for_load_pretrained():
    import subprocess
    import sys
    from conftest import REPO
    code = "import distillsr; m = distillsr.pretrained.load_pretrained('asid', 2); print(m.arch_name, m.scale)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["asid", "2"]


def test_a_mistyped_checkpoint_path_in_the_api_is_named_as_a_file(tmp_path):
    import numpy as np
    import distillsr
    from distillsr import CheckpointError
    img = np.zeros((8, 8, 3), np.uint8)
    for wrong in (str(tmp_path / "my_model.safetensors"), "runs/x/model.safetensors", "asid_x4.pth"):
        with pytest.raises(CheckpointError, match="no such checkpoint file"):
            distillsr.upscale(img, scale=4, model=wrong)
    with pytest.raises(PretrainedError, match="no pretrained weights 'asdi' x4"):
        distillsr.upscale(img, scale=4, model="asdi")
