"""A character-level text corpus from text that ships with Python: the standard library's sources.

Nothing is downloaded: :func:`stdlib_corpus` concatenates a fixed, sorted list
of the stdlib's ``.py`` files (found via ``sysconfig.get_paths()['stdlib']``),
so the corpus is the same on every run of the same Python version; it records
that version and the SHA-256 of the text so a run can say what it trained on.
:meth:`CharCorpus.blocks` cuts it into ``(input, target)`` blocks for
next-character prediction, a ``TensorDataset`` that
:class:`~fengine.data.Loader` batches with one gather per tensor.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import TensorDataset


__all__ = ["STDLIB_FILES", "CharCorpus", "char_corpus", "stdlib_corpus"]

# Modules present as plain .py files from Python 3.10 on (none of them became a package);
# read in this order, each followed by a newline.
STDLIB_FILES: tuple[str, ...] = tuple(
    sorted(
        [
            "argparse.py",
            "ast.py",
            "base64.py",
            "bisect.py",
            "calendar.py",
            "collections/__init__.py",
            "configparser.py",
            "contextlib.py",
            "copy.py",
            "csv.py",
            "dataclasses.py",
            "difflib.py",
            "enum.py",
            "fractions.py",
            "functools.py",
            "gzip.py",
            "heapq.py",
            "inspect.py",
            "ipaddress.py",
            "json/decoder.py",
            "json/encoder.py",
            "logging/__init__.py",
            "operator.py",
            "pprint.py",
            "queue.py",
            "random.py",
            "shlex.py",
            "shutil.py",
            "statistics.py",
            "string.py",
            "tarfile.py",
            "textwrap.py",
            "threading.py",
            "tokenize.py",
            "typing.py",
            "weakref.py",
        ]
    )
)


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """A text, its vocabulary (the sorted distinct characters) and the text encoded as ids.

    Attributes:
        text: the corpus.
        vocab: every character of ``text`` once, sorted by code point; id ``i`` is ``vocab[i]``.
        ids: ``text`` encoded, int64 of ``len(text)``.
        sha256: hex SHA-256 of ``text`` (UTF-8): the corpus's identity.
        python_version: the Python whose stdlib was read (``""`` for other text).
        files: the stdlib files read, in order (empty for other text).
    """

    text: str
    python_version: str = ""
    files: tuple[str, ...] = ()
    vocab: str = field(init=False)
    sha256: str = field(init=False)
    ids: torch.Tensor = field(init=False, repr=False)
    _lut: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.text:
            raise ValueError("CharCorpus: `text` is empty; expected at least one character")
        vocab = "".join(sorted(set(self.text)))  # by code point (faster than torch.unique here)
        unique = _code_points(vocab)
        lut = torch.full((int(unique[-1]) + 1,), -1, dtype=torch.int64)
        lut[unique] = torch.arange(unique.numel())
        set_ = object.__setattr__  # frozen: fill the derived fields once
        set_(self, "vocab", vocab)
        set_(self, "sha256", hashlib.sha256(self.text.encode("utf-8")).hexdigest())
        set_(self, "_lut", lut)
        set_(self, "ids", lut[_code_points(self.text)])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> torch.Tensor:
        """``s`` as an int64 tensor of vocabulary ids; a character outside the vocabulary is an error."""
        if not s:
            return torch.empty(0, dtype=torch.int64)
        points = _code_points(s)
        known = points < self._lut.numel()
        ids = torch.where(known, self._lut[points.clamp(max=self._lut.numel() - 1)], -1)
        bad = (ids < 0).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"CharCorpus.encode: character {s[i]!r} at position {i} is not in the "
                f"vocabulary ({self.vocab_size} characters)"
            )
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of vocabulary ids (a 1-D tensor or a sequence of ints)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if isinstance(ids, torch.Tensor) and ids.dim() != 1:
            raise ValueError(f"CharCorpus.decode: expected 1-D ids, got shape {tuple(ids.shape)}")
        n = self.vocab_size
        for i in values:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"CharCorpus.decode: ids must be ints, got {i!r}")
            if not 0 <= i < n:
                raise ValueError(f"CharCorpus.decode: id {i} is outside the vocabulary [0, {n})")
        return "".join(self.vocab[i] for i in values)

    def split(self, split: str = "train", val_fraction: float = 0.1) -> torch.Tensor:
        """The ids of ``split``: the first ``1 - val_fraction`` of the text is ``"train"``, the rest ``"val"``."""
        if split not in ("train", "val"):
            raise ValueError(f"CharCorpus: `split` must be 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"CharCorpus: `val_fraction` must be in (0, 1), got {val_fraction}")
        n_train = self.ids.numel() - round(self.ids.numel() * val_fraction)
        return self.ids[:n_train] if split == "train" else self.ids[n_train:]

    def blocks(
        self,
        block_size: int,
        split: str = "train",
        *,
        val_fraction: float = 0.1,
        stride: int | None = None,
    ) -> TensorDataset:
        """``(input, target)`` int64 blocks of ``block_size`` from ``split``, target = input shifted by one.

        Block ``i`` starts at character ``i * stride`` of the split (``stride``
        defaults to ``block_size``: non-overlapping blocks) and covers
        ``block_size + 1`` characters; an incomplete last block is dropped. The
        blocks are views of :attr:`ids` (no copy until batched).
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(
                f"CharCorpus.blocks: `block_size` must be an int >= 1, got {block_size!r}"
            )
        stride = block_size if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"CharCorpus.blocks: `stride` must be an int >= 1, got {stride!r}")
        part = self.split(split, val_fraction)
        if part.numel() < block_size + 1:
            raise ValueError(
                f"CharCorpus.blocks: the {split!r} split has {part.numel()} characters, fewer than "
                f"block_size + 1 = {block_size + 1}; lower `block_size` or use more text"
            )
        windows = part.unfold(0, block_size + 1, stride)
        return TensorDataset(windows[:, :-1], windows[:, 1:])


