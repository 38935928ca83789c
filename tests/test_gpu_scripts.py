"""The GPU commands, run on the CPU: benchmarks/gpu.py and scripts/gpu_train_sprint.py with --smoke
(their cells, tables and the ship rule), and the carry-folder packer."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, shared_path

SMOKE_VARIANTS = ["eager-fp32", "eager-tf32", "eager-bf16", "cl-fp32", "graph-fp32", "compile-bf16",
                  "compile-graphs-bf16"]
CUDA_ONLY = {"eager-tf32", "graph-fp32", "compile-bf16", "compile-graphs-bf16"}
MODELS = ["asid", "asid-d8", "e-rfdn", "fdiwn"]


def _load(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], REPO / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(args, tmp_path, timeout=900):
    # the fused C kernels are a CPU speed-up these GPU commands do not measure: off, so that
    # no subprocess spends its time compiling them
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DISTILLSR_KERNELS": "0"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- benchmarks/gpu.py
def test_gpu_benchmark_smoke_writes_every_cell_and_the_psnr_cost(tmp_path):
    bench = shared_path("data", "benchmark")
    r = _run([str(REPO / "benchmarks/gpu.py"), "--smoke", "--device", "cpu", "--out", "d", "--bench", str(bench)],
             tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "d/results.json").read_text())
    md = (tmp_path / "d/results.md").read_text()
    assert res["finished"] and res["device"] == "cpu" and res["smoke"]
    cells = {(c["model"], c["size"], c["variant"]): c for c in res["cells"]}
    assert set(cells) == {(m, "tiny", v) for m in MODELS for v in SMOKE_VARIANTS}
    for (m, _, v), c in cells.items():
        if v in CUDA_ONLY:
            assert c["status"] == "skipped" and c["reason"], c
            continue
        assert c["status"] == "ok", c
        assert c["fps"] > 0 and c["median_ms"] > 0 and c["gflops"] > 0
        assert c["fps"] == pytest.approx(1000 / c["median_ms"])
        # every ratio is against the eager fp32 cell of the same network, measured in this run
        assert c["ratio"] == pytest.approx(c["fps"] / cells[(m, "tiny", "eager-fp32")]["fps"])
        assert c["peak_memory_bytes"] is None or c["peak_memory_bytes"] > 0
    for m in MODELS:
        assert cells[(m, "tiny", "eager-fp32")]["ratio"] == 1.0
        assert f"| {m} | tiny | eager-fp32 | ok |" in md
        assert f"| {m} | tiny | graph-fp32 | skipped |" in md
    psnr = res["psnr"]
    assert psnr["status"] == "ok" and [row["weights"] for row in psnr["rows"]] == ["asid"]
    row = psnr["rows"][0]
    assert row["images"] == 1 and not row["errors"]
    assert 25 < row["psnr"]["fp32"] < 45
    assert row["cost_db"]["bf16"] == pytest.approx(row["psnr"]["bf16"] - row["psnr"]["fp32"])
    assert abs(row["cost_db"]["bf16"]) < 0.5
    assert "## PSNR cost of bf16 / fp16" in md and f"{row['psnr']['fp32']:.4f}" in md


def test_gpu_benchmark_past_its_deadline_runs_nothing_and_still_writes_the_tables(tmp_path):
    r = _run([str(REPO / "benchmarks/gpu.py"), "--device", "cpu", "--out", "d", "--budget-min", "0",
              "--models", "asid,e-rfdn", "--sizes", "720p", "--variants", "eager-fp32,cl-bf16"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "d/results.json").read_text())
    assert [(c["model"], c["variant"], c["status"]) for c in res["cells"]] == [
        ("asid", "eager-fp32", "not run"), ("asid", "cl-bf16", "not run"),
        ("e-rfdn", "eager-fp32", "not run"), ("e-rfdn", "cl-bf16", "not run")]
    assert res["psnr"] == {"status": "not measured", "reason": "budget"}
    assert "| asid | 720p | not run | not run |" in (tmp_path / "d/results.md").read_text()


def test_gpu_benchmark_refuses_unknown_names_and_a_file_as_out(tmp_path, capsys):
    gpu = _load("benchmarks/gpu.py")
    with pytest.raises(SystemExit, match="--models: unknown nope"):
        gpu.main(["--device", "cpu", "--out", str(tmp_path / "d"), "--models", "asid,nope"])
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu", "--out", str(tmp_path / "f")])
    assert e.value.code == 2 and "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- the sprint
def test_gpu_train_sprint_smoke_trains_scores_and_ships_only_if_better(tmp_path):
    photos, bench = shared_path("data", "train_photos"), shared_path("data", "benchmark")
    r = _run([str(REPO / "scripts/gpu_train_sprint.py"), "--smoke", "--device", "cpu", "--out", "d",
              "--data", str(photos), "--bench", str(bench)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = tmp_path / "d"
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    assert [e["scale"] for e in summary["scales"]] == [2, 3, 4]
    assert summary["sets"] == ["Set5"]
    for e in summary["scales"]:
        s = e["scale"]
        assert e["status"] == "done" and e["iterations"] == 2 and e["completed"]
        assert [row["batch"] for row in e["probe"]["rows"]] == [2, 4] and e["batch"] in (2, 4)
        run = out / "runs" / f"asid_x{s}_sprint"
        assert (run / "config.yaml").is_file() and (run / "best.safetensors").is_file()
        assert "iter" in (run / "log.csv").read_text().splitlines()[0]
        assert list((run / "checkpoints").glob("iter_00000002*.safetensors"))
        # the rule of distillsr ship --only-if-better: the mean PSNR must beat the bundled card's
        card = json.loads((REPO / f"src/distillsr/weights/asid_x{s}.json").read_text())
        assert e["card_mean"] == pytest.approx(card["scores"]["Set5"]["psnr"])
        assert e["shipped"] == (e["new_mean"] > e["card_mean"])
        shipped = out / "weights" / f"asid_x{s}.json"
        assert shipped.is_file() == e["shipped"]
        assert f"| x{s} | {e['batch']} | 2 |" in md
    assert (out / "sprint.log").read_text().count("validation @ 2") == 3
    assert "x4: mean PSNR" in (out / "sprint.log").read_text()


def test_ship_if_better_writes_into_out_only_when_the_mean_psnr_beats_the_card(tmp_path, monkeypatch):
    import distillsr.kernels
    from distillsr.engine.ship import Run
    from distillsr.pretrained import PACKAGE_WEIGHTS_DIR, read_card
    monkeypatch.setattr(distillsr.kernels, "enabled", False)
    sprint = _load("scripts/gpu_train_sprint.py")
    bench = tmp_path / "bench"  # one image of Set5 (HR and LR) is enough to compare scores
    for sub in ("HR/bird.png", "LR_bicubic/X4/birdx4.png"):
        (bench / "Set5" / sub).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_path("data", "benchmark", "Set5", sub), bench / "Set5" / sub)
    weights = PACKAGE_WEIGHTS_DIR / "asid_x4.safetensors"
    card = json.loads((PACKAGE_WEIGHTS_DIR / "asid_x4.json").read_text())
    package_before = (PACKAGE_WEIGHTS_DIR / "asid_x4.json").read_bytes()

    def card_dir(name, set5):
        d = tmp_path / name
        d.mkdir()
        c = json.loads(json.dumps(card))
        c["scores"]["Set5"]["psnr"] = set5
        (d / "asid_x4.json").write_text(json.dumps(c))
        return d

    run = Run(iterations=7, wall_time_h=0.01, command="python3 scripts/gpu_train_sprint.py x")
    high = sprint.ship_if_better(weights, 4, bench, ["Set5"], tmp_path / "out_high", card_dir=card_dir("hi", 99.0),
                                 run=run, device="cpu", log=lambda m: None)
    assert not high.shipped and high.old_mean == 99.0 and 25 < high.new_mean < 40
    assert not (tmp_path / "out_high").exists()
    # the same weights against a card that scores exactly as they do: not better, not shipped
    same = sprint.ship_if_better(weights, 4, bench, ["Set5"], tmp_path / "out_same",
                                 card_dir=card_dir("same", high.psnr["Set5"]), run=run, device="cpu",
                                 log=lambda m: None)
    assert not same.shipped and not (tmp_path / "out_same").exists()
    low = sprint.ship_if_better(weights, 4, bench, ["Set5"], tmp_path / "out_low", card_dir=card_dir("lo", 20.0),
                                run=run, device="cpu", log=lambda m: None)
    assert low.shipped and low.new_mean == pytest.approx(high.new_mean)
    entry = read_card(tmp_path / "out_low" / "asid_x4.json")
    assert entry.installed and entry.psnr["Set5"] == low.psnr["Set5"]
    assert entry.training["iterations"] == card["training"]["iterations"] + 7
    assert entry.training["commands"][-1] == run.command
    assert (PACKAGE_WEIGHTS_DIR / "asid_x4.json").read_bytes() == package_before
    with pytest.raises(sprint.SprintError, match="no card"):
        sprint.ship_if_better(weights, 4, bench, ["Set5"], tmp_path / "o", card_dir=tmp_path / "none")


def test_kept_weights_prefers_the_best_then_the_final_then_the_last_ema(tmp_path):
    sprint = _load("scripts/gpu_train_sprint.py")
    assert sprint.kept_weights(tmp_path) is None
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("iter_00000010.safetensors", "iter_00000020.safetensors", "iter_00000020_ema.safetensors"):
        (ck / name).write_bytes(b"")
    assert sprint.kept_weights(tmp_path) == ck / "iter_00000020_ema.safetensors"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert sprint.kept_weights(tmp_path) == tmp_path / "model.safetensors"
    (tmp_path / "best.safetensors").write_bytes(b"")
    assert sprint.kept_weights(tmp_path) == tmp_path / "best.safetensors"


def test_batch_probe_reports_each_size_and_picks_the_fastest(tmp_path):
    import torch
    sprint = _load("scripts/gpu_train_sprint.py")
    probe = sprint.probe_batch(2, 8, [1, 2], torch.device("cpu"), steps=1, budget_s=60, min_gain=-1.0,
                               log=lambda m: None)
    assert [r["batch"] for r in probe["rows"]] == [1, 2]
    best = max(probe["rows"], key=lambda r: r["samples_per_s"])
    assert probe["batch"] == best["batch"] and probe["samples_per_s"] == best["samples_per_s"]


def test_gpu_train_sprint_refuses_missing_data_and_unknown_scales(tmp_path, capsys):
    sprint = _load("scripts/gpu_train_sprint.py")
    with pytest.raises(SystemExit):
        sprint.main(["--out", str(tmp_path / "d"), "--data", str(tmp_path / "nope"), "--bench", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--data" in err and "no such folder" in err
    with pytest.raises(SystemExit):
        sprint.main(["--out", str(tmp_path / "d"), "--scales", "2,8", "--data", str(tmp_path),
                     "--bench", str(tmp_path)])
    assert "bundled ASID weights exist for 2, 3 and 4" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- carry packer
def test_prepare_gpu_carry_keeps_every_pixel_and_checks_the_size(tmp_path):
    carry = _load("scripts/prepare_gpu_carry.py")
    rng = np.random.default_rng(0)
    photos, bench = tmp_path / "photos", tmp_path / "bench"
    (bench / "Set5" / "HR").mkdir(parents=True)
    photos.mkdir()
    smooth = (np.add.outer(np.arange(48), np.arange(40))[:, :, None] * [1, 2, 3] % 256).astype(np.uint8)
    Image.fromarray(smooth).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(bench / "Set5" / "HR" / "grey.png")
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "carry"
    assert carry.main([str(out), "--photos", str(photos), "--bench", str(bench), "--sets", "Set5",
                       "--workers", "1"]) == 0
    webp = out / "train_photos" / "a.webp"
    with Image.open(webp) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), smooth)
    # greyscale stays as it was (one channel, for the protocol's grey convention)
    assert (out / "benchmark/Set5/HR/grey.png").read_bytes() == (bench / "Set5/HR/grey.png").read_bytes()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.webp", "grey.png"]
    shutil.rmtree(out / "benchmark")
    assert carry.main([str(out), "--photos", str(photos), "--bench", str(bench), "--sets", "Set5",
                       "--workers", "1", "--limit-mib", "0"]) == 1
