"""ITK transform types beyond the ones SimpleITK has classes for, transform files that must never crash, and
`regcli info`'s world extent.

* MatrixOffsetTransformBase (c3d_affine_tool -oitk, ITK-SNAP; .txt and binary .mat), ComposeScaleSkewVersor3D,
  FixedCenterOfRotationAffine, ScalableAffine, CenteredEuler3D and CenteredAffine are read as affines that map
  points as SimpleITK's TransformPoint does (the oracle: SimpleITK's own classes with the same parameters).
* Types ITK cannot create are refused in one line, exit 3, naming the file and the type.
* No transform file, however damaged, gives anything but exit 0 or one InputError line (exit 3).
* ``world_extent_mm`` is the extent of the voxel-corner bounding box along LPS x, y, z.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import invoke, one_line
from regcli.io.transforms import read_transform, read_transform_list

HEADER = "#Insight Transform File V1.0\n"
POINTS = np.array([[1.0, 2.0, 3.0], [-40.5, 17.25, 60.0], [33.0, -71.0, -12.5], [0.0, 0.0, 0.0]])


def txt(path, *transforms) -> str:
    """An ITK text transform file with the given (type, parameters, fixed parameters) transforms."""
    body = HEADER
    for k, (kind, params, fixed) in enumerate(transforms):
        body += f"#Transform {k}\nTransform: {kind}\n"
        if params is not None:
            body += "Parameters: " + " ".join(repr(float(v)) for v in params) + "\n"
            body += "FixedParameters: " + " ".join(repr(float(v)) for v in fixed) + "\n"
    path.write_text(body)
    return str(path)


def mat(path, kind, params, fixed) -> str:
    """An ITK MATLAB v4 transform file (.mat), as ITK and ANTs write it: the parameters under the type's name,
    the fixed parameters under ``fixed``, each a little-endian double column."""
    with open(path, "wb") as f:
        for name, values in ((kind, params), ("fixed", fixed)):
            f.write(struct.pack("<5i", 0, len(values), 1, 0, len(name) + 1) + name.encode() + b"\0")
            f.write(np.asarray(values, "<f8").tobytes())
    return str(path)


def oracle_affine(matrix, translation, centre):
    a = sitk.AffineTransform(3)
    a.SetMatrix(tuple(float(v) for v in np.ravel(matrix)))
    a.SetTranslation(tuple(float(v) for v in translation))
    a.SetCenter(tuple(float(v) for v in centre))
    return a


def regcli_map(spec, points=POINTS) -> np.ndarray:
    comp = read_transform_list([spec])
    return np.asarray(comp.map_points(torch.as_tensor(points, dtype=torch.float64)), dtype=np.float64)


def sitk_map(tx, points=POINTS) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in points])


MOB_M = np.array([[1.1, 0.1, 0.0], [-0.05, 0.9, 0.05], [0.02, 0.0, 1.2]])
MOB_T = np.array([4.0, -3.0, 2.0])
MOB_C = np.array([10.0, 20.0, -30.0])


# ------------------------------------------------------------------------------------------------ A
@pytest.mark.parametrize("fmt", ["txt", "mat"])
def test_matrix_offset_transform_base_is_read_as_its_affine(tmp_path, fmt):
    """What c3d_affine_tool -oitk and ITK-SNAP write: SimpleITK reads it (as a composite that holds itself
    without end: regcli used to recurse until RecursionError, exit 1)."""
    params, fixed = list(MOB_M.ravel()) + list(MOB_T), list(MOB_C)
    kind = "MatrixOffsetTransformBase_double_3_3"
    f = txt(tmp_path / "mob.txt", (kind, params, fixed)) if fmt == "txt" else mat(tmp_path / "mob.mat", kind, params,
                                                                                     fixed)
    tx = sitk.ReadTransform(f)
    want = sitk_map(tx)
    assert np.allclose(want, sitk_map(oracle_affine(MOB_M, MOB_T, MOB_C)), atol=1e-12)  # the layout, as ITK reads it
    assert np.allclose(regcli_map(f), want, atol=1e-9)
    assert np.allclose(regcli_map(f"[{f},1]", want), POINTS, atol=1e-9)
    (part,) = read_transform(f)
    assert np.allclose(part.center, MOB_C) and np.allclose(part.linear, MOB_M)

    res = invoke("info", f, "--json")
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)["transforms"]
    assert entry["type"] == "MatrixOffsetTransformBase" and entry["linear"] is True
    assert np.allclose(entry["matrix"], MOB_M) and np.allclose(entry["offset"], MOB_T + MOB_C - MOB_M @ MOB_C)

    (tmp_path / "pts.csv").write_text("x,y,z\n1,2,3\n")
    res = invoke("apply", "--points", "-i", tmp_path / "pts.csv", "-t", f, "-o", tmp_path / "out.csv")
    assert res.exit_code == 0, res.output
    row = (tmp_path / "out.csv").read_text().splitlines()[1]
    assert np.allclose([float(v) for v in row.split(",")], want[0], atol=1e-6)


def test_matrix_offset_transform_base_resamples_an_image(tmp_path):
    """The tester's reproduction: `regcli apply` on an image with a MatrixOffsetTransformBase file (exit 1 before)."""
    img = sitk.Image(20, 20, 20, sitk.sitkFloat32) + 1
    sitk.WriteImage(img, str(tmp_path / "img.nii.gz"))
    f = txt(tmp_path / "mob.txt", ("MatrixOffsetTransformBase_double_3_3", [1, 0, 0, 0, 1, 0, 0, 0, 1, 4, -3, 2],
                                   [0, 0, 0]))
    res = invoke("apply", "-i", tmp_path / "img.nii.gz", "-r", tmp_path / "img.nii.gz", "-t", f,
                 "-o", tmp_path / "a.nii.gz")
    assert res.exit_code == 0, res.output
    assert np.allclose(regcli_map(f)[0], (5, -1, 5))


