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
    # --device cpu: bit for bit is the CPU's promise; CUDA's grid_sample and cuDNN backwards add with atomics
    res = CliRunner().invoke(app, ["train", "embedding", "--device", "cpu", "--config", str(job), "-o", str(out),
                                   "--json", "--iterations", "4", "--threads", "1"])
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
    res = CliRunner().invoke(app, ["train", "embedding", "--device", "cpu", "--config", str(job), "-o", str(cut),
                                   "--json", "--iterations", "4", "--stop-after", "2", "--threads", "1"])
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


def test_resume_refuses_a_damaged_or_foreign_checkpoint(tmp_path):
    """--resume with a checkpoint.pt that is truncated, not a checkpoint, of another network or holding a state
    that does not fit: one line naming the file, InputError (exit 3) or ConfigError for another network (exit 7),
    never "unexpected ... this is a bug"."""
    import shutil

    job = _setup(tmp_path)
    run = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(run), "--iterations", "2",
                                    "--threads", "1", "-q"]).exit_code == 0
    good = torch.load(run / "checkpoint.pt", weights_only=False)

    def resume(name, damage, config=job, drop_job=False):
        folder = tmp_path / name
        shutil.copytree(run, folder)
        if drop_job:
            (folder / "job.json").unlink()
        damage(folder / "checkpoint.pt")
        res = CliRunner().invoke(app, ["train", "embedding", "--config", str(config), "-o", str(folder), "--resume",
                                       "--threads", "1", "-q"])
        line = one_line(res.stderr)
        assert str(folder / "checkpoint.pt") in line and "bug" not in line, line
        return res.exit_code, line

    code, line = resume("trunc", lambda p: p.write_bytes(p.read_bytes()[:1000]))
    assert code == 3 and line.startswith("InputError: --resume:") and "not a readable regcli checkpoint" in line
    code, line = resume("text", lambda p: p.write_text("garbage\n"))
    assert code == 3 and "not a readable regcli checkpoint" in line
    code, line = resume("old", lambda p: torch.save({k: v for k, v in good.items() if k != "train_state"}, p))
    assert code == 3 and "older regcli" in line
    code, line = resume("state", lambda p: torch.save({**good, "train_state": {**good["train_state"], "rng": 7}}, p))
    assert code == 3 and "not a usable checkpoint" in line
    other = tmp_path / "other.yaml"
    other.write_text(JOB.replace("global_dim: 8", "global_dim: 6"))
    code, line = resume("othernet", lambda p: None, config=other, drop_job=True)
    assert code == 7 and line.startswith("ConfigError:") and "net.global_dim: 8 -> 6" in line
    # tensors that do not fit, under a configuration that does (no "config" recorded)
    code, line = resume("tensors", lambda p: torch.save({**{k: v for k, v in good.items() if k != "config"},
                                                         "state_dict": {"x": torch.zeros(1)}}, p))
    assert code == 7 and "does not fit the job's" in line


