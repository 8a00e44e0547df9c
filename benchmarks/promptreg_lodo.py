"""Leave-one-dataset-out (zero-shot) table: PromptReg beside the foundation network trained the same way.

    python benchmarks/promptreg_lodo.py --out results/lodo --iterations 200 --threads 1 [--tasks brain,ct,prostate]

1. Writes the evaluation data under OUT/eval/: the 5 unseen synthseg pairs (brain: pairs 6-10), the 10 prostate
   MR-US pairs with gland labels, and 3 synthetic CT pairs of the one TotalSegmentator subject (the moving CT
   pulled back through a known smooth deformation and rigid motion, benchmarks/samconvex_ct_prostate.py), and a
   dataset manifest OUT/eval/datasets.yaml (one task per dataset).
2. For every task T: `regcli train promptreg` and `regcli train foundation` on the recipes
   docs/recipes/promptreg_small.yaml and foundation_small.yaml with `--exclude-task T` and `--iterations N`
   (same data, seed and steps), without the recipes' validation.
3. Scores each model zero-shot on T: `regcli evaluate OUT/eval/datasets.yaml --task T --method promptreg|foundation
   --io none` (the networks alone, after the affine stage; prostate, `align: none` in the manifest, without it,
   as trained), and the affine stage alone as the reference.
4. Prints the table (mean Dice per left-out task) and writes OUT/lodo_<models>.json (``--models`` splits the
   networks over processes that share OUT).

Training runs that already finished (OUT/<model>_wo_<T>/model/config.json) are not repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
D = Path(os.environ.get("REGCLI_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def write_eval_data(out: Path, ct_pairs: int, seed: int) -> Path:
    """The labelled evaluation pairs of every task and their dataset manifest."""
    from regcli.io.images import read_image, read_labels, write_image
    from samconvex_ct_prostate import synthetic_ct_pair

    ev = out / "eval"
    (ev / "ct").mkdir(parents=True, exist_ok=True)
    ct = read_image(str(D / "totalsegmentator_ct/ct_image.nii.gz"), "CT image")
    lab = read_labels(str(D / "totalsegmentator_ct/ct_labels_total.nii.gz"), "CT labels")
    rows = ["fixed_image,moving_image,fixed_labels,moving_labels,pair"]
    write_image(ct, ev / "ct" / "fixed.nii.gz", "float32")
    write_image(lab, ev / "ct" / "fixed_labels.nii.gz", "uint8")
    for k in range(ct_pairs):
        mv, ml, _ = synthetic_ct_pair(ct, lab, k, seed)
        write_image(mv, ev / "ct" / f"moving{k}.nii.gz", "float32")
        write_image(ml, ev / "ct" / f"moving{k}_labels.nii.gz", "uint8")
        rows.append(f"fixed.nii.gz,moving{k}.nii.gz,fixed_labels.nii.gz,moving{k}_labels.nii.gz,synthetic{k}")
    (ev / "ct" / "pairs.csv").write_text("\n".join(rows) + "\n")
    P = D / "deepreg_prostate_mrus"
    rows = ["fixed_image,moving_image,fixed_labels,moving_labels,pair"]
    for c in range(10):
        rows.append(f"{P}/case{c:03d}_fixed_image.nii.gz,{P}/case{c:03d}_moving_image.nii.gz,"
                    f"{P}/case{c:03d}_fixed_gland.nii.gz,{P}/case{c:03d}_moving_gland.nii.gz,case{c:03d}")
    (ev / "prostate_pairs.csv").write_text("\n".join(rows) + "\n")
    manifest = ev / "datasets.yaml"
    manifest.write_text(
        "datasets:\n"
        f"  - {{name: brain, pairs: {ROOT / 'docs/recipes/synthseg_val_pairs.csv'}}}\n"
        "  - {name: ct, pairs: ct/pairs.csv, modality: ct}\n"
        "  - {name: prostate, pairs: prostate_pairs.csv, align: none}\n")
    return manifest


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "REGCLI_NO_PROGRESS": "1"}
    with log.open("w") as fh:
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode not in (0,):
        print(f"warning: {' '.join(cmd[:4])} ... exited {r.returncode} (see {log})")


def evaluate(manifest: Path, task: str, method: str, weights: Path | None, out: Path, threads: int) -> dict:
    cfg = out.with_suffix(".yaml")  # the manifest gives each task's modality and (prostate) no affine stage
    cfg.write_text(json.dumps({method: {"weights": str(weights), "io": "none"}} if weights is not None else {}))
    cmd = [sys.executable, "-m", "regcli", "evaluate", str(manifest), "--task", task, "--method", method,
           "--config", str(cfg), "-o", str(out), "--threads", str(threads), "--no-hd95", "--overwrite", "--json"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "REGCLI_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    try:
        d = json.loads(r.stdout)
    except json.JSONDecodeError:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    s = d["summary"]
    return {"dice": s.get("dice_mean", {}).get("mean"), "dice_initial": s.get("dice_initial_mean", {}).get("mean"),
            "pct_nonpos_jac": s.get("pct_nonpos_jac", {}).get("mean"), "n": d["n_pairs"], "failed": d["n_failed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/lodo")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--tasks", default="brain,ct,prostate")
    ap.add_argument("--models", default="promptreg,foundation", help="which networks (split them over processes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ct-pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = write_eval_data(out, a.ct_pairs, a.seed)
    recipes = {m: ROOT / f"docs/recipes/{m}_small.yaml" for m in a.models.split(",")}
    table = {}
    for task in a.tasks.split(","):
        row = {"affine": evaluate(manifest, task, "affine", None, out / f"eval_affine_{task}", a.threads)}
        for model, recipe in recipes.items():
            run_dir = out / f"{model}_wo_{task}"
            if not (run_dir / "model" / "config.json").is_file():
                novalid = out / f"{model}_novalidation.yaml"
                text = recipe.read_text().split("\nvalidation:")[0]
                novalid.write_text(text.replace("../../../shared/data", str(D)).replace(
                    "pairs: deepreg_prostate_pairs.csv", f"pairs: {ROOT / 'docs/recipes/deepreg_prostate_pairs.csv'}"))
                run([sys.executable, "-m", "regcli", "train", model, "--config", str(novalid), "-o", str(run_dir),
                     "--exclude-task", task, "--iterations", str(a.iterations), "--threads", str(a.threads)],
                    out / f"{model}_wo_{task}.log")
            row[model] = evaluate(manifest, task, model, run_dir / "model", out / f"eval_{model}_wo_{task}",
                                  a.threads)
        table[task] = row
        print(task, json.dumps(row))
    (out / f"lodo_{a.models.replace(',', '_')}.json").write_text(json.dumps(table, indent=1))
    print("\n| left-out task | pairs | Dice before | affine stage | foundation (zero-shot) | PromptReg (zero-shot) |")
    print("|---|---|---|---|---|---|")
    for task, row in table.items():
        f = lambda r: f"{r['dice']:.3f}" if r.get("dice") is not None else r.get("error", "-")  # noqa: E731
        print(f"| {task} | {row['affine'].get('n', '-')} | {row['affine'].get('dice_initial') or 0:.3f} | "
              f"{f(row['affine'])} | {f(row.get('foundation', {}))} | {f(row.get('promptreg', {}))} |")


if __name__ == "__main__":
    main()
