"""What the synthseg tuning scripts share: a pair's images and label maps, and the mean Dice of a configuration on a
list of pairs (over the labels both maps hold, as ``regcli evaluate`` scores them), with the seconds per
registration. Used by tune_convexadam.py, samconvex_start_probe.py and contrast_channel_probe.py (run them from the
repository root: ``python benchmarks/NAME.py``, which puts this folder on the import path)."""

from __future__ import annotations

import time
from typing import Callable

from regcli.io.images import read_image, read_labels
from regcli.pipeline import register_images
from regcli.reports.metrics import dice_per_label
from regcli.resample import warp

D = "/work/shared/data/synthseg_brain"


def read_pair(f: int, m: int) -> list:
    """[fixed T1w, moving T1w, fixed labels, moving labels] of sub-f <- sub-m."""
    return [read_image(f"{D}/sub-{f:02d}_T1w.nii.gz"), read_image(f"{D}/sub-{m:02d}_T1w.nii.gz"),
            read_labels(f"{D}/sub-{f:02d}_labels.nii.gz"), read_labels(f"{D}/sub-{m:02d}_labels.nii.gz")]


def score(cfg, pairs, cache: dict, load: Callable[[int, int], list] = read_pair) -> tuple[list[float], list[float]]:
    """Register each pair (fixed, moving) of ``pairs`` with ``cfg`` in memory: its mean Dice and seconds, per pair.
    ``cache`` keeps what ``load`` read for a pair across calls (one configuration after another)."""
    dice, secs = [], []
    for f, m in pairs:
        if (f, m) not in cache:
            cache[(f, m)] = load(f, m)
        fx, mv, fl, ml = cache[(f, m)]
        t = time.perf_counter()
        reg = register_images(fx, mv, cfg)
        secs.append(time.perf_counter() - t)
        d = dice_per_label(fl, warp(ml, reg.transform, fx.grid, "nearest"))
        dice.append(sum(d.values()) / len(d))
    return dice, secs
