"""fengine.cli defects found by a hunt, each pinned: --load-from with a resume, an epoch resume
whose schedules end before it does, malformed YAML, finish after a cut-short end, the GAN's
batch size, and one-line messages naming the argument."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_cli import FAST, classify, parse, run

import fengine as fe
from fengine import cli
from fengine.config import to_dict


ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"{name}_recipe_under_hunt", ROOT / "recipes" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _files(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def ended(tmp_path_factory):
    """A finished 6-step run (3 steps per epoch: checkpoints at 3 and 6)."""
    work = tmp_path_factory.mktemp("hunt") / "w"
    assert run(*FAST, "--max-steps", "6", "--work-dir", str(work)) == 0
    return work


@pytest.fixture
def copy(ended, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(ended, work)
    return work


# ----------------------------------------------------------------------- --load-from with a resume
@pytest.mark.parametrize("how", ["--resume", "--resume-from"])
def test_load_from_with_a_resume_is_refused(copy, tmp_path, capsys, how):
    """The weights were loaded, then replaced by the checkpoint's, yet the run log recorded
    load_from for the resumed segment (its replay then read that file)."""
    flags = [how] if how == "--resume" else [how, str(copy / "iter_3.safetensors")]
    before = _files(copy)
    weights = copy / "iter_3.safetensors"
    assert run("--work-dir", str(copy), *flags, "--load-from", str(weights)) == 2
    err = _one_error(capsys)
    assert f"--load-from {weights} starts a new run from those weights; {how} continues" in err
    assert _files(copy) == before and not list(tmp_path.glob("w.old-*"))


def test_a_config_files_load_from_is_not_taken_on_resume(copy, tmp_path):
    """The run's own config.json (it started from --load-from) is a natural --config for its
    resume: the checkpoint has the weights, so the file's load_from is dropped, not refused."""
    path = tmp_path / "c.json"
    saved = json.loads((copy / "config.json").read_text())
    path.write_text(json.dumps({**saved, "load_from": str(copy / "iter_3.safetensors")}))
    cfg, _ = parse("--work-dir", str(copy), "--resume", "--config", str(path))
    assert cfg.load_from is None
    assert parse("--config", str(path))[0].load_from == copy / "iter_3.safetensors"  # fresh: kept


def test_replay_path_applies_only_to_segments_that_recorded_it(tmp_path):
    """``--path load_from=X`` confirms segment 1's file; a resumed segment that recorded none
    was rebuilt loading X too."""
    weights = tmp_path / "w.safetensors"
    horizon = {"max_epochs": None, "max_steps": 30}
    none = cli.from_record(classify.Config, to_dict(classify.Config()), **horizon,
                           paths={"load_from": str(weights)})  # fmt: skip
    assert none.load_from is None
    recorded = {**to_dict(classify.Config()), "load_from": "/elsewhere/w.safetensors"}
    given = cli.from_record(classify.Config, recorded, **horizon, paths={"load_from": str(weights)})
    assert given.load_from == weights


# ----------------------------------------------------------------------- epoch resume, other plan
def test_an_epoch_resume_whose_schedules_end_before_it_does_is_refused(tmp_path, capsys):
    """Epoch 1 of 3 updates, resumed for 2 epochs with --accumulate 3 (1 update an epoch): the
    schedules were planned over 2 updates from step 3 on (the cosine ran past its end) and the
    note said "re-planned over 2 updates from step 3 on"."""
    work = tmp_path / "w"
    assert run(*FAST, "--max-epochs", "1", "--work-dir", str(work)) == 0
    before = _files(work)
    assert run("--work-dir", str(work), "--resume", "--max-epochs", "2", "--accumulate", "3") == 2
    err = _one_error(capsys)
    assert (
        f"{work / 'epoch_1.safetensors'} is at step 3 (epoch 1); this 2-epoch run plans its "
        "schedules over 2 updates (1 per epoch) but would train to step 4, past their end "
        "(accumulate 1 -> 3): resume without that change, or give the horizon in updates "
        "(--max-steps 4)"
    ) in err
    assert _files(work) == before
    # the way out it names
    assert run("--work-dir", str(work), "--resume", "--max-steps", "4", "--accumulate", "3") == 0
    assert (work / "iter_4.safetensors").is_file()


