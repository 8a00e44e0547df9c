"""How far a registration moves under changes that should not change it (RELIABILITY N3 and N5).

  python benchmarks/reproducibility.py [--pair sub-03,sub-04] [--methods convexadam,samconvex] [--every 20]

On a synthseg_brain pair, each method runs in-process (no files written) as:

* ``float32``: the default, 2 threads, twice (the second run must give the same mapping to the last bit: N1);
* ``float64``: ``precision: float64`` with its own affine stage, and again with the float32 run's affine stage
  (so the deformable stage alone is compared);
* ``1 thread``: float32 on one thread (N5).

The table gives, for every variant against the float32 run, the distance between the two whole mappings
``x -> A(x + u(x))`` at every ``--every``-th voxel inside the fixed labels (mean, 95th percentile, max, mm), and
the largest difference of the affine stages' matrices (linear part) and translations (mm).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthseg_brain"


def main() -> None:
    import regcli.solvers.affine as affine_stage
    from regcli.config import RegisterConfig
    from regcli.io.images import read_image
    from regcli.pipeline import register_images

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="sub-03,sub-04", help="fixed,moving subject names of synthseg_brain")
    ap.add_argument("--methods", default="convexadam,samconvex")
    ap.add_argument("--every", type=int, default=20, help="use every n-th voxel inside the fixed labels")
    args = ap.parse_args()
    f, m = args.pair.split(",")
    fixed = read_image(DATA / f"{f}_T1w.nii.gz", "fixed")
    moving = read_image(DATA / f"{m}_T1w.nii.gz", "moving")
    labels = read_image(DATA / f"{f}_labels.nii.gz", "fixed labels", check_variance=False)
    points = fixed.grid.world_coords()[labels.data > 0][::args.every].to(torch.float64)
    run_affine = affine_stage.run_affine_stage

    def register(method: str, precision: str, threads: int, affine=None):
        """(mapped points, affine matrix, seconds); ``affine``: an affine stage result to use instead of running
        the stage."""
        torch.set_num_threads(threads)
        affine_stage.run_affine_stage = (lambda *a, **k: affine) if affine is not None else capture
        t = time.perf_counter()
        reg = register_images(fixed, moving, RegisterConfig.model_validate({"method": method, "precision": precision}))
        return reg.transform.map_points(points), reg.affine.matrix, time.perf_counter() - t

    captured = {}

    def capture(*a, **k):
        captured["stage"] = run_affine(*a, **k)
        return captured["stage"]

    print("| method | variant against float32 (2 threads) | mapping difference mm: mean / p95 / max "
          f"| affine: linear / translation mm | s |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        ref, ref_affine, seconds = register(method, "float32", 2)
        stage32 = captured["stage"]
        variants = {"float32 again (N1)": ("float32", 2, None),
                    "float64, own affine stage (N3)": ("float64", 2, None),
                    "float64, the float32 affine stage": ("float64", 2, stage32),
                    "1 thread (N5)": ("float32", 1, None)}
        print(f"| {method} | float32 itself | | | {seconds:.1f} |")
        for name, (precision, threads, stage) in variants.items():
            pts, mat, s = register(method, precision, threads, stage)
            d = (pts - ref).norm(dim=-1)
            lin = float(np.abs(mat[:3, :3] - ref_affine[:3, :3]).max())
            trans = float(np.abs(mat[:3, 3] - ref_affine[:3, 3]).max())
            print(f"| {method} | {name} | {float(d.mean()):.4f} / {float(torch.quantile(d, 0.95)):.4f} / "
                  f"{float(d.max()):.4f} | {lin:.1e} / {trans:.4f} | {s:.1f} |", flush=True)
    affine_stage.run_affine_stage = run_affine


if __name__ == "__main__":
    main()
