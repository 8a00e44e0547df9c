"""RELIABILITY N3: ``precision: float64`` runs the classical solvers in float64; geometry is float64 either way.

What the rows below check (measured values in each docstring, on 2 threads):

* the affine stage and the deformable methods (convexadam, samconvex) give the same answer in both precisions on a
  phantom pair (field, landmarks mapped through the whole transform), and the float64 run really is float64;
* the instance optimisation is equivalent in both precisions from a start off the trilinear interpolation nodes,
  and from a start on them (where the discrete stages' whole-voxel shifts put every sample) once the start goes
  through ``off_nodes`` as the methods do: at a node the gradient is one-sided and the last bit of the coordinate
  decides the side (docs/conventions.md, "Solver precision");
* the network methods refuse float64; the written warps are float32 files in both precisions; a float64 field
  warps images like its float32 copy;
* index/world/normalised coordinates of a 500 mm field of view 1e4 mm from the origin keep float64 precision.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydantic import ValidationError

from conftest import DIRECTIONS, as_image, make_phantom, write
from regcli.config import RegisterConfig
from regcli.pipeline import RegisterInputs, register_images, run_register
from test_pipeline import _cfg

SHIFT = np.array([1.0, -0.5, 0.5])  # moving(y) = phantom(y + SHIFT), world mm
# landmarks inside the phantom's body (blob centres, the L marker, the axes), world LPS mm
LANDMARKS = torch.tensor([(-6, -4, 2), (5, 3, -3), (0, 6, 4), (-4, 5, -4), (7, -6, 3), (4, 8, 6), (11, 8, 6),
                          (11, 3, 6), (0, 0, 0), (10, 0, 0), (-10, 0, 0), (0, 9, 0), (0, -9, 0), (0, 0, 8),
                          (0, 0, -8)], dtype=torch.float64)


def _config(precision: str, method: str = "convexadam", **over) -> RegisterConfig:
    return RegisterConfig.model_validate({"method": method, "precision": precision, **over})


@pytest.fixture(scope="module")
def shifted_pair():
    """Oblique 1 mm phantom and its copy with the content shifted by SHIFT, as regcli Images."""
    fixed = make_phantom("oblique15", "iso")
    moving = make_phantom("oblique15", "iso", transform=lambda p: p + SHIFT)
    return as_image(fixed), as_image(moving)


# ------------------------------------------------------------------------------------------ deformable methods
@pytest.mark.parametrize("method", ["convexadam", "samconvex"])
def test_n3_deformable_float64_matches_float32(shifted_pair, method):
    """Affine stage + method in both precisions (default settings): the fields on the fixed grid differ by < 0.05 mm
    on average and the landmarks mapped through the whole transform by < 0.05 mm; the float64 run's fields are
    float64 (the solver ran in float64), the float32 run's float32.

    Measured: convexadam field mean 0.002 mm, landmarks max 0.031 mm; samconvex 0.009 mm and 0.010 mm. On brains
    the affine stage (not converged that far) and SAMConvex's discrete pyramid keep the two apart by about 0.1 mm
    (docs/conventions.md, "Reproducibility")."""
    fixed, moving = shifted_pair
    regs = {p: register_images(fixed, moving, _config(p, method)) for p in ("float32", "float64")}
    r32, r64 = regs["float32"], regs["float64"]
    assert r32.field.disp.dtype == torch.float32 and r32.inverse_field.disp.dtype == torch.float32
    assert r64.field.disp.dtype == torch.float64 and r64.inverse_field.disp.dtype == torch.float64
    diff = (r32.field.disp.double() - r64.field.disp).norm(dim=0)
    assert float(diff.mean()) < 0.05, float(diff.mean())
    tre = (r32.transform.map_points(LANDMARKS) - r64.transform.map_points(LANDMARKS)).norm(dim=-1)
    assert float(tre.max()) < 0.05, tre.max()


# ------------------------------------------------------------------------------------------ the IO solver alone
def _io_field(network_pair, dtype: torch.dtype, start_mm, off_node: bool = False) -> torch.Tensor:
    """ConvexAdam's instance optimisation (MIND-SSC pooled by 2, default settings, 80 iterations) of the pair on a
    2 mm working grid, from the constant displacement ``start_mm`` (x, y, z); with ``off_node``, posed off the
    interpolation nodes by ``off_nodes`` as the methods do."""
    from regcli.features.intensity import smooth_for
    from regcli.features.mind import mind_ssc
    from regcli.methods.convexadam import _pool, off_nodes
    from regcli.resample import resample_to_grid
    from regcli.solvers.instance import Problem, solver_from_config

    fixed, moving = network_pair
    work = fixed.grid.with_spacing(2.0)
    feats = []
    for image in (fixed, moving):
        data = resample_to_grid(smooth_for(image, 2.0), work).data.to(dtype)
        feats.append(_pool(mind_ssc(data[None, None], 1, 2), work, 2))
    (f, grid), (m, _) = feats
    start = torch.tensor(start_mm, dtype=dtype)[:, None, None, None].expand(3, *grid.shape).clone()
    shift = 0.0
    if off_node:
        f, start, shift = off_nodes(f, start, grid)
    icfg = RegisterConfig().instance
    solver = solver_from_config(icfg, iterations=icfg.iterations, lr=icfg.learning_rate, reg_weight=icfg.reg_weight,
                                smoothing_passes=icfg.smoothing_passes)
    result = solver.run(Problem(f[0], m[0], grid, grid), init=start)
    assert result.disp.dtype == dtype
    return (result.disp - shift).double()


def test_n3_io_from_off_node_start_is_equivalent(network_pair):
    """From a start that puts no sample on a node of the trilinear interpolation, float32 and float64 instance
    optimisations agree to 1e-3 mm everywhere (measured: 1.2e-6 mm max): the solver itself is equivalent."""
    start = (0.1234, -0.0567, 0.0891)
    diff = (_io_field(network_pair, torch.float32, start) - _io_field(network_pair, torch.float64, start)).norm(dim=0)
    assert float(diff.max()) < 1e-3, float(diff.max())


def test_n3_io_started_on_interpolation_nodes_is_moved_off_them(network_pair):
    """From zero (every sample on a node of the trilinear interpolation, as where the discrete stages give
    whole-voxel shifts), the two precisions agree once the start goes through ``off_nodes`` as the methods do.
    Without it the gradient at a node is one-sided, the last bit of the sampling coordinate picks the side, and
    Adam's first (sign-like) steps differ: measured max 1.4 mm, mean 0.05 mm; with it max 2.5e-6 mm."""
    fields = {d: _io_field(network_pair, d, (0.0, 0.0, 0.0), True) for d in (torch.float32, torch.float64)}
    diff = (fields[torch.float32] - fields[torch.float64]).norm(dim=0)
    assert float(diff.max()) < 0.05, float(diff.max())


