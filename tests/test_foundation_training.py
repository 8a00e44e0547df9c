"""``regcli train foundation``: data preparation, balanced sampling, checkpoints and resume, SAM, fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import invoke, make_phantom, write
from regcli.models.gradicon import GradICONConfig, GradICONNet, save_gradicon_model
from regcli.training.pairs import Augment, epoch_order, prepare_volume, random_affine

NET = "net: {input_shape: [20, 20, 20], down_channels: [4, 8, 8], up_channels: [4, 4, 8]}\n"


def _data(tmp_path):
    """Two phantom 'subjects' (MRI-like), a CT-like one, and a pairs CSV of one intra-subject pair (each aligned
    image costs an affine registration in every training run: as few as the sampling logic needs)."""
    for k, shift in enumerate(([0, 0, 0], [2, -1, 0])):
        write(make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p, s=np.array(shift): p + s),
              tmp_path / f"sub-{k}_T1w.nii.gz")
    ct = make_phantom("oblique15", (2.0, 2.0, 3.0))
    arr = sitk.GetArrayFromImage(ct) * 1500 - 1000
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.CopyInformation(ct)
    write(img, tmp_path / "ct.nii.gz")
    (tmp_path / "pairs.csv").write_text("fixed_image,moving_image\nsub-0_T1w.nii.gz,sub-1_T1w.nii.gz\n")


def _job(tmp_path, train="", extra="") -> str:
    text = ("data:\n  - {name: brain, glob: sub-*_T1w.nii.gz}\n  - {name: ct, glob: ct.nii.gz, modality: ct}\n"
            "  - {name: pairs, pairs: pairs.csv}\n" + NET +
            f"train: {{iterations: 3, batch_size: 2, seed: 1{', ' + train if train else ''}}}\ncheckpoint_every: 2\n"
            + extra)
    (tmp_path / "job.yaml").write_text(text)
    return str(tmp_path / "job.yaml")


def test_prepare_volume_resizes_the_whole_field_of_view(tmp_path):
    _data(tmp_path)
    v = prepare_volume(str(tmp_path / "ct.nii.gz"), "ct", (36, 36, 36))
    assert v.shape == (1, 36, 36, 36) and float(v.min()) >= 0 and float(v.max()) <= 1
    # the phantom body (-550 HU: 0.225) sits in the middle of the field of view, air (0) at the corners
    assert float(v[0, 18, 18, 18]) > 0.2 and float(v[0, 0, 0, 0]) == 0.0


def test_epochs_are_balanced_and_augmentation_is_seeded():
    g = torch.Generator().manual_seed(0)
    order = epoch_order(3, 4, g)
    assert sorted(order) == [0] * 4 + [1] * 4 + [2] * 4 and order != sorted(order)
    x = torch.rand(1, 12, 12, 12)
    assert torch.equal(random_affine(x, Augment(prob=0.0), g), x)
    a = random_affine(x, Augment(prob=1.0), torch.Generator().manual_seed(5))
    b = random_affine(x, Augment(prob=1.0), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_train_foundation_checkpoints_resumes_and_writes_a_model(tmp_path):
    _data(tmp_path)
    job = _job(tmp_path)
    straight = tmp_path / "straight"
    # --device cpu: bit for bit is the CPU's promise; CUDA's grid_sample and cuDNN backwards add with atomics
    res = invoke("train", "foundation", "--device", "cpu", "--config", job, "-o", straight, "--quiet", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["datasets"] == ["brain", "ct", "pairs"] and summary["iterations"] == 3
    hist = json.loads((straight / "history.json").read_text())["history"]
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) and "inverse_consistency" in h for h in hist)
    assert all(len(h["datasets"]) == 2 for h in hist)
    assert (straight / "loss.png").stat().st_size > 1000
    cfg = json.loads((straight / "model" / "config.json").read_text())
    assert cfg["architecture"] == "gradicon-multistep" and cfg["net"]["input_shape"] == [20, 20, 20]
    assert cfg["training"]["summary"]["iterations"] == 3
    # the trained folder registers with --method foundation
    out = tmp_path / "reg"
    out.mkdir()
    (tmp_path / "c.yaml").write_text(f"foundation: {{weights: {straight / 'model'}}}\n")
    res = invoke("register", tmp_path / "sub-0_T1w.nii.gz", tmp_path / "sub-1_T1w.nii.gz", "-o", f"{out}/p_",
                 "--method", "foundation", "--config", tmp_path / "c.yaml", "--no-html")
    assert res.exit_code == 0, res.output
    # 2 steps, then --resume to 3: the same weights as 3 straight steps
    part = tmp_path / "part"
    assert invoke("train", "foundation", "--device", "cpu",
                  "--config", job, "-o", part, "--iterations", "2", "--quiet").exit_code == 0
    res = invoke("train", "foundation", "--device", "cpu", "--config", job, "-o", part, "--resume", "--quiet")
    assert res.exit_code == 0, res.output
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    res = invoke("train", "foundation", "--device", "cpu", "--config", job, "-o", straight, "--quiet")
    assert res.exit_code == 6 and "--resume" in res.output  # an output that exists, as register's


def test_sam_and_fine_tuning_from_a_model_folder(tmp_path):
    _data(tmp_path)
    torch.manual_seed(3)
    start = GradICONNet(GradICONConfig(input_shape=(36, 36, 36), down_channels=(4, 8, 8, 16),
                                       up_channels=(4, 4, 8, 8), last_step=False))
    save_gradicon_model(start, tmp_path / "start", "# start")
    job = _job(tmp_path)
    res = invoke("train", "foundation", "--config", job, "-o", tmp_path / "ft", "--init", tmp_path / "start",
                 "--iterations", "2", "--sam-rho", "0.05", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sam_rho"] == 0.05
    hist = json.loads((tmp_path / "ft" / "history.json").read_text())["history"]
    assert all("sam_loss" in h for h in hist)
    cfg = json.loads((tmp_path / "ft" / "model" / "config.json").read_text())
    assert cfg["net"]["last_step"] is False  # the initial model's architecture, not the job's net
    trained = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["state_dict"]
    assert set(trained) == set(start.state_dict())
    assert not all(torch.equal(trained[k], v) for k, v in start.state_dict().items())


@pytest.mark.parametrize("text, message", [
    ("data:\n  - {name: x, glob: nothing-*.nii.gz}\n" + NET, "matches no file"),
    ("data:\n  - {name: x}\n" + NET, "needs a glob of images or a pairs CSV"),
    ("data:\n  - {name: x, pairs: missing.csv}\n" + NET, "does not exist"),
    ("data:\n  - {name: x, glob: a.nii.gz}\nnet: {input_shape: [20, 20, 20]}\n", "at least 65 voxels"),
])
def test_bad_jobs_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "job.yaml").write_text(text)
    res = invoke("train", "foundation", "--config", tmp_path / "job.yaml", "-o", tmp_path / "o")
    assert res.exit_code in (3, 7) and message in res.output
