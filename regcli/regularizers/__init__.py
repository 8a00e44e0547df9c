"""Spacing-aware regularisers of displacement fields, chosen by name.

Every entry of :data:`REGULARIZERS` is a factory ``make(**params) -> fn`` with
``fn(disp, spacing) -> scalar``: ``disp`` is (N, 3, Z, Y, X) in mm and ``spacing`` the grid's (x, y, z)
voxel size in mm, so derivatives are per mm and values do not depend on the grid resolution.
"""

from regcli.regularizers.flow import REGULARIZERS, diffusion, make_regularizer

__all__ = ["REGULARIZERS", "diffusion", "make_regularizer"]
