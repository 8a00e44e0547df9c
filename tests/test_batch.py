"""``regcli batch``: a cohort registered in parallel (local pool or Ray), resumed after a kill, with a bad pair
isolated, and summarised (batch.csv/json, Dice per structure and runtime plots)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import child_env, invoke, make_phantom, phantom_labels, shared_file

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = ([2.0, -1.5, 1.0], [-1.0, 2.0, 0.5], [1.5, 1.0, -2.0], [0.0, -2.5, 1.5])
REGISTER = ["--method", "affine", "--affine-metric", "mse"]  # a second or two per pair


def _cohort(tmp_path: Path, n: int = 3, corrupt: bool = True) -> Path:
    """n phantom pairs (moving translated by SHIFTS[i]) with labels, plus a pair whose moving image is not an
    image file; the manifest's paths are relative to it."""
    d = tmp_path / "data"
    d.mkdir()
    f = make_phantom("LPS", "iso", size=(32, 32, 32))
    sitk.WriteImage(f, str(d / "f.nii.gz"))
    sitk.WriteImage(phantom_labels(f), str(d / "fl.nii.gz"))
    rows = []
    for i in range(n):
        m = make_phantom("LPS", "iso", size=(32, 32, 32), transform=lambda p, s=SHIFTS[i]: p + np.array(s))
        sitk.WriteImage(m, str(d / f"m{i}.nii.gz"))
        sitk.WriteImage(phantom_labels(m), str(d / f"ml{i}.nii.gz"))
        rows.append({"pair": f"s{i}", "fixed_image": "f.nii.gz", "moving_image": f"m{i}.nii.gz",
                     "fixed_labels": "fl.nii.gz", "moving_labels": f"ml{i}.nii.gz"})
    if corrupt:
        (d / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        rows.append({"pair": "broken", "fixed_image": "f.nii.gz", "moving_image": "broken.nii.gz",
                     "fixed_labels": "fl.nii.gz", "moving_labels": "ml0.nii.gz"})
    path = d / "pairs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _reports(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*_Report.json")}


def test_batch_registers_scores_isolates_a_bad_pair_and_resumes(tmp_path):
    manifest = _cohort(tmp_path)
    out = tmp_path / "cohort"
    res = invoke("batch", manifest, "-o", out, *REGISTER, "--jobs", "2", "--threads", "1", "--json")
    assert res.exit_code == 3, res.output  # the bad pair's input error; the summary is still written
    d = json.loads(res.stdout)
    assert (d["n_pairs"], d["n_failed"], d["n_resumed"]) == (4, 1, 0)
    rows = {r["pair"]: r for r in d["pairs"]}
    assert [r["pair"] for r in d["pairs"]] == ["s0", "s1", "s2", "broken"]  # manifest order
    assert "broken.nii.gz" in rows["broken"]["error"] and rows["broken"]["status"] == "failed"
    for i in range(3):
        r = rows[f"s{i}"]
        assert r["status"] == "ok" and r["dice_mean"] > r["dice_initial_mean"] + 0.1 and r["dice_mean"] > 0.85
    for name in ("batch.csv", "batch.json", "batch_dice.png", "batch_runtime.png"):
        assert (out / name).stat().st_size > 0
    assert "broken" in (out / "batch.csv").read_text()
    assert not list(out.glob("broken_*"))  # no partial outputs for the failed pair

    # rerun: the three complete pairs are not registered again, their scores come from the cache
    before = _reports(out)
    res = invoke("batch", manifest, "-o", out, *REGISTER, "--jobs", "2", "--threads", "1", "--json")
    d2 = json.loads(res.stdout)
    assert res.exit_code == 3 and d2["n_resumed"] == 3 and d2["resumed"] == ["s0", "s1", "s2"]
    assert _reports(out) == before
    assert [r.get("dice_mean") for r in d2["pairs"][:3]] == [r.get("dice_mean") for r in d["pairs"][:3]]

    # a pair killed before its report was renamed (no report) is registered again, and only that one
    (out / "s1_Report.json").unlink()
    (out / "s2_Scores.json").unlink()  # scores lost: rescored from the transforms, not registered
    res = invoke("batch", manifest, "-o", out, *REGISTER, "--jobs", "2", "--threads", "1", "--json")
    d3 = json.loads(res.stdout)
    assert d3["resumed"] == ["s0", "s2"]
    after = _reports(out)
    assert after["s0_Report.json"] == before["s0_Report.json"] and after["s2_Report.json"] == before["s2_Report.json"]
    assert "s1_Report.json" in after
    assert d3["pairs"][2]["dice_mean"] == pytest.approx(d["pairs"][2]["dice_mean"])

    # other threads change no result: resumed; another option does: registered again, with that option
    res = invoke("batch", manifest, "-o", out, *REGISTER, "--jobs", "1", "--threads", "2", "--json")
    assert json.loads(res.stdout)["resumed"] == ["s0", "s1", "s2"]
    lncc = ["--method", "affine", "--affine-metric", "lncc", "--jobs", "2", "--threads", "1", "--json"]
    res = invoke("batch", manifest, "-o", out, *lncc)
    assert res.exit_code == 3 and json.loads(res.stdout)["n_resumed"] == 0
    assert all(json.loads((out / f"s{i}_Report.json").read_text())["config"]["affine"]["metric"] == "lncc"
               for i in range(3))

    # --no-resume with the options the outputs were made with (all three complete: a plain rerun resumes them)
    res = invoke("batch", manifest, "-o", out, *lncc, "--no-resume")
    assert json.loads(res.stdout)["n_resumed"] == 0


