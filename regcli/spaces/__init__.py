"""Physical space: :class:`Grid` (geometry) and :class:`Image` (tensor + grid)."""

from regcli.spaces.grid import Grid, apply_affine, apply_linear, points_to_sampling_grid, sampling_grid
from regcli.spaces.image import Image

__all__ = ["Grid", "Image", "apply_affine", "apply_linear", "sampling_grid", "points_to_sampling_grid"]
