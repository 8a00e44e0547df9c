"""The command-line contract: help speed and examples (C1), config merging (C2), info (C3), usage errors (E2),
output safety (O2, O3), the stdout/stderr contract (O5), error lines and exit codes, and ``evaluate``.

Tests that need the registration pipeline skip with the reason when it does not import yet.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import invoke, make_phantom, one_line, phantom_labels
from regcli.io.transforms import write_affine, write_displacement
from regcli.spaces import Grid
from regcli.transforms import AffineTransform, DisplacementField

ROOT = Path(__file__).resolve().parents[1]




def pipeline_missing() -> str | None:
    """Why the registration pipeline cannot run yet (None when it can)."""
    for mod in ("regcli.pipeline", "regcli.solvers.affine", "regcli.reports.report", "regcli.reports.jacobian",
                "regcli.reports.landmarks", "regcli.methods"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure means "not ready"
            return f"{mod} does not import yet ({type(e).__name__}: {e})"
    return None


needs_pipeline = pytest.mark.skipif(pipeline_missing() is not None, reason=str(pipeline_missing()))


@pytest.fixture
def images(tmp_path):
    """Small phantoms: fixed, moving (translated by (2, -1.5, 1) mm), their labels."""
    f = make_phantom("LPS", "iso", size=(32, 32, 32))
    m = make_phantom("LPS", "iso", size=(32, 32, 32), transform=lambda p: p + np.array([2.0, -1.5, 1.0]))
    paths = {}
    for name, img in (("fixed", f), ("moving", m), ("fixed_labels", phantom_labels(f)),
                      ("moving_labels", phantom_labels(m))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    return paths


# ------------------------------------------------------------------------------------------------ C1
def _best_time(cmd, n=3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t0)
        assert r.returncode == 0, r.stderr
        assert "Examples" in r.stdout
    return best


@pytest.mark.parametrize("sub", [[], ["register"], ["apply"], ["evaluate"], ["batch"]])
def test_c1_help_renders_fast(sub):
    t = _best_time([sys.executable, "-m", "regcli", *sub, "--help"])
    assert t < 1.0, f"regcli {' '.join(sub)} --help took {t:.2f} s (best of 3)"


def test_c1_importing_the_cli_does_not_import_torch():
    code = ("import sys, regcli.cli.app; heavy = [m for m in ('torch', 'SimpleITK', 'numpy', 'scipy') "
            "if m in sys.modules]; print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"heavy modules imported by regcli.cli.app: {r.stdout.strip()}"


@pytest.mark.parametrize("sub", [[], ["register"], ["apply"], ["jacobian"], ["evaluate"], ["batch"], ["info"], ["config"],
                                 ["config", "schema"], ["config", "show"]])
def test_c1_every_help_ends_with_examples(sub):
    res = invoke(*sub, "--help")
    assert res.exit_code == 0
    out = res.stdout
    assert "Examples" in out
    tail = out[out.rindex("Examples"):]
    assert "regcli" in tail and "regcli " + " ".join(sub[:1]) in tail


def _commands(cmd, path=()):
    """(path, click command) for every command and group under ``cmd``."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_c1_help_paragraphs_wrap_to_the_terminal():
    """Typer keeps a docstring's single line breaks; regcli joins them, so an 80-column help is not ragged."""
    import typer.main
    from regcli.cli.app import app

    for path, cmd in _commands(typer.main.get_command(app)):
        for para in (cmd.help or "").split("\n\n"):
            assert "\n" not in para or any(ln.startswith(("- ", "* ")) for ln in para.split("\n")), (
                f"regcli {' '.join(path)} --help: paragraph with hard line breaks: {para[:80]!r}")
    res = subprocess.run([sys.executable, "-m", "regcli", "register", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "80"})
    text = res.stdout[res.stdout.index("Works in physical"):res.stdout.index("╭")]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert all(len(ln) > 60 for ln in lines[:-1]), lines  # filled lines, only the paragraph's last one short


def test_c1_help_lists_every_exit_code():
    from regcli.errors import EXIT_INTERRUPTED, RegcliError

    out = " ".join(invoke("--help").stdout.split())
    for cls in RegcliError.__subclasses__():
        assert f"{cls.exit_code} {cls.kind.removesuffix('Error').lower()}" in out
    assert f"{EXIT_INTERRUPTED} interrupted" in out


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.startswith("regcli ")
    assert res.stderr == ""


# ------------------------------------------------------------------------------------------------ C2
def test_c2_yaml_merged_with_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 5\nhtml_report: false\naffine:\n  metric: mi\ninstance:\n  iterations: 10\n")
    res = invoke("config", "show", "--config", y, "--seed", "7", "--working-spacing", "3", "--json")
    assert res.exit_code == 0, res.stderr
    cfg = json.loads(res.stdout)
    assert cfg["seed"] == 7  # flag wins
    assert cfg["affine"]["metric"] == "mi" and cfg["instance"]["iterations"] == 10  # YAML kept
    assert cfg["working_spacing_mm"] == 3.0
    assert cfg["html_report"] is False  # unset --html/--no-html does not clobber the file
    res = invoke("config", "show", "--config", y, "--html", "--json")
    assert json.loads(res.stdout)["html_report"] is True
    res = invoke("config", "show", "--config", y)  # YAML on stdout, loadable
    import yaml

    assert yaml.safe_load(res.stdout)["affine"]["metric"] == "mi"