def test_compose_scale_skew_versor_is_read(tmp_path):
    """SimpleITK 2.5 reads the file but its cast to its own class fails with KeyError: 10 (exit 1 before)."""
    params = (0.0, 0.0, 0.1, 1.0, 2.0, 3.0, 1.1, 0.9, 1.05, 0.05, 0.0, 0.02)
    oracle = sitk.ComposeScaleSkewVersor3DTransform()
    oracle.SetFixedParameters((5.0, -6.0, 7.0))
    oracle.SetParameters(params)
    f = txt(tmp_path / "cssv.txt", ("ComposeScaleSkewVersor3DTransform_double_3_3", params, (5.0, -6.0, 7.0)))
    assert np.allclose(regcli_map(f), sitk_map(oracle), atol=1e-9)
    assert np.allclose(regcli_map(f"[{f},1]", sitk_map(oracle)), POINTS, atol=1e-9)
    sitk.WriteTransform(oracle, str(tmp_path / "cssv.mat"))  # as ITK writes it
    assert np.allclose(regcli_map(str(tmp_path / "cssv.mat")), sitk_map(oracle), atol=1e-9)
    d = json.loads(invoke("info", f, "--json").stdout)
    assert d["transforms"][0]["type"] == "ComposeScaleSkewVersor3DTransform"
    assert np.allclose(d["transforms"][0]["matrix"], np.reshape(oracle.GetMatrix(), (3, 3)))
    img = sitk.Image(20, 20, 20, sitk.sitkFloat32) + 1
    sitk.WriteImage(img, str(tmp_path / "img.nii.gz"))
    res = invoke("apply", "-i", tmp_path / "img.nii.gz", "-r", tmp_path / "img.nii.gz", "-t", f,
                 "-o", tmp_path / "b.nii.gz")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------------------ B
def _euler(angles, centre, translation):
    e = sitk.Euler3DTransform()
    e.SetCenter(tuple(centre))
    e.SetRotation(*angles)
    e.SetTranslation(tuple(translation))
    return e


