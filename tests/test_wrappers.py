"""Step wrappers: accumulate, amp (GradScaler parity), ema (MMEngine parity), check_finite, reading order."""

from __future__ import annotations

import copy
import re
import types

import numpy as np
import pytest
import torch
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import optim


def _create(model, tx, seed=0):
    """A state for a plain step with ``tx`` (steps with the same tx and no stateful wrappers share it)."""
    return fe.train_step(ce_loss, tx).init(model, seed=seed)


# ---------------------------------------------------------------- accumulate
def test_accumulate_k_micro_batches_equals_one_big_batch():
    """k micro-batches of size b == one batch of size k*b (mean loss), within float tolerance."""
    tx = optim.sgd(0.1, momentum=0.9)
    acc_step = fe.train_step(ce_loss, tx, fe.accumulate(4))
    big_step = fe.train_step(ce_loss, tx)
    a, b = _create(mlp(), tx), _create(mlp(), tx)
    for micro in [mlp_batches(4, batch=8, seed=s) for s in range(10)]:
        a, ma = acc_step(a, fe.MicroBatches(micro))
        big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
        b, mb = big_step(b, big)
        torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-6, atol=1e-6)
    assert a.step == b.step == 10
    for n in a.params:
        torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-5, atol=1e-6)


def test_accumulate_leftover_window_matches_mmengine_optimwrapper():
    """MMEngine's ToyModel example: 25 iterations, accumulative_counts=4 -> 7 updates, the last one of 1 micro-batch
    divided by 1 (not 4). fengine groups the 25 batches as 6x4 + 1."""
    from mmengine.optim import OptimWrapper

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def forward(self, x):
            return self.linear(x)

    def losses(model, batch):
        x, y = batch
        feat = model(x)
        return {"loss1": (feat - y).pow(2).mean(), "loss2": (feat - y).abs().mean()}

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 1, generator=g), torch.randn(2, 1, generator=g)) for _ in range(25)]

    torch.manual_seed(0)
    ref = Toy()
    torch.manual_seed(0)
    ours = Toy()

    wrapper = OptimWrapper(
        torch.optim.SGD(ref.parameters(), lr=0.01, foreach=True), accumulative_counts=4
    )
    wrapper.initialize_count_status(ref, 0, 25)
    updates = 0
    for batch in batches:
        with wrapper.optim_context(ref):
            out = losses(ref, batch)
        before = ref.linear.weight.detach().clone()
        wrapper.update_params(out["loss1"] + out["loss2"])
        updates += not torch.equal(before, ref.linear.weight)
    assert updates == 7

    tx = optim.sgd(0.01)
    step = fe.train_step(losses, tx, fe.accumulate(4))
    state = _create(ours, tx)
    groups = [batches[i : i + 4] for i in range(0, 25, 4)]
    assert [len(gr) for gr in groups] == [4, 4, 4, 4, 4, 4, 1]
    for group in groups:
        state, _ = step(state, fe.MicroBatches(group))
    assert state.step == 7
    for n, p in ref.named_parameters():
        torch.testing.assert_close(state.params[n], p.detach(), rtol=1e-6, atol=1e-7)


def test_accumulate_weighted_by_samples_gives_the_exact_mean_for_unequal_micro_batches():
    tx = optim.sgd(0.5)
    sizes = [8, 3, 5]
    g = torch.Generator().manual_seed(2)
    micro = [
        (torch.randn(s, 16, generator=g), torch.randint(0, 10, (s,), generator=g)) for s in sizes
    ]
    step = fe.train_step(ce_loss, tx, fe.accumulate(3, weight=lambda b: len(b[1])))
    a, _ = step(_create(mlp(), tx), fe.MicroBatches(micro))
    big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    b, _ = fe.train_step(ce_loss, tx)(_create(mlp(), tx), big)
    for n in a.params:
        torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-5, atol=1e-6)


def test_accumulate_rejects_bad_groups():
    tx = optim.sgd(0.1)
    step = fe.train_step(ce_loss, tx, fe.accumulate(2))
    with pytest.raises(TypeError, match="MicroBatches"):
        step(_create(mlp(), tx), mlp_batches(1)[0])
    with pytest.raises(ValueError, match="got 3 micro-batches, expected 1..2"):
        step(_create(mlp(), tx), fe.MicroBatches(mlp_batches(3)))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        fe.accumulate(0)


