"""``regcli config schema|show``: the configuration model and the effective configuration (STYLE rule 8)."""


import typer

from regcli.cli.common import (
    AffineInitOpt, AffineMetricOpt, AffineOnOpt, ConfigFileOpt, DeterministicOpt, DeviceOpt, FineSpacingOpt,
    FoundationIOOpt, HtmlOpt, IntensityWeightOpt, InverseOpt, IterationsOpt, JsonOpt, MaxMemoryOpt, MethodOpt,
    ModalityOpt, PrecisionOpt,
    OptimizerOpt, PromptLabelsOpt, PromptLandmarksOpt, SeedOpt, ThreadsOpt, TransformOpt, WorkingSpacingOpt,
    config_overrides, examples,
)

app = typer.Typer(
    help="Inspect the registration configuration: its JSON schema, or the effective values.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    epilog=examples("regcli config schema > regcli-config.schema.json",
                    "regcli config show --config mine.yaml --method affine"),
)

SCHEMA_EXAMPLES = examples(
    "regcli config schema > regcli-config.schema.json",
    "regcli config schema | jq '.properties.method'",
)
SHOW_EXAMPLES = examples(
    "regcli config show                                   # defaults, as YAML",
    "regcli config show --config mine.yaml --seed 3       # YAML merged with flags (flags win)",
    "regcli config show --method affine --json",
    "regcli config show > mine.yaml                       # a starting point to edit",
)


@app.command("schema", epilog=SCHEMA_EXAMPLES)
def schema() -> None:
    """Print the JSON schema of the register configuration (the keys a --config YAML file may hold)."""
    from regcli.cli.common import emit_json
    from regcli.config import RegisterConfig

    emit_json(RegisterConfig.model_json_schema())


@app.command("show", epilog=SHOW_EXAMPLES)
def show(
    config: ConfigFileOpt = None,
    method: MethodOpt = None,
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
) -> None:
    """Print the effective configuration: defaults, then the method preset, the --config file, and the flags.

    The same flags as [bold]regcli register[/bold]; unknown keys in the YAML file are rejected (exit code 7).
    """
    from regcli.cli.common import emit_json
    from regcli.config import build_config, refuse_flags_without_effect

    overrides = config_overrides(method, device, threads, seed, deterministic, working_spacing, affine_metric,
                                 affine_init, affine, iterations, inverse, html, transform, optimizer, prompt_labels,
                                 prompt_landmarks, fine_spacing, modality, io, intensity_weight, precision, max_memory)
    cfg = build_config(config, overrides)
    refuse_flags_without_effect(cfg, overrides)
    data = cfg.model_dump(mode="json")
    if json_out:
        emit_json(data)
        return
    import sys

    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
