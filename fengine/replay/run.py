"""Re-execution: pick the segments leading to the target checkpoint, rebuild each from its own
config and horizon, re-run it with `fengine.train_steps`, and compare the bits."""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.utils._pytree as pytree

from fengine import checkpoint, distributed
from fengine.loop import (
    Val,
    _val_interval,
    _validation_due,
    load_as_resumed,
    plan,
    repartition,
    start_replicas,
    train_steps,
)
from fengine.plateau import Plateau
from fengine.replay import env
from fengine.replay.log import (
    LOG_NAME,
    Pos,
    ReplayError,
    Segment,
    key,
    position,
    read_log,
    state_digest,
)
from fengine.replay.recipe import build, check_code, load_recipe, resolve_recipe
from fengine.state import TrainState


__all__ = ["lineage", "replay"]

SCRATCH: Pos = (0, 0, 0)
Out = Callable[[str], Any]


@dataclasses.dataclass
class Leg:
    """A segment on the path to the target, run until ``end`` (where the next one resumed, a
    position in the next one's batches: another world size counts other batches per epoch)."""

    seg: Segment
    end: Pos | None
    same_world: bool = True  # the next segment ran as many processes: ``end`` is in our batches

    def reaches(self, pos: Pos) -> bool:
        """Whether this segment's position ``pos`` lies at or before the next one's resume: by
        position in one world size; across world sizes by step and epoch (the batch counts differ,
        and a replay never runs on through a change of world size)."""
        if self.end is None:
            return True
        return pos <= self.end if self.same_world else pos[:2] <= self.end[:2]

    def ends_at(self, pos: Pos) -> bool:
        """Whether the next segment resumed from this segment's position ``pos``."""
        if self.end is None:
            return False
        return pos == self.end if self.same_world else pos[0] == self.end[0]

    def records(self) -> list[dict]:
        return [r for r in self.seg.digests if self.seg.start <= key(r) and self.reaches(key(r))]


def _world(seg: Segment) -> int:
    """The number of processes ``seg`` ran (logs before ``world_size``: one)."""
    return int(seg.record.get("env", {}).get("world_size", 1))


def lineage(segments: list[Segment]) -> list[Leg]:
    """The segments whose states lead to the last one: walking back from a segment's start,
    the earlier segment it resumed from (`_resumed_from`)."""
    chain = [segments[-1]]
    while chain[0].start != SCRATCH:
        earlier = _resumed_from(chain[0], segments[: chain[0].number - 1])
        if earlier is None:
            break  # resumed from a checkpoint this log did not produce
        chain.insert(0, earlier)
    legs = [Leg(s, nxt.start, _world(s) == _world(nxt)) for s, nxt in zip(chain, chain[1:])]
    return [*legs, Leg(chain[-1], None)]


def _resumed_from(seg: Segment, before: list[Segment]) -> Segment | None:
    """The latest earlier segment that recorded the very state ``seg`` started from (its digest at
    that position), else one that recorded the file it resumed from there, else the latest that
    started before that position and planned to reach it (a file from another directory). A
    segment of another world size counts other batches: there the step decides."""
    p, name = seg.start, seg.record["resumed_from"]
    started = next((r["digest"] for r in seg.digests if key(r) == p), None)

    def at(s: Segment, pos: Pos) -> bool:
        return pos == p if _world(s) == _world(seg) else pos[0] == p[0]

    earlier = [
        s for s in before if (s.start < p if _world(s) == _world(seg) else s.start[0] < p[0])
    ]
    for same in (lambda r: r["digest"] == started, lambda r: r.get("checkpoint") == name):
        found = [s for s in earlier if any(at(s, key(r)) and same(r) for r in s.digests)]
        if found:
            return found[-1]
    reach = [s for s in earlier if s.horizon["total_steps"] >= p[0]]
    return reach[-1] if reach else None


def _file(work_dir: Path, name: str) -> Path | None:
    """A recorded checkpoint's file if it exists inside the work dir: the run log is untrusted,
    so a name that is absolute, climbs out with ``..`` or resolves outside (a resume from another
    directory records an absolute path) is not opened; its digest is still compared."""
    p = PurePosixPath(name)
    if not p.parts or p.is_absolute() or ".." in p.parts:
        return None
    path = work_dir / p
    inside = path.resolve().is_relative_to(work_dir.resolve())
    return path if inside and path.is_file() else None


