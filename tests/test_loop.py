"""`fit` and `evaluate`: event order, priorities, Stop, validation schedule, loop position,
accumulation, bad input, several optimizers (GAN), evaluation params.

MMEngine is the oracle where it has the behaviour: a real tiny ``Runner`` for the event
order, its real ``EpochBasedTrainLoop``/``IterBasedTrainLoop`` (driven by a fake runner)
for the validation schedule, ``Runner.register_hook`` for the priority order.
"""

from __future__ import annotations

import itertools
import types

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import (
    GAN,
    assert_dicts_equal,
    ce_loss,
    disc_loss,
    gan_batches,
    gen_loss,
    mlp,
    mlp_batches,
    mmengine_hook_calls,
)
from torch.func import functional_call
from torch.nn import functional as F

import fengine as fe
from fengine import optim
from fengine.data import Loader
from fengine.handlers.early_stopping import EarlyStopping, MissingMetricError
from fengine.multi import multi_step


# ----------------------------------------------------------------- helpers
class Const:
    """A metric returning a constant (optionally recording what it was given)."""

    prefix = None

    def __init__(self, key="acc", value=0.5, record=False):
        self.key, self.value, self.record = key, value, record
        self.seen = []

    def init(self):
        return 0

    def update(self, acc, batch, outputs):
        if self.record:
            self.seen.append((batch, outputs))
        return acc + 1

    def compute(self, acc, size=None):
        return {self.key: self.value}


class Recorder(fe.Handler):
    """Records every event with the loop position the snapshot shows."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log = []
        for event in fe.events.EVENTS:
            setattr(self, "on_" + event, self._rec)

    def _rec(self, snap):
        self.log.append((snap.event, snap.step, snap.epoch, snap.batch_idx))

    @property
    def events(self):
        return [e[0] for e in self.log]


def _setup(n=3, dropout=0.0, tx=None, seed=0):
    tx = tx or optim.sgd(0.05, momentum=0.9)
    step = fe.train_step(ce_loss, tx)
    return step.init(mlp(dropout=dropout), seed=seed), step, mlp_batches(n)


class FakeLoader(list):
    """What MMEngine's loops need of a dataloader: iteration, len and a ``dataset``."""

    dataset = None


def _mm_fake_runner(val_log, counter):
    runner = types.SimpleNamespace(
        optim_wrapper=None, logger=types.SimpleNamespace(info=lambda m: None)
    )
    runner.call_hook = lambda name, **kw: None
    runner.model = types.SimpleNamespace(train=lambda: None, train_step=lambda *a, **k: {})
    runner.val_loop = types.SimpleNamespace(run=lambda: val_log.append(counter()))
    return runner


# ----------------------------------------------------------------- event order
TRAIN_ITER = ["before_train_iter", "after_train_iter"]
VAL = [
    "before_val",
    "before_val_epoch",
    "before_val_iter",
    "after_val_iter",
    "before_val_iter",
    "after_val_iter",
    "after_val_epoch",
    "after_val",
]
EXPECTED_2x3_WITH_VAL = [
    "before_run",
    "before_train",
    "before_train_epoch",
    *TRAIN_ITER * 3,
    "after_train_epoch",
    *VAL,
    "before_train_epoch",
    *TRAIN_ITER * 3,
    "after_train_epoch",
    *VAL,
    "after_train",
    "after_run",
]


def test_event_sequence_of_a_two_epoch_run_with_validation():
    state, step, batches = _setup(3)
    rec = Recorder()
    fe.fit(
        state,
        step,
        batches,
        max_epochs=2,
        val=fe.Val(mlp_batches(2, seed=7), [Const()]),
        handlers=[rec],
    )
    assert rec.events == EXPECTED_2x3_WITH_VAL

    # written out in full, with the loop position every snapshot shows: (event, step, epoch, batch_idx).
    # step = updates done (after_train_iter already shows the update it follows), epoch = epochs completed
    # (after_train_epoch shows the completed epoch: MMEngine's runner.epoch + 1 there).
    def val(s, e):
        return [
            ("before_val", s, e, None),
            ("before_val_epoch", s, e, None),
            ("before_val_iter", s, e, 0),
            ("after_val_iter", s, e, 0),
            ("before_val_iter", s, e, 1),
            ("after_val_iter", s, e, 1),
            ("after_val_epoch", s, e, None),
            ("after_val", s, e, None),
        ]

    assert rec.log == [
        ("before_run", 0, 0, None),
        ("before_train", 0, 0, None),
        ("before_train_epoch", 0, 0, None),
        ("before_train_iter", 0, 0, 0),
        ("after_train_iter", 1, 0, 0),
        ("before_train_iter", 1, 0, 1),
        ("after_train_iter", 2, 0, 1),
        ("before_train_iter", 2, 0, 2),
        ("after_train_iter", 3, 0, 2),
        ("after_train_epoch", 3, 1, None),
        *val(3, 1),
        ("before_train_epoch", 3, 1, None),
        ("before_train_iter", 3, 1, 0),
        ("after_train_iter", 4, 1, 0),
        ("before_train_iter", 4, 1, 1),
        ("after_train_iter", 5, 1, 1),
        ("before_train_iter", 5, 1, 2),
        ("after_train_iter", 6, 1, 2),
        ("after_train_epoch", 6, 2, None),
        *val(6, 2),
        ("after_train", 6, 2, None),
        ("after_run", 6, 2, None),
    ]


