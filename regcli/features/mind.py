"""MIND-SSC: modality independent neighbourhood descriptor, self-similarity-context variant.

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarity context", MICCAI 2013. The descriptor is what ConvexAdam matches.

For every voxel ``x`` take the six neighbours ``x ± d·e_k`` (``d`` = dilation, ``e_k`` the index axes).
The twelve pairs of neighbours that are ``d·√2`` apart (all pairs except opposite ones) each give a
patch distance::

    D_ab(x) = box_r( (I(· + d·a) - I(· + d·b))^2 )(x)        (box over (2r+1)^3 voxels)

and the descriptor is ``exp(-(D_ab - min_ab D) / V)`` with ``V`` the mean over the twelve channels of
``D_ab - min_ab D``, clamped to ``[1e-3, 1e3]`` times its mean over the image (in that mean each voxel's ``V``
counts at most 100 times the 99th percentile, so that a few extreme voxels do not set the clamp:
:func:`_typical_variance`). It is invariant to a global affine change of intensity (``a·I + b``, ``a != 0``) and
lies in ``(0, 1]``.

All work is done one channel at a time with separable box filters (``avg_pool3d`` along one axis at a
time), so the peak memory is the (12, Z, Y, X) output plus a few single-channel volumes.
"""

from __future__ import annotations

import itertools

import torch

from regcli.features.filters import box_filter
from regcli.runtime import solver_dtype
import torch.nn.functional as F

# the six neighbour directions, as (dz, dy, dx) in array order
_NEIGHBOURS = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))


def ssc_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 neighbour pairs (a, b) of MIND-SSC, each a pair of (dz, dy, dx) unit offsets.

    Pairs whose offsets are perpendicular (squared distance 2 between them); the opposite pairs
    (distance 2) are left out. Fixed order: this is the channel order of :func:`mind_ssc`.
    """
    pairs = []
    for a, b in itertools.combinations(_NEIGHBOURS, 2):
        if sum((p - q) ** 2 for p, q in zip(a, b)) == 2:
            pairs.append((a, b))
    return pairs


#: in the image's mean variance a voxel counts at most this many times the 99th percentile of the non-zero
#: variances (on real images the largest variance is 1.1-4.2 times that percentile: brains, CT, US)
OUTLIER_VARIANCE = 100.0


def _typical_variance(var: torch.Tensor) -> torch.Tensor:
    """The mean of ``var`` (N, 1, Z, Y, X) over each image, each voxel's value capped at :data:`OUTLIER_VARIANCE`
    times the image's 99th percentile of non-zero variances; (N, 1, 1, 1, 1).

    The published clamp uses the plain mean. One hot voxel (1e6 in a 0-250 brain) then raises it so far that the
    floor ``1e-3 * mean`` flattens the descriptor everywhere and the deformable stage wanders (mean error 2.1 mm
    after an affine stage at 0.18 mm). On an image with no such voxel nothing reaches the cap and the value is the
    plain mean, to the bit.
    """
    out = []
    for v in var.reshape(var.shape[0], -1):
        pos = v[v > 0]
        if pos.numel() == 0:
            out.append(v.mean())
            continue
        q99 = pos.float().kthvalue(max(1, int(0.99 * pos.numel()))).values.to(v.dtype)
        cap = q99 * OUTLIER_VARIANCE
        out.append(v.clamp(max=cap).mean() if bool((v > cap).any()) else v.mean())
    return torch.stack(out).reshape(-1, 1, 1, 1, 1)


#: the variance floor shared by two images is this many times the larger of their noise levels
#: (:func:`noise_level`) times each image's own typical variance. Chosen on a clean 3 mm brain against the
#: same brain moved by a known affine plus Gaussian noise (sd 20 of 250), a noisy 96 mm phantom and three CT
#: pairs (25 HU noise added): 5 and 10 left the phantom 35-45 mm off, 40 cost CT Dice; clean brains are
#: unchanged (docs/methods.md, section 4)
NOISE_FLOOR = 20.0

#: the noise level is this quantile of the per-voxel variance estimate over the voxels where it is not ~0
NOISE_QUANTILE = 0.05


def _self_distances(image: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """The twelve patch distances ``D_ab - min_ab D`` of :func:`mind_ssc`, (N, 12, Z, Y, X)."""
    if image.dim() == 3:
        image = image[None, None]
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (N, 1, Z, Y, X), got {tuple(image.shape)}")
    if radius < 0 or dilation < 1:
        raise ValueError(f"mind_ssc needs radius >= 0 and dilation >= 1, got {radius}, {dilation}")
    img = image.to(solver_dtype(image))
    # the descriptor ignores intensity offsets; removing the mean keeps float32 differences exact-ish
    # for images far from 0 (CT in HU, MRI with large offsets)
    # (accumulated in float64: a float32 sum split between threads rounds differently with 1 and 2 threads)
    img = img - img.mean(dim=(1, 2, 3, 4), keepdim=True, dtype=torch.float64).to(img.dtype)
    n, _, Z, Y, X = img.shape
    d = int(dilation)
    padded = F.pad(img, (d, d, d, d, d, d), mode="replicate")

    def shifted(offset: tuple[int, int, int]) -> torch.Tensor:
        dz, dy, dx = (d * o for o in offset)
        return padded[:, :, d + dz:d + dz + Z, d + dy:d + dy + Y, d + dx:d + dx + X]

    pairs = ssc_pairs()
    out = torch.empty((n, len(pairs), Z, Y, X), dtype=img.dtype, device=img.device)
    for c, (a, b) in enumerate(pairs):
        diff = (shifted(a) - shifted(b)).pow_(2)
        out[:, c:c + 1] = box_filter(diff, radius)
    del padded
    return out.sub_(out.min(dim=1, keepdim=True).values)


def _variances(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-voxel variance estimate ``V`` (N, 1, Z, Y, X) of the distances of :func:`_self_distances`, and its
    typical value per image (:func:`_typical_variance`): what both the noise level and the descriptor use."""
    var = out.mean(dim=1, keepdim=True)
    return var, _typical_variance(var)


