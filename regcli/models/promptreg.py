"""PromptReg: one registration network for several datasets ("tasks"), steered by a learned task prompt.

Written from the description of Xie, Gao and Zheng, "PromptReg: universal medical image registration via task
prompt learning and domain knowledge transfer" (MICCAI 2025) and the facts of its public training recipe; the
backbone is regcli's own.

**Network.** A 3D U-Net sees the pair ``cat(moving, fixed)``. Encoder level ``k`` (``k = 0 .. L-1``,
``L = len(encoder_channels)``) works at ``1/2**k`` of the input grid: level 0 is one 3x3x3 convolution, every
deeper level a 2x2x2 average pooling and two 3x3x3 convolutions. The decoder goes back up level by level:
trilinear upsampling (``align_corners=False``), concatenation with the encoder's skip, two 3x3x3 convolutions.
A zero-initialised 3x3x3 convolution at full resolution gives the stationary velocity field, which scaling and
squaring turns into a diffeomorphic displacement. Average pooling (rather than stride-2 convolutions) keeps
voxel ``i`` of level ``k`` at the centre of fine voxels ``2**k i .. 2**k (i+1) - 1``, which is where trilinear
upsampling puts it back. Activations are LeakyReLU(0.2), there are no normalisation layers (as in
:mod:`regcli.models.dio`: a voxel's output then depends only on its neighbourhood, not on the field of view).
Inputs of any size are padded at their high-index end (edge values) to a multiple of
``PromptRegConfig.shape_multiple`` and the velocity is cropped back before integration.

**Registration prompt generator (RPG).**

* *Static knowledge base (SKB)*: ``T`` learnable prompts of ``D`` numbers (``num_tasks x prompt_dim``), one per
  training task, initialised orthonormal and kept mutually orthogonal by :func:`orthogonality_loss`.
* *Dynamic prompt*: a learned template feature map (``template_size^3`` voxels, as many channels as the
  bottleneck), resampled trilinearly to the bottleneck grid, is concatenated with the bottleneck features of the
  pair and fused by a 3x3x3 convolution. The mean and the standard deviation of every fused channel over the
  bottleneck voxels (statistics pooling) go through a two-layer MLP to the ``D``-dimensional prompt space. The
  standard deviation keeps the texture and contrast statistics that tell datasets apart and that a mean alone
  averages away. In the reference implementation the template is a feature map of the bottleneck's own size,
  which ties the network to one input shape; a small map that is resampled keeps a spatial template and works
  for any input size.
* *Adaptive fusion* (:func:`fuse_prompts`): ``logits_t = cos(dynamic, skb_t) / tau`` (``tau = 0.1``),
  ``weights = softmax(logits)``, and the task prompt is ``sum_t weights_t skb_t``.
* *Conditioning*: FiLM. At the bottleneck and in every decoder stage (after its first convolution, before the
  activation) the features become ``h * (1 + gamma) + beta`` with ``(gamma, beta)`` a linear function of the task
  prompt, one per channel. The FiLM layers start at zero, so an untrained network is a plain U-Net.

The routing needs no task id: training and inference use the same predicted weights. Where the task of a
training pair is known, :func:`promptreg_loss` trains the logits to pick it (cross-entropy).

**Objective** (:func:`promptreg_loss`, the weights of the published recipe):
``MIND-SSC similarity + 0.1 smoothness + 0.001 orthogonality + 0.001 task similarity``. The similarity is the
mean squared difference of the MIND-SSC descriptors (radius 2, dilation 2, :func:`regcli.features.mind.mind_ssc`,
differentiated through) of the warped moving and the fixed image; the smoothness is the mean squared forward
difference of the displacement (voxel units), as in the reference recipe.

**Where this differs from the reference implementation** (github.com/xiehousheng/PromptReg): its backbone is a
dual-encoder pyramid with progressive warping (from RDP), its prompts are feature maps of the bottleneck's size
that reach the decoder through cross-attention, its fusion temperature is 0.5 and its task loss is
``(1 - cos(fused prompt, true task's prompt))^2``. Here the backbone is a single U-Net, the prompts are vectors
that condition the decoder by FiLM, ``tau = 0.1`` and the task loss is the cross-entropy of the similarity logits
(the specification regcli follows); the orthogonality loss is the squared Frobenius norm rather than the norm.

**Coordinates** (every field of this module). A displacement ``disp`` is ``(N, 3, Z, Y, X)`` float32 in **voxel
units of the input grid**, its channels in **tensor axis order** ``(z, y, x)``: channel ``k`` moves along tensor
axis ``k + 2``. It maps fixed voxels to moving voxels: ``warped(p) = moving(p + disp(p))``
(:func:`warp`, ``grid_sample`` with ``align_corners=True``, so index ``0`` and ``n - 1`` are the grid's first and
last voxel centres). Velocities use the same units (voxels per unit time). Converting to world millimetres (the
LPS ``(x, y, z)`` fields of the rest of regcli) is the job of the method that uses the network, through its
:class:`regcli.spaces.grid.Grid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from regcli.config import ConfigModel
from regcli.features.mind import mind_ssc
from regcli.resample import sample_norm

__all__ = [
    "ARCHITECTURE", "PREPROCESSING", "PromptRegConfig", "PromptRegNet", "PromptRegOutput",
    "PromptGenerator", "fuse_prompts", "orthogonality_loss", "task_similarity_loss", "mind_loss",
    "smoothness_loss", "promptreg_loss", "warp", "integrate_velocity", "jacobian_determinant",
    "save_promptreg_model", "promptreg_from", "load_promptreg",
]

ARCHITECTURE = "promptreg"
_SLOPE = 0.2  # LeakyReLU negative slope
_Voxels = Annotated[int, Field(ge=1)]


class PromptRegConfig(ConfigModel):
    """Architecture of a :class:`PromptRegNet` and its training objective (stored in ``config.json``).

    The defaults (about 0.9 M parameters) train on two CPU cores at 64^3.
    """

    input_channels: int = Field(1, ge=1, description="channels per image (the network sees both images)")
    input_shape: tuple[_Voxels, _Voxels, _Voxels] = Field(
        (64, 64, 64), description="the grid (Z, Y, X) the network is trained on; --method promptreg resizes the "
        "fixed field of view to it")
    encoder_channels: tuple[int, ...] = Field((16, 32, 48, 64), description="channels of encoder level k, at 1/2**k "
                                              "of the input grid; the last level is the bottleneck")
    decoder_channels: tuple[int, ...] = Field((16, 32, 48), description="channels of the decoder stage at level k "
                                              "(k = 0 .. len(encoder_channels) - 2); level 0 gives the velocity")
    num_tasks: int = Field(4, ge=1, description="prompts in the static knowledge base (training datasets)")
    prompt_dim: int = Field(64, ge=1, description="dimension D of the prompt space")
    prompt_hidden: int = Field(128, ge=1, description="hidden width of the dynamic prompt's MLP")
    template_size: int = Field(4, ge=1, description="side of the learned template feature map (template_size^3 "
                               "voxels), resampled to the bottleneck grid")
    tau: float = Field(0.1, gt=0, description="softmax temperature of the prompt fusion (logits = cos / tau)")
    integration_steps: int = Field(7, ge=0, le=20, description="scaling and squaring steps (0: displacement = "
                                   "velocity)")
    similarity_weight: float = Field(1.0, ge=0, description="weight of the MIND-SSC similarity")
    smoothness_weight: float = Field(0.1, ge=0, description="weight of the displacement's squared gradient")
    orthogonality_weight: float = Field(0.001, ge=0, description="weight of the SKB orthogonality loss")
    task_similarity_weight: float = Field(0.001, ge=0, description="weight of the task-similarity cross-entropy")
    mind_radius: int = Field(2, ge=0, description="MIND-SSC patch radius (voxels)")
    mind_dilation: int = Field(2, ge=1, description="MIND-SSC neighbour distance (voxels)")

    @model_validator(mode="after")
    def _check(self) -> "PromptRegConfig":
        if not 2 <= len(self.encoder_channels) <= 6:
            raise ValueError("encoder_channels must list 2 to 6 levels (full resolution, 1/2, 1/4, ...)")
        if len(self.decoder_channels) != len(self.encoder_channels) - 1:
            raise ValueError(f"decoder_channels needs one entry per level above the bottleneck "
                             f"({len(self.encoder_channels) - 1}), got {len(self.decoder_channels)}")
        if any(c < 1 for c in (*self.encoder_channels, *self.decoder_channels)):
            raise ValueError("channel counts must be positive")
        if self.num_tasks > self.prompt_dim:
            raise ValueError(f"num_tasks ({self.num_tasks}) must not exceed prompt_dim ({self.prompt_dim}): the "
                             f"static prompts must be able to be mutually orthogonal")
        return self

    @property
    def levels(self) -> int:
        """Number of encoder levels (the bottleneck is at ``1/2**(levels - 1)``)."""
        return len(self.encoder_channels)

    @property
    def shape_multiple(self) -> int:
        """Inputs are padded (high-index end, edge values) to a multiple of this per axis: ``2**(levels - 1)``."""
        return 2 ** (self.levels - 1)


# ------------------------------------------------------------------------------------------------ geometry
def _base_grid(shape, device, dtype) -> torch.Tensor:
    """(1, 3, *shape) ``grid_sample`` coordinates (align_corners=True) of the voxels, channels (z, y, x)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1
            else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def _voxel_to_norm(shape, device, dtype) -> torch.Tensor:
    """(1, 3, 1, 1, 1) factors from voxel units to normalised units per tensor axis (0 for one-voxel axes)."""
    return torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in shape], device=device,
                        dtype=dtype).view(1, 3, 1, 1, 1)


