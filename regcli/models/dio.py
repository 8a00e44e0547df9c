"""DIO feature networks: dense, registration-aware feature images at several scales.

DIO (Deep Implicit Optimization, Jena et al.) trains a network whose feature images a classical iterative
solver then registers; the solver never sees intensities. Here the networks are:

* ``arch="unet"``: a 3D UNet with two 3x3x3 convolutions per downsampled encoder level (one at full
  resolution);
* ``arch="lku"``: a large-kernel UNet (LKU-Net, Jia et al. 2022): after the first 3x3x3 convolution of each
  downsampled encoder level, a block that sums parallel 1x1x1, 3x3x3 and 5x5x5 convolutions and the identity.
  The three kernels are added into one 5x5x5 kernel (zero-padded) before the convolution, which is the same
  sum of convolutions (convolution is linear) at the cost of the 5x5x5 one alone, in training too.

Both apply to one image at a time (fixed and moving may have different grids and sizes) and return features
at the **levels** ``cfg.levels`` (default 4, 2, 1: 1/4, 1/2 and full resolution of the working grid), each
from a 1x1x1 head on the decoder at that level. The decoder adds each upsampled coarser stage to the encoder's
skip (after a 1x1x1 convolution at the coarse level that matches the channels) and applies one 3x3x3
convolution; additive rather than concatenated skips keep the full-resolution work to two convolutions of
``widths[0]`` channels, which is most of the CPU time (96x112x96 voxels: about 0.4 s per forward pass on two
cores with the default widths).

**Geometry.** Downsampling is 2x2x2 average pooling (stride 2) and upsampling is trilinear with
``align_corners=False``; every convolution has an odd kernel and symmetric zero padding. So voxel ``i`` of
level ``l`` is the centre of fine voxels ``l*i .. l*i + l - 1``, exactly as for
``avg_pool3d(x, l, stride=l)``: the level-``l`` output lives on
``pooled_grid(padded_grid(grid, l)[0], l)`` (:mod:`regcli.spaces.grid`), size ``ceil(n / l)`` per axis.
(A stride-2 convolution with padding 1 would put its outputs at fine voxel ``2 i`` instead, half a fine voxel
away per level.) Inputs of any size are padded at their high-index end (edge values) to a multiple of the
total stride ``2 ** (len(widths) - 1)`` and the outputs cropped.

**No normalisation layers.** GroupNorm/InstanceNorm statistics are taken over the whole volume, so the
features of a voxel would depend on the field of view, and fixed and moving images with different fields of
view would get different features for the same anatomy; BatchNorm with batch 1 is worse. Inputs are already
normalised (:func:`regcli.models.embedding.normalise_intensity`, percentiles to [0, 1]), the networks are
shallow, and Kaiming initialisation keeps activations at a useful scale, so no normalisation is needed. The
features of a voxel then depend only on its neighbourhood (the receptive field), and the network is
deterministic on CPU given ``torch.manual_seed``.

**Features at initialisation.** The heads have no bias and their weights sum to zero over the input channels
at initialisation, so the common positive offset that LeakyReLU activations share does not reach the
features: an untrained network already gives features that vary in space and point in many directions (on a
48x44x40 phantom the mean of the unit feature vectors has length 0.4-0.7, where 1 would mean every voxel
alike; without the centring 0.5-0.8), which is a useful start for training. With ``normalize`` (default) each
voxel's feature vector has unit length, so the feature SSD between two voxels is ``2 - 2 cos`` in [0, 4] and
the solver's learning rate keeps its meaning whatever the network.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from regcli.config import ConfigModel
from regcli.spaces.image import Image

ARCHITECTURE = "regcli-dio-features"

_SLOPE = 0.2  # LeakyReLU negative slope
MIND_CHANNELS = 12


class DioNetConfig(ConfigModel):
    """Architecture and preprocessing of a :class:`DioFeatureNet` (stored in the model's ``config.json``)."""

    arch: Literal["unet", "lku"] = "unet"
    in_channels: int = Field(1, ge=1)
    widths: tuple[int, ...] = Field((12, 16, 24, 32),
                                    description="channels per encoder depth, at 1, 1/2, 1/4, 1/8, ...")
    levels: tuple[int, ...] = Field((4, 2, 1), description="output levels (downsampling factors, powers of 2)")
    feature_channels: tuple[int, ...] = Field((8, 8, 8), description="feature channels per level")
    normalize: bool = Field(True, description="unit-length feature vectors per voxel")
    mind_residual: bool = Field(False, description="the heads learn a correction to MIND-SSC: each level's "
                                "features are unit(MIND + head), MIND-SSC (radius 1, dilation 2, of the first input "
                                "channel) centred, unit length and pooled to the level, the heads starting at zero "
                                "(so an untrained network gives MIND-SSC); needs 12 feature channels per level")
    spacing_mm: float = Field(2.0, gt=0, description="isotropic working spacing the network was trained for")
    percentiles: tuple[float, float] = Field((1.0, 99.0), description="intensity window mapped to [0, 1]")

    @model_validator(mode="after")
    def _check(self) -> "DioNetConfig":
        if not 2 <= len(self.widths) <= 6 or any(w < 1 for w in self.widths):
            raise ValueError("widths must list 2 to 6 positive channel counts (encoder depths 1, 1/2, 1/4, ...)")
        stride = self.total_stride
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError("levels must be distinct and not empty")
        for lev in self.levels:
            if lev < 1 or lev & (lev - 1) or lev > stride:
                raise ValueError(f"level {lev} is not a power of 2 between 1 and the total stride {stride}")
        if len(self.feature_channels) != len(self.levels) or any(c < 1 for c in self.feature_channels):
            raise ValueError("feature_channels must give one positive channel count per level")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        if self.mind_residual and any(c != MIND_CHANNELS for c in self.feature_channels):
            raise ValueError(f"mind_residual needs {MIND_CHANNELS} feature channels at every level (MIND-SSC's), got "
                             f"{list(self.feature_channels)}")
        if self.mind_residual and not self.normalize:
            raise ValueError("mind_residual needs normalize: true")
        return self

    @property
    def total_stride(self) -> int:
        """Downsampling factor of the deepest encoder level (inputs are padded to a multiple of it)."""
        return 2 ** (len(self.widths) - 1)


# ------------------------------------------------------------------------------------------- layers
def _conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> nn.Conv3d:
    conv = nn.Conv3d(cin, cout, k, padding=k // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, a=_SLOPE, nonlinearity="leaky_relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


class ConvAct(nn.Module):
    """3x3x3 convolution (zero padding 1, so outputs stay on the input voxels) and LeakyReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x), _SLOPE)


class LargeKernelBlock(nn.Module):
    """LKU-Net block: ``act(conv1(x) + conv3(x) + conv5(x) + x)`` with 1x1x1, 3x3x3 and 5x5x5 kernels.

    Evaluated as one 5x5x5 convolution whose kernel is the sum of the three (the smaller ones zero-padded to
    5x5x5 around their centre); the identity is added after it. Channels in = channels out.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(channels, channels, 1)
        self.conv3 = _conv(channels, channels, 3)
        self.conv5 = _conv(channels, channels, 5)
        with torch.no_grad():  # three branches and the identity add up: keep the sum's variance near one branch's
            for conv in (self.conv1, self.conv3, self.conv5):
                conv.weight.mul_(1.0 / math.sqrt(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.conv5.weight + F.pad(self.conv3.weight, (1,) * 6) + F.pad(self.conv1.weight, (2,) * 6))
        b = self.conv1.bias + self.conv3.bias + self.conv5.bias
        return F.leaky_relu(F.conv3d(x, w, b, padding=2) + x, _SLOPE)


class DioFeatureNet(nn.Module):
    """UNet or LKU-Net with feature heads at ``cfg.levels`` (see the module docstring for the geometry).

    ``forward(x)`` takes x: (N, in_channels, Z, Y, X) float32 normalised intensities, any size, and returns
    ``{level: (N, C_level, ceil(Z/level), ceil(Y/level), ceil(X/level)) float32}``; with ``cfg.normalize``
    every feature vector has unit length along the channel axis.
    """

    def __init__(self, cfg: Optional[DioNetConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DioNetConfig()
        w = cfg.widths
        depth = len(w)
        # encoder: depth 0 at full resolution, depth d at 1/2**d (average pooling in between)
        enc = [nn.Sequential(ConvAct(cfg.in_channels, w[0]))]
        for d in range(1, depth):
            second = LargeKernelBlock(w[d]) if cfg.arch == "lku" else ConvAct(w[d], w[d])
            enc.append(nn.Sequential(ConvAct(w[d - 1], w[d]), second))
        self.encoder = nn.ModuleList(enc)
        # decoder: depth d (< depth - 1), from the finest output level up to the bottleneck:
        #   h_d = act(conv3(enc_d + upsample(lateral_d(h_{d+1}))))
        # additive skips (a 1x1x1 'lateral' convolution at the coarse level matches the channels before
        # the upsampling) keep the full-resolution stage to one convolution of w[0] channels
        self.finest_depth = min(cfg.levels).bit_length() - 1
        self.lateral = nn.ModuleDict({str(d): _conv(w[d + 1], w[d], 1, bias=False)
                                      for d in range(self.finest_depth, depth - 1)})
        self.decoder = nn.ModuleDict({str(d): ConvAct(w[d], w[d]) for d in range(self.finest_depth, depth - 1)})
        heads = {}
        for level, channels in zip(cfg.levels, cfg.feature_channels):
            head = _conv(w[level.bit_length() - 1], channels, 1, bias=False)
            with torch.no_grad():  # weights sum to zero over input channels: a common offset does not pass
                head.weight.sub_(head.weight.mean(dim=1, keepdim=True))
                if cfg.mind_residual:  # a correction that starts at zero: the untrained network gives MIND-SSC
                    head.weight.zero_()
            heads[str(level)] = head
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"DioFeatureNet needs (N, {cfg.in_channels}, Z, Y, X) input, got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        mind = mind_levels(x[:, :1], cfg.levels) if cfg.mind_residual else None
        stride = cfg.total_stride
        pad = [(-n) % stride for n in size]  # (z, y, x) voxels at the high-index end
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        skips = []
        h = x
        for d, block in enumerate(self.encoder):
            if d > 0:
                h = F.avg_pool3d(h, 2, stride=2)
            h = block(h)
            skips.append(h)
        per_depth = {len(skips) - 1: h}
        for d in range(len(skips) - 2, self.finest_depth - 1, -1):
            up = F.interpolate(self.lateral[str(d)](h), size=skips[d].shape[2:], mode="trilinear",
                               align_corners=False)
            h = self.decoder[str(d)](skips[d] + up)
            per_depth[d] = h
        out = {}
        for level in cfg.levels:
            crop = tuple(-(-n // level) for n in size)
            h = per_depth[level.bit_length() - 1][:, :, : crop[0], : crop[1], : crop[2]]
            f = _pointwise(h, self.heads[str(level)].weight)
            if mind is not None:
                f = f + mind[level]
            out[level] = _unit(f) if cfg.normalize else f
        return out


def mind_levels(x: torch.Tensor, levels) -> dict[int, torch.Tensor]:
    """MIND-SSC (radius 1, dilation 2 voxels) of (N, 1, Z, Y, X) intensities, centred over its channels and unit
    length (0 where the image is flat), average-pooled to each level (padded at the high-index end with edge
    values, as :func:`level_grid` places the voxels) and unit length again: ``{level: (N, 12, ceil(Z/l), ...)}``.
    Not differentiated (a fixed function of the input)."""
    from regcli.features.mind import mind_ssc

    def unit_or_zero(f: torch.Tensor) -> torch.Tensor:
        # MIND lies in (0, 1]: a centred vector shorter than 1e-4 is rounding in a flat region, which unit length
        # would blow up (1e-12 let float32 rounding that differs with the thread count through: 0.9 mm apart)
        n = f.square().sum(1, keepdim=True)
        return torch.where(n > 1e-8, f * n.clamp_min(1e-8).rsqrt(), torch.zeros_like(f))

    with torch.no_grad():
        m = mind_ssc(x, 1, 2)
        m = unit_or_zero(m - m.mean(1, keepdim=True))
        out = {}
        for level in levels:
            if level == 1:
                out[level] = m
                continue
            pad = [(-n) % level for n in m.shape[2:]]
            p = F.pad(m, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate") if any(pad) else m
            out[level] = unit_or_zero(F.avg_pool3d(p, level, stride=level))
    return out


def _pointwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1x1 convolution without bias as a matrix product (several times faster than conv3d on CPU).
    x: (N, Cin, Z, Y, X); weight: (Cout, Cin, 1, 1, 1)."""
    return torch.einsum("oc,nczyx->nozyx", weight[:, :, 0, 0, 0], x)


def _unit(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``f / max(|f|, eps)`` along the channel axis (as F.normalize, about twice as fast on CPU)."""
    return f * f.square().sum(1, keepdim=True).clamp_min(eps * eps).rsqrt()


# ------------------------------------------------------------------------------------------- images
def level_grid(grid, level: int):
    """The grid of level-``level`` features for an input on ``grid``: voxel ``i`` is the centre of input
    voxels ``level*i .. level*i + level - 1`` (size ``ceil(n / level)`` per axis); the same grid as
    convexadam's average pooling by ``level`` (its helpers are reused so the two can never disagree)."""
    from regcli.spaces.grid import padded_grid, pooled_grid

    return pooled_grid(padded_grid(grid, level)[0], level)


def dio_features(image: Image, net: DioFeatureNet, device=None, grad: bool = False) -> dict[int, Image]:
    """Feature images of ``image`` at the network's levels.

    Args:
        image: (Z, Y, X) scalar image, or (C, Z, Y, X) with C = ``net.cfg.in_channels`` (each channel
            normalised on its own), float, on the working grid the network expects (isotropic
            ``net.cfg.spacing_mm``; any direction and origin; the caller resamples).
        net: the feature network.
        device: where to run (default: the image's device).
        grad: keep the autograd graph and the network's mode (training); otherwise run in eval mode under
            ``torch.no_grad()`` and restore the mode afterwards.

    Returns:
        ``{level: Image}`` with data (C_level, ceil(Z/level), ceil(Y/level), ceil(X/level)) float32 on
        ``device``, dimensionless features (unit vectors when ``net.cfg.normalize``), on
        :func:`level_grid` ``(image.grid, level)``.

    Raises:
        InputError: the image does not have the shape the network needs.
    """
    from regcli.errors import InputError
    from regcli.models.embedding import normalise_intensity

    cin = net.cfg.in_channels
    data = image.data
    if data.dim() == 3:
        data = data[None]
    if data.dim() != 4 or data.shape[0] != cin:
        raise InputError(f"DIO features need a 3D image with {cin} channel(s), got data of shape "
                         f"{tuple(image.data.shape)}" + (f" ({image.name})" if image.name else ""))
    if not torch.is_floating_point(data):
        data = data.to(torch.float32)
    dev = torch.device(device) if device is not None else data.device
    x = torch.stack([normalise_intensity(c, net.cfg.percentiles) for c in data]).to(dev)[None]
    net = net.to(dev)
    if grad:
        feats = net(x)
    else:
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                feats = net(x)
        finally:
            net.train(was_training)
    return {level: Image(f[0], level_grid(image.grid, level), image.name) for level, f in feats.items()}


# ----------------------------------------------------------------------------------------- weights
def save_dio_model(net: DioFeatureNet, folder, model_card: str, training: Optional[dict] = None,
                   version: str = "0", overwrite: bool = False):
    """Write ``net`` as a Hub-layout model folder (``config.json``, ``model.safetensors``, ``README.md``).

    ``config.json`` holds ``architecture`` (``"regcli-dio-features"``), ``net`` (the :class:`DioNetConfig`),
    ``preprocessing``, ``training`` (the recipe) and ``version``; :func:`regcli.weights.save_model_folder`
    adds the sha256. Returns the folder.
    """
    from regcli.weights import save_network

    return save_network(net, folder, ARCHITECTURE, model_card, training, version, overwrite)


def load_dio(spec: str, device=None) -> DioFeatureNet:
    """Resolve ``spec`` (folder, ``hub:org/name@commit`` or registry name; see :mod:`regcli.weights`), check
    it, and build the network in eval mode."""
    from regcli.weights import resolve

    return dio_from(resolve(spec), device)


def dio_from(model, device=None) -> DioFeatureNet:
    """Build the network (eval mode) from an already resolved and verified
    :class:`regcli.weights.ResolvedModel`; a model of another architecture, or whose tensors do not fit its
    configuration, is a one-line WeightsError."""
    from regcli.weights import build_network

    return build_network(model, ARCHITECTURE, "a DIO feature network", DioNetConfig, DioFeatureNet, device)