def test_pair_and_dio_resume_check_the_checkpoint_before_reading_data(tmp_path):
    """The pair trainers and DIO read checkpoint.pt before any data: a job whose glob matches nothing is refused
    for its checkpoint (exit 3 naming it, or 7 for another network), not after the data are read."""
    nets = {"foundation": "{input_shape: [36, 36, 36], down_channels: [4, 8, 8, 16], up_channels: [4, 4, 8, 8]}",
            "promptreg": "{input_shape: [24, 24, 24], encoder_channels: [4, 8, 8], decoder_channels: [4, 8]}",
            "dio": "{arch: unet, widths: [4, 8, 8, 8], feature_channels: [4, 4, 4]}"}
    jobs = {}
    for task, net in nets.items():
        jobs[task] = tmp_path / f"{task}.yaml"
        jobs[task].write_text(f"data:\n  - glob: nothing/*_T1w.nii.gz\nnet: {net}\ntrain: {{iterations: 3}}\n")
    pairs_job = jobs["foundation"]
    for task, job in jobs.items():
        out = tmp_path / task
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
        res = CliRunner().invoke(app, ["train", task, "--config", str(job), "-o", str(out), "--resume", "-q"])
        line = one_line(res.stderr)
        assert res.exit_code == 3 and str(out / "checkpoint.pt") in line and "not a readable" in line, (task, line)
        torch.save({"config": {}, "state_dict": {}}, out / "checkpoint.pt")  # of another kind of run
        res = CliRunner().invoke(app, ["train", task, "--config", str(job), "-o", str(out), "--resume", "-q"])
        assert res.exit_code == 3 and "not a checkpoint of this kind of run" in one_line(res.stderr), res.output
    out = tmp_path / "foundation"
    torch.save({"config": {"input_shape": [40, 40, 40]}, "state_dict": {}, "optimizer": {}, "generator": None,
                "history": [], "order": [], "step": 1}, out / "checkpoint.pt")
    res = CliRunner().invoke(app, ["train", "foundation", "--config", str(pairs_job), "-o", str(out), "--resume"])
    line = one_line(res.stderr)
    assert res.exit_code == 7 and "holds another network" in line and "net.input_shape" in line, line


def test_out_of_range_recipe_values_are_refused_before_any_output(tmp_path):
    """Reversed or non-positive ranges, bad percentiles and non-integer counts are config errors (exit 7) naming
    the field, before any data are read: no output folder is left behind."""
    _setup(tmp_path)
    cases = {"scale_range": JOB.replace("train: {", "train: {scale_range: [1.25, 0.8], "),
             "gamma_range": JOB.replace("train: {", "train: {gamma_range: [0, 1.5], "),
             "percentiles": JOB.replace("- glob: imgs/*.nii.gz", "- {glob: imgs/*.nii.gz, percentiles: [99, 1]}"),
             "iterations": JOB.replace("iterations: 3", "iterations: true"),
             "checkpoint_every": JOB.replace("checkpoint_every: 2", "checkpoint_every: 2.5")}
    for field, text in cases.items():
        job = tmp_path / f"{field}.yaml"
        job.write_text(text)
        out = tmp_path / f"out_{field}"
        res = CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(out), "--threads", "1"])
        line = one_line(res.stderr)
        assert res.exit_code == 7 and field in line and line.startswith("ConfigError:"), (field, line)
        assert not out.exists()
    from regcli.training.dio import load_dio_job
    from regcli.training.foundation import load_foundation_job

    dio = tmp_path / "dio.yaml"
    for train, match in (("crop: [4, 16, 16]", "train.crop .* larger than the coarsest solver level"),
                         ("crop: [0, 16, 16]", "crop"), ("level_weights: [1, -1, 1]", "level_weights"),
                         ("level_weights: [1, 1]", "one weight per solver level"),
                         ("level_weights: [0, 0, 0]", "positive sum"), ("batch_size: true", "batch_size")):
        dio.write_text(f"data:\n  - glob: imgs/*.nii.gz\ntrain: {{iterations: 3, {train}}}\n")
        with pytest.raises(ConfigError, match=match):
            load_dio_job(dio)
    pairs = tmp_path / "pairs.yaml"
    for train, key in (("iterations: true", "train.iterations"), ("seed: 1.5", "train.seed"),
                       ("optron: {iters: true}", "train.optron.iters"),
                       ("optron: {iters: 10, lncc_window: true}", "train.optron.lncc_window")):
        pairs.write_text(f"data:\n  - glob: imgs/*.nii.gz\ntrain: {{{train}}}\n")
        with pytest.raises(ConfigError, match=key):
            load_foundation_job(pairs)
    pairs.write_text("data:\n  - {glob: imgs/*.nii.gz, label_ids: [true, 2]}\n")
    with pytest.raises(ConfigError, match="label_ids"):
        load_foundation_job(pairs)


