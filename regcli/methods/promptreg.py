"""PromptReg: one task-prompted registration network (:mod:`regcli.models.promptreg`), in physical space.

``regcli register fixed moving --method promptreg`` runs, after the affine stage:

1. **Network grid.** The deformable working grid is the fixed image's field of view resized to the grid the
   network was trained on (``net.input_shape`` of its ``config.json``, tensor order ``(Z, Y, X)``, 64^3 by
   default), or to ``promptreg.input_shape`` when given (the network accepts any size): :func:`working_grid`
   (``Grid.with_size``; the spacing adapts per axis, so an anisotropic field of view gives an anisotropic grid).
   The pipeline resamples the fixed image and the affinely mapped moving image onto it with plain trilinear
   interpolation, as the foundation method does.
2. **Intensities** (``promptreg.modality``, ``promptreg.moving_modality``) on the original images before any
   resampling (:func:`prepare_images`, :func:`regcli.methods.foundation.prepare_intensities`): CT clipped to
   [-1000, 1000] HU, MRI to [minimum, 99th percentile], then scaled to [0, 1].
3. **One forward pass** ``net(moving, fixed)`` without a task id: the network routes itself through its
   predicted prompt mixture (the fusion weights over its static prompts, recorded in the history as
   ``fusion``, keyed by the task names of the model's ``config.json`` ``training.tasks`` or by index). Its
   stationary velocity ``v`` and displacement ``d = exp(v)`` are in voxels of the network grid, channels in
   tensor axis order ``(z, y, x)``, fixed voxel -> moving voxel; :func:`voxels_to_world` turns them into LPS mm
   ``(x, y, z)`` through the grid: ``u(x) = D S d_xyz(x)``.
4. **Exact inverse.** The inverse of ``exp(v)`` is ``exp(-v)``: the same scaling and squaring of ``-v``
   (:func:`regcli.models.promptreg.integrate_velocity`) gives the inverse warp on the same grid, returned as
   :attr:`DeformableResult.inverse` (its inverse-consistency error goes into the report).
5. **Instance optimisation** (``promptreg.io``, ``--iterations``): ``field`` (default) runs regcli's shared
   solver from the network's field exactly as ``--method foundation --io field`` does
   (:func:`regcli.methods.foundation.field_io`: ConvexAdam's instance optimisation and refinement on MIND-SSC,
   on the usual working grid); the inverse then comes from the pipeline's fixed-point inversion. ``none``: the
   network alone.

The fields leave as world LPS mm on the network grid (or the IO grid); the pipeline resamples them onto the
fixed image's grid (and the inverse onto the moving image's grid, the preset's ``inverse_grid: moving``) and
writes ANTs files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from regcli.config import RegisterConfig
from regcli.errors import ConfigError, ConvergenceError, GeometryError
from regcli.methods.convexadam import DeformableResult, ProgressFn, _scalar, method_setup
from regcli.methods.foundation import field_io, map_to_world, prepare_pair
from regcli.models.promptreg import PromptRegNet, integrate_velocity, promptreg_from
from regcli.progress import log
from regcli.spaces.grid import Grid
from regcli.transforms.displacement import DisplacementField

STAGE_NETWORK = "promptreg network"


@dataclass(frozen=True)
class PromptRegModel:
    """A loaded PromptReg network and the names of its static prompts.

    Attributes:
        net: the network (eval mode).
        tasks: one name per static prompt (SKB order): the model's ``config.json`` ``training.tasks`` when it
            lists one distinct name per prompt, else ``"0"``, ``"1"``, ...
    """

    net: PromptRegNet
    tasks: tuple[str, ...]


def task_names(training: object, num_tasks: int) -> tuple[str, ...]:
    """The names of a model's ``num_tasks`` static prompts from its ``config.json`` ``training`` section: its
    ``tasks`` list when that holds ``num_tasks`` distinct strings, else the indices as strings."""
    tasks = training.get("tasks") if isinstance(training, dict) else None
    if tasks is None:
        return tuple(str(i) for i in range(num_tasks))
    if (isinstance(tasks, (list, tuple)) and len(tasks) == num_tasks and all(isinstance(t, str) for t in tasks)
            and len(set(tasks)) == num_tasks):
        return tuple(tasks)
    log.warning("promptreg: the model's training.tasks (%r) does not name its %d prompts; reporting the fusion "
                "weights by index", tasks, num_tasks)
    return tuple(str(i) for i in range(num_tasks))


def _build(model) -> PromptRegModel:
    net = promptreg_from(model)
    return PromptRegModel(net, task_names(model.config.get("training"), net.cfg.num_tasks))


def _load(spec: str) -> tuple[PromptRegModel, dict]:
    """The network for ``spec`` and its provenance; resolved and verified once per process and spec."""
    from regcli.weights import cached_network

    return cached_network(spec, _build, "promptreg network")


def preflight(cfg: RegisterConfig) -> list[dict]:
    """Resolve, verify and load the network before the registration starts (one-line WeightsError); its
    provenance for report.json, with the names of its static prompts (``tasks``)."""
    model, provenance = _load(cfg.promptreg.weights)
    return [{**provenance, "tasks": list(model.tasks)}]


def input_shape(cfg: RegisterConfig) -> tuple[int, int, int]:
    """The network grid's shape (Z, Y, X): ``promptreg.input_shape``, else the network's own ``input_shape``."""
    shape = cfg.promptreg.input_shape or tuple(_load(cfg.promptreg.weights)[0].net.cfg.input_shape)
    if min(shape) < 2:
        raise ConfigError(f"promptreg: the network grid {tuple(shape)} needs at least 2 voxels per axis "
                          f"(promptreg.input_shape)")
    return tuple(int(n) for n in shape)


def working_grid(fixed_grid: Grid, cfg: RegisterConfig) -> tuple[Grid, bool]:
    """The network grid (:func:`input_shape`, tensor order) over the fixed image's field of view, and False: no
    anti-alias smoothing before resampling onto it (as the foundation method)."""
    return fixed_grid.with_size(tuple(reversed(input_shape(cfg)))), False


def prepare_images(fixed, moving, cfg: RegisterConfig):
    """Both images' intensities prepared to [0, 1] (:func:`regcli.methods.foundation.prepare_intensities`,
    ``promptreg.modality`` / ``promptreg.moving_modality``) on their own grids, before the pipeline resamples
    them onto the network grid (:func:`regcli.methods.foundation.prepare_pair`)."""
    return prepare_pair(fixed, moving, cfg.promptreg, "promptreg")


def voxels_to_world(d: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A PromptReg displacement in voxels -> world LPS mm on ``grid``.

    Args:
        d: (3, Z, Y, X) float32, voxel units of ``grid``, channels in tensor axis order (z, y, x).
        grid: the grid ``d`` lives on (at least 2 voxels per axis).
    Returns:
        (3, Z, Y, X) float32, world LPS mm, components (x, y, z): ``D S d_xyz`` (through the grid's unit-cube
        map, :func:`regcli.methods.foundation.map_to_world`, so the conversion lives in ``Grid``).
    """
    steps = torch.tensor([n - 1 for n in grid.shape], dtype=d.dtype, device=d.device).view(3, 1, 1, 1)
    return map_to_world(d / steps, grid)


