"""The uniGradICON-compatible network: official layout, checkpoint import, and the reference implementation.

The oracle test needs the reference packages, installed without their heavy dependencies (torchvision would
pull another torch build):

    pip install --no-deps icon_registration==1.1.9 unigradicon==1.0.6 && pip install itk tqdm
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import invoke, one_line, random_state
from regcli.models.gradicon import (
    OFFICIAL_PARAMETERS, OFFICIAL_PREFIXES, OFFICIAL_TENSORS, GradICONConfig, GradICONNet, identity_map,
    min_input_size, parameter_count, sample,
)

SMALL = GradICONConfig(input_shape=(40, 36, 34), down_channels=(4, 8, 8, 16), up_channels=(4, 4, 8, 8))


def test_state_dict_has_the_official_layout():
    net = GradICONNet()
    sd = net.state_dict()
    assert len(sd) == OFFICIAL_TENSORS == 188
    assert parameter_count(net) == OFFICIAL_PARAMETERS == 70_680_916
    for prefix in OFFICIAL_PREFIXES:
        names = [k for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0] in
                 ("downConvs", "upConvs", "batchNorms", "lastConv")]
        assert len(names) == 47, prefix
    assert sd["netPsi.net.downConvs.0.weight"].shape == (16, 2, 3, 3, 3)
    assert sd["netPsi.net.upConvs.4.weight"].shape == (512, 256, 4, 4, 4)
    assert sd["netPsi.net.lastConv.weight"].shape == (3, 18, 3, 3, 3)
    assert len(GradICONNet(GradICONConfig(last_step=False)).state_dict()) == 3 * 47


def test_untrained_network_is_the_identity_and_maps_compose_in_unit_coordinates():
    torch.manual_seed(0)
    net = GradICONNet(SMALL).eval()
    a, b = torch.rand(2, 1, 1, *SMALL.input_shape)
    with torch.no_grad():
        assert net.displacement(a, b).abs().max() == 0  # zero-initialised last convolutions
    ident = identity_map(SMALL.input_shape)
    assert ident[0, :, 0, 0, 0].tolist() == [0, 0, 0] and ident[0, :, -1, -1, -1].tolist() == [1, 1, 1]
    assert torch.allclose(sample(a, ident), a, atol=1e-5)
    # a map shifted by one voxel along tensor axis 2 (X) samples the neighbouring voxel
    shifted = ident.clone()
    shifted[:, 2] += 1 / (SMALL.input_shape[2] - 1)
    assert torch.allclose(sample(a, shifted)[..., :-1], a[..., 1:], atol=1e-5)
    with pytest.raises(ValueError, match="expects two images of shape"):
        net.displacement(a[..., :-1], b[..., :-1])


def test_config_rejects_grids_too_small_for_the_pyramid():
    assert min_input_size(5) == 65  # 65 -> 33 -> 17 voxels; 17 -> 9 -> 5 -> 3 -> 2 in the coarsest U-Net
    with pytest.raises(ValueError, match="at least 65 voxels"):
        GradICONConfig(input_shape=(64, 80, 80))
    GradICONConfig(input_shape=(33, 33, 33), down_channels=(4, 8, 8, 16), up_channels=(4, 4, 8, 8))


@pytest.mark.slow
def test_weights_import_round_trips_an_official_layout_checkpoint(tmp_path):
    from regcli.models.gradicon import gradicon_from
    from regcli.weights import resolve

    sd = random_state(GradICONNet().state_dict(), seed=3)
    ckpt = tmp_path / "Step_2_final.trch"
    torch.save(sd, ckpt)
    out = tmp_path / "unigradicon"
    res = invoke(*["weights", "import", "unigradicon", str(ckpt), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["tensors"] == 188 and summary["parameters"] == 70_680_916
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "gradicon-multistep" and cfg["source"]["kind"] == "unigradicon"
    assert cfg["net"]["input_shape"] == [175, 175, 175]
    net = gradicon_from(resolve(str(out)))
    back = net.state_dict()
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    # the folder is not overwritten by accident; wrong files are one-line errors with their exit codes
    res = invoke(*["weights", "import", "unigradicon", str(ckpt), "-o", str(out)])
    assert res.exit_code == 6 and "--overwrite" in res.stderr
    bad = dict(sd)
    bad.pop("netPsi.net.lastConv.bias")
    bad["head.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "other.trch")
    res = invoke(*["weights", "import", "unigradicon", str(tmp_path / "other.trch"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 8 and "1 missing (e.g. netPsi.net.lastConv.bias); 1 unexpected" in res.stderr
    one_line(res.stderr)
    assert not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    res = invoke(*["weights", "import", "unigradicon", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 8 and "not a plain PyTorch state_dict file" in res.stderr
    res = invoke(*["weights", "import", "voxelmorph", str(ckpt), "-o", str(tmp_path / "x")])
    assert res.exit_code == 7


@pytest.mark.oracle
def test_matches_the_reference_unigradicon_network():
    """Same random weights in the reference implementation and in regcli: the same maps, within 1e-5."""
    unigradicon = pytest.importorskip("unigradicon", reason="reference package unigradicon not installed")
    n = 65  # the smallest grid the reference runs (see min_input_size); the weights do not depend on it
    theirs = unigradicon.make_network([1, 1, n, n, n], include_last_step=True)
    sd = random_state(theirs.regis_net.state_dict(), seed=7)
    theirs.regis_net.load_state_dict(sd)
    theirs.eval()
    ours = GradICONNet(GradICONConfig(input_shape=(n, n, n)))
    ours.load_state_dict(sd)
    ours.eval()
    g = torch.Generator().manual_seed(8)
    a = torch.rand(1, 1, n, n, n, generator=g)
    b = torch.rand(1, 1, n, n, n, generator=g)
    with torch.no_grad():
        ident = theirs.identity_map
        ident.isIdentity = True
        for x, y in ((a, b), (b, a)):  # both directions: phi_AB and phi_BA
            ref = theirs.regis_net(x, y)(ident) - ident
            mine = ours.displacement(x, y)
            assert ref.abs().max() > 0.01  # the random network moves voxels by about a voxel or more
            assert (ref - mine).abs().max() < 1e-5
