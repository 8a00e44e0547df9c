"""``regcli train embedding --config job.yaml -o OUTDIR``: self-supervised training of the anatomical embedding."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from regcli.cli.common import SEED_RANGE, DeviceOpt, JsonOpt, QuietOpt, VerboseOpt, examples, input_file_option

EXAMPLES = examples(
    "regcli train embedding --config docs/recipes/sam_embedding_v0.yaml -o results/embedding_v0",
    "regcli train embedding --config job.yaml -o runs/try1 --iterations 200 --seed 3 --threads 2",
    "regcli train embedding --config job.yaml -o runs/sam --sam-rho 0.05",
    "regcli train embedding --config job.yaml -o runs/gpu --device cuda",
)

app = typer.Typer(help="Train learned components (the anatomical embedding of SAMConvex, the DIO feature network, "
                  "the foundation network, PromptReg).",
                  no_args_is_help=True)


IterOpt = Annotated[Optional[int], typer.Option("--iterations", help="Override train.iterations.", min=1)]
SeedOverrideOpt = Annotated[Optional[int], typer.Option("--seed", help="Override train.seed (a signed 64-bit "
                                                        "integer; embedding: >= 0).", **SEED_RANGE)]
BatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, help="Override the pairs per step (train.batch_size; embedding: train.batch_pairs). Per "
    "process under torchrun, which trains N processes like one with N times the batch.")]
OptronItersOpt = Annotated[Optional[int], typer.Option(
    "--optron-iters", min=0, help="Override train.optron.iters: Optron training in the loop, the prediction refined by "
    "this many steps of the shared IO solver becomes the MSE target (the paper: 10); 0 disables.")]
OptronLrOpt = Annotated[Optional[float], typer.Option(
    "--optron-lr", min=0.0, help="Override train.optron.lr: Adam learning rate of the Optron refinement (0.1).")]
ExcludeTaskTrainOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude-task", metavar="TASK", show_default=False,
    help="Leave the datasets of this task out of training (repeatable): leave-one-dataset-out.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in OUTDIR from its checkpoint.pt.")]
TrainThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.", min=1)]
TrainDeterministicOpt = Annotated[bool, typer.Option(
    "--deterministic", help="Deterministic algorithms on a GPU: cuDNN without benchmarking, resampling without "
    "atomic adds (somewhat slower). torch's trilinear upsampling and average pooling still add with atomics on "
    "CUDA, so a GPU run may differ in the last bits; CPU runs repeat without it. Recorded in the summary.")]
SamRhoOpt = Annotated[Optional[float], typer.Option(
    "--sam-rho", min=0.0, help="Override train.sam_rho: sharpness-aware minimization with this weight-perturbation "
    "radius (two forward/backward passes per step; regcli.training.sam); 0 disables.")]


def _ui(quiet: bool, verbose: bool, json_out: bool, threads: Optional[int], device=None,
        deterministic: bool = False):
    """The command's Ui, its place in a torchrun run (:mod:`regcli.training.distributed`) and the device it trains
    on (:func:`_training_device`), with torch's CPU threads set when asked. Under torchrun only rank 0 talks; the
    others are quiet."""
    import atexit

    import torch

    from regcli.cli.common import Ui
    from regcli.training.distributed import setup, teardown

    dev, note = _training_device(device.value if device else "auto")
    if deterministic:
        from regcli.runtime import deterministic_algorithms

        deterministic_algorithms()
    if threads is not None:
        torch.set_num_threads(threads)
    dist = setup(dev.type, threads)
    atexit.register(teardown)
    if not dist.main:
        return Ui(quiet=True, verbose=False, json=False), dist, dev
    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    if note:
        ui.info(f"note: training on the CPU: {note}")
    return ui, dist, dev


def _training_device(name: str):
    """``--device`` as :func:`regcli.runtime.resolve_device` reads it (``cuda`` without a GPU: ConfigError), as
    the GPU of this process: ``cuda:<LOCAL_RANK>`` under torchrun, ``cuda:0`` alone. Under torchrun with more
    processes on this machine than GPUs, ``auto`` trains every process on the CPU (and says why: the second value,
    else None) and ``cuda`` is a ConfigError."""
    import torch

    from regcli.errors import ConfigError
    from regcli.runtime import resolve_device
    from regcli.training.distributed import from_environment

    dist = from_environment()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    note = None
    if name == "auto" and dist.enabled and 0 < gpus < dist.local_world:
        name = "cpu"
        note = (f"{dist.local_world} processes on this machine and {gpus} visible GPU(s): --device cuda needs one "
                f"per process")
    dev = resolve_device(name)
    if dev.type != "cuda":
        return dev, note
    if dist.local_rank >= gpus:
        raise ConfigError(f"--device cuda: torchrun starts {dist.local_world} processes on this machine but only "
                          f"{gpus} CUDA device(s) are visible (one per process; use --device cpu or fewer processes)")
    return torch.device("cuda", dist.local_rank), None


def _with_training_bar(ui, total: int, run) -> dict:
    """``run(step)`` under a "training" progress bar of ``total`` steps, shown from the first step on (a job
    refused while its data are read shows none); ``step(i, n, record)`` advances it."""
    with ui.progress() as progress:
        shown = []

        def step(i: int, n: int, rec: dict) -> None:
            if not shown:
                progress.start("training", total)
                shown.append(True)
            progress.update("training", i, f"loss {rec['loss']:.3f}")

        summary = run(step)
        progress.finish("training")
    return summary


def _train_overrides(optron_iters: Optional[int] = None, optron_lr: Optional[float] = None, **flags) -> dict:
    """``{"train": {...}}`` job overrides from the flags that were given (None = not given)."""
    train = {k: v for k, v in flags.items() if v is not None}
    optron = {k: v for k, v in (("iters", optron_iters), ("lr", optron_lr)) if v is not None}
    if optron:
        train["optron"] = optron
    return {"train": train} if train else {}  # none: the job's own `train:` is validated as it is


def _train_pair_task(load, run, a: dict) -> None:
    """The body of ``train foundation`` and ``train promptreg`` (:mod:`regcli.training.pairs`): ``a`` holds the
    command's arguments; ``load(config, overrides)`` reads the job, ``run(job, outdir, ...)`` trains."""
    from regcli.training.pairs import exclude_tasks

    ui, dist, device = _ui(a["quiet"], a["verbose"], a["json_out"], a["threads"], a["device"], a["deterministic"])
    overrides = _train_overrides(iterations=a["iterations"], seed=a["seed"], sam_rho=a["sam_rho"],
                                 batch_size=a["batch_size"], optron_iters=a["optron_iters"], optron_lr=a["optron_lr"])
    if a["init"] is not None:
        overrides["init"] = a["init"]
    job = exclude_tasks(load(a["config"], overrides), tuple(a["exclude_task"] or ()))
    summary = _with_training_bar(ui, job.train.iterations,
                                 lambda step: run(job, a["output"], step, ui.info, resume=a["resume"], dist=dist,
                                                  device=device))
    summary["deterministic"] = a["deterministic"]
    ui.result(summary, _pair_summary(summary, a["output"]))


