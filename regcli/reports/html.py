"""A self-contained HTML report with PNG figures (matplotlib, Agg; imported lazily).

:func:`render_html_report` returns the page text and ``{png file name: bytes}``; the caller writes the PNGs
next to the HTML (atomically) under exactly those names, which the page references as relative links.

Display orientation: every volume on the fixed grid is shown after a lossless axis permutation/flip to
LPS (``sitk.DICOMOrient``, display only; oblique grids are shown in their closest orthogonal orientation),
in radiological convention: axial and coronal views have the patient's right on the left of the screen,
axial has anterior at the top, coronal and sagittal superior at the top, sagittal anterior on the left.
Axes carry the anatomical letters, and pixel aspect follows the voxel spacing.
"""

from __future__ import annotations

import html as _html
import io
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from regcli.spaces import Grid, Image

__all__ = ["render_html_report", "PNG_NAMES"]

PNG_NAMES = ("slices", "checkerboard", "jacobian", "loss")

_FIXED_COLOUR = "#39ff14"  # fixed-label boundaries
_WARPED_COLOUR = "#ff2bd6"  # warped-label boundaries
_FOLD_COLOUR = "#ffd400"  # det J <= 0

# view name -> (LPS array axis held fixed, (row axis, col axis), origin, letters (left, right, top, bottom))
_VIEWS = {
    "axial": (0, (1, 2), "upper", ("R", "L", "A", "P")),
    "coronal": (1, (0, 2), "lower", ("R", "L", "S", "I")),
    "sagittal": (2, (0, 1), "lower", ("A", "P", "S", "I")),
}


