"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It serves what huggingface_hub 2.4.0 calls for downloading and uploading model
repos, so the real client can be pointed at it with ``HF_ENDPOINT``:

- ``POST /api/repos/create`` (409 with the repo url when it exists), ``GET /api/whoami-v2``
- ``GET /api/models/{repo}[/revision/{rev}]`` (repo info, ``?blobs=1`` for sizes and LFS info)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``
- ``POST /api/models/{repo}/preupload/{rev}``, ``POST /api/models/{repo}/commit/{rev}`` (ndjson,
  checks ``parentCommit``), ``POST /api/models/{repo}/branch/{branch}``, ``POST /api/validate-yaml``
- ``POST /{repo}.git/info/lfs/objects/batch`` and ``.../verify``, ``PUT /lfs-upload/...`` (the
  "presigned" upload URL handed out by the batch API)
- ``GET /api/models/{repo}/xet-{read,write}-token/{rev}``: ``casUrl`` is ``local://<folder>``,
  which makes hf_xet use its built-in local CAS simulation (xorbs land in that folder)
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ETag, ``X-Repo-Commit`` and Range support

LFS objects live in ``<root>/lfs/<repo>/<sha256>`` (scoped to a repo, as on the Hub), each
repo's Xet CAS in ``<root>/xet-cas/<repo>``; regular files and commits are kept in memory.
Faults and measurements for tests: ``fail_puts`` (answer the next N uploads with 500),
``upload_delay`` (a slow uplink: seconds per LFS upload or Xet write token),
``hold_puts_after`` / ``hold_xet_tokens_after`` (block further uploads until ``release`` is set,
so a test can kill the client mid-push), ``stats`` (bytes received, uploads, range reads), and
``down_limit`` / ``up_limit`` (a link of that many bytes per second each way, shared by all
connections, as one uplink and one downlink: benchmarks/bench_hub.py).

Run standalone: ``python tests/hub_server.py --root DIR [--port 8123] [--no-xet] [--mbps N]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

