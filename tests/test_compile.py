"""Whole-step compile (`fengine.compiled`): one graph, no recompiles, eager parity, fallback.

Most tests compile with a counting backend (dynamo traces the whole step; the graph runs
through torch's FX interpreter): that checks graphs, breaks and recompiles in seconds.
One test runs inductor for the numbers: tolerance to eager, run-to-run bits, exact resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import ce_loss, mlp, mlp_batches
from torch import nn

import fengine as fe
from fengine import checkpoint, optim, schedules
from fengine.compiled import CompileFallbackWarning, lift, lower
from fengine.schedule_ops import value_at


STEPS = 50
LR = schedules.warmup(schedules.cosine(0.05, T_max=STEPS), steps=5)  # moves every step
TOL = {"rtol": 1e-4, "atol": 1e-5}  # compiled vs eager after 50 steps: float32 rounding drift
HALF_TOL = {"rtol": 1e-2, "atol": 1e-4}  # under fp16 autocast the forward rounds at ~1e-3


class Counter:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def _leaves(state: fe.TrainState) -> list:
    return pytree.tree_flatten_with_path(state)[0]


def _batch(step: fe.Step, b):
    return fe.MicroBatches([b, (b[0] * 0.5, b[1])]) if step.micro_batches > 1 else b


PIECES = {  # name -> (tx, wrappers): every supported piece, in one configuration or another
    "adamw+clip_norm+clip_value+fp16+accumulate+ema": (
        lambda: optim.chain(
            optim.clip_by_global_norm(1.0), optim.clip_by_value(0.5), optim.adamw(LR)
        ),
        lambda: (fe.amp("float16"), fe.accumulate(2), fe.ema(momentum=0.1)),
    ),
    "sgd(nesterov, wd)+bf16+swa": (
        lambda: optim.sgd(LR, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda: (fe.amp("bfloat16"), fe.swa(begin=3)),
    ),
    "adam(scheduled b1, amsgrad)+ema(gamma)": (
        lambda: optim.adam(LR, b1=schedules.linear(0.9, 0.95, 1.0, end=20), amsgrad=True),
        lambda: (fe.ema(momentum=0.01, gamma=10.0, interval=2),),
    ),
}


MAIN = "adamw+clip_norm+clip_value+fp16+accumulate+ema"  # the others run with the slow tests


@pytest.mark.parametrize(
    "name", [n if n == MAIN else pytest.param(n, marks=pytest.mark.slow) for n in sorted(PIECES)]
)
def test_fifty_scheduled_steps_compile_once_and_match_eager(name):
    make_tx, make_wrappers = PIECES[name]
    tol = HALF_TOL if "fp16" in name else TOL
    counter = Counter()
    compiled = fe.train_step(ce_loss, make_tx(), *make_wrappers(), compile={"backend": counter})
    eager = fe.train_step(ce_loss, make_tx(), *make_wrappers())
    a, b = eager.init(mlp(), seed=1), compiled.init(mlp(), seed=1)
    lrs = []
    for batch in mlp_batches(STEPS):
        a, _ = eager(a, _batch(eager, batch))
        b, metrics = compiled(b, _batch(compiled, batch))
        lrs.append(float(metrics["lr"]))
    assert counter.graphs == 1  # fullgraph: a graph break would have raised (and warned)
    assert compiled._compiled is not None and compiled._compiled.fallback_reason is None
    assert lrs == pytest.approx([LR(t) for t in range(STEPS)], rel=1e-12)
    assert len(set(lrs)) > 40  # the schedule did move
    # the same state, leaf for leaf: Python numbers stay Python numbers of the same type
    la, lb = _leaves(a), _leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, **tol)
        elif isinstance(x, float):
            assert type(y) is float and y == pytest.approx(x, rel=1e-12)
        else:
            assert type(y) is type(x) and y == x


@pytest.mark.slow  # ~3 s of tracing each; the fifty-step test already sees one graph per config
@pytest.mark.parametrize("name", sorted(PIECES))
def test_explain_finds_one_graph_and_no_break(name):
    make_tx, make_wrappers = PIECES[name]
    step = fe.train_step(ce_loss, make_tx(), *make_wrappers(), compile=True)
    state = step.init(mlp())
    lifted, _ = lift(state)
    assert step._compiled is not None
    step._compiled.prepare(state)
    explained = torch._dynamo.explain(step._compiled.traced)(
        lifted, _batch(step, mlp_batches(1)[0])
    )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_multi_step_compiles_to_one_graph():
    counter = Counter()
    parts = {
        "head": (ce_loss, optim.adamw(LR), "2"),
        "body": (ce_loss, optim.sgd(LR, momentum=0.9), "0"),
    }
    compiled = fe.multi_step(parts, compile={"backend": counter})
    eager = fe.multi_step(parts)
    a, b = eager.init(mlp()), compiled.init(mlp())
    for batch in mlp_batches(4):
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    assert counter.graphs == 1
    for n in a.params:
        torch.testing.assert_close(b.params[n], a.params[n], **TOL)


def test_counters_moved_between_steps_reach_the_graph():
    """`fit` moves epoch / batch_in_epoch between steps: the graph must see the new values
    (here ema(begin_epoch=2) starts averaging from epoch 1) without recompiling."""
    counter = Counter()
    compiled = fe.train_step(
        ce_loss, optim.sgd(0.1), fe.ema(0.5, begin_epoch=2), compile={"backend": counter}
    )
    eager = fe.train_step(ce_loss, optim.sgd(0.1), fe.ema(0.5, begin_epoch=2))
    a, b = eager.init(mlp()), compiled.init(mlp())
    for i, batch in enumerate(mlp_batches(6)):
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
        a = a.replace(epoch=i // 3, batch_in_epoch=i % 3 + 1)
        b = b.replace(epoch=i // 3, batch_in_epoch=i % 3 + 1)
    assert counter.graphs == 1
    assert b.extra["ema"].steps == a.extra["ema"].steps == 2
    for n, p in a.extra["ema"].params.items():
        torch.testing.assert_close(b.extra["ema"].params[n], p, **TOL)


def test_a_batch_of_another_shape_or_count_is_not_run_through_the_last_graph():
    """Guards are skipped only for a batch that looks like the last one: a short last batch or
    a short accumulation group gets (and reuses) its own graph, and the numbers stay eager's."""
    counter = Counter()
    compiled = fe.train_step(
        ce_loss, optim.sgd(0.1), fe.accumulate(2), compile={"backend": counter}
    )
    eager = fe.train_step(ce_loss, optim.sgd(0.1), fe.accumulate(2))
    a, b = eager.init(mlp()), compiled.init(mlp())
    full, short = mlp_batches(2), mlp_batches(1, batch=5)
    groups = [full, full, short, short + full[:1], full, full[:1], full]
    for g in groups:
        a, _ = eager(a, fe.MicroBatches(g))
        b, _ = compiled(b, fe.MicroBatches(g))
        for n, p in a.params.items():
            torch.testing.assert_close(b.params[n], p, **TOL)
    assert 2 <= counter.graphs <= 4  # (8, 8), (5,), (5, 8), (8,): dynamo may merge shapes


