"""Label metrics (Dice, HD95, ASSD) against analytic cases and the independent bench scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_phantom, phantom_labels, shared_file, bench_metrics
from regcli.errors import GeometryError
from regcli.reports.metrics import (
    assd_per_label,
    dice_mean,
    dice_per_label,
    hd95_per_label,
    label_overlap_metrics,
    surface_distances,
    surface_metrics,
)
from regcli.spaces import Grid, Image


def _bench():
    return bench_metrics()


def _labels_image(img: sitk.Image, name: str = "labels") -> Image:
    return Image(torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.int32)), Grid.from_sitk(img), name)


def _shifted_pair(direction: str, spacing: str, shift=(1.7, -1.1, 2.3)):
    """Fixed phantom labels and the labels of a translated phantom on the same grid."""
    fixed = make_phantom(direction, spacing)
    moved = make_phantom(direction, spacing, transform=lambda p: p + np.asarray(shift))
    return _labels_image(phantom_labels(fixed), "fixed"), _labels_image(phantom_labels(moved), "warped")


def _nib_order(img: Image) -> np.ndarray:
    """(Z, Y, X) tensor -> (X, Y, Z) array, the bench's nibabel voxel order."""
    return img.data.numpy().transpose(2, 1, 0)


def _grid(shape_zyx, spacing=(1.0, 1.0, 1.0)) -> Grid:
    return Grid(shape_zyx[::-1], spacing, (0.0, 0.0, 0.0), np.eye(3).ravel())


# ----------------------------------------------------------------------------- Dice
def test_dice_analytic_boxes():
    a = np.zeros((10, 12, 14), np.int32)
    b = np.zeros_like(a)
    a[2:6, 2:6, 2:6] = 1  # 64 voxels
    b[2:6, 2:6, 4:8] = 1  # 64 voxels, overlap 32
    a[7:9, 0:2, 0:2] = 5  # label 5 only in a
    g = _grid(a.shape)
    fa, fb = Image(torch.from_numpy(a), g), Image(torch.from_numpy(b), g)
    d = dice_per_label(fa, fb)
    assert list(d) == [1]  # default: labels present in both, 0 excluded
    assert d[1] == pytest.approx(0.5)
    d = dice_per_label(fa, fb, labels=[5, 1, 9])
    assert list(d) == [1, 5, 9]
    assert d[5] == 0.0 and math.isnan(d[9])
    assert dice_mean(fa, fb, labels=[1, 5, 9]) == pytest.approx(0.25)  # NaN ignored
    assert dice_per_label(fa, fa)[1] == 1.0


def test_dice_refuses_different_grids():
    a = torch.zeros((6, 6, 6), dtype=torch.int32)
    fa = Image(a, _grid((6, 6, 6)))
    fb = Image(a.clone(), Grid((6, 6, 6), (1, 1, 1), (5.0, 0, 0), np.eye(3).ravel()))
    with pytest.raises(GeometryError, match="same grid"):
        dice_per_label(fa, fb)
    with pytest.raises(GeometryError, match="shapes"):
        dice_per_label(a.numpy(), a.numpy()[:5])


@pytest.mark.parametrize("direction,spacing", [("LPS", "iso"), ("RAS", "aniso"), ("oblique15", "aniso")])
def test_dice_matches_bench(direction, spacing):
    bm = _bench()
    f, w = _shifted_pair(direction, spacing)
    ours = dice_per_label(f, w)
    ref = bm.dice_per_label(_nib_order(f), _nib_order(w))
    assert list(ours) == list(ref) == [1, 2, 3]
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12)
    assert 0.3 < dice_mean(f, w) < 0.99


# ----------------------------------------------------------------------------- surface distances
def test_single_voxels_anisotropic_distance():
    """Two one-voxel objects: every surface distance is the physical distance between the voxels."""
    sp = (0.9, 0.8, 3.0)  # (x, y, z) mm
    a = np.zeros((6, 7, 8), bool)
    b = np.zeros_like(a)
    a[1, 2, 3] = True  # (z, y, x)
    b[4, 3, 6] = True
    expected = math.sqrt((3 * 0.9) ** 2 + (1 * 0.8) ** 2 + (3 * 3.0) ** 2)
    d_ab, d_ba = surface_distances(a, b, sp)
    assert d_ab.tolist() == pytest.approx([expected]) and d_ba.tolist() == pytest.approx([expected])
    g = _grid(a.shape, sp)
    fa, fb = Image(torch.from_numpy(a.astype(np.int32)), g), Image(torch.from_numpy(b.astype(np.int32)), g)
    assert hd95_per_label(fa, fb)[1] == pytest.approx(expected, abs=1e-9)
    assert assd_per_label(fa, fb)[1] == pytest.approx(expected, abs=1e-9)


