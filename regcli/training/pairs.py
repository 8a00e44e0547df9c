"""Training a pair-registration network on several datasets: what ``regcli train foundation`` and ``regcli train
promptreg`` share (:func:`train_pair_network`).

1. **Data.** Each dataset (:class:`regcli.manifest.Dataset`) is a glob of images (inter-subject pairs: two
   different images of the dataset) and/or a CSV of image pairs (intra-subject pairs, e.g. two scans of one
   patient), with its modality. Every image is prepared once, up front, as the registration methods see it at
   test time (``align: affine``, the default): :func:`regcli.methods.foundation.prepare_intensities` on the
   original image, regcli's affine stage to the dataset's first image (a pair's moving image: to its fixed
   image), then resampled onto the network grid over that reference's field of view. ``align: none`` keeps every
   image's own field of view. A dataset with one image pairs it with itself (the augmentation makes the two
   views differ).
2. **Sampling.** An epoch holds ``round(weight * batch)`` pairs of every dataset (equal weights: the same number,
   uniGradICON's balance between large and small datasets), in a seeded random order; the two images of a pair
   are swapped half of the time. Each pair carries its dataset's index (the task id of task-prompted networks).
3. **Augmentation.** Each image of a pair gets its own random affine map (rotation up to ``augment.rotation_deg``
   about each axis, scaling up to ``augment.scale``, translation up to ``augment.shift`` of the field of
   view), applied in the network's [0, 1] coordinates, with probability ``augment.prob``.
4. **Objective.** The network's own loss (:class:`PairNetwork`), or with ``train.optron.iters > 0`` Optron's
   (:mod:`regcli.training.optron`): the prediction refined by the shared IO solver is the target of an MSE.
   Adam; with ``train.sam_rho > 0`` sharpness-aware minimization (:mod:`regcli.training.sam`). Under torchrun
   every process draws the global batch and computes its share (:mod:`regcli.training.distributed`).
5. **Validation** (``validation``): held-out labelled pairs (datasets with a pairs CSV that has label columns),
   prepared like the training images; the network's displacement warps the moving labels (nearest) on the
   network grid and the mean Dice over the labels both maps share is recorded every ``validation.every`` steps
   (and at steps 0 and the last), in ``history.json`` and ``validation.png``.
6. **Output.** ``checkpoint.pt`` (network, optimizer, random state, step, as CPU tensors: ``--resume`` continues
   bit for bit, or on another device), ``history.json`` (losses per step), ``loss.png`` (the curves), ``job.json``,
   and at the end ``model/``.
7. **Device.** The network, its batches, Optron's refinement and validation run on ``device`` (``--device``);
   images are prepared, drawn and augmented on the CPU (the same random draws as a CPU run) and moved per step.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, StrictInt

from regcli.config import ConfigModel
from regcli.errors import ConvergenceError, InputError
from regcli.manifest import Dataset, weighted_counts
from regcli.training.distributed import SINGLE, Distributed
from regcli.training.optron import OptronConfig


class Augment(ConfigModel):
    prob: float = Field(0.8, ge=0, le=1, description="probability of a random affine map per image")
    rotation_deg: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0, lt=1, description="largest relative change of scale per axis")
    shift: float = Field(0.05, ge=0, description="largest translation, fraction of the field of view")


class PairTrainConfig(ConfigModel):
    """Training recipe (stored in the trained model's ``config.json`` under ``"training"``)."""

    iterations: StrictInt = Field(1000, ge=1, description="optimizer steps")
    batch_size: StrictInt = Field(2, ge=1, description="pairs per step (per process under torchrun)")
    learning_rate: float = Field(5e-4, gt=0)
    sam_rho: float = Field(0.0, ge=0, description="sharpness-aware minimization radius (0: plain Adam)")
    grad_clip: float = Field(10.0, gt=0)
    augment: Augment = Augment()
    optron: OptronConfig = Field(OptronConfig(), description="Optron training in the loop (iters 0: off)")
    seed: StrictInt = 0


class PairValidation(ConfigModel):
    """Held-out labelled pairs scored during training (see the module docstring)."""

    data: list[Dataset] = Field(min_length=1, description="datasets whose pairs CSV has fixed_labels and "
                                "moving_labels columns")
    every: StrictInt = Field(50, ge=1, description="validate after every this many steps (and at steps 0 and the last)")


def _read_pairs(csv_path: str) -> list[tuple[str, str]]:
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"pairs CSV '{path}' does not exist")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"fixed_image", "moving_image"} <= set(rows[0]):
        raise InputError(f"pairs CSV '{path}' needs fixed_image and moving_image columns and at least one row")
    return [(str(path.parent / r["fixed_image"]), str(path.parent / r["moving_image"])) for r in rows]