def test_one_compiled_step_trains_two_states_in_turn():
    """Guards are skipped only for the state the step returned: a state of another model (or
    an older one) gets the guarded call, and its own graph."""
    counter = Counter()
    compiled = fe.train_step(ce_loss, optim.adamw(LR), compile={"backend": counter})
    eager = fe.train_step(ce_loss, optim.adamw(LR))
    runs = [
        (eager.init(mlp(0)), compiled.init(mlp(0))),
        (eager.init(mlp(1)), compiled.init(mlp(1))),
    ]
    for batch in mlp_batches(4):
        for k, (a, b) in enumerate(runs):
            runs[k] = (eager(a, batch)[0], compiled(b, batch)[0])
    for a, b in runs:
        for n, p in a.params.items():
            torch.testing.assert_close(b.params[n], p, **TOL)
    assert counter.graphs <= 2  # dynamo may or may not specialise on the module


def test_batchnorm_running_stats_update_in_the_compiled_step():
    """BatchNorm updates its buffers in place during the forward (torch.func.grad refuses that
    for tensors from outside the transform): the compiled step trains them as eager does."""
    counter = Counter()
    compiled = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), compile={"backend": counter})
    eager = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9))

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    a, b = eager.init(net()), compiled.init(net())
    for batch in mlp_batches(4):
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    assert counter.graphs == 1
    assert int(b.buffers["1.num_batches_tracked"]) == 4
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(b.buffers[name], a.buffers[name], **TOL)
    for n, p in a.params.items():
        torch.testing.assert_close(b.params[n], p, **TOL)


