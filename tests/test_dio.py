"""DIO method (regcli.methods.dio): features x swappable solver, implicit training, prompts through the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import invoke, make_phantom, one_line, phantom_labels, phantom_mask
from regcli.config import build_config
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image


def _img(direction="oblique15", transform=None, spacing=(2.0, 2.0, 2.0)):
    f = make_phantom(direction, spacing, transform=transform)
    return Image(torch.from_numpy(sitk.GetArrayFromImage(f).astype(np.float32)), Grid.from_sitk(f)), f


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from regcli.models.dio import DioFeatureNet, DioNetConfig, save_dio_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-dio"
    net = DioFeatureNet(DioNetConfig(arch="unet", widths=(4, 8, 8, 8), feature_channels=(4, 4, 4)))
    save_dio_model(net, folder, "# tiny test model\n", training={"note": "untrained"})
    return folder


def _cfg(model_dir=None, **over):
    dio = {"iterations": [20, 10, 5]}
    if model_dir is None:
        dio["features"] = "intensity"
    else:
        dio["weights"] = str(model_dir)
    base = {"method": "dio", "dio": dio}
    for k, v in over.items():
        base.setdefault(k, {}).update(v) if isinstance(v, dict) else base.__setitem__(k, v)
    return build_config(None, base)


def test_dio_recovers_a_translation_in_world_space():
    """Intensity features, freeform solver: a 3 mm shift of an oblique phantom comes out as u = -t in LPS mm."""
    from regcli.methods.dio import dio

    t = np.array([3.0, -2.0, 0.0])
    fixed, f = _img()
    moving, _ = _img(transform=lambda p: p + t)
    cfg = _cfg(dio={"iterations": [60, 30, 10], "reg_weight": 0.1})
    calls = []
    res = dio(fixed, moving, cfg, progress=lambda s, i, n: calls.append(s))
    assert res.field.grid == fixed.grid and torch.isfinite(res.field.disp).all()
    u = res.field.disp.permute(1, 2, 3, 0).numpy()[phantom_mask(f, erode=3)]
    assert np.abs(np.median(u, 0) + t).max() < 1.0, np.median(u, 0)
    assert {"DIO features", "DIO solver, level 4", "DIO solver, level 1"} <= set(calls)


@pytest.mark.parametrize("transform", ["freeform", "svf", "greedy", "bspline", "affine"])
def test_every_transform_model_is_a_test_time_swap(model_dir, transform):
    """The same (network) features registered by each solver: all improve the label overlap, none folds
    where diffeomorphic."""
    from regcli.methods.dio import dio
    from regcli.reports.jacobian import jacobian_determinant
    from regcli.reports.metrics import dice_mean
    from regcli.resample import warp

    fixed, f = _img("LPS")
    moving, m = _img("LPS", transform=lambda p: p + np.array([2.0, 0.0, -2.0]) + 0.06 * np.roll(p, 1, axis=-1))
    cfg = _cfg(dio={"features": "intensity"}, instance={"transform": transform})
    res = dio(fixed, moving, cfg)
    lab_f = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(f)).astype(np.int32)), fixed.grid)
    lab_m = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(m)).astype(np.int32)), moving.grid)
    before = dice_mean(lab_f, lab_m)
    after = dice_mean(lab_f, warp(lab_m, res.field, fixed.grid, "nearest"))
    assert after > before + 0.03, (before, after)
    if transform in ("svf", "greedy", "affine"):
        assert float(jacobian_determinant(res.field).min()) > 0


def test_network_features_and_report_provenance(model_dir, tmp_path):
    fixed_img = make_phantom("LPS", (2.0, 2.0, 2.0))
    moving_img = make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p: p + np.array([2.0, 0, 0]))
    fp, mp = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    sitk.WriteImage(fixed_img, str(fp))
    sitk.WriteImage(moving_img, str(mp))
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(f"dio: {{weights: '{model_dir}', iterations: [5, 5, 2]}}\n")
    res = invoke("register", fp, mp, "-o", tmp_path / "out_", "--method", "dio", "--config", cfgp,
                 "--transform", "svf", "--no-html", "--quiet")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "out_Report.json").read_text())
    assert rep["config"]["instance"]["transform"] == "svf"
    models = rep["extra"]["models"]
    assert models and models[0]["role"] == "DIO feature network" and models[0]["sha256"]


def test_missing_dio_weights_fail_before_any_work(tmp_path):
    f = tmp_path / "f.nii.gz"
    sitk.WriteImage(make_phantom("LPS", (2.0, 2.0, 2.0)), str(f))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dio: {weights: no-such-model}\n")
    res = invoke("register", f, f, "-o", tmp_path / "out_", "--method", "dio", "--config", cfg, "--quiet")
    assert res.exit_code == 8 and "no-such-model" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "f.nii.gz"]


def test_jfb_gradient_reaches_the_network_and_ignores_solver_length(model_dir):
    """One training step: every network parameter gets a finite gradient, and the autograd graph does not grow
    with the number of solver iterations (the solver runs on detached features)."""
    from regcli.models.dio import DioFeatureNet, DioNetConfig
    from regcli.training.dio import DioTrainConfig, train_step

    fixed, f = _img("LPS")
    moving, m = _img("LPS", transform=lambda p: p + np.array([2.0, 0.0, 0.0]))
    lf = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(f)).astype(np.int64)), fixed.grid)
    lm = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(m)).astype(np.int64)), moving.grid)

    def graph_size(iters):
        torch.manual_seed(0)
        net = DioFeatureNet(DioNetConfig(arch="unet", widths=(4, 8, 8, 8), feature_channels=(4, 4, 4)))
        cfg = build_config(None, {"method": "dio", "dio": {"iterations": [iters] * 3}})
        loss, parts = train_step(net, fixed, moving, lf, lm, cfg, DioTrainConfig())
        seen, stack = set(), [loss.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            stack.extend(nf for nf, _ in fn.next_functions)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        assert any(float(p.grad.abs().sum()) > 0 for p in net.parameters())
        assert 0 < parts["dice1"] <= 1
        return len(seen)

    assert graph_size(2) == graph_size(12)


def test_level_weights_pick_the_levels_the_loss_is_taken_at(model_dir):
    from regcli.errors import ConfigError
    from regcli.models.dio import DioFeatureNet, DioNetConfig
    from regcli.training.dio import DioTrainConfig, train_step

    fixed, f = _img("LPS")
    moving, m = _img("LPS", transform=lambda p: p + np.array([2.0, 0.0, 0.0]))
    lf = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(f)).astype(np.int64)), fixed.grid)
    lm = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(m)).astype(np.int64)), moving.grid)
    torch.manual_seed(0)
    net = DioFeatureNet(DioNetConfig(arch="unet", widths=(4, 8, 8, 8), feature_channels=(4, 4, 4)))
    cfg = build_config(None, {"method": "dio", "dio": {"iterations": [5, 5, 5]}})
    _, every = train_step(net, fixed, moving, lf, lm, cfg, DioTrainConfig(image_weight=0))
    loss, finest = train_step(net, fixed, moving, lf, lm, cfg, DioTrainConfig(image_weight=0,
                                                                               level_weights=(0, 0, 1)))
    assert set(finest) == {"dice1", "loss"} and finest["dice1"] == pytest.approx(every["dice1"])
    assert finest["loss"] == pytest.approx(1 - finest["dice1"], abs=1e-6)
    loss.backward()
    coarse = net.heads["4"].weight.grad  # the level-4 head feeds only the level-4 loss, weighted 0
    assert coarse is None or float(coarse.abs().sum()) == 0
    assert float(net.heads["1"].weight.grad.abs().sum()) > 0
    with pytest.raises(ConfigError, match="level_weights"):
        train_step(net, fixed, moving, lf, lm, cfg, DioTrainConfig(level_weights=(1, 1)))


def _labelled_subjects(tmp_path, n=3):
    paths = []
    for k in range(n):
        shift = np.array([1.5 * k, -1.0 * k, 0.5 * k])
        img = make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p, s=shift: p + s)
        ip = tmp_path / f"sub-{k}_T1w.nii.gz"
        sitk.WriteImage(img, str(ip))
        sitk.WriteImage(phantom_labels(img), str(tmp_path / f"sub-{k}_labels.nii.gz"))
        paths.append(ip)
    return paths


def _tiny_job(train: str, extra: str = "") -> str:
    """A 3-step training job on the phantom subjects of :func:`_labelled_subjects`, a tiny network and solver."""
    return ("data:\n  - glob: sub-*_T1w.nii.gz\n"
            "net: {arch: unet, widths: [4, 8, 8, 8], feature_channels: [4, 4, 4]}\n"
            f"train: {{iterations: 3, crop: [16, 16, 16], {train}, seed: 1}}\n"
            "solver: {dio: {iterations: [4, 3, 2]}}\ncheckpoint_every: 2\n" + extra)


def test_train_dio_cli_checkpoints_and_resumes_bit_for_bit(tmp_path):
    _labelled_subjects(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(_tiny_job("synth_prob: 0.5"))
    straight = tmp_path / "straight"
    # --device cpu: bit for bit is the CPU's promise; CUDA's grid_sample and cuDNN backwards add with atomics
    res = invoke("train", "dio", "--device", "cpu", "--config", job, "-o", straight, "--quiet", "--json")
    assert res.exit_code == 0, res.output
    hist = json.loads((straight / "history.json").read_text())["history"]
    assert len(hist) == 3 and all(np.isfinite(h["loss"]) for h in hist)
    assert (straight / "model" / "model.safetensors").is_file()
    # an interrupted run (2 steps) resumed to 3 gives the same weights
    part = tmp_path / "part"
    assert invoke("train", "dio", "--device", "cpu",
                  "--config", job, "-o", part, "--iterations", "2", "--quiet").exit_code == 0
    again = invoke("train", "dio", "--device", "cpu", "--config", job, "-o", part, "--resume", "--quiet")
    assert again.exit_code == 0, again.output
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(part / "checkpoint.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a second run into the same folder without --resume is refused
    res = invoke("train", "dio", "--device", "cpu", "--config", job, "-o", straight, "--quiet")
    assert res.exit_code == 6 and "--resume" in res.output  # an output that exists


def test_train_dio_with_sam_resumes_bit_for_bit(tmp_path):
    """--sam-rho: each step takes the loss again, on the same pair and crop, at the perturbed weights (history
    sam_loss); the checkpoint holds the optimizer through the SAM wrapper, so an interrupted run resumes exactly."""
    _labelled_subjects(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(_tiny_job("synth_prob: 0.5"))
    straight = tmp_path / "straight"
    res = invoke("train", "dio", "--device", "cpu",
                 "--config", job, "-o", straight, "--sam-rho", "0.05", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sam_rho"] == 0.05
    hist = json.loads((straight / "history.json").read_text())["history"]
    assert len(hist) == 3 and all(np.isfinite(h["sam_loss"]) and h["sam_loss"] != h["loss"] for h in hist)
    part = tmp_path / "part"
    assert invoke("train", "dio", "--device", "cpu",
                  "--config", job, "-o", part, "--iterations", "2", "--sam-rho", "0.05",
                  "--quiet").exit_code == 0
    again = invoke("train", "dio", "--device", "cpu",
                   "--config", job, "-o", part, "--resume", "--sam-rho", "0.05", "--quiet")
    assert again.exit_code == 0, again.output
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert [h["sam_loss"] for h in a["history"]] == [h["sam_loss"] for h in b["history"]]


def test_train_dio_validates_whole_volumes_and_keeps_the_best_checkpoint(tmp_path):
    """validation: held-out pairs are registered whole at steps 0, every N and the last; history.json records
    them, model/ holds the best-scoring step's weights, and a resumed run validates exactly as a straight one."""
    from regcli.models.dio import load_dio

    paths = _labelled_subjects(tmp_path, 5)
    val = tmp_path / "val"
    val.mkdir()
    for p in paths[3:]:  # subjects 3 and 4 are held out
        for q in (p, p.parent / p.name.replace("_T1w", "_labels")):
            q.rename(val / q.name)
    job = tmp_path / "job.yaml"
    job.write_text(_tiny_job("learning_rate: 0.01",
                             "validation: {data: [{glob: val/sub-*_T1w.nii.gz}], every: 2, contrasts: [real, moving],\n"
                             "             solver: {dio: {iterations: [4, 3, 2]}}}\n"))
    out = tmp_path / "run"
    res = invoke("train", "dio", "--device", "cpu", "--config", job, "-o", out, "--quiet", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)["validation"]
    records = json.loads((out / "history.json").read_text())["validation"]
    assert [r["step"] for r in records] == [0, 2, 3]
    assert all(len(r["pairs"]) == 2 and 0.3 < r["dice"] <= 1 and set(r["contrasts"]) == {"real", "moving"}
               for r in records)
    assert all(r["dice"] == pytest.approx(sum(r["pairs"]) / 2) for r in records)
    best = max(records, key=lambda r: r["dice"])
    assert summary["best_step"] == best["step"] == summary["model_step"]
    assert summary["start_dice"] == records[0]["dice"]
    # model/ holds the best step: validating it again gives the best score (the solver is deterministic)
    from regcli.training.dio import labelled_files, load_dio_job, prepare_subjects, validate, validation_config

    loaded = load_dio_job(job)
    net = load_dio(str(out / "model"))
    # the held-out subjects as training prepared them: each aligned to the template (the first training image) on
    # its grid; the other training images are not needed for that
    subjects, work = prepare_subjects(labelled_files(loaded.data)[:1] + labelled_files(loaded.validation.data), 2.0,
                                      net.cfg.percentiles)
    held_out = subjects[1:]
    assert [s.name for s in held_out] == ["sub-3_T1w.nii.gz", "sub-4_T1w.nii.gz"]
    again = validate(net, held_out, work, validation_config(loaded), ("real", "moving"), 1)
    assert again["dice"] == pytest.approx(best["dice"], abs=1e-6)
    # the same image as fixed and moving: the identity is the optimum, Dice 1; a synthetic contrast of the same
    # subject as moving image still overlaps well
    same = validate(net, [held_out[0], held_out[0]], work, validation_config(loaded), ("real", "moving"))
    assert same["contrasts"]["real"] == pytest.approx(1.0, abs=0.02) and same["contrasts"]["moving"] > 0.8
    # interrupted after 2 steps and resumed: the same validation records
    part = tmp_path / "part"
    assert invoke("train", "dio", "--device", "cpu",
                  "--config", job, "-o", part, "--iterations", "2", "--quiet").exit_code == 0
    assert invoke("train", "dio", "--device", "cpu", "--config", job, "-o", part, "--resume", "--quiet").exit_code == 0
    resumed = json.loads((part / "history.json").read_text())["validation"]
    assert [(r["step"], r["dice"]) for r in resumed] == [(r["step"], r["dice"]) for r in records]
    # too few held-out images is a one-line error
    bad = tmp_path / "bad.yaml"
    bad.write_text(job.read_text().replace("val/sub-*_T1w", "val/sub-3_T1w"))
    res = invoke("train", "dio", "--config", bad, "-o", tmp_path / "bad", "--quiet")
    assert res.exit_code != 0 and "validation needs at least two" in res.output


