"""``regcli apply`` against SimpleITK (always) and antspyx (oracle): images, labels, points, 4D, file formats.

RELIABILITY rows: G6 (translation matrix over the fixture geometries), R5 (affine .mat/.txt interop), T1
(composite .h5 vs one collapsed field, order sensitivity), T6 (points vs images), E9 (integer image with
linear interpolation), R7 (4D input: resampled volume by volume, never only the first volume).
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import DIRECTIONS, SPACINGS, has_antspyx, make_phantom, phantom_labels, phantom_mask
from regcli.cli.app import app
from regcli.io.transforms import read_transform, read_transform_list, write_affine, write_composite, \
    write_displacement
from regcli.spaces import Grid
from regcli.transforms import AffineTransform, CompositeTransform, DisplacementField

runner = CliRunner()

AXES = {"x": (-10.0, 0.0, 0.0), "xy": (-10.0, -10.0, 0.0), "xyz": (-10.0, -10.0, -10.0)}


def run_ok(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}\n{res.exception!r}"
    return res


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _translation_files(tmp_path, t, grid: Grid):
    """The same translation as an affine .mat and as a constant displacement field on ``grid``."""
    aff = tmp_path / "t.mat"
    write_affine(AffineTransform.translation(t), aff)
    disp = torch.tensor(t, dtype=torch.float32)[:, None, None, None].expand(3, *grid.shape).contiguous()
    warpf = tmp_path / "t_warp.nii.gz"
    write_displacement(DisplacementField(disp, grid), warpf)
    tx = sitk.TranslationTransform(3, t)
    return aff, warpf, tx


# ------------------------------------------------------------------------------------------------ G6
@pytest.mark.parametrize("axes", list(AXES))
@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_g6_translation_matches_sitk_resample(tmp_path, direction, spacing, axes):
    """-10 mm translations on 1, 2, 3 axes; moving in this geometry, reference an oblique iso grid."""
    moving = make_phantom(direction, spacing)
    reference = make_phantom("oblique15" if direction != "oblique15" else "LPS", "iso")
    labels = phantom_labels(moving)
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "ml.nii.gz"))
    sitk.WriteImage(reference, str(tmp_path / "r.nii.gz"))
    aff, warpf, tx = _translation_files(tmp_path, AXES[axes], Grid.from_sitk(reference))

    want = sitk.GetArrayFromImage(sitk.Resample(moving, reference, tx, sitk.sitkLinear, 0.0))
    want_lab = sitk.GetArrayFromImage(sitk.Resample(labels, reference, tx, sitk.sitkNearestNeighbor, 0))
    mask = phantom_mask(reference, erode=2)
    rng = float(want.max() - want.min())
    for tfile in (aff, warpf):
        run_ok(["apply", "-i", tmp_path / "m.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", tfile,
                "-o", tmp_path / "o.nii.gz", "--overwrite", "--quiet"])
        got = _read(tmp_path / "o.nii.gz")
        assert got.shape == want.shape
        rmse = float(np.sqrt(np.mean((got[mask] - want[mask]) ** 2)))
        assert rmse < 0.01 * rng, f"{tfile.name}: linear RMSE {rmse:.2e} vs range {rng:.3f}"
        run_ok(["apply", "-i", tmp_path / "ml.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", tfile,
                "-o", tmp_path / "ol.nii.gz", "--interp", "nearest", "--overwrite", "--quiet"])
        got_lab = _read(tmp_path / "ol.nii.gz")
        assert np.issubdtype(got_lab.dtype, np.integer)
        agree = float(np.mean(got_lab == want_lab))
        assert agree >= 0.995, f"{tfile.name}: nearest labels agree on {agree:.4f}"
    # the content really moved: the untransformed resampling differs
    ident = sitk.GetArrayFromImage(sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0))
    assert np.sqrt(np.mean((ident[mask] - want[mask]) ** 2)) > 0.05 * rng


@pytest.mark.oracle
@pytest.mark.skipif(not has_antspyx(), reason="antspyx not installed")
@pytest.mark.parametrize("axes", list(AXES))
@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_g6_translation_matches_ants(tmp_path, direction, spacing, axes):
    import ants

    moving = make_phantom(direction, spacing)
    reference = make_phantom("oblique15" if direction != "oblique15" else "LPS", "iso")
    labels = phantom_labels(moving)
    for img, name in ((moving, "m"), (labels, "ml"), (reference, "r")):
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    aff, warpf, _ = _translation_files(tmp_path, AXES[axes], Grid.from_sitk(reference))
    a_ref, a_mov = ants.image_read(str(tmp_path / "r.nii.gz")), ants.image_read(str(tmp_path / "m.nii.gz"))
    a_lab = ants.image_read(str(tmp_path / "ml.nii.gz"))
    mask = phantom_mask(reference, erode=2)
    for tfile in (aff, warpf):
        want = ants.apply_transforms(a_ref, a_mov, [str(tfile)], interpolator="linear").numpy().transpose(2, 1, 0)
        want_lab = ants.apply_transforms(a_ref, a_lab, [str(tfile)], interpolator="nearestNeighbor").numpy() \
            .transpose(2, 1, 0)
        run_ok(["apply", "-i", tmp_path / "m.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", tfile,
                "-o", tmp_path / "o.nii.gz", "--overwrite", "--quiet"])
        run_ok(["apply", "-i", tmp_path / "ml.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", tfile,
                "-o", tmp_path / "ol.nii.gz", "--interp", "nearest", "--overwrite", "--quiet"])
        got, got_lab = _read(tmp_path / "o.nii.gz"), _read(tmp_path / "ol.nii.gz")
        rng = float(want.max() - want.min())
        rmse = float(np.sqrt(np.mean((got[mask] - want[mask]) ** 2)))
        assert rmse < 0.01 * rng
        assert float(np.mean(got_lab == np.rint(want_lab))) >= 0.995


@pytest.mark.oracle
@pytest.mark.skipif(not has_antspyx(), reason="antspyx not installed")
def test_apply_warp_then_affine_matches_ants(tmp_path):
    """A smooth field plus a rotation, listed [Warp, Affine] as register writes them: same image as ANTs."""
    import ants

    fixed = make_phantom("oblique15", "aniso")
    moving = make_phantom("PIL", "iso")
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    fg = Grid.from_sitk(fixed)
    A = AffineTransform.from_linear(sitk.VersorTransform((0, 0.3, 1), math.radians(12)).GetMatrix(), (2, -3, 1),
                                    fg.center_world())
    w = fg.world_coords()
    u = torch.stack([3 * torch.sin(w[..., 1] / 6), 2 * torch.cos(w[..., 0] / 7), torch.sin(w[..., 2] / 5)]).float()
    write_affine(A, tmp_path / "p_0GenericAffine.mat")
    write_displacement(DisplacementField(u, fg), tmp_path / "p_1Warp.nii.gz")
    specs = [str(tmp_path / "p_1Warp.nii.gz"), str(tmp_path / "p_0GenericAffine.mat")]
    run_ok(["apply", "-i", tmp_path / "m.nii.gz", "-r", tmp_path / "f.nii.gz", "-t", specs[0], "-t", specs[1],
            "-o", tmp_path / "o.nii.gz", "-q"])
    got = _read(tmp_path / "o.nii.gz")
    want = ants.apply_transforms(ants.image_read(str(tmp_path / "f.nii.gz")),
                                 ants.image_read(str(tmp_path / "m.nii.gz")), specs,
                                 interpolator="linear").numpy().transpose(2, 1, 0)
    mask = phantom_mask(fixed, erode=2)
    rmse = float(np.sqrt(np.mean((got[mask] - want[mask]) ** 2)))
    assert rmse < 0.005 * float(want.max() - want.min())


# ------------------------------------------------------------------------------------------------ R5
def _general_affine() -> AffineTransform:
    R = np.asarray(sitk.VersorTransform((0.3, 0.2, 0.93), math.radians(20)).GetMatrix()).reshape(3, 3)
    A = R @ np.array([[1.1, 0.05, 0.0], [0.0, 0.95, 0.02], [0.0, 0.0, 1.03]])
    return AffineTransform.from_linear(A, (3.3, -7.1, 12.345), center=(10.5, -20.25, 4.125))


@pytest.mark.parametrize("ext", [".mat", ".txt"])
def test_r5_affine_file_read_by_sitk_maps_like_regcli(tmp_path, ext):
    T = _general_affine()
    path = tmp_path / f"a{ext}"
    write_affine(T, path)
    pts = np.random.default_rng(0).uniform(-60, 60, (200, 3))
    ours = T.map_points(torch.from_numpy(pts)).numpy()
    tx = sitk.ReadTransform(str(path))
    theirs = np.array([tx.TransformPoint(tuple(p)) for p in pts])
    assert np.abs(ours - theirs).max() < 1e-6
    back = read_transform(str(path))[0]
    assert np.abs(back.map_points(torch.from_numpy(pts)).numpy() - ours).max() < 1e-6


@pytest.mark.oracle
@pytest.mark.skipif(not has_antspyx(), reason="antspyx not installed")
@pytest.mark.parametrize("ext", [".mat", ".txt"])
def test_r5_affine_file_read_by_ants(tmp_path, ext):
    """antspyx reads the same parameters and maps points the same way.

    antspyx rounds transform parameters to float32 when reading, even with ``precision="double"`` (a
    translation of 3.3 reads back as 3.29999995), so points at +-60 mm agree to ~1e-5 mm, not the 1e-6 mm
    that SimpleITK (double throughout) reaches in the test above.
    """
    import ants

    T = _general_affine()
    path = tmp_path / f"a{ext}"
    write_affine(T, path)
    tx = ants.read_transform(str(path), precision="double")
    ref = np.asarray(T.to_sitk().GetParameters())
    assert np.allclose(np.asarray(tx.parameters, dtype=np.float64), ref, rtol=1e-6, atol=1e-6)
    assert np.allclose(np.asarray(tx.fixed_parameters, dtype=np.float64), T.center, atol=1e-6)
    pts = np.random.default_rng(1).uniform(-60, 60, (50, 3))
    ours = T.map_points(torch.from_numpy(pts)).numpy()
    theirs = np.array([tx.apply_to_point(tuple(float(v) for v in p)) for p in pts])
    assert np.abs(ours - theirs).max() < 1e-4


def test_r5_txt_write_read_write_is_byte_identical(tmp_path):
    write_affine(_general_affine(), tmp_path / "a.txt")
    write_affine(read_transform(str(tmp_path / "a.txt"))[0], tmp_path / "b.txt")
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()


# ------------------------------------------------------------------------------------------------ T1
def _rot_and_shift(grid: Grid):
    R = AffineTransform.from_linear(sitk.VersorTransform((0.0, 0.0, 1.0), math.radians(20)).GetMatrix(), (0, 0, 0),
                                    grid.center_world() + np.array([15.0, -10.0, 0.0]))
    S = AffineTransform.translation((25.0, -10.0, 4.0))  # |t - Rt| = 2 |t_xy| sin(10°) = 9.3 mm
    return R, S


def test_t1_h5_composite_equals_collapsed_field(tmp_path):
    fixed = make_phantom("oblique15", "iso")
    grid = Grid.from_sitk(fixed)
    R, S = _rot_and_shift(grid)
    comp = CompositeTransform([R, S])  # a point meets R first, then S
    write_composite(comp, tmp_path / "c.h5")
    write_displacement(comp.to_displacement(grid), tmp_path / "c_field.nii.gz")
    write_displacement(CompositeTransform([S, R]).to_displacement(grid), tmp_path / "rev_field.nii.gz")

    idx = np.random.default_rng(2).uniform(0, np.asarray(grid.size) - 1, (1000, 3))
    pts = grid.index_to_world_points(torch.from_numpy(idx)).numpy()
    h5 = sitk.ReadTransform(str(tmp_path / "c.h5"))

    def field_tx(path):
        img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(img)

    a = np.array([h5.TransformPoint(tuple(p)) for p in pts])
    ftx = field_tx(tmp_path / "c_field.nii.gz")
    b = np.array([ftx.TransformPoint(tuple(p)) for p in pts])
    assert np.linalg.norm(a - b, axis=1).max() < 1e-3
    expected = S.map_points(R.map_points(torch.from_numpy(pts))).numpy()
    assert np.linalg.norm(a - expected, axis=1).max() < 1e-6
    rtx = field_tx(tmp_path / "rev_field.nii.gz")
    c = np.array([rtx.TransformPoint(tuple(p)) for p in pts])
    assert np.linalg.norm(a - c, axis=1).min() > 5.0

    # and `apply` gives the same image through either file
    moving = make_phantom("RAS", "aniso")
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    for t, o in (("c.h5", "o1.nii.gz"), ("c_field.nii.gz", "o2.nii.gz")):
        run_ok(["apply", "-i", tmp_path / "m.nii.gz", "-r", tmp_path / "f.nii.gz", "-t", tmp_path / t,
                "-o", tmp_path / o, "-q"])
    o1, o2 = _read(tmp_path / "o1.nii.gz"), _read(tmp_path / "o2.nii.gz")
    assert np.abs(o1 - o2).max() < 1e-3


# ------------------------------------------------------------------------------------------------ points
def _write_points(path, pts, extra=True):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "x", "y", "z", "comment"] if extra else ["x", "y", "z"])
        for i, p in enumerate(pts):
            row = [repr(float(v)) for v in p]
            w.writerow([i + 1, *row, f"pt {i}"] if extra else row)


def _read_points(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in rows])


def test_points_follow_the_transform_list_and_keep_columns(tmp_path):
    fixed = make_phantom("oblique15", "aniso")
    grid = Grid.from_sitk(fixed)
    A = _general_affine()
    w = grid.world_coords()
    u = torch.stack([2 * torch.sin(w[..., 1] / 6), torch.cos(w[..., 0] / 7), torch.sin(w[..., 2] / 5)]).float()
    F = DisplacementField(u, grid)
    write_affine(A, tmp_path / "a.mat")
    write_displacement(F, tmp_path / "w.nii.gz")
    pts = grid.index_to_world_points(torch.from_numpy(
        np.random.default_rng(3).uniform(2, np.asarray(grid.size) - 3, (40, 3)))).numpy()
    _write_points(tmp_path / "p.csv", pts)
    res = run_ok(["apply", "--points", "-i", tmp_path / "p.csv", "-t", tmp_path / "w.nii.gz", "-t", tmp_path / "a.mat",
                  "-o", tmp_path / "q.csv", "--json"])
    info = __import__("json").loads(res.stdout)
    assert info["points"] == 40
    rows, got = _read_points(tmp_path / "q.csv")
    want = read_transform_list([str(tmp_path / "w.nii.gz"), str(tmp_path / "a.mat")]).map_points(
        torch.from_numpy(pts)).numpy()
    assert np.abs(got - want).max() < 1e-6
    assert np.abs(got - A.map_points(F.map_points(torch.from_numpy(pts))).numpy()).max() < 1e-4
    assert [r["label"] for r in rows] == [str(i + 1) for i in range(40)]
    assert rows[3]["comment"] == "pt 3"
    # inverse list brings them back (affine only: exact inverse)
    run_ok(["apply", "--points", "-i", tmp_path / "q.csv", "-t", f"[{tmp_path / 'a.mat'},1]", "-o", tmp_path / "r.csv",
            "-q"])
    _, back = _read_points(tmp_path / "r.csv")
    assert np.abs(back - F.map_points(torch.from_numpy(pts)).numpy()).max() < 1e-4


def test_points_csv_without_xyz_is_an_input_error(tmp_path):
    (tmp_path / "p.csv").write_text("a,b,c\n1,2,3\n")
    write_affine(AffineTransform.identity(), tmp_path / "a.mat")
    res = runner.invoke(app, ["apply", "--points", "-i", str(tmp_path / "p.csv"), "-t", str(tmp_path / "a.mat"),
                              "-o", str(tmp_path / "q.csv")])
    assert res.exit_code == 3
    assert "x, y, z" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q.csv").exists()


def test_points_are_not_written_under_an_image_name(tmp_path):
    (tmp_path / "p.csv").write_text("x,y,z\n1,2,3\n")
    for name in ("q.nii.gz", "q.MHA", "q.fcsv"):  # .fcsv: regcli writes LPS CSV text, which Slicer would misread
        res = runner.invoke(app, ["apply", "--points", "-i", str(tmp_path / "p.csv"), "-o", str(tmp_path / name)])
        assert res.exit_code == 6 and "name it .csv" in res.stderr, res.output
        assert not (tmp_path / name).exists()


def test_t6_bright_voxel_lands_where_inverse_points_say(tmp_path):
    """Image: a bright cube in the moving image. Points: its centre mapped by the INVERSE list. Same place."""
    moving = make_phantom("PIL", "iso")
    reference = make_phantom("oblique15", "aniso")
    mg, rg = Grid.from_sitk(moving), Grid.from_sitk(reference)
    arr = np.zeros(mg.shape, np.float32)
    c_idx = np.array([30, 18, 22])  # (x, y, z) index in the moving grid
    arr[c_idx[2] - 1:c_idx[2] + 2, c_idx[1] - 1:c_idx[1] + 2, c_idx[0] - 1:c_idx[0] + 2] = 100.0
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(moving)
    sitk.WriteImage(img, str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(reference, str(tmp_path / "r.nii.gz"))
    A = AffineTransform.from_linear(sitk.VersorTransform((0.2, 1.0, 0.3), math.radians(10)).GetMatrix(), (2.0, -1.5, 3.0),
                                    rg.center_world())
    d = (1.5, -2.0, 0.5)
    write_affine(A, tmp_path / "a.mat")
    const = lambda v, g: DisplacementField(torch.tensor(v, dtype=torch.float32)[:, None, None, None]  # noqa: E731
                                           .expand(3, *g.shape).contiguous(), g)
    write_displacement(const(d, rg), tmp_path / "w.nii.gz")
    write_displacement(const(tuple(-v for v in d), rg), tmp_path / "iw.nii.gz")

    run_ok(["apply", "-i", tmp_path / "m.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", tmp_path / "w.nii.gz",
            "-t", tmp_path / "a.mat", "-o", tmp_path / "o.nii.gz", "-q"])
    out = _read(tmp_path / "o.nii.gz").astype(np.float64)
    assert out.max() > 10
    zyx = np.argwhere(out > 0.25 * out.max())
    wts = out[out > 0.25 * out.max()]
    centroid_idx = (zyx * wts[:, None]).sum(0) / wts.sum()
    centroid = rg.index_to_world_points(torch.from_numpy(centroid_idx[::-1].copy())).numpy()

    centre = mg.index_to_world_points(torch.from_numpy(c_idx.astype(np.float64))).numpy()
    _write_points(tmp_path / "c.csv", centre[None], extra=False)
    run_ok(["apply", "--points", "-i", tmp_path / "c.csv", "-t", f"[{tmp_path / 'a.mat'},1]", "-t",
            tmp_path / "iw.nii.gz", "-o", tmp_path / "ci.csv", "-q"])
    _, mapped = _read_points(tmp_path / "ci.csv")
    voxel = max(rg.spacing)
    assert np.linalg.norm(mapped[0] - centroid) < voxel, (mapped[0], centroid)


# ------------------------------------------------------------------------------------------------ dtypes, 4D, E9
def test_label_interp_keeps_integer_type_and_linear_warns_on_integers(tmp_path):
    mv = make_phantom("LPS", "iso")
    sitk.WriteImage(sitk.Cast(phantom_labels(mv), sitk.sitkInt32), str(tmp_path / "l.nii.gz"))
    write_affine(AffineTransform.translation((1.3, -0.7, 2.1)), tmp_path / "a.mat")
    base = ["apply", "-i", tmp_path / "l.nii.gz", "-r", tmp_path / "l.nii.gz", "-t", tmp_path / "a.mat"]
    run_ok(base + ["-o", tmp_path / "o.nii.gz", "--interp", "label"])
    out = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    assert out.GetPixelID() == sitk.sitkInt32  # the input's type is kept (as sitk.Resample keeps it)
    assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= {0, 1, 2, 3}
    res = run_ok(base + ["-o", tmp_path / "o2.nii.gz"])
    assert "--interp" in res.stderr and "Warning" in res.stderr
    assert res.stdout == ""
    assert sitk.ReadImage(str(tmp_path / "o2.nii.gz")).GetPixelID() == sitk.sitkFloat32


def test_4d_input_is_resampled_volume_by_volume(tmp_path):
    a = make_phantom("LPS", "iso")
    b = sitk.Cast(phantom_labels(a), sitk.sitkFloat32) * 0.5
    series = sitk.JoinSeries([a, b], 0.0, 2.5)
    sitk.WriteImage(series, str(tmp_path / "s.nii.gz"))
    ref = make_phantom("oblique15", "iso")
    sitk.WriteImage(ref, str(tmp_path / "r.nii.gz"))
    t = (2.0, -3.0, 1.0)
    write_affine(AffineTransform.translation(t), tmp_path / "a.mat")
    run_ok(["apply", "-i", tmp_path / "s.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", tmp_path / "a.mat",
            "-o", tmp_path / "o.nii.gz", "-q"])
    out = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    assert out.GetDimension() == 4 and out.GetSize() == (*ref.GetSize(), 2)
    assert abs(out.GetSpacing()[3] - 2.5) < 1e-6
    arr = sitk.GetArrayFromImage(out)  # (T, Z, Y, X)
    tx = sitk.TranslationTransform(3, t)
    for k, vol in enumerate((a, b)):
        want = sitk.GetArrayFromImage(sitk.Resample(vol, ref, tx, sitk.sitkLinear, 0.0))
        assert np.abs(arr[k] - want).max() < 1e-4
    assert np.abs(arr[0] - arr[1]).max() > 0.1  # not the first volume twice


def test_5d_or_2d_input_is_refused(tmp_path):
    img2d = sitk.Image([10, 12], sitk.sitkFloat32)
    sitk.WriteImage(img2d, str(tmp_path / "i2.nii.gz"))
    ref = make_phantom("LPS", "iso")
    sitk.WriteImage(ref, str(tmp_path / "r.nii.gz"))
    res = runner.invoke(app, ["apply", "-i", str(tmp_path / "i2.nii.gz"), "-r", str(tmp_path / "r.nii.gz"),
                              "-o", str(tmp_path / "o.nii.gz")])
    assert res.exit_code == 3 and "2D" in res.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_no_transform_is_identity_resampling(tmp_path):
    mv = make_phantom("RAS", "aniso")
    ref = make_phantom("oblique15", "iso")
    sitk.WriteImage(mv, str(tmp_path / "m.nii.gz"))
    sitk.WriteImage(ref, str(tmp_path / "r.nii.gz"))
    run_ok(["apply", "-i", tmp_path / "m.nii.gz", "-r", tmp_path / "r.nii.gz", "-t", "identity",
            "-o", tmp_path / "o.nii.gz", "-q"])
    want = sitk.GetArrayFromImage(sitk.Resample(mv, ref, sitk.Transform(), sitk.sitkLinear, 0.0))
    assert np.abs(_read(tmp_path / "o.nii.gz") - want).max() < 1e-4


def test_inverting_a_field_with_brackets_is_refused(tmp_path):
    g = Grid.from_sitk(make_phantom("LPS", "iso"))
    write_displacement(DisplacementField.zeros(g), tmp_path / "w.nii.gz")
    sitk.WriteImage(make_phantom("LPS", "iso"), str(tmp_path / "m.nii.gz"))
    res = runner.invoke(app, ["apply", "-i", str(tmp_path / "m.nii.gz"), "-r", str(tmp_path / "m.nii.gz"),
                              "-t", f"[{tmp_path / 'w.nii.gz'},1]", "-o", str(tmp_path / "o.nii.gz")])
    assert res.exit_code == 3 and "InverseWarp" in res.stderr


# ------------------------------------------------------------------------------ interpolation as ITK does it
def _step_image(dtype, values=None) -> sitk.Image:
    """A 12x10x8 image at 2 mm whose voxels are ``values`` along x (default 0..11), cast to ``dtype``."""
    x = np.arange(12) if values is None else np.asarray(values)
    arr = np.broadcast_to(x[None, None, :], (8, 10, 12)).copy()
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 2.0))
    return sitk.Cast(img, dtype)


def test_linear_of_an_integer_image_is_float_and_not_rounded(tmp_path):
    """antsApplyTransforms and sitk.Resample interpolate integers in float: 0.65 voxel between 0 and 7 is 4.55."""
    img = _step_image(sitk.sitkUInt8, [0] * 6 + [7] * 6)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    write_affine(AffineTransform.translation((1.3, 0.0, 0.0)), tmp_path / "a.mat")  # 0.65 voxel
    run_ok(["apply", "-i", tmp_path / "i.nii.gz", "-r", tmp_path / "i.nii.gz", "-t", tmp_path / "a.mat",
            "-o", tmp_path / "o.nii.gz", "--default-value", "0.5", "-q"])
    out = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    assert out.GetPixelID() == sitk.sitkFloat32
    ref = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), img, sitk.TranslationTransform(3, (1.3, 0.0, 0.0)),
                        sitk.sitkLinear, 0.5)
    got, want = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref)
    assert np.abs(got - want).max() < 1e-4
    assert np.isclose(got[4, 5, 5], 4.55, atol=1e-4) and np.isclose(got[4, 5, 11], 0.5)  # and the default kept


@pytest.mark.parametrize("with_identity", [False, True])
def test_nearest_rounds_halves_up_as_itk(tmp_path, with_identity):
    """Exact half-voxel positions (a 2 mm grid downsampled to 4 mm with aligned corners, and a half-voxel shift)
    take the upper voxel, as ITK's nearest neighbour does, with or without a transform file."""
    img = _step_image(sitk.sitkInt16)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    for name, origin, spacing in (("down", (1.0, 1.0, 1.0), (4.0, 4.0, 4.0)), ("half", (1.0, 0.0, 0.0), (2.0,) * 3)):
        ref = sitk.Image([6 if spacing[0] == 4.0 else 11, 5, 4], sitk.sitkUInt8)
        ref.SetSpacing(spacing)
        ref.SetOrigin(origin)
        sitk.WriteImage(ref, str(tmp_path / f"r_{name}.nii.gz"))
        extra = ["-t", "identity"]
        if with_identity:
            write_affine(AffineTransform.translation((0.0, 0.0, 0.0)), tmp_path / "id.mat")
            extra = ["-t", tmp_path / "id.mat"]
        run_ok(["apply", "-i", tmp_path / "i.nii.gz", "-r", tmp_path / f"r_{name}.nii.gz", *extra,
                "-n", "NearestNeighbor", "-o", tmp_path / f"o_{name}.nii.gz", "-q"])
        got = sitk.ReadImage(str(tmp_path / f"o_{name}.nii.gz"))
        want = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, img.GetPixelID())
        assert got.GetPixelID() == sitk.sitkInt16
        assert np.array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want)), name
    assert sitk.GetArrayFromImage(got)[0, 0].tolist() == list(range(1, 12))  # the half shift: 1..11