def test_batch_bad_arguments_are_one_line_errors(tmp_path):
    manifest = _cohort(tmp_path, n=1, corrupt=False)
    (tmp_path / "file").write_text("x")
    res = invoke("batch", manifest, "-o", tmp_path / "file")
    assert res.exit_code == 6 and "is a file" in res.stderr
    res = invoke("batch", tmp_path / "missing.csv", "-o", tmp_path / "o")
    assert res.exit_code != 0 and "missing.csv" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_process(manifest: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "regcli", "batch", str(manifest), "-o", str(out), "--json", "--quiet", *extra]
    env = child_env(REGCLI_NO_PROGRESS="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group: killed with its children


def _kill_after_first_pair(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not list(out.glob("*_Scores.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "no pair finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def _local_ray(cpus: int = 1):
    """A Ray cluster of our own with ``cpus`` CPUs, for the test's duration; yields its address.

    A small Python process starts it with ``ray.init`` and holds it until its stdin closes; the cluster ends
    with that process (and its process group is killed on the way out), so no other Ray on the machine is
    touched (``ray stop`` would stop them all)."""
    pytest.importorskip("ray", reason="ray not installed (pip install 'regcli[ray]')")
    code = ("import sys, ray; ctx = ray.init(num_cpus=%d, include_dashboard=False, log_to_driver=False); "
            "print(ctx.address_info['gcs_address'], flush=True); sys.stdin.read(); ray.shutdown()") % cpus
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = holder.stdout.readline().strip()
        assert address, "the local Ray cluster did not start"
        yield address
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()


def _kill_and_resume(manifest: Path, out: Path, n_good: int, extra: list[str], register: list[str]) -> dict:
    """Run the batch, SIGKILL it (and its children) after the first pair, rerun it; check that the rerun
    registered only the pairs that were not complete and that the corrupt pair failed alone."""
    proc = _batch_process(manifest, out, *register, *extra)
    _kill_after_first_pair(proc, out)
    done = {p.name[:-len("_Report.json")] for p in out.glob("*_Report.json")}
    assert 1 <= len(done) < n_good
    before = _reports(out)
    proc = _batch_process(manifest, out, *register, *extra)
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 3, stderr[-3000:]  # the corrupt pair
    d = json.loads(stdout)
    assert set(d["resumed"]) >= done and d["n_failed"] == 1
    assert [r["pair"] for r in d["pairs"] if r["status"] != "ok"] == ["broken"]
    ok = [r for r in d["pairs"] if r["status"] == "ok"]
    assert len(ok) == n_good and all(r["dice_mean"] > r["dice_initial_mean"] for r in ok)
    after = _reports(out)
    assert all(after[k] == v for k, v in before.items() if k[:-len("_Report.json")] in done)  # not redone
    assert len(after) == n_good
    return d


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_batch_killed_midway_finishes_only_the_missing_pairs(tmp_path, backend):
    """The cohort's driver (and its children) killed with SIGKILL after the first pair; the rerun registers only
    the pairs that were not complete. On Ray, the test starts a local Ray head and the batch joins it."""
    with (_local_ray() if backend == "ray" else nullcontext()) as address:
        extra = (["--backend", "ray", "--address", address, "--threads", "1"] if backend == "ray"
                 else ["--jobs", "1", "--threads", "1"])
        # two good pairs: one completes before the kill, the other is killed midway or not started
        d = _kill_and_resume(_cohort(tmp_path, n=2), tmp_path / "cohort", 2, extra, REGISTER)
        assert all(r["dice_mean"] > r["dice_initial_mean"] + 0.3 for r in d["pairs"] if r["status"] == "ok")
        if backend == "ray":  # a pair that asks for more CPUs than any node has: refused, not left waiting
            r = subprocess.run([sys.executable, "-m", "regcli", "batch", str(tmp_path / "data" / "pairs.csv"), "-o",
                                str(tmp_path / "more"), "--backend", "ray", "--address", address, "--threads", "4"],
                               capture_output=True, text=True, timeout=300,
                               env=child_env())
            assert r.returncode == 7 and "no node of the cluster has more than 1" in r.stderr


@pytest.mark.slow
@pytest.mark.shared
def test_batch_on_ray_over_the_synthseg_cohort(tmp_path):
    """Issue 6's check on real data: ../shared/data/synthseg_brain/pairs.csv (10 pairs, ConvexAdam defaults) plus
    a corrupt pair, on a local Ray started here; killed after the first pair and rerun."""
    pairs = shared_file("synthseg_brain", "pairs.csv")
    rows = list(csv.DictReader(pairs.open()))
    for i, r in enumerate(rows, start=1):
        r.update({**{k: str(pairs.parent / v) for k, v in r.items()}, "pair": f"pair{i:03d}"})
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    rows.append({**rows[0], "moving_image": str(tmp_path / "broken.nii.gz"), "pair": "broken"})
    manifest = tmp_path / "pairs.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with _local_ray(cpus=2) as address:
        t0 = time.time()
        d = _kill_and_resume(manifest, tmp_path / "cohort", len(rows) - 1,
                             ["--backend", "ray", "--address", address, "--threads", "2"], ["--no-hd95"])
        print(f"synthseg cohort on Ray: {len(rows) - 1} pairs + 1 corrupt, resumed {d['n_resumed']}, "
              f"Dice {d['summary']['dice_mean']['mean']:.3f}, {time.time() - t0:.0f} s in all")


def _with_masks(manifest: Path, fixed: int, moving: int) -> Path:
    """The manifest with fixed_mask/moving_mask columns, filled for the first ``fixed``/``moving`` pairs (an empty
    cell for the others); the mask is the phantom's foreground."""
    d = manifest.parent
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(d / "f.nii.gz")) > 0.5, sitk.sitkUInt8), str(d / "mask.nii.gz"))
    rows = list(csv.DictReader(manifest.open()))
    for i, r in enumerate(rows):
        r.update(fixed_mask="mask.nii.gz" if i < fixed else "", moving_mask="mask.nii.gz" if i < moving else "")
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


@pytest.mark.parametrize("command", ["evaluate", "batch"])
@pytest.mark.parametrize("case", ["masks", "affine masks", "prompts"])
def test_a_configuration_every_pair_would_refuse_is_refused_once_before_any_pair(tmp_path, monkeypatch, command,
                                                                                 case):
    """Masks that nothing in the configuration reads (ConvexAdam without its instance optimisation, or a linear
    method, with the affine stage off), or prompts no solver stage uses: every pair's register child would fail
    with the same ConfigError after its start-up. Refused once, up front: exit 7, one line naming the CSV column
    and how many pairs carry it (prompts: their configuration key, as neither command has a --prompt-labels
    flag), no registration started, no output folder."""
    from conftest import one_line

    manifest = _with_masks(_cohort(tmp_path, n=3, corrupt=False), fixed=2, moving=0 if case == "prompts" else 3)
    y = tmp_path / "c.yaml"
    y.write_text({"masks": "method: convexadam\ninstance: {enabled: false}\naffine: {enabled: false}\n",
                  "affine masks": "method: affine\naffine: {enabled: false}\n",
                  "prompts": "method: convexadam\ninstance: {enabled: false}\nprompts: {labels: all}\n"}[case])

    def no_child(*a, **k):
        raise AssertionError("a pair was registered")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = invoke(command, manifest, "-o", out, "--config", y, "--threads", "1")
    assert res.exit_code == 7, res.output
    line = one_line(res.stderr)
    assert time.perf_counter() - t0 < 20
    if case == "prompts":
        assert line.startswith("ConfigError: prompts (prompts.labels) join the objective of ") and \
            "runs none of them" in line and "--prompt" not in line
    else:
        assert line.startswith("ConfigError: CSV column fixed_mask (2 of 3 pair(s)) and CSV column moving_mask "
                               "(3 of 3 pair(s)): nothing in ") and "without the affine stage would use them" in line
    assert not out.exists()


def test_the_pre_check_follows_the_columns_the_pairs_fill_and_each_pairs_affine_stage(tmp_path):
    """check_config_for_pairs decides as each pair's child does (check_masks, check_prompts): a mask column empty
    for every pair, or masks the affine stage still reads (a warning in the child, not an error), pass; the pairs
    of a dataset with ``align: none`` (registered with --no-affine) are checked without the affine stage; the
    one-pair form of evaluate names the flag."""
    from regcli.config import build_config
    from regcli.errors import ConfigError
    from regcli.evaluation import Pair, check_config_for_pairs, read_pairs

    manifest = _with_masks(_cohort(tmp_path, n=3, corrupt=False), fixed=0, moving=0)
    pairs = read_pairs(manifest)
    assert all(p.fixed_mask is None and p.moving_mask is None for p in pairs)
    no_io = {"method": "convexadam", "instance": {"enabled": False}}
    off = build_config(None, {**no_io, "affine": {"enabled": False}})
    check_config_for_pairs(off, pairs)  # empty columns: no masks given
    masked = [Pair(**{**p.__dict__, "moving_mask": p.fixed}) if i == 1 else p for i, p in enumerate(pairs)]
    with pytest.raises(ConfigError, match=r"^CSV column moving_mask \(1 of 3 pair\(s\)\): nothing in --method "
                                          r"convexadam with instance.enabled false without the affine stage"):
        check_config_for_pairs(off, masked)
    on = build_config(None, no_io)
    check_config_for_pairs(on, masked)  # the affine stage reads them: the child only warns
    check_config_for_pairs(build_config(None, {"affine": {"enabled": False}}), masked)  # IO reads them
    aligned = [Pair(**{**p.__dict__, "register_flags": ("--modality", "mri", "--no-affine")}) if i else p
               for i, p in enumerate(masked)]
    with pytest.raises(ConfigError, match=r"^CSV column moving_mask \(1 of 3 pair\(s\), registered with "
                                          r"--no-affine \(align: none\)\)"):
        check_config_for_pairs(on, aligned)
    with pytest.raises(ConfigError, match=r"^--moving-mask: nothing in"):
        check_config_for_pairs(off, masked[1:2], columns=False)
    with pytest.raises(ConfigError, match=r"^prompts \(prompts.landmarks with prompts.landmark_weight 0\): "):
        check_config_for_pairs(build_config(None, {"prompts": {"landmarks": True, "landmark_weight": 0}}), pairs)


def test_mask_columns_empty_for_every_pair_do_not_stop_the_cohort(tmp_path):
    """The refused configuration (a linear method without its affine stage: an identity registration) with mask
    columns that no pair fills: nothing is refused, the pair is registered and scored."""
    manifest = _with_masks(_cohort(tmp_path, n=1, corrupt=False), fixed=0, moving=0)
    y = tmp_path / "c.yaml"
    y.write_text("method: affine\naffine: {enabled: false}\n")
    res = invoke("evaluate", manifest, "-o", tmp_path / "out", "--config", y, "--threads", "1", "--no-hd95",
                 "--json")
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in json.loads(res.stdout)["pairs"]] == ["ok"]


