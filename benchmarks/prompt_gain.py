"""Test-time prompts on synthseg pairs: label prompts on 4 structures, landmark prompts from structure centroids.

For each pair and method, three registrations: plain; ``prompts.labels`` = the 4 prompted structures (their
soft Dice joins the IO objective); ``prompts.landmarks`` with the centroids (LPS mm) of half of the structures
as landmarks. Reported: Dice of the prompted structures and mean Dice of the others; TRE (distance between the
mapped fixed centroid and the moving centroid) on the prompted landmarks and on the held-out centroids.

  python benchmarks/prompt_gain.py convexadam "3,4;11,12" [--labels 17,53,18,54] [--config extra.yaml]
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from regcli.config import build_config, deep_merge, load_yaml  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.pipeline import register_images  # noqa: E402
from regcli.reports.landmarks import points_from_sequence  # noqa: E402
from regcli.reports.metrics import dice_per_label  # noqa: E402
from regcli.resample import warp  # noqa: E402

D = "/work/shared/data/synthseg_brain"


def centroids(lab, ids):
    """World (LPS mm) centroid of each label id: (len(ids), 3)."""
    arr = lab.data.numpy()
    out = []
    for i in ids:
        idx = np.argwhere(arr == i)[:, ::-1].astype(np.float64)  # (n, 3) as x, y, z index
        c = np.append(idx.mean(0), 1.0)
        out.append((lab.grid.index_to_world() @ c)[:3])
    return np.array(out)


def main() -> None:
    method = sys.argv[1]
    pairs = [tuple(map(int, p.split(","))) for p in sys.argv[2].split(";")]
    prompted = [17, 53, 18, 54]
    if "--labels" in sys.argv:
        prompted = [int(x) for x in sys.argv[sys.argv.index("--labels") + 1].split(",")]
    extra = load_yaml(sys.argv[sys.argv.index("--config") + 1]) if "--config" in sys.argv else {}
    base = deep_merge({"method": method, "html_report": False}, extra)
    rows = []
    for f, m in pairs:
        fx, mv = read_image(f"{D}/sub-{f:02d}_T1w.nii.gz"), read_image(f"{D}/sub-{m:02d}_T1w.nii.gz")
        fl, ml = read_labels(f"{D}/sub-{f:02d}_labels.nii.gz"), read_labels(f"{D}/sub-{m:02d}_labels.nii.gz")
        ids = sorted((set(torch.unique(fl.data).tolist()) & set(torch.unique(ml.data).tolist())) - {0})
        others = [i for i in ids if i not in prompted]
        lm_ids, held = ids[0::2], ids[1::2]
        cf, cm = centroids(fl, ids), centroids(ml, ids)
        pos = {i: k for k, i in enumerate(ids)}
        lm = (points_from_sequence(cf[[pos[i] for i in lm_ids]]), points_from_sequence(cm[[pos[i] for i in lm_ids]]))
        for variant, over in (("plain", {}), ("labels", {"prompts": {"labels": prompted}}),
                              ("landmarks", {"prompts": {"landmarks": True}})):
            cfg = build_config(None, deep_merge(base, over))
            t = time.perf_counter()
            reg = register_images(fx, mv, cfg, fixed_labels=fl, moving_labels=ml, landmarks=lm)
            secs = time.perf_counter() - t
            d = dice_per_label(fl, warp(ml, reg.transform, fx.grid, "nearest"), ids)
            mapped = reg.transform.map_points(torch.from_numpy(cf)).numpy()
            err = np.linalg.norm(mapped - cm, axis=1)
            rows.append({"pair": f"{f},{m}", "variant": variant, "seconds": secs,
                         "dice_prompted": float(np.mean([d[i] for i in prompted])),
                         "dice_others": float(np.nanmean([d[i] for i in others])),
                         "tre_landmarks": float(np.mean([err[pos[i]] for i in lm_ids])),
                         "tre_held_out": float(np.mean([err[pos[i]] for i in held]))})
            r = rows[-1]
            print(f"{r['pair']:>6} {variant:>9}  Dice prompted {r['dice_prompted']:.3f}  others {r['dice_others']:.4f}  "
                  f"TRE landmarks {r['tre_landmarks']:.2f} mm  held-out {r['tre_held_out']:.2f} mm  {secs:.1f} s",
                  flush=True)
    print(f"\nmean over {len(pairs)} pair(s), method {method}, prompted labels {prompted}")
    print(f"{'variant':>9} {'Dice prompted':>14} {'Dice others':>12} {'TRE lm (mm)':>12} {'TRE held-out':>13} {'s':>6}")
    for v in ("plain", "labels", "landmarks"):
        rs = [r for r in rows if r["variant"] == v]
        print(f"{v:>9} {np.mean([r['dice_prompted'] for r in rs]):>14.3f} {np.mean([r['dice_others'] for r in rs]):>12.4f} "
              f"{np.mean([r['tre_landmarks'] for r in rs]):>12.2f} {np.mean([r['tre_held_out'] for r in rs]):>13.2f} "
              f"{np.mean([r['seconds'] for r in rs]):>6.1f}")
    if "--json" in sys.argv:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
