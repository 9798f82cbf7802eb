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

import itertools
import logging
import re
import time
import types
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from fengine.bind import Binding
from fengine.rng import fold_in, seeded_default_generators
from fengine.sharding import refuse_autograd
from fengine.state import STATE_FIELDS, TrainState


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

_OPTIONS = ("backend", "mode", "dynamic", "options", "guards")  # guards: fengine's, not torch's
_UNTRACEABLE = (
    torch._dynamo.exc.Unsupported,
    torch._dynamo.exc.UserError,
    torch._dynamo.exc.BackendCompilerFailed,
    torch._dynamo.exc.TorchRuntimeError,  # an op that fails under tracing (eager then says why)
)


class CompileFallbackWarning(UserWarning):
    """A compiled step could not be traced whole and runs eagerly instead."""


def compile_options(value: Any) -> dict[str, Any] | None:
    """``compile=`` of a step: False -> None, True -> {}, a dict of ``torch.compile`` options -> itself
    (besides those, ``guards=True`` checks dynamo's guards on every call: see `CompiledStep`)."""
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
        guards = value.get("guards", False)
        if not isinstance(guards, bool):
            raise TypeError(f"compile: guards must be True or False, got {guards!r}")
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
            # torch.func.grad refuses in-place updates of tensors from outside the transform
            # (BatchNorm's running stats): the forward updates copies, returned and copied back
            local = {k: v.clone() for k, v in buffers.items()}
            with binding({**params, **train}, local):
                out = part.loss_fn(model, batch)
            loss, metrics = parse_losses(out)
            target = loss if weight is None else loss * weight
            return target, (loss.detach(), metrics, {k: v.detach() for k, v in local.items()})

        grads, (loss, metrics, updated) = torch.func.grad(loss_of, has_aux=True)(
            {n: params[n] for n in names}, batch
        )
        for k, v in updated.items():
            buffers[k].copy_(v)
        return Grads(loss, grads, metrics)

    return grad_fn


class Layout:
    """A state's pytree layout: where its Python numbers sit among the leaves, and a fast rebuild.

    ``torch.utils._pytree.tree_unflatten`` costs ~10x the compiled MLP step's own overhead;
    `build` is the same rebuild as closures made once per layout.
    """

    __slots__ = ("build", "counters", "floats", "ints", "n", "spec")

    def __init__(self, leaves: list[Any], spec: pytree.TreeSpec) -> None:
        self.spec, self.n = spec, len(leaves)
        self.ints = [i for i, x in enumerate(leaves) if type(x) is int]
        self.floats = [i for i, x in enumerate(leaves) if type(x) is float]
        self.build = _builder(spec)
        # the leaf index of each top-level counter (a TrainState's fields are its children)
        starts = itertools.accumulate(
            (spec.child(i).num_leaves for i in range(spec.num_children)), initial=0
        )
        where = dict(zip(STATE_FIELDS, starts))
        self.counters = [where[f] for f in _COUNTERS]


def _builder(spec: pytree.TreeSpec) -> Any:
    """A function ``iterator of leaves -> tree`` for trees of layout ``spec``."""
    if spec.is_leaf():
        return next
    n, context = spec.num_children, spec.context
    if spec.type in (dict, list, tuple) and all(spec.child(i).is_leaf() for i in range(n)):
        # a container of leaves (params, moments, buffers): taken in C
        if spec.type is dict:
            return lambda it: dict(zip(context, itertools.islice(it, n)))
        return lambda it, kind=spec.type: kind(itertools.islice(it, n))
    unflatten = pytree.SUPPORTED_NODES[spec.type].unflatten_fn
    kids = [_builder(spec.child(i)) for i in range(n)]

    def build(it: Any) -> Any:
        return unflatten([kid(it) for kid in kids], context)

    return build