class Branchy(nn.Module):
    """A model with data-dependent Python control flow: cannot be traced as one graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_untraceable_model_falls_back_to_eager_with_one_warning():
    compiled = fe.train_step(ce_loss, optim.adamw(1e-2), compile={"backend": Counter()})
    eager = fe.train_step(ce_loss, optim.adamw(1e-2))
    a, b = eager.init(Branchy()), compiled.init(Branchy())
    batches = mlp_batches(3)
    with pytest.warns(CompileFallbackWarning, match="running it eagerly") as caught:
        for batch in batches:
            a, _ = eager(a, batch)
            b, _ = compiled(b, batch)
    assert len(caught) == 1
    assert "Data-dependent" in str(caught[0].message) or "data-dependent" in str(caught[0].message)
    for n in a.params:  # the fallback is the eager step itself
        assert torch.equal(a.params[n], b.params[n])


class WithUnused(nn.Module):
    """An MLP with a head its forward never calls (a param the loss does not reach)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused = mlp(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_params_the_loss_does_not_reach_are_left_alone_as_eager_leaves_them():
    """torch.func.grad gives an unreached param zeros, which AdamW's weight decay would move; the
    eager step (as torch.optim) leaves it. The compiled step finds such params before it traces
    and runs eagerly, saying which and how to compile (freeze them); frozen, it compiles."""
    tx = lambda: optim.adamw(1e-2, weight_decay=0.1)  # noqa: E731
    compiled = fe.train_step(ce_loss, tx(), compile={"backend": Counter()})
    eager = fe.train_step(ce_loss, tx())
    a, b = eager.init(WithUnused()), compiled.init(WithUnused())
    before = b.params["unused.weight"].clone()
    with pytest.warns(
        CompileFallbackWarning, match=r"does not reach \(unused.weight, unused.bias\)"
    ):
        for batch in mlp_batches(3):
            a, _ = eager(a, batch)
            b, _ = compiled(b, batch)
    assert torch.equal(b.params["unused.weight"], before)
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n])
    frozen = WithUnused()
    frozen.unused.requires_grad_(False)
    counter = Counter()
    step = fe.train_step(ce_loss, tx(), compile={"backend": counter})
    state = step.init(frozen)
    for batch in mlp_batches(3):
        state, _ = step(state, batch)
    assert step._compiled is not None and step._compiled.fallback_reason is None
    assert counter.graphs == 1


def test_a_frozen_model_or_a_detached_loss_is_the_eager_steps_error():
    frozen = mlp().requires_grad_(False)
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
    with pytest.raises(ValueError, match="no trainable params"):
        step(step.init(frozen), mlp_batches(1)[0])
    detached = fe.train_step(lambda m, b: ce_loss(m, b).detach(), optim.sgd(0.1),
                             compile={"backend": Counter()})  # fmt: skip
    with pytest.raises(ValueError, match="the loss does not require grad"):
        detached(detached.init(mlp()), mlp_batches(1)[0])


def test_first_call_time_is_logged(caplog):
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
    state = step.init(mlp())
    assert step.compile_seconds is None
    with caplog.at_level(logging.INFO, logger="fengine"):
        state, _ = step(state, mlp_batches(1)[0])
        state, _ = step(state, mlp_batches(1)[0])
    lines = [
        r.getMessage() for r in caplog.records if "compiled step: first call" in r.getMessage()
    ]
    assert len(lines) == 1 and "TORCHINDUCTOR_CACHE_DIR" in lines[0]
    assert step.compile_seconds is not None and step.compile_seconds > 0


def test_dropout_is_deterministic_and_a_function_of_seed_and_step():
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()}, donate=False)
    state = step.init(mlp(dropout=0.5), seed=3)
    batch = mlp_batches(1)[0]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    one, _ = step(state, batch)
    two, _ = step(state, batch)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left alone
    other, _ = step(step.init(mlp(dropout=0.5), seed=4), batch)
    w = "2.weight" if "2.weight" in one.params else "3.weight"
    assert torch.equal(one.params[w], two.params[w])
    assert not torch.equal(one.params[w], other.params[w])


def test_generators_are_seeded_only_for_a_graph_that_draws(monkeypatch):
    """The first call finds out whether the graph draws random numbers; one that does not is not
    seeded again (no generator work per call); one that draws is seeded every call."""
    import fengine.compiled as compiled

    seeded = []
    real = compiled.seeded_default_generators

    def counting(*a, **kw):
        seeded.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(compiled, "seeded_default_generators", counting)
    batches = mlp_batches(3)
    for dropout, calls in ((0.0, 1), (0.5, 3)):
        step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
        state = step.init(mlp(dropout=dropout), seed=3)
        seeded.clear()
        for b in batches:
            state, _ = step(state, b)
        assert len(seeded) == calls, (dropout, seeded)


