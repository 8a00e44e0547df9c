"""Evaluate registrations on image pairs: register each pair (or reuse earlier outputs) and score it.

The scores per pair:

* ``dice_initial_mean``: mean Dice before registration (moving labels resampled onto the fixed grid through
  the identity in world space), so the improvement is visible;
* ``dice_mean`` and ``dice_per_label``: after registration, moving labels warped onto the fixed grid through
  the written transforms (``prefix1Warp.nii.gz`` then ``prefix0GenericAffine.mat``, nearest neighbour);
* ``hd95_mean`` / ``hd95_per_label`` (mm), and ``hd95_labels_lost``: the labels that HD95 leaves out because
  warping lost them (undefined for an empty map; their Dice is 0 and counts in ``dice_mean``);
* ``pct_nonpos_jac`` (% of fixed-grid voxels with det J <= 0) and ``sdlogj`` (std of log det J), of the
  *whole* fixed -> moving map (field and affine), in physical units;
* ``tre_initial_mean`` / ``tre_mean`` (mm) when landmark files are given: ``|T(x_fixed) - x_moving|``;
* ``seconds`` (registration time from the pair's report), ``wall_seconds`` (the whole ``regcli register``
  process), ``peak_rss_mb`` (peak resident memory of that process) and ``cuda_max_memory_mb`` when on GPU.

Labels scored: those (other than 0) present in both the fixed and the (unwarped) moving label map, so a
structure that disappears after warping counts as Dice 0 instead of being dropped from the mean. The label maps
are checked as ``register`` checks them (:func:`regcli.pipeline.check_label_inputs`). With ``--transforms-from``,
the images the prefix's report recorded are compared with the pair's (:func:`transforms_inputs_check`).

Why a fresh ``python -m regcli register`` process per pair: the peak resident set size (``ru_maxrss``) of a
process only ever grows, so in one process the peak of pair 5 would include pairs 1-4 (and tracemalloc does
not see torch/ITK allocations). Each child reports its own peak (``VmHWM``, which starts afresh at
``exec``; ``ru_maxrss`` would carry over the parent's high-water mark). It also isolates
pairs: a crash or out-of-memory kill of one pair becomes a "failed" row instead of killing the table. The
price is the interpreter and torch start-up per pair (about 1-2 s), which is reported apart (``wall_seconds``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from regcli.config import NETWORK_METHODS, RegisterConfig
from regcli.io.images import check_readable_file, read_grid
from regcli.errors import ConfigError, InputError, RegcliError

REQUIRED_COLUMNS = ("fixed_image", "moving_image")
OPTIONAL_COLUMNS = ("fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks", "fixed_mask",
                    "moving_mask")
NAME_COLUMNS = ("pair", "name", "id")

HEADLINE = ("dice_initial_mean", "dice_mean", "hd95_mean", "pct_nonpos_jac", "sdlogj", "tre_initial_mean",
            "tre_mean", "seconds", "wall_seconds", "peak_rss_mb", "cuda_max_memory_mb")


@dataclass
class Pair:
    """One fixed/moving pair with its optional scoring inputs (paths are absolute or CWD-relative)."""

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Optional[Path] = None
    moving_labels: Optional[Path] = None
    fixed_landmarks: Optional[Path] = None
    moving_landmarks: Optional[Path] = None
    fixed_mask: Optional[Path] = None
    moving_mask: Optional[Path] = None
    task: Optional[str] = None  # from a dataset manifest (regcli.manifest)
    label_ids: Optional[tuple[int, ...]] = None  # the labels that count (default: all that both maps share)
    register_flags: tuple[str, ...] = ()  # --modality, --no-affine (the dataset's), prompt inputs: before the user's

    def files(self) -> dict[str, Path]:
        d = {"fixed_image": self.fixed, "moving_image": self.moving}
        for c in OPTIONAL_COLUMNS:
            v = getattr(self, c)
            if v is not None:
                d[c] = v
        return d


# ------------------------------------------------------------------------------------------------ manifest
def pair_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot name a pair, or None: its outputs are ``OUTDIR/<name>_...``, so a name with a path
    separator (``../x``, ``a/b``), or that is empty, ``.`` or ``..``, would put them elsewhere or nowhere."""
    if name in ("", ".", ".."):
        return f"pair name '{name}' must be a plain name (not empty, '.' or '..')"
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in name for sep in seps):
        return (f"pair name '{name}' must not contain '/' or '\\' (the pair's outputs are named "
                f"OUTDIR/<pair>_...)")
    return None


