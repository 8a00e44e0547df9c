"""Measure the peak resident memory of each phase of `regcli register`, to calibrate (and check) the
pre-flight estimate of :mod:`regcli.memory`.

  python benchmarks/memory_calibration.py [--methods convexadam,samconvex] [--json results/memcal.json]

Each case is a fresh process (so start-up memory and allocator caches are its own) that runs
``regcli.pipeline.run_register`` on a synthseg brain resampled to a chosen voxel size, with the phases wrapped:
before a phase the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0), after
it ``VmHWM`` is that phase's peak. The table lists, per case, the voxel counts, the measured peak of every phase,
the whole process's peak, and what :func:`regcli.memory.estimate_peak_memory` predicted.

The fine refinement (``--fine-spacing``) is measured twice. The solver evaluates its similarity on the voxels where
the MIND-SSC features are not flat (its *support*), so the stage's memory depends on the images' content, not
only on their headers: the synthseg cases (zero background) need 270-380 bytes per fine-grid voxel, a scan with
background noise (texture everywhere) about 500. ``--fine-stage`` therefore runs the stage alone
(:func:`regcli.methods.fine.fine_refinement`) on a phantom textured everywhere, at several fine-grid sizes, and
``--fit`` models the phase as the memory live when it starts (the level after the deformable stage, fitted to
every case of the method) plus that measured growth per fine voxel (the worst case: support = the whole grid).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthseg_brain"
# (fixed voxel mm, moving voxel mm, working spacing mm, fine spacing mm or None)
CASES = [(1.0, 1.0, 2.0, None), (1.3, 1.3, 2.0, None), (0.8, 1.0, 2.0, None), (1.0, 1.0, 1.5, None),
         (1.0, 1.0, 3.0, None), (1.0, 1.3, 2.5, None), (1.0, 1.0, 2.0, 1.0), (1.3, 1.0, 2.0, 1.3),
         (1.0, 1.0, 2.0, 1.5), (1.0, 1.0, 3.0, 1.0),
         # a fine grid finer than the images (8x their voxels), as --fine-spacing 1 on 2 mm images
         (2.0, 2.0, 2.0, 1.0)]
# --fine-stage: the fine refinement alone on a phantom textured everywhere, 2 mm images and working grid, 1 mm fine
# grid of these many voxels per side (3.0, 4.7, 7.1 M; above glibc's 32 MB mmap threshold per float32 field, where
# the growth is linear in the voxels)
FINE_STAGE_SIDES = (72, 84, 96)
# held out of the fit: other images, another anatomy, a larger grid (fixed, moving, their labels, method, overrides)
NEURITE = DATA.parent / "neurite_brain_aseg"
CT = DATA.parent / "totalsegmentator_ct"
NA, NB = NEURITE / "subjA_vxm_image.nii.gz", NEURITE / "subjB_l2r_image.nii.gz"
NLA, NLB = NEURITE / "subjA_vxm_labels.nii.gz", NEURITE / "subjB_l2r_labels.nii.gz"
CTI, CTL = CT / "ct_image.nii.gz", CT / "ct_labels_total.nii.gz"
EX = Path(__file__).resolve().parents[1] / "examples"
VALIDATION = [
    (NA, NB, NLA, NLB, "convexadam", {}),
    (NA, NB, NLA, NLB, "samconvex", {}),
    (NA, NB, NLA, NLB, "convexadam", {"instance": {"fine_spacing_mm": 1.0}}),
    (CTI, CTI, CTL, CTL, "convexadam", {}),
    ("0.7", "1.0", None, None, "convexadam", {}),
    ("0.7", "1.0", None, None, "foundation", {}),
    # the 2 mm example pair (cropped, zero background) and the same with background noise (texture everywhere, as a
    # scan that is not skull-stripped): a fine grid of 8x the images' voxels
    (EX / "fixed_T1w.nii.gz", EX / "moving_T1w.nii.gz", EX / "fixed_labels.nii.gz", EX / "moving_labels.nii.gz",
     "convexadam", {"instance": {"fine_spacing_mm": 1.0}}),
    ("noisy", "noisy", EX / "fixed_labels.nii.gz", EX / "moving_labels.nii.gz", "convexadam",
     {"instance": {"fine_spacing_mm": 1.0}}),
    ("noisy", "noisy", EX / "fixed_labels.nii.gz", EX / "moving_labels.nii.gz", "convexadam", {}),
    ("noisy", "noisy", EX / "fixed_labels.nii.gz", EX / "moving_labels.nii.gz", "dio",
     {"instance": {"fine_spacing_mm": 1.0}}),
]
TERMS = ("fixed", "moving", "work", "fine")
# the voxel counts a phase's memory can depend on (the later phases hold the fields of the earlier ones)
PHASE_TERMS = {"read": ("fixed", "moving"), "affine": ("fixed", "moving"), "deformable": ("fixed", "moving", "work")}
# the memory live when the fine refinement starts (the level after the deformable stage): no fine grid yet
FINE_BASE_TERMS = ("fixed", "moving", "work")


def _status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory line (``VmHWM``, ``VmRSS``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


def _hwm_mb() -> float:
    return _status_mb("VmHWM")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phases:
    """Peak RSS per phase: every wrapped call resets the counter on entry and reads it on exit; the stretches
    between wrapped calls are recorded under ``after <phase>``."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.current = "start"
        _reset_hwm()

    def _close(self, label: str) -> None:
        self.peaks[label] = max(self.peaks.get(label, 0.0), _hwm_mb())
        _reset_hwm()

    def wrap(self, name: str, fn):
        def wrapped(*a, **k):
            self._close(self.current)
            try:
                return fn(*a, **k)
            finally:
                self._close(name)
                self.current = f"after {name}"
        return wrapped

    def patch(self, module, attr: str, name: str) -> None:
        setattr(module, attr, self.wrap(name, getattr(module, attr)))