def test_lift_lower_round_trip_keeps_types_and_big_ints():
    step = fe.train_step(ce_loss, optim.adamw(LR), fe.ema(0.9))
    state = step.init(mlp(), seed=2**62 + 1).replace(epoch=3, batch_in_epoch=7)
    lifted, layout = lift(state)
    assert isinstance(lifted.step, torch.Tensor) and isinstance(lifted.opt_state.lr, torch.Tensor)
    back, reusable = lower(lifted, layout)
    assert reusable
    la, lb = _leaves(state), _leaves(back)
    assert [k for k, _ in la] == [k for k, _ in lb] and back.seed == 2**62 + 1
    for (_, x), (_, y) in zip(la, lb):
        assert type(x) is type(y)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_wrappers_without_a_traced_form_are_refused_up_front():
    with pytest.raises(ValueError, match=r"compile=True does not support check_finite\(\)"):
        fe.train_step(ce_loss, optim.sgd(0.1), fe.check_finite(), compile=True)


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        fe.train_step(ce_loss, optim.sgd(0.1), compile="yes")
    with pytest.raises(ValueError, match=r"unknown torch.compile options \['fullgraph'\]"):
        fe.train_step(ce_loss, optim.sgd(0.1), compile={"fullgraph": False})


SCHEDULES = [
    schedules.constant(0.1, 0.5, end=7),
    schedules.linear(0.1, 0.25, 1.0, begin=3, end=13),
    schedules.step(0.1, step_size=4, gamma=0.5),
    schedules.multistep(0.1, milestones=[3, 3, 9], gamma=0.3),
    schedules.exponential(0.1, gamma=0.9, begin=2, end=10),
    schedules.cosine(0.1, T_max=10, eta_min_ratio=0.05),
    schedules.cosine(0.1, begin=2, end=12, eta_min=0.01),
    schedules.poly(0.1, eta_min=1e-3, power=2.0, end=15),
    schedules.warmup(schedules.cosine(0.1, T_max=20), steps=4, kind="constant"),
    schedules.cosine(0.1, T_max=3, by_epoch=True, steps_per_epoch=4),
    schedules.join(schedules.linear(0.1, 0.1, end=5), schedules.step(0.1, step_size=2, begin=5)),
    optim.scale_lr(schedules.cosine(0.1, T_max=10), base_batch_size=64, batch_size=32),
]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: type(s).__name__)
def test_schedules_in_torch_ops_equal_their_host_values(s):
    for t in range(25):
        v = value_at(s, torch.tensor(t))
        assert v.dtype == torch.float64 and v.dim() == 0
        assert math.isclose(float(v), s(t), rel_tol=1e-12, abs_tol=1e-15), (t, float(v), s(t))


def test_schedule_without_a_torch_form_is_named():
    s = schedules.onecycle(0.1, eta_max=1.0, total_steps=10)
    with pytest.raises(TypeError, match="OneCycle.*has no torch form"):
        value_at(s, torch.tensor(0))


# ------------------------------------------------------------------ inductor (the real thing)
@pytest.fixture(scope="module")
def inductor_run(tmp_path_factory):
    """One inductor-compiled step, reused: 12 steps straight, and 6 + checkpoint + 6."""
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(LR))
    step = fe.train_step(ce_loss, tx, fe.ema(momentum=0.1), compile=True)
    eager = fe.train_step(ce_loss, tx, fe.ema(momentum=0.1))
    batches = mlp_batches(12)

    def run(state, bs):
        for b in bs:
            state, _ = step(state, b)
        return state

    straight = run(step.init(mlp(dropout=0.2), seed=5), batches)
    again = run(step.init(mlp(dropout=0.2), seed=5), batches)
    half = run(step.init(mlp(dropout=0.2), seed=5), batches[:6])
    path = checkpoint.save(tmp_path_factory.mktemp("ck") / "half.safetensors", half)
    resumed = run(checkpoint.load(path, like=step.init(mlp(dropout=0.2), seed=5)), batches[6:])
    ref = eager.init(mlp(), seed=5)
    plain = run(step.init(mlp(), seed=5), batches)
    for b in batches:
        ref, _ = eager(ref, b)
    return {
        "step": step,
        "straight": straight,
        "again": again,
        "resumed": resumed,
        "eager": ref,
        "plain": plain,
    }


