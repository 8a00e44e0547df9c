"""Anatomical embedding network (regcli.models.embedding): geometry of the outputs, normalisation, config."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch

from conftest import make_phantom
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet, embed, normalise_intensity
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image


def _image(direction="oblique15"):
    import SimpleITK as sitk

    img = make_phantom(direction, (2.0, 2.0, 2.0))
    return Image(torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32)), Grid.from_sitk(img))


def test_subsampled_grid_is_every_factor_th_voxel():
    g = Grid((21, 18, 13), (1.5, 2.0, 3.0), (10.0, -4.0, 7.0), tuple(_image().grid.direction))
    for f in (2, 8):
        s = g.subsampled(f)
        assert s.size == tuple(-(-n // f) for n in g.size)
        idx = np.array([[1, 2, 1, 1.0], [0, 0, 0, 1.0]])
        w_sub = (s.index_to_world() @ idx.T).T[:, :3]
        w_full = (g.index_to_world() @ np.c_[f * idx[:, :3], np.ones(2)].T).T[:, :3]
        assert np.allclose(w_sub, w_full)


def test_embedding_grids_norms_and_determinism():
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(widths=(4, 6, 8, 8), global_dim=5, local_dim=7))
    img = _image()
    e = embed(img, net)
    assert e.global_.grid == img.grid.subsampled(8) and e.local.grid == img.grid.subsampled(2)
    assert tuple(e.global_.data.shape) == (5, *img.grid.subsampled(8).shape)
    assert tuple(e.local.data.shape) == (7, *img.grid.subsampled(2).shape)
    assert torch.allclose(e.global_.data.norm(dim=0), torch.ones(1), atol=1e-5)
    assert torch.allclose(e.local.data.norm(dim=0), torch.ones(1), atol=1e-5)
    c = e.combined()
    assert c.grid == e.local.grid and c.data.shape[0] == 12
    assert torch.allclose(c.data[:5].norm(dim=0), torch.full((1,), 0.5 ** 0.5), atol=1e-5)
    assert torch.allclose(c.data.norm(dim=0), torch.ones(1), atol=1e-5)
    again = embed(img, net)
    assert torch.equal(again.local.data, e.local.data) and torch.equal(again.global_.data, e.global_.data)


def test_state_dict_round_trip_and_receptive_field():
    torch.manual_seed(1)
    a = EmbeddingNet()
    b = EmbeddingNet(EmbeddingConfig.model_validate_json(a.cfg.model_dump_json()))
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 1, 24, 20, 17)
    ga, la = a(x)
    gb, lb = b(x)
    assert torch.equal(ga, gb) and torch.equal(la, lb)
    # the global head sees a large part of the body: > 25 cm at the default 2 mm
    assert a.receptive_field_voxels() * a.cfg.spacing_mm > 250


def test_config_is_validated():
    with pytest.raises(pydantic.ValidationError):
        EmbeddingConfig(percentiles=(99.0, 1.0))
    with pytest.raises(pydantic.ValidationError):
        EmbeddingConfig(unknown_key=1)


def test_normalise_intensity():
    x = torch.zeros(10, 10, 10)
    x[2:8, 2:8, 2:8] = torch.linspace(10, 110, 216).reshape(6, 6, 6)
    y = normalise_intensity(x, (0.0, 100.0))
    fg = y[2:8, 2:8, 2:8]
    assert float(fg.min()) == pytest.approx(0.0, abs=1e-6) and float(fg.max()) == pytest.approx(1.0, abs=1e-6)
    assert float(y[0, 0, 0]) == pytest.approx(-0.1)  # background: (0 - 10) / 100
    assert float(normalise_intensity(x - 100.0, (50.0, 100.0)).min()) == -0.5  # clipped below
    assert torch.equal(normalise_intensity(torch.full((8, 8, 8), 3.0), (1.0, 99.0)), torch.zeros(8, 8, 8))