@dataclasses.dataclass
class Selection:
    """What to re-run: from position ``begin`` (``start_file``'s, or the initial state) to
    ``target``'s, through ``legs`` (``begin`` in the first one's batches, ``target`` in the last
    one's); ``records`` are the digests on that path."""

    legs: list[Leg]
    records: list[dict]
    target: dict
    begin: Pos
    start_file: Path | None

    @property
    def end(self) -> Pos:
        return key(self.target)

    def stop(self, leg: Leg) -> Pos:
        return self.end if leg is self.legs[-1] or leg.end is None else leg.end


def select(work_dir: Path, legs: list[Leg], start: int | None, to: int | None) -> Selection:
    """``start``: a step with a checkpoint file on the path (None or 0: the initial state);
    ``to``: a step with a recorded checkpoint (None: the last), its file present or not.

    Records are placed by (leg, position): a position counts its own segment's batches, so
    positions of segments that ran different numbers of processes are not compared."""
    log = work_dir / LOG_NAME
    ckpts = [(i, r) for i, leg in enumerate(legs) for r in leg.records() if "checkpoint" in r]
    # the checkpoints a segment wrote (not the file a resumed one started from, whose digest may
    # include a wrapper the resume added)
    written = [(i, r) for i, leg in enumerate(legs) for r in leg.records()[leg.seg.start != SCRATCH :]
               if "checkpoint" in r]  # fmt: skip
    if not written:
        raise ReplayError(f"{log} records no checkpoint to verify against: save one (Checkpointer)")
    found = (
        written[-1] if to is None else next((w for w in written[::-1] if w[1]["step"] == to), None)
    )
    if found is None:
        steps = sorted({r["step"] for _, r in written})
        raise ReplayError(f"{log} records no checkpoint at step {to}: pass --to one of {steps}")
    ti, target = found
    end = (ti, key(target))
    present = sorted(
        {(i, key(r), r["checkpoint"]) for i, r in ckpts if _file(work_dir, r["checkpoint"])}
    )
    offer = sorted({pos[0] for i, pos, _ in present if (i, pos) < end})
    bi, begin, start_file = 0, SCRATCH, None
    if not start:
        if legs[0].seg.start != SCRATCH:
            where = (
                f"replay from a later checkpoint with --from one of {offer}"
                if offer
                else "no checkpoint file of this work dir lies on its path to start from, so it "
                "cannot be replayed here (replay the run whose file it resumed from)"
            )
            raise ReplayError(
                f"{log}: segment {legs[0].seg.number} resumed from "
                f"{legs[0].seg.record['resumed_from']}, a state no segment of the log produced: {where}"
            )
    else:
        # the latest on the path: where a segment resumed from it, in that segment's batches
        at = [(i, pos, name) for i, pos, name in present if pos[0] == start and (i, pos) < end]
        if not at:
            where = (
                f"pass --from one of {offer} (the files that still exist)"
                if offer
                else "none before it still exists: replay without --from, from the initial state"
            )
            raise ReplayError(
                f"{work_dir} has no checkpoint file of step {start} before step {end[1][0]}: {where}"
            )
        bi, begin, name = at[-1]
        start_file = _file(work_dir, name)
        while bi < ti and legs[bi].ends_at(begin):  # the next segment resumed here: start
            bi, begin = bi + 1, legs[bi + 1].seg.start  # there, in its batches, as it did
    if (bi, begin) >= end:
        raise ReplayError(
            f"start (step {begin[0]}) is not before the target checkpoint (step {end[1][0]}) "
            f"of {log}: pass --to a later step"
        )
    run = legs[bi : ti + 1]
    on_path = [
        r
        for i, leg in enumerate(run, bi)
        for r in leg.records()
        if (i > bi or begin <= key(r)) and (i < ti or key(r) <= end[1])
    ]
    return Selection(run, on_path, target, begin, start_file)


def _config_note(leg: Leg, first: Leg) -> str:
    def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted({*a, *b}) for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    if leg is first:
        return ""
    changed = diff(first.seg.record["config"], leg.seg.record["config"])
    other = f"segment {first.seg.number}"
    return f" (differs from {other} in {', '.join(changed)})" if changed else f" (same as {other})"


