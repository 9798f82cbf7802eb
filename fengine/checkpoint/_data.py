"""Tensor data: laid out after the header and checked in CRC-32 blocks, written and read on a few threads.

Each 16 MiB block is moved and checksummed in 1 MiB pieces (`_CHUNK`), the CRC of a piece
taken right next to its ``pwrite`` / ``pread``, while the bytes are still in the CPU cache:
the data crosses memory once per direction instead of twice. The CRC-32 is zlib's, or, when
the optional ``isal`` package is installed (``pip install fengine[fast]``), ISA-L's
(same polynomial, same values, ~4x faster here): files are identical either way.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import errno
import functools
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# Every write goes through fengine.checkpoint._pwrite_all / _preallocate, looked up at call time,
# so that tests can patch them there (a full disk).
from fengine import checkpoint as seams
from fengine.checkpoint._format import (
    BLOCK,
    DTYPE_NAMES,
    DTYPES,
    Header,
    encode_header,
    err,
    header_digest,
    identity,
    n_blocks,
    open_checkpoint,
)
from fengine.checkpoint._io import PAGE, atomic_write, pread_into, run, set_direct, start_writeback
from fengine.sharding import is_dtensor


# The CRC-32 of every block digest (read at call time, so tests can swap it).
crc32: Callable[[Any, int], int] = zlib.crc32
try:  # ISA-L's CRC-32: the same function as zlib.crc32, hardware-accelerated (PCLMULQDQ)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is optional
    pass

_CHUNK = 1 << 20  # bytes moved and checksummed together, small enough to stay in the CPU cache


def _chunks(a: int, z: int) -> Iterator[tuple[int, int]]:
    return ((i, min(i + _CHUNK, z)) for i in range(a, z, _CHUNK))


def _pieces(
    spans: list[tuple[int, int, Any]], starts: list[int], lo: int, hi: int
) -> Iterator[tuple[int, int, int, Any]]:
    """``(begin, a, z, item)`` for each span with bytes in [lo, hi); ``a:z`` are those bytes, counted from ``begin``.

    ``spans`` are non-empty ``(begin, end, item)`` sorted by begin; ``starts`` their begins.
    """
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(spans) and spans[i][0] < hi:
        begin, end, item = spans[i]
        if end > lo:
            yield begin, max(lo, begin) - begin, min(hi, end) - begin, item
        i += 1


# ======================================================================= writing
@dataclasses.dataclass
class _Source:
    name: str
    dtype: str
    shape: list[int]
    data: memoryview | None  # the raw bytes (None when empty)
    nbytes: int
    address: int  # of the raw bytes in memory


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (sharing its memory)."""
    # an ndarray is a buffer, but numpy's stubs declare __buffer__ only for Python >= 3.12
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _source(name: str, t: torch.Tensor) -> _Source:
    if is_dtensor(t):
        raise TypeError(
            f"checkpoint: {name} is sharded across processes (a DTensor); gather it first, on every "
            "rank: full = fengine.sharding.gather_state(state), then save full on rank 0 (fit does this)"
        )
    if t.layout != torch.strided:
        raise TypeError(
            f"checkpoint: {name} is a {t.layout} tensor; only dense (strided) tensors can be saved"
        )
    if t.is_quantized:
        raise TypeError(f"checkpoint: {name} is a quantized tensor, which safetensors cannot store")
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"checkpoint: {name} has dtype {t.dtype}, which safetensors cannot store")
    if t.device.type == "meta":
        raise TypeError(f"checkpoint: {name} is on the meta device (it has no data)")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()  # shared storage / views / transposes are fine
    nbytes = t.numel() * t.element_size()
    data = _bytes_of(t) if nbytes else None
    return _Source(name, DTYPE_NAMES[t.dtype], list(t.shape), data, nbytes, t.data_ptr())