# ------------------------------------------------------------------------------------------ affine stage
def test_n3_affine_stage_float64_matches_float32(monkeypatch):
    """The affine stage (defaults: moments init, rigid + affine, LNCC) on an oblique anisotropic phantom and a rotated,
    shifted copy: matrices within 1e-3 and translations within 0.05 mm (measured: 1.6e-7 and 1.7e-5 mm), and the float64
    stage's solver really ran on float64 data and displacements."""
    from regcli.config import AffineConfig
    from regcli.solvers import instance
    from regcli.solvers.affine import run_affine_stage

    R = np.asarray(sitk.VersorTransform((0.3, -0.2, 0.9), np.radians(6.0)).GetMatrix()).reshape(3, 3)
    fixed = as_image(make_phantom("oblique15", "aniso"))
    moving = as_image(make_phantom("oblique15", "aniso", transform=lambda p: p @ R.T + np.array([2.0, -1.0, 1.5])))
    seen = []
    run = instance.InstanceOptimization.run

    def spy(self, problem, init=None, model=None):
        result = run(self, problem, init, model)
        seen.append((problem.fixed.dtype, result.disp.dtype))
        return result

    monkeypatch.setattr(instance.InstanceOptimization, "run", spy)
    A = {}
    for dtype in (torch.float32, torch.float64):
        seen.clear()
        A[dtype] = run_affine_stage(fixed, moving, AffineConfig(), dtype=dtype).transform.matrix
        assert seen and set(seen) == {(dtype, dtype)}, seen
    assert np.abs(A[torch.float32][:3, :3] - A[torch.float64][:3, :3]).max() < 1e-3
    assert np.abs(A[torch.float32][:3, 3] - A[torch.float64][:3, 3]).max() < 0.05


# ------------------------------------------------------------------------------------------ network methods
@pytest.mark.parametrize("method", ["dio", "foundation", "promptreg"])
def test_n3_network_methods_refuse_float64(method):
    """The networks run in float32: float64 is refused at validation with one line naming the fix."""
    assert _config("float32", method).precision == "float32"
    with pytest.raises(ValidationError, match="runs a network in float32: use precision float32"):
        _config("float64", method)


