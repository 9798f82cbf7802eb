"""Several optimizers compose with the wrappers: MMEngine's GAN tutorial with AmpOptimWrappers and an EMA
of the generator, against a hand-written torch loop with one GradScaler per optimizer."""

from __future__ import annotations

import pytest
import torch
from helpers import GAN, assert_dicts_equal, disc_loss, gan_batches, gen_loss

import fengine as fe
from fengine import optim


def _poisoned(batches, at):
    """Batch ``at`` has an inf sample: the discriminator's gradients overflow there, the generator's do not."""
    out = list(batches)
    real, z = out[at]
    real = real.clone()
    real[0, 0] = float("inf")
    out[at] = (real, z)
    return out


def test_gan_under_fp16_with_generator_ema_matches_torch_gradscalers_bitwise():
    """Each part gets its own loss scaler, as OptimWrapperDict(gen=AmpOptimWrapper, disc=AmpOptimWrapper):
    scale, unscale, skip on inf, update per optimizer; the EMA follows the generator only."""
    from mmengine.model import ExponentialMovingAverage

    kw = dict(init_scale=2.0**8, growth_interval=2)
    amp = fe.amp("float16", **kw)
    ema = fe.ema(momentum=0.25, params="gen")
    step = fe.multi_step(
        {
            "disc": (disc_loss, optim.adam(1e-3, b1=0.5), "disc"),
            "gen": (gen_loss, optim.adam(2e-3, b1=0.5), "gen"),
        },
        amp,
        ema,
    )
    state = step.init(GAN())
    assert sorted(state.extra) == ["amp", "ema"] and sorted(state.extra["amp"]) == ["disc", "gen"]
    assert sorted(state.extra["ema"].params) == [
        "gen.0.bias",
        "gen.0.weight",
        "gen.2.bias",
        "gen.2.weight",
    ]
    batches = _poisoned(gan_batches(6), at=2)

    model = GAN()
    d_opt = torch.optim.Adam(model.disc.parameters(), lr=1e-3, betas=(0.5, 0.999), foreach=True)
    g_opt = torch.optim.Adam(model.gen.parameters(), lr=2e-3, betas=(0.5, 0.999), foreach=True)
    d_scaler = torch.amp.GradScaler("cpu", **kw)
    g_scaler = torch.amp.GradScaler("cpu", **kw)
    oracle = ExponentialMovingAverage(model.gen, momentum=0.25)

    def amp_update(opt, scaler, loss_fn, batch):  # MMEngine AmpOptimWrapper.update_params
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = fe.parse_losses(loss_fn(model, batch))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    skipped = []
    for batch in batches:
        state, m = step(state, batch)
        d_loss = amp_update(d_opt, d_scaler, disc_loss, batch)
        g_loss = amp_update(g_opt, g_scaler, gen_loss, batch)
        oracle.update_parameters(model.gen)
        for ours, ref in (
            (m["disc/loss"], d_loss),
            (m["gen/loss"], g_loss),
        ):  # bitwise (nan at the inf batch)
            torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
        assert float(m["disc/loss_scale"]) == d_scaler.get_scale()
        assert float(m["gen/loss_scale"]) == g_scaler.get_scale()
        assert float(amp.scaler(state, "gen").scale) == g_scaler.get_scale()
        skipped.append((bool(m["disc/update_skipped"]), bool(m["gen/update_skipped"])))
    assert skipped[2] == (True, False) and not any(any(s) for i, s in enumerate(skipped) if i != 2)
    assert d_scaler.get_scale() != g_scaler.get_scale()  # the two scalers moved apart
    assert_dicts_equal(state.params, {n: p.detach() for n, p in model.named_parameters()}, "params")
    assert torch.equal(
        state.opt_state["gen"].exp_avg["gen.0.weight"], g_opt.state[model.gen[0].weight]["exp_avg"]
    )
    averaged = ema.params(state)
    for n, p in oracle.module.named_parameters():
        assert torch.equal(averaged["gen." + n], p.detach()), n
    assert averaged["disc.0.weight"] is state.params["disc.0.weight"]  # not averaged


def test_gan_with_accumulation_and_check_finite_runs_each_part_over_the_micro_batches():
    """accumulate(2) on a multi step: each part averages its gradient over the group (vs torch)."""
    step = fe.multi_step(
        {"disc": (disc_loss, optim.sgd(0.1), "disc"), "gen": (gen_loss, optim.sgd(0.1), "gen")},
        fe.accumulate(2),
        fe.check_finite(),
    )
    state = step.init(GAN())
    group = gan_batches(2)
    state, _ = step(state, fe.MicroBatches(group))

    model = GAN()
    d_opt = torch.optim.SGD(model.disc.parameters(), lr=0.1, foreach=True)
    g_opt = torch.optim.SGD(model.gen.parameters(), lr=0.1, foreach=True)
    for opt, loss_fn in ((d_opt, disc_loss), (g_opt, gen_loss)):
        opt.zero_grad(set_to_none=True)
        for batch in group:
            loss, _ = fe.parse_losses(loss_fn(model, batch))
            (loss * 0.5).backward()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(state.params[n], p.detach(), rtol=1e-6, atol=1e-7)


