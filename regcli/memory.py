"""Pre-flight estimate of a registration's peak memory (RELIABILITY P2; ANTs users meet the out-of-memory
kill after hours, ANTs #1091).

``regcli register`` reads the two headers, predicts the peak resident memory (RSS) of every phase from the voxel
counts, logs the estimate, writes it to the report (``memory.estimate_mb``), and with ``--max-memory`` refuses to
start when it is above the limit, naming the phase that needs the memory and what to change. Without
``--max-memory`` it refuses an estimate above all the memory the machine has (physical RAM plus swap,
:func:`machine_memory_mb`), which no run could get (a header with 100 mm voxels, a 4 m field of view, asked the
2 mm working grid for 3.5 TB and failed at its allocation with an internal error).

The model is linear per phase: ``MB = mb + (fixed·N_fixed + moving·N_moving + work·N_work + fine·N_fine) / 2**20``,
with N the voxel counts of the fixed image, the moving image, the deformable working grid and the fine grid, and
the coefficients (bytes per voxel) fitted per method by ``benchmarks/memory_calibration.py --fit`` to the peaks it
measures phase by phase (``/proc/self/clear_refs``) on synthseg brains at several voxel sizes. They live in
``memory_model.json`` beside this module (``METHOD@float64`` for ``precision: float64``). The estimate is the
largest phase times the model's margin (the worst under-prediction seen in the calibration, plus 5 %). It is
calibrated on the CPU with 2 threads, label maps given and the HTML report on.

The fine refinement (``--fine-spacing``, every deformable method) is not fitted to its own peaks: its solver
evaluates the similarity on the voxels whose features are not flat, so its memory depends on the images' content
(270-380 bytes per fine-grid voxel measured on zero-background brains, about 500 with background noise), which
the headers do not tell. Its phase is the memory live when it starts (the level after the deformable stage,
fitted per method) plus the growth per fine-grid voxel that the calibration measures for the stage alone on a
phantom textured everywhere (``fine_stage`` in the model, per precision; in float32 about 500 bytes, some 125
float32 values per fine-grid voxel, of which the two images' 12-channel MIND-SSC features are 24 and the
solver's field, gradients, Adam moments and the moving features warped on the support most of the rest): the
worst case, so on images with flat backgrounds the fine phase is over-estimated.

On CUDA (``--device cuda``, or ``auto`` with a GPU) the solver's tensors live on the GPU, but the CUDA runtime,
cuBLAS and cuDNN take host memory of their own: ``cuda_host_mb`` in the model, the largest peak-RSS difference
between a CUDA and a CPU registration of a 32^3 phantom over the six methods (``benchmarks/gpu_check.py
--sections host``; 763-1104 MB with torch 2.11 and CUDA 13 on an H100). Every phase's host estimate adds it (so
the total, after the margin, grows by 1.16 x 1104 MB), which makes the estimate an upper bound of the host memory
there too; the log line and the refusal say how much of the estimate is the runtime's. The GPU's own memory is
not predicted: its peak depends on the transform model and optimizer (L-BFGS: twice Adam's) and, for the
networks, on their fixed input size rather than the images'; the report gives the measured
``memory.cuda_max_allocated_mb``, and docs/benchmarks.md a table of them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

from regcli.config import RegisterConfig
from regcli.errors import ResourceError
from regcli.spaces import Grid

MODEL_FILE = Path(__file__).with_name("memory_model.json")
MB = 2.0 ** 20

# what each phase is, for the log and the refusal
PHASE_NAMES = {
    "read": "reading the images", "affine": "the affine stage", "deformable": "the deformable stage",
    "fine": "the fine refinement", "inverse": "the inverse field", "upsample": "the fields on the fixed grid",
    "warp": "warping the moving image and labels", "metrics": "the Jacobian and label metrics",
    "write": "writing the outputs", "html": "the HTML report",
}


@lru_cache(maxsize=1)
def _model() -> dict:
    return json.loads(MODEL_FILE.read_text())


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak RSS (MB) of each phase that will run, and of the whole process (``total_mb``, the
    largest phase times the model's margin)."""

    total_mb: float
    phases: dict[str, float]
    counts: dict[str, int]
    margin: float
    method: str
    notes: list[str] = field(default_factory=list)
    cuda_host_mb: float = 0.0  # on CUDA: the host memory of the CUDA runtime, in every phase (before the margin)
    fixed_spacing: tuple[float, ...] = ()  # the fixed image's voxel size (mm, x y z), for the refusal's advice
    fixed_extent_mm: tuple[float, ...] = ()  # its field of view (mm, x y z: size times spacing)

    @property
    def largest(self) -> str:
        return max(self.phases, key=self.phases.get)

    def as_dict(self) -> dict:
        return {"estimate_mb": round(self.total_mb, 1), "estimate_largest_phase": self.largest,
                "estimate_phases_mb": {k: round(v, 1) for k, v in self.phases.items()},
                "estimate_voxels": dict(self.counts), "estimate_margin": self.margin,
                **({"estimate_notes": list(self.notes)} if self.notes else {})}

    def describe(self) -> str:
        return (f"about {_size(self.total_mb)}, largest in {PHASE_NAMES.get(self.largest, self.largest)} "
                f"({self.counts['fixed'] / 1e6:.1f} M fixed voxels, {self.counts['work'] / 1e6:.2f} M working-grid "
                f"voxels" + (f", {self.counts['fine'] / 1e6:.1f} M fine-grid voxels" if self.counts["fine"] else "")
                + (f"; {_size(self.cuda_host_mb * self.margin)} of it the CUDA runtime" if self.cuda_host_mb else "")
                + ")")


