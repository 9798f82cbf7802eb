"""Whole training states: `save` / `load` / `read_meta`, and the ``last_checkpoint`` pointer (`mark_latest` / `latest`)."""

from __future__ import annotations

import collections
import json
import os
import stat
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from fengine import checkpoint as seams  # see _data: writes go through seams._pwrite_all
from fengine.checkpoint._data import read_tensors, write_file
from fengine.checkpoint._format import (
    DTYPES,
    MAX_DEPTH,
    SUFFIX,
    CheckpointError,
    CheckpointMismatchError,
    Header,
    Info,
    listing,
    metadata,
    position,
    read_header,
    require_fengine,
)
from fengine.checkpoint._io import (
    TEMP,
    NotRegularFile,
    _fsync_dir,
    atomic_write,
    open_regular,
    pid_alive,
)
from fengine.checkpoint._tree import Leaf, adoptable, flatten, is_empty_dict, prefixes, rebuild
from fengine.sharding import load_leaf, owned_ids, reshard
from fengine.state import TrainState
from fengine.step_check import loaded_problems


POINTER = "last_checkpoint"
"""Name of the pointer file in a work_dir (MMEngine's)."""

_SCALARS = (bool, int, float, str, type(None))


# ======================================================================= save
def save(
    path: str | os.PathLike,
    state: TrainState,
    meta: Mapping[str, Any] | None = None,
    *,
    update_latest: bool = False,
    fsync: bool = True,
) -> Path:
    """Write ``state`` to ``path`` (one ``.safetensors`` file), atomically; returns the path.

    ``meta`` (JSON-serialisable, e.g. the resolved config) is stored alongside.
    With ``update_latest=True`` the ``last_checkpoint`` pointer in
    ``path``'s directory is moved to it once the file is complete (see
    `mark_latest`). A donated state raises `DonatedStateError`; a failed write
    (disk full, unwritable directory) raises ``OSError`` naming ``path`` and
    leaves no file there and the previous checkpoints and pointer untouched.

    ``fsync=False`` skips the two fsyncs (file and directory): the write stays
    atomic against a crash or kill of the process (the page cache survives it)
    but not against an OS crash or power loss. Measured here: fsync roughly
    halves save throughput (the disk's write speed becomes the limit).
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"save: expected a TrainState, got {type(state).__name__}")
    path = Path(path)
    pos = position(state)  # raises DonatedStateError for a consumed state
    leaves, _ = flatten(state)
    named, structure, scalars = [], [], {}
    for leaf in leaves:
        v = leaf.value
        if len(leaf.path) > MAX_DEPTH:
            raise TypeError(
                f"save: {leaf.name} is nested {len(leaf.path)} levels deep; a checkpoint holds at most {MAX_DEPTH}"
            )
        if isinstance(v, torch.Tensor):
            named.append((leaf.name, v))
            structure.append([leaf.name, "tensor", leaf.path, v.device.type])
        elif isinstance(
            v, _SCALARS
        ):  # NaN/inf floats go as JSON NaN/Infinity, which json reads back
            scalars[leaf.name] = v
            structure.append([leaf.name, "scalar", leaf.path])
        elif is_empty_dict(v):
            structure.append([leaf.name, "empty", leaf.path])
        else:
            raise TypeError(
                f"save: cannot store {type(v).__name__} at {leaf.name}: checkpoint leaves must be tensors "
                "or int/float/bool/str/None"
            )
    md = metadata(
        "train_state",
        pos,
        meta,
        structure=json.dumps(structure, ensure_ascii=False),
        scalars=json.dumps(scalars, ensure_ascii=False),
        eval_weights=json.dumps(_eval_weight_keys(state, named), ensure_ascii=False),
    )
    write_file(path, named, md, fsync=fsync)
    if update_latest:
        mark_latest(path.parent, path)
    return path


def _eval_weight_keys(state: TrainState, named: list[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Weight name -> file key where `TrainState.eval_weights` differs from the live weights (EMA)."""
    key_of = {id(t): name for name, t in named}
    params, buffers = state.eval_weights()
    out = {}
    for n, t in {**params, **buffers}.items():
        key = key_of.get(id(t))
        live = state.params.get(n) if n in state.params else state.buffers.get(n)
        if key is not None and t is not live:
            out[n] = key
    return out


