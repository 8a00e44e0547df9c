"""``regcli train TASK --device auto|cpu|cuda``: refused without a GPU like ``regcli register --device cuda``, the
same CPU result with ``--device cpu`` as by default, the device recorded, device-independent checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import invoke, make_phantom, one_line, phantom_labels, write

TASKS = ("embedding", "dio", "foundation", "promptreg")

JOBS = {
    "embedding": "data:\n  - {glob: sub-*_T1w.nii.gz}\n"
                 "net: {widths: [4, 8, 8, 12], global_dim: 8, local_dim: 8, context_dilations: [1, 2], spacing_mm: 1.5}\n"
                 "train: {iterations: 2, crop: 16, batch_pairs: 1, points: 32, max_shift_mm: 8.0, hard_negatives: 16, "
                 "seed: 0}\ncheckpoint_every: 1\n",
    "dio": "data:\n  - {glob: sub-*_T1w.nii.gz}\n"
           "net: {arch: unet, widths: [4, 8, 8, 8], feature_channels: [4, 4, 4]}\n"
           "train: {iterations: 2, crop: [16, 16, 16], synth_prob: 0.5, seed: 0}\n"
           "solver: {dio: {iterations: [4, 3, 2]}}\ncheckpoint_every: 1\n",
    "foundation": "data:\n  - {name: brain, glob: sub-*_T1w.nii.gz, align: none}\n"
                  "net: {input_shape: [20, 20, 20], down_channels: [4, 8, 8], up_channels: [4, 4, 8]}\n"
                  "train: {iterations: 2, batch_size: 2, seed: 3}\ncheckpoint_every: 1\n",
    "promptreg": "data:\n  - {name: brain, glob: sub-*_T1w.nii.gz, align: none}\n"
                 "net: {input_shape: [24, 24, 24], encoder_channels: [4, 8, 8], decoder_channels: [4, 8], "
                 "prompt_dim: 8}\n"
                 "train: {iterations: 2, batch_size: 2, seed: 2}\ncheckpoint_every: 1\n",
}


def _job(tmp_path, task: str):
    """Two 2 mm phantom subjects with label maps (each task's data) and ``task``'s tiny 2-step job."""
    for k, shift in enumerate(([0, 0, 0], [2, -1, 0])):
        img = make_phantom("LPS", (2.0, 2.0, 2.0), transform=lambda p, s=np.array(shift): p + s)
        write(img, tmp_path / f"sub-{k}_T1w.nii.gz")
        write(phantom_labels(img), tmp_path / f"sub-{k}_labels.nii.gz")
    job = tmp_path / f"{task}.yaml"
    job.write_text(JOBS[task])
    return job


def _losses(outdir) -> list[float]:
    hist = json.loads((outdir / "history.json").read_text())["history"]
    return [h["loss"] for h in hist]


def _tensors(obj):
    """Every tensor in a checkpoint (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("task", TASKS)
def test_device_cuda_without_a_gpu_is_a_one_line_config_error_and_writes_nothing(tmp_path, task):
    job = _job(tmp_path, task)
    out = tmp_path / "run"
    res = invoke("train", task, "--config", job, "-o", out, "--device", "cuda")
    assert res.exit_code == 7, res.output  # ConfigError, as `regcli register --device cuda`
    assert one_line(res.stderr) == ("ConfigError: --device cuda was requested but no CUDA device is available (use "
                                    "--device auto or cpu)")
    assert not out.exists()


def test_device_cpu_trains_as_the_default_and_is_recorded(tmp_path):
    """Without a GPU the default (auto) is the CPU: the same weights, history and summary as --device cpu; the
    device is in the --json summary, history.json, checkpoint.pt and the model's config.json, not in job.json
    (which stays a job file that --resume compares)."""
    job = _job(tmp_path, "embedding")
    runs = {}
    for name, flags in (("default", []), ("cpu", ["--device", "cpu"]), ("CPU", ["--device", "CPU"])):
        out = tmp_path / name
        res = invoke("train", "embedding", "--config", job, "-o", out, "--json", "--threads", "1", *flags)
        assert res.exit_code == 0, res.output
        runs[name] = out, json.loads(res.stdout)
    ck = {name: torch.load(out / "checkpoint.pt", weights_only=False) for name, (out, _) in runs.items()}
    if not torch.cuda.is_available():
        assert all(torch.equal(v, ck["cpu"]["state_dict"][k]) for k, v in ck["default"]["state_dict"].items())
        assert _losses(runs["default"][0]) == _losses(runs["cpu"][0])
        assert runs["default"][1]["device"] == "cpu"
    assert _losses(runs["CPU"][0]) == _losses(runs["cpu"][0])  # the choice is case-insensitive, as for register
    out, summary = runs["cpu"]
    assert summary["device"] == "cpu" and ck["cpu"]["device"] == "cpu"
    assert json.loads((out / "history.json").read_text())["device"] == "cpu"
    assert json.loads((out / "model" / "config.json").read_text())["training"]["summary"]["device"] == "cpu"
    assert "device" not in json.loads((out / "job.json").read_text())


@pytest.mark.parametrize("task", ["dio", "promptreg"])
def test_the_pair_tasks_record_the_device(tmp_path, task):
    job = _job(tmp_path, task)
    out = tmp_path / "run"
    res = invoke("train", task, "--config", job, "-o", out, "--json", "--threads", "1", "--device", "cpu",
                 "--iterations", "1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["device"] == "cpu"
    assert json.loads((out / "history.json").read_text())["device"] == "cpu"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["device"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", TASKS)
def test_training_on_cuda_writes_cpu_checkpoints_that_resume_on_the_cpu(tmp_path, task):
    job = _job(tmp_path, task)
    out = tmp_path / "run"
    res = invoke("train", task, "--config", job, "-o", out, "--json", "--device", "cuda")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 2 and summary["device"] == "cuda:0"
    assert all(math.isfinite(v) for v in _losses(out))
    ck = torch.load(out / "checkpoint.pt", weights_only=False)  # no map_location: CPU tensors as written
    assert ck["device"] == "cuda:0"
    tensors = list(_tensors(ck))
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert (out / "model" / "model.safetensors").is_file()
    # the CUDA run goes on on the CPU from its checkpoint
    res = invoke("train", task, "--config", job, "-o", out, "--json", "--device", "cpu", "--resume",
                 "--iterations", "3")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["iterations"] == 3 and summary["device"] == "cpu"
    assert len(_losses(out)) == 3 and all(math.isfinite(v) for v in _losses(out))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["device"] == "cpu"


def test_torchrun_processes_train_on_their_local_gpu(monkeypatch):
    """Under torchrun process LOCAL_RANK takes cuda:LOCAL_RANK; with fewer GPUs than local processes auto is the
    CPU for all of them (gloo), and cuda is a ConfigError."""
    from regcli.cli.train import _training_device
    from regcli.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _training_device("auto") == _training_device("cuda") == (torch.device("cuda", 1), None)
    assert _training_device("cpu") == (torch.device("cpu"), None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dev, note = _training_device("auto")
    assert dev == torch.device("cpu") and note.startswith("2 processes on this machine and 1 visible GPU")
    with pytest.raises(ConfigError, match="2 processes on this machine but only 1 CUDA device"):
        _training_device("cuda")
    for k in env:
        monkeypatch.delenv(k)
    assert _training_device("auto") == _training_device("cuda") == (torch.device("cuda", 0), None)  # one process


def test_deterministic_is_recorded_and_turns_deterministic_algorithms_on(tmp_path):
    job = _job(tmp_path, "embedding")
    try:
        torch.use_deterministic_algorithms(False)
        res = invoke("train", "embedding", "--config", job, "-o", tmp_path / "run", "--json", "--threads", "1",
                     "--device", "cpu", "--iterations", "1", "--deterministic")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["deterministic"] is True
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    res = invoke("train", "embedding", "--config", job, "-o", tmp_path / "plain", "--json", "--threads", "1",
                 "--device", "cpu", "--iterations", "1")
    assert json.loads(res.stdout)["deterministic"] is False
    # on the CPU the flag changes nothing
    assert _losses(tmp_path / "run") == _losses(tmp_path / "plain")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("task", TASKS)
def test_deterministic_cuda_training_resumes_bit_for_bit(tmp_path, task):
    """Not yet run on a GPU (written after the session's GPU time was spent): with --deterministic a CUDA run
    resumed at step 1 must equal the straight run, as CPU runs do without the flag."""
    job = _job(tmp_path, task)
    try:
        straight, part = tmp_path / "straight", tmp_path / "part"
        flags = ["--config", job, "--json", "--device", "cuda", "--deterministic"]
        assert invoke("train", task, "-o", straight, *flags).exit_code == 0
        assert invoke("train", task, "-o", part, *flags, "--iterations", "1").exit_code == 0
        res = invoke("train", task, "-o", part, *flags, "--resume", "--iterations", "2")
        assert res.exit_code == 0, res.output
        assert _losses(part) == _losses(straight)
        a = torch.load(straight / "checkpoint.pt", weights_only=False)["state_dict"]
        b = torch.load(part / "checkpoint.pt", weights_only=False)["state_dict"]
        assert all(torch.equal(v, b[k]) for k, v in a.items())
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("task", ["dio", "foundation"])
def test_a_refused_resume_leaves_the_runs_job_file_as_it_was(tmp_path, task):
    """job.json was rewritten (here with iterations 3) before the checkpoint's state was found unusable."""
    job = _job(tmp_path, task)
    out = tmp_path / "run"
    assert invoke("train", task, "--config", job, "-o", out, "--device", "cpu", "--threads", "1").exit_code == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    ck["generator"] = 7  # not a generator state
    torch.save(ck, out / "checkpoint.pt")
    before = (out / "job.json").read_text()
    res = invoke("train", task, "--config", job, "-o", out, "--device", "cpu", "--threads", "1", "--resume",
                 "--iterations", "3")
    assert res.exit_code == 3, res.output
    assert (out / "job.json").read_text() == before


@pytest.mark.parametrize("task", TASKS)
def test_a_run_resumed_on_another_device_records_every_device(tmp_path, task):
    """A run resumed on another device recorded only the last one (history.json, summary, model card). The CPU
    stands in for the GPU: the first step's checkpoint is rewritten as a CUDA run of an older regcli wrote it
    (its device cuda:0, no list); the resume then adds the CPU from step 2, and a further resume on the same
    device adds nothing. `device` stays the last device."""
    job = _job(tmp_path, task)
    out = tmp_path / "run"
    base = ("train", task, "--config", job, "-o", out, "--json", "--threads", "1", "--device", "cpu")
    res = invoke(*base, "--iterations", "1")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["devices"] == [{"from_step": 1, "device": "cpu"}]
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["devices"] == [{"from_step": 1, "device": "cpu"}]
    ck["device"] = "cuda:0"
    del ck["devices"]
    torch.save(ck, out / "checkpoint.pt")
    both = [{"from_step": 1, "device": "cuda:0"}, {"from_step": 2, "device": "cpu"}]
    for steps in (2, 3):
        res = invoke(*base, "--resume", "--iterations", steps)
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout)
        assert summary["device"] == "cpu" and summary["devices"] == both, summary
        history = json.loads((out / "history.json").read_text())
        assert history["device"] == "cpu" and history["devices"] == both and len(_losses(out)) == steps
        assert torch.load(out / "checkpoint.pt", weights_only=False)["devices"] == both
        assert json.loads((out / "model" / "config.json").read_text())["training"]["summary"]["devices"] == both
        span = "step 2" if steps == 2 else "steps 2-3"
        assert f"cuda:0 (step 1), then cpu ({span})" in (out / "model" / "README.md").read_text()