def check_pair(pair: Pair, where: str = "") -> Pair:
    """Refuse a pair with missing files, a labels/landmarks column given for one side only, or landmark files
    that are unreadable or do not correspond (before anything is registered)."""
    where = where or f"pair '{pair.name}'"
    for col, p in pair.files().items():
        check_readable_file(Path(p), f"{where}, {col}")
    for a, b in (("fixed_labels", "moving_labels"), ("fixed_landmarks", "moving_landmarks")):
        if (getattr(pair, a) is None) != (getattr(pair, b) is None):
            raise InputError(f"{where}: {a} and {b} must be given together")
    if pair.fixed_landmarks is not None:
        from regcli.reports.landmarks import pair_points, read_points_csv

        try:
            pair_points(read_points_csv(pair.fixed_landmarks, role="fixed landmarks"),
                        read_points_csv(pair.moving_landmarks, role="moving landmarks"))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return pair


def read_manifest(path: str | os.PathLike) -> list[Pair]:
    """Read a CSV of pairs; relative paths are relative to the CSV's folder.

    Columns: ``fixed_image``, ``moving_image`` (required); ``fixed_labels``, ``moving_labels``,
    ``fixed_landmarks``, ``moving_landmarks``, ``fixed_mask``, ``moving_mask`` (optional, empty cells allowed);
    ``pair`` (or ``name``/``id``) to name the pairs (default ``pair001``, ``pair002``, ...). Every file is
    checked before anything runs.

    Raises:
        InputError: unreadable or non-UTF-8 CSV, a missing or repeated column, a row with more fields than the
            header, duplicate pair names, or a missing file (named with its line and column).
    """
    from regcli.manifest import read_csv

    path = Path(path)
    check_readable_file(path, "pair manifest")
    base = path.parent
    header, rows = read_csv(path, "pair manifest")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"pair manifest '{path}' lacks column(s) {', '.join(missing)}; its header is "
                         f"{','.join(header) or '(empty)'}")
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS) | set(NAME_COLUMNS)
    unknown = [c for c in header if c not in known]
    if unknown:
        raise InputError(f"pair manifest '{path}' has unknown column(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    name_col = next((c for c in NAME_COLUMNS if c in header), None)
    pairs: list[Pair] = []
    seen: set[str] = set()
    for i, (line, row) in enumerate(rows, start=1):
        if not any(row.values()):
            continue
        name = row.get(name_col, "") if name_col else ""
        name = name or f"pair{i:03d}"
        problem = pair_name_problem(name)
        if problem is not None:
            raise InputError(f"pair manifest '{path}' line {line}: {problem}")
        if name in seen:
            raise InputError(f"pair manifest '{path}' line {line}: duplicate pair name '{name}'")
        seen.add(name)

        def p(col: str) -> Optional[Path]:
            v = row.get(col, "")
            if not v:
                return None
            q = Path(v).expanduser()
            return q if q.is_absolute() else base / q

        for col in REQUIRED_COLUMNS:
            if not row.get(col):
                raise InputError(f"pair manifest '{path}' line {line}: column {col} is empty")
        pair = Pair(name=name, fixed=p("fixed_image"), moving=p("moving_image"),
                    **{c: p(c) for c in OPTIONAL_COLUMNS})
        check_pair(pair, f"pair manifest '{path}' line {line}")
        pairs.append(pair)
    if not pairs:
        raise InputError(f"pair manifest '{path}' has no pairs")
    return pairs


def read_pairs(path: str | os.PathLike, tasks: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Pair]:
    """The pairs of a pair CSV (:func:`read_manifest`), or of every dataset of a dataset manifest
    (:mod:`regcli.manifest`) that has a ``pairs`` CSV, chosen by task (``tasks``: only these; ``exclude``: not
    these). A dataset's pairs are named ``<dataset>_<pair>`` and carry its task and ``label_ids``; they are
    registered with its ``modality`` (``--modality``, for the network methods) and, for ``align: none``, without
    the affine stage (``--no-affine``), unless the command's own flags say otherwise."""
    from regcli.manifest import is_dataset_manifest, load_datasets, select

    if not is_dataset_manifest(path):
        if tasks or exclude:
            raise ConfigError(f"--task/--exclude-task need a dataset manifest; '{path}' is a CSV of pairs")
        return read_manifest(path)
    datasets = load_datasets(path)
    names = [ds.name for ds in datasets if ds.pairs]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:  # a dataset's default name is its CSV's folder name: two data/pairs.csv clash
        raise InputError(f"dataset manifest '{path}': two datasets are named '{dup}' (their pairs would share "
                         f"names and outputs); give each a distinct 'name:'")
    out: list[Pair] = []
    seen: set[str] = set()
    for ds in select(datasets, tasks, exclude):
        if not ds.pairs:
            continue
        for p in read_manifest(ds.pairs):
            flags = ("--modality", ds.modality) + (("--no-affine",) if ds.align == "none" else ())
            name = f"{ds.name}_{p.name}"
            problem = pair_name_problem(name)  # a dataset name such as '../x'
            if problem is not None:
                raise InputError(f"dataset manifest '{path}': dataset '{ds.name}': {problem}")
            if name in seen:  # e.g. datasets 'a' (pair 'b_c') and 'a_b' (pair 'c')
                raise InputError(f"dataset manifest '{path}': dataset '{ds.name}': duplicate pair name '{name}' "
                                 f"(pairs are named <dataset>_<pair>)")
            seen.add(name)
            out.append(Pair(**{**p.__dict__, "name": name, "task": ds.task_name,
                               "label_ids": ds.label_ids, "register_flags": flags}))
    if not out:
        raise InputError(f"dataset manifest '{path}': no chosen dataset has a pairs CSV to register")
    return out


def _flag(column: str) -> str:
    """The ``regcli register`` flag that takes a pair's CSV column (``fixed_mask`` -> ``--fixed-mask``)."""
    return "--" + column.replace("_", "-")


def check_config_for_pairs(config: RegisterConfig, pairs: Sequence[Pair], columns: bool = True) -> None:
    """Refuse, once and before any pair is registered, a configuration that each pair's ``regcli register`` child
    would refuse for the same reason: what ``config`` and the columns the pairs fill decide, never the images'
    contents. The same checks as the child's: :func:`regcli.pipeline.check_prompt_config` (prompts that nothing
    would use, named by their configuration key, ``prompts.labels``: evaluate and batch take them only from
    ``--config``) and :func:`regcli.pipeline.refuse_unread_masks` (a ``fixed_mask``/``moving_mask`` column that
    nothing would read). A mask column counts when any pair fills it (each pair that does would fail), and the
    message says how many do. A pair of a dataset with ``align: none`` is registered with ``--no-affine``
    (:func:`read_pairs`), so its masks are checked with the affine stage off. ``columns=False``: the pair came
    from flags (``regcli evaluate --fixed --moving``), which the message names instead.

    Raises:
        ConfigError: one line naming the problem and the CSV column (exit 7).
    """
    from regcli.pipeline import check_prompt_config, refuse_unread_masks

    check_prompt_config(config)
    no_affine = [p for p in pairs if "--no-affine" in p.register_flags]
    groups = [([p for p in pairs if "--no-affine" not in p.register_flags], config, "")]
    if no_affine:
        off = config.model_copy(update={"affine": config.affine.model_copy(update={"enabled": False})})
        groups.append((no_affine, off, ", registered with --no-affine (align: none)"))
    for group, cfg, how in groups:
        given = [f"CSV column {col} ({n} of {len(pairs)} pair(s){how})" if columns else _flag(col)
                 for col in ("fixed_mask", "moving_mask")
                 if (n := sum(getattr(p, col) is not None for p in group))]
        refuse_unread_masks(cfg, given)


def with_prompt_inputs(config: RegisterConfig, pairs: Sequence[Pair], columns: bool = True) -> list[Pair]:
    """``pairs`` with the files the configuration's prompts read passed on to each pair's ``regcli register``
    child (``--fixed-labels``/``--moving-labels`` for ``prompts.labels``, ``--fixed-landmarks``/
    ``--moving-landmarks`` for ``prompts.landmarks``, from the pair's CSV columns, before the user's flags). The
    child reads a pair's labels and landmarks only for that: evaluate and batch score them in this process.
    ``columns=False``: the pair came from flags (``regcli evaluate --fixed --moving``), which the message names
    instead of CSV columns.

    Raises:
        ConfigError: one line, when prompts are configured and some pairs have no such columns (every one of
            them would fail), before any pair is registered.
    """
    from dataclasses import replace

    pc = config.prompts
    needs = [(kind, cols) for kind, on, cols in (
        ("labels", pc.labels is not None, ("fixed_labels", "moving_labels")),
        ("landmarks", pc.landmarks, ("fixed_landmarks", "moving_landmarks"))) if on]
    for kind, cols in needs:
        lacking = [p.name for p in pairs if any(getattr(p, c) is None for c in cols)]
        if lacking and not columns:
            raise ConfigError(f"prompts.{kind} needs both {_flag(cols[0])} and {_flag(cols[1])}")
        if lacking:
            raise ConfigError(f"prompts.{kind} needs the CSV columns {cols[0]} and {cols[1]}: {len(lacking)} of "
                              f"{len(pairs)} pair(s) have none (first: '{lacking[0]}')")
    out = []
    for p in pairs:
        flags = [x for _, cols in needs for c in cols for x in (_flag(c), str(getattr(p, c)))]
        out.append(replace(p, register_flags=tuple(flags) + p.register_flags) if flags else p)
    return out


# ------------------------------------------------------------------------------------------------ transforms
def transform_files(prefix: str) -> list[Path]:
    """The ANTs-style transform files written for ``prefix``, in apply order: ``[1Warp, 0GenericAffine]``.

    When ``prefix``'s ``Report.json`` lists the run's outputs (``regcli register`` writes it last), only the files
    it lists count, so a file another run left under the same prefix (an old ``1Warp`` beside a new affine-only
    result) is never combined with them. The report's paths are as the run was given them (relative to where it
    ran), so files are matched by name."""
    from regcli.reports.report import listed_outputs

    outputs = listed_outputs(prefix)
    listed = None if outputs is None else {Path(o).name for o in outputs}
    files = (Path(prefix + "1Warp.nii.gz"), Path(prefix + "0GenericAffine.mat"))
    return [f for f in files if f.exists() and (listed is None or f.name in listed)]


def format_prefix(template: str, pair: Pair, index: int) -> str:
    """``out/{pair}_`` -> ``out/pair001_``; placeholders ``{pair}`` and ``{index}`` (1-based)."""
    try:
        return template.format(pair=pair.name, index=index, name=pair.name)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--transforms-from '{template}': bad placeholder ({e}); use {{pair}} or {{index}}") \
            from None


# ------------------------------------------------------------------------------------------------ scoring
def score_pair(pair: Pair, transform=None, label_interp: str = "nearest", hd95: bool = True) -> dict:
    """Score one pair given its fixed -> moving transform.

    Args:
        pair: the pair (labels/landmarks optional).
        transform: object with ``map_points`` (fixed world LPS mm -> moving world LPS mm), usually the
            :class:`~regcli.transforms.CompositeTransform` read from ``[prefix1Warp.nii.gz,
            prefix0GenericAffine.mat]``; None = identity.
        label_interp: how moving labels are warped ("nearest" or "label").
        hd95: compute HD95 per label (the slowest metric).
    Returns:
        JSON-ready dict: ``dice_initial_mean``, ``dice_mean``, ``dice_per_label`` {label: Dice},
        ``dice_initial_per_label``, ``hd95_mean`` (mm, over the labels the warped map holds), ``hd95_labels_lost``
        (the others), ``hd95_per_label``, ``pct_nonpos_jac`` (%), ``sdlogj``, ``jacobian`` (full stats; ``in_mask``
        over the fixed mask, else the fixed labels, as in ``register``), ``tre_initial_mean``/``tre_mean`` (mm)
        and ``tre_per_landmark`` (mm); keys are absent when their inputs are.
    """
    from regcli.resample import resample_to_grid, warp

    out: dict[str, Any] = {}
    fixed_grid = read_grid(pair.fixed, "fixed image")  # header only, with the NIfTI qform/sform checks (G7)
    fl = None
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        from regcli.io.images import read_labels
        from regcli.pipeline import check_label_inputs
        from regcli.reports.metrics import dice_per_label, labels_lost_warning, nanmean, shared_labels

        fl = read_labels(pair.fixed_labels, "fixed labels")
        ml = read_labels(pair.moving_labels, "moving labels")
        # register's checks and words: maps with no label, or none inside their image, are refused; labels in one
        # map only are named; maps with no label in common fail the pair (there would be no Dice to score)
        check_label_inputs(fl, ml, fixed_grid, read_grid(pair.moving, "moving image"), where=f"pair '{pair.name}'",
                           refuse_disjoint=True)
        if not fl.grid.allclose(fixed_grid):
            fl = resample_to_grid(fl, fixed_grid, "nearest")
        labels = shared_labels(fl, ml)
        if pair.label_ids is not None:
            labels = [lab for lab in labels if lab in set(pair.label_ids)]
            if not labels:
                raise InputError(f"pair '{pair.name}': the label maps share none of the dataset's label_ids "
                                 f"{list(pair.label_ids)[:8]}")
        initial = warp(ml, None, fixed_grid, label_interp)
        warped = warp(ml, transform, fixed_grid, label_interp) if transform is not None else initial
        d0 = dice_per_label(fl, initial, labels)
        d1 = dice_per_label(fl, warped, labels)
        out["labels"] = labels
        out["dice_initial_mean"] = nanmean(d0.values())
        out["dice_mean"] = nanmean(d1.values())
        out["dice_per_label"] = d1
        out["dice_initial_per_label"] = d0
        if hd95:
            from regcli.reports.metrics import hd95_per_label, surface_mean

            h = hd95_per_label(fl, warped, labels)
            # over the labels present in both maps (medpy/MONAI: undefined for an empty map), unlike Dice: the
            # labels left out are recorded and named
            out["hd95_mean"], out["hd95_labels_lost"] = surface_mean(h)
            out["hd95_per_label"] = h
            labels_lost_warning(out["hd95_labels_lost"], len(labels), f"pair '{pair.name}'")
    if transform is not None:
        from regcli.reports.jacobian import jacobian_determinant, jacobian_region, jacobian_stats

        field = transform.to_displacement(fixed_grid) if hasattr(transform, "to_displacement") else None
        if field is not None:
            detj = jacobian_determinant(field)
            fixed_mask = None
            if pair.fixed_mask is not None:
                from regcli.io.images import read_mask

                fixed_mask = read_mask(pair.fixed_mask, "fixed mask")
            stats = jacobian_stats(detj, *jacobian_region(fixed_grid, fixed_mask, fl))  # as register's
            out["jacobian"] = stats
            out["pct_nonpos_jac"] = stats["pct_nonpos_jac"]
            out["sdlogj"] = stats["sdlogj"]
    if pair.fixed_landmarks is not None and pair.moving_landmarks is not None:
        out.update(landmark_errors(pair, transform))
    return out


def landmark_errors(pair: Pair, transform=None) -> dict:
    """TRE (mm) before and after: ``|x_moving - x_fixed|`` and ``|x_moving - T(x_fixed)|`` per landmark.

    Landmark CSVs hold LPS mm (``x,y,z`` columns); rows pair by an ``id`` column when both files have one,
    otherwise by position (:func:`regcli.reports.landmarks.tre`).
    """
    from regcli.reports.landmarks import read_points_csv, tre

    fx = read_points_csv(pair.fixed_landmarks, role="fixed landmarks")
    mv = read_points_csv(pair.moving_landmarks, role="moving landmarks")
    r = tre(fx, mv, transform)
    return {"tre_initial_mean": r["initial_mean_mm"], "tre_mean": r["tre_mean_mm"], "tre_max": r["tre_max_mm"],
            "tre_per_landmark": r["tre_per_landmark_mm"], "n_landmarks": r["n_landmarks"]}


# ------------------------------------------------------------------------------------------------ registering
@dataclass
class RunResult:
    """What a ``regcli register`` child process produced."""

    returncode: int
    report: Optional[dict]
    error: str
    wall_seconds: float
    peak_rss_mb: Optional[float]


def register_command(pair: Pair, prefix: str, method: str, config: Optional[Path] = None,
                     extra_args: Sequence[str] = (), overwrite: bool = False) -> list[str]:
    """The ``python -m regcli register`` command line of one pair. The images come last, after ``--``, so that
    a path starting with ``-`` (a CSV's ``-m.nii.gz``) is never read as an option."""
    cmd = [sys.executable, "-m", "regcli", "register", "-o", prefix, "--method", method, "--json", "--quiet"]
    if pair.fixed_mask is not None:
        cmd += ["--fixed-mask", str(pair.fixed_mask)]
    if pair.moving_mask is not None:
        cmd += ["--moving-mask", str(pair.moving_mask)]
    if config is not None:
        cmd += ["--config", str(config)]
    flags = list(pair.register_flags)  # the dataset's; the user's flags below win
    if method not in NETWORK_METHODS and "--modality" in flags:  # only the network methods read it
        i = flags.index("--modality")
        del flags[i:i + 2]
    cmd += flags
    if overwrite:
        cmd.append("--overwrite")
    return cmd + list(extra_args) + ["--", str(pair.fixed), str(pair.moving)]


def register_subprocess(pair: Pair, prefix: str, method: str, config: Optional[Path] = None,
                        extra_args: Sequence[str] = (), overwrite: bool = False,
                        timeout: Optional[float] = None) -> RunResult:
    """Run ``python -m regcli register`` (:func:`register_command`) for one pair in a fresh process and measure
    its peak memory.

    The child's stdout holds the report (``--json``); its stderr's last line is the error on failure.
    ``os.wait4``'s ``ru_maxrss`` is only an upper bound of the child's peak on Linux (it inherits the
    parent's high-water mark across fork and exec); the child's report carries the exact figure
    (``VmHWM``), which :func:`evaluate_pairs` prefers.
    """
    cmd = register_command(pair, prefix, method, config, extra_args, overwrite)
    env = dict(os.environ)
    env["REGCLI_NO_PROGRESS"] = "1"
    here = str(Path(__file__).resolve().parents[1])  # the child imports this same regcli, installed or not
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        rusage = None
        try:
            if timeout is None:
                _, status, rusage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            else:
                proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return RunResult(-9, None, f"timed out after {timeout:.0f} s", time.perf_counter() - t0, None)
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = proc.returncode
    report = None
    if stdout.strip():
        try:
            report = json.loads(stdout)
        except json.JSONDecodeError:
            report = None
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    error = ""
    if code != 0:
        error = lines[-1] if lines else f"exit code {code}"
        if code < 0:
            error = f"killed by signal {-code}" + (f" ({error})" if lines else "")
    rss = rusage.ru_maxrss / 1024.0 if rusage is not None else None  # Linux: KiB
    return RunResult(code, report, error, wall, rss)


def _from_report(report: Optional[dict]) -> dict:
    """Registration seconds, peak memory and warnings recorded in a register report."""
    if not report:
        return {}
    out = {}
    secs = report.get("total_seconds")
    if not isinstance(secs, (int, float)):
        secs = (report.get("stages") or {}).get("total")
    if isinstance(secs, (int, float)):
        out["seconds"] = float(secs)
    mem = report.get("memory") or {}
    if isinstance(mem.get("peak_rss_mb"), (int, float)):
        out["peak_rss_mb"] = float(mem["peak_rss_mb"])
    if isinstance(mem.get("cuda_max_allocated_mb"), (int, float)):
        out["cuda_max_memory_mb"] = float(mem["cuda_max_allocated_mb"])
    warnings = report.get("warnings")
    if isinstance(warnings, list) and warnings:
        out["warnings"] = [str(w) for w in warnings]
    return out


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluation:
    """Rows (one dict per pair) and the summary over successful pairs."""

    method: str
    rows: list[dict] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r.get("status") != "ok"]

    def summary(self, task: Optional[str] = None) -> dict:
        """``{metric: {"mean", "sd", "n"}}`` over the successful pairs (of ``task``) where the metric is finite (a
        failed pair's time and memory are in its row, not in the summary)."""
        out = {}
        rows = [r for r in self.rows if r.get("status") == "ok" and (task is None or r.get("task") == task)]
        for k in HEADLINE:
            v = np.asarray([r[k] for r in rows if isinstance(r.get(k), (int, float)) and
                            math.isfinite(r[k])], dtype=np.float64)
            if v.size:
                out[k] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                          "n": int(v.size)}
        return out

    def to_dict(self) -> dict:
        out = {"method": self.method, "pairs": self.rows, "summary": self.summary(),
               "n_pairs": len(self.rows), "n_failed": len(self.failed)}
        tasks = sorted({r["task"] for r in self.rows if r.get("task")})
        if tasks:
            out["summary_by_task"] = {t: self.summary(t) for t in tasks}
        return out

    def csv_text(self) -> str:
        """One row per pair: headline metrics, ``hd95_labels_lost`` (the labels HD95 leaves out, space-separated,
        when HD95 was scored), then Dice per label (``dice_<label>``, any integer label: ``dice_-5``)."""
        labels = sorted({int(k) for r in self.rows for k in (r.get("dice_per_label") or {})})
        lost = ["hd95_labels_lost"] if any("hd95_labels_lost" in r for r in self.rows) else []
        cols = ["pair", *(["task"] if any(r.get("task") for r in self.rows) else []), "status", "fixed_image",
                "moving_image", *HEADLINE, *lost]
        dice_cols = {f"dice_{lab}": lab for lab in labels}  # by column, not by parsing its name back
        cols += [*dice_cols, "error"]
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in self.rows:
            dpl = {int(k): v for k, v in (r.get("dice_per_label") or {}).items()}
            vals = []
            for c in cols:
                if c in dice_cols:
                    v = dpl.get(dice_cols[c])
                elif c == "hd95_labels_lost":
                    v = " ".join(str(lab) for lab in r[c]) if isinstance(r.get(c), list) else None
                else:
                    v = r.get(c)
                vals.append(_csv_value(v))
            w.writerow(vals)
        return buf.getvalue()


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def evaluate_pairs(
    pairs: Sequence[Pair],
    outdir: str | os.PathLike,
    method: str = "convexadam",
    transforms_from: Optional[str] = None,
    config: Optional[Path] = None,
    extra_args: Sequence[str] = (),
    overwrite: bool = False,
    label_interp: str = "nearest",
    hd95: bool = True,
    on_pair: Optional[Callable[[int, Pair, dict], None]] = None,
    register_fn: Callable[..., RunResult] = register_subprocess,
) -> Evaluation:
    """Register (or load) and score every pair; a failing pair gives a row with ``status`` "failed".

    Args:
        pairs: the pairs (see :func:`read_manifest`).
        outdir: where each pair's registration outputs go (``outdir/<pair>_...``).
        method: ``regcli register --method`` for every pair (ignored with ``transforms_from``).
        transforms_from: score existing outputs instead of registering: a prefix template such as
            ``out/{pair}_``; its ``1Warp.nii.gz`` and ``0GenericAffine.mat`` (and ``Report.json`` for time and
            memory) are read.
        config, extra_args: passed on to ``regcli register``.
        on_pair: callback ``(index, pair, row)`` after each pair (progress display).
    """
    outdir = Path(outdir)
    ev = Evaluation(method="existing:" + transforms_from if transforms_from else method)
    for i, pair in enumerate(pairs, start=1):
        prefix = format_prefix(transforms_from, pair, i) if transforms_from else None
        row = process_pair(pair, outdir, method, prefix, config=config, extra_args=extra_args, overwrite=overwrite,
                           label_interp=label_interp, hd95=hd95, register_fn=register_fn,
                           check_inputs=prefix is not None)
        ev.rows.append(row)
        if on_pair is not None:
            on_pair(i, pair, row)
    return ev


