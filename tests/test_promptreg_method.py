"""``--method promptreg``: the PromptReg network in physical space, its exact inverse, IO, the CLI.

Tiny hand-built networks: the velocity head (``PromptRegNet.head``, zero-initialised) gets only a bias, so the
velocity is a known constant in voxels of the network grid, whatever the rest of the (random) network does.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import NETWORK_SHIFT, as_image, invoke, make_phantom, one_line, write
from regcli.config import build_config
from regcli.methods.promptreg import _load, promptreg, task_names, voxels_to_world
from regcli.models.promptreg import PromptRegConfig, PromptRegNet, save_promptreg_model
from regcli.pipeline import register_images
from regcli.resample import resample_to_grid
from regcli.spaces.grid import Grid
from regcli.transforms import DisplacementField, inverse_consistency_error

GRID = (16, 20, 24)  # the network's input_shape, tensor order (Z, Y, X); not a cube, so an axis mix-up shows
TINY = PromptRegConfig(input_shape=GRID, encoder_channels=(4, 8), decoder_channels=(4,), num_tasks=2, prompt_dim=4,
                       prompt_hidden=8, template_size=2)
TASKS = ["brain", "abdomen"]
SHIFT = NETWORK_SHIFT


@pytest.fixture(scope="module")
def pair(network_pair):
    return network_pair


def _constant_net(fixed_grid: Grid, world_mm: np.ndarray, seed: int = 0) -> PromptRegNet:
    """A random tiny network whose velocity is constant: ``world_mm`` (LPS) expressed in voxels (z, y, x) of the
    network grid over ``fixed_grid``. A constant velocity's exponential is itself."""
    torch.manual_seed(seed)
    net = PromptRegNet(TINY)
    work = fixed_grid.with_size(tuple(reversed(GRID)))
    index = np.linalg.solve(work.index_to_world()[:3, :3], world_mm)  # voxels, x, y, z
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor(index[::-1].copy(), dtype=torch.float32))
    return net.eval()


def _save(net: PromptRegNet, folder, tasks=TASKS):
    return save_promptreg_model(net, folder, "# test", training={"tasks": tasks} if tasks is not None else None)


def _config(folder, **promptreg):
    return build_config(None, {"method": "promptreg", "affine": {"enabled": False}, "html_report": False,
                               "promptreg": {"weights": str(folder), **promptreg}})


