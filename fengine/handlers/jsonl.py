"""A JSON-lines log that a resumed run writes again from its checkpoint on: the records it will
rewrite move to ``<stem>.superseded.jsonl`` first (durably), so no step appears twice and
nothing is lost."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from fengine.checkpoint._io import NotOwnFile, atomic_write, open_own, open_to_append, pwrite_all


EVAL_PREFIXES = ("val/", "test/")


def is_eval_record(record: dict) -> bool:
    """A validation's or test's record (its metrics are ``val/...`` or ``test/...``)."""
    return any(isinstance(k, str) and k.startswith(EVAL_PREFIXES) for k in record)


def record_steps(path: Path) -> list[int]:
    """The steps of the records in ``path`` (read as `supersede` reads it: its own file only)."""
    return [r[0] for line in _read_lines(path) if (r := _record(line)) is not None]


def _read_lines(path: Path) -> list[bytes]:
    """``path``'s lines as bytes (decoded one by one in `_record`: a damaged line must not stop
    the others being read), the log's own file only: a planted link, FIFO or device is refused
    (a FIFO hung the resume); none when it does not exist."""
    try:
        fd = open_own(path, os.O_RDONLY, one_name=False)
    except FileNotFoundError:
        return []
    except NotOwnFile as e:
        raise OSError(
            errno.EPERM, f"refusing to read {path}: a {e.why} ({e.detail}); fengine reads only "
            "files of its own there: remove it and run again", str(path)
        ) from None  # fmt: skip
    with open(fd, "rb") as f:
        try:
            return f.read().splitlines(keepends=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot read {path}: {e.strerror}", str(path)) from e


def supersede(path: Path, step: int, *, eval_at_step: bool) -> int:
    """Move the records of ``path`` a resume from ``step`` writes again (those after it, and an
    evaluation's at ``step`` when ``eval_at_step``) to ``<stem>.superseded.jsonl``; returns
    how many moved. The moved lines are appended and fsynced before ``path`` is replaced
    (atomically), so a crash between leaves them in both files, never in neither."""
    lines = _read_lines(path)
    if not lines:
        return 0
    keep: list[bytes] = []
    moved: list[bytes] = []
    for line in lines:
        (moved if _rewritten(line, step, eval_at_step) else keep).append(line)
    if not moved:
        return 0
    aside = path.with_name(f"{path.stem}.superseded{path.suffix}")
    with open_to_append(aside) as f:
        f.flush()
        f.buffer.writelines(moved)  # as read: a line that is not UTF-8 moves unchanged
        f.buffer.flush()
        os.fsync(f.fileno())
    data = b"".join(keep)
    atomic_write(path, lambda fd: pwrite_all(fd, memoryview(data), 0), what="log")
    return len(moved)


def _rewritten(line: bytes, step: int, eval_at_step: bool) -> bool:
    record = _record(line)
    if record is None:
        return False  # not a record: stays where it is
    at, fields = record
    return at > step or (eval_at_step and at == step and is_eval_record(fields))


def _record(line: bytes) -> tuple[int, dict] | None:
    """A record's step and fields, or None for a line that is not a record: not JSON, not UTF-8
    (``UnicodeDecodeError`` is a ``ValueError``), or nested too deep to parse."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    at = record.get("step") if isinstance(record, dict) else None
    return (at, record) if isinstance(at, int) and not isinstance(at, bool) else None
