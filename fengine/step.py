"""The training step: a pure function ``(state, batch) -> (state, metrics)``, built once.

A `Step` is made of *parts* (one for `train_step`; several for `fengine.multi_step`,
e.g. a GAN's discriminator and generator), each a loss function, a gradient
transformation and the params it owns, and of *wrappers* (`fengine.wrappers`) in
the order they are written. Each wrapper acts at its stage, in that order:

* **forward** wrappers wrap the gradient computation ``grad_fn(state, batch, *,
  weight, micro) -> Grads`` (autocast, micro-batching, a user's context);
* **gradient** wrappers wrap the application of the gradient transformation
  ``apply(state, grads) -> (state, metrics)`` (fp16 unscale + skip-on-inf + scale
  update, finite checks), so every transformation inside ``tx`` sees true,
  unscaled gradients by construction;
* **post-update** wrappers wrap the whole step (a weight constraint, EMA).

At the forward and gradient stages the first written is outermost; at the post-update
stage the first written is innermost, so its work after the update runs first
(``post_update(constraint), ema(...)`` averages the constrained weights).

The base ``grad_fn`` binds the state's tensors into the module, runs
``loss_fn(model, batch)`` with torch's default generators seeded from
``fold_in(seed, step, micro)`` (restored afterwards), and takes the gradients of
``loss * weight`` as ``torch.autograd.grad`` does, by its engine call without its per-call
argument handling (`fengine.autograd.scalar_grads`; ``autograd.grad`` was measured 1.6x
faster than ``torch.func.grad`` in eager mode). ``weight`` is the loss's cotangent: the
micro-batch share and the fp16 loss scale multiply into it. A model sharded by FSDP2
gets its gradients from backward hooks instead: `fengine.fsdp` replaces this
computation (`fengine.sharding`), and the base one refuses such a model.

The step counter and scheduled hyper-parameters stay host-side Python numbers in
eager mode: torch.optim's foreach kernels take Python scalars, and that is what
keeps the optimizers bitwise equal to torch.optim. A compiled step
(``compile=True``, `fengine.compiled`) feeds them as 0-d tensors derived from the
step instead (DESIGN principle 11), and takes gradients with ``torch.func.grad``,
which traces. Metrics are tensors: nothing here syncs with the device.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from fengine.autograd import scalar_grads
from fengine.bind import bind
from fengine.devices import device_of, devices_in, parse_device
from fengine.losses import Metrics, parse_losses
from fengine.optim.base import (
    GradientTransformation,
    collect_metrics,
    hyperparams,
    missing_optimizer,
    report_at,
    step_params,
)
from fengine.rng import fold_in, seeded_default_generators
from fengine.sharding import refuse_autograd
from fengine.state import TrainState
from fengine.step_check import StepMismatchError, check_fits, check_ownership


if TYPE_CHECKING:
    from fengine.wrappers import Wrapper

__all__ = ["Grads", "Part", "Step", "StepMismatchError", "parse_losses", "selector", "train_step"]

LossFn = Callable[[nn.Module, Any], Any]


class Grads(NamedTuple):
    """What the gradient computation hands to the gradient transformation."""

    loss: torch.Tensor  # total loss (detached, unscaled)
    grads: dict[str, torch.Tensor]  # param name -> gradient (absent: param unused by the loss)
    metrics: Metrics  # loss terms and aux values (detached tensors)
    weight: float | None = (
        None  # samples/tokens these grads are the mean over (accumulate(weight=))
    )


class GradFn(Protocol):
    def __call__(
        self, state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0
    ) -> Grads: ...


ApplyFn = Callable[[TrainState, Grads], tuple[TrainState, Metrics]]
StepFn = Callable[[TrainState, Any], tuple[TrainState, Metrics]]


class Part(NamedTuple):
    """One (loss, optimizer, params) of a step. ``name`` is None for the only part of a
    `train_step`; a `multi_step` keeps part states under their names."""

    name: str | None
    loss_fn: LossFn
    tx: GradientTransformation
    select: Callable[[str], bool] | None = None  # which trainable params it owns (None: all)
    position: int = 0  # in the update order (the dropout key of a multi step)

    def owned(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        sel = self.select
        return [n for n, p in params.items() if p.requires_grad and (sel is None or sel(n))]

    def get(self, tree: Any) -> Any:
        """This part's entry of a per-part tree (the tree itself for a single part)."""
        return tree if self.name is None else tree[self.name]

    def put(self, tree: Any, value: Any) -> Any:
        return value if self.name is None else {**tree, self.name: value}


