"""Public edges: post-update wrappers act in written order, and bad arguments to amp, ema, the
clipping transforms, multi_step, step.init and config files are refused up front, naming them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import GAN, ce_loss, disc_loss, gan_batches, gen_loss, mlp, mlp_batches

import fengine as fe
from fengine import optim
from fengine.config import from_dict, to_dict


# ------------------------------------------------------------- post-update order
def _row_norm_at_most(limit, log=None):
    def constraint(step_fn):
        def wrapped(state, batch):
            state, metrics = step_fn(state, batch)
            if log is not None:
                log.append("constraint")
            with torch.no_grad():
                w = state.params["0.weight"]
                w.copy_(torch.renorm(w, 2, 0, limit))
            return state, metrics

        return wrapped

    return constraint


def test_post_update_wrappers_act_in_the_order_written():
    """post_update(constraint), ema(...): the EMA averages the constrained weights (momentum 1:
    the EMA is the latest weights); written the other way round it averages the raw update."""
    batches = mlp_batches(3)
    ema_rows = {}
    for first in ("constraint", "ema"):
        wrappers = [fe.post_update(_row_norm_at_most(0.1)), fe.ema(momentum=1.0)]
        if first == "ema":
            wrappers.reverse()
        step = fe.train_step(ce_loss, optim.sgd(1.0), *wrappers)
        state = step.init(mlp())
        for b in batches:
            state, _ = step(state, b)
        assert state.params["0.weight"].norm(dim=1).max() <= 0.1 + 1e-6
        ema_rows[first] = step.wrappers[-1 if first == "constraint" else 0].params(state)
    constrained = ema_rows["constraint"]["0.weight"].norm(dim=1).max()
    assert constrained <= 0.1 + 1e-6
    assert ema_rows["ema"]["0.weight"].norm(dim=1).max() > 0.2  # the EMA saw the raw update


def test_two_post_update_wrappers_run_after_the_update_in_written_order():
    log = []

    def mark(name):
        def wrapper(step_fn):
            def wrapped(state, batch):
                out = step_fn(state, batch)
                log.append(name)
                return out

            return wrapped

        return wrapper

    step = fe.train_step(
        ce_loss, optim.sgd(0.1), fe.post_update(mark("a")), fe.post_update(mark("b"))
    )
    step(step.init(mlp()), mlp_batches(1)[0])
    assert log == ["a", "b"]


# ------------------------------------------------------------------ amp arguments
@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(loss_scale=math.inf), "loss_scale"),
        (dict(loss_scale=True), "loss_scale"),
        (dict(init_scale=0.0), "init_scale"),
        (dict(init_scale=-8.0), "init_scale"),
        (dict(init_scale=math.nan), "init_scale"),
        (dict(growth_factor=1.0), "growth_factor"),
        (dict(growth_factor=0.5), "growth_factor"),
        (dict(backoff_factor=1.0), "backoff_factor"),
        (dict(backoff_factor=0.0), "backoff_factor"),
        (dict(growth_interval=0), "growth_interval"),
        (dict(growth_interval=2.0), "growth_interval"),
    ],
)
def test_amp_refuses_scaler_settings_that_would_train_wrong(kw, arg):
    with pytest.raises(ValueError, match=rf"amp: {arg} must be .*, got {kw[arg]!r}"):
        fe.amp("float16", **kw)


def test_amp_accepts_gradscalers_own_range():
    fe.amp("float16", init_scale=1.0, growth_factor=1.5, backoff_factor=0.25, growth_interval=1)
    fe.amp("float16", loss_scale=128)


# ------------------------------------------------------------ gradient transforms
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.clip_by_global_norm(math.nan), "clip_by_global_norm: max_norm .* got nan"),
        (lambda: optim.clip_by_global_norm(True), "clip_by_global_norm: max_norm .* got True"),
        (lambda: optim.clip_by_global_norm(1.0, "x"), "clip_by_global_norm: norm_type .* got 'x'"),
        (lambda: optim.clip_by_value(math.nan), "clip_by_value: clip_value .* got nan"),
        (lambda: optim.clip_by_value(math.inf), "clip_by_value: clip_value .* got inf"),
        (lambda: optim.clip_by_value(True), "clip_by_value: clip_value .* got True"),
        (lambda: optim.scale(math.nan), "scale: factor .* got nan"),
    ],
)
def test_clipping_and_scale_refuse_nan_and_bools(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_scale_refuses_non_numbers_and_points_schedules_elsewhere():
    with pytest.raises(TypeError, match="scale: factor must be a finite number .* got 'a'"):
        optim.scale("a")
    with pytest.raises(TypeError, match="use scale_by_schedule"):
        optim.scale(lambda step: 0.1)


def test_scale_by_a_tensor_and_clip_by_an_infinite_norm_still_work():
    """A 0-d tensor scale is SGD; max_norm=inf only reports the norm."""
    batches = mlp_batches(2)
    ref = fe.train_step(ce_loss, optim.sgd(0.1))
    step = fe.train_step(
        ce_loss, optim.chain(optim.clip_by_global_norm(math.inf), optim.scale(torch.tensor(-0.1)))
    )
    a, b = ref.init(mlp()), step.init(mlp())
    for batch in batches:
        a, _ = ref(a, batch)
        b, metrics = step(b, batch)
    assert torch.isfinite(metrics["grad_norm"])
    for n in a.params:
        torch.testing.assert_close(b.params[n], a.params[n])


# ---------------------------------------------------------------------- ema, swa
@pytest.mark.parametrize("name", [None, "", 3])
def test_ema_and_swa_refuse_a_name_that_cannot_key_their_state(name):
    with pytest.raises(TypeError, match=rf"ema: name must be a non-empty string.*got {name!r}"):
        fe.ema(0.9, name=name)
    with pytest.raises(TypeError, match=rf"swa: name must be a non-empty string.*got {name!r}"):
        fe.swa(name=name)


def test_ema_refuses_a_decay_that_is_not_a_number():
    with pytest.raises(TypeError, match="ema: decay must be a number, got '0.999'"):
        fe.ema("0.999")
    with pytest.raises(TypeError, match="ema: momentum must be a number, got True"):
        fe.ema(momentum=True)


# ----------------------------------------------------------- multi_step and steps
@pytest.mark.parametrize("bad", [None, 1, ""])
def test_multi_step_refuses_part_names_that_are_not_strings(bad):
    parts = {bad: (disc_loss, optim.sgd(0.1), "disc"), "gen": (gen_loss, optim.sgd(0.1), "gen")}
    with pytest.raises(
        TypeError, match=rf"multi_step: part names must be non-empty strings.*{bad!r}"
    ):
        fe.multi_step(parts)


def test_multi_step_refuses_an_order_given_as_a_string():
    parts = {"d": (disc_loss, optim.sgd(0.1), "disc"), "g": (gen_loss, optim.sgd(0.1), "gen")}
    with pytest.raises(TypeError, match="order must be a list of part names, got the string 'dg'"):
        fe.multi_step(parts, order="dg")
    fe.multi_step(parts, order=("g", "d")).init(GAN())  # a tuple of names is fine


def test_a_model_without_trainable_params_is_named_at_the_first_step():
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    state = step.init(mlp().requires_grad_(False))
    with pytest.raises(ValueError, match="train_step: no trainable params .*requires_grad"):
        step(state, mlp_batches(1)[0])


def test_a_partly_frozen_model_still_trains():
    """The no-trainable-params check refuses only a model with none: frozen layers stay put."""
    model = mlp()
    model[0].requires_grad_(False)
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    state = step.init(model)
    frozen, trained = state.params["0.weight"].clone(), state.params["2.weight"].clone()
    state, _ = step(state, mlp_batches(1)[0])
    assert torch.equal(state.params["0.weight"], frozen)
    assert not torch.equal(state.params["2.weight"], trained)


def test_a_detached_loss_is_named_at_the_first_step():
    step = fe.train_step(lambda m, b: ce_loss(m, b).detach(), optim.sgd(0.1))
    with pytest.raises(ValueError, match="train_step: the loss does not require grad.*detach"):
        step(step.init(mlp()), mlp_batches(1)[0])


def test_a_detached_part_loss_names_the_part():
    step = fe.multi_step(
        {"disc": (lambda m, b: sum(disc_loss(m, b).values()).detach(), optim.sgd(0.1), "disc"),
         "gen": (gen_loss, optim.sgd(0.1), "gen")}
    )  # fmt: skip
    with pytest.raises(ValueError, match="multi_step: part 'disc': the loss does not require grad"):
        step(step.init(GAN()), gan_batches(1)[0])


@pytest.mark.parametrize("device", ["tpu", 3.5])
def test_init_names_an_unknown_device(device):
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    with pytest.raises(ValueError, match=rf"step.init: device must be .*got {device!r}"):
        step.init(mlp(), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_init_says_cuda_is_not_available():
    with pytest.raises(ValueError, match="step.init: device 'cuda' but CUDA is not available"):
        fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), device="cuda")


# ------------------------------------------------------- accumulate's integer metrics
def test_accumulate_averages_integer_metrics_like_floats():
    """A count in the aux metrics is the mean over the micro-batches (MMEngine's logger averages
    each micro-iteration's value), not the last micro-batch's; with weight= it is weighted too."""

    def loss_fn(model, batch):
        n = len(batch[1])
        return ce_loss(model, batch), {"n": torch.tensor(n), "n_float": torch.tensor(float(n))}

    x, y = mlp_batches(1, batch=8)[0]
    group = fe.MicroBatches([(x[:5], y[:5]), (x[5:], y[5:])])
    for wrapper, expected in (
        (fe.accumulate(2), 4.0),
        (fe.accumulate(2, weight=lambda b: len(b[1])), 34 / 8),
    ):
        step = fe.train_step(loss_fn, optim.sgd(0.1), wrapper)
        _, metrics = step(step.init(mlp()), group)
        assert float(metrics["n"]) == pytest.approx(expected)
        assert float(metrics["n"]) == pytest.approx(float(metrics["n_float"]))


# ---------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class _Inner:
    width: int = 8
    sizes: tuple[int, ...] = (1,)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    steps: int = 10
    inner: _Inner = _Inner()
    kernel: tuple[int, int] = (3, 3)
    limit: int | None = None
    extra: _Inner | None = None


@pytest.mark.parametrize(
    "data, error, match",
    [
        ({"lr": None}, TypeError, r"_Cfg\.lr: got null, expected float"),
        ({"steps": None}, TypeError, r"_Cfg\.steps: got null, expected int"),
        ({"inner": None}, TypeError, r"_Cfg\.inner: got null, expected _Inner"),
        ({"inner": {"width": None}}, TypeError, r"_Cfg\.inner\.width: got null, expected int"),
        ({"extra": {"width": None}}, TypeError, r"_Cfg\.extra\.width: got null, expected int"),
        ({"kernel": [5, 5, 5]}, ValueError, r"_Cfg\.kernel: expected 2 items .*\[5, 5, 5\]"),
        ({"kernel": [5]}, ValueError, r"_Cfg\.kernel: expected 2 items .*\[5\]"),
        ({"kernel": "55"}, TypeError, r"_Cfg\.kernel: expected a list .*'55'"),
        ({"steps": True}, TypeError, r"_Cfg\.steps: expected int, got True"),
        ({"lr": False}, TypeError, r"_Cfg\.lr: expected float, got False"),
        ({"limit": "3"}, TypeError, r"_Cfg\.limit: expected int, got '3'"),
        ({"inner": {"sizes": [1, True]}}, TypeError, r"_Cfg\.inner\.sizes\[1\]: expected int"),
    ],
)
def test_from_dict_refuses_nulls_wrong_lengths_and_bools_naming_the_field(data, error, match):
    with pytest.raises(error, match=r"from_dict: " + match):
        from_dict(_Cfg, data)


def test_from_dict_keeps_optional_nulls_and_round_trips():
    cfg = _Cfg(lr=1.0, limit=None, extra=_Inner(2, (1, 2)))
    assert from_dict(_Cfg, to_dict(cfg)) == cfg
    assert from_dict(_Cfg, {"limit": None, "extra": None, "lr": 1}) == _Cfg(lr=1.0)


def test_load_into_puts_the_trained_weights_in_the_module():
    """fit trains the state's tensors: the module keeps its initial weights (a user's
    torch.save(model.state_dict()) after fit saved untrained ones). load_into copies the EMA
    weights evaluation uses, or the live ones, and the module then predicts as evaluate does."""
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10)
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    step = fe.train_step(ce_loss, optim.adamw(1e-2), fe.ema(0.9))
    state = fe.fit(step.init(model, seed=0), step, mlp_batches(4), max_steps=6, handlers=[])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in initial.items())  # untouched
    assert state.load_into() is model
    params, buffers = state.eval_weights()
    for name, t in {**params, **buffers}.items():
        assert torch.equal(
            model.get_parameter(name) if name in params else model.get_buffer(name), t
        )
    assert not torch.equal(params["0.weight"], state.params["0.weight"])  # the EMA, not the live
    x, y = mlp_batches(1, seed=5)[0]
    with torch.no_grad():
        ours = torch.nn.functional.cross_entropy(model.eval()(x), y)
    assert fe.evaluate(state, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
                       [(x, y)], [fe.metrics.MeanLoss()])["loss"] == pytest.approx(float(ours), rel=1e-6)  # fmt: skip
    fresh = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10)
    )
    other = state.load_into(fresh, weights="live")
    assert torch.equal(other.get_parameter("0.weight"), state.params["0.weight"])
    with pytest.raises(ValueError, match=r"not the state's: missing from the module \['1.bias'"):
        state.load_into(mlp())
    with pytest.raises(ValueError, match="weights must be 'eval' or 'live', got 'ema'"):
        state.load_into(weights="ema")
