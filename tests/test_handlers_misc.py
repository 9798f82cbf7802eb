"""EarlyStopping, EmptyCache, Profiler, ScheduleRecorder (MMEngine's hooks as the oracle)."""

from __future__ import annotations

import json
import math
import types
import warnings

import pytest
import torch
from helpers import Scripted, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import optim, schedules
from fengine.events import Dispatcher, Snapshot
from fengine.handlers.early_stopping import EarlyStopping, MissingMetricError, infer_rule
from fengine.handlers.misc import EmptyCache, Profiler, ScheduleRecorder


mm_hooks = pytest.importorskip("mmengine.hooks")


# ----------------------------------------------------------------- helpers
class Events(fe.Handler):
    """Records (event, phase, step, epoch) for every event."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log = []
        for event in fe.events.EVENTS:
            setattr(self, "on_" + event, self._rec)

    def _rec(self, snap):
        self.log.append((snap.event, snap.phase, snap.step, snap.epoch))


def _snap(metrics):
    return Snapshot("after_val_epoch", state=None, run=None, phase="val", metrics=metrics)


def _mm_runner():
    messages = []
    return types.SimpleNamespace(
        train_loop=types.SimpleNamespace(stop_training=False),
        logger=types.SimpleNamespace(info=messages.append),
        messages=messages,
    )


def _fit_setup(n=3, dropout=0.0):
    tx = optim.sgd(0.05)
    step = fe.train_step(ce_loss, tx)
    return step.init(mlp(dropout=dropout), seed=0), step, mlp_batches(n)


# ----------------------------------------------------------------- EarlyStopping
def _sequences():
    g = torch.Generator().manual_seed(0)
    seqs = [
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # steps of exactly min_delta (float rounding decides)
        [0.5, 0.55, 0.58, 0.59, 0.6, 0.6, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
        [1.0, 0.9, 0.95, 0.7, float("nan"), 0.1],
        [0.3, float("inf"), 0.2],
        [0.2, 0.4, 0.99, 0.1],  # past a threshold
        [5.0, 4.0, 4.5, 4.6, 3.0, 3.05, 3.01, 2.99, 2.95, 2.94, 2.93],
    ]
    for _ in range(12):
        walk = torch.cumsum(torch.randn(25, generator=g) * 0.15, 0).tolist()
        seqs.append(walk)
    return seqs


@pytest.mark.parametrize("rule", ["greater", "less"])
@pytest.mark.parametrize(
    "min_delta,patience,threshold,check_finite",
    [
        (0.1, 5, None, True),  # MMEngine's defaults
        (0.01, 2, None, True),
        (0.0, 1, None, False),
        (0.05, 3, 0.95, True),
        (0.1, 0, None, True),
    ],
)
def test_early_stopping_matches_mmengine_hook(rule, min_delta, patience, threshold, check_finite):
    for seq in _sequences():
        mine = EarlyStopping(
            "score",
            rule=rule,
            min_delta=min_delta,
            patience=patience,
            stopping_threshold=threshold,
            check_finite=check_finite,
        )
        ref = mm_hooks.EarlyStoppingHook(
            "score",
            rule=rule,
            min_delta=min_delta,
            patience=patience,
            stopping_threshold=threshold,
            check_finite=check_finite,
        )
        for i, v in enumerate(seq):
            runner = _mm_runner()
            ref.after_val_epoch(runner, {"score": v})
            signal = mine.on_after_val_epoch(_snap({"score": v}))
            where = f"seq={seq} i={i}"
            assert (signal is not None) == runner.train_loop.stop_training, where
            assert mine.wait_count == ref.wait_count, where
            assert (mine.best_score == ref.best_score) or (
                math.isnan(mine.best_score) and math.isnan(ref.best_score)
            ), where
            if signal is not None:
                assert isinstance(signal, fe.Stop)
                assert signal.reason == "EarlyStopping: " + runner.messages[0]


def test_early_stopping_defaults_and_priority_match_mmengine():
    import inspect

    ref = inspect.signature(mm_hooks.EarlyStoppingHook.__init__).parameters
    mine = inspect.signature(EarlyStopping.__init__).parameters
    for name in ("rule", "min_delta", "check_finite", "patience", "stopping_threshold"):
        assert mine[name].default == ref[name].default, name
    assert (
        mine["strict"].default is True and ref["strict"].default is False
    )  # deliberate: a typo must not pass silently
    assert EarlyStopping("acc").priority == fe.Priority.LOWEST == 100
    assert mm_hooks.EarlyStoppingHook.priority == "LOWEST"


@pytest.mark.parametrize(
    "name",
    [
        "accuracy",
        "acc",
        "Acc/top1",
        "top-1",
        "loss",
        "val_loss",
        "mAP",
        "AR@100",
        "precision_loss",
        "MIOU",
        "aAcc",
        "FID",
        "psnr",
        "my_auc",
    ],
)
def test_rule_inference_matches_mmengine(name):
    try:
        expected = mm_hooks.EarlyStoppingHook("x", rule="less")._init_rule(name)
    except ValueError:
        with pytest.raises(ValueError, match=f"monitor '{name}'.*pass rule="):
            infer_rule(name)
        with pytest.raises(ValueError, match="rule"):
            EarlyStopping(name)
        return
    assert infer_rule(name) == expected
    assert EarlyStopping(name).rule == expected


def test_early_stopping_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rule must be 'greater' or 'less'"):
        EarlyStopping("acc", rule="max")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("acc", patience=-1)
    with pytest.raises(ValueError, match="monitor"):
        EarlyStopping("")
    # each was accepted: "False" and "no" are true strings; a NaN threshold is never reached
    with pytest.raises(TypeError, match="strict must be True or False, got 'False'"):
        EarlyStopping("acc", strict="False")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_finite must be True or False, got 'no'"):
        EarlyStopping("acc", check_finite="no")  # type: ignore[arg-type]
    for bad in (float("nan"), True):
        with pytest.raises(ValueError, match="stopping_threshold must be a finite number or None"):
            EarlyStopping("acc", stopping_threshold=bad)


def test_missing_monitor_warns_like_mmengine_or_raises_when_strict():
    metrics = {"accuracy": 0.5, "loss": 1.0}
    es = EarlyStopping("acc/top1", strict=False)
    with pytest.warns(
        UserWarning, match=r"monitor='acc/top1'.*available keys: \['accuracy', 'loss'\]"
    ):
        assert es.on_after_val_epoch(_snap(metrics)) is None
    assert es.wait_count == 0
    ref = mm_hooks.EarlyStoppingHook("acc/top1")
    runner = _mm_runner()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ref.after_val_epoch(runner, metrics)
    assert (
        any("do not include `monitor`" in str(x.message) for x in w)
        and not runner.train_loop.stop_training
    )

    strict = EarlyStopping("acc/top1", strict=True)
    with pytest.raises(
        MissingMetricError, match=r"monitor='acc/top1'.*available keys: \['accuracy', 'loss'\]"
    ) as e:
        strict.on_after_val_epoch(_snap(metrics))
    assert isinstance(e.value, KeyError) and isinstance(e.value, RuntimeError)
    with pytest.raises(RuntimeError, match="not available"):  # MMEngine's type
        mm_hooks.EarlyStoppingHook("acc/top1", strict=True).after_val_epoch(runner, metrics)


def test_missing_monitor_in_fit_strict_raises_naming_it():
    state, step, batches = _fit_setup()
    val = fe.Val(batches[:2], [Scripted([0.5] * 5, key="accuracy")])
    with pytest.raises(MissingMetricError, match="monitor='acc'.*'accuracy'"):
        fe.fit(
            state,
            step,
            batches,
            max_epochs=3,
            val=val,
            handlers=[EarlyStopping("acc", strict=True)],
        )


def test_state_dict_round_trips_through_strict_json_and_resumes_the_count():
    seq = [0.5, 0.7, 0.65, 0.66, 0.64, 0.9, 0.8, 0.85, 0.7, 0.6, 0.5, 0.4]
    straight = EarlyStopping("acc", patience=4)
    stops = [straight.on_after_val_epoch(_snap({"acc": v})) is not None for v in seq]
    for cut in range(len(seq)):
        a = EarlyStopping("acc", patience=4)
        got = [a.on_after_val_epoch(_snap({"acc": v})) is not None for v in seq[:cut]]
        blob = json.dumps(a.state_dict(), allow_nan=False)
        b = EarlyStopping("acc", patience=4)
        b.load_state_dict(json.loads(blob))
        got += [b.on_after_val_epoch(_snap({"acc": v})) is not None for v in seq[cut:]]
        assert got == stops, cut
        assert (b.wait_count, b.best_score) == (straight.wait_count, straight.best_score)
    fresh = EarlyStopping("acc")
    assert json.loads(json.dumps(fresh.state_dict(), allow_nan=False))["best_score"] == "-inf"
    other = EarlyStopping("loss")
    with pytest.warns(UserWarning, match="afresh"):
        other.load_state_dict(straight.state_dict())
    assert other.wait_count == 0


class FakeLoader(list):
    """What MMEngine's loops need of a dataloader: iteration, len and a ``dataset``."""

    dataset = None


