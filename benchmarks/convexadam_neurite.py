"""ConvexAdam on the neurite brain pair (shared/data/neurite_brain_aseg): Dice, folding, time, memory.

The pair is pre-aligned (1 mm, 160x192x224), so no affine stage runs: both images are resampled onto the
2 mm working grid of the fixed image, registered, the field is upsampled to the fixed 1 mm grid and the
moving labels are warped with nearest-neighbour interpolation. Dice is the mean over the 30 labels of
``vxm_eval_labels.txt`` (no registration: 0.522).

    .venv/bin/python benchmarks/convexadam_neurite.py                 # subjA fixed, subjB moving
    .venv/bin/python benchmarks/convexadam_neurite.py --reverse       # subjB fixed, subjA moving
    .venv/bin/python benchmarks/convexadam_neurite.py --both --threads 2
    .venv/bin/python benchmarks/convexadam_neurite.py --set '{"instance": {"iterations": 40}}'
    .venv/bin/python benchmarks/convexadam_neurite.py --profile       # torch.profiler table of the run

Timings depend on what else runs on the machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regcli.config import build_config  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.methods.convexadam import convexadam  # noqa: E402
from regcli.resample import resample_to_grid, upsample_field, warp  # noqa: E402
from regcli.spaces.grid import Grid  # noqa: E402
from regcli.transforms.displacement import DisplacementField  # noqa: E402

DATA = Path(os.environ.get("REGCLI_SHARED_DATA", ROOT.parent / "shared" / "data")) / "neurite_brain_aseg"
SUBJECTS = {"A": "subjA_vxm", "B": "subjB_l2r"}


def jacobian_determinant(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """det(I + du/dx) of x -> x + u(x); disp (3, Z, Y, X) world mm on ``grid``; central differences
    (one-sided at the border) along index axes, mapped to mm through the grid's index-to-world matrix.
    Returns (Z, Y, X) float64."""
    u = disp.to(torch.float64)
    # G[c, k] = d u_c / d index_k, index order (x, y, z) <-> tensor dims (3, 2, 1)
    grads = torch.gradient(u, dim=(3, 2, 1))
    G = torch.stack(grads, dim=1)  # (3 comps, 3 index axes, Z, Y, X)
    Ainv = torch.as_tensor(np.linalg.inv(grid.index_to_world()[:3, :3]), dtype=torch.float64)
    J = torch.einsum("ckzyx,kd->zyxcd", G, Ainv) + torch.eye(3, dtype=torch.float64)
    return torch.linalg.det(J)


def dice_mean(a: np.ndarray, b: np.ndarray, labels: list[int]) -> float:
    vals = []
    for lab in labels:
        x, y = a == lab, b == lab
        s = x.sum() + y.sum()
        if s:
            vals.append(2.0 * np.logical_and(x, y).sum() / s)
    return float(np.mean(vals))


def antialias(image, spacing_mm: float):
    """Gaussian of sigma = (target - source spacing) / 2 mm before downsampling (what regcli's pipeline does)."""
    import SimpleITK as sitk

    sigma = [0.5 * max(spacing_mm - s, 0.0) for s in image.grid.spacing]
    img = sitk.SmoothingRecursiveGaussian(image.to_sitk(), sigma)
    return image.with_data(torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32)))


def run_pair(fixed_key: str, moving_key: str, overrides: dict, profile: bool = False, smooth: bool = False) -> dict:
    fa, ma = SUBJECTS[fixed_key], SUBJECTS[moving_key]
    labels = [int(v) for v in (DATA / "vxm_eval_labels.txt").read_text().split()]
    fixed = read_image(DATA / f"{fa}_image.nii.gz", "fixed")
    moving = read_image(DATA / f"{ma}_image.nii.gz", "moving")
    fixed_seg = read_labels(DATA / f"{fa}_labels.nii.gz", "fixed labels")
    moving_seg = read_labels(DATA / f"{ma}_labels.nii.gz", "moving labels")
    cfg = build_config(None, overrides)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    work = fixed.grid.with_spacing(cfg.working_spacing_mm)
    if smooth:
        f2 = resample_to_grid(antialias(fixed, cfg.working_spacing_mm), work)
        m2 = resample_to_grid(antialias(moving, cfg.working_spacing_mm), work)
    else:
        f2 = resample_to_grid(fixed, work)
        m2 = resample_to_grid(moving, work)
    times["resample_inputs"] = time.perf_counter() - t0

    cpu0 = time.process_time()
    if profile:
        from torch.profiler import profile as tprofile

        with tprofile() as prof:
            res = convexadam(f2, m2, cfg)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    else:
        res = convexadam(f2, m2, cfg)
    times.update({f"convexadam.{k}": v for k, v in res.timings.items()})
    times["convexadam.cpu"] = time.process_time() - cpu0  # CPU seconds, all threads: less sensitive to load

    t = time.perf_counter()
    disp = upsample_field(res.field.disp, work, fixed.grid)
    times["upsample_1mm"] = time.perf_counter() - t
    t = time.perf_counter()
    warped = warp(moving_seg, DisplacementField(disp, fixed.grid), fixed.grid, interp="nearest")
    times["warp_labels"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before the metrics below

    fs, ws = fixed_seg.numpy(), warped.numpy()
    detj = jacobian_determinant(disp, fixed.grid)
    detj_w = jacobian_determinant(res.field.disp, work)
    io = res.history.get("instance", [])
    return {
        "fixed": fa, "moving": ma,
        "dice_before": dice_mean(fs, moving_seg.numpy(), labels),
        "dice": dice_mean(fs, ws, labels),
        "pct_detj_le0_1mm": float(100.0 * (detj <= 0).double().mean()),
        "pct_detj_le0_work": float(100.0 * (detj_w <= 0).double().mean()),
        "sdlogj_1mm": float(torch.log(detj[detj > 0]).std()),
        "max_disp_mm": float(disp.norm(dim=0).max()),
        "io_loss_first_last": (io[0]["loss"], io[-1]["loss"]) if io else None,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "peak_rss_mb": rss_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reverse", action="store_true", help="subjB fixed, subjA moving")
    ap.add_argument("--both", action="store_true", help="run both directions")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--set", default="{}", help="JSON config overrides, e.g. '{\"convex\": {\"grid_sp\": 4}}'")
    ap.add_argument("--smooth", action="store_true", help="Gaussian anti-aliasing before the 2 mm resampling")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    a = ap.parse_args()
    if not DATA.is_dir():
        sys.exit(f"data not found: {DATA}")
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = json.loads(a.set)
    pairs = [("A", "B"), ("B", "A")] if a.both else ([("B", "A")] if a.reverse else [("A", "B")])
    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    results = []
    for f, m in pairs:
        r = run_pair(f, m, overrides, a.profile, a.smooth)
        results.append(r)
        if not a.json:
            print(f"{r['fixed']} <- {r['moving']}: Dice {r['dice_before']:.3f} -> {r['dice']:.4f}, "
                  f"% detJ<=0 {r['pct_detj_le0_1mm']:.4f} (1 mm) {r['pct_detj_le0_work']:.4f} (2 mm), "
                  f"SDlogJ {r['sdlogj_1mm']:.3f}, max |u| {r['max_disp_mm']:.1f} mm, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
            print("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r["seconds"].items()))
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    if a.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
