"""Read and write transforms in ANTs/ITK files.

* Affine: ``.mat`` (ITK MATLAB format, what ANTs writes as ``0GenericAffine.mat``), ``.txt``/``.tfm``
  (ITK text). Any linear ITK transform that ITK reads (affine, MatrixOffsetTransformBase as c3d_affine_tool and
  ITK-SNAP write it, Euler, versor, similarity, ComposeScaleSkewVersor, FixedCenterOfRotationAffine, ...) is read
  as its 4x4 affine, checked against SimpleITK's ``TransformPoint``. Other types, and files ITK cannot read, are
  one-line InputErrors (exit 3) naming the file and the type.
* Displacement field: a 3-component vector image (``.nii.gz`` ``(X,Y,Z,1,3)`` intent vector, ``.nrrd``,
  ``.mha``) whose vectors are LPS mm on the field's grid, as ANTs writes ``1Warp.nii.gz``.
* Composite: ``.h5``/``.hdf5`` ITK composite files (affine and displacement parts).

A transform *spec* on the command line follows antsApplyTransforms: ``file`` or ``[file,1]`` to use the
inverse of an affine file. A list is in antsApplyTransforms order: a fixed-space point goes through
the first listed transform first (``-t prefix1Warp.nii.gz -t prefix0GenericAffine.mat`` maps x to
A(x + u(x))).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from regcli.errors import GeometryError, InputError, RegcliError, folded
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
    it is missing, unreadable, not one, or of an ITK type that ITK cannot create.

    SimpleITK's ``ReadTransform`` reads the file and then casts it to its own class for the ITK type. That cast
    fails for types SimpleITK has no class for although ITK reads them (FixedCenterOfRotationAffine,
    ScalableAffine, CenteredEuler3D: "Transform is not of type ..."; ComposeScaleSkewVersor3D in SimpleITK 2.5:
    a KeyError). Those are read again without the cast, as a plain ``sitk.Transform`` that maps points as ITK
    does. Any failure is one InputError line, never another exception."""
    import SimpleITK as sitk

    path = check_readable_file(path, "transform")
    _check_parameter_counts(path)
    with _hdf5_diagnostics_dropped(path):
        try:
            return sitk.ReadTransform(str(path))
        except Exception as e:  # noqa: BLE001 - RuntimeError from ITK, KeyError/TypeError from SimpleITK's cast
            error = e
        raw = _read_itk_transform_uncast(path)
    if raw is not None:
        return raw
    raise InputError(_unreadable_transform_message(path, error)) from None


# Parameters each ITK type needs. ITK checks the count for a few types only: for the others, a file with fewer
# parameters makes ITK read past the end of its array (a wrong transform, or a segmentation fault).
_PARAMETER_COUNTS = {
    ("Euler3DTransform", 3): 6, ("CenteredEuler3DTransform", 3): 9, ("VersorRigid3DTransform", 3): 6,
    ("VersorTransform", 3): 3, ("Similarity3DTransform", 3): 7, ("ScaleVersor3DTransform", 3): 9,
    ("ScaleSkewVersor3DTransform", 3): 15, ("ComposeScaleSkewVersor3DTransform", 3): 12,
    ("QuaternionRigidTransform", 3): 7, ("Euler2DTransform", 2): 3, ("Rigid2DTransform", 2): 3,
    ("CenteredRigid2DTransform", 2): 5, ("Similarity2DTransform", 2): 4, ("CenteredSimilarity2DTransform", 2): 6,
}
_MATRIX_OFFSET_TYPES = ("AffineTransform", "MatrixOffsetTransformBase", "FixedCenterOfRotationAffineTransform",
                        "ScalableAffineTransform")


def _needed_parameters(kind: str) -> int | None:
    """How many parameters an ITK transform type name (``Euler3DTransform_double_3_3``) needs; None when unknown
    (or when it depends on the fixed parameters, as for BSpline and displacement field transforms)."""
    m = re.fullmatch(r"(\w+?)_(?:double|float)_([0-9])_([0-9])", kind)
    if not m or m.group(2) != m.group(3):
        return None
    name, d = m.group(1), int(m.group(2))
    if name in _MATRIX_OFFSET_TYPES:
        return d * d + d
    if name == "CenteredAffineTransform":
        return d * d + 2 * d
    if name in ("TranslationTransform", "ScaleTransform", "ScaleLogarithmicTransform"):
        return d
    if name == "IdentityTransform":
        return 0
    return _PARAMETER_COUNTS.get((name, d))


