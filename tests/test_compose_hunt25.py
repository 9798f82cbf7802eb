"""Composing a step (hunt 25): what ``chain``, ``train_step`` and ``multi_step`` refuse at build
time, optax-signature transformations, the metrics of an fp16-skipped update, and params frozen
or unfrozen mid-run."""

from __future__ import annotations

import pytest
import torch
from helpers import GAN, ce_loss, disc_loss, gan_batches, gen_loss, mlp, mlp_batches

import fengine as fe
from fengine import optim
from fengine.optim import base as optim_base


def _train(tx, n=3, model=None):
    step = fe.train_step(ce_loss, tx)
    state = step.init(model or mlp())
    for batch in mlp_batches(n):
        state, metrics = step(state, batch)
    return state, metrics


# ------------------------------------------------------------- 1. nothing after an optimizer
@pytest.mark.parametrize(
    ("after", "name"),
    [
        (lambda: optim.add_decayed_weights(0.5), "add_decayed_weights"),
        (lambda: optim.sgd(1.0), "sgd"),
    ],
    ids=["weight_decay", "sgd"],
)
def test_chain_refuses_a_transform_after_an_optimizer(after, name):
    """It would get the optimizer's update (new - old), not the gradient: the weights grew x1.5
    a step, or sgd(1.0) after sgd(0.1) climbed the loss."""
    with pytest.raises(
        ValueError,
        match=rf"chain: argument 2 \({name}\(\.\.\.\)\) comes after the optimizer sgd\(\.\.\.\) "
        r"\(argument 1\).*put it before the optimizer",
    ):
        optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1), after())


def test_chain_refuses_a_partition_of_optimizers_before_another_transform():
    groups = optim.partition(
        {"a": optim.sgd(0.1), "b": optim.set_to_zero()}, lambda n, t: "a" if "0." in n else "b"
    )
    with pytest.raises(ValueError, match=r"argument 1 \(clip_by_value\(\.\.\.\)\) comes after "):
        optim.chain(groups, optim.clip_by_value(1.0))
    # before an optimizer, a partition of plain transformations is a gradient transformation
    clip_some = optim.partition(
        {"a": optim.clip_by_value(0.01), "b": optim.identity()},
        lambda n, t: "a" if "0." in n else "b",
    )
    optim.chain(clip_some, optim.sgd(0.1))


# ------------------------------------------------------------- 2. a tx ends in an optimizer
@pytest.mark.parametrize(
    ("tx", "last"),
    [
        (lambda: optim.clip_by_global_norm(1.0), r"clip_by_global_norm\(\.\.\.\) is last"),
        (lambda: optim.chain(optim.clip_by_value(1.0)), r"clip_by_value\(\.\.\.\) is last"),
        (lambda: optim.chain(), r"an empty chain\(\) is last"),
        (
            lambda: optim.partition(
                {"body": optim.sgd(0.1), "head": optim.clip_by_value(1.0)},
                lambda n, t: "head" if n.startswith("2.") else "body",
            ),
            r"group 'head': clip_by_value\(\.\.\.\) is last",
        ),
    ],
    ids=["clip_norm", "chained_clip_value", "empty_chain", "partition_group"],
)
def test_train_step_refuses_a_tx_without_an_optimizer(tx, last):
    """Its output, a gradient, would be added to the params: the loss went 2.24 -> 18.9."""
    with pytest.raises(
        ValueError, match=rf"train_step: tx does not end in an optimizer \({last}\).*uphill"
    ):
        fe.train_step(ce_loss, tx())


def test_multi_step_names_the_part_whose_tx_has_no_optimizer():
    with pytest.raises(
        ValueError,
        match=r"multi_step: part 'gen': tx does not end in an optimizer \(clip_by_global_norm",
    ):
        fe.multi_step(
            {
                "disc": (disc_loss, optim.adam(1e-3), "disc"),
                "gen": (gen_loss, optim.clip_by_global_norm(1.0), "gen"),
            }
        )


