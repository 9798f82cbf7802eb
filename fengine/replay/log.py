"""The run log, ``work_dir/run_log.jsonl``: `RunRecorder` writes it, `read_log` reads it.

One JSON object a line, appended across resumes. Every start of `fit` (a
*segment*) writes a ``segment`` record, then the digest of the state it starts
from; the run then writes a ``digest`` record every ``every`` steps and at every
checkpoint:

* ``{"kind": "segment", "format": 2, "start": {step, epoch, batch_in_epoch},
  "resumed_from": NAME | null, "horizon": {"max_epochs", "max_steps", "total_steps"},
  "config": {...}, "config_hash": HEX, "recipe": PATH | null,
  "code": {"fengine": HEX, "recipe": HEX | null},
  "env": {"fengine", "torch", "python", "device", "threads", "deterministic"}}``
* ``{"kind": "digest", "step", "epoch", "batch_in_epoch", "digest": HEX,
  "checkpoint": NAME}`` (``checkpoint`` only where a file holds that state).

``config`` is what determines the bits (the recipe leaves out how-to-start flags
such as ``resume``, and the horizon, recorded per segment in ``horizon``);
``config_hash`` is its `fengine.config.config_hash`, which `read_log` checks (as it
refuses a key twice in one object: an edited config is a damaged log, not a run that
replays differently). A
checkpoint NAME is relative to the work dir when the file lies inside it (so a
copied work dir names its own files), absolute otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.utils._pytree as pytree

import fengine
from fengine.checkpoint._io import NotOwnFile, open_own
from fengine.config import config_hash
from fengine.events import Handler, Priority, Snapshot
from fengine.replay.env import environment
from fengine.state import TrainState


__all__ = [
    "LOG_NAME",
    "ReplayError",
    "RunRecorder",
    "Segment",
    "code_hash",
    "file_hash",
    "read_log",
    "state_digest",
]

LOG_NAME = "run_log.jsonl"
FORMAT = 2
log = logging.getLogger("fengine")

Pos = tuple[int, int, int]  # (step, epoch, batch_in_epoch): ordered along a run


class ReplayError(RuntimeError):
    """The run cannot be replayed as asked (missing records, changed code, untrusted recipe)."""


def state_digest(state: TrainState) -> str:
    """SHA-256 over every leaf of the state (names, dtypes, shapes, bytes; scalars as JSON)."""
    h = hashlib.sha256()
    leaves, _ = pytree.tree_flatten_with_path(state)
    for path, leaf in leaves:
        h.update(pytree.keystr(path).encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():  # hashed in place: no copy of the tensor's bytes
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        else:
            h.update(json.dumps(leaf).encode())
    return h.hexdigest()


def code_hash(extra_files: Iterable[str | Path] = ()) -> str:
    """SHA-256 of fengine's Python sources and ``extra_files``."""
    h = hashlib.sha256()
    root = Path(fengine.__file__).parent
    files = sorted(root.rglob("*.py")) + [Path(f) for f in extra_files]
    for f in files:
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """SHA-256 of one file's bytes (the recipe)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def position(state: TrainState) -> dict[str, int]:
    return {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}


def key(r: dict) -> Pos:
    return r["step"], r["epoch"], r["batch_in_epoch"]


def checkpoint_name(path: str | os.PathLike, work_dir: str | os.PathLike) -> str:
    """``path`` relative to ``work_dir`` when inside it (posix separators), else absolute."""
    p, w = Path(path).resolve(), Path(work_dir).resolve()
    return p.relative_to(w).as_posix() if p.is_relative_to(w) else str(p)


class RunRecorder(Handler):
    """Record what replay needs in ``work_dir/run_log.jsonl`` (appended across resumes): per
    start of `fit` a segment record (config, horizon, code hashes, environment), and state
    digests at the start, every ``every`` steps and at each checkpoint.

    ``recipe`` is the script that built the run (default: the ``__main__`` file); it must
    define ``from_config(config: dict, *, max_epochs, max_steps, paths=None)`` returning an
    object with ``state``, ``step`` and ``train_data`` (``paths``: the files the user confirms
    with replay's ``--path``; `fengine.cli.replay_hook` builds such a hook). ``config`` is what determines the bits (default:
    `fit`'s ``config``): leave out how-to-start flags (``resume``, ``resume_from``, the work
    dir) and the horizon (``max_epochs``/``max_steps``, recorded per segment), or every
    resumed run would look like another configuration.
    """

    priority = Priority.LOWEST

    def __init__(
        self,
        every: int = 100,
        *,
        recipe: str | Path | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RunRecorder: every must be an int >= 1, got {every!r}")
        self.every = every
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        source = recipe or main
        self.recipe = Path(source).resolve() if source else None
        self.config = config
        self._file: TextIO | None = None
        self._work_dir: Path | None = None
        self._resumed_from: str | None = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:  # not rank 0, or outside before_train .. after_run
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_before_run(self, snap: Snapshot) -> None:
        self._resumed_from = None

    def on_after_load_checkpoint(self, snap: Snapshot) -> None:
        if snap.checkpoint is not None and snap.run.work_dir is not None:
            self._resumed_from = checkpoint_name(snap.checkpoint, snap.run.work_dir)

    def on_before_train(self, snap: Snapshot) -> None:
        run = snap.run
        if run.work_dir is None:
            raise ValueError("RunRecorder needs fit(..., work_dir=...)")
        if run.rank != 0:
            return  # rank 0 writes the run log
        self._work_dir = Path(run.work_dir)
        self._file = _open_for_append(self._work_dir / LOG_NAME)
        config = self.config if self.config is not None else run.config
        # as the log will hold it (int keys made strings, tuples lists), so that the hash of the
        # config read back is the recorded one
        config = json.loads(json.dumps(dict(config))) if config is not None else None
        self._write(
            {
                "kind": "segment",
                "format": FORMAT,
                "start": position(snap.state),
                "resumed_from": self._resumed_from,
                "horizon": {
                    "max_epochs": run.max_epochs,
                    "max_steps": None if run.by_epoch else run.max_steps,
                    "total_steps": run.max_steps,
                },
                "config": config,
                "config_hash": config_hash(config) if config is not None else None,
                "recipe": str(self.recipe) if self.recipe else None,
                "code": {
                    "fengine": code_hash(),
                    "recipe": file_hash(self.recipe) if self.recipe else None,
                },
                "env": environment(snap.state),
            }
        )
        start = {"kind": "digest", **position(snap.state), "digest": state_digest(snap.state)}
        if self._resumed_from is not None:
            start["checkpoint"] = self._resumed_from  # the file this state was loaded from
        self._write(start)

    def _record(self, snap: Snapshot, path: Path | None) -> None:
        if self._file is None:
            return
        record = {"kind": "digest", **position(snap.state), "digest": state_digest(snap.state)}
        if path is not None:
            assert self._work_dir is not None
            record["checkpoint"] = checkpoint_name(path, self._work_dir)
        self._write(record)

    def on_after_train_iter(self, snap: Snapshot) -> None:
        if snap.state.step % self.every == 0:
            self._record(snap, None)

    def on_after_save_checkpoint(self, snap: Snapshot) -> None:
        self._record(snap, snap.checkpoint)

    def on_after_run(self, snap: Snapshot) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _open_regular(path: Path, flags: int, *, one_name: bool = False) -> int:
    """A descriptor on the run log itself (`open_own`: never through a symlink, an untrusted work
    dir must not redirect it; a regular file; with ``one_name`` no other hard links)."""
    try:
        return open_own(path, flags, one_name=one_name)
    except NotOwnFile as e:
        if e.why == "symlink":
            raise ReplayError(
                f"{path} is a symlink (to {e.detail}); expected the run log itself, "
                "a regular file: fengine never follows it (replace the link by the file)"
            ) from None
        if e.why == "special":
            raise ReplayError(
                f"{path} is not a regular file ({e.detail}); expected the run log, a regular file"
            ) from None
        raise ReplayError(
            f"{path} has {e.detail} hard links; expected a file of its own: appending would "
            "change the file under its other names too (replace it by a copy)"
        ) from None
    except OSError as e:
        raise ReplayError(f"{path}: cannot open the run log ({e.strerror})") from None


def _open_for_append(path: Path) -> TextIO:
    """The run log opened to append to (its only name), a torn last record (a process killed
    mid-write) dropped first."""
    fd = _open_regular(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, one_name=True)
    with open(fd, "rb+", closefd=False) as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                json.loads(data[cut:])
            except (ValueError, RecursionError):
                log.warning("%s: dropping a torn last record (%d bytes)", path, len(data) - cut)
                f.truncate(cut)
            else:
                f.write(b"\n")  # a complete record without its newline (O_APPEND: at the end)
    return open(fd, "a", encoding="utf-8")  # noqa: SIM115


@dataclasses.dataclass
class Segment:
    """One start of `fit` in the run log: its record and the digests it wrote."""

    number: int  # 1-based, in file order
    line: int
    record: dict[str, Any]
    digests: list[dict[str, Any]]
    path: Path = Path(LOG_NAME)  # the run log it was read from

    @property
    def start(self) -> Pos:
        return key(self.record["start"])

    @property
    def horizon(self) -> dict[str, Any]:
        return self.record["horizon"]


_Check = tuple[Callable[[Any], bool], str]  # (does a value fit, what fits, in words)
_Schema = dict[str, "_Schema | _Check"]


def _or_null(check: _Check) -> _Check:
    fits, what = check
    return lambda v: v is None or fits(v), f"{what} or null"


_COUNT: _Check = lambda v: type(v) is int and v >= 0, "an int >= 0"  # noqa: E731
_POSITIVE: _Check = lambda v: type(v) is int and v >= 1, "an int >= 1"  # noqa: E731
_THREADS: _Check = lambda v: type(v) is int and 1 <= v <= 4096, "an int from 1 to 4096"  # noqa: E731
_BOOL: _Check = lambda v: type(v) is bool, "true or false"  # noqa: E731
_TEXT: _Check = (
    lambda v: isinstance(v, str) and v != "" and "\0" not in v,
    "a non-empty string",
)
_HEX: _Check = (
    lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
    "a SHA-256 hex digest (64 hex digits)",
)
_OBJECT: _Check = lambda v: v is None or isinstance(v, dict), "an object or null"  # noqa: E731
_POSITION: _Schema = {"step": _COUNT, "epoch": _COUNT, "batch_in_epoch": _COUNT}
_SCHEMAS: dict[str, _Schema] = {
    "segment": {
        "start": _POSITION,
        "resumed_from": _or_null(_TEXT),
        "horizon": {
            "max_epochs": _or_null(_POSITIVE),
            "max_steps": _or_null(_POSITIVE),
            "total_steps": _COUNT,
        },
        "config": _OBJECT,
        "config_hash": _or_null(_TEXT),
        "recipe": _or_null(_TEXT),
        "code": {"fengine": _HEX, "recipe": _or_null(_HEX)},
        "env": {
            "fengine": _TEXT,
            "torch": _TEXT,
            "python": _TEXT,
            "device": _TEXT,
            "threads": _THREADS,
            "deterministic": _BOOL,
            "world_size": _POSITIVE,
        },
    },
    "digest": {**_POSITION, "digest": _HEX, "checkpoint": _TEXT},
}
_MAY_LACK = {"checkpoint", "env.world_size"}  # a digest without a file; logs before world_size


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mismatch(value: Any, schema: _Schema | _Check, field: str) -> str:
    """What is wrong with the first field of ``value`` that does not fit ``schema`` ("" if none)."""
    if isinstance(schema, tuple):
        fits, what = schema
        return "" if fits(value) else f"{field} is {_shown(value)}, expected {what}"
    if not isinstance(value, dict):
        return f"{field} is {_shown(value)}, expected an object with {', '.join(schema)}"
    names = {name: f"{field}.{name}" if field else name for name in schema}
    missing = sorted(f for name, f in names.items() if name not in value and f not in _MAY_LACK)
    if missing:
        return f"no {', '.join(missing)}"
    problems = (_mismatch(value[n], schema[n], f) for n, f in names.items() if n in value)
    return next((p for p in problems if p), "")


def _problem(r: Any, kind: Any, after_segment: bool) -> str:
    """Why ``r`` is not a valid record of the run log ("" when it is): every field's type."""
    if not isinstance(r, dict):
        return f"found {_shown(r)}, expected a JSON object"
    if kind not in _SCHEMAS:
        return f"kind {kind!r}"
    problem = _mismatch(r, _SCHEMAS[kind], "")
    if problem or kind == "digest":
        return problem or ("" if after_segment else "a digest before any segment record")
    h = r["horizon"]
    if (h["max_epochs"] is None) == (h["max_steps"] is None):
        return f"horizon is {_shown(h)}, expected exactly one of max_epochs and max_steps"
    return ""


