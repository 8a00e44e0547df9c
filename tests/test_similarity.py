"""Similarity measures: LNCC, global NCC and Parzen mutual information (losses, lower is better)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regcli.errors import ConfigError
from regcli.similarity import make_similarity
from regcli.similarity.lncc import box_mean, lncc_map, window_from_radius
from regcli.similarity.mi import joint_histogram, mutual_information


def smooth_volume(seed: int = 0, shape=(24, 26, 28), passes: int = 3) -> torch.Tensor:
    """(1, 1, Z, Y, X) float32 smooth random texture in about [0, 1], asymmetric (no flip symmetry)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g)
    for _ in range(passes):
        x = F.avg_pool3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = (x - x.min()) / (x.max() - x.min())
    z = torch.linspace(0, 1, shape[0]).view(1, 1, -1, 1, 1)
    return (0.7 * x + 0.3 * z).contiguous()  # a ramp makes flips along z visible too


def shifted(x: torch.Tensor, s: int = 2) -> torch.Tensor:
    return torch.roll(x, shifts=(s, -s, s), dims=(2, 3, 4))


SIMS = [("lncc", {"window": 5}), ("lncc", {"radius_mm": 3.0, "spacing": (1.5, 1.5, 1.5)}), ("ncc", {}),
        ("mi", {}), ("mi", {"kernel": "bspline", "bins": 24}), ("mi", {"normalized": True})]


@pytest.mark.parametrize("name,params", SIMS)
def test_identity_is_optimal_and_flip_shift_worse(name, params):
    f = smooth_volume(0)
    sim = make_similarity(name, **params)
    same = float(sim(f, f.clone()))
    for other in (torch.flip(f, dims=(4,)), torch.flip(f, dims=(2,)), shifted(f, 2), smooth_volume(5)):
        assert float(sim(f, other)) > same + 1e-3, name
    if name in ("lncc", "ncc"):
        assert same == pytest.approx(-1.0, abs=1e-4)  # textured everywhere: cc = 1 at every voxel


@pytest.mark.parametrize("name,params", SIMS)
def test_gradients_finite_even_on_flat_images(name, params):
    sim = make_similarity(name, **params)
    f = smooth_volume(1)
    for w0 in (smooth_volume(2), torch.zeros_like(f), torch.full_like(f, 3.0)):
        w = w0.clone().requires_grad_(True)
        loss = sim(f, w)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("name,params", SIMS)
def test_mask_selects_where_images_agree(name, params):
    f = smooth_volume(0)
    g = f.clone()
    g[..., 14:] = smooth_volume(3)[..., 14:]  # differ in the back half along x
    mask = torch.zeros_like(f)
    mask[..., :12] = 1.0
    sim = make_similarity(name, **params)
    same_in_mask = float(sim(f[..., :12], g[..., :12]))
    masked = float(sim(f, g, mask))
    unmasked = float(sim(f, g))
    assert masked < unmasked - 1e-3
    if name != "lncc":  # LNCC windows straddle the mask border; the others see only masked voxels
        assert masked == pytest.approx(same_in_mask, abs=1e-4)
    # zero weight outside: changing the data there does not change the value
    g2 = g.clone()
    g2[..., 14:] = 0.5
    assert float(sim(f, g2, mask)) == pytest.approx(masked, abs=1e-5)


def test_mi_invariant_to_monotone_remaps():
    f = smooth_volume(0)
    mi = lambda a, b, **k: float(mutual_information(a, b, bins=32, **k))  # noqa: E731
    ref = mi(f, f)
    assert mi(f, 1.0 - f) == pytest.approx(ref, rel=1e-5)  # exact: mirrored bins
    assert mi(f, 40.0 * f - 1000.0) == pytest.approx(ref, rel=1e-5)  # affine remap, CT-like range
    assert mi(f, f ** 2) == pytest.approx(ref, rel=0.1)  # non-linear: bins change, MI nearly the same
    assert mi(f, torch.exp(3 * f)) == pytest.approx(ref, rel=0.1)
    assert mi(f, f ** 2) > mi(f, shifted(f, 2)) + 0.2
    nmi = mi(f, f, normalized=True)
    assert 1.0 < nmi <= 2.0  # Parzen smoothing keeps it below the crisp-histogram value 2
    assert nmi > mi(f, shifted(f, 2), normalized=True) + 0.05
    assert mi(f, 1.0 - f, normalized=True) == pytest.approx(nmi, rel=1e-5)