def test_nearest_agrees_with_itk_just_below_a_half_voxel(tmp_path):
    """Headers hold float32 spacings and origins, so a position meant as a half voxel lands a few 1e-7 voxel off
    it (here 11.4999996): ITK rounds what it computes, and so must regcli (a rounding slack of 1e-6 took the
    voxel above: label 13 where sitk.Resample and antsApplyTransforms give 12). Several origins, every voxel."""
    lab = np.repeat(np.arange(1, 21, dtype=np.uint8)[:, None, None], 4, 1).repeat(4, 2)
    for k, z0 in enumerate((-48.8, -30.1, -17.3, -5.9)):
        moving = sitk.GetImageFromArray(lab)
        moving.SetSpacing((1.0, 1.0, 3.2))
        moving.SetOrigin((0.0, 0.0, z0))
        ref = sitk.Image(4, 4, 14, sitk.sitkUInt8)
        ref.SetSpacing((1.0, 1.0, 3.0))
        ref.SetOrigin((0.0, 0.0, -12.0))
        sitk.WriteImage(moving, str(tmp_path / f"m{k}.nii.gz"))
        sitk.WriteImage(ref, str(tmp_path / f"r{k}.nii.gz"))
        run_ok(["apply", "-i", tmp_path / f"m{k}.nii.gz", "-r", tmp_path / f"r{k}.nii.gz", "-n", "nearest",
                "-o", tmp_path / f"o{k}.nii.gz", "-q"])
        m, r = sitk.ReadImage(str(tmp_path / f"m{k}.nii.gz")), sitk.ReadImage(str(tmp_path / f"r{k}.nii.gz"))
        want = sitk.Resample(m, r, sitk.Transform(), sitk.sitkNearestNeighbor, 0, m.GetPixelID())
        assert np.array_equal(_read(tmp_path / f"o{k}.nii.gz"), sitk.GetArrayFromImage(want)), z0


