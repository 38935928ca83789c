"""``build_report``: measure, draw and write ``index.html`` and ``results.json``."""
from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..io import atomic_write_text
from . import figures
from .measure import (OUTPUT_720P, Cache, ModelSpec, ReportError, code_version, measure_cost, measure_scores,
                      measure_speed, protocols_for, quick_data, resolve_models, variant_cost)

PathLike = Union[str, os.PathLike]
QUICK_OUTPUT = (320, 180)
CROP_SIZE = 48  # HR pixels of an automatic Fig. 5 crop

# Tables 3-4: the paper's variants as options of the registered networks (x2)
ABLATION_OPTIONS = {
    "baseline": ("asid-baseline", {}),
    "id": ("asid", {"sharing": "none", "channel_split": False}),
    "id_as": ("asid", {"sharing": "inter", "channel_split": False}),
    "id_cs": ("asid", {"sharing": "none"}),
    "asid": ("asid", {}),
    "intra": ("asid", {"sharing": "intra"}),
}
DEPTHS = list(range(2, 9))


def load_literature() -> dict:
    """The published numbers (``literature.json``: rows, ablation, sources)."""
    return json.loads((Path(__file__).with_name("literature.json")).read_text(encoding="utf-8"))


def parse_crop(text: str) -> Tuple[str, int, int, int, int]:
    """``image:x,y,w,h`` (HR pixels) -> (image, x, y, w, h)."""
    try:
        name, box = text.rsplit(":", 1)
        x, y, w, h = (int(v) for v in box.split(","))
    except ValueError:
        raise ReportError(f"--crop {text!r}: expected IMAGE:X,Y,W,H (HR pixels, e.g. baby:100,120,48,48)") from None
    if not name or w < 4 or h < 4 or x < 0 or y < 0:
        raise ReportError(f"--crop {text!r}: needs an image name, x, y >= 0 and w, h >= 4")
    return name, x, y, w, h


