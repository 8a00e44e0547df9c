"""Quick tuning of ConvexAdam parameters on a few synthseg pairs (mean Dice over labels present in both).

  python benchmarks/tune_convexadam.py '{"base": {}, "ws1.5": {"working_spacing_mm": 1.5}}' ["3,4;11,12;13,14"]
"""

import os, sys, json
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
torch.set_num_threads(2)
from regcli.config import build_config
from synthseg_pairs import score
pairs = [(3, 4), (11, 12), (13, 14)] if len(sys.argv) < 3 else [tuple(map(int, p.split(","))) for p in sys.argv[2].split(";")]
variants = json.loads(sys.argv[1])
cache = {}
for name, over in variants.items():
    ds, ts = score(build_config(None, dict(over, html_report=False)), pairs, cache)
    print(f"{name:28s} " + " ".join(f"{x:.3f}" for x in ds) + f"  mean {sum(ds)/len(ds):.4f}  sec {sum(ts)/len(ts):.1f}", flush=True)
