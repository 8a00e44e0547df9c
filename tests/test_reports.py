"""Jacobian determinant, landmarks/TRE, report JSON and the HTML report."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DIRECTIONS, SPACINGS, make_phantom, phantom_labels, bench_metrics
from regcli.errors import InputError
from regcli.reports.jacobian import jacobian_determinant, jacobian_image, jacobian_matrix, jacobian_stats
from regcli.reports.landmarks import PointSet, read_points_csv, tre, write_points_csv
from regcli.reports.report import (
    PeakMemory,
    StageTimer,
    build_report,
    json_safe,
    report_json,
    sha256_file,
    write_report,
)
from regcli.spaces import Grid, Image
from regcli.transforms import AffineTransform, CompositeTransform, DisplacementField


def _bench():
    return bench_metrics()


def _grid(direction="oblique15", spacing="aniso", size=(14, 12, 9), origin=(4.0, -7.0, 11.0)) -> Grid:
    D = DIRECTIONS[direction] if isinstance(direction, str) else np.asarray(direction)
    sp = SPACINGS[spacing] if isinstance(spacing, str) else spacing
    return Grid(size, sp, origin, D.ravel())


def _field(grid: Grid, fn) -> DisplacementField:
    """Displacement u(x) = fn(x) - x evaluated at the world voxel centres of ``grid`` (fn: (...,3) -> (...,3))."""
    x = grid.world_coords()  # (Z, Y, X, 3) float64
    u = fn(x) - x
    return DisplacementField(u.permute(3, 0, 1, 2).to(torch.float32).contiguous(), grid)


GRIDS = [("LPS", "iso"), ("RAS", "aniso"), ("PIL", "aniso"), ("oblique15", "aniso")]


# ----------------------------------------------------------------------------- Jacobian
@pytest.mark.parametrize("direction,spacing", GRIDS)
def test_scaling_field_has_det_s_cubed(direction, spacing):
    g = _grid(direction, spacing)
    c = torch.as_tensor(g.center_world() + np.array([3.0, -2.0, 1.0]))
    s = 1.15
    det = jacobian_determinant(_field(g, lambda x: c + s * (x - c)))
    assert det.shape == g.shape and det.dtype == torch.float32
    assert torch.allclose(det, torch.full_like(det, s**3), atol=2e-5)


@pytest.mark.parametrize("direction,spacing", GRIDS)
def test_rotation_and_affine_fields(direction, spacing):
    g = _grid(direction, spacing)
    R = torch.as_tensor(np.asarray(sitk.VersorTransform((0.2, -0.5, 0.8), 0.4).GetMatrix()).reshape(3, 3))
    c = torch.as_tensor(g.center_world())
    det = jacobian_determinant(_field(g, lambda x: (x - c) @ R.T + c + torch.tensor([2.0, 1.0, -3.0])))
    assert torch.allclose(det, torch.ones_like(det), atol=2e-5)
    A = torch.tensor([[1.1, 0.2, -0.1], [0.05, 0.9, 0.15], [0.0, -0.2, 1.3]], dtype=torch.float64)
    det = jacobian_determinant(_field(g, lambda x: x @ A.T))
    assert torch.allclose(det, torch.full_like(det, float(torch.linalg.det(A))), atol=5e-5)


def _quadratic(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x + u(x) with u quadratic in world mm (central differences are exact for it)."""
    c = torch.tensor([1.0, -2.0, 3.0], dtype=x.dtype)
    y = (x - c) / 20.0
    u = torch.stack([3 * y[..., 0] * y[..., 1] + y[..., 2] ** 2,
                     -2 * y[..., 1] ** 2 + y[..., 0] * y[..., 2],
                     y[..., 0] ** 2 + 1.5 * y[..., 1] * y[..., 2]], dim=-1)
    return x + u


def _quadratic_det(x: torch.Tensor) -> torch.Tensor:
    c = torch.tensor([1.0, -2.0, 3.0], dtype=x.dtype)
    y = (x - c) / 20.0
    k = 1.0 / 20.0
    z = torch.zeros_like(y[..., 0])
    J = torch.stack([
        torch.stack([1 + 3 * y[..., 1] * k, 3 * y[..., 0] * k, 2 * y[..., 2] * k], -1),
        torch.stack([y[..., 2] * k, 1 - 4 * y[..., 1] * k, y[..., 0] * k], -1),
        torch.stack([2 * y[..., 0] * k, z + 1.5 * y[..., 2] * k, 1 + 1.5 * y[..., 1] * k], -1),
    ], -2)
    return torch.linalg.det(J)


