"""The command line every recipe shares: config layers, checks, the work dir, resume, errors.

A recipe declares its config as a frozen dataclass tree whose root subclasses `RunConfig`
(the shared top-level flags), writes ``build(cfg) -> Experiment`` and hands both to `main`::

    @dataclasses.dataclass(frozen=True)
    class OptimConfig:
        lr: Annotated[float, cli.Range(gt=0)] = 3e-3
        \"\"\"peak learning rate (per update)\"\"\"          # every field gets a docstring: --help

    @dataclasses.dataclass(frozen=True)
    class Config(cli.RunConfig):
        work_dir: Path = Path("work_dirs/classify")      # redeclare a shared field's default
        max_epochs: Annotated[int | None, cli.Range(ge=1)] = 10
        optim: OptimConfig = OptimConfig()               # nested: --optim.lr 1e-3
        NOT_RECORDED: ClassVar[tuple[str, ...]] = cli.RunConfig.NOT_RECORDED  # + output-only fields

    PRESETS = {"tiny": Config(...), "wide": Config(...)}  # named configs derived from the base

    def build(cfg: Config) -> cli.Experiment: ...        # everything fit needs, from cfg alone
    from_config = cli.replay_hook(Config, build)          # replay's hook (fengine.replay)

    if __name__ == "__main__":
        sys.exit(cli.main(Config, build, presets=PRESETS, description=__doc__, finish=report))

`main` does, in order (`parse` is the first two steps):

1. **Config layers**, each overriding the one before: the dataclass defaults, the base, then
   the flags on the command line. The base is ``--preset NAME`` or ``--config PATH`` (a dumped
   ``config.json``/YAML) when given, else, when resuming (``--resume`` / ``--resume-from``),
   the checkpoint's recorded config and horizon. A horizon flag replaces the other
   (``--max-steps 60`` on an epoch config clears ``max_epochs``; so does a config file that
   gives only one of them).
2. **Checks**: tyro's parse errors and every `Range` in ``Annotated[...]`` metadata, then
   ``cfg.check()`` (cross-field rules: ``--load-from`` with a resume is refused, the
   checkpoint has the weights): one line, exit status 2.
3. **The work dir**: one that already holds a run is refused up front unless ``--resume``
   (continue it) or ``--overwrite`` (the old run is moved to ``<work_dir>.old-<time>``). A run
   that saved no checkpoint (killed before its first save) is moved aside by ``--resume`` too,
   which then starts afresh: a retry loop of the same command goes on.
4. ``build(cfg)``; when resuming, the checkpoint is loaded once against the fresh state (a
   damaged or mismatched file fails here), and a horizon or config that differs from the
   checkpoint's recorded one is reported (``note: ...``) with what it does to the schedule;
   an epoch-based resume whose schedules would end before it does (another ``--accumulate``)
   is refused.
5. ``--dry-run``: `fengine.dryrun.report` (resolved config, parameter groups, model
   complexity, a PNG of every scheduled hyper-parameter) and exit, before any step.
6. Only then ``config.json`` (the resolved config, atomically) and `fit` with the shared
   handlers (Timer, Logger, Checkpointer, RunRecorder, TensorBoard, ProgressBar on a
   terminal) plus ``Experiment.handlers``; then ``finish(cfg, exp, state)`` (a resume with
   nothing left to train runs only ``finish``, on the checkpoint's state).

Library errors reaching `main` print one ``error: ...`` line and exit 1 (a traceback with
``--debug`` or ``FENGINE_DEBUG=1``); `fengine.Preempted` exits 128 + signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import re
import sys
import time
import traceback
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, TypeVar

import torch

from fengine import checkpoint, distributed
from fengine.allocator import steady_cpu_allocations
from fengine.config import from_dict, to_dict, unique_keys


__all__ = [
    "Experiment",
    "Range",
    "RunConfig",
    "UsageError",
    "existing_run",
    "from_record",
    "initial_state",
    "main",
    "parse",
    "recorded_config",
    "replay_hook",
]

C = TypeVar("C", bound="RunConfig")


class UsageError(ValueError):
    """A bad command line or config value: reported in one line, exit status 2."""


class _OutOfRange(UsageError):
    """A value outside its `Range`; ``name`` is the field's dotted name (``optim.lr``)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"--{name.replace('_', '-')} {problem}")
        self.name, self.problem = name, problem


