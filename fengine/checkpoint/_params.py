"""Weights only: `load_params` (from any checkpoint, safetensors or .pth file) and `publish`."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fengine.checkpoint._data import read_tensors, write_file
from fengine.checkpoint._format import (
    SUFFIX,
    CheckpointError,
    CheckpointMismatchError,
    Header,
    Info,
    err,
    foreign,
    listing,
    metadata,
    position,
    read_header,
    require_fengine,
    weight_keys,
)
from fengine.checkpoint._io import NotRegularFile, open_regular
from fengine.state import TrainState


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_params` did, by name (target names, after ``prefix_map``)."""

    source: Path
    format: (
        str  # "fengine" (training checkpoint), "fengine-params" (publish), "safetensors", "torch"
    )
    loaded: tuple[str, ...]
    missing: tuple[str, ...]  # in the target, not in the file
    unexpected: tuple[str, ...]  # in the file (after mapping), not in the target
    mismatched: tuple[
        tuple[str, tuple[int, ...], tuple[int, ...]], ...
    ]  # (name, file shape, target shape)
    skipped: tuple[
        str, ...
    ] = ()  # file names outside every prefix_map prefix (not loaded, not an error)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"load_params from {self.source} ({self.format}): {len(self.loaded)} loaded"]
        if self.missing:
            lines.append(listing("missing in the file", list(self.missing)))
        if self.unexpected:
            lines.append(listing("unexpected in the file", list(self.unexpected)))
        if self.mismatched:
            lines.append(
                listing(
                    "shape mismatch (file vs target)",
                    [f"{n}: {list(a)} vs {list(b)}" for n, a, b in self.mismatched],
                )
            )
        if self.skipped:
            lines.append(f"  skipped by prefix_map: {len(self.skipped)}")
        return "\n".join(lines)


