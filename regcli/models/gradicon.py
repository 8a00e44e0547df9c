"""Multi-step GradICON registration network, compatible with the uniGradICON checkpoint.

Architecture (Tian et al., "uniGradICON", MICCAI 2024; GradICON, CVPR 2023), written from the published
description. Four U-Nets predict displacement fields and are chained coarse to fine:

* step 1 at 1/4 of the input grid (both images average-pooled twice, ``ceil_mode``),
* step 2 at 1/2, on the moving image warped by step 1,
* step 3 at the full input grid, on the moving image warped by steps 1-2,
* step 4 at the full input grid again (uniGradICON's "last step"; ``GradICONConfig.last_step``).

Each step's map is composed with the maps before it: ``phi(x) = phi_before(psi(x))``, where
``psi(x) = x + d(x)`` with ``d`` the step's U-Net output, linearly interpolated.

**Coordinates.** Maps act on *normalised voxel coordinates*: voxel ``i`` of an axis with ``n`` voxels is at
``i / (n - 1)``, so every resolution of the pyramid shares the frame [0, 1] (``align_corners=True``
interpolation, edge values repeated outside). The channel order of a map is the array order of the
image tensor (Z, Y, X for regcli's images): channel ``k`` is the coordinate along tensor axis ``k + 2``.
A map ``phi_AB`` from ``forward(A, B)`` is sampled on B's grid and points into A: ``A(phi_AB(x)) ~ B(x)``
(A is the moving image, B the fixed image).

**U-Net** (``tallUNet2`` of the reference implementation): five stride-2 3x3x3 convolutions down, five 4x4x4
stride-2 transposed convolutions up, each with a residual path (average pool on the way down, trilinear
upsampling on the way up, zero-padded or cut to the channel count), batch normalisation after each up step,
skip connections, a zero-initialised last 3x3x3 convolution, output divided by 10 (so an untrained
network is the identity map). Channels (16, 32, 64, 256, 512) down and (16, 32, 64, 128, 256) up.

**Parameter names** are those of the official checkpoint, so a state_dict converts one to one
(:data:`OFFICIAL_PREFIXES`): 188 tensors, 70,680,916 parameters at the default widths.

The network input grid (175^3 for uniGradICON) is where the images are resized to; the conversion between
this grid and physical space lives in :mod:`regcli.methods.foundation`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from regcli.config import ConfigModel
from regcli.resample import sample_norm

Map = Callable[..., torch.Tensor]  # (coords (B, 3, ...), identity=False) -> coords

#: state_dict prefixes of the four U-Nets, coarse to fine, in the official layout (with ``last_step``)
OFFICIAL_PREFIXES = ("netPhi.netPhi.net.netPhi.net.net.", "netPhi.netPhi.net.netPsi.net.", "netPhi.netPsi.net.",
                     "netPsi.net.")
OFFICIAL_TENSORS = 188
OFFICIAL_PARAMETERS = 70_680_916


class GradICONConfig(ConfigModel):
    """Architecture of a :class:`GradICONNet` and its training objective (stored in ``config.json``)."""

    architecture: str = "gradicon-multistep"
    input_shape: tuple[int, int, int] = Field((175, 175, 175), description="network grid the images are "
                                              "resized to (tensor order)")
    down_channels: tuple[int, ...] = Field((16, 32, 64, 256, 512), description="U-Net encoder channels")
    up_channels: tuple[int, ...] = Field((16, 32, 64, 128, 256), description="U-Net decoder channels")
    input_channels: int = Field(1, ge=1, description="channels per image (the U-Net sees both images)")
    last_step: bool = Field(True, description="a fourth U-Net at the full grid (uniGradICON); False: GradICON's "
                            "three steps")
    lmbda: float = Field(1.5, ge=0, description="weight of the gradient inverse-consistency term")
    lncc_sigma: float = Field(5.0, gt=0, description="Gaussian sigma (network voxels) of the LNCC similarity")

    @model_validator(mode="after")
    def _check(self) -> "GradICONConfig":
        if len(self.down_channels) != len(self.up_channels) or not self.down_channels:
            raise ValueError("down_channels and up_channels must have the same, non-zero length")
        if any(c < 1 for c in (*self.down_channels, *self.up_channels)):
            raise ValueError("channel counts must be positive")
        small = min_input_size(len(self.down_channels))
        if any(n < small for n in self.input_shape):
            raise ValueError(f"input_shape must be at least {small} voxels per axis for {len(self.down_channels)} "
                             f"U-Net levels (the coarsest step runs at 1/4 of it), got {self.input_shape}")
        return self

    @property
    def levels(self) -> int:
        return len(self.down_channels)


def min_input_size(levels: int) -> int:
    """Smallest network grid per axis whose coarsest step (1/4 of it) still has 2 voxels before its U-Net's
    deepest stride-2 convolution (the reference implementation fails below that)."""
    n = 2
    while True:
        m = -(-(-(-n // 2)) // 2)  # the 1/4 grid of the pyramid, ceil twice
        for _ in range(levels - 1):
            m = -(-m // 2)
        if m >= 2:
            return n
        n += 1


# ------------------------------------------------------------------------------------------ coordinates
def identity_map(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 3, *shape) normalised coordinates of the voxels of a grid of ``shape`` (tensor order)."""
    axes = [torch.linspace(0.0, 1.0, n, device=device, dtype=dtype) if n > 1
            else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def sample(data: torch.Tensor, coords: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``data`` (B, C, *S) at normalised coordinates ``coords`` (B or 1, 3, *T) -> (B, C, *T); trilinear,
    ``align_corners=True``; outside the grid the edge value (``padding="border"``) or 0 (``"zeros"``)."""
    g = (coords * 2 - 1).flip(1).movedim(1, -1)
    if g.shape[0] != data.shape[0]:
        g = g.expand(data.shape[0], *g.shape[1:])
    return sample_norm(data, g, "bilinear", padding)


def _channels_to(x: torch.Tensor, c: int) -> torch.Tensor:
    """The first ``c`` channels of ``x``, zero channels prepended when it has fewer."""
    y = x[:, :c]
    return F.pad(y, (0, 0, 0, 0, 0, 0, c - y.shape[1], 0)) if y.shape[1] < c else y


# ------------------------------------------------------------------------------------------ U-Net
class UNet(nn.Module):
    """Residual 3D U-Net that maps two images (B, C, *S) each to a displacement (B, 3, *S) in [0, 1] units."""

    def __init__(self, down: tuple[int, ...], up: tuple[int, ...], input_channels: int = 1) -> None:
        super().__init__()
        d = (2 * input_channels, *down)
        up_in = [d[k + 1] + (up[k + 1] if k + 1 < len(up) else 0) for k in range(len(up))]
        self.downConvs = nn.ModuleList(nn.Conv3d(d[k], d[k + 1], 3, stride=2, padding=1) for k in range(len(up)))
        self.upConvs = nn.ModuleList(nn.ConvTranspose3d(up_in[k], up[k], 4, stride=2, padding=1)
                                     for k in range(len(up)))
        self.batchNorms = nn.ModuleList(nn.BatchNorm3d(up[k]) for k in range(len(up)))
        self.lastConv = nn.Conv3d(d[0] + up[0], 3, 3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat((a, b), 1)
        skips = []
        for conv in self.downConvs:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            x = y + _channels_to(F.avg_pool3d(x, 2, ceil_mode=True), y.shape[1])
        for k in reversed(range(len(self.upConvs))):
            y = self.upConvs[k](F.leaky_relu(x))
            x = y + F.interpolate(_channels_to(x, y.shape[1]), scale_factor=2, mode="trilinear", align_corners=False)
            x = self.batchNorms[k](x)
            s = skips[k].shape
            x = torch.cat((x[:, :, :s[2], :s[3], :s[4]], skips[k]), 1)
        return self.lastConv(x) / 10


# ------------------------------------------------------------------------------------------ steps
class VectorFieldStep(nn.Module):
    """One U-Net step: ``psi(x) = x + d(x)`` with ``d`` the U-Net's displacement on the step's grid."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Map:
        d = self.net(a, b)

        def psi(x: torch.Tensor, identity: bool = False) -> torch.Tensor:
            # on the step's own voxels the interpolation is exact: add the displacement directly
            if identity and x.shape[2:] == d.shape[2:]:
                return x + d
            return x + sample(d, x)

        return psi


class Downsampled(nn.Module):
    """Runs the wrapped steps on both images average-pooled by 2 (``ceil_mode``); maps keep the [0, 1] frame."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Map:
        return self.net(F.avg_pool3d(a, 2, ceil_mode=True), F.avg_pool3d(b, 2, ceil_mode=True))


class TwoStep(nn.Module):
    """``netPhi`` registers the pair, ``netPsi`` the moving image warped by it; the maps compose."""

    def __init__(self, netPhi: nn.Module, netPsi: nn.Module) -> None:
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Map:
        phi = self.netPhi(a, b)
        ident = identity_map(a.shape[2:], a.device, a.dtype)
        psi = self.netPsi(sample(a, phi(ident, identity=True)), b)

        def composed(x: torch.Tensor, identity: bool = False) -> torch.Tensor:
            return phi(psi(x, identity))

        return composed


class GradICONNet(TwoStep):
    """The multi-step network; its ``state_dict`` has the official checkpoint's names (see module docstring).

    ``forward(a, b)`` returns the map ``phi_AB`` as a function; :meth:`displacement` evaluates it on the
    network grid.
    """

    def __init__(self, cfg: Optional[GradICONConfig] = None) -> None:
        cfg = cfg or GradICONConfig()

        def unet() -> VectorFieldStep:
            return VectorFieldStep(UNet(cfg.down_channels, cfg.up_channels, cfg.input_channels))

        inner: nn.Module = unet()
        for _ in range(2):
            inner = TwoStep(Downsampled(inner), unet())
        if cfg.last_step:
            super().__init__(inner, unet())
        else:
            super().__init__(inner.netPhi, inner.netPsi)
        self.cfg = cfg

    def displacement(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``phi_AB - identity`` on B's voxels: (B, 3, *input_shape) in [0, 1] units (tensor axis order)."""
        if tuple(a.shape[2:]) != tuple(self.cfg.input_shape) or a.shape != b.shape:
            raise ValueError(f"GradICONNet expects two images of shape {tuple(self.cfg.input_shape)}, got "
                             f"{tuple(a.shape[2:])} and {tuple(b.shape[2:])}")
        ident = identity_map(a.shape[2:], a.device, a.dtype)
        return self(a, b)(ident, identity=True) - ident


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------------------------ objective
def _blur_matrix(n: int, sigma: float, device, dtype) -> torch.Tensor:
    """(n, n) banded matrix of a 'same', zero-padded convolution with a Gaussian of ``sigma`` voxels and
    ``4 sigma + 1`` taps (GradICON's window), normalised to sum 1 over the taps."""
    size = int(4 * sigma + 1)
    t = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    i = torch.arange(n)
    off = i[None, :] - i[:, None] + (size - 1) // 2  # tap index of input i (row) for output j (column)
    inside = (off >= 0) & (off < size)
    return torch.where(inside, k[off.clamp(0, size - 1)], 0.0).to(device=device, dtype=dtype)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, Z, Y, X) data: one banded matrix product per axis (on CPU an order
    of magnitude faster than a 21-tap ``conv3d``; the same values)."""
    for dim in (2, 3, 4):
        m = _blur_matrix(x.shape[dim], sigma, x.device, x.dtype)
        x = torch.movedim(torch.movedim(x, dim, -1) @ m, -1, dim)
    return x


def lncc_loss(i: torch.Tensor, j: torch.Tensor, sigma: float, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean LNCC`` with Gaussian windows of ``sigma`` voxels (GradICON's similarity)."""
    mi, mj = _gaussian_blur(i, sigma), _gaussian_blur(j, sigma)
    cov = _gaussian_blur(i * j, sigma) - mi * mj
    vi = torch.relu(_gaussian_blur(i * i, sigma) - mi ** 2) + eps
    vj = torch.relu(_gaussian_blur(j * j, sigma) - mj ** 2) + eps
    return 1 - (cov / torch.sqrt(vi * vj)).mean()


def gradicon_loss(net: GradICONNet, a: torch.Tensor, b: torch.Tensor, lmbda: Optional[float] = None,
                  sigma: Optional[float] = None, generator: Optional[torch.Generator] = None,
                  delta: float = 1e-3) -> dict[str, torch.Tensor]:
    """The GradICON objective of a pair (a moving, b fixed), as uniGradICON trains and instance-optimises:

    ``all = (1 - LNCC(a o phi_AB, b)) + (1 - LNCC(b o phi_BA, a)) + lmbda * sum_d mean(|d/dd (x - phi_AB(phi_BA(x)))|^2)``

    The warped images are sampled with zero padding. The inverse-consistency term is evaluated at every
    other voxel of the grid, each point jittered by Gaussian noise of 2/N (N the last axis' size), and its
    derivative along each axis by a finite difference of ``delta``. Returns ``all``, ``similarity``,
    ``inverse_consistency`` and ``folds`` (voxels of phi_BA with a negative Jacobian determinant).
    """
    lmbda = net.cfg.lmbda if lmbda is None else lmbda
    sigma = net.cfg.lncc_sigma if sigma is None else sigma
    shape = tuple(a.shape[2:])
    ident = identity_map(shape, a.device, a.dtype)
    phi_ab, phi_ba = net(a, b), net(b, a)
    v_ab, v_ba = phi_ab(ident, identity=True), phi_ba(ident, identity=True)
    similarity = (lncc_loss(sample(a, v_ab, "zeros"), b, sigma) + lncc_loss(sample(b, v_ba, "zeros"), a, sigma))
    noise = torch.randn(ident.shape, generator=generator).to(a.device, a.dtype)
    x = (ident + 2 * noise / shape[-1])[:, :, ::2, ::2, ::2]
    err = x - phi_ab(phi_ba(x))
    ic = a.new_zeros(())
    for k in range(3):
        step = torch.zeros(1, 3, 1, 1, 1, device=a.device, dtype=a.dtype)
        step[0, k] = delta
        err_k = x + step - phi_ab(phi_ba(x + step))
        ic = ic + (((err - err_k) / delta) ** 2).mean()
    with torch.no_grad():
        j = v_ba.detach()
        da, db, dc = (j[:, :, 1:, 1:, 1:] - j[:, :, :-1, 1:, 1:], j[:, :, 1:, 1:, 1:] - j[:, :, 1:, :-1, 1:],
                      j[:, :, 1:, 1:, 1:] - j[:, :, 1:, 1:, :-1])
        folds = ((torch.cross(da, db, dim=1) * dc).sum(1) < 0).sum() / a.shape[0]
    return {"all": lmbda * ic + similarity, "similarity": similarity, "inverse_consistency": ic,
            "folds": folds.to(a.dtype)}


# ------------------------------------------------------------------------------------------ weights
ARCHITECTURE = "gradicon-multistep"
#: how images are prepared for the network (uniGradICON's conventions), recorded in every model's config.json
PREPROCESSING = {
    "ct": "clip to [-1000, 1000] HU, then scale to [0, 1]",
    "mri": "clip to [minimum, 99th percentile], then scale to [0, 1]",
    "resize": "the whole field of view, trilinear (align_corners=False), to net.input_shape",
    "coordinates": "maps in [0, 1] voxel-normalised coordinates, align_corners=True, edge padding",
}
#: official checkpoints regcli can import (same architecture, different training data)
OFFICIAL_MODELS = {
    "unigradicon": "uniGradICON 1.0 (Tian et al., MICCAI 2024), Step_2_final.trch of the unigradicon_weights release",
    "multigradicon": "multiGradICON 1.0 (Demir et al., 2024), Step_2_final.trch of the multigradicon_weights release",
}


def save_gradicon_model(net: GradICONNet, folder, model_card: str, training: Optional[dict] = None,
                        version: str = "0", overwrite: bool = False, source: Optional[dict] = None):
    """Write ``net`` as a Hub-layout model folder (``config.json``, ``model.safetensors``, ``README.md``).

    ``config.json`` holds ``architecture``, ``version``, ``net`` (the :class:`GradICONConfig`),
    ``preprocessing``, ``training`` (the recipe) and, for an imported checkpoint, ``source``. The tensor names
    are the official ones, so the weights file converts back with ``torch.save(dict(...))``.
    """
    from regcli.weights import save_model_folder

    config = {"architecture": ARCHITECTURE, "version": version, "net": net.cfg.model_dump(mode="json"),
              "preprocessing": PREPROCESSING, "training": training or {}}
    if source:
        config["source"] = source
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save_model_folder(folder, state, config, model_card, overwrite=overwrite)


def gradicon_from(model, device=None) -> GradICONNet:
    """The network (eval mode) of a resolved, verified :class:`regcli.weights.ResolvedModel`."""
    from regcli.weights import build_network

    return build_network(model, ARCHITECTURE, "a GradICON network", GradICONConfig, GradICONNet, device)


def load_gradicon(spec: str, device=None) -> GradICONNet:
    """Resolve ``spec`` (folder, ``hub:org/name@commit`` or registry name), verify it, build the network."""
    from regcli.weights import resolve

    return gradicon_from(resolve(spec), device)


def read_official_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state_dict in an official uniGradICON/multiGradICON ``.trch`` file (``torch.save`` of the network's
    state_dict), checked against the architecture: exactly the official tensor names and shapes.

    Read with ``weights_only=True`` (no code in the file is run). A ``regis_net.`` prefix (a state_dict of
    the whole training wrapper) is accepted. Anything else is a one-line InputError (unreadable file) or
    WeightsError (not this architecture).
    """
    from pathlib import Path

    from regcli.errors import InputError, WeightsError, folded

    path = Path(path)
    if not path.is_file():
        raise InputError(f"'{path}': no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure: the file is not a plain checkpoint
        first = folded(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 160)
        raise WeightsError(f"'{path}' is not a plain PyTorch state_dict file (torch.load with weights_only=True: "
                           f"{first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"'{path}' does not hold a state_dict (a mapping of names to tensors)")
    if sd and all(str(k).startswith("regis_net.") for k in sd):
        sd = {str(k)[len("regis_net."):]: v for k, v in sd.items()}
    with torch.device("meta"):  # the official shapes, without allocating or initialising 70 M parameters
        want = {k: tuple(v.shape) for k, v in GradICONNet().state_dict().items()}
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        what = "; ".join(p for p in (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                                     f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "") if p)
        raise WeightsError(f"'{path}' is not a uniGradICON checkpoint: {len(sd)} tensors, {what}; the official "
                           f"layout has {OFFICIAL_TENSORS}")
    bad = [k for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        k = bad[0]
        raise WeightsError(f"'{path}': tensor {k} has shape {tuple(sd[k].shape)}, the architecture needs {want[k]}")
    return {k: sd[k].float() if torch.is_floating_point(sd[k]) else sd[k] for k in want}


def import_official(kind: str, path, folder, overwrite: bool = False) -> dict:
    """Convert an official checkpoint file into a regcli model folder (``regcli weights import``).

    ``kind`` is a key of :data:`OFFICIAL_MODELS`. The tensors are copied unchanged (names included); the
    folder records the source file's name and sha256. Returns a summary for the CLI.
    """
    from pathlib import Path

    from regcli.errors import ConfigError
    from regcli.weights import refuse_existing_model_files, sha256_file

    if kind not in OFFICIAL_MODELS:
        raise ConfigError(f"unknown checkpoint kind '{kind}'; choose one of {', '.join(OFFICIAL_MODELS)}")
    path, folder = Path(path), Path(folder)
    if not overwrite and folder.is_dir():
        refuse_existing_model_files(folder, f"model folder '{folder}'", "use --overwrite")
    state = read_official_checkpoint(path)
    net = GradICONNet()
    net.load_state_dict(state)
    source = {"kind": kind, "file": path.name, "sha256": sha256_file(path), "description": OFFICIAL_MODELS[kind]}
    card = f"""# {kind} (imported)

{OFFICIAL_MODELS[kind]}, converted to regcli's model layout by `regcli weights import {kind} {path.name}`.

- **Source file**: `{path.name}`, sha256 `{source['sha256']}`. The tensors are unchanged (same names: the
  official state_dict layout, {OFFICIAL_TENSORS} tensors, {OFFICIAL_PARAMETERS:,} parameters).
- **Architecture**: four GradICON U-Net steps at 1/4, 1/2, 1 and 1 of a 175^3 grid (regcli.models.gradicon).
- **Input**: each image's whole field of view resized to 175^3; CT clipped to [-1000, 1000] HU, MRI to
  [minimum, 99th percentile], both scaled to [0, 1] (`--modality ct|mri`).
- **Use**: `regcli register fixed.nii.gz moving.nii.gz --method foundation --config <(echo "foundation: {{weights: FOLDER}}")`.
- **Training data and licence**: those of the original release; see its authors' model card and licence.
- **Metrics measured with regcli**: none yet.
"""
    save_gradicon_model(net, folder, card, training={"imported": kind}, version="1.0", overwrite=overwrite,
                        source=source)
    return {"kind": kind, "source": str(path), "source_sha256": source["sha256"], "folder": str(folder),
            "tensors": len(state), "parameters": parameter_count(net),
            "sha256": sha256_file(Path(folder) / "model.safetensors")}
