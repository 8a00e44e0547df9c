"""PromptReg (regcli.models.promptreg): shapes and the displacement convention, diffeomorphic integration, the
prompt fusion and its losses, a short optimisation that aligns a phantom pair, task routing, weights folders and
determinism. Tiny networks on 24^3-32^3 grids: the whole file runs in well under a minute on two cores."""

from __future__ import annotations

import json
import math

import pydantic
import pytest
import torch
import torch.nn.functional as F

from conftest import random_state
from regcli.errors import WeightsError
from regcli.models.promptreg import (
    PromptRegConfig, PromptRegNet, fuse_prompts, integrate_velocity, jacobian_determinant, load_promptreg,
    orthogonality_loss, promptreg_from, promptreg_loss, save_promptreg_model, warp,
)
from regcli.weights import resolve

TINY = PromptRegConfig(encoder_channels=(8, 16, 16), decoder_channels=(8, 16), num_tasks=2, prompt_dim=16,
                       prompt_hidden=32, template_size=2)


def _net(seed: int = 0, cfg: PromptRegConfig = TINY) -> PromptRegNet:
    torch.manual_seed(seed)
    return PromptRegNet(cfg)


def _coords(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ax = torch.arange(n, dtype=torch.float32)
    return torch.meshgrid(ax, ax, ax, indexing="ij")


def _blobs(n: int, centres, radii, amps) -> torch.Tensor:
    """(1, 1, n, n, n) sum of Gaussian blobs (centres and radii in voxels, (z, y, x))."""
    z, y, x = _coords(n)
    img = torch.zeros(n, n, n)
    for (cz, cy, cx), r, a in zip(centres, radii, amps):
        img += a * torch.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return img[None, None]


def _random_blobs(n: int, g: torch.Generator) -> torch.Tensor:
    centres = (4 + torch.rand(3, 3, generator=g) * (n - 8)).tolist()
    radii = (2 + 3 * torch.rand(3, generator=g)).tolist()
    amps = (0.3 + 0.5 * torch.rand(3, generator=g)).tolist()
    return _blobs(n, centres, radii, amps).clamp(max=1)


def _random_stripes(n: int, g: torch.Generator) -> torch.Tensor:
    """(1, 1, n, n, n) plane waves in [0, 1], random direction, period 4-8 voxels and phase."""
    z, y, x = _coords(n)
    k = torch.randn(3, generator=g)
    k = k / k.norm() * (2 * math.pi / (4 + 4 * float(torch.rand(1, generator=g))))
    phase = 2 * math.pi * float(torch.rand(1, generator=g))
    return (0.5 + 0.5 * torch.sin(k[0] * z + k[1] * y + k[2] * x + phase))[None, None]


def _smooth_velocity(n: int, max_gradient: float, seed: int) -> torch.Tensor:
    """(1, 3, n, n, n) smooth random field (4^3 random vectors, trilinear) whose largest partial derivative is
    ``max_gradient`` (voxels per voxel)."""
    g = torch.Generator().manual_seed(seed)
    v = F.interpolate(torch.randn(1, 3, 4, 4, 4, generator=g), size=(n, n, n), mode="trilinear", align_corners=True)
    return v * (max_gradient / torch.stack(torch.gradient(v, dim=(2, 3, 4))).abs().amax())


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# ------------------------------------------------------------------------------------------ configuration
def test_config_is_validated_and_the_default_network_is_small():
    with pytest.raises(pydantic.ValidationError, match="one entry per level"):
        PromptRegConfig(encoder_channels=(8, 16, 16), decoder_channels=(8,))
    with pytest.raises(pydantic.ValidationError, match="must not exceed prompt_dim"):
        PromptRegConfig(num_tasks=5, prompt_dim=4)
    with pytest.raises(pydantic.ValidationError):
        PromptRegConfig(tau=0.0)
    with pytest.raises(pydantic.ValidationError):
        PromptRegConfig(bottleneck=3)  # extra fields are refused
    cfg = PromptRegConfig()
    assert cfg.tau == 0.1 and cfg.integration_steps == 7 and cfg.shape_multiple == 8
    assert (cfg.similarity_weight, cfg.smoothness_weight, cfg.orthogonality_weight,
            cfg.task_similarity_weight) == (1.0, 0.1, 0.001, 0.001)
    n = sum(p.numel() for p in _net(cfg=cfg).parameters())
    assert 500_000 < n < 2_000_000, n


# ------------------------------------------------------------------------------------------ shapes, conventions
def test_shapes_and_an_untrained_network_is_the_identity():
    net = _net()
    moving, fixed = torch.rand(2, 2, 1, 26, 28, 30)  # not a multiple of shape_multiple (4): padded, cropped
    with torch.no_grad():
        out = net(moving, fixed)
    assert out.velocity.shape == out.disp.shape == (2, 3, 26, 28, 30)
    assert out.weights.shape == out.logits.shape == (2, TINY.num_tasks)
    assert out.dynamic.shape == out.prompt.shape == (2, TINY.prompt_dim)
    assert out.task is None
    assert out.velocity.abs().max() == 0 and out.disp.abs().max() == 0  # zero-initialised velocity head
    assert torch.allclose(warp(moving, out.disp), moving, atol=1e-5)  # float rounding of the sampling grid
    with pytest.raises(ValueError, match="same shape"):
        net(moving, fixed[..., :-1])
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\)"):
        net(moving, fixed, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="int64"):
        net(moving, fixed, torch.tensor([0.0, 1.0]))