def test_label_prompt_through_the_cli_raises_the_prompted_dice(tmp_path):
    """--prompt-labels: a structure the image does not show (label 3 shifted in the moving label map only) is
    pulled into place by the prompt; without it the registration does not see it."""
    fixed_img = make_phantom("LPS", (2.0, 2.0, 2.0))
    fp, mp = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    sitk.WriteImage(fixed_img, str(fp))
    sitk.WriteImage(fixed_img, str(mp))
    lf = phantom_labels(fixed_img)
    arr = sitk.GetArrayFromImage(lf)
    moved = np.where(arr == 3, 0, arr)
    moved[np.roll(arr == 3, 3, axis=2)] = 3  # label 3 three voxels (6 mm) away in the moving map only
    lm = sitk.GetImageFromArray(moved.astype(np.uint8))
    lm.CopyInformation(lf)
    flp, mlp = tmp_path / "fl.nii.gz", tmp_path / "ml.nii.gz"
    sitk.WriteImage(lf, str(flp))
    sitk.WriteImage(lm, str(mlp))
    common = ["register", fp, mp, "--method", "convexadam", "--fixed-labels", flp, "--moving-labels", mlp,
              "--no-html", "--quiet", "--no-affine"]
    plain = invoke(*common, "-o", tmp_path / "a_")
    prompted = invoke(*common, "-o", tmp_path / "b_", "--prompt-labels", "3")
    assert plain.exit_code == 0 and prompted.exit_code == 0, prompted.output
    d0 = json.loads((tmp_path / "a_Report.json").read_text())["metrics"]["dice_per_label"]["3"]
    d1 = json.loads((tmp_path / "b_Report.json").read_text())["metrics"]["dice_per_label"]["3"]
    assert d1 > d0 + 0.1, (d0, d1)


