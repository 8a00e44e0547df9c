"""The registration pipeline: read -> affine stage -> deformable stage -> transforms -> warp/report.

:func:`register_images` works on in-memory :class:`~regcli.spaces.Image` objects and returns the
transforms; :func:`run_register` is what ``regcli register`` calls: it validates inputs and outputs
first, runs the registration, and publishes every output file together (nothing is written on error).
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Collection, Optional, Sequence

import numpy as np
import torch

from regcli.config import RegisterConfig
from regcli.errors import GeometryError
from regcli.features.intensity import smooth_for
from regcli.io.atomic import OutputSet
from regcli.progress import Progress, log
from regcli.resample import inside_field_of_view, resample_to_grid, upsample_field, warp, warp_many
from regcli.runtime import Runtime, setup_runtime
from regcli.spaces import Grid, Image
from regcli.transforms import (
    AffineTransform, CompositeTransform, DisplacementField, inverse_consistency_error, invert_displacement,
)


@dataclass
class RegisterInputs:
    """Paths given to ``regcli register``."""

    fixed: Path
    moving: Path
    output_prefix: str
    fixed_mask: Optional[Path] = None
    moving_mask: Optional[Path] = None
    fixed_labels: Optional[Path] = None
    moving_labels: Optional[Path] = None
    fixed_landmarks: Optional[Path] = None
    moving_landmarks: Optional[Path] = None
    #: where to write the warped moving image instead of ``PREFIXWarped.nii.gz`` (ANTs' ``-o [PREFIX,WARPED]``)
    warped: Optional[Path] = None
    #: where to write the fixed image warped into the moving space (ANTs' ``-o [PREFIX,WARPED,INVERSE_WARPED]``)
    inverse_warped: Optional[Path] = None


def parse_output_spec(spec: str) -> tuple[str, Optional[Path], Optional[Path]]:
    """``PREFIX``, or ANTs' ``[PREFIX,WARPED,INVERSE_WARPED]`` (the last two optional, empty = not written): the
    prefix, the path of the warped moving image and the path of the fixed image warped into the moving space.

    Raises:
        ValueError: brackets that do not enclose the whole value, or not 1 to 3 names with a prefix first.
    """
    s = spec.strip()
    if not (s.startswith("[") or s.endswith("]")):
        return spec, None, None
    parts = [p.strip() for p in s[1:-1].split(",")] if s.startswith("[") and s.endswith("]") else []
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ValueError(f"'{spec}' is neither a prefix nor ANTs' [PREFIX,WARPED,INVERSE_WARPED] form")
    parts += [""] * (3 - len(parts))
    return parts[0], Path(parts[1]) if parts[1] else None, Path(parts[2]) if parts[2] else None


@dataclass
class Registration:
    """Result of :func:`register_images`.

    Attributes:
        affine: fixed world point -> moving world point (identity when the affine stage is off).
        field: deformable part ``u`` (3, Z, Y, X) LPS mm on the fixed grid, or None for linear methods.
        inverse_field: inverse of ``x -> x + u(x)`` (ANTs ``1InverseWarp``), or None; on the fixed grid, or with
            ``inverse_grid: moving`` on the moving grid carried into the fixed space (``Grid.carried_by``).
        working_grid: the isotropic grid the deformable stage ran on.
    """

    affine: AffineTransform
    field: Optional[DisplacementField] = None
    inverse_field: Optional[DisplacementField] = None
    working_grid: Optional[Grid] = None
    timings: dict = dc_field(default_factory=dict)
    history: dict = dc_field(default_factory=dict)
    inverse_error: Optional[dict] = None
    models: list = dc_field(default_factory=list)  # provenance of learned models used (report.json "extra")
    method_report: dict = dc_field(default_factory=dict)  # the method's own findings (report.json "extra.method")

    @property
    def transform(self) -> CompositeTransform:
        """Fixed -> moving mapping in antsApplyTransforms order ``[Warp, Affine]``."""
        parts = [self.field] if self.field is not None else []
        return CompositeTransform(parts + [self.affine])

    @property
    def inverse_transform(self) -> Optional[CompositeTransform]:
        """Moving -> fixed mapping ``[Affine^-1, InverseWarp]`` (None if the field has no inverse)."""
        if self.field is not None and self.inverse_field is None:
            return None
        parts = [self.inverse_field] if self.inverse_field is not None else []
        return CompositeTransform([self.affine.inverse()] + parts)


def output_paths(prefix: str, config: RegisterConfig, warped: Optional[Path] = None,
                 inverse_warped: Optional[Path] = None) -> dict[str, Path]:
    """ANTs-style output names for a prefix (``out/pair_`` -> ``out/pair_0GenericAffine.mat``, ...); ``warped``
    and ``inverse_warped`` name those images explicitly (and are then written whatever ``write_warped`` says)."""
    p = str(prefix)
    out = {"affine": Path(p + "0GenericAffine.mat")}
    if config.deformable:
        out["warp"] = Path(p + "1Warp.nii.gz")
        if config.inverse_warp:
            out["inverse_warp"] = Path(p + "1InverseWarp.nii.gz")
    if warped is not None or config.write_warped:
        out["warped"] = Path(warped) if warped is not None else Path(p + "Warped.nii.gz")
    if inverse_warped is not None:
        out["inverse_warped"] = Path(inverse_warped)
    out["report"] = Path(p + "Report.json")
    if config.html_report:
        out["html"] = Path(p + "Report.html")
    return out


def _world_box_overlap(a: Grid, b: Grid) -> tuple[bool, float]:
    """(axis-aligned world bounding boxes overlap?, distance between centres in mm)."""
    ca, cb = a.corners_world(), b.corners_world()
    lo = np.maximum(ca.min(0), cb.min(0))
    hi = np.minimum(ca.max(0), cb.max(0))
    return bool(np.all(hi > lo)), float(np.linalg.norm(a.center_world() - b.center_world()))


def check_overlap(fixed: Image, moving: Image) -> None:
    """Refuse images that do not overlap in world space (E6)."""
    ok, dist = _world_box_overlap(fixed.grid, moving.grid)
    if not ok:
        raise GeometryError(
            f"fixed '{fixed.name}' and moving '{moving.name}' do not overlap in world space (centres "
            f"{dist:.1f} mm apart); enable the affine stage with --affine-init moments/center, or fix the headers"
        )


# Fixed-point iterations of the inverse on the fine grid, after the working grid's inverse. On sub-03<-04 at 1 mm
# (5.5 M voxels): the residual's mean / p99 is 0.049 / 0.26 mm with none, 0.0005 / 0.006 mm after 5 (3.3 s),
# and 0.0002 / 0.0006 mm after 10 (5.4 s). The max never reaches ITK's 0.1 mm where the field folds, so the
# loop would otherwise always run to inverse_iterations (20: 11 s).
FINE_INVERSE_ITERATIONS = 5


#: the two kinds of prompt: ``prompts.labels`` / ``--prompt-labels`` and ``prompts.landmarks`` / ``--prompt-landmarks``
PROMPT_KINDS = ("labels", "landmarks")


def moving_within_fixed_view(moving_w: Image, fixed_grid: Grid, work: Grid) -> Image:
    """The moving image on the working grid, zero wherever the working grid lies outside the fixed image's field of
    view, as the fixed image is there. ConvexAdam's and DIO's working grid is a lattice centred on the fixed field of
    view that can reach up to 5 mm past it (docs/methods.md §3); there the fixed image stopped (zero) beside a moving
    image that went on, and the similarity bent the field to match that edge: on a fixed image cut from the moving
    one (the identity is the truth) by up to 3.7 mm within 10 mm of the cut (a bug hunt, s23). Unchanged (the same
    tensor) where the working grid lies inside the fixed field of view.

    The moving image's own field of view is left alone: zeroing the fixed image where the moving one ends as well
    pinned the field to the affine at that edge, and cost ConvexAdam 0.017 Dice on the CT benchmark, whose true
    displacements are largest there."""
    inside = inside_field_of_view(fixed_grid, work)
    if bool(inside.all()):
        return moving_w
    data = moving_w.data
    return Image(torch.where(inside.to(data.device), data, torch.zeros((), dtype=data.dtype, device=data.device)),
                 moving_w.grid, moving_w.name, moving_w.meta)


def _stage_prompts(config: RegisterConfig, fixed_labels, moving_labels, landmarks, affine, grid: Grid,
                   label_values=None) -> list:
    """The prompts ``config.prompts`` asks for, staged on the fixed-side ``grid`` (see ``stage_prompts``);
    ``label_values``: the label maps' values, as :func:`check_prompts` returned them."""
    from regcli.solvers.prompts import stage_prompts

    pc = config.prompts
    return stage_prompts(
        fixed_labels if pc.labels is not None else None, moving_labels if pc.labels is not None else None,
        None if pc.labels in (None, "all") else list(pc.labels),
        landmarks[0].points if pc.landmarks else None, landmarks[1].points if pc.landmarks else None,
        affine, pc.label_weight, pc.landmark_weight, grid=grid, label_values=label_values)