class _Float32Head(torch.nn.Module):
    """A head the model keeps in float32 under autocast (a numerically sensitive part)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        h = self.a(x)
        with torch.autocast("cpu", enabled=False):
            return self.head(h.float())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_runs_the_backward_outside_autocast_as_torchs_recipe(dtype):
    """torch's recipe autocasts the forward and loss only; the step ran its backward inside
    autocast too, so the float32 head's backward matmuls ran in the low precision (off by up to
    1.2e-5 after one SGD step). Bitwise torch's: autocast forward, then GradScaler backward."""

    def loss_fn(model, batch):
        x, y = batch
        return (model(x) - y).pow(2).mean()

    torch.manual_seed(0)
    model = _Float32Head()
    batch = (torch.randn(16, 32), torch.randn(16, 64))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=True)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == "float16")
    with torch.autocast("cpu", dtype=getattr(torch, dtype)):
        loss = loss_fn(ref, batch)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    step = fe.train_step(loss_fn, optim.sgd(0.1), fe.amp(dtype))
    state, _ = step(step.init(model), batch)
    for n, p in ref.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n


class _TwoExperts(torch.nn.Module):
    """Two experts of one shape; a micro-batch's route says which run (an MoE, an aux head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.e0 = torch.nn.Linear(4, 4, bias=False)
        self.e1 = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x, route):
        out = 0
        if 0 in route:
            out = out + self.e0(x)
        if 1 in route:
            out = out + self.e1(torch.tanh(x))
        return out


def test_accumulate_adds_each_gradient_to_its_own_param_when_a_micro_batch_skips_one():
    """Micro-batch 0 leaves e0 unused: e0 joined the sum after e1, and the next micro-batches'
    gradients were added by position (e1's to e0's sum, and back): both off by 0.015, silently.
    Against torch: (loss / 3).backward() per micro-batch, SGD and clip_grad_norm_ (bitwise)."""

    def loss_fn(model, b):
        x, y, route = b
        return (model(x, route) - y).pow(2).mean()

    g = torch.Generator().manual_seed(1)
    group = [(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), r)
             for r in ((1,), (0, 1), (0, 1))]  # fmt: skip
    ref = _TwoExperts()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for b in group:
        (loss_fn(ref, b) / 3).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt.step()
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1))
    step = fe.train_step(loss_fn, tx, fe.accumulate(3))
    state, _ = step(step.init(_TwoExperts()), fe.MicroBatches(group))
    for n, p in ref.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n


def test_accumulate_refuses_a_weight_that_is_not_finite_and_non_negative():
    """NaN or inf made every param NaN in one update; a negative weight gave a share of -0.5."""
    tx = optim.sgd(0.1)
    for bad, at in (([float("nan"), 8.0], 0), ([12.0, -4.0], 1), ([float("inf"), 8.0], 0)):
        weights = iter(bad)
        step = fe.train_step(ce_loss, tx, fe.accumulate(2, weight=lambda mb, w=weights: next(w)))
        with pytest.raises(ValueError, match=f"micro-batch {at}'s weight is"):
            step(_create(mlp(), tx), fe.MicroBatches(mlp_batches(2)))


def test_accumulate_micro_batches_draw_distinct_dropout():
    tx = optim.sgd(0.1)
    masks = []

    def loss_fn(model, batch):
        masks.append(F.dropout(torch.ones(100), 0.5, training=True))
        return ce_loss(model, batch)

    step = fe.train_step(loss_fn, tx, fe.accumulate(2), donate=False)
    s = _create(mlp(), tx, seed=1)
    step(s, fe.MicroBatches(mlp_batches(2)))
    step(s, fe.MicroBatches(mlp_batches(2)))
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])


# ---------------------------------------------------------------- amp
def _scaled_loss_fn(model, batch):
    x, y, blowup = batch
    return ce_loss(model, (x, y)) * blowup


def test_fp16_scaler_sequence_matches_torch_gradscaler():
    """Same gradients, injected inf steps: scale, growth tracker, skipped updates and params match GradScaler."""
    growth_interval = 3
    batches = mlp_batches(16)
    poison = {2, 3, 9}  # steps whose loss is inf -> inf/nan grads -> skipped
    data = [
        (x, y, torch.tensor(float("inf") if t in poison else 1.0))
        for t, (x, y) in enumerate(batches)
    ]

    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    ref_scales, ref_trackers = [], []
    for batch in data:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _scaled_loss_fn(ref, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()
        ref_scales.append(scaler.get_scale())
        ref_trackers.append(int(scaler._growth_tracker))

    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9))
    amp = fe.amp("float16", growth_interval=growth_interval)
    step = fe.train_step(_scaled_loss_fn, tx, amp)
    state = step.init(mlp())
    scales, trackers, skipped = [], [], []
    for batch in data:
        state, m = step(state, batch)
        scales.append(float(amp.scaler(state).scale))
        trackers.append(int(amp.scaler(state).growth_tracker))
        skipped.append(bool(m["update_skipped"]))
    assert scales == ref_scales
    assert trackers == ref_trackers
    assert [t for t, s in enumerate(skipped) if s] == sorted(poison)
    assert state.step == 16 and state.opt_state[1].num_updates == 16 - len(poison)
    pairs = list(zip(ref_scales, ref_scales[1:]))
    assert any(b > a for a, b in pairs) and any(
        b < a for a, b in pairs
    )  # both growth and backoff exercised
    assert_dicts_equal(state.params, {n: p.detach() for n, p in ref.named_parameters()}, "params")


@pytest.mark.parametrize("kind", ["sgd", "chain", "from_torch", "compiled"])
def test_a_skipped_fp16_update_reports_the_scheduled_lr_as_torch_schedulers_set_it(kind):
    """GradScaler skips ``optimizer.step`` but the scheduler still moves the group's lr (MMEngine
    logs it every iteration); the skipped steps reported the lr of the last update."""
    data = [(x, y, torch.tensor(float("inf") if t in (2, 3) else 1.0))
            for t, (x, y) in enumerate(mlp_batches(8))]  # fmt: skip
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    scaler = torch.amp.GradScaler("cpu")
    ref_lrs = []
    for batch in data:
        ref_lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _scaled_loss_fn(ref, batch)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()

    lr = fe.schedules.linear(0.1, 0.1, end=6)
    tx = {
        "sgd": lambda: optim.sgd(lr, momentum=0.9),
        "chain": lambda: optim.chain(optim.clip_by_value(1e9), optim.sgd(lr, momentum=0.9)),
        "from_torch": lambda: optim.from_torch(torch.optim.SGD, lr=lr, momentum=0.9, foreach=True),
        "compiled": lambda: optim.sgd(lr, momentum=0.9),
    }[kind]()
    # compiled: the skip is a selection in the graph, which restored the old lr in the state
    compiled = {"compile": {"backend": "eager"}} if kind == "compiled" else {}
    step = fe.train_step(_scaled_loss_fn, tx, fe.amp("float16"), **compiled)
    state = step.init(mlp())
    lrs, reported, skipped = [], [], []
    for batch in data:
        state, m = step(state, batch)
        lrs.append(float(m["lr"]))
        reported.append(optim.hyperparams(state.opt_state)["lr"])
        skipped.append(bool(m["update_skipped"]))
    assert [t for t, s in enumerate(skipped) if s] == [2, 3]
    assert lrs == pytest.approx(ref_lrs, rel=1e-12) and reported == lrs
    if kind != "compiled":  # torch.func.grad's bits are within a tolerance, not equal
        ref_params = {n: p.detach() for n, p in ref.named_parameters()}
        assert_dicts_equal(state.params, ref_params, "params")


def test_bf16_autocasts_without_scaler():
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return F.cross_entropy(out.float(), batch[1])

    tx = optim.sgd(0.1)
    step = fe.train_step(loss_fn, tx, fe.amp("bfloat16"))
    state, m = step(_create(mlp(), tx), mlp_batches(1)[0])
    assert seen == [torch.bfloat16]
    assert "amp" not in state.extra and "loss_scale" not in m
    assert state.params["0.weight"].dtype == torch.float32  # master weights stay fp32


def test_amp_bad_input():
    with pytest.raises(ValueError, match="dtype must be one of"):
        fe.amp("float8")
    with pytest.raises(ValueError, match="loss_scale must be 'dynamic'"):
        fe.amp("float16", loss_scale="auto")


# ---------------------------------------------------------------- ema
@pytest.mark.parametrize("interval,begin", [(1, 0), (2, 0), (1, 3)])
def test_ema_matches_mmengine_exponential_moving_average(interval, begin):
    from mmengine.model import ExponentialMovingAverage

    tx = optim.adamw(1e-2)
    ema = fe.ema(momentum=0.1, interval=interval, begin=begin)
    step = fe.train_step(ce_loss, tx, ema)
    state = step.init(mlp())
    live = mlp()
    oracle = ExponentialMovingAverage(live, momentum=0.1, interval=interval)
    for t, batch in enumerate(mlp_batches(8)):
        state, _ = step(state, batch)
        with torch.no_grad():
            for n, p in live.named_parameters():
                p.copy_(state.params[n])
        if t + 1 >= begin:  # MMEngine EMAHook: started when runner.iter + 1 >= begin_iter
            oracle.update_parameters(live)
        else:
            for n, p in oracle.module.named_parameters():
                p.data.copy_(live.get_parameter(n))
    ours = ema.params(state)
    for n, p in oracle.module.named_parameters():
        assert torch.equal(ours[n], p.detach()), n
    params, buffers = state.eval_weights()  # what evaluation, checkpoints and publish use
    assert all(params[n] is ours[n] for n in ours) and buffers is not None


def test_ema_decay_is_one_minus_momentum_and_validates():
    with pytest.raises(ValueError, match="not both"):
        fe.ema(0.99, momentum=0.01)
    with pytest.raises(ValueError, match="momentum must be in"):
        fe.ema(1.5)


def test_ema_of_a_submodule_only():
    tx = optim.sgd(0.5)
    ema = fe.ema(momentum=0.5, params="2")  # the head Linear of the MLP only
    step = fe.train_step(ce_loss, tx, ema)
    state = step.init(mlp())
    assert sorted(state.extra["ema"].params) == ["2.bias", "2.weight"]
    for batch in mlp_batches(3):
        state, _ = step(state, batch)
    params, _ = state.eval_weights()
    assert params["0.weight"] is state.params["0.weight"]
    assert not torch.equal(params["2.weight"], state.params["2.weight"])


@pytest.mark.parametrize("select", ["name", "predicate"])
def test_ema_of_a_submodule_averages_its_buffers_only_as_mmengine(select):
    """``ema(params="gen", update_buffers=True)`` is MMEngine's ExponentialMovingAverage of
    ``model.gen``: that submodule's params and buffers (it averaged the others' BatchNorm
    statistics too, which evaluation then used beside their live weights)."""
    from mmengine.model import ExponentialMovingAverage

    def net():
        torch.manual_seed(0)
        return nn.ModuleDict(
            {
                "gen": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
                "disc": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
            }
        )

    def loss_fn(model, batch):
        return model["disc"](model["gen"](batch)).square().mean()

    gen_params = {f"gen.{n}" for n, _ in net()["gen"].named_parameters()}
    # a predicate on param names: the buffers of the modules whose params it selects
    spec = "gen" if select == "name" else gen_params.__contains__
    ema = fe.ema(momentum=0.3, update_buffers=True, params=spec)
    step = fe.train_step(loss_fn, optim.sgd(0.1), ema)
    state = step.init(net())
    live = net()
    oracle = ExponentialMovingAverage(live["gen"], momentum=0.3, update_buffers=True)
    for t in range(4):
        batch = torch.randn(8, 4, generator=torch.Generator().manual_seed(t))
        state, _ = step(state, batch)
        live.load_state_dict({**state.params, **state.buffers})
        oracle.update_parameters(live["gen"])
    kept = ema.state(state)
    assert sorted(kept.buffers) == [
        "gen.1.num_batches_tracked",
        "gen.1.running_mean",
        "gen.1.running_var",
    ]
    for n, t in oracle.module.state_dict().items():
        assert torch.equal({**kept.params, **kept.buffers}[f"gen.{n}"], t), n
    _, buffers = state.eval_weights()
    assert buffers["disc.1.running_mean"] is state.buffers["disc.1.running_mean"]


@pytest.mark.parametrize(
    ("kwargs", "horizon", "refused"),
    [
        (dict(begin=13), dict(max_steps=12), "the run ends at update 12"),
        (dict(begin=12), dict(max_steps=12), None),
        (dict(begin_epoch=4), dict(max_epochs=3), "the run has 3 epochs"),
        (dict(begin_epoch=3), dict(max_epochs=3), None),
        (dict(begin_epoch=2), dict(max_steps=12), "an iteration-based run is one epoch"),
        (dict(begin_epoch=1), dict(max_steps=12), None),
    ],
)
def test_an_average_that_never_begins_is_refused_as_mmengines_emahook(kwargs, horizon, refused):
    """MMEngine's EMAHook asserts ``begin_epoch <= max_epochs`` / ``begin_iter <= max_iters`` at
    before_train (an IterBasedTrainLoop is one epoch); fengine evaluated the live weights as the
    "average" silently."""
    from mmengine.hooks import EMAHook

    hook = EMAHook(begin_iter=kwargs.get("begin", 0), begin_epoch=kwargs.get("begin_epoch", 0))
    batches = mlp_batches(4)
    runner = types.SimpleNamespace(
        max_epochs=horizon.get("max_epochs", 1),
        max_iters=horizon.get("max_steps", horizon.get("max_epochs", 1) * len(batches)),
    )
    try:
        hook.before_train(runner)
        mmengine_refuses = False
    except AssertionError:
        mmengine_refuses = True
    assert mmengine_refuses == (refused is not None)
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.ema(**kwargs))
    state = step.init(mlp())
    if refused is None:
        fe.fit(state, step, batches, handlers=[], **horizon)
    else:
        with pytest.raises(ValueError, match=refused):
            fe.fit(state, step, batches, handlers=[], **horizon)
        assert state.step == 0 and not state.is_donated


def test_ema_of_a_name_the_model_lacks_is_refused_at_init():
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.ema(params="generator"))
    with pytest.raises(ValueError, match=r"ema: params= selects none of the model's params; its "
                                         r"top-level submodules are \['0', '2'\]"):  # fmt: skip
        step.init(mlp())


# ---------------------------------------------------------------- check_finite
def test_check_finite_names_step_and_terms():
    def loss_fn(model, batch):
        ce = ce_loss(model, batch)
        return {"loss_ce": ce, "loss_bad": ce * float("nan"), "acc": ce * 0}

    tx = optim.sgd(0.1)
    step = fe.train_step(loss_fn, tx, fe.check_finite())
    state = _create(mlp(), tx)
    before = state.params["0.weight"].clone()
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 1: loss=nan, loss_bad=nan"
    ) as e:
        step(state, mlp_batches(1)[0])
    assert torch.equal(state.params["0.weight"], before)  # nothing applied, state still usable
    # it says what it does not restore (it claimed "the state before this step is intact")
    assert "buffers the forward updates in place (BatchNorm statistics) already took" in str(
        e.value
    )


def test_check_finite_after_fp16_amp_leaves_overflows_to_the_scaler():
    tx = optim.sgd(0.1)
    amp = fe.amp("float16")
    step = fe.train_step(_scaled_loss_fn, tx, amp, fe.check_finite())
    x, y = mlp_batches(1)[0]
    state, m = step(step.init(mlp()), (x, y, torch.tensor(float("inf"))))
    assert bool(m["update_skipped"]) and float(amp.scaler(state).scale) == 2.0**15
    with pytest.raises(ValueError, match=r"check_finite\(\) is written before amp"):
        fe.train_step(_scaled_loss_fn, tx, fe.check_finite(), fe.amp("float16"))


# ---------------------------------------------------------------- composition
def test_forward_wrappers_in_either_order_give_the_same_bits():
    """amp outside or inside accumulate: the same scaled micro-batch losses, the same update."""
    tx = optim.sgd(0.1, momentum=0.9)
    data = [(x, y, torch.tensor(1.0)) for x, y in mlp_batches(4)]
    a_step = fe.train_step(_scaled_loss_fn, tx, fe.amp("float16"), fe.accumulate(2), fe.ema(0.9))
    b_step = fe.train_step(_scaled_loss_fn, tx, fe.accumulate(2), fe.amp("float16"), fe.ema(0.9))
    a, b = a_step.init(mlp()), b_step.init(mlp())
    for i in range(0, 4, 2):
        a, _ = a_step(a, fe.MicroBatches(data[i : i + 2]))
        b, _ = b_step(b, fe.MicroBatches(data[i : i + 2]))
    assert_dicts_equal(a.params, b.params)
    assert_dicts_equal(a.extra["ema"].params, b.extra["ema"].params)


def test_meaningless_combinations_are_refused_at_construction():
    tx = optim.sgd(0.1)
    with pytest.raises(ValueError, match="amp .* is given twice"):
        fe.train_step(ce_loss, tx, fe.amp("float16"), fe.amp("bfloat16"))
    with pytest.raises(ValueError, match="accumulate .* is given twice"):
        fe.train_step(ce_loss, tx, fe.accumulate(2), fe.accumulate(2))
    with pytest.raises(ValueError, match=r"same name \['ema'\]"):
        fe.train_step(ce_loss, tx, fe.ema(0.9), fe.ema(0.8))
    # distinct names over disjoint params: fine (over the same params: test_averaging)
    fe.train_step(ce_loss, tx, fe.ema(0.9, params="0"), fe.ema(0.8, params="2", name="ema_2"))
    with pytest.raises(
        TypeError, match="step wrapper 0 is a gradient transformation; put it in tx"
    ):
        fe.train_step(ce_loss, tx, optim.clip_by_global_norm(1.0))
    with pytest.raises(TypeError, match="step wrapper 1 is function"):
        fe.train_step(ce_loss, tx, fe.amp("bfloat16"), lambda grad_fn: grad_fn)


def test_init_builds_every_state_and_a_foreign_state_is_named():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    step = fe.train_step(_scaled_loss_fn, tx, fe.amp("float16"), fe.ema(0.9))
    state = step.init(mlp(), seed=3)
    assert state.seed == 3 and sorted(state.extra) == ["amp", "ema"]
    assert type(state.opt_state[1]).__name__ == "AdamState"
    batch = (*mlp_batches(1)[0], torch.tensor(1.0))
    sgd_state = fe.train_step(_scaled_loss_fn, optim.sgd(0.1)).init(mlp())
    with pytest.raises(
        fe.StepMismatchError, match="state.opt_state is SgdState, this step makes tuple"
    ):
        step(sgd_state, batch)
    adam_alone = fe.train_step(
        _scaled_loss_fn, optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    )
    with pytest.raises(
        fe.StepMismatchError, match=r"state.opt_state\[1\] is SgdState, this step makes AdamState"
    ):
        step(adam_alone.init(mlp()), batch)
    plain = fe.train_step(_scaled_loss_fn, tx).init(mlp())
    with pytest.raises(fe.StepMismatchError, match="state.extra lacks 'amp'.*lacks 'ema'"):
        step(plain, batch)
    with pytest.raises(fe.StepMismatchError, match="state.extra has 'ema', which no wrapper"):
        fe.train_step(_scaled_loss_fn, tx, fe.amp("float16"))(state, batch)
    with pytest.raises(TypeError, match="takes no gradient transformation"):
        fe.TrainState.create(mlp(), tx)
    state, _ = step(state, batch)  # the state it built fits
    assert state.step == 1


# ------------------------------------------------- user-written wrappers of each kind
class GradientNoise:
    """README's gradient transformation: Gaussian noise on the gradients, keyed by (seed, step)."""

    def __new__(cls, std, seed=0, seen=None):
        def init(params):
            return optim.EmptyState()

        def update(grads, state, params=None, *, step=None):
            if seen is not None:
                seen.append({n: g.clone() for n, g in grads.items()})
            g = torch.Generator().manual_seed(fe.rng.fold_in(seed, step))
            noisy = {n: x + std * torch.randn(x.shape, generator=g) for n, x in grads.items()}
            return noisy, state

        return optim.GradientTransformation(init, update)