def _mm_epoch_loop_stop_epoch(values, max_epochs, **es_kw):
    """Run MMEngine's real EpochBasedTrainLoop (fake runner) with its EarlyStoppingHook."""
    from mmengine.runner.loops import EpochBasedTrainLoop

    hook = mm_hooks.EarlyStoppingHook("acc", **es_kw)
    it = iter(values)
    runner = types.SimpleNamespace(
        logger=types.SimpleNamespace(info=lambda m: None), optim_wrapper=None
    )
    runner.call_hook = lambda name, **kw: None
    runner.model = types.SimpleNamespace(train=lambda: None, train_step=lambda *a, **k: {})
    loop = EpochBasedTrainLoop(runner, FakeLoader([0, 1, 2]), max_epochs=max_epochs)
    runner.train_loop = loop
    runner.val_loop = types.SimpleNamespace(
        run=lambda: hook.after_val_epoch(runner, {"acc": next(it)})
    )
    loop.run()
    return loop.epoch


@pytest.mark.parametrize(
    "values,patience",
    [
        ([0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], 2),
        ([0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99], 3),
        ([0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9], 2),  # never stops
    ],
)
def test_early_stopping_in_fit_stops_at_mmengines_epoch(values, patience):
    state, step, batches = _fit_setup()
    events = Events()
    val = fe.Val(batches[:2], [Scripted(values)])
    final = fe.fit(
        state,
        step,
        batches,
        max_epochs=10,
        val=val,
        handlers=[EarlyStopping("acc", patience=patience), events],
    )
    expected = _mm_epoch_loop_stop_epoch(values, 10, patience=patience)
    assert final.epoch == expected and final.batch_in_epoch == 0 and final.step == 3 * expected
    after_train = [e for e in events.log if e[0] == "after_train"]
    assert len(after_train) == 1
    assert events.log[-1][0] == "after_run"


