"""Checkpointer (MMEngine's CheckpointHook): periodic / last / best / published checkpoints.

Oracles: MMEngine's own CheckpointHook (installed as a test oracle), driven by a fake
runner whose ``save_checkpoint`` writes empty files, and MMEngine's documented examples.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import types
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Scripted, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import checkpoint, optim
from fengine.events import RunInfo, Save, Snapshot
from fengine.handlers.checkpointer import Checkpointer, infer_rule, should_save


mm_hooks = pytest.importorskip("mmengine.hooks")


# ----------------------------------------------------------------- helpers
class Saved(fe.Handler):
    """Records the name of every checkpoint fit writes, in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def on_after_save_checkpoint(self, snap):
        self.names.append(Path(snap.checkpoint).name)


def _setup(n=2):
    tx = optim.sgd(0.05)
    step = fe.train_step(ce_loss, tx)
    return step.init(mlp(), seed=0), step, mlp_batches(n)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).glob("*.safetensors") if not p.name.startswith("."))


def _run(
    work_dir,
    ckpt,
    *,
    max_epochs=None,
    max_steps=None,
    values=None,
    val_interval=None,
    n=2,
    resume=False,
    state=None,
):
    st, step, batches = _setup(n)
    rec = Saved()
    val = None
    if values is not None:
        val = fe.Val(
            batches[:1],
            [values if isinstance(values, Scripted) else Scripted(values)],
            interval=val_interval,
        )
    final = fe.fit(
        state or st,
        step,
        batches,
        max_epochs=max_epochs,
        max_steps=max_steps,
        val=val,
        handlers=[ckpt, rec],
        work_dir=work_dir,
        resume=resume,
    )
    return final, rec.names


def _snap(
    event,
    *,
    epoch=0,
    step=0,
    max_epochs=10,
    max_steps=100,
    by_epoch=True,
    work_dir=None,
    metrics=None,
):
    run = RunInfo(
        work_dir=work_dir,
        by_epoch=by_epoch,
        max_epochs=max_epochs if by_epoch else None,
        max_steps=max_steps,
        steps_per_epoch=1,
        batches_per_epoch=1,
        micro_batches=1,
        start_step=0,
    )
    state = types.SimpleNamespace(epoch=epoch, step=step)
    return Snapshot(event, state, run, metrics=metrics or {})


# ----------------------------------------------------------------- MMEngine oracle
def _mm_run(tmp, hook_kw, *, max_epochs=None, max_iters=None, values=None, val_every=1, spe=2):
    """Drive MMEngine's CheckpointHook through MMEngine's loop order with a fake runner.

    Returns (names saved in order, remaining files, last_checkpoint target), with '.pth' -> '.safetensors'.
    """
    from mmengine.logging import MessageHub

    work_dir = Path(tmp) / "mm_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    saved = []

    def save_checkpoint(out_dir, filename, *args, **kw):
        Path(out_dir, filename).write_bytes(b"")
        saved.append(filename)

    quiet = types.SimpleNamespace(info=lambda m: None, warning=lambda m: None)
    runner = types.SimpleNamespace(
        work_dir=str(work_dir),
        logger=quiet,
        save_checkpoint=save_checkpoint,
        message_hub=MessageHub.get_instance(f"ckpt-oracle-{uuid.uuid4().hex}"),
        epoch=0,
        iter=0,
        max_epochs=max_epochs,
        max_iters=max_iters if max_iters is not None else max_epochs * spe,
    )
    hook = mm_hooks.CheckpointHook(**hook_kw)
    hook.before_train(runner)
    it = iter(values or [])

    def validate():
        v = next(it)
        hook.after_val_epoch(runner, dict(v) if isinstance(v, dict) else {"acc": v})

    if max_epochs is not None:  # EpochBasedTrainLoop: after_train_epoch, epoch += 1, then val
        for e in range(max_epochs):
            runner.epoch, runner.iter = e, (e + 1) * spe - 1
            for b in range(spe):
                runner.iter = e * spe + b
                hook.after_train_iter(runner, b)
                runner.iter += 1
            hook.after_train_epoch(runner)
            runner.epoch = e + 1
            if values is not None and ((e + 1) % val_every == 0 or e + 1 == max_epochs):
                validate()
    else:  # IterBasedTrainLoop: after_train_iter, iter += 1, then val
        for i in range(max_iters):
            runner.iter = i
            hook.after_train_iter(runner, i)
            runner.iter = i + 1
            if values is not None and ((i + 1) % val_every == 0 or i + 1 == max_iters):
                validate()
    out = Path(hook.out_dir)
    fix = lambda s: s.replace(".pth", ".safetensors")  # noqa: E731
    remaining = sorted(fix(p.name) for p in out.glob("*.pth"))
    last = (
        (work_dir / "last_checkpoint").read_text()
        if (work_dir / "last_checkpoint").exists()
        else None
    )
    return [fix(s) for s in saved], remaining, (fix(Path(last).name) if last else None)


