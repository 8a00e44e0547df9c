#!/usr/bin/env python
"""Affine stage on the 10 synthseg_brain pairs: mean Dice over the 32 labels before/after, and seconds.

    python benchmarks/affine_synthseg.py                     # regcli's affine stage, defaults of AffineConfig
    python benchmarks/affine_synthseg.py --ants              # also ANTs affine (antspyx) for reference
    python benchmarks/affine_synthseg.py --threads 2 --pairs 0 3 --set levels_mm=6,3 --set iterations=80,40
    python benchmarks/affine_synthseg.py --json out.json

The timing covers ``run_affine_stage`` on the images as read (1 mm, full field of view), not the reading
of files nor the label warping used for the evaluation, nor the one-off import that torch's first
``Adam()`` does (about 1 s, paid before the loop). ``OMP_WAIT_POLICY=PASSIVE`` is set (see ``main``).
The moving labels are warped onto the fixed grid with nearest-neighbour interpolation through the
recovered fixed -> moving transform.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "synthseg_brain"
LABELS = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 41, 42, 43, 44, 46, 47, 49, 50,
          51, 52, 53, 54, 58, 60)


def mean_dice(a, b) -> float:
    """Mean Dice over :data:`LABELS` of two (Z, Y, X) integer label tensors on the same grid."""
    import torch

    a = a.to(torch.int64).reshape(-1)
    b = b.to(torch.int64).reshape(-1)
    n = int(max(int(a.max()), int(b.max()))) + 1
    inter = torch.bincount(a[a == b], minlength=n).double()
    ca = torch.bincount(a, minlength=n).double()
    cb = torch.bincount(b, minlength=n).double()
    idx = torch.as_tensor(LABELS)
    d = 2 * inter[idx] / (ca[idx] + cb[idx]).clamp(min=1)
    return float(d.mean())


def parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        if v.lower() in ("true", "false"):  # the config's booleans take only booleans
            out[k] = v.lower() == "true"
        elif "," in v:
            out[k] = tuple(float(x) if "." in x or k.endswith("_mm") else int(x) for x in v.split(",") if x)
        else:
            try:
                out[k] = int(v)
            except ValueError:
                try:
                    out[k] = float(v)
                except ValueError:
                    out[k] = v
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, nargs="*", help="row indices of pairs.csv (default: all)")
    ap.add_argument("--set", action="append", default=[], help="AffineConfig override, e.g. metric=mi")
    ap.add_argument("--ants", action="store_true", help="also run ants.registration(type_of_transform='Affine')")
    ap.add_argument("--no-regcli", action="store_true", help="skip regcli (with --ants: ANTs only)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args()

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    # idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads make 2-thread runs
    # of these small tensors 5-8x slower than 1 thread (must be set before torch starts OpenMP)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    from regcli.config import AffineConfig
    from regcli.io.images import read_image, read_labels
    from regcli.resample import warp
    from regcli.solvers.affine import run_affine_stage

    # the first torch.optim.Adam() of a process imports torch._dynamo (about 1 s, more on a busy machine);
    # pay it here so the per-pair times are steady-state (the CLI pays it once per run)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    cfg = AffineConfig(**parse_set(args.set))
    rows = list(csv.DictReader(open(args.data / "pairs.csv")))
    sel = args.pairs if args.pairs else range(len(rows))
    print(f"# AffineConfig: {cfg.model_dump()}", file=sys.stderr)
    print(f"# threads: {args.threads}; 'sec' is wall time, 'cpu' the process CPU time of the stage", file=sys.stderr)
    results = []
    header = f"{'pair':<24} {'before':>7} {'regcli':>7} {'sec':>6} {'cpu':>6}"
    header += f" {'ants':>7} {'sec':>6}" if args.ants else ""
    print(header)
    for i in sel:
        r = rows[i]
        fixed = read_image(args.data / r["fixed_image"], "fixed")
        moving = read_image(args.data / r["moving_image"], "moving")
        flab = read_labels(args.data / r["fixed_labels"], "fixed labels")
        mlab = read_labels(args.data / r["moving_labels"], "moving labels")
        before = mean_dice(flab.data, warp(mlab, None, fixed.grid, interp="nearest").data)
        row = {"pair": f"{r['fixed_image'][:6]}<-{r['moving_image'][:6]}", "before": before}
        if not args.no_regcli:
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_affine_stage(fixed, moving, cfg)
            row["regcli_seconds"] = time.perf_counter() - t0
            row["regcli_cpu_seconds"] = time.process_time() - c0
            row["regcli"] = mean_dice(flab.data, warp(mlab, res.transform, fixed.grid, interp="nearest").data)
            row["regcli_matrix"] = res.transform.matrix.tolist()
        if args.ants:
            import ants
            import SimpleITK as sitk

            from regcli.transforms.affine import AffineTransform

            f = ants.image_read(str(args.data / r["fixed_image"]))
            m = ants.image_read(str(args.data / r["moving_image"]))
            t0 = time.perf_counter()
            out = ants.registration(f, m, type_of_transform="Affine")
            row["ants_seconds"] = time.perf_counter() - t0
            tx = AffineTransform.from_sitk(sitk.ReadTransform(out["fwdtransforms"][0]))
            row["ants"] = mean_dice(flab.data, warp(mlab, tx, fixed.grid, interp="nearest").data)
            row["ants_matrix"] = tx.matrix.tolist()
        line = f"{row['pair']:<24} {before:7.3f}"
        line += f" {row.get('regcli', float('nan')):7.3f} {row.get('regcli_seconds', float('nan')):6.2f}"
        line += f" {row.get('regcli_cpu_seconds', float('nan')):6.2f}"
        if args.ants:
            line += f" {row['ants']:7.3f} {row['ants_seconds']:6.2f}"
        print(line, flush=True)
        results.append(row)

    def mean(k):
        v = [x[k] for x in results if k in x]
        return sum(v) / len(v) if v else float("nan")
    line = f"{'mean':<24} {mean('before'):7.3f} {mean('regcli'):7.3f} {mean('regcli_seconds'):6.2f}"
    line += f" {mean('regcli_cpu_seconds'):6.2f}"
    if args.ants:
        line += f" {mean('ants'):7.3f} {mean('ants_seconds'):6.2f}"
    print(line)
    if args.json:
        args.json.write_text(json.dumps({"config": cfg.model_dump(), "threads": args.threads, "rows": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