def test_early_stopping_resumes_in_fit():
    values = [0.5, 0.7, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79]
    state, step, batches = _fit_setup()
    straight = fe.fit(
        state,
        step,
        batches,
        max_epochs=10,
        val=fe.Val(batches[:1], [Scripted(values)]),
        handlers=[EarlyStopping("acc", patience=3)],
    )
    state, step, batches = _fit_setup()
    metric = Scripted(values)
    es = EarlyStopping("acc", patience=3)
    mid = fe.fit(
        state, step, batches, max_epochs=3, val=fe.Val(batches[:1], [metric]), handlers=[es]
    )
    saved = json.loads(json.dumps(es.state_dict()))
    es2 = EarlyStopping("acc", patience=3)
    es2.load_state_dict(saved)
    resumed = fe.fit(
        mid, step, batches, max_epochs=10, val=fe.Val(batches[:1], [metric]), handlers=[es2]
    )
    assert resumed.epoch == straight.epoch == 5


class SaveAfterVal(fe.Handler):
    """Asks fit for a checkpoint after every validation (a stand-in for a checkpointing handler)."""

    def on_after_val_epoch(self, snap):
        return fe.Save(snap.run.work_dir / f"epoch_{snap.epoch}.safetensors")


def test_early_stopping_state_travels_in_the_checkpoint(tmp_path):
    values = [0.5, 0.7, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79]
    state, step, batches = _fit_setup()
    straight = fe.fit(
        state,
        step,
        batches,
        max_epochs=10,
        val=fe.Val(batches[:1], [Scripted(values)]),
        handlers=[EarlyStopping("acc", patience=3)],
    )
    metric = Scripted(values)
    state, step, batches = _fit_setup()
    fe.fit(
        state,
        step,
        batches,
        max_epochs=3,
        val=fe.Val(batches[:1], [metric]),
        handlers=[EarlyStopping("acc", patience=3), SaveAfterVal()],
        work_dir=tmp_path,
    )
    es = EarlyStopping("acc", patience=3)
    state, step, batches = _fit_setup()  # a fresh process: state and handler from scratch
    resumed = fe.fit(
        state,
        step,
        batches,
        max_epochs=10,
        val=fe.Val(batches[:1], [metric]),
        handlers=[es, SaveAfterVal()],
        work_dir=tmp_path,
        resume=True,
    )
    assert resumed.epoch == straight.epoch == 5 and es.wait_count == 3


# ----------------------------------------------------------------- EmptyCache
def _run_with(handlers, work_dir=None, max_epochs=2):
    state, step, batches = _fit_setup()
    val = fe.Val(batches[:2], [Scripted([0.1] * 10)])
    state = fe.fit(
        state, step, batches, max_epochs=max_epochs, val=val, handlers=handlers, work_dir=work_dir
    )
    fe.evaluate(state, fe.loop.default_predict, batches[:2], [Scripted([0.2])], handlers=handlers)
    return state


