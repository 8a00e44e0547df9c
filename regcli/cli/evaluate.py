"""``regcli evaluate``: register and score one pair or a CSV manifest of pairs (Dice, HD95, det J, TRE, time, memory).

The scoring lives in :mod:`regcli.evaluation`; this module only parses options and renders the table.
"""

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from regcli.cli.common import (
    AffineMetricOpt, ConfigFileOpt, DeterministicOpt, DeviceOpt, FineSpacingOpt, FoundationIOOpt,
    IntensityWeightOpt, IterationsOpt, JsonOpt, MaxMemoryOpt, MethodOpt, ModalityOpt, OptimizerOpt, OverwriteOpt,
    PrecisionOpt, QuietOpt, SeedOpt, ThreadsOpt, TransformOpt, VerboseOpt, WorkingSpacingOpt, config_overrides,
    examples, input_file_argument, input_file_option,
)

EXAMPLES = examples(
    "regcli evaluate pairs.csv --method convexadam -o results/",
    "regcli evaluate --fixed f.nii.gz --moving m.nii.gz --fixed-labels fl.nii.gz --moving-labels ml.nii.gz -o res/",
    "# score transforms written earlier (res/pair001_1Warp.nii.gz, res/pair001_0GenericAffine.mat, ...)",
    "regcli evaluate pairs.csv --transforms-from 'res/{pair}_' -o rescored/",
    "regcli evaluate pairs.csv -o results/ --threads 2 --json | jq .summary.dice_mean",
    "# a dataset manifest (docs/training.md): every dataset's pairs, by task; leave one task out",
    "regcli evaluate datasets.yaml -o results/ --exclude-task ct --json | jq .summary_by_task",
    "# pairs.csv: fixed_image,moving_image,fixed_labels,moving_labels[,fixed_landmarks,moving_landmarks,"
    "fixed_mask,moving_mask,pair] with paths relative to the CSV's folder",
)

_ONE = "One pair (instead of a MANIFEST)"

TaskOpt = Annotated[Optional[list[str]], typer.Option(
    "--task", metavar="TASK", show_default=False,
    help="With a dataset manifest: only the datasets of this task (repeatable).")]
ExcludeTaskOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude-task", metavar="TASK", show_default=False,
    help="With a dataset manifest: leave out the datasets of this task (repeatable).")]


class LabelInterp(str, Enum):
    nearest = "nearest"
    label = "label"


