"""ConvexAdam vs SAMConvex (or any config variants) on two small shared data sets: Dice, folding and time.

* **CT** (``totalsegmentator_ct``: one abdominal CT, 122x101x30 at 3 mm, 41 TotalSegmentator labels). There is
  one subject only, so ``--ct-pairs`` synthetic pairs are made, each seeded (``--seed`` + pair index):
  the moving image is the CT pulled back through a known transform ``T(x) = R(x + u(x))`` (a regcli
  ``CompositeTransform([DisplacementField, AffineTransform])``, warped with ``regcli.resample.warp``, so
  physical space is respected): ``u`` is the sum of three unit-RMS Gaussian-smoothed white-noise fields
  (sigma 12, 20, 30 mm) scaled to a peak of 8-15 mm (scaled down until ``det J > 0.2`` everywhere);
  ``R`` is a rotation of 2-5 degrees about a random axis through the image centre plus a 5-10 mm shift.
  Intensities get a +-5% gain, +-20 HU offset and Gaussian noise of 25 HU; labels go through the same
  transform (nearest neighbour). Fixed = the original CT. Score: mean Dice over the labels with at least
  ``--min-voxels`` voxels in the fixed map. ``--ct-mask-hu V`` gives every variant the fixed mask CT > V
  (-500: the body), as a user passes a body mask with ``regcli register --fixed-mask``.
* **Prostate** (``deepreg_prostate_mrus``: 10 intra-patient MR-US pairs, headers say 0.4 mm, field of view
  18-26 mm). Scores: gland Dice (main), Dice of the landmark labels (1, 2 where present; cases 2, 5, 6
  have none) and their centroid distance (mm, world). The default 2 mm working grid would hold 9-13 voxels
  across the field of view, so ``--prostate-spacing`` (default 0.8 mm) is set as ``working_spacing_mm`` on top of
  every variant for this data set (0 keeps the variant's own value).

Every variant runs with ``html_report: false, inverse_warp: false`` (the inverse field is not scored; the
seconds are ``register_images`` alone) and ``threads: --threads`` unless its overrides say otherwise. % det
J <= 0 is over the fixed grid, for the whole transform (``det J(u) * det(affine)``, as ``regcli register``
reports it). Dice "before" is the identity transform in world space; before and after are averaged over
the pairs that did not fail. A failing pair (``RegcliError`` or any other exception) is counted, and its
message printed under the table.

    .venv/bin/python benchmarks/samconvex_ct_prostate.py \\
        '{"convexadam": {}, "samconvex": {"method": "samconvex",
                         "samconvex": {"weights": "results/embedding_v1_step3500"}}}' \\
        --datasets ct,prostate --ct-pairs 3 --prostate-cases 0-9 --threads 2 --json results/samconvex_ct_prostate.json
"""

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from regcli.config import build_config, deep_merge  # noqa: E402
from regcli.errors import RegcliError  # noqa: E402
from regcli.features.intensity import gaussian_smooth  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.pipeline import register_images  # noqa: E402
from regcli.reports.jacobian import jacobian_determinant, jacobian_stats  # noqa: E402
from regcli.reports.metrics import dice_per_label  # noqa: E402
from regcli.resample import warp  # noqa: E402
from regcli.transforms import AffineTransform, CompositeTransform, DisplacementField  # noqa: E402

D = os.environ.get("REGCLI_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def smooth_field(grid, rng, peak_mm):
    """Sum of unit-RMS smoothed noise fields (sigma 12/20/30 mm): (3, Z, Y, X) float32 LPS mm, peak |u| = peak_mm."""
    u = torch.zeros((3, *grid.shape), dtype=torch.float32)
    for sigma in (12.0, 20.0, 30.0):
        f = gaussian_smooth(torch.from_numpy(rng.standard_normal((3, *grid.shape)).astype(np.float32)),
                            [sigma / s for s in grid.spacing])
        u += f / f.pow(2).mean().sqrt()
    return u * (peak_mm / float(u.norm(dim=0).max()))


def synthetic_ct_pair(ct, labels, k, seed):
    """Moving image/labels = CT pulled back through a known seeded ``R(x + u(x))``; returns (moving, labels, info)."""
    rng = np.random.default_rng(seed + k)
    peak = rng.uniform(8.0, 15.0)
    u = smooth_field(ct.grid, rng, peak)
    while float(jacobian_determinant(DisplacementField(u, ct.grid)).min()) < 0.2:
        u, peak = u * 0.8, peak * 0.8
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(2.0, 5.0))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K  # Rodrigues
    d = rng.standard_normal(3)
    shift = rng.uniform(5.0, 10.0) * d / np.linalg.norm(d)
    rigid = AffineTransform.from_linear(R, shift, ct.grid.center_world())
    T = CompositeTransform([DisplacementField(u, ct.grid), rigid])  # fixed point x -> R(x + u(x))
    air = float(ct.data.min())
    mv = warp(ct, T, ct.grid, "linear", default=air)
    gain, offset = rng.uniform(0.95, 1.05), rng.uniform(-20.0, 20.0)
    noise = torch.from_numpy(rng.normal(0.0, 25.0, ct.grid.shape).astype(np.float32))
    mv = mv.with_data(mv.data * gain + offset + noise)
    info = {"peak_disp_mm": round(peak, 2), "rotation_deg": round(math.degrees(angle), 2),
            "shift_mm": round(float(np.linalg.norm(shift)), 2), "gain": round(gain, 3), "offset_hu": round(offset, 1),
            "min_detj": round(float(jacobian_determinant(DisplacementField(u, ct.grid)).min()), 3)}
    return mv, warp(labels, T, ct.grid, "nearest"), info


