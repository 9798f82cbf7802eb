"""Params without a gradient on some steps (a skipped branch) vs torch.optim, bit for bit.

torch skips such a param entirely: its ``state[p]['step']`` does not advance, so its bias
corrections (Adam), lr decay (Adagrad) and the start of its momentum buffer (SGD) go by
its own count. fengine's states keep one count and, per param, the updates it ``missed``.
"""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from helpers import assert_dicts_equal
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import checkpoint, optim


SHAPES = {"a": (5, 3), "b": (7,), "c": (4, 2), "d": (3,)}
# the params with a gradient at each step: c and d start late, next to params that started
# earlier (torch's fused SGD refuses such a mix: see _reference), and each misses some steps
PRESENT = ["ab", "abc", "bcd", "abcd", "c", "ad", "abcd"]

# (id, fengine factory, torch class, kwargs, {fengine state field: torch state key})
SGD_STATE = {"momentum_buffer": "momentum_buffer"}
ADAM_STATE = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
AMS_STATE = {**ADAM_STATE, "max_exp_avg_sq": "max_exp_avg_sq"}
CASES = [
    (
        "sgd_dampening",
        optim.sgd,
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=1e-2),
        SGD_STATE,
    ),
    (
        "sgd_nesterov",
        optim.sgd,
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, nesterov=True),
        SGD_STATE,
    ),
    ("adam", optim.adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2), ADAM_STATE),
    ("adam_amsgrad", optim.adam, torch.optim.Adam, dict(lr=1e-2, amsgrad=True), AMS_STATE),
    (
        "adamw_amsgrad_maximize",
        optim.adamw,
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=5e-2, amsgrad=True, maximize=True),
        AMS_STATE,
    ),
    (
        "adagrad_lr_decay",
        optim.adagrad,
        torch.optim.Adagrad,
        dict(lr=0.1, lr_decay=0.1, weight_decay=1e-2, initial_accumulator_value=0.1),
        {"sum": "sum"},
    ),
    (
        "rmsprop_centered_momentum",
        optim.rmsprop,
        torch.optim.RMSprop,
        dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
        {"square_avg": "square_avg", "grad_avg": "grad_avg", "momentum_buffer": "momentum_buffer"},
    ),
]
RUNS = [(c, False) for c in CASES] + [(c, True) for c in CASES if c[1] is not optim.rmsprop]


def _problem():
    """Params (one float64: a dtype group of its own for the fused kernels) and each step's grads."""
    g = torch.Generator().manual_seed(0)
    dtype = {"b": torch.float64}
    params = {n: torch.randn(s, generator=g, dtype=dtype.get(n)) for n, s in SHAPES.items()}
    steps = [
        {
            n: torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in params.items()
            if n in names
        }
        for names in PRESENT
    ]
    return params, steps


def _reference(torch_cls, kw, fused, params, steps):
    """torch.optim on the same params and grads (``None`` for a missing one)."""
    ref = {n: p.clone().requires_grad_() for n, p in params.items()}
    impl = dict(fused=True) if fused else dict(foreach=True)
    if fused and torch_cls is torch.optim.SGD:
        # torch's fused SGD raises on a step that starts some momentum buffers but not all:
        # one optimizer per param, each starting its own (the kernel is elementwise)
        opts = [torch_cls([r], **impl, **kw) for r in ref.values()]
    else:
        opts = [torch_cls(list(ref.values()), **impl, **kw)]
    for grads in steps:
        for n, r in ref.items():
            r.grad = grads[n].clone() if n in grads else None
        for o in opts:
            o.step()
    per_param = {n: o.state[r] for o in opts for n, r in ref.items() if r in o.state}
    return {n: r.detach() for n, r in ref.items()}, per_param


@pytest.mark.parametrize("case,fused", RUNS, ids=[c[0] + ("_fused" if f else "") for c, f in RUNS])
def test_params_missing_gradients_match_torch_bitwise(case, fused):
    _, factory, torch_cls, kw, fields = case
    params, steps = _problem()
    want, torch_state = _reference(torch_cls, kw, fused, params, steps)

    tx = factory(**kw, **(dict(fused=True) if fused else {}))
    state = tx.init(params)
    for t, grads in enumerate(steps):
        grads = {n: g.clone() for n, g in grads.items()}
        params, state = optim.step_params(tx, grads, state, params, step=t)

    assert_dicts_equal(params, want, "params")
    assert set(torch_state) == set(SHAPES)
    for n, s in torch_state.items():
        for field, key in fields.items():
            assert torch.equal(getattr(state, field)[n], s[key]), f"{field}[{n}]"
        if "step" in s and factory is not optim.rmsprop:  # RMSprop reads no count
            assert state.num_updates - state.missed.get(n, 0) == int(s["step"]), n
    assert state.num_updates == len(PRESENT)


def test_every_param_with_a_gradient_keeps_missed_empty():
    params, _ = _problem()
    tx = optim.adamw(1e-2)
    state = tx.init(params)
    for t in range(3):
        grads = {n: torch.ones_like(p) for n, p in params.items()}
        params, state = optim.step_params(tx, grads, state, params, step=t)
    assert state.missed == {} and state.num_updates == 3


