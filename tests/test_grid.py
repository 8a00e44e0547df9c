"""Grid: index <-> world <-> normalized coordinates, checked against SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DIRECTIONS, SPACINGS, make_phantom
from regcli.errors import GeometryError
from regcli.resample import FieldWarper, grid_sample, sample_at_world
from regcli.spaces import Grid


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("spacing", list(SPACINGS))
def test_index_world_matches_sitk(direction, spacing):
    img = make_phantom(direction, spacing)
    g = Grid.from_sitk(img)
    rng = np.random.default_rng(0)
    idx = rng.uniform(-1, np.asarray(g.size) + 1, (50, 3))
    ours = g.index_to_world_points(torch.from_numpy(idx)).numpy()
    ref = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in idx])
    assert np.abs(ours - ref).max() < 1e-9
    back = g.world_to_index_points(torch.from_numpy(ref)).numpy()
    assert np.abs(back - idx).max() < 1e-9


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_axcodes_match_sitk(direction):
    img = make_phantom(direction, "iso")
    ref = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
    # SimpleITK >= 2.3 (like nibabel) names the direction each index axis points to
    assert Grid.from_sitk(img).axcodes() == ref


def _rotation2(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s], [s, c]])


def test_axcodes_of_a_direction_matrix_of_any_dimension():
    """One implementation (spaces.grid.axcodes_of / dominant_axes_of) for Grid (3D) and `regcli info` (2D-4D):
    3D agrees with Grid and SimpleITK on every fixture direction; 2D spells x/y letters only; 4D (a time series)
    spells its three spatial axes from the spatial block alone; a flat SimpleITK tuple reads as its matrix."""
    from regcli.spaces.grid import axcodes_of, dominant_axes_of

    for direction in DIRECTIONS:
        img = make_phantom(direction, "iso")
        ref = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())
        g = Grid.from_sitk(img)
        assert axcodes_of(img.GetDirection()) == axcodes_of(g.direction_matrix) == g.axcodes() == ref, direction
        assert dominant_axes_of(g.direction_matrix) == g.dominant_axes()
    assert axcodes_of(np.eye(2)) == "LP" and axcodes_of((0.0, -1.0, 1.0, 0.0)) == "PR"
    assert axcodes_of(_rotation2(30)) == "LP" and axcodes_of(_rotation2(120)) == "PR"  # oblique: the dominant axis
    assert dominant_axes_of(_rotation2(120)) == [(1, 1.0), (0, -1.0)]
    d4 = np.eye(4)
    d4[:3, :3] = DIRECTIONS["PIL"] @ DIRECTIONS["oblique15"]
    assert axcodes_of(d4) == axcodes_of(d4.ravel().tolist()) == axcodes_of(d4[:3, :3]) == "PIL"
    tilted = np.eye(4)  # index x mostly along time: only the spatial block counts (as regcli info always did)
    tilted[[0, 3, 0, 3], [0, 0, 3, 3]] = (0.6, 0.8, -0.8, 0.6)
    assert axcodes_of(tilted) == "LPS" and len(dominant_axes_of(tilted)) == 3
    with pytest.raises(GeometryError, match="D\\*D values"):
        axcodes_of((1.0, 0.0, 0.0))


def test_sampling_world_point_hits_voxel_value():
    img = make_phantom("oblique15", "aniso")
    g = Grid.from_sitk(img)
    data = torch.from_numpy(sitk.GetArrayFromImage(img))
    for idx in [(3, 4, 5), (10, 20, 7), (g.size[0] - 1, 0, g.size[2] - 1)]:
        p = torch.tensor(img.TransformIndexToPhysicalPoint(idx), dtype=torch.float64)
        v = sample_at_world(data, g, p[None])
        assert float(v[0]) == pytest.approx(float(data[idx[2], idx[1], idx[0]]), abs=1e-5)


def test_field_warper_world_displacement_moves_the_right_way():
    img = make_phantom("PIL", "aniso")
    g = Grid.from_sitk(img)
    data = torch.from_numpy(sitk.GetArrayFromImage(img))
    w = FieldWarper(g, g)
    disp = torch.zeros((3, *g.shape))
    disp[1] = 2.0  # +2 mm along LPS y for every voxel
    warped = w.warp(data, disp, padding="itk")
    ref = sample_at_world(data, g, g.world_coords() + torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64))
    assert torch.allclose(warped, ref, atol=1e-4)


def test_with_spacing_keeps_field_of_view():
    g = Grid((100, 80, 30), (0.9, 0.9, 3.0), (10.0, -20.0, 5.0), DIRECTIONS["oblique15"].ravel())
    w = g.with_spacing(2.0)
    assert w.spacing == (2.0, 2.0, 2.0)
    assert w.size == (45, 36, 45)
    lo = lambda gr: gr.index_to_world() @ np.array([-0.5, -0.5, -0.5, 1.0])  # noqa: E731
    assert np.allclose(lo(g), lo(w), atol=1e-9)
    assert np.allclose(g.center_world(), w.center_world(), atol=1.0)


def test_large_origin_keeps_precision():
    # N4: coordinates ~1e4 mm must not lose sub-micron precision in the float64 maths
    g = Grid((40, 40, 40), (1.0, 1.0, 1.0), (1e4, -1e4, 1e4), np.eye(3).ravel())
    coords = grid_sample  # imported for the module contract; the check below is on normalized coords
    assert coords is not None
    from regcli.spaces.grid import sampling_grid

    ident = sampling_grid(g, g)[0]
    lin = torch.linspace(-1, 1, 40)
    assert float((ident[..., 0] - lin[None, None, :]).abs().max()) < 1e-6


@pytest.mark.parametrize("bad", [np.diag([1.0, 1.0, 0.0]), np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1.0]])])
def test_sheared_or_degenerate_direction_is_a_geometry_error(bad):
    with pytest.raises(GeometryError):
        Grid((4, 4, 4), (1, 1, 1), (0, 0, 0), bad.ravel())


def test_cropped_grid_keeps_voxel_positions():
    import numpy as np

    from regcli.spaces.grid import Grid

    g = Grid((10, 12, 8), (0.9, 1.1, 3.0), (5.0, -2.0, 1.0), tuple(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]],
                                                                         dtype=float).ravel()))
    c = g.cropped((2, 3, 1), (4, 5, 6))
    assert c.size == (4, 5, 6) and c.spacing == g.spacing and c.direction == g.direction
    idx = np.array([[0, 0, 0, 1], [3, 4, 5, 1]], dtype=float).T
    expected = g.index_to_world() @ (idx + np.array([[2], [3], [1], [0]]))
    assert np.allclose(c.index_to_world() @ idx, expected)


def test_carried_by_is_exact_for_rigid_maps_and_covers_affine_ones():
    D = np.asarray(sitk.VersorTransform((0.3, 0.2, 0.93), 0.4).GetMatrix()).reshape(3, 3)
    g = Grid((9, 7, 5), (1.5, 2.0, 0.5), (10.0, -20.0, 3.0), tuple(D.ravel()))
    assert g.carried_by(np.eye(4)).allclose(g)
    rigid = np.eye(4)
    rigid[:3, :3] = np.asarray(sitk.VersorTransform((0.9, -0.1, 0.4), 0.7).GetMatrix()).reshape(3, 3)
    rigid[:3, 3] = (5.0, -3.0, 12.0)
    h = g.carried_by(rigid)
    assert h.size == g.size and h.spacing == pytest.approx(g.spacing)
    mapped = g.corners_world() @ rigid[:3, :3].T + rigid[:3, 3]
    assert np.allclose(h.corners_world(), mapped, atol=1e-9)  # voxel for voxel
    sheared = rigid.copy()
    sheared[:3, :3] = sheared[:3, :3] @ np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.15], [0.05, 0.0, 1.1]])
    k = g.carried_by(sheared)
    assert np.abs(k.direction_matrix.T @ k.direction_matrix - np.eye(3)).max() < 1e-9 and k.spacing == g.spacing
    n = np.asarray(g.size) - 1.0
    outer = np.array([[a, b, c] for a in (-0.5, n[0] + 0.5) for b in (-0.5, n[1] + 0.5) for c in (-0.5, n[2] + 0.5)])
    M = g.index_to_world()
    pts = (outer @ M[:3, :3].T + M[:3, 3]) @ sheared[:3, :3].T + sheared[:3, 3]
    idx = k.world_to_index_points(torch.from_numpy(pts)).numpy()
    assert (idx >= -0.5 - 1e-6).all() and (idx <= np.asarray(k.size) - 0.5 + 1e-6).all()  # covers the image


def test_centred_lattice_is_the_same_point_set_for_flipped_and_permuted_storage():
    """centred_lattice keeps the field of view's centre and gives n = remainder (mod multiple) voxels per axis, so
    the same box stored with flipped or permuted axes gives the same voxel centres (with_spacing, anchored at voxel
    0, does not when the size is not a whole number of new voxels)."""
    g = Grid((37, 41, 29), (1.2, 0.9, 1.7), (10.0, -20.0, 5.0), np.eye(3).ravel())
    flipped = Grid(g.size, g.spacing, tuple(g.index_to_world_points(torch.tensor([36.0, 40.0, 0.0],
                   dtype=torch.float64)).tolist()), np.diag([-1.0, -1.0, 1.0]).ravel())
    perm = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)  # index x -> world z, y -> x, z -> y
    permuted = Grid((41, 29, 37), (0.9, 1.7, 1.2), g.origin, perm.ravel())

    def centres(grid):
        key = (grid.world_coords().reshape(-1, 3) * 8).round() @ torch.tensor([1e8, 1e4, 1.0], dtype=torch.float64)
        return torch.sort(key).values

    for multiple, remainder in ((6, 0), (2, 1), (1, 0)):
        a = g.centred_lattice(2.0, multiple, remainder)
        assert all(n % multiple == remainder % multiple for n in a.size) and a.spacing == (2.0, 2.0, 2.0)
        assert np.allclose(a.center_world(), g.center_world())
        for other in (flipped, permuted):
            assert torch.equal(centres(other.centred_lattice(2.0, multiple, remainder)), centres(a))
    assert not torch.equal(centres(flipped.with_spacing(2.0)), centres(g.with_spacing(2.0)))


#: off-diagonal perturbation of a rotation, as an oblique header rounded to float32 (or worse) gives: accepted
#: (|D^T D - I| < 1e-3, as ITK accepts it) and mapped with the exact inverse of D diag(spacing)
_PERTURB = np.array([[0.0, 5e-4, -3e-4], [-4e-4, 0.0, 5e-4], [2e-4, -5e-4, 0.0]])


def perturbed_oblique() -> np.ndarray:
    """The oblique15 fixture direction with off-diagonal perturbations of up to 5e-4 (not orthonormal)."""
    return DIRECTIONS["oblique15"] + _PERTURB


def test_a_slightly_non_orthonormal_direction_round_trips_exactly_as_itk_maps_it():
    """A direction 5e-4 off orthonormal: index -> world -> index is the identity to 1e-9 (D^T as the inverse was
    0.5 voxel off on a 512-voxel axis), and world -> index equals ITK's TransformPhysicalPointToContinuousIndex;
    the normalized and vector maps are the same inverse."""
    D = perturbed_oblique()
    assert 1e-4 < np.abs(D.T @ D - np.eye(3)).max() < 1e-3
    img = sitk.Image([512, 300, 40], sitk.sitkUInt8)
    img.SetSpacing((0.5, 0.7, 3.0))
    img.SetOrigin((-120.0, 80.0, 33.0))
    img.SetDirection(tuple(D.ravel()))
    g = Grid.from_sitk(img)
    rng = np.random.default_rng(1)
    idx = rng.uniform(-1, np.asarray(g.size) + 1, (200, 3))
    idx[0] = (511.0, 299.0, 39.0)
    world = g.index_to_world_points(torch.from_numpy(idx))
    ref = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in idx])
    assert np.abs(world.numpy() - ref).max() < 1e-9
    back = g.world_to_index_points(world).numpy()
    assert np.abs(back - idx).max() < 1e-9
    itk_idx = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in ref])
    assert np.abs(g.world_to_index_points(torch.from_numpy(ref)).numpy() - itk_idx).max() < 1e-9
    assert np.allclose(g.world_to_index() @ g.index_to_world(), np.eye(4), atol=1e-12)
    assert np.allclose(g.norm_to_world() @ g.world_to_norm(), np.eye(4), atol=1e-12)
    assert np.allclose(g.vector_world_to_index() @ g.index_to_world()[:3, :3], np.eye(3), atol=1e-12)
    from regcli.spaces.grid import sampling_grid

    ident = sampling_grid(g.cropped((0, 0, 0), (64, 32, 8)), g.cropped((0, 0, 0), (64, 32, 8)))[0]
    lin = torch.linspace(-1, 1, 64)
    assert float((ident[..., 0] - lin[None, None, :]).abs().max()) < 1e-6
    assert g.inside(world[:1])[0] and not g.inside(g.index_to_world_points(torch.tensor([[512.6, 0.0, 0.0]],
                                                                                   dtype=torch.float64)))[0]


def test_an_orthonormal_direction_keeps_the_transpose_as_its_inverse(tmp_path):
    """Rotations (orthonormal to 1e-16), and the oblique direction as ITK reads it back from a float32 NIfTI header
    (orthonormal to about 1e-8), still use S^-1 D^T, bit for bit as before the exact inverse existed."""
    sitk.WriteImage(make_phantom("oblique15", "aniso"), str(tmp_path / "o.nii.gz"))
    from_nifti = np.asarray(sitk.ReadImage(str(tmp_path / "o.nii.gz")).GetDirection()).reshape(3, 3)
    assert 1e-12 < np.abs(from_nifti.T @ from_nifti - np.eye(3)).max() < 1e-7
    for name, D in {**DIRECTIONS, "oblique15 from NIfTI": from_nifti}.items():
        g = Grid((30, 20, 10), (0.9, 1.1, 3.0), (5.0, -2.0, 1.0), D.ravel())
        Rinv = (D / np.asarray(g.spacing)[None, :]).T
        assert np.array_equal(g.world_to_index()[:3, :3], Rinv), name
        assert np.array_equal(g.world_to_index()[:3, 3], -Rinv @ np.asarray(g.origin)), name
