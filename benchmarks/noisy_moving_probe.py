"""A noisy moving image against a clean fixed image, with a known answer: how far each method's mapping is off.

The fixed image is the bundled example brain (``examples/fixed_T1w.nii.gz``), smoothed (sigma 1 mm) and resampled
to ``--spacing`` mm. The moving image is the same brain moved by a known rigid transform (20 deg about z through
the image centre, then (10, -15, 5) mm), on a grid padded by 6 voxels, with Gaussian noise of sd ``--noise`` (the
image spans 0-250) added. The correct registration maps a fixed point x to R(x), so the mapping error of a
result T is |T(x) - R(x)| over the fixed image's labelled voxels (every other one); Dice is over the label maps
(moved the same way, nearest neighbour).

A rigid truth is a strict test of a deformable method: every millimetre of the deformable part is error, so this
measures how much deformation the noise induces, not how well anatomy is matched between subjects.

    .venv/bin/python benchmarks/noisy_moving_probe.py '{"ca": {"method": "convexadam"}, "sc": {"method": "samconvex"},
        "sc_pyr": {"method": "samconvex", "samconvex": {"io_iterations": 0, "refine_iterations": 0}}}' --noise 0,20,40
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from regcli.config import build_config  # noqa: E402
from regcli.io.images import read_image, read_labels  # noqa: E402
from regcli.pipeline import register_images  # noqa: E402
from regcli.reports.metrics import dice_per_label  # noqa: E402
from regcli.resample import warp  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
ROTATION_DEG = (0.0, 0.0, 20.0)
TRANSLATION_MM = (10.0, -15.0, 5.0)


def on_grid(img: sitk.Image, labels: sitk.Image, spacing: float) -> tuple[sitk.Image, sitk.Image]:
    """The image (smoothed, sigma 1 mm, linear) and labels (nearest) on a grid of ``spacing`` mm over the same extent."""
    size = [int(round(s * sp / spacing)) for s, sp in zip(img.GetSize(), img.GetSpacing())]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing] * 3)
    ref.SetDirection(img.GetDirection())
    corner = np.array(img.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    ref.SetOrigin(tuple(corner + np.array(img.GetDirection()).reshape(3, 3) @ np.full(3, spacing / 2)))
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), 1.0)
    return (sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, 0.0),
            sitk.Resample(labels, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()))


def moved(fixed: sitk.Image, labels: sitk.Image, noise: float, seed: int = 0):
    """The moving image and labels (the fixed ones under the known rigid motion, noise added) and that motion."""
    size = np.array(fixed.GetSize())
    centre = fixed.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))
    truth = sitk.Euler3DTransform()
    truth.SetCenter(centre)
    truth.SetRotation(*np.deg2rad(ROTATION_DEG))
    truth.SetTranslation(TRANSLATION_MM)
    ref = sitk.ConstantPad(fixed, [6] * 3, [6] * 3, 0.0)
    inv = truth.GetInverse()
    img = sitk.Resample(fixed, ref, inv, sitk.sitkLinear, 0.0)
    lab = sitk.Resample(labels, ref, inv, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    if noise > 0:
        arr = sitk.GetArrayFromImage(img)
        arr = arr + np.random.default_rng(seed).normal(0.0, noise, arr.shape).astype(np.float32)
        noisy = sitk.GetImageFromArray(arr.astype(np.float32))
        noisy.CopyInformation(img)
        img = noisy
    return img, lab, truth


def load(img: sitk.Image, path: str):
    """``img`` through regcli's reader (written to ``path`` first): labels when ``path`` says so."""
    sitk.WriteImage(img, path)
    return read_labels(path) if "labels" in os.path.basename(path) else read_image(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", help='JSON: {"name": {config overrides}, ...}')
    ap.add_argument("--noise", default="20", help="comma-separated noise sd values (image range 0-250)")
    ap.add_argument("--spacing", type=float, default=3.0, help="grid of both images (mm)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fixed_s, flab_s = on_grid(sitk.ReadImage(os.path.join(EXAMPLES, "fixed_T1w.nii.gz")),
                              sitk.ReadImage(os.path.join(EXAMPLES, "fixed_labels.nii.gz")), args.spacing)
    tmp = tempfile.mkdtemp(prefix="noisy_probe_")
    fixed, flab = (load(x, os.path.join(tmp, n)) for x, n in ((fixed_s, "fixed.nii.gz"), (flab_s, "fixed_labels.nii.gz")))
    idx = np.argwhere(sitk.GetArrayFromImage(flab_s).transpose(2, 1, 0) > 0)[::2]
    pts = np.array([fixed_s.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])
    print(f"{'variant':16s} {'noise':>5s} {'mean mm':>8s} {'p95 mm':>7s} {'max mm':>7s} {'Dice':>7s} {'s':>6s}", flush=True)
    for sd in (float(v) for v in args.noise.split(",")):
        mv_s, mlab_s, truth = moved(fixed_s, flab_s, sd)
        moving, mlab = (load(x, os.path.join(tmp, n)) for x, n in ((mv_s, "moving.nii.gz"), (mlab_s, "moving_labels.nii.gz")))
        want = np.array([truth.TransformPoint(tuple(p)) for p in pts])
        for name, over in json.loads(args.variants).items():
            cfg = build_config(None, dict(over, html_report=False))
            t = time.perf_counter()
            reg = register_images(fixed, moving, cfg)
            secs = time.perf_counter() - t
            got = reg.transform.map_points(torch.from_numpy(pts)).numpy()
            err = np.linalg.norm(got - want, axis=1)
            d = dice_per_label(flab, warp(mlab, reg.transform, fixed.grid, "nearest"))
            print(f"{name:16s} {sd:5.0f} {err.mean():8.2f} {np.percentile(err, 95):7.2f} {err.max():7.1f} "
                  f"{sum(d.values()) / len(d):7.4f} {secs:6.1f}", flush=True)


if __name__ == "__main__":
    main()