def test_event_sequence_matches_a_real_mmengine_runner(tmp_path):
    calls = mmengine_hook_calls(
        tmp_path,
        dict(by_epoch=True, max_epochs=2, val_interval=1),
        lambda s, runner, k: (s, k.get("batch_idx")),
    )

    state, step, batches = _setup(3)
    rec = Recorder()
    fe.fit(
        state,
        step,
        batches,
        max_epochs=2,
        val=fe.Val(mlp_batches(2, seed=7), [Const()]),
        handlers=[rec],
    )
    assert [c[0] for c in calls] == rec.events == EXPECTED_2x3_WITH_VAL
    assert [c[1] for c in calls] == [e[3] for e in rec.log]  # batch_idx at every iter event


def test_iteration_based_event_sequence_matches_a_real_mmengine_runner(tmp_path):
    """IterBasedTrainLoop: one before/after_train_epoch around the run, batch_idx the global iteration."""
    calls = mmengine_hook_calls(
        tmp_path,
        dict(by_epoch=False, max_iters=7, val_interval=3),
        lambda s, runner, k: (s, k.get("batch_idx")),
    )

    state, step, batches = _setup(3)
    rec = Recorder()
    fe.fit(
        state,
        step,
        batches,
        max_steps=7,
        val=fe.Val(mlp_batches(2, seed=7), [Const()], interval=3),
        handlers=[rec],
    )
    assert [c[0] for c in calls] == rec.events
    assert rec.events.count("before_train_epoch") == rec.events.count("after_train_epoch") == 1
    assert rec.events.count("after_val") == 3  # at 3, 6 and the last, 7
    assert [c[1] for c in calls] == [e[3] for e in rec.log]  # batch_idx at every iter event


def test_best_checkpoint_events_inside_after_val_epoch_as_mmengines_checkpoint_hook(tmp_path):
    """CheckpointHook(save_best) saves in after_val_epoch: its save events come before after_val
    (fengine wrote them after after_val before)."""
    hook = dict(type="CheckpointHook", interval=1, save_best="m/acc")
    calls = mmengine_hook_calls(
        tmp_path / "mm",
        dict(by_epoch=True, max_epochs=2, val_interval=1),
        lambda s, runner, k: s,
        default_hooks=dict(checkpoint=hook),
    )
    state, step, batches = _setup(3)
    rec = Recorder()
    fe.fit(state, step, batches, max_epochs=2, val=fe.Val(mlp_batches(2, seed=7), [Const("m/acc", 1.0)]),
           handlers=[rec, fe.handlers.Checkpointer(1, save_best="m/acc")], work_dir=tmp_path / "fe")  # fmt: skip
    got = [e for e in rec.events if e != "after_save_checkpoint"]  # not a hook point in 0.10.7
    assert got == calls
    first_val = got.index("after_val_epoch")
    assert got[first_val + 1] == "before_save_checkpoint"
    assert got.index("after_val") > first_val + 1


def test_a_non_finite_loss_is_raised_before_its_weights_are_saved(tmp_path):
    """The default check reads losses every 50 updates; a save reads them first, so a rotation
    (max_keep_ckpts) never replaces the last good checkpoints with non-finite ones."""
    state, step, batches = _setup(9)
    x, y = batches[4]
    batches[4] = (x * float("nan"), y)  # update 5
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
        fe.fit(state, step, batches, max_steps=9, work_dir=tmp_path,
               handlers=[fe.handlers.Checkpointer(1, by_epoch=False, max_keep_ckpts=1)])  # fmt: skip
    kept = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert kept == ["iter_4.safetensors"]  # the last finite one, not rotated out
    saved = fe.checkpoint.load(tmp_path / "iter_4.safetensors", like=step.init(mlp()))
    assert all(torch.isfinite(p).all() for p in saved.params.values())


# ----------------------------------------------------------------- priorities
def test_priority_then_registration_order_like_mmengine_register_hook():
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    order = []

    def make(tag, priority):
        h = fe.Handler(priority=priority) if priority is not None else fe.Handler()
        h.on_before_run = lambda snap, _t=tag: order.append(_t)
        return h

    spec = [
        ("a", "LOW"),
        ("b", None),
        ("c", 30),
        ("d", "highest"),
        ("e", None),
        ("f", fe.Priority.LOWEST),
        ("g", 70),
        ("h", "VERY_HIGH"),
        ("i", 0),
        ("j", "normal"),
    ]
    handlers = [make(t, p) for t, p in spec]
    state, step, batches = _setup(1)
    fe.fit(state, step, batches, max_steps=1, handlers=handlers)

    fake = types.SimpleNamespace(_hooks=[])
    for tag, p in spec:
        hook = Hook()
        hook.tag = tag
        Runner.register_hook(fake, hook, priority=p)  # None -> the class attribute 'NORMAL'
    assert (
        order == [h.tag for h in fake._hooks] == ["d", "i", "h", "c", "b", "e", "j", "a", "g", "f"]
    )


