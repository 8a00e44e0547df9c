"""Jacobian determinant of a displacement field, in physical units, and its summary statistics.

For ``phi(x) = x + u(x)`` (fixed world point -> moving world point, LPS mm) the Jacobian is
``J = I + du/dx``. The spatial derivative is taken along the voxel axes and mapped to world axes:

    G[c, k] = d u_c / d index_k     central differences, one-sided at the border (numpy.gradient)
    J       = I + G @ (D diag(spacing))^-1

with ``D`` the grid's direction cosines. This is the definition of the benchmark scorer
(``shared/bench/metrics.py``, which works in RAS; ``det J`` does not depend on the world frame), so the
two agree to float rounding. Maths in float64, chunked over z-slabs to bound memory on large grids.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from regcli.spaces import Grid, Image

__all__ = ["jacobian_matrix", "jacobian_determinant", "jacobian_stats", "jacobian_image", "JACOBIAN_STAT_KEYS"]

# Keys of one block of :func:`jacobian_stats` (the first six are the bench's names).
JACOBIAN_STAT_KEYS = ("pct_nonpos_jac", "n_nonpos_jac", "sdlogj", "jac_min", "jac_max", "jac_mean",
                      "jac_p1", "jac_p99", "n_voxels")


def _gradient(u: torch.Tensor, dim: int) -> torch.Tensor:
    """numpy.gradient of ``u`` along ``dim`` (unit step, edge_order=1: central inside, one-sided at the ends)."""
    n = u.shape[dim]
    out = torch.empty_like(u)
    if n < 2:
        return out.zero_()
    if n > 2:
        out.narrow(dim, 1, n - 2).copy_((u.narrow(dim, 2, n - 2) - u.narrow(dim, 0, n - 2)) * 0.5)
    out.narrow(dim, 0, 1).copy_(u.narrow(dim, 1, 1) - u.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).copy_(u.narrow(dim, n - 1, 1) - u.narrow(dim, n - 2, 1))
    return out


def _jacobian_slab(disp: torch.Tensor, grid: Grid, z0: int, z1: int) -> list[list[torch.Tensor]]:
    """J for z-slices [z0, z1) as nested lists ``J[c][d]`` of (z1-z0, Y, X) float64 tensors (d phi_c / d x_d)."""
    Z = grid.shape[0]
    # read one halo slice on each side so the z-differences of the slab equal those of the whole volume
    zlo, zhi = max(z0 - 1, 0), min(z1 + 1, Z)
    u = disp[:, zlo:zhi].to(torch.float64)  # (3, z, Y, X), components (x, y, z)
    core = slice(z0 - zlo, z1 - zlo)
    # G[c][k] = d u_c / d index_k, index axes k = (x, y, z) = tensor dims (3, 2, 1)
    gz = _gradient(u, 1)[:, core]
    uc = u[:, core]
    grads = (_gradient(uc, 3), _gradient(uc, 2), gz)
    Minv = grid.vector_world_to_index()  # (D diag(spacing))^-1, [k, d]
    J = []
    for c in range(3):
        row = []
        for d in range(3):
            acc = None
            for k in range(3):
                m = float(Minv[k, d])
                if m == 0.0:  # axis-aligned grids: skip the zero terms (saves 2/3 of the work)
                    continue
                acc = grads[k][c] * m if acc is None else acc.add_(grads[k][c], alpha=m)
            if acc is None:
                acc = torch.zeros_like(uc[0])
            if c == d:
                acc += 1.0
            row.append(acc)
        J.append(row)
    return J


def _slab_size(grid: Grid, voxels: int = 1 << 20) -> int:
    Z, Y, X = grid.shape
    return max(1, voxels // max(1, Y * X))


def jacobian_matrix(field, chunk_voxels: int = 1 << 20) -> torch.Tensor:
    """Full Jacobian ``d phi / d x`` of ``phi(x) = x + u(x)``.

    Args:
        field: :class:`~regcli.transforms.DisplacementField` (disp (3, Z, Y, X) LPS mm on its grid).

    Returns:
        (Z, Y, X, 3, 3) float64 on the field's device; ``J[..., c, d] = d phi_c / d x_d`` (LPS world axes,
        unitless). Memory: 72 bytes per voxel; use :func:`jacobian_determinant` for large grids.
    """
    Z = field.grid.shape[0]
    step = _slab_size(field.grid, chunk_voxels)
    parts = []
    with torch.no_grad():
        for z in range(0, Z, step):
            J = _jacobian_slab(field.disp.detach(), field.grid, z, min(Z, z + step))
            parts.append(torch.stack([torch.stack(row, dim=-1) for row in J], dim=-2))
    return torch.cat(parts)


def _det3(J: list[list[torch.Tensor]]) -> torch.Tensor:
    (a, b, c), (d, e, f), (g, h, i) = J
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_determinant(field, chunk_voxels: int = 1 << 20) -> torch.Tensor:
    """``det(I + du/dx)`` of a displacement field, in physical units.

    Args:
        field: :class:`~regcli.transforms.DisplacementField`: disp (3, Z, Y, X) float32, LPS mm, on its grid
            (any direction and spacing).
        chunk_voxels: voxels per z-slab (bounds the float64 working memory, ~200 bytes per voxel).

    Returns:
        (Z, Y, X) float32 tensor on the field's grid and device: the local volume change (unitless); ``<= 0``
        where the mapping folds.
    """
    grid = field.grid
    Z = grid.shape[0]
    step = _slab_size(grid, chunk_voxels)
    parts = []
    with torch.no_grad():
        for z in range(0, Z, step):
            parts.append(_det3(_jacobian_slab(field.disp.detach(), grid, z, min(Z, z + step))).to(torch.float32))
    return torch.cat(parts, dim=0)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Image):
        x = x.data
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _std(x: np.ndarray) -> float:
    """Population standard deviation, as ``np.std`` but in one pass over the centred values (``np.std`` makes two
    full temporaries)."""
    c = x - x.mean()
    return float(np.sqrt(np.dot(c, c) / x.size))


def _stats_block(d: np.ndarray) -> dict:
    d = d.astype(np.float64, copy=False).ravel()
    n = int(d.size)
    if n == 0:
        nan = float("nan")
        return {"pct_nonpos_jac": nan, "n_nonpos_jac": 0, "sdlogj": nan, "jac_min": nan, "jac_max": nan,
                "jac_mean": nan, "jac_p1": nan, "jac_p99": nan, "n_voxels": 0}
    nonpos = int(np.count_nonzero(d <= 0))
    pos = d if nonpos == 0 else d[d > 0]  # (no copy in the usual case, nothing folds)
    p1, p99 = np.percentile(d, [1.0, 99.0])
    return {
        "pct_nonpos_jac": float(100.0 * nonpos / n),
        "n_nonpos_jac": nonpos,
        "sdlogj": _std(np.log(pos)) if pos.size else float("nan"),
        "jac_min": float(d.min()),
        "jac_max": float(d.max()),
        "jac_mean": float(d.mean()),
        "jac_p1": float(p1),
        "jac_p99": float(p99),
        "n_voxels": n,
    }


def jacobian_stats(det, mask=None, mask_source: Optional[str] = None) -> dict:
    """Summary of a Jacobian determinant map (key names as in the bench scorer).

    Args:
        det: (Z, Y, X) determinant (tensor, array or Image), unitless.
        mask: optional (Z, Y, X) mask (bool/int/float, non-zero = inside; tensor, array or Image) on the
            same grid.
        mask_source: what the mask is (:data:`MASK_SOURCES`, from :func:`jacobian_region`), recorded as
            ``"in_mask_source"``.

    Returns:
        ``{"pct_nonpos_jac": % of voxels with det <= 0, "n_nonpos_jac": count, "sdlogj": std of log det over
        det > 0 (population std), "jac_min", "jac_max", "jac_mean", "jac_p1", "jac_p99", "n_voxels"}`` over the
        whole grid, plus the same block under ``"in_mask"`` when a mask is given (and ``"in_mask_source"`` when
        ``mask_source`` is). NaN where undefined.

    Raises:
        ValueError: mask shape differs from det shape (a programming error, not user input).
    """
    d = _as_numpy(det)
    out = _stats_block(d)
    if mask is not None:
        m = _as_numpy(mask)
        if m.shape != d.shape:
            raise ValueError(f"mask shape {m.shape} differs from Jacobian shape {d.shape}")
        out["in_mask"] = _stats_block(d[m != 0])
        if mask_source is not None:
            out["in_mask_source"] = mask_source
    return out


#: what ``jacobian.in_mask`` is over (``jacobian.in_mask_source``): the fixed mask, or the fixed labels' foreground
MASK_SOURCES = ("fixed_mask", "fixed_labels")


def jacobian_region(grid, fixed_mask=None, fixed_labels=None) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The region of the Jacobian statistics' ``in_mask`` block, one rule for ``register`` and ``evaluate``: the
    fixed mask when one is given, else the foreground (label != 0) of the fixed labels, else none.

    Args:
        grid: the fixed grid (that of the determinant).
        fixed_mask, fixed_labels: Images or None, on any grid (resampled onto ``grid``, nearest, when not on it).

    Returns:
        ``(mask, source)``: (Z, Y, X) bool tensor on ``grid`` and its :data:`MASK_SOURCES` name, or
        ``(None, None)``; pass both on to :func:`jacobian_stats`.
    """
    for image, source in ((fixed_mask, "fixed_mask"), (fixed_labels, "fixed_labels")):
        if image is None:
            continue
        if not image.grid.allclose(grid):
            from regcli.resample import resample_to_grid

            image = resample_to_grid(image, grid, "nearest")
        return image.data != 0, source
    return None, None


def jacobian_image(field, name: str = "jacobian determinant") -> Image:
    """The determinant map as an Image on the field's grid (Z, Y, X) float32, for ``regcli jacobian``."""
    det = jacobian_determinant(field).cpu()
    return Image(det, field.grid, name, {"kind": "jacobian_determinant"})