def _sample(data: torch.Tensor, disp: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, mode: str,
            padding: str) -> torch.Tensor:
    g = (base + disp * scale).flip(1).movedim(1, -1)  # (N, Z, Y, X, 3), grid_sample's (x, y, z) order
    return sample_norm(data, g, mode, padding)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """``image`` sampled at ``p + disp(p)`` for every voxel ``p``: ``warped(p) = image(p + disp(p))``.

    Args:
        image: (N, C, Z, Y, X) float tensor (the moving image, or a field to compose).
        disp: (N, 3, Z, Y, X) float32, voxel units of ``image``'s grid, channels in tensor axis order (z, y, x);
            the same grid size as ``image``.
        mode: ``grid_sample`` interpolation ("bilinear" is trilinear in 3D, "nearest" for labels).
        padding: ``grid_sample`` padding mode beyond the grid ("border" repeats the edge values, "zeros").
    Returns:
        (N, C, Z, Y, X), same dtype; differentiable in ``image`` and ``disp``.
    """
    if image.dim() != 5 or disp.dim() != 5 or disp.shape[1] != 3:
        raise ValueError(f"warp needs image (N, C, Z, Y, X) and disp (N, 3, Z, Y, X), got {tuple(image.shape)} "
                         f"and {tuple(disp.shape)}")
    if image.shape[0] != disp.shape[0] or image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"warp needs image and disp on the same grid and batch, got {tuple(image.shape)} and "
                         f"{tuple(disp.shape)}")
    shape = tuple(disp.shape[2:])
    return _sample(image, disp, _base_grid(shape, disp.device, disp.dtype), _voxel_to_norm(shape, disp.device,
                   disp.dtype), mode, padding)


