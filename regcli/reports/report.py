"""The ``prefixReport.json`` record of a run: what ran, on what, with which settings, how long, and how well.

The report is plain JSON (no NaN/Infinity: those become ``null``), with a fixed key order so that two
runs can be diffed. Build it with :func:`build_report`, serialise with :func:`report_json` and write it
with :func:`write_report` (atomic). :class:`StageTimer` records per-stage wall-clock seconds and
:func:`peak_memory` the process's peak memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

try:  # Unix only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "StageTimer",
    "PeakMemory",
    "peak_memory",
    "peak_rss_mb",
    "sha256_file",
    "grid_summary",
    "image_header_grid",
    "versions",
    "device_info",
    "json_safe",
    "build_report",
    "report_json",
    "dumps",
    "write_report",
]

REPORT_SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- timing and memory
class StageTimer:
    """Wall-clock seconds per named stage, in the order stages first ran.

    Usage::

        timer = StageTimer()
        with timer.stage("read"):
            ...
        with timer.stage("affine"):
            ...
        timer.stages  # {"read": 0.12, "affine": 3.4}; a repeated name accumulates

    On CUDA, pass ``sync=torch.cuda.synchronize`` so that asynchronous kernels are charged to their stage.
    """

    def __init__(self, sync=None) -> None:
        self.stages: dict[str, float] = {}
        self._sync = sync

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._sync is not None:
            self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        """Record time measured elsewhere (e.g. a solver's own ``Result.seconds``)."""
        self.stages[name] = self.stages.get(name, 0.0) + float(seconds)

    @property
    def total(self) -> float:
        """Sum of the recorded stages (s)."""
        return float(sum(self.stages.values()))


class WarningLog(logging.Handler):
    """While entered, collects the distinct WARNING (and worse) messages of the ``regcli`` logger, in order: what
    a run told its user, for ``report["warnings"]`` (``evaluate`` and ``batch`` show their children's from
    there, since a child's stderr is not shown).

    Only records of the thread that entered it are kept, so runs in several threads of one process each get
    their own (a run's warnings come from its own thread; its output-writer threads log none).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.thread: Optional[int] = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)

    def __enter__(self) -> "WarningLog":
        self.thread = threading.get_ident()
        logging.getLogger("regcli").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("regcli").removeHandler(self)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (never decreases).

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` survives ``fork`` and
    ``exec``, so a process started by a large parent (``regcli evaluate`` holding two label maps) would
    report the parent's peak as its own. Elsewhere ``getrusage``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    if resource is None:  # pragma: no cover
        return float("nan")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return float(ru) / (1024.0 * 1024.0) if sys.platform == "darwin" else float(ru) / 1024.0


def _cuda_in_use(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def peak_memory(device=None) -> dict:
    """``{"peak_rss_mb": ..., "cuda_max_allocated_mb": ... (CUDA devices only)}``."""
    out: dict[str, Any] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if _cuda_in_use(device):
        import torch

        if torch.cuda.is_available():
            dev = torch.device(device)
            out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved(dev) / 2**20, 1)
    return out


class PeakMemory:
    """Context manager measuring peak memory over a block.

    ``rss_mb`` is the process peak RSS at exit (MiB; a process-lifetime high-water mark, it cannot be reset),
    ``rss_growth_mb`` how much that peak rose during the block, and on CUDA ``cuda_max_allocated_mb`` the
    peak allocated by torch during the block (the CUDA peak counter is reset on entry).
    """

    def __init__(self, device=None) -> None:
        self.device = device
        self.rss_mb = float("nan")
        self.rss_growth_mb = float("nan")
        self.cuda_max_allocated_mb: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        self._rss0 = peak_rss_mb()
        if _cuda_in_use(self.device):
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        return self

    def __exit__(self, *exc) -> None:
        self.rss_mb = peak_rss_mb()
        self.rss_growth_mb = self.rss_mb - self._rss0
        if _cuda_in_use(self.device):
            import torch

            if torch.cuda.is_available():
                self.cuda_max_allocated_mb = torch.cuda.max_memory_allocated(torch.device(self.device)) / 2**20

    def as_dict(self) -> dict:
        out = {"peak_rss_mb": round(self.rss_mb, 1), "rss_growth_mb": round(self.rss_growth_mb, 1)}
        if self.cuda_max_allocated_mb is not None:
            out["cuda_max_allocated_mb"] = round(self.cuda_max_allocated_mb, 1)
        return out


# ----------------------------------------------------------------------------- inputs
def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> Optional[str]:
    """Hex sha256 of a file's bytes, streamed in ``block``-byte pieces; None if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                b = f.read(block)
                if not b:
                    break
                h.update(b)
    except OSError:
        return None
    return h.hexdigest()


def grid_summary(grid) -> dict:
    """JSON description of a :class:`~regcli.spaces.Grid`: size (x,y,z), spacing mm, origin LPS mm,
    direction (9, row-major), axcodes."""
    return {
        "size": [int(v) for v in grid.size],
        "spacing": [float(v) for v in grid.spacing],
        "origin": [float(v) for v in grid.origin],
        "direction": [float(v) for v in grid.direction],
        "axcodes": grid.axcodes(),
    }


def image_header_grid(path: str | os.PathLike) -> Optional[dict]:
    """Grid summary of an image file from its header only (no voxel data read); None if not an image."""
    from regcli.io.images import IMAGE_EXTENSIONS

    if not str(path).lower().endswith(IMAGE_EXTENSIONS) or not Path(path).is_file():
        return None
    try:
        import SimpleITK as sitk

        from regcli.spaces import Grid

        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
        if r.GetDimension() < 3:
            return None
        dim = r.GetDimension()
        size, sp, org = r.GetSize()[:3], r.GetSpacing()[:3], r.GetOrigin()[:3]
        d = np.asarray(r.GetDirection()).reshape(dim, dim)[:3, :3]
        out = grid_summary(Grid(size, sp, org, d.ravel()))
        out["components"] = int(r.GetNumberOfComponents())
        out["pixel_type"] = sitk.GetPixelIDValueAsString(r.GetPixelID())
        return out
    except Exception:  # noqa: BLE001 - a report must not fail because of an odd header
        return None


# ----------------------------------------------------------------------------- environment
def versions() -> dict:
    """Versions of regcli and the libraries that decide its numerics."""
    import regcli

    out: dict[str, Optional[str]] = {"regcli": getattr(regcli, "__version__", None),
                                     "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
    except Exception:  # pragma: no cover
        out["torch"] = None
    try:
        import SimpleITK as sitk

        out["SimpleITK"] = sitk.Version_VersionString()
    except Exception:  # pragma: no cover
        out["SimpleITK"] = None
    out["numpy"] = np.__version__
    return out


def platform_info() -> dict:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def _cpu_name() -> str:
    """CPU model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device=None) -> dict:
    """The device actually used: ``{"type": "cpu"|"cuda", "name": ..., "torch_threads": n}``."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    out: dict[str, Any] = {"type": dev.type, "name": _cpu_name()}
    if dev.type == "cuda" and torch.cuda.is_available():
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        out["index"] = idx
        out["name"] = torch.cuda.get_device_name(idx)
        out["cuda_version"] = torch.version.cuda
        out["cudnn_version"] = torch.backends.cudnn.version()
    out["torch_threads"] = torch.get_num_threads()
    out["torch_interop_threads"] = torch.get_num_interop_threads()
    return out


# ----------------------------------------------------------------------------- JSON
def json_safe(obj: Any) -> Any:
    """A structure ``json.dumps(..., allow_nan=False)`` accepts.

    NaN/Inf -> None; numpy/torch scalars and arrays -> Python numbers/lists; tuples -> lists; Paths -> str;
    dataclasses -> dicts; Grids -> :func:`grid_summary`; pydantic models -> ``model_dump()``; mapping keys ->
    str (insertion order kept, so build dicts in a deterministic order).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [json_safe(v) for v in items]
    mod = type(obj).__module__
    if mod.startswith("torch"):
        try:
            return json_safe(obj.detach().cpu().tolist())
        except AttributeError:
            return str(obj)
    if hasattr(obj, "axcodes") and hasattr(obj, "spacing") and hasattr(obj, "direction"):
        return grid_summary(obj)
    if hasattr(obj, "model_dump"):
        return json_safe(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    return str(obj)


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return dict(config)


def _device_from_config(requested: Any) -> str:
    """The device a run with ``config["device"]`` used: "cuda" for cuda, or for "auto" when CUDA is available."""
    req = str(requested or "cpu")
    if req == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # pragma: no cover
            return "cpu"
    return req


def build_report(
    command: str,
    config: Any,
    inputs: Mapping[str, Any],
    stages: Mapping[str, float],
    metrics: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    *,
    outputs: Optional[list] = None,
    device=None,
    seed: Optional[int] = None,
    deterministic: Optional[bool] = None,
    grids: Optional[Mapping[str, Any]] = None,
    checksums: bool = True,
    status: str = "ok",
) -> dict:
    """Assemble the content of ``prefixReport.json``.

    Args:
        command: the subcommand and how it was invoked (e.g. ``"register"`` or the full argv string).
        config: the effective (validated, merged) config: a pydantic model or a plain dict.
        inputs: ``{role: path}`` of input files (None values are recorded as absent; a list of paths gives a
            list of entries).
        stages: ``{stage: seconds}`` wall-clock per stage (e.g. ``StageTimer.stages``).
        metrics: Dice/HD95/Jacobian/TRE/... as produced by :mod:`regcli.reports`.
        extra: anything else (convergence flags, warnings, inverse consistency...), stored under ``"extra"``.
        outputs: output file paths written by the command (recorded as given, plus the base name).
        device: the torch device actually used ("cpu", "cuda", "cuda:0", torch.device); by default inferred
            from ``config["device"]`` ("auto" = CUDA when available).
        seed, deterministic: default to ``config["seed"]`` / ``config["deterministic"]`` when present.
        grids: ``{role: Grid}`` of inputs already read; roles not given are read from the file headers.
        checksums: compute the sha256 of every input file (streamed).
        status: "ok" or a short failure word.

    Returns:
        A JSON-safe dict with a fixed key order: ``schema, regcli_version, status, command, created,
        versions, platform, device, seed, deterministic, config, inputs, stages, total_seconds, memory,
        outputs, metrics, extra``.
    """
    cfg = _config_dict(config)
    if seed is None:
        seed = cfg.get("seed")
    if deterministic is None:
        deterministic = cfg.get("deterministic")
    if device is None:
        device = _device_from_config(cfg.get("device"))
    grids = dict(grids or {})
    def describe(role: str, path: Any) -> Optional[dict]:
        if path is None:
            return None
        p = Path(path)
        entry: dict[str, Any] = {"path": str(p), "exists": p.is_file()}
        if p.is_file():
            entry["bytes"] = p.stat().st_size
            if checksums:
                entry["sha256"] = sha256_file(p)
        g = grids.get(role)
        entry["grid"] = grid_summary(g) if g is not None else (image_header_grid(p) if p.is_file() else None)
        return entry

    ins: dict[str, Any] = {}
    for role, path in inputs.items():
        if isinstance(path, (list, tuple)):  # e.g. a transform list
            ins[role] = [describe(role, p) for p in path]
        else:
            ins[role] = describe(role, path)
    stage_s = {str(k): round(float(v), 4) for k, v in stages.items()}
    outs = [str(o) for o in (outputs or [])]
    vers = versions()
    report = {
        "schema": REPORT_SCHEMA_VERSION,
        "regcli_version": vers["regcli"],
        "status": status,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": vers,
        "platform": platform_info(),
        "device": device_info(device),
        "seed": seed,
        "deterministic": deterministic,
        "config": cfg,
        "inputs": ins,
        "stages": stage_s,
        "total_seconds": round(sum(stage_s.values()), 4),
        "memory": peak_memory(device),
        "outputs": outs,
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    return json_safe(report)


def report_json(report: Mapping[str, Any], indent: int = 2) -> str:
    """Serialise a report: strict JSON (``allow_nan=False``), keys in insertion order, trailing newline."""
    return json.dumps(json_safe(report), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"


dumps = report_json  # alias


def listed_outputs(prefix: str) -> Optional[list[str]]:
    """The files that ``prefix``'s ``Report.json`` (a ``regcli register`` run's, written last) lists as its
    ``outputs``, as that run named them (relative to where it ran: compare by name); None without a readable
    report that lists them."""
    try:
        outputs = json.loads(Path(str(prefix) + "Report.json").read_text()).get("outputs")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(o) for o in outputs] if isinstance(outputs, list) else None


def write_report(path: str | os.PathLike, report: Mapping[str, Any]) -> None:
    """Write ``report`` as JSON atomically (temp file, fsync, rename)."""
    from regcli.io.atomic import atomic_write_text

    atomic_write_text(path, report_json(report))