def describe(work_dir: Path, sel: Selection, out: Out) -> None:
    out(
        f"replaying {work_dir} from step {sel.begin[0]} to step {sel.end[0]} ({sel.target['checkpoint']})"
    )
    for leg in sel.legs:
        r, h = leg.seg.record, leg.seg.horizon
        horizon = (
            f"max_epochs {h['max_epochs']}" if h["max_epochs"] else f"max_steps {h['max_steps']}"
        )
        resumed = f", resumed from {r['resumed_from']}" if r["resumed_from"] else ""
        first = sel.begin if leg is sel.legs[0] else leg.seg.start
        steps = f"{first[0]}-{sel.stop(leg)[0]}"
        config = f"config {(r['config_hash'] or '-')[:12]}{_config_note(leg, sel.legs[0])}"
        out(f"  segment {leg.seg.number}: steps {steps}, {horizon}{resumed}, {config}")


class Progress:
    """A line every ~10% of the steps, or one line rewritten in place when stdout is a terminal."""

    def __init__(self, out: Out, first: int, last: int, tty: bool) -> None:
        self.out, self.first, self.last, self.tty = out, first, last, tty
        self.every = max(1, math.ceil((last - first) / 10))
        self.t0 = time.perf_counter()

    def __call__(self, step: int) -> None:
        pct = 100 * (step - self.first) // max(self.last - self.first, 1)
        line = f"  step {step}/{self.last} ({pct}%, {time.perf_counter() - self.t0:.1f} s)"
        if self.tty:
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
        elif (step - self.first) % self.every == 0 or step == self.last:
            self.out(line)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


def _carry(state: TrainState, exp: Any, resumed_from: str | None) -> TrainState:
    """Into the next segment as its resume did: through a checkpoint, loaded like its fresh state
    (a wrapper the resume added, e.g. an EMA, starts from the loaded weights, as in `fit`). Under
    torchrun every rank resumed from rank 0's file, so every rank takes rank 0's state."""
    with tempfile.TemporaryDirectory() as d:
        path = checkpoint.save(Path(d) / "carry.safetensors", state, fsync=False)
        carried = load_as_resumed(path, exp.state, exp.step, shown=resumed_from)
    distributed.broadcast_from_main(
        [x for x in pytree.tree_leaves(carried) if isinstance(x, torch.Tensor)]
    )
    return carried


def _load_start(path: Path, exp: Any, begin: Pos) -> TrainState:
    """``--from``'s file as `fit` resumes from it: a wrapper whose state it lacks (an EMA the
    resume added) starts from its weights, and a position saved by another number of processes
    is converted to this one's batches."""
    state = load_as_resumed(path, exp.state, exp.step)
    meta = checkpoint.read_meta(path)["meta"]
    saved = meta.get("run") if isinstance(meta, Mapping) else None
    saved = saved if isinstance(saved, Mapping) else {}
    # at an epoch's end the resume stayed there, in its own batches per epoch (the log's)
    batches = begin[2] if begin[1] == state.epoch else None
    try:
        state = repartition(state, saved.get("world_size", 1), distributed.world_size(), path,
                             saved.get("batches_per_epoch"), batches)  # fmt: skip
    except ValueError as e:
        raise ReplayError(str(e)) from None
    if key(position(state)) != begin:
        step, epoch, batch = begin
        raise ReplayError(
            f"{path} holds the state of step {state.step} at batch {state.batch_in_epoch} of epoch "
            f"{state.epoch}, but the run log records the resume there at batch {batch} of epoch "
            f"{epoch}: a file replaced since, or another number of processes"
        )
    return state


def _check_world(legs: list[Leg], who: str, work_dir: Path, end: Pos | None = None) -> None:
    """The replay runs as many processes as each replayed segment did (`torchrun`'s ``WORLD_SIZE``).
    ``end``: the target's position in the last leg (the files after it are not offered)."""
    launched = distributed.launched_world_size()
    worlds = {leg.seg.number: _world(leg.seg) for leg in legs}
    if len(set(worlds.values())) > 1:
        seen = ", ".join(f"segment {n}: {w}" for n, w in worlds.items())
        last = max(i for i, leg in enumerate(legs) if _world(leg.seg) != _world(legs[-1].seg))
        tail = legs[last + 1 :]  # one world size: their positions compare
        steps = sorted({r["step"] for leg in tail for r in leg.records() if "checkpoint" in r
                        and (end is None or key(r) < end) and _file(work_dir, r["checkpoint"])})  # fmt: skip
        tos = sorted({r["step"] for leg in legs[: last + 1]
                      for r in leg.records()[leg.seg.start != SCRATCH :] if "checkpoint" in r})  # fmt: skip
        n = tail[0].seg.number
        ways = [f"--from one of {steps} (the checkpoint files from segment {n} on)"] * bool(steps)
        ways += [f"--to one of {tos} (the checkpoints before segment {n})"] * bool(tos)
        none = f"no checkpoint file from segment {n} on, nor one before it, to replay to or from"
        raise ReplayError(
            f"the replayed segments ran with different numbers of processes ({seen}); one replay "
            f"runs one world size: {'pass ' + ' or '.join(ways) if ways else none}"
        )
    ((number, world),) = list(worlds.items())[-1:]
    name = who.format(number)
    if world > 1 and launched != world:
        raise ReplayError(
            f"{name} recorded with {world} processes (torchrun), and this replay runs {launched}: "
            f"launch it as the run was, torchrun --nproc_per_node={world} -m fengine replay {work_dir}"
        )
    if world == 1 and launched > 1:
        raise ReplayError(
            f"{name} recorded in one process, and this replay was launched as {launched} "
            f"(torchrun): run python -m fengine replay {work_dir} in one process"
        )


