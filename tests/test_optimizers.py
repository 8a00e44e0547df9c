"""regcli's own Adam and SGD follow torch.optim formula for formula (they exist to skip torch._dynamo's import)."""

import subprocess
import sys

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
