"""`distillsr report`: a --quick report on two Set5 images with bundled and random weights.
The page parses and every image it shows exists and decodes; results.json equals
`distillsr eval --json` to the last digit; a rerun with one more model evaluates only it;
the page loads in headless Chromium without errors (screenshot kept); bad input fails clearly."""
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, shared_path
from distillsr import create_model, save_model
from distillsr.cli.main import main
from distillsr.engine import evaluate as ev
from distillsr.report import ReportError, build_report, parse_crop
from distillsr.report.figures import attention_maps, busiest_window

ARGS = dict(datasets=["Set5"], scales=[4], quick=True, progress=False)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self.tags = [], [], [], []
        self._h = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a.get("src"))
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if tag in ("h1", "h2", "h3"):
            self._h = ""

    def handle_data(self, data):
        if self._h is not None:
            self._h += data

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._h is not None:
            self.headings.append(self._h)
            self._h = None


class _Counting:
    """Counts calls of engine.evaluate.evaluate (what the report runs for each score)."""

    def __init__(self, mp):
        self.calls = []
        real = ev.evaluate

        def counted(model, scale, *a, **k):
            self.calls.append((getattr(model, "name", model), scale, k.get("ssim_variant"), k.get("tile")))
            return real(model, scale, *a, **k)
        mp.setattr(ev, "evaluate", counted)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One quick report (bicubic, the bundled ASID x4, a random-weight E-RFDN file, a
    training run's log), built once for the module."""
    data = shared_path("data", "benchmark")
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILLSR_CACHE", str(tmp / "weights-cache"))
        mp.setenv("DISTILLSR_WEIGHTS_MIRROR", "http://127.0.0.1:9")
        torch.manual_seed(0)
        random_file = save_model(create_model("e-rfdn", 4), tmp / "random_erfdn_x4.safetensors")
        run = tmp / "run"
        run.mkdir()
        shutil.copyfile(REPO / "docs" / "training_logs" / "asid_x4_2026-12-02c.csv", run / "log.csv")
        counter = _Counting(mp)
        out = tmp / "r"
        result = build_report(out, data, models=["bicubic", "asid"], weights=[random_file], runs=[run], **ARGS)
        yield {"out": out, "data": data, "result": result, "calls": list(counter.calls),
               "random": random_file, "tmp": tmp, "run": run}


def test_page_parses_and_every_image_decodes(report):
    out = report["out"]
    page = _Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    heads = " | ".join(page.headings)
    for want in ("Fig. 1", "Table 1", "Fig. 5", "Fig. 6", "Fig. 7", "Table 2", "Learning curves"):
        assert want in heads, (want, heads)
    assert "script" not in page.tags
    assert page.images, "no figures on the page"
    for src in page.images + page.links:
        assert "://" not in src and not src.startswith("//"), f"external reference {src}"
    for src in page.images:
        path = out / src
        assert path.is_file(), src
        with Image.open(path) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    files = report["result"]["figures"]
    assert files["fig1"] and files["fig6"] and files["fig7"] and files["curves"] and files["fig5"]
    shown = {Path(s).name for s in page.images}
    assert {files["fig1"], files["fig6"]["file"], files["fig7"], files["curves"]} <= shown
    assert {f["file"] for f in files["fig5"]} <= shown
    # Fig. 5 names bicubic, each model and HR; crops lie inside the image
    f5 = files["fig5"][0]
    assert set(f5["psnr"]) == {"bicubic", "asid", "e-rfdn (random_erfdn_x4.safetensors)"}
    assert "Quick mode" in (out / "index.html").read_text()


def test_results_rows_and_published_rows(report):
    rows = report["result"]["results"]
    got = {(r["label"], r["protocol"]) for r in rows}
    assert got == {("bicubic", "default"), ("asid", "default"), ("asid", "release"),
                   ("e-rfdn (random_erfdn_x4.safetensors)", "default"),
                   ("e-rfdn (random_erfdn_x4.safetensors)", "release")}
    for r in rows:
        assert set(r) >= {"model", "weights", "scale", "dataset", "protocol", "psnr", "ssim", "params", "macs"}
        assert r["num_images"] == 2 and r["dataset"] == "Set5" and r["scale"] == 4
    asid = next(r for r in rows if r["label"] == "asid" and r["protocol"] == "release")
    assert asid["params"] == 313104 and asid["tile"] == 64 and asid["ssim_variant"] == "matlab"
    assert asid["macs"] == 16996316280  # ASID x4, 1280x720 output (engine.profile)
    pub = report["result"]["published"]
    asid_pub = next(p for p in pub if p["model"] == "ASID" and p["scale"] == 4)
    assert asid_pub["scores"]["Set5"] == {"psnr": 32.39, "ssim": 0.8964}
    assert {"IMDN", "LatticeNet", "SwinIR-light", "Omni-SR", "FDIWN", "FDIWN-M", "RFDN", "E-RFDN"} <= {
        p["model"] for p in pub}
    html = (report["out"] / "index.html").read_text()
    assert "published [asid-t1]" in html
    # Table 2 rows for both networks with the sgemm rate of the same run
    t2 = report["result"]["table2"]
    assert t2["output_size"] == [320, 180] and len(t2["rows"]) == 2
    assert all(r["latency_s"] > 0 and r["sgemm_gflops_per_s"] > 0 for r in t2["rows"])
    # ablation variants: the release's exact parameter counts (asid.md)
    abl = {a["key"]: a["our_params"] for a in report["result"]["ablation"]}
    assert abl == {"baseline": 288264, "id": 400764, "id_as": 364656, "id_cs": 316344, "asid": 297516,
                   "intra": 305004}
    assert [d["params"] for d in report["result"]["depth"]][1] == 297516  # N = 3


@pytest.mark.parametrize("which", ["asid", "asid-release", "random-release", "bicubic"])
def test_results_equal_eval_json(report, which, tmp_path):
    """The same numbers as `distillsr eval --json` on the same images, to the last digit."""
    data = report["result"]["settings"]["data_used"]
    args = ["eval", "--data", data, "--datasets", "Set5", "--json", str(tmp_path / "e.json")]
    if which.startswith("asid"):
        args += ["--model", "asid", "--scale", "4"]
        label = "asid"
    elif which.startswith("random"):
        args += ["--weights", str(report["random"])]
        label = "e-rfdn (random_erfdn_x4.safetensors)"
    else:
        args += ["--model", "bicubic", "--scale", "4"]
        label = "bicubic"
    protocol = "default"
    if which.endswith("release"):
        args += ["--protocol", "release"]
        protocol = "release"
    assert main(args) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    row = next(r for r in report["result"]["results"] if r["label"] == label and r["protocol"] == protocol)
    assert (row["psnr"], row["ssim"]) == (e["results"][0]["psnr"], e["results"][0]["ssim"])
    assert (row["model"], row["weights"]) == (e["model"], e["weights"])
    on_disk = json.loads((report["out"] / "results.json").read_text())["results"]
    assert row in on_disk


def test_page_in_headless_chromium(report):
    from browser_helpers import artefact_dir, browser_page
    index = report["out"] / "index.html"
    with browser_page(viewport=(1280, 1000)) as (page, errors):
        page.goto(index.resolve().as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
        assert widths and all(w > 0 for w in widths), widths
        page.screenshot(path=os.path.join(artefact_dir(), "report_index.png"), full_page=True)
    assert errors == []


def test_rerun_with_one_more_model_evaluates_only_it(report, monkeypatch):
    # E-RFDN's release protocol is eval's default one: one evaluation serves both rows
    assert len(report["calls"]) == 4 and report["result"]["work"]["scores_computed"] == 4
    counter = _Counting(monkeypatch)
    torch.manual_seed(1)
    extra = save_model(create_model("e-rfdn", 4), report["tmp"] / "another_x4.safetensors")
    again = build_report(report["out"], report["data"], models=["bicubic", "asid"],
                         weights=[report["random"], extra], runs=[report["run"]], **ARGS)
    assert len(counter.calls) == 1 and counter.calls[0][0] == "e-rfdn"  # the new file only
    assert again["work"] == {"scores_computed": 1, "scores_cached": 6}
    before = {(r["label"], r["protocol"]): r["psnr"] for r in report["result"]["results"]}
    after = {(r["label"], r["protocol"]): r["psnr"] for r in again["results"]}
    assert all(after[k] == v for k, v in before.items())
    page = _Page()
    page.feed((report["out"] / "index.html").read_text(encoding="utf-8"))
    assert {p.name for p in (report["out"] / "figures").glob("*.png")} == {Path(s).name for s in page.images}


def test_attention_maps_are_block_one_rows():
    torch.manual_seed(0)
    net = create_model("asid", 4, blocks=2).eval()
    lr = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        before = net(x)
        maps = attention_maps(net, lr, (13, 21))
        after = net(x)
    assert torch.equal(before, after)
    assert [m["name"] for m in maps] == ["SAM1 meso", "SAM1 global", "SAM2 meso", "SAM2 global",
                                         "SAM3 meso", "SAM3 global"]
    for m in maps:
        assert m["weights"].shape == (64,) and abs(float(m["weights"].sum()) - 1) < 1e-5
    meso, glob = maps[0]["keys"], maps[1]["keys"]
    assert meso[:, 0].min() == 8 and meso[:, 0].max() == 15 and meso[:, 1].min() == 16  # window of (13, 21)
    # padded 24 x 32: grid steps h = 3, w = 4; the query is one of its group's members
    assert sorted(set(glob[:, 0])) == list(range(13 % 3, 24, 3)) and sorted(set(glob[:, 1])) == list(range(1, 32, 4))
    assert any((k == (13, 21)).all() for k in glob)


def test_busiest_window_finds_the_difference():
    a = np.zeros((40, 40, 3), np.uint8)
    b = a.copy()
    b[30:36, 5:11] = 200
    score, x, y = busiest_window([a, b], a, 8)
    assert score > 0 and 28 <= y <= 30 and 3 <= x <= 5


def test_bad_input_fails_clearly(tmp_path, capsys):
    with pytest.raises(ReportError, match="IMAGE:X,Y,W,H"):
        parse_crop("baby-10-10")
    data = str(shared_path("data", "benchmark"))
    assert main(["report", "-o", str(tmp_path / "a"), "--data", str(tmp_path / "nope"), "--models", "bicubic"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["report", "-o", str(tmp_path / "b"), "--data", data, "--datasets", "Set5", "--models",
                 "no-such-net", "--scales", "4", "--quick"]) == 1
    assert "unknown model 'no-such-net'" in capsys.readouterr().err
    assert main(["report", "-o", str(tmp_path / "c"), "--data", data, "--datasets", "Set5", "--models",
                 "asid-release", "--scales", "4", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "weights pull asid-release --scale 4" in err and "nothing to report" in err
    assert not (tmp_path / "c").exists()
    assert main(["report", "-o", str(tmp_path / "d"), "--data", data, "--datasets", "Set5", "--models",
                 "bicubic", "--scales", "4", "--quick", "--crop", "baby:0,0,48,48"]) == 1
    assert "--crop baby: no image of that name in Set5 (--quick keeps" in capsys.readouterr().err
    assert not (tmp_path / "d" / "index.html").exists()


def test_fig6_query_pixel_is_the_one_asked_for(tmp_path):
    from distillsr.report.build import _fig6, parse_query
    from distillsr.report.measure import ModelSpec
    data = shared_path("data", "benchmark")
    specs = [ModelSpec("bicubic", 4)]
    got = _fig6(specs, ["Set5"], data, tmp_path, print, parse_query("5,7"))
    assert got["query"] == [5, 7]
    with Image.open(tmp_path / got["file"]) as im:
        im.load()
    default = _fig6(specs, ["Set5"], data, tmp_path, print)
    assert default["query"] != [5, 7]
    with pytest.raises(ReportError, match="outside"):
        _fig6(specs, ["Set5"], data, tmp_path, print, (10_000, 3))
    for bad in ["5", "a,b", "-1,3"]:
        with pytest.raises(ReportError, match="--query"):
            parse_query(bad)


def test_a_long_label_is_wrapped_to_stay_inside_the_axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from distillsr.report.figures import place_labels
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlim(0, 1000)
    ax.set_ylim(26, 34)
    ax.scatter([430], [26.2])
    text = "e-rfdn (random_erfdn_x4.safetensors) (release): 9.29 dB (below)"
    (label,) = place_labels(ax, [430], [26.2], [text])
    renderer = fig.canvas.get_renderer()
    box, axbox = label.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert "\n" in label.get_text() and label.get_text().replace("\n", " ") == text
    assert axbox.x0 <= box.x0 and box.x1 <= axbox.x1 and axbox.y0 <= box.y0 and box.y1 <= axbox.y1
    plt.close(fig)