def _lift_leaves(leaves: list[Any], layout: Layout, device: torch.device | None) -> list[Any]:
    """``leaves`` with the Python numbers at ``layout``'s places as 0-d int64 / float64 tensors."""
    leaves = list(leaves)
    for positions, dtype in ((layout.ints, torch.int64), (layout.floats, torch.float64)):
        if positions:
            values = torch.tensor([leaves[i] for i in positions], dtype=dtype, device=device)
            for i, t in zip(positions, values.unbind()):
                leaves[i] = t
    return leaves


def _lower_leaves(
    leaves: list[Any], layout: Layout, given: tuple[list[Any], list[Any]] | None = None
) -> tuple[list[Any], bool]:
    """The numbers back as Python ints and floats; whether every one of them was a tensor.

    ``given``: the (lifted, plain) leaves the graph was called with; a number the graph
    returned untouched (the seed, a constant) is taken from there without a device read.
    The others are read at once per kind (one sync on CUDA).
    """
    out, reusable = list(leaves), True
    for positions, kind, dtype in (
        (layout.ints, int, torch.int64),
        (layout.floats, float, torch.float64),
    ):
        read = []
        for i in positions:
            v = out[i]
            if not isinstance(v, torch.Tensor):
                reusable = False
                out[i] = kind(v)
            elif given is not None and v is given[0][i]:
                out[i] = given[1][i]
            else:
                read.append(i)
        if len(read) > 1 and out[read[0]].device.type != "cpu":
            for i, x in zip(read, torch.stack([out[i].to(dtype) for i in read]).tolist()):
                out[i] = kind(x)
        else:
            for i in read:
                out[i] = kind(out[i].item())
    return out, reusable


def _device(state: TrainState) -> torch.device | None:
    return next(iter(state.params.values())).device if state.params else None


def lift(state: TrainState) -> tuple[TrainState, Layout]:
    """``state`` with each Python int / float replaced by a 0-d int64 / float64 tensor."""
    leaves, spec = pytree.tree_flatten(state)
    layout = Layout(leaves, spec)
    return layout.build(iter(_lift_leaves(leaves, layout, _device(state)))), layout


def lower(state: TrainState, layout: Layout) -> tuple[TrainState, bool]:
    """The inverse of `lift`: the numbers back as Python ints and floats, and whether ``state``
    held a tensor at each place (then it is a valid lifted state)."""
    leaves, spec = pytree.tree_flatten(state)
    if spec != layout.spec:
        raise RuntimeError(
            "compiled step: the step changed the layout of the state it returns "
            f"(expected {layout.spec}, got {spec})"
        )
    out, reusable = _lower_leaves(leaves, layout)
    return layout.build(iter(out)), reusable


_COUNTERS = ("step", "seed", "epoch", "batch_in_epoch")  # the state's own numbers
_TOP = tuple(f for f in STATE_FIELDS if f not in _COUNTERS)  # its containers


