"""Label and landmark prompts for the instance-optimisation solver (regcli.solvers.prompts)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DIRECTIONS, SPACINGS, centred_origin, make_phantom, phantom_labels, render
from regcli.errors import InputError
from regcli.resample import sample_at_world, warp
from regcli.solvers.instance import InstanceOptimization, Problem
from regcli.solvers.prompts import LabelPrompt, LandmarkPrompt, stage_prompts
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.transforms.affine import AffineTransform
from regcli.transforms.composite import CompositeTransform
from regcli.transforms.displacement import DisplacementField

FREEFORM = "freeform"


# --------------------------------------------------------------------------------------------- fixtures
def ellipsoid_labels(p: np.ndarray) -> np.ndarray:
    """Analytic label map at world points (..., 3): 1 body, 2 and 3 two blobs inside it (float32)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    out = np.zeros(p.shape[:-1], np.float32)
    out[(x / 17.0) ** 2 + (y / 14.0) ** 2 + (z / 12.0) ** 2 < 1.0] = 1
    out[((x + 6) / 6.0) ** 2 + ((y + 4) / 5.0) ** 2 + ((z - 2) / 5.0) ** 2 < 1.0] = 2
    out[((x - 5) / 5.0) ** 2 + ((y - 3) / 6.0) ** 2 + ((z + 3) / 4.5) ** 2 < 1.0] = 3
    return out


def labels_image(img: sitk.Image, name: str = "") -> Image:
    """(Z, Y, X) int32 label Image of a SimpleITK image."""
    arr = np.rint(sitk.GetArrayFromImage(img)).astype(np.int32)
    return Image(torch.from_numpy(arr), Grid.from_sitk(img), name)


def render_labels(direction="LPS", spacing="iso", transform=None, fn=ellipsoid_labels, size=None) -> Image:
    """``fn`` rendered as labels on a phantom-like grid (about 48 x 44 x 40 mm, non-zero origin)."""
    D = DIRECTIONS[direction]
    sp = SPACINGS[spacing] if isinstance(spacing, str) else tuple(spacing)
    if size is None:
        axis_world = np.argmax(np.abs(D), axis=0)
        size = [int(round(e / s)) for e, s in zip(np.array([48.0, 44.0, 40.0])[axis_world], sp)]
    origin = centred_origin(size, sp, D, (1.5, -2.0, 3.0))
    return labels_image(render(size, sp, origin, D, fn=fn, transform=transform), f"labels-{direction}-{spacing}")


def constant_disp(u, grid: Grid, requires_grad: bool = False) -> torch.Tensor:
    """(1, 3, Z, Y, X) float32 constant displacement ``u`` (mm) on ``grid``."""
    d = torch.tensor(np.asarray(u, dtype=np.float32)).view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape).contiguous()
    return d.requires_grad_(requires_grad)


