"""NIfTI qform/sform precedence (RELIABILITY G7) and image round trips between regcli, nibabel and SimpleITK (R6).

regcli's geometry is SimpleITK's reading of the file. These tests pin *which* header transform SimpleITK (ITK's
NiftiImageIO) uses, so that a change in ITK's rule fails here rather than silently moving images:

* only one code set -> that transform;
* both set -> the sform when ``sform_code == 1`` (SCANNER_ANAT) or when the two nearly agree, else the qform
  (nibabel's ``get_best_affine``, FSL and NiftyReg would use the sform whenever ``sform_code > 0``);
* a sheared or singular sform is never used: with a qform ITK falls back to it, without one it cannot read
  the file (regcli: GeometryError, exit 4);
* ITK takes voxel sizes from pixdim, not from the sform's column norms.

Files are written with nibabel (RAS) and compared in LPS: negate x and y.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import invoke, one_line
from regcli.errors import GeometryError, InputError
from regcli.io.images import read_image, read_labels, read_nifti_xforms, write_image
from regcli.io.transforms import read_transform
from regcli.spaces import Grid, Image

nib = pytest.importorskip("nibabel")

SIZE = (12, 10, 8)  # nibabel order (i, j, k)
SPACING = (1.5, 1.2, 2.0)
TOL_MM = 1e-5
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def _rot(deg: float, axis: int) -> np.ndarray:
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(rotation: np.ndarray, origin, spacing=SPACING) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation @ np.diag(spacing)
    a[:3, 3] = origin
    return a


# two different oblique index -> RAS affines with the same voxel sizes (they put voxel corners ~7 mm apart)
QFORM = _affine(_rot(10, 2) @ _rot(-5, 0), (10.0, -20.0, 5.0))
SFORM = _affine(_rot(-20, 2) @ _rot(8, 1), (12.0, -18.0, 7.0))


def _corner_distance(a: np.ndarray, b: np.ndarray, size=SIZE) -> float:
    lo, hi = -0.5, np.asarray(size) - 0.5
    c = np.array([[hi[0] if i else lo, hi[1] if j else lo, hi[2] if k else lo, 1.0]
                  for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    return float(np.linalg.norm(c @ (a - b)[:3].T, axis=1).max())


def _ras(grid: Grid) -> np.ndarray:
    return FLIP @ grid.index_to_world()


def _write(path, qform=QFORM, qcode=1, sform=SFORM, scode=1, data=None, zooms=SPACING):
    data = np.random.default_rng(0).random(SIZE).astype(np.float32) if data is None else data
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=qcode)
    img.set_sform(sform, code=scode)
    img.header.set_zooms(tuple(zooms) + img.header.get_zooms()[3:])
    nib.save(img, str(path))
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "regcli" and r.levelno == logging.WARNING]


def _fmt_origin_lps(affine_ras: np.ndarray) -> str:
    o = (FLIP @ affine_ras)[:3, 3]
    return "(" + ", ".join(f"{x:.4g}" for x in o) + ")"


# ------------------------------------------------------------------------------------------------ G7
@pytest.mark.parametrize("qcode,scode,expected", [(0, 1, "sform"), (0, 2, "sform"), (0, 4, "sform"),
                                                  (1, 0, "qform"), (2, 0, "qform")])
def test_g7_a_single_form_is_used_without_warning(tmp_path, caplog, qcode, scode, expected):
    p = _write(tmp_path / "one.nii.gz", qcode=qcode, scode=scode)
    caplog.set_level(logging.WARNING, logger="regcli")
    img = read_image(p)
    want = {"qform": QFORM, "sform": SFORM}[expected]
    assert _corner_distance(_ras(img.grid), want) < TOL_MM
    assert _corner_distance(_ras(img.grid), nib.load(str(p)).affine) < TOL_MM  # nibabel agrees here
    assert _warnings(caplog) == []


@pytest.mark.parametrize("qcode,scode,used", [(1, 1, "sform"), (2, 1, "sform"), (1, 2, "qform"), (1, 4, "qform"),
                                              (2, 2, "qform")])
def test_g7_disagreeing_forms_warn_once_naming_both(tmp_path, caplog, capfd, qcode, scode, used):
    p = _write(tmp_path / "both.nii.gz", qcode=qcode, scode=scode)
    caplog.set_level(logging.WARNING, logger="regcli")
    img = read_image(p, "moving image")
    want = {"qform": QFORM, "sform": SFORM}[used]
    # the rule pinned against SimpleITK's own reading (regcli does not parse the geometry itself)
    assert _corner_distance(_ras(Grid.from_sitk(sitk.ReadImage(str(p)))), want) < TOL_MM
    assert _corner_distance(_ras(img.grid), want) < TOL_MM
    (msg,) = _warnings(caplog)
    assert "\n" not in msg and str(p) in msg and "moving image" in msg
    assert f"qform (qform_code={qcode})" in msg and f"sform (sform_code={scode})" in msg
    assert f"regcli uses the {used}" in msg
    assert _fmt_origin_lps(QFORM) in msg and _fmt_origin_lps(SFORM) in msg
    assert "unexpected scales" not in capfd.readouterr().err


def test_g7_disagreement_threshold_is_1e3_mm(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="regcli")
    for shift, warns in ((2e-4, False), (1e-2, True)):
        near = QFORM.copy()
        near[0, 3] += shift
        read_image(_write(tmp_path / f"shift{shift}.nii.gz", qform=QFORM, sform=near))
        assert bool(_warnings(caplog)) is warns, shift
        caplog.clear()


def test_g7_files_written_by_simpleitk_and_regcli_do_not_warn(tmp_path, caplog):
    """ITK writes qform (float quaternion) and sform from the same direction: they agree far below 1e-3 mm."""
    caplog.set_level(logging.WARNING, logger="regcli")
    img = sitk.Image([64, 64, 48], sitk.sitkFloat32)
    img.SetSpacing((0.7, 0.7, 3.1))
    img.SetOrigin((-123.4, 87.6, 45.3))
    img.SetDirection(sitk.VersorTransform((0.3, 0.2, 0.93), math.radians(33)).GetMatrix())
    sitk.WriteImage(img, str(tmp_path / "itk.nii.gz"))
    labels = read_labels(tmp_path / "itk.nii.gz")
    write_image(labels, tmp_path / "regcli.nii.gz", dtype="uint8")
    read_labels(tmp_path / "regcli.nii.gz")
    assert _warnings(caplog) == []


@pytest.mark.parametrize("shear", [0.3, 0.002])
def test_g7_sheared_sform_without_qform_is_a_geometry_error(tmp_path, shear):
    sheared = SFORM.copy()
    sheared[0, 1] += shear
    p = _write(tmp_path / "shear.nii.gz", qcode=0, sform=sheared)
    with pytest.raises(RuntimeError, match="orthonormal"):  # what SimpleITK itself does
        sitk.ReadImage(str(p))
    with pytest.raises(GeometryError) as e:
        read_image(p, "fixed image")
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "fixed image" in msg and "sheared" in msg
    res = invoke("info", p)
    assert res.exit_code == 4 and res.stdout == ""
    line = one_line(res.stderr)
    assert line.startswith("GeometryError:") and "shear.nii.gz" in line and "sheared" in line


def test_g7_singular_sform_without_qform_is_a_geometry_error(tmp_path):
    flat = SFORM.copy()
    flat[:3, 0] = flat[:3, 1] / SPACING[1] * SPACING[0]  # two parallel index axes
    p = _write(tmp_path / "flat.nii", qcode=0, sform=flat)
    with pytest.raises(GeometryError, match="degenerate"):
        read_image(p)


def test_g7_sheared_sform_with_a_qform_falls_back_to_the_qform_with_a_warning(tmp_path, caplog, capfd):
    sheared = SFORM.copy()
    sheared[0, 1] += 0.3
    p = _write(tmp_path / "shear_q.nii.gz", sform=sheared)
    caplog.set_level(logging.WARNING, logger="regcli")
    img = read_image(p)
    assert _corner_distance(_ras(img.grid), QFORM) < TOL_MM
    (msg,) = _warnings(caplog)
    assert "regcli uses the qform" in msg and "sheared" in msg and str(p) in msg
    assert "unexpected scales" not in capfd.readouterr().err  # ITK's own multi-line warning is replaced


def test_g7_sform_voxel_sizes_that_differ_from_pixdim_warn(tmp_path, caplog, capfd):
    """ITK keeps the sform's origin and direction but takes voxel sizes from pixdim."""
    scaled = SFORM.copy()
    scaled[:3, :3] *= 1.01
    p = _write(tmp_path / "scales.nii.gz", qcode=0, sform=scaled)
    caplog.set_level(logging.WARNING, logger="regcli")
    img = read_image(p)
    assert np.allclose(img.grid.spacing, SPACING, atol=1e-6)
    expected = SFORM.copy()
    assert _corner_distance(_ras(img.grid), expected) < TOL_MM
    (msg,) = _warnings(caplog)
    assert "pixdim" in msg and str(p) in msg
    assert "unexpected scales" not in capfd.readouterr().err