def test_mi_negative_intensities_ct_like():
    """E8: histogram range from the data, so Hounsfield-like values (-1000..1500) work."""
    f = smooth_volume(0) * 2500.0 - 1000.0
    sim = make_similarity("mi", bins=32)
    w = f.clone().requires_grad_(True)
    loss = sim(f, w)
    loss.backward()
    assert float(loss.detach()) < -1.0  # MI of an image with itself is its entropy (nats), well above 1
    assert torch.isfinite(w.grad).all()
    joint = joint_histogram(f, f)
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(sim(f, shifted(f))) > float(loss.detach()) + 0.2


def test_joint_histogram_respects_mask_weights():
    f = smooth_volume(0)
    mask = torch.zeros_like(f)
    mask[..., :5, :, :] = 1.0
    j = joint_histogram(f, f, mask, bins=16)
    assert float(j.sum()) == pytest.approx(1.0, abs=1e-5)
    # mass concentrates on the diagonal for identical images
    assert float(torch.diagonal(j[0]).sum()) > 0.5


@pytest.mark.parametrize("kernel", ["gaussian", "bspline"])
def test_sparse_parzen_window_equals_the_dense_weights(kernel):
    """MI's histogram keeps only the K bins around each sample; scattered back they are the dense Parzen weights
    (values beyond the range included: they are clamped to it). The cubic B-spline has compact support, so they
    agree exactly; the Gaussian is cut ceil(3 sigma) bins out, which moves each weight by less than 1e-3."""
    from regcli.similarity.mi import _sparse_parzen, parzen_weights

    x = torch.linspace(-12.0, 110.0, 997, dtype=torch.float64)[None]  # range 0..100, with samples outside
    lo, hi = torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[100.0]], dtype=torch.float64)
    idx, w = _sparse_parzen(x, lo, hi, 24, kernel, 0.5)
    dense = torch.zeros(1, x.shape[1], 24, dtype=torch.float64).scatter_add_(-1, idx, w)
    atol = 1e-9 if kernel == "bspline" else 1e-3
    torch.testing.assert_close(dense, parzen_weights(x, lo, hi, 24, kernel, 0.5), atol=atol, rtol=0)


