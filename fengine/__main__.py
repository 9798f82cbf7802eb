"""``python -m fengine COMMAND``: the engine's own commands (recipes are scripts: ``python recipes/NAME.py --help``)."""

import sys


COMMANDS = {
    "replay": "re-run a recorded run (WORK_DIR) from its run log and check every bit",
}

USAGE = (
    "usage: python -m fengine COMMAND [ARGS...]\n\n"
    "fengine: a functional PyTorch training engine.\n\ncommands:\n"
    + "".join(f"  {name:<8} {text}\n" for name, text in COMMANDS.items())
    + "\n'python -m fengine COMMAND --help' describes a command's arguments.\n"
    "Training runs come from recipes: python recipes/classify.py --help"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "replay":
        from fengine.replay import main as replay_main

        return replay_main(rest)
    print(
        f"python -m fengine: unknown command {command!r}; commands: {', '.join(COMMANDS)} (see --help)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