# ----------------------------------------------------------------------- YAML
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "max_steps: 3\nmodel: {width: 4\n",
            "expected ',' or '}', but got '<stream end>' at line 3",
        ),
        ("max_steps: !!python/name:os.system\n", "could not determine a constructor for the tag"),
    ],
)
def test_a_malformed_yaml_config_is_one_line_naming_the_file(tmp_path, capsys, text, problem):
    """It was exit 1 with PyYAML's multi-line message, not naming the file."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
    err = _one_error(capsys)
    assert f"error: --config {path}: not valid YAML: {problem}" in err
    assert not (tmp_path / "w").exists()


def test_a_yaml_config_without_pyyaml_names_the_file_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
    assert _one_error(capsys).count(f"--config {path}") == 1


# ----------------------------------------------------------------------- finish after the end
def test_a_resume_with_nothing_left_to_train_still_finishes(copy):
    """finish (final evaluation, samples) cut short after the last checkpoint never ran again:
    the resume said "nothing to train" and exited 0."""
    before, finished = _files(copy), []
    notes: list[str] = []
    code = cli.main(classify.Config, classify.build, presets=classify.PRESETS,
                    finish=lambda cfg, exp, state: finished.append(state.step),
                    argv=["--work-dir", str(copy), "--resume"], out=notes.append)  # fmt: skip
    assert code == 0 and finished == [6]
    assert any("nothing to train" in n for n in notes) and _files(copy) == before


def test_gpt_writes_its_sample_on_a_resume_after_the_end(tmp_path):
    gpt = _load("gpt")
    work = tmp_path / "w"
    argv = ["--preset", "tiny", "--max-steps", "2", "--sample.tokens", "20", "--work-dir",
            str(work), "--no-tensorboard", "--no-progress"]  # fmt: skip

    def main(*argv: str) -> int:
        return cli.main(gpt.Config, gpt.build, presets=gpt.PRESETS, finish=gpt.finish,
                        argv=list(argv), out=lambda _: None)  # fmt: skip

    assert main(*argv) == 0
    sample = (work / "samples.txt").read_text()
    (work / "samples.txt").unlink()  # as if interrupted while sampling
    assert main("--work-dir", str(work), "--resume", "--no-progress") == 0
    assert (work / "samples.txt").read_text() == sample


# ----------------------------------------------------------------------- GAN batch size
def test_gan_refuses_a_batch_of_one_naming_batchnorm(tmp_path):
    """A batch of 1 passed the checks, wrote config.json and the logs, then failed at step 1
    with torch's BatchNorm error naming no flag."""
    gan = _load("gan")
    with pytest.raises(cli.UsageError) as e:
        cli.parse(gan.Config, ["--data.batch-size", "1", "--work-dir", str(tmp_path / "w")])
    assert str(e.value) == (
        "--data.batch-size must be >= 2, got 1 (the generator's BatchNorm needs 2 samples a batch)"
    )
    assert cli.Range(ge=2, why="because").problem(1) == "must be >= 2, got 1 (because)"


# ----------------------------------------------------------------------- messages
def test_an_out_of_range_config_value_names_the_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_steps": 3, "optim": {"lr": -1}}))
    work = str(tmp_path / "w")
    assert run("--config", str(path), "--work-dir", work) == 2
    assert f"error: --config {path}: optim.lr must be > 0, got -1.0" in _one_error(capsys)
    assert run("--config", str(path), "--work-dir", work, "--optim.lr", "-2") == 2
    assert "error: --optim.lr must be > 0, got -2.0" in _one_error(capsys)  # the flag's own
    cfg, _ = parse("--config", str(path), "--work-dir", work, "--optim.lr", "0.1")
    assert cfg.optim.lr == 0.1  # a flag overriding the file's value is no error


