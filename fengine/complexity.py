"""Parameter count and FLOPs per module: MMEngine's ``get_model_complexity_info``.

``print(complexity.summary(model, torch.randn(1, 3, 224, 224)))`` prints a table of
every module to ``max_depth`` (parameters, FLOPs) and the totals (``Model Flops:4.145G``,
``Model Parameters:25.557M`` for a ResNet-50); `analyze` returns the numbers.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward
pass, in MMEngine's unit: **one multiply-add is one FLOP** (torch counts it as 2; every
count here is torch's divided by 2). To the matmuls and convolutions torch counts,
this adds the operators MMEngine (fvcore) counts: batch norm (per element: 2 in eval
mode, 5 in training mode; 1 / 4 without affine), layer / group norm (5, or 4),
adaptive average pooling (1 per input element), nearest / bilinear upsampling (1 / 4
per output element; global pooling reaches torch as ``mean((-1, -2), keepdim=True)``
of a 4-D or 3-D tensor, counted alike), grid sampling (4) and a matrix times a vector
(``matmul`` with a 1-D operand). Elementwise ops (ReLU, additions) are not counted, as in
MMEngine; attention (``scaled_dot_product_attention``), an LSTM's matmuls and ``baddbmm`` are,
where MMEngine skips them. A module's FLOPs are those of the operators run inside it, credited
to its first name, so an iterated ``ModuleList`` sums its children, as in MMEngine.
The model's mode matters as in MMEngine: a freshly built ResNet-50 (training mode)
gives 4.145G, in eval mode 4.112G.

The forward pass runs on the ``meta`` device by default (shapes only: no compute, no
memory, and nothing of the model changes, BatchNorm statistics included). A model
whose forward needs values (data-dependent control flow) takes ``meta=False``: one
real forward under ``no_grad``, after which the buffers and torch's default
generators are restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fengine.bind import Binding


__all__ = ["Complexity", "ModuleCost", "analyze", "format_size", "summary"]

aten = torch.ops.aten


def format_size(x: int, sig_figs: int = 3) -> str:
    """MMEngine's human units: 25557032 -> ``25.557M``, 4144854528 -> ``4.145G``."""

    def fmt(v: float) -> str:
        return f"{v:.{sig_figs}f}".rstrip("0").rstrip(".")

    for limit, scale, unit in ((1e14, 1e15, "P"), (1e11, 1e12, "T"), (1e8, 1e9, "G")):
        if abs(x) > limit:
            return fmt(x / scale) + unit
    if abs(x) > 1e5:
        return fmt(x / 1e6) + "M"
    if abs(x) > 1e2:
        return fmt(x / 1e3) + "K"
    return str(x)


