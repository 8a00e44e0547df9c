"""Error tree. Every error a user can cause is a :class:`RegcliError` with its own exit code.

The CLI turns these into one line on stderr and ``sys.exit(code)``; the traceback is shown only with
``REGCLI_DEBUG=1``. Library code raises them instead of ``assert`` on anything that comes from a user.

Exit codes (listed in README.md and by ``regcli --help``, from :func:`exit_code_summary`):

=====  =====================  ===============================================================
code   class                  meaning
=====  =====================  ===============================================================
1      RegcliError            unexpected failure inside regcli (a bug: please report it)
2      (Typer/Click)          command-line usage: unknown option, missing file argument
3      InputError             an input file cannot be read or is unusable (4D, constant, NaN)
4      GeometryError          physical-space problem: no overlap, sheared header, empty mask
5      ConvergenceError       an optimiser diverged (NaN/Inf loss); nothing is written
6      OutputError            output exists without --overwrite, or cannot be written
7      ConfigError            invalid configuration (YAML or flags)
8      WeightsError           model weights missing, corrupted or checksum mismatch
9      ResourceError          the pre-flight memory estimate is above --max-memory; nothing ran
130    (KeyboardInterrupt)    interrupted by the user (SIGINT); temporary files removed
=====  =====================  ===============================================================
"""

from __future__ import annotations

from typing import Optional


def folded(text: object, limit: Optional[int] = None, sentence: bool = False) -> str:
    """``text`` (anything, e.g. a third-party exception) as one line: whitespace runs, newlines included,
    become single spaces; with ``sentence``, only up to the end of its first sentence (the first ". ": torch's
    messages go on with advice for lines); cut to ``limit`` characters when given."""
    line = " ".join(str(text).split())
    if sentence and (cut := line.find(". ")) > 0:
        line = line[:cut + 1]
    return line if limit is None else line[:limit]


class RegcliError(Exception):
    """Base class of all errors regcli reports to users."""

    exit_code: int = 1
    kind: str = "Error"

    def one_line(self) -> str:
        """The error as a single line ``Kind: message`` (newlines folded)."""
        return f"{self.kind}: {folded(self)}"


class InputError(RegcliError):
    exit_code = 3
    kind = "InputError"


class GeometryError(RegcliError):
    exit_code = 4
    kind = "GeometryError"


class ConvergenceError(RegcliError):
    exit_code = 5
    kind = "ConvergenceError"


class OutputError(RegcliError):
    exit_code = 6
    kind = "OutputError"


class ConfigError(RegcliError):
    exit_code = 7
    kind = "ConfigError"


class WeightsError(RegcliError):
    exit_code = 8
    kind = "WeightsError"


class ResourceError(RegcliError):
    exit_code = 9
    kind = "ResourceError"


EXIT_INTERRUPTED = 130


def exit_code_summary() -> str:
    """The exit codes as one help-text line, ``"0 ok, 1 bug, 2 usage, 3 input, ..."``, from the classes above (so
    the help cannot drift from them)."""
    codes = [(0, "ok"), (1, "bug"), (2, "usage")]
    codes += sorted((c.exit_code, c.kind.removesuffix("Error").lower()) for c in RegcliError.__subclasses__())
    codes.append((EXIT_INTERRUPTED, "interrupted"))
    return ", ".join(f"{code} {what}" for code, what in codes)
