"""Registration quality and run reports.

* :mod:`~regcli.reports.metrics`: Dice, HD95, ASSD between label maps (matches ``shared/bench/metrics.py``).
* :mod:`~regcli.reports.jacobian`: det J of displacement fields in physical units, and its statistics.
* :mod:`~regcli.reports.landmarks`: point CSV files (LPS or RAS) and target registration error.
* :mod:`~regcli.reports.report`: ``prefixReport.json`` (versions, device, config, timings, memory, checksums).
* :mod:`~regcli.reports.html`: HTML report with PNG figures (matplotlib imported lazily).

Importing this package is cheap (no matplotlib, no SimpleITK); the CLI may still import it inside commands.
"""

from regcli.reports.jacobian import jacobian_determinant, jacobian_image, jacobian_stats
from regcli.reports.landmarks import PointSet, read_points_csv, tre, write_points_csv
from regcli.reports.metrics import (
    assd_per_label,
    dice_mean,
    dice_per_label,
    hd95_per_label,
    label_overlap_metrics,
    surface_distances,
    surface_metrics,
)
from regcli.reports.report import PeakMemory, StageTimer, build_report, report_json, write_report

__all__ = [
    "PeakMemory",
    "PointSet",
    "StageTimer",
    "assd_per_label",
    "build_report",
    "dice_mean",
    "dice_per_label",
    "hd95_per_label",
    "jacobian_determinant",
    "jacobian_image",
    "jacobian_stats",
    "label_overlap_metrics",
    "read_points_csv",
    "render_html_report",
    "report_json",
    "surface_distances",
    "surface_metrics",
    "tre",
    "write_points_csv",
    "write_report",
]


def render_html_report(*args, **kwargs):
    """Lazy wrapper of :func:`regcli.reports.html.render_html_report` (keeps matplotlib out of imports)."""
    from regcli.reports.html import render_html_report as _render

    return _render(*args, **kwargs)