@pytest.mark.parametrize("command", ["evaluate", "batch"])
def test_label_prompts_reach_each_pairs_register_child(tmp_path, command):
    """A configuration with label prompts: each pair's register child gets the pair's label maps (before, it got
    none and every pair failed with "--prompt-labels needs both --fixed-labels and --moving-labels"), and its
    report splits Dice into the prompted labels and the others."""
    manifest = _cohort(tmp_path, n=1, corrupt=False)
    y = tmp_path / "c.yaml"
    y.write_text("method: convexadam\ninstance: {iterations: 5, refine_iterations: 2}\nprompts: {labels: all}\n")
    out = tmp_path / "out"
    res = invoke(command, manifest, "-o", out, "--config", y, "--threads", "1", "--no-hd95", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "s0_Report.json").read_text())
    assert report["config"]["prompts"]["labels"] == "all"
    assert report["metrics"]["dice_prompted_mean"] > 0.5


@pytest.mark.parametrize("command", ["evaluate", "batch"])
def test_prompts_need_the_columns_they_read_in_every_pair(tmp_path, monkeypatch, command):
    """Label prompts with a pair that has no label columns: refused once, before any pair runs (exit 7)."""
    from conftest import one_line

    manifest = _cohort(tmp_path, n=2, corrupt=False)
    rows = list(csv.DictReader(open(manifest)))
    rows[1]["fixed_labels"] = rows[1]["moving_labels"] = ""
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    y = tmp_path / "c.yaml"
    y.write_text("prompts: {labels: all}\n")

    def no_child(*a, **k):
        raise AssertionError("a pair was registered")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    res = invoke(command, manifest, "-o", tmp_path / "out", "--config", y, "--threads", "1")
    assert res.exit_code == 7, res.output
    assert one_line(res.stderr) == ("ConfigError: prompts.labels needs the CSV columns fixed_labels and moving_labels: "
                                    "1 of 2 pair(s) have none (first: 's1')")
    assert not (tmp_path / "out").exists()
    if command == "evaluate":  # the one-pair form has no CSV: it names its flags
        d = manifest.parent
        res = invoke(command, "--fixed", d / "f.nii.gz", "--moving", d / "m0.nii.gz", "-o", tmp_path / "out",
                     "--config", y, "--threads", "1")
        assert res.exit_code == 7, res.output
        assert one_line(res.stderr) == "ConfigError: prompts.labels needs both --fixed-labels and --moving-labels"
        assert not (tmp_path / "out").exists()


