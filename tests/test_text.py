"""fengine.data.text against an independent reading of the stdlib files, Python's own string
functions (sorted(set(...)), str.index, hashlib) and hand-sliced blocks."""

from __future__ import annotations

import hashlib
import platform
import sysconfig
import time
from pathlib import Path

import pytest
import torch

import fengine.data as fd


@pytest.fixture(scope="module")
def corpus():
    return fd.stdlib_corpus()


def test_stdlib_corpus_is_the_listed_files_concatenated(corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = ""
    for name in corpus.files:
        with open(root / name, encoding="utf-8", newline="") as f:
            expected += f.read() + "\n"
    assert len(expected) >= 1_000_000  # the default size is reached on this Python
    assert corpus.text == expected[:1_000_000]
    assert (
        list(corpus.files)
        == [n for n in fd.STDLIB_FILES if (root / n).is_file()][: len(corpus.files)]
    )
    assert list(fd.STDLIB_FILES) == sorted(fd.STDLIB_FILES)
    assert corpus.python_version == platform.python_version()
    assert corpus.sha256 == hashlib.sha256(expected[:1_000_000].encode()).hexdigest()


def test_stdlib_corpus_is_deterministic_and_sized(corpus):
    again = fd.stdlib_corpus()
    assert again.sha256 == corpus.sha256 and again.text == corpus.text
    assert torch.equal(again.ids, corpus.ids)
    small = fd.stdlib_corpus(max_chars=5000)
    assert small.text == corpus.text[:5000] and small.files == corpus.files[:1]


def test_vocab_encode_decode_by_hand(corpus):
    assert corpus.vocab == "".join(sorted(set(corpus.text)))
    assert corpus.vocab_size == len(set(corpus.text))
    head = corpus.text[:2000]
    assert corpus.ids[:2000].tolist() == [corpus.vocab.index(c) for c in head]
    assert corpus.ids.dtype == torch.int64 and corpus.ids.numel() == len(corpus.text)
    assert corpus.decode(corpus.ids) == corpus.text
    assert corpus.decode([corpus.vocab.index("d"), corpus.vocab.index("e")]) == "de"
    with pytest.raises(TypeError, match=r"CharCorpus.decode: ids must be ints, got 1.0"):
        corpus.decode([1.0])  # was "string indices must be integers"
    assert torch.equal(
        corpus.encode("def "), corpus.ids.new_tensor([corpus.vocab.index(c) for c in "def "])
    )
    assert corpus.encode("").numel() == 0


def test_any_text_including_astral_characters():
    c = fd.char_corpus("héllo wörld 🙂 \x00")
    assert c.vocab == "".join(sorted(set("héllo wörld 🙂 \x00")))
    assert c.decode(c.encode("🙂 hé")) == "🙂 hé"
    assert c.python_version == "" and c.files == ()
    with pytest.raises(ValueError, match=r"character 'z' at position 2 is not in the vocabulary"):
        c.encode("hlz")
    with pytest.raises(ValueError, match="character '\U0001f600' at position 0"):
        c.encode("\U0001f600")  # beyond the largest code point in the vocabulary
    with pytest.raises(ValueError, match=r"id 11 is outside the vocabulary \[0, 11\)"):
        c.decode([0, 11])
    with pytest.raises(ValueError, match="`text` is empty"):
        fd.char_corpus("")


@pytest.mark.parametrize("stride", [None, 3])
def test_blocks_are_shifted_windows_split_by_position(stride):
    c = fd.char_corpus("abcdefghijklmnopqrstuvwxyz" * 4)  # 104 characters
    b = 8
    train, val = c.split("train", 0.25), c.split("val", 0.25)
    assert train.numel() == 78 and val.numel() == 26
    assert torch.equal(torch.cat([train, val]), c.ids)
    for part, name in ((train, "train"), (val, "val")):
        ds = c.blocks(b, name, val_fraction=0.25, stride=stride)
        s = b if stride is None else stride
        assert len(ds) == (part.numel() - b - 1) // s + 1
        for i in range(len(ds)):
            x, y = ds[i]
            assert torch.equal(x, part[i * s : i * s + b])
            assert torch.equal(y, part[i * s + 1 : i * s + b + 1])
    x, y = c.blocks(4)[0]
    assert c.decode(x) == "abcd" and c.decode(y) == "bcde"


def test_blocks_through_the_loader_resume_by_position(corpus):
    ds = corpus.blocks(64, "val")
    loader = fd.Loader(ds, 16, seed=4)
    full = list(loader.epoch(3))
    for (x, y), (rx, ry) in zip(loader.epoch(3, start_batch=5), full[5:], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    order = fd.epoch_indices(len(ds), seed=4, epoch=3)[:16]
    assert torch.equal(full[0][0], torch.stack([ds[i][0] for i in order]))


def test_text_errors_name_the_argument():
    c = fd.char_corpus("abcdefghij")
    with pytest.raises(ValueError, match="`block_size` must be an int >= 1, got 0"):
        c.blocks(0)
    with pytest.raises(ValueError, match="`stride` must be an int >= 1, got 0"):
        c.blocks(2, stride=0)
    with pytest.raises(
        ValueError, match=r"the 'val' split has 1 characters, fewer than block_size \+ 1 = 3"
    ):
        c.blocks(2, "val")
    with pytest.raises(ValueError, match="`split` must be 'train' or 'val', got 'test'"):
        c.blocks(2, "test")
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \(0, 1\), got 1.0"):
        c.split("val", 1.0)
    with pytest.raises(ValueError, match="`max_chars` must be an int >= 1, got 0"):
        fd.stdlib_corpus(0)
    with pytest.raises(FileNotFoundError, match="none of the 1 listed files"):
        fd.stdlib_corpus(files=["no_such_module.py"])
    with pytest.raises(TypeError, match="`files` must be a sequence of names, got 'argparse.py'"):
        fd.stdlib_corpus(files="argparse.py")  # its characters were taken as 11 file names


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"stdlib_corpus: {latin1} is not UTF-8 text"):
        fd.stdlib_corpus(files=[str(latin1)])  # an absolute name: read where it is


def test_default_corpus_builds_quickly():
    t0 = time.perf_counter()
    fd.stdlib_corpus()
    # < 1 s on an idle 2-core machine (measured ~0.1 s); generous for a shared CI machine
    assert time.perf_counter() - t0 < 5.0
