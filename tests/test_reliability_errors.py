"""RELIABILITY rows E3, E4, E5, E7, E10, G8 and O4 through ``regcli register`` (in-process, typer's CliRunner):
each refusal is one stderr line with its exit code, and leaves neither output files nor temporaries behind
(and ``regcli apply``, which warns about NaN/Inf in its input and resamples on).

Phantoms are 32^3 (the ``images`` fixture of test_cli.py); the run is shortened by a small YAML config.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import invoke, one_line, phantom_mask, write
from test_cli import images  # noqa: F401 - fixture: 32^3 fixed/moving phantoms and labels
from test_pipeline import _assert_no_outputs

FAST_YAML = """\
html_report: false
working_spacing_mm: 2.0
inverse_iterations: 3
affine:
  levels_mm: [4.0]
  iterations: [20]
instance:
  iterations: 10
  refine_iterations: 3
"""


@pytest.fixture
def fast(tmp_path):
    """A config file that keeps a 32^3 registration to about a second."""
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_YAML)
    return path


def register(images, fast, *extra, fixed=None, moving=None, prefix="p_"):
    out = images["fixed"].parent / prefix
    return invoke("register", fixed or images["fixed"], moving or images["moving"], "-o", out, "--config", fast,
                  *extra)


def error_line(stderr: str) -> str:
    """The error line of a run that failed after progress logging began: the last line of stderr, the only one
    that names an error, and no traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and "Traceback" not in stderr, stderr
    assert sum("Error:" in ln for ln in lines) == 1, stderr
    return lines[-1]


def _like(reference: sitk.Image, arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


def _no_optimisation(monkeypatch):
    """Make any stage that starts optimising fail the test."""
    import regcli.methods.convexadam as convexadam
    import regcli.solvers.affine as affine

    def started(*a, **k):
        raise AssertionError("optimisation started before the inputs were refused")

    monkeypatch.setattr(affine, "run_affine_stage", started)
    monkeypatch.setattr(convexadam, "convex_displacement", started)


# ------------------------------------------------------------------------------------------------ E3
def test_e3_constant_fixed_image_is_refused(tmp_path, images, fast, monkeypatch):
    _no_optimisation(monkeypatch)
    fixed = sitk.ReadImage(str(images["fixed"]))
    const = write(_like(fixed, np.full(sitk.GetArrayFromImage(fixed).shape, 5.0, np.float32)),
                  tmp_path / "const.nii.gz")
    res = register(images, fast, fixed=const)
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "const.nii.gz" in line and "zero intensity variance" in line
    assert res.stdout == ""
    _assert_no_outputs(tmp_path)


def test_e3_fixed_image_all_zero_inside_its_mask_is_refused(tmp_path, images, fast, monkeypatch):
    _no_optimisation(monkeypatch)
    fixed = sitk.ReadImage(str(images["fixed"]))
    mask = phantom_mask(fixed)
    assert mask.sum() > 100
    arr = sitk.GetArrayFromImage(fixed)
    hollow = write(_like(fixed, np.where(phantom_mask(fixed, erode=0), 0.0, arr).astype(np.float32)),
                   tmp_path / "hollow.nii.gz")
    mpath = write(_like(fixed, mask.astype(np.uint8)), tmp_path / "mask.nii.gz")
    res = register(images, fast, "--fixed-mask", mpath, fixed=hollow)
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "hollow.nii.gz" in line and "mask.nii.gz" in line
    assert "zero intensity variance inside the fixed mask" in line
    _assert_no_outputs(tmp_path)


# ------------------------------------------------------------------------------------------------ E4
@pytest.mark.parametrize("ext", ["nii.gz", "nii", "mha"])
def test_e4_nan_and_inf_in_moving_file_are_counted_and_located(tmp_path, images, fast, ext, monkeypatch):
    # SimpleITK 2.x (ITK 5) reads NIfTI NaN/Inf as 0; regcli must still see them in the file.
    _no_optimisation(monkeypatch)
    moving = sitk.ReadImage(str(images["moving"]))
    arr = sitk.GetArrayFromImage(moving).copy()
    arr[3, 4, 5] = np.nan  # (z, y, x): index x=5, y=4, z=3
    arr[10, 11, 12] = np.inf
    bad = write(_like(moving, arr), tmp_path / f"bad.{ext}")
    res = register(images, fast, moving=bad)
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and f"bad.{ext}" in line
    assert "2 NaN/Inf voxels" in line and "x=5, y=4, z=3" in line
    _assert_no_outputs(tmp_path)


def test_e4_nifti_without_nan_reads_normally(tmp_path, images):
    from regcli.io.images import nonfinite_in_nifti, read_image

    assert nonfinite_in_nifti(images["moving"]) is None  # zero background, but no NaN on disk
    assert read_image(images["moving"], "moving image").data.shape == (32, 32, 32)


@pytest.mark.parametrize("option,role", [("--fixed-labels", "fixed labels"), ("--fixed-mask", "fixed mask")])
def test_e4_nan_in_a_float_label_map_or_mask_is_counted_and_located(tmp_path, images, fast, monkeypatch, option,
                                                                     role):
    # the same on-disk count as for images: SimpleITK 2.x would hand these files over with the NaN read as 0
    _no_optimisation(monkeypatch)
    fixed = sitk.ReadImage(str(images["fixed"]))
    if option == "--fixed-labels":
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(images["fixed_labels"]))).astype(np.float32)
    else:
        arr = phantom_mask(fixed).astype(np.float32)
    arr[3, 4, 5] = np.nan  # (z, y, x): index x=5, y=4, z=3
    bad = write(_like(fixed, arr), tmp_path / "bad_map.nii.gz")
    assert sitk.ReadImage(str(bad)).GetPixelID() == sitk.sitkFloat32
    extra = [option, bad] + (["--moving-labels", images["moving_labels"]] if option == "--fixed-labels" else [])
    res = register(images, fast, *extra)
    assert res.exit_code == 3, res.stderr
    assert res.stdout == ""
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and role in line and "bad_map.nii.gz" in line
    assert "1 NaN/Inf voxels" in line and "x=5, y=4, z=3" in line
    _assert_no_outputs(tmp_path)


