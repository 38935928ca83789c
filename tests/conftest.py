"""Shared test helpers: where ../shared is, and skipping cleanly without it."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILLSR_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    """Path inside ../shared; skips the calling test with the reason when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs {p} (the project's ../shared folder; set DISTILLSR_SHARED to its location)")
    return p


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