def _check_ranks(exp: Any, recipe: Path) -> None:
    """Under torchrun, the rebuilt run has the process group and data parallelism replay covers."""
    launched = distributed.launched_world_size()
    if launched == 1:
        return
    if distributed.world_size() != launched:
        raise ReplayError(
            f"recipe {recipe} set up no process group under torchrun (WORLD_SIZE={launched}): its "
            "build must call fengine.distributed.setup(), as the run that was recorded did"
        )
    if any(type(w).__name__ == "_Fsdp" for w in exp.step.wrappers):
        raise ReplayError(
            "the run shards its state with fsdp(): replay covers data_parallel() runs under "
            "torchrun, not FSDP ones yet"
        )


def _unsynced_start_note(sel: Selection, state: TrainState) -> str | None:
    """A mid-epoch checkpoint of a multi-process run holds rank 0's BatchNorm statistics only
    (the ranks average them at epoch ends); where the run went on from it without a resume, the
    other ranks had their own, which replay from it cannot restore."""
    starts_segment = sel.legs[0].seg.start == sel.begin
    floats = any(b.is_floating_point() for b in state.buffers.values())
    if distributed.world_size() == 1 or sel.begin[2] == 0 or starts_segment or not floats:
        return None
    return (
        f"note: the checkpoint of step {sel.begin[0]} was saved mid-epoch by rank 0 of "
        f"{distributed.world_size()}: the other ranks' floating-point buffers (BatchNorm "
        "statistics) are not in it, so the steps after it may differ from the recorded ones; "
        "replay from the start or from an epoch-end checkpoint for an exact comparison"
    )


def run_leg(
    state: TrainState, exp: Any, leg: Leg, stop: Pos, seen: dict[Pos, list[str]], progress: Progress
) -> list[TrainState]:
    """Re-run ``leg`` from ``state`` to position ``stop``, digesting every position in ``seen``
    (rank 0). Returns the states at ``stop``: under torchrun, where `fit` validated there, the
    one before and the one after the ranks averaged their buffers for it."""
    h, where = leg.seg.horizon, f"segment {leg.seg.number} (line {leg.seg.line})"
    p = plan(exp.train_data, micro_batches=exp.step.micro_batches,
             max_epochs=h["max_epochs"], max_steps=h["max_steps"])  # fmt: skip
    if p.total_steps != h["total_steps"]:
        raise ReplayError(
            f"{where} ran {h['total_steps']} steps, the recipe now plans {p.total_steps}: "
            "its data or code changed; pass --recipe PATH to the script that ran"
        )
    plateaus = [name for name, v in state.extra.items() if isinstance(v, Plateau)]
    if plateaus:
        raise ReplayError(
            f"{where}: the step keeps a reduce_on_plateau ({', '.join(plateaus)}), whose values "
            "follow validation results; replay re-runs training only, so it cannot check this run"
        )
    if key(position(state)) == stop:
        return [state]
    main = distributed.is_main()  # rank 0's state is the recorded one
    val = getattr(exp, "val", None) if distributed.world_size() > 1 else None
    interval = _val_interval(val, p) if isinstance(val, Val) else 0

    def digest(pos: Pos, state: TrainState) -> None:
        if pos in seen and main:
            seen[pos].append(state_digest(state))

    for tick in train_steps(state, exp.step, exp.train_data, p):
        if tick.event not in ("after_train_iter", "after_train_epoch"):
            continue
        pos, states = key(position(tick.state)), [tick.state]
        if tick.event == "after_train_epoch":
            distributed.sync_buffers(tick.state.buffers)  # as `fit` (MMEngine's SyncBuffersHook)
        digest(pos, tick.state)
        if (
            interval
            and tick.event == "after_train_iter"  # at an epoch end the average above did it
            and _validation_due(tick.event, tick.state, p, val, interval)  # type: ignore[arg-type]
        ):
            # `fit` validates here, averaging the ranks' buffers first (before_val_epoch)
            if pos == stop:  # a checkpoint from before it may be the one a resume read
                own = {k: b.clone() for k, b in tick.state.buffers.items()}
                states.insert(0, tick.state.replace(buffers=own))
            distributed.sync_buffers(tick.state.buffers)
            digest(pos, tick.state)
        if tick.event == "after_train_iter":
            progress(tick.state.step)
        if pos == stop:
            return states
        if pos > stop:
            break
    raise ReplayError(
        f"{where} re-run never reached step {stop[0]} (epoch {stop[1]}, batch {stop[2]}): the "
        "recipe builds another run than the recorded one; pass --recipe PATH to the script that ran"
    )