def _mm_kw(kw):
    kw = dict(kw)
    kw["filename_tmpl"] = kw.get(
        "filename_tmpl", "epoch_{}.pth" if kw.get("by_epoch", True) else "iter_{}.pth"
    )
    return kw


ORACLE_CASES = [
    # (checkpointer kwargs, fit kwargs, scripted validation values or None, validate every)
    (dict(interval=5, max_keep_ckpts=2), dict(max_epochs=20), None, 1),  # the documented example
    (dict(interval=2, save_begin=5), dict(max_epochs=10), None, 1),  # "5, 7, 9" + 10 by save_last
    (dict(interval=2, save_begin=5, save_last=False), dict(max_epochs=10), None, 1),
    (dict(interval=3), dict(max_epochs=7), None, 1),
    (
        dict(interval=1, max_keep_ckpts=2, save_best="acc"),
        dict(max_epochs=6),
        [0.1, 0.5, 0.3, 0.7, 0.7, 0.2],
        1,
    ),
    (
        dict(interval=2, max_keep_ckpts=1, save_best=["acc", "loss"]),
        dict(max_epochs=6),
        [{"acc": 0.1, "loss": 3.0}, {"acc": 0.4, "loss": 3.5}, {"acc": 0.3, "loss": 2.0}],
        2,
    ),
    (
        dict(interval=4, by_epoch=False, max_keep_ckpts=2, save_best="loss"),
        dict(max_steps=14),
        [{"loss": v} for v in (0.9, 0.5, 0.7, 0.4)],
        4,
    ),
    (
        dict(interval=3, by_epoch=False),
        dict(max_epochs=4),
        None,
        1,
    ),  # iteration interval in an epoch run
]


@pytest.mark.parametrize("ckpt_kw,fit_kw,values,every", ORACLE_CASES)
def test_matches_mmengine_checkpoint_hook(tmp_path, ckpt_kw, fit_kw, values, every):
    names_mm, remaining_mm, last_mm = _mm_run(
        tmp_path / "mm",
        _mm_kw(ckpt_kw),
        max_epochs=fit_kw.get("max_epochs"),
        max_iters=fit_kw.get("max_steps"),
        values=values,
        val_every=every,
    )
    work = tmp_path / "fe"
    _, names = _run(work, Checkpointer(**ckpt_kw), values=values, val_interval=every, **fit_kw)
    assert names == names_mm
    assert _files(work) == remaining_mm
    assert checkpoint.latest(work).name == last_mm


def test_documented_max_keep_example(tmp_path):
    """MMEngine docs: 20 epochs, interval=5, max_keep_ckpts=2 -> epoch_15 and epoch_20 remain."""
    _, names = _run(tmp_path, Checkpointer(interval=5, max_keep_ckpts=2), max_epochs=20, n=1)
    assert names == [f"epoch_{e}.safetensors" for e in (5, 10, 15, 20)]
    assert _files(tmp_path) == ["epoch_15.safetensors", "epoch_20.safetensors"]
    assert checkpoint.latest(tmp_path) == tmp_path / "epoch_20.safetensors"


def test_resave_only_when_a_periodic_checkpoint_of_that_step_exists(tmp_path):
    """Deliberate difference: MMEngine writes epoch_3 after a best at epoch 3 even off-interval."""
    kw = dict(interval=2, save_best="acc")
    values = [0.1, 0.2, 0.3, 0.4]
    names_mm, _, _ = _mm_run(tmp_path / "mm", _mm_kw(kw), max_epochs=4, values=values)
    _, names = _run(tmp_path / "fe", Checkpointer(**kw), max_epochs=4, values=values)
    assert names_mm[4:6] == [
        "best_acc_epoch_3.safetensors",
        "epoch_3.safetensors",
    ]  # off-interval periodic file
    assert names == names_mm[:5] + names_mm[6:]
    assert _files(tmp_path / "fe") == [
        "best_acc_epoch_4.safetensors",
        "epoch_2.safetensors",
        "epoch_4.safetensors",
    ]


# ----------------------------------------------------------------- predicate
class _Runner(types.SimpleNamespace):
    pass


