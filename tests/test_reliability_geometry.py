"""RELIABILITY rows closed end to end through the full pipeline: G2 (deformable), N4, T3 (report), T4, T5.

Small phantoms (40 x 36 x 32 voxels of 1 mm), a 2 mm working grid and few iterations keep the file fast on
one thread. Bounds are RELIABILITY's (G1: max |u| < 0.1 mm, mean < 0.02 mm in the mask), the same ones
``test_pipeline.py::test_g1_register_to_itself_is_identity`` uses for the deformable stage.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import as_image, make_phantom, phantom_mask, write
from regcli.pipeline import RegisterInputs, register_images, run_register
from regcli.resample import warp
from test_pipeline import _cfg, _sin_field

SIZE = (40, 36, 32)  # (x, y, z) voxels at 1 mm: covers the phantom's 34 x 28 x 24 mm body


def small_phantom(direction="LPS", centre=(1.5, -2.0, 3.0), transform=None) -> sitk.Image:
    return make_phantom(direction, "iso", size=SIZE, centre=centre, transform=transform)


def fast_cfg(**over):
    """test_pipeline's FAST config on a 2 mm working grid."""
    return _cfg(**{"working_spacing_mm": 2.0, **over})


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def assert_identity(reg, mask: torch.Tensor) -> None:
    """RELIABILITY G1 on a Registration: |A - I| < 1e-3, |t| < 0.05 mm, max |u| < 0.1 mm and mean < 0.02 mm in mask."""
    A = reg.affine.matrix
    a_err, t_err = float(np.abs(A[:3, :3] - np.eye(3)).max()), float(np.linalg.norm(A[:3, 3]))
    mag = reg.field.magnitude()[mask]
    mx, mean = float(mag.max()), float(mag.mean())
    assert a_err < 1e-3 and t_err < 0.05, (a_err, t_err)
    assert mx < 0.1 and mean < 0.02, (mx, mean)


# ------------------------------------------------------------------------------------------ G2 (deformable)
@pytest.mark.parametrize("direction", ["LPS", "oblique15"])
@pytest.mark.parametrize("layout", ["RAS", "PIL"])
def test_g2_other_voxel_layout_full_pipeline_is_identity(direction, layout):
    """moving = DICOMOrient(fixed, layout): the same world samples in another array layout. Affine + ConvexAdam
    must give the identity in world space and a warped image equal to fixed.

    Measured (|A - I|, |t|, max / mean |u| in mask, NCC): LPS fixed 1.5e-4, 0.005 mm, 0.047 / 0.015 mm, 0.99998;
    oblique fixed 0, 0.006 mm, 0.027 / 0.011 mm, 0.99998; the same for RAS and PIL, and what the fixed image
    registered to itself gives (LPS 0.055 / 0.018 mm), so the layout adds nothing. The non-zero field is the
    deformable stage's own noise at identity: with fixed == moving and no affine stage, ConvexAdam's discrete
    step gives exactly 0, its instance optimisation (Adam, gradient_floor 0) 0.09 mm mean, and the refinement
    (refine_gradient_floor) brings it back down. On a 1.5 mm working grid this small phantom gives a mean of
    0.026-0.029 mm, above G1's 0.02 mm, layout or not: hence the 2 mm working grid here."""
    f_img = small_phantom(direction)
    m_img = sitk.DICOMOrient(f_img, layout)
    assert m_img.GetDirection() != f_img.GetDirection()
    fixed, moving = as_image(f_img), as_image(m_img)
    reg = register_images(fixed, moving, fast_cfg())
    mask = torch.from_numpy(phantom_mask(f_img))
    assert_identity(reg, mask)
    warped = warp(moving, reg.transform, fixed.grid).data.numpy()
    assert ncc(warped[mask.numpy()], fixed.data.numpy()[mask.numpy()]) > 0.999


