"""Replay's rules, on a tiny recipe run in this process (tests/replay_recipe.py): segments,
paths relative to the work dir, removed checkpoints, the run log's damage, the recorded
environment, and which recipe replay agrees to run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import replay_recipe
import torch

import fengine as fe
from fengine import checkpoint
from fengine.replay import ReplayError, read_log, replay, state_digest


ROOT = Path(__file__).resolve().parent.parent
RECIPE = Path(replay_recipe.__file__).resolve()


def _replay(work, **kw) -> tuple[bool, str]:
    lines: list[str] = []
    ok = replay(work, out=lines.append, **kw)
    return ok, "\n".join(lines)


def _records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "run_log.jsonl").read_text().splitlines()]


def _rewrite(work: Path, edit) -> None:
    records = [edit(r) or r for r in _records(work)]
    (work / "run_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run12(tmp_path):
    """12 steps (10 per epoch), checkpoints at 5, 10, 12."""
    work = tmp_path / "w"
    replay_recipe.run(work, max_steps=12)
    return work


def test_a_resume_with_a_longer_horizon_is_a_second_segment_and_replays_ok(run12, tmp_path):
    resumed = replay_recipe.run(run12, max_steps=25, resume=True)
    first, second = read_log(run12)
    assert first.record["config"] == second.record["config"]  # no resume flag, no horizon in it
    assert "resume" not in first.record["config"] and "max_steps" not in first.record["config"]
    assert (first.horizon["total_steps"], second.horizon["total_steps"]) == (12, 25)
    assert second.start == (12, 1, 2) and second.record["resumed_from"] == "iter_12.safetensors"
    # the resume rebuilt the cosine from the new total: a straight 25-step run computes other bits,
    # so replay must rebuild each segment with its own horizon
    straight = replay_recipe.run(tmp_path / "straight", max_steps=25)
    assert state_digest(straight) != state_digest(resumed)
    ok, out = _replay(run12)
    assert ok, out
    assert "segment 1: steps 0-12, max_steps 12" in out
    assert "segment 2: steps 12-25, max_steps 25, resumed from iter_12.safetensors" in out
    assert "(same as segment 1)" in out and out.endswith("REPLAY OK")


def test_a_resume_from_an_earlier_checkpoint_with_another_lr_replays_the_path_taken(run12):
    abandoned = {
        n: (run12 / n).read_bytes() for n in ("iter_10.safetensors", "iter_12.safetensors")
    }
    replay_recipe.run(run12, max_steps=18, resume_from=str(run12 / "iter_5.safetensors"), lr=0.01)
    # the abandoned path's checkpoints were moved aside, not replaced (iter_10 was overwritten)
    (aside,) = run12.glob("abandoned_after_step_5.*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == abandoned
    assert (run12 / "iter_10.safetensors").read_bytes() != abandoned["iter_10.safetensors"]
    ok, out = _replay(run12)
    assert ok, out
    assert "segment 1: steps 0-5" in out and "segment 2: steps 5-18" in out
    assert "differs from segment 1 in lr" in out
    rows = [line.split() for line in out.splitlines() if line.endswith(" yes")]
    assert [int(r[0]) for r in rows] == [0, 3, 5, 6, 9, 10, 12, 15, 18]
    # steps 6-12 of the rows are segment 2's: segment 1's abandoned 10 and 12 are not compared
    seg1 = {r["digest"] for r in read_log(run12)[0].digests if r["step"] > 5}
    assert not seg1 & {r["digest"] for r in read_log(run12)[1].digests}


def test_from_offers_only_existing_files_and_to_a_removed_one_compares_its_digest(tmp_path):
    work = tmp_path / "w"
    replay_recipe.run(work, max_steps=15, keep=2)
    replay_recipe.run(work, max_steps=20, keep=2, resume=True)  # iter_15 recorded three times
    assert sorted(p.name for p in work.glob("iter_*")) == [
        "iter_15.safetensors",
        "iter_20.safetensors",
    ]
    with pytest.raises(ReplayError, match=r"no checkpoint file of step 5 .*one of \[15\] "):
        replay(work, start=5, out=lambda s: None)
    ok, out = _replay(work, start=15)
    assert ok and "from step 15 to step 20" in out
    ok, out = _replay(work, to=10)
    assert ok, out
    assert "iter_10.safetensors is gone" in out and "compared with its recorded digest only" in out
    _rewrite(work, lambda r: r.update(digest="0" * 64) if r.get("step") == 10 else None)
    ok, out = _replay(work, to=10)
    assert not ok and "first differing digest at step 10" in out


def test_checkpoints_are_named_relative_to_the_work_dir_and_found_from_any_cwd(
    tmp_path, monkeypatch
):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    replay_recipe.run("w", max_steps=10)
    names = [r["checkpoint"] for r in _records(tmp_path / "a" / "w") if "checkpoint" in r]
    assert set(names) == {"iter_5.safetensors", "iter_10.safetensors"}
    copy = tmp_path / "b" / "w"
    shutil.copytree(tmp_path / "a" / "w", copy)
    monkeypatch.chdir(tmp_path)
    ok, out = _replay(copy, start=5)
    assert ok and f"checkpoint {copy / 'iter_10.safetensors'}: every tensor bitwise equal" in out
    data = bytearray((copy / "iter_10.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the copy's tensor data
    (copy / "iter_10.safetensors").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=str(copy / "iter_10.safetensors")):
        replay(copy, out=lambda s: None)
    ok, _ = _replay(tmp_path / "a" / "w")  # the original, from another cwd, is intact
    assert ok


def test_a_torn_last_line_is_skipped_and_a_bad_line_is_named(run12):
    log = run12 / "run_log.jsonl"
    n = len(log.read_text().splitlines())
    with log.open("a") as f:
        f.write('{"kind": "digest", "step": 13, "ep')  # kill -9 mid-write
    ok, out = _replay(run12)
    assert ok and f"warning: {log}:{n + 1}: skipping a torn last line" in out
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines[:2], "not json", *lines[2:-1]]) + "\n")
    with pytest.raises(ReplayError, match=rf"{log}:3 is not a JSON record"):
        replay(run12, out=lambda s: None)


def test_an_old_format_or_an_incomplete_record_is_named_with_its_line(run12):
    log = run12 / "run_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([json.dumps({"kind": "header", "config": {}}), *lines]) + "\n")
    with pytest.raises(ReplayError, match=rf"{log}:1 was written by an older fengine"):
        replay(run12, out=lambda s: None)
    digest = json.loads(lines[1])
    del digest["digest"]
    log.write_text("\n".join([lines[0], json.dumps(digest), *lines[2:]]) + "\n")
    with pytest.raises(ReplayError, match=rf"{log}:2 is not a valid run log record \(no digest\)"):
        replay(run12, out=lambda s: None)


def test_the_recorder_drops_a_torn_last_line_before_appending(run12, caplog):
    log = run12 / "run_log.jsonl"
    with log.open("a") as f:
        f.write('{"kind": "dig')
    replay_recipe.run(run12, max_steps=15, resume=True)
    assert f"{log}: dropping a torn last record (13 bytes)" in caplog.text
    assert all(json.loads(line) for line in log.read_text().splitlines())
    ok, out = _replay(run12)
    assert ok and "skipping a torn" not in out


def test_replay_uses_the_recorded_thread_count_unless_told_to_keep_its_own(tmp_path):
    torch.set_num_threads(1)
    replay_recipe.run(tmp_path / "w", max_steps=6)
    assert read_log(tmp_path / "w")[0].record["env"]["threads"] == 1
    torch.set_num_threads(2)
    ok, out = _replay(tmp_path / "w")
    assert ok, out
    assert (
        "note: the run was recorded with 1 thread, replaying with 2: bits depend on the thread count; using 1"
        in out
    )
    assert sys.modules["_fengine_replayed_recipe"].threads_seen == [
        1
    ]  # the replayed build ran with 1
    assert torch.get_num_threads() == 2  # and the process's own setting is back
    ok, out = _replay(tmp_path / "w", keep_settings=True)
    assert "keeping 2 (--keep-settings)" in out
    assert sys.modules["_fengine_replayed_recipe"].threads_seen == [2]


def test_progress_is_a_line_every_tenth(run12):
    replay_recipe.run(run12, max_steps=40, resume=True)
    ok, out = _replay(run12)
    progress = [line.split()[1] for line in out.splitlines() if line.startswith("  step ")]
    assert ok and progress == [f"{s}/40" for s in (4, 8, 12, 16, 20, 24, 28, 32, 36, 40)]


EVIL = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def _name_recipe(work: Path, script: Path) -> None:
    import hashlib

    sha = hashlib.sha256(script.read_bytes()).hexdigest()  # a self-reported hash proves nothing

    def edit(r):
        if r["kind"] == "segment":
            r["recipe"], r["code"]["recipe"] = str(script), sha

    _rewrite(work, edit)


def test_a_recipe_named_by_the_log_outside_the_project_is_not_run(run12, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    _name_recipe(run12, evil)
    with pytest.raises(
        ReplayError,
        match=rf"names the recipe {evil}, outside .* pass --recipe {evil} if you trust it",
    ):
        replay(run12, out=lambda s: None)
    inside = run12 / "evil.py"  # shipped inside the work dir, replayed from the work dir's parent
    inside.write_text(EVIL.format(marker=str(marker)))
    _name_recipe(run12, inside)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ReplayError, match="inside the work dir itself"):
        replay(run12, out=lambda s: None)
    assert not marker.exists()


def test_a_recipe_the_user_names_runs_and_must_match_the_recorded_hash(run12, tmp_path):
    copy = tmp_path / "elsewhere" / "recipe.py"
    copy.parent.mkdir()
    shutil.copy(RECIPE, copy)
    ok, out = _replay(run12, recipe=copy)
    assert ok and f"running recipe {copy}" in out
    copy.write_text(copy.read_text() + "\n# edited after the run\n")
    with pytest.raises(
        ReplayError, match=rf"the recipe {copy} differs from the one segment 1 recorded"
    ):
        replay(run12, recipe=copy, out=lambda s: None)
    ok, out = _replay(run12, recipe=copy, force=True)
    assert ok and f"warning: the recipe {copy} differs" in out


def test_a_run_with_reduce_on_plateau_is_refused_with_the_reason(tmp_path):
    """Its lr follows validation results, which replay does not re-run: refused, not a false alarm."""
    work = tmp_path / "w"
    replay_recipe.run(work, max_steps=6, plateau=True)
    with pytest.raises(ReplayError, match=r"reduce_on_plateau \(plateau\).*validation results"):
        replay(work, out=lambda line: None)


def _legs(*worlds: int):
    from fengine.replay.log import Segment
    from fengine.replay.run import Leg

    start = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    return [Leg(Segment(n, n, {"start": start, "env": {"world_size": w}}, []), None)
            for n, w in enumerate(worlds, 1)]  # fmt: skip


@pytest.mark.parametrize(
    ("worlds", "launched", "said"),
    [
        (
            (2,),
            1,
            "recorded with 2 processes (torchrun), and this replay runs 1: launch it as the run "
            "was, torchrun --nproc_per_node=2 -m fengine replay W",
        ),  # fmt: skip
        ((4,), 2, "torchrun --nproc_per_node=4 -m fengine replay W"),
        (
            (1,),
            2,
            "recorded in one process, and this replay was launched as 2 (torchrun): run "
            "python -m fengine replay W in one process",
        ),  # fmt: skip
        (
            (2, 1),
            1,
            "different numbers of processes (segment 1: 2, segment 2: 1); one replay runs "
            "one world size: no checkpoint file from segment 2 on, nor one before it,",
        ),  # fmt: skip
    ],
)
def test_replay_runs_as_many_processes_as_the_run(worlds, launched, said, monkeypatch):
    from fengine.replay.run import _check_world

    monkeypatch.setenv("WORLD_SIZE", str(launched))
    with pytest.raises(ReplayError) as e:
        _check_world(_legs(*worlds), "the run was", Path("W"))
    assert said in str(e.value)
    for ok in ((1,), (1, 1)) if launched == 1 else ((launched,),):
        _check_world(_legs(*ok), "the run was", Path("W"))  # the same world size: no error


def test_a_resume_from_an_abandoned_branch_replays_along_that_branch(run12):
    """Rewind to step 5 with another lr, then resume from the abandoned run's step 12 (moved aside):
    the third segment continues the first, whose step-12 state it loaded (by its digest), not the
    second, which also reached step 12 (it reported DIFFERS along the second's path)."""
    replay_recipe.run(run12, max_steps=12, resume_from=str(run12 / "iter_5.safetensors"), lr=0.01)
    (aside,) = run12.glob("abandoned_after_step_5.*")
    replay_recipe.run(run12, max_steps=18, resume_from=str(aside / "iter_12.safetensors"))
    ok, out = _replay(run12)
    assert ok, out
    assert "segment 1: steps 0-12" in out and "segment 3: steps 12-18" in out
    assert "segment 2" not in out


def test_replay_to_and_from_a_resume_that_added_an_ema(tmp_path):
    """The resume's digest includes the EMA it added: ``to`` that checkpoint compares the file the
    first segment wrote (it compared the resumed state's digest, DIFFERS), and ``from`` it loads the
    file as the resume did, starting the EMA from its weights (it failed: missing state)."""
    work = tmp_path / "w"
    replay_recipe.run(work, max_steps=10)
    replay_recipe.run(work, max_steps=15, ema=0.9, resume=True)
    for kw, shown in (({}, "from step 0 to step 15"), ({"to": 10}, "from step 0 to step 10"),
                      ({"start": 10}, "from step 10 to step 15")):  # fmt: skip
        ok, out = _replay(work, **kw)
        assert ok, out
        assert shown in out


def test_replay_from_a_file_saved_by_another_number_of_processes_converts_its_position(tmp_path):
    """As `fit` resumes a 2-process checkpoint in one process: batch b of the epoch becomes 2b."""
    from types import SimpleNamespace

    from fengine.replay.run import _load_start

    exp = replay_recipe.build(replay_recipe.Config(max_steps=10))
    saved = exp.state.replace(step=3, batch_in_epoch=3)
    path = checkpoint.save(tmp_path / "step_3.safetensors", saved,
                           {"run": {"world_size": 2, "batches_per_epoch": 5}})  # fmt: skip

    def at():  # a fresh state each load: it is read into the state's tensors, as fit resumes
        fresh = replay_recipe.build(replay_recipe.Config(max_steps=10))
        return SimpleNamespace(state=fresh.state, step=fresh.step)

    assert _load_start(path, at(), (3, 0, 6)).batch_in_epoch == 6
    with pytest.raises(ReplayError, match=r"batch 6 of epoch 0, but the run log records the resume "
                                          r"there at batch 3"):  # fmt: skip
        _load_start(path, at(), (3, 0, 3))


def test_a_resume_that_changed_accumulate_is_on_the_path(tmp_path):
    """An epoch run resumed with accumulate=2 plans fewer updates than it has done (its recorded
    total_steps is below its position): the next resume still continues it (it was refused as
    "a state no segment of the log produced")."""
    work = tmp_path / "w"
    replay_recipe.run(work, max_epochs=1)
    replay_recipe.run(work, max_epochs=2, accumulate=2, resume=True)
    replay_recipe.run(work, max_epochs=3, accumulate=2, resume=True)
    _, second, third = read_log(work)
    assert second.horizon["total_steps"] == 10 and third.start[0] == 15  # planned 10, ran to 15
    ok, out = _replay(work)
    assert ok, out
    assert "segment 3: steps 15-20" in out


@pytest.mark.parametrize(("horizon", "averages"), [({"max_epochs": 2}, 2), ({"max_steps": 7}, 3)])
def test_replay_averages_buffers_where_fit_does(horizon, averages, monkeypatch):
    """Under torchrun, `fit` averages the ranks' buffers at each epoch end and before an
    iteration-based validation (not again before an epoch-end one); replay does the same, once
    each (it averaged twice at an epoch end with a validation: over 3 ranks that changes bits)."""
    from types import SimpleNamespace

    from fengine import distributed
    from fengine.replay.log import Segment
    from fengine.replay.run import Leg, Progress, run_leg

    calls: list[int] = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "sync_buffers", lambda buffers: calls.append(1))
    exp = replay_recipe.build(replay_recipe.Config(**horizon))
    val = fe.Val(
        exp.train_data, [fe.metrics.Accuracy()], interval=3 if "max_steps" in horizon else 1
    )
    exp = SimpleNamespace(state=exp.state, step=exp.step, train_data=exp.train_data, val=val)
    p = fe.plan(exp.train_data, **horizon)
    total = {"max_epochs": None, "max_steps": None, **horizon, "total_steps": p.total_steps}
    leg = Leg(Segment(1, 1, {"start": {"step": 0, "epoch": 0, "batch_in_epoch": 0},
                             "horizon": total}, []), None)  # fmt: skip
    stop = (p.total_steps, 2, 0) if "max_epochs" in horizon else (7, 0, 7)
    run_leg(exp.state, exp, leg, stop, {}, Progress(lambda s: None, 0, p.total_steps, tty=False))
    assert len(calls) == averages