def test_voxels_to_world_reorders_and_scales_on_an_oblique_anisotropic_grid():
    D = np.asarray(sitk.VersorTransform((0.3, 0.2, 0.93), 0.4).GetMatrix()).reshape(3, 3)
    g = Grid((5, 7, 9), (1.5, 2.0, 0.5), (1.0, 2.0, 3.0), tuple(D.ravel()))
    d = torch.zeros(3, 9, 7, 5)
    d[0] = 2.0  # two voxels along tensor axis 0 = index z
    d[2] = -1.0  # minus one voxel along tensor axis 2 = index x
    u = voxels_to_world(d, g)
    expected = D[:, 2] * 0.5 * 2.0 - D[:, 0] * 1.5
    assert torch.allclose(u[:, 4, 3, 2], torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_task_names_come_from_the_training_section_or_the_index():
    assert task_names({"tasks": ["a", "b"]}, 2) == ("a", "b")
    assert task_names({}, 3) == ("0", "1", "2") and task_names(None, 2) == ("0", "1")
    assert task_names({"tasks": ["a"]}, 2) == ("0", "1")  # does not name every prompt
    assert task_names({"tasks": ["a", "a"]}, 2) == ("0", "1")  # not distinct


def test_constant_velocity_becomes_the_known_physical_displacement_and_its_exact_inverse(pair, tmp_path):
    """Network grid (fixed field of view, the network's input_shape in tensor order), voxel units, channel
    order, sign (fixed -> moving), LPS conversion and the exact inverse exp(-v) on the moving grid, through the
    whole pipeline. The moving image lies on another grid (other direction, spacing and field of view) than the
    fixed one."""
    fixed, _ = pair
    moving = as_image(make_phantom("PIL", "iso", transform=lambda p: p + SHIFT))
    _save(_constant_net(fixed.grid, -SHIFT), tmp_path / "m")
    reg = register_images(fixed, moving, _config(tmp_path / "m", io="none"))
    assert reg.working_grid.shape == GRID
    assert reg.working_grid.extent_mm == pytest.approx(fixed.grid.extent_mm)
    assert reg.field.grid == fixed.grid
    u = reg.field.disp.reshape(3, -1)
    assert torch.allclose(u, torch.tensor(-SHIFT, dtype=torch.float32)[:, None], atol=1e-4)
    assert reg.inverse_field.grid.allclose(moving.grid)  # the preset's inverse_grid: moving
    inv = reg.inverse_field.disp.reshape(3, -1)
    assert torch.allclose(inv, torch.tensor(SHIFT, dtype=torch.float32)[:, None], atol=1e-4)
    assert reg.inverse_error["source"] == "promptreg"  # the network's own inverse, not the fixed-point one
    assert reg.inverse_error["mean_mm"] < 1e-3
    (fusion,) = reg.history["promptreg/fusion"]
    assert list(fusion) == TASKS and sum(fusion.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= w <= 1.0 for w in fusion.values())


class _SmoothHead(torch.nn.Module):
    """A velocity head whose output is a smooth swirl of ``amp`` voxels, channels (z, y, x), whose component
    along each axis vanishes at that axis' ends (so the flow stays inside the grid)."""

    def __init__(self, amp: float) -> None:
        super().__init__()
        self.amp = amp

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z, y, x = torch.meshgrid(*(torch.linspace(0, 1, n) for n in h.shape[2:]), indexing="ij")

        def s(t, k):
            return torch.sin(k * math.pi * t)

        v = torch.stack((s(z, 1) * s(y, 2), s(y, 1) * s(x, 2), s(x, 1) * s(z, 2)))
        return self.amp * v[None].expand(h.shape[0], -1, -1, -1, -1)


def test_the_inverse_is_exp_of_minus_the_velocity(pair, tmp_path, monkeypatch):
    """For a smooth, spatially varying velocity (up to 5.7 mm displacements), the inverse is exp(-v), not the
    negated displacement: both compositions are the identity within 0.25 mm (p99), where ``-u`` misses by
    millimetres."""
    fixed, _ = pair
    _save(PromptRegNet(TINY), tmp_path / "m")
    monkeypatch.setattr(_load(str(tmp_path / "m"))[0].net, "head", _SmoothHead(2.0))
    cfg = _config(tmp_path / "m", io="none")
    work = resample_to_grid(fixed, fixed.grid.with_size(tuple(reversed(GRID))))
    res = promptreg(work, work, cfg)
    u, inv = res.field, res.inverse
    assert inv is not None and inv.grid == u.grid == work.grid
    assert float(u.disp.norm(dim=0).max()) > 5.0
    assert inverse_consistency_error(u, inv)["p99_mm"] < 0.25
    assert inverse_consistency_error(inv, u)["p99_mm"] < 0.25
    assert inverse_consistency_error(u, DisplacementField(-u.disp, u.grid))["p99_mm"] > 2.0


def test_field_io_refines_a_partly_correct_network_field(pair, tmp_path):
    fixed, moving = pair
    _save(_constant_net(fixed.grid, -0.6 * SHIFT), tmp_path / "m", tasks=None)  # 60 % of the way
    inside = torch.from_numpy(sitk.GetArrayFromImage(make_phantom("oblique15", "aniso"))).flatten() > 0.2
    err = {}
    for io in ("none", "field"):
        reg = register_images(fixed, moving, _config(tmp_path / "m", io=io, io_iterations=30))
        u = reg.field.disp.reshape(3, -1)
        err[io] = float((u[:, inside] + torch.tensor(SHIFT, dtype=torch.float32)[:, None]).norm(dim=0).mean())
    assert err["none"] == pytest.approx(0.4 * np.linalg.norm(SHIFT), rel=1e-3)
    assert err["field"] < 0.5 * err["none"]  # regcli's solver takes it most of the remaining way
    assert len(reg.history["promptreg/instance"]) == 30 and "promptreg/refine" in reg.history
    assert list(reg.history["promptreg/fusion"][0]) == ["0", "1"]  # no task names recorded: by index
    assert "iterations" in reg.inverse_error  # the field changed: fixed-point inverse


def test_register_cli_writes_ants_outputs_and_reports_the_model(tmp_path):
    f = write(make_phantom("LPS"), tmp_path / "f.nii.gz")
    m = write(make_phantom("LPS", transform=lambda p: p + SHIFT), tmp_path / "m.nii.gz")
    torch.manual_seed(1)
    _save(PromptRegNet(TINY), tmp_path / "net")
    (tmp_path / "c.yaml").write_text(f"promptreg: {{weights: {tmp_path / 'net'}, input_shape: 16}}\n")
    out = tmp_path / "out"
    out.mkdir()
    res = invoke("register", f, m, "-o", f"{out}/p_", "--method", "promptreg", "--config", tmp_path / "c.yaml",
                 "--io", "none", "--no-html", "--json")
    assert res.exit_code == 0, res.output
    for name in ("p_0GenericAffine.mat", "p_1Warp.nii.gz", "p_1InverseWarp.nii.gz", "p_Warped.nii.gz",
                 "p_Report.json"):
        assert (out / name).is_file()
    rep = json.loads(res.stdout)
    assert rep == json.loads((out / "p_Report.json").read_text())
    (model,) = rep["extra"]["models"]
    assert model["architecture"] == "promptreg" and model["role"] == "promptreg network"
    assert model["tasks"] == TASKS and model["folder"] == str(tmp_path / "net")
    assert rep["extra"]["working_grid"]["size"] == [16, 16, 16]  # promptreg.input_shape overrides the network's
    assert rep["config"]["promptreg"]["io"] == "none" and rep["config"]["inverse_grid"] == "moving"
    assert rep["metrics"]["inverse_consistency_mm"]["source"] == "promptreg"
    weights = rep["extra"]["method"]["fusion_weights"]  # the predicted task mixture of this pair
    assert list(weights) == TASKS and sum(weights.values()) == pytest.approx(1.0, abs=1e-6)


def test_cli_flags_reach_the_promptreg_config(tmp_path):
    res = invoke("config", "show", "--method", "promptreg", "--modality", "ct", "--io", "none", "--io-iters", "7",
                 "--json")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)["promptreg"]
    assert (cfg["modality"], cfg["io"], cfg["io_iterations"]) == ("ct", "none", 7)
    assert json.loads(res.stdout)["foundation"]["modality"] == "mri"  # untouched
    (tmp_path / "c.yaml").write_text("method: promptreg\n")  # the method from the file routes the flags too
    res = invoke("config", "show", "--config", tmp_path / "c.yaml", "--modality", "ct", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["promptreg"]["modality"] == "ct"
    res = invoke("config", "show", "--method", "promptreg", "--iterations", "8x4")
    assert res.exit_code == 7


def test_missing_weights_and_network_io_are_one_line_errors(tmp_path):
    f = write(make_phantom("LPS"), tmp_path / "f.nii.gz")
    m = write(make_phantom("LPS", transform=lambda p: p + SHIFT), tmp_path / "m.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "c.yaml").write_text(f"promptreg: {{weights: {tmp_path / 'absent'}}}\n")
    res = invoke("register", f, m, "-o", f"{out}/p_", "--method", "promptreg", "--config", tmp_path / "c.yaml",
                 "--quiet")
    assert res.exit_code == 8
    assert "absent" in one_line(res.stderr)
    assert not list(out.iterdir())  # nothing written

    res = invoke("register", f, m, "-o", f"{out}/p_", "--method", "promptreg", "--io", "network", "--quiet")
    assert res.exit_code == 7
    assert "--io network" in one_line(res.stderr) and "promptreg" in one_line(res.stderr)
    assert not list(out.iterdir())
