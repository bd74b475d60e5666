"""Files that a crash or a full disk cannot leave half-written, and a way to tell when one was.

Every state file a resume reads (a manifest, a checkpoint folder, a search-index shard) is written
to a temporary file in the same folder and renamed over the old one, so a reader sees the old
version or the new one, never a mix. A sha256 is kept beside it (``<name>.sha256``, or
``CHECKSUMS.sha256`` for a folder) so that damage done later (a truncated copy, a bad disk, a
hand edit) is detected and named instead of being read half or crashing a resume.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

DIR_CHECKSUMS = "CHECKSUMS.sha256"


class DamagedFile(Exception):
    """A state file is missing its bytes, fails its checksum, or does not parse."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = Path(path)
        self.why = why


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _temp_name(path: Path) -> Path:
    """A dot-name beside ``path`` (readers of a folder skip it) that keeps its suffix (writers that
    pick a format by suffix, a plot's ``.png``, still work)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}.{threading.get_ident()}{path.suffix}")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (best effort where the OS refuses a folder)."""
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


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Write a file whole or not at all: yields a temporary path beside ``path`` to write; when the
    block ends it is flushed to disk and renamed over ``path``; when the block raises it is removed
    and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where
    the OS or file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staged: str | Path, target: str | Path) -> Path:
    """Put the folder ``staged`` in place of ``target``, never leaving a moment with no ``target``.

    Where the OS can swap two paths in one step, the new folder and the old change places and the old
    is removed; elsewhere the old is renamed aside first (a moment a reader may miss) and removed
    after. ``staged`` must be on the same file system as ``target`` (beside it).
    """
    staged, target = Path(staged), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)  # it now holds the old folder
    else:
        aside = target.with_name(f".{target.name}.old{os.getpid()}.{threading.get_ident()}")
        shutil.rmtree(aside, ignore_errors=True)
        target.rename(aside)
        staged.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync(target.parent)
    return target


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Build a folder whole or not at all: yields a path beside ``target`` that does not exist yet (the
    block creates it: ``save_pretrained``, ``copytree``); when the block ends, its files are flushed
    and it replaces ``target`` (:func:`replace_dir`); when the block raises, it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target).with_suffix("") if target.suffix else _temp_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        for file in _dir_files(tmp):
            _fsync(file)
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes, checksum: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename; keep its sha256 beside it.

    The checksum file is written after the data file is in place: a crash between the two leaves a
    file whose checksum is stale or absent, which :func:`read_bytes` reports as damaged (the
    caller rebuilds it), never a file that is silently half-new.
    """
    path = Path(path)
    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    if checksum:
        _write_text_plain(checksum_path(path), f"{sha256_bytes(data)}  {path.name}\n")
    return path


def _write_text_plain(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any, checksum: bool = True) -> Path:
    """:func:`write_bytes` of ``obj`` as indented JSON."""
    return write_bytes(path, json.dumps(obj, indent=2, default=str).encode(), checksum=checksum)


def tables_stream(json_path: str | None) -> TextIO:
    """Where a command prints its tables: standard error when ``--json -`` gives standard output to the JSON."""
    return sys.stderr if json_path == "-" else sys.stdout


def write_result(path: str, obj: Any) -> None:
    """A command's result as indented JSON at ``path`` (``-``: standard output): the CLI's ``--json PATH``."""
    if path == "-":
        print(json.dumps(obj, indent=2, default=str))
    else:
        write_json(path, obj, checksum=False)


def seal(path: str | Path) -> Path:
    """Record the sha256 of a file another library wrote (after it was renamed into place)."""
    path = Path(path)
    _write_text_plain(checksum_path(path), f"{sha256_file(path)}  {path.name}\n")
    return path


def expected_sha256(path: str | Path) -> str | None:
    side = checksum_path(path)
    if not side.is_file():
        return None
    text = side.read_text().split()
    return text[0] if text else ""


def read_bytes(path: str | Path, require_checksum: bool = False) -> bytes:
    """The file's bytes, checked against its sha256 when one was kept.

    Raises:
        FileNotFoundError: no such file.
        DamagedFile: the bytes do not match the kept sha256 (or none was kept and one is required).
    """
    path = Path(path)
    data = path.read_bytes()
    expected = expected_sha256(path)
    if expected is None:
        if require_checksum:
            raise DamagedFile(path, f"no checksum file {checksum_path(path).name} beside it")
        return data
    actual = sha256_bytes(data)
    if actual != expected:
        raise DamagedFile(
            path, f"sha256 {actual[:12]}… does not match the kept {expected[:12]}… ({len(data)} bytes)"
        )
    return data


def read_json(path: str | Path, require_checksum: bool = False) -> Any:
    """:func:`read_bytes`, parsed; a file that does not parse is :class:`DamagedFile` too."""
    data = read_bytes(path, require_checksum=require_checksum)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFile(path, f"not valid JSON ({exc})") from None


def set_aside(path: str | Path) -> Path | None:
    """Move a damaged file (and its checksum) out of the way, keeping it for a person to look at.

    Returns the new name (``<name>.damaged``, numbered if taken), or None when there was no file.
    """
    path = Path(path)
    if not path.exists():
        return None
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, target)
    side = checksum_path(path)
    if side.exists():
        os.replace(side, checksum_path(target))
    return target


def _dir_files(folder: Path) -> Iterable[Path]:
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.name != DIR_CHECKSUMS and ".tmp" not in file.name:
            yield file


def seal_dir(folder: str | Path) -> Path:
    """Write ``CHECKSUMS.sha256`` listing every file under ``folder`` (a checkpoint, an adapter)."""
    folder = Path(folder)
    lines = [f"{sha256_file(f)}  {f.relative_to(folder).as_posix()}" for f in _dir_files(folder)]
    out = folder / DIR_CHECKSUMS
    _write_text_plain(out, "\n".join(lines) + "\n")
    return out


def check_dir(folder: str | Path, require_checksum: bool = False) -> list[str]:
    """What is wrong with a sealed folder: files missing, changed, or (if required) no seal at all.

    Returns an empty list for a sound folder (or an unsealed one, unless ``require_checksum``).
    """
    folder = Path(folder)
    sums = folder / DIR_CHECKSUMS
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    if not sums.is_file():
        return [f"{folder} has no {DIR_CHECKSUMS}"] if require_checksum else []
    problems = []
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        expected, _, name = line.partition("  ")
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(file) != expected:
            problems.append(f"{name} does not match its sha256 ({file.stat().st_size} bytes)")
    return problems
