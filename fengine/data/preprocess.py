"""Batch preprocessing on the device, in the spirit of MMEngine's ``ImgDataPreprocessor``.

Images travel as ``uint8`` (4x fewer bytes than float32) and are converted and
normalised after the transfer. Batch-level augmentation (MixUp, CutMix) runs
only in training and draws from a generator the caller passes in, so it is
replayable from the run's seed like everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from fengine.checks import check_bool
from fengine.devices import move_leaf


__all__ = ["ImagePreprocessor", "to_device"]

BatchAugment = Callable[[Any, torch.Generator], Any]


def _rebuild(template: Any, items: Any) -> Any:
    """A container of ``template``'s type holding ``items`` (named tuples, tuples, lists)."""
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*items)
    try:
        return type(template)(items)
    except TypeError:
        return list(items) if isinstance(template, list) else tuple(items)


def _rebuild_mapping(template: Mapping, items: dict) -> Mapping:
    """A mapping of ``template``'s type holding ``items`` (a plain dict if that type cannot be built)."""
    mapping_type: Any = type(
        template
    )  # concrete mappings take a dict (Mapping itself declares no arguments)
    try:
        return mapping_type(items)
    except TypeError:
        return items


def to_device(tree: Any, device: torch.device | str | None, *, non_blocking: bool = True) -> Any:
    """Move every tensor in a nested dict/list/tuple to ``device``; keep the structure and its types.

    ``device=None`` leaves tensors where they are. Other leaves with a ``.to`` method (MMEngine's
    ``BaseDataElement`` data samples) are moved by it, as MMEngine's ``cast_data`` does; the rest
    (strings, numbers, metadata) pass through. ``non_blocking`` overlaps host-to-device
    copies with compute when the source is pinned.
    """
    if device is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=non_blocking)
    if isinstance(tree, Mapping):
        return _rebuild_mapping(
            tree, {k: to_device(v, device, non_blocking=non_blocking) for k, v in tree.items()}
        )
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [to_device(v, device, non_blocking=non_blocking) for v in tree])
    return move_leaf(tree, device, non_blocking)


def _many_alike(batch: Sequence[Any]) -> bool:
    """More than two tensors of one shape (C, H, W): images, not (image, target) fields."""
    return (
        len(batch) > 2
        and all(isinstance(x, torch.Tensor) and x.dim() == 3 for x in batch)
        and len({x.shape for x in batch}) == 1
    )


def _padded_size(images: list[torch.Tensor], divisor: int) -> tuple[int, int] | None:
    """The (H, W) a list of (C, H, W) images is padded to (the largest, rounded up to
    ``divisor``), or None when they are all that size already (stacked as they are)."""
    if not images:
        raise ValueError("ImagePreprocessor: the batch holds no images (an empty list)")
    shapes = [tuple(i.shape) for i in images]
    if len({len(s) for s in shapes}) > 1 or len(shapes[0]) < 2 or len({s[:-2] for s in shapes}) > 1:
        raise ValueError(
            "ImagePreprocessor: a list of images must agree on every dimension but height and "
            f"width (they are padded to the largest), got shapes {shapes}"
        )
    target = tuple(math.ceil(max(s[d] for s in shapes) / divisor) * divisor for d in (-2, -1))
    return None if all(s[-2:] == target for s in shapes) else (target[0], target[1])


def _pad_to(x: torch.Tensor, size: tuple[int, ...], value: float) -> torch.Tensor:
    """``x`` padded at the bottom and right to height and width ``size``."""
    return F.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]), value=value)


ALL = "all"  # ImagePreprocessor(inputs=ALL): the batch is a sequence of images


