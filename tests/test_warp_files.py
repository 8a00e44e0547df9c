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


def _gzip_members(path):
    """The gzip header flags and mtime of ``path``, and its decompressed size."""
    import gzip

    raw = path.read_bytes()
    return raw[3], int.from_bytes(raw[4:8], "little"), len(gzip.decompress(raw))


def test_float_fields_are_stored_in_the_gzip_stream_and_read_back_exactly(tmp_path):
    """ITK always deflates .nii.gz, which buys a float field ~9 % for ~3 s; regcli stores such payloads in a
    standard gzip stream (level 0), deflates compressible ones, and leaves no temporary file behind."""
    from regcli.io.images import GZIP_LEVEL, gzip_level_for, read_image, write_sitk

    g = Grid((21, 17, 13), (1.5, 1.0, 2.0), (3.0, -4.0, 5.0), sitk.VersorTransform((1, 2, 3), 0.3).GetMatrix())
    noise = torch.randn((3, *g.shape), generator=torch.Generator().manual_seed(0))
    assert gzip_level_for(noise.permute(1, 2, 3, 0).numpy()) == 0
    field = tmp_path / "f_1Warp.nii.gz"
    write_displacement(DisplacementField(noise, g), field)
    flags, mtime, n = _gzip_members(field)
    assert (flags, mtime) == (0, 0)  # no file name, no time: equal images give equal bytes
    assert field.stat().st_size > n  # stored, not deflated
    back = sitk.ReadImage(str(field))
    assert np.array_equal(sitk.GetArrayFromImage(back), noise.permute(1, 2, 3, 0).numpy())
    assert Grid.from_sitk(back).allclose(g)
    write_displacement(DisplacementField(noise, g), tmp_path / "again.nii.gz")
    assert (tmp_path / "again.nii.gz").read_bytes() == field.read_bytes()

    blocky = np.zeros(g.shape, np.float32)
    blocky[3:9, 4:10, 5:12] = 7.0
    img = sitk.GetImageFromArray(blocky)
    g.apply_to_sitk(img)
    assert gzip_level_for(blocky) == GZIP_LEVEL
    write_sitk(img, tmp_path / "blocky.nii.gz")
    assert (tmp_path / "blocky.nii.gz").stat().st_size < blocky.nbytes / 10  # deflated by ITK
    assert np.array_equal(read_image(tmp_path / "blocky.nii.gz", check_variance=False).numpy(), blocky)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.nii.gz", "blocky.nii.gz", "f_1Warp.nii.gz"]


def test_a_failed_stored_write_leaves_no_file(tmp_path, monkeypatch):
    from regcli.io.images import write_sitk

    img = sitk.GetImageFromArray(np.random.default_rng(0).standard_normal((9, 8, 7)).astype(np.float32))
    real = sitk.WriteImage

    def half_then_fail(image, name, *args, **kwargs):
        real(image, name, *args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_sitk(img, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []
