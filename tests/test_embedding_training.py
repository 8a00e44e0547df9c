"""Self-supervised embedding training (regcli.training.embedding): exact correspondences, loss, learning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pydantic import ValidationError

from conftest import make_phantom
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet
from regcli.resample import sample_at_world
from regcli.spaces.grid import Grid
from regcli.spaces.image import Image
from regcli.training.embedding import (
    EmbeddingTrainConfig, info_nce, make_view_pair, match_accuracy, prepare_volume, train_embedding,
)

SMALL = EmbeddingConfig(widths=(4, 8, 8, 12), global_dim=8, local_dim=8, context_dilations=(1, 2), spacing_mm=1.5)


def _volume(direction="oblique15", size=(44, 40, 36)):
    img = make_phantom(direction, "iso", size=size)
    im = Image(torch.from_numpy(sitk.GetArrayFromImage(img).astype(np.float32)), Grid.from_sitk(img))
    return prepare_volume(im, SMALL.spacing_mm, SMALL.percentiles)


def test_view_pairs_share_exact_world_correspondences():
    vol = _volume()
    cfg = EmbeddingTrainConfig(crop=20, points=32, max_shift_mm=8.0, noise_max=0.0, gamma_range=(1.0, 1.0),
                               remap_prob=0.0)
    rng = np.random.default_rng(0)
    a, b, pts = make_view_pair(vol, cfg, SMALL.spacing_mm, rng)
    p = torch.as_tensor(pts)
    # without noise/gamma, the views are affine intensity maps of the same volume: the values at the drawn
    # points, once the per-view contrast/offset is undone, agree with the volume itself
    va = sample_at_world(a.image[0], a.grid, p, "bilinear", "border")
    vb = sample_at_world(b.image[0], b.grid, p, "bilinear", "border")
    v = sample_at_world(vol.data, vol.grid, p, "bilinear", "border")
    for w in (va, vb):
        A = torch.stack((v, torch.ones_like(v)), 1).double()
        coef = torch.linalg.lstsq(A, w.double()[:, None]).solution
        resid = (A @ coef)[:, 0] - w.double()
        assert float(resid.abs().max()) < 0.05 * float(v.abs().max()), float(resid.abs().max())


def test_info_nce_prefers_matching_embeddings():
    torch.manual_seed(0)
    pts = torch.rand(40, 3) * 100
    q = torch.nn.functional.normalize(torch.randn(40, 64), dim=1)
    good = info_nce(q, q, pts, 0.1, 5.0, 16)
    bad = info_nce(q, q[torch.randperm(40)], pts, 0.1, 5.0, 16)
    assert float(good) < 0.1 < float(bad)
    # a negative closer than exclude_mm is ignored: duplicating a point's embedding there costs nothing
    pts2 = pts.clone()
    pts2[1] = pts2[0] + 1.0
    q2 = q.clone()
    q2[1] = q2[0]
    assert float(info_nce(q2, q2, pts2, 0.1, 5.0, 16)) < 0.1


def test_training_lowers_the_loss_and_improves_matching():
    vol = _volume()
    cfg = EmbeddingTrainConfig(iterations=30, batch_pairs=2, crop=20, points=64, max_shift_mm=10.0,
                               hard_negatives=32, exclude_mm=(8.0, 3.0), learning_rate=3e-3, seed=1)
    torch.manual_seed(0)
    net = EmbeddingNet(SMALL)
    before = match_accuracy(net, vol, cfg, pairs=3, tolerance_mm=4.5)
    res = train_embedding([vol], cfg, net=net)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    after = match_accuracy(res.net, vol, cfg, pairs=3, tolerance_mm=4.5)
    assert after > before, (before, after)


def test_stop_after_is_the_same_run_cut_short():
    """``stop_after`` ends a run early on the full run's schedule: the steps it takes are bit-identical (loss and
    learning rate) to the first steps of the uncut run, so a recipe stopped on purpose reproduces exactly."""
    vol = _volume()
    base = dict(iterations=8, batch_pairs=1, crop=16, points=32, max_shift_mm=8.0, hard_negatives=16,
                exclude_mm=(8.0, 3.0), seed=4)
    torch.manual_seed(0)
    full = train_embedding([vol], EmbeddingTrainConfig(**base), net=EmbeddingNet(SMALL))
    torch.manual_seed(0)
    cut = train_embedding([vol], EmbeddingTrainConfig(**base, stop_after=3), net=EmbeddingNet(SMALL))
    assert len(full.history) == 8 and len(cut.history) == 3
    assert cut.history == full.history[:3]
    assert cut.history[-1]["lr"] > full.history[-1]["lr"]  # still early on the 8-step cosine schedule


def test_volume_sampler_by_source_balances_sources():
    """sampling "source": a source of one volume is drawn as often as a source of 20; "volume" keeps the
    single rng.integers draw per pick of the first recipes (their runs stay reproducible)."""
    from regcli.training.embedding import volume_sampler

    groups = [0] * 20 + [1] * 2 + [2]
    draw = volume_sampler(23, "source", groups, np.random.default_rng(0))
    picks = np.array([draw() for _ in range(6000)])
    per_source = np.bincount(np.asarray(groups)[picks], minlength=3) / len(picks)
    assert np.allclose(per_source, 1 / 3, atol=0.03)
    assert set(picks[np.asarray(groups)[picks] == 0]) == set(range(20))  # every volume of a source is used
    old = volume_sampler(23, "volume", None, np.random.default_rng(5))
    ref = np.random.default_rng(5)
    assert [old() for _ in range(50)] == [int(ref.integers(0, 23)) for _ in range(50)]


def test_a_run_resumed_with_more_iterations_follows_the_longer_schedule():
    """A 4-step run resumed with iterations 8 takes steps 5-8 at the learning rates of a straight 8-step run (bit
    for bit), decaying to the same end: the cosine is not restarted with the old length. Resumed with the same
    iterations (stop_after), a run is the straight run, bit for bit."""
    vol = _volume()
    base = dict(batch_pairs=1, crop=16, points=32, max_shift_mm=8.0, hard_negatives=16, exclude_mm=(8.0, 3.0), seed=2)
    states = {}  # step -> (training state, network weights), as a checkpoint holds them

    def run(resume=None, **kw):
        torch.manual_seed(0)
        net = EmbeddingNet(SMALL)
        if resume is not None:
            net.load_state_dict(resume[1])
        return train_embedding([vol], EmbeddingTrainConfig(**base, **kw), net=net,
                               resume=None if resume is None else resume[0],
                               save=lambda step, st: states.__setitem__(step, copy.deepcopy((st, net.state_dict()))))

    straight = run(iterations=8).history
    first = run(iterations=4).history
    assert [h["lr"] for h in first] != [h["lr"] for h in straight[:4]]  # the 4-step schedule decays faster
    extended = run(resume=states[4], iterations=8).history
    assert len(extended) == 8 and extended[:4] == first
    assert [h["lr"] for h in extended[4:]] == [h["lr"] for h in straight[4:]]
    assert extended[-1]["lr"] == straight[-1]["lr"] == pytest.approx(0.05 * 1e-3)
    assert all(a["lr"] > b["lr"] for a, b in zip(extended[4:], extended[5:]))  # decays from step 5 on

    states.clear()
    run(iterations=8, stop_after=3)
    assert run(resume=states[3], iterations=8).history == straight


def test_advance_schedule_is_the_straight_schedule():
    """The replayed schedule gives the rates a straight run has (PyTorch's cosine computes each from the last)."""
    from regcli.training.embedding import advance_schedule, cosine_schedule

    cfg = EmbeddingTrainConfig(iterations=50, learning_rate=3e-3)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p], lr=cfg.learning_rate)
    sched = cosine_schedule(opt, cfg)
    rates = []
    for _ in range(50):
        opt.step()
        sched.step()
        rates.append(sched.get_last_lr()[0])
    for step in (1, 17, 49):
        opt2 = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
        sched2 = cosine_schedule(opt2, cfg)
        advance_schedule(sched2, cfg, step)
        assert opt2.param_groups[0]["lr"] == rates[step - 1]
        opt2.step()
        sched2.step()
        assert sched2.get_last_lr()[0] == rates[step]


@pytest.mark.parametrize("bad", [{"scale_range": (1.25, 0.8)}, {"scale_range": (-1, 0.5)}, {"scale_range": (0, 1)},
                                 {"gamma_range": (0, 1.5)}, {"gamma_range": (1.5, 0.7)}, {"exclude_mm": (-1, 4)},
                                 {"iterations": True}, {"hard_negatives": True}, {"batch_pairs": 2.0}, {"seed": "1"}])
def test_out_of_range_recipe_values_are_refused(bad):
    """Ranges need 0 < low <= high (a reversed or non-positive range crashed mid-run), counts are integers (a
    YAML `true` is not 1)."""
    with pytest.raises(ValidationError, match=next(iter(bad))):
        EmbeddingTrainConfig(**bad)
    EmbeddingTrainConfig(scale_range=(1.0, 1.0), gamma_range=(1.0, 1.0), exclude_mm=(0, 0), iterations=3)


SHARED_IMAGES = [("synthseg_brain", "sub-01_T1w.nii.gz"), ("synthseg_brain", "sub-02_T1w.nii.gz"),
                 ("neurite_brain_aseg", "subjA_vxm_image.nii.gz"), ("totalsegmentator_ct", "ct_image.nii.gz"),
                 ("deepreg_prostate_mrus", "case000_fixed_image.nii.gz"),
                 ("deepreg_prostate_mrus", "case000_moving_image.nii.gz")]
