"""Whole-step compile: forward, backward and the update of a `fengine.Step` as one graph.

``train_step(loss_fn, tx, *wrappers, compile=True)`` runs the same parts and wrappers
through ``torch.compile(fullgraph=True)``, with two substitutions that make them trace
(measured: `torch.autograd.grad` inside a compiled step graph-breaks, 0.16x eager):

* the gradient is ``torch.func.grad`` of the loss over the state's params bound into
  the module (`traced_grad_fn`), not ``torch.autograd.grad``;
* every Python number of the state (``step``, optimizer counts, reported ``lr``, EMA
  counts, ...) enters the graph as a 0-d tensor (`lift`) and leaves it as a Python
  number again (`lower`). Schedules are evaluated from the step tensor in torch ops
  (`fengine.schedule_ops`), so a moving schedule never recompiles, and the state a
  compiled step returns has the layout of an eager one: checkpoints are the same.

Random draws (dropout) come from torch's default generator seeded with
``fold_in(seed, step)`` around the call (inductor draws its own streams from it):
deterministic and exact on resume, but not the masks an eager step draws.

A step that cannot be traced whole (data-dependent Python control flow in the model,
``.item()``, a piece without a traced form) falls back to the eager step, with one
`CompileFallbackWarning` saying why. The first call's time (tracing and compiling) is
logged and kept as ``Step.compile_seconds``; inductor caches compiled kernels under
``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``), so a second run
starts warm.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from fengine.bind import Binding
from fengine.rng import fold_in, seeded_default_generators
from fengine.sharding import refuse_autograd
from fengine.state import TrainState


if TYPE_CHECKING:
    from fengine.step import GradFn, Metrics, Part, StepFn

__all__ = [
    "CompileFallbackWarning",
    "CompiledStep",
    "compile_options",
    "lift",
    "lower",
    "refuse_untraceable",
    "traced_grad_fn",
]

log = logging.getLogger("fengine")

_BINDING = "_fengine_compiled_binding"  # a module's `Binding`, kept on the module for the graph

_OPTIONS = ("backend", "mode", "dynamic", "options")
_UNTRACEABLE = (
    torch._dynamo.exc.Unsupported,
    torch._dynamo.exc.UserError,
    torch._dynamo.exc.BackendCompilerFailed,
)


class CompileFallbackWarning(UserWarning):
    """A compiled step could not be traced whole and runs eagerly instead."""


def compile_options(value: Any) -> dict[str, Any] | None:
    """``compile=`` of a step: False -> None, True -> {}, a dict of ``torch.compile`` options -> itself."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_OPTIONS))
        if unknown:
            raise ValueError(
                f"compile: unknown torch.compile options {unknown}; expected some of {list(_OPTIONS)}"
            )
        return dict(value)
    raise TypeError(
        f"compile must be a bool or a dict of torch.compile options ({', '.join(_OPTIONS)}), got {value!r}"
    )


def refuse_untraceable(wrappers: tuple[Any, ...]) -> None:
    """Refuse, up front, wrappers that need what a compiled step does not have (hooks, host reads)."""
    from fengine.wrappers.base import _CheckFinite
    from fengine.wrappers.data_parallel import _DataParallel
    from fengine.wrappers.fsdp import _Fsdp

    for w in wrappers:
        if isinstance(w, _DataParallel | _Fsdp | _CheckFinite):
            raise ValueError(
                f"compile=True does not support {w!r} yet (it needs backward hooks or a host read "
                "each step); use compile=False with it"
            )