def smooth_random_disp(grid: Grid, amplitude_mm: float, seed: int = 0) -> torch.Tensor:
    """(1, 3, Z, Y, X) float32 smooth random displacement (mm) of about ``amplitude_mm``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, 4, 4, 4), generator=g)
    d = torch.nn.functional.interpolate(coarse, size=grid.shape, mode="trilinear", align_corners=True)
    return (d / d.abs().max() * amplitude_mm).contiguous()


def directional_check(loss_fn, disp: torch.Tensor, direction: torch.Tensor, h: float) -> tuple[float, float]:
    """(autograd directional derivative, central finite difference) of ``loss_fn`` at ``disp`` along ``direction``."""
    d = disp.detach().clone().requires_grad_(True)
    loss_fn(d).backward()
    analytic = float((d.grad * direction).sum())
    with torch.no_grad():
        numeric = (float(loss_fn(disp + h * direction)) - float(loss_fn(disp - h * direction))) / (2 * h)
    return analytic, numeric


# --------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize("direction,spacing", [("oblique15", "aniso"), ("PIL", "iso")])
def test_label_loss_zero_for_identical_maps_and_finite_gradient(direction, spacing):
    labels = labels_image(phantom_labels(make_phantom(direction, spacing)))
    prompt = LabelPrompt(labels, labels, None)
    assert prompt.labels == [1, 2, 3]
    for grid in (labels.grid, labels.grid.with_spacing(2.0)):  # the label grid and a coarser IO grid
        zero = constant_disp((0, 0, 0), grid, requires_grad=True)
        loss = prompt.loss(zero, grid)
        assert float(loss.detach()) < 1e-5, (grid.describe(), float(loss.detach()))
        loss.backward()
        assert torch.isfinite(zero.grad).all()
        assert float(zero.grad.abs().max()) < 1e-4  # identical maps are the optimum
    # away from the optimum the gradient is finite, non-zero, and matches finite differences
    grid = labels.grid.with_spacing(2.0)
    disp = smooth_random_disp(grid, 2.0)
    d = disp.clone().requires_grad_(True)
    prompt.loss(d, grid).backward()
    assert torch.isfinite(d.grad).all() and float(d.grad.abs().max()) > 0
    direction_ = smooth_random_disp(grid, 1.0, seed=1)
    analytic, numeric = directional_check(lambda x: prompt.loss(x, grid), disp, direction_, 0.05)
    assert analytic == pytest.approx(numeric, rel=0.05, abs=1e-5)


def test_label_loss_follows_physical_space():
    """The same physical label maps on different grids (permuted, oblique, anisotropic) give the same loss
    for the same world-space displacement, and the loss is lowest at the true shift (sign per axis)."""
    shift = np.array([3.0, -2.0, 1.5])  # moving = fixed object moved by +shift: u = +shift aligns them

    def moved(p):
        return p - shift

    fixed = render_labels("LPS", "iso")
    io_grid = fixed.grid.with_spacing(2.0)
    candidates = [shift, -shift, np.zeros(3), shift * [1, -1, 1], shift * [-1, 1, -1]]

    def losses(fixed_map, moving_map):
        prompt = LabelPrompt(fixed_map, moving_map, [1, 2, 3])
        with torch.no_grad():
            return np.array([float(prompt.loss(constant_disp(u, io_grid), io_grid)) for u in candidates])

    ref = losses(fixed, render_labels("LPS", "iso", moved))
    assert int(np.argmin(ref)) == 0 and ref[0] < 0.02 and min(ref[1:]) > 0.1
    for (fd, fs), (md, ms), tol in [
        (("LPS", "iso"), ("PIL", "iso"), 1e-4),  # permuted/flipped axes: the same samples, exactly
        (("RAS", "iso"), ("LPS", "iso"), 1e-4),
        (("LPS", "iso"), ("oblique15", "iso"), 0.03),  # oblique: other sample positions
        (("oblique15", "aniso"), ("LPS", "iso"), 0.04),  # 3 mm slices: partial volume
        (("LPS", "iso"), ("oblique15", "aniso"), 0.04),
    ]:
        got = losses(render_labels(fd, fs), render_labels(md, ms, moved))
        assert int(np.argmin(got)) == 0, (fd, fs, md, ms, got)
        assert np.abs(got - ref).max() < tol, (fd, fs, md, ms, got, ref)


def test_coarse_io_grid_keeps_small_structure():
    """A structure thinner than an IO voxel keeps (partial) occupancy on a coarse grid (anti-aliasing)."""

    def thin(p):  # a 1.2 mm slab, label 5, inside a big label 1
        out = ellipsoid_labels(p)
        out[(np.abs(p[..., 2] - 3.3) < 0.6) & (out == 1)] = 5
        return out

    labels = render_labels("LPS", "iso", fn=thin)
    prompt = LabelPrompt(labels, labels, [5])
    coarse = labels.grid.with_spacing(4.0)
    f, m, _ = prompt.prepare(coarse)
    vox_fine = float((labels.data == 5).sum()) * float(np.prod(labels.grid.spacing))
    vox_coarse = float(f.sum()) * float(np.prod(coarse.spacing))
    assert vox_coarse == pytest.approx(vox_fine, rel=0.25)  # volume (mm³) kept
    assert float(prompt.loss(constant_disp((0, 0, 0), coarse), coarse)) < 1e-4
    # a 2 mm slide across the slab is seen on the 4 mm grid
    assert float(prompt.loss(constant_disp((0, 0, 2.0), coarse), coarse)) > 0.1


def _body(p: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    r = (x / 17.0) ** 2 + (y / 14.0) ** 2 + (z / 12.0) ** 2
    return (0.3 / (1.0 + np.exp(np.clip((r - 1.0) * 12.0, -50, 50)))).astype(np.float32)


def _blob_labels(centre):
    def fn(p):
        body = ((p[..., 0] / 17.0) ** 2 + (p[..., 1] / 14.0) ** 2 + (p[..., 2] / 12.0) ** 2) < 1.0
        blob = np.sum((p - np.asarray(centre)) ** 2, axis=-1) < 5.0 ** 2
        return (body.astype(np.float32) + blob.astype(np.float32))  # 1 body, 2 blob
    return fn


def test_label_prompt_drives_io_where_the_image_is_blind():
    """Identical images with no trace of a blob that the label maps show shifted by 3.6 mm: with the
    prompt the blob's Dice rises to near 1, without it the IO has no reason to move."""
    D = DIRECTIONS["oblique15"]
    sp, size = (1.5, 1.5, 1.5), (32, 30, 28)
    origin = centred_origin(size, sp, D, (1.0, -1.0, 0.5))
    img = render(size, sp, origin, D, fn=_body)
    grid = Grid.from_sitk(img)
    data = torch.from_numpy(sitk.GetArrayFromImage(img))
    centre, shift = np.array([-2.0, 1.0, 0.0]), np.array([2.5, -2.0, 1.5])
    fixed = labels_image(render(size, sp, origin, D, fn=_blob_labels(centre)))
    moving = labels_image(render(size, sp, origin, D, fn=_blob_labels(centre + shift)))

    def blob_dice(disp):
        w = warp(moving, DisplacementField(disp, grid), grid, "nearest").data
        a, b = fixed.data == 2, w == 2
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    before = blob_dice(torch.zeros((3, *grid.shape)))
    assert before < 0.6
    result = {}
    for use in (False, True):
        prompts = [LabelPrompt(fixed, moving, [2], weight=1.0)] if use else []
        solver = InstanceOptimization(model=FREEFORM, similarity="mse", optimizer="adam", regularizer="diffusion",
                                      reg_weight=0.05, iterations=60, lr=0.3, model_params={"smoothing_passes": 2})
        res = solver.run(Problem(data, data, grid, grid, prompts=prompts))
        result[use] = (blob_dice(res.disp), res.history)
    assert result[False][0] < before + 0.05
    assert result[True][0] > 0.9 and result[True][0] > before + 0.3
    hist = result[True][1]
    assert "labels" in hist[-1] and hist[-1]["labels"] < 0.5 * hist[0]["labels"]


