"""Voxel values that regcli must read as the file holds them, or refuse in one line naming the file:

* labels beyond int32 (they used to wrap and merge), labels above 2^24 (exact through register's scoring);
* complex voxels (the imaginary part used to be dropped);
* NaN/Inf in every format, NIfTI pairs (.hdr/.img) included (SimpleITK reads them as 0 there);
* float64 images: a small signal on a large offset (float32 used to quantise it away), values beyond float32's
  range (apply computes in float64; register refuses them);
* a MetaImage header whose data file is missing or cut short (named, and no ITK lines on stderr).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import test_cli
import test_reliability_errors
from conftest import invoke, one_line, write
from test_pipeline import _assert_no_outputs
from test_reliability_errors import _like, _no_optimisation, register

images = test_cli.images  # fixture: 32^3 fixed/moving phantoms and labels
fast = test_reliability_errors.fast  # fixture: a config that keeps a 32^3 registration to about a second


# ------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize("dtype,value,shown", [(np.int64, 2 ** 32 + 1, "4294967297"),
                                               (np.uint32, 2 ** 31, "2147483648"),
                                               (np.uint32, 2 ** 32 - 1, "4294967295"),
                                               (np.float64, 3e9, "3000000000"),
                                               (np.int64, -(2 ** 31) - 1, "-2147483649")])
def test_labels_beyond_int32_are_refused_naming_the_value(tmp_path, images, fast, monkeypatch, dtype, value, shown):
    """int64 2^32 + 1 used to become 1 (merged with label 1), uint32 2^31 became -2^31, float64 3e9 -2^31."""
    from regcli.errors import InputError
    from regcli.io.images import read_labels

    _no_optimisation(monkeypatch)
    labels = sitk.ReadImage(str(images["fixed_labels"]))
    arr = sitk.GetArrayFromImage(labels).astype(dtype)
    arr[arr == 2] = value
    path = write(_like(labels, arr), tmp_path / "big_labels.nrrd")
    with pytest.raises(InputError, match=f"label {shown}, outside the 32-bit integer range"):
        read_labels(path, "fixed labels")
    res = register(images, fast, "--fixed-labels", path, "--moving-labels", images["moving_labels"])
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "big_labels.nrrd" in line and shown in line
    _assert_no_outputs(tmp_path)


def test_labels_at_the_int32_limits_and_above_2_24_are_read_and_scored_exactly(tmp_path, images, fast):
    """Labels 2^24 and 2^24 + 1 (float32 would merge them) and the int32 extremes stay distinct: read exactly, and
    register's Dice is scored over each of them (the warped labels are copied, not interpolated in float32)."""
    from regcli.io.images import read_labels

    big = [16777216, 16777217, 2 ** 31 - 1]
    paths = {}
    for role in ("fixed", "moving"):
        labels = sitk.ReadImage(str(images[f"{role}_labels"]))
        arr = sitk.GetArrayFromImage(labels).astype(np.int64)
        out = np.zeros_like(arr)
        for k, value in enumerate(big, start=1):
            out[arr == k] = value
        out[0, 0, 0] = -(2 ** 31)  # one voxel at the low end (a corner: outside the scored overlap of the moving map)
        paths[role] = write(_like(labels, out), tmp_path / f"{role}_big.nrrd")
        got = read_labels(paths[role]).data.numpy()
        assert np.array_equal(got, out) and got.dtype == np.int32
    res = register(images, fast, "--fixed-labels", paths["fixed"], "--moving-labels", paths["moving"], "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads((images["fixed"].parent / "p_Report.json").read_text())
    dice = {int(k): v for k, v in report["metrics"]["dice_per_label"].items()}
    assert set(big) <= set(dice), dice
    assert all(dice[v] > 0.5 for v in big), dice


# ------------------------------------------------------------------------------------------------ complex
def _complex_like(reference_path) -> sitk.Image:
    ref = sitk.ReadImage(str(reference_path))
    arr = sitk.GetArrayFromImage(ref)
    img = sitk.GetImageFromArray((arr + 1j * (2 * arr + 1)).astype(np.complex64))
    img.CopyInformation(ref)
    return img


def test_complex_images_are_refused_by_register_and_apply(tmp_path, images, fast, monkeypatch):
    """Register used to register the real part, apply to write it (only a NumPy ComplexWarning): RELIABILITY E7
    refuses non-scalar input, and the message says how to make it scalar."""
    _no_optimisation(monkeypatch)
    cplx = write(_complex_like(images["moving"]), tmp_path / "cplx.nrrd")
    assert "complex" in sitk.ReadImage(str(cplx)).GetPixelIDTypeAsString()
    res = register(images, fast, moving=cplx)
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "cplx.nrrd" in line and "complex" in line and "magnitude" in line
    _assert_no_outputs(tmp_path)
    for extra in ([], ["-n", "nearest"]):
        res = invoke("apply", "-i", cplx, "-r", images["fixed"], "-o", tmp_path / "o.nrrd", *extra)
        assert res.exit_code == 3, res.stderr
        line = one_line(res.stderr)
        assert line.startswith("InputError:") and "cplx.nrrd" in line and "complex" in line
        assert not (tmp_path / "o.nrrd").exists()
    from regcli.errors import InputError
    from regcli.io.images import check_image_header

    with pytest.raises(InputError, match="complex"):  # the pre-flight header check too
        check_image_header(cplx, "moving image")


# ------------------------------------------------------------------------------------------------ NaN / Inf
def _write_with_nan(images, tmp_path, ext: str, dtype=np.float32):
    moving = sitk.ReadImage(str(images["moving"]))
    arr = sitk.GetArrayFromImage(moving).astype(dtype)
    arr[3, 4, 5] = np.nan  # (z, y, x): index x=5, y=4, z=3
    arr[10, 11, 12] = np.inf
    return write(_like(moving, arr), tmp_path / f"bad.{ext}")


@pytest.mark.parametrize("ext", ["hdr", "img", "img.gz", "mha", "mhd", "nrrd", "nii", "nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_is_counted_and_located_in_every_format(tmp_path, images, ext, dtype):
    """SimpleITK 2.x reads NaN/Inf as 0 in NIfTI pairs as in single-file NIfTI (the file scan covered only
    .nii/.nii.gz); every format gives the same count and first index, as an image, a mask and a label map."""
    from regcli.errors import InputError
    from regcli.io.images import read_image, read_labels, read_mask

    bad = _write_with_nan(images, tmp_path, ext, dtype)
    for reader in (lambda p: read_image(p, "moving image"), lambda p: read_mask(p, "fixed mask"),
                   lambda p: read_labels(p, "fixed labels")):
        with pytest.raises(InputError, match=r"2 NaN/Inf voxels \(first at index x=5, y=4, z=3\)"):
            reader(bad)


def test_nan_in_a_nibabel_nifti_pair_and_analyze_image_is_refused_by_register(tmp_path, images, fast, monkeypatch):
    """A NIfTI-1 pair (and an Analyze 7.5 pair, no magic) as nibabel writes them: the moving image and the fixed
    mask are refused in one line (they used to be registered with the NaN read as 0), and apply warns."""
    nib = pytest.importorskip("nibabel")
    _no_optimisation(monkeypatch)
    moving = sitk.ReadImage(str(images["moving"]))
    arr = np.transpose(sitk.GetArrayFromImage(moving), (2, 1, 0)).astype(np.float32)  # (x, y, z) for nibabel
    arr[5, 4, 3] = np.nan
    mask = np.ones_like(arr)
    mask[6, 7, 8] = -np.inf
    pairs = {"pair.hdr": nib.Nifti1Pair(arr, np.eye(4)), "mask.img": nib.Nifti1Pair(mask, np.eye(4)),
             "analyze.hdr": nib.AnalyzeImage(arr, np.eye(4))}
    for name, img in pairs.items():
        nib.save(img, str(tmp_path / name))
    for name, option, where in (("pair.hdr", None, "x=5, y=4, z=3"), ("analyze.hdr", None, "x=5, y=4, z=3"),
                                ("mask.img", "--fixed-mask", "x=6, y=7, z=8")):
        path = tmp_path / name
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # what SimpleITK hands over
        res = register(images, fast, option, path) if option else register(images, fast, moving=path)
        assert res.exit_code == 3, res.stderr
        line = one_line(res.stderr)
        assert line.startswith("InputError:") and name in line and "1 NaN/Inf voxels" in line and where in line
        _assert_no_outputs(tmp_path)
    res = invoke("apply", "-i", tmp_path / "pair.hdr", "-r", images["fixed"], "-o", tmp_path / "o.nii.gz")
    assert res.exit_code == 0, res.stderr
    assert "1 NaN/Inf voxels" in res.stderr and "resampled as 0" in res.stderr


# ------------------------------------------------------------------------------------------------ float64
@pytest.mark.parametrize("scale,offset", [(1e-9, 1000.0), (1e-8, 1.0), (1e-6, -5e4)])
def test_a_small_float64_signal_on_a_large_offset_is_read_without_quantising(tmp_path, images, scale, offset):
    """float32 made ``1000 + 1e-9 x signal`` constant ("zero intensity variance") and ``1 + 1e-8 x signal`` about
    20 levels; the minimum is now subtracted in float64 first (recorded in meta) and written back by write_image."""
    from regcli.io.images import read_image, write_image

    moving = sitk.ReadImage(str(images["moving"]))
    signal = sitk.GetArrayFromImage(moving).astype(np.float64)
    arr = signal * scale + offset
    path = write(_like(moving, arr), tmp_path / "off.nrrd")
    img = read_image(path, "moving image")
    assert img.meta["intensity_offset"] == float(np.float32(arr.min()))
    data = img.data.numpy().astype(np.float64) + img.meta["intensity_offset"]
    assert np.abs(data - arr).max() < 1e-6 * scale * signal.max()  # float32 precision of the signal itself
    assert len(np.unique(img.data.numpy())) >= 0.99 * len(np.unique(arr))  # the file's grey levels are kept
    assert len(np.unique((arr - offset).astype(np.float32))) >= 0.99 * len(np.unique(arr))
    assert len(np.unique(arr.astype(np.float32))) < 0.01 * len(np.unique(arr))  # what the plain cast kept
    write_image(img, tmp_path / "back.nrrd", "float32")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "back.nrrd")))
    assert np.array_equal(back, arr.astype(np.float32))  # the file's values, as float32 gives them


