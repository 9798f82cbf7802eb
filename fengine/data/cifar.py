"""CIFAR-10 from the python batches a user already has on disk; nothing is downloaded.

The batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``
in ``cifar-10-batches-py/``, from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)
are pickles, and unpickling an untrusted file can run arbitrary code. They are
therefore read with a restricted unpickler (:func:`load_batch`): it resolves
only the few globals numpy needs to rebuild an array (``numpy.ndarray``,
``numpy.dtype``, numpy's ``_reconstruct`` / ``_frombuffer``) and a latin-1-only
stand-in for ``_codecs.encode`` (how Python 3 writes bytes at protocol 2);
every other global (``os.system``, ``builtins.eval``, any class) is refused
before anything is called. Containers, numbers, strings and bytes need no
global. The loaded values are then checked (a dict, ``uint8`` rows of 3072,
labels in ``[0, 10)``). The restriction stops code execution, not a file built
to exhaust memory.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


__all__ = ["CIFAR10", "CIFAR10_MEAN", "CIFAR10_STD", "cifar10", "load_batch"]

# Per-channel mean and standard deviation of the 50000 training images scaled to [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
_TEST = ("test_batch",)
_META = "batches.meta"
_FOLDER = "cifar-10-batches-py"
_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to what pickle protocol 2 uses it for: str -> latin-1 bytes."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(
            f"_codecs.encode is allowed only as str -> latin1 bytes, got {type(text).__name__} "
            f"and {encoding!r}"
        )
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The only globals a CIFAR batch may name, mapped to the objects they stand for."""
    try:  # numpy >= 2 keeps these in numpy._core; older pickles name numpy.core
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    table: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # encoding="bytes": Python 2 str (the original batches) loads as bytes, as in the
        # dataset authors' own loading code.
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self.path}: refusing to load global {module}.{name}: a CIFAR-10 batch holds only "
                "dicts, lists, numbers, bytes and numpy uint8 arrays, so this file is not one "
                "(or was built to run code)"
            ) from None
        if isinstance(found, types.FunctionType):
            # a fresh stand-in per use: pickle's BUILD opcode sets attributes on what it gets
            # (a function's __defaults__), which would change this process's own function
            return lambda *args: found(*args)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.path}: refusing a persistent id ({pid!r})")


def _key(d: dict, name: str) -> Any:
    """``d[b'name']`` (the original Python 2 batches) or ``d['name']`` (re-saved ones)."""
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def load_batch(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One CIFAR pickle read with the restricted unpickler; keys decoded to ``str``.

    Raises ``pickle.UnpicklingError`` for a file that names any global beyond
    numpy's array reconstruction (see the module docstring), and ``ValueError`` for a
    truncated or corrupt file, or one with bytes after its pickle (a botched append
    or copy: the pickle alone would load as if nothing were wrong).
    """
    p = Path(path)
    with open(p, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, p).load()
        except pickle.UnpicklingError as e:
            if str(p) in str(e):  # the unpickler's own refusal names the file
                raise
            raise pickle.UnpicklingError(f"{p}: not a readable CIFAR-10 batch: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated (EOFError), empty, corrupt: any error
            raise ValueError(
                f"{p}: not a readable CIFAR-10 batch (truncated or corrupt?): "
                f"{type(e).__name__}: {e}"
            ) from None
        if f.read(1):  # the unpickler stops at its STOP opcode, leaving the file just after it
            trailing = p.stat().st_size - f.tell() + 1
            raise ValueError(
                f"{p}: {trailing} bytes follow the CIFAR-10 batch's pickle; expected the file to "
                "end there (appended to or copied over another file?)"
            )
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a dict (a CIFAR-10 batch), got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _folder(root: Path) -> Path:
    nested = root / _FOLDER
    return nested if nested.is_dir() else root


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"cifar10: missing {path}; expected the CIFAR-10 python batches "
            f"({', '.join(_TRAIN + _TEST)}, {_META}) in {folder} (the folder {_FOLDER}/ extracted "
            f"from {_URL}; `root` may be that folder or the one holding it). fengine never downloads."
        )
    return path


def _images_and_labels(path: Path, num_classes: int) -> tuple[np.ndarray, list[int]]:
    batch = load_batch(path)
    try:
        data, labels = _key(batch, "data"), _key(batch, "labels")
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r} entry; expected a CIFAR-10 batch") from None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must have 3072 columns (3x32x32), got {data.shape}")
    if not isinstance(labels, (list, tuple)) or len(labels) != data.shape[0]:
        raise ValueError(
            f"{path}: 'labels' must be a list of {data.shape[0]} ints (one per row of 'data')"
        )
    if not all(type(y) is int and 0 <= y < num_classes for y in labels):
        raise ValueError(f"{path}: 'labels' must be ints in [0, {num_classes})")
    return data, list(labels)


class CIFAR10(torch.utils.data.Dataset):
    """CIFAR-10 ``split`` (``"train"``: 50000 images, ``"test"``: 10000) read from ``root``.

    ``self[i]`` is ``(image, label)``: a float32 ``(3, 32, 32)`` RGB tensor and
    an ``int`` in ``[0, 10)``. The image is ``uint8 / 255``, then, with
    ``normalize`` (the default), ``(x - CIFAR10_MEAN[c]) / CIFAR10_STD[c]`` per
    channel. ``self.images`` (``uint8``, ``(N, 3, 32, 32)``) and ``self.labels``
    (``int64``) hold the raw data, in file order (batches 1..5); ``self.classes``
    the names from ``batches.meta``. Samples are converted one at a time, so the
    dataset keeps the 1-byte pixels in memory (150 MB for the training split).
    """

    def __init__(
        self, root: str | os.PathLike[str], split: str = "train", *, normalize: bool = True
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"cifar10: `split` must be 'train' or 'test', got {split!r}")
        folder = _folder(Path(root))
        names = _TRAIN if split == "train" else _TEST
        paths = [_require(folder, n) for n in names]
        meta_path = _require(folder, _META)
        meta = load_batch(meta_path)
        try:
            label_names = _key(meta, "label_names")
        except KeyError:
            raise ValueError(
                f"{meta_path}: no 'label_names' entry; expected CIFAR-10 metadata"
            ) from None
        if not isinstance(label_names, list) or len(label_names) != 10:
            raise ValueError(f"{meta_path}: 'label_names' must be a list of the 10 class names")
        try:
            self.classes = tuple(
                n.decode() if isinstance(n, bytes) else str(n) for n in label_names
            )
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{meta_path}: a 'label_names' entry is not UTF-8 text ({e.object!r:.60}: {e.reason})"
            ) from None
        parts = [_images_and_labels(p, len(self.classes)) for p in paths]
        data = np.concatenate([d for d, _ in parts])  # a fresh, writable copy
        self.images = torch.from_numpy(data).view(-1, 3, 32, 32)
        self.labels = torch.tensor([y for _, ys in parts for y in ys], dtype=torch.int64)
        self.split = split
        self.normalize = normalize
        self._mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        x = self.images[idx].to(torch.float32).div_(255.0)
        if self.normalize:
            x = x.sub_(self._mean).div_(self._std)
        return x, int(self.labels[idx])


def cifar10(
    root: str | os.PathLike[str], split: str = "train", *, normalize: bool = True
) -> CIFAR10:
    """CIFAR-10 from the python batches under ``root`` (see :class:`CIFAR10`); never downloads."""
    return CIFAR10(root, split, normalize=normalize)
