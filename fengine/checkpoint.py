"""Checkpoints: one ``.safetensors`` file per `TrainState`, written atomically, verified on load.

Format (version 1). A checkpoint is a plain safetensors file, so
``safetensors.torch.load_file(path)`` reads it:

* every tensor of the state is stored under its pytree path, components joined
  by ``/``: ``params/fc1.weight``, ``opt_state/1/exp_avg/fc1.weight``,
  ``extra/amp/scale`` (a ``/`` or ``%`` inside a key is written ``%2F`` / ``%25``);
* the safetensors metadata (string -> string, values here are JSON) holds
  ``fengine.format`` / ``fengine.format_version`` / ``fengine.kind``
  (``train_state``, or ``params`` for `publish`), ``fengine.position`` (step,
  epoch, batch_in_epoch, seed), ``fengine.structure`` (every leaf: name, kind
  ``tensor`` / ``scalar`` / ``empty`` (an empty dict), its pytree path, and for
  tensors the device type), ``fengine.scalars`` (the non-tensor leaves: ints,
  floats, bools, None, str), ``fengine.meta`` (the caller's ``meta``, e.g. the
  resolved config), ``fengine.versions`` (fengine, torch, python),
  ``fengine.data_digest`` (CRC-32 of each 16 MiB block of the tensor data) and
  ``fengine.header_digest`` (SHA-256 of the tensor table and all other metadata).

CRC-32 was measured as the fastest stdlib digest here (zlib.crc32 3.7 GB/s;
adler32 3.1, sha1/sha256 1.1, md5 0.7, blake2b 0.5 GB/s on one core); it catches
every burst error up to 32 bits and any other damage with probability 1 - 2^-32
per block. Blocks are hashed (and read/written) on a few threads, since zlib and
``os.pread``/``os.pwrite`` release the GIL. The header is covered by SHA-256.

Writes are atomic: a hidden temp file in the target directory, ``fsync``,
``os.replace``, ``fsync`` of the directory. A checkpoint is never modified in
place afterwards. The ``last_checkpoint`` pointer file (MMEngine's name) is
written the same way, and only after the checkpoint it names is complete. A save
killed midway leaves at most a hidden ``.<name>.<pid>.<random>.tmp`` file, which
nothing reads.

Loading checks the file against a template state (``like``) and reports every
missing / unexpected name and every shape / dtype mismatch at once; the block
digests are checked as the data is read, and nothing is returned unless all of
it matched.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import errno
import hashlib
import json
import math
import os
import secrets
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fengine.state import TrainState


__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "latest",
    "load",
    "load_params",
    "mark_latest",
    "publish",
    "read_meta",
    "save",
]

FORMAT_VERSION = 1
POINTER = "last_checkpoint"
"""Name of the pointer file in a work_dir (MMEngine's)."""
_FORMAT = "fengine.checkpoint"
_BLOCK = 16 << 20  # bytes of tensor data per CRC-32 block
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_SUFFIX = ".safetensors"

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2", "float8_e5m2"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("C64", "complex64"),
    )
    if hasattr(torch, attr)
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (missing, truncated, corrupted, foreign), or a mismatch."""


class CheckpointMismatchError(CheckpointError):
    """The file's structure does not match the template (or, for `load_params`, strict loading failed).

    Attributes list every problem by name: ``missing``, ``unexpected``,
    ``shape`` and ``dtype`` (``(name, in file, in template)``) and ``kind``
    (tensor vs. non-tensor leaf).
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), shape=(), dtype=(), kind=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape = list(shape)
        self.dtype = list(dtype)
        self.kind = list(kind)


# ======================================================================= paths
def _is_empty_dict(x: Any) -> bool:
    return type(x) is dict and not x


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("/", "%2F")


def _component(key: Any, where: list[str]) -> tuple[list, str]:
    """A pytree key as (JSON component, name text)."""
    if isinstance(key, pytree.GetAttrKey):
        return ["a", key.name], _escape(key.name)
    if isinstance(key, pytree.SequenceKey):
        return ["i", key.idx], str(key.idx)
    if isinstance(key, pytree.MappingKey):
        k = key.key
        if isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)):
            return ["k", k], _escape(str(k))
        raise TypeError(f"checkpoint: dict key {k!r} under {'/'.join(where) or 'the state'} is not a str or int")
    raise TypeError(f"checkpoint: unsupported pytree key {key!r} under {'/'.join(where) or 'the state'}")


@dataclasses.dataclass
class _Leaf:
    name: str
    path: list  # JSON components: ["a", attr] / ["i", index] / ["k", key]
    value: Any


def _flatten(tree: Any) -> tuple[list[_Leaf], Any]:
    """Leaves with readable names (empty dicts are leaves too) and the treespec."""
    flat, spec = pytree.tree_flatten_with_path(tree, is_leaf=_is_empty_dict)
    leaves, seen = [], set()
    for keys, value in flat:
        comps, texts = [], []
        for k in keys:
            c, t = _component(k, texts)
            comps.append(c)
            texts.append(t)
        name = "/".join(texts)
        if name in seen:
            raise TypeError(f"checkpoint: two leaves of the state are both named {name!r} (an int and a str dict key?)")
        seen.add(name)
        leaves.append(_Leaf(name, comps, value))
    return leaves, spec


# ======================================================================= I/O primitives
_POSITIONAL_IO = hasattr(os, "pwrite") and hasattr(os, "preadv")


