"""Overlap and surface-distance metrics between label maps: Dice, HD95, ASSD.

Definitions follow the independent scorer the project is benchmarked with (``shared/bench/metrics.py``):

* **Dice** of label ``l``: ``2 |A∩B| / (|A| + |B|)`` with ``A = fixed == l``, ``B = warped == l``.
* **Surface** of a binary mask: the mask minus its 6-connected erosion, the outside of the array counting
  as background (so mask voxels on the array border are surface voxels).
* **HD95**: the 95th percentile (linear interpolation, ``numpy.percentile``) of the *pooled* distances
  from every surface voxel of ``A`` to the nearest surface voxel of ``B`` and from every surface voxel of
  ``B`` to the nearest one of ``A`` (medpy/MONAI "hd95"), in mm.
* **ASSD**: the mean of the same pooled distances, in mm.

A surface distance is undefined for a label that is empty in either map (medpy and MONAI): it is NaN for that
label, and ``hd95_mean``/``assd_mean`` are over the labels present in both the fixed and the warped map. Dice of
the same label is 0, and counts in ``dice_mean``: :func:`label_overlap_metrics` lists the labels left out of the
surface means (``hd95_labels_lost``) and :func:`labels_lost_warning` says so in one line.

Distances are Euclidean in physical units: voxel index differences scaled by the grid spacing (anisotropic
grids are handled; the direction matrix is orthonormal, so it does not change distances).

Speed: the surfaces of *all* labels are found in one vectorised pass (a voxel is on the surface of its
label when a 6-neighbour has another label, or it lies on the array border), then for each label the
nearest-surface distances are exact nearest-neighbour queries in a k-d tree (``scipy.spatial.cKDTree``)
of the other surface's points. Only surface voxels are touched, so this is far cheaper than two distance
transforms per label over the whole (or a cropped) volume, and gives the same distances as
``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` (both are exact Euclidean).
"""

from __future__ import annotations

from typing import Iterable, Optional

import logging
import math

import numpy as np
import torch

from regcli.errors import GeometryError
from regcli.spaces import Image

__all__ = [
    "dice_per_label",
    "dice_mean",
    "surface_distances",
    "surface_distances_per_label",
    "hd95_per_label",
    "assd_per_label",
    "surface_metrics",
    "nanmean",
    "label_overlap_metrics",
    "label_values",
    "shared_labels",
    "surface_mean",
    "labels_lost_warning",
]


#: radius (voxels of the coarsest axis) of the first, bounded nearest-surface query (:func:`_nearest_distances`)
NEAR_VOXELS = 4.0