def test_unknown_label_ids_are_an_input_error():
    fixed = render_labels("LPS", "iso")
    moving = Image(torch.where(fixed.data == 3, 0, fixed.data), fixed.grid, "moving.nii.gz")
    with pytest.raises(InputError) as err:
        LabelPrompt(fixed, moving, [1, 3, 7, 9])
    msg = err.value.one_line()
    assert "\n" not in msg and "7, 9" in msg and "3" in msg and "moving.nii.gz" in msg
    with pytest.raises(InputError, match="3D integer"):
        LabelPrompt(Image(fixed.data.float(), fixed.grid), moving, None)
    assert LabelPrompt(fixed, moving, None).labels == [1, 2]  # default: common ids > 0


# --------------------------------------------------------------------------------------------- landmarks
def _landmark_grid() -> Grid:
    D = DIRECTIONS["oblique15"]
    sp, size = (2.0, 2.0, 3.0), (24, 22, 16)
    return Grid(size, sp, tuple(centred_origin(size, sp, D, (5.0, -3.0, 2.0))), tuple(D.ravel()))


def _points_inside(grid: Grid, n: int, seed: int = 0, margin: float = 4.0) -> np.ndarray:
    idx = np.random.default_rng(seed).uniform(margin, np.asarray(grid.size) - 1 - margin, (n, 3))
    return (grid.index_to_world() @ np.c_[idx, np.ones(n)].T).T[:, :3]