def test_nearest_keeps_large_labels_and_the_default_must_fit_the_integer_output(tmp_path):
    """int32 labels above 2^24 come through nearest exactly (no float32 round trip); a default value outside the
    input's type widens it, and one that no integer output can hold is refused (exit 2, nothing written)."""
    big = [16777217, 1073741825] * 6
    img = _step_image(sitk.sitkInt32, big)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    write_affine(AffineTransform.translation((0.3, -0.2, 0.1)), tmp_path / "a.mat")
    base = ["apply", "-i", tmp_path / "i.nii.gz", "-r", tmp_path / "i.nii.gz", "-t", tmp_path / "a.mat", "-q"]
    run_ok(base + ["-n", "nearest", "-o", tmp_path / "o.nii.gz"])
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.nii.gz")))).tolist()) <= set(big)
    small = _step_image(sitk.sitkUInt8, [0, 3, 7] * 4)
    sitk.WriteImage(small, str(tmp_path / "u8.nii.gz"))
    base = ["apply", "-i", tmp_path / "u8.nii.gz", "-r", tmp_path / "u8.nii.gz", "-t", tmp_path / "a.mat", "-q"]
    run_ok(base + ["-n", "GenericLabel", "--default-value", "-1", "-o", tmp_path / "neg.nii.gz"])
    assert sitk.ReadImage(str(tmp_path / "neg.nii.gz")).GetPixelID() == sitk.sitkInt16
    for value in ("-1.7", "nan"):
        for interp in ("nearest", "label"):
            res = CliRunner().invoke(app, [str(a) for a in base + ["-n", interp, "--default-value", value,
                                                                    "-o", tmp_path / "bad.nii.gz"]])
            assert res.exit_code == 2 and "--default-value" in res.output, res.output
            assert not (tmp_path / "bad.nii.gz").exists()
    res = CliRunner().invoke(app, [str(a) for a in base + ["-n", "cubic", "-o", tmp_path / "bad.nii.gz"]])
    assert res.exit_code == 2 and "NearestNeighbor" in res.output


