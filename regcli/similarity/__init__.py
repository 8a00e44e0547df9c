"""Similarity measures as losses (lower is better), chosen by name.

Every entry of :data:`SIMILARITIES` is a factory ``make(**params) -> fn`` where
``fn(fixed, warped, mask=None) -> scalar tensor``; ``fixed``/``warped`` are (N, C, Z, Y, X) on the same
grid and ``mask`` is an optional (N, 1, Z, Y, X) weight in [0, 1].
"""

from regcli.similarity.base import SIMILARITIES, make_similarity, masked_mean
from regcli.similarity import intensity as _intensity  # noqa: F401  (registers entries)

__all__ = ["SIMILARITIES", "make_similarity", "masked_mean"]
from regcli.similarity import lncc as _lncc  # noqa: F401,E402  (registers "lncc", "ncc")
from regcli.similarity import mi as _mi  # noqa: F401,E402  (registers "mi")
