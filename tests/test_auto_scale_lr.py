"""optim.scale_lr against MMEngine 0.10.7's ``Runner.scale_lr`` (``auto_scale_lr``) and by hand.

MMEngine's method is driven on a stand-in runner (the attributes it reads) with a real
``OptimWrapper``; for schedules, MMEngine's schedulers are then built on the scaled
optimizer, as its Runner does, and stepped like its ParamSchedulerHook.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import types
import warnings

import pytest
import torch

from fengine import optim, schedules as S
from fengine.optim.scaling import ScaledLR, ScaledSchedule


mmengine_runner = pytest.importorskip("mmengine.runner")
mm_optim = pytest.importorskip("mmengine.optim")
mm_sched = pytest.importorskip("mmengine.optim.scheduler")


def mmengine_scaled(lrs, *, base_batch_size, batch_size, world_size, loader="dict", accumulate=1):
    """The param-group lrs after MMEngine's Runner.scale_lr, and its log line."""
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])
    wrapper = mm_optim.OptimWrapper(opt, accumulative_counts=accumulate)
    if loader == "dict":
        train_loader = {"batch_size": batch_size}
    else:
        train_loader = torch.utils.data.DataLoader(range(100), batch_size=batch_size)
    logged: list[str] = []
    runner = types.SimpleNamespace(
        _train_dataloader=train_loader,
        world_size=world_size,
        logger=types.SimpleNamespace(info=logged.append),
        param_schedulers=None,
    )
    mmengine_runner.Runner.scale_lr(
        runner, wrapper, dict(enable=True, base_batch_size=base_batch_size)
    )
    return [g["lr"] for g in opt.param_groups], logged, opt


CASES = [  # lr, base_batch_size, batch_size, world_size
    (0.02, 16, 2, 8),  # x1
    (0.1, 256, 32, 16),  # x2
    (3e-4, 512, 64, 1),  # x0.125
    (0.0125, 1024, 48, 5),  # x0.234375
    (0.02, 256, 24, 3),  # x0.28125
    (0.1, 96, 7, 3),  # x0.21875
    (1e-3, 3, 5, 1),  # x1.666..., not exact in binary
]


@pytest.mark.parametrize("lr, base, bs, ws", CASES)
@pytest.mark.parametrize("loader", ["dict", "DataLoader"])
def test_number_equals_mmengine_runner_scale_lr(lr, base, bs, ws, loader):
    (want,), logged, _ = mmengine_scaled(
        [lr], base_batch_size=base, batch_size=bs, world_size=ws, loader=loader
    )
    got = optim.scale_lr(lr, base_batch_size=base, batch_size=bs, world_size=ws)
    assert got == want  # the same float, bit for bit
    assert f"Scaling the original LR by {got.factor}." in logged[0]
    assert f"current batch size is {ws * bs}." in logged[0]


def test_every_param_group_scaled_like_mmengine():
    lrs = [0.1, 0.01, 0.0]  # e.g. paramwise groups
    want, _, _ = mmengine_scaled(lrs, base_batch_size=64, batch_size=24, world_size=4)
    assert [
        optim.scale_lr(lr, base_batch_size=64, batch_size=24, world_size=4) for lr in lrs
    ] == want


@pytest.mark.parametrize("lr, base, bs, ws", CASES)
def test_paramwise_groups_of_a_scaled_number_equal_mmengine_bitwise(lr, base, bs, ws):
    """MMEngine's constructor builds each group's ``lr * lr_mult``, then ``scale_lr`` multiplies
    it by the ratio: ``(lr * mult) * ratio``, which was computed ``(lr * ratio) * mult`` (1 ulp
    apart in 45 of 216 such cases)."""
    from fengine.optim.paramwise import paramwise

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    scaled = optim.scale_lr(lr, base_batch_size=base, batch_size=bs, world_size=ws)
    for mult in (0.1, 0.3, 2.0, 10.0):
        g = paramwise(model, lr=scaled, custom_keys={"0.": dict(lr_mult=mult)})
        got = {s.name: s.lr for s in g}
        (want, want_one), _, _ = mmengine_scaled(
            [lr * mult, lr], base_batch_size=base, batch_size=bs, world_size=ws
        )
        assert got["0.weight"] == want and got["1.weight"] == want_one, mult