def selector(spec: str | Callable[[str], bool], where: str) -> Callable[[str], bool]:
    """A param-name predicate from a submodule name (``"gen"`` selects ``gen.*``) or a function."""
    if isinstance(spec, str):
        prefix = spec

        def by_prefix(name: str) -> bool:
            return name == prefix or name.startswith(prefix + ".")

        return by_prefix
    if callable(spec):
        return spec
    raise TypeError(
        f"{where}: params must be a submodule name (str) or a function param_name -> bool, got {type(spec).__name__}"
    )


_base_grad_fns: weakref.WeakSet = weakref.WeakSet()


def is_base_grad_fn(fn: Any) -> bool:
    """Whether ``fn`` is a step's own gradient computation, unwrapped (`fengine.fsdp` replaces it)."""
    return fn in _base_grad_fns


# the device type `fengine.amp` autocasts in an eager step: the base gradient function runs its
# backward with autocast off there, as torch's recipe does (forward and loss under autocast, the
# backward outside: under it, the backward of a region the model keeps in float32 ran in the
# low precision). Wrappers inside amp still run under autocast.
autocast_device: ContextVar[str | None] = ContextVar("fengine_autocast_device", default=None)


def _check_plateaus(parts: Sequence[Part], wrappers: Sequence[Any]) -> None:
    """Each ``rop(...)`` hyper-parameter needs its `fengine.reduce_on_plateau` wrapper in the
    step: without it the value was never reduced, silently."""
    from fengine.plateau import PlateauValue, ReduceOnPlateau
    from fengine.schedules import reachable

    wrapped = {str(w.name) for w in wrappers if isinstance(w, ReduceOnPlateau)}
    for value in reachable([p.tx for p in parts], PlateauValue):
        if value.name not in wrapped:
            raise ValueError(
                f"a hyper-parameter is reduced on plateau {value.name!r} (rop(...) of that "
                f"reduce_on_plateau), but the step has no such wrapper (it has "
                f"{sorted(wrapped) or 'none'}): add the reduce_on_plateau to the step's wrappers, "
                "or its lr would never be reduced"
            )


_requires_grad = operator.attrgetter("requires_grad")


def _grad_fn(part: Part, multi: bool) -> GradFn:
    """The innermost gradient computation of ``part`` (see the module docstring)."""
    cache: dict[str, Any] = {}
    frozen: dict[tuple[str, str], torch.Tensor] = {}  # a cell of its own: checked every step

    def grad_fn(state: TrainState, batch: Any, *, weight: Any = None, micro: int = 0) -> Grads:
        params = state.params
        if cache.get("params") is not params:  # a donating step keeps the same dict
            refuse_autograd(state.model)
            cuda = {p.device for p in params.values() if p.device.type == "cuda"}
            names = part.owned(params)
            if not names:
                raise ValueError(f"{_who(part)}: {_NO_TRAINABLE}")
            inputs = tuple(params[n] for n in names)
            cache.update(params=params, names=names, inputs=inputs, devices=tuple(cuda))
            frozen.clear()
            frozen.update(_frozen(part, params, state.model, cache))
        if frozen and any(map(_requires_grad, frozen.values())):  # unfrozen in place since
            raise _unfrozen(part, frozen)
        model = state.model
        assert model is not None  # Step.check refused a state without one
        if not model.training:
            model.train()
        key = rng_key(state, part, micro, multi)
        with seeded_default_generators(key, cache["devices"]), bind(model, params, state.buffers):
            loss, metrics = run_loss(part, model, batch, params)
        target = loss if weight is None else loss * weight
        try:
            autocast = autocast_device.get()
            if autocast is None:
                grads = scalar_grads(target, cache["inputs"])
            else:
                with torch.autocast(device_type=autocast, enabled=False):
                    grads = scalar_grads(target, cache["inputs"])
        except RuntimeError as e:
            now_frozen = [n for n, p in zip(cache["names"], cache["inputs"]) if not p.requires_grad]
            if now_frozen:
                more = f" (and {len(now_frozen) - 1} more)" if len(now_frozen) > 1 else ""
                raise StepMismatchError(
                    f"{_who(part)}: param {now_frozen[0]!r}{more} was trainable when this state "
                    f"was built and is frozen now (requires_grad=False): {_RETRAIN}"
                ) from e
            if not target.requires_grad:
                raise ValueError(f"{_who(part)}: {_DETACHED}") from e
            raise
        found = dict(zip(cache["names"], grads))
        if not all(map(operator.is_not, grads, itertools.repeat(None))):  # (in C, no loop here)
            found = {n: g for n, g in found.items() if g is not None}  # params the loss missed
        return Grads(loss.detach(), found, metrics)

    _base_grad_fns.add(grad_fn)
    return grad_fn


