"""Training jobs as configuration files: what `regcli train embedding --config job.yaml` runs.

A job names its data (file globs, each optionally with its own intensity percentiles), the network
(:class:`regcli.models.embedding.EmbeddingConfig`) and the recipe
(:class:`regcli.training.embedding.EmbeddingTrainConfig`)::

    data:
      - glob: ../shared/data/synthseg_brain/sub-*_T1w.nii.gz
      - glob: ../shared/data/totalsegmentator_ct/ct_image.nii.gz
    net: {widths: [8, 16, 24, 32], global_dim: 16, local_dim: 16}
    train: {iterations: 6000, crop: 48, seed: 0}

The output folder gets ``checkpoint.pt`` (network, optimiser-free, every ``checkpoint_every`` steps),
``history.json`` (loss per step, seconds) and ``job.json`` (the effective job), so a run can be inspected
while it goes and its recipe is never lost.
"""

from __future__ import annotations

import copy
import glob
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from pydantic import BaseModel, Field, StrictInt, field_validator

from regcli.config import ConfigModel
from regcli.errors import ConfigError, InputError, OutputError, RegcliError, folded
from regcli.manifest import Dataset
from regcli.models.embedding import EmbeddingConfig, EmbeddingNet
from regcli.training.distributed import SINGLE, Distributed
from regcli.training.embedding import EmbeddingTrainConfig, prepare_volume, train_embedding


def needs_globs(datasets: list[Dataset], task: str) -> list[Dataset]:
    """``datasets``, refused (ValueError, shown as a one-line config error) if one has no image glob."""
    for d in datasets:
        if not d.glob:
            raise ValueError(f"{task} training reads images from a glob; dataset '{d.name}' has none")
    return datasets


class EmbeddingJob(ConfigModel):
    """What ``regcli train embedding`` runs. ``data``: datasets (:class:`regcli.manifest.Dataset`, inline or a
    manifest file) with image globs; their ``percentiles`` and ``weight`` are used."""

    data: list[Dataset] = Field(min_length=1)
    net: EmbeddingConfig = EmbeddingConfig()
    train: EmbeddingTrainConfig = EmbeddingTrainConfig()
    checkpoint_every: StrictInt = Field(250, ge=1)
    init: Optional[str] = Field(None, description="start from these weights: a model folder (any regcli weights "
                                "spec) or a checkpoint.pt of an earlier run with the same net (relative to the job file)")

    @field_validator("data")
    @classmethod
    def _globs(cls, v: list[Dataset]) -> list[Dataset]:
        return needs_globs(v, "embedding")


def job_data(path: str | Path, overrides: Optional[dict] = None) -> dict:
    """A training job file's mapping with the overrides merged in, and its paths made absolute: data globs and
    pairs CSVs (also those of ``validation.data``) and the job file's own local ``init`` are relative to the job
    file; an ``init`` override (``--init``) is relative to the working directory."""
    from regcli.config import deep_merge, load_yaml
    from regcli.manifest import read_manifest_entries, resolve_paths

    data = load_yaml(path)
    base = Path(path).resolve().parent
    # the job file's own init is relative to the job file; an --init override to where the command runs
    if isinstance(data.get("init"), str) and not data["init"].startswith("hub:") and (base / data["init"]).exists():
        data["init"] = str(base / data["init"])
    data = deep_merge(data, overrides or {})
    val = data.get("validation")
    for holder in (data, val if isinstance(val, dict) else {}):
        src = holder.get("data")
        if isinstance(src, str):  # a dataset manifest file (regcli.manifest), relative to the job file
            holder["data"] = read_manifest_entries(src if Path(src).is_absolute() else base / src)
        elif isinstance(src, list):
            holder["data"] = resolve_paths([s for s in src if isinstance(s, dict)], base) + \
                [s for s in src if not isinstance(s, dict)]
    return data


#: job keys a resumed run may change: how far it goes, and SAM's radius (logged by the trainers)
RESUMABLE_CHANGES = ("train.iterations", "train.stop_after", "train.sam_rho")


def _job_differences(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key present in both job dicts whose values differ (a key that an older
    regcli did not write is not a difference)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old if k in new for d in _job_differences(old[k], new[k], f"{prefix}{k}.")]
    key = prefix.rstrip(".")
    return [] if old == new or key in RESUMABLE_CHANGES else [f"{key}: {old!r} -> {new!r}"]