def test_a_bspline_transform_is_refused_not_linearised(tmp_path):
    """An ITK BSplineTransform (antsRegistration -t BSpline) has no affine equivalent: apply and jacobian refuse
    it (exit 3, naming the type) alone, inverted, or inside an .h5 composite, instead of probing it as an affine."""
    img = _step_image(sitk.sitkFloat32)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    bs = sitk.BSplineTransformInitializer(img, [3, 3, 3])
    params = np.zeros(len(bs.GetParameters()))
    params[10] = 3.0  # one control point moved 3 mm
    bs.SetParameters(tuple(params))
    sitk.WriteTransform(bs, str(tmp_path / "bs.txt"))
    comp = sitk.CompositeTransform([sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), bs])
    sitk.WriteTransform(comp, str(tmp_path / "c.h5"))
    for spec in (tmp_path / "bs.txt", f"[{tmp_path / 'bs.txt'},1]", tmp_path / "c.h5"):
        res = CliRunner().invoke(app, ["apply", "-i", str(tmp_path / "i.nii.gz"), "-r", str(tmp_path / "i.nii.gz"),
                                       "-t", str(spec), "-o", str(tmp_path / "o.nii.gz")])
        assert res.exit_code == 3 and "BSplineTransform" in res.output, (spec, res.output)
        assert not (tmp_path / "o.nii.gz").exists()
    field = sitk.Image(img.GetSize(), sitk.sitkVectorFloat32, 3)
    field.CopyInformation(img)
    sitk.WriteImage(field, str(tmp_path / "w.nii.gz"))
    res = CliRunner().invoke(app, ["jacobian", str(tmp_path / "w.nii.gz"), "-t", str(tmp_path / "bs.txt"),
                                   "-o", str(tmp_path / "j.nii.gz")])
    assert res.exit_code == 3 and "BSplineTransform" in res.output, res.output


