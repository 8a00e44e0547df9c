"""DIO: learned feature images registered by the shared IO solver, coarse to fine (Jena et al., "Deep implicit
optimization", 2024), written for regcli's physical-space conventions.

On the isotropic working grid that fixed and moving share (the affine stage came first):

1. Features (:func:`level_features`): the feature network (:mod:`regcli.models.dio`) maps *each image on its own*
   to feature images at the levels ``dio.levels`` (factors of the working grid, default 4, 2, 1). The level-``l``
   features live on ``pooled_grid(padded_grid(grid, l), l)`` (voxel ``i`` is the centre of fine voxels
   ``l*i .. l*i + l - 1``). ``dio.features: intensity`` uses the normalised image, average-pooled the same way,
   instead: the baseline with the very same solver.
2. The solver (:func:`solve`): for each level, coarse to fine, the shared instance-optimisation solver
   (:func:`regcli.solvers.instance.solver_from_config`) registers the level's feature images with the feature
   SSD and a diffusion regulariser, starting from the previous level's field. The transform model and the
   optimizer are ``instance.transform`` / ``instance.optimizer``: the network never sees the solver, so either
   can change at test time with no retraining (freeform, svf, greedy, bspline, affine; adam, sgd, lbfgs).
   Test-time prompts (label maps, landmarks: :mod:`regcli.solvers.prompts`) join every level's objective.
3. The finest level's field, upsampled to the working grid when the finest level is coarser.

Training (:mod:`regcli.training.dio`) differentiates the solver's optimum with respect to the features without
unrolling it: see :func:`jfb_step`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from regcli.config import RegisterConfig
from regcli.errors import ConvergenceError
from regcli.methods.convexadam import DeformableResult, _mask_on, _pool, _scalar, method_setup, pooled_weights
from regcli.resample import twice_differentiable, upsample_field
from regcli.solvers.instance import Problem, solver_from_config
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.transforms.displacement import DisplacementField

ProgressFn = Callable[[str, int, int], None]
STAGE_FEATURES = "DIO features"


def _load(spec: str):
    """The feature network for ``spec`` and where it came from; resolved and verified once per process."""
    from regcli.models.dio import dio_from
    from regcli.weights import cached_network

    return cached_network(spec, dio_from, "DIO feature network")


def preflight(cfg: RegisterConfig) -> list[dict]:
    """Resolve, verify and load the feature network before the registration starts (one-line WeightsError)."""
    if cfg.dio.features != "network":
        return []
    return [_load(cfg.dio.weights)[1]]


def intensity_features(image: Image, levels: Sequence[int]) -> dict[int, Image]:
    """The baseline's "features": the image normalised like the network's input (1st/99th percentile of the
    foreground to 0/1), average-pooled to each level's grid. Returns ``{level: Image (1, ...)}``."""
    from regcli.models.embedding import normalise_intensity

    data = normalise_intensity(_scalar(image, "input"), (1.0, 99.0))[None, None]
    out = {}
    for lv in levels:
        pooled, g = _pool(data, image.grid, lv)
        out[lv] = Image(pooled[0], g, image.name)
    return out


def level_features(image: Image, cfg: RegisterConfig, net=None, device=None, grad: bool = False
                   ) -> dict[int, Image]:
    """``{level: Image (C, ...)}`` for every solver level of ``cfg.dio``: the network's (``dio.features:
    network``; ``net`` defaults to the configured model) or the intensity baseline's."""
    dcfg = cfg.dio
    if dcfg.features == "intensity":
        return intensity_features(image, dcfg.levels)
    from regcli.models.dio import dio_features

    net = net if net is not None else _load(dcfg.weights)[0]
    feats = dio_features(image, net, device=device, grad=grad)
    missing = [lv for lv in dcfg.levels if lv not in feats]
    if missing:
        from regcli.errors import ConfigError

        raise ConfigError(f"dio.levels {list(dcfg.levels)} asks for level(s) {missing} that the feature network "
                          f"'{dcfg.weights}' does not have (it has {sorted(feats)})")
    return feats


def level_solver(cfg: RegisterConfig, iterations: int, lr: float, stage: str = "DIO solver",
                 progress: Optional[Callable[[int, int, float], None]] = None):
    """The solver of one level (feature SSD + ``dio.reg_weight`` x diffusion, ``instance.transform`` and
    ``instance.optimizer``): what :func:`solve` runs and what :func:`jfb_step` differentiates."""
    dcfg = cfg.dio
    return solver_from_config(cfg.instance, iterations=iterations, lr=lr, reg_weight=dcfg.reg_weight,
                              smoothing_passes=dcfg.smoothing_passes, stage=stage, similarity="feature_ssd",
                              regularizer="diffusion", progress=progress)


@dataclass
class LevelSolution:
    """One solved level: the field (3, Z, Y, X) mm on ``grid``, the converged transform model, its history."""

    level: int
    grid: Grid
    disp: torch.Tensor
    model: torch.nn.Module
    start: Optional[torch.Tensor]  # the base field the level started from (3, ...) mm on ``grid``, or None
    history: list = field(default_factory=list)
    seconds: float = 0.0


