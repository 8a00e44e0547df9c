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


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-12) -> torch.Tensor:
    """MIND-SSC descriptor of a 3D image.

    Args:
        image: (1, 1, Z, Y, X) (or (N, 1, Z, Y, X), or (Z, Y, X)) float32 intensities on any grid (float64 is
            kept, anything else computed in float32); the radius and dilation are in voxels of that grid (use
            an isotropic grid).
        radius: patch radius r in voxels (box of (2r+1)^3).
        dilation: neighbour distance d in voxels.
        eps: floor of the variance estimate (only matters for images with no contrast at all).
    Returns:
        (N, 12, Z, Y, X) float32 (float64 for a float64 image) descriptor in (0, 1], on the same grid as
        ``image`` (dimensionless).
    """
    if image.dim() == 3:
        image = image[None, None]
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects (N, 1, Z, Y, X), got {tuple(image.shape)}")
    if radius < 0 or dilation < 1:
        raise ValueError(f"mind_ssc needs radius >= 0 and dilation >= 1, got {radius}, {dilation}")
    img = image.to(solver_dtype(image))
    # the descriptor ignores intensity offsets; removing the mean keeps float32 differences exact-ish
    # for images far from 0 (CT in HU, MRI with large offsets)
    img = img - img.mean(dim=(1, 2, 3, 4), keepdim=True)
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
    # MIND: subtract the per-voxel minimum, normalise by the per-voxel mean (clamped), exponentiate
    out.sub_(out.min(dim=1, keepdim=True).values)
    var = out.mean(dim=1, keepdim=True)
    mean_var = _typical_variance(var)
    lo = torch.clamp(mean_var * 1e-3, min=eps)
    hi = torch.clamp(mean_var * 1e3, min=eps)
    var = torch.maximum(torch.minimum(var, hi), lo)
    out.div_(var).neg_().exp_()
    return out
