"""Transform models for instance optimisation, chosen by name.

A model is a ``torch.nn.Module`` built as ``MODELS.get(name)(grid, init=None, **params)`` whose
``forward()`` returns the displacement ``(1, 3, Z, Y, X)`` float32 in world LPS mm on ``grid`` (the grid
on which the similarity is evaluated). Models may define ``param_groups(lr)`` to give Adam per-parameter
step sizes, and ``transform()`` to export what they represent (e.g. an :class:`AffineTransform`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from regcli.features.filters import box_filter
from regcli.registry import Registry
from regcli.spaces.grid import Grid

MODELS: Registry[type] = Registry("transform model")


class _BoxSmooth(torch.autograd.Function):
    """``passes`` 3x3x3 box filters with edge replication, differentiated without recording the graph.

    A radius-1 box filter with edge replication is a symmetric matrix along each axis (the edge voxel
    weighs itself 2/3 and its neighbour 1/3 both ways), and the per-axis filters commute, so the whole
    smoothing is self-adjoint: its backward is the same smoothing of the incoming gradient.
    """

    @staticmethod
    def forward(ctx, disp: torch.Tensor, passes: int) -> torch.Tensor:
        ctx.passes = passes
        for _ in range(passes):
            disp = box_filter(disp, 1)
        return disp

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        for _ in range(ctx.passes):
            grad = box_filter(grad, 1)
        return grad, None


def box_smooth(disp: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` 3x3x3 box filters (replicate padding), i.e. a B-spline-like smoothing of (N,3,Z,Y,X).

    Computed separably as sums of shifted slices, with a hand-written (self-adjoint) backward: about 4x
    faster than ``avg_pool3d`` forward+backward on CPU, and 2x faster than autograd through the slices.
    """
    if passes <= 0:
        return disp
    return _BoxSmooth.apply(disp, int(passes))


@MODELS.register("displacement")
class DisplacementModel(nn.Module):
    """Free-form displacement: one 3-vector (mm) per grid voxel, optionally box-smoothed.

    Args:
        grid: the grid of the parameters (and of the output displacement).
        init: optional (3, Z, Y, X) or (1, 3, Z, Y, X) initial displacement in mm.
        smoothing_passes: 3x3x3 box passes applied to the parameters in ``forward`` (ConvexAdam uses 3).
    """

    def __init__(self, grid: Grid, init: Optional[torch.Tensor] = None, smoothing_passes: int = 0,
                 device=None, **_: object) -> None:
        super().__init__()
        self.grid = grid
        self.smoothing_passes = int(smoothing_passes)
        if init is None:
            init = torch.zeros((1, 3, *grid.shape), dtype=torch.float32, device=device)
        elif init.dim() == 4:
            init = init[None]
        self.disp = nn.Parameter(init.detach().clone().to(torch.float32))

    def forward(self) -> torch.Tensor:
        return box_smooth(self.disp, self.smoothing_passes)


# ---------------------------------------------------------------------------------------------------
# Linear (rigid / affine) models, parametrised about a centre in world mm.
# ---------------------------------------------------------------------------------------------------
import numpy as np  # noqa: E402


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(3, 3) cross-product matrix of a 3-vector."""
    z = v.new_zeros(())
    return torch.stack((torch.stack((z, -v[2], v[1])), torch.stack((v[2], z, -v[0])),
                        torch.stack((-v[1], v[0], z))))


def rotation_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrix (3, 3) of a rotation vector (axis * angle in radians), via the exponential map.

    ``torch.linalg.matrix_exp`` of the skew matrix: exact, orthonormal, and differentiable everywhere
    (including at zero, where the axis-angle form is singular).
    """
    return torch.linalg.matrix_exp(_skew(rotvec))


def rotation_vector(R: np.ndarray) -> np.ndarray:
    """Rotation vector (3,) float64 of a rotation matrix (the matrix logarithm), angle in [0, pi]."""
    R = np.asarray(R, dtype=np.float64)
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if angle < 1e-8:
        return 0.5 * w
    if np.pi - angle < 1e-6:  # near pi: axis from the symmetric part
        S = (R + np.eye(3)) / 2.0
        axis = np.sqrt(np.clip(np.diag(S), 0.0, None))
        k = int(np.argmax(axis))
        axis = S[:, k] / max(axis[k], 1e-12)
        return angle * axis / np.linalg.norm(axis)
    return angle / (2.0 * np.sin(angle)) * w


