"""Reading a CSV of pairs (regcli.evaluation.read_manifest / read_pairs): a malformed file is one line and exit 3
(never a traceback), errors name the line an editor shows, and the register child gets paths it cannot misread."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import invoke, one_line
from regcli.errors import InputError
from regcli.evaluation import Pair, read_manifest, read_pairs, register_command


@pytest.fixture
def files(tmp_path):
    """Empty stand-ins for images (read_manifest checks only that they exist)."""
    for name in ("f.nii.gz", "m.nii.gz", "-m.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("content, message", [
    (b"fixed_image,moving_image\nf.nii.gz,m.nii.gz,extra\n", "line 2: more fields than the header has"),
    (b"\xff\xfef\x00", "line 1: not UTF-8 text (save it as UTF-8)"),  # UTF-16
    (b"fixed_image,moving_image\nf.nii.gz,m.nii.gz\nf.nii.gz,m\xe9.nii.gz\n", "line 3: not UTF-8 text"),  # Latin-1
    (b"fixed_image,moving_image,fixed_image\nf.nii.gz,m.nii.gz,m.nii.gz\n",
     "line 1: column 'fixed_image' appears twice in the header"),
    (b"fixed_image,moving_image\n\n\nf.nii.gz,m.nii.gz\nf.nii.gz,nope.nii.gz\n", "line 5, moving_image"),
])
def test_a_malformed_pairs_csv_is_one_line_naming_its_line(files, content, message):
    """An extra field (AttributeError) or a non-UTF-8 file (UnicodeDecodeError) crashed with exit 1; a repeated
    column was accepted (the last one won); after blank lines the line number was that of the row, not the file."""
    (files / "p.csv").write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)):
        read_pairs(files / "p.csv")
    res = invoke("evaluate", files / "p.csv", "-o", files / "ev")
    assert res.exit_code == 3 and message in one_line(res.stderr) and str(files / "p.csv") in res.stderr


def test_empty_trailing_fields_and_blank_rows_keep_working(files):
    (files / "p.csv").write_text("pair,fixed_image,moving_image\nx,f.nii.gz,m.nii.gz,,\n,,\n\n,f.nii.gz,m.nii.gz\n")
    assert [p.name for p in read_manifest(files / "p.csv")] == ["x", "pair003"]  # the default names of before


def test_an_image_path_starting_with_a_dash_is_not_read_as_an_option(files, monkeypatch):
    """``-m.nii.gz`` (relative to a CSV in the working folder) reached the register child as an option: "Missing
    argument 'MOVING'". The images now follow ``--``; the register command parses them as its two images."""
    import typer

    from regcli.cli.app import app

    monkeypatch.chdir(files)
    (files / "p.csv").write_text("fixed_image,moving_image\nf.nii.gz,-m.nii.gz\n")
    (pair,) = read_manifest("p.csv")
    assert str(pair.moving) == "-m.nii.gz"
    pair = Pair(**{**pair.__dict__, "moving_mask": Path("-m.nii.gz")})
    cmd = register_command(pair, str(files / "p_"), "affine", extra_args=("--iterations", "2"))
    assert cmd[3] == "register"
    group = typer.main.get_command(app)
    ctx = group.commands["register"].make_context("register", cmd[4:])
    assert (str(ctx.params["fixed"]), str(ctx.params["moving"])) == ("f.nii.gz", "-m.nii.gz")
    assert str(ctx.params["moving_mask"]) == "-m.nii.gz" and ctx.params["method"] == "affine"
