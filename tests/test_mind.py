"""MIND-SSC features (regcli.features.mind)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage as ndi

from regcli.features.mind import box_filter, mind_ssc, mind_ssc_pair, noise_level, ssc_pairs

from conftest import make_phantom


@pytest.fixture(autouse=True)
def one_thread():
    """Small volumes: a second OpenMP thread only adds synchronisation (and stalls on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _phantom_tensor(size=(36, 34, 32)) -> torch.Tensor:
    img = make_phantom("LPS", "iso", size=size)
    return torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32))[None, None]


def _reference_mind(img: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """Direct NumPy/SciPy transcription of the definition (edge-replicated borders), (12, Z, Y, X)."""
    d = dilation
    padded = np.pad(img, d, mode="edge")
    Z, Y, X = img.shape

    def shifted(o):
        dz, dy, dx = (d * v for v in o)
        return padded[d + dz:d + dz + Z, d + dy:d + dy + Y, d + dx:d + dx + X]

    ssd = np.stack([ndi.uniform_filter((shifted(a) - shifted(b)) ** 2, 2 * radius + 1, mode="nearest")
                    for a, b in ssc_pairs()])
    mind = ssd - ssd.min(0, keepdims=True)
    var = mind.mean(0, keepdims=True)
    m = var.mean()
    var = np.clip(var, 1e-3 * m, 1e3 * m)
    return np.exp(-mind / var)


def test_pairs_are_the_twelve_ssc_pairs():
    pairs = ssc_pairs()
    assert len(pairs) == 12
    for a, b in pairs:
        assert sum((p - q) ** 2 for p, q in zip(a, b)) == 2  # perpendicular neighbours, never opposite


def test_box_filter_equals_3d_box_with_replicated_edges():
    x = torch.rand(2, 3, 9, 10, 11, dtype=torch.float64)
    for r in (1, 2):
        ref = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(x, (r,) * 6, mode="replicate"), 2 * r + 1, 1)
        assert torch.allclose(box_filter(x, r), ref, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_filter_sums_in_place_bit_for_bit_like_the_padded_sum(dtype):
    """The in-place slice sums give the padded sum's numbers exactly (same terms in the same order), on axes
    longer and shorter than the window, and autograd (which takes the padded path) gets the same values."""
    from regcli.features.filters import _box_1d, _replicate_pad

    def padded(x, r, dim):
        n, xp = x.shape[dim], _replicate_pad(x, r, dim)
        acc = xp.narrow(dim, 0, n).clone()
        for k in range(1, 2 * r + 1):
            acc += xp.narrow(dim, k, n)
        return acc.div_(2 * r + 1)

    g = torch.Generator().manual_seed(3)
    for shape in [(2, 3, 9, 10, 11), (1, 4, 2, 7), (5, 1, 3)]:
        x = torch.randn(*shape, generator=g, dtype=dtype) * 100
        for r in (1, 2, 3):
            for dim in range(x.dim()):
                assert torch.equal(_box_1d(x, r, dim), padded(x, r, dim)), (shape, r, dim)
    x = torch.randn(1, 3, 6, 7, 8, generator=g, dtype=dtype, requires_grad=True)
    assert torch.equal(box_filter(x, 1).detach(), box_filter(x.detach(), 1))
    assert torch.autograd.gradcheck(lambda t: box_filter(t, 1), (x.detach().double().requires_grad_(),))


def test_shape_range_and_reference():
    img = _phantom_tensor()
    out = mind_ssc(img, radius=1, dilation=2)
    assert out.shape == (1, 12, *img.shape[2:]) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() > 0 and out.max() <= 1.0 + 1e-6
    ref = _reference_mind(img[0, 0].double().numpy(), 1, 2)
    assert np.abs(out[0].numpy() - ref).max() < 1e-4


def test_invariant_to_global_affine_intensity_change():
    img = _phantom_tensor()
    ref = mind_ssc(img)
    for a, b in ((2.5, -3.0), (-0.5, 10.0), (1000.0, 0.0)):
        assert (mind_ssc(a * img + b) - ref).abs().max() < 2e-4, (a, b)


def test_shifted_image_gives_shifted_features():
    img = torch.nn.functional.pad(_phantom_tensor(), (6,) * 6)  # zero background all round
    shift = (2, -3, 1)  # (z, y, x) voxels
    moved = torch.roll(img, shifts=shift, dims=(2, 3, 4))  # only background wraps round
    a = torch.roll(mind_ssc(img, 1, 2), shifts=shift, dims=(2, 3, 4))
    b = mind_ssc(moved, 1, 2)
    m = 3 + 2 + 1  # shift + dilation + radius: away from the borders
    inner = (slice(None), slice(None), slice(m, -m), slice(m, -m), slice(m, -m))
    assert (a[inner] - b[inner]).abs().max() < 1e-5


def test_finite_on_constant_regions_and_constant_images():
    img = _phantom_tensor()
    img[..., :10, :, :] = 0.7  # a constant slab
    out = mind_ssc(img)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[..., 3:6, :, :], torch.ones(()), atol=1e-6)  # no structure: all channels equal
    const = mind_ssc(torch.full((1, 1, 12, 13, 14), 3.0))
    assert torch.isfinite(const).all() and torch.allclose(const, torch.ones(()))


