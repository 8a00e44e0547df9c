"""``regcli info IMAGE``: the geometry and content of an image file (RELIABILITY C3)."""

from pathlib import Path
from typing import Annotated

from regcli.cli.common import JsonOpt, QuietOpt, VerboseOpt, examples, input_file_argument

EXAMPLES = examples(
    "regcli info brain.nii.gz",
    "regcli info brain.nii.gz --json | jq .spacing",
    "regcli info case01_1Warp.nii.gz          # a displacement field: 3 components",
    "regcli info case01_0GenericAffine.mat    # a transform: matrix, offset (LPS mm), determinant",
)

_NIFTI_KEYS = ("qform_code", "qform_code_name", "sform_code", "sform_code_name", "scl_slope", "scl_inter",
               "intent_code", "intent_name", "descrip", "xyzt_units")
_INT_KEYS = ("qform_code", "sform_code", "intent_code", "xyzt_units")


def image_info(path: Path) -> dict:
    """Geometry and content of an image file as a JSON-ready dict.

    Keys: ``path``, ``kind`` ("image"), ``dimension``, ``size`` (x, y, z[, t]), ``spacing`` (mm), ``origin`` (LPS mm),
    ``direction`` (row-major, columns = index axes in LPS), ``axcodes`` (letters the index axes point to,
    nibabel spelling, e.g. ``LPS``/``RAS``), ``ras_affine`` (4x4 index -> RAS mm, NIfTI/nibabel convention),
    ``pixel_type`` (SimpleITK name), ``dtype`` (numpy name), ``components``, ``range`` (min, max over all
    voxels and components), ``nan_count`` (with ``nan_read_as_zero`` when they are in a float NIfTI file, which
    SimpleITK reads as 0), for 3D and 4D images ``world_extent_mm`` (the size in mm along LPS x, y, z of the
    box that holds the whole image, voxel corners included: max - min over its 8 corners, at continuous index
    -0.5 and size - 0.5; the same for any re-oriented copy of the image) and ``index_axis_extent_mm`` (size x
    spacing along each index axis i, j, k: the field of view in the voxel layout), and for NIfTI files ``nifti``
    with the header codes that SimpleITK exposes (``qform_code``, ``sform_code``, ``scl_slope``, ``intent_code``,
    ...).
    """
    import numpy as np
    import SimpleITK as sitk

    from regcli.io.images import nonfinite_voxels, read_sitk
    from regcli.spaces.grid import axcodes_of

    img = read_sitk(path, "image")
    dim = img.GetDimension()
    arr = sitk.GetArrayViewFromImage(img)
    finite = np.isfinite(arr) if np.issubdtype(arr.dtype, np.floating) else None
    nan_count = int(arr.size - finite.sum()) if finite is not None else 0
    vals = arr[finite] if finite is not None and nan_count else arr
    # SimpleITK 2.x reads NaN/Inf in a float NIfTI as 0: count them in the file itself
    on_disk = nonfinite_voxels(arr, path) if finite is not None and not nan_count else None
    if on_disk is not None:
        nan_count = on_disk[0]
    out = {
        "path": str(path),
        "kind": "image",
        "dimension": dim,
        "size": list(img.GetSize()),
        "spacing": list(img.GetSpacing()),
        "origin": list(img.GetOrigin()),
        "direction": [float(v) for v in img.GetDirection()],
        "axcodes": axcodes_of(img.GetDirection()),
        "pixel_type": img.GetPixelIDTypeAsString(),
        "dtype": str(arr.dtype),
        "components": img.GetNumberOfComponentsPerPixel(),
        "range": [float(vals.min()), float(vals.max())] if vals.size else [None, None],
        "nan_count": nan_count,
    }
    if on_disk is not None:
        out["nan_read_as_zero"] = True  # the range above counts them as 0, as every regcli command reads them
    if dim >= 3:
        index_to_lps = np.eye(4)
        d3 = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
        index_to_lps[:3, :3] = d3 * np.asarray(img.GetSpacing()[:3])[None, :]
        index_to_lps[:3, 3] = img.GetOrigin()[:3]
        out["ras_affine"] = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ index_to_lps).tolist()
        # the voxel-corner bounding box in LPS: the 8 corners at continuous index -0.5 and size - 0.5
        size3 = np.asarray(img.GetSize()[:3], dtype=np.float64)
        corners = np.array([[-0.5 + b * n for b, n in zip(bits, size3)] for bits in np.ndindex(2, 2, 2)])
        world = corners @ index_to_lps[:3, :3].T + index_to_lps[:3, 3]
        out["world_extent_mm"] = (world.max(axis=0) - world.min(axis=0)).tolist()
        out["index_axis_extent_mm"] = [float(n * s) for n, s in zip(img.GetSize()[:3], img.GetSpacing()[:3])]
    keys = set(img.GetMetaDataKeys())
    if "qform_code" in keys or "sform_code" in keys:
        nifti = {}
        for k in _NIFTI_KEYS:
            if k not in keys:
                continue
            v = img.GetMetaData(k).strip()
            cast = int if k in _INT_KEYS else (float if k.startswith("scl_") else str)
            try:
                nifti[k] = cast(v)
            except ValueError:
                nifti[k] = v
        if "ITK_sform_corrected" in keys:
            nifti["itk_sform_corrected"] = img.GetMetaData("ITK_sform_corrected").strip()
        out["nifti"] = nifti
    return out


TRANSFORM_EXTENSIONS = (".mat", ".txt", ".tfm", ".h5", ".hdf5")


