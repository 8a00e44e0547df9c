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
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from regcli.spaces import Grid, Image

__all__ = ["render_html_report", "PNG_NAMES", "figure_file_names"]

PNG_NAMES = ("slices", "checkerboard", "jacobian", "loss")


def figure_file_names(png_base: str) -> list[str]:
    """Every figure file name :func:`render_html_report` may write for ``png_base`` (no directory), one per
    :data:`PNG_NAMES`; a run writes some of them (no Jacobian without a field, no loss curve without history)."""
    return [f"{png_base}_{name}.png" for name in PNG_NAMES]


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
    """Volumes on the fixed grid, reoriented to LPS for display (arrays (Z, Y, X): z->S, y->P, x->L).

    The reorientation is the axis permutation and flips of ``sitk.DICOMOrient(image, "LPS")``, read once from a
    tiny probe image with the grid's direction and applied as a numpy view: volumes are neither copied nor resampled.
    """

    def __init__(self, grid: Grid) -> None:
        import SimpleITK as sitk

        self.grid = grid
        cosines = np.abs(grid.direction_matrix)
        self.oblique = bool(np.abs(cosines - np.round(cosines)).max() > 1e-3)
        f = sitk.DICOMOrientImageFilter()
        f.SetDesiredCoordinateOrientation("LPS")
        probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        probe.SetDirection(grid.direction)
        f.Execute(probe)
        perm = [int(p) for p in f.GetPermuteOrder()]  # output index axis k (x, y, z) is input axis perm[k]
        flip = [bool(v) for v in f.GetFlipAxes()]  # output index axes (x, y, z) that are reversed
        self._axes = tuple(2 - perm[2 - j] for j in range(3))  # the same in numpy (z, y, x) order
        self._flips = tuple(j for j in range(3) if flip[2 - j])
        self.spacing_zyx: tuple[float, float, float] = tuple(float(grid.spacing[perm[2 - j]]) for j in range(3))
        self.shape = tuple(grid.shape[a] for a in self._axes)  # of the oriented arrays

    def orient(self, arr: np.ndarray) -> np.ndarray:
        """The LPS view (no copy) of a (Z, Y, X) array on the grid, or on a block of it."""
        a = np.transpose(np.asarray(arr), self._axes)
        return np.flip(a, self._flips) if self._flips else a

    def centre(self, shape) -> tuple[int, int, int]:
        return tuple(int(n // 2) for n in shape)

    def slices(self, arr: np.ndarray) -> dict[str, np.ndarray]:
        """``{view: 2D array}``: the slices through the centre of a (Z, Y, X) array on the grid."""
        vol = self.orient(arr)
        centre = self.centre(vol.shape)
        return {view: np.ascontiguousarray(_slice(vol, view, centre)) for view in _VIEWS}

    def resampled_slices(self, image: Image) -> dict[str, np.ndarray]:
        """:meth:`slices` of ``image`` resampled onto the grid by the identity in world space (linear).

        Only the three planes shown are resampled, each as the one-voxel-thick block of the grid that it is. They go
        through an explicit identity transform: the general (``grid_sample``) path computes just their voxels, where
        the separable path for axis-aligned grids would interpolate the whole volume along x and y first; both give
        the same values to float rounding.
        """
        from regcli.resample import warp
        from regcli.transforms import AffineTransform

        identity = AffineTransform.identity()
        centre = self.centre(self.shape)
        out = {}
        for view, (axis, *_) in _VIEWS.items():
            a = self._axes[axis]  # the grid's numpy axis that this view holds fixed
            i = self.shape[axis] - 1 - centre[axis] if axis in self._flips else centre[axis]
            start, size = [0, 0, 0], list(self.grid.size)
            start[2 - a], size[2 - a] = i, 1
            plane = _np(warp(image, identity, self.grid.cropped(start, size), "linear")).astype(np.float32)
            out[view] = np.ascontiguousarray(_slice(self.orient(plane), view, (0, 0, 0)))
        return out


def _slice(vol: np.ndarray, view: str, centre) -> np.ndarray:
    """The view's slice through ``centre``, a view of ``vol`` (``np.take`` copies slowly from strided views)."""
    axis = _VIEWS[view][0]
    index: list[Any] = [slice(None)] * 3
    index[axis] = centre[axis]
    return vol[tuple(index)]


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
def _new_figure(w_in: float, h_in: float, dpi: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w_in, h_in), dpi=dpi)
    fig.patch.set_facecolor("white")
    return fig


def _png(fig) -> bytes:
    """Draw the figure (Agg, at its own dpi) and encode it as an RGB PNG.

    The figure is opaque, so the alpha channel is dropped, and zlib level 3 encodes about twice as fast as the
    default level 6 for files of about the same size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image as PILImage

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])
    buf = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(buf, format="png", compress_level=3)
    return buf.getvalue()


def _coloured(arr2d: np.ndarray, cmap: str, norm) -> np.ndarray:
    """RGBA bytes of a 2D array as ``imshow(arr2d, cmap=cmap, norm=norm)`` colours it (NaN: transparent)."""
    from matplotlib import colormaps

    return colormaps[cmap](norm(np.ma.masked_invalid(arr2d)), bytes=True)


def _label_outlines(lab2d: np.ndarray) -> list[np.ndarray]:
    """Iso-contours (level 0.5) of every non-zero label in a 2D slice, as (col, row) pixel coordinates.

    Each label is traced (contourpy) inside its own bounding box plus one pixel of background, so that every region
    gets a closed contour; the boxes of all labels come from one pass over the slice.
    """
    import contourpy

    lab2d = np.asarray(lab2d)
    if lab2d.ndim != 2 or lab2d.shape[0] < 2 or lab2d.shape[1] < 2 or not lab2d.any():
        return []
    values, inverse = np.unique(lab2d, return_inverse=True)
    inverse = inverse.reshape(lab2d.shape)
    n = len(values)
    rows = np.broadcast_to(np.arange(lab2d.shape[0])[:, None], lab2d.shape)
    cols = np.broadcast_to(np.arange(lab2d.shape[1])[None, :], lab2d.shape)
    r0, c0 = np.full(n, lab2d.shape[0]), np.full(n, lab2d.shape[1])
    r1, c1 = np.full(n, -1), np.full(n, -1)
    np.minimum.at(r0, inverse, rows)
    np.maximum.at(r1, inverse, rows)
    np.minimum.at(c0, inverse, cols)
    np.maximum.at(c1, inverse, cols)
    lines: list[np.ndarray] = []
    for k, lab in enumerate(values):
        if lab == 0:
            continue
        rs, cs = slice(int(r0[k]), int(r1[k]) + 1), slice(int(c0[k]), int(c1[k]) + 1)
        m = np.pad((inverse[rs, cs] == k).astype(np.float64), 1)
        xx = np.arange(cs.start - 1, cs.stop + 1, dtype=np.float64)
        yy = np.arange(rs.start - 1, rs.stop + 1, dtype=np.float64)
        gen = contourpy.contour_generator(xx, yy, m, line_type=contourpy.LineType.Separate)
        lines.extend(seg for seg in gen.lines(0.5) if len(seg) > 1)
    return lines


class _Panels:
    """Image panels drawn on one axes that covers the whole figure, in inches from its lower left corner.

    An axes per panel costs matplotlib tens of milliseconds (ticks, spines, title layout) before anything is drawn.
    Here a panel is one image artist (the slice coloured beforehand, masks painted into it), every label outline of
    one colour in the figure goes into one line collection, and letters and titles are plain texts placed where an
    ``imshow`` axes of the panel's aspect would have them.
    """

    def __init__(self, fig) -> None:
        self.fig = fig
        self.w, self.h = (float(v) for v in fig.get_size_inches())
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        ax.set_autoscale_on(False)
        ax.set_xlim(0.0, self.w)
        ax.set_ylim(0.0, self.h)
        self.ax = ax
        self._lines: dict[tuple[str, float], list[np.ndarray]] = {}

    def box(self, cell, shape, aspect: float) -> tuple[float, float, float, float]:
        """``(x0, y0, w, h)`` in inches of an image of ``shape`` and pixel ``aspect`` (height / width) in a grid
        cell: as large as fits, centred, like an axes with that aspect and ``adjustable="box"``."""
        pos = cell.get_position(self.fig)
        cx, cy, cw, ch = pos.x0 * self.w, pos.y0 * self.h, pos.width * self.w, pos.height * self.h
        ratio = shape[0] * aspect / shape[1]
        w, h = (cw, cw * ratio) if ch / cw > ratio else (ch / ratio, ch)
        return cx + (cw - w) / 2, cy + (ch - h) / 2, w, h

    def image(self, box, rgba: np.ndarray, view: str) -> None:
        x0, y0, w, h = box
        self.ax.imshow(rgba, origin=_VIEWS[view][2], extent=(x0, x0 + w, y0, y0 + h), aspect="auto",
                       interpolation="nearest")

    def outline(self, box, shape, view: str, lines: list[np.ndarray], colour: str, lw: float) -> None:
        """Lines in (col, row) pixel coordinates of a ``shape`` image shown in ``box``."""
        if not lines:
            return
        x0, y0, w, h = box
        pts = np.concatenate(lines)
        sx, sy = w / shape[1], h / shape[0]
        x = x0 + (pts[:, 0] + 0.5) * sx
        y = y0 + h - (pts[:, 1] + 0.5) * sy if _VIEWS[view][2] == "upper" else y0 + (pts[:, 1] + 0.5) * sy
        ends = np.cumsum([len(seg) for seg in lines])[:-1]
        self._lines.setdefault((colour, lw), []).extend(np.split(np.column_stack((x, y)), ends))

    def letters(self, box, view: str) -> None:
        x0, y0, w, h = box
        left, right, top, bottom = _VIEWS[view][3]
        style = dict(color="white", fontsize=11, fontweight="bold",
                     bbox=dict(boxstyle="round,pad=0.15", fc="black", ec="none", alpha=0.55))
        self.ax.text(x0 + 0.02 * w, y0 + 0.5 * h, left, ha="left", va="center", **style)
        self.ax.text(x0 + 0.98 * w, y0 + 0.5 * h, right, ha="right", va="center", **style)
        self.ax.text(x0 + 0.5 * w, y0 + 0.98 * h, top, ha="center", va="top", **style)
        self.ax.text(x0 + 0.5 * w, y0 + 0.02 * h, bottom, ha="center", va="bottom", **style)

    def title(self, box, text: str) -> None:
        """Above the panel, as ``ax.set_title`` (6 pt pad)."""
        x0, y0, w, h = box
        self.ax.text(x0 + 0.5 * w, y0 + h + 6.0 / 72.0, text, ha="center", va="baseline", fontsize=11)

    def row_label(self, box, text: str) -> None:
        """Left of the panel, as ``ax.set_ylabel`` of an axes without ticks (4 pt pad)."""
        x0, y0, w, h = box
        self.ax.text(x0 - 4.0 / 72.0, y0 + 0.5 * h, text, rotation=90, rotation_mode="anchor", ha="center",
                     va="bottom", fontsize=11)

    def finish(self) -> None:
        from matplotlib.collections import LineCollection

        for (colour, lw), lines in self._lines.items():
            self.ax.add_collection(LineCollection(lines, colors=[colour], linewidths=lw, antialiaseds=True),
                                   autolim=False)


# ----------------------------------------------------------------------------- figures
def _fig_slices(disp: _Display, rows: list[tuple[str, dict, tuple[float, float], list]], dpi: int) -> bytes:
    """rows: (title, {view: slice}, window, [({view: label slice}, colour), ...])."""
    from matplotlib.colors import Normalize

    ncol = 3
    fig = _new_figure(3.3 * ncol, 3.2 * len(rows) + 0.5, dpi)
    gs = fig.add_gridspec(len(rows), ncol, left=0.06, right=0.99, top=0.95, bottom=0.06, wspace=0.04, hspace=0.08)
    pan = _Panels(fig)
    outlines: dict[tuple[int, str], tuple[list, float]] = {}  # one tracing per label map and view, for every row
    for r, (title, sl, (lo, hi), overlays) in enumerate(rows):
        for c, view in enumerate(_VIEWS):
            s = sl[view]
            box = pan.box(gs[r, c], s.shape, _aspect(view, disp.spacing_zyx))
            pan.image(box, _coloured(s, "gray", Normalize(lo, hi)), view)
            for lab, colour in overlays:
                key = (id(lab), view)
                if key not in outlines:
                    lab2d = lab[view]
                    outlines[key] = (_label_outlines(lab2d), 1.0 if len(np.unique(lab2d)) <= 9 else 0.6)
                pan.outline(box, s.shape, view, outlines[key][0], colour, outlines[key][1])
            pan.letters(box, view)
            if r == 0:
                pan.title(box, view)
            if c == 0:
                pan.row_label(box, title)
    pan.finish()
    if any(ov for *_, ov in rows):
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=_FIXED_COLOUR, lw=2, label="fixed labels")]
        if any(colour == _WARPED_COLOUR for *_, ov in rows for _, colour in ov):
            handles.append(Line2D([], [], color=_WARPED_COLOUR, lw=2, label="warped labels"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=10)
    return _png(fig)


def _checker(a2: np.ndarray, b2: np.ndarray, view: str, spacing_zyx, tile_mm: float) -> np.ndarray:
    r_ax, c_ax = _VIEWS[view][1]
    rr = (np.arange(a2.shape[0]) * spacing_zyx[r_ax] // tile_mm).astype(int)
    cc = (np.arange(a2.shape[1]) * spacing_zyx[c_ax] // tile_mm).astype(int)
    sel = ((rr[:, None] + cc[None, :]) % 2).astype(bool)
    return np.where(sel, b2, a2)


def _fig_checkerboard(disp: _Display, fixed: dict, others: list[tuple[str, dict]], wf, wm, dpi: int) -> bytes:
    """Checkerboards of the fixed image's slices against those of each of ``others`` (both scaled to [0, 1] by
    their windows)."""
    from matplotlib.colors import Normalize

    ext = [n * s for n, s in zip(disp.shape, disp.spacing_zyx)]
    tile = max(max(ext) / 8.0, 1e-6)
    fig = _new_figure(3.3 * 3, 3.2 * len(others) + 0.3, dpi)
    gs = fig.add_gridspec(len(others), 3, left=0.06, right=0.99, top=0.93, bottom=0.02, wspace=0.04, hspace=0.08)
    pan = _Panels(fig)
    for r, (title, sl) in enumerate(others):
        for c, view in enumerate(_VIEWS):
            fn = np.clip((fixed[view] - wf[0]) / (wf[1] - wf[0]), 0, 1)
            vn = np.clip((sl[view] - wm[0]) / (wm[1] - wm[0]), 0, 1)
            cb = _checker(fn, vn, view, disp.spacing_zyx, tile)
            box = pan.box(gs[r, c], cb.shape, _aspect(view, disp.spacing_zyx))
            pan.image(box, _coloured(cb, "gray", Normalize(0.0, 1.0)), view)
            pan.letters(box, view)
            if r == 0:
                pan.title(box, view)
            if c == 0:
                pan.row_label(box, title)
    return _png(fig)


def _log_ticks(v: float, _pos=None) -> str:
    """``10`` and a superscript exponent in plain text: the default labels of a log axis are mathtext, whose parser
    costs about 0.3 s to build on first use."""
    if v <= 0 or not math.isfinite(v):
        return ""
    e = math.log10(v)
    if abs(e - round(e)) > 1e-9:
        return ""
    return "10" + str(int(round(e))).translate(str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074"
                                                                         "\u2075\u2076\u2077\u2078\u2079"))


def _fig_jacobian(disp: _Display, det: dict, det_raw: np.ndarray, labels: Optional[dict], dpi: int) -> bytes:
    """det: ``{view: det J slice}``; det_raw: the whole det J volume (histogram, colour range); labels:
    ``{view: label slice}`` whose outline is drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm, to_rgba
    from matplotlib.ticker import FuncFormatter

    ok = np.isfinite(det_raw)
    finite = det_raw.ravel() if ok.all() else det_raw[ok]
    p_lo, p_hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (1.0, 1.0))
    span = float(min(max(abs(1.0 - p_lo), abs(p_hi - 1.0), 0.05), 1.0))
    norm = TwoSlopeNorm(vmin=1.0 - span, vcenter=1.0, vmax=1.0 + span)
    fig = _new_figure(14.0, 3.7, dpi)
    gs = fig.add_gridspec(1, 6, width_ratios=[1, 1, 1, 0.05, 0.32, 1.3], wspace=0.08, left=0.01, right=0.99,
                          top=0.88, bottom=0.15)
    pan = _Panels(fig)
    fold = np.round(np.asarray(to_rgba(_FOLD_COLOUR)) * 255).astype(np.uint8)
    for c, view in enumerate(_VIEWS):
        s = det[view]
        rgba = _coloured(s, "RdBu_r", norm)
        rgba[s <= 0] = fold
        box = pan.box(gs[0, c], s.shape, _aspect(view, disp.spacing_zyx))
        pan.image(box, rgba, view)
        if labels is not None:
            pan.outline(box, s.shape, view, _label_outlines((labels[view] != 0).astype(np.int32)), "0.35", 0.7)
        pan.letters(box, view)
        pan.title(box, view)
    pan.finish()
    cax = fig.add_subplot(gs[0, 3])
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap="RdBu_r"), cax=cax, extend="both")
    cb.set_label("det J (1 = volume kept)", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    ax = fig.add_subplot(gs[0, 5])
    n_bad = int(np.count_nonzero(finite <= 0))
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.05, hi + 0.05
        # one filled step outline: the same pixels as hist's 120 bar patches, at a fraction of their cost
        counts, edges = np.histogram(finite, bins=120, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color="#4a78b5", baseline=0)
        ax.set_yscale("log", nonpositive="clip")
        ax.yaxis.set_major_formatter(FuncFormatter(_log_ticks))
        if lo <= 0 <= hi:
            ax.axvline(0.0, color="#d62728", lw=1.2, ls="--")
        ax.axvline(1.0, color="0.3", lw=1.0, ls=":")
    pct = 100.0 * n_bad / max(finite.size, 1)
    ax.set_title(f"det J \u2264 0: {n_bad} voxels ({pct:.3g}%)", fontsize=10, y=1.0,
                 color="#d62728" if n_bad else "black")  # a set position skips the title-vs-ticklabel layout
    ax.set_xlabel("det J")
    ax.set_ylabel("voxels (log)")
    _light_ticks([ax], FigureCanvasAgg(fig).get_renderer(), grid=False)
    return _png(fig)


#: bookkeeping columns of a stage's history, not terms of its objective: not plotted
_SKIP_HISTORY_KEYS = {"iteration", "iter", "step", "level", "stage", "time", "seconds", "lr", "round", "candidate"}


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
        if pts and (k == "loss" or max(p[1] for p in pts) > min(p[1] for p in pts)):  # a constant term says nothing
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


def _thin(xs: list, ys: list, n: int = 2000) -> tuple[list, list]:
    """A long series cut to at most ``2 n + 2`` points for plotting: its ends and the lowest and the highest point of
    each of ``n`` runs of consecutive points (in their order), so that the drawn envelope, spikes included, stays."""
    if len(ys) <= 2 * n:
        return xs, ys
    y = np.asarray(ys, dtype=np.float64)
    edges = np.linspace(0, len(y), n + 1).astype(int)
    keep = {0, len(y) - 1}  # the ends too: the x range stays the same
    for a, b in zip(edges[:-1], edges[1:]):
        keep.update((a + int(np.argmin(y[a:b])), a + int(np.argmax(y[a:b]))))
    return [xs[k] for k in sorted(keep)], [ys[k] for k in sorted(keep)]


def _light_ticks(axes: list, renderer, grid: bool = True) -> None:
    """Ticks, tick labels, grid lines and axis labels of axes (bottom and left) as a few plain artists.

    matplotlib builds a Tick (five artists with their own transforms and fonts) per tick at every draw: most of the
    time of a figure of many small plots. The positions and texts here are the axes' own (their locators and
    formatters, major and minor, on their final limits), drawn with the rcParams sizes, so the picture stays the
    same; the axes' own ticks are then switched off. Call it when the data, the limits and the layout are final.
    """
    from matplotlib import rcParams
    from matplotlib.lines import TICKDOWN, TICKLEFT, TICKRIGHT, TICKUP, Line2D
    from matplotlib.ticker import NullLocator
    from matplotlib.transforms import ScaledTranslation

    if not axes:
        return
    fig = axes[0].get_figure()
    px_per_pt = fig.dpi / 72.0
    markers = {"x": {"out": TICKDOWN, "in": TICKUP, "inout": "|"},
               "y": {"out": TICKLEFT, "in": TICKRIGHT, "inout": "_"}}
    outside = {"out": 1.0, "in": 0.0, "inout": 0.5}  # of a tick's length, between the spine and its label

    def shifted(tr, dx_pt: float, dy_pt: float):
        return tr + ScaledTranslation(dx_pt / 72.0, dy_pt / 72.0, fig.dpi_scale_trans)

    def ticks(axis, which: str) -> list[tuple[float, str]]:
        lo, hi = sorted(axis.get_view_interval())
        ticker = axis.major if which == "major" else axis.minor
        locs = list(axis.get_majorticklocs() if which == "major" else axis.get_minorticklocs())
        labels = ticker.formatter.format_ticks(locs)  # on every location of the locator, as Axis.draw does
        eps = 1e-10 * (hi - lo)
        return [(v, t) for v, t in zip(locs, labels) if lo - eps <= v <= hi + eps]

    for ax in axes:  # freeze the autoscaled limits (shared axes included)
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
    plan = [(ax, axis, name, ticks(axis, "major"), axis.major.formatter.get_offset(), ticks(axis, "minor"))
            for ax in axes for axis, name in ((ax.xaxis, "x"), (ax.yaxis, "y"))]
    for ax, axis, name, major, offset, minor in plan:
        x = name == "x"
        tr = ax.get_xaxis_transform() if x else ax.get_yaxis_transform()
        colour = rcParams[f"{name}tick.color"]
        label_colour = rcParams[f"{name}tick.labelcolor"]
        label_colour = colour if label_colour == "inherit" else label_colour
        style = dict(fontsize=rcParams[f"{name}tick.labelsize"], color=label_colour, clip_on=False)
        direction = rcParams[f"{name}tick.direction"]
        if grid and major:
            vals = np.array([v for v, _ in major], dtype=np.float64)
            along = np.repeat(vals, 3)
            along[2::3] = np.nan
            across = np.tile([0.0, 1.0, np.nan], len(vals))
            ax.add_artist(Line2D(*((along, across) if x else (across, along)), transform=tr,
                                 color=rcParams["grid.color"], linewidth=rcParams["grid.linewidth"],
                                 linestyle=rcParams["grid.linestyle"], alpha=0.3, zorder=1.5))
        depth = 0.0  # from the spine to the far side of the tick labels, in points: the axis label goes beyond
        for which, found in (("major", major), ("minor", minor)):
            if not found:
                continue
            length, width = rcParams[f"{name}tick.{which}.size"], rcParams[f"{name}tick.{which}.width"]
            dist = outside[direction] * length + rcParams[f"{name}tick.{which}.pad"]
            vals = np.array([v for v, _ in found], dtype=np.float64)
            zeros = np.zeros(len(vals))
            ax.add_artist(Line2D(*((vals, zeros) if x else (zeros, vals)), transform=tr, linestyle="none",
                                 marker=markers[name][direction], markersize=length, markeredgewidth=width,
                                 color=colour, clip_on=False, zorder=1.5))
            if x:
                texts = [ax.text(v, 0.0, t, transform=shifted(tr, 0.0, -dist), ha="center", va="top", **style)
                         for v, t in found if t]
                ext = [e.get_window_extent(renderer).height for e in texts]
            else:
                texts = [ax.text(0.0, v, t, transform=shifted(tr, -dist, 0.0), ha="right", va="center_baseline",
                                 **style) for v, t in found if t]
                ext = [e.get_window_extent(renderer).width for e in texts]
            depth = max([depth] + [dist + e / px_per_pt for e in ext])
        if x:
            if offset:
                ax.text(1.0, 0.0, offset, transform=shifted(ax.transAxes, 0.0, -(depth + 3.0)), ha="right",
                        va="top", **style)
            axis.set_label_coords(0.5, 0.0, transform=shifted(ax.transAxes, 0.0, -(depth + axis.labelpad)))
        else:
            if offset:
                ax.text(0.0, 1.0, offset, transform=shifted(ax.transAxes, 0.0, 3.0), ha="left", va="baseline",
                        **style)
            axis.set_label_coords(0.0, 0.5, transform=shifted(ax.transAxes, -(depth + axis.labelpad), 0.0))
    for ax, axis, *_ in plan:
        axis.set_major_locator(NullLocator())
        axis.set_minor_locator(NullLocator())
        axis.offsetText.set_visible(False)  # drawn above; with a NullLocator the formatter is not asked again


def _fig_loss(history: Mapping[str, list], dpi: int) -> Optional[bytes]:
    """One column per stage (a pyramid's levels and a set of candidates joined: :func:`_joined_levels`): the loss
    on top, the other logged terms (each min-max scaled) below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    stages = [(str(k), _history_series(list(v))) for k, v in _joined_levels(history).items()
              if isinstance(v, (list, tuple)) and len(v) > 0]
    stages = [(k, h) for k, h in stages if h[1]]
    if not stages:
        return None
    ncol = min(len(stages), 4)
    groups = int(math.ceil(len(stages) / ncol))
    extra = any(len(h[1]) > 1 or "loss" not in h[1] for _, h in stages)
    per = 2 if extra else 1
    fig = _new_figure(4.2 * ncol, (2.9 + (1.9 if extra else 0.0)) * groups, dpi)
    gs = fig.add_gridspec(groups * per, ncol, height_ratios=([1.5, 1.0] if extra else [1.0]) * groups)
    axes = []
    for i, (name, (x, series, levels)) in enumerate(stages):
        g, c = divmod(i, ncol)
        ax = fig.add_subplot(gs[g * per, c])
        axes.append(ax)
        main = "loss" if "loss" in series else next(iter(series))
        ax.plot(*_thin(*series[main]), lw=1.8, color="#1f5fa8")
        ax.set_title(name, fontsize=11, y=1.0)  # a set position skips the title-vs-ticklabel layout pass
        ax.set_ylabel(main)
        level_x = [x[j] for j in range(1, len(levels)) if levels[j] is not None and levels[j] != levels[j - 1]]
        for lx in level_x:
            ax.axvline(lx, color="0.55", lw=0.8, ls=":")
        others = [k for k in series if k != main]
        if not others:
            ax.set_xlabel("iteration")
        if extra and others:
            ax2 = fig.add_subplot(gs[g * per + 1, c], sharex=ax)
            axes.append(ax2)
            for k in others:
                xs, ys = series[k]
                lo, hi = min(ys), max(ys)
                scaled = [(y - lo) / (hi - lo) if hi > lo else 0.5 for y in ys]
                ax2.plot(*_thin(xs, scaled), lw=1.2, label=f"{k} [{lo:.3g}, {hi:.3g}]")
            for lx in level_x:
                ax2.axvline(lx, color="0.55", lw=0.8, ls=":")
            ax2.set_ylim(-0.05, 1.05)
            ax2.set_ylabel("scaled terms", fontsize=9)
            ax2.legend(fontsize=7.5, loc="upper right")
            ax2.set_xlabel("iteration")
    # fixed margins: tight_layout measured every tick label of ~20 axes (0.9 s of a 5 s report)
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.07, right=0.985, top=1 - 0.35 / h, bottom=0.55 / h, hspace=0.55, wspace=0.28)
    _light_ticks(axes, FigureCanvasAgg(fig).get_renderer())
    return _png(fig)


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
    lost = {int(v) for v in metrics.get("hd95_labels_lost") or ()}
    for lab in labels:
        r: list[Any] = [lab] + ([names.get(lab, "")] if names else []) + [dice.get(lab)]
        if hd:
            r.append("lost by warping" if lab in lost else hd.get(lab))
        if assd:
            r.append("lost by warping" if lab in lost else assd.get(lab))
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


#: the column of the ``in_mask`` block by ``in_mask_source`` (:func:`regcli.reports.jacobian.jacobian_region`)
_MASK_COLUMNS = {"fixed_mask": "in fixed mask", "fixed_labels": "in fixed labels"}


def _jacobian_table(stats: Mapping) -> str:
    keys = [k for k, v in stats.items() if not isinstance(v, Mapping) and k != "in_mask_source"]
    blocks = [("whole grid", stats)] + [(k, v) for k, v in stats.items() if isinstance(v, Mapping)]
    source = stats.get("in_mask_source")
    header = ["statistic"] + [_MASK_COLUMNS.get(source, "in mask") if b[0] == "in_mask" else b[0].replace("_", " ")
                              for b in blocks]
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
    """The figures are written beside the page under ``png_base + "_<name>.png"``: any file name, but a name (a
    programming error otherwise). Spaces, quotes, ``&``, ``#``, ``%`` and the like are fine: the page
    percent-encodes the names in links (:func:`_href`)."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if not isinstance(png_base, str) or not png_base or any(c in png_base for c in seps) or "\0" in png_base:
        raise ValueError(f"png_base must be a file-name stem (no directory), got {png_base!r}")


def _href(file_name: str) -> str:
    """A file name beside the page as a relative link for an HTML attribute: percent-encoded (UTF-8), so that a
    space, ``#``, ``?``, ``%`` or ``:`` is a character of the name and not a URL fragment, query, escape or
    scheme."""
    from urllib.parse import quote

    return _html.escape(quote(file_name, safe=""), quote=True)


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
        fname = figure_file_names(png_base)[PNG_NAMES.index(name)]
        pngs[fname] = data
        figures.append((fname, heading, caption))

    # only the three centre slices of each volume are drawn: they are cut from (copy-free) LPS views
    fxv = _np(fixed).astype(np.float32, copy=False)
    wf = _window(disp.orient(fxv))
    fx = disp.slices(fxv)
    mv = disp.resampled_slices(moving) if moving is not None else None
    wp = disp.slices(_np(warped).astype(np.float32, copy=False)) if warped is not None else None
    src = (_np(moving).astype(np.float32, copy=False) if moving is not None
           else (_np(warped) if warped is not None else None))
    wm = _window(src) if src is not None else wf
    fl = disp.slices(_np(fixed_labels)) if fixed_labels is not None else None
    wl = disp.slices(_np(warped_labels)) if warped_labels is not None else None

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
        det_raw = _np(jacobian).astype(np.float32, copy=False)
        if det_raw.shape != grid.shape:
            raise ValueError(f"Jacobian shape {det_raw.shape} differs from the fixed grid {grid.shape}")
        add("jacobian", _fig_jacobian(disp, disp.slices(det_raw), det_raw, fl, dpi), "Jacobian determinant",
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
        lost = [int(v) for v in metrics.get("hd95_labels_lost") or ()]
        if lost:  # HD95 is over fewer labels than Dice: say so where the means are
            n = len(metrics.get("hd95_per_label") or metrics.get("labels") or ())
            summary.append([f"mean HD95 (mm), over {n - len(lost)} of {n} labels", metrics.get("hd95_mean")])
            summary.append(["labels left out of mean HD95", f"{', '.join(map(str, lost))}: empty after warping, "
                            "so no surface distance (their Dice, 0, counts in mean Dice)"])
        else:
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
        parts.append(f"<h2>{e(heading)}</h2><figure><img src='{_href(fname)}' alt='{e(heading)}'>"
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