# ======================================================================= read_meta / load
def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata (header digest verified; no tensor data read).

    Keys: ``format_version``, ``kind``, ``step``, ``epoch``, ``batch_in_epoch``,
    ``seed``, ``meta`` (what `save` was given), ``versions``, ``scalars``,
    ``structure``, ``tensors`` (name -> dtype and shape), ``file_size``.
    """
    h = read_header(Path(path))
    info = require_fengine(h)
    return {
        "format_version": info.version,
        "kind": info.kind,
        **info.position,
        "meta": info.meta,
        "versions": info.versions,
        "scalars": info.scalars,
        "structure": info.structure,
        "tensors": {
            n: {"dtype": h.table[n]["dtype"], "shape": list(h.table[n]["shape"])} for n in h.order
        },
        "file_size": h.size,
    }


def load(path: str | os.PathLike, like: TrainState, *, into: bool = False) -> TrainState:
    """Read a checkpoint into a new state shaped like ``like`` (its treespec, devices and model).

    Every missing or unexpected name and every shape or dtype mismatch is
    reported in one `CheckpointMismatchError`; a damaged file raises
    `CheckpointError`; nothing is returned unless everything matched and every
    data digest checked out. ``like`` is not modified. Tensors go to the
    devices of ``like``'s tensors and keep their ``requires_grad``. An empty
    dict in ``like`` where the file has entries (the per-parameter state of a
    `fengine.optim.from_torch` optimizer, which torch fills lazily at the first
    step) takes the file's entries; one the file lacks (a field added since it was saved, as
    the optimizers' ``missed`` counts) stays empty. A step wrapper's empty dict takes nothing
    (an EMA without ``update_buffers`` has no buffers: the file's are unexpected, the wrapper's
    configuration changed). Leaves that are one tensor object in
    ``like`` (tied) stay one object if their saved values are equal.

    For a state of a sharded model (FSDP, `fengine.sharding`), every rank reads the full
    tensors and keeps its shard of each sharded leaf (no communication), and the model's
    own params and buffers, which the state shares, receive the loaded values in place
    (there is one set of weights: the module's); the state returned holds them.

    ``into=True`` (what `fit`'s resume does with a donating step) puts the values into ``like``'s
    own tensors where it can (contiguous, owning their memory, not tied to another leaf): the
    file is read straight into CPU ones, and copied into accelerator ones from the CPU; the
    state returned holds them. No second copy of the state in (device) memory and no fresh
    pages to fault in, so a resume reads at the speed of the page cache. ``like`` is
    consumed (donated: reading it afterwards raises `fengine.DonatedStateError`), also when the
    file turns out damaged midway, since its tensors may then hold part of the file.
    """
    if not isinstance(like, TrainState):
        raise TypeError(
            f"load: like must be a TrainState (the template to load into), got {type(like).__name__}"
        )
    h = read_header(Path(path))
    info = require_fengine(h, want="train_state")
    tmpl, spec = flatten(like)
    adopt = _match(h, info, tmpl, like)
    model = like.model
    owned = owned_ids(model)  # a sharded model's own tensors are written in place
    targets = _in_place_targets(tmpl, adopt, owned) if into else {}
    try:
        on_cpu = {n: v for n, v in targets.items() if v.device.type == "cpu"}
        tensors = read_tensors(h, set(h.table), info.digest, verify_all=True, into=on_cpu)
    finally:
        if into:
            like._mark_donated("checkpoint.load(..., into=True)")
    state = pytree.tree_unflatten(_values(tmpl, adopt, tensors, info, owned, targets), spec)
    if owned and model is not None:
        reshard(model)  # no all-gathered copy of the old values survives
    _check_loaded(h.path, state)
    return state


def _in_place_targets(
    tmpl: list[Leaf], adopt: dict[str, list], owned: set[int]
) -> dict[str, torch.Tensor]:
    """The template's tensors the file's values can go straight into: plain tensors, contiguous,
    each the only user of its whole storage and one leaf only. CPU ones are read into; on an
    accelerator the values are copied in from the CPU (no second copy of the state in device
    memory). Tied leaves, views, and the tensors of a sharded model (FSDP frees and regrows
    storages) take the usual path. Shapes and dtypes were matched already."""
    if owned:
        return {}
    candidates = [
        (leaf.name, v)
        for leaf in tmpl
        if leaf.name not in adopt
        and type(v := leaf.value) in (torch.Tensor, torch.nn.Parameter)
        and v.device.type != "meta"
        and v.layout == torch.strided
        and v.numel()
        and v.is_contiguous()
        and not (v.is_conj() or v.is_neg())
        and v.storage_offset() == 0
        and v.untyped_storage().nbytes() == v.numel() * v.element_size()
    ]
    users = collections.Counter(v.untyped_storage().data_ptr() for _, v in candidates)
    return {name: v for name, v in candidates if users[v.untyped_storage().data_ptr()] == 1}


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "a tensor"
    if is_empty_dict(v):
        return "an empty dict"
    kind = type(v).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({v!r:.40})"


def _match(h: Header, info: Info, tmpl: list[Leaf], like: TrainState) -> dict[str, list]:
    """Compare the file with the template leaves; raise `CheckpointMismatchError` listing every problem.

    Returns the template's empty dicts that take the file's entries below them: name -> those entries.
    """
    file_entries = {e[0]: e for e in info.structure}
    below: dict[str, list] = {}  # file prefix -> file entries under it
    for name, e in file_entries.items():
        for pre in prefixes(name):
            below.setdefault(pre, []).append(e)
    tmpl_prefixes = {pre for leaf in tmpl for pre in prefixes(leaf.name)}

    missing, unexpected, shape_bad, dtype_bad, kind_bad = [], [], [], [], []
    used: set[str] = set()
    adopt: dict[str, list] = {}
    for leaf in tmpl:
        v, e = leaf.value, file_entries.get(leaf.name)
        if (
            is_empty_dict(v)
            and leaf.name in below
            and not leaf.name.startswith("extra/")  # a wrapper's config fixes its state's shape
            and adoptable(below[leaf.name], len(leaf.path))
        ):
            adopt[leaf.name] = below[leaf.name]
            used.update(f[0] for f in below[leaf.name])
            continue
        if e is None:
            if is_empty_dict(v) and leaf.name in below:
                continue  # the file has other structure here: its entries are reported as unexpected
            if is_empty_dict(v):
                continue  # nothing to read: a file from before this (empty) field existed loads
            missing.append(
                leaf.name
                + (
                    " (empty dict)"
                    if is_empty_dict(v)
                    else ""
                    if isinstance(v, torch.Tensor)
                    else " (non-tensor)"
                )
            )
            continue
        used.add(leaf.name)
        file_kind = e[1]
        tmpl_kind = (
            "tensor" if isinstance(v, torch.Tensor) else ("empty" if is_empty_dict(v) else "scalar")
        )
        if file_kind != tmpl_kind:
            desc = {
                "tensor": "a tensor",
                "empty": "an empty dict",
                "scalar": "a non-tensor value",
            }.get(file_kind, file_kind)
            kind_bad.append(f"{leaf.name}: {desc} in the file, {_describe(v)} in the template")
        elif file_kind == "tensor":
            fi = h.table[leaf.name]
            fshape, fdtype = list(fi["shape"]), DTYPES[fi["dtype"]]
            if fshape != list(v.shape):
                shape_bad.append((leaf.name, fshape, list(v.shape)))
            if fdtype != v.dtype:
                dtype_bad.append((leaf.name, str(fdtype), str(v.dtype)))
    for name, e in file_entries.items():
        if name in used or (e[1] == "empty" and name in tmpl_prefixes):
            continue  # (an empty dict in the file where the template has entries: those are reported missing)
        unexpected.append(
            name + {"tensor": "", "scalar": " (non-tensor)", "empty": " (empty dict)"}.get(e[1], "")
        )

    if missing or unexpected or shape_bad or dtype_bad or kind_bad:
        parts = [
            f"{h.path}: the checkpoint (step {info.position.get('step')}) does not match the template state:"
        ]
        if missing:
            parts.append(listing("missing in the file", missing))
        if unexpected:
            parts.append(listing("unexpected in the file", unexpected))
        if shape_bad:
            parts.append(
                listing(
                    "shape mismatch (file vs template)",
                    [f"{n}: {a} vs {b}" for n, a, b in shape_bad],
                )
            )
        if dtype_bad:
            parts.append(
                listing(
                    "dtype mismatch (file vs template)",
                    [f"{n}: {a} vs {b}" for n, a, b in dtype_bad],
                )
            )
        if kind_bad:
            parts.append(listing("tensor / non-tensor mismatch", kind_bad))
        if any(u.startswith("extra/") for u in unexpected) and not like.extra:
            parts.append(
                "  hint: the file has step-wrapper state (amp, ema, ...) and the template has none; "
                "build the template with the run's step: step.init(model, seed=...)"
            )
        differ = [*missing, *unexpected, *(b[0] for b in shape_bad + dtype_bad)]
        differ += [k.split(": ")[0] for k in kind_bad]
        changed = _changed_wrappers(differ, file_entries, like)
        if changed:
            parts.append(
                f"  hint: the model matches, but the file's {' and '.join(changed)} state has other "
                "entries than the template's: the wrapper's configuration changed since the "
                "checkpoint was saved (e.g. ema's update_buffers= or params=); use the saved one"
            )
        raise CheckpointMismatchError(
            "\n".join(parts),
            missing=missing,
            unexpected=unexpected,
            shape=shape_bad,
            dtype=dtype_bad,
            kind=kind_bad,
        )
    return adopt


def _changed_wrappers(names: list[str], file_entries: dict, like: TrainState) -> list[str]:
    """The wrappers (``extra/<name>/...``) that both the file and ``like`` have state for, among
    ``names`` (every entry that differs), when only wrapper entries differ (a widened EMA)."""

    def wrapper(name: str) -> str | None:
        parts = name.split(" ")[0].split("/")  # "extra/ema/steps (non-tensor)"
        return parts[1] if parts[0] == "extra" and len(parts) > 1 else None

    differ = {wrapper(n) for n in names}
    if None in differ:
        return []  # the model (or optimizer) differs too: the wrapper config is not the cause
    in_file = {wrapper(n) for n in file_entries}
    return sorted(w for w in differ if w is not None and w in in_file and w in like.extra)


def _check_loaded(path: Path, state: TrainState) -> None:
    """Refuse what the file put into the state's per-param dicts and counts that no run makes
    (a key naming no param, another shape, a count out of range: an edited file whose digests
    were recomputed), naming the file, before a step fails on it or trains on it."""
    parts = [("opt_state", state.opt_state)] + [
        (f"extra[{k!r}]", v) for k, v in state.extra.items()
    ]
    problems = [
        f"{where}.{p}"
        for where, tree in parts
        for p in loaded_problems(tree, state.params, state.buffers)
    ]
    if problems:
        raise CheckpointError(
            f"{path}: corrupt state (step {state.step}): "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        )


def _place(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "meta":
        device = torch.device("cpu")
    return t if t.device == device else t.to(device)


def _values(
    tmpl: list[Leaf],
    adopt: dict[str, list],
    tensors: dict[str, torch.Tensor],
    info: Info,
    owned: set[int],
    targets: Mapping[str, torch.Tensor],
) -> list[Any]:
    """The loaded leaves, in the template's order, on the template's devices (in ``targets``'
    own memory for those: `_in_place_targets`)."""
    # adopted tensors: CPU if saved from CPU (torch keeps Adam's `step` there), else the template's accelerator
    accel = next(
        (
            leaf.value.device
            for leaf in tmpl
            if isinstance(leaf.value, torch.Tensor)
            and leaf.value.device.type not in ("cpu", "meta")
        ),
        torch.device("cpu"),
    )
    values: dict[str, Any] = dict(info.scalars)
    for entries in adopt.values():
        for e in entries:
            if e[1] == "tensor":
                saved = e[3] if len(e) > 3 else "cpu"
                values[e[0]] = _place(
                    tensors[e[0]], torch.device("cpu") if saved == "cpu" else accel
                )
    out: list[Any] = []
    first_of: dict[int, torch.Tensor] = {}
    for leaf in tmpl:
        v = leaf.value
        if leaf.name in adopt:
            out.append(rebuild(adopt[leaf.name], len(leaf.path), values))
        elif isinstance(v, torch.Tensor):
            t = tensors[leaf.name]
            placed = load_leaf(t, v, owned)  # sharded: this rank's shard (no communication)
            if placed is not None:
                out.append(first_of.setdefault(id(v), placed))
                continue
            shared = first_of.get(id(v))
            if shared is not None and torch.equal(shared.detach().cpu(), t):
                out.append(shared)  # one object in the template: keep it one object
                continue
            if leaf.name in targets and t is not v:  # an accelerator's tensor: filled in place
                with torch.no_grad():
                    v.copy_(t)
                t = v
            t = _place(t, v.device)
            if v.requires_grad:
                t.requires_grad_(True)
            first_of.setdefault(id(v), t)
            out.append(t)
        elif is_empty_dict(v):
            out.append({})
        else:
            out.append(info.scalars[leaf.name])
    return out


# ======================================================================= the last_checkpoint pointer
def mark_latest(work_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Point ``work_dir/last_checkpoint`` at ``path`` (atomically); returns the pointer file.

    Call it only once ``path`` is complete (`save` returned). The pointer holds
    the path relative to ``work_dir`` when it lies inside it (so the directory
    can be moved), else the absolute path.
    """
    work_dir, path = Path(work_dir), Path(path)
    if not path.is_file():
        raise CheckpointError(f"mark_latest: {path} is not a file; save the checkpoint first")
    require_fengine(read_header(path), want="train_state")
    try:
        text = os.path.relpath(path.resolve(), work_dir.resolve())
        if text.startswith(".."):
            text = str(path.resolve())
    except ValueError:  # pragma: no cover - different drives on Windows
        text = str(path.resolve())
    pointer = work_dir / POINTER
    data = memoryview((text + "\n").encode("utf-8"))
    atomic_write(
        pointer, lambda fd: seams._pwrite_all(fd, data, 0), what="the last_checkpoint pointer"
    )
    return pointer


_POINTER_MAX = 4096  # bytes: more than any path it holds


def _read_pointer(pointer: Path) -> tuple[str | None, str | None]:
    """``(text, None)``; ``(None, None)`` when there is no pointer; ``(None, why it is unusable)``."""
    try:
        fd, _ = open_regular(pointer)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except NotRegularFile as e:
        return None, f"{pointer} is {e.kind}, not a file"
    except (OSError, ValueError) as e:
        return None, f"{pointer}: unreadable ({e})"
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_POINTER_MAX + 1)
    if len(raw) > _POINTER_MAX:
        return None, f"{pointer} is over {_POINTER_MAX} bytes, not a path"
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"{pointer} is not UTF-8 text"
    return (text, None) if text else (None, f"{pointer} is empty")


def _pointed(pointer: Path, text: str, dirs: list[Path]) -> tuple[Path | None, str | None]:
    """The file the pointer's ``text`` names, if it lies in one of ``dirs`` (or below); else why not."""
    where = " or ".join(map(str, dirs))
    if "\0" in text:
        return None, f"{pointer} holds a NUL character"
    p = Path(text)
    if ".." in p.parts:
        return (
            None,
            f"{pointer} names {text!r}, a path with '..' (it may only name a file in {where})",
        )
    target = p if p.is_absolute() else dirs[0] / p
    if not _inside(target, dirs):
        return (
            None,
            f"{pointer} names {text!r}, outside {where} (the pointer may only name a file there)",
        )
    return target, None


def pointed(work_dir: Path, also: Sequence[Path] = ()) -> Path | None:
    """The file ``work_dir/last_checkpoint`` names, read as `latest` reads it (a regular file of
    a few bytes, UTF-8, no NUL, no ``..``, inside ``work_dir`` or one of ``also``: where a
    Checkpointer's ``out_dir`` puts them), symlinks resolved; None when there is no usable
    pointer. Not verified: for `fengine.fit`'s retirement, which never deletes that file."""
    pointer = work_dir / POINTER
    text, _ = _read_pointer(pointer)
    if text is None:
        return None
    target, _ = _pointed(pointer, text, [work_dir, *also])
    return None if target is None else Path(os.path.realpath(target))


def _inside(path: Path, dirs: list[Path]) -> bool:
    """Whether ``path``, symlinks resolved, lies in one of ``dirs`` (or below)."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(d)) for d in dirs)


def _usable(h: Header, info: Info, verify: bool) -> str | None:
    """None if the checkpoint's data checks out (when ``verify``), else why not."""
    try:
        if verify:
            read_tensors(h, set(), info.digest, verify_all=True)
    except CheckpointError as e:
        return str(e)
    return None


def _training_checkpoint(path: Path) -> tuple[Header, Info] | str:
    try:
        h = read_header(path)
        return h, require_fengine(h, want="train_state")
    except CheckpointError as e:
        return str(e)


def _scanned(path: Path) -> tuple[Header, Info] | str | None:
    """A training checkpoint; a reason when ``path`` looks like one but is damaged; None for
    another kind of file (a safetensors file without fengine metadata, a published params file)."""
    try:
        h = read_header(path)
        if not any(k.startswith("fengine.") for k in h.metadata):
            return None
        info = require_fengine(h)
    except CheckpointError as e:
        return str(e)
    return (h, info) if info.kind == "train_state" else None


def _newest_readable(
    dirs: list[Path], skip: Path | None, verify: bool
) -> tuple[tuple[Path, int] | None, list[str]]:
    """The readable training checkpoint in ``dirs`` with the highest step, then the latest mtime:
    ((path, step) or None, why each damaged one seen on the way was rejected)."""
    found, rejected = [], []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            p = d / name
            if name.startswith(".") or not name.endswith(SUFFIX) or p == skip:
                continue
            if not _inside(p, dirs):  # a symlink out of the directory
                continue
            got = _scanned(p)
            if isinstance(got, str):
                rejected.append(got)
            elif got is not None:
                h, info = got
                found.append((info.position["step"], h.identity[3], name, p, h, info))
    for step, _, _, p, h, info in sorted(found, key=lambda c: c[:3], reverse=True):
        problem = _usable(h, info, verify)
        if problem is None:
            return (p, step), rejected
        rejected.append(problem)
    return None, rejected


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[Path, int]]:
    """The training checkpoints in ``directory`` (its own files, not links out of it), as
    (path, step) by step then name. Reads headers only; damaged files and other kinds of
    safetensors files (published params) are not listed."""
    d = Path(directory)
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    found = []
    for name in names:
        p = d / name
        if name.startswith(".") or not name.endswith(SUFFIX) or not _inside(p, [d]):
            continue
        scanned = _scanned(p)
        if isinstance(scanned, tuple):
            found.append((p, scanned[1].position["step"]))
    return sorted(found, key=lambda c: (c[1], c[0].name))


