"""Scenarios run under ``torchrun --nproc_per_node=2`` by tests/test_distributed.py.

Each rank writes what the parent compares into ``OUT/<scenario>_rank<r>.pt`` (rank 0 also
writes the fengine work dirs). Usage: ``torchrun ... dist_worker.py OUT SCENARIO [...]``.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import ce_loss, mlp, mlp_batches, small_cnn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fengine as fe
from fengine import optim
from fengine.handlers import Checkpointer, Logger, Timer
from fengine.metrics import Accuracy


def shards(n, rank, world, batch=8, seed=1):
    """Each step's global batch is ``world`` per-rank batches; this rank's part of each."""
    return [mlp_batches(world, batch=batch, seed=seed + t)[rank] for t in range(n)]


def fengine_dp(out, rank, world):
    """fengine data_parallel vs DDP on the same per-rank batches: plain SGD+momentum, and fp16
    dynamic loss scaling with accumulation (DDP: GradScaler + no_sync for the first micro-batch)."""
    data = shards(6, rank, world)
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.data_parallel())
    state = step.init(mlp(), seed=0)
    for b in data:
        state, _ = step(state, b)
    ref = DDP(mlp())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        opt.step()

    groups = [shards(2, rank, world, seed=100 + 10 * t) for t in range(4)]
    amp_step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.data_parallel(), fe.amp("float16"),
                             fe.accumulate(2))  # fmt: skip
    amp_state = amp_step.init(mlp(), seed=0)
    for g in groups:
        amp_state, _ = amp_step(amp_state, fe.MicroBatches(g))
    amp_ref = DDP(mlp())
    amp_opt = torch.optim.SGD(amp_ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cpu")
    for g in groups:
        amp_opt.zero_grad(set_to_none=True)
        with amp_ref.no_sync():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = ce_loss(amp_ref, g[0])
            scaler.scale(loss * 0.5).backward()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ce_loss(amp_ref, g[1])
        scaler.scale(loss * 0.5).backward()
        scaler.step(amp_opt)
        scaler.update()

    # unequal sample counts: rank r holds 4 + 6r samples; weighted by count = the global mean
    x, y = mlp_batches(1, batch=4 + 6 * rank, seed=50 + rank)[0]
    w_step = fe.train_step(
        ce_loss, optim.sgd(0.5), fe.data_parallel(), fe.accumulate(1, weight=lambda b: len(b[1]))
    )
    w_state, _ = w_step(w_step.init(mlp(), seed=0), fe.MicroBatches([(x, y)]))
    torch.save(
        {
            "fe": state.params,
            "ddp": {n: p.detach() for n, p in ref.module.named_parameters()},
            "fe_amp": amp_state.params,
            "ddp_amp": {n: p.detach() for n, p in amp_ref.module.named_parameters()},
            "scale": float(amp_step.wrappers[1].scaler(amp_state).scale),
            "ddp_scale": scaler.get_scale(),
            "weighted": w_state.params,
        },
        out / f"dp_rank{rank}.pt",
    )


def fit_run(out, rank, world):
    """fit with a sharded Loader, a BatchNorm CNN, validation, checkpoints: rank 0 writes; buffers synced;
    resume at the same world size is exact; metrics are gathered over the whole val set."""
    ds = fe.data.synthetic_classification(48, num_features=64, num_classes=10, seed=0)
    images = fe.data.synthetic_classification(48, num_features=64, num_classes=10, seed=0)

    def loader(data, **kw):
        return fe.data.Loader(data, 4, seed=0, rank=rank, world_size=world, **kw)

    def cnn_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x.view(-1, 1, 8, 8)), y)

    def predict(model, batch):
        return model(batch[0].view(-1, 1, 8, 8))

    step = fe.train_step(cnn_loss, optim.sgd(0.05, momentum=0.9), fe.data_parallel())
    val = fe.Val(loader(images, shuffle=False), [Accuracy()], eval_fn=predict)
    seen = []
    rec = fe.on("after_val_epoch")(lambda snap: seen.append(float(snap.metrics["accuracy"])))
    work = out / "fit"
    straight = fe.fit(step.init(small_cnn(), seed=0), step, loader(ds), max_epochs=3, val=val,
                      handlers=[Checkpointer(1, max_keep_ckpts=2), rec], work_dir=work)  # fmt: skip
    mid = out / "fit_resumed"
    # written by rank 0's background writer (async_save); the resume below reads what it left
    fe.fit(step.init(small_cnn(), seed=0), step, loader(ds), max_steps=7,
           handlers=[Checkpointer(3, by_epoch=False, async_save=True)], work_dir=mid)  # fmt: skip
    resumed = fe.fit(step.init(small_cnn(), seed=0), step, loader(ds), max_epochs=3, handlers=[], work_dir=mid,
                     resume=True)  # fmt: skip
    single = fe.evaluate(straight, predict, loader(images, shuffle=False), [Accuracy()])
    # iteration-based: a validation at update 4, not an epoch end (6 updates per epoch)
    at_val = []
    keep = fe.on("before_val_epoch")(
        lambda snap: at_val.append({k: v.clone() for k, v in snap.state.buffers.items()})
    )
    fe.fit(step.init(small_cnn(), seed=0), step, loader(ds), max_steps=4, handlers=[keep],
           val=fe.Val(loader(images, shuffle=False), [Accuracy()], eval_fn=predict, interval=4))  # fmt: skip
    torch.save(
        {"params": straight.params, "buffers": straight.buffers, "resumed": resumed.params, "val": seen,
         "evaluate": single["accuracy"], "position": (straight.step, straight.epoch, straight.batch_in_epoch),
         "buffers_at_val": at_val},
        out / f"fit_rank{rank}.pt",
    )  # fmt: skip


def dropout(out, rank, world):
    """Dropout masks: the same on every rank by default, per rank with diff_rank_seed (also
    under accumulate, which passed each micro-batch's index without the rank's offset)."""
    masks = {}
    for acc in (False, True):
        for diff in (False, True):
            seen: list = []

            def loss_fn(model, batch, seen=seen):
                seen.append(F.dropout(torch.ones(64), 0.5, training=True))
                return ce_loss(model, batch)

            more = [fe.accumulate(2)] if acc else []
            step = fe.train_step(
                loss_fn, optim.sgd(0.1), fe.data_parallel(diff_rank_seed=diff), *more
            )
            batch = mlp_batches(1)[0]
            step(step.init(mlp(), seed=3), fe.MicroBatches([batch, batch]) if acc else batch)
            masks[(acc, diff)] = seen[0]
    torch.save(masks, out / f"dropout_rank{rank}.pt")


def replicas(out, rank, world):
    """Each rank builds its model from its own seed (MMEngine's diff_rank_seed): fit starts every
    rank from rank 0's weights, as DDP does (the replicas trained apart, silently)."""
    ds = fe.data.synthetic_classification(32, num_features=16, num_classes=10, seed=0)
    finals = {}
    for label, init_seed in (("per_rank", rank), ("rank_0", 0)):
        step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.data_parallel())
        data = fe.data.Loader(ds, 4, seed=0, rank=rank, world_size=world)
        final = fe.fit(step.init(mlp(seed=init_seed)), step, data, max_steps=3, handlers=[])
        finals[label] = {n: p.detach().clone() for n, p in final.params.items()}
    torch.save(finals, out / f"replicas_rank{rank}.pt")