#: the files every training run writes in its folder (``checkpoint.tmp``: the checkpoint before it is renamed), and
#: the folder of its trained model (:data:`MODEL_FOLDER`)
RUN_FILES = ("checkpoint.pt", "checkpoint.tmp", "history.json", "job.json")
MODEL_FOLDER = "model"


def start_run(outdir: str | Path, resume: bool, job: Optional[BaseModel] = None,
              net_config: Optional[dict] = None, needs: Sequence[str] = ("state_dict",),
              also_writes: Sequence[str] = ()) -> tuple[Path, Path, Optional[dict]]:
    """The output folder of a resumable training run, its ``checkpoint.pt`` path and, with ``resume``, the
    checkpoint's contents; checked before any data are read, but not created (:func:`open_run` creates it once
    the data are read).

    The folder must be one that can be created or written (else OutputError), and none of the paths the run
    writes there (:data:`RUN_FILES`, the task's ``also_writes`` files such as ``loss.png``, and the model folder
    with its files) may exist as the wrong kind, a folder for a file or a file for the model folder (else an
    OutputError naming it, not a crash at the first checkpoint or after the last step). ``--resume`` needs the
    checkpoint, readable and holding the keys ``needs`` (else InputError naming it), a network of the job's
    configuration ``net_config`` (``cfg.model_dump(mode="json")``; else ConfigError), and the run's own job (its
    ``job.json``; only :data:`RESUMABLE_CHANGES` may differ, else the record would misstate the steps already
    taken); a new run refuses a folder that holds one."""
    out = Path(outdir)
    ck_path = out / "checkpoint.pt"
    _check_output_folder(out)
    _check_run_paths(out, (*RUN_FILES, *also_writes))
    if resume and not ck_path.is_file():
        raise InputError(f"--resume: '{ck_path}' does not exist")
    if not resume and ck_path.exists():
        raise OutputError(f"'{out}' already holds a run (checkpoint.pt); use --resume or another folder")
    if not resume:
        return out, ck_path, None
    if job is not None and (out / "job.json").is_file():
        try:
            ran = json.loads((out / "job.json").read_text())
        except (OSError, ValueError):
            ran = None
        diffs = _job_differences(ran, json.loads(job.model_dump_json())) if isinstance(ran, dict) else []
        if diffs:
            raise ConfigError(f"--resume: the job differs from the run in '{out}' ({'; '.join(diffs[:4])}"
                              f"{'; ...' if len(diffs) > 4 else ''}); resume with that run's job (its job.json) "
                              f"and change only {', '.join(RESUMABLE_CHANGES)}, or start another folder")
    ck = read_checkpoint(ck_path, needs)
    if net_config is not None and isinstance(ck.get("config"), dict):
        diffs = _job_differences(ck["config"], net_config, "net.")
        if diffs:
            raise ConfigError(f"--resume: '{ck_path}' holds another network than the job's ({'; '.join(diffs[:4])}"
                              f"{'; ...' if len(diffs) > 4 else ''}); resume with that run's job, or start another "
                              f"folder")
    with restoring(ck_path):
        done = int(ck["train_state"]["step"] if "train_state" in ck else ck["step"])  # embedding / pair, DIO runs
    iterations = getattr(getattr(job, "train", None), "iterations", None)
    if isinstance(iterations, int) and iterations < done:
        raise ConfigError(f"--resume: the run in '{out}' has already taken {done} steps, more than the "
                          f"{iterations} iterations asked; give at least {done}")
    stop_after = getattr(getattr(job, "train", None), "stop_after", None)
    if isinstance(stop_after, int) and stop_after < done:
        raise ConfigError(f"--resume: the run in '{out}' has already taken {done} steps, more than --stop-after "
                          f"{stop_after}; give at least {done}")
    return out, ck_path, ck


