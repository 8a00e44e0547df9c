"""A prefix never mixes two runs: ``register --overwrite`` removes what an earlier run under the same prefix wrote
and this run does not (an old 1Warp beside a new affine-only result would be combined by
``-t prefix1Warp -t prefix0GenericAffine`` and by ``evaluate --transforms-from``)."""

import json

import pytest

from conftest import invoke, make_phantom, phantom_labels, write

FAST = ["--threads", "1", "-q"]
DEFORM = ["--method", "convexadam"]
CONFIG = "affine: {iterations: [10, 5]}\ninstance: {iterations: 3, refine_iterations: 0}\n"


@pytest.fixture
def pair(tmp_path):
    fixed = make_phantom("LPS", "iso")
    moving = make_phantom("LPS", "iso", centre=(3.0, -1.0, 4.5))
    paths = {"fixed": write(fixed, tmp_path / "f.nii.gz"), "moving": write(moving, tmp_path / "m.nii.gz"),
             "fl": write(phantom_labels(fixed), tmp_path / "fl.nii.gz"),
             "ml": write(phantom_labels(moving), tmp_path / "ml.nii.gz")}
    (tmp_path / "o").mkdir()
    paths["config"] = tmp_path / "short.yaml"
    paths["config"].write_text(CONFIG)
    return paths, tmp_path / "o"


def _register(paths, prefix, *extra):
    res = invoke("register", paths["fixed"], paths["moving"], "-o", prefix, "--fixed-labels", paths["fl"],
                 "--moving-labels", paths["ml"], "--config", paths["config"], *FAST, *extra)
    assert res.exit_code == 0, res.stderr
    return json.loads((prefix.parent / (prefix.name + "Report.json")).read_text())


def test_overwrite_with_fewer_outputs_removes_the_earlier_runs_extra_files(pair, tmp_path):
    paths, out = pair
    prefix = out / "p_"
    first = _register(paths, prefix, *DEFORM)
    figures = [o for o in first["outputs"] if o.endswith(".png")]
    assert figures and all(o.startswith(str(prefix) + "Report") for o in figures)
    unrelated = [out / "p_notes.txt", out / "q_1Warp.nii.gz", out / "p_Report_mine.png"]
    for u in unrelated:  # the user's own files: never touched
        u.write_text("keep")
    second = _register(paths, prefix, "--method", "affine", "--no-html", "--overwrite")
    present = sorted(p.name for p in out.iterdir())
    assert present == sorted(["p_0GenericAffine.mat", "p_Warped.nii.gz", "p_Report.json", "p_notes.txt",
                              "q_1Warp.nii.gz", "p_Report_mine.png"]), present
    assert sorted(second["outputs"]) == sorted(str(out / n) for n in ("p_0GenericAffine.mat", "p_Warped.nii.gz",
                                                                       "p_Report.json"))
    # what evaluate --transforms-from finds under the prefix is the second run's transform, scored as it scored it
    res = invoke("evaluate", "--fixed", paths["fixed"], "--moving", paths["moving"], "--fixed-labels", paths["fl"],
                 "--moving-labels", paths["ml"], "--transforms-from", prefix, "-o", tmp_path / "ev", "--json", "-q")
    assert res.exit_code == 0, res.stderr
    row = json.loads(res.stdout)["pairs"][0]
    assert [t.rsplit("/", 1)[-1] for t in row["transforms"]] == ["p_0GenericAffine.mat"]
    assert row["dice_mean"] == pytest.approx(second["metrics"]["dice_mean"], abs=1e-9)


def test_no_inverse_on_overwrite_removes_the_earlier_inverse_and_a_failed_run_keeps_everything(pair):
    paths, out = pair
    prefix = out / "p_"
    _register(paths, prefix, *DEFORM, "--no-html")
    assert (out / "p_1InverseWarp.nii.gz").is_file()
    second = _register(paths, prefix, *DEFORM, "--no-html", "--no-inverse", "--overwrite")
    assert not (out / "p_1InverseWarp.nii.gz").exists()
    assert str(out / "p_1Warp.nii.gz") in second["outputs"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # a run that fails writes nothing and removes nothing
    bad = out.parent / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    res = invoke("register", paths["fixed"], bad, "-o", prefix, "--method", "affine", "--overwrite", "--config",
                 paths["config"], *FAST)
    assert res.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_without_overwrite_into_a_used_prefix_is_still_refused(pair):
    paths, out = pair
    prefix = out / "p_"
    _register(paths, prefix, *DEFORM, "--no-html")
    names = sorted(p.name for p in out.iterdir())
    res = invoke("register", paths["fixed"], paths["moving"], "-o", prefix, "--method", "affine", "--config",
                 paths["config"], *FAST)
    assert res.exit_code != 0 and "--overwrite" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == names


def test_evaluate_scores_only_the_transforms_the_prefixs_report_lists(pair, tmp_path):
    """A prefix mixed by hand or by an older regcli (an old 1Warp beside an affine-only run whose report lists no
    warp): evaluate --transforms-from takes the listed transforms only; without a report, whatever is there."""
    import shutil

    paths, out = pair
    _register(paths, out / "d_", *DEFORM, "--no-html")
    second = _register(paths, out / "p_", "--method", "affine", "--no-html")
    shutil.copy(out / "d_1Warp.nii.gz", out / "p_1Warp.nii.gz")

    def scored(prefix):
        res = invoke("evaluate", "--fixed", paths["fixed"], "--moving", paths["moving"], "--fixed-labels",
                     paths["fl"], "--moving-labels", paths["ml"], "--transforms-from", prefix, "-o",
                     tmp_path / "ev", "--json", "-q", "--overwrite")
        assert res.exit_code == 0, res.stderr
        return json.loads(res.stdout)["pairs"][0]

    row = scored(out / "p_")
    assert [t.rsplit("/", 1)[-1] for t in row["transforms"]] == ["p_0GenericAffine.mat"]
    assert row["dice_mean"] == pytest.approx(second["metrics"]["dice_mean"], abs=1e-9)
    (out / "p_Report.json").unlink()
    row = scored(out / "p_")
    assert [t.rsplit("/", 1)[-1] for t in row["transforms"]] == ["p_1Warp.nii.gz", "p_0GenericAffine.mat"]