def ct_pairs(a):
    ct = read_image(f"{D}/totalsegmentator_ct/ct_image.nii.gz", "CT image")
    lab = read_labels(f"{D}/totalsegmentator_ct/ct_labels_total.nii.gz", "CT labels")
    u, n = torch.unique(lab.data, return_counts=True)
    keep = [int(v) for v, c in zip(u.tolist(), n.tolist()) if v != 0 and c >= a.min_voxels]
    pairs = []
    for k in range(a.ct_pairs):
        mv, ml, info = synthetic_ct_pair(ct, lab, k, a.seed)
        pair = {"name": f"synthetic{k}", "fixed": ct, "moving": mv, "info": info, "sets": {"organs": (lab, ml, keep)}}
        if a.ct_mask_hu is not None:  # a body mask on the fixed CT, as a user passes with --fixed-mask
            pair["fixed_mask"] = ct.with_data((ct.data > a.ct_mask_hu).to(torch.float32))
        pairs.append(pair)
    caption = (f"CT: {a.ct_pairs} synthetic pairs (seed {a.seed}) of the one TotalSegmentator CT (3 mm); "
               f"mean Dice over the {len(keep)} labels with >= {a.min_voxels} voxels; working spacing as in the "
               "variant (default 2 mm, finer than the 3 mm image)"
               + ("" if a.ct_mask_hu is None else f"; fixed mask: CT > {a.ct_mask_hu:g} HU"))
    return pairs, caption


def prostate_pairs(a):
    lo, _, hi = a.prostate_cases.partition("-")
    pairs, P = [], f"{D}/deepreg_prostate_mrus"
    for c in range(int(lo), int(hi or lo) + 1):
        img = {r: read_image(f"{P}/case{c:03d}_{r}_image.nii.gz", f"{r} image") for r in ("fixed", "moving")}
        sets = {}
        for key in ("gland", "landmarks"):
            fl, ml = (read_labels(f"{P}/case{c:03d}_{r}_{key}.nii.gz", f"{r} {key}") for r in ("fixed", "moving"))
            labs = sorted((set(torch.unique(fl.data).tolist()) & set(torch.unique(ml.data).tolist())) - {0})
            if labs:
                sets[key] = (fl, ml, labs)
        pairs.append({"name": f"case{c:03d}", "fixed": img["fixed"], "moving": img["moving"], "info": {}, "sets": sets})
    sp = f"working_spacing_mm = {a.prostate_spacing:g} mm for every variant" if a.prostate_spacing > 0 else \
        "the variants' own working spacing"
    return pairs, (f"Prostate MR-US: cases {a.prostate_cases} (headers 0.4 mm); {sp}; landmark columns over the "
                   "cases that have landmarks")


def centroid_mm(labels, lab, world):
    """World centroid (3,) mm of one label, NaN if absent; ``world`` = labels.grid.world_coords() (Z,Y,X,3)."""
    m = labels.data == lab
    return world[m].mean(0).numpy() if bool(m.any()) else np.full(3, np.nan)


def score_sets(pair, transform):
    """{set: {"dice": mean Dice, "centroid_mm": mean centroid distance over the labels still present, "lost": count}}
    for the moving labels warped by ``transform`` onto the fixed grid."""
    grid = pair["fixed"].grid
    world = grid.world_coords()
    out = {}
    for key, (fl, ml, labs) in pair["sets"].items():
        wl = warp(ml, transform, grid, "nearest")
        dist = [float(np.linalg.norm(centroid_mm(fl, lab, world) - centroid_mm(wl, lab, world))) for lab in labs]
        out[key] = {"dice": float(np.nanmean(list(dice_per_label(fl, wl, labs).values()))),
                    "centroid_mm": float(np.nanmean(dist)) if not all(map(math.isnan, dist)) else float("nan"),
                    "lost": int(sum(map(math.isnan, dist)))}  # labels absent after warping (no centroid)
    return out


