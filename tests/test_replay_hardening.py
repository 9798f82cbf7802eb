"""The run log is an untrusted file: a damaged record is refused naming its line, field, value
and the expected type (exit status 2, never a traceback), and a symlink or non-regular file at
``run_log.jsonl`` is neither written through nor read (tests/replay_recipe.py records the runs)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import replay_recipe
import torch

from fengine.__main__ import main as cli
from fengine.config import config_hash
from fengine.replay import ReplayError, read_log, replay


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """12 steps, checkpoints at 5, 10 and 12; tests damage copies of its run log."""
    work = tmp_path_factory.mktemp("hardening") / "w"
    replay_recipe.run(work, max_steps=12)
    return work


def _copy(recorded: Path, tmp_path: Path) -> Path:
    work = tmp_path / "w"
    shutil.copytree(recorded, work)
    return work


def _set(record: dict, field: str, value: object) -> None:
    *parents, name = field.split(".")
    for p in parents:
        record = record[p]
    record[name] = value


SEGMENT = [
    ("start", None, "start is null, expected an object with step, epoch, batch_in_epoch"),
    ("start", [0, 0, 0], "start is [0, 0, 0], expected an object with step"),
    ("start.step", "0", 'start.step is "0", expected an int >= 0'),
    ("start.epoch", -1, "start.epoch is -1, expected an int >= 0"),
    ("start.batch_in_epoch", 0.0, "start.batch_in_epoch is 0.0, expected an int >= 0"),
    ("resumed_from", 3, "resumed_from is 3, expected a non-empty string or null"),
    ("horizon", [30], "horizon is [30], expected an object with max_epochs, max_steps"),
    ("horizon.max_steps", "12", 'horizon.max_steps is "12", expected an int >= 1 or null'),
    ("horizon.max_steps", 0, "horizon.max_steps is 0, expected an int >= 1 or null"),
    ("horizon.max_steps", None, "expected exactly one of max_epochs and max_steps"),
    ("horizon.max_epochs", 2, "expected exactly one of max_epochs and max_steps"),
    ("horizon.total_steps", None, "horizon.total_steps is null, expected an int >= 0"),
    ("config", [1], "config is [1], expected an object or null"),
    ("config_hash", 5, "config_hash is 5, expected a non-empty string or null"),
    ("recipe", 7, "recipe is 7, expected a non-empty string or null"),
    ("recipe", "", 'recipe is "", expected a non-empty string or null'),
    ("code", None, "code is null, expected an object with fengine, recipe"),
    ("code.fengine", 1, "code.fengine is 1, expected a SHA-256 hex digest"),
    ("code.recipe", "xyz", 'code.recipe is "xyz", expected a SHA-256 hex digest (64 hex digits) or null'),
    ("env", "x", 'env is "x", expected an object with fengine, torch'),
    ("env.threads", 0, "env.threads is 0, expected an int from 1 to 4096"),
    ("env.threads", True, "env.threads is true, expected an int from 1 to 4096"),
    ("env.threads", 10**12, "env.threads is 1000000000000, expected an int from 1 to 4096"),
    ("env.deterministic", "no", 'env.deterministic is "no", expected true or false'),
    ("env.device", None, "env.device is null, expected a non-empty string"),
    ("env.world_size", 0, "env.world_size is 0, expected an int >= 1"),
]  # fmt: skip
DIGEST = [
    ("step", "0", 'step is "0", expected an int >= 0'),
    ("step", True, "step is true, expected an int >= 0"),
    ("epoch", None, "epoch is null, expected an int >= 0"),
    ("batch_in_epoch", -2, "batch_in_epoch is -2, expected an int >= 0"),
    ("digest", 5, "digest is 5, expected a SHA-256 hex digest (64 hex digits)"),
    ("digest", "abc", 'digest is "abc", expected a SHA-256 hex digest (64 hex digits)'),
    ("checkpoint", 5, "checkpoint is 5, expected a non-empty string"),
    ("checkpoint", "", 'checkpoint is "", expected a non-empty string'),
    ("checkpoint", ["iter_5.safetensors"], 'checkpoint is ["iter_5.safetensors"], expected a'),
]
CASES = [("segment", *c) for c in SEGMENT] + [("digest", *c) for c in DIGEST]


def _damage(work: Path, kind: str, field: str, value: object) -> int:
    """Set ``field`` of the first record of ``kind`` (with a checkpoint, for a digest); its line."""
    log = work / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    n = next(i for i, r in enumerate(records)
             if r["kind"] == kind and (kind == "segment" or "checkpoint" in r))  # fmt: skip
    _set(records[n], field, value)
    if field.startswith("config."):  # a crafted config: its hash made to match
        records[n]["config_hash"] = config_hash(records[n]["config"])
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return n + 1


@pytest.mark.parametrize(("kind", "field", "value", "expected"), CASES)
def test_a_record_with_a_field_of_the_wrong_type_is_named_by_the_library(
    recorded, tmp_path, kind, field, value, expected
):
    work = _copy(recorded, tmp_path)
    line = _damage(work, kind, field, value)
    with pytest.raises(ReplayError) as e:
        replay(work, out=lambda s: None)
    assert str(e.value).startswith(f"{work / 'run_log.jsonl'}:{line} is not a valid run log record")
    assert expected in str(e.value)


@pytest.mark.parametrize(("kind", "field", "value", "expected"), CASES)
def test_a_record_with_a_field_of_the_wrong_type_exits_2_with_one_line(
    recorded, tmp_path, capsys, kind, field, value, expected
):
    work = _copy(recorded, tmp_path)
    line = _damage(work, kind, field, value)
    assert cli(["replay", str(work)]) == 2  # 1 would mean DIFFERS
    err = capsys.readouterr().err
    assert err.startswith(
        f"replay: {work / 'run_log.jsonl'}:{line} is not a valid run log record ("
    )
    assert expected in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("5", "found 5, expected a JSON object"),
        ('["kind", "digest"]', 'found ["kind", "digest"], expected a JSON object'),
        ('{"kind": "digest", "epoch": 0, "digest": "x"}', "no batch_in_epoch, step"),
        ('{"kind": "segment", "format": 2}', "no code, config, config_hash, env, horizon"),
    ],
)
def test_a_line_that_is_no_record_object_is_named(recorded, tmp_path, line, expected):
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(ReplayError, match=rf"{log}:2 is not a valid run log record") as e:
        read_log(work)
    assert expected in str(e.value)


@pytest.mark.parametrize("bad", [b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000])
def test_undecodable_or_too_deep_json_is_named_with_its_line(recorded, tmp_path, bad):
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    lines = log.read_bytes().splitlines()
    log.write_bytes(b"\n".join([lines[0], bad, *lines[1:]]) + b"\n")
    with pytest.raises(ReplayError, match=rf"{log}:2 is not a JSON record"):
        read_log(work)


def test_the_recorder_never_writes_through_a_symlinked_run_log(recorded, tmp_path):
    work = _copy(recorded, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"important\nno newline at end")  # a torn tail the recorder would cut
    (work / "run_log.jsonl").unlink()
    (work / "run_log.jsonl").symlink_to(victim)
    with pytest.raises(
        ReplayError, match=rf"{work / 'run_log.jsonl'} is a symlink \(to {victim}\)"
    ):
        replay_recipe.run(work, max_steps=15, resume=True)
    assert victim.read_bytes() == b"important\nno newline at end"


@pytest.mark.parametrize("make", ["symlink", "fifo", "directory"])
def test_replay_reads_only_a_regular_run_log(recorded, tmp_path, capsys, make):
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    real = tmp_path / "elsewhere.jsonl"
    log.rename(real)
    {"symlink": lambda: log.symlink_to(real), "fifo": lambda: os.mkfifo(log),
     "directory": log.mkdir}[make]()  # fmt: skip
    expected = "is a symlink" if make == "symlink" else "is not a regular file"
    with pytest.raises(ReplayError, match=rf"{log} {expected}"):
        read_log(work)
    assert cli(["replay", str(work)]) == 2
    assert capsys.readouterr().err.startswith(f"replay: {log} {expected}")


@contextlib.contextmanager
def _deadline(seconds: int = 30):
    """Fail instead of hanging: opening a FIFO to write blocks until a reader comes (never)."""

    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    before = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("make", ["fifo", "directory"])
def test_the_recorder_refuses_a_run_log_that_is_no_regular_file(recorded, tmp_path, make):
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    log.unlink()
    os.mkfifo(log) if make == "fifo" else log.mkdir()
    with _deadline(), pytest.raises(ReplayError, match=rf"{log}(: cannot open| is not a regular)"):
        replay_recipe.run(work, max_steps=15, resume=True)


def test_the_recorder_never_appends_to_a_hard_linked_run_log(recorded, tmp_path):
    work = _copy(recorded, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"important\n")
    (work / "run_log.jsonl").unlink()
    os.link(victim, work / "run_log.jsonl")
    with pytest.raises(ReplayError, match=rf"{work / 'run_log.jsonl'} has 2 hard links"):
        replay_recipe.run(work, max_steps=15, resume=True)
    assert victim.read_bytes() == b"important\n"


def test_a_recorded_config_the_recipe_cannot_rebuild_exits_2_with_one_line(
    recorded, tmp_path, capsys
):
    """A config of the right shape whose values the recipe refuses (a type, a range)."""
    work = _copy(recorded, tmp_path)
    _damage(work, "segment", "config.lr", "fast")
    assert cli(["replay", str(work)]) == 2  # 1 would mean DIFFERS
    err = capsys.readouterr().err
    assert err.startswith("replay: segment 1's recorded config cannot be rebuilt by recipe ")
    assert "lr" in err and err.count("\n") == 1


def _rename_checkpoint(work: Path, step: int, name: str) -> None:
    log = work / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for r in records:
        if r["kind"] == "digest" and r["step"] == step and "checkpoint" in r:
            r["checkpoint"] = name
    log.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_recorded_checkpoint_names_outside_the_work_dir_are_never_opened(
    recorded, tmp_path, capsys
):
    """The run log chooses no file: a checkpoint named by an absolute path or ``..`` (real
    checkpoints lie there) is neither a start (``--from``) nor read for the final comparison;
    the recorded digests are still compared."""
    work = _copy(recorded, tmp_path)
    shutil.move(work / "iter_5.safetensors", tmp_path / "iter_5.safetensors")
    _rename_checkpoint(work, 5, "../iter_5.safetensors")
    with pytest.raises(ReplayError, match="no checkpoint file of step 5 before step 12"):
        replay(work, start=5)
    shutil.move(work / "iter_12.safetensors", tmp_path / "iter_12.safetensors")
    _rename_checkpoint(work, 12, str(tmp_path / "iter_12.safetensors"))
    assert cli(["replay", str(work), "--from", "10"]) == 0
    out = capsys.readouterr().out
    assert "or not in the work dir: compared with its recorded digest only" in out
    assert "REPLAY OK" in out
    assert f"checkpoint {tmp_path / 'iter_12.safetensors'}: every tensor" not in out  # never read


def test_a_key_twice_in_one_object_is_a_damaged_log(recorded, tmp_path, capsys):
    """``{"seed": 0, "seed": 1}``: json keeps the last value, so the edited config replayed and
    the run was blamed (REPLAY DIFFERS) instead of the log."""
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    text = log.read_text()
    assert text.count('"seed": 0') == 1
    log.write_text(text.replace('"seed": 0', '"seed": 0, "seed": 1'))
    with pytest.raises(ReplayError) as e:
        read_log(work)
    assert str(e.value).startswith(f"{log}:1 (segment 1) holds the key 'seed' twice in one object")
    lines = text.splitlines()
    digest = lines[1].replace('"step": 0', '"step": 0, "step": 1')
    log.write_text("\n".join([lines[0], digest, *lines[2:]]) + "\n")
    assert cli(["replay", str(work)]) == 2
    err = capsys.readouterr().err
    assert err == f"replay: {log}:2 (a record of segment 1) holds the key 'step' twice in one " \
        "object: the run log is damaged or was edited; restore the file\n"  # fmt: skip


def test_a_config_that_does_not_match_its_recorded_hash_is_a_damaged_log(recorded, tmp_path):
    """The recorded ``config_hash`` was never checked: an edited seed replayed the edit and
    reported REPLAY DIFFERS, blaming the run."""
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["config_hash"] == config_hash(records[0]["config"])  # as recorded
    records[0]["config"]["seed"] = 1
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ReplayError) as e:
        read_log(work)
    assert str(e.value) == (
        f"{log}:1 (segment 1): its config does not match its config_hash (recorded "
        f"{records[0]['config_hash'][:16]!r}..., the config's "
        f"{config_hash(records[0]['config'])[:16]!r}...); the run log is damaged or was edited: "
        "restore the file"
    )


def test_the_recorded_hash_is_of_the_config_as_the_log_holds_it(tmp_path):
    """A config with int keys (made strings by JSON, sorted differently) is recorded with the
    hash of what the log holds, so it reads back as undamaged."""
    import fengine as fe
    from fengine.replay import RunRecorder

    recorder = RunRecorder(recipe=replay_recipe.__file__, config={"weights": {10: 1.0, 9: 2.0}})
    exp = replay_recipe.build(replay_recipe.Config(max_steps=2))
    fe.fit(exp.state, exp.step, exp.train_data, max_steps=2, work_dir=tmp_path, handlers=[recorder])
    (segment,) = read_log(tmp_path)
    assert segment.record["config"] == {"weights": {"10": 1.0, "9": 2.0}}


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        ('RuntimeError("you tried to allocate 36000000000000 bytes")',
         "RuntimeError: you tried to allocate 36000000000000 bytes"),
        ("MemoryError()", "MemoryError"),
        ('OverflowError("int too large")', "OverflowError: int too large"),
    ],
)  # fmt: skip
def test_a_recipe_that_cannot_build_the_recorded_config_is_one_line_naming_the_log(
    recorded, tmp_path, capsys, raised, expected
):
    """A recorded ``model.width`` of 10**6 (RuntimeError: tried to allocate 36 TB) or
    ``env.threads`` of 4096 (MemoryError) gave a traceback: one ``replay:`` line, exit 2."""
    work = _copy(recorded, tmp_path)
    log = work / "run_log.jsonl"
    threads = (os.cpu_count() or 1) + 1  # more than this machine's CPUs: replay sets them
    _damage(work, "segment", "env.threads", threads)
    recipe = tmp_path / "failing.py"
    recipe.write_text(f"def from_config(config, *, max_epochs, max_steps):\n    raise {raised}\n")
    assert cli(["replay", str(work), "--recipe", str(recipe), "--force"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"replay: segment 1's recorded config cannot be rebuilt by recipe {recipe} (a damaged or "
        f"edited run log, {log}:1, or a changed recipe): {expected}; note: the segment recorded "
        f"env.threads={threads}, which replay sets (this machine has {threads - 1} CPUs): "
        "--keep-settings keeps this process's\n"
    )


def test_a_log_hashed_with_int_keys_before_this_release_reads(tmp_path):
    """The review's case: a run log written before the hash was taken of the config as the log
    holds it recorded the hash of the int keys (8 sorted before 11); it must still read."""
    import fengine as fe
    from fengine.replay import RunRecorder

    config = {"lr_milestones": {8: 0.1, 11: 0.01}}
    recorder = RunRecorder(recipe=replay_recipe.__file__, config=config)
    exp = replay_recipe.build(replay_recipe.Config(max_steps=2))
    fe.fit(exp.state, exp.step, exp.train_data, max_steps=2, work_dir=tmp_path, handlers=[recorder])
    log = tmp_path / "run_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    old_hash = config_hash(config)  # what the earlier writer recorded
    assert old_hash != config_hash(records[0]["config"])
    records[0]["config_hash"] = old_hash
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    (segment,) = read_log(tmp_path)
    assert segment.record["config"] == {"lr_milestones": {"8": 0.1, "11": 0.01}}
    # and an edit of such a config is still a damaged log
    records[0]["config"]["lr_milestones"]["8"] = 0.5
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ReplayError, match="does not match its config_hash"):
        read_log(tmp_path)