def pair_prefix(outdir: str | os.PathLike, pair: Pair) -> str:
    """Where a pair's registration outputs go: ``outdir/<pair>_``."""
    return str(Path(outdir) / f"{pair.name}_")


def process_pair(pair: Pair, outdir: str | os.PathLike, method: str, existing_prefix: Optional[str] = None,
                 config: Optional[Path] = None, extra_args: Sequence[str] = (), overwrite: bool = False,
                 label_interp: str = "nearest", hd95: bool = True,
                 register_fn: Callable[..., RunResult] = register_subprocess, check_inputs: bool = False) -> dict:
    """One row of an evaluation: register ``pair`` into ``outdir/<pair>_`` with a ``regcli register`` child (or,
    with ``existing_prefix``, read the transforms written there earlier) and score it. Never raises for a
    failing pair: its row has ``status`` "failed", ``error`` (one line) and ``exit_code``. A pair fails as a whole:
    when its registration succeeded but scoring it fails (e.g. an unreadable label map), the outputs the
    registration wrote are removed, as a failed registration writes none (outputs found with ``existing_prefix``
    are never removed). ``check_inputs``: with ``existing_prefix``, compare the images (and masks) its report
    recorded with the pair's (:func:`transforms_inputs_check`; ``evaluate --transforms-from``)."""
    from regcli.io.transforms import read_transform_list

    row: dict[str, Any] = {"pair": pair.name, "fixed_image": str(pair.fixed), "moving_image": str(pair.moving),
                           "status": "ok", **({"task": pair.task} if pair.task else {})}
    run = None
    try:
        if existing_prefix is not None:
            prefix = existing_prefix
            report_path = Path(prefix + "Report.json")
            existing = None
            if report_path.is_file():
                try:
                    existing = json.loads(report_path.read_text())
                    row.update(_from_report(existing))
                except (json.JSONDecodeError, OSError, AttributeError):
                    existing = None
            if check_inputs:
                row.update(transforms_inputs_check(pair, prefix, existing))
        else:
            prefix = pair_prefix(outdir, pair)
            run = register_fn(pair, prefix, method, config=config, extra_args=extra_args, overwrite=overwrite)
            row["wall_seconds"] = run.wall_seconds
            row.update(_from_report(run.report))
            if run.peak_rss_mb is not None and "peak_rss_mb" not in row:
                row["peak_rss_mb"] = run.peak_rss_mb  # the report's own figure is exact; this one is a bound
            if run.returncode != 0:
                raise _PairFailed(run.error, run.returncode)
        if row.get("warnings"):  # the registration's own (its stderr is not shown): not again while scoring
            from regcli.io.images import mark_warned

            mark_warned(row["warnings"])
        files = transform_files(prefix)
        if not files:
            raise InputError(no_transforms_message(prefix))
        row["transforms"] = [str(f) for f in files]
        transform = read_transform_list([str(f) for f in files])
        row.update(score_pair(pair, transform, label_interp=label_interp, hd95=hd95))
    except _PairFailed as e:
        row.update(status="failed", error=str(e), exit_code=e.exit_code)
    except RegcliError as e:
        row.update(status="failed", error=e.one_line(), exit_code=e.exit_code)
        if run is not None and run.returncode == 0:  # registered, then scoring failed: the pair fails as a whole
            _remove_outputs(prefix, run.report)
            row.pop("transforms", None)
    except BaseException:  # a bug or an interrupt while scoring: no outputs left that look like a success
        if run is not None and run.returncode == 0:
            _remove_outputs(prefix, run.report)
        raise
    return row