def _workers() -> int:
    if not _POSITIONAL_IO:  # pragma: no cover - seek + read/write: one thread at a time
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _run(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run the tasks on a few threads (zlib and pread/pwrite release the GIL); first error wins."""
    if len(tasks) <= 1 or _workers() == 1:
        return [t() for t in tasks]
    with ThreadPoolExecutor(_workers(), thread_name_prefix="fengine-ckpt") as ex:
        futures = [ex.submit(t) for t in tasks]
        results, error = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below
                if error is None:
                    error = e
                    for g in futures:
                        g.cancel()
        if error is not None:
            raise error
        return results


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (the one place bytes go to disk; tests patch it)."""
    done, n = 0, len(data)
    while done < n:
        if _POSITIONAL_IO:
            done += os.pwrite(fd, data[done:], offset + done)
        else:  # pragma: no cover - e.g. Windows (single-threaded there, see _workers)
            os.lseek(fd, offset + done, os.SEEK_SET)
            done += os.write(fd, data[done:])


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns the bytes read (less than asked only at end of file)."""
    done, n = 0, len(buf)
    while done < n:
        if _POSITIONAL_IO:
            got = os.preadv(fd, [buf[done:]], offset + done)
        else:  # pragma: no cover - e.g. Windows (single-threaded there, see _workers)
            os.lseek(fd, offset + done, os.SEEK_SET)
            chunk = os.read(fd, n - done)
            got = len(chunk)
            buf[done:done + got] = chunk
        if got == 0:
            break
        done += got
    return done


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's space up front, so a full disk fails before any data is written."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _save_failed(path: Path, e: OSError, what: str = "checkpoint") -> OSError:
    reason = e.strerror or str(e)
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        blocker = next((p for p in path.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            reason = f"{blocker} is a file, not a directory"
    msg = (
        f"cannot save {what} {path}: {reason}. Nothing was written there; existing "
        "checkpoints and the last_checkpoint pointer are untouched"
    )
    try:
        return type(e)(e.errno, msg, str(path)) if e.errno is not None else type(e)(msg)
    except TypeError:  # pragma: no cover - odd OSError subclasses
        return OSError(e.errno, msg, str(path))


def _atomic_write(
    path: Path,
    write: Callable[[int], Any],
    final: Callable[[Any], Path] | None = None,
    *,
    fsync: bool = True,
    what: str = "checkpoint",
) -> tuple[Path, Any]:
    """Create ``path`` atomically: ``write(fd)`` fills a temp file, then fsync + rename + fsync(dir).

    ``final(result)`` may choose the name to rename to (`publish` names the file by its digest).
    Returns (the path written, what ``write`` returned).
    """
    tmp = None
    fd = -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        result = write(fd)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        if final is not None:
            path = final(result)
        os.replace(tmp, path)
        tmp = None
        if fsync:
            _fsync_dir(path.parent)
        return path, result
    except OSError as e:
        raise _save_failed(path, e, what) from e
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ======================================================================= writing
@dataclasses.dataclass
class _Source:
    name: str
    dtype: str
    shape: list[int]
    data: memoryview | None  # the raw bytes (None when empty)
    nbytes: int
    begin: int = 0


def _source(name: str, t: torch.Tensor) -> _Source:
    if t.layout != torch.strided:
        raise TypeError(f"checkpoint: {name} is a {t.layout} tensor; only dense (strided) tensors can be saved")
    if t.is_quantized:
        raise TypeError(f"checkpoint: {name} is a quantized tensor, which safetensors cannot store")
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"checkpoint: {name} has dtype {t.dtype}, which safetensors cannot store")
    if t.device.type == "meta":
        raise TypeError(f"checkpoint: {name} is on the meta device (it has no data)")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()  # shared storage / views / transposes are fine
    nbytes = t.numel() * t.element_size()
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else None
    return _Source(name, _DTYPE_NAMES[t.dtype], list(t.shape), data, nbytes)


def _encode_header(table: dict, metadata: dict[str, str]) -> bytes:
    header = {"__metadata__": metadata, **table}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def _header_digest(table: Mapping, metadata: Mapping[str, str]) -> str:
    canon = {"tensors": table, "metadata": {k: v for k, v in metadata.items() if k != "fengine.header_digest"}}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def _blocks(total: int, block: int) -> int:
    return math.ceil(total / block) if total else 0


def _write_file(
    path: Path,
    named: list[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    sha256: bool = False,
    final: Callable[[Any], Path] | None = None,
    fsync: bool = True,
) -> Path:
    """Write a safetensors file with block digests; returns its path.

    With ``sha256`` the file's SHA-256 (hex) is passed to ``final``, which names the file.
    """
    sources = [_source(n, t) for n, t in named]
    # biggest element size first keeps every tensor aligned to its element size
    order = sorted(range(len(sources)), key=lambda i: (-_DTYPES[sources[i].dtype].itemsize, i))
    offset = 0
    table = {}
    for i in order:
        s = sources[i]
        s.begin = offset
        offset += s.nbytes
        table[s.name] = {"dtype": s.dtype, "shape": s.shape, "data_offsets": [s.begin, offset]}
    total = offset
    ordered = [sources[i] for i in order]
    nblocks = _blocks(total, _BLOCK)
    digest = {"algorithm": "crc32", "block_size": _BLOCK, "blocks": ["0" * 8] * nblocks}
    metadata = dict(metadata)
    metadata["fengine.data_digest"] = json.dumps(digest, separators=(",", ":"))
    metadata["fengine.header_digest"] = "0" * 64
    head_len = len(_encode_header(table, metadata))  # fixed-width placeholders: same length once filled
    starts = [s.begin for s in ordered]

    def write(fd: int) -> str | None:
        _preallocate(fd, head_len + total)

        def block_task(b: int) -> Callable[[], str]:
            lo, hi = b * _BLOCK, min((b + 1) * _BLOCK, total)

            def task() -> str:
                crc = 0
                for s in _overlapping(ordered, starts, lo, hi):
                    a, z = max(lo, s.begin) - s.begin, min(hi, s.begin + s.nbytes) - s.begin
                    piece = s.data[a:z]
                    _pwrite_all(fd, piece, head_len + s.begin + a)
                    crc = zlib.crc32(piece, crc)
                return f"{crc:08x}"

            return task

        digest["blocks"] = _run([block_task(b) for b in range(nblocks)])
        metadata["fengine.data_digest"] = json.dumps(digest, separators=(",", ":"))
        metadata["fengine.header_digest"] = _header_digest(table, metadata)
        head = _encode_header(table, metadata)
        if len(head) != head_len:  # pragma: no cover - guarded by the fixed-width placeholders
            raise RuntimeError("checkpoint header changed length")
        _pwrite_all(fd, memoryview(head), 0)
        if not sha256:
            return None
        h = hashlib.sha256(head)
        for s in ordered:
            if s.data is not None:
                h.update(s.data)
        return h.hexdigest()

    return _atomic_write(path, write, final, fsync=fsync)[0]


def _overlapping(ordered: list, starts: list[int], lo: int, hi: int):
    """Sources (sorted by begin) whose bytes intersect [lo, hi)."""
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(ordered) and ordered[i].begin < hi:
        s = ordered[i]
        if s.nbytes and s.begin + s.nbytes > lo:
            yield s
        i += 1


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _dump_meta(meta: Mapping[str, Any] | None) -> str:
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"save: meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(dict(meta), default=_json_default, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save: meta must be JSON-serialisable (str/int/float/bool/None/list/dict, dataclasses, paths): {e}") from None


def _versions() -> str:
    fe = sys.modules.get("fengine")
    return json.dumps({
        "fengine": getattr(fe, "__version__", "unknown"),
        "torch": torch.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    })


def _position(state: TrainState) -> dict[str, int]:
    return {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "seed": state.seed}


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
    position = _position(state)  # raises DonatedStateError for a consumed state
    leaves, _ = _flatten(state)
    named, structure, scalars = [], [], {}
    for leaf in leaves:
        v = leaf.value
        if isinstance(v, torch.Tensor):
            named.append((leaf.name, v))
            structure.append([leaf.name, "tensor", leaf.path, v.device.type])
        elif isinstance(v, _SCALARS):  # NaN/inf floats go as JSON NaN/Infinity, which json reads back
            scalars[leaf.name] = v
            structure.append([leaf.name, "scalar", leaf.path])
        elif _is_empty_dict(v):
            structure.append([leaf.name, "empty", leaf.path])
        else:
            raise TypeError(
                f"save: cannot store {type(v).__name__} at {leaf.name}: checkpoint leaves must be tensors "
                "or int/float/bool/str/None"
            )
    metadata = {
        "fengine.format": _FORMAT,
        "fengine.format_version": str(FORMAT_VERSION),
        "fengine.kind": "train_state",
        "fengine.position": json.dumps(position),
        "fengine.structure": json.dumps(structure, ensure_ascii=False),
        "fengine.scalars": json.dumps(scalars, ensure_ascii=False),
        "fengine.meta": _dump_meta(meta),
        "fengine.versions": _versions(),
    }
    _write_file(path, named, metadata, fsync=fsync)
    if update_latest:
        mark_latest(path.parent, path)
    return path


def mark_latest(work_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Point ``work_dir/last_checkpoint`` at ``path`` (atomically); returns the pointer file.

    Call it only once ``path`` is complete (`save` returned). The pointer holds
    the path relative to ``work_dir`` when it lies inside it (so the directory
    can be moved), else the absolute path.
    """
    work_dir, path = Path(work_dir), Path(path)
    if not path.is_file():
        raise CheckpointError(f"mark_latest: {path} is not a file; save the checkpoint first")
    _require_fengine(_read_header(path), want="train_state")
    try:
        text = os.path.relpath(path.resolve(), work_dir.resolve())
        if text.startswith(".."):
            text = str(path.resolve())
    except ValueError:  # pragma: no cover - different drives on Windows
        text = str(path.resolve())
    pointer = work_dir / POINTER
    data = memoryview((text + "\n").encode("utf-8"))
    _atomic_write(pointer, lambda fd: _pwrite_all(fd, data, 0), what="the last_checkpoint pointer")
    return pointer


# ======================================================================= reading
@dataclasses.dataclass
class _Header:
    path: Path
    size: int
    data_start: int
    table: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    order: list[str]  # names sorted by offset
    total: int  # bytes of tensor data


def _err(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


_USE_LOAD_PARAMS = "to load its weights use fengine.checkpoint.load_params(path, into)"


def _foreign(first: bytes) -> str | None:
    """What a file that is not safetensors looks like, from its first bytes."""
    if first[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's .pth format)"
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a legacy torch .pth file?)"
    return None


def _read_header(path: str | os.PathLike) -> _Header:
    path = Path(path)
    if path.is_dir():
        raise _err(path, "is a directory, not a checkpoint file (fengine.checkpoint.latest(work_dir) finds the newest checkpoint in one)")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise _err(path, "no such file") from None
    except OSError as e:
        raise _err(path, f"cannot open: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        n = int.from_bytes(first, "little") if len(first) == 8 else -1
        raw = f.read(n) if 0 <= n <= min(size - 8, _MAX_HEADER) else b""
    if not raw.startswith(b"{"):
        kind = _foreign(first)
        if kind:
            raise _err(path, f"is {kind}, not a fengine checkpoint; {_USE_LOAD_PARAMS}")
        if size < 8:
            raise _err(path, f"truncated: {size} bytes, less than a safetensors header" if size else "is empty (truncated)")
        if n > size - 8:
            raise _err(path, f"truncated or corrupt: the header length field says {n} bytes but the file has {size} (not a complete safetensors file)")
        if n > _MAX_HEADER:
            raise _err(path, f"corrupt: header length {n} exceeds the safetensors limit")
        raise _err(path, "not a safetensors file (no JSON header), or its header is corrupt")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"corrupt header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise _err(path, "corrupt header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _err(path, "corrupt header (__metadata__ is not a string-to-string map)")
    spans = []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = info["shape"]
            begin, end = info["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _err(path, f"corrupt header: bad entry for tensor {name!r}: {info!r:.200}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise _err(path, f"corrupt header: tensor {name!r} has {end - begin} bytes for shape {shape} of {info['dtype']}")
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise _err(path, f"corrupt header: tensor {name!r} starts at byte {begin} of the data, expected {expected}")
        expected = end
    data_start = 8 + n
    have = size - data_start
    if have < expected:
        raise _err(path, f"truncated: the header describes {expected} bytes of tensor data, the file has {have}")
    if have > expected:
        raise _err(path, f"corrupt: {have - expected} unexpected bytes after the tensor data")
    return _Header(path, size, data_start, header, metadata, [s[2] for s in spans], expected)


@dataclasses.dataclass
class _Info:
    kind: str
    position: dict[str, int]
    structure: list  # [name, kind, path, (device)]
    scalars: dict[str, Any]
    meta: dict[str, Any]
    versions: dict[str, str]
    digest: dict[str, Any] | None


def _require_fengine(h: _Header, want: str | None = None) -> _Info:
    """Parse and verify fengine's metadata (header digest included)."""
    md, path = h.metadata, h.path
    if md.get("fengine.format") != _FORMAT:
        raise _err(path, f"a safetensors file without fengine metadata, so not a fengine checkpoint; {_USE_LOAD_PARAMS}")
    stored = md.get("fengine.header_digest")
    if stored != _header_digest(h.table, md):
        raise _err(path, "corrupt header: its SHA-256 digest does not match (tensor table or metadata altered)")
    try:
        version = int(md["fengine.format_version"])
    except (KeyError, ValueError):
        raise _err(path, "corrupt header: no valid fengine.format_version") from None
    if version > FORMAT_VERSION:
        raise _err(path, f"written in checkpoint format {version} by a newer fengine; this one reads up to {FORMAT_VERSION}")
    try:
        info = _Info(
            kind=md.get("fengine.kind", ""),
            position=json.loads(md.get("fengine.position", "{}")),
            structure=json.loads(md.get("fengine.structure", "[]")),
            scalars=json.loads(md.get("fengine.scalars", "{}")),
            meta=json.loads(md.get("fengine.meta", "{}")),
            versions=json.loads(md.get("fengine.versions", "{}")),
            digest=json.loads(md["fengine.data_digest"]) if "fengine.data_digest" in md else None,
        )
    except json.JSONDecodeError as e:
        raise _err(path, f"corrupt metadata ({e})") from None
    if info.digest is None or info.digest.get("algorithm") != "crc32" or len(info.digest.get("blocks", ())) != _blocks(h.total, info.digest.get("block_size", _BLOCK)):
        raise _err(path, "corrupt metadata: fengine.data_digest does not describe the tensor data")
    if want == "train_state" and info.kind != "train_state":
        raise _err(path, f"a params-only fengine file (kind {info.kind!r}, e.g. from publish), not a training checkpoint; {_USE_LOAD_PARAMS}")
    if info.kind == "train_state":
        tensor_names = {e[0] for e in info.structure if e[1] == "tensor"}
        if tensor_names != set(h.table):
            raise _err(path, "corrupt metadata: fengine.structure does not list the file's tensors")
        if any(e[1] == "scalar" and e[0] not in info.scalars for e in info.structure):
            raise _err(path, "corrupt metadata: a scalar listed in fengine.structure has no value")
    return info


def _read_tensors(h: _Header, names: set[str], digest: dict | None, *, verify_all: bool = False) -> dict[str, torch.Tensor]:
    """Read the named tensors into fresh CPU tensors, checking every block they touch (all with ``verify_all``)."""
    block = digest["block_size"] if digest else _BLOCK
    dests: dict[str, torch.Tensor] = {}
    views: dict[str, memoryview | None] = {}
    for name in names:
        info = h.table[name]
        t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        dests[name] = t
        views[name] = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else None
    spans = [(h.table[n]["data_offsets"][0], h.table[n]["data_offsets"][1], n) for n in h.order]
    spans = [s for s in spans if s[1] > s[0]]
    starts = [s[0] for s in spans]
    nblocks = _blocks(h.total, block)
    local = threading.local()

    try:
        fd = os.open(h.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _err(h.path, f"cannot open: {e.strerror or e}") from None

    def block_task(b: int, pieces: list) -> Callable[[], tuple]:
        def task():
            crc = 0
            for begin, a, z, name in pieces:
                dest = views.get(name)
                if dest is not None:
                    buf = dest[a:z]
                else:  # bytes we do not keep: read them only to check the digest
                    scratch = getattr(local, "buf", None)
                    if scratch is None:
                        scratch = local.buf = memoryview(bytearray(block))
                    buf = scratch[: z - a]
                if _pread_into(fd, buf, h.data_start + begin + a) != len(buf):
                    return b, "short"
                if digest is not None:
                    crc = zlib.crc32(buf, crc)
            if digest is not None and f"{crc:08x}" != digest["blocks"][b]:
                return b, "crc"
            return b, None

        return task

    tasks = []
    for b in range(nblocks):
        lo, hi = b * block, min((b + 1) * block, h.total)
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        pieces, wanted = [], False
        while i < len(spans) and spans[i][0] < hi:
            begin, end, name = spans[i]
            if end > lo:
                pieces.append((begin, max(lo, begin) - begin, min(hi, end) - begin, name))
                wanted = wanted or name in names
            i += 1
        if wanted or verify_all:
            if digest is None:  # nothing to check: read only what is kept
                pieces = [p for p in pieces if p[3] in names]
            tasks.append(block_task(b, pieces))
    try:
        results = _run(tasks)
    finally:
        os.close(fd)
    short = [b for b, r in results if r == "short"]
    if short:
        raise _err(h.path, "truncated while reading (the file changed or shrank under us)")
    bad = sorted(b for b, r in results if r == "crc")
    if bad:
        hit = []
        for b in bad:
            lo, hi = b * block, min((b + 1) * block, h.total)
            hit += [n for s, e, n in spans if s < hi and e > lo and n not in hit]
        shown = ", ".join(hit[:10]) + (f" and {len(hit) - 10} more" if len(hit) > 10 else "")
        raise _err(
            h.path,
            f"corrupt tensor data: CRC-32 mismatch in {len(bad)} of {nblocks} blocks "
            f"(first at data bytes {bad[0] * block}-{min((bad[0] + 1) * block, h.total)}), in tensors {shown}",
        )
    return dests


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata (header digest verified; no tensor data read).

    Keys: ``format_version``, ``kind``, ``step``, ``epoch``, ``batch_in_epoch``,
    ``seed``, ``meta`` (what `save` was given), ``versions``, ``scalars``,
    ``structure``, ``tensors`` (name -> dtype and shape), ``file_size``.
    """
    path = Path(path)
    h = _read_header(path)
    info = _require_fengine(h)
    return {
        "format_version": int(h.metadata["fengine.format_version"]),
        "kind": info.kind,
        **info.position,
        "meta": info.meta,
        "versions": info.versions,
        "scalars": info.scalars,
        "structure": info.structure,
        "tensors": {n: {"dtype": h.table[n]["dtype"], "shape": list(h.table[n]["shape"])} for n in h.order},
        "file_size": h.size,
    }


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "a tensor"
    if _is_empty_dict(v):
        return "an empty dict"
    return f"a {type(v).__name__} ({v!r:.40})"


def _listing(title: str, items: list[str], cap: int = 50) -> str:
    shown = items[:cap]
    more = f"\n    ... and {len(items) - cap} more" if len(items) > cap else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


def _prefixes(name: str):
    """The proper ``/``-prefixes of a name: ``a/b/c`` -> ``a``, ``a/b``."""
    i = name.find("/")
    while i >= 0:
        yield name[:i]
        i = name.find("/", i + 1)


def _rebuild(entries: list, prefix_len: int, values: dict[str, Any]) -> Any:
    """Nested dicts (mapping keys) / lists (indices) from the file entries below an empty-dict leaf."""
    root: dict = {}
    for e in entries:
        comps = e[2][prefix_len:]
        node = root
        for kind, key in comps[:-1]:
            node = node.setdefault((kind, key), {})
        kind, key = comps[-1]
        node[(kind, key)] = {} if e[1] == "empty" else values[e[0]]

    def finish(node: Any) -> Any:
        if not isinstance(node, dict) or not node or not all(isinstance(k, tuple) for k in node):
            return node
        if all(k[0] == "i" for k in node) and sorted(k[1] for k in node) == list(range(len(node))):
            return [finish(node[("i", i)]) for i in range(len(node))]
        return {k[1]: finish(v) for k, v in node.items()}

    return finish(root)


def _adoptable(entries: list, prefix_len: int) -> bool:
    """Only plain nested dicts/lists may be taken from the file (not namedtuples: the template must know them)."""
    for e in entries:
        comps = e[2][prefix_len:]
        if not comps or any(kind not in ("k", "i") for kind, _ in comps):
            return False
    return True


def load(path: str | os.PathLike, like: TrainState) -> TrainState:
    """Read a checkpoint into a new state shaped like ``like`` (its treespec, devices and model).

    Every missing or unexpected name and every shape or dtype mismatch is
    reported in one `CheckpointMismatchError`; a damaged file raises
    `CheckpointError`; nothing is returned unless everything matched and every
    data digest checked out. ``like`` is not modified. Tensors go to the
    devices of ``like``'s tensors and keep their ``requires_grad``. An empty
    dict in ``like`` where the file has entries (the per-parameter state of a
    `fengine.optim.from_torch` optimizer, which torch fills lazily at the first
    step) takes the file's entries. Leaves that are one tensor object in
    ``like`` (tied) stay one object if their saved values are equal.
    """
    if not isinstance(like, TrainState):
        raise TypeError(f"load: like must be a TrainState (the template to load into), got {type(like).__name__}")
    path = Path(path)
    h = _read_header(path)
    info = _require_fengine(h, want="train_state")
    tmpl, spec = _flatten(like)
    file_entries = {e[0]: e for e in info.structure}
    below: dict[str, list] = {}  # file prefix -> file entries under it
    for name, e in file_entries.items():
        for pre in _prefixes(name):
            below.setdefault(pre, []).append(e)
    tmpl_prefixes = {pre for leaf in tmpl for pre in _prefixes(leaf.name)}

    missing, unexpected, shape_bad, dtype_bad, kind_bad = [], [], [], [], []
    used: set[str] = set()
    adopt: dict[str, list] = {}  # template empty-dict name -> the file entries below it
    for leaf in tmpl:
        v, e = leaf.value, file_entries.get(leaf.name)
        if _is_empty_dict(v) and leaf.name in below and _adoptable(below[leaf.name], len(leaf.path)):
            adopt[leaf.name] = below[leaf.name]
            used.update(f[0] for f in below[leaf.name])
            continue
        if e is None:
            if _is_empty_dict(v) and leaf.name in below:
                continue  # the file has other structure here: its entries are reported as unexpected
            missing.append(leaf.name + (" (empty dict)" if _is_empty_dict(v) else "" if isinstance(v, torch.Tensor) else " (non-tensor)"))
            continue
        used.add(leaf.name)
        file_kind = e[1]
        tmpl_kind = "tensor" if isinstance(v, torch.Tensor) else ("empty" if _is_empty_dict(v) else "scalar")
        if file_kind != tmpl_kind:
            desc = {"tensor": "a tensor", "empty": "an empty dict", "scalar": "a non-tensor value"}.get(file_kind, file_kind)
            kind_bad.append(f"{leaf.name}: {desc} in the file, {_describe(v)} in the template")
        elif file_kind == "tensor":
            fi = h.table[leaf.name]
            fshape, fdtype = list(fi["shape"]), _DTYPES[fi["dtype"]]
            if fshape != list(v.shape):
                shape_bad.append((leaf.name, fshape, list(v.shape)))
            if fdtype != v.dtype:
                dtype_bad.append((leaf.name, str(fdtype), str(v.dtype)))
    for name, e in file_entries.items():
        if name in used or (e[1] == "empty" and name in tmpl_prefixes):
            continue  # (an empty dict in the file where the template has entries: those are reported missing)
        unexpected.append(name + {"tensor": "", "scalar": " (non-tensor)", "empty": " (empty dict)"}.get(e[1], ""))

    if missing or unexpected or shape_bad or dtype_bad or kind_bad:
        parts = [f"{path}: the checkpoint (step {info.position.get('step')}) does not match the template state:"]
        if missing:
            parts.append(_listing("missing in the file", missing))
        if unexpected:
            parts.append(_listing("unexpected in the file", unexpected))
        if shape_bad:
            parts.append(_listing("shape mismatch (file vs template)", [f"{n}: {a} vs {b}" for n, a, b in shape_bad]))
        if dtype_bad:
            parts.append(_listing("dtype mismatch (file vs template)", [f"{n}: {a} vs {b}" for n, a, b in dtype_bad]))
        if kind_bad:
            parts.append(_listing("tensor / non-tensor mismatch", kind_bad))
        if any(u.startswith("extra/") for u in unexpected) and not like.extra:
            parts.append(
                "  hint: the file has step-transform state (amp, ema, ...) and the template has none; "
                "build the template with step.init_state(TrainState.create(...))"
            )
        raise CheckpointMismatchError(
            "\n".join(parts), missing=missing, unexpected=unexpected, shape=shape_bad, dtype=dtype_bad, kind=kind_bad,
        )

    tensors = _read_tensors(h, set(h.table), info.digest, verify_all=True)

    # adopted tensors: CPU if saved from CPU (torch keeps Adam's `step` there), else the template's accelerator
    accel = next(
        (leaf.value.device for leaf in tmpl if isinstance(leaf.value, torch.Tensor) and leaf.value.device.type not in ("cpu", "meta")),
        torch.device("cpu"),
    )

    def place(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "meta":
            device = torch.device("cpu")
        return t if t.device == device else t.to(device)

    values: dict[str, Any] = dict(info.scalars)
    for entries in adopt.values():
        for e in entries:
            if e[1] == "tensor":
                saved = e[3] if len(e) > 3 else "cpu"
                values[e[0]] = place(tensors[e[0]], torch.device("cpu") if saved == "cpu" else accel)
    out: list[Any] = []
    first_of: dict[int, torch.Tensor] = {}
    for leaf in tmpl:
        v = leaf.value
        if leaf.name in adopt:
            out.append(_rebuild(adopt[leaf.name], len(leaf.path), values))
        elif isinstance(v, torch.Tensor):
            t = tensors[leaf.name]
            shared = first_of.get(id(v))
            if shared is not None and torch.equal(shared.detach().cpu(), t):
                out.append(shared)  # one object in the template: keep it one object
                continue
            t = place(t, v.device)
            if v.requires_grad:
                t.requires_grad_(True)
            first_of.setdefault(id(v), t)
            out.append(t)
        elif _is_empty_dict(v):
            out.append({})
        else:
            out.append(info.scalars[leaf.name])
    return pytree.tree_unflatten(out, spec)


def _usable(path: Path, verify: bool) -> str | None:
    """None if ``path`` is a loadable training checkpoint, else why not."""
    try:
        h = _read_header(path)
        info = _require_fengine(h, want="train_state")
        if verify:
            _read_tensors(h, set(), info.digest, verify_all=True)
    except CheckpointError as e:
        return str(e)
    return None


def latest(work_dir: str | os.PathLike, *, verify: bool = True) -> Path | None:
    """The checkpoint ``work_dir/last_checkpoint`` names, or None when there is no pointer.

    If the named file is missing or unreadable (checked fully, data digests
    included, unless ``verify=False``), warns and falls back to the newest
    readable training checkpoint (``*.safetensors``, by modification time) in
    ``work_dir``; raises `CheckpointError` if there is none.
    """
    work_dir = Path(work_dir)
    pointer = work_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        text, problem = "", f"{pointer}: unreadable ({e})"
    else:
        problem = f"{pointer} is empty" if not text else None
    target = None
    if text:
        target = Path(text)
        if not target.is_absolute():
            target = work_dir / target
        problem = _usable(target, verify)
        if problem is None:
            return target
    candidates = []
    for p in work_dir.glob("*" + _SUFFIX):
        if p.name.startswith(".") or (target is not None and p == target):
            continue
        try:
            candidates.append((p.stat().st_mtime_ns, p.name, p))
        except OSError:
            continue
    for _, _, p in sorted(candidates, reverse=True):
        if _usable(p, verify) is None:
            warnings.warn(
                f"last_checkpoint names an unusable checkpoint ({problem}); falling back to {p}, "
                f"the newest readable checkpoint in {work_dir}",
                stacklevel=2,
            )
            return p
    raise CheckpointError(f"{problem}; and no other readable checkpoint is in {work_dir}")


# ======================================================================= params only
@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_params` did, by name (target names, after ``prefix_map``)."""

    source: Path
    format: str  # "fengine" (training checkpoint), "fengine-params" (publish), "safetensors", "torch"
    loaded: tuple[str, ...]
    missing: tuple[str, ...]  # in the target, not in the file
    unexpected: tuple[str, ...]  # in the file (after mapping), not in the target
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, file shape, target shape)
    skipped: tuple[str, ...] = ()  # file names outside every prefix_map prefix (not loaded, not an error)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"load_params from {self.source} ({self.format}): {len(self.loaded)} loaded"]
        if self.missing:
            lines.append(_listing("missing in the file", list(self.missing)))
        if self.unexpected:
            lines.append(_listing("unexpected in the file", list(self.unexpected)))
        if self.mismatched:
            lines.append(_listing("shape mismatch (file vs target)", [f"{n}: {list(a)} vs {list(b)}" for n, a, b in self.mismatched]))
        if self.skipped:
            lines.append(f"  skipped by prefix_map: {len(self.skipped)}")
        return "\n".join(lines)


def _strip_module(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _head_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the caller
        raise _err(path, f"cannot read as a torch checkpoint with torch.load(weights_only=True): {e}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise _err(path, f"holds a {type(obj).__name__}, not a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_params(
    path: str | os.PathLike,
    into: TrainState | nn.Module,
    *,
    prefix_map: Mapping[str, str] | None = None,
    strict: bool = False,
    use_ema: bool = False,
) -> tuple[TrainState | dict[str, torch.Tensor], LoadReport]:
    """Load weights (params and buffers) only: MMEngine's ``load_from`` / ``Pretrained`` init.

    ``path`` may be a fengine checkpoint (its ``params/`` and ``buffers/``, or
    with ``use_ema`` its EMA weights), a published params file, a plain
    safetensors state dict, or a torch ``.pth`` state dict (read with
    ``weights_only=True``; a ``{'state_dict': ...}`` wrapper is unwrapped).
    A leading ``module.`` (DataParallel) is stripped from every name.

    ``prefix_map`` renames by prefix, longest first: ``{'backbone.': ''}`` loads
    ``backbone.*`` into the target's top level; file names matching no prefix
    are skipped. Values are cast to the target's dtype and device. Returns
    ``(new_state, report)`` for a `TrainState` (other fields shared with
    ``into``), or ``(state_dict, report)`` for an ``nn.Module``: the module's
    full state dict with the loaded values in place, for
    ``module.load_state_dict``; the module itself is not modified.
    ``strict=True`` raises `CheckpointMismatchError` listing every missing,
    unexpected and shape-mismatched name.
    """
    path = Path(path)
    if isinstance(into, TrainState):
        targets = {**into.params, **into.buffers}
    elif isinstance(into, nn.Module):
        targets = dict(into.state_dict())
    else:
        raise TypeError(f"load_params: into must be a TrainState or an nn.Module, got {type(into).__name__}")

    h: _Header | None = None
    digest = None
    torch_sd: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}  # name the target sees (before prefix_map) -> key in the file
    if path.is_file() and _foreign(_head_bytes(path)):
        fmt = "torch"
        torch_sd = _torch_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in torch_sd.items()}
        for k in torch_sd:
            sources.setdefault(_strip_module(k), k)
    else:
        h = _read_header(path)
        shapes = {n: tuple(h.table[n]["shape"]) for n in h.order}
        if h.metadata.get("fengine.format") == _FORMAT:
            info = _require_fengine(h)
            digest = info.digest
            if info.kind == "train_state":
                fmt = "fengine"
                groups: dict[tuple, dict[str, str]] = {}
                for e in info.structure:
                    comps = e[2]
                    if e[1] == "tensor" and comps[-1][0] == "k":
                        groups.setdefault(tuple(c[1] for c in comps[:-1]), {})[str(comps[-1][1])] = e[0]
                if use_ema:
                    ema = groups.get(("extra", "ema", "params"))
                    if not ema:
                        raise _err(path, "has no EMA weights (extra/ema/params); train with fengine.ema(...) or pass use_ema=False")
                    sources = {**ema, **groups.get(("buffers",), {}), **groups.get(("extra", "ema", "buffers"), {})}
                else:
                    sources = {**groups.get(("params",), {}), **groups.get(("buffers",), {})}
            else:
                fmt = "fengine-params"
        else:
            fmt = "safetensors"
        if fmt != "fengine":
            for n in h.order:
                sources.setdefault(_strip_module(n), n)

    # rename and match
    mapped: dict[str, str] = {}  # target name -> file key
    skipped = []
    for name, key in sources.items():
        if prefix_map:
            best = max((p for p in prefix_map if name.startswith(p)), key=len, default=None)
            if best is None:
                skipped.append(name)
                continue
            name = prefix_map[best] + name[len(best):]
        if name in mapped:
            raise CheckpointError(f"{path}: prefix_map maps both {mapped[name]!r} and {key!r} to {name!r}")
        mapped[name] = key
    loaded, mismatched, unexpected = [], [], []
    for name, key in mapped.items():
        if name not in targets:
            unexpected.append(name)
        elif shapes[key] != tuple(targets[name].shape):
            mismatched.append((name, shapes[key], tuple(targets[name].shape)))
        else:
            loaded.append(name)
    missing = [n for n in targets if n not in mapped]
    report = LoadReport(path, fmt, tuple(loaded), tuple(missing), tuple(unexpected), tuple(mismatched), tuple(skipped))
    if strict and not report.ok:
        raise CheckpointMismatchError(
            f"load_params(strict=True): {report}", missing=missing, unexpected=unexpected,
            shape=[(n, list(a), list(b)) for n, a, b in mismatched],
        )

    # fresh tensors from safetensors; torch.load's may share storage (tied weights), so copy those
    data = _read_tensors(h, {mapped[n] for n in loaded}, digest) if h is not None else torch_sd
    new: dict[str, torch.Tensor] = {}
    for name in loaded:
        src, tgt = data[mapped[name]], targets[name]
        t = src.to(device=tgt.device if tgt.device.type != "meta" else "cpu", dtype=tgt.dtype, copy=h is None)
        if tgt.requires_grad:
            t = t.detach().requires_grad_(True)
        new[name] = t
    if isinstance(into, TrainState):
        params = {n: new.get(n, v) for n, v in into.params.items()}
        buffers = {n: new.get(n, v) for n, v in into.buffers.items()}
        return into.replace(params=params, buffers=buffers), report
    return {n: new.get(n, v) for n, v in targets.items()}, report


def publish(
    state: TrainState,
    path_stem: str | os.PathLike,
    *,
    use_ema: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write params and buffers only to ``{stem}-{sha256[:8]}.safetensors``; returns that path.

    MMEngine's published checkpoint: no optimizer state, the name carries the
    first 8 hex digits of the file's SHA-256. Names are plain state-dict names
    (``fc1.weight``), so ``safetensors.torch.load_file`` gives a dict for
    ``module.load_state_dict``; `load_params` reads it too. ``use_ema`` publishes
    the EMA weights of `fengine.ema`.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"publish: expected a TrainState, got {type(state).__name__}")
    position = _position(state)
    params, buffers = state.params, state.buffers
    if use_ema:
        e = state.extra.get("ema")
        if e is None:
            raise ValueError("publish(use_ema=True): the state has no EMA (extra['ema']); train with fengine.ema(...)")
        params = e.params
        buffers = {**buffers, **e.buffers}
    named = list({**params, **buffers}.items())
    metadata = {
        "fengine.format": _FORMAT,
        "fengine.format_version": str(FORMAT_VERSION),
        "fengine.kind": "params",
        "fengine.position": json.dumps(position),
        "fengine.meta": _dump_meta(meta),
        "fengine.versions": _versions(),
    }
    stem = Path(path_stem)
    if stem.name.endswith(_SUFFIX):
        stem = stem.with_name(stem.name[: -len(_SUFFIX)])
    return _write_file(
        stem.with_name(stem.name + _SUFFIX), named, metadata, sha256=True,
        final=lambda sha: stem.with_name(f"{stem.name}-{sha[:8]}{_SUFFIX}"),
    )
