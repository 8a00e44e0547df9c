"""O1: a crash mid-write leaves the target absent or unchanged; OutputSet publishes all or nothing."""

from __future__ import annotations

import os

import pytest

from regcli.errors import OutputError
from regcli.io.atomic import OutputSet, atomic_path


def test_crash_mid_write_keeps_existing_file(tmp_path):
    target = tmp_path / "warp.nii.gz"
    target.write_bytes(b"original")

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new bytes")
            raise Boom()
    assert target.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["warp.nii.gz"]


def test_outputset_all_or_nothing(tmp_path):
    outs = OutputSet()
    a, b = outs.claim(tmp_path / "a.txt"), outs.claim(tmp_path / "b.txt")
    outs.stage(a, lambda t: t.write_text("A"))
    with pytest.raises(ZeroDivisionError):
        outs.stage(b, lambda t: (t.write_text("half"), 1 / 0))
    outs.abort()
    assert list(tmp_path.iterdir()) == []


def test_outputset_commit_publishes_together(tmp_path):
    outs = OutputSet()
    for name in ("x.json", "y.nii.gz"):
        p = outs.claim(tmp_path / name)
        outs.stage(p, lambda t, n=name: t.write_text(n))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".regcli-tmp")) == []
    outs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.nii.gz"]


def test_stage_many_writes_in_parallel_all_or_nothing(tmp_path):
    outs = OutputSet()
    paths = [outs.claim(tmp_path / f"f{i}.nii.gz") for i in range(3)]
    outs.stage_many([(p, lambda t, i=i: t.write_text(str(i))) for i, p in enumerate(paths)], workers=2)
    outs.commit()
    assert [p.read_text() for p in paths] == ["0", "1", "2"]

    outs = OutputSet(overwrite=True)
    new = outs.claim(tmp_path / "g.nii.gz")
    outs.stage(new, lambda t: t.write_text("g"))
    with pytest.raises(ZeroDivisionError):
        outs.stage_many([(paths[0], lambda t: t.write_text("new")), (paths[1], lambda t: (t.write_text("x"), 1 / 0)),
                         (paths[2], lambda t: t.write_text("new"))], workers=3)
    outs.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0.nii.gz", "f1.nii.gz", "f2.nii.gz"]
    assert [p.read_text() for p in paths] == ["0", "1", "2"]


def test_claim_refuses_existing_without_overwrite(tmp_path):
    (tmp_path / "a.txt").write_text("keep")
    with pytest.raises(OutputError, match="exists"):
        OutputSet().claim(tmp_path / "a.txt")
    OutputSet(overwrite=True).claim(tmp_path / "a.txt")


def test_claim_refuses_a_dangling_link_without_overwrite(tmp_path):
    link = tmp_path / "out.nii.gz"
    link.symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        OutputSet().claim(link)
    assert OutputSet(overwrite=True).claim(link) == link


def test_claim_missing_or_unwritable_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        OutputSet().claim(tmp_path / "nope" / "a.txt")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        with pytest.raises(OutputError, match="not writable"):
            OutputSet().claim(ro / "a.txt")
    finally:
        os.chmod(ro, 0o700)


def _nifti(tmp_path, name="img.nii"):
    import numpy as np
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.random.default_rng(0).standard_normal((6, 7, 8)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / name))
    return img, tmp_path / name


def test_a_short_or_failed_write_is_a_one_line_output_error_and_leaves_nothing(tmp_path):
    """A full disk: ITK prints an error on stderr but returns, leaving a short .nii; SimpleITK's own failures
    are RuntimeErrors, the OS's OSErrors. All become OutputError (exit 6) and the temporary is removed."""
    import gzip

    _, ref = _nifti(tmp_path)
    whole = ref.read_bytes()
    ref.unlink()
    out = tmp_path / "out"
    out.mkdir()
    outs = OutputSet()
    for name, payload in (("short.nii", whole[:-100]), ("short.nii.gz", gzip.compress(whole[:-100])),
                          ("cut.nii.gz", gzip.compress(whole)[:-8])):
        with pytest.raises(OutputError, match=f"cannot write '.*{name}'.*(end early|holds).*disk full"):
            outs.stage(outs.claim(out / name), lambda t, b=payload: t.write_bytes(b))
    outs.stage(outs.claim(out / "whole.nii.gz"), lambda t: t.write_bytes(gzip.compress(whole)))

    def sitk_fails(t):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: /tmp/x.cxx:123:\n"
                           "sitk::ERROR: Failed opening file /proc/.regcli-tmp-1-x.nii for writing")

    with pytest.raises(OutputError, match=r"cannot write '.*x.nii': sitk::ERROR: Failed opening file") as e:
        outs.stage(outs.claim(out / "x.nii"), sitk_fails)
    assert "\n" not in str(e.value)

    def disk_full(t):
        t.write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="cannot write '.*y.mat': No space left on device"):
        outs.stage(outs.claim(out / "y.mat"), disk_full)
    outs.commit()
    assert sorted(p.name for p in out.iterdir()) == ["whole.nii.gz"]


def test_a_truncated_nifti_is_refused_on_reading(tmp_path):
    """SimpleITK reads a .nii cut short, or a .nii.gz holding a short payload, and fills the rest with zeros."""
    import gzip

    from regcli.errors import InputError
    from regcli.io.images import read_image

    _, ref = _nifti(tmp_path)
    whole = ref.read_bytes()
    assert read_image(ref).data.shape == (6, 7, 8)
    (tmp_path / "cut.nii").write_bytes(whole[:len(whole) * 2 // 3])
    (tmp_path / "cut_inner.nii.gz").write_bytes(gzip.compress(whole[:len(whole) // 2]))
    for name in ("cut.nii", "cut_inner.nii.gz"):
        with pytest.raises(InputError, match=f"'.*{name}': its voxel data end early .* the file is truncated"):
            read_image(tmp_path / name)
