"""Resampling: the only module that calls ``torch.nn.functional.grid_sample``.

Where a gradient must be differentiable again (DIO's Jacobian-free training step, :func:`twice_differentiable`)
on a torch whose 3-D ``grid_sample`` backward has no derivative (before 2.13), or where CUDA must give the same
gradient twice (``torch.use_deterministic_algorithms``, RELIABILITY N2: ``grid_sample``'s CUDA backward adds with
atomics), trilinear sampling is built from gathers instead (:func:`_trilinear_gathered`): the same values, and a
backward of scatter-adds that is differentiable and deterministic.

Boundary semantics follow ITK (and so SimpleITK and antsApplyTransforms): a point whose continuous
index lies in ``[-0.5, n - 0.5]`` on every axis is inside and is interpolated with edge values
repeated; anything further out gets the default value. Coordinates are built in float64 by
:mod:`regcli.spaces.grid` and cast to float32 only for ``grid_sample``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

from regcli.runtime import solver_dtype
from regcli.spaces.grid import Grid, apply_affine
from regcli.spaces.image import Image

Interp = Literal["linear", "nearest", "label"]
DEFAULT_CHUNK = 1 << 21  # points per grid_sample call when warping whole volumes


def _as_ncdhw(data: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if data.dim() == 3:
        return data[None, None], True
    if data.dim() == 4:
        return data[None], False
    if data.dim() == 5:
        return data, False
    raise ValueError(f"expected (Z,Y,X), (C,Z,Y,X) or (N,C,Z,Y,X), got {tuple(data.shape)}")


_TWICE = contextvars.ContextVar("regcli_twice_differentiable", default=False)
_NATIVE_DOUBLE_BACKWARD: dict[str, bool] = {}


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Within: bilinear :func:`grid_sample` calls whose gradient will be differentiated again (``create_graph``)
    stay differentiable on torch versions whose ``grid_sample`` lacks a double backward."""
    token = _TWICE.set(True)
    try:
        yield
    finally:
        _TWICE.reset(token)


def native_double_backward(device: torch.device) -> bool:
    """Whether this torch differentiates ``grid_sample``'s 3-D backward on ``device``'s type (probed once)."""
    kind = torch.device(device).type
    if kind not in _NATIVE_DOUBLE_BACKWARD:
        x = torch.ones(1, 1, 2, 2, 2, device=device, requires_grad=True)
        g = torch.full((1, 1, 1, 1, 3), 0.25, device=device, requires_grad=True)
        try:
            with torch.enable_grad():
                y = F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=True).sum()
                (gg,) = torch.autograd.grad(y, g, create_graph=True)
                torch.autograd.grad(gg.sum(), x)
            _NATIVE_DOUBLE_BACKWARD[kind] = True
        except RuntimeError:
            _NATIVE_DOUBLE_BACKWARD[kind] = False
    return _NATIVE_DOUBLE_BACKWARD[kind]


def _gathered(x: torch.Tensor, g: torch.Tensor, mode: str) -> bool:
    """Whether a ``grid_sample`` of ``x`` at ``g`` takes :func:`_trilinear_gathered` (see the module docstring)."""
    if mode != "bilinear" or not torch.is_grad_enabled() or not (x.requires_grad or g.requires_grad):
        return False
    if x.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        return True
    return _TWICE.get() and not native_double_backward(x.device)


