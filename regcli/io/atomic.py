"""Atomic output: write to a temporary file in the target directory, fsync, then ``os.replace``.

A crash (or Ctrl-C) leaves the target either absent or unchanged, never half-written. A
:class:`OutputSet` groups the files of one command so that *all* of them appear together only when the
whole computation has succeeded.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from regcli.errors import OutputError, folded

_TMP_MARK = ".regcli-tmp-"


def temp_path_for(path: str | os.PathLike) -> Path:
    """A temporary sibling of ``path`` that keeps its extension (SimpleITK picks writers by extension)."""
    path = Path(path)
    return path.with_name(f"{_TMP_MARK}{os.getpid()}-{path.name}")


def shown_name(path: str | os.PathLike) -> str:
    """``path`` as messages name it: a temporary of :func:`temp_path_for` by the output it stands for."""
    path = Path(path)
    mark = f"{_TMP_MARK}{os.getpid()}-"
    return str(path.with_name(path.name[len(mark):])) if path.name.startswith(mark) else str(path)


# --------------------------------------------------------------------------- image names ITK would not write as given
#: the extensions ITK's NIfTI library (niftilib) knows, in lower or upper case (not mixed). It strips one of them
#: from the name before ``.nii``/``.nii.gz`` as well, so ``out.nii.gz.nii.gz`` is written as ``out.nii.gz``,
#: ``x.nii.nii.gz`` as ``x.nii.gz`` and ``a.img.nii`` as ``a.hdr`` (SimpleITK 2.5 / ITK 5.4), without an error.
_NIFTI_LIB_EXTENSIONS = (".nii.gz", ".hdr.gz", ".img.gz", ".nii", ".hdr", ".img", ".nia")


def image_name_problem(name: str) -> Optional[str]:
    """Why ITK would not write an image file named ``name`` (a file name, no folder) under that very name, or
    None. Names that do not end in one of :data:`WRITABLE_IMAGE_EXTENSIONS` are not judged here.

    * a doubled NIfTI extension (``out.nii.gz.nii.gz``, ``x.nii.nii.gz``, ``a.nii.nii``, ``a.img.nii``): ITK
      writes a file under a shorter name and reports success;
    * ``.nii``/``.nii.gz``/``.mha`` not in lower case (``.NII``, ``.nii.GZ``, ``.MHA``): ITK refuses the NIfTI
      names only when writing, and writes ``.MHA`` as a ``.mhd`` + ``.raw`` pair (``.NRRD`` is written as named).
    """
    low = name.lower()
    ext = next((e for e in WRITABLE_IMAGE_EXTENSIONS if low.endswith(e)), None)
    if ext is None:
        return None
    given = name[len(name) - len(ext):]
    if ext != ".nrrd" and given != ext:
        return f"ITK writes '{ext}' files only under a lower-case extension, not '{given}'"
    if ext in (".nii", ".nii.gz"):
        stem = name[:len(name) - len(ext)]
        inner = next((e for e in _NIFTI_LIB_EXTENSIONS if stem.endswith((e, e.upper()))), None)
        if inner is not None:
            base = stem[:len(stem) - len(inner)]
            return (f"doubled extension '{stem[len(base):] + ext}': ITK's NIfTI writer would write the file under "
                    f"a shorter name; name it '{base + ext}'")
    return None


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that ``folder``'s file system takes (255 where it does not say)."""
    try:
        n = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: no os.pathconf (Windows)
        return 255
    return n if isinstance(n, int) and n > 0 else 255


