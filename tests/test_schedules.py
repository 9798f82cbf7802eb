"""fengine.schedules against independent references.

References: ``torch.optim.lr_scheduler`` and MMEngine 0.10.7's parameter schedulers
(test oracle only), each driven on a real torch optimizer, plus a few closed-form
values computed by hand. The lr recorded for iteration ``t`` is the value in
``param_groups[0]`` before that iteration's ``optimizer.step()``; fengine's
``schedule(t)`` must match it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from helpers import ce_loss, mlp, mlp_batches
from torch.optim import lr_scheduler as tls

import fengine as fe
from fengine import optim, schedules as S


mm = pytest.importorskip("mmengine.optim.scheduler")

BASE = 0.1
REL = 1e-12


# ------------------------------------------------------------------ harness
def _optimizer(
    lr: float = BASE, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.SGD:
    param = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([param], lr=lr, momentum=momentum, weight_decay=weight_decay)


def torch_values(make, n: int, *, lr: float = BASE) -> list[float]:
    """lr used at each of ``n`` iterations by a torch scheduler stepped after every update."""
    opt = _optimizer(lr)
    sched = make(opt)
    values = []
    for _ in range(n):
        values.append(opt.param_groups[0]["lr"])
        opt.step()  # no grads: a no-op update, keeps torch's step-order check quiet
        sched.step()
    return values


def mmengine_values(
    makers, n: int, *, steps_per_epoch: int | None = None, key: str = "lr", **opt_kwargs
) -> list[float]:
    """Simulate MMEngine's ParamSchedulerHook over ``n`` iterations.

    Schedulers are built in list order (each constructor steps once); iteration
    schedulers step after every iteration (``after_train_iter``), by-epoch ones after
    every ``steps_per_epoch`` iterations (``after_train_epoch``). Returns
    ``param_groups[0][key]`` as seen before each iteration.
    """
    opt = _optimizer(**opt_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = [make(opt) for make in makers]
    values = []
    for t in range(n):
        values.append(opt.param_groups[0][key])
        opt.step()
        for s in scheds:
            if not s.by_epoch:
                s.step()
        if steps_per_epoch is not None and (t + 1) % steps_per_epoch == 0:
            for s in scheds:
                if s.by_epoch:
                    s.step()
    return values


def assert_matches(schedule, expected: list[float], rel: float = REL) -> None:
    for t, want in enumerate(expected):
        got = schedule(t)
        assert isinstance(got, float)
        assert math.isclose(got, want, rel_tol=rel, abs_tol=0.0), (
            f"step {t}: got {got!r}, reference {want!r}"
        )


# ------------------------------------------------------------------ vs torch.optim.lr_scheduler
TORCH_CASES = [
    ("StepLR", lambda o: tls.StepLR(o, step_size=30, gamma=0.5), S.step(BASE, 30, 0.5)),
    (
        "MultiStepLR",
        lambda o: tls.MultiStepLR(o, milestones=[0, 50, 120, 120, 200], gamma=0.3),
        S.multistep(BASE, [0, 50, 120, 120, 200], gamma=0.3),
    ),
    ("ExponentialLR", lambda o: tls.ExponentialLR(o, gamma=0.99), S.exponential(BASE, 0.99)),
    (
        "CosineAnnealingLR",
        lambda o: tls.CosineAnnealingLR(o, T_max=100, eta_min=1e-3),
        S.cosine(BASE, T_max=100, eta_min=1e-3),
    ),
    (
        "CosineAnnealingLR eta_min=0",
        lambda o: tls.CosineAnnealingLR(o, T_max=300),
        S.cosine(BASE, end=300),
    ),
    (
        "LinearLR",
        lambda o: tls.LinearLR(o, start_factor=0.25, end_factor=0.9, total_iters=40),
        S.linear(BASE, 0.25, 0.9, end=41),
    ),
    (
        "ConstantLR",
        lambda o: tls.ConstantLR(o, factor=0.5, total_iters=40),
        S.constant(BASE, 0.5, end=41),
    ),
    (
        "PolynomialLR",
        lambda o: tls.PolynomialLR(o, total_iters=200, power=2.0),
        S.poly(BASE, power=2.0, end=201),
    ),
    (
        "OneCycleLR cos",
        lambda o: tls.OneCycleLR(o, max_lr=1.0, total_steps=300, cycle_momentum=False),
        S.onecycle(BASE, 1.0, 300),
    ),
    (
        "OneCycleLR linear",
        lambda o: tls.OneCycleLR(
            o,
            max_lr=0.5,
            total_steps=300,
            pct_start=0.25,
            anneal_strategy="linear",
            cycle_momentum=False,
        ),
        S.onecycle(BASE, 0.5, 300, pct_start=0.25, anneal_strategy="linear"),
    ),
    (
        "OneCycleLR three_phase",
        lambda o: tls.OneCycleLR(
            o,
            max_lr=0.5,
            total_steps=300,
            div_factor=10.0,
            final_div_factor=100.0,
            three_phase=True,
            cycle_momentum=False,
        ),
        S.onecycle(BASE, 0.5, 300, div_factor=10.0, final_div_factor=100.0, three_phase=True),
    ),
    (
        "CosineAnnealingWarmRestarts",
        lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=20, T_mult=2, eta_min=1e-4),
        S.cosine_restart(BASE, [20, 40, 80, 160], [1, 1, 1, 1], eta_min=1e-4),
    ),
]


@pytest.mark.parametrize("name,make,schedule", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch(name, make, schedule):
    assert_matches(schedule, torch_values(make, 300))


# ------------------------------------------------------------------ vs MMEngine: single schedulers
def _mm(cls_name, **kwargs):
    cls = getattr(mm, cls_name)
    return lambda opt: cls(opt, **kwargs)


MM_SINGLE = [
    (
        "MultiStepLR by_epoch [8,11]",
        _mm("MultiStepLR", by_epoch=True, milestones=[8, 11], gamma=0.1),
        S.multistep(BASE, [8, 11], by_epoch=True, steps_per_epoch=7),
        7,
        15 * 7,
    ),
    (
        "MultiStepLR iter [60,80] begin=10",
        _mm("MultiStepLR", by_epoch=False, milestones=[60, 80], begin=10),
        S.multistep(BASE, [60, 80], begin=10),
        None,
        120,
    ),
    (
        "StepLR by_epoch begin/end",
        _mm("StepLR", by_epoch=True, step_size=2, gamma=0.5, begin=1, end=9),
        S.step(BASE, 2, 0.5, begin=1, end=9, by_epoch=True, steps_per_epoch=5),
        5,
        60,
    ),
    (
        "ConstantLR window",
        _mm("ConstantLR", by_epoch=False, factor=0.2, begin=5, end=30),
        S.constant(BASE, 0.2, begin=5, end=30),
        None,
        50,
    ),
    (
        "ConstantLR one-step window",
        _mm("ConstantLR", by_epoch=False, factor=0.2, begin=5, end=6),
        S.constant(BASE, 0.2, begin=5, end=6),
        None,
        20,
    ),
    (
        "LinearLR begin/end",
        _mm("LinearLR", by_epoch=False, start_factor=0.1, end_factor=0.7, begin=10, end=60),
        S.linear(BASE, 0.1, 0.7, begin=10, end=60),
        None,
        100,
    ),
    (
        "CosineAnnealingLR by_epoch T_max=12",
        _mm("CosineAnnealingLR", by_epoch=True, T_max=12),
        S.cosine(BASE, T_max=12, by_epoch=True, steps_per_epoch=10),
        10,
        150,
    ),
    (
        "CosineAnnealingLR eta_min_ratio window",
        _mm("CosineAnnealingLR", by_epoch=False, eta_min_ratio=0.05, begin=20, end=120),
        S.cosine(BASE, eta_min_ratio=0.05, begin=20, end=120),
        None,
        150,
    ),
    (
        "PolyLR",
        _mm("PolyLR", by_epoch=False, eta_min=1e-4, power=0.9, begin=10, end=200),
        S.poly(BASE, eta_min=1e-4, power=0.9, begin=10, end=200),
        None,
        250,
    ),
    (
        "OneCycleLR",
        _mm("OneCycleLR", by_epoch=False, eta_max=0.5, total_steps=200),
        S.onecycle(BASE, 0.5, 200),
        None,
        200,
    ),
    (
        "OneCycleLR end before total_steps holds",  # it annealed on past end
        _mm("OneCycleLR", by_epoch=False, eta_max=0.5, total_steps=15, end=10),
        S.onecycle(BASE, 0.5, total_steps=15, end=10),
        None,
        15,
    ),
    (
        "OneCycleLR by_epoch end before total_steps holds",
        _mm("OneCycleLR", by_epoch=True, eta_max=0.5, total_steps=6, begin=1, end=6),
        S.onecycle(BASE, 0.5, total_steps=6, begin=1, end=6, by_epoch=True, steps_per_epoch=2),
        2,
        16,
    ),
    (
        "OneCycleLR three_phase linear begin",
        _mm(
            "OneCycleLR",
            by_epoch=False,
            eta_max=0.5,
            begin=10,
            end=210,
            pct_start=0.4,
            anneal_strategy="linear",
            three_phase=True,
        ),
        S.onecycle(
            BASE, 0.5, begin=10, end=210, pct_start=0.4, anneal_strategy="linear", three_phase=True
        ),
        None,
        210,
    ),
    (
        "CosineRestartLR eta_min",
        _mm(
            "CosineRestartLR",
            by_epoch=False,
            periods=[30, 60, 90],
            restart_weights=[1, 0.6, 0.3],
            eta_min=1e-4,
            begin=5,
        ),
        S.cosine_restart(BASE, [30, 60, 90], [1, 0.6, 0.3], eta_min=1e-4, begin=5),
        None,
        250,
    ),
    (
        "CosineRestartLR eta_min_ratio",
        _mm(
            "CosineRestartLR",
            by_epoch=False,
            periods=[50, 50],
            restart_weights=[1, 0.5],
            eta_min_ratio=0.1,
        ),
        S.cosine_restart(BASE, [50, 50], [1, 0.5], eta_min_ratio=0.1),
        None,
        120,
    ),
    (
        "ExponentialLR by_epoch",
        _mm("ExponentialLR", by_epoch=True, gamma=0.8, begin=2),
        S.exponential(BASE, 0.8, begin=2, by_epoch=True, steps_per_epoch=4),
        4,
        60,
    ),
]


@pytest.mark.parametrize("name,make,schedule,spe,n", MM_SINGLE, ids=[c[0] for c in MM_SINGLE])
def test_matches_mmengine_single(name, make, schedule, spe, n):
    assert_matches(schedule, mmengine_values([make], n, steps_per_epoch=spe))


def test_momentum_schedule_matches_mmengine_linear_momentum():
    make = _mm("LinearMomentum", start_factor=0.001, by_epoch=False, begin=0, end=1000)
    expected = mmengine_values([make], 1100, key="momentum", momentum=0.9)
    assert_matches(S.linear(0.9, 0.001, end=1000), expected)


def test_weight_decay_schedule_matches_mmengine_param_scheduler():
    make = _mm(
        "LinearParamScheduler", param_name="weight_decay", start_factor=0.5, by_epoch=False, end=40
    )
    expected = mmengine_values([make], 60, key="weight_decay", weight_decay=1e-4)
    assert_matches(S.linear(1e-4, 0.5, end=40), expected)


# ------------------------------------------------------------------ vs MMEngine: joins
def test_join_doc_example_warmup_then_epoch_multistep():
    spe = 20
    expected = mmengine_values(
        [
            _mm("LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50),
            _mm("MultiStepLR", by_epoch=True, milestones=[8, 11], gamma=0.1),
        ],
        14 * spe,
        steps_per_epoch=spe,
    )
    sched = S.join(
        S.linear(BASE, 0.001, begin=0, end=50),
        S.multistep(BASE, [8, 11], gamma=0.1, by_epoch=True, steps_per_epoch=spe),
    )
    assert_matches(sched, expected)


def test_join_doc_example_linear_then_cosine():
    expected = mmengine_values(
        [
            _mm("LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=100),
            _mm("CosineAnnealingLR", T_max=800, by_epoch=False, begin=100, end=900),
        ],
        1000,
    )
    sched = S.join(S.linear(BASE, 0.001, end=100), S.cosine(BASE, T_max=800, begin=100, end=900))
    assert_matches(sched, expected)
    assert sched(899) < 1e-5 * BASE and sched(999) == sched(899)


def test_join_with_gaps_holds_last_value():
    expected = mmengine_values(
        [
            _mm("LinearLR", start_factor=0.1, end_factor=0.5, by_epoch=False, begin=0, end=20),
            _mm("ExponentialLR", gamma=0.95, by_epoch=False, begin=40, end=80),
            _mm("CosineAnnealingLR", by_epoch=False, begin=100, end=150),
            _mm("StepLR", step_size=3, gamma=0.5, by_epoch=True, begin=16, end=20),
        ],
        220,
        steps_per_epoch=10,
    )
    sched = S.join(
        S.linear(BASE, 0.1, 0.5, end=20),
        S.exponential(BASE, 0.95, begin=40, end=80),
        S.cosine(BASE, begin=100, end=150),
        S.step(BASE, 3, 0.5, begin=16, end=20, by_epoch=True, steps_per_epoch=10),
    )
    assert_matches(sched, expected)


def test_join_overlapping_multiplicative_windows_compound():
    expected = mmengine_values(
        [
            _mm("LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=100),
            _mm("ExponentialLR", gamma=0.98, by_epoch=False, begin=50, end=150),
            _mm("MultiStepLR", milestones=[1, 3], gamma=0.5, by_epoch=True),
        ],
        200,
        steps_per_epoch=40,
    )
    sched = S.join(
        S.linear(BASE, 0.01, end=100),
        S.exponential(BASE, 0.98, begin=50, end=150),
        S.multistep(BASE, [1, 3], 0.5, by_epoch=True, steps_per_epoch=40),
    )
    assert_matches(sched, expected)


def test_join_overlapping_annealing_without_floor_compounds():
    expected = mmengine_values(
        [
            _mm("LinearLR", start_factor=0.01, by_epoch=False, end=100),
            _mm("CosineAnnealingLR", by_epoch=False, begin=50, end=250),
            _mm("PolyLR", power=1.5, by_epoch=False, begin=100, end=300),
        ],
        320,
    )
    sched = S.join(
        S.linear(BASE, 0.01, end=100),
        S.cosine(BASE, begin=50, end=250),
        S.poly(BASE, power=1.5, begin=100, end=300),
    )
    assert_matches(sched, expected)


@pytest.mark.parametrize("kind,cls_name", [("linear", "LinearLR"), ("constant", "ConstantLR")])
def test_warmup_is_mmengine_head_with_end_steps_plus_one(kind, cls_name):
    factor_kw = {"start_factor": 0.001} if kind == "linear" else {"factor": 0.001}
    spe = 25
    expected = mmengine_values(
        [
            _mm(cls_name, by_epoch=False, begin=0, end=51, **factor_kw),
            _mm("MultiStepLR", by_epoch=True, milestones=[3, 5]),
        ],
        7 * spe,
        steps_per_epoch=spe,
    )
    sched = S.warmup(
        S.multistep(BASE, [3, 5], by_epoch=True, steps_per_epoch=spe), steps=50, kind=kind
    )
    assert_matches(sched, expected)
    assert sched(49) < BASE and sched(50) == BASE


def test_warmup_matches_torch_total_iters():
    expected = torch_values(lambda o: tls.LinearLR(o, start_factor=0.01, total_iters=30), 60)
    assert_matches(S.warmup(S.constant(BASE, 1.0), steps=30, start_factor=0.01), expected)
    expected = torch_values(lambda o: tls.ConstantLR(o, factor=0.2, total_iters=30), 60)
    assert_matches(
        S.warmup(S.constant(BASE, 1.0), steps=30, start_factor=0.2, kind="constant"), expected
    )


def test_join_documented_deviation_floor_after_held_factor():
    """Known, documented difference: an annealing floor entered at a held factor != 1.

    MMEngine anneals the held value towards the absolute ``eta_min``; fengine's product
    scales the whole cosine, floor included, by the held factor (hand-computed here).
    """
    sched = S.join(S.step(BASE, 10, 0.5, end=20), S.cosine(BASE, eta_min=0.01, begin=20, end=60))
    floor_factor = 0.01 / BASE + (1 - 0.01 / BASE) * (1 + math.cos(math.pi * 39 / 40)) / 2
    assert sched(59) == pytest.approx(BASE * 0.5 * floor_factor, rel=REL)
    expected = mmengine_values(
        [
            _mm("StepLR", step_size=10, gamma=0.5, by_epoch=False, end=20),
            _mm("CosineAnnealingLR", eta_min=0.01, by_epoch=False, begin=20, end=60),
        ],
        60,
    )
    assert expected[59] == pytest.approx(
        0.01 + (BASE * 0.5 - 0.01) * (1 + math.cos(math.pi * 39 / 40)) / 2, rel=1e-9
    )
    assert not math.isclose(sched(59), expected[59], rel_tol=1e-3)
    assert_matches(sched, expected[:21])  # identical up to and including the cosine's first step


# ------------------------------------------------------------------ convert_to_iter_based vs MMEngine
CONVERT_CASES = [
    (
        "CosineAnnealingLR",
        dict(T_max=12, begin=0, end=12),
        S.cosine(BASE, T_max=12, end=12, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "CosineAnnealingLR",
        dict(begin=1, end=9),
        S.cosine(BASE, begin=1, end=9, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "ExponentialLR",
        dict(gamma=0.9, begin=1, end=5),
        S.exponential(BASE, 0.9, begin=1, end=5, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "MultiStepLR",
        dict(milestones=[3, 5]),
        S.multistep(BASE, [3, 5], by_epoch=True, steps_per_epoch=10),
    ),
    (
        "StepLR",
        dict(step_size=2, gamma=0.5, begin=1),
        S.step(BASE, 2, 0.5, begin=1, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "LinearLR",
        dict(start_factor=0.1, begin=0, end=3),
        S.linear(BASE, 0.1, end=3, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "PolyLR",
        dict(power=2.0, begin=2, end=10),
        S.poly(BASE, power=2.0, begin=2, end=10, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "OneCycleLR",
        dict(eta_max=0.5, total_steps=13),
        S.onecycle(BASE, 0.5, 13, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "OneCycleLR",  # end before total_steps: the value at end - 1 is held
        dict(eta_max=0.5, total_steps=13, begin=1, end=8),
        S.onecycle(BASE, 0.5, 13, begin=1, end=8, by_epoch=True, steps_per_epoch=10),
    ),
    (
        "CosineRestartLR",
        dict(periods=[4, 6], restart_weights=[1, 0.5], eta_min=0.0),
        S.cosine_restart(BASE, [4, 6], [1, 0.5], eta_min=0.0, by_epoch=True, steps_per_epoch=10),
    ),
]


@pytest.mark.parametrize(
    "cls_name,kwargs,schedule", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES]
)
def test_convert_to_iter_based_matches_mmengine(cls_name, kwargs, schedule):
    cls = getattr(mm, cls_name)
    make = lambda opt: cls.build_iter_from_epoch(opt, by_epoch=True, epoch_length=10, **kwargs)  # noqa: E731
    expected = mmengine_values([make], 130)
    converted = S.convert_to_iter_based(schedule, 10)
    assert converted.by_epoch is False
    assert_matches(converted, expected)


def test_convert_to_iter_based_is_smooth_and_keeps_exponential_gamma():
    epoch_cos = S.cosine(BASE, T_max=12, by_epoch=True, steps_per_epoch=10)
    iter_cos = S.convert_to_iter_based(epoch_cos)
    assert iter_cos.T_max == 120 and iter_cos.steps_per_epoch is None
    assert epoch_cos(15) == epoch_cos(10) and iter_cos(15) < iter_cos(10)
    assert epoch_cos(60) == pytest.approx(iter_cos(60), rel=REL)  # they agree at epoch boundaries

    exp = S.convert_to_iter_based(S.exponential(BASE, 0.9, by_epoch=True, steps_per_epoch=10))
    assert exp.gamma == 0.9
    assert math.isclose(exp(20), BASE * 0.9**20, rel_tol=REL)  # decays per step, not per epoch


def test_convert_join_converts_epoch_parts_only():
    spe = 20
    expected = mmengine_values(
        [
            _mm("LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50),
            lambda o: mm.MultiStepLR.build_iter_from_epoch(
                o, milestones=[8, 11], by_epoch=True, epoch_length=spe
            ),
        ],
        14 * spe,
    )
    epoch_join = S.join(
        S.linear(BASE, 0.001, end=50),
        S.multistep(BASE, [8, 11], by_epoch=True, steps_per_epoch=spe),
    )
    converted = S.convert_to_iter_based(epoch_join, spe)
    assert converted.parts[0] is epoch_join.parts[0]
    assert converted.parts[1].milestones == (160, 220)
    assert_matches(converted, expected)


def test_convert_scaled_schedule_converts_inside_and_keeps_the_scale():
    """scale_lr then convert_to_iter_based = convert then scale_lr, alone or in a join (the
    scaled part counted as by-epoch, also when it is the join's only one)."""
    spe = 100
    cos = S.cosine(BASE, end=10, by_epoch=True, steps_per_epoch=spe)
    sizes = dict(base_batch_size=256, batch_size=128)
    scaled = optim.scale_lr(cos, **sizes)
    expected = optim.scale_lr(S.convert_to_iter_based(cos), **sizes)
    converted = S.convert_to_iter_based(scaled)
    assert converted == expected and converted.schedule.end == 1000
    assert [converted(t) for t in (0, 1, 50, 999)] == [expected(t) for t in (0, 1, 50, 999)]
    assert converted(1) < converted(0)  # per step, not per epoch
    for head in (
        S.linear(scaled.base, 0.1, end=50),
        S.linear(scaled.base, 0.1, end=5, by_epoch=True, steps_per_epoch=spe),
    ):
        joined = S.convert_to_iter_based(S.join(head, scaled))
        assert joined.parts[1] == expected
        assert not joined.parts[0].by_epoch


def test_convert_scaled_schedule_without_epochs_names_by_epoch():
    scaled = optim.scale_lr(S.cosine(BASE, end=10), base_batch_size=256, batch_size=128)
    with pytest.raises(ValueError, match=r"schedule\.by_epoch must be True"):
        S.convert_to_iter_based(scaled)
    with pytest.raises(ValueError, match="at least one by_epoch=True part"):
        S.convert_to_iter_based(S.join(S.linear(scaled.base, 0.1, end=5), scaled))


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_warmup_bad_start_factor_is_named(kind):
    with pytest.raises(ValueError, match=r"start_factor must be .*<= 1\.0, got 2"):
        S.warmup(S.step(0.1, 5), steps=5, start_factor=2, kind=kind)


# ------------------------------------------------------------------ hand-computed values
def test_hand_computed_points():
    warm = S.linear(2.0, 0.001, end=50)
    assert warm(0) == pytest.approx(0.001 * 2.0, rel=REL)
    assert warm(49) == pytest.approx(2.0, rel=REL)
    assert warm(1000) == pytest.approx(2.0, rel=REL)
    assert warm(25) == pytest.approx(2.0 * (0.001 + 0.999 * 25 / 49), rel=REL)

    ms = S.multistep(1.0, [8, 11], by_epoch=True, steps_per_epoch=100)
    assert [ms(799), ms(800), ms(1099), ms(1100)] == pytest.approx([1.0, 0.1, 0.1, 0.01], rel=REL)

    cos = S.cosine(1.0, T_max=10, eta_min=0.2)
    assert cos(5) == pytest.approx(0.6, rel=REL) and cos(10) == pytest.approx(0.2, rel=REL)

    const = S.constant(3.0, 0.5, begin=2, end=6)  # MMEngine: back to base at end - 1
    assert [const(t) for t in range(8)] == pytest.approx([3.0, 3.0, 1.5, 1.5, 1.5, 3.0, 3.0, 3.0])

    assert S.exponential(1.0, 0.5, begin=1).factor(4) == pytest.approx(0.125)
    assert S.join(S.constant(4.0, 0.5), S.step(4.0, 2, 0.1)).factor(2) == pytest.approx(0.05)


def test_schedules_are_inspectable_frozen_values():
    s = S.multistep(0.1, [11, 8], by_epoch=True, steps_per_epoch=5)
    assert s.milestones == (8, 11) and s.base == 0.1
    assert "milestones=(8, 11)" in repr(s)
    assert s == S.multistep(0.1, (8, 11), by_epoch=True, steps_per_epoch=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gamma = 0.5
    assert S.onecycle(0.1, 1.0, 100).factor(0) == pytest.approx(1.0 / 25 / 0.1)
    assert S.step(0.1, 5)(torch.tensor(7)) == pytest.approx(0.1 * 0.1)  # any int-like step


# ------------------------------------------------------------------ errors
ERROR_CASES = [
    (lambda: S.step(0.1, 0), "step_size"),
    (lambda: S.step(0.1, -3), "step_size"),
    (lambda: S.step(0.1, 5, gamma=0.0), "gamma"),
    (lambda: S.exponential(0.1, -0.5), "gamma"),
    (lambda: S.multistep(0.1, [5, -1]), "milestones"),
    (lambda: S.multistep(0.1, [5], gamma=0), "gamma"),
    (lambda: S.cosine(0.1, T_max=0), "T_max"),
    (lambda: S.cosine(0.1), "end"),
    (lambda: S.cosine(0.1, end=10, eta_min=0.0, eta_min_ratio=0.1), "eta_min"),
    (lambda: S.cosine_restart(0.1, [10, 0], [1, 1]), "periods"),
    (lambda: S.cosine_restart(0.1, [10, 10], [1]), "restart_weights"),
    (lambda: S.poly(0.1), "end"),
    (lambda: S.linear(0.1, 0.1), "end"),
    (lambda: S.linear(0.1, 1.5, end=10), "start_factor"),
    (lambda: S.constant(0.1, 2.0), "factor"),
    (lambda: S.onecycle(0.1, 1.0, 100, anneal_strategy="exp"), "anneal_strategy"),
    (lambda: S.onecycle(0.1, 1.0, 0), "total_steps"),
    (lambda: S.onecycle(0.1, 1.0, 100, end=200), "end"),
    (lambda: S.onecycle(0.1, 1.0), "end"),
    (lambda: S.onecycle(0.1, 1.0, 100, pct_start=1.5), "pct_start"),
    (lambda: S.step(0.1, 5, begin=10, end=10), "end"),
    (lambda: S.step(0.1, 5, begin=10, end=3), "end"),
    (lambda: S.step(0.1, 5, begin=-1), "begin"),
    (lambda: S.step(0.1, 5, by_epoch=True), "steps_per_epoch"),
    (lambda: S.step(0.1, 5, by_epoch=True, steps_per_epoch=0), "steps_per_epoch"),
    (lambda: S.step(float("nan"), 5), "base"),
    (lambda: S.step(0.1, 5)(-1), "step"),
    (lambda: S.join(), "schedules"),
    (lambda: S.join(S.step(0.1, 5), S.step(0.2, 5)), "base"),
    (lambda: S.warmup(S.step(0.1, 5), steps=0), "steps"),
    (lambda: S.warmup(S.step(0.1, 5), steps=5, kind="cosine"), "kind"),
    (lambda: S.convert_to_iter_based(S.step(0.1, 5), 10), "by_epoch"),
    (lambda: S.convert_to_iter_based(S.join(S.step(0.1, 5)), 10), "by_epoch"),
    (
        lambda: S.convert_to_iter_based(S.step(0.1, 5, by_epoch=True, steps_per_epoch=4), 10),
        "steps_per_epoch",
    ),
    (lambda: S.cosine(0.0, end=10, eta_min=0.1).factor(3), "base=0"),
]


@pytest.mark.parametrize(
    "build,arg", ERROR_CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(ERROR_CASES)]
)
def test_bad_input_raises_value_error_naming_the_argument(build, arg):
    with pytest.raises(ValueError, match=arg):
        build()


def test_non_integer_step_is_a_type_error():
    with pytest.raises(TypeError, match="step"):
        S.step(0.1, 5)(1.5)


# ------------------------------------------------------- by_epoch schedules and fit's epochs
def _epoch_run(schedule_of, accumulate=2, batches=10, epochs=4):
    """fit with lr = schedule_of(steps_per_epoch) over 10 batches per epoch, `accumulate(2)`:
    the lr each update used."""
    seen = []
    lr = schedule_of
    step = fe.train_step(ce_loss, optim.sgd(lr), fe.accumulate(accumulate))
    fe.fit(step.init(mlp(), seed=0), step, mlp_batches(batches), max_epochs=epochs,
           handlers=[fe.on("after_train_iter")(lambda s: seen.append(float(s.metrics["lr"])))])  # fmt: skip
    return seen


def test_fit_refuses_an_epoch_schedule_whose_epoch_is_not_the_loops():
    """10 batches per epoch, accumulate(2): 5 updates an epoch. A MultiStep(by_epoch, [2]) built
    with steps_per_epoch=len(loader)=10 (MMEngine's epoch_length) dropped the lr at epoch 4, not
    2, silently; it is refused naming both counts. Found through chain, join, a paramwise group
    and a user's lambda around it."""
    bad = S.multistep(0.1, [2], by_epoch=True, steps_per_epoch=10)
    for lr in (
        bad,
        S.warmup(bad, steps=3),
        lambda t: 2 * bad(t),
        S.join(S.constant(0.1, 0.5, end=1), bad),
    ):
        with pytest.raises(ValueError, match=r"steps_per_epoch=10, but this run's epoch is 5 "
                           r"updates \(10 batches, 2 per update\).*fe\.plan"):  # fmt: skip
            _epoch_run(lr)
    model = mlp()
    groups = optim.paramwise(model, lr=bad, weight_decay=0.1, bias_decay_mult=0.0)
    step = fe.train_step(
        ce_loss, optim.chain(optim.clip_by_global_norm(1.0), groups.build(optim.adamw))
    )
    with pytest.raises(
        ValueError, match=r"steps_per_epoch=10, but this run's epoch is 8 updates \(8 batches\)"
    ):
        fe.fit(step.init(model, seed=0), step, mlp_batches(8), max_epochs=1)
    assert S.epoch_schedules(step) and all(s.steps_per_epoch == 10 for s in S.epoch_schedules(step))


def test_an_epoch_schedule_built_from_the_plan_drops_at_mmengines_epoch():
    """The same schedule with fe.plan's steps_per_epoch: MMEngine's MultiStepLR(by_epoch=True,
    milestones=[2]) steps at each epoch end, so epochs 0-1 train at 0.1 and 2-3 at 0.1 * 0.1
    (hand-computed from MMEngine's rule)."""
    per = fe.plan(mlp_batches(10), micro_batches=2, max_epochs=4).steps_per_epoch
    assert per == 5
    seen = _epoch_run(S.multistep(0.1, [2], by_epoch=True, steps_per_epoch=per))
    assert seen == [0.1] * 10 + [0.1 * 0.1] * 10
