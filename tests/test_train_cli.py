"""`regcli train embedding`: job files, outputs, errors."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import make_phantom, one_line
from regcli.cli.app import app
from regcli.errors import ConfigError
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet
from regcli.training.jobs import load_job

JOB = """
data:
  - glob: imgs/*.nii.gz
net: {widths: [4, 8, 8, 12], global_dim: 8, local_dim: 8, context_dilations: [1, 2], spacing_mm: 1.5}
train: {iterations: 3, batch_pairs: 1, crop: 20, points: 32, max_shift_mm: 8.0, hard_negatives: 16,
        exclude_mm: [8.0, 3.0]}
checkpoint_every: 2
"""


def _setup(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i, d in enumerate(("LPS", "oblique15")):
        sitk.WriteImage(make_phantom(d, "iso", size=(44, 40, 36)), str(tmp_path / "imgs" / f"p{i}.nii.gz"))
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    return job


def test_train_embedding_writes_a_loadable_checkpoint(tmp_path):
    job = _setup(tmp_path)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(out), "--json",
                                   "--iterations", "4", "--threads", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 4 and summary["volumes"] == 2
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    net = EmbeddingNet(EmbeddingConfig.model_validate(ck["config"]))
    net.load_state_dict(ck["state_dict"])
    hist = json.loads((out / "history.json").read_text())["history"]
    assert [h["iteration"] for h in hist] == [1, 2, 3, 4]
    assert json.loads((out / "job.json").read_text())["train"]["iterations"] == 4
    from regcli.models.embedding import load_embedding

    loaded = load_embedding(str(out / "model"))  # the Hub-layout folder, checksum verified
    assert torch.equal(loaded.state_dict()["global_head.weight"], net.state_dict()["global_head.weight"])
    assert "Training data" in (out / "model" / "README.md").read_text()

    # --stop-after: the same job ended early (its schedule still spans the 4 iterations), recorded in job.json
    cut = tmp_path / "cut"
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(cut), "--json",
                                   "--iterations", "4", "--stop-after", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["iterations"] == 2
    assert json.loads((cut / "history.json").read_text())["history"] == hist[:2]
    assert json.loads((cut / "job.json").read_text())["train"]["stop_after"] == 2


def test_job_errors_are_one_line(tmp_path):
    job = _setup(tmp_path)
    with pytest.raises(ConfigError, match="invalid training job"):
        load_job(job, {"train": {"iterations": 0}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.replace("imgs/*.nii.gz", "nothing/*.nii.gz"))
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(bad), "-o", str(tmp_path / "r")])
    assert res.exit_code == 3 and "matches no file" in res.output
    assert not (tmp_path / "r").exists()  # refused for its data: no folder, no job.json
    # the same for the pair networks, and no "training: started" line before the refusal
    pairs_job = tmp_path / "pairs.yaml"
    pairs_job.write_text("data:\n  - glob: nothing/*.nii.gz\ntrain:\n  iterations: 3\n")
    for task in ("foundation", "promptreg"):
        res = CliRunner().invoke(app, ["train", task, "--config", str(pairs_job), "-o", str(tmp_path / task),
                                       "--threads", "1"])
        assert res.exit_code == 3 and "nothing/*.nii.gz" in res.output, (task, res.output)
        assert "started" not in res.output and not (tmp_path / task).exists()


def test_a_job_can_start_from_an_earlier_run(tmp_path):
    job = _setup(tmp_path)
    first = tmp_path / "run1"
    assert CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(first), "--iterations",
                                    "2", "--quiet"]).exit_code == 0
    follow = tmp_path / "job2.yaml"
    follow.write_text(JOB + "init: run1/checkpoint.pt\n")
    j = load_job(follow, {"train": {"iterations": 1, "learning_rate": 1e-9}})
    from regcli.training.jobs import run_embedding_job

    run_embedding_job(j, tmp_path / "run2")
    a = torch.load(first / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert torch.allclose(a["global_head.weight"], b["global_head.weight"], atol=1e-6)  # continued, not re-initialised
    bad = tmp_path / "job3.yaml"
    bad.write_text(JOB.replace("global_dim: 8", "global_dim: 6") + "init: run1/checkpoint.pt\n")
    with pytest.raises(ConfigError, match="another network configuration"):
        run_embedding_job(load_job(bad), tmp_path / "run3")


def test_sam_rho_flag_is_recorded_and_changes_the_weights(tmp_path):
    """--sam-rho: sharpness-aware steps (two passes each), recorded in job.json, the summary and the history;
    a negative value is a one-line usage error."""
    job = _setup(tmp_path)
    runs = {}
    for rho in ("0", "0.05"):
        out = tmp_path / f"rho{rho}"
        res = CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(out), "--json",
                                       "--iterations", "2", "--sam-rho", rho, "--threads", "1"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["sam_rho"] == float(rho)
        assert json.loads((out / "job.json").read_text())["train"]["sam_rho"] == float(rho)
        runs[rho] = (torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"],
                     json.loads((out / "history.json").read_text())["history"])
    (plain, plain_hist), (sam, sam_hist) = runs["0"], runs["0.05"]
    assert not all(torch.equal(plain[k], sam[k]) for k in plain)
    assert sam_hist[0]["loss"] == plain_hist[0]["loss"]  # the same first loss: both start at the same weights
    assert all("sam_loss" in h for h in sam_hist) and not any("sam_loss" in h for h in plain_hist)
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(tmp_path / "neg"),
                                   "--sam-rho", "-0.1"])
    assert res.exit_code == 2 and "--sam-rho" in one_line(res.stderr), res.output
    with pytest.raises(ConfigError, match="sam_rho"):
        load_job(job, {"train": {"sam_rho": -1}})


def test_resume_refuses_a_changed_job_but_may_run_further(tmp_path):
    """--resume continues the run its folder holds: another learning rate would make job.json misstate the steps
    taken, so it is refused; running further (--iterations) is what resume is for."""
    job = _setup(tmp_path)
    out = tmp_path / "run"
    args = ["train", "embedding", "-o", str(out), "--threads", "1"]
    assert CliRunner().invoke(app, [*args, "--config", str(job), "--iterations", "2"]).exit_code == 0
    other = tmp_path / "other.yaml"
    other.write_text(JOB.replace("train: {", "train: {learning_rate: 0.05, "))
    res = CliRunner().invoke(app, [*args, "--config", str(other), "--resume", "--iterations", "3"])
    assert res.exit_code == 7 and "train.learning_rate" in res.output and "--resume" in res.output, res.output
    assert json.loads((out / "job.json").read_text())["train"]["iterations"] == 2  # the record is untouched
    res = CliRunner().invoke(app, [*args, "--config", str(job), "--resume", "--iterations", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["iterations"] == 3
    # fewer iterations than the steps taken would make job.json and the model card claim 1 step for 3
    res = CliRunner().invoke(app, [*args, "--config", str(job), "--resume", "--iterations", "1"])
    assert res.exit_code == 7 and "3 steps" in one_line(res.output), res.output
    assert json.loads((out / "job.json").read_text())["train"]["iterations"] == 3
