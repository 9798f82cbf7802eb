"""The loop's pieces: `plan` (the arithmetic), `train_steps` (iterable directly), `on` (function
handlers with filters), handler names for persisted state, `Preempted` instead of SystemExit."""

from __future__ import annotations

import os
import signal

import pytest
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import checkpoint, optim
from fengine.handlers import Checkpointer


def _step(k=1):
    return fe.train_step(
        ce_loss, optim.sgd(0.05, momentum=0.9), *([fe.accumulate(k)] if k > 1 else [])
    )


# ----------------------------------------------------------------- plan
@pytest.mark.parametrize(
    "batches,k,kw,expected",
    [
        (7, 1, dict(max_epochs=2), (7, 7, 14, 2)),
        (7, 3, dict(max_epochs=2), (7, 3, 6, 2)),  # groups of 3, 3, 1
        (7, 3, dict(max_steps=10), (7, 3, 10, None)),
        (8, 4, dict(max_epochs=1), (8, 2, 2, 1)),
    ],
)
def test_plan_counts_updates_per_epoch_and_in_total(batches, k, kw, expected):
    p = fe.plan(mlp_batches(batches), micro_batches=k, **kw)
    assert (p.batches_per_epoch, p.steps_per_epoch, p.total_steps, p.max_epochs) == expected
    assert p == fe.plan(batches, micro_batches=k, **kw)  # a number of batches works too
    assert p.by_epoch == ("max_epochs" in kw)


def test_plan_refuses_bad_counts():
    with pytest.raises(ValueError, match="exactly one of max_epochs"):
        fe.plan(5)
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1, got 0"):
        fe.plan(5, micro_batches=0, max_epochs=1)
    with pytest.raises(ValueError, match="train_data is empty"):
        fe.plan(0, max_epochs=1)


def test_fit_and_the_recipe_arithmetic_agree():
    state, step = _step(3).init(mlp()), _step(3)
    seen = []
    fe.fit(
        state,
        step,
        mlp_batches(7),
        max_epochs=2,
        handlers=[fe.on("before_run")(lambda s: seen.append(s.run))],
    )
    p = fe.plan(mlp_batches(7), micro_batches=3, max_epochs=2)
    run = seen[0]
    assert (run.steps_per_epoch, run.batches_per_epoch, run.max_steps) == (
        p.steps_per_epoch,
        p.batches_per_epoch,
        p.total_steps,
    )


# ----------------------------------------------------------------- train_steps
def test_train_steps_can_be_iterated_directly_and_matches_fit():
    step = _step()
    p = fe.plan(mlp_batches(3), max_epochs=2)
    ticks = list(fe.train_steps(step.init(mlp()), step, mlp_batches(3), p))
    assert [t.event for t in ticks] == [
        "before_train_epoch",
        *["before_train_iter", "after_train_iter"] * 3,
        "after_train_epoch",
    ] * 2
    assert [t.batch_idx for t in ticks if t.event == "after_train_iter"] == [0, 1, 2] * 2
    last = ticks[-1].state
    assert (last.step, last.epoch, last.batch_in_epoch) == (6, 2, 0)
    ref = fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=2, handlers=[])
    assert_dicts_equal(last.params, ref.params, "train_steps vs fit")
    assert all("loss" in t.metrics for t in ticks if t.event == "after_train_iter")


def test_a_custom_loop_stops_train_steps_between_updates():
    step = _step()
    p = fe.plan(mlp_batches(3), max_steps=100)
    state = None
    for tick in fe.train_steps(step.init(mlp()), step, mlp_batches(3), p):
        state = tick.state
        if tick.event == "after_train_iter" and tick.state.step == 4:
            break
    assert state is not None and (state.step, state.epoch, state.batch_in_epoch) == (4, 1, 1)


