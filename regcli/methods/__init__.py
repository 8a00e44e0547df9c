"""Deformable method presets, chosen by ``--method``.

Each entry maps a method name to ``"module:function"``; the function has the signature
``fn(fixed_w: Image, moving_w: Image, config, fixed_mask=None, moving_mask=None, progress=None, device=None,
prompts=()) -> DeformableResult`` where both images are already on the same isotropic working grid (moving
resampled through the affine stage). Imports are lazy so ``regcli --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Callable

from regcli.registry import Registry

METHODS: Registry[str] = Registry("method")
METHODS.register("convexadam")("regcli.methods.convexadam:convexadam")
METHODS.register("samconvex")("regcli.methods.samconvex:samconvex")
METHODS.register("dio")("regcli.methods.dio:dio")


def get_method(name: str) -> Callable:
    module, func = METHODS.get(name).split(":")
    return getattr(importlib.import_module(module), func)


def preflight(name: str, config) -> list[dict]:
    """Let a method check what it needs (e.g. model weights) before any computation starts: its module's
    ``preflight(config)``, when it defines one. Returns what that reports about the models it will use (for
    report.json: spec, source, folder, sha256, ...), or [] for a method without models."""
    module = importlib.import_module(METHODS.get(name).split(":")[0])
    check = getattr(module, "preflight", None)
    return list(check(config) or []) if check is not None else []