def test_state_digest_is_the_recorded_layout_so_old_run_logs_still_match():
    """The digest old run logs hold: SHA-256 over each leaf's path, then a tensor's dtype and
    shape and its raw bytes (a number as JSON), computed here by hand from copied bytes."""
    import hashlib
    import json

    import torch.utils._pytree as pytree

    state = fe.TrainState.create(
        torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    )
    state = state.replace(params={**state.params, "0.weight": state.params["0.weight"].bfloat16()})
    h = hashlib.sha256()
    for path, leaf in pytree.tree_flatten_with_path(state)[0]:
        h.update(pytree.keystr(path).encode())
        if isinstance(leaf, torch.Tensor):
            h.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
            h.update(bytes(leaf.detach().contiguous().reshape(-1).view(torch.uint8).tolist()))
        else:
            h.update(json.dumps(leaf).encode())
    assert state_digest(state) == h.hexdigest()


def _relabel(work: Path, number: int, world: int, batch=lambda b: b) -> None:
    """Mark segment ``number`` of the log as run by ``world`` processes, its positions in batches
    ``batch(b)`` (what a torchrun segment records), as a test without torchrun can."""
    seen = 0

    def edit(r: dict) -> None:
        nonlocal seen
        seen += r["kind"] == "segment"
        if seen == number and r["kind"] == "segment":
            r["env"]["world_size"] = world
            r["start"]["batch_in_epoch"] = batch(r["start"]["batch_in_epoch"])
        elif seen == number:
            r["batch_in_epoch"] = batch(r["batch_in_epoch"])

    _rewrite(work, edit)


