"""Shared pieces of the command-line interface: option aliases, consoles, logging, progress, JSON.

Keep this module light: it is imported when ``regcli --help`` renders, so it must not import torch,
SimpleITK, numpy or any regcli module that does. Heavy imports live inside the command functions.

Stream contract (RELIABILITY O5):

* **stdout** carries results only: a table, a value, or with ``--json`` exactly one JSON object.
* **stderr** carries everything else: logs, progress bars, warnings, the one-line error message.
* ``--quiet`` prints nothing on success (warnings and errors still go to stderr).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from typing import Annotated

from regcli.progress import NullProgress

LOGGER_NAME = "regcli"

# --------------------------------------------------------------------------------------------- options
# Existing, readable input files: Typer refuses missing files, directories and unreadable files with a
# usage error (exit code 2) before the command runs (RELIABILITY E2).
_IN = dict(exists=True, file_okay=True, dir_okay=False, readable=True, resolve_path=False)


def input_file_argument(help: str, metavar: str = "FILE") -> Any:
    return typer.Argument(help=help, metavar=metavar, show_default=False, **_IN)


def input_file_option(*names: str, help: str, metavar: str = "FILE", panel: Optional[str] = None) -> Any:
    return typer.Option(*names, help=help, metavar=metavar, show_default=False, rich_help_panel=panel, **_IN)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout and nothing else there.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success (warnings and errors still go to stderr).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More logging on stderr (debug level).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (refused by default).")]


def examples(*lines: str) -> str:
    """Help epilog listing examples (one paragraph each; rich markup brackets escaped)."""
    body = "\n\n".join("  " + esc(line) for line in lines)
    return f"[bold]Examples[/bold]\n\n{body}"


def esc(text: str) -> str:
    """Escape ``[`` so that rich markup in help texts shows ANTs specs like ``[file,1]`` literally."""
    return text.replace("[", "\\[")


# --------------------------------------------------------------------------------------------- output
def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return str(obj)


def _finite(obj: Any) -> Any:
    """Replace NaN/Inf floats by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any, indent: Optional[int] = 2) -> str:
    """Strict JSON (NaN -> null) of dicts holding paths, numpy values and pydantic models."""
    plain = json.loads(json.dumps(obj, default=_json_default))
    return json.dumps(_finite(plain), indent=indent, allow_nan=False)


def emit_json(obj: Any) -> None:
    """Write one JSON object on stdout (the only thing a ``--json`` command prints there)."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def stderr_console():
    """A rich console on stderr (resolves ``sys.stderr`` at write time, so test runners can capture it)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console():
    """A rich console on stdout; when stdout is not a terminal, wide enough that tables do not wrap."""
    from rich.console import Console

    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Console(highlight=False, width=None if tty else 200)


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@dataclass
class Ui:
    """How one command talks to the user.

    Attributes:
        quiet: nothing on success (``--quiet``).
        verbose: debug logging (``--verbose``).
        json: results as one JSON object on stdout (``--json``); human output then only on stderr.
    """

    quiet: bool = False
    verbose: bool = False
    json: bool = False

    def __post_init__(self) -> None:
        self.err = stderr_console()
        setup_logging(self)

    # ---- messages on stderr
    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False, highlight=False)

    def rich(self, renderable: Any) -> None:
        """A rich renderable (table, styled text) on stderr unless quiet."""
        if not self.quiet:
            self.err.print(renderable)

    def warn(self, message: str) -> None:
        """Warnings are shown even with --quiet."""
        self.err.print(f"[yellow]Warning:[/yellow] {esc(message)}")

    # ---- results on stdout
    def result(self, obj: dict, human: Any = None) -> None:
        """``--json``: the object on stdout; otherwise ``human`` (a rich renderable or text) on stdout."""
        if self.json:
            emit_json(obj)
        elif human is not None and not self.quiet:
            stdout_console().print(human)

    def progress(self):
        """A :class:`regcli.progress.Progress` for library calls (rich bars, stage logs, or nothing)."""
        if self.quiet:
            return NullProgressContext()
        if stderr_is_tty() and not os.environ.get("REGCLI_NO_PROGRESS"):
            return RichProgress(self.err)
        return LogProgress()