def test_g7_cli_info_shows_the_warning_as_one_stderr_line(tmp_path):
    p = _write(tmp_path / "both.nii.gz", qcode=1, scode=2)
    res = invoke("info", p, "--json")
    assert res.exit_code == 0
    d = json.loads(res.stdout)
    assert _corner_distance(np.asarray(d["ras_affine"]), QFORM) < 1e-4
    line = one_line(res.stderr)
    assert line.startswith("Warning:") and "both.nii.gz" in line and "qform" in line and "sform" in line


def test_g7_read_grid_reads_the_header_like_read_image(tmp_path, caplog):
    """read_grid (header only: apply's reference, evaluation's fixed grid) gives read_image's grid and warning."""
    from regcli.io.images import read_grid

    p = _write(tmp_path / "both.nii.gz", qcode=1, scode=2)
    caplog.set_level(logging.WARNING, logger="regcli")
    grid = read_grid(p, "reference image")
    (msg,) = _warnings(caplog)
    assert "reference image" in msg and str(p) in msg and "regcli uses the qform" in msg
    caplog.clear()
    img = read_image(p, "reference image")
    assert grid.allclose(img.grid) and _corner_distance(_ras(grid), QFORM) < TOL_MM
    assert _warnings(caplog) == []  # once per file and process: register's pre-flight reads the header first
    sheared = SFORM.copy()
    sheared[0, 1] += 0.3
    with pytest.raises(GeometryError, match="sheared"):
        read_grid(_write(tmp_path / "shear.nii", qcode=0, sform=sheared), "fixed image")