def test_wrong_prompt_label_ids_are_refused_before_the_affine_stage(tmp_path, monkeypatch):
    """A --prompt-labels id absent from a label map is the same one-line InputError (exit 3) as before, but found
    in the pre-flight: the affine stage never runs, and nothing is written."""
    import regcli.solvers.affine

    fixed_img = make_phantom("LPS", (2.0, 2.0, 2.0))
    fp, flp = tmp_path / "f.nii.gz", tmp_path / "fl.nii.gz"
    sitk.WriteImage(fixed_img, str(fp))
    sitk.WriteImage(phantom_labels(fixed_img), str(flp))

    def affine_ran(*args, **kwargs):
        raise AssertionError("the affine stage ran")

    monkeypatch.setattr(regcli.solvers.affine, "run_affine_stage", affine_ran)
    for method in ("dio", "convexadam"):
        res = invoke("register", fp, fp, "-o", tmp_path / "o_", "--method", method, "--fixed-labels", flp,
                     "--moving-labels", flp, "--prompt-labels", "2,9", "--quiet")
        assert res.exit_code == 3, (method, res.output)
        assert one_line(res.stderr) == (f"InputError: label prompt: label ids 9 not in fixed '{flp}'; "
                                        f"9 not in moving '{flp}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nii.gz", "fl.nii.gz"]


