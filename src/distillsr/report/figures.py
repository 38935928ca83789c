"""The report's figures (matplotlib, Agg backend, PNG), and the data behind Fig. 5 and 6.

Each ``fig_*`` function takes plain data (dicts and arrays) and writes one PNG atomically;
labels beside points are placed so that they do not overlap (:func:`place_labels`).
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

MEASURED_COLOUR = "#c0392b"
PUBLISHED_COLOUR = "#7f8c8d"
OURS_PUBLISHED_COLOUR = "#2471a3"
DPI = 110
FLOOR_DB = 6.0  # Fig. 1 shows measured points down to this far below the lowest published one


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8})
    return plt


def save(fig, path: PathLike) -> Path:
    """Write ``fig`` as PNG (or SVG by the suffix) atomically and close it."""
    from ..io import atomic_write
    plt = _plt()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- labels
def place_labels(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], *,
                 fontsize: float = 7.5, colours: Optional[Sequence[str]] = None,
                 sizes: Optional[Sequence[float]] = None) -> list:
    """Annotate points with ``texts`` so that no two labels overlap: for each point (top
    first) try positions on rings of growing radius around it (with a leader line beyond
    the first ring) and keep the first whose box overlaps no label placed before, no marker
    (``sizes``: marker areas in points^2) and stays inside the axes; if none is free, the
    least overlapping one."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    centres = ax.transData.transform(np.column_stack([xs, ys])) if len(xs) else np.zeros((0, 2))
    # half the marker side, with a margin for the edge line and the square markers' corners
    radii = [0.75 * np.sqrt(s) * px if s else 4 * px for s in (sizes or [20] * len(xs))]
    from matplotlib.transforms import Bbox
    markers = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for (cx, cy), r in zip(centres, radii)]
    candidates = []
    for ring in (6, 16, 28, 42, 58, 76, 96, 120):
        for ang in range(0, 360, 20):
            a = np.deg2rad(ang)
            dx, dy = ring * np.cos(a), ring * np.sin(a)
            ha = "left" if dx > 1 else "right" if dx < -1 else "center"
            va = "bottom" if dy > 1 else "top" if dy < -1 else "center"
            candidates.append((dx, dy, ha, va, ring))
    placed: List = []
    out = []
    order = sorted(range(len(texts)), key=lambda i: -ys[i])
    for i in order:
        text = texts[i]
        if len(text) > 32:  # long labels (file names, values below the axis) go on several lines
            text = textwrap.fill(text, 28, break_long_words=False, break_on_hyphens=False)
        best = _best_spot(ax, renderer, axbox, xs[i], ys[i], text, i, candidates, placed, markers, sizes,
                          fontsize, colours, px)
        if best[0] >= 1e7 and len(text) > 20:  # fits nowhere inside the axes: try narrower lines
            wrapped = textwrap.fill(text.replace("\n", " "), 20, break_long_words=False, break_on_hyphens=False)
            second = _best_spot(ax, renderer, axbox, xs[i], ys[i], wrapped, i, candidates, placed, markers, sizes,
                                fontsize, colours, px)
            if second[0] < best[0]:
                best, text = second, wrapped
        dx, dy, ha, va, ring = best[1]
        arrow = dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=1, shrinkB=2) if ring > 6 else None
        t = ax.annotate(text, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                        fontsize=fontsize, color=(colours[i] if colours else "black"), arrowprops=arrow, zorder=5)
        placed.append(best[2])
        out.append(t)
    return out


def _best_spot(ax, renderer, axbox, x, y, text, i, candidates, placed, markers, sizes, fontsize, colours, px):
    """(score, (dx, dy, ha, va, ring), box) of the first free candidate position for one label,
    or of the least overlapping one; a score >= 1e7 means it leaves the axes."""
    best = None
    own = np.sqrt(sizes[i]) / 2 if sizes and sizes[i] else 3
    for dx, dy, ha, va, ring in candidates:
        r = ring + own
        scale = r / max(np.hypot(dx, dy), 1e-9)
        # measured without a leader line (an Annotation's extent would include it)
        t = ax.annotate(text, (x, y), xytext=(dx * scale, dy * scale), textcoords="offset points",
                        ha=ha, va=va, fontsize=fontsize, color=(colours[i] if colours else "black"), zorder=5)
        bb = t.get_window_extent(renderer).expanded(1.06, 1.15)
        # other markers count with a margin, so that a label never sits closer to another point
        overlap = sum(_area(bb, p) for p in placed) + 0.3 * sum(
            _area(bb, m.padded(7 * px)) for k, m in enumerate(markers) if k != i)
        outside = (bb.x0 < axbox.x0) + (bb.x1 > axbox.x1) + (bb.y0 < axbox.y0) + (bb.y1 > axbox.y1)
        score = overlap + outside * 1e7 + ring * 0.01
        t.remove()
        if best is None or score < best[0]:
            best = (score, (dx * scale, dy * scale, ha, va, ring), bb)
        if overlap == 0 and not outside:
            break
    return best