def test_a_boolean_for_a_number_anywhere_in_a_job_is_a_config_error_naming_its_key(tmp_path):
    """`true`/`false` for a number (pydantic's lax mode read them as 1 and 0): in the network's `net` section
    (validated by the network's own model: the key is named under `net`), the recipe, a dataset, and a DIO job's
    `solver` (named as that section of the file), one line each."""
    from regcli.training.dio import load_dio_job
    from regcli.training.foundation import load_foundation_job
    from regcli.training.promptreg import load_promptreg_job

    job = tmp_path / "job.yaml"
    data = "data:\n  - glob: imgs/*.nii.gz\n"
    for load, text, key in (
            (load_foundation_job, "net: {input_channels: true}", "net.input_channels"),
            (load_foundation_job, "net: {input_shape: [64, true, 64]}", "net.input_shape"),
            (load_foundation_job, "train: {augment: {rotation_deg: true}}", "train.augment.rotation_deg"),
            (load_promptreg_job, "net: {tau: false}", "net.tau"),
            (load_dio_job, "net: {widths: [8, true, 16]}", "net.widths"),
            (load_dio_job, "train: {learning_rate: true}", "train.learning_rate"),
            (load_dio_job, "solver: {dio: {iterations: [true, 1, 1]}}", "dio.iterations"),
            (load_job, "net: {global_dim: true}", "net.global_dim")):
        job.write_text(data + text + "\n")
        with pytest.raises(ConfigError) as e:
            load(job)
        msg = str(e.value)
        assert f"{key}: Input should be a number, not a boolean" in msg and str(job) in msg and "\n" not in msg, msg
        if "solver" in text:
            assert msg.startswith(f"invalid configuration (training job '{job}', solver): "), msg
    job.write_text("data:\n  - {glob: imgs/*.nii.gz, weight: true}\n")
    with pytest.raises(ConfigError, match=r"data.0.weight: Input should be a number, not a boolean \(true\)"):
        load_foundation_job(job)


def test_anything_but_true_or_false_for_a_switch_in_a_job_is_a_config_error_naming_its_key(tmp_path):
    """A boolean field takes only true/false (pydantic's lax mode read "yes", "off", 1 and 0 as booleans): in the
    network's `net` section and a DIO job's `solver`, one line each; YAML's unquoted yes/no are booleans."""
    from regcli.training.dio import load_dio_job

    job = tmp_path / "job.yaml"
    data = "data:\n  - glob: imgs/*.nii.gz\n"
    for text, key, given in (("net: {normalize: 'yes'}", "net.normalize", "'yes'"),
                             ("net: {normalize: 0}", "net.normalize", "0"),
                             ("solver: {affine: {enabled: 'false'}}", "affine.enabled", "'false'")):
        job.write_text(data + text + "\n")
        with pytest.raises(ConfigError) as e:
            load_dio_job(job)
        msg = str(e.value)
        assert f"{key}: Input should be true or false, not {given}" in msg and "\n" not in msg, msg
    job.write_text(data + "net: {normalize: no}\nsolver: {affine: {enabled: off}}\n")
    loaded = load_dio_job(job)
    assert loaded.net["normalize"] is False and loaded.solver["affine"]["enabled"] is False


def test_checkpoint_errors_fold_the_exception_to_its_first_sentence(tmp_path):
    """Every exception message regcli.training.jobs puts in an error goes through errors.folded (one line, its first
    sentence: torch's go on with advice, which a 160-character cut left half a sentence of)."""
    from regcli.errors import InputError, folded
    from regcli.training.jobs import load_checkpoint, read_checkpoint

    assert folded("a\n\tb. c. d", sentence=True) == "a b." and folded("a.b c", sentence=True) == "a.b c"
    assert folded("x. y", 2, sentence=True) == "x." and folded("x. y") == "x. y"
    ck = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, ck)
    ck.write_bytes(ck.read_bytes()[:1000])
    details = []
    for read in (read_checkpoint, load_checkpoint):
        with pytest.raises(InputError) as e:
            read(ck)
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith("central directory.)") and "miniz" not in msg, msg
        details.append(msg[msg.index("(RuntimeError: "):])
    assert details[0] == details[1]