class CompiledStep:
    """Runs a traced step function under ``torch.compile``; the eager one when that cannot work.

    The graph takes and returns the state as a flat list of leaves (guards on a list of
    tensors are cheap); the state it returned last is kept lifted, so the next call (or one
    on that state with new counters, as `fit` makes) skips flattening it again.
    """

    def __init__(
        self,
        traced: StepFn,
        eager: StepFn,
        options: dict[str, Any],
        probe: Callable[[TrainState, Any], list[str]] | None = None,
    ) -> None:
        self.traced, self.eager, self.options = traced, eager, options
        # the params the loss does not reach (`fengine.step.unreached_params`): asked before each trace
        self.probe = probe
        # guards=True: check dynamo's guards on every call, so a global or closure value the loss
        # reads that changes between steps recompiles rather than staying as first traced
        self.guards = bool(options.get("guards", False))
        compile_kw = {k: v for k, v in options.items() if k != "guards"}
        # static shapes unless asked: a short last batch makes one more graph, where torch's
        # automatic dynamic shapes retraced it with symbolic sizes that dropout cannot take
        compile_kw.setdefault("dynamic", False)
        self.compiled = torch.compile(_own_code(self._run), fullgraph=True, **compile_kw)
        self.fallback_reason: str | None = None
        self.compile_seconds: float | None = None
        self._layout: Layout | None = None
        # per model: a number for each structure and kind of leaves its states had (`_lineage_of`)
        self._lineages: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._lineage = 0  # the last call's state's
        # the state returned last, its leaves lifted and as they are
        self._last: tuple[TrainState, list[Any], list[Any]] | None = None
        self._cuda: tuple[Any, tuple[torch.device, ...]] = (None, ())
        # whether the graph draws random numbers (seeded per step when it does); None: not yet seen
        self._draws: bool | None = None
        self._sig: Any = None  # the last batch's `_signature`
        # model -> {(batch signature, layout): the code dynamo compiled for them}, called without
        # dynamo's frame machinery (`_record_direct`); None: not for this step (CUDA graphs)
        self._direct: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Any]] | None = (
            weakref.WeakKeyDictionary() if _direct_allowed(compile_kw) else None
        )

    def _run(self, leaves: list[Any], batch: Any) -> tuple[list[Any], Metrics]:
        """The traced function: leaves in, leaves out (the pytree work happens at trace time)."""
        assert self._layout is not None
        new, metrics = self.traced(pytree.tree_unflatten(leaves, self._layout.spec), batch)
        return pytree.tree_leaves(new), metrics

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if self.fallback_reason is None:
            done = self._compiled_call(state, batch)
            if not isinstance(done, Exception):
                return done
            self._fall_back(done)
        return self.eager(state, batch)

    def _compiled_call(
        self, state: TrainState, batch: Any
    ) -> tuple[TrainState, Metrics] | Exception:
        """The compiled step, or why it cannot run (unreached params, an untraceable step)."""
        first = self.compile_seconds is None
        unreached = self._unreached(state, batch) if first else None  # before the first trace
        if unreached is not None:
            return unreached
        leaves, plain, cached = self._lifted(state)
        assert self._layout is not None
        self.prepare(state)
        # the guards dynamo would check (~30% of a small step) hold by construction when the
        # leaves are the ones the graph returned and the batch looks like the last one
        sig = _signature(batch)
        steady = not self.guards and cached and sig is not None
        same = steady and sig == self._sig
        self._sig = sig
        t0 = time.perf_counter()
        try:
            done = self._guarded(state, leaves, batch, skip_guards=same, steady=steady, trace=first)
        except _UNTRACEABLE as e:
            return e
        if isinstance(done, Exception):
            return done
        out, metrics = done
        if first:
            self.compile_seconds = time.perf_counter() - t0
            log.info(
                "compiled step: first call (trace + compile + run) took %.1f s; inductor cache: %s "
                "(TORCHINDUCTOR_CACHE_DIR)",
                self.compile_seconds,
                _cache_dir(),
            )
        if len(out) != self._layout.n:
            raise RuntimeError(
                f"compiled step: the step returned a state of {len(out)} leaves, expected "
                f"{self._layout.n}; a wrapper changed the state's layout"
            )
        lowered, reusable = _lower_leaves(out, self._layout, (leaves, plain))
        new = self._layout.build(iter(lowered))
        self._last = (new, out, lowered) if reusable else None
        return new, metrics

    def _guarded(
        self,
        state: TrainState,
        leaves: list[Any],
        batch: Any,
        *,
        skip_guards: bool,
        steady: bool,
        trace: bool,
    ) -> tuple[list[Any], Metrics] | Exception:
        """`_call`, tracing again only once `_unreached` passed on this batch (else its error).
        ``steady``: the state is the one the last call returned (same model, same layout), and
        the call may run dynamo's code directly (`_direct_call`).

        A batch that takes another Python branch of the loss (an auxiliary head used on some
        batches only) makes dynamo trace again, and the new graph may leave params unreached
        that the first one reached: each later call runs under the ``fail_on_recompile``
        stance, so such a trace stops before it starts and the probe runs first (no extra
        work while a graph is reused)."""
        if steady and (done := self._direct_call(state, leaves, batch)) is not None:
            return done
        while True:
            try:
                done = self._call(state, leaves, batch, skip_guards=skip_guards, trace=trace)
                if steady and self._direct is not None:
                    self._record_direct(state, leaves, batch)
                return done
            except RuntimeError as e:  # dynamo's own errors (TorchRuntimeError, ...) too
                if skip_guards and "skip_guard_eval_unsafe" in str(e):
                    skip_guards = False  # a guard did matter after all: check them all
                elif not trace and _RECOMPILE in str(e):
                    unreached = self._unreached(state, batch)
                    if unreached is not None:
                        return unreached
                    trace = True
                else:
                    raise

    def _unreached(self, state: TrainState, batch: Any) -> ValueError | None:
        """Why the step cannot compile when the loss leaves trainable params unreached on
        ``batch`` (`self.probe`): ``torch.func.grad`` would give them zero gradients."""
        unreached = [] if self.probe is None else self.probe(state, batch)
        if not unreached:
            return None
        shown = ", ".join(unreached[:5]) + (
            f" and {len(unreached) - 5} more" if len(unreached) > 5 else ""
        )
        return ValueError(
            f"params the loss does not reach ({shown}): torch.func.grad would give them zero "
            "gradients, which move them (momentum, weight decay) where the eager step leaves "
            "them; freeze them (requires_grad_(False)) before step.init to compile")  # fmt: skip

    def _call(
        self, state: TrainState, leaves: list[Any], batch: Any, *, skip_guards: bool, trace: bool
    ) -> tuple[list[Any], Metrics]:
        """One call of the graph through dynamo; ``trace=False``: it raises rather than tracing again."""
        stance = "default" if trace else "fail_on_recompile"
        with torch.compiler.set_stance(stance, skip_guard_eval_unsafe=skip_guards):
            return self._seeded(self.compiled, state, leaves, batch)

    def _direct_call(
        self, state: TrainState, leaves: list[Any], batch: Any
    ) -> tuple[list[Any], Metrics] | None:
        """The call of the code dynamo compiled for this model, lineage of states and batch signature,
        once `_record_direct` found it (as dynamo itself runs it without guards); None when
        there is none to call: not found yet, gone from dynamo's cache (``torch._dynamo.reset``),
        or traced under another global state (grad mode, autocast, ...)."""
        key = (self._sig, self._lineage)
        known = None if self._direct is None else self._direct.get(state.model)  # type: ignore[arg-type]
        direct = None if known is None else known.get(key)
        if known is None or direct is None or not direct.global_state.check():
            return None
        if not any(e.code is direct.code for e in _cache_entries(direct.dynamo_code)):
            del known[key]  # dynamo's caches were reset: it traces again
            return None
        try:
            return self._seeded(direct.fn, state, leaves, batch)
        except AssertionError:  # inductor's check of the inputs' sizes and strides failed
            del known[key]  # (before any work): let dynamo check every guard
            return None

    def _seeded(
        self, fn: Callable[[list[Any], Any], Any], state: TrainState, leaves: list[Any], batch: Any
    ) -> tuple[list[Any], Metrics]:
        """``fn(leaves, batch)`` with torch's generators seeded from the state when the graph draws."""
        if self._draws is False:  # the graph draws no random numbers: nothing to seed
            return fn(leaves, batch)
        cuda = self._cuda_of(state)
        with seeded_default_generators(fold_in(state.seed, state.step), cuda):
            seeded = torch.default_generator.get_state() if self._draws is None else None
            out = fn(leaves, batch)
            if seeded is not None and not cuda:
                # a graph is static: one that left the generator untouched never draws
                self._draws = not torch.equal(seeded, torch.default_generator.get_state())
        return out

    def _record_direct(self, state: TrainState, leaves: list[Any], batch: Any) -> None:
        """Keep the code dynamo compiled for this model, lineage of states and batch signature,
        to call it directly.

        Under ``skip_guard_eval_unsafe`` dynamo still spends ~50 us per call in its frame
        evaluation (a third of the compiled MLP step) before it runs the code it generated:
        the graph call, the outputs' assembly and any side effects it replays. That code is
        taken from dynamo's cache once per signature, the one cache entry whose guards pass on
        these inputs, and called as a function (same code, same bits)."""
        assert self._direct is not None and state.model is not None
        known = self._direct.setdefault(state.model, {})
        key = (self._sig, self._lineage)
        if self._sig is None or key in known or len(known) >= _DIRECT_MAX:
            return
        try:
            from torch._C._dynamo.guards import GlobalStateGuard

            run = self.compiled._torchdynamo_orig_callable.__func__  # type: ignore[attr-defined]
            frame = {"self": self, "leaves": leaves, "batch": batch}
            hits = [e for e in _cache_entries(run.__code__) if e.guard_manager.check(frame)]
            global_state = GlobalStateGuard()  # grad mode, autocast, ... as they are now
        except Exception as e:  # noqa: BLE001 - another torch's internals: dynamo's calls only
            log.debug("compiled step: calling dynamo's code directly is off (%r)", e)
            self._direct = None
            return
        if len(hits) == 1 and not hits[0].code.co_freevars:
            # the globals dynamo added its names to (the compiled graph, imports) are `_run`'s
            fn = types.FunctionType(hits[0].code, run.__globals__, hits[0].code.co_name)
            known[key] = _Direct(
                types.MethodType(fn, self), hits[0].code, run.__code__, global_state
            )

    def _lifted(self, state: TrainState) -> tuple[list[Any], list[Any], bool]:
        """``state``'s leaves with its numbers as tensors, its leaves as they are, and whether
        they came from the last call's output (else ``state`` was flattened and lifted)."""
        last = self._last
        if last is not None:
            prev, leaves, plain = last
            if prev is state:
                return leaves, plain, True
            if state.model is prev.model and all(
                getattr(state, f) is getattr(prev, f) for f in _TOP
            ):  # only the counters differ (fit moves epoch / batch_in_epoch): re-lift those
                assert self._layout is not None  # set with the last call's leaves
                top = self._layout.counters
                numbers = [getattr(state, f) for f in _COUNTERS]
                values = torch.tensor(numbers, dtype=torch.int64, device=_device(state)).unbind()
                leaves, plain = list(leaves), list(plain)
                for i, t, x in zip(top, values, numbers):
                    leaves[i], plain[i] = t, x
                return leaves, plain, True
        flat, spec = pytree.tree_flatten(state)
        if self._layout is None or spec != self._layout.spec:
            self._layout = Layout(flat, spec)
        self._lineage = self._lineage_of(state, flat, spec)
        return _lift_leaves(flat, self._layout, _device(state)), flat, False

    def _lineage_of(self, state: TrainState, flat: list[Any], spec: pytree.TreeSpec) -> int:
        """A number for the structure and the leaves' kinds (dtype, device, shape, strides,
        requires_grad) of a state of ``state.model``: the states the step returns from it keep
        them, and a direct call (`_direct_call`) is found per lineage. Asked for a state that
        does not continue the last call's (a new, loaded or older one), not per step."""
        if self._direct is None or state.model is None:
            return 0
        tree = tuple(spec.child(i) for i in range(spec.num_children))  # (the root holds the model)
        kinds = tuple(
            (x.dtype, x.device, x.shape, x.stride(), x.requires_grad)
            if isinstance(x, torch.Tensor)
            else type(x)
            for x in flat
        )
        known = self._lineages.setdefault(state.model, {})
        return known.setdefault((tree, kinds), len(known))

    def _cuda_of(self, state: TrainState) -> tuple[torch.device, ...]:
        """The CUDA devices of the state's params (their generators are seeded too); cached
        per model and device of its first param."""
        key = (state.model, _device(state))
        if self._cuda[0] != key:
            found = {p.device for p in state.params.values() if p.device.type == "cuda"}
            self._cuda = (key, tuple(found))
        return self._cuda[1]

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
        raised = _RAISED.search(
            str(e)
        )  # an error raised while tracing (e.g. fengine's own): its text
        if raised:
            self.fallback_reason = f"{raised['type']}: {raised['text']}"
        else:
            lines = []
            for ln in str(e).strip().splitlines():  # its message, not a C++ stack after it
                if ln.lstrip().startswith(
                    ("Exception raised from", "frame #", "C++ CapturedTraceback")
                ):
                    break
                if ln.strip():
                    lines.append(ln.strip())
            reason = " | ".join(lines[:6])
            self.fallback_reason = f"{type(e).__name__}: {reason[:600]}"
        warnings.warn(
            "compiled step: cannot trace the whole step, running it eagerly from now on "
            f"(bitwise equal to compile=False). Reason: {self.fallback_reason}",
            CompileFallbackWarning,
            stacklevel=4,
        )


