"""Mutual information with a differentiable Parzen-window joint histogram (Mattes-style).

The histogram range of each image is taken from its own data (masked minimum and maximum, not
differentiated), so any intensity range works, negative CT values included; there is no fixed
``[0, 1]`` assumption. Loss = ``-MI`` (nats) or ``-NMI`` with ``NMI = (H(F) + H(M)) / H(F, M)`` in [1, 2].
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from regcli.errors import ConfigError
from regcli.similarity.base import SIMILARITIES

Kernel = Literal["gaussian", "bspline"]


def _cubic_bspline(d: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel of distances ``d`` (in bins); support |d| < 2, integral 1."""
    a = d.abs()
    inner = (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    outer = torch.clamp(2.0 - a, min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def _value_range(x: torch.Tensor, weights: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (N, 1) minimum and maximum of ``x`` (N, V) over voxels with positive weight (detached)."""
    x = x.detach()
    if weights is None:
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    sel = weights.detach() > 0
    big = torch.finfo(x.dtype).max
    lo = torch.where(sel, x, torch.full_like(x, big)).amin(-1, keepdim=True)
    hi = torch.where(sel, x, torch.full_like(x, -big)).amax(-1, keepdim=True)
    empty = ~sel.any(-1, keepdim=True)
    lo = torch.where(empty, x.amin(-1, keepdim=True), lo)
    hi = torch.where(empty, x.amax(-1, keepdim=True), hi)
    return lo, hi


def _support(kernel: Kernel, sigma_bins: float) -> tuple[int, int]:
    """(first, last) bin offsets from ``floor(u)`` that can get weight; also the bin padding needed."""
    if kernel == "bspline":
        return -1, 2  # cubic B-spline: |d| < 2
    r = max(1, int(math.ceil(3.0 * sigma_bins)))
    return -r, r


def _bin_coordinate(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, pad: int) -> torch.Tensor:
    """Continuous bin coordinate in ``[pad, bins - 1 - pad]`` of intensities ``x`` (clamped to [lo, hi])."""
    span = torch.clamp(hi - lo, min=torch.finfo(x.dtype).eps * (1.0 + lo.abs()))
    return (torch.clamp(x, lo, hi) - lo) / span * (bins - 1 - 2.0 * pad) + pad


def _kernel(d: torch.Tensor, kernel: Kernel, sigma_bins: float) -> torch.Tensor:
    if kernel == "bspline":
        return _cubic_bspline(d)
    return torch.exp(-0.5 * (d / sigma_bins) ** 2)


def parzen_weights(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, kernel: Kernel = "gaussian",
                   sigma_bins: float = 0.5) -> torch.Tensor:
    """Soft bin memberships of intensities (dense form; :func:`joint_histogram` uses the sparse twin).

    Args:
        x: (N, V) intensities (any units).
        lo, hi: (N, 1) histogram range in the same units (values outside are clamped to it).
        bins: number of bins B.
        kernel: "gaussian" (std ``sigma_bins`` bins) or "bspline" (cubic B-spline, Mattes et al.).
    Returns:
        (N, V, B) weights, each row summing to 1.
    """
    first, last = _support(kernel, sigma_bins)
    u = _bin_coordinate(x, lo, hi, bins, max(-first, last))
    centres = torch.arange(bins, dtype=x.dtype, device=x.device)
    w = _kernel(u[..., None] - centres, kernel, sigma_bins)
    return w / (w.sum(-1, keepdim=True) + 1e-12)


def _sparse_parzen(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, kernel: Kernel,
                   sigma_bins: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of :func:`parzen_weights` that MI uses: bin indices (N, V, K) int64 and weights (N, V, K)
    summing to 1, for the K bins around each sample (K = 4 for the B-spline, 2 ceil(3 sigma) + 1 for
    the Gaussian). Weights are continuous in ``x``; the bin window moves with ``floor``."""
    first, last = _support(kernel, sigma_bins)
    pad = max(-first, last)
    if bins < 2 * pad + 2:
        raise ConfigError(f"MI needs at least {2 * pad + 2} bins for this kernel, got {bins}")
    u = _bin_coordinate(x, lo, hi, bins, pad)
    base = torch.floor(u.detach())
    offs = torch.arange(first, last + 1, dtype=u.dtype, device=u.device)
    idx = base[..., None] + offs  # (N, V, K), all within [0, bins - 1] thanks to the padding
    w = _kernel(u[..., None] - idx, kernel, sigma_bins)
    w = w / (w.sum(-1, keepdim=True) + 1e-12)
    return idx.clamp_(0, bins - 1).to(torch.int64), w


def joint_histogram(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    bins: int = 32, kernel: Kernel = "gaussian", sigma_bins: float = 0.5,
                    fixed_range: Optional[tuple[float, float]] = None,
                    warped_range: Optional[tuple[float, float]] = None, stride: int = 1) -> torch.Tensor:
    """Joint probability table of two images (Parzen windows, accumulated sparsely with ``scatter_add``).

    Args:
        fixed, warped: (N, C, Z, Y, X) intensities on the same grid (C is folded into N).
        mask: optional (N, 1, Z, Y, X) voxel weights in [0, 1].
        fixed_range, warped_range: fixed (lo, hi) histogram ranges; default: from the data.
        stride: use every ``stride``-th voxel (regular subsampling, for speed).
    Returns:
        (N*C, B, B) joint probabilities (rows: fixed bins, columns: warped bins), each table sums to 1.
    """
    n, c = fixed.shape[:2]
    f = fixed.reshape(n * c, -1)[:, ::stride]
    w = warped.reshape(n * c, -1)[:, ::stride]
    m = None
    if mask is not None:
        m = mask.expand(n, c, *mask.shape[2:]).reshape(n * c, -1)[:, ::stride].to(f.dtype)
    lo_f, hi_f = _value_range(f, m) if fixed_range is None else (
        torch.full_like(f[:, :1], fixed_range[0]), torch.full_like(f[:, :1], fixed_range[1]))
    lo_w, hi_w = _value_range(w, m) if warped_range is None else (
        torch.full_like(w[:, :1], warped_range[0]), torch.full_like(w[:, :1], warped_range[1]))
    i_f, p_f = _sparse_parzen(f, lo_f, hi_f, bins, kernel, sigma_bins)
    i_w, p_w = _sparse_parzen(w, lo_w, hi_w, bins, kernel, sigma_bins)
    if m is not None:
        p_f = p_f * m[..., None]
        total = m.sum(-1)[:, None]
    else:
        total = torch.full((n * c, 1), float(f.shape[1]), dtype=f.dtype, device=f.device)
    cell = (i_f[..., :, None] * bins + i_w[..., None, :]).reshape(n * c, -1)  # (N, V*K*K)
    vals = (p_f[..., :, None] * p_w[..., None, :]).reshape(n * c, -1)
    joint = torch.zeros((n * c, bins * bins), dtype=vals.dtype, device=vals.device).scatter_add(1, cell, vals)
    return (joint / (total + 1e-12)).reshape(n * c, bins, bins)


def _entropy(p: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    return -(p * torch.log(p + eps)).sum(dim=dims)


def mutual_information(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None,
                       bins: int = 32, kernel: Kernel = "gaussian", sigma_bins: float = 0.5,
                       normalized: bool = False, eps: float = 1e-10, stride: int = 1,
                       fixed_range: Optional[tuple[float, float]] = None,
                       warped_range: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Mutual information (nats) or normalised MI of two images, averaged over samples and channels.

    Args: see :func:`joint_histogram`; ``eps`` guards ``log(0)`` in empty bins.
    Returns:
        Scalar tensor: MI >= 0 (larger = more similar), or NMI in [1, 2] when ``normalized``.
    """
    joint = joint_histogram(fixed, warped, mask, bins, kernel, sigma_bins, fixed_range, warped_range, stride)
    p_f = joint.sum(2)
    p_w = joint.sum(1)
    h_f = _entropy(p_f, (1,), eps)
    h_w = _entropy(p_w, (1,), eps)
    h_fw = _entropy(joint, (1, 2), eps)
    if normalized:
        return ((h_f + h_w) / (h_fw + eps)).mean()
    return (h_f + h_w - h_fw).mean()


@SIMILARITIES.register("mi")
def _make_mi(bins: int = 32, kernel: Kernel = "gaussian", sigma_bins: float = 0.5, normalized: bool = False,
             eps: float = 1e-10, stride: int = 1, **_: object):
    """MI loss factory: ``fn(fixed, warped, mask=None) -> -MI`` (or ``-NMI``)."""
    if int(bins) < 4:
        raise ConfigError(f"MI needs at least 4 bins, got {bins}")
    if kernel not in ("gaussian", "bspline"):
        raise ConfigError(f"MI kernel must be 'gaussian' or 'bspline', got '{kernel}'")
    if not sigma_bins > 0:
        raise ConfigError(f"MI sigma_bins must be positive, got {sigma_bins}")
    bins, stride = int(bins), max(1, int(stride))

    def fn(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return -mutual_information(fixed, warped, mask, bins, kernel, sigma_bins, normalized, eps, stride)

    return fn