@pytest.mark.parametrize("by_epoch", [True, False])
def test_predicate_grid_vs_mmengine(by_epoch):
    last = 12
    for interval, begin, save_last in itertools.product(
        (-1, 1, 2, 3, 5), (0, 1, 3, 5), (True, False)
    ):
        hook = mm_hooks.CheckpointHook(
            interval=interval, by_epoch=by_epoch, save_begin=begin, save_last=save_last
        )
        got = []
        hook._save_checkpoint = lambda r, got=got: got.append(
            r.epoch + 1 if by_epoch else r.iter + 1
        )
        runner = _Runner(
            logger=types.SimpleNamespace(info=lambda m: None), max_epochs=last, max_iters=last
        )
        for i in range(last):
            runner.epoch = runner.iter = i
            (hook.after_train_epoch(runner) if by_epoch else hook.after_train_iter(runner, i))
        mine = [
            n
            for n in range(1, last + 1)
            if should_save(n, interval=interval, save_begin=begin, last=last, save_last=save_last)
        ]
        assert mine == got, (interval, begin, save_last)
        # the handler itself, on hand-built snapshots
        ck = Checkpointer(
            interval,
            by_epoch=by_epoch,
            save_begin=begin,
            save_last=save_last,
            out_dir="/nonexistent",
        )
        event = "after_train_epoch" if by_epoch else "after_train_iter"
        method = getattr(ck, "on_" + event)
        requested = []
        for n in range(1, last + 1):
            s = method(
                _snap(event, epoch=n, step=n, max_epochs=last, max_steps=last, by_epoch=by_epoch)
            )
            if s is not None:
                assert isinstance(s, Save) and s.latest
                assert s.path == Path("/nonexistent") / (
                    f"epoch_{n}.safetensors" if by_epoch else f"iter_{n}.safetensors"
                )
                requested.append(n)
        assert requested == got


def test_save_begin_doc_example_includes_last_epoch():
    got = [n for n in range(1, 11) if should_save(n, interval=2, save_begin=5, last=10)]
    assert got == [5, 7, 9, 10]
    assert [n for n in range(1, 11) if should_save(n, interval=1, save_begin=5, last=10)] == [
        5,
        6,
        7,
        8,
        9,
        10,
    ]


def test_rotation_is_data_the_handler_never_deletes(tmp_path):
    """The handler retires the oldest file with the new save; it deletes nothing itself (fit deletes
    after the new file is durable: MMEngine's delete-first order could leave no checkpoint)."""
    ck = Checkpointer(1, max_keep_ckpts=2, out_dir=tmp_path)
    for n in range(1, 5):
        signals = ck.on_after_train_epoch(_snap("after_train_epoch", epoch=n))
        signals = signals if isinstance(signals, list) else [signals]
        (save,) = [s for s in signals if isinstance(s, Save)]
        retired = [p for s in signals if isinstance(s, fe.Retire) for p in s.paths]
        assert save.path == tmp_path / f"epoch_{n}.safetensors" and save.latest
        assert retired == ([tmp_path / f"epoch_{n - 2}.safetensors"] if n > 2 else [])
        assert all(p.exists() for p in retired)  # still there: not the handler's to delete
        save.path.write_bytes(b"")  # what fit would write
    assert ck.state_dict()["kept"] == ["epoch_3.safetensors", "epoch_4.safetensors"]
    assert ck.state_dict()["retiring"] == ["epoch_2.safetensors"]
    assert ck._periodic(tmp_path, 4) == Save(
        tmp_path / "epoch_4.safetensors"
    )  # re-saving: no rotation


# ----------------------------------------------------------------- rule inference
RULE_KEYS = [
    "accuracy",
    "top-1",
    "ACC/accuracy",
    "val_loss",
    "mIoU",
    "FID",
    "acc",
    "Loss",
    "AR@100",
    "aAcc",
    "precision_recall",
    "lossy_acc",
    "bbox_mAP",
    "coco/bbox_mAP_50",
    "IS",
    "psnr",
]


@pytest.mark.parametrize("key", RULE_KEYS)
def test_rule_inference_vs_mmengine(key):
    try:
        expected = mm_hooks.CheckpointHook(save_best=key, rule=None).rules[0]
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(
            ValueError, match=f"cannot infer the rule for save_best key {key!r}.*rule="
        ):
            Checkpointer(save_best=key)
        with pytest.raises(ValueError):
            infer_rule(key)
    else:
        assert infer_rule(key) == expected
        assert Checkpointer(save_best=key).rules == [expected]