def test_prompts_need_their_inputs(tmp_path):
    f = tmp_path / "f.nii.gz"
    sitk.WriteImage(make_phantom("LPS", (2.0, 2.0, 2.0)), str(f))
    res = invoke("register", f, f, "-o", tmp_path / "o_", "--prompt-labels", "1", "--quiet")
    assert res.exit_code == 3 and "--fixed-labels" in res.output
    res = invoke("register", f, f, "-o", tmp_path / "o_", "--prompt-labels", "x,1", "--quiet")
    assert res.exit_code != 0 and "prompt-labels" in res.output
    # a prompt from --config is named by its key, one from the flag by the flag
    from_config = tmp_path / "prompts.yaml"
    from_config.write_text("prompts: {labels: [1]}\n")
    res = invoke("register", f, f, "-o", tmp_path / "o_", "--config", from_config, "--quiet")
    assert res.exit_code == 3 and one_line(res.stderr).startswith("InputError: prompts.labels needs both"), res.stderr
    res = invoke("register", f, f, "-o", tmp_path / "o_", "--config", from_config, "--prompt-labels", "1", "--quiet")
    assert res.exit_code == 3 and one_line(res.stderr).startswith("InputError: --prompt-labels needs both")
    from_config.unlink()
    res = invoke("register", f, f, "-o", tmp_path / "o_", "--method", "affine", "--prompt-landmarks", "--quiet")
    assert res.exit_code == 7
    # a configuration without instance optimisation would ignore them: refused, not reported as prompted
    no_io = tmp_path / "no_io.yaml"
    no_io.write_text("instance:\n  enabled: false\n")
    no_iterations = tmp_path / "no_iterations.yaml"
    no_iterations.write_text("instance: {iterations: 0, refine_iterations: 0}\n"
                             "samconvex: {io_iterations: 0, refine_iterations: 0}\n")
    for flags in (("--method", "foundation", "--io", "none"), ("--method", "foundation", "--io", "network"),
                  ("--method", "promptreg", "--io", "none"), ("--method", "convexadam", "--config", no_io),
                  ("--method", "convexadam", "--config", no_iterations),
                  ("--method", "samconvex", "--config", no_iterations), ("--method", "dio", "--iterations", "0x0x0"),
                  ("--method", "foundation", "--iterations", "0"), ("--method", "promptreg", "--iterations", "0")):
        for prompt in (("--prompt-labels", "1"), ("--prompt-landmarks",)):
            res = invoke("register", f, f, "-o", tmp_path / "o_", *flags, *prompt, "--quiet")
            line = one_line(res.stderr)
            assert res.exit_code == 7 and line.startswith(f"ConfigError: prompts ({prompt[0]}) "), (flags, line)
            assert "nothing would use them" in line and f"--method {flags[1]}" in line, (flags, line)
            assert not list(tmp_path.glob("o_*")), (flags, list(tmp_path.glob("o_*")))
    # --modality and --io only matter to the network methods: with another method they are refused, not ignored
    for flags in (("--method", "dio", "--modality", "ct"), ("--method", "convexadam", "--io", "none")):
        res = invoke("register", f, f, "-o", tmp_path / "o_", *flags, "--quiet")
        assert res.exit_code == 7 and "only --method foundation or promptreg" in res.output, (flags, res.output)
    # and instance-optimisation flags that nothing in the configuration reads
    for flags in (("--method", "dio", "--intensity-weight", "0.5"), ("--method", "affine", "--transform", "svf"),
                  ("--method", "foundation", "--io", "none", "--optimizer", "lbfgs")):
        res = invoke("register", f, f, "-o", tmp_path / "o_", *flags, "--quiet")
        assert res.exit_code == 7 and "would use" in res.output, (flags, res.output)
    for flags in (("--method", "dio", "--intensity-weight", "0.5", "--fine-spacing", "1"),
                  ("--method", "foundation", "--transform", "svf"), ("--method", "samconvex", "--intensity-weight", "1")):
        assert invoke("config", "show", *flags, "--json").exit_code == 0, flags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nii.gz", "no_io.yaml", "no_iterations.yaml"]