def _which(kind: Any, segments: int) -> str:
    """The record a line holds, for a message: ``segment 2`` or ``a record of segment 1``."""
    if kind == "segment":
        return f"segment {segments + 1}"
    return f"a record of segment {segments}" if segments else "a record before any segment"


def _loads(line: bytes) -> tuple[Any, list[str]]:
    """A line's JSON and the keys some object of it holds twice (``json`` keeps the last one
    silently: an edited ``{"seed": 0, "seed": 1}`` would replay the edit)."""
    twice: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) < len(items):
            counts = Counter(k for k, _ in items)
            twice.extend(k for k in obj if counts[k] > 1)
        return obj

    return json.loads(line, object_pairs_hook=pairs), twice


def _int_keys(x: Any) -> Any:
    """``x`` with decimal-digit dict keys as ints: a config given to ``fit(config=...)`` with int
    keys was hashed with them before this release (JSON reads them back as strings)."""
    if isinstance(x, dict):
        return {int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: _int_keys(v)
                for k, v in x.items()}  # fmt: skip
    if isinstance(x, list):
        return [_int_keys(v) for v in x]
    return x


def _config_problem(r: dict[str, Any]) -> str:
    """Why a segment record's ``config`` does not match its ``config_hash`` ("" when it does)."""
    config, recorded = r["config"], r["config_hash"]
    if config is None or recorded is None:
        return "" if config is recorded else "one of config and config_hash is null, not both"
    try:
        actual = config_hash(config)
        if actual == recorded or config_hash(_int_keys(config)) == recorded:
            return ""
    except RecursionError:
        return "config is nested too deep to hash"
    except TypeError:  # int and str keys side by side (no writer hashed those): no match
        pass
    return (
        f"its config does not match its config_hash (recorded {recorded[:16]!r}..., the config's "
        f"{actual[:16]!r}...)"
    )