def _resumed(states: list[TrainState], before: Leg, leg: Leg, at: Pos) -> tuple[TrainState, bool]:
    """Of the states at the position ``leg`` resumed from (under torchrun, where an iteration-based
    validation followed: before and after its buffer average), the one its file held; and whether
    `fit`'s resume then ran that validation, averaging the buffers again (it did when the file was
    written before it). Rank 0 has the digests and decides for every rank."""
    choice = (len(states) - 1, False)
    if distributed.is_main() and len(states) > 1:
        name = leg.seg.record["resumed_from"]
        held = [
            r["digest"] for r in before.records() if key(r) == at and r.get("checkpoint") == name
        ]
        digests = [state_digest(s) for s in states]
        if held and held[-1] in digests:
            if digests[0] != digests[-1]:
                i = digests.index(held[-1])
                choice = (i, i == 0)
            else:  # the average changed nothing: a file written once there was written before it
                choice = (0, len(held) == 1)
    i, validated = distributed.gather_objects(choice)[0]
    return states[i], validated


def replay(
    work_dir: str | Path,
    *,
    start: int | None = None,
    to: int | None = None,
    force: bool = False,
    recipe: str | Path | None = None,
    keep_settings: bool = False,
    paths: Mapping[str, str] | None = None,
    out: Out = print,
) -> bool:
    """Re-run a recorded run from checkpoint ``start`` (default: the initial state) to checkpoint
    ``to`` (default: the last), segment by segment; True when every bit agrees. See `fengine.replay`.

    ``paths``: the files the rebuilt config reads (``{"load_from": FILE, "data.root": DIR}``), which
    the user confirms: the run log records them but, being an untrusted file, chooses none.

    A run trained by N processes replays under ``torchrun --nproc_per_node=N``: every rank
    re-runs its shard (with the epoch-end buffer averaging and rank 0's state at each resume, as
    `fit`), rank 0 compares and reports, and every rank returns its verdict."""
    work_dir = Path(work_dir)
    if distributed.launched_rank() != 0:
        out = _quiet  # one report: rank 0's
    notes: list[str] = []
    segments = read_log(work_dir, notes)
    for note in notes:
        out(note)
    sel = select(work_dir, lineage(segments), start, to)
    path = resolve_recipe(sel.legs[-1].seg.record["recipe"], recipe, work_dir)
    describe(work_dir, sel, out)
    check_code(path, [leg.seg for leg in sel.legs], force, out)
    who = "the run was" if len(sel.legs) == 1 else "segment {} was"
    _check_world(sel.legs, who, work_dir, sel.end)
    recorded = [(who.format(leg.seg.number), leg.seg.record["env"]) for leg in sel.legs]
    differences = env.notes(recorded, keep_settings)
    for note in differences:
        out(note)
    module = load_recipe(path, out)
    seen: dict[Pos, list[str]] = {key(r): [] for r in sel.records}
    carried: dict[Pos, str] = {}  # the state a segment starts from, where its resume changed it
    progress = Progress(out, sel.begin[0], sel.end[0], tty=out is print and sys.stdout.isatty())
    saved, state, states = env.environment(), None, []
    try:
        for before, leg in zip([None, *sel.legs], sel.legs):
            if not keep_settings:
                env.apply(leg.seg.record["env"])
            exp = build(module, leg.seg, path, paths)
            _check_ranks(exp, path)
            device = env.device_note(who.format(leg.seg.number), leg.seg.record["env"], exp.state)
            if device:
                differences.append(device)
                out(device)
            if state is None:
                f = sel.start_file
                state = exp.state if f is None else _load_start(f, exp, sel.begin)
                if f is None:
                    start_replicas(state, exp.step)  # as `fit` starts
                elif unsynced := _unsynced_start_note(sel, state):
                    differences.append(unsynced)
                    out(unsynced)
                seen[sel.begin] = [state_digest(state)]
            else:  # a wrapper the resume added changes the state (and digest) at the same position
                assert before is not None
                state, validated = _resumed(states, before, leg, sel.stop(before))
                state = _carry(state, exp, leg.seg.record["resumed_from"])
                carried[key(position(state))] = state_digest(state)
                if validated:  # `fit`'s resume validated first, averaging the ranks' buffers
                    distributed.sync_buffers(state.buffers)
            states = run_leg(state, exp, leg, sel.stop(leg), seen, progress)
            state = states[-1]
    finally:
        progress.close()
        env.apply(saved)
    assert state is not None
    return _reported_by_main(
        lambda: report(
            work_dir, sel, seen, state, out, env_differs=bool(differences), carried=carried
        )
    )