def test_displacements_are_voxel_units_in_tensor_axis_order():
    img = torch.rand(1, 1, 6, 7, 8)
    for channel, axis in ((0, 2), (1, 3), (2, 4)):
        disp = torch.zeros(1, 3, 6, 7, 8)
        disp[:, channel] = 1.0  # warped(p) = img(p + e_axis): the next voxel along that tensor axis
        got = warp(img, disp).narrow(axis, 0, img.shape[axis] - 1)
        assert torch.allclose(got, img.narrow(axis, 1, img.shape[axis] - 1), atol=1e-5)
    const = torch.tensor([1.5, -2.0, 0.75]).view(1, 3, 1, 1, 1).expand(1, 3, 6, 7, 8)
    assert torch.allclose(integrate_velocity(const, 7), const, atol=1e-5)  # exp of a translation is itself


def test_scaling_and_squaring_is_diffeomorphic_where_the_velocity_alone_folds():
    vel = _smooth_velocity(32, max_gradient=2.0, seed=0)
    plain = jacobian_determinant(vel)  # the velocity used as a displacement
    assert plain.min() < -0.5 and (plain <= 0).float().mean() > 0.01
    disp = integrate_velocity(vel, 7)
    assert disp.abs().max() > 5  # a large deformation (voxels)
    assert jacobian_determinant(disp).min() > 0
    # exp(v) and exp(-v) are inverse maps: their composition is close to the identity away from the border
    vel = _smooth_velocity(32, max_gradient=0.5, seed=1)
    fwd, bwd = integrate_velocity(vel, 7), integrate_velocity(-vel, 7)
    residual = (fwd + warp(bwd, fwd))[..., 6:-6, 6:-6, 6:-6]
    assert residual.abs().max() < 0.1 * fwd.abs().max()