def test_bad_priorities_and_unknown_event_methods_are_rejected():
    with pytest.raises(ValueError, match="unknown priority 'SUPER'"):
        fe.Handler(priority="SUPER")
    with pytest.raises(ValueError, match="0..100"):
        fe.Handler(priority=101)

    class Typo(fe.Handler):
        def on_after_trian_iter(self, snap):
            pass

    state, step, batches = _setup(1)
    with pytest.raises(
        ValueError, match=r"Typo defines \['on_after_trian_iter'\], which are not events"
    ):
        fe.fit(state, step, batches, max_steps=1, handlers=[Typo()])


# ----------------------------------------------------------------- Stop
class StopAt(fe.Handler):
    def __init__(self, event, step=None, epoch=None):
        super().__init__()
        self.step, self.epoch = step, epoch
        setattr(self, "on_" + event, self._maybe)

    def _maybe(self, snap):
        if (self.step is None or snap.step == self.step) and (
            self.epoch is None or snap.epoch == self.epoch
        ):
            return fe.Stop(f"stop at {snap.event} step {snap.step}")


def test_stop_after_train_iter_ends_mid_epoch_with_the_position_recorded():
    state, step, batches = _setup(3)
    rec = Recorder()
    final = fe.fit(
        state, step, batches, max_epochs=5, handlers=[StopAt("after_train_iter", step=4), rec]
    )
    assert (final.step, final.epoch, final.batch_in_epoch) == (4, 1, 1)
    assert rec.events[-4:] == ["before_train_iter", "after_train_iter", "after_train", "after_run"]
    assert rec.events.count("after_train_epoch") == 1  # the cut epoch does not end


def test_stop_on_the_last_iter_of_an_epoch_completes_the_epoch_and_validates():
    state, step, batches = _setup(3)
    rec = Recorder()
    final = fe.fit(
        state,
        step,
        batches,
        max_epochs=5,
        val=fe.Val(batches[:1], [Const()]),
        handlers=[StopAt("after_train_iter", step=3), rec],
    )
    assert (final.step, final.epoch, final.batch_in_epoch) == (3, 1, 0)
    i = rec.events.index("after_train_epoch")
    assert rec.events[i:] == [
        "after_train_epoch",
        "before_val",
        "before_val_epoch",
        "before_val_iter",
        "after_val_iter",
        "after_val_epoch",
        "after_val",
        "after_train",
        "after_run",
    ]


def test_stop_after_train_epoch_still_validates_like_mmengine():
    # MMEngine: stop_training is checked at the top of the epoch loop, after the validation.
    state, step, batches = _setup(3)
    rec = Recorder()
    final = fe.fit(
        state,
        step,
        batches,
        max_epochs=5,
        val=fe.Val(batches[:1], [Const()]),
        handlers=[StopAt("after_train_epoch", epoch=2), rec],
    )
    assert (final.step, final.epoch) == (6, 2)
    assert rec.events[-4:] == ["after_val_epoch", "after_val", "after_train", "after_run"]


def test_stop_reason_reaches_after_train_and_stop_before_train_runs_nothing():
    seen = {}

    class Watch(fe.Handler):
        def on_after_train(self, snap):
            seen.update(snap.metrics)

    state, step, batches = _setup(3)
    final = fe.fit(
        state, step, batches, max_epochs=2, handlers=[StopAt("after_train_iter", step=2), Watch()]
    )
    assert seen == {"stop": "stop at after_train_iter step 2"} and final.step == 2
    state, step, batches = _setup(3)
    final = fe.fit(state, step, batches, max_epochs=2, handlers=[StopAt("before_train")])
    assert final.step == 0 and final.epoch == 0


def test_stop_at_before_train_iter_runs_no_further_step():
    state, step, batches = _setup(3)
    final = fe.fit(
        state, step, batches, max_epochs=3, handlers=[StopAt("before_train_iter", step=2)]
    )
    assert final.step == 2
    state, step, batches = _setup(3)
    final = fe.fit(
        state, step, batches, max_epochs=3, handlers=[StopAt("before_train_epoch", epoch=1)]
    )
    assert (final.step, final.epoch, final.batch_in_epoch) == (3, 1, 0)


# ----------------------------------------------------------------- validation schedule
def _fe_val_epochs(max_epochs, interval, begin):
    state, step, batches = _setup(1)
    at = []

    class When(fe.Handler):
        def on_after_val_epoch(self, snap):
            at.append(snap.epoch)

    fe.fit(
        state,
        step,
        batches,
        max_epochs=max_epochs,
        val=fe.Val(batches, [Const()], interval=interval, begin=begin),
        handlers=[When()],
    )
    return at


def _mm_val_epochs(max_epochs, interval, begin):
    from mmengine.runner.loops import EpochBasedTrainLoop

    at = []
    loop = None
    runner = _mm_fake_runner(at, lambda: loop.epoch)
    loop = EpochBasedTrainLoop(
        runner, FakeLoader([0]), max_epochs=max_epochs, val_begin=begin, val_interval=interval
    )
    loop.run()
    return at


