"""Dataset manifests (regcli.manifest): one format for training jobs, regcli evaluate and regcli batch."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import invoke, make_phantom, one_line, phantom_labels, write
from regcli.errors import ConfigError, InputError
from regcli.manifest import Dataset, is_dataset_manifest, load_datasets, select, weighted_counts


def test_a_dataset_needs_images_and_is_named_after_its_folder():
    d = Dataset(glob="/data/synthseg_brain/sub-*_T1w.nii.gz")
    assert d.name == "synthseg_brain" and d.task_name == "synthseg_brain" and d.weight == 1.0
    assert Dataset(name="b", task="brain", pairs="x/pairs.csv").task_name == "brain"
    with pytest.raises(ValueError, match="needs a glob of images or a pairs CSV"):
        Dataset(name="empty")
    with pytest.raises(ValueError):
        Dataset(glob="a/*.nii.gz", weight=0)


def test_yaml_and_csv_manifests_resolve_paths_and_parse_fields(tmp_path):
    (tmp_path / "m.yaml").write_text("datasets:\n  - {name: brain, glob: brain/*.nii.gz, label_ids: [2, 3], "
                                     "weight: 2}\n  - {pairs: ct/pairs.csv, modality: ct, task: abdomen}\n")
    a, b = load_datasets(tmp_path / "m.yaml")
    assert a.glob == str(tmp_path / "brain/*.nii.gz") and a.label_ids == (2, 3) and a.weight == 2
    assert b.name == "ct" and b.task_name == "abdomen" and b.pairs == str(tmp_path / "ct/pairs.csv")
    (tmp_path / "m.csv").write_text("name,glob,labels_replace,percentiles,label_ids\n"
                                    "brain,brain/*.nii.gz,_T1w->_seg,0.5;99.5,1;4\n")
    (c,) = load_datasets(tmp_path / "m.csv")
    assert c.labels_replace == ("_T1w", "_seg") and c.percentiles == (0.5, 99.5) and c.label_ids == (1, 4)
    assert is_dataset_manifest(tmp_path / "m.csv") and is_dataset_manifest(tmp_path / "m.yaml")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "m.csv").read_bytes())  # Excel "CSV UTF-8"
    assert is_dataset_manifest(tmp_path / "bom.csv") and load_datasets(tmp_path / "bom.csv") == [c]
    (tmp_path / "p.csv").write_text("fixed_image,moving_image\na,b\n")
    assert not is_dataset_manifest(tmp_path / "p.csv")
    (tmp_path / "bad.yaml").write_text("datasets:\n  - {name: x, glob: a, colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        load_datasets(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="does not exist"):
        load_datasets(tmp_path / "none.yaml")
    assert [d.name for d in select([a, b], exclude=["abdomen"])] == ["brain"]
    with pytest.raises(ConfigError, match="unknown task 'lung'"):
        select([a, b], tasks=["lung"])


def test_weights_set_how_often_each_dataset_is_drawn():
    from regcli.training.embedding import volume_sampler
    from regcli.training.pairs import epoch_order

    assert weighted_counts([1.0, 0.5, 2.0], 4) == [4, 2, 8]
    order = epoch_order(3, 4, torch.Generator().manual_seed(0), [1.0, 0.5, 2.0])
    assert Counter(order) == {0: 4, 1: 2, 2: 8}
    same = epoch_order(3, 4, torch.Generator().manual_seed(0), [1.0, 1.0, 1.0])
    assert same == epoch_order(3, 4, torch.Generator().manual_seed(0))  # equal weights: the draws of before
    draw = volume_sampler(4, "source", [0, 0, 1, 1], np.random.default_rng(0), weights=[3.0, 1.0])
    freq = Counter(draw() < 2 for _ in range(4000))
    assert 0.72 < freq[True] / 4000 < 0.78


def test_a_training_job_may_name_a_manifest_file(tmp_path):
    from regcli.training.foundation import load_foundation_job

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "datasets.yaml").write_text("- {name: brain, glob: brain/sub-*.nii.gz}\n"
                                                     "- {name: pro, pairs: pro/pairs.csv, align: none}\n")
    net = "net: {input_shape: [36, 36, 36], down_channels: [4, 8, 8, 16], up_channels: [4, 4, 8, 8]}\n"
    (tmp_path / "job.yaml").write_text("data: data/datasets.yaml\n" + net)
    (tmp_path / "inline.yaml").write_text("data:\n  - {name: brain, glob: data/brain/sub-*.nii.gz}\n"
                                          "  - {name: pro, pairs: data/pro/pairs.csv, align: none}\n"
                                          + net)
    assert load_foundation_job(tmp_path / "job.yaml") == load_foundation_job(tmp_path / "inline.yaml")
    (tmp_path / "emb.yaml").write_text("data: data/datasets.yaml\n")
    from regcli.training.jobs import load_job

    with pytest.raises(ConfigError, match="dataset 'pro' has none"):  # the embedding reads image globs only
        load_job(tmp_path / "emb.yaml")


def _two_datasets(tmp_path):
    """Two 'datasets' of phantom pairs (brain: 2 pairs, ct: 1 pair) and a manifest naming both."""
    for ds, shifts in (("brain", ([2.0, -1.5, 1.0], [-1.0, 2.0, 0.5])), ("ct", ([1.5, 1.0, -2.0],))):
        d = tmp_path / ds
        d.mkdir()
        f = make_phantom("LPS", "iso", size=(32, 32, 32))
        write(f, d / "f.nii.gz")
        write(phantom_labels(f), d / "fl.nii.gz")
        rows = ["fixed_image,moving_image,fixed_labels,moving_labels"]
        for i, s in enumerate(shifts):
            m = make_phantom("LPS", "iso", size=(32, 32, 32), transform=lambda p, s=np.array(s): p + s)
            write(m, d / f"m{i}.nii.gz")
            write(phantom_labels(m), d / f"ml{i}.nii.gz")
            rows.append(f"f.nii.gz,m{i}.nii.gz,fl.nii.gz,ml{i}.nii.gz")
        (d / "pairs.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "datasets.yaml").write_text("datasets:\n  - {name: brain, pairs: brain/pairs.csv, label_ids: [1, 2]}\n"
                                            "  - {name: ct, pairs: ct/pairs.csv, modality: ct, align: none}\n")
    return tmp_path / "datasets.yaml"


def test_evaluate_a_dataset_manifest_by_task(tmp_path):
    manifest = _two_datasets(tmp_path)
    res = invoke("evaluate", manifest, "-o", tmp_path / "all", "--method", "affine", "--affine-metric", "mse",
                 "--no-hd95", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [r["pair"] for r in d["pairs"]] == ["brain_pair001", "brain_pair002", "ct_pair001"]
    assert [r["task"] for r in d["pairs"]] == ["brain", "brain", "ct"]
    assert set(d["summary_by_task"]) == {"brain", "ct"} and d["summary_by_task"]["brain"]["dice_mean"]["n"] == 2
    assert all(set(r["dice_per_label"]) == {"1", "2"} for r in d["pairs"][:2])  # label_ids
    assert len(d["pairs"][2]["dice_per_label"]) == 3  # every shared label
    assert "task" in (tmp_path / "all" / "evaluation.csv").read_text().splitlines()[0]
    # each dataset's pairs are registered without the affine stage for align: none; its modality goes only to the
    # network methods (foundation, promptreg), which read it: --method affine gets the default
    ct = json.loads((tmp_path / "all" / "ct_pair001_Report.json").read_text())["config"]
    brain = json.loads((tmp_path / "all" / "brain_pair001_Report.json").read_text())["config"]
    assert (ct["foundation"]["modality"], ct["affine"]["enabled"]) == ("mri", False)
    assert (brain["foundation"]["modality"], brain["affine"]["enabled"]) == ("mri", True)
    # the selection, scoring the transforms registered above (no register child needed to see which pairs run)
    res = invoke("evaluate", manifest, "-o", tmp_path / "wo", "--transforms-from", str(tmp_path / "all" / "{pair}_"),
                 "--exclude-task", "brain", "--no-hd95", "--json")
    assert [r["pair"] for r in json.loads(res.stdout)["pairs"]] == ["ct_pair001"]
    res = invoke("evaluate", manifest, "-o", tmp_path / "x", "--task", "lung")
    assert res.exit_code == 7 and "unknown task 'lung'" in res.stderr
    res = invoke("batch", manifest, "-o", tmp_path / "b", "--method", "affine", "--task", "ct", "--json")
    assert res.exit_code == 0 and [r["pair"] for r in json.loads(res.stdout)["pairs"]] == ["ct_pair001"]


def test_dataset_percentiles_and_labels_replace_are_checked(tmp_path):
    """percentiles [99, 1] (or outside 0..100) inverted the intensities and crashed training mid-run; an empty
    labels_replace source would insert the replacement between every character of a path: both are refused
    when the manifest is read, naming the dataset."""
    Dataset(glob="a/*.nii.gz", percentiles=(0, 100))
    for bad in ((99, 1), (5, 5), (-1, 99), (1, 101)):
        with pytest.raises(ValueError, match="dataset 'a': percentiles must be"):
            Dataset(glob="/d/a/*.nii.gz", percentiles=bad)
    with pytest.raises(ValueError, match="labels_replace"):
        Dataset(glob="a/*.nii.gz", labels_replace=("", "_labels"))
    (tmp_path / "m.yaml").write_text("datasets:\n  - {name: brain, glob: b/*.nii.gz, percentiles: [99, 1]}\n")
    with pytest.raises(ConfigError, match="invalid dataset manifest .*brain.*percentiles"):
        load_datasets(tmp_path / "m.yaml")


def test_duplicate_dataset_or_pair_names_are_refused_up_front(tmp_path):
    """Two datasets whose pairs.csv both sit in folders named data/ were both named 'data', so their pairs were
    both 'data_pair001': batch "resumed" the second from the first's outputs (exit 0, wrong rows)."""
    for sub in ("A/data", "B/data", "a", "a_b"):
        d = tmp_path / sub
        d.mkdir(parents=True)
        for name in ("f.nii.gz", "m.nii.gz"):
            (d / name).write_bytes(b"")
        (d / "pairs.csv").write_text("pair,fixed_image,moving_image\n" + ("b_c" if sub == "a" else "c")
                                     + ",f.nii.gz,m.nii.gz\n")
    (tmp_path / "ds.yaml").write_text("datasets:\n  - {pairs: A/data/pairs.csv, task: brain}\n"
                                      "  - {pairs: B/data/pairs.csv, task: ct}\n")
    for sub in ("evaluate", "batch"):
        res = invoke(sub, tmp_path / "ds.yaml", "-o", tmp_path / sub, "--method", "affine")
        msg = one_line(res.stderr)
        assert res.exit_code == 3 and "two datasets are named 'data'" in msg and str(tmp_path / "ds.yaml") in msg
        assert not (tmp_path / sub).exists()
    (tmp_path / "ds2.yaml").write_text("datasets:\n  - {name: a, pairs: a/pairs.csv}\n"
                                       "  - {name: a_b, pairs: a_b/pairs.csv}\n")
    from regcli.evaluation import read_pairs

    with pytest.raises(InputError, match="ds2.yaml': dataset 'a_b': duplicate pair name 'a_b_c'"):
        read_pairs(tmp_path / "ds2.yaml")


def test_a_malformed_dataset_csv_is_one_line(tmp_path):
    """An extra field or a non-UTF-8 dataset manifest CSV crashed (exit 1); a repeated column was accepted."""
    for content, message in ((b"pairs,task\nA/pairs.csv,brain,extra\n", "line 2: more fields than the header has"),
                             (b"pairs,task\nA/pairs.csv,c\xe9rebro\n", "line 2: not UTF-8 text"),
                             (b"pairs,task,pairs\nA/pairs.csv,brain,B/pairs.csv\n",
                              "line 1: column 'pairs' appears twice"),
                             (b"pairs,task,label_ids\n\nA/pairs.csv,brain,2;x\n",
                              "line 3: label_ids must be integers separated by ';', got '2;x'")):
        (tmp_path / "ds.csv").write_bytes(content)
        assert is_dataset_manifest(tmp_path / "ds.csv")
        with pytest.raises(InputError, match=f"dataset manifest '.*ds.csv' {message}"):
            load_datasets(tmp_path / "ds.csv")
        res = invoke("evaluate", tmp_path / "ds.csv", "-o", tmp_path / "ev")
        assert res.exit_code == 3 and message in one_line(res.stderr)
