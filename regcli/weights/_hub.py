"""The huggingface_hub side: download into (or read from) the Hugging Face cache, and upload.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, when it is
first imported. regcli reads them again at each call and passes ``endpoint``, ``cache_dir`` and
``local_files_only`` explicitly, so a setting made after import (a test, a notebook) is honoured. Caching,
revision pinning and the cache layout are huggingface_hub's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from regcli.errors import WeightsError, folded
from regcli.weights._core import CONFIG_FILE, MODEL_FILES, WEIGHTS_FILE, is_commit

#: the files a snapshot must hold to be a model (the card, README.md, is optional)
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def endpoint() -> str:
    """The Hub URL: ``$HF_ENDPOINT`` now, else huggingface_hub's default."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def cache_dir() -> str:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env = os.environ.get(var, "").strip()
        if env:
            return os.path.expanduser(os.path.expandvars(env))
    home = os.environ.get("HF_HOME", "").strip()
    if home:
        return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _silent_tqdm():
    from tqdm.auto import tqdm

    class _Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Silent


#: seconds to wait for a TCP connection to the Hub before a download or an upload (:func:`unreachable`)
CONNECT_PROBE_S = 5.0


def unreachable(url: str) -> Optional[str]:
    """Why the Hub at ``url`` cannot be reached (its name does not resolve, or nothing accepts a connection
    within :data:`CONNECT_PROBE_S`), or None when it can, or when a proxy stands between (then only the request
    itself can tell). huggingface_hub retries a failed connection five times with backoff (about 24 s and ten
    warning lines) before it gives up; this probe lets regcli say the same in one line at once."""
    import socket
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        return None
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((host, port), timeout=CONNECT_PROBE_S).close()
    except socket.gaierror as e:
        return f"the Hub's host name '{host}' does not resolve ({e.strerror or e})"
    except (OSError, ValueError) as e:
        return f"the Hub at {url} cannot be reached ({getattr(e, 'strerror', None) or e})"
    return None


def _what_to_do(spec: str) -> str:
    return (f"run `regcli weights pull {spec}` on a machine with network access (then copy its Hugging Face "
            f"cache, HF_HOME), or set HF_ENDPOINT to a reachable Hub mirror")


def missing_files(folder: Path) -> list[str]:
    """The model files (:data:`REQUIRED_FILES`) that a snapshot folder lacks; a link whose blob is gone counts as
    missing."""
    return [n for n in REQUIRED_FILES if not (folder / n).is_file()]


