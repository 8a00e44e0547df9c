"""Physical space: the one module that converts between voxel index, world and ``grid_sample`` coordinates.

Conventions (see docs/conventions.md):

* **World** coordinates are ITK LPS millimetres (``+x`` = Left, ``+y`` = Posterior, ``+z`` = Superior).
* A :class:`Grid` is ``(size, spacing, origin, direction)`` exactly as SimpleITK/ITK defines them:
  ``world = origin + direction @ diag(spacing) @ index`` with ``index = (i, j, k)`` in ``(x, y, z)`` order.
* Tensors are stored in SimpleITK array order ``(Z, Y, X)``; vector components are ``(x, y, z)`` LPS.
* **Normalized** coordinates are those of ``torch.nn.functional.grid_sample`` with ``align_corners=True``:
  voxel centre ``0`` is ``-1`` and voxel centre ``n-1`` is ``+1`` on every axis; the last dimension of a
  sampling grid is ``(x, y, z)``, which is the ITK index order, so no axis is ever reversed.
* Geometry maths is float64 (NumPy); only the final normalized coordinates are cast to float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from regcli.errors import GeometryError

_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))  # LPS: positive world axis letter first

#: ``|D^T D - I|`` up to which a direction's transpose serves as its inverse (:meth:`Grid.world_to_index`), off by at
#: most this times the index (5e-4 voxel at index 512, at the limit): rotations built in float64 (1e-16) and the
#: directions ITK reads from float32 NIfTI headers (about 1e-8, so 5e-6 voxel) keep the numbers they always gave
ORTHONORMAL_EXACT = 1e-6
#: ``|D^T D - I|`` up to which a direction is accepted (beyond: a sheared header, refused); between
#: :data:`ORTHONORMAL_EXACT` and this, index and world are converted with the exact inverse of ``D diag(spacing)``
ORTHONORMAL_TOL = 1e-3


def dominant_axes_of(direction: Any) -> list[tuple[int, float]]:
    """Per spatial index axis of a direction matrix of any dimension: the LPS world axis it mostly points along
    (0, 1, 2) and +1.0 when it points towards that axis's positive side (L, P or S), else -1.0.

    Args:
        direction: (D, D) direction cosines, column k = index axis k in world (LPS), or its D*D values row-major
            (SimpleITK's ``GetDirection()``). Only the spatial block counts: for D > 3 (a time series) the first
            three rows and columns, so a fourth (time) axis gets no entry; for D = 2 the world axes are x and y.
    Returns:
        ``min(D, 3)`` pairs ``(world axis, sign)``, one per index axis in (x, y, z) order.
    """
    d = np.asarray(direction, dtype=np.float64)
    if d.ndim == 1:
        n = math.isqrt(d.size)
        if n * n != d.size:
            raise GeometryError(f"a direction matrix needs D*D values, got {d.size}")
        d = d.reshape(n, n)
    d = d[:3, :3]
    out = []
    for k in range(d.shape[1]):
        a = int(np.argmax(np.abs(d[:, k])))
        out.append((a, 1.0 if d[a, k] > 0 else -1.0))
    return out


def axcodes_of(direction: Any) -> str:
    """Orientation letters of the spatial index axes of a direction matrix of any dimension (see
    :func:`dominant_axes_of`), e.g. ``'LPS'``, ``'RAS'``, ``'LIA'`` in 3D, ``'RA'`` in 2D; each letter names the
    world direction that the index axis *points to* (ITK/DICOM convention spelled as nibabel does)."""
    return "".join(_AXIS_LETTERS[a][0 if sign > 0 else 1] for a, sign in dominant_axes_of(direction))


def _tuple3(values: Sequence[float], cast=float) -> tuple:
    values = tuple(cast(v) for v in values)
    if len(values) != 3:
        raise GeometryError(f"expected 3 values, got {len(values)}: {values}")
    return values


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid in physical space.

    Attributes:
        size: voxels along (x, y, z), ITK order.
        spacing: voxel size in mm along (x, y, z).
        origin: world (LPS mm) position of the centre of voxel (0, 0, 0).
        direction: 3x3 direction cosines, row-major, columns are the index axes in world space.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _tuple3(self.size, int))
        object.__setattr__(self, "spacing", _tuple3(self.spacing))
        object.__setattr__(self, "origin", _tuple3(self.origin))
        d = tuple(float(v) for v in np.asarray(self.direction, dtype=np.float64).ravel())
        if len(d) != 9:
            raise GeometryError(f"direction must have 9 values, got {len(d)}")
        object.__setattr__(self, "direction", d)
        if min(self.size) < 1:
            raise GeometryError(f"grid size must be positive, got {self.size}")
        if min(self.spacing) <= 0 or not all(math.isfinite(s) for s in self.spacing):
            raise GeometryError(f"voxel spacing must be positive and finite, got {self.spacing}")
        if not all(math.isfinite(o) for o in self.origin):
            raise GeometryError(f"origin must be finite, got {self.origin}")
        D = self.direction_matrix
        if not np.all(np.isfinite(D)) or abs(abs(np.linalg.det(D)) - 1.0) > 1e-3:
            raise GeometryError(
                "direction matrix is not a rotation/reflection (sheared or degenerate header): "
                f"{np.round(D, 4).tolist()}"
            )
        if np.abs(D.T @ D - np.eye(3)).max() > ORTHONORMAL_TOL:
            raise GeometryError(
                f"direction matrix is not orthonormal (sheared header): {np.round(D, 4).tolist()}"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_sitk(cls, image: Any) -> "Grid":
        """Grid of a 3D SimpleITK image."""
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(d["size"], d["spacing"], d["origin"], d["direction"])

    # ------------------------------------------------------------------ basic properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (Z, Y, X) of tensors on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        """(3, 3) float64 direction cosines; column k is index axis k in world (LPS)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Field of view (size * spacing) in mm along each index axis."""
        return tuple(n * s for n, s in zip(self.size, self.spacing))

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    def apply_to_sitk(self, image: Any) -> Any:
        """Set this grid's spacing/origin/direction on a SimpleITK image of the right size."""
        if tuple(image.GetSize()) != self.size:
            raise GeometryError(f"image size {image.GetSize()} does not match grid size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    # ------------------------------------------------------------------ matrices (float64, 4x4)
    def index_to_world(self) -> np.ndarray:
        """(4, 4) homogeneous matrix: continuous index (x, y, z) -> world LPS mm."""
        M = np.eye(4)
        M[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        M[:3, 3] = self.origin
        return M

    def world_to_index(self) -> np.ndarray:
        """(4, 4) homogeneous matrix: world LPS mm -> continuous index (x, y, z), the exact inverse of
        :meth:`index_to_world` (as ITK's ``m_PhysicalPointToIndex``, the inverse of ``D diag(spacing)``).

        A header's direction is often orthonormal only to float32 precision or a little worse (an oblique
        acquisition rounded in the header; ITK accepts it), and then ``D^T`` is not ``D^-1``: an index mapped to
        world and back would move by ``|D^T D - I| * index`` (half a voxel on a 512-voxel axis at 1e-3). When
        ``D`` is orthonormal to :data:`ORTHONORMAL_EXACT`, ``S^-1 D^T`` is the inverse to that precision and is
        used as it is (so rotations, and directions read from float32 headers, give the same numbers as ever).
        """
        M = np.eye(4)
        D = self.direction_matrix
        if np.abs(D.T @ D - np.eye(3)).max() <= ORTHONORMAL_EXACT:
            Rinv = (D / np.asarray(self.spacing)[None, :]).T  # (D S)^-1 = S^-1 D^T
        else:
            Rinv = np.linalg.inv(D * np.asarray(self.spacing)[None, :])
        M[:3, :3] = Rinv
        M[:3, 3] = -Rinv @ np.asarray(self.origin)
        return M

    def index_to_norm(self) -> np.ndarray:
        """(4, 4) matrix: continuous index -> ``grid_sample`` coordinates (align_corners=True)."""
        n = np.asarray(self.size, dtype=np.float64)
        scale = 2.0 / np.maximum(n - 1.0, 1.0)
        M = np.eye(4)
        M[:3, :3] = np.diag(scale)
        M[:3, 3] = -1.0
        return M

    def world_to_norm(self) -> np.ndarray:
        """(4, 4) matrix: world LPS mm -> ``grid_sample`` coordinates of this grid."""
        return self.index_to_norm() @ self.world_to_index()

    def norm_to_world(self) -> np.ndarray:
        return np.linalg.inv(self.world_to_norm())

    def vector_world_to_norm(self) -> np.ndarray:
        """(3, 3) linear map of a displacement in world mm to a displacement in normalized coords."""
        return self.world_to_norm()[:3, :3]

    def vector_world_to_index(self) -> np.ndarray:
        """(3, 3) linear map of a displacement in world mm to a displacement in voxels."""
        return self.world_to_index()[:3, :3]

    def vector_unit_to_world(self) -> np.ndarray:
        """(3, 3) linear map of a displacement in unit-cube coordinates (x, y, z; ``index / (size - 1)`` per axis,
        the ``align_corners=True`` frame of GradICON's maps) to a displacement in world mm."""
        return self.index_to_world()[:3, :3] * (np.asarray(self.size, dtype=np.float64) - 1.0)[None, :]

    # ------------------------------------------------------------------ coordinates as tensors
    def index_coords(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Voxel indices of every voxel, (Z, Y, X, 3) with components (x, y, z)."""
        zs, ys, xs = (torch.arange(n, dtype=dtype, device=device) for n in self.shape)
        z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
        return torch.stack((x, y, z), dim=-1)

    def world_coords(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """World LPS mm of every voxel centre, (Z, Y, X, 3) with components (x, y, z)."""
        return apply_affine(self.index_to_world(), self.index_coords(torch.float64, device)).to(dtype)

    def world_to_index_points(self, points_world: torch.Tensor) -> torch.Tensor:
        """Continuous indices (..., 3) of world points (..., 3); computed in float64."""
        return apply_affine(self.world_to_index(), points_world)

    def index_to_world_points(self, index: torch.Tensor) -> torch.Tensor:
        return apply_affine(self.index_to_world(), index)

    def world_to_norm_points(self, points_world: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` coordinates (..., 3) of world points, in float64."""
        return apply_affine(self.world_to_norm(), points_world)

    def inside(self, points_world: torch.Tensor, margin_vox: float = 0.5) -> torch.Tensor:
        """Boolean (...) mask of world points within the grid (ITK buffer: index in [-0.5, n-0.5])."""
        idx = self.world_to_index_points(points_world)
        n = torch.as_tensor(self.size, dtype=idx.dtype, device=idx.device)
        return ((idx >= -margin_vox) & (idx <= n - 1 + margin_vox)).all(dim=-1)

    def center_world(self) -> np.ndarray:
        """World position (3,) of the grid centre."""
        c = (np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0
        return (self.index_to_world() @ np.append(c, 1.0))[:3]

    def corners_world(self) -> np.ndarray:
        """(8, 3) world positions of the outer voxel centres."""
        n = np.asarray(self.size, dtype=np.float64) - 1.0
        idx = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
        M = self.index_to_world()
        return idx @ M[:3, :3].T + M[:3, 3]

    # ------------------------------------------------------------------ derived grids
    def with_spacing(self, spacing: float | Sequence[float]) -> "Grid":
        """A grid with the same direction and field of view, resampled to ``spacing`` mm.

        The field of view (voxel corners) is kept: ``size' = round(size * spacing / spacing')`` and the
        origin moves so the first voxel's outer corner stays in place.
        """
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        old = np.asarray(self.spacing)
        n = np.asarray(self.size, dtype=np.float64)
        new_n = np.maximum(np.round(n * old / sp), 2).astype(int)
        corner = self.index_to_world() @ np.append(-0.5 * np.ones(3), 1.0)
        origin = corner[:3] + self.direction_matrix @ (0.5 * sp)
        return Grid(tuple(new_n), tuple(sp), tuple(origin), self.direction)

    def centred_lattice(self, spacing: float, multiple: int = 1, remainder: int = 0) -> "Grid":
        """An isotropic grid of ``spacing`` mm over this field of view, with this grid's directions, centred on its
        centre, with ``n = remainder (mod multiple)`` voxels per axis (``round(size * spacing / spacing')`` rounded
        up to that).

        Its voxel centres do not depend on how the image is stored: a flipped axis maps the centred lattice onto
        itself, a permutation only reorders it (:meth:`with_spacing` starts at voxel 0, whose place changes with a
        flip). So do the blocks that pool it by a divisor of ``multiple`` when ``remainder`` is 0, and the voxels
        that a stride by a divisor of ``multiple`` keeps when ``remainder`` is 1 (both are then symmetric about the
        centre; pooling would otherwise pad one end, a stride start at one end).
        """
        sp = float(spacing)
        old = np.asarray(self.spacing)
        n = np.maximum(np.round(np.asarray(self.size, dtype=np.float64) * old / sp), 2).astype(int)
        m = max(1, int(multiple))
        n = n + (int(remainder) - n) % m
        centre = self.index_to_world() @ np.append((np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0, 1.0)
        origin = centre[:3] - self.direction_matrix @ ((n - 1) / 2.0 * sp)
        return Grid(tuple(int(v) for v in n), (sp, sp, sp), tuple(origin), self.direction)

    def subsampled(self, factor: int) -> "Grid":
        """The grid of every ``factor``-th voxel, starting at voxel 0: voxel ``i`` of the result is voxel
        ``factor * i`` of this grid (what a stride-``factor`` convolution with "same" padding outputs).

        Size ``ceil(n / factor)`` per axis, spacing ``factor`` times larger, same origin and direction.
        """
        f = int(factor)
        if f < 1:
            raise ValueError(f"subsampling factor must be >= 1, got {factor}")
        size = tuple(-(-n // f) for n in self.size)
        return Grid(size, tuple(s * f for s in self.spacing), self.origin, self.direction)

    def with_size(self, size: Sequence[int]) -> "Grid":
        """Same field of view and direction with ``size`` voxels (spacing adapts)."""
        size = np.asarray(size, dtype=np.float64)
        sp = np.asarray(self.extent_mm) / size
        corner = self.index_to_world() @ np.append(-0.5 * np.ones(3), 1.0)
        origin = corner[:3] + self.direction_matrix @ (0.5 * sp)
        return Grid(tuple(size.astype(int)), tuple(sp), tuple(origin), self.direction)

    def cropped(self, start: Sequence[int], size: Sequence[int]) -> "Grid":
        """The grid of the sub-block of ``size`` voxels (x, y, z) starting at voxel ``start`` (x, y, z): same
        spacing and direction, origin at that voxel's centre (the grid of ``data[z0:z1, y0:y1, x0:x1]``)."""
        origin = (self.index_to_world() @ np.append(np.asarray(start, dtype=np.float64), 1.0))[:3]
        return Grid(tuple(int(n) for n in size), self.spacing, tuple(origin), self.direction)

    def carried_by(self, matrix: np.ndarray) -> "Grid":
        """This grid carried through the world affine ``matrix`` (4x4, ``p -> A p + t``), as a grid with the
        same spacing that covers the image of its field of view.

        The direction is the rotation (or reflection) nearest to ``A @ direction`` (its orthogonal polar
        factor); the origin and size make the grid cover the mapped outer voxel corners. For a rigid ``matrix``
        this is exactly the mapped grid (same size); for the identity, this grid itself. Used for the inverse
        warp on the moving grid: the moving grid carried into the fixed space by the inverse affine.
        """
        M = np.asarray(matrix, dtype=np.float64).reshape(4, 4)
        u, _, vt = np.linalg.svd(M[:3, :3] @ self.direction_matrix)
        R = u @ vt
        sp = np.asarray(self.spacing)
        n = np.asarray(self.size, dtype=np.float64)
        corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                            for c in (-0.5, n[2] - 0.5)])
        M_src = self.index_to_world()
        world = (corners @ M_src[:3, :3].T + M_src[:3, 3]) @ M[:3, :3].T + M[:3, 3]
        p0 = M[:3, :3] @ np.asarray(self.origin) + M[:3, 3]  # where voxel 0's centre goes
        idx = ((world - p0) @ R) / sp  # continuous indices of the mapped corners in the new frame
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        size = np.maximum(np.ceil(hi - lo - 1e-6), 1).astype(int)
        origin = p0 + R @ ((lo + 0.5) * sp)
        return Grid(tuple(size), tuple(sp), tuple(origin), tuple(R.ravel()))

    # ------------------------------------------------------------------ comparisons / descriptions
    def allclose(self, other: "Grid", rtol: float = 1e-4) -> bool:
        """Same grid up to ``rtol * spacing`` in position and 1e-4 in direction cosines."""
        if self.size != other.size:
            return False
        sp = np.asarray(self.spacing)
        if np.abs(sp - np.asarray(other.spacing)).max() > rtol * sp.min():
            return False
        if np.abs(np.asarray(self.origin) - np.asarray(other.origin)).max() > rtol * sp.min():
            return False
        return np.abs(self.direction_matrix - other.direction_matrix).max() <= 1e-4

    def axcodes(self) -> str:
        """Orientation letters of the index axes in LPS terms, e.g. ``'LPS'``, ``'RAS'``, ``'LIA'``.

        Each letter names the world direction that the index axis *points to* (ITK/DICOM convention
        spelled as nibabel does: ``RAS`` here means +i points Right, +j Anterior, +k Superior).
        """
        return axcodes_of(self.direction_matrix)

    def dominant_axes(self) -> list[tuple[int, float]]:
        """Per index axis (x, y, z): the LPS world axis it mostly points along (0, 1, 2) and +1.0 when it points
        towards that axis's positive side (L, P or S), else -1.0 (:func:`dominant_axes_of`); :meth:`axcodes`
        spells them as letters."""
        return dominant_axes_of(self.direction_matrix)

    def ras_affine(self) -> np.ndarray:
        """(4, 4) NIfTI/nibabel affine (index -> RAS mm) of this grid."""
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.index_to_world()

    def describe(self) -> str:
        sp = ", ".join(f"{s:g}" for s in self.spacing)
        return f"{'x'.join(map(str, self.size))} voxels, spacing ({sp}) mm, {self.axcodes()}"


def apply_affine(matrix: np.ndarray | torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a (4, 4) homogeneous matrix to points (..., 3), in float64 (returns float64)."""
    M = torch.as_tensor(np.asarray(matrix, dtype=np.float64), device=points.device)
    p = points.to(torch.float64)
    # as one (V, 3) x (3, 3) product: the batched (..., 3) form takes a much slower path on CPU
    return torch.addmm(M[:3, 3], p.reshape(-1, 3), M[:3, :3].T).reshape(p.shape)


def apply_linear(matrix3: np.ndarray, vectors: torch.Tensor) -> torch.Tensor:
    """Apply a (3, 3) linear map to vectors (..., 3); keeps the dtype of ``vectors``."""
    M = torch.as_tensor(np.asarray(matrix3), dtype=vectors.dtype, device=vectors.device)
    return (vectors.reshape(-1, 3) @ M.T).reshape(vectors.shape)


def sampling_grid(target: Grid, source: Grid, device=None) -> torch.Tensor:
    """``grid_sample`` coordinates in ``source`` of the voxel centres of ``target``: (1, Z, Y, X, 3) float32.

    This is the identity resampling grid when the two grids coincide. Composed in float64.
    """
    M = source.world_to_norm() @ target.index_to_world()
    return apply_affine(M, target.index_coords(torch.float64, device)).to(torch.float32)[None]


def points_to_sampling_grid(source: Grid, points_world: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` coordinates in ``source`` for world points (Z, Y, X, 3) -> (1, Z, Y, X, 3) float32."""
    return source.world_to_norm_points(points_world).to(torch.float32)[None]


def padded_grid(grid: Grid, factor: int) -> tuple[Grid, tuple[int, int, int]]:
    """The grid extended at its high-index end to a multiple of ``factor`` voxels per axis.

    Returns the padded grid (same origin, spacing, direction) and the padding (px, py, pz) in voxels.
    """
    pad = tuple((-n) % factor for n in grid.size)
    size = tuple(n + p for n, p in zip(grid.size, pad))
    return Grid(size, grid.spacing, grid.origin, grid.direction), pad


def pooled_grid(grid: Grid, factor: int) -> Grid:
    """Grid of ``avg_pool3d(data, factor, stride=factor)`` for data on ``grid`` (size divisible by factor).

    Voxel ``i`` of the pooled grid is the centre of fine voxels ``factor*i .. factor*i + factor - 1``.
    """
    centre = np.append(np.full(3, (factor - 1) / 2.0), 1.0)
    origin = (grid.index_to_world() @ centre)[:3]
    size = tuple(n // factor for n in grid.size)
    return Grid(size, tuple(s * factor for s in grid.spacing), tuple(origin), grid.direction)
