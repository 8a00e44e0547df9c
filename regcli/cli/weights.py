"""``regcli weights list|info|pull|push|import``: model weights in ``weights/``, the registry, and the Hub.

A model SPEC is, in resolution order: an existing local path (model folder or .safetensors file),
``hub:org/name@revision``, or a name from ``weights/registry.json`` (see ``regcli/weights/__init__.py``).
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from regcli.cli.common import JsonOpt, OverwriteOpt, QuietOpt, VerboseOpt, esc, examples

app = typer.Typer(
    help="Model weights: list the registry, inspect, download (pull) and upload (push) model folders, import "
    "official checkpoints. "
    "SPEC is a local folder, hub:org/name@revision, or a registry name.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    epilog=examples("regcli weights list",
                    "regcli weights pull NAME && HF_HUB_OFFLINE=1 regcli register f.nii.gz m.nii.gz -o out/"),
)

SpecArg = Annotated[str, typer.Argument(help="Local model folder, hub:org/name@revision, or a registry name.",
                                        metavar="SPEC", show_default=False)]

LIST_EXAMPLES = examples("regcli weights list", "regcli weights list --json | jq '.models[].name'")
INFO_EXAMPLES = examples(
    "regcli weights info NAME",
    "regcli weights info ./my_model/ --json",
    "regcli weights info hub:org/name@0123456789abcdef0123456789abcdef01234567",
)
PULL_EXAMPLES = examples(
    "regcli weights pull NAME                      # into the Hugging Face cache (HF_HOME)",
    "regcli weights pull hub:org/name@COMMIT --to models/name/",
    "HF_ENDPOINT=https://mirror.example regcli weights pull NAME",
    "regcli weights pull NAME --force              # download again (a corrupted or incomplete cached copy)",
)
PUSH_EXAMPLES = examples(
    "regcli weights push models/name/ --repo org/name",
    "regcli weights push models/name/ --repo org/name --revision v1 --private",
)


def _summary(resolved, with_readme: int = 0) -> dict:
    from regcli.weights import safetensors_summary

    st = safetensors_summary(resolved.weights_file)
    out = {
        **resolved.provenance(),
        "weights_file": str(resolved.weights_file),
        "size_bytes": resolved.weights_file.stat().st_size,
        "checks": list(resolved.checks),
        "tensors": st["tensors"],
        "parameters": st["parameters"],
        "buffer_values": st["buffer_values"],
    }
    if with_readme:
        lines = []
        if resolved.readme is not None:
            try:
                text = resolved.readme.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()][:with_readme]
        out["readme"] = lines
        out["config"] = resolved.config
    return out


def _table(rows: list[tuple[str, str]]):
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, esc(v))
    return t


def _cached_words(m: dict) -> str:
    """The table's "cached" column for one :func:`regcli.weights.list_models` row, in plain words."""
    if m["repo_id"] is None or m["revision"] is None:
        return "-"  # not on the Hub: only the shipped folder serves it
    state, others = m["cache"], [r for r in m["cached_revisions"] if r != m["revision"]]
    if state == "verified":
        return "yes"
    if state == "other revision":
        return (f"no (only revision {others[0][:12]})" if len(others) == 1
                else f"no (only {len(others)} other revisions)")
    if state == "incomplete":
        return f"incomplete (no {' or '.join(m['cache_missing'])}: pull --force)"
    return "no" if state is None else str(state)