#: the register inputs that ``evaluate --transforms-from`` compares with the pair's files (masks: when both have one)
CHECKED_INPUTS = ("fixed", "moving", "fixed_mask", "moving_mask")


def transforms_inputs_check(pair: Pair, prefix: str, report: Optional[dict]) -> dict:
    """Whether the transforms under ``prefix`` were registered from this pair's files: the sha256 of the fixed and
    moving images (and masks, when both the report and the pair have one) that ``report`` (``prefix``'s
    ``Report.json``) recorded, against the pair's files. A mismatch is logged as one warning naming both paths
    of each image that differs, or saying "swapped" when the report's fixed image is the pair's moving one and
    vice versa; it is not refused (another copy of an image, or one preprocessed again, is legitimate).

    Returns:
        ``{}`` when the report records no checksum to compare; else ``{"transforms_inputs_match": bool}``, with
        ``"transforms_inputs_differ"`` (the roles that differ, :data:`CHECKED_INPUTS`) and
        ``"transforms_inputs_swapped": True`` on a mismatch, as applicable.
    """
    from regcli.reports.report import sha256_file

    recorded = report.get("inputs") if isinstance(report, dict) else None
    if not isinstance(recorded, dict):
        return {}
    memo: dict[str, Optional[str]] = {}

    def entry(role: str) -> Optional[dict]:
        e = recorded.get(role)
        return e if isinstance(e, dict) and isinstance(e.get("sha256"), str) else None

    def same(path: Optional[Path], ent: Optional[dict]) -> bool:
        if path is None or ent is None:
            return False
        try:  # the recorded size rules most mismatches out without reading the file
            if isinstance(ent.get("bytes"), int) and Path(path).stat().st_size != ent["bytes"]:
                return False
        except OSError:
            return False
        key = str(Path(path).resolve())
        if key not in memo:
            memo[key] = sha256_file(path)
        return memo[key] == ent["sha256"]

    mine = {role: getattr(pair, role) for role in CHECKED_INPUTS}
    roles = [r for r in CHECKED_INPUTS if entry(r) is not None and mine[r] is not None]
    if not roles:
        return {}
    differ = [r for r in roles if not same(mine[r], entry(r))]
    if not differ:
        return {"transforms_inputs_match": True}
    out: dict[str, Any] = {"transforms_inputs_match": False, "transforms_inputs_differ": differ}
    where = f"pair '{pair.name}': the transforms under '{prefix}'"
    swapped = ({"fixed", "moving"} <= set(differ) and same(pair.moving, entry("fixed"))
               and same(pair.fixed, entry("moving")))
    if swapped:
        out["transforms_inputs_swapped"] = True
        message = (f"{where} were registered with fixed '{entry('fixed').get('path')}' and moving "
                   f"'{entry('moving').get('path')}' ({prefix}Report.json): swapped with this pair's fixed "
                   f"'{pair.fixed}' and moving '{pair.moving}' (same sha256), so they map the other way and these "
                   f"scores are not those of this pair's registration")
    else:
        def what(role: str) -> str:
            return role.replace("_", " ") + ("" if role.endswith("mask") else " image")

        parts = [f"this pair's {what(r)} '{mine[r]}' is not the {what(r)} '{entry(r).get('path')}' they were "
                 f"registered with" for r in differ]
        message = (f"{where} were registered from other files ({prefix}Report.json, by sha256): " + "; ".join(parts)
                   + "; scored anyway (fine if it is another copy or a preprocessing of the same image)")
    logging.getLogger("regcli").warning(message)
    return out


