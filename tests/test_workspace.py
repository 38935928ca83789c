"""The workspace of a prepared model: buffers reused across calls without changing any
result, kept per input shape, freed with the model, safe when threads share the model."""
import gc
import threading
import weakref

import numpy as np
import pytest
import torch

import distillsr
from distillsr import kernels
from distillsr.kernels import workspace
from distillsr.kernels.workspace import Workspace
from conftest import shared_path


@pytest.fixture
def every_map(monkeypatch):
    """Serve maps of every size from the workspace (by default only those of 1 MB and more,
    which the small inputs here do not reach)."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)


def _model(seed=0):
    torch.manual_seed(seed)
    return distillsr.create_model("asid", 2, blocks=2).eval()


def _reference(model, xs, monkeypatch):
    """Outputs of the prepared model with the workspace out of use."""
    with monkeypatch.context() as m, torch.inference_mode():
        m.setattr(workspace, "MIN_BYTES", 1 << 62)
        return [model(x) for x in xs]


def test_distillsr_exports_the_preparation():
    assert distillsr.prepare_for_inference is kernels.prepare_for_inference


def test_a_buffer_is_never_handed_out_twice_while_in_use():
    ws = Workspace()
    pool = ws.select("k")
    a = ws.take(pool, (4, 8), torch.float32, torch.device("cpu"))
    b = ws.take(pool, (4, 8), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()
    view = a[1:]  # a view keeps the buffer in use after the tensor itself is gone
    ptr_a = a.data_ptr()
    del a
    c = ws.take(pool, (32,), torch.float32, torch.device("cpu"))
    assert c.data_ptr() not in (ptr_a, b.data_ptr())
    del view
    d = ws.take(pool, (2, 16), torch.float32, torch.device("cpu"))
    assert d.data_ptr() == ptr_a  # free again: reused
    assert ws.nbytes == 3 * 32 * 4


def test_pools_are_kept_for_the_most_recent_shapes():
    ws = Workspace(shapes=2)
    for key in ("a", "b", "a", "c"):
        ws.take(ws.select(key), (8,), torch.float32, torch.device("cpu"))
    assert ws.keys() == ["a", "c"]
    ws.clear()
    assert ws.keys() == [] and ws.nbytes == 0
    with pytest.raises(ValueError, match="shapes"):
        Workspace(shapes=0)


def test_empty_serves_from_the_active_workspace_of_this_thread_only(every_map):
    ws = Workspace()
    seen = {}
    with workspace.active(ws, "k"):
        assert workspace.current() is ws
        t = workspace.empty((3, 5))
        assert ws.nbytes == 60 and t.shape == (3, 5)
        other = threading.Thread(target=lambda: seen.update(ws=workspace.current()))
        other.start()
        other.join()
        with workspace.active(None, "k"):  # nests
            assert workspace.current() is None
            workspace.empty((7,))
        assert workspace.current() is ws
    assert workspace.current() is None and seen["ws"] is None
    assert ws.nbytes == 60


def test_repeated_calls_and_shape_changes_give_the_same_results(every_map, monkeypatch):
    model = distillsr.prepare_for_inference(_model())
    torch.manual_seed(1)
    a, b, c = torch.rand(1, 3, 24, 32), torch.rand(1, 3, 17, 40), torch.rand(2, 3, 16, 16)
    calls = [a, a, b, c, b, a]
    refs = _reference(model, calls, monkeypatch)
    ws = model.workspace()
    with torch.inference_mode():
        outs = [model(x) for x in calls]
        held = outs[0].clone()
        model(a)
    for i, (got, ref) in enumerate(zip(outs, refs)):
        assert torch.equal(got, ref), f"call {i}"
    assert torch.equal(outs[0], held)  # what a call returned is the caller's: never a workspace buffer
    # kept for the two most recent input shapes: b's and a's
    assert ws.keys() == [((1, 3, 17, 40), torch.float32, torch.device("cpu")),
                         ((1, 3, 24, 32), torch.float32, torch.device("cpu"))]


def test_buffers_are_reused_from_one_call_to_the_next(every_map):
    model = distillsr.prepare_for_inference(_model())
    x = torch.rand(1, 3, 24, 32)
    ws = model.workspace()
    with torch.inference_mode():
        model(x)
        first = ws.nbytes
        model(x)
        model(x)
    assert first > 0 and ws.nbytes == first


def test_the_workspace_is_freed_with_the_model_and_by_train(every_map):
    model = distillsr.prepare_for_inference(_model())
    with torch.inference_mode():
        model(torch.rand(1, 3, 24, 32))
    ws = weakref.ref(model.workspace())
    model.train()  # the paper modules again: no workspace
    gc.collect()
    assert ws() is None
    distillsr.prepare_for_inference(model)
    with torch.inference_mode():
        model(torch.rand(1, 3, 24, 32))
    ws = weakref.ref(model.workspace())
    buffers = [weakref.ref(b) for pool in ws()._pools.values() for bs in pool.values() for b in bs]
    assert buffers
    distillsr.prepare_for_inference(model)  # preparing again starts a new one
    gc.collect()
    assert ws() is None and all(b() is None for b in buffers)
    with torch.inference_mode():
        model(torch.rand(1, 3, 24, 32))
    ws = weakref.ref(model.workspace())
    del model
    gc.collect()
    assert ws() is None


def test_autograd_and_the_kernel_switch_leave_the_workspace_unused(every_map, monkeypatch):
    model = distillsr.prepare_for_inference(_model())
    x = torch.rand(1, 3, 24, 32)
    model(x[..., :16, :16])  # autograd on: the paper modules run
    monkeypatch.setattr(kernels, "enabled", False)
    with torch.inference_mode():
        model(x)
    assert model.workspace().nbytes == 0


def test_threads_sharing_a_model_do_not_disturb_each_other(every_map, monkeypatch):
    model = distillsr.prepare_for_inference(_model())
    torch.manual_seed(2)
    inputs = [torch.rand(1, 3, 24, 32) for _ in range(3)] + [torch.rand(1, 3, 16, 24)]
    refs = _reference(model, inputs, monkeypatch)
    errors, start = [], threading.Barrier(4)

    def work(i):
        try:
            start.wait()
            with torch.inference_mode():
                for n in range(4):
                    k = (i + n) % len(inputs)
                    if not torch.equal(model(inputs[k]), refs[k]):
                        errors.append((i, n))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_the_official_outputs_with_every_map_from_the_workspace(every_map):
    scale = 2
    folder = shared_path("fixtures", "asid")
    model = distillsr.prepare_for_inference(distillsr.load_model(folder / f"asid_x{scale}_official_random.pth"))
    with torch.inference_mode():
        for inp, out in [("input_37x45.npy", f"asid_x{scale}_out_37x45.npy"),
                         ("input_b2_24x32.npy", f"asid_x{scale}_out_b2_24x32.npy")]:
            x, ref = (torch.from_numpy(np.load(folder / n)) for n in (inp, out))
            for _ in range(2):  # the second call on the first one's buffers
                assert (model.forward_native(x) - ref).abs().max() <= 2e-6
    assert model.workspace().nbytes > 0