@pytest.mark.parametrize("arr", [np.linspace(0.0, 1.0, 8), np.linspace(-1024.0, 3071.0, 8),
                                 np.linspace(1000.0, 1100.0, 8), np.arange(8, dtype=np.int32) + 2 ** 30])
def test_ordinary_images_are_read_without_an_offset(arr):
    """Images that contain 0, or whose range float32 covers with 2^16 steps or more, are cast as they are; int32
    values 2^30 .. 2^30 + 7 are not (float32's step there is 128: they would all become 2^30)."""
    from regcli.io.images import float32_offset

    expected = float(arr.min()) if arr.dtype == np.int32 else 0.0
    assert float32_offset(arr) == expected
    assert float32_offset(arr.astype(np.float32)) == 0.0  # float32 files are never shifted


def test_a_small_float64_signal_on_a_large_offset_registers_like_the_signal(tmp_path, images, fast):
    """The affine of ``moving x 1e-8 + 1`` (float64) is that of the moving image itself; before, float32 left it
    about 20 grey levels and the result 0.7 mm off. Warped holds the file's values (the offset added back), as
    float32 gives them."""
    moving = sitk.ReadImage(str(images["moving"]))
    arr = sitk.GetArrayFromImage(moving).astype(np.float64) * 1e-8 + 1.0
    shifted = write(_like(moving, arr), tmp_path / "shifted.nrrd")
    res = register(images, fast, "-m", "affine", prefix="plain_")
    assert res.exit_code == 0, res.stderr
    res = register(images, fast, "-m", "affine", moving=shifted, prefix="shifted_")
    assert res.exit_code == 0, res.stderr
    out = images["fixed"].parent
    a = sitk.ReadTransform(str(out / "plain_0GenericAffine.mat"))
    b = sitk.ReadTransform(str(out / "shifted_0GenericAffine.mat"))
    probe = [(x, y, z) for x in (-10.0, 10.0) for y in (-10.0, 10.0) for z in (-10.0, 10.0)]
    worst = max(np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))) for p in probe)
    assert worst < 0.05, worst
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "shifted_Warped.nii.gz")))
    assert warped.dtype == np.float32 and np.abs(warped - 1.0).max() < 1e-6  # float32 of the file's values, not 0