# ----------------------------------------------------------------- on(...)
def test_on_calls_a_function_every_n_updates_and_once():
    calls = {"every": [], "once": [], "epoch": [], "val": []}
    handlers = [
        fe.on("after_train_iter", every=2)(lambda s: calls["every"].append(s.step)),
        fe.on("before_train_iter", once=3)(lambda s: calls["once"].append(s.step)),
        fe.on("after_train_epoch", every=2)(lambda s: calls["epoch"].append(s.epoch)),
        fe.on("after_val_epoch")(lambda s: calls["val"].append(dict(s.metrics))),
    ]
    step = _step()
    fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=4, handlers=handlers,
           val=fe.Val(mlp_batches(1), [], interval=2))  # fmt: skip
    assert calls["every"] == [2, 4, 6, 8, 10, 12]
    assert calls["once"] == [2]  # before the 3rd update: 2 done
    assert calls["epoch"] == [2, 4]
    assert len(calls["val"]) == 2


def test_on_function_may_stop_training_and_validates_its_arguments():
    step = _step()

    @fe.on("after_train_iter", once=5)
    def stop(snap):
        return fe.Stop("enough")

    final = fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=9, handlers=[stop])
    assert final.step == 5
    with pytest.raises(ValueError, match="unknown event 'after_iter'"):
        fe.on("after_iter")
    with pytest.raises(ValueError, match="every must be an int >= 1, got 0"):
        fe.on("after_train_iter", every=0)


# ----------------------------------------------------------------- handler names
def test_two_checkpointers_persist_their_state_under_their_names(tmp_path):
    step = _step()
    kw = dict(max_keep_ckpts=1, save_best="acc", rule="greater")
    a, b = Checkpointer(1, **kw), Checkpointer(1, out_dir=tmp_path / "mirror", name="mirror", **kw)
    values = iter([0.2, 0.7, 0.5])
    val = fe.Val(mlp_batches(1), [_Scripted(values)])
    fe.fit(
        step.init(mlp()),
        step,
        mlp_batches(2),
        max_epochs=3,
        handlers=[a, b],
        val=val,
        work_dir=tmp_path,
    )
    meta = checkpoint.read_meta(tmp_path / "epoch_3.safetensors")["meta"]["handlers"]
    assert sorted(meta) == ["checkpointer", "mirror"]
    assert (
        meta["checkpointer"]["best"]["acc"]["score"]
        == meta["mirror"]["best"]["acc"]["score"]
        == 0.7
    )

    again = Checkpointer(1, **kw), Checkpointer(1, out_dir=tmp_path / "mirror", name="mirror", **kw)
    fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=3, handlers=list(again), work_dir=tmp_path,
           resume=True)  # fmt: skip
    assert again[0].best == a.best and again[1].best == b.best


def test_handler_state_needs_a_name_and_names_must_differ():
    class Counter(fe.Handler):
        def state_dict(self):
            return {"n": 1}

    step = _step()
    with pytest.raises(ValueError, match="Counter keeps state across resumes .* has no name"):
        fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, handlers=[Counter()])
    with pytest.raises(ValueError, match=r"named \['checkpointer'\]; pass name="):
        fe.fit(
            step.init(mlp()),
            step,
            mlp_batches(2),
            max_epochs=1,
            handlers=[Checkpointer(), Checkpointer()],
        )
    fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, handlers=[Counter(name="counter")])


class _Scripted:
    prefix = None

    def __init__(self, values):
        self.values = values

    def init(self):
        return 0

    def update(self, acc, batch, outputs):
        return acc

    def compute(self, acc, size=None):
        return {"acc": next(self.values)}


# ----------------------------------------------------------------- preemption
def test_sigterm_saves_then_raises_preempted_not_system_exit(tmp_path):
    step = _step()

    @fe.on("after_train_iter", once=2)
    def preempt(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(fe.Preempted) as info:
        fe.fit(
            step.init(mlp()),
            step,
            mlp_batches(3),
            max_epochs=5,
            handlers=[preempt],
            work_dir=tmp_path,
        )
    e = info.value
    assert e.exit_code == 128 + signal.SIGTERM and e.checkpoint == tmp_path / "step_2.safetensors"
    assert checkpoint.latest(tmp_path) == e.checkpoint and e.state.step == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was restored
    resumed = fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=5, handlers=[], work_dir=tmp_path,
                     resume=True)  # fmt: skip
    straight = fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=5, handlers=[])
    assert_dicts_equal(resumed.params, straight.params, "resumed after preemption")