def _size(mb: float) -> str:
    if mb >= 1024:
        return f"{mb / 1024:.1f} GB"
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.3g} MB"  # a limit of 1K is 0.000977 MB, not "0 MB"


def _phase_runs(name: str, config: RegisterConfig) -> bool:
    """Whether phase ``name`` runs with ``config`` (a phase the calibration measured, e.g. ``metrics``, always
    runs unless the configuration turns it off)."""
    off = {"affine": not config.affine.enabled, "html": not config.html_report,
           "inverse": not (config.deformable and config.inverse_warp),
           "fine": not (config.deformable and config.instance.fine_spacing_mm is not None),
           "deformable": not config.deformable, "upsample": not config.deformable}
    return not off.get(name, False)


def estimate_peak_memory(fixed: Grid, moving: Grid, config: RegisterConfig, device: str = "cpu") -> MemoryEstimate:
    """Predicted peak resident memory of ``regcli register`` for images on ``fixed`` and ``moving`` grids with
    ``config`` on ``device`` ("cpu" or "cuda"; see the module docstring for the model, CUDA and where the
    coefficients come from)."""
    from regcli.methods import working_grid

    model = _model()
    notes = []
    key = config.method if config.precision == "float32" else f"{config.method}@{config.precision}"
    method = key if key in model["methods"] else model["aliases"].get(key)
    if method not in model["methods"]:  # a method added after the last calibration
        notes.append(f"no calibration for {key}; convexadam's coefficients")
        method = "convexadam"
    coef = model["methods"][method]
    if "fine" not in coef and config.deformable and config.instance.fine_spacing_mm is not None:
        notes.append(f"no fine-refinement calibration for {method}; convexadam's")  # a model fitted without it
        coef = {**coef, "fine": model["methods"]["convexadam"]["fine"]}
    counts = {"fixed": fixed.num_voxels, "moving": moving.num_voxels, "work": 0, "fine": 0}
    if config.deformable:
        counts["work"] = working_grid(config.method, fixed, config)[0].num_voxels
        if config.instance.fine_spacing_mm is not None:
            counts["fine"] = fixed.with_spacing(config.instance.fine_spacing_mm).num_voxels
    host_extra = float(model["cuda_host_mb"]) if device == "cuda" else 0.0
    if host_extra:
        notes.append(f"on CUDA every phase includes {host_extra:.0f} MB of host memory for the CUDA runtime")
    phases = {}
    for name, c in coef.items():
        if _phase_runs(name, config):
            phases[name] = c["mb"] + host_extra + sum(c.get(k, 0.0) * counts[k] for k in counts) / MB
    margin = float(model["margin"])
    return MemoryEstimate(max(phases.values()) * margin, phases, counts, margin, method, notes, host_extra,
                          tuple(float(v) for v in fixed.spacing),
                          tuple(float(n) * float(v) for n, v in zip(fixed.size, fixed.spacing)))