def test_float64_values_beyond_float32_are_resampled_in_float64_by_apply(tmp_path):
    """apply used to write NaN/Inf where float64 values above 3.4e38 met float32; it now interpolates float64
    inputs in float64 (output float64, as sitk.Resample) and equals sitk.Resample."""
    from test_apply import _step_image

    img = _step_image(sitk.sitkFloat64, [1e300 * (k + 1) for k in range(12)])
    sitk.WriteImage(img, str(tmp_path / "huge.nrrd"))
    tx = sitk.TranslationTransform(3, (1.3, -0.4, 0.7))
    sitk.WriteTransform(tx, str(tmp_path / "t.txt"))
    for ref in (img, _step_image(sitk.sitkUInt8)[1:, :, :]):
        sitk.WriteImage(ref, str(tmp_path / "ref.nrrd"))
        for extra in ([], ["-t", tmp_path / "t.txt"]):
            res = invoke("apply", "-i", tmp_path / "huge.nrrd", "-r", tmp_path / "ref.nrrd", "-o", tmp_path / "o.nrrd",
                         "--overwrite", *extra)
            assert res.exit_code == 0, res.stderr
            out = sitk.ReadImage(str(tmp_path / "o.nrrd"))
            assert out.GetPixelID() == sitk.sitkFloat64
            got = sitk.GetArrayFromImage(out)
            assert np.isfinite(got).all()
            want = sitk.GetArrayFromImage(sitk.Resample(img, ref, tx if extra else sitk.Transform(), sitk.sitkLinear,
                                                        0.0, sitk.sitkFloat64))
            assert np.allclose(got, want, rtol=1e-6, atol=0.0)


