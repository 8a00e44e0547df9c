"""Model weights: folder layout, registry, resolution order, integrity, Hub download through a loopback server.

No test uses the internet. ``LoopbackHub`` below is a small HTTP server on 127.0.0.1 that answers the calls
huggingface_hub makes in ``snapshot_download`` (``/api/models/{repo}/revision/{rev}``,
``/api/models/{repo}/tree/{rev}``, ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``) with the headers it checks
(``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``, ``X-Linked-Size``, ``Content-Length``, ``X-Error-Code``).
huggingface_hub is pointed at it through ``HF_ENDPOINT`` and its cache is isolated under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from conftest import child_env, invoke, one_line
from regcli.errors import OutputError, WeightsError
from regcli.weights import (
    MODEL_FILES, list_models, load_registry, load_state_dict, pull, push, resolve, save_model_folder, sha256_file,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ loopback Hub
class LoopbackHub:
    """Serves model folders the way the Hub's API and resolve endpoints do (enough for huggingface_hub 2.x).

    ``add(repo_id, folder)`` publishes a folder's files as a new commit on ``main``; ``corrupt`` holds file
    names whose bytes are flipped on download (headers still advertise the true checksum); ``requests``
    records ``(method, path)`` of every request.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        repo = self.repos.setdefault(repo_id, {"commits": {}, "refs": {}})
        h = hashlib.sha1(repo_id.encode() + str(len(repo["commits"])).encode())
        for name, data in files.items():
            h.update(name.encode() + hashlib.sha256(data).digest())
        commit = h.hexdigest()
        repo["commits"][commit] = files
        repo["refs"][branch] = commit
        return commit

    # -------------------------------------------------------------------------------------------- serving
    @staticmethod
    def _lfs(name: str) -> bool:
        return name.endswith(".safetensors")

    @staticmethod
    def _git_oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, code: str, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, 404, json.dumps({"error": message}).encode(), headers, head)

    def _json(self, h, obj, head: bool) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

    def _commit(self, repo: dict, rev: str) -> str | None:
        if rev in repo["refs"]:
            return repo["refs"][rev]
        return rev if rev in repo["commits"] else None

    def _serve(self, h, head: bool) -> None:
        path = urlsplit(h.path).path
        self.requests.append((h.command, unquote(path)))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            resolve_file = None
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo_id, kind, rev, resolve_file = f"{parts[0]}/{parts[1]}", "resolve", parts[3], "/".join(parts[4:])
        else:
            return self._error(h, "NotFound", f"no route {path}", head)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, "RepoNotFound", f"Repository {repo_id} not found", head)
        commit = self._commit(repo, rev)
        if commit is None:
            return self._error(h, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        files = repo["commits"][commit]
        if kind == "revision":
            return self._json(h, {"id": repo_id, "sha": commit,
                                  "siblings": [{"rfilename": n} for n in files]}, head)
        if kind == "tree":
            entries = []
            for n, data in files.items():
                e = {"type": "file", "path": n, "size": len(data), "oid": self._git_oid(data)}
                if self._lfs(n):
                    e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(e)
            return self._json(h, entries, head)
        if resolve_file not in files:
            return self._error(h, "EntryNotFound", f"{resolve_file} not found", head, commit)
        data = files[resolve_file]
        headers = {"X-Repo-Commit": commit, "Content-Type": "application/octet-stream"}
        if self._lfs(resolve_file):
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{self._git_oid(data)}"'
        if resolve_file in self.corrupt:
            data = bytes([data[0]]) + bytes(b ^ 0xFF for b in data[1:9]) + data[9:] if len(data) > 9 else data
            data = data[:-1] + bytes([data[-1] ^ 0x01])
        self._send(h, 200, data, headers, head)


# ------------------------------------------------------------------------------------------------ fixtures
def make_model(folder: Path, seed: int = 0, version: str = "1.0") -> dict:
    """A tiny model folder built with regcli's own writer; returns its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"conv.weight": torch.randn(4, 1, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}
    config = {"architecture": "TinyEmbed", "arguments": {"channels": 4}, "version": version,
              "preprocessing": {"spacing_mm": 2.0}, "training": {"recipe": "test"}}
    save_model_folder(folder, tensors, config, f"# TinyEmbed {version}\n\nA test model.\n")
    return tensors


def write_registry(weights_dir: Path, **models) -> None:
    weights_dir.mkdir(exist_ok=True)
    (weights_dir / "registry.json").write_text(json.dumps({"models": models}))


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated HF cache, registry dir and loopback Hub; the user's cache and tokens are never touched."""
    hub = LoopbackHub()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("REGCLI_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub read HF_ENDPOINT at import: point its module constants at the loopback server too, so no
    # side request (e.g. its user-agent "agent harness" registry) leaves the machine.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", {"harnesses": {}, "standardEnvVars": []})
    except (ImportError, AttributeError):
        pass
    (tmp_path / "weights").mkdir()
    yield hub
    hub.stop()


@pytest.fixture
def published(env, tmp_path):
    """A tiny model published on the loopback Hub as org/tiny and registered as 'tiny'."""
    src = tmp_path / "src"
    tensors = make_model(src)
    commit = env.add("org/tiny", src)
    sha = sha256_file(src / "model.safetensors")
    write_registry(tmp_path / "weights", tiny={"repo_id": "org/tiny", "revision": commit, "sha256": sha,
                                               "description": "test model"})
    return {"hub": env, "commit": commit, "sha": sha, "tensors": tensors, "src": src}




def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ 1. pull + offline
def test_pull_through_loopback_hub_then_offline_resolve(published, tmp_path, monkeypatch):
    hub, commit = published["hub"], published["commit"]
    model, dest = pull("tiny")
    assert dest is None and model.source == "hub"
    assert model.folder == tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / commit
    assert model.sha256 == published["sha"] and model.revision == commit
    assert sorted(p.name for p in model.folder.iterdir()) == sorted(MODEL_FILES)
    assert ("GET", f"/org/tiny/resolve/{commit}/model.safetensors") in hub.requests

    hub.stop()  # the Hub is gone: from now on only the cache can answer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("tiny", f"hub:org/tiny@{commit}"):
        again = resolve(spec)
        assert again.source == "cache" and again.folder == model.folder and again.sha256 == published["sha"]
        assert_same_tensors(load_state_dict(again), published["tensors"])
    assert again.config["architecture"] == "TinyEmbed" and again.config["sha256"] == published["sha"]


def test_pinned_commit_in_cache_needs_no_network(published):
    hub = published["hub"]
    pull("tiny")
    n = len(hub.requests)
    assert resolve("tiny").source == "cache"  # online, but a cached commit is immutable
    assert len(hub.requests) == n


def test_pull_to_dir_copies_a_verified_folder(published, tmp_path):
    model, dest = pull("tiny", tmp_path / "copy")
    assert dest == tmp_path / "copy" and sorted(p.name for p in dest.iterdir()) == sorted(MODEL_FILES)
    assert not any(p.is_symlink() for p in dest.iterdir())
    assert resolve(str(dest)).source == "local"
    with pytest.raises(OutputError, match="already has"):
        pull("tiny", dest)
    pull("tiny", dest, overwrite=True)


def test_pull_to_overwrite_removes_the_replaced_models_card(env, tmp_path):
    """--to DIR --overwrite with a model that has no README.md: DIR must not keep the previous model's card
    (it would pair one model's weights with another's description)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_model(a, seed=1, version="A")
    make_model(b, seed=2, version="B")
    (b / "README.md").unlink()
    commit_a, commit_b = env.add("org/m", a), env.add("org/m", b)
    dest = tmp_path / "copy"
    pull(f"hub:org/m@{commit_a}", dest)
    assert (dest / "README.md").read_text().startswith("# TinyEmbed A")
    res = invoke("weights", "pull", f"hub:org/m@{commit_b}", "--to", str(dest), "--overwrite", "-q")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]
    assert resolve(str(dest)).config["version"] == "B"


def test_registry_sha_that_disagrees_with_the_hub_is_not_called_corrupted(env, tmp_path):
    """A registry sha256 that is not the pinned commit's file: the download is intact, so the error says the
    entry and the Hub disagree (no --force hint: it would download the same bytes), --force says the same, and
    `weights list` does not count the unverifiable copy as cached."""
    src = tmp_path / "src"
    make_model(src)
    commit = env.add("org/m", src)
    write_registry(tmp_path / "weights", m={"repo_id": "org/m", "revision": commit, "sha256": "0" * 64,
                                            "description": "sha pinned wrong"})
    for force in (False, True):
        with pytest.raises(WeightsError, match=r"registry entry 'm' pins sha256 0{64} .* disagree") as e:
            pull("m", force=force)
        assert "--force" not in str(e.value) and commit in str(e.value) and "\n" not in str(e.value)
    res = invoke("weights", "pull", "m")
    assert res.exit_code == 8 and "disagree" in one_line(res.stderr) and "--force" not in res.stderr
    (m,) = json.loads(invoke("weights", "list", "--json").stdout)["models"]
    assert m["cached"] is False and m["cache"] == "fails verification"
    table = invoke("weights", "list")  # the table says so too, not "no" (as with nothing cached)
    (row,) = [ln.split() for ln in table.stdout.splitlines() if ln.startswith("m ")]
    assert table.exit_code == 0 and row[3:6] == ["no", "fails", "verification"], table.stdout


def test_cli_pull_then_offline_info_in_subprocesses(published, tmp_path):
    """The real environment-variable path: HF_ENDPOINT / HF_HUB_OFFLINE set before huggingface_hub imports."""
    hub, commit = published["hub"], published["commit"]
    env = child_env(HF_HUB_DISABLE_PROGRESS_BARS="1")
    r = subprocess.run([sys.executable, "-m", "regcli", "weights", "pull", "tiny", "--json"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["source"] == "hub" and out["sha256"] == published["sha"] and out["revision"] == commit
    hub.stop()
    env.update({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "regcli", "weights", "info", "tiny", "--json"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["source"] == "cache" and info["folder"] == out["folder"] and info["architecture"] == "TinyEmbed"


# ------------------------------------------------------------------------------------------------ 2. corruption
def test_corrupted_cached_file_is_refused_in_one_line(published, monkeypatch):
    model, _ = pull("tiny")
    blob = model.weights_file.resolve()  # the cache's blob behind the snapshot symlink
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="is corrupted: sha256 [0-9a-f]{64} does not match the pinned") as e:
        resolve("tiny")
    assert str(model.weights_file) in str(e.value) and "\n" not in str(e.value)
    res = invoke("weights", "info", "tiny")
    assert res.exit_code == 8
    line = one_line(res.stderr)
    assert line.startswith("WeightsError: weights file '") and "corrupted" in line and "pull tiny --force" in line
    assert res.stdout == ""


def test_corrupted_download_is_refused_and_force_repairs(published):
    hub = published["hub"]
    hub.corrupt.add("model.safetensors")
    with pytest.raises(WeightsError, match="corrupted"):
        pull("tiny")
    res = invoke("weights", "pull", "tiny")
    assert res.exit_code == 8 and "corrupted" in one_line(res.stderr)
    hub.corrupt.clear()
    model, _ = pull("tiny", force=True)
    assert model.sha256 == published["sha"] and model.source == "hub"


def test_hub_spec_checks_config_sha_and_safetensors_format(env, tmp_path):
    src = tmp_path / "src"
    make_model(src)
    (src / "model.safetensors").write_bytes(b"\x00" * 40)  # not safetensors, and not the config's sha256
    commit = env.add("org/broken", src)
    # the bytes are the Hub's own (intact download): its config.json's sha256 is wrong, no --force can mend that
    with pytest.raises(WeightsError, match=r"config\.json of org/broken@.* does not match its weights") as e:
        resolve(f"hub:org/broken@{commit}")
    assert "--force" not in str(e.value)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["sha256"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        resolve(str(src))


# ------------------------------------------------------------------------------------------------ 3. resolution order
def test_explicit_path_beats_registry_name(published, tmp_path, monkeypatch):
    local = tmp_path / "cwd" / "tiny"
    local.parent.mkdir()
    make_model(local, seed=5, version="local")
    monkeypatch.chdir(local.parent)
    r = resolve("tiny")
    assert r.source == "local" and r.config["version"] == "local"
    assert published["hub"].requests == []
    f = resolve(str(local / "model.safetensors"))  # a weights file next to its config
    assert f.source == "local" and f.weights_file == local / "model.safetensors"
    (tmp_path / "cwd" / "plain").mkdir()  # a same-named folder that is not a model does not hide a registry name
    monkeypatch.chdir(tmp_path / "cwd" / "plain")
    (tmp_path / "cwd" / "plain" / "tiny").mkdir()
    with pytest.raises(WeightsError, match="offline"):
        resolve("tiny", offline=True)  # reached the registry (and the cache), not "not a model folder"


def test_shipped_folder_beats_download(published, tmp_path):
    shipped = tmp_path / "weights" / "tiny"
    make_model(shipped)  # same seed: same bytes as the published model
    r = resolve("tiny")
    assert r.source == "shipped" and r.folder == shipped and r.sha256 == published["sha"]
    assert published["hub"].requests == []
    with pytest.raises(WeightsError, match="corrupted"):  # a shipped folder must match the registry too
        make_model(tmp_path / "other", seed=9)
        for n in MODEL_FILES:
            (shipped / n).write_bytes((tmp_path / "other" / n).read_bytes())
        resolve("tiny")


def test_unpublished_entry_is_served_by_its_shipped_folder_only(env, tmp_path):
    """A registry entry with repo_id and revision null: a model shipped in weights/NAME/ that is not on the Hub."""
    shipped = tmp_path / "weights" / "local-only"
    make_model(shipped)
    sha = sha256_file(shipped / "model.safetensors")
    write_registry(tmp_path / "weights", **{"local-only": {"repo_id": None, "revision": None, "sha256": sha}})
    r = resolve("local-only")
    assert r.source == "shipped" and r.repo_id is None and r.revision is None and r.sha256 == sha
    listed = {m["name"]: m for m in list_models()}
    assert listed["local-only"]["shipped"] and not listed["local-only"]["cached"]
    for n in MODEL_FILES:
        (shipped / n).unlink()
    with pytest.raises(WeightsError, match="not published on the Hub and its shipped folder"):
        resolve("local-only")
    assert env.requests == []  # nothing was asked of the Hub
    write_registry(tmp_path / "weights", half={"repo_id": "org/x", "revision": None, "sha256": sha})
    with pytest.raises(WeightsError, match="missing revision"):
        load_registry()


def test_unknown_name_lists_known_names(published):
    with pytest.raises(WeightsError) as e:
        resolve("nosuchmodel")
    msg = e.value.one_line()
    assert msg.startswith("WeightsError: unknown model 'nosuchmodel'") and "known names: tiny" in msg
    res = invoke("weights", "info", "nosuchmodel")
    assert res.exit_code == 8 and "known names: tiny" in one_line(res.stderr)


def test_bad_folders_and_specs_are_one_line_errors(env, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="needs config.json and model.safetensors"):
        resolve(str(tmp_path / "empty"))
    for spec in ("hub:noslash", "hub:org/name@", "hub:"):
        with pytest.raises(WeightsError, match="not a Hub model spec"):
            resolve(spec)
    with pytest.raises(WeightsError, match="not found on"):
        resolve("hub:org/missing@main")
    env.add("org/tiny", _folder(tmp_path / "m"))
    with pytest.raises(WeightsError, match="revision 'v9' not found"):
        resolve("hub:org/tiny@v9")


def _folder(path: Path) -> Path:
    make_model(path)
    return path


def test_malformed_registry_is_a_weights_error(env, tmp_path):
    reg = tmp_path / "weights" / "registry.json"
    reg.write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read the weights registry"):
        load_registry()
    write_registry(tmp_path / "weights", x={"repo_id": "org/x", "revision": "main", "sha256": "abc"})
    with pytest.raises(WeightsError, match="sha256 must be 64 hex"):
        load_registry()
    write_registry(tmp_path / "weights", x={"repo_id": "nope", "revision": "main", "sha256": "a" * 64})
    with pytest.raises(WeightsError, match="not of the form org/name"):
        load_registry()


def test_repository_registry_file_is_valid():
    """The committed weights/registry.json parses, and every shipped model in weights/ passes its checks
    (registry sha256, config.json sha256, safetensors header), builds its network and stays under 20 MB."""
    registry = load_registry(ROOT / "weights" / "registry.json")
    assert isinstance(registry, dict)
    for name in registry:
        folder = ROOT / "weights" / name
        if not folder.is_dir():
            continue
        assert sum(p.stat().st_size for p in folder.iterdir()) < 20 * 2**20
        model = resolve(str(folder))
        assert model.sha256 == registry[name].sha256 and (folder / "README.md").is_file()
        if model.config["architecture"] == "regcli-sam-embedding":
            from regcli.models.embedding import embedding_from

            embedding_from(model)
        elif model.config["architecture"] == "regcli-dio-features":
            from regcli.models.dio import dio_from

            dio_from(model)
        elif model.config["architecture"] == "gradicon-multistep":
            from regcli.models.gradicon import gradicon_from

            gradicon_from(model)
        elif model.config["architecture"] == "promptreg":
            from regcli.models.promptreg import promptreg_from

            net = promptreg_from(model)
            assert len(model.config["training"]["tasks"]) == net.cfg.num_tasks
        else:
            raise AssertionError(f"shipped model '{name}' has an architecture no test builds")


@pytest.mark.parametrize("key", ["net", "architecture"])
def test_a_config_without_net_or_architecture_does_not_load(tmp_path, key):
    """config.json without "net" must not build the network with default settings (a 4 mm model would run at
    2 mm unnoticed); without "architecture" the error names the missing key, not a 'None' architecture. Every
    shipped folder (weights/ and the package's regcli/_weights) has both keys."""
    from regcli.models.embedding import EmbeddingConfig, EmbeddingNet, load_embedding
    from regcli.weights import save_network

    cfg = EmbeddingConfig(widths=(4, 8, 8, 8), global_dim=8, local_dim=8, context_dilations=(1, 2), spacing_mm=4.0)
    folder = save_network(EmbeddingNet(cfg), tmp_path / "m4", "regcli-sam-embedding", "# card\n")
    assert load_embedding(str(folder)).cfg.spacing_mm == 4.0
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as e:
        load_embedding(str(folder))
    msg = str(e.value)
    assert str(folder / "config.json") in msg and f'no "{key}" key' in msg and "None" not in msg, msg
    res = invoke("weights", "info", folder)  # not "looks fine" for a folder that registration refuses
    assert res.exit_code == 8 and one_line(res.stderr) == e.value.one_line(), res.output
    for base in (ROOT / "weights", ROOT / "regcli" / "_weights"):
        for shipped in sorted(base.glob("*/config.json")):
            config = json.loads(shipped.read_text())
            assert "architecture" in config and isinstance(config.get("net"), dict), shipped


def test_weights_info_builds_regcli_networks_and_refuses_broken_folders(tmp_path):
    """`weights info` on a regcli network builds it as registration would (and says so in its checks); a folder
    without config.json, with a config.json that is not JSON, or with an empty model.safetensors (with or without
    a sha256 in config.json) is a one-line WeightsError (exit 8)."""
    from regcli.models.embedding import EmbeddingConfig, EmbeddingNet
    from regcli.weights import save_network

    cfg = EmbeddingConfig(widths=(4, 8, 8, 8), global_dim=8, local_dim=8, context_dilations=(1, 2))
    good = save_network(EmbeddingNet(cfg), tmp_path / "good", "regcli-sam-embedding", "# card\n")
    res = invoke("weights", "info", good, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["checks"][-1] == "builds its regcli-sam-embedding network"
    cases = {"no config.json": "is not a model folder: it needs config.json",
             "config.json not JSON": "cannot read model config",
             "empty weights": "is corrupted: sha256",
             "empty weights, no sha256": "is not a valid safetensors file"}
    for case, expected in cases.items():
        folder = tmp_path / case.replace(" ", "_").replace(",", "")
        shutil.copytree(good, folder)
        config = folder / "config.json"
        if case == "no config.json":
            config.unlink()
        elif case == "config.json not JSON":
            config.write_text("{not json")
        else:
            (folder / "model.safetensors").write_bytes(b"")
            if "no sha256" in case:
                config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                              if k != "sha256"}))
        res = invoke("weights", "info", folder)
        line = one_line(res.stderr)
        assert res.exit_code == 8 and line.startswith("WeightsError: ") and expected in line, (case, line)


def test_shipped_embedding_pulled_from_loopback_hub_then_offline_samconvex(env, tmp_path):
    """The whole path a user without the shipped folder takes: the registry names a Hub repo pinned at a
    commit; `regcli weights pull` fills the cache; then, offline, `regcli register --method samconvex` finds
    the model there by name, checks it and records where it came from in report.json."""
    from conftest import make_phantom, write

    shipped = ROOT / "weights" / "sam-embedding"
    if not (shipped / "model.safetensors").is_file():
        pytest.skip("no shipped sam-embedding model in weights/")
    commit = env.add("regcli/sam-embedding", shipped)
    sha = sha256_file(shipped / "model.safetensors")
    write_registry(tmp_path / "weights", **{"sam-embedding": {"repo_id": "regcli/sam-embedding", "revision": commit,
                                                              "sha256": sha}})
    run_env = child_env(HF_HUB_DISABLE_PROGRESS_BARS="1")
    r = subprocess.run([sys.executable, "-m", "regcli", "weights", "pull", "sam-embedding", "--json"], env=run_env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "hub"
    env.stop()
    f = write(make_phantom("LPS", "iso"), tmp_path / "f.nii.gz")
    m = write(make_phantom("RAS", "aniso", centre=(3.0, -1.0, 2.0)), tmp_path / "m.nii.gz")
    (tmp_path / "out").mkdir()
    run_env.update({"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "regcli", "register", str(f), str(m), "-o", str(tmp_path / "out" / "p_"),
                        "--method", "samconvex", "--threads", "2", "--json", "--no-html"], env=run_env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    (model,) = report["extra"]["models"]
    assert model["source"] == "cache" and model["sha256"] == sha and model["revision"] == commit
    assert model["spec"] == "sam-embedding" and report["config"]["method"] == "samconvex"
    assert (tmp_path / "out" / "p_1Warp.nii.gz").is_file()


# ------------------------------------------------------------------------------------------------ 4. revision pinning
def test_hub_spec_pins_the_revision(env, tmp_path, caplog):
    old = tmp_path / "v1"
    new = tmp_path / "v2"
    t_old = make_model(old, seed=1, version="1")
    t_new = make_model(new, seed=2, version="2")
    c1 = env.add("org/tiny", old)
    c2 = env.add("org/tiny", new)  # main now points at c2
    r = resolve(f"hub:org/tiny@{c1}")
    assert r.revision == c1 and r.config["version"] == "1"
    assert_same_tensors(load_state_dict(r), t_old)
    paths = [p for _, p in env.requests]
    assert any(f"/resolve/{c1}/" in p for p in paths) and not any("main" in p or c2 in p for p in paths)

    with caplog.at_level(logging.WARNING, logger="regcli.weights"):
        r2 = resolve("hub:org/tiny")  # unpinned: main, with a warning
    assert r2.revision == c2 and r2.config["version"] == "2"
    assert_same_tensors(load_state_dict(r2), t_new)
    assert any("not a commit" in rec.getMessage() for rec in caplog.records)
    assert ("GET", "/api/models/org/tiny/revision/main") in env.requests


# ------------------------------------------------------------------------------------------------ 5. CLI json shapes
def test_cli_list_and_info_json(published, tmp_path):
    res = invoke("weights", "list", "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["registry"] == str(tmp_path / "weights" / "registry.json")
    (m,) = data["models"]
    assert m == {"name": "tiny", "repo_id": "org/tiny", "revision": published["commit"], "sha256": published["sha"],
                 "description": "test model", "shipped": False, "shipped_path": None, "cached": False, "cache": None,
                 "cache_missing": [], "cached_revisions": []}
    assert invoke("weights", "list").stdout.splitlines()[1].split()[3:5] == ["no", "no"]  # shipped, cached
    pull("tiny")
    m = json.loads(invoke("weights", "list", "--json").stdout)["models"][0]
    assert m["cached"] is True and m["cache"] == "verified"
    assert invoke("weights", "list").stdout.splitlines()[1].split()[3:5] == ["no", "yes"]

    res = invoke("weights", "info", "tiny", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    for key in ("spec", "name", "source", "folder", "weights_file", "sha256", "size_bytes", "repo_id", "revision",
                "checks", "architecture", "version", "tensors", "parameters", "readme", "config"):
        assert key in info, key
    assert info["source"] == "cache" and info["name"] == "tiny" and info["tensors"] == 2
    assert info["parameters"] == 4 * 27 + 4 and info["readme"][0] == "# TinyEmbed 1.0"
    assert info["checks"] == ["sha256 = registry entry 'tiny'", "sha256 = config.json", "safetensors header"]
    human = invoke("weights", "info", "tiny")
    assert human.exit_code == 0 and published["sha"] in human.stdout


def test_list_says_which_revision_the_cache_holds(env, tmp_path):
    """`weights list` tells apart the cache states of a registry entry's pinned revision: another revision cached
    (not "no" as with an empty cache), the pinned one verified, its snapshot without the weights file
    (incomplete), and a model not on the Hub ("-"); --json has the state and the cached commits."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_model(a, seed=1, version="A")
    make_model(b, seed=2, version="B")
    commit_a, commit_b = env.add("org/m", a), env.add("org/m", b)
    sha_b = sha256_file(b / "model.safetensors")
    write_registry(tmp_path / "weights", m={"repo_id": "org/m", "revision": commit_b, "sha256": sha_b},
                   local={"repo_id": None, "revision": None, "sha256": sha_b})
    make_model(tmp_path / "weights" / "local", seed=2, version="B")

    def listed():
        res = invoke("weights", "list", "--json")
        assert res.exit_code == 0, res.stderr
        table = invoke("weights", "list")
        assert table.exit_code == 0, table.stderr
        rows = {ln.split()[0]: ln for ln in table.stdout.splitlines()[1:]}
        return {m["name"]: m for m in json.loads(res.stdout)["models"]}, rows

    models, rows = listed()
    assert models["m"]["cache"] is None and models["m"]["cached_revisions"] == []
    assert rows["m"].split()[3:5] == ["no", "no"]
    assert models["local"]["cache"] is None and rows["local"].split()[-2:] == ["yes", "-"], rows["local"]
    pull(f"hub:org/m@{commit_a}")  # an older version in the cache, not the pinned one
    models, rows = listed()
    assert models["m"]["cache"] == "other revision" and models["m"]["cached"] is False
    assert models["m"]["cached_revisions"] == [commit_a]
    assert f"no (only revision {commit_a[:12]})" in rows["m"], rows["m"]
    pull("m")
    models, rows = listed()
    assert models["m"]["cache"] == "verified" and models["m"]["cached"] is True
    assert models["m"]["cached_revisions"] == sorted([commit_a, commit_b])
    assert rows["m"].split()[3:5] == ["no", "yes"]
    blob = resolve("m").weights_file.resolve()
    blob.unlink()  # the snapshot's link now points nowhere
    models, rows = listed()
    assert models["m"]["cache"] == "incomplete" and models["m"]["cached_revisions"] == [commit_a]
    assert models["m"]["cache_missing"] == ["model.safetensors"]
    assert "incomplete (no model.safetensors: pull --force)" in rows["m"], rows["m"]
    help_text = invoke("weights", "list", "--help").stdout
    for word in ("cached_revisions", "other revision", "incomplete"):
        assert word in help_text, word


def _break_snapshot(folder: Path, missing: str, tree_listing: bool) -> None:
    """Remove ``missing`` from a cached snapshot, as an interrupted download or a hand deletion leaves it. Without
    ``tree_listing`` the cache's record of the commit's files goes too (caches written by huggingface_hub < 1.x, or
    copied without it): huggingface_hub then returns the incomplete snapshot as if it were whole."""
    (folder / missing).unlink()
    if not tree_listing:
        shutil.rmtree(folder.parents[1] / "trees", ignore_errors=True)
        try:  # huggingface_hub also keeps the listing in memory
            from huggingface_hub import _tree_cache

            _tree_cache._IN_MEMORY_TREE_CACHE.clear()
        except (ImportError, AttributeError):
            pass


@pytest.mark.parametrize("tree_listing", [True, False], ids=["with-tree-listing", "without-tree-listing"])
@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_incomplete_cached_snapshot_is_named_and_pull_repairs_it(published, monkeypatch, missing, tree_listing):
    """A cached snapshot without config.json or model.safetensors: `weights list` calls it incomplete (not
    cached), `weights info` offline or with the Hub unreachable names the missing file and the snapshot folder
    (not "not in the cache", not "the Hub repository has no ...") and says to pull --force, and `weights pull`
    (with --force, or without) completes it."""
    hub = published["hub"]
    folder = pull("tiny")[0].folder
    _break_snapshot(folder, missing, tree_listing)
    asked = len(hub.requests)
    (m,) = json.loads(invoke("weights", "list", "--json").stdout)["models"]
    assert m["cache"] == "incomplete" and m["cached"] is False and m["cache_missing"] == [missing]
    assert m["cached_revisions"] == []
    row = invoke("weights", "list").stdout.splitlines()[1]
    assert f"incomplete (no {missing}: pull --force)" in row, row

    def refused(**env) -> str:
        res = invoke("weights", "info", "tiny", env=env)
        line = one_line(res.stderr)
        assert res.exit_code == 8 and res.stdout == "", line
        assert line.startswith("WeightsError: cannot load 'tiny': the cached snapshot") and f"'{folder}'" in line
        assert f"lacks {missing}" in line and "`regcli weights pull tiny --force`" in line, line
        assert "Hub repository" not in line and "not in the Hugging Face cache" not in line, line
        return line

    assert "HF_HUB_OFFLINE=1" in refused(HF_HUB_OFFLINE="1")
    assert "cannot be reached" in refused(HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    assert len(hub.requests) == asked  # neither asked the Hub

    res = invoke("weights", "pull", "tiny", *(["--force"] if tree_listing else []), "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["source"] == "hub" and (folder / missing).is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("tiny").source == "cache"
    assert json.loads(invoke("weights", "list", "--json").stdout)["models"][0]["cache"] == "verified"


def test_register_offline_with_an_incomplete_cached_model_says_to_pull_force(env, tmp_path, monkeypatch):
    """`regcli register --method samconvex` offline, with the registry's embedding model cached without its
    config.json: one WeightsError line naming the file and the snapshot, the --force hint, and no output."""
    import regcli.weights
    from conftest import make_phantom, write

    shipped = ROOT / "weights" / "sam-embedding"
    if not (shipped / "model.safetensors").is_file():
        pytest.skip("no shipped sam-embedding model in weights/")
    commit = env.add("regcli/sam-embedding", shipped)
    write_registry(tmp_path / "weights", **{"sam-embedding": {"repo_id": "regcli/sam-embedding", "revision": commit,
                                                              "sha256": sha256_file(shipped / "model.safetensors")}})
    folder = pull("sam-embedding")[0].folder
    _break_snapshot(folder, "config.json", tree_listing=False)
    monkeypatch.setattr(regcli.weights, "_NETWORKS", {})  # no network kept from another test of this process
    f = write(make_phantom("LPS", "iso"), tmp_path / "f.nii.gz")
    m = write(make_phantom("LPS", "iso", centre=(3.0, -1.0, 2.0)), tmp_path / "m.nii.gz")
    (tmp_path / "out").mkdir()
    res = invoke("register", f, m, "-o", tmp_path / "out" / "p_", "--method", "samconvex", "--no-html",
                 env={"HF_HUB_OFFLINE": "1"})
    line = one_line(res.stderr)
    assert res.exit_code == 8, line
    assert f"'{folder}'" in line and "lacks config.json" in line and "pull sam-embedding --force" in line, line
    assert list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------------------------------ 6. offline, nothing cached
def test_offline_with_nothing_cached_says_what_to_do(published, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as e:
        resolve("tiny")
    msg = e.value.one_line()
    assert "HF_HUB_OFFLINE=1" in msg and "regcli weights pull tiny" in msg and "\n" not in msg
    assert published["hub"].requests == []
    res = invoke("weights", "pull", "tiny")  # pull honours offline mode too
    assert res.exit_code == 8 and "regcli weights pull tiny" in one_line(res.stderr)


def test_unreachable_hub_with_nothing_cached_says_what_to_do(published, monkeypatch):
    published["hub"].stop()
    with pytest.raises(WeightsError, match="cannot be reached.*regcli weights pull"):
        resolve("hub:org/tiny@main")


def test_a_hub_that_does_not_resolve_is_one_line_without_retries(env, monkeypatch, caplog):
    """huggingface_hub would retry five times with backoff (~24 s, ten warning lines); regcli probes first."""
    from regcli.weights._hub import unreachable

    monkeypatch.setenv("HF_ENDPOINT", "http://regcli-test.invalid")  # .invalid never resolves (RFC 2606)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(WeightsError, match="host name 'regcli-test.invalid' does not resolve.*weights pull"):
            resolve("hub:org/tiny@main")
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
    res = invoke("weights", "info", "hub:org/tiny@" + "a" * 40)  # a commit: no "branch" warning line
    assert res.exit_code == 8 and "does not resolve" in one_line(res.stderr)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # behind a proxy only the request can tell
    assert unreachable("http://regcli-test.invalid") is None


# ------------------------------------------------------------------------------------------------ save / push
def test_save_model_folder_records_sha_and_refuses_overwrite(tmp_path):
    tensors = make_model(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["sha256"] == sha256_file(tmp_path / "m" / "model.safetensors")
    assert_same_tensors(load_state_dict(resolve(str(tmp_path / "m"))), tensors)
    with pytest.raises(OutputError, match="already has"):
        make_model(tmp_path / "m")
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".regcli-tmp")]
    mask = os.umask(0)
    os.umask(mask)
    # safetensors writes 0600; a shipped model must be readable like any other file
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_push_validates_before_any_network(tmp_path, monkeypatch):
    from regcli.weights import _hub

    calls = []
    monkeypatch.setattr(_hub, "push", lambda *a, **k: calls.append((a, k)) or "c" * 40)
    folder = tmp_path / "m"
    make_model(folder)
    (folder / "README.md").unlink()
    with pytest.raises(WeightsError, match="lacks README.md"):
        push(folder, "org/m")
    (folder / "README.md").write_text("# card\n")
    with pytest.raises(WeightsError, match="not a Hub repository id"):
        push(folder, "nope")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    res = invoke("weights", "push", folder, "--repo", "org/m")
    assert res.exit_code == 8 and "corrupted" in one_line(res.stderr)
    assert calls == []
    make_model(folder.with_name("good"))
    res = invoke("weights", "push", folder.with_name("good"), "--repo", "org/m", "--revision", "v1", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["revision"] == "c" * 40 and out["branch"] == "v1"
    assert out["registry_entry"]["sha256"] == sha256_file(folder.with_name("good") / "model.safetensors")
    assert calls[0][1]["revision"] == "v1"


def test_push_calls_hfapi_create_upload(tmp_path, monkeypatch):
    """The upload wiring, with HfApi replaced (uploading to a real or emulated Hub is out of scope)."""
    import huggingface_hub

    seen = []

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            seen.append(("init", endpoint, token))

        def create_repo(self, repo_id, **kw):
            seen.append(("create_repo", repo_id, kw["exist_ok"], kw["private"]))

        def create_branch(self, repo_id, branch, **kw):
            seen.append(("create_branch", repo_id, branch))

        def upload_folder(self, folder_path, repo_id, **kw):
            seen.append(("upload_folder", Path(folder_path).name, repo_id, kw["revision"], kw["allow_patterns"]))
            return type("CommitInfo", (), {"oid": "d" * 40})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("regcli.weights._hub.unreachable", lambda url: None)  # the fake Hub needs no server
    make_model(tmp_path / "m")
    out = push(tmp_path / "m", "org/m", revision="dev", private=True, token="tok")
    assert out["revision"] == "d" * 40
    assert seen == [("init", "http://127.0.0.1:9", "tok"), ("create_repo", "org/m", True, True),
                    ("create_branch", "org/m", "dev"),
                    ("upload_folder", "m", "org/m", "dev", list(MODEL_FILES))]


def test_weights_help_lists_subcommands():
    res = invoke("weights", "--help")
    assert res.exit_code == 0
    for sub in ("list", "info", "pull", "push"):
        assert sub in res.stdout


def test_wheel_carries_the_shipped_models(tmp_path):
    """A non-editable install has no checkout around it: the wheel must carry weights/ (as regcli/_weights),
    and the installed package must find its shipped models there."""
    import shutil

    pytest.importorskip("setuptools")  # the build backend, used without isolation (no download)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "regcli", src / "regcli", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "weights", src / "weights")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert r.returncode == 0, r.stderr
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("regcli-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = sorted(p.name for p in (ROOT / "weights").iterdir() if (p / "model.safetensors").is_file())
    for name in shipped:
        assert (site / "regcli" / "_weights" / name / "model.safetensors").read_bytes() == \
            (ROOT / "weights" / name / "model.safetensors").read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "REGCLI_WEIGHTS_DIR"}
    env["PYTHONPATH"] = str(site)
    code = ("import json, regcli.weights as w; print(json.dumps([str(w.weights_dir())] + "
            "[w.resolve(n).source for n in sorted(w.load_registry())]))")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    where, *sources = json.loads(r.stdout)
    assert where == str(site / "regcli" / "_weights") and all(s == "shipped" for s in sources)


def test_summary_counts_batch_norm_statistics_apart_from_parameters(tmp_path):
    from safetensors.torch import save_file

    from regcli.weights import safetensors_summary

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    s = safetensors_summary(path)
    assert s["tensors"] == 7
    assert s["parameters"] == sum(p.numel() for p in net.parameters()) == 4 * 27 + 4 + 4 + 4
    assert s["buffer_values"] == 4 + 4 + 1  # running mean, running variance, batches seen