def nan_one_rank(out, rank, world):
    """Rank 1's loss is NaN at update 3, when a checkpoint is due: every rank raises and no file
    holds the NaN weights (rank 0, its own losses finite, saved them as the latest). The same
    with check_finite(): both stop before the update."""
    ds = fe.data.synthetic_classification(32, num_features=16, num_classes=10, seed=0)
    result = {}
    for checked in (False, True):
        calls = [0]

        def loss_fn(model, batch, calls=calls):
            calls[0] += 1
            loss = ce_loss(model, batch)
            return loss * float("nan") if rank == 1 and calls[0] == 3 else loss

        more = [fe.check_finite()] if checked else []
        step = fe.train_step(loss_fn, optim.sgd(0.1), fe.data_parallel(), *more)
        data = fe.data.Loader(ds, 4, seed=0, rank=rank, world_size=world)
        work = out / f"nan_{checked}"
        state = step.init(mlp())
        error, kept = None, None
        try:
            fe.fit(state, step, data, max_steps=6, work_dir=work,
                   handlers=[Checkpointer(3, by_epoch=False)])  # fmt: skip
        except FloatingPointError as e:
            error, kept = str(e), getattr(e, "fengine_state", None)
        finite = (
            None if kept is None else all(bool(p.isfinite().all()) for p in kept.params.values())
        )
        dist.barrier()
        result[checked] = (error, sorted(p.name for p in work.glob("*.safetensors")), finite)
    torch.save(result, out / f"nan_one_rank_rank{rank}.pt")


class _OwnShards(torch.utils.data.IterableDataset):
    """Validation batches that shard themselves by rank (fit cannot tell: it does not refuse)."""

    def __init__(self, ds, rank, world):
        self.ds, self.rank, self.world = ds, rank, world

    def __iter__(self):
        idx = list(range(self.rank, len(self.ds), self.world))
        for i in range(0, len(idx), 4):
            yield torch.utils.data.default_collate([self.ds[j] for j in idx[i : i + 4]])


