"""Device, threads, seeds and determinism: set once per command, reported in report.json."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from regcli.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    threads: int
    seed: int
    deterministic: bool

    def describe(self) -> dict:
        d = {"device": str(self.device), "threads": self.threads, "seed": self.seed,
             "deterministic": self.deterministic}
        if self.device.type == "cuda":
            d["device_name"] = torch.cuda.get_device_name(self.device)
        return d


def solver_dtype(data: torch.Tensor) -> torch.dtype:
    """The floating type to compute in for ``data``: float64 stays float64 (``precision: float64``), anything
    else (float32, half, integers, booleans) is computed in float32."""
    return torch.float64 if data.dtype == torch.float64 else torch.float32


# Below this many voxels a solver runs on one CPU thread. Each op of a parallel region on more than torch's grain
# (32768 elements) wakes the other threads; with the passive waiting the CLI sets (OMP_WAIT_POLICY=PASSIVE, for
# shared machines) a wake-up cost 110 us per op on the 2-core CI machine (a virtual machine), against 6 us for the
# whole op on one thread for 40 000 elements. On grids this small a second thread gains at most 7 % even with
# spinning threads (ConvexAdam's 4 mm IO: 4.4 s on 2 spinning threads, 4.7 s on 1, 7.1 s on 2 passive ones).
SMALL_GRID_VOXELS = 1 << 17


@contextlib.contextmanager
def threads_for(num_voxels: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the enclosed CPU work on one thread when its grid has fewer than :data:`SMALL_GRID_VOXELS` voxels (the
    affine stage's levels, an instance optimisation on a 4 mm brain grid); otherwise with the threads set. The
    thread count is restored afterwards. Results do not depend on it (RELIABILITY N5). The count is torch's,
    for the whole process: solves run at once in several threads of one process may see each other's count (their
    speed changes, not their results)."""
    n = torch.get_num_threads()
    if n <= 1 or num_voxels >= SMALL_GRID_VOXELS or (device is not None and torch.device(device).type != "cpu"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available (use --device auto or cpu)")
    return torch.device(name)


def setup_runtime(device: str = "auto", threads: int | None = None, seed: int = 0,
                  deterministic: bool = False) -> Runtime:
    """Apply thread count, seeds and deterministic algorithms; return what is in effect.

    With ``deterministic`` two CPU runs with the same seed are bit-identical (the thread count is
    part of the result on CPU: reductions are split per thread, so pin ``--threads`` too).
    """
    dev = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(int(threads))
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(int(threads)))
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        deterministic_algorithms()
    return Runtime(dev, torch.get_num_threads(), seed, deterministic)


def deterministic_algorithms() -> None:
    """torch's deterministic algorithms, for the rest of the process (``--deterministic``): cuDNN without
    benchmarking, cuBLAS with a fixed workspace, and :mod:`regcli.resample` sampling through gathers on CUDA
    (``grid_sample``'s CUDA backward adds with atomics). Operations without a deterministic version only warn."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