CASES = {
    # ITK type: (parameters, fixed parameters, SimpleITK transform that maps points the same way)
    "FixedCenterOfRotationAffineTransform_double_3_3": (
        list(MOB_M.ravel()) + list(MOB_T), list(MOB_C), oracle_affine(MOB_M, MOB_T, MOB_C)),
    "ScalableAffineTransform_double_3_3": (
        list(MOB_M.ravel()) + list(MOB_T), list(MOB_C), oracle_affine(MOB_M, MOB_T, MOB_C)),
    # CenteredEuler3D: 3 angles, 3 centre, 3 translation; fixed: the centre and ITK's ComputeZYX flag
    "CenteredEuler3DTransform_double_3_3": (
        [0.1, -0.2, 0.3, 1.0, 2.0, 3.0, 4.0, -3.0, 2.0], [1.0, 2.0, 3.0, 0.0],
        _euler((0.1, -0.2, 0.3), (1.0, 2.0, 3.0), (4.0, -3.0, 2.0))),
    # CenteredAffine: 9 matrix, 3 centre, 3 translation
    "CenteredAffineTransform_double_3_3": (
        list(MOB_M.ravel()) + list(MOB_C) + list(MOB_T), list(MOB_C), oracle_affine(MOB_M, MOB_T, MOB_C)),
    "QuaternionRigidTransform_double_3_3": (
        [0.0, 0.0, np.sin(0.15), np.cos(0.15), 4.0, -3.0, 2.0], list(MOB_C),
        _euler((0.0, 0.0, 0.3), MOB_C, (4.0, -3.0, 2.0))),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_itk_types_simpleitk_has_no_class_for_are_read(tmp_path, kind):
    """ITK reads these, SimpleITK's cast fails ("Transform is not of type AffineTransform!"); regcli called them
    "not an ITK transform file"."""
    params, fixed, oracle = CASES[kind]
    f = txt(tmp_path / "t.txt", (kind, params, fixed))
    want = sitk_map(oracle)
    assert np.allclose(regcli_map(f), want, atol=1e-9), kind
    assert np.allclose(regcli_map(f"[{f},1]", want), POINTS, atol=1e-9)
    res = invoke("info", f, "--json")
    assert res.exit_code == 0, res.output
    (entry,) = json.loads(res.stdout)["transforms"]
    assert entry["type"] == kind.split("_")[0] and entry["linear"] is True
    assert np.allclose(entry["matrix"], np.reshape(oracle.GetMatrix(), (3, 3)))


def test_a_composite_with_such_parts_maps_like_simpleitk(tmp_path):
    """An ITK composite text file (and the .h5 SimpleITK writes from it) holding a MatrixOffsetTransformBase, an
    Euler3D and a FixedCenterOfRotationAffine: regcli lists and applies its parts in ITK's order."""
    f = txt(tmp_path / "c.txt", ("CompositeTransform_double_3_3", None, None),
            ("MatrixOffsetTransformBase_double_3_3", list(MOB_M.ravel()) + list(MOB_T), list(MOB_C)),
            ("Euler3DTransform_double_3_3", [0.1, 0.2, 0.3, 1, 2, 3], [5, 6, 7, 0]),
            ("FixedCenterOfRotationAffineTransform_double_3_3", [1, 0.2, 0, 0, 1, 0, 0, 0, 1.2, 1, 1, 1], [1, 2, 3]))
    tx = sitk.ReadTransform(f)
    want = sitk_map(tx)
    assert np.allclose(regcli_map(f), want, atol=1e-9)
    assert np.allclose(regcli_map(f"[{f},1]", want), POINTS, atol=1e-9)
    sitk.WriteTransform(tx, str(tmp_path / "c.h5"))
    assert np.allclose(regcli_map(str(tmp_path / "c.h5")), want, atol=1e-9)
    d = json.loads(invoke("info", tmp_path / "c.h5", "--json").stdout)
    assert [t["type"] for t in d["transforms"]] == ["FixedCenterOfRotationAffineTransform", "Euler3DTransform",
                                                    "MatrixOffsetTransformBase"]


@pytest.mark.parametrize("kind", ["Rigid3DTransform_double_3_3", "CenteredSimilarity3DTransform_double_3_3",
                                  "ThinPlateSplineKernelTransform_double_3_3", "NoSuchTransform_double_3_3"])
def test_types_itk_cannot_create_are_named_as_unsupported(tmp_path, kind):
    f = txt(tmp_path / "u.txt", (kind, [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], [0, 0, 0]))
    (tmp_path / "pts.csv").write_text("x,y,z\n1,2,3\n")
    for args in (["info", f], ["apply", "--points", "-i", tmp_path / "pts.csv", "-t", f, "-o", tmp_path / "o.csv"]):
        res = invoke(*args)
        assert res.exit_code == 3, res.output
        line = one_line(res.stderr)
        assert line.startswith("InputError:") and "u.txt" in line
        assert f"unsupported ITK transform type '{kind}'" in line and "not an ITK transform file" not in line


# ------------------------------------------------------------------------------------------------ robustness
def _damaged_files(tmp_path) -> dict:
    def t(name, kind, params, fixed):
        return txt(tmp_path / name, (kind, params, fixed))

    out = {
        "empty": str(tmp_path / "empty.txt"),
        "garbage_txt": str(tmp_path / "garbage.txt"),
        "garbage_mat": str(tmp_path / "garbage.mat"),
        "zeros_mat": str(tmp_path / "zeros.mat"),
        "garbage_h5": str(tmp_path / "garbage.h5"),
        "too_few_parameters": t("few.txt", "AffineTransform_double_3_3", [1, 0, 0, 0, 1], [0, 0, 0]),
        "centered_euler_without_fixed": t("ce.txt", "CenteredEuler3DTransform_double_3_3",
                                          [0, 0, 0.1, 1, 1, 1, 4, -3, 2], []),
        # too few parameters: ITK reads past its array (a segmentation fault, or a transform made of whatever
        # lies in memory) for most types
        "cssv_too_few": t("cssv.txt", "ComposeScaleSkewVersor3DTransform_double_3_3", [0, 0, 0.1], [0, 0, 0]),
        "euler_too_few": t("euler.txt", "Euler3DTransform_double_3_3", [0.1, 0.2, 0.3, 1, 2], [0, 0, 0]),
        "euler_too_few_mat": mat(tmp_path / "euler.mat", "Euler3DTransform_double_3_3", [0.1, 0.2, 0.3], [0, 0, 0]),
        "versor_no_parameters": txt(tmp_path / "versor.txt", ("VersorRigid3DTransform_double_3_3", [], [0, 0, 0])),
        "mob_4d": t("mob4.txt", "MatrixOffsetTransformBase_double_4_4", list(np.eye(4).ravel()) + [1, 2, 3, 4],
                    [0, 0, 0, 0]),
        "mob_2d": t("mob2.txt", "MatrixOffsetTransformBase_double_2_2", [1, 0, 0, 1, 4, -3], [0, 0]),
        "bspline_deformable": t("bsd.txt", "BSplineDeformableTransform_double_3_3", [0], [0]),
        "mob_truncated_mat": str(tmp_path / "trunc.mat"),
        "truncated_h5": str(tmp_path / "trunc.h5"),
    }
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "garbage.txt").write_text("hello\nworld\n")
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.mat").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (tmp_path / "zeros.mat").write_bytes(bytes(100))
    (tmp_path / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    whole = (tmp_path / "whole.mat")
    mat(whole, "MatrixOffsetTransformBase_double_3_3", list(MOB_M.ravel()) + list(MOB_T), list(MOB_C))
    (tmp_path / "trunc.mat").write_bytes(whole.read_bytes()[:90])
    comp = sitk.CompositeTransform([sitk.TranslationTransform(3, (1, 0, 0)), sitk.AffineTransform(3)])
    sitk.WriteTransform(comp, str(tmp_path / "whole.h5"))
    data = (tmp_path / "whole.h5").read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    return out


def test_no_transform_file_crashes(tmp_path):
    """Every damaged or unsupported file: exit 3 and one InputError line naming the file (for info, apply and
    the inverse [file,1]), never an unexpected exception (exit 1) or HDF5's multi-line error stack."""
    (tmp_path / "pts.csv").write_text("x,y,z\n1,2,3\n")
    for name, f in _damaged_files(tmp_path).items():
        base = os.path.basename(f)
        for args in (["info", f], ["apply", "--points", "-i", tmp_path / "pts.csv", "-t", f, "-o", tmp_path / "o.csv"],
                     ["apply", "--points", "-i", tmp_path / "pts.csv", "-t", f"[{f},1]", "-o", tmp_path / "o.csv"]):
            if args[0] == "info" and name == "mob_2d":
                continue  # info describes a 2D transform
            res = invoke(*args)
            assert res.exit_code == 3, (name, args, res.output)
            line = one_line(res.stderr)
            assert line.startswith("InputError:") and base in line, (name, line)
    assert not (tmp_path / "o.csv").exists()


def test_too_few_parameters_in_an_h5_file_are_refused(tmp_path):
    """The same check for .h5 files, made with h5py when it is installed (SimpleITK segfaults on this file)."""
    h5py = pytest.importorskip("h5py")
    f = tmp_path / "e.h5"
    sitk.WriteTransform(sitk.Euler3DTransform(), str(f))
    with h5py.File(f, "a") as h:
        del h["TransformGroup/0/TransformParameters"]
        h["TransformGroup/0/TransformParameters"] = np.zeros(0)
    res = invoke("info", f)
    assert res.exit_code == 3 and "has 0 parameter(s)" in one_line(res.stderr) and "e.h5" in res.stderr


def test_a_singular_affine_cannot_be_inverted(tmp_path):
    f = txt(tmp_path / "s.txt", ("MatrixOffsetTransformBase_double_3_3", [1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3],
                                 [0, 0, 0]))
    (tmp_path / "pts.csv").write_text("x,y,z\n1,2,3\n")
    res = invoke("apply", "--points", "-i", tmp_path / "pts.csv", "-t", f"[{f},1]", "-o", tmp_path / "o.csv")
    assert res.exit_code == 3 and "singular" in one_line(res.stderr) and "s.txt" in res.stderr


# ------------------------------------------------------------------------------------------------ C
def _corner_extent(img) -> np.ndarray:
    size = img.GetSize()[:3]
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint([-0.5 + b * n for b, n in zip(bits, size)])
                    for bits in np.ndindex(2, 2, 2)])
    return pts.max(axis=0) - pts.min(axis=0)


