"""Training engine: learning, exact resume, interrupted checkpoint writes, init from another checkpoint."""
import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from train_helpers import TINY, make_paired, tiny_config

from distillsr.checkpoint import load_model, read_state_dict
from distillsr.data.train_data import PairStore, PatchDataset, find_pairs
from distillsr.engine import ConfigError, TrainError, load_config, train
from distillsr.engine import state as st
from distillsr.engine.train import init_from_checkpoint, lr_at
from distillsr.registry import create_model

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_paired(root, n=3, size=48, scale=2)
    return root


def _cfg(tmp, data, **over):
    return load_config(None, tiny_config(tmp, data, **over))


def _weights(path):
    sd, _ = read_state_dict(path)
    return sd


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_goes_down(tmp_path, data):
    cfg = _cfg(tmp_path, data, **{"train.iters": 40, "train.log_every": 10, "train.ckpt_every": 40})
    r = train(cfg, **QUIET)
    assert r.completed and r.iteration == 40
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
    # the final weights load with the public loader and run
    m = load_model(r.final_weights)
    assert m.scale == 2 and m(torch.rand(1, 3, 10, 10)).shape == (1, 3, 20, 20)
    rows = list(csv.DictReader(open(r.run_dir / "log.csv")))
    assert [int(x["iter"]) for x in rows] == [10, 20, 30, 40]
    assert (r.run_dir / "config.yaml").is_file()