def test_user_wrappers_of_each_kind_under_fp16_scaling_with_accumulation():
    """A gradient transformation, a forward wrapper (a context) and a post-update wrapper, each a few
    lines, under fp16 dynamic loss scaling with 3 micro-batches, against torch + GradScaler."""
    seen_by_tx, seen_by_forward, seen_after = [], [], []

    def recording_context(grad_fn):  # a forward wrapper: runs the forward/backward under a context
        def wrapped(state, batch, **kw):
            with torch.autograd.set_grad_enabled(True):
                g = grad_fn(state, batch, **kw)
            seen_by_forward.append(
                (torch.is_autocast_enabled("cpu"), {n: v.clone() for n, v in g.grads.items()})
            )
            return g

        return wrapped

    def max_norm_rows(step_fn):  # a post-update wrapper: a weight constraint after each update
        def wrapped(state, batch):
            state, metrics = step_fn(state, batch)
            seen_after.append(state.params["0.weight"].clone())
            with torch.no_grad():
                state.params["0.weight"].copy_(torch.renorm(state.params["0.weight"], 2, 0, 0.5))
            return state, metrics

        return wrapped

    tx = optim.chain(GradientNoise(0.0, seen=seen_by_tx), optim.sgd(0.1, momentum=0.9))
    amp = fe.amp("float16", init_scale=2.0**10)
    step = fe.train_step(
        ce_loss, tx, amp, fe.forward_wrapper(recording_context), fe.accumulate(3),
        fe.post_update(max_norm_rows),
    )  # fmt: skip
    state = step.init(mlp())

    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):
        group = mlp_batches(3, seed=10 + t)
        scale = amp.scaler(state).scale.clone()
        state, _ = step(state, fe.MicroBatches(group))
        opt.zero_grad(set_to_none=True)
        for x, y in group:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = ce_loss(ref, (x, y))
            scaler.scale(loss * (1.0 / 3)).backward()
        scaler.unscale_(opt)
        true_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        scaler.step(opt)
        scaler.update()
        after_update = ref[0].weight.detach().clone()
        with torch.no_grad():
            ref[0].weight.copy_(torch.renorm(ref[0].weight, 2, 0, 0.5))
        # the gradient transformation in tx sees the true, unscaled gradient
        assert_dicts_equal(seen_by_tx[t], true_grads, f"tx gradients at step {t}")
        # the forward wrapper sits inside amp: autocast is on, and it sees the backward's gradients,
        # which are of the scaled loss (as torch's .grad before unscale_): / scale == torch's true ones
        autocast_on, grads = seen_by_forward[t]
        assert autocast_on
        assert_dicts_equal({n: v / scale for n, v in grads.items()}, true_grads, "forward wrapper")
        # the post-update wrapper sees the updated params
        assert torch.equal(seen_after[t], after_update)
    assert_dicts_equal(state.params, {n: p.detach() for n, p in ref.named_parameters()}, "params")