def mismatch(out, rank, world):
    """Ranks that would not run one training are refused with one error naming what differs
    (a different max_steps met another collective; an unsharded Loader read the same samples)."""
    ds = fe.data.synthetic_classification(32, num_features=16, num_classes=10, seed=0)
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.data_parallel())
    messages = []
    # a wrapper whose repr holds an address (a partial) is the same wrapper on every rank
    same = fe.train_step(ce_loss, optim.sgd(0.1), fe.data_parallel(),
                         fe.forward_wrapper(functools.partial(lambda f, scale: f, scale=1.0)))  # fmt: skip
    sharded = fe.data.Loader(ds, 4, seed=0, rank=rank, world_size=world)
    per_rank_seed = fe.data.Loader(ds, 4, seed=rank, rank=rank, world_size=world)
    same_shard = fe.data.Loader(ds, 4, seed=0, rank=0, world_size=world)
    unsharded_val = fe.Val(fe.data.Loader(ds, 8, seed=0, shuffle=False), [Accuracy()])
    # accepted: a seed that shuffle=False never uses; validation data that shards itself
    unshuffled = torch.utils.data.DataLoader(ds, batch_size=4, sampler=torch.utils.data.DistributedSampler(
        ds, num_replicas=world, rank=rank, shuffle=False, seed=rank))  # fmt: skip
    own_shards = fe.Val(torch.utils.data.DataLoader(_OwnShards(ds, rank, world), batch_size=None),
                        [Accuracy()])  # fmt: skip
    for data, steps, run, val in (
        (sharded, 3 + rank, step, None),
        (fe.data.Loader(ds, 4, seed=0), 3, step, None),
        (sharded, 3, same, None),
        (per_rank_seed, 3, step, None),  # seed_everything(diff_rank_seed=True)'s seed
        (same_shard, 3, step, None),
        (sharded, 3, step, unsharded_val),
        (unshuffled, 3, step, None),
        (sharded, 3, step, own_shards),
    ):
        try:
            fe.fit(run.init(mlp()), run, data, max_steps=steps, val=val, handlers=[])
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    torch.save(messages, out / f"mismatch_rank{rank}.pt")


def disagree(out, rank, world):
    """Ranks configured apart where fit compared nothing, each refused on every rank with one
    error naming the field and both values: (a) another lr / weight decay, (b) another state
    seed, (c) another Val interval, (d) another Checkpointer interval; and a resume that loaded
    different checkpoints (each rank its own work dir, as on per-node local disks: rank 0 finds
    its checkpoint, rank 1 none), or failed on one rank. Before: accepted, or a gloo abort."""
    ds = fe.data.synthetic_classification(32, num_features=16, num_classes=10, seed=0)
    data = fe.data.Loader(ds, 4, seed=0, rank=rank, world_size=world)
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.data_parallel())

    def val(interval):
        return fe.Val(fe.data.Loader(ds, 4, seed=0, shuffle=False, rank=rank, world_size=world),
                      [Accuracy()], interval=interval)  # fmt: skip

    def attempt(run=step, seed=0, **kw):
        try:
            fe.fit(run.init(mlp(), seed=seed), run, data, max_steps=kw.pop("max_steps", 4), **kw)
            return None
        except (ValueError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"

    lr = fe.train_step(ce_loss, optim.sgd(0.1 * (1 + rank)), fe.data_parallel())
    decay = fe.train_step(ce_loss, optim.sgd(0.1, weight_decay=0.5 * rank), fe.data_parallel())
    found = {
        "lr": attempt(lr, handlers=[]),
        "weight_decay": attempt(decay, handlers=[]),
        "seed": attempt(seed=100 + rank, handlers=[]),
        "val": attempt(val=val(2 + rank), handlers=[]),
        "checkpointer": attempt(
            handlers=[Checkpointer(2 + rank, by_epoch=False)], work_dir=out / "disagree_ckpt"
        ),
        "same": attempt(
            val=val(2), handlers=[Checkpointer(2, by_epoch=False)], work_dir=out / "disagree_same"
        ),
        # handlers only rank 0 acts on (a Logger, a Timer), another Logger interval: accepted
        "rank0_only": attempt(
            handlers=[Logger(interval=10), Timer()] if rank == 0 else [Logger(interval=50)],
            work_dir=out / "disagree_logger",
        ),
    }
    # each rank its own work dir: rank 0 writes its checkpoints, rank 1's stays empty
    own = out / f"disagree_r{rank}"
    found["first"] = attempt(max_steps=2, handlers=[Checkpointer(1, by_epoch=False)], work_dir=own)
    found["resume"] = attempt(handlers=[], work_dir=own, resume=True)
    found["resume_on_one"] = attempt(handlers=[], work_dir=own, resume=rank == 0)
    # a file only rank 0 has: rank 1 fails to read it, rank 0 hears of it
    found["missing"] = attempt(handlers=[], resume=own / "iter_2.safetensors")
    # a copy of one file on each rank (another path, the same content): accepted
    dist.barrier()
    copy = out / f"disagree_copy{rank}.safetensors"
    copy.write_bytes((out / "disagree_r0" / "iter_1.safetensors").read_bytes())
    found["copies"] = attempt(handlers=[], resume=copy)
    torch.save(found, out / f"disagree_rank{rank}.pt")


def refuse(out, rank, world):
    """A step without data_parallel under 2 processes is refused."""
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    try:
        fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, handlers=[])
    except ValueError as e:
        (out / f"refuse_rank{rank}.txt").write_text(str(e))


