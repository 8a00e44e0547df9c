"""Transform models for instance optimisation, chosen by name (the test-time ``--transform`` swap).

A model is a ``torch.nn.Module`` built as ``MODELS.get(name)(grid, init=None, device=None, **params)``; keyword
parameters it does not use are accepted and ignored (one ``model_params`` dict serves every model). Its
``forward()`` returns the displacement ``u`` (1, 3, Z, Y, X) in world LPS mm on ``grid`` (the grid on
which the similarity is evaluated); the solver samples the moving data at ``x + u(x)``. Fields and parameters
have the model's ``dtype`` (float32 by default; the solver passes its data's dtype, float64 with
``precision: float64``); the linear models keep their parameters in float64 whatever ``dtype``.

Optional hooks: ``param_groups(lr)`` (per-parameter step sizes), ``transform()`` (linear models: the
:class:`~regcli.transforms.AffineTransform` they represent), ``after_step()`` (called by the solver after every
optimizer step; the greedy model composes its update there).

**init** is ``None``, a displacement (3, Z, Y, X) or (1, 3, Z, Y, X) float32 world LPS mm on ``grid`` (or a
:class:`~regcli.transforms.DisplacementField` on ``grid``), or an :class:`~regcli.transforms.AffineTransform`.

* ``freeform``: its parameter *is* the displacement and starts at ``init`` (an affine init is sampled on
  ``grid``).
* every other model treats ``init`` as a *base* field ``b`` (a previous coarser level, ConvexAdam's discrete
  stage; an affine ``init`` is sampled on ``grid``) and composes its own transform ``m`` before it:
  ``u(x) = m(x) + b(x + m(x))``, i.e. a fixed point goes through ``m`` first, then through ``b`` (sampled
  trilinearly by :class:`regcli.resample.FieldWarper`, edge vectors repeated beyond the grid). With zero own
  parameters ``u = b``; with ``b`` and ``m`` diffeomorphic, so is ``u``. The linear models (``rigid``,
  ``affine``) instead *start from* an affine ``init`` (their parameters take its value, no base field).

Registered: ``freeform``, ``svf``, ``greedy``, ``bspline``, ``rigid``, ``affine``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from regcli.errors import GeometryError
from regcli.features.filters import box_filter
from regcli.registry import Registry
from regcli.resample import FieldWarper
from regcli.solvers.diffeo import clamp_norm_vox, compose, exp_velocity, smooth_mm
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


def _is_affine(init) -> bool:
    return init is not None and hasattr(init, "matrix") and hasattr(init, "map_points")


def as_field(init, grid: Grid, device=None, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """An ``init`` (see the module docstring) as a displacement (1, 3, Z, Y, X) ``dtype`` world LPS mm on
    ``grid``, detached, on ``device``; ``None`` stays ``None``.

    Raises:
        GeometryError: a field whose shape or grid is not ``grid``'s.
    """
    if init is None:
        return None
    if _is_affine(init):
        x = grid.world_coords(torch.float64, device)
        disp = (init.map_points(x) - x).permute(3, 0, 1, 2)
    elif hasattr(init, "disp") and hasattr(init, "grid"):
        if not init.grid.allclose(grid):
            raise GeometryError(f"initial displacement field is on {init.grid.describe()}, "
                                f"the model on {grid.describe()}")
        disp = init.disp
    else:
        disp = torch.as_tensor(init)
    if disp.dim() == 4:
        disp = disp[None]
    if tuple(disp.shape) != (1, 3, *grid.shape):
        raise GeometryError(f"initial displacement has shape {tuple(disp.shape)}, expected "
                            f"(1, 3, {', '.join(map(str, grid.shape))}) for {grid.describe()}")
    return disp.detach().to(device=device, dtype=dtype).clone()


class _Composing(nn.Module):
    """A model with an optional base field ``b`` (buffer ``base``, (1, 3, Z, Y, X) float32 mm or None) composed
    after its own transform: ``u(x) = m(x) + b(x + m(x))``."""

    def __init__(self, grid: Grid, base: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("base", base)
        self._warper: Optional[FieldWarper] = None

    def warper(self, device, dtype: torch.dtype = torch.float32) -> FieldWarper:
        """``FieldWarper(grid, grid)`` on ``device`` for fields of ``dtype`` (built once per device and dtype)."""
        w = self._warper
        if w is None or w.base.device != torch.device(device) or w.base.dtype != dtype:
            w = self._warper = FieldWarper(self.grid, self.grid, device, dtype)
        return w

    def with_base(self, own: torch.Tensor) -> torch.Tensor:
        """``own + b(x + own(x))`` for own (1, 3, Z, Y, X) mm; ``own`` itself without a base field."""
        if self.base is None:
            return own
        return compose(own, self.base, self.warper(own.device, own.dtype))


@MODELS.register("freeform")
class FreeformModel(nn.Module):
    """Free-form displacement: one 3-vector (mm) per grid voxel, optionally box-smoothed.

    Args:
        grid: the grid of the parameters (and of the output displacement).
        init: the starting displacement (see the module docstring): (3, Z, Y, X) or (1, 3, Z, Y, X) mm on
            ``grid``, a DisplacementField on ``grid``, or an AffineTransform (sampled on ``grid``).
        smoothing_passes: 3x3x3 box passes applied to the parameters in ``forward`` (ConvexAdam uses 3);
            they also smooth the ``init`` part.
    """

    def __init__(self, grid: Grid, init=None, smoothing_passes: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, **_: object) -> None:
        super().__init__()
        self.grid = grid
        self.smoothing_passes = int(smoothing_passes)
        disp = as_field(init, grid, device, dtype)
        if disp is None:
            disp = torch.zeros((1, 3, *grid.shape), dtype=dtype, device=device)
        self.disp = nn.Parameter(disp)

    def forward(self) -> torch.Tensor:
        """Displacement (1, 3, Z, Y, X) float32, world LPS mm, on ``grid``."""
        return box_smooth(self.disp, self.smoothing_passes)


@MODELS.register("svf")
class SVFModel(_Composing):
    """Stationary velocity field: ``m = exp(v)`` by scaling and squaring (diffeomorphic), then the base field.

    The parameter ``v`` is a velocity (1, 3, Z, Y, X) float32 world LPS mm per unit time on ``grid``, starting
    at zero. ``forward`` box-smooths it (``smoothing_passes``), exponentiates it with ``svf_steps`` squarings
    (:func:`regcli.solvers.diffeo.exp_velocity`) and composes the base field after it.

    Args:
        grid: grid of the velocity and of the output displacement.
        init: base field ``b`` (see the module docstring), or None.
        svf_steps: scaling-and-squaring steps N (``v / 2**N`` is squared N times); 7 keeps each initial step
            under a voxel for velocities up to ~128 voxels.
        smoothing_passes: 3x3x3 box passes on ``v`` before the exponential.
    """

    def __init__(self, grid: Grid, init=None, svf_steps: int = 7, smoothing_passes: int = 0, device=None,
                 dtype: torch.dtype = torch.float32, **_: object) -> None:
        super().__init__(grid, as_field(init, grid, device, dtype))
        self.svf_steps = int(svf_steps)
        self.smoothing_passes = int(smoothing_passes)
        self.vel = nn.Parameter(torch.zeros((1, 3, *grid.shape), dtype=dtype, device=device))

    def velocity(self) -> torch.Tensor:
        """The smoothed velocity (1, 3, Z, Y, X) float32, world LPS mm, on ``grid``."""
        return box_smooth(self.vel, self.smoothing_passes)

    def forward(self) -> torch.Tensor:
        """Displacement (1, 3, Z, Y, X) float32, world LPS mm, on ``grid``: ``exp(v)`` then the base field."""
        own = exp_velocity(self.velocity(), self.warper(self.vel.device, self.vel.dtype), self.svf_steps)
        return self.with_base(own)


@MODELS.register("greedy")
class GreedyModel(_Composing):
    """Greedy compositive diffeomorphic updates (SyN's greedy variant, FireANTs' ``GreedyRegistration``).

    The parameter is an update field ``d`` (1, 3, Z, Y, X) float32 world LPS mm, zero after every step. The
    accumulated field ``u_acc`` (buffer ``base``; ``init`` or zero at the start) is fixed during a step, and

        d_s  = clamp(G_update * d)          (Gaussian of ``greedy_update_sigma_mm``, then length clamp)
        u(x) = d_s(x) + u_acc(x + d_s(x))   (``forward``: the update composed before the accumulated field)

    ``after_step()`` (called by the solver after each optimizer step) sets ``u_acc <- G_total * u`` (detached;
    Gaussian of ``greedy_total_sigma_mm``, 0 = none) and zeroes ``d`` in place: the Parameter object is kept,
    so the optimizer's state (Adam's moments) carries over to the next update, as in FireANTs.

    **Invertibility of each update.** ``d_s`` is rescaled as a whole so that its longest vector is at most
    ``greedy_max_step_vox`` voxels (a differentiable scaling; no change below the bound). A Gaussian-smoothed
    field whose vectors are at most ``a`` voxels long varies over about ``sigma`` voxels, so its derivatives
    are of order ``a / sigma``: with the defaults (0.5 voxel, 2 mm) ``id + d_s`` stays close to the identity
    and invertible, and composing invertible maps keeps ``u`` diffeomorphic step after step (up to trilinear
    resampling; measured: min det J 0.12 after 60 Adam steps of 5 mm on a 0.9x0.9x3 mm oblique grid).

    Args:
        grid: grid of the fields.
        init: the initial accumulated field (see the module docstring), or None.
        greedy_update_sigma_mm: Gaussian sigma (mm, isotropic in world space) of each update (0 = none).
        greedy_total_sigma_mm: Gaussian sigma (mm) applied to the accumulated field after each step (0 = none).
        greedy_max_step_vox: longest update vector, in voxels (0 = no clamp).
    """

    def __init__(self, grid: Grid, init=None, greedy_update_sigma_mm: float = 2.0, greedy_total_sigma_mm: float = 1.0,
                 greedy_max_step_vox: float = 0.5, device=None, dtype: torch.dtype = torch.float32,
                 **_: object) -> None:
        super().__init__(grid, as_field(init, grid, device, dtype))
        self.update_sigma_mm = float(greedy_update_sigma_mm)
        self.total_sigma_mm = float(greedy_total_sigma_mm)
        self.max_step_vox = float(greedy_max_step_vox)
        self.update = nn.Parameter(torch.zeros((1, 3, *grid.shape), dtype=dtype, device=device))

    def step_field(self) -> torch.Tensor:
        """The smoothed, clamped update ``d_s`` (1, 3, Z, Y, X) float32, world LPS mm, on ``grid``."""
        d = smooth_mm(self.update, self.grid, self.update_sigma_mm)
        return clamp_norm_vox(d, self.grid, self.max_step_vox)

    def forward(self) -> torch.Tensor:
        """Displacement (1, 3, Z, Y, X) float32, world LPS mm: the update, then the accumulated field."""
        return self.with_base(self.step_field())

    @torch.no_grad()
    def after_step(self) -> None:
        """Fold the current update into the accumulated field and reset the update to zero (in place)."""
        u = smooth_mm(self.forward(), self.grid, self.total_sigma_mm)
        self.base = u.detach().clone()
        self.update.zero_()


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline basis ``beta3(t)`` (support ``|t| < 2``, partition of unity), float64."""
    a = np.abs(np.asarray(t, dtype=np.float64))
    out = np.where(a < 1.0, 2.0 / 3.0 - a ** 2 + 0.5 * a ** 3, 0.0)
    return np.where((a >= 1.0) & (a < 2.0), (2.0 - a) ** 3 / 6.0, out)


