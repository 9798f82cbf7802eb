"""Timer, Logger, TensorBoard and ProgressBar against independent references.

References: MMEngine 0.10.7 (test oracle only) -- ``IterTimerHook``, ``LoggerHook``
and ``LogProcessor`` driven on a fake runner with the same fake clock and values,
``HistoryBuffer`` statistics -- plus hand-computed windows, ETAs and fixed
strings, the lr of `fengine.schedules`, and tensorboardX's own protobuf to read
the event file back.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import struct
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import data, optim, schedules
from fengine.events import EVENTS, Dispatcher, Priority, RunInfo, Snapshot
from fengine.handlers import (
    Logger,
    ProgressBar,
    ScalarHistory,
    Stat,
    TensorBoard,
    Timer,
    default_handlers,
    should_log,
)


# ------------------------------------------------------------------ harness
class Clock:
    """A fake ``time.perf_counter``/``time.time``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines():
    """Messages the ``fengine`` logger emits during the test."""
    out: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            out.append(record.getMessage())

    logger = logging.getLogger("fengine")
    handler = Capture(level=logging.DEBUG)
    logger.addHandler(handler)
    yield out
    logger.removeHandler(handler)


def state_at(step=0, epoch=0, batch_in_epoch=0, opt_state=()):
    return SimpleNamespace(
        step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, params={}, opt_state=opt_state
    )


def run_info(
    *, by_epoch=True, max_epochs=1, steps_per_epoch=25, max_steps=None, start_step=0, work_dir=None
):
    if max_steps is None:
        max_steps = max_epochs * steps_per_epoch
    return RunInfo(
        work_dir=work_dir,
        by_epoch=by_epoch,
        max_epochs=max_epochs if by_epoch else None,
        max_steps=max_steps,
        steps_per_epoch=steps_per_epoch,
        batches_per_epoch=steps_per_epoch,
        micro_batches=1,
        start_step=start_step,
    )


class Driver:
    """Emits fit-like events to handlers through a real `Dispatcher`, on a fake clock."""

    def __init__(self, handlers, run, clock, start_step=0):
        self.dispatch = Dispatcher(handlers)
        self.run, self.clock = run, clock
        self.state = state_at(step=start_step)

    def emit(self, event, **kw):
        self.dispatch(event, self.state, self.run, **kw)

    def train_iter(self, b, d, c, metrics):
        """Batch ``b``: waits ``d`` s for data, computes for ``c`` s, returns ``metrics``."""
        start = self.clock.now
        self.clock.now += d
        self.emit("before_train_iter", batch_idx=b, data_time=self.clock.now - start)
        self.clock.now += c
        s = self.state
        self.state = state_at(s.step + 1, s.epoch, s.batch_in_epoch + 1, s.opt_state)
        self.emit(
            "after_train_iter", batch_idx=b, metrics=metrics, data_time=self.clock.now - start - c
        )

    def end_epoch(self):
        self.state = state_at(self.state.step, self.state.epoch + 1, 0)
        self.emit("after_train_epoch")

    def evaluate(self, timings, metrics, phase="val"):
        n = len(timings)
        self.emit(f"before_{phase}", eval_len=n, phase=phase)
        self.emit(f"before_{phase}_epoch", eval_len=n, phase=phase)
        for i, (d, c) in enumerate(timings):
            self.clock.now += d
            self.emit(f"before_{phase}_iter", batch_idx=i, eval_len=n, phase=phase)
            self.clock.now += c
            self.emit(f"after_{phase}_iter", batch_idx=i, eval_len=n, phase=phase)
        self.emit(f"after_{phase}_epoch", eval_len=n, phase=phase, metrics=metrics)
        self.emit(f"after_{phase}", eval_len=n, phase=phase, metrics=metrics)


def tiny_fit(
    tmp_path=None,
    *,
    n=50,
    batch=2,
    handlers,
    max_epochs=None,
    max_steps=None,
    tx=None,
    val=None,
    aux=None,
    model=None,
):
    """A real `fengine.fit` of an MLP (``model``) on ``n`` synthetic samples (``n / batch``
    iterations per epoch)."""
    loader = data.Loader(data.synthetic_classification(n, 16, 10), batch, seed=0)
    tx = tx or optim.sgd(0.01)
    loss_fn = ce_loss if aux is None else (lambda model, b: (ce_loss(model, b), aux()))
    step = fe.train_step(loss_fn, tx)
    state = step.init(mlp() if model is None else model, seed=0)
    return fe.fit(
        state,
        step,
        loader,
        max_epochs=max_epochs,
        max_steps=max_steps,
        handlers=handlers,
        work_dir=tmp_path,
        val=val,
    )


def val_spec(n=10):
    return fe.Val(
        data.Loader(data.synthetic_classification(n * 2, 16, 10, seed=1), 2, seed=0, shuffle=False),
        [fe.metrics.Accuracy()],
    )


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------ layout
def test_console_line_layout_exact(lines):
    """MMEngine's documented line, with fixed fake timings."""
    clock = Clock()
    timer = Timer(clock=clock)
    run = run_info(max_epochs=10, steps_per_epoch=1563)
    drv = Driver([timer, Logger(timer=timer, json_file=None, env=False)], run, clock)
    drv.emit("before_run")
    drv.emit("before_train")
    drv.emit("before_train_epoch")
    for b in range(10):
        drv.train_iter(
            b, 0.0011, 0.0112, {"loss": torch.tensor(2.3012, dtype=torch.float64), "lr": 1e-3}
        )
    eta = int(0.0123 * (15630 - 10))  # mean iteration time x updates left: 192 s
    assert eta == 192
    assert lines == [
        "Epoch(train)  [1][  10/1563]  lr: 1.0000e-03  eta: 0:03:12  time: 0.0123  "
        "data_time: 0.0011  loss: 2.3012"
    ]


def test_iteration_padding_and_iter_form(lines):
    clock = Clock()
    timer = Timer(clock=clock)
    run = run_info(by_epoch=False, steps_per_epoch=400, max_steps=1000)
    drv = Driver([timer, Logger(timer=timer, json_file=None, env=False)], run, clock)
    drv.emit("before_train")
    drv.emit("before_train_epoch")
    for b in range(10):
        drv.train_iter(b, 0.5, 1.5, {"loss": torch.tensor(0.25), "lr": 0.02})
    assert lines == [
        "Iter(train) [  10/1000]  lr: 2.0000e-02  eta: 0:33:00  time: 2.0000  "
        "data_time: 0.5000  loss: 0.2500"
    ]


def test_val_lines(lines):
    clock = Clock()
    timer = Timer(clock=clock)
    run = run_info(max_epochs=1, steps_per_epoch=2)
    drv = Driver([timer, Logger(timer=timer, json_file=None, env=False)], run, clock)
    drv.emit("before_train")
    drv.emit("before_train_epoch")
    for b in range(2):
        drv.train_iter(b, 0.0, 1.0, {"loss": torch.tensor(1.0), "lr": 0.1})
    drv.end_epoch()
    lines.clear()
    drv.evaluate([(0.0047, 0.0075)] * 313, {"accuracy": 35.7})
    assert len(lines) == 32  # every 10 batches, then the results
    assert lines[0] == "Epoch(val) [1][ 10/313]    eta: 0:00:03  time: 0.0122  data_time: 0.0047"
    assert (
        lines[-1] == "Epoch(val) [1][313/313]    accuracy: 35.7000  data_time: 0.0047  time: 0.0122"
    )


def test_standalone_evaluate_lines(lines):
    """`fengine.evaluate` (MMEngine's test loop): ``Epoch(test) [i/n]``."""
    model = mlp()
    state = fe.train_step(lambda m, b: m(b).sum(), optim.sgd(0.1)).init(model)
    loader = data.Loader(data.synthetic_classification(40, 16, 10), 2, seed=0, shuffle=False)
    timer = Timer()
    fe.evaluate(
        state,
        lambda m, b: m(b[0]),
        loader,
        [fe.metrics.Accuracy()],
        handlers=[timer, Logger(timer=timer)],
    )
    assert [line.split("  ")[0] for line in lines] == [
        "Epoch(test) [10/20]",
        "Epoch(test) [20/20]",
        "Epoch(test) [20/20]",
    ]
    assert lines[-1].startswith("Epoch(test) [20/20]    accuracy: ")


def test_a_logger_with_its_own_timer_logs_validation_and_test_passes(lines):
    """``Logger()`` alone (its private Timer, ``timer=None``) through a validation and a test pass:
    the same lines as with a shared Timer (it raised AttributeError at the pass's end)."""
    tiny_fit(handlers=[Logger(env=False, json_file=None)], max_epochs=1, val=val_spec())
    assert lines[-1].startswith("Epoch(val) [1][10/10]    accuracy: ")
    lines.clear()
    state = fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp())
    fe.evaluate(state, lambda m, b: m(b[0]), val_spec().data, [fe.metrics.Accuracy()],
                handlers=[Logger(env=False, json_file=None)])  # fmt: skip
    assert lines[-1].startswith("Epoch(test) [10/10]    accuracy: ")


# ------------------------------------------------------------------ MMEngine as the oracle
def _scenario(seed, epochs, per_epoch, n_val):
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()  # noqa: E731
    train = [
        [
            (
                u(0.001, 0.01),
                u(0.01, 0.2),
                0.1 * 0.9 ** (e * per_epoch + b),
                {"loss": u(0.5, 3.0), "loss_cls": u(0.1, 2.0), "acc": u(0, 100)},
            )
            for b in range(per_epoch)
        ]
        for e in range(epochs)
    ]
    val = [
        [(0.002, 0.010)] * n_val for _ in range(epochs)
    ]  # constant: MMEngine's epoch window is one too long
    return train, val