def test_a_pair_whose_scoring_fails_leaves_no_outputs_and_is_registered_again(tmp_path):
    """A pair registered fine whose scoring then fails (its moving labels are not an image; the register child does
    not read them) fails as a whole: its row says failed with the file named, none of its files (outputs, report,
    scores) is left, so a rerun registers it again instead of resuming it; the other pairs are untouched."""
    manifest = _cohort(tmp_path, n=2, corrupt=False)
    (manifest.parent / "ml1.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "cohort"
    for run in range(2):
        res = invoke("batch", manifest, "-o", out, *REGISTER, "--jobs", "2", "--threads", "1", "--no-hd95", "--json")
        assert res.exit_code == 3, res.output  # the pair's InputError, after the summary
        d = json.loads(res.stdout)
        ok, failed = d["pairs"]
        assert ok["status"] == "ok" and ok["resumed"] == bool(run)
        assert failed["status"] == "failed" and not failed["resumed"] and "transforms" not in failed
        assert failed["error"].startswith("InputError: cannot read moving labels") and "ml1.nii.gz" in failed["error"]
        assert not list(out.glob("s1_*")), list(out.glob("s1_*"))
    assert sorted(p.name for p in out.glob("s0_*")) == ["s0_0GenericAffine.mat", "s0_Report.json", "s0_Scores.json",
                                                        "s0_Warped.nii.gz"]


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_a_pair_whose_images_changed_is_registered_again(tmp_path):
    """Resume compares a pair's inputs by content, not its name: a row inserted at the top of a manifest without a
    pair column renumbers the default names, so pair001 now names other images; it is registered again (its row
    shows the new moving image, the log says why), and the old row, now pair002, is registered as what it is."""
    manifest = _cohort(tmp_path, n=2, corrupt=False)
    rows = [{k: v for k, v in r.items() if k != "pair"} for r in csv.DictReader(manifest.open())]
    _write_rows(manifest, rows[:1])
    out = tmp_path / "cohort"
    args = ("-o", out, *REGISTER, "--threads", "1", "--no-hd95", "--json")
    res = invoke("batch", manifest, *args)
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)["pairs"][0]

    _write_rows(manifest, [rows[1], rows[0]])  # m1 is now pair001
    res = invoke("batch", manifest, *args)
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["resumed"] == [] and "pair001: inputs changed since the earlier run; registering again" in res.stderr
    p1, p2 = d["pairs"]
    assert Path(p1["moving_image"]).name == "m1.nii.gz" and Path(p2["moving_image"]).name == "m0.nii.gz"
    report = json.loads((out / "pair001_Report.json").read_text())
    assert Path(report["inputs"]["moving"]["path"]).name == "m1.nii.gz"
    assert p2["dice_mean"] == pytest.approx(first["dice_mean"], abs=1e-6)
    assert p1["dice_initial_mean"] != pytest.approx(first["dice_initial_mean"], abs=1e-6)

    res = invoke("batch", manifest, *args)  # now both are what they were registered from
    assert json.loads(res.stdout)["resumed"] == ["pair001", "pair002"] and "inputs changed" not in res.stderr


