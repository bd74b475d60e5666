"""Where served data lives: a folder on this machine or a prefix in object storage, behind one small API.

Replicas on different nodes share no folder, so ``serve.capture_dir`` (episodes, journals, feedback),
``serve.lora_dir`` and ``loop.traffic_dir`` may be URIs (``s3://bucket/prefix``, ``gs://...``, anything
``pyarrow.fs.FileSystem.from_uri`` reaches). Credentials and endpoints come from the usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an S3-compatible server, ...); :func:`storage_env` is
what a server hands its replicas, as init arguments (never in a runtime_env, which the dashboard shows).

What the callers rely on, both kinds alike:

- :meth:`Store.write_bytes` is whole or nothing: locally a dot-named temporary file renamed into place,
  in object storage a single PUT (an object appears only when its upload completes);
- listings skip dot-named entries (a writer's temporary file);
- :meth:`Store.move` of a single file either claims it (True) or finds it gone (False): locally a
  rename, atomic; in object storage copy-then-delete, so two claimants racing may both win (callers
  that count with it say so).

There is no append in object storage: logs are written as one small object per entry (or per batch).
"""

from __future__ import annotations

import functools
import os
import secrets
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs

from nat_ray import safe_files

# The environment that reaches object storage (pyarrow's S3 client reads these; AWS_PROFILE's file and
# instance roles stay with the node).
STORAGE_ENV_PREFIXES = ("AWS_",)
PARALLEL_READS = 16  # small objects read at once from object storage


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI (``s3://...``) rather than a path on this machine."""
    return "://" in str(location)


def storage_env(*locations: str | os.PathLike | None) -> dict[str, str]:
    """The driver's object-storage settings (``AWS_*``) when any of ``locations`` is a URI, else ``{}``:
    what replicas on other nodes need to reach the same bucket."""
    if not any(loc is not None and is_uri(loc) for loc in locations):
        return {}
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def apply_env(env: dict[str, str] | None) -> None:
    """Set the driver's storage settings in this process where the node sets none of its own."""
    for key, value in (env or {}).items():
        os.environ.setdefault(key, value)


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    # from_uri asks S3 for the bucket's region every time it is called: once per bucket is enough.
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``pyarrow.fs.FileSystem.from_uri``, with one filesystem object per bucket (a URI with a query
    string, ``s3://b/p?endpoint_override=...``, is resolved on its own)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.netloc or parts.query or parts.scheme not in ("s3", "gs", "gcs"):
        return pafs.FileSystem.from_uri(uri)
    return _bucket_filesystem(parts.scheme, parts.netloc), f"{parts.netloc}{parts.path}".rstrip("/")


class Store:
    """A folder or a bucket prefix; names inside it are ``/``-separated relative paths."""

    def __init__(self, location: str | os.PathLike) -> None:
        loc = str(location)
        if is_uri(loc):
            self.fs, root = _from_uri(loc)
            self.location = loc.rstrip("/")
        else:
            root = os.path.abspath(os.path.expanduser(loc))
            self.fs = pafs.LocalFileSystem()
            self.location = root
        self.root = root.rstrip("/")
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (what ``self.fs`` takes)."""
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str = "") -> str:
        """``rel`` as the user would write it (a path here, ``s3://...`` there): for messages."""
        return f"{self.location}/{rel}" if rel else self.location

    def _type(self, rel: str) -> pafs.FileType:
        return self.fs.get_file_info(self.path(rel)).type

    def is_file(self, rel: str) -> bool:
        return self._type(rel) == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        return self._type(rel) == pafs.FileType.Directory

    def entries(self, rel: str = "", suffix: str = "", recursive: bool = False) -> list[tuple[str, float]]:
        """``(relative name, mtime)`` of the files under ``rel`` ending with ``suffix`` (sorted by name;
        dot-named entries, a writer's temporary files, skipped; empty when ``rel`` does not exist)."""
        base = self.path(rel)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        found = []
        for info in self.fs.get_file_info(selector):
            name = info.path[len(self.root) + 1 :]
            if info.type != pafs.FileType.File or not name.endswith(suffix):
                continue
            if any(part.startswith(".") for part in info.path[len(base) + 1 :].split("/")):
                continue
            found.append((name, info.mtime.timestamp() if info.mtime is not None else 0.0))
        return sorted(found)

    def files(self, rel: str = "", suffix: str = "", recursive: bool = False) -> list[str]:
        """Relative names of the files under ``rel`` (as :meth:`entries`)."""
        return [name for name, _ in self.entries(rel, suffix, recursive)]

    def dirs(self, rel: str = "") -> list[str]:
        """Names (last component) of the folders directly under ``rel``, dot-named ones skipped."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        names = [i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if not n.startswith("."))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as stream:
            return stream.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_texts(self, names: list[str]) -> list[str]:
        """The texts of many small files, in order (read in parallel from object storage, where each is a
        request)."""
        if not self.remote:
            return [self.read_text(name) for name in names]
        with ThreadPoolExecutor(PARALLEL_READS) as pool:
            return list(pool.map(self.read_text, names))

    def open_input(self, rel: str):
        """A random-access file (Parquet readers need one)."""
        return self.fs.open_input_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole or not at all (synced to disk here; one PUT there)."""
        if self.remote:
            with self.fs.open_output_stream(self.path(rel)) as out:
                out.write(data)
            return
        with safe_files.staged_file(self.path(rel)) as tmp:
            tmp.write_bytes(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def touch(self, rel: str) -> None:
        """Create ``rel`` empty, or mark it written now (a heartbeat; not synced: a marker, not data)."""
        if self.remote:
            with self.fs.open_output_stream(self.path(rel)):
                pass
            return
        path = Path(self.path(rel))
        try:
            os.utime(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def create_new(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; returns whether this call wrote it. Atomic here (a hard
        link is refused when the name is taken); there, a check then a PUT (run it from one process)."""
        if self.remote:
            if self.is_file(rel):
                return False
            self.write_bytes(rel, data)
            return True
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        try:
            staged.write_bytes(data)
            os.chmod(staged, 0o600)
            try:
                os.link(staged, target)
            except FileExistsError:
                return False
            return True
        finally:
            staged.unlink(missing_ok=True)

    def move(self, src: str, dst: str) -> bool:
        """Move the file ``src`` to ``dst``; False when ``src`` is gone (another process took it)."""
        if not self.remote:
            Path(self.path(dst)).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(self.path(src), self.path(dst))
            except FileNotFoundError:
                return False
            return True
        if not self.is_file(src):
            return False
        try:
            self.fs.move(self.path(src), self.path(dst))
        except OSError:
            if self.is_file(src):
                raise
            return False
        return True

    def delete_dir(self, rel: str) -> None:
        """Remove the folder ``rel`` and all it holds (nothing when it is already gone)."""
        if self.is_dir(rel):
            self.fs.delete_dir(self.path(rel))

    def makedirs(self, rel: str = "") -> None:
        """Create the folder ``rel`` here (object storage has no folders: nothing to do there)."""
        if not self.remote:
            Path(self.path(rel)).mkdir(parents=True, exist_ok=True)

    def download_dir(self, rel: str, dest: str | os.PathLike) -> None:
        """Copy the folder ``rel`` into the local folder ``dest`` (created; replaced files overwritten)."""
        Path(dest).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path(rel),
            str(dest),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
