"""Step transforms: accumulate, amp (GradScaler parity), ema (MMEngine parity), check_finite, compose."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import optim


def _create(model, tx, seed=0):
    return fe.TrainState.create(model, tx, seed=seed)


# ---------------------------------------------------------------- accumulate
def test_accumulate_k_micro_batches_equals_one_big_batch():
    """k micro-batches of size b == one batch of size k*b (mean loss), within float tolerance."""
    tx = optim.sgd(0.1, momentum=0.9)
    acc_step = fe.compose(fe.accumulate(4))(fe.train_step(ce_loss, tx))
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
    step = fe.compose(fe.accumulate(4))(fe.train_step(losses, tx))
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
    step = fe.compose(fe.accumulate(3, weight=lambda b: len(b[1])))(fe.train_step(ce_loss, tx))
    a, _ = step(_create(mlp(), tx), fe.MicroBatches(micro))
    big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    b, _ = fe.train_step(ce_loss, tx)(_create(mlp(), tx), big)
    for n in a.params:
        torch.testing.assert_close(a.params[n], b.params[n], rtol=1e-5, atol=1e-6)


def test_accumulate_rejects_bad_groups():
    tx = optim.sgd(0.1)
    step = fe.compose(fe.accumulate(2))(fe.train_step(ce_loss, tx))
    with pytest.raises(TypeError, match="MicroBatches"):
        step(_create(mlp(), tx), mlp_batches(1)[0])
    with pytest.raises(ValueError, match="got 3 micro-batches, expected 1..2"):
        step(_create(mlp(), tx), fe.MicroBatches(mlp_batches(3)))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        fe.accumulate(0)


def test_accumulate_micro_batches_draw_distinct_dropout():
    tx = optim.sgd(0.1)
    masks = []

    def loss_fn(model, batch):
        masks.append(F.dropout(torch.ones(100), 0.5, training=True))
        return ce_loss(model, batch)

    step = fe.compose(fe.accumulate(2))(fe.train_step(loss_fn, tx, donate=False))
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
    step = fe.compose(fe.amp("float16", growth_interval=growth_interval))(
        fe.train_step(_scaled_loss_fn, tx)
    )
    state = _create(mlp(), tx)
    scales, trackers, skipped = [], [], []
    for batch in data:
        state, m = step(state, batch)
        scales.append(float(state.extra["amp"].scale))
        trackers.append(int(state.extra["amp"].growth_tracker))
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


def test_bf16_autocasts_without_scaler():
    seen = []

    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return F.cross_entropy(out.float(), batch[1])

    tx = optim.sgd(0.1)
    step = fe.compose(fe.amp("bfloat16"))(fe.train_step(loss_fn, tx))
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
    step = fe.compose(fe.ema(momentum=0.1, interval=interval, begin=begin))(
        fe.train_step(ce_loss, tx)
    )
    state = _create(mlp(), tx)
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
    ours = state.extra["ema"].params
    for n, p in oracle.module.named_parameters():
        assert torch.equal(ours[n], p.detach()), n
    assert fe.ema_params(state) is ours


def test_ema_decay_is_one_minus_momentum_and_validates():
    with pytest.raises(ValueError, match="not both"):
        fe.ema(0.99, momentum=0.01)
    with pytest.raises(ValueError, match="momentum must be in"):
        fe.ema(1.5)


# ---------------------------------------------------------------- check_finite and compose
def test_check_finite_names_step_and_terms():
    def loss_fn(model, batch):
        ce = ce_loss(model, batch)
        return {"loss_ce": ce, "loss_bad": ce * float("nan"), "acc": ce * 0}

    tx = optim.sgd(0.1)
    step = fe.compose(fe.check_finite())(fe.train_step(loss_fn, tx))
    state = _create(mlp(), tx)
    before = state.params["0.weight"].clone()
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss at step 1: loss=nan, loss_bad=nan"
    ):
        step(state, mlp_batches(1)[0])
    assert torch.equal(state.params["0.weight"], before)  # nothing applied, state still usable


def test_check_finite_defers_to_fp16_loss_scaling():
    tx = optim.sgd(0.1)
    step = fe.compose(fe.check_finite(), fe.amp("float16"))(fe.train_step(_scaled_loss_fn, tx))
    x, y = mlp_batches(1)[0]
    state, m = step(_create(mlp(), tx), (x, y, torch.tensor(float("inf"))))
    assert bool(m["update_skipped"]) and float(state.extra["amp"].scale) == 2.0**15


def test_compose_order_is_canonical_and_duplicates_rejected():
    tx = optim.sgd(0.1, momentum=0.9)
    data = [(x, y, torch.tensor(1.0)) for x, y in mlp_batches(4)]
    a_step = fe.compose(fe.ema(0.9), fe.amp("float16"), fe.accumulate(2))(
        fe.train_step(_scaled_loss_fn, tx)
    )
    b_step = fe.compose(fe.accumulate(2), fe.amp("float16"), fe.ema(0.9))(
        fe.train_step(_scaled_loss_fn, tx)
    )
    a, b = _create(mlp(), tx), _create(mlp(), tx)
    for i in range(0, 4, 2):
        a, _ = a_step(a, fe.MicroBatches(data[i : i + 2]))
        b, _ = b_step(b, fe.MicroBatches(data[i : i + 2]))
    assert_dicts_equal(a.params, b.params)
    assert_dicts_equal(a.extra["ema"].params, b.extra["ema"].params)
    assert a_step.transforms == ("accumulate", "amp", "ema")
    with pytest.raises(ValueError, match="given more than once"):
        fe.compose(fe.ema(0.9), fe.ema(0.8))
    with pytest.raises(TypeError, match="expected step transforms"):
        fe.compose(optim.sgd(0.1))
