"""fengine.checkpoint trusts nothing in a file: non-regular files, crafted and damaged headers, an
untrusted last_checkpoint pointer, loading nothing, stale temp files of killed saves."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from test_checkpoint import assert_same, batches, build, train

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
