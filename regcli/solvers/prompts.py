"""Test-time prompts: label maps and landmarks that the instance optimisation must honour.

A prompt is an extra term of the IO objective (:attr:`regcli.solvers.instance.Problem.prompts`): an object
with ``name``, ``weight`` and ``loss(disp, grid) -> scalar tensor``, where ``disp`` is the displacement
(1, 3, Z, Y, X) float32 in world LPS mm on ``grid`` (the grid of the current IO level, which may change from
one level to the next and be coarser than the working grid). The solver samples the moving data at
``x + u(x)`` for every world point ``x`` of ``grid`` and adds ``weight * loss`` to its objective, so both
prompts below measure how well ``x -> x + u(x)`` carries fixed-side structures onto the moving side:

* :class:`LabelPrompt`: ``1 - mean soft Dice`` of chosen labels (dimensionless, in [0, 1]);
* :class:`LandmarkPrompt`: mean squared landmark distance divided by ``scale_mm**2`` (dimensionless; with the
  default ``scale_mm = 1`` it is in mm², so a weight ``w`` trades 1 mm² of landmark error against ``w`` units
  of the rest of the objective).

:func:`stage_prompts` builds both in the space of regcli's deformable stage, which sees the moving image
already warped by the affine stage.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch

from regcli.errors import ConfigError, InputError
from regcli.features.intensity import antialias_sigma_mm, gaussian_smooth
from regcli.reports import metrics
from regcli.resample import FieldWarper, grid_sample, resample_to_grid, warp
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image

log = logging.getLogger("regcli")

_CACHE_GRIDS = 2  # per-grid tensors kept by a prompt (an IO level and the next)


# ----------------------------------------------------------------------------------------------- helpers
def _footprint_sigma_vox(source: Grid, target: Grid, linear: Optional[np.ndarray] = None) -> list[float]:
    """Gaussian anti-aliasing std (voxels of ``source``, along its x, y, z index axes) for data on ``source``
    that will be sampled at the voxel centres of ``target``.

    A ``target`` voxel, carried into ``source``'s space by the 3x3 ``linear`` part of the mapping (identity
    by default), is a box with edge vectors ``linear @ d_j * spacing_j`` (mm); its extent along source index
    axis ``k`` is ``sum_j |e_k . linear d_j| spacing_j``. The std is :func:`antialias_sigma_mm` from the
    source spacing to that extent: zero when the target is as fine as the source, half the target voxel for
    large factors. Oblique and anisotropic grids are handled by the projection.
    """
    L = np.eye(3) if linear is None else np.asarray(linear, dtype=np.float64).reshape(3, 3)
    proj = np.abs(source.direction_matrix.T @ L @ target.direction_matrix)  # [k, j] = |e_k . L d_j|
    extent = proj @ np.asarray(target.spacing, dtype=np.float64)
    return [antialias_sigma_mm(s, e) / s for s, e in zip(source.spacing, extent)]


def _antialias(data: torch.Tensor, sigma_vox: Sequence[float]) -> torch.Tensor:
    """Gaussian smoothing of (K, Z, Y, X) float data, ``sigma_vox`` along (x, y, z); a no-op when negligible."""
    if max(sigma_vox) < 0.05:
        return data
    return gaussian_smooth(data, sigma_vox)


def _cached(cache: OrderedDict, key, build):
    """``cache[key]``, built by ``build()`` on a miss; the ``_CACHE_GRIDS`` most recently used entries are kept."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    entry = cache[key] = build()
    while len(cache) > _CACHE_GRIDS:
        cache.popitem(last=False)
    return entry


def _check_label_map(image: Image, role: str) -> None:
    if not isinstance(image, Image):
        raise InputError(f"{role} label map must be an Image, got {type(image).__name__}")
    if torch.is_floating_point(image.data) or image.data.dim() != 3:
        raise InputError(f"{role} label map '{image.name or role}' must be a 3D integer image, got "
                         f"{str(image.data.dtype).replace('torch.', '')} of shape {tuple(image.data.shape)}")