def test_resume_is_bitwise_exact_mid_epoch_with_workers(tmp_path, data):
    # 3 images x repeat 1, batch 4: epochs end mid-batch; the stop (7) and checkpoints (4, 8) fall mid-epoch
    a = train(_cfg(tmp_path, data, name="a", **{"train.iters": 10}), **QUIET)

    def stop_at_7(trainer, done):
        if done == 7:
            trainer.request_stop()

    over = {"name": "b", "train.iters": 10, "data.num_workers": 2}
    b1 = train(_cfg(tmp_path, data, **over), callbacks=[stop_at_7], **QUIET)
    assert not b1.completed and b1.iteration == 7
    assert [i for i, _ in st.list_checkpoints(b1.run_dir / "checkpoints")] == [4, 7]
    ran, steps = [], []

    def record(trainer, done):  # the iterations the resumed call runs, and Adam's step count
        ran.append(done)
        steps.append({int(s["step"]) for s in trainer.optimizer.state.values()})

    msgs = []
    b2 = train(_cfg(tmp_path, data, **over), resume="auto", callbacks=[record], log=msgs.append)
    assert b2.completed and b2.iteration == 10
    # it did resume: it ran only iterations 8..10, with the optimizer state of iteration 7
    assert b2.start_iter == 7 and ran == [8, 9, 10] and steps == [{8}, {9}, {10}]
    assert any(m.startswith("resuming from iteration 7 ") for m in msgs), msgs
    assert _same(_weights(a.final_weights), _weights(b2.final_weights))  # EMA weights
    ca, cb = a.run_dir / "checkpoints", b2.run_dir / "checkpoints"
    assert _same(_weights(ca / "iter_00000010.safetensors"), _weights(cb / "iter_00000010.safetensors"))
    sa = torch.load(ca / "iter_00000010.state.pt", weights_only=True)
    sb = torch.load(cb / "iter_00000010.state.pt", weights_only=True)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # the CSV log of the resumed run has each iteration once
    rows = [int(r["iter"]) for r in csv.DictReader(open(b2.run_dir / "log.csv"))]
    assert rows == [2, 4, 6, 8, 10]


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import train_helpers  # registers the tiny network
    from distillsr.engine import load_config, train
    import distillsr.engine.state as st

    real = st.atomic_write
    def dying_write(path, write_fn):
        if path.name == "iter_00000008.state.pt":  # half-written state file, then the power goes out
            def partial(tmp):
                with open(tmp, "wb") as f:
                    f.write(b"\\x80\\x02partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, partial)
        return real(path, write_fn)
    st.atomic_write = dying_write
    train(load_config(None, {overrides!r}))
""")


def test_killed_during_checkpoint_write_resumes_from_last_good(tmp_path, data):
    over = {"name": "k", "train.iters": 10}
    ref = train(_cfg(tmp_path, data, name="ref", **{"train.iters": 10}), **QUIET)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=str(REPO / "tests"), overrides=tiny_config(tmp_path, data, **over)))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    ck = tmp_path / "runs" / "k" / "checkpoints"
    assert (ck / "iter_00000008.safetensors").exists() and not (ck / "iter_00000008.state.pt").exists()
    assert any(x.name.startswith(".iter_00000008.state.pt.") for x in ck.iterdir())  # the writer's temp file
    msgs = []
    r = train(_cfg(tmp_path, data, **over), resume="auto", log=msgs.append)
    assert any("resuming from iteration 4" in m for m in msgs), msgs
    assert any("temp file" in m for m in msgs)
    assert not any(x.name.startswith(".") for x in ck.iterdir())
    assert r.completed and _same(_weights(ref.final_weights), _weights(r.final_weights))


def test_corrupt_or_mismatched_checkpoint_is_skipped(tmp_path, data):
    r = train(_cfg(tmp_path, data, **{"train.iters": 8, "train.ckpt_every": 2}), **QUIET)
    ck = r.run_dir / "checkpoints"
    assert [i for i, _ in st.list_checkpoints(ck)] == [4, 6, 8]  # keep_ckpts 3
    (ck / "iter_00000008.state.pt").write_bytes(b"truncated")
    with open(ck / "iter_00000006.safetensors", "r+b") as f:  # weights changed after the state was written
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    msgs = []
    found = st.find_resumable(ck, log=msgs.append)
    assert found["iteration"] == 4
    assert "iteration 8" in msgs[0] and "unreadable" in msgs[0]
    assert "iteration 6" in msgs[1] and "sha256" in msgs[1]


def test_refuses_to_overwrite_a_run_and_bad_resume_path(tmp_path, data):
    train(_cfg(tmp_path, data, **{"train.iters": 4}), **QUIET)
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(_cfg(tmp_path, data, **{"train.iters": 4}), **QUIET)
    with pytest.raises(TrainError, match="no such file"):
        train(_cfg(tmp_path, data, **{"train.iters": 4}), resume=str(tmp_path / "nope.state.pt"), **QUIET)
    # resuming a finished run with more iterations extends it
    r = train(_cfg(tmp_path, data, **{"train.iters": 6}), resume="auto", **QUIET)
    assert r.completed and r.iteration == 6


def test_init_from_other_scale_skips_only_the_upsampler(tmp_path):
    x2 = create_model(TINY, 2)
    x3 = create_model(TINY, 3)
    from distillsr.checkpoint import save_model
    p = save_model(x2, tmp_path / "x2.safetensors")
    with pytest.raises(TrainError, match="init_strict: false"):
        init_from_checkpoint(x3, p, strict=True, log=lambda m: None)
    msgs = []
    rep = init_from_checkpoint(x3, p, strict=False, log=msgs.append)
    assert rep["shape_mismatch"] == ["tail.weight (12, 8, 3, 3) -> (27, 8, 3, 3)", "tail.bias (12,) -> (27,)"]
    assert sorted(rep["loaded"]) == ["body.bias", "body.weight", "head.bias", "head.weight"]
    assert torch.equal(x3.head.weight, x2.head.weight) and any("tail.weight" in m for m in msgs)


def test_init_from_in_a_run(tmp_path, data):
    r2 = train(_cfg(tmp_path, data, name="x2", **{"train.iters": 4}), **QUIET)
    d3 = make_paired(tmp_path / "x3data", n=2, size=48, scale=3)[0].parent
    msgs = []
    r3 = train(_cfg(tmp_path, d3, name="x3", **{"train.iters": 2, "model.scale": 3, "data.patch_size": 8,
                                                   "init_from": str(r2.final_weights), "init_strict": False}),
               log=msgs.append)
    assert r3.completed and any("skipped (shape mismatch): tail.weight" in m for m in msgs)


def test_sample_stream_is_a_function_of_seed_and_index(data):
    specs = find_pairs("paired", data / "HR", 2, str(data / "LR"))
    store = PairStore(specs, 2, cache=False).prepare(12, log=lambda m: None)
    a = PatchDataset(store, 12, seed=5)
    b = PatchDataset(PairStore(specs, 2, cache=True).prepare(12, log=lambda m: None), 12, seed=5)
    for n in (0, 7, 3, 100, 2, 7):  # any order, cached or not: same sample
        la, ha = a[n]
        lb, hb = b[n]
        assert np.array_equal(la, lb) and np.array_equal(ha, hb) and ha.shape == (3, 24, 24)
    # each epoch visits every image once
    assert sorted(a.image_index(n) for n in range(3)) == [0, 1, 2]
    assert sorted(a.image_index(n) for n in range(3, 6)) == [0, 1, 2]
    # the HR patch is the LR patch's region: downscaling it reproduces the LR patch closely
    lr, hr = a[11]
    down = torch.nn.functional.avg_pool2d(torch.from_numpy(hr)[None].float(), 2)[0]
    assert (down - torch.from_numpy(lr).float()).abs().mean() < 6
    c = PatchDataset(store, 12, seed=6)
    assert not np.array_equal(c[0][1], a[0][1])


def test_schedules():
    c = load_config(None, ["train.iters=100", "sched.name=step", "sched.milestones=[0.5, 80]", "optim.lr=1.0"])
    assert [lr_at(c, i) for i in (0, 49, 50, 79, 80, 99)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    c = load_config(None, ["train.iters=100", "sched.name=cosine", "sched.warmup_iters=10", "optim.lr=1.0",
                           "sched.min_lr=0.1"])
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 10) == pytest.approx(1.0)
    assert lr_at(c, 55) == pytest.approx(0.55) and lr_at(c, 100) == pytest.approx(0.1)


def test_small_or_broken_images_are_left_out_and_named(tmp_path, data):
    import shutil
    from PIL import Image
    d = tmp_path / "d"
    shutil.copytree(data, d)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(d / "HR" / "tiny.png")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(d / "LR" / "tinyx2.png")
    (d / "HR" / "broken.png").write_bytes(b"not a png")
    (d / "LR" / "brokenx2.png").write_bytes(b"not a png")
    specs = find_pairs("paired", d / "HR", 2, str(d / "LR"))
    msgs = []
    store = PairStore(specs, 2).prepare(12, log=msgs.append)
    assert len(store) == 3
    text = " ".join(msgs)
    assert "tiny.png" in text and "smaller than the 12px patch" in text and "broken" in text


def test_photos_config_end_to_end_with_asid(tmp_path, capsys):
    """The asid_x2_photos recipe through the CLI on a tiny folder of photos: LR made on the fly,
    validation on a benchmark-layout set, best/final weights readable by load_model."""
    pytest.importorskip("distillsr.data.imresize")
    pytest.importorskip("distillsr.metrics")
    from PIL import Image
    from train_helpers import smooth_image
    from distillsr.cli.main import main
    from distillsr.registry import list_models
    if "asid" not in list_models():
        pytest.skip("ASID is not in this build")
    rng = np.random.default_rng(0)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(rng, 40, 44)).save(photos / f"p{i}.png")
    Image.fromarray(smooth_image(rng, 20, 20)).save(photos / "small.png")  # LR 10x10 < patch: left out
    (photos / "notes.txt").write_text("not an image")
    val = tmp_path / "Set1" / "HR"
    val.mkdir(parents=True)
    Image.fromarray(smooth_image(rng, 34, 30)).save(val / "a.png")  # LR made on the fly too
    rc = main(["train", "--config", "asid_x2_photos", f"data.root={photos}", f"val.dir={val.parent}",
               f"out_dir={tmp_path / 'runs'}", "model.options.blocks=1", "data.patch_size=16",
               "data.batch_size=2", "train.iters=2", "val.every=1", "train.ckpt_every=1",
               "sched.warmup_iters=1", "train.progress=log"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    run = tmp_path / "runs" / "asid_x2_photos"
    assert "left out" in out.out and "small.png" in out.out and "validation @ 2: PSNR" in out.out
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [r["iter"] for r in rows] == ["1", "2"] and all(0 < float(r["val_psnr"]) < 100 for r in rows)
    for f in ("best.safetensors", "model.safetensors"):
        m = load_model(run / f)
        assert m.arch_name == "asid" and m.scale == 2


def test_bf16_autocast_and_channels_last(tmp_path, data):
    r = train(_cfg(tmp_path, data, **{"train.iters": 4, "train.amp": "bf16", "train.channels_last": True}),
              **QUIET)
    assert r.completed and np.isfinite(r.last_loss)
    with pytest.raises(TrainError, match="fp16 needs a CUDA device"):
        train(_cfg(tmp_path, data, name="fp16", **{"train.amp": "fp16"}), **QUIET)


def test_diverging_run_stops_before_writing_a_bad_checkpoint(tmp_path, data):
    cfg = _cfg(tmp_path, data, **{"optim.lr": 1e30, "train.iters": 40, "train.ckpt_every": 2, "train.log_every": 2,
                                  "optim.weight_decay": 0})
    with pytest.raises(TrainError, match="NaN or infinite") as e:
        train(cfg, **QUIET)
    ck = tmp_path / "runs" / "run" / "checkpoints"
    for _, p in st.list_checkpoints(ck):  # every checkpoint written holds finite weights
        assert all(torch.isfinite(v).all() for v in _weights(st.read_state(p)["paths"]["model"]).values())
    assert "resume from it" in str(e.value)


def test_resume_with_another_network_says_what_differs(tmp_path, data, capsys):
    train(_cfg(tmp_path, data, **{"train.iters": 4, "model.options.channels": 6}), **QUIET)
    ck = tmp_path / "runs" / "run" / "checkpoints" / "iter_00000004.state.pt"
    with pytest.raises(ConfigError, match=r"another network: checkpoint has channels=6, config has channels=4$"):
        train(_cfg(tmp_path, data, **{"train.iters": 8, "model.options.channels": 4}), resume="auto", **QUIET)
    with pytest.raises(ConfigError, match=r"checkpoint has channels=6, config has no channels \(the default\)"):
        train(_cfg(tmp_path, data, **{"train.iters": 8}), resume=str(ck), **QUIET)
    with pytest.raises(ConfigError, match=r"checkpoint has scale=2, config has scale=3"):
        train(_cfg(tmp_path, data, **{"train.iters": 8, "model.scale": 3, "model.options.channels": 6}),
              resume="auto", **QUIET)
    # the command line: one line naming the difference, exit status 2, the checkpoint untouched
    from distillsr.cli.main import main
    before = ck.read_bytes()
    (tmp_path / "tiny.yaml").write_text("{}\n")
    rc = main(["train", "--config", str(tmp_path / "tiny.yaml"), "--resume", str(ck),
               *tiny_config(tmp_path, data, **{"train.iters": 8, "model.options.channels": 4})])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "checkpoint has channels=6, config has channels=4" in err
    assert ck.read_bytes() == before and [i for i, _ in st.list_checkpoints(ck.parent)] == [4]


def test_resume_continues_the_elapsed_time_and_the_closing_line_counts_every_iteration(tmp_path, data):
    over = {"train.iters": 8, "train.ckpt_every": 2, "train.log_every": 2}

    def stop_at_5(trainer, done):
        if done == 5:
            trainer.request_stop()

    train(_cfg(tmp_path, data, **over), callbacks=[stop_at_5], **QUIET)
    ck = tmp_path / "runs" / "run" / "checkpoints"
    log = tmp_path / "runs" / "run" / "log.csv"
    state = torch.load(ck / "iter_00000005.state.pt", weights_only=True)
    rows = list(csv.DictReader(open(log)))
    assert state["elapsed_s"] >= float(rows[-1]["elapsed_s"])  # the checkpoint records the time so far
    state["elapsed_s"] = 5000.0  # as if the first part had trained for 5000 s
    st.atomic_torch_save(state, ck / "iter_00000005.state.pt")
    msgs = []
    r = train(_cfg(tmp_path, data, **over), resume="auto", log=msgs.append)
    rows = list(csv.DictReader(open(log)))
    assert [int(x["iter"]) for x in rows] == [2, 4, 6, 8]
    assert all(float(x["elapsed_s"]) < 5000 for x in rows[:2]) and all(float(x["elapsed_s"]) >= 5000 for x in rows[2:])
    assert r.start_iter == 5 and r.elapsed_s >= 5000
    done = [m for m in msgs if m.startswith("done:")]
    m = re.match(r"done: 8 iterations in (\d+):(\d\d):(\d\d) \(resumed at iteration 5: 3 iterations, ", done[0])
    assert m and int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) >= 5000, done
    # a checkpoint without the time (older state files): the CSV log's last row still has it
    state = torch.load(ck / "iter_00000008.state.pt", weights_only=True)
    del state["elapsed_s"]
    st.atomic_torch_save(state, ck / "iter_00000008.state.pt")
    r = train(_cfg(tmp_path, data, **{**over, "train.iters": 10}), resume="auto", **QUIET)
    rows = list(csv.DictReader(open(log)))
    assert [int(x["iter"]) for x in rows] == [2, 4, 6, 8, 10] and float(rows[-1]["elapsed_s"]) >= 5000
    assert r.elapsed_s >= 5000


def test_every_file_a_run_writes_gets_the_umask(tmp_path, data):
    old = os.umask(0o027)
    try:
        over = {"train.iters": 4, "train.ckpt_every": 2, "val.dir": str(data / "HR"), "val.every": 2}
        r = train(_cfg(tmp_path, data, **over), **QUIET)
        r = train(_cfg(tmp_path, data, **{**over, "train.iters": 6}), resume="auto", **QUIET)  # log rewritten
    finally:
        os.umask(old)
    modes = {str(p.relative_to(r.run_dir)): oct(p.stat().st_mode & 0o777) for p in r.run_dir.rglob("*")
             if p.is_file()}
    assert {"config.yaml", "log.csv", "best.safetensors", "model.safetensors", "checkpoints/iter_00000006.state.pt",
            "checkpoints/iter_00000006.safetensors", "checkpoints/iter_00000006_ema.safetensors"} <= set(modes)
    assert modes == {name: oct(0o640) for name in modes}


class HalfwayNet(torch.nn.Module):
    """Nearest-neighbour upscaling whose every output value lies exactly halfway between two
    8-bit levels, (k + 0.5) / 255: how it is rounded decides every pixel."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        up = torch.nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")
        return (torch.round(up * 255) + 0.5) / 255


