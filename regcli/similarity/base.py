"""Registry and helpers shared by similarity measures."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from regcli.registry import Registry

SimilarityFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
SIMILARITIES: Registry[Callable[..., SimilarityFn]] = Registry("similarity")


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """Mean of ``values`` (N, *, Z, Y, X) over voxels, weighted by ``mask`` (N, 1, Z, Y, X) if given."""
    if mask is None:
        return values.mean()
    w = mask.expand_as(values)
    return (values * w).sum() / (w.sum() + eps)


def make_similarity(name: str, **params) -> SimilarityFn:
    """Build a similarity function by registry name with its parameters."""
    return SIMILARITIES.get(name)(**params)
