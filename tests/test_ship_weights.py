"""distillsr ship: evaluate a checkpoint, ship it only when it beats the card, keep the card's training record."""
import json
import re
import shutil

import pytest
import torch

from conftest import shared_path
from distillsr import create_model, save_model
from distillsr.cli.main import main
from distillsr.engine.ship import Run, mean_psnr, update_training
from distillsr.pretrained import load_pretrained, save_pretrained, sha256_file

HISTORY = {"data": "photos", "start": "random init", "iterations": 400, "hardware": "a 2-core VM",
           "wall_time_h": 1.5, "commands": ["distillsr train --config a"], "history": "docs/x.md"}


def test_mean_psnr_needs_every_dataset():
    assert mean_psnr({"Set5": 30.0, "Set14": 27.0, "B100": 26.0}, ["Set5", "Set14"]) == 28.5
    with pytest.raises(KeyError, match="B100"):
        mean_psnr({"Set5": 30.0}, ["Set5", "B100"])


def test_update_training_adds_the_run_to_the_record():
    run = Run(iterations=50, wall_time_h=0.254, command="distillsr train --config b", hardware="a GPU")
    new = update_training(HISTORY, run)
    assert new == {**HISTORY, "iterations": 450, "wall_time_h": 1.75, "hardware": "a GPU",
                   "commands": ["distillsr train --config a", "distillsr train --config b"]}
    assert HISTORY["commands"] == ["distillsr train --config a"]  # the old record is left alone
    assert update_training(HISTORY, Run()) == HISTORY
    # a new card: the run is all there is
    assert update_training(None, run) == {"iterations": 50, "wall_time_h": 0.25, "hardware": "a GPU",
                                          "commands": ["distillsr train --config b"]}
    # a card without a total keeps it unknown rather than recording the run's share as the total
    said = []
    assert update_training({"data": "photos"}, Run(iterations=50, data="more photos"), said.append) \
        == {"data": "more photos"}
    assert said == ["the card records no iterations, so the total stays unknown (this run: 50)"]


