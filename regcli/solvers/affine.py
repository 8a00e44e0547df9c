"""The affine stage: initialisation, then rigid and/or affine alignment, coarse to fine.

::

    res = run_affine_stage(fixed, moving, AffineConfig())
    res.transform          # AffineTransform, fixed world point -> moving world point (ITK convention)

Steps:

1. Pyramid: for each level (``cfg.levels_mm``, never finer than the largest voxel of either image, see
   :func:`effective_level`) both images are anti-aliased for the level and normalised to [0, 1] by robust
   percentiles (:mod:`regcli.features.intensity`). The fixed image lands on its level grid
   ``fixed.grid.with_spacing(level_mm)``, where the metric is evaluated; the moving image stays on a
   lattice of its own grid twice as fine (``moving.grid.with_spacing(level_mm / 2)``) and is sampled
   through the transform from there (the solver's ``moving_grid``), so fixed and moving may have any size,
   spacing, origin and direction. Masks become soft weights on the same grids.
2. Initialisation (``cfg.init``): ``moments`` matches the centres of mass, scores candidate rotations
   about the fixed centre of mass (a +-30 deg Euler grid and the 4 principal-axis alignments) with the
   metric at the coarsest level, refines the best 3 briefly (rigid) and keeps the best; ``center``
   matches the centres of mass; ``geometry`` the image centres; ``none`` starts from the identity.
3. For each stage in ``cfg.stages`` ("rigid", "affine") and each pyramid level, the shared
   :class:`~regcli.solvers.instance.InstanceOptimization` solver runs with the "rigid"/"affine" transform
   model of :mod:`regcli.solvers.models` and the similarity ``cfg.metric``. Each level runs in a few rounds
   of decreasing step size (:data:`LR_ROUNDS`; Adam restarts at each round), so the result settles
   instead of jittering by one Adam step around the optimum.

Defaults (``AffineConfig``: LNCC with a 5 mm radius, levels 8 and 4 mm, 40 and 20 iterations) were
chosen on the 10 synthseg_brain pairs (``benchmarks/affine_synthseg.py``): mean Dice 0.569 over 32
labels (ANTs ``Affine``: 0.552), about 2 s per pair on 2 threads.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from regcli.config import AffineConfig
from regcli.errors import ConvergenceError, GeometryError, InputError
from regcli.features.intensity import downsample, percentile_range, rescale
from regcli.resample import FieldWarper, grid_sample, resample_to_grid
from regcli.similarity import make_similarity
from regcli.solvers.instance import InstanceOptimization, Problem
from regcli.solvers.models import MODELS, rotation_matrix
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.transforms.affine import AffineTransform

# (fraction of the level's iterations, factor on the learning rate) for the rounds of one level
LR_ROUNDS: tuple[tuple[float, float], ...] = ((0.4, 1.0), (0.3, 0.3), (0.2, 0.1), (0.1, 0.01))


@dataclass
class AffineStageResult:
    """What the affine stage found.

    Attributes:
        transform: fixed world point -> moving world point (LPS mm), the final estimate.
        history: per stage and level (keys like ``"rigid/8mm"``), the solver's per-iteration records
            (``iteration``, ``loss``, ``similarity``, ``round``, ``lr``); ``"init"`` holds the scores of
            the initial candidates.
        seconds: wall time of the whole stage.
        init: the initial transform (after ``cfg.init``), fixed -> moving world.
    """

    transform: AffineTransform
    history: dict[str, list[dict]] = field(default_factory=dict)
    seconds: float = 0.0
    init: AffineTransform = field(default_factory=AffineTransform.identity)


@dataclass
class _Level:
    """One pyramid level: normalised fixed/moving data on their level grids (on the device)."""

    spacing: float
    fixed: torch.Tensor  # (1, Z, Y, X) float32 (the solver's dtype) in [0, 1], on ``grid``
    moving: torch.Tensor  # (1, Z', Y', X') float32 (the solver's dtype) in [0, 1], on ``moving_grid``
    grid: Grid
    moving_grid: Grid
    fixed_mask: Optional[torch.Tensor]  # (Z, Y, X) weights in [0, 1]
    moving_mask: Optional[torch.Tensor]  # (Z', Y', X') weights in [0, 1]

    def problem(self) -> Problem:
        return Problem(self.fixed, self.moving, self.grid, self.moving_grid, self.fixed_mask, self.moving_mask)


# ------------------------------------------------------------------------------------------- geometry
def center_of_mass(data: torch.Tensor, grid: Grid, weights: Optional[torch.Tensor] = None) -> np.ndarray:
    """Intensity-weighted centroid (3,) in world LPS mm of non-negative ``data`` (Z, Y, X) on ``grid``."""
    w = torch.clamp(data.detach().to(torch.float64), min=0.0)
    if weights is not None:
        w = w * weights.detach().to(torch.float64)
    total = float(w.sum())
    if not total > 0:
        return grid.center_world()
    x = grid.world_coords(torch.float64, w.device)
    return (w[..., None] * x).sum(dim=(0, 1, 2)).cpu().numpy() / total


def second_moments(data: torch.Tensor, grid: Grid, center: np.ndarray,
                   weights: Optional[torch.Tensor] = None) -> np.ndarray:
    """Intensity-weighted covariance (3, 3) in mm^2 of world positions about ``center``."""
    w = torch.clamp(data.detach().to(torch.float64), min=0.0)
    if weights is not None:
        w = w * weights.detach().to(torch.float64)
    total = float(w.sum())
    x = grid.world_coords(torch.float64, w.device) - torch.as_tensor(center, dtype=torch.float64, device=w.device)
    if not total > 0:
        return np.eye(3)
    xw = x * w[..., None]
    return torch.einsum("zyxi,zyxj->ij", xw, x).cpu().numpy() / total


def _overlap_or_raise(fixed: Image, moving: Image) -> None:
    """GeometryError when no voxel centre of ``fixed`` (on a coarse lattice) lies inside ``moving``."""
    coarse = fixed.grid.with_spacing(max(max(fixed.grid.extent_mm) / 16.0, max(fixed.grid.spacing)))
    pts = coarse.world_coords(torch.float64)
    if bool(moving.grid.inside(pts).any()):
        return
    dist = float(np.linalg.norm(fixed.grid.center_world() - moving.grid.center_world()))
    raise GeometryError(
        f"fixed image '{fixed.name or 'fixed'}' and moving image '{moving.name or 'moving'}' do not overlap in world "
        f"space: their centres are {dist:.1f} mm apart; use affine init 'moments' or 'center' to align them first, "
        "or fix the image headers"
    )


def _euler(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation (3, 3) about the LPS x, then y, then z axes (degrees)."""
    rv = [np.array([1.0, 0, 0]) * math.radians(rx), np.array([0, 1.0, 0]) * math.radians(ry),
          np.array([0, 0, 1.0]) * math.radians(rz)]
    R = np.eye(3)
    for v in rv:
        R = rotation_matrix(torch.as_tensor(v, dtype=torch.float64)).numpy() @ R
    return R


