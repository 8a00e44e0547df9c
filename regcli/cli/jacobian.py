"""``regcli jacobian WARP [-t AFFINE ...] -o OUT``: Jacobian determinant map and folding statistics."""

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from regcli.cli.common import (
    JsonOpt, OverwriteOpt, QuietOpt, VerboseOpt, esc, examples, input_file_argument, input_file_option,
)

EXAMPLES = examples(
    "regcli jacobian out/pair_1Warp.nii.gz -o out/pair_detJ.nii.gz",
    "regcli jacobian out/pair_1Warp.nii.gz -t out/pair_0GenericAffine.mat -o detJ.nii.gz --mask fixed_mask.nii.gz",
    "regcli jacobian out/pair_1Warp.nii.gz -o detJ.nii.gz --json | jq .stats.pct_nonpos_jac",
)


def _check_affine_specs(values: Optional[List[str]]) -> List[str]:
    from regcli.cli.apply import _check_transform_specs

    return _check_transform_specs(values)


def jacobian(
    warp: Annotated[Path, input_file_argument("Displacement field (ANTs 1Warp.nii.gz layout, LPS mm).", "WARP")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                         help="Output determinant map (float32, on the warp's grid).")],
    transform: Annotated[Optional[List[str]], typer.Option(
        "--transform", "-t", metavar="AFFINE", callback=_check_affine_specs, show_default=False,
        help=esc("Affine(s) listed after WARP on the apply command line (e.g. prefix0GenericAffine.mat, or "
                 "[file,1]): the map is x -> A(x + u(x)), so det J = det(A) det(I + grad u)."))] = None,
    mask: Annotated[Optional[Path], input_file_option(
        "--mask", help="Also report the statistics inside this mask (non-zero voxels, any grid).")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Jacobian determinant of a displacement field in physical units, with folding statistics.

    det J is computed with the field's spacing and direction (central differences in mm); values <= 0 mark
    folding. Prints min, max, % of voxels with det J <= 0 and the standard deviation of log det J.
    """
    import time

    import numpy as np

    from regcli.cli.common import Ui
    from regcli.errors import InputError
    from regcli.io.atomic import OutputSet
    from regcli.io.transforms import parse_spec, read_transform, read_transform_list
    from regcli.transforms import AffineTransform, DisplacementField

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    t0 = time.perf_counter()
    outs = OutputSet(overwrite=overwrite, inputs=[warp, mask, *(parse_spec(s)[0] for s in transform or [])])
    outs.claim(output, image=True)
    parts = read_transform(str(warp))
    if len(parts) != 1 or not isinstance(parts[0], DisplacementField):
        raise InputError(f"WARP '{warp}' is not a displacement field image")
    field = parts[0]
    affines = read_transform_list(transform or []).transforms
    bad = [type(t).__name__ for t in affines if not isinstance(t, AffineTransform)]
    if bad:
        raise InputError(f"-t accepts affine transforms only (got {', '.join(bad)}); compose fields with "
                         "`regcli apply` first")
    det_a = float(np.prod([np.linalg.det(a.linear) for a in affines])) if affines else 1.0
    image, stats, stats_mask = jacobian_map(field, det_a, mask)

    from regcli.io.images import write_image

    outs.stage(output, lambda tmp: write_image(image, tmp, "float32"))
    outs.commit()
    result = {"output": str(output), "warp": str(warp), "transforms": list(transform or []),
              "affine_det": det_a, "stats": stats, "seconds": time.perf_counter() - t0}
    if stats_mask is not None:
        result["stats_in_mask"] = stats_mask
    human = _stats_table(stats, stats_mask)
    if json_out:
        ui.result(result)
    else:
        ui.info(f"wrote {output} in {result['seconds']:.1f} s")
        ui.result(result, human)


def jacobian_map(field, det_affine: float = 1.0, mask_path: Optional[Path] = None):
    """(det J Image on the field grid, stats over the grid, stats inside the mask or None).

    Args:
        field: :class:`~regcli.transforms.DisplacementField`, (3, Z, Y, X) LPS mm.
        det_affine: determinant of the affine part applied after the field (1 for none).
        mask_path: optional mask file, resampled (nearest) onto the field grid.
    Returns:
        det J as an :class:`~regcli.spaces.Image` (Z, Y, X) float32 (unitless) on ``field.grid``, and the
        :func:`regcli.reports.jacobian.jacobian_stats` blocks.
    """
    from regcli.reports.jacobian import jacobian_image, jacobian_stats

    image = jacobian_image(field)
    if det_affine != 1.0:
        image = image.with_data(image.data * float(det_affine))
    inside = None
    if mask_path is not None:
        from regcli.errors import GeometryError
        from regcli.io.images import read_mask
        from regcli.resample import resample_to_grid

        m = read_mask(mask_path, "mask")
        if not m.grid.allclose(field.grid):
            m = resample_to_grid(m, field.grid, "nearest")
        inside = m.data > 0.5
        if not bool(inside.any()):
            raise GeometryError(f"mask '{mask_path}' has 0 voxels inside the warp's grid")
    stats = jacobian_stats(image.data, inside)
    stats_mask = stats.pop("in_mask", None)
    return image, stats, stats_mask


def _stats_table(stats: dict, stats_mask: Optional[dict]):
    from rich.table import Table

    from regcli.cli.common import fmt_float

    t = Table(title="Jacobian determinant", title_justify="left")
    t.add_column("statistic")
    t.add_column("grid", justify="right")
    if stats_mask is not None:
        t.add_column("in mask", justify="right")
    for k, v in stats.items():
        if isinstance(v, (int, float)):
            vals = [v] + ([stats_mask.get(k)] if stats_mask is not None else [])
            t.add_row(k, *[str(x) if isinstance(x, int) else fmt_float(x, 4) for x in vals])
    return t