def prepare_volume(path: str, modality: str, shape, onto=None, reference=None) -> torch.Tensor:
    """An image as the network sees it at test time: intensities prepared on the original grid, then resampled
    onto the network grid over ``reference``'s field of view (default: its own) through ``onto`` (an affine
    transform from :func:`align_to`, or None). (1, *shape) float32."""
    from regcli.io.images import read_image
    from regcli.methods.foundation import prepare_intensities
    from regcli.resample import warp

    img = read_image(path)
    img = img.with_data(prepare_intensities(img.data, modality))
    ref = (reference or img.grid).with_size(tuple(reversed(shape)))
    return warp(img, onto, ref).data[None].contiguous()


def align_to(fixed_path: str, moving_path: str, metric: str = "lncc"):
    """regcli's affine stage (default settings, similarity ``metric``) from ``moving_path`` to ``fixed_path``: the
    transform and the fixed image's grid."""
    from regcli.config import AffineConfig
    from regcli.io.images import read_image
    from regcli.solvers.affine import run_affine_stage

    from regcli.errors import ConvergenceError

    fixed = read_image(fixed_path)
    try:
        return run_affine_stage(fixed, read_image(moving_path), AffineConfig(metric=metric)).transform, fixed.grid
    except ConvergenceError as e:
        raise ConvergenceError(f"aligning training image '{moving_path}' to '{fixed_path}': {e} (give its dataset "
                               f"align: none if its images need no affine pre-alignment, or leave the image out)"
                               ) from None


