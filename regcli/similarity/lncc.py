"""Normalised cross-correlation: local (LNCC, box window) and global (NCC).

Both are losses (lower is better): ``-mean(cc)`` over voxels, weighted by an optional mask. They are
invariant to a linear intensity change of either image, so they suit images of the same contrast.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch

from regcli.errors import ConfigError
from regcli.similarity.base import SIMILARITIES, masked_mean


def window_from_radius(radius_mm: float, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Odd box window ``(kz, ky, kx)`` in voxels covering ``radius_mm`` on each side of the centre.

    Args:
        radius_mm: half-width of the window in mm (> 0).
        spacing: voxel size (x, y, z) in mm of the grid the similarity is evaluated on.
    Returns:
        Window sizes in array order (Z, Y, X); each is ``2 * round(radius / spacing) + 1`` and at least 3.
    """
    if not radius_mm > 0:
        raise ConfigError(f"LNCC radius must be positive, got {radius_mm} mm")
    sx, sy, sz = (float(s) for s in spacing)
    return tuple(2 * max(1, int(round(radius_mm / s))) + 1 for s in (sz, sy, sx))  # type: ignore[return-value]


def _as_window(window: int | Sequence[int]) -> tuple[int, int, int]:
    w = (int(window),) * 3 if isinstance(window, (int, float)) else tuple(int(k) for k in window)
    if len(w) != 3 or min(w) < 1:
        raise ConfigError(f"LNCC window must be 1 or 3 positive voxel counts (Z, Y, X), got {window}")
    return w  # type: ignore[return-value]


