"""Atomic file writes (a reader sees the old file or the new one, never a half-written one), with the user's umask;
the marker that says a folder was written by taskprune; the lock that keeps one run per output folder; why a path
given as a file is not one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


MARKER = ".taskprune"
"""The file taskprune writes into every folder it owns (an export, a mask bank, a run's ``output_dir``): JSON
``{"kind": ...}``. ``overwrite`` replaces only a folder that holds the marker of the same kind."""
LOCK = ".taskprune.lock"
"""The lock file of a run in its ``output_dir`` (JSON: pid, host, start time), created with ``O_EXCL``."""
PARTIAL = ".taskprune.partial"
"""The owner record (JSON: pid, host) inside a folder :func:`atomic_dir` is still writing; removed just before the
folder is renamed into place. A hidden ``.<name>.*.tmp`` folder that still holds it was left by a killed writer."""


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file, as the end of a sentence (``"is a folder, not a file"``, ``"is a
    symbolic link loop"``, ``"does not exist"``...); ``None`` for a regular file (through any links)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (following its links leads back to a link already followed)"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be read ({e.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device)"
    return None


def umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only for a moment)
    os.umask(old)
    return old


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename. The file gets the
    mode a plain ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s ``0o600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj, compact: bool = False) -> None:
    """JSON with sorted keys; ``compact`` drops indentation (index lists of a spec would take a line each)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":")) if compact else json.dumps(obj, indent=2,
                                                                                            sort_keys=True)
    atomic_write_bytes(path, (text + "\n").encode())


def read_marker(folder: str | os.PathLike) -> str | None:
    """The kind in ``folder``'s taskprune marker (``"export"``, ``"bank"``, ``"run"``), ``None`` without one."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` as a taskprune ``kind`` folder (atomically; nothing else in it changes)."""
    atomic_write_bytes(Path(folder) / MARKER, (json.dumps({"kind": kind, "written_by": "taskprune"}) + "\n").encode())


def check_replaceable(path: str | os.PathLike, kind: str, what: str = "folder") -> None:
    """Refuse (``FileExistsError``) to replace ``path`` unless it is an empty folder or one taskprune wrote as a
    ``kind`` (its marker says so): ``overwrite`` never deletes files taskprune did not write."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{what} {str(path)!r} exists and is not a folder; remove it or choose another path")
    found = read_marker(path)
    if found == kind or not any(path.iterdir()):
        return
    a_kind = ("an " if kind[:1] in "aeiou" else "a ") + kind
    if found is not None:
        raise FileExistsError(f"{what} {str(path)!r} is a taskprune {found} folder, not {a_kind}; overwrite replaces "
                              f"only an earlier {kind}, so nothing was deleted. Choose another folder")
    raise FileExistsError(f"{what} {str(path)!r} holds files taskprune did not write (no {MARKER} marker of {a_kind});"
                          " overwrite replaces only a folder taskprune wrote, so nothing was deleted. Choose another "
                          "folder, or empty this one yourself")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``, on error delete it.

    An existing ``path`` is refused (``FileExistsError``) unless ``overwrite``; then it is replaced only once the new
    folder is complete, so a reader sees the old folder or the new one, never a half-written one. With ``marker``
    (a kind: ``"export"``, ``"bank"``) the new folder gets a taskprune marker of that kind, and ``overwrite`` replaces
    only an empty folder or one holding that marker (:func:`check_replaceable`). The folder and what is written into
    it get the modes a plain ``mkdir`` / ``open`` would give them (``0o777`` / ``0o666`` less the umask), not
    ``mkdtemp``'s ``0o700`` or a writer's ``0o600``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True to replace it, or choose another "
                              "folder")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a folder; remove it or choose another path")
    if marker is not None:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        _write_owner(tmp / PARTIAL)
        yield tmp
        if marker is not None:
            write_marker(tmp, marker)
        (tmp / PARTIAL).unlink(missing_ok=True)
        _umask_modes(tmp)
        if path.exists() and _exchange(tmp, path):  # one atomic swap: `path` is never missing
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        elif path.exists():  # no atomic swap here: a crash between the two renames leaves the old folder in `old`
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def partial_dirs(path: str | os.PathLike) -> list[Path]:
    """The hidden folders :func:`atomic_dir` leaves beside ``path`` when its process is killed: ``.<name>.*.tmp`` (a
    half-written copy, or the old folder after the swap) and ``.<name>.*.old``. No loader reads them."""
    import glob

    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*")
                  if p.suffix in (".tmp", ".old") and p.is_dir() and not p.is_symlink())


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Delete the :func:`partial_dirs` of ``path`` whose writer (their :data:`PARTIAL` record) was a process of this
    host that is no longer running; return them. Folders of a running writer, of another host or without the record
    (the writer was past its last step) are left alone."""
    import socket

    removed = []
    for folder in partial_dirs(path):
        try:
            owner = json.loads((folder / PARTIAL).read_text())
        except (OSError, ValueError):
            continue
        pid = owner.get("pid") if isinstance(owner, dict) else None
        if isinstance(pid, int) and owner.get("host") == socket.gethostname() and not _pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _write_owner(path: Path) -> None:
    import socket

    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")


