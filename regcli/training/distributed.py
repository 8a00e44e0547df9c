"""Data-parallel training under ``torchrun``: what every ``regcli train`` task uses.

``torchrun --nproc-per-node N -m regcli train TASK --config job.yaml -o OUTDIR`` starts N processes; each
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from its environment (:func:`setup`), joins the process
group (gloo on CPU, nccl on CUDA) and wraps the network in ``DistributedDataParallel``.

The convention that makes N processes train like one:

* **Batches.** ``train.batch_size`` (pairs, or view pairs, per step) is per process. Every process draws the
  same *global* batch of ``N * batch_size`` items from the same seeded generator, and computes the loss and
  gradient of its own slice (:meth:`Distributed.shard`); DDP averages the gradients. One process with
  ``N * batch_size`` draws the same items, so the two runs see the same data in the same order and their
  loss curves agree within what batch normalisation's per-process statistics and the order of floating-point
  sums change.
* **Random state.** Augmentation and sampling come from the shared generator, so they stay identical across
  processes; a checkpoint stores that one state.
* **Rank 0 writes**: checkpoints, history, plots, the model folder and the logs; the others stay quiet, and
  every process resumes from the same checkpoint.
* **Threads.** Unless ``--threads`` says otherwise, each process gets ``cores / local processes`` threads.
* **Devices.** With ``--device cuda`` (or ``auto`` with a GPU per local process) process ``LOCAL_RANK`` trains on
  ``cuda:LOCAL_RANK`` and the processes talk over nccl; data are read and augmented on the CPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes files and logs."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's slice of a global batch (its length a multiple of ``world``), in order."""
        n = len(items)
        if n % self.world:
            raise ValueError(f"a global batch of {n} does not split over {self.world} processes")
        k = n // self.world
        return list(items[self.rank * k:(self.rank + 1) * k])

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` in DistributedDataParallel (gradients averaged over the processes), or ``net`` itself.

        Buffers (batch normalisation's running statistics) are not broadcast from rank 0 at every forward call
        (:func:`_no_forward_buffer_sync`): the pair networks call forward more than once before a backward (both
        directions), and the broadcast, an in-place copy on the other ranks, then changed a tensor the first
        call's graph had saved ("modified by an inplace operation", torch 2.11 under torchrun). Training uses the
        batch's statistics; the running ones are used only by rank 0 (validation, the checkpoint, the model)."""
        if not self.enabled:
            return net
        dev = next(net.parameters()).device
        return _ddp_class()(net, device_ids=[dev.index] if dev.type == "cuda" else None, **_no_forward_buffer_sync())

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (for logging a global loss)."""
        if not self.enabled:
            return value
        on_gpu = torch.distributed.get_backend() == "nccl"  # nccl reduces CUDA tensors only
        t = torch.tensor([float(value)], dtype=torch.float64,
                         device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else None)
        torch.distributed.all_reduce(t)
        return float(t) / self.world


SINGLE = Distributed()


@functools.lru_cache(maxsize=1)
def _no_forward_buffer_sync() -> dict:
    """DistributedDataParallel's argument that turns off the buffer broadcast before every forward call: from torch
    2.13 ``forward_sync_buffers=False`` (buffers still synced once, at construction), before it
    ``broadcast_buffers=False``, which 2.13 deprecates with a FutureWarning on every wrap."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


@functools.lru_cache(maxsize=1)
def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class DDP(DistributedDataParallel):
        """DistributedDataParallel that also answers the wrapped network's own attributes (``cfg``), so code
        written for the bare network takes the wrapper."""

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return DDP


def from_environment() -> Distributed:
    """This process's place from torchrun's variables (one process when they are absent)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return SINGLE
    return Distributed(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def setup(device: str = "cpu", threads: int | None = None) -> Distributed:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) and set this process's threads; returns
    :data:`SINGLE` outside torchrun. Idempotent."""
    dist = from_environment()
    if not dist.enabled:
        return dist
    n = threads or max(1, (os.cpu_count() or 1) // dist.local_world)
    torch.set_num_threads(n)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group(backend=backend)
    return dist


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (or ``net`` itself)."""
    return getattr(net, "module", net)


__all__ = ["Distributed", "SINGLE", "from_environment", "setup", "teardown", "unwrap"]