# ----------------------------------------------------------------------------- helpers
def _labels_array(img: Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """(Z, Y, X) integer numpy array of a label image (floats are rounded)."""
    data = img.data if isinstance(img, Image) else img
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim != 3:
        raise GeometryError(f"a label map must be 3D (Z, Y, X), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr).astype(np.int64)
    return arr


def _check_same_grid(fixed: Image | np.ndarray, warped: Image | np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise GeometryError(f"label maps have different shapes: fixed {a.shape}, warped {b.shape}")
    if isinstance(fixed, Image) and isinstance(warped, Image) and not fixed.grid.allclose(warped.grid):
        raise GeometryError(
            f"label maps are not on the same grid: fixed '{fixed.name}' ({fixed.grid.describe()}) vs "
            f"warped '{warped.name}' ({warped.grid.describe()}); resample the warped labels onto the fixed grid"
        )


def _spacing_zyx(img: Image | np.ndarray, spacing: Optional[Iterable[float]]) -> np.ndarray:
    """Voxel size (3,) in mm in array order (Z, Y, X)."""
    if spacing is not None:
        sp = np.asarray(list(spacing), dtype=np.float64)
        if sp.shape != (3,):
            raise ValueError(f"spacing must have 3 values (x, y, z), got {sp}")
        return sp[::-1].copy()
    if isinstance(img, Image):
        return np.asarray(img.grid.spacing, dtype=np.float64)[::-1].copy()
    return np.ones(3)


def _histogram(arr: np.ndarray) -> dict[int, int]:
    """``{label: voxel count}`` of the labels present (bincount for small non-negative labels, else unique)."""
    if arr.size == 0:
        return {}
    lo, hi = int(arr.min()), int(arr.max())
    if lo >= 0 and hi < (1 << 20):
        counts = np.bincount(arr.ravel(), minlength=hi + 1)
        nz = np.flatnonzero(counts)
        return dict(zip(nz.tolist(), counts[nz].tolist()))
    uniq, counts = np.unique(arr, return_counts=True)
    return dict(zip(uniq.tolist(), counts.tolist()))


def label_values(labels: Image | np.ndarray | torch.Tensor) -> set[int]:
    """The values present in a label map (0 included), by counting rather than sorting (3x faster than
    ``torch.unique`` on a 1 mm brain)."""
    return set(_histogram(_labels_array(labels)))


def shared_labels(a: Image | np.ndarray | torch.Tensor, b: Image | np.ndarray | torch.Tensor) -> list[int]:
    """Labels != 0 present in both maps, ascending (what Dice and HD95 are scored over by default)."""
    return common_labels(label_values(a), label_values(b))


def common_labels(a_values: set[int], b_values: set[int]) -> list[int]:
    """:func:`shared_labels` from the two maps' values (:func:`label_values`) when they are already counted."""
    return sorted((a_values & b_values) - {0})


def nanmean(values: Iterable[float]) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    v = np.asarray([x for x in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def surface_mean(per_label: dict[int, float]) -> tuple[float, list[int]]:
    """Mean of a per-label surface distance (HD95, ASSD) and the labels it leaves out.

    Args:
        per_label: ``{label: mm}`` from :func:`surface_metrics`; NaN (or None) for a label empty in the fixed or
            the warped map, where the distance is undefined.

    Returns:
        ``(mean, lost)``: the mean over the labels with a distance (mm; NaN when none has one) and the labels
        without one, ascending (their Dice is 0 and counts in ``dice_mean``).
    """
    lost = sorted(int(k) for k, v in per_label.items() if v is None or not math.isfinite(float(v)))
    return nanmean(v for v in per_label.values() if v is not None), lost


def labels_lost_warning(lost: list[int], n_labels: int, where: str = "") -> Optional[str]:
    """Log (on the ``regcli`` logger, so stderr and ``report["warnings"]``) and return the line that says which
    labels HD95 leaves out (:func:`surface_mean`), for labels that the fixed map holds (as ``register`` and
    ``evaluate`` score them: ``lost`` are then the labels that warping lost); None when none is left out.
    ``where``: a prefix such as ``"pair 'p1'"``."""
    if not lost:
        return None
    shown = ", ".join(map(str, lost[:8])) + (", ..." if len(lost) > 8 else "")
    message = (f"{where + ': ' if where else ''}HD95 is over {n_labels - len(lost)} of the {n_labels} labels: "
               f"label(s) {shown} are not in the warped labels (lost by warping), so they have no surface distance "
               f"(hd95_labels_lost); Dice counts them as 0")
    logging.getLogger("regcli").warning(message)
    return message


def _label_counts(arr: np.ndarray, labels: list[int]) -> np.ndarray:
    """Voxel count of each label in ``arr`` (int64 (L,))."""
    lookup = _histogram(arr) if labels else {}
    return np.asarray([lookup.get(int(lab), 0) for lab in labels], dtype=np.int64)


# ----------------------------------------------------------------------------- Dice
def dice_per_label(
    fixed_labels: Image | np.ndarray,
    warped_labels: Image | np.ndarray,
    labels: Optional[list[int]] = None,
) -> dict[int, float]:
    """Dice overlap per label.

    Args:
        fixed_labels: integer label map (Z, Y, X) on the fixed grid.
        warped_labels: integer label map (Z, Y, X) on the same grid (moving labels warped to fixed).
        labels: labels to score; default = labels != 0 present in *both* maps. A requested label absent
            from one map scores 0; absent from both, NaN.

    Returns:
        ``{label: dice}`` in ascending label order (unitless, in [0, 1]).

    Raises:
        GeometryError: the maps are not on the same grid.
    """
    a, b = _labels_array(fixed_labels), _labels_array(warped_labels)
    _check_same_grid(fixed_labels, warped_labels, a, b)
    labs = shared_labels(a, b) if labels is None else sorted({int(v) for v in labels})
    na, nb = _label_counts(a, labs), _label_counts(b, labs)
    same = a[a == b]
    ni = _label_counts(same, labs)
    out = {}
    for lab, ca, cb, ci in zip(labs, na, nb, ni):
        s = int(ca) + int(cb)
        out[int(lab)] = float(2.0 * ci / s) if s > 0 else float("nan")
    return out


def dice_mean(
    fixed_labels: Image | np.ndarray,
    warped_labels: Image | np.ndarray,
    labels: Optional[list[int]] = None,
) -> float:
    """Mean of :func:`dice_per_label` over labels (NaN entries ignored; NaN if none)."""
    return nanmean(dice_per_label(fixed_labels, warped_labels, labels).values())


# ----------------------------------------------------------------------------- surfaces
def _boundary(arr: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: voxel whose 6-neighbourhood leaves its label (or the array).

    For a label ``l`` this is exactly ``mask & ~binary_erosion(mask, 6-connected, border_value=0)`` with
    ``mask = arr == l``, evaluated for every label at once.
    """
    edge = np.zeros(arr.shape, dtype=bool)
    for ax in range(3):
        n = arr.shape[ax]
        if n < 2:
            edge[:] = True  # every voxel touches the border along a size-1 axis
            return edge
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax] = slice(0, n - 1)
        hi[ax] = slice(1, n)
        diff = arr[tuple(lo)] != arr[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
        first = [slice(None)] * 3
        last = [slice(None)] * 3
        first[ax] = 0
        last[ax] = n - 1
        edge[tuple(first)] = True
        edge[tuple(last)] = True
    return edge


def _surface_points(arr: np.ndarray, labels: list[int]) -> dict[int, np.ndarray]:
    """Flat (ravelled, ascending) indices into ``arr`` of each label's surface voxels, int64 (N,)."""
    edge = _boundary(arr)
    flat = np.flatnonzero(edge)
    lab_at = arr.ravel()[flat]
    wanted = np.isin(lab_at, np.asarray(labels, dtype=lab_at.dtype))
    flat, lab_at = flat[wanted], lab_at[wanted]
    order = np.argsort(lab_at, kind="stable")
    flat, lab_at = flat[order], lab_at[order]
    uniq, starts = np.unique(lab_at, return_index=True)
    bounds = list(starts) + [lab_at.size]
    return {int(lab): flat[bounds[i]:bounds[i + 1]] for i, lab in enumerate(uniq.tolist())}


def _positions(flat: np.ndarray, shape: tuple, spacing_zyx: np.ndarray) -> np.ndarray:
    """Physical positions (N, 3) float64 mm, in index-aligned axes (Z, Y, X), of flat voxel indices."""
    zyx = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.float64)
    return zyx * spacing_zyx[None, :]


def _nearest_distances(src: np.ndarray, dst: np.ndarray, shape: tuple, spacing_zyx: np.ndarray,
                       workers: int) -> np.ndarray:
    """Distance (N,) float64 mm from each voxel of ``src`` to the nearest voxel of ``dst``.

    ``src`` and ``dst`` are sorted flat voxel indices. Voxels that belong to both sets are at distance 0
    and skip the k-d tree (after a good registration that is a large share of each surface). The others are
    queried first within ``NEAR_VOXELS`` voxels, which prunes most of the tree's search (most surface voxels
    lie a voxel or two from the other surface; 2x faster on a brain), and only the voxels with nothing that
    near are queried again without a bound: the distances are exact either way.
    """
    from scipy.spatial import cKDTree

    out = np.zeros(src.size, dtype=np.float64)
    todo = ~np.isin(src, dst, assume_unique=True)
    if todo.any():
        tree = cKDTree(_positions(dst, shape, spacing_zyx), balanced_tree=False, compact_nodes=False)
        query = _positions(src[todo], shape, spacing_zyx)
        d, _ = tree.query(query, k=1, workers=workers, distance_upper_bound=NEAR_VOXELS * float(spacing_zyx.max()))
        far = ~np.isfinite(d)
        if far.any():
            d[far], _ = tree.query(query[far], k=1, workers=workers)
        out[todo] = d
    return out


def surface_distances(
    fixed_mask: np.ndarray | torch.Tensor,
    warped_mask: np.ndarray | torch.Tensor,
    spacing: Iterable[float] = (1.0, 1.0, 1.0),
    workers: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """Surface-to-surface distances between two binary masks, both directions.

    Args:
        fixed_mask: (Z, Y, X) bool mask ``A``.
        warped_mask: (Z, Y, X) bool mask ``B`` on the same grid.
        spacing: voxel size in mm in ITK order (x, y, z) (``Grid.spacing``).
        workers: threads for the k-d tree queries (-1 = all cores).

    Returns:
        ``(d_ab, d_ba)``: float64 arrays in mm; ``d_ab[i]`` is the distance from the i-th surface voxel of
        ``A`` to the nearest surface voxel of ``B``, and vice versa. Both empty if either mask is empty.
    """
    a = _labels_array(fixed_mask).astype(bool)
    b = _labels_array(warped_mask).astype(bool)
    if a.shape != b.shape:
        raise GeometryError(f"masks have different shapes: {a.shape} vs {b.shape}")
    if not a.any() or not b.any():
        return np.zeros(0), np.zeros(0)
    sp = _spacing_zyx(a, spacing)
    pa = _surface_points(a.astype(np.uint8), [1])[1]
    pb = _surface_points(b.astype(np.uint8), [1])[1]
    return _nearest_distances(pa, pb, a.shape, sp, workers), _nearest_distances(pb, pa, a.shape, sp, workers)


def surface_distances_per_label(
    fixed_labels: Image | np.ndarray,
    warped_labels: Image | np.ndarray,
    labels: Optional[list[int]] = None,
    spacing: Optional[Iterable[float]] = None,
    workers: int = -1,
) -> dict[int, Optional[tuple[np.ndarray, np.ndarray]]]:
    """:func:`surface_distances` for every label in one pass.

    Args:
        fixed_labels, warped_labels: integer label maps (Z, Y, X) on the same grid.
        labels: labels to evaluate (default: != 0 and present in both maps).
        spacing: voxel size (x, y, z) mm; default = the fixed image's grid spacing (1 mm for arrays).

    Returns:
        ``{label: (d_fixed_to_warped, d_warped_to_fixed)}`` (float64 mm), or ``None`` for a label that is
        empty in either map.
    """
    a, b = _labels_array(fixed_labels), _labels_array(warped_labels)
    _check_same_grid(fixed_labels, warped_labels, a, b)
    labs = shared_labels(a, b) if labels is None else sorted({int(v) for v in labels})
    sp = _spacing_zyx(fixed_labels, spacing)
    pa = _surface_points(a, labs)
    pb = _surface_points(b, labs)
    out: dict[int, Optional[tuple[np.ndarray, np.ndarray]]] = {}
    for lab in labs:
        if lab not in pa or lab not in pb:
            out[lab] = None
            continue
        out[lab] = (_nearest_distances(pa[lab], pb[lab], a.shape, sp, workers),
                    _nearest_distances(pb[lab], pa[lab], a.shape, sp, workers))
    return out


def surface_metrics(
    fixed_labels: Image | np.ndarray,
    warped_labels: Image | np.ndarray,
    labels: Optional[list[int]] = None,
    spacing: Optional[Iterable[float]] = None,
    percentile: float = 95.0,
    workers: int = -1,
) -> dict[str, dict[int, float]]:
    """HD95 and ASSD per label from one set of surface distances.

    Returns:
        ``{"hd95": {label: mm}, "assd": {label: mm}}``; NaN for labels empty in either map.
    """
    hd, assd = {}, {}
    for lab, dists in surface_distances_per_label(fixed_labels, warped_labels, labels, spacing, workers).items():
        if dists is None:
            hd[lab] = assd[lab] = float("nan")
            continue
        d = np.concatenate(dists)
        hd[lab] = float(np.percentile(d, percentile))
        assd[lab] = float(d.mean())
    return {"hd95": hd, "assd": assd}


def hd95_per_label(
    fixed_labels: Image | np.ndarray,
    warped_labels: Image | np.ndarray,
    labels: Optional[list[int]] = None,
    spacing: Optional[Iterable[float]] = None,
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance per label, in mm (pooled definition, see module doc).

    Args:
        fixed_labels, warped_labels: integer label maps (Z, Y, X) on the same grid (the spacing comes from
            the fixed image's grid; pass ``spacing`` (x, y, z) mm for plain arrays).
        labels: labels to evaluate (default: != 0 and present in both maps); NaN when empty in either map.
    """
    return surface_metrics(fixed_labels, warped_labels, labels, spacing)["hd95"]


def assd_per_label(
    fixed_labels: Image | np.ndarray,
    warped_labels: Image | np.ndarray,
    labels: Optional[list[int]] = None,
    spacing: Optional[Iterable[float]] = None,
) -> dict[int, float]:
    """Average symmetric surface distance per label in mm (mean of the pooled surface distances)."""
    return surface_metrics(fixed_labels, warped_labels, labels, spacing)["assd"]


def label_overlap_metrics(
    fixed_labels: Image,
    warped_labels: Image,
    labels: Optional[list[int]] = None,
    surface: bool = True,
) -> dict:
    """Everything a report needs about label agreement, with the bench's key names.

    Returns:
        ``{"labels", "dice_per_label", "dice_mean", "hd95_per_label", "hd95_mean", "hd95_labels_lost",
        "assd_per_label", "assd_mean"}`` (surface entries only when ``surface``); per-label dicts keyed by int
        label. A label empty in either map has Dice 0 (counted in ``dice_mean``) but no HD95 or ASSD (NaN, left
        out of their means): ``hd95_labels_lost`` lists those labels (``[]`` when none).
    """
    a, b = _labels_array(fixed_labels), _labels_array(warped_labels)
    _check_same_grid(fixed_labels, warped_labels, a, b)
    labs = shared_labels(a, b) if labels is None else sorted({int(v) for v in labels})
    d = dice_per_label(fixed_labels, warped_labels, labs)
    out: dict = {"labels": labs, "dice_per_label": d, "dice_mean": nanmean(d.values())}
    if surface:
        s = surface_metrics(fixed_labels, warped_labels, labs)
        out["hd95_per_label"] = s["hd95"]
        out["hd95_mean"], out["hd95_labels_lost"] = surface_mean(s["hd95"])
        out["assd_per_label"] = s["assd"]
        out["assd_mean"] = surface_mean(s["assd"])[0]
    return out

