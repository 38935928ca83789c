"""Shared test helpers: where ../shared is, and skipping cleanly without it."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILLSR_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    """Path inside ../shared. Skips the calling test, with the reason, only when the folder
    itself is absent: with ../shared present, a missing file fails the test that needs it."""
    if not SHARED.is_dir():
        pytest.skip(f"needs {SHARED} (the project's ../shared folder; set DISTILLSR_SHARED to its location)")
    return SHARED.joinpath(*parts)


@pytest.fixture(autouse=True)
def _few_threads():
    import torch
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _hermetic_weights(tmp_path_factory, monkeypatch):
    """Each test gets an empty weights cache, and release downloads go to a closed local
    port unless the test serves them itself: no test depends on the user's cache or the network."""
    monkeypatch.setenv("DISTILLSR_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("DISTILLSR_WEIGHTS_MIRROR", "http://127.0.0.1:9")
    yield