def test_landmark_prompt_recovers_translation():
    """Flat images, landmarks only: IO moves the landmarks by the known translation (< 0.5 mm)."""
    grid = _landmark_grid()
    p = _points_inside(grid, 12)
    t = np.array([2.5, -1.5, 1.0])
    prompt = LandmarkPrompt(p, p + t)
    flat = torch.zeros(grid.shape)
    solver = InstanceOptimization(model=FREEFORM, similarity="mse", optimizer="adam", regularizer="diffusion",
                                  reg_weight=0.1, iterations=60, lr=0.5, model_params={"smoothing_passes": 2})
    res = solver.run(Problem(flat, flat, grid, prompts=[prompt]))
    u = sample_at_world(res.disp, grid, torch.from_numpy(p)).T.numpy()  # (P, 3) mm
    err = np.linalg.norm(u - t, axis=1)
    assert err.max() < 0.5, err
    assert res.history[0]["landmarks"] == pytest.approx(float(np.sum(t ** 2)), rel=1e-4)  # mm² at u = 0
    assert res.history[-1]["landmarks"] < 0.05


def test_landmark_loss_value_gradient_and_outside():
    grid = _landmark_grid()
    p = _points_inside(grid, 7, seed=3)
    q = p + np.random.default_rng(4).normal(0, 2.0, p.shape)
    prompt = LandmarkPrompt(p, q, scale_mm=2.0)
    disp = smooth_random_disp(grid, 3.0)
    # value: against SimpleITK's own interpolation of the field at the landmarks
    tx = DisplacementField(disp[0], grid).to_sitk_transform()
    mapped = np.array([tx.TransformPoint(tuple(pt)) for pt in p])
    expected = np.mean(np.sum((mapped - q) ** 2, axis=1)) / 2.0 ** 2
    assert float(prompt.loss(disp, grid)) == pytest.approx(expected, rel=1e-4)
    # gradient: the loss is quadratic in disp, so central differences are exact up to float rounding
    direction_ = smooth_random_disp(grid, 1.0, seed=5)
    analytic, numeric = directional_check(lambda x: prompt.loss(x, grid), disp, direction_, 0.1)
    assert analytic == pytest.approx(numeric, rel=1e-3)
    # trilinear weights sum to 1: the gradient summed over voxels is 2 * mean residual / scale²
    d = disp.clone().requires_grad_(True)
    prompt.loss(d, grid).backward()
    r = prompt.residuals(disp, grid).double().numpy()
    np.testing.assert_allclose(d.grad.sum(dim=(0, 2, 3, 4)).double().numpy(), 2 * r.mean(0) / 4.0, rtol=1e-4,
                               atol=1e-7)
    # a landmark outside the grid is counted and clamped to the border, the loss stays finite
    far = grid.index_to_world() @ np.array([grid.size[0] + 5.0, 3.0, 3.0, 1.0])
    out = LandmarkPrompt(np.vstack([p, far[:3]]), np.vstack([q, far[:3]]))
    assert out.outside(grid) == 1 and prompt.outside(grid) == 0
    assert math.isfinite(float(out.loss(disp, grid)))
    with pytest.raises(InputError, match="pair up"):
        LandmarkPrompt(p, q[:3])
    with pytest.raises(InputError, match=r"\(P, 3\)"):
        LandmarkPrompt(p[:, :2], q[:, :2])


