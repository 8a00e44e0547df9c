"""Voxel-wise similarities: mean squared error and feature-space SSD."""

from __future__ import annotations

from typing import Optional

import torch

from regcli.similarity.base import SIMILARITIES, masked_mean


def mse(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over voxels and channels of ``(fixed - warped)^2``."""
    return masked_mean((fixed - warped).pow(2), mask)


def feature_ssd(fixed: torch.Tensor, warped: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over feature channels of the squared difference, averaged over voxels (ConvexAdam's IO cost)."""
    return masked_mean((fixed - warped).pow(2).sum(dim=1, keepdim=True), mask)


# voxel-wise: the value is a (weighted) mean of per-voxel terms, so it may be evaluated on a subset of
# voxels (see ``Problem.support`` in :mod:`regcli.solvers.instance`)
mse.pointwise = True  # type: ignore[attr-defined]
feature_ssd.pointwise = True  # type: ignore[attr-defined]


@SIMILARITIES.register("mse")
def _make_mse(**_: object):
    return mse


@SIMILARITIES.register("feature_ssd")
def _make_feature_ssd(**_: object):
    return feature_ssd
