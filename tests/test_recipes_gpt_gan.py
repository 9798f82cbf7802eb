"""recipes/gpt.py and recipes/gan.py, run in this process with tiny settings: the shared flags,
a few steps, replay, GPT sampling, the GAN's picture. (The multi-step GAN's fp16/EMA bits are
checked against torch GradScalers in tests/test_multi.py; these tests are about the recipes.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import field_docs

import fengine as fe
from fengine import checkpoint, cli
from fengine.bind import bind
from fengine.replay import replay


ROOT = Path(__file__).resolve().parent.parent
SHARED = ("--work-dir", "--max-steps", "--max-epochs", "--seed", "--resume", "--resume-from",
          "--load-from", "--device", "--config", "--dry-run")  # fmt: skip
QUIET = ["--no-tensorboard", "--no-progress"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe_under_test", ROOT / "recipes" / f"{name}.py")  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpt, gan = _load("gpt"), _load("gan")
GPT_TINY = [
    "--preset",
    "tiny",
    "--sample.tokens",
    "40",
    "--val-interval",
    "10",
    "--log-interval",
    "1",
    *QUIET,
]
GAN_TINY = [
    "--data.size",
    "512",
    "--data.batch-size",
    "64",
    "--samples",
    "256",
    "--log-interval",
    "4",
    *QUIET,
]


def run(recipe, *argv: str, out: list | None = None) -> int:
    """The recipe's command line, in this process."""
    sink = out if out is not None else []
    return cli.main(recipe.Config, recipe.build, presets=getattr(recipe, "PRESETS", None),
                    description=recipe.__doc__, finish=recipe.finish, argv=list(argv),
                    out=sink.append)  # fmt: skip


def _undocumented(cls: type, prefix: str = "") -> list[str]:
    """Flags of the config tree without a docstring (the string literal after the field; a
    redeclared field keeps its base class's), as tests/test_cli.py reads them."""
    docs = field_docs(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default):
            missing += _undocumented(type(f.default), f"{prefix}{f.name}.")
        elif not docs.get(f.name):
            missing.append(prefix + f.name)
    return missing


# ----------------------------------------------------------------------- the command line
@pytest.mark.parametrize("recipe, own", [(gpt, ["--model.dim", "--sample.prompt", "--accumulate", "--amp"]),
                                         (gan, ["--ema", "--data.name", "--optim.gen-lr", "--amp"])])  # fmt: skip
def test_help_lists_the_shared_flags_and_the_recipes_own(recipe, own, capsys):
    with pytest.raises(SystemExit) as done:
        run(recipe, "--help")
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in (*SHARED, *own):
        assert flag in text, flag
    # --preset's help says "(listed above)": the list is there, also when it is empty
    assert "presets (--preset NAME): " in text


@pytest.mark.parametrize("recipe", [gpt, gan])
def test_every_field_of_the_config_tree_has_help_text(recipe):
    assert _undocumented(recipe.Config) == []