def test_fp16_loss_scaling_refuses_a_float16_model_as_gradscaler_does():
    """GradScaler raises "Attempting to unscale FP16 gradients"; amp trained it without a word."""
    model = mlp().half()
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.amp("float16"))
    with pytest.raises(ValueError, match=r"params are float16 already \(0.weight"):
        step.init(model)
    fe.train_step(ce_loss, optim.sgd(0.1), fe.amp("float16", loss_scale=None)).init(mlp().half())


@pytest.mark.parametrize("bad", [float("inf"), "25", True, 1e-9, 0, -1, 1e308])
def test_data_parallel_bucket_mb_is_a_positive_finite_number(bad):
    with pytest.raises(
        ValueError, match=f"bucket_mb must be a finite number .* got {re.escape(repr(bad))}"
    ):
        fe.data_parallel(bad)
    assert "bucket_mb=25" in repr(fe.data_parallel(np.float32(25)))  # any real number


def test_accumulate_takes_tensor_weights_without_a_host_read(monkeypatch):
    """A valid-token count is naturally a device tensor (mask.sum()): float() of it read the host
    once per micro-batch. Kept on the device: the same params as the same weights as numbers."""
    groups = [mlp_batches(3, seed=s) for s in (1, 2)]
    sizes = iter([3.0, 1.0, 2.0, 4.0, 2.0, 2.0] * 2)

    def run(as_tensor):
        tx = optim.sgd(0.1, momentum=0.9)
        w = (lambda mb: torch.tensor(next(sizes))) if as_tensor else (lambda mb: next(sizes))
        step = fe.train_step(ce_loss, tx, fe.accumulate(3, weight=w))
        state = _create(mlp(), tx)
        for g in groups:
            state, _ = step(state, fe.MicroBatches(g))
        return state

    numbers = run(False)
    reads = []
    for name in ("__float__", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, _r=real: (reads.append(1), _r(t))[1])
    tensors = run(True)
    monkeypatch.undo()
    assert not reads
    assert_dicts_equal(tensors.params, numbers.params)


