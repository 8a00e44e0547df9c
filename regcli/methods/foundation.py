"""Foundation model: a uniGradICON-compatible multi-step GradICON network, in physical space.

``regcli register fixed moving --method foundation`` runs, after the affine stage:

1. **Network grid.** The deformable working grid is the fixed image's field of view resized to the network's
   input shape (175^3 for uniGradICON): :func:`working_grid` (``Grid.with_size``: voxel ``p`` of it lies at the
   fixed image's continuous index ``(p + 0.5) n / N - 0.5``, which is what uniGradICON's
   ``F.interpolate(..., align_corners=False)`` samples). The pipeline resamples the fixed image and the
   affinely mapped moving image onto it, without anti-alias smoothing (as uniGradICON).
2. **Intensities** as uniGradICON prepares them (``foundation.modality``), on the original images before
   any resampling (:func:`prepare_images`): CT clipped to [-1000, 1000] HU, MRI to [minimum, 99th
   percentile], then scaled to [0, 1].
3. **Both maps.** ``phi_AB = net(moving, fixed)`` on the fixed voxels and ``phi_BA = net(fixed, moving)``, in
   the network's [0, 1] coordinates (:mod:`regcli.models.gradicon`), become displacement fields in LPS mm:
   ``u(x) = D S (N - 1) d(x)`` (D direction, S spacing of the network grid, components reordered from tensor to
   x, y, z order). ``u`` is the forward warp; with ``foundation.inverse: network`` ``phi_BA`` gives the inverse
   warp directly (also after ``io=network``), with its inverse-consistency error in the report and a warning when
   it is far from the inverse of ``u`` (:data:`regcli.pipeline.OWN_INVERSE_WARN_MM`); ``fixed_point``: the pipeline
   inverts ``u``.
4. **Instance optimisation** (``foundation.io``, ``--iterations``): ``network``: uniGradICON's (Adam on the
   network weights with the GradICON loss, both directions, the weights restored afterwards); ``field``:
   regcli's shared solver, ConvexAdam's instance optimisation and refinement on MIND-SSC started from the
   network's field, on regcli's usual working grid (``working_spacing_mm``; the pipeline passes the original
   images as ``originals``), usually finer than a small network's grid; the inverse then comes from the
   fixed-point inversion.

The fields leave as world LPS mm on the working (network) grid; the pipeline resamples them onto the fixed
image's grid and writes ANTs files.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from regcli.config import RegisterConfig
from regcli.errors import ConvergenceError, GeometryError
from regcli.methods.convexadam import (
    STAGE_INSTANCE, DeformableResult, _instance_level, _mask_on, _scalar, method_setup, refine_on_working_grid,
)
from regcli.models.gradicon import GradICONNet, gradicon_from, gradicon_loss
from regcli.spaces.grid import Grid, apply_linear
from regcli.transforms.displacement import DisplacementField

ProgressFn = Callable[[str, int, int], None]
STAGE_NETWORK = "foundation network"
STAGE_NETWORK_IO = "foundation network IO"

def _load(spec: str) -> tuple[GradICONNet, dict]:
    """The network for ``spec`` and its provenance; resolved and verified once per process and spec."""
    from regcli.weights import cached_network

    return cached_network(spec, gradicon_from, "foundation network")


def preflight(cfg: RegisterConfig) -> list[dict]:
    """Resolve, verify and load the network before the registration starts (one-line WeightsError)."""
    return [_load(cfg.foundation.weights)[1]]


def working_grid(fixed_grid: Grid, cfg: RegisterConfig) -> tuple[Grid, bool]:
    """The network grid over the fixed image's field of view, and False: no anti-alias smoothing before
    resampling onto it (uniGradICON resizes with plain trilinear interpolation)."""
    shape = _load(cfg.foundation.weights)[0].cfg.input_shape  # tensor order (Z, Y, X)
    return fixed_grid.with_size(tuple(reversed(shape))), False


def prepare_intensities(data: torch.Tensor, modality: str, what: str = "image", method: str = "foundation"
                        ) -> torch.Tensor:
    """uniGradICON's intensity preparation: CT clipped to [-1000, 1000], MRI to [minimum, 99th percentile]
    (the k-th smallest value with k = int(0.99 n)), then scaled to [0, 1]. ``what`` names the image in the
    one-line error about an empty window."""
    from regcli.errors import InputError

    x = data.to(torch.float32)
    if modality == "ct":
        lo, hi = -1000.0, 1000.0
    else:
        flat = x.flatten()
        lo = float(flat.min())
        k = max(1, min(int(0.99 * flat.numel()), flat.numel()))
        hi = float(torch.kthvalue(flat.cpu(), k).values)
    if not hi > lo:
        raise InputError(f"{what}: the {modality} intensity window of --method {method} is empty ({lo:g} to "
                         f"{hi:g}): is the image (almost) constant, or is --modality wrong?")
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def prepare_pair(fixed, moving, section, method: str):
    """Both images' intensities prepared (:func:`prepare_intensities`) on their own grids with a network
    method's ``section`` of the config (``modality``, ``moving_modality``), before the pipeline resamples them
    onto the network grid: uniGradICON windows the original images, and the moving image's padding outside its
    field of view (0) is then the window's lower end (air for CT)."""

    def prepared(image, role: str, modality: str):
        what = f"{role} image '{image.name}'" if image.name else f"{role} image"
        return image.with_data(prepare_intensities(_scalar(image, role), modality, what, method))

    return (prepared(fixed, "fixed", section.modality),
            prepared(moving, "moving", section.moving_modality or section.modality))