@pytest.mark.parametrize("ext,fate", [("nii.gz", "resampled as 0"), ("mha", "are NaN/Inf too")])
def test_e4_apply_warns_about_nan_in_its_input_and_says_what_becomes_of_them(tmp_path, images, ext, fate):
    # apply resamples on (statistical maps often carry NaN outside the brain): one warning with the count, the
    # first index and the format's fate (SimpleITK 2.x reads NIfTI NaN as 0; MetaImage keeps them)
    moving = sitk.ReadImage(str(images["moving"]))
    arr = sitk.GetArrayFromImage(moving).copy()
    arr[3, 4, 5] = np.nan  # (z, y, x): index x=5, y=4, z=3
    arr[10, 11, 12] = -np.inf
    bad = write(_like(moving, arr), tmp_path / f"bad.{ext}")
    out = tmp_path / f"out.{ext}"
    res = invoke("apply", "-i", bad, "-r", images["fixed"], "-o", out)
    assert res.exit_code == 0, res.stderr
    warning = [ln for ln in res.stderr.splitlines() if "NaN/Inf" in ln]
    assert len(warning) == 1 and f"bad.{ext}" in warning[0], res.stderr
    assert "2 NaN/Inf voxels" in warning[0] and "x=5, y=4, z=3" in warning[0] and fate in warning[0]
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.isfinite(result).all() == (ext == "nii.gz")
    clean = invoke("apply", "-i", images["moving"], "-r", images["fixed"], "-o", tmp_path / "clean.nii.gz")
    assert clean.exit_code == 0 and "NaN" not in clean.stderr, clean.stderr


# ------------------------------------------------------------------------------------------------ E5
def test_e5_fixed_mask_outside_the_fixed_image_is_refused(tmp_path, images, fast, monkeypatch):
    _no_optimisation(monkeypatch)
    fixed = sitk.ReadImage(str(images["fixed"]))
    mask = _like(fixed, phantom_mask(fixed).astype(np.uint8))
    mask.SetOrigin(tuple(np.asarray(fixed.GetOrigin()) + np.array([500.0, 0.0, 0.0])))
    far = write(mask, tmp_path / "farmask.nii.gz")
    res = register(images, fast, "--fixed-mask", far)
    assert res.exit_code == 4, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("GeometryError:") and "farmask.nii.gz" in line
    assert "mask has 0 voxels inside the fixed image" in line
    _assert_no_outputs(tmp_path)