def no_transforms_message(prefix: str) -> str:
    """Why no transform is found for ``prefix`` (:func:`transform_files`), in one line: none written there, or
    files that its ``Report.json`` does not list (a report copied or renamed from another prefix names that
    prefix's files; only the files a report lists are the run's)."""
    from regcli.reports.report import listed_outputs

    names = ("1Warp.nii.gz", "0GenericAffine.mat")
    present = [prefix + n for n in names if Path(prefix + n).exists()]
    outputs = listed_outputs(prefix)
    if present and outputs is not None:
        listed = [o for o in outputs if o.endswith(names)]
        own = {Path(prefix + n).name for n in names}
        if listed and not any(Path(o).name in own for o in listed):
            return (f"no transforms found for prefix '{prefix}': {' and '.join(present)} exist, but "
                    f"{prefix}Report.json lists other file names ({', '.join(listed)}), so they are not that run's: a "
                    f"report copied or renamed from another prefix? Score that prefix, or remove or fix the report")
        return (f"no transforms found for prefix '{prefix}': {' and '.join(present)} exist, but {prefix}Report.json "
                f"does not list them (it lists {', '.join(listed) or 'no transform'}, missing): files another run "
                f"left there")
    return (f"no transforms found for prefix '{prefix}' (expected {prefix}1Warp.nii.gz and/or "
            f"{prefix}0GenericAffine.mat)")