def _loss_with_aux(model, b):
    """``loss_main`` always; ``loss_aux`` (the value given, on the graph) only where given."""
    x, y, aux = b
    out = {"loss_main": ce_loss(model, (x, y))}
    if aux is not None:
        out["loss_aux"] = torch.tensor(aux) + 0 * model(x).sum()
    return out


@pytest.mark.parametrize("weights", [None, "number", "tensor"])
def test_accumulate_averages_a_metric_over_the_micro_batches_that_have_it(weights):
    """A loss term only some micro-batches have was logged divided by k (2.0 in one of 3 logged
    0.667); it is the mean over those that have it, their shares renormalised (MMEngine's logger
    averages a key over the iterations that logged it). The terms every micro-batch has and the
    total loss are bitwise as before: each value times its share, summed in order."""
    sizes = {None: [1.0, 1.0, 1.0], "number": [1.0, 2.0, 3.0], "tensor": [1.0, 2.0, 3.0]}[weights]
    it = iter(sizes)
    weight = None
    if weights == "number":
        weight = lambda mb: next(it)  # noqa: E731
    elif weights == "tensor":
        weight = lambda mb: torch.tensor(next(it))  # noqa: E731
    batches = mlp_batches(3)
    group = [(x, y, aux) for (x, y), aux in zip(batches, [None, 2.0, 5.0])]
    step = fe.train_step(_loss_with_aux, optim.sgd(0.0), fe.accumulate(3, weight=weight))
    _, m = step(step.init(mlp()), fe.MicroBatches(group))
    shares = [s / sum(sizes) for s in sizes]
    if weights == "tensor":
        shares = list(torch.tensor(sizes, dtype=torch.float64) / sum(sizes))
    parts = [fe.parse_losses(_loss_with_aux(mlp(), b)) for b in group]
    main = loss = None
    for (total, terms), w in zip(parts, shares):
        main = terms["loss_main"] * w if main is None else main + terms["loss_main"] * w
        loss = total.detach() * w if loss is None else loss + total.detach() * w
    assert torch.equal(m["loss_main"], main) and torch.equal(m["loss"], loss)
    expected = (2.0 * sizes[1] + 5.0 * sizes[2]) / (sizes[1] + sizes[2])  # 3.5; weighted 3.8
    assert float(m["loss_aux"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_accumulate_keeps_a_metric_whose_micro_batches_all_weigh_zero(as_tensor):
    """Renormalising over shares that sum to 0 would log NaN: the (zero) sum stays."""
    it = iter([0.0, 1.0])
    step = fe.train_step(
        _loss_with_aux,
        optim.sgd(0.0),
        fe.accumulate(2, weight=lambda mb: torch.tensor(next(it)) if as_tensor else next(it)),
    )
    group = [(x, y, aux) for (x, y), aux in zip(mlp_batches(2), [2.0, None])]
    _, m = step(step.init(mlp()), fe.MicroBatches(group))
    assert float(m["loss_aux"]) == 0.0


def test_accumulate_refuses_a_weight_that_is_not_a_function_at_build_time():
    """weight=3 was accepted, then the first step failed with "'int' object is not callable"."""
    with pytest.raises(
        TypeError,
        match=r"accumulate: weight must be a function micro_batch -> number .*got 3 \(int\)",
    ):
        fe.accumulate(2, weight=3)
    assert fe.accumulate(2, weight=len).weight is len