def test_e5_label_maps_that_cannot_be_scored_are_refused_or_warned_about(tmp_path, images, fast, monkeypatch):
    """Labels outside their image or with no label are refused before any work; labels given for one side only,
    or sharing no value, give a warning (Dice would be missing from the report without a word)."""
    _no_optimisation(monkeypatch)
    labels = sitk.ReadImage(str(images["fixed_labels"]))
    far = sitk.Image(labels)
    far.SetOrigin(tuple(np.asarray(labels.GetOrigin()) + np.array([0.0, 500.0, 0.0])))
    write(far, tmp_path / "farlabels.nii.gz")
    write(_like(labels, np.zeros(sitk.GetArrayFromImage(labels).shape, np.uint8)), tmp_path / "zero.nii.gz")
    for path, code, words in ((tmp_path / "farlabels.nii.gz", 4, "do not overlap the fixed image"),
                              (tmp_path / "zero.nii.gz", 3, "hold no label")):
        res = register(images, fast, "--fixed-labels", path, "--moving-labels", images["moving_labels"])
        line = one_line(res.stderr)
        assert res.exit_code == code and path.name in line and words in line, res.stderr
        _assert_no_outputs(tmp_path)
    monkeypatch.undo()

    res = register(images, fast, "--fixed-labels", images["fixed_labels"], "--no-html", "--json")
    assert res.exit_code == 0, res.stderr
    assert "--fixed-labels without --moving-labels: no Dice" in res.stderr
    import json

    assert any("no Dice" in w for w in json.loads(res.stdout)["warnings"])
    shifted = sitk.GetArrayFromImage(labels).astype(np.int32) + 100 * (sitk.GetArrayFromImage(labels) > 0)
    write(_like(labels, shifted), tmp_path / "other_ids.nii.gz")
    res = register(images, fast, "--fixed-labels", images["fixed_labels"], "--moving-labels",
                   tmp_path / "other_ids.nii.gz", "--no-html", "--overwrite", prefix="q_")
    assert res.exit_code == 0 and "share no label value" in res.stderr, res.stderr
    partial = sitk.GetArrayFromImage(labels).astype(np.int32)
    partial[partial == 1] = 7  # label 1 only in the fixed map, 7 only in the moving one
    write(_like(labels, partial), tmp_path / "partial.nii.gz")
    res = register(images, fast, "--fixed-labels", images["fixed_labels"], "--moving-labels",
                   tmp_path / "partial.nii.gz", "--no-html", "--overwrite", prefix="p_")
    flat = " ".join(res.stderr.split())
    assert res.exit_code == 0 and "only in the fixed labels: 1" in flat and "only in the moving labels: 7" in flat, flat


# ------------------------------------------------------------------------------------------------ G8
def test_g8_mask_header_rounding_is_accepted(tmp_path, images, fast):
    fixed = sitk.ReadImage(str(images["fixed"]))
    mask = _like(fixed, phantom_mask(fixed).astype(np.uint8))
    mask.SetOrigin(tuple(np.asarray(fixed.GetOrigin()) + np.array([1e-5, -1e-5, 1e-5])))
    mpath = write(mask, tmp_path / "mask.nii.gz")
    res = register(images, fast, "--fixed-mask", mpath, "--verbose")
    assert res.exit_code == 0, res.stderr
    for name in ("0GenericAffine.mat", "1Warp.nii.gz", "Warped.nii.gz", "Report.json"):
        assert (tmp_path / f"p_{name}").exists(), name
    assert "within 1e-4 x spacing" in res.stderr  # the debug note

    # the mask is taken on the image's grid as it is, not resampled
    from regcli.io.images import read_image, read_mask
    from regcli.pipeline import _mask_on

    img, m = read_image(images["fixed"], "fixed image"), read_mask(mpath, "fixed mask")
    assert m.grid != img.grid
    on = _mask_on(m, img.grid, "fixed mask")
    assert on.grid == img.grid and bool((on.data == m.data).all())


# ------------------------------------------------------------------------------------------------ E1 / E7, fast
def _corrupt(kind: str, images, tmp_path):
    """A moving image that the header check refuses: cut at half (.nii.gz), not gzip, an uncompressed NIfTI cut
    short, or a 2D image."""
    data = images["moving"].read_bytes()
    if kind == "half .nii.gz":
        return tmp_path.joinpath("cut.nii.gz"), data[: len(data) // 2]
    if kind == "not gzip":
        return tmp_path.joinpath("text.nii.gz"), b"not an image at all\n" * 40
    if kind == "short .nii":
        raw = sitk.ReadImage(str(images["moving"]))
        whole = write(raw, tmp_path / "whole.nii").read_bytes()
        return tmp_path.joinpath("short.nii"), whole[: len(whole) - 1000]
    flat = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(images["moving"])))[5])
    return write(flat, tmp_path / "flat.nii.gz"), None


