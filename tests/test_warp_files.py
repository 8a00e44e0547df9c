"""R1-R3: the warp file's layout, SimpleITK's reading of it, and three routes that apply it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from conftest import has_antspyx, make_phantom, phantom_labels, phantom_mask
from regcli.io.transforms import read_transform_list, write_affine, write_displacement
from regcli.spaces import Grid
from regcli.transforms import AffineTransform, DisplacementField


@pytest.fixture
def warp_case(tmp_path):
    fixed = make_phantom("oblique15", "aniso")
    moving = make_phantom("PIL", "iso")
    g = Grid.from_sitk(fixed)
    w = g.world_coords()
    u = torch.stack([2.5 * torch.sin(w[..., 1] / 7), 2.0 * torch.cos(w[..., 0] / 8), 1.5 * torch.sin(w[..., 2] / 6)]).float()
    A = AffineTransform.from_linear(sitk.VersorTransform((0.2, 0.1, 1.0), 0.15).GetMatrix(), (1.5, -2.0, 1.0),
                                    g.center_world())
    paths = {"warp": tmp_path / "p_1Warp.nii.gz", "affine": tmp_path / "p_0GenericAffine.mat",
             "fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz",
             "labels": tmp_path / "labels.nii.gz"}
    write_displacement(DisplacementField(u, g), paths["warp"])
    write_affine(A, paths["affine"])
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    sitk.WriteImage(phantom_labels(moving), str(paths["labels"]))
    return fixed, moving, g, paths


def test_r1_warp_layout_read_by_nibabel(warp_case):
    nib = pytest.importorskip("nibabel")
    fixed, _, g, paths = warp_case
    img = nib.load(str(paths["warp"]))
    assert img.shape == (*g.size, 1, 3)
    assert img.header.get_intent()[0] == "vector"
    assert img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, g.ras_affine(), atol=1e-4)


def test_r2_sitk_displacement_transform_matches_map_points(warp_case):
    fixed, _, g, paths = warp_case
    field = sitk.Cast(sitk.ReadImage(str(paths["warp"])), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    ours = read_transform_list([str(paths["warp"])])
    mask = torch.from_numpy(phantom_mask(fixed))
    pts = g.world_coords()[mask]
    pts = pts[torch.from_numpy(np.random.default_rng(0).choice(len(pts), 1000, replace=False))]
    ref = np.array([tx.TransformPoint(tuple(p)) for p in pts.numpy()])
    assert np.abs(ours.map_points(pts).numpy() - ref).max() < 1e-4


def _three_routes(paths, interp):
    from regcli.cli.app import app

    out = paths["fixed"].parent / f"regcli_{interp}.nii.gz"
    src = paths["labels"] if interp == "nearest" else paths["moving"]
    res = CliRunner().invoke(app, ["apply", "-i", str(src), "-r", str(paths["fixed"]), "-t", str(paths["warp"]),
                                   "-t", str(paths["affine"]), "-o", str(out), "--interp", interp, "--quiet"])
    assert res.exit_code == 0, res.output
    regcli_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(np.float64)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(sitk.ReadTransform(str(paths["affine"])))  # applied last
    comp.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(paths["warp"])), sitk.sitkVectorFloat64)))
    mode = sitk.sitkNearestNeighbor if interp == "nearest" else sitk.sitkLinear
    sitk_arr = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(src)), sitk.ReadImage(str(paths["fixed"])),
                                                    comp, mode, 0.0)).astype(np.float64)
    return src, regcli_arr, sitk_arr


def _assert_agree(ours, other, interp, fixed, moving):
    """Labels (nearest): >= 99.5 % identical voxels; intensities: RMS difference in the phantom < 0.5 % of
    the moving image's range."""
    if interp == "nearest":
        assert (ours == other).mean() >= 0.995
    else:
        mask = phantom_mask(fixed)
        rng = float(sitk.GetArrayFromImage(moving).max() - sitk.GetArrayFromImage(moving).min())
        assert np.sqrt(np.mean((ours - other)[mask] ** 2)) < 0.005 * rng


@pytest.mark.parametrize("interp", ["linear", "nearest"])
def test_r3_regcli_apply_equals_sitk_resample(warp_case, interp):
    fixed, moving, _, paths = warp_case
    _, ours, ref = _three_routes(paths, interp)
    _assert_agree(ours, ref, interp, fixed, moving)


@pytest.mark.oracle
@pytest.mark.skipif(not has_antspyx(), reason="antspyx not installed")
@pytest.mark.parametrize("interp", ["linear", "nearest"])
def test_r3_regcli_apply_equals_ants_apply_transforms(warp_case, interp):
    import ants

    fixed, moving, _, paths = warp_case
    src, ours, _ = _three_routes(paths, interp)
    out = ants.apply_transforms(ants.image_read(str(paths["fixed"])), ants.image_read(str(src)),
                                [str(paths["warp"]), str(paths["affine"])],
                                interpolator="nearestNeighbor" if interp == "nearest" else "linear")
    theirs = out.numpy().transpose(2, 1, 0).astype(np.float64)
    _assert_agree(ours, theirs, interp, fixed, moving)