# --------------------------------------------------------------------------------------------- staging
def test_stage_prompts_with_an_affine():
    """Moving maps/landmarks made with a known [u, A]: stage_prompts puts them where the deformable stage
    sees them, so u = the true deformation is the prompts' optimum and the composite maps p onto q."""
    centre = np.array([1.0, -2.0, 3.0])
    R = np.asarray(sitk.VersorTransform((0.2, 0.3, 0.93), math.radians(12)).GetMatrix()).reshape(3, 3)
    A = AffineTransform.from_linear(R @ np.diag([1.05, 0.97, 1.0]), (4.0, -3.0, 2.5), centre)
    t = np.array([2.0, -1.5, 1.0])  # the deformable part: u = t (constant)
    A_inv = A.inverse()

    def moving_of(p):  # moving point y holds the fixed object at [u, A]^-1 (y) = A^-1(y) - t
        return A_inv.map_points(torch.from_numpy(p)).numpy() - t

    fixed = render_labels("LPS", "iso")
    moving = render_labels("PIL", (1.2, 1.2, 1.2), moving_of)
    p = _points_inside(fixed.grid, 9)
    truth = CompositeTransform([DisplacementField(constant_disp(t, fixed.grid)[0], fixed.grid), A])
    q = truth.map_points(torch.from_numpy(p)).numpy()  # moving landmarks, original moving space
    assert np.abs(q - (A.map_points(torch.from_numpy(p + t)).numpy())).max() < 1e-5  # float32 field

    io_grid = fixed.grid.with_spacing(2.0)
    prompts = stage_prompts(fixed, moving, None, p, q, A, 1.0, 1.0, grid=fixed.grid)
    labels, marks = prompts
    assert isinstance(labels, LabelPrompt) and isinstance(marks, LandmarkPrompt)
    assert labels.labels == [1, 2, 3]
    with torch.no_grad():
        at_t = float(labels.loss(constant_disp(t, io_grid), io_grid))
        at_0 = float(labels.loss(constant_disp((0, 0, 0), io_grid), io_grid))
        at_minus = float(labels.loss(constant_disp(-t, io_grid), io_grid))
        assert at_t < 0.03 and at_0 > at_t + 0.05 and at_minus > at_0
        assert float(marks.loss(constant_disp(t, io_grid), io_grid)) < 1e-6  # mm²
        assert float(marks.loss(constant_disp((0, 0, 0), io_grid), io_grid)) == pytest.approx(np.sum(t ** 2), rel=1e-4)
    # forgetting the affine (identity) leaves both far from their optimum at the true u
    wrong = stage_prompts(fixed, moving, None, p, q, None, 1.0, 1.0, grid=fixed.grid)
    with torch.no_grad():
        assert float(wrong[0].loss(constant_disp(t, io_grid), io_grid)) > at_t + 0.2
        assert float(wrong[1].loss(constant_disp(t, io_grid), io_grid)) > 4.0


def test_stage_prompts_pairs_and_weights():
    """The inputs given decide which prompts are built (a weight never leaves one out: check_prompts refuses a
    weight of 0 up front), each with its weight; negative weights are a ConfigError."""
    from regcli.errors import ConfigError

    fixed = render_labels("LPS", "iso")
    p = _points_inside(fixed.grid, 3)
    assert stage_prompts(None, None, None, None, None, None, 1.0, 1.0) == []
    with pytest.raises(InputError, match="moving"):
        stage_prompts(fixed, None, None, None, None, None, 1.0, 1.0)
    with pytest.raises(InputError, match="landmark"):
        stage_prompts(None, None, None, p, None, None, 1.0, 1.0)
    only = stage_prompts(None, None, None, p, p, AffineTransform.identity(), 0.3, 2.5)
    assert len(only) == 1 and isinstance(only[0], LandmarkPrompt) and only[0].weight == 2.5
    only = stage_prompts(fixed, fixed, [2], None, None, AffineTransform.identity(), 0.3, 2.5)
    assert len(only) == 1 and isinstance(only[0], LabelPrompt) and only[0].weight == 0.3
    both = stage_prompts(fixed, fixed, [2], p, p, AffineTransform.identity(), 0.0, 2.5)
    assert [type(x) for x in both] == [LabelPrompt, LandmarkPrompt] and [x.weight for x in both] == [0.0, 2.5]
    for weights in ((-0.1, 1.0), (1.0, -1.0)):
        with pytest.raises(ConfigError, match="must be >= 0"):
            stage_prompts(fixed, fixed, [2], p, p, None, *weights)
    same = stage_prompts(fixed, fixed, [2], None, None, AffineTransform.identity(), 1.0, 1.0)
    assert same[0].moving is fixed  # identity affine, same grid: used as is
    with pytest.raises(InputError, match="9"):
        stage_prompts(fixed, fixed, [2, 9], None, None, AffineTransform.translation((1, 0, 0)), 1.0, 1.0)


