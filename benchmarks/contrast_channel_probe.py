"""s19 probe (docs/embedding.md, "A learned contrast-harmonising channel"): a small 2 mm U-Net trained to map a
randomly re-contrasted crop back to its clean normalised intensities, then used in place of the intensities in
the 2 mm refinement (instance.refine_intensity_weight) of SAMConvex or ConvexAdam.

  python benchmarks/contrast_channel_probe.py train 1500 results/s19_contrast_a.pt        # run A (0.8 remaps)
  SYN_GLOBAL=1 SYN_INVERT=1 python benchmarks/contrast_channel_probe.py train 2000 results/s19_contrast_b.pt
  python benchmarks/contrast_channel_probe.py eval results/s19_contrast_a.pt \
      '{"sc_syn1.5": {"_synth": true, "method": "samconvex", "instance": {"refine_intensity_weight": 1.5}}}' \
      "2,5;8,11;14,17" [t1|t2]
"""
import glob
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
INVERT = os.environ.get("SYN_INVERT", "0") == "1"  # 30 % of the crops inverted (T2-like) before augmentation
GLOBAL = os.environ.get("SYN_GLOBAL", "0") == "1"  # global-pooling branch at the coarsest level
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from regcli.io.images import read_image
from regcli.training.embedding import EmbeddingTrainConfig, prepare_volume, _foreground_points, _view_grid, _augment
from regcli.resample import resample_to_grid


def blk(ci, co, s=1):
    return nn.Sequential(nn.Conv3d(ci, co, 3, stride=s, padding=1), nn.LeakyReLU(0.1, inplace=True))


class SynthNet(nn.Module):
    def __init__(self, w=(8, 16, 32)):
        super().__init__()
        a, b, c = w
        self.e0 = nn.Sequential(blk(1, a), blk(a, a))
        self.e1 = nn.Sequential(blk(a, b, 2), blk(b, b))
        self.e2 = nn.Sequential(blk(b, c, 2), blk(c, c), blk(c, c))
        if GLOBAL:  # only then, so that the plain network's initial weights do not depend on it
            self.glob = nn.Sequential(nn.Linear(c, c), nn.LeakyReLU(0.1), nn.Linear(c, c))
        self.d1 = blk(c + b, b)
        self.d0 = blk(b + a, a)
        self.out = nn.Conv3d(a, 1, 1)

    def forward(self, x):
        e0 = self.e0(x); e1 = self.e1(e0); e2 = self.e2(e1)
        if GLOBAL:
            e2 = e2 + self.glob(e2.mean((2, 3, 4)))[:, :, None, None, None]
        d1 = self.d1(torch.cat((F.interpolate(e2, size=e1.shape[2:], mode="trilinear", align_corners=False), e1), 1))
        d0 = self.d0(torch.cat((F.interpolate(d1, size=e0.shape[2:], mode="trilinear", align_corners=False), e0), 1))
        return self.out(d0)