def _quiet(line: str) -> None:
    """The output of a rank other than 0."""


def _reported_by_main(report_: Callable[[], bool]) -> bool:
    """Rank 0 reports; every rank returns its verdict, or raises its error (no rank is left waiting
    in the collective when rank 0's report fails). In one process: the report, or its error."""
    try:
        return bool(distributed.computed_by_main(report_))
    except Exception as e:
        if distributed.is_main():
            raise
        raise ReplayError(f"rank 0 failed: {type(e).__name__}: {e}") from None


def report(
    work_dir: Path,
    sel: Selection,
    seen: dict[Pos, list[str]],
    final: TrainState,
    out: Out,
    *,
    env_differs: bool = False,
    carried: Mapping[Pos, str] | None = None,
) -> bool:
    """The digest table, the target checkpoint's tensors, and the verdict. ``carried``: the
    state a segment started from where its resume added wrapper state (recorded there too)."""
    ok, first_bad = True, None
    out(f"{'step':>8} {'epoch':>5} {'batch':>5}  {'recorded':<16} {'replayed':<16} ok")
    for pos, digest in sorted(dict.fromkeys((key(r), r["digest"]) for r in sel.records)):
        replayed = [*seen.get(pos, ()), *([carried[pos]] if carried and pos in carried else [])]
        got = digest if digest in replayed else (replayed[-1] if replayed else "-")
        ok &= got == digest
        if got != digest and first_bad is None:
            first_bad = pos
        mark = "yes" if got == digest else "NO"
        out(f"{pos[0]:>8} {pos[1]:>5} {pos[2]:>5}  {digest[:16]:<16} {got[:16]:<16} {mark}")
    # each file's last recorded digest (a file saved twice at one position, e.g. again after the
    # validation there, holds the later state)
    at_end = {r["checkpoint"]: r["digest"] for r in sel.records if key(r) == sel.end and "checkpoint" in r}  # fmt: skip
    files = {p: d for n, d in at_end.items() if (p := _file(work_dir, n)) is not None}
    if not files:
        out(f"checkpoint {sel.target['checkpoint']} is gone (removed after the run, e.g. by "
            "max_keep_ckpts) or not in the work dir: compared with its recorded digest only")  # fmt: skip
    for path, recorded in files.items():
        reference = checkpoint.load(path, like=final)  # a damaged file raises, naming itself
        held = state_digest(reference)
        bad = None
        if held not in seen.get(sel.end, ()):  # equal to no replayed state: name the tensor
            pairs = zip(*(pytree.tree_flatten_with_path(s)[0] for s in (reference, final)))
            bad = next((pytree.keystr(p) for (p, a), (_, b) in pairs if not _equal(a, b)), "-")
        ok &= bad is None
        out(
            f"checkpoint {path}: "
            + (f"first differing tensor {bad}" if bad else "every tensor bitwise equal")
        )
        if held != recorded:
            ok = False
            out(
                f"checkpoint {path} does not hold the state the run log recorded for it (replaced?)"
            )
    if first_bad is not None:
        step, epoch, batch = first_bad
        out(f"first differing digest at step {step} (epoch {epoch}, batch {batch})")
    if not ok and env_differs:
        out(
            "the environment differs from the recorded one (notes above): that alone can change bits"
        )
    out("REPLAY OK" if ok else "REPLAY DIFFERS")
    return ok


def _equal(a: Any, b: Any) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
