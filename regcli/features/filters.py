"""Small separable filters shared by features, solvers and models."""

from __future__ import annotations

import torch


def _replicate_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """``x`` with its first and last slice along ``dim`` repeated ``r`` times on each side."""
    n = x.shape[dim]
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    return torch.cat([first] * r + [x] + [last] * r, dim=dim)


def _box_1d(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Mean over ``2*radius+1`` voxels along tensor dimension ``dim``, edges replicated (same size out).

    Sums shifted slices of an edge-padded copy: on CPU this is 2-3x faster than ``avg_pool3d``.
    """
    if radius <= 0:
        return x
    n = x.shape[dim]
    xp = _replicate_pad(x, radius, dim)
    acc = xp.narrow(dim, 0, n).clone()
    for k in range(1, 2 * radius + 1):
        acc += xp.narrow(dim, k, n)
    return acc.div_(2 * radius + 1)


def conv1d_replicate(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Correlate ``x`` with an odd-length 1D ``kernel`` along ``dim``, edges replicated (same size out).

    A weighted sum of shifted slices of an edge-padded copy: on CPU about 15x faster than ``conv3d`` with
    a (k, 1, 1) kernel, and the same numbers.
    """
    r = kernel.numel() // 2
    n = x.shape[dim]
    w = [float(v) for v in kernel]
    if r == 0:
        return x * w[0]
    xp = _replicate_pad(x, r, dim)
    acc = xp.narrow(dim, 0, n) * w[0]
    for k in range(1, 2 * r + 1):
        acc.add_(xp.narrow(dim, k, n), alpha=w[k])
    return acc


def box_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable (2r+1)^3 box mean over the last three dimensions of (..., Z, Y, X), edges replicated.

    Equal to one 3D box filter on a replicate-padded volume.
    """
    for dim in (-3, -2, -1):
        x = _box_1d(x, radius, x.dim() + dim)
    return x
