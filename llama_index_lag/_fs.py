"""Filesystem helpers: user cache folder and atomic writes (temp path, then rename)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DiskFullError, LAGError, UnsafeOutputError

CACHE_ENV = "LLAMA_INDEX_LAG_CACHE"
LOCK_TIMEOUT = 3600.0  # seconds a writer waits for another writer of the same folder
logger = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """The user cache folder (``$LLAMA_INDEX_LAG_CACHE``, else ``$XDG_CACHE_HOME/llama-index-lag``,
    else ``~/.cache/llama-index-lag``), created on demand, joined with ``parts``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "llama-index-lag")
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder next to ``out``; on success it replaces ``out`` in one rename.

    If the block raises (or the process dies), ``out`` is left exactly as it was and the temp folder is
    removed (or, after a crash, left as an ignorable ``.<name>.tmp-<pid>-*`` sibling, which the next
    successful write of ``out`` removes once its process is gone).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_temps(out)


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` siblings of ``out`` left by processes that no longer run."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{out.name}.tmp-").split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another writer's temp folder, in use
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- outputs that may be replaced --------------------------------------------------------------------
def _is_within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or inside it (both resolved)."""
    return path == other or other in path.parents


def check_output(
    out: str | Path,
    *,
    ours: Callable[[Path], bool],
    what: str,
    inputs: Iterable[str | Path] = (),
    force: bool = False,
) -> Path:
    """Refuse to write ``out`` where the write would destroy something that is not ours.

    ``out`` may be missing, an empty folder, or a folder ``ours(out)`` recognises (a library / adapter /
    index written by this package, by its manifest); anything else (a file, a folder of other files) is an
    :class:`UnsafeOutputError` naming the path, unless ``force``. ``out`` equal to, inside or containing one
    of ``inputs`` is always refused: replacing it would delete the inputs being read.
    """
    out = Path(out)
    target = out.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if _is_within(target, src) or _is_within(src, target):
            raise UnsafeOutputError(
                f"the output {what} folder {str(out)!r} is, contains or lies inside the input "
                f"{str(source)!r}; writing it would replace the input: choose another output path", path=out)
    if not os.path.lexists(out):
        return out
    if out.is_symlink() or not out.is_dir():
        if force:
            return out
        raise UnsafeOutputError(f"the output path exists and is not a folder; refusing to replace it with a "
                                f"{what} (remove it, choose another path, or pass --force / force=True)",
                                path=out)
    if ours(out) or not any(out.iterdir()) or force:
        return out
    raise UnsafeOutputError(
        f"refusing to replace a non-empty folder that is not a {what} written by llama-index-lag (remove it, "
        "choose another path, or pass --force / force=True)", path=out)


# ---- writers' lock -----------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str | Path, *, what: str, wait: bool = True, timeout: float | None = None,
              shared: bool = False) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` (created) for the block.

    ``wait``: block until the other holder is done (up to ``timeout`` seconds, default
    :data:`LOCK_TIMEOUT`), else fail at once; either way a lock held by someone else ends in a
    :class:`LAGError` naming ``what`` and the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (LOCK_TIMEOUT if timeout is None else timeout)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(path, "a+b") as fh:
        announced = False
        while True:
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or time.monotonic() > deadline:
                    raise LAGError(f"another process is writing this {what}"
                                   + (f" (waited {timeout if timeout is not None else LOCK_TIMEOUT:.0f} s)"
                                      if wait else ""), path=path.parent) from None
                if not announced:
                    logger.info("waiting for another writer of %s", path.parent)
                    announced = True
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- disk full ----------------------------------------------------------------------------------------
def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int | None:
    """Free space where ``path`` (or its nearest existing parent) lives."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def disk_full_error(path: Path, needed: int | None, what: str, leftover: str) -> DiskFullError:
    """A :class:`DiskFullError` that says how much ``what`` needs, how much is free, and what was left."""
    free = free_bytes(path)
    need = f"needs about {_mb(needed)}" if needed else "needs more space"
    return DiskFullError(f"disk full: {what} {need}, {_mb(free) if free is not None else 'unknown'} free; "
                         f"{leftover}", path=path, needed=needed, free=free)


def _mb(n: int | None) -> str:
    return "? MB" if n is None else f"{n / 2**20:.1f} MB"


def reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the open file ``fd`` now (``posix_fallocate``), so that writes through a
    memory map cannot hit a full disk later (that would be a SIGBUS, not an error). Where the file system
    cannot preallocate, nothing is reserved."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return
        raise



def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    res = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return res == 0


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst``.

    On Linux the two folders are exchanged in one atomic step, so a concurrent reader always finds ``dst``
    (old or new); elsewhere two renames leave a short window where ``dst`` is absent. Readers that already
    opened files of the old ``dst`` keep valid (memory-mapped) handles.
    """
    if dst.exists():
        if _exchange(src, dst):
            shutil.rmtree(src, ignore_errors=True)  # src now holds the old content
            return
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