def test_hand_made_optimizers_are_accepted():
    """``scale(-lr)`` last (optax's hand-made SGD) and a custom transformation marked
    ``as_optimizer()`` train as sgd does."""
    sgd, _ = _train(optim.sgd(0.1))
    by_scale, _ = _train(optim.chain(optim.add_decayed_weights(0.0), optim.scale(-0.1)))

    def negated(grads, state, params=None, *, step=None):
        return {n: g * -0.1 for n, g in grads.items()}, state

    custom = optim.GradientTransformation(lambda p: optim.EmptyState(), negated)
    marked = custom.as_optimizer()
    assert marked.apply is not None and custom.apply is None
    by_mark, _ = _train(optim.chain(optim.clip_by_global_norm(1e9), marked))
    for n in sgd.params:
        torch.testing.assert_close(by_scale.params[n], sgd.params[n], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(by_mark.params[n], sgd.params[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="tx does not end in an optimizer"):
        fe.train_step(ce_loss, custom)
    # marked, it is an optimizer: nothing may follow it, and an optimizer is left as it is
    with pytest.raises(ValueError, match=r"argument 1 \(clip_by_value\(\.\.\.\)\) comes after"):
        optim.chain(marked, optim.clip_by_value(1.0))
    adamw = optim.adamw(1e-3)
    assert adamw.as_optimizer() is adamw


def test_a_marked_chain_and_paramwise_groups_of_a_hand_made_optimizer_are_accepted():
    """The review's cases: ``chain(...).as_optimizer()`` (the error message suggests marking the
    tx) was still refused, and so was `paramwise(...).build` of a hand-made ``scale(-lr)``
    optimizer with several groups (its base-lr wrapper hid the chains)."""

    def negated(grads, state, params=None, *, step=None):
        return {n: g * -0.1 for n, g in grads.items()}, state

    custom = optim.GradientTransformation(lambda p: optim.EmptyState(), negated)
    fe.train_step(ce_loss, optim.chain(optim.clip_by_global_norm(1.0), custom).as_optimizer())

    def my_sgd(lr, weight_decay):
        return optim.chain(optim.add_decayed_weights(weight_decay), optim.scale(-lr))

    groups = optim.paramwise(mlp(), lr=0.1, weight_decay=1e-4, bias_decay_mult=0.0)
    assert groups.mmengine_groups > 1
    fe.train_step(ce_loss, groups.build(my_sgd))
    with pytest.raises(ValueError, match="tx does not end in an optimizer"):
        fe.train_step(ce_loss, groups.build(lambda lr, weight_decay: optim.identity()))


def test_a_partition_that_only_freezes_may_come_before_the_optimizer():
    """``chain(partition({"train": identity(), "frozen": set_to_zero()}), sgd)`` freezes a group
    (set_to_zero has an ``apply``, for an optimizer's frozen group); it was refused."""
    labels = lambda name, p: "frozen" if name.startswith("0.") else "train"  # noqa: E731
    freeze = optim.partition({"train": optim.identity(), "frozen": optim.set_to_zero()}, labels)
    start = fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp()).params
    trained, _ = _train(optim.chain(freeze, optim.sgd(0.1)))
    assert any(n.startswith("0.") for n in start)
    for n in trained.params:
        moved = not torch.equal(trained.params[n], start[n])
        assert moved == (not n.startswith("0.")), n
    optim.chain(optim.set_to_zero(), optim.sgd(0.1))
    # a partition that is an optimizer still ends a chain
    with pytest.raises(ValueError, match="comes after the optimizer"):
        optim.chain(
            optim.partition({"train": optim.sgd(0.1), "frozen": optim.set_to_zero()}, labels),
            optim.clip_by_value(1.0),
        )


# ------------------------------------------------------ 3. update(grads, state, params): optax's
def _scale_by(c):
    """DESIGN's protocol: ``update(grads, tstate, params)``, no ``step``."""
    return optim.GradientTransformation(
        lambda p: optim.EmptyState(), lambda g, s, p: ({k: c * v for k, v in g.items()}, s)
    )


def test_an_update_without_step_runs_in_chain_and_partition():
    """It crashed with ``got an unexpected keyword argument 'step'``; halving the gradient
    before sgd(0.1) is sgd(0.05), bitwise (halving is exact)."""
    ref, _ = _train(optim.sgd(0.05))
    chained, _ = _train(optim.chain(_scale_by(0.5), optim.sgd(0.1)))
    split, _ = _train(
        optim.chain(optim.partition({"all": _scale_by(0.5)}, lambda n, t: "all"), optim.sgd(0.1))
    )
    for n in ref.params:
        assert torch.equal(chained.params[n], ref.params[n]), n
        assert torch.equal(split.params[n], ref.params[n]), n


def test_update_signatures_are_read_once_when_composed(monkeypatch):
    calls = []
    signature = optim_base.inspect.signature
    monkeypatch.setattr(optim_base.inspect, "signature", lambda f: calls.append(f) or signature(f))
    tx = optim.chain(_scale_by(0.5), optim.clip_by_value(1.0), optim.sgd(0.1))
    assert len(calls) == 3
    _train(tx, n=3)
    assert len(calls) == 3
    takes_step = optim.clip_by_value(1.0).update
    assert optim_base.with_step(takes_step) is takes_step


# ----------------------------------------------------------------------- 4. donate is a bool
def test_donate_must_be_a_bool():
    with pytest.raises(TypeError, match=r"train_step: donate must be True or False, got 'no'"):
        fe.train_step(ce_loss, optim.sgd(0.1), donate="no")
    with pytest.raises(TypeError, match=r"multi_step: donate must be True or False, got 1"):
        fe.multi_step(
            {
                "disc": (disc_loss, optim.adam(1e-3), "disc"),
                "gen": (gen_loss, optim.adam(1e-3), "gen"),
            },
            donate=1,
        )


# ------------------------------------------------------- 5. a skipped update reports no norm
def _blowing_up_loss(model, batch):
    x, y, blow = batch
    return ce_loss(model, (x, y)) * blow


def test_an_fp16_skipped_update_reports_no_stale_grad_norm():
    """It reported the norm of the last update applied; torch's clip_grad_norm_ returns inf/NaN
    there, and README says eager drops it. The scheduled lr is still reported."""
    lr = fe.schedules.linear(0.1, start_factor=0.5, end=4)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr))
    step = fe.train_step(_blowing_up_loss, tx, fe.amp("float16"))
    state = step.init(mlp())
    (x, y), (x2, y2) = mlp_batches(2)
    state, applied = step(state, (x, y, torch.tensor(1.0)))
    assert int(applied["update_skipped"]) == 0 and torch.isfinite(applied["grad_norm"])
    state, skipped = step(state, (x2, y2, torch.tensor(float("inf"))))
    assert int(skipped["update_skipped"]) == 1
    assert "grad_norm" not in skipped
    assert skipped["lr"] == lr(1)