def _remove_outputs(prefix: str, report: Optional[dict]) -> None:
    """Remove what a ``regcli register`` child wrote for ``prefix``: the files its report lists (else the usual
    ANTs-style names), so that a pair that failed leaves no outputs, as when its registration fails."""
    listed = report.get("outputs") if isinstance(report, dict) else None
    if not isinstance(listed, list):
        listed = [prefix + s for s in ("0GenericAffine.mat", "1Warp.nii.gz", "1InverseWarp.nii.gz", "Warped.nii.gz",
                                       "Report.html", "Report.json")]
    folder = Path(prefix).resolve().parent
    for name in listed:
        path = Path(str(name))
        if path.resolve().parent == folder:  # the pair's own outputs, nothing else
            path.unlink(missing_ok=True)


class _PairFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code if exit_code > 0 else 1


def write_results(ev: Evaluation, outdir: str | os.PathLike) -> list[Path]:
    """Write ``outdir/evaluation.csv`` and ``outdir/evaluation.json`` atomically; returns their paths."""
    from regcli.io.atomic import atomic_write_text

    outdir = Path(outdir)
    csv_path, json_path = outdir / "evaluation.csv", outdir / "evaluation.json"
    atomic_write_text(csv_path, ev.csv_text())
    atomic_write_text(json_path, json.dumps(_jsonable(ev.to_dict()), indent=2, allow_nan=False) + "\n")
    return [csv_path, json_path]


def _jsonable(obj: Any) -> Any:
    """NaN/Inf -> None, numpy -> Python, dict keys -> str (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


__all__ = ["Pair", "read_manifest", "read_pairs", "check_pair", "check_config_for_pairs", "with_prompt_inputs",
           "score_pair", "landmark_errors", "register_command", "register_subprocess", "RunResult", "Evaluation",
           "evaluate_pairs", "process_pair", "write_results", "transform_files", "format_prefix",
           "transforms_inputs_check", "no_transforms_message"]
