"""Registry and helpers shared by similarity measures."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from regcli.registry import Registry

SimilarityFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
SIMILARITIES: Registry[Callable[..., SimilarityFn]] = Registry("similarity")


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Mean of ``values`` (N, *, Z, Y, X) over voxels, weighted by ``mask`` (N, 1, Z, Y, X) if given.

    The sums are accumulated in float64 and the mean returned in ``values``' dtype: a float32 sum over a
    parallel split of the voxels rounds differently for different thread counts, and the solvers compare
    and stop on these values (RELIABILITY N5). The gradient (1/N, or the weights over their sum) is unchanged
    but for its last bit."""
    if mask is None:
        return values.mean(dtype=torch.float64).to(values.dtype)
    w = mask.expand_as(values)
    total = (values * w).sum(dtype=torch.float64) / (w.sum(dtype=torch.float64) + eps)
    return total.to(values.dtype)


def make_similarity(name: str, **params) -> SimilarityFn:
    """Build a similarity function by registry name with its parameters."""
    return SIMILARITIES.get(name)(**params)