@pytest.mark.parametrize(
    "max_epochs,interval,begin,expected",
    [
        (5, 2, 1, [2, 4, 5]),  # forced validation after the last epoch
        (8, 2, 3, [4, 6, 8]),  # the modulus is absolute: not 3, 5, 7
        (7, 2, 3, [4, 6, 7]),
        (5, 1, 1, [1, 2, 3, 4, 5]),
        (4, 10, 1, [4]),
        (5, 1, 6, []),  # begin after the last epoch: never, not even the last
        (6, 3, 2, [3, 6]),
    ],
)
def test_epoch_validation_schedule_matches_mmengine_loop(max_epochs, interval, begin, expected):
    assert _fe_val_epochs(max_epochs, interval, begin) == expected
    assert _mm_val_epochs(max_epochs, interval, begin) == expected
    assert [
        e
        for e in range(1, max_epochs + 1)
        if fe.should_validate(e, interval=interval, begin=begin, last=max_epochs)
    ] == expected


def _fe_val_steps(max_steps, interval, begin, k=1):
    tx = optim.sgd(0.05)
    step = fe.train_step(ce_loss, tx, *([fe.accumulate(k)] if k > 1 else []))
    state = step.init(mlp())
    batches = mlp_batches(4)
    at = []

    class When(fe.Handler):
        def on_after_val_epoch(self, snap):
            at.append(snap.step)

    fe.fit(
        state,
        step,
        batches,
        max_steps=max_steps,
        val=fe.Val(batches[:1], [Const()], interval=interval, begin=begin),
        handlers=[When()],
    )
    return at


def _mm_val_iters(max_iters, interval, begin):
    from mmengine.runner.loops import IterBasedTrainLoop

    at = []
    loop = None
    runner = _mm_fake_runner(at, lambda: loop.iter)
    loop = IterBasedTrainLoop(
        runner,
        FakeLoader(range(max_iters)),
        max_iters=max_iters,
        val_begin=begin,
        val_interval=interval,
    )
    loop.run()
    return at


@pytest.mark.parametrize(
    "max_steps,interval,begin,expected",
    [
        (10, 3, 1, [3, 6, 9, 10]),
        (10, 4, 5, [8, 10]),
        (9, 3, 1, [3, 6, 9]),
        (5, 1000, 1, [5]),  # MMEngine's default iteration interval: only the forced last one
        (7, 2, 8, []),
    ],
)
def test_iteration_validation_schedule_matches_mmengine_loop(max_steps, interval, begin, expected):
    assert _fe_val_steps(max_steps, interval, begin) == expected
    assert _mm_val_iters(max_steps, interval, begin) == expected
    if interval == 1000:
        assert (
            _fe_val_steps(max_steps, None, begin) == expected
        )  # Val's default interval in iteration mode


def test_iteration_validation_counts_updates_with_accumulation():
    # 4 batches per epoch, accumulate(2): 2 updates per epoch; interval in updates
    assert _fe_val_steps(5, 2, 1, k=2) == [2, 4, 5]


# ----------------------------------------------------------------- loop position and continuation
def _loader(seed=0):
    g = torch.Generator().manual_seed(5)
    ds = torch.utils.data.TensorDataset(
        torch.randn(24, 16, generator=g), torch.randint(0, 10, (24,), generator=g)
    )
    return Loader(ds, batch_size=8, seed=seed, shuffle=True)


class Batches(fe.Handler):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_after_train_iter(self, snap):
        self.seen.append((snap.step, snap.epoch, snap.batch_idx, snap.batch[0].clone()))


def _fresh(seed=0):
    tx = optim.adamw(1e-2)
    step = fe.train_step(ce_loss, tx)
    return step.init(mlp(dropout=0.2), seed=seed), step


def test_position_after_a_max_steps_run_and_bitwise_continuation_with_loader():
    loader = _loader()
    assert len(loader) == 3
    state, step = _fresh()
    first, second = Batches(), Batches()
    mid = fe.fit(state, step, loader, max_steps=5, handlers=[first])
    assert (mid.step, mid.epoch, mid.batch_in_epoch) == (5, 1, 2)
    done = fe.fit(mid, step, loader, max_steps=11, handlers=[second])
    # continues with batch 2 of epoch 1; batch_idx is the global iteration (MMEngine's IterBasedTrainLoop)
    assert second.seen[0][:3] == (6, 1, 5)

    state, step = _fresh()
    straight = Batches()
    ref = fe.fit(state, step, loader, max_steps=11, handlers=[straight])
    assert (
        (ref.step, ref.epoch, ref.batch_in_epoch)
        == (done.step, done.epoch, done.batch_in_epoch)
        == (11, 3, 2)
    )
    assert_dicts_equal(done.params, ref.params, "params")
    assert_dicts_equal(done.opt_state.exp_avg, ref.opt_state.exp_avg, "exp_avg")
    for a, b in zip(first.seen + second.seen, straight.seen, strict=True):
        assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_epoch_based_run_continues_from_a_mid_epoch_state():
    loader = _loader()
    state, step = _fresh()
    mid = fe.fit(state, step, loader, max_steps=4, handlers=[])
    done = fe.fit(mid, step, loader, max_epochs=3, handlers=[])
    state, step = _fresh()
    ref = fe.fit(state, step, loader, max_epochs=3, handlers=[])
    assert (
        (done.step, done.epoch, done.batch_in_epoch)
        == (ref.step, ref.epoch, ref.batch_in_epoch)
        == (9, 3, 0)
    )
    assert_dicts_equal(done.params, ref.params, "params")


