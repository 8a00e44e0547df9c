"""SAMConvex method (regcli.methods.samconvex) with a small embedding saved as a Hub-layout folder."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_phantom, phantom_mask
from regcli.config import build_config
from regcli.errors import WeightsError
from regcli.methods.samconvex import compose, level_features, samconvex
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet, embed, load_embedding, save_embedding_model
from regcli.resample import FieldWarper
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image

SMALL = EmbeddingConfig(widths=(4, 8, 8, 12), global_dim=8, local_dim=8, context_dilations=(1, 2), spacing_mm=2.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-sam"
    save_embedding_model(EmbeddingNet(SMALL), folder, "# tiny test model\n", training={"note": "untrained"})
    return folder


def _img(direction="oblique15", transform=None):
    f = make_phantom(direction, (2.0, 2.0, 2.0), transform=transform)
    return Image(torch.from_numpy(sitk.GetArrayFromImage(f).astype(np.float32)), Grid.from_sitk(f)), f


def test_load_embedding_round_trip_and_refusals(model_dir, tmp_path):
    net = load_embedding(str(model_dir))
    torch.manual_seed(0)
    ref = EmbeddingNet(SMALL)
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(net(x)[1], ref.eval()(x)[1])
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "README.md"):
        (bad / name).write_bytes((model_dir / name).read_bytes())
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        load_embedding(str(bad))


def test_level_features_and_compose_geometry(model_dir):
    img, _ = _img()
    e = embed(img, load_embedding(str(model_dir))).combined()
    for f in (1, 2, 4):
        feat, level = level_features(e, img.grid, f)
        assert level == img.grid.subsampled(f) and tuple(feat.shape[1:]) == level.shape
        assert torch.allclose(feat.norm(dim=0), torch.ones(1), atol=1e-4)  # unit length at every level
    # composing two translations adds them
    g = img.grid
    w = FieldWarper(g, g)
    a = torch.zeros((3, *g.shape))
    a[0] = 1.5
    b = torch.zeros((3, *g.shape))
    b[1] = -2.0
    c = compose(a, b, g, w)
    assert torch.allclose(c[:, 3:-3, 3:-3, 3:-3].mean((1, 2, 3)), torch.tensor([1.5, -2.0, 0.0]), atol=1e-5)


def _mind_embedding(image, net, device=None):
    """A stand-in embedding with known quality: MIND-SSC, centred and unit length, on the embedding grids."""
    import torch.nn.functional as F

    from regcli.features.mind import mind_ssc
    from regcli.models.embedding import Embedding

    m = mind_ssc(image.data[None, None], 1, 2)[0]
    m = F.normalize(m - m.mean(0, keepdim=True), dim=0)
    return Embedding(Image(m[:, ::8, ::8, ::8].contiguous(), image.grid.subsampled(8)),
                     Image(m[:, ::2, ::2, ::2].contiguous(), image.grid.subsampled(2)))


def test_samconvex_recovers_a_translation_in_world_space(model_dir, monkeypatch):
    """The pyramid's geometry and signs, with a stand-in embedding whose matching is reliable: a 4 mm shift
    of an oblique phantom comes out as u = -t in world LPS mm."""
    import regcli.methods.samconvex as S

    monkeypatch.setattr(S, "embed", _mind_embedding)
    t = np.array([4.0, -2.0, 0.0])
    fixed, f = _img()
    moving, _ = _img(transform=lambda p: p + t)
    cfg = build_config(None, {"method": "samconvex", "samconvex": {"weights": str(model_dir), "io_iterations": 10,
                                                                   "levels": [4, 2], "search_radius": [2, 2]}})
    calls = []
    res = samconvex(fixed, moving, cfg, progress=lambda s, i, n: calls.append(s))
    assert res.field.grid == fixed.grid and torch.isfinite(res.field.disp).all()
    u = res.field.disp.permute(1, 2, 3, 0).numpy()[phantom_mask(f, erode=2)]
    assert np.abs(u.mean(0) + t).max() < 1.0, u.mean(0)
    assert {"anatomical embedding", "correlation pyramid", "embedding instance optimisation"} <= set(calls)
    assert set(res.timings) >= {"embed_fixed", "pyramid", "instance", "total"}


def test_samconvex_with_the_real_network_runs(model_dir):
    fixed, _ = _img()
    cfg = build_config(None, {"method": "samconvex", "samconvex": {"weights": str(model_dir), "io_iterations": 3}})
    res = samconvex(fixed, fixed, cfg)
    assert torch.isfinite(res.field.disp).all() and res.field.grid == fixed.grid


def test_missing_weights_fail_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from regcli.cli.app import app

    f = tmp_path / "f.nii.gz"
    sitk.WriteImage(make_phantom("LPS", (2.0, 2.0, 2.0)), str(f))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("samconvex: {weights: no-such-model}\n")
    res = CliRunner().invoke(app, ["register", str(f), str(f), "-o", str(tmp_path / "out_"), "--method", "samconvex",
                                   "--config", str(cfg), "--quiet"])
    assert res.exit_code == 8 and "no-such-model" in res.output
    assert "affine" not in res.output  # nothing ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "f.nii.gz"]


def test_hybrid_features_mind_local_half(model_dir):
    from regcli.methods.samconvex import features

    fixed, _ = _img()
    net = load_embedding(str(model_dir))
    cfg = build_config(None, {"samconvex": {"weights": str(model_dir), "local_features": "mind", "global_weight": 2.0,
                                            "global_channels": 0}})
    feat, basis = features(fixed, net, cfg.samconvex)
    assert basis is None and feat.grid == fixed.grid.subsampled(2) and feat.data.shape[0] == SMALL.global_dim + 12
    n = feat.data.norm(dim=0)
    # unit length, except where the image is flat: MIND (centred) is 0 there and only the global half remains
    assert float(n.max()) == pytest.approx(1.0, abs=1e-4) and float(n.min()) >= 0.8 ** 0.5 - 1e-4
    # the global half carries global_weight^2 / (1 + global_weight^2) of the squared length
    g2 = feat.data[:SMALL.global_dim].pow(2).sum(0)
    assert torch.allclose(g2, torch.full_like(g2, 0.8), atol=1e-4)


def test_global_half_principal_components_keep_differences(model_dir):
    """global_channels=k: the global half in the coordinates of its k principal directions (the fixed image's
    basis, reused for the moving image): a projection, so no fixed-moving SSD grows, and dropping one direction
    of little variance changes them little."""
    from regcli.methods.samconvex import features

    fixed, _ = _img()
    moving, _ = _img(transform=lambda p: p + np.array([2.0, -1.0, 0.5]))
    net = load_embedding(str(model_dir))
    c = SMALL.global_dim
    full = build_config(None, {"samconvex": {"weights": str(model_dir), "global_weight": 1.0,
                                             "global_channels": 0}}).samconvex
    ff, _ = features(fixed, net, full)
    fm, _ = features(moving, net, full)
    ssd = (ff.data[:c] - fm.data[:c]).pow(2).sum(0)
    for k in (c - 1, 3):
        cfg = full.model_copy(update={"global_channels": k})
        pf, basis = features(fixed, net, cfg)
        pm, basis_m = features(moving, net, cfg, basis)
        assert basis_m is basis and pf.data.shape[0] == k + (ff.data.shape[0] - c)
        assert torch.equal(pf.data[k:], ff.data[c:])  # the local half is untouched
        ssd_k = (pf.data[:k] - pm.data[:k]).pow(2).sum(0)
        assert float((ssd_k - ssd).max()) < 1e-5  # a projection never increases a difference
        if k == c - 1:  # what the last direction carries is little: the SSDs barely change
            assert float((ssd - ssd_k).mean()) < 0.05 * float(ssd.mean())


def test_optional_working_grid_refinement(model_dir):
    fixed, _ = _img()
    moving, _ = _img(transform=lambda p: p + np.array([1.0, 0.0, 0.0]))
    cfg = build_config(None, {"samconvex": {"weights": str(model_dir), "io_iterations": 2, "levels": [4],
                                            "search_radius": [1], "refine_iterations": 3}})
    res = samconvex(fixed, moving, cfg)
    assert len(res.history["refine"]) == 3 and "refine" in res.timings
    assert res.field.grid == fixed.grid and torch.isfinite(res.field.disp).all()


def test_a_moving_mask_reaches_the_instance_optimisation_and_the_refinement(model_dir):
    """--moving-mask weights SAMConvex's feature-space IO and its refinement, as it does ConvexAdam's (it was accepted
    and ignored: the field was the same to the bit with or without a mask over half the moving image)."""
    fixed, _ = _img()
    moving, _ = _img(transform=lambda p: p + np.array([1.5, -1.0, 0.0]))
    cfg = build_config(None, {"samconvex": {"weights": str(model_dir), "io_iterations": 5, "levels": [4],
                                            "search_radius": [1], "refine_iterations": 5}})
    half = torch.zeros_like(moving.data)
    half[:, :, : half.shape[2] // 2] = 1.0
    mask = Image(half, moving.grid)
    plain = samconvex(fixed, moving, cfg).field.disp
    masked = samconvex(fixed, moving, cfg, moving_mask=mask).field.disp
    assert float((masked - plain).abs().max()) > 0.05
    again = samconvex(fixed, moving, cfg, moving_mask=mask).field.disp
    assert torch.equal(masked, again)
