"""``index.html``: one self-contained page (inline CSS, no scripts, no external URLs;
figures are PNG files beside it, linked relatively)."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..io import atomic_write_text

PathLike = Union[str, os.PathLike]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto; max-width: 1200px;
       padding: 0 1em; color: #1c2833; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccd; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #d5d8dc; padding: 0.25em 0.55em; text-align: right; }
th { background: #eef2f5; } td.l, th.l { text-align: left; }
tr.published td { color: #566573; background: #fafafa; }
tr.measured td.l:first-child { font-weight: 600; }
.pos { color: #1e8449; } .neg { color: #b03a2e; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.4em 0; }
.note { background: #fef9e7; border-left: 4px solid #f4d03f; padding: 0.4em 0.8em; }
code { background: #f4f6f7; padding: 0 0.2em; }
figcaption { font-size: 0.9em; color: #34495e; max-width: 1100px; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(v, fmt: str) -> str:
    return "&ndash;" if v is None else format(v, fmt)


def _k(params) -> str:
    return "&ndash;" if not params else f"{params / 1e3:,.0f}K"


def _g(macs) -> str:
    return "&ndash;" if macs is None else f"{macs / 1e9:.2f}G"


def _diff(a: Optional[float], b: Optional[float], fmt: str) -> str:
    if a is None or b is None:
        return "&ndash;"
    d = a - b
    cls = "pos" if d >= 0 else "neg"
    return f'<span class="{cls}">{d:+{fmt}}</span>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1,
           classes: Optional[Sequence[str]] = None) -> str:
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for n, r in enumerate(rows):
        cls = f' class="{classes[n]}"' if classes else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                          for i, c in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _figure(src: str, caption: str, alt: str) -> str:
    return (f'<figure><a href="figures/{_e(src)}"><img src="figures/{_e(src)}" alt="{_e(alt)}"></a>'
            f"<figcaption>{caption}</figcaption></figure>")


def _published_for(lit: dict, arch: str, scale: int) -> Optional[dict]:
    for p in lit["rows"]:
        if p.get("arch") == arch and p["scale"] == scale:
            return p
    return None


def table1(report: dict, lit: dict) -> str:
    results = report["results"]
    parts = []
    for s in report["settings"]["scales"]:
        for ds in report["settings"]["datasets"]:
            rows, classes = [], []
            labels = list(dict.fromkeys(r["label"] for r in results if r["scale"] == s and r["dataset"] == ds))
            if not labels:
                continue
            for lab in labels:
                got = {r["protocol"]: r for r in results if r["label"] == lab and r["scale"] == s
                       and r["dataset"] == ds}
                any_r = next(iter(got.values()))
                rel, dft = got.get("release"), got.get("default")
                pub = _published_for(lit, any_r["arch"], s) if any_r["arch"] != "bicubic" else None
                ps = (pub or {}).get("scores", {}).get(ds, {})
                best = rel or dft
                rows.append([
                    _e(lab),
                    f"{rel['psnr']:.2f} / {rel['ssim']:.4f}" if rel else "&ndash;",
                    f"{dft['psnr']:.2f} / {dft['ssim']:.4f}" if dft else "&ndash;",
                    _k(any_r["params"]), _g(any_r["macs"]),
                    (f"{ps['psnr']:.2f}" + (f" / {ps['ssim']:.4f}" if "ssim" in ps else "")) if ps else "&ndash;",
                    _diff(best["psnr"], ps.get("psnr"), ".2f") + " / " + _diff(best["ssim"], ps.get("ssim"), ".4f")
                    if ps else "&ndash;",
                    "measured"])
                classes.append("measured")
            for p in lit["rows"]:
                if p["scale"] != s or ds not in p["scores"]:
                    continue
                sc = p["scores"][ds]
                rows.append([_e(p["model"]), "", "", _k(p.get("params")),
                             "&ndash;" if p.get("macs_g") is None else f"{p['macs_g']}G",
                             f"{sc['psnr']:.2f}" + (f" / {sc['ssim']:.4f}" if "ssim" in sc else ""), "",
                             f"published [{_e(p['source'])}]"])
                classes.append("published")
            parts.append(f"<h3>{_e(ds)} x{s}</h3>")
            parts.append(_table(["model", "measured, release protocol<br>PSNR / SSIM",
                                 "measured, default protocol<br>PSNR / SSIM", "params", "MACs (720p)",
                                 "published<br>PSNR / SSIM", "measured &minus; published<br>(release protocol)",
                                 "source"], rows, classes=classes))
    return "".join(parts)


def write_page(path: PathLike, report: dict, lit: dict) -> Path:
    st = report["settings"]
    figs = report["figures"]
    quick = st["quick"]
    b: List[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    "<title>distillsr report</title>", f"<style>{CSS}</style></head><body>"]
    b.append("<h1>distillsr report: lightweight SR, measured beside the papers</h1>")
    b.append(f"<p>Made {_e(st['date'])} on {_e(st['machine'])} ({st['threads']} torch threads), device "
             f"<code>{_e(st['device'])}</code>, distillsr {_e(st['code_version'])}.<br>"
             f"Data: <code>{_e(st['data'])}</code>, sets {_e(', '.join(st['datasets']))}, scales "
             f"{_e(', '.join('x' + str(s) for s in st['scales']))}. Models: {_e(', '.join(st['models']))}.</p>")
    if st.get("command"):
        b.append(f"<p>Command: <code>{_e(st['command'])}</code></p>")
    if quick:
        b.append('<p class="note"><b>Quick mode</b>: only the two smallest images of each set were scored (the '
                 "numbers are not the sets' means and not comparable with the papers), and Table 2 was timed "
                 f"at a {report['table2']['output_size'][0]}x{report['table2']['output_size'][1]} output, "
                 "not 1280x720.</p>")
    if report["notes"]:
        b.append('<div class="note"><b>Left out:</b><ul>' + "".join(f"<li>{_e(n)}</li>" for n in report["notes"])
                 + "</ul></div>")
    b.append('<p>Protocol: PSNR and SSIM on Y, border = scale, SR output quantised to 8 bits, as '
             "<code>distillsr eval</code>. <i>Release protocol</i> = <code>eval --protocol release</code> "
             "(ASID: tiles 64 / overlap 24 and MATLAB SSIM; FDIWN: chop; RFDN: whole image); <i>default</i> = "
             "whole image, Wang SSIM. Measured rows use weights on this machine; rows marked "
             "<i>published</i> are the papers' printed numbers (sources at the end), never measured here. "
             "MACs: multiply-accumulates of convolutions and linear layers for a 1280x720 output.</p>")

    b.append("<h2>Fig. 1: PSNR against parameters</h2>")
    if figs.get("fig1"):
        b.append(_figure(figs["fig1"], "Measured points (red circles; the release protocol where the model has "
                         "one) and published points (squares; blue: ASID, FDIWN, RFDN; grey: peers), one panel per "
                         "set and scale. Marker area is proportional to MACs at a 1280x720 output; hollow squares: "
                         "the paper prints no MACs. Bicubic has no parameters.", "Fig. 1"))

    b.append("<h2>Table 1: PSNR / SSIM, parameters and MACs</h2>")
    b.append(table1(report, lit))

    b.append("<h2>Fig. 5: visual comparison</h2>")
    if figs.get("fig5"):
        for f in figs["fig5"]:
            b.append(_figure(f["file"], f"{_e(f['dataset'])} <b>{_e(f['image'])}</b> x{f['scale']}, HR box "
                             f"x={f['box'][0]}, y={f['box'][1]}, {f['box'][2]}x{f['box'][3]} ({_e(f['how'])}). "
                             "LR (enlarged by pixel repetition), bicubic, each model, HR; PSNR on Y of the crop "
                             "under each.", f"Fig. 5 {f['dataset']} {f['image']}"))
    else:
        b.append("<p>No crops (no SR outputs were made).</p>")

    b.append("<h2>Fig. 6: the shared attention maps</h2>")
    f6 = figs.get("fig6")
    if f6:
        b.append(_figure(f6["file"], f"{_e(f6['model'])} x{f6['scale']} on {_e(f6['image'])} (LR), query pixel "
                         f"row {f6['query'][0]}, column {f6['query'][1]}. Block 1's three SAMs each compute a meso "
                         "matrix (8x8 windows; top row, a 24x24 neighbourhood) and a global matrix (a sparse grid "
                         "spanning the image; bottom row, circle area and colour = weight); blocks 2..N reuse all "
                         "six. Each map's 64 weights sum to 1.", "Fig. 6"))

    b.append("<h2>Fig. 7 and Tables 3-4: depth and ablations (x2)</h2>")
    vsize = "x".join(str(v) for v in report["variants_output_size"])
    if quick:
        b.append(f'<p class="note">Quick mode: the MACs below are counted for a {vsize} output, not the papers\' '
                 "1280x720, so they are not comparable with the papers' FLOPs (parameters are).</p>")
    if figs.get("fig7"):
        b.append(_figure(figs["fig7"], "Parameters and MACs (the ASID paper's convention: with bias additions and "
                         f"LayerNorm) of ASID with N = 2..8 IDBs at x2 for a {vsize} output, counted here; "
                         "the paper's printed point for N = 3 (Table 3); measured PSNR only where weights exist. "
                         "The paper's Fig. 7 prints no values.", "Fig. 7"))
    rows = []
    for d in report["depth"]:
        rows.append([str(d["blocks"]), f"{d['params']:,}", _g(d["macs"]), _g(d["macs_paper"])])
    b.append(_table(["IDBs N", "params", f"MACs conv+linear ({vsize})", f"MACs, paper's convention ({vsize})"],
                    rows))
    rows = []
    for a in report["ablation"]:
        opts = ", ".join(f"{k}={v}" for k, v in a["options"].items()) or "defaults"
        rows.append([_e(a["variant"]), f"<code>{_e(a['arch'])}</code> {_e(opts)}", f"{a['our_params']:,}",
                     f"{a['params'] / 1e3:.0f}K", _g(a["our_macs_paper"]), f"{a['macs_g']}G (1280x720)",
                     f"{a['urban100_x2_psnr']:.2f}",
                     "&ndash;" if a["measured_psnr"] is None else f"{a['measured_psnr']:.2f} ({_e(a['measured_on'])})"])
    b.append(_table(["variant (Tables 3-4)", "how it is built here", "params, counted", "params, paper",
                     f"MACs, counted (paper's convention, {vsize})", "FLOPs, paper", "Urban100 PSNR, paper",
                     "PSNR, measured"], rows, left=2))

    b.append("<h2>Table 2: cost and speed on this machine</h2>")
    t2 = report["table2"]
    size = f"{t2['output_size'][0]}x{t2['output_size'][1]}"
    b.append(f"<p>Batch 1, fp32, output {size}{' (quick mode; the papers use 1280x720)' if quick else ''}: "
             "median latency after a warm-up, peak memory (process peak RSS on the CPU, which includes torch "
             "itself; <code>max_memory_allocated</code> on CUDA), and the machine's fp32 matrix-multiply "
             "rate (sgemm) measured in the same run, as the yardstick.</p>")
    rows = []
    for r in t2["rows"]:
        rows.append([_e(r["label"]), f"x{r['scale']}", _e(r["device"]), f"{r['params']:,}", _g(r["macs"]),
                     f"{r['latency_s'] * 1e3:.1f}",
                     "&ndash;" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}",
                     f"{r['achieved_gflops_per_s']:.1f}", f"{r['sgemm_gflops_per_s']:.1f}"])
    b.append(_table(["model", "scale", "device", "params", f"MACs ({size})", "latency (ms)", "peak memory (MiB)",
                     "achieved GFLOP/s", "sgemm GFLOP/s"], rows, left=1))

    b.append("<h2>Learning curves</h2>")
    if figs.get("curves"):
        b.append(_figure(figs["curves"], "Training loss and validation PSNR against iteration, from each run "
                         "folder's log.csv.", "learning curves"))
    else:
        b.append("<p>No training runs given (<code>--runs RUN_DIR ...</code>).</p>")

    b.append("<h2>Sources of the published numbers</h2><ul>")
    for key, src in report["published_sources"].items():
        where = src["where"][:1].upper() + src["where"][1:]
        b.append(f"<li><b>[{_e(key)}]</b> {_e(src['cite'])} {_e(where)}.</li>")
    b.append("</ul><p>Every number in <code>results.json</code>; the literature table is "
             "<code>distillsr/report/literature.json</code>.</p></body></html>")
    return atomic_write_text(path, "\n".join(b) + "\n")