def test_validation_scores_equal_distillsr_eval_on_set5():
    from conftest import shared_path
    from distillsr.data.train_data import load_benchmark
    from distillsr.engine.evaluate import evaluate
    from distillsr.engine.validate import evaluate_pairs
    from distillsr.metrics import to_uint8
    bench = shared_path("data", "benchmark")
    pairs = load_benchmark(bench / "Set5", 2)
    halfway = HalfwayNet(2)
    torch.manual_seed(0)
    for model in (create_model(TINY, 2), halfway):
        p, s, rows = evaluate_pairs(model, pairs, 2, torch.device("cpu"), "matlab")
        ref = evaluate(model, 2, bench, ["Set5"], ssim_variant="matlab", device="cpu", progress=False,
                       log=lambda m: None)["results"][0]
        assert (p, s) == (ref["psnr"], ref["ssim"])  # to the last digit
        assert rows == [(im["name"], im["psnr"], im["ssim"]) for im in ref["images"]]
    # and that one rounding is the protocol's: halfway values go up
    x = torch.rand(1, 3, 5, 5)
    up = torch.round(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")[0] * 255)
    assert np.array_equal(to_uint8(halfway(x)[0]), (up + 1).clamp(max=255).to(torch.uint8).numpy())


def test_one_quantiser_serves_eval_validation_and_written_images():
    from distillsr.engine import validate
    from distillsr.io import from_float
    from distillsr.metrics import quantise, to_uint8
    assert not hasattr(validate, "to_uint8") or validate.to_uint8 is to_uint8
    k = torch.arange(256, dtype=torch.float32)
    ties = (k + 0.5) / 255  # exactly halfway between two levels in float32
    want8 = np.minimum(np.arange(256) + 1, 255).astype(np.uint8)
    for a in (ties, ties.numpy()):  # torch or numpy, the same bytes
        assert np.array_equal(to_uint8(a), want8) and np.array_equal(from_float(a, np.uint8), want8)
    ties16 = (torch.arange(0, 65535, 97, dtype=torch.float64) + 0.5) / 65535
    want16 = (np.arange(0, 65535, 97) + 1).astype(np.uint16)
    for a in (ties16, ties16.numpy()):  # 16-bit output keeps working, with the same rule
        out = from_float(a, np.uint16)
        assert out.dtype == np.uint16 and np.array_equal(out, want16)
        assert np.array_equal(quantise(a, np.uint16), want16)
    assert np.array_equal(to_uint8(np.array([-0.5, 0.0, 1.0, 2.0])), [0, 0, 255, 255])
    t = ties.clone()
    assert np.array_equal(from_float(t, np.uint8, inplace=True), want8)  # may overwrite its input
