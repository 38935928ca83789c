"""Model cards: the structured form (training record, scores per set), the older flat form, and
what the bundled cards and the training history say."""
import csv
import json
import re

import pytest
import torch

from conftest import REPO
from distillsr import create_model
from distillsr.pretrained import PACKAGE_WEIGHTS_DIR, PretrainedError, get_pretrained, save_pretrained

TRAINING = {"data": "40 photos of mine", "iterations": 1200, "hardware": "a 4-core laptop, CPU only",
            "wall_time_h": 2.5, "commands": ["distillsr train --config asid_x2_photos train.iters=1200"]}


def _small(scale=2):
    torch.manual_seed(0)
    return create_model("asid", scale, blocks=1)


def test_structured_card_written_and_read(tmp_path):
    entry = save_pretrained(_small(), "mine", tmp_path, training=TRAINING,
                            psnr={"Set5": 35.5, "Set14": 31.25}, ssim={"Set5": 0.95, "Set14": 0.9},
                            psnr_protocol="Y, whole image", notes="short")
    card = json.loads((tmp_path / "mine_x2.json").read_text())
    assert card["training"] == TRAINING
    assert card["scores"] == {"Set5": {"psnr": 35.5, "ssim": 0.95}, "Set14": {"psnr": 31.25, "ssim": 0.9}}
    assert card["protocol"] == "Y, whole image" and card["notes"] == "short"
    assert not {"psnr", "training_data", "psnr_protocol"} & set(card)  # each fact in one place
    assert entry.psnr == {"Set5": 35.5, "Set14": 31.25} and entry.ssim == {"Set5": 0.95, "Set14": 0.9}
    assert entry.training == TRAINING and entry.training_data == "40 photos of mine"
    assert entry.psnr_protocol == "Y, whole image" and entry.set5 == 35.5


def test_training_data_alone_fills_the_record(tmp_path):
    entry = save_pretrained(_small(), "mine", tmp_path, training_data="some photos", psnr={"Set5": 30.0})
    card = json.loads((tmp_path / "mine_x2.json").read_text())
    assert card["training"] == {"data": "some photos"} and card["scores"] == {"Set5": {"psnr": 30.0}}
    assert entry.training_data == "some photos" and entry.ssim == {}


def test_conflicting_training_data_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="differ"):
        save_pretrained(_small(), "mine", tmp_path, training_data="a", training={"data": "b"})
    with pytest.raises(PretrainedError, match="training.iterations must be int"):
        save_pretrained(_small(), "mine", tmp_path, training={"iterations": "many"})
    assert list(tmp_path.iterdir()) == []


def _write_card(folder, **fields):
    save_pretrained(_small(), "mine", folder)
    card = json.loads((folder / "mine_x2.json").read_text())
    for k in ("training", "scores", "protocol", "notes"):
        card.pop(k)
    card.update(fields)
    (folder / "mine_x2.json").write_text(json.dumps(card))


def test_older_flat_card_is_still_read(tmp_path):
    """A folder of one's own may hold cards in the older form: training_data, psnr, psnr_protocol."""
    _write_card(tmp_path, training_data="photos", psnr={"Set5": 31.0, "B100": 27.5},
                psnr_protocol="Y", notes="long history")
    e = get_pretrained("mine", 2, weights_dir=tmp_path)
    assert e.psnr == {"Set5": 31.0, "B100": 27.5} and e.ssim == {}
    assert e.training_data == "photos" and e.training == {"data": "photos"}
    assert e.psnr_protocol == "Y" and e.notes == "long history" and e.set5 == 31.0
    _write_card(tmp_path, training=None, scores=None, training_data="photos")  # null: as if absent
    e = get_pretrained("mine", 2, weights_dir=tmp_path)
    assert e.training == {"data": "photos"} and e.psnr == {} and e.ssim == {}


@pytest.mark.parametrize("fields, message", [
    ({"training": "photos"}, "'training' must be an object"),
    ({"training": {"wall_time_h": "2h"}}, r"training.wall_time_h must be int or float, not '2h'"),
    ({"training": {"commands": "distillsr train"}}, "training.commands must be list"),
    ({"training": {"commands": [1]}}, "training.commands must be a list of strings"),
    ({"scores": {"Set5": 30.0}}, "'scores' must map each set to"),
    ({"scores": {"Set5": {"psnr": "high"}}}, r"scores.Set5.psnr must be a number, not 'high'"),
    ({"psnr": {"Set5": "high"}}, "'psnr' must map each set to a number"),
])
def test_malformed_card_names_the_field(tmp_path, fields, message):
    _write_card(tmp_path, **fields)
    with pytest.raises(PretrainedError, match=f"mine_x2.json: {message}"):
        get_pretrained("mine", 2, weights_dir=tmp_path)


