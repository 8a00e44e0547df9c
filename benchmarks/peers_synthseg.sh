#!/usr/bin/env bash
# Peer baselines for docs/benchmarks.md: ANTs SyNQuick and ConvexAdam (after an ANTs affine) on the 10
# synthseg_brain pairs (pairs.csv) and on the neurite subjA/subjB pair, scored by the shared harness
# (../shared/bench/run_peers.py: Dice, HD95, det J, SDlogJ, seconds, peak RSS), one job at a time.
#
#   bash benchmarks/peers_synthseg.sh                 # everything (about 1.5 h on 2 idle cores)
#   PAIRS="1 2" METHODS=ants_synquick bash benchmarks/peers_synthseg.sh
#   SPACING=2 bash benchmarks/peers_synthseg.sh       # on prep_pair.py --spacing 2 copies instead of 1 mm
#   SUMMARY_ONLY=1 bash benchmarks/peers_synthseg.sh  # only rebuild results/peers/summary.{md,json}
#
# Environment: SHARED (default ../shared beside the repo), PEERS_PY (the peers venv python, made by
# ../shared/bench/setup-peers.sh; default ~/.cache/regcli-peers/bin/python), OUT (default results/peers),
# THREADS (2), METHODS ("ants_synquick convexadam_antsaffine"), PAIRS ("all" or 1-based rows of pairs.csv),
# NEURITE (1 = also the neurite pair), RESUME (1 = skip jobs whose results.json already says ok).
# While $OUT/PAUSE exists, the script waits before starting its next job.
# Results: $OUT/<fixed>_<moving>/{results.json,results.md,<method>/...}, $OUT/summary.{md,json}.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
SHARED=${SHARED:-$ROOT/../shared}
PY=${PEERS_PY:-$HOME/.cache/regcli-peers/bin/python}
BENCH=$SHARED/bench
DATA=$SHARED/data/synthseg_brain
NEURITE_DIR=$SHARED/data/neurite_brain_aseg
OUT=${OUT:-$ROOT/results/peers}
THREADS=${THREADS:-2}
METHODS=${METHODS:-ants_synquick convexadam_antsaffine}
SPACING=${SPACING:-1}
PAIRS=${PAIRS:-all}
NEURITE=${NEURITE:-1}
RESUME=${RESUME:-1}
SUMMARY_ONLY=${SUMMARY_ONLY:-0}

[[ -x $PY ]] || { echo "peers python not found: $PY (run $BENCH/setup-peers.sh)" >&2; exit 2; }
[[ -f $DATA/pairs.csv ]] || { echo "data not found: $DATA/pairs.csv (set SHARED)" >&2; exit 2; }
mkdir -p "$OUT"

job_ok() {  # job_ok DIR METHOD -> 0 when DIR/results.json has METHOD with status ok
    [[ -f $1/results.json ]] && "$PY" - "$1/results.json" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1])).get("methods", {}).get(sys.argv[2], {})
sys.exit(0 if r.get("status") == "ok" else 1)
EOF
}

run_job() {  # run_job METHOD NAME FIXED MOVING FIXED_SEG MOVING_SEG [extra run_peers args...]
    local method=$1 name=$2 f=$3 m=$4 fs=$5 ms=$6
    shift 6
    local dir=$OUT/$name
    mkdir -p "$dir"
    while [[ -e $OUT/PAUSE ]]; do sleep 10; done   # touch $OUT/PAUSE to hold the next job (e.g. while timing something else)
    if [[ $RESUME == 1 ]] && job_ok "$dir" "$method"; then
        echo "[peers] $name $method: done already (RESUME=1), skipped"
        return 0
    fi
    if [[ $SPACING != 1 ]]; then
        local prep=$OUT/_prep${SPACING}mm/$name
        if [[ ! -f $prep/moving_seg.nii.gz ]]; then
            "$PY" "$BENCH/prep_pair.py" --fixed "$f" --moving "$m" --fixed-seg "$fs" --moving-seg "$ms" \
                --spacing "$SPACING" --out "$prep" </dev/null >/dev/null
        fi
        f=$prep/fixed.nii.gz m=$prep/moving.nii.gz fs=$prep/fixed_seg.nii.gz ms=$prep/moving_seg.nii.gz
    fi
    echo "[peers] $(date -u +%FT%TZ) $name $method  before:$(uptime | sed 's/.*load average/ load average/')" \
        | tee -a "$dir/uptime.log"
    local t0=$SECONDS
    "$PY" "$BENCH/run_peers.py" --fixed "$f" --moving "$m" --fixed-seg "$fs" --moving-seg "$ms" \
        --out "$dir" --methods "$method" --threads "$THREADS" --merge "$@" </dev/null >>"$dir/run.log" 2>&1 \
        || echo "[peers] $name $method: run_peers.py exited $?" >&2
    echo "[peers] $(date -u +%FT%TZ) $name $method: $((SECONDS - t0)) s wall (incl. scoring)  after:$(uptime | sed 's/.*load average/ load average/')" \
        | tee -a "$dir/uptime.log"
}