@pytest.mark.parametrize(
    "flags",
    [
        {},
        {"before_epoch": True},
        {"after_iter": True, "after_epoch": False},
        {"before_epoch": True, "after_epoch": True, "after_iter": True},
    ],
)
def test_empty_cache_calls_where_mmengine_hook_does(monkeypatch, flags):
    from mmengine.hooks import empty_cache_hook

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    events = Events()
    _run_with([EmptyCache(**flags), events])
    mine = len(calls)

    # replay the same event sequence into MMEngine's hook
    calls.clear()
    monkeypatch.setattr(empty_cache_hook, "is_cuda_available", lambda: True)
    ref = mm_hooks.EmptyCacheHook(**flags)
    for event, *_ in events.log:
        if event in ("after_load_checkpoint", "before_save_checkpoint", "after_save_checkpoint"):
            continue
        method = getattr(ref, event)
        if event.endswith("_iter"):
            method(None, batch_idx=0)
        else:
            method(None)
    assert mine == len(calls) > 0
    assert EmptyCache().priority == fe.Priority.NORMAL


def test_empty_cache_is_a_no_op_without_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    _run_with([EmptyCache(True, True, True)])
    assert calls == []
    disabled = EmptyCache(False, False, False)
    assert not any(Dispatcher([disabled]).wants(e) for e in fe.events.EVENTS)


# ----------------------------------------------------------------- Profiler
def _trace_ok(path):
    data = json.loads(path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e.get("name", "") for e in events}
    return any(n.startswith("ProfilerStep#") for n in names)


def _profiler_enabled():
    return torch.autograd.profiler._is_profiler_enabled


def test_profiler_writes_a_valid_chrome_trace(tmp_path):
    prof = Profiler(wait=1, warmup=1, active=2, record_shapes=True)
    state, step, batches = _fit_setup(4)
    fe.fit(state, step, batches, max_steps=8, handlers=[prof], work_dir=tmp_path)
    assert prof.traces == [tmp_path / "profiler" / "trace_step4.json"]
    assert _trace_ok(prof.traces[0])
    assert not prof.active_now and not _profiler_enabled()
    assert prof.priority == fe.Priority.VERY_LOW


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events:UserWarning")
def test_profiler_stops_cleanly_when_training_ends_inside_the_window(tmp_path):
    # ends while recording: the partial window is written at after_train
    prof = Profiler(wait=0, warmup=1, active=5, activities=["cpu"], out_dir=tmp_path / "p")
    state, step, batches = _fit_setup()
    fe.fit(state, step, batches, max_steps=3, handlers=[prof])
    assert prof.traces == [tmp_path / "p" / "trace_step3.json"] and _trace_ok(prof.traces[0])
    assert not _profiler_enabled()
    # ends during warm-up: nothing recorded, nothing written, profiler closed
    prof2 = Profiler(wait=2, warmup=2, active=1, out_dir=tmp_path / "q")
    state, step, batches = _fit_setup()
    fe.fit(state, step, batches, max_steps=3, handlers=[prof2])
    assert prof2.traces == [] and not prof2.active_now and not _profiler_enabled()
    # repeat: one trace per window
    prof3 = Profiler(wait=0, warmup=1, active=1, repeat=2, out_dir=tmp_path / "r")
    state, step, batches = _fit_setup()
    fe.fit(state, step, batches, max_steps=6, handlers=[prof3])
    assert [p.name for p in prof3.traces] == ["trace_step2.json", "trace_step4.json"]


def test_profiler_needs_a_directory_and_valid_schedule():
    state, step, batches = _fit_setup()
    with pytest.raises(ValueError, match="work_dir"):
        fe.fit(state, step, batches, max_steps=1, handlers=[Profiler()])
    with pytest.raises(ValueError, match="active must be an int >= 1"):
        Profiler(active=0)
    with pytest.raises(ValueError, match="unknown activity"):
        Profiler(activities=["tpu"])