def test_iterations_flag_sets_each_methods_own_stage(tmp_path):
    """--iterations reaches the deformable stage of the chosen method (also when the method comes from the file),
    ANTs-style NxNxN per solver level for dio; a count that does not fit the method is a one-line exit 7."""
    def show(*args):
        res = invoke("config", "show", "--json", *args)
        return res, (json.loads(res.stdout) if res.exit_code == 0 else None)

    _, cfg = show("--iterations", "30")
    assert cfg["instance"]["iterations"] == 30
    _, cfg = show("--method", "samconvex", "--iterations", "25")
    assert cfg["samconvex"]["io_iterations"] == 25 and cfg["instance"]["iterations"] == 80
    _, cfg = show("--method", "dio", "--iterations", "20x10x5")
    assert cfg["dio"]["iterations"] == [20, 10, 5]
    y = tmp_path / "d.yaml"
    y.write_text("method: dio\ndio:\n  levels: [2, 1]\n  iterations: [9, 9]\n  learning_rates: [1.0, 0.5]\n")
    _, cfg = show("--config", y, "--iterations", "40X20")
    assert cfg["dio"]["iterations"] == [40, 20]
    for args, words in ((("--method", "dio", "--iterations", "50"), "one count per solver level"),
                        (("--config", y, "--iterations", "5x5x5"), "dio.levels 2,1"),
                        (("--iterations", "80x40"), "give one count"),
                        (("--method", "affine", "--iterations", "10"), "no deformable stage")):
        res, _ = show(*args)
        assert res.exit_code == 7 and words in one_line(res.stderr), res.stderr
    res, _ = show("--iterations", "many")
    assert res.exit_code == 2 and "--iterations" in res.stderr


def test_c2_unknown_yaml_key_is_exit_7(tmp_path, images):
    y = tmp_path / "bad.yaml"
    y.write_text("seed: 1\naffine:\n  metrik: mi\n")
    for args in (["config", "show", "--config", y],
                 ["register", images["fixed"], images["moving"], "-o", tmp_path / "o_", "--config", y]):
        res = invoke(*args)
        assert res.exit_code == 7, res.stderr
        line = one_line(res.stderr)
        assert line.startswith("ConfigError:") and "affine.metrik" in line and "unknown option" in line
        assert res.stdout == ""
    assert not list(tmp_path.glob("o_*"))


def test_config_schema_is_json():
    res = invoke("config", "schema")
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    assert "method" in schema["properties"] and schema.get("additionalProperties") is False


# ------------------------------------------------------------------------------------------------ C3
@pytest.mark.parametrize("direction", ["RAS", "oblique15", "PIL"])
def test_c3_info_matches_simpleitk(tmp_path, direction):
    img = make_phantom(direction, "aniso")
    p = tmp_path / "img.nii.gz"
    sitk.WriteImage(img, str(p))
    res = invoke("info", p, "--json")
    assert res.exit_code == 0 and res.stderr == ""
    d = json.loads(res.stdout)
    back = sitk.ReadImage(str(p))
    assert d["size"] == list(back.GetSize())
    assert np.allclose(d["spacing"], back.GetSpacing()) and np.allclose(d["origin"], back.GetOrigin())
    assert np.allclose(d["direction"], back.GetDirection())
    assert d["axcodes"] == Grid.from_sitk(back).axcodes()
    if direction in ("RAS", "PIL"):
        assert d["axcodes"] == direction
    assert d["dtype"] == "float32" and d["components"] == 1
    mm = sitk.MinimumMaximumImageFilter()
    mm.Execute(back)
    assert np.allclose(d["range"], [mm.GetMinimum(), mm.GetMaximum()])
    nib = pytest.importorskip("nibabel")
    hdr = nib.load(str(p)).header
    assert d["nifti"]["qform_code"] == int(hdr["qform_code"]) and d["nifti"]["sform_code"] == int(hdr["sform_code"])
    assert np.allclose(d["ras_affine"], nib.load(str(p)).affine, atol=1e-4)
    human = invoke("info", p)
    assert human.exit_code == 0 and "axcodes" in human.stdout and "qform_code" in human.stdout
    assert d["axcodes"] in human.stdout and human.stderr == ""


def test_c3_info_reports_sform_code_zero(tmp_path):
    nib = pytest.importorskip("nibabel")
    aff = np.diag([-1.5, 1.5, 2.0, 1.0])
    aff[:3, 3] = (10, -20, 5)
    im = nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), aff)
    im.set_sform(aff, code=0)
    im.set_qform(aff, code=1)
    nib.save(im, str(tmp_path / "q.nii.gz"))
    d = json.loads(invoke("info", tmp_path / "q.nii.gz", "--json").stdout)
    assert d["nifti"]["qform_code"] == 1 and d["nifti"]["sform_code"] == 0
    assert d["axcodes"] == "LAS"  # -1.5 on i: index x points left (nibabel would say LAS too)


def test_info_axcodes_of_2d_and_4d_images(tmp_path):
    """`regcli info` spells the spatial index axes of 2D and 4D images (oblique ones included) as
    spaces.grid.axcodes_of does for Grid: x/y letters in 2D, three letters (no time axis) in 4D."""
    from regcli.spaces.grid import axcodes_of

    c, s = np.cos(np.radians(120)), np.sin(np.radians(120))
    im2 = sitk.Image([5, 6], sitk.sitkFloat32)
    im2.SetDirection((c, -s, s, c))  # 120 degrees in-plane: +i mostly Posterior, +j mostly Right
    d4 = np.eye(4)
    d4[:3, :3] = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]) @ np.asarray(
        sitk.VersorTransform((0.0, 0.0, 1.0), np.radians(30)).GetMatrix()).reshape(3, 3)
    im4 = sitk.Image([5, 6, 7, 3], sitk.sitkFloat32)
    im4.SetDirection(d4.ravel().tolist())
    for name, img, want in (("i2.mha", im2, "PR"), ("i4.mha", im4, "PIR"), ("i4.nii.gz", im4, "PIR")):
        sitk.WriteImage(img, str(tmp_path / name))
        res = invoke("info", tmp_path / name, "--json")
        assert res.exit_code == 0, res.output
        d = json.loads(res.stdout)
        assert d["axcodes"] == want == axcodes_of(d["direction"]), (name, d["axcodes"])