@pytest.mark.parametrize(
    "recipe, argv, message",
    [
        (gpt, ["--model.heads", "3"], "--model.heads 3 must divide --model.dim 64"),
        (gpt, ["--sample.prompt", "\u00e9t\u00e9"], "--sample.prompt 'été': CharCorpus.encode"),
        (gpt, ["--sample.prompt", ""], "--sample.prompt is empty"),
        (gpt, ["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (gpt, ["--optim.min-lr", "0.1"], "--optim.min-lr 0.1 must be <= --optim.lr 0.003"),
        (gan, ["--model.gen-widths", "8", "0"], "--model.gen-widths must all be >= 1"),
        (gan, ["--ema", "1.5"], "--ema must be < 1, got 1.5"),
    ],
)
def test_bad_values_are_one_line_usage_errors(recipe, argv, message, capsys, tmp_path):
    assert run(recipe, *argv, "--work-dir", str(tmp_path / "w")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("recipe, argv", [(gpt, ["--preset", "tiny"]), (gan, [])])
def test_dry_run_plots_the_schedules_before_any_step(recipe, argv, tmp_path):
    out: list[str] = []
    assert run(recipe, *argv, "--dry-run", "--work-dir", str(tmp_path), out=out) == 0
    assert (tmp_path / "hyperparams.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "config.json").exists()
    assert any("Model Flops" in line for line in out), out  # complexity with FLOPs, every recipe
    if recipe is gan:  # two optimizers, each over its part's params (it said "one group")
        text = "\n".join(out)
        assert "one group" not in text
        assert "parameters of part 'disc'" in text and "parameters of part 'gen'" in text
        assert "disc.model.0.weight" in text.split("part 'gen'")[0]


# ----------------------------------------------------------------------- GPT
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """20 updates of the tiny preset (warmup to step 19, then one cosine step)."""
    work = tmp_path_factory.mktemp("gpt") / "w"
    out: list[str] = []
    assert run(gpt, *GPT_TINY, "--max-steps", "20", "--work-dir", str(work), out=out) == 0, out
    return work


def _scalars(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "scalars.jsonl").read_text().splitlines()]


def test_gpt_loss_falls_below_a_uniform_guess(gpt_run):
    vocab = gpt.corpus(gpt.PRESETS["tiny"].data.chars).vocab_size
    val = [r["val/loss"] for r in _scalars(gpt_run) if "val/loss" in r]
    assert len(val) == 2  # validation at 10 and at the end
    # untrained, the logits are ~0 (init std 0.02): the loss is ln(vocab); 20 updates learn the
    # character frequencies at least
    assert val[-1] < math.log(vocab) - 0.5 and val[-1] < val[0]


def _trained_state(work: Path, seed: int = 0):
    cfg = dataclasses.replace(gpt.PRESETS["tiny"], max_steps=20, seed=seed)  # as gpt_run ran
    exp = gpt.build(cfg)
    return checkpoint.load(work / "iter_20.safetensors", like=exp.state), cfg


def test_gpt_sample_is_written_and_deterministic_for_a_seed(gpt_run):
    written = (gpt_run / "samples.txt").read_text(encoding="utf-8").removesuffix("\n")
    state, cfg = _trained_state(gpt_run)
    text = gpt.corpus(cfg.data.chars)
    sample_cfg = dataclasses.replace(cfg.sample, tokens=40)
    first = gpt.generate(state, text, sample_cfg)
    assert first == written and first.startswith("def ") and len(first) == 4 + 40
    assert gpt.generate(state, text, sample_cfg) == first  # no hidden state consumed
    torch.manual_seed(123)  # the global generator plays no part
    assert gpt.generate(state, text, sample_cfg) == first
    assert gpt.generate(state.replace(seed=1), text, sample_cfg) != first


def test_gpt_top_1_sampling_is_greedy_decoding_by_hand(gpt_run):
    state, cfg = _trained_state(gpt_run)
    text = gpt.corpus(cfg.data.chars)
    greedy = gpt.generate(state, text, dataclasses.replace(cfg.sample, tokens=12, top_k=1))
    model = state.model
    ids = text.encode("def ").tolist()
    model.eval()
    with torch.no_grad(), bind(model, state.params, state.buffers):
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids[-model.block_size :]]))[0, -1].argmax()))
    model.train()
    assert greedy == text.decode(ids)


def test_gpt_replay_is_ok(gpt_run):
    lines: list[str] = []
    assert replay(gpt_run, out=lines.append), "\n".join(lines)
    assert "REPLAY OK" in "\n".join(lines)


def test_gpt_bf16_and_accumulation_run(tmp_path):
    work = tmp_path / "w"
    argv = [*GPT_TINY, "--max-steps", "2", "--amp", "bfloat16", "--accumulate", "2"]
    assert run(gpt, *argv, "--work-dir", str(work)) == 0
    rows = [r for r in _scalars(work) if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)


# ----------------------------------------------------------------------- GAN
@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("gan") / "w"
    argv = [*GAN_TINY, "--max-steps", "12", "--ema", "0.9", "--checkpoint-interval", "1"]
    assert run(gan, *argv, "--work-dir", str(work)) == 0
    return work