def _check_device(device: str) -> None:
    """``--device`` names a device type the recipes train on, present here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")


@dataclasses.dataclass(frozen=True)
class Range:
    """``Annotated[int, Range(ge=1)]``: the values a field accepts, checked after every parse
    (``None`` always passes: it means "not set"); ``why``, when given, ends the message."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    why: str | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range, or None."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        for bound, ok, text in (
            (self.ge, lambda b: value >= b, ">="),
            (self.gt, lambda b: value > b, ">"),
            (self.le, lambda b: value <= b, "<="),
            (self.lt, lambda b: value < b, "<"),
        ):
            if bound is not None and not (ok(bound) and math.isfinite(value)):
                why = f" ({self.why})" if self.why else ""
                shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
                return f"must be {text} {shown}, got {value!r}{why}"
        return None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The flags every recipe shares: where, how far, how to start. Subclass it."""

    work_dir: Path = Path("work_dirs/run")
    """where checkpoints, logs, config.json and run_log.jsonl go"""
    max_epochs: Annotated[int | None, Range(ge=1)] = None
    """train this many epochs (passes over the training data); giving it clears --max-steps"""
    max_steps: Annotated[int | None, Range(ge=1)] = None
    """train this many optimizer updates instead; giving it clears --max-epochs"""
    seed: Annotated[int, Range(ge=0, lt=2**63, why="a torch seed is a signed 64-bit int")] = 0
    """seed of everything random: weight init, data order, augmentation, dropout"""
    device: str | None = None
    """cpu, cuda or cuda:N (default: cuda when available, else cpu); under torchrun, cuda is cuda:LOCAL_RANK"""
    resume: bool = False
    """continue the run in --work-dir from its latest checkpoint, with the checkpoint's config and
    horizon (flags given override them, --preset or --config replaces them; a difference is
    reported)"""
    resume_from: Path | None = None
    """continue from this checkpoint file (as --resume, from that file)"""
    load_from: Path | None = None
    """start from these weights (a checkpoint, published file, safetensors or .pth state dict);
    partial loading, missing/unexpected names are reported"""
    config: Path | None = None
    """start from this config file (a run's config.json, or YAML); flags given override it"""
    preset: str | None = None
    """start from this named preset (listed above); flags given override it"""
    dry_run: bool = False
    """print the resolved config, parameter groups and model complexity, plot the schedules to
    work_dir/hyperparams.png, and exit before any step"""
    overwrite: bool = False
    """if --work-dir holds another run, move it aside to <work_dir>.old-<time> first"""
    debug: bool = False
    """show the full traceback of an error (also: environment variable FENGINE_DEBUG=1)"""
    progress: bool = True
    """draw a progress bar (only when stdout is a terminal)"""
    log_interval: Annotated[int, Range(ge=1)] = 10
    """log every N updates"""
    checkpoint_interval: Annotated[int, Range(ge=1)] = 1
    """save a checkpoint every N epochs (N epochs' worth of updates with --max-steps); the last is always saved"""
    keep_checkpoints: Annotated[int, Range(ge=-1)] = 3
    """keep the newest N interval checkpoints (-1: all); best and last are kept"""
    tensorboard: bool = True
    """also write TensorBoard event files to the work dir"""

    NOT_RECORDED: ClassVar[tuple[str, ...]] = (
        "work_dir", "max_epochs", "max_steps", "device", "resume", "resume_from", "config", "preset",
        "dry_run", "overwrite", "debug", "progress", "log_interval", "checkpoint_interval",
        "keep_checkpoints", "tensorboard",
    )  # fmt: skip
    """Fields that do not change a bit of the run (the run log records the horizon per segment);
    a recipe adds its own output-only fields."""

    PER_INVOCATION: ClassVar[tuple[str, ...]] = (
        "resume", "resume_from", "config", "dry_run", "overwrite", "debug",
    )  # fmt: skip
    """Fields a config file or checkpoint never supplies: they say how this command starts."""

    def check(self) -> None:
        """Cross-field rules (raise `UsageError`); a recipe extends it with ``super().check()``."""
        if self.max_epochs is not None and self.max_steps is not None:
            raise UsageError(
                f"give --max-epochs or --max-steps, not both (got {self.max_epochs} and {self.max_steps})"
            )
        if self.max_epochs is None and self.max_steps is None:
            raise UsageError("give --max-epochs N or --max-steps N (both are None)")
        if self.resume and self.resume_from is not None:
            raise UsageError(
                "give --resume (the work dir's latest checkpoint) or --resume-from PATH, not both"
            )
        if self.keep_checkpoints == 0:
            raise UsageError("--keep-checkpoints must be -1 (keep all) or >= 1, got 0")
        flag = "--resume" if self.resume else "--resume-from"
        if self.overwrite and self.resuming:
            raise UsageError(f"--overwrite moves the old run aside; give it or {flag}, not both")
        if self.load_from is not None and self.resuming:
            raise UsageError(
                f"--load-from {self.load_from} starts a new run from those weights; {flag} "
                "continues a run from its checkpoint's: give one, not both"
            )
        if self.device is not None:
            _check_device(self.device)

    @property
    def resuming(self) -> bool:
        return self.resume or self.resume_from is not None


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs, built from a config alone (``build(cfg)``; replay rebuilds with it).

    ``hyperparams`` maps a name (``lr``, ``momentum``, ``weight_decay``, ``gen/lr``) to its value
    or schedule, for the dry run's plot; ``param_groups`` (`fengine.optim.ParamGroups`) is printed
    and its per-group schedules plotted; ``example_input`` is what the model is called on for the
    complexity table (None: parameters only); ``handlers`` join the shared ones in `fit`.
    """

    state: Any  # TrainState
    step: Any  # Step
    train_data: Any
    plan: Any  # fengine.Plan
    val: Any = None  # fengine.Val
    hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    param_groups: Any = None
    example_input: Any = None
    handlers: Sequence[Any] = ()


# ----------------------------------------------------------------------- parsing
def parse(
    cls: type[C],
    argv: Sequence[str],
    *,
    presets: Mapping[str, C] | None = None,
    description: str | None = None,
) -> tuple[C, Path | None]:
    """The config from the layers (module doc) and the checkpoint to resume from (or None).

    Raises `UsageError` (one line) for any bad flag, value, preset, config file or checkpoint
    config; ``--help`` prints the help (with the chosen preset's or file's defaults) and exits 0.
    """
    argv = list(argv)
    presets = dict(presets or {})
    desc = _description(description, presets)
    quiet = [a for a in argv if a not in ("-h", "--help")]
    given = _tyro(cls, quiet, None, desc)  # only to read --preset/--config/--resume*/--work-dir
    base = cls()
    if given.preset is not None and given.config is not None:
        raise UsageError("give --preset or --config, not both")
    if given.preset is not None:
        if given.preset not in presets:
            raise UsageError(
                f"--preset {given.preset!r} is unknown; presets are {', '.join(presets) or '(none)'}"
            )
        base = presets[given.preset]
    if given.config is not None:
        base = _fresh(cls, load_config(cls, given.config))
        if given.resuming:  # the file's load_from started its run; the checkpoint has the weights
            base = dataclasses.replace(base, load_from=None)
    base = _horizon_from_argv(base, argv)
    cfg = _tyro(cls, quiet, base, desc)
    ckpt = layered = None
    if cfg.resuming:
        ckpt = _resume_path(cfg)
        if ckpt is not None and given.config is None and given.preset is None:
            base = _horizon_from_argv(_from_checkpoint(cls, ckpt, base), argv)
            layered = ckpt
    cfg = _tyro(cls, argv, base, desc)  # --help ends here, showing the layered defaults
    try:
        check(cfg)
    except _OutOfRange as e:
        if given.config is None or _given(argv, e.name):
            raise
        raise UsageError(f"--config {given.config}: {e.name} {e.problem}") from None
    except UsageError as e:
        if layered is not None and (hint := _dropped_path_hint(str(e), cfg, layered)):
            raise UsageError(f"{e}{hint}") from None
        if given.config is None:
            raise
        # its flags may stand for the file's values (a GPU run's config.json, say: --device cuda)
        raise UsageError(f"{e} (with the values of --config {given.config})") from None
    return cfg, ckpt


def check(cfg: RunConfig) -> None:
    """Every `Range` of the tree, then ``cfg.check()``; raises `UsageError` naming the flag."""
    _check_ranges(cfg, "")
    cfg.check()


def _check_ranges(node: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(node), include_extras=True)
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_ranges(value, name + ".")
            continue
        for meta in getattr(hints.get(f.name), "__metadata__", ()):
            problem = meta.problem(value) if isinstance(meta, Range) else None
            if problem:
                raise _OutOfRange(name, problem)


def _description(description: str | None, presets: Mapping[str, Any]) -> str:
    text = (description or "").strip().split("\n\n")[0]
    listed = ", ".join(presets) if presets else "none (this recipe defines no presets)"
    return (text + "\n\npresets (--preset NAME): " + listed).strip()


def _tyro(cls: type[C], argv: list[str], default: C | None, description: str) -> C:
    """tyro's parse, its error box turned into one line (`UsageError`)."""
    import tyro

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(cls, args=argv, default=default, description=description)  # type: ignore[return-value]
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError(_one_line(err.getvalue()) or f"bad arguments {argv}") from None


def _one_line(text: str) -> str:
    """The first paragraph of tyro's error box, as one line."""
    words: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("╭") or line.startswith("usage:"):
            continue
        line = line.strip("│╰╯ ").strip()
        if not line:
            if words:
                break
            continue
        if set(line) <= set("─━"):
            break
        words.append(line)
    return " ".join(words).removesuffix(".")


def _given(argv: Sequence[str], name: str) -> bool:
    flags = {"--" + name.replace("_", "-"), "--" + name}
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)