# ------------------------------------------------------------------------------------------ N4
def test_n4_large_origin_self_registration_is_identity():
    """G1 (affine + deformable) with the phantom, and its grid, about 1e4 mm from the world origin."""
    centre = np.array([1.0e4, -1.0e4, 1.0e4])
    img = small_phantom("oblique15", centre=tuple(centre), transform=lambda p: p - centre)
    assert np.abs(img.GetOrigin()).min() > 9.9e3
    fixed = as_image(img)
    reg = register_images(fixed, fixed, fast_cfg())
    # measured: |A - I| 0, |t| 0.00016 mm, max / mean |u| 0.022 / 0.008 mm: the same numbers, to the last digit,
    # as the same phantom centred at (1.5, -2, 3) mm
    assert_identity(reg, torch.from_numpy(phantom_mask(img)))


# ------------------------------------------------------------------------------------------ T5
WAVELENGTH, AMP = 40.0, 2.0


def sine_disp(grid) -> torch.Tensor:
    """u(p) = AMP * (sin(k y), sin(k z + 0.5), sin(k x)), k = 2 pi / WAVELENGTH, at the grid's voxel centres:
    (1, 3, Z, Y, X) float64, LPS mm."""
    p = grid.world_coords()  # (Z, Y, X, 3) LPS mm
    k = 2.0 * np.pi / WAVELENGTH
    u = AMP * torch.stack([torch.sin(k * p[..., 1]), torch.sin(k * p[..., 2] + 0.5), torch.sin(k * p[..., 0])])
    return u[None]


# Over whole wavelengths: every component has one non-zero first derivative A k cos (mean square A^2 k^2 / 2)
# and one non-zero second derivative -A k^2 sin (A^2 k^4 / 2); both energies average over the 3 components.
ANALYTIC = {"diffusion": AMP ** 2 * (2 * np.pi / WAVELENGTH) ** 2 / 2,
            "bending": AMP ** 2 * (2 * np.pi / WAVELENGTH) ** 4 / 2}


@pytest.mark.parametrize("direction,fine_spacing", [("LPS", (1.0, 1.0, 1.0)), ("oblique15", (1.0, 1.0, 1.0)),
                                                    ("LPS", (0.8, 1.0, 1.25))])
def test_t5_regularizers_agree_on_1mm_and_2mm_grids(direction, fine_spacing):
    """The same physical field on a grid and on one with twice the spacing (same 40 mm cube, non-zero origin):
    every registered regulariser gives the same value within 5 %, and the analytic one (so the units are
    per mm, with the (x, y, z) spacing on the right tensor axes).

    Measured (fine grid, coarse grid, analytic): diffusion 0.0492, 0.0489, 0.0493 (0.6 % apart); bending
    1.18e-3, 1.14e-3, 1.22e-3 /mm^2 (3.8 % apart: (sin(kh/2) / (kh/2))^4 discretisation and the grid ends)."""
    from conftest import DIRECTIONS
    from regcli.regularizers import REGULARIZERS
    from regcli.spaces import Grid

    D = DIRECTIONS[direction]
    values = {}
    for factor in (1, 2):
        sp = np.asarray(fine_spacing) * factor
        size = [int(round(40.0 / s)) + 1 for s in sp]
        grid = Grid(size, tuple(sp), (12.0, -30.0, 7.5), D.ravel())
        u = sine_disp(grid)
        values[factor] = {name: float(REGULARIZERS.get(name)()(u, grid.spacing)) for name in REGULARIZERS.names()
                          if name != "none"}
    assert {"diffusion", "bending"} <= set(values[1])
    for name, v1 in values[1].items():
        v2 = values[2][name]
        assert abs(v2 - v1) < 0.05 * abs(v1), (name, v1, v2)
        if name in ANALYTIC:
            assert abs(v1 - ANALYTIC[name]) < 0.05 * ANALYTIC[name], (name, v1, ANALYTIC[name])


