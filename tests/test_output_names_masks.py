"""Output image names ITK would write under another name, soft masks, and pair names that leave OUTDIR.

* An output named ``out.nii.gz.nii.gz`` (or ``x.nii.nii.gz``, ``a.nii.nii``, ``u.NII``, ``u.MHA``) is refused with
  the other output checks, before any work, and by the one image writer (``write_sitk``) for other callers.
* A mask is any finite scalar image, non-zero = inside (``--fixed-mask``, ``--moving-mask``, ``jacobian --mask``,
  evaluate's ``fixed_mask`` column); NaN/Inf are still refused.
* A pair name (``evaluate --name``, a dataset name of a dataset manifest) with a path separator, or empty, ``.``
  or ``..``, is refused before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import invoke, make_phantom, one_line
from regcli.errors import InputError, OutputError
from regcli.io.atomic import OutputSet

TRUNCATED = ["out.nii.gz.nii.gz", "x.nii.nii.gz", "a.nii.nii", "b.nii.gz.nii", "c.img.nii", "d.NII.nii.gz"]
UPPER = ["u.NII", "u.NII.GZ", "u.nii.GZ", "u.MHA"]
FINE = ["ok.nii.gz", "ok.nii", "ok.nrrd", "ok.mha", "ok.NRRD", "b.nrrd.nii.gz", "c.mha.nii", "d.nii.gz.nrrd",
        "e.nii.mha", "f.gz.nii", "g.nii.bak.nii.gz", ".nii.gz"]


def _const(path: Path, size=20) -> Path:
    sitk.WriteImage(sitk.Image(size, size, size, sitk.sitkFloat32) + 1, str(path))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ A: output names
def test_image_name_rule_matches_what_itk_writes(tmp_path):
    """The rule agrees with SimpleITK itself: refused exactly when ITK writes no file of that very name."""
    from regcli.io.atomic import image_name_problem

    img = sitk.Image(3, 3, 3, sitk.sitkFloat32)
    for i, name in enumerate(TRUNCATED + UPPER + FINE):
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        try:
            sitk.WriteImage(img, str(folder / name))
            written_as_named = _listing(folder) == [name]
        except RuntimeError:
            written_as_named = False
        assert (image_name_problem(name) is None) == written_as_named, name


@pytest.mark.parametrize("name", TRUNCATED + UPPER)
def test_claim_refuses_names_itk_would_not_write(tmp_path, name):
    with pytest.raises(OutputError) as err:
        OutputSet().claim(tmp_path / name, image=True)
    assert name in str(err.value)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("name", ["out.nii.gz.nii.gz", "x.nii.nii.gz", "a.nii.nii", "u.MHA"])
def test_apply_refuses_a_doubled_extension_up_front_and_leaves_nothing(tmp_path, name):
    img = _const(tmp_path / "img.nii.gz")
    before = _listing(tmp_path)
    res = invoke("apply", "-i", img, "-r", img, "-o", tmp_path / name)
    assert res.exit_code == 6, res.output
    line = one_line(res.output)
    assert line.startswith("OutputError:") and name in line and "writer produced no file" not in line
    assert _listing(tmp_path) == before  # no output, no hidden temporary, no file under a truncated name


def test_register_refuses_a_doubled_warped_name_before_reading_the_images(tmp_path):
    """The fixed image is constant (reading it fails with exit 3): exit 6 shows the name was checked first."""
    img = _const(tmp_path / "img.nii.gz")
    out = tmp_path / "o"
    out.mkdir()
    res = invoke("register", img, img, "-o", f"[{out}/q_,{out}/w.nii.gz.nii.gz]", "--method", "affine",
                 "--threads", "1", "-q")
    assert res.exit_code == 6, res.output
    line = one_line(res.output)
    assert "w.nii.gz.nii.gz" in line and "doubled extension" in line
    assert _listing(out) == []


def test_register_writes_its_html_report_under_any_prefix_the_os_takes(tmp_path, pair):
    """A prefix with a space, quotes, '&', '<', '>', '#', '?' or '%' (was: exit 1 after the whole registration, or
    figures a browser could not find): the run succeeds and each <img src> resolves to a figure it wrote."""
    import re
    from html import unescape
    from urllib.parse import unquote, urljoin, urlsplit

    out = tmp_path / "sp ace"
    out.mkdir()
    prefix = str(out / "a b'\"&<>#?%_")
    res = invoke("register", pair["fixed"], pair["moving"], "-o", prefix, "--method", "affine", "--threads", "1",
                 "-q")
    assert res.exit_code == 0, res.output
    html = Path(prefix + "Report.html")
    figures = sorted(p.name for p in out.iterdir() if p.name.endswith(".png"))
    assert figures and all(name.startswith("a b'\"&<>#?%_Report_") for name in figures)
    linked = []
    for src in re.findall(r"<img src='([^']*)'", html.read_text()):
        parts = urlsplit(urljoin(html.as_uri(), unescape(src)))
        assert not parts.query and not parts.fragment
        linked.append(Path(unquote(parts.path)))
    assert sorted(p.name for p in linked) == figures and all(p.parent == out for p in linked)
    assert set(json.loads(Path(prefix + "Report.json").read_text())["outputs"]) >= {str(out / f) for f in figures}


def _tmp_overhead() -> int:
    """Bytes the temporary name (``.regcli-tmp-<pid>-``) adds to an output's name in this process."""
    import os

    from regcli.io.atomic import temp_path_for

    return len(os.fsencode(temp_path_for("x").name)) - 1