def test_accumulation_is_not_counted_as_in_mmengine():
    """MMEngine's real batch is world_size x loader batch size, whatever accumulative_counts."""
    (want,), _, _ = mmengine_scaled(
        [0.1], base_batch_size=256, batch_size=32, world_size=2, accumulate=4
    )
    assert want == 0.1 * 64 / 256
    assert optim.scale_lr(0.1, base_batch_size=256, batch_size=32, world_size=2) == want


def test_hand_computed():
    assert optim.scale_lr(0.1, base_batch_size=256, batch_size=32, world_size=16) == 0.2
    assert optim.scale_lr(0.02, base_batch_size=16, batch_size=2, world_size=4) == 0.01
    assert optim.scale_lr(0.08, base_batch_size=64, batch_size=16) == 0.02
    assert optim.scale_lr(0.3, base_batch_size=4, batch_size=8, world_size=8) == 0.3 * 16
    assert math.isclose(optim.scale_lr(1e-3, base_batch_size=3, batch_size=5), 5e-3 / 3)


def test_scaled_number_prints_its_factor_and_is_a_plain_float_elsewhere():
    lr = optim.scale_lr(0.1, base_batch_size=256, batch_size=128, world_size=4)
    assert isinstance(lr, float) and isinstance(lr, ScaledLR)
    assert repr(lr) == "scaled(0.1 -> 0.2, x2.0 = batch 4x128 / base 256)"
    assert (str(lr), f"{lr}", f"{lr:.1e}", json.dumps({"lr": lr})) == (
        "0.2",
        "0.2",
        "2.0e-01",
        '{"lr": 0.2}',
    )
    assert type(lr * 1) is float
    for copied in (copy.deepcopy(lr), pickle.loads(pickle.dumps(lr))):
        assert copied == lr and repr(copied) == repr(lr)
    assert (lr.lr, lr.factor, lr.batch_size, lr.world_size, lr.base_batch_size) == (
        0.1,
        2.0,
        128,
        4,
        256,
    )