class PairSource:
    """The prepared volumes of one dataset and how it makes pairs: given pairs, else two different images,
    else an image with itself."""

    def __init__(self, ds: Dataset, shape, log: Callable[[str], None]) -> None:
        self.name = ds.name
        from regcli.io.images import read_image

        cache: dict[tuple[str, str, str], int] = {}  # (path, modality, alignment) -> volume index
        self.volumes: list[torch.Tensor] = []

        def vol(path: str, modality: str, onto=None, reference=None, key: str = "") -> int:
            if (path, modality, key) not in cache:
                cache[(path, modality, key)] = len(self.volumes)
                self.volumes.append(prepare_volume(path, modality, shape, onto, reference))
            return cache[(path, modality, key)]

        align = ds.align == "affine"
        self.pairs: list[tuple[int, int]] = []
        if ds.pairs:
            for f, m in _read_pairs(ds.pairs):
                mod_m = ds.moving_modality or ds.modality
                onto, ref = align_to(f, m, "lncc" if mod_m == ds.modality else "mi") if align else (None, None)
                self.pairs.append((vol(f, ds.modality), vol(m, mod_m, onto, ref, key=f"onto {f}")))
        self.images: list[int] = []
        if ds.glob:
            found = sorted(glob.glob(ds.glob))
            if not found:
                raise InputError(f"dataset '{ds.name}': glob '{ds.glob}' matches no file")
            template = read_image(found[0]).grid if align else None  # the field of view every image goes onto
            for k, p in enumerate(found):
                onto = align_to(found[0], p)[0] if align and k > 0 else None
                self.images.append(vol(p, ds.modality, onto, template, key="template" if align else ""))
        log(f"dataset {ds.name}: {len(self.volumes)} volumes, {len(self.pairs)} given pairs, "
            f"{len(self.images)} images for random pairs")

    def draw(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        use_pairs = self.pairs and (not self.images or float(torch.rand((), generator=gen)) < 0.5)
        if use_pairs:
            i, j = self.pairs[int(torch.randint(len(self.pairs), (), generator=gen))]
        elif len(self.images) > 1:
            i, j = (self.images[k] for k in torch.randperm(len(self.images), generator=gen)[:2].tolist())
        else:
            i = j = self.images[0]
        if float(torch.rand((), generator=gen)) < 0.5:
            i, j = j, i
        return self.volumes[i], self.volumes[j]


def epoch_order(n_sources: int, per_epoch: int, gen: torch.Generator,
                weights: Optional[list[float]] = None) -> list[int]:
    """Dataset index of every draw of one epoch, in a random order: each dataset ``per_epoch`` times, or with
    ``weights`` (the datasets' sampling weights) ``round(weight * per_epoch)`` times (at least once)."""
    if weights is None or len(set(weights)) == 1:
        order = torch.arange(n_sources).repeat(per_epoch)
    else:
        counts = weighted_counts(weights, per_epoch)
        order = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return order[torch.randperm(len(order), generator=gen)].tolist()


def random_affine(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """``x`` (1, Z, Y, X) resampled through a random affine map of the [-1, 1] cube (edge values outside)."""
    if float(torch.rand((), generator=gen)) >= aug.prob:
        return x
    ang = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(aug.rotation_deg)
    c, s = torch.cos(ang), torch.sin(ang)
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]], dtype=torch.float64)
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]], dtype=torch.float64)
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]], dtype=torch.float64)
    scale = 1 + (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * aug.scale
    shift = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * 2 * aug.shift
    theta = torch.cat(((rz @ ry @ rx) * scale[None, :], shift[:, None]), 1).to(torch.float32)[None]
    grid = F.affine_grid(theta, [1, 1, *x.shape[1:]], align_corners=True)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


# ------------------------------------------------------------------------------------------ training
def plot_curves(history: list[dict], path: Path, titles: dict[str, str]) -> None:
    """``loss.png``: one panel per history key of ``titles`` that the run records (and ``optron_mse`` under
    Optron), the raw values and a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from regcli.io.atomic import atomic_path

    titles = {**titles, "optron_mse": "Optron: MSE to the refined field"}
    keys = [k for k in titles if history and all(k in h for h in history)] or ["loss"]
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        vals = [h[key] for h in history]
        ax.plot(steps, vals, lw=0.6, alpha=0.5)
        w = max(1, len(vals) // 20)
        smooth = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, lw=1.5)
        ax.set_xlabel("step")
        ax.set_title(titles.get(key, key))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


class PairJob(ConfigModel):
    """What a pair-network training task runs (:func:`train_pair_network`); each task's job subclasses it and
    says in ``net`` which network configuration it takes."""

    data: list[Dataset] = Field(min_length=1, description="datasets (regcli.manifest.Dataset, inline or a manifest "
                                "file): image globs and/or pairs CSVs, modality, align, weight, task")
    net: dict = Field(default_factory=dict, description="the network's configuration fields (ignored with init)")
    train: PairTrainConfig = PairTrainConfig()
    checkpoint_every: StrictInt = Field(50, ge=1)
    init: Optional[str] = Field(None, description="start from these weights (any regcli weights spec)")
    validation: Optional[PairValidation] = Field(None, description="labelled held-out pairs scored while training")

    @property
    def tasks(self) -> list[str]:
        """The training tasks in order of first appearance (a task-prompted network's prompts' order)."""
        return list(dict.fromkeys(d.task_name for d in self.data))


def exclude_tasks(job: BaseModel, tasks: tuple[str, ...]) -> BaseModel:
    """``job`` (a pair-training job) without the datasets of ``tasks`` (unknown task: one-line ConfigError)."""
    if not tasks:
        return job
    from regcli.manifest import select

    return job.model_copy(update={"data": select(job.data, exclude=tasks)})


# ------------------------------------------------------------------------------------------ validation
@dataclass
class ValidationPair:
    """A held-out pair on the network grid: images (1, Z, Y, X) as the network sees them, labels (Z, Y, X)."""

    name: str
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    label_ids: Optional[tuple[int, ...]] = None


def prepare_labels(path: str, shape, onto=None, reference=None) -> torch.Tensor:
    """A label map resampled (nearest) onto the network grid over ``reference``'s field of view through
    ``onto``, as :func:`prepare_volume` does for images. (Z, Y, X) int64."""
    from regcli.io.images import read_labels
    from regcli.resample import warp

    lab = read_labels(path)
    ref = (reference or lab.grid).with_size(tuple(reversed(shape)))
    return warp(lab, onto, ref, "nearest").data.to(torch.int64)


def validation_pairs(datasets: list[Dataset], shape, log: Callable[[str], None]) -> list[ValidationPair]:
    """The labelled pairs of the datasets' pairs CSVs, prepared like training pairs (``align``)."""
    from regcli.evaluation import read_manifest

    out = []
    for ds in datasets:
        if not ds.pairs:
            raise InputError(f"validation dataset '{ds.name}' needs a pairs CSV with label columns")
        for p in read_manifest(ds.pairs):
            if p.fixed_labels is None or p.moving_labels is None:
                raise InputError(f"validation pairs CSV '{ds.pairs}': pair '{p.name}' has no label maps")
            mod_m = ds.moving_modality or ds.modality
            onto, ref = (align_to(str(p.fixed), str(p.moving), "lncc" if mod_m == ds.modality else "mi")
                         if ds.align == "affine" else (None, None))
            out.append(ValidationPair(
                f"{ds.name}/{p.name}", prepare_volume(str(p.fixed), ds.modality, shape),
                prepare_volume(str(p.moving), mod_m, shape, onto, ref), prepare_labels(str(p.fixed_labels), shape),
                prepare_labels(str(p.moving_labels), shape, onto, ref), ds.label_ids))
    log(f"validation: {len(out)} labelled pair(s)")
    return out


def validation_dice(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    pairs: list[ValidationPair], device=None) -> dict:
    """Mean Dice over ``pairs`` (each: mean over the labels both maps share, or its ``label_ids``) after warping
    the moving labels (nearest) with ``predict(moving, fixed)``, a displacement (1, 3, Z, Y, X) in voxels, tensor
    axis order (:mod:`regcli.training.optron`'s convention). Prediction and warp run on ``device`` (default the
    CPU), the Dice on the CPU."""
    from regcli.models.promptreg import warp

    device = torch.device(device or "cpu")
    per_pair = {}
    with torch.no_grad():
        for vp in pairs:
            disp = predict(vp.moving[None].to(device), vp.fixed[None].to(device))
            warped = warp(vp.moving_labels[None, None].to(device, torch.float32), disp,
                          mode="nearest")[0, 0].round().long().cpu()
            labels = sorted((set(vp.fixed_labels.unique().tolist()) & set(vp.moving_labels.unique().tolist())) - {0})
            if vp.label_ids is not None:
                labels = [lab for lab in labels if lab in vp.label_ids]
            dice = []
            for lab in labels:
                a, b = vp.fixed_labels == lab, warped == lab
                dice.append(float(2 * (a & b).sum()) / max(1, int(a.sum() + b.sum())))
            per_pair[vp.name] = sum(dice) / len(dice) if dice else float("nan")
    vals = [v for v in per_pair.values() if math.isfinite(v)]
    return {"dice": sum(vals) / len(vals) if vals else float("nan"), "per_pair": per_pair}


def _plot_validation(validation: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from regcli.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([v["step"] for v in validation], [v["dice"] for v in validation], "-o", ms=3)
    ax.set(xlabel="step", ylabel="validation Dice (network grid)", title="validation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the loop
@dataclass
class PairNetwork:
    """What a network brings to :func:`train_pair_network`.

    Attributes:
        net: the network (its ``cfg`` is saved in checkpoints).
        loss: ``loss(model, moving, fixed, tasks, noise_seed) -> {"all": tensor, other parts...}``, the network's
            own objective of a batch (``model`` may be the DDP wrapper of ``net``; ``tasks``: (N,) dataset indices).
        predict: ``predict(model, moving, fixed, tasks) -> (N, 3, Z, Y, X)`` displacement in voxels, tensor axis order
            (fixed voxels to moving), differentiable; ``tasks`` is None at validation (inference has no task id).
        symmetric: Optron refines and trains both directions (networks that predict both, like GradICON).
        plot: ``plot(history, path)``: the loss curves (``loss.png``).
    """

    net: torch.nn.Module
    loss: Callable[..., dict]
    predict: Callable[..., torch.Tensor]
    symmetric: bool = False
    plot: Optional[Callable[[list[dict], Path], None]] = None


def train_pair_network(job, pn: PairNetwork, outdir: str | Path, progress=None,
                       log: Callable[[str], None] = print, resume: bool = False,
                       dist: Distributed = SINGLE, device: torch.device | str | None = None
                       ) -> tuple[dict, list[PairSource]]:
    """Train ``pn.net`` on ``job.data`` with ``job.train`` (:class:`PairTrainConfig`) on ``device`` (default the
    CPU; the network is moved there), writing ``outdir``'s checkpoint, history and plots (rank 0); returns the
    summary (without the model folder, which the caller writes) and the data sources. ``job`` has ``data``,
    ``train``, ``checkpoint_every`` and ``validation``."""
    from regcli.training.jobs import (cpu_tensors, device_segments, note_device_change, open_run, restore_network,
                                      restoring, start_run)
    from regcli.training.optron import optron_loss, refine, running_stats_kept
    from regcli.training.sam import SAM

    net = pn.net
    out, ck_path, ck = start_run(outdir, resume, job, net_config=net.cfg.model_dump(mode="json"),
                                 needs=("state_dict", "optimizer", "generator", "history", "order", "step"),
                                 also_writes=(("loss.png",) if pn.plot is not None else ())
                                 + (("validation.png",) if job.validation is not None else ()))
    tcfg = job.train
    shape = tuple(net.cfg.input_shape)
    t_prep = time.perf_counter()
    sources = [PairSource(ds, shape, log) for ds in job.data]
    val_pairs = validation_pairs(list(job.validation.data), shape, log) if job.validation is not None else []
    log(f"prepared {sum(len(s.volumes) for s in sources)} volumes in {time.perf_counter() - t_prep:.1f} s")
    device = torch.device(device or "cpu")
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.learning_rate)
    sam = SAM(opt, tcfg.sam_rho)
    gen = torch.Generator().manual_seed(tcfg.seed)
    history: list[dict] = []
    validation: list[dict] = []
    start, order = 0, []
    if ck is not None:
        restore_network(net, ck, ck_path)
        with restoring(ck_path):
            sam.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            history, start, order = list(ck["history"]), int(ck["step"]), list(ck["order"])
            validation = list(ck.get("validation", []))
        if ck.get("world", 1) != dist.world:
            log(f"note: the run had {ck.get('world', 1)} process(es) so far and goes on with {dist.world}: "
                f"{tcfg.batch_size * dist.world} pairs per step from now on")
        log(f"resuming at step {start}")
        note_device_change(ck, device, log)
    devices = device_segments(ck, device, start)
    open_run(out, job, dist)  # after the restore: a refused resume leaves the run's job.json as it was
    model = dist.wrap(net)
    prior = history[-1]["seconds"] if history else 0.0
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if not dist.main:
            return
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"config": net.cfg.model_dump(mode="json"), "state_dict": cpu_tensors(net.state_dict()),
                    "optimizer": cpu_tensors(sam.state_dict()), "generator": gen.get_state(), "history": history,
                    "order": order, "step": step, "world": dist.world, "validation": validation,
                    "device": str(device), "devices": devices}, tmp)
        os.replace(tmp, ck_path)
        (out / "history.json").write_text(json.dumps({"history": history, "validation": validation,
                                                      "device": str(device), "devices": devices}))
        if pn.plot is not None:
            pn.plot(history, out / "loss.png")
        if validation:
            _plot_validation(validation, out / "validation.png")

    def run_validation(step: int) -> None:  # rank 0 only
        if not val_pairs or not dist.main or any(v["step"] == step for v in validation):
            return
        tv = time.perf_counter()
        net.eval()
        res = validation_dice(lambda m, f: pn.predict(net, m, f, None), val_pairs, device)
        net.train()
        validation.append({"step": step, **res, "validation_seconds": time.perf_counter() - tv})
        log(f"validation at step {step}: Dice {res['dice']:.4f} over {len(val_pairs)} pair(s)")

    net.train()
    run_validation(start)
    global_batch = tcfg.batch_size * dist.world
    weights = [d.weight for d in job.data]
    for step in range(start, tcfg.iterations):
        ts = time.perf_counter()
        pairs, names, tasks = [], [], []
        for _ in range(global_batch):  # every process draws the whole batch, then computes its share
            if not order:
                order = epoch_order(len(sources), global_batch, gen, weights)
            k = order.pop(0)
            a, b = sources[k].draw(gen)
            pairs.append((random_affine(a, tcfg.augment, gen), random_affine(b, tcfg.augment, gen)))
            names.append(sources[k].name)
            tasks.append(k)
        noise_seed = int(torch.randint(2**62, (), generator=gen))  # one noise for the whole batch, as one process
        mine = dist.shard(list(zip(pairs, tasks)))
        a = torch.stack([p[0][0] for p in mine]).to(device)
        b = torch.stack([p[0][1] for p in mine]).to(device)
        task_ids = torch.tensor([p[1] for p in mine], dtype=torch.int64, device=device)
        targets = []
        if tcfg.optron.enabled:  # the pseudo ground truth of this step, at the current weights
            with torch.no_grad(), running_stats_kept(net):  # the training pass below counts this batch
                dirs = [(a, b)] + ([(b, a)] if pn.symmetric else [])
                targets = [(mov, fix, refine(fix, mov, pn.predict(net, mov, fix, task_ids), tcfg.optron))
                           for mov, fix in dirs]
        passes: list[dict] = []

        def closure() -> torch.Tensor:  # once, or twice with SAM (same pairs, same noise)
            opt.zero_grad(set_to_none=True)
            if targets:
                own = pn.loss(model, a, b, task_ids, noise_seed) if tcfg.optron.similarity_weight > 0 else None
                mse = [optron_loss(pn.predict(model, mov, fix, task_ids), tgt, tcfg.optron) for mov, fix, tgt in targets]
                total = sum(mse) / len(mse)
                parts = {"optron_mse": total.detach()}
                if own is not None:
                    total = total + tcfg.optron.similarity_weight * own["all"]
                    parts.update({k: v.detach() for k, v in own.items() if k != "all"})
                loss = {"all": total, **parts}
            else:
                loss = pn.loss(model, a, b, task_ids, noise_seed)
            loss["all"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), tcfg.grad_clip)
            passes.append({k: dist.mean(float(v.detach())) for k, v in loss.items()})
            return loss["all"]

        sam.step(closure)
        rec = {"step": step + 1, "datasets": names, "loss": passes[0]["all"],
               **{k: v for k, v in passes[0].items() if k != "all"},
               "step_seconds": time.perf_counter() - ts, "seconds": prior + time.perf_counter() - t0}
        if len(passes) > 1:
            rec["sam_loss"] = passes[1]["all"]
        if not math.isfinite(rec["loss"]):
            raise ConvergenceError(f"training diverged at step {step + 1}: loss {rec['loss']}")
        history.append(rec)
        if progress is not None and dist.main:
            progress(step + 1, tcfg.iterations, rec)
        if job.validation is not None and ((step + 1) % job.validation.every == 0 or step + 1 == tcfg.iterations):
            run_validation(step + 1)
        if (step + 1) % job.checkpoint_every == 0 or step + 1 == tcfg.iterations:
            save(step + 1)
    net.eval()
    last = history[-min(len(history), 50):]
    summary = {"datasets": [s.name for s in sources], "volumes": sum(len(s.volumes) for s in sources),
               "iterations": len(history), "seconds": round(history[-1]["seconds"], 1) if history else 0.0,
               "final_loss_mean50": sum(h["loss"] for h in last) / max(1, len(last)), "sam_rho": tcfg.sam_rho,
               "device": str(device), "devices": devices, "outdir": str(out)}
    if tcfg.optron.enabled:
        summary["optron"] = tcfg.optron.model_dump()
    if validation:
        summary["validation"] = {"pairs": len(val_pairs), "first_dice": validation[0]["dice"],
                                 "last_dice": validation[-1]["dice"],
                                 "best_dice": max(v["dice"] for v in validation)}
    return summary, sources
