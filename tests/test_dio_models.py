"""DIO feature networks (regcli.models.dio): output shapes, the geometry of every level, weights folders."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from conftest import make_phantom, one_line
from regcli.errors import InputError, WeightsError
from regcli.methods.convexadam import _pool, padded_grid, pooled_grid
from regcli.models.dio import (
    ARCHITECTURE, ConvAct, DioFeatureNet, DioNetConfig, dio_features, dio_from, level_grid, load_dio, save_dio_model,
)
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.weights import resolve

ARCHS = ("unet", "lku")
TINY = dict(widths=(4, 6, 8, 8), feature_channels=(5, 6, 7))


def _net(arch: str, seed: int = 0, **kw) -> DioFeatureNet:
    torch.manual_seed(seed)
    return DioFeatureNet(DioNetConfig(arch=arch, **{**TINY, **kw}))


def _image(direction="oblique15", spacing=(2.0, 2.0, 2.0)) -> Image:
    img = make_phantom(direction, spacing)
    return Image(torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32)), Grid.from_sitk(img), "phantom")


def _pass_channel_zero(net: DioFeatureNet) -> None:
    """Weights that make level l's channel 0 the level-l average of a positive input: every plain convolution
    copies channel 0 (centre tap 1), large-kernel blocks reduce to their identity, laterals are zero (the
    decoder keeps the skip), each head copies channel 0 and the other channels are 0."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
        for m in net.modules():
            if isinstance(m, ConvAct):
                c = m.conv.kernel_size[0] // 2
                m.conv.weight[0, 0, c, c, c] = 1.0
        for head in net.heads.values():
            head.weight[0, 0] = 1.0


