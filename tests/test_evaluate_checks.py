"""`regcli evaluate` (and the register report it shares rules with): labels lost by warping and HD95, the inputs
of `--transforms-from` against the pair, Dice columns of any integer label, register's label checks, and the
region of `jacobian.in_mask`."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import invoke, make_phantom, one_line

N = 24  # voxels per axis of the phantoms (1 mm, origin 0)


def _labels(arr: np.ndarray, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetOrigin(origin)
    return img


def _box(shape, value, z, y, x) -> np.ndarray:
    a = np.zeros(shape, np.int16)
    a[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return a


@pytest.fixture
def scene(tmp_path):
    """Fixed and moving phantoms on the same 24^3 1 mm grid, an identity affine `id_0GenericAffine.mat`, fixed
    labels 1 and 2, and moving labels whose label 2 lies outside the fixed image (x 30..35 mm on a wider grid):
    an identity warp loses it."""
    img = make_phantom("LPS", "iso", size=(N, N, N))
    img.SetOrigin((0.0, 0.0, 0.0))
    paths = {"fixed": tmp_path / "f.nii.gz", "moving": tmp_path / "m.nii.gz"}
    sitk.WriteImage(img, str(paths["fixed"]))
    sitk.WriteImage(img, str(paths["moving"]))
    fl = _box((N, N, N), 1, (4, 10), (4, 10), (4, 10)) + _box((N, N, N), 2, (14, 20), (14, 20), (14, 20))
    ml = np.zeros((N, N, 40), np.int16)
    ml[4:10, 4:10, 4:10] = 1
    ml[14:20, 14:20, 30:36] = 2
    paths["fixed_labels"] = tmp_path / "fl.nii.gz"
    paths["moving_labels"] = tmp_path / "ml_out.nii.gz"
    sitk.WriteImage(_labels(fl), str(paths["fixed_labels"]))
    sitk.WriteImage(_labels(ml), str(paths["moving_labels"]))
    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "id_0GenericAffine.mat"))
    paths["identity"] = str(tmp_path / "id_")
    return paths


def _evaluate(scene, out, *extra, labels=None, transforms=None):
    fl, ml = labels if labels is not None else (scene["fixed_labels"], scene["moving_labels"])
    args = ["evaluate", "--fixed", scene["fixed"], "--moving", scene["moving"], "-o", out,
            "--transforms-from", transforms or scene["identity"]]
    if fl is not None:
        args += ["--fixed-labels", fl, "--moving-labels", ml]
    return invoke(*args, *extra)


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ 1: labels lost by warping
def test_evaluate_hd95_leaves_out_a_label_lost_by_warping_and_records_and_names_it(tmp_path, scene):
    res = _evaluate(scene, tmp_path / "ev", "--json")
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout)["pairs"][0]
    assert row["dice_per_label"] == {"1": 1.0, "2": 0.0} and row["dice_mean"] == 0.5
    assert row["hd95_per_label"] == {"1": 0.0, "2": None} and row["hd95_mean"] == 0.0
    assert row["hd95_labels_lost"] == [2]  # the mean of 0.0 is over label 1 only, and says so
    flat = " ".join(res.stderr.split())
    assert "pair 'pair001': HD95 is over 1 of the 2 labels: label(s) 2 are not in the warped labels" in flat
    assert "Dice counts them as 0" in flat
    rows = _csv_rows(tmp_path / "ev" / "evaluation.csv")
    assert rows[0]["hd95_labels_lost"] == "2" and rows[0]["hd95_mean"] == "0"
    res = _evaluate(scene, tmp_path / "ev", "--overwrite")  # the table marks the mean and names the label
    assert res.exit_code == 0, res.stderr
    assert "0.00*" in res.stdout and "HD95 leaves out label(s) 2" in " ".join(res.stdout.split())


def test_evaluate_without_lost_labels_records_an_empty_list(tmp_path, scene):
    res = _evaluate(scene, tmp_path / "ev", "--json", labels=(scene["fixed_labels"], scene["fixed_labels"]))
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout)["pairs"][0]
    assert row["hd95_labels_lost"] == [] and "HD95 is over" not in res.stderr
    assert _csv_rows(tmp_path / "ev" / "evaluation.csv")[0]["hd95_labels_lost"] == ""


# ------------------------------------------------------------------------------------ 5: any integer label
def test_evaluation_csv_has_the_dice_of_negative_labels(tmp_path, scene):
    fl = _box((N, N, N), -5, (4, 10), (4, 10), (4, 10)) + _box((N, N, N), 3, (14, 20), (14, 20), (14, 20))
    sitk.WriteImage(_labels(fl), str(tmp_path / "neg.nii.gz"))
    res = _evaluate(scene, tmp_path / "ev", "--json", labels=(tmp_path / "neg.nii.gz", tmp_path / "neg.nii.gz"))
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["pairs"][0]["dice_per_label"] == {"-5": 1.0, "3": 1.0}
    row = _csv_rows(tmp_path / "ev" / "evaluation.csv")[0]
    assert row["dice_-5"] == "1" and row["dice_3"] == "1"


# ------------------------------------------------------------------------------------ 7: register's label checks
def test_evaluate_warns_like_register_about_labels_in_one_map_only(tmp_path, scene):
    fl = _box((N, N, N), 1, (4, 10), (4, 10), (4, 10)) + _box((N, N, N), 4, (14, 20), (14, 20), (14, 20))
    sitk.WriteImage(_labels(fl), str(tmp_path / "fl4.nii.gz"))
    res = _evaluate(scene, tmp_path / "ev", "--json", labels=(tmp_path / "fl4.nii.gz", scene["moving_labels"]))
    assert res.exit_code == 0, res.stderr
    flat = " ".join(res.stderr.split())
    assert ("pair 'pair001': Dice is over the 1 labels both maps hold, HD95 over those of them that the warped "
            "labels still hold; only in the fixed labels: 4; only in the moving labels: 2") in flat
    assert json.loads(res.stdout)["pairs"][0]["labels"] == [1]


def test_evaluate_refuses_fixed_labels_outside_the_fixed_image_in_registers_words(tmp_path, scene):
    fl = sitk.ReadImage(str(scene["fixed_labels"]))
    fl.SetOrigin((500.0, 0.0, 0.0))
    sitk.WriteImage(fl, str(tmp_path / "far.nii.gz"))
    res = _evaluate(scene, tmp_path / "ev", "--json", labels=(tmp_path / "far.nii.gz", scene["moving_labels"]))
    assert res.exit_code == 4, res.stderr  # GeometryError, as register
    error = json.loads(res.stdout)["pairs"][0]["error"]
    assert "fixed labels" in error and "far.nii.gz" in error and "do not overlap the fixed image" in error
    assert "share no label other than 0" not in res.stderr


def test_evaluate_fails_a_pair_whose_label_maps_share_no_label(tmp_path, scene):
    other = _box((N, N, N), 9, (4, 10), (4, 10), (4, 10))
    sitk.WriteImage(_labels(other), str(tmp_path / "other.nii.gz"))
    res = _evaluate(scene, tmp_path / "ev", "--json", labels=(scene["fixed_labels"], tmp_path / "other.nii.gz"))
    assert res.exit_code == 3, res.stderr
    error = json.loads(res.stdout)["pairs"][0]["error"]
    assert "pair 'pair001'" in error and "share no label value" in error and "other.nii.gz" in error


# ------------------------------------------------------------------------------------ 3: --transforms-from inputs
def _registered(tmp_path, scene, prefix, fixed, moving, **masks):
    """The identity affine under ``prefix`` with a Report.json as `register` writes it (inputs with sha256)."""
    from regcli.reports.report import build_report, write_report

    shutil.copy(scene["identity"] + "0GenericAffine.mat", prefix + "0GenericAffine.mat")
    inputs = {"fixed": fixed, "moving": moving, **masks}
    write_report(prefix + "Report.json", build_report("register", {}, inputs, {}, outputs=[
        prefix + "0GenericAffine.mat", prefix + "Report.json"]))
    return prefix


def test_transforms_from_checks_the_reports_inputs_against_the_pair(tmp_path, scene):
    other = tmp_path / "m2.nii.gz"
    sitk.WriteImage(make_phantom("LPS", "iso", size=(N, N, N), centre=(12.0, 12.0, 13.0)), str(other))
    prefix = _registered(tmp_path, scene, str(tmp_path / "p_"), scene["fixed"], scene["moving"])

    res = _evaluate(scene, tmp_path / "ev1", "--json", transforms=prefix)  # the same pair: no warning
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout)["pairs"][0]
    assert row["transforms_inputs_match"] is True and "registered" not in res.stderr

    res = invoke("evaluate", "--fixed", scene["fixed"], "--moving", other, "-o", tmp_path / "ev2", "--json",
                 "--transforms-from", prefix)
    assert res.exit_code == 0, res.stderr  # a warning, not a refusal
    row = json.loads(res.stdout)["pairs"][0]
    assert row["transforms_inputs_match"] is False and row["transforms_inputs_differ"] == ["moving"]
    assert "transforms_inputs_swapped" not in row
    line = " ".join(res.stderr.split())
    assert f"moving image '{other}' is not the moving image '{scene['moving']}'" in line

    swapped = _registered(tmp_path, scene, str(tmp_path / "s_"), other, scene["fixed"])
    res = invoke("evaluate", "--fixed", scene["fixed"], "--moving", other, "-o", tmp_path / "ev3", "--json",
                 "--transforms-from", swapped)
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout)["pairs"][0]
    assert row["transforms_inputs_match"] is False and row["transforms_inputs_swapped"] is True
    assert row["transforms_inputs_differ"] == ["fixed", "moving"]
    line = " ".join(res.stderr.split())
    assert "swapped" in line and str(other) in line and str(scene["fixed"]) in line
    res = invoke("evaluate", "--fixed", scene["fixed"], "--moving", other, "-o", tmp_path / "ev3", "--overwrite",
                 "--transforms-from", swapped)
    assert res.exit_code == 0 and "swapped fixed and moving" in " ".join(res.stdout.split())


def test_transforms_from_compares_masks_when_both_have_one(tmp_path, scene):
    prefix = _registered(tmp_path, scene, str(tmp_path / "p_"), scene["fixed"], scene["moving"],
                         fixed_mask=scene["fixed_labels"])
    res = invoke("evaluate", "--fixed", scene["fixed"], "--moving", scene["moving"], "--fixed-mask",
                 scene["moving_labels"], "-o", tmp_path / "ev", "--json", "--transforms-from", prefix)
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout)["pairs"][0]
    assert row["transforms_inputs_differ"] == ["fixed_mask"] and "fixed mask" in res.stderr


def test_transforms_from_a_copied_report_names_the_files_it_lists(tmp_path, scene):
    prefix = _registered(tmp_path, scene, str(tmp_path / "p_"), scene["fixed"], scene["moving"])
    for suffix in ("0GenericAffine.mat", "Report.json"):
        shutil.copy(prefix + suffix, str(tmp_path / "q_") + suffix)
    res = _evaluate(scene, tmp_path / "ev", "--json", transforms=str(tmp_path / "q_"))
    assert res.exit_code == 3, res.stderr
    error = json.loads(res.stdout)["pairs"][0]["error"]
    assert f"{tmp_path / 'q_'}0GenericAffine.mat exist" in error and "lists other file names" in error
    assert f"{prefix}0GenericAffine.mat" in error


# ------------------------------------------------------------------------------------ 6: jacobian.in_mask
def test_evaluate_jacobian_in_mask_is_the_fixed_mask_else_the_fixed_labels(tmp_path, scene):
    res = _evaluate(scene, tmp_path / "ev1", "--json")
    assert res.exit_code == 0, res.stderr
    jac = json.loads(res.stdout)["pairs"][0]["jacobian"]
    assert jac["in_mask_source"] == "fixed_labels" and jac["in_mask"]["n_voxels"] == 2 * 6 ** 3
    mask = _box((N, N, N), 1, (2, 12), (2, 12), (2, 12))
    sitk.WriteImage(_labels(mask), str(tmp_path / "mask.nii.gz"))
    res = _evaluate(scene, tmp_path / "ev2", "--json", "--fixed-mask", tmp_path / "mask.nii.gz")
    assert res.exit_code == 0, res.stderr
    jac = json.loads(res.stdout)["pairs"][0]["jacobian"]
    assert jac["in_mask_source"] == "fixed_mask" and jac["in_mask"]["n_voxels"] == 10 ** 3


def test_register_scores_lost_labels_and_the_fixed_mask_as_evaluate_does(tmp_path, scene):
    """register with a fixed mask (and labels): `jacobian.in_mask` is over the mask, named in the report and the
    HTML; label 2, lost by warping, is left out of hd95_mean, recorded, warned about and shown in the HTML."""
    mask = _box((N, N, N), 1, (2, 12), (2, 12), (2, 12))
    sitk.WriteImage(_labels(mask), str(tmp_path / "mask.nii.gz"))
    res = invoke("register", scene["fixed"], scene["moving"], "-o", tmp_path / "r_", "--fixed-mask",
                 tmp_path / "mask.nii.gz", "--fixed-labels", scene["fixed_labels"], "--moving-labels",
                 scene["moving_labels"], "--working-spacing", "4", "--iterations", "5", "--threads", "1", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    m = report["metrics"]
    assert m["jacobian"]["in_mask_source"] == "fixed_mask" and m["jacobian"]["in_mask"]["n_voxels"] == 10 ** 3
    assert m["dice_per_label"]["2"] == 0.0 and m["hd95_labels_lost"] == [2]
    assert m["hd95_mean"] == pytest.approx(m["hd95_per_label"]["1"])
    assert any("label(s) 2 are not in the warped labels" in w for w in report["warnings"])
    assert not any("Dice and HD95 are over" in w for w in report["warnings"])
    html = (tmp_path / "r_Report.html").read_text()
    assert "in fixed mask" in html and "labels left out of mean HD95" in html and "lost by warping" in html


def test_one_line_errors_stay_one_line(tmp_path, scene):
    """The refusals above are one line on stderr (the failed pair's summary)."""
    other = _box((N, N, N), 9, (4, 10), (4, 10), (4, 10))
    sitk.WriteImage(_labels(other), str(tmp_path / "other.nii.gz"))
    res = _evaluate(scene, tmp_path / "ev", "-q", labels=(scene["fixed_labels"], tmp_path / "other.nii.gz"))
    assert res.exit_code == 3
    assert "share no label value" in one_line(res.stderr)