def test_g7_apply_refuses_a_sheared_reference_in_one_line_and_writes_nothing(tmp_path):
    moving = _write(tmp_path / "in.nii.gz", qcode=1, scode=0)
    sheared = SFORM.copy()
    sheared[0, 1] += 0.3
    ref = _write(tmp_path / "ref.nii.gz", qcode=0, sform=sheared)
    before = sorted(tmp_path.iterdir())
    res = invoke("apply", "-i", moving, "-r", ref, "-o", tmp_path / "out.nii.gz")
    assert res.exit_code == 4, res.stderr
    assert res.stdout == ""
    line = one_line(res.stderr)
    assert line.startswith("GeometryError:") and "reference image" in line and "ref.nii.gz" in line
    assert "sheared" in line and "qform_code=0" in line
    assert sorted(tmp_path.iterdir()) == before  # no output, no temporary


def test_g7_apply_warns_once_for_a_reference_whose_forms_disagree(tmp_path):
    moving = _write(tmp_path / "in.nii.gz", qcode=1, scode=0)
    ref = _write(tmp_path / "ref.nii.gz", qcode=1, scode=2)  # ITK uses the qform
    out = tmp_path / "out.nii.gz"
    res = invoke("apply", "-i", moving, "-r", ref, "-o", out)
    assert res.exit_code == 0, res.stderr
    warned = [ln for ln in res.stderr.splitlines() if "qform" in ln or "sform" in ln]
    assert len(warned) == 1, res.stderr
    (line,) = warned
    assert line.startswith("Warning:") and "reference image" in line and "ref.nii.gz" in line
    assert "qform (qform_code=1)" in line and "sform (sform_code=2)" in line and "regcli uses the qform" in line
    assert "unexpected scales" not in res.stderr
    # the output takes the grid regcli warned it would use
    assert _corner_distance(nib.load(str(out)).affine, QFORM) < 1e-4

@pytest.mark.parametrize("endianness", ["<", ">"])
def test_g7_header_parser_matches_nibabel(tmp_path, endianness):
    rng = np.random.default_rng(3)
    for n in range(6):
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # any rotation or reflection (qfac = -1)
        qform = _affine(q, rng.uniform(-100, 100, 3), rng.uniform(0.5, 3.0, 3))
        sform = _affine(rng.standard_normal((3, 3)), rng.uniform(-100, 100, 3), (1, 1, 1))
        hdr = nib.Nifti1Header(endianness=endianness)
        img = nib.Nifti1Image(np.zeros(SIZE, np.int16), None, hdr)
        img.set_qform(qform, code=1)
        img.set_sform(sform, code=2)
        p = tmp_path / f"h{n}.nii" if n % 2 else tmp_path / f"h{n}.nii.gz"
        nib.save(img, str(p))
        back = nib.load(str(p)).header
        assert back.endianness == endianness
        xf = read_nifti_xforms(p)
        assert xf.size == SIZE and (xf.qform_code, xf.sform_code) == (1, 2)
        assert np.allclose(xf.qform, back.get_qform(), atol=1e-4)
        assert np.allclose(xf.sform, back.get_sform(), atol=1e-4)
    assert read_nifti_xforms(tmp_path / "missing.nii") is None