def _check_output_folder(out: Path) -> None:
    """OutputError unless ``out`` is a folder, or can be made one (its first existing ancestor is a writable
    folder)."""
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output '{out}' exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"output folder '{out}' is not writable")
        return
    ancestor = next(p for p in out.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise OutputError(f"cannot create output folder '{out}': '{ancestor}' is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output folder '{out}': '{ancestor}' is not writable")


def _check_run_paths(out: Path, files: Sequence[str]) -> None:
    """OutputError naming the first path of the run in ``out`` that exists as the wrong kind: a folder (or a link
    to one) where the run writes the file ``files[i]``, anything but a folder at :data:`MODEL_FOLDER`, or a folder
    in place of one of the model folder's files. Nothing to check while ``out`` does not exist."""
    from regcli.weights import MODEL_FILES

    if not out.is_dir():
        return
    fix = "remove or rename it, or use another output folder"
    for name in files:
        if (out / name).is_dir():
            raise OutputError(f"'{out / name}' is a folder, where the run writes its {name} file; {fix}")
    model = out / MODEL_FOLDER
    if os.path.lexists(model) and not model.is_dir():
        raise OutputError(f"'{model}' is {'a broken link' if not model.exists() else 'not a folder'}, where the run "
                          f"writes its model folder; {fix}")
    for name in MODEL_FILES if model.is_dir() else ():
        if (model / name).is_dir():
            raise OutputError(f"'{model / name}' is a folder, where the run writes the model's {name} file; {fix}")


def read_checkpoint(ck_path: Path, needs: Sequence[str] = ()) -> dict:
    """The contents of a run's ``checkpoint.pt``, a dict holding the keys ``needs``, read onto the CPU whatever
    device wrote it (the trainers move what they restore to their own); a file that is not one (truncated, not a
    PyTorch file, a checkpoint of another kind of run) is a one-line InputError naming it."""
    try:
        ck = torch.load(ck_path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, ValueError, OSError, UnpicklingError, ...
        raise InputError(f"--resume: '{ck_path}' is not a readable regcli checkpoint ({type(e).__name__}: "
                         f"{folded(e, 160, sentence=True)})") from None
    missing = [k for k in needs if not isinstance(ck, dict) or k not in ck]
    if not isinstance(ck, dict) or missing:
        raise InputError(f"--resume: '{ck_path}' is not a checkpoint of this kind of run, or was written by an "
                         f"older regcli (it has no {', '.join(missing or needs)})")
    return ck


@contextmanager
def restoring(ck_path: Optional[Path]) -> Iterator[None]:
    """Restoring a trainer's state (optimizer, random generators, step) from a read checkpoint (``ck_path``, None
    when not from a file): a value that does not fit is a one-line InputError naming the file, not a crash."""
    try:
        yield
    except RegcliError:
        raise
    except Exception as e:  # noqa: BLE001 - KeyError, TypeError, ValueError, RuntimeError from load_state_dict's
        what = f"'{ck_path}' is not a usable checkpoint of this run" if ck_path else "the training state is not usable"
        raise InputError(f"--resume: {what} ({type(e).__name__}: {folded(e, 160, sentence=True)})") from None


def cpu_tensors(obj):
    """``obj`` (a state dict, an optimizer's state, nested dicts, lists and tuples) with every tensor on the CPU,
    for a checkpoint that does not depend on the device the run trained on; CPU tensors are kept as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same kind of dict, with its attributes (a state dict's _metadata)
        for k, v in obj.items():
            out[k] = cpu_tensors(v)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(cpu_tensors(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_tensors(v) for v in obj)
    return obj


def note_device_change(ck: dict, device: torch.device, log: Callable[[str], None]) -> None:
    """Log that a resumed run goes on on another device than the one its checkpoint was written on."""
    if ck.get("device", "cpu") != str(device):
        log(f"note: the run trained on {ck.get('device', 'cpu')} so far and goes on on {device}")


def device_segments(ck: Optional[dict], device: torch.device | str, start: int) -> list[dict]:
    """Every device a run has trained on, in order: ``[{"from_step": s, "device": d}, ...]``, ``s`` the first
    step (1-based, as the history numbers them) taken on ``d``. A new run (``ck`` None) has one segment; a resumed
    one continues its checkpoint's ``devices`` (one written by an older regcli, which recorded only its last
    ``device``: that device from step 1), with ``device`` added from step ``start + 1`` when it is another one. The
    last segment's device is always ``device``, what the ``device`` keys of the records name."""
    devices: list[dict] = []
    if ck is not None:
        kept = ck.get("devices")
        if isinstance(kept, list) and kept and all(isinstance(d, dict) and {"from_step", "device"} <= set(d)
                                                   for d in kept):
            devices = [{"from_step": int(d["from_step"]), "device": str(d["device"])} for d in kept]
        else:
            devices = [{"from_step": 1, "device": str(ck.get("device", "cpu"))}]
    if not devices or devices[-1]["device"] != str(device):
        devices.append({"from_step": start + 1, "device": str(device)})
    return devices


def devices_text(summary: dict) -> str:
    """The devices of a run's ``summary`` (its ``devices``, :func:`device_segments`, over its ``iterations`` steps;
    else its ``device``) in words: ``cpu``, or ``cuda:0 (steps 1-2), then cpu (steps 3-4)``."""
    devices, steps = summary.get("devices") or [], summary.get("iterations", 0)
    if len(devices) <= 1:
        return devices[0]["device"] if devices else str(summary.get("device", "cpu"))
    parts = []
    for k, d in enumerate(devices):
        first, last = d["from_step"], (devices[k + 1]["from_step"] - 1 if k + 1 < len(devices) else steps)
        span = f"steps {first}-{last}" if last > first else f"step {first}" if last == first else "no steps"
        parts.append(f"{d['device']} ({span})")
    return ", then ".join(parts)


def restore_network(net: torch.nn.Module, ck: dict, ck_path: Path) -> None:
    """Load the network of a read checkpoint into ``net`` (the job's network); tensors that do not fit it are a
    one-line ConfigError naming the file (the checkpoint is of another network than the job's)."""
    try:
        net.load_state_dict(ck["state_dict"])
    except Exception as e:  # noqa: BLE001 - RuntimeError (missing keys, shapes), TypeError (not a state dict)
        raise ConfigError(f"--resume: the network in '{ck_path}' does not fit the job's "
                          f"({folded(e, 200, sentence=True)})") from None


def open_run(out: Path, job: BaseModel, dist: Distributed = SINGLE) -> None:
    """Create the run's folder and write ``job.json``, after the data have been read, so that a job refused
    for its data leaves nothing behind. Under torchrun rank 0 writes, and all wait for it."""
    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "job.json").write_text(job.model_dump_json(indent=2))
        except OSError as e:
            raise OutputError(f"cannot write the run's folder '{out}': {e.strerror or folded(e)}") from None
    dist.barrier()


