"""Cohort registration: register every pair of a manifest in parallel, resumably, and summarise the cohort.

``regcli batch pairs.csv --method convexadam -o outdir/`` runs, for each pair of the manifest (the CSV that
``regcli evaluate`` reads):

1. **Resume.** A pair whose ``outdir/<pair>_Report.json`` exists, parses, lists outputs that all exist beside
   it (matched by file name, so a rerun from another working directory resumes), records the configuration
   this run asks for (:attr:`BatchJob.config_dump`; the keys of :data:`RESULT_FREE_KEYS` may differ) and
   records the pair's inputs (the images and the masks, and labels/landmarks the register child was given, by
   sha256: :func:`same_inputs`) is complete: it is not registered again. A pair registered before with another
   method, other options or other input files (a replaced image, or a pair name that now names another CSV row)
   is registered again. The register command writes every output to a temporary file and renames the report
   last, so a pair killed midway has no report and is registered again (``--overwrite`` for the pair's own
   files). Its scores come from ``outdir/<pair>_Scores.json`` when that file belongs to the same report (same
   sha256), the same scoring options and the same input files (sha256 of the label maps, landmarks and masks);
   otherwise the pair is scored again from its transform files. Each input file is hashed once per run.
2. **Isolation.** Each pair is registered by a fresh ``regcli register`` process
   (:func:`regcli.evaluation.register_subprocess`), so a crash, an out-of-memory kill or a bad file fails that
   pair's row (``status`` "failed" with its one-line error) and the others go on.
3. **Backends.** ``local`` (default): a pool of ``jobs`` workers on this machine, each running one pair at a
   time with ``threads`` torch threads. ``ray``: the same pair function as Ray tasks (``num_cpus=threads``)
   on the cluster at ``address`` (``auto``: the one this machine belongs to; none: a local Ray started for
   this run). Ray is the scheduler; the manifest's paths and ``outdir`` must be on storage every node sees.
4. **Summary.** ``batch.csv`` and ``batch.json`` (one row per pair, as ``regcli evaluate`` writes them, plus
   ``resumed``), ``batch_dice.png`` (Dice per structure over the cohort, box plots) and ``batch_runtime.png``
   (histogram of the seconds per pair).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from regcli.errors import ConfigError
from regcli.evaluation import Evaluation, Pair, _jsonable, pair_prefix, process_pair, transform_files

log = logging.getLogger("regcli")

SCORES_SUFFIX = "Scores.json"
#: the pair's files (:class:`regcli.evaluation.Pair` attributes) the register child always gets, named as its
#: report's ``inputs`` name them; ``fixed_labels``... are given to it only for prompts
REGISTER_ROLES = ("fixed", "moving", "fixed_mask", "moving_mask")
SCORING_ROLES = ("fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")
#: configuration keys that do not change what a registration computes: a report that differs from the
#: requested configuration only in these still counts as complete on resume
RESULT_FREE_KEYS = ("threads", "html_report", "max_memory_mb")


@dataclass(frozen=True)
class BatchJob:
    """What every pair gets: the register method and flags, and how it is scored."""

    outdir: str
    method: str = "convexadam"
    config: Optional[str] = None
    extra_args: tuple[str, ...] = ()
    label_interp: str = "nearest"
    hd95: bool = True
    #: the effective configuration (``RegisterConfig.model_dump(mode="json")``) that the register command will
    #: use; a resumed pair's report must record the same (None: any report counts)
    config_dump: Optional[dict] = field(default=None, compare=False)


@dataclass
class BatchResult:
    """The cohort's rows (manifest order) and how many pairs were resumed."""

    evaluation: Evaluation
    resumed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.evaluation.to_dict(), "n_resumed": len(self.resumed), "resumed": self.resumed}


def input_hashes(pair: Pair, memo: Optional[dict] = None) -> dict[str, Optional[str]]:
    """The sha256 of each of ``pair``'s files, by role (``fixed``, ``moving``, ``fixed_mask``, ...; only the
    roles the pair has; None for a file that cannot be read). ``memo`` (resolved path -> sha256) hashes a file
    that several pairs share once."""
    from regcli.reports.report import sha256_file

    memo = {} if memo is None else memo
    out = {}
    for role in REGISTER_ROLES + SCORING_ROLES:
        path = getattr(pair, role)
        if path is not None:
            key = str(Path(path).resolve())
            if key not in memo:
                memo[key] = sha256_file(path)
            out[role] = memo[key]
    return out


