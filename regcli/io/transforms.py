"""Read and write transforms in ANTs/ITK files.

* Affine: ``.mat`` (ITK MATLAB format, what ANTs writes as ``0GenericAffine.mat``), ``.txt``/``.tfm``
  (ITK text). Any matrix-offset transform (Euler, versor, similarity, affine) is read as affine.
* Displacement field: a 3-component vector image (``.nii.gz`` ``(X,Y,Z,1,3)`` intent vector, ``.nrrd``,
  ``.mha``) whose vectors are LPS mm on the field's grid, as ANTs writes ``1Warp.nii.gz``.
* Composite: ``.h5``/``.hdf5`` ITK composite files (affine and displacement parts).

A transform *spec* on the command line follows antsApplyTransforms: ``file`` or ``[file,1]`` to use the
inverse of an affine file. A list is in antsApplyTransforms order: a fixed-space point goes through
the first listed transform first (``-t prefix1Warp.nii.gz -t prefix0GenericAffine.mat`` maps x to
A(x + u(x))).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from regcli.errors import InputError
from regcli.io.images import IMAGE_EXTENSIONS, check_readable_file, read_sitk, refuse_nonfinite
from regcli.transforms import AffineTransform, CompositeTransform, DisplacementField

_SPEC = re.compile(r"^\[\s*(?P<path>[^,\]]+?)\s*(,\s*(?P<inv>[01])\s*)?\]$")


def parse_spec(spec: str) -> tuple[str, bool]:
    """``'file'`` -> (file, False); ``'[file,1]'`` -> (file, True) (use the inverse); InputError for a bracketed
    spec that is not ``[file]``, ``[file,0]`` or ``[file,1]``."""
    spec = spec.strip()
    m = _SPEC.match(spec)
    if m:
        return m.group("path"), m.group("inv") == "1"
    if spec.startswith("[") and spec.endswith("]"):
        raise InputError(f"transform '{spec}': write [file,1] to use a transform's inverse ([file] or [file,0]: "
                         "as it is)")
    return spec, False


def _is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def read_itk_transform(path: str | os.PathLike):
    """The SimpleITK transform in an ITK transform file (.mat, .txt, .tfm, .h5); InputError naming the file when
    it is missing, unreadable or not one."""
    import SimpleITK as sitk

    path = check_readable_file(path, "transform")
    try:
        return sitk.ReadTransform(str(path))
    except RuntimeError:
        raise InputError(f"cannot read transform '{path}': not an ITK transform file (.mat, .txt, .tfm, .h5)") from None


def itk_parts(tx) -> list:
    """The transforms of a SimpleITK transform in the order a point meets them, composites flattened (ITK applies
    a composite's last added transform first; regcli's and antsApplyTransforms' lists run in application order)."""
    import SimpleITK as sitk

    if tx.GetName() != "CompositeTransform":
        return [tx]
    comp = sitk.CompositeTransform(tx)
    return [p for i in reversed(range(comp.GetNumberOfTransforms())) for p in itk_parts(comp.GetNthTransform(i))]


def _from_sitk_transform(tx, path: Path) -> list:
    """regcli transforms for the (flattened) parts of a SimpleITK transform, in application order."""
    return [part for t in itk_parts(tx) for part in _from_sitk_part(t, path)]


def _from_sitk_part(tx, path: Path) -> list:
    import SimpleITK as sitk

    name = tx.GetName()
    if name == "DisplacementFieldTransform":
        field_img = sitk.DisplacementFieldTransform(tx).GetDisplacementField()
        return [DisplacementField.from_sitk(field_img)]
    if not tx.IsLinear():  # e.g. an ITK BSplineTransform: no affine stands for it
        raise InputError(f"cannot use transform '{path}': unsupported transform type {name}; regcli reads linear "
                         "transforms and displacement fields (convert it to a displacement field image, e.g. with "
                         "SimpleITK's TransformToDisplacementField)")
    try:
        return [AffineTransform.from_sitk(tx)]
    except (AttributeError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot use transform '{path}': unsupported transform type {name} ({e})") from None


def read_transform(spec: str) -> list:
    """Read one transform spec; returns a list (a composite .h5 file can hold several)."""
    import SimpleITK as sitk

    path_str, invert = parse_spec(spec)
    path = check_readable_file(path_str, "transform")
    if _is_image_path(path_str):
        img = read_sitk(path, "displacement field")
        if img.GetNumberOfComponentsPerPixel() != 3 or img.GetDimension() != 3:
            raise InputError(
                f"cannot use transform '{path}': a displacement field needs 3 components per voxel in 3D, "
                f"got {img.GetNumberOfComponentsPerPixel()} component(s) in {img.GetDimension()}D"
            )
        if invert:
            raise InputError(
                f"cannot invert displacement field '{path}' with [file,1]; pass its InverseWarp file instead"
            )
        refuse_nonfinite(sitk.GetArrayViewFromImage(img), path, "displacement field",
                         "a field must be finite everywhere: the file is damaged, write it again")
        return [DisplacementField.from_sitk(img)]
    tx = read_itk_transform(path)
    if tx.GetDimension() != 3:
        raise InputError(f"cannot use transform '{path}': it is {tx.GetDimension()}D, 3D is required")
    parts = _from_sitk_transform(tx, path)
    if invert:
        if not all(isinstance(p, AffineTransform) for p in parts):
            raise InputError(f"cannot invert '{path}' with [file,1]: only affine transforms can be inverted")
        parts = [p.inverse() for p in reversed(parts)]
    return parts


def read_transform_list(specs: Sequence[str]) -> CompositeTransform:
    """Read an antsApplyTransforms-style list (a fixed-space point meets the first one first)."""
    out = []
    for s in specs:
        out.extend(read_transform(s))
    return CompositeTransform(out)


def write_affine(transform: AffineTransform, path: str | os.PathLike) -> None:
    """Write an affine as ITK ``AffineTransform_double_3_3`` (.mat binary or .txt/.tfm text)."""
    import SimpleITK as sitk

    sitk.WriteTransform(transform.to_sitk(), str(path))


def write_displacement(field: DisplacementField, path: str | os.PathLike) -> None:
    """Write a displacement field as a float32 vector image (ANTs ``1Warp.nii.gz`` layout)."""
    from regcli.io.images import write_sitk

    write_sitk(field.to_sitk(), path)


def write_composite(transform: CompositeTransform, path: str | os.PathLike) -> None:
    """Write an ITK composite transform file (.h5)."""
    import SimpleITK as sitk

    sitk.WriteTransform(transform.to_sitk(), str(path))
