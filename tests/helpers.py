"""Small models and data shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(16, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm + linear head: exercises buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def mlp_batches(n: int, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 16, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def cnn_batches(n: int, batch: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def assert_dicts_equal(a: dict, b: dict, what: str = "") -> None:
    assert list(a) == list(b), f"{what}: keys differ"
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"{what}: {k} differs (max abs diff {(a[k] - b[k]).abs().max()})"
        )


class Scripted:
    """A metric whose result at the i-th evaluation is ``values[i]``: a number (under ``key``) or a dict."""

    prefix = None

    def __init__(self, values, key="acc"):
        self.values, self.key, self.calls = list(values), key, 0

    def init(self):
        return 0

    def update(self, acc, batch, outputs):
        return acc + 1

    def compute(self, acc, size=None):
        v = self.values[self.calls]
        self.calls += 1
        return dict(v) if isinstance(v, dict) else {self.key: v}


# ----------------------------------------------------------------- a tiny GAN (several optimizers)
class GAN(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.disc = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


def disc_loss(model, batch):
    real, z = batch
    fake = model.gen(z).detach()
    lr_, lf = model.disc(real), model.disc(fake)
    return {
        "loss_real": F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_)),
        "loss_fake": F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)),
    }


def gen_loss(model, batch):
    _, z = batch
    logits = model.disc(model.gen(z))
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def gan_batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        real = torch.randn(16, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0])
        out.append((real, torch.randn(16, 4, generator=g)))
    return out


def mmengine_hook_calls(
    work_dir, train_cfg: dict, record, *, validate: bool = True, default_hooks: dict | None = None
) -> list:
    """Run a real MMEngine Runner (no default hooks but ``default_hooks``; 3 training batches of 2 toy
    samples, 2 validation batches when ``validate``, metric ``m/acc`` = 1.0) and return
    ``record(stage, runner, kwargs)`` of every hook call, in order."""
    import pytest

    runner_mod = pytest.importorskip("mmengine.runner")
    from mmengine.evaluator import BaseMetric
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from torch.utils.data import DataLoader, TensorDataset

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x, y, mode="tensor"):
            out = self.lin(x)
            return {"loss": ((out - y) ** 2).mean()} if mode == "loss" else [out]

    class Metric(BaseMetric):
        default_prefix = "m"

        def process(self, data_batch, data_samples):
            self.results.append(1)

        def compute_metrics(self, results):
            return {"acc": 1.0}

    calls: list = []

    class Rec(Hook):
        pass

    for stage in Hook.stages:
        setattr(
            Rec, stage, lambda self, runner, *a, _s=stage, **k: calls.append(record(_s, runner, k))
        )
    g = torch.Generator().manual_seed(0)
    train = DataLoader(
        TensorDataset(torch.randn(6, 2, generator=g), torch.randn(6, 1, generator=g)), batch_size=2
    )
    val = DataLoader(
        TensorDataset(torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g)), batch_size=2
    )
    no_defaults = dict(runtime_info=None, timer=None, sampler_seed=None, logger=None,
                       param_scheduler=None, checkpoint=None)  # fmt: skip
    no_defaults.update(default_hooks or {})
    with_val = (
        dict(val_dataloader=val, val_evaluator=[Metric()], val_cfg=dict()) if validate else {}
    )
    runner_mod.Runner(model=Model(), work_dir=str(work_dir), train_dataloader=train, train_cfg=train_cfg,
                      optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)), default_hooks=no_defaults,
                      custom_hooks=[Rec()], log_level="ERROR", **with_val).train()  # fmt: skip
    return calls


def field_docs(cls: type) -> dict[str, str | None]:
    """Each dataclass field's docstring (the string literal after it in the class body, a redeclared
    field keeping its base class's), read from the source with ast, independently of tyro."""
    import ast
    import dataclasses
    import inspect

    docs: dict[str, str | None] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass).strip()).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, [*body[1:], None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None  # fmt: skip
                docs[node.target.id] = doc or docs.get(node.target.id)
    return {f.name: docs.get(f.name) for f in dataclasses.fields(cls)}