def load_job_file(path: str | Path, overrides: Optional[dict], model: type, check=None):
    """A training job file (:func:`job_data`) validated as ``model``, then by ``check(job)`` (which may raise a
    pydantic ValidationError of the network's configuration, the job's ``net`` mapping validated by its model); a
    bad job is a one-line ConfigError naming the file and the dotted keys."""
    from pydantic import ValidationError

    from regcli.config import validation_details

    data = job_data(path, overrides)
    try:
        job = model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid training job '{path}': {validation_details(e)}") from None
    try:
        if check is not None:
            check(job)
    except ValidationError as e:
        raise ConfigError(f"invalid training job '{path}': {validation_details(e, 'net')}") from None
    check_seed(job, path)
    return job


def check_seed(job, path: str | Path) -> None:
    """A ConfigError naming ``train.seed`` when the job's seed is outside what the random generators it seeds take
    (:data:`regcli.config.SEED_MIN` to :data:`~regcli.config.SEED_MAX`, a signed 64-bit integer: torch's
    ``manual_seed`` raised an OverflowError mid-run on larger ones; the embedding's sampling also seeds numpy's
    ``default_rng``, which takes no negative seed)."""
    from regcli.config import SEED_MAX, SEED_MIN

    seed = getattr(getattr(job, "train", None), "seed", None)
    if not isinstance(seed, int):
        return
    low, why = (0, "numpy's generator of the embedding's sampling takes no negative seed") \
        if isinstance(job, EmbeddingJob) else (SEED_MIN, "a signed 64-bit integer, as torch's generators take")
    if not low <= seed <= SEED_MAX:
        raise ConfigError(f"invalid training job '{path}': train.seed: {seed} is outside {low}..{SEED_MAX} ({why})")


def load_job(path: str | Path, overrides: Optional[dict] = None) -> EmbeddingJob:
    return load_job_file(path, overrides, EmbeddingJob)


