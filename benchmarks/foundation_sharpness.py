"""1-D loss landscapes of foundation networks: the GradICON loss along random weight directions.

For each model and each of ``--directions`` random directions ``d`` (seeded; the same for every model of the
same architecture), the loss ``L(w + a d)`` is measured for ``a`` in ``--alphas`` on a fixed set of pairs.
``d`` is filter-normalised (Li et al., "Visualizing the loss landscape of neural nets", 2018): every output
filter of a convolution gets a Gaussian direction scaled to that filter's norm; biases and batch-norm
parameters are left unperturbed. A flatter minimum rises less. Pairs: ``--pairs`` drawn from the datasets of
``--job`` (a ``regcli train foundation`` job) with its sampler and augmentation, seeded, the same for every
model; batch normalisation uses its running statistics (eval mode).

Prints a table (loss at each ``a`` averaged over the directions, and the sharpness: the mean over directions
of the largest rise above ``L(w)`` within ``|a| <= 0.5`` and ``<= 1``) and writes a plot.

    .venv/bin/python benchmarks/foundation_sharpness.py results/foundation_noct/model results/foundation_noct_sam/model \\
        --names "no SAM,SAM" --job docs/recipes/foundation_small_noct.yaml --pairs 6 --directions 3 \\
        --plot docs/figures/foundation_sam_sharpness.png --json results/foundation_sharpness.json
"""

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from regcli.models.gradicon import gradicon_loss, load_gradicon  # noqa: E402
from regcli.training.foundation import load_foundation_job  # noqa: E402
from regcli.training.pairs import PairSource, epoch_order, random_affine  # noqa: E402


def direction(net, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = {}
    for name, p in net.named_parameters():
        if p.dim() <= 1:  # biases, batch-norm scales and shifts
            d[name] = torch.zeros_like(p)
            continue
        r = torch.randn(p.shape, generator=g)
        dims = tuple(range(1, p.dim()))
        # ConvTranspose3d weights are (in, out, ...): normalise per output filter all the same (dim 1)
        if "upConvs" in name:
            dims = (0, *range(2, p.dim()))
        norm = torch.linalg.vector_norm
        r = r * (norm(p.detach(), dim=dims, keepdim=True) / norm(r, dim=dims, keepdim=True).clamp_min(1e-12))
        d[name] = r
    return d


def fixed_pairs(job, shape, n: int, seed: int):
    sources = [PairSource(ds, shape, lambda s: None) for ds in job.data]
    gen = torch.Generator().manual_seed(seed)
    order = []
    pairs = []
    for _ in range(n):
        if not order:
            order = epoch_order(len(sources), 1, gen)
        a, b = sources[order.pop(0)].draw(gen)
        pairs.append((random_affine(a, job.train.augment, gen)[None], random_affine(b, job.train.augment, gen)[None]))
    return pairs


def loss_on(net, pairs, seed: int) -> float:
    with torch.no_grad():
        vals = [float(gradicon_loss(net, a, b, generator=torch.Generator().manual_seed(seed + k))["all"])
                for k, (a, b) in enumerate(pairs)]
    return sum(vals) / len(vals)


def plot(results: dict, alphas: list, path: str) -> None:
    """Loss along each direction (thin) and their mean (thick) per model, on a log scale (the loss of a
    sharp minimum grows by orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, (name, r) in enumerate(results.items()):
        for c in r["curves"]:
            ax.plot(alphas, c, color=f"C{k}", lw=0.7, alpha=0.4)
        ax.plot(alphas, r["mean_curve"], color=f"C{k}", lw=2, label=f"{name} (L(w) = {r['loss_at_minimum']:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("step along a filter-normalised random direction")
    ax.set_ylabel("GradICON loss")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a saved --json")
    ap.add_argument("--names", default=None, help="comma-separated labels (default: the paths)")
    ap.add_argument("--job", default=None, help="the training job whose datasets give the pairs (required unless --replot)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--directions", type=int, default=3)
    ap.add_argument("--alphas", default="-1,-0.75,-0.5,-0.25,-0.1,0,0.1,0.25,0.5,0.75,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)["results"]
        plot(saved, next(iter(saved.values()))["alphas"], args.plot)
        return
    torch.set_num_threads(args.threads)
    if not args.models or not args.job:
        ap.error("give the models and --job (or --replot JSON --plot PNG)")
    names = args.names.split(",") if args.names else args.models
    alphas = [float(a) for a in args.alphas.split(",")]
    job = load_foundation_job(args.job)
    results = {}
    pairs = None
    for name, spec in zip(names, args.models):
        net = load_gradicon(spec).eval()
        if pairs is None:
            pairs = fixed_pairs(job, tuple(net.cfg.input_shape), args.pairs, args.seed)
        w0 = {k: v.detach().clone() for k, v in net.named_parameters()}
        curves = []
        for k in range(args.directions):
            d = direction(net, args.seed + 1000 + k)
            curve = []
            for a in alphas:
                with torch.no_grad():
                    for pname, p in net.named_parameters():
                        p.copy_(w0[pname] + a * d[pname])
                curve.append(loss_on(net, pairs, args.seed))
            curves.append(curve)
            print(f"{name}: direction {k}: " + " ".join(f"{v:.4f}" for v in curve), flush=True)
        with torch.no_grad():
            for pname, p in net.named_parameters():
                p.copy_(w0[pname])
        base = curves[0][alphas.index(0.0)]
        sharp = {r: sum(max(c[i] for i, a in enumerate(alphas) if abs(a) <= r) - base for c in curves) / len(curves)
                 for r in (0.5, 1.0)}
        results[name] = {"model": spec, "loss_at_minimum": base, "alphas": alphas, "curves": curves,
                         "mean_curve": [sum(c[i] for c in curves) / len(curves) for i in range(len(alphas))],
                         "sharpness_0.5": sharp[0.5], "sharpness_1.0": sharp[1.0]}
    head = "| model | L(w) | " + " | ".join(f"a={a:g}" for a in alphas) + " | rise within 0.5 | rise within 1 |"
    print("\n" + head + "\n|" + "---|" * (len(alphas) + 4))
    for name, r in results.items():
        print(f"| {name} | {r['loss_at_minimum']:.4f} | " + " | ".join(f"{v:.4f}" for v in r["mean_curve"])
              + f" | {r['sharpness_0.5']:.4f} | {r['sharpness_1.0']:.4f} |")
    if args.plot:
        plot(results, alphas, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pairs": args.pairs, "directions": args.directions, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
