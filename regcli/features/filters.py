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

    ``out[i] = (x[c(i - r)] + x[c(i - r + 1)] + ... + x[c(i + r)]) / (2r + 1)`` with ``c`` clamping to the axis,
    summed in that order. Shifted slices are added into the output directly, without an edge-padded copy: 3 + 2r
    passes over memory instead of 5 + 2r (about 2x faster on CPU than the padded sum, 4-6x than
    ``avg_pool3d``), and the same numbers bit for bit. Under autograd the padded sum is used.
    """
    if radius <= 0:
        return x
    n, r = x.shape[dim], radius
    if n <= 2 * r or (x.requires_grad and torch.is_grad_enabled()):
        # every output voxel reaches an edge, or autograd records the graph (``out=`` is not differentiable):
        # sum an edge-padded copy
        xp = _replicate_pad(x, r, dim)
        acc = xp.narrow(dim, 0, n).clone()
        for k in range(1, 2 * r + 1):
            acc += xp.narrow(dim, k, n)
        return acc.div_(2 * r + 1)

    def part(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return t.narrow(dim, start, stop - start)

    acc = torch.empty_like(x)
    # the first two terms (shifts -r and 1 - r) in one pass; the first r output voxels clamp them to voxel 0
    torch.add(part(x, 0, n - r), part(x, 1, n - r + 1), out=part(acc, r, n))
    for i in range(r):
        torch.add(x.narrow(dim, 0, 1), x.narrow(dim, max(0, i - r + 1), 1), out=acc.narrow(dim, i, 1))
    for s in range(2 - r, r + 1):  # the other shifts, in increasing order
        if s < 0:
            part(acc, -s, n).add_(part(x, 0, n + s))
            part(acc, 0, -s).add_(x.narrow(dim, 0, 1))
        elif s == 0:
            acc.add_(x)
        else:
            part(acc, 0, n - s).add_(part(x, s, n))
            part(acc, n - s, n).add_(x.narrow(dim, n - 1, 1))
    return acc.div_(2 * r + 1)


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