def test_info_on_a_vector_field_and_an_integer_image(tmp_path):
    g = Grid.from_sitk(make_phantom("LPS", "iso"))
    write_displacement(DisplacementField.zeros(g), tmp_path / "w.nii.gz")
    d = json.loads(invoke("info", tmp_path / "w.nii.gz", "--json").stdout)
    assert d["components"] == 3
    sitk.WriteImage(phantom_labels(make_phantom("LPS", "iso")), str(tmp_path / "l.nii.gz"))
    d = json.loads(invoke("info", tmp_path / "l.nii.gz", "--json").stdout)
    assert d["dtype"] == "uint8" and d["range"] == [0.0, 3.0]


def test_info_counts_nan_in_a_nifti_file_and_describes_transform_files(tmp_path):
    """SimpleITK reads NaN in NIfTI as 0: info counts them in the file. A .mat/.h5 is described (type, matrix,
    offset, determinant; a composite part by part), a BSpline as not linear."""
    arr = np.ones((6, 7, 8), np.float32)
    arr[2, 3, 4] = np.nan
    arr[0, 0, :3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "n.nii.gz"))
    d = json.loads(invoke("info", tmp_path / "n.nii.gz", "--json").stdout)
    assert d["kind"] == "image" and d["nan_count"] == 4 and d["nan_read_as_zero"] is True
    assert "4 NaN/Inf in the file" in " ".join(invoke("info", tmp_path / "n.nii.gz").stdout.split())
    a = sitk.AffineTransform(3)
    a.SetMatrix((2, 0, 0, 0, 1, 0, 0, 0, 1.5))
    a.SetTranslation((1, 2, 3))
    sitk.WriteTransform(a, str(tmp_path / "a.mat"))
    d = json.loads(invoke("info", tmp_path / "a.mat", "--json").stdout)
    assert d["kind"] == "transform" and [t["type"] for t in d["transforms"]] == ["AffineTransform"]
    assert np.allclose(d["transforms"][0]["matrix"], np.diag([2, 1, 1.5]))
    assert np.allclose(d["transforms"][0]["offset"], (1, 2, 3)) and np.isclose(d["transforms"][0]["determinant"], 3.0)
    img = sitk.Image([5, 5, 5], sitk.sitkFloat32)
    comp = sitk.CompositeTransform([sitk.TranslationTransform(3, (1, 0, 0)),
                                    sitk.BSplineTransformInitializer(img, [2] * 3)])
    sitk.WriteTransform(comp, str(tmp_path / "c.h5"))
    d = json.loads(invoke("info", tmp_path / "c.h5", "--json").stdout)
    assert [(t["type"], t["linear"]) for t in d["transforms"]] == [("BSplineTransform", False),
                                                                  ("TranslationTransform", True)]
    res = invoke("info", tmp_path / "n.mat")
    assert res.exit_code == 2 and "does not exist" in res.output  # (a missing file: usage error, as for images)


def test_a_displacement_field_with_nan_is_refused(tmp_path):
    """A NaN vector (read as 0 by SimpleITK from NIfTI) would warp and score silently: apply and jacobian refuse
    the field (exit 3) with the count and the first voxel."""
    g = Grid.from_sitk(make_phantom("LPS", "iso"))
    write_displacement(DisplacementField.zeros(g), tmp_path / "w.nii.gz")
    f = sitk.ReadImage(str(tmp_path / "w.nii.gz"))
    arr = sitk.GetArrayFromImage(f)
    arr[3, 4, 5, 1] = np.nan
    bad = sitk.GetImageFromArray(arr, isVector=True)
    bad.CopyInformation(f)
    sitk.WriteImage(bad, str(tmp_path / "bad.nii.gz"))
    sitk.WriteImage(make_phantom("LPS", "iso"), str(tmp_path / "i.nii.gz"))
    for args in (["jacobian", tmp_path / "bad.nii.gz", "-o", tmp_path / "j.nii.gz"],
                 ["apply", "-i", tmp_path / "i.nii.gz", "-r", tmp_path / "i.nii.gz", "-t", tmp_path / "bad.nii.gz",
                  "-o", tmp_path / "o.nii.gz"]):
        res = invoke(*args)
        assert res.exit_code == 3 and "1 NaN/Inf" in res.output and "x=5, y=4, z=3" in res.output, res.output
    assert not (tmp_path / "j.nii.gz").exists() and not (tmp_path / "o.nii.gz").exists()


# ------------------------------------------------------------------------------------------------ E2 / E1
def _e2_cases(tmp_path, images):
    missing = tmp_path / "nope.nii.gz"
    folder = tmp_path / "adir.nii.gz"
    folder.mkdir()
    return missing, folder


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_e2_bad_input_paths_are_usage_errors(tmp_path, images, kind):
    missing, folder = _e2_cases(tmp_path, images)
    bad = missing if kind == "missing" else folder
    commands = [
        ["info", bad],
        ["register", images["fixed"], bad, "-o", tmp_path / "o_"],
        ["register", images["fixed"], images["moving"], "-o", tmp_path / "o_", "--fixed-labels", bad],
        ["apply", "-i", bad, "-r", images["fixed"], "-o", tmp_path / "o.nii.gz"],
        ["apply", "-i", images["moving"], "-r", images["fixed"], "-t", bad, "-o", tmp_path / "o.nii.gz"],
        ["jacobian", bad, "-o", tmp_path / "j.nii.gz"],
        ["evaluate", bad, "-o", tmp_path / "ev"],
    ]
    for args in commands:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.stderr)
        line = one_line(res.stderr)
        assert line.startswith("UsageError:") and bad.name in line
        assert res.stdout == ""
    assert not list(tmp_path.glob("o*")) and not (tmp_path / "ev").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_e2_unreadable_input_is_a_usage_error(tmp_path, images):
    p = tmp_path / "locked.nii.gz"
    p.write_bytes(images["fixed"].read_bytes())
    p.chmod(0)
    try:
        res = invoke("info", p)
        assert res.exit_code == 2 and "locked.nii.gz" in one_line(res.stderr)
    finally:
        p.chmod(0o644)