def _onehot(labels: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """(K, Z, Y, X) float32 indicators of ``ids`` in the (Z, Y, X) integer map ``labels``."""
    idx = torch.as_tensor(list(ids), dtype=labels.dtype, device=labels.device).view(-1, 1, 1, 1)
    return (labels[None] == idx).to(torch.float32)


def _describe(ids) -> str:
    return ", ".join(str(i) for i in sorted(ids))


def _prompt_ids(fixed_ids: set[int], moving_ids: set[int], labels: Optional[Sequence[int]], fixed_name: str,
                moving_name: str) -> list[int]:
    """The label ids a prompt aligns: ``labels`` when every one is in both maps, or (``labels`` None) every id > 0
    the maps share; an InputError naming the ids and maps otherwise."""
    if labels is None:
        ids = sorted((fixed_ids & moving_ids) - {0})
        if not ids:
            raise InputError(f"fixed '{fixed_name}' and moving '{moving_name}' label maps have no label > 0 in common")
        return ids
    ids = [int(v) for v in labels]
    if len(set(ids)) != len(ids):
        raise InputError(f"label ids are repeated: {ids}")
    missing_f = [i for i in ids if i not in fixed_ids]
    missing_m = [i for i in ids if i not in moving_ids]
    if missing_f or missing_m:
        parts = []
        if missing_f:
            parts.append(f"{_describe(missing_f)} not in fixed '{fixed_name}'")
        if missing_m:
            parts.append(f"{_describe(missing_m)} not in moving '{moving_name}'")
        raise InputError("label prompt: label ids " + "; ".join(parts))
    return ids


LabelValues = tuple[set[int], set[int]]
"""The values present in a fixed and a moving integer label map (0 included), e.g.
:func:`regcli.reports.metrics.label_values` of each: known once, passed on so that no map is counted again."""


def label_map_values(fixed: Image, moving: Image) -> LabelValues:
    """The values present in two (integer, 3D) label maps, 0 included, after checking that they are such maps.

    Raises:
        InputError: not integer 3D label maps.
    """
    _check_label_map(fixed, "fixed")
    _check_label_map(moving, "moving")
    return metrics.label_values(fixed), metrics.label_values(moving)


def check_label_prompt(fixed: Image, moving: Image, labels: Optional[Sequence[int]] = None,
                       values: Optional[LabelValues] = None) -> list[int]:
    """The label ids a :class:`LabelPrompt` on these (integer, original) label maps would align, checked without
    building it: for a pre-flight, so that a wrong id is refused before any registration work with the message
    :func:`stage_prompts` would give after the affine stage. ``values``: the maps' values when already known
    (:data:`LabelValues`), else counted here.

    Raises:
        InputError: as :class:`LabelPrompt` (not integer 3D label maps, ids absent from either map, repeated
            ids, or no common label).
    """
    if values is None:
        values = label_map_values(fixed, moving)
    else:
        _check_label_map(fixed, "fixed")
        _check_label_map(moving, "moving")
    fixed_ids, moving_ids = values
    return _prompt_ids(fixed_ids, moving_ids, labels, fixed.name or "fixed", moving.name or "moving")


# ----------------------------------------------------------------------------------------------- labels
class LabelPrompt:
    """Soft-Dice prompt on label maps: ``loss = 1 - mean_k Dice_k(fixed_k, moving_k ∘ (x + u))``.

    ``Dice_k = 2 Σ f_k w_k / (Σ f_k² + Σ w_k² + eps)`` (sums over the voxels of the IO grid), with ``f_k`` the
    fixed one-hot of label ``k`` on the IO grid and ``w_k`` the moving one-hot sampled at ``x + u(x)``
    (trilinear, zero outside the moving label grid). The squared denominator (V-Net form) makes the term
    exactly 1 when ``w = f`` even for the soft, anti-aliased one-hots, so identical label maps are an exact
    optimum. Dimensionless, in [0, 1].

    Anti-aliasing: before going to an IO grid coarser than a label map, its one-hot channels are smoothed by
    a Gaussian of ``0.5 * sqrt(t² - s²)`` mm (``t`` the IO voxel's extent along the label-map axis, ``s`` the
    label-map spacing), so a structure smaller than an IO voxel keeps its volume as partial occupancy
    instead of vanishing or flickering. The fixed one-hot is then resampled onto the IO grid (linear, 0
    outside); the moving one-hot stays on its own grid and is warped at every step with
    :class:`regcli.resample.FieldWarper`.

    Memory: per IO grid, ``K`` float32 channels of the fixed map on the IO grid and ``K`` of the moving map on
    its own grid, plus ``K`` warped channels and their autograd buffers during a step (about ``4 K`` volumes
    of the IO grid). A 2 mm brain grid (96 x 112 x 96, 1.03 M voxels) costs 4.1 MB per channel: about 66 MB
    for 4 labels, 0.6 GB for 35. Pass a moving map already on the working grid (as :func:`stage_prompts` can)
    rather than on a fine original grid. The tensors of the last two IO grids are cached.

    Args:
        fixed: (Z, Y, X) integer label map on any grid (world LPS mm).
        moving: (Z', Y', X') integer label map on the grid of the moving data *as the solver sees them*
            (the displacement maps fixed-side world points to points of this map's space), on any grid; or a
            (K, Z', Y', X') float image of soft one-hot channels whose channel ``i`` is label ``labels[i]``
            (then ``labels`` is required; :func:`stage_prompts` uses this to pass affinely warped maps).
        labels: label ids to align; None = every id > 0 present in both maps.
        weight: factor of the term in the IO objective.
        name: key of the term in the solver's history.
        eps: added to the Dice denominator (voxel units).
        values: the values present in ``fixed`` and in the integer ``moving`` map when already known
            (:data:`LabelValues`; the moving set is not read for one-hot channels), else counted here.

    Raises:
        InputError: not integer 3D label maps, ids absent from either map (the message lists them), or no
            common label.
    """

    def __init__(self, fixed: Image, moving: Image, labels: Optional[Sequence[int]] = None, weight: float = 1.0,
                 name: str = "labels", eps: float = 1e-6, values: Optional[LabelValues] = None) -> None:
        _check_label_map(fixed, "fixed")
        soft = isinstance(moving, Image) and torch.is_floating_point(moving.data) and moving.data.dim() == 4
        if not soft:
            _check_label_map(moving, "moving")
        fixed_ids = values[0] if values is not None else metrics.label_values(fixed)
        if soft:
            if labels is None or len(labels) != moving.data.shape[0]:
                raise InputError(f"moving one-hot '{moving.name or 'moving'}' has {moving.data.shape[0]} channels: "
                                 "give one label id per channel")
            # channels are taken as given (e.g. warped out of the field of view by the affine stage: Dice 0)
            sums = moving.data.reshape(moving.data.shape[0], -1).sum(1).tolist()
            empty = [int(k) for k, s in zip(labels, sums) if not s > 0]
            if empty:
                log.warning("label prompt: labels %s are empty in the moving one-hot '%s'", _describe(empty),
                            moving.name or "moving")
            moving_ids = {int(k) for k in labels}
        else:
            moving_ids = values[1] if values is not None else metrics.label_values(moving)
        ids = _prompt_ids(fixed_ids, moving_ids, labels, fixed.name or "fixed", moving.name or "moving")
        if weight < 0:
            raise ConfigError(f"label prompt weight must be >= 0, got {weight}")
        self.labels: list[int] = ids
        self.weight = float(weight)
        self.name = name
        self.eps = float(eps)
        self.fixed = fixed
        self.moving = moving
        self._soft = soft
        self._cache: OrderedDict = OrderedDict()

    def _moving_onehot(self) -> torch.Tensor:
        if self._soft:
            return self.moving.data
        return _onehot(self.moving.data, self.labels)

    def prepare(self, grid: Grid, device=None, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, FieldWarper]:
        """Per-grid tensors (cached): fixed one-hot (K, Z, Y, X) on ``grid``, the anti-aliased moving one-hot
        (K, Z', Y', X') on the moving map's grid, both of ``dtype`` (the solver's), and the warper from that grid
        to ``grid``."""
        def build():
            with torch.no_grad():
                f = _onehot(self.fixed.data.to(device), self.labels)
                f = _antialias(f, _footprint_sigma_vox(self.fixed.grid, grid))
                f = resample_to_grid(Image(f, self.fixed.grid), grid, "linear", 0.0).data.contiguous().to(dtype)
                m = self._moving_onehot().to(device=device, dtype=torch.float32)
                m = _antialias(m, _footprint_sigma_vox(self.moving.grid, grid)).contiguous().to(dtype)
                return f, m, FieldWarper(self.moving.grid, grid, device, dtype)

        key = (grid, str(torch.device(device) if device is not None else "cpu"), dtype)
        return _cached(self._cache, key, build)

    def dice(self, disp: Optional[torch.Tensor], grid: Grid) -> torch.Tensor:
        """Soft Dice (K,) per label (order of :attr:`labels`) for ``disp`` (1, 3, Z, Y, X) mm on ``grid``."""
        device = disp.device if disp is not None else None
        f, m, warper = self.prepare(grid, device, disp.dtype if disp is not None else torch.float32)
        w = warper.warp(m[None], disp, "bilinear", "zeros")[0]  # (K, Z, Y, X)
        k = f.shape[0]
        f2, w2 = f.reshape(k, -1), w.reshape(k, -1)
        inter = (f2 * w2).sum(1)
        denom = (f2 * f2).sum(1) + (w2 * w2).sum(1) + self.eps
        return 2.0 * inter / denom

    def loss(self, disp: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``1 - mean soft Dice`` (scalar, dimensionless) for ``disp`` (1, 3, Z, Y, X) float32 LPS mm on ``grid``."""
        if disp.dim() == 4:
            disp = disp[None]
        return 1.0 - self.dice(disp, grid).mean()

    def __repr__(self) -> str:
        return f"LabelPrompt(labels={self.labels}, weight={self.weight}, name={self.name!r})"


# ----------------------------------------------------------------------------------------------- landmarks
def _points(points, role: str) -> np.ndarray:
    try:
        p = np.asarray(points.detach().cpu() if isinstance(points, torch.Tensor) else points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{role} landmarks are not numbers: {exc}") from None
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise InputError(f"{role} landmarks must be a (P, 3) array of world LPS mm with P >= 1, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        bad = int((~np.isfinite(p).all(1)).sum())
        raise InputError(f"{role} landmarks: {bad} point(s) have NaN/Inf coordinates")
    return p


class LandmarkPrompt:
    """Landmark prompt: ``loss = mean_i ‖p_i + u(p_i) − q_i‖² / scale_mm²``.

    ``u(p_i)`` is the displacement trilinearly interpolated at the fixed landmark ``p_i`` (differentiable
    w.r.t. ``disp``). With ``scale_mm = 1`` the term is the mean squared landmark distance in mm²; in general
    it is dimensionless (distance in units of ``scale_mm``, squared), so ``weight`` compares a squared
    ``scale_mm``-sized landmark error with one unit of the rest of the objective.

    Fixed landmarks outside an IO grid (beyond its ITK buffer, half a voxel past the outer voxel centres)
    take the displacement of the nearest edge voxel (border clamping); :meth:`outside` counts them and the
    first loss on each grid logs a warning when there are any.

    Args:
        fixed_points: (P, 3) float64 fixed-side landmarks, world LPS mm.
        moving_points: (P, 3) float64 matching landmarks in the moving-side space of the solver (the space
            where the moving data are sampled at ``x + u(x)``), world LPS mm.
        weight: factor of the term in the IO objective.
        name: key of the term in the solver's history.
        scale_mm: distance (mm) that counts as one unit.

    Raises:
        InputError: shapes other than (P, 3), different counts, NaN/Inf coordinates.
    """

    def __init__(self, fixed_points, moving_points, weight: float = 1.0, name: str = "landmarks",
                 scale_mm: float = 1.0) -> None:
        p = _points(fixed_points, "fixed")
        q = _points(moving_points, "moving")
        if p.shape != q.shape:
            raise InputError(f"landmark prompt: {p.shape[0]} fixed and {q.shape[0]} moving landmarks; they must pair up")
        if not (scale_mm > 0 and np.isfinite(scale_mm)):
            raise ConfigError(f"landmark scale_mm must be a positive number of mm, got {scale_mm}")
        if weight < 0:
            raise ConfigError(f"landmark prompt weight must be >= 0, got {weight}")
        self.fixed_points = p
        self.moving_points = q
        self.weight = float(weight)
        self.name = name
        self.scale_mm = float(scale_mm)
        self._cache: OrderedDict = OrderedDict()

    def outside(self, grid: Grid) -> int:
        """Number of fixed landmarks outside ``grid`` (their displacement is clamped to the border)."""
        return int((~grid.inside(torch.from_numpy(self.fixed_points))).sum())

    def _prepare(self, grid: Grid, device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            pts = torch.from_numpy(self.fixed_points)
            coords = grid.world_to_norm_points(pts).to(dtype).reshape(1, -1, 1, 1, 3).to(device)
            offset = torch.from_numpy(self.fixed_points - self.moving_points).to(dtype).to(device)  # (P, 3)
            n_out = self.outside(grid)
            if n_out:
                log.warning("%s prompt: %d of %d fixed landmarks lie outside the IO grid (%s); their displacement "
                            "is taken from the nearest edge voxel", self.name, n_out, len(self.fixed_points),
                            grid.describe())
            return coords, offset

        return _cached(self._cache, (grid, str(device), dtype), build)

    def displacement_at_points(self, disp: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``u(p_i)``: (P, 3) float32 mm, trilinear (border-clamped) from ``disp`` (1, 3, Z, Y, X) mm on ``grid``."""
        if disp.dim() == 4:
            disp = disp[None]
        coords, _ = self._prepare(grid, disp.device, disp.dtype)
        u = grid_sample(disp[:1], coords, "bilinear", "border")  # (1, 3, P, 1, 1)
        return u.reshape(3, -1).T

    def residuals(self, disp: torch.Tensor, grid: Grid) -> torch.Tensor:
        """``p_i + u(p_i) - q_i``: (P, 3) float32 mm."""
        if disp.dim() == 4:
            disp = disp[None]
        _, offset = self._prepare(grid, disp.device, disp.dtype)
        return offset + self.displacement_at_points(disp, grid)

    def loss(self, disp: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Mean squared landmark distance / ``scale_mm²`` (scalar) for ``disp`` (1, 3, Z, Y, X) mm on ``grid``."""
        r = self.residuals(disp, grid)
        return (r * r).sum(1).mean() / (self.scale_mm ** 2)

    def __repr__(self) -> str:
        return f"LandmarkPrompt({len(self.fixed_points)} points, weight={self.weight}, name={self.name!r})"


# ----------------------------------------------------------------------------------------------- staging
def _warp_onehot_through(moving_labels: Image, ids: Sequence[int], affine, grid: Grid) -> Image:
    """Moving one-hot of ``ids`` seen through ``affine`` on ``grid``: (K, Z, Y, X) float32, channel ``i`` at
    fixed-side point ``y`` = indicator of ``ids[i]`` at ``affine(y)`` (linear interpolation, 0 outside), after
    anti-aliasing for the footprint of a ``grid`` voxel in the moving space."""
    oh = _onehot(moving_labels.data, ids)
    linear = None if affine is None else np.asarray(affine.linear)
    oh = _antialias(oh, _footprint_sigma_vox(moving_labels.grid, grid, linear))
    out = warp(Image(oh, moving_labels.grid, moving_labels.name), affine, grid, "linear", 0.0)
    return Image(out.data, grid, moving_labels.name)


def stage_prompts(fixed_labels: Optional[Image], moving_labels: Optional[Image], labels: Optional[Sequence[int]],
                  fixed_points, moving_points, affine, label_weight: float = 1.0, landmark_weight: float = 1.0,
                  *, grid: Optional[Grid] = None, scale_mm: float = 1.0, label_values: Optional[LabelValues] = None
                  ) -> list:
    """Prompts in the space of regcli's deformable stage.

    That stage works on the fixed side and sees the moving image already warped by the affine stage: the
    moving data at fixed-side world point ``y`` are the moving image at ``A(y)``. So

    * the moving label map is carried through ``A`` onto ``grid`` by warping its one-hot channels
      *linearly* (after anti-aliasing for a ``grid`` voxel's footprint in moving space). Linear one-hot
      warping keeps partial-volume boundaries to sub-voxel accuracy; a nearest-neighbour label warp would
      move every boundary by up to half a voxel (and a label thinner than a voxel could vanish), which
      would bias the prompt's optimum by that much. It costs ``K`` channels on ``grid`` instead of one map.
      When ``A`` is the identity (or None) and the moving map already lies on ``grid``, it is used as is.
    * the moving landmarks are mapped by ``A^{-1}`` (points go the other way round from images).

    The final transform ``[u, A]`` then sends a fixed point ``p`` to ``A(p + u(p))`` which the prompts pull
    towards the original moving landmark / label.

    Args:
        fixed_labels: (Z, Y, X) integer label map on any fixed-side grid, or None.
        moving_labels: (Z', Y', X') integer label map on the moving image's grid, or None.
        labels: label ids for the Dice term (None: every id > 0 present in both maps).
        fixed_points: (P, 3) world LPS mm fixed landmarks, or None.
        moving_points: (P, 3) world LPS mm moving landmarks in the *original moving* space, or None.
        affine: :class:`regcli.transforms.AffineTransform` (fixed world -> moving world) of the affine stage,
            or None for the identity.
        label_weight, landmark_weight: the prompts' weights (>= 0).
        grid: fixed-side grid on which to hold the warped moving one-hot (default ``fixed_labels.grid``). The
            working grid of the deformable stage is a good choice: it bounds memory at ``K`` channels there.
        scale_mm: the landmark prompt's distance unit (see :class:`LandmarkPrompt`).
        label_values: the values present in the two label maps when already known (:data:`LabelValues`), else
            counted here (once).

    Returns:
        A list with a :class:`LabelPrompt` when label maps are given and a :class:`LandmarkPrompt` when
        landmarks are (empty when neither is).

    Raises:
        InputError: only one of a pair given, or the prompts' own checks fail.
        ConfigError: negative weights.
    """
    if label_weight < 0 or landmark_weight < 0:
        raise ConfigError(f"prompt weights must be >= 0, got labels {label_weight}, landmarks {landmark_weight}")
    prompts: list = []
    if (fixed_labels is None) != (moving_labels is None):
        given = "fixed" if fixed_labels is not None else "moving"
        raise InputError(f"label prompt: only the {given} label map was given; it needs both a fixed and a moving one")
    if (fixed_points is None) != (moving_points is None):
        given = "fixed" if fixed_points is not None else "moving"
        raise InputError(f"landmark prompt: only {given} landmarks were given; it needs both")
    if fixed_labels is not None:
        # ids validated on the original maps (one clear message) before warping
        values = label_values if label_values is not None else label_map_values(fixed_labels, moving_labels)
        ids = check_label_prompt(fixed_labels, moving_labels, labels, values)
        target = grid or fixed_labels.grid
        identity = affine is None or np.allclose(affine.matrix, np.eye(4), atol=1e-9)
        if identity and moving_labels.grid.allclose(target, 1e-6):
            moving_seen = moving_labels
        else:
            moving_seen = _warp_onehot_through(moving_labels, ids, affine, target)
        prompts.append(LabelPrompt(fixed_labels, moving_seen, ids, label_weight, values=values))
    if fixed_points is not None:
        q = _points(moving_points, "moving")
        if affine is not None:
            q = affine.inverse().map_points(torch.from_numpy(q)).numpy()
        prompts.append(LandmarkPrompt(fixed_points, q, landmark_weight, scale_mm=scale_mm))
    return prompts