def _mmengine_lines(
    monkeypatch,
    train,
    val,
    *,
    by_epoch,
    interval,
    loader_len,
    max_iters,
    custom_cfg=None,
    val_every=None,
    ignore_last=True,
):
    from mmengine.hooks import IterTimerHook, LoggerHook, iter_timer_hook
    from mmengine.logging import MessageHub
    from mmengine.runner import LogProcessor, log_processor

    clock = Clock()
    monkeypatch.setattr(iter_timer_hook, "time", SimpleNamespace(time=clock))
    monkeypatch.setattr(log_processor, "is_cuda_available", lambda: False)
    out: list[str] = []
    n_val = len(val[0])
    runner = SimpleNamespace(
        message_hub=MessageHub.get_instance(f"fengine-oracle-{uuid.uuid4()}"),
        logger=SimpleNamespace(info=out.append),
        visualizer=SimpleNamespace(add_scalars=lambda *a, **k: None),
        train_dataloader=range(loader_len),
        val_dataloader=range(n_val),
        _train_loop=object(),
        train_loop=SimpleNamespace(dataloader=range(loader_len)),
        val_loop=SimpleNamespace(dataloader=range(n_val)),
        max_epochs=len(train),
        max_iters=max_iters,
        iter=0,
        epoch=0,
        experiment_name="exp",
        timestamp="t",
        log_processor=LogProcessor(by_epoch=by_epoch, custom_cfg=custom_cfg),
    )
    hub = runner.message_hub
    timer, logger = IterTimerHook(), LoggerHook(interval=interval, ignore_last=ignore_last)
    logger.before_run(runner)
    timer.before_train(runner)

    done = []

    def validate(timings):
        done.append(1)
        timer.before_val_epoch(runner)
        for i, (d, c) in enumerate(timings):
            clock.now += d
            timer.before_val_iter(runner, i)
            clock.now += c
            timer.after_val_iter(runner, i)
            logger.after_val_iter(runner, i)
        hub.update_scalar("val/accuracy", 12.5 * len(done))  # RuntimeInfoHook
        hub.update_scalar("val/loss", 1.0 / len(done))  # a loss: averaged over validations
        logger.after_val_epoch(runner, {})
        timer.after_val_epoch(runner)

    if not by_epoch:
        timer.before_train_epoch(runner)
    for e, epoch in enumerate(train):
        if by_epoch:
            timer.before_train_epoch(runner)
        for b, (d, c, lr, losses) in enumerate(epoch):
            idx = b if by_epoch else runner.iter
            clock.now += d
            hub.update_scalar("train/lr", lr)  # RuntimeInfoHook: the lr used by this iteration
            timer.before_train_iter(runner, idx)
            clock.now += c
            for k, v in losses.items():
                hub.update_scalar(f"train/{k}", v)
            timer.after_train_iter(runner, idx)
            logger.after_train_iter(runner, idx)
            runner.iter += 1
            if not by_epoch and runner.iter % val_every == 0:
                validate(val[runner.iter // val_every - 1])
        if by_epoch:
            runner.epoch += 1
            validate(val[e])
    return [line.rstrip() for line in out]


def _fengine_lines(
    lines,
    train,
    val,
    *,
    by_epoch,
    interval,
    loader_len,
    max_iters,
    custom=(),
    val_every=None,
    ignore_last=True,
):
    clock = Clock()
    timer = Timer(clock=clock)
    run = run_info(
        by_epoch=by_epoch, max_epochs=len(train), steps_per_epoch=loader_len, max_steps=max_iters
    )
    logger = Logger(
        interval,
        timer=timer,
        json_file=None,
        custom=custom,
        exp_name="exp",
        env=False,
        ignore_last=ignore_last,
    )
    drv = Driver([timer, logger], run, clock)
    drv.emit("before_run")
    drv.emit("before_train")
    done = []

    def acc():
        done.append(1)
        return {"accuracy": 12.5 * len(done), "loss": 1.0 / len(done)}

    if not by_epoch:
        drv.emit("before_train_epoch")
    for e, epoch in enumerate(train):
        if by_epoch:
            drv.emit("before_train_epoch")
        for d, c, lr, losses in epoch:
            metrics = {k: torch.tensor(v, dtype=torch.float64) for k, v in losses.items()}
            drv.train_iter(drv.state.batch_in_epoch, d, c, {"lr": lr, **metrics})
            if not by_epoch and drv.state.step % val_every == 0:
                drv.evaluate(val[drv.state.step // val_every - 1], acc())
        if by_epoch:
            drv.end_epoch()
            drv.evaluate(val[e], acc())
    return list(lines)


def spread(self, window_size=None):
    """A registered statistic (the same function on MMEngine's HistoryBuffer and on History)."""
    values = self._log_history if window_size is None else self._log_history[-window_size:]
    return float(values.max() - values.min())


def test_lines_match_mmengine_epoch_based(monkeypatch, lines):
    """25 iterations per epoch, interval 10: [10/25], [20/25] only (ignore_last), smoothing,
    eta, lr and val lines -- byte for byte what MMEngine's LoggerHook prints; custom statistics
    with every kind of window (none: the whole history) and a registered one."""
    from mmengine.logging import HistoryBuffer

    train, val = _scenario(0, epochs=2, per_epoch=25, n_val=13)
    custom_cfg = [
        dict(data_src="loss", method_name="mean", window_size="global", log_name="loss_global"),
        dict(data_src="loss_cls", method_name="max", window_size="epoch", log_name="loss_cls_max"),
        dict(data_src="acc", method_name="min", window_size=3),
        dict(data_src="loss_cls", method_name="max", log_name="loss_cls_max_all"),
        dict(data_src="loss", method_name="mean", log_name="loss_mean_all"),
        dict(data_src="acc", method_name="spread", window_size=4, log_name="acc_spread"),
        dict(data_src="loss", method_name="spread", log_name="loss_spread"),
    ]
    kw = dict(by_epoch=True, interval=10, loader_len=25, max_iters=50)
    fe.handlers.History.register_statistics(spread)
    HistoryBuffer.register_statistics(spread)
    try:
        expected = _mmengine_lines(monkeypatch, train, val, custom_cfg=custom_cfg, **kw)
        got = _fengine_lines(lines, train, val, custom=custom_cfg, **kw)
    finally:
        fe.handlers.History.unregister_statistics("spread")
        HistoryBuffer._statistics_methods.pop("spread", None)
    assert "loss_cls_max_all: " in got[-5] and "acc_spread: " in got[-5]
    assert [line.split("  ")[0] for line in got] == [
        "Epoch(train) [1][10/25]",
        "Epoch(train) [1][20/25]",
        "Exp name: exp",
        "Epoch(val) [1][10/13]",
        "Epoch(val) [1][13/13]",
        "Epoch(train) [2][10/25]",
        "Epoch(train) [2][20/25]",
        "Exp name: exp",
        "Epoch(val) [2][10/13]",
        "Epoch(val) [2][13/13]",
    ]
    assert got == expected


@pytest.mark.parametrize(
    ("loader_len", "ignore_last", "max_iters", "heads"),
    [
        (100, True, 30, ["[10/30]", "[20/30]", "val", "[30/30]"]),
        # the end of the first pass over a loader shorter than the interval is logged, and
        # with ignore_last=False the end of any first pass: MMEngine's iteration-based loop
        # passes the global step as batch_idx; the run's last partial interval never is
        (7, True, 25, ["Exp", "[ 7/25]", "[10/25]", "val", "[20/25]", "val"]),
        (13, False, 25, ["[10/25]", "val", "Exp", "[13/25]", "[20/25]", "val"]),
        (13, True, 25, ["[10/25]", "val", "Exp", "[20/25]", "val"]),
    ],
)
def test_lines_match_mmengine_iteration_based(
    monkeypatch, lines, loader_len, ignore_last, max_iters, heads
):
    val_every = 20 if max_iters == 30 else 10
    train, val = _scenario(1, epochs=1, per_epoch=max_iters, n_val=4)
    val = val * (max_iters // val_every)
    kw = dict(by_epoch=False, interval=10, loader_len=loader_len, max_iters=max_iters)
    kw.update(val_every=val_every, ignore_last=ignore_last)
    expected = _mmengine_lines(monkeypatch, train, val, **kw)
    got = _fengine_lines(lines, train, val, **kw)
    names = {"Iter(val) [4/4]": "val", "Exp name: exp": "Exp"}
    assert [names.get(h, h[12:]) for h in (line.split("  ")[0] for line in got)] == heads
    assert got == expected


# ------------------------------------------------------------------ interval rule
@pytest.mark.parametrize(
    ("n", "interval", "ignore_last", "expected"),
    [
        (25, 10, True, [10, 20]),  # MMEngine's ToyModel: no [25/25] line
        (25, 10, False, [10, 20, 25]),
        (5, 10, True, [5]),  # an epoch shorter than the interval is logged at its end
        (20, 10, True, [10, 20]),
    ],
)
def test_should_log_within_epoch(n, interval, ignore_last, expected):
    run = run_info(max_epochs=3, steps_per_epoch=n)
    for epoch in range(3):  # counted within the epoch, not on the global step
        got = [
            b + 1
            for b in range(n)
            if should_log(
                Snapshot("after_train_iter", state_at(epoch * n + b + 1, epoch), run, batch_idx=b),
                interval,
                ignore_last,
            )
        ]
        assert got == expected


@pytest.mark.parametrize(
    ("steps_per_epoch", "ignore_last", "expected"),
    [
        (7, True, [7, 10, 20]),
        (7, False, [7, 10, 20]),
        (13, True, [10, 20]),
        (13, False, [10, 13, 20]),
    ],
)
def test_should_log_iteration_based(steps_per_epoch, ignore_last, expected):
    """MMEngine's LoggerHook in an IterBasedTrainLoop (batch_idx = the global step - 1):
    every interval, plus the end of the first pass over the loader when it is shorter than
    the interval (or ignore_last is off); never the run's last partial interval (25)."""
    run = run_info(by_epoch=False, steps_per_epoch=steps_per_epoch, max_steps=25)
    got = [
        s
        for s in range(1, 26)
        if should_log(
            Snapshot("after_train_iter", state_at(s), run, batch_idx=(s - 1) % steps_per_epoch),
            10,
            ignore_last,
        )
    ]
    assert got == expected


def test_fit_toy_example_logs_10_and_20_of_25(tmp_path, capsys):
    """FEATURES §25 item 18: 50 samples, batch 2, one epoch -> lines at [10/25] and [20/25] only."""
    tiny_fit(tmp_path, handlers=default_handlers(), max_epochs=2)
    out = capsys.readouterr().out.splitlines()
    (log,) = tmp_path.glob("*.log")
    assert log.read_text().splitlines() == out  # the console and the file: the same lines
    records = [line.split(" - INFO - ")[1] for line in out if " - fengine - INFO - " in line]
    assert records[0] == ""  # the environment banner, MMEngine's frame: a message on its own lines
    assert out[out.index(next(x for x in out if x.endswith(" - INFO - "))) + 1] == "-" * 60
    exp = f"Exp name: {tmp_path.name}_{log.stem}"  # MMEngine: <config name>_<timestamp>
    assert [r.split("  ")[0] for r in records[1:]] == [
        "Epoch(train) [1][10/25]",
        "Epoch(train) [1][20/25]",
        exp,  # at the end of each epoch (and every 1000 updates)
        "Epoch(train) [2][10/25]",
        "Epoch(train) [2][20/25]",
        exp,
    ]


# ------------------------------------------------------------------ smoothing
def test_smoothing_vs_hand_and_history_buffer(tmp_path):
    """Window means of loss-like keys (regardless of interval), latest lr, custom statistics:
    against hand computation and MMEngine's HistoryBuffer on the same values."""
    from mmengine.logging import HistoryBuffer

    g = torch.Generator().manual_seed(3)
    losses = (torch.rand(23, generator=g, dtype=torch.float64) * 3).tolist()
    norms = (torch.rand(23, generator=g, dtype=torch.float64) * 10).tolist()
    lrs = [0.1 * 0.97**i for i in range(23)]
    run = run_info(max_epochs=2, steps_per_epoch=12, work_dir=tmp_path)  # 12 + 11 updates
    logger = Logger(
        3,
        window_size=4,
        timer=False,
        custom=[
            Stat("loss", "mean", "global", "loss_global"),
            Stat("loss", "max", "epoch", "loss_max_epoch"),
            Stat("grad_norm", "min", 7),
        ],
    )
    drv = Driver([logger], run, Clock())
    drv.emit("before_run")
    drv.emit("before_train_epoch")
    buf = {k: HistoryBuffer() for k in ("loss", "grad_norm", "lr")}
    expected = []
    for i in range(23):
        if i == 12:
            drv.end_epoch()
            drv.emit("before_train_epoch")
        b = drv.state.batch_in_epoch
        metrics = {
            "loss": torch.tensor(losses[i], dtype=torch.float64),
            "grad_norm": torch.tensor(norms[i], dtype=torch.float64),
            "lr": lrs[i],
        }
        drv.train_iter(b, 0, 0, metrics)
        for k in buf:
            buf[k].update(float(metrics[k]))
        if (b + 1) % 3 == 0:
            window = losses[max(0, i - 3) : i + 1]
            hand = sum(window) / len(window)
            assert buf["loss"].mean(4) == pytest.approx(hand, rel=1e-12)
            expected.append(
                {
                    "step": i + 1,
                    "loss": hand,
                    "grad_norm": buf["grad_norm"].min(7),
                    "lr": lrs[i],
                    "loss_global": buf["loss"].mean(),
                    "loss_max_epoch": buf["loss"].max(b + 1),
                }
            )
    logger.on_after_run(None)
    records = read_jsonl(tmp_path / "scalars.jsonl")
    assert [r["step"] for r in records] == [
        3,
        6,
        9,
        12,
        15,
        18,
        21,
    ]  # within epoch 2: [3/12], [6/12], [9/12]
    for rec, exp in zip(records, expected):
        assert rec["lr"] == exp["lr"]  # latest, not averaged
        for k in ("loss", "grad_norm", "loss_global", "loss_max_epoch"):
            assert rec[k] == pytest.approx(exp[k], rel=1e-12), k


def test_scalar_history_keeps_only_what_is_asked():
    h = ScalarHistory(window_size=4, stats=[Stat("loss", "mean", 9)])
    for i in range(50):
        h.append("loss", torch.tensor(float(i)))
        h.append("lr", float(i))
        h.append("loss_aux", torch.tensor(float(i)))
    sizes = {k: len(s.pending) for k, s in h._series.items()}
    assert sizes == {"loss": 9, "lr": 1, "loss_aux": 4}
    tag = h.collect()
    # a Stat without a name replaces its src (MMEngine custom_cfg without log_name)
    assert tag == {"loss": sum(range(41, 50)) / 9, "lr": 49.0, "loss_aux": sum(range(46, 50)) / 4}
    assert h.stat("loss", "mean", 9) == sum(range(41, 50)) / 9


def test_stat_validation():
    with pytest.raises(ValueError, match="method"):
        Stat("loss", "median")
    with pytest.raises(ValueError, match="window"):
        Stat("loss", window=0)
    with pytest.raises(ValueError, match="defined twice"):
        Logger(custom=[Stat("loss", window=5), dict(data_src="loss", method_name="max")])
    assert Stat.from_mmengine(
        dict(data_src="loss", method_name="max", window_size="global", log_name="m")
    ) == Stat("loss", "max", "global", "m")


# ------------------------------------------------------------------ lr
def test_logged_lr_is_the_lr_used(tmp_path):
    sched = schedules.step(0.1, step_size=3, gamma=0.5)
    tiny_fit(tmp_path, n=40, handlers=[Logger(1, timer=False)], max_epochs=1, tx=optim.sgd(sched))
    records = read_jsonl(tmp_path / "scalars.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    # update number s - 1 (0-based) used schedule(s - 1); MMEngine records it before the step
    assert [r["lr"] for r in records] == [sched(s - 1) for s in range(1, 21)]
    assert records[0]["lr"] == 0.1 and records[3]["lr"] == 0.05


@pytest.mark.parametrize("name", ["scalars.jsonl", "20260101_000000.log"])
def test_logs_are_never_appended_through_a_planted_link(tmp_path, monkeypatch, name):
    """A work dir may come from someone else: a link at the scalars file or at the text log's
    (predictable, timestamped) name is refused before a step, and its target is untouched."""
    import fengine.handlers.log as log_module

    monkeypatch.setattr(log_module.time, "strftime", lambda *a: "20260101_000000")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    work = tmp_path / "w"
    work.mkdir()
    (work / name).symlink_to(victim)
    with pytest.raises(OSError, match=f"refusing to append through .*{name}: a symlink"):
        tiny_fit(work, n=8, handlers=[Logger(1, timer=False)], max_epochs=1)
    assert victim.read_text() == "precious\n"


def test_partitioned_optimizer_logs_first_group_lr(tmp_path, lines):
    head = schedules.linear(0.2, start_factor=0.5, end=4)
    tx = optim.partition(
        {"body": optim.sgd(head), "last": optim.sgd(0.01)},
        lambda name, p: "last" if name.startswith("2.") else "body",
    )
    tiny_fit(tmp_path, n=16, handlers=[Logger(2, timer=False)], max_epochs=1, tx=tx)
    records = read_jsonl(tmp_path / "scalars.jsonl")
    assert [r["lr"] for r in records] == [head(s - 1) for s in (2, 4, 6, 8)]
    assert all("body/lr" not in r and "last/lr" not in r for r in records)
    assert head(1) == pytest.approx(0.2 * (0.5 + 0.5 / 3))
    train = [line for line in lines if line.startswith("Epoch(train)")]
    assert train[0].startswith(f"Epoch(train) [1][2/8]  lr: {head(1):.4e}  loss: ")


def test_multi_optimizer_lrs_match_mmengine_optim_wrapper_dict(monkeypatch, lines):
    """A multi_step's ``disc/lr``, ``gen/lr`` (and a partition inside a part) print as MMEngine
    prints an OptimWrapperDict's ``get_lr()`` (RuntimeInfoHook -> ``train/disc.lr``, ...)."""
    from mmengine.hooks import LoggerHook, RuntimeInfoHook
    from mmengine.optim import OptimWrapper, OptimWrapperDict
    from mmengine.runner import LogProcessor, log_processor

    monkeypatch.setattr(log_processor, "is_cuda_available", lambda: False)
    n = 12
    lr_d = [2e-4 * 0.9**i for i in range(n)]
    lr_g = [1e-4 * (i + 1) / n for i in range(n)]
    losses = [{"disc/loss": 0.5 + 0.01 * i, "gen/loss": 2.0 - 0.1 * i} for i in range(n)]

    # MMEngine: two wrappers in an OptimWrapperDict, lrs set on param group 0 each iteration
    out: list[str] = []
    wrappers = OptimWrapperDict(
        disc=OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)),
        gen=OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)),
    )
    runner = _train_runner(out, wrappers, n, LogProcessor())
    info, logger = RuntimeInfoHook(), LoggerHook(interval=4)
    logger.before_run(runner)
    for i in range(n):
        wrappers["disc"].optimizer.param_groups[0]["lr"] = lr_d[i]
        wrappers["gen"].optimizer.param_groups[0]["lr"] = lr_g[i]
        info.before_train_iter(runner, i)
        info.after_train_iter(runner, i, outputs=losses[i])
        logger.after_train_iter(runner, i)
        runner.iter += 1
    expected = list(out)
    assert list(wrappers.get_lr()) == ["disc.lr", "gen.lr"]

    # fengine: the step's metrics, the state's opt_state a dict by part (a multi_step)
    for partitioned in (False, True):
        lines.clear()
        logger = Logger(4, timer=False, json_file=None, exp_name="exp", env=False)
        drv = Driver([logger], run_info(steps_per_epoch=n), Clock())
        drv.state = state_at(opt_state={"disc": (), "gen": ()})
        drv.emit("before_run")
        drv.emit("before_train_epoch")
        for i in range(n):
            metrics = {"disc/loss": torch.tensor(losses[i]["disc/loss"], dtype=torch.float64)}
            metrics["disc/lr"] = lr_d[i]
            metrics["gen/loss"] = torch.tensor(losses[i]["gen/loss"], dtype=torch.float64)
            if partitioned:  # optim.partition inside the generator: its first group is logged
                metrics.update({"gen/body/lr": lr_g[i], "gen/head/lr": 10 * lr_g[i]})
            else:
                metrics["gen/lr"] = lr_g[i]
            drv.train_iter(i, 0, 0, metrics)
        assert lines == expected
    assert expected[0].startswith(
        f"Epoch(train) [1][ 4/12]  disc.lr: {lr_d[3]:.4e} gen.lr: {lr_g[3]:.4e}  disc/loss: "
    )


def _train_runner(out, optim_wrapper, n, log_processor, tags=None):
    """The parts of MMEngine's Runner its RuntimeInfoHook and LoggerHook read in a one-epoch,
    ``n``-iteration training: lines to ``out``, each scalars tag (a dict) to ``tags``."""
    from mmengine.logging import MessageHub

    return SimpleNamespace(
        message_hub=MessageHub.get_instance(f"fengine-oracle-{uuid.uuid4()}"),
        logger=SimpleNamespace(info=out.append),
        visualizer=SimpleNamespace(
            add_scalars=lambda tag, **k: tags(dict(tag)) if tags is not None else None
        ),
        optim_wrapper=optim_wrapper,
        train_dataloader=range(n),
        train_loop=SimpleNamespace(dataloader=range(n)),
        _train_loop=object(),
        max_epochs=1,
        max_iters=n,
        iter=0,
        epoch=0,
        experiment_name="exp",
        timestamp="t",
        log_processor=log_processor,
    )


def _mmengine_lr_logs(monkeypatch, wrapper, schedulers, n, *, by_epoch):
    """MMEngine's RuntimeInfoHook, LoggerHook (interval 1) and ParamSchedulerHook over ``n``
    iterations of ``wrapper``: each line's head and lr fields, and each scalars tag's lrs."""
    from mmengine.hooks import LoggerHook, RuntimeInfoHook
    from mmengine.runner import LogProcessor, log_processor

    monkeypatch.setattr(log_processor, "is_cuda_available", lambda: False)
    out, tags = [], []
    runner = _train_runner(out, wrapper, n, LogProcessor(by_epoch=by_epoch), tags.append)
    info, logger = RuntimeInfoHook(), LoggerHook(interval=1)
    logger.before_run(runner)
    for i in range(n):
        info.before_train_iter(runner, i)
        info.after_train_iter(runner, i, outputs={"loss": 1.0})
        logger.after_train_iter(runner, i)
        for s in schedulers:
            s.step()
        runner.iter += 1
    lrs = [[(k, v) for k, v in tag.items() if k.endswith("lr")] for tag in tags]
    return [line.split("  ")[:2] for line in out if "(train)" in line], lrs


def _fengine_lr_logs(tmp_path, lines):
    """What `_mmengine_lr_logs` returns, from fengine's console lines and scalars.jsonl."""
    records = read_jsonl(tmp_path / "scalars.jsonl")
    lrs = [[(k, v) for k, v in r.items() if k.endswith("lr")] for r in records]
    return [line.split("  ")[:2] for line in lines if "(train)" in line], lrs


@pytest.mark.parametrize("paramwise_cfg", ["custom_keys", "layer_decay", "one group", "no option"])
def test_paramwise_optimizer_logs_base_lr_as_mmengine(tmp_path, monkeypatch, lines, paramwise_cfg):
    """With several param groups MMEngine's OptimWrapper keeps ``base_param_settings`` (the
    optimizer's lr, scheduled like the groups): RuntimeInfoHook logs ``base_lr`` before ``lr``,
    LogProcessor prints it first. `ParamGroups.build` does the same: console lines and
    scalars.jsonl, under a warm-up, where group 0's lr is not the base lr. One param group
    (one trainable param, or an empty paramwise_cfg): no base_lr."""
    from mmengine.optim import DefaultOptimWrapperConstructor, LinearLR, OptimWrapper
    from mmengine.optim.optimizer import default_constructor as dc

    monkeypatch.setattr(dc, "print_log", lambda *a, **k: None)
    n, model = 6, mlp()
    if paramwise_cfg == "one group":
        for p in list(model.parameters())[1:]:
            p.requires_grad_(False)
    if paramwise_cfg == "layer_decay":  # layers 0, 1 for the two Linears: lr 0.9**3, 0.9**2
        kw = dict(
            weight_decay=0.05, decay_rate=0.9, num_layers=1, layer_id=lambda n: int(n[0]) // 2
        )
        groups = optim.layer_decay(model, lr=0.1, **kw)
        by_name: dict = {}  # MMDet's param groups: one per group name, lr = scale * base
        for s, p in zip(groups, model.parameters()):
            by_name.setdefault(s.group, dict(params=[], lr=s.lr_mult * 0.1))["params"].append(p)
        mm = OptimWrapper(torch.optim.SGD(list(by_name.values()), lr=0.1))
    else:
        cfg = {} if paramwise_cfg == "no option" else dict(custom_keys={"0.": dict(lr_mult=0.5)})
        groups = optim.paramwise(model, lr=0.1, **cfg)
        mm = DefaultOptimWrapperConstructor(dict(optimizer=dict(type="SGD", lr=0.1)), cfg)(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warmup = [LinearLR(mm, start_factor=0.25, by_epoch=False, begin=0, end=4)]
    want = _mmengine_lr_logs(monkeypatch, mm, warmup, n, by_epoch=True)

    lr = schedules.linear(0.1, start_factor=0.25, end=4)
    tx = groups.build(optim.sgd, lr=lr)
    tiny_fit(tmp_path, n=2 * n, handlers=[Logger(1, timer=False)], max_epochs=1, tx=tx, model=model)
    got = _fengine_lr_logs(tmp_path, lines)
    assert got[0] == want[0]
    assert [[k for k, _ in r] for r in got[1]] == [[k for k, _ in r] for r in want[1]]
    assert [[v for _, v in r] for r in got[1]] == [
        pytest.approx([v for _, v in r], rel=1e-12) for r in want[1]
    ]
    several = paramwise_cfg in ("custom_keys", "layer_decay")
    assert [k for k, _ in want[1][0]] == (["base_lr", "lr"] if several else ["lr"])
    if several:  # group 0 has an lr_mult: the two differ
        assert want[0][0][1] != f"base_lr: {lr(0):.4e} lr: {lr(0):.4e}"


def test_multi_step_part_logs_its_base_lr_as_mmengine_optim_wrapper_dict(
    tmp_path, monkeypatch, lines
):
    """A multi_step part whose optimizer is a `ParamGroups.build` with several groups: MMEngine's
    OptimWrapperDict.get_lr() gives ``gen.base_lr`` before ``gen.lr`` (and ``disc.lr`` alone):
    the same keys, order and values in fengine's lines and scalars.jsonl."""
    from helpers import GAN, disc_loss, gan_batches, gen_loss
    from mmengine.optim import (
        DefaultOptimWrapperConstructor,
        LinearLR,
        OptimWrapper,
        OptimWrapperDict,
    )
    from mmengine.optim.optimizer import default_constructor as dc

    monkeypatch.setattr(dc, "print_log", lambda *a, **k: None)
    n, model = 8, GAN()
    gen_cfg = dict(custom_keys={"0.": dict(lr_mult=0.5)})  # the first Linear of the generator
    gen = DefaultOptimWrapperConstructor(dict(optimizer=dict(type="Adam", lr=1e-3)), gen_cfg)
    mm = OptimWrapperDict(
        disc=OptimWrapper(torch.optim.Adam(model.disc.parameters(), lr=2e-4)),
        gen=gen(model.gen),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warmup = [LinearLR(mm["gen"], start_factor=0.5, by_epoch=False, begin=0, end=4)]
    want = _mmengine_lr_logs(monkeypatch, mm, warmup, n, by_epoch=False)

    lr = schedules.linear(1e-3, start_factor=0.5, end=4)
    groups = optim.paramwise(model, lr=1e-3, custom_keys={"gen.0.": dict(lr_mult=0.5)})
    step = fe.multi_step(
        {
            "disc": (disc_loss, optim.adam(2e-4), "disc"),
            "gen": (gen_loss, groups.build(optim.adam, lr=lr), "gen"),
        }
    )
    fe.fit(step.init(model, seed=0), step, gan_batches(n), max_steps=n,
           handlers=[Logger(1, timer=False)], work_dir=tmp_path)  # fmt: skip
    got = _fengine_lr_logs(tmp_path, lines)
    assert got[0] == want[0]
    assert [[k for k, _ in r] for r in got[1]] == [[k for k, _ in r] for r in want[1]]
    assert [[v for _, v in r] for r in got[1]] == [
        pytest.approx([v for _, v in r], rel=1e-12) for r in want[1]
    ]
    assert [k for k, _ in want[1][0]] == ["disc.lr", "gen.base_lr", "gen.lr"]


def test_multi_step_fit_logs_each_parts_lr(tmp_path, lines):
    from helpers import GAN, disc_loss, gan_batches, gen_loss

    step = fe.multi_step(
        {
            "disc": (disc_loss, optim.adam(2e-4), "disc"),
            "gen": (gen_loss, optim.adam(schedules.linear(1e-4, start_factor=0.5, end=8)), "gen"),
        }
    )
    state = step.init(GAN(), seed=0)
    fe.fit(state, step, gan_batches(8), max_steps=8, handlers=[Logger(4, timer=False)],
           work_dir=tmp_path)  # fmt: skip
    train = [line for line in lines if line.startswith("Iter(train)")]
    assert train[0].startswith("Iter(train) [4/8]  disc.lr: 2.0000e-04 gen.lr: ")
    records = read_jsonl(tmp_path / "scalars.jsonl")
    assert list(records[0])[2:4] == ["disc.lr", "gen.lr"]
    assert all("gen/lr" not in r and "lr" not in r for r in records)


# ------------------------------------------------------------------ files
def test_jsonl_content_and_flush(tmp_path):
    seen = []

    class Peek:  # reads the file while the run is going: every line is already on disk
        priority = Priority.LOWEST

        def on_after_train_epoch(self, snap):
            seen.append(len((tmp_path / "scalars.jsonl").read_text().splitlines()))

    timer = Timer()
    tiny_fit(tmp_path, handlers=[timer, Logger(timer=timer), Peek()], max_epochs=2, val=val_spec())
    records = read_jsonl(tmp_path / "scalars.jsonl")
    assert [(r["step"], r["epoch"]) for r in records] == [
        (10, 1),
        (20, 1),
        (25, 1),
        (35, 2),
        (45, 2),
        (50, 2),
    ]
    assert list(records[0]) == ["step", "epoch", "lr", "loss", "time", "data_time"]
    assert set(records[2]) == {"step", "epoch", "val/accuracy", "val/data_time", "val/time"}
    assert 0 <= records[2]["val/accuracy"] <= 100
    assert seen == [2, 5]


def _read_events(path):
    """Scalars of a tensorboardX event file: TFRecord framing + tensorboardX's Event proto."""
    from tensorboardX.proto.event_pb2 import Event

    raw = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = Event.FromString(raw[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out.append((v.tag, event.step, v.simple_value))
    return out


@pytest.mark.parametrize("by_epoch", [True, False])
def test_tensorboard_event_file(tmp_path, by_epoch):
    """Train scalars at the Logger's iterations and values; validation at the epoch
    (MMEngine's ``log_metric_by_epoch=True``) or, with False, at the step."""
    timer = Timer()
    tb = TensorBoard(timer=timer, log_metric_by_epoch=by_epoch)
    tiny_fit(tmp_path, handlers=[timer, Logger(timer=timer), tb], max_epochs=2, val=val_spec())
    tb.close()  # idempotent after after_run
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = _read_events(files[0])
    by_tag = {}
    for tag, step, value in scalars:
        by_tag.setdefault(tag, []).append((step, value))
    assert set(by_tag) == {
        "train/loss",
        "train/lr",
        "train/time",
        "train/data_time",
        "val/accuracy",
        "val/time",  # the pass's means, as MMEngine's val tag
        "val/data_time",
    }
    records = read_jsonl(tmp_path / "scalars.jsonl")
    train = [r for r in records if "loss" in r]
    for key in ("loss", "lr"):  # same iterations, same smoothing as the Logger
        assert (
            [s for s, _ in by_tag[f"train/{key}"]] == [r["step"] for r in train] == [10, 20, 35, 45]
        )
        assert [v for _, v in by_tag[f"train/{key}"]] == pytest.approx(
            [r[key] for r in train], rel=1e-6
        )
    assert [v for _, v in by_tag["val/accuracy"]] == [
        pytest.approx(r["val/accuracy"], rel=1e-6) for r in records if "val/accuracy" in r
    ]
    assert [s for s, _ in by_tag["val/accuracy"]] == ([1, 2] if by_epoch else [25, 50])


def test_tensorboard_needs_a_directory():
    with pytest.raises(ValueError, match="log_dir"):
        tiny_fit(None, handlers=[TensorBoard()], max_steps=1)


def test_only_rank_zero_writes(tmp_path, monkeypatch, capsys):
    from fengine.handlers import log, progress, tensorboard, trackers

    for module in (
        log,
        progress,
        tensorboard,
        trackers,
    ):  # not torch.distributed itself: the DataLoader reads it too
        monkeypatch.setattr(module, "_rank", lambda: 1)
    handlers = [Timer(), Logger(), TensorBoard(), fe.handlers.WandB(), fe.handlers.MLflow()]
    tiny_fit(tmp_path, handlers=handlers, max_epochs=1)  # rank 1 imports neither wandb nor mlflow
    assert [p.name for p in tmp_path.iterdir()] == [
        fe.workdir.LOCK_NAME
    ]  # the run's lock, no output
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------ timer
def test_eta_fake_clock_restart_aware():
    clock = Clock()
    timer = Timer(window_size=3, clock=clock)
    run = run_info(
        by_epoch=False, steps_per_epoch=1000, max_steps=200, start_step=100
    )  # resumed at step 100
    drv = Driver([timer], run, clock, start_step=100)
    drv.emit("before_train")
    drv.emit("before_train_epoch")
    for b, (d, c) in enumerate([(0.5, 1.5), (1.0, 2.0), (0.0, 3.0), (0.25, 0.75)]):
        drv.train_iter(b, d, c, {})
    snap = Snapshot("after_train_iter", drv.state, run, batch_idx=3)
    assert drv.state.step == 104
    assert timer.eta(snap) == pytest.approx((2.0 + 3.0 + 3.0 + 1.0) / 4 * (200 - 104))
    assert timer.last() == (1.0, 0.25)
    assert timer.mean("time") == pytest.approx((3.0 + 3.0 + 1.0) / 3)
    assert timer.mean("data_time", window=2) == pytest.approx((0.0 + 0.25) / 2)
    assert timer.mean("time", window="global") == pytest.approx(9.0 / 4)
    # validation: the pass's own mean x batches left; its time is not charged to training
    n = 5
    drv.emit("before_val_epoch", phase="val", eval_len=n)
    for i in range(3):
        clock.now += 0.1
        drv.emit("before_val_iter", phase="val", batch_idx=i, eval_len=n)
        clock.now += 0.3
        drv.emit("after_val_iter", phase="val", batch_idx=i, eval_len=n)
    vsnap = Snapshot("after_val_iter", drv.state, run, phase="val", batch_idx=2, eval_len=n)
    assert timer.eta(vsnap) == pytest.approx(0.4 * 2)
    assert timer.mean("data_time", "val", "epoch") == pytest.approx(0.1)
    drv.train_iter(4, 0.0, 2.0, {})
    assert timer.last() == (pytest.approx(2.0), 0.0)


def test_timer_in_fit_and_default_handlers():
    handlers = default_handlers()
    assert [type(h) for h in handlers] == [Timer, Logger] and handlers[1].timer is handlers[0]
    assert handlers[0].priority == Priority.NORMAL and handlers[1].priority == Priority.BELOW_NORMAL
    timer = handlers[0]
    tiny_fit(handlers=handlers, max_steps=7)
    assert timer.count() == 7
    t, d = timer.last()
    assert 0 <= d <= t < 5


def test_logger_without_timer_handler_times_itself(lines):
    tiny_fit(handlers=[Logger(5)], max_steps=5)
    train = [line for line in lines if line.startswith("Iter(train)")]
    assert " eta: " in train[0] and " time: " in train[0] and " data_time: " in train[0]
    lines.clear()
    tiny_fit(handlers=[Logger(5, timer=False)], max_steps=5)
    train = [line for line in lines if line.startswith("Iter(train)")]
    assert train[0].startswith("Iter(train) [5/5]  lr: 1.0000e-02  loss: ")


# ------------------------------------------------------------------ no per-step host sync
SYNC_METHODS = (
    "item",
    "tolist",
    "__float__",
    "__int__",
    "__bool__",
    "numpy",
    "cpu",
    "__format__",
    "__repr__",
)


class Counting(torch.Tensor):
    """A metric tensor that records every device -> host read of itself."""

    reads: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            cls.reads.append((Counting.step, name))
        return super().__torch_function__(func, types, args, kwargs or {})


Counting.step = 0


def test_no_host_sync_between_log_steps(tmp_path):
    """A metric tensor is read once per logging handler per logged interval, never in between."""
    Counting.reads = []

    class StepTracker:
        priority = Priority.HIGHEST

        def on_after_train_iter(self, snap):
            Counting.step = snap.step

    timer = Timer()
    handlers = [StepTracker(), timer, Logger(5, timer=timer), TensorBoard(timer=timer)]
    tiny_fit(
        tmp_path,
        n=24,
        handlers=handlers,
        max_epochs=1,
        aux=lambda: {"aux_loss": torch.tensor(0.5).as_subclass(Counting)},
    )
    # Logger every 5 updates, TensorBoard every 10 (its default); fit's non-finite watch once at the end
    # (it reads the losses every 50 updates and when training ends)
    assert Counting.reads == [(5, "tolist"), (10, "tolist"), (10, "tolist"), (12, "tolist")]


def test_handlers_call_no_sync_method_off_interval(tmp_path, monkeypatch):
    """Every Tensor read method, patched while the handlers run: used only at logging steps."""
    calls = []
    current = {"step": None, "on": False}
    for name in SYNC_METHODS[:-2]:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            if current["on"]:
                calls.append((current["step"], _name))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def watched(handler):
        class Proxy:
            priority = handler.priority

        for event in EVENTS:
            method = getattr(handler, "on_" + event, None)
            if callable(method):

                def call(snap, _m=method):
                    current["step"], current["on"] = snap.step, True
                    try:
                        return _m(snap)
                    finally:
                        current["on"] = False

                setattr(Proxy, "on_" + event, staticmethod(call))
        return Proxy()

    timer = Timer()
    handlers = [
        watched(h)
        for h in (
            timer,
            Logger(4, timer=timer),
            TensorBoard(interval=6, timer=timer),
            ProgressBar(),
        )
    ]
    tiny_fit(tmp_path, n=28, handlers=handlers, max_epochs=1)
    assert {step for step, _ in calls} == {4, 6, 8, 12}
    assert sorted(calls) == sorted(
        [(4, "tolist"), (8, "tolist"), (12, "tolist"), (6, "tolist"), (12, "tolist")]
    )


# ------------------------------------------------------------------ progress bar
def test_progress_bar_silent_without_tty(capsys):
    bar = ProgressBar()
    tiny_fit(handlers=[bar], max_epochs=1, val=val_spec(3))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert bar._progress is None


def test_progress_bar_draws_on_a_terminal():
    from rich.console import Console

    buf = io.StringIO()
    bar = ProgressBar(console=Console(file=buf, force_terminal=True, width=100), transient=False)
    tiny_fit(handlers=[bar], max_epochs=2, val=val_spec(3))
    text = buf.getvalue()
    assert "Epoch 1/2" in text and "Epoch 2/2" in text and "Val" in text
    assert bar._progress is None  # stopped at the end of the run


def test_progress_bar_stops_after_a_failed_fit_and_a_standalone_validation_pass():
    """rich's live display kept its refresh thread, hidden cursor and stdout redirect after a
    `fit` that raised (no after_run; `fit` closes its handlers) and after ``evaluate(...,
    phase="val")`` (only a test pass stopped it)."""
    from rich.console import Console

    from fengine.metrics import Accuracy

    def bar():
        return ProgressBar(console=Console(file=io.StringIO(), force_terminal=True))

    class Boom(Exception):
        pass

    @fe.on("after_train_iter", once=2)
    def boom(snap):
        raise Boom

    failing = bar()
    with pytest.raises(Boom):
        tiny_fit(handlers=[failing, boom], max_epochs=2)
    assert failing._progress is None
    state = fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), seed=0)
    loader = data.Loader(data.synthetic_classification(8, 16, 10), 2, seed=0)
    standalone = bar()
    fe.evaluate(state, fe.default_predict, loader, [Accuracy()], handlers=[standalone], phase="val")
    assert standalone._progress is None


def test_handlers_do_not_change_the_state(tmp_path):
    """Same final params with and without every logging handler."""
    a = tiny_fit(None, handlers=[], max_epochs=1)
    timer = Timer()
    b = tiny_fit(
        tmp_path,
        handlers=[timer, Logger(3, timer=timer), TensorBoard(timer=timer), ProgressBar()],
        max_epochs=1,
        val=val_spec(2),
    )
    assert a.step == b.step == 25
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])


def test_nonfinite_values_are_strict_json(tmp_path):
    run = run_info(max_epochs=1, steps_per_epoch=1, work_dir=tmp_path)
    logger = Logger(1, timer=False)
    drv = Driver([logger], run, Clock())
    drv.emit("before_run")
    drv.emit("before_train_epoch")
    drv.train_iter(0, 0, 0, {"loss": torch.tensor(math.inf), "lr": 0.1})
    drv.emit("after_run")
    assert (
        json.loads((tmp_path / "scalars.jsonl").read_text(), parse_constant=pytest.fail)["loss"]
        == "inf"
    )


def test_stop_reason_and_unregistered_timer_warning(lines):
    class StopAt3:
        def on_after_train_iter(self, snap):
            return fe.Stop("enough") if snap.step == 3 else None

    lonely = Timer()  # given to the Logger but not to fit: nothing is measured
    tiny_fit(handlers=[StopAt3(), Logger(1, timer=lonely)], max_steps=10)
    assert sum("has measured nothing" in line for line in lines) == 1
    train = [line for line in lines if line.startswith("Iter(train)")]
    assert len(train) == 3 and re.fullmatch(
        r"Iter\(train\) \[ 1/10\]  lr: 1\.0000e-02  loss: \d\.\d{4}", train[0]
    )
    assert lines[-1] == "Training stopped at step 3: enough"


def test_a_run_that_raised_does_not_leak_its_log_file(tmp_path):
    class Boom:
        def on_after_train_iter(self, snap):
            if snap.step == 2:  # runs before the Logger: step 1 is logged, step 2 is not
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tiny_fit(tmp_path / "a", handlers=[Logger(1, timer=False), Boom()], max_steps=3)
    tiny_fit(tmp_path / "b", handlers=[Logger(1, timer=False)], max_steps=2)
    (first,) = (tmp_path / "a").glob("*.log")
    assert sum("Iter(train)" in line for line in first.read_text().splitlines()) == 1
    # the JSON-lines file holds step 1 and is not left open (an unclosed file would be a
    # ResourceWarning, an error under the suite's filterwarnings)
    assert len((tmp_path / "a" / "scalars.jsonl").read_text().splitlines()) == 1
    assert not any(
        getattr(h, "_fengine_run_log", False) for h in logging.getLogger("fengine").handlers
    )


@pytest.mark.gpu
def test_memory_field_on_cuda(lines, tmp_path):
    run = run_info(max_epochs=1, steps_per_epoch=1, work_dir=tmp_path)
    logger = Logger(1, timer=False)
    drv = Driver([logger], run, Clock())
    drv.state = SimpleNamespace(
        step=0, epoch=0, batch_in_epoch=0, params={"w": torch.zeros(256, 1024, device="cuda")}
    )
    drv.emit("before_run")
    drv.emit("before_train_epoch")
    drv.state = SimpleNamespace(step=1, epoch=0, batch_in_epoch=1, params=drv.state.params)
    drv.emit(
        "after_train_iter", batch_idx=0, metrics={"loss": torch.ones((), device="cuda"), "lr": 0.1}
    )
    drv.emit("after_run")
    (train,) = [line for line in lines if line.startswith("Epoch(train)")]  # after the banner
    assert re.fullmatch(
        r"Epoch\(train\) \[1\]\[1/1\]  lr: 1\.0000e-01  memory: \d+  loss: 1\.0000", train
    )
    memory = read_jsonl(tmp_path / "scalars.jsonl")[0]["memory"]
    assert isinstance(memory, int) and memory >= 1  # MB, max_memory_allocated: the 1 MB tensor


# ------------------------------------------------------------------ non-scalar results
def _mmengine_eval_line(monkeypatch, timings, metrics, phase):
    """MMEngine's closing line of one val/test pass: IterTimerHook + RuntimeInfoHook feed the
    message hub (non-scalar results as runtime info), LogProcessor.get_log_after_epoch formats."""
    from mmengine.hooks import IterTimerHook, RuntimeInfoHook, iter_timer_hook
    from mmengine.logging import MessageHub
    from mmengine.runner import LogProcessor

    clock = Clock()
    monkeypatch.setattr(iter_timer_hook, "time", SimpleNamespace(time=clock))
    n = len(timings)
    runner = SimpleNamespace(
        message_hub=MessageHub.get_instance(f"fengine-oracle-{uuid.uuid4()}"),
        val_dataloader=range(n),
        test_dataloader=range(n),
        val_loop=SimpleNamespace(dataloader=range(n)),
        test_loop=SimpleNamespace(dataloader=range(n)),
        _train_loop=object(),
        max_epochs=3,
        epoch=1,
        iter=25,
    )
    timer = IterTimerHook()
    getattr(timer, f"before_{phase}_epoch")(runner)
    for i, (d, c) in enumerate(timings):
        clock.now += d
        getattr(timer, f"before_{phase}_iter")(runner, i)
        clock.now += c
        getattr(timer, f"after_{phase}_iter")(runner, i)
    getattr(RuntimeInfoHook(), f"after_{phase}_epoch")(runner, metrics)
    _, line = LogProcessor(by_epoch=True).get_log_after_epoch(
        runner, n, phase, with_non_scalar=phase == "test"
    )
    return line


@pytest.mark.parametrize("phase", ["val", "test"])
def test_non_scalar_results_printed_as_mmengine(monkeypatch, lines, phase):
    """A confusion matrix (tensor), an array, a list and a string among the results: scalars
    first, the others after them, tensors and arrays on their own lines -- MMEngine's bytes."""
    import numpy as np

    metrics = {
        "accuracy": 71.25,
        "cm": torch.tensor([[3, 1], [0, 4]]),
        "top5": torch.tensor(93.5),
        "per_class": np.array([0.5, 0.25, 0.75]),
        "n": 40,
        "classes": ["cat", "dog"],
        "half": np.float64(0.125),
        "note": "ok",
        "one": np.array([2.5]),
    }
    timings = [(0.002, 0.010)] * 4
    expected = _mmengine_eval_line(monkeypatch, timings, metrics, phase)
    clock = Clock()
    timer = Timer(clock=clock)
    if phase == "val":
        run = run_info(max_epochs=3, steps_per_epoch=25)
    else:  # fengine.evaluate: MMEngine's test loop
        run = dataclasses.replace(run_info(), steps_per_epoch=0, max_epochs=None)
    drv = Driver([timer, Logger(timer=timer, json_file=None, env=False)], run, clock)
    drv.state = state_at(step=25, epoch=1)
    drv.evaluate(timings, metrics, phase=phase)
    assert "cm: \ntensor([[3, 1],\n        [0, 4]])\n  " in expected
    assert lines[-1] == expected.rstrip()


# ------------------------------------------------------------------ run start, Exp name
def test_environment_banner_layout_is_mmengines(monkeypatch):
    """`format_banner` lays out MMEngine's ``Runner._log_env`` message byte for byte."""
    from mmengine.runner import runner as mm_runner

    from fengine.handlers.banner import environment, format_banner

    system, runtime = environment()
    monkeypatch.setattr(mm_runner, "collect_env", lambda: dict(system))
    out: list[str] = []
    fake = SimpleNamespace(
        _randomness_cfg={"seed": 0, "deterministic": False},
        _seed=0,
        _launcher="none",
        _distributed=False,
        _world_size=1,
        logger=SimpleNamespace(info=out.append),
        cfg=SimpleNamespace(_cfg_dict={}),
    )
    mm_runner.Runner._log_env(fake, {"cudnn_benchmark": False})
    mm_runtime = {
        "cudnn_benchmark": False,
        "seed": 0,
        "deterministic": False,
        "Distributed launcher": "none",
        "Distributed training": False,
        "GPU number": 1,
    }
    assert out == [format_banner(system, mm_runtime)]
    assert list(system)[:3] == ["sys.platform", "Python", "CUDA available"]
    assert system["PyTorch"] == torch.__version__ and system["fengine"] == fe.__version__
    assert runtime["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert runtime["threads"] == torch.get_num_threads() and runtime["world_size"] == 1


def test_run_start_banner_config_and_exp_name(tmp_path, lines):
    """A fit with a config: banner (seed from the state), ``Config:`` text, then training with
    ``Exp name`` lines every 3 updates and at the end of each epoch."""
    loader = data.Loader(data.synthetic_classification(20, 16, 10), 2, seed=0)
    step = fe.train_step(ce_loss, optim.sgd(0.01))
    config = {"seed": 7, "optim": {"lr": 0.01, "betas": [0.9, 0.999]}, "model": "mlp"}
    fe.fit(step.init(mlp(), seed=7), step, loader, max_epochs=2, config=config, work_dir=tmp_path,
           handlers=[Logger(5, timer=False, interval_exp_name=4, exp_name="toy")])  # fmt: skip
    banner, cfg, *rest = lines
    assert banner.startswith("\n" + "-" * 60 + "\nSystem environment:\n    sys.platform: ")
    assert banner.endswith("\n" + "-" * 60 + "\n")
    runtime = banner.split("\nRuntime environment:\n")[1].splitlines()
    assert runtime[:2] == [
        "    seed: 7",
        f"    deterministic: {torch.are_deterministic_algorithms_enabled()}",
    ]
    assert "    world_size: 1" in runtime and "    devices: cpu" in runtime
    assert cfg == (
        "Config:\nseed = 7\noptim = dict(\n    lr=0.01,\n    betas=[0.9, 0.999])\nmodel = 'mlp'\n"
    )
    # 10 updates per epoch, Exp name at steps 4, 8, 10 (end of epoch 1), 12, 16, 20 (both)
    assert [r.split("  ")[0] for r in rest] == [
        "Exp name: toy",
        "Epoch(train) [1][ 5/10]",
        "Exp name: toy",
        "Exp name: toy",
        "Epoch(train) [1][10/10]",
        "Exp name: toy",
        "Epoch(train) [2][ 5/10]",
        "Exp name: toy",
        "Exp name: toy",
        "Epoch(train) [2][10/10]",
    ]
    (log,) = tmp_path.glob("*.log")
    assert "Config:\nseed = 7\n" in log.read_text()


def test_exp_name_rule_matches_logger_hook():
    """`exp_name_due` against MMEngine's LoggerHook conditions, epoch- and iteration-based
    (MMEngine's IterBasedTrainLoop passes the global iteration as ``batch_idx``)."""
    from mmengine.hooks import LoggerHook

    hook = LoggerHook(interval_exp_name=7)
    for by_epoch, n, total in ((True, 5, 30), (False, 12, 40)):
        run = run_info(by_epoch=by_epoch, max_epochs=total // n, steps_per_epoch=n, max_steps=total)
        for step in range(1, total + 1):
            b = (step - 1) % n if by_epoch else step - 1
            runner = SimpleNamespace(iter=step - 1)
            expected = hook.every_n_train_iters(runner, 7) or hook.end_of_epoch(range(n), b)
            snap = Snapshot(
                "after_train_iter", state_at(step, (step - 1) // n), run, batch_idx=(step - 1) % n
            )
            assert fe.handlers.log.exp_name_due(snap, 7) == expected, (by_epoch, step)


def test_to_host_reads_every_kind_of_value_in_place():
    """`to_host`: numbers as floats; 0-d, one-element and larger tensors (their mean) of any dtype,
    each the value a per-element float64 cast gives, at its own position; with one dtype
    (no cast there) as with several."""
    from fengine.host import to_host

    values = [
        torch.tensor(1.5),
        2,
        torch.tensor([1.0, 3.0]),
        torch.tensor(2.25, dtype=torch.bfloat16),
        torch.tensor([[4.0]]),
        torch.tensor(7),
        torch.tensor(0.1, dtype=torch.float32),
        torch.tensor(1.0, requires_grad=True) * 3,
    ]
    expected = [1.5, 2.0, 2.0, 2.25, 4.0, 7.0, torch.tensor(0.1).double().item(), 3.0]
    assert to_host(values) == expected
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        one = [torch.tensor(v).to(dtype) for v in (0.1, 3.0, 1.0)] + [1]
        host = to_host(one)
        assert host == [float(t.double().item()) for t in one[:3]] + [1.0], dtype
        assert all(type(x) is float for x in host), dtype
        assert to_host(one[:3]) == host[:3], dtype  # tensors only: one stack, no numbers
    # one-element tensors of several shapes, and of several dtypes, each at its place
    mixed = [torch.tensor([0.1]), torch.tensor(0.2), torch.tensor([[0.3]])]
    assert to_host(mixed) == [torch.tensor(x).double().item() for x in (0.1, 0.2, 0.3)]
    assert to_host([torch.tensor(0.5, dtype=torch.float16), torch.tensor(0.1)]) == [
        0.5,
        torch.tensor(0.1).double().item(),
    ]


def test_window_sums_are_numpys_bit_for_bit():
    """The log line's means add numbers as numpy's pairwise sum does (MMEngine's HistoryBuffer
    uses np.sum): random lists of every length the fast path takes, signed zeros, inf and NaN."""
    import random

    import numpy as np

    from fengine.handlers.log import _PAIRWISE_MAX, _numpy_sum

    rng = random.Random(0)
    cases = [
        [-0.0],
        [-0.0] * 8,
        [-0.0] * 9,
        [0.0, -0.0],
        [math.inf, 1.0],
        [math.inf, -math.inf],
        [math.nan] * 9,
    ]
    for n in [*range(1, 140), *rng.sample(range(140, _PAIRWISE_MAX + 1), 60), _PAIRWISE_MAX]:
        for scale in (1.0, 1e-8, 1e12):
            cases.append([rng.gauss(0, 1) * scale * 10 ** rng.randint(-6, 6) for _ in range(n)])
    with np.errstate(invalid="ignore"):
        for values in cases:
            ref, ours = float(np.sum(values)), _numpy_sum(values)
            assert (math.isnan(ref) and math.isnan(ours)) or (
                ours == ref and math.copysign(1, ours) == math.copysign(1, ref)
            ), (len(values), values[:3])
    # a plain left-to-right sum differs from numpy's on such lists (the test can tell them apart)
    assert any(sum(v) != float(np.sum(v)) for v in cases[7:])


def test_rare_log_lines_keep_few_rows_and_the_same_statistics(tmp_path):
    """A logger that prints rarely moves its kept updates into its history every 100 updates
    (memory stays bounded) and still logs the values a per-update history gives."""
    from mmengine.logging import HistoryBuffer

    from fengine.handlers.log import _ROWS_KEPT

    g = torch.Generator().manual_seed(5)
    losses = (torch.rand(250, generator=g, dtype=torch.float64) * 3).tolist()
    run = run_info(max_epochs=1, steps_per_epoch=250, work_dir=tmp_path)
    logger = Logger(250, window_size=10, timer=False, custom=[Stat("loss", "max", 37, "loss_max")])
    drv = Driver([logger], run, Clock())
    drv.emit("before_run")
    drv.emit("before_train_epoch")
    buf = HistoryBuffer()
    most = 0
    for i in range(250):
        drv.train_iter(i, 0, 0, {"loss": torch.tensor(losses[i], dtype=torch.float64)})
        buf.update(losses[i])
        most = max(most, len(logger._rows))
    assert most == _ROWS_KEPT - 1 < 250
    logger.on_after_run(None)
    (record,) = read_jsonl(tmp_path / "scalars.jsonl")
    assert record["step"] == 250
    assert record["loss"] == buf.mean(10)  # numpy's sum of the last 10, as MMEngine's buffer
    assert record["loss_max"] == buf.max(37)


def _session_starts(path):
    """Steps of the SessionLog START events in a tensorboardX event file (``purge_step``)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    raw, pos, out = Path(path).read_bytes(), 0, []
    while pos < len(raw):
        (n,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = Event.FromString(raw[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        if event.HasField("session_log") and event.session_log.status == SessionLog.START:
            out.append(event.step)
    return out


def test_tensorboard_resumed_runs_keep_every_file_and_purge_the_rewritten_steps(tmp_path):
    """A resume in the same second used to reopen the first run's event file with 'wb' (tensorboardX
    names files by the second), erasing it; and the steps the resume rewrites showed two values."""
    tiny_fit(tmp_path, handlers=[TensorBoard(), fe.handlers.Checkpointer(15, by_epoch=False)],
             max_steps=20)  # fmt: skip
    state = tiny_fit(tmp_path, handlers=[TensorBoard(), fe.handlers.Checkpointer(15, by_epoch=False)],
                     max_steps=20)  # fmt: skip
    assert state.step == 20
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) >= 2
    steps = sorted(step for f in files for tag, step, _ in _read_events(f) if tag == "train/loss")
    assert steps == [10, 20, 10, 20] or steps == [10, 10, 20, 20]  # both runs' points kept


def test_tensorboard_purges_after_the_resumed_checkpoint(tmp_path):
    tiny_fit(tmp_path, handlers=[TensorBoard(), fe.handlers.Checkpointer(15, by_epoch=False)],
             max_steps=20)  # fmt: skip
    loader = data.Loader(data.synthetic_classification(50, 16, 10), 2, seed=0)
    step = fe.train_step(ce_loss, optim.sgd(0.01))
    fe.fit(step.init(mlp(), seed=0), step, loader, max_steps=30, work_dir=tmp_path,
           handlers=[TensorBoard(), fe.handlers.Checkpointer(15, by_epoch=False)],
           resume=tmp_path / "iter_15.safetensors")  # fmt: skip
    starts = [s for f in (tmp_path / "tensorboard").glob("*") for s in _session_starts(f)]
    assert 16 in starts  # TensorBoard drops earlier files' points from step 16 on
    # one file per run, each with its points (the resume left a file it opened before the load)
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    assert all(any(tag == "train/loss" for tag, _, _ in _read_events(f)) for f in files)


def test_handler_arguments_that_failed_late_are_refused():
    with pytest.raises(ValueError, match=r"TensorBoard: flush_secs must be a number > 0, got 'x'"):
        TensorBoard(flush_secs="x")
    with pytest.raises(ValueError, match=r"Logger: num_digits must be an int >= 0, got -1"):
        Logger(num_digits=-1)
    with pytest.raises(TypeError, match=r"Logger: json_file must be a file name"):
        Logger(json_file=5)
    with pytest.raises(TypeError, match=r"ProgressBar: transient must be a bool"):
        fe.handlers.ProgressBar(transient="no")
    assert fe.handlers.MLflow(artifact_suffix=".log").artifact_suffix == (".log",)


# ------------------------------------------------------------------ scalars.jsonl across a resume
def _fit_until(work, *, crash_at=None, by_epoch, resume=False):
    """6 samples, batches of 2 (3 updates per epoch); Logger every update; a checkpoint every
    2 updates (iteration-based) or every epoch with validation; optionally a failure once the
    Logger wrote ``crash_at``'s record (an update's, or a validation's when by_epoch)."""

    class Boom(fe.Handler):
        priority = Priority.LOWEST  # after the Logger has written the record

        def on_after_train_iter(self, snap):
            if not by_epoch and snap.step == crash_at:
                raise RuntimeError("boom")

        def on_after_val_epoch(self, snap):
            if by_epoch and snap.step == crash_at:
                raise RuntimeError("boom")

    loader = data.Loader(data.synthetic_classification(6, 16, 10), 2, seed=0)
    step = fe.train_step(ce_loss, optim.sgd(0.05, momentum=0.9))
    saver = fe.handlers.Checkpointer(1) if by_epoch else fe.handlers.Checkpointer(2, by_epoch=False)
    horizon = dict(max_epochs=3) if by_epoch else dict(max_steps=8)
    return fe.fit(step.init(mlp(), seed=0), step, loader, handlers=[Logger(1, timer=False), saver, Boom()],
                  val=val_spec(2) if by_epoch else None, work_dir=work, resume=resume, **horizon)  # fmt: skip


def _records(path):
    return [(r["step"], "val" if any(k.startswith("val/") for k in r) else "train",
             r.get("loss", r.get("val/accuracy"))) for r in read_jsonl(path)]  # fmt: skip


@pytest.mark.parametrize(("by_epoch", "crash_at", "moved"), [(False, 5, [5]), (True, 6, [6])])
def test_a_resumed_runs_scalars_hold_each_step_once(tmp_path, by_epoch, crash_at, moved):
    """A failure after a record past the last checkpoint (step 5 after iter_4; the validation at
    step 6 after epoch_2, which the resume runs again): the resumed run's scalars.jsonl is the
    straight run's, record for record and value for value (the Logger's smoothing windows are
    in the checkpoint, as MMEngine's MessageHub scalars are); the old records are kept aside."""
    _fit_until(tmp_path / "straight", by_epoch=by_epoch)
    work = tmp_path / "w"
    with pytest.raises(RuntimeError, match="boom"):
        _fit_until(work, crash_at=crash_at, by_epoch=by_epoch)
    _fit_until(work, by_epoch=by_epoch, resume=True)
    assert _records(work / "scalars.jsonl") == _records(tmp_path / "straight" / "scalars.jsonl")
    aside = read_jsonl(work / "scalars.superseded.jsonl")
    assert [r["step"] for r in aside] == moved


def test_a_fresh_run_into_a_used_work_dir_moves_the_earlier_records_aside(tmp_path):
    """Two runs without resume into one work dir: the second's scalars.jsonl holds its own steps
    only (they were appended: every step twice, with two runs' values); the first's records
    are renamed, not deleted, and each run has its own text log even within one second."""
    work = tmp_path / "w"
    _fit_until(tmp_path / "straight", by_epoch=False)
    _fit_until(work, by_epoch=False)
    first = (work / "scalars.jsonl").read_bytes()
    _fit_until(work, by_epoch=False)
    assert _records(work / "scalars.jsonl") == _records(tmp_path / "straight" / "scalars.jsonl")
    assert [r[0] for r in _records(work / "scalars.jsonl")] == list(range(1, 9))
    (aside,) = work.glob("scalars.before_*.jsonl")
    assert aside.read_bytes() == first
    assert len(list(work.glob("*.log"))) == 2
    _fit_until(work, by_epoch=False, resume=True)  # nothing left; a resume moves nothing aside
    assert len(list(work.glob("scalars.before_*.jsonl"))) == 1


def test_superseding_keeps_what_is_not_a_record(tmp_path):
    from fengine.handlers.jsonl import supersede

    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"step": 1}\nnot json\n{"step": 3}\n{"step": 2, "val/acc": 1}\n{"step": "x"}\n'
    )
    assert supersede(path, 2, eval_at_step=True) == 2
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": "x"}\n'
    assert (
        tmp_path / "s.superseded.jsonl"
    ).read_text() == '{"step": 3}\n{"step": 2, "val/acc": 1}\n'
    assert supersede(tmp_path / "missing.jsonl", 0, eval_at_step=False) == 0


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"train": []},
        {
            "train": {
                "loss": {"values": [1.5], "counts": [1], "g": ["0x0p+0"] * 4, "e": ["0x0p+0"] * 4}
            }
        },
        {
            "train": {
                "loss": {
                    "values": ["0x1p+0"],
                    "counts": [],
                    "g": ["0x0p+0"] * 4,
                    "e": ["0x0p+0"] * 4,
                }
            }
        },
        {
            "train": {
                "loss": {
                    "values": ["nope"],
                    "counts": [1],
                    "g": ["0x0p+0"] * 4,
                    "e": ["0x0p+0"] * 4,
                }
            }
        },
    ],
)
def test_a_malformed_logger_state_is_refused(state):
    """From a checkpoint (untrusted): only ints and floats' hex strings, lengths that agree."""
    with pytest.raises(ValueError):
        Logger().load_state_dict(state)