def _image_noise(var: torch.Tensor, typical: torch.Tensor) -> float:
    """:func:`noise_level` from :func:`_variances` (the largest over the batch)."""
    levels = [0.0]
    for v, t in zip(var.reshape(var.shape[0], -1), typical.reshape(-1)):
        pos = v[v > 1e-6 * v.mean()]
        if pos.numel() == 0 or float(t) <= 0:
            continue
        pos = pos[::max(1, pos.numel() // 1_000_000)].float()  # a regular subsample: fast and deterministic
        q = pos.kthvalue(max(1, int(NOISE_QUANTILE * pos.numel()))).values
        levels.append(float(q) / float(t))
    return max(levels)


def noise_level(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> float:
    """How noisy an image looks to MIND-SSC: the 5th percentile of its per-voxel variance estimate ``V`` (over
    the voxels where ``V`` is not ~0), relative to its typical variance; dimensionless.

    In white noise every voxel's ``V`` is of the order of the noise variance, so the flattest voxels still
    have it (the 0-1 test phantom with noise of sd 0.03: 0.08). A clean image has flat regions whose ``V`` is
    near 0 (that phantom: 1e-5; the synthseg brains on the 2 mm working grid: 5e-4 to 8e-4; the 3 mm CT: 3e-4,
    3.5e-3 with 25 HU of noise added). Pass the larger of two images' levels to :func:`mind_ssc` as ``noise``.
    """
    return _image_noise(*_variances(_self_distances(image, radius, dilation)))


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-12,
             noise: float = 0.0) -> torch.Tensor:
    """MIND-SSC descriptor of a 3D image.

    Args:
        image: (1, 1, Z, Y, X) (or (N, 1, Z, Y, X), or (Z, Y, X)) float32 intensities on any grid (float64 is
            kept, anything else computed in float32); the radius and dilation are in voxels of that grid (use
            an isotropic grid).
        radius: patch radius r in voxels (box of (2r+1)^3).
        dilation: neighbour distance d in voxels.
        eps: floor of the variance estimate (only matters for images with no contrast at all).
        noise: a noise level (:func:`noise_level`; pass the larger of the fixed and moving images' levels, as
            :func:`mind_ssc_pair` does and returns). The variance estimate is floored at :data:`NOISE_FLOOR` times
            it times the image's typical variance, so that differences at the noise level do not count as structure:
            where one image is clean and the other noisy, the clean image's flat regions would otherwise get
            sharp, arbitrary descriptors (its variance at the ``1e-3`` clamp) that the other image's noise
            matches anywhere. 0 (the default) gives the published descriptor.
    Returns:
        (N, 12, Z, Y, X) float32 (float64 for a float64 image) descriptor in (0, 1], on the same grid as
        ``image`` (dimensionless).
    """
    out = _self_distances(image, radius, dilation)
    return _descriptor(out, *_variances(out), noise, eps)


def _descriptor(out: torch.Tensor, var: torch.Tensor, mean_var: torch.Tensor, noise: float,
                eps: float = 1e-12) -> torch.Tensor:
    """MIND-SSC from the distances of :func:`_self_distances` and their :func:`_variances`, in place: divided by
    the per-voxel variance estimate (clamped, floored by ``noise``: :func:`mind_ssc`) and exponentiated."""
    lo = torch.clamp(mean_var * max(1e-3, NOISE_FLOOR * noise), min=eps)
    hi = torch.clamp(mean_var * 1e3, min=eps)
    return out.div_(torch.maximum(torch.minimum(var, hi), lo)).neg_().exp_()


def mind_ssc_pair(fixed: torch.Tensor, moving: torch.Tensor, radius: int = 1, dilation: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MIND-SSC of two images that are to be matched, floored by the noisier of the two: :func:`mind_ssc` of
    each with ``noise`` the larger :func:`noise_level`, and that level (for more descriptors of the same pair,
    e.g. of the moving image warped). Each image (1, 1, Z, Y, X) or (Z, Y, X).

    Below a noise level of ``1e-3 / NOISE_FLOOR`` the floor is the published ``1e-3`` clamp, and the descriptors
    are the published ones to the bit.
    """
    dists = [_self_distances(image, radius, dilation) for image in (fixed, moving)]
    stats = [_variances(out) for out in dists]
    noise = max(_image_noise(*s) for s in stats)
    return _descriptor(dists[0], *stats[0], noise), _descriptor(dists[1], *stats[1], noise), noise