def test_a_pair_whose_label_map_changed_is_scored_again(tmp_path):
    """The scores cache belongs to the label maps it was computed from: a replaced moving label map gives new
    scores (from the transforms kept: the registration did not read the labels, so it is resumed)."""
    manifest = _cohort(tmp_path, n=1, corrupt=False)
    out = tmp_path / "cohort"
    args = ("-o", out, *REGISTER, "--threads", "1", "--no-hd95", "--json")
    d = json.loads(invoke("batch", manifest, *args).stdout)
    before = _reports(out)
    labels = manifest.parent / "ml0.nii.gz"
    lab = sitk.ReadImage(str(labels))
    sitk.WriteImage(sitk.Mask(lab, lab != 1), str(labels))  # label 1 erased
    res = invoke("batch", manifest, *args)
    assert res.exit_code == 0, res.output
    d2 = json.loads(res.stdout)
    assert d2["resumed"] == ["s0"] and _reports(out) == before  # not registered again
    assert "1" in d["pairs"][0]["dice_per_label"] and d2["pairs"][0]["dice_mean"] != d["pairs"][0]["dice_mean"]
    assert "inputs changed" not in res.stderr


def test_a_batch_rerun_from_another_working_directory_resumes(tmp_path, monkeypatch):
    """The report names its outputs relative to where the batch ran; a rerun from elsewhere (the same files under
    other relative paths) finds them beside the report and resumes, with its rows naming the paths as given now."""
    _cohort(tmp_path, n=1, corrupt=False)
    args = (*REGISTER, "--threads", "1", "--no-hd95", "--json")
    monkeypatch.chdir(tmp_path)
    res = invoke("batch", "data/pairs.csv", "-o", "cohort", *args)
    assert res.exit_code == 0, res.output
    before = _reports(tmp_path / "cohort")
    monkeypatch.chdir(tmp_path / "data")
    res = invoke("batch", "pairs.csv", "-o", "../cohort", *args)
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["resumed"] == ["s0"] and _reports(tmp_path / "cohort") == before
    assert d["pairs"][0]["transforms"][0].startswith("../cohort/")
    assert d["pairs"][0]["moving_image"] == "m0.nii.gz"
