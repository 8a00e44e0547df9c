"""Anisotropy robustness (issue 5): the moving image resampled to 1 x 1 x 3 mm, the same solver on learned
features (dio) and on intensities (dio.features: intensity). Dice is scored with the original 1 mm moving label
map warped by each result, so only the image's resolution changes.

  python benchmarks/dio_anisotropy.py "11,12;13,14;15,16" [--config extra.yaml]
"""

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import SimpleITK as sitk
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from regcli.config import build_config, deep_merge, load_yaml  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.pipeline import register_images  # noqa: E402
from regcli.reports.metrics import dice_per_label  # noqa: E402
from regcli.resample import warp  # noqa: E402
from regcli.spaces.grid import Grid  # noqa: E402
from regcli.spaces.image import Image  # noqa: E402

D = "/work/shared/data/synthseg_brain"


def thick_slices(image: Image, spacing=(1.0, 1.0, 3.0)) -> Image:
    """The image on a grid of the given (x, y, z) spacing over the same field of view: Gaussian anti-aliasing
    along each axis (sigma = half the new spacing where it grows), then linear resampling (SimpleITK)."""
    img = image.to_sitk()
    sig = [0.5 * t if t > s else 0.0 for s, t in zip(img.GetSpacing(), spacing)]
    if max(sig) > 0:
        img = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-3) for s in sig])
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), spacing, img.GetDirection(),
                        0.0, sitk.sitkFloat32)
    return Image(torch.from_numpy(sitk.GetArrayFromImage(out)), Grid.from_sitk(out), image.name + " (1x1x3)")


def main() -> None:
    pairs = [tuple(map(int, p.split(","))) for p in sys.argv[1].split(";")]
    extra = load_yaml(sys.argv[sys.argv.index("--config") + 1]) if "--config" in sys.argv else {}
    variants = {"dio (features)": {}, "dio (intensity)": {"dio": {"features": "intensity"}}}
    rows = []
    for f, m in pairs:
        fx, mv = read_image(f"{D}/sub-{f:02d}_T1w.nii.gz"), read_image(f"{D}/sub-{m:02d}_T1w.nii.gz")
        fl, ml = read_labels(f"{D}/sub-{f:02d}_labels.nii.gz"), read_labels(f"{D}/sub-{m:02d}_labels.nii.gz")
        mv_thick = thick_slices(mv)
        for name, over in variants.items():
            cfg = build_config(None, deep_merge(deep_merge({"method": "dio", "html_report": False}, extra), over))
            out = {"pair": f"{f},{m}", "variant": name}
            for kind, moving in (("iso", mv), ("1x1x3", mv_thick)):
                t = time.perf_counter()
                reg = register_images(fx, moving, cfg)
                d = dice_per_label(fl, warp(ml, reg.transform, fx.grid, "nearest"))
                out[kind] = float(np.nanmean(list(d.values())))
                out[kind + "_s"] = time.perf_counter() - t
            rows.append(out)
            print(f"{out['pair']:>6} {name:>16}  Dice iso {out['iso']:.4f}  1x1x3 {out['1x1x3']:.4f}  "
                  f"drop {out['iso'] - out['1x1x3']:+.4f}", flush=True)
    print(f"\nmean over {len(pairs)} pair(s)")
    print(f"{'variant':>16} {'Dice iso':>9} {'Dice 1x1x3':>11} {'drop':>8}")
    for name in variants:
        rs = [r for r in rows if r["variant"] == name]
        a, b = np.mean([r["iso"] for r in rs]), np.mean([r["1x1x3"] for r in rs])
        print(f"{name:>16} {a:>9.4f} {b:>11.4f} {a - b:>+8.4f}")
    if "--json" in sys.argv:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
