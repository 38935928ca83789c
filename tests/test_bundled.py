"""The weights that ship inside the package: their cards, their scores, and the README's first command."""
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, shared_path
from distillsr.cli.main import main
from distillsr.engine.evaluate import evaluate
from distillsr.pretrained import PACKAGE_WEIGHTS_DIR, list_pretrained, load_pretrained, sha256_file
from distillsr.releases import find_release, release_protocol

BUNDLED = [e for e in list_pretrained() if e.bundled]


def test_every_bundled_file_matches_its_card():
    assert {(e.name, e.scale) for e in BUNDLED} == {("asid", 2), ("asid", 3), ("asid", 4), ("e-rfdn-release", 4)}
    cards = sorted(p.name for p in PACKAGE_WEIGHTS_DIR.glob("*.json") if p.name != "releases.json")
    assert cards == sorted(e.card.name for e in BUNDLED)  # no card is shadowed or unreadable
    for e in BUNDLED:
        assert sha256_file(e.file) == e.sha256, e.file
        model = load_pretrained(e.name, e.scale)
        assert (model.arch_name, model.scale) == (e.arch, e.scale)
        assert sum(p.numel() for p in model.parameters()) == e.params


@pytest.mark.parametrize("entry", BUNDLED, ids=lambda e: f"{e.name}-x{e.scale}")
def test_bundled_set5_score_is_the_one_on_the_card(entry):
    """The Set5 PSNR the default choice ranks by is what `distillsr eval` measures."""
    release = find_release(entry.name, entry.scale)
    proto = release_protocol(entry.arch) if release else {"tile": None, "tile_overlap": 24, "chop": False}
    res = evaluate(entry.name, entry.scale, shared_path("data", "benchmark"), ["Set5"], device="cpu",
                   tile=proto["tile"], tile_overlap=proto["tile_overlap"], chop=proto["chop"])
    assert abs(res["results"][0]["psnr"] - entry.set5) < 1e-4  # cards keep 4 decimals
    assert entry.set5_source == "measured"


def test_the_readme_first_command_upscales_the_example(tmp_path, capsys, monkeypatch):
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```bash\n(pip install [^\n]*)\n```", readme).group(1)
    steps = [s.strip() for s in first.split("&&")]
    assert steps[0] == "pip install torch==2.13.0" and steps[1] == 'pip install -e ".[test]"'
    argv = shlex.split(steps[2])
    assert argv[:2] == ["distillsr", "upscale"]
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    argv = [a if a != "out" else str(out) for a in argv[1:]]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "using e-rfdn-release (bundled" in said  # offline, empty cache: the bundled x4 weights
    src = Image.open(REPO / "examples" / "dandelion.png")
    got = Image.open(out / "dandelion.png")
    assert got.size == (src.size[0] * 4, src.size[1] * 4)
    assert np.asarray(got).std() > 10  # a picture, not a flat image
    assert "python3 -m pytest -q" in readme and "python3 -m pytest -q" in (REPO / ".ci" / "run").read_text()