def _name_max(folder: Path) -> int:
    import os

    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def test_claim_refuses_a_name_whose_temporary_is_too_long_counting_bytes(tmp_path):
    """Names of ``é`` (two bytes each): the limit is in bytes. A name whose temporary fits exactly is taken."""
    limit = _name_max(tmp_path)
    room = limit - _tmp_overhead() - len(".mat")  # bytes of stem the temporary leaves
    fits = "e" * (room % 2) + "é" * (room // 2) + ".mat"
    assert OutputSet().claim(tmp_path / fits) == tmp_path / fits
    over = "e" * ((room + 1) % 2) + "é" * ((room + 1) // 2) + ".mat"  # the name fits, its temporary does not
    with pytest.raises(OutputError) as err:
        OutputSet().claim(tmp_path / over)
    msg = str(err.value)
    assert over in msg and f"over this file system's {limit}" in msg and "temporary name" in msg
    too_long = "é" * (limit // 2 + 1) + ".nii.gz"
    with pytest.raises(OutputError, match=f"{len(too_long.encode())} bytes, over this file system's {limit};"):
        OutputSet().claim(tmp_path / too_long, image=True)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("html", [False, True])
def test_register_refuses_a_prefix_too_long_for_its_outputs_before_reading_the_images(tmp_path, html):
    """Was: the whole registration, then 'File name too long' at the write. Without the report the .mat's
    temporary is the one too long; with it only figures' names (``<prefix>Report_checkerboard.png``, the longest,
    is named; the other outputs and their temporaries fit). The fixed image is constant (reading it fails with
    exit 3)."""
    img = _const(tmp_path / "img.nii.gz")
    out = tmp_path / "o"
    out.mkdir()
    room = _name_max(out) - _tmp_overhead() - len("0GenericAffine.mat")  # longest stem the .mat's temporary takes
    stem = "é" * (room // 2) + "e" * (room % 2) if html else "é" * (room // 2 + 1)
    res = invoke("register", img, img, "-o", out / stem, "--method", "affine", "--threads", "1", "-q",
                 *([] if html else ["--no-html"]))
    assert res.exit_code == 6, res.output
    line = one_line(res.output)
    too_long = stem + ("Report_checkerboard.png" if html else "0GenericAffine.mat")
    assert line.startswith("OutputError:") and too_long in line and "bytes, over this file system's" in line
    assert _listing(out) == []


def test_register_refuses_an_earlier_runs_figure_before_reading_the_images(tmp_path):
    """Was: refused by the HTML stage, after the whole registration. The fixed image is constant (exit 3 if read)."""
    img = _const(tmp_path / "img.nii.gz")
    out = tmp_path / "o"
    out.mkdir()
    figure = out / "p_Report_checkerboard.png"
    figure.write_bytes(b"earlier")
    res = invoke("register", img, img, "-o", out / "p_", "--method", "affine", "--threads", "1", "-q")
    assert res.exit_code == 6, res.output
    line = one_line(res.output)
    assert str(figure) in line and "exists" in line and "--overwrite" in line
    assert _listing(out) == [figure.name] and figure.read_bytes() == b"earlier"
    res = invoke("register", img, img, "-o", out / "p_", "--method", "affine", "--threads", "1", "-q", "--no-html")
    assert res.exit_code == 3, res.output  # without the report the figure is no output of the run


def test_write_sitk_never_writes_under_a_truncated_name(tmp_path):
    from regcli.io.images import write_sitk

    img = sitk.Image(4, 4, 4, sitk.sitkFloat32)
    for name in ("out.nii.gz.nii.gz", "u.MHA"):
        with pytest.raises(OutputError, match="cannot write"):
            write_sitk(img, tmp_path / name)
    assert _listing(tmp_path) == []


# ------------------------------------------------------------------------------------------------ B: soft masks
def _soft_mask(reference: Path, path: Path, value=0.5, threshold=0.1, nan=False) -> Path:
    ref = sitk.ReadImage(str(reference))
    arr = (sitk.GetArrayFromImage(ref) > threshold).astype(np.float32) * value
    if nan:
        arr[1, 2, 3] = np.nan
    m = sitk.GetImageFromArray(arr)
    m.CopyInformation(ref)
    sitk.WriteImage(m, str(path))
    return path


@pytest.fixture
def pair(tmp_path):
    f = make_phantom("LPS", "iso", size=(32, 32, 32))
    m = make_phantom("LPS", "iso", size=(32, 32, 32), transform=lambda p: p + np.array([2.0, -1.5, 1.0]))
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz"}
    sitk.WriteImage(f, str(paths["fixed"]))
    sitk.WriteImage(m, str(paths["moving"]))
    return paths


def test_read_mask_binarises_a_soft_mask_and_refuses_nan(tmp_path, pair):
    from regcli.io.images import read_mask

    soft = _soft_mask(pair["fixed"], tmp_path / "soft.nii.gz", value=0.37)
    binary = _soft_mask(pair["fixed"], tmp_path / "binary.nii.gz", value=1.0)
    a, b = read_mask(soft, "fixed mask"), read_mask(binary, "fixed mask")
    assert a.data.dtype == b.data.dtype and bool((a.data == b.data).all()) and a.grid == b.grid
    assert set(np.unique(a.data.numpy())) == {0.0, 1.0}
    with pytest.raises(InputError, match="NaN/Inf"):
        read_mask(_soft_mask(pair["fixed"], tmp_path / "nan.nii.gz", nan=True), "fixed mask")


def test_register_with_soft_masks_equals_their_binarised_masks(tmp_path, pair):
    args = ["--method", "affine", "--threads", "1", "--no-html", "-q"]
    soft = _soft_mask(pair["fixed"], tmp_path / "soft.nii.gz")
    softm = _soft_mask(pair["moving"], tmp_path / "softm.nii.gz", value=0.25)
    res = invoke("register", pair["fixed"], pair["moving"], "-o", tmp_path / "s_", "--fixed-mask", soft,
                 "--moving-mask", softm, *args)
    assert res.exit_code == 0, res.output
    binary = _soft_mask(pair["fixed"], tmp_path / "binary.nii.gz", value=1.0)
    binarym = _soft_mask(pair["moving"], tmp_path / "binarym.nii.gz", value=1.0)
    res = invoke("register", pair["fixed"], pair["moving"], "-o", tmp_path / "b_", "--fixed-mask", binary,
                 "--moving-mask", binarym, *args)
    assert res.exit_code == 0, res.output
    a = sitk.ReadTransform(str(tmp_path / "s_0GenericAffine.mat")).GetParameters()
    b = sitk.ReadTransform(str(tmp_path / "b_0GenericAffine.mat")).GetParameters()
    assert a == b


def test_jacobian_and_evaluate_take_a_soft_mask(tmp_path, pair):
    from regcli.io.images import read_mask
    from regcli.io.transforms import write_displacement
    from regcli.reports.jacobian import jacobian_region
    from regcli.spaces import Grid
    from regcli.transforms import DisplacementField

    soft = _soft_mask(pair["fixed"], tmp_path / "soft.nii.gz")
    grid = Grid.from_sitk(sitk.ReadImage(str(pair["fixed"])))
    write_displacement(DisplacementField.zeros(grid), tmp_path / "w.nii.gz")
    res = invoke("jacobian", tmp_path / "w.nii.gz", "-o", tmp_path / "j.nii.gz", "--mask", soft, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["stats_in_mask"]["jac_min"] == pytest.approx(1.0)

    inside, source = jacobian_region(grid, read_mask(soft, "fixed mask"))  # evaluate's and register's region
    assert source == "fixed_mask"
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["fixed"]))) > 0.1
    assert np.array_equal(inside.numpy(), expected)


# ------------------------------------------------------------------------------------------------ C: pair names
@pytest.mark.parametrize("name", ["../escaped", "", ".", "..", "a\\b", "sub/x"])
def test_evaluate_refuses_a_pair_name_that_leaves_outdir(tmp_path, pair, name):
    out = tmp_path / "evn" / "sub"
    res = invoke("evaluate", "--fixed", pair["fixed"], "--moving", pair["moving"], "-o", out, "--name", name,
                 "--method", "affine", "--threads", "1", "-q")
    assert res.exit_code == 2, res.output
    line = one_line(res.output)
    assert "--name" in line and "pair name" in line
    assert not (tmp_path / "evn").exists()  # refused before the output folder is made


def test_dataset_manifest_name_with_a_separator_is_refused(tmp_path, pair):
    from regcli.evaluation import read_pairs

    (tmp_path / "pairs.csv").write_text(f"fixed_image,moving_image\n{pair['fixed']},{pair['moving']}\n")
    manifest = tmp_path / "datasets.yaml"
    manifest.write_text("datasets:\n  - name: ../evil\n    pairs: pairs.csv\n")
    with pytest.raises(InputError, match=r"dataset '\.\./evil'.*must not contain"):
        read_pairs(manifest)
    out = tmp_path / "res"
    res = invoke("evaluate", manifest, "-o", out, "--method", "affine", "--threads", "1", "-q")
    assert res.exit_code == 3, res.output
    assert "../evil" in one_line(res.output)
    assert not out.exists() and _listing(tmp_path) == sorted(["datasets.yaml", "pairs.csv", "fixed.nii.gz",
                                                              "moving.nii.gz"])