def test_plain_list_data_resumes_by_skipping():
    batches = mlp_batches(3)
    state, step = _fresh()
    mid = fe.fit(state, step, batches, max_steps=4, handlers=[])
    done = fe.fit(mid, step, batches, max_steps=8, handlers=[])
    state, step = _fresh()
    ref = fe.fit(state, step, batches, max_steps=8, handlers=[])
    assert_dicts_equal(done.params, ref.params, "params")


# ----------------------------------------------------------------- accumulation
def test_accumulate_3_with_7_batches_per_epoch():
    tx = optim.sgd(0.1)
    step = fe.train_step(ce_loss, tx, fe.accumulate(3))
    batches = mlp_batches(7)
    seen = []

    class Groups(fe.Handler):
        def on_before_run(self, snap):
            seen.append(snap.run)

        def on_after_train_iter(self, snap):
            seen.append((snap.step, snap.batch_idx, len(snap.batch), snap.state.batch_in_epoch))

    final = fe.fit(step.init(mlp()), step, batches, max_epochs=2, handlers=[Groups()])
    run, *iters = seen
    assert (run.steps_per_epoch, run.batches_per_epoch, run.micro_batches, run.max_steps) == (
        3,
        7,
        3,
        6,
    )
    assert iters == [
        (1, 0, 3, 3),
        (2, 1, 3, 6),
        (3, 2, 1, 7),
        (4, 0, 3, 3),
        (5, 1, 3, 6),
        (6, 2, 1, 7),
    ]
    assert (final.step, final.epoch, final.batch_in_epoch) == (6, 2, 0)

    # the same groups by hand, and a torch loop with the mean over each group (last group: mean of 1)
    manual = step.init(mlp())
    for _ in range(2):
        for group in (batches[0:3], batches[3:6], batches[6:7]):
            manual, _ = step(manual, fe.MicroBatches(group))
    assert_dicts_equal(final.params, manual.params, "params vs manual groups")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    for _ in range(2):
        for group in (batches[0:3], batches[3:6], batches[6:7]):
            opt.zero_grad()
            for x, y in group:
                (F.cross_entropy(model(x), y) * (1.0 / len(group))).backward()
            opt.step()
    assert_dicts_equal(
        final.params, {n: p.detach() for n, p in model.named_parameters()}, "params vs torch"
    )


# ----------------------------------------------------------------- bad input
def test_bad_lengths_and_counts_are_named():
    state, step, batches = _setup(3)
    with pytest.raises(
        ValueError,
        match="exactly one of max_epochs .* or max_steps .*got max_epochs=2, max_steps=4",
    ):
        fe.fit(state, step, batches, max_epochs=2, max_steps=4)
    with pytest.raises(ValueError, match="exactly one of max_epochs"):
        fe.fit(state, step, batches)
    with pytest.raises(ValueError, match="max_epochs must be an int >= 1, got 0"):
        fe.fit(state, step, batches, max_epochs=0)
    with pytest.raises(ValueError, match="max_steps must be an int >= 1, got -3"):
        fe.fit(state, step, batches, max_steps=-3)
    with pytest.raises(ValueError, match="max_epochs must be an int >= 1, got 1.5"):
        fe.fit(state, step, batches, max_epochs=1.5)
    with pytest.raises(ValueError, match="train_data is empty"):
        fe.fit(state, step, [], max_epochs=1)
    with pytest.raises(TypeError, match="train_data must have a length"):
        fe.fit(state, step, (b for b in batches), max_epochs=1)
    with pytest.raises(ValueError, match="Loader: `dataset` is empty"):
        Loader(torch.utils.data.TensorDataset(torch.zeros(0, 16)), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="Val: interval must be >= 1, got 0"):
        fe.fit(state, step, batches, max_epochs=1, val=fe.Val(batches, [Const()], interval=0))
    with pytest.raises(TypeError, match="val must be a fengine.Val"):
        fe.fit(state, step, batches, max_epochs=1, val=batches)
    with pytest.raises(TypeError, match="step must be a Step"):
        fe.fit(state, ce_loss, batches, max_epochs=1)
    with pytest.raises(TypeError, match="state must be a TrainState"):
        fe.fit({}, step, batches, max_epochs=1)


def test_a_batch_of_the_wrong_structure_names_batch_and_epoch():
    state, step, batches = _setup(3)
    bad = batches[:2] + [(batches[2][0],)]  # batch 2 lacks its labels
    with pytest.raises(ValueError, match="not enough values to unpack") as e:
        fe.fit(state, step, bad, max_epochs=2, handlers=[])
    assert any("batch 2 of epoch 0" in n for n in e.value.__notes__)
    state, step, batches = _setup(3)
    with pytest.raises(ValueError) as e:
        fe.fit(state, step, [{"x": b[0]} for b in batches], max_epochs=1, handlers=[])
    assert any("batch 0 of epoch 0 (a dict)" in n for n in e.value.__notes__)