TOKEN = "hf_qstream_test_token"
USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".zip")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class Link:
    """One direction of a link of ``rate`` bytes per second, shared by every connection:
    ``take(n)`` returns when ``n`` more bytes fit since the link opened (a token bucket
    without burst beyond 64 KiB)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.sent = 0

    def take(self, n: int) -> None:
        with self.lock:
            now = time.perf_counter()
            self.sent = max(self.sent, int((now - self.t0) * self.rate) - (64 << 10))  # idle time is not credit
            self.sent += n
            due = self.t0 + self.sent / self.rate
        if due > now:
            time.sleep(due - now)


@dataclass(frozen=True)
class Entry:
    """One file in a commit: regular (content in memory) or LFS (content in the store, or in Xet)."""

    size: int
    content: bytes | None = None  # regular files
    sha256: str | None = None  # LFS files
    xet: bool = False  # committed by sha256 after a Xet upload (bytes are in the local CAS, not here)

    @property
    def oid(self) -> str:
        if self.sha256 is None:
            assert self.content is not None
            return git_blob_oid(self.content)
        return git_blob_oid(lfs_pointer(self.sha256, self.size))


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.commits:
            return self.commits[rev]
        matches = [c for oid, c in self.commits.items() if len(rev) >= 7 and oid.startswith(rev)]
        return matches[0] if len(matches) == 1 else None


@dataclass
class Stats:
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status
    put_bytes: int = 0  # LFS upload bytes received (including failed attempts)
    puts: list[str] = field(default_factory=list)  # oids of completed LFS uploads
    put_attempts: int = 0
    failed_puts: int = 0
    range_gets: list[tuple[str, str]] = field(default_factory=list)  # path, Range header
    full_gets: list[str] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)  # header + operations of each accepted commit
    validations: list[list[str]] = field(default_factory=list)  # errors found by each validate-yaml call

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for m, p, _ in self.requests if m == method and rx.search(p))


class HubState:
    def __init__(self, root: Path, xet: bool = True) -> None:
        self.root = Path(root)
        self.lfs_dir = self.root / "lfs"
        self.lfs_dir.mkdir(parents=True, exist_ok=True)
        self.xet_dir = self.root / "xet-cas" if xet else None
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.stats = Stats()
        self.endpoint = ""
        self._counter = 0
        # fault injection
        self.fail_puts = 0
        self.fail_commits = 0  # answer the next N commits with a 500
        self.upload_delay = 0.0  # seconds per LFS upload / Xet write token: a slow uplink
        self.hold_puts_after: int | None = None
        self.hold_xet_tokens_after: int | None = None
        self.xet_tokens = 0
        self.release = threading.Event()
        self.holding = threading.Event()  # set while a request is held
        self.held_done = threading.Event()  # set once a held upload is over: its bytes counted, and stored if whole
        self.down_limit: Link | None = None  # bytes served by resolve (downloads)
        self.up_limit: Link | None = None  # bytes received by LFS uploads

    def reset_faults(self) -> None:
        with self.lock:
            self.fail_puts = 0
            self.fail_commits = 0
            self.upload_delay = 0.0
            self.hold_puts_after = None
            self.hold_xet_tokens_after = None
            self.xet_tokens = 0
        self.release.clear()
        self.holding.clear()
        self.held_done.clear()

    # ------------------------------------------------------------------ store
    def has_object(self, repo_id: str, sha256: str) -> bool:
        return self.object_path(repo_id, sha256).is_file()

    def object_path(self, repo_id: str, sha256: str) -> Path:
        """LFS objects are scoped to a repo, as on the Hub (the batch API is per repo)."""
        return self.lfs_dir / repo_id.replace("/", "--") / sha256

    def cas_dir(self, repo_id: str) -> Path | None:
        """The local Xet CAS of a repo (``casUrl = local://<it>``); per repo, so that dedup
        measured in one test is not helped by another test's uploads."""
        return None if self.xet_dir is None else self.xet_dir / repo_id.replace("/", "--")

    def new_commit(self, repo: Repo, branch: str, files: dict[str, Entry], message: str) -> Commit:
        with self.lock:
            parent = repo.branches.get(branch)
            self._counter += 1
            h = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n{time.time_ns()}".encode())
            for p in sorted(files):
                h.update(f"{p}:{files[p].oid}\n".encode())
            c = Commit(h.hexdigest(), parent, message, files)
            repo.commits[c.oid] = c
            repo.branches[branch] = c.oid
            return c

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            ga = GITATTRIBUTES.encode()
            self.new_commit(repo, "main", {".gitattributes": Entry(len(ga), content=ga)}, "initial commit")
            return repo

    def seed(self, repo_id: str, folder: Path, private: bool = False, skip: tuple[str, ...] = ()) -> str:
        """Create (or update) a repo holding the files of a local folder; returns the commit oid.
        Files named in ``skip`` are left out (to make a broken repo)."""
        repo = self.repos.get(repo_id) or self.create_repo(repo_id, private)
        files = dict(repo.resolve("main").files)
        for p in sorted(Path(folder).rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if not p.is_file() or rel in skip or rel.startswith("."):
                continue
            data = p.read_bytes()
            if rel.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                self.object_path(repo_id, sha).parent.mkdir(parents=True, exist_ok=True)
                self.object_path(repo_id, sha).write_bytes(data)
                files[rel] = Entry(len(data), sha256=sha)
            else:
                files[rel] = Entry(len(data), content=data)
        return self.new_commit(repo, "main", files, f"upload {Path(folder).name}").oid

    def tree(self, repo_id: str, rev: str = "main") -> dict[str, tuple[int, str]]:
        """path -> (size, sha256 for LFS files or git oid for regular files) at a revision."""
        c = self.repos[repo_id].resolve(rev)
        assert c is not None
        return {p: (e.size, e.sha256 or e.oid) for p, e in c.files.items()}

    def read(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        e = self.repos[repo_id].resolve(rev).files[path]
        return e.content if e.content is not None else self.object_path(repo_id, e.sha256).read_bytes()

    def xet_store_bytes(self, repo_id: str) -> int:
        """Bytes of xorbs in a repo's local Xet CAS (what Xet uploads actually stored)."""
        if self.xet_dir is None:
            return 0
        d = self.cas_dir(repo_id) / "xet" / "xorbs" / "xorbs"
        return sum(p.stat().st_size for p in d.glob("*") if p.is_file() and not p.name.endswith(".tagset")) if d.is_dir() else 0


# The Hub's license identifiers (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset("""
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl
gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr
mpl-2.0 odc-by odbl openmdw-1.0 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4
grok2-community gemma unknown other
""".split())
# A model id as the Hub resolves base_model: namespace/name, letters, digits and - _ . (no leading or
# trailing - or ., no "--" or ".."), at most 96 characters each; a local path or a bare folder name is not one.
_MODEL_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[\w](?:[\w.-]{0,94}[\w])?")
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def card_metadata_errors(content: str) -> list[str]:
    """What the Hub says is wrong with a README.md's YAML metadata (empty: valid)."""
    import yaml

    m = re.match(r"\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", content, re.S)
    if not m:
        return []
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"Invalid YAML in the metadata: {e}"]
    if not isinstance(meta, dict):
        return ["The metadata must be a YAML mapping."]
    errors = []
    bases = meta.get("base_model")
    for b in ([bases] if isinstance(bases, str) else bases if isinstance(bases, list) else [] if bases is None else [bases]):
        if not isinstance(b, str) or not _MODEL_ID.fullmatch(b) or b.endswith(".git"):
            errors.append(f'"base_model" with value "{b}" is not valid. Use a model id from https://hf.co/models.')
    rel = meta.get("base_model_relation")
    if rel is not None and (rel not in BASE_MODEL_RELATIONS or bases is None):
        errors.append(f'"base_model_relation" with value "{rel}" is not valid: it must be one of '
                      f'{", ".join(BASE_MODEL_RELATIONS)}, together with a base_model.')
    lic = meta.get("license")
    for v in ([lic] if isinstance(lic, str) else lic if isinstance(lic, list) else [] if lic is None else [lic]):
        if v not in HUB_LICENSES:
            errors.append(f'"license" with value "{v}" is not valid. Use a license identifier from '
                          "https://hf.co/docs/hub/repositories-licenses, or \"other\" with license_name and license_link.")
    for key in ("license_name", "license_link", "pipeline_tag", "library_name"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string.')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be a list of strings.')
    return errors


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, fmt: str, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        return b"".join(self._body_chunks(None))

    def _body_chunks(self, link: Link | None, chunk: int = 1 << 20):
        """The request body (Content-Length or chunked) in pieces of at most ``chunk`` bytes,
        each through ``link`` if given: an upload is streamed to disk, never held whole."""
        def read(n: int):
            while n:
                k = min(chunk, n)
                if link is not None:
                    link.take(k)
                part = self.rfile.read(k)
                if not part:
                    return
                n -= len(part)
                yield part

        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            yield from read(int(self.headers.get("Content-Length") or 0))
            return
        while True:
            line = self.rfile.readline()
            n = int(line.split(b";")[0].strip() or b"0", 16)
            if n == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield from read(n)
            self.rfile.readline()

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict | None = None,
              head_only: bool = False, length: int | None = None, file: tuple[Path, int] | None = None) -> None:
        """Answer with ``body``, or with ``length`` bytes of ``file`` = (path, offset), read and
        sent a MiB at a time (a download is never held whole in memory)."""
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            ctype = "application/json"
        else:
            data = body or b""
            ctype = "application/octet-stream"
        self.send_response(status)
        hdrs = {"Content-Type": ctype, "Content-Length": str(len(data) if length is None else length)}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        link = self.state.down_limit if getattr(self, "_limited", False) else None
        step = 1 << 20
        if head_only:
            pass
        elif file is not None:
            with open(file[0], "rb") as f:
                f.seek(file[1])
                left = length
                while left:
                    k = min(step, left)
                    if link is not None:
                        link.take(k)
                    chunk = f.read(k)
                    if not chunk:
                        raise OSError(f"{file[0]}: short read")
                    self.wfile.write(chunk)
                    left -= len(chunk)
        elif data:
            view = memoryview(data)
            for i in range(0, len(view), step):
                if link is not None:
                    link.take(len(view[i:i + step]))
                self.wfile.write(view[i:i + step])
        with self.state.lock:
            self.state.stats.requests.append((self.command, urlsplit(self.path).path, status))

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {TOKEN}"

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if write and not self._authorized():
            raise HttpError(401, "Invalid credentials in Authorization header")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(unquote(rev))
        if c is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    def _dispatch(self, method: str) -> None:
        self._consumed = False
        try:
            self._route(method)
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True  # the client went away (a test killed it): nothing to answer

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            for pattern, name in ROUTES:
                if pattern[0] != method:
                    continue
                m = pattern[1].fullmatch("/".join(quote(p, safe="") for p in parts))
                if m:
                    return getattr(self, name)(*[unquote(g) if g is not None else None for g in m.groups()], query=query)
            raise HttpError(404, f"no route for {method} {url.path}")
        except HttpError as e:
            if method in ("POST", "PUT") and not self._consumed:
                self._body()  # keep the connection usable
            hdrs = dict(e.headers)
            if e.code:
                hdrs["X-Error-Code"] = e.code
            hdrs["X-Error-Message"] = e.message
            self._send(e.status, {"error": e.message}, hdrs, head_only=method == "HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _json(self) -> dict:
        self._consumed = True
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as e:
            raise HttpError(400, f"invalid JSON body: {e}") from e

    # ------------------------------------------------------------------ account / repos
    def whoami(self, query: dict) -> None:
        if not self._authorized():
            raise HttpError(401, "Invalid credentials in Authorization header")
        self._send(200, {"type": "user", "name": USER, "fullname": "Test User", "orgs": [{"name": "org"}],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self, query: dict) -> None:
        payload = self._json()
        if not self._authorized():
            raise HttpError(401, "Invalid credentials in Authorization header")
        if payload.get("type", "model") not in (None, "model"):
            raise HttpError(400, "this test server only hosts model repos")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.state.endpoint}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.state.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, repo_id: str, branch: str, query: dict) -> None:
        payload = self._json()
        repo = self._repo(repo_id, write=True)
        with self.state.lock:
            if branch in repo.branches:
                raise HttpError(409, f"Reference refs/heads/{branch} already exists")
            start = self._commit(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        self._send(200, {})

    def validate_yaml(self, query: dict) -> None:
        """The Hub's metadata check of a README.md (huggingface_hub calls it inside create_commit
        when README.md is added, and from ModelCard.validate): 400 with ``errors`` on bad metadata."""
        payload = self._json()
        errors = card_metadata_errors(str(payload.get("content") or ""))
        with self.state.lock:
            self.state.stats.validations.append(errors)
        if not errors:
            return self._send(200, {"errors": [], "warnings": []})
        if "text/plain" in self.headers.get("Accept", ""):  # ModelCard.validate asks for text
            body = "\n".join(f"- {e}" for e in errors).encode()
            self.send_response(400)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Message", "Invalid metadata in README.md")
            self.end_headers()
            self.wfile.write(body)
            with self.state.lock:
                self.state.stats.requests.append((self.command, urlsplit(self.path).path, 400))
            return
        self._send(400, {"errors": [{"message": e} for e in errors], "warnings": [],
                         "error": "Invalid metadata in README.md"})

    def repo_info(self, repo_id: str, rev: str | None, query: dict) -> None:
        repo = self._repo(repo_id)
        c = self._commit(repo, rev or "main")
        blobs = query.get("blobs") in ("1", "True", "true")
        siblings = []
        for p, e in sorted(c.files.items()):
            s: dict = {"rfilename": p}
            if blobs:
                s.update(size=e.size, blobId=e.oid)
                if e.sha256:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            siblings.append(s)
        self._send(200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                         "sha": c.oid, "private": repo.private, "gated": False, "disabled": False,
                         "lastModified": "2025-01-01T00:00:00.000Z", "tags": [], "siblings": siblings})

    def tree(self, repo_id: str, rev: str, path: str | None, query: dict) -> None:
        repo = self._repo(repo_id)
        c = self._commit(repo, rev)
        prefix = (path.strip("/") + "/") if path else ""
        recursive = query.get("recursive") in ("1", "True", "true")
        out, dirs = [], set()
        for p, e in sorted(c.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    dirs.add(prefix + "/".join(parts[: i + 1]))
            item: dict = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
            if e.sha256:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
            out.append(item)
        if path and not out and not dirs:
            raise HttpError(404, f"{path} does not exist", "EntryNotFound")
        out += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in sorted(dirs)]
        self._send(200, out)

    # ------------------------------------------------------------------ upload
    def preupload(self, repo_id: str, rev: str, query: dict) -> None:
        payload = self._json()
        repo = self._repo(repo_id, write=True)
        c = self._commit(repo, rev)
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= 10 * 10**6 or b"\0" in sample
            item = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = c.files.get(f["path"])
            if existing is not None:
                item["oid"] = existing.sha256 if (lfs and existing.sha256) else existing.oid
            files.append(item)
        self._send(200, {"files": files, "commitOid": c.oid})

    def lfs_batch(self, repo_id: str, query: dict) -> None:
        payload = self._json()
        self._repo(repo_id, write=payload.get("operation") == "upload")
        objects = []
        for o in payload.get("objects", []):
            oid, size = o["oid"], o["size"]
            item: dict = {"oid": oid, "size": size, "authenticated": True}
            if payload.get("operation") == "upload" and not self.state.has_object(repo_id, oid):
                sig = hashlib.sha256(f"{TOKEN}:{oid}".encode()).hexdigest()[:16]
                item["actions"] = {
                    "upload": {"href": f"{self.state.endpoint}/lfs-upload/{repo_id}/{oid}?sig={sig}", "header": {}},
                    "verify": {"href": f"{self.state.endpoint}/{repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            elif payload.get("operation") == "download":
                if self.state.has_object(repo_id, oid):
                    item["actions"] = {"download": {"href": f"{self.state.endpoint}/lfs-download/{repo_id}/{oid}"}}
                else:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, repo_id: str, oid: str, query: dict) -> None:
        st = self.state
        self._consumed = True
        if query.get("sig") != hashlib.sha256(f"{TOKEN}:{oid}".encode()).hexdigest()[:16]:
            self._body()
            raise HttpError(403, "bad upload signature")
        with st.lock:
            st.stats.put_attempts += 1
            hold = st.hold_puts_after is not None and len(st.stats.puts) >= st.hold_puts_after
        if hold:
            st.holding.set()
            st.release.wait(60)
        try:
            self._store_upload(repo_id, oid)
        finally:
            if hold:  # the held upload is over (stored, or refused as a partial body): counted and on disk
                st.held_done.set()

    def _store_upload(self, repo_id: str, oid: str) -> None:
        st = self.state
        time.sleep(st.upload_delay)
        final = st.object_path(repo_id, oid)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_suffix(f".tmp{threading.get_ident()}")
        h, got = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:  # streamed: hashed and written a MiB at a time
                for part in self._body_chunks(st.up_limit):
                    h.update(part)
                    f.write(part)
                    got += len(part)
            with st.lock:
                st.stats.put_bytes += got
            with st.lock:
                if st.fail_puts > 0:
                    st.fail_puts -= 1
                    st.stats.failed_puts += 1
                    raise HttpError(500, "injected failure")
            if h.hexdigest() != oid:
                raise HttpError(400, "uploaded content does not match the oid")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        with st.lock:
            st.stats.puts.append(oid)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, repo_id: str, query: dict) -> None:
        payload = self._json()
        self._repo(repo_id, write=True)
        path = self.state.object_path(repo_id, payload.get("oid", ""))
        if not path.is_file() or path.stat().st_size != payload.get("size"):
            raise HttpError(404, "object not found or wrong size")
        self._send(200, {})

    def xet_token(self, repo_id: str, kind: str, rev: str | None, query: dict) -> None:
        st = self.state
        self._repo(repo_id, write=kind == "write")
        if st.xet_dir is None:
            raise HttpError(400, "Xet is not enabled on this server")
        if kind == "write":
            with st.lock:
                st.xet_tokens += 1
                hold = st.hold_xet_tokens_after is not None and st.xet_tokens > st.hold_xet_tokens_after
            if hold:
                st.holding.set()
                st.release.wait(60)
                raise HttpError(503, "held")
            time.sleep(st.upload_delay)
        exp = int(time.time()) + 3600
        cas = f"local://{st.cas_dir(repo_id)}"
        self._send(200, {"accessToken": f"xet-{kind}-token", "exp": exp, "casUrl": cas},
                   {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": f"xet-{kind}-token", "X-Xet-Token-Expiration": str(exp)})

    def commit(self, repo_id: str, rev: str, query: dict) -> None:
        self._consumed = True
        raw = self._body()
        repo = self._repo(repo_id, write=True)
        branch = unquote(rev)
        try:
            lines = [json.loads(x) for x in raw.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise HttpError(400, f"commit payload is not ndjson: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with self.state.lock:
            if self.state.fail_commits > 0:
                self.state.fail_commits -= 1
                raise HttpError(500, "Internal Error - We're working hard to fix this as soon as possible!")
            if branch not in repo.branches:
                raise HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.branches[branch]
            parent = header.get("parentCommit")
            if parent is not None and not head.startswith(parent):
                raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, v = line.get("key"), line.get("value", {})
                if key == "file":
                    data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                    files[v["path"]] = Entry(len(data), content=data)
                elif key == "lfsFile":
                    oid = v["oid"]
                    if self.state.has_object(repo_id, oid):
                        files[v["path"]] = Entry(self.state.object_path(repo_id, oid).stat().st_size, sha256=oid)
                    elif self.state.xet_dir is not None and isinstance(v.get("size"), int):
                        # Uploaded through Xet: the bytes are in the local CAS, addressed by sha256.
                        files[v["path"]] = Entry(v["size"], sha256=oid, xet=True)
                    else:
                        raise HttpError(400, f"Your push was rejected because an LFS pointer pointed to a file "
                                             f"that does not exist: {v['path']} ({oid})")
                elif key == "deletedFile":
                    files.pop(v["path"], None)
                elif key == "deletedFolder":
                    pre = v["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(pre)}
                else:
                    raise HttpError(400, f"unknown commit operation {key!r}")
            c = self.state.new_commit(repo, branch, files, header.get("summary", ""))
            self.state.stats.commits.append({"header": header, "ops": lines[1:], "oid": c.oid})
        self._send(200, {"success": True, "commitOid": c.oid, "commitUrl": f"{self.state.endpoint}/{repo_id}/commit/{c.oid}"})

    # ------------------------------------------------------------------ download
    def resolve(self, repo_id: str, rev: str, path: str, query: dict) -> None:
        head_only = self.command == "HEAD"
        repo = self._repo(repo_id)
        c = self._commit(repo, rev)
        e = c.files.get(path)
        if e is None:
            raise HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": c.oid})
        if e.xet:
            raise HttpError(501, f"{path} was uploaded through Xet; this test server does not serve its bytes")
        etag = e.sha256 or e.oid
        hdrs = {"X-Repo-Commit": c.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if e.sha256:
            hdrs["X-Linked-Etag"] = f'"{etag}"'
            hdrs["X-Linked-Size"] = str(e.size)
        rng = self.headers.get("Range")
        start, end = 0, e.size - 1
        status = 200
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                raise HttpError(416, f"bad range {rng}")
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), e.size - 1) if m.group(2) else e.size - 1
            else:
                start = max(0, e.size - int(m.group(2)))
            if start >= e.size or start > end:
                raise HttpError(416, f"range {rng} not satisfiable for {e.size} bytes",
                                headers={"Content-Range": f"bytes */{e.size}"})
            status = 206
            hdrs["Content-Range"] = f"bytes {start}-{end}/{e.size}"
        if not head_only:
            with self.state.lock:
                if rng:
                    self.state.stats.range_gets.append((path, rng))
                else:
                    self.state.stats.full_gets.append(path)
        if head_only:
            return self._send(status, b"", hdrs, head_only=True, length=end + 1 - start)
        self._limited = True  # a download: through the downlink, if limited
        try:
            if e.content is not None:
                self._send(status, e.content[start:end + 1], hdrs)
            else:
                self._send(status, None, hdrs, length=end + 1 - start, file=(self.state.object_path(repo_id, e.sha256), start))
        finally:
            self._limited = False

    def lfs_download(self, repo_id: str, oid: str, query: dict) -> None:
        p = self.state.object_path(repo_id, oid)
        if not p.is_file():
            raise HttpError(404, "no such object")
        self._send(200, None, length=p.stat().st_size, file=(p, 0))


R = r"([^/]+/[^/]+)"  # repo id: namespace/name (each segment URL-quoted)
ROUTES: list[tuple[tuple[str, re.Pattern[str]], str]] = [
    (("GET", re.compile(r"api/whoami-v2")), "whoami"),
    (("POST", re.compile(r"api/repos/create")), "create_repo"),
    (("POST", re.compile(r"api/validate-yaml")), "validate_yaml"),
    (("GET", re.compile(rf"api/models/{R}(?:/revision/([^/]+))?")), "repo_info"),
    (("GET", re.compile(rf"api/models/{R}/tree/([^/]+)(?:/(.+))?")), "tree"),
    (("POST", re.compile(rf"api/models/{R}/preupload/([^/]+)")), "preupload"),
    (("POST", re.compile(rf"api/models/{R}/commit/([^/]+)")), "commit"),
    (("POST", re.compile(rf"api/models/{R}/branch/([^/]+)")), "create_branch"),
    (("GET", re.compile(rf"api/models/{R}/xet-(read|write)-token(?:/([^/]+))?")), "xet_token"),
    (("POST", re.compile(rf"{R}\.git/info/lfs/objects/batch")), "lfs_batch"),
    (("POST", re.compile(rf"{R}\.git/info/lfs/objects/verify")), "lfs_verify"),
    (("PUT", re.compile(rf"lfs-upload/{R}/([0-9a-f]{{64}})")), "lfs_upload"),
    (("GET", re.compile(rf"lfs-download/{R}/([0-9a-f]{{64}})")), "lfs_download"),
    (("HEAD", re.compile(rf"{R}/resolve/([^/]+)/(.+)")), "resolve"),
    (("GET", re.compile(rf"{R}/resolve/([^/]+)/(.+)")), "resolve"),
]


class HubServer(ThreadingHTTPServer):
    """``with HubServer(root) as hub: ... hub.url ...`` serves on 127.0.0.1 from a thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path, port: int = 0, xet: bool = True) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = HubState(root, xet=xet)
        self.state.endpoint = self.url
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:  # a killed client is not a server error
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.release.set()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--no-xet", action="store_true")
    ap.add_argument("--mbps", type=float, default=0, help="limit downloads and uploads to N MB/s each way")
    ap.add_argument("--seed", nargs=2, metavar=("REPO_ID", "FOLDER"), action="append", default=[])
    args = ap.parse_args()
    srv = HubServer(args.root, args.port, xet=not args.no_xet)
    if args.mbps:
        srv.state.down_limit, srv.state.up_limit = Link(args.mbps * 1e6), Link(args.mbps * 1e6)
    for repo_id, folder in args.seed:
        srv.state.seed(repo_id, Path(folder))
    print(f"HF_ENDPOINT={srv.url} HF_TOKEN={TOKEN}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()


def hub_env(hub: "HubServer", home: Path, mode: str = "lfs", token: bool = True, **extra: str) -> dict:
    """The environment of a Hub client (qstream, huggingface_hub) talking to ``hub``: everything
    the client reads from the environment, so an outer HF setup cannot leak in."""
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_TOKEN_PATH": str(home / "token"), "HF_TOKEN": TOKEN if token else "",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1" if mode == "lfs" else "0"}
    env.update(extra)
    return env
