"""Quick tuning of ConvexAdam parameters on a few synthseg pairs (mean Dice over labels present in both).

  python benchmarks/tune_convexadam.py '{"base": {}, "ws1.5": {"working_spacing_mm": 1.5}}' ["3,4;11,12;13,14"]
"""

import os, sys, time, json
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
torch.set_num_threads(2)
from regcli.config import build_config
from regcli.pipeline import register_images
from regcli.io.images import read_image, read_labels
from regcli.resample import warp
from regcli.reports.metrics import dice_per_label
D = "/work/shared/data/synthseg_brain"
pairs = [(3, 4), (11, 12), (13, 14)] if len(sys.argv) < 3 else [tuple(map(int, p.split(","))) for p in sys.argv[2].split(";")]
variants = json.loads(sys.argv[1])
cache = {}
for name, over in variants.items():
    cfg = build_config(None, dict(over, html_report=False))
    ds, ts = [], []
    for f, m in pairs:
        key = (f, m)
        if key not in cache:
            cache[key] = [read_image(f"{D}/sub-{f:02d}_T1w.nii.gz"), read_image(f"{D}/sub-{m:02d}_T1w.nii.gz"),
                          read_labels(f"{D}/sub-{f:02d}_labels.nii.gz"), read_labels(f"{D}/sub-{m:02d}_labels.nii.gz")]
        fx, mv, fl, ml = cache[key]
        t = time.perf_counter()
        reg = register_images(fx, mv, cfg)
        ts.append(time.perf_counter() - t)
        wl = warp(ml, reg.transform, fx.grid, "nearest")
        d = dice_per_label(fl, wl)
        ds.append(sum(d.values()) / len(d))
    print(f"{name:28s} " + " ".join(f"{x:.3f}" for x in ds) + f"  mean {sum(ds)/len(ds):.4f}  sec {sum(ts)/len(ts):.1f}", flush=True)