def test_outputs_that_are_inputs_or_not_single_image_files_are_refused_up_front(tmp_path):
    """-o naming an input is refused even with --overwrite (the warp would be replaced by an image); an output
    that is not a single image file (.txt, .mhd/.raw pair) is refused before any work, naming the real file; a
    bracketed spec with another flag than 0/1 says how to write it."""
    img = _step_image(sitk.sitkFloat32)
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    write_affine(AffineTransform.translation((1.0, 0.0, 0.0)), tmp_path / "a.mat")
    g = Grid.from_sitk(img)
    write_displacement(DisplacementField.zeros(g), tmp_path / "w.nii.gz")
    before = (tmp_path / "w.nii.gz").read_bytes()
    base = ["apply", "-i", tmp_path / "i.nii.gz", "-r", tmp_path / "i.nii.gz", "-t", tmp_path / "w.nii.gz"]
    for out in (tmp_path / "w.nii.gz", tmp_path / "i.nii.gz", tmp_path / "." / "w.nii.gz"):
        res = runner.invoke(app, [str(a) for a in base + ["-o", out, "--overwrite"]])
        assert res.exit_code == 6 and "is the input" in res.output, res.output
    assert (tmp_path / "w.nii.gz").read_bytes() == before
    for name, words in (("o.txt", "not an image file name"), ("o.mhd", "header and a data file")):
        res = runner.invoke(app, [str(a) for a in base + ["-o", tmp_path / name]])
        assert res.exit_code == 6 and words in res.output and name in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mat", "i.nii.gz", "w.nii.gz"]  # nothing left
    bad_flag = ["-t", f"[{tmp_path / 'a.mat'},2]", "-o", tmp_path / "o.nii"]
    res = runner.invoke(app, [str(a) for a in base[:-2] + bad_flag])
    assert res.exit_code == 2 and "[file,1]" in res.output, res.output
    res = runner.invoke(app, ["jacobian", str(tmp_path / "w.nii.gz"), "-o", str(tmp_path / "w.nii.gz"), "--overwrite"])
    assert res.exit_code == 6 and "is the input" in res.output