@pytest.mark.parametrize("mode", ["iteration", "mid_epoch"])
def test_epoch_and_global_statistics_continue_across_a_resume(tmp_path, mode):
    """Stat windows 'epoch' and 'global' from a checkpoint that is not at an epoch's start (an
    iteration-based run; iteration checkpoints of an epoch-based one): the resume restores the
    epoch's running sums instead of starting them again, so every record is the straight run's."""

    def fit(work, crash_at=None, resume=False):
        class Boom(fe.Handler):
            priority = Priority.LOWEST

            def on_after_train_iter(self, snap):
                if snap.step == crash_at:
                    raise RuntimeError("boom")

        stats = [Stat("loss", window="epoch", name="loss_epoch"),
                 Stat("loss", window="global", name="loss_global"),
                 Stat("loss", "max", window="epoch", name="loss_emax")]  # fmt: skip
        loader = data.Loader(data.synthetic_classification(12, 16, 10), 2, seed=0)  # 6 per epoch
        step = fe.train_step(ce_loss, optim.sgd(0.05, momentum=0.9))
        handlers = [
            Logger(1, timer=False, custom=stats),
            fe.handlers.Checkpointer(2, by_epoch=False),
            Boom(),
        ]
        horizon = dict(max_steps=10) if mode == "iteration" else dict(max_epochs=2)
        fe.fit(step.init(mlp(), seed=0), step, loader, handlers=handlers, work_dir=work,
               resume=resume, **horizon)  # fmt: skip

    def records(path):
        return [{k: v for k, v in r.items() if k.startswith("loss") or k == "step"}
                for r in read_jsonl(path)]  # fmt: skip

    fit(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path / "w", crash_at=5)
    fit(tmp_path / "w", resume=True)
    assert records(tmp_path / "w" / "scalars.jsonl") == records(
        tmp_path / "straight" / "scalars.jsonl"
    )