@pytest.mark.slow
def test_inductor_step_is_deterministic_resumes_exactly_and_matches_eager(inductor_run):
    r = inductor_run
    assert r["step"]._compiled.fallback_reason is None
    assert r["step"].compile_seconds is not None
    for name in ("again", "resumed"):
        la, lb = _leaves(r["straight"]), _leaves(r[name])
        assert [k for k, _ in la] == [k for k, _ in lb]
        for (_, x), (_, y) in zip(la, lb):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
    for n, p in r["eager"].params.items():  # without dropout: same model, same data
        torch.testing.assert_close(r["plain"].params[n], p, **TOL)
    for n, p in r["eager"].extra["ema"].params.items():
        torch.testing.assert_close(r["plain"].extra["ema"].params[n], p, **TOL)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_takes_the_same_code_path():
    """On CUDA the same compiled step (inductor) runs, within the fp16/bf16 tolerance of eager."""
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(LR))
    wrappers = (fe.amp("bfloat16"), fe.ema(momentum=0.1))
    compiled = fe.train_step(ce_loss, tx, *wrappers, compile=True)
    eager = fe.train_step(ce_loss, tx, *wrappers)
    a, b = eager.init(mlp(), device="cuda"), compiled.init(mlp(), device="cuda")
    for x, y in mlp_batches(8):
        a, _ = eager(a, (x.cuda(), y.cuda()))
        b, _ = compiled(b, (x.cuda(), y.cuda()))
    assert compiled._compiled is not None and compiled._compiled.fallback_reason is None
    assert b.step == a.step == 8 and type(b.opt_state[1].num_updates) is int
    for n, p in a.params.items():
        torch.testing.assert_close(b.params[n], p, **HALF_TOL)


def _one_graph_near_eager(make_tx) -> None:
    """Six updates of ``make_tx()``'s step, compiled and eager: one graph, no fallback, every leaf
    of the state within TOL of eager (params, moments, each group's reported lr)."""
    counter = Counter()
    compiled = fe.train_step(ce_loss, make_tx(), compile={"backend": counter})
    eager = fe.train_step(ce_loss, make_tx())
    a, b = eager.init(mlp()), compiled.init(mlp())
    for batch in mlp_batches(6):
        a, _ = eager(a, batch)
        b, _ = compiled(b, batch)
    assert compiled._compiled is not None and compiled._compiled.fallback_reason is None
    assert counter.graphs == 1
    for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, **TOL, msg=lambda m, p=path: f"{p}: {m}")
        else:
            assert y == x, path


def test_paramwise_multipliers_on_a_schedule_compile_to_one_graph():
    """A param group's share of a scheduled lr (paramwise's bias_lr_mult, MMEngine's standard
    setup) has a torch form: one graph, the same values as eager (it fell back, naming a genexpr)."""
    groups = optim.paramwise(
        mlp(), lr=0.05, weight_decay=1e-2, bias_lr_mult=2.0, bias_decay_mult=0.0
    )
    _one_graph_near_eager(lambda: groups.build(optim.adamw, lr=LR))


def test_a_schedule_without_a_torch_form_falls_back_naming_it():
    """The warning gives fengine's reason, not dynamo's report of the exception it hit."""
    lr = schedules.onecycle(0.1, eta_max=1.0, total_steps=10)
    step = fe.train_step(ce_loss, optim.sgd(lr), compile={"backend": Counter()})
    state = step.init(mlp())
    with pytest.warns(CompileFallbackWarning) as caught:
        step(state, mlp_batches(1)[0])
    assert len(caught) == 1
    assert "Reason: TypeError: compiled step: the schedule OneCycle has no torch form yet" in str(
        caught[0].message
    )


def test_a_seed_the_compiled_step_cannot_carry_is_refused_up_front():
    with pytest.raises(
        ValueError, match=r"seed must be a non-negative int below 2\*\*63 .*got 9223372036854775808"
    ):
        fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), seed=2**63)
    fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), seed=2**63 - 1)  # the largest one is fine


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optim.rmsprop(LR, momentum=0.9, centered=True),
        lambda: optim.adagrad(LR, lr_decay=0.1),
    ],
    ids=["rmsprop", "adagrad"],
)
def test_rmsprop_and_adagrad_compile_to_one_graph(make_tx):
    _one_graph_near_eager(make_tx)


def test_guards_true_follows_a_global_the_loss_reads():
    """By default a value the loss reads from a closure is frozen as first traced (guards are
    skipped on the step's own state, documented); ``guards=True`` recompiles when it changes."""
    weight = {"aux": 1.0}

    def loss(model, batch):
        return ce_loss(model, batch) * weight["aux"]

    counter = Counter()
    compiled = fe.train_step(loss, optim.sgd(0.1), compile={"backend": counter, "guards": True})
    eager = fe.train_step(loss, optim.sgd(0.1))
    a, b = eager.init(mlp()), compiled.init(mlp())
    for i, batch in enumerate(mlp_batches(5)):
        weight["aux"] = 1.0 if i < 2 else 0.0
        a, ma = eager(a, batch)
        b, mb = compiled(b, batch)
        torch.testing.assert_close(mb["loss"], ma["loss"], **TOL)
    assert float(mb["loss"]) == 0.0 and counter.graphs == 2  # one recompile, for the new value
    with pytest.raises(ValueError, match="unknown torch.compile options"):
        fe.train_step(loss, optim.sgd(0.1), compile={"guard": True})
    with pytest.raises(TypeError, match="compile: guards must be True or False, got 'no'"):
        fe.train_step(loss, optim.sgd(0.1), compile={"guards": "no"})


