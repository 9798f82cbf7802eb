"""Averaged models (`fe.ema`, `fe.ema(gamma=)`, `fe.swa`) bitwise against MMEngine 0.10.7.

The oracle is MMEngine's own ``EMAHook`` (``begin_iter`` / ``begin_epoch`` logic) building
its ``ExponentialMovingAverage`` / ``MomentumAnnealingEMA`` / ``StochasticWeightAverage``,
driven by a fake runner (``SimpleNamespace``) whose model is fed fengine's params after
every update, as MMEngine's ``after_train_iter`` sees them.
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import ce_loss, cnn_batches, mlp, mlp_batches, small_cnn

import fengine as fe
from fengine import optim


hooks = pytest.importorskip("mmengine.hooks")


def run_both(wrapper, hook_kwargs, *, cnn=False, epochs=3, per_epoch=4):
    """Train with ``wrapper`` and drive MMEngine's EMAHook over the same params; return both."""
    make, batches = (small_cnn, cnn_batches) if cnn else (mlp, mlp_batches)
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), wrapper)
    state = step.init(make())
    live = make()  # the runner's model: fengine's params copied in after each update
    runner = SimpleNamespace(
        model=live, iter=0, epoch=0, max_epochs=epochs, max_iters=epochs * per_epoch
    )
    hook = hooks.EMAHook(**hook_kwargs)
    hook.before_run(runner)
    hook.before_train(runner)
    data = batches(per_epoch)
    for epoch in range(epochs):
        runner.epoch = epoch
        for i, batch in enumerate(data):
            state, _ = step(state, batch)
            with torch.no_grad():
                for n, t in [*live.named_parameters(), *live.named_buffers()]:
                    t.copy_(state.params[n] if n in state.params else state.buffers[n])
            runner.iter = epoch * per_epoch + i  # MMEngine increments it after the hooks
            hook.after_train_iter(runner, i)
        state = state.replace(epoch=state.epoch + 1)  # what fe.train_steps does at an epoch end
    return state, hook.ema_model


def assert_same(wrapper, state, oracle):
    ours = wrapper.params(state)
    theirs = dict(oracle.module.named_parameters())
    assert ours.keys() == theirs.keys()
    for n, p in theirs.items():
        assert torch.equal(ours[n], p.detach()), n
    params, buffers = state.eval_weights()  # what evaluation, checkpoints and publish use
    assert all(params[n] is ours[n] for n in ours)
    for n, b in oracle.module.named_buffers():
        assert torch.equal(buffers[n], b), n
    assert wrapper.state(state).steps == int(oracle.steps)


CASES = [
    ("ema", dict(momentum=0.1), dict(ema_type="ExponentialMovingAverage", momentum=0.1)),
    (
        "ema interval begin_iter",
        dict(momentum=0.1, interval=2, begin=3),
        dict(momentum=0.1, interval=2, begin_iter=3),
    ),
    ("ema begin_epoch", dict(momentum=0.2, begin_epoch=2), dict(momentum=0.2, begin_epoch=2)),
    (
        "annealing",
        dict(momentum=0.01, gamma=10),
        dict(ema_type="MomentumAnnealingEMA", momentum=0.01, gamma=10),
    ),
    (
        "annealing interval begin_epoch",
        dict(momentum=0.05, gamma=4, interval=3, begin_epoch=2),
        dict(ema_type="MomentumAnnealingEMA", momentum=0.05, gamma=4, interval=3, begin_epoch=2),
    ),
    ("swa", dict(), dict(ema_type="StochasticWeightAverage")),
    (
        "swa interval begin_iter",
        dict(interval=2, begin=5),
        dict(ema_type="StochasticWeightAverage", interval=2, begin_iter=5),
    ),
    (
        "swa begin_epoch",
        dict(begin_epoch=3),
        dict(ema_type="StochasticWeightAverage", begin_epoch=3),
    ),
]