def same_inputs(report: dict, hashes: dict) -> bool:
    """Whether ``report`` (a register child's) was made from the files whose sha256 ``hashes`` gives: the same
    images and masks (a mask given to one and not the other differs), and the same label maps and landmarks
    where the child was given them (prompts). Compared by content, not by path."""
    recorded = report.get("inputs")
    if not isinstance(recorded, dict):
        return False

    def sha(role):
        entry = recorded.get(role)
        return entry.get("sha256") if isinstance(entry, dict) else None

    roles = REGISTER_ROLES + tuple(r for r in SCORING_ROLES if r in recorded)
    return all(sha(r) == hashes.get(r) for r in roles)


def complete_report(prefix: str, config_dump: Optional[dict] = None, hashes: Optional[dict] = None) -> Optional[str]:
    """The text of ``prefix``'s report if the pair is complete (the report parses, every output it lists
    exists beside it (matched by name: the report lists them as the run named them, relative to where it ran),
    when ``config_dump`` is given its configuration equals that one apart from :data:`RESULT_FREE_KEYS`, and
    when ``hashes`` (:func:`input_hashes`) is given it records those inputs), else None."""
    path = Path(prefix + "Report.json")
    try:
        text = path.read_text()
        report = json.loads(text)
        outputs = report.get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, str) and (path.parent / Path(o).name).is_file()
                                                for o in outputs):
        return None
    if config_dump is not None and _result_config(report.get("config")) != _result_config(config_dump):
        return None
    if hashes is not None and not same_inputs(report, hashes):
        return None
    return text


def _result_config(config) -> Optional[dict]:
    if not isinstance(config, dict):
        return None
    return {k: v for k, v in config.items() if k not in RESULT_FREE_KEYS}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def run_pair(pair: Pair, job: BatchJob, resume: bool = True, hashes: Optional[dict] = None) -> dict:
    """Register (unless complete and ``resume``) and score one pair; write its scores next to its outputs.

    ``hashes``: the pair's :func:`input_hashes` (computed here when not given). Runs in a pool thread or in a
    Ray worker: it reads and writes only the pair's own files. Never raises for a failing pair (see
    :func:`regcli.evaluation.process_pair`).
    """
    from regcli.io.atomic import atomic_write_text

    prefix = pair_prefix(job.outdir, pair)
    hashes = input_hashes(pair) if hashes is None else hashes
    report = complete_report(prefix, job.config_dump, hashes) if resume else None
    options = {"label_interp": job.label_interp, "hd95": job.hd95,
               "label_ids": list(pair.label_ids) if pair.label_ids is not None else None}
    if report is not None:
        try:
            cached = json.loads(Path(prefix + SCORES_SUFFIX).read_text())
            if (cached.get("report_sha256") == _sha(report) and cached.get("scoring") == options
                    and cached.get("inputs") == hashes):
                row = {**cached["row"], "fixed_image": str(pair.fixed), "moving_image": str(pair.moving)}
                if "transforms" in row:  # as named from here
                    row["transforms"] = [str(f) for f in transform_files(prefix)]
                return {**row, "resumed": True}
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass
        row = process_pair(pair, job.outdir, job.method, prefix, label_interp=job.label_interp, hd95=job.hd95)
        row["resumed"] = True
    else:
        config = Path(job.config) if job.config else None
        row = process_pair(pair, job.outdir, job.method, config=config, extra_args=job.extra_args, overwrite=True,
                           label_interp=job.label_interp, hd95=job.hd95)
        row["resumed"] = False
        report = complete_report(prefix) if row["status"] == "ok" else None
    if report is not None and row["status"] == "ok":
        cache = {"report_sha256": _sha(report), "scoring": options, "inputs": hashes,
                 "row": {k: v for k, v in row.items() if k != "resumed"}}
        atomic_write_text(Path(prefix + SCORES_SUFFIX), json.dumps(_jsonable(cache), allow_nan=False) + "\n")
    return row


