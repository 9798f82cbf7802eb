"""Recorded runs and bitwise replay.

`RunRecorder` writes ``work_dir/run_log.jsonl`` (`fengine.replay.log`): per start of
`fit` (a *segment*: the first run and each resume) the config that determines the
bits, the horizon, hashes of fengine's sources and of the recipe, and the
environment (versions, device type, thread count, deterministic algorithms); then
state digests at the start, every ``every`` steps and at every checkpoint.

`replay` (``python -m fengine replay WORK_DIR``, `fengine.replay.run`) rebuilds
each segment from its own config and horizon with the recipe's ``from_config``,
re-runs it with `fengine.train_steps` from checkpoint K (default: the initial
state) to checkpoint M (default: the last), compares every recorded digest on the
way and every tensor of checkpoint M bitwise, and reports the first step and
tensor that differ.

Replay runs a recipe's code, so it runs only a recipe the user names
(``--recipe PATH``) or one the run log names that lies under the current directory
or under the source checkout fengine is imported from (a directory with a
``pyproject.toml``), and not inside the work dir; anything else is refused. The
recipe's hash must match the one recorded (``--force`` to replay anyway). Nor does the run
log choose a file to read: a recorded ``load_from`` or data root is used only when the
user passes it (``--path load_from=FILE``); otherwise replay refuses, naming it. A recorded
checkpoint is opened only inside the work dir (an absolute or ``..`` name is compared by its
digest alone), and a recorded config the recipe cannot rebuild is one ``replay:`` line.

A run trained under ``torchrun --nproc_per_node=N`` replays under the same launcher
(``torchrun --nproc_per_node=N -m fengine replay WORK_DIR``): each rank re-runs its shard,
rank 0 compares and reports. FSDP runs are not covered yet.

The guarantee is *exact*: same machine, build and world size give the same bits.
"""

from fengine.replay.env import environment as environment
from fengine.replay.log import (
    LOG_NAME as LOG_NAME,
    ReplayError as ReplayError,
    RunRecorder as RunRecorder,
    code_hash as code_hash,
    read_log as read_log,
    state_digest as state_digest,
)
from fengine.replay.run import replay as replay


__all__ = [
    "LOG_NAME",
    "ReplayError",
    "RunRecorder",
    "code_hash",
    "environment",
    "main",
    "read_log",
    "replay",
    "state_digest",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m fengine replay``: 0 when the replay agrees, 1 when it differs, 2 on an error."""
    import argparse
    import sys

    from fengine import checkpoint, distributed

    ap = argparse.ArgumentParser(
        prog="python -m fengine replay",
        description="Re-run a recorded run segment by segment and compare every bit.",
    )
    ap.add_argument("work_dir", type=str, help="the run's work dir (holds run_log.jsonl)")
    ap.add_argument(
        "--from",
        dest="start",
        type=int,
        default=None,
        metavar="K",
        help="start at the checkpoint of step K (its file must exist; default: the initial state)",
    )
    ap.add_argument(
        "--to",
        type=int,
        default=None,
        metavar="M",
        help="stop at the checkpoint of step M (default: the last); a removed file is "
        "checked against its recorded digest",
    )
    ap.add_argument(
        "--recipe",
        default=None,
        metavar="PATH",
        help="run this recipe instead of the one the run log names (needed when that one lies "
        "outside the current directory and fengine's project)",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="replay even if the recipe or fengine's sources differ from the recorded ones",
    )
    ap.add_argument(
        "--keep-settings",
        action="store_true",
        help="keep this process's thread count and deterministic-algorithms setting "
        "(default: use the recorded ones)",
    )
    ap.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a file or directory the run read (load_from=FILE, data.root=DIR): the run log records "
        "them, but does not choose what a replay reads; repeat for several",
    )
    args = ap.parse_args(argv)
    paths = {}
    for item in args.path:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            ap.error(
                f"--path {item!r}: expected NAME=VALUE, e.g. --path load_from=weights.safetensors"
            )
        paths[name] = value
    try:
        ok = replay(
            args.work_dir,
            start=args.start,
            to=args.to,
            force=args.force,
            recipe=args.recipe,
            keep_settings=args.keep_settings,
            paths=paths,
        )
    except (ReplayError, checkpoint.CheckpointError) as e:
        rank = distributed.launched_rank()  # under torchrun every rank says what stopped it
        print(f"replay{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1