def test_e1_truncated_image_is_one_line_input_error(tmp_path, images):
    data = images["fixed"].read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    res = invoke("info", bad)
    assert res.exit_code == 3
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "cut.nii.gz" in line and "truncated" in line


# ------------------------------------------------------------------------------------------------ errors
def test_regcli_error_is_one_line_and_debug_shows_traceback(tmp_path, images, monkeypatch):
    from regcli.cli import info as info_mod
    from regcli.errors import GeometryError

    def boom(path):
        raise GeometryError("sheared header in\n'x.nii.gz'")

    monkeypatch.setattr(info_mod, "image_info", boom)
    res = invoke("info", images["fixed"])
    assert res.exit_code == 4
    assert one_line(res.stderr) == "GeometryError: sheared header in 'x.nii.gz'"
    res = invoke("info", images["fixed"], env={"REGCLI_DEBUG": "1"})
    assert res.exit_code == 4 and "Traceback" in res.stderr


def test_unexpected_error_is_exit_1_and_keyboard_interrupt_130(images, monkeypatch):
    from regcli.cli import info as info_mod

    def bug(path):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(info_mod, "image_info", bug)
    res = invoke("info", images["fixed"])
    assert res.exit_code == 1
    line = one_line(res.stderr)
    assert "ZeroDivisionError" in line and "REGCLI_DEBUG" in line

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(info_mod, "image_info", interrupted)
    res = invoke("info", images["fixed"])
    assert res.exit_code == 130


def test_usage_error_is_one_line():
    res = invoke("apply", "--bogus")
    assert res.exit_code == 2
    assert one_line(res.stderr).startswith("UsageError:")


# ------------------------------------------------------------------------------------------------ O2 / O3
def test_o2_apply_refuses_existing_output_before_computing(tmp_path, images, monkeypatch):
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"precious")
    os.utime(out, (1_000_000, 1_000_000))
    import regcli.resample

    def no_compute(*a, **k):
        raise AssertionError("computed before checking the output")

    monkeypatch.setattr(regcli.resample, "warp", no_compute)
    res = invoke("apply", "-i", images["moving"], "-r", images["fixed"], "-o", out)
    assert res.exit_code == 6
    assert "exists" in one_line(res.stderr) and "--overwrite" in res.stderr
    assert out.read_bytes() == b"precious" and out.stat().st_mtime == 1_000_000
    monkeypatch.undo()
    res = invoke("apply", "-i", images["moving"], "-r", images["fixed"], "-o", out, "--overwrite", "-q")
    assert res.exit_code == 0 and out.read_bytes() != b"precious"


def test_o2_jacobian_and_evaluate_refuse_existing_outputs(tmp_path, images):
    g = Grid.from_sitk(sitk.ReadImage(str(images["fixed"])))
    write_displacement(DisplacementField.zeros(g), tmp_path / "w.nii.gz")
    (tmp_path / "j.nii.gz").write_bytes(b"keep")
    res = invoke("jacobian", tmp_path / "w.nii.gz", "-o", tmp_path / "j.nii.gz")
    assert res.exit_code == 6 and (tmp_path / "j.nii.gz").read_bytes() == b"keep"
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "evaluation.csv").write_text("keep")
    res = invoke("evaluate", "--fixed", images["fixed"], "--moving", images["moving"], "-o", ev,
                 "--transforms-from", str(tmp_path / "{pair}_"))
    assert res.exit_code == 6 and (ev / "evaluation.csv").read_text() == "keep"


def test_o3_missing_output_directory_fails_fast(tmp_path, images):
    for args in (["apply", "-i", images["moving"], "-r", images["fixed"], "-o", tmp_path / "no" / "o.nii.gz"],
                 ["jacobian", images["fixed"], "-o", tmp_path / "no" / "j.nii.gz"]):
        t0 = time.perf_counter()
        res = invoke(*args)
        assert res.exit_code == 6, res.stderr
        assert "does not exist" in one_line(res.stderr)
        assert time.perf_counter() - t0 < 5.0
    assert not (tmp_path / "no").exists()


@needs_pipeline
def test_o2_o3_register_refuses_before_computing(tmp_path, images, monkeypatch):
    import regcli.pipeline as pipeline

    def no_compute(*a, **k):
        raise AssertionError("registration started before the outputs were checked")

    monkeypatch.setattr(pipeline, "register_images", no_compute)
    existing = tmp_path / "r_0GenericAffine.mat"
    existing.write_text("keep")
    res = invoke("register", images["fixed"], images["moving"], "-o", tmp_path / "r_", "--method", "affine")
    assert res.exit_code == 6 and "exists" in one_line(res.stderr)
    assert existing.read_text() == "keep"
    res = invoke("register", images["fixed"], images["moving"], "-o", tmp_path / "nodir" / "r_")
    assert res.exit_code == 6 and "does not exist" in one_line(res.stderr)