def test_n3_cli_refuses_float64_for_a_network_method(tmp_path):
    from conftest import invoke
    from regcli.errors import ConfigError

    f = write(make_phantom("LPS", "iso"), tmp_path / "f.nii.gz")
    res = invoke("register", f, f, "-o", tmp_path / "out_", "--method", "dio", "--precision", "float64")
    assert res.exit_code == ConfigError.exit_code, res.output
    assert "use precision float32" in res.output
    assert not list(tmp_path.glob("out_*"))


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_n3_written_warps_are_float32(tmp_path, precision):
    """``prefix1Warp`` and ``prefix1InverseWarp`` are float32 vector images whatever the solver's precision, and the
    report echoes the precision."""
    f = write(make_phantom("oblique15", "iso"), tmp_path / "f.nii.gz")
    m = write(make_phantom("oblique15", "iso", transform=lambda p: p + SHIFT), tmp_path / "m.nii.gz")
    cfg = _cfg(precision=precision, write_warped=False)
    run_register(RegisterInputs(f, m, str(tmp_path / "p_")), cfg)
    for name in ("p_1Warp.nii.gz", "p_1InverseWarp.nii.gz"):
        img = sitk.ReadImage(str(tmp_path / name))
        assert img.GetPixelID() == sitk.sitkVectorFloat32 and img.GetNumberOfComponentsPerPixel() == 3, name
    assert json.loads((tmp_path / "p_Report.json").read_text())["config"]["precision"] == precision


def test_n3_float64_field_warps_like_its_float32_copy(shifted_pair):
    """Resampling through a float64 field (and composing it with an affine) gives what its float32 copy gives."""
    from regcli.resample import upsample_field, warp
    from regcli.spaces import Grid
    from regcli.transforms import AffineTransform, CompositeTransform, DisplacementField

    fixed, moving = shifted_pair
    x = fixed.grid.world_coords()
    u64 = torch.stack([1.5 * torch.sin(x[..., 1] / 9), 1.0 * torch.cos(x[..., 2] / 7), 0.8 * torch.sin(x[..., 0] / 8)])
    affine = AffineTransform.from_linear(np.eye(3), SHIFT, fixed.grid.center_world())
    out = {}
    for dtype in (torch.float32, torch.float64):
        field = DisplacementField(u64.to(dtype), fixed.grid)
        tx = CompositeTransform([field, affine])
        out[dtype] = (warp(moving, tx, fixed.grid).data, tx.map_points(LANDMARKS))
    assert out[torch.float64][0].dtype == torch.float32
    assert float((out[torch.float32][0] - out[torch.float64][0]).abs().max()) < 1e-5
    assert float((out[torch.float32][1] - out[torch.float64][1]).abs().max()) < 1e-5
    # a coarse field brought to an oblique grid (grid_sample, not the separable path) keeps float64
    up = upsample_field(u64, fixed.grid, Grid.from_sitk(make_phantom("PIL", "iso")))
    assert up.dtype == torch.float64 and bool(torch.isfinite(up).all())


# ------------------------------------------------------------------------------------------ geometry
def test_n3_geometry_is_float64_for_a_500mm_field_of_view_far_from_the_origin():
    """Grid matrices are float64 and composed before the single cast: the normalised coordinates of the voxel
    centres of a 500 mm oblique grid whose origin is ~1e4 mm away are exact to 1e-9 mm in float64 and to the float32
    rounding of the result (measured 7e-6 mm) after the cast; the same maths in float32 is off by 2e-3 mm."""
    from regcli.resample import FieldWarper
    from regcli.spaces import Grid

    g = Grid((51, 47, 43), (10.0, 10.5, 11.0), (1.0e4, -1.2e4, 0.9e4), tuple(DIRECTIONS["oblique15"].ravel()))
    assert min(n * s for n, s in zip(g.size, g.spacing)) > 450
    for M in (g.index_to_world(), g.world_to_index(), g.world_to_norm(), g.index_to_norm()):
        assert M.dtype == np.float64
    idx = g.index_coords(torch.float64)
    n = torch.tensor(g.size, dtype=torch.float64)
    exact = -1.0 + 2.0 * idx / (n - 1.0)
    to_mm = (n - 1.0) / 2.0 * torch.tensor(g.spacing, dtype=torch.float64)  # normalised units -> mm, per axis

    def err_mm(norm: torch.Tensor) -> float:
        return float(((norm.double() - exact) * to_mm).abs().max())

    assert g.world_coords().dtype == torch.float64
    assert err_mm(g.world_to_norm_points(g.world_coords())) < 1e-9
    assert err_mm(FieldWarper(g, g, dtype=torch.float64).base[0]) < 1e-9
    assert err_mm(FieldWarper(g, g).base[0]) < 1e-4  # float32 coordinates: only the final cast rounds