# ------------------------------------------------------------------------------------------ T3
def _run(tmp_path, fixed_img, moving_img, prefix, cfg, fixed_labels=None):
    """run_register on images written to tmp_path; returns (report.json as read back, transform from the files)."""
    from regcli.io.transforms import read_transform_list

    f = write(fixed_img, tmp_path / f"{prefix}f.nii.gz")
    m = write(moving_img, tmp_path / f"{prefix}m.nii.gz")
    fl = write(fixed_labels, tmp_path / f"{prefix}fl.nii.gz") if fixed_labels is not None else None
    run_register(RegisterInputs(f, m, str(tmp_path / prefix), fixed_labels=fl), cfg)
    report = json.loads((tmp_path / f"{prefix}Report.json").read_text())
    tx = read_transform_list([str(tmp_path / f"{prefix}1Warp.nii.gz"), str(tmp_path / f"{prefix}0GenericAffine.mat")])
    return report, tx


def test_t3_written_transforms_of_both_directions_compose_to_identity_and_report_inverse_consistency(tmp_path):
    """A->B and B->A through `register` (convexadam), read back from their files: T_ba(T_ab(x)) ~ x, mean < 0.5 mm
    in the mask. regcli reports the inverse consistency of each run (forward warp against its InverseWarp,
    ``metrics.inverse_consistency_mm``, docs/methods.md section 6); it has no report field for the
    two-run composition, so that one is checked here only."""
    a = small_phantom("oblique15")
    b = small_phantom("oblique15", transform=lambda p: p + _sin_field(p, 1.5) + np.array([1.0, -0.5, 0.5]))
    cfg = fast_cfg()
    rep_ab, ab = _run(tmp_path, a, b, "ab_", cfg)
    rep_ba, ba = _run(tmp_path, b, a, "ba_", cfg)
    mask = torch.from_numpy(phantom_mask(a))
    pts = as_image(a).grid.world_coords()[mask]
    err = (ba.map_points(ab.map_points(pts)) - pts).norm(dim=-1)
    assert float(err.mean()) < 0.5  # measured: mean 0.12, p95 0.24, max 0.83 mm
    for rep in (rep_ab, rep_ba):
        ic = rep["metrics"]["inverse_consistency_mm"]
        assert {"mean_mm", "p99_mm", "max_mm", "points", "solver"} <= set(ic)
        assert all(np.isfinite(ic[k]) for k in ("mean_mm", "p99_mm", "max_mm"))
        # RELIABILITY T2's bounds for forward∘inverse; measured mean 3e-5, p99 4e-4, max 1.4e-3 mm
        assert ic["mean_mm"] < 0.1 and ic["p99_mm"] < 0.5
    # the report's numbers describe the files: the written Warp composed with the written InverseWarp, at the
    # InverseWarp's voxels that the Warp's grid covers (the phantom's 1 mm grid, not the 2 mm working grid)
    from regcli.io.transforms import read_transform

    fwd = read_transform(str(tmp_path / "ab_1Warp.nii.gz"))[0]
    inv = read_transform(str(tmp_path / "ab_1InverseWarp.nii.gz"))[0]
    y = inv.grid.world_coords()
    q = inv.map_points(y)
    inside = fwd.grid.inside(q)
    e = (fwd.map_points(q[inside]) - y[inside]).norm(dim=-1).double()
    ic = rep_ab["metrics"]["inverse_consistency_mm"]
    assert ic["points"] == int(inside.sum())
    assert ic["mean_mm"] == pytest.approx(float(e.mean()), rel=0.02, abs=1e-6)
    assert ic["max_mm"] == pytest.approx(float(e.max()), rel=0.02, abs=1e-6)