# ------------------------------------------------------------------------------------------------ R6
def _grid_ras_error(grid: Grid, affine: np.ndarray) -> float:
    return _corner_distance(_ras(grid), affine, grid.size)


def test_r6_int16_with_scl_slope_and_inter(tmp_path):
    raw = (np.arange(np.prod(SIZE)).reshape(SIZE) % 1000 - 300).astype(np.int16)
    img = nib.Nifti1Image(raw, QFORM, dtype=np.int16)
    img.header.set_slope_inter(2.0, -5.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    stored = nib.load(str(tmp_path / "scaled.nii.gz"))
    assert stored.get_data_dtype() == np.int16 and np.array_equal(np.asarray(stored.dataobj.get_unscaled()), raw)
    expected = raw.astype(np.float64) * 2.0 - 5.0
    eps = np.finfo(np.float32).eps

    ours = read_image(tmp_path / "scaled.nii.gz")  # nibabel -> regcli
    assert ours.data.dtype == torch.float32
    got = ours.numpy().transpose(2, 1, 0)  # (Z, Y, X) -> nibabel (i, j, k)
    assert np.all(np.abs(got - expected) <= eps * np.abs(expected))
    assert _grid_ras_error(ours.grid, stored.affine) < TOL_MM

    write_image(ours, tmp_path / "float.nii.gz")  # regcli -> nibabel, SimpleITK
    back = nib.load(str(tmp_path / "float.nii.gz"))
    assert np.all(np.abs(back.get_fdata() - expected) <= eps * np.abs(expected))
    assert _corner_distance(back.affine, stored.affine) < TOL_MM
    s = sitk.ReadImage(str(tmp_path / "float.nii.gz"))
    assert np.all(np.abs(sitk.GetArrayFromImage(s).transpose(2, 1, 0) - expected) <= eps * np.abs(expected))

    write_image(ours, tmp_path / "int.nii.gz", dtype="int16")  # the scaled values are integers: exact
    back = nib.load(str(tmp_path / "int.nii.gz"))
    assert back.get_data_dtype() == np.int16 and np.array_equal(np.asarray(back.dataobj), expected.astype(np.int16))


def test_r6_uint8_labels_are_exact(tmp_path):
    labels = np.random.default_rng(1).integers(0, 256, SIZE).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, SFORM), str(tmp_path / "lab.nii.gz"))
    ours = read_labels(tmp_path / "lab.nii.gz")
    assert ours.data.dtype == torch.int32
    assert np.array_equal(ours.numpy().transpose(2, 1, 0), labels)
    assert _grid_ras_error(ours.grid, SFORM) < TOL_MM

    write_image(ours, tmp_path / "out.nii.gz", dtype="uint8")
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert back.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(back.dataobj), labels)
    assert _corner_distance(back.affine, SFORM) < TOL_MM
    s = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert s.GetPixelID() == sitk.sitkUInt8 and np.array_equal(sitk.GetArrayFromImage(s).transpose(2, 1, 0), labels)


def test_r6_three_component_vector_image(tmp_path):
    vec = np.random.default_rng(2).standard_normal(SIZE + (1, 3)).astype(np.float32)  # ANTs (X, Y, Z, 1, 3)
    img = nib.Nifti1Image(vec, QFORM)
    img.header.set_intent("vector")
    nib.save(img, str(tmp_path / "vec.nii.gz"))
    (field,) = read_transform(str(tmp_path / "vec.nii.gz"))  # nibabel -> regcli (components stay as stored)
    assert field.disp.shape == (3,) + SIZE[::-1]
    assert np.array_equal(np.moveaxis(field.disp.numpy(), 0, -1).transpose(2, 1, 0, 3), vec[:, :, :, 0, :])
    assert _grid_ras_error(field.grid, QFORM) < TOL_MM

    write_image(Image(field.disp, field.grid), tmp_path / "out.nii.gz")  # regcli -> nibabel, SimpleITK
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert back.shape == SIZE + (1, 3) and back.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(back.dataobj), vec)
    assert _corner_distance(back.affine, QFORM) < TOL_MM
    s = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert s.GetNumberOfComponentsPerPixel() == 3
    assert np.array_equal(sitk.GetArrayFromImage(s).transpose(2, 1, 0, 3), vec[:, :, :, 0, :])