def test_a_trackers_multi_step_lr_names_do_not_depend_on_an_early_checkpoint(tmp_path):
    """A checkpoint before a tracker's first log line reads its state first: the part names of a
    multi_step (``gen.lr``, ``disc.lr``) are known by then (they were cached as ``lr`` / dropped)."""
    from helpers import GAN, disc_loss, gan_batches, gen_loss

    class Seen(TensorBoard):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.logged = []

        def _log(self, scalars, step, snap):
            self.logged.append((step, sorted(scalars)))
            super()._log(scalars, step, snap)

    def run(work, with_checkpoints):
        step = fe.multi_step({"disc": (disc_loss, optim.adam(2e-4), "disc"),
                              "gen": (gen_loss, optim.adam(1e-4), "gen")})  # fmt: skip
        seen = Seen(interval=4)
        more = [fe.handlers.Checkpointer(2, by_epoch=False)] if with_checkpoints else []
        fe.fit(step.init(GAN(), seed=0), step, gan_batches(8), max_steps=8, handlers=[seen, *more],
               work_dir=work)  # fmt: skip
        return seen.logged

    plain = run(tmp_path / "a", False)
    assert "train/gen.lr" in plain[0][1] and "train/disc.lr" in plain[0][1]
    assert run(tmp_path / "b", True) == plain