# ------------------------------------------------- fvcore's extra operators, torch units


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _batch_norm(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    training = next((a for a in args[3:] if isinstance(a, bool)), False)
    affine = args[1] is not None
    per = (5 if affine else 4) if training else (2 if affine else 1)
    return 2 * per * _numel(args[0])


def _norm(affine_index: int) -> Callable[..., int]:
    def count(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * (5 if args[affine_index] is not None else 4) * _numel(args[0])

    return count


def _per_input(k: int) -> Callable[..., int]:
    def count(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * k * _numel(args[0])

    return count


def _per_output(k: int) -> Callable[..., int]:
    def count(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * k * _numel(out_shape)  # these operators return one tensor

    return count


def _global_avg_pool(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``adaptive_avg_pool2d(x, 1)`` reaches torch as ``x.mean((-1, -2), keepdim=True)``: count
    that form (1 per input element, as MMEngine counts the pooling), batched or not (4-D or
    3-D), no other mean."""
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    nd = len(args[0])
    pooled = nd in (3, 4) and dims is not None and sorted(d % nd for d in dims) == [nd - 2, nd - 1]
    return 2 * _numel(args[0]) if keepdim and pooled else 0


def _extra_ops() -> dict[Any, Callable[..., int]]:
    table: dict[str, Callable[..., int]] = {
        "native_batch_norm": _batch_norm,
        "_native_batch_norm_legit": _batch_norm,
        "_native_batch_norm_legit_no_training": _batch_norm,
        "_native_batch_norm_legit_functional": _batch_norm,
        "cudnn_batch_norm": _batch_norm,
        "miopen_batch_norm": _batch_norm,
        "native_layer_norm": _norm(2),
        "native_group_norm": _norm(1),
        "_adaptive_avg_pool2d": _per_input(1),
        "mean": _global_avg_pool,
        "upsample_nearest2d": _per_output(1),
        "upsample_bilinear2d": _per_output(4),
        "grid_sampler_2d": _per_output(4),
        "mv": _per_input(1),  # a matrix times a vector (matmul with a 1-D operand): m x n
        "dot": _per_input(1),
    }
    out: dict[Any, Callable[..., int]] = {}
    for name, f in table.items():
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        # FlopCounterMode decomposes an overload missing from its table before counting
        # (upsample_nearest2d would vanish into indexing), and counts by packet
        out[packet] = f
        out.update({getattr(packet, o): f for o in packet.overloads()})
    return out


# ---------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class ModuleCost:
    params: int  # parameters in the module and its submodules (shared ones counted once)
    flops: int  # multiply-adds of its forward calls, submodules included


@dataclass(frozen=True)
class Complexity:
    """Totals and per-module costs; ``modules[""]`` is the whole model."""

    flops: int
    params: int
    modules: dict[str, ModuleCost]  # every named module, in ``named_modules`` order
    by_operator: dict[str, int]  # whole model, aten operator -> FLOPs

    @property
    def flops_str(self) -> str:
        return format_size(self.flops)

    @property
    def params_str(self) -> str:
        return format_size(self.params)

    def table(self, max_depth: int = 3) -> str:
        """MMEngine's table: one row per module to ``max_depth``, indented by depth."""
        rows = [("module", "#parameters", "#flops")]
        for name, c in self.modules.items():
            depth = name.count(".") + 1 if name else 0
            if depth > max_depth or (name and not c.params and not c.flops):
                continue  # MMEngine's table leaves out modules with neither
            pad = " " * depth
            params = format_size(c.params) if c.params or not name else ""
            flops = format_size(c.flops) if c.flops or not name else ""
            rows.append((pad + (name or "model"), pad + params, pad + flops))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

        def line(r: tuple[str, str, str]) -> str:
            return "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"

        return "\n".join([rule, line(rows[0]), rule, *map(line, rows[1:]), rule])

    def __str__(self) -> str:
        return f"Model Flops:{self.flops_str}\nModel Parameters:{self.params_str}"


def _param_counts(model: nn.Module) -> dict[str, int]:
    counts = {name: 0 for name, _ in model.named_modules()}
    for name, p in model.named_parameters():  # shared params once, under their first name
        parts = name.split(".")[:-1]
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            if key in counts:
                counts[key] += p.numel()
    return counts


def _args(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _run_meta(model: nn.Module, inputs: Any, kwargs: dict[str, Any]) -> None:
    def to_meta(t: Any) -> Any:
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    def meta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in tensors.items()}

    args, kw = pytree.tree_map(to_meta, (_args(inputs), kwargs))
    # a Binding saves every slot before swapping and restores them all: functional_call put a
    # submodule shared by two parents back with the meta tensors (the model lost its weights)
    bound = Binding(model)(meta(dict(model.named_parameters())), meta(dict(model.named_buffers())))
    try:
        with bound:
            model(*args, **kw)
    except (NotImplementedError, RuntimeError) as e:
        needs_values = any(
            s in str(e) for s in ("meta", "data-dependent", "Cannot access data", "item()")
        )
        hint = ("a forward that needs values runs with meta=False" if needs_values
                else "is the input right for this model?")  # fmt: skip
        raise RuntimeError(
            f"complexity: the forward pass failed on the meta device ({e}); {hint}"
        ) from e


def _run_real(model: nn.Module, inputs: Any, kwargs: dict[str, Any]) -> None:
    saved = {n: b.clone() for n, b in model.named_buffers()}
    devices = [t.device for t in saved.values() if t.device.type == "cuda"]
    devices += [p.device for p in model.parameters() if p.device.type == "cuda"]
    cuda = sorted({d.index or 0 for d in devices})
    # without the fused RNN kernels (mkldnn's on CPU, cuDNN's), whose one op hides an LSTM's
    # matmuls from the count (0 FLOPs); other ops dispatch the same either way. The switches
    # themselves, not their `flags()` contexts, which also reset TF32 settings (and warn)
    backends: tuple[Any, ...] = (torch.backends.mkldnn, torch.backends.cudnn)
    enabled = [backend.enabled for backend in backends]
    try:
        for backend in backends:
            backend.enabled = False
        with torch.random.fork_rng(devices=cuda):
            model(*_args(inputs), **kwargs)
    finally:
        for backend, was in zip(backends, enabled):
            backend.enabled = was
        for n, b in model.named_buffers():
            b.copy_(saved[n])


class _ByModule(FlopCounterMode):
    """FlopCounterMode that also credits each operator to the innermost module running it, under
    that module's canonical name (its first in ``named_modules``), then sums by name prefix: as
    fvcore's ``by_module`` (MMEngine's table). A container that is never called itself (an
    iterated ``nn.ModuleList``) gets its children's FLOPs, and a module shared by two parents
    counts under its first name (torch's own per-module counts miss both)."""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.stack: list[str] = []
        self.own: dict[str, int] = {}

    @contextlib.contextmanager
    def scopes(self) -> Iterator[None]:
        handles = []
        for name, module in self.model.named_modules():

            def enter(m: nn.Module, args: Any, name: str = name) -> None:
                self.stack.append(name)

            def leave(m: nn.Module, args: Any, out: Any) -> None:
                self.stack.pop()

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            where = self.stack[-1] if self.stack else ""
            self.own[where] = self.own.get(where, 0) + n
        return super()._count_flops(func_packet, out, args, kwargs)

    def inclusive(self, name: str) -> int:
        """Torch-unit FLOPs of the module ``name`` and everything under it."""
        if not name:
            return sum(self.own.values())
        return sum(v for k, v in self.own.items() if k == name or k.startswith(name + "."))


def analyze(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: dict[str, Any] | None = None,
    meta: bool = True,
) -> Complexity:
    """Count ``model``'s parameters and the FLOPs of ``model(*inputs, **kwargs)``.

    ``inputs``: a tensor (or any single argument), or a tuple of positional arguments
    (MMEngine's ``inputs``). ``meta``: run the forward on the meta device (see the
    module docstring).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"complexity: model must be an nn.Module, got {type(model).__name__}")
    counter = _ByModule(model, display=False, custom_mapping=_extra_ops())
    with torch.no_grad(), counter, counter.scopes():
        (_run_meta if meta else _run_real)(model, inputs, kwargs or {})
    params = _param_counts(model)
    modules = {n: ModuleCost(params[n], counter.inclusive(n) // 2) for n in params}
    whole = counter.get_flop_counts().get("Global", {})
    total = sum(whole.values()) // 2
    by_op = {str(op): v // 2 for op, v in whole.items()}
    return Complexity(flops=total, params=params[""], modules=modules, by_operator=by_op)


def summary(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: dict[str, Any] | None = None,
    max_depth: int = 3,
    meta: bool = True,
) -> str:
    """The per-module table and the totals, as MMEngine prints them (one call for a run's start)."""
    c = analyze(model, inputs, kwargs=kwargs, meta=meta)
    return f"{c.table(max_depth)}\n{c}"
