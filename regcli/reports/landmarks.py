"""Landmark (point) CSV files, 3D Slicer ``.fcsv`` markups files, and target registration error.

File format: a CSV with a header row naming (at least) the columns ``x``, ``y``, ``z`` (case-insensitive),
world coordinates in millimetres. By default the coordinates are ITK/DICOM **LPS** (what ANTs'
``antsApplyTransformsToPoints`` and SimpleITK use); ``frame="ras"`` reads/writes nibabel/scanner RAS
coordinates (x and y negated). Other columns (``id``, ``label``, ...) are kept as strings and written back
unchanged. Empty lines and lines starting with ``#`` are skipped.

3D Slicer markups fiducial files (``.fcsv``, or any file whose first line is ``# Markups fiducial file version =
...``) are read too: the header is the ``# columns = id,x,y,z,...`` comment line (Slicer's standard columns when
it is absent), the coordinates are in the file's ``# CoordinateSystem`` (``RAS``, ``LPS``, or the older codes
``0`` = RAS and ``1`` = LPS; RAS when the line is absent), converted to LPS, whatever ``frame`` says. Points are
named by their ``label`` column (else ``id``) for pairing (:func:`pair_points`). Only reading: points are
written as CSV.

Transform convention (ITK): a registration's transform maps a **fixed** world point to the corresponding
**moving** world point. So landmarks of the fixed image are mapped *forwards* to compare with the moving
landmarks: ``TRE_n = |T(x_f,n) - x_m,n|``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from regcli.errors import InputError

__all__ = ["PointSet", "read_points_csv", "read_points", "write_points_csv", "points_csv_text", "tre", "pair_points"]

_FRAMES = ("lps", "ras")
_LPS_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass
class PointSet:
    """Points read from (or to be written to) a CSV.

    Attributes:
        points: (N, 3) float64 world coordinates, **LPS mm** (whatever the file's frame).
        columns: the header, in file order (contains ``x``, ``y``, ``z`` in the file's spelling).
        extra: per point, ``{column: text}`` for every column other than x, y, z (passed through).
        path: the file it came from ("" when built in memory).
    """

    points: np.ndarray
    columns: list[str] = field(default_factory=lambda: ["x", "y", "z"])
    extra: list[dict[str, str]] = field(default_factory=list)
    path: str = ""
    #: the column that names the points for pairing (:meth:`ids`); None: an ``id`` column, if any
    name_column: Optional[str] = None
    #: the names are display names (a Slicer ``.fcsv``'s labels, numbered per markups node): when the two files'
    #: names differ, :func:`pair_points` pairs by position (with a warning) instead of refusing
    loose_names: bool = False

    def __post_init__(self) -> None:
        pts = self.points.detach().cpu().numpy() if isinstance(self.points, torch.Tensor) else self.points
        self.points = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        if not self.extra:
            self.extra = [{} for _ in range(len(self.points))]
        if len(self.extra) != len(self.points):
            raise ValueError(f"{len(self.extra)} extra rows for {len(self.points)} points")

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def ids(self) -> Optional[list[str]]:
        """Values of the naming column (``name_column``; by default an ``id`` column, case-insensitive), or None
        when the file has none."""
        key = self.name_column if self.name_column is not None else \
            next((c for c in self.columns if c.strip().lower() == "id"), None)
        return None if key is None else [row.get(key, "") for row in self.extra]

    def with_points(self, points) -> "PointSet":
        """Same columns and extra values, new coordinates (N, 3) LPS mm (e.g. transformed points)."""
        return PointSet(points, list(self.columns), [dict(r) for r in self.extra], self.path, self.name_column,
                        self.loose_names)

    def tensor(self, device=None) -> torch.Tensor:
        """(N, 3) float64 LPS mm tensor."""
        return torch.as_tensor(self.points, dtype=torch.float64, device=device)


def _check_frame(frame: str) -> str:
    f = str(frame).lower()
    if f not in _FRAMES:
        raise InputError(f"unknown point frame '{frame}': use 'lps' (ITK/ANTs) or 'ras' (nibabel/scanner)")
    return f


#: Slicer's markups fiducial columns (4.11 and later), the header of an ``.fcsv`` without a ``# columns`` line
FCSV_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID")
#: ``# CoordinateSystem = ...`` of an ``.fcsv``: Slicer's names and its older numeric codes
_FCSV_FRAMES = {"ras": "ras", "lps": "lps", "0": "ras", "1": "lps"}


def is_fcsv(path: str | os.PathLike, text: str = "") -> bool:
    """Whether ``path`` (with its ``text``) is a 3D Slicer markups fiducial file: an ``.fcsv`` name, or a first
    line ``# Markups fiducial file version = ...``."""
    return Path(path).suffix.lower() == ".fcsv" or text.lstrip().lower().startswith("# markups fiducial file")


def _fcsv_header(text: str, path: Path, role: str) -> tuple[Optional[list[str]], int, str]:
    """An ``.fcsv``'s ``# columns =`` header (None without one) and its line, and its coordinate system ("ras" or
    "lps") from ``# CoordinateSystem =`` (RAS without one, as Slicer reads it)."""
    columns, columns_line, frame = None, 0, "ras"
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped.startswith("#"):
            if stripped:
                break  # the comments lead the file
            continue
        key, eq, value = stripped.lstrip("#").partition("=")
        if not eq:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "columns":
            columns, columns_line = next(csv.reader([value]), []), line_no
        elif key == "coordinatesystem":
            if value.lower() not in _FCSV_FRAMES:
                raise InputError(f"{role} '{path}' line {line_no}: CoordinateSystem '{value}' is not one regcli "
                                 f"reads: RAS or LPS (or the codes 0 = RAS, 1 = LPS)")
            frame = _FCSV_FRAMES[value.lower()]
    return columns, columns_line, frame


def read_points_csv(path: str | os.PathLike, frame: str = "lps", role: str = "points") -> PointSet:
    """Read a point CSV, or a 3D Slicer ``.fcsv`` markups file (see the module doc).

    Args:
        path: CSV file with a header that names x, y, z (any case; other columns are kept), or an ``.fcsv``.
        frame: "lps" (file holds ITK LPS mm) or "ras" (file holds RAS mm; x and y are negated on read). An
            ``.fcsv`` says its own (``# CoordinateSystem``), which is used instead.
        role: how the file is named in error messages ("fixed landmarks", ...).

    Returns:
        PointSet with ``points`` (N, 3) float64 in LPS mm; from an ``.fcsv``, named by its ``label`` column
        (else ``id``).

    Raises:
        InputError: missing/unreadable file, no header, missing x/y/z columns, a row with the wrong
            number of fields or a non-numeric/non-finite coordinate (the message names file and line),
            an ``.fcsv`` coordinate system other than RAS/LPS, or no points at all.
    """
    frame = _check_frame(frame)
    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read {role} '{path}': file does not exist")
    if path.is_dir():
        raise InputError(f"cannot read {role} '{path}': is a directory, not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"cannot read {role} '{path}': not a text (UTF-8) CSV file") from None
    except OSError as e:
        raise InputError(f"cannot read {role} '{path}': {e.strerror or e}") from None

    fcsv = is_fcsv(path, text)
    fcsv_columns, columns_line = None, 0
    if fcsv:
        fcsv_columns, columns_line, frame = _fcsv_header(text, path, role)
    header: Optional[list[str]] = None
    cols: dict[str, int] = {}
    pts: list[list[float]] = []
    extra: list[dict[str, str]] = []

    def set_header(names: list[str], line: int, what: str) -> None:
        nonlocal header
        header = [c.strip() for c in names]
        lower = [c.lower() for c in header]
        missing = [k for k in ("x", "y", "z") if k not in lower]
        if missing:
            numbers = sum(_is_number(c) for c in header) >= 3 and not fcsv
            raise InputError(
                f"{role} '{path}' line {line}: {what} {header} lacks column(s) {', '.join(missing)}; "
                + ("a 3D Slicer .fcsv names them in its '# columns = id,x,y,z,...' line" if fcsv else
                   "a point CSV needs a header row with columns x,y,z (world mm)"
                   + (" (this row holds numbers: is the header missing?)" if numbers else ""))
            )
        for k in ("x", "y", "z"):
            if lower.count(k) > 1:
                raise InputError(f"{role} '{path}' line {line}: column '{k}' appears twice in the {what}")
            cols[k] = lower.index(k)

    reader = csv.reader(io.StringIO(text))
    try:
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
                continue
            if header is None and fcsv:
                if fcsv_columns is not None:
                    set_header(fcsv_columns, columns_line, "'# columns' header")
                else:  # an old file without the line: Slicer's standard columns, as many as the rows have
                    n = len(row)
                    set_header(list(FCSV_COLUMNS[:n]) + [f"column{i + 1}" for i in range(len(FCSV_COLUMNS), n)],
                               line, "standard .fcsv header")
            if header is None:
                set_header(row, line, "header")
                continue
            if len(row) != len(header):
                raise InputError(
                    f"{role} '{path}' line {line}: {len(row)} fields, but the header has {len(header)}"
                )
            p = []
            for k in ("x", "y", "z"):
                v = row[cols[k]].strip()
                try:
                    val = float(v)
                except ValueError:
                    raise InputError(f"{role} '{path}' line {line}: {k} = '{v}' is not a number") from None
                if not math.isfinite(val):
                    raise InputError(f"{role} '{path}' line {line}: {k} = '{v}' is not finite")
                p.append(val)
            pts.append(p)
            extra.append({h: row[i] for i, h in enumerate(header) if i not in cols.values()})
    except csv.Error as e:
        raise InputError(f"{role} '{path}' line {reader.line_num}: malformed CSV ({e})") from None
    if header is None and not (fcsv and fcsv_columns is not None):
        raise InputError(f"{role} '{path}' is empty: expected a header row with columns x,y,z and one row per point")
    if not pts:
        raise InputError(f"{role} '{path}' has a header but no points")
    arr = np.asarray(pts, dtype=np.float64)
    if frame == "ras":
        arr = arr * _LPS_RAS
    name_column = None
    if fcsv:  # Slicer's label names a point; its id is an internal node id (or a serial number)
        lower = {c.lower(): c for c in header}
        labels = [r.get(lower["label"], "").strip() for r in extra] if "label" in lower else []
        usable = bool(labels) and all(labels) and len(set(labels)) == len(labels)
        name_column = lower["label"] if usable else lower.get("id")
    return PointSet(arr, header, extra, str(path), name_column, loose_names=fcsv)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


read_points = read_points_csv  # short alias


def points_csv_text(points: PointSet, frame: str = "lps", precision: int = 6) -> str:
    """CSV text of a point set (same columns as read, x/y/z replaced), coordinates in ``frame`` mm."""
    frame = _check_frame(frame)
    pts = np.asarray(points.points, dtype=np.float64)
    if frame == "ras":
        pts = pts * _LPS_RAS
    header = list(points.columns)
    lower = [c.lower() for c in header]
    for k in ("x", "y", "z"):
        if k not in lower:
            header.append(k)
            lower.append(k)
    idx = {k: lower.index(k) for k in ("x", "y", "z")}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for p, ex in zip(pts, points.extra):
        row = [ex.get(h, "") for h in header]
        for a, k in enumerate(("x", "y", "z")):
            v = float(p[a])
            row[idx[k]] = f"{v:.{precision}f}".rstrip("0").rstrip(".") if math.isfinite(v) else "nan"
            if row[idx[k]] in ("-0", ""):
                row[idx[k]] = "0"
        w.writerow(row)
    return buf.getvalue()


def write_points_csv(path: str | os.PathLike, points: PointSet, frame: str = "lps", precision: int = 6) -> None:
    """Write a point CSV atomically (temp file + rename); extra columns are written back unchanged."""
    from regcli.io.atomic import atomic_write_text

    atomic_write_text(path, points_csv_text(points, frame, precision))


def _as_points(p) -> np.ndarray:
    if isinstance(p, PointSet):
        return p.points
    if isinstance(p, torch.Tensor):
        p = p.detach().cpu().numpy()
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"points must be (N, 3), got {arr.shape}")
    return arr


_WARNED: set[str] = set()


def pair_points(fixed, moving) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
    """Corresponding (N, 3) LPS arrays of two point sets.

    Rows pair by position, unless both sets have an ``id`` column with the same set of (unique) ids in a
    different order: then they pair by id (in the fixed file's order).

    Raises:
        InputError: different numbers of points, or ``id`` columns that do not match.
    """
    pf, pm = _as_points(fixed), _as_points(moving)
    ids_f = fixed.ids() if isinstance(fixed, PointSet) else None
    ids_m = moving.ids() if isinstance(moving, PointSet) else None
    name_f = getattr(fixed, "path", "") or "fixed points"
    name_m = getattr(moving, "path", "") or "moving points"
    if ids_f is not None and ids_m is not None:
        if len(set(ids_f)) == len(ids_f) and len(set(ids_m)) == len(ids_m):
            loose = getattr(fixed, "loose_names", False) or getattr(moving, "loose_names", False)
            if set(ids_f) != set(ids_m) and loose and len(pf) == len(pm):
                message = (f"the points of '{name_f}' and '{name_m}' are named differently (e.g. '{ids_f[0]}' and "
                           f"'{ids_m[0]}': Slicer names them by markups node): paired by position")
                if message not in _WARNED:  # once per process: the files are checked before they are scored
                    _WARNED.add(message)
                    logging.getLogger("regcli").warning(message)
                return pf, pm, None
            if set(ids_f) != set(ids_m):
                only_f = sorted(set(ids_f) - set(ids_m))[:5]
                only_m = sorted(set(ids_m) - set(ids_f))[:5]
                raise InputError(
                    f"landmark ids differ between '{name_f}' and '{name_m}': only in fixed {only_f}, "
                    f"only in moving {only_m}"
                )
            pos = {k: i for i, k in enumerate(ids_m)}
            return pf, pm[[pos[k] for k in ids_f]], ids_f
    if len(pf) != len(pm):
        raise InputError(f"'{name_f}' has {len(pf)} points but '{name_m}' has {len(pm)}; landmarks must correspond")
    return pf, pm, ids_f


def _summary(d: np.ndarray, prefix: str) -> dict:
    return {
        f"{prefix}_mean_mm": float(d.mean()),
        f"{prefix}_median_mm": float(np.median(d)),
        f"{prefix}_std_mm": float(d.std()),
        f"{prefix}_max_mm": float(d.max()),
    }


def tre(fixed_points, moving_points, transform=None) -> dict:
    """Target registration error of corresponding landmarks.

    Args:
        fixed_points: PointSet or (N, 3) array/tensor, LPS mm, landmarks in the fixed image.
        moving_points: the corresponding landmarks in the moving image (same form).
        transform: object with ``map_points`` taking fixed world points to moving world points (ITK
            convention: an AffineTransform, DisplacementField or CompositeTransform as written by
            ``register``); None = identity.

    Returns:
        ``{"n_landmarks", "tre_mean_mm", "tre_median_mm", "tre_std_mm", "tre_max_mm",
        "tre_per_landmark_mm", "initial_mean_mm", "initial_median_mm", "initial_std_mm", "initial_max_mm",
        "initial_per_landmark_mm", "ids"}`` with ``TRE_n = |T(x_f) - x_m|`` and the initial distances
        ``|x_f - x_m|`` in mm (``ids`` is None without an id column).
    """
    pf, pm, ids = pair_points(fixed_points, moving_points)
    if len(pf) == 0:
        raise InputError("no landmarks to evaluate")
    if transform is None:
        mapped = pf
    else:
        mapped = transform.map_points(torch.as_tensor(pf, dtype=torch.float64)).detach().cpu().numpy()
    d = np.linalg.norm(mapped - pm, axis=1)
    d0 = np.linalg.norm(pf - pm, axis=1)
    out: dict = {"n_landmarks": int(d.size)}
    out.update(_summary(d, "tre"))
    out["tre_per_landmark_mm"] = [float(v) for v in d]
    out.update(_summary(d0, "initial"))
    out["initial_per_landmark_mm"] = [float(v) for v in d0]
    out["ids"] = ids
    return out


def points_from_sequence(points: Sequence[Sequence[float]]) -> PointSet:
    """A PointSet from (N, 3) LPS mm coordinates with the default x,y,z header."""
    return PointSet(np.asarray(points, dtype=np.float64))