@pytest.mark.parametrize("direction,spacing", GRIDS)
def test_same_physical_field_on_any_grid_gives_the_analytic_det(direction, spacing):
    """Quadratic field: interior central differences are exact, so every grid (oblique, anisotropic,
    permuted) must give the analytic det at its voxel centres, i.e. the same physical answer."""
    g = _grid(direction, spacing)
    det = jacobian_determinant(_field(g, _quadratic)).double()
    ref = _quadratic_det(g.world_coords())
    inner = (slice(1, -1),) * 3
    assert float((det[inner] - ref[inner]).abs().max()) < 2e-5
    assert float((det - ref).abs().max()) > 1e-4  # borders are one-sided (numpy.gradient), as in the bench


@pytest.mark.parametrize("direction,spacing", GRIDS)
def test_jacobian_matches_bench(direction, spacing):
    bm = _bench()
    g = _grid(direction, spacing, size=(15, 13, 8))

    def fn(x):
        return x + torch.stack([2 * torch.sin(x[..., 1] / 7), 1.5 * torch.cos(x[..., 2] / 5) * torch.sin(x[..., 0] / 9),
                                3 * torch.sin(x[..., 0] / 6)], -1)

    field = _field(g, fn)
    det = jacobian_determinant(field).numpy()
    disp_ras = field.disp.numpy().transpose(3, 2, 1, 0) * np.array([-1.0, -1.0, 1.0])  # (X,Y,Z,3) RAS
    ref = bm.jacobian_determinant(disp_ras, g.ras_affine()).transpose(2, 1, 0)
    assert np.abs(det - ref).max() < 1e-6
    mask = ref > 1.0
    ours, theirs = jacobian_stats(det, mask), bm.jacobian_stats(ref, mask)
    for block_o, block_t in ((ours, theirs), (ours["in_mask"], theirs["in_mask"])):
        for k, v in block_t.items():
            if isinstance(v, dict):
                continue
            assert k in block_o
            assert block_o[k] == pytest.approx(v, abs=1e-6)


def test_chunking_and_matrix_agree():
    g = _grid("oblique15", "aniso", size=(11, 10, 13))
    field = _field(g, _quadratic)
    full = jacobian_determinant(field, chunk_voxels=1 << 24)
    assert torch.equal(full, jacobian_determinant(field, chunk_voxels=50))  # 1-slice slabs
    J = jacobian_matrix(field)
    assert J.shape == (*g.shape, 3, 3)
    assert torch.allclose(torch.linalg.det(J).float(), full, atol=1e-6)


def test_jacobian_stats_with_folding():
    det = np.ones((4, 5, 6), np.float32)
    det[0, 0, :3] = [-0.5, 0.0, -2.0]
    det[1, 1, 1] = 2.0
    s = jacobian_stats(torch.from_numpy(det))
    assert s["n_nonpos_jac"] == 3 and s["pct_nonpos_jac"] == pytest.approx(100 * 3 / 120)
    pos = det[det > 0]
    assert s["sdlogj"] == pytest.approx(float(np.std(np.log(pos))))
    assert s["jac_min"] == -2.0 and s["jac_max"] == 2.0
    assert "in_mask" not in s
    mask = np.zeros(det.shape, bool)
    mask[2:] = True
    s = jacobian_stats(det, mask)
    assert s["in_mask"]["n_nonpos_jac"] == 0 and s["in_mask"]["n_voxels"] == 60
    s = jacobian_stats(det, np.zeros(det.shape, bool))
    assert s["in_mask"]["n_voxels"] == 0 and math.isnan(s["in_mask"]["jac_mean"])


def test_jacobian_image_written_on_the_field_grid(tmp_path):
    from regcli.io.images import write_image

    g = _grid("PIL", "aniso")
    img = jacobian_image(_field(g, lambda x: 1.1 * x))
    assert isinstance(img, Image) and img.grid == g and img.data.dtype == torch.float32
    path = tmp_path / "jac.nii.gz"
    write_image(img, path)
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkFloat32
    assert Grid.from_sitk(back).allclose(g)
    assert np.allclose(sitk.GetArrayFromImage(back), 1.1**3, atol=1e-5)


# ----------------------------------------------------------------------------- landmarks
def test_points_csv_round_trip_keeps_extra_columns(tmp_path):
    p = tmp_path / "pts.csv"
    p.write_text("id,label,x,y,z,note\nA,3,1.5,-2,3.25,first\n# a comment\n\nB,4,-10,20.125,0,\"with, comma\"\n")
    ps = read_points_csv(p)
    assert ps.points.tolist() == [[1.5, -2.0, 3.25], [-10.0, 20.125, 0.0]]
    assert ps.ids() == ["A", "B"] and ps.extra[1]["note"] == "with, comma"
    out = tmp_path / "out.csv"
    write_points_csv(out, ps.with_points(ps.points + 1.0))
    back = read_points_csv(out)
    assert back.columns == ps.columns and back.extra == ps.extra
    assert np.allclose(back.points, ps.points + 1.0, atol=1e-6)


