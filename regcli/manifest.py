"""Dataset manifests: one format for every ``regcli train`` task, ``regcli evaluate`` and ``regcli batch``.

A manifest lists datasets. Each one (:class:`Dataset`) names its images and how to use them::

    datasets:
      - name: brain                     # the dataset's name (default: its folder's name)
        task: brain_mri                 # task name for task prompts and leave-one-out (default: name)
        glob: synthseg_brain/sub-*_T1w.nii.gz    # images; training draws pairs of two of them
        pairs: synthseg_brain/pairs.csv          # and/or a CSV of pairs (regcli evaluate's columns)
        labels_replace: [_T1w, _labels]          # label map of a glob image: its path with this replacement
        label_ids: [2, 3, 4]            # the labels that count (default: every label both maps share)
        modality: mri                   # mri | ct (moving_modality: of the pairs' moving images, if other)
        percentiles: [1, 99]            # intensity window (default: the network's)
        align: affine                   # affine | none: pre-alignment of training pairs (foundation)
        weight: 1.0                     # sampling weight among the datasets
      - name: ct
        glob: totalsegmentator_ct/ct_image.nii.gz
        modality: ct

The same entries may be written inline as a training job's ``data:`` list, or the job may name a manifest file
(``data: datasets.yaml``). A manifest is YAML (``datasets:`` or a top-level list) or CSV (one row per dataset,
the field names as columns; ``labels_replace`` as ``FROM->TO``, ``percentiles`` and ``label_ids`` as
``;``-separated numbers). Relative paths are relative to the manifest (or job) file.

Which fields a consumer reads: every training task reads ``glob``/``pairs``, ``name``, ``task`` and ``weight``
(its draws: each dataset in proportion to its weight); the embedding and DIO also ``percentiles``; DIO and
evaluation ``labels_replace`` and ``label_ids``; the foundation network ``modality``, ``moving_modality`` and
``align``. ``regcli evaluate`` and ``regcli batch`` register the pairs of every dataset that has a ``pairs`` CSV
(``--task`` / ``--exclude-task`` choose datasets by task).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import Field, StrictInt, ValidationError, model_validator

from regcli.config import ConfigModel
from regcli.errors import ConfigError, InputError


class Dataset(ConfigModel):
    """One dataset of a manifest (see the module docstring)."""

    name: str = Field("", description="the dataset's name (default: the folder of its glob or pairs CSV)")
    task: Optional[str] = Field(None, description="task name (default: name)")
    glob: Optional[str] = Field(None, description="images of the dataset (training: random pairs of two of them)")
    pairs: Optional[str] = Field(None, description="CSV of pairs: fixed_image, moving_image and optionally labels, "
                                 "landmarks, masks, pair (regcli evaluate's columns; relative to the CSV)")
    modality: Literal["mri", "ct"] = "mri"
    moving_modality: Optional[Literal["mri", "ct"]] = Field(None, description="of the pairs' moving images, when "
                                                            "it differs (e.g. MR to ultrasound)")
    align: Literal["affine", "none"] = Field(
        "affine", description="foundation training: affine: as --method foundation sees them after regcli's affine "
        "stage (the glob's images aligned to its first image, each pair's moving image to its fixed image); none: "
        "every image's own field of view")
    percentiles: Optional[tuple[float, float]] = Field(None, description="intensity window, percentiles 0 <= low < "
                                                       "high <= 100 (default: the network's)")
    labels_replace: tuple[str, str] = Field(("_T1w", "_labels"), description="a glob image's label map is its path "
                                            "with the first string replaced by the second")
    label_ids: Optional[tuple[StrictInt, ...]] = Field(None, description="the labels that count (default: all "
                                                       "shared)")
    weight: float = Field(1.0, gt=0, description="sampling weight among the datasets")

    @model_validator(mode="after")
    def _check(self) -> "Dataset":
        if not self.glob and not self.pairs:
            raise ValueError(f"dataset '{self.name or '?'}' needs a glob of images or a pairs CSV")
        if not self.name:
            src = Path(self.glob or self.pairs)
            object.__setattr__(self, "name", src.parent.name or src.stem)
        if self.percentiles is not None and not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"dataset '{self.name}': percentiles must be [low, high] with 0 <= low < high <= 100, "
                             f"got {list(self.percentiles)}")
        if not self.labels_replace[0]:
            raise ValueError(f"dataset '{self.name}': labels_replace needs a non-empty string to replace")
        return self

    @property
    def task_name(self) -> str:
        return self.task or self.name


def read_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows of a CSV file, cells stripped, each row with the file line it starts on (blank
    lines skipped, so the number is the one an editor shows). ``what`` names the file in errors.

    Raises:
        InputError: one line naming the file and the line: text that is not UTF-8, a column named twice in the
            header, or a row with more (non-empty) fields than the header has.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # utf-8-sig: the byte-order mark that Excel's "CSV UTF-8" writes
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{what} '{path}' line {line}: not UTF-8 text (save it as UTF-8)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: Optional[list[str]] = None
    rows: list[tuple[int, dict[str, str]]] = []
    last = 0
    try:
        for fields in reader:
            line, last = last + 1, reader.line_num
            if header is None:
                header = [h.strip() for h in fields]
                dup = next((h for i, h in enumerate(header) if h and h in header[:i]), None)
                if dup is not None:
                    raise InputError(f"{what} '{path}' line {line}: column '{dup}' appears twice in the header")
            elif fields:
                if any(f.strip() for f in fields[len(header):]):
                    raise InputError(f"{what} '{path}' line {line}: more fields than the header has "
                                     f"({len(fields)} > {len(header)})")
                rows.append((line, {h: f.strip() for h, f in zip(header, fields)}))
    except csv.Error as e:
        raise InputError(f"{what} '{path}' line {last + 1}: not a CSV text file ({e})") from None
    return header or [], rows


def _csv_row(row: dict[str, str], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        k, v = (k or "").strip(), (v or "").strip()
        if not v:
            continue
        if k == "labels_replace":
            if "->" not in v:
                raise InputError(f"{where}: labels_replace must read FROM->TO, got '{v}'")
            out[k] = tuple(v.split("->", 1))
        elif k in ("percentiles", "label_ids"):
            kind = float if k == "percentiles" else int
            try:
                out[k] = [kind(x) for x in v.replace(",", ";").split(";") if x.strip()]
            except ValueError:
                raise InputError(f"{where}: {k} must be {'numbers' if kind is float else 'integers'} separated by "
                                 f"';', got '{v}'") from None
        else:
            out[k] = v
    return out


def read_manifest_entries(path: str | Path) -> list[dict]:
    """The dataset entries of a manifest file (YAML or CSV) as dicts, their paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dataset manifest '{path}' does not exist")
    if path.suffix.lower() == ".csv":
        _, rows = read_csv(path, "dataset manifest")
        entries = [_csv_row(r, f"dataset manifest '{path}' line {line}") for line, r in rows]
    else:
        try:
            from regcli.config import yaml_safe_load

            data = yaml_safe_load(path.read_text())
        except Exception as e:  # yaml.YAMLError, UnicodeDecodeError
            raise ConfigError(f"dataset manifest '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        entries = data.get("datasets") if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"dataset manifest '{path}' must hold a list of datasets (under 'datasets:')")
    if not entries:
        raise InputError(f"dataset manifest '{path}' lists no dataset")
    return resolve_paths(entries, path.parent)


def resolve_paths(entries: Sequence[dict], base: Path) -> list[dict]:
    """Copies of dataset entries with relative ``glob`` and ``pairs`` made relative to ``base``."""
    out = []
    for e in entries:
        e = dict(e)
        for key in ("glob", "pairs"):
            if isinstance(e.get(key), str) and not Path(e[key]).is_absolute():
                e[key] = str(base / e[key])
        out.append(e)
    return out


def load_datasets(path: str | Path) -> list[Dataset]:
    """The validated datasets of a manifest file (one-line ConfigError on a bad entry)."""
    from regcli.config import validation_details

    entries = read_manifest_entries(path)
    try:
        return [Dataset.model_validate(e) for e in entries]
    except ValidationError as e:
        raise ConfigError(f"invalid dataset manifest '{path}': {validation_details(e)}") from None


def select(datasets: Sequence[Dataset], tasks: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Dataset]:
    """The datasets whose task is in ``tasks`` (all when empty) and not in ``exclude``."""
    known = {d.task_name for d in datasets}
    for t in (*tasks, *exclude):
        if t not in known:
            raise ConfigError(f"unknown task '{t}'; the manifest's tasks are {', '.join(sorted(known))}")
    out = [d for d in datasets if (not tasks or d.task_name in tasks) and d.task_name not in exclude]
    if not out:
        raise ConfigError("no dataset is left after --task/--exclude-task")
    return out


def is_dataset_manifest(path: str | Path) -> bool:
    """A dataset manifest (YAML, or a CSV with a glob or pairs column) rather than a CSV of image pairs."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return True
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:  # the header only: the reader of either kind reports what is wrong further on
        with path.open("rb") as f:
            first = f.readline().decode("utf-8-sig", errors="replace")
    except OSError:
        return False  # read_manifest says why it cannot be read
    header = {h.strip() for h in next(csv.reader([first]), [])}
    return "fixed_image" not in header and bool({"glob", "pairs"} & header)


def weighted_counts(weights: Sequence[float], per_unit: int) -> list[int]:
    """Draws of each dataset in a round of ``per_unit`` draws per unit of weight (at least one each)."""
    return [max(1, round(w * per_unit)) for w in weights]


__all__ = ["Dataset", "load_datasets", "read_csv", "read_manifest_entries", "resolve_paths", "select",
           "is_dataset_manifest", "weighted_counts"]