def _principal_axes(cov: np.ndarray) -> np.ndarray:
    """Eigenvectors (columns) of a covariance, sorted by decreasing eigenvalue, right-handed."""
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(vals)[::-1]]
    if np.linalg.det(vecs) < 0:
        vecs[:, 2] *= -1
    return vecs


def _candidate_rotations(fixed_cov: np.ndarray, moving_cov: np.ndarray, angles_deg: tuple[float, ...],
                         max_axes_angle_deg: float = 180.0) -> list[np.ndarray]:
    """Rotations (fixed -> moving directions) to try: identity, a grid of Euler angles, and the principal
    axis alignments (the 4 sign choices that keep a right-handed frame) within ``max_axes_angle_deg``.

    The principal-axis candidates catch large rotations (90-135 deg on the brain pairs, where the
    centre-of-mass start and the +-30 deg grid both fail); the metric, not the axes, decides between
    them, so a sign ambiguity of the axes costs nothing but 4 evaluations."""
    rots = [_euler(a, b, c) for a, b, c in itertools.product(angles_deg, repeat=3)]
    Ef, Em = _principal_axes(fixed_cov), _principal_axes(moving_cov)
    for signs in ((1, 1, 1), (-1, -1, 1), (-1, 1, -1), (1, -1, -1)):
        R = Em @ np.diag(signs) @ Ef.T
        ang = math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
        if ang <= max_axes_angle_deg:
            rots.append(R)
    return rots