def _one_region(sources: list[_Source], total: int) -> memoryview | None:
    """The tensors' bytes as one memoryview when they lie back to back in memory in file order from a
    page boundary (an async save's snapshot, `Snapshots`), else None."""
    with_data = [s for s in sources if s.nbytes]
    if total < PAGE or with_data[0].address % PAGE:
        return None
    end = with_data[0].address
    for s in with_data:
        if s.address != end:
            return None
        end += s.nbytes
    return memoryview((ctypes.c_char * total).from_address(with_data[0].address)).cast("B")


def _data_digest(blocks: list[str]) -> str:
    return json.dumps(
        {"algorithm": "crc32", "block_size": BLOCK, "blocks": blocks}, separators=(",", ":")
    )


def write_file(
    path: Path,
    named: list[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    fsync: bool = True,
    name_by_sha256: Callable[[str], Path] | None = None,
) -> Path:
    """Write the tensors as a safetensors file with ``metadata`` and both digests, atomically; returns its path.

    ``name_by_sha256(hex SHA-256 of the whole file)`` chooses the final name (`publish`).
    """
    sources = [_source(n, t) for n, t in named]
    sources.sort(
        key=lambda s: -DTYPES[s.dtype].itemsize
    )  # (stable) keeps every tensor aligned to its element size
    table: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, memoryview]] = []
    total = 0
    for s in sources:
        table[s.name] = {
            "dtype": s.dtype,
            "shape": s.shape,
            "data_offsets": [total, total + s.nbytes],
        }
        if s.data is not None:  # None exactly when the tensor has no bytes
            spans.append((total, total + s.nbytes, s.data))
        total += s.nbytes
    starts = [begin for begin, _, _ in spans]
    nblocks = n_blocks(total, BLOCK)
    metadata = dict(metadata)
    # fixed-width placeholders: the header has its final length before the digests are known
    metadata["fengine.data_digest"] = _data_digest(["0" * 8] * nblocks)
    metadata["fengine.header_digest"] = "0" * 64
    # one region in memory (a snapshot) goes to the disk by direct I/O: the data starts on a page
    region = _one_region(sources, total) if fsync else None
    head_len = len(encode_header(table, metadata, PAGE if region is not None else 8))

    checksum = crc32  # read at call time: a test may swap it

    def write_block(fd: int, b: int) -> str:
        crc = 0
        for begin, a, z, data in _pieces(spans, starts, b * BLOCK, min((b + 1) * BLOCK, total)):
            for i, j in _chunks(a, z):
                piece = data[i:j]
                crc = checksum(piece, crc)  # first: pwrite then copies it from the cache
                offset = head_len + begin + i
                seams._pwrite_all(fd, piece, offset)
                if fsync:  # to the disk while the rest is written: the fsync waits less
                    start_writeback(fd, offset, j - i)
        return f"{crc:08x}"

    def write(fd: int) -> str | None:
        seams._preallocate(fd, head_len + total)
        blocks = None if region is None else _write_direct(fd, region, head_len, nblocks, checksum)
        if blocks is None:  # scattered tensors, or no direct I/O here: through the page cache
            blocks = run([functools.partial(write_block, fd, b) for b in range(nblocks)])
        metadata["fengine.data_digest"] = _data_digest(blocks)
        metadata["fengine.header_digest"] = header_digest(table, metadata)
        head = encode_header(table, metadata, PAGE if region is not None else 8)
        if len(head) != head_len:  # pragma: no cover - guarded by the fixed-width placeholders
            raise RuntimeError("checkpoint header changed length")
        seams._pwrite_all(fd, memoryview(head), 0)
        if name_by_sha256 is None:
            return None
        sha = hashlib.sha256(head)
        for _, _, data in spans:
            sha.update(data)
        return sha.hexdigest()

    return atomic_write(path, write, name_by_sha256, fsync=fsync)