def test_world_extent_is_the_lps_bounding_box_of_the_voxel_corners(tmp_path):
    """The same physical image stored as RAS, LPS and PIL gives the same world_extent_mm (it was size x spacing per
    index axis: [80, 90, 96] and [90, 96, 80]); an oblique one gives its bounding box along LPS x, y, z."""
    img = sitk.Image([40, 45, 48], sitk.sitkFloat32)
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin((-12.0, 30.0, 5.5))
    ras = sitk.DICOMOrient(img, "RAS")
    info = {}
    for layout in ("RAS", "LPS", "PIL"):
        p = tmp_path / f"{layout}.nii.gz"
        sitk.WriteImage(sitk.DICOMOrient(ras, layout), str(p))
        info[layout] = json.loads(invoke("info", p, "--json").stdout)
    for layout in ("RAS", "LPS", "PIL"):
        assert np.allclose(info[layout]["world_extent_mm"], [80, 90, 96]), (layout, info[layout]["world_extent_mm"])
    # the field of view per index axis (size x spacing) stays available under its own name
    assert np.allclose(info["RAS"]["index_axis_extent_mm"], [80, 90, 96])
    assert np.allclose(info["PIL"]["index_axis_extent_mm"], [90, 96, 80])

    oblique = sitk.Image([30, 20, 10], sitk.sitkFloat32)
    oblique.SetSpacing((1.0, 1.5, 3.0))
    oblique.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), np.radians(25)).GetMatrix())
    oblique.SetOrigin((3.0, -4.0, 5.0))
    sitk.WriteImage(oblique, str(tmp_path / "obl.nii.gz"))
    back = sitk.ReadImage(str(tmp_path / "obl.nii.gz"))
    d = json.loads(invoke("info", tmp_path / "obl.nii.gz", "--json").stdout)
    assert np.allclose(d["world_extent_mm"], _corner_extent(back), atol=1e-4)
    assert not np.allclose(d["world_extent_mm"], [30, 30, 30], atol=1)  # not size x spacing
    resampled = sitk.DICOMOrient(back, "PIL")  # a permuted, flipped copy of the same oblique grid
    sitk.WriteImage(resampled, str(tmp_path / "obl_pil.nii.gz"))
    d2 = json.loads(invoke("info", tmp_path / "obl_pil.nii.gz", "--json").stdout)
    assert np.allclose(d2["world_extent_mm"], d["world_extent_mm"], atol=1e-4)
