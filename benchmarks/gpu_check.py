"""regcli on a CUDA device against the CPU: does every method run, agree, repeat, and keep its memory?

  python benchmarks/gpu_check.py [--out DIR] [--sections host,methods,n2,p1,pairs] [--variants A,B]
                                 [--pairs DIR] [--cpu-threads N]

Needs a CUDA device (it exits 2 without one). Sections:

* ``methods``: ``regcli register`` (a child process, as a user runs it) on the bundled example pair for every
  method and transform model, once with ``--device cuda`` and once with ``--device cpu``: exit code, Dice, % of
  non-positive Jacobians, seconds, GPU memory, and how far apart the two devices' mappings ``x -> A(x + u(x))``
  are inside the fixed labels (mean / max mm), and the memory estimates against the measured peaks.
* ``host``: the host memory the CUDA runtime adds (peak RSS on CUDA minus CPU, a 32^3 phantom per method).
* ``n2`` (RELIABILITY N2): the same run twice on CUDA with ``--deterministic``: the mappings' largest distance.
* ``p1`` (RELIABILITY P1): five registrations in one process on CUDA: ``torch.cuda.max_memory_allocated`` per run
  and what stays allocated after each; the peak must grow < 5 % after the second run.
* ``pairs``: per-pair seconds and Dice on CUDA and CPU for the synthseg_brain pairs found under ``--pairs``
  (a folder holding ``pairs.csv`` and the images, e.g. ``../shared/data/synthseg_brain``).

Tables go to stdout, everything to ``--out``/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
VARIANTS = {  # name -> register flags
    "affine": ["--method", "affine"],
    "rigid": ["--method", "rigid"],
    "convexadam": [],
    "convexadam svf": ["--transform", "svf"],
    "convexadam greedy": ["--transform", "greedy"],
    "convexadam bspline": ["--transform", "bspline"],
    "convexadam lbfgs": ["--optimizer", "lbfgs"],
    "convexadam fine 1mm": ["--fine-spacing", "1"],
    "convexadam float64": ["--precision", "float64"],
    "samconvex": ["--method", "samconvex"],
    "dio": ["--method", "dio"],
    "dio svf": ["--method", "dio", "--transform", "svf"],
    "dio bspline": ["--method", "dio", "--transform", "bspline"],
    "dio affine": ["--method", "dio", "--transform", "affine"],
    "dio label prompt": ["--method", "dio", "--prompt-labels", "all"],
    "foundation": ["--method", "foundation"],
    "foundation io": ["--method", "foundation", "--io", "network"],
    "promptreg": ["--method", "promptreg"],
}
N2_METHODS = ("convexadam", "samconvex", "dio", "foundation", "promptreg")


def mapping(prefix: str, fixed: sitk.Image) -> np.ndarray:
    """x -> A(x + u(x)) - x on the fixed grid (mm), from a prefix's ANTs-named files."""
    comp = sitk.CompositeTransform(3)
    aff = Path(prefix + "0GenericAffine.mat")
    if aff.exists():
        comp.AddTransform(sitk.ReadTransform(str(aff)))
    warp = Path(prefix + "1Warp.nii.gz")
    if warp.exists():
        comp.AddTransform(sitk.DisplacementFieldTransform(sitk.ReadImage(str(warp), sitk.sitkVectorFloat64)))
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(fixed)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.GetArrayFromImage(f.Execute(comp))