def test_points_csv_ras_frame(tmp_path):
    p = tmp_path / "ras.csv"
    p.write_text("X,Y,Z\n1,2,3\n")
    lps = read_points_csv(p, frame="ras")
    assert lps.points.tolist() == [[-1.0, -2.0, 3.0]]
    assert read_points_csv(p).points.tolist() == [[1.0, 2.0, 3.0]]
    out = tmp_path / "o.csv"
    write_points_csv(out, lps, frame="ras")
    assert out.read_text().splitlines() == ["X,Y,Z", "1,2,3"]
    write_points_csv(out, lps)  # LPS
    assert out.read_text().splitlines()[1] == "-1,-2,3"
    with pytest.raises(InputError, match="frame"):
        read_points_csv(p, frame="xyz")


def test_points_csv_compatible_with_bench_reader(tmp_path):
    bm = _bench()
    p = tmp_path / "lm.csv"
    p.write_text("id,X,Y,Z\n1,10.5,-3,7\n2,0,4.25,-8\n")
    ids, ras = bm.load_landmarks_csv(p, frame="lps")
    ours = read_points_csv(p)
    assert ours.ids() == ids
    assert np.allclose(ours.points * np.array([-1, -1, 1]), ras)


@pytest.mark.parametrize("text,pattern", [
    ("", r"is empty"),
    ("a,b,c\n1,2,3\n", r"line 1: header .* lacks column\(s\) x, y, z"),
    ("x,y,z\n1,2,3\n4,5\n", r"line 3: 2 fields, but the header has 3"),
    ("x,y,z\n1,2,3\n\n4,five,6\n", r"line 4: y = 'five' is not a number"),
    ("x,y,z\n1,nan,3\n", r"line 2: y = 'nan' is not finite"),
    ("x,y,z\n", r"has a header but no points"),
    ("x,x,y,z\n1,2,3,4\n", r"column 'x' appears twice"),
])
def test_malformed_points_csv_names_file_and_line(tmp_path, text, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=pattern) as e:
        read_points_csv(p, role="fixed landmarks")
    assert "bad.csv" in str(e.value) and "fixed landmarks" in str(e.value)
    assert "\n" not in e.value.one_line()


def test_points_csv_missing_or_binary(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_points_csv(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="is a directory"):
        read_points_csv(tmp_path)
    b = tmp_path / "bin.csv"
    b.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="not a text"):
        read_points_csv(b)


_FCSV_HEAD = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = {cs}\n"
              "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")


def _fcsv(path, points_ras, labels, cs="RAS"):
    """A 3D Slicer 4.11+/5.x markups fiducial file of RAS points (written in ``cs``: RAS, LPS, 0 or 1)."""
    lps = cs in ("LPS", "1")
    rows = []
    for i, ((x, y, z), lab) in enumerate(zip(points_ras, labels)):
        if lps:
            x, y = -x, -y
        rows.append(f"vtkMRMLMarkupsFiducialNode_{i},{float(x)!r},{float(y)!r},{float(z)!r},0,0,0,1,1,1,0,{lab},"
                    f"\"a, desc\",\n")
    path.write_text(_FCSV_HEAD.format(cs=cs) + "".join(rows))
    return path


def test_slicer_fcsv_reads_as_the_same_points_in_lps_and_gives_the_same_tre(tmp_path):
    """A Slicer .fcsv (RAS, '# columns' header, labels as point names) reads as the LPS CSV of the same points: the
    same coordinates, whatever its CoordinateSystem line says (RAS, LPS, 0, 1), and the same TRE."""
    fixed_ras = np.array([[-3.0, -4.0, 5.0], [-10.0, -12.0, 20.0], [5.0, -7.0, 30.5], [-20.0, -1.0, 2.0]])
    moving_ras = fixed_ras + np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 0.0], [2.0, 2.0, -1.0], [-1.0, 0.0, 3.0]])
    labels = ["F-1", "F-2", "F-3", "F-4"]
    to_lps = np.array([-1.0, -1.0, 1.0])
    for cs in ("RAS", "LPS", "0", "1"):
        ps = read_points_csv(_fcsv(tmp_path / f"f_{cs}.fcsv", fixed_ras, labels, cs), role="fixed landmarks")
        assert np.allclose(ps.points, fixed_ras * to_lps, atol=1e-12), cs
        assert ps.ids() == labels and ps.extra[0]["desc"] == "a, desc"
    lps_csv = tmp_path / "lf.csv"
    write_points_csv(lps_csv, PointSet(fixed_ras * to_lps))
    mv_csv = tmp_path / "lm.csv"
    write_points_csv(mv_csv, PointSet(moving_ras * to_lps))
    f_fcsv = _fcsv(tmp_path / "lf.fcsv", fixed_ras, labels)
    m_fcsv = _fcsv(tmp_path / "lm.fcsv", moving_ras[::-1], labels[::-1])  # another order: paired by label
    T = AffineTransform.translation(np.array([0.5, -1.0, 2.0]))
    ours = tre(read_points_csv(f_fcsv), read_points_csv(m_fcsv), T)
    ref = tre(read_points_csv(lps_csv), read_points_csv(mv_csv), T)
    assert ours["ids"] == labels
    assert np.allclose(ours["tre_per_landmark_mm"], ref["tre_per_landmark_mm"], atol=1e-9)
    assert np.allclose(ours["initial_per_landmark_mm"], ref["initial_per_landmark_mm"], atol=1e-9)