def _box_mean_axis(x: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Mean over a centred window of ``k`` voxels along ``dim`` (only in-image voxels are averaged).

    Small windows (up to 9 voxels) add shifted copies, exact to float32 round-off; larger ones use
    cumulative sums in float64 (in float32 the difference of two long running sums loses the small
    local variances that LNCC divides by). The output has the input's shape and dtype.
    """
    n = x.shape[dim]
    r = min(k // 2, n - 1)
    if r <= 0:
        return x
    k = 2 * r + 1
    pad = [0] * (2 * x.dim())
    # F.pad lists (left, right) from the last dim backwards
    pad[2 * (x.dim() - 1 - dim)] = r
    pad[2 * (x.dim() - 1 - dim) + 1] = r
    if k <= 9:
        xp = torch.nn.functional.pad(x, pad)
        s = xp.narrow(dim, 0, n)
        for j in range(1, k):
            s = s + xp.narrow(dim, j, n)
    else:
        pad[2 * (x.dim() - 1 - dim)] = r + 1
        c = torch.nn.functional.pad(x.to(torch.float64), pad).cumsum(dim)
        s = (c.narrow(dim, k, n) - c.narrow(dim, 0, n)).to(x.dtype)
    i = torch.arange(n, device=x.device, dtype=x.dtype)
    count = torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1
    shape = [1] * x.dim()
    shape[dim] = n
    return s / count.view(shape)


def box_mean(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Separable box mean of (N, C, Z, Y, X) with a ``(kz, ky, kx)`` voxel window, same output shape.

    At the image border only voxels inside the image are averaged (no padding values leak in).
    """
    for dim, k in zip((2, 3, 4), window):
        x = _box_mean_axis(x, dim, int(k))
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the spatial axes of (N, C, Z, Y, X) ``x``, as (N, C, 1, 1, 1) of ``x``'s dtype, accumulated in
    float64: a float32 sum over a parallel split of the voxels rounds differently for different thread counts."""
    return x.mean(dim=(2, 3, 4), keepdim=True, dtype=torch.float64).to(x.dtype)


def fixed_statistics(fixed: torch.Tensor, window: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The part of :func:`lncc_map` that depends on the fixed image only: the image centred by its global mean,
    and the box means of it and of its square. A solver that compares one fixed image with many warped ones
    computes it once (the LNCC factory's similarity does)."""
    f = fixed - global_mean(fixed.detach())
    mf, mff = box_mean(torch.cat((f, f * f), dim=1), window).split(fixed.shape[1], dim=1)
    return f, mf, mff


def lncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: Sequence[int], eps: float = 1e-5,
             squared: bool = True, fixed_stats: Optional[tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
    """Local correlation coefficient per voxel.

    Args:
        fixed, warped: (N, C, Z, Y, X) float tensors on the same grid.
        window: box window (kz, ky, kx) in voxels.
        fixed_stats: :func:`fixed_statistics` of ``fixed`` and ``window``, when already computed.
        eps: local variance floor (intensity units squared): where the fixed image's local variance is
            not above it (flat regions), ``cc = 0``; the warped image's variance is floored at it. Where
            both are above it ``cc`` is exact (an eps added to the denominator instead would bias the
            optimum away from perfect alignment). For images normalised to [0, 1], 1e-5 treats a local
            standard deviation below 0.3 % of the range as flat; the affine stage uses 1e-3 (3 %).
        squared: ANTs' ``cc^2`` (sign-agnostic) when True, otherwise the signed ``cc`` in [-1, 1].
    Returns:
        (N, C, Z, Y, X) correlation map, dimensionless.
    """
    c = fixed.shape[1]
    # centring by the global means (no effect on covariances) keeps the running sums small, so the
    # float32 sums and E[x^2] - E[x]^2 stay accurate for data with a large offset (CT values, 3 * x + 7);
    # the means are accumulated in float64, so that they do not depend on the thread count (RELIABILITY N5).
    # Every channel's box mean is its own, so the fixed image's part may come from an earlier call.
    fixed, mf, mff = fixed_stats if fixed_stats is not None else fixed_statistics(fixed, window)
    warped = warped - global_mean(warped.detach())
    mw, mww, mfw = box_mean(torch.cat((warped, warped * warped, fixed * warped), dim=1), window).split(c, dim=1)
    cross = mfw - mf * mw
    vf = mff - mf * mf
    vw = mww - mw * mw
    # Voxels where the *fixed* image is locally flat carry no information: cc = 0 there, a set that does
    # not change with the transform. The warped variance is floored at eps rather than thresholded, so cc
    # is continuous in the transform. (ANTs' rule, cc = 0 where *either* image is flat, is discontinuous:
    # voxels jump in and out of the sum as the transform moves, and the optimiser exploits that; on a
    # phantom seen through two different grids it biased the affine result by 0.9 deg.)
    valid = vf > eps
    one = torch.ones((), dtype=vf.dtype, device=vf.device)
    denom = torch.where(valid, vf * torch.clamp(vw, min=eps), one)
    # |cc| <= 1 (Cauchy-Schwarz); float32 round-off in the variances can push it over, which the
    # optimiser would otherwise exploit near the variance floor
    if squared:
        cc = torch.clamp(cross * cross / denom, max=1.0)
    else:
        cc = torch.clamp(cross / torch.sqrt(denom), min=-1.0, max=1.0)
    return torch.where(valid, cc, torch.zeros((), dtype=cc.dtype, device=cc.device))


def lncc(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None,
         window: Sequence[int] = (9, 9, 9), eps: float = 1e-5, squared: bool = True,
         fixed_stats: Optional[tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
    """LNCC loss ``-mean(cc)`` (weighted by ``mask``), in [-1, 0] when ``squared``.

    Args:
        fixed, warped: (N, C, Z, Y, X) float intensities on the same grid.
        mask: optional (N, 1, Z, Y, X) weights in [0, 1] on that grid.
        window: box window (kz, ky, kx) in voxels; see :func:`window_from_radius`.
        fixed_stats: :func:`fixed_statistics` of ``fixed`` and ``window``, when already computed.
    """
    return -masked_mean(lncc_map(fixed, warped, window, eps, squared, fixed_stats), mask)


def ncc(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None,
        eps: float = 1e-8) -> torch.Tensor:
    """Global (signed) normalised cross-correlation loss ``-ncc`` in [-1, 1], per sample and channel,
    averaged; voxels are weighted by ``mask`` (N, 1, Z, Y, X) when given."""
    n, c = fixed.shape[:2]
    f = fixed.reshape(n, c, -1)
    w = warped.reshape(n, c, -1)
    if mask is None:
        wt = torch.ones_like(f[:, :1])
    else:
        wt = mask.reshape(n, 1, -1).to(f.dtype)
    tot = wt.sum(-1, keepdim=True) + eps
    mf = (wt * f).sum(-1, keepdim=True) / tot
    mw = (wt * w).sum(-1, keepdim=True) / tot
    df, dw = f - mf, w - mw
    cov = (wt * df * dw).sum(-1)
    vf = (wt * df * df).sum(-1)
    vw = (wt * dw * dw).sum(-1)
    return -(cov / torch.sqrt(vf * vw + eps)).mean()


@SIMILARITIES.register("lncc")
def _make_lncc(window: int | Sequence[int] | None = None, radius_mm: float | None = None,
               spacing: Sequence[float] | None = None, eps: float = 1e-5, squared: bool = True,
               **_: object):
    """LNCC factory: ``window`` in voxels, or ``radius_mm`` with the grid ``spacing`` (x, y, z) in mm.

    Default when neither is given: a 9-voxel window.
    """
    if window is not None:
        win = _as_window(window)
    elif radius_mm is not None:
        if spacing is None:
            raise ConfigError("LNCC with radius_mm needs the grid spacing (x, y, z) in mm")
        win = window_from_radius(radius_mm, spacing)
    else:
        win = (9, 9, 9)
    if not (eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"LNCC eps must be positive, got {eps}")

    last: dict = {}  # the fixed image of the last call (a weak reference), its version and its statistics

    def fn(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        stats = None
        if not fixed.requires_grad:  # a solver's fixed image, the same tensor at every iteration
            ref = last.get("ref")
            if ref is not None and ref() is fixed and last["version"] == fixed._version:
                stats = last["stats"]
            else:
                stats = fixed_statistics(fixed, win)
                last.update(ref=weakref.ref(fixed), version=fixed._version, stats=stats)
        return lncc(fixed, warped, mask, win, eps, squared, stats)

    fn.window = win  # type: ignore[attr-defined]
    return fn


@SIMILARITIES.register("ncc")
def _make_ncc(eps: float = 1e-8, **_: object):
    def fn(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ncc(fixed, warped, mask, eps)

    return fn
