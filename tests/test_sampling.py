"""The gathered trilinear sampler (regcli.resample): the same function as ``grid_sample``, a gradient that is
differentiable again (DIO's training step on torch < 2.13) and the same gradient twice on CUDA (RELIABILITY N2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regcli import resample
from regcli.resample import _trilinear_gathered, native_double_backward, sample_norm, twice_differentiable


def _inputs(dtype=torch.float64, seed=0, shape=(2, 3, 5, 6, 7), points=(4, 3, 5)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    g = (torch.rand(shape[0], *points, 3, generator=gen, dtype=dtype) * 2.6 - 1.3)  # some points outside
    return x, g


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_gathered_sampling_is_grid_sample(padding):
    for seed in range(3):
        x, g = _inputs(seed=seed)
        ref = F.grid_sample(x, g, mode="bilinear", padding_mode=padding, align_corners=True)
        out = _trilinear_gathered(x, g, padding)
        assert out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-12), (out - ref).abs().max()
        # the first derivatives w.r.t. the data and the coordinates agree too
        x1, g1 = x.clone().requires_grad_(), g.clone().requires_grad_()
        w = torch.randn_like(ref)
        ga = torch.autograd.grad((F.grid_sample(x1, g1, padding_mode=padding, align_corners=True) * w).sum(),
                                 (x1, g1))
        gb = torch.autograd.grad((_trilinear_gathered(x1, g1, padding) * w).sum(), (x1, g1))
        for a, b in zip(ga, gb):
            assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_gathered_sampling_has_a_second_derivative(padding):
    x, g = _inputs(shape=(1, 2, 4, 3, 5), points=(2, 2, 2))
    # coordinates away from voxel boundaries, where trilinear interpolation is smooth in them
    g = g.clamp(-0.9, 0.9)
    x.requires_grad_()
    g.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _trilinear_gathered(a, b, padding), (x, g))
    assert torch.autograd.gradgradcheck(lambda a, b: _trilinear_gathered(a, b, padding), (x, g))


def test_the_gathered_path_is_taken_only_where_it_is_needed(monkeypatch):
    x, g = _inputs(dtype=torch.float32)
    calls = []
    real = resample._trilinear_gathered
    monkeypatch.setattr(resample, "_trilinear_gathered", lambda *a: calls.append(1) or real(*a))
    xg = x.clone().requires_grad_()
    sample_norm(xg, g)
    assert not calls  # plain grid_sample
    monkeypatch.setitem(resample._NATIVE_DOUBLE_BACKWARD, "cpu", False)
    sample_norm(xg, g)
    assert not calls  # not inside twice_differentiable
    with twice_differentiable():
        sample_norm(xg, g)
        with torch.no_grad():
            sample_norm(xg, g)  # nothing to differentiate
        sample_norm(x, g)  # nothing requires grad
    assert len(calls) == 1
    monkeypatch.setitem(resample._NATIVE_DOUBLE_BACKWARD, "cpu", True)
    with twice_differentiable():
        sample_norm(xg, g)
    assert len(calls) == 1  # this torch has its own double backward


def test_the_probe_reads_this_torch():
    # torch 2.13 (the CPU build CI installs) differentiates grid_sample's 3-D backward; 2.11 does not
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    resample._NATIVE_DOUBLE_BACKWARD.pop("cpu", None)
    assert native_double_backward(torch.device("cpu")) == ((major, minor) >= (2, 13))


def test_dio_training_step_through_the_gathered_sampler_matches_the_native_one(monkeypatch):
    """DIO's Jacobian-free step on a torch without grid_sample's double backward (forced here): the network's
    gradient is the one the native double backward gives, to float32 rounding."""
    import numpy as np
    import SimpleITK as sitk

    from conftest import as_image, make_phantom, phantom_labels
    from regcli.config import build_config
    from regcli.models.dio import DioFeatureNet, DioNetConfig
    from regcli.spaces.image import Image
    from regcli.training.dio import DioTrainConfig, train_step

    f = make_phantom("LPS", "iso", size=(24, 22, 20))
    m = make_phantom("LPS", "iso", size=(24, 22, 20), transform=lambda p: p + np.array([2.0, 0.0, 0.0]))
    fixed, moving = as_image(f), as_image(m)
    lf = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(f)).astype(np.int64)), fixed.grid)
    lm = Image(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(m)).astype(np.int64)), moving.grid)
    cfg = build_config(None, {"method": "dio", "dio": {"iterations": [3, 3, 3]}})

    def grads():
        torch.manual_seed(0)
        net = DioFeatureNet(DioNetConfig(arch="unet", widths=(4, 8, 8, 8), feature_channels=(4, 4, 4)))
        loss, _ = train_step(net, fixed, moving, lf, lm, cfg, DioTrainConfig())
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    native = grads() if native_double_backward(torch.device("cpu")) else None
    monkeypatch.setitem(resample._NATIVE_DOUBLE_BACKWARD, "cpu", False)
    gathered = grads()
    assert torch.isfinite(gathered[1]).all() and float(gathered[1].abs().sum()) > 0
    if native is not None:
        assert gathered[0] == pytest.approx(native[0], rel=1e-5)
        rel = float((gathered[1] - native[1]).norm() / native[1].norm())
        assert rel < 1e-4, rel  # measured: 1.1e-6


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_gathered_sampling_on_and_beyond_the_edges_is_grid_sample(padding):
    """Points exactly on the first and last voxel centres (±1), beyond them, and non-finite ones: the same values
    and the same gradients as grid_sample (which has no gradient where it clips, and sends NaN to the far edge)."""
    x, _ = _inputs(shape=(1, 2, 4, 5, 6), points=(1, 1, 1))
    edge = torch.tensor([-1.0, 1.0, -1.5, 1.5, 0.25, -0.75], dtype=torch.float64)
    g = torch.cartesian_prod(edge, edge, edge).reshape(1, 1, 1, -1, 3)
    xa, ga = x.clone().requires_grad_(), g.clone().requires_grad_()
    xb, gb = x.clone().requires_grad_(), g.clone().requires_grad_()
    ref = F.grid_sample(xa, ga, padding_mode=padding, align_corners=True)
    out = _trilinear_gathered(xb, gb, padding)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    assert torch.allclose(xb.grad, xa.grad, atol=1e-12)
    assert torch.allclose(gb.grad, ga.grad, atol=1e-10), (gb.grad - ga.grad).abs().max()
    bad = torch.tensor([[float("nan"), 0.0, 0.0], [float("inf"), 0.1, 0.0], [-float("inf"), 0.0, 0.2]],
                       dtype=torch.float64).reshape(1, 1, 1, 3, 3)
    assert torch.equal(_trilinear_gathered(x, bad, padding),
                       F.grid_sample(x, bad, padding_mode=padding, align_corners=True))
