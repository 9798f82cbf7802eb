"""`fe.reduce_on_plateau` / `fe.plateau.observe` against MMEngine 0.10.7's ReduceOnPlateau schedulers.

The oracle is MMEngine's ``ReduceOnPlateauLR`` / ``ReduceOnPlateauMomentum`` on real torch
optimizers (and on ``DefaultOptimWrapperConstructor`` param groups), stepped as its
``ParamSchedulerHook`` steps them: ``step()`` after each train epoch, ``step(metrics)``
after each validation. Both sides are fed the same metric sequences; values are compared
exactly (both compute ``max(float(v) * factor, min_value)``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import Scripted, ce_loss, mlp, mlp_batches
from resume_experiment import SaveAtEnd
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import checkpoint, optim, schedules as S
from fengine.handlers import Checkpointer, Logger
from fengine.metrics import MeanLoss
from fengine.plateau import Plateau, observe, value_in


mmo = pytest.importorskip("mmengine.optim")


# ---------------------------------------------------------------- harness
def mm_values(make_opt, make_scheds, seq, key="lr", wrap=True):
    """Per validation: every param group's ``key`` after MMEngine's hook stepped the schedulers."""
    opt = make_opt()
    target = mmo.OptimWrapper(opt) if wrap else opt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = make_scheds(target)
    out = []
    for metrics in seq:
        for s in scheds:  # after_train_epoch
            s.step()
        for s in scheds:  # after_val_epoch
            s.step(metrics)
        out.append([g[key] for g in opt.param_groups])
    return out


def fe_values(rop, hypers, seq, *, start_epoch=0):
    """Per validation: the values of ``hypers`` in the state after `observe` (what the next epoch uses)."""
    state = fe.train_step(ce_loss, optim.sgd(0.1), rop).init(mlp())
    state = state.replace(epoch=start_epoch)
    out = []
    for metrics in seq:
        state = state.replace(epoch=state.epoch + 1)  # the epoch just trained
        state = observe(state, metrics)
        out.append([value_in(state, h) for h in hypers])
    return state, out


def sgd_opt(lr=0.1, momentum=0.9):
    return lambda: torch.optim.SGD(mlp().parameters(), lr=lr, momentum=momentum)


def sequence(seed, n=60, rule="less"):
    """A noisy metric with improvements, plateaus, exact repeats and small relative changes."""
    rng = random.Random(seed)
    value, out = 1.0, []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            value *= 1 - rng.choice([0.5, 0.01, 1e-5, 2e-4])  # better, barely better, ...
        elif r < 0.5:
            value *= 1 + rng.random() * 0.1  # worse
        out.append(value if rule == "less" else -value + 5.0)
    return [{"loss": v, "acc": v} for v in out]


# ---------------------------------------------------------------- single group, every option
CASES = [
    ("defaults", dict(patience=10), {}),
    ("patience 2 factor 0.5", dict(patience=2, factor=0.5), {}),
    ("patience 0", dict(patience=0, factor=0.7), {}),
    ("abs threshold", dict(patience=1, threshold=0.01, threshold_rule="abs", factor=0.5), {}),
    ("cooldown", dict(patience=1, cooldown=3, factor=0.5), {}),
    ("min_value", dict(patience=0, factor=0.5, min_value=0.004), {}),
    ("eps skips tiny reductions", dict(patience=0, factor=0.9, eps=3e-3), {}),
    ("begin end", dict(patience=1, factor=0.5, begin=5, end=30), {}),
    (
        "greater rel",
        dict(rule="greater", patience=1, factor=0.5, monitor="acc"),
        {"rule": "greater"},
    ),
    (
        "greater abs cooldown",
        dict(
            rule="greater",
            patience=2,
            threshold=0.02,
            threshold_rule="abs",
            cooldown=1,
            factor=0.3,
            monitor="acc",
        ),
        {"rule": "greater"},
    ),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kwargs,seq_kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_lr_matches_mmengine_reduce_on_plateau_lr(kwargs, seq_kw, seed):
    seq = sequence(seed, **seq_kw)
    want = mm_values(sgd_opt(), lambda o: [mmo.ReduceOnPlateauLR(o, **kwargs)], seq)
    rop = fe.reduce_on_plateau(**kwargs)
    state, got = fe_values(rop, [rop(0.1)], seq)
    assert got == [w[:1] for w in want]  # [:1]: the real group (the wrapper adds none here)
    assert rop.state(state).observed == sum(
        kwargs.get("begin", 0) <= e < kwargs.get("end", math.inf) for e in range(1, len(seq) + 1)
    )


def test_sequences_exercise_reductions():
    """The cases above are not vacuous: the lr moves, cooldown and eps change the outcome."""
    seq = sequence(0)
    plain = fe_values(r := fe.reduce_on_plateau(patience=1, factor=0.5), [r(0.1)], seq)[1]
    cool = fe_values(r := fe.reduce_on_plateau(patience=1, factor=0.5, cooldown=3), [r(0.1)], seq)[
        1
    ]
    assert len({v[0] for v in plain}) > 3 and plain != cool
    floor = fe_values(
        r := fe.reduce_on_plateau(patience=0, factor=0.5, min_value=0.004), [r(0.1)], seq
    )[1]
    assert floor[-1] == [0.004]
    eps = fe_values(r := fe.reduce_on_plateau(patience=0, factor=0.9, eps=3e-3), [r(0.1)], seq)[1]
    assert 0.02 < eps[-1][0] < 0.04  # stuck where a reduction would change it by < eps


def test_momentum_matches_reduce_on_plateau_momentum_sgd_and_adam_beta1():
    seq = sequence(3)
    kw = dict(patience=1, factor=0.8, min_value=0.5)
    rop = fe.reduce_on_plateau(**kw)
    _, got = fe_values(rop, [rop(0.9)], seq)
    sgd = mm_values(sgd_opt(), lambda o: [mmo.ReduceOnPlateauMomentum(o, **kw)], seq, "momentum")
    assert got == [w[:1] for w in sgd]
    adam = mm_values(
        lambda: torch.optim.Adam(mlp().parameters(), lr=1e-3, betas=(0.9, 0.999)),
        lambda o: [mmo.ReduceOnPlateauMomentum(o, **kw)],
        seq,
        "betas",
    )
    assert got == [[w[0][0]] for w in adam]
    assert got[-1] == [0.5]


def test_groups_are_reduced_each_from_its_own_lr_to_one_floor(monkeypatch):
    """paramwise groups (lr_mult 10, bias_lr_mult 2): MMEngine reduces each param group; a scalar
    min_value floors every group at the same absolute value."""
    from mmengine.optim.optimizer import default_constructor as dc

    monkeypatch.setattr(dc, "print_log", lambda *a, **k: None)
    cfg = dict(custom_keys={"2.": dict(lr_mult=10.0)}, bias_lr_mult=2.0)
    model = mlp()
    seq = sequence(4)
    kw = dict(patience=0, factor=0.5, min_value=0.01)
    optim_cfg = dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9))

    def build():
        return dc.DefaultOptimWrapperConstructor(optim_cfg, cfg)(model)

    names = {id(p): n for n, p in model.named_parameters()}
    wrapper = build()
    order = [names[id(g["params"][0])] for g in wrapper.optimizer.param_groups]
    want = mm_values(
        lambda: wrapper.optimizer,
        lambda _: [mmo.ReduceOnPlateauLR(wrapper, **kw)],
        seq,
        wrap=False,
    )
    rop = fe.reduce_on_plateau(**kw)
    groups = optim.paramwise(model, lr=0.05, **cfg)
    plan = {g.label: g for g in groups.groups(lr=rop(0.05))}
    labels = groups.labels()
    _, got = fe_values(rop, [plan[labels[n]].lr for n in order], seq)
    assert got == want
    assert sorted({v for v in want[2]}) != sorted({v for v in want[-1]})  # groups move
    assert set(want[-1]) == {0.01}  # every group ends on the one floor


def test_reductions_on_a_cosine_match_mmengine_chained_step_by_step():
    """Iteration CosineAnnealingLR (eta_min 0) chained with ReduceOnPlateauLR: MMEngine checks
    eps once, when it reduces, against the lr then, and the cosine keeps multiplying the
    reduced lr. Of five reductions a 1e-6 group takes two and a 1e-2 group four: each skips
    those made when its lr was too small to change by more than eps. Every step, both groups."""
    T, at = 100, {5: 1.0, 10: 2.0, 40: 3.0, 70: 4.0, 90: 5.0, 96: 6.0}  # step -> val loss
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([dict(params=params[:1], lr=1e-6), dict(params=params[1:], lr=1e-2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cos = mmo.CosineAnnealingLR(opt, T_max=T, by_epoch=False, begin=0, end=T)
        mm_rop = mmo.ReduceOnPlateauLR(opt, monitor="loss", factor=0.1, patience=0)
    rop = fe.reduce_on_plateau("loss", factor=0.1, patience=0)
    hypers = [rop(S.cosine(lr, T_max=T, end=T)) for lr in (1e-6, 1e-2)]
    state = fe.train_step(ce_loss, optim.sgd(hypers[0]), rop).init(mlp())
    want, got = [], []
    for t in range(T):
        if t in at:  # a validation after update t: ParamSchedulerHook's two calls, then observe
            mm_rop.step()
            mm_rop.step({"loss": at[t]})
            state = observe(state.replace(step=t, epoch=state.epoch + 1), {"loss": at[t]})
        want.append([g["lr"] for g in opt.param_groups])
        got.append([value_in(state, h, step=t) for h in hypers])
        opt.step()
        cos.step()
    assert rop.state(state).reduced_at == (10, 40, 70, 90, 96)
    assert got == [pytest.approx(w, rel=1e-9, abs=0) for w in want]
    cos97 = (1 + math.cos(math.pi * 0.97)) / 2
    assert want[97] == pytest.approx([1e-6 * cos97 * 1e-2, 1e-2 * cos97 * 1e-4], rel=1e-9)


def test_a_checkpoint_with_only_the_number_of_reductions_loads(tmp_path):
    """A checkpoint written before the steps of the reductions were recorded holds their number:
    it loads as reductions at unknown steps, eps checked at each step (as that run did)."""
    rop = fe.reduce_on_plateau(patience=0, factor=0.5)
    step = fe.train_step(ce_loss, optim.sgd(rop(0.1)), rop)
    counters = dict(best=0.5, num_bad=0, cooldown_left=0, reductions=2, observed=3)
    checkpoint.save(
        tmp_path / "old.safetensors", step.init(mlp()).replace(extra={"plateau": counters})
    )
    loaded = checkpoint.load(tmp_path / "old.safetensors", step.init(mlp()))
    assert loaded.extra["plateau"].reduced_at == (None, None)
    assert (loaded.extra["plateau"].observed, value_in(loaded, rop(0.1))) == (3, 0.025)
    checkpoint.save(tmp_path / "again.safetensors", loaded)
    again = checkpoint.load(tmp_path / "again.safetensors", step.init(mlp()))
    assert again.extra["plateau"] == loaded.extra["plateau"]
    assert (
        checkpoint.read_meta(tmp_path / "again.safetensors")["scalars"]["extra/plateau/reductions"]
        == "[null, null]"
    )


# ---------------------------------------------------------------- around fe.evaluate
def test_training_around_evaluate_matches_mmengine_runner_bitwise():
    """Train with lr and momentum reduced on the validation loss: fe.evaluate -> observe each epoch.

    The reference is torch SGD (foreach) with MMEngine's ReduceOnPlateauLR and
    ReduceOnPlateauMomentum stepped as its hook does, fed the same validation results:
    params are bitwise equal, so every update used the same lr and momentum.
    """
    epochs, per_epoch = 8, 6
    train = mlp_batches(per_epoch, seed=1)
    val = mlp_batches(3, batch=16, seed=9)
    val_loss = MeanLoss(loss=lambda batch, out: F.cross_entropy(out, batch[1], reduction="none"))
    lr_rule = dict(monitor="loss", patience=0, factor=0.5, threshold=0.0)
    mom_rule = dict(monitor="loss", patience=1, factor=0.9, threshold=0.0, min_value=0.7)
    rop_lr = fe.reduce_on_plateau(**lr_rule, name="plateau_lr")
    rop_m = fe.reduce_on_plateau(**mom_rule, name="plateau_momentum")
    step = fe.train_step(ce_loss, optim.sgd(rop_lr(0.3), momentum=rop_m(0.95)), rop_lr, rop_m)
    state = step.init(mlp(), seed=0)

    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.95, foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = [
            mmo.ReduceOnPlateauLR(opt, **lr_rule),
            mmo.ReduceOnPlateauMomentum(opt, **mom_rule),
        ]
    lrs, results = [], []
    for _ in range(epochs):
        for batch in train:
            state, metrics = step(state, batch)
            opt.zero_grad()
            ce_loss(ref, batch).backward()
            opt.step()
            assert metrics["lr"] == opt.param_groups[0]["lr"]
        state = state.replace(epoch=state.epoch + 1)  # what fe.train_steps does
        result = fe.evaluate(state, fe.default_predict, val, [val_loss])
        state = fe.plateau.observe(state, result)
        for s in scheds:
            s.step()
            s.step(result)
        lrs.append(opt.param_groups[0]["lr"])
        results.append(result["loss"])
        assert optim.hyperparams(state.opt_state) != {} and value_in(state, rop_lr(0.3)) == lrs[-1]
        assert value_in(state, rop_m(0.95)) == opt.param_groups[0]["momentum"]
    for n, p in ref.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n
    assert len(set(lrs)) >= 3, (lrs, results)  # the loss plateaued and the lr was reduced
    assert rop_m.state(state).reductions >= 1


# ---------------------------------------------------------------- resume
def test_resume_is_exact_and_the_rule_comes_from_the_step(tmp_path):
    seq = sequence(5)
    kw = dict(patience=1, factor=0.5, cooldown=1)
    rop = fe.reduce_on_plateau(**kw)
    step = fe.train_step(ce_loss, optim.sgd(rop(0.1)), rop)
    batches = mlp_batches(4)

    def run(state, metrics_seq):
        for metrics in metrics_seq:
            for b in batches:
                state, _ = step(state, b)
            state = observe(state.replace(epoch=state.epoch + 1), metrics)
        return state

    straight = run(step.init(mlp()), seq[:12])
    half = run(step.init(mlp()), seq[:5])
    assert math.isinf(step.init(mlp()).extra["plateau"].best)  # inf best survives a checkpoint
    checkpoint.save(tmp_path / "c.safetensors", half)
    meta = checkpoint.read_meta(tmp_path / "c.safetensors")
    assert {"extra/plateau/best", "extra/plateau/reductions"} <= set(meta["scalars"])
    resumed = run(checkpoint.load(tmp_path / "c.safetensors", step.init(mlp())), seq[5:12])
    assert rop.state(resumed) == rop.state(straight) and rop.state(straight).reductions >= 2
    for n in straight.params:
        assert torch.equal(straight.params[n], resumed.params[n]), n
    # the counters come from the file, the rule from the template's step
    other = fe.reduce_on_plateau(patience=7, factor=0.25)
    template = fe.train_step(ce_loss, optim.sgd(other(0.1)), other).init(mlp())
    loaded = checkpoint.load(tmp_path / "c.safetensors", template)
    assert loaded.extra["plateau"].config.patience == 7
    assert loaded.extra["plateau"].reductions == half.extra["plateau"].reductions


# ---------------------------------------------------------------- rules of use
def test_values_outside_a_step_and_misuse():
    rop = fe.reduce_on_plateau(patience=0, factor=0.5)
    lr = rop(0.1)
    assert lr(0) == 0.1 and lr(99) == 0.1  # outside a step: before any reduction
    sched = rop(S.linear(0.1, 0.5, 1.0, end=5))
    assert sched(0) == 0.05
    state = fe.train_step(ce_loss, optim.sgd(lr), rop).init(mlp())
    state = observe(state.replace(epoch=1), {"loss": 1.0})
    state = observe(state.replace(epoch=2), {"loss": 1.0})
    assert rop.state(state).reductions == 1
    assert value_in(state, lr) == 0.05 and value_in(state, sched, step=0) == 0.025
    assert value_in(state, sched, step=10) == 0.05
    other = fe.reduce_on_plateau(name="other")
    # lr's wrapper is not in this step: refused when the step is built (it raised at the first
    # update); with no plateau wrapper at all, the lr was never reduced, silently
    with pytest.raises(
        ValueError, match=r"plateau 'plateau' .* no such wrapper \(it has \['other'\]\)"
    ):
        fe.train_step(ce_loss, optim.sgd(lr), other)
    with pytest.raises(ValueError, match=r"no such wrapper \(it has none\)"):
        fe.train_step(ce_loss, optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr)))
    with pytest.raises(KeyError, match="monitor 'loss' is not in the validation results"):
        observe(state, {"accuracy": 1.0})
    assert observe(state.replace(epoch=3), {"loss": 0.5}).extra["plateau"].best == 0.5
    plain = fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp())
    assert observe(plain, {"accuracy": 1.0}) is plain  # no plateau: unchanged


@pytest.mark.parametrize("amp_first", [True, False])
def test_a_skipped_fp16_update_reports_the_reduced_lr_whatever_the_order(amp_first):
    """A skipped update reports the scheduled lr; with ``amp`` written before the plateau's
    wrapper that report ran outside the plateau (it said the unreduced 0.1)."""

    def loss_fn(model, batch):
        x, y, blow = batch
        return ce_loss(model, (x, y)) * blow

    rop = fe.reduce_on_plateau(monitor="loss", factor=0.5, patience=0)
    wrappers = (fe.amp("float16"), rop) if amp_first else (rop, fe.amp("float16"))
    step = fe.train_step(loss_fn, optim.sgd(rop(0.1), momentum=0.9), *wrappers)
    state = observe(observe(step.init(mlp()), {"loss": 1.0}), {"loss": 2.0})  # one reduction
    data = [(x, y, torch.tensor(float("inf") if t == 2 else 1.0))
            for t, (x, y) in enumerate(mlp_batches(4))]  # fmt: skip
    for t, batch in enumerate(data):
        state, m = step(state, batch)
        assert bool(m["update_skipped"]) == (t == 2)
        assert float(m["lr"]) == optim.hyperparams(state.opt_state)["lr"] == 0.05, t


def test_momentum_via_hyperparams_after_a_step():
    rop = fe.reduce_on_plateau(patience=0, factor=0.5)
    step = fe.train_step(ce_loss, optim.adam(rop(1e-2), b1=rop(0.9, min_value=0.6)), rop)
    state = step.init(mlp())
    for e, loss in enumerate([1.0, 1.0, 1.0]):
        state = observe(state.replace(epoch=e + 1), {"loss": loss})
    state, metrics = step(state, mlp_batches(1)[0])
    assert metrics["lr"] == 1e-2 * 0.5 * 0.5
    assert optim.hyperparams(state.opt_state)["momentum"] == 0.6  # 0.9 -> 0.45 floored at 0.6


def test_validation_and_repr():
    with pytest.raises(ValueError, match=r"factor must be in \[0, 1\)"):
        fe.reduce_on_plateau(factor=1.0)
    with pytest.raises(ValueError, match="rule must be"):
        fe.reduce_on_plateau(rule="min")
    with pytest.raises(ValueError, match="threshold_rule must be"):
        fe.reduce_on_plateau(threshold_rule="relative")
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        fe.reduce_on_plateau(threshold=-1.0)
    with pytest.raises(ValueError, match="end must be > begin"):
        fe.reduce_on_plateau(begin=3, end=3)
    with pytest.raises(ValueError, match="patience must be an int >= 0"):
        fe.reduce_on_plateau(patience=-1)
    with pytest.raises(ValueError, match="same name"):
        fe.train_step(ce_loss, optim.sgd(0.1), fe.reduce_on_plateau(), fe.reduce_on_plateau())
    assert repr(fe.reduce_on_plateau("accuracy", rule="greater", patience=3)) == (
        "reduce_on_plateau(monitor='accuracy', rule='greater', patience=3, name='plateau')"
    )
    assert isinstance(fe.reduce_on_plateau().init(None, ()), Plateau)  # type: ignore[arg-type]


def test_plateau_in_a_multi_step_and_with_paramwise_build():
    """The value reaches each paramwise group (from its own lr) and each part of a multi step."""
    rop = fe.reduce_on_plateau(patience=0, factor=0.5)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    groups = optim.paramwise(model, lr=0.1, custom_keys={"2.": dict(lr_mult=10.0)})
    tx = groups.build(optim.sgd, lr=rop(0.1))
    step = fe.train_step(ce_loss, tx, rop)
    state = observe(step.init(model).replace(epoch=1), {"loss": 1.0})
    state = observe(state.replace(epoch=2), {"loss": 1.0})
    state, metrics = step(state, mlp_batches(1)[0])
    hp = optim.hyperparams(state.opt_state)
    assert sorted(v for k, v in hp.items() if k.endswith("/lr")) == [0.05, 0.5]
    assert hp["base_lr"] == 0.05  # MMEngine reduces the OptimWrapper's base_param_settings too
    multi = fe.multi_step(
        {"a": (ce_loss, optim.sgd(rop(0.2)), "0"), "b": (ce_loss, optim.sgd(0.1), "2")}, rop
    )
    state = observe(multi.init(mlp()).replace(epoch=1), {"loss": 1.0})
    state = observe(state.replace(epoch=2), {"loss": 1.0})
    state, metrics = multi(state, mlp_batches(1)[0])
    assert (metrics["a/lr"], metrics["b/lr"]) == (0.1, 0.1)


# ---------------------------------------------------------------- inside fe.fit
def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("by_epoch", [True, False], ids=["epochs", "iterations"])
def test_fit_observes_every_validation_and_logs_the_reduced_lr(tmp_path, by_epoch):
    """fit calls observe after each validation (no user code): the lr and momentum of each
    update, as logged, are MMEngine's ReduceOnPlateauLR / ReduceOnPlateauMomentum values after the
    validations before it, stepped as its ParamSchedulerHook steps them and fed the same results
    (epoch-based: validation from epoch 2 on, the lr rule from epoch 4 on; iteration-based:
    every 3 updates)."""
    per_epoch, total, values = 4, 48 if by_epoch else 30, [m["loss"] for m in sequence(7, n=12)]
    lr_rule = dict(patience=0, factor=0.5, cooldown=1, begin=4 if by_epoch else 0)
    mom_rule = dict(patience=1, factor=0.8, min_value=0.6)
    rop_lr = fe.reduce_on_plateau(**lr_rule, name="plateau_lr")
    rop_m = fe.reduce_on_plateau(**mom_rule, name="plateau_m")
    step = fe.train_step(ce_loss, optim.sgd(rop_lr(0.1), momentum=rop_m(0.9)), rop_lr, rop_m)
    metric = Scripted(values, key="loss")
    val = fe.Val(mlp_batches(1, seed=5), [metric], interval=1 if by_epoch else 3, begin=2)
    horizon = dict(max_epochs=total // per_epoch) if by_epoch else dict(max_steps=total)
    state = fe.fit(step.init(mlp()), step, mlp_batches(per_epoch), val=val, work_dir=tmp_path,
                   handlers=[Logger(1, timer=False, log_file=False)], **horizon)  # fmt: skip
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = [
            mmo.ReduceOnPlateauLR(opt, **lr_rule),
            mmo.ReduceOnPlateauMomentum(opt, **mom_rule),
        ]
    want_lr, want_m, calls = [], [], 0
    for s in range(total):  # update s + 1 uses the values the validations before it left
        want_lr.append(opt.param_groups[0]["lr"])
        want_m.append(opt.param_groups[0]["momentum"])
        if by_epoch and (s + 1) % per_epoch:
            continue
        if by_epoch:
            for sc in scheds:
                sc.step()  # after_train_epoch
        done = (s + 1) // per_epoch if by_epoch else s + 1
        if done >= 2 and (done % (1 if by_epoch else 3) == 0 or s + 1 == total):
            for sc in scheds:
                sc.step({"loss": values[calls]})  # after_val_epoch
            calls += 1
    assert metric.calls == calls == (11 if by_epoch else 10)
    train = [r for r in _records(tmp_path / "scalars.jsonl") if "lr" in r]
    assert [r["step"] for r in train] == list(range(1, total + 1))
    assert [r["lr"] for r in train] == want_lr
    assert len(set(want_lr)) >= 3 and len(set(want_m)) >= 2  # both were reduced, more than once
    assert optim.hyperparams(state.opt_state)["momentum"] == want_m[-1]
    # the final state has observed the last validation (what a resumed run continues from)
    assert rop_lr.state(state).observed == (
        calls - 2 if by_epoch else calls
    )  # epochs 2, 3: before begin
    assert value_in(state, rop_lr(0.1)) == opt.param_groups[0]["lr"]
    assert value_in(state, rop_m(0.9)) == opt.param_groups[0]["momentum"]


class _StopAt(fe.Handler):
    """Save a checkpoint after update ``k`` and stop the run there (a mid-epoch interruption)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def on_after_train_iter(self, snap):
        if snap.step == self.k:
            return [fe.Save(snap.run.work_dir / f"at_{self.k}.safetensors"), fe.Stop("test")]
        return None


