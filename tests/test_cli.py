"""fengine.cli through recipes/classify.py, run in this process: config layers, checks, the work
dir, resume notes, errors, the dry run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import field_docs

from fengine import checkpoint, cli
from fengine.config import to_dict
from fengine.replay import ReplayError
from fengine.workdir import lock_work_dir


ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "classify.py"
# 1437 training digits in batches of 512: 3 updates per epoch, so checkpoints at every 3 steps
FAST = ["--preset", "tiny", "--data.batch-size", "512", "--no-tensorboard", "--no-progress",
        "--log-interval", "50"]  # fmt: skip


def _load_recipe():
    spec = importlib.util.spec_from_file_location("classify_recipe_under_test", RECIPE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


classify = _load_recipe()


def run(*argv: str, out: list | None = None) -> int:
    """The recipe's command line in this process; notes go to ``out``."""
    sink = out if out is not None else []
    return cli.main(classify.Config, classify.build, presets=classify.PRESETS,
                    description=classify.__doc__, finish=classify.finish, argv=list(argv),
                    out=sink.append)  # fmt: skip


def parse(*argv: str):
    return cli.parse(classify.Config, list(argv), presets=classify.PRESETS)


# ----------------------------------------------------------------------- help
def test_every_field_of_the_config_tree_has_help_text():
    def walk(cls: type, prefix: str) -> list[str]:
        missing = []
        for name, doc in field_docs(cls).items():
            sub = next(f for f in dataclasses.fields(cls) if f.name == name).default
            if dataclasses.is_dataclass(sub):
                missing += walk(type(sub), f"{prefix}{name}.")
            elif not doc:
                missing.append(prefix + name)
        return missing

    assert walk(classify.Config, "") == []


def test_help_lists_shared_flags_presets_and_nested_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--work-dir", "--max-steps", "--max-epochs", "--seed", "--resume", "--resume-from",
                 "--load-from", "--device", "--config", "--dry-run", "--overwrite", "--debug",
                 "--no-progress", "--preset", "--optim.lr", "--data.name", "--data.root", "--accumulate",
                 "--ema", "--amp", "--optim.clip-grad"):  # fmt: skip
        assert flag in text, flag
    assert "presets (--preset NAME): tiny, base, wide" in text


def test_help_shows_the_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        parse("--preset", "wide", "--help")
    assert "(default: 64)" in capsys.readouterr().out  # --model.width of the wide preset


def test_python_m_fengine_help_lists_its_commands(capsys):
    from fengine.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m fengine COMMAND") and "\n  replay   re-run" in out
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'; commands: replay" in capsys.readouterr().err


# ----------------------------------------------------------------------- config layers
def test_defaults_resolve_the_horizon_and_a_horizon_flag_replaces_the_other():
    cfg, _ = parse()
    assert (cfg.max_epochs, cfg.max_steps) == (10, None)  # the dump says 10, not null
    cfg, _ = parse("--max-steps", "30")
    assert (cfg.max_epochs, cfg.max_steps) == (None, 30)


def test_presets_derive_from_the_base_and_flags_override_them():
    cfg, _ = parse("--preset", "wide", "--model.blocks", "1", "--optim.lr", "0.01")
    assert cfg.model == classify.ModelConfig(width=64, blocks=1)
    assert cfg.optim.lr == 0.01 and cfg.optim.name == "adamw" and cfg.preset == "wide"


def test_config_dump_reload_gives_the_same_resolved_config(tmp_path):
    cfg, _ = parse("--preset", "tiny", "--max-steps", "7", "--optim.name", "sgd", "--ema", "0.9",
                   "--data.no-augment", "--work-dir", str(tmp_path / "w"))  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    again, _ = parse("--config", str(path))
    assert again == dataclasses.replace(cfg, config=path)
    assert to_dict(again) == {**to_dict(cfg), "config": str(path)}
    # flags apply on top; a horizon flag replaces the file's horizon
    over, _ = parse("--config", str(path), "--optim.lr", "0.5", "--max-epochs", "2")
    assert over == dataclasses.replace(cfg, config=path, max_steps=None, max_epochs=2,
                                       optim=dataclasses.replace(cfg.optim, lr=0.5))  # fmt: skip