def _frozen(
    part: Part, params: Mapping[str, torch.Tensor], model: Any, cache: dict[str, Any]
) -> dict[tuple[str, str], torch.Tensor]:
    """The frozen (``requires_grad=False``) params ``part`` would own, the state's tensors and the
    module's own: each step checks that none was unfrozen in place (usually there are none).
    Runs when the params dict is new (every step of a ``donate=False`` step): the module's
    params are looked up once per module (``cache``)."""
    sel = part.select
    names = [n for n, p in params.items() if not p.requires_grad and (sel is None or sel(n))]
    if not names:
        return {}
    if cache.get("model") is not model:
        own = dict(model.named_parameters()) if model is not None else {}
        cache.update(model=model, own=own)
    own = cache["own"]
    out = {(n, "state.params"): params[n] for n in names}
    out.update({(n, "the model"): own[n] for n in names if n in own})
    return out


def _unfrozen(part: Part, frozen: Mapping[tuple[str, str], torch.Tensor]) -> StepMismatchError:
    """The error for a param frozen when the state was built and unfrozen in place since."""
    name, where = next(key for key, t in frozen.items() if t.requires_grad)
    return StepMismatchError(
        f"{_who(part)}: param {name!r} (in {where}) was frozen (requires_grad=False) when this "
        f"state was built and requires grad now; the step would not train it: {_RETRAIN}"
    )


def unreached_params(
    parts: Sequence[Part], multi: bool, state: TrainState, batch: Any
) -> list[str]:
    """The trainable params no part's loss reaches on ``batch`` (its first micro-batch), found by
    one eager gradient computation of each part: buffers on copies, the step's own seeded
    generators (restored after), nothing of ``state`` changed; its errors are the eager step's
    (a frozen model, a detached loss). A compiled step asks before it traces: ``torch.func.grad``
    gives such params zero gradients, which move them (momentum, weight decay) where the eager
    step, as torch.optim, leaves them."""
    from fengine.wrappers.accumulate import MicroBatches

    first = batch[0] if isinstance(batch, MicroBatches) and batch else batch
    probe = state.replace(buffers={k: v.clone() for k, v in state.buffers.items()})
    unreached: list[str] = []
    for part in parts:
        grads = _grad_fn(part, multi)(probe, first).grads
        unreached += [n for n in part.owned(state.params) if n not in grads]
    return unreached


_NO_TRAINABLE = (
    "no trainable params (every param it owns has requires_grad=False); "
    "unfreeze some (param.requires_grad_(True)) before step.init"
)
_RETRAIN = (
    "which params train is fixed when the state is built (the optimizer keeps state for those "
    "only). To change it mid-run: state.load_into(model), set requires_grad on the model's "
    "params, state = step.init(model) (a fresh optimizer state); or build the state with them "
    "trainable and hold a group still with optim.partition({..., 'frozen': optim.set_to_zero()}, "
    "labels)"
)
_DETACHED = (
    "the loss does not require grad: loss_fn returned a loss cut from the graph "
    "(.detach(), .item(), torch.no_grad()) or computed from no trainable param"
)


def _who(part: Part) -> str:
    return "train_step" if part.name is None else f"multi_step: part {part.name!r}"


def rng_key(state: TrainState, part: Part, micro: int, multi: bool) -> int:
    """The key a (micro-)batch's random draws (dropout) are seeded with: a function of the run's
    seed, the step, the part (in a multi step) and the micro-batch, so every replay draws alike."""
    if multi:
        return fold_in(state.seed, state.step, part.position, micro)
    return fold_in(state.seed, state.step, micro)