def bspline_axis(n: int, spacing: float, control_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Control points and basis matrix of a cubic B-spline along one index axis.

    ``M = ceil((n - 1) * spacing / control_mm)`` knot intervals (at least 1) of exactly ``control_mm`` mm
    cover the voxel centres ``0 .. n-1``, centred on them; there are ``M + 3`` control points, one knot
    interval beyond each end (ITK's layout), so every voxel has its four supporting control points.

    Returns:
        (K,) float64 continuous voxel index of each control point along the axis, and the (n, K) float64
        basis ``W[i, j] = beta3((i - c_j) * spacing / control_mm)`` (each row sums to 1).
    """
    length = (n - 1) * float(spacing)
    m = max(1, int(math.ceil(length / control_mm - 1e-9)))
    start = 0.5 * (length - m * control_mm)  # mm position of knot 0 (control point 1), <= 0
    ctrl_mm = start + (np.arange(m + 3) - 1.0) * control_mm
    ctrl_index = ctrl_mm / float(spacing)
    voxel_mm = np.arange(n, dtype=np.float64) * float(spacing)
    W = cubic_bspline((voxel_mm[:, None] - ctrl_mm[None, :]) / control_mm)
    return ctrl_index, W


@MODELS.register("bspline")
class BSplineModel(_Composing):
    """Cubic B-spline free-form deformation (Rueckert et al.), then the base field.

    Control points lie on a lattice of ``bspline_spacing_mm`` mm along each index axis of ``grid`` (so an
    anisotropic grid gets different control counts per axis), one knot interval beyond the grid on each side
    (:func:`bspline_axis`). The parameter ``coef`` (1, 3, Kz, Ky, Kx) float32 holds the displacement at the
    control points' knots, components (x, y, z) world LPS mm whatever the direction matrix; the dense field is
    ``m[z, y, x] = sum_abc Wz[z, a] Wy[y, b] Wx[x, c] coef[a, b, c]``, evaluated as three matrix products with
    exact cubic B-spline weights (no interpolation). Cubic B-splines reproduce linear functions, so control
    values sampled from an affine displacement give that displacement exactly inside the grid.

    Args:
        grid: grid of the output displacement.
        init: base field ``b`` (see the module docstring), or None.
        bspline_spacing_mm: control-point spacing in mm (along every index axis).
    """

    def __init__(self, grid: Grid, init=None, bspline_spacing_mm: float = 8.0, device=None,
                 dtype: torch.dtype = torch.float32, **_: object) -> None:
        super().__init__(grid, as_field(init, grid, device, dtype))
        if not bspline_spacing_mm > 0:
            raise ValueError(f"bspline_spacing_mm must be > 0, got {bspline_spacing_mm}")
        self.control_spacing_mm = float(bspline_spacing_mm)
        axes = [bspline_axis(n, s, self.control_spacing_mm) for n, s in zip(grid.size, grid.spacing)]
        self.control_index = [c for c, _ in axes]  # per index axis (x, y, z): (K,) continuous voxel index
        for name, (_, W) in zip(("Wx", "Wy", "Wz"), axes):
            self.register_buffer(name, torch.as_tensor(W, dtype=dtype, device=device))
        shape = (len(axes[2][0]), len(axes[1][0]), len(axes[0][0]))  # (Kz, Ky, Kx)
        self.coef = nn.Parameter(torch.zeros((1, 3, *shape), dtype=dtype, device=device))

    @property
    def control_shape(self) -> tuple[int, int, int]:
        """Control lattice shape (Kz, Ky, Kx)."""
        return tuple(self.coef.shape[2:])

    def control_points_world(self) -> torch.Tensor:
        """World LPS mm (Kz, Ky, Kx, 3) float64 of the control points (components x, y, z)."""
        cx, cy, cz = (torch.as_tensor(c, dtype=torch.float64) for c in self.control_index)
        z, y, x = torch.meshgrid(cz, cy, cx, indexing="ij")
        return self.grid.index_to_world_points(torch.stack((x, y, z), dim=-1))

    def own(self) -> torch.Tensor:
        """The B-spline displacement ``m`` (1, 3, Z, Y, X) float32, world LPS mm, on ``grid``."""
        c = self.coef
        kz, ky, _ = self.control_shape
        Z, Y, X = self.grid.shape
        t = torch.matmul(c, self.Wx.T)  # (1, 3, Kz, Ky, X)
        t = torch.matmul(self.Wy, t)  # (1, 3, Kz, Y, X)
        t = torch.matmul(self.Wz, t.reshape(3, kz, Y * X))  # (3, Z, Y*X)
        return t.reshape(1, 3, Z, Y, X)

    def forward(self) -> torch.Tensor:
        """Displacement (1, 3, Z, Y, X) float32, world LPS mm, on ``grid``: the B-spline, then the base field."""
        return self.with_base(self.own())


# ---------------------------------------------------------------------------------------------------
# Linear (rigid / affine) models, parametrised about a centre in world mm.
# ---------------------------------------------------------------------------------------------------


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


class _LinearModel(_Composing):
    """Shared parts of the rigid and affine models.

    The mapping of a fixed world point ``x`` (LPS mm) to the moving world point is
    ``p(x) = L (x - c) + c + t`` with ``c`` the centre (world mm), ``L`` the 3x3 linear part and ``t`` the
    translation in mm; ``forward()`` returns the displacement ``m(x) = p(x) - x`` on ``grid``, followed by the
    base field ``b`` when ``init`` is a displacement: ``u(x) = m(x) + b(x + m(x))``.

    Args:
        grid: grid on which the displacement is returned (the fixed level grid).
        init: optional :class:`~regcli.transforms.AffineTransform` (fixed -> moving world) to start from, or a
            base displacement field (see the module docstring; the linear part then starts at the identity).
            :meth:`transform` is the linear part only, without the base field.
        center: rotation/scaling centre in world mm (default: the grid centre).
        radius_mm: characteristic size of the object in mm; a rotation/linear step ``lr`` moves points at
            this radius by about as much as a translation step of ``lr * radius_mm`` mm (default: a
            quarter of the grid's diagonal).
        lr_mm: read ``lr`` in :meth:`param_groups` as a step in mm, as the deformable models do (translation
            ``lr`` mm, rotation/linear ``lr / radius_mm``), so one learning rate serves every model of the IO
            stage (:func:`regcli.solvers.instance.solver_from_config` sets it). Default: the affine stage's units.
    """

    def __init__(self, grid: Grid, init=None, center=None, radius_mm: Optional[float] = None,
                 device=None, lr_mm: bool = False, dtype: torch.dtype = torch.float32, **_: object) -> None:
        super().__init__(grid, None if init is None or _is_affine(init) else as_field(init, grid, device, dtype))
        self.dtype = dtype  # of the displacement forward() returns (the linear part is float64 anyway)
        c = np.asarray(grid.center_world() if center is None else center, dtype=np.float64).reshape(3)
        if not _is_affine(init):
            A0 = np.eye(3)
            t0 = np.zeros(3)
        else:
            M = np.asarray(init.matrix, dtype=np.float64)
            A0 = M[:3, :3]
            t0 = A0 @ c + M[:3, 3] - c  # p = A0 (x - c) + c + t0
        if radius_mm is None:
            radius_mm = 0.25 * float(np.linalg.norm(grid.extent_mm))
        self.radius_mm = float(radius_mm)
        self.lr_mm = bool(lr_mm)
        self.register_buffer("center", torch.as_tensor(c, dtype=torch.float64, device=device))
        self.register_buffer("A0", torch.as_tensor(A0, dtype=torch.float64, device=device))
        # (3, Z*Y*X) float64 world positions relative to the centre, mm
        coords = grid.world_coords(torch.float64, device) - self.center
        self.register_buffer("coords_t", coords.reshape(-1, 3).T.contiguous())
        self.translation = nn.Parameter(torch.as_tensor(t0, dtype=torch.float64, device=device).clone())

    def linear(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _groups(self, linear_param: nn.Parameter, lr: float) -> list[dict]:
        """Adam groups: linear/rotation ``lr`` per step and translation ``lr * radius_mm`` mm per step, or with
        ``lr_mm`` translation ``lr`` mm and linear/rotation ``lr / radius_mm``."""
        base = lr / self.radius_mm if self.lr_mm else lr
        return [{"params": [linear_param], "lr": base}, {"params": [self.translation], "lr": base * self.radius_mm}]

    def forward(self) -> torch.Tensor:
        """Displacement ``(1, 3, Z, Y, X)`` of the model's ``dtype``, world LPS mm, on ``grid`` (the linear part
        computed in float64), followed by the base field if there is one."""
        L = self.linear()
        eye = torch.eye(3, dtype=L.dtype, device=L.device)
        # (3, V) = (L - I) (x - c) + t, as one flat (3, 3) @ (3, V) product (fast on CPU)
        disp = (L - eye) @ self.coords_t + self.translation[:, None]
        return self.with_base(disp.to(self.dtype).reshape(1, 3, *self.grid.shape))

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
                 device=None, lr_mm: bool = False, **kw: object) -> None:
        super().__init__(grid, init, center, radius_mm, device, lr_mm, **kw)
        self.rotation = nn.Parameter(torch.zeros(3, dtype=torch.float64, device=device))

    def linear(self) -> torch.Tensor:
        return rotation_matrix(self.rotation) @ self.A0

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: rotation ``lr`` radians/step, translation ``lr * radius_mm`` mm/step (see ``lr_mm``)."""
        return self._groups(self.rotation, lr)


@MODELS.register("affine")
class AffineModel(_LinearModel):
    """Affine model: a free 3x3 linear part (unitless, starts at ``init``'s or the identity) and a
    translation in mm, about ``center``. See :class:`_LinearModel`."""

    def __init__(self, grid: Grid, init=None, center=None, radius_mm: Optional[float] = None,
                 device=None, lr_mm: bool = False, **kw: object) -> None:
        super().__init__(grid, init, center, radius_mm, device, lr_mm, **kw)
        self.linear_part = nn.Parameter(self.A0.clone())

    def linear(self) -> torch.Tensor:
        return self.linear_part

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: linear entries ``lr``/step (unitless), translation ``lr * radius_mm`` mm/step (see
        ``lr_mm``)."""
        return self._groups(self.linear_part, lr)