def set_aside_later(
    path: str | os.PathLike, directory: str | os.PathLike
) -> tuple[Path, list[str]] | None:
    """Move the training checkpoints of ``directory`` saved at later steps than ``path``'s into
    ``directory/abandoned_after_step_<N>.<time>/`` (then fsync the directory); that folder and
    the names moved, or None when there are none. Before a run rewinds to ``path`` there: its
    saves would replace those of the same names and strand the rest, which `latest`'s fallback
    (the highest step) could pick. Nothing is deleted. Other files are left where they are."""
    got = _training_checkpoint(Path(path))
    if isinstance(got, str):
        raise CheckpointError(got)
    start = got[1].position["step"]
    d = Path(directory)
    later = [p for p, step in list_checkpoints(d) if step > start]
    if not later:
        return None
    base = f"abandoned_after_step_{start}.{time.strftime('%Y%m%d_%H%M%S')}"
    aside, n = d / base, 1
    while aside.exists():
        n += 1
        aside = d / f"{base}-{n}"
    aside.mkdir()
    for p in later:
        os.rename(p, aside / p.name)
    _fsync_dir(d)
    return aside, [p.name for p in later]


def latest(
    work_dir: str | os.PathLike,
    *,
    verify: bool = True,
    save_dir: str | os.PathLike | None = None,
) -> Path | None:
    """The checkpoint to resume ``work_dir`` from: the one ``work_dir/last_checkpoint`` names, or None if there is none.

    The pointer is not trusted: it may name only a regular file inside
    ``work_dir`` (or ``save_dir``, where the checkpoints go when that is elsewhere,
    e.g. `Checkpointer`'s ``out_dir``), without ``..``. If it names anything else,
    or a file that is missing or unreadable (checked fully, data digests included,
    unless ``verify=False``), or it is unreadable itself, this warns and falls back
    to the readable training checkpoint (``*.safetensors``) in those directories
    with the highest step recorded in the file, then the newest modification time;
    and raises `CheckpointError` if there is none. With no pointer at all, it warns
    and returns that same checkpoint if there is one; else None when no file there
    looks like a training checkpoint (a fresh run), and `CheckpointError` naming each
    damaged one and why when some do: starting over on top of a damaged run is not
    silent.
    """
    work_dir = Path(work_dir)
    dirs = [work_dir]
    if save_dir is not None and os.path.realpath(save_dir) != os.path.realpath(work_dir):
        dirs.append(Path(save_dir))
    pointer = work_dir / POINTER
    text, problem = _read_pointer(pointer)
    target = None
    if text is not None:
        target, problem = _pointed(pointer, text, dirs)
        if target is not None:
            got = _training_checkpoint(target)
            problem = got if isinstance(got, str) else _usable(*got, verify)
            if problem is None:
                return target
            problem = f"{pointer} names an unusable checkpoint ({problem})"
    found, rejected = _newest_readable(dirs, target, verify)
    if problem is None and found is None and not rejected:  # no pointer, no checkpoint: a fresh run
        return None
    if found is None:
        where = " and ".join(map(str, dirs))
        why = problem or f"{pointer} does not exist"
        other = "other " if target is not None else ""
        damaged = (
            ":\n" + listing("damaged checkpoints", rejected) + "\n  resume from a checkpoint "
            "file you name, or move these away to start from scratch"
            if rejected
            else ""
        )
        raise CheckpointError(f"{why}; and no {other}readable checkpoint is in {where}{damaged}")
    why = problem or f"{pointer} does not exist"
    warnings.warn(
        f"{why}; falling back to {found[0]}, the readable checkpoint with the highest step "
        f"({found[1]}) in {' and '.join(map(str, dirs))}",
        UserWarning,
        stacklevel=2,
    )
    return found[0]