# ----------------------------------------------------------------------------- volume preparation
def _np(x) -> Optional[np.ndarray]:
    if x is None:
        return None
    if isinstance(x, Image):
        x = x.data
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class _Display:
    """Volumes on the fixed grid, reoriented to LPS for display (arrays (Z, Y, X): z->S, y->P, x->L)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.oblique = bool(np.abs(np.abs(grid.direction_matrix) - np.round(np.abs(grid.direction_matrix))).max() > 1e-3)
        self.spacing_zyx: Optional[tuple[float, float, float]] = None

    def orient(self, arr: np.ndarray) -> np.ndarray:
        import SimpleITK as sitk

        a = np.ascontiguousarray(arr)
        if a.dtype == bool:
            a = a.astype(np.uint8)
        elif a.dtype == np.float64:
            a = a.astype(np.float32)
        img = self.grid.apply_to_sitk(sitk.GetImageFromArray(a))
        out = sitk.DICOMOrient(img, "LPS")
        sp = out.GetSpacing()
        self.spacing_zyx = (sp[2], sp[1], sp[0])
        return sitk.GetArrayFromImage(out)

    def centre(self, shape) -> tuple[int, int, int]:
        return tuple(int(n // 2) for n in shape)


def _slice(vol: np.ndarray, view: str, centre) -> np.ndarray:
    axis = _VIEWS[view][0]
    return np.take(vol, centre[axis], axis=axis)


def _aspect(view: str, spacing_zyx) -> float:
    r, c = _VIEWS[view][1]
    return float(spacing_zyx[r] / spacing_zyx[c])


def _window(arr: np.ndarray) -> tuple[float, float]:
    """Robust display range: 0.5th..99.5th percentile of the non-background voxels."""
    a = np.asarray(arr).ravel()
    if a.size > 2_000_000:  # a strided sample is plenty for percentiles
        a = a[:: int(math.ceil(a.size / 2_000_000))]
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    nz = a[a != a.min()] if (a != a.min()).any() else a
    lo, hi = np.percentile(nz, [0.5, 99.5])
    lo = min(float(lo), float(np.percentile(a, 0.5)))
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- figure helpers
def _new_figure(w_in: float, h_in: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=100)
    fig.patch.set_facecolor("white")
    return fig


def _png(fig, dpi: int) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return buf.getvalue()


def _letters(ax, view: str) -> None:
    left, right, top, bottom = _VIEWS[view][3]
    style = dict(transform=ax.transAxes, color="white", fontsize=11, fontweight="bold",
                 bbox=dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.55))
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _overlay_mask(ax, mask2d: np.ndarray, colour: str, view: str, aspect: float, alpha: float = 1.0) -> None:
    """Paint the True pixels of a 2D mask in one colour."""
    from matplotlib.colors import ListedColormap

    if not mask2d.any():
        return
    m = np.ma.masked_where(~mask2d, np.ones(mask2d.shape))
    ax.imshow(m, cmap=ListedColormap([colour]), vmin=0, vmax=1, origin=_VIEWS[view][2], aspect=aspect,
              interpolation="nearest", alpha=alpha)


def _label_contours(ax, lab2d: np.ndarray, colour: str, lw: float = 1.0) -> None:
    """Thin iso-contours (level 0.5) of every non-zero label in a 2D slice, drawn in pixel coordinates.

    Each label is traced (contourpy) inside its own bounding box plus one pixel, and all lines go into one
    LineCollection, which keeps 30+ labels cheap.
    """
    import contourpy
    from matplotlib.collections import LineCollection

    lab2d = np.asarray(lab2d)
    if lab2d.shape[0] < 2 or lab2d.shape[1] < 2 or not lab2d.any():
        return
    if lab2d.min() >= 0 and lab2d.max() < 100_000:
        from scipy.ndimage import find_objects

        boxes = [(i + 1, b) for i, b in enumerate(find_objects(lab2d.astype(np.int64))) if b is not None]
    else:
        boxes = [(v, (slice(0, lab2d.shape[0]), slice(0, lab2d.shape[1]))) for v in np.unique(lab2d) if v != 0]
    lines = []
    for lab, (rs, cs) in boxes:
        # pad with background so every region gets a closed contour
        m = np.pad((lab2d[rs, cs] == lab).astype(np.float64), 1)
        xx = np.arange(cs.start - 1, cs.stop + 1, dtype=np.float64)
        yy = np.arange(rs.start - 1, rs.stop + 1, dtype=np.float64)
        gen = contourpy.contour_generator(xx, yy, m, line_type=contourpy.LineType.Separate)
        lines.extend(seg for seg in gen.lines(0.5) if len(seg) > 1)
    if lines:
        ax.add_collection(LineCollection(lines, colors=[colour], linewidths=lw, antialiaseds=True))


def _plain(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


# ----------------------------------------------------------------------------- figures
def _fig_slices(disp: _Display, rows: list[tuple[str, np.ndarray, tuple[float, float], list]], dpi: int) -> bytes:
    """rows: (title, oriented volume, window, [(oriented label volume, colour), ...])."""
    ncol = 3
    fig = _new_figure(3.3 * ncol, 3.2 * len(rows) + 0.5)
    centre = disp.centre(rows[0][1].shape)
    for r, (title, vol, (lo, hi), overlays) in enumerate(rows):
        for c, view in enumerate(_VIEWS):
            ax = fig.add_subplot(len(rows), ncol, r * ncol + c + 1)
            asp = _aspect(view, disp.spacing_zyx)
            ax.imshow(_slice(vol, view, centre), cmap="gray", vmin=lo, vmax=hi, origin=_VIEWS[view][2],
                      aspect=asp, interpolation="nearest")
            xlim, ylim = ax.get_xlim(), ax.get_ylim()
            for lab, colour in overlays:
                lab2d = _slice(lab, view, centre)
                _label_contours(ax, lab2d, colour, 1.0 if len(np.unique(lab2d)) <= 9 else 0.6)
            ax.set_xlim(xlim)
            ax.set_ylim(ylim)
            _letters(ax, view)
            _plain(ax)
            if r == 0:
                ax.set_title(view, fontsize=11)
            if c == 0:
                ax.set_ylabel(title, fontsize=11)
    if any(ov for *_, ov in rows):
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=_FIXED_COLOUR, lw=2, label="fixed labels")]
        if any(colour == _WARPED_COLOUR for *_, ov in rows for _, colour in ov):
            handles.append(Line2D([], [], color=_WARPED_COLOUR, lw=2, label="warped labels"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.95, bottom=0.06, wspace=0.04, hspace=0.08)
    return _png(fig, dpi)


def _checker(a2: np.ndarray, b2: np.ndarray, view: str, spacing_zyx, tile_mm: float) -> np.ndarray:
    r_ax, c_ax = _VIEWS[view][1]
    rr = (np.arange(a2.shape[0]) * spacing_zyx[r_ax] // tile_mm).astype(int)
    cc = (np.arange(a2.shape[1]) * spacing_zyx[c_ax] // tile_mm).astype(int)
    sel = ((rr[:, None] + cc[None, :]) % 2).astype(bool)
    return np.where(sel, b2, a2)


def _fig_checkerboard(disp: _Display, fixed, others: list[tuple[str, np.ndarray]], wf, wm, dpi: int) -> bytes:
    """Checkerboards of the fixed image against each of ``others`` (both scaled to [0, 1] by their windows)."""
    shape = fixed.shape
    centre = disp.centre(shape)
    ext = [n * s for n, s in zip(shape, disp.spacing_zyx)]
    tile = max(max(ext) / 8.0, 1e-6)
    fn = np.clip((fixed - wf[0]) / (wf[1] - wf[0]), 0, 1)
    fig = _new_figure(3.3 * 3, 3.2 * len(others) + 0.3)
    for r, (title, vol) in enumerate(others):
        vn = np.clip((vol - wm[0]) / (wm[1] - wm[0]), 0, 1)
        for c, view in enumerate(_VIEWS):
            ax = fig.add_subplot(len(others), 3, r * 3 + c + 1)
            cb = _checker(_slice(fn, view, centre), _slice(vn, view, centre), view, disp.spacing_zyx, tile)
            ax.imshow(cb, cmap="gray", vmin=0, vmax=1, origin=_VIEWS[view][2],
                      aspect=_aspect(view, disp.spacing_zyx), interpolation="nearest")
            _letters(ax, view)
            _plain(ax)
            if r == 0:
                ax.set_title(view, fontsize=11)
            if c == 0:
                ax.set_ylabel(title, fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.93, bottom=0.02, wspace=0.04, hspace=0.08)
    return _png(fig, dpi)


def _fig_jacobian(disp: _Display, det: np.ndarray, det_raw: np.ndarray, labels: Optional[np.ndarray],
                  dpi: int) -> bytes:
    from matplotlib.colors import TwoSlopeNorm

    finite = det_raw[np.isfinite(det_raw)]
    p_lo, p_hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (1.0, 1.0))
    span = float(min(max(abs(1.0 - p_lo), abs(p_hi - 1.0), 0.05), 1.0))
    norm = TwoSlopeNorm(vmin=1.0 - span, vcenter=1.0, vmax=1.0 + span)
    centre = disp.centre(det.shape)
    fig = _new_figure(14.0, 3.7)
    gs = fig.add_gridspec(1, 6, width_ratios=[1, 1, 1, 0.05, 0.32, 1.3], wspace=0.08)
    im = None
    for c, view in enumerate(_VIEWS):
        ax = fig.add_subplot(gs[0, c])
        s = _slice(det, view, centre)
        asp = _aspect(view, disp.spacing_zyx)
        im = ax.imshow(s, cmap="RdBu_r", norm=norm, origin=_VIEWS[view][2], aspect=asp, interpolation="nearest")
        _overlay_mask(ax, s <= 0, _FOLD_COLOUR, view, asp)
        if labels is not None:
            xlim, ylim = ax.get_xlim(), ax.get_ylim()
            _label_contours(ax, (_slice(labels, view, centre) != 0).astype(np.int32), "0.35", 0.7)
            ax.set_xlim(xlim)
            ax.set_ylim(ylim)
        _letters(ax, view)
        _plain(ax)
        ax.set_title(view, fontsize=11)
    cax = fig.add_subplot(gs[0, 3])
    cb = fig.colorbar(im, cax=cax, extend="both")
    cb.set_label("det J (1 = volume kept)", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    ax = fig.add_subplot(gs[0, 5])
    n_bad = int(np.count_nonzero(finite <= 0))
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.05, hi + 0.05
        ax.hist(finite, bins=120, range=(lo, hi), color="#4a78b5", log=True)
        if lo <= 0 <= hi:
            ax.axvline(0.0, color="#d62728", lw=1.2, ls="--")
        ax.axvline(1.0, color="0.3", lw=1.0, ls=":")
    pct = 100.0 * n_bad / max(finite.size, 1)
    ax.set_title(f"det J \u2264 0: {n_bad} voxels ({pct:.3g}%)", fontsize=10,
                 color="#d62728" if n_bad else "black")
    ax.set_xlabel("det J")
    ax.set_ylabel("voxels (log)")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.15)
    return _png(fig, dpi)


_SKIP_HISTORY_KEYS = {"iteration", "iter", "step", "level", "stage", "time", "seconds", "lr"}


def _history_series(rows: list) -> tuple[list, dict[str, tuple[list, list]], list]:
    """x values, ``{key: (xs, ys)}`` of every numeric key (``loss`` first), and the ``level`` column."""
    rows = [r if isinstance(r, Mapping) else {"loss": r} for r in rows]
    x = [r.get("iteration", j) for j, r in enumerate(rows)]
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in _SKIP_HISTORY_KEYS and k not in keys and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                keys.append(k)
    keys.sort(key=lambda k: (k != "loss", k))
    series = {}
    for k in keys:
        pts = [(xv, float(r[k])) for xv, r in zip(x, rows)
               if isinstance(r.get(k), (int, float)) and math.isfinite(float(r[k]))]
        if pts:
            series[k] = ([p[0] for p in pts], [p[1] for p in pts])
    return x, series, [r.get("level") for r in rows]


_PART = re.compile(r"^(candidate\d+|\d+(\.\d+)?mm)$")


def _joined_levels(history: Mapping[str, list]) -> dict[str, list]:
    """The stages of one pyramid or one set of candidates (``affine/rigid/8mm``, ``affine/rigid/4mm``;
    ``affine/init/candidate0``, ...) as one stage (``affine/rigid``), one after the other: iterations numbered on,
    ``level`` naming the part, so that a panel shows them with dotted lines between. Other stages are kept as they
    are. Fewer panels: the figure of a ConvexAdam run draws 9 instead of 13 (matplotlib spends about 0.07 s per
    axis)."""
    names = {str(k) for k in history}
    out: dict[str, list] = {}
    joined: dict[str, list] = {}  # new lists only: the caller's history is not changed
    for key, rows in history.items():
        head, _, last = str(key).rpartition("/")
        if not (head and _PART.match(last) and isinstance(rows, (list, tuple))
                and all(isinstance(r, Mapping) for r in rows)):
            out[str(key)] = rows
            continue
        name = head if head not in names else f"{head} ({'candidates' if last.startswith('candidate') else 'levels'})"
        if name not in joined:
            joined[name] = out[name] = []
        start = len(joined[name])
        joined[name].extend({**r, "iteration": start + j + 1, "level": last} for j, r in enumerate(rows))
    return out


def _fig_loss(history: Mapping[str, list], dpi: int) -> Optional[bytes]:
    """One column per stage (a pyramid's levels and a set of candidates joined: :func:`_joined_levels`): the loss
    on top, the other logged terms (each min-max scaled) below."""
    stages = [(str(k), _history_series(list(v))) for k, v in _joined_levels(history).items()
              if isinstance(v, (list, tuple)) and len(v) > 0]
    stages = [(k, h) for k, h in stages if h[1]]
    if not stages:
        return None
    ncol = min(len(stages), 4)
    groups = int(math.ceil(len(stages) / ncol))
    extra = any(len(h[1]) > 1 or "loss" not in h[1] for _, h in stages)
    per = 2 if extra else 1
    fig = _new_figure(4.2 * ncol, (2.9 + (1.9 if extra else 0.0)) * groups)
    gs = fig.add_gridspec(groups * per, ncol, height_ratios=([1.5, 1.0] if extra else [1.0]) * groups)
    for i, (name, (x, series, levels)) in enumerate(stages):
        g, c = divmod(i, ncol)
        ax = fig.add_subplot(gs[g * per, c])
        main = "loss" if "loss" in series else next(iter(series))
        ax.plot(*series[main], lw=1.8, color="#1f5fa8")
        ax.set_title(name, fontsize=11)
        ax.set_ylabel(main)
        ax.grid(alpha=0.3)
        level_x = [x[j] for j in range(1, len(levels)) if levels[j] is not None and levels[j] != levels[j - 1]]
        for lx in level_x:
            ax.axvline(lx, color="0.55", lw=0.8, ls=":")
        others = [k for k in series if k != main]
        if not others:
            ax.set_xlabel("iteration")
        if extra and others:
            ax2 = fig.add_subplot(gs[g * per + 1, c], sharex=ax)
            for k in others:
                xs, ys = series[k]
                lo, hi = min(ys), max(ys)
                scaled = [(y - lo) / (hi - lo) if hi > lo else 0.5 for y in ys]
                ax2.plot(xs, scaled, lw=1.2, label=f"{k} [{lo:.3g}, {hi:.3g}]")
            for lx in level_x:
                ax2.axvline(lx, color="0.55", lw=0.8, ls=":")
            ax2.set_ylim(-0.05, 1.05)
            ax2.set_ylabel("scaled terms", fontsize=9)
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=7.5, loc="upper right")
            ax2.set_xlabel("iteration")
    # fixed margins: tight_layout measured every tick label of ~20 axes (0.9 s of a 5 s report)
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.07, right=0.985, top=1 - 0.35 / h, bottom=0.55 / h, hspace=0.55, wspace=0.28)
    return _png(fig, dpi)


# ----------------------------------------------------------------------------- tables
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "\u2013"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}g}"
    return _html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{_html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _per_label(metrics: Mapping, key: str) -> dict[int, float]:
    d = metrics.get(key) or {}
    out = {}
    for k, v in d.items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            continue
    return out


def _label_table(metrics: Mapping, label_names: Optional[Mapping]) -> str:
    dice, hd, assd = (_per_label(metrics, k) for k in ("dice_per_label", "hd95_per_label", "assd_per_label"))
    labels = sorted(set(dice) | set(hd) | set(assd))
    if not labels:
        return ""
    names = {int(k): v for k, v in (label_names or {}).items()}
    header = ["label"] + (["name"] if names else []) + ["Dice"] + (["HD95 (mm)"] if hd else []) + \
        (["ASSD (mm)"] if assd else [])
    rows = []
    for lab in labels:
        r: list[Any] = [lab] + ([names.get(lab, "")] if names else []) + [dice.get(lab)]
        if hd:
            r.append(hd.get(lab))
        if assd:
            r.append(assd.get(lab))
        rows.append(r)
    mean_row: list[Any] = ["mean"] + ([""] if names else []) + [metrics.get("dice_mean")]
    if hd:
        mean_row.append(metrics.get("hd95_mean"))
    if assd:
        mean_row.append(metrics.get("assd_mean"))
    rows.append(mean_row)
    return _table(header, rows, "labels")


_JAC_NAMES = {"pct_nonpos_jac": "% det J \u2264 0", "n_nonpos_jac": "voxels with det J \u2264 0",
              "sdlogj": "SD of log det J", "jac_min": "min", "jac_max": "max", "jac_mean": "mean",
              "jac_p1": "1st percentile", "jac_p99": "99th percentile", "n_voxels": "voxels"}


def _jacobian_table(stats: Mapping) -> str:
    keys = [k for k, v in stats.items() if not isinstance(v, Mapping)]
    blocks = [("whole grid", stats)] + [(k, v) for k, v in stats.items() if isinstance(v, Mapping)]
    header = ["statistic"] + [b[0].replace("_", " ") for b in blocks]
    rows = [[_JAC_NAMES.get(k, k)] + [b[1].get(k) for b in blocks] for k in keys]
    return _table(header, rows)


def _tre_table(t: Mapping) -> str:
    rows = []
    for what in ("mean", "median", "std", "max"):
        rows.append([what, t.get(f"initial_{what}_mm"), t.get(f"tre_{what}_mm")])
    head = _table(["", "initial (mm)", "after registration (mm)"], rows)
    per = t.get("tre_per_landmark_mm") or []
    ini = t.get("initial_per_landmark_mm") or [None] * len(per)
    ids = t.get("ids") or list(range(1, len(per) + 1))
    if not per:
        return head
    detail = _table(["landmark", "initial (mm)", "TRE (mm)"], [[i, a, b] for i, a, b in zip(ids, ini, per)])
    return head + f"<details><summary>per landmark ({len(per)})</summary>{detail}</details>"


def _scalar_rows(d: Mapping, skip: set) -> list[list[Any]]:
    return [[k, v] for k, v in d.items()
            if k not in skip and (v is None or isinstance(v, (int, float, str, bool)))]


# ----------------------------------------------------------------------------- page
_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#1d2430;background:#fafbfc;line-height:1.45}
h1{font-size:1.6em;margin:0.2em 0 0.1em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:2px solid #dde3ea;
padding-bottom:3px}.sub{color:#5a6675;margin:0 0 1em}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:0.92em;background:white}
th,td{border:1px solid #d5dbe3;padding:3px 10px;text-align:right}th{background:#eef2f6}
td:first-child,th:first-child{text-align:left}table.labels tr:last-child{font-weight:bold;background:#f3f6f9}
figure{margin:0.5em 0 1.2em}figure img{max-width:100%;border:1px solid #dde3ea;background:white}
figcaption{color:#5a6675;font-size:0.9em}.grid2{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
pre{background:#f1f4f7;padding:10px;overflow:auto;font-size:0.85em}.warn{color:#b3261e;font-weight:bold}
summary{cursor:pointer;color:#2c5a93}
"""


def _check_png_base(png_base: Optional[str]) -> None:
    if not isinstance(png_base, str) or not png_base or re.search(r"[\\/\s\"'<>&]", png_base):
        raise ValueError(f"png_base must be a plain file-name stem (no directory, quotes or spaces), got {png_base!r}")


def render_html_report(
    fixed: Image,
    png_base: Optional[str] = None,
    *,
    moving: Optional[Image] = None,
    warped: Optional[Image] = None,
    fixed_labels: Optional[Image] = None,
    warped_labels: Optional[Image] = None,
    jacobian=None,
    history: Optional[Mapping[str, list]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    report: Optional[Mapping[str, Any]] = None,
    title: str = "regcli registration report",
    label_names: Optional[Mapping[int, str]] = None,
    timings: Optional[Mapping[str, float]] = None,
    dpi: int = 100,
    png_basename: Optional[str] = None,
) -> tuple[str, dict[str, bytes]]:
    """Render the HTML report and its figures.

    Args:
        fixed: fixed image, (Z, Y, X) float32 on the fixed grid (defines the display grid).
        png_base: file-name stem of the figures, e.g. ``"subj1Report"`` for output prefix ``out/subj1``:
            figures are named ``f"{png_base}_{name}.png"`` with name in :data:`PNG_NAMES` (no directory).
        moving: moving image on its own grid; shown resampled onto the fixed grid by the identity in world
            space (i.e. before registration).
        warped: moving image warped onto the fixed grid by the registration, (Z, Y, X) float32.
        fixed_labels: integer label map (Z, Y, X) on the fixed grid (its boundaries are drawn in green).
        warped_labels: moving labels warped onto the fixed grid (boundaries in magenta on the warped row).
        jacobian: det J on the fixed grid ((Z, Y, X) tensor/array or Image), or a DisplacementField (the
            determinant is then computed here).
        history: ``{stage: [{"iteration": i, "loss": v, ...}, ...]}``; other numeric keys are plotted dashed.
        metrics: dict with any of ``dice_per_label``, ``dice_mean``, ``hd95_per_label``, ``hd95_mean``,
            ``assd_per_label``, ``assd_mean``, ``jacobian`` (:func:`jacobian_stats`), ``tre``
            (:func:`~regcli.reports.landmarks.tre`) and other scalars. Defaults to ``report["metrics"]``.
        report: the dict of :func:`~regcli.reports.report.build_report` (run summary, timings, config).
        label_names: ``{label: name}`` for the label table.
        timings: ``{stage: seconds}``, used when ``report`` has no ``"stages"``.
        dpi: figure resolution.
        png_basename: alias of ``png_base``.

    Returns:
        ``(html_text, {file_name: png_bytes})``; every returned PNG is referenced by the page.
    """
    png_base = png_base if png_base is not None else png_basename
    _check_png_base(png_base)
    from regcli.resample import resample_to_grid

    report = dict(report or {})
    if timings and not report.get("stages"):
        report["stages"] = {str(k): float(v) for k, v in timings.items() if str(k) != "total"}
        total = timings.get("total")
        report["total_seconds"] = float(total) if total is not None else sum(report["stages"].values())
    metrics = dict(metrics if metrics is not None else (report.get("metrics") or {}))
    grid = fixed.grid
    disp = _Display(grid)
    pngs: dict[str, bytes] = {}
    figures: list[tuple[str, str, str]] = []  # (name, heading, caption)

    def add(name: str, data: Optional[bytes], heading: str, caption: str) -> None:
        if data is None:
            return
        fname = f"{png_base}_{name}.png"
        pngs[fname] = data
        figures.append((fname, heading, caption))

    fx = disp.orient(_np(fixed).astype(np.float32))
    wf = _window(fx)
    mv = None
    if moving is not None:
        mv = disp.orient(_np(resample_to_grid(moving, grid, "linear")).astype(np.float32))
    wp = disp.orient(_np(warped).astype(np.float32)) if warped is not None else None
    src = _np(moving).astype(np.float32) if moving is not None else (_np(warped) if warped is not None else None)
    wm = _window(src) if src is not None else wf
    fl = disp.orient(_np(fixed_labels)) if fixed_labels is not None else None
    wl = disp.orient(_np(warped_labels)) if warped_labels is not None else None

    # (a) orthogonal slices
    base_ov = [(fl, _FIXED_COLOUR)] if fl is not None else []
    rows = [("fixed", fx, wf, base_ov)]
    if mv is not None:
        rows.append(("moving (before)", mv, wm, base_ov))
    if wp is not None:
        rows.append(("warped (after)", wp, wm, base_ov + ([(wl, _WARPED_COLOUR)] if wl is not None else [])))
    orient_note = " The fixed grid is oblique; views use its closest orthogonal orientation." if disp.oblique else ""
    add("slices", _fig_slices(disp, rows, dpi), "Orthogonal slices",
        "Slices through the centre of the fixed image. The moving image is shown on the fixed grid by the "
        "identity in world space (no registration). Green: fixed-label boundaries; magenta: warped-label "
        "boundaries. Radiological convention (patient right on screen left)." + orient_note)

    # (b) checkerboard
    cmp = []
    if mv is not None:
        cmp.append(("fixed | moving (before)", mv))
    if wp is not None:
        cmp.append(("fixed | warped (after)", wp))
    if cmp:
        add("checkerboard", _fig_checkerboard(disp, fx, cmp, wf, wm, dpi), "Checkerboard",
            "Alternating tiles of the fixed image and the moving/warped image (each scaled to its own "
            "intensity window). Edges that continue across tiles indicate good alignment.")

    # (c) Jacobian
    if jacobian is not None:
        from regcli.transforms import DisplacementField

        if isinstance(jacobian, DisplacementField):
            from regcli.reports.jacobian import jacobian_determinant

            jacobian = jacobian_determinant(jacobian)
        det_raw = _np(jacobian).astype(np.float32)
        if det_raw.shape != grid.shape:
            raise ValueError(f"Jacobian shape {det_raw.shape} differs from the fixed grid {grid.shape}")
        add("jacobian", _fig_jacobian(disp, disp.orient(det_raw), det_raw, fl, dpi), "Jacobian determinant",
            "det J of the fixed-to-moving mapping in physical units (red: local expansion, blue: "
            "contraction; yellow: det J \u2264 0, i.e. folding; grey line: outline of the fixed labels). "
            "Histogram over the whole fixed grid.")

    # (d) loss curves
    if history:
        add("loss", _fig_loss(history, dpi), "Optimisation",
            "Loss per iteration for each stage (dotted lines: a new pyramid level). Below it, the other logged "
            "terms, each scaled to [0, 1] over its range (given in the legend).")

    return _page(title, report, metrics, figures, label_names), pngs


def _page(title: str, report: Mapping, metrics: Mapping, figures: list, label_names) -> str:
    from regcli.reports.report import json_safe

    e = _html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    sub = []
    if report.get("command"):
        sub.append(f"<code>{e(str(report['command']))}</code>")
    if report.get("created"):
        sub.append(e(str(report["created"])))
    if report.get("regcli_version"):
        sub.append(f"regcli {e(str(report['regcli_version']))}")
    if sub:
        parts.append(f"<p class='sub'>{' &middot; '.join(sub)}</p>")

    # summary
    summary: list[list[Any]] = []
    if "dice_mean" in metrics:
        summary.append(["mean Dice", metrics.get("dice_mean")])
    if "hd95_mean" in metrics:
        summary.append(["mean HD95 (mm)", metrics.get("hd95_mean")])
    if "assd_mean" in metrics:
        summary.append(["mean ASSD (mm)", metrics.get("assd_mean")])
    jac = metrics.get("jacobian")
    if isinstance(jac, Mapping):
        summary.append(["% det J \u2264 0", jac.get("pct_nonpos_jac")])
        summary.append(["SD log det J", jac.get("sdlogj")])
    tre = metrics.get("tre")
    if isinstance(tre, Mapping):
        summary.append(["TRE mean (mm), initial \u2192 after",
                        f"{_fmt(tre.get('initial_mean_mm'))} \u2192 {_fmt(tre.get('tre_mean_mm'))}"])
    if report.get("total_seconds") is not None:
        summary.append(["total time (s)", report.get("total_seconds")])
    mem = report.get("memory") or {}
    if mem.get("peak_rss_mb") is not None:
        summary.append(["peak RSS (MB)", mem.get("peak_rss_mb")])
    if mem.get("cuda_max_allocated_mb") is not None:
        summary.append(["peak CUDA allocated (MB)", mem.get("cuda_max_allocated_mb")])
    dev = report.get("device") or {}
    if dev:
        summary.append(["device", f"{dev.get('type', '')} ({dev.get('name', '')}), "
                                  f"{dev.get('torch_threads', '?')} threads"])
    if report.get("status") not in (None, "ok"):
        summary.append(["status", report.get("status")])
    if isinstance(tre, Mapping) and tre.get("landmarks_were_prompts"):
        summary.append(["note", "the landmarks were prompts of the optimisation: TRE is not an independent check"])
    if summary:
        parts.append("<h2>Summary</h2>" + _table(["", "value"], summary))
    warnings = [str(w) for w in (report.get("warnings") or [])]
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in warnings) + "</ul>")

    for fname, heading, caption in figures:
        parts.append(f"<h2>{e(heading)}</h2><figure><img src='{e(fname)}' alt='{e(heading)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")

    # metric tables
    tables = []
    lt = _label_table(metrics, label_names)
    if lt:
        tables.append("<div><h3>Label overlap</h3>" + lt + "</div>")
    if isinstance(jac, Mapping):
        tables.append("<div><h3>Jacobian determinant</h3>" + _jacobian_table(jac) + "</div>")
    if isinstance(tre, Mapping):
        tables.append("<div><h3>Landmarks (TRE)</h3>" + _tre_table(tre) + "</div>")
    known = {"dice_mean", "hd95_mean", "assd_mean", "labels"}
    other = _scalar_rows(metrics, known)
    if other:
        tables.append("<div><h3>Other metrics</h3>" + _table(["metric", "value"], other) + "</div>")
    stages = report.get("stages") or {}
    if stages:
        rows = [[k, v] for k, v in stages.items()] + [["total", report.get("total_seconds")]]
        tables.append("<div><h3>Timings (s)</h3>" + _table(["stage", "seconds"], rows, "labels") + "</div>")
    if tables:
        parts.append("<h2>Metrics</h2><div class='grid2'>" + "".join(tables) + "</div>")

    # run details
    details = []
    if report.get("versions"):
        details.append(_table(["package", "version"], [[k, v] for k, v in report["versions"].items()]))
    if report.get("inputs"):
        rows = []
        flat = []
        for role, ent in report["inputs"].items():
            if isinstance(ent, (list, tuple)):
                flat.extend((f"{role}[{i}]", x) for i, x in enumerate(ent))
            else:
                flat.append((role, ent))
        for role, ent in flat:
            if not isinstance(ent, Mapping):
                rows.append([role, "", "", ""])
                continue
            g = ent.get("grid") or {}
            size = "x".join(str(v) for v in g.get("size", [])) if g else ""
            sp = ", ".join(f"{float(v):g}" for v in g.get("spacing", [])) if g else ""
            rows.append([role, ent.get("path", ""), f"{size} ({sp} mm) {g.get('axcodes', '')}" if g else "",
                         (ent.get("sha256") or "")[:16]])
        details.append(_table(["input", "path", "grid", "sha256 (first 16)"], rows))
    if report.get("outputs"):
        details.append(_table(["outputs"], [[o] for o in report["outputs"]]))
    if report.get("config"):
        details.append("<details><summary>effective configuration</summary><pre>"
                       + e(json.dumps(json_safe(report["config"]), indent=2, allow_nan=False)) + "</pre></details>")
    if details:
        parts.append("<h2>Run</h2>" + "".join(details))
    parts.append("</body></html>\n")
    return "\n".join(parts)