def test_float64_values_beyond_float32_are_refused_by_register(tmp_path, images, fast, monkeypatch):
    """Registration computes in float32: such an image used to be refused as "NaN/Inf voxels" (the cast's
    infinities); the message now says what is wrong."""
    _no_optimisation(monkeypatch)
    moving = sitk.ReadImage(str(images["moving"]))
    arr = sitk.GetArrayFromImage(moving).astype(np.float64) * 1e300
    huge = write(_like(moving, arr), tmp_path / "huge.nrrd")
    res = register(images, fast, moving=huge)
    assert res.exit_code == 3, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("InputError:") and "huge.nrrd" in line and "beyond float32's range" in line
    _assert_no_outputs(tmp_path)


# ------------------------------------------------------------------------------------------------ MetaImage data
@pytest.mark.parametrize("damage", ["missing", "truncated", "truncated_local", "compressed_truncated"])
def test_a_metaimage_with_a_missing_or_short_data_file_names_it_in_one_line(tmp_path, images, fast, capfd,
                                                                            monkeypatch, damage):
    """ITK printed its own ``MetaImage: Read: Cannot open data file`` / ``data not read completely`` lines and the
    error named the header only: now one line naming the data file (ElementDataFile), before ITK reads it."""
    _no_optimisation(monkeypatch)
    moving = sitk.ReadImage(str(images["moving"]))
    if damage == "truncated_local":
        path = write(moving, tmp_path / "m.mha")
        data = path
        path.write_bytes(path.read_bytes()[:-1000])
    else:
        path = tmp_path / "m.mhd"
        sitk.WriteImage(moving, str(path), damage.startswith("compressed"))
        data = tmp_path / ("m.zraw" if damage.startswith("compressed") else "m.raw")
        if damage == "missing":
            data.unlink()
        else:
            data.write_bytes(data.read_bytes()[:300])
    capfd.readouterr()  # what writing the test file printed
    for run in (lambda: register(images, fast, moving=path),
                lambda: invoke("apply", "-i", path, "-r", images["fixed"], "-o", tmp_path / "o.nii.gz")):
        res = run()
        assert res.exit_code == 3, res.stderr
        line = one_line(res.stderr)
        assert line.startswith("InputError:") and str(path) in line
        assert ("does not exist" if damage == "missing" else "truncated") in line
        if damage != "truncated_local":
            assert str(data) in line and "ElementDataFile" in line
        assert "MetaImage" not in capfd.readouterr().err  # nothing from ITK on the process's stderr
    _assert_no_outputs(tmp_path)
    assert not (tmp_path / "o.nii.gz").exists()