@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn+bn"])
@pytest.mark.parametrize("kwargs,hook_kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_averaged_params_match_mmengine_bitwise(kwargs, hook_kwargs, cnn):
    kind = fe.swa if hook_kwargs.get("ema_type") == "StochasticWeightAverage" else fe.ema
    wrapper = kind(**kwargs)
    state, oracle = run_both(wrapper, hook_kwargs, cnn=cnn)
    assert_same(wrapper, state, oracle)
    assert oracle.steps > 1  # it averaged, not only copied
    assert not torch.equal(wrapper.params(state)["0.weight"], state.params["0.weight"])


@pytest.mark.parametrize("kind", ["ema", "annealing", "swa"])
def test_update_buffers_matches_mmengine_bitwise(kind):
    """BatchNorm running stats averaged too; the integer num_batches_tracked stays a copy."""
    if kind == "swa":
        wrapper = fe.swa(update_buffers=True, interval=2)
        hook_kwargs = dict(ema_type="StochasticWeightAverage", update_buffers=True, interval=2)
    elif kind == "annealing":
        wrapper = fe.ema(momentum=0.05, gamma=5, update_buffers=True)
        hook_kwargs = dict(
            ema_type="MomentumAnnealingEMA", momentum=0.05, gamma=5, update_buffers=True
        )
    else:
        wrapper = fe.ema(momentum=0.3, update_buffers=True, begin_epoch=2)
        hook_kwargs = dict(momentum=0.3, update_buffers=True, begin_epoch=2)
    state, oracle = run_both(wrapper, hook_kwargs, cnn=True)
    assert_same(wrapper, state, oracle)
    ours = wrapper.state(state).buffers
    assert not torch.equal(ours["1.running_mean"], state.buffers["1.running_mean"])


def test_begin_epoch_starts_with_the_first_update_of_that_epoch():
    """begin_epoch=2 (MMEngine: runner.epoch + 1 >= 2): epoch 0 tracks, epoch 1 starts averaging."""
    wrapper = fe.ema(momentum=0.5, begin_epoch=2)
    step = fe.train_step(ce_loss, optim.sgd(0.1), wrapper)
    state = step.init(mlp())
    for batch in mlp_batches(3):
        state, _ = step(state, batch)
    assert wrapper.state(state).steps == 0
    assert all(torch.equal(wrapper.params(state)[n], p) for n, p in state.params.items())
    state = state.replace(epoch=1)
    for batch in mlp_batches(3, seed=2):
        state, _ = step(state, batch)
    assert wrapper.state(state).steps == 3


def test_annealing_momentum_formula():
    """Update t uses max(momentum, gamma / (gamma + t)); by hand for one scalar param."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    wrapper = fe.ema(momentum=0.1, gamma=2)

    def loss_fn(model, batch):
        return (model(batch) ** 2).sum()

    step = fe.train_step(loss_fn, optim.sgd(0.1), wrapper)
    state = step.init(model)
    avg = None
    for t in range(6):
        state, _ = step(state, torch.ones(1, 1))
        w = float(state.params["weight"].detach())
        m = max(0.1, 2 / (2 + t))
        avg = w if t == 0 else avg + m * (w - avg)
        assert float(wrapper.params(state)["weight"]) == pytest.approx(avg, rel=1e-6)
    assert avg != pytest.approx(w)  # the average lags the param


def test_swa_is_the_mean_of_the_iterates():
    torch.manual_seed(0)
    wrapper = fe.swa(interval=2)
    step = fe.train_step(ce_loss, optim.sgd(0.1), wrapper)
    state = step.init(mlp())
    seen = []
    for t, batch in enumerate(mlp_batches(7)):
        state, _ = step(state, batch)
        if t % 2 == 0:  # updates 0, 2, 4, 6 are averaged
            seen.append(state.params["0.weight"].clone())
    torch.testing.assert_close(
        wrapper.params(state)["0.weight"], torch.stack(seen).mean(0), rtol=1e-5, atol=1e-6
    )


def test_validation():
    with pytest.raises(ValueError, match="not both"):
        fe.ema(0.9, begin=2, begin_epoch=1)
    with pytest.raises(ValueError, match="not both"):
        fe.swa(begin=2, begin_epoch=1)
    with pytest.raises(ValueError, match="gamma must be a number > 0"):
        fe.ema(gamma=0)
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        fe.swa(interval=0)
    with pytest.raises(ValueError, match="begin_epoch must be an int >= 0"):
        fe.ema(begin_epoch=-1)
    assert repr(fe.ema(momentum=0.1, gamma=100, begin_epoch=3)) == (
        "ema(momentum=0.1, gamma=100, interval=1, begin_epoch=3, name='ema')"
    )
    assert repr(fe.swa(interval=2)) == "swa(interval=2, name='swa')"
    # a decay is shown as given (it showed momentum=0.010000000000000009 for decay 0.99)
    assert repr(fe.ema(0.99)) == "ema(decay=0.99, interval=1, name='ema')"
    assert repr(fe.ema()) == "ema(momentum=0.0002, interval=1, name='ema')"


def test_swa_resume_is_exact(tmp_path):
    """The SWA state (average and its count) is in the checkpoint: stop, save, load, continue."""
    from fengine import checkpoint

    def train(state, step, batches):
        for b in batches:
            state, _ = step(state, b)
        return state

    wrapper = fe.swa(interval=2, begin=2)
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), wrapper)
    batches = mlp_batches(9)
    straight = train(step.init(mlp()), step, batches)
    half = train(step.init(mlp()), step, batches[:4])
    checkpoint.save(tmp_path / "c.safetensors", half)
    resumed = checkpoint.load(tmp_path / "c.safetensors", step.init(mlp()))
    resumed = train(resumed, step, batches[4:])
    assert wrapper.state(resumed).steps == wrapper.state(straight).steps == 8
    for n, p in wrapper.params(straight).items():
        assert torch.equal(wrapper.params(resumed)[n], p), n


# ------------------------------------------------------------- two averagers, momentum, repr
def test_two_averagers_over_the_same_params_are_refused_naming_both():
    """ema + swa over the same params: evaluation, published weights and load_params used the
    last one (SWA) and evaluate(params="ema") ran on SWA weights, silently."""
    tx = optim.sgd(0.1)
    for first, second in (
        (fe.ema(momentum=0.5), fe.swa()),
        (fe.ema(momentum=0.5, params="0"), fe.swa(params="0.weight")),  # a submodule's own
        (fe.swa(params="2"), fe.ema(momentum=0.5, name="ema_all")),  # all params: overlaps any
    ):
        with pytest.raises(
            ValueError,
            match=rf"step wrappers {re.escape(repr(first))} and {re.escape(repr(second))} both "
            r"average the same params, .*evaluate\(params='ema'\) too.*disjoint params=",
        ):
            fe.train_step(ce_loss, tx, first, second)


def test_averagers_over_disjoint_params_stay_allowed_each_substituting_its_own():
    """Two parts of a GAN, each with its averager: both sets of averaged weights are evaluated."""
    ema, swa = fe.ema(momentum=0.5, params="0"), fe.swa(params="2")
    fe.train_step(ce_loss, optim.sgd(0.1), fe.ema(params="gen"), fe.swa(params="generator"))
    step = fe.train_step(ce_loss, optim.sgd(0.1), ema, swa)
    state = step.init(mlp())
    for batch in mlp_batches(3):
        state, _ = step(state, batch)
    params, _ = state.eval_weights()
    assert params["0.weight"] is state.extra["ema"].params["0.weight"]
    assert params["2.weight"] is state.extra["swa"].params["2.weight"]
    assert not torch.equal(params["0.weight"], state.params["0.weight"])


def test_two_averagers_whose_predicates_overlap_are_refused_on_the_first_step():
    """``params=`` predicates are judged on the names: on the first step, before it updates."""
    overlapping = fe.train_step(
        ce_loss,
        optim.sgd(0.1),
        fe.ema(momentum=0.5, params=lambda n: n.startswith("0.")),
        fe.swa(params=lambda n: n.endswith("weight")),
    )
    state = overlapping.init(mlp())
    before = {n: p.clone() for n, p in state.params.items()}
    with pytest.raises(
        ValueError, match=r"step wrappers with states 'ema' and 'swa' both average 0.weight, but"
    ):
        overlapping(state, mlp_batches(1)[0])
    assert state.step == 0 and all(torch.equal(before[n], p) for n, p in state.params.items())
    disjoint = fe.train_step(
        ce_loss,
        optim.sgd(0.1),
        fe.ema(momentum=0.5, params=lambda n: n.startswith("0.")),
        fe.swa(params=lambda n: n.startswith("2.")),
    )
    state, _ = disjoint(disjoint.init(mlp()), mlp_batches(1)[0])
    assert state.step == 1


def test_ema_warns_for_a_momentum_above_one_half_naming_what_was_given():
    """fe.ema(0.0002) (MMEngine's default momentum given where fengine takes the decay) made
    the "EMA" the live weights, silently; MMEngine's ExponentialMovingAverage warns too."""
    with pytest.warns(UserWarning) as got:
        fe.ema(0.0002)
        fe.ema(momentum=0.9998, gamma=100)
    assert [str(w.message).split(": the weight")[0] for w in got] == [
        "ema: decay=0.0002 gives momentum=0.9998 > 0.5",
        "ema: momentum=0.9998 > 0.5",
    ]
    assert all("pass momentum=0.0002 (decay=0.9998)" in str(w.message) for w in got)
    assert all(w.filename == __file__ for w in got)  # points at the call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fe.ema(0.9998), fe.ema(momentum=0.5), fe.ema(0.5), fe.ema(momentum=1.0)  # 1: deliberate


@pytest.mark.parametrize(
    ("kwargs", "given"),
    [
        ({"decay": 1.0}, "decay=1.0"),
        ({"decay": -0.5}, "decay=-0.5"),
        ({"momentum": 0}, "momentum=0"),
    ],
)
def test_ema_out_of_range_names_the_argument_given(kwargs, given):
    with pytest.raises(ValueError, match=rf"ema: momentum must be in \(0, 1\] .*got {given}$"):
        fe.ema(**kwargs)


def test_averager_reprs_show_params_and_update_buffers():
    def heads(name: str) -> bool:
        return name.startswith("2.")

    assert repr(fe.ema(momentum=0.1, update_buffers=True, params="gen")) == (
        "ema(momentum=0.1, interval=1, update_buffers=True, params='gen', name='ema')"
    )
    assert repr(fe.swa(begin=3, params=heads, name="s")) == (
        "swa(interval=1, begin=3, params=heads, name='s')"
    )
