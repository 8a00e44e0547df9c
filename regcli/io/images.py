"""Read and write images with SimpleITK, validating everything a user can get wrong.

Supported: anything SimpleITK reads (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, ...). Errors name the
file and the problem in one line (:class:`~regcli.errors.InputError`).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from regcli.errors import GeometryError, InputError, folded
from regcli.spaces import Grid, Image

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".img.gz")


def _diagnose_unreadable(path: Path, err: Exception) -> str:
    """Turn a SimpleITK read failure into a short reason (gzip problems are caught earlier)."""
    if path.stat().st_size == 0:
        return "file is empty"
    first = str(err).strip().splitlines()
    detail = next((ln for ln in first if "ERROR" in ln or "rror" in ln), first[-1] if first else "")
    detail = folded(detail, 200)
    return f"not a readable image ({detail})" if detail else "not a readable image"


def check_readable_file(path: str | os.PathLike, role: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read {role} '{path}': file does not exist")
    if path.is_dir():
        raise InputError(f"cannot read {role} '{path}': is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {role} '{path}': permission denied")
    return path


def check_gzip_stream(path: Path, role: str) -> None:
    """Read a .gz file to its end: SimpleITK silently zero-fills a truncated .nii.gz, so we check first."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except gzip.BadGzipFile:
        raise InputError(f"cannot read {role} '{path}': file is not gzip although its name ends in .gz") from None
    except (EOFError, zlib.error):
        raise InputError(f"cannot read {role} '{path}': file is truncated or not gzip (compressed data ends early)") from None


def read_sitk(path: str | os.PathLike, role: str = "image"):
    """Read a file with SimpleITK, mapping every failure to an InputError that names the file."""
    import SimpleITK as sitk

    path = check_readable_file(path, role)
    if path.name.lower().endswith(".gz"):
        check_gzip_stream(path, role)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"cannot read {role} '{path}': {_diagnose_unreadable(path, e)}") from None


def _as_3d(img, path: Path, role: str, allow_vector: bool = False):
    """Return a 3D SimpleITK image or raise InputError naming the dimension problem."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    ncomp = img.GetNumberOfComponentsPerPixel()
    if dim == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        shape = "x".join(str(s) for s in img.GetSize())
        what = {2: "a 2D image", 4: "a 4D image (time series)", 5: "a 5D image"}.get(dim, f"a {dim}D image")
        raise InputError(
            f"{role} '{path}' is {what} of size {shape}; registration needs a single 3D volume"
            + (" (split the series, e.g. with `fslsplit`, and register one volume)" if dim == 4 else "")
        )
    if ncomp > 1 and not allow_vector:
        raise InputError(
            f"{role} '{path}' is a vector image with {ncomp} components per voxel; a scalar image is expected"
        )
    if min(img.GetSize()) < 2:
        raise InputError(f"{role} '{path}' has a size-1 axis {img.GetSize()}; a 3D volume is expected")
    return img


def _grid_of(img, path: Path, role: str) -> Grid:
    try:
        return Grid.from_sitk(img)
    except GeometryError as e:
        raise GeometryError(f"{role} '{path}': {e}") from None


def read_image(path: str | os.PathLike, role: str = "image", check_variance: bool = True) -> Image:
    """Read a scalar 3D intensity image as float32.

    Args:
        path: image file.
        role: how the file is named in messages ("fixed image", "moving image", ...).
        check_variance: refuse constant images (E3).

    Returns:
        Image with ``data`` (Z, Y, X) float32 and the file's grid.

    Raises:
        InputError: unreadable, not 3D, vector-valued, NaN/Inf voxels, or constant.
    """
    import SimpleITK as sitk

    path = Path(path)
    img = _as_3d(read_sitk(path, role), path, role)
    grid = _grid_of(img, path, role)
    pixel_type = img.GetPixelIDTypeAsString()
    data = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        bad = np.argwhere(~finite)
        z, y, x = (int(v) for v in bad[0])
        raise InputError(
            f"{role} '{path}' has {len(bad)} NaN/Inf voxels (first at index x={x}, y={y}, z={z}); "
            "replace them (e.g. with 0) before registering"
        )
    if check_variance and float(data.max()) == float(data.min()):
        raise InputError(f"{role} '{path}' has zero intensity variance (every voxel is {float(data.min()):g})")
    meta = {"path": str(path), "pixel_type": pixel_type}
    return Image(torch.from_numpy(np.ascontiguousarray(data)), grid, str(path), meta)


def read_labels(path: str | os.PathLike, role: str = "label map") -> Image:
    """Read an integer label map (Z, Y, X) int32. Float files must hold integral values."""
    import SimpleITK as sitk

    path = Path(path)
    img = _as_3d(read_sitk(path, role), path, role)
    grid = _grid_of(img, path, role)
    arr = sitk.GetArrayFromImage(img)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{role} '{path}' has NaN/Inf values; a label map must be integers")
        rounded = np.rint(arr)
        if np.abs(arr - rounded).max() > 1e-3:
            raise InputError(f"{role} '{path}' has non-integer values; a label map must hold integer labels")
        arr = rounded
    data = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int32)))
    return Image(data, grid, str(path), {"path": str(path), "pixel_type": img.GetPixelIDTypeAsString()})


def read_mask(path: str | os.PathLike, role: str, reference: Grid | None = None) -> Image:
    """Read a binary mask (non-zero = inside) as float32 {0, 1}; refuse empty masks (E5)."""
    img = read_labels(path, role)
    data = (img.data != 0).to(torch.float32)
    if not bool(data.any()):
        raise GeometryError(f"{role} '{path}' has 0 voxels inside (empty mask)")
    return Image(data, img.grid, img.name, img.meta)


def write_image(image: Image, path: str | os.PathLike, dtype: str | None = None) -> None:
    """Write an image (or vector field with a channel axis) with SimpleITK.

    Args:
        dtype: optional numpy dtype name to cast to before writing (e.g. "uint8" for labels).
    """
    import SimpleITK as sitk

    arr = image.numpy()
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.ndim == 4:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.grid.apply_to_sitk(img)
    sitk.WriteImage(img, str(path), useCompression=str(path).lower().endswith(".gz"))


def smallest_label_dtype(labels: np.ndarray | torch.Tensor) -> str:
    """uint8/uint16/int16/int32, the smallest integer type that holds every label."""
    a = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for name in ("uint8", "uint16", "int16", "int32"):
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    return "int64"