# ------------------------------------------------------------------------------------------ prompts
def test_fusion_weights_sum_to_one_and_a_lower_tau_sharpens_them():
    sharp = _net(seed=4)
    soft = PromptRegNet(TINY.model_copy(update={"tau": 1.0}))
    soft.load_state_dict(sharp.state_dict())
    moving, fixed = torch.rand(2, 3, 1, 24, 24, 24)
    with torch.no_grad():
        a, b = sharp(moving, fixed), soft(moving, fixed)
    for out in (a, b):
        assert torch.allclose(out.weights.sum(1), torch.ones(3), atol=1e-6)
        assert torch.allclose(out.prompt, out.weights @ out.static, atol=1e-6)
    assert torch.allclose(a.logits, 10 * b.logits, atol=1e-5)  # cos / 0.1 against cos / 1
    entropy = [-(o.weights * o.weights.log()).sum(1) for o in (a, b)]
    assert (entropy[0] < entropy[1]).all()
    assert (a.weights.amax(1) > b.weights.amax(1)).all()
    # a dynamic prompt along one SKB prompt picks that prompt
    static = torch.linalg.qr(torch.randn(16, 4))[0].T  # (4, 16) orthonormal rows
    logits, weights, prompt = fuse_prompts(3.0 * static[2:3], static, 0.1)
    assert torch.allclose(logits, torch.tensor([[0.0, 0.0, 10.0, 0.0]]), atol=1e-5)
    assert weights.argmax().item() == 2 and weights[0, 2] > 0.99


def test_inference_needs_no_task_id_and_its_task_loss_is_zero():
    net = _net(seed=5)
    moving, fixed = torch.rand(2, 2, 1, 24, 24, 24)
    task = torch.tensor([1, 0])
    with torch.no_grad():
        blind = net(moving, fixed)
        told = net(moving, fixed, task)
        loss = promptreg_loss(blind, moving, fixed, cfg=TINY)
        loss_told = promptreg_loss(told, moving, fixed, cfg=TINY)
    assert set(loss) == {"all", "similarity", "smoothness", "orthogonality", "task_similarity"}
    assert loss["task_similarity"] == 0
    assert torch.equal(blind.weights, told.weights) and torch.equal(blind.disp, told.disp)  # routing ignores ids
    assert torch.allclose(loss_told["task_similarity"], F.cross_entropy(told.logits, task))
    assert loss_told["task_similarity"] > 0
    want = (loss_told["similarity"] + 0.1 * loss_told["smoothness"] + 0.001 * loss_told["orthogonality"]
            + 0.001 * loss_told["task_similarity"])
    assert torch.allclose(loss_told["all"], want)
    with pytest.raises(ValueError, match="differs"):
        promptreg_loss(told, moving, fixed, torch.tensor([0, 0]), cfg=TINY)


def test_orthogonality_loss_is_zero_exactly_for_orthogonal_prompts():
    q = torch.linalg.qr(torch.randn(32, 5, dtype=torch.float64))[0].T  # (5, 32) orthonormal rows
    assert orthogonality_loss(q) < 1e-12
    assert orthogonality_loss(q * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]], dtype=torch.float64)) < 1e-12
    assert orthogonality_loss(torch.randn(5, 32)) > 1e-3
    assert torch.isclose(orthogonality_loss(torch.ones(5, 32)), torch.tensor(20.0))  # all 20 cosines are 1
    assert orthogonality_loss(_net().prompts.static.detach()) < 1e-10  # the SKB starts orthonormal