# ------------------------------------------------------------------------------------------- helpers
def _check_scalar(image: Image, role: str) -> None:
    if image.data.dim() != 3:
        raise InputError(
            f"{role} image '{image.name}' has shape {tuple(image.data.shape)}; the affine stage needs a scalar 3D image"
        )
    if torch.is_floating_point(image.data):
        bad = int((~torch.isfinite(image.data)).sum())
        if bad:
            raise InputError(f"{role} image '{image.name}' has {bad} NaN/Inf voxels")


def _level_image(image: Image, level_mm: float, value_range: tuple[float, float], resample: bool) -> Image:
    """``image`` smoothed for ``level_mm`` voxels, sampled on a lattice ``OVERSAMPLING`` times finer
    (never finer than its own voxels) and mapped to [0, 1] by ``value_range`` (clipped).

    The moving image stays on that lattice, so sampling it through the transform adds little
    interpolation blur; the fixed image (``resample=True``) is then interpolated onto its level grid
    ``fixed.grid.with_spacing(level_mm)`` exactly as the solver samples the moving image (same
    coordinates, edge padding, after the same clipping), so an image registered to itself matches bit
    for bit at the identity and the identity is the metric's exact optimum."""
    fine_mm = max(level_mm / OVERSAMPLING, min(image.grid.spacing))
    fine = downsample(image, fine_mm, level_mm)
    fine = fine.with_data(rescale(fine.data, *value_range))
    if not resample:
        return fine
    target = image.grid.with_spacing(level_mm)
    if fine.grid.allclose(target, rtol=1e-6):
        return fine
    data = FieldWarper(fine.grid, target, fine.data.device).warp(fine.data[None], None, "bilinear", "border")
    return Image(data[0], target, image.name, dict(image.meta))


MIN_LEVEL_VOXELS = 5  # a pyramid level keeps at least this many voxels across the smaller field of view


def effective_level(level_mm: float, fixed: Grid, moving: Grid, coarsest_mm: Optional[float] = None) -> float:
    """The voxel size (mm) a pyramid level really uses.

    ``level_mm``, but (1) when the coarsest level of the pyramid (``coarsest_mm``, default ``level_mm``) would
    hold fewer than ``MIN_LEVEL_VOXELS`` voxels across the smallest field of view of either image, every level
    shrinks by the same factor (an 8 mm level on an 18 mm prostate volume would hold 2 voxels and nothing to
    align; the pyramid's ratios are kept so the finest level still resolves rotations); and (2) never finer
    than the largest voxel size of either image. Thick slices (e.g. 3 mm) hold no detail finer than that
    along their normal; a level finer than that mixes sharp in-plane detail with blurred through-plane
    detail, and that mismatch biases the optimum (about 2 deg of tilt on a 3 mm-slice phantom at a 2 mm
    level). (2) wins over (1)."""
    fov = min(min(n * sp for n, sp in zip(g.size, g.spacing)) for g in (fixed, moving))
    coarsest = max(float(level_mm), float(coarsest_mm or level_mm))
    scale = min(1.0, fov / (MIN_LEVEL_VOXELS * coarsest))
    return max(float(level_mm) * scale, max(fixed.spacing), max(moving.spacing))


