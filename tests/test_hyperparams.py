"""`optim.hyperparams`: MMEngine's ``get_lr()`` / ``get_momentum()`` as a pure read of the state.

Oracles: MMEngine 0.10.7's ``OptimWrapper.get_momentum`` on real torch optimizers driven by
its momentum schedulers (``param_groups`` read before each iteration = the value that
iteration's update uses), and its ``RuntimeInfoHook`` (fake runner) for which keys the
logs carry.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import optim, schedules as S


mmo = pytest.importorskip("mmengine.optim")
N = 12


def mmengine_hparams(torch_opt, makers, n=N):
    """``get_lr()['lr'][0]`` and ``get_momentum()['momentum'][0]`` before each of ``n`` iterations."""
    wrapper = mmo.OptimWrapper(torch_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = [make(wrapper) for make in makers]
    out = []
    for _ in range(n):
        out.append((wrapper.get_lr()["lr"][0], wrapper.get_momentum()["momentum"][0]))
        torch_opt.step()
        for s in scheds:
            s.step()
    return out


def fengine_hparams(tx, n=N):
    step = fe.train_step(ce_loss, tx)
    state = step.init(mlp())
    before = optim.hyperparams(state.opt_state)
    out = []
    for batch in mlp_batches(n):
        state, metrics = step(state, batch)
        hp = optim.hyperparams(state.opt_state)
        assert metrics["lr"] == hp["lr"]  # the step metrics report the same lr
        assert "momentum" not in metrics  # ... and not the momentum (MMEngine's logs neither)
        out.append((hp["lr"], hp["momentum"]))
    return before, out


def _params():
    return mlp().parameters()


CASES = [
    (
        "sgd LinearMomentum",
        optim.sgd(0.1, momentum=S.linear(0.9, 0.5, 1.0, end=8)),
        lambda: torch.optim.SGD(_params(), lr=0.1, momentum=0.9),
        [lambda o: mmo.LinearMomentum(o, start_factor=0.5, end=8, by_epoch=False)],
    ),
    (
        "sgd constant momentum, cosine lr",
        optim.sgd(S.cosine(0.1, eta_min=0.01, end=10), momentum=0.8),
        lambda: torch.optim.SGD(_params(), lr=0.1, momentum=0.8),
        [lambda o: mmo.CosineAnnealingLR(o, T_max=10, eta_min=0.01, end=10, by_epoch=False)],
    ),
    (
        "sgd no momentum",
        optim.sgd(0.1),
        lambda: torch.optim.SGD(_params(), lr=0.1),
        [],
    ),
    (
        "adam CosineAnnealingMomentum (beta1)",
        optim.adam(1e-3, b1=S.cosine(0.95, eta_min=0.85, end=10)),
        lambda: torch.optim.Adam(_params(), lr=1e-3, betas=(0.95, 0.999)),
        [lambda o: mmo.CosineAnnealingMomentum(o, T_max=10, eta_min=0.85, end=10, by_epoch=False)],
    ),
    (
        "adamw constant beta1",
        optim.adamw(1e-3, b1=0.8),
        lambda: torch.optim.AdamW(_params(), lr=1e-3, betas=(0.8, 0.999)),
        [],
    ),
    (
        "rmsprop StepMomentum",
        optim.rmsprop(1e-2, momentum=S.step(0.9, step_size=4, gamma=0.5)),
        lambda: torch.optim.RMSprop(_params(), lr=1e-2, momentum=0.9),
        [lambda o: mmo.StepMomentum(o, step_size=4, gamma=0.5, by_epoch=False)],
    ),
    (
        "adagrad (no momentum: 0)",
        optim.adagrad(1e-2),
        lambda: torch.optim.Adagrad(_params(), lr=1e-2),
        [],
    ),
]


@pytest.mark.parametrize("tx,make_opt,makers", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hyperparams_match_mmengine_get_lr_get_momentum(tx, make_opt, makers):
    want = mmengine_hparams(make_opt(), makers)
    before, got = fengine_hparams(tx)
    assert before == {"lr": want[0][0], "momentum": want[0][1]}  # step-0 values before training
    for t, ((lr, m), (mm_lr, mm_m)) in enumerate(zip(got, want)):
        assert lr == pytest.approx(mm_lr, rel=1e-12), t
        assert m == pytest.approx(mm_m, rel=1e-12), t


def test_hyperparams_of_groups_and_parts():
    """Partition groups as ``<label>/momentum``, multi-step parts as ``<part>/momentum``."""
    tx = optim.partition(
        {"body": optim.sgd(0.1, momentum=0.9), "head": optim.adam(1e-3, b1=0.7)},
        lambda name, _: "head" if name.startswith("2.") else "body",
    )
    state = fe.train_step(ce_loss, tx).init(mlp())
    assert optim.hyperparams(state.opt_state) == {
        "body/lr": 0.1,
        "body/momentum": 0.9,
        "head/lr": 1e-3,
        "head/momentum": 0.7,
    }
    step = fe.multi_step(
        {
            "a": (ce_loss, optim.sgd(0.1, momentum=0.5), "0"),
            "b": (ce_loss, optim.adamw(1e-3, b1=S.linear(0.9, 0.5, 1.0, end=3)), "2"),
        }
    )
    state = step.init(mlp())
    state, metrics = step(state, mlp_batches(1)[0])
    assert optim.hyperparams(state.opt_state) == {
        "a/lr": 0.1,
        "a/momentum": 0.5,
        "b/lr": 1e-3,
        "b/momentum": 0.45,
    }
    assert "a/lr" in metrics and "a/momentum" not in metrics


def test_mmengine_logs_lr_but_not_momentum():
    """MMEngine 0.10.7's RuntimeInfoHook puts only ``train/lr`` (and ``train/base_lr`` with several
    param groups) in the message hub: momentum is not in its logs, so not in fengine's metrics."""
    from mmengine.hooks import RuntimeInfoHook
    from mmengine.logging import MessageHub

    keys = []
    for split in (False, True):
        params = list(mlp().parameters())
        groups = [dict(params=params[:2]), dict(params=params[2:], lr=0.2)] if split else params
        opt = mmo.OptimWrapper(torch.optim.SGD(groups, lr=0.1, momentum=0.9))
        hub = MessageHub.get_instance(f"fengine-hparams-{split}")
        runner = SimpleNamespace(optim_wrapper=opt, message_hub=hub, iter=0)
        RuntimeInfoHook().before_train_iter(runner, 0)
        keys.append(sorted(hub.log_scalars))
    assert keys == [["train/lr"], ["train/base_lr", "train/lr"]]
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9))
    _, metrics = step(step.init(mlp()), mlp_batches(1)[0])
    assert sorted(metrics) == ["loss", "lr"]
    groups = optim.paramwise(mlp(), lr=0.1, custom_keys={"2.": dict(lr_mult=2.0)})  # 4 groups
    step = fe.train_step(ce_loss, groups.build(optim.sgd, momentum=0.9))
    _, metrics = step(step.init(mlp()), mlp_batches(1)[0])
    assert [k for k in metrics if k.endswith("lr")][0] == "base_lr" and metrics["base_lr"] == 0.1
    assert not any("momentum" in k for k in metrics)