def preempt(out, rank, world):
    """SIGTERM reaches rank 1 only: both ranks agree, save one checkpoint at the same step, raise Preempted."""

    @fe.on("after_train_iter", once=3)
    def term(snap):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.data_parallel())
    try:
        fe.fit(
            step.init(mlp()),
            step,
            shards(40, rank, world),
            max_epochs=1,
            handlers=[term],
            work_dir=out / "pre",
        )
    except fe.Preempted as e:
        (out / f"preempt_rank{rank}.txt").write_text(f"{e.state.step} {e.exit_code}")


class Seen(fe.Handler):
    """The samples (their first feature) each update consumed."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_after_train_iter(self, snap):
        self.rows += snap.batch[0][:, 0].tolist()


def position_data(n=48):
    return fe.data.synthetic_classification(n, num_features=16, num_classes=10, seed=5)


def position_run(work, rank, world, n=48, **fit_kw):
    """The run whose sample position the 2 <-> 1 process resumes check (batch 4 per rank)."""
    loader = fe.data.Loader(position_data(n), 4, seed=0, rank=rank, world_size=world)
    wrappers = [fe.data_parallel()] if world > 1 else []
    step = fe.train_step(ce_loss, optim.sgd(0.05), *wrappers)
    seen = Seen()
    fe.fit(step.init(mlp(), seed=0), step, loader, handlers=[seen, Checkpointer(1, by_epoch=False)], work_dir=work,
           **fit_kw)  # fmt: skip
    return seen.rows


def two_to_one(out, rank, world):
    """2 processes train 1 update (8 samples) and checkpoint; the parent resumes in 1 process."""
    rows = position_run(out / "two", rank, world, max_steps=1)
    torch.save(rows, out / f"two_to_one_rank{rank}.pt")


def one_to_two(out, rank, world):
    """The parent trained 2 updates in 1 process (8 samples); 2 processes resume and finish the epoch."""
    rows = position_run(out / "one", rank, world, max_epochs=1, resume=True)
    torch.save(rows, out / f"one_to_two_rank{rank}.pt")


def uneven(out, rank, world):
    """9 samples, batch 2, not rounded up: rank 0 has 3 batches, rank 1 two. Refused up front
    (before: rank 0's third update met rank 1's next collective)."""
    ds = fe.data.synthetic_classification(9, num_features=16, num_classes=10, seed=5)
    loader = fe.data.Loader(ds, 2, seed=0, rank=rank, world_size=world, round_up=False)
    step = fe.train_step(ce_loss, optim.sgd(0.05), fe.data_parallel())
    try:
        fe.fit(step.init(mlp(), seed=0), step, loader, max_epochs=2, handlers=[])
        message = None
    except ValueError as e:
        message = str(e)
    torch.save(message, out / f"uneven_rank{rank}.pt")


def one_to_two_at_epoch_end(out, rank, world):
    """The parent trained the whole first epoch of 52 samples (13 batches) in 1 process; 2
    processes resume from its last checkpoint (batch 13, not divisible by 2) into epoch 2."""
    rows = position_run(out / "one_end", rank, world, n=52, max_epochs=2, resume=True)
    torch.save(rows, out / f"one_to_two_at_epoch_end_rank{rank}.pt")


SCENARIOS = {
    f.__name__: f
    for f in (
        fengine_dp,
        fit_run,
        dropout,
        refuse,
        preempt,
        two_to_one,
        one_to_two,
        one_to_two_at_epoch_end,
        uneven,
        replicas,
        nan_one_rank,
        mismatch,
        disagree,
    )
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    info = fe.distributed.setup("cpu")
    for name in sys.argv[2:]:
        SCENARIOS[name](out, info.rank, info.world_size)
        dist.barrier()
    time.sleep(0.1)
    dist.destroy_process_group()