def machine_memory_mb() -> Optional[float]:
    """All the memory this machine could give a process (MB): physical RAM plus swap (``MemTotal`` and
    ``SwapTotal`` of ``/proc/meminfo``; elsewhere the RAM of ``os.sysconf``); None when neither tells. A container's
    or a job's own limit (cgroups) is not counted: the estimate is an upper bound, and only what no run could get
    is refused without ``--max-memory``."""
    totals = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "SwapTotal") and rest.split():
                totals[key] = float(rest.split()[0]) / 1024.0  # kB
    except (OSError, ValueError):
        totals = {}
    if "MemTotal" not in totals:
        try:
            totals["MemTotal"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MB
        except (AttributeError, ValueError, OSError):
            return None
    total = totals["MemTotal"] + totals.get("SwapTotal", 0.0)
    return total if total > 0 else None


def check_memory(estimate: MemoryEstimate, limit_mb: Optional[float], config: RegisterConfig,
                 fixed_path: str = "the fixed image", machine_mb: Optional[float] = None) -> None:
    """Raise :class:`ResourceError` (one line: the estimate, the limit, the phase, what to change) when
    ``estimate`` is above ``limit_mb`` (``--max-memory``); when no limit is set, when it is above all the memory the
    machine has (``machine_mb``, default :func:`machine_memory_mb`; nothing when that is unknown)."""
    if limit_mb is None:
        machine = machine_mb if machine_mb is not None else machine_memory_mb()
        if machine is not None and estimate.total_mb > machine:
            raise ResourceError(
                f"estimated peak memory {_size(estimate.total_mb)} is above all the memory of this machine "
                f"({_size(machine)}, RAM and swap) for '{fixed_path}' ({_header_words(estimate)}), mostly "
                f"{PHASE_NAMES.get(estimate.largest, estimate.largest)}: {_advice(estimate, config)}; check the "
                "spacing in the image's header; --max-memory SIZE sets the limit instead")
        return
    if estimate.total_mb <= limit_mb:
        return
    raise ResourceError(
        f"estimated peak memory {_size(estimate.total_mb)} is above --max-memory {_size(limit_mb)} for "
        f"'{fixed_path}' ({estimate.counts['fixed'] / 1e6:.1f} M voxels), mostly "
        f"{PHASE_NAMES.get(estimate.largest, estimate.largest)}"
        + (f", {_size(estimate.cuda_host_mb * estimate.margin)} of it the CUDA runtime's"
           if estimate.cuda_host_mb else "") + f": {_advice(estimate, config)}")


def _header_words(estimate: MemoryEstimate) -> str:
    """``0.1 M voxels of 100 x 100 x 100 mm, a field of view of 4000 x 4000 x 4000 mm``: the fixed image's header,
    as the estimate saw it (the voxel count alone without them)."""
    words = f"{estimate.counts['fixed'] / 1e6:.1f} M voxels"
    if estimate.fixed_spacing and estimate.fixed_extent_mm:
        words += (f" of {' x '.join(f'{v:.4g}' for v in estimate.fixed_spacing)} mm, a field of view of "
                  f"{' x '.join(f'{v:.4g}' for v in estimate.fixed_extent_mm)} mm")
    return words


def _advice(estimate: MemoryEstimate, config: RegisterConfig) -> str:
    phase = estimate.largest
    tips = []
    if config.precision == "float64":
        tips.append("--precision float32")
    if phase == "fine":
        tips.append(f"a coarser --fine-spacing than {config.instance.fine_spacing_mm:g} mm, or none")
    elif phase == "deformable":
        tips.append(f"a coarser --working-spacing than {config.working_spacing_mm:g} mm")
    else:
        tips.append("crop the images or resample the fixed image to larger voxels (every output lives on its grid)")
        if config.html_report:
            tips.append("--no-html")
        if config.inverse_warp and config.deformable:
            tips.append("--no-inverse")
    if estimate.cuda_host_mb:
        tips.append("--device cpu")
    return "try " + ", ".join(tips)
