"""``--method foundation``: the GradICON network in physical space, its inverse, and both kinds of IO.

The oracle tests compare with the reference packages (see tests/test_gradicon.py for how to install them).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import (
    NETWORK_SHIFT, as_image, has_antspyx, invoke, make_phantom, one_line, phantom_labels, random_state, write,
)
from regcli.config import build_config
from regcli.methods.foundation import map_to_world, prepare_intensities
from regcli.models.gradicon import GradICONConfig, GradICONNet, gradicon_loss, save_gradicon_model
from regcli.pipeline import register_images
from regcli.spaces.grid import Grid

SMALL = GradICONConfig(input_shape=(40, 40, 40), down_channels=(4, 8, 8, 16), up_channels=(4, 4, 8, 8))
SHIFT = NETWORK_SHIFT


@pytest.fixture(scope="module")
def pair(network_pair):
    return network_pair


def _translation_net(grid: Grid, world_mm: np.ndarray) -> GradICONNet:
    """A network whose map is the constant displacement ``world_mm`` on the network grid over ``grid``: every
    step's output is zero except the last one's, whose last convolution has only a bias."""
    net = GradICONNet(SMALL)
    work = grid.with_size(tuple(reversed(SMALL.input_shape)))
    index = np.linalg.solve(work.index_to_world()[:3, :3], world_mm)  # voxels, x, y, z
    d = index / (np.array(work.size) - 1)  # [0, 1] units, x, y, z
    with torch.no_grad():
        net.netPsi.net.lastConv.bias.copy_(torch.tensor(d[::-1].copy() * 10, dtype=torch.float32))
    return net.eval()


def _config(folder, **foundation):
    return build_config(None, {"method": "foundation", "affine": {"enabled": False}, "html_report": False,
                               "foundation": {"weights": str(folder), **foundation}})


def test_map_to_world_reorders_and_scales_on_an_oblique_anisotropic_grid():
    D = np.asarray(sitk.VersorTransform((0.3, 0.2, 0.93), 0.4).GetMatrix()).reshape(3, 3)
    g = Grid((5, 7, 9), (1.5, 2.0, 0.5), (1.0, 2.0, 3.0), tuple(D.ravel()))
    d = torch.zeros(3, 9, 7, 5)
    d[0] = 0.25  # along tensor axis 0 = index z: a quarter of the grid's z extent
    u = map_to_world(d, g)
    expected = D[:, 2] * 0.5 * (9 - 1) * 0.25
    assert torch.allclose(u[:, 4, 3, 2], torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_prepare_intensities_follows_unigradicon():
    x = torch.tensor([-3000.0, -1000.0, 0.0, 1000.0, 2500.0])
    assert prepare_intensities(x, "ct").tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    mri = torch.arange(1000, dtype=torch.float32)
    out = prepare_intensities(mri, "mri")  # [min, 99th percentile (k-th smallest, k = 990)] -> [0, 1]
    assert out[0] == 0 and out[989] == 1 and out[-1] == 1 and abs(float(out[500]) - 500 / 989) < 1e-6
    from regcli.errors import InputError

    with pytest.raises(InputError, match="intensity window of --method foundation is empty"):
        prepare_intensities(torch.ones(10), "mri")


def test_constant_map_becomes_the_known_physical_displacement(pair, tmp_path):
    """Network grid, [0, 1] maps, sign (fixed -> moving) and LPS conversion, through the whole pipeline."""
    fixed, moving = pair
    save_gradicon_model(_translation_net(fixed.grid, -SHIFT), tmp_path / "m", "# test")
    reg = register_images(fixed, moving, _config(tmp_path / "m", io="none", inverse="fixed_point"))
    assert reg.working_grid.size == (40, 40, 40) and reg.working_grid.extent_mm == pytest.approx(fixed.grid.extent_mm)
    u = reg.field.disp.reshape(3, -1)
    assert torch.allclose(u, torch.tensor(-SHIFT, dtype=torch.float32)[:, None], atol=1e-4)
    inv = reg.inverse_field.disp.reshape(3, -1)
    assert torch.allclose(inv, torch.tensor(SHIFT, dtype=torch.float32)[:, None], atol=1e-3)
    # the network's own backward map is used by default; here it is the same shift, so it is reported as such
    reg = register_images(fixed, moving, _config(tmp_path / "m", io="none"))
    assert reg.inverse_error["source"] == "foundation"
    assert reg.inverse_error["mean_mm"] == pytest.approx(2 * np.linalg.norm(SHIFT), rel=1e-3)


def test_inverse_warp_lies_on_the_moving_grid(pair, tmp_path):
    """The foundation preset writes the inverse warp on the moving image's grid (uniGradICON's phi_BA), carried
    into the fixed space by the inverse affine; ``inverse_grid: fixed`` keeps ANTs SyN's fixed grid. A moving
    image on another grid (other direction, spacing and field of view): the inverse of the constant shift
    holds over all of it."""
    fixed, _ = pair
    moving = as_image(make_phantom("PIL", "iso", transform=lambda p: p + SHIFT))
    save_gradicon_model(_translation_net(fixed.grid, -SHIFT), tmp_path / "m", "# test")
    reg = register_images(fixed, moving, _config(tmp_path / "m", io="none", inverse="fixed_point"))
    assert reg.inverse_field.grid.allclose(moving.grid) and reg.field.grid == fixed.grid
    inv = reg.inverse_field.disp.reshape(3, -1)
    assert torch.allclose(inv, torch.tensor(SHIFT, dtype=torch.float32)[:, None], atol=1e-3)
    cfg = build_config(None, {"method": "foundation", "inverse_grid": "fixed", "affine": {"enabled": False},
                              "html_report": False, "foundation": {"weights": str(tmp_path / "m"), "io": "none"}})
    assert register_images(fixed, moving, cfg).inverse_field.grid == fixed.grid
    assert build_config(None, {"method": "convexadam"}).inverse_grid == "fixed"  # other methods: ANTs' convention


def test_inverse_fixed_point_is_honoured_after_network_io_and_a_backward_map_that_is_no_inverse_warns(
        pair, tmp_path, caplog):
    """foundation.inverse: fixed_point writes the fixed-point inverse of the forward warp also with --io network
    (which computes the backward map anyway; it was written instead). With inverse: network, a backward map that is
    not the inverse of the forward one (here the same shift instead of the opposite one) is written as such, with a
    warning giving the residual and the option; an inverse backward map gives none."""
    import logging

    fixed, moving = pair
    save_gradicon_model(_translation_net(fixed.grid, -SHIFT), tmp_path / "m", "# test")
    flags = {"io": "network", "io_iterations": 1, "io_learning_rate": 1e-9}
    with caplog.at_level(logging.WARNING, logger="regcli"):
        reg = register_images(fixed, moving, _config(tmp_path / "m", inverse="fixed_point", **flags))
    assert "iterations" in reg.inverse_error and reg.inverse_error["mean_mm"] < 1e-3, reg.inverse_error
    inv = reg.inverse_field.disp.reshape(3, -1)
    assert torch.allclose(inv, torch.tensor(SHIFT, dtype=torch.float32)[:, None], atol=1e-3)
    assert "inverse warp is not the inverse" not in caplog.text
    for io in ("network", "none"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="regcli"):
            reg = register_images(fixed, moving, _config(tmp_path / "m", inverse="network", **{**flags, "io": io}))
        assert reg.inverse_error["source"] == "foundation"
        assert reg.inverse_error["mean_mm"] == pytest.approx(2 * np.linalg.norm(SHIFT), rel=1e-3)
        assert "foundation: its own inverse warp is not the inverse of its forward warp (forward∘inverse mean 7.81 mm" \
            in caplog.text, caplog.text
        assert "foundation.inverse: fixed_point inverts the forward warp instead" in caplog.text
    from regcli.pipeline import _warn_if_not_inverse

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="regcli"):
        _warn_if_not_inverse(_config(tmp_path / "m"), {"mean_mm": 0.03, "p99_mm": 0.1})  # an inverse: no warning
    assert not caplog.records


def test_network_io_restores_the_weights_and_field_io_refines(pair, tmp_path):
    fixed, moving = pair
    torch.manual_seed(0)
    net = _translation_net(fixed.grid, -0.6 * SHIFT)  # 60 % of the way
    save_gradicon_model(net, tmp_path / "m", "# test")
    before = {k: v.clone() for k, v in net.state_dict().items()}

    err = {}
    for io in ("none", "field"):
        reg = register_images(fixed, moving, _config(tmp_path / "m", io=io, io_iterations=30))
        u = reg.field.disp.reshape(3, -1)
        inside = torch.from_numpy(sitk.GetArrayFromImage(make_phantom("oblique15", "aniso"))).flatten() > 0.2
        err[io] = float((u[:, inside] + torch.tensor(SHIFT, dtype=torch.float32)[:, None]).norm(dim=0).mean())
    assert err["none"] == pytest.approx(0.4 * np.linalg.norm(SHIFT), rel=1e-3)
    assert err["field"] < 0.5 * err["none"]  # regcli's solver takes it most of the remaining way
    assert "iterations" in reg.inverse_error  # the field changed: fixed-point inverse

    # seeded runs are identical on the CPU; on CUDA only with --deterministic (tests/test_gpu.py, RELIABILITY N2)
    cfg = _config(tmp_path / "m", io="network", io_iterations=3, io_learning_rate=1e-3).model_copy(
        update={"device": "cpu"})
    a = register_images(fixed, moving, cfg)
    b = register_images(fixed, moving, cfg)
    hist = a.history["foundation/network_io"]
    assert [h["iteration"] for h in hist] == [1, 2, 3] and {"similarity", "inverse_consistency"} <= set(hist[0])
    assert torch.equal(a.field.disp, b.field.disp)  # seeded
    from regcli.methods.foundation import _load

    after = _load(str(tmp_path / "m"))[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored after the IO


def test_cli_flags_reach_the_foundation_config(tmp_path):
    res = invoke("config", "show", "--method", "foundation", "--modality", "ct", "--io", "network", "--io-iters", "7",
                 "--json")
    assert res.exit_code == 0, res.output
    import json

    cfg = json.loads(res.stdout)["foundation"]
    assert (cfg["modality"], cfg["io"], cfg["io_iterations"]) == ("ct", "network", 7)
    res = invoke("config", "show", "--method", "foundation", "--iterations", "8x4")
    assert res.exit_code == 7


def test_register_writes_ants_outputs_with_an_imported_style_folder(tmp_path):
    f = write(make_phantom("LPS"), tmp_path / "f.nii.gz")
    m = write(make_phantom("LPS", transform=lambda p: p + SHIFT), tmp_path / "m.nii.gz")
    torch.manual_seed(1)
    save_gradicon_model(GradICONNet(SMALL), tmp_path / "net", "# untrained")
    (tmp_path / "c.yaml").write_text(f"foundation: {{weights: {tmp_path / 'net'}}}\n")
    out = tmp_path / "out"
    out.mkdir()
    res = invoke("register", f, m, "-o", f"{out}/p_", "--method", "foundation", "--config", tmp_path / "c.yaml",
                 "--no-html", "--json")
    assert res.exit_code == 0, res.output
    for name in ("p_0GenericAffine.mat", "p_1Warp.nii.gz", "p_1InverseWarp.nii.gz", "p_Warped.nii.gz"):
        assert (out / name).is_file()
    import json

    rep = json.loads(res.stdout)
    assert rep["extra"]["models"][0]["architecture"] == "gradicon-multistep"
    assert rep["extra"]["working_grid"]["size"] == [40, 40, 40]


def _reference_and_ours(unigradicon, seed: int, scale: float, n: int = 65):
    """The reference uniGradICON network (``make_network`` at n^3) with random weights, and regcli's with the
    same weights; both in eval mode."""
    theirs = unigradicon.make_network([1, 1, n, n, n], include_last_step=True)
    theirs.regis_net.load_state_dict(random_state(theirs.regis_net.state_dict(), seed, scale))
    ours = GradICONNet(GradICONConfig(input_shape=(n, n, n)))
    ours.load_state_dict(theirs.regis_net.state_dict())
    return theirs.eval(), ours.eval()


@pytest.mark.oracle
def test_physical_fields_match_unigradicon_itk_wrapper(tmp_path):
    """The same random network in uniGradICON's own registration code (itk_wrapper.register_pair, ITK
    transforms) and in regcli's pipeline: forward and inverse maps agree at the fixed voxels within 1e-4 mm."""
    unigradicon = pytest.importorskip("unigradicon", reason="reference package unigradicon not installed")
    itk = pytest.importorskip("itk")
    from icon_registration import itk_wrapper

    theirs, ours = _reference_and_ours(unigradicon, seed=7, scale=0.02)
    save_gradicon_model(ours, tmp_path / "net", "# test")

    def ct(shift, name):  # CT-like phantom in HU on an oblique, anisotropic grid of another size than the net
        img = make_phantom("oblique15", (1.5, 1.2, 2.0), transform=lambda p: p + shift)
        arr = sitk.GetArrayFromImage(img) * 1800.0 - 1000.0
        arr += np.random.default_rng(len(name)).normal(0, 30, arr.shape)
        out = sitk.GetImageFromArray(arr.astype(np.float32))
        out.CopyInformation(img)
        return write(out, tmp_path / name)

    fpath, mpath = ct(np.zeros(3), "f.nii.gz"), ct(SHIFT, "mov.nii.gz")
    F, M = itk.imread(str(fpath), itk.F), itk.imread(str(mpath), itk.F)
    phi_ab, phi_ba = itk_wrapper.register_pair(theirs, unigradicon.preprocess(M, "ct"),
                                               unigradicon.preprocess(F, "ct"), finetune_steps=None)
    from regcli.io.images import read_image

    fixed, moving = read_image(str(fpath)), read_image(str(mpath))
    reg = register_images(fixed, moving, _config(tmp_path / "net", modality="ct", io="none"))
    assert reg.inverse_field.grid.allclose(moving.grid)  # phi_BA on the moving grid, as itk_wrapper gives it
    size = fixed.grid.size  # the same grid as the moving one here
    idx = np.stack(np.meshgrid(*[np.arange(2, k - 2, 3) for k in size], indexing="ij"), -1).reshape(-1, 3)
    M4 = fixed.grid.index_to_world()
    pts = idx @ M4[:3, :3].T + M4[:3, 3]
    for itk_map, field in ((phi_ab, reg.field), (phi_ba, reg.inverse_field)):
        ref = np.array([itk_map.TransformPoint([float(v) for v in p]) for p in pts])
        u = field.disp.numpy()
        mine = pts + np.stack([u[:, k[2], k[1], k[0]] for k in idx])
        assert np.abs(ref - pts).max() > 1.0  # the random network moves points by millimetres
        assert np.abs(ref - mine).max() < 1e-4