def test_a_tracker_of_your_own_keeps_its_state_under_its_class_name():
    class Mem(fe.handlers.Tracker):
        def _log(self, scalars, step, snap):
            pass

    assert Mem().name == "mem" and Logger().name == "logger" and TensorBoard().name == "tensorboard"
    assert Logger(name="second").name == "second"


def test_validation_results_history_is_checkpointed_and_checked():
    """MMEngine checkpoints its MessageHub's val scalars: a resumed run averages a validation
    ``loss`` over the passes before the checkpoint too."""
    before = Logger(json_file=None, env=False)
    for loss in (1.0, 0.5):
        before._eval_scalars("val", {"loss": loss, "n": 3})
    state = json.loads(json.dumps(before.state_dict()))  # as a checkpoint's metadata holds it
    after = Logger(json_file=None, env=False)
    after.load_state_dict(state)
    tag = after._eval_scalars("val", {"loss": 0.3, "n": 4})
    assert tag["loss"] == pytest.approx((1.0 + 0.5 + 0.3) / 3) and tag["n"] == 4
    with pytest.raises(ValueError, match="expected {'val': {key: series}}, got 3"):
        after.load_state_dict({"train": {}, "val": 3})


@pytest.mark.parametrize("planted", ["fifo", "link"])
def test_superseding_reads_only_the_logs_own_file(tmp_path, planted):
    """A resume rewrites scalars.jsonl from its checkpoint on: it read the file with read_text,
    so a FIFO planted there hung the run (a link to /dev/zero filled memory, a link elsewhere was
    read and its lines copied into the work dir)."""
    import threading

    from fengine.handlers.jsonl import supersede

    path = tmp_path / "scalars.jsonl"
    if planted == "fifo":
        os.mkfifo(path)
    else:
        outside = tmp_path / "outside.jsonl"
        outside.write_text('{"step": 9}\n')
        path.symlink_to(outside)
    raised: list = []

    def run():
        try:
            supersede(path, 3, eval_at_step=False)
        except OSError as e:
            raised.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "supersede hung"
    assert raised and f"refusing to read {path}" in str(raised[0])
    assert not (tmp_path / "scalars.superseded.jsonl").exists()


