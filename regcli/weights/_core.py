"""Model folders, the registry of names, resolution of a model spec, integrity checks, save/load.

The huggingface_hub side (download, cache, upload) lives in :mod:`regcli.weights._hub`; this module only
decides *which* folder a spec means and whether its files can be trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from regcli.errors import OutputError, WeightsError, folded

log = logging.getLogger("regcli.weights")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)
REGISTRY_FILE = "registry.json"

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class ModelRef:
    """One registry entry: a short name for a Hub repository pinned at a revision and a checksum.

    Attributes:
        name: the short name users type (``regcli weights info NAME``).
        repo_id: Hub repository ``org/name`` (None: shipped in ``weights/<name>/`` only, not on the Hub).
        revision: a 40-hex commit (reproducible) or a tag/branch (not reproducible; discouraged); None when
            the model is not published (yet): then only the shipped folder can serve the name.
        sha256: hex sha256 of ``model.safetensors`` at that revision; a mismatch is refused.
        description: one line for ``regcli weights list``.
    """

    name: str
    repo_id: Optional[str]
    revision: Optional[str]
    sha256: str
    description: str = ""


@dataclass
class ResolvedModel:
    """A model folder on local disk whose files passed the integrity checks.

    Attributes:
        spec: what the user asked for (path, ``hub:org/name@rev`` or a registry name).
        folder: the folder holding ``config.json`` and ``model.safetensors`` (for the Hugging Face cache, a
            ``snapshots/<commit>`` folder of symlinks: read it, never write into it).
        config: the parsed ``config.json``.
        sha256: hex sha256 of the weights file (as computed now, not as claimed).
        source: ``"local"`` (explicit path), ``"shipped"`` (``weights/<name>/``), ``"cache"`` (Hugging Face
            cache, no network used) or ``"hub"`` (checked against / downloaded from the Hub).
        weights_file: the safetensors file (``folder/model.safetensors`` unless a file path was given).
        repo_id: Hub repository for hub and registry specs, else None.
        revision: the commit the files come from when known (Hub snapshots), else the requested revision.
        name: registry name when the spec was one, else None.
    """

    spec: str
    folder: Path
    config: dict
    sha256: str
    source: str
    weights_file: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    name: Optional[str] = None
    checks: list[str] = field(default_factory=list)

    @property
    def readme(self) -> Optional[Path]:
        p = self.folder / CARD_FILE
        return p if p.is_file() else None

    def provenance(self) -> dict[str, Any]:
        """Which model this is and where it came from, JSON-safe: ``spec``, ``name``, ``source``, ``folder``,
        ``sha256``, ``repo_id``, ``revision``, ``architecture``, ``version`` (for reports and ``weights info``)."""
        return {"spec": self.spec, "name": self.name, "source": self.source, "folder": str(self.folder),
                "sha256": self.sha256, "repo_id": self.repo_id, "revision": self.revision,
                "architecture": self.config.get("architecture"), "version": self.config.get("version")}


# --------------------------------------------------------------------------------------------- registry
def weights_dir() -> Path:
    """The folder of shipped models and ``registry.json``: ``$REGCLI_WEIGHTS_DIR``, else ``regcli/_weights``
    (in a source checkout a link to the top-level ``weights/``; in an installed wheel, the copy that packaging
    made of it), else ``<checkout>/weights``."""
    env = os.environ.get("REGCLI_WEIGHTS_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_weights", package.parent / "weights"):
        if candidate.is_dir():
            return candidate
    return package.parent / "weights"


def registry_path() -> Path:
    return weights_dir() / REGISTRY_FILE


def load_registry(path: str | os.PathLike | None = None) -> dict[str, ModelRef]:
    """Read the registry of model names (``weights/registry.json`` by default).

    Format: ``{"models": {"NAME": {"repo_id": "org/name", "revision": "<40-hex commit>", "sha256": "<64-hex>",
    "description": "..."}}}``. ``repo_id`` and ``revision`` may both be null for a model that is shipped in
    ``weights/NAME/`` but not published on the Hub. A missing file is an empty registry; a malformed one is a
    WeightsError.
    """
    path = Path(path) if path is not None else registry_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read the weights registry '{path}': {e}") from e
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise WeightsError(f"weights registry '{path}' must be a JSON object with a 'models' object")
    out: dict[str, ModelRef] = {}
    for name, entry in models.items():
        where = f"weights registry '{path}', entry '{name}'"
        if not _NAME.match(name):
            raise WeightsError(f"{where}: names may only hold letters, digits, '.', '_' and '-'")
        if not isinstance(entry, dict):
            raise WeightsError(f"{where}: must be an object with repo_id, revision and sha256")
        published = entry.get("repo_id") is not None or entry.get("revision") is not None
        missing = [k for k in (("repo_id", "revision", "sha256") if published else ("sha256",)) if not entry.get(k)]
        if missing:
            raise WeightsError(f"{where}: missing {', '.join(missing)}")
        if published and not _REPO_ID.match(str(entry["repo_id"])):
            raise WeightsError(f"{where}: repo_id '{entry['repo_id']}' is not of the form org/name")
        sha = str(entry["sha256"]).lower()
        if not _SHA256.match(sha):
            raise WeightsError(f"{where}: sha256 must be 64 hex digits")
        out[name] = ModelRef(name=name, repo_id=str(entry["repo_id"]) if published else None,
                             revision=str(entry["revision"]) if published else None,
                             sha256=sha, description=str(entry.get("description", "")))
    return out


def shipped_folder(name: str) -> Optional[Path]:
    """``weights/<name>/`` when it holds a model (config.json and model.safetensors), else None."""
    if not _NAME.match(name):
        return None
    folder = weights_dir() / name
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder
    return None


# --------------------------------------------------------------------------------------------- integrity
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise WeightsError(f"cannot read weights file '{path}': {e.strerror or e}") from e
    return h.hexdigest()


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise WeightsError(f"model folder '{folder}' has no {CONFIG_FILE}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read model config '{path}': {e}") from e
    if not isinstance(cfg, dict):
        raise WeightsError(f"model config '{path}' must hold a JSON object")
    return cfg


_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")  # batch-norm state, not learned


def safetensors_summary(path: Path) -> dict:
    """Names and count of the tensors in a safetensors file, their learned parameters (elements) and their
    ``buffer_values`` (elements of batch-norm statistics, told apart by PyTorch's names); reads the header only.

    Raises:
        WeightsError: the file is not a valid safetensors file (truncated, wrong format).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            numel = buffers = 0
            for k in names:
                n = 1
                for s in f.get_slice(k).get_shape():
                    n *= int(s)
                if k.rsplit(".", 1)[-1] in _BUFFER_NAMES:
                    buffers += n
                else:
                    numel += n
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError
        msg = folded(e, 200)
        raise WeightsError(f"weights file '{path}' is not a valid safetensors file: {msg}") from e
    return {"tensors": len(names), "parameters": numel, "buffer_values": buffers, "names": names, "metadata": meta}


def _check_sha(path: Path, got: str, want: Optional[str], where: str) -> None:
    if want is None:
        return
    want = str(want).lower()
    if got != want:
        raise WeightsError(f"weights file '{path}' is corrupted: sha256 {got} does not match the pinned {want} "
                           f"({where})")


def verify_folder(folder: Path, weights_file: Optional[Path] = None, expected_sha256: Optional[str] = None,
                  expected_from: str = "registry") -> tuple[dict, str, list[str]]:
    """Check a model folder: layout, config.json, checksums, safetensors header.

    Args:
        folder: folder with ``config.json`` and ``model.safetensors``.
        weights_file: the weights file (default ``folder/model.safetensors``).
        expected_sha256: pinned checksum (a registry entry's), checked in addition to ``config.json``'s
            ``"sha256"`` when that key is present.
        expected_from: where the pinned checksum comes from (for the error message).

    Returns:
        (config, sha256 of the weights as computed, list of the checks that passed).

    Raises:
        WeightsError: a missing file, an unreadable config, a checksum mismatch or an unparsable weights file.
    """
    weights_file = weights_file or folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise WeightsError(f"model folder '{folder}' has no {WEIGHTS_FILE}")
    config = read_config(folder)
    got = sha256_file(weights_file)
    checks = []
    _check_sha(weights_file, got, expected_sha256, expected_from)
    if expected_sha256 is not None:
        checks.append(f"sha256 = {expected_from}")
    if config.get("sha256"):
        _check_sha(weights_file, got, config["sha256"], f"{CONFIG_FILE} of '{folder}'")
        checks.append("sha256 = config.json")
    safetensors_summary(weights_file)
    checks.append("safetensors header")
    return config, got, checks


def hub_sha256(path: Path) -> Optional[str]:
    """The sha256 the Hub announced for a file of a Hugging Face cache snapshot, None when unknown.

    huggingface_hub stores a snapshot's files as links to ``blobs/<etag>``, and the etag of a Hub LFS file
    (``model.safetensors``) is the sha256 of its content: the name says what the Hub holds at that commit,
    whatever bytes arrived."""
    try:
        if not path.is_symlink():
            return None
        name = Path(os.path.realpath(path)).name
    except OSError:
        return None
    return name if _SHA256.match(name) else None


def _pin_disagrees_with_hub(folder: Path, expected_sha256: Optional[str], expected_from: str,
                            where: str) -> Optional[str]:
    """Why a Hub snapshot's ``model.safetensors`` fails verification when the file itself is intact (its sha256 is
    the one the Hub announced for it, :func:`hub_sha256`) but a pinned checksum (``expected_sha256``, from
    ``expected_from``, or its ``config.json``'s) says otherwise: the pin and the Hub's content disagree, which
    no download can mend. None when the file is not known to be intact (a damaged download or cache copy)."""
    weights_file = folder / WEIGHTS_FILE
    announced = hub_sha256(weights_file)
    if announced is None:
        return None
    try:
        got = sha256_file(weights_file)
    except WeightsError:
        return None
    if got != announced:
        return None
    if expected_sha256 is not None and str(expected_sha256).lower() != got:
        return (f"the {expected_from} pins sha256 {str(expected_sha256).lower()} for {WEIGHTS_FILE}, but the Hub's "
                f"{WEIGHTS_FILE} of {where} (downloaded intact) has sha256 {got}: the registry entry and the Hub "
                f"content disagree, and downloading again gives the same file; fix the entry's sha256 or revision "
                f"in '{registry_path()}'")
    try:
        claimed = read_config(folder).get("sha256")
    except WeightsError:
        return None
    if claimed and str(claimed).lower() != got:
        return (f"the {CONFIG_FILE} of {where} claims sha256 {str(claimed).lower()} for {WEIGHTS_FILE}, but the "
                f"Hub's {WEIGHTS_FILE} there (downloaded intact) has sha256 {got}: the model was published with "
                f"a config.json that does not match its weights, and downloading again gives the same files")
    return None


# --------------------------------------------------------------------------------------------- resolution
def parse_hub_spec(spec: str) -> tuple[str, Optional[str]]:
    """``hub:org/name@revision`` -> (repo_id, revision or None)."""
    body = spec[len("hub:"):]
    repo_id, sep, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (sep and not revision):
        raise WeightsError(f"'{spec}' is not a Hub model spec: expected hub:org/name or hub:org/name@revision")
    return repo_id, (revision or None)


def is_commit(revision: Optional[str]) -> bool:
    return bool(revision) and bool(_COMMIT.match(revision))


def _warn_unpinned(spec: str, revision: str) -> None:
    if not is_commit(revision):
        log.warning("%s: revision '%s' is a branch or tag, not a commit, so the weights can change; pin a 40-hex "
                    "commit (hub:org/name@<commit>) for reproducible results", spec, revision)


def _local(spec: str) -> Optional[ResolvedModel]:
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    if path.is_dir():
        folder, weights_file = path, path / WEIGHTS_FILE
    elif path.suffix == ".safetensors":
        folder, weights_file = path.parent, path
    else:
        raise WeightsError(f"'{spec}' is neither a model folder nor a .safetensors file")
    if not (folder / CONFIG_FILE).is_file() or not weights_file.is_file():
        if _NAME.match(spec) and spec in load_registry():
            log.debug("'%s' is a folder but not a model folder: using the registry name", spec)
            return None  # a same-named unrelated folder in the working directory does not hide a registry name
        raise WeightsError(f"'{spec}' is not a model folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                           f"(see weights/README.md)")
    config, sha, checks = verify_folder(folder, weights_file)
    return ResolvedModel(spec=spec, folder=folder, config=config, sha256=sha, source="local",
                         weights_file=weights_file, checks=checks)


def _from_hub(spec: str, repo_id: str, revision: str, *, offline: bool, expected_sha256: Optional[str],
              expected_from: str, name: Optional[str] = None, force: bool = False,
              progress: bool = False) -> ResolvedModel:
    from regcli.weights import _hub

    folder, source = _hub.snapshot(repo_id, revision, spec=spec, offline=offline, force=force, progress=progress)
    missing = _hub.missing_files(folder)
    if missing:  # just downloaded (a cached snapshot is complete or downloaded): the Hub repository lacks them
        raise WeightsError(f"Hub repository '{repo_id}' at revision '{revision}' has no {' and '.join(missing)}: "
                           f"it is not a regcli model folder (one needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    commit = folder.name if is_commit(folder.name) else revision
    try:
        config, sha, checks = verify_folder(folder, expected_sha256=expected_sha256, expected_from=expected_from)
    except WeightsError as e:
        pinned_wrong = _pin_disagrees_with_hub(folder, expected_sha256, expected_from, f"{repo_id}@{commit}")
        if pinned_wrong is not None:  # the file is intact: downloading it again gives the same bytes
            raise WeightsError(pinned_wrong) from e
        if source == "cache" or not force:
            raise WeightsError(f"{e}; run `regcli weights pull {spec} --force` to download it again") from e
        raise
    return ResolvedModel(spec=spec, folder=folder, config=config, sha256=sha, source=source,
                         weights_file=folder / WEIGHTS_FILE, repo_id=repo_id, revision=commit, name=name,
                         checks=checks)


def offline_mode(offline: Optional[bool] = None) -> bool:
    """``offline`` if given, else ``HF_HUB_OFFLINE`` read now (huggingface_hub reads it only at import)."""
    if offline is not None:
        return bool(offline)
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        try:
            from huggingface_hub import constants

            return bool(constants.HF_HUB_OFFLINE)
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            return False
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(spec: str, *, offline: Optional[bool] = None, force: bool = False,
            progress: bool = False) -> ResolvedModel:
    """Find a model folder for ``spec`` and check its integrity (see the module docstring for the order).

    Args:
        spec: an existing local path (model folder, or a ``.safetensors`` file next to ``config.json``);
            ``hub:org/name@revision`` (revision defaults to ``main``, with a warning); or a registry name.
        offline: never use the network (default: the ``HF_HUB_OFFLINE`` environment variable).
        force: download Hub files again even when cached (``regcli weights pull --force``).
        progress: show huggingface_hub's download progress bars on stderr.

    Raises:
        WeightsError: nothing matches, the download failed or is impossible offline, a file is missing,
            a checksum does not match, or the weights file is not valid safetensors. One line each.
    """
    spec = str(spec).strip()
    if not spec:
        raise WeightsError("empty model spec: give a path, hub:org/name@revision or a registry name")
    offline = offline_mode(offline)
    if not spec.startswith("hub:"):
        found = _local(spec)
        if found is not None:
            return found
    if spec.startswith("hub:"):
        repo_id, revision = parse_hub_spec(spec)
        revision = revision or "main"
        _warn_unpinned(spec, revision)
        return _from_hub(spec, repo_id, revision, offline=offline, expected_sha256=None, expected_from="",
                         force=force, progress=progress)
    registry = load_registry()
    ref = registry.get(spec)
    if ref is None:
        known = ", ".join(sorted(registry)) or "none"
        raise WeightsError(f"unknown model '{spec}': not an existing path, not hub:org/name@revision, and not a "
                           f"name in the registry '{registry_path()}' (known names: {known})")
    where = f"registry entry '{ref.name}'"
    shipped = shipped_folder(ref.name)
    if shipped is not None:
        config, sha, checks = verify_folder(shipped, expected_sha256=ref.sha256, expected_from=where)
        return ResolvedModel(spec=spec, folder=shipped, config=config, sha256=sha, source="shipped",
                             weights_file=shipped / WEIGHTS_FILE, repo_id=ref.repo_id, revision=ref.revision,
                             name=ref.name, checks=checks)
    if ref.repo_id is None or ref.revision is None:
        raise WeightsError(f"model '{spec}' is not published on the Hub and its shipped folder "
                           f"'{weights_dir() / ref.name}' is missing: reinstall regcli from a full checkout")
    _warn_unpinned(spec, ref.revision)
    return _from_hub(spec, ref.repo_id, ref.revision, offline=offline, expected_sha256=ref.sha256,
                     expected_from=where, name=ref.name, force=force, progress=progress)


# --------------------------------------------------------------------------------------------- save / load
def load_state_dict(resolved: ResolvedModel, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a resolved model: ``{name: torch.Tensor}`` as stored (dtype and shape of the file).

    Raises:
        WeightsError: the file cannot be parsed by safetensors.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(resolved.weights_file), device=device)
    except Exception as e:  # noqa: BLE001
        msg = folded(e, 200)
        raise WeightsError(f"cannot load weights file '{resolved.weights_file}': {msg}") from e


def refuse_existing_model_files(folder: Path, label: str, hint: str) -> None:
    """OutputError ``<label> already has <files>; <hint>`` when ``folder`` holds any of the model files."""
    present = [n for n in MODEL_FILES if (folder / n).exists()]
    if present:
        raise OutputError(f"{label} already has {', '.join(present)}; {hint}")


def save_model_folder(folder: str | os.PathLike, state_dict: dict, config: dict, model_card: str,
                      overwrite: bool = False) -> Path:
    """Write a model folder: ``model.safetensors``, then ``config.json`` (with its ``"sha256"``), then README.md.

    Each file is written to a temporary name and renamed (:func:`regcli.io.atomic.atomic_path`), so a crash
    leaves either the old file or the new one. ``config["sha256"]`` is set to the checksum of the written
    weights (the config is a separate file, so this is not circular).

    Args:
        folder: the model folder (created if missing; its parent must exist).
        state_dict: ``{name: torch.Tensor}``; copied to CPU, contiguous, unshared.
        config: JSON-serialisable dict: architecture, preprocessing, training recipe, version.
        model_card: README.md text (data, intended use, metrics measured with regcli).
        overwrite: replace existing files (refused by default).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    from regcli.io.atomic import atomic_path, atomic_write_text

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"model folder '{folder}' is a file")
    if not overwrite:
        refuse_existing_model_files(folder, f"model folder '{folder}'", "pass overwrite=True")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create model folder '{folder}': {e.strerror or e}") from e
    tensors = {str(k): v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        # safetensors creates the file 0600; give it the mode any new file gets (readable when shipped)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
    cfg = dict(config)
    cfg["sha256"] = sha256_file(folder / WEIGHTS_FILE)
    try:
        text = json.dumps(cfg, indent=2, sort_keys=False)
    except TypeError as e:
        raise OutputError(f"model config for '{folder}' is not JSON-serialisable: {e}") from e
    atomic_write_text(folder / CONFIG_FILE, text + "\n")
    atomic_write_text(folder / CARD_FILE, model_card if model_card.endswith("\n") else model_card + "\n")
    return folder
