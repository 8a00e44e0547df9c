"""torchrun with N processes vs one process with N times the batch: the loss curves of `regcli train foundation`.

    python benchmarks/ddp_equivalence.py --config docs/recipes/foundation_small.yaml --iterations 40 \\
        --out results/ddp_equivalence

1. ``torchrun --nproc-per-node N -m regcli train foundation --config CONFIG`` with ``train.batch_size = B``
   (B pairs per process, N * B per step), one thread per process;
2. ``regcli train foundation`` in one process with ``train.batch_size = N * B``, N threads;
3. prints a table (loss per step, the difference, means) and writes OUT/ddp_equivalence.png and .json.

Both runs draw the same pairs, augmentation and noise each step (regcli.training.distributed); they differ
only through batch normalisation (per-process statistics) and the order of floating-point sums.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REGCLI_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="pairs per process")
    ap.add_argument("--out", default="results/ddp_equivalence")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    base = ["train", "foundation", "--config", a.config, "--iterations", str(a.iterations), "--quiet"]
    ddp, single = out / "ddp", out / "single"
    for d in (ddp, single):
        if (d / "checkpoint.pt").exists():
            sys.exit(f"{d} already holds a run; remove it first")
    ov = ["--batch-size"]
    t_ddp = _run([str(torchrun), "--nproc-per-node", str(a.nproc), "-m", "regcli", *base, "-o", str(ddp),
                  *ov, str(a.batch), "--threads", "1"], 1)
    t_one = _run([sys.executable, "-m", "regcli", *base, "-o", str(single), *ov, str(a.nproc * a.batch),
                  "--threads", str(a.nproc)], a.nproc)
    la = np.array([h["loss"] for h in json.loads((ddp / "history.json").read_text())["history"]])
    lb = np.array([h["loss"] for h in json.loads((single / "history.json").read_text())["history"]])
    print(f"| step | torchrun {a.nproc} x batch {a.batch} | 1 process x batch {a.nproc * a.batch} | difference |")
    print("|---|---|---|---|")
    for k in range(len(la)):
        print(f"| {k + 1} | {la[k]:.4f} | {lb[k]:.4f} | {la[k] - lb[k]:+.4f} |")
    w = max(1, len(la) // 4)
    print(f"\nmean loss: {la.mean():.4f} vs {lb.mean():.4f}; last {w} steps: {la[-w:].mean():.4f} vs "
          f"{lb[-w:].mean():.4f}; largest |difference| {np.abs(la - lb).max():.4f}; step-to-step sd of the single "
          f"run {np.diff(lb).std():.4f}")
    print(f"wall time: torchrun {t_ddp:.0f} s, one process {t_one:.0f} s")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = np.arange(1, len(la) + 1)
    ax.plot(steps, lb, "-o", ms=3, label=f"1 process, batch {a.nproc * a.batch}")
    ax.plot(steps, la, "-x", ms=4, label=f"torchrun {a.nproc} processes, batch {a.batch} each")
    ax.set(xlabel="step", ylabel="GradICON loss", title="regcli train foundation: DDP vs one process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ddp_equivalence.png", dpi=110)
    (out / "ddp_equivalence.json").write_text(json.dumps({"torchrun": la.tolist(), "single": lb.tolist(),
                                                          "seconds": {"torchrun": t_ddp, "single": t_one},
                                                          "nproc": a.nproc, "batch": a.batch}, indent=1))


if __name__ == "__main__":
    main()