def test_a_null_in_a_dio_jobs_solver_means_what_it_means_in_a_register_config_file(tmp_path):
    """A DIO job's `solver` (and `validation.solver`) is a RegisterConfig mapping in a file: an explicit null is
    read as in `regcli register --config` (`refine_reg_weight: null`: the same as reg_weight; a null where the key
    takes none: a ConfigError naming it), not dropped like a flag left out (it silently stayed 1.5)."""
    from regcli.config import build_config
    from regcli.training.dio import load_dio_job, register_config, validation_config

    data = "data:\n  - glob: imgs/*.nii.gz\n"
    register_yaml = tmp_path / "register.yaml"
    register_yaml.write_text("instance: {refine_reg_weight: null, refine_smoothing_passes: null}\n")
    assert build_config(register_yaml).instance.refine_reg_weight is None  # what the register command reads
    job = tmp_path / "job.yaml"
    job.write_text(data + "solver: {instance: {refine_reg_weight: null, refine_smoothing_passes: null}}\n"
                   "validation: {data: [{glob: imgs/*.nii.gz}], solver: {instance: {refine_reg_weight: null}}}\n")
    loaded = load_dio_job(job)
    assert register_config(loaded).instance == build_config(register_yaml).instance
    assert validation_config(loaded).instance.refine_reg_weight is None
    val = "validation: {data: [{glob: imgs/*.nii.gz}], solver: %s}"
    for section, text, key in (("solver: %s", "{dio: {iterations: null}}", "dio.iterations"),
                               ("solver: %s", "{instance: null}", "instance"),
                               (val, "{dio: {reg_weight: null}}", "dio.reg_weight")):
        job.write_text(data + section % text + "\n")
        with pytest.raises(ConfigError) as e:
            load_dio_job(job)
        msg = str(e.value)
        assert f"{key}: Input should be a valid" in msg and str(job) in msg and "\n" not in msg, msg
        register_yaml.write_text(text + "\n")  # the same, for regcli register --config
        with pytest.raises(ConfigError, match=f"{key}: Input should be a valid"):
            build_config(register_yaml)


def test_an_output_that_is_a_file_is_refused_before_reading_data(tmp_path):
    """-o naming a file (or a path under one) is an OutputError (exit 6), found before the data are read: the
    job's glob matches nothing, and that is not what is reported."""
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("imgs/*.nii.gz", "nothing/*.nii.gz"))
    pairs_job = tmp_path / "pairs.yaml"
    pairs_job.write_text("data:\n  - glob: nothing/*.nii.gz\ntrain:\n  iterations: 3\n")
    afile = tmp_path / "notadir"
    afile.write_text("x")
    for task, config, out in (("embedding", job, afile), ("embedding", job, afile / "sub"),
                              ("foundation", pairs_job, afile)):
        res = CliRunner().invoke(app, ["train", task, "--config", str(config), "-o", str(out), "--threads", "1"])
        line = one_line(res.stderr)
        assert res.exit_code == 6 and line.startswith("OutputError:") and str(afile) in line, (task, line)
    assert afile.read_text() == "x"