class _RegcliLogHandler(logging.Handler):
    """Forward ``regcli`` log records to the stderr console (plays well with live progress bars)."""

    _regcli_cli = True

    def __init__(self, console, level: int) -> None:
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            style = {logging.WARNING: "yellow", logging.ERROR: "red"}.get(record.levelno)
            prefix = "Warning: " if record.levelno == logging.WARNING else ""
            self.console.print(prefix + msg, style=style, markup=False, highlight=False)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(ui: Ui) -> logging.Logger:
    """Route the ``regcli`` logger to stderr: WARNING with --quiet, DEBUG with --verbose, else INFO."""
    level = logging.WARNING if ui.quiet else (logging.DEBUG if ui.verbose else logging.INFO)
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_regcli_cli", False):
            logger.removeHandler(h)
    handler = _RegcliLogHandler(ui.err, level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


def log() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


# --------------------------------------------------------------------------------------------- progress
class NullProgressContext(NullProgress):
    """Progress that shows nothing (``--quiet``), usable as a context manager."""

    def __enter__(self) -> "NullProgressContext":
        return self

    def __exit__(self, *exc) -> None:
        pass


class LogProgress(NullProgressContext):
    """Progress for non-interactive stderr: one log line when a stage starts and when it ends."""

    def __init__(self) -> None:
        self._t0: dict[str, float] = {}

    def start(self, stage: str, total: int) -> None:
        self._t0[stage] = time.perf_counter()
        log().info("%s: started (%d steps)", stage, total)

    def finish(self, stage: str) -> None:
        t0 = self._t0.pop(stage, None)
        if t0 is not None:
            log().info("%s: done in %.1f s", stage, time.perf_counter() - t0)


class RichProgress:
    """Rich progress bars on stderr, one per stage, removed when the command ends (transient).

    Implements the :class:`regcli.progress.Progress` protocol; a finished stage leaves one line
    ``stage done in N s`` above the bars.
    """

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self._bars = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )
        self._tasks: dict[str, Any] = {}
        self._t0: dict[str, float] = {}

    def __enter__(self) -> "RichProgress":
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.stop()

    def start(self, stage: str, total: int) -> None:
        if stage in self._tasks:
            return
        self._t0[stage] = time.perf_counter()
        self._tasks[stage] = self._bars.add_task(esc(stage), total=max(int(total), 1), info="")

    def update(self, stage: str, completed: int, info: str = "") -> None:
        if stage not in self._tasks:
            self.start(stage, max(int(completed), 1))
        self._bars.update(self._tasks[stage], completed=completed, info=esc(info))

    def finish(self, stage: str) -> None:
        tid = self._tasks.pop(stage, None)
        if tid is None:
            return
        self._bars.remove_task(tid)
        dt = time.perf_counter() - self._t0.pop(stage, time.perf_counter())
        self._bars.console.print(f"[green]✓[/green] {esc(stage)} [dim]{dt:.1f} s[/dim]")