# ======================================================================= load_params
def _strip_module(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def _check_zip_records(path: Path) -> None:
    """Check a zip-format ``.pth``'s records against their CRC-32s: ``torch.load`` does not, so a
    flipped bit in a weight loaded as a wrong value without a word. Legacy (pickle) files carry
    no checksums; `torch.load` reads them as they are."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:  # torch's compute_crc32=False: none stored
                    continue
                with z.open(info) as record:  # read to the end, its CRC-32 is checked
                    try:
                        while record.read(1 << 24):
                            pass
                    except zipfile.BadZipFile:
                        raise err(
                            path,
                            f"record {info.filename!r} fails its CRC-32 check: the file is damaged",
                        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read the archive means it is damaged
        raise err(path, f"damaged zip archive (torch .pth): {type(e).__name__}: {e}") from None


def _mmengine_live(obj: Mapping) -> Mapping:
    """The live weights of an MMEngine checkpoint its EMAHook wrote: ``before_save_checkpoint``
    swaps the averaged weights into ``state_dict`` (what deployment loads) and the live ones into
    ``ema_state_dict`` as ``module.<name>`` (``_swap_ema_state_dict``). Other files as they are."""
    sd, ema = obj.get("state_dict"), obj.get("ema_state_dict")
    if not isinstance(sd, Mapping) or not isinstance(ema, Mapping):
        return obj
    live = {k: ema.get(f"module.{k}", v) for k, v in sd.items()}
    return {**obj, "state_dict": live}


def _torch_state_dict(path: Path, weights: str = "eval") -> dict[str, torch.Tensor]:
    """A ``.pth`` file's state dict; ``weights="live"`` takes an MMEngine EMA checkpoint's live
    weights (`_mmengine_live`)."""
    _check_zip_records(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the caller
        raise err(
            path, f"cannot read as a torch checkpoint with torch.load(weights_only=True): {e}"
        ) from None
    if isinstance(obj, Mapping):
        if weights == "live":
            obj = _mmengine_live(obj)
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise err(path, f"holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for k, v in sd.items():
        if v.is_meta or v.layout != torch.strided:
            what = "a meta tensor (no data)" if v.is_meta else f"a {v.layout} tensor"
            raise err(path, f"{k[:200]!r} is {what}: only dense tensors with data can be loaded")
    return sd


@dataclasses.dataclass
class _Weights:
    """The weights a file offers, before matching them to a target."""

    format: str  # as in LoadReport
    sources: dict[str, str]  # name as the target sees it (before prefix_map) -> key in the file
    shapes: dict[str, tuple[int, ...]]  # key in the file -> shape
    header: Header | None = None  # safetensors files
    digest: dict | None = None  # fengine files
    torch_sd: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # .pth files


def _foreign(path: Path) -> bool:
    """Is ``path`` a torch/pickle file rather than safetensors? A safetensors file is told first
    (its 8-byte header length fits the file and the header opens with ``{``): a length of 640,
    896, 1152 or 1408 (mod 65536) starts with a pickle's bytes, about one file in 2048."""
    try:
        fd, st = open_regular(path)
    except (OSError, ValueError, NotRegularFile):
        return False  # read_header says what is wrong
    with os.fdopen(fd, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        if 8 + int.from_bytes(head[:8], "little") <= st.st_size:
            return False
    return foreign(head[:8]) is not None


def _train_state_names(info: Info, weights: str) -> dict[str, str]:
    """State-dict names of a training checkpoint's weights -> file keys (``fc1.weight`` -> ``params/fc1.weight``).

    ``weights="eval"`` takes the file's eval weights (`TrainState.eval_weights` at save
    time, e.g. EMA): its ``fengine.eval_weights`` entry maps names to other keys of the
    same file (checked by `require_fengine`).
    """
    names = weight_keys(info.structure)
    return names if weights == "live" else {**names, **info.eval_weights}


def _weights(path: Path, weights: str) -> _Weights:
    if _foreign(path):
        sd = _torch_state_dict(path, weights)
        sources: dict[str, str] = {}
        for k in sd:
            sources.setdefault(_strip_module(k), k)
        return _Weights("torch", sources, {k: tuple(v.shape) for k, v in sd.items()}, torch_sd=sd)

    h = read_header(path)
    w = _Weights("safetensors", {}, {n: tuple(h.table[n]["shape"]) for n in h.order}, header=h)
    if any(k.startswith("fengine.") for k in h.metadata):  # (a damaged format marker is an error)
        info = require_fengine(h)
        w.digest = info.digest
        if info.kind == "train_state":
            w.format, w.sources = "fengine", _train_state_names(info, weights)
            return w
        w.format = "fengine-params"
    for n in h.order:
        w.sources.setdefault(_strip_module(n), n)
    return w


def _rename(
    sources: dict[str, str], prefix_map: Mapping[str, str] | None, path: Path
) -> tuple[dict[str, str], list[str]]:
    """(target name -> file key, names skipped by ``prefix_map``)."""
    mapped: dict[str, str] = {}
    skipped = []
    for name, key in sources.items():
        if prefix_map:
            best = max((p for p in prefix_map if name.startswith(p)), key=len, default=None)
            if best is None:
                skipped.append(name)
                continue
            name = prefix_map[best] + name[len(best) :]
        if name in mapped:
            raise CheckpointError(
                f"{path}: prefix_map maps both {mapped[name]!r} and {key!r} to {name!r}"
            )
        mapped[name] = key
    return mapped, skipped


def load_params(
    path: str | os.PathLike,
    into: TrainState | nn.Module,
    *,
    prefix_map: Mapping[str, str] | None = None,
    strict: bool = False,
    weights: str = "eval",
    allow_empty: bool = False,
) -> tuple[TrainState | dict[str, torch.Tensor], LoadReport]:
    """Load weights (params and buffers) only: MMEngine's ``load_from`` / ``Pretrained`` init.

    ``path`` may be a fengine checkpoint (its eval weights: the EMA ones when the
    run kept an EMA, see `TrainState.eval_weights`; ``weights="live"`` for the
    trained ones), a published params file, a plain
    safetensors state dict, or a torch ``.pth`` state dict (read with
    ``weights_only=True``; a ``{'state_dict': ...}`` wrapper is unwrapped). An
    MMEngine checkpoint written with its EMAHook holds the EMA weights in
    ``state_dict`` and the trained ones in ``ema_state_dict``: ``weights="live"``
    takes those. The other files hold one set of weights, which either value loads.
    A leading ``module.`` (DataParallel) is stripped from every name.

    ``prefix_map`` renames by prefix, longest first: ``{'backbone.': ''}`` loads
    ``backbone.*`` into the target's top level; file names matching no prefix
    are skipped. Values are cast to the target's dtype and device. Returns
    ``(new_state, report)`` for a `TrainState` (other fields shared with
    ``into``), or ``(state_dict, report)`` for an ``nn.Module``: the module's
    full state dict with the loaded values in place, for
    ``module.load_state_dict``; the module itself is not modified. A tied
    tensor's other names (``head.weight`` tied to ``emb.weight``) take the
    value loaded under one of them (a fengine file names a tensor once).
    ``strict=True`` raises `CheckpointMismatchError` listing every missing,
    unexpected and shape-mismatched name. Loading nothing at all (no name of the
    file matches one of the target) raises `CheckpointError` listing some of
    both, unless ``allow_empty=True``.
    """
    path = Path(path)
    if isinstance(into, TrainState):
        targets = {**into.params, **into.buffers}
    elif isinstance(into, nn.Module):
        targets = dict(into.state_dict())
    else:
        raise TypeError(
            f"load_params: into must be a TrainState or an nn.Module, got {type(into).__name__}"
        )

    if weights not in ("eval", "live"):
        raise ValueError(f"load_params: weights must be 'eval' or 'live', got {weights!r}")
    w = _weights(path, weights)
    mapped, skipped = _rename(w.sources, prefix_map, path)
    loaded, mismatched, unexpected = [], [], []
    for name, key in mapped.items():
        if name not in targets:
            unexpected.append(name)
        elif w.shapes[key] != tuple(targets[name].shape):
            mismatched.append((name, w.shapes[key], tuple(targets[name].shape)))
        else:
            loaded.append(name)
    missing = [n for n in targets if n not in mapped]
    tied = _tied_to(into, set(loaded), set(missing)) if isinstance(into, nn.Module) else {}
    missing = [n for n in missing if n not in tied]
    report = LoadReport(
        path,
        w.format,
        (*loaded, *tied),
        tuple(missing),
        tuple(unexpected),
        tuple(mismatched),
        tuple(skipped),
    )
    if strict and not report.ok:
        raise CheckpointMismatchError(
            f"load_params(strict=True): {report}",
            missing=missing,
            unexpected=unexpected,
            shape=[(n, list(a), list(b)) for n, a, b in mismatched],
        )

    if not loaded and not allow_empty:
        raise _nothing_matched(path, w, mapped, targets, report)

    # fresh tensors from safetensors; torch.load's may share storage (tied weights), so copy those
    h = w.header
    data = read_tensors(h, {mapped[n] for n in loaded}, w.digest) if h is not None else w.torch_sd
    new: dict[str, torch.Tensor] = {}
    for name in loaded:
        src, tgt = data[mapped[name]], targets[name]
        if src.is_complex() and not tgt.is_complex():
            raise err(
                path,
                f"{mapped[name]!r} is {src.dtype} and {name!r} is {tgt.dtype}: the cast would drop "
                "the imaginary part",
            )
        t = src.to(
            device=tgt.device if tgt.device.type != "meta" else "cpu",
            dtype=tgt.dtype,
            copy=h is None,
        )
        if tgt.requires_grad:
            t = t.detach().requires_grad_(True)
        new[name] = t
    for alias, name in tied.items():
        new[alias] = new[name]  # the one tensor, under each of its names
    if isinstance(into, TrainState):
        params = {n: new.get(n, v) for n, v in into.params.items()}
        buffers = {n: new.get(n, v) for n, v in into.buffers.items()}
        extra = {k: _averaging_from(v, new) for k, v in into.extra.items()}
        return into.replace(params=params, buffers=buffers, extra=extra), report
    return {n: new.get(n, v) for n, v in targets.items()}, report


def _tied_to(module: nn.Module, loaded: set[str], missing: set[str]) -> dict[str, str]:
    """The ``missing`` names of a tied tensor -> a ``loaded`` name of the same tensor: a weight-tied
    model's state dict names the tensor twice (``head.weight`` is ``emb.weight``), a file once
    (`checkpoint.save`, `publish`, safetensors keep one name per tensor)."""
    groups: dict[int, list[str]] = {}
    for name, t in chain(
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    ):
        groups.setdefault(id(t), []).append(name)
    out = {}
    for names in groups.values():
        have = [n for n in names if n in loaded]
        out.update({n: have[0] for n in names if have and n in missing})
    return out


def _averaging_from(value: Any, new: dict[str, torch.Tensor]) -> Any:
    """An EMA/SWA state (`fengine.wrappers.ema.EmaState`) starting from the loaded weights, as
    MMEngine's EMAHook loads ``load_from`` into its averaged model (it kept the init's weights,
    so evaluating or publishing before the first update used them); other values as they are."""
    from fengine.wrappers.ema import EmaState

    if not isinstance(value, EmaState):
        return value
    copy = lambda d: {n: new[n].detach().clone() if n in new else t for n, t in d.items()}  # noqa: E731
    return value._replace(params=copy(value.params), buffers=copy(value.buffers))


def _nothing_matched(
    path: Path, w: _Weights, mapped: dict[str, str], targets: dict, report: LoadReport
) -> CheckpointError:
    def some(names) -> str:
        names = list(names)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        return f"{len(names)} ({', '.join(names[:5]) + more})" if names else "none"

    notes = ""
    if report.mismatched:
        notes += f"; {some(m[0] for m in report.mismatched)} match by name but not by shape"
    if report.skipped:
        notes += f"; prefix_map skipped {len(report.skipped)}"
    if w.format == "safetensors" and any(n.startswith(("params/", "opt_state/")) for n in w.shapes):
        notes += (
            "; its names look like a fengine training checkpoint's, but it has no fengine "
            "metadata (stripped or damaged)"
        )
    return err(
        path,
        f"load_params loaded nothing: the file's weights are {some(mapped or w.sources)}, "
        f"the target's {some(targets)}{notes}; use prefix_map to rename, or allow_empty=True "
        "to accept loading nothing",
    )


# ======================================================================= publish
def publish(
    state: TrainState,
    path_stem: str | os.PathLike,
    *,
    weights: str = "eval",
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the weights only to ``{stem}-{sha256[:8]}.safetensors``; returns that path.

    MMEngine's published checkpoint: no optimizer state, the name carries the
    first 8 hex digits of the file's SHA-256. Names are plain state-dict names
    (``fc1.weight``), so ``safetensors.torch.load_file`` gives a dict for
    ``module.load_state_dict``; `load_params` reads it too. The weights are
    `TrainState.eval_weights` (the EMA ones when the step keeps an EMA), or the
    trained ones with ``weights="live"``.
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"publish: expected a TrainState, got {type(state).__name__}")
    if weights not in ("eval", "live"):
        raise ValueError(f"publish: weights must be 'eval' or 'live', got {weights!r}")
    pos = position(state)
    params, buffers = state.eval_weights() if weights == "eval" else (state.params, state.buffers)
    stem = Path(path_stem)
    if stem.name.endswith(SUFFIX):
        stem = stem.with_name(stem.name[: -len(SUFFIX)])
    return write_file(
        stem.with_name(stem.name + SUFFIX),
        list({**params, **buffers}.items()),
        metadata("params", pos, meta),
        name_by_sha256=lambda sha: stem.with_name(f"{stem.name}-{sha[:8]}{SUFFIX}"),
    )