SHARED_LABELS = [("synthseg_brain", "sub-01_labels.nii.gz"), ("neurite_brain_aseg", "subjA_vxm_labels.nii.gz"),
                 ("totalsegmentator_ct", "ct_labels_total.nii.gz"),
                 ("deepreg_prostate_mrus", "case000_fixed_gland.nii.gz")]


@pytest.mark.parametrize("parts", SHARED_IMAGES + SHARED_LABELS, ids=lambda p: p[1])
def test_label_maps_are_told_from_real_images(parts):
    """regcli.training.jobs.label_map_values on the shared data: uint8 and float MR, int16 CT and ultrasound are
    images; their label maps (2 to 46 labels) are not."""
    from conftest import shared_file
    from regcli.io.images import read_image
    from regcli.training.jobs import label_map_values

    n = label_map_values(read_image(shared_file(*parts)).data)
    assert (n is not None) == (parts in SHARED_LABELS), (parts, n)


def test_label_maps_are_told_from_synthetic_images():
    """Floats, the same phantom stored as integers (uint8 0-255, CT-like -1000..0) and an image of few integer
    levels above the threshold are images; integer maps of up to LABEL_MAP_MAX_VALUES values are label maps."""
    from conftest import phantom_labels
    from regcli.training.jobs import LABEL_MAP_MAX_VALUES, label_map_values

    ph = make_phantom("oblique15", "aniso")
    arr = torch.from_numpy(sitk.GetArrayFromImage(ph).astype(np.float32))
    for image in (arr, torch.round(arr * 255), torch.round(arr * 1000 - 1000), arr.to(torch.float64)):
        assert label_map_values(image) is None
    assert label_map_values(torch.from_numpy(sitk.GetArrayFromImage(phantom_labels(ph)).astype(np.float32))) == 4
    levels = torch.arange(48 ** 3, dtype=torch.float32).reshape(48, 48, 48)
    assert label_map_values(levels % LABEL_MAP_MAX_VALUES) == LABEL_MAP_MAX_VALUES
    assert label_map_values(levels % (LABEL_MAP_MAX_VALUES + 1)) is None
    assert label_map_values(levels % 5 + 0.5) is None  # few values, but not integers