def test_rule_inference_with_custom_keys_vs_mmengine():
    for key, gk, lk in [
        ("psnr", ["psnr"], None),
        ("FID", None, ["fid"]),
        ("ssim_loss", ["ssim"], None),
    ]:
        expected = mm_hooks.CheckpointHook(save_best=key, greater_keys=gk, less_keys=lk).rules[0]
        assert Checkpointer(save_best=key, greater_keys=gk, less_keys=lk).rules == [expected]
    assert Checkpointer(save_best=["FID", "IS"], rule=["less", "greater"]).rules == [
        "less",
        "greater",
    ]
    assert Checkpointer(save_best=["FID", "acc"], rule="less").rules == ["less", "less"]


# ----------------------------------------------------------------- best
def test_best_rotates_and_resaves_the_periodic_checkpoint(tmp_path, caplog):
    ck = Checkpointer(1, save_best="acc")
    with caplog.at_level(logging.INFO, logger="fengine"):
        _, names = _run(tmp_path, ck, max_epochs=4, values=[0.5, 0.9, 0.6, 0.95])
    assert names == [
        "epoch_1.safetensors",
        "best_acc_epoch_1.safetensors",
        "epoch_1.safetensors",
        "epoch_2.safetensors",
        "best_acc_epoch_2.safetensors",
        "epoch_2.safetensors",
        "epoch_3.safetensors",
        "epoch_4.safetensors",
        "best_acc_epoch_4.safetensors",
        "epoch_4.safetensors",
    ]
    assert [f for f in _files(tmp_path) if f.startswith("best")] == ["best_acc_epoch_4.safetensors"]
    # the re-saved periodic checkpoint carries the current best; the best file is not the latest
    meta = checkpoint.read_meta(tmp_path / "epoch_2.safetensors")["meta"]["handlers"][
        "checkpointer"
    ]
    assert meta["best"] == {"acc": {"score": 0.9, "path": "best_acc_epoch_2.safetensors"}}
    assert checkpoint.latest(tmp_path) == tmp_path / "epoch_4.safetensors"
    text = caplog.text
    assert "Saving checkpoint at 1 epochs" in text
    assert (
        "The best checkpoint with 0.9000 acc at 2 epoch is saved to best_acc_epoch_2.safetensors."
        in text
    )
    assert (
        f"The previous best checkpoint {tmp_path / 'best_acc_epoch_2.safetensors'} is removed"
        in text
    )
    # the best checkpoint holds that epoch's state
    best = checkpoint.read_meta(tmp_path / "best_acc_epoch_4.safetensors")
    assert best["epoch"] == 4 and best["step"] == 8


def test_auto_takes_the_first_key_of_the_first_validation(tmp_path):
    values = [{"top1": 0.2, "loss": 1.0}, {"loss": 0.1, "top1": 0.5}, {"top1": 0.3, "loss": 0.01}]
    ck = Checkpointer(1, save_best="auto")
    _run(tmp_path, ck, max_epochs=3, values=values)
    assert ck.save_best == ["top1"] and ck.rules == ["greater"]
    assert [f for f in _files(tmp_path) if f.startswith("best")] == [
        "best_top1_epoch_2.safetensors"
    ]


def test_auto_with_a_key_that_needs_a_rule(tmp_path):
    with pytest.raises(ValueError, match="'FID'"):
        _run(
            tmp_path / "a",
            Checkpointer(1, save_best="auto"),
            max_epochs=2,
            values=[{"FID": 3.0}] * 2,
        )
    ck = Checkpointer(1, save_best="auto", rule="less")
    _run(tmp_path / "b", ck, max_epochs=3, values=[{"FID": 3.0}, {"FID": 2.0}, {"FID": 2.5}])
    assert [f for f in _files(tmp_path / "b") if f.startswith("best")] == [
        "best_FID_epoch_2.safetensors"
    ]


def test_numpy_scores_compare_as_numbers(tmp_path):
    """A metric computed with numpy gives np.float32 / np.int64 / 1-element arrays: MMEngine's
    CheckpointHook compares them with ``>``; so does the Checkpointer (it refused them)."""
    values = [{"acc": np.float32(0.2)}, {"acc": np.array([0.5])}, {"acc": np.int64(0)}]
    ck = Checkpointer(1, save_best="acc")
    _run(tmp_path, ck, max_epochs=3, values=values)
    assert [f for f in _files(tmp_path) if f.startswith("best")] == ["best_acc_epoch_2.safetensors"]
    with pytest.raises(
        TypeError, match=r"'acc' is a ndarray of shape \(2,\); save_best needs a scalar"
    ):
        _run(tmp_path / "b", Checkpointer(1, save_best="acc"), max_epochs=1,
             values=[{"acc": np.zeros(2)}])  # fmt: skip