def _append_segment(work: Path, world: int, resumed: tuple[int, int, int, str], *ends) -> None:
    """A resumed segment of ``world`` processes, as `fit` under torchrun records it: its start
    (the file it resumed from) and the checkpoints ``ends`` ((step, epoch, batch, name), ...)."""
    records = _records(work)
    seg = json.loads(json.dumps([r for r in records if r["kind"] == "segment"][-1]))
    step, epoch, batch, name = resumed
    seg.update(start={"step": step, "epoch": epoch, "batch_in_epoch": batch}, resumed_from=name)
    seg["env"]["world_size"] = world
    total = ends[-1][0]
    seg["horizon"] = {"max_epochs": None, "max_steps": total, "total_steps": total}
    digests = [{"kind": "digest", "step": s, "epoch": e, "batch_in_epoch": b,
                "digest": f"{s:064x}", "checkpoint": n} for s, e, b, n in (resumed, *ends)]  # fmt: skip
    (work / "run_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*records, seg, *digests])
    )


def test_a_segment_followed_by_a_resume_with_more_processes_replays_to_its_checkpoints(tmp_path):
    """1 process to step 8, then 2 processes (torchrun) from iter_8 to 12: the resume's start is
    batch 4 in 2-process batches (segment 1's own record is batch 8), so positions of the two
    segments are not compared; segment 1 replays to its own checkpoint in one process."""
    from fengine.replay.run import lineage, select

    work = tmp_path / "w"
    replay_recipe.run(work, max_steps=8, every=4)
    _append_segment(work, 2, (8, 0, 4, "iter_8.safetensors"), (12, 0, 8, "iter_12.safetensors"))
    ok, out = _replay(work, to=8)
    assert ok and "from step 0 to step 8 (iter_8.safetensors)" in out, out
    with pytest.raises(ReplayError) as e:
        replay(work, out=lambda s: None)
    assert str(e.value).endswith(
        "different numbers of processes (segment 1: 1, segment 2: 2); one replay runs one world "
        "size: pass --from one of [8] (the checkpoint files from segment 2 on) or --to one of "
        "[4, 8] (the checkpoints before segment 2)"
    )
    # --from 8 starts segment 2 where it resumed, in its batches (a 2-process replay)
    sel = select(work, lineage(read_log(work)), 8, None)
    assert [leg.seg.number for leg in sel.legs] == [2]
    assert (sel.begin, sel.end, sel.start_file) == (
        (8, 0, 4),
        (12, 0, 8),
        work / "iter_8.safetensors",
    )
    with pytest.raises(ReplayError, match="torchrun --nproc_per_node=2 -m fengine replay"):
        replay(work, start=8, out=lambda s: None)


def test_a_one_process_segment_between_two_process_ones_replays_from_and_to_its_checkpoints(
    tmp_path,
):
    """2 -> 1 -> 2 processes (the first segment's record rewritten as a 2-process one's): segment
    2's checkpoint at step 12 is at batch 2 of epoch 1 in its batches, segment 3 started at
    batch 1: --from 8 --to 12 replays segment 2 alone, bit for bit."""
    work = tmp_path / "w"
    replay_recipe.run(work, max_steps=8, every=4)
    replay_recipe.run(work, max_steps=12, every=4, resume=True)
    _relabel(work, 1, 2, batch=lambda b: b // 2)
    _append_segment(work, 2, (12, 1, 1, "iter_12.safetensors"), (16, 1, 3, "iter_16.safetensors"))
    ok, out = _replay(work, start=8, to=12)
    assert ok, out
    assert "from step 8 to step 12 (iter_12.safetensors)" in out
    assert "segment 2: steps 8-12, max_steps 12, resumed from iter_8.safetensors" in out
    assert "segment 1:" not in out and "segment 3:" not in out
