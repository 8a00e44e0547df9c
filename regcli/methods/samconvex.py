"""SAMConvex: anatomical-embedding correlation pyramid, coupled-convex optimisation, then IO in embedding space.

Li et al., "SAMConvex: Fast discrete optimization for CT registration using self-supervised anatomical
embedding and correlation pyramid", MICCAI 2023, written for regcli's physical-space conventions. On the
isotropic working grid that fixed and moving already share (the affine stage came first):

1. The fixed image's features are computed once (:func:`features`) on the embedding grid
   ``grid.subsampled(2)`` (4 mm on the default 2 mm working grid): the network's global map resampled there,
   optionally reduced to its principal components (``samconvex.global_channels``), and a fine half
   (``samconvex.local_features``: MIND-SSC by default, the network's local map as in the paper, or both).
2. For each pyramid level ``f`` (``samconvex.levels``, factors of the working grid, coarse to fine; the
   default 8, 4, 2 are the paper's 1/4, 1/2 and 1 of the embedding resolution: 16, 8 and 4 mm) with search
   half-width ``r`` (2, 3, 3): the moving image is warped by the field composed so far and embedded; both
   embeddings are brought to the level grid ``grid.subsampled(f)`` (box-smoothed and strided for ``f > 2``);
   the SSD cost volume of the unit-length features (``2 - 2 <a, b>``, i.e. the correlation) over the
   ``(2r+1)^3`` shifts is solved with the coupled-convex scheme of the core engine; the level's field is
   composed with the field so far: ``u(x) = u_l(x) + u_prev(x + u_l(x))``. The paper embeds downsampled
   images for its coarse levels; regcli pools the embedding of the working-grid image instead, because the
   network was trained at one spacing.
3. Instance optimisation in embedding space: the shared solver with the feature SSD between the fixed
   features and those of the *unwarped* moving image, sampled at ``x + u(x)``, on the embedding grid,
   initialised with step 2 (Adam with a gradient floor, diffusion regulariser).
4. ``samconvex.refine_iterations`` (10) Adam iterations of ConvexAdam's working-grid refinement (MIND-SSC).

All fields are world LPS mm on the working grid when they leave a step. The network runs in float32; its maps
are cast to the dtype of the working-grid images (float64 with ``precision: float64``), in which every later
step computes.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from regcli.config import RegisterConfig
from regcli.errors import ConvergenceError
from regcli.features.filters import box_filter
from regcli.features.mind import mind_ssc, mind_ssc_pair
from regcli.methods.convexadam import (
    DeformableResult, _mask_on, _scalar, index_to_world_vectors, method_setup, off_nodes, refine_on_working_grid,
)
from regcli.models.embedding import EmbeddingNet, embed, embedding_from
from regcli.resample import FieldWarper, upsample_field
from regcli.solvers.convex import convex_displacement
from regcli.solvers import diffeo
from regcli.solvers.instance import Problem, solver_from_config
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.transforms.displacement import DisplacementField

ProgressFn = Callable[[str, int, int], None]
STAGE_EMBED = "anatomical embedding"
STAGE_PYRAMID = "correlation pyramid"
STAGE_IO = "embedding instance optimisation"


def _load(spec: str) -> tuple[EmbeddingNet, dict]:
    """The network for ``spec`` and where it came from; resolved and verified once per process and spec."""
    from regcli.weights import cached_network

    return cached_network(spec, embedding_from, "anatomical embedding")


def preflight(cfg: RegisterConfig) -> list[dict]:
    """Resolve, verify and load the embedding model before the registration starts (one-line WeightsError);
    returns its provenance for the report (:meth:`regcli.weights.ResolvedModel.provenance`)."""
    return [_load(cfg.samconvex.weights)[1]]


def features(image: Image, net: EmbeddingNet, scfg, basis: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             noise: float = 0.0, mind: Optional[torch.Tensor] = None
             ) -> tuple[Image, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """The method's features of an image on ``image.grid.subsampled(2)``, and the projection they used.

    The global embedding (resampled there) and a local half (MIND-SSC with radius 1 / dilation 2, centred,
    box-smoothed and taken at every other voxel; or the network's local head; or both), weighted
    ``global_weight : 1`` so that the two unit halves give a unit vector (centred MIND is 0 where the image is
    flat, so only the global half remains there).

    With ``samconvex.global_channels`` = k > 0 the global half is replaced by its coordinates along its k
    principal directions: ``basis`` = (mean (C,), directions (C, k)) computed from this image when not given
    (pass the fixed image's basis for the moving image, so both live in the same coordinates). Differences,
    hence the SSD costs, are kept up to the discarded variance, and the cost volume and the instance
    optimisation handle k instead of ``global_dim`` channels.

    ``noise``: the MIND-SSC noise level shared by the two images (:func:`regcli.features.mind.mind_ssc`);
    ``mind``: the image's MIND-SSC (1, 12, Z, Y, X) with that level when already computed.
    """
    emb = embed(image, net)  # float32 network; its maps take the image's (the solver's) dtype
    emb = replace(emb, global_=emb.global_.to(dtype=image.data.dtype), local=emb.local.to(dtype=image.data.dtype))
    loc = None
    if scfg.local_features in ("mind", "both"):
        m = (mind_ssc(image.data[None, None], 1, 2, noise=noise) if mind is None else mind)[0]
        m = box_filter(m - m.mean(0, keepdim=True), 1)[:, ::2, ::2, ::2]  # anti-aliased, centred on voxel 2i
        loc = F.normalize(m, dim=0)
        if scfg.local_features == "both":
            loc = torch.cat((loc, emb.local.data), 0) / 2 ** 0.5
    both = emb.combined(loc, scfg.global_weight)
    k, c = scfg.global_channels, emb.global_.data.shape[0]
    if not 0 < k < c:
        return both, None
    glob = both.data[:c].reshape(c, -1)
    if basis is None:
        mean = glob.mean(1)
        centred = glob - mean[:, None]
        _, vecs = torch.linalg.eigh(centred @ centred.T / centred.shape[1])  # ascending eigenvalues
        basis = (mean, vecs[:, -k:].flip(1).contiguous())
    mean, dirs = basis
    reduced = (dirs.T @ (glob - mean[:, None])).reshape(k, *both.data.shape[1:])
    return Image(torch.cat((reduced, both.data[c:]), 0).contiguous(), both.grid, both.name), basis


def level_features(emb: Image, grid: Grid, factor: int) -> tuple[torch.Tensor, Grid]:
    """The (C, ...) embedding ``emb`` (on ``grid.subsampled(2)``) on the level grid ``grid.subsampled(factor)``.

    factor 2: as it is; 4, 8, ...: box-smoothed and every ``factor // 2``-th voxel; 1: trilinear upsampling.
    Unit length along channels is restored after smoothing or interpolation.
    """
    level = grid.subsampled(factor)
    data = emb.data
    if factor == 2:
        return data, level
    if factor == 1:
        up = upsample_field(data, emb.grid, level)
        return F.normalize(up, dim=0), level
    if factor % 2:
        raise ValueError(f"samconvex level factors must be 1 or even, got {factor}")
    step = factor // 2
    sm = data
    for _ in range(max(1, step // 2)):
        sm = box_filter(sm, 1)
    sub = sm[:, ::step, ::step, ::step]
    return F.normalize(sub, dim=0), level


def compose(u_level: torch.Tensor, u_prev: Optional[torch.Tensor], grid: Grid, warper: FieldWarper) -> torch.Tensor:
    """``u(x) = u_level(x) + u_prev(x + u_level(x))`` for (3, Z, Y, X) mm fields on ``grid``."""
    if u_prev is None:
        return u_level
    return diffeo.compose(u_level, u_prev, warper)


def samconvex(fixed: Image, moving: Image, cfg: RegisterConfig, fixed_mask: Optional[Image] = None,
              moving_mask: Optional[Image] = None, progress: Optional[ProgressFn] = None,
              device=None, prompts: Sequence = ()) -> DeformableResult:
    """Deformable registration of ``moving`` to ``fixed`` (both on the same working grid) with SAMConvex.

    ``prompts`` (:mod:`regcli.solvers.prompts`) join the objective of the instance optimisation and refinement.

    Returns the field (3, Z, Y, X) world LPS mm on ``fixed.grid`` (fixed point x -> moving x + u(x)), of the
    images' dtype (float32; float64 with ``precision: float64``).
    """
    t_start = time.perf_counter()
    grid, out_device, dev, report = method_setup("samconvex", fixed, moving, device, progress)
    scfg = cfg.samconvex
    timings: dict[str, float] = {}
    history: dict[str, list[dict]] = {}

    t = time.perf_counter()
    net = _load(scfg.weights)[0].to(dev)
    if abs(net.cfg.spacing_mm - min(grid.spacing)) > 0.25 * net.cfg.spacing_mm:
        import logging

        logging.getLogger("regcli").warning(
            "samconvex: the working grid (%.3g mm) differs from the embedding's training spacing (%.3g mm); "
            "set working_spacing_mm to %.3g", min(grid.spacing), net.cfg.spacing_mm, net.cfg.spacing_mm)
    fdata = _scalar(fixed, "fixed").to(dev)
    mdata = _scalar(moving, "moving").to(dev)
    fmask = _mask_on(fixed_mask, grid, "fixed")
    mmask = _mask_on(moving_mask, grid, "moving")
    report(STAGE_EMBED, 0, 1)
    with torch.no_grad():
        # the noisier image sets MIND-SSC's variance floor for both, at every level
        mind_f, mind_m, noise = (None, None, 0.0) if scfg.local_features == "embedding" else \
            mind_ssc_pair(fdata, mdata, 1, 2)
        emb_f, basis = features(Image(fdata, grid), net, scfg, noise=noise, mind=mind_f)
        timings["embed_fixed"] = time.perf_counter() - t
        t = time.perf_counter()
        emb_m0, _ = features(Image(mdata, grid), net, scfg, basis, noise, mind_m)  # unwarped: first level and IO
    report(STAGE_EMBED, 1, 1)
    timings["embed_moving"] = time.perf_counter() - t

    # 2. correlation pyramid -------------------------------------------------------------------------
    t = time.perf_counter()
    warper = FieldWarper(grid, grid, dev, fdata.dtype)
    u: Optional[torch.Tensor] = None
    n_lv = len(scfg.levels)
    with torch.no_grad():
        for k, (factor, radius) in enumerate(zip(scfg.levels, scfg.search_radius)):
            report(STAGE_PYRAMID, k, n_lv)
            if u is None:
                emb_m = emb_m0
            else:
                emb_m, _ = features(Image(warper.warp(mdata, u, "bilinear", "border"), grid), net, scfg, basis,
                                    noise)
            ff, level = level_features(emb_f, grid, factor)
            fm, _ = level_features(emb_m, grid, factor)
            hist: list[dict] = []
            disp_vox = convex_displacement(ff, fm, radius, scfg.coupling_weights, history=hist)
            u_level = upsample_field(index_to_world_vectors(disp_vox, level), level, grid)
            u = compose(u_level, u, grid, warper)
            history[f"level{factor}"] = hist
            timings[f"level{factor}"] = time.perf_counter() - t
    report(STAGE_PYRAMID, n_lv, n_lv)
    if u is None:
        u = torch.zeros((3, *grid.shape), dtype=fdata.dtype, device=dev)
    timings["pyramid"] = time.perf_counter() - t

    # 3. instance optimisation in embedding space ------------------------------------------------------
    if scfg.io_iterations > 0:
        t = time.perf_counter()
        with torch.no_grad():
            eg = emb_f.grid
            fixed_s, init, shift = off_nodes(emb_f.data[None], upsample_field(u, grid, eg), eg)
            w_fixed, w_moving = (None if mk is None else upsample_field(mk[None].to(dev), grid, eg)[0]
                                 for mk in (fmask, mmask))
        solver = solver_from_config(
            cfg.instance, iterations=scfg.io_iterations, lr=scfg.io_learning_rate, reg_weight=scfg.io_reg_weight,
            smoothing_passes=scfg.smoothing_passes, gradient_floor=scfg.io_gradient_floor, num_voxels=eg.num_voxels,
            stage="samconvex instance optimisation", progress=lambda i, n, loss: report(STAGE_IO, i, n),
            similarity="feature_ssd")
        report(STAGE_IO, 0, scfg.io_iterations)
        res = solver.run(Problem(fixed_s[0], emb_m0.data, eg, eg, w_fixed, w_moving, prompts=list(prompts)), init=init)
        history["instance"] = res.history
        with torch.no_grad():
            u = upsample_field(res.disp - shift, eg, grid)
        timings["instance"] = time.perf_counter() - t

    # 4. optional: ConvexAdam's refinement on the working grid (MIND-SSC, Adam with a gradient floor) ------
    if scfg.refine_iterations > 0:
        t = time.perf_counter()
        u, history["refine"] = refine_on_working_grid(fdata, mdata, grid, u, grid, fmask, mmask, cfg,
                                                      scfg.refine_iterations, report, dev, prompts)
        timings["refine"] = time.perf_counter() - t

    u = u.to(out_device)
    timings["total"] = time.perf_counter() - t_start
    if not torch.isfinite(u).all():
        raise ConvergenceError("samconvex produced a non-finite displacement field")
    return DeformableResult(DisplacementField(u.contiguous(), grid), history, timings)