def test_r6_float32_3d_image(tmp_path):
    data = np.random.default_rng(4).standard_normal(SIZE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, SFORM), str(tmp_path / "f.nii"))
    ours = read_image(tmp_path / "f.nii")
    assert np.array_equal(ours.numpy().transpose(2, 1, 0), data)
    assert _grid_ras_error(ours.grid, SFORM) < TOL_MM
    write_image(ours, tmp_path / "out.nii.gz")
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert back.get_data_dtype() == np.float32 and np.array_equal(np.asarray(back.dataobj), data)
    assert _corner_distance(back.affine, SFORM) < TOL_MM
    assert int(back.header["qform_code"]) > 0 and int(back.header["sform_code"]) > 0
    assert _corner_distance(back.header.get_qform(), back.header.get_sform()) < 1e-4
    s = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(s), ours.numpy())
    assert Grid.from_sitk(s).allclose(ours.grid)


def test_r6_2d_image_is_a_one_line_input_error(tmp_path):
    """regcli registers 3D volumes only: a 2D file is refused on read, naming the file (as E7)."""
    nib.save(nib.Nifti1Image(np.random.default_rng(5).random((12, 10)).astype(np.float32), QFORM),
             str(tmp_path / "two.nii.gz"))
    for reader in (read_image, read_labels):
        with pytest.raises(InputError, match="2D") as e:
            reader(tmp_path / "two.nii.gz")
        assert "\n" not in str(e.value) and "two.nii.gz" in str(e.value)
    res = invoke("info", tmp_path / "two.nii.gz", "--json")  # info still describes it
    assert res.exit_code == 0 and json.loads(res.stdout)["size"] == [12, 10]


def test_g7_evaluate_shows_each_childs_warning_once_and_keeps_it_in_the_row(tmp_path):
    """`evaluate` registers in a child whose stderr is not shown: the child's report lists its warnings
    (``warnings``), the parent shows each once with the pair's name (the fixed image's, which the parent's own
    scoring meets again, not twice) and keeps them in the row of evaluation.json."""
    import csv

    from conftest import make_phantom, phantom_labels, write as write_sitk

    shift = np.diag([1.0, 1.0, 1.0, 1.0])
    shift[:3, 3] = (2.0, 0.0, 0.0)
    paths = {}
    for role, transform in (("fixed", None), ("moving", lambda p: p + np.array([1.0, 0.0, 0.0]))):
        img = make_phantom("LPS", "iso", transform=transform)
        plain = write_sitk(img, tmp_path / f"{role}_plain.nii.gz")
        nii = nib.load(str(plain))
        out = nib.Nifti1Image(np.asarray(nii.dataobj), None, nii.header)
        out.set_qform(nii.affine, code=1)
        out.set_sform(shift @ nii.affine, code=2)  # 2 mm away: ITK uses the qform, and regcli warns
        paths[role] = tmp_path / f"{role}.nii.gz"
        nib.save(out, str(paths[role]))
        paths[f"{role}_labels"] = write_sitk(phantom_labels(img), tmp_path / f"{role}_labels.nii.gz")
    manifest = tmp_path / "pairs.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "fixed_image", "moving_image", "fixed_labels", "moving_labels"])
        w.writerow(["p1", "fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz"])
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("affine:\n  levels_mm: [4.0]\n  iterations: [10]\n")
    res = invoke("evaluate", manifest, "--method", "affine", "--config", cfg, "-o", tmp_path / "ev", "--threads", "2")
    assert res.exit_code == 0, res.stderr
    warned = [ln for ln in res.stderr.splitlines() if "disagree" in ln]
    assert len(warned) == 2, res.stderr
    assert any("fixed image" in ln and "fixed.nii.gz" in ln for ln in warned), warned
    assert any("moving image" in ln and "moving.nii.gz" in ln for ln in warned), warned
    assert all(ln.startswith("Warning: p1: ") for ln in warned), warned
    row = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["pairs"][0]
    assert len(row["warnings"]) == 2 and all("disagree" in w for w in row["warnings"])
    report = json.loads((tmp_path / "ev" / "p1_Report.json").read_text())
    assert report["warnings"] == row["warnings"]
