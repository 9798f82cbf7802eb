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
