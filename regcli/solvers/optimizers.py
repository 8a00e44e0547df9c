"""Optimizers by name. Each factory takes (param_groups_or_params, lr, **params) and returns a torch optimizer."""

from __future__ import annotations

import torch

from regcli.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, eps: float = 1e-8):
    """Adam. ``eps`` is the gradient floor: parameters whose gradient RMS is well below it barely move."""
    return torch.optim.Adam(params, lr=lr, eps=eps)


@OPTIMIZERS.register("sgd")
def _sgd(params, lr: float):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