def test_far_surfaces_are_exact_beyond_the_bounded_first_query():
    """Surfaces farther apart than the first query's bound (NEAR_VOXELS) are found by the unbounded one."""
    from regcli.reports.metrics import NEAR_VOXELS

    a = np.zeros((4, 5, 40), bool)
    b = np.zeros_like(a)
    a[1:3, 1:4, 1:3] = True
    b[1:3, 1:4, 30:33] = True  # 28 voxels (x) away, and one near piece of b next to a
    b[2, 2, 4] = True
    sp = (0.8, 1.0, 1.5)  # (x, y, z) mm
    d_ab, d_ba = surface_distances(a, b, sp)

    def surface(m):  # brute force: the mask minus its 6-connected erosion (outside = background)
        from scipy.ndimage import binary_erosion

        pts = np.argwhere(m & ~binary_erosion(m, border_value=0)).astype(float)
        return pts * np.asarray(sp[::-1])

    sa, sb = surface(a), surface(b)
    ref_ab = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1)).min(1)
    ref_ba = np.sqrt(((sb[:, None] - sa[None]) ** 2).sum(-1)).min(1)
    assert np.allclose(np.sort(d_ab), np.sort(ref_ab)) and np.allclose(np.sort(d_ba), np.sort(ref_ba))
    assert d_ba.max() > 2 * NEAR_VOXELS * 1.5  # well beyond the bound of the first query


def test_identical_masks_have_zero_distance_and_empty_labels_nan():
    a = np.zeros((8, 8, 8), np.int32)
    a[2:6, 2:6, 2:6] = 2
    a[0:2, 0:3, 0:3] = 3  # touches the array border
    g = _grid(a.shape)
    fa = Image(torch.from_numpy(a), g)
    s = surface_metrics(fa, fa)
    assert s["hd95"] == {2: 0.0, 3: 0.0} and s["assd"] == {2: 0.0, 3: 0.0}
    s = surface_metrics(fa, Image(torch.from_numpy(np.where(a == 3, 0, a)), g), labels=[2, 3])
    assert s["hd95"][2] == 0.0 and math.isnan(s["hd95"][3]) and math.isnan(s["assd"][3])
    e = surface_distances(np.zeros((8, 8, 8), bool), a > 0)
    assert e[0].size == 0 and e[1].size == 0


def test_one_voxel_shift_of_a_box():
    """A box moved by one voxel along z (3 mm): the face left behind is 3 mm away, the shared side faces 0,
    the top face 1 mm from the side faces (x, y spacing 1 mm)."""
    a = np.zeros((10, 10, 10), np.int32)
    a[3:7, 3:7, 3:7] = 1
    b = np.roll(a, 1, axis=0)
    sp = (1.0, 1.0, 3.0)
    d_ab, d_ba = surface_distances(a, b, sp)
    assert set(np.round(np.concatenate([d_ab, d_ba]), 9).tolist()) == {0.0, 1.0, 3.0}
    assert np.count_nonzero(d_ab == 3.0) == 16  # the 4x4 face left behind


@pytest.mark.parametrize("direction,spacing", [("LPS", "iso"), ("RAS", "aniso"), ("PIL", "aniso"),
                                               ("oblique15", "aniso")])
def test_hd95_assd_match_bench(direction, spacing):
    bm = _bench()
    f, w = _shifted_pair(direction, spacing)
    ours = surface_metrics(f, w)
    assd_ref: dict = {}
    ref = bm.hd95_per_label(_nib_order(f), _nib_order(w), np.asarray(f.grid.spacing), [1, 2, 3], assd=assd_ref)
    assert list(ours["hd95"]) == [1, 2, 3]
    for k in ref:
        assert ours["hd95"][k] == pytest.approx(ref[k], abs=1e-6)
        assert ours["assd"][k] == pytest.approx(assd_ref[k], abs=1e-6)
    assert max(ref.values()) > 1.0  # the shift is visible: not a trivial all-zero comparison