def _stage_progress(progress: Optional[Progress]):
    """Adapter: ``cb(stage, i, n)`` callback for method implementations."""
    if progress is None:
        return None
    started: set[str] = set()

    def cb(stage: str, i: int, n: int) -> None:
        if stage not in started:
            started.add(stage)
            progress.start(stage, n)
        progress.update(stage, i)
        if i >= n:
            progress.finish(stage)

    return cb


def register_images(fixed: Image, moving: Image, config: RegisterConfig, fixed_mask: Optional[Image] = None,
                    moving_mask: Optional[Image] = None, progress: Optional[Progress] = None,
                    runtime: Optional[Runtime] = None, fixed_labels: Optional[Image] = None,
                    moving_labels: Optional[Image] = None, landmarks=None, *, label_values=None,
                    prompt_flags: Collection[str] = ()) -> Registration:
    """Register ``moving`` to ``fixed`` (in memory). Results live on the fixed grid.

    Args:
        fixed, moving: scalar float32 images on any grids (size, spacing, origin, direction may differ).
        config: validated configuration (method preset and stage parameters).
        fixed_mask, moving_mask: optional {0, 1} masks on the fixed/moving grids.
        fixed_labels, moving_labels, landmarks: label maps (on their images' grids) and ``(fixed, moving)``
            landmark point sets (LPS mm); used by the deformable stage only where ``config.prompts`` asks for them.
        label_values: the values present in the two label maps, when the caller has counted them
            (:data:`regcli.solvers.prompts.LabelValues`); else counted here, once, for label prompts.
        prompt_flags: how error messages name the prompts (:func:`check_prompts`).

    ``config.precision`` is the solvers' dtype: the affine stage and the working-grid images get it, and the fields
    of the result have it (float64 fields are written as float32 files).
    """
    label_values = check_prompts(config, fixed_labels, moving_labels, landmarks, prompt_flags, label_values)
    check_masks(config, fixed_mask, moving_mask)
    check_variance(fixed, fixed_mask, "fixed")
    check_variance(moving, moving_mask, "moving")
    runtime = runtime or setup_runtime(config.device, config.threads, config.seed, config.deterministic)
    dev = runtime.device
    dtype = getattr(torch, config.precision)  # of the solvers (RELIABILITY N3); geometry is float64 anyway
    timings: dict[str, float] = {}
    history: dict[str, list] = {}
    cb = _stage_progress(progress)

    models: list[dict] = []
    if config.deformable:  # e.g. model weights: fail before any computation
        from regcli.methods import preflight

        models = preflight(config.method, config)

    # --------------------------------------------------------------- affine stage
    t0 = time.perf_counter()
    if config.affine.enabled:
        from regcli.solvers.affine import run_affine_stage

        res = run_affine_stage(fixed, moving, config.affine, fixed_mask, moving_mask, progress=cb, device=dev,
                               dtype=dtype)
        affine = res.transform
        history.update({f"affine/{k}": v for k, v in res.history.items()})
    else:
        check_overlap(fixed, moving)
        affine = AffineTransform.identity()
    timings["affine"] = time.perf_counter() - t0
    log.info("affine stage: %.2f s", timings["affine"])
    reg = Registration(affine=affine, timings=timings, history=history, models=models)
    if not config.deformable:
        return reg

    # --------------------------------------------------------------- working grid
    t0 = time.perf_counter()
    from regcli.methods import prepare_images, working_grid
    from regcli.methods.convexadam import coarse_working_grid

    work, antialias = working_grid(config.method, fixed.grid, config)
    if (coarse := coarse_working_grid(fixed.grid, work)) is not None:
        log.warning("%s", coarse)
    sp = min(work.spacing)
    fixed_p, moving_p = prepare_images(config.method, fixed, moving, config)
    fixed_w = resample_to_grid(smooth_for(fixed_p, sp) if antialias else fixed_p, work).to(dev, dtype)
    moving_w = warp(smooth_for(moving_p, sp) if antialias else moving_p, affine, work).to(dev, dtype)
    moving_w = moving_within_fixed_view(moving_w, fixed.grid, work)
    fmask_w = resample_to_grid(fixed_mask, work, "nearest").to(dev) if fixed_mask is not None else None
    mmask_w = warp(moving_mask, affine, work, "nearest").to(dev) if moving_mask is not None else None
    timings["resample"] = time.perf_counter() - t0

    # --------------------------------------------------------------- deformable stage
    from regcli.methods import get_method

    t0 = time.perf_counter()
    kwargs = {}
    if config.prompts.labels is not None or config.prompts.landmarks:
        kwargs["prompts"] = _stage_prompts(config, fixed_labels, moving_labels, landmarks, affine, work,
                                           label_values)
    method = get_method(config.method)
    if "originals" in inspect.signature(method).parameters:  # a method that also works on the original images
        kwargs["originals"] = (fixed, moving, affine, fixed_mask, moving_mask)
    dres = method(fixed_w, moving_w, config, fixed_mask=fmask_w, moving_mask=mmask_w, progress=cb, device=dev,
                  **kwargs)
    timings["deformable"] = time.perf_counter() - t0
    for k, v in dres.timings.items():
        timings[f"deformable/{k}"] = v
    history.update({f"{config.method}/{k}": v for k, v in dres.history.items()})
    reg.method_report = dict(dres.report)
    field_w = dres.field

    # --------------------------------------------------------------- optional: fine refinement
    if config.instance.fine_spacing_mm is not None:
        from regcli.methods.fine import fine_refinement

        t0 = time.perf_counter()
        fine = fixed.grid.with_spacing(config.instance.fine_spacing_mm)
        prompts = (_stage_prompts(config, fixed_labels, moving_labels, landmarks, affine, fine, label_values)
                   if "prompts" in kwargs else ())
        field_fine, history["fine"] = fine_refinement(fixed, moving, affine, field_w, fine, config, fixed_mask,
                                                      moving_mask, prompts, cb, dev)
        timings["fine"] = time.perf_counter() - t0
        log.info("fine refinement at %g mm: %.2f s", config.instance.fine_spacing_mm, timings["fine"])
    else:
        field_fine = field_w

    # --------------------------------------------------------------- inverse (fixed or moving grid), field (fixed)
    t0 = time.perf_counter()
    if config.inverse_warp:
        if dres.inverse is not None and field_fine is field_w:  # the method's own inverse (a network's backward map)
            inv = dres.inverse
            stats = {**inverse_consistency_error(field_fine, inv), "source": config.method}
            _warn_if_not_inverse(config, stats)
        else:
            inv, stats = invert_displacement(field_fine, iterations=config.inverse_iterations, grid=field_w.grid,
                                             init=dres.inverse)
            if field_fine is not field_w:  # finished on the fine grid, from the working grid's inverse
                inv, stats = invert_displacement(field_fine, iterations=min(config.inverse_iterations,
                                                                            FINE_INVERSE_ITERATIONS), init=inv)
        reg.inverse_error = stats
        inv_grid = moving.grid.carried_by(affine.inverse().matrix) if config.inverse_grid == "moving" else fixed.grid
        reg.inverse_field = DisplacementField(upsample_field(inv.disp, inv.grid, inv_grid).cpu(), inv_grid)
    timings["inverse"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reg.field = DisplacementField(upsample_field(field_fine.disp, field_fine.grid, fixed.grid).cpu(), fixed.grid)
    reg.working_grid = work
    timings["upsample"] = time.perf_counter() - t0
    return reg


#: mean forward∘inverse residual (mm) of a method's own inverse warp (a network's backward map) above which
#: :func:`register_images` warns (RELIABILITY T3's bound on inverse consistency)
OWN_INVERSE_WARN_MM = 0.5


def _warn_if_not_inverse(config: RegisterConfig, stats: dict) -> None:
    """Warn when the inverse warp a method gave itself is far from the inverse of its forward warp (``stats``: their
    :func:`~regcli.transforms.inverse.inverse_consistency_error`). An undertrained network's two maps can disagree by
    millimetres: the shipped foundation-small's backward map leaves 6.5 mm mean on a 1 mm brain pair (``--io none``),
    where the fixed-point inverse leaves 0.03 mm."""
    if stats["mean_mm"] <= OWN_INVERSE_WARN_MM:
        return
    fix = "; foundation.inverse: fixed_point inverts the forward warp instead" if config.method == "foundation" else ""
    log.warning("%s: its own inverse warp is not the inverse of its forward warp (forward∘inverse mean %.2f mm, "
                "p99 %.2f mm)%s", config.method, stats["mean_mm"], stats["p99_mm"], fix)


def run_register(inputs: RegisterInputs, config: RegisterConfig, overwrite: bool = False,
                 progress: Optional[Progress] = None, command: str = "",
                 prompt_flags: Collection[str] = ()) -> dict:
    """Everything ``regcli register`` does; returns the report dict (with ``outputs``).

    Order: check outputs can be written (before any computation), read and validate inputs, register,
    write every output to temporary files, then publish them all together. The warnings logged on the way are
    listed in the report (``warnings``). ``prompt_flags``: the kinds of prompt (:data:`PROMPT_KINDS`) that
    ``regcli register``'s own flags gave, named ``--prompt-labels``/``--prompt-landmarks`` in messages; the others
    came from ``--config`` and are named by their key (:func:`check_prompts`).
    """
    from regcli.reports.report import WarningLog

    with WarningLog() as warned:
        return _run_register(inputs, config, overwrite, progress, command, warned.messages, prompt_flags)


def _run_register(inputs: RegisterInputs, config: RegisterConfig, overwrite: bool, progress: Optional[Progress],
                  command: str, warnings: list[str], prompt_flags: Collection[str] = ()) -> dict:
    """:func:`run_register`; ``warnings`` fills with the run's warning messages (``report["warnings"]``)."""
    from regcli.io.images import read_image, read_labels, read_mask, write_image
    from regcli.io.transforms import write_affine, write_displacement
    from regcli.reports.report import build_report, peak_memory, report_json

    t_start = time.perf_counter()
    paths = output_paths(inputs.output_prefix, config, inputs.warped, inputs.inverse_warped)
    if "inverse_warped" in paths and config.deformable and not config.inverse_warp:
        from regcli.errors import ConfigError

        raise ConfigError(f"the inverse-warped image '{paths['inverse_warped']}' needs the inverse field: "
                          f"do not turn it off (--no-inverse / inverse_warp: false)")
    outs = OutputSet(overwrite=overwrite, inputs=[inputs.fixed, inputs.moving, inputs.fixed_mask, inputs.moving_mask,
                                                 inputs.fixed_labels, inputs.moving_labels, inputs.fixed_landmarks,
                                                 inputs.moving_landmarks])
    figure_names: list[str] = []
    for key, p in paths.items():
        outs.claim(p, image=key in ("warp", "inverse_warp", "warped", "inverse_warped"))
    figures = html_figure_paths(paths["html"]) if "html" in paths else []
    for p in figures:  # the report's figures: refused now (existing, name too long), not after the registration
        outs.claim(p)
    earlier = earlier_outputs(inputs.output_prefix) if overwrite else []

    runtime = setup_runtime(config.device, config.threads, config.seed, config.deterministic)
    t0 = time.perf_counter()
    memory = preflight_memory(inputs, config, runtime.device)
    fixed = read_image(inputs.fixed, "fixed image")
    moving = read_image(inputs.moving, "moving image")
    fixed_mask = read_mask(inputs.fixed_mask, "fixed mask") if inputs.fixed_mask else None
    moving_mask = read_mask(inputs.moving_mask, "moving mask") if inputs.moving_mask else None
    if fixed_mask is not None:
        fixed_mask = _mask_on(fixed_mask, fixed.grid, "fixed mask")
    if moving_mask is not None:
        moving_mask = _mask_on(moving_mask, moving.grid, "moving mask")
    fixed_labels = read_labels(inputs.fixed_labels, "fixed labels") if inputs.fixed_labels else None
    moving_labels = read_labels(inputs.moving_labels, "moving labels") if inputs.moving_labels else None
    label_values = check_label_inputs(fixed_labels, moving_labels, fixed.grid, moving.grid)
    landmarks = _read_landmarks(inputs)
    t_read = time.perf_counter() - t0

    reg = register_images(fixed, moving, config, fixed_mask, moving_mask, progress, runtime, fixed_labels,
                          moving_labels, landmarks, label_values=label_values, prompt_flags=prompt_flags)
    reg.timings = {"read": t_read, **reg.timings}
    transform = reg.transform

    t0 = time.perf_counter()
    items = []
    need_warped = "warped" in paths or config.html_report
    if need_warped:
        items.append((moving, "linear"))
    if fixed_labels is not None and moving_labels is not None:
        items.append((moving_labels, "nearest"))
    done = warp_many(items, transform, fixed.grid, itk_edges=True)  # one set of mapped points for both
    warped = done.pop(0) if need_warped else None
    warped_labels = done.pop(0) if done else None
    # ANTs' InverseWarped: the fixed image pulled into the moving grid through [Affine^-1, InverseWarp]
    inverse_warped = (warp(fixed, reg.inverse_transform, moving.grid, "linear", itk_edges=True)
                      if "inverse_warped" in paths else None)
    reg.timings["warp"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics, detj = _metrics(fixed, reg, fixed_labels, moving_labels, warped_labels, landmarks, transform,
                             label_values, fixed_mask)
    if config.prompts.labels is not None and "dice_per_label" in metrics:
        metrics.update(prompted_dice(metrics["dice_per_label"], config.prompts.labels))
    if config.prompts.landmarks and "tre" in metrics:
        metrics["tre"]["landmarks_were_prompts"] = True  # not an independent check then
    quality_warnings(metrics)
    reg.timings["metrics"] = time.perf_counter() - t0

    try:
        outs.stage(paths["affine"], lambda tmp: write_affine(reg.affine, tmp))
        images = []
        if "warp" in paths:
            images.append((paths["warp"], lambda tmp: write_displacement(reg.field, tmp)))
        if "inverse_warp" in paths:
            images.append((paths["inverse_warp"], lambda tmp: write_displacement(reg.inverse_field, tmp)))
        if "warped" in paths:
            images.append((paths["warped"], lambda tmp: write_image(warped, tmp, "float32")))
        if inverse_warped is not None:
            images.append((paths["inverse_warped"], lambda tmp: write_image(inverse_warped, tmp, "float32")))
        t0 = time.perf_counter()
        outs.stage_many(images, workers=max(1, runtime.threads))
        reg.timings["write"] = time.perf_counter() - t0
        stages = {k: v for k, v in reg.timings.items() if "/" not in k}  # "deformable/..." are details
        report = build_report(
            command=command or "register",
            config=config.model_dump(mode="json"),
            inputs={k: v for k, v in vars(inputs).items() if k != "output_prefix" and v is not None},
            stages=stages,
            metrics=metrics,
            extra=_extra(reg, runtime),
            outputs=[str(p) for p in paths.values()],
            device=runtime.device,
            grids={"fixed": fixed.grid, "moving": moving.grid},
        )
        report["memory"].update(memory.as_dict())
        report["warnings"] = list(warnings)
        if "html" in paths:  # the page shows the report so far: run, versions, device, memory, warnings, stages
            t0 = time.perf_counter()
            figure_names = _stage_html(outs, paths["html"], inputs, fixed, moving, warped, fixed_labels,
                                       warped_labels, detj, reg, metrics, report)
            reg.timings["html"] = time.perf_counter() - t0
            report["stages"]["html"] = round(reg.timings["html"], 4)
            report["total_seconds"] = round(sum(report["stages"].values()), 4)
            report["outputs"] += figure_names
            report["memory"].update(peak_memory(runtime.device))
            report["warnings"] = list(warnings)
        report["wall_seconds"] = round(time.perf_counter() - t_start, 4)
        text = report_json(report)
        outs.stage(paths["report"], lambda tmp: tmp.write_text(text))
        outs.commit()
    except BaseException:
        outs.abort()
        raise
    remove_stale_outputs(earlier, report["outputs"])
    return report


def earlier_outputs(prefix: str) -> list[Path]:
    """Files an earlier ``register`` run may have left under ``prefix``: the ANTs names of every output it can
    write, and the HTML report's figures that its ``Report.json`` lists (``<prefix>Report*.png`` beside it). Only
    names derived from the prefix: an output named explicitly (``-o [prefix,warped.nii.gz]``) is never among them."""
    from regcli.reports.report import listed_outputs

    p = str(prefix)
    names = [Path(p + s) for s in ("0GenericAffine.mat", "1Warp.nii.gz", "1InverseWarp.nii.gz", "Warped.nii.gz",
                                   "Report.json", "Report.html")]
    stem = Path(p + "Report").name  # the figures: matched by name, beside the report
    names += [Path(p + "Report.json").with_name(Path(o).name) for o in listed_outputs(p) or ()
              if Path(o).name.startswith(stem) and o.endswith(".png")]
    return [n for n in dict.fromkeys(names) if n.is_file()]


def remove_stale_outputs(earlier: Sequence[Path], written: Sequence[str]) -> list[Path]:
    """After a run with ``--overwrite`` has published its outputs (``written``), remove the files of ``earlier``
    (:func:`earlier_outputs`, listed before the run) that it did not write, so that a prefix never mixes two runs
    (e.g. an old ``1Warp`` beside a new affine-only result, which ``-t prefix1Warp -t prefix0GenericAffine`` or
    ``evaluate --transforms-from`` would combine). Returns what was removed."""
    keep = {os.path.realpath(w) for w in written}
    removed = []
    for path in earlier:
        if os.path.realpath(path) in keep:
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("could not remove '%s' of an earlier run under the same prefix: %s", path, e)
    if removed:
        log.info("removed %d output(s) of an earlier run that this run does not write: %s", len(removed),
                 ", ".join(str(r) for r in removed))
    return removed


#: :func:`quality_warnings` flags a warp whose Jacobian determinant is <= 0 in more than this % of the fixed grid
#: (regcli's defaults fold in 0.01 % of a brain pair and 0.02-0.2 % of the CT pairs of docs/benchmarks.md; the
#: failed prostate MR-US registrations there fold in 1.1-1.6 %, a registration of noise in 5 %)
QC_FOLDING_PCT = 1.0
#: ... an affine stage that changes volume by more than this factor (either way; det A outside [1/f, f])
QC_AFFINE_VOLUME_FACTOR = 2.0
#: ... and a registration that lowers the mean Dice of the given label maps by more than this
QC_DICE_DROP = 0.01


def quality_warnings(metrics: dict) -> list[str]:
    """Warn (logged, so listed in report.json's ``warnings``) about a result that is likely wrong although the run
    succeeded: a warp that folds in more than :data:`QC_FOLDING_PCT` % of the fixed grid, an affine stage that
    changes volume by more than :data:`QC_AFFINE_VOLUME_FACTOR` times, or a mean Dice of the given label maps
    that ends more than :data:`QC_DICE_DROP` below where it started. Such results mean inputs that do not match
    (another anatomy, a failed skull strip, a modality the method cannot match, noise) or a method unsuited to
    them; the files are still written, as ANTs writes them. Returns the messages."""
    out = []
    folding = (metrics.get("jacobian") or {}).get("pct_nonpos_jac")
    if folding is not None and folding > QC_FOLDING_PCT:
        out.append(f"quality: the warp folds (det J <= 0) in {folding:.2f} % of the fixed grid (more than "
                   f"{QC_FOLDING_PCT:g} %); the result is likely wrong there: check that the images match, or "
                   "raise the regularisation")
    det = metrics.get("affine_det")
    f = QC_AFFINE_VOLUME_FACTOR
    if det is not None and not 1.0 / f <= det <= f:
        out.append(f"quality: the affine stage changes volume by {det:.3g} times (outside {1 / f:g} to {f:g}); "
                   "check the images cover the same anatomy, or the affine initialisation (--affine-init)")
    before, after = metrics.get("dice_initial_mean"), metrics.get("dice_mean")
    if before is not None and after is not None and after < before - QC_DICE_DROP:
        out.append(f"quality: the registration lowered the mean Dice of the label maps from {before:.3f} to "
                   f"{after:.3f}")
    for message in out:
        log.warning("%s", message)
    return out


def preflight_memory(inputs: RegisterInputs, config: RegisterConfig, device: torch.device = torch.device("cpu")):
    """The pre-flight memory estimate (:mod:`regcli.memory`) from the two headers, logged; a ResourceError when
    it is above ``config.max_memory_mb``, before anything is read."""
    from regcli.io.images import read_grid
    from regcli.memory import check_memory, estimate_peak_memory

    estimate = estimate_peak_memory(read_grid(inputs.fixed, "fixed image"), read_grid(inputs.moving, "moving image"),
                                    config, device.type)
    (log.info if config.max_memory_mb is not None else log.debug)("memory estimate: %s", estimate.describe())
    check_memory(estimate, config.max_memory_mb, config, str(inputs.fixed))
    return estimate


def prompt_name(kind: str, flags: Collection[str] = ()) -> str:
    """What the user wrote to ask for the ``kind`` prompt ("labels" or "landmarks"): ``regcli register``'s flag
    (``--prompt-labels``) when ``kind`` is in ``flags``, else the configuration key (``prompts.labels``), as in a
    ``--config`` file (the only way ``regcli evaluate`` and ``regcli batch`` take prompts)."""
    return f"--prompt-{kind}" if kind in flags else f"prompts.{kind}"


def check_prompts(config: RegisterConfig, fixed_labels, moving_labels, landmarks, flags: Collection[str] = (),
                  label_values=None):
    """Refuse prompts that lack their inputs, or that nothing in ``config`` would use (one-line errors): prompts join
    the objective of the solver stages only (:func:`regcli.config.solver_stages`, as the masks), so a linear
    method, a network method without ``io: field`` instance optimisation, ConvexAdam with its instance
    optimisation and refinement off, SAMConvex or DIO with 0 iterations in every solver stage would ignore them,
    unless ``--fine-spacing`` adds its fine refinement. A prompt of weight 0 (``prompts.label_weight`` or
    ``landmark_weight``) would have no effect either. Label prompt ids absent from a map are refused here, before
    any registration work.

    Args:
        flags: the prompt kinds (:data:`PROMPT_KINDS`) that ``regcli register``'s flags gave; messages name them
            by their flag and the others by their configuration key (:func:`prompt_name`).
        label_values: the values present in the two label maps when already counted
            (:data:`regcli.solvers.prompts.LabelValues`).

    Returns:
        With label prompts, the label maps' values (``label_values``, or counted here), for staging them without
        counting again; else None.
    """
    from regcli.errors import InputError

    check_prompt_config(config, flags)
    pc = config.prompts
    if pc.labels is not None and (fixed_labels is None or moving_labels is None):
        raise InputError(f"{prompt_name('labels', flags)} needs both --fixed-labels and --moving-labels")
    if pc.landmarks and landmarks is None:
        raise InputError(f"{prompt_name('landmarks', flags)} needs both --fixed-landmarks and --moving-landmarks")
    if pc.labels is None:
        return None
    # the ids, now rather than after the affine stage
    from regcli.solvers.prompts import check_label_prompt, label_map_values

    if label_values is None:
        label_values = label_map_values(fixed_labels, moving_labels)
    check_label_prompt(fixed_labels, moving_labels, None if pc.labels == "all" else list(pc.labels), label_values)
    return label_values


def check_prompt_config(config: RegisterConfig, flags: Collection[str] = ()) -> None:
    """The part of :func:`check_prompts` that ``config`` alone decides (also checked once by ``regcli evaluate``
    and ``regcli batch`` before any pair is registered): a ConfigError for a prompt of weight 0, or for prompts
    that no solver stage of ``config`` would use (a linear method, none of its solver stages running). The message
    names each prompt as the user gave it (``flags``: see :func:`check_prompts`)."""
    from regcli.config import solver_stages
    from regcli.errors import ConfigError

    pc = config.prompts
    if pc.labels is None and not pc.landmarks:
        return
    given = [(prompt_name(kind, flags), key, weight) for kind, key, on, weight in (
        ("labels", "label_weight", pc.labels is not None, pc.label_weight),
        ("landmarks", "landmark_weight", pc.landmarks, pc.landmark_weight)) if on]
    names = " and ".join(name for name, _, _ in given)
    zero = [f"{name} with prompts.{key} 0" for name, key, weight in given if weight == 0]
    if zero:
        raise ConfigError(f"prompts ({'; '.join(zero)}): a prompt of weight 0 would have no effect; give it a "
                          "weight > 0 or leave it out")
    if not config.deformable:
        raise ConfigError(f"prompts ({names}) need a deformable method: {config.method_origin} has only the affine "
                          f"stage, so nothing would use them")
    stages = solver_stages(config)
    if not stages.running:
        raise ConfigError(f"prompts ({names}) join the objective of {stages.stages}; {stages.setting} runs none of "
                          f"them, so nothing would use them")


def check_masks(config: RegisterConfig, fixed_mask, moving_mask) -> None:
    """Refuse or flag masks that the registration would not use. When the deformable stage reads none of them
    (:func:`_masks_unread`: e.g. a network method without ``io: field`` instance optimisation, ConvexAdam with
    its instance optimisation off, SAMConvex with only its correlation pyramid), the masks weight only the affine
    stage (a warning says so); without the affine stage nothing reads them (also a linear method with
    ``affine.enabled: false``): a ConfigError, as for flags nothing would use."""
    given = [flag for flag, m in (("--fixed-mask", fixed_mask), ("--moving-mask", moving_mask)) if m is not None]
    unread = refuse_unread_masks(config, given)
    if unread is not None and config.deformable:
        how, why, _ = unread
        log.warning("%s: no effect on the deformable stage of %s (%s); only the affine stage uses %s",
                    " and ".join(given), how, why, "it" if len(given) == 1 else "them")


def refuse_unread_masks(config: RegisterConfig, given: list[str]) -> Optional[tuple[str, str, str]]:
    """The part of :func:`check_masks` that ``config`` alone decides (also checked once by ``regcli evaluate`` and
    ``regcli batch`` before any pair is registered, ``given`` then naming CSV columns): a ConfigError when masks
    are given (``given``: the flags or columns that carry them, empty for none) and nothing in ``config`` would read
    them. Otherwise :func:`_masks_unread`'s answer (None when the deformable stage reads them)."""
    from regcli.errors import ConfigError

    unread = _masks_unread(config) if given else None
    if unread is None:
        return None
    how, why, readers = unread
    if not config.affine.enabled:
        what, it = " and ".join(given), "it" if len(given) == 1 else "them"
        raise ConfigError(f"{what}: nothing in {how} without the affine stage would use {it} ({why}; {readers})")
    return unread


def _masks_unread(config: RegisterConfig) -> Optional[tuple[str, str, str]]:
    """None when the deformable stage of ``config`` reads the masks; else the configuration in words, why it
    reads none, and what would.

    The stages that read masks are the solver stages (:func:`regcli.config.solver_stages`, which also decides
    where the prompts go): ConvexAdam's instance optimisation and refinement (its discrete stage takes none),
    SAMConvex's feature-space instance optimisation and refinement (its correlation pyramid takes none), the DIO
    solver (a level of 0 iterations reads nothing), a network method's ``io: field`` instance optimisation (the
    network takes none), and the fine refinement (``--fine-spacing``) of every deformable method. A linear method
    has only the affine stage."""
    from regcli.config import solver_stages

    stages = solver_stages(config)
    if stages.running:
        return None
    if not config.deformable:
        return stages.setting, "a linear method", "masks weight the affine stage"
    why = {"convexadam": "its discrete stage takes no mask", "samconvex": "its correlation pyramid takes no mask",
           "dio": "no solver level iterates"}.get(config.method, "the network takes no mask")
    return stages.setting, why, f"masks weight the affine stage, {stages.stages}"


def check_variance(image: Image, mask: Optional[Image], role: str) -> None:
    """Refuse, before any optimisation, an image that is constant where it is used (E3): everywhere, or inside
    its mask (e.g. all zero there). ``role`` is "fixed" or "moving"; the mask may be on another grid.

    Raises:
        InputError: zero intensity variance (in the mask when one is given).
        GeometryError: the mask has no voxel inside the image.
    """
    from regcli.errors import InputError

    data, where = image.data, ""
    if mask is not None:
        on = _mask_on(mask, image.grid, f"{role} mask")
        if on.data.shape != data.shape[-3:]:
            return  # not a scalar mask of this image: the stages report it
        data = data[..., on.data > 0]
        mask_name = f" '{mask.name}'" if mask.name else ""
        if data.numel() == 0:
            raise GeometryError(f"{role} mask{mask_name} has 0 voxels inside the {role} image")
        where = f" inside the {role} mask{mask_name}"
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        name = f" '{image.name}'" if image.name else ""
        every = "every voxel there" if where else "every voxel"
        raise InputError(f"{role} image{name} has zero intensity variance{where} ({every} is {lo:g}); "
                         "nothing to register")


def _mask_on(mask: Image, grid: Grid, role: str) -> Image:
    """Masks may be on another grid than their image: resample (nearest) in world space. Headers that differ by
    float rounding (within 1e-4 x spacing, :meth:`Grid.allclose`) count as the same grid (G8)."""
    if mask.grid.allclose(grid):
        if mask.grid != grid:
            diff = max(float(np.abs(np.subtract(mask.grid.origin, grid.origin)).max()),
                       float(np.abs(np.subtract(mask.grid.spacing, grid.spacing)).max()))
            log.debug("%s '%s': header differs from its image's by up to %.3g mm (within 1e-4 x spacing): "
                      "using the image's grid", role, mask.name, diff)
        return Image(mask.data, grid, mask.name, mask.meta)
    out = resample_to_grid(mask, grid, "nearest")
    if not bool(out.data.any()):
        image = role.replace("mask", "image")
        raise GeometryError(f"{role} '{mask.name}' does not overlap the {image}: the mask has 0 voxels inside "
                            f"the {image}")
    return out


def check_label_inputs(fixed_labels: Optional[Image], moving_labels: Optional[Image], fixed_grid: Grid,
                       moving_grid: Grid, where: str = "", refuse_disjoint: bool = False):
    """Refuse label maps that cannot be scored (no label at all, or none inside their image) before any work,
    and warn when Dice/HD95 will be missing (one side only, or no label in common). Returns the values present in
    the two maps when both are given (:data:`regcli.solvers.prompts.LabelValues`: counted once here, for the
    prompts and the scores), else None. Shared by ``register`` and ``evaluate`` (:func:`regcli.evaluation.score_pair`):
    ``where`` prefixes the warnings (``"pair 'p1'"``); ``refuse_disjoint`` refuses maps with no label in common
    (an InputError with the same words) instead of warning."""
    from regcli.errors import InputError
    from regcli.reports.metrics import label_values

    at = f"{where}: " if where else ""

    for labels, grid, role in ((fixed_labels, fixed_grid, "fixed"), (moving_labels, moving_grid, "moving")):
        if labels is None:
            continue
        if not bool(labels.data.any()):
            raise InputError(f"{role} labels '{labels.name}' hold no label (every voxel is 0)")
        if not labels.grid.allclose(grid) and not bool(resample_to_grid(labels, grid, "nearest").data.any()):
            raise GeometryError(f"{role} labels '{labels.name}' do not overlap the {role} image: 0 labelled voxels "
                                f"inside it")
    if (fixed_labels is None) != (moving_labels is None):
        given, missing = ("fixed", "moving") if moving_labels is None else ("moving", "fixed")
        use = (" (they only restrict the Jacobian statistics, `jacobian.in_mask`, when no --fixed-mask is given)"
               if given == "fixed" else "")
        log.warning("%s--%s-labels without --%s-labels: no Dice or HD95%s", at, given, missing, use)
    elif fixed_labels is not None:
        values = label_values(fixed_labels), label_values(moving_labels)
        fixed_ids, moving_ids = values[0] - {0}, values[1] - {0}
        common = fixed_ids & moving_ids
        if not common:
            message = (f"the fixed labels '{fixed_labels.name}' and moving labels '{moving_labels.name}' share no "
                       f"label value: no Dice or HD95")
            if refuse_disjoint:
                raise InputError(at + message)
            log.warning("%s%s", at, message)
        elif fixed_ids != moving_ids:
            def listed(ids: set) -> str:
                return ", ".join(map(str, sorted(ids)[:8])) + (", ..." if len(ids) > 8 else "") if ids else "none"

            log.warning("%sDice is over the %d labels both maps hold, HD95 over those of them that the warped labels "
                        "still hold; only in the fixed labels: %s; only in the moving labels: %s", at, len(common),
                        listed(fixed_ids - moving_ids), listed(moving_ids - fixed_ids))
        return values
    return None


def _read_landmarks(inputs: RegisterInputs):
    if inputs.fixed_landmarks is None and inputs.moving_landmarks is None:
        return None
    from regcli.errors import InputError
    from regcli.reports.landmarks import read_points_csv

    if inputs.fixed_landmarks is None or inputs.moving_landmarks is None:
        raise InputError("TRE needs both --fixed-landmarks and --moving-landmarks")
    fx = read_points_csv(inputs.fixed_landmarks, role="fixed landmarks")
    mv = read_points_csv(inputs.moving_landmarks, role="moving landmarks")
    if len(fx.points) != len(mv.points):
        raise InputError(
            f"landmark files have different numbers of points: '{inputs.fixed_landmarks}' has "
            f"{len(fx.points)}, '{inputs.moving_landmarks}' has {len(mv.points)}"
        )
    return fx, mv


def _metrics(fixed, reg: Registration, fixed_labels, moving_labels, warped_labels, landmarks, transform,
             label_values=None, fixed_mask=None):
    """Dice/HD95 (labels; ``warped_labels`` = moving labels on the fixed grid), Jacobian stats (deformable; in the
    fixed mask, else in the fixed labels, :func:`~regcli.reports.jacobian.jacobian_region`), TRE (landmarks),
    inverse consistency. ``label_values``: the values present in the two label maps, when already counted
    (:func:`check_label_inputs`)."""
    from regcli.reports import metrics as M
    from regcli.reports.jacobian import jacobian_determinant, jacobian_region, jacobian_stats

    out: dict = {}
    if warped_labels is not None:
        same = fixed_labels.grid.allclose(fixed.grid)
        fl = fixed_labels if same else resample_to_grid(fixed_labels, fixed.grid, "nearest")
        # labels present in both maps (as `regcli evaluate` scores them): one lost by warping counts as 0
        if same and label_values is not None:
            labels = M.common_labels(*label_values)
        else:  # a fixed map resampled onto the fixed grid may have lost a label
            labels = M.shared_labels(fl, moving_labels)
        dice = M.dice_per_label(fl, warped_labels, labels)
        hd = M.hd95_per_label(fl, warped_labels, labels)
        initial = M.dice_per_label(fl, warp(moving_labels, None, fixed.grid, "nearest"), labels)
        out["dice_per_label"] = dice
        out["dice_mean"] = M.nanmean(dice.values())
        out["dice_initial_mean"] = M.nanmean(initial.values())
        out["hd95_per_label"] = hd
        out["hd95_mean"], out["hd95_labels_lost"] = M.surface_mean(hd)  # over labels in both maps, as medpy
        M.labels_lost_warning(out["hd95_labels_lost"], len(labels))
    detj = None
    if reg.field is not None:
        detj = jacobian_determinant(reg.field) * float(np.linalg.det(reg.affine.linear))
        out["jacobian"] = jacobian_stats(detj, *jacobian_region(fixed.grid, fixed_mask, fixed_labels))
        out["pct_nonpos_jac"] = out["jacobian"]["pct_nonpos_jac"]
        out["sdlogj"] = out["jacobian"]["sdlogj"]
        if reg.inverse_error is not None:
            # of the written Warp and InverseWarp (on the fixed grid, or the moving one): what a user composing the
            # files gets; the solver's own residual, on the grid it iterated on, is kept under "solver"
            from regcli.transforms.inverse import written_inverse_consistency

            solver = dict(reg.inverse_error)
            written = written_inverse_consistency(reg.field, reg.inverse_field) if reg.inverse_field is not None else {}
            out["inverse_consistency_mm"] = {**written, **({"source": solver["source"]} if "source" in solver else {}),
                                             "solver": solver}
    out["affine_det"] = float(np.linalg.det(reg.affine.linear))
    if landmarks is not None:
        from regcli.reports.landmarks import tre

        fx, mv = landmarks
        out["tre"] = tre(fx, mv, transform)
    return out, detj


def prompted_dice(dice_per_label: dict, prompted) -> dict:
    """Dice of the prompted labels and of the others, apart: a prompt's gain must not cost the rest."""
    from regcli.reports.metrics import nanmean

    ids = set(int(k) for k in dice_per_label) if prompted == "all" else set(int(k) for k in prompted)
    on = [v for k, v in dice_per_label.items() if int(k) in ids]
    off = [v for k, v in dice_per_label.items() if int(k) not in ids]
    return {"prompted_labels": sorted(ids & set(int(k) for k in dice_per_label)),
            "dice_prompted_mean": nanmean(on), "dice_unprompted_mean": nanmean(off)}


def html_figure_paths(html_path: Path) -> list[Path]:
    """Every figure the HTML report ``html_path`` may write beside it (``<prefix>Report_checkerboard.png``, ...)."""
    from regcli.reports.html import figure_file_names

    return [html_path.parent / n for n in figure_file_names(html_path.name[: -len(".html")])]


def _stage_html(outs: OutputSet, html_path: Path, inputs, fixed, moving, warped, fixed_labels, warped_labels,
                detj, reg: Registration, metrics: dict, report: dict) -> list[str]:
    from regcli.reports.html import render_html_report

    base = html_path.name[: -len(".html")]
    html, pngs = render_html_report(
        fixed,
        png_base=base,
        moving=moving,
        warped=warped,
        fixed_labels=fixed_labels,
        warped_labels=warped_labels,
        jacobian=None if detj is None else Image(detj, fixed.grid),
        history=reg.history,
        metrics=metrics,
        report=report,
        title=f"regcli: {Path(inputs.moving).name} -> {Path(inputs.fixed).name}",
    )
    names = []
    for name, data in pngs.items():
        target = html_path.parent / name
        if target.exists() and not outs.overwrite:
            from regcli.errors import OutputError

            raise OutputError(f"output '{target}' exists; pass --overwrite to replace it")
        outs.stage(target, lambda tmp, data=data: tmp.write_bytes(data))
        names.append(str(target))
    outs.stage(html_path, lambda tmp: tmp.write_text(html))
    return names


def _extra(reg: Registration, runtime: Runtime) -> dict:
    extra = {
        "runtime": runtime.describe(),
        "affine_matrix": reg.affine.matrix.tolist(),
        "stage_details": {k: v for k, v in reg.timings.items() if "/" in k},
    }
    if reg.working_grid is not None:
        extra["working_grid"] = _grid_info(reg.working_grid)
    if reg.models:
        extra["models"] = reg.models
    if reg.method_report:
        extra["method"] = reg.method_report
    return extra


def _grid_info(g: Grid) -> dict:
    d = g.to_dict()
    d["axcodes"] = g.axcodes()
    return d