# ---------------------------------------------------------------- through a step
class Branchy(nn.Module):
    """A layer used only when the batch says so (a skipped branch / layer drop)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra = nn.Linear(4, 3), nn.Linear(3, 3)

    def forward(self, x, use_extra):
        h = self.body(x)
        return self.extra(h) if use_extra else h


def _loss(model, batch):
    x, y, use_extra = batch
    return F.cross_entropy(model(x, use_extra), y)


def _batches(flags):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), f) for f in flags
    ]


FLAGS = [False, False, True, True, False, True]


@pytest.mark.parametrize(
    "make_tx,make_torch",
    [
        (lambda: optim.adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True)),
        (
            lambda: optim.sgd(0.1, momentum=0.9, dampening=0.5),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, foreach=True),
        ),
        (
            lambda: optim.adagrad(0.1, lr_decay=0.1),
            lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.1, foreach=True),
        ),
    ],
    ids=["adam", "sgd_dampening", "adagrad_lr_decay"],
)
def test_train_step_with_a_skipped_layer_matches_torch(make_tx, make_torch):
    ref = Branchy()
    opt = make_torch(ref.parameters())
    step = fe.train_step(_loss, make_tx())
    state = step.init(Branchy())
    for batch in _batches(FLAGS):
        state, _ = step(state, batch)
        opt.zero_grad(set_to_none=True)
        _loss(ref, batch).backward()
        opt.step()
    assert_dicts_equal(state.params, {n: p.detach() for n, p in ref.named_parameters()}, "params")
    assert state.opt_state.missed == {"extra.weight": 3, "extra.bias": 3}


def test_missed_counts_survive_a_checkpoint(tmp_path):
    step = fe.train_step(_loss, optim.adamw(1e-2))
    batches = _batches(FLAGS)
    a = step.init(Branchy())
    for batch in batches[:2]:
        a, _ = step(a, batch)
    path = checkpoint.save(tmp_path / "ck.safetensors", a)
    b = checkpoint.load(path, step.init(Branchy()))
    assert b.opt_state.missed == {"extra.weight": 2, "extra.bias": 2}
    for batch in batches[2:]:
        a, _ = step(a, batch)
        b, _ = step(b, batch)
    assert_dicts_equal(b.params, a.params, "params")


def test_checkpoint_without_missed_counts_loads_with_none_missed(tmp_path):
    """A checkpoint saved before states had ``missed`` (its AdamState had no such field, and
    every param had had every gradient: no count) loads, with the empty ``missed`` it stands for."""
    old_adam = namedtuple("AdamState", [f for f in optim.AdamState._fields if f != "missed"])
    step = fe.train_step(_loss, optim.adam(1e-2))
    state = step.init(Branchy())
    old = state.replace(opt_state=old_adam(*state.opt_state[:-1]))
    path = checkpoint.save(tmp_path / "old.safetensors", old)
    loaded = checkpoint.load(path, step.init(Branchy()))
    assert loaded.opt_state.missed == {}
    for name, t in state.opt_state.exp_avg.items():
        assert torch.equal(loaded.opt_state.exp_avg[name], t)


# ---------------------------------------------------------------- compiled
class _Counter:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize(
    "make_tx",
    [lambda: optim.adam(1e-2), lambda: optim.sgd(0.1, momentum=0.9, dampening=0.5)],
    ids=["adam", "sgd_dampening"],
)
def test_compiled_step_continues_a_state_with_missed_counts(make_tx):
    """Eager steps with the layer skipped, then the layer in use: compiled as eager, one graph.
    (The compiled step's gradients are never missing: ``torch.func.grad`` gives zeros.)"""
    counter = _Counter()
    eager = fe.train_step(_loss, make_tx())
    compiled = fe.train_step(_loss, make_tx(), compile={"backend": counter})
    a, b = eager.init(Branchy()), eager.init(Branchy())
    for batch in _batches([False, False]):
        a, _ = eager(a, batch)
        b, _ = eager(b, batch)
    assert a.opt_state.missed == {"extra.weight": 2, "extra.bias": 2}
    for batch in _batches([True] * 4):
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    assert counter.graphs == 1 and compiled._compiled.fallback_reason is None
    assert b.opt_state.missed == a.opt_state.missed
    for n, p in a.params.items():
        torch.testing.assert_close(b.params[n], p, rtol=1e-5, atol=1e-6)


def test_a_group_without_gradients_reports_without_a_global_step():
    """``update`` without ``step`` falls back to the optimizer's own count; a scheduled group
    that got no gradient then reported by resolving the schedule at None (an error)."""
    params = {"a": torch.zeros(3), "b": torch.zeros(3)}
    lr = fe.schedules.linear(0.1, 0.1, end=6)
    tx = optim.partition({"A": optim.sgd(0.1), "B": optim.sgd(lr)}, {"a": "A", "b": "B"})
    _, state = tx.update({"a": torch.ones(3)}, tx.init(params), params)
    assert optim.hyperparams(state)["B/lr"] == lr(0)
    _, state = tx.update({"a": torch.ones(3)}, state, params, step=3)
    assert optim.hyperparams(state)["B/lr"] == lr(3)