class ImagePreprocessor:
    """``pre(batch, training, generator=None) -> batch``: to device, to float, normalise, augment.

    Steps, in order: move every tensor of ``batch`` to ``device`` (as it is,
    usually ``uint8``); optionally reverse the image's 3 channels (``bgr_to_rgb`` or
    ``rgb_to_bgr``); optionally switch the image to ``channels_last``; convert
    it to ``dtype``; normalise with ``(x - mean) / std`` per channel (MMEngine's
    formula, so results match ``ImgDataPreprocessor`` bitwise); then, only when
    ``training``, apply ``augment(batch, generator)``.

    The image is ``batch`` itself when it is a tensor, ``batch[inputs]`` otherwise;
    ``inputs`` defaults to ``"inputs"`` for mappings (MMEngine's key) and ``0``
    for sequences (``(image, label)`` batches). A list of images (from ``pseudo_collate``)
    is stacked, each padded at the bottom and right to the largest height and width
    (rounded up to ``pad_size_divisor``) with ``pad_value`` after normalising, as MMEngine's
    ``stack_batch``; a stacked 4-D batch is padded to ``pad_size_divisor`` the same way.
    Other entries are only moved. A batch that is itself
    a sequence of more than two equally shaped ``(C, H, W)`` tensors (``pseudo_collate`` over
    bare images) is refused unless ``inputs`` is given: it is no ``(image, label)`` pair;
    ``inputs="all"`` takes such a batch as the images (stacked).

    Args:
        mean, std: per-channel (or one shared) statistics in the input's units,
            e.g. ``[127.5]`` and ``[127.5]`` map ``uint8`` to [-1, 1]; both or neither.
        device: where tensors go (``None``: stay put).
        channels_last: return 4-D images in ``torch.channels_last`` memory format.
        non_blocking: asynchronous host-to-device copies.
        augment: ``augment(batch, generator) -> batch``, batch augmentation for training.
        inputs: key or position of the image in the batch, or ``"all"``: the batch is a
            sequence of images (see above).
        dtype: floating dtype of the image after conversion.
        pad_size_divisor: pad height and width to a multiple of it (MMEngine's default 1:
            only to the largest image of a list).
        pad_value: the value of the padding, in normalised units (MMEngine's default 0).
        bgr_to_rgb, rgb_to_bgr: reverse the channels of a 3-channel image before the float
            conversion (MMEngine's flags: one or the other; ``mean``/``std`` are then in the
            converted order).
    """

    def __init__(
        self,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        device: torch.device | str | None = None,
        channels_last: bool = False,
        non_blocking: bool = True,
        augment: BatchAugment | None = None,
        inputs: str | int | None = None,
        dtype: torch.dtype = torch.float32,
        pad_size_divisor: int = 1,
        pad_value: float = 0.0,
        bgr_to_rgb: bool = False,
        rgb_to_bgr: bool = False,
    ) -> None:
        check_bool("ImagePreprocessor", "bgr_to_rgb", bgr_to_rgb)
        check_bool("ImagePreprocessor", "rgb_to_bgr", rgb_to_bgr)
        if bgr_to_rgb and rgb_to_bgr:
            raise ValueError(
                "ImagePreprocessor: `bgr_to_rgb` and `rgb_to_bgr` cannot both be True (each "
                "reverses the channels; set the one that names your input's order)"
            )
        if (
            isinstance(pad_size_divisor, bool)
            or not isinstance(pad_size_divisor, int)
            or pad_size_divisor < 1
        ):
            raise ValueError(
                f"ImagePreprocessor: `pad_size_divisor` must be an int >= 1, got {pad_size_divisor!r}"
            )
        if (mean is None) != (std is None):
            raise ValueError("ImagePreprocessor: give both `mean` and `std`, or neither")
        if mean is not None and std is not None:
            if len(mean) != len(std) or len(mean) == 0:
                raise ValueError(
                    f"ImagePreprocessor: `mean` and `std` must have the same non-zero length, "
                    f"got {len(mean)} and {len(std)}"
                )
            if any(s == 0 for s in std):
                raise ValueError(f"ImagePreprocessor: `std` must not contain 0, got {list(std)}")
        if not dtype.is_floating_point:
            raise ValueError(f"ImagePreprocessor: `dtype` must be floating, got {dtype}")
        self._mean = (
            None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        )
        self._std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.device = None if device is None else torch.device(device)
        self.channels_last = channels_last
        self.non_blocking = non_blocking
        self.augment = augment
        self.inputs = inputs
        self.dtype = dtype
        self.pad_size_divisor, self.pad_value = pad_size_divisor, float(pad_value)
        self.flip_channels = bgr_to_rgb or rgb_to_bgr
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats_on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean/std on ``x``'s device and dtype, copied there once and cached."""
        key = (x.device, x.dtype)
        if key not in self._stats:
            assert self._mean is not None and self._std is not None
            self._stats[key] = (self._mean.to(x.device, x.dtype), self._std.to(x.device, x.dtype))
        return self._stats[key]

    def process_image(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Convert, normalise and pad one (already moved) image batch."""
        if not isinstance(x, torch.Tensor):
            images = list(x)
            target = _padded_size(images, self.pad_size_divisor)
            if target is not None:  # unequal sizes: normalised one by one, then padded
                x = torch.stack(
                    [
                        _pad_to(self._normalise(self._flip(i)), target, self.pad_value)
                        for i in images
                    ]
                )
                return self._memory_format(x)
            x = torch.stack(images)
        # flip and channels_last before .to(float): fewer bytes
        x = self._normalise(self._memory_format(self._flip(x)))
        if self.pad_size_divisor > 1 and x.dim() == 4:
            div = self.pad_size_divisor
            size = tuple(math.ceil(n / div) * div for n in x.shape[-2:])
            if size != tuple(x.shape[-2:]):
                x = self._memory_format(_pad_to(x, size, self.pad_value))
        return x

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """BGR <-> RGB when asked: the 3 channels reversed (MMEngine's ``x[:, [2, 1, 0]]``)."""
        if not self.flip_channels:
            return x
        if x.dim() < 3 or x.shape[-3] != 3:
            raise ValueError(
                f"ImagePreprocessor: bgr_to_rgb/rgb_to_bgr reverse 3 channels, but the image has "
                f"shape {tuple(x.shape)} (expected (..., 3, H, W))"
            )
        return x.flip(-3)

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self._mean is not None:
            mean, std = self._stats_on(x)
            channels = mean.shape[0]
            if x.dim() < 3 or (channels > 1 and x.shape[-3] != channels):
                raise ValueError(
                    f"ImagePreprocessor: mean/std have {channels} channels but the image has "
                    f"shape {tuple(x.shape)} (expected (..., {channels}, H, W))"
                )
            x = (x - mean) / std
        return x

    def _image_slot(self, batch: Any) -> str | int | None:
        if isinstance(batch, torch.Tensor):
            return None
        if self.inputs == ALL and not isinstance(batch, Mapping):  # a mapping's key "all" is one
            if not isinstance(batch, (list, tuple)) or not all(
                isinstance(x, torch.Tensor) for x in batch
            ):
                raise TypeError(
                    f"ImagePreprocessor: inputs='all' takes a batch that is a sequence of image "
                    f"tensors (pseudo_collate over bare images), got a {type(batch).__name__}"
                )
            return None  # the whole batch: stacked by process_image
        if self.inputs is not None:
            return self.inputs
        if isinstance(batch, Mapping):
            return "inputs"
        if isinstance(batch, (list, tuple)):
            if _many_alike(batch):  # not an (image, label, ...) sequence: refused, not guessed
                raise ValueError(
                    f"ImagePreprocessor: the batch is a sequence of {len(batch)} equally shaped "
                    f"{tuple(batch[0].shape)} tensors, e.g. pseudo_collate over bare images; only "
                    "its first would be taken as the image: pass inputs='all' if they are all "
                    "images, inputs=0 if the first is the image, or collate with default_collate"
                )
            return 0
        raise TypeError(
            f"ImagePreprocessor: cannot find the image in a batch of type {type(batch).__name__}; "
            "expected a tensor, a mapping with key 'inputs' or a sequence with the image first"
        )

    def __call__(self, batch: Any, training: bool, generator: torch.Generator | None = None) -> Any:
        batch = to_device(batch, self.device, non_blocking=self.non_blocking)
        slot = self._image_slot(batch)
        if slot is None:
            batch = self.process_image(batch)
        elif isinstance(batch, Mapping):
            if slot not in batch:
                raise KeyError(
                    f"ImagePreprocessor: the batch has no key {slot!r} (its keys: "
                    f"{sorted(map(str, batch))}); pass inputs=<the image's key>"
                )
            batch = _rebuild_mapping(batch, {**batch, slot: self.process_image(batch[slot])})
        else:
            if not isinstance(slot, int):
                raise TypeError(
                    f"ImagePreprocessor: inputs={slot!r} is a mapping key, but the batch is a "
                    f"{type(batch).__name__}; use a position (int) for sequence batches"
                )
            items = list(batch)
            items[slot] = self.process_image(items[slot])
            batch = _rebuild(batch, items)
        if training and self.augment is not None:
            if generator is None:
                raise ValueError(
                    "ImagePreprocessor: `augment` is set, so a training call needs an explicit "
                    "`generator`, e.g. fengine.data.loader.augment_generator(state.seed, state.step) "
                    "(a key of its own: fengine.rng.generator(seed, step) is the step's dropout key)"
                )
            batch = self.augment(batch, generator)
        return batch