def _horizon_from_argv(base: C, argv: Sequence[str]) -> C:
    """A horizon flag on the command line replaces the layers' horizon of the other kind."""
    steps, epochs = _given(argv, "max_steps"), _given(argv, "max_epochs")
    if steps and not epochs:
        return dataclasses.replace(base, max_epochs=None)
    if epochs and not steps:
        return dataclasses.replace(base, max_steps=None)
    return base


def _fresh(cls: type[C], cfg: C) -> C:
    """``cfg`` without the per-invocation fields (they come from this command line only). A
    file's ``preset`` is kept as the record of where its values started; it is not applied."""
    defaults = cls()
    return dataclasses.replace(
        cfg, **{name: getattr(defaults, name) for name in cls.PER_INVOCATION}
    )


def load_config(cls: type[C], path: Path) -> C:
    """A config file (JSON, or YAML with PyYAML installed) as ``cls``; missing fields take their
    defaults. `UsageError` for an unreadable file, an unknown field or a wrong type."""
    try:
        text = _read_small_file(Path(path))
        if Path(path).suffix in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise ValueError(
                    "a YAML config needs PyYAML: pip install fengine[yaml] (or give the config as JSON)"
                ) from None
            try:
                data = yaml.load(text, Loader=_yaml_loader(yaml))  # noqa: S506 - a SafeLoader
            except yaml.YAMLError as e:
                raise ValueError(_yaml_problem(e)) from None
        else:
            data = json.loads(text, object_pairs_hook=unique_keys)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    except RecursionError:
        raise UsageError(f"--config {path}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"--config {path}: expected a mapping of fields, got {type(data).__name__}"
        )
    horizons = ("max_epochs", "max_steps")
    given = [k for k in horizons if data.get(k) is not None]
    if len(given) == 1 and all(k in given or k not in data for k in horizons):
        data = {**data, **{k: None for k in horizons if k not in given}}  # as the flags do
    try:
        return from_dict(cls, data)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    except RecursionError:
        raise UsageError(f"--config {path}: nested too deeply to be a config") from None


_CONFIG_MAX_BYTES = 16 << 20


def _read_small_file(path: Path) -> str:
    """A config file's text: a regular file (a FIFO would block, /dev/zero would fill memory) of
    at most 16 MiB."""
    if not path.is_file():
        raise ValueError("not a regular file" if path.exists() else "no such file")
    with open(path, "rb") as f:
        data = f.read(_CONFIG_MAX_BYTES + 1)
    if len(data) > _CONFIG_MAX_BYTES:
        raise ValueError(f"larger than {_CONFIG_MAX_BYTES >> 20} MiB: not a config")
    return data.decode("utf-8")