def promptreg(fixed, moving, cfg: RegisterConfig, fixed_mask=None, moving_mask=None,
              progress: Optional[ProgressFn] = None, device=None, prompts: Sequence = (),
              originals: Optional[tuple] = None) -> DeformableResult:
    """Deformable registration of ``moving`` to ``fixed`` (both on the network grid, :func:`working_grid`).

    ``prompts`` (label maps, landmarks) join the objective of ``io=field``; the network itself ignores them (its
    prompt is the predicted task mixture). ``originals`` = (fixed, moving, affine, fixed mask, moving mask) as
    given to the pipeline, for ``io=field``. Returns the forward field (world LPS mm on the network grid, or with
    ``io=field`` on the usual working grid), the history (``fusion``: one row ``{task: weight}``; with
    ``io=field`` also ``instance``, ``refine``) and, unless ``io=field`` changed the field or no inverse warp
    is written, the exact inverse ``exp(-v)`` on the network grid.
    """
    t_start = time.perf_counter()
    grid, out_device, dev, report = method_setup("promptreg", fixed, moving, device, progress)
    pcfg = cfg.promptreg
    timings: dict[str, float] = {}
    history: dict[str, list[dict]] = {}

    model = _load(pcfg.weights)[0]
    net = model.net.to(dev)
    fdata = _scalar(fixed, "fixed").to(dev)
    mdata = _scalar(moving, "moving").to(dev)
    shape = input_shape(cfg)
    if tuple(fdata.shape) != shape:
        raise GeometryError(f"promptreg: the working grid {tuple(fdata.shape)} is not the network grid {shape}")
    run_io = pcfg.io == "field" and pcfg.io_iterations > 0
    want_inverse = cfg.inverse_warp and not run_io

    t = time.perf_counter()
    report(STAGE_NETWORK, 0, 1)
    with torch.no_grad():
        out = net(mdata[None, None], fdata[None, None])  # intensities prepared by prepare_images
        u = voxels_to_world(out.disp[0], grid)
        inv = (voxels_to_world(integrate_velocity(-out.velocity, net.cfg.integration_steps)[0], grid)
               if want_inverse else None)
    report(STAGE_NETWORK, 1, 1)
    timings["network"] = time.perf_counter() - t
    weights = {name: float(w) for name, w in zip(model.tasks, out.weights[0].cpu().tolist())}
    history["fusion"] = [weights]
    log.info("promptreg fusion weights: %s", ", ".join(f"{k} {v:.3f}" for k, v in weights.items()))
    del out

    if run_io:
        t = time.perf_counter()
        if originals is None:  # called without the original images: the IO runs on the network grid
            originals = (fixed, moving, None, fixed_mask, moving_mask)
        u, grid, history = field_io(u, grid, originals, cfg, report, dev, prompts, history, pcfg.io_iterations)
        timings["field_io"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_start
    if not torch.isfinite(u).all() or (inv is not None and not torch.isfinite(inv).all()):
        raise ConvergenceError("promptreg produced a non-finite displacement field")
    field = DisplacementField(u.to(out_device).contiguous(), grid)
    inverse = DisplacementField(inv.to(out_device).contiguous(), grid) if inv is not None else None
    return DeformableResult(field, history, timings, inverse=inverse, report={"fusion_weights": weights})