# --------------------------------------------------------------------------------------------- misc
def command_line() -> str:
    """The command as typed (for report.json)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "regcli")):
        argv[0] = "regcli"
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def fmt_float(v: Any, digits: int = 3) -> str:
    """Compact number for tables: ``-`` for None/NaN."""
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "-"
    return f"{f:.{digits}f}"


# --------------------------------------------------------------------------------------------- config flags
# Flags shared by `register`, `config show` and `evaluate`; every flag defaults to None so that an unset
# flag never overrides the --config YAML file (regcli.config.build_config drops None values).
_CFG = "Configuration (flags override --config)"


class Method(str, Enum):
    convexadam = "convexadam"
    samconvex = "samconvex"
    dio = "dio"
    foundation = "foundation"
    promptreg = "promptreg"
    affine = "affine"
    rigid = "rigid"


Transform = Enum("Transform", {t: t for t in ("freeform", "svf", "greedy", "bspline", "affine", "rigid")}, type=str)
Optimizer = Enum("Optimizer", {t: t for t in ("adam", "sgd", "lbfgs")}, type=str)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class AffineMetric(str, Enum):
    lncc = "lncc"
    mi = "mi"
    mse = "mse"


class AffineInit(str, Enum):
    moments = "moments"
    center = "center"
    geometry = "geometry"
    none = "none"


ConfigFileOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML file with RegisterConfig options (see `regcli config schema`); flags override it.",
    metavar="YAML", show_default=False, rich_help_panel=_CFG, **_IN)]
MethodOpt = Annotated[Optional[Method], typer.Option(
    "--method", "-m", help="Preset: convexadam (affine + deformable, default), samconvex (affine + learned "
    "anatomical embeddings), dio (affine + learned feature images registered by the IO solver), foundation (affine + "
    "a uniGradICON-compatible network), promptreg (affine + the task-prompted PromptReg network), affine, or rigid.",
    case_sensitive=False, show_default=False, rich_help_panel=_CFG)]
DeviceOpt = Annotated[Optional[Device], typer.Option(
    "--device", help="auto (CUDA when available), cpu or cuda. Default auto.", case_sensitive=False,
    show_default=False, rich_help_panel=_CFG)]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", min=1, help="CPU threads for torch and ITK (default: all cores).", show_default=False,
    rich_help_panel=_CFG)]
#: the range of a seed (regcli.config.SEED_MIN/SEED_MAX, a signed 64-bit integer; not imported: this module stays
#: light): the flags refuse a seed outside it with a usage error (exit 2) naming the flag
SEED_RANGE = dict(min=-(2 ** 63), max=2 ** 63 - 1)
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default 0; a signed 64-bit integer).",
                                                show_default=False, rich_help_panel=_CFG, **SEED_RANGE)]
DeterministicOpt = Annotated[Optional[bool], typer.Option(
    "--deterministic/--no-deterministic",
    help="Deterministic algorithms: bit-identical runs for the same seed (on the CPU, and the same --threads; "
    "on CUDA, the same GPU model and torch).",
    show_default=False, rich_help_panel=_CFG)]
WorkingSpacingOpt = Annotated[Optional[float], typer.Option(
    "--working-spacing", metavar="MM",
    help="Isotropic voxel size (mm) of the deformable working grid (default 2).", show_default=False,
    rich_help_panel=_CFG)]
AffineMetricOpt = Annotated[Optional[AffineMetric], typer.Option(
    "--affine-metric", case_sensitive=False,
    help="Affine-stage similarity: lncc (same contrast, default), mi (across contrasts), mse.",
    show_default=False, rich_help_panel=_CFG)]
AffineInitOpt = Annotated[Optional[AffineInit], typer.Option(
    "--affine-init", case_sensitive=False,
    help="Affine initialisation: moments (default), center, geometry (image centres), none.",
    show_default=False, rich_help_panel=_CFG)]
AffineOnOpt = Annotated[Optional[bool], typer.Option(
    "--affine/--no-affine", help="Run the affine stage (default yes; --no-affine: images already aligned).",
    show_default=False, rich_help_panel=_CFG)]
IterationsOpt = Annotated[Optional[str], typer.Option(
    "--iterations", "--io-iters", metavar="N|NxNxN", help="Instance-optimisation iterations of the deformable "
    "stage: convexadam instance.iterations (default 80), samconvex samconvex.io_iterations (50), dio one count per "
    "solver level (dio.iterations, default 80x40x20), foundation and promptreg <method>.io_iterations (50; the kind "
    "is --io).",
    show_default=False, rich_help_panel=_CFG)]
InverseOpt = Annotated[Optional[bool], typer.Option(
    "--inverse/--no-inverse", help="Also write prefix1InverseWarp.nii.gz (default yes).", show_default=False,
    rich_help_panel=_CFG)]
HtmlOpt = Annotated[Optional[bool], typer.Option(
    "--html/--no-html", help="Write prefixReport.html with figures (default yes).", show_default=False,
    rich_help_panel=_CFG)]


TransformOpt = Annotated[Optional[Transform], typer.Option(
    "--transform", help="Transform model of the instance-optimisation stage, for every method: freeform "
    "(default), svf (diffeomorphic, scaling and squaring), greedy (compositive diffeomorphic, SyN-style), bspline "
    "(control points every instance.bspline_spacing_mm), affine, rigid.", case_sensitive=False,
    show_default=False, rich_help_panel=_CFG)]
FineSpacingOpt = Annotated[Optional[float], typer.Option(
    "--fine-spacing", metavar="MM", help="After the deformable stage, refine the field on "
    "the fixed image's grid at this finer spacing (e.g. 1): sharper boundaries for some seconds more "
    "(instance.fine_spacing_mm; default: off).", show_default=False, rich_help_panel=_CFG)]
IntensityWeightOpt = Annotated[Optional[float], typer.Option(
    "--intensity-weight", metavar="W", help="Same-contrast pairs only (e.g. T1w to T1w): the intensities join "
    "MIND-SSC in the working-grid and fine refinements with this weight (0.5 on T1w brains, docs/benchmarks.md; "
    "instance.refine_intensity_weight; default 0). Never for different contrasts.", show_default=False,
    rich_help_panel=_CFG)]
Precision = Enum("Precision", {t: t for t in ("float32", "float64")}, type=str)
PrecisionOpt = Annotated[Optional[Precision], typer.Option(
    "--precision", help="Floating-point type of the solvers: float32 (default) or float64 (about twice the memory "
    "and time; to check that rounding does not matter). Networks always run in float32 (precision).",
    case_sensitive=False, show_default=False, rich_help_panel=_CFG)]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", metavar="SIZE", help="Refuse to start when the pre-flight estimate of peak memory is above "
    "SIZE (e.g. 8G, 6000M; a plain number is MB; default: the machine's RAM and swap). The estimate is logged and "
    "written to the report either way (max_memory_mb).", show_default=False, rich_help_panel=_CFG)]
Modality = Enum("Modality", {t: t for t in ("mri", "ct")}, type=str)
FoundationIO = Enum("FoundationIO", {t: t for t in ("none", "network", "field")}, type=str)
ModalityOpt = Annotated[Optional[Modality], typer.Option(
    "--modality", help="--method foundation or promptreg: intensity preparation, mri (clip to minimum..99th "
    "percentile, default) or ct (clip to -1000..1000 HU); both then scale to [0, 1] (<method>.modality).",
    case_sensitive=False, show_default=False, rich_help_panel=_CFG)]
FoundationIOOpt = Annotated[Optional[FoundationIO], typer.Option(
    "--io", help="--method foundation or promptreg: instance optimisation after the network: field (default; "
    "regcli's solver on MIND-SSC), network (foundation only, uniGradICON's: Adam on the weights, lr 2e-5) or none "
    "(the network alone); --iterations sets its count (<method>.io).", case_sensitive=False, show_default=False,
    rich_help_panel=_CFG)]
OptimizerOpt = Annotated[Optional[Optimizer], typer.Option(
    "--optimizer", help="Optimizer of the instance-optimisation stage: adam (default), sgd, lbfgs.",
    case_sensitive=False, show_default=False, rich_help_panel=_CFG)]
PromptLabelsOpt = Annotated[Optional[str], typer.Option(
    "--prompt-labels", metavar="IDS|all", help="Use these label ids of --fixed-labels/--moving-labels (comma "
    "separated, or 'all') as a soft-Dice term of the instance optimisation (prompts.label_weight).",
    show_default=False, rich_help_panel=_CFG)]
PromptLandmarksOpt = Annotated[Optional[bool], typer.Option(
    "--prompt-landmarks/--no-prompt-landmarks", help="Use --fixed-landmarks/--moving-landmarks as a "
    "landmark-distance term of the instance optimisation (prompts.landmark_weight).", show_default=False,
    rich_help_panel=_CFG)]


def output_folder(output: Path) -> Path:
    """A command's output folder, created if missing (checked before anything runs): a one-line OutputError
    when it is a file or cannot be created."""
    from regcli.errors import OutputError

    if output.exists() and not output.is_dir():
        raise OutputError(f"output folder '{output}' is a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder '{output}': {e.strerror or e}") from None
    return output


def parse_label_ids(text: Optional[str]):
    """``--prompt-labels`` value: None, ``"all"``, or a tuple of label ids (BadParameter otherwise)."""
    if text is None:
        return None
    text = text.strip()
    if text.lower() == "all":
        return "all"
    try:
        ids = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not 'all' or a comma-separated list of label ids",
                                 param_hint="--prompt-labels") from None
    if not ids or any(i <= 0 for i in ids):
        raise typer.BadParameter(f"'{text}': label ids must be positive integers", param_hint="--prompt-labels")
    return ids


_MEMORY_UNITS = {"": 1.0, "m": 1.0, "mb": 1.0, "mib": 1.0, "g": 1024.0, "gb": 1024.0, "gib": 1024.0,
                 "t": 1024.0 ** 2, "tb": 1024.0 ** 2, "tib": 1024.0 ** 2, "k": 1 / 1024, "kb": 1 / 1024,
                 "kib": 1 / 1024}


def parse_memory(text: Optional[str]) -> Optional[float]:
    """``--max-memory``: ``8G``, ``6000M``, ``1.5GiB`` or a plain number of MB, as MB (binary units: 1 G =
    1024 MB); a BadParameter otherwise."""
    if text is None:
        return None
    raw = str(text).strip().lower().replace(" ", "")
    num = raw.rstrip("kmgtib")
    unit = raw[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = float("nan")
    if unit not in _MEMORY_UNITS or not value > 0:
        raise typer.BadParameter(f"'{text}' is not a memory size like 8G, 6000M or 512 (MB)",
                                 param_hint="--max-memory")
    return value * _MEMORY_UNITS[unit]


def _value(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def parse_iterations(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--iterations``: ``80`` or ANTs-style ``80x40x20`` (one count per level); a BadParameter otherwise."""
    if text is None:
        return None
    try:
        counts = tuple(int(t) for t in str(text).lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a count or counts like 80x40x20", param_hint="--iterations")
    if any(c < 0 for c in counts):
        raise typer.BadParameter(f"'{text}': counts must be >= 0", param_hint="--iterations")
    return counts


def config_overrides(method=None, device=None, threads=None, seed=None, deterministic=None,
                     working_spacing=None, affine_metric=None, affine_init=None, affine=None, iterations=None,
                     inverse=None, html=None, transform=None, optimizer=None, prompt_labels=None,
                     prompt_landmarks=None, fine_spacing=None, modality=None, io=None, intensity_weight=None,
                     precision=None, max_memory=None) -> dict:
    """Nested override dict for :func:`regcli.config.build_config` (None = not given on the command line)."""
    return {
        "prompts": {"labels": parse_label_ids(prompt_labels), "landmarks": prompt_landmarks},
        "method": _value(method),
        "device": _value(device),
        "threads": threads,
        "seed": seed,
        "deterministic": deterministic,
        "working_spacing_mm": working_spacing,
        "affine": {"metric": _value(affine_metric), "init": _value(affine_init), "enabled": affine},
        "iterations": parse_iterations(iterations),
        "instance": {"transform": _value(transform), "optimizer": _value(optimizer),
                     "fine_spacing_mm": fine_spacing, "refine_intensity_weight": intensity_weight},
        "modality": _value(modality),  # foundation.* or promptreg.*, by method (regcli.config.network_override)
        "io": _value(io),
        "inverse_warp": inverse,
        "html_report": html,
        "precision": _value(precision),
        "max_memory_mb": parse_memory(max_memory),
    }
