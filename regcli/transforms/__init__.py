"""Transforms: affine, dense displacement, composite (ANTs order), and field inversion."""

from regcli.transforms.affine import AffineTransform
from regcli.transforms.composite import CompositeTransform, compose
from regcli.transforms.displacement import DisplacementField
from regcli.transforms.inverse import invert_displacement, inverse_consistency_error

__all__ = ["AffineTransform", "CompositeTransform", "DisplacementField", "compose", "invert_displacement",
           "inverse_consistency_error"]
