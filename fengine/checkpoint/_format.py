"""The file format: constants, errors, the safetensors header with fengine's metadata, and its validation."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fengine.checkpoint._io import NotRegularFile, open_regular


if TYPE_CHECKING:
    from fengine.state import TrainState


FORMAT_VERSION = 1
FORMAT = "fengine.checkpoint"
BLOCK = 16 << 20  # bytes of tensor data per CRC-32 block
SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U64", "uint64"),
        ("U32", "uint32"),
        ("U16", "uint16"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("C64", "complex64"),
    )
    if hasattr(torch, attr)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

USE_LOAD_PARAMS = "to load its weights use fengine.checkpoint.load_params(path, into)"


# ======================================================================= errors
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


def err(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def listing(title: str, items: list[str], cap: int = 50) -> str:
    """An indented list for an error message or report, at most ``cap`` lines."""
    more = f"\n    ... and {len(items) - cap} more" if len(items) > cap else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in items[:cap]) + more


# ======================================================================= writing the header
def n_blocks(total: int, block: int) -> int:
    return math.ceil(total / block) if total else 0


def encode_header(table: dict, metadata: dict[str, str]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded so the data starts 8-byte aligned."""
    raw = json.dumps(
        {"__metadata__": metadata, **table}, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def header_digest(table: Mapping, metadata: Mapping[str, str]) -> str:
    """SHA-256 of the tensor table and all metadata but the digest itself, in a canonical JSON form."""
    canon = {
        "tensors": table,
        "metadata": {k: v for k, v in metadata.items() if k != "fengine.header_digest"},
    }
    return hashlib.sha256(
        json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()


def position(state: TrainState) -> dict[str, int]:
    """``fengine.position``; raises `DonatedStateError` for a consumed state."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "seed": state.seed,
    }


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
        raise TypeError(
            f"save: meta must be JSON-serialisable (str/int/float/bool/None/list/dict, dataclasses, paths): {e}"
        ) from None


def metadata(
    kind: str, pos: dict[str, int], meta: Mapping[str, Any] | None, **fields: str
) -> dict[str, str]:
    """fengine's safetensors metadata, without the digests (`write_file` adds those); ``fields`` become ``fengine.<name>``."""
    fe = sys.modules.get("fengine")
    versions = {
        "fengine": getattr(fe, "__version__", "unknown"),
        "torch": torch.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    return {
        "fengine.format": FORMAT,
        "fengine.format_version": str(FORMAT_VERSION),
        "fengine.kind": kind,
        "fengine.position": json.dumps(pos),
        **{f"fengine.{k}": v for k, v in fields.items()},
        "fengine.meta": _dump_meta(meta),
        "fengine.versions": json.dumps(versions),
    }


# ======================================================================= reading the header
@dataclasses.dataclass
class Header:
    path: Path
    size: int
    data_start: int
    table: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]
    order: list[str]  # names sorted by offset
    total: int  # bytes of tensor data
    identity: tuple[int, ...]  # (device, inode, size, mtime) when the header was read


def identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open_checkpoint(path: Path) -> tuple[int, os.stat_result]:
    """`open_regular`, with every refusal a `CheckpointError` naming ``path``."""
    try:
        return open_regular(path)
    except NotRegularFile as e:
        hint = (
            " (fengine.checkpoint.latest(work_dir) finds the newest checkpoint in one)"
            if e.kind == "a directory"
            else ""
        )
        raise err(path, f"is {e.kind}, not a checkpoint file{hint}") from None
    except FileNotFoundError:
        raise err(path, "no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise err(path, f"cannot open: {getattr(e, 'strerror', None) or e}") from None


def foreign(first: bytes) -> str | None:
    """What a file that is not safetensors looks like, from its first bytes."""
    if first[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's .pth format)"
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (a legacy torch .pth file?)"
    return None


def read_header(path: Path) -> Header:
    """Read and check a safetensors header: valid JSON, known dtypes, tensors tiling the data exactly."""
    fd, st = open_checkpoint(path)
    with os.fdopen(fd, "rb") as f:
        size = st.st_size
        first = f.read(8)
        n = int.from_bytes(first, "little") if len(first) == 8 else -1
        raw = f.read(n) if 0 <= n <= min(size - 8, _MAX_HEADER) else b""
    if not raw.startswith(b"{"):
        kind = foreign(first)
        if kind:
            raise err(path, f"is {kind}, not a fengine checkpoint; {USE_LOAD_PARAMS}")
        if size < 8:
            raise err(
                path,
                f"truncated: {size} bytes, less than a safetensors header"
                if size
                else "is empty (truncated)",
            )
        if n > size - 8:
            raise err(
                path,
                f"truncated or corrupt: the header length field says {n} bytes but the file has {size} (not a complete safetensors file)",
            )
        if n > _MAX_HEADER:
            raise err(path, f"corrupt: header length {n} exceeds the safetensors limit")
        raise err(path, "not a safetensors file (no JSON header), or its header is corrupt")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise err(path, f"corrupt header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise err(path, "corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise err(path, "corrupt header (__metadata__ is not a string-to-string map)")
    spans = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = info["shape"]
            begin, end = info["data_offsets"]
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise err(
                path, f"corrupt header: bad entry for tensor {name!r}: {info!r:.200}"
            ) from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise err(
                path,
                f"corrupt header: tensor {name!r} has {end - begin} bytes for shape {shape} of {info['dtype']}",
            )
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            raise err(
                path,
                f"corrupt header: tensor {name!r} starts at byte {begin} of the data, expected {expected}",
            )
        expected = end
    data_start = 8 + n
    have = size - data_start
    if have < expected:
        raise err(
            path,
            f"truncated: the header describes {expected} bytes of tensor data, the file has {have}",
        )
    if have > expected:
        raise err(path, f"corrupt: {have - expected} unexpected bytes after the tensor data")
    return Header(
        path, size, data_start, header, meta, [s[2] for s in spans], expected, identity(st)
    )


@dataclasses.dataclass
class Info:
    """fengine's metadata, parsed."""

    version: int
    kind: str  # "train_state" or "params"
    position: dict[str, int]
    structure: list  # [name, kind, path, (device)] per leaf; kind is "tensor" / "scalar" / "empty"
    scalars: dict[str, Any]
    meta: dict[str, Any]
    versions: dict[str, str]
    digest: dict[str, Any]  # {"algorithm": "crc32", "block_size", "blocks": [hex, ...]}


def require_fengine(h: Header, want: str | None = None) -> Info:
    """Parse and verify fengine's metadata (header digest included); ``want`` a kind, or any."""
    md, path = h.metadata, h.path
    if md.get("fengine.format") != FORMAT:
        if any(k.startswith("fengine.") for k in md):
            raise err(
                path,
                f"corrupt header: fengine.format must be {FORMAT!r}, got {md.get('fengine.format')!r:.80} "
                "(the file has fengine metadata, so its format marker is damaged)",
            )
        raise err(
            path,
            f"a safetensors file without fengine metadata, so not a fengine checkpoint; {USE_LOAD_PARAMS}",
        )
    if md.get("fengine.header_digest") != header_digest(h.table, md):
        raise err(
            path,
            "corrupt header: its SHA-256 digest does not match (tensor table or metadata altered)",
        )
    try:
        version = int(md["fengine.format_version"])
    except (KeyError, ValueError):
        raise err(path, "corrupt header: no valid fengine.format_version") from None
    if version > FORMAT_VERSION:
        raise err(
            path,
            f"written in checkpoint format {version} by a newer fengine; this one reads up to {FORMAT_VERSION}",
        )
    try:
        fields = {
            name: json.loads(md.get(f"fengine.{name}", empty))
            for name, empty in (
                ("position", "{}"),
                ("structure", "[]"),
                ("scalars", "{}"),
                ("meta", "{}"),
                ("versions", "{}"),
            )
        }
        digest = json.loads(md["fengine.data_digest"]) if "fengine.data_digest" in md else None
    except json.JSONDecodeError as e:
        raise err(path, f"corrupt metadata ({e})") from None
    if (
        digest is None
        or digest.get("algorithm") != "crc32"
        or len(digest.get("blocks", ())) != n_blocks(h.total, digest.get("block_size", BLOCK))
    ):
        raise err(path, "corrupt metadata: fengine.data_digest does not describe the tensor data")
    info = Info(version=version, kind=md.get("fengine.kind", ""), digest=digest, **fields)
    if want == "train_state" and info.kind != "train_state":
        raise err(
            path,
            f"a params-only fengine file (kind {info.kind!r}, e.g. from publish), not a training checkpoint; {USE_LOAD_PARAMS}",
        )
    if info.kind == "train_state":
        if {e[0] for e in info.structure if e[1] == "tensor"} != set(h.table):
            raise err(path, "corrupt metadata: fengine.structure does not list the file's tensors")
        if any(e[1] == "scalar" and e[0] not in info.scalars for e in info.structure):
            raise err(path, "corrupt metadata: a scalar listed in fengine.structure has no value")
    return info
