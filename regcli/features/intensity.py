"""Intensity features: robust normalisation, Gaussian smoothing and an anti-aliased image pyramid.

Pyramid levels live on ``image.grid.with_spacing(level_mm)``: same field of view and direction as the
image, isotropic voxels of ``level_mm``. Downsampling averages blocks of whole voxels first (exact and
cheap on the image's own grid), adds the Gaussian smoothing still needed to reach the anti-aliasing
width, then resamples with :func:`regcli.resample.resample_to_grid`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from regcli.errors import InputError
from regcli.resample import resample_to_grid
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.features.filters import conv1d_replicate


# ----------------------------------------------------------------------------------------- normalisation
def percentile_range(data: torch.Tensor, lower: float = 0.5, upper: float = 99.5,
                     mask: Optional[torch.Tensor] = None, max_samples: int = 1 << 20) -> tuple[float, float]:
    """Robust intensity range ``(p_lower, p_upper)`` of ``data`` (any shape), in the data's units.

    Args:
        data: intensities (any shape, any float/int dtype).
        lower, upper: percentiles in [0, 100].
        mask: optional weights/booleans of the same shape; only voxels with ``mask > 0`` count.
        max_samples: at most this many voxels (a regular stride through the volume) are used.
    """
    x = data.detach().reshape(-1)
    if mask is not None:
        x = x[mask.detach().reshape(-1) > 0]
    if x.numel() == 0:
        raise InputError("cannot normalise intensities: the mask selects no voxels")
    step = max(1, x.numel() // max_samples)
    v = x[::step].to(torch.float64).cpu().numpy()
    lo, hi = np.percentile(v, [lower, upper])
    if not hi > lo:  # tiny foreground: fall back to the full range
        lo, hi = float(v.min()), float(v.max())
    return float(lo), float(hi)


def rescale(data: torch.Tensor, lo: float, hi: float, clip: bool = True) -> torch.Tensor:
    """``(data - lo) / (hi - lo)`` as float32, optionally clipped to [0, 1] (dimensionless)."""
    span = hi - lo if hi > lo else 1.0
    out = (data.to(torch.float32) - lo) / span
    return out.clamp_(0.0, 1.0) if clip else out


def robust_normalize(image: Image, lower: float = 0.5, upper: float = 99.5, mask: Optional[torch.Tensor] = None,
                     clip: bool = True) -> Image:
    """Image with intensities mapped so the ``lower``/``upper`` percentiles become 0/1 (float32)."""
    lo, hi = percentile_range(image.data, lower, upper, mask)
    out = image.with_data(rescale(image.data, lo, hi, clip))
    out.meta["intensity_range"] = (lo, hi)
    return out


# ----------------------------------------------------------------------------------------- smoothing
def gaussian_kernel1d(sigma_vox: float, truncate: float = 3.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised sampled Gaussian, ``2 * ceil(truncate * sigma) + 1`` taps."""
    r = max(1, int(math.ceil(truncate * sigma_vox)))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma_vox) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_smooth(data: torch.Tensor, sigma_vox: Sequence[float], truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian smoothing with edge replication.

    Args:
        data: (Z, Y, X), (C, Z, Y, X) or (N, C, Z, Y, X) float tensor.
        sigma_vox: standard deviation in voxels along (x, y, z) (ITK order); axes with sigma < 0.05 are skipped.
    Returns:
        Smoothed tensor of the same shape and dtype.
    """
    shape = data.shape
    x = data.reshape(-1, *shape[-3:])
    sx, sy, sz = (float(s) for s in sigma_vox)
    for dim, s in ((1, sz), (2, sy), (3, sx)):
        if s < 0.05 or x.shape[dim] < 2:
            continue
        k = gaussian_kernel1d(s, truncate, torch.float64)
        r = min(len(k) // 2, x.shape[dim] - 1)
        k = k[len(k) // 2 - r: len(k) // 2 + r + 1]
        x = conv1d_replicate(x, k / k.sum(), dim)
    return x.reshape(shape)


# ----------------------------------------------------------------------------------------- pyramid
def antialias_sigma_mm(source_spacing: float, target_spacing: float) -> float:
    """Gaussian std (mm) applied before going from ``source_spacing`` to ``target_spacing`` mm voxels.

    ``0.5 * sqrt(target^2 - source^2)``: half the target voxel (ANTs' "shrink 4, sigma 2 voxels") for
    large factors, and variances add up so smoothing in steps gives the same result; 0 when upsampling.
    """
    return 0.5 * math.sqrt(max(target_spacing ** 2 - source_spacing ** 2, 0.0))


def smooth_for(image: Image, target_spacing: float) -> Image:
    """``image`` Gaussian-smoothed (:func:`antialias_sigma_mm` per axis) before resampling it to
    ``target_spacing`` mm voxels; the image itself where that would be under 0.1 voxel."""
    sigma_vox = [antialias_sigma_mm(s, target_spacing) / s for s in image.grid.spacing]
    if max(sigma_vox) < 0.1:
        return image
    return image.with_data(gaussian_smooth(image.data, sigma_vox))


def _block_average(data: torch.Tensor, factors_zyx: Sequence[int], sizes_zyx: Sequence[int]) -> torch.Tensor:
    """Average non-overlapping blocks of (N, C, Z, Y, X) data; each axis is first padded with edge values
    to ``size * factor`` voxels (``size = ceil(n / factor)``) so the blocks cover the whole field of view."""
    pad = [0] * 6
    for a, (f, m) in enumerate(zip(factors_zyx, sizes_zyx)):
        n = data.shape[2 + a]
        need = f * m
        if need > n:
            pad[2 * (2 - a) + 1] = need - n
    if any(pad):
        data = F.pad(data, pad, mode="replicate")
    return F.avg_pool3d(data, tuple(int(f) for f in factors_zyx), stride=tuple(int(f) for f in factors_zyx))


def downsample(image: Image, spacing_mm: float | Sequence[float],
               smooth_for_mm: float | Sequence[float] | None = None) -> Image:
    """Anti-aliased resampling of ``image`` onto ``image.grid.with_spacing(spacing_mm)``.

    Blocks of ``floor(target / source)`` voxels are averaged, then a Gaussian brings the total smoothing
    to :func:`antialias_sigma_mm` per axis, then trilinear resampling lands on the target grid.

    Args:
        image: scalar (Z, Y, X) or multi-channel (C, Z, Y, X) image (integer data are cast to float32).
        spacing_mm: target voxel size in mm (a number for isotropic, or (x, y, z)).
        smooth_for_mm: smooth as for this (coarser) voxel size instead, while sampling at ``spacing_mm``:
            an oversampled image, e.g. to interpolate a moving image more accurately than its level.
    Returns:
        float32 image on ``image.grid.with_spacing(spacing_mm)``.
    """
    target = image.grid.with_spacing(spacing_mm)
    src_sp = np.asarray(image.grid.spacing, dtype=np.float64)
    tgt_sp = np.asarray(target.spacing, dtype=np.float64)
    smooth_sp = tgt_sp if smooth_for_mm is None else np.broadcast_to(
        np.asarray(smooth_for_mm, dtype=np.float64), (3,))
    data = image.data if torch.is_floating_point(image.data) else image.data.to(torch.float32)
    data = data.to(torch.float32)
    x = data.reshape(-1, 1, *data.shape[-3:])
    f = np.maximum(np.floor(tgt_sp / src_sp + 1e-6), 1).astype(int)  # (x, y, z)
    grid = image.grid
    if (f > 1).any():
        # blocks of f voxels: same first corner and direction, ceil(n / f) blocks (never loses field of view)
        g = image.grid.with_spacing(tuple(src_sp * f))
        n_blocks = np.ceil(np.asarray(image.grid.size) / f).astype(int)
        grid = Grid(tuple(n_blocks), g.spacing, g.origin, g.direction)
        x = _block_average(x, f[::-1].tolist(), list(grid.shape))
    # remaining smoothing (variances add: block average of f voxels has variance s^2 (f^2 - 1) / 12)
    var_box = (src_sp ** 2) * (f.astype(np.float64) ** 2 - 1.0) / 12.0
    var_tgt = np.array([antialias_sigma_mm(s, t) ** 2 for s, t in zip(src_sp, smooth_sp)])
    sigma_vox = np.sqrt(np.maximum(var_tgt - var_box, 0.0)) / np.asarray(grid.spacing)
    if (sigma_vox >= 0.1).any():
        x = gaussian_smooth(x, sigma_vox.tolist())
    x = x.reshape(*data.shape[:-3], *grid.shape)
    out = Image(x, grid, image.name, dict(image.meta))
    if not grid.allclose(target, rtol=1e-6):
        out = resample_to_grid(out, target, "linear")
    return out


def pyramid(image: Image, levels_mm: Sequence[float]) -> list[Image]:
    """One anti-aliased image per level (in the order given), each on ``image.grid.with_spacing(level)``."""
    return [downsample(image, lv) for lv in levels_mm]
