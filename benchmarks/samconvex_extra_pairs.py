"""SAMConvex against ConvexAdam, paired, on synthseg pairs outside pairs.csv and the tuning pairs (issue 3).

pairs.csv holds 10 pairs (sub-01<-02, 03<-04, ...), too few to tell a difference of 0.001 Dice from noise. This
script registers the pairs sub-i <- sub-j with j = i + offset (mod 20) for each offset (default 6 and 9: 40 ordered
pairs, none in pairs.csv, none of the tuning pairs 2<-5, 8<-11, 14<-17, no pair twice), with both methods at their
defaults (in-process through ``register_images``, 2 threads, no writing), and scores the mean Dice over the labels
present in both maps. One JSON line per pair is appended to OUT (a rerun resumes); the summary is printed at the end.

    .venv/bin/python benchmarks/samconvex_extra_pairs.py results/s18_extra_pairs.jsonl [6,9]
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from regcli.config import build_config  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.pipeline import register_images  # noqa: E402
from regcli.reports.metrics import dice_per_label  # noqa: E402
from regcli.resample import warp  # noqa: E402

D = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "synthseg_brain"
METHODS = ("convexadam", "samconvex")


def main() -> None:
    torch.set_num_threads(2)
    out = Path(sys.argv[1])
    offsets = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "6,9").split(",")]
    pairs = [(i, (i + o - 1) % 20 + 1) for o in offsets for i in range(1, 21)]
    done = {(r["f"], r["m"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    cfgs = {m: build_config(None, {"method": m, "html_report": False}) for m in METHODS}
    for f, m in pairs:
        if (f, m) in done:
            continue
        fx, mv = (read_image(D / f"sub-{k:02d}_T1w.nii.gz") for k in (f, m))
        fl, ml = (read_labels(D / f"sub-{k:02d}_labels.nii.gz") for k in (f, m))
        rec = {"f": f, "m": m}
        for name, cfg in cfgs.items():
            t = time.perf_counter()
            reg = register_images(fx, mv, cfg)
            rec[name + "_s"] = time.perf_counter() - t
            d = dice_per_label(fl, warp(ml, reg.transform, fx.grid, "nearest"))
            rec[name] = sum(d.values()) / len(d)
        with out.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"sub-{f:02d} <- sub-{m:02d}: samconvex - convexadam {rec['samconvex'] - rec['convexadam']:+.4f}",
              flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    diff = [r["samconvex"] - r["convexadam"] for r in rows]
    n, mean = len(diff), statistics.fmean(diff)
    se = statistics.stdev(diff) / n ** 0.5 if n > 1 else float("nan")
    print(f"{n} pairs: convexadam {statistics.fmean(r['convexadam'] for r in rows):.4f}, samconvex "
          f"{statistics.fmean(r['samconvex'] for r in rows):.4f}; difference {mean:+.5f} (paired t {mean / se:.2f}, "
          f"about 95 % within {mean - 2 * se:+.4f} .. {mean + 2 * se:+.4f}); {sum(x > 0 for x in diff)} up, "
          f"{sum(x < 0 for x in diff)} down; seconds {statistics.fmean(r['samconvex_s'] for r in rows):.1f} / "
          f"{statistics.fmean(r['convexadam_s'] for r in rows):.1f}")


if __name__ == "__main__":
    main()