def _intensity_range(image: Image, level_mm: float, mask: Optional[Image], role: str) -> tuple[float, float]:
    """Robust (0.5, 99.5) percentile range of ``image`` anti-aliased for ``level_mm`` on
    ``image.grid.with_spacing(level_mm)``, inside ``mask`` when given."""
    smooth = downsample(image, level_mm)
    weights = _mask_level(mask, level_mm, smooth.grid, role, smooth.data.device) if mask is not None else None
    return percentile_range(smooth.data, 0.5, 99.5, weights)


def _mask_level(mask: Optional[Image], spacing: float, target: Grid, role: str, device) -> Optional[torch.Tensor]:
    """Mask (non-zero = inside) as (Z, Y, X) float32 weights in [0, 1] on ``target`` (a level grid),
    anti-aliased like the images, so a level voxel half inside the mask weighs about 1/2."""
    if mask is None:
        return None
    if mask.data.dim() != 3:
        raise InputError(f"{role} mask '{mask.name}' must be a scalar 3D image, got shape {tuple(mask.data.shape)}")
    m = mask.with_data((mask.data > 0).to(torch.float32))
    if float(m.data.sum()) == 0:
        raise GeometryError(f"{role} mask '{mask.name}' has 0 voxels inside the image")
    out = downsample(m, spacing)
    if not out.grid.allclose(target, rtol=1e-6):
        out = resample_to_grid(out, target)
    if float(out.data.sum()) == 0:
        raise GeometryError(f"{role} mask '{mask.name}' has 0 voxels inside the {role} image")
    return out.data.clamp(0.0, 1.0).to(device)


def _progress_adapter(progress: Any, stage: str, offset: int,
                      total: int) -> Optional[Callable[[int, int, float], None]]:
    """Solver callback ``(i, n, loss)`` of one round, reported as iteration ``offset + i`` of ``total``
    to ``progress``: a ``Progress`` object (``start/update/finish``) or a callable ``progress(stage, i, n)``."""
    if progress is None:
        return None
    if hasattr(progress, "update") and hasattr(progress, "start"):

        def cb(i: int, n: int, loss: float) -> None:
            k = offset + i
            if k == 1:
                progress.start(stage, total)
            progress.update(stage, k, f"loss {loss:.4g}")
            if k >= total:
                progress.finish(stage)

        return cb
    return lambda i, n, loss: progress(stage, offset + i, total)


def _similarity_params(cfg: AffineConfig, grid: Grid) -> dict:
    """Parameters of the similarity ``cfg.metric`` on a level grid (a look-up per metric name):
    LNCC: window radius in mm with the level spacing, variance floor :data:`LNCC_EPS`; MI: bins and a
    regular voxel stride that keeps the joint histogram at about :data:`MI_SAMPLES` samples (ANTs'
    "Regular" sampling); anything else: no parameters."""
    build = _METRIC_PARAMS.get(cfg.metric)
    return build(cfg, grid) if build is not None else {}