def _umask_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode a plain ``open`` / ``mkdir`` would (some writers, e.g.
    safetensors, create files ``0o600``): a pruned model is readable by whom the user's umask says."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is not supported."""
    import ctypes
    import errno

    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# ---------------------------------------------------------------------------------------------------- run lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _lock_holder(path: Path) -> tuple[str, dict]:
    """``(raw text, fields)`` of a lock file (fields empty when it is unreadable or half-written)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError:
        return "", {}
    try:
        fields = json.loads(text)
    except ValueError:
        return text, {}
    return text, fields if isinstance(fields, dict) else {}


def _take_over(path: Path, stale: str) -> bool:
    """Remove the stale lock ``path`` if it still holds ``stale``; one process at a time (an ``O_EXCL`` guard file)."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        try:
            if path.read_text() == stale:
                path.unlink()
        except FileNotFoundError:
            pass
        return True
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def acquire_lock(folder: str | os.PathLike, what: str = "output_dir") -> Path:
    """Create ``folder/.taskprune.lock`` atomically (``O_EXCL``) for this process and return its path.

    A lock held by a running process (or one on another host, which cannot be checked) raises ``FileExistsError``
    naming the holder and how to remove the file if that run is gone. A lock left by a process of this host that is
    no longer running (a ``SIGKILL``) is stale: it is replaced, with a warning naming the dead process.
    """
    import logging
    import socket
    import time

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    host = socket.gethostname()
    mine = json.dumps({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    for attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                text, holder = _lock_holder(path)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            pid, where = holder.get("pid"), holder.get("host")
            stale = isinstance(pid, int) and where == host and not _pid_alive(pid)
            if stale and attempt < 2 and _take_over(path, text):
                logging.getLogger(__name__).warning(
                    "taskprune: %s %s was locked by pid %d on %s, which is no longer running (killed?); "
                    "took the lock over", what, folder, pid, host)
                continue
            who = (f"pid {pid} on host {where!r} (since {holder.get('started')})" if holder else
                   "an unreadable lock")
            alive = "; it is still running" if isinstance(pid, int) and where == host and _pid_alive(pid) else ""
            raise FileExistsError(
                f"{what} {str(folder)!r} is in use by another taskprune run: {who}{alive}. Wait for it to end or "
                f"choose another {what}; if that run is gone, remove the lock: rm {str(path)!r}"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return path
    raise FileExistsError(f"{what} {str(folder)!r}: could not take the lock {str(path)!r} (other runs keep taking "
                          f"it); choose another {what}")


def release_lock(path: str | os.PathLike) -> None:
    """Remove a lock taken by :func:`acquire_lock` in this process (a lock of another process is left alone)."""
    path = Path(path)
    try:
        _, holder = _lock_holder(path)
    except FileNotFoundError:
        return
    if holder.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def cache_dir() -> Path:
    """taskprune's cache folder (models built or converted on first use, the datasets cache): ``$TASKPRUNE_CACHE``,
    else ``~/.cache/taskprune``."""
    env = os.environ.get("TASKPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "taskprune"
