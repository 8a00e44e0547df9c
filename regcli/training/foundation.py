"""``regcli train foundation``: train (or fine-tune) the multi-step GradICON network on several datasets.

Recipe (after uniGradICON, written for regcli):

1-3. **Data, sampling, augmentation** as every pair-registration network trains
   (:mod:`regcli.training.pairs`): datasets of images (inter-subject pairs) and/or pairs CSVs (intra-subject),
   prepared as ``--method foundation`` sees them (``align: affine``: after regcli's affine stage; ``none``:
   every image's own field of view, uniGradICON's training), balanced epochs (or by weight), random affine
   augmentation.
4. **Objective.** The GradICON loss (:func:`regcli.models.gradicon.gradicon_loss`): 1 - LNCC both ways plus
   ``lmbda`` times the gradient inverse-consistency term; Adam, batch normalisation in training mode; with
   ``train.sam_rho > 0`` sharpness-aware minimization (:mod:`regcli.training.sam`); with
   ``train.optron.iters > 0`` Optron (:mod:`regcli.training.optron`, both directions); optional validation Dice.
5. **Output.** ``checkpoint.pt`` (network, optimizer, random state, step: ``--resume`` continues bit for bit),
   ``history.json`` (losses per step), ``loss.png`` (the curves), ``job.json``, and at the end ``model/``, a
   Hub-layout model folder with a model card. ``init`` (``--init``) fine-tunes from any model folder, for
   example one made by ``regcli weights import unigradicon``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from pydantic import Field

from regcli.models.gradicon import GradICONConfig, GradICONNet, gradicon_loss, identity_map
from regcli.training.distributed import SINGLE, Distributed
from regcli.training.pairs import PairJob, PairNetwork, plot_curves, train_pair_network


class FoundationJob(PairJob):
    """What ``regcli train foundation`` runs (``init`` fine-tunes, e.g. from an imported uniGradICON)."""

    net: dict = Field(default_factory=dict, description="regcli.models.gradicon.GradICONConfig fields (ignored "
                      "with init: the initial model's architecture is kept)")


def load_foundation_job(path: str | Path, overrides: Optional[dict] = None) -> FoundationJob:
    from regcli.training.jobs import load_job_file

    return load_job_file(path, overrides, FoundationJob,
                         lambda job: None if job.init else GradICONConfig.model_validate(job.net))



def _plot(history: list[dict], path: Path) -> None:
    plot_curves(history, path, {"similarity": "1 - LNCC (both ways)", "inverse_consistency": "GradICON term"})


def model_card(job: FoundationJob, net: GradICONNet, summary: dict) -> str:
    from regcli.training.jobs import devices_text

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
- **Training time**: {summary['seconds']} s on {devices_text(summary)}. Mean loss of the last 50 steps:
  {summary['final_loss_mean50']:.4f}.
- **Use**: `--method foundation` with `foundation.weights` set to this folder.
- **Metrics measured with regcli**: see docs/foundation.md.
"""


def gradicon_network(net: GradICONNet) -> PairNetwork:
    """The GradICON network for :func:`regcli.training.pairs.train_pair_network`: its loss, and its maps as
    voxel displacements (both directions under Optron)."""
    from regcli.training.optron import gradicon_displacement

    def loss(model, a, b, tasks, noise_seed):
        import torch

        return gradicon_loss(model, a, b, lmbda=net.cfg.lmbda, sigma=net.cfg.lncc_sigma,
                             generator=torch.Generator().manual_seed(noise_seed))

    def predict(model, moving, fixed, tasks):
        ident = identity_map(tuple(moving.shape[2:]), moving.device, moving.dtype)
        return gradicon_displacement(model(moving, fixed)(ident, identity=True) - ident)

    return PairNetwork(net, loss, predict, symmetric=True, plot=_plot)


def run_foundation_job(job: FoundationJob, outdir: str | Path, progress=None, log: Callable[[str], None] = print,
                       resume: bool = False, dist: Distributed = SINGLE, device=None) -> dict:
    """Train on ``device`` (default the CPU) and write ``outdir/{checkpoint.pt, history.json, loss.png, job.json,
    model/}``; returns a summary.

    Under torchrun (``dist``, :mod:`regcli.training.distributed`) each process computes its share of a global
    batch of ``world * batch_size`` pairs; rank 0 writes the files and calls ``progress``."""
    import torch

    from regcli.models.gradicon import parameter_count, save_gradicon_model

    torch.manual_seed(job.train.seed)
    if job.init:
        from regcli.models.gradicon import load_gradicon

        net = load_gradicon(job.init)
        log(f"fine-tuning from '{job.init}'")
    else:
        net = GradICONNet(GradICONConfig.model_validate(job.net))
    summary, _ = train_pair_network(job, gradicon_network(net), outdir, progress, log, resume, dist, device)
    summary["parameters"] = parameter_count(net)
    folder = Path(outdir) / "model"
    if dist.main:
        save_gradicon_model(net, folder, model_card(job, net, summary),
                            training={"job": json.loads(job.model_dump_json()), "summary": summary,
                                      **({"processes": dist.world} if dist.enabled else {})}, overwrite=True)
    dist.barrier()
    summary["model"] = str(folder)
    return summary