@pytest.fixture
def setup(tmp_path):
    """A checkpoint of a small x4 network, an empty weights folder, and a benchmark folder whose
    Set5 holds two of its images (to keep the evaluations short)."""
    set5 = shared_path("data", "benchmark", "Set5")
    bench = tmp_path / "bench"
    for name in ("bird", "butterfly"):
        for src, dst in ((set5 / "HR" / f"{name}.png", bench / "Set5" / "HR" / f"{name}.png"),
                         (set5 / "LR_bicubic" / "X4" / f"{name}x4.png",
                          bench / "Set5" / "LR_bicubic" / "X4" / f"{name}x4.png")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    torch.manual_seed(0)
    ckpt = save_model(create_model("rfdn", 4), tmp_path / "run.safetensors")
    folder = tmp_path / "weights"
    folder.mkdir()
    return bench, ckpt, folder


def _shipped(folder, psnr, training=HISTORY, notes="Short remark."):
    torch.manual_seed(1)
    save_pretrained(create_model("rfdn", 4), "mynet", folder, training=training, psnr=psnr,
                    ssim={k: 0.5 for k in psnr}, psnr_protocol="Y", notes=notes)
    return (folder / "mynet_x4.json").read_text(), sha256_file(folder / "mynet_x4.safetensors")


def _ship(ckpt, folder, data, *flags):
    return main(["ship", str(ckpt), "--name", "mynet", "--data", str(data), "--datasets", "Set5",
                 "--to", str(folder), *flags])


def test_not_better_writes_nothing(setup, capsys):
    data, ckpt, folder = setup
    card_before, sha_before = _shipped(folder, {"Set5": 99.0})
    assert _ship(ckpt, folder, data, "--only-if-better", "--iterations", "50") == 1
    assert "not shipped: mean PSNR" in capsys.readouterr().out
    assert (folder / "mynet_x4.json").read_text() == card_before
    assert sha256_file(folder / "mynet_x4.safetensors") == sha_before
    assert sorted(p.name for p in folder.iterdir()) == ["mynet_x4.json", "mynet_x4.safetensors"]


def test_better_ships_and_updates_the_record(setup, capsys):
    data, ckpt, folder = setup
    _shipped(folder, {"Set5": 1.0})
    rc = _ship(ckpt, folder, data, "--only-if-better", "--iterations", "50", "--wall-time-h", "0.25",
               "--command", "distillsr train --config b", "--device", "cpu",
               "--json", str(folder.parent / "eval" / "r.json"))
    assert rc == 0
    assert "better: mean PSNR" in capsys.readouterr().out
    card = json.loads((folder / "mynet_x4.json").read_text())
    result = json.loads((folder.parent / "eval" / "r.json").read_text())["results"][0]
    assert [im["name"] for im in result["images"]] == ["bird", "butterfly"]
    assert card["scores"] == {"Set5": {"psnr": round(result["psnr"], 4), "ssim": round(result["ssim"], 5)}}
    assert card["scores"]["Set5"]["psnr"] > 1.0
    assert card["training"] == {**HISTORY, "iterations": 450, "wall_time_h": 1.75,
                                "commands": ["distillsr train --config a", "distillsr train --config b"]}
    assert card["notes"] == "Short remark." and "fp32 CPU, SSIM wang" in card["protocol"]
    assert not {"psnr", "training_data", "psnr_protocol"} & set(card)
    assert card["sha256"] == sha256_file(folder / "mynet_x4.safetensors")
    shipped = load_pretrained("mynet", 4, weights_dir=folder)
    torch.manual_seed(0)
    expected = create_model("rfdn", 4)
    for k, v in expected.state_dict().items():
        assert torch.equal(shipped.state_dict()[k], v), k


def test_new_card_then_replace(setup, capsys):
    data, ckpt, folder = setup
    assert _ship(ckpt, folder, data, "--iterations", "50", "--training-data", "my photos",
                 "--hardware", "a laptop", "--notes", "first") == 0
    card = json.loads((folder / "mynet_x4.json").read_text())
    assert card["training"] == {"data": "my photos", "iterations": 50, "hardware": "a laptop"}
    assert card["notes"] == "first" and set(card["scores"]) == {"Set5"}
    # --replace forgets the record and the notes there
    _shipped(folder, {"Set5": 1.0})
    assert _ship(ckpt, folder, data, "--replace", "--iterations", "70") == 0
    card = json.loads((folder / "mynet_x4.json").read_text())
    assert card["training"] == {"iterations": 70} and card["notes"] == ""


def test_an_older_flat_card_is_brought_to_the_structured_form(setup):
    data, ckpt, folder = setup
    _shipped(folder, {"Set5": 1.0})
    card = json.loads((folder / "mynet_x4.json").read_text())
    for k in ("training", "scores", "protocol"):
        del card[k]
    card.update(training_data="photos, older card", psnr={"Set5": 1.0}, psnr_protocol="Y")
    (folder / "mynet_x4.json").write_text(json.dumps(card))
    assert _ship(ckpt, folder, data, "--only-if-better", "--iterations", "50") == 0
    card = json.loads((folder / "mynet_x4.json").read_text())
    assert card["training"] == {"data": "photos, older card"}  # no total to add the 50 to
    assert set(card["scores"]["Set5"]) == {"psnr", "ssim"} and "psnr" not in card


@pytest.mark.parametrize("flags, card, message", [
    (["--only-if-better"], None, "no card mynet_x4.json in .* to compare with"),
    (["--only-if-better", "--datasets", "Set5", "B100"], "rfdn", "cannot be compared: no PSNR for B100"),
    ([], "asid", "is a card of asid, but .* holds rfdn; replace=True"),
    (["--name", "e-rfdn-release"], None, "'e-rfdn-release' names authors' weights of the release table"),
    (["--device", "gpu"], None, "--device 'gpu' is not a device"),
    (["--iterations", "-5"], None, "--iterations must not be negative"),
])
def test_refusals_write_nothing(tmp_path, capsys, flags, card, message):
    """Each is refused before any evaluation: the benchmark folder here is empty."""
    torch.manual_seed(0)
    ckpt = save_model(create_model("rfdn", 4), tmp_path / "run.safetensors")
    folder = tmp_path / "weights"
    folder.mkdir()
    if card:
        save_pretrained(create_model(card, 4), "mynet", folder, psnr={"Set5": 1.0})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv = ["ship", str(ckpt), "--name", "mynet", "--data", str(tmp_path / "empty"), "--to", str(folder), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillsr ship: error: ")
    assert re.search(message, err), err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_data_folder_is_required(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISTILLSR_DATA", raising=False)
    assert main(["ship", str(tmp_path / "x.safetensors"), "--name", "mynet"]) == 2
    assert "give --data ROOT" in capsys.readouterr().err