def test_best_key_with_slash_and_accuracy_metric(tmp_path):
    """A real metric with a prefix: 'ACC/accuracy' -> best_ACC_accuracy_epoch_N."""
    st, step, batches = _setup(4)
    val = fe.Val(batches[:2], [fe.metrics.Accuracy(prefix="ACC")])
    ck = Checkpointer(1, save_best="ACC/accuracy")
    fe.fit(st, step, batches, max_epochs=3, val=val, handlers=[ck], work_dir=tmp_path)
    best = [f for f in _files(tmp_path) if f.startswith("best")]
    assert len(best) == 1 and best[0].startswith("best_ACC_accuracy_epoch_")
    assert ck.best["ACC/accuracy"]["path"] == best[0]


def test_missing_key_and_empty_metrics():
    ck = Checkpointer(1, save_best="acc", out_dir="/nonexistent")
    with pytest.raises(KeyError, match=r"'acc'.*available keys: \['top1', 'loss'\]"):
        ck.on_after_val_epoch(_snap("after_val_epoch", epoch=1, metrics={"top1": 1.0, "loss": 2.0}))
    with pytest.warns(UserWarning, match="empty"):
        assert ck.on_after_val_epoch(_snap("after_val_epoch", epoch=1, metrics={})) is None
    assert ck.best == {}


def test_best_survives_resume(tmp_path):
    ck = Checkpointer(1, save_best="acc")
    st, _ = _run(tmp_path, ck, max_epochs=3, values=[0.5, 0.9, 0.6])
    assert [f for f in _files(tmp_path) if f.startswith("best")] == ["best_acc_epoch_2.safetensors"]
    ck2 = Checkpointer(1, save_best="acc")
    # epoch_3 was saved before epoch 3's validation, so the resumed run repeats it first (0.6), as the
    # straight run did; 0.7 is below the restored best 0.9 (a fresh handler would save it); 0.95 replaces it
    _run(tmp_path, ck2, max_epochs=5, values=[0.6, 0.7, 0.95], resume=True)
    assert [f for f in _files(tmp_path) if f.startswith("best")] == ["best_acc_epoch_5.safetensors"]
    assert ck2.best["acc"]["score"] == 0.95


def test_auto_key_survives_resume(tmp_path):
    _run(
        tmp_path,
        Checkpointer(1, save_best="auto"),
        max_epochs=2,
        values=[{"acc": 0.5, "x_loss": 1.0}] * 2,
    )
    ck = Checkpointer(1, save_best="auto")
    # epoch 2's validation is repeated first (its checkpoint was written before it), then epoch 3's
    _run(
        tmp_path,
        ck,
        max_epochs=3,
        values=[{"acc": 0.5, "x_loss": 1.0}, {"x_loss": 0.5, "acc": 0.6}],
        resume=True,
    )
    assert ck.save_best == ["acc"]
    assert [f for f in _files(tmp_path) if f.startswith("best")] == ["best_acc_epoch_3.safetensors"]


# ----------------------------------------------------------------- max_keep across resume, out_dir, latest
def _loader_setup():
    ds = fe.data.synthetic_classification(48, num_features=16, num_classes=4, seed=0)
    loader = fe.data.Loader(ds, batch_size=16, seed=0)
    tx = optim.sgd(0.05)
    step = fe.train_step(ce_loss, tx)
    return step.init(mlp(), seed=0), step, loader


def test_max_keep_counts_across_resume(tmp_path):
    st, step, loader = _loader_setup()
    fe.fit(
        st,
        step,
        loader,
        max_epochs=3,
        handlers=[Checkpointer(1, max_keep_ckpts=2)],
        work_dir=tmp_path,
    )
    assert _files(tmp_path) == ["epoch_2.safetensors", "epoch_3.safetensors"]
    st, step, loader = _loader_setup()
    final = fe.fit(
        st,
        step,
        loader,
        max_epochs=6,
        handlers=[Checkpointer(1, max_keep_ckpts=2)],
        work_dir=tmp_path,
        resume=True,
    )
    assert final.epoch == 6
    assert _files(tmp_path) == ["epoch_5.safetensors", "epoch_6.safetensors"]
    assert checkpoint.latest(tmp_path) == tmp_path / "epoch_6.safetensors"


def test_lowered_max_keep_is_trimmed_on_resume(tmp_path):
    _run(tmp_path, Checkpointer(1, max_keep_ckpts=3), max_epochs=3)
    assert _files(tmp_path) == ["epoch_1.safetensors", "epoch_2.safetensors", "epoch_3.safetensors"]
    _run(tmp_path, Checkpointer(1, max_keep_ckpts=1), max_epochs=4, resume=True)
    assert _files(tmp_path) == ["epoch_4.safetensors"]