def test_mind_residual_network_starts_at_mind_and_learns_a_correction():
    """net.mind_residual: an untrained network gives MIND-SSC features (centred, unit, pooled per level), the
    heads start at zero, and a training step moves the features away from MIND."""
    from regcli.models.dio import DioFeatureNet, DioNetConfig, mind_levels
    from regcli.training.dio import DioTrainConfig, train_step

    with pytest.raises(ValueError, match="12 feature channels"):
        DioNetConfig(mind_residual=True)
    torch.manual_seed(0)
    net = DioFeatureNet(DioNetConfig(widths=(4, 8, 8, 8), feature_channels=(12, 12, 12), mind_residual=True))
    fixed, f = _img("LPS")
    moving, m = _img("LPS", transform=lambda p: p + np.array([2.0, 0.0, 0.0]))
    x = fixed.data[None, None]
    out, ref = net(x), mind_levels(x, (4, 2, 1))
    assert all(torch.allclose(out[lv], ref[lv], atol=1e-5) for lv in (4, 2, 1))
    lf = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(f)).astype(np.int64)), fixed.grid)
    lm = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(m)).astype(np.int64)), moving.grid)
    cfg = build_config(None, {"method": "dio", "dio": {"iterations": [4, 3, 2]}})
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss, _ = train_step(net, fixed, moving, lf, lm, cfg, DioTrainConfig())
    loss.backward()
    opt.step()
    assert not torch.allclose(net(x)[1], ref[1], atol=1e-4)