# ------------------------------------------------------------------------------------------- shapes, config
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_for_odd_sizes(arch):
    net = _net(arch).eval()
    for size in ((23, 17, 29), (9, 31, 16), (8, 8, 8)):
        with torch.no_grad():
            out = net(torch.rand(2, 1, *size))
        assert sorted(out) == [1, 2, 4]
        for level, channels in zip((4, 2, 1), (5, 6, 7)):
            assert tuple(out[level].shape) == (2, channels, *(-(-n // level) for n in size))
    with pytest.raises(ValueError, match="Z, Y, X"):
        net(torch.rand(1, 2, 8, 8, 8))


def test_other_depths_and_levels():
    torch.manual_seed(0)
    net = DioFeatureNet(DioNetConfig(widths=(4, 6, 8), levels=(2, 4), feature_channels=(3, 2)))
    assert net.cfg.total_stride == 4 and net.finest_depth == 1 and "0" not in net.decoder
    out = net(torch.rand(1, 1, 13, 10, 7))
    assert tuple(out[2].shape) == (1, 3, 7, 5, 4) and tuple(out[4].shape) == (1, 2, 4, 3, 2)


def test_config_is_validated():
    for bad in (dict(levels=(3,)), dict(levels=(16,)), dict(levels=(2, 2), feature_channels=(8, 8)),
                dict(feature_channels=(8, 8)), dict(widths=(8,)), dict(percentiles=(99.0, 1.0)),
                dict(arch="vit"), dict(unknown=1)):
        with pytest.raises(pydantic.ValidationError):
            DioNetConfig(**bad)
    assert DioNetConfig.model_validate_json(DioNetConfig(arch="lku").model_dump_json()) == DioNetConfig(arch="lku")


# --------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("arch", ARCHS)
def test_level_l_lives_on_the_pooled_grid(arch):
    """With weights that pass the input through, level l is exactly convexadam's average pooling by l (same
    padding, same voxel centres): the network's downsampling, decoder and cropping keep that geometry. A
    stride-2 convolution (outputs at fine voxel 2i) or nearest subsampling would differ by half a voxel per
    level and fail here."""
    net = _net(arch, normalize=False)
    _pass_channel_zero(net)
    grid = Grid((29, 17, 23), (0.9, 1.1, 3.0), (10.0, -4.0, 7.0), tuple(_image().grid.direction))
    torch.manual_seed(3)
    x = 0.5 + torch.rand(1, 1, *grid.shape)  # positive: LeakyReLU is the identity there
    with torch.no_grad():
        out = net(x)
    for level in (4, 2, 1):
        ref, ref_grid = _pool(x, grid, level)
        assert ref_grid == level_grid(grid, level)
        assert tuple(out[level].shape[2:]) == tuple(ref.shape[2:])
        torch.testing.assert_close(out[level][:, :1], ref, atol=1e-5, rtol=1e-5)
        assert float(out[level][:, 1:].abs().max()) == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_mirrored_input_gives_mirrored_features(arch):
    """Random weights: mirror the input in all three axes and every kernel with it; each level's features are
    then the mirror image of the original ones, voxel for voxel. This holds only when level-l voxel i is
    centred on fine voxels l*i .. l*i + l - 1 (mirroring maps those centres onto each other); with outputs at
    fine voxel l*i (strided convolutions) the mirrored centres fall between voxels and the test fails."""
    net = _net(arch, seed=5).eval()
    mirrored = _net(arch, seed=5).eval()
    with torch.no_grad():
        for m in mirrored.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.copy_(m.weight.flip((2, 3, 4)))
    torch.manual_seed(4)
    x = torch.rand(1, 1, 24, 16, 32)  # a multiple of the total stride: no one-sided padding
    with torch.no_grad():
        a, b = net(x), mirrored(x.flip((2, 3, 4)))
    for level in (4, 2, 1):
        torch.testing.assert_close(b[level], a[level].flip((2, 3, 4)), atol=1e-5, rtol=1e-4)
    # the check has teeth: mirrored features shifted by one voxel do not match
    assert float((b[1][..., 1:] - a[1].flip((2, 3, 4))[..., :-1]).abs().max()) > 0.1


def test_dio_features_grids_on_an_oblique_anisotropic_image():
    img = _image("oblique15", (0.9, 0.9, 3.0))
    net = _net("unet")
    feats = dio_features(img, net)
    for level in (4, 2, 1):
        f = feats[level]
        assert f.grid == pooled_grid(padded_grid(img.grid, level)[0], level)
        assert tuple(f.data.shape) == (net.cfg.feature_channels[(4, 2, 1).index(level)], *f.grid.shape)
        # voxel (i, j, k) of level l is the centre of fine voxels l*i .. l*i + l - 1 (independent check)
        M = img.grid.index_to_world()
        for ijk in ((0, 0, 0), (1, 2, 1)):
            fine = np.array([[level * a + d for a in ijk] for d in (0, level - 1)], float)
            centre = (M[:3, :3] @ fine.mean(0)) + M[:3, 3]
            got = f.grid.index_to_world() @ np.append(np.array(ijk, float), 1.0)
            np.testing.assert_allclose(got[:3], centre, atol=1e-9)
        assert f.grid.direction == img.grid.direction and f.name == "phantom"
    # a channel axis of 1 is accepted; anything else is a one-line InputError naming the image
    same = dio_features(img.with_data(img.data[None]), net)
    assert torch.equal(same[1].data, feats[1].data)
    with pytest.raises(InputError, match="phantom") as e:
        dio_features(img.with_data(img.data[None].expand(3, -1, -1, -1)), net)
    one_line(str(e.value))


# ------------------------------------------------------------------------------------ values at initialisation
@pytest.mark.parametrize("arch", ARCHS)
def test_unit_length_varying_and_deterministic_at_init(arch):
    img = _image()
    feats = dio_features(img, _net(arch, seed=0))
    again = dio_features(img, _net(arch, seed=0))
    other = dio_features(img, _net(arch, seed=1))
    for level, f in feats.items():
        d = f.data.reshape(f.data.shape[0], -1)
        torch.testing.assert_close(d.norm(dim=0), torch.ones(d.shape[1]), atol=1e-5, rtol=0)
        # not degenerate: the vectors point in many directions (norm of the mean unit vector well below 1)
        # and every channel varies in space
        assert float(d.mean(1).norm()) < 0.9, (level, float(d.mean(1).norm()))
        assert float(d.std(1).min()) > 0.05
        assert torch.equal(again[level].data, f.data)
        assert not torch.equal(other[level].data, f.data)
    raw = dio_features(img, _net(arch, seed=0, normalize=False))
    assert any(float((r.data.norm(dim=0) - 1).abs().max()) > 1e-2 for r in raw.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_reaches_every_parameter(arch):
    net = _net(arch).train()
    img = Image(torch.rand(24, 20, 22) + 0.1, Grid((22, 20, 24), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0),
                                                   (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    feats = dio_features(img, net, grad=True)
    assert net.training and all(f.data.requires_grad for f in feats.values())
    torch.manual_seed(0)
    loss = sum((f.data * torch.randn_like(f.data)).sum() for f in feats.values())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    # without grad: no graph, eval mode during the call, the mode restored afterwards
    feats = dio_features(img, net)
    assert net.training and not any(f.data.requires_grad for f in feats.values())


# --------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("arch", ARCHS)
def test_save_resolve_load_round_trip(arch, tmp_path):
    net = _net(arch, seed=7)
    folder = save_dio_model(net, tmp_path / f"dio-{arch}", "# tiny DIO test model\n",
                            training={"note": "untrained"}, version="0.1")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCHITECTURE and config["version"] == "0.1"
    assert config["net"]["arch"] == arch and config["preprocessing"]["spacing_mm"] == 2.0
    loaded = dio_from(resolve(str(folder)))
    assert not loaded.training and loaded.cfg == net.cfg
    img = _image()
    a, b = dio_features(img, net), dio_features(img, loaded)
    for level in a:
        assert torch.equal(a[level].data, b[level].data)
    c = dio_features(img, load_dio(str(folder)))
    assert torch.equal(c[1].data, a[1].data)


def test_other_architectures_and_mismatched_tensors_are_one_line_errors(tmp_path):
    from regcli.models.embedding import EmbeddingConfig, EmbeddingNet, save_embedding_model

    torch.manual_seed(0)
    sam = save_embedding_model(EmbeddingNet(EmbeddingConfig(widths=(4, 4, 4, 4), global_dim=4, local_dim=4)),
                               tmp_path / "sam", "# not DIO\n")
    with pytest.raises(WeightsError, match="not a DIO feature network") as e:
        dio_from(resolve(str(sam)))
    assert "\n" not in str(e.value) and "regcli-sam-embedding" in str(e.value)
    # a DIO folder whose config does not describe its tensors
    folder = save_dio_model(_net("unet"), tmp_path / "dio", "# tiny\n")
    config = json.loads((folder / "config.json").read_text())
    config["net"]["arch"] = "lku"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="does not load") as e:
        load_dio(str(folder))
    assert "\n" not in str(e.value)
    config["net"]["arch"] = "transformer"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="does not load"):
        load_dio(str(folder))

