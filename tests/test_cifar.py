"""fengine.data.cifar10 on tiny files in the CIFAR-10 python format, written here: byte for byte
as Python 2's cPickle wrote the originals (protocol 2, str keys, numpy.core globals), and as
Python 3 re-saves them (protocols 2, 4, 5); the restricted unpickler refuses code."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

import fengine.data as fd
from fengine.data import cifar


NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]  # fmt: skip


# ---------------------------------------------------------------- a Python 2 cPickle writer


def _str(b: bytes) -> bytes:
    """A Python 2 ``str`` (SHORT_BINSTRING / BINSTRING); loads as bytes with encoding='bytes'."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _py2_array(a: np.ndarray) -> bytes:
    """An ndarray as numpy 1.x under Python 2 pickled it (``_reconstruct`` + ``__setstate__``)."""
    assert a.dtype == np.uint8
    out = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b")
    )
    out += b"\x87R("  # TUPLE3 REDUCE, then MARK for the state tuple
    out += _int(1) + b"(" + b"".join(_int(s) for s in a.shape) + b"t"
    out += b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R"
    out += (
        b"("
        + _int(3)
        + _str(b"|")
        + b"NNN"
        + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff"
        + _int(0)
        + b"tb"
    )
    out += b"\x89" + _str(a.tobytes()) + b"tb"
    return out


def _py2(obj) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, bytes):
        return _str(obj)
    if isinstance(obj, int):
        return _int(obj)
    return _py2_array(obj)


def py2_pickle(obj) -> bytes:
    return b"\x80\x02" + _py2(obj) + b"."


# ---------------------------------------------------------------- fixtures


