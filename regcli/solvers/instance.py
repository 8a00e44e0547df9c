"""Instance optimisation (IO): one solver shared by every method.

transform model × similarity × optimizer × regulariser, each chosen by name from its registry::

    solver = InstanceOptimization(model="freeform", similarity="feature_ssd", optimizer="adam",
                                  regularizer="diffusion", reg_weight=1.25, iterations=80, lr=1.0)
    result = solver.run(problem, init=disp0)

The moving data are sampled at ``x + u(x)`` for every voxel ``x`` of ``problem.grid``
(:class:`regcli.resample.FieldWarper`), so the moving data may live on any grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from regcli.errors import ConvergenceError
from regcli.regularizers import make_regularizer
from regcli.resample import FieldWarper
from regcli.runtime import threads_for
from regcli.similarity import make_similarity
from regcli.solvers.models import MODELS
from regcli.solvers.optimizers import OPTIMIZERS
from regcli.spaces.grid import Grid


@dataclass
class Problem:
    """What to align.

    Attributes:
        fixed: (C, Z, Y, X) float32 data (intensities or features) on ``grid``; its dtype is the solver's (float64
            with ``precision: float64``: the transform model, the sampling coordinates and the objective follow it).
        moving: (C, Z', Y', X') data on ``moving_grid``, of the same dtype.
        grid: the grid of ``fixed``; the transform model's displacement lives here.
        moving_grid: grid of ``moving`` (defaults to ``grid``).
        fixed_mask: optional (Z, Y, X) weights on ``grid``.
        moving_mask: optional (Z', Y', X') weights on ``moving_grid`` (warped along with the image).
        support: optional (Z, Y, X) bool on ``grid``: the voxels where the similarity can vary. The caller
            guarantees that elsewhere the per-voxel term of a voxel-wise similarity is zero and has zero
            gradient for the displacements the solve can reach (e.g. flat background in both images). Such
            similarities (``pointwise`` ones) are then evaluated on the support only and scaled to the
            value on the whole grid; others ignore it.
        prompts: extra objective terms (:mod:`regcli.solvers.prompts`): objects with ``name``, ``weight`` and
            ``loss(disp, grid) -> scalar tensor`` for the displacement (1, 3, Z, Y, X) mm on ``grid``; the
            solver adds ``weight * loss`` (label maps, landmarks given at test time).
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    grid: Grid
    moving_grid: Optional[Grid] = None
    fixed_mask: Optional[torch.Tensor] = None
    moving_mask: Optional[torch.Tensor] = None
    support: Optional[torch.Tensor] = None
    prompts: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.moving_grid is None:
            self.moving_grid = self.grid
        if self.fixed.dim() == 3:
            self.fixed = self.fixed[None]
        if self.moving.dim() == 3:
            self.moving = self.moving[None]


@dataclass
class Result:
    model: torch.nn.Module
    disp: torch.Tensor  # (3, Z, Y, X) mm on problem.grid, detached
    history: list[dict] = field(default_factory=list)
    converged: bool = True
    seconds: float = 0.0


@dataclass
class InstanceOptimization:
    model: str = "freeform"
    similarity: str | Callable = "feature_ssd"
    optimizer: str = "adam"
    regularizer: str = "diffusion"
    reg_weight: float = 0.0
    iterations: int = 80
    lr: float = 1.0
    model_params: dict = field(default_factory=dict)
    similarity_params: dict = field(default_factory=dict)
    regularizer_params: dict = field(default_factory=dict)
    optimizer_params: dict = field(default_factory=dict)
    stage: str = "instance optimisation"
    progress: Optional[Callable[[int, int, float], None]] = None
    rel_tol: float = 0.0  # stop early when the loss changes less than this (relative) over 10 iterations

    def build_model(self, problem: Problem, init: Optional[torch.Tensor] = None) -> torch.nn.Module:
        cls = MODELS.get(self.model)
        return cls(problem.grid, init=init, device=problem.fixed.device, dtype=problem.fixed.dtype,
                   **self.model_params)

    def objective(self, problem: Problem) -> Callable[[torch.Tensor], tuple[torch.Tensor, dict]]:
        """The function the solver minimises: ``f(disp) -> (loss, parts)`` for a displacement (1, 3, Z, Y, X) mm
        on ``problem.grid``: similarity + reg_weight * regulariser + sum of weight * prompt, with ``parts`` the
        float value of each term. Differentiable w.r.t. ``disp`` and the problem's data (implicit training
        differentiates it w.r.t. the features)."""
        dev = problem.fixed.device
        sim = self.similarity if callable(self.similarity) else make_similarity(self.similarity, **self.similarity_params)
        reg = make_regularizer(self.regularizer, **self.regularizer_params)
        warper = FieldWarper(problem.moving_grid, problem.grid, dev, problem.fixed.dtype)
        fixed = problem.fixed[None]
        moving = problem.moving[None]
        fmask = problem.fixed_mask[None, None] if problem.fixed_mask is not None else None
        mmask = problem.moving_mask[None, None] if problem.moving_mask is not None else None
        index, scale = None, 1.0
        if (problem.support is not None and getattr(sim, "pointwise", False) and mmask is None
                and bool(problem.support.any())):
            index, scale, fixed, fmask = _restrict(problem.support, fixed, fmask)
        spacing = problem.grid.spacing
        grid_sample = _grid_sample()

        def f(disp: torch.Tensor) -> tuple[torch.Tensor, dict]:
            coords = warper.coords(disp) if index is None else warper.coords_at(disp, index)
            warped = grid_sample(moving, coords, "bilinear", "border")
            mask = fmask
            if mmask is not None:
                wm = grid_sample(mmask, coords, "bilinear", "zeros")
                mask = wm if mask is None else mask * wm
            s = sim(fixed, warped, mask) * scale
            r = reg(disp, spacing) if self.reg_weight > 0 else disp.sum() * 0.0
            loss = s + self.reg_weight * r
            parts = {"similarity": s, "regularizer": r}
            for prompt in problem.prompts:
                value = prompt.loss(disp, problem.grid)
                parts[prompt.name] = value
                loss = loss + prompt.weight * value
            return loss, parts

        return f

    def run(self, problem: Problem, init: Any = None, model: Optional[torch.nn.Module] = None) -> Result:
        """Minimise the objective from ``init`` (or ``model``'s start); one CPU thread on small grids
        (:func:`regcli.runtime.threads_for`)."""
        with threads_for(problem.grid.num_voxels, problem.fixed.device):
            return self._run(problem, init, model)

    def _run(self, problem: Problem, init: Any, model: Optional[torch.nn.Module]) -> Result:
        t0 = time.perf_counter()
        dev = problem.fixed.device
        model = model or self.build_model(problem, init)
        model.to(dev)
        groups = model.param_groups(self.lr) if hasattr(model, "param_groups") else model.parameters()
        opt = OPTIMIZERS.get(self.optimizer)(groups, self.lr, **self.optimizer_params)
        objective = self.objective(problem)
        history: list[dict] = []
        converged = True
        last: dict = {}

        def closure() -> torch.Tensor:
            """Loss at the current parameters, with its gradient accumulated (optimizers may call it again)."""
            opt.zero_grad(set_to_none=True)
            loss, parts = objective(model())
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise ConvergenceError(f"{self.stage} diverged at iteration {len(history) + 1}: loss is {lv}")
            last.clear()
            last.update({"loss": lv, **{k: float(v.detach()) for k, v in parts.items()}})
            loss.backward()
            return loss

        for it in range(self.iterations):
            if getattr(opt, "needs_closure", False):
                opt.step(closure)
            else:
                closure()
                opt.step()
            after = getattr(model, "after_step", None)
            if after is not None:
                after()
            lv = last["loss"]
            history.append({"iteration": it + 1, **last})
            if self.progress is not None:
                self.progress(it + 1, self.iterations, lv)
            if self.rel_tol > 0 and it >= 20:
                old = history[-11]["loss"]
                if abs(old - lv) <= self.rel_tol * max(abs(old), 1e-12):
                    break
        with torch.no_grad():
            final = model().detach()[0]
        if not torch.isfinite(final).all():
            raise ConvergenceError(f"{self.stage} produced a non-finite transform")
        return Result(model, final, history, converged, time.perf_counter() - t0)


def _grid_sample():
    from regcli.resample import grid_sample  # local: keeps the import graph flat

    return grid_sample


def _restrict(support: torch.Tensor, fixed: torch.Tensor, fmask: Optional[torch.Tensor]):
    """Gather the support voxels of (1, C, Z, Y, X) ``fixed`` (and the fixed mask) as (1, C, 1, 1, P).

    Returns the flat voxel indices, the factor that turns the mean over the support into the mean over the
    whole grid (the off-support terms are zero), and the gathered data and mask.
    """
    index = support.reshape(-1).nonzero().squeeze(1).to(fixed.device)
    c = fixed.shape[1]
    fixed_s = fixed.reshape(c, -1).index_select(1, index).reshape(1, c, 1, 1, -1)
    if fmask is None:
        return index, index.numel() / support.numel(), fixed_s, None
    w = fmask.reshape(-1)
    w_s = w.index_select(0, index)
    total = float(w.sum())
    scale = float(w_s.sum()) / total if total > 0 else 1.0
    return index, scale, fixed_s, w_s.reshape(1, 1, 1, 1, -1)


def solver_from_config(icfg, *, iterations: int, lr: float, reg_weight: float, smoothing_passes: int = 0,
                       gradient_floor: float = 0.0, num_voxels: int = 1, stage: str = "instance optimisation",
                       progress: Optional[Callable[[int, int, float], None]] = None,
                       similarity: str | Callable | None = None, regularizer: Optional[str] = None
                       ) -> InstanceOptimization:
    """The IO solver a method's stage uses: transform model and optimizer from ``icfg``
    (:class:`regcli.config.InstanceConfig`, the test-time swap), the stage's own schedule. ``lr`` is a step in
    mm for every model (linear models convert it at their radius).

    ``gradient_floor`` (Adam only; > 0) is Adam's eps per voxel of a ``num_voxels`` grid: the similarity is a mean
    over voxels, so a voxel's gradient is ``1/num_voxels`` of its own misfit gradient.
    """
    params = {"smoothing_passes": int(smoothing_passes), "svf_steps": icfg.svf_steps,
              "greedy_update_sigma_mm": icfg.greedy_update_sigma_mm,
              "greedy_total_sigma_mm": icfg.greedy_total_sigma_mm, "bspline_spacing_mm": icfg.bspline_spacing_mm,
              "lr_mm": True}
    opt_params: dict = {}
    if icfg.optimizer == "adam" and gradient_floor > 0:
        opt_params = {"eps": gradient_floor / max(1, num_voxels)}
    elif icfg.optimizer == "sgd":
        opt_params = {"step_mm": True}  # lr is a step in mm, as for Adam (see SGD)
    return InstanceOptimization(
        model=icfg.transform, similarity=similarity or icfg.similarity, optimizer=icfg.optimizer,
        regularizer=regularizer or icfg.regularizer, reg_weight=reg_weight, iterations=iterations, lr=lr,
        model_params=params, optimizer_params=opt_params, stage=stage, progress=progress)