# The plain scalars read as other than strings, near YAML 1.2's core schema (a plain scalar
# matching none is a string): its nulls, bools and floats; ints in decimal without a leading 0
# (``017`` stays a string: PyYAML would read it as octal), `_` allowed between digits (dropped, as
# Python does; not in YAML 1.2), or unsigned hex ``0x1F``; no octal: ``0o17`` stays a string.
_YAML_12 = {
    "null": r"~|null|Null|NULL|",
    "bool": r"true|True|TRUE|false|False|FALSE",
    "int": r"[-+]?(?:0|[1-9](?:_?[0-9])*)|0x[0-9a-fA-F]+",
    "float": r"[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
}


def _yaml_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader reading plain data by YAML 1.2's rules (`_YAML_12`), as JSON does:
    PyYAML's YAML 1.1 read ``017`` as 15, ``1:30`` as 90, ``yes``/``on`` as true and ``1e-3`` as
    a string; here ``017`` and ``yes`` stay strings, which a typed field refuses. Aliases and
    anchors are refused (nine nested aliases make a list of 387M items), and so is a key given
    twice in one mapping."""

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                mark, sign = event.start_mark, "*" if isinstance(event, yaml.AliasEvent) else "&"
                raise ValueError(
                    f"YAML aliases are not supported in a config: {sign}{anchor[:40]} at line "
                    f"{mark.line + 1}, column {mark.column + 1}"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            data = super().construct_mapping(node, deep=deep)
            if len(data) < len(node.value):
                seen: set = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {repr(key)[:80]}", key_node.start_mark
                        )
                    seen.add(key)
            return data

    Loader.yaml_implicit_resolvers = {}  # its own: SafeLoader's (YAML 1.1) stay as they are
    for kind, pattern in _YAML_12.items():
        Loader.add_implicit_resolver(
            f"tag:yaml.org,2002:{kind}", re.compile(f"^(?:{pattern})$"), None
        )
    return Loader


def _yaml_problem(e: Exception) -> str:
    """PyYAML's multi-line error as one line: the problem and where it is."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML: {problem}{where}"