# ------------------------------------------------------------------------------------------------ O5
def test_o5_json_is_one_object_and_quiet_is_silent(tmp_path, images):
    g = Grid.from_sitk(sitk.ReadImage(str(images["fixed"])))
    w = g.world_coords()
    u = torch.stack([torch.sin(w[..., 1] / 5), torch.cos(w[..., 0] / 6), 0.5 * torch.sin(w[..., 2] / 4)]).float()
    write_displacement(DisplacementField(u, g), tmp_path / "w.nii.gz")
    write_affine(AffineTransform.translation((1, 2, 3)), tmp_path / "a.mat")
    cases = [
        ["info", images["fixed"]],
        ["apply", "-i", images["moving"], "-r", images["fixed"], "-t", tmp_path / "w.nii.gz", "-t", tmp_path / "a.mat",
         "-o", tmp_path / "o.nii.gz", "--overwrite"],
        ["jacobian", tmp_path / "w.nii.gz", "-o", tmp_path / "j.nii.gz", "--overwrite"],
        ["config", "show"],
    ]
    for args in cases:
        res = invoke(*args, "--json")
        assert res.exit_code == 0, res.stderr
        obj = json.loads(res.stdout)  # raises unless stdout is exactly one JSON document
        assert isinstance(obj, dict) and res.stdout.strip().startswith("{")
        if args[0] != "config":
            res = invoke(*args, "--quiet")
            assert res.exit_code == 0
            assert res.stdout == "" and res.stderr == "", (args, res.stdout, res.stderr)
    res = invoke("jacobian", tmp_path / "w.nii.gz", "-o", tmp_path / "j.nii.gz", "--overwrite", "--json")
    assert json.loads(res.stdout)["stats"]["n_nonpos_jac"] == 0


def test_jacobian_with_affine_scales_the_determinant(tmp_path, images):
    g = Grid.from_sitk(sitk.ReadImage(str(images["fixed"])))
    write_displacement(DisplacementField.zeros(g), tmp_path / "w.nii.gz")
    write_affine(AffineTransform.from_linear(np.diag([1.2, 1.0, 0.9]), (0, 0, 0)), tmp_path / "a.mat")
    res = invoke("jacobian", tmp_path / "w.nii.gz", "-t", tmp_path / "a.mat", "-o", tmp_path / "j.nii.gz", "--json",
                 "--mask", images["fixed_labels"])
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert abs(d["stats"]["jac_mean"] - 1.08) < 1e-5 and abs(d["stats_in_mask"]["jac_min"] - 1.08) < 1e-5
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "j.nii.gz")))
    assert arr.dtype == np.float32 and np.allclose(arr, 1.08, atol=1e-5)


# ------------------------------------------------------------------------------------------------ evaluate
def _known_transforms(tmp_path, images, name="p1"):
    """The exact fixed -> moving map of the `images` fixture, written as register would name it.

    moving(x) = phantom(x + t) with t = (2, -1.5, 1), so the fixed point x is the moving point x - t.
    """
    g = Grid.from_sitk(sitk.ReadImage(str(images["fixed"])))
    prefix = tmp_path / "tx" / f"{name}_"
    prefix.parent.mkdir(exist_ok=True)
    write_affine(AffineTransform.translation((-2.0, 1.5, -1.0)), str(prefix) + "0GenericAffine.mat")
    write_displacement(DisplacementField.zeros(g), str(prefix) + "1Warp.nii.gz")
    return tmp_path / "tx" / "{pair}_"


