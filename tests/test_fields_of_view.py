"""Where the working grid meets the end of the fixed image's field of view (pipeline.moving_within_fixed_view).

The truth in every case here is the identity: the fixed image is the moving one cut shorter along z (the same
voxels at the same world positions), or the moving image itself. Blobs reach the cut, as a body does at the ends
of a CT. ConvexAdam's working grid is a lattice of a multiple of 6 voxels centred on the fixed field of view, so it
reaches up to 5 mm past it; there the fixed image was zero while the moving one went on, and the field bent by up
to 3.7 mm next to the cut (found by a bug hunt, s23).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regcli.config import build_config
from regcli.pipeline import moving_within_fixed_view, register_images
from regcli.resample import inside_field_of_view, resample_to_grid
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.transforms import AffineTransform


def _blobs(nz: int) -> Image:
    """45 x 45 x ``nz`` voxels of 1 mm, blobs of 4-8 mm radius, two of them across the z ends."""
    z, y, x = np.mgrid[0:nz, 0:45, 0:45].astype(np.float64)
    a = sum(amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * r * r))
            for cx, cy, cz, r, amp in [(27, 25, 21, 8, 100), (12, 30, 29, 6, 80), (30, 10, 27, 5, 120),
                                       (18, 16, 13, 7, 60), (34, 32, 35, 4, 90), (22, 22, 2, 6, 70),
                                       (20, 24, 43, 6, 70)])
    grid = Grid((45, 45, nz), (1.0, 1.0, 1.0), (-22.0, -22.0, -22.5), np.eye(3))
    return Image(torch.from_numpy(a.astype(np.float32)), grid, "blobs")


def _cut(img: Image, z0: int, z1: int) -> Image:
    """Slices [z0, z1) of ``img``, at the same world positions."""
    g = img.grid
    origin = tuple(np.asarray(g.origin) + g.direction_matrix @ np.array([0.0, 0.0, z0 * g.spacing[2]]))
    grid = Grid((g.size[0], g.size[1], z1 - z0), g.spacing, origin, g.direction)
    return Image(img.data[z0:z1].clone(), grid, f"{img.name}[{z0}:{z1}]")


def _largest_mm(reg) -> float:
    return float(reg.field.disp.norm(dim=0).max())


@pytest.mark.parametrize("z0, z1", [(3, 43), (3, 44)])
def test_a_fixed_image_cut_from_the_moving_one_is_not_bent_at_the_cut(z0, z1):
    """40 and 41 mm of a 46 mm moving image: the lattice reaches 2-4 mm past the cut. Before: 3.5 and 3.7 mm of
    deformation at the cut, 2.5 mm two slices in; now under 0.1 mm everywhere."""
    moving = _blobs(46)
    fixed = _cut(moving, z0, z1)
    cfg = build_config(None, {"method": "convexadam", "affine": {"enabled": False}, "threads": 1, "seed": 0})
    reg = register_images(fixed, moving, cfg)
    assert _largest_mm(reg) < 0.1


def test_the_moving_image_is_zero_where_the_fixed_one_is_undefined_and_untouched_elsewhere():
    moving = _blobs(46)
    fixed = _cut(moving, 3, 43)
    work = fixed.grid.centred_lattice(2.0, 6, 0)
    mw = resample_to_grid(moving, work)
    inside = inside_field_of_view(fixed.grid, work)
    assert not bool(inside.all()) and bool(inside.any())
    m2 = moving_within_fixed_view(mw, fixed.grid, work)
    assert bool((m2.data[~inside] == 0).all()) and bool((mw.data[~inside] != 0).any())
    assert torch.equal(m2.data[inside], mw.data[inside])
    # the same test as the sampling: a voxel inside the buffer has the image's value, one outside the default
    sampled = resample_to_grid(Image(torch.ones(fixed.grid.shape), fixed.grid), work, default=0.0).data
    assert torch.equal(sampled > 0.5, inside)
    # through a transform: the moving image's buffer seen from the working grid
    shifted = AffineTransform.translation([0.0, 0.0, 6.0])  # the moving image ends 6 mm sooner in +z
    seen = inside_field_of_view(moving.grid, work, shifted)
    assert torch.equal(seen, warp_ones(moving, shifted, work))
    # a working grid inside the fixed field of view: the same tensor back
    inner = Grid((20, 20, 10), (2.0, 2.0, 2.0), (-19.0, -19.0, -9.0), np.eye(3))
    mi = resample_to_grid(moving, inner)
    assert moving_within_fixed_view(mi, fixed.grid, inner) is mi


def warp_ones(image: Image, transform, reference: Grid) -> torch.Tensor:
    from regcli.resample import warp

    return warp(Image(torch.ones(image.grid.shape), image.grid), transform, reference, default=0.0).data > 0.5