# ----------------------------------------------------------- 6. freezing and unfreezing mid-run
def _frozen_first_layer():
    model = mlp()
    model[0].weight.requires_grad_(False)
    return model


def test_a_frozen_param_stays_frozen_while_the_others_train():
    """The regular case: the frozen weight is left alone, the others train."""
    model = _frozen_first_layer()
    before = model[0].weight.detach().clone()
    state, _ = _train(optim.adamw(1e-2), model=model)
    assert torch.equal(state.params["0.weight"], before)
    assert not torch.equal(state.params["0.bias"], model[0].bias)


@pytest.mark.parametrize("where", ["the model", "state.params"])
def test_unfreezing_in_place_is_refused_naming_the_param(where):
    """It was silently ignored: the param stayed frozen."""
    model = _frozen_first_layer()
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    state, _ = step(step.init(model), mlp_batches(1)[0])
    tensor = model[0].weight if where == "the model" else state.params["0.weight"]
    tensor.requires_grad_(True)
    with pytest.raises(
        fe.StepMismatchError,
        match=rf"train_step: param '0\.weight' \(in {where}\) was frozen \(requires_grad=False\) "
        r"when this state was built and requires grad now.*step\.init\(model\).*set_to_zero",
    ):
        step(state, mlp_batches(1)[0])


def test_unfreezing_by_replace_is_refused_naming_the_param():
    """adamw has no state for it: this was a raw ``KeyError: '0.weight'`` from the optimizer."""
    step = fe.train_step(ce_loss, optim.adamw(1e-2))
    state, _ = step(step.init(_frozen_first_layer()), mlp_batches(1)[0])
    unfrozen = state.params["0.weight"].detach().requires_grad_(True)
    state = state.replace(params={**state.params, "0.weight": unfrozen})
    with pytest.raises(
        fe.StepMismatchError,
        match=r"train_step: param '0\.weight' has a gradient but no optimizer state: was it "
        r"frozen \(requires_grad=False\) when the state was built\?",
    ):
        step(state, mlp_batches(1)[0])


def test_freezing_in_place_is_refused_naming_the_param():
    """This was torch's ``One of the differentiated Tensors does not require grad``, unnamed."""
    step = fe.train_step(ce_loss, optim.adamw(1e-2))
    state, _ = step(step.init(mlp()), mlp_batches(1)[0])
    state.params["2.weight"].requires_grad_(False)
    with pytest.raises(
        fe.StepMismatchError,
        match=r"train_step: param '2\.weight' was trainable when this state was built and is "
        r"frozen now \(requires_grad=False\)",
    ):
        step(state, mlp_batches(1)[0])


def test_multi_step_part_names_a_param_frozen_in_place():
    step = fe.multi_step(
        {
            "disc": (disc_loss, optim.adam(1e-3), "disc"),
            "gen": (gen_loss, optim.adam(1e-3), "gen"),
        }
    )
    state, _ = step(step.init(GAN()), gan_batches(1)[0])
    state.params["gen.0.weight"].requires_grad_(False)
    with pytest.raises(
        fe.StepMismatchError, match=r"multi_step: part 'gen': param 'gen\.0\.weight'"
    ):
        step(state, gan_batches(1)[0])


# -------------------------------------------------------- 7. micro-batches without accumulate
def test_micro_batches_without_accumulate_are_named():
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    state = step.init(mlp())
    with pytest.raises(
        TypeError,
        match=r"train_step: the batch is a fengine\.MicroBatches of 2 micro-batches, but this "
        r"step has no accumulate\(k\) to split it: add fe\.accumulate\(2\)",
    ):
        step(state, fe.MicroBatches(mlp_batches(2)))
