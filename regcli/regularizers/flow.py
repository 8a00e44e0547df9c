"""Flow regularisers differentiated in physical units (mm)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from regcli.registry import Registry

RegularizerFn = Callable[[torch.Tensor, Sequence[float]], torch.Tensor]
REGULARIZERS: Registry[Callable[..., RegularizerFn]] = Registry("regularizer")


def forward_differences(disp: torch.Tensor, spacing: Sequence[float]) -> list[torch.Tensor]:
    """Forward differences of (N, 3, Z, Y, X) along x, y, z, divided by the spacing (mm/mm)."""
    sx, sy, sz = (float(s) for s in spacing)
    return [
        (disp[..., :, :, 1:] - disp[..., :, :, :-1]) / sx,
        (disp[..., :, 1:, :] - disp[..., :, :-1, :]) / sy,
        (disp[..., 1:, :, :] - disp[..., :-1, :, :]) / sz,
    ]


def diffusion(disp: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Diffusion energy: sum over axes of the mean squared displacement gradient (dimensionless).

    On a grid of spacing h with the displacement in mm this equals ConvexAdam's voxel-unit penalty
    ``sum_axes mean((u_vox[i+1] - u_vox[i])^2)``, so its published weight (1.25) carries over. An axis of one
    voxel (a thin slab's coarse level) has no differences and adds nothing (its empty mean would be NaN).
    """
    return sum((d.pow(2).mean() for d in forward_differences(disp, spacing) if d.numel() > 0), disp.new_zeros(()))


@REGULARIZERS.register("diffusion")
def _make_diffusion(**_: object) -> RegularizerFn:
    return diffusion


def bending(disp: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Bending energy: mean over voxels of the squared second derivatives of the displacement (1/mm^2).

    ``sum_axes u_aa^2 + 2 * sum_{a<b} u_ab^2`` with derivatives in mm (central second differences,
    forward mixed differences), summed over the 3 components. ``disp`` is (N, 3, Z, Y, X) in mm and
    ``spacing`` the (x, y, z) voxel size in mm, so the value does not depend on the grid resolution.
    Affine displacements have zero bending energy.
    """
    sx, sy, sz = (float(s) for s in spacing)
    h = {4: sx, 3: sy, 2: sz}  # tensor dim -> spacing
    total = disp.new_zeros(())
    for d, ha in h.items():
        if disp.shape[d] < 3:
            continue
        n = disp.shape[d]
        second = (disp.narrow(d, 2, n - 2) - 2 * disp.narrow(d, 1, n - 2) + disp.narrow(d, 0, n - 2)) / (ha * ha)
        total = total + second.pow(2).mean()
    dims = sorted(h)
    for i, a in enumerate(dims):
        for b in dims[i + 1:]:
            if disp.shape[a] < 2 or disp.shape[b] < 2:
                continue
            da = disp.narrow(a, 1, disp.shape[a] - 1) - disp.narrow(a, 0, disp.shape[a] - 1)
            dab = da.narrow(b, 1, da.shape[b] - 1) - da.narrow(b, 0, da.shape[b] - 1)
            total = total + 2.0 * (dab / (h[a] * h[b])).pow(2).mean()
    return total


@REGULARIZERS.register("bending")
def _make_bending(**_: object) -> RegularizerFn:
    return bending


@REGULARIZERS.register("none")
def _make_none(**_: object) -> RegularizerFn:
    return lambda disp, spacing: disp.sum() * 0.0


def make_regularizer(name: str, **params) -> RegularizerFn:
    return REGULARIZERS.get(name)(**params)
