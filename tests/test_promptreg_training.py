"""``regcli train promptreg``, Optron training in the loop, validation while training, leave-one-task-out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import invoke, make_phantom, phantom_labels, write
from regcli.training.optron import OptronConfig, optron_loss, refine

NET = "net: {input_shape: [24, 24, 24], encoder_channels: [4, 8, 8], decoder_channels: [4, 8], prompt_dim: 8}\n"


def _data(tmp_path):
    """Two 'tasks': MRI-like phantoms (3 subjects, with labels and a pairs CSV for validation) and CT-like ones."""
    for k, shift in enumerate(([0, 0, 0], [2, -1, 0], [-1, 2, 1])):
        img = make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p, s=np.array(shift): p + s)
        write(img, tmp_path / f"sub-{k}_T1w.nii.gz")
        write(phantom_labels(img), tmp_path / f"sub-{k}_labels.nii.gz")
        ct = sitk.GetArrayFromImage(make_phantom("oblique15", (2.0, 2.0, 3.0), transform=lambda p, s=np.array(shift):
                                                 p - s)) * 1500 - 1000
        out = sitk.GetImageFromArray(ct.astype(np.float32))
        out.CopyInformation(make_phantom("oblique15", (2.0, 2.0, 3.0)))
        write(out, tmp_path / f"ct-{k}.nii.gz")
    (tmp_path / "val.csv").write_text("fixed_image,moving_image,fixed_labels,moving_labels\n"
                                      "sub-0_T1w.nii.gz,sub-2_T1w.nii.gz,sub-0_labels.nii.gz,sub-2_labels.nii.gz\n")
    (tmp_path / "datasets.yaml").write_text("- {name: brain, glob: sub-*_T1w.nii.gz, align: none}\n"
                                            "- {name: ct, glob: ct-*.nii.gz, modality: ct, align: none}\n")


def _job(tmp_path, train="", extra="") -> str:
    (tmp_path / "job.yaml").write_text(
        "data: datasets.yaml\n" + NET + f"train: {{iterations: 4, batch_size: 2, seed: 2, learning_rate: 0.002"
        f"{', ' + train if train else ''}}}\ncheckpoint_every: 2\n" + extra)
    return str(tmp_path / "job.yaml")


def test_optron_refinement_moves_a_prediction_towards_the_truth():
    """A blob moved by 2 voxels along x: refining the zero prediction recovers most of the shift, and the MSE to
    the target is what the network is trained on."""
    z, y, x = torch.meshgrid(*[torch.arange(24, dtype=torch.float32)] * 3, indexing="ij")
    blob = lambda cx: torch.exp(-(((x - cx) ** 2 + (y - 12) ** 2 + (z - 12) ** 2) / 18.0))  # noqa: E731
    fixed, moving = blob(11.0)[None, None], blob(13.0)[None, None]  # moving(p) = fixed(p - 2 e_x): d = +2 in x
    cfg = OptronConfig(iters=40, lr=0.1)
    target = refine(fixed, moving, torch.zeros(1, 3, 24, 24, 24), cfg)
    centre = target[0, :, 9:15, 9:15, 9:15].mean(dim=(1, 2, 3))
    assert float(centre[2]) > 0.7 and abs(float(centre[0])) < 0.2 and abs(float(centre[1])) < 0.2, centre
    from regcli.models.promptreg import warp

    ssd = lambda d: float(((warp(moving, d) - fixed) ** 2).sum())  # noqa: E731
    assert ssd(target) < 0.5 * ssd(torch.zeros(1, 3, 24, 24, 24))  # the pair is better aligned
    more = refine(fixed, moving, target, cfg)  # refining further goes on towards the truth
    assert float(more[0, 2, 9:15, 9:15, 9:15].mean()) > float(centre[2])
    assert not target.requires_grad
    pred = torch.zeros(1, 3, 24, 24, 24, requires_grad=True)
    loss = optron_loss(pred, target, cfg)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float((target ** 2).mean())) and pred.grad.abs().sum() > 0
    assert torch.equal(refine(fixed, moving, torch.zeros(1, 3, 24, 24, 24), cfg), target)  # deterministic


def test_train_promptreg_records_tasks_validates_and_resumes_bit_for_bit(tmp_path):
    _data(tmp_path)
    job = _job(tmp_path, extra="validation: {data: [{name: val, pairs: val.csv, align: none}], every: 2}\n")
    # --device cpu: bit for bit is the CPU's promise; CUDA's grid_sample and cuDNN backwards add with atomics
    res = invoke("train", "promptreg", "--device", "cpu", "--config", job, "-o", tmp_path / "a", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["tasks"] == ["brain", "ct"] and s["iterations"] == 4
    assert s["validation"]["pairs"] == 1 and 0 < s["validation"]["first_dice"] <= 1
    hist = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [v["step"] for v in hist["validation"]] == [0, 2, 4]
    assert {"similarity", "smoothness", "orthogonality", "task_similarity"} <= set(hist["history"][0])
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["architecture"] == "promptreg" and cfg["training"]["tasks"] == ["brain", "ct"]
    assert cfg["net"]["num_tasks"] == 2 and cfg["net"]["input_shape"] == [24, 24, 24]
    for name in ("loss.png", "validation.png", "checkpoint.pt"):
        assert (tmp_path / "a" / name).is_file()
    # stopped at step 2 and resumed: the same weights as straight through
    assert invoke("train", "promptreg", "--device", "cpu",
                  "--config", job, "-o", tmp_path / "b", "--iterations", "2").exit_code == 0
    res = invoke("train", "promptreg", "--device", "cpu", "--config", job, "-o", tmp_path / "b", "--resume")
    assert res.exit_code == 0, res.output
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exclude_task_leaves_a_dataset_out(tmp_path):
    _data(tmp_path)
    res = invoke("train", "promptreg", "--config", _job(tmp_path), "-o", tmp_path / "wo", "--exclude-task", "ct",
                 "--iterations", "1", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["tasks"] == ["brain"] and s["datasets"] == ["brain"]
    res = invoke("train", "promptreg", "--config", _job(tmp_path), "-o", tmp_path / "x", "--exclude-task", "lung")
    assert res.exit_code == 7 and "unknown task 'lung'" in res.stderr


@pytest.mark.parametrize("task", ["promptreg", "foundation"])
def test_optron_trains_on_the_refined_field(tmp_path, task):
    """--optron-iters: the loss is the MSE to the refined prediction (both directions for GradICON)."""
    _data(tmp_path)
    if task == "promptreg":
        job = _job(tmp_path)
    else:
        job = tmp_path / "f.yaml"
        job.write_text("data: datasets.yaml\nnet: {input_shape: [36, 36, 36], down_channels: [4, 8, 8, 16], "
                       "up_channels: [4, 4, 8, 8]}\ntrain: {iterations: 2, batch_size: 1, seed: 0}\n")
    res = invoke("train", task, "--config", job, "-o", tmp_path / "o", "--optron-iters", "3", "--iterations", "2",
                 "--json")
    assert res.exit_code == 0, res.output
    hist = json.loads((tmp_path / "o" / "history.json").read_text())["history"]
    assert all(h["loss"] == h["optron_mse"] for h in hist) and "similarity" not in hist[0]
    assert hist[1]["optron_mse"] > 0
    assert json.loads(res.stdout)["optron"]["iters"] == 3


def test_target_prediction_leaves_batch_norm_statistics_alone():
    """Optron's extra forward pass (the target's prediction) runs in train mode, normalising with the batch's
    own statistics like the training pass, but must not count the batch in the running statistics."""
    from regcli.training.optron import running_stats_kept

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3), torch.nn.BatchNorm3d(3)).train()
    x = torch.randn(2, 1, 6, 6, 6) * 3 + 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad(), running_stats_kept(net):
        y = net(x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert float(y.mean((0, 2, 3, 4)).abs().max()) < 1e-5  # batch statistics were used
    net(x)  # an ordinary training pass still updates them
    assert int(net[1].num_batches_tracked) == 1 and not torch.equal(net[1].running_mean, before["1.running_mean"])