def _code_points(s: str) -> torch.Tensor:
    """The Unicode code points of ``s`` as int64 (through UTF-32, without a Python loop)."""
    raw = bytearray(s.encode("utf-32-le"))
    return torch.frombuffer(raw, dtype=torch.int32).to(torch.int64)


def char_corpus(text: str) -> CharCorpus:
    """A :class:`CharCorpus` of any text (e.g. a file the user reads)."""
    return CharCorpus(text)


def stdlib_corpus(max_chars: int = 1_000_000, files: Sequence[str] = STDLIB_FILES) -> CharCorpus:
    """The first ``max_chars`` characters of the concatenated stdlib ``files`` (~1 MB by default).

    Files are read as UTF-8 in the given order, each followed by ``"\\n"``;
    a listed file this Python lacks is skipped (``corpus.files`` lists those
    read). Same Python version, same arguments: the same text (compare
    ``corpus.sha256``).
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"stdlib_corpus: `max_chars` must be an int >= 1, got {max_chars!r}")
    if isinstance(files, (str, bytes)):  # its characters would be taken as file names
        raise TypeError(f"stdlib_corpus: `files` must be a sequence of names, got {files!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces: list[str] = []
    used: list[str] = []
    total = 0
    for name in files:
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8") + "\n"
        except UnicodeDecodeError as e:
            raise ValueError(f"stdlib_corpus: {path} is not UTF-8 text: {e}") from None
        pieces.append(text)
        used.append(name)
        total += len(text)
        if total >= max_chars:
            break
    if not pieces:
        raise FileNotFoundError(
            f"stdlib_corpus: none of the {len(files)} listed files is under {root} (a Python "
            "without its .py sources?); build a corpus from other text with char_corpus(text)"
        )
    return CharCorpus(
        "".join(pieces)[:max_chars], python_version=platform.python_version(), files=tuple(used)
    )
