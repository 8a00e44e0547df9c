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
    ``sum_axes mean((u_vox[i+1] - u_vox[i])^2)``, so its published weight (1.25) carries over.
    """
    return sum(d.pow(2).mean() for d in forward_differences(disp, spacing))


@REGULARIZERS.register("diffusion")
def _make_diffusion(**_: object) -> RegularizerFn:
    return diffusion


@REGULARIZERS.register("none")
def _make_none(**_: object) -> RegularizerFn:
    return lambda disp, spacing: disp.sum() * 0.0


def make_regularizer(name: str, **params) -> RegularizerFn:
    return REGULARIZERS.get(name)(**params)