def test_multi_step_state_errors_name_the_part():
    step = fe.multi_step(
        {"disc": (disc_loss, optim.sgd(0.1), "disc"), "gen": (gen_loss, optim.sgd(0.1), "gen")}
    )
    other = fe.multi_step(
        {"disc": (disc_loss, optim.sgd(0.1), "disc"), "gen": (gen_loss, optim.adam(0.1), "gen")}
    )
    with pytest.raises(
        fe.StepMismatchError,
        match=r"state.opt_state\['gen'\] is SgdState, this step makes AdamState",
    ):
        other(step.init(GAN()), gan_batches(1)[0])


def test_check_finite_in_a_later_part_says_which_part_and_that_earlier_parts_updated():
    """The generator's loss is NaN: the discriminator, updated first in this step, had moved in
    place while the message said "Params and optimizer state are as before this step", and fit
    kept that half-updated state as the error's fengine_state. Now the part is named, the earlier
    update said, and no partial state is kept (the donated state refuses use)."""
    nan_gen = lambda m, b: gen_loss(m, b) * float("nan")  # noqa: E731
    step = fe.multi_step({"disc": (disc_loss, optim.sgd(0.1), "disc"),
                          "gen": (nan_gen, optim.sgd(0.1), "gen")}, fe.check_finite())  # fmt: skip
    state = step.init(GAN())
    with pytest.raises(FloatingPointError) as e:
        fe.fit(state, step, gan_batches(2), max_steps=2, handlers=[])
    message = str(e.value)
    assert message.startswith("non-finite loss in part 'gen' at step 1: loss=nan.")
    assert (
        "The params and optimizer state of part 'gen' are as before this step; the parts "
        in message
    )
    assert not hasattr(e.value, "fengine_state")
    with pytest.raises(fe.DonatedStateError, match="failed midway"):
        state.params  # noqa: B018
    # a NaN in the first part: nothing updated yet, the state is whole and kept
    nan_disc = lambda m, b: {k: v * float("nan") for k, v in disc_loss(m, b).items()}  # noqa: E731
    first = fe.multi_step({"disc": (nan_disc, optim.sgd(0.1), "disc"),
                           "gen": (gen_loss, optim.sgd(0.1), "gen")}, fe.check_finite())  # fmt: skip
    with pytest.raises(FloatingPointError, match="in part 'disc' at step 1: .*Params and") as e:
        fe.fit(first.init(GAN()), first, gan_batches(2), max_steps=2, handlers=[])
    assert e.value.fengine_state.step == 0


def test_a_part_without_gradients_on_a_batch_leaves_its_loss_scaler_as_torch_does():
    """The generator's loss reaches none of its params on odd batches (an n_critic schedule written
    in the loss): that counted as a good fp16 step, and its scale grew (1024 -> 2048 -> 4096 with
    growth_interval=2) where torch's GradScaler refuses a step without gradients. Against a hand
    loop whose generator GradScaler steps only on the batches with gradients (bitwise)."""
    kw = dict(init_scale=2.0**10, growth_interval=2)

    def disc(model, batch):
        return disc_loss(model, batch[:2])

    def gen(model, batch):
        return gen_loss(model, batch[:2]) if batch[2] else model.disc(batch[0]).mean() * 0.0

    batches = [(real, z, i % 2 == 0) for i, (real, z) in enumerate(gan_batches(6))]
    amp = fe.amp("float16", **kw)
    step = fe.multi_step(
        {"disc": (disc, optim.adam(1e-3, b1=0.5), "disc"), "gen": (gen, optim.adam(2e-3), "gen")},
        amp,
    )
    state = step.init(GAN())
    model = GAN()
    d_opt = torch.optim.Adam(model.disc.parameters(), lr=1e-3, betas=(0.5, 0.999), foreach=True)
    g_opt = torch.optim.Adam(model.gen.parameters(), lr=2e-3, foreach=True)
    d_scaler = torch.amp.GradScaler("cpu", **kw)
    g_scaler = torch.amp.GradScaler("cpu", **kw)

    def amp_update(opt, scaler, loss_fn, batch):  # MMEngine AmpOptimWrapper.update_params
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss, _ = fe.parse_losses(loss_fn(model, batch))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    scales = []
    for batch in batches:
        state, m = step(state, batch)
        amp_update(d_opt, d_scaler, disc, batch)
        if batch[2]:
            amp_update(g_opt, g_scaler, gen, batch)
        scales.append(float(m["gen/loss_scale"]))
        assert scales[-1] == g_scaler.get_scale()
        assert int(amp.scaler(state, "gen").growth_tracker) == int(g_scaler._growth_tracker)
        assert not bool(m["gen/update_skipped"])
    assert scales == [1024.0, 1024.0, 2048.0, 2048.0, 2048.0, 2048.0]
    assert_dicts_equal(state.params, {n: p.detach() for n, p in model.named_parameters()}, "params")