def _trilinear_gathered(x: torch.Tensor, g: torch.Tensor, padding: str) -> torch.Tensor:
    """``F.grid_sample(x, g, "bilinear", padding, align_corners=True)`` for (N, C, D, H, W) ``x`` and
    (N, D', H', W', 3) ``g`` (padding "border" or "zeros"), as eight weighted gathers."""
    n, c, d, h, w = x.shape
    flat = x.reshape(n, c, d * h * w)
    pts = g.reshape(n, -1, 3)
    lo, frac = [], []
    for i, size in enumerate((w, h, d)):  # grid_sample's (x, y, z) order
        p = (pts[..., i] + 1) * (0.5 * (size - 1))
        if padding == "border":  # as grid_sample clips: no gradient on or beyond the edge, NaN to the far edge
            inside = (p > 0) & (p < size - 1)
            p = torch.where(inside, p, torch.nan_to_num(p.detach(), nan=size - 1).clamp(0, size - 1))
        p0 = torch.floor(p.detach().nan_to_num(nan=-2.0).clamp(-2, size + 1))
        lo.append(p0.long())
        frac.append(p - p0)
    out = None
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                ix, iy, iz = lo[0] + dx, lo[1] + dy, lo[2] + dz
                weight = ((frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1])
                          * (frac[2] if dz else 1 - frac[2]))
                if padding != "border":  # zeros: corners outside the grid (and non-finite points) add nothing
                    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h) & (iz >= 0) & (iz < d)
                    weight = torch.where(inside, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
                lin = (iz.clamp(0, d - 1) * h + iy.clamp(0, h - 1)) * w + ix.clamp(0, w - 1)
                term = flat.gather(2, lin[:, None].expand(n, c, -1)) * weight[:, None].to(x.dtype)
                out = term if out is None else out + term
    return out.reshape(n, c, *g.shape[1:4])


def sample_norm(x: torch.Tensor, g: torch.Tensor, mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """``F.grid_sample(x, g, mode, padding, align_corners=True)`` for (N, C, D, H, W) ``x``, through
    :func:`_trilinear_gathered` where that is needed (module docstring)."""
    if _gathered(x, g, mode) and padding in ("border", "zeros"):
        return _trilinear_gathered(x, g, padding)
    return F.grid_sample(x, g, mode=mode, padding_mode=padding, align_corners=True)


#: how far (in voxels) past ITK's buffer ``[-0.5, n - 0.5]`` a float64 position still counts as inside in the exact
#: test (:func:`inside_index`): the float64 rounding of a position meant to lie on the boundary, as
#: :data:`_HALF_UP_SLACK` for ties in rounding
_BUFFER_SLACK_VOX = 1e-9
#: the same, in normalized units, in the test of :func:`inside_norm` without ``exact`` (the registration's own
#: resampling): 2.5e-5 voxel on a 50-voxel axis, 2.6e-4 on a 512-voxel one. It absorbs float32 rounding, and
#: positions meant to lie on the boundary that arrive a few 1e-9 voxel past it through float32 transforms
_BUFFER_SLACK_NORM = 1e-6


def inside_index(index: torch.Tensor, size) -> torch.Tensor:
    """Mask (...) of continuous indices (..., 3) (x, y, z), float64, within the ITK buffer ``[-0.5, n - 0.5]`` of a
    grid of ``size`` voxels, to :data:`_BUFFER_SLACK_VOX`.

    ITK (``ImageFunction::IsInsideBuffer``) takes ``-0.5 <= i < n - 0.5`` with no tolerance; regcli closes the
    interval at both ends, so that a grid and its flipped copy give the same values (a point exactly half a voxel
    past the last voxel is inside here, outside in ITK); a point beyond it by more than 1e-9 voxel is outside in
    both."""
    n = torch.as_tensor(size, dtype=index.dtype, device=index.device)
    return ((index >= -0.5 - _BUFFER_SLACK_VOX) & (index <= n - 0.5 + _BUFFER_SLACK_VOX)).all(dim=-1)


def inside_norm(coords_norm: torch.Tensor, grid: Grid, exact: bool = False) -> torch.Tensor:
    """Mask (...) of normalized coordinates within the ITK buffer ``[-0.5, n-0.5]`` of ``grid`` (index 0 is at -1,
    one voxel is ``2 / max(n - 1, 1)``; a one-voxel axis spans [-2, 0]).

    With ``exact`` (``regcli apply``: :func:`warp` with ``itk_edges``), as ITK decides: the coordinates, float64,
    are tested as continuous indices to 1e-9 voxel (:func:`inside_index`). Otherwise to
    :data:`_BUFFER_SLACK_NORM` in normalized units (the registration's own resampling)."""
    if exact:
        half = torch.clamp(torch.as_tensor(grid.size, dtype=torch.float64, device=coords_norm.device) - 1.0,
                           min=1.0) / 2.0
        return inside_index((coords_norm.to(torch.float64) + 1.0) * half, grid.size)
    n = torch.as_tensor(grid.size, dtype=coords_norm.dtype, device=coords_norm.device)
    step = 2.0 / torch.clamp(n - 1.0, min=1.0)
    lo = -1.0 - 0.5 * step - _BUFFER_SLACK_NORM
    hi = -1.0 + (n - 0.5) * step + _BUFFER_SLACK_NORM
    return ((coords_norm >= lo) & (coords_norm <= hi)).all(dim=-1)


def grid_sample(
    data: torch.Tensor,
    coords_norm: torch.Tensor,
    mode: str = "bilinear",
    padding: Literal["zeros", "border", "itk"] = "border",
    source: Optional[Grid] = None,
    default: float = 0.0,
    exact_edges: bool = False,
) -> torch.Tensor:
    """Differentiable sampling of ``data`` at normalized coordinates (align_corners=True).

    Args:
        data: (Z,Y,X), (C,Z,Y,X) or (N,C,Z,Y,X) tensor on the source grid.
        coords_norm: (N, Z', Y', X', 3) float32 ``grid_sample`` coordinates (x, y, z) in the source grid (float64
            ones are cast to the data's type for the sampling).
        mode: "bilinear" (trilinear) or "nearest".
        padding: "border" (edge values everywhere), "zeros", or "itk" (edge values inside the ITK
            buffer, ``default`` beyond it; needs ``source``).
        exact_edges: with "itk", test the buffer as ITK does (:func:`inside_norm` with ``exact``; give float64
            coordinates).
    Returns:
        Samples with the batch/channel layout of ``data`` and spatial shape (Z', Y', X').
    """
    x, squeeze = _as_ncdhw(data)
    if x.shape[0] != coords_norm.shape[0]:
        x = x.expand(coords_norm.shape[0], *x.shape[1:])
    pad = "border" if padding == "itk" else padding
    out = sample_norm(x, coords_norm.to(x.dtype), mode, pad)
    if padding == "itk":
        if source is None:
            raise ValueError("padding='itk' needs the source grid")
        inside = inside_norm(coords_norm, source, exact_edges)[:, None]
        out = torch.where(inside, out, torch.as_tensor(default, dtype=out.dtype, device=out.device))
    if squeeze:
        return out[0, 0]
    return out[0] if data.dim() == 4 else out


def sample_at_world(
    data: torch.Tensor,
    source: Grid,
    points_world: torch.Tensor,
    mode: str = "bilinear",
    padding: Literal["zeros", "border", "itk"] = "itk",
    default: float = 0.0,
) -> torch.Tensor:
    """Sample ``data`` (on ``source``) at world points (..., 3) float64. Returns (C?, ...)."""
    shape = points_world.shape[:-1]
    pts = points_world.reshape(1, -1, 1, 1, 3)
    coords = source.world_to_norm_points(pts).to(solver_dtype(data))
    out = grid_sample(data.to(torch.float32) if not torch.is_floating_point(data) else data, coords, mode,
                      padding, source, default)
    if data.dim() == 3:
        return out.reshape(shape)
    return out.reshape(out.shape[0], *shape)


def axis_aligned_map(source: Grid, reference: Grid, tol: float = 1e-9) -> Optional[np.ndarray]:
    """Per-axis ``(scale, offset)`` (3, 2) when every reference index axis maps onto one source index axis
    (same axis, same sense or not): continuous source index ``c_k = scale_k * i_k + offset_k``. None otherwise.

    True for a grid and any :meth:`Grid.with_spacing` of it, and for crops and pooled grids, so resampling
    between them separates into three 1D interpolations.
    """
    M = source.world_to_index() @ reference.index_to_world()
    A = M[:3, :3]
    if np.abs(A - np.diag(np.diag(A))).max() > tol * max(1.0, np.abs(A).max()):
        return None
    return np.stack((np.diag(A), M[:3, 3]), axis=1)


def _source_positions(n: int, n_out: int, scale: float, offset: float, itk: bool, device
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Continuous source indices ``scale * i + offset`` (n_out,) float64 along one axis of ``n`` voxels, and
    with ``itk`` the mask of those within half a voxel of the source (ITK's buffer)."""
    c = torch.arange(n_out, dtype=torch.float64, device=device) * scale + offset
    return c, (((c >= -0.5) & (c <= n - 0.5)) if itk else None)


def _linear_1d(x: torch.Tensor, dim: int, scale: float, offset: float, n_out: int, itk: bool
               ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Linear interpolation of ``x`` along ``dim`` at source indices ``scale * i + offset`` (i < n_out).

    Coordinates are clamped to the source (edge values repeated). With ``itk`` also returns the (n_out,)
    mask of positions within half a voxel of the source (ITK's buffer).
    """
    n = x.shape[dim]
    c, inside = _source_positions(n, n_out, scale, offset, itk, x.device)
    c = c.clamp(0.0, n - 1.0)
    i0 = c.floor().clamp(max=max(n - 2, 0))
    f = (c - i0).to(x.dtype)
    i0 = i0.to(torch.int64)
    i1 = (i0 + 1).clamp(max=n - 1)
    shape = [1] * x.dim()
    shape[dim] = n_out
    return torch.lerp(x.index_select(dim, i0), x.index_select(dim, i1), f.view(shape)), inside


#: added to a continuous index before rounding it down (ITK rounds halves up): a position computed as
#: 2.4999999999 in float64 for an exact tie (e.g. a grid downsampled by 2 with aligned corners) rounds as 2.5.
#: Far below float32's rounding: headers hold float32 spacings and origins, which put a meant half voxel a few
#: 1e-7 voxel off it (11.4999996), and there ITK, whose rounding regcli follows, takes the voxel below
_HALF_UP_SLACK = 1e-9


def nearest_index(c: torch.Tensor) -> torch.Tensor:
    """The voxel nearest to continuous indices ``c`` (float64), halves rounded up as ITK's
    ``NearestNeighborInterpolateImageFunction`` (and so antsApplyTransforms) does, int64."""
    return torch.floor(c + (0.5 + _HALF_UP_SLACK)).to(torch.int64)


def _nearest_1d(x: torch.Tensor, dim: int, scale: float, offset: float, n_out: int, itk: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Nearest-neighbour resampling along ``dim`` (halves rounded up, as ITK: :func:`nearest_index`)."""
    n = x.shape[dim]
    c, inside = _source_positions(n, n_out, scale, offset, itk, x.device)
    i = nearest_index(c).clamp(0, n - 1)
    return x.index_select(dim, i), inside


def _nearest_gather(data: torch.Tensor, index: torch.Tensor, source: Grid, default: float) -> torch.Tensor:
    """Nearest-neighbour values of (Z, Y, X) or (C, Z, Y, X) ``data`` at continuous indices ``index``
    (Z', Y', X', 3) float64 (x, y, z), by gathering: any dtype, values copied exactly (no float32 round trip,
    so int32 labels above 2^24 survive). ``default`` beyond ITK's buffer (half a voxel past the edge)."""
    n = torch.as_tensor(source.size, dtype=index.dtype, device=index.device)
    inside = inside_index(index, source.size)
    r = nearest_index(index)
    r = torch.minimum(r.clamp(min=0), (n - 1).to(torch.int64))
    X, Y = source.size[0], source.size[1]
    flat = ((r[..., 2] * Y + r[..., 1]) * X + r[..., 0]).reshape(-1)
    lead = data.shape[:-3]
    vals = data.reshape(*lead, -1).index_select(-1, flat).reshape(*lead, *index.shape[:-1])
    fill = torch.as_tensor(default, dtype=data.dtype, device=data.device)
    return torch.where(inside, vals, fill)


def resample_separable(data: torch.Tensor, source: Grid, reference: Grid, padding: Literal["border", "itk"],
                       default: float = 0.0, mode: str = "linear") -> Optional[torch.Tensor]:
    """Resampling of (C?, Z, Y, X) data between axis-aligned grids as three 1D passes.

    ``mode`` "linear" (float data) or "nearest" (any dtype). Same values as ``grid_sample`` on the composed
    coordinates (to float rounding), several times faster on CPU. Returns None when the grids are not
    axis-aligned (see :func:`axis_aligned_map`).
    """
    amap = axis_aligned_map(source, reference)
    if amap is None or (mode == "linear" and not torch.is_floating_point(data)):
        return None
    one_d = _linear_1d if mode == "linear" else _nearest_1d
    x = data
    masks = []
    off = x.dim() - 3
    for axis, dim in ((0, off + 2), (1, off + 1), (2, off)):  # x, y, z index axes -> tensor dims
        x, inside = one_d(x, dim, float(amap[axis, 0]), float(amap[axis, 1]), reference.size[axis],
                          padding == "itk")
        masks.append(inside)
    if padding == "itk":
        mx, my, mz = masks
        inside = mz[:, None, None] & my[None, :, None] & mx[None, None, :]
        x = torch.where(inside, x, torch.as_tensor(default, dtype=x.dtype, device=x.device))
    return x


def _label_interp(data: torch.Tensor, coords: torch.Tensor, source: Grid, default: int, exact_edges: bool = False
                  ) -> torch.Tensor:
    """ANTs 'GenericLabel'-style: linear interpolation of each label's indicator, then argmax."""
    labels = torch.unique(data)
    best = torch.full(coords.shape[1:4], -1.0, dtype=torch.float32, device=data.device)
    out = torch.full(coords.shape[1:4], int(default), dtype=data.dtype, device=data.device)
    for lab in labels.tolist():
        ind = (data == lab).to(torch.float32)
        w = grid_sample(ind, coords, "bilinear", "itk", source, 0.0, exact_edges)[0] if ind.dim() == 4 else \
            grid_sample(ind, coords, "bilinear", "itk", source, 0.0, exact_edges)
        upd = w > best
        best = torch.where(upd, w, best)
        out = torch.where(upd, torch.as_tensor(lab, dtype=data.dtype, device=data.device), out)
    inside = inside_norm(coords, source, exact_edges)[0]
    return torch.where(inside, out, torch.as_tensor(int(default), dtype=data.dtype, device=data.device))


def warp(
    image: Image,
    transform=None,
    reference: Optional[Grid] = None,
    interp: Interp = "linear",
    default: float = 0.0,
    chunk: int = DEFAULT_CHUNK,
    itk_edges: bool = False,
) -> Image:
    """Resample ``image`` onto ``reference`` through ``transform`` (ITK pull-back convention).

    For every reference voxel centre ``x`` (world LPS mm), the output is ``image(T(x))`` where
    ``T = transform.map_points`` maps fixed/reference points to moving/image points. This is what
    ``sitk.Resample(image, reference, T)`` and ``antsApplyTransforms -r reference -t T`` compute.

    Args:
        image: scalar (Z,Y,X), multi-channel (C,Z,Y,X) or integer label image.
        transform: object with ``map_points`` (None = identity in world space).
        reference: output grid (defaults to the image's own grid).
        interp: "linear", "nearest", or "label" (per-label linear + argmax, for label maps).
        default: value outside the image.
        chunk: voxels per slab, bounds memory on large grids.
        itk_edges: decide "linear"/"label" points near the image's edge as ITK does: in float64, to 1e-9 voxel
            (:func:`inside_index`), not to float32 coordinates' 1e-6 in normalized units (2.5e-5 voxel on a
            50-voxel axis), so that a point 1e-5 voxel past the buffer takes ``default`` as in sitk.Resample.
            ``regcli apply`` sets it; the registration's own resampling keeps the looser test ("nearest", and
            resampling between axis-aligned grids without a transform, are exact either way).
    Returns:
        Image on ``reference``; integer dtype is kept for "nearest"/"label".
    """
    return warp_many([(image, interp)], transform, reference or image.grid, default, chunk, itk_edges)[0]


def warp_many(items: list[tuple[Image, Interp]], transform, reference: Grid, default: float = 0.0,
              chunk: int = DEFAULT_CHUNK, itk_edges: bool = False) -> list[Image]:
    """:func:`warp` of several images through the same transform: the mapped points are computed once
    (per slab) and shared, e.g. by the warped image and the warped label map of one registration."""
    out: list[Optional[Image]] = [None] * len(items)
    todo = []
    for k, (image, interp) in enumerate(items):
        is_int = not torch.is_floating_point(image.data)
        if transform is None and (interp == "nearest" or (interp == "linear" and not is_int)):
            data = resample_separable(image.data, image.grid, reference, "itk", default, interp)
            if data is not None:
                out[k] = Image(data, reference, image.name, dict(image.meta))
                continue
        todo.append(k)
    if not todo:
        return out  # type: ignore[return-value]
    ref = reference
    device = items[todo[0]][0].data.device
    zs, ys, xs = ref.shape
    slab = max(1, chunk // max(1, ys * xs))
    M_ref = ref.index_to_world()
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in todo}
    for z0 in range(0, zs, slab):
        z1 = min(zs, z0 + slab)
        zz, yy, xx = torch.meshgrid(
            torch.arange(z0, z1, dtype=torch.float64, device=device),
            torch.arange(ys, dtype=torch.float64, device=device),
            torch.arange(xs, dtype=torch.float64, device=device),
            indexing="ij",
        )
        pts = apply_affine(M_ref, torch.stack((xx, yy, zz), dim=-1))
        if transform is not None:
            pts = _map_reference_points(transform, pts, ref, z0, z1)
        coords_by_grid: dict[tuple[int, bool], torch.Tensor] = {}  # (image index, index coordinates?) -> coords
        for k in todo:
            image, interp = items[k]
            as_index = interp == "nearest"
            key = next((j for j in todo if items[j][0].grid == image.grid), k), as_index
            if key not in coords_by_grid:  # with itk_edges float64: grid_sample casts them to the data's type for
                # the sampling (the same values), and the buffer test decides in float64 as ITK does
                norm = None if as_index else image.grid.world_to_norm_points(pts)[None]
                coords_by_grid[key] = image.grid.world_to_index_points(pts) if as_index else \
                    norm if itk_edges else norm.to(torch.float32)
            parts[k].append(_sample(image, coords_by_grid[key], interp, default, itk_edges))
    for k in todo:
        image = items[k][0]
        cat_dim = 0 if image.data.dim() == 3 else 1
        out[k] = Image(torch.cat(parts[k], dim=cat_dim), ref, image.name, dict(image.meta))
    return out  # type: ignore[return-value]


def _sample(image: Image, coords: torch.Tensor, interp: Interp, default: float, exact_edges: bool = False
            ) -> torch.Tensor:
    """``image`` at ``coords``: continuous indices (Z', Y', X', 3) float64 for "nearest" (any dtype, kept),
    ``grid_sample`` coordinates (1, Z', Y', X', 3) otherwise. "linear" of integer data is float32, not rounded
    (as antsApplyTransforms interpolates and writes floats); "label" keeps the integer dtype."""
    data = image.data
    if interp == "nearest":
        return _nearest_gather(data, coords, image.grid, default)
    if interp == "label":
        return _label_interp(data, coords, image.grid, int(default), exact_edges)
    src = data if torch.is_floating_point(data) else data.to(torch.float32)
    return grid_sample(src, coords, "bilinear", "itk", image.grid, default, exact_edges)


def _map_reference_points(transform, pts: torch.Tensor, ref: Grid, z0: int, z1: int) -> torch.Tensor:
    """``transform.map_points(pts)`` for the voxel centres of slab [z0, z1) of ``ref``.

    When the transform (or the first transform of a list) is a displacement field on ``ref`` itself, its
    value at a voxel centre is the stored vector: it is read, not interpolated (same result, no sampling).
    """
    parts = getattr(transform, "transforms", None)
    first = parts[0] if parts else transform
    disp = getattr(first, "disp", None)
    if disp is None or getattr(first, "grid", None) is None or not first.grid.allclose(ref, 1e-6):
        return transform.map_points(pts)
    pts = pts + disp[:, z0:z1].permute(1, 2, 3, 0).to(torch.float64).to(pts.device)
    for t in (parts[1:] if parts else []):
        pts = t.map_points(pts)
    return pts


def resample_to_grid(image: Image, reference: Grid, interp: Interp = "linear", default: float = 0.0) -> Image:
    """Resample onto another grid through the identity in world space (no transform)."""
    return warp(image, None, reference, interp, default)


def inside_field_of_view(grid: Grid, reference: Grid, transform=None) -> torch.Tensor:
    """(Z, Y, X) bool on ``reference``: the voxels ``x`` whose point ``T(x)`` (``transform.map_points``; the
    identity when None) lies in the ITK buffer of ``grid``, where :func:`warp` and :func:`resample_to_grid` give
    an image's own values rather than their ``default``: the same test, on the same float32 coordinates, as the
    registration's linear resampling onto its working grid (:func:`warp` without ``itk_edges``); by slabs of
    ``DEFAULT_CHUNK`` voxels, as :func:`warp_many`."""
    zs, ys, xs = reference.shape
    index = reference.index_coords(torch.float64)
    slab = max(1, DEFAULT_CHUNK // max(1, ys * xs))
    parts = []
    for z0 in range(0, zs, slab):
        pts = apply_affine(reference.index_to_world(), index[z0:z0 + slab])
        if transform is not None:
            pts = transform.map_points(pts)
        parts.append(inside_norm(grid.world_to_norm_points(pts).to(torch.float32), grid))
    return torch.cat(parts)


class FieldWarper:
    """Fast differentiable warping for optimisation loops.

    Precomputes, once, the ``grid_sample`` coordinates in the *source* grid of the voxel centres of
    the *target* grid, and the linear map from world-mm displacements to source normalized
    displacements. Then ``warp(source_data, disp)`` samples ``source(x + disp(x))`` for every target
    voxel ``x`` with one ``grid_sample`` call.

    Args:
        source: grid of the image being sampled (e.g. the moving image on the working grid).
        target: grid on which the displacement lives (e.g. the fixed working grid).
        dtype: floating type of the coordinates and of the displacements given to :meth:`coords` (the solver's
            precision); the geometry is composed in float64 and cast to it at the end.
    """

    def __init__(self, source: Grid, target: Grid, device=None, dtype: torch.dtype = torch.float32) -> None:
        self.source = source
        self.target = target
        M = source.world_to_norm() @ target.index_to_world()
        self.base = apply_affine(M, target.index_coords(torch.float64, device)).to(dtype)[None]
        self.vec = torch.as_tensor(source.vector_world_to_norm(), dtype=dtype, device=device)

    def to(self, device) -> "FieldWarper":
        self.base = self.base.to(device)
        self.vec = self.vec.to(device)
        return self

    def coords(self, disp: Optional[torch.Tensor]) -> torch.Tensor:
        """Normalized source coordinates (N, Z, Y, X, 3) of ``x + disp(x)``.

        Args:
            disp: (N, 3, Z, Y, X) or (3, Z, Y, X) float32, world LPS mm, on the target grid.
        """
        if disp is None:
            return self.base
        if disp.dim() == 4:
            disp = disp[None]
        d = disp.permute(0, 2, 3, 4, 1)
        # a (V, 3) @ (3, 3) product: the batched (N, Z, Y, X, 3) form takes a much slower path on CPU
        return self.base + (d.reshape(-1, 3) @ self.vec.T).reshape(d.shape)

    def coords_at(self, disp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Normalized source coordinates (1, 1, 1, P, 3) of ``x + disp(x)`` for the target voxels ``index``.

        Args:
            disp: (1, 3, Z, Y, X) or (3, Z, Y, X) float32, world LPS mm, on the target grid.
            index: (P,) int64 flat indices of target voxels (Z, Y, X order).
        """
        d = disp.reshape(3, -1).index_select(1, index).T  # (P, 3)
        base = self.base.reshape(-1, 3).index_select(0, index)
        return (base + d @ self.vec.T)[None, None, None]

    def warp(self, data: torch.Tensor, disp: Optional[torch.Tensor], mode: str = "bilinear",
             padding: Literal["zeros", "border", "itk"] = "border", default: float = 0.0) -> torch.Tensor:
        """Sample source ``data`` (C,Z,Y,X)/(N,C,Z,Y,X) at ``x + disp(x)`` for every target voxel."""
        return grid_sample(data, self.coords(disp), mode, padding, self.source, default)


def upsample_field(disp: torch.Tensor, field_grid: Grid, reference: Grid) -> torch.Tensor:
    """A displacement field (3, Z, Y, X) world mm on ``field_grid``, trilinearly resampled onto ``reference``, with
    edge values beyond the field grid (for coarse grids). The vectors are world-space quantities, so they are
    interpolated as they are (no reorientation)."""
    out = resample_separable(disp, field_grid, reference, "border")
    if out is not None:
        return out
    coords = field_grid.world_to_norm_points(reference.world_coords(torch.float64, disp.device)).to(disp.dtype)
    return grid_sample(disp, coords[None], "bilinear", "border")