def list_(json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """List the registry's model names, their pinned Hub revision and whether they are shipped or cached.

    Nothing is downloaded. "shipped" means weights/NAME/ holds the model (it is then loaded from there). "cached"
    is about the pinned revision in the Hugging Face cache (HF_HOME): "yes" when its copy matches the registry's
    sha256, so it loads with HF_HUB_OFFLINE=1; "fails verification" when its copy does not (loading refuses it);
    "incomplete" when its snapshot lacks config.json or model.safetensors (an interrupted download, a file removed
    by hand: `regcli weights pull NAME --force` repairs it); "no (only revision ...)" when the cache holds other
    revisions only; "no" when it holds nothing of the repository; "-" for a model that is not on the Hub.
    `regcli weights pull NAME` fills or repairs the cache.

    With --json: one object {"weights_dir", "registry", "models"}; each model has "name", "repo_id" and
    "revision" (null when not on the Hub), "sha256", "description", "shipped" (bool), "shipped_path" (or null),
    "cached" (bool: the pinned revision loads offline), "cache" (null, "verified", "fails verification",
    "incomplete" or "other revision"), "cache_missing" (the files an incomplete snapshot lacks) and
    "cached_revisions" (the commits whose complete snapshots the cache holds).
    """
    from rich.table import Table

    from regcli.cli.common import Ui
    from regcli.weights import list_models, registry_path, weights_dir

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    models = list_models()
    data = {"weights_dir": str(weights_dir()), "registry": str(registry_path()), "models": models}
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("name", "repo", "revision", "shipped", "cached", "description"):
        t.add_column(col, no_wrap=col == "cached")
    for m in models:
        t.add_row(esc(m["name"]), esc(m["repo_id"] or "(not on the Hub)"), (m["revision"] or "-")[:12],
                  "yes" if m["shipped"] else "no", esc(_cached_words(m)), esc(m["description"]))
    if not models:
        ui.info(f"No models in the registry '{registry_path()}'.")
    ui.result(data, t if models else None)


def info(spec: SpecArg, json_out: JsonOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = False) -> None:
    """Resolve SPEC, verify its checksums, and show its folder, source, sha256, config and model card.

    A registry name or hub: spec that is not cached is downloaded first (unless HF_HUB_OFFLINE=1). A model of one
    of regcli's network architectures is also built, as registration would load it: a config.json that does not
    describe the network in the weights (no "net", say) is refused with the error loading it would give.
    """
    from regcli.cli.common import Ui
    from regcli.models import network_from
    from regcli.weights import resolve

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    resolved = resolve(spec, progress=not quiet and not json_out and _tty())
    if network_from(resolved) is not None:
        resolved.checks.append(f"builds its {resolved.config['architecture']} network")
    data = _summary(resolved, with_readme=5)
    rows = [("spec", spec), ("source", data["source"]), ("folder", data["folder"]),
            ("sha256", data["sha256"]), ("checks", ", ".join(data["checks"]))]
    if data["repo_id"]:
        rows.append(("hub", f"{data['repo_id']}@{data['revision']}"))
    rows += [("architecture", str(data["architecture"] or "-")), ("version", str(data["version"] or "-")),
             ("tensors", f"{data['tensors']} ({data['parameters']:,} parameters, "
                         + (f"{data['buffer_values']:,} batch-norm statistics, " if data["buffer_values"] else "")
                         + f"{data['size_bytes'] / 1e6:.1f} MB)")]
    if data["readme"]:
        rows.append(("model card", "\n".join(data["readme"])))
    ui.result(data, _table(rows))


def pull(
    spec: SpecArg,
    to: Annotated[Optional[Path], typer.Option("--to", help="Also copy the model folder here (created if missing).",
                                               metavar="DIR", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Download every file again even when cached (repairs a "
                                        "corrupted or incomplete cached copy).")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Download SPEC into the Hugging Face cache (or verify the copy already there) and check its sha256.

    Afterwards the model loads with no network (HF_HUB_OFFLINE=1). The Hub is HF_ENDPOINT (default
    huggingface.co) and the cache is HF_HOME; a corrupted file is refused with exit code 8. A cached copy that
    lacks config.json or model.safetensors is completed; --force downloads every file again (a corrupted copy).
    """
    from regcli.cli.common import Ui
    from regcli.weights import pull as pull_model

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    resolved, dest = pull_model(spec, to, force=force, overwrite=overwrite,
                                progress=not quiet and not json_out and _tty())
    data = _summary(resolved)
    data["copied_to"] = str(dest) if dest is not None else None
    rows = [("spec", spec), ("source", data["source"]), ("folder", data["folder"]), ("sha256", data["sha256"]),
            ("checks", ", ".join(data["checks"]))]
    if dest is not None:
        rows.append(("copied to", str(dest)))
    ui.result(data, _table(rows))


def push(
    folder: Annotated[Path, typer.Argument(help="Model folder (config.json, model.safetensors, README.md).",
                                           metavar="FOLDER", exists=True, file_okay=False, dir_okay=True,
                                           show_default=False)],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository org/name (created if missing).",
                                      metavar="ORG/NAME", show_default=False)],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (default main).",
                                                    metavar="BRANCH", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: `hf auth login` or HF_TOKEN).",
                                                 metavar="TOKEN", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Verify FOLDER (layout, config.json sha256, safetensors) and upload it to the Hub.

    Prints the new commit sha: pin that revision (with the sha256) in weights/registry.json.
    """
    from regcli.cli.common import Ui
    from regcli.weights import push as push_model

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    data = push_model(folder, repo, revision=revision, private=private, token=token)
    data["registry_entry"] = {"repo_id": data["repo_id"], "revision": data["revision"], "sha256": data["sha256"],
                              "description": ""}
    ui.result(data, _table([("repo", data["repo_id"]), ("commit", data["revision"]), ("sha256", data["sha256"])]))


IMPORT_EXAMPLES = examples(
    "regcli weights import unigradicon Step_2_final.trch -o models/unigradicon/",
    "regcli weights import multigradicon Step_2_final.trch -o models/multigradicon/ --json",
)


def import_(
    kind: Annotated[str, typer.Argument(help="Which official model the file is: unigradicon or multigradicon.",
                                        metavar="KIND", show_default=False)],
    checkpoint: Annotated[Path, typer.Argument(help="The official checkpoint (a torch.save'd state_dict, e.g. "
                                               "Step_2_final.trch).", metavar="FILE", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="DIR", show_default=False,
                                         help="Model folder to write (config.json, model.safetensors, README.md).")],
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Convert an official uniGradICON/multiGradICON checkpoint into a regcli model folder.

    The file is read as plain tensors (no code in it runs) and must have exactly the official layout (188
    tensors, 70,680,916 parameters); the folder then loads with --method foundation and `regcli weights info`.
    """
    from regcli.cli.common import Ui
    from regcli.models.gradicon import import_official

    ui = Ui(quiet=quiet, verbose=verbose, json=json_out)
    data = import_official(kind, checkpoint, output, overwrite=overwrite)
    ui.result(data, _table([("kind", data["kind"]), ("source", data["source"]),
                            ("source sha256", data["source_sha256"]), ("folder", data["folder"]),
                            ("tensors", f"{data['tensors']} ({data['parameters']:,} parameters)"),
                            ("sha256", data["sha256"])]))


def _tty() -> bool:
    from regcli.cli.common import stderr_is_tty

    return stderr_is_tty()


app.command("list", epilog=LIST_EXAMPLES)(list_)
app.command("info", epilog=INFO_EXAMPLES)(info)
app.command("pull", epilog=PULL_EXAMPLES)(pull)
app.command("push", epilog=PUSH_EXAMPLES)(push)
app.command("import", epilog=IMPORT_EXAMPLES)(import_)