def test_yaml_config_and_partial_files_take_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 0.02\n")
    cfg, _ = parse("--config", str(path))
    assert cfg.seed == 3 and cfg.optim.lr == 0.02 and cfg.optim.name == "adamw"
    assert cfg.max_epochs == 10


def test_a_yaml_config_without_pyyaml_names_the_extra(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # not installed: the import fails
    assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert "a YAML config needs PyYAML: pip install fengine[yaml]" in err and err.count("\n") == 1


# ----------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--max-epochs", "-2"], "--max-epochs must be >= 1, got -2"),
        (["--accumulate", "0"], "--accumulate must be >= 1, got 0"),
        (["--optim.lr", "-1"], "--optim.lr must be > 0, got -1.0"),
        (["--optim.lr", "nan"], "--optim.lr must be > 0, got nan"),
        (["--data.batch-size", "0"], "--data.batch-size must be >= 1, got 0"),
        (["--data.num-workers", "65"], "--data.num-workers must be <= 64, got 65"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be -1 (keep all) or >= 1, got 0"),
        (["--max-steps", "5", "--max-epochs", "2"], "give --max-epochs or --max-steps, not both"),
        (["--bogus", "1"], "Unrecognized options: --bogus"),
        (["--model.widht", "3"], "Unrecognized options: --model.widht"),
        (["--max-steps", "x"], "Error parsing --max-steps"),
        (["--optim.name", "lion"], "--optim.name"),
        (["--preset", "huge"], "--preset 'huge' is unknown; presets are tiny, base, wide"),
        (["--preset", "tiny", "--config", "x.json"], "give --preset or --config, not both"),
        (["--config", "/nonexistent/c.json"], "--config /nonexistent/c.json: no such file"),
        (["--data.name", "cifar10"], "--data.name cifar10 needs --data.root PATH"),
        (["--resume-from", "/nonexistent.safetensors"], "--resume-from /nonexistent.safetensors: no such file"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_with_exit_status_2(argv, message, capsys, tmp_path):
    assert run(*argv, "--work-dir", str(tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("classify.py: error: ") or "error: " in err
    assert err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "w").exists()  # nothing written


def test_unknown_field_in_a_config_file_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}}))
    assert run("--config", str(path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OptimConfig has no fields ['betas']" in err


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": None}, "Config.model: got null, expected ModelConfig"),
        ({"optim": {"lr": None}}, "Config.optim.lr: got null, expected float"),
        ({"seed": True}, "Config.seed: expected int, got True"),
    ],
)
def test_a_null_or_mistyped_field_in_a_config_file_is_a_usage_error(
    tmp_path, capsys, data, message
):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "w").exists()