def test_a_work_dir_that_is_a_file_says_so(tmp_path, capsys):
    path = tmp_path / "F"
    path.write_text("mine\n")
    assert run(*FAST, "--max-steps", "1", "--work-dir", str(path)) == 2
    assert f"--work-dir {path} is a file, not a directory" in _one_error(capsys)
    assert run(*FAST, "--max-steps", "1", "--work-dir", str(path / "sub")) == 2
    assert f"--work-dir {path / 'sub'} is inside {path}, which is a file" in _one_error(capsys)
    assert path.read_text() == "mine\n"


@pytest.mark.parametrize("where", ["dir", "/dev/null"])
def test_resume_from_something_not_a_file_says_so(tmp_path, capsys, where):
    target = tmp_path if where == "dir" else Path(where)
    assert run("--work-dir", str(tmp_path / "w"), "--resume-from", str(target)) == 2
    err = _one_error(capsys)
    assert f"--resume-from {target}: not a regular file (expected a checkpoint file)" in err


def test_a_checkpoint_fallback_is_one_warning_line(copy, capsys):
    (copy / "last_checkpoint").unlink()
    assert run("--work-dir", str(copy), "--resume") == 0  # at its end: nothing to train
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {copy / 'last_checkpoint'} does not exist; falling back to ")
    assert err.count("\n") == 1 and "UserWarning" not in err
    with pytest.MonkeyPatch.context() as mp:  # under torchrun, the other ranks stay quiet
        mp.setenv("RANK", "1")
        assert run("--work-dir", str(copy), "--resume") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("value", "split"), [("0.9999", "training"), ("0.0001", "validation")])
def test_a_val_fraction_leaving_a_split_empty_names_the_flag(tmp_path, capsys, value, split):
    assert run(*FAST, "--max-steps", "1", "--work-dir", str(tmp_path / "w"),
               "--data.val-fraction", value) == 2  # fmt: skip
    assert f"--data.val-fraction {value} leaves no {split} samples" in _one_error(capsys)
    assert not (tmp_path / "w").exists()


def test_end_step_counts_the_rest_of_the_epoch_in_this_world_sizes_batches(tmp_path):
    """`fit` repartitions a 2-process position (batch b of 45 per rank) to batch 2b of 90 in one
    process; the resumed run ends after the rest of that epoch and the epochs left."""
    from helpers import mlp

    plan = fe.plan(list(range(90)), max_epochs=3)  # one process: 90 updates an epoch
    saved = {"batches_per_epoch": 45, "world_size": 2}
    state = fe.train_step(lambda m, b: m(b).sum(), fe.optim.sgd(0.1)).init(mlp())
    path = tmp_path / "step_80.safetensors"  # named in errors only

    def at(step, epoch, batch):
        return state.replace(step=step, epoch=epoch, batch_in_epoch=batch)

    mid = at(80, 1, 35)  # 45 + 35 updates at 2 ranks
    assert cli._end_step(mid, plan, saved, path) == 80 + (90 - 70) + 90
    end = at(90, 1, 45)  # the epoch's last batch
    assert cli._end_step(end, plan, saved, path) == 90 + 90
    same = at(100, 1, 10)  # saved by one process
    assert (
        cli._end_step(same, plan, {"batches_per_epoch": 90, "world_size": 1}, path) == 100 + 80 + 90
    )


# ----------------------------------------------------------------------- config files (hunt)
def test_yaml_reads_1e_3_as_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string, which the float field refused; without
    touching PyYAML's own SafeLoader."""
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 3\noptim: {lr: 1e-3, weight_decay: 5E+0}\n")
    cfg, _ = parse("--config", str(path), "--work-dir", str(tmp_path / "w"))
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 5.0
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}  # the global loader is as it was