def test_a_train_section_that_is_not_a_mapping_is_refused(tmp_path):
    """`train: 5` was replaced by the defaults (a 2000-step run) when no flag overrode a train key."""
    _setup(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  - glob: imgs/*.nii.gz\ntrain: 5\n")
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(bad), "-o", str(tmp_path / "r")])
    assert res.exit_code == 7 and "train" in res.stderr, res.output
    assert not (tmp_path / "r").exists()


def test_init_given_on_the_command_line_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    """A job file's own `init:` is relative to the job file; `--init m` to where the command runs (it was taken
    from beside the job file when a folder of that name was there too)."""
    from regcli.training.jobs import job_data

    (tmp_path / "jobs" / "m").mkdir(parents=True)
    (tmp_path / "m").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text("data:\n  - glob: x/*.nii.gz\ninit: m\n")
    monkeypatch.chdir(tmp_path)
    assert job_data("jobs/j.yaml")["init"] == str(tmp_path / "jobs" / "m")
    assert job_data("jobs/j.yaml", {"init": "m"})["init"] == "m"


def test_resume_refuses_a_stop_after_below_the_steps_taken(tmp_path):
    job = _setup(tmp_path)
    out = tmp_path / "run"
    base = ["train", "embedding", "--config", str(job), "-o", str(out), "--threads", "1", "--device", "cpu"]
    assert CliRunner().invoke(app, base + ["--iterations", "3"]).exit_code == 0
    before = (out / "job.json").read_text()
    res = CliRunner().invoke(app, base + ["--resume", "--iterations", "4", "--stop-after", "1"])
    assert res.exit_code == 7 and "more than --stop-after 1; give at least 3" in one_line(res.stderr), res.output
    assert (out / "job.json").read_text() == before


def test_a_training_image_the_affine_stage_cannot_align_is_named(tmp_path, monkeypatch):
    """A diverged affine pre-alignment of one training image stopped the job without saying which image."""
    import regcli.solvers.affine as affine_stage
    from regcli.errors import ConvergenceError
    from regcli.training.dio import prepare_subjects
    from regcli.training.pairs import align_to

    imgs = []
    for k in range(2):
        img = make_phantom("LPS", (2.0, 2.0, 2.0))
        imgs.append((str(tmp_path / f"i{k}.nii.gz"), str(tmp_path / f"l{k}.nii.gz")))
        sitk.WriteImage(img, imgs[-1][0])
        sitk.WriteImage(sitk.Cast(img > 0.5, sitk.sitkUInt8), imgs[-1][1])

    def diverge(*a, **k):
        raise ConvergenceError("affine stage (affine/4mm) diverged")

    monkeypatch.setattr(affine_stage, "run_affine_stage", diverge)
    with pytest.raises(ConvergenceError, match=r"aligning training image '.*i1.nii.gz' to '.*i0.nii.gz': affine"):
        align_to(imgs[0][0], imgs[1][0])
    with pytest.raises(ConvergenceError, match=r"aligning training image '.*i1.nii.gz' to the first one"):
        prepare_subjects(imgs, 2.0, (1.0, 99.0), lambda s: None)


def test_a_crop_larger_than_a_training_image_is_refused_before_any_output(tmp_path):
    """An embedding crop larger than a training image (on the network's grid) in every direction was found only
    at the first training steps, after the run's folder and job.json were written."""
    from regcli.training.jobs import load_volumes

    job = _setup(tmp_path)  # 44x40x36 voxels of 1 mm: 29x27x24 on the 1.5 mm training grid
    big = tmp_path / "big.yaml"
    big.write_text(JOB.replace("crop: 20", "crop: 40"))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(big), "-o", str(out), "--threads", "1",
                                   "--device", "cpu"])
    line = one_line(res.stderr)
    assert res.exit_code == 3 and line.startswith("InputError:"), res.output
    assert str(tmp_path / "imgs" / "p0.nii.gz") in line and "29x27x24" in line and "train.crop 40" in line, line
    assert not out.exists()
    # a crop larger than the image along some axes only is a crop of its longest one (e.g. a CT of few slices)
    vols, _ = load_volumes(load_job(job, {"train": {"crop": 29}}))
    assert [v.grid.size for v in vols] == [(29, 27, 24)] * 2


def test_a_label_map_matched_by_an_embedding_glob_is_refused(tmp_path):
    """A glob that also matched the label maps trained on them silently."""
    from conftest import phantom_labels

    job = _setup(tmp_path)
    labels = tmp_path / "imgs" / "p0_labels.nii.gz"
    sitk.WriteImage(phantom_labels(sitk.ReadImage(str(tmp_path / "imgs" / "p0.nii.gz"))), str(labels))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "embedding", "--config", str(job), "-o", str(out), "--threads", "1",
                                   "--device", "cpu"])
    line = one_line(res.stderr)
    assert res.exit_code == 3 and line.startswith("InputError:"), res.output
    assert f"'{labels}' looks like a label map" in line and "4 distinct values" in line and "imgs/*.nii.gz" in line
    assert not out.exists()


# a minimal job of every task (the glob matches nothing: what is checked comes before the data are read)
NOTHING = {"embedding": JOB.replace("imgs/*.nii.gz", "nothing/*.nii.gz"),
           "dio": "data:\n  - glob: nothing/*_T1w.nii.gz\nnet: {arch: unet, widths: [4, 8, 8, 8], feature_channels: "
                  "[4, 4, 4]}\ntrain: {iterations: 3}\n",
           "foundation": "data:\n  - glob: nothing/*.nii.gz\nnet: {input_shape: [36, 36, 36], down_channels: [4, 8, 8, "
                         "16], up_channels: [4, 4, 8, 8]}\ntrain: {iterations: 3}\n",
           "promptreg": "data:\n  - glob: nothing/*.nii.gz\nnet: {input_shape: [24, 24, 24], encoder_channels: [4, 8, "
                        "8], decoder_channels: [4, 8]}\ntrain: {iterations: 3}\n"}


@pytest.mark.parametrize("task", sorted(NOTHING))
def test_output_paths_of_the_wrong_kind_are_refused_before_reading_data(tmp_path, task):
    """A folder where a run writes a file (history.json, checkpoint.tmp, ...) crashed at the first checkpoint
    (exit 1), a file named `model` only after the last step. Now: exit 6 naming the path, before the data are
    read (the job's glob matches nothing, and that is not what is reported), the folder left as it was."""
    job = tmp_path / "job.yaml"
    job.write_text(NOTHING[task])
    cases = {"history.json": "dir", "checkpoint.tmp": "dir", "job.json": "dir", "model": "file",
             "model/config.json": "dir", "model/model.safetensors": "dir"}
    if task in ("foundation", "promptreg"):
        cases["loss.png"] = "dir"
    for k, (name, kind) in enumerate(cases.items()):
        out = tmp_path / f"run{k}"
        out.mkdir()
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if kind == "dir" else path.write_text("x")
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        res = CliRunner().invoke(app, ["train", task, "--config", str(job), "-o", str(out), "--threads", "1"])
        line = one_line(res.stderr)
        what = "is a folder" if kind == "dir" else "is not a folder"
        assert res.exit_code == 6 and line.startswith(f"OutputError: '{path}' {what}"), (task, name, line)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # --resume with a folder for the checkpoint: named as a folder (it was "does not exist")
    out = tmp_path / "resume"
    (out / "checkpoint.pt").mkdir(parents=True)
    res = CliRunner().invoke(app, ["train", task, "--config", str(job), "-o", str(out), "--resume", "-q"])
    line = one_line(res.stderr)
    assert res.exit_code == 6 and f"'{out / 'checkpoint.pt'}' is a folder" in line, line


def test_an_output_folder_that_cannot_be_written_is_refused_at_once(tmp_path, monkeypatch):
    """An existing but read-only output folder was found only once the data were read (writing job.json). The
    test runs as any user (root may write anywhere), so the permission is faked."""
    import os

    from regcli.errors import OutputError
    from regcli.training.jobs import start_run

    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(out) else real(p, mode, **kw))
    with pytest.raises(OutputError, match=f"output folder '{out}' is not writable"):
        start_run(out, resume=False)
