"""``regcli apply``: resample an image, or map a point set, through a transform list (antsApplyTransforms).

Transform lists are written as on an antsApplyTransforms command line: ``-t prefix1Warp.nii.gz -t
prefix0GenericAffine.mat``; ``[file,1]`` uses the inverse of an affine file; ``identity`` is allowed.
A fixed-space (reference) point meets the *first* listed transform first, so the list above maps a fixed
point ``x`` to the moving point ``Affine(x + u(x))`` (see :class:`regcli.transforms.CompositeTransform`).

Images (pull-back): every reference voxel centre ``x`` gets ``input(T(x))``, as ``antsApplyTransforms``
and ``sitk.Resample`` compute it. Points: each CSV point ``p`` is replaced by ``T(p)``, the same mapping
applied to a point given in the *fixed/reference* space, which lands in the *moving/input* space
(antsApplyTransformsToPoints semantics). To bring *moving*-space points into fixed space, pass the inverse
list: ``-t [prefix0GenericAffine.mat,1] -t prefix1InverseWarp.nii.gz``.

4D inputs (x, y, z, t) are resampled volume by volume (antsApplyTransforms ``-e 3``) and written as 4D with
the input's time spacing and origin; multi-component (vector) images are resampled component by
component, without reorienting the vectors.
"""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from regcli.cli.common import JsonOpt, OverwriteOpt, QuietOpt, VerboseOpt, esc, examples, input_file_option

EXAMPLES = examples(
    "# moving image into fixed space (what register's Warped.nii.gz holds)",
    "regcli apply -i moving.nii.gz -r fixed.nii.gz -t out/pair_1Warp.nii.gz -t out/pair_0GenericAffine.mat "
    "-o moved.nii.gz",
    "# a label map: per-label linear interpolation (ANTs GenericLabel), integer output",
    "regcli apply -i moving_seg.nii.gz -r fixed.nii.gz -t out/pair_1Warp.nii.gz -t out/pair_0GenericAffine.mat "
    "--interp label -o seg_in_fixed.nii.gz",
    "# fixed image into moving space: inverse affine, then the inverse warp",
    "regcli apply -i fixed.nii.gz -r moving.nii.gz -t [out/pair_0GenericAffine.mat,1] "
    "-t out/pair_1InverseWarp.nii.gz -o fixed_in_moving.nii.gz",
    "# points (CSV with x,y,z in LPS mm): FIXED-space points to MOVING space use the forward list",
    "regcli apply --points -i fixed_pts.csv -t out/pair_1Warp.nii.gz -t out/pair_0GenericAffine.mat "
    "-o pts_in_moving.csv",
    "# MOVING-space points to FIXED space use the inverse list",
    "regcli apply --points -i moving_pts.csv -t [out/pair_0GenericAffine.mat,1] -t out/pair_1InverseWarp.nii.gz "
    "-o pts_in_fixed.csv",
)


#: --interp names: regcli's, and antsApplyTransforms' (-n Linear, NearestNeighbor, GenericLabel), any case
INTERP_NAMES = {"linear": "linear", "nearest": "nearest", "label": "label", "nearestneighbor": "nearest",
                "genericlabel": "label"}


def _interp_name(value: str) -> str:
    """Typer callback: the interpolator's regcli name, from regcli's or ANTs' spelling (usage error otherwise)."""
    name = INTERP_NAMES.get(str(value).strip().lower())
    if name is None:
        raise typer.BadParameter(f"'{value}' is not one of linear, nearest, label (or ANTs' Linear, "
                                 "NearestNeighbor, GenericLabel).")
    return name


def _check_transform_specs(values: Optional[List[str]]) -> List[str]:
    """Typer callback: every transform file must exist (usage error, exit 2, like the other inputs)."""
    import os

    from regcli.io.transforms import parse_spec

    from regcli.errors import InputError

    for spec in values or []:
        if spec.strip().lower() == "identity":
            continue
        try:
            path, _ = parse_spec(spec)
        except InputError as e:
            raise typer.BadParameter(str(e)) from None
        p = Path(path)
        if not p.exists():
            raise typer.BadParameter(f"transform file '{path}' does not exist.")
        if p.is_dir():
            raise typer.BadParameter(f"transform file '{path}' is a directory.")
        if not os.access(p, os.R_OK):
            raise typer.BadParameter(f"transform file '{path}' is not readable.")
    return values or []