_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _text_parameter_counts(text: str) -> list[tuple[str, int]]:
    """(type, number of parameters) for each ``Parameters:`` line of an ITK text transform file (counting the
    numbers ITK parses: it stops at the first token that is not one, e.g. ``nan``)."""
    out, kind = [], None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            kind = value.strip()
        elif key == "Parameters" and kind:
            n = 0
            for token in value.split():
                if not _NUMBER.fullmatch(token):
                    break
                n += 1
            out.append((kind, n))
    return out


def _mat_parameter_counts(data: bytes) -> list[tuple[str, int]]:
    """(variable name, number of values) for each variable of a MATLAB v4 file (what ITK writes to .mat); stops
    at the first header that does not make sense."""
    import struct

    out: list[tuple[str, int]] = []
    off, endian = 0, None
    sizes = {0: 8, 1: 4, 2: 4, 3: 2, 4: 2, 5: 1}
    while off + 20 <= len(data):
        for e in ((endian,) if endian else ("<", ">")):
            mopt, rows, cols, imagf, namlen = struct.unpack_from(e + "5i", data, off)
            if 0 <= mopt < 2000 and (mopt // 10) % 10 in sizes and rows >= 0 and cols >= 0 and 0 < namlen < 1024:
                endian = e
                break
        else:
            return out
        n = rows * cols
        name = data[off + 20: off + 20 + namlen].split(b"\0")[0].decode("latin-1")
        off += 20 + namlen + n * sizes[(mopt // 10) % 10] * (2 if imagf else 1)
        if off > len(data):
            return out
        out.append((name, n))
    return out


def _h5_parameter_counts(path: Path) -> list[tuple[str, int]]:
    """(type, number of parameters) for each transform of an ITK .h5 file, read with h5py when it is installed
    (it is not a regcli dependency: [] without it)."""
    try:
        import h5py
    except ImportError:
        return []
    out = []
    try:
        with h5py.File(path, "r") as f:
            group = f.get("TransformGroup")
            for key in (group.keys() if group is not None else ()):
                g = group[key]
                if "TransformType" not in g or "TransformParameters" not in g:
                    continue
                kind = g["TransformType"][()]
                kind = kind[0] if getattr(kind, "shape", ()) else kind
                kind = kind.decode("latin-1") if isinstance(kind, bytes) else str(kind)
                out.append((kind, int(g["TransformParameters"].size)))
    except Exception:  # noqa: BLE001 - not readable by h5py: ITK says why
        return []
    return out


def _check_parameter_counts(path: Path) -> None:
    """InputError when a transform in the file has fewer parameters than its ITK type needs (ITK would read past
    them and crash or map points wrongly). Text and .mat files are parsed here; .h5 files when h5py is
    installed."""
    name = str(path).lower()  # ITK picks its reader by the file name's ending: so do we
    counts: list[tuple[str, int]] = []
    try:
        if name.endswith((".h5", ".hdf5")):
            counts = _h5_parameter_counts(path)
        elif name.endswith((".txt", ".tfm")):
            with open(path, "rb") as f:
                counts = _text_parameter_counts(f.read(1 << 26).decode("latin-1"))
        elif name.endswith(".mat"):
            with open(path, "rb") as f:
                counts = _mat_parameter_counts(f.read(1 << 26))
    except OSError:
        return
    for kind, n in counts:
        need = _needed_parameters(kind)
        if need is not None and n < need:
            raise InputError(f"cannot read transform '{path}': its {kind} has {n} parameter(s), ITK's "
                             f"{kind.split('_')[0]} needs {need}: the file is damaged or not written by ITK")


_HDF5_DIAG = re.compile(rb"^HDF5-DIAG: .*\n(?:[ \t].*\n?)*", re.MULTILINE)


@contextlib.contextmanager
def _hdf5_diagnostics_dropped(path: Path):
    """For an .h5/.hdf5 file: the HDF5 library prints its error stack (20+ lines starting ``HDF5-DIAG``) straight
    to file descriptor 2 when a file is damaged; regcli says what is wrong in one line instead. Everything else
    written to stderr meanwhile is passed on."""
    if not str(path).lower().endswith((".h5", ".hdf5")):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            rest = _HDF5_DIAG.sub(b"", sink.read())
            if rest:
                os.write(2, rest)


def _read_itk_transform_uncast(path: Path):
    """The transform in ``path`` as SimpleITK's plain ``Transform`` (no cast to a SimpleITK class), cast to
    ComposeScaleSkewVersor3DTransform when it is one (its matrix, translation and centre then read directly);
    None when ITK cannot read the file."""
    import SimpleITK as sitk

    reader = getattr(getattr(sitk, "_SimpleITK", None), "ReadTransform", None)
    if reader is None:  # pragma: no cover - SimpleITK's SWIG layer renamed
        return None
    try:
        raw = reader(str(path))
        raw.GetDimension()  # a usable object, not a SWIG null
    except Exception:  # noqa: BLE001 - ITK could not read it: the caller explains
        return None
    return _cast_known(raw)


def _cast_known(raw):
    """``raw`` (a plain ``sitk.Transform``) as ComposeScaleSkewVersor3DTransform when it is one, else as it is."""
    import SimpleITK as sitk

    csv_enum = getattr(sitk, "sitkComposeScaleSkewVersor", None)
    if csv_enum is not None and raw.GetDimension() == 3 and raw.GetTransformEnum() == csv_enum:
        try:
            return sitk.ComposeScaleSkewVersor3DTransform(raw)
        except Exception:  # noqa: BLE001 - the plain transform still maps points
            pass
    return raw


_TXT_TYPE = re.compile(rb"^\s*Transform\s*:\s*(\S+)", re.MULTILINE)
_BIN_TYPE = re.compile(rb"([A-Za-z][A-Za-z0-9]*_(?:double|float)_[0-9]_[0-9])")


def declared_itk_types(path: str | os.PathLike) -> list[str]:
    """The ITK transform type names a transform file declares, in file order without repeats: the
    ``Transform:`` lines of a text file (.txt/.tfm), the variable or string names such as
    ``MatrixOffsetTransformBase_double_3_3`` in a binary one (.mat, .h5). Best effort: [] when none is found."""
    found: list[str] = []
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            if head.lstrip().startswith(b"#Insight Transform File") or _TXT_TYPE.search(head):
                found = [m.decode("latin-1") for m in _TXT_TYPE.findall(head + f.read())]
            else:
                tail, chunk = b"", head
                while chunk:
                    found += [m.decode("latin-1") for m in _BIN_TYPE.findall(tail + chunk)]
                    tail, chunk = chunk[-64:], f.read(1 << 24)
    except OSError:
        return []
    return [t for i, t in enumerate(found) if t not in found[:i]]


_ITK_MESSAGE = re.compile(r"(?:ITK ERROR: [^:]*?\(0x[0-9a-fA-F]+\): |sitk::ERROR: )(.*)")


def _unreadable_transform_message(path: Path, error: BaseException) -> str:
    """One line saying why ITK could not read ``path``: an ITK type that ITK's transform factory cannot create
    (``unsupported ITK transform type '<type>'``), a file of a known type that ITK refused (with ITK's reason),
    or not an ITK transform file at all."""
    text = folded(error)
    types = declared_itk_types(path)
    m = re.search(r'Could not create an instance of "?([^" ]+)"?', text)
    if m:
        return (f"cannot read transform '{path}': unsupported ITK transform type '{m.group(1)}' (ITK cannot create "
                "it; regcli reads ITK's linear transforms (affine, matrix-offset, Euler, versor, similarity, "
                "translation, ...) and displacement fields)")
    if types:
        reason = _ITK_MESSAGE.search(text)
        detail = folded(reason.group(1) if reason else f"{type(error).__name__}: {text}", 200)
        return f"cannot read transform '{path}': ITK could not read it (it declares {', '.join(types[:3])}): {detail}"
    return f"cannot read transform '{path}': not an ITK transform file (.mat, .txt, .tfm, .h5)"


_RTTI = re.compile(r"^( *)RTTI typeinfo:\s*itk::(\w+)")
MAX_COMPOSITE_DEPTH = 32


def _itk_classes(tx) -> tuple[str | None, list[str]]:
    """(ITK class of ``tx``, ITK classes of its direct parts when it is a composite), read from ITK's print of the
    object (the ``RTTI typeinfo`` lines; a composite's parts are printed two spaces deeper); (None, []) when the
    print has none."""
    try:
        text = str(tx)
    except Exception:  # noqa: BLE001
        return None, []
    own, indent, kids = None, 0, []
    for line in text.splitlines():
        m = _RTTI.match(line)
        if not m:
            continue
        if own is None:
            own, indent = m.group(2), len(m.group(1))
        elif len(m.group(1)) == indent + 2:
            kids.append(m.group(2))
    return own, kids


def itk_named_parts(tx, path: str | os.PathLike | None = None, _depth: int = 0) -> list[tuple[str, object]]:
    """``(ITK type, transform)`` for each part of a SimpleITK transform in the order a point meets them, composites
    flattened (ITK applies a composite's last added transform first; regcli's and antsApplyTransforms' lists run
    in application order). The type is ITK's class name (``AffineTransform``, ``MatrixOffsetTransformBase``, ...).

    SimpleITK hands an ITK transform it has no class for (``MatrixOffsetTransformBase``, what c3d_affine_tool and
    ITK-SNAP write) back as a one-part CompositeTransform whose part is again such a composite, without end: such
    a part is returned as it is (it maps points and has the ITK parameters) rather than opened."""
    import SimpleITK as sitk

    own, kids = _itk_classes(tx)
    if tx.GetName() != "CompositeTransform":
        return [(own or tx.GetName(), tx)]
    if _depth >= MAX_COMPOSITE_DEPTH:
        raise InputError(f"cannot use transform '{path or 'transform'}': composite transforms nested more than "
                         f"{MAX_COMPOSITE_DEPTH} deep")
    comp = sitk.CompositeTransform(tx)
    n = comp.GetNumberOfTransforms()
    out = []
    for i in reversed(range(n)):
        sub = _nth_transform(comp, i)
        cls = kids[i] if len(kids) == n else None
        if sub.GetName() == "CompositeTransform" and cls is not None and cls != "CompositeTransform":
            out.append((cls, sub))  # SimpleITK's wrapper around an ITK type it has no class for
        else:
            out.extend(itk_named_parts(sub, path, _depth + 1))
    return out


def _nth_transform(comp, i: int):
    """Part ``i`` of a SimpleITK CompositeTransform; when SimpleITK cannot cast it to one of its classes (as in
    :func:`read_itk_transform`), the plain ``sitk.Transform``."""
    import SimpleITK as sitk

    try:
        return comp.GetNthTransform(i)
    except Exception:  # noqa: BLE001 - RuntimeError / KeyError / TypeError from SimpleITK's cast
        getter = getattr(getattr(sitk, "_SimpleITK", None), "CompositeTransform_GetNthTransform", None)
        if getter is None:  # pragma: no cover - SimpleITK's SWIG layer renamed
            raise
        return _cast_known(getter(comp, i))


def itk_parts(tx, path: str | os.PathLike | None = None) -> list:
    """The transforms of a SimpleITK transform in the order a point meets them (see :func:`itk_named_parts`)."""
    return [t for _, t in itk_named_parts(tx, path)]


def _from_sitk_transform(tx, path: Path) -> list:
    """regcli transforms for the (flattened) parts of a SimpleITK transform, in application order."""
    return [part for itk_type, t in itk_named_parts(tx, path) for part in _from_sitk_part(t, path, itk_type)]


def _from_sitk_part(tx, path: Path, itk_type: str | None = None) -> list:
    import SimpleITK as sitk

    name = itk_type or tx.GetName()
    if tx.GetName() == "DisplacementFieldTransform":
        field_img = sitk.DisplacementFieldTransform(tx).GetDisplacementField()
        return [DisplacementField.from_sitk(field_img)]
    if not tx.IsLinear():  # e.g. an ITK BSplineTransform: no affine stands for it
        raise InputError(f"cannot use transform '{path}': unsupported ITK transform type '{name}' (not linear); "
                         "regcli reads linear transforms and displacement fields (convert it to a displacement "
                         "field image, e.g. with SimpleITK's TransformToDisplacementField)")
    return [linear_itk_affine(tx, path, name)]


def _affine_maps_like(a: AffineTransform, tx, probes) -> bool:
    """Whether ``a`` maps the ``probes`` (world points) as ``tx.TransformPoint`` does, to 1e-7 relative."""
    import numpy as np

    for p in probes:
        want = np.asarray(tx.TransformPoint(tuple(float(v) for v in p)), dtype=np.float64)
        got = a.matrix[:3, :3] @ p + a.matrix[:3, 3]
        if not (np.all(np.isfinite(want)) and np.all(np.abs(got - want) <= 1e-7 * (1.0 + np.abs(want).max()))):
            return False
    return True


def linear_itk_affine(tx, path: str | os.PathLike, itk_type: str | None = None) -> AffineTransform:
    """The 4x4 affine of a linear 3D SimpleITK transform of any ITK type, checked against its ``TransformPoint``.

    Tried in turn, the first that maps 9 points spread 100 mm around the centre as ``TransformPoint`` does
    wins: the matrix, translation and centre of SimpleITK's class (AffineTransform, Euler3D, versors, ...);
    the matrix-offset parameter layout (9 matrix entries row by row, 3 translation; fixed parameters: the
    centre), which ITK's MatrixOffsetTransformBase, FixedCenterOfRotationAffine and ScalableAffine use; and the
    affine map measured with ``TransformPoint`` (exact for a linear transform). InputError when none does
    (not an affine map, or not finite)."""
    import numpy as np
    import SimpleITK as sitk

    name = itk_type or tx.GetName()
    if tx.GetDimension() != 3:
        raise InputError(f"cannot use transform '{path}': its {name} is {tx.GetDimension()}D, 3D is required")
    try:
        params = np.asarray(tx.GetParameters(), dtype=np.float64)
        fixed = np.asarray(tx.GetFixedParameters(), dtype=np.float64)
    except Exception:  # noqa: BLE001
        params, fixed = np.zeros(0), np.zeros(0)
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fixed))):
        raise InputError(f"cannot use transform '{path}': its {name} has NaN or infinite parameters")
    centre = fixed[:3] if fixed.size in (3, 4) else np.zeros(3)
    probes = [centre] + [centre + 100.0 * np.array(s, dtype=np.float64)
                         for s in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1),
                                   (-1, -1, -1), (-1, 1, 1), (1, -1, 1), (1, 1, -1))]

    def candidates():
        if hasattr(tx, "GetMatrix"):  # SimpleITK's own classes: exact
            yield lambda: AffineTransform.from_sitk(tx)
        if params.size == 12 and fixed.size == 3:  # the MatrixOffsetTransformBase layout
            yield lambda: AffineTransform.from_linear(params[:9].reshape(3, 3), params[9:], fixed)

        def measured():
            t = sitk.Transform(tx) if tx.GetName() == "CompositeTransform" else tx
            h = 64.0  # a power of two: the division is exact
            at_c = np.asarray(t.TransformPoint(tuple(float(v) for v in centre)), dtype=np.float64)
            cols = [(np.asarray(t.TransformPoint(tuple(float(v) for v in centre + h * e)), dtype=np.float64) - at_c)
                    / h for e in np.eye(3)]
            A = np.stack(cols, axis=1)
            return AffineTransform.from_linear(A, at_c - centre, centre)
        yield measured

    for make in candidates():
        try:
            a = make()
        except Exception:  # noqa: BLE001 - try the next way
            continue
        if np.all(np.isfinite(a.matrix)) and _affine_maps_like(a, tx, probes):
            return a
    raise InputError(f"cannot use transform '{path}': unsupported ITK transform type '{name}' (it does not map "
                     "points as one affine map; regcli reads linear transforms and displacement fields)")


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
        try:
            return [DisplacementField.from_sitk(img)]
        except GeometryError as e:  # a sheared or degenerate header: name the file
            raise GeometryError(f"displacement field '{path}': {e}") from None
    tx = read_itk_transform(path)
    try:
        if tx.GetDimension() != 3:
            raise InputError(f"cannot use transform '{path}': it is {tx.GetDimension()}D, 3D is required")
        parts = _from_sitk_transform(tx, path)
    except RegcliError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line naming it (never a traceback)
        raise InputError(f"cannot use transform '{path}': {type(e).__name__}: {folded(e, 200)}") from None
    if invert:
        if not all(isinstance(p, AffineTransform) for p in parts):
            raise InputError(f"cannot invert '{path}' with [file,1]: only affine transforms can be inverted")
        import numpy as np

        if any(abs(np.linalg.det(p.linear)) < 1e-12 * max(1.0, np.abs(p.linear).max()) ** 3 for p in parts):
            raise InputError(f"cannot invert '{path}' with [file,1]: its matrix is singular")
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
