"""Recorded runs and bitwise replay.

`RunRecorder` writes ``work_dir/run_log.jsonl``: a header with the resolved
config, its hash, a hash of the code (fengine's sources and the recipe file) and
how to rebuild the run; then the digest of the whole `TrainState` every ``every``
steps and at every checkpoint.

`replay` (``python -m fengine replay WORK_DIR``) rebuilds the run from the
recorded config, starts from checkpoint K (default: the initial state, so a run
with a single final checkpoint is verified end to end), re-runs to checkpoint M
(default: the last), compares every recorded digest on the way and every tensor
of checkpoint M bitwise, and reports the first step and tensor that differ.

The guarantee is *exact*: same machine, build and world size give the same bits.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.utils._pytree as pytree

import fengine
from fengine import checkpoint
from fengine.config import config_hash
from fengine.events import Handler, Priority, Snapshot
from fengine.state import TrainState


__all__ = ["RunRecorder", "ReplayError", "code_hash", "replay", "state_digest"]

LOG_NAME = "run_log.jsonl"


class ReplayError(RuntimeError):
    """The run cannot be replayed as asked (missing records, changed code or config)."""


def state_digest(state: TrainState) -> str:
    """SHA-256 over every leaf of the state (names, dtypes, shapes, bytes; scalars as JSON)."""
    h = hashlib.sha256()
    leaves, _ = pytree.tree_flatten_with_path(state)
    for path, leaf in leaves:
        h.update(pytree.keystr(path).encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(leaf).encode())
    return h.hexdigest()


def code_hash(extra_files: Iterable[str | Path] = ()) -> str:
    """SHA-256 of fengine's Python sources and ``extra_files`` (the recipe)."""
    h = hashlib.sha256()
    root = Path(fengine.__file__).parent
    files = sorted(root.rglob("*.py")) + [Path(f) for f in extra_files]
    for f in files:
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class RunRecorder(Handler):
    """Record what replay needs: config + code hashes, and state digests every ``every`` steps
    and at each checkpoint, in ``work_dir/run_log.jsonl`` (appended across resumes).

    ``recipe`` is the script that built the run (default: the ``__main__`` file); it
    must define ``from_config(config: dict)`` returning an object with ``state``,
    ``step``, ``train_data`` (and optional ``fit_kwargs``) for replay.
    """

    priority = Priority.LOWEST

    def __init__(self, every: int = 100, *, recipe: str | Path | None = None) -> None:
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"RunRecorder: every must be an int >= 1, got {every!r}")
        self.every = every
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        source = recipe or main
        self.recipe = Path(source).resolve() if source else None
        self._file: TextIO | None = None

    def _write(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "RunRecorder writes between before_train and after_run"
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_before_train(self, snap: Snapshot) -> None:
        if snap.run.work_dir is None:
            raise ValueError("RunRecorder needs fit(..., work_dir=...)")
        self._file = open(Path(snap.run.work_dir) / LOG_NAME, "a", encoding="utf-8")  # noqa: SIM115
        config = snap.run.config
        self._write(
            {
                "kind": "header",
                "fengine": fengine.__version__,
                "torch": torch.__version__,
                "recipe": str(self.recipe) if self.recipe else None,
                "config": config,
                "config_hash": config_hash(config) if config is not None else None,
                "code_hash": code_hash([self.recipe] if self.recipe else []),
                "start": _position(snap.state),
            }
        )
        if snap.state.step == 0:
            self._record(snap, None)

    def _record(self, snap: Snapshot, path: Path | None) -> None:
        record = {"kind": "digest", **_position(snap.state), "digest": state_digest(snap.state)}
        if path is not None:
            record["checkpoint"] = str(path)
        self._write(record)

    def on_after_train_iter(self, snap: Snapshot) -> None:
        if snap.state.step % self.every == 0:
            self._record(snap, None)

    def on_after_save_checkpoint(self, snap: Snapshot) -> None:
        self._record(snap, snap.checkpoint)

    def on_after_run(self, snap: Snapshot) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _position(state: TrainState) -> dict[str, int]:
    return {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}


def _key(r: dict) -> tuple[int, int, int]:
    return r["step"], r["epoch"], r["batch_in_epoch"]


def read_log(work_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(headers, digest records) of a recorded run."""
    path = Path(work_dir) / LOG_NAME
    if not path.is_file():
        raise ReplayError(
            f"{path} not found: record the run with fengine.replay.RunRecorder (recipes do)"
        )
    headers: list[dict] = []
    digests: list[dict] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            (headers if r["kind"] == "header" else digests).append(r)
    if not headers:
        raise ReplayError(f"{path} has no header record")
    return headers, digests


def _load_recipe(path: str):
    spec = importlib.util.spec_from_file_location("_fengine_replayed_recipe", path)
    if spec is None or spec.loader is None or not Path(path).is_file():
        raise ReplayError(f"recipe {path} not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the recipe runs
    spec.loader.exec_module(module)
    if not callable(getattr(module, "from_config", None)):
        raise ReplayError(f"recipe {path} defines no from_config(config) to rebuild the run")
    return module


class _Collector(Handler):
    priority = Priority.LOWEST

    def __init__(self, wanted: set[tuple[int, int, int]], target: tuple[int, int, int]) -> None:
        super().__init__()
        self.wanted, self.target = wanted, target
        self.seen: dict[tuple[int, int, int], str] = {}
        self.at_target: TrainState | None = None

    def _take(self, snap: Snapshot) -> None:
        key = _key(_position(snap.state))
        if key in self.wanted and key not in self.seen:
            self.seen[key] = state_digest(snap.state)
        if key == self.target and self.at_target is None:
            self.at_target = (
                snap.state.clone()
            )  # the target checkpoint's position, before the loop moves on

    on_after_train_iter = _take
    on_after_train_epoch = _take


def _find(records: list[dict], step: int | None, *, latest: bool) -> dict | None:
    ckpts = [r for r in records if "checkpoint" in r]
    if step is not None:
        ckpts = [r for r in ckpts if r["step"] == step]
    return (ckpts[-1] if latest else ckpts[0]) if ckpts else None


def replay(
    work_dir: str | Path,
    *,
    start: int | None = None,
    to: int | None = None,
    force: bool = False,
    out=print,
) -> bool:
    """Re-run a recorded run between checkpoints and compare bits; True when everything agrees."""
    work_dir = Path(work_dir)
    headers, records = read_log(work_dir)
    header = headers[0]
    for h in headers[1:]:
        if h["config_hash"] != header["config_hash"]:
            msg = f"the run was resumed with a different config (hash {h['config_hash'][:12]} vs {header['config_hash'][:12]})"
            if not force:
                raise ReplayError(msg + "; pass --force to replay with the first one anyway")
            out("warning: " + msg)
    recipe = header["recipe"]
    if recipe is None:
        raise ReplayError("the run log names no recipe to rebuild the run from")
    now = code_hash([recipe])
    if now != header["code_hash"]:
        msg = f"the code changed since the run was recorded (code hash {now[:12]} vs recorded {header['code_hash'][:12]})"
        if not force:
            raise ReplayError(
                msg + "; results may legitimately differ. Pass --force to replay anyway"
            )
        out("warning: " + msg)
    exp = _load_recipe(recipe).from_config(header["config"])

    state = exp.state
    if start is not None and start != 0:
        rec = _find(records, start, latest=False)
        if rec is None:
            raise ReplayError(
                f"no checkpoint recorded at step {start}; recorded: {[r['step'] for r in records if 'checkpoint' in r]}"
            )
        state = checkpoint.load(rec["checkpoint"], like=state)
    target = _find(records, to, latest=True)
    if target is None:
        raise ReplayError(
            f"no checkpoint recorded at step {to}"
            if to is not None
            else "the run recorded no checkpoint"
        )
    begin = _position(state)
    if _key(begin) >= _key(target):
        raise ReplayError(
            f"start (step {begin['step']}) is not before the target checkpoint (step {target['step']})"
        )
    wanted = {_key(r) for r in records if _key(begin) < _key(r) <= _key(target)}
    expected: dict[tuple[int, int, int], str] = {}
    for r in records:
        if _key(r) in wanted:
            expected.setdefault(_key(r), r["digest"])
    collector = _Collector(set(expected), _key(target))
    if state.step == 0 and begin["batch_in_epoch"] == 0 and begin["epoch"] == 0:
        first = next((r for r in records if _key(r) == (0, 0, 0)), None)
        if first is not None:
            expected[(0, 0, 0)] = first["digest"]
            collector.seen[(0, 0, 0)] = state_digest(state)
    out(
        f"replaying {work_dir} from step {begin['step']} to step {target['step']} ({target['checkpoint']})"
    )
    fengine.fit(state, exp.step, exp.train_data, max_steps=target["step"], handlers=[collector])
    final = collector.at_target
    if final is None:
        raise ReplayError(
            f"the replay never reached the position of the target checkpoint {_key(target)}"
        )

    ok, first_bad = True, None
    out(f"{'step':>8} {'epoch':>5} {'batch':>5}  {'recorded':<16} {'replayed':<16} ok")
    for key in sorted(expected):
        got = collector.seen.get(key)
        same = got == expected[key]
        ok &= same
        if not same and first_bad is None:
            first_bad = key
        out(
            f"{key[0]:>8} {key[1]:>5} {key[2]:>5}  {expected[key][:16]:<16} {(got or '-')[:16]:<16} {'yes' if same else 'NO'}"
        )
    reference = checkpoint.load(target["checkpoint"], like=final)
    ref_leaves = pytree.tree_flatten_with_path(reference)[0]
    got_leaves = pytree.tree_flatten_with_path(final)[0]
    bad_tensor = None
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        equal = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        if not equal:
            bad_tensor = pytree.keystr(path)
            break
    if bad_tensor is not None:
        ok = False
        out(f"checkpoint {target['checkpoint']}: first differing tensor {bad_tensor}")
    else:
        out(f"checkpoint {target['checkpoint']}: every tensor bitwise equal")
    if first_bad is not None:
        out(
            f"first differing digest at step {first_bad[0]} (epoch {first_bad[1]}, batch {first_bad[2]})"
        )
    out("REPLAY OK" if ok else "REPLAY DIFFERS")
    return ok


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m fengine replay", description="Re-run a recorded run and compare bits."
    )
    ap.add_argument("work_dir", type=Path)
    ap.add_argument(
        "--from",
        dest="start",
        type=int,
        default=None,
        help="start at the checkpoint of this step (default: the initial state)",
    )
    ap.add_argument(
        "--to",
        type=int,
        default=None,
        help="stop at the checkpoint of this step (default: the last)",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="replay even if the code or config hash differs from the recorded one",
    )
    args = ap.parse_args(argv)
    try:
        return 0 if replay(args.work_dir, start=args.start, to=args.to, force=args.force) else 1
    except (ReplayError, checkpoint.CheckpointError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