def _landmarks(tmp_path, images):
    pts = np.array([[0.0, 0.0, 0.0], [5.0, -3.0, 2.0], [-4.0, 6.0, -1.0]])
    with open(tmp_path / "lf.csv", "w") as f:
        f.write("id,x,y,z\n" + "".join(f"{i},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(pts)))
    mv = pts - np.array([2.0, -1.5, 1.0])
    with open(tmp_path / "lm.csv", "w") as f:
        f.write("id,x,y,z\n" + "".join(f"{i},{p[0]},{p[1]},{p[2]}\n" for i, p in enumerate(mv)))
    return tmp_path / "lf.csv", tmp_path / "lm.csv"


def _manifest(tmp_path, images, names=("p1", "p2"), landmarks=True):
    lf, lm = _landmarks(tmp_path, images)
    rows = []
    for n in names:
        rows.append({"pair": n, "fixed_image": images["fixed"].name, "moving_image": images["moving"].name,
                     "fixed_labels": images["fixed_labels"].name, "moving_labels": images["moving_labels"].name,
                     "fixed_landmarks": lf.name if landmarks else "", "moving_landmarks": lm.name if landmarks else ""})
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_evaluate_scores_existing_transforms(tmp_path, images, monkeypatch):
    template = _known_transforms(tmp_path, images, "p1")
    _known_transforms(tmp_path, images, "p2")
    manifest = _manifest(tmp_path, images)
    monkeypatch.chdir(tmp_path / "tx")  # manifest paths resolve against the CSV's folder, not the CWD
    res = invoke("evaluate", manifest, "--transforms-from", template, "-o", tmp_path / "ev", "--json")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["n_pairs"] == 2 and d["n_failed"] == 0
    r = d["pairs"][0]
    # the exact transform: what remains is the half-voxel (y) resampling of small labels (0.45 -> 0.86 here)
    assert r["dice_mean"] > 0.8 and r["dice_mean"] > r["dice_initial_mean"] + 0.3
    assert r["dice_per_label"]["1"] > 0.93
    assert r["pct_nonpos_jac"] == 0.0 and r["sdlogj"] < 1e-4
    assert r["tre_mean"] < 1e-4 and abs(r["tre_initial_mean"] - np.linalg.norm([2.0, -1.5, 1.0])) < 1e-6
    assert r["hd95_mean"] < 1.5
    assert set(map(int, r["dice_per_label"])) == {1, 2, 3}
    assert d["summary"]["dice_mean"]["n"] == 2 and d["summary"]["dice_mean"]["sd"] < 1e-9
    with open(tmp_path / "ev" / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["pair"] for row in rows] == ["p1", "p2"] and "dice_1" in rows[0]
    assert abs(float(rows[0]["dice_mean"]) - r["dice_mean"]) < 1e-5
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["n_pairs"] == 2
    # the human table goes to stdout, with the mean ± sd row
    res = invoke("evaluate", manifest, "--transforms-from", template, "-o", tmp_path / "ev", "--overwrite")
    assert res.exit_code == 0 and "mean ± sd" in res.stdout and "Dice" in res.stdout


def test_evaluate_failed_pair_keeps_the_table(tmp_path, images):
    template = _known_transforms(tmp_path, images, "p1")  # p2 has no transforms
    manifest = _manifest(tmp_path, images, landmarks=False)
    res = invoke("evaluate", manifest, "--transforms-from", template, "-o", tmp_path / "ev", "--json")
    assert res.exit_code == 3  # the first failed pair's error (InputError)
    d = json.loads(res.stdout)
    assert [r["status"] for r in d["pairs"]] == ["ok", "failed"]
    assert "no transforms found" in d["pairs"][1]["error"]
    assert (tmp_path / "ev" / "evaluation.csv").exists()


def _bad_labels_manifest(tmp_path, images):
    """Pairs p1 (labels fine) and p2, whose moving labels read as no image (known only when scoring)."""
    manifest = _manifest(tmp_path, images, landmarks=False)
    (tmp_path / "bad_labels.nii.gz").write_text("not an image")
    manifest.write_text(manifest.read_text().replace("p2,fixed.nii.gz,moving.nii.gz,fixed_labels.nii.gz,"
                                                     "moving_labels.nii.gz", "p2,fixed.nii.gz,moving.nii.gz,"
                                                     "fixed_labels.nii.gz,bad_labels.nii.gz"))
    assert "bad_labels" in manifest.read_text()
    return manifest


def test_evaluate_a_pair_whose_scoring_fails_leaves_no_outputs(tmp_path, images):
    """A pair registered fine but whose scoring fails (moving labels that are not an image) fails as a whole, as a
    pair whose registration fails: its row says failed with the one-line error and exit code, the files its
    registration wrote are removed, and the mean ± sd are over the successful pairs only."""
    from regcli.evaluation import RunResult, evaluate_pairs, read_manifest

    grid = Grid.from_sitk(sitk.ReadImage(str(images["fixed"])))

    def register(pair, prefix, method, **kwargs):  # writes what `regcli register` would, instantly
        write_affine(AffineTransform.translation((-2.0, 1.5, -1.0)), prefix + "0GenericAffine.mat")
        write_displacement(DisplacementField.zeros(grid), prefix + "1Warp.nii.gz")
        report = {"outputs": [prefix + s for s in ("0GenericAffine.mat", "1Warp.nii.gz", "Report.json")],
                  "total_seconds": 2.0 if pair.name == "p1" else 10.0}
        Path(prefix + "Report.json").write_text(json.dumps(report))
        return RunResult(0, report, "", 3.0, 100.0)

    out = tmp_path / "ev"
    out.mkdir()
    ev = evaluate_pairs(read_manifest(_bad_labels_manifest(tmp_path, images)), out, "affine", register_fn=register)
    ok, failed = ev.rows
    assert ok["status"] == "ok" and ok["dice_mean"] > 0.8
    assert failed["status"] == "failed" and failed["exit_code"] == 3 and "transforms" not in failed
    assert failed["error"].startswith("InputError: cannot read moving labels") and "bad_labels" in failed["error"]
    assert sorted(p.name for p in out.iterdir()) == ["p1_0GenericAffine.mat", "p1_1Warp.nii.gz", "p1_Report.json"]
    assert ev.summary()["seconds"] == {"mean": 2.0, "sd": 0.0, "n": 1}


@needs_pipeline
@pytest.mark.slow
def test_evaluate_cli_fails_a_pair_whose_scoring_fails(tmp_path, images):
    """The same through `regcli evaluate` and real `regcli register` children: exit code 3 (the pair's
    InputError), the table and evaluation.csv say failed, and none of the failed pair's files are left."""
    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML)
    out = tmp_path / "ev"
    res = invoke("evaluate", _bad_labels_manifest(tmp_path, images), "--method", "affine", "--config", y, "-o", out,
                 "--threads", "1", "--no-hd95", "--json")
    assert res.exit_code == 3, res.output
    d = json.loads(res.stdout)
    assert [r["status"] for r in d["pairs"]] == ["ok", "failed"] and d["n_failed"] == 1
    assert d["summary"]["seconds"]["n"] == 1
    with open(out / "evaluation.csv") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["ok", "failed"]
    assert (out / "p1_0GenericAffine.mat").exists() and not list(out.glob("p2_*"))


def test_evaluate_manifest_errors(tmp_path, images):
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed_image,moving\nfixed.nii.gz,moving.nii.gz\n")
    res = invoke("evaluate", bad, "-o", tmp_path / "ev")
    assert res.exit_code == 3 and "moving_image" in one_line(res.stderr)
    bad.write_text("fixed_image,moving_image\nfixed.nii.gz,gone.nii.gz\n")
    res = invoke("evaluate", bad, "-o", tmp_path / "ev")
    assert res.exit_code == 3 and "line 2" in one_line(res.stderr) and "gone.nii.gz" in res.stderr
    res = invoke("evaluate", "-o", tmp_path / "ev")
    assert res.exit_code == 2
    # landmark files that do not correspond are refused before any registration, with the line
    lf, _ = _landmarks(tmp_path, images)
    (tmp_path / "one.csv").write_text("x,y,z\n1,2,3\n")
    bad.write_text(f"fixed_image,moving_image,fixed_landmarks,moving_landmarks\nfixed.nii.gz,moving.nii.gz,"
                   f"{lf.name},one.csv\n")
    res = invoke("evaluate", bad, "-o", tmp_path / "ev")
    msg = one_line(res.stderr)
    assert res.exit_code == 3 and "line 2" in msg and "has 1" in msg and not (tmp_path / "ev").exists()


def test_evaluation_library_reads_manifest_relative_to_csv(tmp_path, images):
    from regcli.evaluation import read_manifest

    pairs = read_manifest(_manifest(tmp_path, images, names=("a",)))
    assert pairs[0].name == "a" and pairs[0].fixed == tmp_path / "fixed.nii.gz"
    assert pairs[0].fixed_landmarks == tmp_path / "lf.csv" and pairs[0].fixed_mask is None


def test_a_manifest_saved_by_excel_with_a_byte_order_mark_reads(tmp_path, images):
    from regcli.evaluation import read_manifest

    plain = _manifest(tmp_path, images, names=("a",))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_manifest(bom) == read_manifest(plain)


# ------------------------------------------------------------------------------------------------ register
FAST_YAML = "affine:\n  levels_mm: [4.0]\n  iterations: [30]\n"


@needs_pipeline
def test_register_html_page_shows_the_run_and_the_reports_timings(tmp_path, images):
    """The page shows what report.json holds (command, version, device, warnings) and sums only the top-level
    stages (the "deformable/..." details were counted twice)."""
    import re

    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML + "instance:\n  iterations: 5\n  refine_iterations: 2\ninverse_iterations: 3\n")
    res = invoke("register", images["fixed"], images["moving"], "-o", tmp_path / "h_", "--config", y,
                 "--fixed-labels", images["fixed_labels"], "--threads", "1", "--json")  # one-sided labels: a warning
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    page = (tmp_path / "h_Report.html").read_text()
    before_html = {k: v for k, v in report["stages"].items() if k != "html"}
    shown = float(re.search(r"<td>total time \(s\)</td><td>([0-9.]+)</td>", page).group(1))
    assert shown == pytest.approx(sum(before_html.values()), abs=2e-3)
    assert report["total_seconds"] == pytest.approx(sum(report["stages"].values()), abs=2e-3)
    assert "deformable/" not in page and "<code>" in page and report["regcli_version"] in page
    assert "threads" in page and "no Dice or HD95" in page  # device row; the warning
    assert all(Path(o).exists() for o in report["outputs"])


