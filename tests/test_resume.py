"""Resume is exact: a run interrupted at step k and resumed equals the straight run, bit for bit."""

from __future__ import annotations

import base64
import logging
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from resume_experiment import SaveAtEnd, experiment

import fengine as fe
from fengine import checkpoint, optim
from fengine.replay import state_digest


HERE = Path(__file__).parent
N = 30  # 100 samples / batch 8 = 13 batches per epoch


def _assert_states_equal(a: fe.TrainState, b: fe.TrainState) -> None:
    la, lb = pytree.tree_flatten_with_path(a)[0], pytree.tree_flatten_with_path(b)[0]
    assert [pytree.keystr(p) for p, _ in la] == [pytree.keystr(p) for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        assert same, f"{pytree.keystr(path)} differs"


def _straight(variant: str) -> fe.TrainState:
    state, step, data = experiment(variant)
    return fe.fit(state, step, data, max_steps=N, handlers=[])


@pytest.mark.parametrize(
    "variant,k",
    [
        ("plain", 7),  # mid-epoch
        ("plain", 13),  # exactly at an epoch boundary (13 batches per epoch)
        (
            "accumulate",
            2,
        ),  # k=3 groups: an epoch is 5 updates (4 of 3 batches + 1 of 1); stop mid-epoch
        ("accumulate", 5),  # ... and at the end of the first epoch, after a short group
        ("fp16_ema", 9),  # loss scaler and EMA in the state
        ("workers2", 11),  # augmentation drawn in 2 DataLoader workers
    ],
)
def test_interrupted_and_resumed_equals_straight(tmp_path, variant, k):
    straight = _straight(variant)
    state, step, data = experiment(variant)
    first = fe.fit(state, step, data, max_steps=k, work_dir=tmp_path, handlers=[SaveAtEnd()])
    assert first.step == k
    assert checkpoint.latest(tmp_path).name == f"end_{k}.safetensors"
    state, step, data = experiment(variant)  # a new process would rebuild everything from scratch
    resumed = fe.fit(state, step, data, max_steps=N, work_dir=tmp_path, resume=True, handlers=[])
    assert resumed.step == N
    _assert_states_equal(resumed, straight)


@pytest.mark.parametrize("donate", [True, False])
def test_resume_reads_into_a_donating_steps_state_and_leaves_a_copying_ones(tmp_path, donate):
    """A donating step's initial state is consumed by the resume (the file is read into its
    tensors: one copy of the state in memory); with donate=False it stays as it was. Both runs
    equal the straight one."""
    straight = _straight("plain")
    state, step, data = experiment("plain")
    fe.fit(state, step, data, max_steps=7, work_dir=tmp_path, handlers=[SaveAtEnd()])
    state, step, data = experiment("plain")
    step.donate = donate
    before = state.params["0.weight"]
    kept = before.clone()
    resumed = fe.fit(state, step, data, max_steps=N, work_dir=tmp_path, resume=True, handlers=[])
    _assert_states_equal(resumed, straight)
    assert state.is_donated == donate
    if donate:
        assert resumed.params["0.weight"] is before  # trained on in the memory it was read into
    else:
        assert torch.equal(state.params["0.weight"], kept)


def test_workers_do_not_change_the_batches():
    a = _straight("plain")
    b = _straight("workers2")
    _assert_states_equal(a, b)


def test_epoch_based_resume_at_epoch_boundary_and_mid_epoch(tmp_path):
    state, step, data = experiment("plain")
    straight = fe.fit(state, step, data, max_epochs=3, handlers=[])
    state, step, data = experiment("plain")
    fe.fit(
        state, step, data, max_steps=20, work_dir=tmp_path, handlers=[SaveAtEnd()]
    )  # mid-epoch 2
    state, step, data = experiment("plain")
    resumed = fe.fit(state, step, data, max_epochs=3, work_dir=tmp_path, resume=True, handlers=[])
    assert (resumed.epoch, resumed.batch_in_epoch, resumed.step) == (3, 0, 39)
    _assert_states_equal(resumed, straight)


def test_resume_true_without_checkpoint_starts_from_scratch(tmp_path):
    state, step, data = experiment("plain")
    resumed = fe.fit(state, step, data, max_steps=3, work_dir=tmp_path, resume=True, handlers=[])
    assert resumed.step == 3


def test_resume_true_needs_work_dir():
    state, step, data = experiment("plain")
    with pytest.raises(ValueError, match="pass work_dir"):
        fe.fit(state, step, data, max_steps=3, resume=True, handlers=[])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_step_boundary_then_exits_and_resume_is_exact(tmp_path, sig):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    cmd = [
        sys.executable,
        str(HERE / "resume_experiment.py"),
        str(tmp_path),
        str(N),
        "--sleep",
        "0.05",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= 4:
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    saved = checkpoint.latest(tmp_path)
    assert saved is not None and saved.name.startswith("step_")
    stopped_at = checkpoint.read_meta(saved)  # the file is complete and readable
    assert stopped_at is not None
    done = subprocess.run(cmd[:-2], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    digest = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("digest")][0]
    assert digest == state_digest(_straight("plain"))


def _recraft_meta(src: Path, dst: Path, edit) -> None:
    """Copy a checkpoint with its run metadata edited and the header digest recomputed: a crafted
    file that passes every digest check."""
    import json

    from fengine.checkpoint._format import encode_header, header_digest, read_header

    h = read_header(src)
    md, table = dict(h.metadata), json.loads(json.dumps(h.table))
    meta = json.loads(md["fengine.meta"])
    edit(meta)
    md["fengine.meta"] = json.dumps(meta)
    md["fengine.header_digest"] = header_digest(table, md)
    dst.write_bytes(encode_header(table, md) + src.read_bytes()[h.data_start :])


def _set_handler_field(handler, key, value):
    return lambda meta: meta["handlers"][handler].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["handlers"].__setitem__("early_stopping", [1]), "state is a list"),
        (_set_handler_field("early_stopping", "wait_count", "x"), "wait_count must be an int"),
        (lambda m: m["handlers"]["early_stopping"].pop("wait_count"), "wait_count must be an int"),
        (_set_handler_field("early_stopping", "best_score", None), "best_score must be a number"),
        (_set_handler_field("checkpointer", "save_best", "acc"), "checkpointer"),
        (lambda m: m.__setitem__("run", [1]), "its run record is a list"),
    ],
)
def test_crafted_handler_state_is_one_checkpoint_error_naming_the_file(tmp_path, edit, match):
    """Before: raw AttributeError/KeyError/TypeError naming neither file nor field, and a run
    record that was not a dict read as world size 1."""

    def handlers():
        return [
            fe.handlers.Checkpointer(2, by_epoch=False),
            fe.handlers.EarlyStopping("accuracy", patience=5),
        ]

    state, step, data = experiment("plain")
    val = fe.Val([b for _, b in zip(range(2), data.epoch(0))], [fe.metrics.Accuracy()], interval=2)
    fe.fit(state, step, data, max_steps=4, val=val, handlers=handlers(), work_dir=tmp_path / "a")
    crafted = tmp_path / "crafted.safetensors"
    _recraft_meta(tmp_path / "a" / "iter_4.safetensors", crafted, edit)
    state, step, data = experiment("plain")
    with pytest.raises(checkpoint.CheckpointError, match=match) as e:
        fe.fit(state, step, data, max_steps=6, val=val, handlers=handlers(),
               work_dir=tmp_path / "b", resume=crafted)  # fmt: skip
    assert str(e.value).startswith(f"{crafted}: ")
    assert not state.is_donated  # refused before the file was read into the given state