def run_case(case: dict) -> dict:
    import regcli.io.atomic as atomic
    import regcli.io.images as images
    import regcli.methods as methods
    import regcli.methods.fine as fine
    import regcli.pipeline as pipeline
    import regcli.solvers.affine as affine
    from regcli.config import build_config

    ph = Phases()
    for mod, attr, name in ((images, "read_image", "read"), (images, "read_labels", "read"),
                            (affine, "run_affine_stage", "affine"), (fine, "fine_refinement", "fine"),
                            (pipeline, "invert_displacement", "inverse"), (pipeline, "upsample_field", "upsample"),
                            (pipeline, "warp_many", "warp"), (pipeline, "_metrics", "metrics"),
                            (pipeline, "_stage_html", "html")):
        ph.patch(mod, attr, name)
    get_method = methods.get_method
    methods.get_method = lambda name: ph.wrap("deformable", get_method(name))
    stage_many = atomic.OutputSet.stage_many
    atomic.OutputSet.stage_many = lambda self, *a, **k: ph.wrap("write", stage_many)(self, *a, **k)

    cfg = build_config(case.get("config"), case["overrides"])
    inputs = pipeline.RegisterInputs(fixed=case["fixed"], moving=case["moving"], output_prefix=case["prefix"],
                                     fixed_labels=case["fixed_labels"], moving_labels=case["moving_labels"])
    report = pipeline.run_register(inputs, cfg, overwrite=True)
    ph._close(ph.current)
    mem = report["memory"]  # the pipeline's own pre-flight estimate, made from the headers before the run
    return {"peaks": ph.peaks, "process_peak_mb": max(ph.peaks.values()),
            "estimate": {"total_mb": mem["estimate_mb"], **mem}, "report_peak_mb": mem.get("peak_rss_mb")}


