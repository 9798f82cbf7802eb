"""Scenarios run under ``torchrun --nproc_per_node=2`` by tests/test_fsdp.py (FSDP2 on CPU, gloo).

Each rank writes what the parent compares into ``OUT/<scenario>_rank<r>.pt`` (gathered, full
tensors). References: torch's own FSDP2 loop (``fully_shard`` + ``torch.optim`` foreach,
``clip_grad_norm_``, ``GradScaler``) on the same per-rank batches, and, in the parent, one
process of fengine on the concatenated batches.
Usage: ``torchrun ... fsdp_worker.py OUT SCENARIO [...]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import ce_loss, mlp_batches, small_cnn
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

import fengine as fe
from fengine import optim
from fengine.handlers import Checkpointer
from fengine.metrics import MeanLoss
from fengine.sharding import gather_state


def deep_mlp(seed: int = 0) -> nn.Module:
    """Three Linear units (each its own FSDP unit) under a root."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)
    )


def shards(n, rank, world, batch=8, seed=1):
    """Each step's global batch is ``world`` per-rank batches; this rank's part of each."""
    return [mlp_batches(world, batch=batch, seed=seed + t)[rank] for t in range(n)]


def sharded(model: nn.Module) -> nn.Module:
    return fe.distributed.shard(model, units=nn.Linear)


def root_holds_last(model: nn.Module) -> nn.Module:
    """Units by name; the last Linear stays in the root unit (which keeps its all-gathered params
    after a forward without backward, e.g. an evaluation)."""
    return fe.distributed.shard(model, units=["0", "2"])