def test_a_config_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, capsys):
    """A FIFO blocked forever; /dev/zero filled memory until the kernel killed the process."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
        assert f"error: --config {path}: not a regular file" in _one_error(capsys)


def test_a_config_files_cross_field_error_names_the_file(tmp_path, capsys):
    """Its values stand for flags the user never typed: the error says where they came from."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_epochs": 2, "max_steps": 3}))
    assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
    err = _one_error(capsys)
    assert "give --max-epochs or --max-steps, not both" in err
    assert f"(with the values of --config {path})" in err


def test_a_seed_beyond_63_bits_is_a_usage_error(tmp_path, capsys):
    assert run(*FAST, "--seed", str(2**64), "--work-dir", str(tmp_path / "w")) == 2
    assert f"--seed must be < {2**63}, got {2**64}" in _one_error(capsys)


def test_a_work_dir_from_a_config_file_is_said(tmp_path):
    """The file, not the command line, chose where checkpoints and logs go: a note says so."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_steps": 1, "work_dir": str(tmp_path / "from_file"),
                                "model": {"width": 4, "blocks": 1}}))  # fmt: skip
    out: list = []
    assert run("--config", str(path), "--dry-run", out=out) == 0
    assert f"note: --work-dir {tmp_path / 'from_file'} comes from --config {path}" in out
    out.clear()
    assert run("--config", str(path), "--dry-run", "--work-dir", str(tmp_path / "w"), out=out) == 0
    assert not any("comes from --config" in line for line in out)
    # a file that sets no work_dir: the recipe's default, nothing to say
    path.write_text(json.dumps({"max_steps": 1, "model": {"width": 4, "blocks": 1}}))
    out.clear()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the default work dir is relative: keep it under tmp_path
    try:
        assert run("--config", str(path), "--dry-run", out=out) == 0
    finally:
        os.chdir(cwd)
    assert not any("comes from --config" in line for line in out)


@dataclasses.dataclass(frozen=True)
class _Adam:
    lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class _SGD:
    lr: float = 0.1
    log: Path | None = None


@dataclasses.dataclass(frozen=True)
class _UnionConfig(cli.RunConfig):
    max_steps: int | None = 10
    opt: _Adam | _SGD = _Adam()


def test_a_recorded_union_field_of_another_class_keeps_paths_out_of_the_file(tmp_path):
    """A config whose union field holds another class than the recipe's default (with a path
    field the default's class lacks) failed with AttributeError on resume and replay; its path
    still never comes from the recorded (untrusted) config."""
    recorded = _UnionConfig(opt=_SGD(lr=0.5, log=Path("/elsewhere/log")))
    safe = cli._paths_from(_UnionConfig(), recorded)
    assert safe.opt == _SGD(lr=0.5, log=None)
    record = cli.recorded_config(recorded)
    with pytest.raises(Exception, match=r"records opt.log=/elsewhere/log; .*--path opt.log="):
        cli.from_record(_UnionConfig, record, max_epochs=None, max_steps=5)
    rebuilt = cli.from_record(_UnionConfig, record, max_epochs=None, max_steps=5,
                              paths={"opt.log": "/elsewhere/log"})  # fmt: skip
    assert rebuilt.opt == _SGD(lr=0.5, log=Path("/elsewhere/log"))


# ----------------------------------------------------------------------- config files (hunt 25)
def _config_error(tmp_path, capsys, name: str, text: str) -> str:
    """The one-line error of ``--config`` given ``text`` as the file ``name`` (exit status 2)."""
    path = tmp_path / name
    path.write_text(text)
    assert run("--config", str(path), "--work-dir", str(tmp_path / "w")) == 2
    err = _one_error(capsys)
    assert f"error: --config {path}: " in err
    assert not (tmp_path / "w").exists()
    return err


def test_a_huge_config_value_is_shown_short_in_the_error():
    """A list of shared lists (what nine YAML aliases build) was put whole into the message: 387M
    items, gigabytes for over a minute. Here 9**6 items, shown in 299 characters."""
    from fengine.config import from_dict

    bomb: list = ["x"] * 9
    for _ in range(5):
        bomb = [bomb] * 9
    with pytest.raises(TypeError) as e:
        from_dict(classify.Config, {"seed": bomb})
    six = "[" + "[...], " * 6 + "...]"  # repr(bomb) is 3.7M characters
    assert str(e.value) == f"from_dict: Config.seed: expected int, got [{(six + ', ') * 6}...]"
    with pytest.raises(TypeError, match=r"got 'aaaa.*\.\.\..*aaaa'$") as e:
        from_dict(classify.Config, {"seed": "a" * 10_000_000})
    assert len(str(e.value)) < 150


def test_yaml_aliases_are_refused(tmp_path, capsys):
    """Nine levels of aliases in 700 bytes ("billion laughs"); a config is plain data."""
    levels = ["&a0 [x, x, x]"] + [f"&a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    err = _config_error(tmp_path, capsys, "c.yaml", f"seed: [{', '.join(levels)}]\n")
    assert "YAML aliases are not supported in a config: &a0 at line 1, column 8" in err
    err = _config_error(tmp_path, capsys, "c.yaml", "seed: 1\noptim: {lr: *x}\n")
    assert "YAML aliases are not supported in a config: *x at line 2, column 13" in err


@pytest.mark.parametrize(
    ("name", "text"),
    [("c.json", '{"seed": ' + "[" * 3000 + "]" * 3000 + "}"), ("c.yaml", "seed: " + "[" * 3000)],
)
def test_a_config_nested_too_deeply_is_a_usage_error(tmp_path, capsys, name, text):
    """It was a raw RecursionError (exit 1, not naming the file)."""
    err = _config_error(tmp_path, capsys, name, text)
    assert err.endswith(f"{tmp_path / name}: nested too deeply to be a config (see --help)\n")


def test_unknown_keys_of_mixed_types_are_listed(tmp_path, capsys):
    """sorted() of an int and a str key raised "'<' not supported" instead."""
    err = _config_error(tmp_path, capsys, "c.yaml", "1: 2\nfoo: 3\n")
    assert "from_dict: Config has no fields ['foo', 1]; fields are [" in err


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("seed: 017\n", "Config.seed: expected int, got '017'"),  # YAML 1.1: octal 15
        ("seed: 1:30\n", "Config.seed: expected int, got '1:30'"),  # YAML 1.1: 90
        ("seed: 1__0\n", "Config.seed: expected int, got '1__0'"),
        ("data: {augment: no}\n", "Config.data.augment: expected bool, got 'no'"),
        ("data: {augment: on}\n", "Config.data.augment: expected bool, got 'on'"),
        ("optim: {lr: 1:30.5}\n", "Config.optim.lr: expected float, got '1:30.5'"),
    ],
)
def test_yaml_reads_plain_scalars_as_yaml_1_2_does(tmp_path, capsys, text, got):
    """PyYAML's YAML 1.1 rules read these as other numbers or booleans, silently."""
    assert f"from_dict: {got} (see --help)" in _config_error(tmp_path, capsys, "c.yaml", text)


def test_yaml_1_2_scalars_still_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "max_steps: 100_000\nseed: 0x10\nload_from: ~\n"
        "optim: {lr: .5, weight_decay: 2.}\ndata: {augment: false}\n"
    )
    cfg, _ = parse("--config", str(path), "--work-dir", str(tmp_path / "w"))
    assert (cfg.max_steps, cfg.seed, cfg.load_from) == (100_000, 16, None)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.augment) == (0.5, 2.0, False)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("c.json", '{"seed": 1, "seed": 2}', "duplicate key 'seed' (see --help)"),
        ("c.json", '{"model": {"width": 4, "width": 8}}', "duplicate key 'width' (see --help)"),
        (
            "c.yaml",
            "seed: 1\nseed: 2\n",
            "not valid YAML: duplicate key 'seed' at line 2, column 1",
        ),
    ],
)
def test_a_key_given_twice_in_a_config_is_refused(tmp_path, capsys, name, text, problem):
    """The last one won silently."""
    assert problem in _config_error(tmp_path, capsys, name, text)