def traced_grad_fn(part: Part) -> GradFn:
    """The gradient computation of ``part`` in traceable form: ``torch.func.grad`` over the
    params bound into the module (zeros for params the loss does not use)."""
    from fengine.step import Grads, parse_losses

    def grad_fn(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
        params, buffers, model = state.params, state.buffers, state.model
        names = part.owned(params)
        assert model is not None  # Step.check refused a state without one
        binding = model.__dict__[_BINDING]  # set outside the graph: no global cache to guard on

        def loss_of(train: dict[str, torch.Tensor], batch: Any) -> tuple[torch.Tensor, Any]:
            with binding({**params, **train}, buffers):
                out = part.loss_fn(model, batch)
            loss, metrics = parse_losses(out)
            target = loss if weight is None else loss * weight
            return target, (loss.detach(), metrics)

        grads, (loss, metrics) = torch.func.grad(loss_of, has_aux=True)(
            {n: params[n] for n in names}, batch
        )
        return Grads(loss, grads, metrics)

    return grad_fn


class Layout:
    """Where a state's Python numbers sit among its pytree leaves (ints and floats apart)."""

    __slots__ = ("floats", "ints", "spec")

    def __init__(self, leaves: list[Any], spec: pytree.TreeSpec) -> None:
        self.spec = spec
        self.ints = [i for i, x in enumerate(leaves) if type(x) is int]
        self.floats = [i for i, x in enumerate(leaves) if type(x) is float]


def lift(state: TrainState) -> tuple[TrainState, Layout]:
    """``state`` with each Python int / float replaced by a 0-d int64 / float64 tensor."""
    leaves, spec = pytree.tree_flatten(state)
    layout = Layout(leaves, spec)
    device = next(iter(state.params.values())).device if state.params else None
    for positions, dtype in ((layout.ints, torch.int64), (layout.floats, torch.float64)):
        if positions:
            values = torch.tensor([leaves[i] for i in positions], dtype=dtype, device=device)
            for i, t in zip(positions, values.unbind()):
                leaves[i] = t
    return pytree.tree_unflatten(leaves, spec), layout


def lower(state: TrainState, layout: Layout) -> tuple[TrainState, bool]:
    """The inverse of `lift`: the numbers back as Python ints and floats (one host read per
    kind), and whether ``state`` held a tensor at each place (then it is a valid lifted state)."""
    reusable = True
    leaves, spec = pytree.tree_flatten(state)
    if spec != layout.spec:
        raise RuntimeError(
            "compiled step: the step changed the layout of the state it returns "
            f"(expected {layout.spec}, got {spec})"
        )
    for positions, kind, dtype in (
        (layout.ints, int, torch.int64),
        (layout.floats, float, torch.float64),
    ):
        if positions:
            vals = [leaves[i] for i in positions]
            tensors = [(j, v) for j, v in enumerate(vals) if isinstance(v, torch.Tensor)]
            reusable = reusable and len(tensors) == len(vals)
            if tensors:
                read = torch.stack([v.to(dtype) for _, v in tensors]).tolist()
                for (j, _), x in zip(tensors, read):
                    vals[j] = x
            for i, v in zip(positions, vals):
                leaves[i] = kind(v)
    return pytree.tree_unflatten(leaves, spec), reusable


class CompiledStep:
    """Runs a traced step function under ``torch.compile``; the eager one when that cannot work."""

    def __init__(self, traced: StepFn, eager: StepFn, options: dict[str, Any]) -> None:
        self.traced, self.eager, self.options = traced, eager, options
        self.compiled = torch.compile(traced, fullgraph=True, **options)
        self.fallback_reason: str | None = None
        self.compile_seconds: float | None = None
        self._last: tuple[TrainState, TrainState, Layout] | None = None

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.fallback_reason is not None:
            return self.eager(state, batch)
        last = self._last
        if last is not None and last[0] is state:  # the state this step returned: already lifted
            lifted, layout = last[1], last[2]
        else:
            lifted, layout = lift(state)
        self.prepare(state)
        first = self.compile_seconds is None
        cuda = tuple({p.device for p in state.params.values() if p.device.type == "cuda"})
        t0 = time.perf_counter()
        try:
            with seeded_default_generators(fold_in(state.seed, state.step), cuda):
                new, metrics = self.compiled(lifted, batch)
        except _UNTRACEABLE as e:
            self._fall_back(e)
            return self.eager(state, batch)
        if first:
            self.compile_seconds = time.perf_counter() - t0
            log.info(
                "compiled step: first call (trace + compile + run) took %.1f s; inductor cache: %s "
                "(TORCHINDUCTOR_CACHE_DIR)",
                self.compile_seconds,
                _cache_dir(),
            )
        out, reusable = lower(new, layout)
        self._last = (out, new, layout) if reusable else None
        return out, metrics

    def prepare(self, state: TrainState) -> None:
        """Outside the graph: the module in training mode, its `Binding` kept on it."""
        model = state.model
        assert model is not None  # Step.check refused a state without one
        if not model.training:
            model.train()
        if _BINDING not in model.__dict__:
            refuse_autograd(model)
            model.__dict__[_BINDING] = Binding(model)

    def _fall_back(self, e: Exception) -> None:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        reason = " | ".join(lines[:6])
        self.fallback_reason = f"{type(e).__name__}: {reason}"
        warnings.warn(
            "compiled step: cannot trace the whole step, running it eagerly from now on "
            f"(bitwise equal to compile=False). Reason: {self.fallback_reason}",
            CompileFallbackWarning,
            stacklevel=4,
        )


def _cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return str(cache_dir())
    except Exception:  # noqa: BLE001 - only for the log line
        return "<unknown>"