def run_loss(
    part: Part, model: torch.nn.Module, batch: Any, params: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, Metrics]:
    """``part.loss_fn(model, batch)`` as (loss, metrics) (MMEngine's parse_losses); a device
    mismatch between batch and params is named in the error."""
    try:
        out = part.loss_fn(model, batch)
    except Exception as e:
        _refuse_micro_batches(e, part, batch)
        if isinstance(e, RuntimeError):
            _name_devices(e, params, batch)
        raise
    return parse_losses(out)


def _refuse_micro_batches(e: Exception, part: Part, batch: Any) -> None:
    """A loss that failed on a `fengine.MicroBatches` group: this step has no ``accumulate(k)``
    to split it (checked only after a failure: nothing per step)."""
    from fengine.wrappers.accumulate import MicroBatches

    if isinstance(batch, MicroBatches):
        raise TypeError(
            f"{_who(part)}: the batch is a fengine.MicroBatches of {len(batch)} micro-batches, but "
            f"this step has no accumulate(k) to split it: add fe.accumulate({len(batch)}) to the "
            "step's wrappers, or pass one batch"
        ) from e


def _name_devices(e: RuntimeError, params: Mapping[str, torch.Tensor], batch: Any) -> None:
    """A device mismatch between the batch and the state: say which devices (a note on ``e``)."""
    on = devices_in(batch) - {device_of(params)}
    if on and "device" in str(e) and hasattr(e, "add_note"):
        e.add_note(
            f"the state is on {device_of(params)} but the batch has tensors on {sorted(map(str, on))}; "
            "fit/evaluate move batches for you, or call fengine.devices.to_device(batch, device)"
        )


def _apply_fn(part: Part) -> ApplyFn:
    """Apply ``part.tx`` to the gradients: params updated in place, the part's optimizer state replaced."""

    def apply(state: TrainState, g: Grads) -> tuple[TrainState, Metrics]:
        params, opt_state = state.params, state.opt_state
        own = opt_state if part.name is None else opt_state[part.name]
        try:
            new, own = step_params(part.tx, g.grads, own, params, step=state.step)
        except KeyError as e:
            if e.args and isinstance(e.args[0], str) and e.args[0] in g.grads:
                raise StepMismatchError(
                    f"{_who(part)}: param {e.args[0]!r} has a gradient but no optimizer state: was "
                    f"it frozen (requires_grad=False) when the state was built? {_RETRAIN}"
                ) from e
            raise
        if new is not params:  # a transformation that returned new tensors, not updated in place
            new = {**params, **new}
        metrics = {**g.metrics, **collect_metrics(own)}
        if not g.grads:  # no update (torch's no-op): grad_norm & co would be the last update's
            moved = hyperparams(own)
            metrics = {k: v for k, v in metrics.items() if k in g.metrics or k in moved}
        return state.replace(
            params=new, opt_state=own if part.name is None else {**opt_state, part.name: own}
        ), metrics

    return apply


def skipped_update(state: TrainState, g: Grads, part: Part) -> tuple[TrainState, Metrics]:
    """What an update that is skipped (fp16 overflow) leaves: params and optimizer state as they
    were, but the reported hyper-parameters (``lr``...) at this step, in the state and the
    metrics, as MMEngine logs the scheduled lr of every iteration. The other metrics a state
    reports (``grad_norm``) describe the last update applied, so the skipped one has none."""
    from fengine.plateau import lent  # the plateau module builds on this one

    with lent(state):  # a value reduced on plateau, also outside its wrapper's update
        opt_state = reported_opt_state(state.opt_state, part, state)
    own = part.get(opt_state)
    moved = hyperparams(own)  # not grad_norm & co: those are of the last update applied
    metrics = {**g.metrics, **{k: v for k, v in collect_metrics(own).items() if k in moved}}
    return state.replace(opt_state=opt_state), metrics


def reported_opt_state(opt_state: Any, part: Part, state: TrainState) -> Any:
    """``opt_state`` with ``part``'s reported hyper-parameters at ``state.step`` (a skipped
    update's; a compiled step's after its selection restored the old values)."""
    return part.put(opt_state, report_at(part.tx, part.get(opt_state), state.step))