def _resume_experiment():
    """Real validation loss; an abs threshold no loss beats after the first, so the lr halves
    after every second validation (patience 1) whatever the losses are; momentum too."""
    rop_lr = fe.reduce_on_plateau(patience=1, factor=0.5, threshold=10.0, threshold_rule="abs")
    rop_m = fe.reduce_on_plateau(patience=2, factor=0.9, threshold=10.0, threshold_rule="abs",
                                 name="plateau_m")  # fmt: skip
    step = fe.train_step(ce_loss, optim.sgd(rop_lr(0.1), momentum=rop_m(0.9)), rop_lr, rop_m)
    val_loss = MeanLoss(loss=lambda batch, out: F.cross_entropy(out, batch[1], reduction="none"))
    val = fe.Val(mlp_batches(2, seed=9), [val_loss])
    return step.init(mlp(), seed=0), step, mlp_batches(4), val


@pytest.mark.parametrize(
    "where",
    ["epoch checkpoint", "end of a shorter run", "mid-epoch"],
)
def test_resume_through_fit_is_bitwise_the_straight_run(tmp_path, where):
    """Checkpoints hold the Plateau: a run resumed through fe.fit equals the uninterrupted one,
    params, optimizer state and every Plateau counter (the epoch checkpoint is written before
    that epoch's validation, which the resumed run does first; the others after it)."""
    state, step, data, val = _resume_experiment()
    straight = fe.fit(state, step, data, max_epochs=7, val=val, handlers=[])
    assert straight.extra["plateau"].reductions == 3 and straight.extra["plateau_m"].reductions == 2
    state, step, data, val = _resume_experiment()
    if where == "epoch checkpoint":
        handlers, stop = [Checkpointer()], dict(max_epochs=3)
    elif where == "end of a shorter run":
        handlers, stop = [SaveAtEnd()], dict(max_epochs=3)
    else:
        handlers, stop = [_StopAt(14)], dict(max_epochs=7)  # epoch 4, batch 2
    first = fe.fit(state, step, data, val=val, work_dir=tmp_path, handlers=handlers, **stop)
    assert 1 <= first.extra["plateau"].reductions < 3
    state, step, data, val = _resume_experiment()
    resumed = fe.fit(state, step, data, max_epochs=7, val=val, work_dir=tmp_path, resume=True,
                     handlers=[])  # fmt: skip
    la, lb = pytree.tree_flatten_with_path(resumed)[0], pytree.tree_flatten_with_path(straight)[0]
    assert [pytree.keystr(p) for p, _ in la] == [pytree.keystr(p) for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        assert same, f"{pytree.keystr(path)} differs"
    assert resumed.extra["plateau"] == straight.extra["plateau"]


def test_fit_without_val_says_the_plateau_never_reduces(caplog):
    state, step, data, _ = _resume_experiment()
    with caplog.at_level(logging.WARNING, logger="fengine"):
        out = fe.fit(state, step, data, max_epochs=1, handlers=[])
    assert "reduce_on_plateau never reduces" in caplog.text
    assert out.extra["plateau"].observed == 0


def test_readme_example_runs(monkeypatch, tmp_path):
    """README's reduce-on-plateau block runs as written (3 epochs here): fit observed each validation."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = next(
        c
        for c in re.findall(r"```python\n(.+?)\n```", readme, flags=re.S)
        if "reduce_on_plateau" in c
    )
    assert "max_epochs=8" in code
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("max_epochs=8", "max_epochs=3"), "README.md", "exec"), {})
    plateau, lr = printed[-1]
    assert isinstance(plateau, Plateau) and plateau.observed == 3
    assert lr == 0.5 * 0.5**plateau.reductions