def test_a_scheduled_decay_term_compiles_to_one_graph():
    """``add_decayed_weights(schedule)`` in a hand-made chain (it fell back: ``if wd == 0`` on the
    schedule's tensor was data-dependent control flow)."""
    wd = schedules.linear(1e-2, start_factor=1.0, end_factor=0.0, end=5)  # 0 from step 4 on
    _one_graph_near_eager(lambda: optim.chain(optim.add_decayed_weights(wd), optim.sgd(LR)))


def test_sgd_momentum_that_drops_to_zero_keeps_its_buffer_as_torch():
    """An update with momentum 0 steps by the gradient and leaves the buffer as it is (torch keeps
    it and continues from it); the compiled step blended in the gradient, differing by ~0.1."""
    mom = lambda t: 0.9 * (t != 2)  # noqa: E731  (torch ops on a step tensor: traceable)
    counter = Counter()
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=mom, dampening=0.3),
                         compile={"backend": counter})  # fmt: skip
    state = step.init(mlp())
    model = mlp()
    ref = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.3)
    for t, batch in enumerate(mlp_batches(5)):
        state, _ = step(state, batch)
        ref.param_groups[0]["momentum"] = mom(t)
        ref.zero_grad()
        ce_loss(model, batch).backward()
        ref.step()
    assert step._compiled is not None and step._compiled.fallback_reason is None
    assert counter.graphs == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(state.params[n], p.detach(), **TOL)


def test_sgd_momentum_schedule_from_zero_runs_eagerly_saying_why():
    mom = schedules.linear(0.9, start_factor=0.0, end_factor=1.0, end=3)
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=mom), compile={"backend": Counter()})
    with pytest.warns(CompileFallbackWarning, match="sgd's momentum schedule starts at 0"):
        step(step.init(mlp()), mlp_batches(1)[0])


class AuxHead(nn.Module):
    """An MLP with an auxiliary head that the loss uses only on batches that say so."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux = mlp(), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        return self.body(x) + self.aux(x) if use_aux else self.body(x)


def aux_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y, use_aux = batch
    return nn.functional.cross_entropy(model(x, use_aux), y)


def _aux_run(flags: list[bool], **compile) -> tuple[fe.TrainState, fe.TrainState, fe.Step]:
    """(eager, compiled) states after AdamW with weight decay on batches using the head per flags."""
    tx = lambda: optim.adamw(1e-2, weight_decay=0.1)  # noqa: E731
    eager, step = fe.train_step(aux_loss, tx()), fe.train_step(aux_loss, tx(), compile=compile)
    a, b = eager.init(AuxHead()), step.init(AuxHead())
    for (x, y), flag in zip(mlp_batches(len(flags)), flags):
        a, _ = eager(a, (x, y, flag))
        b, _ = step(b, (x, y, flag))
    return a, b, step


def test_a_param_unreached_only_on_a_later_batch_falls_back_naming_it():
    """The probe ran on the first batch only: a later batch that skips the aux head recompiled,
    torch.func.grad gave the head zeros and AdamW moved it (3.7e-2 off eager, no warning).
    Each new trace is probed first: the step falls back there, saying which params, from the
    call that hit it."""
    with pytest.warns(
        CompileFallbackWarning, match=r"does not reach \(aux.weight, aux.bias\)"
    ) as w:
        a, b, step = _aux_run([True, True, False, True, False], backend=Counter())
    assert [x.filename for x in w if x.category is CompileFallbackWarning] == [__file__]
    assert step._compiled is not None and step._compiled.compile_seconds is not None
    for n in a.params:
        torch.testing.assert_close(b.params[n], a.params[n], **TOL)


def test_a_later_trace_that_reaches_every_param_compiles_probing_once_per_trace(recwarn):
    """A later branch that reaches every trainable param (the aux head frozen, as the warning
    says) traces a second graph after the probe passes; steps that reuse a graph probe nothing."""
    counter = Counter()
    tx = optim.adamw(1e-2, weight_decay=0.1)
    step = fe.train_step(aux_loss, tx, compile={"backend": counter})
    assert step._compiled is not None and step._compiled.probe is not None
    probe, probed = step._compiled.probe, []
    step._compiled.probe = lambda s, b: probed.append(b[2]) or probe(s, b)
    eager = fe.train_step(aux_loss, optim.adamw(1e-2, weight_decay=0.1))
    a, b = AuxHead(), AuxHead()
    a.aux.requires_grad_(False)
    b.aux.requires_grad_(False)
    a, b = eager.init(a), step.init(b)
    flags = [False, False, True, False, True, True]
    for (x, y), flag in zip(mlp_batches(len(flags)), flags):
        a, _ = eager(a, (x, y, flag))
        b, _ = step(b, (x, y, flag))
    assert not [x for x in recwarn if x.category is CompileFallbackWarning]
    assert step._compiled.fallback_reason is None and counter.graphs == 2
    assert probed == [False, True]
    for n in a.params:
        torch.testing.assert_close(b.params[n], a.params[n], **TOL)


def test_a_short_last_batch_with_dropout_compiles_one_more_graph_not_a_fallback():
    """compile=True traces static shapes: a short batch is one more graph. torch's automatic
    dynamic shapes retraced it with symbolic sizes that dropout refused, and the step fell
    back to eager for the rest of the run (the recipes hunt)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.ReLU(), nn.Linear(8, 2))
    counter = Counter()
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": counter})
    state = step.init(model, seed=0)
    g = torch.Generator().manual_seed(0)
    sizes = [8, 8, 3, 8, 3]
    batches = [
        (torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)) for n in sizes
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        for batch in batches:
            state, _ = step(state, batch)
    assert counter.graphs == 2


