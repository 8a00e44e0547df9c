"""Interop with ANTs (antspyx) and SimpleITK: file formats and the order of transform lists."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import has_antspyx, make_phantom, phantom_labels
from regcli.io.transforms import read_transform_list, write_affine, write_composite, write_displacement
from regcli.resample import warp
from regcli.spaces import Grid, Image
from regcli.transforms import AffineTransform, CompositeTransform, DisplacementField


def _case(tmp_path, fdir="oblique15", fsp="aniso", mdir="PIL"):
    fx, mv = make_phantom(fdir, fsp), make_phantom(mdir, "iso")
    fg, mg = Grid.from_sitk(fx), Grid.from_sitk(mv)
    A = AffineTransform.from_linear(sitk.VersorTransform((0, 0.3, 1), 0.35).GetMatrix(), (3, -2, 1), fg.center_world())
    w = fg.world_coords()
    u = torch.stack([4 * torch.sin(w[..., 1] / 6), 3 * torch.cos(w[..., 0] / 7), 1.5 * torch.sin(w[..., 2] / 5)]).float()
    F = DisplacementField(u, fg)
    write_affine(A, tmp_path / "p_0GenericAffine.mat")
    write_displacement(F, tmp_path / "p_1Warp.nii.gz")
    lab = phantom_labels(mv)
    sitk.WriteImage(lab, str(tmp_path / "lab.nii.gz"))
    sitk.WriteImage(fx, str(tmp_path / "fx.nii.gz"))
    labt = Image(torch.from_numpy(sitk.GetArrayFromImage(lab).astype(np.int32)), mg)
    return fx, lab, labt, fg, A, F


def test_composite_order_matches_sitk_and_is_order_sensitive(tmp_path):
    fx, lab, labt, fg, A, F = _case(tmp_path)
    ours = CompositeTransform(read_transform_list([str(tmp_path / "p_1Warp.nii.gz"),
                                                   str(tmp_path / "p_0GenericAffine.mat")]).transforms)
    pts = torch.from_numpy(np.random.default_rng(0).uniform(-15, 15, (200, 3)))
    mapped = ours.map_points(pts).numpy()
    expected = A.map_points(F.map_points(pts)).numpy()  # x -> A(x + u(x))
    assert np.abs(mapped - expected).max() < 1e-4  # the warp file stores float32
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(A.to_sitk())  # added first -> applied last
    comp.AddTransform(F.to_sitk_transform())
    ref = np.array([comp.TransformPoint(tuple(p)) for p in pts.numpy()])
    assert np.abs(mapped - ref).max() < 1e-4
    rev = CompositeTransform([A, F]).map_points(pts).numpy()
    assert np.linalg.norm(rev - mapped, axis=1).max() > 1.0


def test_h5_composite_roundtrip(tmp_path):
    fx, lab, labt, fg, A, F = _case(tmp_path)
    comp = CompositeTransform([F, A])
    write_composite(comp, tmp_path / "c.h5")
    back = read_transform_list([str(tmp_path / "c.h5")])
    pts = torch.from_numpy(np.random.default_rng(1).uniform(-15, 15, (300, 3)))
    assert np.abs(back.map_points(pts).numpy() - comp.map_points(pts).numpy()).max() < 1e-4


@pytest.mark.oracle
@pytest.mark.skipif(not has_antspyx(), reason="antspyx not installed")
def test_ants_apply_transforms_agrees_with_regcli_labels(tmp_path):
    import ants

    fx, lab, labt, fg, A, F = _case(tmp_path, "oblique15", "iso", "PIL")
    ours = warp(labt, CompositeTransform([F, A]), fg, "nearest").numpy()
    out = ants.apply_transforms(ants.image_read(str(tmp_path / "fx.nii.gz")), ants.image_read(str(tmp_path / "lab.nii.gz")),
                                [str(tmp_path / "p_1Warp.nii.gz"), str(tmp_path / "p_0GenericAffine.mat")],
                                interpolator="nearestNeighbor")
    theirs = out.numpy().transpose(2, 1, 0)
    assert (theirs == ours).mean() >= 0.995