def test_box_mean_matches_brute_force():
    """Means over the in-image part of a centred window (no padding values leak in)."""
    x = torch.rand(1, 2, 9, 11, 13, dtype=torch.float64)
    for win in ((3, 3, 3), (5, 3, 7), (1, 5, 3), (21, 21, 21)):
        got = box_mean(x, win)
        r = [k // 2 for k in win]
        for z, y, xx in ((0, 0, 0), (4, 5, 6), (8, 10, 12), (2, 9, 1)):
            sl = [slice(max(0, c - p), c + p + 1) for c, p in zip((z, y, xx), r)]
            want = float(x[0, 1, sl[0], sl[1], sl[2]].mean())
            assert float(got[0, 1, z, y, xx]) == pytest.approx(want, abs=1e-12)
    small = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(box_mean(x, (3, 3, 3)), small, atol=1e-12)


def test_window_from_radius_is_spacing_aware():
    assert window_from_radius(9.0, (1.0, 1.0, 1.0)) == (19, 19, 19)
    assert window_from_radius(9.0, (1.0, 2.0, 3.0)) == (7, 9, 19)  # (Z, Y, X) order
    assert window_from_radius(1.0, (4.0, 4.0, 4.0)) == (3, 3, 3)  # at least one neighbour
    sim = make_similarity("lncc", radius_mm=6.0, spacing=(2.0, 2.0, 3.0))
    assert sim.window == (5, 7, 7)
    with pytest.raises(ConfigError):
        make_similarity("lncc", radius_mm=6.0)
    with pytest.raises(ConfigError):
        make_similarity("mi", bins=2)


def test_lncc_is_invariant_to_local_linear_intensity_change_and_eps_is_a_threshold():
    f = smooth_volume(0)
    cc = lncc_map(f, 3.0 * f + 7.0, (5, 5, 5))
    assert bool((((cc - 1.0).abs() < 1e-3) | (cc == 0.0)).all())  # 0 only below the variance threshold
    assert float(cc.mean()) > 0.9
    flat = torch.zeros_like(f)
    cc0 = lncc_map(f, flat, (5, 5, 5))
    assert float(cc0.abs().max()) == 0.0
    signed = lncc_map(f, -f, (5, 5, 5), squared=False)
    assert float(signed.mean()) == pytest.approx(-1.0, abs=1e-3)


def test_ncc_sign_and_range():
    f = smooth_volume(0)
    ncc = make_similarity("ncc")
    assert float(ncc(f, 2 * f + 1)) == pytest.approx(-1.0, abs=1e-5)
    assert float(ncc(f, -f)) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= float(ncc(f, smooth_volume(4))) <= 1.0
    assert math.isfinite(float(ncc(f, torch.zeros_like(f))))


# ------------------------------------------------------------------ the "bending" regulariser (flow.py)
def test_bending_energy_is_spacing_aware_and_zero_for_affine():
    """T5-style: the same smooth deformation on 1 mm and 2 mm grids has the same bending energy (per mm);
    an affine displacement has none."""
    from regcli.regularizers import make_regularizer

    bending = make_regularizer("bending")
    vals = []
    for h in (1.0, 2.0):
        n = int(48 / h)
        x = torch.arange(n, dtype=torch.float64) * h
        z, y, xx = torch.meshgrid(x, x, x, indexing="ij")
        u = torch.stack((2 * torch.sin(xx / 8) * torch.cos(y / 10), torch.cos(z / 7), torch.sin(z / 9)))[None]
        vals.append(float(bending(u, (h, h, h))))
        aff = torch.stack((0.1 * xx + 0.2 * y - 0.3 * z + 1, 0.05 * z, -0.1 * y))[None]
        assert float(bending(aff, (h, h, h))) < 1e-20
    assert vals[1] == pytest.approx(vals[0], rel=0.05)
    u = torch.zeros(1, 3, 8, 9, 10, requires_grad=True)
    bending(u, (1.0, 2.0, 3.0)).backward()
    assert torch.isfinite(u.grad).all()


def test_the_lncc_similarity_reuses_the_fixed_statistics_bit_for_bit():
    """The factory's LNCC keeps the fixed image's statistics between calls with the same (unchanged) fixed tensor:
    the same loss and gradient to the bit as computing everything each time; a changed or new fixed tensor is
    recomputed."""
    import regcli.similarity.lncc as L

    gen = torch.Generator().manual_seed(0)
    f = torch.rand(1, 2, 12, 13, 14, generator=gen)
    fn = L._make_lncc(window=(5, 3, 5))
    calls = []
    real = L.fixed_statistics
    try:
        L.fixed_statistics = lambda *a: calls.append(1) or real(*a)
        for _ in range(3):
            w = torch.rand(1, 2, 12, 13, 14, generator=gen, requires_grad=True)
            w2 = w.detach().clone().requires_grad_()
            a = fn(f, w)
            b = L.lncc(f, w2, None, (5, 3, 5))
            a.backward()
            b.backward()
            assert torch.equal(a, b) and torch.equal(w.grad, w2.grad)
        assert len(calls) == 1 + 3  # once for the factory's fixed image; lncc() itself computes them every time
        f.mul_(2.0)  # changed in place: recomputed
        fn(f, w.detach())
        fn(f.clone(), w.detach())  # another tensor: recomputed
        assert len(calls) == 6
    finally:
        L.fixed_statistics = real
