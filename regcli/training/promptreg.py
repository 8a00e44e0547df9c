"""``regcli train promptreg``: train the task-prompted PromptReg network (:mod:`regcli.models.promptreg`) on
several datasets, each a task.

Data, sampling, augmentation, Optron, validation, checkpoints and torchrun: :mod:`regcli.training.pairs`. The
task of a pair is its dataset's ``task`` (default: its name); datasets that share a task share a prompt of the
static knowledge base. The objective is PromptReg's: MIND-SSC + 0.1 smoothness + 0.001 x (orthogonality + task
similarity), the task-similarity term trained with the pair's task id; the network itself never reads the id.
``--exclude-task T`` leaves a task out of training, for the leave-one-dataset-out (zero-shot) protocol:
``regcli evaluate datasets.yaml --task T --method promptreg`` with the model trained without T.

The model folder's ``config.json`` records the task names (``training.tasks``), so ``--method promptreg`` can
report the predicted task mixture by name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import Field

from regcli.errors import ConfigError
from regcli.models.promptreg import PromptRegConfig, PromptRegNet, promptreg_loss
from regcli.training.distributed import SINGLE, Distributed
from regcli.training.pairs import PairJob, PairNetwork, train_pair_network


class PromptRegJob(PairJob):
    """What ``regcli train promptreg`` runs: each dataset is of a task (:attr:`tasks`, the prompts' order)."""

    net: dict = Field(default_factory=dict, description="regcli.models.promptreg.PromptRegConfig fields (num_tasks "
                      "defaults to the number of tasks in data; ignored with init)")


def load_promptreg_job(path: str | Path, overrides: Optional[dict] = None) -> PromptRegJob:
    """The job file with ``overrides``."""
    from regcli.training.jobs import load_job_file

    return load_job_file(path, overrides, PromptRegJob, lambda job: None if job.init else net_config(job))


def net_config(job: PromptRegJob) -> PromptRegConfig:
    return PromptRegConfig.model_validate({"num_tasks": len(job.tasks), **job.net})


def promptreg_network(net: PromptRegNet, task_of_dataset: list[int]) -> PairNetwork:
    """PromptReg for :func:`regcli.training.pairs.train_pair_network`: dataset index -> task id for its loss."""
    lookup = torch.tensor(task_of_dataset, dtype=torch.int64)

    def loss(model, a, b, datasets, noise_seed):
        task = lookup.to(datasets.device)[datasets]
        return promptreg_loss(model(a, b, task), a, b, task, cfg=net.cfg)

    def predict(model, moving, fixed, datasets):
        return model(moving, fixed).disp

    def plot(history: list[dict], path: Path) -> None:
        from regcli.training.pairs import plot_curves

        plot_curves(history, path, {"similarity": "MIND-SSC", "smoothness": "smoothness",
                                    "task_similarity": "task similarity"})

    return PairNetwork(net, loss, predict, symmetric=False, plot=plot)


def model_card(job: PromptRegJob, net: PromptRegNet, summary: dict) -> str:
    from regcli.training.jobs import devices_text

    t = job.train
    data = "\n".join(f"  - {d.name} (task {d.task_name}, {d.modality}): `{os.path.normpath(d.glob or d.pairs)}`"
                     for d in job.data)
    return f"""# regcli PromptReg network (trained with `regcli train promptreg`)

- **Architecture**: PromptReg (regcli.models.promptreg) on a {'x'.join(map(str, net.cfg.input_shape))} grid,
  encoder {list(net.cfg.encoder_channels)}, decoder {list(net.cfg.decoder_channels)}, {net.cfg.num_tasks} task
  prompts of {net.cfg.prompt_dim} numbers, {summary['parameters']:,} parameters.
- **Tasks** (the static knowledge base, in order): {', '.join(job.tasks)}.
- **Data**:
{data}
- **Recipe**: {summary['iterations']} steps of {t.batch_size} pairs, Adam lr {t.learning_rate:g}, MIND-SSC +
  {net.cfg.smoothness_weight:g} smoothness + {net.cfg.orthogonality_weight:g} orthogonality +
  {net.cfg.task_similarity_weight:g} task similarity, random affine augmentation, SAM rho {t.sam_rho:g}, Optron
  {t.optron.iters} steps, seed {t.seed}.
- **Training time**: {summary['seconds']} s on {devices_text(summary)}. Mean loss of the last 50 steps:
  {summary['final_loss_mean50']:.4f}.
- **Use**: `--method promptreg` with `promptreg.weights` set to this folder. Measure with `regcli evaluate`.
"""


def run_promptreg_job(job: PromptRegJob, outdir: str | Path, progress=None, log: Callable[[str], None] = print,
                      resume: bool = False, dist: Distributed = SINGLE, device: torch.device | str | None = None
                      ) -> dict:
    """Train on ``device`` (default the CPU) and write ``outdir/{checkpoint.pt, history.json, loss.png, job.json,
    model/}``; returns a summary."""
    from regcli.models.gradicon import parameter_count
    from regcli.models.promptreg import load_promptreg, save_promptreg_model

    torch.manual_seed(job.train.seed)
    if job.init:
        net = load_promptreg(job.init)
        log(f"starting from '{job.init}'")
        if net.cfg.num_tasks != len(job.tasks):
            raise ConfigError(f"model '{job.init}' has {net.cfg.num_tasks} task prompts; the job has "
                              f"{len(job.tasks)} tasks ({', '.join(job.tasks)})")
    else:
        net = PromptRegNet(net_config(job))
    tasks = job.tasks
    summary, _ = train_pair_network(job, promptreg_network(net, [tasks.index(d.task_name) for d in job.data]),
                                    outdir, progress, log, resume, dist, device)
    summary["parameters"] = parameter_count(net)
    summary["tasks"] = tasks
    folder = Path(outdir) / "model"
    if dist.main:
        save_promptreg_model(net, folder, model_card(job, net, summary),
                             training={"job": json.loads(job.model_dump_json()), "summary": summary, "tasks": tasks},
                             overwrite=True)
    dist.barrier()
    summary["model"] = str(folder)
    return summary
