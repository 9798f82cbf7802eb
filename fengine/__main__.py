"""Command line: ``python -m fengine replay WORK_DIR [--from K] [--to M] [--recipe PATH] [--force]
[--keep-settings]`` (``python -m fengine replay --help`` for details)."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "replay":
        from fengine.replay import main as replay_main

        return replay_main(rest)
    print(f"unknown command {command!r}; commands: replay", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