def torch_sharded(model: nn.Module) -> nn.Module:
    """The reference: FSDP2 applied by hand, innermost units first, then the root."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def full(model_or_params) -> dict[str, torch.Tensor]:
    items = (
        model_or_params.named_parameters()
        if isinstance(model_or_params, nn.Module)
        else model_or_params.items()
    )
    return {n: p.detach().full_tensor() for n, p in items}


def gathered(state) -> dict:
    g = gather_state(state, to=None)
    return {"params": g.params, "opt_state": g.opt_state, "extra": g.extra}


def save(out, name, rank, obj):
    torch.save(obj, out / f"{name}_rank{rank}.pt")


# ---------------------------------------------------------------- optimizers vs torch's FSDP2 loop
def optimizers(out, rank, world):
    """SGD+momentum, and AdamW with clip_by_global_norm: fengine+fsdp vs FSDP2+torch.optim."""
    data = shards(5, rank, world)
    res = {}
    for name, tx, make_opt, clip in (
        ("sgd", optim.sgd(0.1, momentum=0.9),
         lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), None),
        ("adamw", optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.01)),
         lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=True), 0.5),
        ("adamw_fused", optim.adamw(1e-2, fused=True),
         lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), None),
    ):  # fmt: skip
        step = fe.train_step(ce_loss, tx, fe.fsdp())
        model = sharded(deep_mlp())
        state = step.init(model, seed=0)
        assert all(state.params[n] is p for n, p in model.named_parameters())  # shared, not copied
        norms = []
        for b in data:
            state, m = step(state, b)
            if "grad_norm" in m:
                assert not fe.sharding.is_dtensor(m["grad_norm"])
                norms.append(m["grad_norm"].clone())
        ref = torch_sharded(deep_mlp())
        opt = make_opt(ref.parameters())
        ref_norms = []
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ref(x), y).backward()
            if clip is not None:
                ref_norms.append(
                    torch.nn.utils.clip_grad_norm_(
                        ref.parameters(), clip, foreach=True
                    ).full_tensor()
                )
            opt.step()
        res[name] = {"fe": full(state.params), "torch": full(ref), "norms": norms,
                     "ref_norms": ref_norms, "opt_state": gathered(state)["opt_state"]}  # fmt: skip
    save(out, "optimizers", rank, res)


# ---------------------------------------------------------------- accumulation and bf16
def accumulation(out, rank, world):
    """accumulate(2): per-micro-batch reduce-scatter (FSDP2 accumulating into .grad) and
    defer_reduce (set_requires_gradient_sync(False) on the first micro-batch), vs torch."""
    groups = [shards(2, rank, world, seed=100 + 10 * t) for t in range(4)]
    res = {}
    for defer in (False, True):
        step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.accumulate(2),
                             fe.fsdp(defer_reduce=defer))  # fmt: skip
        state = step.init(sharded(deep_mlp()), seed=0)
        for g in groups:
            state, _ = step(state, fe.MicroBatches(g))
        ref = torch_sharded(deep_mlp())
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
        for g in groups:
            opt.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(g):
                if defer:
                    ref.set_requires_gradient_sync(i == len(g) - 1)
                (F.cross_entropy(ref(x), y) * 0.5).backward()
            opt.step()
        res[defer] = {"fe": full(state.params), "torch": full(ref)}
    # a short last group (1 of 2 micro-batches) with defer_reduce still syncs
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.accumulate(2), fe.fsdp(defer_reduce=True))
    state = step.init(sharded(deep_mlp()), seed=0)
    state, _ = step(state, fe.MicroBatches(groups[0][:1]))
    ref = torch_sharded(deep_mlp())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=True)
    F.cross_entropy(ref(groups[0][0][0]), groups[0][0][1]).backward()
    opt.step()
    res["short"] = {"fe": full(state.params), "torch": full(ref)}
    save(out, "accumulation", rank, res)


def bf16(out, rank, world):
    """amp('bfloat16') (autocast) with fsdp vs FSDP2 under torch.autocast."""
    data = shards(4, rank, world)
    step = fe.train_step(ce_loss, optim.adamw(1e-2), fe.amp("bfloat16"), fe.fsdp())
    state = step.init(sharded(deep_mlp()), seed=0)
    for b in data:
        state, _ = step(state, b)
    ref = torch_sharded(deep_mlp())
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=True)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
    res = {"fe": full(state.params), "torch": full(ref)}
    # with accumulate(2): one autocast region spans both micro-batches in fengine (amp is outer)
    groups = [shards(2, rank, world, seed=100 + 10 * t) for t in range(3)]
    step = fe.train_step(
        ce_loss, optim.adamw(1e-2), fe.amp("bfloat16"), fe.accumulate(2), fe.fsdp()
    )
    state = step.init(sharded(deep_mlp()), seed=0)
    for g in groups:
        state, _ = step(state, fe.MicroBatches(g))
    ref = torch_sharded(deep_mlp())
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=True)
    for g in groups:
        opt.zero_grad(set_to_none=True)
        for x, y in g:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(ref(x), y)
            (loss * 0.5).backward()
        opt.step()
    res.update(fe_acc=full(state.params), torch_acc=full(ref))
    save(out, "bf16", rank, res)


# ---------------------------------------------------------------- fp16: an overflow on one rank
class Poison(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor`` (inf: an overflow)."""

    @staticmethod
    def forward(ctx, s, factor):
        ctx.factor = factor
        return s.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class Poisonable(nn.Module):
    """The MLP plus a 1-element param ``s`` (FSDP shards it: rank 0 holds it, rank 1 nothing), whose
    gradient one rank can make non-finite: after the reduce-scatter only rank 0's shard shows it."""

    def __init__(self):
        super().__init__()
        self.net = deep_mlp()
        self.s = nn.Parameter(torch.zeros(1))
        self.factor = 1.0

    def forward(self, x):
        return self.net(x) + Poison.apply(self.s, self.factor)


class LocalFinite(fe.Wrapper):
    """Records whether this rank's local gradient shards were finite (written before amp: scaled)."""

    def __init__(self):
        self.seen = []

    def gradient(self, apply, part):
        def record(state, g):
            self.seen.append(
                all(bool(torch.isfinite(t.to_local()).all()) for t in g.grads.values())
            )
            return apply(state, g)

        return record