def integrate_velocity(vel: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the group exponential ``exp(vel)`` by scaling and squaring.

    ``s = vel / 2**steps``, then ``steps`` times ``s <- s + s(p + s(p))`` (the map composed with itself; fields
    sampled trilinearly, edge vectors repeated beyond the grid). For a smooth ``vel`` whose scaled field moves
    points by well under a voxel, every squaring composes two diffeomorphisms.

    Args:
        vel: (N, 3, Z, Y, X) float32 stationary velocity, voxel units, channels (z, y, x).
        steps: squarings (0: the displacement is ``vel`` itself).
    Returns:
        (N, 3, Z, Y, X) float32 displacement, voxel units, channels (z, y, x) (the convention of :func:`warp`).
    """
    if steps < 0:
        raise ValueError(f"integrate_velocity needs steps >= 0, got {steps}")
    shape = tuple(vel.shape[2:])
    base, scale = _base_grid(shape, vel.device, vel.dtype), _voxel_to_norm(shape, vel.device, vel.dtype)
    s = vel * (0.5 ** steps)
    for _ in range(steps):
        s = s + _sample(s, s, base, scale, "bilinear", "border")
    return s


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``p -> p + disp(p)``: (N, Z, Y, X), central differences (one-sided at the edges).

    Args:
        disp: (N, 3, Z, Y, X) displacement, voxel units, channels (z, y, x) (channel k along tensor axis k + 2).
    """
    grads = torch.gradient(disp, dim=(2, 3, 4))  # d disp / d axis j, each (N, 3, Z, Y, X)
    jac = torch.stack(grads, dim=2)  # (N, 3 (component i), 3 (axis j), Z, Y, X)
    jac = jac + torch.eye(3, dtype=disp.dtype, device=disp.device).view(1, 3, 3, 1, 1, 1)
    return torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2))