# ------------------------------------------------------------------------------------------ behaviour
def test_a_short_optimisation_aligns_a_deformed_phantom():
    n = 24
    s = n / 32
    fixed = _blobs(n, [(16 * s, 16 * s, 16 * s), (10 * s, 20 * s, 12 * s), (21 * s, 11 * s, 19 * s)],
                   [6 * s, 3 * s, 3 * s], [0.6, 0.4, 0.5])
    z, y, x = _coords(n)
    truth = torch.stack([2.0 + torch.sin(2 * math.pi * y / n), -1.5 + torch.cos(2 * math.pi * x / n),
                         torch.full_like(z, 1.5)])[None]
    moving = warp(fixed, truth)  # shifted by about 2 voxels per axis and bent
    net = _net(seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def measure():
        with torch.no_grad():
            out = net(moving, fixed)
            warped = warp(moving, out.disp)
            return (promptreg_loss(out, moving, fixed, cfg=TINY)["similarity"].item(),
                    _dice(warped > 0.3, fixed > 0.3), ((warped - fixed) ** 2).mean().item(),
                    jacobian_determinant(out.disp).min().item())

    mind0, dice0, ssd0, _ = measure()
    for _ in range(25):
        loss = promptreg_loss(net(moving, fixed), moving, fixed, cfg=TINY)
        opt.zero_grad()
        loss["all"].backward()
        opt.step()
    mind1, dice1, ssd1, min_jac = measure()
    assert mind1 < 0.5 * mind0, (mind0, mind1)
    assert dice0 < 0.75 and dice1 > 0.85, (dice0, dice1)
    assert ssd1 < 0.5 * ssd0, (ssd0, ssd1)
    assert min_jac > 0


def test_the_task_similarity_loss_routes_each_task_to_its_own_prompt():
    n = 24
    makers = (_random_blobs, _random_stripes)  # task 0: blobs, task 1: stripes

    def batch(g: torch.Generator, per_task: int):
        pairs = [(make(n, g), make(n, g), t) for t, make in enumerate(makers) for _ in range(per_task)]
        return (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]),
                torch.tensor([p[2] for p in pairs]))

    net = _net(seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train = torch.Generator().manual_seed(1)
    for _ in range(40):
        moving, fixed, task = batch(train, 2)
        loss = promptreg_loss(net(moving, fixed, task), moving, fixed, cfg=TINY)
        opt.zero_grad()
        loss["task_similarity"].backward()
        opt.step()
    moving, fixed, task = batch(torch.Generator().manual_seed(2), 4)  # pairs never seen, no task ids given
    with torch.no_grad():
        weights = net(moving, fixed).weights
    right = weights[torch.arange(len(task)), task]
    assert (right > 0.5).all() and right.mean() > 0.9, right


# ------------------------------------------------------------------------------------------ weights, determinism
def test_save_resolve_load_round_trip(tmp_path):
    net = _net()
    net.load_state_dict(random_state(net.state_dict(), seed=3, scale=0.05))  # a network that moves voxels
    net.eval()
    folder = save_promptreg_model(net, tmp_path / "promptreg", "# tiny PromptReg test model\n",
                                  training={"tasks": ["blobs", "stripes"]})
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "promptreg" and config["training"] == {"tasks": ["blobs", "stripes"]}
    assert PromptRegConfig.model_validate(config["net"]) == TINY
    loaded = promptreg_from(resolve(str(folder)))
    assert not loaded.training
    moving, fixed = torch.rand(2, 1, 1, 24, 20, 28)
    with torch.no_grad():
        a, b = net(moving, fixed), load_promptreg(str(folder))(moving, fixed)
    assert a.disp.abs().max() > 1e-3
    for name in ("velocity", "disp", "weights", "logits", "dynamic", "prompt"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    config["architecture"] = "gradicon-multistep"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="not a PromptReg network"):
        promptreg_from(resolve(str(folder)))


def test_the_same_seed_gives_bit_identical_outputs():
    def run(seed: int):
        net = _net(seed)
        g = torch.Generator().manual_seed(seed)
        moving, fixed = torch.rand(2, 2, 1, 24, 24, 24, generator=g)
        task = torch.tensor([0, 1])
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        loss = promptreg_loss(net(moving, fixed, task), moving, fixed, cfg=TINY)
        opt.zero_grad()
        loss["all"].backward()
        opt.step()  # after one step the velocity head is no longer zero
        with torch.no_grad():
            return net(moving, fixed), loss["all"].detach()

    (a, la), (b, lb), (c, _) = run(7), run(7), run(8)
    assert torch.equal(la, lb)
    for name in ("velocity", "disp", "weights", "logits", "dynamic", "prompt", "static"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.disp.abs().max() > 0
    assert not torch.equal(a.dynamic, c.dynamic)