# ----------------------------------------------------------------- a plain DataLoader's generators
class _Noisy(torch.utils.data.Dataset):
    """Per-sample randomness from a global generator: torch's (torchvision's random transforms),
    numpy's (mmcv's) or Python's ``random`` (albumentations')."""

    def __init__(self, x, y, source="torch"):
        self.x, self.y, self.source = x, y, source

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        d = self.x.shape[1]
        if self.source == "numpy":
            noise = torch.from_numpy(np.random.randn(d).astype(np.float32))
        elif self.source == "random":
            noise = torch.tensor([random.gauss(0.0, 1.0) for _ in range(d)])
        else:
            noise = torch.randn(d)
        return self.x[i] + 0.1 * noise, self.y[i]


def _dataloader_run(
    work_dir, *, resume=False, generator=False, workers=0, max_steps=13, kind="shuffle"
):
    """fit over a shuffling DataLoader, as a fresh process would run it (the global generator
    seeded, then the model built), validating over another DataLoader every 3 updates (each
    validation pass draws a base seed from the global generator). ``kind``: ``"noisy"`` draws in
    ``__getitem__``, ``"replacement"`` samples with replacement (lazy chunks of draws)."""
    from helpers import ce_loss, mlp
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    fe.seed_everything(0)
    model = mlp()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 16, generator=g), torch.randint(0, 4, (40,), generator=g)
    own = torch.Generator().manual_seed(1) if generator else None
    if kind == "replacement":
        sampler = RandomSampler(range(40), replacement=True, generator=own)
        train = DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler)
    else:
        source = kind.partition("noisy_")[2] or "torch"
        data = _Noisy(x, y, source) if kind.startswith("noisy") else TensorDataset(x, y)
        train = DataLoader(data, batch_size=8, shuffle=True, num_workers=workers, generator=own)
    val = fe.Val(DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8), [fe.metrics.Accuracy()],
                 interval=3)  # fmt: skip
    step = fe.train_step(ce_loss, optim.adamw(1e-2))
    handlers = [fe.handlers.Checkpointer(2, by_epoch=False)]
    out = fe.fit(step.init(model), step, train, max_steps=max_steps, val=val, handlers=handlers,
                 work_dir=work_dir, resume=resume)  # fmt: skip
    return state_digest(out)