def transform_info(path: Path) -> dict:
    """What an ITK transform file holds, as a JSON-ready dict: ``path``, ``kind: "transform"`` and ``transforms``,
    one entry per transform in the order a point meets them (a composite's last-added first, as regcli and
    antsApplyTransforms apply them): ``type`` (ITK class name, e.g. ``AffineTransform``,
    ``MatrixOffsetTransformBase``), ``linear``, and for linear ones ``matrix`` (3x3,
    row-major), ``offset`` (mm: x -> matrix @ x + offset, LPS), ``center`` and ``determinant``; for a
    displacement field its ``size`` and ``spacing``; otherwise the parameter count."""
    import numpy as np
    import SimpleITK as sitk

    from regcli.errors import InputError, RegcliError, folded
    from regcli.io.transforms import itk_named_parts, linear_itk_affine, read_itk_transform

    tx = read_itk_transform(path)
    parts = []
    try:
        for name, t in itk_named_parts(tx, path):
            entry: dict = {"type": name, "dimension": t.GetDimension(), "linear": bool(t.IsLinear())}
            if t.GetName() == "DisplacementFieldTransform":
                field = sitk.DisplacementFieldTransform(t).GetDisplacementField()
                entry.update(size=list(field.GetSize()), spacing=list(field.GetSpacing()),
                             origin=list(field.GetOrigin()))
            elif entry["linear"] and t.GetDimension() == 3:
                a = linear_itk_affine(t, path, name)
                entry.update(matrix=a.linear.tolist(), offset=a.offset.tolist(), center=[float(c) for c in a.center],
                             determinant=float(np.linalg.det(a.linear)))
            else:
                entry["parameters"] = len(t.GetParameters())
            parts.append(entry)
    except RegcliError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line naming it (never a traceback)
        raise InputError(f"cannot describe transform '{path}': {type(e).__name__}: {folded(e, 200)}") from None
    return {"path": str(Path(path)), "kind": "transform", "transforms": parts}


def _transform_table(data: dict):
    from rich.table import Table

    from regcli.cli.common import fmt_float

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("file", data["path"])
    for k, part in enumerate(data["transforms"], 1):
        t.add_row(f"transform {k}", part["type"] + ("" if part["linear"] else " (not linear)"))
        if "matrix" in part:
            rows = ("(" + ", ".join(fmt_float(v, 6) for v in row) + ")" for row in part["matrix"])
            t.add_row("  matrix", "\n".join(rows))
            t.add_row("  offset (mm)", "(" + ", ".join(fmt_float(v, 4) for v in part["offset"]) + ")")
            t.add_row("  determinant", fmt_float(part["determinant"], 6))
        elif "size" in part:
            t.add_row("  field", " x ".join(map(str, part["size"])) + " at " +
                      " x ".join(fmt_float(v, 4) for v in part["spacing"]) + " mm")
        else:
            t.add_row("  parameters", str(part["parameters"]))
    return t


def info(
    image: Annotated[Path, input_file_argument("Image file (.nii, .nii.gz, .nrrd, .mha, ...), or an ITK transform "
                                               "file (.mat, .txt, .tfm, .h5).", "FILE")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Show size, spacing, origin, direction, orientation codes, pixel type and intensity range.

    World coordinates are ITK LPS millimetres (what SimpleITK, ITK-SNAP and ANTs report); axcodes name
    the direction each index axis points to (e.g. RAS: +i to the Right). For NIfTI files the qform/sform
    codes are shown as SimpleITK reads them.
    """
    from rich.table import Table

    from regcli.cli.common import Ui, fmt_float

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    if image.name.lower().endswith(TRANSFORM_EXTENSIONS):
        data = transform_info(image)
        ui.result(data, _transform_table(data))
        return
    data = image_info(image)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()

    def vec(v, digits=4):
        return "(" + ", ".join(fmt_float(x, digits) for x in v) + ")"

    t.add_row("file", str(image))
    t.add_row("size", " x ".join(str(s) for s in data["size"]))
    t.add_row("spacing (mm)", vec(data["spacing"]))
    t.add_row("origin (LPS mm)", vec(data["origin"]))
    n = data["dimension"]
    rows = [data["direction"][i * n:(i + 1) * n] for i in range(n)]
    t.add_row("direction", "\n".join(vec(r) for r in rows))
    t.add_row("axcodes", data["axcodes"])
    t.add_row("pixel type", f"{data['pixel_type']} ({data['dtype']}), {data['components']} component(s)")
    t.add_row("range", f"[{fmt_float(data['range'][0], 4)}, {fmt_float(data['range'][1], 4)}]"
              + (f", {data['nan_count']} NaN/Inf" if data["nan_count"] else "")
              + (" in the file (SimpleITK reads them as 0)" if data.get("nan_read_as_zero") else ""))
    if "nifti" in data:
        nf = data["nifti"]
        t.add_row("qform_code", f"{nf.get('qform_code', '-')} ({nf.get('qform_code_name', '')})")
        t.add_row("sform_code", f"{nf.get('sform_code', '-')} ({nf.get('sform_code_name', '')})")
        if nf.get("scl_slope") not in (None, 0.0, 1.0) or nf.get("scl_inter") not in (None, 0.0):
            t.add_row("scaling", f"slope {nf.get('scl_slope')}, inter {nf.get('scl_inter')}")
        if str(nf.get("intent_code", "0")) not in ("0", ""):
            t.add_row("intent", f"{nf.get('intent_code')} {nf.get('intent_name', '')}".strip())
    ui.result(data, t)
