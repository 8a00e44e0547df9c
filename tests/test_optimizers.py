"""regcli's own Adam and SGD follow torch.optim formula for formula (they exist to skip torch._dynamo's import)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from regcli.solvers.optimizers import OPTIMIZERS, SGD, Adam


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_same_iterates_as_torch_optim(name):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64))
    b = torch.nn.Parameter(a.detach().clone())
    c = torch.nn.Parameter(torch.randn(3))
    d = torch.nn.Parameter(c.detach().clone())
    if name == "adam":
        ours = Adam([{"params": [a]}, {"params": [c], "lr": 0.01}], lr=0.1, eps=1e-3)
        ref = torch.optim.Adam([{"params": [b]}, {"params": [d], "lr": 0.01}], lr=0.1, eps=1e-3)
    else:
        ours = SGD([{"params": [a]}, {"params": [c], "lr": 0.001}], lr=0.01)
        ref = torch.optim.SGD([{"params": [b]}, {"params": [d], "lr": 0.001}], lr=0.01, momentum=0.9, nesterov=True)
    w = torch.linspace(0.1, 5.0, 64)
    for _ in range(40):
        for (p, q, o) in ((a, c, ours), (b, d, ref)):
            o.zero_grad(set_to_none=True)
            ((p - 1.0).pow(2) * w).sum().add((q + 2.0).pow(2).sum()).backward()
            o.step()
    assert torch.equal(a, b) and torch.equal(c, d)
    assert OPTIMIZERS.get(name) is not None


def test_registering_needs_no_dynamo():
    code = ("import sys, torch; from regcli.solvers.instance import InstanceOptimization, Problem;"
            "from regcli.spaces.grid import Grid;"
            "g = Grid((8, 8, 8), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1));"
            "InstanceOptimization(iterations=2).run(Problem(torch.rand(8, 8, 8), torch.rand(8, 8, 8), g));"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ L-BFGS
def _quadratic(n: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn((n, n), generator=gen, dtype=torch.float64)
    A = Q @ Q.T / n + torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64))  # condition number ~ 1e2
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, b, torch.linalg.solve(A, b)


def test_lbfgs_solves_a_quadratic_with_parameter_groups():
    """Two groups in very different units (lr 1e-3 and 10): the per-group scaling makes them one well-posed
    problem; the minimiser of 0.5 x'Ax - b'x is reached to 1e-8."""
    A, b, x_star = _quadratic()
    scale = torch.cat((torch.full((20,), 1e-3), torch.full((20,), 10.0))).double()  # x = scale * p
    p1 = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.zeros(20, dtype=torch.float32))  # mixed dtypes are fine
    opt = OPTIMIZERS.get("lbfgs")([{"params": [p1], "lr": 1e3}, {"params": [p2], "lr": 0.1}], 1.0)
    assert opt.needs_closure

    def closure():
        opt.zero_grad(set_to_none=True)
        x = torch.cat((p1, p2.double())) * scale
        loss = 0.5 * x @ A @ x - b @ x
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(60)]
    x = torch.cat((p1.detach(), p2.detach().double())) * scale
    assert torch.allclose(x[:20], x_star[:20], atol=1e-6)  # (p2 is float32: its part to float32 rounding)
    assert torch.allclose(x[20:], x_star[20:], atol=1e-4)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))  # monotone
    assert float(closure().detach()) == pytest.approx(losses[-1], rel=1e-9)  # the parameters are at the accepted point
    # an iteration reuses the last line-search evaluation, and stops evaluating once nothing decreases the loss
    # (without the reuse every iteration takes two evaluations or more: 120). Measured 77 (48 iterations to
    # converge, 23 in two failed searches; AMD EPYC, torch 2.13) and 95 (Intel Xeon, torch 2.11)
    assert opt.evaluations < 2 * 60


def test_lbfgs_matches_torch_on_rosenbrock():
    """The oracle: torch.optim.LBFGS (strong Wolfe, run to convergence) and ours reach the same minimum."""
    def run(make):
        p = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
        opt = make([p])

        def closure():
            opt.zero_grad()
            loss = (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2
            loss.backward()
            return loss

        for _ in range(100):
            opt.step(closure)
        return p.detach()

    ours = run(lambda ps: OPTIMIZERS.get("lbfgs")(ps, 0.1))
    ref = run(lambda ps: torch.optim.LBFGS(ps, lr=1, max_iter=20, history_size=10, line_search_fn="strong_wolfe",
                                                tolerance_grad=1e-12, tolerance_change=1e-15))
    assert torch.allclose(ours, torch.ones(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_lbfgs_registers_a_translated_phantom():
    """The rigid model (radians and mm, two groups) with L-BFGS in the shared solver recovers a 1.5 mm shift."""
    import numpy as np
    import SimpleITK as sitk

    from conftest import make_phantom
    from regcli.solvers.instance import InstanceOptimization, Problem
    from regcli.spaces.grid import Grid

    shift = np.array([1.5, -1.0, 0.5])
    fixed = make_phantom(size=(28, 26, 24))
    moving = make_phantom(size=(28, 26, 24), transform=lambda p: p - shift)  # moving(x + shift) = fixed(x)
    grid = Grid.from_sitk(fixed)
    prob = Problem(torch.from_numpy(sitk.GetArrayFromImage(fixed)), torch.from_numpy(sitk.GetArrayFromImage(moving)),
                   grid)
    res = InstanceOptimization(model="rigid", similarity="mse", optimizer="lbfgs", regularizer="none", iterations=15,
                               lr=0.02, model_params={"radius_mm": 15.0}).run(prob)
    assert np.abs(res.model.transform().offset - shift).max() < 0.1  # mm
    assert res.history[-1]["loss"] < 0.25 * res.history[0]["loss"]


def test_lbfgs_needs_no_dynamo():
    code = ("import sys, torch; from regcli.solvers.instance import InstanceOptimization, Problem;"
            "from regcli.spaces.grid import Grid;"
            "g = Grid((8, 8, 8), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1));"
            "InstanceOptimization(model='svf', optimizer='lbfgs', iterations=2)"
            ".run(Problem(torch.rand(8, 8, 8), torch.rand(8, 8, 8), g));"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_solves_on_small_grids_run_on_one_thread_and_restore_the_count():
    """Below SMALL_GRID_VOXELS the shared solver runs single-threaded (a parallel region's wake-up costs more than
    its op there); the thread count comes back afterwards, also after an error; large grids keep every thread."""
    from regcli.runtime import SMALL_GRID_VOXELS, threads_for
    from regcli.solvers.instance import InstanceOptimization, Problem
    from regcli.spaces.grid import Grid

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for(SMALL_GRID_VOXELS - 1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads_for(SMALL_GRID_VOXELS):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), threads_for(10):
            raise RuntimeError("solver failed")
        assert torch.get_num_threads() == 2

        seen = []
        grid = Grid((12, 10, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
        data = torch.rand(8, 10, 12)
        sim = lambda f, w, m=None: (seen.append(torch.get_num_threads()) or ((f - w) ** 2).mean())  # noqa: E731
        InstanceOptimization(similarity=sim, iterations=2).run(Problem(data, data.flip(0), grid))
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_sgd_step_is_in_mm_like_adams():
    """The IO stage's ``lr`` is a step in mm for every optimizer. SGD calibrates its gradient factor at the first
    step (a mean over voxels makes raw gradients ~1e-4 here, so lr 1 would move nothing): with the same schedule
    it recovers most of a 1.5 mm shift of a freeform field, as Adam does."""
    import numpy as np
    import SimpleITK as sitk

    from conftest import make_phantom
    from regcli.config import InstanceConfig
    from regcli.solvers.instance import Problem, solver_from_config
    from regcli.spaces.grid import Grid

    shift = np.array([1.5, -1.0, 0.5])
    fixed = make_phantom(size=(28, 26, 24))
    moving = make_phantom(size=(28, 26, 24), transform=lambda p: p - shift)
    grid = Grid.from_sitk(fixed)
    prob = Problem(torch.from_numpy(sitk.GetArrayFromImage(fixed)), torch.from_numpy(sitk.GetArrayFromImage(moving)),
                   grid, support=None)
    inside = torch.from_numpy(sitk.GetArrayFromImage(fixed)) > 0.5
    recovered = {}
    for name in ("adam", "sgd"):
        solver = solver_from_config(InstanceConfig(optimizer=name), iterations=40, lr=0.5, reg_weight=0.5,
                                    smoothing_passes=1, similarity="mse", num_voxels=grid.num_voxels)
        disp = solver.run(prob).disp  # (3, Z, Y, X) mm, components x, y, z
        mean = disp[:, inside].mean(dim=1).numpy()
        recovered[name] = float(np.dot(mean, shift) / np.dot(shift, shift))
    assert recovered["adam"] > 0.6
    assert recovered["sgd"] > 0.6, recovered  # before the calibration: 0.000
    group = {"params": [torch.nn.Parameter(torch.zeros(4))], "lr": 2.0, "momentum": 0.9}
    group["params"][0].grad = torch.tensor([1e-6, 2e-6, 4e-6, 8e-6])
    opt = SGD([group], lr=2.0, step_mm=True, reference_quantile=0.75)
    opt.step()  # the 75 % quantile gradient (4e-6) fixes the factor: 2 mm x (1 - 0.9) / 4e-6
    assert opt.param_groups[0]["factor"] == pytest.approx(2.0 * 0.1 / 4e-6)