def test_gan_writes_its_picture(gan_run):
    png = (gan_run / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_gan_logs_each_parts_losses_and_lr(gan_run):
    rows = [r for r in _scalars(gan_run) if "disc/loss" in r]
    keys = {"disc/loss_disc_fake", "disc/loss_disc_real", "gen/loss_gen", "disc.lr", "gen.lr"}
    assert rows and keys <= set(rows[-1])
    last = rows[-1]
    torch.testing.assert_close(last["disc/loss"], last["disc/loss_disc_fake"] + last["disc/loss_disc_real"], rtol=1e-5, atol=1e-6)  # fmt: skip


def test_gan_samples_come_from_the_generator_ema_in_eval_mode(gan_run):
    cfg = dataclasses.replace(gan.Config(), data=gan.DataConfig(size=512, batch_size=64), ema=0.9)
    exp = gan.build(cfg)
    state = checkpoint.load(gan_run / "iter_12.safetensors", like=exp.state)
    ema = state.extra["ema"].params
    # by hand: a fresh generator holding the EMA weights and the live BatchNorm statistics
    ref = gan.GAN(16, (2,), gen_widths=(128, 128), disc_widths=(128, 128))
    ref.load_state_dict({**state.params, **state.buffers, **ema})
    ref.eval()
    z = torch.randn(64, 16, generator=fe.rng.generator(state.seed, 0x5A4D))
    with torch.no_grad():
        expected = ref.gen(z)
    torch.testing.assert_close(gan.sample(state, 64), expected, rtol=0, atol=0)
    live = gan.sample(state.replace(extra={k: v for k, v in state.extra.items() if k != "ema"}), 64)
    assert not torch.equal(live, expected)


def test_gan_replay_is_ok(gan_run):
    lines: list[str] = []
    assert replay(gan_run, out=lines.append), "\n".join(lines)
    assert "REPLAY OK" in "\n".join(lines)


def test_gan_on_digits_draws_a_grid(tmp_path):
    argv = [*QUIET, "--data.name", "digits", "--data.batch-size", "128", "--max-steps", "3"]
    assert run(gan, *argv, "--samples", "64", "--work-dir", str(tmp_path)) == 0
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_gan_without_matplotlib_says_so_and_skips_the_picture(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    points = torch.zeros(4, 2)
    assert gan.picture(points, points, "ring", tmp_path / "samples.png") is False
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "samples.png").exists()


def test_mode_coverage_against_hand_counts():
    centres = [(2.0, 0.0), (0.0, 2.0), (-2.0, 0.0)]  # modes 0, 2 and 4 of 8 on radius 2
    points = torch.tensor(centres * 10 + [(0.0, 0.0)] * 10)  # 30 on modes, 10 at the origin
    covered, good = gan.mode_coverage(points, modes=8, radius=2.0, std=0.05)
    assert (covered, good) == (3, 0.75)
    off = torch.tensor([[2.0 + 0.21, 0.0]])  # 4.2 std from the nearest mode
    assert gan.mode_coverage(off, modes=8, radius=2.0, std=0.05) == (0, 0.0)


def test_ring_is_a_function_of_its_seed_and_lies_on_its_modes():
    from fengine.data.toy import ring

    points = ring(2048, seed=3, **gan.RING).tensors[0]
    assert points.shape == (2048, 2) and torch.equal(points, ring(2048, seed=3, **gan.RING).tensors[0])  # fmt: skip
    assert not torch.equal(points, ring(2048, seed=4, **gan.RING).tensors[0])
    covered, good = gan.mode_coverage(points, **gan.RING)
    assert covered == 8 and good > 0.999  # 4 std of a 2-D Gaussian holds all but ~3e-4
    radius = points.norm(dim=1)
    assert abs(float(radius.mean()) - 2.0) < 0.01


def test_gpt_is_causal_and_checks_its_arguments():
    from fengine.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(11, 16, layers=2, heads=2, dim=8, dropout=0.0).eval()
    x = torch.randint(0, 11, (2, 16))
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 1) % 11  # change only the future of position 8
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="dim=8 must be divisible by heads=3"):
        GPT(11, 16, dim=8, heads=3)


def test_gan_model_checks_its_arguments():
    from fengine.models.gan import GAN

    with pytest.raises(ValueError, match=r"GAN: gen_widths must be ints >= 1, got \(8, 0\)"):
        GAN(4, (2,), gen_widths=(8, 0))
    with pytest.raises(ValueError, match="GAN: noise_size must be an int >= 1, got 0"):
        GAN(0, (2,))
