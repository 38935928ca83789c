"""scripts/ship_weights.py: evaluate a checkpoint, ship it only when it beats the card, keep the card's history."""
import importlib.util
import json

import pytest
import torch

from conftest import REPO, shared_path
from distillsr import create_model, save_model
from distillsr.pretrained import load_pretrained, save_pretrained, sha256_file


def _script():
    spec = importlib.util.spec_from_file_location("ship_weights", REPO / "scripts" / "ship_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ship = _script()


def test_merge_notes_keeps_history_and_drops_the_old_ssim_sentence():
    old = 'Run 1 (300 iterations). Run 2 (200). SSIM (wang): {"Set5": 0.9, "Set14": 0.8}.'
    assert ship.merge_notes(old, " Run 3 (100). ") == "Run 1 (300 iterations). Run 2 (200). Run 3 (100)."
    assert ship.merge_notes("", "Run 1.") == "Run 1."
    # a closing remark the new text repeats moves to the end
    assert ship.merge_notes("Run 1. Far below the paper. SSIM (wang): {}.", "Run 2. Far below the paper.") \
        == "Run 1. Run 2. Far below the paper."
    assert ship.merge_notes("Far below the paper.", "Run 2. Far below the paper.") \
        == "Far below the paper. Run 2. Far below the paper."
    # a SSIM mention that is not the trailing sentence stays
    assert ship.merge_notes("SSIM (wang): {} was low. Run 1.", "Run 2.") == "SSIM (wang): {} was low. Run 1. Run 2."


def test_mean_psnr_needs_every_dataset():
    assert ship.mean_psnr({"Set5": 30.0, "Set14": 27.0, "B100": 26.0}, ["Set5", "Set14"]) == 28.5
    with pytest.raises(KeyError, match="B100"):
        ship.mean_psnr({"Set5": 30.0}, ["Set5", "B100"])


@pytest.fixture
def setup(tmp_path):
    """A checkpoint of a small x4 network, and a weights folder whose card it is compared with."""
    data = shared_path("data", "benchmark", "Set5")
    torch.manual_seed(0)
    ckpt = save_model(create_model("rfdn", 4), tmp_path / "run.safetensors")
    folder = tmp_path / "weights"
    folder.mkdir()
    return data.parent, ckpt, folder


def _shipped(folder, psnr, notes):
    torch.manual_seed(1)
    save_pretrained(create_model("rfdn", 4), "mynet", folder, training_data="photos, session 1",
                    psnr=psnr, psnr_protocol="Y", notes=notes)
    card = folder / "mynet_x4.json"
    return card.read_text(), sha256_file(folder / "mynet_x4.safetensors")


def test_not_better_writes_nothing(setup, capsys):
    data, ckpt, folder = setup
    card_before, sha_before = _shipped(folder, {"Set5": 99.0}, "History.")
    rc = ship.main([str(ckpt), "--name", "mynet", "--data", str(data), "--datasets", "Set5",
                    "--to", str(folder), "--only-if-better", "--append-notes", "Run 2."])
    assert rc == 1
    assert "not shipped" in capsys.readouterr().out
    assert (folder / "mynet_x4.json").read_text() == card_before
    assert sha256_file(folder / "mynet_x4.safetensors") == sha_before
    assert sorted(p.name for p in folder.iterdir()) == ["mynet_x4.json", "mynet_x4.safetensors"]


def test_better_ships_and_appends_to_the_history(setup, capsys):
    data, ckpt, folder = setup
    _shipped(folder, {"Set5": 1.0}, 'Run 1 (400 iterations). SSIM (wang): {"Set5": 0.1}.')
    rc = ship.main([str(ckpt), "--name", "mynet", "--data", str(data), "--datasets", "Set5",
                    "--to", str(folder), "--only-if-better", "--append-notes", "Run 2 (50 iterations).",
                    "--json", str(folder.parent / "eval" / "r.json")])
    assert rc == 0
    assert "better: mean PSNR" in capsys.readouterr().out
    card = json.loads((folder / "mynet_x4.json").read_text())
    result = json.loads((folder.parent / "eval" / "r.json").read_text())["results"][0]
    assert card["psnr"] == {"Set5": round(result["psnr"], 4)} and card["psnr"]["Set5"] > 1.0
    assert card["training_data"] == "photos, session 1"
    assert card["notes"].startswith("Run 1 (400 iterations). Run 2 (50 iterations). SSIM (wang): {\"Set5\": ")
    assert card["notes"].count("SSIM (wang)") == 1
    assert card["sha256"] == sha256_file(folder / "mynet_x4.safetensors")
    shipped = load_pretrained("mynet", 4, weights_dir=folder)
    torch.manual_seed(0)
    expected = create_model("rfdn", 4)
    for k, v in expected.state_dict().items():
        assert torch.equal(shipped.state_dict()[k], v), k


def test_append_or_compare_needs_an_existing_card(setup, capsys):
    data, ckpt, folder = setup
    for flag in (["--append-notes", "Run 2."], ["--only-if-better"]):
        rc = ship.main([str(ckpt), "--name", "mynet", "--data", str(data), "--datasets", "Set5",
                        "--to", str(folder), *flag])
        assert rc == 2
        assert "no card mynet_x4.json" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_notes_and_append_notes_conflict(setup):
    data, ckpt, folder = setup
    with pytest.raises(SystemExit) as e:
        ship.main([str(ckpt), "--to", str(folder), "--notes", "a", "--append-notes", "b"])
    assert e.value.code == 2
