"""Failure injection (hunt 25): a process-group SIGTERM with loader workers, a refused rewind, and
loader workers kept alive by a failed `fit`'s error."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import ce_loss, mlp, mlp_batches
from torch.nn import functional as F

import fengine as fe
from fengine import checkpoint, optim
from fengine.data import Loader
from fengine.handlers import Checkpointer
from fengine.metrics import MeanLoss


ROOT = Path(__file__).resolve().parents[1]

# A run whose process group gets SIGTERM while the main process waits for batch 6: the worker
# loading it sends the signal to the group (as SLURM, systemd or `kill -TERM -- -pgid` do), then
# finishes the batch if it is still alive. The workers of a fengine Loader and of a plain
# DataLoader die, and the fetch fails. Both runs must stop with a preemption checkpoint.
_GROUP_SIGTERM = """
    import os, signal, sys, time
    import torch
    import fengine as fe
    from fengine import optim
    from fengine.data import Loader
    from torch.nn import functional as F

    class Signalling(torch.utils.data.Dataset):
        def __init__(self, marker):
            self.marker = marker
        def __len__(self):
            return 64
        def __getitem__(self, i):
            if i == 24 and not os.path.exists(self.marker):  # batch 6
                open(self.marker, "w").close()
                time.sleep(1.0)  # the main process is waiting for this batch by now
                os.killpg(os.getpgid(0), signal.SIGTERM)
                time.sleep(0.3)
            return torch.full((16,), float(i)), i % 10

    work = sys.argv[1]
    for kind in ("loader", "plain"):
        ds = Signalling(f"{work}/{kind}.marker")
        if kind == "loader":
            data = Loader(ds, batch_size=4, seed=0, shuffle=False, num_workers=2)
        else:
            data = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        torch.manual_seed(0)
        step = fe.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), optim.sgd(0.1))
        state = step.init(torch.nn.Linear(16, 10), seed=0)
        try:
            fe.fit(state, step, data, max_steps=100, work_dir=f"{work}/{kind}", handlers=[])
            print(kind, "finished")
        except fe.Preempted as e:
            print(kind, "Preempted", e.exit_code, e.state.step, e.checkpoint.name,
                  type(e.__context__).__name__, str(e.__context__)[:40])
        except BaseException as e:
            print(kind, "failed", type(e).__name__, str(e)[:200])
    # a persistent-workers iterator alive at exit: the exit ends its workers
    keep = iter(Loader(ds, batch_size=4, seed=0, num_workers=2, persistent_workers=True).epoch(0))
    next(keep)
    print("exiting", flush=True)
"""


@pytest.mark.slow
def test_group_sigterm_with_loader_workers_saves_a_preemption_checkpoint(tmp_path):
    """The whole process group gets SIGTERM (workers too): the workers of a fengine Loader and
    of a plain DataLoader die, the failed fetch is taken as the preemption (the worker error as
    context), and the state before it is saved."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_GROUP_SIGTERM), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the signal reaches no one else
    )  # fmt: skip
    try:
        out, err = child.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        pytest.fail(f"the child hung: {out}\n{err[-2000:]}")
    assert child.returncode == 0, err[-2000:]
    lines = out.splitlines()
    # the workers died: the fetch of batch 6 failed, the state after 6 updates is saved
    for line, kind in zip(lines, ("loader", "plain")):
        assert line.startswith(f"{kind} Preempted 143 6 step_6.safetensors RuntimeError"), (
            line + err[-2000:]
        )
    assert lines[2] == "exiting"
    for kind in ("loader", "plain"):
        assert checkpoint.read_meta(tmp_path / kind / "step_6.safetensors")["step"] == 6


class _DyingWorkers:
    """Batches that fail at batch ``at`` as a DataLoader whose workers a group signal killed:
    SIGTERM (``signalled``) reaches this process, then the fetch raises."""

    def __init__(self, at: int, signalled: bool = True):
        self.batches, self.at, self.signalled = mlp_batches(8), at, signalled

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.at:
                if self.signalled:
                    os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly")
            yield batch


def test_a_failed_fetch_after_sigterm_is_the_preemption_at_the_last_moment(tmp_path):
    """SIGTERM, then the next batch fails: `Preempted` (the fetch error its context) with the state
    of the last step boundary, saved at its moment (after that step's validation here), and a
    resume continues from it without validating again."""
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    val = fe.Val(mlp_batches(2, seed=9), [MeanLoss()], eval_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), interval=3)  # fmt: skip
    with pytest.raises(fe.Preempted) as info:
        fe.fit(step.init(mlp(), seed=0), step, _DyingWorkers(at=3), max_steps=8, val=val,
               work_dir=tmp_path, handlers=[])  # fmt: skip
    e = info.value
    assert (e.exit_code, e.state.step, e.checkpoint) == (143, 3, tmp_path / "step_3.safetensors")
    assert isinstance(e.__context__, RuntimeError)
    assert "exited unexpectedly" in str(e.__context__)
    meta = checkpoint.read_meta(tmp_path / "step_3.safetensors")
    assert (meta["step"], meta["meta"]["moment"]) == (3, "after_val")


