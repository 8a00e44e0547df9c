"""Does a better start change where the MIND-SSC instance optimisation ends? (s20 probe, issue 3)

SAMConvex's learned correlation pyramid, then exactly ConvexAdam's instance optimisation (MIND-SSC pooled to the
4 mm IO grid, ``instance.iterations`` or ``_io`` Adam steps) and its 2 mm refinement, instead of SAMConvex's
feature-space IO. The only difference from ``--method convexadam`` is then the discrete stage: any Dice gain is
the learned pyramid's. Mean Dice over the labels both maps hold, as tune_convexadam.py.

  python benchmarks/samconvex_start_probe.py '{"ca": {"method": "convexadam"}, "hybrid": {"method": "samconvex",
      "_hybrid": true}, "hybrid40": {"method": "samconvex", "_hybrid": true, "_io": 40}}' "2,5;8,11;14,17"
"""

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

import regcli.methods.convexadam as C
import regcli.methods.samconvex as S
from regcli.config import build_config
from regcli.features.mind import mind_ssc_pair
from synthseg_pairs import score
ORIGINAL = S.samconvex
MODE = {"hybrid": False, "io": 80}


def hybrid(fixed, moving, cfg, fixed_mask=None, moving_mask=None, progress=None, device=None, prompts=()):
    """SAMConvex's pyramid only, then ConvexAdam's IO and refinement from its field (no masks or prompts)."""
    if not MODE["hybrid"]:
        return ORIGINAL(fixed, moving, cfg, fixed_mask, moving_mask, progress, device, prompts)
    pyramid_only = cfg.model_copy(update={"samconvex": cfg.samconvex.model_copy(
        update={"io_iterations": 0, "refine_iterations": 0})})
    res = ORIGINAL(fixed, moving, pyramid_only, None, None, progress, device)
    grid, icfg, ccfg = fixed.grid, cfg.instance, cfg.convex
    fdata, mdata = C._scalar(fixed, "fixed"), C._scalar(moving, "moving")
    with torch.no_grad():
        feat_f, feat_m, _ = mind_ssc_pair(fdata, mdata, ccfg.mind_radius, ccfg.mind_dilation)
    quiet = lambda *a: None  # noqa: E731
    disp, io_grid, _ = C._instance_level(feat_f, feat_m, grid, icfg.grid_sp_adam, res.field.disp, grid, None, None,
                                         icfg, MODE["io"], icfg.learning_rate, "io", quiet, fdata.device,
                                         icfg.gradient_floor)
    disp, _ = C.refine_on_working_grid(fdata, mdata, grid, disp, io_grid, None, None, cfg, icfg.refine_iterations,
                                       quiet, fdata.device)
    return C.DeformableResult(C.DisplacementField(disp.contiguous(), grid), {}, res.timings)


def main() -> None:
    S.samconvex = hybrid  # the registry imports the function by name at each call
    torch.set_num_threads(2)
    variants = json.loads(sys.argv[1])
    pairs = [tuple(map(int, p.split(","))) for p in (sys.argv[2] if len(sys.argv) > 2 else "2,5;8,11;14,17").split(";")]
    cache = {}
    for name, over in variants.items():
        over = dict(over)
        MODE["hybrid"], MODE["io"] = bool(over.pop("_hybrid", False)), int(over.pop("_io", 80))
        dice, secs = score(build_config(None, dict(over, html_report=False)), pairs, cache)
        print(f"{name:12s} " + " ".join(f"{x:.4f}" for x in dice)
              + f"  mean {sum(dice) / len(dice):.4f}  s {sum(secs) / len(secs):.1f}", flush=True)


if __name__ == "__main__":
    main()
