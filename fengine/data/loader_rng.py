"""The random state a plain ``torch.utils.data.DataLoader`` draws its order from, carried across a resume.

fengine's own `Loader` derives its order from (seed, epoch), so a resume needs no RNG state.
A DataLoader draws each pass's base seed and its ``RandomSampler``'s permutation from torch
generators: its ``generator`` (and its sampler's), or torch's global CPU generator when it has
none; the global one is also drawn by every validation pass over a DataLoader. A dataset whose
``__getitem__`` draws random numbers itself draws, when the main process loads
(``num_workers=0``), from torch's, numpy's and Python's global generators (workers are seeded
from the pass's base seed). `LoaderRng`
records those generators' states where each pass over the training data begins and when a
checkpoint is written (it is a handler, so the record travels in the checkpoint's handler
state), and on resume puts them back: the pass the checkpoint is in draws its order again from
the state it began with, and once it has skipped to the checkpoint's batch the generators
continue from the state they had at the save. The uninterrupted run's draws, bit for bit.
"""

from __future__ import annotations

import base64
import random
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from fengine.events import Handler


__all__ = ["LoaderRng"]


class _NumpyGlobal:
    """numpy's global generator (``np.random.seed``'s), its state as bytes like a torch one's."""

    _MT = struct.Struct("<624Iiid")  # key, pos, has_gauss, cached_gaussian

    def get_state(self) -> torch.Tensor:
        state: Any = np.random.get_state()  # the legacy tuple (typed as a union with a dict)
        _, key, pos, has_gauss, cached = state
        return _as_bytes(self._MT.pack(*key.tolist(), pos, has_gauss, cached))

    @classmethod
    def _tuple(cls, state: torch.Tensor) -> tuple:
        *key, pos, has_gauss, cached = cls._MT.unpack(state.numpy().tobytes())
        return ("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, cached)

    def set_state(self, state: torch.Tensor) -> None:
        np.random.set_state(self._tuple(state))

    @classmethod
    def check(cls, state: torch.Tensor) -> None:
        _, _, pos, has_gauss, _ = cls._tuple(state)
        if not 0 <= pos <= 624 or has_gauss not in (0, 1):  # numpy reads key[pos] unchecked
            raise ValueError(f"position {pos} (0..624), has_gauss {has_gauss} (0 or 1)")
        np.random.RandomState().set_state(cls._tuple(state))  # numpy's own check


class _PythonGlobal:
    """Python's global ``random`` generator, its state as bytes like a torch one's."""

    _MT = struct.Struct("<625I?d")  # key and position, has a cached gauss, the cached gauss

    def get_state(self) -> torch.Tensor:
        version, internal, gauss = random.getstate()
        assert version == 3, f"random.getstate() version {version}"
        return _as_bytes(self._MT.pack(*internal, gauss is not None, gauss or 0.0))

    @classmethod
    def _tuple(cls, state: torch.Tensor) -> tuple:
        *internal, has_gauss, gauss = cls._MT.unpack(state.numpy().tobytes())
        return (3, tuple(internal), gauss if has_gauss else None)

    def set_state(self, state: torch.Tensor) -> None:
        random.setstate(self._tuple(state))

    @classmethod
    def check(cls, state: torch.Tensor) -> None:
        random.Random().setstate(cls._tuple(state))  # Python's own check


def _as_bytes(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


# a dataset's __getitem__ in the main process (num_workers=0) draws from these too; records
# written before they were carried lack them, and resume with the torch generators alone
_GLOBALS: dict[str, type[_NumpyGlobal] | type[_PythonGlobal]] = {
    "numpy": _NumpyGlobal,
    "random": _PythonGlobal,
}


def _generators(data: Any) -> dict[str, Any]:
    """The distinct CPU generators a DataLoader's passes draw from, by where they are found
    (torch's; numpy's and Python's global ones, which a dataset's own draws use when the main
    process loads)."""
    found: dict[str, Any] = {"torch": torch.default_generator}
    found.update({name: kind() for name, kind in _GLOBALS.items()})
    places = {
        "loader": getattr(data, "generator", None),
        "sampler": getattr(getattr(data, "sampler", None), "generator", None),
        "batch_sampler.sampler": getattr(
            getattr(getattr(data, "batch_sampler", None), "sampler", None), "generator", None
        ),
    }
    for name, g in places.items():
        if isinstance(g, torch.Generator) and all(g is not h for h in found.values()):
            found[name] = g
    return found


def persistent_workers_note(data: Any) -> str | None:
    """Why a resume over ``data`` may not be exact, or None: a DataLoader's persistent workers
    keep their random state (seeded once, at the first pass) in the worker processes, which no
    checkpoint holds; a resume past the first pass re-seeds them."""
    if isinstance(data, DataLoader) and data.persistent_workers and data.num_workers > 0:
        return (
            "the training DataLoader has persistent_workers=True: its workers' random state lives "
            "in their processes, so a resume after the first pass is exact only if the dataset "
            "draws no random numbers (augmentation); persistent_workers=False or "
            "fengine.data.Loader resume exactly"
        )
    return None


def _encode(states: Mapping[str, torch.Tensor]) -> dict[str, str]:
    return {k: base64.b64encode(v.numpy().tobytes()).decode("ascii") for k, v in states.items()}


class LoaderRng(Handler):
    """Records and restores a DataLoader's generator states (see the module). ``fit`` adds one for
    a ``torch.utils.data.DataLoader`` in a single-process run; it does nothing for other data."""

    name = "data_rng"

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.generators = _generators(data) if isinstance(data, DataLoader) else {}
        self.pass_start: dict[str, torch.Tensor] | None = None
        self._resumed_start: dict[str, torch.Tensor] | None = None  # the resumed pass's
        self._continue: dict[str, torch.Tensor] | None = None  # where to go on after its skip

    def _states(self) -> dict[str, torch.Tensor]:
        return {k: g.get_state() for k, g in self.generators.items()}

    def _set(self, states: Mapping[str, torch.Tensor]) -> None:
        for k, state in states.items():
            self.generators[k].set_state(state)

    def before_pass(self, mid_pass: bool) -> None:
        """A pass over the training data begins (``mid_pass``: a resumed one, at the checkpoint's
        batch): the pass a checkpoint was in draws its order from the state it began with."""
        if not self.generators:
            return
        if self._resumed_start is not None and mid_pass:
            self._continue = self._states()  # the save's (and any validation's draws since)
            self._set(self._resumed_start)
        self._resumed_start = None
        self.pass_start = self._states()

    def after_skip(self) -> None:
        """The resumed pass has drawn its order and skipped to the checkpoint's batch, which is
        not loaded yet: the generators go on from where the checkpointed run had them (the
        draws of that batch's loading, a sampler's, ``__getitem__``'s, are made again)."""
        if self._continue is not None:
            self._set(self._continue)
            self._continue = None

    def state_dict(self) -> dict[str, Any]:
        if not self.generators or self.pass_start is None:
            return {}
        return {"pass_start": _encode(self.pass_start), "at_save": _encode(self._states())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the record (an untrusted file's) against this run's generators and put the
        save's states back; the pass's start is used when that pass is resumed (`before_pass`)."""
        if not self.generators:
            return
        if not isinstance(state, Mapping):
            raise ValueError(f"data_rng state is a {type(state).__name__}, expected a dict")
        decoded = []
        for when in ("pass_start", "at_save"):
            record = state.get(when)
            if not isinstance(record, Mapping) or not (
                set(self.generators) - set(_GLOBALS) <= set(record) <= set(self.generators)
            ):
                raise ValueError(
                    f"data_rng {when} records generators {_keys(record)}; this DataLoader draws "
                    f"from {sorted(self.generators)} (resume with the same DataLoader setup)"
                )
            decoded.append({k: self._decode(k, v, when) for k, v in record.items()})
        self._resumed_start = decoded[0]
        self._set(decoded[1])  # now: a validation the resume runs first draws as the run did

    def _decode(self, name: str, text: Any, when: str) -> torch.Tensor:
        size = self.generators[name].get_state().numel()
        try:
            raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != size:
            raise ValueError(
                f"data_rng {when}[{name!r}] must be the base64 of a {size}-byte generator state"
            )
        state = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        kind = _GLOBALS.get(name)
        try:
            if kind is not None:
                kind.check(state)
            else:
                torch.Generator().set_state(state)  # torch's own check of the state's fields
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"data_rng {when}[{name!r}] is not a generator state: {e}") from None
        return state


def _keys(record: Any) -> list[str] | str:
    return sorted(map(str, record)) if isinstance(record, Mapping) else type(record).__name__