@pytest.mark.parametrize(
    ("generator", "kind"),
    [
        (False, "shuffle"),
        (True, "shuffle"),
        (False, "noisy"),
        (False, "noisy_numpy"),
        (False, "noisy_random"),
        (True, "replacement"),
    ],
)
def test_a_shuffling_dataloader_resumes_bit_for_bit_from_every_checkpoint(
    tmp_path, generator, kind
):
    """Its order comes from torch generators (the global one, or its own): their states where each
    pass began and at the save travel in the checkpoint. Before, a resume past the first epoch
    drew another order, silently; and the generators were put back only after the checkpoint's
    batch had loaded, so its ``__getitem__`` and sampler draws were made twice. A dataset drawing
    from numpy's or Python's global generator (the main process loads: num_workers=0) resumed
    with other noise: their states travel too."""
    straight = _dataloader_run(tmp_path / "straight", generator=generator, kind=kind)
    for k in range(2, 13, 2):  # mid-pass (5 batches a pass), at pass ends, around validations
        ckpt = tmp_path / "straight" / f"iter_{k}.safetensors"
        got = _dataloader_run(tmp_path / f"from_{k}", resume=ckpt, generator=generator, kind=kind)
        assert got == straight, f"resumed from iter_{k}"


def test_persistent_workers_are_named_as_what_a_resume_cannot_restore(tmp_path, caplog):
    """Persistent workers keep their RNG in their processes (seeded at the first pass): a resume
    past that pass re-seeds them, so augmentation there differs. It is said, not silent."""
    from torch.utils.data import DataLoader, TensorDataset

    from fengine.data.loader_rng import persistent_workers_note

    data = TensorDataset(torch.randn(8, 16), torch.randint(0, 4, (8,)))
    assert persistent_workers_note(DataLoader(data, batch_size=4, num_workers=1)) is None
    loader = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
    step = fe.train_step(lambda m, b: m(b[0]).sum(), optim.sgd(0.1))
    with caplog.at_level(logging.WARNING, logger="fengine"):
        fe.fit(step.init(torch.nn.Linear(16, 2)), step, loader, max_steps=1, work_dir=tmp_path,
               handlers=[])  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "persistent_workers" in r.getMessage()]
    assert said == ["fit: " + persistent_workers_note(loader)]


