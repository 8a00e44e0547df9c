"""Self-supervised training of the anatomical embedding network (:mod:`regcli.models.embedding`).

Recipe (after Yan et al.'s SAM, written for regcli's physical-space conventions):

1. Each training volume is resampled to the network's isotropic spacing and intensity-normalised once.
2. A *pair of views* is cut from one volume: two cubes of ``crop`` voxels whose centres lie at most
   ``max_shift_mm`` apart (so they overlap), each at its own random scale (voxel size ``spacing * s`` with
   ``s`` in ``scale_range``) and with its own intensity augmentation (gamma, contrast, offset, noise).
   Both views are resampled from the same volume, so a world point has a known position in each: the
   correspondences are exact, whatever the scales.
3. The network embeds both views. ``points`` world points are drawn in the overlap, on the volume's
   foreground; their embeddings in view A and in view B are sampled (trilinear) from the global and the
   local maps.
4. Pixel-wise InfoNCE per head, symmetric (A→B and B→A): the positive of a point is the same point in the
   other view; every other drawn point is a negative, except those closer than ``exclude_mm`` (too close
   to be told apart at that head's resolution). Only the ``hard_negatives`` most similar negatives of each
   point enter the softmax, as in SAM. Loss = global + local.
5. Adam with a cosine learning-rate decay; with ``sam_rho > 0`` sharpness-aware minimization
   (:mod:`regcli.training.sam`, not to be confused with Yan et al.'s SAM): each step's loss and gradient are taken
   again, on the same views, at weights moved by ``sam_rho`` uphill.

Everything is seeded (``seed``) so a run is reproducible on CPU. On a GPU (``regcli train embedding --device
cuda``) only the network's passes run there: views are cut and augmented on the CPU, as on a CPU run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt, model_validator

from regcli.config import ConfigModel
from regcli.features.intensity import downsample
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet, normalise_intensity
from regcli.resample import resample_to_grid, sample_at_world
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.training.distributed import SINGLE, Distributed
from regcli.training.sam import SAM


class EmbeddingTrainConfig(ConfigModel):
    """Training recipe (stored in the trained model's ``config.json`` under ``"training"``)."""

    iterations: StrictInt = Field(2000, ge=1, description="length of the learning-rate schedule (cosine decay)")
    stop_after: Optional[StrictInt] = Field(None, ge=1, description="end after this many steps, the schedule "
                                            "still spanning `iterations` (a run cut short on purpose, reproducibly)")
    batch_pairs: StrictInt = Field(2, ge=1, description="view pairs per step")
    crop: StrictInt = Field(48, ge=16, description="view size in voxels (cube)")
    max_shift_mm: float = Field(40.0, ge=0, description="largest distance between the two view centres")
    scale_range: tuple[float, float] = Field((0.8, 1.25), description="range of each view's random scale (voxel "
                                             "size = spacing * s); 0 < low <= high")
    gamma_range: tuple[float, float] = Field((0.7, 1.5), description="range of each view's random gamma (drawn "
                                             "log-uniformly); 0 < low <= high")
    noise_max: float = Field(0.05, ge=0, description="largest std of added Gaussian noise (normalised units)")
    remap_prob: float = Field(0.3, ge=0, le=1, description="probability of a random intensity remap per view "
                              "(a piecewise-linear, possibly non-monotone curve: synthetic contrasts)")
    remap_knots: StrictInt = Field(5, ge=2)
    points: StrictInt = Field(256, ge=8, description="world points drawn per view pair")
    temperature: float = Field(0.2, gt=0)
    hard_negatives: StrictInt = Field(64, ge=1)
    exclude_mm: tuple[float, float] = Field((16.0, 4.0), description="no negatives closer than this (global, local)")
    learning_rate: float = Field(1e-3, gt=0)
    sam_rho: float = Field(0.0, ge=0, description="sharpness-aware minimization: radius of the weight perturbation "
                           "(regcli.training.sam; two forward/backward passes per step); 0: plain Adam")
    sampling: Literal["volume", "source"] = Field(
        "volume", description="how a view pair picks its volume: uniformly over volumes, or first a data source "
        "(job glob) uniformly, then a volume in it (a source with one volume is seen as often as one with 20)")
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _ranges(self) -> "EmbeddingTrainConfig":
        for key in ("scale_range", "gamma_range"):
            low, high = getattr(self, key)
            if not (0 < low <= high and math.isfinite(high)):
                raise ValueError(f"{key} must be [low, high] with 0 < low <= high, got [{low}, {high}]")
        if not all(0 <= e and math.isfinite(e) for e in self.exclude_mm):
            raise ValueError(f"exclude_mm must be two distances >= 0 (mm), got {list(self.exclude_mm)}")
        return self


# ------------------------------------------------------------------------------------------- views
@dataclass
class View:
    image: torch.Tensor  # (1, crop, crop, crop) float32, augmented normalised intensities
    grid: Grid


def prepare_volume(image: Image, spacing_mm: float, percentiles: tuple[float, float]) -> Image:
    """Resample a scalar image to isotropic ``spacing_mm`` (anti-aliased) and normalise its intensities."""
    data = image.data if image.data.dim() == 3 else image.data[0]
    res = downsample(Image(data.to(torch.float32), image.grid), spacing_mm)
    return Image(normalise_intensity(res.data, percentiles), res.grid, image.name)


def _foreground_points(vol: Image, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random world points (n, 3) float64 LPS mm at voxels above the volume's background."""
    fg = torch.nonzero(vol.data > vol.data.min() + 0.05).numpy()
    if len(fg) == 0:
        fg = torch.nonzero(torch.ones_like(vol.data, dtype=torch.bool)).numpy()
    pick = fg[rng.integers(0, len(fg), n)][:, ::-1].astype(np.float64)  # (z,y,x) -> (x,y,z)
    pick += rng.uniform(-0.5, 0.5, pick.shape)
    return vol.grid.index_to_world_points(torch.from_numpy(pick)).numpy()


def _view_grid(vol: Grid, centre: np.ndarray, crop: int, spacing: float) -> Grid:
    d = np.asarray(vol.direction, dtype=np.float64).reshape(3, 3)
    origin = centre - d @ np.full(3, spacing * (crop - 1) / 2.0)
    return Grid((crop, crop, crop), (spacing,) * 3, tuple(origin), vol.direction)


def _augment(x: torch.Tensor, cfg: EmbeddingTrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Random gamma (on [0, 1]-clipped values), contrast and offset, then Gaussian noise."""
    gamma = float(np.exp(rng.uniform(np.log(cfg.gamma_range[0]), np.log(cfg.gamma_range[1]))))
    y = x.clamp(0, 1).pow(gamma) + (x - x.clamp(0, 1))  # keep the clipped tails linear
    if rng.uniform() < cfg.remap_prob:
        # synthetic contrast: a random piecewise-linear curve through remap_knots points of [0, 1]
        xs = torch.linspace(0, 1, cfg.remap_knots)
        ys = torch.as_tensor(rng.uniform(0, 1, cfg.remap_knots), dtype=torch.float32)
        t = y.clamp(0, 1) * (cfg.remap_knots - 1)
        i0 = t.floor().clamp(max=cfg.remap_knots - 2).long()
        y = torch.lerp(ys[i0], ys[i0 + 1], t - xs[i0] * (cfg.remap_knots - 1))
    y = y * float(rng.uniform(0.8, 1.2)) + float(rng.uniform(-0.1, 0.1))
    sigma = float(rng.uniform(0, cfg.noise_max))
    if sigma > 0:
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))
        y = y + sigma * torch.randn(y.shape, generator=g)
    return y


def make_view_pair(vol: Image, cfg: EmbeddingTrainConfig, spacing: float, rng: np.random.Generator
                   ) -> tuple[View, View, np.ndarray]:
    """Two overlapping augmented views of ``vol`` and ``cfg.points`` world points (P, 3) inside both."""
    for _ in range(20):
        ca = _foreground_points(vol, rng, 1)[0]
        shift = rng.normal(size=3)
        shift *= rng.uniform(0, cfg.max_shift_mm) / max(np.linalg.norm(shift), 1e-9)
        cb = ca + shift
        ga = _view_grid(vol.grid, ca, cfg.crop, spacing * float(rng.uniform(*cfg.scale_range)))
        gb = _view_grid(vol.grid, cb, cfg.crop, spacing * float(rng.uniform(*cfg.scale_range)))
        # candidates uniform in view A (4 voxels from its faces), kept if inside B and on the foreground
        idx = rng.uniform(4, cfg.crop - 5, size=(cfg.points * 8, 3))
        cand = ga.index_to_world_points(torch.from_numpy(idx)).numpy()
        keep = _inside(gb, cand, margin=4) & _on_foreground(vol, cand)
        if keep.sum() >= cfg.points:
            pts = cand[keep][: cfg.points]
            break
    else:
        from regcli.errors import InputError

        raise InputError(f"could not place two overlapping views in '{vol.name}': too little foreground for crop "
                         f"{cfg.crop} at {spacing} mm")
    views = []
    for g in (ga, gb):
        data = resample_to_grid(vol, g, "linear", float(vol.data.min())).data
        views.append(View(_augment(data, cfg, rng)[None], g))
    return views[0], views[1], pts


def _on_foreground(vol: Image, pts: np.ndarray) -> np.ndarray:
    vals = sample_at_world(vol.data, vol.grid, torch.as_tensor(pts), "nearest", "itk", float(vol.data.min()))
    return (vals > vol.data.min() + 0.05).numpy()


def _inside(grid: Grid, pts: np.ndarray, margin: float) -> np.ndarray:
    idx = grid.world_to_index_points(torch.from_numpy(pts)).numpy()
    n = np.asarray(grid.size, dtype=np.float64)
    return np.all((idx >= margin) & (idx <= n - 1 - margin), axis=1)


# ------------------------------------------------------------------------------------------- loss
def info_nce(q: torch.Tensor, k: torch.Tensor, pts: torch.Tensor, temperature: float, exclude_mm: float,
             hard_negatives: int) -> torch.Tensor:
    """Symmetric InfoNCE of unit vectors q, k (P, D) at the same world points ``pts`` (P, 3) mm.

    Negatives closer than ``exclude_mm`` to the anchor are left out; only the ``hard_negatives`` most
    similar remaining negatives of each anchor enter its softmax.
    """
    sim = q @ k.T / temperature  # (P, P)
    far = torch.cdist(pts, pts) >= exclude_mm
    eye = torch.eye(len(pts), dtype=torch.bool, device=q.device)
    losses = []
    for s in (sim, sim.T):
        neg = s.masked_fill(~far | eye, float("-inf"))
        m = min(hard_negatives, len(pts) - 1)
        top = neg.topk(m, dim=1).values
        logits = torch.cat((s.diagonal()[:, None], top), dim=1)
        losses.append(F.cross_entropy(logits, torch.zeros(len(pts), dtype=torch.long, device=q.device)))
    return 0.5 * (losses[0] + losses[1])


def _sample_heads(net_out: tuple[torch.Tensor, torch.Tensor], i: int, grid: Grid, pts: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    g, loc = net_out
    qg = sample_at_world(g[i], grid.subsampled(8), pts, padding="border").T
    ql = sample_at_world(loc[i], grid.subsampled(2), pts, padding="border").T
    return F.normalize(qg, dim=1), F.normalize(ql, dim=1)


# ------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    net: EmbeddingNet
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def volume_sampler(n_volumes: int, sampling: str, groups: Optional[Sequence[int]],
                   rng: np.random.Generator, weights: Optional[Sequence[float]] = None) -> Callable[[], int]:
    """A function that draws the index of a training volume: uniformly (``"volume"``: one ``rng.integers``
    call per draw, the sequence of the first recipes), or a data source and then one of its volumes
    (``"source"``; ``groups[i]`` is volume i's source, default: one source per volume). Sources are drawn in
    proportion to ``weights[source]`` (the datasets' sampling weights), uniformly when they are all equal."""
    if sampling == "volume":
        return lambda: int(rng.integers(0, n_volumes))
    src = list(groups) if groups is not None else list(range(n_volumes))
    if len(src) != n_volumes:
        raise ValueError(f"groups has {len(src)} entries for {n_volumes} volumes")
    keys = sorted(set(src))
    by_source = [[i for i, g in enumerate(src) if g == k] for k in keys]
    w = np.asarray([weights[k] for k in keys], dtype=np.float64) if weights is not None else None
    p = None if w is None or np.all(w == w[0]) else w / w.sum()

    def draw() -> int:
        k = int(rng.integers(0, len(by_source))) if p is None else int(rng.choice(len(by_source), p=p))
        members = by_source[k]
        return members[int(rng.integers(0, len(members)))]

    return draw


def cosine_schedule(opt: torch.optim.Optimizer, cfg: EmbeddingTrainConfig
                    ) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """The learning-rate schedule of a run: cosine decay from ``cfg.learning_rate`` to 5 % of it over
    ``cfg.iterations`` steps, at step 0."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations, eta_min=cfg.learning_rate * 0.05)


def advance_schedule(sched: torch.optim.lr_scheduler.CosineAnnealingLR, cfg: EmbeddingTrainConfig,
                     step: int) -> None:
    """Put ``sched`` (from :func:`cosine_schedule`) and its optimizer's learning rate where a straight run of
    ``cfg.iterations`` steps has them after ``step`` steps.

    The schedule is replayed on a stand-in optimizer, so the rates are bit for bit those of the straight run
    (PyTorch's cosine schedule computes each rate from the previous one). Only the step count of a resumed run
    is used, not its stored schedule: a run resumed with more ``iterations`` follows the longer schedule from
    where it stands, instead of restarting the cosine of its old length."""
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    replay = cosine_schedule(stand_in, cfg)
    for _ in range(step):
        stand_in.step()  # no gradient: changes nothing, but keeps the scheduler from warning about the order
        replay.step()
    sched.load_state_dict(replay.state_dict())
    for group in sched.optimizer.param_groups:
        group["lr"] = stand_in.param_groups[0]["lr"]


def train_embedding(volumes: Sequence[Image], cfg: EmbeddingTrainConfig,
                    net_cfg: Optional[EmbeddingConfig] = None, net: Optional[EmbeddingNet] = None,
                    progress: Optional[Callable[[int, int, dict], None]] = None,
                    groups: Optional[Sequence[int]] = None, weights: Optional[Sequence[float]] = None,
                    resume: Optional[dict] = None,
                    save: Optional[Callable[[int, dict], None]] = None, save_every: int = 0,
                    dist: Distributed = SINGLE, resume_path: Optional[Path] = None) -> TrainResult:
    """Train (or continue training) an embedding network on ``volumes`` (already prepared with
    :func:`prepare_volume`, i.e. on isotropic grids of the network's spacing). ``groups`` gives each volume's
    data source, for ``cfg.sampling == "source"`` (default: one source per volume), drawn in proportion to
    ``weights[source]``. Returns the net and the
    loss history (per step: ``loss``, ``global``, ``local``, and with ``cfg.sam_rho > 0`` ``sam_loss``, the loss at
    the perturbed weights).

    ``save(step, state)`` is called every ``save_every`` steps and after the last with the training state
    (optimizer, schedule, random generator, history, step); ``resume`` is such a state, to continue bit for
    bit (a state that does not fit is a one-line InputError naming ``resume_path``, the checkpoint it was read
    from). The learning rate after a resume is the one of a straight ``cfg.iterations``-step run at that step
    (:func:`advance_schedule`): the same as before when ``iterations`` is unchanged, the longer schedule's
    when a resumed run goes further. Under torchrun (``dist``) every process draws the global batch of
    ``world * batch_pairs`` view pairs and computes its share. The network trains where its parameters are (move
    ``net`` to a GPU first to train there); views are cut and augmented on the CPU and moved per step.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = net or EmbeddingNet(net_cfg)
    device = next(net.parameters()).device
    spacing = net.cfg.spacing_mm
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    sched = cosine_schedule(opt, cfg)
    history: list[dict] = []
    net.train()
    steps = min(cfg.iterations, cfg.stop_after or cfg.iterations)
    pick = volume_sampler(len(volumes), cfg.sampling, groups, rng, weights)
    sam = SAM(opt, cfg.sam_rho)
    start, prior = 0, 0.0
    if resume is not None:
        from regcli.training.jobs import restoring

        with restoring(resume_path):
            sam.load_state_dict(resume["optimizer"])
            rng.bit_generator.state = resume["rng"]
            history, start, prior = list(resume["history"]), int(resume["step"]), float(resume.get("seconds", 0.0))
        advance_schedule(sched, cfg, start)  # the schedule of cfg.iterations (which --iterations may have changed)
    model = dist.wrap(net)

    def state(step: int) -> dict:
        return {"optimizer": sam.state_dict(), "scheduler": sched.state_dict(), "rng": rng.bit_generator.state,
                "history": history, "step": step, "seconds": prior + time.perf_counter() - t0, "world": dist.world}

    for it in range(start, steps):
        drawn = [make_view_pair(volumes[pick()], cfg, spacing, rng) for _ in range(cfg.batch_pairs * dist.world)]
        pairs = dist.shard(drawn)
        x = torch.stack([v.image for a, b, _ in pairs for v in (a, b)]).to(device)  # (2B, 1, S, S, S)
        passes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (loss, global, local) per pass

        def closure() -> torch.Tensor:  # once, or twice with SAM (the second at the perturbed weights)
            opt.zero_grad(set_to_none=True)
            out = model(x)
            lg = ll = x.new_zeros(())
            for j, (a, b, pts_np) in enumerate(pairs):
                pts = torch.as_tensor(pts_np, dtype=torch.float64, device=device)
                qa = _sample_heads(out, 2 * j, a.grid, pts)
                qb = _sample_heads(out, 2 * j + 1, b.grid, pts)
                p32 = pts.to(torch.float32)
                lg = lg + info_nce(qa[0], qb[0], p32, cfg.temperature, cfg.exclude_mm[0], cfg.hard_negatives)
                ll = ll + info_nce(qa[1], qb[1], p32, cfg.temperature, cfg.exclude_mm[1], cfg.hard_negatives)
            loss = (lg + ll) / len(pairs)
            if not math.isfinite(float(loss.detach())):
                from regcli.errors import ConvergenceError

                where = " at the SAM-perturbed weights" if passes else ""
                raise ConvergenceError(f"embedding training diverged at step {it + 1}{where}: loss "
                                       f"{float(loss.detach())}")
            loss.backward()
            passes.append((loss.detach(), lg.detach(), ll.detach()))
            return loss

        sam.step(closure)
        sched.step()
        loss, lg, ll = passes[0]
        rec = {"iteration": it + 1, "loss": dist.mean(float(loss)), "global": dist.mean(float(lg) / len(pairs)),
               "local": dist.mean(float(ll) / len(pairs)), "lr": sched.get_last_lr()[0]}
        if len(passes) > 1:
            rec["sam_loss"] = dist.mean(float(passes[1][0]))  # the loss at the perturbed weights
        history.append(rec)
        if progress is not None and dist.main:
            progress(it + 1, steps, rec)
        if save is not None and ((save_every and (it + 1) % save_every == 0) or it + 1 == steps):
            save(it + 1, state(it + 1))
    net.eval()
    return TrainResult(net, history, prior + time.perf_counter() - t0)


def match_accuracy(net: EmbeddingNet, vol: Image, cfg: EmbeddingTrainConfig, pairs: int = 4, seed: int = 123,
                   head: str = "local", tolerance_mm: float = 6.0) -> float:
    """Fraction of drawn points whose nearest neighbour (cosine) among the drawn points of the other view is
    within ``tolerance_mm`` of the right point: a quick, label-free measure of embedding quality."""
    rng = np.random.default_rng(seed)
    device = next(net.parameters()).device
    hits = total = 0
    net.eval()
    with torch.no_grad():
        for _ in range(pairs):
            a, b, pts_np = make_view_pair(vol, cfg, net.cfg.spacing_mm, rng)
            out = net(torch.stack((a.image, b.image)).to(device))
            pts = torch.as_tensor(pts_np, dtype=torch.float64, device=device)
            k = 0 if head == "global" else 1
            qa = _sample_heads(out, 0, a.grid, pts)[k]
            qb = _sample_heads(out, 1, b.grid, pts)[k]
            nn_idx = (qa @ qb.T).argmax(dim=1)
            err = (pts[nn_idx] - pts).norm(dim=1)
            hits += int((err <= tolerance_mm).sum())
            total += len(pts)
    return hits / max(total, 1)