# ------------------------------------------------------------------------------------------ T4
def test_t4_svf_register_reports_jacobian_without_folding(tmp_path):
    """`register` with instance.transform: svf on a pair related by a known smooth 2 mm sine deformation: the
    report carries the Jacobian's min, 1st percentile and % <= 0, over the whole grid and in the mask (given as
    the fixed label map), and the fraction <= 0 in the mask is < 1e-4."""
    fx = small_phantom("LPS", transform=lambda p: p + _sin_field(p, 2.0))  # fixed(x) = phantom(x + s(x))
    mv = small_phantom("LPS")  # so the true fixed -> moving map is x -> x + s(x)
    mask = phantom_mask(fx)
    labels = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels.CopyInformation(fx)
    cfg = fast_cfg(instance={"transform": "svf", "iterations": 40})
    rep, tx = _run(tmp_path, fx, mv, "svf_", cfg, fixed_labels=labels)
    assert rep["config"]["instance"]["transform"] == "svf"
    jac = rep["metrics"]["jacobian"]
    for block in (jac, jac["in_mask"]):
        assert {"jac_min", "jac_p1", "pct_nonpos_jac"} <= set(block)
    assert jac["in_mask"]["n_voxels"] == int(mask.sum())
    # measured in mask: min 0.90, p1 0.92, 0 % <= 0 (whole grid: min 0.85, p1 0.89)
    assert jac["in_mask"]["pct_nonpos_jac"] / 100.0 < 1e-4
    # the registration did follow the deformation (not a trivially fold-free identity)
    pts = as_image(fx).grid.world_coords()[torch.from_numpy(mask)]
    true = pts.numpy() + _sin_field(pts.numpy(), 2.0)
    err = np.linalg.norm(tx.map_points(pts).numpy() - true, axis=1)
    before = np.linalg.norm(pts.numpy() - true, axis=1)
    assert err.mean() < 0.5 * before.mean()  # measured: 1.92 mm before, 0.20 mm after


# ------------------------------------------------------------------------------------------ storage order
def test_the_deformable_result_does_not_depend_on_how_the_fixed_image_is_stored():
    """The bundled example brain (stored LIA) and the same image stored LPS: the working grids hold the same points
    (centred, a multiple of the pooling factors per axis) and the instance optimisation's off-node shift is the same
    world vector, so the deformable stage gives the same mapping. Measured here (3 mm working grid, affine stage
    skipped): mean 0.02 mm, max 0.35 mm apart; before, 0.35 and 6.5 mm (with the affine stage, at 2 mm: 1.3 mm
    mean before, 0.09 mm after, the rest from the affine stage)."""
    from pathlib import Path

    from regcli.methods import working_grid
    from regcli.methods.convexadam import off_nodes

    ex = Path(__file__).resolve().parents[1] / "examples"
    fixed = sitk.ReadImage(str(ex / "fixed_T1w.nii.gz"), sitk.sitkFloat32)
    moving = as_image(sitk.ReadImage(str(ex / "moving_T1w.nii.gz"), sitk.sitkFloat32))
    brain = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(ex / "fixed_labels.nii.gz"))) > 0)
    cfg = fast_cfg(affine={"enabled": False}, working_spacing_mm=3.0, instance={"iterations": 80})
    pts = as_image(fixed).grid.world_coords()[brain][::7]
    maps, grids = {}, {}
    for code in ("LIA", "LPS"):
        f = as_image(sitk.DICOMOrient(fixed, code))
        maps[code] = register_images(f, moving, cfg).transform.map_points(pts)
        grids[code] = working_grid("convexadam", f.grid, cfg)[0]
        s = off_nodes(torch.zeros(1, 1, *grids[code].shape), torch.zeros(3, *grids[code].shape), grids[code])[2]
        assert torch.allclose(s.flatten(), torch.full((3,), 3e-3, dtype=s.dtype), atol=1e-9)  # 1e-3 voxel, +LPS

    def point_set(g):
        key = (g.world_coords().reshape(-1, 3) * 4).round() @ torch.tensor([1e8, 1e4, 1.0], dtype=torch.float64)
        return torch.sort(key).values

    assert torch.equal(point_set(grids["LIA"]), point_set(grids["LPS"]))
    d = (maps["LPS"] - maps["LIA"]).norm(dim=-1)
    assert float(d.mean()) < 0.1 and float(d.max()) < 2.0, (float(d.mean()), float(d.max()))
