"""Training under ``torchrun --nproc-per-node 2`` (gloo, CPU): the run works, rank 0 alone writes, the processes'
gradients are averaged (the first step's gradient equals one process's with the doubled batch), and the loss
curve matches one process with the doubled batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env, make_phantom, phantom_labels, write
from regcli.training.distributed import Distributed

ROOT = Path(__file__).resolve().parents[1]


def test_shard_splits_a_global_batch_in_order():
    items = list(range(6))
    assert [Distributed(r, 3).shard(items) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert Distributed().shard(items) == items
    with pytest.raises(ValueError):
        Distributed(0, 4).shard(items)


def _torchrun(nproc: int, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m regcli train ...`` (or plain ``python -m regcli`` for 1)."""
    env = child_env(REGCLI_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "regcli", *args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--nproc-per-node", str(nproc), "--master-port", str(_free_port()), "-m", "regcli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _foundation_job(tmp_path: Path, batch: int, iterations: int = 6) -> Path:
    for k, shift in enumerate(([0, 0, 0], [2, -1, 0], [-1, 2, 1])):
        write(make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p, s=np.array(shift): p + s),
              tmp_path / f"sub-{k}_T1w.nii.gz")
    job = tmp_path / f"job{batch}.yaml"
    job.write_text("data:\n  - {name: brain, glob: sub-*_T1w.nii.gz, align: none}\n"
                   "net: {input_shape: [20, 20, 20], down_channels: [4, 8, 8], up_channels: [4, 4, 8]}\n"
                   f"train: {{iterations: {iterations}, batch_size: {batch}, seed: 3, learning_rate: 0.0005}}\n"
                   "checkpoint_every: 3\n")
    return job


def _first_step_state(checkpoint: Path) -> dict[str, tuple]:
    """Per U-Net of a GradICON run checkpointed after its first step: the part of Adam's first moment (0.1 times
    the step's gradient, after DDP's averaging) and of the weights that batch normalisation cannot touch.

    Every U-Net's ``lastConv`` starts at zero, so at step 1 the maps are the identity whatever the batch
    statistics, and only ``lastConv`` gets a gradient (asserted). Its bias and its weights on the U-Net's raw
    input images (the last ``2 * input_channels`` input channels, a skip connection around the normalised
    features) then have a gradient that does not depend on batch normalisation: two processes that average
    their gradients get one process's with the doubled batch up to the order of float32 sums, while a process
    that keeps its own half-batch gradient gets a different one (and Adam's first step, about the learning rate
    times its sign, flips some of those weights)."""
    import torch

    from regcli.models.gradicon import GradICONConfig, GradICONNet

    ck = torch.load(checkpoint, weights_only=False)
    assert ck["step"] == 1
    names = [n for n, _ in GradICONNet(GradICONConfig.model_validate(ck["config"])).named_parameters()]
    adam = ck["optimizer"]["state"]  # Adam(net.parameters()): indexed in named_parameters' order
    moved = [n for k, n in enumerate(names) if k in adam and bool(adam[k]["exp_avg"].any())]
    assert moved and all(".lastConv." in n for n in moved), moved
    images = 2 * ck["config"]["input_channels"]
    out = {}
    for k, n in enumerate(names):
        if n.endswith(".lastConv.weight"):
            conv = n[:-len(".weight")]
            b = names.index(conv + ".bias")
            out[conv] = (torch.cat((adam[k]["exp_avg"][:, -images:].flatten(), adam[b]["exp_avg"])),
                         torch.cat((ck["state_dict"][n][:, -images:].flatten(), ck["state_dict"][conv + ".bias"])))
    return out


