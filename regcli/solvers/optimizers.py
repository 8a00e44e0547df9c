"""Optimizers by name. Each factory takes (param_groups_or_params, lr, **params) and returns an optimizer.

Adam and SGD are written here (a few lines each) rather than taken from ``torch.optim``: any
``torch.optim.Optimizer`` imports ``torch._dynamo`` on first use, about one second of start-up on these
CPUs, paid by every ``regcli register``. They follow ``torch.optim.Adam`` / ``SGD(nesterov=True)`` formula
for formula (so results agree to float rounding) and support what the solvers use: parameter groups with
their own ``lr``, ``zero_grad(set_to_none=True)`` and ``step()``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from regcli.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")


class _Optimizer:
    """Parameter groups (dicts with ``params`` and hyper-parameters) and per-parameter state."""

    def __init__(self, params: Iterable, defaults: dict) -> None:
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        for g in params:
            group = dict(defaults)
            group.update(g)
            group["params"] = list(group["params"])
            self.param_groups.append(group)
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


class Adam(_Optimizer):
    """Adam (Kingma & Ba) with bias correction, as ``torch.optim.Adam`` (no weight decay, no amsgrad).

    ``eps`` is the gradient floor: a parameter whose gradient RMS is well below it moves by about
    ``lr * grad / eps`` (plain gradient descent) instead of the full step ``lr``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if st is None:
                    st = self.state[p] = {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)}
                st["step"] += 1
                t = st["step"]
                st["m"].lerp_(p.grad, 1 - b1)
                st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                bc1 = 1 - b1 ** t
                bc2 = 1 - b2 ** t
                denom = (st["v"].sqrt() / math.sqrt(bc2)).add_(g["eps"])
                p.addcdiv_(st["m"], denom, value=-g["lr"] / bc1)


class SGD(_Optimizer):
    """Stochastic gradient descent with Nesterov momentum, as ``torch.optim.SGD(nesterov=True)``."""

    def __init__(self, params, lr: float, momentum: float = 0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if st is None:
                    buf = self.state.setdefault(p, {})["buf"] = p.grad.clone()
                else:
                    buf = st["buf"].mul_(g["momentum"]).add_(p.grad)
                p.add_(p.grad.add(buf, alpha=g["momentum"]), alpha=-g["lr"])


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, eps: float = 1e-8):
    return Adam(params, lr=lr, eps=eps)


@OPTIMIZERS.register("sgd")
def _sgd(params, lr: float):
    return SGD(params, lr=lr, momentum=0.9)
