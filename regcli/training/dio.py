"""Implicit (Jacobian-free) training of the DIO feature network: ``regcli train dio --config job.yaml``.

One training step, for a pair of label-annotated volumes (both affinely aligned to the job's template once, on
its working grid):

1. Optional synthetic contrast per image (a random intensity per label, noise and blur, as SynthMorph/SynthSeg
   render label maps) so that the features learn anatomy, not one contrast; then the same random crop of both.
2. The network maps each image to its feature images (levels of ``solver.dio.levels``), with the graph kept.
3. The solver (:func:`regcli.methods.dio.solve`) registers *detached* features to convergence, coarse to fine,
   exactly as at test time; none of its iterations is recorded.
4. At every level, one solver step at the optimum is taken again with the features' graph
   (:func:`regcli.methods.dio.jfb_step`): the gradient of the training loss reaches the network through that one
   step only (Jacobian-free backpropagation), so memory does not depend on the number of solver iterations.
5. Loss per level: ``1 - soft Dice`` of the moving label maps warped by that step against the fixed ones
   (:class:`regcli.solvers.prompts.LabelPrompt`), plus ``image_weight * (-LNCC)`` of the images; the levels'
   losses are averaged. Adam on the network; with ``train.sam_rho > 0`` sharpness-aware (:mod:`regcli.training.sam`):
   the loss and gradient are taken again, for the same pair and crop, at weights moved by ``sam_rho`` uphill.

The output folder gets ``checkpoint.pt`` (network, optimizer, step and random state, CPU tensors: ``--resume``
continues bit for bit, or on another device), ``history.json`` (loss and Dice per step) and ``job.json``; at the end
``model/`` is a Hub-layout model folder with a model card. With ``--device cuda`` the network, the solver and the
losses run on the GPU; pairs are drawn, rendered and cropped on the CPU (the same random draws as a CPU run).
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, Sequence

import torch
from pydantic import Field, StrictInt, field_validator

from regcli.config import ConfigModel
from regcli.errors import ConfigError, ConvergenceError, InputError
from regcli.manifest import Dataset
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.training.distributed import SINGLE, Distributed


_Voxels = Annotated[StrictInt, Field(ge=1)]
_Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class DioTrainConfig(ConfigModel):
    """Training recipe (stored in the trained model's ``config.json`` under ``"training"``)."""

    iterations: StrictInt = Field(500, ge=1, description="training steps (batch_size pairs each)")
    learning_rate: float = Field(1e-3, gt=0)
    crop: tuple[_Voxels, _Voxels, _Voxels] = Field((64, 64, 64), description="crop of the working grid per step "
                                                   "(Z, Y, X voxels; clipped to the volume; each larger than the "
                                                   "coarsest solver level)")
    synth_prob: float = Field(0.5, ge=0, le=1, description="probability of a synthetic contrast per image")
    image_weight: float = Field(0.1, ge=0, description="weight of -LNCC of the images at each level")
    lncc_radius_mm: float = Field(6.0, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    sam_rho: float = Field(0.0, ge=0, description="sharpness-aware minimization: radius of the weight perturbation "
                           "(regcli.training.sam; two forward/backward passes per step); 0: plain Adam")
    jfb_step: float = Field(1.0, gt=0, le=1, description="the differentiated solver step's size as a fraction of "
                            "the level's learning rate (small: the loss is taken near the optimum)")
    level_weights: Optional[tuple[_Weight, ...]] = Field(
        None, description="weight of each solver level's loss, coarse to fine (None: the plain average; e.g. "
        "[0, 0, 1]: the finest level only, whose field is the result); a level of weight 0 is not differentiated")
    batch_size: StrictInt = Field(1, ge=1, description="pairs per step (per process under torchrun)")
    seed: StrictInt = 0


class DioJob(ConfigModel):
    """What ``regcli train dio`` runs: data, network, training recipe, and the solver used while training
    (``solver``: a :class:`regcli.config.RegisterConfig` override, usually ``dio`` and ``instance``)."""

    data: list[Dataset] = Field(min_length=1, description="datasets with image globs and label maps "
                                "(regcli.manifest.Dataset, inline or a manifest file); a pair's two images come "
                                "from one dataset drawn by weight when the weights differ")
    net: dict = Field(default_factory=dict, description="regcli.models.dio.DioNetConfig fields")
    train: DioTrainConfig = DioTrainConfig()
    solver: dict = Field(default_factory=dict, description="RegisterConfig overrides for the training solver "
                         "(usually dio and instance)")
    checkpoint_every: StrictInt = Field(25, ge=1)
    init: Optional[str] = Field(None, description="start from these weights (any regcli weights spec)")
    validation: Optional["DioValidation"] = Field(
        None, description="whole-volume validation on held-out labelled pairs during training")

    @field_validator("data")
    @classmethod
    def _globs(cls, v: list[Dataset]) -> list[Dataset]:
        from regcli.training.jobs import needs_globs

        return needs_globs(v, "DIO")


class DioValidation(ConfigModel):
    """Held-out labelled images registered whole, with the test-time solver, every ``every`` steps.

    Pairs are consecutive images of ``data`` (1<-2, 3<-4, ...), each aligned to the training template like the
    training images. The score is the hard Dice (labels of the fixed image, mean over labels) on the working
    grid: what ``regcli evaluate`` measures, at the working grid's resolution. The model written to ``model/``
    is the best-scoring checkpoint with ``select: best`` (the untrained start, step 0, included)."""

    data: list[Dataset] = Field(min_length=1)
    every: StrictInt = Field(50, ge=1, description="validate after every this many steps (and at steps 0 and the "
                             "last)")
    solver: dict = Field(default_factory=dict, description="RegisterConfig overrides for the validation solver "
                         "(default: regcli register --method dio's defaults, with the training solver's "
                         "instance.transform and optimizer)")
    select: Literal["best", "last"] = Field("best", description="which checkpoint model/ holds")
    contrasts: tuple[Literal["real", "moving", "both"], ...] = Field(
        ("real",), min_length=1, description="each pair is scored once per entry: the images as they are (real), "
        "the moving image rendered from its label map with a random intensity per label (moving), or both images "
        "so rendered (both); the same renderings at every validation; the score is the mean over all")


DioJob.model_rebuild()


def load_dio_job(path: str | Path, overrides: Optional[dict] = None) -> DioJob:
    from regcli.training.jobs import load_job_file

    def check(job: DioJob) -> None:
        levels = register_config(job, f"training job '{path}', solver").dio.levels
        net_config(job)
        if job.validation is not None:
            validation_config(job, f"training job '{path}', solver and validation.solver")
        bad = _level_problem(job.train, levels)
        if bad:
            raise ConfigError(f"invalid training job '{path}': {bad}")

    return load_job_file(path, overrides, DioJob, check)


def _level_problem(tcfg: DioTrainConfig, levels: Sequence[int]) -> Optional[str]:
    """What is wrong with the recipe's ``crop`` and ``level_weights`` for the solver's ``levels`` (None: nothing)."""
    weights = tcfg.level_weights
    if weights is not None and (len(weights) != len(levels) or sum(weights) <= 0):
        return (f"train.level_weights {list(weights)} must give one weight per solver level ({len(levels)}: "
                f"{list(levels)}) with a positive sum")
    if min(tcfg.crop) <= max(levels):
        return (f"train.crop {list(tcfg.crop)} must be larger than the coarsest solver level ({max(levels)}) in every "
                f"direction: at least 2 voxels there")
    return None


def register_config(job: DioJob, source: Optional[str] = None):
    """The :class:`regcli.config.RegisterConfig` of the training solver (method dio, the job's ``solver``
    section, read as a ``regcli register --config`` file is: an explicit null is a value, not a flag left out);
    ``source`` names it in a ConfigError (:func:`regcli.config.build_config`)."""
    from regcli.config import build_config

    return build_config(data={"method": "dio", **job.solver}, source=source)


def validation_config(job: DioJob, source: Optional[str] = None):
    """The :class:`regcli.config.RegisterConfig` of the validation solver: test-time defaults, the training
    solver's transform model and optimizer, then ``validation.solver`` (read as a file, as for register_config;
    ``source``: as there)."""
    from regcli.config import build_config, deep_merge

    inst = job.solver.get("instance")
    inst = inst if isinstance(inst, dict) else {}  # anything else: register_config names it
    base = {"method": "dio", "instance": {k: inst[k] for k in ("transform", "optimizer") if k in inst}}
    return build_config(data=deep_merge(base, job.validation.solver if job.validation else {}), source=source)


def net_config(job: DioJob):
    from regcli.models.dio import DioNetConfig

    return DioNetConfig.model_validate(job.net)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Subject:
    image: torch.Tensor  # (Z, Y, X) float32, normalised intensities, on the template's working grid
    labels: torch.Tensor  # (Z, Y, X) int64 label ids on the same grid
    name: str


def label_file(image_path: str, replace: tuple[str, str]) -> str:
    if replace[0] not in os.path.basename(image_path):
        raise InputError(f"training image '{image_path}': its name has no '{replace[0]}' to replace to find its "
                         "label map (data[].labels_replace)")
    head, tail = os.path.split(image_path)
    return os.path.join(head, tail.replace(replace[0], replace[1]))


def labelled_files(sources: Sequence[Dataset]) -> list[tuple[str, str]]:
    """(image, label map) paths of every dataset's glob (``labels_replace`` finds a label map), each glob sorted;
    an empty glob is an InputError."""
    files = []
    for src in sources:
        found = sorted(glob.glob(src.glob))
        if not found:
            raise InputError(f"training data glob '{src.glob}' matches no file")
        files += [(f, label_file(f, src.labels_replace)) for f in found]
    return files


def prepare_subjects(files: Sequence[tuple[str, str]], spacing_mm: float, percentiles,
                     log: Callable[[str], None] = lambda s: None,
                     progress: Optional[Callable[[int, int], None]] = None) -> tuple[list[Subject], Grid]:
    """Read every (image, label map) of ``files``, align each to the first image, the template (regcli's affine
    stage), and resample both onto the template's grid at ``spacing_mm`` (image: anti-aliased linear, then
    normalised as the network's input; labels: nearest). Returns the subjects and the template grid."""
    from regcli.config import AffineConfig
    from regcli.io.images import read_image, read_labels
    from regcli.models.embedding import normalise_intensity
    from regcli.features.intensity import smooth_for
    from regcli.resample import resample_to_grid, warp
    from regcli.solvers.affine import run_affine_stage

    template = read_image(files[0][0], "training image")
    work = template.grid.with_spacing(spacing_mm)
    subjects = []
    for k, (fi, fl) in enumerate(files):
        img = template if k == 0 else read_image(fi, "training image")
        lab = read_labels(fl, "training labels")
        try:
            affine = None if k == 0 else run_affine_stage(template, img, AffineConfig()).transform
        except ConvergenceError as e:
            raise ConvergenceError(f"aligning training image '{fi}' to the first one, '{files[0][0]}': {e} (leave "
                                   f"the image out)") from None
        smooth = smooth_for(img, spacing_mm)
        if affine is None:
            im_w = resample_to_grid(smooth, work)
            lb_w = resample_to_grid(lab, work, "nearest")
        else:
            im_w = warp(smooth, affine, work)
            lb_w = warp(lab, affine, work, "nearest")
        subjects.append(Subject(normalise_intensity(im_w.data, percentiles), lb_w.data.to(torch.int64),
                                os.path.basename(fi)))
        log(f"prepared {os.path.basename(fi)}")
        if progress is not None:
            progress(k + 1, len(files))
    return subjects, work


def validate(net, subjects: Sequence[Subject], work: Grid, cfg, contrasts: Sequence[str] = ("real",),
             seed: int = 0, device=None) -> dict:
    """Whole-volume hard Dice of consecutive pairs of ``subjects`` (1<-2, 3<-4, ...) registered with the
    features of ``net`` and the solver of ``cfg``, on the working grid ``work``, once per entry of ``contrasts``
    (:class:`DioValidation`; synthetic renderings seeded by ``seed``, the contrast and the pair, so every call
    sees the same images). Returns ``{"dice": mean over pairs and contrasts, "pairs": [per pair, contrast by
    contrast], "contrasts": {contrast: mean}}``; each pair's score is the mean over the fixed image's labels.
    Features and solver run on ``device`` (default: the network's); renderings and Dice on the CPU."""
    from regcli.methods.dio import level_features, solve
    from regcli.reports.metrics import dice_mean
    from regcli.resample import FieldWarper, upsample_field

    device = torch.device(device) if device is not None else next(net.parameters()).device
    warper = FieldWarper(work, work, device)
    scores, by_contrast = [], {}
    for c, contrast in enumerate(contrasts):
        mine = []
        for k, (a, b) in enumerate(zip(subjects[0::2], subjects[1::2])):
            gen = torch.Generator().manual_seed(seed + 1000 * c + k)
            fixed = synth_contrast(a.labels, gen) if contrast == "both" else a.image
            moving = synth_contrast(b.labels, gen) if contrast in ("moving", "both") else b.image
            levels = solve(level_features(Image(fixed.to(device), work), cfg, net=net),
                           level_features(Image(moving.to(device), work), cfg, net=net), cfg)
            last = levels[-1]
            with torch.no_grad():
                u = last.disp if last.grid.allclose(work) else upsample_field(last.disp, last.grid, work)
                warped = warper.warp(b.labels[None, None].to(device, torch.float32), u,
                                     "nearest")[0, 0].to(torch.int64).cpu()
            fixed_ids = [int(v) for v in torch.unique(a.labels) if v != 0]
            mine.append(dice_mean(a.labels.numpy(), warped.numpy(), fixed_ids))
        by_contrast[contrast] = sum(mine) / len(mine)
        scores += mine
    return {"dice": sum(scores) / len(scores), "pairs": scores, "contrasts": by_contrast}


# ------------------------------------------------------------------------------------------------ augmentation
def synth_contrast(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A new image of a (Z, Y, X) label map: one uniform random intensity in [0, 1] per label (background 0),
    Gaussian noise (std up to 0.05) and a light blur (sigma 0.5 voxel), as SynthMorph renders label maps."""
    from regcli.features.intensity import gaussian_smooth

    ids = torch.unique(labels)
    lut = torch.zeros(int(ids.max()) + 1)
    lut[ids] = torch.rand(len(ids), generator=gen)
    lut[0] = 0.0
    img = lut[labels]
    sigma = float(torch.rand((), generator=gen)) * 0.05
    img = img + sigma * torch.randn(img.shape, generator=gen)
    img = gaussian_smooth(img, [0.5, 0.5, 0.5])
    return img.to(torch.float32)


def crop_box(shape, crop, gen: torch.Generator) -> tuple[slice, slice, slice]:
    out = []
    for n, c in zip(shape, crop):
        c = min(n, c)
        start = int(torch.randint(0, n - c + 1, (), generator=gen))
        out.append(slice(start, start + c))
    return tuple(out)


def crop_grid(grid: Grid, box) -> Grid:
    """The grid of ``data[box]`` for (Z, Y, X) data on ``grid``."""
    z, y, x = box
    return grid.cropped((x.start, y.start, z.start), (x.stop - x.start, y.stop - y.start, z.stop - z.start))


# ------------------------------------------------------------------------------------------------ training
def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, grid: Grid, radius_mm: float) -> torch.Tensor:
    from regcli.similarity import make_similarity

    return make_similarity("lncc", radius_mm=radius_mm, spacing=grid.spacing)(fixed, warped)


def train_step(net, fixed: Image, moving: Image, fixed_labels: Image, moving_labels: Image, cfg, tcfg: DioTrainConfig
               ) -> tuple[torch.Tensor, dict]:
    """Loss of one pair (see the module docstring) with the graph to ``net``; and its parts as floats."""
    from regcli.methods.dio import jfb_step, level_features, solve
    from regcli.resample import FieldWarper
    from regcli.solvers.prompts import LabelPrompt

    ff = level_features(fixed, cfg, net=net, grad=True)
    fm = level_features(moving, cfg, net=net, grad=True)
    dfix = {lv: Image(im.data.detach(), im.grid) for lv, im in ff.items()}
    dmov = {lv: Image(im.data.detach(), im.grid) for lv, im in fm.items()}
    levels = solve(dfix, dmov, cfg)
    dice = LabelPrompt(fixed_labels, moving_labels, None)
    total = fixed.data.new_zeros(())
    parts: dict = {}
    weights = tcfg.level_weights or (1.0,) * len(levels)
    if len(weights) != len(levels) or sum(weights) <= 0:
        raise ConfigError(f"train.level_weights {list(weights)} must give one weight per solver level "
                          f"({len(levels)}: {[s.level for s in levels]}) with a positive sum")
    for sol, w in zip(levels, weights):
        if w == 0:
            continue
        u1 = jfb_step(sol, ff[sol.level], fm[sol.level], cfg, step_fraction=tcfg.jfb_step)
        d = dice.loss(u1, sol.grid)
        loss = d
        if tcfg.image_weight > 0:
            from regcli.resample import resample_to_grid

            fi = resample_to_grid(fixed, sol.grid).data[None, None] if not fixed.grid.allclose(sol.grid) \
                else fixed.data[None, None]
            wm = FieldWarper(moving.grid, sol.grid, u1.device).warp(moving.data[None, None], u1)
            loss = loss + tcfg.image_weight * lncc_loss(fi, wm, sol.grid, tcfg.lncc_radius_mm)
        total = total + loss * (w / sum(weights))
        parts[f"dice{sol.level}"] = 1.0 - float(d.detach())
    parts["loss"] = float(total.detach())
    return total, parts


def run_dio_job(job: DioJob, outdir: str | Path, progress=None, log: Callable[[str], None] = lambda s: None,
                resume: bool = False, prepare_progress=None, dist: Distributed = SINGLE,
                device: torch.device | str | None = None) -> dict:
    """Train on ``device`` (default the CPU) and write ``outdir/{checkpoint.pt, history.json, job.json, model/}``;
    returns a summary dict.

    Under torchrun (``dist``) each process computes its share of a global batch of ``world * batch_size``
    pairs; rank 0 validates, writes the files and calls ``progress``."""
    from regcli.models.dio import DioFeatureNet
    from regcli.training.jobs import (_job_differences, cpu_tensors, device_segments, note_device_change, open_run,
                                      restore_network, restoring, start_run)
    from regcli.training.sam import SAM

    cfg = register_config(job)
    ncfg = net_config(job)
    out, ck_path, ck = start_run(outdir, resume, job, net_config=ncfg.model_dump(mode="json"),
                                 needs=("state_dict", "optimizer", "generator", "history", "step"))
    tcfg = job.train
    t0 = time.perf_counter()
    init_net = None
    if job.init:  # before any data are read: weights of another network are refused at once
        from regcli.methods.dio import _load

        init_net = _load(job.init)[0]
        if init_net.cfg != ncfg:
            diffs = _job_differences(init_net.cfg.model_dump(mode="json"), ncfg.model_dump(mode="json"))
            raise ConfigError(f"init: model '{job.init}' has another network configuration than the job's "
                              f"({'; '.join(diffs[:4])}); give the job that model's net, or start from scratch")
    files = labelled_files(job.data)
    if len(files) < 2:
        raise InputError("DIO training needs at least two labelled images")
    val_files = labelled_files(job.validation.data) if job.validation is not None else []
    if job.validation is not None and len(val_files) < 2:
        raise InputError("DIO validation needs at least two labelled images (pairs 1<-2, 3<-4, ...)")
    subjects, work = prepare_subjects(files + val_files, ncfg.spacing_mm, ncfg.percentiles, log, prepare_progress)
    subjects, held_out = subjects[:len(files)], subjects[len(files):]
    log(f"{len(subjects)} labelled volumes on a {work.size} grid at {ncfg.spacing_mm} mm"
        + (f"; {len(held_out) // 2} validation pair(s)" if held_out else ""))
    device = torch.device(device or "cpu")
    torch.manual_seed(tcfg.seed)
    net = DioFeatureNet(ncfg)
    if init_net is not None:
        net.load_state_dict(init_net.state_dict())
        log(f"starting from '{job.init}'")
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.learning_rate)
    sam = SAM(opt, tcfg.sam_rho)  # plain Adam when sam_rho is 0
    gen = torch.Generator().manual_seed(tcfg.seed)
    history: list[dict] = []
    validation: list[dict] = []
    best: Optional[dict] = None  # {"step", "dice", "state_dict"} of the best validated network
    start = 0
    if ck is not None:
        restore_network(net, ck, ck_path)
        with restoring(ck_path):
            sam.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            history = list(ck["history"])
            validation = list(ck.get("validation", []))
            best = ck.get("best")
            start = int(ck["step"])
        log(f"resuming at step {start}")
        if ck.get("world", 1) != dist.world:
            log(f"note: the run had {ck.get('world', 1)} process(es) so far and goes on with {dist.world}")
        if ck.get("sam_rho", 0.0) != tcfg.sam_rho:
            log(f"note: the run was trained with sam_rho {ck.get('sam_rho', 0.0)} so far, it goes on with "
                f"{tcfg.sam_rho}")
        note_device_change(ck, device, log)
    devices = device_segments(ck, device, start)
    open_run(out, job, dist)  # after the restore: a refused resume leaves the run's job.json as it was
    prior = history[-1]["seconds"] if history else 0.0
    vcfg = validation_config(job) if job.validation is not None else None

    model = dist.wrap(net)

    def save(step: int) -> None:
        if not dist.main:
            return
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"config": ncfg.model_dump(mode="json"), "state_dict": cpu_tensors(net.state_dict()),
                    "optimizer": cpu_tensors(sam.state_dict()), "generator": gen.get_state(), "history": history,
                    "validation": validation, "best": best, "step": step, "sam_rho": tcfg.sam_rho,
                    "world": dist.world, "device": str(device), "devices": devices}, tmp)
        os.replace(tmp, ck_path)
        (out / "history.json").write_text(json.dumps({"history": history, "validation": validation,
                                                      "device": str(device), "devices": devices}))

    def run_validation(step: int) -> None:  # rank 0 only: it alone selects and writes the model
        nonlocal best
        if vcfg is None or not dist.main or any(v["step"] == step for v in validation):
            return
        tv = time.perf_counter()
        res = validate(net, held_out, work, vcfg, job.validation.contrasts, tcfg.seed, device)
        validation.append({"step": step, **res, "validation_seconds": time.perf_counter() - tv})
        parts = ", ".join(f"{c} {d:.4f}" for c, d in res["contrasts"].items())
        log(f"validation at step {step}: Dice {res['dice']:.4f} ({parts}) over {len(held_out) // 2} held-out pair(s)")
        if best is None or res["dice"] > best["dice"]:
            best = {"step": step, "dice": res["dice"],  # a CPU copy: checkpoints hold CPU tensors
                    "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}}

    run_validation(start)
    n = len(subjects)
    global_batch = tcfg.batch_size * dist.world
    sizes = [len(glob.glob(d.glob)) for d in job.data]
    members = [list(range(sum(sizes[:k]), sum(sizes[:k + 1]))) for k in range(len(sizes))]
    weights = torch.tensor([d.weight if len(m) > 1 else 0.0 for d, m in zip(job.data, members)], dtype=torch.float64)
    by_weight = len(set(d.weight for d in job.data)) > 1  # else: any two images, as always
    for step in range(start, tcfg.iterations):
        ts = time.perf_counter()
        draws = []  # every process draws the whole batch (the same generator), then computes its share
        for _ in range(global_batch):
            if by_weight:  # a dataset by weight, then two of its images
                m = members[int(torch.multinomial(weights, 1, generator=gen))]
                i, j = (m[k] for k in torch.randperm(len(m), generator=gen)[:2].tolist())
            else:
                i, j = torch.randperm(n, generator=gen)[:2].tolist()
            box = crop_box(subjects[i].image.shape, tcfg.crop, gen)
            g = crop_grid(work, box)
            imgs = []
            for k in (i, j):
                s = subjects[k]
                img = (synth_contrast(s.labels, gen) if float(torch.rand((), generator=gen)) < tcfg.synth_prob
                       else s.image)
                # the image goes to the device; the label map stays: LabelPrompt counts its labels on the CPU
                # and moves its one-hot channels itself
                imgs.append((Image(img[box].contiguous().to(device), g), Image(s.labels[box].contiguous(), g)))
            draws.append(([subjects[i].name, subjects[j].name], imgs))
        mine = dist.shard(draws)
        net.train()
        passes: list[dict] = []

        def closure() -> torch.Tensor:  # once, or twice with SAM: the same pairs and crops at the perturbed weights
            opt.zero_grad(set_to_none=True)
            losses, parts = [], []
            for _, imgs in mine:
                loss, p = train_step(model, imgs[0][0], imgs[1][0], imgs[0][1], imgs[1][1], cfg, tcfg)
                losses.append(loss)
                parts.append(p)
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), tcfg.grad_clip)
            passes.append({k: dist.mean(sum(p[k] for p in parts) / len(parts)) for k in parts[0]})
            return loss

        sam.step(closure)
        names = [d[0] for d in draws]
        rec = {"step": step + 1, **({"pair": names[0]} if global_batch == 1 else {"pairs": names}), **passes[0],
               "step_seconds": time.perf_counter() - ts, "seconds": prior + time.perf_counter() - t0}
        if len(passes) > 1:
            rec["sam_loss"] = passes[1]["loss"]  # the loss at the perturbed weights
        history.append(rec)
        if progress is not None and dist.main:
            progress(step + 1, tcfg.iterations, rec)
        if job.validation is not None and ((step + 1) % job.validation.every == 0 or step + 1 == tcfg.iterations):
            run_validation(step + 1)
        if (step + 1) % job.checkpoint_every == 0 or step + 1 == tcfg.iterations:
            save(step + 1)
    last = history[-min(len(history), 50):]
    summary = {"volumes": n, "iterations": len(history), "seconds": round(history[-1]["seconds"], 1) if history else 0,
               "final_loss_mean50": sum(h["loss"] for h in last) / max(1, len(last)), "sam_rho": tcfg.sam_rho,
               "device": str(device), "devices": devices, "outdir": str(out)}
    if validation:
        summary["validation"] = {"pairs": len(held_out) // 2, "contrasts": list(job.validation.contrasts),
                                 "start_dice": validation[0]["dice"],
                                 "last_dice": validation[-1]["dice"], "best_step": best["step"],
                                 "best_dice": best["dice"], "model_step": len(history)}
        if job.validation.select == "best" and best["step"] != len(history):
            net.load_state_dict(best["state_dict"])
            summary["validation"]["model_step"] = best["step"]
            log(f"model/ holds step {best['step']}, the best validated (Dice {best['dice']:.4f})")
    if dist.main:
        write_dio_model(net, job, summary, out / "model")
    dist.barrier()
    return summary


def write_dio_model(net, job: DioJob, summary: dict, folder: Path, version: str = "0") -> Path:
    """The trained network as a Hub-layout model folder, with a model card stating data and recipe."""
    from regcli.models.dio import save_dio_model
    from regcli.training.jobs import devices_text

    data = "\n".join(f"- `{os.path.normpath(src.glob)}` (labels: `{src.labels_replace[0]}` -> "
                     f"`{src.labels_replace[1]}`)" for src in job.data)
    card = (f"# regcli DIO feature network\n\nFeature images for `regcli register --method dio`, trained with "
            f"`regcli train dio` by implicit (Jacobian-free) differentiation through the registration solver, on "
            f"label maps (soft Dice) and images (LNCC).\n\n## Training data\n\n{data}\n\n## Recipe\n\n```json\n"
            f"{job.model_dump_json(indent=2)}\n```\n\n## Run\n\n{summary['iterations']} steps on "
            f"{summary['volumes']} volumes in {summary['seconds']} s, on {devices_text(summary)}; mean loss of the "
            f"last 50 steps {summary['final_loss_mean50']:.3f}.\n")
    val = summary.get("validation")
    if val:
        held = "\n".join(f"- `{os.path.normpath(src.glob)}`" for src in job.validation.data)
        card += (f"\n## Validation\n\nWhole-volume hard Dice on the working grid, {val['pairs']} held-out pair(s) "
                 f"(contrasts: {', '.join(val['contrasts'])}) of\n\n{held}\n\nstart {val['start_dice']:.4f}, best "
                 f"{val['best_dice']:.4f} at step {val['best_step']}, last {val['last_dice']:.4f}; these weights are "
                 f"step {val['model_step']}.\n")
    training = {"job": job.model_dump(mode="json"), "summary": summary}
    return save_dio_model(net, folder, card, training=training, version=version, overwrite=True)