def test_nearest_keeps_a_float64_input_exactly(tmp_path):
    """Float64 labels above 2^24 (2^40 + 1) come through nearest as float64, equal to sitk.Resample's."""
    img = _step_image(sitk.sitkFloat64, [float(2 ** 40 + 1), 3.25, float(2 ** 53 - 1)] * 4)
    sitk.WriteImage(img, str(tmp_path / "f64.nii.gz"))
    write_affine(AffineTransform.translation((0.3, -0.2, 0.1)), tmp_path / "a.mat")
    run_ok(["apply", "-i", tmp_path / "f64.nii.gz", "-r", tmp_path / "f64.nii.gz", "-t", tmp_path / "a.mat", "-q",
            "-n", "nearest", "-o", tmp_path / "o.nii.gz"])
    out = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    assert out.GetPixelID() == sitk.sitkFloat64
    ref = sitk.Resample(img, img, sitk.TranslationTransform(3, (0.3, -0.2, 0.1)), sitk.sitkNearestNeighbor, 0.0,
                        sitk.sitkFloat64)
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref))


@pytest.mark.parametrize("interp,sitk_interp", [("linear", sitk.sitkLinear), ("label", sitk.sitkLabelLinear),
                                                ("nearest", sitk.sitkNearestNeighbor)])