def test_a_batch_of_the_wrong_shape_names_batch_and_epoch():
    state, step, batches = _setup(3)
    bad = batches[:1] + [(torch.randn(8, 15), batches[1][1])]
    with pytest.raises(RuntimeError) as e:
        fe.fit(state, step, bad, max_epochs=1, handlers=[])
    assert any("batch 1 of epoch 0" in n for n in getattr(e.value, "__notes__", []))


def test_early_stopping_monitor_that_does_not_exist():
    state, step, batches = _setup(3)
    val = fe.Val(batches[:1], [Const(key="accuracy")])
    with pytest.raises(
        MissingMetricError,
        match=r"monitor='val_acc' is not in the validation results; available keys: \['accuracy'\]",
    ):
        fe.fit(
            state,
            step,
            batches,
            max_epochs=2,
            val=val,
            handlers=[EarlyStopping("val_acc", strict=True)],
        )
    state, step, batches = _setup(3)
    with pytest.warns(
        UserWarning, match="monitor='val_acc'"
    ):  # strict=False (MMEngine's default): warn, skip
        final = fe.fit(
            state,
            step,
            batches,
            max_epochs=2,
            val=val,
            handlers=[EarlyStopping("val_acc", strict=False)],
        )
    assert final.epoch == 2
    with pytest.raises(ValueError, match="cannot infer the rule for monitor 'fid'"):
        EarlyStopping("fid")


# ----------------------------------------------------------------- several optimizers: a tiny GAN
def test_gan_with_two_optimizers_matches_torch_bitwise():
    g_lr = fe.schedules.linear(2e-3, start_factor=0.5, end=4)
    step = multi_step(
        {
            "disc": (disc_loss, optim.adam(1e-3, b1=0.5), "disc"),
            "gen": (gen_loss, optim.adam(g_lr, b1=0.5), lambda name: name.startswith("gen.")),
        }
    )
    assert isinstance(step, fe.Step)
    state = step.init(GAN())
    assert list(state.opt_state) == ["disc", "gen"]
    batches = gan_batches(4)
    logged = []

    class Log(fe.Handler):
        def on_after_train_iter(self, snap):
            logged.append({k: float(v) for k, v in snap.metrics.items()})

    final = fe.fit(state, step, batches, max_epochs=2, handlers=[Log()])
    assert final.step == 8

    # hand-written torch loop: two Adam optimizers, discriminator then generator
    model = GAN()
    d_opt = torch.optim.Adam(model.disc.parameters(), lr=1e-3, betas=(0.5, 0.999), foreach=True)
    g_opt = torch.optim.Adam(model.gen.parameters(), lr=2e-3, betas=(0.5, 0.999), foreach=True)
    g_sched = torch.optim.lr_scheduler.LinearLR(g_opt, start_factor=0.5, total_iters=3)
    ref_logs = []
    for real, z in itertools.chain(batches, batches):
        g_lr_used = g_opt.param_groups[0]["lr"]
        d_opt.zero_grad()
        fake = model.gen(z).detach()
        lr_, lf = model.disc(real), model.disc(fake)
        l_real = F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
        l_fake = F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        (l_real + l_fake).backward()
        d_opt.step()
        g_opt.zero_grad()
        logits = model.disc(model.gen(z))
        lg = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        lg.backward()
        g_opt.step()
        g_sched.step()
        ref_logs.append(
            {
                "disc/loss": float((l_real + l_fake).detach()),
                "gen/loss": float(lg.detach()),
                "gen/lr": g_lr_used,
            }
        )
    assert_dicts_equal(
        final.params, {n: p.detach() for n, p in model.named_parameters()}, "GAN params"
    )
    d_state = d_opt.state[model.disc[0].weight]
    assert torch.equal(final.opt_state["disc"].exp_avg["disc.0.weight"], d_state["exp_avg"])
    assert set(logged[0]) == {
        "disc/loss",
        "disc/loss_real",
        "disc/loss_fake",
        "disc/lr",
        "gen/loss",
        "gen/lr",
    }
    for mine, ref in zip(logged, ref_logs, strict=True):
        assert mine["disc/loss"] == ref["disc/loss"] and mine["gen/loss"] == ref["gen/loss"]
        assert mine["gen/lr"] == pytest.approx(ref["gen/lr"], rel=1e-12) and mine["disc/lr"] == 1e-3