def train(steps, out, remap=0.8):
    S = "/work/shared/data"
    files = sorted(glob.glob(f"{S}/synthseg_brain/sub-*_T1w.nii.gz")) + sorted(glob.glob(f"{S}/neurite_brain_aseg/*_image.nii.gz")) \
        + [f"{S}/totalsegmentator_ct/ct_image.nii.gz"]
    vols = [prepare_volume(read_image(f), 2.0, (1.0, 99.0)) for f in files]
    groups = [0] * 20 + [1, 1] + [2]
    cfg = EmbeddingTrainConfig(remap_prob=remap, crop=48)
    rng = np.random.default_rng(0); torch.manual_seed(0)
    net = SynthNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    t0 = time.time(); hist = []
    for it in range(steps):
        xs, ys = [], []
        for _ in range(4):
            g = [0, 0, 0, 1, 2][int(rng.integers(0, 5))]  # brains mostly
            members = [i for i, gg in enumerate(groups) if gg == g]
            vol = vols[members[int(rng.integers(0, len(members)))]]
            c = _foreground_points(vol, rng, 1)[0]
            gr = _view_grid(vol.grid, c, 48, 2.0 * float(rng.uniform(0.9, 1.1)))
            clean = resample_to_grid(vol, gr, "linear", float(vol.data.min())).data
            src = clean
            if INVERT and rng.uniform() < 0.3:  # inverted contrast (T2-like) before the usual augmentation
                lo = float(vol.data.min()); fgm = clean > lo + 0.02
                src = torch.where(fgm, 1.0 - clean.clamp(0, 1), clean)
            xs.append(_augment(src, cfg, rng)[None]); ys.append(clean[None])
        x = torch.stack(xs); y = torch.stack(ys)
        pred = net(x)
        fg = (y > 0.02).float()
        loss = ((pred - y).abs() * (0.1 + fg)).sum() / (0.1 * fg.numel() + fg.sum())
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        hist.append(float(loss.detach()))
        if (it + 1) % 50 == 0:
            print(f"{it+1} loss {np.mean(hist[-50:]):.4f} {time.time()-t0:.0f}s", flush=True)
            torch.save(net.state_dict(), out)
    torch.save(net.state_dict(), out)


# ------------------------------------------------------------------------------------------- evaluation
WM = {2, 41, 7, 46, 16, 28, 60}
CSF = {4, 43, 5, 44, 14, 15, 24}
DEEP = {10, 49, 11, 50, 12, 51, 13, 52, 26, 58}
D = "/work/shared/data/synthseg_brain"


def t2_like(img, lab, seed):
    """The anatomy of ``lab`` (on img's grid) rendered T2-like: CSF 1.0, cortex 0.6, deep grey 0.45, WM 0.3."""
    import SimpleITK as sitk
    from regcli.spaces.image import Image

    g = torch.Generator().manual_seed(seed)
    L = lab.data.long()
    out = torch.zeros(L.shape)
    for v in torch.unique(L).tolist():
        if v:
            out[L == v] = 1.0 if v in CSF else 0.30 if v in WM else 0.45 if v in DEEP else 0.6
    out = out + 0.03 * torch.randn(out.shape, generator=g) * (L > 0)
    s = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(out.numpy()), 0.6)
    return Image(torch.from_numpy(sitk.GetArrayFromImage(s)).clamp(0) * 200, img.grid, img.name + "_t2")


def evaluate(ckpt, variants, pairs, mode):
    import regcli.methods.convexadam as ca
    from regcli.config import build_config
    from regcli.models.embedding import normalise_intensity
    from synthseg_pairs import read_pair, score

    net = SynthNet()
    if ckpt != "none":
        net.load_state_dict(torch.load(ckpt))
    net.eval()
    plain = ca._standardised

    def learned(d):  # the network's output for the image, standardised as the intensities are
        with torch.no_grad():
            y = net(normalise_intensity(d, (1.0, 99.0))[None, None].float())[0, 0].to(d.dtype)
        return plain(y)

    def load(f, m):  # the pair, its moving image rendered T2-like in mode "t2"
        fx, mv, fl, ml = read_pair(f, m)
        return [fx, t2_like(mv, ml, m) if mode == "t2" else mv, fl, ml]

    cache = {}
    for name, over in variants.items():
        over = dict(over)
        ca._standardised = learned if over.pop("_synth", False) else plain
        ds, ts = score(build_config(None, dict(over, html_report=False)), pairs, cache, load)
        print(f"{mode} {name:24s} " + " ".join(f"{x:.4f}" for x in ds)
              + f"  mean {sum(ds) / len(ds):.4f}  sec {sum(ts) / len(ts):.1f}", flush=True)
    ca._standardised = plain


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1] == "train":
        train(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.8)
    else:
        evaluate(sys.argv[2], json.loads(sys.argv[3]), [tuple(map(int, p.split(","))) for p in sys.argv[4].split(";")],
                 sys.argv[5] if len(sys.argv) > 5 else "t1")