def test_a_failed_fetch_without_a_signal_is_the_error(tmp_path):
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    with pytest.raises(RuntimeError, match="exited unexpectedly") as info:
        fe.fit(step.init(mlp(), seed=0), step, _DyingWorkers(at=3, signalled=False),
               max_steps=8, work_dir=tmp_path, handlers=[])  # fmt: skip
    assert not isinstance(info.value, fe.Preempted)
    assert not list(tmp_path.glob("step_*"))


def _rewound_run(work: Path) -> tuple[fe.Step, list]:
    """A run of 16 steps with iter_4 ... iter_16 in ``work``."""
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    batches = mlp_batches(4)
    fe.fit(step.init(mlp(), seed=0), step, batches, max_steps=16, work_dir=work,
           handlers=[Checkpointer(4, by_epoch=False)])  # fmt: skip
    return step, batches


def _listing(work: Path) -> tuple[list[str], str]:
    names = sorted(p.name for p in work.iterdir() if p.name != ".fengine.lock")
    return names, (work / "last_checkpoint").read_text().strip()


def test_a_refused_rewind_moves_nothing_aside(tmp_path):
    """`fit(resume=iter_8)` refused (a model of another width; a horizon before the file's step)
    leaves iter_12 and iter_16 where they were and the pointer on iter_16; an accepted rewind
    still sets them aside."""
    step, batches = _rewound_run(tmp_path)
    before = _listing(tmp_path)
    assert before == (["iter_12.safetensors", "iter_16.safetensors", "iter_4.safetensors",
                       "iter_8.safetensors", "last_checkpoint"], "iter_16.safetensors")  # fmt: skip
    rewind = tmp_path / "iter_8.safetensors"
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="iter_8.safetensors"):
        fe.fit(step.init(wider, seed=0), step, batches, max_steps=16, work_dir=tmp_path,
               handlers=[Checkpointer(4, by_epoch=False)], resume=rewind)  # fmt: skip
    assert _listing(tmp_path) == before
    with pytest.raises(ValueError, match=r"at step 8 .* past this run's horizon \(max_steps=6\)"):
        fe.fit(step.init(mlp(), seed=0), step, batches, max_steps=6, work_dir=tmp_path,
               handlers=[Checkpointer(4, by_epoch=False)], resume=rewind)  # fmt: skip
    assert _listing(tmp_path) == before
    # the plain resume still continues from the newest checkpoint
    done = fe.fit(step.init(mlp(), seed=0), step, batches, max_steps=20, work_dir=tmp_path,
                  handlers=[Checkpointer(4, by_epoch=False)], resume=True)  # fmt: skip
    assert done.step == 20
    # an accepted rewind sets the later ones aside, as before
    fe.fit(step.init(mlp(), seed=0), step, batches, max_steps=16, work_dir=tmp_path,
           handlers=[Checkpointer(4, by_epoch=False)], resume=rewind)  # fmt: skip
    (aside,) = tmp_path.glob("abandoned_after_step_8.*")
    assert sorted(p.name for p in aside.iterdir()) == [
        "iter_12.safetensors", "iter_16.safetensors", "iter_20.safetensors"]  # fmt: skip


class _Boom(Exception):
    pass


def _workers_left(before: set[int], wait: float = 3.0) -> list[int]:
    """This process's children not in ``before``, once they had ``wait`` seconds to end."""
    deadline = time.monotonic() + wait
    while True:
        left = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["handler", "step"])
def test_a_failed_fit_whose_error_is_kept_leaves_no_loader_workers(where):
    """A handler's error (the batch generator paused in fit) or the step's (raised inside it):
    with the error kept (``e.fengine_state``), the Loader's two workers still end."""
    before = {p.pid for p in multiprocessing.active_children()}
    data = Loader(torch.utils.data.TensorDataset(torch.randn(64, 16), torch.arange(64) % 10),
                          batch_size=4, seed=0, num_workers=2)  # fmt: skip

    def loss(model, batch):
        if where == "step" and getattr(loss, "calls", 0) == 2:
            raise _Boom("in the step")
        loss.calls = getattr(loss, "calls", 0) + 1  # type: ignore[attr-defined]
        return ce_loss(model, batch)

    @fe.on("after_train_iter", once=2)
    def boom(snap):
        raise _Boom("in a handler")

    step = fe.train_step(loss, optim.sgd(0.1), donate=False)
    kept = []
    try:
        fe.fit(step.init(mlp(), seed=0), step, data, max_steps=10,
               handlers=[boom] if where == "handler" else [])  # fmt: skip
    except _Boom as e:
        kept.append(e)
    assert kept and kept[0].fengine_state.step == 2
    assert _workers_left(before) == []