def test_slicer_fcsv_without_columns_line_labels_from_other_nodes_and_bad_frame(tmp_path):
    from regcli.reports.report import WarningLog

    old = tmp_path / "old.fcsv"  # no '# columns' line, no CoordinateSystem line: Slicer's columns, RAS
    old.write_text("# Markups fiducial file version = 4.6\nvtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,A-1,,\n")
    assert read_points_csv(old).points.tolist() == [[-1.0, -2.0, 3.0]]
    pts = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    f = read_points_csv(_fcsv(tmp_path / "f.fcsv", pts, ["F-1", "F-2"]))
    m = read_points_csv(_fcsv(tmp_path / "m.fcsv", pts + 1.0, ["M-1", "M-2"]))
    with WarningLog() as logged:  # labels numbered per markups node: paired by position, with a warning
        r = tre(f, m)
    assert np.allclose(r["tre_per_landmark_mm"], np.sqrt(3.0)) and "paired by position" in logged.messages[0]
    bad = tmp_path / "bad.fcsv"
    bad.write_text(_FCSV_HEAD.format(cs="IJK") + "n0,1,2,3,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(InputError, match=r"bad.fcsv' line 2: CoordinateSystem 'IJK'"):
        read_points_csv(bad, role="fixed landmarks")
    nox = tmp_path / "nox.fcsv"
    nox.write_text("# Markups fiducial file version = 4.11\n# columns = id,a,b,c\nn0,1,2,3\n")
    with pytest.raises(InputError, match=r"nox.fcsv' line 2: '# columns' header .* lacks column\(s\) x, y, z"):
        read_points_csv(nox)


def test_evaluate_and_apply_read_slicer_fcsv(tmp_path):
    """evaluate's TRE from .fcsv landmarks equals that from the same points in LPS CSVs; apply --points maps an .fcsv
    like the CSV (written as an LPS CSV)."""
    import csv as _csv
    import json as _json

    from conftest import invoke

    img = make_phantom("LPS", "iso", size=(20, 20, 20))
    f = tmp_path / "f.nii.gz"
    sitk.WriteImage(img, str(f))
    aff = sitk.AffineTransform(3)
    aff.SetTranslation((1.0, -2.0, 0.5))
    sitk.WriteTransform(aff, str(tmp_path / "a_0GenericAffine.mat"))
    fixed_ras = np.array([[-3.0, -4.0, 5.0], [-10.0, -12.0, 2.0], [5.0, -7.0, -3.5]])
    moving_ras = fixed_ras + np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 0.0], [2.0, 2.0, -1.0]])
    to_lps = np.array([-1.0, -1.0, 1.0])
    labels = ["a", "b", "c"]
    _fcsv(tmp_path / "lf.fcsv", fixed_ras, labels)
    _fcsv(tmp_path / "lm.fcsv", moving_ras, labels, cs="LPS")
    write_points_csv(tmp_path / "lf.csv", PointSet(fixed_ras * to_lps))
    write_points_csv(tmp_path / "lm.csv", PointSet(moving_ras * to_lps))
    rows = []
    for ext in ("fcsv", "csv"):
        res = invoke("evaluate", "--fixed", f, "--moving", f, "--fixed-landmarks", tmp_path / f"lf.{ext}",
                     "--moving-landmarks", tmp_path / f"lm.{ext}", "--transforms-from", tmp_path / "a_",
                     "-o", tmp_path / f"ev_{ext}", "--json")
        assert res.exit_code == 0, res.stderr
        rows.append(_json.loads(res.stdout)["pairs"][0])
    assert rows[0]["tre_per_landmark"] == pytest.approx(rows[1]["tre_per_landmark"], abs=1e-9)
    assert rows[0]["tre_initial_mean"] == pytest.approx(rows[1]["tre_initial_mean"], abs=1e-9)
    for ext in ("fcsv", "csv"):
        res = invoke("apply", "--points", "-i", tmp_path / f"lf.{ext}", "-t", tmp_path / "a_0GenericAffine.mat",
                     "-o", tmp_path / f"mapped_{ext}.csv")
        assert res.exit_code == 0, res.stderr
    with open(tmp_path / "mapped_fcsv.csv") as a, open(tmp_path / "mapped_csv.csv") as b:
        pa = [[float(r[k]) for k in "xyz"] for r in _csv.DictReader(a)]
        pb = [[float(r[k]) for k in "xyz"] for r in _csv.DictReader(b)]
    assert np.allclose(pa, pb, atol=1e-9) and np.allclose(pb, fixed_ras * to_lps + [1.0, -2.0, 0.5], atol=1e-9)


