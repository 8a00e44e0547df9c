"""Synthetic phantoms for the test-suite (see ../shared/RELIABILITY.md).

A phantom is smooth blobs plus an asymmetric L-shaped marker near one corner (so flips show), built in
world space so that the *same physical object* can be rendered on any grid (direction, spacing, origin).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# As the CLI does: OpenMP threads sleep instead of spinning while they wait. On a busy 2-core machine (CI, or
# a training job beside the tests) spinning made small torch ops 100x slower (measured: a 729-shift cost
# volume took 13.5 s instead of 0.1 s). Must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import SimpleITK as sitk

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = Path(os.environ.get("REGCLI_SHARED_DATA", SHARED / "data"))


def child_env(**extra: str) -> dict:
    """The environment for a `python -m regcli` child: this checkout first on PYTHONPATH, whatever the parent had
    there kept after it (packages installed with `pip --target` live there), plus `extra`."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), **extra}

DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    # PIL: index axes point to Posterior, Inferior, Left (a permuted and flipped layout)
    "PIL": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique15": np.asarray(sitk.VersorTransform((0.3, 0.2, 0.93), math.radians(15)).GetMatrix()).reshape(3, 3),
}
SPACINGS = {"iso": (1.0, 1.0, 1.0), "aniso": (0.9, 0.9, 3.0)}


def body_and_blobs(p: np.ndarray) -> np.ndarray:
    """The phantom without its marker: a soft ellipsoidal body with blobs of different brightness."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    body = 1.0 / (1.0 + np.exp(np.clip(((x / 17.0) ** 2 + (y / 14.0) ** 2 + (z / 12.0) ** 2 - 1.0) * 12.0, -50, 50)))
    v = 0.3 * body
    blobs = [((-6, -4, 2), (4.0, 3.0, 3.5), 0.5), ((5, 3, -3), (3.0, 4.5, 3.0), 0.35),
             ((0, 6, 4), (2.5, 2.5, 2.5), -0.2), ((-4, 5, -4), (3.5, 2.0, 2.5), 0.25),
             ((7, -6, 3), (2.0, 3.0, 2.0), 0.3)]
    for (cx, cy, cz), (sx, sy, sz), a in blobs:
        v = v + a * body * np.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2))
    return v


def phantom_value(p: np.ndarray) -> np.ndarray:
    """Intensity of the phantom at world LPS points p (..., 3), object centred at (0, 0, 0) mm.

    Smooth anisotropic blobs of different brightness inside an ellipsoidal body, plus an L-shaped
    bright marker in the (+x, +y, +z) octant. Background 0, range about [0, 1].
    """
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    v = body_and_blobs(p)
    # asymmetric L marker: a bar along x and a shorter bar along y, at the (+x, +y, +z) corner of the body
    bar1 = (np.abs(y - 8) < 1.2) & (np.abs(z - 6) < 1.2) & (x > 4) & (x < 12)
    bar2 = (np.abs(x - 11) < 1.2) & (np.abs(z - 6) < 1.2) & (y > 2) & (y < 8)
    v = v + 0.6 * (bar1 | bar2)
    return v.astype(np.float32)


def render(grid_size, spacing, origin, direction, fn=phantom_value, transform=None) -> sitk.Image:
    """Render a world-space function on a grid. ``transform`` (fixed->moving points) is applied first:
    the rendered image is ``fn(T(x))`` for every voxel centre ``x`` (so it is the phantom warped by T)."""
    img = sitk.Image([int(s) for s in grid_size], sitk.sitkFloat32)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    nz, ny, nx = grid_size[2], grid_size[1], grid_size[0]
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], -1).astype(np.float64)
    D = np.asarray(direction, dtype=float).reshape(3, 3)
    world = idx @ (D * np.asarray(spacing)[None, :]).T + np.asarray(origin)
    if transform is not None:
        world = transform(world)
    arr = fn(world)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def centred_origin(size, spacing, direction, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Origin that puts the grid centre at ``centre`` (world mm)."""
    D = np.asarray(direction, dtype=float).reshape(3, 3)
    half = (np.asarray(size, dtype=float) - 1.0) / 2.0 * np.asarray(spacing)
    return np.asarray(centre) - D @ half


