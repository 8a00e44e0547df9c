"""Affine transforms in world space (ITK convention: fixed point -> moving point)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from regcli.spaces.grid import apply_affine


@dataclass
class AffineTransform:
    """``p_moving = A @ p_fixed + t`` in world LPS mm, stored as a (4, 4) float64 matrix.

    ``center`` only matters for how the transform is written to ITK files (ITK stores
    ``A (p - c) + c + t'``); it does not change the mapping.
    """

    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(4, 4)
        self.center = np.asarray(self.center, dtype=np.float64).reshape(3)

    # ------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, center: Sequence[float] | None = None) -> "AffineTransform":
        return cls(np.eye(4), np.zeros(3) if center is None else np.asarray(center))

    @classmethod
    def from_linear(cls, A: np.ndarray, t: Sequence[float], center: Sequence[float] | None = None) -> "AffineTransform":
        """``p -> A (p - c) + c + t``: the ITK parametrisation (matrix, translation, centre)."""
        c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64)
        A = np.asarray(A, dtype=np.float64).reshape(3, 3)
        M = np.eye(4)
        M[:3, :3] = A
        M[:3, 3] = np.asarray(t, dtype=np.float64) + c - A @ c
        return cls(M, c)

    @classmethod
    def translation(cls, t: Sequence[float]) -> "AffineTransform":
        return cls.from_linear(np.eye(3), t)

    @classmethod
    def from_sitk(cls, tx) -> "AffineTransform":
        """From any linear SimpleITK transform (Affine, Euler3D, VersorRigid3D, Similarity3D, Translation, ...)."""
        dim = tx.GetDimension()
        if dim != 3:
            raise ValueError(f"expected a 3D transform, got {dim}D")
        if not tx.IsLinear():
            raise ValueError(f"{tx.GetName()} is not a linear transform")
        try:
            A = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
            t = np.asarray(tx.GetTranslation(), dtype=np.float64)
            c = np.asarray(tx.GetCenter(), dtype=np.float64)
        except AttributeError:
            import SimpleITK as sitk

            # TranslationTransform and generic matrix-offset transforms: probe the mapping.
            tx = sitk.Transform(tx)
            o = np.asarray(tx.TransformPoint((0.0, 0.0, 0.0)))
            A = np.stack([np.asarray(tx.TransformPoint(tuple(e))) - o for e in np.eye(3)], axis=1)
            return cls.from_linear(A, o)
        return cls.from_linear(A, t, c)

    # ------------------------------------------------------------ parts
    @property
    def linear(self) -> np.ndarray:
        return self.matrix[:3, :3]

    @property
    def offset(self) -> np.ndarray:
        """Translation of the homogeneous matrix (``A @ 0 + offset``)."""
        return self.matrix[:3, 3]

    @property
    def itk_translation(self) -> np.ndarray:
        """ITK's translation parameter for this transform's centre."""
        c = self.center
        return self.offset - c + self.linear @ c

    def to_sitk(self):
        import SimpleITK as sitk

        tx = sitk.AffineTransform(3)
        tx.SetCenter(tuple(self.center))
        tx.SetMatrix(tuple(self.linear.ravel()))
        tx.SetTranslation(tuple(self.itk_translation))
        return tx

    # ------------------------------------------------------------ algebra
    def map_points(self, points: torch.Tensor) -> torch.Tensor:
        """Fixed world points (..., 3) -> moving world points, float64."""
        return apply_affine(self.matrix, points)

    def inverse(self) -> "AffineTransform":
        return AffineTransform(np.linalg.inv(self.matrix), self.center.copy())

    def compose(self, first: "AffineTransform") -> "AffineTransform":
        """``self ∘ first``: apply ``first`` to points, then ``self``."""
        return AffineTransform(self.matrix @ first.matrix, first.center.copy())

    def rotation_translation_error(self, other: "AffineTransform", at: Sequence[float] | None = None) -> tuple[float, float]:
        """(angle in degrees between the linear parts' rotations, translation difference in mm at ``at``)."""
        R = self.linear @ np.linalg.inv(other.linear)
        U, _, Vt = np.linalg.svd(R)
        Rp = U @ Vt
        ang = float(np.degrees(np.arccos(np.clip((np.trace(Rp) - 1) / 2, -1, 1))))
        p = np.zeros(3) if at is None else np.asarray(at, dtype=np.float64)
        d = float(np.linalg.norm(self.matrix[:3] @ np.append(p, 1) - other.matrix[:3] @ np.append(p, 1)))
        return ang, d

    def __repr__(self) -> str:
        return f"AffineTransform(matrix={np.round(self.matrix, 5).tolist()})"
