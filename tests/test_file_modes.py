"""Every file the commands write gets the user's umask (an ordinary file), not mkstemp's 0600."""
import os
import stat

import pytest

from conftest import shared_path
from distillsr.cli.main import main


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_eval_degrade_and_profile_outputs_get_the_umask(tmp_path, umask_027):
    bench = shared_path("data", "benchmark")
    assert main(["eval", "--model", "bicubic", "--scale", "4", "--data", str(bench), "--datasets", "Set5",
                 "--json", str(tmp_path / "eval" / "r.json"), "--save-images", str(tmp_path / "eval" / "sr")]) == 0
    assert main(["degrade", str(bench / "Set5" / "HR"), str(tmp_path / "lr"), "--scale", "4", "--no-progress"]) == 0
    assert main(["profile", "--model", "asid", "--scale", "2", "--count-only", "--size", "32x32",
                 "--json", str(tmp_path / "prof" / "p.json")]) == 0
    modes = {**_modes(tmp_path / "eval"), **_modes(tmp_path / "lr"), **_modes(tmp_path / "prof")}
    assert len(modes) == 1 + 5 + 5 + 1 and set(modes.values()) == {umask_027}, modes