if [[ $SUMMARY_ONLY != 1 ]]; then
    # method by method (all pairs with ANTs SyNQuick first: it gives the headline number soonest)
    for method in $METHODS; do
        row=0
        while IFS=, read -r fi mi fsi msi; do
            [[ $fi == fixed_image ]] && continue
            row=$((row + 1))
            if [[ $PAIRS != all && " $PAIRS " != *" $row "* ]]; then continue; fi
            run_job "$method" "${fi%%_T1w.nii.gz}_${mi%%_T1w.nii.gz}" "$DATA/$fi" "$DATA/$mi" "$DATA/$fsi" "$DATA/$msi"
        done < <(tr -d '\r' < "$DATA/pairs.csv")
        if [[ $NEURITE == 1 && -d $NEURITE_DIR ]]; then
            # voxelmorph's 30 evaluation labels (the harness evaluates exactly this subset with --labels)
            run_job "$method" neurite_subjA_subjB "$NEURITE_DIR/subjA_vxm_image.nii.gz" \
                "$NEURITE_DIR/subjB_l2r_image.nii.gz" "$NEURITE_DIR/subjA_vxm_labels.nii.gz" \
                "$NEURITE_DIR/subjB_l2r_labels.nii.gz" --labels "$NEURITE_DIR/vxm_eval_labels.txt"
        fi
    done
fi

# ------------------------------------------------------------------ summary table (markdown + json)
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
import numpy as np
out = sys.argv[1]
rows, per_method = [], {}
for rj in sorted(glob.glob(os.path.join(out, "*", "results.json"))):
    pair = os.path.basename(os.path.dirname(rj))
    if pair.startswith("_"):   # scratch runs (e.g. _idle_retime) are not part of the table
        continue
    res = json.load(open(rj))
    base = res.get("baseline_identity") or {}
    for m, r in res.get("methods", {}).items():
        mt = r.get("metrics", {})
        row = {"pair": pair, "method": m, "status": r.get("status"),
               "dice_initial": base.get("dice_mean"), "dice": mt.get("dice_mean"), "hd95": mt.get("hd95_mean"),
               "pct_nonpos_jac": mt.get("pct_nonpos_jac"),
               "pct_nonpos_jac_in_mask": (mt.get("jacobian") or {}).get("in_mask", {}).get("pct_nonpos_jac"),
               "sdlogj": mt.get("sdlogj"), "reg_s": r.get("reg_s"), "reg_cpu_s": r.get("reg_cpu_s"),
               "peak_rss_mb": r.get("peak_rss_mb"),
               "load1_before": r.get("loadavg1_before"), "load1_after": r.get("loadavg1_after"),
               "labels": "vxm 30" if pair.startswith("neurite") else "32"}
        rows.append(row)
        if not pair.startswith("neurite") and row["status"] == "ok":
            per_method.setdefault(m, []).append(row)

def f(x, nd=3):
    return "-" if x is None else ("%.*f" % (nd, x))

lines = ["| pair | method | Dice before | mean Dice | HD95 mm | % det J <= 0 | SDlogJ | reg s | CPU s | peak MB | load1 before/after |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append("| %s | %s%s | %s | %s | %s | %s | %s | %s | %s | %s | %s/%s |" % (
        r["pair"], r["method"], "" if r["status"] == "ok" else " (%s)" % r["status"], f(r["dice_initial"]),
        f(r["dice"]), f(r["hd95"], 2), f(r["pct_nonpos_jac"], 4), f(r["sdlogj"], 4), f(r["reg_s"], 1),
        f(r["reg_cpu_s"], 1), f(r["peak_rss_mb"], 0), f(r["load1_before"], 1), f(r["load1_after"], 1)))
summ = {}
lines += ["", "| method (synthseg pairs) | n pairs | Dice before | mean Dice | sd | HD95 mm | % det J <= 0 | SDlogJ | reg s (median) | CPU s (median) | peak MB (max) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
for m, rs in per_method.items():
    g = lambda k: [r[k] for r in rs if r[k] is not None]
    summ[m] = {"n_pairs": len(rs), "dice_mean": float(np.mean(g("dice"))), "dice_sd": float(np.std(g("dice"))),
               "hd95_mean": float(np.mean(g("hd95"))), "pct_nonpos_jac_mean": float(np.mean(g("pct_nonpos_jac"))),
               "sdlogj_mean": float(np.mean(g("sdlogj"))), "reg_s_mean": float(np.mean(g("reg_s"))),
               "reg_s_median": float(np.median(g("reg_s"))), "reg_cpu_s_median": float(np.median(g("reg_cpu_s"))),
               "peak_rss_mb_max": float(np.max(g("peak_rss_mb"))),
               "dice_initial_mean": float(np.mean(g("dice_initial")))}
    s = summ[m]
    lines.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        m, s["n_pairs"], f(s["dice_initial_mean"]), f(s["dice_mean"]), f(s["dice_sd"]), f(s["hd95_mean"], 2),
        f(s["pct_nonpos_jac_mean"], 4), f(s["sdlogj_mean"], 4), f(s["reg_s_median"], 1), f(s["reg_cpu_s_median"], 1),
        f(s["peak_rss_mb_max"], 0)))
txt = "\n".join(lines) + "\n"
open(os.path.join(out, "summary.md"), "w").write(txt)
json.dump({"rows": rows, "synthseg_means": summ}, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(txt)
EOF
