"""``regcli register FIXED MOVING -o PREFIX``: affine + deformable registration with ANTs-style outputs."""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from regcli.cli.common import (
    AffineInitOpt, AffineMetricOpt, AffineOnOpt, ConfigFileOpt, DeterministicOpt, DeviceOpt, FineSpacingOpt,
    FoundationIOOpt, HtmlOpt, IntensityWeightOpt, InverseOpt, IterationsOpt, JsonOpt, MaxMemoryOpt, MethodOpt,
    ModalityOpt, PrecisionOpt,
    OptimizerOpt, OverwriteOpt, PromptLabelsOpt, PromptLandmarksOpt, QuietOpt, SeedOpt, ThreadsOpt, TransformOpt,
    VerboseOpt, WorkingSpacingOpt, config_overrides, examples, input_file_argument, input_file_option,
)

EXAMPLES = examples(
    "regcli register fixed.nii.gz moving.nii.gz -o out/pair_",
    "regcli register fixed.nii.gz moving.nii.gz -o out/pair_ --method affine --affine-metric mi",
    "regcli register fixed.nii.gz moving.nii.gz -o out/pair_ --fixed-labels fseg.nii.gz "
    "--moving-labels mseg.nii.gz --json > pair.json",
    "regcli register fixed.nii.gz moving.nii.gz -o out/pair_ --config mine.yaml --seed 1 --deterministic "
    "--threads 2",
    "# then: regcli apply -i moving.nii.gz -r fixed.nii.gz -t out/pair_1Warp.nii.gz "
    "-t out/pair_0GenericAffine.mat -o moved.nii.gz",
)

_IN_PANEL = "Optional inputs (masks, labels and landmarks for scoring)"