def _check_ends_in_optimizer(part: Part) -> None:
    """Refuse a ``tx`` that does not end in an optimizer: the step would add its output, a
    gradient (clipped, say), to the params as it is, which trains uphill."""
    missing = missing_optimizer(part.tx)
    if missing is not None:
        raise ValueError(
            f"{_who(part)}: tx does not end in an optimizer ({missing} is last), so the step "
            "would add its output, a gradient, to the params: that trains uphill. End it with "
            "one, e.g. optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1)) (a partition "
            "group to freeze: optim.set_to_zero()). A hand-made optimizer whose update already "
            "returns what to add (optax's convention) ends in optim.scale(-lr) or is marked "
            "tx.as_optimizer()"
        )


class Step:
    """A training step. ``state = step.init(model, seed=0)``, then ``state, metrics = step(state, batch)``.

    Built by `train_step` / `fengine.multi_step`. With ``donate=True`` the input
    state is consumed (its tensors are updated in place and reused by the
    returned state); with ``donate=False`` it is deep-copied first and stays
    valid. Both give bitwise-identical results. With ``compile=True`` the whole step
    runs as one ``torch.compile`` graph (`fengine.compiled`).
    """

    def __init__(
        self,
        parts: Sequence[Part],
        wrappers: Sequence[Wrapper] = (),
        *,
        donate: bool = True,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        from fengine.compiled import (
            CompiledStep,
            compile_options,
            refuse_untraceable,
            traced_grad_fn,
        )
        from fengine.wrappers import check_wrappers

        who = "train_step" if parts[0].name is None else "multi_step"
        if not isinstance(donate, bool):
            raise TypeError(f"{who}: donate must be True or False, got {donate!r}")
        for part in parts:
            _check_ends_in_optimizer(part)
        self.parts, self.wrappers, self.donate = tuple(parts), check_wrappers(wrappers), donate
        _check_plateaus(self.parts, self.wrappers)
        self.micro_batches = max((w.micro_batches for w in self.wrappers), default=1)
        """Batches per update: `fit` hands the step groups of this many (`fengine.MicroBatches`)."""
        multi = len(self.parts) > 1 or self.parts[0].name is not None
        options = compile_options(compile)
        self._fn = self._compose(lambda part: _grad_fn(part, multi), multi)
        self._compiled: CompiledStep | None = None
        if options is not None:
            refuse_untraceable(self.wrappers)
            self._compiled = CompiledStep(
                self._compose(traced_grad_fn, multi),
                self._fn,
                options,
                probe=lambda state, batch: unreached_params(self.parts, multi, state, batch),
            )
        self._fits: tuple[int, int] | None = None  # ids of (opt_state, extra) last checked or made

    @property
    def compile_seconds(self) -> float | None:
        """A compiled step's first-call time (trace, compile, run); None before it or when eager."""
        return None if self._compiled is None else self._compiled.compile_seconds

    def _compose(self, base: Callable[[Part], GradFn], multi: bool) -> StepFn:
        """The step function: each part's ``base`` gradient computation and update, wrapped."""
        stages = []
        for part in self.parts:
            grad_fn, apply = base(part), _apply_fn(part)
            for w in reversed(self.wrappers):  # the first written ends up outermost
                grad_fn, apply = w.forward(grad_fn, part), w.gradient(apply, part)
            stages.append((part, grad_fn, apply))

        def core(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
            if not multi:
                _, grad_fn, apply = stages[0]
                state, metrics = apply(state, grad_fn(state, batch))
            else:  # parts in turn, each seeing the params the parts before it updated
                metrics, given = {}, state
                for part, grad_fn, apply in stages:
                    try:
                        state, m = apply(state, grad_fn(state, batch))
                    except Exception:
                        if state is not given:  # earlier parts updated the params in place
                            given._mark_donated(f"step {given.step + 1}, which failed midway")
                        raise
                    metrics.update({f"{part.name}/{k}": v for k, v in m.items()})
            return state.replace(step=state.step + 1), metrics

        fn: StepFn = core
        for w in self.wrappers:  # the first written innermost: its post-update work runs first
            fn = w.after(fn)
        return fn

    def init(
        self,
        model: nn.Module,
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        copy: bool = True,
    ) -> TrainState:
        """The state this step trains: ``model``'s params and buffers (copied to ``device``, default:
        where they are), the optimizer state of every part and the state of every wrapper that
        keeps one, on the same device. The module itself stays where it is: the step binds the
        state's tensors into it, and it keeps its initial weights until `TrainState.load_into`.

        ``copy=False`` saves the copy (one model's worth of memory): the state holds the module's
        own tensors (those already on ``device``), which a donating step updates in place, so the
        module holds the live weights as it trains; build one state per module this way."""
        if not isinstance(copy, bool):
            raise TypeError(f"step.init: copy must be a bool, got {copy!r}")
        if device is not None:
            device = parse_device(device, "step.init")
        state = TrainState.create(model, seed=seed, device=device, copy=copy)
        state = state.replace(opt_state=self._init_opt(state.params))
        state = state.replace(
            extra={w.name: w.init(state, self.parts) for w in self.wrappers if w.name}
        )
        self._fits = (id(state.opt_state), id(state.extra))
        return state

    def _init_opt(self, params: Mapping[str, torch.Tensor]) -> Any:
        """The optimizer state of every part (a dict by part name for a multi step)."""
        owned = {p.name: {n: params[n] for n in p.owned(params)} for p in self.parts}
        if self.parts[0].name is None:
            return self.parts[0].tx.init(owned[None])
        check_ownership(owned, params)
        return {name: self.parts[i].tx.init(o) for i, (name, o) in enumerate(owned.items())}

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        if not isinstance(state, TrainState):
            raise TypeError(f"step: expected a TrainState, got {type(state).__name__}")
        aliases = state.__dict__.get("_aliases")  # shared with the states `replace` made
        if aliases is not None and aliases[0] is not None:
            state.check_live()  # one of them was consumed: these tensors are another step's
        if (id(state.opt_state), id(state.extra)) != self._fits:
            self.check(state)
        given = state
        if not self.donate:
            state = state.clone()
        new, metrics = (self._fn if self._compiled is None else self._compiled)(state, batch)
        self._fits = (id(new.opt_state), id(new.extra))
        if self.donate:
            given._mark_donated(f"step {given.step + 1}", keep=new)
        return new, metrics

    def check(self, state: TrainState) -> None:
        """Raise `StepMismatchError` naming what differs if ``state`` was not built for this step."""
        check_fits(self, state)

    def __repr__(self) -> str:
        parts = ", ".join(p.name or "model" for p in self.parts)
        compiled = "" if self._compiled is None else f", compile={self._compiled.options or True}"
        return (
            f"Step(parts=[{parts}], wrappers={list(self.wrappers)}, donate={self.donate}{compiled})"
        )


def train_step(
    loss_fn: LossFn,
    tx: GradientTransformation,
    *wrappers: Wrapper,
    donate: bool = True,
    compile: bool | Mapping[str, Any] = False,
) -> Step:
    """Build the step ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``loss_fn(model, batch)``; ``model`` is the state's module run with
        the state's params and buffers bound. Returns a loss tensor, a dict of
        losses (summed over keys containing "loss"; MMEngine's parse_losses) or
        ``(loss, aux)``.
      tx: the gradient transformation, given once (e.g. ``optim.chain(gradient_noise(...),
        optim.clip_by_global_norm(1.0), optim.adamw(1e-3))``). It must end in an optimizer
        (`fengine.optim.base.missing_optimizer`): one with ``apply``, a `partition` of such, a
        chain ending in ``scale(-lr)``, or ``tx.as_optimizer()`` (optax-style updates).
      wrappers: `fengine.amp`, `accumulate`, `ema`, `check_finite`, your own
        (`fengine.forward_wrapper`, `fengine.post_update`), in reading order.
      donate: update the state in place and consume the input (True, the default), or copy
        (False); anything else is refused.
      compile: run the whole step (forward, backward, update, wrappers) as one
        ``torch.compile`` graph (`fengine.compiled`); True, or a dict of
        ``torch.compile`` options (``backend``, ``mode``, ``dynamic``, ``options``).
    """
    if not callable(loss_fn):
        raise TypeError(f"train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(tx, GradientTransformation):
        raise TypeError(
            f"train_step: tx must be a GradientTransformation (e.g. fengine.optim.adamw(...)), got {type(tx).__name__}"
        )
    return Step([Part(None, loss_fn, tx)], wrappers, donate=donate, compile=compile)