def test_multi_step_donation_and_errors():
    step = multi_step(
        {"disc": (disc_loss, optim.sgd(0.1), "disc"), "gen": (gen_loss, optim.sgd(0.1), "gen")},
        donate=False,
    )
    state = step.init(GAN())
    before = state.clone()
    new, _ = step(state, gan_batches(1)[0])
    assert_dicts_equal(state.params, before.params, "donate=False keeps the input")
    donating = multi_step(
        {"disc": (disc_loss, optim.sgd(0.1), "disc"), "gen": (gen_loss, optim.sgd(0.1), "gen")}
    )
    s2, _ = donating(new, gan_batches(1)[0])
    with pytest.raises(fe.DonatedStateError):
        _ = new.params
    with pytest.raises(ValueError, match="'gen.0.weight' belongs to no part"):
        multi_step({"disc": (disc_loss, optim.sgd(0.1), "disc")}).init(GAN())
    with pytest.raises(ValueError, match="selected by several parts"):
        multi_step(
            {
                "a": (disc_loss, optim.sgd(0.1), lambda n: True),
                "b": (gen_loss, optim.sgd(0.1), "gen"),
            }
        ).init(GAN())
    with pytest.raises(
        fe.StepMismatchError, match="state.opt_state is SgdState, this step makes dict"
    ):
        step(fe.train_step(gen_loss, optim.sgd(0.1)).init(GAN()), gan_batches(1)[0])
    with pytest.raises(ValueError, match="order"):
        multi_step({"disc": (disc_loss, optim.sgd(0.1), "disc")}, order=["gen"])


# ----------------------------------------------------------------- evaluate
def test_evaluate_uses_ema_params_live_on_request_and_gives_the_metric_the_raw_batch():
    tx = optim.sgd(0.5)
    step = fe.train_step(ce_loss, tx, fe.ema(momentum=0.5))
    state = step.init(mlp())
    state = fe.fit(state, step, mlp_batches(3), max_steps=3, handlers=[])
    ema = state.extra["ema"].params
    assert not torch.equal(ema["0.weight"], state.params["0.weight"])
    x = torch.randn(5, 16)
    data = [{"inputs": x, "meta": ["raw"]}]

    def eval_fn(model, batch):
        return model(batch["inputs"] * 1.0)

    for params, expected in (("auto", ema), ("ema", ema), ("live", state.params)):
        metric = Const(record=True)
        out = fe.evaluate(state, eval_fn, data, [metric], params=params)
        assert out == {"acc": 0.5}
        ((batch, outputs),) = metric.seen
        assert batch is data[0]  # the RAW batch, not a copy or a preprocessed one
        with torch.no_grad():
            ref = functional_call(state.model, {**expected, **state.buffers}, (x,))
        assert torch.equal(outputs, ref), params
        assert not outputs.requires_grad

    plain = fe.train_step(ce_loss, tx).init(mlp())
    with pytest.raises(ValueError, match="params='ema' but the state has no EMA"):
        fe.evaluate(plain, eval_fn, data, [Const()], params="ema")
    with pytest.raises(ValueError, match="params must be 'auto', 'ema' or 'live'"):
        fe.evaluate(plain, eval_fn, data, [Const()], params="best")


def test_evaluate_emits_test_events_and_validation_in_fit_uses_ema():
    rec = Recorder()
    tx = optim.sgd(0.5)
    step = fe.train_step(ce_loss, tx, fe.ema(momentum=0.5))
    state = step.init(mlp())
    fe.evaluate(state, fe.loop.default_predict, mlp_batches(2), [Const()], handlers=[rec])
    assert rec.events == [
        "before_test",
        "before_test_epoch",
        "before_test_iter",
        "after_test_iter",
        "before_test_iter",
        "after_test_iter",
        "after_test_epoch",
        "after_test",
    ]

    metric = Const(record=True)
    val_batch = mlp_batches(1, seed=9)
    final = fe.fit(
        state, step, mlp_batches(3), max_epochs=1, val=fe.Val(val_batch, [metric]), handlers=[]
    )
    ((_, outputs),) = metric.seen
    with torch.no_grad():
        ref = functional_call(
            final.model, {**final.extra["ema"].params, **final.buffers}, (val_batch[0][0],)
        )
    assert torch.equal(outputs, ref)
    assert final.model.training  # evaluation restored train mode


# ----------------------------------------------------------------- Val refused at construction
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(eval_fn=None), TypeError, r"eval_fn must be a function"),
        (dict(metrics=[object()]), TypeError, r"is not a metric: it lacks init, update, compute"),
        (dict(data=(b for b in mlp_batches(2))), TypeError, r"data must be re-iterable"),
        (dict(interval="3"), ValueError, r"interval must be >= 1, got '3'; expected an int"),
        (dict(interval=0), ValueError, r"interval must be >= 1, got 0"),
        (dict(dynamic_intervals=[2]), ValueError, r"dynamic_intervals must be \[\(milestone"),
        (dict(dynamic_intervals=[(2, 0)]), ValueError, r"got \(2, 0\)"),
        (  # bisect over unsorted milestones never used interval 5
            dict(dynamic_intervals=[(10, 5), (3, 2)]),
            ValueError,
            r"milestones must increase, got milestone 3 after 10",
        ),
        (dict(dynamic_intervals=[(3, 5), (3, 2)]), ValueError, r"got milestone 3 after 3"),
        (dict(params="EMA"), ValueError, r"params must be 'auto', 'live' or 'ema', got 'EMA'"),
        (dict(data=[]), ValueError, r"Val: data is empty \(no batch to validate on\)"),
        (dict(autocast="fp16"), ValueError, r"autocast must be None, 'float16' or 'bfloat16'"),
    ],
)
def test_val_refuses_what_would_fail_only_after_training(kwargs, error, match):
    """Before, each failed at the first validation (after the first epoch's training), with a raw
    error: "'NoneType' object is not callable", ZeroDivisionError, ..."""
    args = {"data": mlp_batches(2), "metrics": [Const()], **kwargs}
    with pytest.raises(error, match=match):
        fe.Val(**args)