def test_fit_called_again_with_its_state_continues_the_same_scalars(tmp_path):
    """A second fit from the state the first returned writes the steps after it: nothing of the
    first run is moved aside (only records of steps it writes again are)."""
    step = fe.train_step(ce_loss, optim.sgd(0.05))
    data = mlp_batches(4)
    state = fe.fit(step.init(mlp(), seed=0), step, data, max_steps=4, work_dir=tmp_path,
                   handlers=[Logger(2, timer=False)])  # fmt: skip
    fe.fit(state, step, data, max_steps=8, work_dir=tmp_path, handlers=[Logger(2, timer=False)])
    assert [r[0] for r in _records(tmp_path / "scalars.jsonl")] == [2, 4, 6, 8]
    assert not list(tmp_path.glob("scalars.before_*"))


def test_superseding_keeps_undecodable_and_too_deep_lines(tmp_path):
    """A scalars.jsonl line that is not UTF-8 or nests 3000 levels deep killed every resume with a
    raw ``UnicodeDecodeError`` / ``RecursionError`` naming no file: such lines are not records,
    they stay in place byte for byte, and the records around them are read and moved as before."""
    from fengine.handlers.jsonl import record_steps, supersede

    path = tmp_path / "scalars.jsonl"
    deep = b"[" * 3000 + b"]" * 3000 + b"\n"
    bad = b'{"step": 3, "note": "\xff"}\n'
    path.write_bytes(b'{"step": 1}\n' + bad + deep + b'{"step": 4, "note": "\xc3\xa9"}\n')
    assert record_steps(path) == [1, 4]
    assert supersede(path, 2, eval_at_step=False) == 1
    assert path.read_bytes() == b'{"step": 1}\n' + bad + deep
    aside = tmp_path / "scalars.superseded.jsonl"
    assert aside.read_bytes() == b'{"step": 4, "note": "\xc3\xa9"}\n'


