"""Inverse of a dense displacement field by fixed-point iteration, with the error reported in mm."""

from __future__ import annotations

import torch

from regcli.resample import FieldWarper, upsample_field
from regcli.transforms.displacement import DisplacementField, vector_length


def inverse_consistency_error(forward: DisplacementField, inverse: DisplacementField,
                              mask: torch.Tensor | None = None) -> dict:
    """How far ``forward ∘ inverse`` is from the identity, in mm, on the inverse field's grid.

    For every voxel ``y`` of the inverse's grid: ``e(y) = | v(y) + u(y + v(y)) |``.

    Returns:
        dict with ``mean_mm``, ``p99_mm`` and ``max_mm`` (over ``mask`` when given).
    """
    warper = FieldWarper(forward.grid, inverse.grid, inverse.disp.device, inverse.disp.dtype)
    v = inverse.disp
    u_at = warper.warp(forward.disp, v, "bilinear", "border")
    err = vector_length(v + u_at)
    if mask is not None:
        err = err[mask.to(torch.bool)]
    err = err.flatten().to(torch.float64)
    if err.numel() == 0:
        return {"mean_mm": float("nan"), "p99_mm": float("nan"), "max_mm": float("nan")}
    return {
        "mean_mm": float(err.mean()),
        "p99_mm": float(torch.quantile(err[:: max(1, err.numel() // 1_000_000)], 0.99)),
        "max_mm": float(err.max()),
    }


def written_inverse_consistency(forward: DisplacementField, inverse: DisplacementField,
                                max_points: int = 2_000_000) -> dict:
    """:func:`inverse_consistency_error` of the fields as written (both on their output grids), at the voxels
    ``y`` of the inverse's grid whose image ``y + v(y)`` lies inside the forward field's grid (beyond it the
    forward field is only extrapolated); on large grids at every ``s``-th voxel along each axis (``s`` the
    smallest stride leaving at most ``max_points``), which keeps the mean and 99th percentile and may miss the
    largest values. Adds ``points`` (voxels measured) and ``stride``."""
    g = inverse.grid
    stride = 1
    while g.num_voxels / stride ** 3 > max_points:
        stride += 1
    v = inverse.disp[:, ::stride, ::stride, ::stride]
    sub = g.subsampled(stride)
    with torch.no_grad():
        ends = sub.world_coords(torch.float64, v.device) + v.permute(1, 2, 3, 0).to(torch.float64)
        inside = forward.grid.inside(ends)
        stats = inverse_consistency_error(forward, DisplacementField(v, sub), inside)
    return {**stats, "points": int(inside.sum()), "stride": stride}


def invert_displacement(field: DisplacementField, iterations: int = 40, tol_max_mm: float = 0.1,
                        tol_mean_mm: float = 1e-3, grid=None, init: "DisplacementField | None" = None
                        ) -> tuple[DisplacementField, dict]:
    """Invert ``phi(x) = x + u(x)`` on ``grid`` (default: the field's own grid), starting from ``init`` (an
    approximate inverse on any grid, e.g. one computed on a coarser grid) or from ``-u``.

    Solves ``v(y) = -u(y + v(y))`` by fixed-point iteration (converges when the field is invertible,
    i.e. ``|grad u| < 1`` locally). The update of an iteration is the residual ``-(v + u(y + v))`` of the
    current estimate, so the loop stops once the largest residual is below ``tol_max_mm`` and the mean one
    below ``tol_mean_mm`` (the tolerances of ITK's ``InvertDisplacementFieldImageFilter``), or after
    ``iterations``.

    Returns:
        (inverse field, stats) with stats ``iterations``, ``mean_mm``, ``p99_mm``, ``max_mm``: the residual
        ``|v(y) + u(y + v(y))|`` in mm over the grid. The inverse has the field's dtype (float32 or float64).
    """
    grid = grid or field.grid
    warper = FieldWarper(field.grid, grid, field.disp.device, field.disp.dtype)
    u = field.disp
    if init is not None:
        v = upsample_field(init.disp.to(field.disp.device, field.disp.dtype), init.grid, grid)
    else:  # -u resampled on the inverse grid
        v = -warper.warp(u, None, "bilinear", "border")
    n_done = 0
    for n_done in range(1, iterations + 1):
        v_new = -warper.warp(u, v, "bilinear", "border")
        res = vector_length(v_new - v)
        worst, mean = float(res.max()), float(res.mean())
        # damped update for robustness where |grad u| approaches 1
        v = v_new if worst < 5.0 else 0.5 * (v + v_new)
        if worst < tol_max_mm and mean < tol_mean_mm:
            break
    inv = DisplacementField(v.contiguous(), grid)
    stats = inverse_consistency_error(field, inv)
    stats["iterations"] = n_done
    return inv, stats
