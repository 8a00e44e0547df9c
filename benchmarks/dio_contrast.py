"""Cross-contrast registration of held-out synthseg subjects: what the DIO training adds to its MIND-SSC start.

The shipped DIO network learns a correction to MIND-SSC (``net.mind_residual``), so the same network with its
heads at zero ("untrained") gives MIND-SSC features exactly. Half of its training pairs are rendered from their
label maps with a random intensity per label (``regcli.training.dio.synth_contrast``, SynthMorph-style). This
script renders the *moving* image of each pair that way (``--mode moving``: T1w fixed, synthetic moving; ``both``:
both synthetic, independently; ``none``: the T1w images), seeded per pair, on the subject's own 1 mm grid, and
registers it with:

* ``dio``: the shipped network (``weights/dio-features``; ``--weights SPEC`` for another one);
* ``dio-untrained``: the same architecture with zero heads, i.e. MIND-SSC, the training's starting point;
* ``convexadam``: regcli's ConvexAdam (MIND-SSC, discrete stage, IO).

Every variant uses the MI affine stage (LNCC assumes one contrast). Dice is scored on the 1 mm label maps, the
mean over the fixed image's labels.

  python benchmarks/dio_contrast.py "11,12;13,14;15,16;17,18;19,20" [--mode moving|both|none] [--variants dio,...]
      [--weights SPEC]
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from regcli.config import build_config  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.pipeline import register_images  # noqa: E402
from regcli.reports.metrics import dice_mean  # noqa: E402
from regcli.resample import warp  # noqa: E402
from regcli.spaces.image import Image  # noqa: E402
from regcli.training.dio import synth_contrast  # noqa: E402

D = "/work/shared/data/synthseg_brain"
VARIANTS = ("dio", "dio-untrained", "convexadam")


def untrained_folder(folder: str) -> str:
    """The shipped DIO architecture with its heads at zero (MIND-SSC features), as a model folder."""
    from regcli.methods.dio import _load
    from regcli.models.dio import DioFeatureNet, save_dio_model

    shipped = _load("dio-features")[0]
    torch.manual_seed(0)
    net = DioFeatureNet(shipped.cfg)
    if not net.cfg.mind_residual or any(float(h.weight.detach().abs().sum()) != 0.0 for h in net.heads.values()):
        raise RuntimeError("expected a mind_residual network whose heads start at zero")
    return str(save_dio_model(net, folder, "# untrained DIO network (MIND-SSC features)\n", overwrite=True))


def main() -> None:
    pairs = [tuple(map(int, p.split(","))) for p in sys.argv[1].split(";")]
    mode = sys.argv[sys.argv.index("--mode") + 1] if "--mode" in sys.argv else "moving"
    variants = sys.argv[sys.argv.index("--variants") + 1].split(",") if "--variants" in sys.argv else VARIANTS
    weights = sys.argv[sys.argv.index("--weights") + 1] if "--weights" in sys.argv else "dio-features"
    tmp = tempfile.mkdtemp(prefix="dio_contrast_")
    overrides = {
        "dio": {"method": "dio", "dio": {"weights": weights}},
        "dio-untrained": {"method": "dio", "dio": {"weights": untrained_folder(os.path.join(tmp, "untrained"))}},
        "convexadam": {"method": "convexadam"},
    }
    rows = []
    for k, (f, m) in enumerate(pairs):
        fx, mv = read_image(f"{D}/sub-{f:02d}_T1w.nii.gz"), read_image(f"{D}/sub-{m:02d}_T1w.nii.gz")
        fl, ml = read_labels(f"{D}/sub-{f:02d}_labels.nii.gz"), read_labels(f"{D}/sub-{m:02d}_labels.nii.gz")
        gen = torch.Generator().manual_seed(1000 + k)
        if mode in ("moving", "both"):
            mv = Image(synth_contrast(ml.data.to(torch.int64), gen), ml.grid, "synthetic moving")
        if mode == "both":
            fx = Image(synth_contrast(fl.data.to(torch.int64), gen), fl.grid, "synthetic fixed")
        ids = [int(v) for v in torch.unique(fl.data) if v != 0]
        for v in variants:
            cfg = build_config(None, {**overrides[v], "html_report": False, "affine": {"metric": "mi"}})
            t = time.perf_counter()
            reg = register_images(fx, mv, cfg)
            secs = time.perf_counter() - t
            d = dice_mean(fl, warp(ml, reg.transform, fx.grid, "nearest"), ids)
            rows.append({"pair": f"{f},{m}", "variant": v, "dice": d, "seconds": secs})
            print(f"{f:>2}<-{m:<2} {v:>14}  Dice {d:.4f}  {secs:5.1f} s", flush=True)
    print(f"\nmean over {len(pairs)} pair(s), contrast mode '{mode}'")
    print(f"{'variant':>14} {'Dice':>7} {'sd':>6} {'s':>6}")
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        dv = [r["dice"] for r in rs]
        print(f"{v:>14} {np.mean(dv):>7.4f} {np.std(dv):>6.3f} {np.mean([r['seconds'] for r in rs]):>6.1f}")


if __name__ == "__main__":
    main()