def _losses(outdir: Path) -> np.ndarray:
    return np.array([h["loss"] for h in json.loads((outdir / "history.json").read_text())["history"]])


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")
def test_torchrun_foundation_matches_one_process_with_the_doubled_batch_and_resumes(tmp_path):
    job1, job2 = _foundation_job(tmp_path, 1), _foundation_job(tmp_path, 2)
    two, first = tmp_path / "ddp", tmp_path / "single-step1"
    # --device cpu: bit for bit is the CPU's promise; CUDA's grid_sample and cuDNN backwards add with atomics
    r = _torchrun(2, "train", "foundation", "--device", "cpu",
                  "--config", str(job1), "-o", str(two), "--json", "--iterations", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["iterations"] == 1  # exactly one JSON object: rank 0's
    r = _torchrun(1, "train", "foundation", "--device", "cpu",
                  "--config", str(job2), "-o", str(first), "--json", "--iterations", "1")
    assert r.returncode == 0, r.stderr[-4000:]
    # gradients are averaged over the processes (see _first_step_state): measured relative difference ~1e-6 and
    # weights equal to ~1e-10; without the all-reduce 0.40-0.64 and 26-31 of each U-Net's 165 off by 2 lr = 1e-3
    ddp, single = _first_step_state(two / "checkpoint.pt"), _first_step_state(first / "checkpoint.pt")
    assert ddp.keys() == single.keys() and len(ddp) == 4
    for net, ((grad_a, w_a), (grad_b, w_b)) in ((k, (ddp[k], single[k])) for k in ddp):
        rel = float((grad_a - grad_b).norm() / grad_b.norm())
        assert rel < 1e-4, f"{net}: the first step's gradient differs from one process's by {rel:.3g} (relative)"
        assert float((w_a - w_b).abs().max()) < 1e-6, f"{net}: weights after step 1 differ"
    r = _torchrun(2, "train", "foundation", "--device", "cpu",
                  "--config", str(job1), "-o", str(two), "--json", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    one = tmp_path / "single"
    r = _torchrun(1, "train", "foundation", "--device", "cpu", "--config", str(job2), "-o", str(one), "--json")
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = _losses(two), _losses(one)
    assert len(a) == len(b) == 6
    # step 1: the same pairs, augmentation and noise at the same weights give the same loss
    assert abs(a[0] - b[0]) < 1e-5
    # later steps differ only through batch normalisation (statistics of each process's half of the batch
    # instead of the whole batch; CPU has no SyncBatchNorm) and the order of sums: a small drift
    assert abs(a[1] - b[1]) < 5e-3 and np.abs(a - b).max() < 0.1 and abs(a.mean() - b.mean()) < 0.03, (a, b)
    hist = json.loads((two / "history.json").read_text())["history"]
    assert [h["step"] for h in hist] == list(range(1, 7)) and len(hist[0]["datasets"]) == 2  # global batch
    assert (two / "model" / "model.safetensors").is_file() and not list(two.glob("*.tmp"))


def _dio_and_embedding_jobs(tmp_path: Path) -> tuple[Path, Path]:
    for k, shift in enumerate(([0, 0, 0], [2, -1, 0])):  # two subjects: DIO aligns each further one to the first
        img = make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p, s=np.array(shift): p + s)
        write(img, tmp_path / f"sub-{k}_T1w.nii.gz")
        write(phantom_labels(img), tmp_path / f"sub-{k}_labels.nii.gz")
    dio = tmp_path / "dio.yaml"
    dio.write_text("data:\n  - {glob: sub-*_T1w.nii.gz}\n"
                   "net: {arch: unet, widths: [4, 8, 8, 8], feature_channels: [4, 4, 4]}\n"
                   "train: {iterations: 2, crop: [16, 16, 16], seed: 0}\nsolver: {dio: {iterations: [4, 3, 2]}}\n"
                   "checkpoint_every: 1\n")
    emb = tmp_path / "emb.yaml"
    emb.write_text("data:\n  - {glob: sub-*_T1w.nii.gz}\n"
                   "net: {widths: [4, 8, 8, 12], global_dim: 8, local_dim: 8, context_dilations: [1, 2], "
                   "spacing_mm: 1.5}\n"
                   "train: {iterations: 2, crop: 16, batch_pairs: 1, points: 32, max_shift_mm: 8.0, "
                   "hard_negatives: 16, seed: 0}\ncheckpoint_every: 1\n")
    return dio, emb


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")
@pytest.mark.parametrize("task", ["dio", "embedding"])
def test_torchrun_runs_every_training_task(tmp_path, task):
    jobs = dict(zip(("dio", "embedding"), _dio_and_embedding_jobs(tmp_path)))
    out = tmp_path / task
    r = _torchrun(2, "train", task, "--config", str(jobs[task]), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout)
    assert summary["iterations"] == 2
    assert (out / "model" / "model.safetensors").is_file()
    r = _torchrun(2, "train", task, "--config", str(jobs[task]), "-o", str(out), "--json", "--resume",
                  "--iterations", "3")
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout)["iterations"] == 3
    shutil.rmtree(out)
