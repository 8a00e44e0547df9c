"""RELIABILITY P2: the pre-flight memory estimate (regcli.memory) and ``--max-memory``.

The estimate is logged and written to the report; above ``--max-memory`` the run is refused (exit 9) with one line
that names the phase and what to change, before any image is read, and nothing is written.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer

from test_cli import images  # noqa: F401 - fixture: 32^3 fixed/moving phantoms and labels
from test_pipeline import _assert_no_outputs
from test_reliability_errors import error_line, fast, register  # noqa: F401 - fast: a short registration config

from regcli.cli.common import parse_memory
from regcli.config import build_config
from regcli.memory import _model, estimate_peak_memory
from regcli.spaces import Grid

EYE = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def _grid(n: int, mm: float = 1.0) -> Grid:
    return Grid((n, n, n), (mm,) * 3, (0.0, 0.0, 0.0), EYE)


def test_parse_memory_units():
    assert parse_memory("8G") == parse_memory("8GB") == parse_memory("8 GiB") == 8192.0
    assert parse_memory("6000M") == parse_memory("6000") == 6000.0
    assert parse_memory("1.5g") == 1536.0
    assert parse_memory(None) is None
    for bad in ("8X", "-1G", "0", "G", "lots"):
        with pytest.raises(typer.BadParameter):
            parse_memory(bad)


def test_every_method_has_calibrated_coefficients():
    model = _model()
    for method in ("convexadam", "samconvex", "dio", "foundation", "promptreg", "affine", "rigid"):
        est = estimate_peak_memory(_grid(128), _grid(128), build_config(None, {"method": method}))
        assert not est.notes, (method, est.notes)
        assert est.method in model["methods"]
        assert 200 < est.total_mb < 4000, (method, est.total_mb)


def test_estimate_grows_with_the_grids_and_knows_which_phases_run():
    base = build_config(None, {})
    small = estimate_peak_memory(_grid(128), _grid(128), base)
    large = estimate_peak_memory(_grid(256), _grid(256), base)
    assert large.total_mb > 2 * small.total_mb > 0
    assert {"read", "affine", "deformable", "inverse", "write", "html"} <= set(small.phases)
    assert "fine" not in small.phases

    fine = estimate_peak_memory(_grid(256), _grid(256), build_config(None, {"instance": {"fine_spacing_mm": 1.0}}))
    assert fine.counts["fine"] == 256 ** 3 and fine.largest == "fine" and fine.total_mb > large.total_mb
    coarse = estimate_peak_memory(_grid(256), _grid(256), build_config(None, {"working_spacing_mm": 4.0}))
    assert coarse.phases["deformable"] < large.phases["deformable"]
    lean = estimate_peak_memory(_grid(256), _grid(256), build_config(None, {"html_report": False,
                                                                           "inverse_warp": False}))
    assert "html" not in lean.phases and "inverse" not in lean.phases
    affine = estimate_peak_memory(_grid(256), _grid(256), build_config(None, {"method": "affine"}))
    assert "deformable" not in affine.phases and affine.counts["work"] == 0
    f64 = estimate_peak_memory(_grid(256), _grid(256), build_config(None, {"precision": "float64"}))
    assert f64.phases["deformable"] > large.phases["deformable"]


def test_over_the_limit_is_refused_before_reading_with_one_line(tmp_path, images, fast, monkeypatch):
    import regcli.io.images as io_images

    def no_read(*a, **k):
        raise AssertionError("an image was read before the memory check")

    monkeypatch.setattr(io_images, "read_image", no_read)
    res = register(images, fast, "--max-memory", "100M")
    assert res.exit_code == 9, res.stderr
    line = error_line(res.stderr)
    assert line.startswith("ResourceError:") and "--max-memory 100 MB" in line and "fixed.nii.gz" in line
    assert "try " in line and res.stdout == ""
    _assert_no_outputs(tmp_path)


def test_within_the_limit_runs_and_reports_the_estimate_above_the_measured_peak(tmp_path, images, fast):
    # a process of its own: the peak RSS of the test process is that of every test before
    res = subprocess.run([sys.executable, "-m", "regcli", "register", str(images["fixed"]), str(images["moving"]),
                          "-o", str(tmp_path / "p_"), "--config", str(fast), "--max-memory", "64G", "--json",
                          "--threads", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    mem = json.loads(res.stdout)["memory"]
    assert mem["estimate_mb"] >= mem["peak_rss_mb"] > 0
    assert mem["estimate_largest_phase"] in mem["estimate_phases_mb"]
    assert mem["estimate_voxels"]["fixed"] == 32 ** 3
    assert json.loads(res.stdout)["config"]["max_memory_mb"] == 65536.0


def test_limits_below_a_megabyte_are_printed_as_given():
    from regcli.memory import _size

    assert (_size(1 / 1024), _size(0.5), _size(512.4), _size(3072)) == ("0.000977 MB", "0.5 MB", "512 MB", "3.0 GB")


def test_on_cuda_the_host_estimate_adds_the_cuda_runtime():
    """On CUDA the tensors live on the GPU, but the CUDA runtime, cuBLAS and cuDNN take host memory of their own:
    a 32^3 phantom peaked at 1.4-1.8 GB of RSS on CUDA against 0.7-0.9 GB on the CPU (H100, torch 2.11), above the
    CPU estimate. The host estimate on CUDA adds the largest difference measured."""
    cfg = build_config(None, {"method": "convexadam"})
    f, m = _grid(160), _grid(150)
    cpu = estimate_peak_memory(f, m, cfg)
    cuda = estimate_peak_memory(f, m, cfg, "cuda")
    extra = float(_model()["cuda_host_mb"])
    assert extra > 1000
    assert cuda.phases == pytest.approx({k: v + extra for k, v in cpu.phases.items()})
    assert cuda.total_mb == pytest.approx(cpu.total_mb + extra * cpu.margin)
    # the log line, the report's notes and a refusal say how much of it is the runtime's, and offer the CPU
    share = f"{extra * cpu.margin / 1024:.1f} GB"
    assert f"{share} of it the CUDA runtime" in cuda.describe() and "CUDA runtime" not in cpu.describe()
    assert any("CUDA runtime" in n for n in cuda.as_dict()["estimate_notes"])
    from regcli.errors import ResourceError
    from regcli.memory import check_memory

    with pytest.raises(ResourceError) as e:
        check_memory(cuda, cpu.total_mb + 1, cfg)
    assert f"{share} of it the CUDA runtime's" in str(e.value) and str(e.value).endswith("--device cpu")
    with pytest.raises(ResourceError) as e:
        check_memory(cpu, cpu.total_mb - 1, cfg)
    assert "CUDA" not in str(e.value) and "--device cpu" not in str(e.value)


def test_without_max_memory_an_estimate_above_the_machine_is_refused_before_reading(tmp_path, images, fast,
                                                                                    monkeypatch):
    """A header with 100 mm voxels (a 4 m field of view) asked the 2 mm working grid for 3.5 TB: "unexpected
    RuntimeError: ... can't allocate memory (this is a bug in regcli)", exit 1. Without --max-memory an estimate
    above all the machine's memory (RAM and swap) is refused like one above --max-memory: exit 9, one line, before
    any image is read, nothing written."""
    import regcli.io.images as io_images
    import regcli.memory as memory

    def no_read(*a, **k):
        raise AssertionError("an image was read before the memory check")

    monkeypatch.setattr(io_images, "read_image", no_read)
    monkeypatch.setattr(memory, "machine_memory_mb", lambda: 100.0)
    res = register(images, fast)
    assert res.exit_code == 9, res.stderr
    line = error_line(res.stderr)
    assert line.startswith("ResourceError: estimated peak memory") and "all the memory of this machine (100 MB" \
        in line and "fixed.nii.gz" in line, line
    assert "32 x 32 x 32 mm" in line and "header" in line and "--max-memory" in line and res.stdout == "", line
    _assert_no_outputs(tmp_path)
    # --max-memory replaces the machine's memory as the limit (as before: the user's number)
    monkeypatch.undo()
    monkeypatch.setattr(memory, "machine_memory_mb", lambda: 100.0)
    res = register(images, fast, "--max-memory", "64G")
    assert res.exit_code == 0, res.stderr


def test_the_machine_check_names_the_header_and_spares_normal_runs():
    """The hunter's 40 x 40 x 32 image of 100 mm voxels: refused on a 24 GB machine, naming its spacing and field of
    view and a coarser working grid. A 1 mm brain (192 x 224 x 192) is a few GB with every method, CPU or CUDA, and
    with --fine-spacing 1: never refused there."""
    from regcli.errors import ResourceError
    from regcli.memory import check_memory, machine_memory_mb

    machine = 24 * 1024.0
    big = Grid((40, 40, 32), (100.0,) * 3, (0.0, 0.0, 0.0), EYE)
    cfg = build_config(None, {})
    est = estimate_peak_memory(big, big, cfg)
    assert est.total_mb > 1000 * 1024
    with pytest.raises(ResourceError) as e:
        check_memory(est, None, cfg, "fx.nii.gz", machine_mb=machine)
    msg = str(e.value)
    assert "above all the memory of this machine (24.0 GB, RAM and swap)" in msg and "\n" not in msg
    assert "100 x 100 x 100 mm, a field of view of 4000 x 4000 x 3200 mm" in msg
    assert "coarser --working-spacing than 2 mm" in msg and "the deformable stage" in msg
    check_memory(est, est.total_mb + 1, cfg, "fx.nii.gz", machine_mb=machine)  # --max-memory: the user's limit
    brain = Grid((192, 224, 192), (1.0,) * 3, (0.0, 0.0, 0.0), EYE)
    for over in [{"method": m} for m in ("convexadam", "samconvex", "dio", "foundation", "promptreg", "affine",
                                         "rigid")] + [{"instance": {"fine_spacing_mm": 1.0}}]:
        for device in ("cpu", "cuda"):
            est = estimate_peak_memory(brain, brain, build_config(None, over), device)
            assert est.total_mb < 8 * 1024, (over, device, est.total_mb)
            check_memory(est, None, build_config(None, over), machine_mb=machine)
    total = machine_memory_mb()
    assert total is None or total > 256, total