@pytest.mark.oracle
def test_gradicon_loss_matches_the_reference():
    unigradicon = pytest.importorskip("unigradicon", reason="reference package unigradicon not installed")
    theirs, ours = _reference_and_ours(unigradicon, seed=3, scale=0.01)
    n = ours.cfg.input_shape[0]
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, n, n, n, generator=g)
    b = torch.rand(1, 1, n, n, n, generator=g)
    with torch.no_grad():
        torch.manual_seed(11)
        ref = theirs(a, b)
        mine = gradicon_loss(ours, a, b, generator=torch.Generator().manual_seed(11))
    assert float(mine["similarity"]) == pytest.approx(float(ref.similarity_loss), rel=1e-5)
    assert float(mine["inverse_consistency"]) == pytest.approx(float(ref.inverse_consistency_loss), rel=1e-4)
    assert float(mine["all"]) == pytest.approx(float(ref.all_loss), rel=1e-5)
    assert float(mine["folds"]) == float(ref.flips)


@pytest.mark.oracle
@pytest.mark.skipif(not has_antspyx(), reason="antspyx not installed")
def test_foundation_outputs_pass_the_ants_oracle(tmp_path):
    """The core engine's check: labels warped by regcli and by antsApplyTransforms through the written forward
    ([Warp, Affine]) and inverse ([Affine^-1, InverseWarp]) lists agree on >= 99.5 % of voxels."""
    import ants

    fixed = make_phantom("oblique15", "aniso")
    moving = make_phantom("PIL", "iso", transform=lambda p: p + SHIFT)
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("f", "m", "fl", "ml")}
    for img, k in ((fixed, "f"), (moving, "m"), (phantom_labels(fixed), "fl"), (phantom_labels(moving), "ml")):
        write(img, paths[k])
    net = GradICONNet(SMALL)
    net.load_state_dict(random_state(net.state_dict(), seed=4, scale=0.05))
    save_gradicon_model(net, tmp_path / "net", "# random")
    (tmp_path / "c.yaml").write_text(f"foundation: {{weights: {tmp_path / 'net'}, io: none}}\n")
    res = invoke("register", paths["f"], paths["m"], "-o", f"{tmp_path}/p_", "--method", "foundation",
                 "--config", tmp_path / "c.yaml", "--no-html")
    assert res.exit_code == 0, res.output
    warp, inv, aff = (str(tmp_path / n) for n in ("p_1Warp.nii.gz", "p_1InverseWarp.nii.gz", "p_0GenericAffine.mat"))
    u = sitk.GetArrayFromImage(sitk.ReadImage(warp))
    assert np.abs(u).max() > 1.0  # the random network deforms by millimetres

    def agree(src, ref, chain, ants_chain, invert):
        out = tmp_path / "o.nii.gz"
        args = ["apply", "-i", src, "-r", ref, "-o", out, "--interp", "nearest", "--overwrite", "--quiet"]
        for t in chain:
            args += ["-t", t]
        assert invoke(*args).exit_code == 0
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        theirs = ants.apply_transforms(ants.image_read(str(ref)), ants.image_read(str(src)), ants_chain,
                                       interpolator="nearestNeighbor", whichtoinvert=invert).numpy().transpose(2, 1, 0)
        return float((ours == np.rint(theirs)).mean())

    assert agree(paths["ml"], paths["f"], [warp, aff], [warp, aff], [False, False]) >= 0.995
    assert agree(paths["fl"], paths["m"], [f"[{aff},1]", inv], [aff, inv], [True, False]) >= 0.995