def parse_query(text: str) -> Tuple[int, int]:
    """``row,col`` (LR pixels of the Fig. 6 image) -> (row, col)."""
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise ReportError(f"--query {text!r}: expected ROW,COL (LR pixels, e.g. 60,40)") from None
    if row < 0 or col < 0:
        raise ReportError(f"--query {text!r}: row and column must be >= 0")
    return row, col


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def build_report(out: PathLike, data_root: PathLike, datasets: Optional[Sequence[str]] = None, *,
                 models: Optional[Sequence[str]] = None, weights: Sequence[PathLike] = (),
                 scales: Sequence[int] = (2, 3, 4), runs: Sequence[PathLike] = (), device: Optional[str] = None,
                 quick: bool = False, crops: Sequence[str] = (), query: Optional[str] = None,
                 progress: Optional[bool] = None,
                 log: Callable[[str], None] = _stderr, command: str = "") -> dict:
    """Write ``out/index.html`` (figures under ``out/figures``) and ``out/results.json``;
    returns the content of ``results.json``. See ``docs/report.md``."""
    from ..data.benchmark import find_sets
    from ..engine.device import select_device
    out = Path(out)
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ReportError(f"--data {data_root}: no such folder")
    scales = sorted({int(s) for s in scales})
    if not scales or min(scales) < 1:
        raise ReportError(f"--scales must be positive integers, got {list(scales)}")
    crop_specs = [parse_crop(c) for c in crops]
    query_pixel = parse_query(query) if query else None
    try:
        device = str(select_device(device or "cpu"))
    except ValueError as e:
        raise ReportError(str(e)) from None
    if datasets is None:
        datasets = find_sets(data_root)
        if not datasets:
            raise ReportError(f"{data_root}: no benchmark sets (folders with an HR folder) found")
    for ds in datasets:
        if not (data_root / ds / "HR").is_dir():
            raise ReportError(f"{data_root / ds / 'HR'}: no such folder (expected <data>/{ds}/HR/*.png)")
    for r in runs:
        if not (Path(r) / "log.csv").is_file():
            raise ReportError(f"--runs {r}: no log.csv in that folder (a `distillsr train` run folder)")
    progress = sys.stderr.isatty() if progress is None else progress
    specs, notes = resolve_models(models, weights, scales, log)
    if not specs:
        raise ReportError("nothing to report: no model has weights here (see the notes above)")
    out.mkdir(parents=True, exist_ok=True)
    figdir = out / "figures"
    figdir.mkdir(exist_ok=True)
    cache = Cache(out / "cache")
    data = quick_data(data_root, datasets, scales, out / "cache" / "quick-data") if quick else data_root
    from ..data.benchmark import BenchmarkSet
    names = {n for ds in datasets for n in BenchmarkSet(data, ds, scales[0]).names}
    for name, *_ in crop_specs:
        if name not in names:
            raise ReportError(f"--crop {name}: no image of that name in {', '.join(datasets)}"
                              + (" (--quick keeps only the two smallest images of each set)" if quick else ""))
    lit = load_literature()

    # ---------------------------------------------------------------- scores and cost
    from tqdm import tqdm
    jobs = [(k, spec, ds, proto, settings) for k, spec in enumerate(specs) for ds in datasets
            for proto, settings in protocols_for(spec).items()]
    results: List[dict] = []
    sr_dirs: Dict[Tuple[int, str, str], Path] = {}  # (spec index, dataset) -> SR images (default protocol)
    costs: Dict[int, Optional[dict]] = {}
    scores_computed = 0
    bar = tqdm(jobs, desc="evaluate", unit="run", file=sys.stderr, disable=not progress)
    for k, spec, ds, proto, settings in bar:
        bar.set_postfix_str(f"{spec.label} x{spec.scale} {ds} {proto}")
        if k not in costs:
            costs[k] = measure_cost(spec, cache)
        misses = cache.misses
        res, images = measure_scores(spec, ds, proto, settings, data, cache, device, out / "cache" / "sr")
        scores_computed += cache.misses - misses
        if images is not None:
            sr_dirs[(k, ds)] = images
        r0 = res["results"][0]
        c = costs[k]
        results.append({"model": res["model"], "weights": res["weights"], "scale": spec.scale, "dataset": ds,
                        "protocol": proto, "psnr": r0["psnr"], "ssim": r0["ssim"],
                        "params": c["params"] if c else 0, "macs": c["macs"] if c else None,
                        "macs_paper": c["macs_paper"] if c else None, "label": spec.label, "arch": spec.arch,
                        "ssim_variant": res["ssim_variant"], "tile": res["tile"], "chop": res["chop"],
                        "num_images": r0["num_images"], "device": res["device"]})

    # ---------------------------------------------------------------- Table 2: speed
    size = QUICK_OUTPUT if quick else OUTPUT_720P
    devices = [device] + (["cuda"] if torch.cuda.is_available() and not device.startswith("cuda") else [])
    speed = []
    nets = [s for s in specs if s.is_network]
    for spec in tqdm(nets, desc="profile", unit="model", file=sys.stderr, disable=not progress):
        for d in devices:
            row = measure_speed(spec, cache, d, size, repeats=1 if quick else 3)
            speed.append({"label": spec.label, "scale": spec.scale, **row})

    # ---------------------------------------------------------------- figures
    figs: Dict[str, object] = {}
    panels = _fig1_panels(results, lit, datasets, scales)
    if panels:
        figs["fig1"] = figures.fig_psnr_params(panels, figdir / "fig1_psnr_params.png").name
    figs["fig5"] = _fig5(specs, datasets, scales, data, sr_dirs, crop_specs, figdir, quick)
    figs["fig6"] = _fig6(specs, datasets, data, figdir, log, query_pixel)
    depth, ablation, fig7 = _fig7_tables(results, lit, datasets, cache, figdir, size)
    figs["fig7"] = fig7
    curves = _curves(runs, figdir)
    figs["curves"] = curves["figure"] if curves else None

    report = {
        "results": results,
        "published": lit["rows"],
        "published_sources": lit["sources"],
        "table2": {"output_size": list(size), "quick": quick, "rows": speed},
        "depth": depth,
        "ablation": ablation,
        "variants_output_size": list(size),
        "notes": notes,
        "figures": figs,
        "settings": {"data": str(data_root), "data_used": str(data), "datasets": list(datasets),
                     "scales": scales, "device": device, "quick": quick, "models": [s.label for s in specs],
                     "code_version": code_version(), "command": command,
                     "machine": machine_description(), "threads": torch.get_num_threads(),
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "work": {"scores_computed": scores_computed, "scores_cached": len(jobs) - scores_computed},
        "runs": curves["runs"] if curves else [],
    }
    from .page import write_page
    atomic_write_text(out / "results.json", json.dumps(report, indent=1, default=_json_default) + "\n")
    write_page(out / "index.html", report, lit)
    _remove_stale_figures(figdir, figs)
    log(f"wrote {out / 'index.html'} and {out / 'results.json'} "
        f"({scores_computed} evaluation(s) run, {len(jobs) - scores_computed} from the cache)")
    return report


def _remove_stale_figures(figdir: Path, figs: dict) -> None:
    """Delete figure files of earlier runs that the new page no longer shows."""
    keep = set()
    for v in figs.values():
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, dict):
                keep.add(item["file"])
            elif item:
                keep.add(item)
    for p in figdir.glob("*.png"):
        if p.name not in keep:
            p.unlink()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def machine_description() -> str:
    """The CPU model name and core count (and the GPU, if any), as a reader would say it."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{name}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


# ----------------------------------------------------------------------------- Fig. 1
def best_row(results: Sequence[dict], label: str, scale: int, dataset: str) -> Optional[dict]:
    """The row a figure shows for a model: its release protocol where it has one, else the default."""
    rows = [r for r in results if r["label"] == label and r["scale"] == scale and r["dataset"] == dataset]
    for proto in ("release", "default"):
        for r in rows:
            if r["protocol"] == proto:
                return r
    return None


def _fig1_panels(results, lit, datasets, scales) -> List[dict]:
    panels = []
    labels = list(dict.fromkeys(r["label"] for r in results))
    for s in scales:
        for ds in datasets:
            measured = []
            for lab in labels:
                r = best_row(results, lab, s, ds)
                if r is not None and math.isfinite(r["psnr"]):
                    measured.append({"label": f"{lab} ({r['protocol']})" if r["protocol"] == "release" else lab,
                                     "params": r["params"], "psnr": r["psnr"],
                                     "macs_g": r["macs"] / 1e9 if r["macs"] else None})
            published = [{"label": p["model"], "params": p["params"], "psnr": p["scores"][ds]["psnr"],
                          "macs_g": p.get("macs_g"), "ours": bool(p.get("arch"))}
                         for p in lit["rows"] if p["scale"] == s and ds in p["scores"] and p.get("params")
                         and (p["source"] == "asid-t1" or p.get("arch"))]
            if measured:
                panels.append({"title": f"{ds} x{s}", "measured": measured, "published": published})
    return panels


# ----------------------------------------------------------------------------- Fig. 5
def _fig5(specs, datasets, scales, data, sr_dirs, crop_specs, figdir, quick) -> List[dict]:
    from ..data.benchmark import BenchmarkSet, read_image
    from ..data.imresize import imresize
    from ..metrics import psnr
    out = []
    for s in scales:
        nets = [(k, sp) for k, sp in enumerate(specs) if sp.scale == s and sp.is_network]
        for ds in datasets:
            if not any((k, ds) in sr_dirs for k, _ in nets) and not any(
                    (k, ds) in sr_dirs for k, sp in enumerate(specs) if sp.scale == s):
                continue
            bset = BenchmarkSet(data, ds, s)
            shown = [(k, sp) for k, sp in nets if (k, ds) in sr_dirs]

            def outputs(item):
                return [read_image(sr_dirs[(k, ds)] / ds / f"X{s}" / f"{item.name}.png") for k, _ in shown]

            chosen = []  # (item, x, y, w, h, how)
            for name, x, y, w, h in crop_specs:
                if name in bset.names:
                    item = bset.load(bset.names.index(name))
                    H, W = item.hr.shape[:2]
                    if x + w > W or y + h > H:
                        raise ReportError(f"--crop {name}:{x},{y},{w},{h}: outside the {W}x{H} HR image "
                                          f"(x{s}, {ds}, after the crop to a multiple of the scale)")
                    chosen.append((item, x, y, w, h, "given with --crop"))
            if not chosen:
                best = None
                for i in range(len(bset)):
                    item = bset.load(i)
                    size = min(CROP_SIZE, item.hr.shape[0] // 2, item.hr.shape[1] // 2) // s * s
                    if size < 8:
                        continue
                    imgs = [imresize(item.lr, s)] + outputs(item)
                    score, x, y = figures.busiest_window(imgs, item.hr, size)
                    if best is None or score > best[0]:
                        best = (score, item, x, y, size)
                if best is None:
                    continue
                _, item, x, y, size = best
                x, y = x // s * s, y // s * s
                how = ("where bicubic and the models differ most" if shown
                       else "where bicubic's error is largest")
                chosen.append((item, x, y, size, size, how))
            for item, x, y, w, h, how in chosen:
                def cut(img):
                    return img[y:y + h, x:x + w]
                hr = cut(item.hr)
                lr = item.lr[y // s:(y + h) // s, x // s:(x + w) // s]
                lr_big = np.repeat(np.repeat(lr, s, 0), s, 1)
                tiles = [{"label": "LR (nearest)", "image": lr_big, "psnr": None}]
                bic = cut(imresize(item.lr, s))
                tiles.append({"label": "bicubic", "image": bic, "psnr": psnr(bic, hr)})
                for (k, sp), img in zip(shown, outputs(item)):
                    c = cut(img)
                    tiles.append({"label": sp.label, "image": c, "psnr": psnr(c, hr)})
                tiles.append({"label": "HR", "image": hr, "psnr": None})
                fname = f"fig5_{ds}_x{s}_{item.name}_{x}_{y}.png"
                title = f"{ds} {item.name} x{s}, HR crop x={x}, y={y}, {w}x{h} ({how}); PSNR on Y of the crop"
                figures.fig_crops(title, tiles, figdir / fname)
                out.append({"file": fname, "dataset": ds, "scale": s, "image": item.name, "box": [x, y, w, h],
                            "how": how, "psnr": {t["label"]: t["psnr"] for t in tiles if t["psnr"] is not None}})
    return out


# ----------------------------------------------------------------------------- Fig. 6
def _fig6(specs, datasets, data, figdir, log, query: Optional[Tuple[int, int]] = None) -> Optional[dict]:
    from ..data.benchmark import BenchmarkSet
    cand = [sp for sp in specs if sp.arch in ("asid", "asid-d8")]
    if cand:
        spec = cand[0]
        module, what = spec.module(), spec.label
    else:
        from ..registry import create_model
        torch.manual_seed(0)
        scale = specs[0].scale
        module, what = create_model("asid", scale), "ASID at random initialisation (no ASID weights in this report)"
        spec = ModelSpec(what, scale, arch="asid")
    bset = BenchmarkSet(data, datasets[0], spec.scale)
    item = bset.load(0)
    h, w = item.lr.shape[:2]
    if query is None:
        query = (h // 2, w // 2)
    elif not (query[0] < h and query[1] < w):
        raise ReportError(f"--query {query[0]},{query[1]}: outside {datasets[0]}/{item.name}, whose LR image "
                          f"is {h} rows x {w} columns")
    maps = figures.attention_maps(module, item.lr, query)
    fname = "fig6_attention.png"
    figures.fig_attention(item.lr, query, maps, f"{what} x{spec.scale}: the six attention maps of block 1 "
                          f"(reused by blocks 2..N) for the query pixel (row {query[0]}, col {query[1]}, cyan +) "
                          f"of {datasets[0]} {item.name} (LR)", figdir / fname)
    return {"file": fname, "model": what, "scale": spec.scale, "image": f"{datasets[0]}/{item.name}",
            "query": list(query), "maps": [{"name": m["name"], "max_weight": float(m["weights"].max()),
                                             "sum": float(m["weights"].sum())} for m in maps]}


# ----------------------------------------------------------------------------- Fig. 7, Tables 3-4
def _fig7_tables(results, lit, datasets, cache, figdir, size):
    """Depth series and ablation variants at x2, counted for an output of ``size`` (the
    papers': 1280x720; ``--quick`` counts at a smaller one)."""
    depth_rows = []
    for n in DEPTHS:
        c = variant_cost("asid", 2, {"blocks": n}, cache, size)
        depth_rows.append({"blocks": n, "params": c["params"], "macs": c["macs"], "macs_paper": c["macs_paper"]})
    paper_size = tuple(size) == OUTPUT_720P
    published_depth = [{"depth": 3, "params": 298000, "macs_g": 63.592 if paper_size else None,
                        "label": "ASID, paper (Table 3)"}]
    abl = []
    measured_x2 = {}
    for r in results:
        if r["scale"] == 2 and r["dataset"] == datasets[0]:
            arch = r["arch"] if r["arch"] in ("asid", "asid-d8") else None
            if arch and (arch not in measured_x2 or r["protocol"] == "release"):
                measured_x2[arch] = r
    for row in lit["ablation"]["rows"]:
        arch, opts = ABLATION_OPTIONS[row["key"]]
        c = variant_cost(arch, 2, opts, cache, size)
        m = measured_x2.get("asid") if row["key"] == "asid" else None
        abl.append({**row, "arch": arch, "options": opts, "our_params": c["params"], "our_macs": c["macs"],
                    "our_macs_paper": c["macs_paper"],
                    "measured_psnr": m["psnr"] if m else None,
                    "measured_on": f"{m['dataset']} x2 ({m['protocol']}; {m['label']})" if m else None})
    psnr_pts = [{"depth": 3 if a == "asid" else 8, "psnr": r["psnr"], "label": f"{r['label']} ({r['dataset']})"}
                for a, r in measured_x2.items()]
    fig = figures.fig_depth(DEPTHS, [d["params"] for d in depth_rows], [d["macs_paper"] / 1e9 for d in depth_rows],
                            published_depth, psnr_pts, figdir / "fig7_depth.png",
                            "ASID paper's convention", size)
    return depth_rows, abl, fig.name


# ----------------------------------------------------------------------------- curves
def read_log(run: Path) -> dict:
    """iteration, loss and validation PSNR of a run's ``log.csv``."""
    it, loss, vit, vpsnr = [], [], [], []
    with open(Path(run) / "log.csv", newline="") as f:
        for row in csv.DictReader(f):
            try:
                i = int(row["iter"])
            except (KeyError, ValueError, TypeError):
                continue
            if row.get("loss"):
                it.append(i)
                loss.append(float(row["loss"]))
            if row.get("val_psnr"):
                vit.append(i)
                vpsnr.append(float(row["val_psnr"]))
    return {"name": Path(run).name, "iter": it, "loss": loss, "val_iter": vit, "val_psnr": vpsnr}


def _curves(runs, figdir) -> Optional[dict]:
    if not runs:
        return None
    data = [read_log(Path(r)) for r in runs]
    fig = figures.fig_learning_curves(data, figdir / "learning_curves.png")
    return {"figure": fig.name, "runs": [{"name": d["name"], "iterations": d["iter"][-1] if d["iter"] else 0,
                                          "last_val_psnr": d["val_psnr"][-1] if d["val_psnr"] else None}
                                         for d in data]}