def run_batch(pairs: Sequence[Pair], job: BatchJob, backend: str = "local", jobs: int = 1, threads: int = 1,
              address: Optional[str] = None, resume: bool = True,
              on_pair: Optional[Callable[[int, Pair, dict], None]] = None) -> BatchResult:
    """Every pair through :func:`run_pair` on the ``local`` pool or on ``ray``; rows in manifest order.

    ``on_pair(done, pair, row)`` is called in this process as each pair finishes (``done`` counts finished
    pairs). ``threads`` is what each pair's process uses (``--threads``, and Ray's ``num_cpus``).
    """
    job = BatchJob(**{**job.__dict__, "extra_args": tuple(job.extra_args) + ("--threads", str(threads))})
    memo: dict[str, Optional[str]] = {}
    hashes = [input_hashes(p, memo) for p in pairs]  # each file once, however many pairs share it
    if resume:
        for p, h in zip(pairs, hashes):
            report = _read_report(pair_prefix(job.outdir, p))
            if report is not None and not same_inputs(report, h):
                log.info(f"{p.name}: inputs changed since the earlier run; registering again")
    rows: dict[int, dict] = {}

    def finished(i: int, row: dict) -> None:
        rows[i] = row
        if on_pair is not None:
            on_pair(len(rows), pairs[i], row)

    if backend == "local":
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(run_pair, p, job, resume, hashes[i]): i for i, p in enumerate(pairs)}
            try:
                for fut in as_completed(futures):
                    finished(futures[fut], fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    elif backend == "ray":
        _run_on_ray(pairs, hashes, job, threads, address, resume, finished)
    else:
        raise ConfigError(f"unknown batch backend '{backend}' (use local or ray)")
    ev = Evaluation(method=job.method, rows=[rows[i] for i in range(len(pairs))])
    return BatchResult(ev, [r["pair"] for r in ev.rows if r.get("resumed")])


def _read_report(prefix: str) -> Optional[dict]:
    try:
        report = json.loads(Path(prefix + "Report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _run_on_ray(pairs: Sequence[Pair], hashes: Sequence[dict], job: BatchJob, threads: int, address: Optional[str],
                resume: bool, finished: Callable[[int, dict], None]) -> None:
    if address and "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH",
                                                                    Path.home() / ".ray" / "auth_token")).is_file()):
        # Ray turns token authentication on for clusters it starts where a token exists, but a driver joining
        # one only sends the token with RAY_AUTH_MODE=token, read when ray is imported (without it, it retries
        # unauthenticated for a minute)
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs the ray package: pip install 'regcli[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"at '{address}'" if address else "locally"
            raise ConfigError(f"cannot start or reach a Ray cluster {where}: {str(e).splitlines()[0]}") from None
    try:
        most = max((float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)
        if most < threads:
            raise ConfigError(f"--threads {threads}: each pair asks Ray for {threads} CPUs, but no node of the cluster "
                              f"has more than {most:g}; give --threads {max(1, int(most))} or fewer")
        task = ray.remote(num_cpus=threads, max_retries=0)(run_pair)
        pending = {task.remote(p, job, resume, hashes[i]): i for i, p in enumerate(pairs)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except Exception as e:  # the worker died (killed, out of memory): that pair fails alone
                        row = {"pair": pairs[i].name, "fixed_image": str(pairs[i].fixed),
                               "moving_image": str(pairs[i].moving), "status": "failed", "exit_code": 1,
                               "error": f"Ray task failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                               "resumed": False}
                    finished(i, row)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ summary
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dice_per_structure_figure(ev: Evaluation):
    """Box plot of Dice per label over the successful pairs (a matplotlib figure), or None without labels."""
    labels = sorted({int(k) for r in ev.rows if r.get("status") == "ok" for k in (r.get("dice_per_label") or {})})
    if not labels:
        return None
    plt = _pyplot()

    data = [[float(v) for r in ev.rows if r.get("status") == "ok"
             for k, v in (r.get("dice_per_label") or {}).items() if int(k) == lab and v is not None]
            for lab in labels]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(labels) + 2), 4.0))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), [str(lab) for lab in labels], rotation=90, fontsize=8)
    ax.set(xlabel="label", ylabel="Dice", ylim=(0, 1),
           title=f"Dice per structure, {ev.method}, {sum(r.get('status') == 'ok' for r in ev.rows)} pairs")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def runtime_figure(ev: Evaluation):
    """Histogram of the registration seconds per pair (a matplotlib figure), or None without any timing."""
    secs = [float(r["seconds"]) for r in ev.rows if isinstance(r.get("seconds"), (int, float))]
    if not secs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.hist(secs, bins=min(20, max(5, len(secs))))
    ax.set(xlabel="seconds per pair (registration)", ylabel="pairs", title=f"Runtime, {ev.method}")
    fig.tight_layout()
    return fig


def write_batch_results(result: BatchResult, outdir: str | os.PathLike) -> list[Path]:
    """``batch.csv``, ``batch.json`` and the two plots, each written atomically; returns the paths written."""
    from regcli.io.atomic import atomic_path, atomic_write_text

    outdir = Path(outdir)
    out = [outdir / "batch.csv", outdir / "batch.json"]
    atomic_write_text(out[0], result.evaluation.csv_text())
    atomic_write_text(out[1], json.dumps(_jsonable(result.to_dict()), indent=2, allow_nan=False) + "\n")
    for name, figure in (("batch_dice.png", dice_per_structure_figure), ("batch_runtime.png", runtime_figure)):
        fig = figure(result.evaluation)
        if fig is None:
            continue
        with atomic_path(outdir / name) as tmp:
            fig.savefig(tmp, dpi=120)
        _pyplot().close(fig)
        out.append(outdir / name)
    return out


__all__ = ["BatchJob", "BatchResult", "run_batch", "run_pair", "complete_report", "input_hashes", "same_inputs",
           "write_batch_results", "dice_per_structure_figure", "runtime_figure"]