def test_release_scores_come_from_the_release_table():
    """A release's card keeps no scores; PSNR and SSIM are the release table's measured ones."""
    from distillsr.releases import get_release
    e = get_pretrained("e-rfdn-release", 4, weights_dir=PACKAGE_WEIGHTS_DIR)
    measured = get_release("e-rfdn-release", 4).measured
    assert e.psnr == {k: v["psnr"] for k, v in measured.items()}
    assert e.ssim == {k: v["ssim"] for k, v in measured.items()} and set(e.ssim) == {"Set5", "Set14", "B100"}
    assert e.training == {"data": "DIV2K (the authors' training)"} and "scores" not in e.card.read_text()


# --- the bundled ASID cards and docs/training.md ---------------------------------------------

ASID = [get_pretrained("asid", s, weights_dir=PACKAGE_WEIGHTS_DIR) for s in (2, 3, 4)]
HISTORY = REPO / "docs" / "training.md"
LOGS = REPO / "docs" / "training_logs"


@pytest.mark.parametrize("entry", ASID, ids=lambda e: f"x{e.scale}")
def test_bundled_card_is_structured(entry):
    t = entry.training
    assert {"data", "start", "iterations", "hardware", "wall_time_h", "commands", "history"} <= set(t)
    assert set(entry.psnr) == set(entry.ssim) == {"Set5", "Set14", "B100"}
    assert all(0.5 < v < 1 for v in entry.ssim.values())
    assert len(t["commands"]) >= 8 and all(c.startswith("distillsr train ") for c in t["commands"])
    assert len(entry.notes) <= 300 and entry.psnr_protocol
    text = entry.card.read_text()
    assert "../shared" not in text  # a folder users do not have
    assert "docs/training.md" in t["history"]


def _runs(scale):
    """The rows of docs/training.md's table for x``scale``: {run id: {column: cell}}."""
    text = HISTORY.read_text()
    table = text.split(f"## x{scale}\n", 1)[1].split("\n## ", 1)[0]
    lines = [l for l in table.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in l.strip("|").split("|")))) for l in lines[2:]]
    return {r["run"]: r for r in rows}


@pytest.mark.parametrize("entry", ASID, ids=lambda e: f"x{e.scale}")
def test_history_matches_the_card(entry):
    """The card's totals are the sums of the shipped runs in docs/training.md, and its last row
    holds the card's scores."""
    runs = [r for r in _runs(entry.scale).values() if r["weights kept"] != "none"]
    assert sum(int(r["iterations"].replace(",", "")) for r in runs) == entry.training["iterations"]
    assert len(runs) == len(entry.training["commands"])
    minutes = sum(int(r["wall time (min)"]) for r in runs)
    assert abs(minutes / 60 - entry.training["wall_time_h"]) < 0.05
    last = runs[-1]["Set5 / Set14 / B100"]
    assert last == " / ".join(f"{entry.psnr[k]:.2f}" for k in ("Set5", "Set14", "B100"))
    for run, command in zip(runs, entry.training["commands"]):
        assert f"name=asid_x{entry.scale}_{run['run']} " in command


def test_every_log_has_its_run():
    """Each log in docs/training_logs is a run of docs/training.md (named asid_x<s>_<date><letter>.csv,
    its date that of the run), and each run names its log."""
    logs = sorted(p.name for p in LOGS.glob("*.csv"))
    assert logs and all(re.fullmatch(r"asid_x[234]_\d{4}-\d\d-\d\d[a-z]\.csv", n) for n in logs)
    named = []
    for s in (2, 3, 4):
        for run, row in _runs(s).items():
            assert row["log"] == f"[asid_x{s}_{run}.csv](training_logs/asid_x{s}_{run}.csv)"
            named.append(f"asid_x{s}_{run}.csv")
            with open(LOGS / f"asid_x{s}_{run}.csv") as f:
                last = list(csv.DictReader(f))[-1]
            # the log reaches (within one logging step) the iterations of its run
            assert 0 <= int(row["iterations"].replace(",", "")) - int(last["iter"]) < 10, run
    assert sorted(named) == logs
    assert "../shared" not in HISTORY.read_text()