@needs_pipeline
def test_register_takes_ants_bracketed_output_names(tmp_path, images):
    """``-o [PREFIX,WARPED,INVERSE_WARPED]`` as antsRegistration: the warped moving image and the fixed image
    pulled into the moving grid go where they are named."""
    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML)
    out = tmp_path / "o"
    out.mkdir()
    spec = f"[{out}/p_,{out}/moved.nii.gz,{out}/fixed_in_moving.nii.gz]"
    res = invoke("register", images["fixed"], images["moving"], "-o", spec, "--method", "affine", "--config", y,
                 "--no-html", "--threads", "1")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["fixed_in_moving.nii.gz", "moved.nii.gz", "p_0GenericAffine.mat",
                                                     "p_Report.json"]

    def ncc(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    arr = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float64)  # noqa: E731
    moving, fixed = arr(images["moving"]), arr(images["fixed"])
    assert ncc(arr(out / "fixed_in_moving.nii.gz"), moving) > max(0.97, ncc(fixed, moving) + 0.05)
    assert ncc(arr(out / "moved.nii.gz"), fixed) > max(0.97, ncc(fixed, moving) + 0.05)
    for bad in ("[a_,b,c,d]", "[,w.nii.gz]", "[a_,w.nii.gz"):
        res = invoke("register", images["fixed"], images["moving"], "-o", bad, "--method", "affine")
        assert res.exit_code == 2 and "INVERSE_WARPED" in res.stderr, (bad, res.stderr)


@needs_pipeline
def test_register_json_report_echoes_merged_config(tmp_path, images):
    """CLI wiring of register (the affine stage is switched off so this does not test its accuracy)."""
    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML + "seed: 3\n")
    res = invoke("register", images["fixed"], images["moving"], "-o", tmp_path / "r_", "--method", "affine",
                 "--no-affine", "--config", y, "--seed", "11", "--no-html", "--threads", "2", "--json",
                 "--fixed-labels", images["fixed_labels"], "--moving-labels", images["moving_labels"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["config"]["seed"] == 11 and report["config"]["affine"]["iterations"] == [30]
    assert report["config"]["method"] == "affine" and report["config"]["affine"]["enabled"] is False
    on_disk = json.loads((tmp_path / "r_Report.json").read_text())
    assert on_disk["config"] == report["config"]
    assert (tmp_path / "r_0GenericAffine.mat").exists() and not (tmp_path / "r_Report.html").exists()
    assert "dice_mean" in report["metrics"]
    res = invoke("register", images["fixed"], images["moving"], "-o", tmp_path / "q_", "--method", "affine",
                 "--no-affine", "--config", y, "--no-html", "--quiet")
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == "", res.stderr


@needs_pipeline
@pytest.mark.slow
def test_evaluate_registers_each_pair_in_a_subprocess(tmp_path, images):
    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML)
    manifest = _manifest(tmp_path, images, names=("p1",))
    res = invoke("evaluate", manifest, "--method", "affine", "--config", y, "-o", tmp_path / "ev", "--json",
                 "--threads", "2")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)["pairs"][0]
    assert r["status"] == "ok", r.get("error")
    assert r["dice_mean"] > r["dice_initial_mean"]
    assert r["peak_rss_mb"] > 50 and r["wall_seconds"] >= r.get("seconds", 0)
    assert (tmp_path / "ev" / "p1_0GenericAffine.mat").exists()


