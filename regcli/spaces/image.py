"""An image is a tensor plus the :class:`Grid` it lives on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from regcli.errors import GeometryError
from regcli.spaces.grid import Grid


@dataclass
class Image:
    """A scalar or multi-channel image on a grid.

    Attributes:
        data: ``(Z, Y, X)`` scalar or ``(C, Z, Y, X)`` multi-channel tensor (float32 for intensities,
            integer for label maps), in SimpleITK array order.
        grid: where the voxels are in world (LPS mm) space.
        name: a short description used in messages (usually the file path).
    """

    data: torch.Tensor
    grid: Grid
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if tuple(self.data.shape[-3:]) != self.grid.shape:
            raise GeometryError(
                f"{self.name or 'image'}: data shape {tuple(self.data.shape)} does not match grid {self.grid.shape}"
            )

    def to(self, device=None, dtype=None) -> "Image":
        return replace(self, data=self.data.to(device=device, dtype=dtype))

    def numpy(self) -> np.ndarray:
        return self.data.detach().cpu().numpy()

    def with_data(self, data: torch.Tensor, name: Optional[str] = None) -> "Image":
        return Image(data, self.grid, self.name if name is None else name, dict(self.meta))

    def to_sitk(self):
        """SimpleITK image with this grid (scalar, or vector when the data has a channel axis)."""
        import SimpleITK as sitk

        arr = self.numpy()
        if arr.ndim == 4:
            img = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
        else:
            img = sitk.GetImageFromArray(arr)
        return self.grid.apply_to_sitk(img)
