"""Deformable method presets, chosen by ``--method``.

Each entry maps a method name to ``"module:function"``; the function has the signature
``fn(fixed_w: Image, moving_w: Image, config, fixed_mask=None, moving_mask=None, progress=None, device=None,
prompts=()) -> DeformableResult`` where both images are already on the same isotropic working grid (moving
resampled through the affine stage). Imports are lazy so ``regcli --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

from regcli.registry import Registry

METHODS: Registry[str] = Registry("method")
METHODS.register("convexadam")("regcli.methods.convexadam:convexadam")
METHODS.register("samconvex")("regcli.methods.samconvex:samconvex")
METHODS.register("dio")("regcli.methods.dio:dio")
METHODS.register("foundation")("regcli.methods.foundation:foundation")
METHODS.register("promptreg")("regcli.methods.promptreg:promptreg")


def get_method(name: str) -> Callable:
    module, func = METHODS.get(name).split(":")
    return getattr(importlib.import_module(module), func)


def preflight(name: str, config) -> list[dict]:
    """Let a method check what it needs (e.g. model weights) before any computation starts: its module's
    ``preflight(config)``, when it defines one. Returns what that reports about the models it will use (for
    report.json: spec, source, folder, sha256, ...), or [] for a method without models."""
    check = _hook(name, "preflight")
    return list(check(config) or []) if check is not None else []


def _hook(name: str, hook: str):
    return getattr(importlib.import_module(METHODS.get(name).split(":")[0]), hook, None)


def prepare_images(name: str, fixed, moving, config):
    """The method module's ``prepare_images(fixed, moving, config)`` (intensity preparation on the original
    grids, before resampling onto the working grid, e.g. a network's windowing), or the images unchanged."""
    own = _hook(name, "prepare_images")
    return own(fixed, moving, config) if own is not None else (fixed, moving)


def working_grid(name: str, fixed_grid, config):
    """The deformable working grid for method ``name`` and whether to smooth images before resampling onto it:
    the method module's ``working_grid(fixed_grid, config)`` when it defines one (e.g. a network's input grid),
    else the fixed field of view at ``config.working_spacing_mm``, smoothed."""
    own = _hook(name, "working_grid")
    if own is not None:
        return own(fixed_grid, config)
    rule = lattice_rule(name, config)
    if rule is None:
        return fixed_grid.with_spacing(config.working_spacing_mm), True
    return fixed_grid.centred_lattice(config.working_spacing_mm, *rule), True


def lattice_rule(name: str, config) -> Optional[tuple[int, int]]:
    """``(multiple, remainder)``: the working grid of method ``name`` has ``remainder (mod multiple)`` voxels per axis,
    so that the coarser grids it pools from it are symmetric about its centre and the result does not depend on how
    the fixed image is stored (:meth:`~regcli.spaces.grid.Grid.centred_lattice`): ConvexAdam and DIO average-pool
    (cost-volume and IO grids, DIO's levels), so a multiple of every factor.

    None for SAMConvex, which keeps the grid of :meth:`~regcli.spaces.grid.Grid.with_spacing`: it keeps every 2nd,
    4th and 8th voxel for its pyramid, which would need one more than a multiple of 8 voxels per axis (34 % more
    voxels on the example brain), and its network is not flip-invariant anyway. On a phantom, an odd count alone
    left its float32 and float64 runs 0.29 mm apart at a landmark (0.01 mm on its own grid)."""
    from math import lcm

    if name == "samconvex":
        return None
    factors = list(config.dio.levels) if name == "dio" else [config.convex.grid_sp, config.instance.grid_sp_adam]
    return lcm(*(int(f) for f in factors)), 0
