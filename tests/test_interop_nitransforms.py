"""RELIABILITY R4: nitransforms (NiPreps) reads regcli's ANTs-form outputs.

regcli writes ``prefix1Warp.nii.gz`` (vectors in LPS mm, ITK/ANTs convention) and ``prefix0GenericAffine.mat``
(an ITK ``AffineTransform_double_3_3``, LPS). nitransforms works in RAS+:

* ``nitransforms.io.itk.ITKDisplacementsField.from_image`` returns the field with the x and y components
  negated (LPS -> RAS vectors) on the file's own (RAS) affine;
* ``nitransforms.linear.load(..., fmt="itk")`` returns ``F @ T(c) @ M @ T(-c) @ F`` with ``F = diag(-1, -1, 1, 1)``,
  i.e. the same fixed -> moving point mapping expressed in RAS; no inversion;
* ``nitransforms.manip.TransformChain([warp, affine]).map`` applies the first transform first, like
  ``regcli apply -t 1Warp -t 0GenericAffine`` (a fixed point ``x`` goes to ``A(x + u(x))``).

``DenseFieldTransform.map`` returns the stored field exactly at voxel centres (when *every* point is one) and
interpolates with prefiltered cubic B-splines elsewhere, where ITK (and regcli) interpolate linearly: points
off the voxel centres are compared on a field that is linear in space, away from the grid's border (the spline
prefilter's boundary handling changes values up to ~1e-2 mm within 3 voxels of the border).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_phantom
from regcli.io.transforms import read_transform_list, write_affine, write_displacement
from regcli.spaces import Grid
from regcli.transforms import AffineTransform, DisplacementField

nitransforms = pytest.importorskip("nitransforms")
nib = pytest.importorskip("nibabel")
from nitransforms.io.itk import ITKDisplacementsField, ITKLinearTransform  # noqa: E402
from nitransforms.linear import load as load_linear  # noqa: E402
from nitransforms.manip import TransformChain  # noqa: E402
from nitransforms.nonlinear import DenseFieldTransform  # noqa: E402

FLIP = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS, for points and vectors alike


def _grid() -> Grid:
    """A small oblique, anisotropic grid with a non-zero origin (the phantom's fixed grid)."""
    return Grid.from_sitk(make_phantom("oblique15", "aniso", size=(24, 22, 20)))


def _smooth_field(grid: Grid) -> DisplacementField:
    """An asymmetric, non-linear displacement (LPS mm): each component differs, so axis swaps or flips show."""
    w = grid.world_coords()
    u = torch.stack([2.5 * torch.sin(w[..., 1] / 6) + 0.7, 1.8 * torch.cos(w[..., 0] / 7) - 0.4,
                     1.2 * torch.sin(w[..., 2] / 5) + 0.3])
    return DisplacementField(u.float(), grid)


def _linear_field(grid: Grid) -> DisplacementField:
    """``u(x) = B x + b`` (LPS mm): trilinear (ITK) and cubic B-spline (nitransforms) interpolation agree on it."""
    B = np.array([[0.03, -0.02, 0.01], [0.015, 0.02, -0.025], [-0.01, 0.03, 0.02]])
    w = grid.world_coords()
    u = w @ torch.from_numpy(B.T) + torch.tensor([1.1, -0.6, 0.4], dtype=torch.float64)
    return DisplacementField(u.permute(3, 0, 1, 2).float().contiguous(), grid)


def _affine(grid: Grid) -> AffineTransform:
    """A rotation + anisotropic scaling + translation about the grid centre (ITK's ``fixed`` parameter non-zero)."""
    R = np.asarray(sitk.VersorTransform((0.2, -0.4, 1.0), 0.3).GetMatrix()).reshape(3, 3)
    return AffineTransform.from_linear(R @ np.diag([1.05, 0.97, 1.02]), (2.0, -3.0, 1.5), grid.center_world())


def _write_pair(tmp_path, field: DisplacementField, affine: AffineTransform):
    warp, mat = tmp_path / "p_1Warp.nii.gz", tmp_path / "p_0GenericAffine.mat"
    write_displacement(field, warp)
    write_affine(affine, mat)
    return warp, mat


def _voxel_centres(grid: Grid, n: int, seed: int, margin: int = 0) -> torch.Tensor:
    """(n, 3) float64 world LPS mm of random voxel centres at least ``margin`` voxels inside the grid."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(margin, s - margin, n) for s in grid.size], axis=1).astype(np.float64)
    M = grid.index_to_world()
    return torch.from_numpy(idx @ M[:3, :3].T + M[:3, 3])


def _nitransforms_map(chain, points_lps: torch.Tensor) -> np.ndarray:
    """Map LPS points through a nitransforms (RAS+) transform; back in LPS."""
    ras = points_lps.numpy() @ FLIP
    return np.asarray(chain.map(ras), dtype=np.float64) @ FLIP


def test_r4_nitransforms_reads_the_warp_as_ras_vectors(tmp_path):
    grid = _grid()
    field = _smooth_field(grid)
    warp, _ = _write_pair(tmp_path, field, _affine(grid))
    img = nib.load(str(warp))
    assert img.shape == grid.size + (1, 3)  # ANTs (X, Y, Z, 1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from_image warns when the intent is not "vector"
        ras = ITKDisplacementsField.from_image(img)
    ours_lps = np.moveaxis(field.disp.numpy(), 0, -1).transpose(2, 1, 0, 3)  # (Z,Y,X,3) -> (X,Y,Z,3)
    got = np.asarray(ras.dataobj, dtype=np.float64)
    assert got.shape == grid.size + (3,)
    assert np.abs(got - ours_lps @ FLIP).max() < 1e-5  # RAS vectors = ours with x and y negated
    assert np.abs(got[..., 2] - ours_lps[..., 2]).max() < 1e-5
    # the field's header is our grid, in RAS
    ras_affine = np.eye(4)
    ras_affine[:3] = FLIP @ grid.index_to_world()[:3]
    assert np.abs(ras.affine - ras_affine).max() < 1e-4


def test_r4_nitransforms_affine_maps_points_like_regcli(tmp_path):
    grid = _grid()
    affine = _affine(grid)
    _, mat = _write_pair(tmp_path, _smooth_field(grid), affine)
    ours = read_transform_list([str(mat)])
    pts = torch.from_numpy(np.random.default_rng(0).uniform(-30, 30, (100, 3)))
    expected = ours.map_points(pts).numpy()
    assert np.abs(expected - affine.map_points(pts).numpy()).max() < 1e-9
    via_load = load_linear(str(mat), fmt="itk")
    assert np.abs(_nitransforms_map(via_load, pts) - expected).max() < 1e-3
    # the low-level reader: its RAS matrix is F (T(c) M T(-c)) F, the same fixed -> moving mapping
    ras = ITKLinearTransform.from_filename(str(mat)).to_ras()
    F4 = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert np.abs(F4 @ ras @ F4 - affine.matrix).max() < 1e-9


def test_r4_nitransforms_warp_then_affine_maps_voxel_centres_like_regcli(tmp_path):
    grid = _grid()
    warp, mat = _write_pair(tmp_path, _smooth_field(grid), _affine(grid))
    ours = read_transform_list([str(warp), str(mat)])  # regcli apply -t 1Warp -t 0GenericAffine
    chain = TransformChain([DenseFieldTransform.from_filename(str(warp), fmt="itk"), load_linear(str(mat), fmt="itk")])
    pts = _voxel_centres(grid, 200, seed=1)
    expected = ours.map_points(pts).numpy()
    assert np.linalg.norm(expected - pts.numpy(), axis=1).min() > 1.0  # the chain really moves every point
    assert np.abs(_nitransforms_map(chain, pts) - expected).max() < 1e-3
    # the field alone: exactly the stored vectors at voxel centres
    only_warp = _nitransforms_map(DenseFieldTransform.from_filename(str(warp), fmt="itk"), pts)
    assert np.abs(only_warp - read_transform_list([str(warp)]).map_points(pts).numpy()).max() < 1e-3


def test_r4_nitransforms_maps_points_between_voxels_like_regcli(tmp_path):
    grid = _grid()
    warp, mat = _write_pair(tmp_path, _linear_field(grid), _affine(grid))
    ours = read_transform_list([str(warp), str(mat)])
    chain = TransformChain([DenseFieldTransform.from_filename(str(warp), fmt="itk"), load_linear(str(mat), fmt="itk")])
    rng = np.random.default_rng(2)
    # off the voxel centres and 7 voxels inside: the spline prefilter's boundary error has decayed to ~1e-5 mm there
    # (it reaches 1e-2 mm within 3 voxels of the border, where nitransforms and ITK really differ)
    idx = np.stack([rng.uniform(7, s - 8, 200) for s in grid.size], axis=1)
    M = grid.index_to_world()
    pts = torch.from_numpy(idx @ M[:3, :3].T + M[:3, 3])
    expected = ours.map_points(pts).numpy()
    assert np.abs(_nitransforms_map(chain, pts) - expected).max() < 1e-3