def test_tre_with_affine_and_field():
    rng = np.random.default_rng(1)
    pf = rng.uniform(-20, 20, size=(12, 3))
    t = np.array([3.2, -1.5, 2.0])
    pm = pf + t
    r = tre(pf, pm, AffineTransform.translation(t))
    assert r["n_landmarks"] == 12
    assert r["tre_max_mm"] < 1e-9
    assert r["initial_mean_mm"] == pytest.approx(np.linalg.norm(t))
    r = tre(pf, pm, AffineTransform.translation(t + np.array([0.0, 0.4, -0.3])))
    assert r["tre_mean_mm"] == pytest.approx(0.5) and r["tre_median_mm"] == pytest.approx(0.5)
    assert len(r["tre_per_landmark_mm"]) == 12
    r0 = tre(pf, pm)  # identity
    assert r0["tre_mean_mm"] == pytest.approx(r0["initial_mean_mm"])
    # a constant displacement field plus an affine, in ANTs order [Warp, Affine]: x -> A(x + u)
    g = Grid((30, 30, 30), (2.0, 2.0, 2.0), (-30.0, -30.0, -30.0), np.eye(3).ravel())
    u = torch.zeros((3, *g.shape))
    u[0] = 1.0
    comp = CompositeTransform([AffineTransform.translation(t - np.array([1.0, 0, 0])), DisplacementField(u, g)])
    assert tre(pf, pm, comp)["tre_max_mm"] < 1e-5


def test_tre_pairs_by_id_and_checks_counts():
    f = PointSet(np.array([[0.0, 0, 0], [10, 0, 0]]), ["id", "x", "y", "z"], [{"id": "a"}, {"id": "b"}])
    m = PointSet(np.array([[10.0, 0, 1], [0, 0, 1]]), ["id", "x", "y", "z"], [{"id": "b"}, {"id": "a"}])
    r = tre(f, m)
    assert r["tre_per_landmark_mm"] == [1.0, 1.0] and r["ids"] == ["a", "b"]
    m2 = PointSet(np.array([[1.0, 0, 0]]), ["id", "x", "y", "z"], [{"id": "zz"}])
    with pytest.raises(InputError, match="ids differ"):
        tre(f, m2)
    with pytest.raises(InputError, match="has 2 points but"):
        tre(f.points, m2.points)


def test_tre_matches_bench_with_a_field():
    bm = _bench()
    g = _grid("oblique15", "aniso", size=(20, 18, 10))
    field = _field(g, _quadratic)
    pf = g.world_coords()[3:6, 4:8, 5:9].reshape(-1, 3).numpy() + 0.37  # off-grid points inside
    pm = pf + np.array([1.0, 2.0, -1.0])
    ours = tre(pf, pm, field)
    disp_ras = field.disp.numpy().transpose(3, 2, 1, 0) * np.array([-1.0, -1.0, 1.0])
    flip = np.array([-1.0, -1.0, 1.0])
    ref = bm.tre(pf * flip, pm * flip, disp_ras, g.ras_affine())
    assert ours["tre_mean_mm"] == pytest.approx(ref["tre_mean_mm"], abs=1e-4)
    assert np.allclose(ours["tre_per_landmark_mm"], ref["tre_per_landmark_mm"], atol=1e-4)


# ----------------------------------------------------------------------------- report JSON
def test_stage_timer_and_peak_memory():
    t = StageTimer()
    with t.stage("a"):
        sum(range(1000))
    with t.stage("b"):
        pass
    with t.stage("a"):
        pass
    t.add("c", 1.5)
    assert list(t.stages) == ["a", "b", "c"] and t.stages["c"] == 1.5
    assert t.total == pytest.approx(sum(t.stages.values()))
    with PeakMemory() as pm:
        x = np.ones(4 << 20)  # 32 MB
        del x
    d = pm.as_dict()
    assert d["peak_rss_mb"] > 10 and d["rss_growth_mb"] >= 0