def run_fine_stage(case: dict) -> dict:
    """The fine refinement alone (:func:`regcli.methods.fine.fine_refinement`, the configuration's defaults) on a
    phantom textured everywhere: smoothed noise on a ``side``³ grid of 2 mm voxels (fixed and moving: two draws),
    a zero field on it, a 1 mm fine grid. Returns the fine-grid voxels and the stage's growth of the peak RSS
    above the RSS before it (MB)."""
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter

    from regcli.config import build_config
    from regcli.methods.fine import fine_refinement
    from regcli.spaces.grid import Grid
    from regcli.spaces.image import Image
    from regcli.transforms.affine import AffineTransform
    from regcli.transforms.displacement import DisplacementField

    n, precision = int(case["side"]), case["precision"]
    cfg = build_config(None, {"method": "convexadam", "threads": case["threads"], "precision": precision,
                              "instance": {"fine_spacing_mm": 1.0}})
    torch.set_num_threads(case["threads"])
    grid = Grid((n, n, n), (2.0,) * 3, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    fixed, moving = (Image(torch.from_numpy(255 * gaussian_filter(np.random.default_rng(seed).random((n, n, n)), 1.0)
                                            .astype(np.float32)), grid) for seed in (1, 2))
    field = DisplacementField(torch.zeros((3, n, n, n), dtype=getattr(torch, precision)), grid)
    fine = grid.with_spacing(1.0)
    _reset_hwm()
    before = _rss_mb()
    fine_refinement(fixed, moving, AffineTransform.identity(), field, fine, cfg)
    return {"kind": "fine_stage", "precision": precision, "side": n, "fine_voxels": fine.num_voxels,
            "before_mb": before, "peak_mb": _hwm_mb(), "growth_mb": _hwm_mb() - before}


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def noisy_copy(path: Path, tmp: Path, sigma: float = 4.0) -> str:
    """``path`` with Rician background noise (sigma in the image's units, here of 0..255), as a scan that is not
    skull-stripped: MIND-SSC is nowhere flat, so the solvers' support is the whole grid."""
    import numpy as np
    import SimpleITK as sitk

    out = tmp / f"noisy_{path.name}"
    if not out.exists():
        img = sitk.ReadImage(str(path))
        a = sitk.GetArrayFromImage(img).astype(np.float64)
        rng = np.random.default_rng(0 if "fixed" in path.name else 1)
        noisy = sitk.GetImageFromArray(np.abs(a + rng.normal(0, sigma, a.shape) + 1j * rng.normal(0, sigma, a.shape))
                                       .astype(np.float32))
        noisy.CopyInformation(img)
        sitk.WriteImage(noisy, str(out))
    return str(out)


def make_inputs(tmp: Path, fixed_mm: float, moving_mm: float) -> dict:
    import SimpleITK as sitk

    out = {}
    for role, sub, mm in (("fixed", 3, fixed_mm), ("moving", 4, moving_mm)):
        for kind, interp in (("T1w", sitk.sitkLinear), ("labels", sitk.sitkNearestNeighbor)):
            path = tmp / f"sub-{sub:02d}_{kind}_{mm:g}.nii.gz"
            if not path.exists():
                img = sitk.ReadImage(str(DATA / f"sub-{sub:02d}_{kind}.nii.gz"))
                size = [int(round(n * s / mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
                res = sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), (mm,) * 3,
                                    img.GetDirection(), 0, img.GetPixelID())
                sitk.WriteImage(res, str(path))
            out[f"{role}_labels" if kind == "labels" else role] = str(path)
    return out


def fit_fine_stage(rows: list[dict]) -> dict:
    """The fine refinement's growth per precision: ``mb + fine * N_fine / 2**20`` MB, least squares over the
    ``--fine-stage`` rows (intercept at least 0)."""
    import numpy as np

    out = {}
    for precision in sorted({r["precision"] for r in rows}):
        pr = [r for r in rows if r["precision"] == precision]
        A = np.array([[1.0, r["fine_voxels"] / MB] for r in pr])
        b = np.array([r["growth_mb"] for r in pr])
        mb, per_voxel = np.linalg.lstsq(A, b, rcond=None)[0] if len(pr) > 1 else (-1.0, 0.0)
        if mb < 0:  # through the origin
            mb, per_voxel = 0.0, float(A[:, 1] @ b / (A[:, 1] @ A[:, 1]))
        out[precision] = {"mb": round(float(mb), 1), "fine": round(float(per_voxel), 2),
                          "measured": [[r["fine_voxels"], round(r["growth_mb"], 1)] for r in pr]}
    return out


def fit(rows: list[dict], out: Path, stage_rows: list[dict]) -> None:
    """Fit the per-phase linear model of :mod:`regcli.memory` (non-negative least squares on the voxel counts,
    per method) to measured rows, with the margin that covers every row's process peak plus 5 %, and write it.

    The fine refinement's phase is not fitted to its own peaks (their growth depends on the images' content, see
    the module docstring): it is the level after the deformable stage (fitted to every row of the method) plus the
    growth per fine voxel that ``--fine-stage`` measured on a phantom textured everywhere (``stage_rows``)."""
    import numpy as np
    from scipy.optimize import nnls

    stage = fit_fine_stage(stage_rows)
    methods = {}
    worst = 1.0
    for method in dict.fromkeys(r["method"] for r in rows):
        mrows = [r for r in rows if r["method"] == method]
        phases: dict[str, list[float]] = {}
        for r in mrows:
            r["folded"] = {}
            for k, v in r["peaks"].items():
                name = "read" if k == "start" else k.removeprefix("after ")
                r["folded"][name] = max(r["folded"].get(name, 0.0), v)
            for name in r["folded"]:
                phases.setdefault(name, [])
        coef = {}
        for name in phases:
            if name == "fine":
                continue
            have = [r for r in mrows if name in r["folded"]]
            use = PHASE_TERMS.get(name, TERMS)
            A = np.array([[1.0] + [r["counts"][t] / MB if t in use else 0.0 for t in TERMS] for r in have])
            b = np.array([r["folded"][name] for r in have])
            x, _ = nnls(A, b)
            coef[name] = {"mb": round(float(x[0]), 1), **{t: round(float(v), 2) for t, v in zip(TERMS, x[1:])
                                                          if v > 0}}
        have = [r for r in mrows if "after deformable" in r["peaks"]]
        if have:  # a deformable method: each runs the fine refinement with --fine-spacing
            precision = method.partition("@")[2] or "float32"
            if precision not in stage:
                raise SystemExit(f"no --fine-stage rows for {precision} (needed by {method})")
            A = np.array([[1.0] + [r["counts"][t] / MB for t in FINE_BASE_TERMS] for r in have])
            x, _ = nnls(A, np.array([r["peaks"]["after deformable"] for r in have]))
            coef["fine"] = {"mb": round(float(x[0]) + stage[precision]["mb"], 1),
                            **{t: round(float(v), 2) for t, v in zip(FINE_BASE_TERMS, x[1:]) if v > 0},
                            "fine": stage[precision]["fine"]}
        methods[method] = coef
        for r in mrows:
            pred = max(c["mb"] + sum(c.get(t, 0.0) * r["counts"][t] for t in TERMS) / MB
                       for name, c in coef.items() if name in r["folded"])
            worst = max(worst, r["process_peak_mb"] / pred)
    model = {"about": "regcli.memory: peak RSS (MB) per phase = mb + sum(bytes per voxel * voxels) / 2**20; fitted "
                      "by benchmarks/memory_calibration.py --fit; the fine phase is the level after the deformable "
                      "stage plus fine_stage (bytes per fine-grid voxel, measured by --fine-stage on a phantom "
                      "textured everywhere)", "margin": round(worst + 0.05, 3),
             "fine_stage": stage,
             "aliases": {"rigid": "affine", "samconvex@float64": "convexadam@float64", "affine@float64": "affine",
                         "rigid@float64": "affine"}, "methods": methods}
    if out.exists() and "cuda_host_mb" in json.loads(out.read_text()):  # measured on a GPU by gpu_check.py, kept
        model["cuda_host_mb"] = json.loads(out.read_text())["cuda_host_mb"]
    out.write_text(json.dumps(model, indent=1) + "\n")
    print(f"wrote {out}: margin {model['margin']}; fine stage " + ", ".join(
        f"{p}: {v['mb']:.0f} MB + {v['fine']:.0f} B per fine voxel" for p, v in stage.items()))


MB = 2.0 ** 20


def _counts(files: dict, over: dict) -> dict:
    """Voxel counts of the fixed and moving images, the working grid and the fine grid, as the estimate counts
    them (for rows measured before the estimate reported them)."""
    from regcli.config import build_config
    from regcli.io.images import read_grid
    from regcli.memory import estimate_peak_memory

    return estimate_peak_memory(read_grid(files["fixed"]), read_grid(files["moving"]), build_config(None, over)).counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="convexadam,samconvex,dio,foundation,promptreg,affine")
    ap.add_argument("--cases", default="all", help="comma-separated case numbers (0-based, of CASES, or of "
                    "VALIDATION with --validate) or 'all'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="float32", help="float64: calibrate the solvers in float64 (rows are "
                    "fitted as METHOD@float64)")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--validate", action="store_true", help="run the held-out cases (VALIDATION) instead")
    ap.add_argument("--fine-stage", action="store_true", help="measure the fine refinement alone on a phantom "
                    "textured everywhere (FINE_STAGE_SIDES), for each --precision (comma-separated) instead")
    ap.add_argument("--fit", nargs="+", default=None, metavar="JSON",
                    help="fit regcli/memory_model.json to these measurement files (no new runs)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        case = json.loads(args.case)
        print("RESULT " + json.dumps(run_fine_stage(case) if case.get("kind") == "fine_stage" else run_case(case)))
        return
    if args.fit:
        rows = [r for f in args.fit for r in json.loads(Path(f).read_text())]
        stage_rows = [r for r in rows if r.get("kind") == "fine_stage"]
        rows = [r for r in rows if r.get("kind") != "fine_stage"]
        for r in rows:
            if "counts" not in r:
                fmm, mmm, ws, fine = r["case"]
                r["counts"] = _counts(make_inputs(Path(tempfile.gettempdir()) / "regcli_memcal", fmm, mmm),
                                      {"method": r["method"].split("@")[0], "working_spacing_mm": ws,
                                       "instance": {"fine_spacing_mm": fine}})
        fit(rows, Path(__file__).resolve().parents[1] / "regcli" / "memory_model.json", stage_rows)
        return
    if args.fine_stage:
        rows = []
        print(f"{'precision':9s} {'side':>4s} {'fine voxels':>11s} {'growth MB':>9s} {'B/voxel':>7s}", flush=True)
        for precision in args.precision.split(","):
            for side in FINE_STAGE_SIDES:
                case = {"kind": "fine_stage", "side": side, "precision": precision, "threads": args.threads}
                p = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                   text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not line:
                    print(f"fine stage {precision} {side} failed: {p.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                r = json.loads(line[0][7:])
                rows.append(r)
                print(f"{precision:9s} {side:4d} {r['fine_voxels']:11d} {r['growth_mb']:9.0f} "
                      f"{r['growth_mb'] * MB / r['fine_voxels']:7.0f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
        return

    tmp = Path(tempfile.gettempdir()) / "regcli_memcal"
    tmp.mkdir(exist_ok=True)
    todo = []
    if args.validate:
        for k, (f, m, fl, ml, method, extra) in enumerate(VALIDATION):
            if args.cases != "all" and str(k) not in args.cases.split(","):
                continue
            if f == "noisy":  # the example pair with background noise
                files = {"fixed": noisy_copy(EX / "fixed_T1w.nii.gz", tmp),
                         "moving": noisy_copy(EX / "moving_T1w.nii.gz", tmp),
                         "fixed_labels": str(fl), "moving_labels": str(ml)}
            elif isinstance(f, str):  # synthseg at these voxel sizes
                files = make_inputs(tmp, float(f), float(m))
            else:
                files = {"fixed": str(f), "moving": str(m), "fixed_labels": str(fl), "moving_labels": str(ml)}
            todo.append((method, files, {"method": method, "threads": args.threads, **extra}, f"v{k}",
                         (Path(str(f)).name, Path(str(m)).name, json.dumps(extra))))
    else:
        idx = range(len(CASES)) if args.cases == "all" else [int(i) for i in args.cases.split(",")]
        for method in args.methods.split(","):
            for i in idx:
                fmm, mmm, ws, fine = CASES[i]
                if fine is not None and method in ("affine", "rigid"):  # every deformable method has --fine-spacing
                    continue
                over = {"method": method, "threads": args.threads, "working_spacing_mm": ws,
                        "instance": {"fine_spacing_mm": fine}, "precision": args.precision}
                tag = method if args.precision == "float32" else f"{method}@{args.precision}"
                todo.append((tag, make_inputs(tmp, fmm, mmm), over, i, CASES[i]))
    rows = []
    print(f"{'method':11s} {'case':>32s} {'peak MB':>8s} {'estimate':>8s} {'ratio':>6s}  phase peaks (MB)",
          flush=True)
    for method, files, over, i, label in todo:
        case = {**files, "overrides": over, "prefix": str(tmp / f"out_{method}_{i}_")}
        p = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{method} case {i} failed: {p.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r.update(method=method, case=label, counts=r["estimate"]["estimate_voxels"])
        rows.append(r)
        est = r["estimate"]["total_mb"]
        peaks = " ".join(f"{k}={v:.0f}" for k, v in r["peaks"].items() if not k.startswith("after")
                         or v > 0.9 * r["process_peak_mb"])
        text = " ".join(str(x) for x in label)[-32:]
        print(f"{method:11s} {text:>32s} {r['process_peak_mb']:8.0f} {est:8.0f} {est / r['process_peak_mb']:6.2f}  "
              f"{peaks}", flush=True)
        if args.json:  # after every case: a long run that stops keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=1))

if __name__ == "__main__":
    main()