def evaluate(
    manifest: Annotated[Optional[Path], input_file_argument(
        "CSV of pairs: columns fixed_image, moving_image and optionally fixed_labels, moving_labels, "
        "fixed_landmarks, moving_landmarks, fixed_mask, moving_mask, pair (paths relative to the CSV); or a "
        "dataset manifest (YAML, docs/training.md) whose datasets' pairs CSVs are registered, by task.",
        "MANIFEST")] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="OUTDIR", show_default=False,
        help="Folder for evaluation.csv, evaluation.json and each pair's outputs (OUTDIR/<pair>_...); created "
             "if missing.")] = ...,
    fixed: Annotated[Optional[Path], input_file_option("--fixed", help="Fixed image.", panel=_ONE)] = None,
    moving: Annotated[Optional[Path], input_file_option("--moving", help="Moving image.", panel=_ONE)] = None,
    fixed_labels: Annotated[Optional[Path], input_file_option("--fixed-labels", help="Fixed label map.",
                                                              panel=_ONE)] = None,
    moving_labels: Annotated[Optional[Path], input_file_option("--moving-labels", help="Moving label map.",
                                                               panel=_ONE)] = None,
    fixed_landmarks: Annotated[Optional[Path], input_file_option(
        "--fixed-landmarks", help="Fixed landmarks: CSV (x,y,z LPS mm) or 3D Slicer .fcsv.", panel=_ONE)] = None,
    moving_landmarks: Annotated[Optional[Path], input_file_option(
        "--moving-landmarks", help="Moving landmarks: CSV (x,y,z LPS mm) or 3D Slicer .fcsv.", panel=_ONE)] = None,
    fixed_mask: Annotated[Optional[Path], input_file_option("--fixed-mask", help="Fixed mask (registration).",
                                                            panel=_ONE)] = None,
    moving_mask: Annotated[Optional[Path], input_file_option("--moving-mask", help="Moving mask (registration).",
                                                             panel=_ONE)] = None,
    name: Annotated[str, typer.Option(
        "--name", help="Pair name for the one-pair form: its outputs are OUTDIR/<name>_... (no '/', not '.' or "
        "'..').", rich_help_panel=_ONE)] = "pair001",
    method: MethodOpt = None,
    transforms_from: Annotated[Optional[str], typer.Option(
        "--transforms-from", metavar="TEMPLATE", show_default=False,
        help="Do not register: score transforms written earlier. A prefix template such as 'res/{pair}_' "
             "({pair}: pair name, {index}: 1-based row); reads PREFIX1Warp.nii.gz and/or "
             "PREFIX0GenericAffine.mat, and PREFIXReport.json for time and memory and to check (sha256) that they "
             "were registered from the pair's images: a warning when not, or when fixed and moving are swapped.")]
    = None,
    config: ConfigFileOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    deterministic: DeterministicOpt = None,
    working_spacing: WorkingSpacingOpt = None,
    affine_metric: AffineMetricOpt = None,
    iterations: IterationsOpt = None,
    transform: TransformOpt = None,
    optimizer: OptimizerOpt = None,
    fine_spacing: FineSpacingOpt = None,
    intensity_weight: IntensityWeightOpt = None,
    precision: PrecisionOpt = None,
    max_memory: MaxMemoryOpt = None,
    modality: ModalityOpt = None,
    io: FoundationIOOpt = None,
    label_interp: Annotated[LabelInterp, typer.Option(
        "--label-interp", case_sensitive=False,
        help="How moving labels are warped for scoring: nearest (default) or label (per-label linear).")]
    = LabelInterp.nearest,
    hd95: Annotated[bool, typer.Option("--hd95/--no-hd95", help="Compute HD95 (the slowest metric).")] = True,
    task: TaskOpt = None,
    exclude_task: ExcludeTaskOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Register and score pairs: Dice before/after, HD95, % det J <= 0, SDlogJ, TRE, seconds and peak memory.

    Each pair is registered by a fresh [bold]regcli register[/bold] process (so its peak memory is its own, and a
    crash fails one row, not the table), then scored from the transform files it wrote. Prints a table with a
    mean ± sd row (over the pairs that succeeded), and writes OUTDIR/evaluation.csv and OUTDIR/evaluation.json.
    A pair that fails, registering or scoring, leaves no outputs of its own. Exits 0 when every pair was scored,
    otherwise with the exit code of the first failed pair (after writing the results).
    """
    from regcli.cli.common import Ui, output_folder
    from regcli.config import build_config, refuse_flags_without_effect
    from regcli.errors import ConfigError, OutputError
    from regcli.evaluation import (
        Pair, check_config_for_pairs, check_pair, evaluate_pairs, pair_name_problem, read_pairs, with_prompt_inputs,
        write_results,
    )
    from regcli.io.atomic import OutputSet

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    one = [fixed, moving, fixed_labels, moving_labels, fixed_landmarks, moving_landmarks, fixed_mask, moving_mask]
    if manifest is not None and any(v is not None for v in one):
        raise typer.BadParameter("give either a MANIFEST or the one-pair options (--fixed, --moving, ...), not both")
    if manifest is None:
        if fixed is None or moving is None:
            raise typer.BadParameter("give a MANIFEST CSV, or --fixed and --moving (with labels to score Dice)")
        problem = pair_name_problem(name)
        if problem is not None:
            raise typer.BadParameter(problem, param_hint="'--name'")
        pairs = [check_pair(Pair(name, fixed, moving, fixed_labels, moving_labels, fixed_landmarks,
                                 moving_landmarks, fixed_mask, moving_mask))]
    else:
        pairs = read_pairs(manifest, task or (), exclude_task or ())
    if transforms_from and method is not None:
        raise ConfigError("--transforms-from scores existing transforms; --method does not apply")

    overrides = config_overrides(method=method, device=device, threads=threads, seed=seed,
                                 deterministic=deterministic, working_spacing=working_spacing,
                                 affine_metric=affine_metric, iterations=iterations, transform=transform,
                                 optimizer=optimizer, fine_spacing=fine_spacing, modality=modality, io=io,
                                 intensity_weight=intensity_weight, precision=precision, max_memory=max_memory)
    cfg = build_config(config, overrides)  # fail fast on a bad YAML or flag (exit 7)
    refuse_flags_without_effect(cfg, overrides)
    if not transforms_from:  # what every pair's register child would refuse: once, before any pair runs
        check_config_for_pairs(cfg, pairs, columns=manifest is not None)
        pairs = with_prompt_inputs(cfg, pairs, columns=manifest is not None)
    extra = _register_args(device, threads, seed, deterministic, working_spacing, affine_metric, iterations,
                           transform, optimizer, fine_spacing, modality, io, intensity_weight, precision, max_memory)

    output_folder(output)  # outputs: checked before anything runs (O2, O3)
    outs = OutputSet(overwrite=overwrite)
    outs.claim(output / "evaluation.csv")
    outs.claim(output / "evaluation.json")
    if not transforms_from and not overwrite:
        for p in pairs:
            for suffix in ("0GenericAffine.mat", "1Warp.nii.gz", "1InverseWarp.nii.gz", "Warped.nii.gz",
                           "Report.json"):
                f = output / f"{p.name}_{suffix}"
                if f.exists():
                    raise OutputError(f"output '{f}' exists; pass --overwrite to replace it, or score it with "
                                      f"--transforms-from '{output}/{{pair}}_'")

    what = f"existing transforms '{transforms_from}'" if transforms_from else f"method {cfg.method}"
    ui.info(f"regcli evaluate: {len(pairs)} pair(s), {what}")
    with ui.progress() as progress:
        progress.start("evaluate", len(pairs))

        def on_pair(i, pair, row):
            progress.update("evaluate", i, pair.name)
            _log_row(ui, i, len(pairs), row)

        ev = evaluate_pairs(pairs, output, method=cfg.method, transforms_from=transforms_from, config=config,
                            extra_args=extra, overwrite=overwrite, label_interp=label_interp.value, hd95=hd95,
                            on_pair=on_pair)
        progress.finish("evaluate")
    files = write_results(ev, output)
    result = ev.to_dict()
    result["outputs"] = [str(f) for f in files]
    if json_out:
        ui.result(result)
    else:
        ui.result(result, results_table(ev))
        ui.info("wrote " + ", ".join(str(f) for f in files))
    if ev.failed:
        first = ev.failed[0]
        ui.warn(f"{len(ev.failed)} of {len(ev.rows)} pair(s) failed; first: {first['pair']}: {first.get('error')}")
        raise typer.Exit(int(first.get("exit_code") or 1))


def _register_args(device, threads, seed, deterministic, working_spacing, affine_metric, iterations,
                   transform=None, optimizer=None, fine_spacing=None, modality=None, io=None,
                   intensity_weight=None, precision=None, max_memory=None) -> list:
    """Flags passed on to each `regcli register` child (HTML reports off: evaluation does not need them)."""
    args = ["--no-html"]
    for flag, v in (("--device", device), ("--threads", threads), ("--seed", seed),
                    ("--working-spacing", working_spacing), ("--affine-metric", affine_metric),
                    ("--iterations", iterations), ("--transform", transform), ("--optimizer", optimizer),
                    ("--fine-spacing", fine_spacing), ("--modality", modality), ("--io", io),
                    ("--intensity-weight", intensity_weight), ("--precision", precision),
                    ("--max-memory", max_memory)):
        if v is not None:
            args += [flag, str(getattr(v, "value", v))]
    if deterministic is not None:
        args.append("--deterministic" if deterministic else "--no-deterministic")
    return args


def _log_row(ui, i: int, n: int, row: dict) -> None:
    from regcli.cli.common import fmt_float

    if row.get("status") != "ok":
        ui.info(f"[{i}/{n}] {row['pair']}: FAILED: {row.get('error')}")
        return
    parts = []
    if "dice_mean" in row:
        parts.append(f"Dice {fmt_float(row.get('dice_initial_mean'))} -> {fmt_float(row['dice_mean'])}")
    if "tre_mean" in row:
        parts.append(f"TRE {fmt_float(row.get('tre_initial_mean'), 2)} -> {fmt_float(row['tre_mean'], 2)} mm")
    if "pct_nonpos_jac" in row:
        parts.append(f"detJ<=0 {fmt_float(row['pct_nonpos_jac'], 3)}%")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.1f} s")
    ui.info(f"[{i}/{n}] {row['pair']}: " + ", ".join(parts))
    for message in row.get("warnings") or ():  # the registration's (a child's stderr is not shown)
        ui.warn(f"{row['pair']}: {message}")


_COLUMNS = (
    ("dice_initial_mean", "Dice init", 3),
    ("dice_mean", "Dice", 3),
    ("hd95_mean", "HD95 mm", 2),
    ("pct_nonpos_jac", "% detJ≤0", 3),
    ("sdlogj", "SDlogJ", 3),
    ("tre_initial_mean", "TRE init mm", 2),
    ("tre_mean", "TRE mm", 2),
    ("seconds", "s", 1),
    ("peak_rss_mb", "peak MB", 0),
)


def results_table(ev, title: Optional[str] = None):
    """Rich table: one row per pair, then mean ± sd over the successful pairs. An HD95 over fewer labels than Dice
    (labels lost by warping, ``hd95_labels_lost``) is marked ``*``, and transforms registered from other inputs
    (``--transforms-from``, ``transforms_inputs_match``) ``!``; the caption names them."""
    from rich.markup import escape
    from rich.table import Table

    from regcli.cli.common import fmt_float

    summary = ev.summary()
    cols = [c for c in _COLUMNS if c[0] in summary]
    t = Table(title=title or f"regcli evaluate ({ev.method})", title_justify="left", show_footer=len(ev.rows) > 1)
    t.add_column("pair", footer="mean ± sd")
    for key, head, digits in cols:
        s = summary[key]
        t.add_column(head, justify="right", footer=f"{fmt_float(s['mean'], digits)} ± {fmt_float(s['sd'], digits)}")
    t.add_column("status")
    notes = []
    for r in ev.rows:
        lost = r.get("hd95_labels_lost") or []
        cells = [fmt_float(r.get(k), d) + ("*" if k == "hd95_mean" and lost else "") for k, _, d in cols]
        status = "ok" if r.get("status") == "ok" else "[red]failed[/red]"
        if lost:
            notes.append(f"* {r['pair']}: HD95 leaves out label(s) {' '.join(map(str, lost))}, lost by warping "
                         f"(their Dice, 0, counts)")
        if r.get("transforms_inputs_match") is False:
            status += " [yellow]![/yellow]"
            what = "swapped fixed and moving" if r.get("transforms_inputs_swapped") else \
                "other " + ", ".join(x.replace("_", " ") for x in r.get("transforms_inputs_differ") or [])
            notes.append(f"! {r['pair']}: transforms registered from {what}")
        t.add_row(escape(r["pair"]), *cells, status)
    if notes:
        t.caption = escape("\n".join(notes))
        t.caption_justify = "left"
    return t