_DIRECT_MAX = 16  # batch signatures whose compiled code is called directly


class _Direct(NamedTuple):
    """Dynamo's compiled code for one model, lineage of states and batch signature, called
    directly."""

    fn: Callable[[list[Any], Any], tuple[list[Any], Any]]  # the code, bound to the step
    code: types.CodeType  # the code itself (its cache entry's)
    dynamo_code: types.CodeType  # the code dynamo's cache is kept for (`CompiledStep._run`'s)
    global_state: Any  # dynamo's GlobalStateGuard as the code was found: checked before a call


def _cache_entries(code: types.CodeType) -> list[Any]:
    """Dynamo's cache entries for ``code`` (one per compiled graph)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return _debug_get_cache_entry_list(code)


def _direct_allowed(options: Mapping[str, Any]) -> bool:
    """Whether dynamo's compiled code may be called without dynamo: not under CUDA graphs,
    whose trees count a step at each call through dynamo."""
    if options.get("mode") in ("reduce-overhead", "max-autotune"):
        return False
    extra = options.get("options") or {}
    return not any("cudagraph" in str(k) and v for k, v in extra.items())


# dynamo's "Observed exception" report names the error the traced code raised in its debug context
_RAISED = re.compile(r"raised exception (?P<type>\w+)\((?P<q>['\"])(?P<text>.*?)(?P=q)\)")
# the error of a call under the "fail_on_recompile" stance that would trace again
_RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


class _Opaque(Exception):
    pass


def _signature(batch: Any) -> Any:
    """What dynamo's guards see of a batch (structure, tensor metadata, plain values, which
    tensors are one object or share memory, grad mode); None for a batch with objects it
    cannot describe (then the guards run)."""
    tensors: list[torch.Tensor] = []
    try:
        sig = _sig(batch, tensors)
        # dynamo passes a tensor given twice once, and traces aliased inputs apart
        objects: dict[int, int] = {}
        memory: dict[int, int] = {}
        aliasing = tuple(
            (objects.setdefault(id(t), i), memory.setdefault(t.untyped_storage().data_ptr(), i))
            for i, t in enumerate(tensors)
        )
    except (_Opaque, RuntimeError, NotImplementedError):  # (a tensor without storage)
        return None
    return (torch.is_grad_enabled(), sig, aliasing)


def _sig(x: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return (type(x), x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
    if isinstance(x, tuple | list):
        return (type(x), *(_sig(v, tensors) for v in x))
    if type(x) is dict:
        return (dict, *((k, _sig(v, tensors)) for k, v in x.items()))
    if x is None or type(x) in (int, float, str, bool):
        return (type(x), x)
    raise _Opaque


def _own_code(method: Any) -> Any:
    """``method`` with a code object of its own: dynamo keeps its compiled graphs and guards per
    code object, so each compiled step gets its own cache (and its own recompile limit)."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(method.__self__):x}")
    clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return types.MethodType(clone, method.__self__)


def _cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return str(cache_dir())
    except Exception:  # noqa: BLE001 - only for the log line
        return "<unknown>"
