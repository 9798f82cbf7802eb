"""A character-level GPT on Python's own standard library sources (no download).

A small causal transformer (fengine.models.gpt) learns to continue Python source text read
from the stdlib (fengine.data.stdlib_corpus): AdamW (no weight decay on biases, norms and
other 1-D params: MMEngine's paramwise rules) with linear warmup then cosine decay,
gradient clipping, optional accumulation and bf16 autocast (--amp bfloat16), dropout drawn
from the step's derived RNG (so resume and `python -m fengine replay` are exact),
validation loss on held-out text, and at the end a text sample, the same for the same
--seed, printed and written to W/samples.txt. Measured with the defaults (1000 updates of
32 x 64 characters, one thread): 75 s of CPU time for the whole command, so a little over a
minute on an idle core; the loss falls from 4.6 (uniform over the 99 characters of 3.11's stdlib)
to 2.77 after 50 updates and 2.29 after 200, and the validation loss reaches 1.83; the
sample has Python's shape (indented `def`s, `self.`, `# comments`) without its sense.

    python recipes/gpt.py                                    # 1000 updates
    python recipes/gpt.py --max-steps 100 --work-dir W && python -m fengine replay W
    python recipes/gpt.py --amp bfloat16 --accumulate 2 --model.layers 4 --model.dim 128
    python recipes/gpt.py --preset tiny --dry-run            # config, groups, FLOPs, lr plot

Every field is a flag (--help); the resolved config is written to W/config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import fengine as fe
from fengine import cli, optim, schedules
from fengine.bind import bind
from fengine.cli import Range
from fengine.data import CharCorpus, Loader, stdlib_corpus
from fengine.metrics import MeanLoss
from fengine.models.gpt import GPT


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The transformer (fengine.models.gpt.GPT)."""

    layers: Annotated[int, Range(ge=1)] = 2
    """transformer blocks"""
    heads: Annotated[int, Range(ge=1)] = 4
    """attention heads per block (must divide --model.dim)"""
    dim: Annotated[int, Range(ge=1)] = 64
    """embedding width"""
    block_size: Annotated[int, Range(ge=1)] = 64
    """context length in characters"""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """dropout of embeddings, attention weights and residual branches; masks drawn from (seed, step, micro-batch)"""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule: linear warmup, then cosine to min_lr at the last update."""

    lr: Annotated[float, Range(gt=0)] = 3e-3
    """peak AdamW learning rate (per update), reached after the warmup"""
    min_lr: Annotated[float, Range(ge=0)] = 3e-4
    """learning rate at the end of the cosine decay"""
    warmup_steps: Annotated[int, Range(ge=0)] = 50
    """linear warmup from 0.001 x lr over this many updates (0: none)"""
    weight_decay: Annotated[float, Range(ge=0)] = 0.1
    """AdamW's decoupled weight decay of the 2-D weights; biases, norms and other 1-D params get none"""
    b1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW beta1"""
    b2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW beta2"""
    clip_grad: Annotated[float | None, Range(gt=0)] = 1.0
    """clip the global gradient norm to this value (None: no clipping)"""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus (the stdlib's sources) and its loader."""

    chars: Annotated[int, Range(ge=1000)] = 1_000_000
    """characters of stdlib source to read (the corpus; the same for the same Python version)"""
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1
    """the last part of the corpus, held out for validation"""
    val_blocks: Annotated[int, Range(ge=1)] = 128
    """validation sequences, evenly spaced over the held-out text"""
    batch_size: Annotated[int, Range(ge=1)] = 32
    """sequences of block_size characters per micro-batch (per process)"""
    num_workers: Annotated[int, Range(ge=0, le=64)] = 0
    """loader worker processes (does not change a bit)"""


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The text sample drawn at the end (written to W/samples.txt)."""

    tokens: Annotated[int, Range(ge=0)] = 300
    """characters to generate at the end (0: no sample)"""
    prompt: str = "def "
    """the text the sample continues (every character must occur in the corpus)"""
    temperature: Annotated[float, Range(gt=0)] = 0.8
    """softmax temperature of the sampling (lower: more conservative)"""
    top_k: Annotated[int | None, Range(ge=1)] = None
    """sample only among the k most likely characters (None: all)"""


@dataclasses.dataclass(frozen=True)
class Config(cli.RunConfig):
    work_dir: Path = Path("work_dirs/gpt")
    """where checkpoints, logs, config.json, run_log.jsonl and samples.txt go"""
    max_steps: Annotated[int | None, Range(ge=1)] = 1000
    """train this many optimizer updates; giving --max-epochs clears it"""
    amp: Literal["none", "bfloat16"] = "none"
    """autocast the forward to bfloat16 (no loss scaling needed)"""
    accumulate: Annotated[int, Range(ge=1)] = 1
    """micro-batches per optimizer update (gradient accumulation)"""
    val_interval: Annotated[int, Range(ge=1)] = 200
    """validate every N updates and at the end (epoch runs: every epoch)"""
    log_interval: Annotated[int, Range(ge=1)] = 50
    """log every N updates"""
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()

    NOT_RECORDED: ClassVar[tuple[str, ...]] = (*cli.RunConfig.NOT_RECORDED, "sample")

    def check(self) -> None:
        super().check()
        if self.model.dim % self.model.heads:
            raise cli.UsageError(
                f"--model.heads {self.model.heads} must divide --model.dim {self.model.dim}"
            )
        if self.optim.min_lr > self.optim.lr:
            raise cli.UsageError(
                f"--optim.min-lr {self.optim.min_lr:g} must be <= --optim.lr {self.optim.lr:g}"
            )
        if self.sample.tokens:  # an unknown character fails before training, not after
            if not self.sample.prompt:
                raise cli.UsageError(
                    "--sample.prompt is empty: sampling continues a prompt of at least one "
                    "character (or give --sample.tokens 0)"
                )
            try:
                corpus(self.data.chars).encode(self.sample.prompt)
            except ValueError as e:
                raise cli.UsageError(f"--sample.prompt {self.sample.prompt!r}: {e}") from None


BASE = Config()
PRESETS = {
    "tiny": dataclasses.replace(
        BASE,
        model=ModelConfig(layers=1, heads=2, dim=32, block_size=32),
        data=dataclasses.replace(BASE.data, chars=200_000, batch_size=16, val_blocks=32),
    ),
    "base": BASE,
    "wide": dataclasses.replace(
        BASE, model=ModelConfig(layers=4, heads=4, dim=128, block_size=128)
    ),
}
"""Named configs derived from the base (MMEngine's ``_base_`` inheritance): ``--preset NAME``."""


@functools.lru_cache(maxsize=2)
def corpus(chars: int) -> CharCorpus:
    """The first ``chars`` characters of the stdlib sources (read once per process)."""
    return stdlib_corpus(chars)


def datasets(cfg: Config) -> tuple[TensorDataset, TensorDataset]:
    """Non-overlapping training blocks of the first part of the corpus; ``val_blocks`` blocks
    evenly spaced over the held-out rest."""
    text, d, block = corpus(cfg.data.chars), cfg.data, cfg.model.block_size
    train = text.blocks(block, "train", val_fraction=d.val_fraction)
    val = text.blocks(block, "val", val_fraction=d.val_fraction)
    n = len(val)
    pick = torch.linspace(0, n - 1, min(d.val_blocks, n)).round().long().unique()
    return train, TensorDataset(*(t[pick] for t in val.tensors))


def loss_fn(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-character cross-entropy (nats per character) over every position."""
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def val_fn(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each sequence's mean loss (MeanLoss averages them over sequences)."""
    x, y = batch
    per_char = F.cross_entropy(model(x).float().transpose(1, 2), y, reduction="none")
    return {"loss": per_char.mean(1)}


def build(cfg: Config) -> cli.Experiment:
    """Everything `fit` needs, from the config alone (replay rebuilds runs with it)."""
    dist = fe.distributed.setup(cfg.device)
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    m, o, d = cfg.model, cfg.optim, cfg.data
    train_set, val_set = datasets(cfg)
    train = Loader(train_set, d.batch_size, seed=cfg.seed, drop_last=True,
                   num_workers=d.num_workers, **shard)  # fmt: skip
    val = Loader(val_set, 64, seed=cfg.seed, shuffle=False, **shard)
    loop = fe.plan(train, micro_batches=cfg.accumulate, max_epochs=cfg.max_epochs,
                   max_steps=cfg.max_steps)  # fmt: skip
    total = loop.total_steps
    warm = min(o.warmup_steps, max(total - 1, 0))
    decay = schedules.cosine(o.lr, T_max=max(total - warm, 1), eta_min=o.min_lr, begin=warm)
    lr = schedules.warmup(decay, steps=warm) if warm else decay
    fe.seed_everything(cfg.seed)  # weight init: the only draw from the global generators
    model = GPT(corpus(d.chars).vocab_size, m.block_size, layers=m.layers, heads=m.heads,
                dim=m.dim, dropout=m.dropout)  # fmt: skip
    groups = optim.paramwise(model, lr=lr, weight_decay=o.weight_decay, bias_decay_mult=0.0,
                             norm_decay_mult=0.0, flat_decay_mult=0.0)  # fmt: skip
    adamw = groups.build(optim.adamw, b1=o.b1, b2=o.b2)
    tx = optim.chain(optim.clip_by_global_norm(o.clip_grad), adamw) if o.clip_grad else adamw
    wrappers: list[fe.Wrapper] = [fe.data_parallel()] if dist.world_size > 1 else []
    if cfg.amp != "none":
        wrappers.append(fe.amp(cfg.amp))
    wrappers.append(fe.check_finite())
    if cfg.accumulate > 1:
        wrappers.append(fe.accumulate(cfg.accumulate))
    step = fe.train_step(loss_fn, tx, *wrappers)
    state = cli.initial_state(step, model, cfg, dist.device)
    validation = fe.Val(val, [MeanLoss()], eval_fn=val_fn,
                        interval=1 if loop.by_epoch else cfg.val_interval,
                        autocast=None if cfg.amp == "none" else cfg.amp)  # fmt: skip
    example = torch.zeros(1, m.block_size, dtype=torch.long, device=dist.device)
    return cli.Experiment(state=state, step=step, train_data=train, plan=loop, val=validation,
                          hyperparams={"lr": lr, "momentum": o.b1, "weight_decay": o.weight_decay},
                          param_groups=groups, example_input=example)  # fmt: skip


from_config = cli.replay_hook(Config, build)  # replay rebuilds each segment with it


def generate(state: fe.TrainState, text: CharCorpus, cfg: SampleConfig) -> str:
    """``cfg.prompt`` continued by ``cfg.tokens`` sampled characters: the eval weights in eval
    mode (no dropout), drawing from a generator seeded by the run's seed alone, so the same
    trained state always writes the same text."""
    model = state.model
    if not isinstance(model, GPT):
        raise TypeError(f"generate: the state's model is {type(model).__name__}, not a GPT")
    params, buffers = state.eval_weights()
    device = next(iter(params.values())).device
    prompt = text.encode(cfg.prompt).unsqueeze(0).to(device)
    generator = fe.rng.generator(state.seed, 0x7E47)  # "text": apart from every training key
    was_training = model.training
    model.eval()
    try:
        with bind(model, params, buffers):
            out = model.generate(prompt, cfg.tokens, generator=generator,
                                 temperature=cfg.temperature, top_k=cfg.top_k)  # fmt: skip
    finally:
        model.train(was_training)
    return text.decode(out[0].cpu())


def finish(cfg: Config, exp: cli.Experiment, state: fe.TrainState) -> str:
    """The final validation loss against a uniform guess; the sample, printed and written."""
    text = corpus(cfg.data.chars)
    result = fe.evaluate(state, val_fn, exp.val.data, exp.val.metrics)
    sample = generate(state, text, cfg.sample) if cfg.sample.tokens else ""
    if fe.distributed.is_main():
        uniform = torch.tensor(float(text.vocab_size)).log().item()
        print(f"validation loss {result['loss']:.3f} nats/char after {state.step} updates "
              f"(a uniform guess over the {text.vocab_size} characters: {uniform:.3f})")  # fmt: skip
        if sample:
            (cfg.work_dir / "samples.txt").write_text(sample + "\n", encoding="utf-8")
            print(f"sample (seed {state.seed}, temperature {cfg.sample.temperature}), also in "
                  f"{cfg.work_dir / 'samples.txt'}:\n{sample}")  # fmt: skip
    return sample


if __name__ == "__main__":
    sys.exit(cli.main(Config, build, presets=PRESETS, description=__doc__, finish=finish))
