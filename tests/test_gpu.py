"""CUDA: every method runs there and agrees with the CPU, --deterministic repeats to the bit (RELIABILITY N2),
memory does not grow over repeated runs (P1). Skipped without a CUDA device (CI has none); run on a GPU machine
with ``python -m pytest -m gpu``. ``benchmarks/gpu_check.py`` measures the same on the bundled brains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import as_image, make_phantom
from regcli.config import build_config, deep_merge
from regcli.pipeline import register_images

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAST = {"affine": {"levels_mm": [4.0, 2.0], "iterations": [60, 40]}, "instance": {"iterations": 40},
        "samconvex": {"io_iterations": 20, "refine_iterations": 5}, "html_report": False}
METHODS = ["convexadam", "samconvex", "dio", "foundation", "promptreg"]


def _sin_field(p: np.ndarray, amp=1.5) -> np.ndarray:
    return amp * np.stack([np.sin(p[..., 1] / 9.0), np.sin(p[..., 2] / 8.0 + 0.5), np.sin(p[..., 0] / 10.0)], -1)


@pytest.fixture(scope="module")
def pair():
    f = make_phantom("oblique15", "aniso")
    m = make_phantom("oblique15", "aniso", transform=lambda p: p + _sin_field(p) + np.array([1.0, -0.5, 0.5]))
    return as_image(f), as_image(m)


def _cfg(method, device, **over):
    return build_config(None, deep_merge(FAST, {"method": method, "device": device, **over}))


def _mapping(reg, fixed):
    pts = fixed.grid.world_coords()[fixed.data > 0.2].to(torch.float64)
    return reg.transform.map_points(pts).cpu()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_cuda_agrees_with_the_cpu(pair, method):
    fixed, moving = pair
    maps = {dev: _mapping(register_images(fixed, moving, _cfg(method, dev)), fixed) for dev in ("cpu", "cuda")}
    d = (maps["cpu"] - maps["cuda"]).norm(dim=-1)
    # float32 on both: reductions sum in another order, and the discrete searches can break a tie the other way
    assert float(d.mean()) < 0.05 and float(d.max()) < 1.0, (float(d.mean()), float(d.max()))


def test_float64_on_cuda_is_the_cpu_result(pair):
    fixed, moving = pair
    maps = {dev: _mapping(register_images(fixed, moving, _cfg("convexadam", dev, precision="float64")), fixed)
            for dev in ("cpu", "cuda")}
    assert float((maps["cpu"] - maps["cuda"]).norm(dim=-1).max()) < 1e-6


@pytest.mark.parametrize("method,over", [("convexadam", {}), ("samconvex", {}), ("dio", {}),
                                         ("foundation", {"foundation": {"io": "network", "io_iterations": 3}})])
def test_n2_deterministic_cuda_runs_are_identical(pair, method, over, monkeypatch):
    """grid_sample's CUDA backward adds with atomics; under --deterministic regcli samples through gathers, whose
    backward (scatter-add) torch makes deterministic."""
    from regcli import resample

    calls = []
    real = resample._trilinear_gathered
    monkeypatch.setattr(resample, "_trilinear_gathered", lambda *a: calls.append(1) or real(*a))
    fixed, moving = pair
    n = torch.get_num_threads()
    try:
        fields = [register_images(fixed, moving, _cfg(method, "cuda", deterministic=True, **over)).field.disp
                  for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.set_num_threads(n)
    assert calls  # the gathered sampler did the differentiated sampling
    assert torch.equal(fields[0], fields[1]), float((fields[0] - fields[1]).abs().max())


def test_p1_cuda_memory_does_not_grow_over_repeated_runs(pair):
    fixed, moving = pair
    cfg = _cfg("convexadam", "cuda")
    register_images(fixed, moving, cfg)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    peaks = []
    for _ in range(4):
        torch.cuda.reset_peak_memory_stats()
        register_images(fixed, moving, cfg)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[-1] < 1.05 * peaks[0], peaks
    assert torch.cuda.memory_allocated() <= held, (torch.cuda.memory_allocated(), held)


def test_gathered_sampling_on_cuda_is_grid_sample_and_deterministic():
    from regcli.resample import _trilinear_gathered

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 20, 24, 22, generator=gen).cuda()
    g = (torch.rand(1, 30, 30, 30, 3, generator=gen) * 2.2 - 1.1).cuda()
    for padding in ("border", "zeros"):
        ref = F.grid_sample(x, g, padding_mode=padding, align_corners=True)
        assert torch.allclose(_trilinear_gathered(x, g, padding), ref, atol=1e-5)
    xa, ga = x.clone().requires_grad_(), g.clone().requires_grad_()
    F.grid_sample(xa, ga, padding_mode="border", align_corners=True).square().sum().backward()
    grads = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            xg, gg = x.clone().requires_grad_(), g.clone().requires_grad_()
            _trilinear_gathered(xg, gg, "border").square().sum().backward()
            grads.append((xg.grad, gg.grad))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.allclose(grads[0][0], xa.grad, rtol=1e-4, atol=1e-4)  # the gradient grid_sample gives
    assert torch.allclose(grads[0][1], ga.grad, rtol=1e-3, atol=1e-3)
