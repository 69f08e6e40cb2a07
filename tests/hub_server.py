"""A tiny, stdlib-only imitation of the Hugging Face Hub HTTP API, for offline tests.

The real ``huggingface_hub`` library (checked against 2.4.0) talks to it over real sockets on
127.0.0.1; point the library at ``hub.url`` via ``HF_ENDPOINT`` (read at import time) or
``endpoint=``.  Served routes (model repos only, one revision ``main`` plus its commit sha):

* ``GET /api/models/{repo}[/revision/{rev}]`` -> ModelInfo JSON (``?blobs=true`` adds size/blobId/lfs).
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=`` -> one page, no ``Link`` header.
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: regular files -> 200 with the bytes; LFS files
  (``*.safetensors``, ``*.bin`` or > ``lfs_threshold`` bytes) -> 302 to ``{cdn_url}/cdn/{sha256}``.
* ``HEAD|GET /cdn/{sha256}?repo=&file=`` -> the bytes of an LFS file.

Behaviours of huggingface_hub relied upon:

* ``get_hf_file_metadata`` sends HEAD to ``/resolve`` and follows redirects only to the *same origin*
  (or a known Hub host); it reads ``X-Repo-Commit``, ``X-Linked-Etag``/``ETag`` and
  ``X-Linked-Size``/``Content-Length`` from the last response.  The CDN therefore listens on a second
  port (``cdn_url``): the 302 is then not followed and carries the metadata, as on the real Hub.
  The download GET then goes straight to the ``Location`` URL.
* ``hf_raise_for_status`` maps ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound to
  RepositoryNotFoundError / RevisionNotFoundError / RemoteEntryNotFoundError.
* No ``X-Xet-Hash`` header and no ``xetHash`` field are ever sent, so the library stays on plain HTTP.
* ``http_get`` resumes a broken body within one call with ``Range: bytes=N-`` (hence Range support).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [
    ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("cdn", re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]
_DATE = "2024-01-01T00:00:00.000Z"


def _git_oid(data: bytes, kind: str = "blob") -> str:
    return hashlib.sha1(b"%s %d\0" % (kind.encode(), len(data)) + data).hexdigest()


class _Fault:
    def __init__(self):
        self.drop: list[int] = []  # one byte count per pending dropped GET
        self.corrupt: int | None = 0  # None: always; N: next N GETs
        self.bps: float | None = None


class HubServer:
    """Fake Hub. ``with HubServer({"org/name": {"config.json": b"{}"}}) as hub: ... hub.url``."""

    def __init__(self, repos: dict[str, dict[str, bytes]], *, lfs_threshold: int = 1024):
        self.repos = {rid: dict(files) for rid, files in repos.items()}
        self.lfs_threshold = lfs_threshold
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._faults: dict[str, _Fault] = {}
        self._stopping = threading.Event()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""
        self.listed_oids: dict[str, str] = {}  # path -> the oid the listing claims (a hostile Hub's lie)

    # ---- repo model -------------------------------------------------------------------------
    @staticmethod
    def commit_sha(repo_id: str) -> str:
        return hashlib.sha1(f"commit:{repo_id}".encode()).hexdigest()

    def is_lfs(self, path: str, content: bytes) -> bool:
        return path.endswith((".safetensors", ".bin")) or len(content) > self.lfs_threshold

    def _entry(self, path: str, content: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(content)}
        if self.is_lfs(path, content):
            sha = hashlib.sha256(content).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(content)}\n"
            entry["oid"] = _git_oid(pointer.encode())
            entry["lfs"] = {"oid": sha, "size": len(content), "pointerSize": len(pointer)}
        else:
            entry["oid"] = _git_oid(content)
        if path in self.listed_oids:
            entry["oid"] = self.listed_oids[path]
        return entry

    # ---- fault injection (thread-safe, keyed by path inside the repo) ------------------------
    def _fault(self, path: str) -> _Fault:
        return self._faults.setdefault(path, _Fault())

    def drop_after(self, path: str, nbytes: int, times: int = 1) -> None:
        """The next ``times`` byte-serving GETs of ``path`` send ``nbytes`` body bytes, then hang up."""
        with self._lock:
            self._fault(path).drop.extend([nbytes] * times)

    def corrupt(self, path: str, times: int | None = None) -> None:
        """Serve ``path`` with flipped bytes (same size): always (None) or for the next ``times`` GETs."""
        with self._lock:
            self._fault(path).corrupt = times

    def throttle(self, path: str, bytes_per_second: float | None) -> None:
        """Send the body of ``path`` slowly, in small chunks (None: full speed again)."""
        with self._lock:
            self._fault(path).bps = bytes_per_second

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_faults(self, path: str) -> tuple[int | None, bool, float | None]:
        """Consume the faults for one byte-serving GET: (drop_after, corrupt, bytes_per_second)."""
        with self._lock:
            f = self._faults.get(path)
            if f is None:
                return None, False, None
            drop = f.drop.pop(0) if f.drop else None
            bad = f.corrupt is None or f.corrupt > 0
            if f.corrupt:
                f.corrupt -= 1
            return drop, bad, f.bps

    def requests(self, method: str | None = None, file: str | None = None) -> list[dict]:
        """Snapshot of the log, optionally filtered by method and repo file path."""
        with self._lock:
            return [e for e in self.log if (method in (None, e["method"])) and (file in (None, e["file"]))]

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        for _ in range(2):  # hub API + "CDN" (a different origin, like the real Hub's CDN)
            srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            self._servers.append(srv)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        self._servers.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, *args) -> None:  # silence per-request stderr logging
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # ---- plumbing ---------------------------------------------------------------------------
    def _dispatch(self, head: bool) -> None:
        self.head = head
        split = urlsplit(self.path)
        self.query = dict(parse_qsl(split.query))
        self.record = {
            "method": self.command,
            "path": unquote(split.path),
            "query": self.query,
            "range": self.headers.get("Range"),
            "status": None,
            "repo": None,
            "file": None,
            "fault": None,
        }
        hub = self.server_hub
        with hub._lock:
            hub.log.append(self.record)
        try:
            for name, rx in _ROUTES:
                m = rx.match(split.path)
                if m:
                    groups = {k: unquote(v) if v else v for k, v in m.groupdict().items()}
                    return getattr(self, "_" + name)(**groups)
            self._send(404, {"X-Error-Code": "EntryNotFound"}, {"error": "Not found"})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, status: int, headers: dict | None = None, body=b"") -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.record["status"] = status
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not self.head:
            self.wfile.write(body)

    def _lookup(self, repo: str, rev: str) -> dict | None:
        """Return the repo's files, or send the Hub's error for an unknown repo / revision."""
        hub = self.server_hub
        self.record["repo"] = repo
        if repo not in hub.repos:
            self._send(
                401,
                {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                {"error": "Repository not found"},
            )
            return None
        if rev not in ("main", hub.commit_sha(repo)):
            self._send(
                404,
                {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: " + rev},
                {"error": f"Invalid rev id: {rev}"},
            )
            return None
        return hub.repos[repo]

    # ---- routes -----------------------------------------------------------------------------
    def _info(self, repo: str, rev: str | None) -> None:
        files = self._lookup(repo, rev or "main")
        if files is None:
            return
        hub, blobs = self.server_hub, self.query.get("blobs", "").lower() == "true"
        siblings = []
        for path, content in sorted(files.items()):
            sib = {"rfilename": path}
            if blobs:
                e = hub._entry(path, content)
                sib.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    sib["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
            siblings.append(sib)
        author = repo.split("/")[0] if "/" in repo else None
        self._send(
            200,
            {},
            {
                "id": repo,
                "modelId": repo,
                "author": author,
                "sha": hub.commit_sha(repo),
                "lastModified": _DATE,
                "createdAt": _DATE,
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": None,
                "siblings": siblings,
                "usedStorage": sum(map(len, files.values())),
            },
        )

    def _tree(self, repo: str, rev: str, path: str | None) -> None:
        files = self._lookup(repo, rev)
        if files is None:
            return
        hub, prefix = self.server_hub, (path or "").strip("/")
        recursive = self.query.get("recursive", "").lower() == "true"
        expand = self.query.get("expand", "").lower() == "true"
        under = {p: c for p, c in files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            return self._send(404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{prefix} does not exist"})
        dirs = {"/".join(p.split("/")[:i]) for p in under for i in range(1, p.count("/") + 1)}
        depth = prefix.count("/") + 1 if prefix else 0
        entries = [hub._entry(p, c) for p, c in under.items()]
        entries += [
            {"type": "directory", "path": d, "oid": _git_oid(d.encode(), "tree")}
            for d in dirs
            if not prefix or d.startswith(prefix + "/")
        ]
        if not recursive:
            entries = [e for e in entries if e["path"].count("/") == depth]
        if expand:
            for e in entries:
                e["lastCommit"] = {"id": hub.commit_sha(repo), "title": "Upload", "date": _DATE}
        self._send(200, {}, sorted(entries, key=lambda e: (e["type"] != "directory", e["path"])))

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        files = self._lookup(repo, rev)
        if files is None:
            return
        hub, self.record["file"] = self.server_hub, path
        commit = {"X-Repo-Commit": hub.commit_sha(repo)}
        if path not in files:
            return self._send(404, {**commit, "X-Error-Code": "EntryNotFound"}, {"error": "Entry not found"})
        entry = hub._entry(path, files[path])
        headers = {**commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if "lfs" not in entry:
            return self._serve_bytes(files[path], path, headers)
        sha = entry["lfs"]["oid"]
        location = f"{hub.cdn_url}/cdn/{sha}?repo={quote(repo, safe='')}&file={quote(path, safe='')}"
        self._send(
            302, {**headers, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(entry["size"]), "Location": location}
        )

    def _cdn(self, sha: str) -> None:
        repo, path = self.query.get("repo"), self.query.get("file")
        content = self.server_hub.repos.get(repo, {}).get(path)
        self.record.update(repo=repo, file=path)
        if content is None or hashlib.sha256(content).hexdigest() != sha:
            return self._send(404, {}, b"NoSuchKey")
        self._serve_bytes(content, path, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"})

    def _serve_bytes(self, content: bytes, path: str, headers: dict) -> None:
        total, start, end = len(content), 0, len(content) - 1
        status, rng = 200, self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
        if m and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else total - 1, total - 1)
            else:  # suffix range: the last N bytes
                start = max(total - int(m[2]), 0)
            if start >= total or start > end:
                return self._send(416, {"Content-Range": f"bytes */{total}"}, b"")
            status, headers = 206, {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        if self.head:
            return self._send(status, {**headers, "Content-Length": str(end - start + 1)})
        drop, bad, bps = self.server_hub._take_faults(path)
        if bad:
            flipped = bytearray(content)
            for i in {*range(0, len(flipped), 4096), len(flipped) - 1} - {-1}:
                flipped[i] ^= 0xFF
            content = bytes(flipped)
        body = content[start : end + 1]
        self.record["fault"] = (
            "+".join(n for n, on in (("drop", drop is not None), ("corrupt", bad), ("throttle", bps is not None)) if on)
            or None
        )
        self.record["status"] = status
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        payload = body if drop is None else body[:drop]
        chunk = max(1, int(bps // 20)) if bps else 1 << 20
        for i in range(0, len(payload), chunk):
            if self.server_hub._stopping.is_set():
                break
            self.wfile.write(payload[i : i + chunk])
            if bps:
                self.wfile.flush()
                time.sleep(chunk / bps)
        self.wfile.flush()
        if drop is not None or self.server_hub._stopping.is_set():
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