def file_name_length_problem(path: str | os.PathLike, folder: str | os.PathLike) -> Optional[str]:
    """Why ``path``'s name, or the temporary name :func:`temp_path_for` writes first, is too long for ``folder``'s
    file system (bytes of the encoded name against ``PC_NAME_MAX``), or None. Found before any work: the write
    would otherwise fail only at the end (ENAMETOOLONG)."""
    limit = name_max(folder)
    final = len(os.fsencode(Path(path).name))
    if final > limit:
        return f"the file name is {final} bytes, over this file system's {limit}; use a shorter name or prefix"
    tmp = len(os.fsencode(temp_path_for(path).name))
    if tmp > limit:
        return (f"the file name is {tmp} bytes, over this file system's {limit} (with the temporary name regcli "
                f"writes first); use a shorter name or prefix")
    return None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"writer produced no file for '{path}'")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_failure(err: BaseException) -> str:
    """One line on why a write failed: the OS's reason (``No space left on device``), or the last line of a
    SimpleITK exception that names none."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    for reason in ("No space left on device", "Permission denied", "Read-only file system", "File too large"):
        if reason.lower() in text.lower():
            return reason
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return folded(lines[-1] if lines else type(err).__name__, 160)


#: image formats regcli writes: single files, so a temporary can be renamed into place (.mhd/.raw or
#: .hdr/.img pairs reference each other by name)
WRITABLE_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


class OutputSet:
    """Files of one command, staged as temporaries and published together.

    Usage::

        outs = OutputSet(overwrite=False)
        outs.claim(prefix_warp)           # checks before any computation (O2, O3)
        ...
        outs.stage(prefix_warp, lambda tmp: write_field(tmp, field))
        outs.commit()                     # all renamed at once; on any exception call outs.abort()
    """

    def __init__(self, overwrite: bool = False, inputs: Iterable[Optional[str | os.PathLike]] = ()) -> None:
        """``inputs``: the command's input files; none of them may be claimed as an output, even with
        ``overwrite`` (a rerun with ``--overwrite`` and a mistyped name would replace the data it reads)."""
        self.overwrite = overwrite
        self._inputs = [Path(p) for p in inputs if p]
        self._claimed: list[Path] = []
        self._staged: list[tuple[Path, Path]] = []

    def _input_at(self, path: Path) -> Optional[Path]:
        """The input that ``path`` names (the same file, or the same resolved path), if any."""
        if not self._inputs:
            return None
        target = os.path.realpath(path)
        for p in self._inputs:
            try:
                if os.path.realpath(p) == target or (path.exists() and p.exists() and os.path.samefile(p, path)):
                    return p
            except OSError:
                continue
        return None

    def claim(self, path: str | os.PathLike, image: bool = False) -> Path:
        """Check that ``path`` may be written (directory exists and is writable, no clobbering, not an input);
        with ``image``, also that its format is one regcli writes (:data:`WRITABLE_IMAGE_EXTENSIONS`)."""
        path = Path(path)
        if image and not path.name.lower().endswith(WRITABLE_IMAGE_EXTENSIONS):
            two = path.name.lower().endswith((".mhd", ".hdr", ".img", ".img.gz", ".nhdr"))
            raise OutputError(f"output '{path}': " + ("this format writes a header and a data file, which cannot "
                              "be published atomically" if two else "not an image file name") +
                              f"; use {', '.join(WRITABLE_IMAGE_EXTENSIONS)}")
        problem = image_name_problem(path.name) if image else None
        if problem is not None:
            raise OutputError(f"output '{path}': {problem}")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.exists():
            raise OutputError(f"output directory '{parent}' does not exist")
        if not parent.is_dir():
            raise OutputError(f"output directory '{parent}' is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"output directory '{parent}' is not writable")
        name_problem = file_name_length_problem(path, parent)
        if name_problem is not None:
            raise OutputError(f"output '{path}': {name_problem}")
        same = self._input_at(path)
        if same is not None:
            raise OutputError(f"output '{path}' is the input '{same}'; write the output elsewhere")
        if (path.exists() or path.is_symlink()) and not self.overwrite:  # a dangling link is a name taken too
            raise OutputError(f"output '{path}' exists; pass --overwrite to replace it")
        if path.is_dir():
            raise OutputError(f"output '{path}' is a directory")
        self._claimed.append(path)
        return path

    @property
    def claimed(self) -> list[Path]:
        return list(self._claimed)

    def stage(self, path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
        """Write ``path`` through ``writer(tmp_path)`` into a temporary file, to be published by commit."""
        self._staged.append(self._write_one(Path(path), writer))
        return Path(path)

    def stage_many(self, items: list[tuple[str | os.PathLike, Callable[[Path], None]]], workers: int = 2) -> None:
        """:meth:`stage` several files at once, ``workers`` at a time (threads: SimpleITK's writers and zlib
        release the GIL, so compressing two displacement fields takes the time of one on two cores).
        If any writer fails, every temporary of this call is removed and the first error is raised."""
        if workers <= 1 or len(items) <= 1:
            for path, writer in items:
                self.stage(path, writer)
            return
        from concurrent.futures import ThreadPoolExecutor

        n_before = len(self._staged)
        with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
            futures = [pool.submit(self._write_one, Path(p), w) for p, w in items]
        errors = [f.exception() for f in futures if f.exception() is not None]
        done = [f.result() for f in futures if f.exception() is None]
        if errors:
            for tmp, _ in done:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise errors[0]
        self._staged[n_before:n_before] = done

    @staticmethod
    def _write_one(path: Path, writer: Callable[[Path], None]) -> tuple[Path, Path]:
        """Write ``path``'s temporary and check it; a failed write (full disk, a folder that refuses files)
        is a one-line OutputError, and its temporary is removed."""
        from regcli.io.images import written_nifti_problem

        tmp = temp_path_for(path)
        try:
            try:
                writer(tmp)
            except (OSError, RuntimeError) as e:  # RuntimeError: SimpleITK's writers
                raise OutputError(f"cannot write '{path}': {write_failure(e)}") from None
            if not tmp.exists():
                raise OutputError(f"writer produced no file for '{path}'")
            problem = written_nifti_problem(tmp)
            if problem is not None:
                raise OutputError(f"cannot write '{path}': {problem} (is the disk full?)")
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp, path

    def commit(self) -> list[Path]:
        """fsync and rename every staged file to its final name."""
        for tmp, _ in self._staged:
            _fsync(tmp)
        done = []
        for tmp, path in self._staged:
            os.replace(tmp, path)
            done.append(path)
        self._staged.clear()
        return done

    def abort(self) -> None:
        """Remove every staged temporary file (targets are left untouched)."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