def test_a_one_slice_input_is_resampled_as_itk_does(tmp_path, interp, sitk_interp):
    """A one-voxel axis spans index [-0.5, 0.5] (the ITK buffer); values reached 1.5 voxels past the slice on one
    side through an oblique reference."""
    vol = make_phantom("LPS", "iso")
    labels = phantom_labels(vol)
    src = (labels if interp != "linear" else vol)[:, 10:11, :]
    sitk.WriteImage(src, str(tmp_path / "slice.nii.gz"))
    ref = make_phantom("oblique15", "iso")
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    run_ok(["apply", "-i", tmp_path / "slice.nii.gz", "-r", tmp_path / "ref.nii.gz", "-n", interp, "-q",
            "-o", tmp_path / "o.nii.gz"])
    out = _read(tmp_path / "o.nii.gz")
    expect = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk_interp, 0.0))
    assert np.array_equal(out != 0, expect != 0), (int((out != 0).sum()), int((expect != 0).sum()))
    assert np.allclose(out, expect, atol=1e-4)


# ------------------------------------------------------------------ directions orthonormal only to ~5e-4 (ITK accepts them)
def _perturbed_phantom() -> sitk.Image:
    """The oblique anisotropic phantom with its direction 5e-4 off orthonormal, as an oblique header rounded in
    float32 (or worse) gives. Stored as .mha: the NIfTI writer would make the direction orthonormal."""
    from test_grid import perturbed_oblique

    img = make_phantom("oblique15", "aniso")
    img.SetDirection(tuple(perturbed_oblique().ravel()))
    return img


