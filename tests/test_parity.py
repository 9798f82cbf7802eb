"""MMEngine parity of the loop: default checkpoints, an EMA added on resume, MMEngine-numbered
counters for ported hooks, the run seed, validation under autocast, dynamic validation intervals,
extra hook points for custom loops (MMEngine 0.10.7 as the oracle where it runs)."""

from __future__ import annotations

import logging
import types

import pytest
import torch
from helpers import ce_loss, mlp, mlp_batches, mmengine_hook_calls

import fengine as fe
from fengine import checkpoint, optim
from fengine.events import Dispatcher


def _step(*wrappers):
    return fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), *wrappers)


# ----------------------------------------------------------------- default checkpoints
def test_default_handlers_checkpoint_like_mmengine(tmp_path):
    """MMEngine's default CheckpointHook (interval=1): every epoch; an iteration-based run gets its one
    'epoch' at the end. resume=True then continues instead of silently starting over."""
    step = _step()
    fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=2, work_dir=tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").glob("*.safetensors")) == [
        "epoch_1.safetensors",
        "epoch_2.safetensors",
    ]
    fe.fit(step.init(mlp()), step, mlp_batches(3), max_steps=5, work_dir=tmp_path / "i")
    assert sorted(p.name for p in (tmp_path / "i").glob("*.safetensors")) == ["iter_5.safetensors"]
    resumed = fe.fit(
        step.init(mlp()), step, mlp_batches(3), max_steps=7, work_dir=tmp_path / "i", resume=True
    )
    assert resumed.step == 7 and checkpoint.latest(tmp_path / "i").name == "iter_7.safetensors"


# ----------------------------------------------------------------- an EMA added when resuming
def test_adding_ema_on_resume_starts_it_from_the_loaded_weights(tmp_path, caplog):
    """MMEngine's EMAHook on a checkpoint without EMA state warns and starts the EMA from the loaded
    weights; only wrapper state may be missing, anything else is still a mismatch error."""
    plain = _step()
    saved = fe.fit(plain.init(mlp()), plain, mlp_batches(3), max_epochs=2, work_dir=tmp_path,
                   handlers=[fe.handlers.Checkpointer(1)])  # fmt: skip
    with_ema = _step(ema := fe.ema(momentum=0.5))
    with caplog.at_level(logging.WARNING, logger="fengine"):
        resumed = fe.fit(with_ema.init(mlp()), with_ema, mlp_batches(3), max_epochs=2, work_dir=tmp_path,
                         resume=True, handlers=[])  # fmt: skip
    assert "has no state for ['ema']; starting it from the loaded weights" in caplog.text
    assert resumed.step == saved.step
    for n, t in ema.params(resumed).items():
        assert torch.equal(t, saved.params[n])  # the loaded weights: nothing trained since
    bigger = _step()
    with pytest.raises(checkpoint.CheckpointMismatchError):
        fe.fit(bigger.init(torch.nn.Sequential(mlp(), torch.nn.Linear(10, 2))), bigger, mlp_batches(3),
               max_epochs=3, work_dir=tmp_path, resume=True, handlers=[])  # fmt: skip


# ----------------------------------------------------------------- MMEngine-numbered counters
def test_runner_epoch_and_iter_match_a_real_mmengine_runner(tmp_path):
    stages = ("before_train_epoch", "before_train_iter", "after_train_iter", "after_train_epoch")
    calls = [
        c
        for c in mmengine_hook_calls(
            tmp_path,
            dict(by_epoch=True, max_epochs=2),
            lambda s, runner, k: (s, runner.epoch, runner.iter),
            validate=False,
        )
        if c[0] in stages
    ]
    ours = []
    handlers = [
        fe.on(s)(lambda snap: ours.append((snap.event, snap.runner_epoch, snap.runner_iter)))
        for s in stages
    ]
    step = _step()
    fe.fit(step.init(mlp()), step, mlp_batches(3), max_epochs=2, handlers=handlers)
    assert ours == calls


# ----------------------------------------------------------------- the run seed
def test_seed_everything_makes_weight_init_reproducible_and_draws_and_logs_a_seed(caplog):
    import random

    import numpy as np

    fe.seed_everything(7)
    a = torch.nn.Linear(4, 3)
    fe.seed_everything(7)
    b = torch.nn.Linear(4, 3)
    assert torch.equal(a.weight, b.weight)
    fe.seed_everything(3)
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    fe.seed_everything(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
    with caplog.at_level(logging.INFO, logger="fengine"):
        drawn = fe.seed_everything(None)
    assert f"drew {drawn}" in caplog.text
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        fe.seed_everything(-1)


# ----------------------------------------------------------------- validation under autocast
def test_validation_under_autocast():
    seen = []

    def eval_fn(model, batch):
        out = model(batch[0])
        seen.append(out.dtype)
        return out.float()

    step = _step()
    val = fe.Val(mlp_batches(1), [fe.metrics.Accuracy()], eval_fn=eval_fn, autocast="bfloat16")
    fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, val=val, handlers=[])
    assert seen == [torch.bfloat16]
    with pytest.raises(ValueError, match="autocast must be None, 'float16' or 'bfloat16'"):
        fe.evaluate(
            step.init(mlp()), eval_fn, mlp_batches(1), [fe.metrics.Accuracy()], autocast="fp8"
        )


# ----------------------------------------------------------------- dynamic validation intervals
@pytest.mark.parametrize("dynamic", [[(3, 2)], [(2, 3), (7, 1)]])
def test_dynamic_intervals_match_mmengine_loop(dynamic):
    from mmengine.runner.loops import EpochBasedTrainLoop

    class FakeLoader(list):
        dataset = None

    at, loop = [], None
    runner = types.SimpleNamespace(
        optim_wrapper=None, logger=types.SimpleNamespace(info=lambda m: None)
    )
    runner.call_hook = lambda name, **kw: None
    runner.model = types.SimpleNamespace(train=lambda: None, train_step=lambda *a, **k: {})
    runner.val_loop = types.SimpleNamespace(run=lambda: at.append(loop.epoch))
    loop = EpochBasedTrainLoop(
        runner, FakeLoader([0]), max_epochs=9, val_interval=1, dynamic_intervals=dynamic
    )
    loop.run()
    ours = []
    step = _step()
    val = fe.Val(mlp_batches(1), [fe.metrics.Accuracy()], interval=1, dynamic_intervals=dynamic)
    fe.fit(step.init(mlp()), step, mlp_batches(1), max_epochs=9, val=val,
           handlers=[fe.on("after_val_epoch")(lambda snap: ours.append(snap.epoch))])  # fmt: skip
    assert ours == at and len(at) < 9


# ----------------------------------------------------------------- hook points for custom loops
def test_a_custom_loop_may_fire_its_own_events():
    got = []

    class SwapHook(fe.Handler):
        def on_after_swap(self, snap):
            got.append(snap.event)

    dispatch = Dispatcher([SwapHook()], extra_events=["after_swap"])
    state = _step().init(mlp())
    dispatch("after_swap", state, fe.RunInfo(None, True, 1, 1, 1, 1, 1, 0))
    assert got == ["after_swap"]
    with pytest.raises(ValueError, match=r"defines \['on_after_swap'\], which are not events"):
        Dispatcher([SwapHook()])