def run_pair(pair, cfg):
    t = time.perf_counter()
    try:
        reg = register_images(pair["fixed"], pair["moving"], cfg, fixed_mask=pair.get("fixed_mask"))
    except RegcliError as e:
        return {"pair": pair["name"], "failed": e.one_line()}
    except Exception as e:  # noqa: BLE001 - a crash in one pair must not lose the other results
        return {"pair": pair["name"], "failed": f"crash {type(e).__name__}: {e}"}
    sec = time.perf_counter() - t
    det_a = float(np.linalg.det(reg.affine.linear))  # linear methods (no field): det J = det A everywhere
    pct = jacobian_stats(jacobian_determinant(reg.field) * det_a)["pct_nonpos_jac"] if reg.field is not None \
        else 100.0 * (det_a <= 0)
    return {"pair": pair["name"], "seconds": sec, "pct_nonpos_jac": pct,
            "before": score_sets(pair, None), "after": score_sets(pair, reg.transform)}


def fmt(values, spec=".3f"):
    v = [x for x in values if not math.isnan(x)]
    return format(statistics.fmean(v), spec) if v else "-"


def table(caption, rows, main):
    print(f"\n**{caption}**\n")
    cols = ["variant", "pairs ok", f"{main} Dice before", f"{main} Dice after", "sd", "% detJ<=0 mean", "max",
            "s/pair (median)"]
    extra = main == "gland"
    if extra:
        cols[5:5] = ["landmark Dice before → after", "landmark centroid mm before → after"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name, recs in rows.items():
        ok = [r for r in recs if "failed" not in r]
        get = lambda when, key="dice", s=main: [r[when][s][key] if s in r[when] else math.nan for r in ok]  # noqa: E731
        after = [x for x in get("after") if not math.isnan(x)]
        cells = [name, f"{len(ok)}/{len(recs)}", fmt(get("before")), fmt(after),
                 f"{statistics.stdev(after):.3f}" if len(after) > 1 else "-",
                 fmt([r["pct_nonpos_jac"] for r in ok], ".3f"),
                 f"{max(r['pct_nonpos_jac'] for r in ok):.3f}" if ok else "-",
                 f"{statistics.median(r['seconds'] for r in ok):.1f}" if ok else "-"]
        if extra:
            cells[5:5] = [f"{fmt(get('before', s='landmarks'))} → {fmt(get('after', s='landmarks'))}",
                          f"{fmt(get('before', 'centroid_mm', 'landmarks'), '.2f')} → "
                          f"{fmt(get('after', 'centroid_mm', 'landmarks'), '.2f')}"
                          f" ({sum(x for x in get('after', 'lost', 'landmarks') if not math.isnan(x)):g} lost)"]
        print("| " + " | ".join(cells) + " |")
    for name, recs in rows.items():
        for r in recs:
            if "failed" in r:
                print(f"- {name} failed on {r['pair']}: {r['failed']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", help='JSON {name: config overrides}, e.g. \'{"convexadam": {}}\'')
    ap.add_argument("--datasets", default="ct,prostate")
    ap.add_argument("--ct-pairs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-voxels", type=int, default=200, help="CT: score labels with at least this many voxels")
    ap.add_argument("--ct-mask-hu", type=float, default=None,
                    help="CT: pass the fixed mask CT > this value (e.g. -500: the body) to every variant")
    ap.add_argument("--prostate-cases", default="0-9")
    ap.add_argument("--prostate-spacing", type=float, default=0.8,
                    help="working_spacing_mm for prostate (0: keep the variant's)")
    ap.add_argument("--prostate-set", default="{}",
                    help='JSON overrides for every variant on prostate, e.g. \'{"affine": {"metric": "mi"}}\' (MR-US)')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    variants = json.loads(a.variants)
    base = {"html_report": False, "inverse_warp": False, "threads": a.threads}
    out = {"args": vars(a), "datasets": {}}
    for ds in a.datasets.split(","):
        pairs, caption = {"ct": ct_pairs, "prostate": prostate_pairs}[ds](a)
        extra = {}
        if ds == "prostate":
            extra = json.loads(a.prostate_set)
            if a.prostate_spacing > 0:
                extra["working_spacing_mm"] = a.prostate_spacing
        rows = {}
        for name, over in variants.items():
            cfg = build_config(None, deep_merge(deep_merge(base, over), extra))
            rows[name] = []
            for p in pairs:
                rows[name].append(run_pair(p, cfg))
                r = rows[name][-1]
                print(f"  [{ds}] {name} {p['name']}: " + (r["failed"] if "failed" in r else
                      f"{r['seconds']:.1f} s, " + ", ".join(f"{k} {r['before'][k]['dice']:.3f}->{v['dice']:.3f}"
                                                            for k, v in r["after"].items())), flush=True)
        table(caption, rows, "organs" if ds == "ct" else "gland")
        out["datasets"][ds] = {"caption": caption, "pairs": {p["name"]: p["info"] for p in pairs},
                               "variants": {n: {"overrides": variants[n], "results": r} for n, r in rows.items()}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