#: An image whose voxels are all integers and take at most this many distinct values is taken for a label map.
#: Real images are far above it: the intensity images of ../shared/data have 232-256 distinct values (uint8
#: T1w MR and prostate MR/ultrasound: a uint8 image scaled to its range uses most of its 256 levels), 220-247
#: (float MR, not integers anyway) and 1711 (int16 CT: Hounsfield units span thousands), while their label maps have 2
#: (prostate gland), 3 (landmarks), 33 (SynthSeg), 42 (TotalSegmentator) and 46 (FreeSurfer aseg). Conservative:
#: a label map of more labels (a full TotalSegmentator map has 118 values) goes unnoticed rather than an image
#: being refused.
LABEL_MAP_MAX_VALUES = 64


def label_map_values(data: torch.Tensor) -> Optional[int]:
    """The number of distinct values of ``data`` (an image's voxels) when it looks like a label map, not an
    image: integers only, at most :data:`LABEL_MAP_MAX_VALUES` distinct ones. None otherwise."""
    x = data.reshape(-1)
    step = max(1, x.numel() // 100_000)
    if torch.unique(x[::step]).numel() > LABEL_MAP_MAX_VALUES:  # a subsample settles it for images, quickly
        return None
    if x.is_floating_point() and not torch.equal(x, torch.round(x)):
        return None
    n = torch.unique(x).numel()
    return n if n <= LABEL_MAP_MAX_VALUES else None


def load_volumes(job: EmbeddingJob, log: Callable[[str], None] = lambda s: None) -> tuple[list, list[int]]:
    """Read and prepare every image the job's globs match (sorted, deterministic order). Returns the volumes
    and, for each, the index of its data source (glob) in the job.

    An image that looks like a label map (:func:`label_map_values`), or that is smaller than ``train.crop`` in
    every direction on the training grid (each view would be mostly outside it: the training failed at its first
    steps, unable to place two views on its foreground), is a one-line InputError naming it, before the run's
    folder is written."""
    from regcli.io.images import read_image

    vols, groups = [], []
    crop = job.train.crop
    for k, src in enumerate(job.data):
        files = sorted(glob.glob(src.glob))
        if not files:
            raise InputError(f"training data glob '{src.glob}' matches no file")
        pct = src.percentiles or job.net.percentiles
        for f in files:
            img = read_image(f, "training image")
            n_values = label_map_values(img.data)
            if n_values is not None:
                raise InputError(f"training image '{f}' looks like a label map, not an image: its voxels are "
                                 f"integers with only {n_values} distinct values; leave it out of the data glob "
                                 f"'{src.glob}' (match only the images' names, e.g. '*_T1w.nii.gz')")
            vol = prepare_volume(img, job.net.spacing_mm, pct)
            if min(vol.grid.size) < 16:
                log(f"skipping '{f}': {vol.grid.size} voxels at {job.net.spacing_mm} mm is too small")
                continue
            if crop > max(vol.grid.size):
                raise InputError(f"training image '{f}' is {'x'.join(map(str, vol.grid.size))} voxels on the "
                                 f"training grid ({job.net.spacing_mm} mm), smaller than train.crop {crop} in every "
                                 f"direction; give a crop of at most {max(vol.grid.size)}, or leave the image out")
            vols.append(vol)
            groups.append(k)
    if not vols:
        raise InputError("no training volume is large enough for the network's spacing")
    return vols, groups


def run_embedding_job(job: EmbeddingJob, outdir: str | Path, progress=None,
                      log: Callable[[str], None] = lambda s: None, resume: bool = False,
                      dist: Distributed = SINGLE, device: torch.device | str | None = None) -> dict:
    """Train on ``device`` (default the CPU) and write ``outdir/{checkpoint.pt, history.json, job.json, model/}``;
    returns a summary dict.

    ``checkpoint.pt`` holds the network (``config``, ``state_dict``) and the training state (``train_state``:
    optimizer, schedule, random generator, history), as CPU tensors, so ``resume`` continues bit for bit (on the
    same device; on another one it goes on from the same state). Under torchrun (``dist``) rank 0 writes."""
    out, ck_path, ck = start_run(outdir, resume, job, net_config=job.net.model_dump(mode="json"),
                                 needs=("state_dict", "train_state"))
    vols, groups = load_volumes(job, log)
    log(f"{len(vols)} training volumes at {job.net.spacing_mm} mm")
    device = torch.device(device or "cpu")
    torch.manual_seed(job.train.seed)
    net = EmbeddingNet(job.net)
    state = None
    if ck is not None:
        restore_network(net, ck, ck_path)
        state = ck["train_state"]
        log(f"resuming at step {state['step']}")
        note_device_change(ck, device, log)
    elif job.init:
        net.load_state_dict(_initial_weights(job.init, job.net))
        log(f"starting from '{job.init}'")
    with restoring(ck_path):
        devices = device_segments(ck, device, int(state["step"]) if state is not None else 0)
    net.to(device)
    open_run(out, job, dist)  # once the weights are in: a refused init or resume leaves no new job.json

    def save(step: int, train_state: dict) -> None:
        if not dist.main:
            return
        tmp = ck_path.with_suffix(".tmp")
        torch.save({"config": job.net.model_dump(mode="json"), "state_dict": cpu_tensors(net.state_dict()),
                    "train_state": cpu_tensors(train_state), "device": str(device), "devices": devices}, tmp)
        os.replace(tmp, ck_path)
        (out / "history.json").write_text(json.dumps({"seconds": train_state["seconds"], "device": str(device),
                                                      "devices": devices, "history": train_state["history"]}))

    res = train_embedding(vols, job.train, net=net, progress=progress, groups=groups,
                          weights=[d.weight for d in job.data], resume=state, save=save,
                          save_every=job.checkpoint_every, dist=dist, resume_path=ck_path)
    history = res.history
    last = history[-min(len(history), 50):]
    summary = {"volumes": len(vols), "iterations": len(history), "seconds": round(res.seconds, 1),
               "final_loss_mean50": sum(h["loss"] for h in last) / len(last), "sam_rho": job.train.sam_rho,
               "device": str(device), "devices": devices, "outdir": str(out)}
    if dist.main:
        write_model(net, job, summary, out / MODEL_FOLDER)
    dist.barrier()
    return summary


def load_checkpoint(path: str | Path) -> EmbeddingNet:
    """The network stored in a run's ``checkpoint.pt`` (``{"config", "state_dict"}``, see
    :func:`run_embedding_job`), in eval mode."""
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
        net = EmbeddingNet(EmbeddingConfig.model_validate(ck["config"]))
        net.load_state_dict(ck["state_dict"])
    except Exception as e:  # noqa: BLE001 - a damaged file, or a checkpoint of another kind of run
        raise InputError(f"'{path}' is not a readable embedding checkpoint ({type(e).__name__}: "
                         f"{folded(e, 160, sentence=True)})") from None
    return net.eval()


def _initial_weights(spec: str, net_cfg: EmbeddingConfig) -> dict:
    """State dict from a ``checkpoint.pt`` of an earlier run, or from any weights spec (model folder, hub:...)."""
    if spec.endswith(".pt") and Path(spec).is_file():
        net = load_checkpoint(spec)
        if net.cfg != net_cfg:
            raise ConfigError(f"checkpoint '{spec}' was trained with another network configuration than the job's")
        return net.state_dict()
    from regcli.models.embedding import load_embedding

    net = load_embedding(spec)
    if net.cfg != net_cfg:
        raise ConfigError(f"model '{spec}' has another network configuration than the job's")
    return net.state_dict()


def write_model(net: EmbeddingNet, job: EmbeddingJob, summary: dict, folder: Path, version: str = "0") -> Path:
    """The trained network as a Hub-layout model folder, with a model card stating data and recipe."""
    from regcli.models.embedding import save_embedding_model

    data = "\n".join(f"- `{os.path.normpath(src.glob)}`" for src in job.data)
    card = (f"# regcli anatomical embedding\n\nSelf-supervised (pixel-wise InfoNCE on augmented view pairs, "
            f"images only, no labels), trained with `regcli train embedding`.\n\n## Training data\n\n{data}\n\n"
            f"## Recipe\n\n```json\n{job.model_dump_json(indent=2)}\n```\n\n## Run\n\n"
            f"{summary['iterations']} steps on {summary['volumes']} volumes in {summary['seconds']} s, on "
            f"{devices_text(summary)}; mean loss of "
            f"the last 50 steps {summary['final_loss_mean50']:.3f}.\n\n## Intended use\n\nFeatures for "
            f"`regcli register --method samconvex` on images resampled to {job.net.spacing_mm} mm. Measure "
            f"registration quality with `regcli evaluate` before relying on it.\n")
    training = {"job": job.model_dump(mode="json"), "summary": summary}
    return save_embedding_model(net, folder, card, training=training, version=version, overwrite=True)
