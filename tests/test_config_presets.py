"""Method presets (regcli.config.METHOD_PRESETS) against a ``--config`` file: a ``--method`` flag wins over the keys
the file holds for its own method's preset; the file's own method keeps its keys as written; contradictions between
the method and ``affine.stages`` are refused (exit 7), and ``regcli config show`` output round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from conftest import invoke, one_line
from test_cli import images  # noqa: F401 - fixture: 32^3 fixed/moving phantoms and labels
from regcli.config import METHOD_PRESETS, build_config
from regcli.errors import ConfigError

METHODS = list(METHOD_PRESETS)


def _show(tmp_path, *args) -> str:
    """``regcli config show ARGS`` (YAML), written to a file of its own; the file's path."""
    res = invoke("config", "show", *args)
    assert res.exit_code == 0, res.output
    path = tmp_path / f"show_{abs(hash(args))}.yaml"
    path.write_text(res.stdout)
    return path


def test_every_preset_sets_the_same_keys():
    """So that a --method flag replaces every key another method's preset put in a file."""
    def leaves(d, prefix=""):
        return {p for k, v in d.items() for p in (leaves(v, f"{prefix}{k}.") if isinstance(v, dict)
                                                   else {f"{prefix}{k}"})}

    keys = {m: leaves(p) for m, p in METHOD_PRESETS.items()}
    assert all(k == keys["convexadam"] for k in keys.values()), keys
    assert METHOD_PRESETS["rigid"]["affine"]["stages"] == ("rigid",)
    assert METHOD_PRESETS["foundation"]["inverse_grid"] == METHOD_PRESETS["promptreg"]["inverse_grid"] == "moving"


@pytest.mark.parametrize("file_method", METHODS)
def test_a_method_flag_wins_over_a_config_show_file_of_another_method(tmp_path, file_method):
    """`regcli config show > cfg.yaml` then `register --config cfg.yaml --method rigid` ran a full affine (the file's
    `affine.stages: [rigid, affine]` won over the flag's preset); `config show --method rigid` then `--method
    affine` ran rigid only; a foundation file kept `inverse_grid: moving` for convexadam. Whatever method the file
    was written for, the flag gives exactly the configuration of `config show --method B`."""
    path = _show(tmp_path, "--method", file_method)
    for method in METHODS:
        got = build_config(path, {"method": method}).model_dump(mode="json")
        assert got == build_config(None, {"method": method}).model_dump(mode="json"), (file_method, method)


def test_the_method_flag_through_the_command_line(tmp_path):
    cfg = _show(tmp_path)
    res = invoke("config", "show", "--config", cfg, "--method", "rigid", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["affine"]["stages"] == ["rigid"], res.output
    rigid = _show(tmp_path, "--method", "rigid")
    res = invoke("config", "show", "--config", rigid, "--method", "affine", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["affine"]["stages"] == ["rigid", "affine"], res.output
    network = _show(tmp_path, "--method", "foundation")
    res = invoke("config", "show", "--config", network, "--method", "convexadam", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["inverse_grid"] == "fixed", res.output


@pytest.mark.parametrize("method", METHODS)
def test_config_show_round_trips_for_every_method(tmp_path, method):
    """`config show --method X > f.yaml`, then `--config f.yaml` with or without `--method X`: the same text."""
    path = _show(tmp_path, "--method", method)
    for extra in ((), ("--method", method)):
        res = invoke("config", "show", "--config", path, *extra)
        assert res.exit_code == 0 and res.stdout == path.read_text(), (method, extra, res.output)


def test_the_file_keeps_the_keys_it_chose(tmp_path):
    """Without a flag the file's method keeps its keys as written; with a flag for another method, keys the file set
    to values other than its own method's preset stay too (they are its choice, not its preset's)."""
    path = tmp_path / "c.yaml"
    path.write_text("method: convexadam\naffine: {stages: [affine]}\ninverse_grid: moving\n")
    for flags in ({}, {"method": "convexadam"}, {"method": "samconvex"}, {"method": "dio"}):
        cfg = build_config(path, flags)
        assert cfg.affine.stages == ("affine",) and cfg.inverse_grid == "moving", flags
    path.write_text("method: foundation\ninverse_grid: fixed\n")
    assert build_config(path, {"method": "promptreg"}).inverse_grid == "fixed"
    assert build_config(path, {}).inverse_grid == "fixed"
    # a file with no method key was written for the default method (convexadam)
    path.write_text("affine: {stages: [rigid, affine], metric: mi}\n")
    cfg = build_config(path, {"method": "rigid"})
    assert cfg.affine.stages == ("rigid",) and cfg.affine.metric == "mi"


@pytest.mark.parametrize("text,flags,origin", [
    ("method: rigid\naffine: {stages: [rigid, affine]}\n", (), "`method: rigid` in"),
    ("method: affine\naffine: {stages: [rigid]}\n", (), "`method: affine` in"),
    ("affine: {stages: [affine]}\n", ("--method", "rigid"), "--method rigid"),
    ("method: convexadam\naffine: {stages: [rigid]}\n", ("--method", "affine"), "--method affine"),
])
def test_a_method_that_contradicts_its_affine_stages_is_refused(tmp_path, text, flags, origin):
    """A rigid method with an affine stage (the report said rigid, the .mat held scaling), or an affine method
    without one: one line naming affine.stages and the method as the user chose it, exit 7."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    res = invoke("config", "show", "--config", path, *flags)
    line = one_line(res.stderr)
    assert res.exit_code == 7 and line.startswith(f"ConfigError: invalid configuration ({path}): affine.stages ["), \
        line
    assert origin in line and "(root)" not in line and "Value error" not in line, line


def test_an_empty_affine_stage_list_is_refused_while_the_stage_runs(tmp_path):
    """`affine: {stages: []}` ran the moments initialisation alone and called it --method affine."""
    path = tmp_path / "c.yaml"
    path.write_text("affine: {stages: []}\n")
    for flags in (("--method", "affine"), ("--method", "rigid"), ()):
        res = invoke("config", "show", "--config", path, *flags)
        line = one_line(res.stderr)
        assert res.exit_code == 7 and "affine.stages is empty" in line and "--no-affine" in line, (flags, line)
    with pytest.raises(ConfigError, match="affine.stages is empty"):
        build_config(None, {"affine": {"stages": ()}})
    # with the stage off the list is not read: allowed, as the stage itself is
    assert build_config(path, {"affine": {"enabled": False}}).affine.stages == ()


def test_register_with_a_method_flag_over_a_config_show_file_runs_that_method(tmp_path, images):  # noqa: F811
    """The hunter's case end to end: the .mat of `--method rigid` over a `config show` file is a rotation."""
    data = yaml.safe_load(invoke("config", "show").stdout)
    data["affine"].update(levels_mm=[4.0], iterations=[20])  # fast; `stages` stays [rigid, affine]
    data["html_report"] = False
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = tmp_path / "rig_"
    res = invoke("register", images["fixed"], images["moving"], "-o", out, "--config", cfg, "--method", "rigid",
                 "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["method"] == "rigid" and report["config"]["affine"]["stages"] == ["rigid"]
    tx = sitk.ReadTransform(str(tmp_path / "rig_0GenericAffine.mat"))
    linear = np.asarray(sitk.AffineTransform(tx).GetMatrix()).reshape(3, 3)
    assert np.allclose(np.linalg.svd(linear, compute_uv=False), 1.0, atol=1e-6)