def test_matches_bench_with_objects_on_the_array_border():
    """Masks cut by the array border: the border counts as background (bench: border_value=0)."""
    bm = _bench()
    rng = np.random.default_rng(0)
    a = (rng.random((12, 14, 16)) > 0.55).astype(np.int32) * 2
    b = (rng.random((12, 14, 16)) > 0.5).astype(np.int32) * 2
    a[:, :, :4] = 7
    b[:, :, :5] = 7
    sp = (0.7, 1.3, 2.1)
    g = _grid(a.shape, sp)
    ours = surface_metrics(Image(torch.from_numpy(a), g), Image(torch.from_numpy(b), g))
    assd_ref: dict = {}
    ref = bm.hd95_per_label(a.transpose(2, 1, 0), b.transpose(2, 1, 0), np.asarray(sp), [2, 7], assd=assd_ref)
    for k in (2, 7):
        assert ours["hd95"][k] == pytest.approx(ref[k], abs=1e-6)
        assert ours["assd"][k] == pytest.approx(assd_ref[k], abs=1e-6)


def test_label_overlap_metrics_keys():
    f, w = _shifted_pair("LPS", "iso")
    m = label_overlap_metrics(f, w)
    assert list(m) == ["labels", "dice_per_label", "dice_mean", "hd95_per_label", "hd95_mean", "hd95_labels_lost",
                       "assd_per_label", "assd_mean"]
    assert m["labels"] == [1, 2, 3] and m["hd95_labels_lost"] == []
    assert m["hd95_mean"] == pytest.approx(np.mean(list(m["hd95_per_label"].values())))
    assert list(label_overlap_metrics(f, w, surface=False)) == ["labels", "dice_per_label", "dice_mean"]


def test_label_lost_by_warping_counts_in_dice_but_is_listed_apart_from_the_surface_means():
    """A label of the fixed map that the warped map lost: Dice 0, in dice_mean; no HD95/ASSD (undefined for an empty
    map, medpy/MONAI), so the surface means are over the other labels, and hd95_labels_lost names it."""
    from regcli.reports.metrics import labels_lost_warning, surface_mean
    from regcli.reports.report import WarningLog

    f, w = _shifted_pair("LPS", "iso")
    lost = w.data.clone()
    lost[lost == 2] = 0
    w2 = Image(lost, w.grid, "warped")
    m = label_overlap_metrics(f, w2, labels=[1, 2, 3])
    assert m["dice_per_label"][2] == 0.0
    assert m["dice_mean"] == pytest.approx(np.mean(list(m["dice_per_label"].values())))
    assert math.isnan(m["hd95_per_label"][2]) and math.isnan(m["assd_per_label"][2])
    assert m["hd95_labels_lost"] == [2]
    assert m["hd95_mean"] == pytest.approx((m["hd95_per_label"][1] + m["hd95_per_label"][3]) / 2)
    assert m["assd_mean"] == pytest.approx((m["assd_per_label"][1] + m["assd_per_label"][3]) / 2)
    assert surface_mean({1: 2.0, 2: float("nan"), 5: None}) == (2.0, [2, 5])
    assert labels_lost_warning([], 3) is None
    with WarningLog() as logged:  # on the regcli logger (stderr, report["warnings"])
        line = labels_lost_warning([2], 3, "pair 'p'")
    assert line == ("pair 'p': HD95 is over 2 of the 3 labels: label(s) 2 are not in the warped labels (lost by "
                    "warping), so they have no surface distance (hd95_labels_lost); Dice counts them as 0")
    assert logged.messages == [line]


@pytest.mark.slow
def test_brain_labels_match_bench_and_are_fast():
    """32 SynthSeg labels on a 1 mm brain: agreement with the bench scorer on a few labels, and speed."""
    import time

    bm = _bench()
    from regcli.io.images import read_labels

    fpath = shared_file("synthseg_brain", "sub-01_labels.nii.gz")
    mpath = shared_file("synthseg_brain", "sub-02_labels.nii.gz")
    f = read_labels(fpath)
    m = sitk.Resample(sitk.ReadImage(str(mpath)), sitk.ReadImage(str(fpath)), sitk.Transform(),
                      sitk.sitkNearestNeighbor, 0)
    w = Image(torch.from_numpy(sitk.GetArrayFromImage(m).astype(np.int32)), f.grid)
    t = time.perf_counter()
    ours = surface_metrics(f, w)
    seconds = time.perf_counter() - t
    assert len(ours["hd95"]) >= 30
    labs = [17, 10, 4]  # left hippocampus, thalamus, lateral ventricle
    assd_ref: dict = {}
    ref = bm.hd95_per_label(_nib_order(f), _nib_order(w), np.asarray(f.grid.spacing), labs, assd=assd_ref)
    for k in labs:
        assert ours["hd95"][k] == pytest.approx(ref[k], abs=1e-6)
        assert ours["assd"][k] == pytest.approx(assd_ref[k], abs=1e-6)
    assert seconds < 30.0  # about 1-4 s on 2 cores; generous for a loaded CI box
