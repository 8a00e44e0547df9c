"""Sharpness-aware minimization (regcli.training.sam): flat minima, exactness at rho = 0, checkpoints, geometry."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from regcli.training.sam import SAM

F64 = torch.float64
SHARP_AT, WIDE_AT = torch.tensor([0.0, 0.09], dtype=F64), torch.tensor([0.0, 1.2], dtype=F64)


def two_wells(w: torch.Tensor) -> torch.Tensor:
    """A sharp, slightly deeper well at the origin (std 0.05 across x, 0.3 along y; minimum -1.11 near (0, 0.09),
    top Hessian eigenvalue 229) and a wide, flat one at (0, 1.2) (std 1; minimum -1.00, eigenvalue 1.1)."""
    x, y = w[0], w[1]
    sharp = 0.6 * torch.exp(-0.5 * (x / 0.05) ** 2 - 0.5 * (y / 0.3) ** 2)
    wide = torch.exp(-0.5 * (x ** 2 + (y - 1.2) ** 2))
    return -sharp - wide


def _descend(rho: float, steps: int = 300, lr: float = 0.02) -> torch.Tensor:
    w = torch.tensor([0.04, 0.1], dtype=F64, requires_grad=True)
    opt = SAM(torch.optim.Adam([w], lr=lr), rho)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = two_wells(w)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return w.detach()


def _top_eigenvalue(w: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(two_wells, w)).max())


def _worst_increase(w: torch.Tensor, radius: float = 0.1, directions: int = 64) -> float:
    """The largest loss increase over ``directions`` points on the circle of ``radius`` around ``w``."""
    t = torch.arange(directions, dtype=F64) * (2 * torch.pi / directions)
    ring = w + radius * torch.stack((t.cos(), t.sin()), dim=1)
    return max(float(two_wells(p) - two_wells(w)) for p in ring)


def test_sam_leaves_the_sharp_minimum_that_adam_falls_into():
    """From the same start, with the same lr and steps, Adam settles in the sharp (deeper) well and SAM(Adam) in
    the flat one: its Hessian and its worst loss increase within 0.1 are both far smaller."""
    adam, sam = _descend(0.0), _descend(0.2)
    assert torch.linalg.vector_norm(adam - SHARP_AT) < 0.05, adam
    assert torch.linalg.vector_norm(sam - WIDE_AT) < 0.05, sam
    assert float(two_wells(adam)) < float(two_wells(sam))  # SAM did not find the lower loss, but the flatter one
    assert _top_eigenvalue(sam) < 0.02 * _top_eigenvalue(adam)  # measured: 1.1 vs 229
    assert _worst_increase(sam) < 0.05 * _worst_increase(adam)


def _net_and_data(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    x, y = torch.randn(32, 5, dtype=dtype), torch.randn(32, 1, dtype=dtype)
    return net, x, y


def _closure(net, opt, x, y, calls: list | None = None):
    def closure() -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)  # clipping inside the closure, as the loops do
        return loss

    return closure


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    net_a, x, y = _net_and_data()
    net_b = copy.deepcopy(net_a)
    adam = torch.optim.Adam(net_a.parameters(), lr=1e-2)
    sam = SAM(torch.optim.Adam(net_b.parameters(), lr=1e-2), rho=0.0)
    calls: list = []
    for _ in range(7):
        _closure(net_a, adam, x, y)()
        adam.step()
        sam.step(_closure(net_b, sam, x, y, calls))
    assert len(calls) == 7  # one forward/backward per step
    assert all(torch.equal(a, b) for a, b in zip(net_a.parameters(), net_b.parameters()))
    with pytest.raises(ValueError, match="rho"):
        SAM(adam, rho=-0.1)


def test_state_dict_round_trip_resumes_exactly():
    def fresh():
        net, x, y = _net_and_data()
        return net, SAM(torch.optim.Adam(net.parameters(), lr=1e-2), rho=0.05), x, y

    net, opt, x, y = fresh()
    for _ in range(6):
        opt.step(_closure(net, opt, x, y))
    straight = [p.detach().clone() for p in net.parameters()]

    net, opt, x, y = fresh()
    for _ in range(3):
        opt.step(_closure(net, opt, x, y))
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net, opt, x, y = fresh()
    net.load_state_dict(ck["net"])
    opt.load_state_dict(ck["opt"])
    for _ in range(3):
        opt.step(_closure(net, opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(straight, net.parameters()))
    assert opt.state_dict()["state"][0]["step"] == 6  # the base optimizer's own state went through


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_moves_by_rho_and_second_step_restores_before_the_base_step(adaptive):
    net, x, y = _net_and_data(dtype=F64)
    rho, lr = 0.3, 0.1
    opt = SAM(torch.optim.SGD(net.parameters(), lr=lr), rho=rho, adaptive=adaptive)
    params = list(net.parameters())
    w = [p.detach().clone() for p in params]
    _closure(net, opt, x, y)()
    g = [p.grad.clone() for p in params]
    opt.first_step()
    moved = [p.detach() - w0 for p, w0 in zip(params, w)]
    if adaptive:  # ASAM: the move is rho in the metric of T = |w| + eta
        moved = [m / (w0.abs() + opt.eta) for m, w0 in zip(moved, w)]
    norm = torch.linalg.vector_norm(torch.cat([m.flatten() for m in moved]))
    assert float(norm) == pytest.approx(rho, rel=1e-12)
    if not adaptive:  # uphill along the first gradient
        assert all(torch.allclose(m, rho * gi / torch.linalg.vector_norm(torch.cat([v.flatten() for v in g])))
                   for m, gi in zip(moved, g))
    _closure(net, opt, x, y)()  # the gradient at the perturbed weights
    g2 = [p.grad.clone() for p in params]
    assert not all(torch.equal(a, b) for a, b in zip(g, g2))
    opt.second_step()
    # SGD's step from the restored weights with the second gradient, to the bit
    assert all(torch.equal(p, w0.add(gi, alpha=-lr)) for p, w0, gi in zip(params, w, g2))


def test_a_zero_gradient_gives_no_perturbation():
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = SAM(torch.optim.SGD([w], lr=0.1), rho=0.5)
    (w * 0).sum().backward()
    opt.first_step()
    assert torch.equal(w.detach(), torch.zeros(3, dtype=F64))
    opt.second_step()
    with pytest.raises(RuntimeError, match="twice"):
        w.grad = torch.ones(3, dtype=F64)
        opt.first_step()
        opt.first_step()