def make_batches(root, per_batch=3, writer=py2_pickle, seed=0):
    """Writes cifar-10-batches-py/ under root; returns the images (N, 3072) and labels per split."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(seed)
    splits = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for name in names:
        data = g.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in g.integers(0, 10, size=per_batch)]
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(writer(batch))
        split = splits["test" if name == "test_batch" else "train"]
        split[0].append(data)
        split[1].extend(labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(writer(meta))
    return {k: (np.concatenate(d), y) for k, (d, y) in splits.items()}


def expected_image(row: np.ndarray, normalize: bool) -> torch.Tensor:
    """By hand: 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32."""
    planes = [row[c * 1024 : (c + 1) * 1024].reshape(32, 32) for c in range(3)]
    x = torch.from_numpy(np.stack(planes).astype(np.float32)) / 255.0
    if normalize:
        mean = torch.tensor(fd.CIFAR10_MEAN).view(3, 1, 1)
        std = torch.tensor(fd.CIFAR10_STD).view(3, 1, 1)
        x = (x - mean) / std
    return x


# ---------------------------------------------------------------- tests


def test_python2_style_file_is_what_the_format_says():
    blob = py2_pickle({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]})
    # The unrestricted reference loader (the dataset authors' recipe) agrees with our writer.
    ref = pickle.loads(blob, encoding="bytes")
    assert ref[b"labels"] == [1, 2]
    np.testing.assert_array_equal(ref[b"data"], np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert b"numpy.core.multiarray\n_reconstruct" in blob  # the global the originals name


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reads_python2_batches(tmp_path, split, normalize):
    truth = make_batches(tmp_path)
    ds = fd.cifar10(tmp_path, split, normalize=normalize)
    data, labels = truth[split]
    assert len(ds) == data.shape[0] == (15 if split == "train" else 3)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck" and len(ds.classes) == 10
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(ds), 3, 32, 32)
    assert ds.labels.tolist() == labels
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert type(y) is int and y == labels[i]
        torch.testing.assert_close(x, expected_image(data[i], normalize), rtol=0, atol=1e-6)
        if not normalize:  # k / 255 exactly as float32 division
            assert torch.equal(x, expected_image(data[i], False))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_batches_resaved_by_python3(tmp_path, protocol):
    truth = make_batches(tmp_path, writer=lambda o: pickle.dumps(o, protocol=protocol))
    ds = fd.CIFAR10(tmp_path / "cifar-10-batches-py", "train", normalize=False)  # the folder itself
    data, labels = truth["train"]
    assert torch.equal(ds.images.reshape(len(ds), 3072), torch.from_numpy(data))
    assert ds.labels.tolist() == labels


def test_loader_batches_cifar(tmp_path):
    make_batches(tmp_path)
    ds = fd.cifar10(tmp_path)
    x, y = next(iter(fd.Loader(ds, 4, seed=0, shuffle=False).epoch(0)))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x[2], ds[2][0]) and y.tolist() == ds.labels[:4].tolist()


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_malicious_pickle_is_refused_before_anything_runs(tmp_path, payload):
    make_batches(tmp_path)
    marker = tmp_path / "pwned"
    obj = {
        "system": {b"data": _Exploit(marker), b"labels": []},
        "eval": {b"data": _EvalExploit(), b"labels": []},
        "class": {b"data": torch.nn.Linear(1, 1), b"labels": []},  # any class is refused
    }[payload]
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3: refusing to load global"):
        fd.cifar10(tmp_path)
    assert not marker.exists()


def test_codecs_encode_only_as_latin1(tmp_path):
    blob = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    path = tmp_path / "b"
    path.write_bytes(blob)
    with pytest.raises(pickle.UnpicklingError, match="only as str -> latin1 bytes"):
        cifar.load_batch(path)


def test_a_file_cannot_change_the_functions_it_is_allowed_to_name(tmp_path):
    """pickle's BUILD opcode sets attributes on the object a GLOBAL pushed: a crafted batch set
    fengine's ``_codecs.encode`` stand-in's ``__defaults__`` for the rest of the process."""

    def text(s):  # BINUNICODE
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    state = b"N}" + text("__defaults__") + b"(" + text("utf-8") + b"ts\x86"  # (None, {...})
    blob = b"\x80\x02c_codecs\nencode\n" + state + b"b0}" + text("data") + b"Ns."
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    before = cifar._latin1_encode.__defaults__
    cifar.load_batch(path)
    assert cifar._latin1_encode.__defaults__ == before == ("latin1",)
    good = tmp_path / "test_batch"
    good.write_bytes(pickle.dumps({"data": b"\xff\x00", "labels": []}, protocol=2))
    assert cifar.load_batch(good)["data"] == b"\xff\x00"


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"missing .*data_batch_1; expected the CIFAR-10"
    ) as e:
        fd.cifar10(tmp_path)
    assert "never downloads" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
    make_batches(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing .*batches.meta"):
        fd.cifar10(tmp_path, "test")
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": NAMES}))
    bad = {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(py2_pickle(bad))
    with pytest.raises(ValueError, match=r"test_batch: 'data' must have 3072 columns"):
        fd.cifar10(tmp_path, "test")
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (folder / "test_batch").write_bytes(py2_pickle(bad))
    with pytest.raises(ValueError, match=r"test_batch: 'labels' must be ints in \[0, 10\)"):
        fd.cifar10(tmp_path, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32)}))
    with pytest.raises(ValueError, match=r"test_batch: no 'labels' entry"):
        fd.cifar10(tmp_path, "test")
    bad = {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(
        ValueError, match=r"'data' must be a uint8 array .* got float32 \(2, 3072\)"
    ):
        fd.cifar10(tmp_path, "test")
    with pytest.raises(ValueError, match="`split` must be 'train' or 'test', got 'val'"):
        fd.cifar10(tmp_path, "val")
    # truncated, empty, random bytes: each names the file (before: "Ran out of input")
    good = py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for content, kind in ((good[:-40], "UnpicklingError"), (b"", "ValueError"),
                          (b"\xd7\x01\x02junk", "UnpicklingError")):  # fmt: skip
        (folder / "test_batch").write_bytes(content)
        with pytest.raises((ValueError, pickle.UnpicklingError)) as e:
            fd.cifar10(tmp_path, "test")
        assert type(e.value).__name__ == kind
        assert str(e.value).startswith(f"{folder / 'test_batch'}: not a readable CIFAR-10 batch")


def test_bytes_after_the_pickle_are_refused_with_their_count(tmp_path):
    """The unpickler stops at STOP: batch 2 followed by batch 3's bytes (a botched append) or a
    zero-filled tail loaded as batch 2 with no error."""
    make_batches(tmp_path, per_batch=2)
    folder = tmp_path / "cifar-10-batches-py"
    b2, b3 = (folder / "data_batch_2").read_bytes(), (folder / "data_batch_3").read_bytes()
    for tail in (b3, b"\x00" * 1000, b"\x00"):
        (folder / "data_batch_2").write_bytes(b2 + tail)
        with pytest.raises(ValueError) as e:
            fd.cifar10(tmp_path)
        assert str(e.value).startswith(
            f"{folder / 'data_batch_2'}: {len(tail)} bytes follow the CIFAR-10 batch's pickle"
        )
    (folder / "data_batch_2").write_bytes(b2)
    assert len(fd.cifar10(tmp_path)) == 10  # the intact file still loads


def test_a_class_name_that_is_not_utf8_names_the_meta_file(tmp_path):
    """Before: a bare UnicodeDecodeError naming no file."""
    make_batches(tmp_path, per_batch=1)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(py2_pickle({b"label_names": [b"\xe9t\xe9"] + NAMES[1:]}))  # latin-1
    with pytest.raises(ValueError) as e:
        fd.cifar10(tmp_path, "test")
    assert str(e.value).startswith(
        f"{meta}: a 'label_names' entry is not UTF-8 text (b'\\xe9t\\xe9'"
    )