@pytest.mark.parametrize("kind", ["half .nii.gz", "not gzip", "short .nii", "2D"])
def test_a_corrupt_input_is_refused_before_torch_is_imported(tmp_path, images, kind):
    """`regcli register` refuses a truncated, non-gzip or 2D input from its header (and, for NIfTI, its size or gzip
    trailer) before it imports torch (seconds): exit 3, the line the full read gives, nothing written."""
    import subprocess
    import sys

    from conftest import child_env
    from regcli.errors import InputError
    from regcli.io.images import read_image

    path, data = _corrupt(kind, images, tmp_path)
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(InputError) as e:
        read_image(path, "moving image")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "regcli", "register", str(images["fixed"]),
                        str(path), "-o", str(tmp_path / "p_")], env=child_env(), capture_output=True, text=True,
                       timeout=120)
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    line = one_line("\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("import time:")))
    assert r.returncode == 3 and line == e.value.one_line(), (line, e.value.one_line())
    assert "regcli.cli.register" in imported or "regcli.cli.app" in imported, imported[-5:]
    assert "torch" not in imported, "torch was imported before the input was refused"
    _assert_no_outputs(tmp_path)


def test_the_header_check_passes_whole_files_and_gzip_of_several_members(tmp_path, images):
    """A whole .nii.gz passes the header check; so does one written as two gzip members (its trailer holds the
    second member's length only), which the full read then reads as the original."""
    import gzip

    from regcli.io.images import check_image_header, read_image

    check_image_header(images["moving"], "moving image")
    payload = gzip.decompress(images["moving"].read_bytes())
    two = tmp_path / "two_members.nii.gz"
    two.write_bytes(gzip.compress(payload[:1000]) + gzip.compress(payload[1000:]))
    check_image_header(two, "moving image")
    assert bool((read_image(two).data == read_image(images["moving"]).data).all())


# ------------------------------------------------------------------------------------------------ E7
def test_e7_5d_image_names_the_dimension(tmp_path, images, fast, monkeypatch):
    _no_optimisation(monkeypatch)
    fixed = sitk.ReadImage(str(images["fixed"]))
    vol = sitk.GetArrayFromImage(fixed)
    five = sitk.GetImageFromArray(np.stack([vol, vol])[:, None])  # numpy (2, 1, Z, Y, X): ITK size X,Y,Z,1,2
    assert five.GetDimension() == 5
    path = write(five, tmp_path / "five.nii.gz")
    assert sitk.ReadImage(str(path)).GetDimension() == 5
    res = register(images, fast, moving=path)
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "five.nii.gz" in line and "5D" in line and "32x32x32x1x2" in line
    _assert_no_outputs(tmp_path)


# ------------------------------------------------------------------------------------------------ E10 / O4
def _patch_instance_similarity(monkeypatch, after: int, action):
    """Wrap the deformable stage's similarity (the instance solver's ``feature_ssd``): from call ``after`` + 1
    on, ``action(value)`` replaces its value. Counts calls; returns the counter."""
    import regcli.solvers.instance as instance

    real = instance.make_similarity
    calls = {"n": 0}

    def make(name, **params):
        sim = real(name, **params)
        if name != "feature_ssd":  # the affine stage's metric stays untouched
            return sim

        def wrapped(fixed, warped, mask=None):
            calls["n"] += 1
            value = sim(fixed, warped, mask)
            return action(value) if calls["n"] > after else value

        wrapped.pointwise = getattr(sim, "pointwise", False)
        return wrapped

    monkeypatch.setattr(instance, "make_similarity", make)
    return calls


def test_e10_diverging_deformable_stage_is_convergence_error(tmp_path, images, fast, monkeypatch):
    calls = _patch_instance_similarity(monkeypatch, 3, lambda v: v * float("nan"))
    res = register(images, fast)
    assert calls["n"] == 4  # stopped at the first NaN loss
    assert res.exit_code == 5, res.stderr
    line = error_line(res.stderr)
    assert line.startswith("ConvergenceError:")
    assert "instance optimisation" in line and "iteration 4" in line and "nan" in line
    assert res.stdout == ""
    _assert_no_outputs(tmp_path)
    calls["n"] = 0
    quiet = register(images, fast, "--quiet", prefix="q_")  # without progress logs: exactly that line
    assert quiet.exit_code == 5 and one_line(quiet.stderr) == line
    _assert_no_outputs(tmp_path, "q_")


def test_o4_interrupt_during_the_solver_exits_130_and_leaves_nothing(tmp_path, images, fast, monkeypatch):
    def interrupt(value):
        raise KeyboardInterrupt

    calls = _patch_instance_similarity(monkeypatch, 2, interrupt)
    res = register(images, fast)
    assert calls["n"] == 3
    assert res.exit_code == 130, res.stderr
    _assert_no_outputs(tmp_path)


def test_o4_interrupt_while_writing_removes_the_temporaries(tmp_path, images, fast, monkeypatch):
    """Ctrl-C after some outputs are already staged as temporaries: they are all removed, nothing published."""
    import regcli.io.transforms as transforms

    real = transforms.write_displacement
    written = []

    def write_then_interrupt(field, path, *a, **k):
        real(field, path, *a, **k)
        written.append(path)
        if len(written) == 2:  # both warps are on disk as temporaries, then Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(transforms, "write_displacement", write_then_interrupt)
    res = register(images, fast, "--threads", "1")
    assert len(written) == 2 and all(".regcli-tmp" in p.name for p in written)
    assert res.exit_code == 130, res.stderr
    _assert_no_outputs(tmp_path)