def test_out_dir_gets_the_work_dir_name(tmp_path):
    work = tmp_path / "runs" / "exp1"
    _run(work, Checkpointer(1, out_dir=tmp_path / "store", max_keep_ckpts=1), max_epochs=2)
    assert _files(tmp_path / "store" / "exp1") == ["epoch_2.safetensors"]
    assert _files(work) == []
    store = tmp_path / "store" / "exp1"
    # the pointer in the work dir names a file outside it: followed only into the save dir given
    assert checkpoint.latest(work, save_dir=store) == (store / "epoch_2.safetensors").resolve()
    final, _ = _run(
        work,
        Checkpointer(1, out_dir=tmp_path / "store", max_keep_ckpts=1),
        max_epochs=3,
        resume=True,
    )
    assert final.epoch == 3 and _files(store) == ["epoch_3.safetensors"]  # resumed from the out_dir
    # out_dir equal to work_dir is used as is (MMEngine)
    assert Checkpointer(out_dir=work).directory(RunInfo(work, True, 1, 1, 1, 1, 1, 0)) == work


def test_an_out_dir_is_locked_cleaned_and_a_fresh_run_over_checkpoints_is_named(tmp_path, caplog):
    """``out_dir / basename(work_dir)`` (MMEngine's rule) is shared by two work dirs of one name:
    a run saving there holds its lock (another run is refused, not interleaved), removes the temp
    files of killed saves there, and a fresh run over checkpoints says it replaces them."""
    import subprocess
    import sys
    import textwrap

    store = tmp_path / "store"
    _run(tmp_path / "a" / "exp", Checkpointer(1, out_dir=store), max_epochs=1)
    saves = store / "exp"
    stale = saves / ".epoch_2.safetensors.999999.0123abcd.tmp"  # a save killed midway
    stale.write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="fengine"):
        _run(tmp_path / "b" / "exp", Checkpointer(1, out_dir=store), max_epochs=1)
    assert not stale.exists()
    said = [r.getMessage() for r in caplog.records if "already holds" in r.getMessage()]
    assert (
        len(said) == 1 and f"{saves} already holds 1 checkpoint(s) (epoch_1.safetensors)" in said[0]
    )
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fengine.workdir import lock_work_dir
        with lock_work_dir({str(saves)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(fe.WorkDirLocked, match=f"work dir {saves} is in use by another run"):
            _run(tmp_path / "c" / "exp", Checkpointer(1, out_dir=store), max_epochs=1)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_needs_a_directory():
    st, step, batches = _setup()
    with pytest.raises(ValueError, match="work_dir=.*out_dir="):
        fe.fit(st, step, batches, max_epochs=1, handlers=[Checkpointer()])


def test_by_epoch_in_an_iteration_based_run_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="by_epoch=False"):
        _run(tmp_path, Checkpointer(5), max_steps=10)


# ----------------------------------------------------------------- by iteration, templates
def test_iteration_interval_naming_and_log(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fengine"):
        _, names = _run(tmp_path, Checkpointer(4, by_epoch=False), max_steps=10, n=3)
    assert names == ["iter_4.safetensors", "iter_8.safetensors", "iter_10.safetensors"]
    assert checkpoint.read_meta(tmp_path / "iter_8.safetensors")["step"] == 8
    assert "Saving checkpoint at 4 iterations" in caplog.text
    assert checkpoint.latest(tmp_path) == tmp_path / "iter_10.safetensors"


def test_filename_template(tmp_path):
    _, names = _run(
        tmp_path,
        Checkpointer(1, filename_tmpl="ckpt_{:03d}.safetensors", save_best="acc"),
        max_epochs=2,
        values=[0.1, 0.2],
    )
    assert _files(tmp_path) == [
        "best_acc_ckpt_002.safetensors",
        "ckpt_001.safetensors",
        "ckpt_002.safetensors",
    ]


@pytest.mark.parametrize(
    "tmpl",
    ["ckpts/iter_{}.safetensors", "../iter_{}.safetensors", "..{}", ".iter_{}.safetensors"],
)
def test_filename_tmpl_must_be_a_plain_name(tmpl):
    """Resume reads back only plain names: a template with a directory part (or '..') would save
    files (even outside the work dir) that can never be resumed, so it is refused at once."""
    with pytest.raises(ValueError, match=r"filename_tmpl=.*plain file name.*pass out_dir="):
        Checkpointer(filename_tmpl=tmpl)


class OwnSave(fe.Handler):
    """A user's handler saving its own checkpoint into the work dir at step 2."""

    def on_after_train_iter(self, snap):
        if snap.step == 2:
            return Save(snap.run.work_dir / "mine_2.safetensors", latest=False)
        return None


def test_a_checkpointer_retires_only_its_own_files_and_preemption_ones(tmp_path):
    """max_keep_ckpts counts this handler's periodic files and `fit`'s ``step_N``, never another
    Checkpointer's best file or a user handler's own save into the same directory."""
    periodic = Checkpointer(1, by_epoch=False, max_keep_ckpts=2)
    keeper = Checkpointer(
        -1, by_epoch=False, save_last=False, save_best="acc", max_keep_ckpts=1, name="best_keeper"
    )
    st, step, batches = _setup(4)
    val = fe.Val(batches[:1], [Scripted([0.9] + [0.1] * 20)], interval=1)
    fe.fit(st, step, batches, max_steps=8, val=val, handlers=[periodic, keeper, OwnSave()],
           work_dir=tmp_path)  # fmt: skip
    assert _files(tmp_path) == [
        "best_acc_iter_1.safetensors",
        "iter_7.safetensors",
        "iter_8.safetensors",
        "mine_2.safetensors",
    ]
    assert periodic.kept == ["iter_7.safetensors", "iter_8.safetensors"] and keeper.kept == []
    # fit's preemption checkpoint counts (its save events say the signal); a handler's own save
    # under the same name does not (it was taken for one, and retired later)
    ck = Checkpointer(1, by_epoch=False, max_keep_ckpts=1)
    snap = _snap("before_save_checkpoint", step=5, by_epoch=False, work_dir=tmp_path)
    own = snap._replace(checkpoint=tmp_path / "step_5.safetensors")
    assert ck.on_before_save_checkpoint(own) is None and ck.kept == []
    ck.on_before_save_checkpoint(own._replace(metrics={"stop": "SIGTERM"}))
    assert ck.kept == ["step_5.safetensors"]


def test_interval_minus_one_saves_only_the_last(tmp_path):
    _, names = _run(tmp_path, Checkpointer(-1), max_epochs=3)
    assert names == ["epoch_3.safetensors"]


# ----------------------------------------------------------------- published
def test_published_last_and_best(tmp_path):
    ck = Checkpointer(1, save_best="acc", published=True, max_keep_ckpts=1)
    final, _ = _run(tmp_path, ck, max_epochs=3, values=[0.5, 0.9, 0.6])
    files = _files(tmp_path)
    pub = [f for f in files if "-" in f]
    assert len(pub) == 2
    for stem, src in (
        ("epoch_3-", "epoch_3.safetensors"),
        ("best_acc_epoch_2-", "best_acc_epoch_2.safetensors"),
    ):
        (name,) = [f for f in pub if f.startswith(stem)]
        path = tmp_path / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
        assert name == f"{stem}{digest}.safetensors"
        from safetensors.torch import load_file

        weights = load_file(path)
        full = checkpoint.load(tmp_path / src, like=final)
        assert sorted(weights) == sorted({**full.params, **full.buffers})
        for k, v in full.params.items():
            assert torch.equal(weights[k], v.detach())
        assert checkpoint.read_meta(path)["kind"] == "params"
    # published files are not training checkpoints: latest still names the periodic one
    assert checkpoint.latest(tmp_path) == tmp_path / "epoch_3.safetensors"


@pytest.mark.parametrize("which", ["auto", "live"])
def test_published_ema_weights(tmp_path, which):
    tx = optim.sgd(0.05)
    step = fe.train_step(ce_loss, tx, fe.ema(0.5))
    st = step.init(mlp(), seed=0)
    final = fe.fit(
        st,
        step,
        mlp_batches(2),
        max_epochs=2,
        work_dir=tmp_path,
        handlers=[Checkpointer(1, published=True, published_params=which)],
    )
    (name,) = [f for f in _files(tmp_path) if f.startswith("epoch_2-")]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / name)
    full = checkpoint.load(tmp_path / "epoch_2.safetensors", like=final)
    want = full.extra["ema"].params if which == "auto" else full.params
    assert not torch.equal(full.extra["ema"].params["0.weight"], full.params["0.weight"])
    for k, v in want.items():
        assert torch.equal(weights[k], v.detach()), k


def test_validation_returns_all_its_saves_in_order(tmp_path):
    """One best per improved key, then the re-save of that step's periodic checkpoint, in one list."""
    ck = Checkpointer(2, save_best=["acc", "loss"], out_dir=tmp_path)
    assert ck.on_after_train_epoch(_snap("after_train_epoch", epoch=2)) == Save(
        tmp_path / "epoch_2.safetensors"
    )
    saves = ck.on_after_val_epoch(
        _snap("after_val_epoch", epoch=2, metrics={"acc": 0.5, "loss": 1.0})
    )
    assert saves == [
        Save(tmp_path / "best_acc_epoch_2.safetensors", latest=False),
        Save(tmp_path / "best_loss_epoch_2.safetensors", latest=False),
        Save(tmp_path / "epoch_2.safetensors", latest=True),
    ]
    # epoch 3 has no periodic checkpoint: only the improved key's best file
    assert ck.on_after_train_epoch(_snap("after_train_epoch", epoch=3)) is None
    saves = ck.on_after_val_epoch(
        _snap("after_val_epoch", epoch=3, metrics={"acc": 0.4, "loss": 0.5})
    )
    assert saves == [
        Save(tmp_path / "best_loss_epoch_3.safetensors", latest=False),
        fe.Retire(
            (tmp_path / "best_loss_epoch_2.safetensors",)
        ),  # deleted by fit once the new one is durable
    ]
    assert (
        ck.on_after_val_epoch(_snap("after_val_epoch", epoch=3, metrics={"acc": 0.4, "loss": 0.5}))
        == []
    )


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(interval=0), ValueError, "interval"),
        (dict(interval=-2), ValueError, "interval"),
        (dict(interval=1.5), TypeError, "interval"),
        (dict(save_begin=-1), ValueError, "save_begin"),
        (dict(max_keep_ckpts=0), ValueError, "max_keep_ckpts"),
        (dict(filename_tmpl="epoch.safetensors"), ValueError, "filename_tmpl"),
        (dict(filename_tmpl="epoch_{}_{}.safetensors"), ValueError, "filename_tmpl"),
        (dict(filename_tmpl="epoch_{x}.safetensors"), ValueError, "filename_tmpl"),
        (dict(filename_tmpl="epoch_{"), ValueError, "filename_tmpl"),
        # MMEngine's habit: resume without a pointer and a rewind's setting aside missed them
        (
            dict(filename_tmpl="epoch_{}.pth"),
            ValueError,
            "a checkpoint's name ends in '.safetensors'",
        ),
        (dict(save_best="acc", rule="bigger"), ValueError, "rule"),
        (dict(save_best=["acc", "top"], rule=["greater", "less", "less"]), ValueError, "rule"),
        (dict(save_best=["acc", "acc"]), ValueError, "save_best.*more than once"),
        (dict(save_best=["auto", "auto"]), ValueError, "save_best.*auto"),
        (dict(save_best=["auto", "acc"]), ValueError, "auto"),
        (dict(save_best=""), ValueError, "save_best"),
        (dict(save_best=3), TypeError, "save_best"),
        (dict(rule="greater"), ValueError, "rule.*save_best"),
        (dict(save_last=False, published=True), ValueError, "published"),
        (dict(save_best="FID"), ValueError, "FID"),
    ],
)
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        Checkpointer(**kw)


