"""Python per update that grows with the number of params or buffers, where a foreach op or a
cached list does the work: counted in bytecodes (the same numbers run after run, unlike time),
as the difference a wrapper or transform makes to the same step without it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import optim


UPDATES = 2


class _Layers(nn.Module):
    """``n`` BatchNorm1d layers (2 params, 3 buffers each) and a head."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bns = nn.ModuleList([nn.BatchNorm1d(4) for _ in range(n)])
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for bn in self.bns:
            x = bn(x)
        return self.head(x)


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _bytecodes(n: int, make_step: Callable[[nn.Module], fe.Step], only: str = "") -> float:
    """Bytecodes per update of ``make_step``'s step on ``_Layers(n)`` (after a first update), in
    files whose path contains ``only``."""
    torch.manual_seed(0)
    model = _Layers(n)
    step = make_step(model)
    state = step.init(model, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(UPDATES + 1)]  # fmt: skip
    state, _ = step(state, batches[0])
    count = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode" and only in frame.f_code.co_filename:
            count += 1
        return trace

    sys.settrace(trace)
    try:
        for batch in batches[1:]:
            state, _ = step(state, batch)
    finally:
        sys.settrace(None)
    return count / UPDATES


def _growth(make_base: Callable, make_with: Callable) -> float:
    """Extra bytecodes per update per added layer (2 params, 3 buffers) that ``make_with`` costs
    over ``make_base``, between 4 and 24 layers."""
    extra = [_bytecodes(n, make_with) - _bytecodes(n, make_base) for n in (4, 24)]
    return (extra[1] - extra[0]) / 20


def _sgd(model: nn.Module) -> fe.Step:
    return fe.train_step(_loss, optim.sgd(0.1))


def test_ema_of_buffers_costs_no_python_per_buffer():
    """Measured before the fix: ~65 bytecodes per BatchNorm layer per update (the float buffers
    filtered again at every update); now a constant."""
    growth = _growth(
        _sgd, lambda m: fe.train_step(_loss, optim.sgd(0.1), fe.ema(0.99, update_buffers=True))
    )
    assert growth < 2, growth


def _labels(name: str, tensor: torch.Tensor) -> str:
    return "head" if name.startswith("head") else "body"


def test_partition_picks_its_groups_in_c():
    """Measured before: ~16 bytecodes per param per update (each group's grads and params
    picked into dicts by comprehensions); now each is a cached itemgetter."""
    growth = _growth(
        _sgd,
        lambda m: fe.train_step(
            _loss, optim.partition({"body": optim.sgd(0.1), "head": optim.sgd(0.01)}, _labels)
        ),
    )
    assert growth < 2, growth


def test_add_decayed_weights_picks_its_params_in_c():
    growth = _growth(
        lambda m: fe.train_step(_loss, optim.sgd(0.1, weight_decay=1e-4)),
        lambda m: fe.train_step(
            _loss, optim.chain(optim.add_decayed_weights(1e-4), optim.sgd(0.1))
        ),
    )
    assert growth < 2, growth


def test_partition_keeps_a_bounded_number_of_groupings():
    """A mixture of experts gives gradients to another subset of params at each update: the
    partition's groupings (by that subset) stay bounded, and each subset is grouped right."""
    params = {f"expert{i}.weight": torch.zeros(2) for i in range(12)} | {
        "head.weight": torch.zeros(2)
    }
    tx = optim.partition({"body": optim.sgd(1.0), "head": optim.sgd(0.5)}, _labels)
    state = tx.init(params)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        chosen = [n for n in params if n == "head.weight" or torch.rand((), generator=g) < 0.5]
        grads = {n: torch.ones(2) for n in chosen}
        updates, state = tx.update(grads, state, params)
        assert list(updates) == chosen
        assert all(torch.equal(updates[n], torch.full((2,), -0.5 if n == "head.weight" else -1.0))
                   for n in chosen)  # fmt: skip
    cells = dict(zip(tx.update.__code__.co_freevars, tx.update.__closure__ or ()))
    groups_of = cells["groups_of"].cell_contents
    cache = dict(zip(groups_of.__code__.co_freevars, groups_of.__closure__))["cache"].cell_contents
    assert 0 < len(cache) <= 64


def test_the_step_runs_no_python_per_param():
    """fengine's own Python per update does not grow with the model (the modules' forwards
    aside): the state's tensors are bound into the module by a C loop and the gradients dict
    is built in C (measured before: ~39 bytecodes per tensor to bind and unbind, 10 per param
    for the gradients; 1877 -> 5778 per update from 4 to 24 BatchNorm layers). Params the loss
    misses are still left out of the update."""
    model = _Layers(3)
    missed = fe.train_step(lambda m, b: m.head(b[0]).sum(), optim.sgd(0.1))
    state = missed.init(model)
    before = {n: t.clone() for n, t in state.params.items()}
    state, _ = missed(state, (torch.ones(2, 4), None))
    moved = {n for n, t in state.params.items() if not torch.equal(t, before[n])}
    assert moved == {"head.weight", "head.bias"}
    own = [_bytecodes(n, _sgd, only="/fengine/") for n in (4, 24)]  # the modules' own aside
    assert own[1] - own[0] < 20, own