def _cached_snapshot(kwargs: dict) -> tuple[Optional[Path], list[str]]:
    """The cache's snapshot folder for ``kwargs`` (no network) and the model files it lacks; (None, []) when the
    cache has no snapshot of that revision. huggingface_hub returns an incomplete snapshot as it is when it has no
    record of the commit's file list, and raises IncompleteSnapshotError (with ``snapshot_path``) when it has."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(**kwargs, local_files_only=True))
    except LocalEntryNotFoundError as e:
        partial = getattr(e, "snapshot_path", None)  # IncompleteSnapshotError (huggingface_hub >= 1.x)
        if not partial:
            return None, []
        folder = Path(partial)
    return folder, missing_files(folder)


def _incomplete(spec: str, repo_id: str, revision: str, folder: Path, missing: list[str], why: str) -> WeightsError:
    return WeightsError(f"cannot load '{spec}': the cached snapshot '{folder}' of {repo_id}@{revision} lacks "
                        f"{' and '.join(missing)} (an interrupted download, or a file removed by hand), and {why}; "
                        f"run `regcli weights pull {spec} --force` with network access to download it again")


def snapshot(repo_id: str, revision: str, *, spec: str, offline: bool, force: bool = False,
             progress: bool = False) -> tuple[Path, str]:
    """The snapshot folder of ``repo_id@revision`` in the Hugging Face cache, downloading it when needed.

    A commit revision already in the cache is used without any network call (a commit never changes), unless
    its snapshot lacks config.json or model.safetensors (:func:`missing_files`): then the missing files are
    downloaded, or, offline or with the Hub unreachable, the error names them and the snapshot folder.

    Returns:
        (folder, source) with source ``"cache"`` (no network) or ``"hub"``.

    Raises:
        WeightsError: offline with nothing (or an incomplete snapshot) cached, Hub unreachable, repository or
            revision not found.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (  # re-exported there by every huggingface_hub >= 0.23
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    url = endpoint()
    cache = cache_dir()
    kwargs = dict(repo_id=repo_id, revision=revision, allow_patterns=list(MODEL_FILES), cache_dir=cache,
                  endpoint=url)
    if not progress:
        kwargs["tqdm_class"] = _silent_tqdm()
    if not force and (offline or is_commit(revision)):
        folder, missing = _cached_snapshot(kwargs)
        if folder is not None and not missing:
            return folder, "cache"
        if offline and folder is not None:
            raise _incomplete(spec, repo_id, revision, folder, missing, "offline mode (HF_HUB_OFFLINE=1) is on")
        if offline:
            raise WeightsError(f"cannot load '{spec}' offline (HF_HUB_OFFLINE=1): {repo_id}@{revision} is not "
                               f"in the Hugging Face cache '{cache}'; {_what_to_do(spec)}")
    if offline:  # force with offline
        raise WeightsError(f"cannot download '{spec}' again: offline mode (HF_HUB_OFFLINE=1) is on")
    why = unreachable(url)
    if why is not None:
        if not force:  # what huggingface_hub would fall back to after its retries: the cached snapshot
            folder, missing = _cached_snapshot(kwargs)
            if folder is not None and not missing:
                return folder, "cache"
            if folder is not None:
                raise _incomplete(spec, repo_id, revision, folder, missing, why)
        raise WeightsError(f"cannot download '{spec}': {why}, and {repo_id}@{revision} is not in the Hugging "
                           f"Face cache '{cache}'; {_what_to_do(spec)}" if not force else
                           f"cannot download '{spec}' again: {why}")
    try:
        folder = snapshot_download(**kwargs, force_download=force)
    except GatedRepoError as e:
        raise WeightsError(f"Hub repository '{repo_id}' on {url} is gated: accept its terms on the Hub and log "
                           f"in (`hf auth login`) or set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise WeightsError(f"Hub repository '{repo_id}' not found on {url} (or it is private: log in with "
                           f"`hf auth login` or set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise WeightsError(f"revision '{revision}' not found in Hub repository '{repo_id}' on {url}") from e
    except LocalEntryNotFoundError as e:
        raise WeightsError(f"cannot download '{spec}': the Hub at {url} cannot be reached and {repo_id}@{revision} "
                           f"is not in the Hugging Face cache '{cache}'; {_what_to_do(spec)}") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        raise WeightsError(f"cannot download '{spec}' from {url}: HTTP {status}; check HF_ENDPOINT and your "
                           f"network") from e
    except (OSError, ValueError) as e:
        msg = folded(e, 200)
        raise WeightsError(f"cannot download '{spec}' from {url}: {type(e).__name__}: {msg}") from e
    except Exception as e:  # noqa: BLE001 - httpx errors and the like: still one line
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "huggingface_hub", "httpcore"):
            raise
        msg = folded(e, 200)
        raise WeightsError(f"cannot download '{spec}' from {url}: {type(e).__name__}: {msg}") from e
    return Path(folder), "hub"


def cached_weights(repo_id: str, revision: str) -> Optional[str]:
    """The path of ``model.safetensors`` of ``repo_id@revision`` in the Hugging Face cache, None when it is not
    there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, WEIGHTS_FILE, cache_dir=cache_dir(), revision=revision)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def cached_snapshots(repo_id: str) -> dict[str, list[str]]:
    """The snapshots of ``repo_id`` in the Hugging Face cache (no network): ``{commit: the model files it lacks}``
    (:func:`missing_files`; non-empty: an incomplete snapshot, e.g. an interrupted download or a file or blob
    removed by hand); empty when the cache holds nothing of the repository."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    try:
        folders = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return {}
    return {p.name: missing_files(p) for p in sorted(folders)}


def cached_commit(repo_id: str, revision: str) -> str:
    """``revision`` as the commit the Hugging Face cache last saw for it (a branch or tag through the cache's
    ``refs/``; a commit, or a name the cache does not know, as given). No network."""
    if is_commit(revision):
        return revision
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    try:
        return ref.read_text().strip() or revision
    except OSError:
        return revision


def push(folder: Path, repo_id: str, *, revision: Optional[str] = None, private: bool = False,
         token: Optional[str] = None, commit_message: Optional[str] = None) -> str:
    """Upload the three model files of ``folder`` to ``repo_id`` (created if missing); return the commit sha.

    Args:
        folder: a verified model folder.
        repo_id: ``org/name`` on the Hub.
        revision: branch to commit to (created from the default branch if missing); default ``main``.
        private: create the repository private (only when it does not exist yet).
        token: Hub token (default: huggingface_hub's login / ``HF_TOKEN``).

    Raises:
        WeightsError: any Hub error (authentication, permissions, network), as one line.
    """
    from huggingface_hub import HfApi

    url = endpoint()
    why = unreachable(url)
    if why is not None:
        raise WeightsError(f"cannot push '{folder}' to {repo_id}: {why}")
    api = HfApi(endpoint=url, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 revision=revision or None, allow_patterns=list(MODEL_FILES),
                                 commit_message=commit_message or f"Upload regcli model from {folder.name}")
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one WeightsError line
        msg = folded(e, 240)
        raise WeightsError(f"cannot push '{folder}' to {repo_id} on {url}: {type(e).__name__}: {msg}") from e
    oid = getattr(info, "oid", None)
    if not oid:
        raise WeightsError(f"pushed '{folder}' to {repo_id} but the Hub returned no commit id")
    return str(oid)
