"""Sharpness-aware minimization (SAM, Foret et al., ICLR 2021) around any torch optimizer.

(Not the self-supervised anatomical embedding of :mod:`regcli.models.embedding`, also called SAM.)

SAM looks for weights whose whole neighbourhood has a low loss: it minimises ``max_{||e|| <= rho} L(w + e)``.
To first order the worst perturbation is ``e(w) = rho * g / ||g||`` with ``g = dL/dw`` and ``||g||`` the L2 norm
over all parameters together; dropping the second-order term ``de/dw``, the gradient of ``L(w + e(w))`` is
``dL/dw`` taken at ``w + e(w)``. One step therefore costs two forward/backward passes:

1. the caller computes ``g`` at ``w`` (forward, backward);
2. :meth:`SAM.first_step` moves the weights to ``w + e(w)``;
3. the caller computes the gradient again there (zero_grad, forward, backward);
4. :meth:`SAM.second_step` puts ``w`` back and lets the base optimizer step with that second gradient.

``adaptive=True`` is ASAM (Kwon et al., ICML 2021): the ball is scaled per weight by ``T = |w| + eta``,
``e = rho * T^2 g / ||T g||``, so that the sharpness measure does not change when a layer's weights are rescaled.

Gradient clipping: clip the *second* gradient, between step 3's backward and :meth:`SAM.second_step` (with
:meth:`SAM.step`, clip inside the closure: it clips both gradients, and clipping the first one by the global
norm is harmless because ``e`` does not depend on the scale of ``g``). Learning-rate schedulers take the base
optimizer. ``rho = 0`` is the base optimizer exactly (:meth:`SAM.step` then runs the closure once).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class SAM:
    """Sharpness-aware minimization around ``base`` (see the module docstring); ``rho`` is the radius of the
    neighbourhood (in weight units, or relative to ``|w| + eta`` when ``adaptive``)."""

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01):
        if rho < 0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        self.base, self.rho, self.adaptive, self.eta = base, float(rho), adaptive, eta
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its weights before first_step)

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter that has a gradient to ``w + e(w)`` and remember ``w``. A zero gradient gives a
        zero perturbation; ``rho = 0`` does nothing."""
        if self._saved:
            raise RuntimeError("SAM.first_step() called twice without second_step()")
        params = [p for group in self.base.param_groups for p in group["params"] if p.grad is not None]
        if self.rho == 0 or not params:
            return
        scale = [p.abs() + self.eta if self.adaptive else None for p in params]  # T (None: the identity)
        tg = [p.grad if t is None else p.grad * t for p, t in zip(params, scale)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v).to(params[0].device) for v in tg]))
        factor = self.rho / norm.clamp_min(1e-12)
        for p, v, t in zip(params, tg, scale):
            self._saved.append((p, p.detach().clone()))
            p.add_((v if t is None else v * t) * factor.to(p.device))

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights that :meth:`first_step` perturbed (bit for bit)."""
        for p, w in self._saved:
            p.copy_(w)
        self._saved = []

    def second_step(self) -> None:
        """Restore ``w`` and take the base optimizer's step with the gradients now in ``.grad`` (those computed at
        the perturbed weights)."""
        self.restore()
        self.base.step()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One SAM step. ``closure`` zeroes the gradients, computes the loss, calls backward (and clips, if
        wanted) and returns the loss; it runs twice (once when ``rho = 0``). Returns the loss at ``w``."""
        closure = torch.enable_grad()(closure)
        loss = closure()
        if self.rho == 0:
            self.base.step()
            return loss
        self.first_step()
        try:
            closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (SAM keeps none between steps): a checkpoint of it resumes exactly."""
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)
