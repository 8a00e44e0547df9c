"""Is the DIO training gradient a descent direction? Finite differences of the training loss along it.

One training pair and crop (drawn with SEED from the recipe's subjects, no synthetic contrast), the network of
WEIGHTS. The Jacobian-free gradient g of :func:`regcli.training.dio.train_step` is computed once; then the
loss at the solver's optimum is re-evaluated with the network's parameters moved by ``r * |theta| * d`` for
d = -g/|g| and +g/|g| (and a random unit direction), r in RELSTEPS. A descent direction lowers the loss
for small r along -g and raises it along +g; the size of the random direction's changes is the noise floor
of the loss (the solver's response to tiny feature changes).

  python benchmarks/dio_gradient_check.py [WEIGHTS=dio-features] [SEED=3] [RELSTEPS=1e-5,3e-5,1e-4,3e-4]
"""

import copy
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

torch.set_num_threads(2)
from regcli.methods.dio import _load
from regcli.spaces.image import Image
from regcli.training.dio import (crop_box, crop_grid, labelled_files, load_dio_job, net_config, prepare_subjects,
                                 register_config)
from regcli.training.dio import train_step

weights = sys.argv[1] if len(sys.argv) > 1 else "dio-features"
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 3
relsteps = [float(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1e-5,3e-5,1e-4,3e-4").split(",")]
job = load_dio_job(os.path.join(os.path.dirname(__file__), "..", "docs", "recipes", "dio_v1.yaml"))
cfg, ncfg, tcfg = register_config(job), net_config(job), job.train
subjects, work = prepare_subjects(labelled_files(job.data), ncfg.spacing_mm, ncfg.percentiles)
net = copy.deepcopy(_load(weights)[0])
gen = torch.Generator().manual_seed(seed)
i, j = torch.randperm(len(subjects), generator=gen)[:2].tolist()
box = crop_box(subjects[i].image.shape, tcfg.crop, gen)
g = crop_grid(work, box)
(fi, fl), (mi, ml) = [(Image(subjects[k].image[box].contiguous(), g), Image(subjects[k].labels[box].contiguous(), g))
                      for k in (i, j)]
params = list(net.parameters())
t = time.perf_counter()
loss, parts = train_step(net, fi, mi, fl, ml, cfg, tcfg)
grads = torch.autograd.grad(loss, params, allow_unused=True)
grad = torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, grads)])
print(f"pair {subjects[i].name} <- {subjects[j].name}, loss {parts['loss']:.5f}, gradient in "
      f"{time.perf_counter() - t:.1f} s", flush=True)


def loss_moved(delta: torch.Tensor) -> float:
    with torch.no_grad():
        old = [p.clone() for p in params]
        k = 0
        for p in params:
            p.add_(delta[k:k + p.numel()].view_as(p))
            k += p.numel()
        value = train_step(net, fi, mi, fl, ml, cfg, tcfg)[1]["loss"]
        for p, o in zip(params, old):
            p.copy_(o)
    return value


base = loss_moved(torch.zeros_like(grad))
norm = torch.cat([p.detach().reshape(-1) for p in params]).norm()
rnd = torch.randn(grad.shape, generator=torch.Generator().manual_seed(0))
print("direction   " + "  ".join(f"r={r:g}" for r in relsteps))
for name, d in (("-gradient", -grad), ("+gradient", grad), ("random", rnd)):
    d = d / d.norm()
    print(f"{name:11s} " + "  ".join(f"{loss_moved(r * norm * d) - base:+.5f}" for r in relsteps), flush=True)
