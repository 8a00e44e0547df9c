"""``regcli batch``: register a cohort (a CSV of pairs) in parallel, locally or on Ray, resumably.

The work lives in :mod:`regcli.batch`; this module only parses options and renders the summary.
"""

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from regcli.cli.common import (
    AffineMetricOpt, ConfigFileOpt, DeterministicOpt, DeviceOpt, FineSpacingOpt, FoundationIOOpt,
    IntensityWeightOpt, IterationsOpt, JsonOpt, MaxMemoryOpt, MethodOpt, ModalityOpt, OptimizerOpt, PrecisionOpt,
    QuietOpt, SeedOpt, TransformOpt, VerboseOpt, WorkingSpacingOpt, config_overrides, examples, input_file_argument,
)
from regcli.cli.evaluate import ExcludeTaskOpt, LabelInterp, TaskOpt

EXAMPLES = examples(
    "regcli batch pairs.csv --method convexadam -o cohort/",
    "# two pairs at a time with 1 thread each; rerunning skips the pairs already done",
    "regcli batch pairs.csv -o cohort/ --jobs 2 --threads 1",
    "# on a running Ray cluster (paths on shared storage; regcli installed on every node)",
    "regcli batch pairs.csv -o /shared/cohort/ --backend ray --address auto --threads 4",
    "regcli batch pairs.csv -o cohort/ --json | jq .summary.dice_mean",
)


class Backend(str, Enum):
    local = "local"
    ray = "ray"


def batch(
    manifest: Annotated[Path, input_file_argument(
        "CSV of pairs: columns fixed_image, moving_image and optionally fixed_labels, moving_labels, "
        "fixed_landmarks, moving_landmarks, fixed_mask, moving_mask, pair (paths relative to the CSV); the "
        "same file regcli evaluate reads; or a dataset manifest (YAML) whose datasets' pairs CSVs are "
        "registered.", "MANIFEST")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="OUTDIR", show_default=False,
        help="Folder for each pair's outputs (OUTDIR/<pair>_...), batch.csv, batch.json, batch_dice.png and "
             "batch_runtime.png; created if missing.")],
    method: MethodOpt = None,
    config: ConfigFileOpt = None,
    backend: Annotated[Backend, typer.Option(
        "--backend", case_sensitive=False,
        help="local: a pool of --jobs workers on this machine. ray: Ray tasks on the cluster at --address.")]
    = Backend.local,
    address: Annotated[Optional[str], typer.Option(
        "--address", metavar="ADDR", show_default=False,
        help="Ray cluster address ('auto': the cluster this machine belongs to; 'ray://host:10001'); default: "
             "start a local Ray for this run.")] = None,
    jobs: Annotated[Optional[int], typer.Option(
        "--jobs", "-j", min=1, show_default=False,
        help="Pairs registered at once by the local backend (default: cores / --threads).")] = None,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, show_default=False,
        help="CPU threads of each pair's registration, and the CPUs each Ray task asks for (default: all cores "
             "locally with one job, 2 on Ray).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume",
        help="Skip pairs whose outputs and report are complete (default). --no-resume registers every pair "
             "again.")] = True,
    device: DeviceOpt = None,
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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Register every pair of a cohort, in parallel, and summarise it (Dice per structure, runtimes).

    Each pair is registered by a fresh [bold]regcli register[/bold] process into OUTDIR/<pair>_ and scored as
    [bold]regcli evaluate[/bold] scores it. A pair that fails (bad file, crash, out of memory), registering or
    scoring, is listed with its error, leaves no outputs of its own, and the others go on. Rerunning resumes:
    pairs whose outputs and report are complete are not registered again. Writes OUTDIR/batch.csv, batch.json,
    batch_dice.png and batch_runtime.png. Exits 0 when every pair succeeded, otherwise with the exit code of the
    first failed pair (after writing the summary).
    """
    from regcli.batch import BatchJob, run_batch, write_batch_results
    from regcli.cli.common import Ui, output_folder
    from regcli.cli.evaluate import _log_row, _register_args, results_table
    from regcli.config import build_config, refuse_flags_without_effect
    from regcli.errors import OutputError
    from regcli.evaluation import check_config_for_pairs, read_pairs, with_prompt_inputs

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    pairs = read_pairs(manifest, task or (), exclude_task or ())
    cores = os.cpu_count() or 1
    if backend is Backend.ray:
        threads = threads or 2
    else:
        threads = threads or max(1, cores // (jobs or 1))
        jobs = jobs or max(1, cores // threads)
    overrides = config_overrides(method=method, device=device, threads=threads, seed=seed,
                                 deterministic=deterministic, working_spacing=working_spacing,
                                 affine_metric=affine_metric, iterations=iterations, transform=transform,
                                 optimizer=optimizer, fine_spacing=fine_spacing, modality=modality, io=io,
                                 intensity_weight=intensity_weight, precision=precision, max_memory=max_memory)
    cfg = build_config(config, overrides)  # fail fast on a bad YAML or flag (exit 7)
    refuse_flags_without_effect(cfg, overrides)
    check_config_for_pairs(cfg, pairs)  # what every pair's register child would refuse: once, before any pair runs
    pairs = with_prompt_inputs(cfg, pairs)
    extra = _register_args(device, None, seed, deterministic, working_spacing, affine_metric, iterations,
                           transform, optimizer, fine_spacing, modality, io, intensity_weight, precision, max_memory)

    output_folder(output)
    if not os.access(output, os.W_OK):
        raise OutputError(f"output folder '{output}' is not writable")

    job = BatchJob(outdir=str(output), method=cfg.method, config=str(config) if config else None,
                   extra_args=tuple(extra), label_interp=label_interp.value, hd95=hd95,
                   config_dump=cfg.model_dump(mode="json"))
    where = f"Ray ({address or 'local'})" if backend is Backend.ray else f"{jobs} job(s)"
    ui.info(f"regcli batch: {len(pairs)} pair(s), method {cfg.method}, {where} x {threads} thread(s)")
    with ui.progress() as progress:
        progress.start("batch", len(pairs))

        def on_pair(done, pair, row):
            progress.update("batch", done, pair.name)
            _log_row(ui, done, len(pairs), {**row, "pair": row["pair"] + (" (resumed)" if row.get("resumed")
                                                                           else "")})

        result = run_batch(pairs, job, backend=backend.value, jobs=jobs or 1, threads=threads, address=address,
                           resume=resume, on_pair=on_pair)
        progress.finish("batch")
    files = write_batch_results(result, output)
    out = result.to_dict()
    out["outputs"] = [str(f) for f in files]
    ev = result.evaluation
    if json_out:
        ui.result(out)
    else:
        ui.result(out, results_table(ev, title=f"regcli batch ({ev.method})"))
        ui.info(f"{len(ev.rows) - len(ev.failed)} of {len(ev.rows)} pair(s) done ({len(result.resumed)} resumed); "
                "wrote " + ", ".join(str(f) for f in files))
    if ev.failed:
        first = ev.failed[0]
        ui.warn(f"{len(ev.failed)} of {len(ev.rows)} pair(s) failed; first: {first['pair']}: {first.get('error')}")
        raise typer.Exit(int(first.get("exit_code") or 1))
