"""``regcli train embedding --config job.yaml -o OUTDIR``: self-supervised training of the anatomical embedding."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from regcli.cli.common import JsonOpt, QuietOpt, VerboseOpt, examples, input_file_option

EXAMPLES = examples(
    "regcli train embedding --config docs/recipes/sam_embedding_v0.yaml -o results/embedding_v0",
    "regcli train embedding --config job.yaml -o runs/try1 --iterations 200 --seed 3 --threads 2",
)

app = typer.Typer(help="Train learned components (the anatomical embedding of SAMConvex).", no_args_is_help=True)


@app.command("embedding", epilog=EXAMPLES)
def embedding(
    config: Annotated[Path, input_file_option("--config", help="Training job (YAML): data globs, net, train.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUTDIR", show_default=False,
                                         help="Folder for checkpoint.pt, history.json and job.json.")],
    iterations: Annotated[Optional[int], typer.Option(help="Override train.iterations.", min=1)] = None,
    stop_after: Annotated[Optional[int], typer.Option(help="Override train.stop_after: end after this many steps "
                                                      "(the learning-rate schedule still spans the iterations).",
                                                      min=1)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Override train.seed.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.", min=1)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Self-supervised training of the anatomical embedding network on images alone.

    Two augmented, overlapping views of each volume give exact voxel correspondences; a pixel-wise InfoNCE
    loss with hard negatives trains the global and the local head (recipe: regcli.training.embedding).
    """
    import torch

    from regcli.cli.common import Ui
    from regcli.training.jobs import load_job, run_embedding_job

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    if threads is not None:
        torch.set_num_threads(threads)
    over: dict = {"train": {}}
    if iterations is not None:
        over["train"]["iterations"] = iterations
    if stop_after is not None:
        over["train"]["stop_after"] = stop_after
    if seed is not None:
        over["train"]["seed"] = seed
    job = load_job(config, over)
    with ui.progress() as progress:
        progress.start("training", min(job.train.iterations, job.train.stop_after or job.train.iterations))

        def step(i: int, n: int, rec: dict) -> None:
            progress.update("training", i, f"loss {rec['loss']:.3f}")

        summary = run_embedding_job(job, output, step, ui.info)
        progress.finish("training")
    ui.result(summary, f"trained {summary['iterations']} steps on {summary['volumes']} volumes in "
                       f"{summary['seconds']} s; mean loss of the last 50 steps {summary['final_loss_mean50']:.3f}; "
                       f"wrote {output}")
