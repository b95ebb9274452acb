"""On-demand experts (issue 20): an artifact deployed without its expert files fetches each
expert the first time a token needs it, from an expert source (`--expert-source URL`: an HTTP
server with the artifact's files, `moetvm serve-experts DIR`), and keeps it in a bounded store on
disk. Memory cache, disk store and network form one hierarchy: the expert cache asks the store,
the store asks the network, and the prefetcher's loads go the same way, so it fetches ahead.

The store is content-addressed: a file is named by its SHA-256, so versions of a model share the
experts they have in common, and nothing a file is called can make it be read as another. Every
download is checked against the manifest's size and SHA-256 (which a signed manifest vouches
for) before it is written, and every read from the store is checked again; a corrupted download
is refused and leaves nothing behind. The store evicts its least recently used files (by
modification time, touched on use) to stay within its byte budget; it only ever deletes files
named as it names them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from moetvm.artifact import ArtifactError, FileRef, read_verified
from moetvm.errors import UsageError

_STORED = re.compile(r"[0-9a-f]{64}")  # the store's own files: SHA-256 names
DEFAULT_STORE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moetvm" / "experts"


@dataclass
class StoreStats:
    downloads: int = 0
    downloaded_bytes: int = 0
    store_hits: int = 0
    store_evictions: int = 0


class ExpertStore:
    """Expert files from `source` (a base URL), kept under `directory` within `budget` bytes."""

    def __init__(self, source: str, directory: str | Path | None = None, budget: int = 1 << 30, timeout: float = 60.0):
        parsed = urllib.parse.urlparse(source)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UsageError(f"expert source {source!r}: give an http(s) URL (moetvm serve-experts DIR serves one)")
        self.source = source.rstrip("/") + "/"
        self.directory = Path(directory) if directory is not None else DEFAULT_STORE
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"expert store {self.directory}: cannot create it ({e.strerror or e})") from None
        self.budget, self.timeout = budget, timeout
        self.stats = StoreStats()
        self._lock = threading.Lock()

    def read(self, ref: FileRef) -> bytes:
        """The verified bytes of the expert file `ref`: from the store, else downloaded."""
        stored = self.directory / ref.sha256
        if not _STORED.fullmatch(ref.sha256):
            raise ArtifactError(f"{ref.path}: the manifest's SHA-256 is not 64 hex digits")
        try:
            data = read_verified(self.directory, FileRef(ref.sha256, ref.size, ref.sha256))
        except ArtifactError:
            data = None  # absent, or damaged on disk: fetched again
        if data is not None:
            try:
                os.utime(stored)  # recently used
            except FileNotFoundError:
                pass  # evicted meanwhile by another thread's insert: the bytes read are verified
            with self._lock:
                self.stats.store_hits += 1
            return data
        data = self._download(ref)
        self._keep(stored, data)
        return data

    def _download(self, ref: FileRef) -> bytes:
        url = self.source + urllib.parse.quote(ref.path)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                data = response.read(ref.size + 1)
        except urllib.error.HTTPError as e:
            raise ArtifactError(f"{ref.path}: the expert source answered {e.code} {e.reason} ({url})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ArtifactError(f"{ref.path}: cannot fetch it from the expert source ({reason}; {url})") from None
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ArtifactError(f"{ref.path}: downloaded from {url}: size or SHA-256 mismatch with the manifest "
                                f"(corrupted or tampered); not kept")
        with self._lock:
            self.stats.downloads += 1
            self.stats.downloaded_bytes += len(data)
        return data

    def _keep(self, stored: Path, data: bytes) -> None:
        """Write a verified file into the store (atomically), then evict down to the budget."""
        if len(data) > self.budget:
            return  # larger than the whole store: used, not kept
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, stored)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return  # a full disk: the expert is used from memory this time
        with self._lock:
            self._evict(keep=stored.name)

    def _evict(self, keep: str) -> None:
        files = []
        for path in self.directory.iterdir():
            if _STORED.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                info = path.stat()
                files.append((info.st_mtime_ns, path, info.st_size))
        total = sum(size for _, _, size in files)
        for _, path, size in sorted(files):
            if total <= self.budget:
                break
            if path.name == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            self.stats.store_evictions += 1

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if _STORED.fullmatch(p.name))


def serve_experts(root: str | Path, host: str = "127.0.0.1", port: int = 8001, ready=None) -> None:
    """Serve the artifact at `root` as an expert source: GET of a path its manifest lists (and of
    the manifest and its signature), nothing else. Runs until interrupted; `ready(port)` once bound."""
    from http import HTTPStatus
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from moetvm.artifact import MANIFEST_NAME, read_manifest

    root = Path(root)
    served = {MANIFEST_NAME, "manifest.sig"} | {ref.path for ref in read_manifest(root).files()}

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def send_head(self):
            path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).lstrip("/")
            if path not in served or not (root / path).is_file() or (root / path).is_symlink():
                self.send_error(HTTPStatus.NOT_FOUND, "not a file of this artifact")
                return None
            return super().send_head()

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

    with ThreadingHTTPServer((host, port), Handler) as server:
        if ready is not None:
            ready(server.server_address[1])
        server.serve_forever()