# --------------------------------------------------------------------------------------------- messages
def test_prompt_messages_name_the_method_where_it_was_set(tmp_path):
    """A prompt that nothing would use is refused with the method named as the user set it: `method: dio` in the
    --config file (not "--method dio", which they never typed), --method when the flag gave it (or by default), and
    a network method's io as --io or as its config key; the recorded origin changes neither the configuration's
    equality nor its dump."""
    from conftest import invoke, one_line, write
    from regcli.config import build_config

    f = write(make_phantom("LPS"), tmp_path / "f.nii.gz")
    configs = {"affine": "method: affine\n", "dio": "method: dio\ndio: {iterations: [0, 0, 0]}\n",
               "foundation": "method: foundation\nfoundation: {io: none}\n", "no_io": "instance: {enabled: false}\n"}
    for name, text in configs.items():
        (tmp_path / f"{name}.yaml").write_text(text)

    def refused(*args: str) -> str:
        res = invoke("register", f, f, "-o", tmp_path / "o_", *args, "--quiet")
        line = one_line(res.stderr)
        assert res.exit_code == 7 and line.startswith("ConfigError: prompts (--prompt-"), line
        assert "nothing would use them" in line, line
        return line

    y = {name: tmp_path / f"{name}.yaml" for name in configs}
    line = refused("--config", y["affine"], "--prompt-landmarks")
    assert f"need a deformable method: `method: affine` in '{y['affine']}' has only the affine stage" in line, line
    assert "--method" not in line
    line = refused("--config", y["dio"], "--prompt-labels", "1")
    assert f"`method: dio` in '{y['dio']}' with dio.iterations 0x0x0 runs none of them" in line, line
    assert "--method" not in line
    line = refused("--config", y["foundation"], "--prompt-labels", "1")
    assert f"`method: foundation` in '{y['foundation']}' with foundation.io none runs none" in line, line
    line = refused("--config", y["foundation"], "--io", "none", "--prompt-labels", "1")
    assert f"`method: foundation` in '{y['foundation']}' with --io none runs none" in line, line
    # the flag wins over the file, and is named
    assert "; --method dio with dio.iterations 0x0x0 runs none" in refused("--method", "dio", "--config", y["dio"],
                                                                           "--prompt-labels", "1")
    assert "--method affine has only the affine stage" in refused("--method", "affine", "--prompt-landmarks")
    assert "--method foundation --io none runs none" in refused("--method", "foundation", "--io", "none",
                                                                "--prompt-landmarks")
    # no method anywhere: the default of --method
    assert "; --method convexadam with instance.enabled false runs none" in refused("--config", y["no_io"],
                                                                                  "--prompt-landmarks")
    # --iterations that do not fit the method from the file say so too
    res = invoke("register", f, f, "-o", tmp_path / "o_", "--config", y["dio"], "--iterations", "5", "--quiet")
    assert res.exit_code == 7 and f"`method: dio` in '{y['dio']}' needs one count per solver level" in res.stderr
    assert not list(tmp_path.glob("o_*"))

    from_file, from_flag = build_config(y["dio"]), build_config(None, {"method": "dio",
                                                                      "dio": {"iterations": (0, 0, 0)}})
    assert from_file.method_origin != from_flag.method_origin
    assert from_file == from_flag and hash(from_file) == hash(from_flag)
    assert "method_origin" not in from_file.model_dump() and "method_origin" not in str(from_file.model_json_schema())
