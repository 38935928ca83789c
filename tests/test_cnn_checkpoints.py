"""Loading the RFDN / FDIWN releases without flags, and refusing bad files safely."""
import os
import pickle
import sys

import pytest
import torch

import distillsr
from distillsr import CheckpointError
from distillsr.checkpoint import read_state_dict, recognise
from distillsr.convert.safe_pickle import load_restricted
from conftest import shared_path


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("file, arch, scale", [
    ("rfdn_aim_x4.pth", "e-rfdn", 4),
    ("fdiwn_x2.pt", "fdiwn", 2), ("fdiwn_x3.pt", "fdiwn", 3), ("fdiwn_x4.pt", "fdiwn", 4),
    ("fdiwn_x2_state.pth", "fdiwn", 2), ("fdiwn_x3_state.pth", "fdiwn", 3), ("fdiwn_x4_state.pth", "fdiwn", 4),
])
def test_released_files_are_recognised(file, arch, scale):
    sd, meta = read_state_dict(shared_path("weights", "official", file))
    rec = recognise(sd)
    assert (rec.arch, rec.scale, rec.pixel_range) == (arch, scale, (0.0, 255.0))
    assert rec.source.startswith("official")
    if arch == "fdiwn":  # weight-norm pairs folded into plain weights
        assert not any(k.endswith(("weight_g", "weight_v")) for k in rec.state_dict)
        assert rec.options == {"weight_norm": False}


def test_pt_pickle_and_state_copy_give_the_same_weights():
    a = distillsr.load_model(shared_path("weights", "official", "fdiwn_x3.pt")).state_dict()
    b = distillsr.load_model(shared_path("weights", "official", "fdiwn_x3_state.pth")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restricted_unpickler_reads_tensors_like_weights_only(tmp_path):
    path = shared_path("weights", "official", "rfdn_aim_x4.pth")  # legacy (non-zip) pickle
    ref = torch.load(path, map_location="cpu", weights_only=True)
    got = load_restricted(path, RuntimeError("test"))
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    zipped = {"a": torch.arange(6.).reshape(2, 3), "b": torch.nn.Parameter(torch.ones(2))}
    torch.save(zipped, tmp_path / "z.pth")
    got = load_restricted(tmp_path / "z.pth", RuntimeError("test"))
    assert torch.equal(got["a"], zipped["a"]) and torch.equal(got["b"], zipped["b"])


class _WritesMarker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch-zip", "torch-legacy"])
def test_code_in_a_checkpoint_is_refused_not_run(tmp_path, how):
    marker = tmp_path / "marker"
    payload = {"fea_conv.weight": torch.zeros(50, 3, 3, 3), "B1.c1_d.weight": _WritesMarker(marker)}
    evil = tmp_path / "evil.pth"
    if how == "pickle":  # a bare pickle (no tensors: pickle.dumps of a tensor is refused too)
        evil.write_bytes(pickle.dumps({"B1.c1_d.weight": _WritesMarker(marker)}))
    else:
        torch.save(payload, evil, _use_new_zipfile_serialization=(how == "torch-zip"))
    with pytest.raises(CheckpointError, match=r"evil\.pth: not loaded: the pickle needs 'builtins\.exec'"):
        distillsr.load_model(evil)
    assert not marker.exists()
    # the payload is real: an ordinary unpickler does run it
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()


@pytest.mark.parametrize("file", ["rfdn_aim_x4.pth", "fdiwn_x2_state.pth", "fdiwn_x2.pt"])
def test_truncated_release_gives_a_clear_error(tmp_path, file):
    data = shared_path("weights", "official", file).read_bytes()
    cut = tmp_path / ("cut_" + file)
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut_.*: cannot load checkpoint: truncated"):
        distillsr.load_model(cut)


def test_non_sr_checkpoint_is_named(tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(),
               tmp_path / "classifier.pth")
    with pytest.raises(CheckpointError, match=r"classifier\.pth: not a known architecture"):
        distillsr.load_model(tmp_path / "classifier.pth")


def test_release_with_a_missing_tensor_is_not_taken_for_fdiwn(tmp_path):
    sd, _ = read_state_dict(shared_path("weights", "official", "fdiwn_x4_state.pth"))
    del sd["Li2.MY3.srb4.body.3.weight_v"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"broken\.pth"):
        distillsr.load_model(tmp_path / "broken.pth")


@pytest.mark.parametrize("name, scale", [("rfdn", 3), ("e-rfdn", 2)])
def test_rfdn_round_trips(tmp_path, name, scale):
    torch.manual_seed(0)
    m = distillsr.create_model(name, scale).eval()
    loaded = distillsr.load_model(distillsr.save_model(m, tmp_path / "m.safetensors"))
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    bare = distillsr.load_model(tmp_path / "bare.pth")
    x = torch.rand(1, 3, 16, 15)
    with torch.no_grad():
        for other in (loaded, bare):
            assert other.arch_name == name and other.pixel_range == (0.0, 255.0)
            assert torch.equal(other(x), m(x))