def fp16(out, rank, world):
    """fp16 dynamic loss scaling; at update 3 rank 1 alone overflows (in a gradient only rank 0
    holds a shard of): both ranks skip that update and back off, as FSDP2 + GradScaler do."""
    data = shards(5, rank, world)
    bad = 2  # the 0-based update whose gradient rank 1 poisons
    seen = LocalFinite()
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), seen, fe.amp("float16"),
                         fe.accumulate(2), fe.fsdp())  # fmt: skip
    model = sharded(Poisonable())
    state = step.init(model, seed=0)
    skipped, scales = [], []
    for t, b in enumerate(data):
        model.factor = float("inf") if (rank == 1 and t == bad) else 1.0
        half = len(b[0]) // 2
        group = fe.MicroBatches([(b[0][:half], b[1][:half]), (b[0][half:], b[1][half:])])
        state, m = step(state, group)
        skipped.append(bool(m["update_skipped"]))
        scales.append(float(m["loss_scale"]))
    ref_model = Poisonable()
    for mod in ref_model.net:
        if isinstance(mod, nn.Linear):
            fully_shard(mod)
    fully_shard(ref_model)
    opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cpu")
    for t, (x, y) in enumerate(data):
        ref_model.factor = float("inf") if (rank == 1 and t == bad) else 1.0
        opt.zero_grad(set_to_none=True)
        half = len(x) // 2
        for xs, ys in ((x[:half], y[:half]), (x[half:], y[half:])):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(ref_model(xs), ys)
            scaler.scale(loss * 0.5).backward()
        scaler.step(opt)
        scaler.update()
    save(out, "fp16", rank, {"fe": full(state.params), "torch": full(ref_model), "skipped": skipped,
                             "scales": scales, "ref_scale": scaler.get_scale(),
                             "local_finite": seen.seen})  # fmt: skip


# ---------------------------------------------------------------- EMA and evaluation
def ema_eval(out, rank, world):
    """EMA (foreach lerp on the shards) == the lerp of the full params, bit for bit; evaluation
    with the EMA weights == a plain module holding them; the live weights come back unchanged."""
    data = shards(4, rank, world)
    step = fe.train_step(ce_loss, optim.adamw(1e-2), fe.ema(momentum=0.25), fe.fsdp())
    model = sharded(deep_mlp())
    state = step.init(model, seed=0)
    ref_ema = None
    for b in data:
        state, _ = step(state, b)
        live = full(state.params)
        ref_ema = (
            {n: t.clone() for n, t in live.items()}
            if ref_ema is None
            else {n: torch.lerp(ref_ema[n], live[n], 0.25) for n in live}
        )
    ema_full = full(step.wrappers[0].params(state))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(7))
    params, buffers = state.eval_weights()
    from fengine.bind import bind

    model.eval()
    with torch.no_grad(), bind(model, params, buffers):
        got = model(x)
    model.train()
    plain = deep_mlp()
    plain.load_state_dict(ema_full)
    with torch.no_grad():
        want = plain(x)
    after = full(state.params)
    save(out, "ema_eval", rank, {"ema": ema_full, "ref_ema": ref_ema, "out": got, "plain_out": want,
                                 "live": live, "after": after})  # fmt: skip


# ---------------------------------------------------------------- fit, checkpoints, resume
def fit_data():
    return fe.data.synthetic_classification(64, num_features=16, num_classes=10, seed=3)


def fit_step():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
    return fe.train_step(ce_loss, tx, fe.amp("float16"), fe.accumulate(2), fe.ema(0.9), fe.fsdp())