def apply(
    input: Annotated[Path, input_file_option("--input", "-i", help="Image to resample, or with --points a CSV "
                                             "file with columns x,y,z (LPS mm; other columns are kept) or a 3D "
                                             "Slicer .fcsv.",
                                             metavar="INPUT")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output image (or CSV with --points).",
                                         metavar="OUTPUT", show_default=False)],
    transform: Annotated[Optional[List[str]], typer.Option(
        "--transform", "-t", metavar="T", callback=_check_transform_specs, show_default=False,
        help=esc("Transform file, repeatable, in antsApplyTransforms order: a fixed point meets the first "
                 "listed first. .mat/.txt/.tfm affine, .h5 composite, displacement field image (.nii.gz). "
                 "[file,1] inverts an affine; 'identity' is allowed. None = identity."))] = None,
    reference: Annotated[Optional[Path], input_file_option(
        "--reference", "-r", help="Image whose grid the output takes (required for images, unused with --points).",
        metavar="REFERENCE")] = None,
    interp: Annotated[str, typer.Option(
        "--interp", "-n", callback=_interp_name, metavar="[linear|nearest|label]",
        help="linear (intensities), nearest, or label (per-label linear + argmax, ANTs GenericLabel: best for "
             "label maps). ANTs' names Linear, NearestNeighbor and GenericLabel are accepted too; nearest rounds "
             "halves up, as ITK does.")] = "linear",
    default_value: Annotated[float, typer.Option("--default-value", help="Value outside the input image.")] = 0.0,
    points: Annotated[bool, typer.Option("--points", help="INPUT is a point set (CSV x,y,z in LPS mm, or .fcsv). "
                                         "Points are mapped FIXED -> MOVING by the list as given; pass the "
                                         "inverse list to map moving-space points to fixed space.")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Resample an image onto a reference grid through a transform list, or map a point set (like ANTs).

    The list is read as on an antsApplyTransforms command line; regcli's register output
    [bold]prefix1Warp.nii.gz prefix0GenericAffine.mat[/bold] brings the moving image onto the fixed grid. Integer
    inputs keep an integer type with --interp nearest/label; 4D inputs are resampled volume by volume.
    """
    import time

    from regcli.cli.common import Ui
    from regcli.errors import OutputError
    from regcli.io.atomic import OutputSet
    from regcli.io.images import IMAGE_EXTENSIONS

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    t0 = time.perf_counter()
    from regcli.io.transforms import parse_spec

    specs = [s for s in (transform or []) if s.strip().lower() != "identity"]
    outs = OutputSet(overwrite=overwrite, inputs=[input, reference, *(parse_spec(s)[0] for s in specs)])
    if points and output.name.lower().endswith(IMAGE_EXTENSIONS + (".fcsv",)):
        what = "a 3D Slicer .fcsv" if output.name.lower().endswith(".fcsv") else "an image"
        raise OutputError(f"output '{output}': --points writes a CSV point set (LPS), not {what}; name it .csv")
    outs.claim(output, image=not points)  # O2/O3: refuse before reading or computing anything
    if points:
        if reference is not None:
            ui.info("note: --reference is not used with --points")
        result = apply_to_points(input, specs, output, outs)
    else:
        if reference is None:
            raise typer.BadParameter("missing; an image is resampled onto the reference grid (only --points "
                                     "works without one)", param_hint="'--reference' / '-r'")
        result = apply_to_image(input, reference, specs, output, outs, interp, default_value, ui)
    result["seconds"] = time.perf_counter() - t0
    ui.info(f"wrote {output} ({result.pop('summary')}) in {result['seconds']:.1f} s")
    ui.result(result)


# ---------------------------------------------------------------------------------------------- images
def _read_input(path: Path):
    """(sitk image, list of 3D sitk volumes, is_4d) for a 3D scalar/vector or 4D scalar image file."""
    import SimpleITK as sitk

    from regcli.errors import InputError
    from regcli.io.images import read_sitk, refuse_complex

    img = read_sitk(path, "input image")
    refuse_complex(img.GetPixelIDTypeAsString(), path, "input image")
    dim = img.GetDimension()
    shape = "x".join(str(s) for s in img.GetSize())
    if dim == 4 and img.GetSize()[3] == 1:
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim == 3:
        return img, [img], False
    if dim == 4:
        if img.GetNumberOfComponentsPerPixel() > 1:
            raise InputError(f"input image '{path}' is a 4D vector image of size {shape}; only 4D scalar series "
                             "are supported (resampled volume by volume)")
        vols = [sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, t]) for t in range(img.GetSize()[3])]
        return img, vols, True
    raise InputError(f"input image '{path}' is {dim}D (size {shape}); regcli apply needs a 3D image or a 4D "
                     "series of 3D volumes")


def _warn_nonfinite(img, path: Path, is_4d: bool, ui) -> None:
    """One warning when the input has NaN/Inf voxels, saying what becomes of them (resampling goes on: unlike
    registration, nothing is optimised on them, and statistical maps often carry NaN outside the brain)."""
    import numpy as np
    import SimpleITK as sitk

    from regcli.io.images import nonfinite_voxels

    arr = sitk.GetArrayViewFromImage(img)
    found = nonfinite_voxels(np.moveaxis(arr, 0, -1) if is_4d else arr, path)  # (T, Z, Y, X) -> T last
    if found is None:
        return
    count, (x, y, z), read_as_zero = found
    fate = ("SimpleITK reads NaN/Inf in NIfTI as 0, so they are resampled as 0" if read_as_zero else
            "output voxels interpolated from them are NaN/Inf too")
    ui.warn(f"input image '{path}' has {count} NaN/Inf voxels (first at index x={x}, y={y}, z={z}); {fate}")


def resample_volume(vol, reference, transform, interp: str, default: float, path: Optional[Path] = None):
    """Resample one 3D SimpleITK volume (scalar or vector) onto ``reference`` through ``transform``.

    Args:
        vol: 3D SimpleITK image, any real pixel type; vector components are resampled independently.
        reference: output :class:`~regcli.spaces.Grid`.
        transform: object with ``map_points`` (fixed/reference world LPS mm -> input world LPS mm) or None.
        interp: "linear", "nearest" or "label".
        default: value outside the input.
        path: the input's file, named in a geometry error.
    Returns:
        (Z, Y, X) or (Z, Y, X, C) numpy array on ``reference``: the input's integer values for nearest/label on
        integer inputs; for a float64 input float64 (nearest copies its values, linear interpolates in float64, as
        sitk.Resample does: values beyond float32's range stay finite); float32 otherwise.
    """
    import numpy as np
    import SimpleITK as sitk
    import torch

    from regcli.errors import InputError
    from regcli.io.images import grid_of
    from regcli.resample import warp
    from regcli.spaces import Image

    arr = sitk.GetArrayFromImage(vol)  # (Z, Y, X) or (Z, Y, X, C)
    ncomp = vol.GetNumberOfComponentsPerPixel()
    grid = grid_of(vol, path if path is not None else Path("<input>"), "input image")
    is_int = np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
    if interp == "label":
        if ncomp > 1:
            raise InputError("--interp label needs a scalar label image, the input has "
                             f"{ncomp} components per voxel")
        if not is_int:
            if not np.all(np.isfinite(arr)) or np.abs(arr - np.rint(arr)).max() > 1e-3:
                raise InputError("--interp label needs integer labels, the input has non-integer values "
                                 "(use --interp nearest or linear)")
            arr = np.rint(arr)
            is_int = True
    keep64 = not is_int and arr.dtype == np.float64  # a float64 input keeps its precision and range
    if is_int:
        data = torch.from_numpy(np.ascontiguousarray(arr.astype(np.int64)))
    else:
        data = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float64 if keep64 else np.float32)))
    if ncomp > 1:
        data = torch.movedim(data, -1, 0)  # (C, Z, Y, X)
    out = warp(Image(data, grid), transform, reference, interp, default, itk_edges=True).data
    if ncomp > 1:
        out = torch.movedim(out, 0, -1)
    out = out.cpu().numpy()
    if interp == "linear":
        out = out.astype(np.float64 if keep64 else np.float32)
    return out


def apply_to_image(input: Path, reference: Path, specs: list, output: Path, outs, interp: str, default: float,
                   ui) -> dict:
    """Resample ``input`` onto ``reference`` through the transform ``specs``; write ``output`` atomically."""
    import math

    import numpy as np
    import SimpleITK as sitk

    from regcli.io.images import integer_dtype_holding, read_grid, smallest_label_dtype, write_sitk
    from regcli.io.transforms import read_transform_list

    img, vols, is_4d = _read_input(input)
    _warn_nonfinite(img, input, is_4d, ui)
    ref_grid = read_grid(reference, "reference image")  # header only, with the NIfTI qform/sform checks (G7)
    transform = read_transform_list(specs) if specs else None
    int_input = "integer" in img.GetPixelIDTypeAsString()
    if int_input and interp == "linear":
        ui.warn(f"input '{input}' has integer voxels ({img.GetPixelIDTypeAsString()}); if it is a label map use "
                "--interp label (or nearest): linear interpolation mixes label values")
    in_dtype = sitk.GetArrayViewFromImage(vols[0]).dtype
    if interp != "linear" and (int_input or interp == "label") and not (
            math.isfinite(default) and float(default).is_integer() and abs(default) < 2 ** 62):
        raise typer.BadParameter(f"{default:g}: --interp {interp} of an integer image gives integer voxels; give an "
                                 "integer value (or --interp linear for float output)", param_hint="'--default-value'")
    arrays = [resample_volume(v, ref_grid, transform, interp, default, input) for v in vols]
    stacked = np.stack(arrays) if is_4d else arrays[0]
    # integer results (nearest/label) keep the input's integer type, widened only if the default value needs it;
    # labels given as integral floats take the smallest integer type that holds them (E9)
    if not np.issubdtype(stacked.dtype, np.integer):
        dtype = stacked.dtype.name  # float32, or float64 for a float64 input (nearest and linear, as sitk.Resample)
    elif np.issubdtype(in_dtype, np.integer):
        dtype = integer_dtype_holding(in_dtype, int(default))
    else:
        dtype = smallest_label_dtype(stacked)
    stacked = stacked.astype(dtype)
    ncomp = img.GetNumberOfComponentsPerPixel()

    def write(tmp: Path) -> None:
        if is_4d:
            series = []
            for a in stacked:
                v = sitk.GetImageFromArray(np.ascontiguousarray(a))
                ref_grid.apply_to_sitk(v)
                series.append(v)
            out = sitk.JoinSeries(series, float(img.GetOrigin()[3]), float(img.GetSpacing()[3]))
        else:
            out = sitk.GetImageFromArray(np.ascontiguousarray(stacked), isVector=ncomp > 1)
            ref_grid.apply_to_sitk(out)
        write_sitk(out, tmp)

    outs.stage(output, write)
    outs.commit()
    size = list(ref_grid.size) + ([len(vols)] if is_4d else [])
    return {
        "output": str(output),
        "input": str(input),
        "reference": str(reference),
        "transforms": specs,
        "interp": interp,
        "size": size,
        "dtype": dtype,
        "components": ncomp,
        "volumes": len(vols),
        "summary": f"{'x'.join(map(str, size))} {dtype}",
    }


# ---------------------------------------------------------------------------------------------- points
def apply_to_points(input: Path, specs: list, output: Path, outs) -> dict:
    """Map the CSV points of ``input`` through the transform list (fixed -> moving); write ``output``.

    The CSV needs x, y, z columns (LPS mm, any case); other columns are written back unchanged
    (:mod:`regcli.reports.landmarks`). Coordinates are written with 1e-10 mm resolution.
    """
    import numpy as np
    import torch

    from regcli.io.transforms import read_transform_list
    from regcli.reports.landmarks import points_csv_text, read_points_csv

    pts = read_points_csv(input, role="point file")
    transform = read_transform_list(specs) if specs else None
    mapped = pts.points if transform is None else \
        transform.map_points(torch.from_numpy(pts.points)).cpu().numpy()
    text = points_csv_text(pts.with_points(mapped), precision=10)
    outs.stage(output, lambda tmp: tmp.write_text(text))
    outs.commit()
    moved = np.linalg.norm(mapped - pts.points, axis=1)
    return {
        "output": str(output),
        "input": str(input),
        "transforms": specs,
        "points": int(len(pts)),
        "displacement_mm": {"mean": float(moved.mean()), "max": float(moved.max())},
        "summary": f"{len(pts)} points",
    }