def _resume_path(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from: ``--resume-from``'s, or the work dir's latest (None: none)."""
    if cfg.resume_from is not None:
        if not cfg.resume_from.exists():
            raise UsageError(f"--resume-from {cfg.resume_from}: no such file")
        if not cfg.resume_from.is_file():
            raise UsageError(
                f"--resume-from {cfg.resume_from}: not a regular file (expected a checkpoint file)"
            )
        return cfg.resume_from
    if not cfg.work_dir.is_dir():
        return None
    with warnings.catch_warnings(record=True) as said:  # a fallback: one line, not a warning's two
        warnings.simplefilter("always")
        path = checkpoint.latest(cfg.work_dir)
    if distributed.launched_rank() == 0:  # under torchrun every rank looks: rank 0 says it
        for w in said:
            print(f"warning: {w.message}", file=sys.stderr)
    return path


def _checkpoint_run(path: Path) -> tuple[dict | None, dict]:
    """The config and the run facts (horizon, world size) a checkpoint recorded."""
    meta = checkpoint.read_meta(path)["meta"]
    meta = meta if isinstance(meta, Mapping) else {}
    config, run = meta.get("config"), meta.get("run")
    return (
        dict(config) if isinstance(config, Mapping) else None,
        dict(run) if isinstance(run, Mapping) else {},
    )


def _from_checkpoint(cls: type[C], path: Path, base: C) -> C:
    """The checkpoint's recorded config and horizon as the base layer (how-to-start fields and
    ``load_from`` stay this command's: the weights come from the checkpoint)."""
    recorded, run = _checkpoint_run(path)
    if recorded is None:
        return base
    drop = {"device", "preset", *cls.PER_INVOCATION}
    try:
        cfg = from_dict(cls, {k: v for k, v in recorded.items() if k not in drop})
    except (TypeError, ValueError) as e:
        raise UsageError(
            f"{path} records a config this recipe cannot read ({e}); give --config PATH with a "
            "config that fits"
        ) from None
    keep = {name: getattr(base, name) for name in drop if name != "preset"}
    by_epoch = run.get("by_epoch")
    if by_epoch is True:
        keep.update(max_epochs=run.get("max_epochs"), max_steps=None)
    elif by_epoch is False:
        keep.update(max_epochs=None, max_steps=run.get("max_steps"))
    return _paths_from(base, dataclasses.replace(cfg, **keep))


def _paths_from(base: Any, cfg: Any) -> Any:
    """``cfg`` with every path field (``work_dir``, ``load_from``, a data root, nested too) taken
    from ``base``: a checkpoint is an untrusted file and never chooses a path to read or write."""

    def of_base(names: tuple[str, ...], _: Any) -> Any:
        node, mine, same = base, cfg, True
        for name in names[:-1]:
            node, mine = getattr(node, name, None), getattr(mine, name)
            same = same and type(node) is type(mine)
        if not same:  # a union field holding another class than the base's: its own default
            return _field_default(type(mine), names[-1])
        return getattr(node, names[-1])

    return _replace_paths(cfg, of_base)


def _dropped_path_hint(error: str, cfg: Any, path: Path) -> str:
    """For an error naming a path flag that is unset here but that the checkpoint at ``path``
    recorded (`_paths_from` drops it): why it is unset and the flag to give, else ``""``."""
    recorded = _checkpoint_run(path)[0] or {}
    hints: list[str] = []

    def hint(names: tuple[str, ...], value: Any) -> Any:
        was: Any = recorded
        for name in names:
            was = was.get(name) if isinstance(was, Mapping) else None
        flag = "--" + ".".join(names).replace("_", "-")
        named = flag in error or "--" + ".".join(names) in error
        if value is None and isinstance(was, str) and named:
            hints.append(
                f"; {path} recorded {'.'.join(names)}={was}, and a checkpoint never chooses a "
                f"path: pass {flag} {was}"
            )
        return value

    _replace_paths(cfg, hint)
    return "".join(hints)


def _field_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``; a `UsageError` when it has none (the
    untrusted file would have to choose the path)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise UsageError(
        f"the recorded config holds a {cls.__name__}, whose path field {name!r} has no default: "
        "a recorded config never chooses a path; give the config on the command line"
    )


def _absolute_paths(cfg: Any) -> Any:
    """``cfg`` with every path field (nested too) made absolute."""
    return _replace_paths(cfg, lambda _, v: Path(v).absolute() if isinstance(v, PurePath) else v)


def _replace_paths(
    cfg: Any, new: Callable[[tuple[str, ...], Any], Any], at: tuple[str, ...] = ()
) -> Any:
    """``cfg`` with each path field replaced by ``new(its field names from the root, its value)``."""
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _replace_paths(value, new, (*at, f.name))
        elif _is_path_type(hints.get(f.name)):
            changes[f.name] = new((*at, f.name), value)
    return dataclasses.replace(cfg, **changes)


def _is_path_type(tp: Any) -> bool:
    return tp is not None and (
        (isinstance(tp, type) and issubclass(tp, PurePath))
        or any(_is_path_type(arg) for arg in typing.get_args(tp))
    )


# ----------------------------------------------------------------------- records
def recorded_config(cfg: RunConfig) -> dict[str, Any]:
    """What determines the bits, as the run log records it: the config without ``NOT_RECORDED``
    fields, ``load_from`` made absolute (a replay from another directory finds the same file)."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in type(cfg).NOT_RECORDED}
    if cfg.load_from is not None:
        config["load_from"] = str(cfg.load_from.resolve())
    return config


def from_record(
    cls: type[C],
    config: Mapping[str, Any],
    *,
    max_epochs: int | None,
    max_steps: int | None,
    paths: Mapping[str, str | PurePath] | None = None,
) -> C:
    """The config of one recorded segment (replay's ``from_config`` hook): the recorded fields,
    this segment's horizon, defaults for the rest.

    A run log is an untrusted file: it chooses no path to read. Every path field (``load_from``,
    a data root; nested ones by dotted name, ``data.root``) takes its value from ``paths`` (the
    user's ``python -m fengine replay W --path load_from=FILE``) or else its default; a recorded
    path that differs from the default and was not given raises `ReplayError` naming the flag
    to pass. ``work_dir`` takes its default (a build reads nothing there).
    """
    from fengine.replay import ReplayError

    cfg = from_dict(cls, {**config, "max_epochs": max_epochs, "max_steps": max_steps})
    try:
        check(cfg)  # a run log's values pass the ranges a command line's must
    except UsageError as e:
        raise ReplayError(f"the run log records a config the recipe refuses: {e}") from None
    given = {k: Path(v) for k, v in (paths or {}).items()}
    unconfirmed: list[str] = []
    cfg, known = _confirmed_paths(cfg, cls(), given, "", unconfirmed)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ReplayError(
            f"--path {unknown[0]}: {cls.__name__} has no path field of that name; its path fields "
            f"are {sorted(known)}"
        )
    if unconfirmed:
        flags = " ".join(f"--path {u}" for u in unconfirmed)
        raise ReplayError(
            f"the run log records {', '.join(unconfirmed)}; a run log does not choose the files a "
            f"replay reads: check them and pass {flags}"
        )
    return cfg


def replay_hook(cls: type[C], build: Callable[[C], Experiment]) -> Callable[..., Experiment]:
    """A recipe's ``from_config`` (replay's hook): ``from_config = cli.replay_hook(Config, build)``
    rebuilds one segment with `from_record` (its recorded config and horizon; the files it reads
    only from ``paths``, the user's ``--path``)."""

    def from_config(
        config: Mapping[str, Any],
        *,
        max_epochs: int | None,
        max_steps: int | None,
        paths: Mapping[str, str] | None = None,
    ) -> Experiment:
        cfg = from_record(cls, config, max_epochs=max_epochs, max_steps=max_steps, paths=paths)
        return build(cfg)

    from_config.__doc__ = (
        f"Rebuild one segment of a {cls.__name__} run (`fengine.cli.replay_hook`)."
    )
    return from_config


def initial_state(step: Any, model: Any, cfg: RunConfig, device: Any = None) -> Any:
    """``step.init(model, seed=cfg.seed, device=device)``, then the weights of ``cfg.load_from``
    when given (MMEngine's ``load_from``; `fengine.checkpoint.load_params`), its report printed.
    A CPU run first fixes malloc's thresholds (`fengine.allocator.steady_cpu_allocations`)."""
    if device is None or torch.device(device).type == "cpu":
        steady_cpu_allocations()
    state = step.init(model, seed=cfg.seed, device=device)
    if cfg.load_from is not None:
        try:
            state, report = checkpoint.load_params(cfg.load_from, state)
        except checkpoint.CheckpointError as e:  # named by the flag, as --resume-from's
            e.args = (f"--load-from {e}", *e.args[1:])
            raise
        print(report)
    return state


def _confirmed_paths(
    cfg: Any, default: Any, given: Mapping[str, Path], prefix: str, unconfirmed: list[str]
) -> tuple[Any, set[str]]:
    """``cfg`` with each path field it recorded (not None) from ``given`` or ``default``; the
    dotted names of its path fields. Recorded paths that differ from the default and are not
    given go to ``unconfirmed``."""
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    names: set[str] = set()
    for f in dataclasses.fields(cfg):
        name, recorded = prefix + f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(recorded) and not isinstance(recorded, type):
            sub = getattr(default, f.name, None)
            if type(sub) is not type(recorded):  # a union field holding another class
                sub = _class_defaults(type(recorded))
            changes[f.name], inner = _confirmed_paths(recorded, sub, given, name + ".", unconfirmed)
            names |= inner
        elif _is_path_type(hints.get(f.name)):
            names.add(name)
            fallback = getattr(default, f.name, None)
            if recorded is None:  # nothing read: a --path for it is not this segment's
                continue
            if name in given:
                changes[f.name] = given[name]
            else:
                if name != "work_dir" and recorded != fallback:
                    unconfirmed.append(f"{name}={recorded}")
                changes[f.name] = fallback
    return dataclasses.replace(cfg, **changes), names


def _class_defaults(cls: type) -> Any:
    """``cls()`` (its defaults), or None when it has required fields (its paths then have no
    default to fall back on: they must be confirmed)."""
    try:
        return cls()
    except TypeError:
        return None


# ----------------------------------------------------------------------- the work dir
RUN_FILES = ("config.json", "run_log.jsonl", "last_checkpoint", "scalars.jsonl")


def existing_run(work_dir: Path) -> list[str]:
    """Names of the files in ``work_dir`` that show it holds a run (empty: it holds none)."""
    if not work_dir.is_dir():
        return []
    found = [
        p.name
        for p in sorted(work_dir.iterdir())
        if p.name in RUN_FILES or p.suffix in (".safetensors", ".log")
    ]
    return found


def _move_aside(work_dir: Path) -> Path:
    """Rename the work dir to ``<work_dir>.old-<time>[-N]`` under its lock (not while a run holds it)."""
    from fengine.workdir import lock_work_dir

    stamp = time.strftime("%Y%m%d_%H%M%S")
    work_dir = work_dir.resolve()  # "." has no name to suffix
    target = work_dir.with_name(f"{work_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = work_dir.with_name(f"{work_dir.name}.old-{stamp}-{n}")
    with lock_work_dir(work_dir):
        os.rename(work_dir, target)
    return target


def _check_work_dir(cfg: RunConfig, ckpt: Path | None, out: Callable[[str], Any]) -> None:
    """Refuse a work dir holding another run, unless this continues it (a checkpoint inside it)."""
    for p in (cfg.work_dir, *cfg.work_dir.parents):
        if p.exists() and not p.is_dir():
            what = "is" if p == cfg.work_dir else f"is inside {p}, which is"
            raise UsageError(f"--work-dir {cfg.work_dir} {what} a file, not a directory")
    found = existing_run(cfg.work_dir)
    if not found or (ckpt is not None and ckpt.resolve().is_relative_to(cfg.work_dir.resolve())):
        return
    from fengine.workdir import lock_work_dir

    with lock_work_dir(cfg.work_dir):  # a run going on there is reported as such (WorkDirLocked)
        pass
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    saved_nothing = not any(cfg.work_dir.glob("*.safetensors"))
    if cfg.resume and saved_nothing:  # killed before its first save (MMEngine starts afresh)
        why = "that saved no checkpoint: --resume moves it aside and starts afresh"
    elif cfg.resume:
        why = "but no checkpoint to resume: start afresh in another --work-dir or with --overwrite"
    elif cfg.resume_from is not None:
        why = f"and {cfg.resume_from} is not one of its checkpoints: resume into another --work-dir"
    elif saved_nothing:  # --resume would start over
        why = "it has no checkpoint to continue from: choose another --work-dir, or pass --overwrite to move it aside"
    else:
        why = "continue it with --resume, choose another --work-dir, or pass --overwrite to move it aside"
    if cfg.dry_run:
        out(f"note: {cfg.work_dir} already holds a run ({shown}), {why}")
        return
    if not (cfg.overwrite or cfg.resume and saved_nothing):
        raise UsageError(f"{cfg.work_dir} already holds a run ({shown}): {why}")
    flag = "--overwrite" if cfg.overwrite else "--resume"
    if Path.cwd().is_relative_to(cfg.work_dir.resolve()):
        raise UsageError(
            f"{flag} would move aside {cfg.work_dir.resolve()}, the directory this command "
            "runs in (the new run would land in the moved one); run it from outside that directory"
        )
    moved = _move_aside(cfg.work_dir)
    if cfg.overwrite:
        out(f"--overwrite: moved the previous run in {cfg.work_dir} to {moved}")
    else:
        out(
            f"--resume: the run in {cfg.work_dir} saved no checkpoint (stopped before its first "
            f"save); moved it to {moved} and starting from scratch"
        )


def write_config(cfg: RunConfig) -> Path:
    """The resolved config to ``work_dir/config.json``, atomically (a crash leaves the old one)."""
    from fengine.checkpoint._io import atomic_write, pwrite_all

    resolved = to_dict(_absolute_paths(cfg))  # --config works from any directory
    data = (json.dumps(resolved, indent=2) + "\n").encode("utf-8")
    # a fresh O_EXCL temp name: a link planted in the work dir is never written through
    return atomic_write(
        cfg.work_dir / "config.json", lambda fd: pwrite_all(fd, memoryview(data), 0), what="config"
    )


# ----------------------------------------------------------------------- resume
def _same_or_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d for k in sorted({*a, *b}) for d in _same_or_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        ]
    return [] if a == b else [f"{prefix.rstrip('.')} {a!r} -> {b!r}"]


def _horizon_text(max_epochs: Any, max_steps: Any) -> str:
    return f"{max_epochs}-epoch" if max_epochs else f"{max_steps}-step"


def resume_notes(cfg: RunConfig, exp: Experiment, path: Path) -> tuple[list[str], Any]:
    """Check the checkpoint against the fresh state (loads it once: a damaged or mismatched file
    fails here, before anything is written) and say how this run differs from the checkpoint's.
    A horizon it is past, or an epoch-based run that would not end where its schedules do (another
    world size, say), is a `UsageError`.

    Returns the notes and, when nothing is left to train, the loaded state (else None: `fit`
    loads it again, and one copy of the state is kept).
    """
    from fengine import optim

    recorded, run = _checkpoint_run(path)
    notes: list[str] = []
    plan = exp.plan
    changed: list[str] = []
    if recorded is not None:
        now = {k: v for k, v in to_dict(cfg).items() if k not in type(cfg).NOT_RECORDED}
        was = {k: v for k, v in recorded.items() if k in now}
        now.pop("load_from", None), was.pop("load_from", None)
        changed = _same_or_diff(was, now)
        if changed:
            notes.append(
                f"note: the config differs from the one {path} recorded: {'; '.join(changed)}"
            )
    try:
        loaded = _validated(path, exp.state)
    except checkpoint.CheckpointMismatchError as e:
        if not changed:
            raise
        entries = [f"{m} missing from the file" for m in e.missing]
        entries += [f"{u} not in this run's state" for u in e.unexpected]
        entries += [f"{n}: {a} in the file, {b} here" for n, a, b in (*e.shape, *e.dtype)]
        entries += [str(k) for k in e.kind]
        raise UsageError(
            f"{path} cannot continue with this config: it changes the state's layout "
            f"({len(entries)} entries differ, e.g. {'; '.join(entries[:3])}); "
            "the config differs from the one it recorded: "
            f"{'; '.join(changed)}. Resume without those changes, or start a new run in another "
            f"--work-dir with --load-from {path} (its weights)"
        ) from None
    old_epochs, old_total = run.get("max_epochs"), run.get("max_steps")
    new_epochs = plan.max_epochs
    step = loaded.step
    if old_total is not None and (old_total != plan.total_steps or old_epochs != new_epochs):
        was_h = _horizon_text(old_epochs, old_total)
        now_h = _horizon_text(new_epochs, plan.total_steps)
        last = optim.hyperparams(loaded.opt_state)
        lr_was = last.get("lr", last.get("base_lr"))  # param groups: their base lr
        lr = exp.hyperparams.get("lr")
        lr_now = optim.resolve(lr, step) if lr is not None else None
        lr_text = (
            f" (lr of the last update {lr_was:.3g}, of the next {lr_now:.3g})"
            if lr_was is not None and lr_now is not None
            else ""
        )
        notes.append(
            f"note: {path} is at step {step} of a {was_h} run ({old_total} updates); this run is "
            f"a {now_h} run ({plan.total_steps} updates), so its schedules are re-planned over "
            f"{plan.total_steps} updates from step {step} on{lr_text}: not what a straight {now_h} "
            "run computes (replay re-runs each part with its own horizon)"
        )
    done = plan.done(loaded)
    end = _end_step(loaded, plan, run, path) if plan.by_epoch and not done else 0
    past = loaded.epoch > plan.max_epochs if plan.by_epoch else loaded.step > plan.total_steps
    if past:
        raise UsageError(
            f"{path} is at step {step} (epoch {loaded.epoch}), past this run's horizon "
            f"({_horizon_text(plan.max_epochs, plan.total_steps)} run): give a larger "
            "--max-steps or --max-epochs"
        )
    if done:
        notes.append(
            f"{path} is the end of its {_horizon_text(plan.max_epochs, plan.total_steps)} run: "
            "nothing to train (give a larger --max-steps or --max-epochs to train on)"
        )
    elif plan.by_epoch and end != plan.total_steps:  # past their end, or short of it
        saved, world = run.get("world_size", 1), distributed.world_size()
        moved = [f"saved by {saved} processes, resumed in {world}"] if saved != world else []
        why = "; ".join(changed + moved) or "the updates per epoch differ from its run's"
        raise UsageError(
            f"{path} is at step {step} (epoch {loaded.epoch}); this {plan.max_epochs}-epoch run "
            f"plans its schedules over {plan.total_steps} updates ({plan.steps_per_epoch} per "
            f"epoch) but would train to step {end}, "
            f"{'past' if end > plan.total_steps else 'short of'} their end ({why}): resume "
            f"without that change, or give the horizon in updates (--max-steps {end})"
        )
    return notes, loaded if done else None


def _end_step(state: Any, plan: Any, run: Mapping[str, Any], path: Path) -> int:
    """The update an epoch-based run resumed at ``state`` ends at: the rest of its epoch (in this
    world size's batches: `fit`'s `fengine.loop.repartition`), then the epochs left."""
    from fengine.loop import repartition

    at = repartition(state, run.get("world_size", 1), distributed.world_size(), path,
                     run.get("batches_per_epoch"))  # fmt: skip
    rest = max(0, math.ceil((plan.batches_per_epoch - at.batch_in_epoch) / plan.micro_batches))
    return at.step + rest + (plan.max_epochs - at.epoch - 1) * plan.steps_per_epoch


def _validated(path: Path, like: Any) -> Any:
    """The checkpoint loaded into ``like``'s shape; a file lacking only wrapper state (an EMA
    added on resume) is loaded without it, as `fit` does."""
    try:
        return checkpoint.load(path, like=like)
    except checkpoint.CheckpointMismatchError as e:
        names = {m.split("/")[1] for m in e.missing if m.startswith("extra/")}
        if not names or any(not m.startswith("extra/") for m in e.missing) or e.unexpected:
            raise
        extra = {k: v for k, v in like.extra.items() if k not in names}
        return checkpoint.load(path, like=like.replace(extra=extra))


# ----------------------------------------------------------------------- running
def run_handlers(cfg: RunConfig, exp: Experiment, recipe: Path | None) -> list[Any]:
    """The shared handlers: Timer, Logger, Checkpointer, RunRecorder, TensorBoard, ProgressBar,
    then the experiment's own."""
    from fengine import handlers
    from fengine.replay import RunRecorder

    timer = handlers.Timer()
    best = "auto" if exp.val is not None else None
    if exp.plan.by_epoch:
        saver = handlers.Checkpointer(
            cfg.checkpoint_interval, max_keep_ckpts=cfg.keep_checkpoints, save_best=best
        )
    else:
        saver = handlers.Checkpointer(cfg.checkpoint_interval * exp.plan.steps_per_epoch,
                                      by_epoch=False, max_keep_ckpts=cfg.keep_checkpoints,
                                      save_best=best)  # fmt: skip
    hs: list[Any] = [
        timer,
        handlers.Logger(interval=cfg.log_interval, timer=timer),
        saver,
        RunRecorder(every=100, recipe=recipe, config=recorded_config(cfg)),
    ]
    if cfg.tensorboard:
        hs.append(handlers.TensorBoard(timer=timer))
    if cfg.progress:
        hs.append(handlers.ProgressBar())
    return [*hs, *exp.handlers]


def train(cfg: RunConfig, exp: Experiment, resume: Path | None, recipe: Path | None = None) -> Any:
    """``config.json`` (rank 0), then `fit` with the shared handlers; returns the final state."""
    import fengine as fe

    main_rank = fe.distributed.is_main()
    with fe.lock_work_dir(cfg.work_dir if main_rank else None):
        if main_rank:
            write_config(cfg)
        horizon = (
            dict(max_epochs=exp.plan.max_epochs)
            if exp.plan.by_epoch
            else dict(max_steps=exp.plan.total_steps)
        )
        return fe.fit(exp.state, exp.step, exp.train_data, val=exp.val,
                      handlers=run_handlers(cfg, exp, recipe), work_dir=cfg.work_dir,
                      resume=resume if resume is not None else False, config=to_dict(cfg),
                      **horizon)  # fmt: skip


def main(
    cls: type[C],
    build: Callable[[C], Experiment],
    *,
    presets: Mapping[str, C] | None = None,
    description: str | None = None,
    finish: Callable[[C, Experiment, Any], Any] | None = None,
    argv: Sequence[str] | None = None,
    out: Callable[[str], Any] = print,
) -> int:
    """Run a recipe from the command line (module doc); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FENGINE_DEBUG", "") not in ("", "0")
    prog = Path(sys.argv[0]).name or "recipe"
    import fengine as fe

    main_rank = distributed.launched_rank() == 0  # under torchrun, rank 0 says the notes once
    say = out if main_rank else (lambda line: None)
    try:
        cfg, ckpt = parse(cls, argv, presets=presets, description=description)
        if (
            cfg.config is not None
            and not _given(argv, "work_dir")
            and cfg.work_dir != dataclasses.replace(cfg, work_dir=cls().work_dir).work_dir
        ):
            # a config file chose where this run writes: said, not silent
            say(f"note: --work-dir {cfg.work_dir} comes from --config {cfg.config}")
        if main_rank:
            _check_work_dir(cfg, ckpt, out)
        if cfg.resuming and ckpt is None:
            say(f"note: no checkpoint in {cfg.work_dir}: starting from scratch")
        exp = build(cfg)
        ended = None
        if ckpt is not None:
            notes, ended = resume_notes(cfg, exp, ckpt)
            for note in notes:
                say(note)
        if cfg.dry_run:
            from fengine import dryrun

            dryrun.report(cfg, exp, out=out)
            return 0
        # at its end: only finish runs (again, when it was cut short after the last save)
        state = ended if ended is not None else train(cfg, exp, ckpt, _source_of(build))
        if finish is not None:
            finish(cfg, exp, state)
        return 0
    except UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e} (see --help)", file=sys.stderr)
        return 2
    except fe.WorkDirLocked as busy:  # another process is running there
        print(f"{prog}: error: {busy}", file=sys.stderr)
        return 2
    except fe.Preempted as stopped:  # a checkpoint was saved: resume with --resume
        if main_rank:
            print(stopped, file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a library error reaching the top: one line unless --debug
        if debug:
            raise
        print(f"error: {_message(e)}", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.strerror or type(e).__name__}: {e.filename}"
    return text if text else type(e).__name__


def _source_of(fn: Callable) -> Path | None:
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:
        return None
    return Path(source).resolve() if source else None