def fit_resume(out, rank, world):
    """fit under fsdp: checkpoints gathered by every rank and written by rank 0 (full tensors),
    validation with the EMA weights mid-run, a resume at update 4 equal to the straight run."""

    def loader():
        return fe.data.Loader(fit_data(), 4, seed=0, rank=rank, world_size=world)

    val = fe.Val(fe.data.Loader(fit_data(), 8, seed=0, rank=rank, world_size=world, shuffle=False),
                 [fe.metrics.Accuracy()], interval=2)  # fmt: skip
    step = fit_step()
    accuracy = []
    rec = fe.on("after_val_epoch")(lambda snap: accuracy.append(float(snap.metrics["accuracy"])))
    straight = fe.fit(step.init(root_holds_last(deep_mlp()), seed=0), step, loader(), max_steps=8, val=val,
                      handlers=[Checkpointer(4, by_epoch=False), rec], work_dir=out / "straight")  # fmt: skip
    step = fit_step()
    noval = fe.fit(
        step.init(root_holds_last(deep_mlp()), seed=0), step, loader(), max_steps=8, handlers=[]
    )
    step = fit_step()
    first = fe.fit(step.init(root_holds_last(deep_mlp()), seed=0), step, loader(), max_steps=4,
                   handlers=[Checkpointer(4, by_epoch=False)], work_dir=out / "resumed")  # fmt: skip
    at4 = gathered(first)
    step = fit_step()
    resumed = fe.fit(step.init(root_holds_last(deep_mlp(seed=9)), seed=0), step, loader(), max_steps=8,
                     handlers=[], work_dir=out / "resumed", resume=True)  # fmt: skip
    # load keeps the module's own params: the state after load still trains the sharded module
    step = fit_step()
    like = step.init(root_holds_last(deep_mlp(seed=5)), seed=0)
    loaded = fe.checkpoint.load(out / "resumed" / "iter_4.safetensors", like=like)
    shared = all(loaded.params[n] is p for n, p in loaded.model.named_parameters())
    save(out, "fit_resume", rank, {"straight": gathered(straight), "noval": gathered(noval), "accuracy": accuracy,
                                   "resumed": gathered(resumed), "at4": at4, "shared": shared,
                                   "loaded": gathered(loaded)})  # fmt: skip


# ---------------------------------------------------------------- several optimizers
def multi_parts():
    return {"first": (ce_loss, optim.sgd(0.1, momentum=0.9), "0"),
            "rest": (ce_loss, optim.adam(1e-2), lambda n: not n.startswith("0."))}  # fmt: skip


def multi(out, rank, world):
    """multi_step: each part's backward runs through FSDP, its own gradients kept."""
    step = fe.multi_step(multi_parts(), fe.fsdp())
    state = step.init(sharded(deep_mlp()), seed=0)
    for b in shards(3, rank, world):
        state, _ = step(state, b)
    save(out, "multi", rank, full(state.params))


# ---------------------------------------------------------------- activation checkpointing
def remat(out, rank, world):
    """checkpoint_activations (written before fsdp()) recomputes the units' activations under
    FSDP: the same bits as without it."""
    res = {}
    for wrappers in ((), (fe.checkpoint_activations(nn.Linear),)):
        step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), *wrappers, fe.fsdp())
        state = step.init(sharded(deep_mlp()), seed=0)
        for b in shards(3, rank, world):
            state, _ = step(state, b)
        res[bool(wrappers)] = full(state.params)
    save(out, "remat", rank, res)


# ---------------------------------------------------------------- buffers, dropout keys
def batchnorm(out, rank, world):
    """A BatchNorm CNN: buffers shared with the module, synced after each epoch, loaded in place;
    a resume at an epoch boundary equals the straight run (params and buffers)."""
    ds = fe.data.synthetic_classification(32, num_features=64, num_classes=10, seed=0)

    def cnn_loss(model, batch):
        return F.cross_entropy(model(batch[0].view(-1, 1, 8, 8)), batch[1])

    def run(work, **kw):
        model = fe.distributed.shard(small_cnn(), units=(nn.Conv2d, nn.Linear))
        step = fe.train_step(cnn_loss, optim.sgd(0.05, momentum=0.9), fe.fsdp())
        loader = fe.data.Loader(ds, 4, seed=0, rank=rank, world_size=world)
        state = fe.fit(step.init(model, seed=0), step, loader, handlers=[Checkpointer(1)],
                       work_dir=out / work, **kw)  # fmt: skip
        assert all(state.buffers[n] is b for n, b in model.named_buffers())
        return {"params": full(state.params), "buffers": dict(state.buffers)}

    straight = run("bn", max_epochs=2)
    run("bn_resumed", max_epochs=1)
    resumed = run("bn_resumed", max_epochs=2, resume=True)
    save(out, "batchnorm", rank, {"straight": straight, "resumed": resumed})