def test_json_safe_handles_nan_numpy_torch_and_paths(tmp_path):
    obj = {"a": float("nan"), "b": np.float32(1.5), "c": np.arange(3), "d": torch.tensor([1.0, float("inf")]),
           3: (1, 2), "p": tmp_path, "g": Grid((2, 3, 4), (1, 1, 1), (0, 0, 0), np.eye(3).ravel()),
           "n": np.int64(7), "t": np.bool_(True)}
    s = json_safe(obj)
    assert s["a"] is None and s["b"] == 1.5 and s["c"] == [0, 1, 2] and s["d"] == [1.0, None]
    assert s["3"] == [1, 2] and s["p"] == str(tmp_path) and s["g"]["axcodes"] == "LPS"
    assert s["n"] == 7 and s["t"] is True
    json.dumps(s, allow_nan=False)


def test_build_report(tmp_path):
    from regcli.config import RegisterConfig

    fixed = make_phantom("RAS", "aniso")
    fpath = tmp_path / "fixed.nii.gz"
    sitk.WriteImage(fixed, str(fpath))
    lm = tmp_path / "lm.csv"
    lm.write_text("x,y,z\n1,2,3\n")
    cfg = RegisterConfig(seed=7, deterministic=True, device="cpu")
    metrics = {"dice_per_label": {2: 0.9, 1: float("nan")}, "dice_mean": 0.9}
    rep = build_report("register", cfg, {"fixed": fpath, "landmarks": lm, "mask": None, "transforms": [lm, fpath]},
                       {"read": 0.5, "affine": 2.25}, metrics, {"converged": True},
                       outputs=[tmp_path / "outWarped.nii.gz"])
    assert list(rep)[:4] == ["schema", "regcli_version", "status", "command"]
    assert list(rep) == ["schema", "regcli_version", "status", "command", "created", "versions", "platform",
                         "device", "seed", "deterministic", "config", "inputs", "stages", "total_seconds",
                         "memory", "outputs", "metrics", "extra"]
    import regcli

    assert rep["regcli_version"] == regcli.__version__
    assert set(rep["versions"]) >= {"regcli", "python", "torch", "SimpleITK", "numpy"}
    assert rep["seed"] == 7 and rep["deterministic"] is True
    assert rep["config"]["seed"] == 7 and rep["device"]["type"] == "cpu" and rep["device"]["torch_threads"] >= 1
    assert rep["total_seconds"] == pytest.approx(2.75)
    assert rep["memory"]["peak_rss_mb"] > 0
    ent = rep["inputs"]["fixed"]
    assert ent["sha256"] == hashlib.sha256(fpath.read_bytes()).hexdigest() == sha256_file(fpath)
    g = Grid.from_sitk(fixed)
    assert ent["grid"]["size"] == list(g.size) and ent["grid"]["axcodes"] == "RAS"
    assert np.allclose(ent["grid"]["origin"], g.origin) and np.allclose(ent["grid"]["spacing"], g.spacing)
    assert rep["inputs"]["landmarks"]["grid"] is None and rep["inputs"]["mask"] is None
    assert [e["path"] for e in rep["inputs"]["transforms"]] == [str(lm), str(fpath)]
    assert rep["metrics"]["dice_per_label"] == {"2": 0.9, "1": None}
    assert rep["outputs"] == [str(tmp_path / "outWarped.nii.gz")]
    text = report_json(rep)
    assert "NaN" not in text and json.loads(text)["extra"] == {"converged": True}
    out = tmp_path / "outReport.json"
    write_report(out, rep)
    assert json.loads(out.read_text()) == json.loads(text)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


# ----------------------------------------------------------------------------- HTML
def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _image(img: sitk.Image, name: str, labels: bool = False) -> Image:
    arr = sitk.GetArrayFromImage(img)
    arr = arr.astype(np.int32) if labels else arr.astype(np.float32)
    return Image(torch.from_numpy(arr), Grid.from_sitk(img), name)


