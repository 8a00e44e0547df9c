"""Anatomical embedding network (the "SAM" of Yan et al., used by SAMConvex): where in the body is a voxel.

A small 3D convolutional encoder-decoder maps an image to two L2-normalised embeddings:

* **global** at 1/8 of the input resolution, after a stack of dilated convolutions, so each vector sees a
  large part of the body (receptive field :meth:`EmbeddingNet.receptive_field_voxels`) and can tell,
  e.g., the left from the right kidney;
* **local** at 1/2 of the input resolution, from a decoder with skip connections, for fine detail.

Geometry: each stride-2 convolution (kernel 3, padding 1) outputs at input voxel ``2 i``, so the global map
lives on ``grid.subsampled(8)`` and the local map on ``grid.subsampled(2)`` of the input grid
(:meth:`regcli.spaces.grid.Grid.subsampled`). :func:`embed` returns both as :class:`Image` objects with those
grids, and :meth:`Embedding.combined` resamples the global map onto the local grid (trilinear, edge values
repeated) and concatenates them, global channels first, each half scaled by 1/sqrt(2) so every combined vector has unit
length.

The input is expected on an isotropic grid of ``EmbeddingConfig.spacing_mm`` (the method resamples to it)
and is normalised here: intensities are mapped linearly so that the ``percentiles`` of the image (over
non-background voxels) go to 0 and 1, then clipped to [-0.5, 1.5].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from regcli.config import ConfigModel
from regcli.spaces.image import Image


class EmbeddingConfig(ConfigModel):
    """Architecture and preprocessing of an :class:`EmbeddingNet` (stored in the model's ``config.json``)."""

    architecture: str = "regcli-sam-embedding"
    in_channels: int = Field(1, ge=1)
    widths: tuple[int, int, int, int] = Field((8, 16, 24, 32), description="channels at 1, 1/2, 1/4, 1/8")
    global_dim: int = Field(16, ge=1, description="channels of the global (1/8) embedding")
    local_dim: int = Field(16, ge=1, description="channels of the local (1/2) embedding")
    context_dilations: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (1, 2, 4, 8), description="dilated 3x3x3 convolutions at 1/8")
    spacing_mm: float = Field(2.0, gt=0, description="isotropic input spacing the network was trained for")
    percentiles: tuple[float, float] = Field((1.0, 99.0), description="intensity window mapped to [0, 1]")

    @model_validator(mode="after")
    def _check(self) -> "EmbeddingConfig":
        if any(w < 1 for w in self.widths):
            raise ValueError("widths must be positive")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError("percentiles must satisfy 0 <= low < high <= 100")
        return self


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.1, inplace=True))


