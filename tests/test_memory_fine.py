"""RELIABILITY P2: the pre-flight memory estimate covers the fine refinement (``--fine-spacing``) on a fine grid
finer than the images.

The fine phase used to be fitted to calibration cases whose fine grid was never finer than the fixed image and
whose moving image was always the same 1 mm brain: the memory live when the stage starts went into the moving
image's coefficient, and the growth per fine voxel was that of zero-background brains. On the 2 mm example pair
with ``--fine-spacing 1`` the estimate was 2.4 GB for a 3.1 GB peak, so ``--max-memory 2.5G`` let it start.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from regcli.config import build_config
from regcli.memory import MB, _model, estimate_peak_memory
from regcli.spaces import Grid

EYE = (1, 0, 0, 0, 1, 0, 0, 0, 1)
DEFORMABLE = [("convexadam", "float32"), ("samconvex", "float32"), ("dio", "float32"), ("foundation", "float32"),
              ("promptreg", "float32"), ("convexadam", "float64"), ("samconvex", "float64")]


def _grid(n: int, mm: float) -> Grid:
    return Grid((n, n, n), (mm,) * 3, (0.0, 0.0, 0.0), EYE)


@pytest.mark.parametrize("method,precision", DEFORMABLE)
def test_every_deformable_method_counts_the_fine_stage_per_fine_voxel(method, precision):
    """Every deformable method runs the fine refinement: its phase must grow with the fine grid's voxels at least
    as fast as the stage's own arrays do, whatever the images' size."""
    def est(fine_mm):
        cfg = build_config(None, {"method": method, "precision": precision,
                                  "instance": {"fine_spacing_mm": fine_mm}})
        return estimate_peak_memory(_grid(48, 2.0), _grid(48, 2.0), cfg)  # 2 mm images: the fine grid is finer

    a, b = est(1.0), est(0.5)
    assert not a.notes and not b.notes, (a.notes, b.notes)
    assert "fine" in a.phases and b.largest == "fine"
    per_voxel = (b.phases["fine"] - a.phases["fine"]) * MB / (b.counts["fine"] - a.counts["fine"])
    itemsize = 8 if precision == "float64" else 4
    # a floor by counting: the two images' MIND-SSC features (2 x 12 channels), the field, its gradient and Adam's
    # two moments (4 x 3), all on the fine grid in the solver's dtype
    assert per_voxel >= 36 * itemsize, per_voxel
    # and what the calibration measured for the stage alone on a phantom textured everywhere
    assert per_voxel >= _model()["fine_stage"][precision]["fine"], per_voxel
    # the memory live when the stage starts does not vanish with small images (it was put on the moving image)
    assert a.phases["fine"] >= a.phases["deformable"]


def _textured(path, n: int, mm: float, seed: int) -> None:
    """Smoothed noise on an n^3 grid: texture everywhere (the solver's support is the whole grid, as in a scan with
    background noise), a shifted copy for the moving image."""
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(np.random.default_rng(0).random((n + 4,) * 3), 1.0)[2:-2, 2:-2, 2:-2]
    if seed:
        a = np.roll(a, 1, axis=0) + 0.02 * np.random.default_rng(seed).random(a.shape)
    img = sitk.GetImageFromArray((255 * a).astype(np.float32))
    img.SetSpacing((mm,) * 3)
    sitk.WriteImage(img, str(path))


def test_estimate_covers_the_measured_peak_of_a_fine_grid_finer_than_the_images(tmp_path):
    """A real run: 2 mm images textured everywhere, a 0.8 mm fine grid (15.6 x their voxels). The run's peak RSS
    (a process of its own) must be within the estimate; the old model estimated about 850 MB here."""
    fixed, moving = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    _textured(fixed, 40, 2.0, 0)
    _textured(moving, 40, 2.0, 1)
    res = subprocess.run([sys.executable, "-m", "regcli", "register", str(fixed), str(moving), "-o",
                          str(tmp_path / "p_"), "--fine-spacing", "0.8", "--no-inverse", "--no-html", "--threads", "1",
                          "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    mem = json.loads(res.stdout)["memory"]
    assert mem["estimate_voxels"]["fine"] == 100 ** 3
    assert mem["estimate_mb"] >= mem["peak_rss_mb"] > 0, mem
    assert mem["estimate_largest_phase"] == "fine"