def test_val_of_the_ema_without_an_ema_is_refused_before_training():
    state, step, batches = _setup(2)
    with pytest.raises(ValueError, match=r"fit: Val\(params='ema'\): .*the state has no EMA"):
        fe.fit(state, step, batches, max_epochs=1, val=fe.Val(batches, Const(), params="ema"),
               handlers=[])  # fmt: skip
    assert state.step == 0 and not state.is_donated  # refused before the first update


def test_val_and_evaluate_take_a_single_metric():
    state, _, batches = _setup(2)
    val = fe.Val(batches, Const("acc", 0.25))
    assert fe.evaluate(state, fe.default_predict, batches, Const("acc", 0.25)) == {"acc": 0.25}
    assert fe.evaluate(state, fe.default_predict, val.data, val.metrics) == {"acc": 0.25}


def test_a_failure_after_training_began_keeps_the_last_state_on_the_error():
    """Without a work dir nothing else holds the training (the given state is donated): an
    eval_fn that fails at the first validation, after an epoch of updates, leaves the state of
    that epoch's end on the error, equal to a run of one epoch."""
    state, step, batches = _setup(3)
    done = fe.fit(state, step, batches, max_epochs=1, handlers=[])

    def broken(model, batch):
        raise RuntimeError("eval_fn broke")

    state, step, batches = _setup(3)
    with pytest.raises(RuntimeError, match="eval_fn broke") as e:
        fe.fit(state, step, batches, max_epochs=2, handlers=[],
               val=fe.Val(mlp_batches(2, seed=7), [Const()], eval_fn=broken))  # fmt: skip
    kept = e.value.fengine_state
    assert kept.step == 3 and kept.epoch == 1
    assert_dicts_equal(kept.params, done.params)
    leaves = zip(
        pytree.tree_leaves(kept.opt_state), pytree.tree_leaves(done.opt_state), strict=True
    )
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in leaves)
    # a batch the model cannot take: the step fails before it consumes its input state
    state, step, batches = _setup(3)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as e:
        fe.fit(state, step, [*batches, (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))],
               max_epochs=1, handlers=[])  # fmt: skip
    assert e.value.fengine_state.step == 3
    assert_dicts_equal(e.value.fengine_state.params, done.params)


def test_validation_keeps_each_submodules_own_mode():
    """A BatchNorm the user froze (bn.eval() before fit) was turned back to training by the
    first validation (model.train(was) sets every submodule): its statistics moved from then on,
    and a resume (which froze it again) was no longer bitwise. Each module's mode is restored."""
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10)
    )
    model[1].eval()  # frozen statistics, fine-tuning style
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    val = fe.Val(mlp_batches(1, seed=9), [Const()])
    state = fe.fit(step.init(model, seed=0), step, mlp_batches(2), max_epochs=3, val=val,
                   handlers=[])  # fmt: skip
    assert model.training and not model[1].training
    assert torch.equal(state.buffers["1.running_mean"], torch.zeros(8))  # never updated


def test_evaluation_in_one_process_counts_every_sample_it_is_given():
    """In one process nothing is padded, but len(dataset) was used as a padding bound: a
    DataLoader over ready-made batches (batch_size=None) failed as "25 padded duplicates", and a
    sampler drawing 31 of 30 samples silently dropped one. Against the same batches as a list."""
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 16, generator=g), torch.randint(0, 10, (30,), generator=g)
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 30, 6)]
    state = fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), seed=0)

    def acc(data):
        return fe.evaluate(state, fe.default_predict, data, [fe.metrics.Accuracy()])["accuracy"]

    assert acc(DataLoader(batches, batch_size=None)) == acc(batches)
    pairs = list(zip(x, y))
    draws = torch.randint(0, 30, (31,), generator=g).tolist()  # 31 draws with replacement
    loader = DataLoader(pairs, batch_size=8, sampler=draws)
    assert acc(loader) == acc(list(loader))  # the same 31 draws, listed


def test_a_validation_dataloader_over_an_iterable_dataset_runs():
    """It is Sized but len() raises: evaluation crashed with a raw TypeError after training."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from mlp_batches(2, seed=9)

    val = fe.Val(torch.utils.data.DataLoader(Stream(), batch_size=None), [Const()])
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    state = fe.fit(step.init(mlp(), seed=0), step, mlp_batches(2), max_epochs=1, val=val,
                   handlers=[])  # fmt: skip
    assert state.step == 2


def test_evaluate_with_its_arguments_swapped_says_the_order():
    state = fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), seed=0)
    with pytest.raises(TypeError, match=r"the order is evaluate\(state, eval_fn, data, metrics\)"):
        fe.evaluate(state, mlp_batches(1), fe.default_predict, [fe.metrics.Accuracy()])