def _area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _grid(n: int, ncols: int = 3) -> Tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return -(-n // ncols), ncols


# ----------------------------------------------------------------------------- Fig. 1
def macs_area(macs_g: float) -> float:
    """Marker area (points^2) for MACs in G: proportional, 4 pt^2 per G."""
    return 4.0 * macs_g


def fig_psnr_params(panels: Sequence[dict], path: PathLike) -> Path:
    """Fig. 1: PSNR against parameters, one panel per set and scale.

    ``panels``: ``{"title", "measured": [{"label", "params", "psnr", "macs_g"}],
    "published": [{"label", "params", "psnr", "macs_g" (or None), "ours": bool}]}``.
    """
    plt = _plt()
    rows, cols = _grid(len(panels), 2)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols + 2.4, 5.2 * rows), squeeze=False, layout="constrained")
    to_label = []
    for ax, panel in zip(axes.flat, panels):
        xs, ys, labels, colours, sizes = [], [], [], [], []
        for p in panel["published"]:
            known = p.get("macs_g") is not None
            colour = OURS_PUBLISHED_COLOUR if p.get("ours") else PUBLISHED_COLOUR
            ax.scatter([p["params"] / 1e3], [p["psnr"]], s=macs_area(p["macs_g"]) if known else 30,
                       marker="s", facecolors=colour if known else "none", edgecolors=colour, alpha=0.55 if known else 1,
                       linewidths=1.2, zorder=2)
            xs.append(p["params"] / 1e3); ys.append(p["psnr"]); labels.append(p["label"]); colours.append(colour)
            sizes.append(macs_area(p["macs_g"]) if known else 30)
        # far below the published points (e.g. random weights): drawn on the bottom edge with the value
        floor = min(p["psnr"] for p in panel["published"]) - FLOOR_DB if panel["published"] else -np.inf
        for m in panel["measured"]:
            low = m["psnr"] < floor
            y = floor if low else m["psnr"]
            ax.scatter([m["params"] / 1e3], [y], s=macs_area(m["macs_g"]) if m.get("macs_g") else 30,
                       marker="v" if low else "o", facecolors=MEASURED_COLOUR, edgecolors="black", alpha=0.8,
                       linewidths=0.8, zorder=3)
            xs.append(m["params"] / 1e3); ys.append(y); colours.append(MEASURED_COLOUR)
            labels.append(f"{m['label']}: {m['psnr']:.2f} dB (below)" if low else m["label"])
            sizes.append(macs_area(m["macs_g"]) if m.get("macs_g") else 30)
        ax.set_title(panel["title"])
        ax.set_xlabel("parameters (thousands)")
        ax.set_ylabel("PSNR on Y (dB)")
        ax.grid(True, alpha=0.3)
        if xs:
            xr = max(xs) - min(xs) or 100.0
            yr = max(ys) - min(ys) or 1.0
            ax.set_xlim(min(xs) - 0.12 * xr, max(xs) + 0.22 * xr)
            ax.set_ylim(min(ys) - 0.15 * yr, max(ys) + 0.3 * yr)
            to_label.append((ax, xs, ys, labels, colours, sizes))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [
        plt.scatter([], [], s=40, marker="o", facecolors=MEASURED_COLOUR, edgecolors="black", label="measured here"),
        plt.scatter([], [], s=40, marker="s", facecolors=OURS_PUBLISHED_COLOUR, edgecolors=OURS_PUBLISHED_COLOUR,
                    alpha=0.55, label="published: ASID / FDIWN /\nRFDN papers"),
        plt.scatter([], [], s=40, marker="s", facecolors=PUBLISHED_COLOUR, edgecolors=PUBLISHED_COLOUR, alpha=0.55,
                    label="published: peers\n(as printed in ASID / FDIWN)"),
        plt.scatter([], [], s=30, marker="s", facecolors="none", edgecolors=PUBLISHED_COLOUR,
                    label="published, MACs not printed"),
    ]
    handles += [plt.scatter([], [], s=macs_area(g), marker="o", facecolors="none", edgecolors="black",
                            label=f"{g} G MACs (area)") for g in (20, 60)]
    fig.legend(handles=handles, loc="outside right upper", ncols=1, frameon=False, labelspacing=1.2,
               borderpad=1.0)
    _freeze_layout(fig)
    for ax, xs, ys, labels, colours, sizes in to_label:
        place_labels(ax, xs, ys, labels, colours=colours, sizes=sizes)
    return save(fig, path)


def _freeze_layout(fig) -> None:
    """Lay the figure out once and keep that layout, so labels placed in display space
    afterwards stay where they were put."""
    fig.canvas.draw()
    fig.set_layout_engine("none")


