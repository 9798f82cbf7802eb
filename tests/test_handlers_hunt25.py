"""Arguments and checkpoint fields refused with errors naming them (hunt 25): on/off flags given as
strings, an EMA gamma of inf, published_params without published, a resumed save_best key the
validation does not produce, and fit's handlers / work_dir / resumed batch_in_epoch."""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
import torch
from helpers import Scripted, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import checkpoint, optim
from fengine.events import RunInfo, Save, Snapshot
from fengine.handlers import Checkpointer, EmptyCache, Logger, Profiler


# ----------------------------------------------------------------- 1. on/off flags
@pytest.mark.parametrize("flag", ["before_epoch", "after_epoch", "after_iter"])
def test_empty_cache_refuses_a_string_flag(flag):
    with pytest.raises(
        TypeError, match=rf"^EmptyCache: {flag} must be a bool \(True or False\), got 'false'$"
    ):
        EmptyCache(**{flag: "false"})
    with pytest.raises(
        TypeError, match=rf"EmptyCache: {flag} must be a bool \(True or False\), got 1$"
    ):
        EmptyCache(**{flag: 1})
    assert getattr(EmptyCache(**{flag: False}), flag) is False


@pytest.mark.parametrize("flag", ["record_shapes", "profile_memory", "with_stack", "with_flops"])
def test_profiler_refuses_a_string_flag(flag):
    with pytest.raises(
        TypeError, match=rf"^Profiler: {flag} must be a bool \(True or False\), got 'false'$"
    ):
        Profiler(**{flag: "false"})
    assert getattr(Profiler(**{flag: True}), flag) is True


@pytest.mark.parametrize("flag", ["log_file", "env", "log_config"])
def test_logger_refuses_a_string_flag(flag):
    with pytest.raises(
        TypeError, match=rf"^Logger: {flag} must be a bool \(True or False\), got 'false'$"
    ):
        Logger(json_file=None, **{flag: "false"})
    assert getattr(Logger(json_file=None, **{flag: False}), flag) is False


# ----------------------------------------------------------------- 2. ema gamma / momentum
@pytest.mark.parametrize("gamma", [float("inf"), float("nan"), float("-inf")])
def test_ema_refuses_a_gamma_that_is_not_finite(gamma):
    with pytest.raises(
        ValueError, match=rf"ema: gamma must be a number > 0 and finite .*got {gamma}"
    ):
        fe.ema(gamma=gamma)
    assert fe.ema(gamma=100.0).gamma == 100.0


@pytest.mark.parametrize("momentum", [float("inf"), float("nan"), 0.0, 1.5])
def test_ema_refuses_a_momentum_outside_0_1(momentum):
    with pytest.raises(ValueError, match=r"ema: momentum must be in \(0, 1\]"):
        fe.ema(momentum=momentum)


# ----------------------------------------------------------------- 3. published_params
@pytest.mark.parametrize("which", ["ema", "live"])
def test_published_params_without_published_is_refused(which):
    with pytest.raises(
        ValueError,
        match=rf"published_params='{which}' picks the weights published=True writes, but "
        r"published is False .*set published=True",
    ):
        Checkpointer(published_params=which)
    assert Checkpointer(published=True, published_params=which).published_params == which
    assert Checkpointer().published_params == "auto"  # the default needs no published=True


# ----------------------------------------------------------------- 4. a resumed save_best key
def _snap(event, epoch=1, metrics=None, checkpoint=None):
    run = RunInfo(work_dir=None, by_epoch=True, max_epochs=10, max_steps=100, steps_per_epoch=1,
                  batches_per_epoch=1, micro_batches=1, start_step=0)  # fmt: skip
    state = types.SimpleNamespace(epoch=epoch, step=epoch)
    return Snapshot(event, state, run, metrics=metrics or {}, checkpoint=checkpoint)


