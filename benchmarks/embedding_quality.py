"""Label-free quality of an anatomical embedding: nearest-neighbour matching between two augmented views.

For each volume, view pairs are cut as in training (regcli.training.embedding.make_view_pair, fixed seed);
a drawn point is matched to the drawn point of the other view with the most similar embedding, and the
match counts when it lies within the tolerance (local head: 6 mm, global head: 16 mm) of the true point.
Chance level is roughly the fraction of drawn points within the tolerance of any given one.

    .venv/bin/python benchmarks/embedding_quality.py results/embedding_v0/checkpoint.pt
    .venv/bin/python benchmarks/embedding_quality.py random            # an untrained network, same seed
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

torch.set_num_threads(2)
from regcli.io.images import read_image  # noqa: E402
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet  # noqa: E402
from regcli.training.embedding import EmbeddingTrainConfig, match_accuracy, prepare_volume  # noqa: E402

D = os.environ.get("REGCLI_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
VOLUMES = {
    "synthseg sub-19 (T1w brain)": "synthseg_brain/sub-19_T1w.nii.gz",
    "neurite subjB (T1w brain)": "neurite_brain_aseg/subjB_l2r_image.nii.gz",
    "totalsegmentator (CT abdomen)": "totalsegmentator_ct/ct_image.nii.gz",
}

spec = sys.argv[1] if len(sys.argv) > 1 else "random"
if spec == "random":
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig())
else:
    from regcli.training.jobs import load_checkpoint

    net = load_checkpoint(spec)
cfg = EmbeddingTrainConfig(crop=48, points=256, remap_prob=0.0)
print(f"| volume | local ≤ 6 mm | global ≤ 16 mm |  ({spec})")
print("|---|---|---|")
for name, rel in VOLUMES.items():
    vol = prepare_volume(read_image(os.path.join(D, rel)), net.cfg.spacing_mm, net.cfg.percentiles)
    loc = match_accuracy(net, vol, cfg, pairs=6, seed=7, head="local", tolerance_mm=6.0)
    glo = match_accuracy(net, vol, cfg, pairs=6, seed=7, head="global", tolerance_mm=16.0)
    print(f"| {name} | {loc:.3f} | {glo:.3f} |", flush=True)