def test_steady_steps_run_the_code_dynamo_compiled_directly_with_the_same_bits(monkeypatch):
    """Once a model's graph for a batch signature is known, the step calls the code dynamo
    generated for it (the graph call and the outputs' assembly) without dynamo's frame
    evaluation (~50 us of a ~150 us compiled MLP step): the same bits as the calls through
    dynamo, each batch signature its own graph, a second model (after the first) its own."""
    through_dynamo = 0
    set_stance = torch.compiler.set_stance

    def counted(*args, **kwargs):
        nonlocal through_dynamo
        through_dynamo += 1
        return set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", counted)
    full, short = mlp_batches(6), mlp_batches(2, batch=5)
    order = [*full[:3], short[0], *full[3:], short[1]]

    def run(direct: bool) -> list[fe.TrainState]:
        step = fe.train_step(ce_loss, optim.adamw(LR), compile={"backend": Counter()})
        assert step._compiled is not None
        if not direct:
            step._compiled._direct = None
        ends = []
        for model in (mlp(0), mlp(1, dropout=0.2)):  # one step, two models in turn
            state = step.init(model, seed=3)
            for batch in order:
                state, _ = step(state, batch)
            ends.append(state)
        return ends

    reference = run(direct=False)
    every_call = through_dynamo  # (and a second entry where a new shape traces)
    through_dynamo = 0
    for a, b in zip(reference, run(direct=True)):
        for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, path
    # per model, only the first call, the first repeat of a full batch and the first short
    # batch go through dynamo: the other 5 of 8 run directly
    assert every_call - through_dynamo == 2 * 5


def test_a_direct_call_whose_inputs_no_longer_fit_goes_back_through_dynamo():
    """inductor checks its inputs' sizes and strides before any work (AssertionError): the
    direct call is dropped and dynamo, checking every guard, runs the step instead."""
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
    eager = fe.train_step(ce_loss, optim.sgd(0.1))
    a, b = eager.init(mlp()), step.init(mlp())
    batches = mlp_batches(5)
    for batch in batches[:3]:
        a, _ = eager(a, batch)
        b, _ = step(b, batch)
    compiled = step._compiled
    assert compiled is not None and compiled._direct is not None
    (known,) = compiled._direct.values()
    (key,) = known

    def stale(leaves, batch):
        raise AssertionError("expected size 8==5")

    known[key] = known[key]._replace(fn=stale)
    for batch in batches[3:]:
        a, _ = eager(a, batch)
        b, _ = step(b, batch)
    assert known[key].fn is not stale  # found again after the guarded call
    for n, p in a.params.items():
        torch.testing.assert_close(b.params[n], p, **TOL)


def test_cuda_graph_modes_keep_every_call_through_dynamo():
    """CUDA graph trees count a step at each call through dynamo: no direct calls there."""
    from fengine.compiled import _direct_allowed

    assert _direct_allowed({}) and _direct_allowed({"mode": "default"})
    assert not _direct_allowed({"mode": "reduce-overhead"})
    assert not _direct_allowed({"mode": "max-autotune"})
    assert not _direct_allowed({"options": {"triton.cudagraphs": True}})
    assert _direct_allowed({"options": {"triton.cudagraphs": False}})