def test_accepts_zyx_and_batches():
    img = _phantom_tensor((20, 18, 16))
    a = mind_ssc(img[0, 0])
    b = mind_ssc(torch.cat([img, 2 * img + 1]))
    assert a.shape == (1, 12, 16, 18, 20) and b.shape == (2, 12, 16, 18, 20)
    assert (b[1] - a[0]).abs().max() < 1e-4


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mind_ssc(torch.zeros(1, 2, 8, 8, 8))


def test_one_extreme_voxel_does_not_flatten_the_descriptor_elsewhere():
    """The variance clamp's mean caps each voxel at 100 x the 99th percentile: one voxel at 1e6 in a 0-250 phantom
    barely changes the features away from it (with the plain mean they flatten everywhere); on an image without
    such voxels (real brains, CT, US: at most 4.2 x that percentile) the descriptor is the published one, to the bit."""
    import regcli.features.mind as mind

    img = torch.from_numpy(sitk.GetArrayFromImage(make_phantom(size=(48, 46, 44))) * 250.0).float()
    clean = mind_ssc(img)
    hot = img.clone()
    hot[24, 23, 22] = 1e6
    far = torch.ones_like(img, dtype=torch.bool)
    far[19:30, 18:29, 17:28] = False  # the hot voxel's neighbourhood (dilation 2 + box radius 1 + margin)
    assert (mind_ssc(hot) - clean)[0][:, far].abs().mean() < 0.01  # measured 0.005
    plain = mind._typical_variance
    try:
        mind._typical_variance = lambda var: var.mean(dim=(1, 2, 3, 4), keepdim=True)
        assert (mind_ssc(hot) - clean)[0][:, far].abs().mean() > 0.1  # the published clamp: 0.147
        assert torch.equal(mind_ssc(img), clean)
    finally:
        mind._typical_variance = plain


def _noisy(img: torch.Tensor, sd: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return img + sd * torch.randn(img.shape, generator=g)


def test_noise_level_tells_a_noisy_image_from_a_clean_one_whatever_its_gain():
    """The 5th percentile of MIND's variance estimate relative to the typical variance: about 0 where flat regions
    exist (a clean phantom), large where noise fills every voxel; a gain and an offset change nothing."""
    img = _phantom_tensor()
    clean, noisy = noise_level(img), noise_level(_noisy(img, 0.03))
    assert clean < 1e-4 and noisy > 0.04, (clean, noisy)  # measured 1.3e-5 and 0.081
    assert noise_level(250.0 * _noisy(img, 0.03) - 40.0) == pytest.approx(noisy, rel=1e-3)


def test_a_clean_pair_gets_the_published_descriptors_to_the_bit():
    a = _phantom_tensor()
    b = torch.roll(a, shifts=(1, -2, 1), dims=(2, 3, 4))
    fa, fb, _ = mind_ssc_pair(a, b)
    assert torch.equal(fa, mind_ssc(a)) and torch.equal(fb, mind_ssc(b))


def test_a_noisy_partner_flattens_the_clean_image_where_it_has_no_structure_above_the_noise():
    """Against a noisy image, the clean image's weak structure (the phantom's smooth body: variances at the 1e-3
    clamp) no longer gives sharp descriptors that the noise could match anywhere; strong edges keep theirs."""
    img = _phantom_tensor()
    noisy = _noisy(img, 0.03)
    alone = mind_ssc(img)[0]
    paired, _, _ = mind_ssc_pair(img, noisy)
    spread = lambda f: (f.max(0).values - f.min(0).values)  # noqa: E731  0 where all channels agree (flat)
    flat_alone, flat_paired = spread(alone), spread(paired[0])
    import regcli.features.mind as mind

    var = mind._self_distances(img, 1, 2)[0].mean(0)
    weak = (var > 1e-6 * var.mean()) & (var < 1e-2 * var.mean())  # structure far below the partner's noise
    strong = var > var.mean()
    # measured: 6384 voxels, spread 0.49 alone -> 0.003 paired; strong edges 0.94 -> 0.93
    assert int(weak.sum()) > 1000 and float(flat_alone[weak].mean()) > 0.3  # sharp although nearly flat
    assert float(flat_paired[weak].mean()) < 0.1 * float(flat_alone[weak].mean())
    assert float(flat_paired[strong].mean()) > 0.5 * float(flat_alone[strong].mean())
    assert noise_level(noisy) > 1e3 * noise_level(img)
    assert torch.equal(mind_ssc_pair(noisy, img)[1], paired)  # the noisier image sets the floor, in either order