def dropout(out, rank, world):
    """Dropout keys: shared by all ranks by default, per rank with diff_rank_seed (as data_parallel)."""
    masks = {}
    for diff in (False, True):
        seen: list = []

        def loss_fn(model, batch, seen=seen):
            seen.append(F.dropout(torch.ones(64), 0.5, training=True))
            return ce_loss(model, batch)

        step = fe.train_step(loss_fn, optim.sgd(0.1), fe.fsdp(diff_rank_seed=diff))
        step(step.init(sharded(deep_mlp()), seed=3), shards(1, rank, world)[0])
        masks[diff] = seen[0]
    save(out, "dropout", rank, masks)


# ---------------------------------------------------------------- refusals
def errors(out, rank, world):
    msgs = {}

    def catch(key, fn):
        try:
            fn()
        except (ValueError, TypeError, RuntimeError) as e:
            msgs[key] = f"{type(e).__name__}: {e}"
        else:
            msgs[key] = None

    b = shards(1, rank, world)[0]
    catch(
        "with_data_parallel",
        lambda: fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp(), fe.data_parallel()),
    )
    catch(
        "data_parallel_first",
        lambda: fe.train_step(ce_loss, optim.sgd(0.1), fe.data_parallel(), fe.fsdp()),
    )
    catch(
        "not_innermost",
        lambda: fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp(), fe.amp("bfloat16")),
    )
    catch("twice", lambda: fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp(), fe.fsdp()))

    def no_fsdp():
        step = fe.train_step(ce_loss, optim.sgd(0.1))
        step(step.init(sharded(deep_mlp()), seed=0), b)

    def not_sharded():
        step = fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp())
        step(step.init(deep_mlp(), seed=0), b)

    def no_donate():
        step = fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp(), donate=False)
        step(step.init(sharded(deep_mlp()), seed=0), b)

    def save_sharded():
        step = fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp())
        fe.checkpoint.save(
            out / f"direct{rank}.safetensors", step.init(sharded(deep_mlp()), seed=0)
        )

    def fit_without():
        step = fe.train_step(ce_loss, optim.sgd(0.1))
        fe.fit(step.init(deep_mlp()), step, [b], max_epochs=1, handlers=[])

    for key, fn in (("no_fsdp", no_fsdp), ("not_sharded", not_sharded), ("no_donate", no_donate),
                    ("save_sharded", save_sharded), ("fit_without", fit_without)):  # fmt: skip
        catch(key, fn)

    def uneven_eval():  # rank 1 has one batch more: refused on both ranks before any forward
        step = fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp())
        data = [b] * (1 + rank)
        fe.evaluate(step.init(sharded(deep_mlp()), seed=0), lambda m, bt: {"loss": ce_loss(m, bt)},
                    data, [MeanLoss()])  # fmt: skip

    catch("uneven_eval", uneven_eval)
    catch("units", lambda: fe.distributed.shard(deep_mlp(), units=["nope"]))
    catch("twice_sharded", lambda: fe.distributed.shard(sharded(deep_mlp())))
    save(out, "errors", rank, msgs)


SCENARIOS = {f.__name__: f for f in (optimizers, accumulation, bf16, fp16, ema_eval, fit_resume, multi,
                                     remat, batchnorm, dropout, errors)}  # fmt: skip

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    info = fe.distributed.setup("cpu")
    for name in sys.argv[2:]:
        SCENARIOS[name](out, info.rank, info.world_size)
        dist.barrier()
    time.sleep(0.1)
    dist.destroy_process_group()