def test_auto_key_from_a_checkpoint_the_validation_lacks_is_dropped_with_a_warning(tmp_path):
    """save_best='auto' adopts the key the checkpoint says it followed; one the validation does not
    produce (an edited file, another evaluator) failed at that validation with a KeyError naming
    no file. Now: a warning naming the file and the key, and 'auto' follows the first key."""
    ck = Checkpointer(1, save_best="auto", out_dir=tmp_path)
    ck.load_state_dict({"save_best": ["loss"],
                        "best": {"loss": {"score": 0.1, "path": "best_loss_epoch_1.safetensors"}}})  # fmt: skip
    assert ck.save_best == ["loss"] and ck.rules == ["less"] and "loss" in ck.best
    (tmp_path / "best_loss_epoch_1.safetensors").touch()  # the recorded best file is there
    ck.on_after_load_checkpoint(
        _snap("after_load_checkpoint", checkpoint=tmp_path / "epoch_1.safetensors")
    )
    with pytest.warns(UserWarning) as said:
        out = ck.on_after_val_epoch(_snap("after_val_epoch", epoch=2, metrics={"accuracy": 0.5}))
    msg = str(said[0].message)
    assert str(tmp_path / "epoch_1.safetensors") in msg
    assert "followed 'loss'" in msg and "no 'loss' (keys: ['accuracy'])" in msg
    assert ck.save_best == ["accuracy"] and ck.rules == ["greater"]  # its own rule, not 'loss''s
    assert ck.best == {"accuracy": {"score": 0.5, "path": "best_accuracy_epoch_2.safetensors"}}
    assert [s.path.name for s in out if isinstance(s, Save)] == [
        "best_accuracy_epoch_2.safetensors"
    ]
    with warnings.catch_warnings():  # later validations: no second warning
        warnings.simplefilter("error")
        ck.on_after_val_epoch(_snap("after_val_epoch", epoch=3, metrics={"accuracy": 0.4}))


def test_auto_key_from_a_checkpoint_the_validation_has_is_kept(tmp_path):
    ck = Checkpointer(1, save_best="auto", out_dir=tmp_path)
    ck.load_state_dict({"save_best": ["acc"],
                        "best": {"acc": {"score": 0.9, "path": "best_acc_epoch_1.safetensors"}}})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ck.on_after_val_epoch(_snap("after_val_epoch", epoch=2, metrics={"x": 0, "acc": 0.5}))
    assert out == [] and ck.save_best == ["acc"] and ck.best["acc"]["score"] == 0.9


def test_resume_with_another_evaluator_follows_its_first_key(tmp_path):
    """End to end: a run with save_best='auto' on 'acc', resumed with an evaluator giving 'top1'."""
    step = fe.train_step(ce_loss, optim.sgd(0.05))
    batches = mlp_batches(2)

    def run(values, **kw):
        val = fe.Val(batches[:1], [Scripted(values)])
        fe.fit(step.init(mlp(), seed=0), step, batches, val=val, work_dir=tmp_path,
               handlers=[Checkpointer(1, save_best="auto")], **kw)  # fmt: skip

    run([{"acc": 0.5}], max_epochs=1)
    with pytest.warns(
        UserWarning, match=r"epoch_1\.safetensors says save_best='auto' followed 'acc'"
    ):
        run([{"top1": 0.2}, {"top1": 0.3}], max_epochs=2, resume=True)
    best = sorted(p.name for p in tmp_path.glob("best_*.safetensors"))
    assert best == ["best_acc_epoch_1.safetensors", "best_top1_epoch_2.safetensors"]


# ----------------------------------------------------------------- 5. fit's arguments
def _fit_setup():
    step = fe.train_step(ce_loss, optim.sgd(0.05))
    return step.init(mlp(), seed=0), step, mlp_batches(2)


def test_fit_refuses_a_single_handler():
    state, step, batches = _fit_setup()
    with pytest.raises(
        TypeError, match=r"fit: handlers must be a list of handlers .*got a single Timer; wrap it"
    ):
        fe.fit(state, step, batches, max_steps=1, handlers=fe.handlers.Timer())