# ---------------------------------------------------------------- schedules
def mmengine_values(opt, makers, n):
    """lr before each of ``n`` iterations, schedulers built on the scaled optimizer (as the Runner)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = [make(opt) for make in makers]
    values = []
    for _ in range(n):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        for s in scheds:
            s.step()
    return values


SCHEDULES = {
    "linear warm-up, then cosine to an absolute eta_min (kept)": (
        S.join(
            S.linear(0.1, 0.001, end=6), S.cosine(0.1, T_max=100, eta_min=1e-3, begin=6, end=106)
        ),
        [
            lambda o: mm_sched.LinearLR(o, start_factor=0.001, by_epoch=False, begin=0, end=6),
            lambda o: mm_sched.CosineAnnealingLR(
                o, T_max=100, eta_min=1e-3, by_epoch=False, begin=6, end=106
            ),
        ],
    ),
    "cosine eta_min_ratio (floor scales)": (
        S.cosine(0.1, T_max=50, eta_min_ratio=0.01),
        [lambda o: mm_sched.CosineAnnealingLR(o, T_max=50, eta_min_ratio=0.01, by_epoch=False)],
    ),
    "multistep": (
        S.multistep(0.1, milestones=[10, 30], gamma=0.2),
        [lambda o: mm_sched.MultiStepLR(o, milestones=[10, 30], gamma=0.2, by_epoch=False)],
    ),
    "poly eta_min": (
        S.poly(0.1, eta_min=1e-4, power=2.0, end=40),
        [lambda o: mm_sched.PolyLR(o, eta_min=1e-4, power=2.0, by_epoch=False, end=40)],
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_equals_mmengine_schedulers_built_after_scale_lr(name):
    schedule, makers = SCHEDULES[name]
    kw = dict(base_batch_size=256, batch_size=24, world_size=3)  # x0.28125
    _, _, opt = mmengine_scaled([schedule.base], **kw)
    expected = mmengine_values(opt, makers, 120)
    scaled = optim.scale_lr(schedule, **kw)
    assert isinstance(scaled, ScaledSchedule)
    assert scaled.base == optim.scale_lr(schedule.base, **kw)
    for t, want in enumerate(expected):
        assert math.isclose(scaled(t), want, rel_tol=1e-12, abs_tol=0.0), (t, scaled(t), want)


def test_schedule_by_hand_and_repr():
    cos = S.cosine(0.1, T_max=10, eta_min=1e-3)
    scaled = optim.scale_lr(cos, base_batch_size=32, batch_size=64)
    assert scaled.base == 0.2
    assert scaled(0) == 0.2
    assert math.isclose(scaled(5), 1e-3 + (0.2 - 1e-3) / 2, rel_tol=1e-15)
    assert math.isclose(scaled(10), 1e-3, rel_tol=1e-12)  # the absolute floor is not scaled
    assert scaled.factor(5) == scaled(5) / 0.2
    assert repr(scaled) == f"scaled({cos!r}, x2.0 = batch 1x64 / base 32)"
    # scaling twice multiplies; equal inputs give equal (and hashable) schedules
    twice = optim.scale_lr(scaled, base_batch_size=32, batch_size=96)
    assert twice.base == 0.2 * 3.0 and math.isclose(twice(10), 1e-3, rel_tol=1e-12)
    assert scaled == optim.scale_lr(cos, base_batch_size=32, batch_size=64)
    assert hash(scaled) == hash(optim.scale_lr(cos, base_batch_size=32, batch_size=64))


def test_scaled_lr_drives_an_optimizer_bitwise_like_the_number():
    """Through sgd, as a number and as a schedule: the same updates as the plain values."""
    torch.manual_seed(0)
    init = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    grads = [{k: torch.randn_like(v) for k, v in init.items()} for _ in range(4)]

    def run(lr):
        tx = optim.sgd(lr, momentum=0.9)
        params = {k: v.clone() for k, v in init.items()}
        state = tx.init(params)
        for t, g in enumerate(grads):
            params, state = optim.step_params(tx, g, state, params, step=t)
        return params

    kw = dict(base_batch_size=256, batch_size=32, world_size=2)
    for got, want in [
        (run(optim.scale_lr(0.1, **kw)), run(0.025)),
        (run(optim.scale_lr(S.step(0.1, 2, 0.5), **kw)), run(S.step(0.025, 2, 0.5))),
    ]:
        for k in init:
            assert torch.equal(got[k], want[k])


def test_refusals():
    with pytest.raises(ValueError, match="onecycle's values are absolute"):
        optim.scale_lr(
            S.onecycle(0.1, eta_max=0.1, total_steps=10), base_batch_size=8, batch_size=16
        )
    with pytest.raises(ValueError, match="onecycle"):
        optim.scale_lr(
            S.join(S.constant(0.1, 0.5, end=3), S.onecycle(0.1, eta_max=0.1, total_steps=10)),
            base_batch_size=8,
            batch_size=16,
        )
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="base_batch_size must be an int >= 1"):
            optim.scale_lr(0.1, base_batch_size=bad, batch_size=8)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        optim.scale_lr(0.1, base_batch_size=8, batch_size=8, world_size=0)
    for bad in (lambda t: 0.1, "0.1", float("nan"), True):
        with pytest.raises(TypeError, match="lr must be a finite number or a fengine schedule"):
            optim.scale_lr(bad, base_batch_size=8, batch_size=8)