def prepare_images(fixed, moving, cfg: RegisterConfig):
    """:func:`prepare_pair` with ``foundation.modality`` / ``foundation.moving_modality``."""
    return prepare_pair(fixed, moving, cfg.foundation, "foundation")


def map_to_world(d: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A network displacement (3, Z, Y, X) in [0, 1] units (tensor axis order) -> world LPS mm on ``grid``."""
    A = grid.vector_unit_to_world().astype(np.float32)
    return apply_linear(A, d.flip(0).permute(1, 2, 3, 0)).permute(3, 0, 1, 2).contiguous()  # components x, y, z


def network_io(net: GradICONNet, a: torch.Tensor, b: torch.Tensor, iterations: int, lr: float,
               report: ProgressFn, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """uniGradICON's instance optimisation: ``iterations`` Adam steps on the network weights minimising the
    GradICON loss of this pair (both directions), then both maps; the weights are restored afterwards.
    Batch normalisation keeps its running statistics (eval mode), as in uniGradICON."""
    state = copy.deepcopy(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    try:
        net.eval()
        for i in range(iterations):
            opt.zero_grad(set_to_none=True)
            loss = gradicon_loss(net, a, b, generator=gen)
            loss["all"].backward()
            opt.step()
            history.append({"iteration": i + 1, **{k: float(v.detach()) for k, v in loss.items()}})
            if not torch.isfinite(loss["all"].detach()):
                raise ConvergenceError(f"foundation network IO diverged at iteration {i + 1}")
            report(STAGE_NETWORK_IO, i + 1, iterations)
        with torch.no_grad():
            d_ab = net.displacement(a, b)
            d_ba = net.displacement(b, a)
    finally:
        net.load_state_dict(state)
        for p in net.parameters():
            p.grad = None
    return d_ab, d_ba, history


def field_io(u: torch.Tensor, net_grid: Grid, originals, cfg: RegisterConfig, report: ProgressFn, dev,
             prompts: Sequence, history: dict, iterations: int) -> tuple[torch.Tensor, Grid, dict]:
    """``io=field``: ConvexAdam's instance optimisation (MIND-SSC on the IO grid, ``instance.*``) for
    ``iterations`` steps, then its refinement, started from a network's field ``u`` (world mm on
    ``net_grid``). It runs on regcli's usual working grid (``working_spacing_mm`` over the fixed field of view,
    anti-aliased originals, the moving image through ``affine``), which is usually finer than a small network's
    grid. ``originals`` = (fixed, moving, affine, fixed mask, moving mask) on their own grids (affine None: the
    images are already on one grid). Returns the field, its grid and the history."""
    from regcli.features.intensity import smooth_for
    from regcli.features.mind import mind_ssc
    from regcli.resample import resample_to_grid, upsample_field, warp

    fixed, moving, affine, fixed_mask, moving_mask = originals
    icfg, sp = cfg.instance, cfg.working_spacing_mm
    work = fixed.grid.with_spacing(sp)
    with torch.no_grad():
        fdata = _scalar(resample_to_grid(smooth_for(fixed, sp), work), "fixed").to(dev)
        mdata = _scalar(warp(smooth_for(moving, sp), affine, work), "moving").to(dev)
        fmask = _mask_on(fixed_mask, work, "fixed")
        mmask = _mask_on(warp(moving_mask, affine, work, "nearest") if moving_mask is not None else None, work,
                         "moving")
        start = upsample_field(u, net_grid, work)
        feat_f = mind_ssc(fdata[None, None], cfg.convex.mind_radius, cfg.convex.mind_dilation)
        feat_m = mind_ssc(mdata[None, None], cfg.convex.mind_radius, cfg.convex.mind_dilation)
    disp, io_grid, history["instance"] = _instance_level(
        feat_f, feat_m, work, icfg.grid_sp_adam, start, work, fmask, mmask, icfg, iterations,
        icfg.learning_rate, STAGE_INSTANCE, report, dev, icfg.gradient_floor, prompts=prompts)
    del feat_f, feat_m
    if icfg.refine_iterations > 0:
        disp, history["refine"] = refine_on_working_grid(fdata, mdata, work, disp, io_grid, fmask, mmask, cfg,
                                                         icfg.refine_iterations, report, dev, prompts)
    elif not io_grid.allclose(work):
        disp = upsample_field(disp.detach(), io_grid, work)
    return disp.detach(), work, history


def foundation(fixed, moving, cfg: RegisterConfig, fixed_mask=None, moving_mask=None,
               progress: Optional[ProgressFn] = None, device=None, prompts: Sequence = (),
               originals: Optional[tuple] = None) -> DeformableResult:
    """Deformable registration of ``moving`` to ``fixed`` (both on the network grid, :func:`working_grid`).

    ``prompts`` (label maps, landmarks) join the objective of ``io=field``; the network itself ignores them.
    ``originals`` = (fixed, moving, affine, fixed mask, moving mask) as given to the pipeline, for ``io=field``
    (:func:`field_io`). Returns the forward field (on the network grid, or with ``io=field`` on the usual working
    grid) and, unless ``io=field``, ``inverse=fixed_point`` or no inverse warp is written, the network's inverse.
    """
    t_start = time.perf_counter()
    grid, out_device, dev, report = method_setup("foundation", fixed, moving, device, progress)
    fcfg = cfg.foundation
    timings: dict[str, float] = {}
    history: dict[str, list[dict]] = {}

    net = _load(fcfg.weights)[0].to(dev)
    shape = tuple(net.cfg.input_shape)
    fdata = _scalar(fixed, "fixed").to(dev)
    mdata = _scalar(moving, "moving").to(dev)
    if tuple(fdata.shape) != shape:
        raise GeometryError(f"foundation: the working grid {tuple(fdata.shape)} is not the network grid {shape}")
    b, a = fdata[None, None], mdata[None, None]  # intensities prepared by prepare_images

    # the network's backward map is the inverse warp only with inverse=network (io=network computes it anyway)
    own_inverse = fcfg.inverse == "network" and fcfg.io != "field" and cfg.inverse_warp
    t = time.perf_counter()
    if fcfg.io == "network" and fcfg.io_iterations > 0:
        report(STAGE_NETWORK_IO, 0, fcfg.io_iterations)
        d_ab, d_ba, history["network_io"] = network_io(net, a, b, fcfg.io_iterations, fcfg.io_learning_rate,
                                                       report, cfg.seed)
        timings["network_io"] = time.perf_counter() - t
    else:
        report(STAGE_NETWORK, 0, 2)
        with torch.no_grad():
            d_ab = net.displacement(a, b)
            report(STAGE_NETWORK, 1, 2)
            d_ba = net.displacement(b, a) if own_inverse else None
        report(STAGE_NETWORK, 2, 2)
        timings["network"] = time.perf_counter() - t
    with torch.no_grad():
        u = map_to_world(d_ab[0], grid)
        inv = map_to_world(d_ba[0], grid) if d_ba is not None and own_inverse else None

    if fcfg.io == "field" and fcfg.io_iterations > 0:
        t = time.perf_counter()
        if originals is None:  # called without the original images: the IO runs on the network grid
            originals = (fixed, moving, None, fixed_mask, moving_mask)
        u, grid, history = field_io(u, grid, originals, cfg, report, dev, prompts, history, fcfg.io_iterations)
        inv = None
        timings["field_io"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_start
    if not torch.isfinite(u).all() or (inv is not None and not torch.isfinite(inv).all()):
        raise ConvergenceError("foundation produced a non-finite displacement field")
    field = DisplacementField(u.to(out_device).contiguous(), grid)
    inverse = DisplacementField(inv.to(out_device).contiguous(), grid) if inv is not None else None
    return DeformableResult(field, history, timings, inverse=inverse)