_METRIC_PARAMS: dict[str, Callable[[AffineConfig, Grid], dict]] = {
    "lncc": lambda cfg, grid: {"radius_mm": cfg.lncc_radius_mm, "spacing": grid.spacing, "eps": LNCC_EPS},
    "mi": lambda cfg, grid: {"bins": cfg.mi_bins, "stride": max(1, int(grid.num_voxels // MI_SAMPLES))},
}


# ------------------------------------------------------------------------------------------- the stage
class _Runner:
    """Builds the pyramid once and runs initialisation and the per-level solves."""

    def __init__(self, fixed: Image, moving: Image, cfg: AffineConfig, fixed_mask: Optional[Image],
                 moving_mask: Optional[Image], progress: Any, device, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(device) if device is not None else fixed.data.device
        self.dtype = dtype
        self.fixed_center = fixed.grid.center_world()
        self.moving_center = moving.grid.center_world()
        coarsest = max(cfg.levels_mm)
        spacings = sorted({effective_level(lv, fixed.grid, moving.grid, coarsest) for lv in cfg.levels_mm})
        # one intensity scaling per image, from the image smoothed to the finest level on its own
        # with_spacing grid (inside its mask when given): the same data give the same scaling, so
        # identical images stay identical (even for MSE), and voxel noise does not set the range
        f_range = _intensity_range(fixed, spacings[0], fixed_mask, "fixed")
        m_range = _intensity_range(moving, spacings[0], moving_mask, "moving")
        f_levels = {lv: _level_image(fixed, lv, f_range, True) for lv in spacings}
        m_levels = {lv: _level_image(moving, lv, m_range, False) for lv in spacings}
        fm = {lv: _mask_level(fixed_mask, lv, f_levels[lv].grid, "fixed", self.device) for lv in spacings}
        mm = {lv: _mask_level(moving_mask, lv, m_levels[lv].grid, "moving", self.device) for lv in spacings}
        self.levels: list[_Level] = []  # one per entry of cfg.levels_mm (same order)
        for lv in (effective_level(v, fixed.grid, moving.grid, coarsest) for v in cfg.levels_mm):
            self.levels.append(_Level(
                lv, f_levels[lv].data[None].to(self.device, dtype), m_levels[lv].data[None].to(self.device, dtype),
                f_levels[lv].grid, m_levels[lv].grid, fm[lv], mm[lv],
            ))
        coarse = self.levels[int(np.argmax(cfg.levels_mm))]
        self.coarse = coarse
        self.fixed_com = center_of_mass(coarse.fixed[0], coarse.grid, coarse.fixed_mask)
        self.moving_com = center_of_mass(coarse.moving[0], coarse.moving_grid, coarse.moving_mask)
        cov = second_moments(coarse.fixed[0], coarse.grid, self.fixed_com, coarse.fixed_mask)
        self.fixed_cov = cov
        self.radius_mm = float(math.sqrt(max(np.trace(cov), 1e-6)))
        self.history: dict[str, list[dict]] = {}

    # ----------------------------------------------------------------- solver runs
    def solve(self, model: str, level: _Level, init: AffineTransform, iterations: int,
              key: str) -> tuple[AffineTransform, float]:
        """Run the shared solver on one level in rounds of decreasing step (:data:`LR_ROUNDS`), each round
        starting where the previous one ended.

        Safeguard: the level's result is kept only if it scores better than the transform the level was
        given (beyond float32 round-off); otherwise the level returns its start. A level so never makes
        its own metric worse, and an exact start (e.g. an image registered to itself) stays exact
        instead of inheriting the last Adam steps' jitter. Returns (transform, its loss at this level).
        """
        cfg = self.cfg
        start_loss = self.score(level, [init])[0]
        current = init
        records = self.history.setdefault(key, [])
        done = 0
        for r, (frac, factor) in enumerate(LR_ROUNDS):
            n = iterations - done if r == len(LR_ROUNDS) - 1 else int(round(iterations * frac))
            if n <= 0:
                continue
            lr = cfg.learning_rate * factor
            solver = InstanceOptimization(
                model=model, similarity=cfg.metric, optimizer="adam", regularizer="none", reg_weight=0.0,
                iterations=n, lr=lr,
                model_params={"center": self.fixed_com, "radius_mm": self.radius_mm},
                similarity_params=_similarity_params(cfg, level.grid),
                stage=f"affine stage ({key})",
                progress=_progress_adapter(self.progress, f"affine {key}", done, iterations),
            )
            res = solver.run(level.problem(), init=current)
            for h in res.history:
                records.append({**h, "iteration": h["iteration"] + done, "round": r, "lr": lr})
            done += n
            current = res.model.transform()
        loss = self.score(level, [current])[0]
        if not math.isfinite(loss):
            raise ConvergenceError(f"affine stage ({key}) diverged: the final loss is {loss}")
        self._check(current, key)
        if not _improves(loss, start_loss):
            return init, start_loss
        return current, loss

    def _check(self, tx: AffineTransform, key: str) -> None:
        A = tx.linear
        if not np.all(np.isfinite(tx.matrix)):
            raise ConvergenceError(f"affine stage ({key}) produced a non-finite transform")
        det = float(np.linalg.det(A))
        if not (0.1 < det < 10.0):
            raise ConvergenceError(
                f"affine stage ({key}) diverged: the linear part has determinant {det:.3g} (folding or collapse)"
            )

    def score(self, level: _Level, transforms: list[AffineTransform]) -> list[float]:
        """Similarity loss of each transform at ``level`` (no optimisation)."""
        sim = make_similarity(self.cfg.metric, **_similarity_params(self.cfg, level.grid))
        model = MODELS.get("rigid")(level.grid, init=None, center=self.fixed_com, device=self.device, dtype=self.dtype)
        warper = FieldWarper(level.moving_grid, level.grid, self.device, self.dtype)
        fixed = level.fixed[None]
        moving = level.moving[None]
        fmask = level.fixed_mask[None, None] if level.fixed_mask is not None else None
        mmask = level.moving_mask[None, None] if level.moving_mask is not None else None
        out = []
        with torch.no_grad():
            for tx in transforms:
                M = torch.as_tensor(tx.matrix, dtype=torch.float64, device=self.device)
                c = model.center
                model.A0.copy_(M[:3, :3])
                model.translation.copy_(M[:3, :3] @ c + M[:3, 3] - c)
                coords = warper.coords(model())
                warped = grid_sample(moving, coords, "bilinear", "border")
                mask = fmask
                if mmask is not None:
                    wm = grid_sample(mmask, coords, "bilinear", "zeros")
                    mask = wm if mask is None else mask * wm
                out.append(float(sim(fixed, warped, mask)))
        return out

    # ----------------------------------------------------------------- initialisation
    def initial_transform(self) -> AffineTransform:
        cfg = self.cfg
        c = self.fixed_com
        if cfg.init == "none":
            return AffineTransform.identity(c)
        if cfg.init == "geometry":
            f_c = self.fixed_center
            m_c = self.moving_center
            return AffineTransform.from_linear(np.eye(3), m_c - f_c, c)
        shift = self.moving_com - self.fixed_com
        base = AffineTransform.from_linear(np.eye(3), shift, c)
        if cfg.init == "center":
            return base
        # moments: candidate rotations about the fixed centre of mass, mapped onto the moving centre
        coarse = self.coarse
        m_cov = second_moments(coarse.moving[0], coarse.moving_grid, self.moving_com, coarse.moving_mask)
        rots = _candidate_rotations(self.fixed_cov, m_cov, INIT_ANGLES_DEG)
        cands = [AffineTransform.from_linear(R, shift, c) for R in rots]
        scores = self.score(coarse, cands)
        # best score first; candidates within round-off of the best (ties) go first, the smallest rotation
        # first, so that an image registered to itself starts from the exact identity, not from a principal-axis
        # candidate that differs from it by the eigenvectors' round-off and scores the same within round-off
        best_score = min(scores)
        angle = [float(np.linalg.norm(_rotvec(t.linear))) for t in cands]
        order = sorted(range(len(cands)),
                       key=lambda i: (1, scores[i]) if _improves(best_score, scores[i]) else (0, angle[i]))
        records = self.history.setdefault("init", [])
        for i in order[:INIT_REFINE]:
            records.append({"candidate": int(i), "score": float(scores[i]),
                            "rotation_deg": float(np.degrees(np.linalg.norm(_rotvec(cands[i].linear))))})
        best, best_loss = cands[int(order[0])], math.inf
        for k, i in enumerate(order[:INIT_REFINE]):
            tx, loss = self.solve("rigid", coarse, cands[int(i)], INIT_REFINE_ITERATIONS, f"init/candidate{k}")
            records.append({"candidate": int(i), "refined_loss": loss})
            if _improves(loss, best_loss):
                best, best_loss = tx, loss
        return best

    # ----------------------------------------------------------------- all stages
    def run(self) -> tuple[AffineTransform, AffineTransform]:
        init = self.initial_transform()
        current = init
        order = sorted(range(len(self.levels)), key=lambda i: -self.cfg.levels_mm[i])
        for stage in self.cfg.stages:
            for i in order:
                level = self.levels[i]
                iters = self.cfg.iterations[i]
                if iters <= 0:
                    continue
                current, _ = self.solve(stage, level, current, iters, f"{stage}/{level.spacing:g}mm")
        return current, init


def _improves(loss: float, best: float) -> bool:
    """``loss`` is better than ``best`` by more than float32 round-off (relative 1e-6)."""
    if not math.isfinite(best):
        return math.isfinite(loss)
    return loss < best - 1e-6 * max(1.0, abs(best))


def _rotvec(R: np.ndarray) -> np.ndarray:
    from regcli.solvers.models import rotation_vector

    U, _, Vt = np.linalg.svd(R)
    return rotation_vector(U @ Vt)


# level images are smoothed for the level but sampled on a lattice this many times finer (see _level_image)
OVERSAMPLING = 2.0
# LNCC's local variance floor on the [0, 1]-normalised level images: a local standard deviation under 3 %
# of the range counts as flat (1e-5 instead: G2 oblique phantom 0.7 deg worse, synthseg Dice the same)
LNCC_EPS = 1e-3
# voxels used by MI per evaluation (a regular stride through the level image)
MI_SAMPLES = 40000
# candidate Euler angles (degrees) per axis for the "moments" search, and how many are refined
INIT_ANGLES_DEG: tuple[float, ...] = (-30.0, 0.0, 30.0)
INIT_REFINE = 3
INIT_REFINE_ITERATIONS = 30


def run_affine_stage(fixed: Image, moving: Image, cfg: AffineConfig, fixed_mask: Optional[Image] = None,
                     moving_mask: Optional[Image] = None, progress: Any = None, device=None,
                     dtype: torch.dtype = torch.float32) -> AffineStageResult:
    """Align ``moving`` to ``fixed`` with a linear transform (see the module docstring).

    Args:
        fixed, moving: scalar (Z, Y, X) images on any grids (float or integer intensities, any range).
        cfg: the affine configuration (init, stages, metric, pyramid levels in mm, iterations, ...).
        fixed_mask, moving_mask: optional masks on the fixed/moving grids (non-zero = inside); they weight
            the metric.
        progress: a ``Progress`` object (start/update/finish) or a callable ``progress(stage, i, n)``.
        device: torch device for the optimisation (default: the fixed image's device).
        dtype: floating type of the solver (``precision``): the normalised level images, the metric and the
            sampled displacements; the parameters and geometry are float64 either way.
    Returns:
        :class:`AffineStageResult` with the fixed -> moving world transform.
    Raises:
        GeometryError: the images do not overlap in world space and ``cfg.init`` is "none"/"geometry";
            an empty mask.
        ConvergenceError: the optimiser diverged (non-finite loss or a degenerate matrix).
    """
    t0 = time.perf_counter()
    _check_scalar(fixed, "fixed")
    _check_scalar(moving, "moving")
    if cfg.init in ("none", "geometry"):
        _overlap_or_raise(fixed, moving)
    runner = _Runner(fixed, moving, cfg, fixed_mask, moving_mask, progress, device, dtype)
    transform, init = runner.run()
    return AffineStageResult(transform, runner.history, time.perf_counter() - t0, init)
