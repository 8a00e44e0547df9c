#!/usr/bin/env python
"""Make the bundled 2 mm example pair (``examples/``) from the 1 mm synthseg_brain subjects.

    python benchmarks/prep_synthseg_2mm.py                      # sub-01 (fixed), sub-02 (moving) -> examples/
    python benchmarks/prep_synthseg_2mm.py --data ../shared/data/synthseg_brain --out examples \
        --fixed sub-01 --moving sub-02 --spacing 2

Only SimpleITK and numpy are used, so the result is reproducible without regcli.

Grid: the new grid keeps the source direction (LIA) and the source field of view: the outer corner of the
first voxel stays where it was, the spacing is exactly ``--spacing`` mm, and the size is
``round(size_1mm * 1 mm / spacing)`` per axis (so an odd 1 mm size gains half a source voxel of field of
view at the far end, which lies in the zero background).

Images (T1w, uint8 0..255): Gaussian anti-aliasing with sigma = 0.5 * spacing mm (1 mm for 2 mm output) along
every axis, then linear interpolation at the new voxel centres, rounded and clipped back to uint8.

Labels (uint8 FreeSurfer ids): label voting. Every label's indicator (background included) is smoothed
with the same Gaussian and sampled linearly at the new voxel centres; each new voxel takes the label with
the largest vote (ties go to the smaller id). This keeps small structures better than nearest neighbour,
whose picks are arbitrary when the new voxel centres fall between source voxels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "synthseg_brain"
DEFAULT_OUT = HERE.parent / "examples"


def target_grid(img: sitk.Image, spacing: float) -> sitk.Image:
    """An empty reference image with the same direction and field of view as ``img`` at ``spacing`` mm.

    Args:
        img: source image (any pixel type); only its geometry (ITK LPS mm) is used.
        spacing: isotropic output spacing in mm.

    Returns:
        sitk.Image of uint8 zeros: size round(size * old_spacing / spacing) per axis (at least 2), spacing
        ``spacing`` mm, origin such that the outer corner of voxel 0 is unchanged, same direction.
    """
    old_sp = np.asarray(img.GetSpacing(), dtype=np.float64)
    new_sp = np.full(3, float(spacing))
    size = np.maximum(np.round(np.asarray(img.GetSize()) * old_sp / new_sp), 2).astype(int)
    D = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    corner = np.asarray(img.GetOrigin(), dtype=np.float64) - D @ (0.5 * old_sp)
    origin = corner + D @ (0.5 * new_sp)
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing(tuple(new_sp))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(img.GetDirection())
    return ref


def downsample_image(img: sitk.Image, ref: sitk.Image, sigma_mm: float) -> sitk.Image:
    """Gaussian anti-aliasing (sigma in mm) then linear resampling onto ``ref``; returns uint8."""
    f = sitk.Cast(img, sitk.sitkFloat32)
    f = sitk.SmoothingRecursiveGaussian(f, sigma_mm)  # sigma in physical units (mm)
    r = sitk.Resample(f, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = np.clip(np.rint(sitk.GetArrayFromImage(r)), 0, 255).astype(np.uint8)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ref)
    return out


def downsample_labels(lab: sitk.Image, ref: sitk.Image, sigma_mm: float) -> sitk.Image:
    """Label voting: per-label smoothed indicator, linear resampling, arg-max; returns uint8."""
    arr = sitk.GetArrayFromImage(lab)
    ids = np.unique(arr)
    best = None
    best_vote = None
    for lab_id in ids:  # ascending, so ties (strict > below) keep the smaller id
        ind = sitk.GetImageFromArray((arr == lab_id).astype(np.float32))
        ind.CopyInformation(lab)
        ind = sitk.SmoothingRecursiveGaussian(ind, sigma_mm)
        vote = sitk.GetArrayFromImage(sitk.Resample(ind, ref, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkFloat32))
        if best is None:
            best = np.full(vote.shape, lab_id, dtype=arr.dtype)
            best_vote = vote
        else:
            win = vote > best_vote
            best[win] = lab_id
            best_vote = np.where(win, vote, best_vote)
    out = sitk.GetImageFromArray(best.astype(np.uint8))
    out.CopyInformation(ref)
    return out


def voxel_sha256(img: sitk.Image) -> str:
    """sha256 of the voxel bytes (independent of gzip timestamps)."""
    return hashlib.sha256(np.ascontiguousarray(sitk.GetArrayFromImage(img)).tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="synthseg_brain folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--fixed", default="sub-01", help="fixed subject (default: %(default)s)")
    p.add_argument("--moving", default="sub-02", help="moving subject (default: %(default)s)")
    p.add_argument("--spacing", type=float, default=2.0, help="output spacing in mm (default: %(default)s)")
    a = p.parse_args(argv)
    if not a.data.is_dir():
        p.error(f"data folder not found: {a.data}")
    a.out.mkdir(parents=True, exist_ok=True)
    sigma = 0.5 * a.spacing
    record = {"source": str(a.data), "spacing_mm": a.spacing, "sigma_mm": sigma, "files": {}}
    for role, sub in (("fixed", a.fixed), ("moving", a.moving)):
        img = sitk.ReadImage(str(a.data / f"{sub}_T1w.nii.gz"))
        lab = sitk.ReadImage(str(a.data / f"{sub}_labels.nii.gz"))
        ref = target_grid(img, a.spacing)
        outs = {f"{role}_T1w.nii.gz": downsample_image(img, ref, sigma),
                f"{role}_labels.nii.gz": downsample_labels(lab, ref, sigma)}
        for name, im in outs.items():
            sitk.WriteImage(im, str(a.out / name), useCompression=True)
            record["files"][name] = {"subject": sub, "size": list(im.GetSize()), "spacing": list(im.GetSpacing()),
                                     "origin": [round(v, 4) for v in im.GetOrigin()],
                                     "voxel_sha256": voxel_sha256(im)}
            print(f"{name}: {sub} size={im.GetSize()} origin={tuple(round(v, 2) for v in im.GetOrigin())}")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