# ----------------------------------------------------------------------------- Fig. 5
def box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean of every k x k window of a 2-D array ('valid': (H-k+1) x (W-k+1))."""
    c = np.pad(np.cumsum(np.cumsum(a, 0), 1), ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def busiest_window(images: Sequence[np.ndarray], hr: np.ndarray, size: int) -> Tuple[float, int, int]:
    """Where the outputs differ most: the ``size`` x ``size`` window with the largest mean of
    the per-pixel spread (max - min) of Y over ``images``; with one image, its error against
    ``hr``. Returns ``(score, x, y)``."""
    from ..metrics import y_channel
    ys = [y_channel(im) for im in images]
    spread = (np.max(ys, 0) - np.min(ys, 0)) if len(ys) > 1 else np.abs(ys[0] - y_channel(hr))
    m = box_mean(spread, size)
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    return float(m[y, x]), int(x), int(y)


def fig_crops(title: str, tiles: Sequence[dict], path: PathLike) -> Path:
    """Fig. 5: one row of crops. ``tiles``: ``{"label", "image" (uint8 HxWxC), "psnr" (or None)}``."""
    plt = _plt()
    n = len(tiles)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n + 0.3, 2.7), squeeze=False, layout="constrained")
    for ax, t in zip(axes.flat, tiles):
        img = t["image"]
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_xticks([]); ax.set_yticks([])
        sub = t["label"] + ("" if t.get("psnr") is None else f"\n{t['psnr']:.2f} dB")
        ax.set_xlabel(sub, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


# ----------------------------------------------------------------------------- Fig. 6
def attention_maps(module, lr: np.ndarray, query: Tuple[int, int]) -> List[dict]:
    """The six attention rows of ASID block 1 for the LR pixel ``query`` = (row, col).

    Runs ``module.features`` (which returns block 1's matrices: SAM1..3, meso then
    global; later blocks reuse them) on the padded LR. Returns per matrix ``{"name",
    "kind", "keys": (64, 2) array of (row, col) LR positions, "weights": (64,)}``.
    """
    import torch
    from ..models.asid import WINDOW
    x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    lo, hi = getattr(module, "pixel_range", (0.0, 1.0))
    x = x * (hi - lo) + lo
    module = module.eval()
    with torch.inference_mode():
        xp = module.pad(x)
        _, mats = module.features(xp)
    H, W = xp.shape[-2:]
    h, w = H // WINDOW, W // WINDOW
    i, j = query
    out = []
    ky, kx = np.meshgrid(np.arange(WINDOW), np.arange(WINDOW), indexing="ij")
    ky, kx = ky.ravel(), kx.ravel()
    for n, a in enumerate(mats):
        kind = "meso" if n % 2 == 0 else "global"
        if kind == "meso":
            g = (i // WINDOW) * w + (j // WINDOW)
            member = (i % WINDOW) * WINDOW + (j % WINDOW)
            keys = np.stack([(i // WINDOW) * WINDOW + ky, (j // WINDOW) * WINDOW + kx], 1)
        else:
            g = (i % h) * w + (j % w)
            member = (i // h) * WINDOW + (j // w)
            keys = np.stack([ky * h + i % h, kx * w + j % w], 1)
        weights = a[g, member].float().numpy()
        out.append({"name": f"SAM{n // 2 + 1} {kind}", "kind": kind, "keys": keys, "weights": weights})
    return out


def fig_attention(lr: np.ndarray, query: Tuple[int, int], maps: Sequence[dict], title: str,
                  path: PathLike) -> Path:
    """Fig. 6: meso maps (top row, over a 24 x 24 LR neighbourhood of the query) and global
    maps (bottom row, over the whole LR image), colour = attention weight."""
    plt = _plt()
    from matplotlib import colors
    img = lr[..., 0] if lr.shape[2] == 1 else lr
    cmap = "gray" if lr.shape[2] == 1 else None
    H, W = lr.shape[:2]
    qi, qj = query
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.4), layout="constrained")
    meso = [m for m in maps if m["kind"] == "meso"]
    glob = [m for m in maps if m["kind"] == "global"]
    for ax, m in zip(axes[0], meso):
        r0 = int(np.clip(qi - 12, 0, max(H - 24, 0)))
        c0 = int(np.clip(qj - 12, 0, max(W - 24, 0)))
        ax.imshow(img, cmap=cmap, interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        heat = np.full((H, W), np.nan)
        for (r, c), v in zip(m["keys"], m["weights"]):
            if r < H and c < W:
                heat[r, c] = v
        im = ax.imshow(heat, cmap="inferno", alpha=0.7, interpolation="nearest",
                       norm=colors.Normalize(0, float(np.nanmax(heat)) if np.isfinite(heat).any() else 1),
                       extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        ax.set_xlim(c0 - 0.5, c0 + 23.5)
        ax.set_ylim(r0 + 23.5, r0 - 0.5)
        ax.plot([qj], [qi], marker="+", color="cyan", markersize=14, mew=2)
        ax.set_title(f"{m['name']} (8x8 window)")
        ax.set_xlabel("LR column (px)"); ax.set_ylabel("LR row (px)")
        fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")
    for ax, m in zip(axes[1], glob):
        ax.imshow(img, cmap=cmap, interpolation="nearest")
        keys, wts = m["keys"], m["weights"]
        inside = (keys[:, 0] < H) & (keys[:, 1] < W)
        sc = ax.scatter(keys[inside, 1], keys[inside, 0], c=wts[inside], s=8 + 110 * wts[inside] / max(wts.max(), 1e-9),
                        cmap="inferno", edgecolors="white", linewidths=0.5)
        ax.plot([qj], [qi], marker="+", color="cyan", markersize=14, mew=2)
        ax.set_title(f"{m['name']} (sparse 8x8 grid)")
        ax.set_xlabel("LR column (px)"); ax.set_ylabel("LR row (px)")
        fig.colorbar(sc, ax=ax, shrink=0.8, label="attention weight")
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


# ----------------------------------------------------------------------------- Fig. 7
def fig_depth(depths: Sequence[int], params: Sequence[int], macs_g: Sequence[float],
              published: Sequence[dict], psnr: Sequence[dict], path: PathLike, macs_note: str,
              output: Tuple[int, int] = (1280, 720)) -> Path:
    """Fig. 7: parameters and MACs against the number of IDBs (x2), the paper's printed
    points beside ours, and measured PSNR where weights exist (``psnr``: {"depth", "psnr", "label"})."""
    plt = _plt()
    n = 3 if psnr else 2
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 3.6), layout="constrained")
    ax = axes[0]
    ax.plot(depths, [p / 1e3 for p in params], "o-", color=MEASURED_COLOUR, label="counted here")
    for p in published:
        if p.get("params"):
            ax.plot([p["depth"]], [p["params"] / 1e3], "s", color=OURS_PUBLISHED_COLOUR, ms=9, mfc="none", mew=2,
                    label=p["label"])
    ax.set_xlabel("number of IDBs N"); ax.set_ylabel("parameters (thousands)"); ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    ax = axes[1]
    ax.plot(depths, macs_g, "o-", color=MEASURED_COLOUR, label="counted here")
    for p in published:
        if p.get("macs_g"):
            ax.plot([p["depth"]], [p["macs_g"]], "s", color=OURS_PUBLISHED_COLOUR, ms=9, mfc="none", mew=2,
                    label=p["label"])
    ax.set_xlabel("number of IDBs N"); ax.set_ylabel(f"MACs (G, {macs_note})"); ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    if psnr:
        ax = axes[2]
        ax.plot([p["depth"] for p in psnr], [p["psnr"] for p in psnr], "o", color=MEASURED_COLOUR, ms=8)
        ax.set_xlim(min(depths) - 0.5, max(depths) + 0.5)
        ys = [p["psnr"] for p in psnr]
        ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
        ax.set_xlabel("number of IDBs N"); ax.set_ylabel("PSNR on Y (dB), measured"); ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.set_xticks(list(depths))
    fig.suptitle(f"ASID depth series at x2 ({output[0]}x{output[1]} output)", fontsize=10)
    if psnr:
        _freeze_layout(fig)
        place_labels(axes[2], [p["depth"] for p in psnr], [p["psnr"] for p in psnr], [p["label"] for p in psnr],
                     sizes=[64] * len(psnr))
    return save(fig, path)


# ----------------------------------------------------------------------------- curves
def fig_learning_curves(runs: Sequence[dict], path: PathLike) -> Path:
    """Training loss and validation PSNR against iteration. ``runs``: ``{"name", "iter",
    "loss", "val_iter", "val_psnr"}`` (lists)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for r in runs:
        axes[0].plot(r["iter"], r["loss"], label=r["name"], lw=1)
        if r["val_iter"]:
            axes[1].plot(r["val_iter"], r["val_psnr"], "o-", label=r["name"], ms=3)
    axes[0].set_xlabel("iteration"); axes[0].set_ylabel("training loss (mean since the previous row)")
    losses = [v for r in runs for v in r["loss"] if v > 0]
    if losses and max(losses) / min(losses) > 20:  # a log axis only where the loss spans decades
        axes[0].set_yscale("log")
    axes[0].grid(True, alpha=0.3, which="both")
    axes[1].set_xlabel("iteration"); axes[1].set_ylabel("validation PSNR on Y (dB)"); axes[1].grid(True, alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save(fig, path)
