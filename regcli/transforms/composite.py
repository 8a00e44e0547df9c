"""Composite transforms in ANTs/ITK order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from regcli.spaces.grid import Grid, apply_affine
from regcli.transforms.displacement import DisplacementField


@dataclass
class CompositeTransform:
    """A transform list in the order of an ``antsApplyTransforms -t A -t B ...`` command line.

    Points go through the list **in order**: ``T(p) = B(A(p))``. (ANTs documents the list as
    "applied in reverse order", which describes how the *image* is moved; a fixed-space point, which
    is what resampling maps, meets the first listed transform first.) regcli's ``register`` output is
    ``[1Warp, 0GenericAffine]``, so a fixed point ``x`` maps to the moving point ``Affine(x + u(x))``,
    exactly as ``antsApplyTransforms -t prefix1Warp.nii.gz -t prefix0GenericAffine.mat`` does
    (checked against antspyx in tests/test_interop.py).
    """

    transforms: list = field(default_factory=list)

    def __post_init__(self) -> None:
        flat = []
        for t in self.transforms:
            flat.extend(t.transforms if isinstance(t, CompositeTransform) else [t])
        self.transforms = flat

    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Fixed world points (..., 3) -> moving world points (float64)."""
        p = points.to(torch.float64)
        for t in self.transforms:
            p = t.map_points(p)
        return p

    def to_displacement(self, grid: Grid, chunk: int = 1 << 21) -> DisplacementField:
        """Collapse into one displacement field ``u(x) = T(x) - x`` sampled on ``grid``."""
        zs, ys, xs = grid.shape
        slab = max(1, chunk // max(1, ys * xs))
        parts = []
        M = grid.index_to_world()
        for z0 in range(0, zs, slab):
            z1 = min(zs, z0 + slab)
            zz, yy, xx = torch.meshgrid(torch.arange(z0, z1, dtype=torch.float64), torch.arange(ys, dtype=torch.float64),
                                        torch.arange(xs, dtype=torch.float64), indexing="ij")
            p = apply_affine(M, torch.stack((xx, yy, zz), dim=-1))
            parts.append((self.map_points(p) - p).to(torch.float32).permute(3, 0, 1, 2))
        return DisplacementField(torch.cat(parts, dim=1).contiguous(), grid)

    def to_sitk(self):
        """SimpleITK CompositeTransform with the same mapping (for .h5 output)."""
        import SimpleITK as sitk

        comp = sitk.CompositeTransform(3)
        # ITK applies the last added transform first, so add ours in reverse.
        for t in reversed(self.transforms):
            comp.AddTransform(t.to_sitk_transform() if isinstance(t, DisplacementField) else t.to_sitk())
        return comp


def compose(transforms: Sequence) -> CompositeTransform:
    return CompositeTransform(list(transforms))
