"""Validation Dice per epoch of two training runs (e.g. Optron off and on): a table and a plot.

    python benchmarks/optron_curves.py results/promptreg_small results/promptreg_small_optron \\
        --labels "Optron off" "Optron on (10 steps)" --out docs/figures/optron_validation.png

Reads each run's history.json (`validation`: Dice on the labelled held-out pairs at steps 0, every, ..., the
last) and its job.json to say what an epoch is: `batch_size` pairs of every dataset, so `len(data)` steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--labels", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    labels = a.labels or [Path(r).name for r in a.runs]
    curves = []
    for run in a.runs:
        hist = json.loads((Path(run) / "history.json").read_text())
        job = json.loads((Path(run) / "job.json").read_text())
        steps_per_epoch = len(job["data"])  # an epoch draws every dataset batch_size times (regcli.training.pairs)
        curves.append([(v["step"], v["step"] / steps_per_epoch, v["dice"]) for v in hist["validation"]])
    steps = sorted({s for c in curves for s, _, _ in c})
    print("| step | epoch | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for s in steps:
        vals = [next((f"{d:.4f}" for st, _, d in c if st == s), "") for c in curves]
        ep = next(e for c in curves for st, e, _ in c if st == s)
        print(f"| {s} | {ep:.1f} | " + " | ".join(vals) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for c, lab in zip(curves, labels):
        ax.plot([e for _, e, _ in c], [d for _, _, d in c], "-o", ms=3, label=lab)
    ax.set(xlabel="epoch", ylabel="validation Dice (network grid)", title="Validation Dice while training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
