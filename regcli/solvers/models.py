"""Transform models for instance optimisation, chosen by name.

A model is a ``torch.nn.Module`` built as ``MODELS.get(name)(grid, init=None, **params)`` whose
``forward()`` returns the displacement ``(1, 3, Z, Y, X)`` float32 in world LPS mm on ``grid`` (the grid
on which the similarity is evaluated). Models may define ``param_groups(lr)`` to give Adam per-parameter
step sizes, and ``transform()`` to export what they represent (e.g. an :class:`AffineTransform`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from regcli.registry import Registry
from regcli.spaces.grid import Grid

MODELS: Registry[type] = Registry("transform model")


def box_smooth(disp: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` 3x3x3 box filters (replicate padding), i.e. a B-spline-like smoothing of (N,3,Z,Y,X)."""
    for _ in range(passes):
        disp = F.avg_pool3d(F.pad(disp, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return disp


@MODELS.register("displacement")
class DisplacementModel(nn.Module):
    """Free-form displacement: one 3-vector (mm) per grid voxel, optionally box-smoothed.

    Args:
        grid: the grid of the parameters (and of the output displacement).
        init: optional (3, Z, Y, X) or (1, 3, Z, Y, X) initial displacement in mm.
        smoothing_passes: 3x3x3 box passes applied to the parameters in ``forward`` (ConvexAdam uses 3).
    """

    def __init__(self, grid: Grid, init: Optional[torch.Tensor] = None, smoothing_passes: int = 0,
                 device=None, **_: object) -> None:
        super().__init__()
        self.grid = grid
        self.smoothing_passes = int(smoothing_passes)
        if init is None:
            init = torch.zeros((1, 3, *grid.shape), dtype=torch.float32, device=device)
        elif init.dim() == 4:
            init = init[None]
        self.disp = nn.Parameter(init.detach().clone().to(torch.float32))

    def forward(self) -> torch.Tensor:
        return box_smooth(self.disp, self.smoothing_passes)