def test_usage_error_from_a_subprocess_exits_2_with_one_line():
    out = subprocess.run([sys.executable, str(RECIPE), "--max-steps", "0"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "classify.py: error: --max-steps must be >= 1, got 0 (see --help)\n"


def test_range_checks_against_hand_values():
    r = cli.Range(ge=1)
    assert (
        r.problem(1) is None and r.problem(None) is None and r.problem(0) == "must be >= 1, got 0"
    )
    assert cli.Range(gt=0, lt=1).problem(1.0) == "must be < 1, got 1.0"
    assert cli.Range(gt=0).problem(float("inf")) == "must be > 0, got inf"


# ----------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run (3 steps per epoch: checkpoints at 3 and 6), width 8."""
    work = tmp_path_factory.mktemp("cli") / "w"
    assert run(*FAST, "--max-steps", "6", "--work-dir", str(work)) == 0
    return work


def test_a_run_writes_the_resolved_config(trained):
    saved = json.loads((trained / "config.json").read_text())
    assert saved["max_steps"] == 6 and saved["max_epochs"] is None and saved["preset"] == "tiny"
    assert saved["model"] == {"width": 8, "blocks": 1} and saved["data"]["batch_size"] == 512
    assert {p.name for p in trained.glob("iter_*.safetensors")} == {
        "iter_3.safetensors",
        "iter_6.safetensors",
    }


def test_config_json_is_never_written_through_a_planted_link(tmp_path):
    """A work dir may come from someone else: links at config.json or at a temp name beside it
    (the old one was predictable: ``.config.json.<pid>.tmp``) never redirect the write."""
    import os

    work = tmp_path / "w"
    work.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (work / f".config.json.{os.getpid()}.tmp").symlink_to(victim)
    (work / "config.json").symlink_to(victim)
    cfg = parse(*FAST, "--max-steps", "2", "--work-dir", str(work))[0]
    path = cli.write_config(cfg)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and json.loads(path.read_text())["max_steps"] == 2


def test_a_work_dir_holding_a_run_is_refused_up_front(trained, capsys):
    before = sorted(p.name for p in trained.iterdir())
    assert run(*FAST, "--max-steps", "2", "--work-dir", str(trained)) == 2
    err = capsys.readouterr().err
    assert f"{trained} already holds a run (" in err and "continue it with --resume" in err
    assert "--overwrite" in err and err.count("\n") == 1
    assert sorted(p.name for p in trained.iterdir()) == before


def test_a_resume_that_would_mix_two_runs_is_refused(trained, tmp_path, capsys):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    for p in [*work.glob("*.safetensors"), work / "last_checkpoint"]:
        p.unlink()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, work / "exported.safetensors")  # a file, but no checkpoint
    assert run("--work-dir", str(work), "--resume") == 2
    assert "already holds a run (" in capsys.readouterr().err
    assert not list(tmp_path.glob("w.old-*"))  # moved aside only when nothing was saved
    other = tmp_path / "other"
    assert run(*FAST, "--max-steps", "1", "--work-dir", str(other)) == 0
    assert run("--work-dir", str(work), "--resume-from", str(other / "iter_1.safetensors")) == 2
    err = capsys.readouterr().err
    assert "is not one of its checkpoints: resume into another --work-dir" in err


def test_overwrite_moves_the_old_run_aside(trained, tmp_path):
    work = tmp_path / "w"
    import shutil

    shutil.copytree(trained, work)
    old = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    notes: list[str] = []
    assert run(*FAST, "--max-steps", "2", "--work-dir", str(work), "--overwrite", out=notes) == 0
    (moved,) = tmp_path.glob("w.old-*")
    assert f"--overwrite: moved the previous run in {work} to {moved}" in notes
    assert {p.name: p.read_bytes() for p in moved.iterdir() if p.is_file()} == old  # nothing lost
    assert json.loads((work / "config.json").read_text())["max_steps"] == 2
    assert len(list(work.glob("*.log"))) == 1


def test_resume_without_flags_continues_the_checkpoints_run_bit_for_bit(trained, tmp_path):
    """From iter_3 of the 6-step width-8 run, with no model or horizon flag: its config and
    horizon are the checkpoint's, and the result is the straight run's iter_6, every bit."""
    work = tmp_path / "w"
    notes: list[str] = []
    code = run("--no-tensorboard", "--no-progress", "--resume-from", str(trained / "iter_3.safetensors"),
               "--work-dir", str(work), out=notes)  # fmt: skip
    assert code == 0 and not [n for n in notes if n.startswith("note")], notes
    assert json.loads((work / "config.json").read_text())["model"] == {"width": 8, "blocks": 1}
    straight = checkpoint.load(trained / "iter_6.safetensors", like=classify.from_config(
        cli.recorded_config(parse(*FAST, "--max-steps", "6")[0]), max_epochs=None, max_steps=6).state)  # fmt: skip
    resumed = checkpoint.load(work / "iter_6.safetensors", like=straight)
    for a, b in zip(straight.params.values(), resumed.params.values(), strict=True):
        assert torch.equal(a, b)


def test_resume_with_a_longer_horizon_says_what_it_does(trained, tmp_path):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    notes: list[str] = []
    assert run("--work-dir", str(work), "--resume", "--max-steps", "9", "--optim.lr", "0.001",
               "--no-progress", out=notes) == 0  # fmt: skip
    config_note, note = [n for n in notes if n.startswith("note")]
    assert config_note.startswith(
        f"note: the config differs from the one {work / 'iter_6.safetensors'}"
    )
    assert config_note.endswith("recorded: optim.lr 0.003 -> 0.001")
    assert note.startswith(
        f"note: {work / 'iter_6.safetensors'} is at step 6 of a 6-step run (6 updates)"
    )
    assert "re-planned over 9 updates from step 6 on" in note
    assert "not what a straight 9-step run computes" in note
    # under torchrun only rank 0 says them (each rank said them)
    other = tmp_path / "rank1"
    shutil.copytree(trained, other)
    quiet: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANK", "1")
        assert run("--work-dir", str(other), "--resume", "--max-steps", "9", "--optim.lr", "0.001",
                   "--no-progress", out=quiet) == 0  # fmt: skip
    assert not [n for n in quiet if n.startswith("note")]
    # the lr it names: the last update's (the 6-step cosine at step 5) and the next (9-step at 6)
    cfg6 = parse(*FAST, "--max-steps", "6")[0]
    lr6 = classify.build(cfg6).hyperparams["lr"]
    cfg9 = dataclasses.replace(cfg6, max_steps=9, optim=dataclasses.replace(cfg6.optim, lr=0.001))
    lr9 = classify.build(cfg9).hyperparams["lr"]
    assert f"lr of the last update {lr6(5):.3g}, of the next {lr9(6):.3g}" in note
    assert (work / "iter_9.safetensors").is_file()


def test_resume_from_a_finished_run_trains_nothing_and_writes_nothing(trained, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    notes: list[str] = []
    path = trained / "iter_6.safetensors"
    assert run("--work-dir", str(trained), "--resume-from", str(path), out=notes) == 0
    assert notes == [f"{path} is the end of its 6-step run: nothing to train (give a larger "
                     "--max-steps or --max-epochs to train on)"]  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before
    assert run("--work-dir", str(trained), "--resume", "--max-steps", "4") == 2
    assert "past this run's horizon (4-step run)" in capsys.readouterr().err


def test_a_failed_run_leaves_config_and_logs_untouched(trained, tmp_path, capsys):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    # a resume whose model does not fit the checkpoint fails before anything is written (exit 2:
    # the flag that changed the model is named)
    assert run("--work-dir", str(work), "--resume", "--max-steps", "9", "--model.width", "16") == 2
    err = capsys.readouterr().err
    assert " error: " in err and "iter_6.safetensors" in err and "model.width 8 -> 16" in err
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before
    # a bad --load-from on a fresh work dir: no config.json, no log
    fresh = tmp_path / "fresh"
    assert (
        run(
            *FAST,
            "--max-steps",
            "2",
            "--work-dir",
            str(fresh),
            "--load-from",
            str(tmp_path / "nope.pt"),
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nope.pt" in err
    assert f"--load-from {tmp_path / 'nope.pt'}: no such file" in err  # the flag named
    assert not fresh.exists() or not list(fresh.iterdir())
    # a work dir that cannot be made says so (not "No such file or directory: <its parent>")
    inside_a_file = tmp_path / "file"
    inside_a_file.write_text("")
    with pytest.raises(OSError, match=r"cannot create the work dir .*/file/w .*: .*/file"):
        with lock_work_dir(inside_a_file / "w"):
            pass


def test_a_corrupt_checkpoint_is_one_line_and_a_traceback_with_debug(
    trained, tmp_path, capsys, monkeypatch
):
    bad = tmp_path / "bad.safetensors"
    data = bytearray((trained / "iter_3.safetensors").read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    args = ("--work-dir", str(tmp_path / "w"), "--resume-from", str(bad))
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err
    with pytest.raises(checkpoint.CheckpointError):
        run(*args, "--debug")
    monkeypatch.setenv("FENGINE_DEBUG", "1")
    with pytest.raises(checkpoint.CheckpointError):
        run(*args)


def test_dry_run_prints_the_plan_and_plots_every_schedule_before_any_step(tmp_path):
    work = tmp_path / "w"
    notes: list[str] = []
    assert run("--preset", "tiny", "--optim.name", "sgd", "--optim.norm-decay-mult", "0",
               "--work-dir", str(work), "--dry-run", out=notes) == 0  # fmt: skip
    text = "\n".join(notes)
    assert '"max_epochs": 10' in text and "plan: 450 updates (10 epochs x 45" in text
    assert "paramwise: 11 trainable params in 2 groups" in text  # BatchNorm params: decay x0
    assert "lr_mult=1.0,decay_mult=0.0/weight_decay: 0 at update 1, max 0," in text
    # MMEngine's units (a multiply-add is one FLOP), by hand for width 8 on 1x8x8: the stem conv
    # 8*9*64, each block conv 8*8*9*64, BatchNorm (training mode) 5 per element, the head 8*10
    flops = 8 * 9 * 64 + 2 * 8 * 8 * 9 * 64 + 3 * 5 * 8 * 64 + 8 * 10
    assert flops == 86096 and "Model Flops:86.096K" in text and "Model Parameters:1.362K" in text
    assert "dry run: no step was run" in text
    png = work / "hyperparams.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in work.iterdir()) == [
        "hyperparams.png"
    ]  # no config, log, checkpoint
    # the values it summarises are the schedule's own (warmup to 3e-3 over 20, cosine to 0)
    lr_line = next(n for n in notes if n.startswith("lr:"))
    assert lr_line.startswith("lr: 3e-06 at update 1, max 0.003")


def test_dry_run_values_are_the_schedules_at_every_update():
    from fengine import dryrun

    cfg, _ = parse("--preset", "tiny", "--max-steps", "40", "--optim.warmup-steps", "5")
    exp = classify.build(cfg)
    values = dryrun.schedule_values(exp)
    assert set(values) == {"lr", "momentum", "weight_decay"} and len(values["lr"]) == 40
    # hand-computed: linear warmup from 0.001 x lr over 5 updates, then cosine over 35
    import math

    assert values["lr"][0] == pytest.approx(3e-3 * 0.001)
    assert values["lr"][5] == pytest.approx(3e-3)
    assert values["lr"][20] == pytest.approx(3e-3 * (1 + math.cos(math.pi * 15 / 35)) / 2)


def test_cifar10_from_python_batches_on_disk(tmp_path):
    """--data.name cifar10 reads the batches (here tiny generated ones, 4 images per file) and
    trains the 3-channel model."""
    from test_cifar import make_batches

    make_batches(tmp_path / "data", per_batch=4)
    work = tmp_path / "w"
    code = run("--preset", "tiny", "--data.name", "cifar10", "--data.root", str(tmp_path / "data"),
               "--data.batch-size", "8", "--max-epochs", "1", "--no-tensorboard", "--no-progress",
               "--work-dir", str(work))  # fmt: skip
    assert code == 0
    meta = checkpoint.read_meta(next(work.glob("epoch_*.safetensors")))
    assert meta["tensors"]["params/stem.0.weight"]["shape"] == [8, 3, 3, 3]
    assert meta["step"] == 3  # 20 training images in batches of 8


def test_a_checkpoints_recorded_config_never_chooses_a_path(monkeypatch, tmp_path):
    """Resuming takes the checkpoint's config as a layer, but not its paths (an untrusted file):
    work_dir, load_from and the data root stay this command's; the other fields come from it."""
    Config = classify.Config
    recorded = to_dict(Config())
    recorded.update(seed=7, work_dir="/elsewhere", load_from="/etc/passwd")
    recorded["data"] = {**recorded["data"], "name": "cifar10", "root": "/root/secret"}
    monkeypatch.setattr(
        cli, "_checkpoint_run", lambda path: (recorded, {"by_epoch": True, "max_epochs": 3})
    )
    base = Config(work_dir=tmp_path / "w")
    cfg = cli._from_checkpoint(Config, tmp_path / "w" / "epoch_1.safetensors", base)
    assert (cfg.work_dir, cfg.load_from, cfg.data.root) == (tmp_path / "w", None, None)
    assert (cfg.seed, cfg.data.name, cfg.max_epochs) == (7, "cifar10", 3)


def test_replays_rebuild_reads_only_the_paths_the_user_confirms(tmp_path):
    """`cli.from_record` (replay's hook): a run log is an untrusted file; a recorded load_from or
    data root is refused unless given as ``paths`` (replay's ``--path``); work_dir takes its default."""
    Config = classify.Config
    recorded = to_dict(Config())
    recorded.update(seed=7, work_dir="/elsewhere", load_from="/etc/passwd")
    recorded["data"] = {**recorded["data"], "name": "cifar10", "root": "/root/secret"}
    horizon = {"max_epochs": None, "max_steps": 30}
    with pytest.raises(ReplayError) as e:
        cli.from_record(Config, recorded, **horizon)
    msg = str(e.value)
    assert "load_from=/etc/passwd" in msg and "data.root=/root/secret" in msg
    assert "--path load_from=/etc/passwd --path data.root=/root/secret" in msg
    assert "work_dir" not in msg
    weights, root = tmp_path / "w.safetensors", tmp_path / "cifar"
    cfg = cli.from_record(
        Config, recorded, **horizon, paths={"load_from": str(weights), "data.root": str(root)}
    )
    assert (cfg.load_from, cfg.data.root, cfg.work_dir) == (weights, root, Config().work_dir)
    assert (cfg.seed, cfg.data.name, cfg.max_steps) == (7, "cifar10", 30)
    with pytest.raises(
        ReplayError, match=r"--path data\.rot: Config has no path field.*data\.root"
    ):
        cli.from_record(Config, to_dict(Config()), **horizon, paths={"data.rot": "x"})
    # a record at the defaults needs nothing confirmed
    assert cli.from_record(Config, to_dict(Config()), **horizon).load_from is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("data.num_workers", 100000, "--data.num-workers must be <= 64, got 100000"),
        ("optim.lr", -1.0, "--optim.lr must be > 0, got -1.0"),
        ("model.width", 0, "--model.width must be >= 1, got 0"),
    ],
)
def test_a_recorded_config_passes_the_ranges_a_command_line_must(field, value, message):
    """A run log is untrusted: its values meet every `Range` before anything is built (a recorded
    ``num_workers`` of 100000 forked workers until the machine ran out)."""
    recorded = to_dict(classify.Config())
    section, name = field.split(".")
    recorded[section] = {**recorded[section], name: value}
    with pytest.raises(ReplayError, match="the run log records a config the recipe refuses: ") as e:
        cli.from_record(classify.Config, recorded, max_epochs=None, max_steps=30)
    assert str(e.value).endswith(message)


def test_overwrite_refuses_to_move_the_directory_it_runs_in(trained, tmp_path, monkeypatch, capsys):
    """`--work-dir . --overwrite` failed with "PosixPath('.') has an empty name"; resolved, it would
    have moved the current directory and trained into the moved one."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    monkeypatch.chdir(work)
    assert run(*FAST, "--max-steps", "1", "--work-dir", ".", "--overwrite") == 2
    assert "the directory this command runs in" in capsys.readouterr().err
    assert not list(tmp_path.glob("w.old-*"))  # nothing moved


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--resume", "--overwrite"), "give it or --resume, not both"),
        (("--device", "bogus"), "--device must be cpu, cuda or cuda:N, got 'bogus'"),
        (("--device", "meta"), "--device must be cpu, cuda or cuda:N, got 'meta'"),
    ],
)
def test_flags_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    """Before: --resume silently ignored --overwrite; --device bogus exited 1 (not a usage
    error), --device meta failed mid-run after writing config.json and the logs."""
    work = tmp_path / "w"
    assert run(*FAST, "--max-steps", "1", "--work-dir", str(work), *flags) == 2
    assert message in capsys.readouterr().err
    assert not work.exists()


# ----------------------------------------------------------------------- layering edge cases
def test_a_used_work_dir_without_checkpoints_is_refused_without_suggesting_resume(
    trained, tmp_path, capsys
):
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    for p in [*work.glob("*.safetensors"), work / "last_checkpoint"]:
        p.unlink()  # a run that failed before its first checkpoint
    assert run(*FAST, "--max-steps", "2", "--work-dir", str(work)) == 2
    err = capsys.readouterr().err
    assert "it has no checkpoint to continue from: choose another --work-dir" in err
    assert "--resume" not in err and err.count("\n") == 1


def test_resume_of_a_run_that_saved_no_checkpoint_moves_it_aside_and_starts_afresh(
    trained, tmp_path
):
    """A run killed before its first save leaves config.json and logs; a retry loop of the same
    command with --resume must go on (it was refused, asking for --overwrite)."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    for p in [*work.glob("*.safetensors"), work / "last_checkpoint"]:
        p.unlink()
    old_log = (work / "run_log.jsonl").read_bytes()
    notes: list[str] = []
    assert run(*FAST, "--max-steps", "6", "--work-dir", str(work), "--resume", out=notes) == 0
    (moved,) = tmp_path.glob("w.old-*")
    assert (moved / "run_log.jsonl").read_bytes() == old_log  # nothing lost
    assert any(n.startswith(f"--resume: the run in {work} saved no checkpoint") for n in notes)
    # started afresh: the straight run, bit for bit
    straight = checkpoint.load(trained / "iter_6.safetensors", like=classify.from_config(
        cli.recorded_config(parse(*FAST, "--max-steps", "6")[0]), max_epochs=None, max_steps=6).state)  # fmt: skip
    fresh = checkpoint.load(work / "iter_6.safetensors", like=straight)
    for a, b in zip(straight.params.values(), fresh.params.values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("flags", "changed"),
    [
        (["--optim.clip-grad", "1.0"], "optim.clip_grad None -> 1.0"),
        (["--model.width", "16"], "model.width 8 -> 16"),
    ],
)
def test_a_resume_whose_flags_change_the_states_layout_names_them(
    trained, tmp_path, capsys, flags, changed
):
    """The structure mismatch is said in terms of the flags that caused it, in one line, before
    anything is written (it used to be the checkpoint's mismatch dump, without the config's notes)."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert run("--work-dir", str(work), "--resume", "--no-progress", *flags) == 2
    err = capsys.readouterr().err
    assert f"{work / 'iter_6.safetensors'} cannot continue with this config" in err
    assert changed in err and f"--load-from {work / 'iter_6.safetensors'}" in err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_a_preset_or_config_file_given_with_resume_is_the_base(trained, tmp_path):
    """--preset or --config with --resume replaces the checkpoint's recorded config (it was
    ignored silently for --preset); the differences are reported."""
    cfg, ckpt = parse("--work-dir", str(trained), "--resume")
    assert ckpt == trained / "iter_6.safetensors" and cfg.data.batch_size == 512  # the checkpoint's
    cfg, _ = parse("--work-dir", str(trained), "--resume", "--preset", "tiny")
    assert cfg.data.batch_size == classify.PRESETS["tiny"].data.batch_size != 512
    assert (cfg.max_epochs, cfg.max_steps) == (10, None)  # the preset's horizon
    import shutil

    work = tmp_path / "w"
    shutil.copytree(trained, work)  # --dry-run writes its plot there
    notes: list[str] = []
    # another batch size: the epoch plan (450 updates) would stop at step 408, short of its end
    assert run("--work-dir", str(work), "--resume", "--preset", "tiny", "--dry-run",
               "--no-progress", out=notes) == 2  # fmt: skip
    assert run("--work-dir", str(work), "--resume", "--preset", "tiny", "--dry-run",
               "--max-steps", "450", "--no-progress", out=notes) == 0  # fmt: skip
    assert any("data.batch_size 512 -> " in n for n in notes), notes
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**json.loads((trained / "config.json").read_text()), "seed": 5}))
    cfg, _ = parse("--work-dir", str(trained), "--resume", "--config", str(path))
    assert cfg.seed == 5 and cfg.data.batch_size == 512


def test_a_config_file_giving_one_horizon_clears_the_other(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_steps": 5}))
    cfg, _ = parse("--config", str(path))
    assert (cfg.max_epochs, cfg.max_steps) == (None, 5)  # not a clash with the default 10 epochs
    path.write_text(json.dumps({"max_epochs": 2}))
    assert parse("--config", str(path))[0].max_epochs == 2
    path.write_text(json.dumps({"max_steps": 5, "max_epochs": 2}))  # both given: the usual refusal
    with pytest.raises(cli.UsageError, match="not both"):
        parse("--config", str(path))


def test_config_json_holds_absolute_paths(tmp_path, monkeypatch):
    """A relative --load-from or data root is written absolute: --config W/config.json works
    from any directory."""
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse("--work-dir", "w", "--load-from", "weights.safetensors", "--data.root", "data")
    (tmp_path / "w").mkdir()
    saved = json.loads(cli.write_config(cfg).read_text())
    assert saved["load_from"] == str(tmp_path / "weights.safetensors")
    assert saved["data"]["root"] == str(tmp_path / "data")
    assert saved["work_dir"] == str(tmp_path / "w")