def test_a_slightly_non_orthonormal_input_resamples_as_sitk_does(tmp_path):
    """Identity onto its own grid gives the input back to float32 precision (D^T as the inverse moved voxels by up
    to 0.6 % of the range); an affine, and a displacement field on that grid, give what sitk.Resample gives."""
    img = _perturbed_phantom()
    sitk.WriteImage(img, str(tmp_path / "p.mha"))
    run_ok(["apply", "-i", tmp_path / "p.mha", "-r", tmp_path / "p.mha", "-o", tmp_path / "self.mha", "-q"])
    got = sitk.ReadImage(str(tmp_path / "self.mha"))
    assert got.GetDirection() == img.GetDirection()
    assert np.abs(sitk.GetArrayFromImage(got) - sitk.GetArrayFromImage(img)).max() < 1e-6
    # an affine, resampled onto an LPS reference (grid_sample path) and onto the perturbed grid itself
    A = AffineTransform(np.array([[1.02, 0.05, -0.03, 2.0], [-0.04, 0.97, 0.06, -1.5], [0.02, -0.05, 1.01, 1.0],
                                  [0.0, 0.0, 0.0, 1.0]]), np.array([1.0, -2.0, 3.0]))
    write_affine(A, tmp_path / "a.mat")
    tx = sitk.ReadTransform(str(tmp_path / "a.mat"))
    ref_lps = make_phantom("LPS", "iso")
    sitk.WriteImage(ref_lps, str(tmp_path / "r.nii.gz"))
    rng = float(sitk.GetArrayFromImage(img).max())
    for ref, rfile in ((ref_lps, tmp_path / "r.nii.gz"), (img, tmp_path / "p.mha")):
        run_ok(["apply", "-i", tmp_path / "p.mha", "-r", rfile, "-t", tmp_path / "a.mat", "-o", tmp_path / "o.mha",
                "-q", "--overwrite"])
        want = sitk.GetArrayFromImage(sitk.Resample(img, ref, tx, sitk.sitkLinear, 0.0))
        assert np.abs(_read(tmp_path / "o.mha") - want).max() < 1e-4 * rng, rfile.name
    # a constant displacement field stored on the perturbed grid, the input on an LPS grid
    g = Grid.from_sitk(img)
    t = (2.5, -1.25, 3.0)
    disp = torch.tensor(t, dtype=torch.float32)[:, None, None, None].expand(3, *g.shape).contiguous()
    field = DisplacementField(disp, g).to_sitk()
    sitk.WriteImage(field, str(tmp_path / "w.mha"))
    run_ok(["apply", "-i", tmp_path / "r.nii.gz", "-r", tmp_path / "p.mha", "-t", tmp_path / "w.mha",
            "-o", tmp_path / "ow.mha", "-q"])
    want = sitk.Resample(ref_lps, img, sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)),
                         sitk.sitkLinear, 0.0)
    assert np.abs(_read(tmp_path / "ow.mha") - sitk.GetArrayFromImage(want)).max() < 1e-4 * rng


def test_a_sheared_input_or_field_names_its_file(tmp_path):
    """A sheared header (|D^T D - I| = 0.01, beyond the 1e-3 ITK-like tolerance) is refused naming the file, as the
    reference and register paths do (apply said only "direction matrix is not orthonormal")."""
    img = make_phantom("LPS", "iso")
    sheared = sitk.Image(img)
    sheared.SetDirection((1.0, 0.01, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(sheared, str(tmp_path / "shear.mha"))
    sitk.WriteImage(img, str(tmp_path / "r.nii.gz"))
    field = sitk.Image([10, 10, 10], sitk.sitkVectorFloat32, 3)
    field.SetDirection(sheared.GetDirection())
    sitk.WriteImage(field, str(tmp_path / "shear_warp.mha"))
    for args, name in ((["-i", tmp_path / "shear.mha"], "shear.mha"),
                       (["-i", tmp_path / "r.nii.gz", "-t", tmp_path / "shear_warp.mha"], "shear_warp.mha")):
        res = runner.invoke(app, ["apply", *map(str, args), "-r", str(tmp_path / "r.nii.gz"),
                                  "-o", str(tmp_path / "o.nii.gz")])
        assert res.exit_code == 4, res.output
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("GeometryError:") and name in lines[0], res.stderr
        assert "not orthonormal" in lines[0]
        assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("through", ["affine", "identity"])
def test_points_just_past_the_buffer_take_the_default_as_in_itk(tmp_path, through):
    """ITK's buffer is index [-0.5, n - 0.5]: a point 1.2e-5 voxel past it takes the default value (the float32
    tolerance of 1e-6 in normalized units, 2.5e-5 voxel here, gave it the edge value), one 1e-7 voxel inside it the
    edge value; linear, nearest and label, with and without a transform, as sitk.Resample."""
    img = sitk.GetImageFromArray(np.broadcast_to(np.arange(1, 51, dtype=np.int16), (6, 5, 50)).copy())
    sitk.WriteImage(img, str(tmp_path / "i.nii.gz"))
    write_affine(AffineTransform.translation((0.0, 0.0, 0.0)), tmp_path / "id.mat")
    extra = ["-t", tmp_path / "id.mat"] if through == "affine" else []
    for x in (49.500012, 49.4999999, -0.500012, -0.4999999, 20.25):
        ref = sitk.Image([1, 3, 2], sitk.sitkUInt8)
        ref.SetOrigin((x, 2.0, 3.0))
        sitk.WriteImage(ref, str(tmp_path / "r.mha"))
        for interp, sitk_interp in (("linear", sitk.sitkLinear), ("nearest", sitk.sitkNearestNeighbor),
                                    ("label", sitk.sitkLabelLinear)):
            run_ok(["apply", "-i", tmp_path / "i.nii.gz", "-r", tmp_path / "r.mha", "-n", interp, *extra, "-q",
                    "--default-value", "-7", "-o", tmp_path / "o.mha", "--overwrite"])
            got = _read(tmp_path / "o.mha")
            want = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, sitk.Transform(),
                                                        sitk_interp, -7.0))
            assert np.allclose(got, want, atol=1e-4), (x, interp, got.ravel()[:2], want.ravel()[:2])