def test_a_handler_state_out_of_range_is_a_value_error_naming_the_handler():
    """A Logger state value ``'0x1p+99999'`` (a hex float too large for a float) escaped
    ``fit(resume=)`` as a raw ``OverflowError`` naming neither the handler nor the file: it is a
    ``ValueError`` naming the handler, which ``fit`` turns into a ``CheckpointError`` naming the
    file."""
    logger = Logger(json_file=None, env=False)
    logger._train.append("loss", 1.0)
    state = json.loads(json.dumps(logger.state_dict()))
    state["train"]["loss"]["values"] = ["0x1p+99999"]
    with pytest.raises(ValueError, match="^handler 'logger' cannot load its saved state: Overflow"):
        Dispatcher([Logger(json_file=None, env=False)]).load_state_dicts({"logger": state})


def test_a_work_dir_deleted_during_the_run_is_named_by_the_logger(tmp_path):
    """The next JSON-lines record after the work dir is removed raises naming the work dir (not a
    bare "No such file" for scalars.jsonl), and the error keeps the state."""
    import shutil

    work_dir = tmp_path / "run"

    class RemoveWorkDir(fe.Handler):
        def on_after_train_iter(self, snap):
            if snap.state.step == 3:
                shutil.rmtree(work_dir)

    step = fe.train_step(ce_loss, optim.sgd(0.1))
    with pytest.raises(FileNotFoundError, match="work dir .*run was deleted or moved") as e:
        fe.fit(step.init(mlp()), step, mlp_batches(6), max_epochs=1, work_dir=work_dir,
               handlers=[RemoveWorkDir(), Logger(interval=2)])  # fmt: skip
    assert e.value.fengine_state.step == 4