@pytest.mark.slow
def test_a_shuffling_dataloader_with_workers_resumes_bit_for_bit(tmp_path):
    straight = _dataloader_run(tmp_path / "straight", workers=2, max_steps=8)
    got = _dataloader_run(tmp_path / "r", resume=tmp_path / "straight" / "iter_6.safetensors",
                          workers=2, max_steps=8)  # fmt: skip
    assert got == straight


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda r: r.__setitem__("pass_start", {"x": "AA=="}), r"records generators \['x'\]"),
        (lambda r: r["at_save"].__setitem__("torch", "not base64!"), r"at_save\['torch'\] must be"),
        (lambda r: r["at_save"].__setitem__("torch", "AAAA"), r"a 5056-byte generator state"),
        (  # the right size, but position 9999 of numpy's 624-word state
            lambda r: r["at_save"].__setitem__(
                "numpy", base64.b64encode(bytes(2496) + struct.pack("<iid", 9999, 0, 0.0)).decode()
            ),
            r"at_save\['numpy'\] is not a generator state",
        ),
        (
            lambda r: r["at_save"].__setitem__("random", "AAAA"),
            r"at_save\['random'\] must be the base64 of a 2509-byte generator state",
        ),
    ],
)
def test_a_crafted_dataloader_rng_record_is_a_checkpoint_error(tmp_path, edit, match):
    _dataloader_run(tmp_path / "a", max_steps=4)
    crafted = tmp_path / "crafted.safetensors"
    _recraft_meta(tmp_path / "a" / "iter_4.safetensors", crafted,
                  lambda meta: edit(meta["handlers"]["data_rng"]))  # fmt: skip
    with pytest.raises(checkpoint.CheckpointError, match=match):
        _dataloader_run(tmp_path / "b", resume=crafted, max_steps=6)


def test_a_dataloader_rng_record_from_before_numpy_and_random_resumes(tmp_path):
    """Checkpoints written before numpy's and Python's global states were carried hold torch's
    alone: they resume (those two go on from where they are), the same bits for a dataset that
    draws from torch only."""
    straight = _dataloader_run(tmp_path / "a", max_steps=6)
    old = tmp_path / "old.safetensors"

    def torch_only(meta):
        for when in ("pass_start", "at_save"):
            record = meta["handlers"]["data_rng"][when]
            assert set(record) == {"torch", "numpy", "random"}
            del record["numpy"], record["random"]

    _recraft_meta(tmp_path / "a" / "iter_4.safetensors", old, torch_only)
    assert _dataloader_run(tmp_path / "b", resume=old, max_steps=6) == straight


def test_a_checkpoint_from_before_base_lr_resumes_exactly(tmp_path):
    """ParamGroups.build's state now keeps base_lr (MMEngine logs it); a checkpoint saved in the
    layout before it (a plain PartitionState) still resumes, to the same bits as a new one."""
    from helpers import ce_loss, mlp, mlp_batches

    from fengine.optim.paramwise import without_base_lr

    def run(work_dir, resume=False):
        model = mlp()
        groups = optim.paramwise(
            model, lr=schedules_cosine(), custom_keys={"2.": dict(lr_mult=0.1)}
        )
        step = fe.train_step(ce_loss, groups.build(optim.sgd, momentum=0.9))
        return fe.fit(step.init(model), step, mlp_batches(4), max_steps=6, work_dir=work_dir,
                      handlers=[fe.handlers.Checkpointer(3, by_epoch=False)], resume=resume)  # fmt: skip

    def schedules_cosine():
        return fe.schedules.cosine(0.1, T_max=6)

    straight = run(tmp_path / "a")
    new = tmp_path / "a" / "iter_3.safetensors"
    model = mlp()
    groups = optim.paramwise(model, lr=schedules_cosine(), custom_keys={"2.": dict(lr_mult=0.1)})
    like = fe.train_step(ce_loss, groups.build(optim.sgd, momentum=0.9)).init(model)
    saved = checkpoint.load(new, like=like)
    assert "base_lr" in saved.opt_state._fields
    old = tmp_path / "old.safetensors"
    checkpoint.save(old, saved.replace(opt_state=without_base_lr(saved.opt_state)),
                    checkpoint.read_meta(new)["meta"])  # fmt: skip
    with pytest.raises(checkpoint.CheckpointMismatchError, match="base_lr"):
        checkpoint.load(old, like=like)  # the layout differs: what fit's resume handles
    assert state_digest(run(tmp_path / "b", resume=old)) == state_digest(straight)


