"""Optimizers by name. Each factory takes (param_groups_or_params, lr, **params) and returns an optimizer.

Adam and SGD are written here (a few lines each) rather than taken from ``torch.optim``: any
``torch.optim.Optimizer`` imports ``torch._dynamo`` on first use, about one second of start-up on these
CPUs, paid by every ``regcli register``. They follow ``torch.optim.Adam`` / ``SGD(nesterov=True)`` formula
for formula (so results agree to float rounding) and support what the solvers use: parameter groups with
their own ``lr``, ``zero_grad(set_to_none=True)`` and ``step()``.

L-BFGS is written here too (not wrapped from ``torch.optim.LBFGS``): besides the start-up, torch's version
takes a single parameter group, while regcli's models give groups of different units (a rigid model's
radians and millimetres); here each group's ``lr`` scales its variables (see :class:`LBFGS`). It sets
``needs_closure = True``: the solver hands ``step`` a closure that re-evaluates the loss and its gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

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
    """Stochastic gradient descent with Nesterov momentum, as ``torch.optim.SGD(nesterov=True)``.

    ``step_mm=True`` reads each group's ``lr`` as a step length, the way Adam's is read, instead of a factor on
    the raw gradient (a mean over a million voxels makes that gradient about 1e-6 per voxel, so a plain ``lr``
    of 1 would not move at all). At the group's first step the gradient's ``reference_quantile`` of absolute
    values, ``g_ref``, fixes the group's factor to ``lr * (1 - momentum) / g_ref`` for the whole run: a variable
    whose gradient stays at ``g_ref`` then moves ``lr`` per step once the momentum has built up, about what Adam
    moves it, and the rest move in proportion to their gradient (plain SGD from then on).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, step_mm: bool = False,
                 reference_quantile: float = 0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.step_mm = bool(step_mm)
        self.reference_quantile = float(reference_quantile)

    def _factor(self, g: dict) -> float:
        """The group's gradient factor: ``lr``, or with ``step_mm`` the factor calibrated at its first step."""
        if not self.step_mm:
            return g["lr"]
        if "factor" not in g:  # (step() calls this only for a group with a gradient)
            flat = torch.cat([p.grad.detach().abs().reshape(-1) for p in g["params"] if p.grad is not None]).float()
            k = max(1, min(flat.numel(), int(math.ceil(self.reference_quantile * flat.numel()))))
            ref = float(flat.kthvalue(k).values)
            if ref <= 0.0:
                ref = float(flat.max())
            if ref <= 0.0 or not math.isfinite(ref):
                return 0.0  # no gradient yet: calibrate at the first step that has one
            g["factor"] = g["lr"] * (1.0 - g["momentum"]) / ref
        return g["factor"]

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            if not any(p.grad is not None for p in g["params"]):
                continue
            lr = self._factor(g)
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if st is None:
                    buf = self.state.setdefault(p, {})["buf"] = p.grad.clone()
                else:
                    buf = st["buf"].mul_(g["momentum"]).add_(p.grad)
                p.add_(p.grad.add(buf, alpha=g["momentum"]), alpha=-lr)


@OPTIMIZERS.register("adam")
def _adam(params, lr: float, eps: float = 1e-8):
    return Adam(params, lr=lr, eps=eps)


@OPTIMIZERS.register("sgd")
def _sgd(params, lr: float, step_mm: bool = False):
    return SGD(params, lr=lr, momentum=0.9, step_mm=step_mm)


