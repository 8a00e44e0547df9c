"""ConvexAdam: MIND-SSC features, coupled-convex discrete optimisation, then Adam instance optimisation.

Siebert, Hansen, Heinrich, "Fast 3D registration with accurate optimisation and little learning for
Learn2Reg 2021". The stages, on the isotropic working grid that fixed and moving already share:

1. MIND-SSC features (:func:`regcli.features.mind.mind_ssc`) of both images, 12 channels.
2. Features average-pooled by ``grid_sp``; dense SSD cost volume over ``(2*disp_hw+1)^3`` integer shifts;
   coupled-convex optimisation (:mod:`regcli.solvers.convex`); with ``inverse_consistency`` the same for
   moving -> fixed and both fields symmetrised.
3. Instance optimisation with the shared solver (:class:`regcli.solvers.instance.InstanceOptimization`) on a
   grid of ``grid_sp_adam`` working voxels (features pooled the same way), initialised with step 2.
4. Refinement (regcli's addition, ``refine_iterations`` > 0): a few more Adam iterations with the
   displacement and the similarity on the working grid itself, on MIND-SSC features of dilation
   ``refine_mind_dilation`` (1 by default, i.e. finer than step 1's), with Adam's eps set to a per-voxel
   gradient floor so that an exact match stays still (RELIABILITY G1). On the three hardest synthseg pairs
   (``benchmarks/tune_convexadam.py``) the published IO gives mean Dice 0.662 and the refinement 0.680
   (docs/benchmarks.md has the tuning table). With ``refine_iterations=0`` the method is the published one.

Both IO levels evaluate the similarity only on its *support* (:func:`mind_support`, dilated): MIND-SSC is
exactly 1 in every channel where the image is locally constant, so flat background adds nothing.
5. Trilinear upsampling of the result to the working grid (when the last level is coarser).

Precision: every step computes in the dtype of the working-grid images (float32; float64 when the pipeline
casts them for ``precision: float64``); masks stay float32 weights.

Units: every field that leaves a helper is world LPS mm on a :class:`Grid`; the discrete stage works in
coarse-grid voxels and is converted through that grid's index-to-world matrix. Grids whose size is not a
multiple of a pooling factor are padded at their high-index end (edge values) and the padding is
ignored by the similarity (zero weight) and cropped by the final resampling.

Parameter units follow the published method (so its defaults carry over): ``mind_radius``,
``mind_dilation``, ``grid_sp`` and ``grid_sp_adam`` are working-grid voxels, ``disp_hw`` coarse voxels, and the
coupling weights multiply squared coarse voxels. The diffusion regulariser of :mod:`regcli.regularizers.flow`
on mm fields divided by the IO spacing equals the published voxel-unit penalty, so ``reg_weight`` (lambda)
carries over unchanged. One exception: the IO ``learning_rate`` is Adam's step in **mm** (as everywhere in
regcli), where the published code steps one IO voxel (4 mm on the default 2 mm working grid). Adam moves every
parameter by about ``lr`` at its first significant gradient, even at an exact optimum; with 1 mm the drift of
an image registered to itself is ~4x smaller (RELIABILITY G1 holds), and Dice on the
neurite brain pair is unchanged (0.6651/0.6693 vs 0.6666/0.6701 for the two directions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from regcli.config import RegisterConfig
from regcli.errors import ConvergenceError, GeometryError, InputError
from regcli.features.mind import mind_ssc_pair
from regcli.resample import FieldWarper, resample_to_grid, upsample_field
from regcli.solvers.convex import convex_displacement, symmetrise
from regcli.solvers.instance import Problem, solver_from_config
from regcli.spaces.grid import Grid, apply_linear, padded_grid, pooled_grid
from regcli.spaces.image import Image
from regcli.transforms.displacement import DisplacementField

ProgressFn = Callable[[str, int, int], None]

STAGE_FEATURES = "MIND-SSC features"
STAGE_CONVEX = "coupled convex"
STAGE_INSTANCE = "instance optimisation"
STAGE_REFINE = "refinement"


@dataclass
class DeformableResult:
    """Output of a deformable method.

    Attributes:
        field: displacement (3, Z, Y, X) float32 (float64 with ``precision: float64``), world LPS mm, on the
            fixed (working) grid; maps a fixed point ``x`` to the moving point ``x + u(x)``.
        history: loss curves per stage, e.g. ``{"convex": [...], "instance": [...]}``.
        timings: seconds per step (and ``"total"``).
        inverse: the method's own inverse field on the same grid (e.g. a network's backward map), or None:
            the pipeline then inverts ``field`` by fixed-point iteration.
        report: what the method adds to report.json's ``extra.method`` (e.g. a network's predicted task mixture).
    """

    field: DisplacementField
    history: dict[str, list[dict]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    inverse: Optional[DisplacementField] = None
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- grid helpers
#: fewest working-grid voxels the fixed image may span along an axis before the deformable stage is meaningless
#: there: the instance optimisation pools ``grid_sp_adam`` (2) working voxels per node, so below 4 it has one node
#: along that axis (a translation), the discrete stage's ``grid_sp`` (6) one long before, and every MIND-SSC
#: descriptor (patches ``mind_dilation`` + ``mind_radius`` = 3 voxels away) reads mostly beyond the image
MIN_WORKING_VOXELS = 4


def coarse_working_grid(fixed_grid: Grid, work: Grid) -> Optional[str]:
    """A one-line warning when the fixed image spans fewer than :data:`MIN_WORKING_VOXELS` voxels of the deformable
    working grid ``work`` along some axis (a header with 0.001 mm voxels made the 2 mm working grid of a 40-voxel
    image 6 voxels, 12 mm, over 0.04 mm of image: the deformable stage ran and did nothing); None otherwise. Its
    extent is measured along its own axes, which the working grid shares (same direction)."""
    extent = [n * sp for n, sp in zip(fixed_grid.size, fixed_grid.spacing)]
    across = [e / w for e, w in zip(extent, work.spacing)]
    short = [axis for axis, a in zip("xyz", across) if a < MIN_WORKING_VOXELS]
    if not short:
        return None
    finest = min(e / MIN_WORKING_VOXELS for e, a in zip(extent, across) if a < MIN_WORKING_VOXELS)
    step = 10.0 ** (math.floor(math.log10(finest)) - 1) if finest > 0 else 0.0
    finest = math.floor(finest / step) * step if step else finest  # 2 significant digits, rounded down
    spacing = f"{work.spacing[0]:.4g}" if len(set(work.spacing)) == 1 else " x ".join(f"{v:.4g}" for v in work.spacing)
    return (f"the deformable working grid is {' x '.join(map(str, work.size))} voxels of {spacing} mm, but the "
            f"fixed image spans only "
            f"{' x '.join(f'{v:.4g}' for v in extent)} mm, under {MIN_WORKING_VOXELS} working voxels along "
            f"{', '.join(short)}: the deformable stage can barely deform it; use a working spacing of {finest:.2g} mm "
            "or finer (--working-spacing, working_spacing_mm), or check the spacing in the image's header")


def _pad_high(data: torch.Tensor, pad_xyz: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Pad (N, C, Z, Y, X) at the high-index end by (px, py, pz) voxels (``replicate`` or ``constant`` 0)."""
    px, py, pz = pad_xyz
    if px == py == pz == 0:
        return data
    return F.pad(data, (0, px, 0, py, 0, pz), mode=mode)