def test_shipped_dio_model_registers_with_the_defaults(tmp_path):
    """`--method dio` with no weights option loads the shipped model (weights/dio-features) with no network."""
    fixed_img = make_phantom("LPS", (2.0, 2.0, 2.0))
    moving_img = make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p: p + np.array([2.0, 0, 0]))
    fp, mp = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    sitk.WriteImage(fixed_img, str(fp))
    sitk.WriteImage(moving_img, str(mp))
    res = invoke("register", fp, mp, "-o", tmp_path / "out_", "--method", "dio", "--no-html", "--quiet", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "out_Report.json").read_text())
    model = rep["extra"]["models"][0]
    assert model["spec"] == "dio-features" and model["source"] == "shipped"


@pytest.mark.parametrize("method", ["convexadam", "samconvex"])
def test_other_methods_take_the_transform_swap(method, tmp_path):
    """instance.transform reaches the IO stage of convexadam and samconvex too: with svf the result is the
    composition of exponentials (no folding), and the loss history shows the swapped model ran."""
    from regcli.pipeline import register_images
    from regcli.reports.jacobian import jacobian_determinant

    fixed, _ = _img("LPS")
    moving, _ = _img("LPS", transform=lambda p: p + np.array([2.0, 0.0, -2.0]) + 0.06 * np.roll(p, 1, axis=-1))
    over = {"method": method, "instance": {"transform": "svf", "iterations": 10, "refine_iterations": 3}}
    if method == "samconvex":
        from regcli.models.embedding import EmbeddingConfig, EmbeddingNet, save_embedding_model

        torch.manual_seed(0)
        folder = tmp_path / "emb"
        save_embedding_model(EmbeddingNet(EmbeddingConfig(widths=(4, 8, 8, 12), global_dim=8, local_dim=8,
                                                          context_dilations=(1, 2))), folder, "# tiny\n")
        over["samconvex"] = {"weights": str(folder), "io_iterations": 10, "refine_iterations": 3}
    reg = register_images(fixed, moving, build_config(None, over))
    assert float(jacobian_determinant(reg.field).min()) > 0
    assert any(k.endswith("/refine") for k in reg.history)
    over["instance"]["transform"] = "freeform"
    free = register_images(fixed, moving, build_config(None, over))
    assert not torch.allclose(free.field.disp, reg.field.disp, atol=1e-3)  # the swap changed the solve


def test_init_from_weights_of_another_network_is_refused_before_the_data(tmp_path):
    """`init:` a DIO model whose layers differ from the job's crashed in load_state_dict (exit 1), after a job.json
    was written; it is a one-line ConfigError now, before any image is read."""
    _labelled_subjects(tmp_path)
    (tmp_path / "job.yaml").write_text(_tiny_job("synth_prob: 0.0"))
    first = tmp_path / "first"
    assert invoke("train", "dio", "--device", "cpu", "--config", tmp_path / "job.yaml", "-o", first,
                  "--iterations", "1", "--quiet").exit_code == 0
    (tmp_path / "wider.yaml").write_text(_tiny_job("synth_prob: 0.0", "init: first/model\n").replace(
        "widths: [4, 8, 8, 8]", "widths: [4, 8, 8, 16]"))
    res = invoke("train", "dio", "--device", "cpu", "--config", tmp_path / "wider.yaml", "-o", tmp_path / "second",
                 "--quiet")
    assert res.exit_code == 7, res.output
    assert "has another network configuration than the job's (widths: [4, 8, 8, 8] -> [4, 8, 8, 16])" in \
        one_line(res.stderr)
    assert not (tmp_path / "second").exists()