def _losses(step: fe.Step, model: nn.Module, batches: list, between=None) -> list[float]:
    """The loss of each update of ``step`` from ``model`` over ``batches``; ``between(i)`` runs
    before update i (a context for it when it returns one)."""
    state, losses = step.init(model), []
    for i, batch in enumerate(batches):
        context = between(i) if between is not None else None
        with context if context is not None else contextlib.nullcontext():
            state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def test_a_batch_whose_fields_are_one_tensor_is_not_run_through_a_graph_for_two():
    """Dynamo passes a tensor given twice once: the code traced for (x, x) must not run for
    (x, t) of the same shapes (it trained a denoiser towards its input; the hunt of stop 27)."""

    def mse(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 16, generator=g) for _ in range(4)]
    ts = [torch.randn(8, 16, generator=g) for _ in range(4)]
    batches = [(xs[0], xs[0]), (xs[1], xs[1]), (xs[2], ts[2]), (xs[3], ts[3])]
    torch.manual_seed(0)
    eager = _losses(fe.train_step(mse, optim.sgd(0.1)), nn.Linear(16, 16), batches)
    torch.manual_seed(0)
    compiled_step = fe.train_step(mse, optim.sgd(0.1), compile={"backend": Counter()})
    compiled = _losses(compiled_step, nn.Linear(16, 16), batches)
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_after_a_dynamo_reset_the_step_traces_again():
    """``torch._dynamo.reset()`` (how a changed closure value is usually retraced) drops the
    code the step called directly, as it drops dynamo's own."""
    weight = {"w": 1.0}

    def weighted(model, batch):
        return weight["w"] * ce_loss(model, batch)

    def reset_at_3(i):
        if i == 3:
            weight["w"] = 3.0
            torch._dynamo.reset()

    batches = mlp_batches(6)
    eager = _losses(fe.train_step(weighted, optim.sgd(0.1)), mlp(0), batches, reset_at_3)
    weight["w"] = 1.0
    counter = Counter()
    step = fe.train_step(weighted, optim.sgd(0.1), compile={"backend": counter})
    compiled = _losses(step, mlp(0), batches, reset_at_3)
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert counter.graphs == 2


def test_a_step_under_another_global_state_goes_through_dynamo(monkeypatch):
    """The code found for one global state (grad mode, autocast, ...) is not called under
    another: an outer ``torch.autocast`` sends those steps through dynamo, which checks it
    (the direct call ran the float32 graph there, under inductor)."""
    through_dynamo = []
    set_stance = torch.compiler.set_stance

    def counted(*args, **kwargs):
        through_dynamo.append(torch.is_autocast_enabled("cpu"))
        return set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", counted)

    def bf16_at_3_and_4(i):
        return torch.autocast("cpu", dtype=torch.bfloat16) if i in (3, 4) else None

    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
    _losses(step, mlp(0), mlp_batches(7), bf16_at_3_and_4)
    assert through_dynamo.count(True) >= 2  # both autocast steps, none of them directly


def test_states_of_one_model_with_other_dtypes_get_their_own_direct_call():
    """A second state of the same model with other dtypes (``model.double()``; token batches,
    so the batch signature is the same) must not run the code found for the first state's
    float32 leaves (inductor's float32 kernels raised on it, or read float64 as float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)
    tokens = [
        (torch.randint(0, 20, (8, 4), generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(6)
    ]
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
    state = step.init(model)
    for batch in tokens[:3]:
        state, _ = step(state, batch)
    model.double()
    eager = _losses(fe.train_step(ce_loss, optim.sgd(0.1)), model, tokens[3:])
    assert _losses(step, model, tokens[3:]) == pytest.approx(eager, rel=1e-12)
    assert step._compiled is not None and step._compiled._direct is not None
    (known,) = step._compiled._direct.values()
    assert len(known) == 2  # one per kind of state: float32 and float64


def test_one_step_over_two_models_in_turns_keeps_calling_directly():
    """Returning to a model (its state's layout built again) finds the code found before:
    the direct calls did not stop after 16 switches (each added a dead entry)."""
    step = fe.train_step(ce_loss, optim.sgd(0.1), compile={"backend": Counter()})
    models, batches = (mlp(0), mlp(1, dropout=0.2)), mlp_batches(3)
    states = [step.init(m) for m in models]
    assert step._compiled is not None and step._compiled._direct is not None
    for _ in range(20):
        for k in range(2):
            for batch in batches:
                states[k], _ = step(states[k], batch)
    for m in models:
        assert len(step._compiled._direct[m]) == 1
