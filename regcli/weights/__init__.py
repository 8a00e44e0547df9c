"""Model weights: folders laid out as Hub model repositories, a registry of names, loading with no network.

**Layout.** A model is a folder with three files, exactly like a Hugging Face Hub model repository:

* ``config.json``: architecture and its constructor arguments, preprocessing, training recipe, ``version``,
  and ``sha256`` (hex sha256 of ``model.safetensors``, written by :func:`save_model_folder`);
* ``model.safetensors``: the tensors (never pickles);
* ``README.md``: the model card (training data, intended use, metrics measured with regcli).

Shipped models live in ``weights/<name>/`` at the top of the repository (or ``$REGCLI_WEIGHTS_DIR``), next
to ``weights/registry.json``, which maps short names to a Hub ``repo_id``, a pinned ``revision`` (a commit)
and the ``sha256`` of ``model.safetensors``.

**Resolution order** of a spec (:func:`resolve`):

1. an existing local path: a model folder, or a ``.safetensors`` file whose folder has ``config.json``;
2. ``hub:org/name@revision`` (revision defaults to ``main``, with a warning: only a 40-hex commit is
   reproducible): downloaded with ``huggingface_hub.snapshot_download`` into the Hugging Face cache
   (``HF_HOME``), from ``HF_ENDPOINT``; with ``HF_HUB_OFFLINE=1`` only the cache is used. A commit that
   is already cached is used without any network call;
3. a registry name: ``weights/<name>/`` when shipped, else its ``repo_id@revision`` as in 2.

Anything else is a one-line :class:`~regcli.errors.WeightsError` (exit code 8) naming the spec and the known
names.

**Integrity.** For registry names the sha256 of ``model.safetensors`` must equal the registry's; for any
folder whose ``config.json`` has ``"sha256"``, it must equal that too; and the file must parse as
safetensors. A mismatch is refused: ``weights file '<path>' is corrupted: sha256 <got> does not match the
pinned <want>``.

Example::

    from regcli.weights import resolve, load_state_dict
    model = resolve("hub:org/name@0123456789abcdef0123456789abcdef01234567")
    tensors = load_state_dict(model)          # {name: torch.Tensor}
    net = build(model.config["architecture"], **model.config["arguments"]); net.load_state_dict(tensors)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from regcli.errors import OutputError, WeightsError
from regcli.weights._core import (
    CARD_FILE, CONFIG_FILE, MODEL_FILES, WEIGHTS_FILE, ModelRef, ResolvedModel, load_registry, load_state_dict,
    offline_mode, refuse_existing_model_files, registry_path, resolve, safetensors_summary, save_model_folder,
    sha256_file, shipped_folder, verify_folder, weights_dir,
)

__all__ = [
    "CACHE_STATES", "CARD_FILE", "CONFIG_FILE", "MODEL_FILES", "WEIGHTS_FILE", "ModelRef", "ResolvedModel",
    "list_models", "load_registry", "load_state_dict", "offline_mode", "pull", "push", "registry_path", "resolve",
    "safetensors_summary", "save_model_folder", "sha256_file", "shipped_folder", "verify_folder", "weights_dir",
    "save_network", "build_network", "require_config_key",
]


def list_models() -> list[dict]:
    """Registry entries with where they are available locally (no network).

    Returns:
        One dict per registry name: ``name``, ``repo_id``, ``revision``, ``sha256``, ``description``,
        ``shipped`` (bool), ``shipped_path`` (str or None), ``cached`` (bool: a copy of the pinned revision in
        the Hugging Face cache whose sha256 is the registry's, usable offline), ``cache`` (the state of the
        cache, :data:`CACHE_STATES`), ``cache_missing`` (the model files the pinned revision's snapshot lacks
        when ``cache`` is ``"incomplete"``, else empty) and ``cached_revisions`` (the commits of the repository
        whose snapshot in the cache holds config.json and model.safetensors, sorted; empty for a model not on the
        Hub).
    """
    out = []
    for name, ref in sorted(load_registry().items()):
        shipped = shipped_folder(name)
        cache, missing, revisions = _cached_copy(ref)
        out.append({
            "name": name, "repo_id": ref.repo_id, "revision": ref.revision, "sha256": ref.sha256,
            "description": ref.description, "shipped": shipped is not None,
            "shipped_path": str(shipped) if shipped is not None else None,
            "cached": cache == "verified", "cache": cache, "cache_missing": missing, "cached_revisions": revisions,
        })
    return out


#: :func:`list_models`'s ``cache``: the state of a registry entry's pinned revision in the Hugging Face cache
CACHE_STATES = {
    None: "nothing of the repository is cached (or the model is not on the Hub)",
    "verified": "the pinned revision is cached and its sha256 is the registry's: it loads offline",
    "fails verification": "the pinned revision is cached but its model.safetensors does not match the registry's "
                          "sha256 (damaged, or the entry pins another file): loading refuses it",
    "incomplete": "the pinned revision's snapshot is cached without its config.json or model.safetensors (an "
                  "interrupted download, or a file removed by hand; cache_missing names them): loading needs the "
                  "network, and `regcli weights pull NAME --force` repairs it",
    "other revision": "only other revisions of the repository are cached (cached_revisions), not the pinned one: "
                      "loading needs the network",
}


def _cached_copy(ref: ModelRef) -> tuple[Optional[str], list[str], list[str]]:
    """The state of a registry entry's pinned revision in the Hugging Face cache (a key of
    :data:`CACHE_STATES`), the model files its snapshot lacks, and the commits whose complete snapshots the cache
    holds (no network)."""
    if ref.repo_id is None or ref.revision is None:
        return None, [], []
    from regcli.weights import _hub

    snapshots = _hub.cached_snapshots(ref.repo_id)
    revisions = [commit for commit, missing in snapshots.items() if not missing]
    commit = _hub.cached_commit(ref.repo_id, ref.revision)
    if commit not in snapshots:
        return ("other revision" if revisions else None), [], revisions
    if snapshots[commit]:
        return "incomplete", snapshots[commit], revisions
    found = _hub.cached_weights(ref.repo_id, ref.revision)
    if found is None:  # pragma: no cover - the snapshot holds the file (checked just above)
        return "incomplete", [WEIGHTS_FILE], revisions
    try:
        return ("verified" if sha256_file(found) == ref.sha256 else "fails verification"), [], revisions
    except WeightsError:  # unreadable
        return "fails verification", [], revisions


def pull(spec: str, to: Optional[str | os.PathLike] = None, *, force: bool = False, overwrite: bool = False,
         progress: bool = False) -> tuple[ResolvedModel, Optional[Path]]:
    """Download (or verify what is already there) and optionally copy the model folder to ``to``.

    Without ``to`` the files stay in the Hugging Face cache, where a later :func:`resolve` (even with
    ``HF_HUB_OFFLINE=1``) finds them. With ``to`` the three files are copied into that folder (created if
    its parent exists), each through a temporary name; a model without a card leaves none there (with
    ``overwrite``, the card of the model it replaces is removed).

    Returns:
        (the resolved and verified model, the copy's folder or None).

    Raises:
        WeightsError: as :func:`resolve`. OutputError: ``to`` has model files and ``overwrite`` is False.
    """
    from regcli.io.atomic import atomic_path

    resolved = resolve(spec, force=force, progress=progress)
    if to is None:
        return resolved, None
    dest = Path(to).expanduser()
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"'{dest}' exists and is not a folder")
    if not dest.parent.is_dir():
        raise OutputError(f"output directory '{dest.parent}' does not exist")
    if not overwrite:
        refuse_existing_model_files(dest, f"'{dest}'", "pass --overwrite to replace them")
    try:
        dest.mkdir(exist_ok=True)
        sources = [(resolved.weights_file, WEIGHTS_FILE), (resolved.folder / CONFIG_FILE, CONFIG_FILE)]
        if resolved.readme is not None:
            sources.append((resolved.readme, CARD_FILE))
        for src, name in sources:
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src, tmp)  # follows the cache's symlinks
        if resolved.readme is None and (dest / CARD_FILE).exists():
            (dest / CARD_FILE).unlink()  # the card of the model replaced (--overwrite) would describe another model
    except OSError as e:
        raise OutputError(f"cannot copy the model into '{dest}': {e.strerror or e}") from e
    if sha256_file(dest / WEIGHTS_FILE) != resolved.sha256:
        raise WeightsError(f"copy '{dest / WEIGHTS_FILE}' does not match its source; the disk may be full")
    return resolved, dest


def push(folder: str | os.PathLike, repo_id: str, *, revision: Optional[str] = None, private: bool = False,
         token: Optional[str] = None) -> dict:
    """Verify a model folder and upload it to the Hub; return what a registry entry should pin.

    The folder must hold ``config.json`` with ``"sha256"`` matching ``model.safetensors`` (as written by
    :func:`save_model_folder`) and a ``README.md`` model card.

    Returns:
        ``{"repo_id", "revision" (the new commit sha), "sha256", "branch", "endpoint"}``.

    Raises:
        WeightsError: bad layout or checksum (before any network use), or any Hub failure.
    """
    from regcli.weights import _core, _hub

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"'{folder}' is not a model folder")
    if not _core._REPO_ID.match(repo_id):
        raise WeightsError(f"'{repo_id}' is not a Hub repository id of the form org/name")
    missing = [n for n in MODEL_FILES if not (folder / n).is_file()]
    if missing:
        raise WeightsError(f"model folder '{folder}' lacks {', '.join(missing)}; a pushed model needs "
                           f"{', '.join(MODEL_FILES)} (see weights/README.md)")
    config, sha, _ = verify_folder(folder)
    if not config.get("sha256"):
        raise WeightsError(f"'{folder / CONFIG_FILE}' has no \"sha256\" of {WEIGHTS_FILE}; write the folder with "
                           f"regcli.weights.save_model_folder or add \"sha256\": \"{sha}\"")
    commit = _hub.push(folder, repo_id, revision=revision, private=private, token=token)
    return {"repo_id": repo_id, "revision": commit, "sha256": sha, "branch": revision or "main",
            "endpoint": _hub.endpoint()}


_NETWORKS: dict[str, tuple[str, Any, dict]] = {}  # role -> (spec, network, provenance)


def cached_network(spec: str, build: Callable[[ResolvedModel], Any], role: str) -> tuple[Any, dict]:
    """The network that ``build`` makes from the resolved, verified model ``spec``, and its provenance for
    report.json (with ``role``). Resolved and built once per process; one network is kept per role (a method's
    network), so asking for another spec replaces it."""
    hit = _NETWORKS.get(role)
    if hit is None or hit[0] != spec:
        model = resolve(spec)
        _NETWORKS[role] = (spec, build(model), {"role": role, **model.provenance()})
    return _NETWORKS[role][1], _NETWORKS[role][2]


def save_network(net, folder, architecture: str, model_card: str, training: Optional[dict] = None,
                 version: str = "0", overwrite: bool = False, input_note: str = "scalar image resampled to an "
                 "isotropic grid of spacing_mm"):
    """Write a regcli network (a module with a pydantic ``cfg`` that has ``spacing_mm`` and ``percentiles``) as a
    Hub-layout model folder: ``config.json`` with ``architecture``, ``version``, ``net`` (the config),
    ``preprocessing`` and ``training`` (the recipe), ``model.safetensors``, and the model card as ``README.md``
    (:func:`save_model_folder` adds the sha256). Returns the folder."""
    config = {
        "architecture": architecture,
        "version": version,
        "net": net.cfg.model_dump(mode="json"),
        "preprocessing": {"spacing_mm": net.cfg.spacing_mm, "intensity_percentiles": list(net.cfg.percentiles),
                          "input": input_note},
        "training": training or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save_model_folder(folder, state, config, model_card, overwrite=overwrite)


def require_config_key(model: ResolvedModel, key: str) -> None:
    """A one-line WeightsError naming the model and its ``config.json`` when that lacks ``key`` (``architecture``
    or ``net``, which every regcli network needs: :func:`build_network`)."""
    if key not in model.config:
        raise WeightsError(f"model '{model.spec}': '{model.folder / CONFIG_FILE}' has no \"{key}\" key (a regcli "
                           f"model's {CONFIG_FILE} names its architecture and holds its network configuration, "
                           f"\"net\")")


def build_network(model: ResolvedModel, architecture: str, what: str, config_cls, net_cls, device=None):
    """The network of a resolved, verified model (eval mode): its ``config.json`` must name ``architecture``, its
    ``net`` entry must be there (never defaulted: a model trained at other settings would run silently at the
    defaults) and validate as ``config_cls``, and its tensors fit ``net_cls(cfg)``; anything else is a one-line
    WeightsError naming the model (``what`` names the kind of model in it, e.g. "DIO feature network")."""
    from regcli.errors import folded

    config_path = model.folder / CONFIG_FILE
    for key in ("architecture", "net"):
        require_config_key(model, key)
    if model.config["architecture"] != architecture:
        raise WeightsError(f"model '{model.spec}' is a '{model.config['architecture']}', not {what} "
                           f"('{architecture}')")
    if not isinstance(model.config["net"], dict):
        raise WeightsError(f"model '{model.spec}': \"net\" in '{config_path}' must be an object (the network's "
                           f"configuration)")
    try:
        net = net_cls(config_cls.model_validate(model.config["net"]))
        net.load_state_dict(load_state_dict(model))
    except Exception as e:  # noqa: BLE001 - any mismatch between config and tensors is a weights problem
        raise WeightsError(f"model '{model.spec}' ({model.folder}) does not load: {folded(e, 300)}") from None
    net.eval()
    return net.to(device) if device is not None else net