def solve(feats_f: dict[int, Image], feats_m: dict[int, Image], cfg: RegisterConfig, fixed_mask=None,
          moving_mask=None, prompts: Sequence = (), progress: Optional[ProgressFn] = None, device=None,
          work_grid: Optional[Grid] = None) -> list[LevelSolution]:
    """Run the solver over ``cfg.dio.levels`` coarse to fine on detached feature images.

    Args:
        feats_f, feats_m: ``{level: Image}`` of the fixed and moving images (the moving ones may live on other
            grids: the solver samples them in world space).
        fixed_mask, moving_mask: optional (Z, Y, X) weights on ``work_grid`` (the working grid).
        prompts: test-time objective terms.
    Returns:
        one :class:`LevelSolution` per level; the last one's ``disp`` is the result.
    """
    dcfg = cfg.dio
    out: list[LevelSolution] = []
    u: Optional[torch.Tensor] = None
    ugrid: Optional[Grid] = None
    for lv, iters, lr in zip(dcfg.levels, dcfg.iterations, dcfg.learning_rates):
        F_, M_ = feats_f[lv], feats_m[lv]
        dev = device if device is not None else F_.data.device
        with torch.no_grad():
            start = None if u is None else (u if ugrid.allclose(F_.grid) else upsample_field(u, ugrid, F_.grid))
            w_f = pooled_weights(fixed_mask, work_grid, lv, dev) if work_grid is not None else None
            w_m = (pooled_weights(moving_mask, work_grid, lv, dev)
                   if (work_grid is not None and moving_mask is not None) else None)
        stage = f"DIO solver, level {lv}"
        solver = level_solver(cfg, iters, lr, stage,
                              (lambda i, n, loss, s=stage: progress(s, i, n)) if progress is not None else None)
        if progress is not None:
            progress(stage, 0, iters)
        res = solver.run(Problem(F_.data.detach(), M_.data.detach(), F_.grid, M_.grid, w_f, w_m,
                                 prompts=list(prompts)), init=start)
        u, ugrid = res.disp, F_.grid
        out.append(LevelSolution(lv, F_.grid, res.disp, res.model, start, res.history, res.seconds))
    return out


def dio(fixed: Image, moving: Image, cfg: RegisterConfig, fixed_mask: Optional[Image] = None,
        moving_mask: Optional[Image] = None, progress: Optional[ProgressFn] = None, device=None,
        prompts: Sequence = ()) -> DeformableResult:
    """Deformable registration of ``moving`` to ``fixed`` (both on the working grid) with DIO.

    Returns the field (3, Z, Y, X) float32 world LPS mm on ``fixed.grid`` (fixed point x -> moving x + u(x)).
    """
    t_start = time.perf_counter()
    grid, out_device, dev, report = method_setup("dio", fixed, moving, device, progress)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    report(STAGE_FEATURES, 0, 2)
    fixed_d = Image(_scalar(fixed, "fixed").to(dev), grid, fixed.name)
    moving_d = Image(_scalar(moving, "moving").to(dev), grid, moving.name)
    feats_f = level_features(fixed_d, cfg, device=dev)
    report(STAGE_FEATURES, 1, 2)
    feats_m = level_features(moving_d, cfg, device=dev)
    report(STAGE_FEATURES, 2, 2)
    timings["features"] = time.perf_counter() - t

    t = time.perf_counter()
    fmask = _mask_on(fixed_mask, grid, "fixed")
    mmask = _mask_on(moving_mask, grid, "moving")
    levels = solve(feats_f, feats_m, cfg, fmask, mmask, prompts, progress, dev, grid)
    timings["solver"] = time.perf_counter() - t
    timings.update({f"solver/level{s.level}": s.seconds for s in levels})
    last = levels[-1]
    with torch.no_grad():
        u = last.disp if last.grid.allclose(grid) else upsample_field(last.disp, last.grid, grid)
        u = u.to(out_device)
    timings["total"] = time.perf_counter() - t_start
    if not torch.isfinite(u).all():
        raise ConvergenceError("dio produced a non-finite displacement field")
    history = {f"level{s.level}": s.history for s in levels}
    return DeformableResult(DisplacementField(u.contiguous(), grid), history, timings)


def jfb_step(solution: LevelSolution, feat_f: Image, feat_m: Image, cfg: RegisterConfig, prompts: Sequence = (),
             fixed_weights: Optional[torch.Tensor] = None, step_fraction: float = 1.0) -> torch.Tensor:
    """One solver step taken at a level's converged transform, differentiable w.r.t. the feature images.

    Jacobian-free backpropagation (Fung et al. 2022; DIO trains this way): the optimum ``theta*`` of the solver
    is treated as a fixed point of its update ``theta <- theta - eta * grad_theta L(theta; features)``, and the
    gradient of a training loss is taken through that single update at ``theta*`` only. Nothing of the
    solver's iterations is kept, so memory does not grow with them. ``eta`` scales each parameter tensor's step
    to ``step_fraction`` x the level's learning rate in RMS (the scale itself is not differentiated), like one
    normalised gradient-descent step of the solver; a small fraction keeps the loss evaluated near ``theta*``,
    where the Jacobian-free approximation holds.

    Args:
        solution: the level as :func:`solve` returned it (its ``model`` holds ``theta*``).
        feat_f, feat_m: the level's feature images *with* their graph to the network.
    Returns:
        the displacement (1, 3, Z, Y, X) mm on ``solution.grid`` after the step.
    """
    from torch.func import functional_call

    dcfg = cfg.dio
    lr = dict(zip(dcfg.levels, dcfg.learning_rates))[solution.level] * step_fraction
    model = solution.model
    problem = Problem(feat_f.data, feat_m.data, feat_f.grid, feat_m.grid, fixed_weights, prompts=list(prompts))
    objective = level_solver(cfg, 0, lr).objective(problem)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with twice_differentiable():  # the step's gradient is differentiated again, w.r.t. the features
        loss, _ = objective(functional_call(model, {**params, **buffers}, ()))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        stepped = {}
        for (name, p), g in zip(params.items(), grads):
            rms = g.detach().pow(2).mean().sqrt().clamp_min(1e-12)
            stepped[name] = p - (lr / rms) * g
        return functional_call(model, {**stepped, **buffers}, ())