def _write_direct(
    fd: int, region: memoryview, head_len: int, nblocks: int, checksum: Callable[[Any, int], int]
) -> list[str] | None:
    """Write ``region`` at ``head_len`` (a page multiple): each block CRC'd and its whole pages sent
    with direct I/O, no page-cache copy (a background save's writer then takes little CPU from
    the training threads), the last partial page through the page cache. Returns the block CRCs,
    or None when the file system has no direct I/O or refuses its writes (the caller then
    writes everything through the page cache)."""
    if not set_direct(fd, True):
        return None
    whole = len(region) - len(region) % PAGE

    def block(b: int) -> str:
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, len(region))
        crc = checksum(region[lo:hi], 0)
        if min(hi, whole) > lo:
            seams._pwrite_all(fd, region[lo : min(hi, whole)], head_len + lo)
        return f"{crc:08x}"

    try:
        blocks = run([functools.partial(block, b) for b in range(nblocks)])
    except OSError as e:  # a file system that takes the flag but not the writes
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return None
    finally:
        set_direct(fd, False)
    seams._pwrite_all(fd, region[whole:], head_len + whole)
    return blocks


# ======================================================================= reading
def read_tensors(
    h: Header,
    names: set[str],
    digest: dict | None,
    *,
    verify_all: bool = False,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the named tensors into fresh CPU tensors, checking every block they touch (every block with ``verify_all``).

    ``digest`` is None for a plain safetensors file: nothing to check. ``into``: existing
    tensors to read some names into instead (CPU, contiguous, owning their memory, of the
    file's shape and dtype: `load(..., into=True)`); returned as they are.
    """
    block = digest["block_size"] if digest else BLOCK
    dests: dict[str, torch.Tensor] = {}
    views: dict[str, memoryview] = {}
    for name in names:
        info = h.table[name]
        given = None if into is None else into.get(name)
        t = dests[name] = (
            given if given is not None else torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        )
        if t.numel():
            views[name] = _bytes_of(t.detach())
    spans = [(*h.table[n]["data_offsets"], n) for n in h.order]
    spans = [s for s in spans if s[1] > s[0]]
    starts = [s[0] for s in spans]
    nblocks = n_blocks(h.total, block)
    local = threading.local()  # each thread's scratch buffer for bytes read only to be checked
    checksum = crc32  # read at call time: a test may swap it

    fd, st = open_checkpoint(h.path)
    if identity(st) != h.identity:
        os.close(fd)
        raise err(h.path, "changed since its header was read (replaced or rewritten meanwhile)")

    def read_block(b: int, pieces: list) -> str | None:
        """None, or what went wrong: "short" (the file shrank) or "crc"."""
        crc = 0
        for begin, a, z, name in pieces:
            for i, j in _chunks(a, z):
                if name in views:
                    buf = views[name][i:j]
                else:
                    if getattr(local, "buf", None) is None:
                        local.buf = memoryview(bytearray(_CHUNK))
                    buf = local.buf[: j - i]
                if pread_into(fd, buf, h.data_start + begin + i) != len(buf):
                    return "short"
                if digest is not None:
                    crc = checksum(buf, crc)  # right after the read: the bytes are still cached
        if digest is not None and f"{crc:08x}" != digest["blocks"][b]:
            return "crc"
        return None

    todo = []
    for b in range(nblocks):
        pieces = list(_pieces(spans, starts, b * block, min((b + 1) * block, h.total)))
        if verify_all or any(p[3] in names for p in pieces):
            if digest is None:  # nothing to check: read only what is kept
                pieces = [p for p in pieces if p[3] in names]
            todo.append((b, pieces))
    try:
        results = run([functools.partial(read_block, b, pieces) for b, pieces in todo])
    finally:
        os.close(fd)
    if "short" in results:
        raise err(h.path, "truncated while reading (the file changed or shrank under us)")
    bad = [b for (b, _), r in zip(todo, results) if r == "crc"]
    if bad:
        hit = []
        for b in bad:
            lo, hi = b * block, min((b + 1) * block, h.total)
            hit += [n for s, e, n in spans if s < hi and e > lo and n not in hit]
        shown = ", ".join(hit[:10]) + (f" and {len(hit) - 10} more" if len(hit) > 10 else "")
        raise err(
            h.path,
            f"corrupt tensor data: CRC-32 mismatch in {len(bad)} of {nblocks} blocks "
            f"(first at data bytes {bad[0] * block}-{min((bad[0] + 1) * block, h.total)}), in tensors {shown}",
        )
    return dests
