"""Seconds per training step of every `regcli train` task, on each device asked for.

  python benchmarks/train_speed.py DATA_DIR [--devices cpu,cuda] [--threads N] [--steps A,B] [--out FILE]

Each task runs its documented recipe (docs/recipes: sam_embedding_v1, dio_v1, foundation_small, promptreg_small)
with the data replaced by the synthseg-like subjects in DATA_DIR (``sub-*_T1w.nii.gz`` with ``sub-*_labels.nii.gz``
beside them; DIO's label loss needs the label maps), without ``init:`` and without validation, through the CLI as a
user runs it. Every (task, device) trains twice, A and B steps in fresh folders; the time per step is the difference
of the two runs' training seconds (the summary's ``seconds``) over B - A, so loading, pre-alignment and the first
step's warm-up (CUDA context, cuDNN autotuning) drop out. A table goes to stdout, the raw numbers to ``--out``.
The network and crop sizes, not the data, set the cost of a step, so brains alone stand for the recipes' mixes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"embedding": "sam_embedding_v1.yaml", "dio": "dio_v1.yaml", "foundation": "foundation_small.yaml",
           "promptreg": "promptreg_small.yaml"}


def job_for(task: str, data_dir: Path, folder: Path) -> Path:
    """The task's recipe with DATA_DIR's subjects as its only data (named and typed as the recipe wants)."""
    job = yaml.safe_load((ROOT / "docs" / "recipes" / RECIPES[task]).read_text())
    glob = str(data_dir.resolve() / "sub-*_T1w.nii.gz")
    job["data"] = [{"name": "brain", "glob": glob, "modality": "mri"}] if task in ("foundation", "promptreg") \
        else [{"glob": glob}]
    for key in ("init", "validation"):
        job.pop(key, None)
    job["checkpoint_every"] = 1000
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def train_seconds(task: str, job: Path, out: Path, steps: int, device: str, threads: int) -> float:
    cmd = [sys.executable, "-m", "regcli", "train", task, "--config", str(job), "-o", str(out), "--iterations",
           str(steps), "--device", device, "--threads", str(threads), "--json", "--quiet"]
    env = {**os.environ, "REGCLI_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{task} on {device}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    return float(json.loads(r.stdout)["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--tasks", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", default="2,7", help="A,B: the two run lengths")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    a, b = (int(s) for s in args.steps.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        tmp = Path(tmp)
        for task in args.tasks.split(","):
            job = job_for(task, args.data_dir, tmp)
            for device in args.devices.split(","):
                try:
                    s = [train_seconds(task, job, tmp / f"{task}_{device}_{n}", n, device, args.threads)
                         for n in (a, b)]
                    rows.append({"task": task, "device": device, "seconds": s, "per_step": (s[1] - s[0]) / (b - a)})
                except RuntimeError as e:
                    rows.append({"task": task, "device": device, "error": str(e)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "steps": [a, b], "rows": rows}, indent=1))
    print(f"\n| task (recipe) | device | s per step | {a} / {b} steps, s |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['task']} ({RECIPES[r['task']]}) | {r['device']} | failed: {r['error'][:80]} | |")
        else:
            print(f"| {r['task']} ({RECIPES[r['task']]}) | {r['device']} | {r['per_step']:.3f} | "
                  f"{r['seconds'][0]:.1f} / {r['seconds'][1]:.1f} |")


if __name__ == "__main__":
    main()
