"""The benchmark suite's engines: each trains a workload for ``steps`` updates of AdamW(lr=1e-3).

Every engine returns ``(seconds, params)``: the wall time of the updates after the first
``warmup`` (compilation, allocator and cache warm-up excluded for all alike) and the final
parameters by name, for the bitwise comparison with the hand-written loop.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable

import torch
from workloads import Batch, Workload, epochs

import fengine as fe
from fengine.compiled import CompileFallbackWarning


Result = tuple[float, dict[str, torch.Tensor]]


def feed(w: Workload, kind: str, steps: int) -> Iterable[Batch]:
    """The batches an engine consumes: ``list`` (precomputed) or ``loader`` (a DataLoader)."""
    return w.batches(steps) if kind == "list" else w.loader()


def _stream(w: Workload, data: Iterable[Batch], steps: int) -> Iterable[Batch]:
    """The batches on the workload's device (a list feed is already there)."""
    if isinstance(data, list):
        return data
    return map(w.to_device, itertools.islice(epochs(data), steps))


def hand(
    w: Workload, data: Iterable[Batch], steps: int, warmup: int, fused: bool = False
) -> Result:
    model = w.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=not fused, fused=fused or None)
    t0 = time.perf_counter()
    for i, batch in enumerate(_stream(w, data, steps)):
        if i == warmup:
            t0 = w.now()
        opt.zero_grad(set_to_none=True)
        w.loss(model, batch).backward()
        opt.step()
    return w.now() - t0, {k: v.detach() for k, v in model.named_parameters()}


def hand_fused(w: Workload, data: Iterable[Batch], steps: int, warmup: int) -> Result:
    return hand(w, data, steps, warmup, fused=True)


def _fengine_step(w: Workload, **options) -> tuple[fe.Step, fe.TrainState]:
    step = fe.train_step(w.loss, fe.optim.adamw(lr=1e-3), **options)
    return step, step.init(w.model())


def _params(state: fe.TrainState) -> dict[str, torch.Tensor]:
    return dict(state.params)


def step_loop(w: Workload, data: Iterable[Batch], steps: int, warmup: int, **options) -> Result:
    """The step called in a plain loop (what a researcher composing transforms writes)."""
    step, state = _fengine_step(w, **options)
    t0 = time.perf_counter()
    for i, batch in enumerate(_stream(w, data, steps)):
        if i == warmup:
            t0 = w.now()
        state, _ = step(state, batch)
    return w.now() - t0, _params(state)


def compiled(w: Workload, data: Iterable[Batch], steps: int, warmup: int) -> Result:
    """The whole step compiled; a step that falls back to eager is an error row, not a rate."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        return step_loop(w, data, steps, warmup, compile=True)


def fit(w: Workload, data: Iterable[Batch], steps: int, warmup: int) -> Result:
    """`fe.fit` with its default handlers (Timer + Logger every 10 updates, log level WARNING)."""
    logging.getLogger("fengine").setLevel(logging.WARNING)  # measure the work, not the terminal
    step, state = _fengine_step(w)
    marks: list[float] = []

    class Clock(fe.handlers.Handler):
        """The two clock readings, checked after every update (as the hand loop's ``i == warmup``)."""

        def on_after_train_iter(self, snap) -> None:
            if snap.state.step in (warmup, steps):
                marks.append(w.now())

    handlers = [*fe.handlers.default_handlers(), Clock()]
    state = fe.fit(state, step, data, max_steps=steps, handlers=handlers)  # type: ignore[arg-type]
    return marks[1] - marks[0], _params(state)


def mmengine(w: Workload, data: Iterable[Batch], steps: int, warmup: int) -> Result:
    """MMEngine 0.10.7's Runner with its default hooks, iteration-based, on the same loader."""
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = w.model()

        def forward(self, inputs, targets, mode="loss"):
            return {"loss": w.loss(self.net, (inputs, targets))}

    marks: list[float] = []

    class Mark(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if runner.iter + 1 in (warmup, steps):
                marks.append(w.now())

    if isinstance(data, list):
        return float("nan"), {}  # the Runner takes a DataLoader only
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(
            model=Model(),
            work_dir=tmp,
            train_dataloader=data,
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-3, foreach=True)),
            train_cfg=dict(by_epoch=False, max_iters=steps, val_interval=steps + 1),
            default_hooks=dict(checkpoint=None),
            custom_hooks=[Mark()],
            log_level="WARNING",
        )
        runner.train()
        params = {k.removeprefix("net."): v.detach() for k, v in runner.model.named_parameters()}
    return marks[1] - marks[0], params


def lightning(w: Workload, data: Iterable[Batch], steps: int, warmup: int) -> Result:
    """Lightning's Trainer (defaults minus checkpoints/progress bar), when installed."""
    if isinstance(data, list):
        return float("nan"), {}  # the Trainer takes a list as several dataloaders: DataLoader only
    import lightning as L  # noqa: N812  (its documented alias)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = w.model()

        def training_step(self, batch, batch_idx):
            return w.loss(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=True)

    marks: list[float] = []

    class Mark(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step in (warmup, steps):
                marks.append(w.now())

    module = Module()
    trainer = L.Trainer(max_steps=steps, accelerator=w.device.type, logger=False, callbacks=[Mark()],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, data)  # type: ignore[arg-type]
    params = {k.removeprefix("net."): v.detach() for k, v in module.named_parameters()}
    return marks[1] - marks[0], params


ENGINES: dict[str, Callable[[Workload, Iterable[Batch], int, int], Result]] = {
    "hand": hand,
    "hand_fused": hand_fused,
    "step": step_loop,
    "fit": fit,
    "compiled": compiled,
    "mmengine": mmengine,
    "lightning": lightning,
}