@needs_pipeline
@pytest.mark.slow
def test_register_outputs_reapplied_by_apply_give_the_warped_image(tmp_path, images):
    """End to end: `apply -t 1Warp -t 0GenericAffine` on the moving image reproduces register's Warped.nii.gz
    (the transform files and their order mean what register used)."""
    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML + "instance:\n  iterations: 20\n")
    res = invoke("register", images["fixed"], images["moving"], "-o", tmp_path / "r_", "--config", y, "--no-html",
                 "--threads", "2", "--quiet")
    assert res.exit_code == 0, res.stderr
    for suffix in ("0GenericAffine.mat", "1Warp.nii.gz", "1InverseWarp.nii.gz", "Warped.nii.gz", "Report.json"):
        assert (tmp_path / f"r_{suffix}").exists(), suffix
    res = invoke("apply", "-i", images["moving"], "-r", images["fixed"], "-t", tmp_path / "r_1Warp.nii.gz",
                 "-t", tmp_path / "r_0GenericAffine.mat", "-o", tmp_path / "again.nii.gz", "-q")
    assert res.exit_code == 0, res.stderr
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "r_Warped.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nii.gz")))
    assert np.abs(a - b).max() < 1e-3 * max(1.0, float(np.abs(a).max()))


def test_config_file_may_be_a_pipe(tmp_path):
    """``--config <(echo ...)`` in a shell passes a pipe (/dev/fd/N), not a regular file."""
    import os
    import threading

    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("foundation: {weights: some/folder}\n"))
    writer.start()
    res = invoke("config", "show", "--method", "foundation", "--config", fifo, "--json")
    writer.join(5)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["foundation"]["weights"] == "some/folder"


def test_register_refuses_an_output_that_is_one_of_its_inputs(tmp_path, images):
    """Registering again onto the last result with the same prefix and --overwrite would replace the moving
    image it reads: refused before any work (exit 6); a warped-image name that is not an image file too."""
    out = tmp_path / "p_Warped.nii.gz"
    out.write_bytes(images["moving"].read_bytes())
    res = invoke("register", images["fixed"], out, "-o", tmp_path / "p_", "--overwrite", "--method", "affine")
    assert res.exit_code == 6 and "is the input" in res.output, res.output
    assert out.read_bytes() == images["moving"].read_bytes()
    res = invoke("register", images["fixed"], images["moving"], "-o", f"[{tmp_path / 'q_'},{tmp_path / 'w.png'}]",
                 "--method", "affine")
    assert res.exit_code == 6 and "w.png" in res.output, res.output
    assert not list(tmp_path.glob("q_*"))


def test_a_working_grid_of_almost_no_voxels_is_warned_about(tmp_path):
    """A header with 0.001 mm voxels made the 2 mm working grid of a 32-voxel image 6 voxels (12 mm) over 0.032 mm
    of image: the deformable stage ran and did nothing, silently. One warning line on stderr (and in the report)
    names the working grid, the image's extent and a working spacing that would do."""
    paths = {}
    for name, shift in (("fixed", 0.0), ("moving", 1.0)):
        img = make_phantom("LPS", "iso", size=(32, 32, 32), transform=lambda p, s=shift: p + np.array([s, 0.0, 0.0]))
        img.SetSpacing((1e-3,) * 3)
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    y = tmp_path / "fast.yaml"
    y.write_text(FAST_YAML)
    res = invoke("register", paths["fixed"], paths["moving"], "-o", tmp_path / "p_", "--config", y, "--json")
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.stderr.splitlines() if "working grid" in ln]
    assert len(warned) == 1, res.stderr
    assert warned[0].startswith("Warning: the deformable working grid is 6 x 6 x 6 voxels of 2 mm") and \
        "0.032 x 0.032 x 0.032 mm" in warned[0] and "working spacing of 0.008 mm or finer" in warned[0], warned[0]
    assert warned[0].removeprefix("Warning: ") in json.loads(res.stdout)["warnings"]


@pytest.mark.parametrize("method", ["convexadam", "samconvex", "dio", "foundation", "promptreg"])
def test_the_working_grid_warning_spares_the_phantoms_and_brains(method):
    """The small phantoms the tests register (down to 15 x 13 x 8 mm), anisotropic ones and a brain: no warning."""
    from regcli.config import build_config
    from regcli.methods import working_grid
    from regcli.methods.convexadam import MIN_WORKING_VOXELS, coarse_working_grid

    cfg = build_config(None, {"method": method})
    eye = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    for size, spacing in (((15, 13, 8), (1.0, 1.0, 1.0)), ((24, 22, 20), (1.0, 1.0, 1.0)),
                          ((53, 49, 13), (0.9, 0.9, 3.0)), ((192, 224, 192), (1.0, 1.0, 1.0))):
        grid = Grid(size, spacing, (0.0, 0.0, 0.0), eye)
        assert coarse_working_grid(grid, working_grid(method, grid, cfg)[0]) is None, (size, spacing)
    # a 6 mm slab spans 3 voxels of a 2 mm working grid; a network's grid has as many voxels whatever the spacing
    thin = Grid((64, 64, 3), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), eye)
    note = coarse_working_grid(thin, working_grid(method, thin, cfg)[0])
    if method in ("foundation", "promptreg"):
        assert note is None, note
    else:
        assert f"under {MIN_WORKING_VOXELS} working voxels along z:" in note and "spacing of 1.5 mm" in note, note