# ----------------------------------------------------------------- ScheduleRecorder
def test_schedule_recorder_records_schedule_and_lr_used_by_each_update():
    cos = schedules.cosine(0.1, end=6, eta_min=0.01)
    wd = schedules.linear(1e-4, start_factor=0.5, end=4)
    tx = optim.sgd(cos, momentum=0.9, weight_decay=wd)
    state = fe.train_step(ce_loss, tx).init(mlp())
    rec = ScheduleRecorder(cos=cos, wd=wd)
    fe.fit(state, fe.train_step(ce_loss, tx), mlp_batches(3), max_steps=7, handlers=[rec])
    assert rec.values("step") == list(range(7))
    assert rec.values("lr") == [cos(t) for t in range(7)] == rec.values("cos")
    assert rec.values("wd") == [wd(t) for t in range(7)]
    assert (
        rec.values("lr")[0] == 0.1 and rec.values("lr")[5] == rec.values("lr")[6] < 0.02
    )  # held after the window
    with pytest.raises(KeyError, match="'nope' not recorded"):
        rec.values("nope")


def test_schedule_recorder_torch_reference_and_groups():
    # the recorded lr equals what a torch scheduler puts in param_groups for that iteration
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.0)
    ref = []
    for _ in range(5):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    tx = optim.partition(
        {"w": optim.sgd(schedules.cosine(0.1, T_max=5)), "b": optim.sgd(0.01)},
        lambda name, t: "w" if name.endswith("weight") else "b",
    )
    rec = ScheduleRecorder()
    fe.fit(
        fe.train_step(ce_loss, tx).init(mlp()),
        fe.train_step(ce_loss, tx),
        mlp_batches(5),
        max_steps=5,
        handlers=[rec],
    )
    assert rec.values("w/lr") == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert rec.values("b/lr") == [0.01] * 5
    with pytest.raises(TypeError, match="schedule"):
        ScheduleRecorder(lr=0.1)


# ----------------------------------------------------------------- handlers that would never run
class _MMEngineStyle:
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        raise AssertionError("never called")


def _plain(snap):
    raise AssertionError("never called")


@pytest.mark.parametrize(
    ("handlers", "error", "match"),
    [
        ([_MMEngineStyle()], ValueError, r"MMEngine's hook method names.*on_after_train_iter"),
        ([_plain], TypeError, r"_plain is a plain function.*fe\.on"),
        ("logger", TypeError, r"got the string 'logger'"),
        ([fe.handlers.Logger], TypeError, r"Logger is a class; pass an instance"),
        ([object()], TypeError, r"a object has no on_<event> method"),
    ],
)
def test_fit_refuses_handlers_no_event_would_call(handlers, error, match):
    """Before this check each of these ran a whole fit without one call (a silent no-op)."""
    state, step, batches = _fit_setup()
    with pytest.raises(error, match=match):
        fe.fit(state, step, batches, max_epochs=1, handlers=handlers)
    assert not state.is_donated  # refused before the first step


def test_handler_with_every_event_switched_off_is_accepted():
    assert Dispatcher(
        [EmptyCache(False, False, False)]
    ).handlers  # a Handler: no events is a choice


def test_two_early_stoppings_persist_under_their_names(tmp_path):
    """The error for two state-keeping handlers of one name says pass name=...: EarlyStopping takes it."""
    state, step, batches = _fit_setup()
    val = fe.Val(batches[:2], [Scripted([0.1, 0.2, 0.3], key="score")])
    handlers = [
        fe.handlers.Checkpointer(1),
        EarlyStopping("score", rule="greater", patience=2),
        EarlyStopping("score", rule="less", patience=5, name="early_stopping_low"),
    ]
    fe.fit(state, step, batches, max_epochs=2, val=val, handlers=handlers, work_dir=tmp_path)
    saved = fe.checkpoint.read_meta(tmp_path / "epoch_2.safetensors")["meta"]["handlers"]
    assert saved["early_stopping"]["rule"] == "greater"
    assert saved["early_stopping_low"]["rule"] == "less"


class _Closing(fe.Handler):
    def __init__(self):
        super().__init__()
        self.closed = 0

    def on_before_run(self, snap):
        pass

    def close(self):
        self.closed += 1


def test_fit_closes_handlers_when_it_fails_and_evaluate_when_it_ends():
    """Before: a failing fit never reached after_run, leaving an MLflow run RUNNING forever and a
    TensorBoard file unflushed; evaluate never closed the trackers it opened."""
    state, step, batches = _fit_setup()

    def broken(model, batch):
        raise RuntimeError("eval_fn failed")

    closing = _Closing()
    with pytest.raises(RuntimeError, match="eval_fn failed"):
        fe.fit(state, step, batches, max_epochs=1, val=fe.Val(batches[:1], [Scripted([0.1])], eval_fn=broken),
               handlers=[closing])  # fmt: skip
    assert closing.closed == 1
    closing = _Closing()
    fe.evaluate(
        step.init(mlp()), fe.default_predict, batches[:1], [Scripted([0.1])], handlers=[closing]
    )
    assert closing.closed == 1
