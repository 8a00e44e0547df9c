"""Optron: training in the loop with an optimiser (after Optron, Chen et al.), for any field-predicting network.

Each training step:

1. the network predicts a displacement ``d`` for the pair (``moving -> fixed``, voxel units);
2. regcli's shared instance-optimisation solver (:class:`regcli.solvers.instance.InstanceOptimization`:
   free-form displacement, Adam, ``optron.iters`` steps of learning rate ``optron.lr``) refines ``d`` on the
   pair, minimising LNCC (window ``optron.lncc_window``) plus ``optron.reg_weight`` (0.02) times the diffusion
   regulariser; the result ``d*`` is the pseudo ground truth (no gradient flows through it);
3. the network is trained with ``optron.mse_weight * mean((d - d*)^2)`` plus ``optron.similarity_weight`` times
   its own unsupervised loss. The Optron paper found that mixing in the unsupervised loss hurts, so the default
   is 0: MSE alone.

Fields here are ``(N, 3, Z, Y, X)`` float32 in **voxel units of the network grid, channels in tensor axis
order** (z, y, x), mapping fixed voxels to moving voxels (:mod:`regcli.models.promptreg`'s convention; the
GradICON maps convert with :func:`gradicon_displacement`). The refinement runs on a unit-spacing grid with the
identity direction, where world millimetres are voxels, so the solver's physical conventions apply unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from pydantic import Field, StrictInt

from regcli.config import ConfigModel
from regcli.spaces.grid import Grid


class OptronConfig(ConfigModel):
    """Optron settings of a training job (``train.optron``; ``iters: 0`` turns it off)."""

    iters: StrictInt = Field(0, ge=0, description="refinement steps per training pair (0: Optron off; the paper: 10)")
    lr: float = Field(0.1, gt=0, description="Adam learning rate of the refinement (voxels)")
    reg_weight: float = Field(0.02, ge=0, description="weight of the diffusion regulariser in the refinement")
    lncc_window: StrictInt = Field(9, ge=3, description="LNCC window of the refinement (voxels)")
    mse_weight: float = Field(1.0, ge=0, description="weight of the MSE to the refined field")
    similarity_weight: float = Field(0.0, ge=0, description="weight of the network's own unsupervised loss mixed "
                                     "in (the paper found it hurts: 0)")

    @property
    def enabled(self) -> bool:
        return self.iters > 0


def voxel_grid(shape: tuple[int, int, int]) -> Grid:
    """The unit-spacing, identity-direction grid of a (Z, Y, X) tensor: world mm = voxel index (x, y, z)."""
    return Grid(tuple(reversed(shape)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def refine(fixed: torch.Tensor, moving: torch.Tensor, disp: torch.Tensor, cfg: OptronConfig) -> torch.Tensor:
    """The pseudo ground truth: ``disp`` (N, 3, Z, Y, X) voxels, tensor order) refined on each pair of
    ``fixed``/``moving`` (N, 1, Z, Y, X) by the shared IO solver; detached, same convention."""
    from regcli.solvers.instance import InstanceOptimization, Problem

    grid = voxel_grid(tuple(fixed.shape[2:]))
    solver = InstanceOptimization(model="freeform", similarity="lncc",
                                  similarity_params={"window": cfg.lncc_window}, optimizer="adam",
                                  regularizer="diffusion", reg_weight=cfg.reg_weight, iterations=cfg.iters,
                                  lr=cfg.lr, stage="Optron refinement")
    out = []
    with torch.enable_grad():
        for n in range(fixed.shape[0]):
            init = disp[n].detach().flip(0)  # tensor order (z, y, x) -> world order (x, y, z)
            res = solver.run(Problem(fixed[n].detach(), moving[n].detach(), grid), init=init)
            out.append(res.disp.flip(0))
    return torch.stack(out).to(disp.dtype)


@contextmanager
def running_stats_kept(net: torch.nn.Module) -> Iterator[None]:
    """Run forward passes in train mode (batch statistics, as the training pass) without letting them update
    the batch-norm running statistics: every normalisation buffer is restored on exit. The prediction of
    Optron's target is such an extra pass; without this, each step would count the batch twice."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in net.modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)


def optron_loss(pred: torch.Tensor, target: torch.Tensor, cfg: OptronConfig,
                unsupervised: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``mse_weight * mean((pred - target)^2) [+ similarity_weight * unsupervised]``."""
    loss = cfg.mse_weight * ((pred - target.detach()) ** 2).mean()
    if cfg.similarity_weight > 0 and unsupervised is not None:
        loss = loss + cfg.similarity_weight * unsupervised
    return loss


def gradicon_displacement(phi_minus_identity: torch.Tensor) -> torch.Tensor:
    """A GradICON displacement in [0, 1] units (N, 3, Z, Y, X), tensor axis order, as voxels."""
    n = torch.tensor(phi_minus_identity.shape[2:], dtype=phi_minus_identity.dtype,
                     device=phi_minus_identity.device) - 1
    return phi_minus_identity * n.view(1, 3, 1, 1, 1)


__all__ = ["OptronConfig", "refine", "optron_loss", "voxel_grid", "gradicon_displacement", "running_stats_kept"]