class EmbeddingNet(nn.Module):
    """Encoder (1 → 1/8) with dilated context at 1/8 → global head; decoder (1/8 → 1/2) → local head.

    ``forward(x)`` takes (N, C, Z, Y, X) normalised intensities and returns ``(global, local)``:
    (N, global_dim, ceil(Z/8), ...) and (N, local_dim, ceil(Z/2), ...) float32, unit length along channels.
    """

    def __init__(self, cfg: Optional[EmbeddingConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or EmbeddingConfig()
        w0, w1, w2, w3 = cfg.widths
        self.enc0 = nn.Sequential(_block(cfg.in_channels, w0), _block(w0, w0))
        self.enc1 = nn.Sequential(_block(w0, w1, stride=2), _block(w1, w1))
        self.enc2 = nn.Sequential(_block(w1, w2, stride=2), _block(w2, w2))
        self.enc3 = nn.Sequential(_block(w2, w3, stride=2), _block(w3, w3))
        self.context = nn.ModuleList([_block(w3, w3, dilation=d) for d in cfg.context_dilations])
        self.global_head = nn.Conv3d(w3, cfg.global_dim, 1)
        self.dec2 = _block(w3 + w2, w2)
        self.dec1 = _block(w2 + w1, w1)
        self.local_head = nn.Conv3d(w1, cfg.local_dim, 1)

    def receptive_field_voxels(self) -> int:
        """Side of the receptive field of one global vector, in input voxels (multiply by spacing_mm)."""
        rf, jump = 1, 1
        layers = [(3, 1, 1)] * 2 + [(3, 2, 1), (3, 1, 1)] * 3 + [(3, 1, d) for d in self.cfg.context_dilations]
        for k, stride, dil in layers:
            rf += (k - 1) * dil * jump
            jump *= stride
        return rf

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        c = e3
        for layer in self.context:
            c = c + layer(c)
        g = F.normalize(self.global_head(c), dim=1)
        d2 = self.dec2(torch.cat((F.interpolate(c, size=e2.shape[2:], mode="trilinear", align_corners=False), e2), 1))
        d1 = self.dec1(torch.cat((F.interpolate(d2, size=e1.shape[2:], mode="trilinear", align_corners=False), e1), 1))
        return g, F.normalize(self.local_head(d1), dim=1)


def normalise_intensity(data: torch.Tensor, percentiles: tuple[float, float]) -> torch.Tensor:
    """Map (Z, Y, X) intensities linearly so the given percentiles of the non-background voxels (those
    above the minimum) go to 0 and 1; clip to [-0.5, 1.5]. A constant image maps to zeros."""
    flat = data.reshape(-1).to(torch.float32)
    fg = flat[flat > flat.min()]
    if fg.numel() < 16:
        return torch.zeros_like(data, dtype=torch.float32)
    sample = fg[:: max(1, fg.numel() // 1_000_000)]
    lo, hi = torch.quantile(sample, torch.tensor([percentiles[0] / 100, percentiles[1] / 100], device=sample.device))
    if float(hi - lo) <= 0:
        return torch.zeros_like(data, dtype=torch.float32)
    return ((data.to(torch.float32) - lo) / (hi - lo)).clamp_(-0.5, 1.5)


@dataclass
class Embedding:
    """The two embeddings of one image, each on its own grid (see the module docstring)."""

    global_: Image  # (global_dim, Z/8, Y/8, X/8) on grid.subsampled(8)
    local: Image  # (local_dim, Z/2, Y/2, X/2) on grid.subsampled(2)

    def combined(self, local: Optional[torch.Tensor] = None, global_weight: float = 1.0) -> Image:
        """(global_dim + local channels, ...) on the local grid: the global map resampled there (trilinear,
        edges repeated, unit length again) and concatenated before the local one, weighted
        ``global_weight : 1`` and scaled so that two unit halves give a unit vector (the SSD of two combined
        vectors is then 2 - 2 x their correlation).

        Args:
            local: another fine map (C, ...) on the local grid to use instead of the local head's.
            global_weight: weight of the global half.
        """
        from regcli.resample import upsample_field

        g = upsample_field(self.global_.data, self.global_.grid, self.local.grid)
        g = F.normalize(g, dim=0)  # interpolation shortens unit vectors
        loc = self.local.data if local is None else local
        w = float(global_weight)
        both = torch.cat((g * w, loc), 0) / (1.0 + w * w) ** 0.5
        return Image(both.contiguous(), self.local.grid, self.local.name)


def embed(image: Image, net: EmbeddingNet, device=None) -> Embedding:
    """Embed a scalar image (already on an isotropic grid of ``net.cfg.spacing_mm``; any direction).

    Returns the global and local embeddings as images on ``image.grid.subsampled(8)`` and
    ``image.grid.subsampled(2)``, float32, on ``device`` (default: the image's device).
    """
    data = image.data
    if data.dim() == 4 and data.shape[0] == 1:
        data = data[0]
    if data.dim() != 3:
        raise ValueError(f"embed needs a scalar 3D image, got shape {tuple(image.data.shape)}")
    dev = torch.device(device) if device is not None else data.device
    x = normalise_intensity(data, net.cfg.percentiles).to(dev)[None, None]
    net = net.to(dev)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        g, loc = net(x)
    net.train(was_training)
    grid = image.grid
    return Embedding(Image(g[0], grid.subsampled(8), image.name), Image(loc[0], grid.subsampled(2), image.name))


# ----------------------------------------------------------------------------------------- weights
ARCHITECTURE = "regcli-sam-embedding"


def save_embedding_model(net: EmbeddingNet, folder, model_card: str, training: Optional[dict] = None,
                         version: str = "0", overwrite: bool = False):
    """Write ``net`` as a Hub-layout model folder (``config.json``, ``model.safetensors``, ``README.md``).

    ``config.json`` holds ``architecture``, ``net`` (the :class:`EmbeddingConfig`), ``preprocessing``,
    ``training`` (the recipe) and ``version``; :func:`regcli.weights.save_model_folder` adds the sha256.
    """
    from regcli.weights import save_network

    return save_network(net, folder, ARCHITECTURE, model_card, training, version, overwrite)


def load_embedding(spec: str, device=None) -> EmbeddingNet:
    """Resolve ``spec`` (folder, ``hub:org/name@commit`` or registry name; see :mod:`regcli.weights`), check
    it, and build the network in eval mode."""
    from regcli.weights import resolve

    return embedding_from(resolve(spec), device)


def embedding_from(model, device=None) -> EmbeddingNet:
    """Build the network (eval mode) from an already resolved and verified
    :class:`regcli.weights.ResolvedModel`; a model of another architecture, or whose tensors do not fit its
    configuration, is a one-line WeightsError."""
    from regcli.weights import build_network

    return build_network(model, ARCHITECTURE, "an anatomical embedding", EmbeddingConfig, EmbeddingNet, device)