class LBFGS(_Optimizer):
    """Limited-memory BFGS with a strong-Wolfe line search; one call of ``step(closure)`` is one iteration.

    **Variable scaling.** Each parameter group's ``lr`` is the unit of its variables: the method works on
    ``z = p / lr`` (a diagonal preconditioner), so groups in different units (radians, mm) are balanced as
    Adam's per-group step sizes balance them. The first trial step of a run (and after a reset) moves the
    largest variable by ``lr``; later trial steps are the quasi-Newton step (trial length 1), and the line
    search finds the actual length, so ``lr`` matters little beyond the groups' relative scale.

    **Iteration.** Evaluate the loss and gradient at the current point (the closure), take the two-loop
    direction from the last ``history_size`` curvature pairs (scaled by ``s.y / y.y``), and search along it
    for a step satisfying the strong Wolfe conditions (sufficient decrease ``c1``, curvature ``c2``) by
    bracketing and zooming with safeguarded cubic interpolation, at most ``max_eval`` evaluations. The
    parameters end at the accepted point and the closure's last evaluation is at that point; the next
    iteration reuses that evaluation unless something wrote to the parameters in between (their in-place
    version counters changed, e.g. the greedy model's ``after_step``), so a typical iteration costs one or two
    closure calls. When no step decreases the loss (e.g. float32 round-off near a minimum) the parameters stay
    where they were and the history is cleared; when even the gradient direction fails, later calls return at
    once (no evaluation) until something writes to the parameters. Vectors are float64 internally whatever
    the parameters' dtype.

    Args:
        params: parameters or parameter groups (dicts with ``params`` and optionally ``lr``).
        lr: variable unit of groups without their own ``lr``.
        history_size: curvature pairs kept (10).
        max_eval: loss evaluations per line search (20).
        c1, c2: strong Wolfe constants, ``0 < c1 < c2 < 1``.
    """

    needs_closure = True

    def __init__(self, params, lr: float = 1.0, history_size: int = 10, max_eval: int = 20, c1: float = 1e-4,
                 c2: float = 0.9) -> None:
        super().__init__(params, {"lr": lr})
        if not 0.0 < c1 < c2 < 1.0:
            raise ValueError(f"L-BFGS needs 0 < c1 < c2 < 1, got c1={c1}, c2={c2}")
        self.history_size = int(history_size)
        self.max_eval = max(1, int(max_eval))
        self.c1, self.c2 = float(c1), float(c2)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (s, y, 1 / y.s) in z units
        self.evaluations = 0  # closure calls so far (for reports and tests)
        self._cache: Optional[tuple] = None  # (parameter versions, loss, z-gradient) of the accepted point
        self._stalled = False  # the last search from the current point, along the gradient, found no decrease

    def _versions(self) -> tuple[int, ...]:
        """In-place modification counters of the parameters: they change when anything writes to them (the
        optimizer itself, or a model's ``after_step`` such as the greedy model's reset)."""
        return tuple(p._version for p, _ in self._items())

    # ------------------------------------------------------------------ flat views in z = p / lr units
    def _items(self) -> list[tuple[torch.Tensor, float]]:
        return [(p, float(g["lr"])) for g in self.param_groups for p in g["params"]]

    def _grad(self) -> torch.Tensor:
        """Flat gradient with respect to z, (n,) float64."""
        parts = []
        for p, lr in self._items():
            g = p.grad
            parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if g is None
                         else g.detach().reshape(-1).to(torch.float64) * lr)
        return torch.cat(parts)

    def _move(self, start: list[torch.Tensor], direction: torch.Tensor, t: float) -> None:
        """Set every parameter to ``start + t * lr * direction`` (its slice of the flat z direction)."""
        k = 0
        for (p, lr), p0 in zip(self._items(), start):
            n = p.numel()
            p.copy_(p0 + (direction[k:k + n] * (t * lr)).view_as(p).to(p.dtype))
            k += n

    def _evaluate(self, closure: Callable, start, direction, t: float) -> tuple[float, torch.Tensor, float]:
        """Loss, flat z-gradient and directional derivative at ``start + t * direction``."""
        self._move(start, direction, t)
        with torch.enable_grad():
            f = float(closure().detach())
        self.evaluations += 1
        g = self._grad()
        return f, g, float(g @ direction)

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """``-H g`` by the two-loop recursion over the stored pairs (``-g`` without any)."""
        q = -g
        alphas = []
        for s, y, rho in reversed(self.pairs):
            a = rho * float(s @ q)
            q = q - a * y
            alphas.append(a)
        if self.pairs:
            s, y, _ = self.pairs[-1]
            q = q * (float(s @ y) / float(y @ y))
        for (s, y, rho), a in zip(self.pairs, reversed(alphas)):
            b = rho * float(y @ q)
            q = q + (a - b) * s
        return q

    # ------------------------------------------------------------------ line search
    @staticmethod
    def _cubic(a: tuple, b: tuple, lo: float, hi: float) -> float:
        """Minimiser in [lo, hi] of the cubic matching value and slope at ``a`` and ``b`` (each ``(t, f, g, dg)``);
        the middle of [lo, hi] when the cubic has no minimiser there."""
        (t1, f1, _, d1), (t2, f2, _, d2) = a, b
        if t1 != t2:
            e1 = d1 + d2 - 3.0 * (f1 - f2) / (t1 - t2)
            disc = e1 * e1 - d1 * d2
            if disc >= 0.0:
                e2 = math.copysign(math.sqrt(disc), t2 - t1)
                den = d2 - d1 + 2.0 * e2
                if den != 0.0:
                    t = t2 - (t2 - t1) * (d2 + e2 - e1) / den
                    if math.isfinite(t):
                        return min(max(t, lo), hi)
        return 0.5 * (lo + hi)

    def _search(self, closure, start, d, f0: float, g0: torch.Tensor, dg0: float, t: float) -> tuple:
        """Strong-Wolfe line search along ``d`` from ``start``; returns the accepted ``(t, f, g, dg)``."""
        c1, c2 = self.c1, self.c2
        prev = (0.0, f0, g0, dg0)
        evals = 0
        last_t = None
        while evals < self.max_eval:
            f, g, dg = self._evaluate(closure, start, d, t)
            evals += 1
            last_t = t
            cur = (t, f, g, dg)
            if not math.isfinite(f) or f > f0 + c1 * t * dg0 or (evals > 1 and f >= prev[1]):
                return self._zoom(closure, start, d, f0, dg0, prev, cur, evals, last_t)
            if abs(dg) <= -c2 * dg0:
                return cur
            if dg >= 0.0:
                return self._zoom(closure, start, d, f0, dg0, cur, prev, evals, last_t)
            step = t - prev[0]
            nxt = self._cubic(prev, cur, t + step, t + 10.0 * step)
            prev, t = cur, nxt
        return self._accept(closure, start, d, prev, last_t)

    def _zoom(self, closure, start, d, f0, dg0, lo: tuple, hi: tuple, evals: int, last_t) -> tuple:
        """Shrink the bracket [lo, hi] (``lo`` satisfies sufficient decrease and has the lower loss)."""
        c1, c2 = self.c1, self.c2
        dmax = float(d.abs().max())
        while evals < self.max_eval:
            a, b = sorted((lo[0], hi[0]))
            width = b - a
            if width * dmax < 1e-12 * max(1.0, abs(b) * dmax):
                break
            if not math.isfinite(hi[1]):  # a trial point beyond the loss's domain: bisect
                t = 0.5 * (a + b)
            else:
                t = self._cubic(lo, hi, a + 0.1 * width, b - 0.1 * width)
            f, g, dg = self._evaluate(closure, start, d, t)
            evals += 1
            last_t = t
            cur = (t, f, g, dg)
            if not math.isfinite(f) or f > f0 + c1 * t * dg0 or f >= lo[1]:
                hi = cur
            else:
                if abs(dg) <= -c2 * dg0:
                    return cur
                if dg * (hi[0] - lo[0]) >= 0.0:
                    hi = lo
                lo = cur
        return self._accept(closure, start, d, lo, last_t)

    def _accept(self, closure, start, d, point: tuple, last_t) -> tuple:
        """``point`` as the result; re-evaluated when the parameters (and the closure's record) are elsewhere."""
        if last_t != point[0]:
            f, g, dg = self._evaluate(closure, start, d, point[0])
            return (point[0], f, g, dg)
        return point

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> torch.Tensor:
        """One L-BFGS iteration; ``closure()`` zeroes the gradients, evaluates and backpropagates the loss and
        returns it. Returns the loss at the new parameters (a 0-d float64 tensor)."""
        if closure is None:
            raise ValueError("L-BFGS needs a closure that re-evaluates the loss")
        start = [p.detach().clone() for p, _ in self._items()]
        cached, self._cache = self._cache, None
        if cached is not None and cached[0] == self._versions():
            _, f0, g0 = cached  # nothing touched the parameters since the last accepted point was evaluated
            if self._stalled:  # and even a gradient step found no decrease there: nothing left to do
                self._cache = cached
                return torch.tensor(f0, dtype=torch.float64)
        else:
            with torch.enable_grad():
                f0 = float(closure().detach())
            self.evaluations += 1
            g0 = self._grad()
        gmax = float(g0.abs().max()) if g0.numel() else 0.0
        if not math.isfinite(f0) or gmax == 0.0:
            return torch.tensor(f0, dtype=torch.float64)
        d = self._direction(g0)
        dg0 = float(g0 @ d)
        if not (dg0 < 0.0) or not math.isfinite(dg0):  # not a descent direction: restart from the gradient
            self.pairs.clear()
            d = -g0
            dg0 = float(g0 @ d)
        t0 = 1.0 if self.pairs else 1.0 / gmax
        t, f, g, _ = self._search(closure, start, d, f0, g0, dg0, t0)
        if t == 0.0 or not f < f0:  # no decrease: back at the start (and the closure evaluated there)
            if t != 0.0:
                self._evaluate(closure, start, d, 0.0)
            self._stalled = not self.pairs  # a plain gradient step failed: stop until the parameters change
            self.pairs.clear()
            self._cache = (self._versions(), f0, g0)
            return torch.tensor(f0, dtype=torch.float64)
        self._stalled = False
        self._cache = (self._versions(), f, g)
        s = d * t
        y = g - g0
        sy = float(s @ y)
        if sy > 1e-12 * float(s.norm() * y.norm()):
            self.pairs.append((s, y, 1.0 / sy))
            if len(self.pairs) > self.history_size:
                self.pairs.pop(0)
        return torch.tensor(f, dtype=torch.float64)


@OPTIMIZERS.register("lbfgs")
def _lbfgs(params, lr: float, history_size: int = 10, max_eval: int = 20):
    return LBFGS(params, lr=lr, history_size=history_size, max_eval=max_eval)