def _pool(data: torch.Tensor, grid: Grid, factor: int, mode: str = "replicate") -> tuple[torch.Tensor, Grid]:
    """Pad to a multiple of ``factor`` and average-pool. data (N, C, Z, Y, X) on ``grid``."""
    g_pad, pad = padded_grid(grid, factor)
    padded = _pad_high(data, pad, mode)
    if factor == 1:
        return padded, g_pad
    return F.avg_pool3d(padded, factor, stride=factor), pooled_grid(g_pad, factor)


def pooled_weights(mask: Optional[torch.Tensor], grid: Grid, factor: int, dev) -> Optional[torch.Tensor]:
    """(Z', Y', X') similarity weights on the grid of :func:`_pool` by ``factor``: the (Z, Y, X) ``mask`` on ``grid``
    average-pooled, 0 on the padding beyond the image; None when there is neither a mask nor padding (all 1)."""
    _, pad = padded_grid(grid, factor)
    if mask is None and not any(pad):
        return None
    base = mask.to(dev) if mask is not None else torch.ones(grid.shape, device=dev)
    return _pool(base[None, None], grid, factor, "constant")[0][0, 0]


def index_to_world_vectors(disp_index: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(3, Z, Y, X) displacement in voxels of ``grid`` (components x, y, z) -> world LPS mm."""
    A = grid.index_to_world()[:3, :3]  # float64, cast to the field's dtype by apply_linear
    return apply_linear(A, disp_index.permute(1, 2, 3, 0)).permute(3, 0, 1, 2).contiguous()


# the instance optimisation samples both images this far (in voxels of its grid, along every index axis) off the
# nodes of the trilinear interpolation; see :func:`off_nodes`
OFF_NODE_VOXELS = 1e-3


def off_nodes(fixed: torch.Tensor, start: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pose an instance optimisation on ``grid`` (fixed and moving data both on it) so that no sample of either
    image lies on a node of the trilinear interpolation.

    The discrete stages give whole-voxel shifts wherever neighbouring shifts agree, so an optimisation started
    there samples the moving data exactly on nodes, where the derivative has two sides and the last bit of the
    sampling coordinate decides which one ``grid_sample`` takes. Float32 and float64 (and devices) round that
    bit differently, and Adam's first, sign-like steps follow the side taken: on a brain the results differed by
    0.4 mm on average (RELIABILITY N3, docs/conventions.md). Here both images are sampled ``s`` =
    ``OFF_NODE_VOXELS`` voxels further along every axis (towards the positive LPS direction it points to, so the
    same world vector however the image is stored), 100 times beyond float32's rounding of a coordinate, so the
    same side is taken everywhere; an image registered to itself still has a zero residual at the start
    (moving the start alone would not: Adam would step on the residual it creates).

    Args:
        fixed: (1, C, Z, Y, X) fixed data on ``grid``.
        start: (3, Z, Y, X) world mm, the start on ``grid``.
    Returns:
        ``(fixed sampled at x + s, start + s, s)``, ``s`` a (3, 1, 1, 1) world-mm vector. The solver's result
        ``w`` gives the field ``w - s`` (to within ``s`` times the field's gradient: about 1e-4 mm).
    """
    # along each index axis towards the positive LPS direction that axis mostly points to: the same world vector
    # however the image is stored (a flipped axis would otherwise shift the other way, and the solve, which
    # amplifies such differences in flat regions, ended 1 mm apart on a brain stored LIA and LPS)
    signs = [sign for _, sign in grid.dominant_axes()]
    step = torch.tensor(signs, dtype=start.dtype, device=start.device).view(3, 1, 1, 1) * OFF_NODE_VOXELS
    s = index_to_world_vectors(step, grid)
    fixed_s = FieldWarper(grid, grid, fixed.device, fixed.dtype).warp(fixed, s.expand(3, *grid.shape))
    return fixed_s, start + s, s


# ---------------------------------------------------------------------------------------------- the method
def _scalar(image: Image, role: str) -> torch.Tensor:
    data = image.data
    if data.dim() == 4 and data.shape[0] == 1:
        data = data[0]
    if data.dim() != 3:
        raise InputError(f"convexadam needs a scalar 3D {role} image, got data of shape {tuple(image.data.shape)}"
                         + (f" ({image.name})" if image.name else ""))
    if not torch.is_floating_point(data):
        data = data.to(torch.float32)
    return data


def method_setup(name: str, fixed: Image, moving: Image, device, progress: Optional[ProgressFn]):
    """What every deformable method starts with: the shared working grid (a GeometryError when fixed and moving
    are not on it), the output device (fixed's), the compute device, and a ``report(stage, i, n)`` that calls
    ``progress`` when one is given."""
    grid = fixed.grid
    if not grid.allclose(moving.grid):
        raise GeometryError(f"{name} needs fixed and moving on the same working grid: fixed is "
                            f"{grid.describe()}, moving is {moving.grid.describe()}")
    out_device = fixed.data.device
    dev = torch.device(device) if device is not None else out_device

    def report(stage: str, i: int, n: int) -> None:
        if progress is not None:
            progress(stage, i, n)

    return grid, out_device, dev, report


def _mask_on(mask: Optional[Image], grid: Grid, role: str) -> Optional[torch.Tensor]:
    """(Z, Y, X) float32 weights in [0, 1] on ``grid`` (resampled linearly when the mask is elsewhere)."""
    if mask is None:
        return None
    if not mask.grid.allclose(grid):
        mask = resample_to_grid(Image(mask.data.to(torch.float32), mask.grid, mask.name), grid, "linear", 0.0)
    m = mask.data.to(torch.float32)
    if m.dim() == 4 and m.shape[0] == 1:
        m = m[0]
    m = (m > 0).to(torch.float32) if m.max() > 1 else m.clamp(0, 1)
    if float(m.sum()) <= 0:
        name = f" ({mask.name})" if mask.name else ""
        raise GeometryError(f"{role} mask has 0 voxels inside the working grid{name}")
    return m


SUPPORT_MARGIN_MM = 4.0


def mind_support(feat: torch.Tensor, grid: Grid, tol: float = 1e-6) -> torch.Tensor:
    """(Z, Y, X) bool: voxels where (1, C, Z, Y, X) MIND-SSC features are not flat.

    In a region of constant intensity every patch distance is zero and MIND-SSC is exactly 1 in every
    channel (also after average pooling), in either image; there the feature SSD between the two images is
    zero and so is its gradient, so instance optimisation only needs the other voxels.
    """
    return (feat.amax(dim=1)[0] - feat.amin(dim=1)[0]) > tol


def dilate(mask: torch.Tensor, grid: Grid, margin_mm: float) -> torch.Tensor:
    """Grow a (Z, Y, X) bool mask by ``margin_mm`` along each axis (a box of voxels, per-axis spacing)."""
    out = mask[None, None].to(torch.float32)
    for axis, s in enumerate((grid.spacing[2], grid.spacing[1], grid.spacing[0])):  # z, y, x
        r = max(0, int(math.ceil(margin_mm / s)))
        if r == 0:
            continue
        k, p = [1, 1, 1], [0, 0, 0]
        k[axis], p[axis] = 2 * r + 1, r
        out = F.max_pool3d(out, tuple(k), stride=1, padding=tuple(p))  # separable: one axis at a time
    return out[0, 0] > 0


def _instance_level(feat_f: torch.Tensor, feat_m: torch.Tensor, grid: Grid, k: int, init: torch.Tensor,
                    init_grid: Grid, fmask: Optional[torch.Tensor], mmask: Optional[torch.Tensor], icfg,
                    iterations: int, lr: float, stage: str, report: ProgressFn, dev,
                    gradient_floor: float = 0.0, reg_weight: Optional[float] = None,
                    smoothing_passes: Optional[int] = None, prompts: Sequence = (),
                    mind_channels: Optional[int] = None) -> tuple[torch.Tensor, Grid, list[dict]]:
    """One level of instance optimisation: features (1, C, Z, Y, X) on ``grid`` average-pooled by ``k``, a
    free-form displacement on the pooled grid initialised with ``init`` (3, ...) mm on ``init_grid``.

    ``gradient_floor`` (> 0, Adam only) is Adam's ``eps`` per voxel: the similarity is a mean over the
    voxels, so a voxel's gradient is ``1/V`` of its own misfit gradient and ``eps = gradient_floor / V``.

    ``prompts`` (:mod:`regcli.solvers.prompts`) join the objective. ``mind_channels``: only the first ones are
    MIND-SSC (the rest, e.g. intensities, are left out when finding where the features are flat).

    Returns the displacement (3, ...) mm on the pooled grid, that grid, and the loss history.
    """
    with torch.no_grad():
        io_f, io_grid = _pool(feat_f, grid, k)
        io_m, _ = _pool(feat_m, grid, k)
        start = init if init_grid.allclose(io_grid) else upsample_field(init, init_grid, io_grid)
        w_fixed = pooled_weights(fmask, grid, k, dev)
        w_moving = pooled_weights(mmask, grid, k, dev) if mmask is not None else None
    if iterations <= 0:
        return start, io_grid, []
    with torch.no_grad():
        warped = FieldWarper(io_grid, io_grid, dev, io_m.dtype).warp(io_m, start)
        c = mind_channels or io_f.shape[1]
        support = mind_support(io_f[:, :c], io_grid) | mind_support(warped[:, :c], io_grid)
        support = dilate(support, io_grid, SUPPORT_MARGIN_MM)
        del warped
        io_f, start, shift = off_nodes(io_f, start, io_grid)
    solver = solver_from_config(
        icfg, iterations=iterations, lr=lr, reg_weight=icfg.reg_weight if reg_weight is None else reg_weight,
        smoothing_passes=icfg.smoothing_passes if smoothing_passes is None else smoothing_passes,
        gradient_floor=gradient_floor, num_voxels=io_grid.num_voxels, stage=f"convexadam {stage}",
        progress=lambda i, n, loss: report(stage, i, n))
    report(stage, 0, iterations)
    result = solver.run(Problem(io_f[0], io_m[0], io_grid, io_grid, w_fixed, w_moving, support, list(prompts)),
                        init=start)
    return result.disp - shift, io_grid, result.history


def _standardised(data: torch.Tensor) -> torch.Tensor:
    """Intensities standardised over the whole grid (zero mean, unit sd): a gain and an offset change nothing,
    and fixed and moving share the grid and so the field of view."""
    sd = float(data.std())
    return (data - float(data.mean())) / (sd if sd > 0 else 1.0)


def refine_on_working_grid(fdata: torch.Tensor, mdata: torch.Tensor, grid: Grid, init: torch.Tensor,
                           init_grid: Grid, fmask: Optional[torch.Tensor], mmask: Optional[torch.Tensor],
                           cfg: RegisterConfig, iterations: int, report: ProgressFn, dev, prompts: Sequence = (),
                           stage: str = STAGE_REFINE, lr: Optional[float] = None) -> tuple[torch.Tensor, list[dict]]:
    """The refinement step (``instance.refine_*``): Adam with the gradient floor on the working grid itself,
    on MIND-SSC of dilation ``refine_mind_dilation`` of the (Z, Y, X) fixed and moving data on ``grid`` (and,
    with ``refine_intensity_weight`` w > 0, the intensities themselves as one more channel, each image
    standardised over ``grid`` and scaled by w),
    starting from ``init`` (3, ...) mm on ``init_grid``, Adam step ``lr`` mm (default
    ``refine_learning_rate``). Returns the field (3, ...) mm on ``grid`` and the loss history. Also used after
    other methods' own stages (SAMConvex) and, on a finer grid, by the fine refinement of every method
    (:mod:`regcli.methods.fine`)."""
    icfg = cfg.instance
    with torch.no_grad():
        feat_f, feat_m, _ = mind_ssc_pair(fdata, mdata, cfg.convex.mind_radius, icfg.refine_mind_dilation)
        n_mind = feat_f.shape[1]
        if icfg.refine_intensity_weight > 0:  # same-contrast pairs: the intensities join MIND-SSC
            feat_f, feat_m = (torch.cat((f, icfg.refine_intensity_weight * _standardised(d)[None, None]), 1)
                              for f, d in ((feat_f, fdata), (feat_m, mdata)))
    disp, _, hist = _instance_level(
        feat_f, feat_m, grid, 1, init, init_grid, fmask, mmask, icfg, iterations,
        icfg.refine_learning_rate if lr is None else lr,
        stage, report, dev, icfg.refine_gradient_floor, icfg.refine_reg_weight, icfg.refine_smoothing_passes,
        prompts, n_mind)
    return disp, hist


def convexadam(fixed: Image, moving: Image, cfg: RegisterConfig, fixed_mask: Optional[Image] = None,
               moving_mask: Optional[Image] = None, progress: Optional[ProgressFn] = None,
               device=None, prompts: Sequence = ()) -> DeformableResult:
    """Deformable registration of ``moving`` to ``fixed`` with ConvexAdam.

    Args:
        fixed: scalar image on the working grid (isotropic spacing recommended: MIND and the pooling
            factors count voxels).
        moving: scalar image already resampled onto the same grid (e.g. through the affine stage).
        cfg: ``cfg.convex`` (discrete stage) and ``cfg.instance`` (instance optimisation) are used.
        fixed_mask, moving_mask: optional masks (any grid; resampled onto the working grid) that weight
            the instance-optimisation similarity.
        progress: optional ``progress(stage_name, i, n)`` callback.
        device: torch device to compute on (default: the device of ``fixed.data``).
        prompts: test-time objective terms (:mod:`regcli.solvers.prompts`) added to both IO levels.
    Returns:
        :class:`DeformableResult` whose ``field`` is (3, Z, Y, X) float32 world LPS mm on ``fixed.grid``
        (``x -> x + u(x)`` maps fixed points to moving points), on the device of ``fixed.data``.
    """
    t_start = time.perf_counter()
    grid, out_device, dev, report = method_setup("convexadam", fixed, moving, device, progress)
    ccfg, icfg = cfg.convex, cfg.instance
    timings: dict[str, float] = {}
    history: dict[str, list[dict]] = {}

    fdata = _scalar(fixed, "fixed").to(dev)
    mdata = _scalar(moving, "moving").to(dev)
    fmask = _mask_on(fixed_mask, grid, "fixed")
    mmask = _mask_on(moving_mask, grid, "moving")

    with torch.no_grad():
        # 1. features ------------------------------------------------------------------------------
        t = time.perf_counter()
        report(STAGE_FEATURES, 0, 1)
        feat_f, feat_m, _ = mind_ssc_pair(fdata, mdata, ccfg.mind_radius, ccfg.mind_dilation)
        report(STAGE_FEATURES, 1, 1)
        timings["features"] = time.perf_counter() - t

        # 2. discrete coupled-convex stage ----------------------------------------------------------
        t = time.perf_counter()
        n_convex = 2 if ccfg.inverse_consistency else 1
        report(STAGE_CONVEX, 0, n_convex)
        cf, coarse = _pool(feat_f, grid, ccfg.grid_sp)
        cm, _ = _pool(feat_m, grid, ccfg.grid_sp)
        history["convex"] = []
        disp_c = convex_displacement(cf[0], cm[0], ccfg.disp_hw, ccfg.coupling_weights, history=history["convex"])
        fwd = index_to_world_vectors(disp_c, coarse)
        report(STAGE_CONVEX, 1, n_convex)
        if ccfg.inverse_consistency:
            history["convex_backward"] = []
            disp_b = convex_displacement(cm[0], cf[0], ccfg.disp_hw, ccfg.coupling_weights,
                                         history=history["convex_backward"])
            bwd = index_to_world_vectors(disp_b, coarse)
            history["inverse_consistency"] = []
            fwd, _ = symmetrise(fwd, bwd, coarse, 15, history["inverse_consistency"])
            report(STAGE_CONVEX, 2, n_convex)
        del cf, cm
        timings["convex"] = time.perf_counter() - t

    # 3. instance optimisation on the IO grid -------------------------------------------------------
    t = time.perf_counter()
    disp_io, io_grid, hist = _instance_level(
        feat_f, feat_m, grid, icfg.grid_sp_adam, fwd, coarse, fmask, mmask, icfg,
        icfg.iterations if icfg.enabled else 0, icfg.learning_rate, STAGE_INSTANCE, report, dev,
        icfg.gradient_floor, prompts=prompts)
    if hist:
        history["instance"] = hist
    del feat_f, feat_m
    timings["instance"] = time.perf_counter() - t

    # 4. refinement on the working grid with finer features ----------------------------------------
    if icfg.enabled and icfg.refine_iterations > 0:
        t = time.perf_counter()
        disp_io, history["refine"] = refine_on_working_grid(fdata, mdata, grid, disp_io, io_grid, fmask, mmask, cfg,
                                                            icfg.refine_iterations, report, dev, prompts)
        io_grid = grid
        timings["refine"] = time.perf_counter() - t

    # 5. back to the working grid --------------------------------------------------------------------
    t = time.perf_counter()
    with torch.no_grad():
        disp = disp_io.detach()
        if not io_grid.allclose(grid):
            disp = upsample_field(disp, io_grid, grid)
        disp = disp.to(out_device)
    timings["upsample"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    if not torch.isfinite(disp).all():
        raise ConvergenceError("convexadam produced a non-finite displacement field")
    return DeformableResult(DisplacementField(disp.contiguous(), grid), history, timings)