def test_handler_contract():
    ck = Checkpointer()
    assert ck.priority == fe.Priority.VERY_LOW
    assert Checkpointer(priority="LOW").priority == fe.Priority.LOW
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fe.events.Dispatcher([ck])  # only real event names


def test_a_preempted_run_publishes_nothing_until_its_real_end(tmp_path):
    """SIGTERM fired after_train, and the Checkpointer published its stale last (epoch_1, not the
    step_4 state just saved) and best in the grace period; those copies stayed beside the real
    ones after the resumed run ended. A straight run's files are the reference."""
    import os
    import signal

    from torch.nn import functional as F

    from fengine.metrics import MeanLoss

    @fe.on("after_train_iter", once=4)
    def sigterm(snap):
        os.kill(os.getpid(), signal.SIGTERM)

    def run(work, extra=(), resume=False):
        step = fe.train_step(ce_loss, optim.sgd(0.2, momentum=0.9))
        val = fe.Val(mlp_batches(2, seed=9), [MeanLoss()],
                     eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))  # fmt: skip
        ck = Checkpointer(1, max_keep_ckpts=2, save_best="loss", rule="less", published=True)
        return fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), max_epochs=4, val=val,
                      handlers=[ck, *extra], work_dir=work, resume=resume)  # fmt: skip

    def published(work):
        return sorted(p.name.split("-")[0] for p in work.glob("*-*.safetensors"))

    run(tmp_path / "straight")
    with pytest.raises(fe.Preempted):
        run(tmp_path / "w", [sigterm])
    assert published(tmp_path / "w") == []
    run(tmp_path / "w", resume=True)
    assert published(tmp_path / "w") == published(tmp_path / "straight")
    assert len(published(tmp_path / "w")) == 2  # the last and the best, once each