def register(
    fixed: Annotated[Path, input_file_argument("Fixed (reference) image; outputs live on its grid.", "FIXED")],
    moving: Annotated[Path, input_file_argument("Moving image, registered to FIXED.", "MOVING")],
    output: Annotated[str, typer.Option(
        "--output", "-o", metavar="PREFIX", show_default=False,
        help="Output prefix, as in ANTs: PREFIX0GenericAffine.mat, PREFIX1Warp.nii.gz, PREFIX1InverseWarp.nii.gz, "
             "PREFIXWarped.nii.gz, PREFIXReport.json, PREFIXReport.html. ANTs' form [PREFIX,WARPED,INVERSE_WARPED] "
             "names the warped moving image and the fixed image warped into the moving space.")],
    config: ConfigFileOpt = None,
    method: MethodOpt = None,
    fixed_mask: Annotated[Optional[Path], input_file_option(
        "--fixed-mask", help="Fixed-space mask (non-zero = use): restricts the similarity.", panel=_IN_PANEL)] = None,
    moving_mask: Annotated[Optional[Path], input_file_option(
        "--moving-mask", help="Moving-space mask (non-zero = use).", panel=_IN_PANEL)] = None,
    fixed_labels: Annotated[Optional[Path], input_file_option(
        "--fixed-labels", help="Fixed label map: Dice/HD95 in the report.", panel=_IN_PANEL)] = None,
    moving_labels: Annotated[Optional[Path], input_file_option(
        "--moving-labels", help="Moving label map (warped with nearest-neighbour interpolation for scoring, "
        "as regcli evaluate does by default).",
        panel=_IN_PANEL)] = None,
    fixed_landmarks: Annotated[Optional[Path], input_file_option(
        "--fixed-landmarks", help="Fixed landmarks: CSV (x,y,z LPS mm) or 3D Slicer .fcsv; TRE in the report.",
        panel=_IN_PANEL)] = None,
    moving_landmarks: Annotated[Optional[Path], input_file_option(
        "--moving-landmarks", help="Corresponding moving landmarks: CSV (x,y,z LPS mm) or .fcsv.",
        panel=_IN_PANEL)] = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    deterministic: DeterministicOpt = None,
    working_spacing: WorkingSpacingOpt = None,
    affine_metric: AffineMetricOpt = None,
    affine_init: AffineInitOpt = None,
    affine: AffineOnOpt = None,
    iterations: IterationsOpt = None,
    transform: TransformOpt = None,
    optimizer: OptimizerOpt = None,
    fine_spacing: FineSpacingOpt = None,
    intensity_weight: IntensityWeightOpt = None,
    precision: PrecisionOpt = None,
    max_memory: MaxMemoryOpt = None,
    modality: ModalityOpt = None,
    io: FoundationIOOpt = None,
    prompt_labels: PromptLabelsOpt = None,
    prompt_landmarks: PromptLandmarksOpt = None,
    inverse: InverseOpt = None,
    html: HtmlOpt = None,
    json_out: JsonOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Register MOVING to FIXED: affine pre-alignment, then the deformable method of --method (ConvexAdam by default).

    Works in physical (LPS mm) space, so images may differ in size, spacing, origin and orientation. The
    transforms map fixed points to moving points, in ANTs files; existing outputs are never overwritten
    without --overwrite, and nothing is written if the run fails. Progress and a summary go to stderr; with
    --json the report goes to stdout.
    """
    from regcli.cli.common import Ui, command_line
    from regcli.config import build_config, refuse_flags_without_effect

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    overrides = config_overrides(method, device, threads, seed, deterministic, working_spacing, affine_metric,
                                 affine_init, affine, iterations, inverse, html, transform, optimizer, prompt_labels,
                                 prompt_landmarks, fine_spacing, modality, io, intensity_weight, precision, max_memory)
    cfg = build_config(config, overrides)
    refuse_flags_without_effect(cfg, overrides)
    from regcli.io.images import check_image_header

    for path, role in ((fixed, "fixed image"), (moving, "moving image"), (fixed_mask, "fixed mask"),
                       (moving_mask, "moving mask"), (fixed_labels, "fixed labels"), (moving_labels, "moving labels")):
        if path is not None:  # a bad header is refused before the imports of torch (seconds), as the read would
            check_image_header(path, role)
    from regcli.pipeline import RegisterInputs, parse_output_spec, run_register

    try:
        prefix, warped, inverse_warped = parse_output_spec(output)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--output'") from None
    inputs = RegisterInputs(
        fixed=fixed, moving=moving, output_prefix=prefix, fixed_mask=fixed_mask, moving_mask=moving_mask,
        fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_landmarks=fixed_landmarks,
        moving_landmarks=moving_landmarks, warped=warped, inverse_warped=inverse_warped,
    )
    from regcli.cli.common import log

    log().debug("regcli register: %s -> %s (%s, device %s)", moving, fixed, cfg.method, cfg.device)
    with ui.progress() as progress:
        flags = [kind for kind, given in (("labels", prompt_labels is not None), ("landmarks", bool(prompt_landmarks)))
                 if given]  # prompts from these flags are named by them, the others by their --config key
        report = run_register(inputs, cfg, overwrite=overwrite, progress=progress, command=command_line(),
                              prompt_flags=flags)
    if not json_out:
        ui.rich(summary_table(report))
    ui.result(report)


def _dig(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def report_outputs(report: dict) -> list:
    return list(report.get("outputs") or _dig(report, "extra", "outputs", default=[]) or [])


def report_seconds(report: dict) -> Optional[float]:
    """Registration time recorded in a report (``total_seconds``, else ``stages.total``)."""
    for path in (("total_seconds",), ("stages", "total"), ("timings", "total"), ("seconds",)):
        v = _dig(report, *path)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def report_memory(report: dict) -> dict:
    """``{"peak_rss_mb", "cuda_max_allocated_mb"}`` (those present) from a report."""
    out = {}
    for key, alts in (("peak_rss_mb", (("memory", "peak_rss_mb"), ("peak_rss_mb",), ("extra", "peak_rss_mb"))),
                      ("cuda_max_allocated_mb", (("memory", "cuda_max_allocated_mb"), ("cuda_max_memory_mb",),
                                                 ("extra", "cuda_max_memory_mb")))):
        for path in alts:
            v = _dig(report, *path)
            if isinstance(v, (int, float)):
                out[key] = float(v)
                break
    return out


def summary_table(report: dict):
    """A short rich table: outputs, time, peak memory, and the metrics the report has."""
    from rich.table import Table

    from regcli.cli.common import fmt_float

    t = Table(show_header=False, box=None, pad_edge=False, title="regcli register", title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    outs = report_outputs(report)
    if outs:
        t.add_row("outputs", "\n".join(str(o) for o in outs))
    secs = report_seconds(report)
    if secs is not None:
        t.add_row("time", f"{secs:.1f} s")
    mem = report_memory(report)
    if "peak_rss_mb" in mem:
        gpu = f", GPU {mem['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in mem else ""
        t.add_row("peak memory", f"{mem['peak_rss_mb']:.0f} MB{gpu}")
    m = report.get("metrics") or {}
    if "dice_mean" in m:
        init = m.get("dice_initial_mean")
        t.add_row("Dice (mean)", fmt_float(m["dice_mean"]) + (f"  (initial {fmt_float(init)})" if init is not None
                                                              else ""))
    if "hd95_mean" in m:
        t.add_row("HD95 (mean)", f"{fmt_float(m['hd95_mean'], 2)} mm")
    if "pct_nonpos_jac" in m:
        t.add_row("det J <= 0", f"{fmt_float(m['pct_nonpos_jac'], 4)} %   SDlogJ {fmt_float(m.get('sdlogj'))}")
    tre = m.get("tre")
    if isinstance(tre, dict) and "tre_mean_mm" in tre:
        init = tre.get("initial_mean_mm")
        t.add_row("TRE (mean)", f"{fmt_float(tre['tre_mean_mm'], 2)} mm"
                  + (f"  (initial {fmt_float(init, 2)} mm)" if init is not None else ""))
    return t