# ------------------------------------------------------------------------------------------------ layers
def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv3d:
    conv = nn.Conv3d(cin, cout, k, padding=k // 2)
    nn.init.kaiming_normal_(conv.weight, a=_SLOPE, nonlinearity="leaky_relu")
    nn.init.zeros_(conv.bias)
    return conv


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, _SLOPE)


class FiLM(nn.Module):
    """Feature-wise affine conditioning: ``h * (1 + gamma) + beta``, ``(gamma, beta) = Linear(prompt)``.

    Zero-initialised, so it starts as the identity. ``h``: (N, C, Z, Y, X); ``prompt``: (N, D).
    """

    def __init__(self, prompt_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(prompt_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.linear(prompt)[:, :, None, None, None].chunk(2, dim=1)
        return h * (1 + gamma) + beta


class EncoderLevel(nn.Module):
    """Level 0: one 3x3x3 convolution and LeakyReLU; deeper levels: 2x2x2 average pooling, then two of them."""

    def __init__(self, cin: int, cout: int, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.conv1 = _conv(cin, cout)
        self.conv2 = _conv(cout, cout) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.avg_pool3d(x, 2)
        x = _act(self.conv1(x))
        return _act(self.conv2(x)) if self.conv2 is not None else x


class DecoderStage(nn.Module):
    """``act(conv2(act(FiLM(conv1(cat(up, skip)), prompt))))``: two 3x3x3 convolutions, FiLM after the first."""

    def __init__(self, cin: int, cout: int, prompt_dim: int) -> None:
        super().__init__()
        self.conv1 = _conv(cin, cout)
        self.film = FiLM(prompt_dim, cout)
        self.conv2 = _conv(cout, cout)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return _act(self.conv2(_act(self.film(self.conv1(x), prompt))))


def fuse_prompts(dynamic: torch.Tensor, static: torch.Tensor, tau: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adaptive prompt fusion: cosine similarity to every SKB prompt, softmax with temperature, weighted sum.

    Args:
        dynamic: (N, D) dynamic prompts of the pairs.
        static: (T, D) static knowledge base.
        tau: temperature (> 0); smaller is sharper.
    Returns:
        ``(logits, weights, prompt)``: (N, T) ``cos / tau``, (N, T) softmax weights (rows sum to 1), and the
        (N, D) task prompt ``weights @ static``.
    """
    if tau <= 0:
        raise ValueError(f"fuse_prompts needs tau > 0, got {tau}")
    cos = F.normalize(dynamic, dim=1, eps=1e-8) @ F.normalize(static, dim=1, eps=1e-8).T
    logits = cos / tau
    weights = torch.softmax(logits, dim=1)
    return logits, weights, weights @ static


class PromptGenerator(nn.Module):
    """Registration prompt generator: the static knowledge base, the dynamic prompt and their fusion.

    ``forward(bottleneck)`` takes the (N, C, z, y, x) bottleneck features of the pairs and returns
    ``(dynamic (N, D), logits (N, T), weights (N, T), task prompt (N, D))``.
    """

    def __init__(self, channels: int, cfg: PromptRegConfig) -> None:
        super().__init__()
        self.tau = cfg.tau
        static = torch.empty(cfg.num_tasks, cfg.prompt_dim)
        nn.init.orthogonal_(static)  # rows orthonormal (num_tasks <= prompt_dim is validated)
        self.static = nn.Parameter(static)
        n = cfg.template_size
        self.template = nn.Parameter(torch.randn(1, channels, n, n, n))
        self.fuse = _conv(2 * channels, channels)
        self.mlp = nn.Sequential(nn.Linear(2 * channels, cfg.prompt_hidden), nn.LeakyReLU(_SLOPE),
                                 nn.Linear(cfg.prompt_hidden, cfg.prompt_dim))

    def dynamic(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(N, D) dynamic prompts of (N, C, z, y, x) bottleneck features."""
        t = F.interpolate(self.template, size=bottleneck.shape[2:], mode="trilinear", align_corners=True)
        h = _act(self.fuse(torch.cat((bottleneck, t.expand(bottleneck.shape[0], -1, -1, -1, -1)), 1)))
        mean = h.mean(dim=(2, 3, 4))
        std = torch.sqrt(h.var(dim=(2, 3, 4), correction=0) + 1e-6)  # eps: finite gradient for a flat map
        return self.mlp(torch.cat((mean, std), 1))

    def forward(self, bottleneck: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dynamic = self.dynamic(bottleneck)
        logits, weights, prompt = fuse_prompts(dynamic, self.static, self.tau)
        return dynamic, logits, weights, prompt


# ------------------------------------------------------------------------------------------------ network
@dataclass
class PromptRegOutput:
    """What :meth:`PromptRegNet.forward` returns (N pairs, T tasks, D prompt dimensions).

    Attributes:
        velocity: (N, 3, Z, Y, X) float32 stationary velocity, voxel units, channels (z, y, x).
        disp: (N, 3, Z, Y, X) float32 displacement ``exp(velocity)``, voxel units, channels (z, y, x), fixed
            voxel -> moving voxel (``warped = warp(moving, disp)``).
        weights: (N, T) fusion weights (softmax of ``logits``; rows sum to 1).
        logits: (N, T) ``cos(dynamic, static_t) / tau``.
        dynamic: (N, D) dynamic prompts.
        prompt: (N, D) task prompts that condition the decoder.
        static: (T, D) the static knowledge base (the network's parameter, for the prompt losses).
        task: (N,) int64 task ids given to ``forward``, or None.
    """

    velocity: torch.Tensor
    disp: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    dynamic: torch.Tensor
    prompt: torch.Tensor
    static: torch.Tensor
    task: Optional[torch.Tensor] = None


class PromptRegNet(nn.Module):
    """The PromptReg network (see the module docstring for the architecture and the coordinate convention).

    ``forward(moving, fixed, task=None)`` takes two (N, input_channels, Z, Y, X) float32 images on the same grid
    (any size; intensities normalised, e.g. to [0, 1]) and returns a :class:`PromptRegOutput`. The task ids are
    never needed: the prompt fusion is always the predicted one. When given ((N,) int64 in ``[0, num_tasks)``)
    they are checked and carried in the output for :func:`promptreg_loss`.
    """

    def __init__(self, cfg: Optional[PromptRegConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PromptRegConfig()
        enc, dec = cfg.encoder_channels, cfg.decoder_channels
        self.encoder = nn.ModuleList(
            EncoderLevel(2 * cfg.input_channels if k == 0 else enc[k - 1], enc[k], pool=k > 0)
            for k in range(cfg.levels))
        self.prompts = PromptGenerator(enc[-1], cfg)
        self.bottleneck_film = FiLM(cfg.prompt_dim, enc[-1])
        # decoder[k] works at level k; its input is the upsampled stage k + 1 (or the bottleneck) and skip k
        self.decoder = nn.ModuleList(
            DecoderStage((enc[-1] if k == cfg.levels - 2 else dec[k + 1]) + enc[k], dec[k], cfg.prompt_dim)
            for k in range(cfg.levels - 1))
        self.head = nn.Conv3d(dec[0], 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _check(self, moving: torch.Tensor, fixed: torch.Tensor, task: Optional[torch.Tensor]) -> None:
        c = self.cfg.input_channels
        if moving.dim() != 5 or moving.shape[1] != c or moving.shape != fixed.shape:
            raise ValueError(f"PromptRegNet needs moving and fixed images of the same shape (N, {c}, Z, Y, X), got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        if task is not None:
            if task.dtype != torch.int64 or task.shape != (moving.shape[0],):
                raise ValueError(f"task must be an (N,) int64 tensor of task ids, got {task.dtype} of shape "
                                 f"{tuple(task.shape)}")
            if bool((task < 0).any()) or bool((task >= self.cfg.num_tasks).any()):
                raise ValueError(f"task ids must lie in [0, {self.cfg.num_tasks}), got {task.tolist()}")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor,
                task: Optional[torch.Tensor] = None) -> PromptRegOutput:
        self._check(moving, fixed, task)
        size = tuple(moving.shape[2:])
        pad = [(-n) % self.cfg.shape_multiple for n in size]
        x = torch.cat((moving, fixed), 1)
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        skips = []
        h = x
        for level in self.encoder:
            h = level(h)
            skips.append(h)
        dynamic, logits, weights, prompt = self.prompts(h)
        h = self.bottleneck_film(h, prompt)
        for k in range(self.cfg.levels - 2, -1, -1):
            up = F.interpolate(h, size=skips[k].shape[2:], mode="trilinear", align_corners=False)
            h = self.decoder[k](torch.cat((up, skips[k]), 1), prompt)
        velocity = self.head(h)[:, :, : size[0], : size[1], : size[2]]
        disp = integrate_velocity(velocity, self.cfg.integration_steps)
        return PromptRegOutput(velocity=velocity, disp=disp, weights=weights, logits=logits, dynamic=dynamic,
                               prompt=prompt, static=self.prompts.static, task=task)


# ------------------------------------------------------------------------------------------------ objective
def orthogonality_loss(static: torch.Tensor) -> torch.Tensor:
    """``|| P P^T - I ||_F^2`` with ``P`` the (T, D) prompts scaled to unit rows: the sum of the squared cosines
    between different prompts. 0 exactly when the prompts are mutually orthogonal (whatever their lengths);
    squared rather than the plain norm, so it is smooth at its minimum."""
    p = F.normalize(static, dim=1, eps=1e-8)
    gram = p @ p.T
    return (gram - torch.eye(p.shape[0], dtype=p.dtype, device=p.device)).square().sum()


def task_similarity_loss(logits: torch.Tensor, task: Optional[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the (N, T) similarity logits against the (N,) int64 task ids; 0 when ``task`` is None."""
    if task is None:
        return logits.new_zeros(())
    return F.cross_entropy(logits, task)


def mind_loss(warped: torch.Tensor, fixed: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """Mean squared difference of the MIND-SSC descriptors (12 channels, :func:`regcli.features.mind.mind_ssc`)
    of two (N, 1, Z, Y, X) images; differentiable in both."""
    return (mind_ssc(warped, radius, dilation) - mind_ssc(fixed, radius, dilation)).square().mean()


def smoothness_loss(disp: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of a (N, 3, Z, Y, X) voxel-unit displacement,
    averaged over the three axes (dimensionless)."""
    dz = disp[:, :, 1:] - disp[:, :, :-1]
    dy = disp[:, :, :, 1:] - disp[:, :, :, :-1]
    dx = disp[:, :, :, :, 1:] - disp[:, :, :, :, :-1]
    return (dz.square().mean() + dy.square().mean() + dx.square().mean()) / 3


def promptreg_loss(out: PromptRegOutput, moving: torch.Tensor, fixed: torch.Tensor,
                   task: Optional[torch.Tensor] = None, *, cfg: PromptRegConfig) -> dict[str, torch.Tensor]:
    """The PromptReg training objective of a batch of pairs.

    ``all = w_sim MIND(warp(moving, disp), fixed) + w_smooth smoothness(disp) + w_orth orthogonality(SKB)
    + w_task CE(logits, task)``, the weights from ``cfg`` (1, 0.1, 0.001, 0.001 by default). The moving image is
    warped with edge padding.

    Args:
        out: the network's output for (moving, fixed).
        moving, fixed: (N, 1, Z, Y, X) float32 images on the same grid.
        task: (N,) int64 task ids; None: ``out.task`` (what ``forward`` was given). Without either, the
            task-similarity term is 0 (the pair's task is unknown).
        cfg: the network's configuration (loss weights, MIND-SSC radius and dilation).
    Returns:
        ``{"all", "similarity", "smoothness", "orthogonality", "task_similarity"}``, scalars (unweighted terms
        and the weighted total).
    """
    if task is None:
        task = out.task
    elif out.task is not None and not torch.equal(task, out.task):
        raise ValueError("promptreg_loss: task differs from the task ids the network was given")
    warped = warp(moving, out.disp)
    similarity = mind_loss(warped, fixed, cfg.mind_radius, cfg.mind_dilation)
    smoothness = smoothness_loss(out.disp)
    orthogonality = orthogonality_loss(out.static)
    task_similarity = task_similarity_loss(out.logits, task)
    total = (cfg.similarity_weight * similarity + cfg.smoothness_weight * smoothness
             + cfg.orthogonality_weight * orthogonality + cfg.task_similarity_weight * task_similarity)
    return {"all": total, "similarity": similarity, "smoothness": smoothness, "orthogonality": orthogonality,
            "task_similarity": task_similarity}


# ------------------------------------------------------------------------------------------------ weights
#: how images are prepared for the network, recorded in every model's config.json
PREPROCESSING = {
    "intensity": "each image scaled to [0, 1] (e.g. its 1st-99th percentile window), both on the same grid",
    "shape": "any size; padded internally (edge values, high-index end) to a multiple of 2**(levels - 1)",
    "coordinates": "displacements in voxel units, channels in tensor axis order (z, y, x), fixed -> moving, "
                   "applied with grid_sample(align_corners=True)",
}


def save_promptreg_model(net: PromptRegNet, folder, model_card: str, training: Optional[dict] = None,
                         version: str = "0", overwrite: bool = False):
    """Write ``net`` as a Hub-layout model folder (``config.json``, ``model.safetensors``, ``README.md``).

    ``config.json`` holds ``architecture`` (``"promptreg"``), ``version``, ``net`` (the :class:`PromptRegConfig`),
    ``preprocessing`` and ``training`` (the recipe, e.g. the task names in SKB order);
    :func:`regcli.weights.save_model_folder` adds the sha256. Returns the folder.
    """
    from regcli.weights import save_model_folder

    config = {"architecture": ARCHITECTURE, "version": version, "net": net.cfg.model_dump(mode="json"),
              "preprocessing": PREPROCESSING, "training": training or {}}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save_model_folder(folder, state, config, model_card, overwrite=overwrite)


def promptreg_from(model, device=None) -> PromptRegNet:
    """The network (eval mode) of a resolved, verified :class:`regcli.weights.ResolvedModel`; a model of another
    architecture, or whose tensors do not fit its configuration, is a one-line WeightsError."""
    from regcli.weights import build_network

    return build_network(model, ARCHITECTURE, "a PromptReg network", PromptRegConfig, PromptRegNet, device)


def load_promptreg(spec: str, device=None) -> PromptRegNet:
    """Resolve ``spec`` (folder, ``hub:org/name@commit`` or registry name), verify it, build the network."""
    from regcli.weights import resolve

    return promptreg_from(resolve(spec), device)