def test_html_report_renders_and_references_every_png():
    from regcli.reports.html import render_html_report
    from regcli.resample import warp
    from regcli.reports.metrics import label_overlap_metrics

    fs = make_phantom("oblique15", "aniso")
    fixed = _image(fs, "fixed")
    fl = _image(phantom_labels(fs), "fixed labels", labels=True)
    t = np.array([2.0, -1.0, 1.5])
    ms = make_phantom("PIL", "iso", transform=lambda p: p - t)
    moving = _image(ms, "moving")
    ml = _image(phantom_labels(ms), "moving labels", labels=True)
    T = AffineTransform.translation(t * 0.8)
    warped, wl = warp(moving, T, fixed.grid), warp(ml, T, fixed.grid, "nearest")
    field = _field(fixed.grid, lambda x: x + torch.as_tensor(t * 0.8) + 0.5 * torch.sin(x / 6.0))
    det = jacobian_determinant(field)
    metrics = label_overlap_metrics(fl, wl)
    metrics["jacobian"] = jacobian_stats(det, fl.data > 0)
    metrics["tre"] = tre(np.zeros((2, 3)), np.array([[1.0, 0, 0], [0, 1.0, 0]]), T)
    history = {"affine": [{"iteration": i, "loss": 1.0 / (i + 1), "level": i // 10} for i in range(30)],
               "instance": [{"iteration": i, "loss": -i * 0.01, "similarity": -i * 0.02, "regularization": i * 0.01}
                            for i in range(20)]}
    report = build_report("register fixed.nii.gz moving.nii.gz", {"seed": 0}, {"tx": ["a.mat", None]},
                          {"affine": 1.0}, metrics)
    html, pngs = render_html_report(fixed, "caseReport", moving=moving, warped=warped, fixed_labels=fl,
                                    warped_labels=wl, jacobian=det, history=history, report=report,
                                    label_names={1: "<body>", 2: "blob", 3: "marker"})
    assert set(pngs) == {f"caseReport_{n}.png" for n in ("slices", "checkerboard", "jacobian", "loss")}
    for name, data in pngs.items():
        assert f"src='{name}'" in html
        w, h = _png_size(data)
        assert 300 <= w <= 4000 and 200 <= h <= 4000 and len(data) > 5000
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "&lt;body&gt;" in html and "<body>" in html  # label names are escaped
    assert "Dice" in html and "TRE" in html and "det J" in html
    assert "http" not in html  # no external assets


def test_html_report_minimal_and_bad_png_base():
    from regcli.reports.html import render_html_report

    fixed = _image(make_phantom("LPS", "iso", size=(24, 22, 20)), "fixed")
    html, pngs = render_html_report(fixed, "r")
    assert list(pngs) == ["r_slices.png"] and "src='r_slices.png'" in html
    with pytest.raises(ValueError, match="png_base"):
        render_html_report(fixed, "out/dir")
    with pytest.raises(ValueError, match="png_base"):
        render_html_report(fixed)
    # keyword spelling used by the pipeline, and timings without a report
    html, pngs = render_html_report(fixed=fixed, png_basename="p", timings={"read": 0.5, "affine": 1.25, "total": 2.0})
    assert list(pngs) == ["p_slices.png"] and "Timings" in html and "1.25" in html


@pytest.mark.parametrize("base", ["a b_Report", "it's \"q\" & <x>_Report", "c#1?x=%41_Report", "ünï:\\_Report"])
def test_html_report_links_figures_of_any_file_name(tmp_path, base):
    """Any name the OS takes works as the figures' stem: the page percent-encodes it in src (so '#', '?' and '%' are
    characters of the name, not a fragment, a query or an escape) and HTML-escapes it; the link resolves, as a
    browser resolves it against the page's file URL, to the file written under that name."""
    import re as _re
    from html import unescape
    from pathlib import Path
    from urllib.parse import unquote, urljoin, urlsplit

    from regcli.reports.html import render_html_report

    fixed = _image(make_phantom("LPS", "iso", size=(24, 22, 20)), "fixed")
    html, pngs = render_html_report(fixed, base)
    assert list(pngs) == [f"{base}_slices.png"]
    srcs = _re.findall(r"<img src='([^']*)'", html)
    assert len(srcs) == 1 and not set(srcs[0]) & set(" '\"<>&#?")
    page = (tmp_path / f"{base}.html").as_uri()
    url = urljoin(page, unescape(srcs[0]))
    parts = urlsplit(url)
    assert not parts.query and not parts.fragment
    assert Path(unquote(parts.path)) == tmp_path / f"{base}_slices.png"


def test_html_report_names_the_jacobian_region_and_the_labels_left_out_of_hd95():
    from regcli.reports.html import render_html_report

    fixed = _image(make_phantom("LPS", "iso", size=(24, 22, 20)), "fixed")
    det = np.ones(fixed.grid.shape, np.float32)
    mask = np.zeros(fixed.grid.shape, bool)
    mask[5:10] = True
    metrics = {"labels": [1, 2], "dice_per_label": {1: 0.9, 2: 0.0}, "dice_mean": 0.45,
               "hd95_per_label": {1: 1.5, 2: float("nan")}, "hd95_mean": 1.5, "hd95_labels_lost": [2]}
    for source, column in (("fixed_mask", "in fixed mask"), ("fixed_labels", "in fixed labels")):
        metrics["jacobian"] = jacobian_stats(det, mask, source)
        assert metrics["jacobian"]["in_mask_source"] == source
        html, _ = render_html_report(fixed, "r", metrics=metrics)
        assert f"<th>{column}</th>" in html and "<th>in mask</th>" not in html and "in_mask_source" not in html
    assert "mean HD95 (mm), over 1 of 2 labels" in html and "labels left out of mean HD95" in html
    assert "<td>lost by warping</td>" in html
    metrics["jacobian"] = jacobian_stats(det, mask)  # no source given (regcli jacobian --mask): as before
    assert "in_mask_source" not in metrics["jacobian"]
    assert "<th>in mask</th>" in render_html_report(fixed, "r", metrics=metrics)[0]


def test_display_orientation_does_not_depend_on_the_voxel_layout():
    """The same physical phantom stored as LPS, RAS or PIL must give identical display arrays."""
    from regcli.reports.html import _VIEWS, _Display

    shown = []
    for direction in ("LPS", "RAS", "PIL"):
        img = make_phantom(direction, "iso", size=None)
        d = _Display(Grid.from_sitk(img))
        vol = d.orient(sitk.GetArrayFromImage(img))
        shown.append((vol, d.spacing_zyx))
    for vol, sp in shown[1:]:
        assert vol.shape == shown[0][0].shape and np.allclose(sp, shown[0][1])
        assert np.allclose(vol, shown[0][0], atol=1e-5)
    # the L marker sits at +x (Left), +y (Posterior), +z (Superior): in the display array (z->S, y->P, x->L)
    vol = shown[0][0]
    z, y, x = np.unravel_index(np.argmax(vol), vol.shape)
    assert x > vol.shape[2] / 2 and y > vol.shape[1] / 2 and z > vol.shape[0] / 2
    assert _VIEWS["axial"][3] == ("R", "L", "A", "P")  # +x (L) on the right of the screen: radiological


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux-only")
def test_peak_memory_is_the_process_own_not_its_parents():
    """ru_maxrss carries a parent's high-water mark across fork+exec; the reported peak must not."""
    import subprocess

    ballast = np.ones(800 * 2**20, dtype=np.uint8)  # the parent touches 800 MiB
    code = "from regcli.reports.report import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 700, out.stdout
    del ballast


def test_warning_log_keeps_the_distinct_warnings_of_its_own_thread():
    """Two runs in two threads of one process: each report lists its own warnings, once each, in order."""
    import logging
    import threading

    from regcli.reports.report import WarningLog

    log = logging.getLogger("regcli")
    barrier = threading.Barrier(2, timeout=60)  # a failing thread breaks the barrier instead of hanging the other
    got: dict[str, list[str]] = {}

    def run(name: str) -> None:
        with WarningLog() as w:
            barrier.wait()
            for i in (1, 2, 1):
                log.warning("%s: warning %d", name, i)
                barrier.wait()  # interleave the two threads' records
            log.info("%s: not a warning", name)
        got[name] = w.messages

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"a": ["a: warning 1", "a: warning 2"], "b": ["b: warning 1", "b: warning 2"]}


def test_loss_figure_joins_a_pyramids_levels_and_a_set_of_candidates():
    """One panel per pyramid (levels one after the other, iterations numbered on) and per set of candidates; a
    stage with the pyramid's own name keeps its panel; the history passed in is not changed."""
    import copy

    from regcli.reports.html import _joined_levels

    history = {
        "affine/init": [{"candidate": 0, "score": -0.3}],
        "affine/init/candidate0": [{"iteration": 1, "loss": 3.0}, {"iteration": 2, "loss": 2.0}],
        "affine/init/candidate1": [{"iteration": 1, "loss": 4.0}],
        "affine/rigid/8mm": [{"iteration": 1, "loss": 1.0}],
        "affine/rigid/4mm": [{"iteration": 1, "loss": 0.5}, {"iteration": 2, "loss": 0.4}],
        "convexadam/instance": [{"iteration": 1, "loss": 0.1}],
    }
    before = copy.deepcopy(history)
    out = _joined_levels(history)
    assert list(out) == ["affine/init", "affine/init (candidates)", "affine/rigid", "convexadam/instance"]
    assert out["affine/init"] == before["affine/init"]
    assert [(r["iteration"], r["level"], r["loss"]) for r in out["affine/rigid"]] == [
        (1, "8mm", 1.0), (2, "4mm", 0.5), (3, "4mm", 0.4)]
    assert [r["level"] for r in out["affine/init (candidates)"]] == ["candidate0", "candidate0", "candidate1"]
    assert history == before
