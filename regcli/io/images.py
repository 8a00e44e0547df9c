"""Read and write images with SimpleITK, validating everything a user can get wrong.

Supported: anything SimpleITK reads (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, ...). Errors name the
file and the problem in one line (:class:`~regcli.errors.InputError`).

NIfTI qform/sform (RELIABILITY G7): the geometry is always SimpleITK's reading. For .nii/.nii.gz files the
348-byte NIfTI-1 header is also parsed here (standard library + NumPy, no nibabel) to refuse a sheared
sform that ITK cannot represent (:class:`~regcli.errors.GeometryError`) and to warn, on the ``regcli``
logger, when the qform and sform disagree or when SimpleITK's reading differs from the sform. The rule
SimpleITK follows is in docs/conventions.md ("NIfTI qform and sform").
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from regcli.errors import GeometryError, InputError, folded

if TYPE_CHECKING:  # torch (and regcli.spaces, which imports it) only where voxels are read or written, so that
    import torch  # check_image_header can refuse a bad input before a command's heavy imports

    from regcli.spaces import Grid, Image

IMAGE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".img.gz")

log = logging.getLogger("regcli")

#: qform and sform (or SimpleITK's reading and the sform) that map a voxel corner further apart than this
#: (mm) give a warning.
NIFTI_XFORM_TOL_MM = 1e-3
#: ITK's test for a usable sform: columns normalised, ``R R^T`` equal to the identity within this.
_ITK_ORTHO_TOL = 1e-4
#: ITK's test for "unexpected scales in sform": column norms differ from pixdim by more than this (mm).
_ITK_SCALE_TOL = 1e-3
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _diagnose_unreadable(path: Path, err: Exception) -> str:
    """Turn a SimpleITK read failure into a short reason (gzip problems are caught earlier)."""
    if path.stat().st_size == 0:
        return "file is empty"
    first = str(err).strip().splitlines()
    detail = next((ln for ln in first if "ERROR" in ln or "rror" in ln), first[-1] if first else "")
    detail = folded(detail, 200)
    return f"not a readable image ({detail})" if detail else "not a readable image"


# ------------------------------------------------------------------------------------------ NIfTI header
@dataclass(frozen=True)
class NiftiXforms:
    """The geometry fields of a NIfTI-1 header, as index -> RAS mm affines (float64).

    Attributes:
        size: voxels along (i, j, k); 1 for missing dimensions.
        pixdim: voxel sizes (mm) as nifti1_io uses them (non-positive or non-finite values read as 1).
        qform_code, sform_code: the header codes (0 = unset).
        qform: (4, 4) index -> RAS mm from the quaternion fields, None when ``qform_code <= 0``.
        sform: (4, 4) index -> RAS mm from ``srow_x/y/z``, None when ``sform_code <= 0``.
    """

    size: tuple[int, int, int]
    pixdim: tuple[float, float, float]
    qform_code: int
    sform_code: int
    qform: Optional[np.ndarray]
    sform: Optional[np.ndarray]

    def sform_problem(self) -> Optional[str]:
        """Why ITK cannot use the sform (singular or sheared, ITK's own test), or None."""
        if self.sform is None:
            return None
        m = self.sform[:3, :3]
        norms = np.linalg.norm(m, axis=0)
        if not np.all(np.isfinite(m)) or norms.min() <= 0 or np.linalg.cond(m / norms) > 1e6:
            return "degenerate (its 3x3 part is singular)"
        r = m / norms
        if np.abs(r @ r.T - np.eye(3)).max() <= _ITK_ORTHO_TOL:
            return None
        names = "ijk"
        worst = max(((a, b) for a in range(3) for b in range(a + 1, 3)),
                    key=lambda ab: abs(float(r[:, ab[0]] @ r[:, ab[1]])))
        angle = math.degrees(math.acos(max(-1.0, min(1.0, float(r[:, worst[0]] @ r[:, worst[1]])))))
        return f"sheared (index axes {names[worst[0]]} and {names[worst[1]]} meet at {angle:.2f} degrees, not 90)"

    def sform_scales_differ(self) -> bool:
        """True when the sform's column norms differ from pixdim (ITK then warns "unexpected scales in sform")."""
        if self.sform is None:
            return False
        norms = np.linalg.norm(self.sform[:3, :3], axis=0)
        return bool(np.abs(norms - np.asarray(self.pixdim)).max() > _ITK_SCALE_TOL)


def _quatern_to_affine(b: float, c: float, d: float, offset, dx: float, dy: float, dz: float, qfac: float):
    """nifti1_io's ``nifti_quatern_to_mat44`` in float64: index -> RAS mm."""
    a = 1.0 - (b * b + c * c + d * d)
    if a < 1e-7:
        n = 1.0 / math.sqrt(b * b + c * c + d * d)
        b, c, d, a = b * n, c * n, d * n, 0.0
    else:
        a = math.sqrt(a)
    r = np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ])
    zd = -dz if qfac < 0 else dz
    out = np.eye(4)
    out[:3, :3] = r * np.array([dx, dy, zd])[None, :]
    out[:3, 3] = offset
    return out


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _open_nifti(path: Path):
    """The file's bytes as a binary stream, decompressed for .gz."""
    return (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb")


def _header_byte_order(head: bytes, sizeof_hdr: int) -> Optional[str]:
    """``"<"`` or ``">"``: the byte order in which the header's first int32 reads ``sizeof_hdr`` (348 for
    NIfTI-1, 540 for NIfTI-2); None when it reads neither way or the header is shorter than that."""
    if len(head) < sizeof_hdr:
        return None
    for order in "<>":
        if struct.unpack(order + "i", head[:4])[0] == sizeof_hdr:
            return order
    return None


def read_nifti_xforms(path: str | os.PathLike) -> Optional[NiftiXforms]:
    """Parse the qform/sform fields of a NIfTI-1 file (.nii or .nii.gz) from its first 348 bytes.

    Standard library and NumPy only (nibabel is not a dependency of regcli). Returns None for anything
    that is not a readable NIfTI-1 single-file header (NIfTI-2, Analyze, short or unreadable files):
    SimpleITK then reports those itself.
    """
    path = Path(path)
    try:
        with _open_nifti(path) as f:
            raw = f.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    e = _header_byte_order(raw, 348)
    if e is None or raw[344:348] not in (b"n+1\0", b"ni1\0"):
        return None
    dim = struct.unpack(e + "8h", raw[40:56])
    pixdim = struct.unpack(e + "8f", raw[76:108])
    qform_code, sform_code = struct.unpack(e + "2h", raw[252:256])
    qb, qc, qd, qx, qy, qz = struct.unpack(e + "6f", raw[256:280])
    srow = np.asarray(struct.unpack(e + "12f", raw[280:328]), dtype=np.float64).reshape(3, 4)
    ndim = max(0, min(int(dim[0]), 7))
    size = tuple(int(dim[i]) if i <= ndim and dim[i] > 0 else 1 for i in (1, 2, 3))
    pd = tuple(float(p) if math.isfinite(p) and p > 0 else 1.0 for p in pixdim[1:4])
    qform = None
    if qform_code > 0:
        qform = _quatern_to_affine(qb, qc, qd, (qx, qy, qz), *pd, -1.0 if pixdim[0] < 0 else 1.0)
    sform = None
    if sform_code > 0:
        sform = np.eye(4)
        sform[:3, :] = srow
    return NiftiXforms(size, pd, int(qform_code), int(sform_code), qform, sform)


def _corner_distance_mm(a: np.ndarray, b: np.ndarray, size) -> float:
    """Largest distance (mm) between where two index -> world affines put the corners of the voxel grid."""
    lo, hi = -0.5, np.asarray(size, dtype=np.float64) - 0.5
    corners = np.array([[(hi[0] if i else lo), (hi[1] if j else lo), (hi[2] if k else lo), 1.0]
                        for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    return float(np.linalg.norm(corners @ (a - b)[:3].T, axis=1).max())


def _describe_lps(affine_ras: np.ndarray) -> str:
    """``origin (..) mm, spacing (..), direction ((..), (..), (..))`` of an index -> RAS affine, in LPS."""
    m = _LPS_FROM_RAS @ affine_ras[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / np.where(spacing > 0, spacing, 1.0)
    origin = _LPS_FROM_RAS @ affine_ras[:3, 3]

    def vec(v):
        return "(" + ", ".join(f"{x:.4g}" if abs(x) >= 1e-4 else "0" for x in v) + ")"

    return (f"origin {vec(origin)} mm, spacing {vec(spacing)}, "
            f"direction ({', '.join(vec(row) for row in direction)})")


def _ras_affine_of(source: Any) -> Optional[np.ndarray]:
    """Index -> RAS mm affine of a SimpleITK image or ImageFileReader (first three axes), None below 3D."""
    dim = source.GetDimension()
    if dim < 3:
        return None
    d = np.asarray(source.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    out = np.eye(4)
    out[:3, :3] = _LPS_FROM_RAS @ d @ np.diag(np.asarray(source.GetSpacing(), dtype=np.float64)[:3])
    out[:3, 3] = _LPS_FROM_RAS @ np.asarray(source.GetOrigin(), dtype=np.float64)[:3]
    return out


def refuse_unusable_sform(xf: NiftiXforms, path: Path, role: str) -> None:
    """GeometryError when the sform is the only transform and ITK cannot represent it (shear, singular)."""
    problem = xf.sform_problem()
    if problem and xf.qform_code <= 0:
        raise GeometryError(
            f"{role} '{path}': its NIfTI sform (sform_code={xf.sform_code}) is {problem} and there is no qform "
            "(qform_code=0); regcli (ITK) needs a rotation with voxel sizes: resample the image onto an "
            "unsheared grid first"
        )


_WARNED: set[str] = set()


def mark_warned(messages) -> None:
    """Take ``messages`` (e.g. a ``regcli register`` child's ``report["warnings"]``, already shown to the user) as
    given in this process: the same header warning is then not logged again."""
    _WARNED.update(messages)


def check_nifti_geometry(source: Any, xf: NiftiXforms, path: Path, role: str) -> Optional[str]:
    """Compare SimpleITK's reading of a NIfTI file with its qform and sform; log one warning line if needed.

    Args:
        source: the SimpleITK image (or an ImageFileReader after ReadImageInformation) read from ``path``.
        xf: the file's header fields (:func:`read_nifti_xforms`).

    Returns:
        The warning logged on the ``regcli`` logger, or None. Warns when both codes are set and the two
        transforms put a voxel corner more than :data:`NIFTI_XFORM_TOL_MM` apart (naming both and the one
        SimpleITK used), or when only the sform counts and SimpleITK's reading differs from it (ITK takes
        the voxel sizes from pixdim, not from the sform's columns).
    """
    itk = _ras_affine_of(source)
    if itk is None or xf.sform is None:
        return None
    tol = NIFTI_XFORM_TOL_MM
    d_s = _corner_distance_mm(itk, xf.sform, xf.size)
    message = None
    if xf.qform is not None and _corner_distance_mm(xf.qform, xf.sform, xf.size) > tol:
        d_q = _corner_distance_mm(itk, xf.qform, xf.size)
        d_qs = _corner_distance_mm(xf.qform, xf.sform, xf.size)
        if d_s <= tol and d_s <= d_q:
            used, why = "sform", "as SimpleITK does; nibabel, FSL and NiftyReg use the sform too"
        elif d_q <= tol:
            problem = xf.sform_problem()
            why = (f"as SimpleITK does, because the sform is {problem}" if problem else
                   "as SimpleITK does (ITK prefers the qform unless sform_code is 1 or the two nearly agree); "
                   "nibabel, FSL and NiftyReg would use the sform")
            used = "qform"
        else:
            used = "sform's origin and direction with the pixdim voxel sizes"
            why = "as SimpleITK does"
        message = (f"{role} '{path}': NIfTI qform (qform_code={xf.qform_code}) and sform "
                   f"(sform_code={xf.sform_code}) disagree by up to {d_qs:.3g} mm at the voxel corners; "
                   f"regcli uses the {used}, {why}. sform: {_describe_lps(xf.sform)}; "
                   f"qform: {_describe_lps(xf.qform)}")
    elif d_s > tol:
        norms = np.linalg.norm(xf.sform[:3, :3], axis=0)
        message = (f"{role} '{path}': NIfTI sform voxel sizes ({', '.join(f'{v:.6g}' for v in norms)}) mm differ "
                   f"from pixdim ({', '.join(f'{v:.6g}' for v in xf.pixdim)}) mm; regcli uses pixdim with the "
                   f"sform's origin and direction, as SimpleITK does, so voxels lie up to {d_s:.3g} mm from "
                   "where the sform (and nibabel or FSL) puts them")
    if message and message not in _WARNED:  # once per file and process: the pre-flight reads the header first
        _WARNED.add(message)
        log.warning(message)
    return message


@contextlib.contextmanager
def _itk_warnings_off(off: bool):
    """Silence ITK's own stderr warnings for one read (regcli reports the same problem in one line)."""
    if not off:
        yield
        return
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def check_readable_file(path: str | os.PathLike, role: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read {role} '{path}': file does not exist")
    if path.is_dir():
        raise InputError(f"cannot read {role} '{path}': is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {role} '{path}': permission denied")
    return path


def check_gzip_stream(path: Path, role: str) -> int:
    """Read a .gz file to its end: SimpleITK silently zero-fills a truncated .nii.gz, so we check first.
    Returns the number of decompressed bytes."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
        return total
    except gzip.BadGzipFile:
        raise InputError(f"cannot read {role} '{path}': file is not gzip although its name ends in .gz") from None
    except (EOFError, zlib.error):
        raise InputError(f"cannot read {role} '{path}': file is truncated or not gzip (compressed data ends early)") from None


def _nifti_fields(head: bytes) -> Optional[tuple[str, tuple[int, ...], int, int, int]]:
    """``(byte order, dims (x, y, z, ...), datatype code, bitpix, voxel offset)`` of a single-file NIfTI-1/2
    header (``n+1``/``n+2``), or None when ``head`` is not one or its ``dim[0]`` is outside 1..7."""
    if (order := _header_byte_order(head, 348)) is not None and head[344:347] == b"n+1":
        dim = np.frombuffer(head[40:56], order + "i2")
        code, bitpix = (int(v) for v in np.frombuffer(head[70:74], order + "i2"))
        offset = int(np.frombuffer(head[108:112], order + "f4")[0])
    elif (order := _header_byte_order(head, 540)) is not None and head[4:7] == b"n+2":
        dim = np.frombuffer(head[16:80], order + "i8")
        code, bitpix = (int(v) for v in np.frombuffer(head[12:16], order + "i2"))
        offset = int(np.frombuffer(head[168:176], order + "i8")[0])
    else:
        return None
    if not 1 <= int(dim[0]) <= 7:
        return None
    return order, tuple(max(1, int(d)) for d in dim[1:int(dim[0]) + 1]), code, bitpix, offset


def nifti_needed_bytes(head: bytes) -> Optional[int]:
    """How many bytes a single-file NIfTI-1/2 (``n+1``/``n+2``) with this header holds: the voxel offset plus
    the voxel data; None when ``head`` is not such a header."""
    fields = _nifti_fields(head)
    if fields is None or fields[3] <= 0 or fields[3] % 8:
        return None
    _, dims, _, bitpix, offset = fields
    return max(offset, 348) + math.prod(dims) * (bitpix // 8)


def _short_nifti(head: bytes, size: int) -> Optional[str]:
    need = nifti_needed_bytes(head)
    if need is None or size >= need:
        return None
    return f"its voxel data end early ({size} bytes where the header needs {need})"


def check_nifti_length(path: Path, role: str, decompressed: Optional[int] = None) -> None:
    """Refuse a single-file NIfTI whose voxel data are shorter than its header says: SimpleITK reads such a
    file (a ``.nii`` cut short, or a ``.nii.gz`` that holds a short payload) and fills the rest with zeros.
    ``decompressed``: the byte count of a ``.nii.gz`` (:func:`check_gzip_stream`)."""
    with _open_nifti(path) as f:
        head = f.read(540)
    size = decompressed if decompressed is not None else path.stat().st_size
    if (problem := _short_nifti(head, size)) is not None:
        raise InputError(f"cannot read {role} '{path}': {problem}; the file is truncated")


def written_nifti_problem(path: str | os.PathLike) -> Optional[str]:
    """What is wrong with a NIfTI file just written (a short write on a full disk, which ITK reports only on
    stderr), from its size or, for ``.nii.gz``, the length in the gzip trailer (modulo 2^32), without
    decompressing it; None when it is whole, or not a single-file NIfTI that this check can read."""
    path = Path(path)
    if not is_nifti_path(path):
        return None
    try:
        with _open_nifti(path) as f:
            head = f.read(540)
        if not path.name.lower().endswith(".gz"):
            return _short_nifti(head, path.stat().st_size)
        need = nifti_needed_bytes(head)
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
    except (OSError, EOFError, zlib.error):
        return None  # not a NIfTI this check can read; the writer's own errors stand
    if need is not None and isize != need % (1 << 32):
        return f"its gzip stream holds {isize} bytes where the header needs {need}"
    return None


#: bytes per value of the MetaImage element types whose size does not depend on the platform
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _metaimage_fields(path: Path) -> Optional[tuple[dict[str, str], int]]:
    """The ``key = value`` fields of a MetaImage header (.mha, .mhd), keys upper-cased, up to and including
    ``ElementDataFile`` (the last field), and the byte offset just past that line (where LOCAL data start); None
    when the file does not read as one."""
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            offset = 0
            for _ in range(200):
                line = f.readline(4096)
                if not line:
                    return None
                offset += len(line)
                key, eq, value = line.decode("latin-1").partition("=")
                if not eq:
                    return None
                fields[key.strip().upper()] = value.strip()
                if key.strip().upper() == "ELEMENTDATAFILE":
                    return fields, offset
    except OSError:
        return None
    return None


def metaimage_data_problem(path: Path) -> Optional[str]:
    """Why the voxel data of a MetaImage header (.mhd, or .mha) cannot be read, naming the data file
    (``ElementDataFile``): missing, not readable, or shorter than the header needs (ITK would print its own
    ``MetaImage: Read: ...`` lines on stderr and then fail naming the header only). None when they look whole,
    or the file is not a MetaImage this check understands (a LIST or a file pattern of slices)."""
    if not path.name.lower().endswith((".mha", ".mhd")):
        return None
    parsed = _metaimage_fields(path)
    if parsed is None:
        return None
    fields, header_end = parsed
    name = fields.get("ELEMENTDATAFILE", "")
    if not name or name.upper().startswith("LIST") or "%" in name or " " in name:
        return None
    local = name.upper() == "LOCAL"
    data = path if local else (Path(name) if Path(name).is_absolute() else path.parent / name)
    shown = f"its data file '{data}' (ElementDataFile in the header)"
    if not local:
        if not data.exists():
            return f"{shown} does not exist"
        if data.is_dir() or not os.access(data, os.R_OK):
            return f"{shown} cannot be read"
    size = data.stat().st_size - (header_end if local else 0)
    try:
        if fields.get("COMPRESSEDDATA", "false").lower() == "true":
            need = int(fields["COMPRESSEDDATASIZE"]) if "COMPRESSEDDATASIZE" in fields else None
        else:
            dims = [int(v) for v in fields["DIMSIZE"].split()]
            channels = int(fields.get("ELEMENTNUMBEROFCHANNELS", "1"))
            item = _MET_TYPE_BYTES.get(fields.get("ELEMENTTYPE", "").upper())
            skip = int(fields.get("HEADERSIZE", "0"))
            need = None if item is None else math.prod(dims) * channels * item + (skip if not local and skip > 0
                                                                                 else 0)
    except (KeyError, ValueError):
        return None
    if need is not None and size < need:
        where = f"{shown} holds {size} bytes" if not local else f"its voxel data hold {size} bytes"
        return f"{where} where the header needs {need}; the file is truncated"
    return None


def _refuse_unreadable_metaimage_data(path: Path, role: str) -> None:
    if (problem := metaimage_data_problem(path)) is not None:
        raise InputError(f"cannot read {role} '{path}': {problem}")


def _checked_nifti_xforms(path: Path, role: str) -> Optional[NiftiXforms]:
    """The NIfTI header fields of ``path`` (None for other formats), refusing a sform ITK cannot use (G7)."""
    xf = read_nifti_xforms(path) if is_nifti_path(path) else None
    if xf is not None:
        refuse_unusable_sform(xf, path, role)
    return xf


def _quiet_itk_for(xf: Optional[NiftiXforms]):
    """Silence ITK's multi-line sform warnings when regcli reports the same problem in one line."""
    return _itk_warnings_off(xf is not None and (xf.sform_scales_differ() or xf.sform_problem() is not None))


def _read_failure(path: Path, role: str, err: RuntimeError) -> Exception:
    """The one-line error for a SimpleITK read failure: GeometryError for an orientation ITK cannot build."""
    if "orthonormal" in str(err):
        return GeometryError(
            f"{role} '{path}': SimpleITK cannot read its orientation (sheared or degenerate qform/sform: "
            f"{folded(str(err).strip().splitlines()[-1], 120)})"
        )
    return InputError(f"cannot read {role} '{path}': {_diagnose_unreadable(path, err)}")


def read_sitk(path: str | os.PathLike, role: str = "image"):
    """Read a file with SimpleITK, mapping every failure to an InputError that names the file.

    For NIfTI files the header's qform/sform are checked too (RELIABILITY G7): a sheared or singular
    sform with no qform is a GeometryError (SimpleITK cannot read it), and a qform/sform disagreement
    beyond 1e-3 mm logs one warning (see :func:`check_nifti_geometry`). The geometry is SimpleITK's.
    """
    import SimpleITK as sitk

    path = check_readable_file(path, role)
    decompressed = check_gzip_stream(path, role) if path.name.lower().endswith(".gz") else None
    xf = _checked_nifti_xforms(path, role)
    if is_nifti_path(path):
        check_nifti_length(path, role, decompressed)
    _refuse_unreadable_metaimage_data(path, role)
    try:
        with _quiet_itk_for(xf):
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise _read_failure(path, role, e) from None
    if xf is not None:
        check_nifti_geometry(img, xf, path, role)
    return img


def _read_header(path: str | os.PathLike, role: str):
    """``(ImageFileReader after ReadImageInformation, NIfTI header fields or None, path)``: a readable file whose
    header SimpleITK reads (else an InputError saying why: not gzip, truncated, not an image), and for NIfTI a
    usable sform (GeometryError). No voxel data are read."""
    import SimpleITK as sitk

    path = check_readable_file(path, role)
    xf = _checked_nifti_xforms(path, role)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk_for(xf):
            reader.ReadImageInformation()
    except RuntimeError as e:
        if path.name.lower().endswith(".gz"):
            check_gzip_stream(path, role)
        raise _read_failure(path, role, e) from None
    return reader, xf, path


def check_image_header(path: str | os.PathLike, role: str) -> None:
    """The checks of :func:`read_image` (and :func:`read_labels`, :func:`read_mask`) that the file's header
    decides, with the same one-line errors, without importing torch: a command can refuse a missing, unreadable or
    corrupt input, or one that is not a scalar 3D volume, before its heavy imports. A NIfTI file is also checked
    for truncation, from its size (``.nii``) or the length in its gzip trailer (``.nii.gz``,
    :func:`written_nifti_problem`): only when that disagrees with the header is the stream read, to say why (a
    file of several gzip members, whose trailer holds the last one's length only, then passes). A MetaImage's data
    file (``ElementDataFile``) must exist and hold what the header needs (:func:`metaimage_data_problem`). Other
    formats whose header is intact but whose voxel data are cut short pass here; the full read refuses them.

    Raises:
        InputError: missing, unreadable, not an image, not gzip, truncated, not a scalar 3D volume.
        GeometryError: an unusable sform.
    """
    import SimpleITK as sitk

    reader, _, path = _read_header(path, role)
    refuse_complex(sitk.GetPixelIDValueAsString(reader.GetPixelID()), path, role)
    _check_volume(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), path, role)
    _refuse_unreadable_metaimage_data(path, role)
    if written_nifti_problem(path) is not None:
        decompressed = check_gzip_stream(path, role) if path.name.lower().endswith(".gz") else None
        check_nifti_length(path, role, decompressed)


def read_grid(path: str | os.PathLike, role: str = "image") -> Grid:
    """The grid of an image file, read from its header only (no voxel data).

    The same checks as :func:`read_sitk` (and so :func:`read_image`): a readable file, and for NIfTI the
    qform/sform rules of RELIABILITY G7 (GeometryError for a sheared or singular sform without a qform, one
    warning line when the qform and sform disagree or the sform's scales differ from pixdim). For a 4D or
    vector image the grid is that of its first three axes. A compressed file is only decompressed as far
    as its header, unless the header cannot be read (then the gzip stream is checked to say why).

    Args:
        path: image file.
        role: how the file is named in messages ("reference image", "fixed image", ...).

    Returns:
        :class:`~regcli.spaces.Grid` (LPS mm), the grid :func:`read_image` gives for the same file.

    Raises:
        InputError: missing, unreadable, or below 3D.
        GeometryError: unusable sform, or a direction that is not a rotation/reflection.
    """
    reader, xf, path = _read_header(path, role)
    dim = reader.GetDimension()
    if dim < 3:
        shape = "x".join(str(s) for s in reader.GetSize())
        raise InputError(f"{role} '{path}' is a {dim}D image of size {shape}; a 3D image is needed")
    if xf is not None:
        check_nifti_geometry(reader, xf, path, role)
    return grid_of(reader, path, role)


def refuse_complex(pixel_type: str, path: Path, role: str) -> None:
    """InputError for complex voxels (RELIABILITY E7: non-scalar input is refused): regcli would otherwise keep the
    real part only (NumPy drops the imaginary part when casting). ``pixel_type``: SimpleITK's pixel type string
    (``GetPixelIDTypeAsString``, or ``GetPixelIDValueAsString`` of a reader's pixel ID)."""
    if "complex" in pixel_type.lower():
        raise InputError(
            f"{role} '{path}' has complex voxels ({pixel_type}); regcli needs real values: split it into "
            "magnitude and phase (or real and imaginary parts), e.g. with SimpleITK's ComplexToModulus and "
            "ComplexToPhase, and use those"
        )


def _as_3d(img, path: Path, role: str, allow_vector: bool = False):
    """Return a 3D SimpleITK image or raise InputError naming the dimension problem (or complex voxels)."""
    import SimpleITK as sitk

    refuse_complex(img.GetPixelIDTypeAsString(), path, role)
    _check_volume(img.GetDimension(), img.GetSize(), img.GetNumberOfComponentsPerPixel(), path, role, allow_vector)
    if img.GetDimension() == 4:  # 4D with one time point (_check_volume): its volume
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    return img


def _check_volume(dim: int, size, ncomp: int, path: Path, role: str, allow_vector: bool = False) -> None:
    """InputError naming the problem unless an image of ``dim`` dimensions, ``size`` and ``ncomp`` components per
    voxel is a 3D volume (a 4D one with a single time point counts), scalar unless ``allow_vector``, with no
    size-1 axis."""
    size = tuple(size)
    if dim == 4 and size[3] == 1:
        dim, size = 3, size[:3]
    if dim != 3:
        shape = "x".join(str(s) for s in size)
        what = {2: "a 2D image", 4: "a 4D image (time series)", 5: "a 5D image"}.get(dim, f"a {dim}D image")
        raise InputError(
            f"{role} '{path}' is {what} of size {shape}; registration needs a single 3D volume"
            + (" (split the series, e.g. with `fslsplit`, and register one volume)" if dim == 4 else "")
        )
    if ncomp > 1 and not allow_vector:
        raise InputError(
            f"{role} '{path}' is a vector image with {ncomp} components per voxel; a scalar image is expected"
        )
    if min(size) < 2:
        raise InputError(f"{role} '{path}' has a size-1 axis {size}; a 3D volume is expected")


def grid_of(source: Any, path: Path, role: str) -> Grid:
    """Grid of the first three axes of a SimpleITK image or ImageFileReader (after ReadImageInformation)."""
    from regcli.spaces import Grid

    dim = source.GetDimension()
    try:
        if dim == 3:
            return Grid.from_sitk(source)
        direction = np.asarray(source.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        return Grid(source.GetSize()[:3], source.GetSpacing()[:3], source.GetOrigin()[:3], direction)
    except GeometryError as e:
        raise GeometryError(f"{role} '{path}': {e}") from None


_NONFINITE_ADVICE = "replace them (e.g. with 0) before registering"


def _nonfinite_message(role: str, path: Path, count: int, first_xyz: tuple[int, int, int],
                       advice: str = _NONFINITE_ADVICE) -> str:
    x, y, z = first_xyz
    return f"{role} '{path}' has {count} NaN/Inf voxels (first at index x={x}, y={y}, z={z}); {advice}"


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64


def _nifti_pair_files(path: Path) -> Optional[tuple[Path, Path]]:
    """``(header, voxel data)`` files of a NIfTI-1 or Analyze 7.5 pair named by either of them (``.hdr``,
    ``.img``, either gzipped), the companion found as nifti1_io finds it (the other extension, plain, then
    ``.gz``, in either case); None for another name or when the companion is missing (SimpleITK then says so)."""
    low = path.name.lower()
    for ext, other in ((".hdr", ".img"), (".hdr.gz", ".img"), (".img", ".hdr"), (".img.gz", ".hdr")):
        if low.endswith(ext):
            stem = path.name[:len(path.name) - len(ext)]
            for cand in (other, other + ".gz", other.upper(), (other + ".gz").upper()):
                companion = path.with_name(stem + cand)
                if companion.is_file():
                    return (path, companion) if ext.startswith(".hdr") else (companion, path)
            return None
    return None


def _float_voxels_on_disk(path: Path) -> Optional[tuple[Path, np.dtype, tuple[int, ...], int]]:
    """``(file holding the voxels, float dtype with byte order, dims (x, y, z, ...), byte offset of the voxels in
    it)`` for a float32/float64 image that SimpleITK reads through nifti1_io (and so with NaN/Inf as 0): a
    single-file NIfTI-1/2 (.nii, .nii.gz) or a NIfTI-1/Analyze 7.5 pair (.hdr/.img, gzipped or not). None for
    any other file."""
    if is_nifti_path(path):
        with _open_nifti(path) as f:
            layout = _nifti_layout(f.read(540))
        if layout is None:
            return None
        dtype, dims, offset = layout
        return path, dtype, dims, max(offset, 348)
    files = _nifti_pair_files(path)
    if files is None:
        return None
    header, data = files
    with _open_nifti(header) as f:
        head = f.read(348)
    order = _header_byte_order(head, 348)  # a NIfTI-1 pair ("ni1") or Analyze 7.5 (no magic): the same fields
    if order is None:
        return None
    dim = np.frombuffer(head[40:56], order + "i2")
    code = int(np.frombuffer(head[70:72], order + "i2")[0])
    if not 1 <= int(dim[0]) <= 7 or code not in _NIFTI_FLOAT_TYPES:
        return None
    vox_offset = float(np.frombuffer(head[108:112], order + "f4")[0])
    offset = int(vox_offset) if math.isfinite(vox_offset) and vox_offset > 0 else 0
    dims = tuple(max(1, int(d)) for d in dim[1:int(dim[0]) + 1])
    return data, np.dtype(order + _NIFTI_FLOAT_TYPES[code]), dims, offset


def nonfinite_in_nifti(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> tuple[int, tuple[int, int, int]] | None:
    """Count NaN/Inf voxels in the data bytes of a float NIfTI file: single-file (.nii, .nii.gz) or a pair
    (.hdr/.img, .img.gz; NIfTI-1 or Analyze 7.5), named by either file of the pair.

    ITK 5 (so SimpleITK 2.x) replaces every NaN and +-Inf with 0 while reading these (nifti1_io's
    ``nifti_read_buffer``, which reads all of them; ITK PR #6683 keeps them from ITK 6 on), so a check on the
    array SimpleITK returns never sees them. MetaImage (.mha, .mhd) and NRRD keep them: the array check sees them.

    Returns:
        ``(count, (x, y, z))``: the number of non-finite values and the ITK index of the first one (file order,
        x fastest), or None when there are none, or the file is not a float32/float64 NIfTI or Analyze image.
    """
    path = Path(path)
    try:
        found = _float_voxels_on_disk(path)
        if found is None:
            return None
        data_file, dtype, dims, offset = found
        with _open_nifti(data_file) as f:
            while offset > 0:  # forward to the voxels (also in a gzip stream)
                skipped = len(f.read(min(offset, 1 << 22)))
                if not skipped:
                    return None
                offset -= skipped
            total = int(np.prod(dims, dtype=np.int64))
            step = max(dtype.itemsize, chunk_bytes - chunk_bytes % dtype.itemsize)
            count, first, seen = 0, 0, 0
            while seen < total:
                buf = f.read(min(step, (total - seen) * dtype.itemsize))
                n = len(buf) // dtype.itemsize
                if n == 0:
                    break
                bad = ~np.isfinite(np.frombuffer(buf, dtype, n))
                k = int(bad.sum())
                if k and not count:
                    first = seen + int(np.argmax(bad))
                count += k
                seen += n
    except (OSError, EOFError, zlib.error, ValueError):
        return None
    if not count:
        return None
    nx, ny, nz = (dims + (1, 1, 1))[:3]
    return count, (first % nx, (first // nx) % ny, (first // (nx * ny)) % nz)


def nonfinite_voxels(arr: np.ndarray, path: str | os.PathLike) -> tuple[int, tuple[int, int, int], bool] | None:
    """NaN/Inf values in ``arr`` or, for a float NIfTI file, in the file (ITK 5 reads them as 0, see
    :func:`nonfinite_in_nifti`).

    Args:
        arr: voxels as SimpleITK read them from ``path``, spatial axes first: (Z, Y, X) or (Z, Y, X, C).
            Integer arrays have none.
    Returns:
        ``(count, (x, y, z) index of the first, read_as_zero)`` or None when there are none; ``read_as_zero``
        is True when they were found in the file only (SimpleITK gave 0 for them).
    """
    if not np.issubdtype(arr.dtype, np.floating):
        return None
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        z, y, x = (int(v) for v in bad[0][:3])
        return len(bad), (x, y, z), False
    on_disk = nonfinite_in_nifti(path) if (arr == 0).any() else None
    return None if on_disk is None else (*on_disk, True)


def refuse_nonfinite(arr: np.ndarray, path: Path, role: str, advice: str = _NONFINITE_ADVICE) -> None:
    """InputError naming the count and first index of NaN/Inf voxels in ``arr`` (Z, Y, X) or in its file
    (:func:`nonfinite_voxels`)."""
    found = nonfinite_voxels(arr, path)
    if found is not None:
        raise InputError(_nonfinite_message(role, path, found[0], found[1], advice))


def _nifti_layout(head: bytes):
    """(float dtype with byte order, dims (x, y, z, ...), data offset) from a NIfTI-1/2 header, or None when the
    header is not a single-file NIfTI of float32/float64 voxels."""
    fields = _nifti_fields(head)
    if fields is None or fields[2] not in _NIFTI_FLOAT_TYPES:
        return None
    order, dims, code, _, offset = fields
    return np.dtype(order + _NIFTI_FLOAT_TYPES[code]), dims, offset


#: an intensity image whose range float32 would cover with fewer steps than this (its values all of one sign and
#: far from zero, e.g. 1000 + 1e-6 x signal in float64) is read with its minimum subtracted first (:func:`read_image`)
FLOAT32_MIN_LEVELS = 1 << 16


def _read_scalar(path: Path, role: str):
    """``(SimpleITK image, grid, voxels (Z, Y, X) in the file's type)`` of a scalar 3D image, with NaN/Inf voxels
    refused (counted in the file where SimpleITK reads them as 0)."""
    import SimpleITK as sitk

    img = _as_3d(read_sitk(path, role), path, role)
    grid = grid_of(img, path, role)
    arr = sitk.GetArrayFromImage(img)
    refuse_nonfinite(arr, path, role)
    return img, grid, arr


def float32_offset(arr: np.ndarray) -> float:
    """The offset to subtract (in float64) from intensities ``arr`` before casting them to float32, or 0.0 when the
    cast keeps them well enough.

    float32 has 24 significant bits: values ``1000 + 1e-9 x signal`` become one number, and ``1 + 1e-8 x signal``
    about 20 levels. When the range of ``arr`` spans fewer than :data:`FLOAT32_MIN_LEVELS` float32 steps at its
    magnitude (possible only when every value has the same sign and lies far from zero, so never for an image
    that contains 0), the offset is its minimum rounded to float32 (so that adding it back is exact where the
    data are 0); otherwise 0. Only types float32 cannot hold exactly (float64, 32- and 64-bit integers) can
    need one.
    """
    if arr.size == 0 or arr.dtype in (np.float32, np.float16) or arr.dtype.itemsize < 4 or arr.dtype == bool:
        return 0.0
    lo, hi = float(arr.min()), float(arr.max())
    if not hi > lo or lo <= 0.0 <= hi:
        return 0.0
    magnitude = max(abs(lo), abs(hi))
    if magnitude > float(np.finfo(np.float32).max):
        return 0.0
    step = float(np.spacing(np.float32(magnitude)))
    if (hi - lo) >= FLOAT32_MIN_LEVELS * step:
        return 0.0
    return float(np.float32(lo))


def read_image(path: str | os.PathLike, role: str = "image", check_variance: bool = True) -> Image:
    """Read a scalar 3D intensity image as float32.

    Registration does not depend on an intensity offset (every similarity and feature normalises it away: MIND,
    LNCC/NCC, MI and MSE on percentile-normalised images, the networks' percentile windows), so an image that
    float32 would quantise (a small signal on a large offset, :func:`float32_offset`) is read with its minimum
    subtracted in float64 first, recorded as ``meta["intensity_offset"]`` (file value = data + offset), which
    :func:`write_image` adds back. ``--modality ct`` windows (absolute HU) would see the shift, but a CT image
    spans 0 and is never shifted.

    Args:
        path: image file.
        role: how the file is named in messages ("fixed image", "moving image", ...).
        check_variance: refuse constant images (E3).

    Returns:
        Image with ``data`` (Z, Y, X) float32 and the file's grid; ``meta`` holds ``path``, ``pixel_type`` and,
        when one was subtracted, ``intensity_offset``.

    Raises:
        InputError: unreadable, not 3D, vector-valued or complex, NaN/Inf voxels, values beyond float32's range,
            or constant.
    """
    import torch

    from regcli.spaces import Image

    path = Path(path)
    img, grid, arr = _read_scalar(path, role)
    pixel_type = img.GetPixelIDTypeAsString()
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        big = float(np.abs(arr).max())
        if big > float(np.finfo(np.float32).max):
            raise InputError(f"{role} '{path}' has values up to {big:.4g}, beyond float32's range (3.4e38) in which "
                             "registration computes; rescale the image")
    offset = float32_offset(arr)
    if offset:
        data = (arr.astype(np.float64, copy=False) - offset).astype(np.float32)
        log.debug("%s '%s': intensities read minus %r (float32 would quantise them)", role, path, offset)
    else:
        data = arr.astype(np.float32, copy=False)
    if check_variance and float(data.max()) == float(data.min()):
        raise InputError(f"{role} '{path}' has zero intensity variance (every voxel is {float(arr.min()):g})")
    meta = {"path": str(path), "pixel_type": pixel_type}
    if offset:
        meta["intensity_offset"] = offset
    return Image(torch.from_numpy(np.ascontiguousarray(data)), grid, str(path), meta)


def refuse_labels_beyond_int32(arr: np.ndarray, path: Path, role: str) -> None:
    """InputError naming the smallest or largest label when a label map (integer, or integral floats) holds a
    value that int32, regcli's label type, cannot: the cast would wrap it (2^32 + 1 becomes 1 and merges with
    label 1; a float 3e9 becomes -2^31)."""
    if arr.size == 0 or arr.dtype == bool:
        return
    info = np.iinfo(np.int32)
    lo, hi = arr.min(), arr.max()
    for value in (lo, hi):
        if not info.min <= value <= info.max:
            shown = int(value) if np.issubdtype(arr.dtype, np.integer) else f"{float(value):.17g}"
            raise InputError(
                f"{role} '{path}' has label {shown}, outside the 32-bit integer range regcli's label maps use "
                f"({info.min} to {info.max}); renumber the labels"
            )


def read_labels(path: str | os.PathLike, role: str = "label map") -> Image:
    """Read an integer label map (Z, Y, X) int32. Float files must hold integral values.

    Raises:
        InputError: unreadable, not 3D, vector-valued or complex, NaN/Inf voxels (counted in the file, as
            :func:`read_image` does), non-integer values, or labels outside the int32 range.
    """
    import torch

    from regcli.spaces import Image

    path = Path(path)
    img, grid, arr = _read_scalar(path, role)
    if np.issubdtype(arr.dtype, np.floating):
        rounded = np.rint(arr)
        if np.abs(arr - rounded).max() > 1e-3:
            raise InputError(f"{role} '{path}' has non-integer values; a label map must hold integer labels")
        arr = rounded
    refuse_labels_beyond_int32(arr, path, role)
    data = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int32)))
    return Image(data, grid, str(path), {"path": str(path), "pixel_type": img.GetPixelIDTypeAsString()})


def read_mask(path: str | os.PathLike, role: str, reference: Grid | None = None) -> Image:
    """Read a mask as float32 {0, 1}: any finite scalar image, every non-zero voxel inside (a soft or
    probabilistic mask is binarised as read, so 0.5 counts as 1); refuse empty masks (E5) and NaN/Inf voxels
    (E4). Every consumer resamples the binarised mask (register: nearest; the network methods: linear weights
    of it; evaluate and jacobian: nearest)."""
    import torch

    from regcli.spaces import Image

    path = Path(path)
    img, grid, arr = _read_scalar(path, role)
    data = torch.from_numpy(np.ascontiguousarray(arr != 0)).to(torch.float32)  # in the file's type: 1e-50 is inside
    if not bool(data.any()):
        raise GeometryError(f"{role} '{path}' has 0 voxels inside (empty mask)")
    return Image(data, grid, str(path), {"path": str(path), "pixel_type": img.GetPixelIDTypeAsString()})


def write_image(image: Image, path: str | os.PathLike, dtype: str | None = None) -> None:
    """Write an image (or vector field with a channel axis) with SimpleITK.

    An image whose ``meta`` holds an ``intensity_offset`` (one read by :func:`read_image` with that offset
    subtracted, or resampled from one) is written with the offset added back (in float64), in the file's units.

    Args:
        dtype: optional numpy dtype name to cast to before writing (e.g. "uint8" for labels).
    """
    import SimpleITK as sitk

    arr = image.numpy()
    offset = image.meta.get("intensity_offset")
    if offset and np.issubdtype(arr.dtype, np.floating):  # read minus an offset (read_image): the file's values
        dtype = arr.dtype if dtype is None else dtype
        arr = arr.astype(np.float64) + float(offset)
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.ndim == 4:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.grid.apply_to_sitk(img)
    write_sitk(img, path)


#: ``.nii.gz`` payloads that deflate shrinks by less than this fraction are stored in the gzip stream
#: uncompressed (level 0): float32 displacement fields shrink by about 9 % and cost about 3.3 s per 88 MB to
#: deflate on these CPUs, against 0.3 s to store (docs/conventions.md, "Compression").
GZIP_STORE_BELOW_SAVING = 0.2
#: the level :func:`gzip_level_for` returns otherwise: ITK's own deflate is used then
GZIP_LEVEL = 6
_PROBE_BYTES = 1 << 20


def gzip_level_for(payload: np.ndarray) -> int:
    """0 (store) or :data:`GZIP_LEVEL` for an image's voxels, from deflating three 1 MiB samples of their
    bytes at level 1 (start, middle and end) and comparing the saving with :data:`GZIP_STORE_BELOW_SAVING`."""
    data = payload.reshape(-1).view(np.uint8)
    n = data.size
    raw = comp = 0
    for start in sorted({0, max(0, n // 2 - _PROBE_BYTES // 2), max(0, n - _PROBE_BYTES)}):
        sample = data[start:start + _PROBE_BYTES].tobytes()
        raw += len(sample)
        comp += len(zlib.compress(sample, 1))
    return 0 if raw and 1.0 - comp / raw < GZIP_STORE_BELOW_SAVING else GZIP_LEVEL


def write_sitk(img, path: str | os.PathLike) -> None:
    """Write a SimpleITK image to ``path`` (format from the extension, compressed for ``.gz``).

    ITK's NIfTI writer ignores the compression level and always deflates, which buys float fields about 9 %
    for about 3.3 s per 88 MB. A ``.nii.gz`` whose voxels barely compress (:func:`gzip_level_for`) is
    therefore written by SimpleITK as ``.nii`` beside ``path`` and put into a standard gzip stream here with
    its bytes stored; every reader of ``.nii.gz`` reads it. The gzip header carries no name and no time, so
    equal images give equal files.
    """
    import shutil

    import SimpleITK as sitk

    from regcli.errors import OutputError
    from regcli.io.atomic import image_name_problem, shown_name

    path = Path(path)
    problem = image_name_problem(path.name)
    if problem is not None:  # OutputSet.claim refuses these names before any work; this guards other callers
        raise OutputError(f"cannot write '{shown_name(path)}': {problem}")
    name = path.name.lower()
    if not name.endswith(".nii.gz") or gzip_level_for(sitk.GetArrayViewFromImage(img)) != 0:
        sitk.WriteImage(img, str(path), useCompression=name.endswith(".gz"))
        return
    raw = path.with_name(f".{path.name[:-3]}.{os.getpid()}.uncompressed.nii")
    try:
        sitk.WriteImage(img, str(raw), useCompression=False)
        with open(raw, "rb") as src, open(path, "wb") as out, \
                gzip.GzipFile(filename="", mode="wb", compresslevel=0, fileobj=out, mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 22)
    finally:
        with contextlib.suppress(OSError):
            raw.unlink()


def integer_dtype_holding(dtype, value: int) -> str:
    """``dtype`` (an integer numpy type) when it holds ``value``, else the smallest signed type that holds both
    (e.g. uint8 and a default value of -1: int16)."""
    info = np.iinfo(dtype)
    if info.min <= value <= info.max:
        return np.dtype(dtype).name
    lo, hi = min(int(info.min), value), max(int(info.max), value)
    for name in ("int16", "int32", "int64"):
        if np.iinfo(name).min <= lo and hi <= np.iinfo(name).max:
            return name
    raise ValueError(f"no integer type holds {value} and {np.dtype(dtype).name}")


def smallest_label_dtype(labels: np.ndarray | torch.Tensor) -> str:
    """uint8/uint16/int16/int32, the smallest integer type that holds every label."""
    a = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)  # a torch.Tensor
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for name in ("uint8", "uint16", "int16", "int32"):
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    return "int64"