def test_an_empty_intensity_window_is_a_one_line_error_naming_the_image(tmp_path):
    """A mostly empty MRI (a few bright voxels, the rest 0): its [minimum, 99th percentile] window is empty."""
    f = write(make_phantom("LPS"), tmp_path / "f.nii.gz")
    arr = np.zeros((40, 44, 48), np.float32)
    arr[20:22, 20:22, 20:22] = 100
    sparse = sitk.GetImageFromArray(arr)
    sparse.CopyInformation(make_phantom("LPS"))
    m = write(sparse, tmp_path / "flat.nii.gz")
    torch.manual_seed(0)
    save_gradicon_model(GradICONNet(SMALL), tmp_path / "net", "# untrained")
    out = tmp_path / "out"
    out.mkdir()
    res = invoke("register", f, m, "-o", f"{out}/p_", "--method", "foundation", "--no-affine", "--quiet", "--config",
                 _yaml(tmp_path, f"foundation: {{weights: {tmp_path / 'net'}}}"))
    assert res.exit_code == 3
    line = one_line(res.stderr)
    assert "flat.nii.gz" in line and "intensity window" in line and "--modality" in line
    assert not list(out.iterdir())  # nothing written


def _yaml(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    return path


def test_a_mask_the_network_would_ignore_is_flagged_or_refused(tmp_path):
    """The network takes no mask: with --io none or network, a mask weights only the affine stage (a warning naming
    the option says so, also in report.json), and without the affine stage it is refused (ConfigError, nothing
    written); --io field's instance optimisation uses it (no warning)."""
    import json

    from regcli.errors import ConfigError
    from regcli.pipeline import check_masks

    f = write(make_phantom("LPS"), tmp_path / "f.nii.gz")
    m = write(make_phantom("LPS", transform=lambda p: p + SHIFT), tmp_path / "m.nii.gz")
    mask = write(sitk.Cast(make_phantom("LPS") > 0.2, sitk.sitkUInt8), tmp_path / "mask.nii.gz")
    torch.manual_seed(0)
    save_gradicon_model(GradICONNet(SMALL), tmp_path / "net", "# untrained")
    cfg = _yaml(tmp_path, f"foundation: {{weights: {tmp_path / 'net'}}}")
    out = tmp_path / "out"
    out.mkdir()
    res = invoke("register", f, m, "-o", f"{out}/a_", "--method", "foundation", "--io", "none", "--config", cfg,
                 "--fixed-mask", mask, "--no-html", "--json")
    assert res.exit_code == 0, res.output
    warning = "--fixed-mask: no effect on the deformable stage of --method foundation --io none"
    assert warning in res.stderr, res.stderr
    assert any(w.startswith(warning) for w in json.loads(res.stdout)["warnings"])
    res = invoke("register", f, m, "-o", f"{out}/b_", "--method", "foundation", "--io", "network", "--no-affine",
                 "--config", cfg, "--moving-mask", mask, "--quiet")
    line = one_line(res.stderr)
    assert res.exit_code == 7 and line.startswith("ConfigError: --moving-mask: nothing in --method foundation --io "
                                                  "network"), line
    assert not list(out.glob("b_*"))
    res = invoke("register", f, m, "-o", f"{out}/c_", "--method", "foundation", "--io", "field", "--iterations", "2",
                 "--config", cfg, "--fixed-mask", mask, "--moving-mask", mask, "--no-html")
    assert res.exit_code == 0 and "no effect" not in res.stderr, res.output
    # promptreg alike; a fine refinement reads the masks whatever --io says
    given = object()
    for flags, refused in (({"io": "none"}, False), ({"io": "none", "affine": {"enabled": False}}, True),
                           ({"io": "field", "io_iterations": 0, "affine": {"enabled": False}}, True),
                           ({"io": "none", "affine": {"enabled": False}, "instance": {"fine_spacing_mm": 1.0}}, False)):
        top = {k: flags.pop(k) for k in ("affine", "instance") if k in flags}
        config = build_config(None, {"method": "promptreg", "promptreg": flags, **top})
        if refused:
            with pytest.raises(ConfigError, match="--fixed-mask and --moving-mask: nothing in --method promptreg"):
                check_masks(config, given, given)
        else:
            check_masks(config, given, given)