def test_fit_refuses_a_work_dir_that_is_a_file(tmp_path):
    state, step, batches = _fit_setup()
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(
        NotADirectoryError,
        match=rf"fit: work_dir='{re.escape(str(f))}' names a file; expected a directory",
    ):
        fe.fit(state, step, batches, max_steps=1, work_dir=f)
    with pytest.raises(
        NotADirectoryError,
        match=rf"work_dir='{re.escape(str(f / 'sub'))}' names a file \(its parent {re.escape(str(f))} is not",
    ):
        fe.fit(state, step, batches, max_steps=1, work_dir=f / "sub")
    assert f.read_text() == "x"


def _saved_at(path: Path, batch_in_epoch: int, meta: dict) -> Path:
    state, _, _ = _fit_setup()
    checkpoint.save(path, state.replace(batch_in_epoch=batch_in_epoch), meta)
    return path


@pytest.mark.parametrize(
    ("meta", "whose"),
    [({"run": {"batches_per_epoch": 2, "world_size": 1}}, "as its run record says"),
     ({}, "as this run's data has")],
)  # fmt: skip
def test_resume_refuses_a_batch_in_epoch_past_the_epoch(tmp_path, meta, whose):
    path = _saved_at(tmp_path / "c.safetensors", 10**9, meta)
    state, step, batches = _fit_setup()
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"{re.escape(str(path))}: its position batch_in_epoch=1000000000 is past the end of an epoch of 2 "
        rf"batches \({whose}\)",
    ):
        fe.fit(state, step, batches, max_epochs=3, handlers=[], resume=path)
    assert not state.is_donated and state.step == 0  # refused before the file is read into it


def test_resume_at_the_epoch_end_is_accepted(tmp_path):
    """batch_in_epoch == batches per epoch: a checkpoint of the epoch's last update (iteration-based)."""
    path = _saved_at(
        tmp_path / "c.safetensors", 2, {"run": {"batches_per_epoch": 2, "world_size": 1}}
    )
    state, step, batches = _fit_setup()
    final = fe.fit(state, step, batches, max_epochs=2, handlers=[], resume=path)
    assert (final.epoch, final.batch_in_epoch, final.step) == (2, 0, 2)


def test_resume_counts_batch_in_epoch_in_batches_under_accumulation(tmp_path):
    """With accumulate(2) over 4 batches an epoch is 2 updates but batch_in_epoch runs to 4."""
    step = fe.train_step(ce_loss, optim.sgd(0.05), fe.accumulate(2))
    batches = mlp_batches(4)
    state = step.init(mlp(), seed=0)
    fe.fit(state, step, batches, max_steps=2, work_dir=tmp_path, handlers=[
        Checkpointer(1, by_epoch=False)])  # fmt: skip
    saved = checkpoint.read_meta(tmp_path / "iter_2.safetensors")
    assert (saved["step"], saved["batch_in_epoch"]) == (2, 4)  # the epoch's end, in batches
    final = fe.fit(step.init(mlp(), seed=0), step, batches, max_steps=3, handlers=[],
                   resume=tmp_path / "iter_2.safetensors")  # fmt: skip
    assert (final.step, final.epoch) == (3, 1)
    assert torch.isfinite(next(iter(final.params.values()))).all()


# ----------------------------------------------------------------- snapshots (contract hunt)
def test_a_handler_cannot_change_the_metrics_the_next_handlers_see():
    from torch import nn

    seen = []

    class Edits(fe.handlers.Handler):
        priority = 0

        def on_after_train_iter(self, snap):
            snap.metrics["loss"] = torch.tensor(123.0)

    class Reads(fe.handlers.Handler):
        priority = 100

        def on_after_train_iter(self, snap):
            seen.append(float(snap.metrics["loss"]))

    step = fe.train_step(lambda model, b: model(b).square().mean(), fe.optim.sgd(0.1))
    torch.manual_seed(0)
    state = step.init(nn.Linear(3, 1), seed=0)
    with pytest.raises(TypeError, match="does not support item assignment"):
        fe.fit(state, step, [torch.ones(2, 3)], max_steps=1, handlers=[Edits(), Reads()])
    assert seen == []


def test_a_handler_priority_must_not_be_a_bool():
    with pytest.raises(ValueError, match="priority must be an int in 0..100 .*got True"):
        fe.handlers.Handler(priority=True)