# ======================================================================= stale temp files
def clean_stale_temps(directory: str | os.PathLike, *, locked: bool = False) -> list[Path]:
    """Remove the temp files that killed saves left in ``directory``; returns the paths removed.

    A save writes a hidden ``.<name>.<pid>.<8 hex digits>.tmp`` beside its target
    and renames it into place; a process killed midway leaves it behind (nothing
    reads it, but it takes disk space). Only regular files named exactly so are
    considered, and only those whose writing process no longer exists are removed:
    one of a live process (a save in progress) is kept. Where that cannot be told
    (not POSIX), a temp file is removed only if it is older than the newest
    checkpoint in ``directory``. Nothing else is ever touched. The pid test is for
    one machine: do not call this on a directory that processes on other machines
    are saving into. ``locked=True`` says the caller holds the directory's run lock
    (`fengine.lock_work_dir`): then no other writer exists and every such file is
    stale, whatever its pid (`fit` calls it so on the work dir when a run starts).
    """
    directory = Path(directory)
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    newest: int | None = None
    removed = []
    for name in names:
        m = TEMP.fullmatch(name)
        if m is None:
            continue
        p = directory / name
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        alive = False if locked else pid_alive(int(m["pid"]))
        if alive is None:
            if newest is None:
                newest = _newest_checkpoint_mtime(directory, names)
            alive = st.st_mtime_ns >= newest
        if alive:
            continue
        try:
            os.unlink(p)
        except OSError:  # gone already, or not ours to remove
            continue
        removed.append(p)
    return removed


def _newest_checkpoint_mtime(directory: Path, names: list[str]) -> int:
    newest = 0
    for name in names:
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        try:
            st = os.stat(directory / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            newest = max(newest, st.st_mtime_ns)
    return newest