def register(fixed, moving, flabels, mlabels, prefix, device, flags, threads=None) -> dict:
    cmd = [sys.executable, "-m", "regcli", "register", str(fixed), str(moving), "-o", prefix, "--device", device,
           "--fixed-labels", str(flabels), "--moving-labels", str(mlabels), "--json", "--no-html", "--overwrite",
           *flags]
    if threads:
        cmd += ["--threads", str(threads)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = {"exit": p.returncode, "wall": time.perf_counter() - t}
    if p.returncode != 0:
        out["error"] = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
        out["stderr_tail"] = p.stderr[-3000:]
        return out
    rep = json.loads(p.stdout)
    m = rep.get("metrics", {})
    out.update(dice=m.get("dice_mean"), nonpos=m.get("pct_nonpos_jac"), seconds=rep.get("total_seconds"),
               gpu_mb=(rep.get("memory") or {}).get("cuda_max_allocated_mb"),
               rss_mb=(rep.get("memory") or {}).get("peak_rss_mb"),
               estimate_mb=(rep.get("memory") or {}).get("estimate_mb"),
               device=rep.get("device"), stages=rep.get("stages"))
    return out


def distance(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    d = np.linalg.norm(a - b, axis=-1)[mask]
    return float(d.mean()), float(d.max())


def section_host(tmp: Path, res: dict) -> None:
    """The host memory the CUDA runtime adds (``cuda_host_mb`` of regcli/memory_model.json): peak RSS of a
    registration of a 32^3 phantom (its tensors are a few MB) on CUDA minus the same on the CPU, per method."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_phantom, phantom_labels

    f = make_phantom("LPS", "iso", size=(32, 32, 32))
    m = make_phantom("LPS", "iso", size=(32, 32, 32), transform=lambda p: p + np.array([1.5, -1.0, 0.5]))
    paths = {k: str(tmp / f"host_{k}.nii.gz") for k in ("f", "m", "fl", "ml")}
    for k, img in (("f", f), ("m", m), ("fl", phantom_labels(f)), ("ml", phantom_labels(m))):
        sitk.WriteImage(img, paths[k])
    rows = res.setdefault("host", {})
    for method in ("affine", "convexadam", "samconvex", "dio", "foundation", "promptreg"):
        runs = {dev: register(paths["f"], paths["m"], paths["fl"], paths["ml"], str(tmp / f"host_{method}_{dev}_"),
                              dev, ["--method", method], 2) for dev in ("cuda", "cpu")}
        rows[method] = {dev: {k: r.get(k) for k in ("exit", "rss_mb", "estimate_mb", "gpu_mb", "error")}
                        for dev, r in runs.items()}
        if all(r["exit"] == 0 for r in runs.values()):
            rows[method]["cuda_minus_cpu_mb"] = runs["cuda"]["rss_mb"] - runs["cpu"]["rss_mb"]
        print(f"[host] {method}: {json.dumps(rows[method])}", flush=True)


def section_methods(tmp: Path, res: dict, cpu_threads, only=None) -> None:
    fixed = sitk.ReadImage(str(EX / "fixed_T1w.nii.gz"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(EX / "fixed_labels.nii.gz"))) > 0
    rows = res.setdefault("methods", {})
    for name, flags in VARIANTS.items():
        if only and name not in only:
            continue
        row = {}
        for dev in ("cuda", "cpu"):
            prefix = str(tmp / f"{name.replace(' ', '_')}_{dev}_")
            row[dev] = register(EX / "fixed_T1w.nii.gz", EX / "moving_T1w.nii.gz", EX / "fixed_labels.nii.gz",
                                EX / "moving_labels.nii.gz", prefix, dev, flags,
                                cpu_threads if dev == "cpu" else None)
        if row["cuda"]["exit"] == 0 and row["cpu"]["exit"] == 0:
            row["cuda_vs_cpu_mm"] = distance(mapping(str(tmp / f"{name.replace(' ', '_')}_cuda_"), fixed),
                                             mapping(str(tmp / f"{name.replace(' ', '_')}_cpu_"), fixed), mask)
        rows[name] = row
        print(f"[methods] {name}: " + json.dumps({k: (v if not isinstance(v, dict) else
                                                      {kk: vv for kk, vv in v.items() if kk != 'stderr_tail'})
                                                  for k, v in row.items()}), flush=True)


def section_n2(tmp: Path, res: dict) -> None:
    fixed = sitk.ReadImage(str(EX / "fixed_T1w.nii.gz"))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(EX / "fixed_labels.nii.gz"))) > 0
    rows = res.setdefault("n2", {})
    for name in N2_METHODS:
        flags = ["--method", name, "--deterministic"]
        runs = [register(EX / "fixed_T1w.nii.gz", EX / "moving_T1w.nii.gz", EX / "fixed_labels.nii.gz",
                         EX / "moving_labels.nii.gz", str(tmp / f"n2_{name}_{i}_"), "cuda", flags) for i in (0, 1)]
        row = {"runs": [{k: v for k, v in r.items() if k != "stderr_tail"} for r in runs]}
        if all(r["exit"] == 0 for r in runs):
            a, b = (mapping(str(tmp / f"n2_{name}_{i}_"), fixed) for i in (0, 1))
            row["identical"] = bool(np.array_equal(a, b))
            row["mean_max_mm"] = distance(a, b, mask)
        else:
            row["stderr_tail"] = [r.get("stderr_tail") for r in runs]
        rows[name] = row
        print(f"[n2] {name}: identical={row.get('identical')} {row.get('mean_max_mm')}", flush=True)


def section_p1(res: dict) -> None:
    import torch

    from regcli.config import RegisterConfig
    from regcli.io.images import read_image
    from regcli.pipeline import register_images

    fixed = read_image(EX / "fixed_T1w.nii.gz", "fixed")
    moving = read_image(EX / "moving_T1w.nii.gz", "moving")
    rows = res.setdefault("p1", {})
    for method in ("convexadam", "samconvex", "dio", "foundation"):
        cfg = RegisterConfig.model_validate({"method": method, "device": "cuda"})
        peaks, held = [], []
        try:
            for _ in range(5):
                torch.cuda.reset_peak_memory_stats()
                reg = register_images(fixed, moving, cfg)
                del reg
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() / 2**20)
                held.append(torch.cuda.memory_allocated() / 2**20)
            rows[method] = {"peak_mb": peaks, "held_mb": held, "growth": peaks[-1] / peaks[1] - 1}
        except Exception as e:  # noqa: BLE001 - a probe reports every failure
            import traceback

            rows[method] = {"error": repr(e), "traceback": traceback.format_exc()[-3000:]}
        print(f"[p1] {method}: {json.dumps(rows[method])[:400]}", flush=True)


def section_pairs(tmp: Path, res: dict, pairs_dir: Path, cpu_threads) -> None:
    rows = res.setdefault("pairs", {})
    lines = (pairs_dir / "pairs.csv").read_text().split()
    for line in lines[1:]:
        fi, mi, fl, ml = (pairs_dir / c for c in line.split(",")[:4])
        if not (fi.exists() and mi.exists()):
            continue
        f, m = fi.name.split("_")[0], mi.name.split("_")[0]
        for method in ("convexadam", "samconvex", "dio", "foundation"):
            for dev in ("cuda", "cpu"):
                r = register(fi, mi, fl, ml,
                             str(tmp / f"pair_{f}_{m}_{method}_{dev}_"), dev, ["--method", method],
                             cpu_threads if dev == "cpu" else None)
                rows[f"{f}<-{m} {method} {dev}"] = {k: v for k, v in r.items() if k != "stderr_tail"}
                print(f"[pairs] {f}<-{m} {method} {dev}: exit {r['exit']} dice {r.get('dice')} "
                      f"s {r.get('seconds')} gpu {r.get('gpu_mb')} {r.get('error', '')}", flush=True)


def num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def tables(res: dict) -> str:
    out = []
    if "methods" in res:
        out.append("| variant | CUDA: exit, Dice, %det<=0, s, GPU MB, RSS MB (estimate) | CPU: exit, Dice, "
                   "%det<=0, s, RSS MB (estimate) | CUDA vs CPU mm (mean / max) |")
        out.append("|---|---|---|---|")
        for name, row in res["methods"].items():
            c, p = row["cuda"], row["cpu"]

            def cell(r, gpu=False):
                if r["exit"] != 0:
                    return f"exit {r['exit']}: {r.get('error', '')[:80]}"
                s = f"0, {num(r['dice'], 4)}, {num(r['nonpos'], 3)}, {r['seconds']:.1f}"
                if gpu:
                    s += f", {num(r.get('gpu_mb'), 0)}"
                return s + f", RSS {num(r.get('rss_mb'), 0)} (est. {num(r.get('estimate_mb'), 0)})"
            d = row.get("cuda_vs_cpu_mm")
            out.append(f"| {name} | {cell(c, True)} | {cell(p)} | {f'{d[0]:.3f} / {d[1]:.3f}' if d else ''} |")
    if "n2" in res:
        out.append("\n| method (N2: CUDA twice, --deterministic) | identical | mean / max mm |")
        out.append("|---|---|---|")
        for name, row in res["n2"].items():
            d = row.get("mean_max_mm")
            out.append(f"| {name} | {row.get('identical')} | {f'{d[0]:.2e} / {d[1]:.2e}' if d else row['runs']} |")
    if "p1" in res:
        out.append("\n| method (P1: 5 runs, one process, CUDA) | peak MB per run | held after | growth after run 2 |")
        out.append("|---|---|---|---|")
        for name, row in res["p1"].items():
            if "error" in row:
                out.append(f"| {name} | {row['error'][:100]} | | |")
            else:
                out.append(f"| {name} | {', '.join(f'{v:.0f}' for v in row['peak_mb'])} | "
                           f"{', '.join(f'{v:.0f}' for v in row['held_mb'])} | {100 * row['growth']:+.2f} % |")
    if "pairs" in res:
        out.append("\n| pair, method, device | exit | Dice | s (deformable s) | GPU MB | RSS MB (estimate) |")
        out.append("|---|---|---|---|---|---|")
        for name, r in res["pairs"].items():
            deform = (r.get("stages") or {}).get("deformable")
            out.append(f"| {name} | {r['exit']} | {num(r.get('dice'), 4)} | {num(r.get('seconds'), 1)} "
                       f"({num(deform, 1)}) | {num(r.get('gpu_mb'), 0)} | {num(r.get('rss_mb'), 0)} "
                       f"({num(r.get('estimate_mb'), 0)}) |")
    if "host" in res:
        out.append("\n| method (32^3 phantom) | peak RSS CUDA / CPU MB | CUDA minus CPU MB | GPU MB |")
        out.append("|---|---|---|---|")
        for name, row in res["host"].items():
            c, p = row["cuda"], row["cpu"]
            out.append(f"| {name} | {num(c.get('rss_mb'), 0)} / {num(p.get('rss_mb'), 0)} | "
                       f"{num(row.get('cuda_minus_cpu_mb'), 0)} | {num(c.get('gpu_mb'), 0)} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--sections", default="methods,n2,p1")
    ap.add_argument("--pairs", type=Path, default=None, help="a synthseg_brain-like folder (pairs.csv + images)")
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma-separated names of VARIANTS for the methods section")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "cpu_count": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    sections = args.sections.split(",")
    try:
        for s in sections:
            t = time.perf_counter()
            if s == "methods":
                section_methods(tmp, res, args.cpu_threads, args.variants.split(",") if args.variants else None)
            elif s == "host":
                section_host(tmp, res)
            elif s == "n2":
                section_n2(tmp, res)
            elif s == "p1":
                section_p1(res)
            elif s == "pairs" and args.pairs:
                section_pairs(tmp, res, args.pairs, args.cpu_threads)
            res.setdefault("section_seconds", {})[s] = time.perf_counter() - t
            (args.out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{res['gpu']}, torch {res['torch']}, {res['cpu_count']} CPUs\n")
    print(tables(res))


if __name__ == "__main__":
    main()