def make_phantom(direction="LPS", spacing="iso", size=None, centre=(1.5, -2.0, 3.0), transform=None) -> sitk.Image:
    """A phantom covering about 48 x 44 x 40 mm around ``centre`` (non-zero origin by default)."""
    D = DIRECTIONS[direction] if isinstance(direction, str) else np.asarray(direction)
    sp = SPACINGS[spacing] if isinstance(spacing, str) else tuple(spacing)
    if size is None:
        # extent of ~48x44x40 mm in world; pick sizes per index axis from the world axis it points to
        ext_world = np.array([48.0, 44.0, 40.0])
        axis_world = np.argmax(np.abs(D), axis=0)
        size = [int(round(ext_world[a] / s)) for a, s in zip(axis_world, sp)]
    origin = centred_origin(size, sp, D, centre)
    return render(size, sp, origin, D, transform=transform)


def phantom_labels(image: sitk.Image, thresholds=(0.2, 0.45, 0.7)) -> sitk.Image:
    """Integer labels 1..3 by intensity thresholds (0 = background)."""
    arr = sitk.GetArrayFromImage(image)
    lab = np.zeros(arr.shape, np.uint8)
    for i, t in enumerate(thresholds, start=1):
        lab[arr > t] = i
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(image)
    return out


def phantom_mask(image: sitk.Image, erode: int = 2) -> np.ndarray:
    """Foreground (> 0.1) eroded by ``erode`` voxels, as a (Z, Y, X) bool array."""
    m = sitk.BinaryThreshold(image, 0.1, 1e9, 1, 0)
    if erode:
        m = sitk.BinaryErode(m, [erode] * 3)
    return sitk.GetArrayFromImage(m).astype(bool)


@pytest.fixture
def phantom_factory():
    return make_phantom


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def as_image(sitk_img: sitk.Image):
    """A SimpleITK image as a regcli Image (float32 data, its grid)."""
    import torch

    from regcli.spaces.grid import Grid
    from regcli.spaces.image import Image

    return Image(torch.from_numpy(sitk.GetArrayFromImage(sitk_img).astype(np.float32)), Grid.from_sitk(sitk_img))


NETWORK_SHIFT = np.array([3.0, -2.0, 1.5])  # content shift of the moving phantom of network_pair, world mm


@pytest.fixture(scope="module")
def network_pair():
    """An oblique, anisotropic phantom and its copy with the content shifted by NETWORK_SHIFT (moving(y) =
    phantom(y + NETWORK_SHIFT)), as regcli Images: the pair the network-method tests register."""
    fixed = make_phantom("oblique15", "aniso")
    moving = make_phantom("oblique15", "aniso", transform=lambda p: p + NETWORK_SHIFT)
    return as_image(fixed), as_image(moving)


def write(img: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(img, str(path))
    return path


def shared_file(*parts) -> Path:
    """A file under ../shared/data, or skip the test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


def has_antspyx() -> bool:
    try:
        import ants  # noqa: F401
    except Exception:
        return False
    return True


def bench_metrics():
    """The bench scorer (shared/bench/metrics.py), imported under a private name; skip when absent."""
    path = SHARED / "bench" / "metrics.py"
    if not path.exists():
        pytest.skip(f"bench scorer not available: {path}")
    pytest.importorskip("nibabel")
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_metrics", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- CLI helpers (shared by CLI tests)
def invoke(*args, env=None):
    """Run the regcli CLI in-process (typer's CliRunner); arguments are str()-ed."""
    from typer.testing import CliRunner

    from regcli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line(text: str) -> str:
    """The only non-empty line of ``text`` (fails the test when there are more)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    return lines[0]


def random_state(state_dict: dict, seed: int, scale: float = 0.02) -> dict:
    """Random values for every tensor of a network's state_dict (zero-initialised layers too), positive batch-norm
    running variances, integer counters kept: a random network that really moves voxels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state_dict.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * scale
    return out
