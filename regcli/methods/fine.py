"""Fine refinement: a last instance optimisation on a grid finer than the working grid, after any method.

Every deformable method registers on the isotropic working grid (``working_spacing_mm``, 2 mm by default), so
its field cannot place a boundary more precisely than that grid resolves, and Dice on 1 mm label maps is
capped by it (docs/benchmarks.md, "Fine refinement"). With ``instance.fine_spacing_mm`` set, the method's
field is refined for ``instance.fine_iterations`` more iterations on the fixed image's grid at that spacing:

* the fixed image and the moving image carried through the affine stage are anti-aliased and resampled onto
  the fine grid once (from the original images, not from the working-grid copies);
* the objective is ConvexAdam's refinement (:func:`regcli.methods.convexadam.refine_on_working_grid`): MIND-SSC
  SSD with the ``instance.refine_*`` gradient floor, regulariser weight, smoothing and MIND dilation, and the
  Adam step ``instance.fine_learning_rate``;
* the transform model is ``instance.transform``, so a diffeomorphic model composes its update before the
  method's field and the result stays diffeomorphic; prompts, staged on the fine grid, join the objective;
* it computes in ``precision`` (the fine-grid images are cast to it).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from regcli.config import RegisterConfig
from regcli.features.intensity import smooth_for
from regcli.resample import resample_to_grid, upsample_field, warp
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.transforms.displacement import DisplacementField

STAGE_FINE = "fine refinement"
BYTES_PER_VOXEL = 250  # measured: peak 3.5 GB for the 5.5 M-voxel synthseg grids, about 2 GB of it this stage


def _warn_if_large(grid: Grid) -> None:
    """Log a warning when the fine stage would need more than half of the memory this machine has available."""
    need = BYTES_PER_VOXEL * grid.num_voxels
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    if need > avail / 2:
        import logging

        logging.getLogger("regcli").warning(
            "fine refinement: the %s grid (%.0f M voxels) needs about %.1f GB of the %.1f GB available; a "
            "coarser --fine-spacing needs less", "x".join(map(str, grid.size)), grid.num_voxels / 1e6,
            need / 1e9, avail / 1e9)


def fine_refinement(fixed: Image, moving: Image, affine, field: DisplacementField, grid: Grid,
                    config: RegisterConfig, fixed_mask: Optional[Image] = None, moving_mask: Optional[Image] = None,
                    prompts: Sequence = (), progress: Optional[Callable[[str, int, int], None]] = None,
                    device=None) -> tuple[DisplacementField, list[dict]]:
    """Refine ``field`` (the method's result on the working grid) on the fine ``grid``.

    Args:
        fixed, moving: the original images (any grids); ``affine`` maps fixed world points to moving ones.
        field: displacement (3, ...) mm on the working grid, fixed point ``x`` -> moving ``A(x + u(x))``.
        grid: the fine fixed-side grid (``fixed.grid.with_spacing(instance.fine_spacing_mm)``).
        fixed_mask, moving_mask: optional masks on the fixed / moving images' grids.
        prompts: test-time objective terms staged on ``grid``.
    Returns:
        the refined field on ``grid`` and the solver's loss history.
    """
    from regcli.methods.convexadam import _mask_on, refine_on_working_grid

    sp = config.instance.fine_spacing_mm
    dev = torch.device(device) if device is not None else field.disp.device
    if dev.type == "cpu":
        _warn_if_large(grid)
    dtype = getattr(torch, config.precision)
    with torch.no_grad():
        fdata = resample_to_grid(smooth_for(fixed, sp), grid).data.to(dev, dtype)
        mdata = warp(smooth_for(moving, sp), affine, grid).data.to(dev, dtype)
        fmask = _mask_on(fixed_mask, grid, "fixed")
        mmask = _mask_on(warp(moving_mask, affine, grid, "nearest"), grid, "moving") if moving_mask is not None \
            else None
        init = upsample_field(field.disp.to(dev, dtype), field.grid, grid)
    disp, history = refine_on_working_grid(fdata, mdata, grid, init, grid, fmask, mmask, config,
                                           config.instance.fine_iterations, progress or (lambda *a: None), dev,
                                           prompts, STAGE_FINE,
                                           config.instance.fine_learning_rate)
    return DisplacementField(disp.contiguous(), grid), history