def test_a_resume_past_the_horizon_is_refused_in_the_library_too(tmp_path):
    """fit(resume=...) from step 6 with max_steps=3 returned the step-6 state as this run's end,
    silently (README: "one past the given horizon is an error"; the CLI refused it already)."""
    from helpers import ce_loss, mlp, mlp_batches

    step = fe.train_step(ce_loss, optim.sgd(0.1))
    run = lambda **kw: fe.fit(step.init(mlp(), seed=0), step, mlp_batches(3), work_dir=tmp_path,  # noqa: E731
                              handlers=[fe.handlers.Checkpointer(3, by_epoch=False)], **kw)  # fmt: skip
    run(max_steps=6)
    with pytest.raises(ValueError, match=r"at step 6 \(epoch 1, batch 3\), past this run's "
                       r"horizon \(max_steps=3\)") as e:  # fmt: skip
        run(max_steps=3, resume=True)
    assert e.value.fengine_state.step == 6
    with pytest.raises(ValueError, match=r"past this run's horizon \(max_epochs=1\)"):
        run(max_epochs=1, resume=True)
    assert run(max_steps=6, resume=True).step == 6  # at the horizon: nothing left, no error
    assert run(max_epochs=2, resume=True).step == 6


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    lin = torch.nn.Linear
    return torch.nn.Sequential(lin(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), lin(8, 3))


@pytest.mark.parametrize(
    "saved,resumed,first_missing",
    [
        ({"update_buffers": False}, {"update_buffers": True}, "extra/ema/buffers/1.running_mean"),
        ({"params": "0"}, {}, "extra/ema/params/1.weight"),
    ],
)
def test_resuming_with_a_widened_ema_names_what_the_file_lacks(
    tmp_path, saved, resumed, first_missing
):
    """An EMA whose configuration changed (update_buffers=True added, params='0' widened to all)
    is not an EMA added to the run: it was the misleading 'the template has no step-wrapper state'
    of a second load without the EMA; the real cause was only in the chained traceback."""
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))] * 2
    first = fe.train_step(loss, optim.sgd(0.1), fe.ema(momentum=0.2, **saved))
    fe.fit(first.init(_bn_model()), first, data, max_epochs=1, work_dir=tmp_path,
           handlers=[fe.handlers.Checkpointer()])  # fmt: skip
    second = fe.train_step(loss, optim.sgd(0.1), fe.ema(momentum=0.2, **resumed))
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        fe.fit(second.init(_bn_model()), second, data, max_epochs=2, work_dir=tmp_path,
               resume=True, handlers=[])  # fmt: skip
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'epoch_1.safetensors'}: the checkpoint (step 2)")
    assert "missing in the file" in msg and f"    {first_missing}\n" in msg
    assert info.value.missing[0] == first_missing and not info.value.unexpected
    assert "the file's ema state has other entries than the template's" in msg
    assert "update_buffers= or params=" in msg and "template has none" not in msg
    assert info.value.__context__ is None  # not a second error chained onto the first