class _LinearModel(nn.Module):
    """Shared parts of the rigid and affine models.

    The mapping of a fixed world point ``x`` (LPS mm) to the moving world point is
    ``p(x) = L (x - c) + c + t`` with ``c`` the centre (world mm), ``L`` the 3x3 linear part and ``t`` the
    translation in mm; ``forward()`` returns the displacement ``p(x) - x`` on ``grid``.

    Args:
        grid: grid on which the displacement is returned (the fixed level grid).
        init: optional :class:`~regcli.transforms.AffineTransform` (fixed -> moving world) to start from.
        center: rotation/scaling centre in world mm (default: the grid centre).
        radius_mm: characteristic size of the object in mm; a rotation/linear step ``lr`` moves points at
            this radius by about as much as a translation step of ``lr * radius_mm`` mm (default: a
            quarter of the grid's diagonal).
    """

    def __init__(self, grid: Grid, init=None, center=None, radius_mm: Optional[float] = None,
                 device=None, **_: object) -> None:
        super().__init__()
        self.grid = grid
        c = np.asarray(grid.center_world() if center is None else center, dtype=np.float64).reshape(3)
        if init is None:
            A0 = np.eye(3)
            t0 = np.zeros(3)
        else:
            M = np.asarray(init.matrix, dtype=np.float64)
            A0 = M[:3, :3]
            t0 = A0 @ c + M[:3, 3] - c  # p = A0 (x - c) + c + t0
        if radius_mm is None:
            radius_mm = 0.25 * float(np.linalg.norm(grid.extent_mm))
        self.radius_mm = float(radius_mm)
        self.register_buffer("center", torch.as_tensor(c, dtype=torch.float64, device=device))
        self.register_buffer("A0", torch.as_tensor(A0, dtype=torch.float64, device=device))
        # (3, Z*Y*X) float64 world positions relative to the centre, mm
        coords = grid.world_coords(torch.float64, device) - self.center
        self.register_buffer("coords_t", coords.reshape(-1, 3).T.contiguous())
        self.translation = nn.Parameter(torch.as_tensor(t0, dtype=torch.float64, device=device).clone())

    def linear(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """Displacement ``(1, 3, Z, Y, X)`` float32, world LPS mm, on ``grid`` (computed in float64)."""
        L = self.linear()
        eye = torch.eye(3, dtype=L.dtype, device=L.device)
        # (3, V) = (L - I) (x - c) + t, as one flat (3, 3) @ (3, V) product (fast on CPU)
        disp = (L - eye) @ self.coords_t + self.translation[:, None]
        return disp.to(torch.float32).reshape(1, 3, *self.grid.shape)

    def matrix(self) -> np.ndarray:
        """(4, 4) float64 homogeneous matrix of the current fixed -> moving world mapping."""
        with torch.no_grad():
            L = self.linear().detach().cpu().numpy().astype(np.float64)
            t = self.translation.detach().cpu().numpy().astype(np.float64)
        c = self.center.cpu().numpy()
        M = np.eye(4)
        M[:3, :3] = L
        M[:3, 3] = t + c - L @ c
        return M

    def transform(self):
        """The current mapping as an :class:`~regcli.transforms.AffineTransform` (fixed -> moving world)."""
        from regcli.transforms.affine import AffineTransform

        return AffineTransform(self.matrix(), self.center.cpu().numpy())


@MODELS.register("rigid")
class RigidModel(_LinearModel):
    """Rigid model: ``L = R(w) A0`` with ``w`` a rotation vector (radians, exponential map) and ``A0`` the
    initial linear part (identity, or that of ``init``), plus a translation in mm. See :class:`_LinearModel`.
    """

    def __init__(self, grid: Grid, init=None, center=None, radius_mm: Optional[float] = None,
                 device=None, **kw: object) -> None:
        super().__init__(grid, init, center, radius_mm, device, **kw)
        self.rotation = nn.Parameter(torch.zeros(3, dtype=torch.float64, device=device))

    def linear(self) -> torch.Tensor:
        return rotation_matrix(self.rotation) @ self.A0

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: rotation ``lr`` radians/step, translation ``lr * radius_mm`` mm/step."""
        return [{"params": [self.rotation], "lr": lr},
                {"params": [self.translation], "lr": lr * self.radius_mm}]


@MODELS.register("affine")
class AffineModel(_LinearModel):
    """Affine model: a free 3x3 linear part (unitless, starts at ``init``'s or the identity) and a
    translation in mm, about ``center``. See :class:`_LinearModel`."""

    def __init__(self, grid: Grid, init=None, center=None, radius_mm: Optional[float] = None,
                 device=None, **kw: object) -> None:
        super().__init__(grid, init, center, radius_mm, device, **kw)
        self.linear_part = nn.Parameter(self.A0.clone())

    def linear(self) -> torch.Tensor:
        return self.linear_part

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: linear entries ``lr``/step (unitless), translation ``lr * radius_mm`` mm/step."""
        return [{"params": [self.linear_part], "lr": lr},
                {"params": [self.translation], "lr": lr * self.radius_mm}]
