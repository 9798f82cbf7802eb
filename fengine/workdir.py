"""One run per work dir: an exclusive OS lock (``flock``) held for the duration of a run.

Two runs writing one work dir interleave checkpoints, logs and ``config.json``
silently. `lock_work_dir` takes ``work_dir/.fengine.lock`` with ``flock``: the OS
releases it when the process ends however it ends (kill -9 included), so a stale
lock never blocks the next run. The holder's pid is written into the file for the
error message; a lock file that is a symlink, a hard link or not a regular file is
refused (the pid would overwrite a file elsewhere: a work dir may come from someone
else). Re-entrant within a process: a recipe can hold the lock around its own writes
(``config.json``) and call `fengine.fit`, which takes it again. A lock dies with its file:
a work dir deleted or replaced during a run is not recreated by the next save
(`check_still_locked`), since a second run could lock the new one and write there too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from fengine.checkpoint._io import NotOwnFile, open_own


try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (documented)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "WorkDirLocked", "check_still_locked", "lock_work_dir"]

LOCK_NAME = ".fengine.lock"

_held: dict[Path, list[int]] = {}  # resolved work dir -> [fd, depth]
_guard = threading.Lock()


class WorkDirLocked(RuntimeError):
    """Another process is running in this work dir."""


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the copies of the held locks' files (a
    close, not an unlock: the parent keeps its lock). Else a run killed with SIGKILL left its
    work dir locked until its orphaned workers noticed and exited, seconds later."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def lock_work_dir(work_dir: str | os.PathLike | None) -> Iterator[None]:
    """Hold the exclusive lock of ``work_dir`` (created if missing) inside the ``with`` block.

    Raises `WorkDirLocked` naming the holder's pid when another process holds it, and
    ``OSError`` when the lock file is a link or not a regular file.
    ``None`` (no work dir) locks nothing.
    """
    if work_dir is None or fcntl is None:
        yield
        return
    d = Path(work_dir).resolve()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # say what was being made: "No such file: /proc/x" reads as a missing file
        raise type(e)(
            f"cannot create the work dir {work_dir} ({e.strerror}: {e.filename})"
        ) from None
    with _guard:
        entry = _held.get(d)
        if entry is not None:
            entry[1] += 1
        else:
            _held[d] = [_acquire(d), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[d]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[d]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


def _acquire(d: Path) -> int:
    fd = _open_lock_file(d / LOCK_NAME)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if holder.isdigit() and not _alive(int(holder)):
            raise WorkDirLocked(
                f"work dir {d} is still locked by a process that run (pid {holder}, exited) "
                "started (it inherited the lock's file and has not exited yet); try again in a "
                "few seconds, or give this run another work dir"
            ) from None
        raise WorkDirLocked(
            f"work dir {d} is in use by another run (pid {holder}); wait for it to finish, "
            "or give this run another work dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)  # releases the lock
        raise OSError(
            e.errno,
            f"lock_work_dir: cannot write this run's pid into {d / LOCK_NAME}: {e.strerror}",
        ) from e
    except BaseException:
        os.close(fd)
        raise
    return fd


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check_still_locked(directory: str | os.PathLike) -> None:
    """Raise ``OSError`` if ``directory`` is a work dir this process locked whose lock file is
    gone or another file now (the dir was deleted or replaced during the run: a second run
    could lock it and write there too); else nothing. Called once per file a save writes
    (`fengine.checkpoint._io.atomic_write`): a dict lookup, or a realpath, fstat and stat."""
    if not _held:
        return
    d = Path(os.path.realpath(directory))
    with _guard:
        entry = _held.get(d)
        if entry is None:
            return
        locked = os.fstat(entry[0])
    try:
        now = os.stat(d / LOCK_NAME)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (locked.st_dev, locked.st_ino):
        raise OSError(
            errno.ENOENT if now is None else errno.ESTALE,
            f"work dir {d} was deleted or replaced during the run (its {LOCK_NAME} is "
            f"{'gone' if now is None else 'another file'}): this run's lock no longer covers it, "
            "so this run writes nothing more there; find what removed it",
        )


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file with `open_own`: the pid written into it must not
    overwrite a file elsewhere (a work dir may come from someone else)."""
    try:
        return open_own(path, os.O_RDWR | os.O_CREAT)
    except NotOwnFile as e:
        why = {
            "symlink": f"a symbolic link (to {e.detail!r})",
            "special": f"not a regular file ({e.detail})",
            "hard links": f"a hard link (one file with {e.detail} names)",
        }[e.why]
        raise _refused(path, why) from None


def _refused(path: Path, why: str) -> OSError:
    return OSError(
        f"lock_work_dir: {path} is {why}; expected a regular file: fengine writes its pid into "
        "this lock file and never through a link, so remove it and run again"
    )