def read_log(work_dir: str | Path, notes: list[str] | None = None) -> list[Segment]:
    """The segments of a recorded run. A torn last line (a process killed mid-write) is
    skipped with a note appended to ``notes``; any other unreadable line is an error."""
    path = Path(work_dir) / LOG_NAME
    if not os.path.lexists(path):
        raise ReplayError(
            f"{path} not found: record the run with fengine.replay.RunRecorder (recipes do)"
        )
    with open(_open_regular(path, os.O_RDONLY), "rb") as f:
        lines = f.read().split(b"\n")
    segments: list[Segment] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r, twice = _loads(line)
        except (ValueError, RecursionError) as e:
            if n == len(lines):  # no newline after it: the write never finished
                if notes is not None:
                    notes.append(f"warning: {path}:{n}: skipping a torn last line ({e})")
                continue
            raise ReplayError(
                f"{path}:{n} is not a JSON record ({e}); the run log is damaged: "
                "restore it or delete that line to replay what remains"
            ) from None
        kind = r.get("kind") if isinstance(r, dict) else None
        if twice:
            raise ReplayError(
                f"{path}:{n} ({_which(kind, len(segments))}) holds the key {twice[0][:60]!r} twice "
                "in one object: the run log is damaged or was edited; restore the file"
            )
        if kind == "header":
            raise ReplayError(
                f"{path}:{n} was written by an older fengine (run log format 1, no segments); "
                "record the run again with this version to replay it"
            )
        if kind == "segment" and r.get("format") != FORMAT:
            raise ReplayError(
                f"{path}:{n} has run log format {r.get('format')!r}; this fengine reads "
                f"format {FORMAT}: replay it with the fengine that recorded it"
            )
        problem = _problem(r, kind, bool(segments))
        if problem:
            raise ReplayError(
                f"{path}:{n} is not a valid run log record ({problem}); restore the file"
            )
        if kind == "segment":
            problem = _config_problem(r)
            if problem:
                raise ReplayError(
                    f"{path}:{n} ({_which(kind, len(segments))}): {problem}; the run log is "
                    "damaged or was edited: restore the file"
                )
            segments.append(Segment(len(segments) + 1, n, r, [], path))
        else:
            segments[-1].digests.append(r)
    if not segments:
        raise ReplayError(f"{path} has no segment record: the run never started training")
    return segments
