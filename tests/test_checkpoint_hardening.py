"""fengine.checkpoint trusts nothing in a file: non-regular files, crafted and damaged headers, an
untrusted last_checkpoint pointer, loading nothing, stale temp files of killed saves."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as st
import torch
from test_checkpoint import assert_same, batches, build, train
from torch import nn

from fengine import checkpoint as ckpt
from fengine.checkpoint import CheckpointError, CheckpointMismatchError, _data, _format


META = {"config": {"lr": 0.001}, "handlers": {"Checkpointer": {"best": 0.5}}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real checkpoint (amp fp16 + loss scaler + EMA + BatchNorm: every leaf kind, eval weights)."""
    step, template = build("amp_fp16_scaler_ema")
    state = train(step, template(), batches(2))
    path = ckpt.save(tmp_path_factory.mktemp("base") / "ck.safetensors", state, META)
    return state, template, path.read_bytes()


# ----------------------------------------------------------------- helpers
def _attempt(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except CheckpointMismatchError as e:
        return "CheckpointMismatchError", e
    except CheckpointError as e:
        return "CheckpointError", e
    except Exception as e:  # noqa: BLE001 - what this test is looking for
        return f"RAW {type(e).__name__}", e


# ----------------------------------------------------------------- non-regular files
def _within(seconds: float, fn: Callable[[], Any], fifo: Path | None = None) -> tuple[str, Any]:
    """``fn()``'s outcome, failing the test if it has not returned after ``seconds`` (a FIFO open that waits)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(_attempt(fn)), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive() and fifo is not None:  # release the reader, so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not t.is_alive() and box, f"hung for {seconds}s"
    return box[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_directory_device_socket_are_clear_errors_and_never_hang(base, tmp_path):
    state, template, data = base
    like = template()
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, kind in (
            (fifo, "a FIFO"),
            (tmp_path, "a directory"),
            (Path(os.devnull), "a character device"),
            (sock_path, "a socket"),
        ):
            for fn in (
                partial(ckpt.load, path, like),
                partial(ckpt.read_meta, path),
                partial(ckpt.load_params, path, like),
            ):
                tag, e = _within(10, fn, fifo)
                assert tag == "CheckpointError", (path, tag, e)
                assert str(path) in str(e) and f"is {kind}" in str(e), str(e)
    finally:
        sock.close()


def test_a_file_replaced_between_header_and_data_is_refused(base, tmp_path):
    state, template, data = base
    path = tmp_path / "ck.safetensors"
    path.write_bytes(data)
    h = _format.read_header(path)
    info = _format.require_fengine(h)
    ckpt.save(path, state.replace(step=3))  # a concurrent save renames a new file over it
    with pytest.raises(CheckpointError, match="changed since its header was read"):
        _data.read_tensors(h, set(h.table), info.digest)


def test_a_symlink_to_a_checkpoint_reads(base, tmp_path):
    state, template, data = base
    (tmp_path / "real.safetensors").write_bytes(data)
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "real.safetensors")
    assert_same(ckpt.load(link, template()), state)


# ----------------------------------------------------------------- crafting files
def split(data: bytes) -> tuple[dict, dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    table = json.loads(data[8 : 8 + n])
    md = table.pop("__metadata__")
    return table, md, data[8 + n :]


def attacker_digest(table: Any, md: dict) -> str:
    """The header digest, recomputed as anyone can (SHA-256 of the canonical JSON)."""
    canon = {
        "tensors": table,
        "metadata": {k: v for k, v in md.items() if k != "fengine.header_digest"},
    }
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def frame(raw: bytes, payload: bytes) -> bytes:
    """Length field + JSON padded to 8 bytes + tensor data: a safetensors file."""
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + payload


def assemble(table: dict, md: dict, payload: bytes, *, digest: bool = True) -> bytes:
    md = dict(md)
    if digest:
        md["fengine.header_digest"] = attacker_digest(table, md)
    raw = json.dumps({"__metadata__": md, **table}, separators=(",", ":")).encode()
    return frame(raw, payload)


@dataclass
class Case:
    name: str
    data: bytes
    expect: str  # "bad": every call raises; "bad_data": header fine, data damaged; "valid"
    words: str = ""  # must appear in the error of load / read_meta ("bad" cases)
    state: Any = None  # "valid": what load must return (default: the saved state)
    weights: dict | None = None  # "valid": what load_params must load (default: eval weights)
    meta: dict = field(default_factory=dict)  # "valid": read_meta entries to expect


class Crafter:
    def __init__(self, data: bytes):
        self.data = data
        self.table, self.md, self.payload = split(data)
        self.cases: list[Case] = []

    def edit(self, name: str, fn: Callable[[dict, dict], Any], expect="bad", words="", **kw):
        table, md = copy.deepcopy(self.table), dict(self.md)
        fn(table, md)
        self.cases.append(Case(name, assemble(table, md, self.payload), expect, words, **kw))

    def field(self, name: str, key: str, fn: Callable[[Any], Any], **kw):
        """Edit the JSON value of metadata ``key``: ``fn(value)`` changes it in place or returns a new one."""

        def apply(table, md):
            doc = json.loads(md[key])
            new = fn(doc)
            md[key] = json.dumps(doc if new is None else new)

        self.edit(name, apply, **kw)

    def raw(self, name: str, data: bytes, words: str = ""):
        self.cases.append(Case(name, data, "bad", words))


def _set(doc, k, v):
    doc[k] = v


def _drop(doc, k):
    doc.pop(k)


# ----------------------------------------------------------------- load_params loading nothing
class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.dec = nn.Linear(4, 3)


def test_load_params_loading_nothing_is_an_error_unless_allowed(base, tmp_path):
    state, template, data = base
    path = tmp_path / "ck.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_params(path, Other())
    msg = str(info.value)
    assert str(path) in msg and "loaded nothing" in msg and "allow_empty=True" in msg
    assert "0.weight" in msg and "enc.weight" in msg  # a few names of both sides
    sd, report = ckpt.load_params(path, Other(), allow_empty=True)
    assert report.loaded == () and set(report.missing) == set(Other().state_dict())
    # everything filtered out by prefix_map: the same
    with pytest.raises(CheckpointError, match="loaded nothing"):
        ckpt.load_params(path, template(), prefix_map={"backbone.": ""})
    # all names matching but every shape different: nothing loaded either
    wide = build("clip_adamw")[1]().replace(params={"0.weight": torch.zeros(2, 2)}, buffers={})
    with pytest.raises(CheckpointError, match=r"1 \(0.weight\) match by name but not by shape"):
        ckpt.load_params(path, wide)


def test_a_damaged_format_marker_is_not_read_as_plain_safetensors(base, tmp_path):
    state, template, data = base
    c = Crafter(data)
    c.edit("marker", lambda t, m: _set(m, "fengine.format", "fengine.checkpoinT"))
    c.edit("no-marker", lambda t, m: m.pop("fengine.format"))
    for case in c.cases:
        path = tmp_path / f"{case.name}.safetensors"
        path.write_bytes(case.data)
        for fn in (ckpt.read_meta, lambda p: ckpt.load_params(p, template())):
            with pytest.raises(CheckpointError, match="format marker is damaged"):
                fn(path)
    # metadata stripped altogether (e.g. re-saved with safetensors): fengine-looking names, a hint
    stripped = tmp_path / "stripped.safetensors"
    st.save_file(st.load_file(tmp_path / "marker.safetensors"), stripped)
    with pytest.raises(CheckpointError, match="look like a fengine training checkpoint"):
        ckpt.load_params(stripped, template())
