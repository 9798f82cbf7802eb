"""fengine.checkpoint trusts nothing in a file: non-regular files, crafted and damaged headers, an
untrusted last_checkpoint pointer, loading nothing, stale temp files of killed saves."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections import Counter
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

import fengine
from fengine import checkpoint as ckpt
from fengine.checkpoint import CheckpointError, CheckpointMismatchError, _data, _format, _state


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


# ----------------------------------------------------------------- latest and the pointer
def _save_steps(work: Path, saves: list[tuple[int, str, int]], state) -> dict[str, Path]:
    """Save ``state`` at each (step, name, mtime in seconds)."""
    out = {}
    for step, name, mtime in saves:
        p = ckpt.save(work / name, state.replace(step=step))
        os.utime(p, ns=(mtime * 10**9, mtime * 10**9))
        out[name] = p
    return out


def test_latest_without_a_pointer_warns_and_takes_the_highest_step(tmp_path):
    step, template = build("clip_adamw")
    state = template()
    assert ckpt.latest(tmp_path) is None
    # by step, not by name and not by time: iter_7 is oldest and sorts first
    paths = _save_steps(
        tmp_path,
        [(7, "a_iter_7.safetensors", 10**9), (3, "z_iter_3.safetensors", 2 * 10**9)],
        state,
    )
    ckpt.publish(state.replace(step=99), tmp_path / "pub")  # weights only: never a resume point
    (tmp_path / "best.safetensors").write_bytes(b"junk")  # unreadable: skipped
    with pytest.warns(UserWarning) as w:
        assert ckpt.latest(tmp_path) == paths["a_iter_7.safetensors"]
    msg = str(w[0].message)
    assert "last_checkpoint does not exist" in msg and "a_iter_7.safetensors" in msg
    assert "highest step (7)" in msg
    # same step: the newer file
    paths.update(_save_steps(tmp_path, [(7, "b_iter_7.safetensors", 10**9 + 1)], state))
    with pytest.warns(UserWarning, match="b_iter_7"):
        assert ckpt.latest(tmp_path) == paths["b_iter_7.safetensors"]
    # the highest step damaged in its data: the next one
    damaged = bytearray(paths["b_iter_7.safetensors"].read_bytes())
    damaged[-1] ^= 1
    paths["b_iter_7.safetensors"].write_bytes(bytes(damaged))
    os.utime(paths["b_iter_7.safetensors"], ns=(10**18 + 10**9, 10**18 + 10**9))
    with pytest.warns(UserWarning, match="a_iter_7"):
        assert ckpt.latest(tmp_path) == paths["a_iter_7.safetensors"]
    with pytest.warns(UserWarning, match="b_iter_7"):  # unless asked not to read the data
        assert ckpt.latest(tmp_path, verify=False) == paths["b_iter_7.safetensors"]


@pytest.mark.parametrize(
    "text",
    [
        "OUTSIDE",  # absolute path of a real checkpoint outside work_dir
        "../outside/iter_5.safetensors",
        "sub/../../outside/iter_5.safetensors",
        "LINK",  # a symlink inside work_dir to the outside checkpoint
        "sub",  # a directory
        "nul\0byte",
        "x" * 5000,
        b"\xff\xfe",
        "",
    ],
)
def test_an_unusable_pointer_never_chooses_a_file_outside_the_work_dir(tmp_path, text):
    step, template = build("clip_adamw")
    state = template()
    work, outside = tmp_path / "work", tmp_path / "outside"
    (work / "sub").mkdir(parents=True)
    inside = ckpt.save(work / "iter_2.safetensors", state.replace(step=2))
    far = ckpt.save(outside / "iter_5.safetensors", state.replace(step=5))
    (work / "link.safetensors").symlink_to(far)
    if text == "OUTSIDE":
        text = str(far)
    elif text == "LINK":
        text = "link.safetensors"
    pointer = work / "last_checkpoint"
    pointer.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.warns(UserWarning, match="falling back") as w:
        got = ckpt.latest(work)
    # the symlink is a file in work_dir for the fallback scan, but it resolves outside: never taken
    assert got == inside, (got, str(w[0].message))
    assert str(pointer) in str(w[0].message)


def test_pointer_into_save_dir_is_followed_when_the_caller_names_it(tmp_path):
    step, template = build("clip_adamw")
    state = template()
    work, store = tmp_path / "runs" / "exp1", tmp_path / "store" / "exp1"
    work.mkdir(parents=True)
    path = ckpt.save(store / "epoch_2.safetensors", state.replace(step=2))
    ckpt.mark_latest(work, path)
    assert Path((work / "last_checkpoint").read_text().strip()).is_absolute()
    assert ckpt.latest(work, save_dir=store) == path.resolve()
    (work / "last_checkpoint").unlink()  # and its fallback searches there too
    with pytest.warns(UserWarning, match="epoch_2"):
        assert ckpt.latest(work, save_dir=store) == store / "epoch_2.safetensors"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_a_fifo_named_by_the_pointer_or_as_the_pointer_falls_back_without_hanging(base, tmp_path):
    state, template, data = base
    # named by last_checkpoint, or being last_checkpoint: unusable, falls back, never hangs
    work = tmp_path / "work"
    work.mkdir()
    good = ckpt.save(work / "iter_2.safetensors", state)
    os.mkfifo(work / "iter_9.safetensors")  # also met by the fallback's directory scan
    (work / "last_checkpoint").write_text("iter_9.safetensors")
    with pytest.warns(UserWarning, match="a FIFO") as w:
        tag, got = _within(10, lambda: ckpt.latest(work), work / "iter_9.safetensors")
    assert (tag, got) == ("ok", good) and "iter_2.safetensors" in str(w[0].message)
    (work / "last_checkpoint").unlink()
    os.mkfifo(work / "last_checkpoint")
    with pytest.warns(UserWarning, match="last_checkpoint is a FIFO"):
        tag, got = _within(10, lambda: ckpt.latest(work), work / "last_checkpoint")
    assert (tag, got) == ("ok", good)


# ----------------------------------------------------------------- the files the fuzz test reads
def systematic(state: fengine.TrainState, data: bytes) -> list[Case]:
    c = Crafter(data)
    md, table = c.md, c.table
    structure = json.loads(md["fengine.structure"])
    t_i = next(i for i, e in enumerate(structure) if e[0] == "params/0.weight")
    s_i = next(i for i, e in enumerate(structure) if e[0] == "opt_state/1/lr")
    bad_ints = ["abc", 1e300, -1, True, None, 1.5, 2**64, [1], {"a": 1}, "2", float("nan")]

    # fengine.position
    for k in ("step", "epoch", "batch_in_epoch", "seed"):
        for v in bad_ints:
            c.field(f"position-{k}-{v!r}", "fengine.position", lambda d, k=k, v=v: _set(d, k, v),
                    words=f"fengine.position {k}")  # fmt: skip
    for v in (None, [], "x", 3):
        c.field(f"position-{v!r}", "fengine.position", lambda d, v=v: v if v is not None else "n",
                words="fengine.position")  # fmt: skip
    c.edit("position-null", lambda t, m: _set(m, "fengine.position", "null"), words="position")
    c.field("position-no-step", "fengine.position", lambda d: _drop(d, "step"),
            words="fengine.position")  # fmt: skip
    c.field("position-extra-key", "fengine.position", lambda d: _set(d, "meta", {}),
            words="fengine.position")  # fmt: skip
    c.field("position-step-disagrees", "fengine.position", lambda d: _set(d, "step", 5),
            words="fengine.position step")  # fmt: skip
    c.edit("position-not-json", lambda t, m: _set(m, "fengine.position", "{"), words="position")
    c.edit("position-missing", lambda t, m: m.pop("fengine.position"), words="fengine.position")
    c.edit("position-duplicate-key", lambda t, m: _set(m, "fengine.position",
           '{"step":2,"step":3,"epoch":0,"batch_in_epoch":0,"seed":7}'), words="duplicate")  # fmt: skip

    def step5(t, m):
        for key in ("fengine.position", "fengine.scalars"):
            doc = json.loads(m[key])
            doc["step"] = 5
            m[key] = json.dumps(doc)

    c.edit("VALID-step-5", step5, "valid", state=state.replace(step=5), meta={"step": 5})

    # fengine.data_digest
    for v in (0, -1, "16777216", 1.5, True, None, 2**40, 1023, 2**31, [16]):
        c.field(f"block_size-{v!r}", "fengine.data_digest", lambda d, v=v: _set(d, "block_size", v),
                words="block_size")  # fmt: skip
    c.field("block_size-1024-old-blocks", "fengine.data_digest",
            lambda d: _set(d, "block_size", 1024), words="blocks")  # fmt: skip
    blocks = [f"{zlib.crc32(c.payload[i : i + 1024]):08x}" for i in range(0, len(c.payload), 1024)]
    assert len(blocks) >= 3
    c.field("VALID-block_size-1024", "fengine.data_digest",
            lambda d: d.update(block_size=1024, blocks=blocks), expect="valid")  # fmt: skip
    c.field("block_size-1024-one-crc-wrong", "fengine.data_digest",
            lambda d: d.update(block_size=1024, blocks=blocks[:3] + ["00000000"] + blocks[4:]),
            expect="bad_data")  # fmt: skip
    for v in ([], ["49484284", "49484284"], ["zzzzzzzz"], ["ABCDEF12"], ["1234567"],
              [12345678], None, "49484284", [None]):  # fmt: skip
        c.field(f"blocks-{v!r}", "fengine.data_digest", lambda d, v=v: _set(d, "blocks", v),
                words="blocks")  # fmt: skip
    good_crc = json.loads(md["fengine.data_digest"])["blocks"][0]
    c.field("blocks-wrong-crc", "fengine.data_digest",
            lambda d: _set(d, "blocks", [f"{int(good_crc, 16) ^ 1:08x}"]), expect="bad_data")  # fmt: skip
    for v in ("md5", None, 32):
        c.field(f"algorithm-{v!r}", "fengine.data_digest", lambda d, v=v: _set(d, "algorithm", v),
                words="algorithm")  # fmt: skip
    for v in (None, [], "x"):
        c.field(f"data_digest-{v!r}", "fengine.data_digest", lambda d, v=v: v if v is not None else "n",
                words="fengine.data_digest")  # fmt: skip
    c.field("data_digest-extra-key", "fengine.data_digest", lambda d: _set(d, "x", 1),
            words="fengine.data_digest")  # fmt: skip
    c.field("data_digest-no-blocks", "fengine.data_digest", lambda d: _drop(d, "blocks"),
            words="fengine.data_digest")  # fmt: skip
    c.edit("data_digest-missing", lambda t, m: m.pop("fengine.data_digest"), words="data_digest")

    # the header digest itself, not recomputed
    stale = dict(md, **{"fengine.kind": "train_state "})
    c.raw("header_digest-stale", assemble(table, stale, c.payload, digest=False), "SHA-256")
    no_digest = {k: v for k, v in md.items() if k != "fengine.header_digest"}
    c.raw("header_digest-missing", assemble(table, no_digest, c.payload, digest=False), "SHA-256")

    # format marker, version, kind
    for v in ("2", "999999999"):
        c.edit(
            f"version-{v}", lambda t, m, v=v: _set(m, "fengine.format_version", v), words="newer"
        )
    for v in ("10000000000", "0", "-1", "1.0", "abc", "", "01", " 1", "\uff11", "1\n"):
        c.edit(f"version-{v!r}", lambda t, m, v=v: _set(m, "fengine.format_version", v),
               words="fengine.format_version")  # fmt: skip
    c.edit("version-missing", lambda t, m: m.pop("fengine.format_version"), words="format_version")
    for v in ("fengine.checkpoinT", "", "fengine"):
        c.edit(
            f"format-{v!r}", lambda t, m, v=v: _set(m, "fengine.format", v), words="fengine.format"
        )
    c.edit("format-missing", lambda t, m: m.pop("fengine.format"), words="fengine.format")
    c.edit("kind-params", lambda t, m: _set(m, "fengine.kind", "params"), words="fengine.structure")
    for v in ("x", "", "Train_state"):
        c.edit(f"kind-{v!r}", lambda t, m, v=v: _set(m, "fengine.kind", v), words="fengine.kind")
    c.edit("kind-missing", lambda t, m: m.pop("fengine.kind"), words="fengine.kind")

    # fengine.structure: the whole list
    for v in (None, {}, "x", 5, []):
        c.edit(f"structure-{v!r}", lambda t, m, v=v: _set(m, "fengine.structure", json.dumps(v)),
               words="fengine.structure")  # fmt: skip
    c.edit(
        "structure-not-json", lambda t, m: _set(m, "fengine.structure", "[[,"), words="structure"
    )
    c.edit("structure-deep-nesting", lambda t, m: _set(m, "fengine.structure", "[" * 100_000 + "]" * 100_000),
           words="fengine.structure")  # fmt: skip
    c.edit("structure-missing", lambda t, m: m.pop("fengine.structure"), words="fengine.structure")

    # fengine.structure: one entry (a tensor's, t_i, or a scalar's, s_i)
    def entry(name, i, fn, words):
        c.field(name, "fengine.structure", lambda d: fn(d[i]) if callable(fn) else _set(d, i, fn),
                words=words)  # fmt: skip

    for v in (None, "x", [], ["params/0.weight"]):
        entry(f"entry-{v!r}", t_i, v, "fengine.structure[")
    entry("entry-tensor-5-items", t_i, lambda e: e.append("extra"), "fengine.structure[")
    entry("entry-scalar-4-items", s_i, lambda e: e.append("cpu"), "fengine.structure[")
    for v in ("tensorx", None, 1, "scalar", "empty"):
        entry(f"entry-kind-{v!r}", t_i, lambda e, v=v: _set(e, 1, v), "fengine.structure[")
    for v in (5, None, "other", "params/0.weight "):
        entry(f"entry-name-{v!r}", t_i, lambda e, v=v: _set(e, 0, v), "name")
    deep = [["k", "x"]] * 101
    for v in ("x", [], [["a"]], [["z", "x"]], [["i", -1]], [["i", "0"]], [["i", True]],
              [["a", 1]], [["k", 1.5]], [["k", None]], [["a", "params"], "0.weight"], deep):  # fmt: skip
        entry(f"entry-path-{str(v)[:30]}", t_i, lambda e, v=v: _set(e, 2, v), "path")
    for v in (None, 1, ""):
        entry(f"entry-device-{v!r}", t_i, lambda e, v=v: _set(e, 3, v), "device")
    c.field("entry-duplicate", "fengine.structure", lambda d: d.append(d[t_i]), words="unique")
    c.field("entry-tensor-dropped", "fengine.structure", lambda d: _drop(d, t_i),
            words="fengine.structure")  # fmt: skip

    def leaf_below_leaf(t, m):
        s, sc = json.loads(m["fengine.structure"]), json.loads(m["fengine.scalars"])
        s.append(["params/0.weight/x", "scalar", [["a", "params"], ["k", "0.weight"], ["k", "x"]]])
        sc["params/0.weight/x"] = 1
        m["fengine.structure"], m["fengine.scalars"] = json.dumps(s), json.dumps(sc)

    c.edit("entry-leaf-below-leaf", leaf_below_leaf, words="a tree")
    c.field("entry-phantom-tensor", "fengine.structure",
            lambda d: d.append(["params/ghost", "tensor", [["a", "params"], ["k", "ghost"]], "cpu"]),
            words="fengine.structure")  # fmt: skip
    c.field("entry-scalar-dropped", "fengine.structure", lambda d: _drop(d, s_i),
            words="fengine.scalars")  # fmt: skip

    # fengine.scalars
    for v in (None, [], "x", 5):
        c.edit(f"scalars-{v!r}", lambda t, m, v=v: _set(m, "fengine.scalars", json.dumps(v)),
               words="fengine.scalars")  # fmt: skip
    for v in ([1], {"a": 1}):
        c.field(f"scalars-value-{v!r}", "fengine.scalars",
                lambda d, v=v: _set(d, "opt_state/1/lr", v), words="fengine.scalars")  # fmt: skip
    c.field("scalars-one-missing", "fengine.scalars", lambda d: _drop(d, "opt_state/1/lr"),
            words="fengine.scalars")  # fmt: skip
    c.field("scalars-one-extra", "fengine.scalars", lambda d: _set(d, "params/x", 1),
            words="fengine.scalars")  # fmt: skip
    c.field("scalars-step-str", "fengine.scalars", lambda d: _set(d, "step", "2"),
            words="fengine.position step")  # fmt: skip
    c.edit("scalars-not-json", lambda t, m: _set(m, "fengine.scalars", "{'a': 1}"), words="scalars")
    c.edit("scalars-missing", lambda t, m: m.pop("fengine.scalars"), words="fengine.scalars")
    opt = state.opt_state
    lr_state = state.replace(opt_state=(opt[0], opt[1]._replace(lr=0.5)))
    c.field("VALID-scalar-lr", "fengine.scalars", lambda d: _set(d, "opt_state/1/lr", 0.5),
            expect="valid", state=lr_state)  # fmt: skip

    # fengine.meta, fengine.versions
    for v in ("null", "[]", '"x"', "3", "{", "[" * 50_000):
        c.edit(
            f"meta-{v[:8]!r}", lambda t, m, v=v: _set(m, "fengine.meta", v), words="fengine.meta"
        )
    c.edit("meta-missing", lambda t, m: m.pop("fengine.meta"), words="fengine.meta")
    odd = {"config": None, "handlers": [1, "x", {"y": None}]}
    c.edit("VALID-meta-wrong-typed-handler-state",
           lambda t, m: _set(m, "fengine.meta", json.dumps(odd)), "valid", meta={"meta": odd})  # fmt: skip
    for v in ("null", "[]", '{"torch": 1}', "{"):
        c.edit(f"versions-{v!r}", lambda t, m, v=v: _set(m, "fengine.versions", v),
               words="fengine.versions")  # fmt: skip
    c.edit("versions-missing", lambda t, m: m.pop("fengine.versions"), words="fengine.versions")

    # fengine.eval_weights
    for v in ("null", "[]", '"x"', '{"0.weight": 3}', '{"nope": "params/0.weight"}',
              '{"0.weight": "nope"}', '{"0.weight": "params/0.weight/x"}', "{"):  # fmt: skip
        c.edit(f"eval_weights-{v!r}", lambda t, m, v=v: _set(m, "fengine.eval_weights", v),
               words="fengine.eval_weights")  # fmt: skip
    live = {**state.params, **state.buffers}
    c.edit("VALID-eval_weights-absent", lambda t, m: m.pop("fengine.eval_weights"), "valid",
           weights=live)  # fmt: skip
    c.edit("VALID-unknown-fengine-key", lambda t, m: _set(m, "fengine.future", "[1]"), "valid")
    c.edit("VALID-foreign-key", lambda t, m: _set(m, "producer", "someone"), "valid")

    # the tensor table (with fengine's digest recomputed over it)
    name = "params/0.weight"  # F32 [16, 6]: 384 bytes
    b0, e0 = table[name]["data_offsets"]
    q = repr(name)

    def tensor(label, fn, words=q):
        c.edit(f"table-{label}", lambda t, m: fn(t[name]) if callable(fn) else _set(t, name, fn),
               words=words)  # fmt: skip

    for v in (None, [], "x", 5):
        tensor(f"entry-{v!r}", v)
    tensor("extra-key", lambda e: _set(e, "x", 1))
    for k in ("dtype", "shape", "data_offsets"):
        tensor(f"no-{k}", lambda e, k=k: e.pop(k))
    for v in ("F33", None, 5, "f32", "F16", "F64"):
        tensor(f"dtype-{v!r}", lambda e, v=v: _set(e, "dtype", v))
    for v in (None, "x", [-1, 6], ["16", 6], [16.0, 6], [True, 6], [16, 7], [2**40, 2**40],
              [2**64, 0], [1] * 65 + [16, 6], [6, 16, 1, 0]):  # fmt: skip
        tensor(f"shape-{str(v)[:20]}", lambda e, v=v: _set(e, "shape", v))
    for v in (None, [b0], [b0, e0, e0], [str(b0), str(e0)], [float(b0), float(e0)],
              [b0 - 2**20, e0 - 2**20], [e0, b0], [0, 2**70], [-384, 0]):  # fmt: skip
        tensor(f"offsets-{str(v)[:24]}", lambda e, v=v: _set(e, "data_offsets", v))
    other = next(n for n, e in table.items() if n != name and e["shape"] == [16, 6])
    for label, v in (
        ("shifted", [b0 + 4, e0 + 4]),
        ("beyond-the-file", [b0 + 2**40, e0 + 2**40]),
        ("overlapping", table[other]["data_offsets"]),
    ):
        tensor(f"offsets-{label}", lambda e, v=v: _set(e, "data_offsets", v), "starts at byte")
    c.edit("table-entry-removed", lambda t, m: t.pop(name), words="")
    c.edit("table-renamed", lambda t, m: _set(t, "params/0.weightX", t.pop(name)), words="")
    c.edit("table-ghost", lambda t, m: _set(t, "params/ghost", {"dtype": "F32", "shape": [0],
           "data_offsets": [0, 0]}), words="fengine.structure")  # fmt: skip

    # raw damage: the length field, the JSON text, __metadata__
    n = int.from_bytes(data[:8], "little")
    head, payload = data[8 : 8 + n], data[8 + n :]
    for v in (2**64 - 1, len(data) - 8 + 1, 0, 1, n - 8, len(data) - 8, 2**40):
        c.raw(f"length-{v}", v.to_bytes(8, "little") + data[8:])
    i = head.index(b"params/0.weight")
    c.raw("non-utf8", data[: 8 + i] + b"\xff" + data[9 + i :], "UTF-8")
    c.raw("non-json", data[:8] + b"{" + b"x" * (n - 1) + payload, "JSON")
    c.raw("json-list", frame(json.dumps([1, 2]).encode(), payload))
    c.raw("json-trailing", frame(head.rstrip() + b"]", payload), "JSON")
    c.raw("empty", b"")
    c.raw("seven-bytes", data[:7])
    c.raw("header-only", frame(b"{}", b""))
    c.raw("header-empty-object", frame(b"{}", payload), "unexpected bytes")
    full = {"__metadata__": md, **table}
    for label, meta_value, words in (
        ("null", None, "without fengine metadata"),
        ("list", [1], "__metadata__"),
        ("non-string", {**md, "fengine.kind": 5}, "__metadata__"),
    ):
        raw = json.dumps({**full, "__metadata__": meta_value}, separators=(",", ":")).encode()
        c.raw(f"metadata-{label}", frame(raw, payload), words)
    dup = json.dumps(full, separators=(",", ":")).encode()
    entry_text = json.dumps({name: table[name]}, separators=(",", ":")).encode()[1:-1]
    c.raw("duplicate-tensor-key", frame(dup[:-1] + b"," + entry_text + b"}", payload), "duplicate")
    c.raw("deep-nesting-in-table", frame(dup[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
          payload), "JSON")  # fmt: skip
    stripped = json.dumps(
        table, separators=(",", ":")
    ).encode()  # a fengine file, metadata stripped
    c.raw("metadata-stripped", frame(stripped, payload), "without fengine metadata")
    return c.cases


def random_damage(data: bytes, rng: random.Random) -> list[Case]:
    n = 8 + int.from_bytes(data[:8], "little")
    cases = []
    for i in sorted(rng.sample(range(n), 90)):
        bad = bytearray(data)
        bad[i] ^= 1 << rng.randrange(8)
        cases.append(Case(f"flip-header-{i}", bytes(bad), "bad"))
    for i in sorted(rng.sample(range(n, len(data)), 60)):
        bad = bytearray(data)
        bad[i] ^= 1 << rng.randrange(8)
        cases.append(Case(f"flip-data-{i}", bytes(bad), "bad_data"))
    for cut in sorted(rng.sample(range(len(data)), 40)):
        cases.append(Case(f"truncated-{cut}", data[:cut], "bad"))
    return cases


# ----------------------------------------------------------------- the fuzz test
# Hundreds of files: systematic edits of every header field with the header digest recomputed
# (an attacker can), raw header damage, and random bit flips and truncations of a real
# checkpoint. Every file goes through `load`, `read_meta`, `load_params` and `latest`; each call
# must either raise a `CheckpointError` or return exactly what the file holds.
READ_META_TYPES = {
    "format_version": int,
    "kind": str,
    "step": int,
    "epoch": int,
    "batch_in_epoch": int,
    "seed": int,
    "meta": dict,
    "versions": dict,
    "scalars": dict,
    "structure": list,
    "tensors": dict,
    "file_size": int,
}


NOT_A_TRAINING_CHECKPOINT = ("without fengine metadata", "params-only fengine file")


def test_crafted_and_damaged_files_raise_checkpoint_errors_or_load_exactly(base, tmp_path):
    state, template, data = base
    like = template()
    like_before = like.clone()
    eval_params, eval_buffers = state.eval_weights()
    cases = systematic(state, data) + random_damage(data, random.Random(9))
    assert len(cases) >= 200 and len({c.name for c in cases}) == len(cases)

    outcomes: Counter = Counter()
    problems: list[str] = []
    for i, case in enumerate(cases):
        work = tmp_path / f"{i:03d}"
        work.mkdir()
        path = work / "ck.safetensors"
        path.write_bytes(case.data)

        def bad(what: str, tag: str, got: Any, case=case) -> None:
            problems.append(f"{case.name}: {what} -> {tag}: {str(got)[:300]}")

        results = {
            "load": _attempt(partial(ckpt.load, path, like)),
            "read_meta": _attempt(partial(ckpt.read_meta, path)),
            "load_params": _attempt(partial(ckpt.load_params, path, like)),
        }
        (work / "last_checkpoint").write_text("ck.safetensors\n")
        results["latest"] = _attempt(partial(ckpt.latest, work))
        (work / "last_checkpoint").unlink()
        # no pointer: a readable checkpoint is taken with a warning; a damaged one is an error
        with pytest.warns(UserWarning) if case.expect == "valid" else contextlib.nullcontext():
            results["latest-no-pointer"] = _attempt(partial(ckpt.latest, work))
        for what, (tag, got) in results.items():
            outcomes[tag] += 1
            if tag.startswith("RAW"):
                bad(what, tag, got)
            elif tag != "ok" and str(path) not in str(got):
                bad(what, "error not naming the file", got)

        fails = {w for w, (tag, _) in results.items() if tag != "ok"}
        if case.expect == "bad":
            must_fail = {"load", "read_meta", "load_params", "latest"}
        elif case.expect == "bad_data":
            must_fail = {"load", "load_params", "latest"}
        else:
            must_fail = set()
        for what in must_fail - fails:
            if what == "load_params" and case.expect == "bad_data":
                continue  # it reads (and checks) only the blocks it needs: checked below
            bad(what, "SILENTLY LOADED", results[what][1])
        if case.expect in ("bad", "bad_data"):
            # None (a fresh start) only for a file that is no fengine training checkpoint at all
            tag, got = results["latest-no-pointer"]
            foreign = any(w in str(results["load"][1]) for w in NOT_A_TRAINING_CHECKPOINT)
            if tag != "CheckpointError" and not (foreign and tag == "ok" and got is None):
                bad("latest-no-pointer", "expected a CheckpointError naming the file", got)
            for what in ("load", "read_meta"):
                tag, got = results[what]
                if what in must_fail and tag == "CheckpointError" and case.words not in str(got):
                    bad(what, f"error without {case.words!r}", got)
        if case.expect == "bad_data" or case.expect == "valid":
            tag, meta = results["read_meta"]
            if tag != "ok":
                bad("read_meta", tag, meta)
            else:
                wrong = {k for k, t in READ_META_TYPES.items() if type(meta.get(k)) is not t}
                expected = {"step": state.step, "seed": state.seed, "meta": META, **case.meta}
                wrong |= {k for k, v in expected.items() if meta[k] != v}
                if wrong:
                    bad("read_meta", f"wrong {sorted(wrong)}", meta)
        if case.expect == "valid":
            for what in ("load", "load_params", "latest", "latest-no-pointer"):
                if results[what][0] != "ok":
                    bad(what, results[what][0], results[what][1])
            if results["load"][0] == "ok":
                try:
                    assert_same(results["load"][1], case.state or state)
                except AssertionError as e:
                    bad("load", "WRONG VALUES", e)
        if results["load_params"][0] == "ok" and case.expect != "bad":
            new, report = results["load_params"][1]
            want = case.weights or {**eval_params, **eval_buffers}
            got = {**new.params, **new.buffers}
            if not report.ok or any(not torch.equal(got[k], want[k].detach()) for k in want):
                bad("load_params", "WRONG VALUES", report)
        if case.expect == "valid":
            for what in ("latest", "latest-no-pointer"):
                if results[what] != ("ok", path):
                    bad(what, "did not choose the file", results[what][1])

    counts = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
    kinds = Counter(c.expect for c in cases)
    print(f"\nfuzz: {len(cases)} files ({dict(kinds)}); outcomes over 5 calls each: {counts}")
    assert not problems, f"{len(problems)} problems ({counts}):\n" + "\n".join(problems[:40])
    assert not any(k.startswith("RAW") for k in outcomes)
    assert_same(like, like_before)  # nothing was loaded into the template


# ----------------------------------------------------------------- field errors read well
def test_a_crafted_field_error_names_the_file_the_field_and_what_was_expected(base, tmp_path):
    _, template, data = base
    c = Crafter(data)
    c.field("step", "fengine.position", lambda d: _set(d, "step", "abc"))
    c.field("block", "fengine.data_digest", lambda d: _set(d, "block_size", 0))
    path = tmp_path / "x.safetensors"
    path.write_bytes(c.cases[0].data)
    with pytest.raises(CheckpointError) as info:
        ckpt.load(path, template())
    assert str(info.value) == (
        f"{path}: corrupt header: fengine.position step must be an int from 0 to 2**64 - 1, got 'abc'"
    )
    path.write_bytes(c.cases[1].data)
    with pytest.raises(CheckpointError) as info:
        ckpt.read_meta(path)
    assert str(info.value) == (
        f"{path}: corrupt header: fengine.data_digest block_size must be an int from 1024 to "
        "1073741824, got 0"
    )


def test_save_refuses_positions_no_file_could_hold(tmp_path):
    step, template = build("clip_adamw")
    state = template()
    for bad in ({"step": -1}, {"epoch": True}, {"seed": 2**64}, {"batch_in_epoch": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ckpt.save(tmp_path / "x.safetensors", state.replace(**bad))
    deep: Any = torch.zeros(1)
    for _ in range(101):
        deep = {"d": deep}
    with pytest.raises(TypeError, match="levels deep"):
        ckpt.save(tmp_path / "x.safetensors", state.replace(extra={"deep": deep}))
    assert list(tmp_path.iterdir()) == []
    # seeds up to 2**64 - 1 round-trip
    path = ckpt.save(tmp_path / "ok.safetensors", state.replace(seed=2**64 - 1))
    assert ckpt.load(path, template()).seed == 2**64 - 1


# ----------------------------------------------------------------- stale temps
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_stale_temps_removes_only_dead_writers_temp_files(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    names = {
        f".iter_3.safetensors.{dead}.0badc0de.tmp": True,
        f".last_checkpoint.{dead}.12345678.tmp": True,
        f".pub.safetensors.{dead}.abcdef01.tmp": True,
        f".iter_4.safetensors.{live}.0badc0de.tmp": False,  # a save in progress
        f".iter_4.safetensors.{os.getppid()}.0badc0de.tmp": False,
        f".iter_3.safetensors.{dead}.0BADC0DE.tmp": False,  # not fengine's pattern
        f".iter_3.safetensors.{dead}.0badc0d.tmp": False,
        f"iter_3.safetensors.{dead}.0badc0de.tmp": False,
        f".iter_3.safetensors.{dead}.0badc0de.tmp.bak": False,
        f"..{dead}.0badc0de.tmp": False,
        ".iter_3.safetensors.0.0badc0de.tmp": False,
        ".iter_3.safetensors.x.0badc0de.tmp": False,
        ".foo.tmp": False,
        "iter_3.safetensors": False,
        "last_checkpoint": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".dir.safetensors.{dead}.0badc0de.tmp").mkdir()  # not a regular file
    target = tmp_path / "keep.txt"
    target.write_text("keep")
    (tmp_path / f".link.safetensors.{dead}.0badc0de.tmp").symlink_to(target)
    removed = ckpt.clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert all(p.parent == tmp_path for p in removed)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n, stale in names.items() if not stale} | {
        f".dir.safetensors.{dead}.0badc0de.tmp",
        "keep.txt",
        f".link.safetensors.{dead}.0badc0de.tmp",
    }
    assert target.read_text() == "keep"
    assert ckpt.clean_stale_temps(tmp_path) == []
    assert ckpt.clean_stale_temps(tmp_path / "missing") == []


def test_clean_stale_temps_when_liveness_cannot_be_told_goes_by_age(tmp_path, monkeypatch):
    step, template = build("clip_adamw")
    monkeypatch.setattr(_state, "pid_alive", lambda pid: None)
    older, newer = (
        tmp_path / ".a.safetensors.77.00000000.tmp",
        tmp_path / ".b.safetensors.77.11111111.tmp",
    )
    for p in (older, newer):
        p.write_bytes(b"x")
    assert ckpt.clean_stale_temps(tmp_path) == []  # no checkpoint to compare with: keep
    ck = ckpt.save(tmp_path / "iter_1.safetensors", template())
    os.utime(older, ns=(10**18, 10**18))
    os.utime(ck, ns=(2 * 10**18, 2 * 10**18))
    os.utime(newer, ns=(3 * 10**18, 3 * 10**18))
    assert ckpt.clean_stale_temps(tmp_path) == [older]
    assert newer.exists() and ck.exists()


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch, fengine
    from fengine import checkpoint
    params = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(24)}  # 96 MiB
    state = fengine.TrainState(step=1, params=params, buffers={})
    print("ready", flush=True)
    while True:
        checkpoint.save(sys.argv[1], state)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="kill -9")
def test_clean_stale_temps_after_a_real_kill_9_mid_save(tmp_path):
    target = tmp_path / "big.safetensors"
    env = dict(os.environ, PYTHONPATH=str(Path(fengine.__file__).parents[1]))
    for _attempt_no in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(target)], env=env, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            deadline = time.monotonic() + 60
            while not any(tmp_path.glob(".*.tmp")) and time.monotonic() < deadline:
                time.sleep(0.001)
            proc.kill()  # SIGKILL: no cleanup runs
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        leftovers = sorted(tmp_path.glob(".*.tmp"))
        if leftovers:
            break
    assert leftovers, "no kill landed during a write"
    assert leftovers[0].name.startswith(f".big.safetensors.{proc.pid}.")
    removed = ckpt.clean_stale_temps(tmp_path)
    assert removed == leftovers
    assert not any(tmp_path.glob(".*.tmp"))
    if target.exists():  # a complete earlier save is untouched and loads
        ckpt.read_meta(target)


# ----------------------------------------------------------------- remove
def test_remove_deletes_and_fsyncs_the_directory(tmp_path, monkeypatch):
    step, template = build("clip_adamw")
    path = ckpt.save(tmp_path / "iter_1.safetensors", template())
    synced = []
    monkeypatch.setattr(ckpt._io, "_fsync_dir", lambda d: synced.append(d))
    assert ckpt.remove(path) is True and not path.exists()
    assert synced == [tmp_path]
    assert ckpt.remove(path) is False and synced == [tmp_path]
    with pytest.raises(IsADirectoryError):
        ckpt.remove(tmp_path)
    assert tmp_path.is_dir()


# ----------------------------------------------------------------- latest without a pointer
def test_latest_without_a_pointer_names_every_damaged_checkpoint(base, tmp_path):
    """No ``last_checkpoint`` and only damaged checkpoints: an error naming each and why, not None
    (which `fit` reads as "start from scratch", on top of the damaged run)."""
    state, _, data = base
    (tmp_path / "iter_4.safetensors").write_bytes(data[:-100])  # torn
    flipped = bytearray(data)
    flipped[-10] ^= 0x55
    (tmp_path / "iter_2.safetensors").write_bytes(bytes(flipped))
    ckpt.publish(state, tmp_path / "model")  # a params-only file: not a training checkpoint
    st.save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")  # not fengine's
    with pytest.raises(CheckpointError) as info:
        ckpt.latest(tmp_path)
    msg = str(info.value)
    assert "last_checkpoint does not exist" in msg and "damaged checkpoints (2)" in msg
    assert f"{tmp_path / 'iter_4.safetensors'}: truncated" in msg
    assert f"{tmp_path / 'iter_2.safetensors'}: " in msg
    assert "model-" not in msg and "foreign" not in msg
    # a readable one beside them is still taken, with a warning (as before)
    (tmp_path / "iter_1.safetensors").write_bytes(data)
    with pytest.warns(UserWarning, match="does not exist; falling back to .*iter_1"):
        assert ckpt.latest(tmp_path) == tmp_path / "iter_1.safetensors"
    # files that are no training checkpoint at all: a fresh run
    for name in ("iter_1", "iter_2", "iter_4"):
        (tmp_path / f"{name}.safetensors").unlink()
    assert ckpt.latest(tmp_path) is None


# ----------------------------------------------------------------- torch .pth files
def test_load_params_checks_a_pth_zip_records_crc(tmp_path):
    """``torch.load`` does not check a zip-format ``.pth``'s CRC-32s: a flipped bit in a weight
    loaded as a wrong value (1.541 saved, 1.041 loaded). The damaged record is named."""
    import re
    import zipfile

    torch.manual_seed(0)
    sd = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    path = tmp_path / "lin.pth"
    torch.save(sd, path)
    assert torch.equal(ckpt.load_params(path, nn.Linear(4, 3))[0]["weight"], sd["weight"])
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("lin/data/0")  # weight's bytes
    h = info.header_offset
    start = h + 30 + int.from_bytes(data[h + 26 : h + 28], "little")
    start += int.from_bytes(data[h + 28 : h + 30], "little")
    data[start + 2] ^= 0x40  # an exponent bit of weight[0, 0]
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(path))}: record 'lin/data/0' fails"
    ):
        ckpt.load_params(path, nn.Linear(4, 3))


@pytest.mark.parametrize(
    ("tensor", "what"),
    [
        (torch.zeros(3, 4, device="meta"), "a meta tensor"),
        (torch.zeros(3, 4).to_sparse(), "a torch.sparse_coo tensor"),
    ],
)
def test_load_params_refuses_a_pth_tensor_without_dense_data(tmp_path, tensor, what):
    """A meta tensor in a ``.pth`` raised a raw ``NotImplementedError: Cannot copy out of meta
    tensor`` naming no file; a sparse one was handed back as it was."""
    import re

    path = tmp_path / "lin.pth"
    torch.save({"weight": tensor, "bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: 'weight' is {what}"):
        ckpt.load_params(path, nn.Linear(4, 3))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_params_refuses_complex_weights_for_real_ones(tmp_path, suffix):
    """torch's cast only warned and dropped the imaginary part."""
    from safetensors.torch import save_file

    path = tmp_path / f"lin{suffix}"
    weights = {"weight": torch.ones(3, 4, dtype=torch.complex64), "bias": torch.zeros(3)}
    torch.save(weights, path) if suffix == ".pth" else save_file(weights, str(path))
    with pytest.raises(
        CheckpointError, match=r"'weight' is torch\.complex64 and 'weight' is torch\.float32"
    ):
        ckpt.load_params(path, nn.Linear(4, 3))


def test_load_params_reads_a_pth_saved_without_crcs(tmp_path):
    """torch's ``compute_crc32=False`` writes CRC fields of 0 (nothing to check); torch.load
    reads such a file, and so must load_params (the review's case: it was refused as damaged)."""
    import torch.utils.serialization as serialization

    lin = nn.Linear(4, 3)
    path = tmp_path / "lin.pth"
    serialization.config.save.compute_crc32 = False
    try:
        torch.save(lin.state_dict(), path)
    finally:
        serialization.config.save.compute_crc32 = True
    loaded, report = ckpt.load_params(path, nn.Linear(4, 3))
    assert report.ok
    assert torch.equal(loaded["weight"], lin.weight.detach())
