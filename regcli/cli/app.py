"""The ``regcli`` command: a Typer app with one module per sub-command.

Error contract (STYLE.md §CLI, RELIABILITY C1, E2, O5):

* a :class:`~regcli.errors.RegcliError` becomes ONE line on stderr (``Kind: message``) and its exit code;
* usage errors (unknown option, missing or unreadable input file) become one line and exit code 2;
* Ctrl-C exits 130; any other exception is a bug: one line, exit code 1;
* ``REGCLI_DEBUG=1`` also prints the traceback.

Only light modules are imported here (typer, the command modules' signatures); torch, SimpleITK and the
regcli internals are imported inside the command functions, so ``regcli --help`` renders fast.
"""

import inspect
import os
import sys
import traceback
from typing import Annotated, Any, Optional, Sequence

import typer
from typer.core import TyperGroup

from regcli import __version__
from regcli.cli import apply as apply_cmd
from regcli.cli import batch as batch_cmd
from regcli.cli import config_cmd, evaluate as evaluate_cmd, info as info_cmd, jacobian as jacobian_cmd
from regcli.cli import register as register_cmd
from regcli.cli import train as train_cmd
from regcli.cli import weights as weights_cmd
from regcli.cli.common import examples
from regcli.errors import EXIT_INTERRUPTED, RegcliError, exit_code_summary, folded


def _exception_types() -> tuple[tuple, tuple]:
    """(ClickException classes, Abort classes). Typer >= 0.17 vendors Click as ``typer._click``."""
    try:
        from typer._click.exceptions import Abort as _CA, ClickException as _CE
    except ImportError:
        try:
            from typer._click.exceptions import ClickException as _CE
            from typer.exceptions import Abort as _CA
        except ImportError:  # pragma: no cover - older Typer on top of Click
            from click.exceptions import Abort as _CA, ClickException as _CE
    return (_CE,), (_CA,)


ClickException, Abort = _exception_types()


def _debug() -> bool:
    return os.environ.get("REGCLI_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _say(line: str) -> None:
    """One line on stderr, written directly (a rich console could wrap it)."""
    try:
        sys.stderr.write(" ".join(line.split()) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # pragma: no cover - closed stderr
        pass


class RegcliGroup(TyperGroup):
    """Top-level group that maps every failure to one line and an exit code."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except ClickException as e:
            if not standalone_mode:
                raise
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else (prog_name or "regcli")
            kind = "UsageError" if e.exit_code == 2 else "Error"
            _say(f"{kind}: {e.format_message()} (see '{where} --help')")
            sys.exit(e.exit_code)
        except Abort:
            if not standalone_mode:
                raise
            _say("Aborted.")
            sys.exit(1)
        except RegcliError as e:
            if _debug():
                traceback.print_exc(file=sys.stderr)
            if not standalone_mode:
                raise
            _say(e.one_line())
            sys.exit(e.exit_code)
        except KeyboardInterrupt:  # pragma: no cover - Typer already maps it to Exit(130)
            _say("Interrupted.")
            sys.exit(EXIT_INTERRUPTED)
        except (SystemExit, GeneratorExit):
            raise
        except BrokenPipeError:  # pragma: no cover - `regcli ... | head`
            sys.exit(1)
        except Exception as e:
            if _debug():
                traceback.print_exc(file=sys.stderr)
            if not standalone_mode:
                raise
            msg = folded(e, 300)
            _say(f"Error: unexpected {type(e).__name__}: {msg} (this is a bug in regcli; rerun with "
                 "REGCLI_DEBUG=1 for the traceback and please report it)")
            sys.exit(1)
        if not standalone_mode:
            return rv
        code = rv if isinstance(rv, int) else 0
        if code == EXIT_INTERRUPTED:
            _say("Interrupted.")
        sys.exit(code)


app = typer.Typer(
    name="regcli",
    cls=RegcliGroup,
    help="3D medical image registration in physical space (affine, then ConvexAdam, SAMConvex, a foundation "
    "network or DIO), with ANTs-compatible outputs.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Run [bold]regcli COMMAND --help[/bold] for a command's options and examples. Exit codes: "
    f"{exit_code_summary()}.\n\n"
    + examples(
        "regcli info fixed.nii.gz",
        "regcli register fixed.nii.gz moving.nii.gz -o out/pair_",
        "regcli apply -i moving.nii.gz -r fixed.nii.gz -t out/pair_1Warp.nii.gz -t out/pair_0GenericAffine.mat "
        "-o moved.nii.gz",
        "regcli evaluate pairs.csv -o results/",
        "regcli batch pairs.csv -o cohort/ --jobs 2 --threads 1",
    ),
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"regcli {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """3D medical image registration in physical space, with ANTs-compatible outputs."""


app.command("register", epilog=register_cmd.EXAMPLES)(register_cmd.register)
app.command("apply", epilog=apply_cmd.EXAMPLES)(apply_cmd.apply)
app.command("jacobian", epilog=jacobian_cmd.EXAMPLES)(jacobian_cmd.jacobian)
app.command("evaluate", epilog=evaluate_cmd.EXAMPLES)(evaluate_cmd.evaluate)
app.command("batch", epilog=batch_cmd.EXAMPLES)(batch_cmd.batch)
app.command("info", epilog=info_cmd.EXAMPLES)(info_cmd.info)
app.add_typer(config_cmd.app, name="config")
app.add_typer(weights_cmd.app, name="weights")
app.add_typer(train_cmd.app, name="train")


def reflowed(text: Optional[str]) -> Optional[str]:
    """``text`` with the single line breaks inside each paragraph joined, so rich wraps it to the terminal.

    Typer (>= 0.2x, rich markup mode) keeps a docstring's line breaks, so a help text written at 110 columns
    wraps raggedly in an 80-column terminal. Paragraphs are separated by blank lines; a paragraph with
    bullets (``- ``, ``* ``), indented lines or Click's ``\\b`` marker is kept as written.
    """
    if not text:
        return text
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        keep = any(ln.startswith(("- ", "* ", "\b", " ", "\t")) for ln in lines)
        out.append(para if keep else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Reflow the help of every command of ``typer_app`` and its sub-apps (see :func:`reflowed`)."""
    for info in typer_app.registered_commands:
        info.help = reflowed(info.help if isinstance(info.help, str) else inspect.getdoc(info.callback))
    for group in typer_app.registered_groups:
        _reflow_help(group.typer_instance)


_reflow_help(app)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point (``regcli``) and ``python -m regcli``."""
    # OpenMP's default spin-waiting makes torch 2-4x slower with 2 threads when another process shares the
    # cores (2 cores: 434 vs 133 ms per ConvexAdam IO step; a whole registration 33 vs 17 s). On an idle machine
    # passive waiting costs 17 % on the CI machine (16.8 vs 14.3 s), after small solves were put on one thread
    # (runtime.threads_for; docs/methods.md, "Performance notes"). Shared machines are the common case for a
    # pipeline tool, so PASSIVE is the default. Set before torch is imported; a user's own OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(args=argv, prog_name="regcli")


if __name__ == "__main__":  # pragma: no cover
    main()