def _volume_summary(summary: dict, output: Path) -> str:
    """The closing line of ``train embedding`` and ``train dio``."""
    from regcli.training.jobs import devices_text

    return (f"trained {summary['iterations']} steps on {devices_text(summary)} on {summary['volumes']} volumes in "
            f"{summary['seconds']} s; mean loss of the last 50 steps {summary['final_loss_mean50']:.3f}; "
            f"wrote {output}")


def _pair_summary(summary: dict, output: Path) -> str:
    from regcli.training.jobs import devices_text

    text = (f"trained {summary['iterations']} steps on {devices_text(summary)} on {summary['volumes']} volumes of "
            f"{len(summary['datasets'])} datasets in {summary['seconds']} s; mean loss of the last 50 steps "
            f"{summary['final_loss_mean50']:.4f}")
    if "validation" in summary:
        v = summary["validation"]
        text += f"; validation Dice {v['first_dice']:.4f} -> {v['last_dice']:.4f} (best {v['best_dice']:.4f})"
    return text + f"; wrote {output}"


@app.command("embedding", epilog=EXAMPLES)
def embedding(
    config: Annotated[Path, input_file_option("--config", help="Training job (YAML): data globs, net, train.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTDIR", show_default=False,
                                         help="Folder for checkpoint.pt, history.json and job.json.")],
    iterations: IterOpt = None,
    stop_after: Annotated[Optional[int], typer.Option(help="Override train.stop_after: end after this many steps "
                                                      "(the learning-rate schedule still spans the iterations).",
                                                      min=1)] = None,
    seed: SeedOverrideOpt = None,
    sam_rho: SamRhoOpt = None,
    batch_size: BatchOpt = None,
    resume: ResumeOpt = False,
    threads: TrainThreadsOpt = None,
    device: DeviceOpt = None,
    deterministic: TrainDeterministicOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Self-supervised training of the anatomical embedding network on images alone.

    Two augmented, overlapping views of each volume give exact voxel correspondences; a pixel-wise InfoNCE
    loss with hard negatives trains the global and the local head (recipe: regcli.training.embedding).

    --device (default auto: the GPU when there is one; under torchrun each process its own, cuda:LOCAL_RANK) is
    where the network trains; checkpoint.pt and model/ hold CPU tensors, so --resume may go on on another device.
    """
    from regcli.training.jobs import load_job, run_embedding_job

    ui, dist, dev = _ui(quiet, verbose, json_out, threads, device, deterministic)
    job = load_job(config, _train_overrides(iterations=iterations, stop_after=stop_after, seed=seed,
                                            batch_pairs=batch_size,
                                            sam_rho=sam_rho))
    summary = _with_training_bar(ui, min(job.train.iterations, job.train.stop_after or job.train.iterations),
                                 lambda step: run_embedding_job(job, output, step, ui.info, resume=resume,
                                                                dist=dist, device=dev))
    summary["deterministic"] = deterministic
    ui.result(summary, _volume_summary(summary, output))


DIO_EXAMPLES = examples(
    "regcli train dio --config docs/recipes/dio_v0.yaml -o results/dio_v0 --threads 2",
    "regcli train dio --config docs/recipes/dio_v0.yaml -o results/dio_v0 --resume",
)


@app.command("dio", epilog=DIO_EXAMPLES)
def dio(
    config: Annotated[Path, input_file_option("--config", help="Training job (YAML): labelled data globs, net, "
                                              "train, and the solver (solver: {dio: ..., instance: ...}).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTDIR", show_default=False,
                                         help="Folder for checkpoint.pt, history.json, job.json and model/.")],
    iterations: IterOpt = None,
    seed: SeedOverrideOpt = None,
    sam_rho: SamRhoOpt = None,
    batch_size: BatchOpt = None,
    resume: ResumeOpt = False,
    threads: TrainThreadsOpt = None,
    device: DeviceOpt = None,
    deterministic: TrainDeterministicOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the DIO feature network end to end through the registration solver (implicit differentiation).

    Each step registers the features of a labelled pair with the solver (no graph kept), takes one solver step
    at the optimum with the graph, and trains on the soft Dice of the warped labels (recipe: regcli.training.dio).

    --device (default auto: the GPU when there is one; under torchrun each process its own, cuda:LOCAL_RANK) is
    where the network trains; checkpoint.pt and model/ hold CPU tensors, so --resume may go on on another device.
    """
    from regcli.training.dio import load_dio_job, run_dio_job

    ui, dist, dev = _ui(quiet, verbose, json_out, threads, device, deterministic)
    job = load_dio_job(config, _train_overrides(iterations=iterations, seed=seed, sam_rho=sam_rho,
                                                batch_size=batch_size))
    with ui.progress() as progress:
        started = set()

        def prep(i: int, n: int) -> None:
            if "preparing data" not in started:
                started.add("preparing data")
                progress.start("preparing data", n)
            progress.update("preparing data", i)
            if i >= n:
                progress.finish("preparing data")

        def step(i: int, n: int, rec: dict) -> None:
            if "training" not in started:
                started.add("training")
                progress.start("training", n)
            progress.update("training", i, f"loss {rec['loss']:.3f}")

        summary = run_dio_job(job, output, step, ui.info, resume=resume, prepare_progress=prep, dist=dist,
                              device=dev)
        progress.finish("training")
    summary["deterministic"] = deterministic
    ui.result(summary, _volume_summary(summary, output))


FOUNDATION_EXAMPLES = examples(
    "regcli train foundation --config docs/recipes/foundation_small.yaml -o results/foundation_small --threads 2",
    "regcli train foundation --config job.yaml -o runs/sam --sam-rho 0.05",
    "regcli train foundation --config job.yaml -o runs/ft --init models/unigradicon/ --iterations 200",
    "regcli train foundation --config job.yaml -o runs/try1 --resume",
)


@app.command("foundation", epilog=FOUNDATION_EXAMPLES)
def foundation(
    config: Annotated[Path, input_file_option("--config", help="Training job (YAML): datasets (image globs and/or "
                                              "pairs CSVs, modality), net, train.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTDIR", show_default=False,
                                         help="Folder for checkpoint.pt, history.json, loss.png, job.json and "
                                              "model/.")],
    iterations: IterOpt = None,
    seed: SeedOverrideOpt = None,
    sam_rho: SamRhoOpt = None,
    batch_size: BatchOpt = None,
    optron_iters: OptronItersOpt = None,
    optron_lr: OptronLrOpt = None,
    exclude_task: ExcludeTaskTrainOpt = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", metavar="SPEC", show_default=False,
        help="Fine-tune from these weights (a model folder, e.g. from `regcli weights import unigradicon`, "
             "hub:org/name@commit, or a registry name); the architecture is theirs.")] = None,
    resume: ResumeOpt = False,
    threads: TrainThreadsOpt = None,
    device: DeviceOpt = None,
    deterministic: TrainDeterministicOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the multi-step GradICON network (--method foundation) with the GradICON objective.

    Pairs are drawn equally from every dataset per epoch (inter-subject from image globs, intra-subject from
    pairs CSVs), each image affinely augmented; 1 - LNCC both ways plus the gradient inverse-consistency term
    (recipe: regcli.training.foundation).

    --device (default auto: the GPU when there is one; under torchrun each process its own, cuda:LOCAL_RANK) is
    where the network trains; checkpoint.pt and model/ hold CPU tensors, so --resume may go on on another device.
    """
    from regcli.training.foundation import load_foundation_job, run_foundation_job

    _train_pair_task(load_foundation_job, run_foundation_job, locals())


PROMPTREG_EXAMPLES = examples(
    "regcli train promptreg --config docs/recipes/promptreg_small.yaml -o runs/promptreg --threads 2",
    "# leave one dataset (task) out, then test zero-shot on it",
    "regcli train promptreg --config job.yaml --exclude-task ct -o runs/wo_ct",
    "regcli train promptreg --config job.yaml -o runs/optron --optron-iters 10",
    "torchrun --nproc-per-node 2 -m regcli train promptreg --config job.yaml -o runs/ddp --batch-size 1",
)


@app.command("promptreg", epilog=PROMPTREG_EXAMPLES)
def promptreg(
    config: Annotated[Path, input_file_option("--config", help="Training job (YAML): datasets (each a task; inline or "
                                              "a manifest file), net, train, validation.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTDIR", show_default=False,
                                         help="Folder for checkpoint.pt, history.json, loss.png, job.json and "
                                              "model/.")],
    iterations: IterOpt = None,
    seed: SeedOverrideOpt = None,
    sam_rho: SamRhoOpt = None,
    batch_size: BatchOpt = None,
    optron_iters: OptronItersOpt = None,
    optron_lr: OptronLrOpt = None,
    exclude_task: ExcludeTaskTrainOpt = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", metavar="SPEC", show_default=False, help="Start from these weights (a PromptReg model folder, "
        "hub:org/name@commit, or a registry name).")] = None,
    resume: ResumeOpt = False,
    threads: TrainThreadsOpt = None,
    device: DeviceOpt = None,
    deterministic: TrainDeterministicOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train the task-prompted PromptReg network (--method promptreg) on several datasets, each a task.

    MIND-SSC similarity, smoothness, and the prompt generator's orthogonality and task-similarity losses; the
    network predicts its task mixture itself, so inference needs no task id (recipe: regcli.training.promptreg).

    --device (default auto: the GPU when there is one; under torchrun each process its own, cuda:LOCAL_RANK) is
    where the network trains; checkpoint.pt and model/ hold CPU tensors, so --resume may go on on another device.
    """
    from regcli.training.promptreg import load_promptreg_job, run_promptreg_job

    _train_pair_task(load_promptreg_job, run_promptreg_job, locals())
