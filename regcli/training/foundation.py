"""``regcli train foundation``: train (or fine-tune) the multi-step GradICON network on several datasets.

Recipe (after uniGradICON, written for regcli):

1. **Data.** Each dataset of the job is a glob of images (inter-subject pairs: two different images of the
   dataset) and/or a CSV of image pairs (intra-subject pairs, e.g. two scans of one patient), with its
   modality. Every image is prepared once, up front, as ``--method foundation`` sees it at test time
   (``align: affine``, the default): :func:`regcli.methods.foundation.prepare_intensities` on the original
   image, regcli's affine stage to the dataset's first image (a pair's moving image: to its fixed image),
   then resampled onto the network grid over that reference's field of view. ``align: none`` keeps every
   image's own field of view (uniGradICON's training, where the network also has to learn the affine part).
   A dataset with one image pairs it with itself (the augmentation makes the two views differ).
2. **Sampling.** An epoch holds the same number of pairs from every dataset (uniGradICON's balance between
   large and small datasets), in a seeded random order; the two images of a pair are swapped half of the time.
3. **Augmentation.** Each image of a pair gets its own random affine map (rotation up to ``augment.rotation_deg``
   about each axis, scaling up to ``augment.scale``, translation up to ``augment.shift`` of the field of
   view), applied in the network's [0, 1] coordinates, with probability ``augment.prob``.
4. **Objective.** The GradICON loss (:func:`regcli.models.gradicon.gradicon_loss`): 1 - LNCC both ways plus
   ``lmbda`` times the gradient inverse-consistency term; Adam, batch normalisation in training mode; with
   ``train.sam_rho > 0`` sharpness-aware minimization (:mod:`regcli.training.sam`).
5. **Output.** ``checkpoint.pt`` (network, optimizer, random state, step: ``--resume`` continues bit for bit),
   ``history.json`` (losses per step), ``loss.png`` (the curves), ``job.json``, and at the end ``model/``, a
   Hub-layout model folder with a model card. ``init`` (``--init``) fine-tunes from any model folder, for
   example one made by ``regcli weights import unigradicon``.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from regcli.errors import ConfigError, ConvergenceError, InputError
from regcli.manifest import Dataset, weighted_counts
from regcli.models.gradicon import GradICONConfig, GradICONNet, gradicon_loss
from regcli.training.distributed import SINGLE, Distributed


class Augment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prob: float = Field(0.8, ge=0, le=1, description="probability of a random affine map per image")
    rotation_deg: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0, lt=1, description="largest relative change of scale per axis")
    shift: float = Field(0.05, ge=0, description="largest translation, fraction of the field of view")


class FoundationTrainConfig(BaseModel):
    """Training recipe (stored in the trained model's ``config.json`` under ``"training"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(2, ge=1, description="pairs per step")
    learning_rate: float = Field(5e-4, gt=0)
    sam_rho: float = Field(0.0, ge=0, description="sharpness-aware minimization radius (0: plain Adam)")
    grad_clip: float = Field(10.0, gt=0)
    augment: Augment = Augment()
    seed: int = 0


class FoundationJob(BaseModel):
    """What ``regcli train foundation`` runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: list[Dataset] = Field(min_length=1, description="datasets (regcli.manifest.Dataset, inline or a manifest "
                                "file): image globs and/or pairs CSVs, modality, align, weight")
    net: dict = Field(default_factory=dict, description="regcli.models.gradicon.GradICONConfig fields (ignored "
                      "with init: the initial model's architecture is kept)")
    train: FoundationTrainConfig = FoundationTrainConfig()
    checkpoint_every: int = Field(50, ge=1)
    init: Optional[str] = Field(None, description="fine-tune from these weights (any regcli weights spec)")


def load_foundation_job(path: str | Path, overrides: Optional[dict] = None) -> FoundationJob:
    from pydantic import ValidationError

    from regcli.config import validation_details
    from regcli.training.jobs import job_data

    data = job_data(path, overrides)
    try:
        job = FoundationJob.model_validate(data)
        if not job.init:
            GradICONConfig.model_validate(job.net)
    except ValidationError as e:
        raise ConfigError(f"invalid training job '{path}': {validation_details(e)}") from None
    return job


# ------------------------------------------------------------------------------------------ data
def _read_pairs(csv_path: str) -> list[tuple[str, str]]:
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"pairs CSV '{path}' does not exist")
    with path.open(newline="") as f:
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

    fixed = read_image(fixed_path)
    return run_affine_stage(fixed, read_image(moving_path), AffineConfig(metric=metric)).transform, fixed.grid


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
def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from regcli.io.atomic import atomic_path

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for k, key in enumerate(("similarity", "inverse_consistency")):
        vals = [h[key] for h in history]
        ax[k].plot(steps, vals, lw=0.6, alpha=0.5)
        w = max(1, len(vals) // 20)
        smooth = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
        ax[k].plot(steps, smooth, lw=1.5)
        ax[k].set_xlabel("step")
        ax[k].set_title({"similarity": "1 - LNCC (both ways)", "inverse_consistency": "GradICON term"}[key])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def model_card(job: FoundationJob, net: GradICONNet, summary: dict) -> str:
    names = ", ".join(d.name for d in job.data)
    t = job.train
    return f"""# regcli GradICON network (trained with `regcli train foundation`)

- **Architecture**: {4 if net.cfg.last_step else 3} GradICON U-Net steps (regcli.models.gradicon) on a
  {'x'.join(map(str, net.cfg.input_shape))} grid, U-Net channels {list(net.cfg.down_channels)} down /
  {list(net.cfg.up_channels)} up, {summary['parameters']:,} parameters.
- **Data**: {names}; each image prepared as `--method foundation` sees it (intensity window, then per
  dataset's `align` the affine pre-alignment, resampled onto the network grid).
- **Recipe**: {summary['iterations']} steps of {t.batch_size} pairs, Adam lr {t.learning_rate:g}, GradICON loss with
  lambda {net.cfg.lmbda:g} and LNCC sigma {net.cfg.lncc_sigma:g} voxels, random affine augmentation,
  sharpness-aware minimization rho {t.sam_rho:g}, seed {t.seed}{', fine-tuned from ' + job.init if job.init else ''}.
- **Training time**: {summary['seconds']} s. Mean loss of the last 50 steps: {summary['final_loss_mean50']:.4f}.
- **Use**: `--method foundation` with `foundation.weights` set to this folder.
- **Metrics measured with regcli**: see docs/foundation.md.
"""


def run_foundation_job(job: FoundationJob, outdir: str | Path, progress=None, log: Callable[[str], None] = print,
                       resume: bool = False, dist: Distributed = SINGLE) -> dict:
    """Train and write ``outdir/{checkpoint.pt, history.json, loss.png, job.json, model/}``; returns a summary.

    Under torchrun (``dist``, :mod:`regcli.training.distributed`) each process computes its share of a global
    batch of ``world * batch_size`` pairs; rank 0 writes the files and calls ``progress``."""
    from regcli.models.gradicon import parameter_count, save_gradicon_model
    from regcli.training.jobs import start_run
    from regcli.training.sam import SAM

    out, ck_path = start_run(outdir, job, resume, dist)
    tcfg = job.train
    torch.manual_seed(tcfg.seed)
    if job.init:
        from regcli.models.gradicon import load_gradicon

        net = load_gradicon(job.init)
        log(f"fine-tuning from '{job.init}'")
    else:
        net = GradICONNet(GradICONConfig.model_validate(job.net))
    shape = tuple(net.cfg.input_shape)
    t_prep = time.perf_counter()
    sources = [PairSource(ds, shape, log) for ds in job.data]
    log(f"prepared {sum(len(s.volumes) for s in sources)} volumes in {time.perf_counter() - t_prep:.1f} s")
    opt = torch.optim.Adam(net.parameters(), lr=tcfg.learning_rate)
    sam = SAM(opt, tcfg.sam_rho)
    gen = torch.Generator().manual_seed(tcfg.seed)
    history: list[dict] = []
    start, order = 0, []
    if resume:
        ck = torch.load(ck_path, weights_only=False)
        net.load_state_dict(ck["state_dict"])
        sam.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        history, start, order = ck["history"], ck["step"], ck["order"]
        if ck.get("world", 1) != dist.world:
            log(f"note: the run had {ck.get('world', 1)} process(es) so far and goes on with {dist.world}: "
                f"{tcfg.batch_size * dist.world} pairs per step from now on")
        log(f"resuming at step {start}")
    model = dist.wrap(net)
    prior = history[-1]["seconds"] if history else 0.0
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if not dist.main:
            return
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"config": net.cfg.model_dump(mode="json"), "state_dict": net.state_dict(),
                    "optimizer": sam.state_dict(), "generator": gen.get_state(), "history": history,
                    "order": order, "step": step, "world": dist.world}, tmp)
        os.replace(tmp, ck_path)
        (out / "history.json").write_text(json.dumps({"history": history}))
        _plot(history, out / "loss.png")

    net.train()
    global_batch = tcfg.batch_size * dist.world
    for step in range(start, tcfg.iterations):
        ts = time.perf_counter()
        pairs, names = [], []
        for _ in range(global_batch):  # every process draws the whole batch, then computes its share
            if not order:
                order = epoch_order(len(sources), global_batch, gen, [d.weight for d in job.data])
            src = sources[order.pop(0)]
            a, b = src.draw(gen)
            pairs.append((random_affine(a, tcfg.augment, gen), random_affine(b, tcfg.augment, gen)))
            names.append(src.name)
        mine = dist.shard(pairs)
        a = torch.stack([p[0] for p in mine])
        b = torch.stack([p[1] for p in mine])
        noise_seed = int(torch.randint(2**62, (), generator=gen))  # one noise for the whole batch, as one process
        passes: list[dict] = []

        def closure() -> torch.Tensor:  # once, or twice with SAM (same pairs, same noise)
            opt.zero_grad(set_to_none=True)
            loss = gradicon_loss(model, a, b, lmbda=net.cfg.lmbda, sigma=net.cfg.lncc_sigma,
                                 generator=torch.Generator().manual_seed(noise_seed))
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
            raise ConvergenceError(f"foundation training diverged at step {step + 1}: loss {rec['loss']}")
        history.append(rec)
        if progress is not None and dist.main:
            progress(step + 1, tcfg.iterations, rec)
        if (step + 1) % job.checkpoint_every == 0 or step + 1 == tcfg.iterations:
            save(step + 1)
    net.eval()
    last = history[-min(len(history), 50):]
    summary = {"datasets": [s.name for s in sources], "volumes": sum(len(s.volumes) for s in sources),
               "iterations": len(history), "parameters": parameter_count(net),
               "seconds": round(history[-1]["seconds"], 1) if history else 0.0,
               "final_loss_mean50": sum(h["loss"] for h in last) / max(1, len(last)), "sam_rho": tcfg.sam_rho,
               "outdir": str(out)}
    folder = out / "model"
    if dist.main:
        save_gradicon_model(net, folder, model_card(job, net, summary),
                            training={"job": json.loads(job.model_dump_json()), "summary": summary,
                                      **({"processes": dist.world} if dist.enabled else {})}, overwrite=True)
    dist.barrier()
    summary["model"] = str(folder)
    return summary
