"""FSDP2 (fully_shard) under the functional step: 2 CPU processes (gloo) launched by torchrun, against
torch's own FSDP2 loop (bitwise) and one process on the concatenated batches (tests/fsdp_worker.py
holds the per-rank code), plus the single-process pieces (refusals, the micro-batch position)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import deep_mlp, fit_data, multi_parts, shards
from helpers import ce_loss

import fengine as fe
from fengine import optim
from fengine.wrappers.accumulate import micro_batch_position


HERE = Path(__file__).resolve().parent
SCENARIOS = ("optimizers", "accumulation", "bf16", "fp16", "ema_eval", "fit_resume", "multi", "remat",
             "batchnorm", "dropout", "errors")  # fmt: skip
slow = pytest.mark.slow  # each torchrun launch starts two Python processes (seconds)

# one process on the concatenated batches sums in another order: the same tolerance as data_parallel's
ONE_PROCESS = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "fsdp_worker.py"), str(out), *SCENARIOS]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def load(out, name, rank=0):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def assert_equal(a, b, what):
    assert list(a) == list(b), f"{what}: keys differ"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs by {(a[k] - b[k]).abs().max()}"


def assert_trees_equal(a, b, what):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert sa == sb, f"{what}: structure differs"
    for x, y in zip(la, lb):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, what


def cat(a, b):
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def one_process(tx, wrappers, batches, model=deep_mlp):
    step = fe.train_step(ce_loss, tx, *wrappers)
    state = step.init(model(), seed=0)
    for b in batches:
        state, _ = step(state, b)
    return state.params


def global_batches(n, **kw):
    return [cat(a, b) for a, b in zip(shards(n, 0, 2, **kw), shards(n, 1, 2, **kw))]


def global_groups(n):
    return [fe.MicroBatches(global_batches(2, seed=100 + 10 * t)) for t in range(n)]


@slow
def test_sgd_adamw_clipping_and_fused_equal_torch_fsdp2_bitwise_and_one_process(ran):
    r0, r1 = load(ran, "optimizers", 0), load(ran, "optimizers", 1)
    for name in ("sgd", "adamw", "adamw_fused"):
        assert_equal(r0[name]["fe"], r1[name]["fe"], f"{name}: ranks agree")
        assert_equal(
            r0[name]["fe"], r0[name]["torch"], f"{name}: fengine+fsdp vs FSDP2+torch.optim"
        )
    # the global norm is the full gradient's, as clip_grad_norm_ on DTensors returns it
    assert len(r0["adamw"]["norms"]) == 5
    for a, b in zip(r0["adamw"]["norms"], r0["adamw"]["ref_norms"]):
        assert torch.equal(a, b)
    assert [float(n) for n in r0["adamw"]["norms"]] == [float(n) for n in r1["adamw"]["norms"]]
    glob = global_batches(5)
    sgd = one_process(optim.sgd(0.1, momentum=0.9), [], glob)
    adamw = one_process(
        optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.01)), [], glob
    )
    for got, want in ((r0["sgd"]["fe"], sgd), (r0["adamw"]["fe"], adamw)):
        for n in want:
            torch.testing.assert_close(got[n], want[n].detach(), **ONE_PROCESS)
    # gathered optimizer state is the full moments (the checkpoint's content)
    moments = r0["adamw"]["opt_state"][1].exp_avg
    assert {n: t.shape for n, t in moments.items()} == {n: t.shape for n, t in adamw.items()}


@slow
def test_accumulate_reduces_each_micro_batch_or_once_with_defer_reduce(ran):
    r0 = load(ran, "accumulation")
    assert_equal(
        r0[False]["fe"], r0[False]["torch"], "accumulate(2): FSDP2 accumulating into .grad"
    )
    assert_equal(
        r0[True]["fe"], r0[True]["torch"], "defer_reduce: set_requires_gradient_sync(False)"
    )
    assert_equal(r0["short"]["fe"], r0["short"]["torch"], "a short last group still syncs")
    want = one_process(optim.sgd(0.1, momentum=0.9), [fe.accumulate(2)], global_groups(4))
    for defer in (False, True):
        for n in want:
            torch.testing.assert_close(r0[defer]["fe"][n], want[n].detach(), **ONE_PROCESS)


@slow
def test_bf16_autocast_equals_torch_fsdp2_bitwise(ran):
    r0, r1 = load(ran, "bf16", 0), load(ran, "bf16", 1)
    assert_equal(r0["fe"], r1["fe"], "ranks agree")
    assert_equal(r0["fe"], r0["torch"], "amp('bfloat16') vs FSDP2 under autocast")
    assert_equal(
        r0["fe_acc"], r0["torch_acc"], "amp('bfloat16') + accumulate(2), one autocast region"
    )
    # bf16 matmuls over 8 rows per rank vs 16 in one process round differently (vs fp32: 2e-2)
    want = one_process(optim.adamw(1e-2), [fe.amp("bfloat16")], global_batches(4))
    for n in want:
        torch.testing.assert_close(r0["fe"][n], want[n].detach(), rtol=1e-2, atol=2e-3)


@slow
def test_fp16_overflow_on_one_rank_skips_on_both(ran):
    r0, r1 = load(ran, "fp16", 0), load(ran, "fp16", 1)
    # rank 1 poisoned update 3 in a gradient whose only shard is on rank 0: rank 1's own shards
    # were finite, yet it skipped, since the found-inf flag is all-reduced (as ShardedGradScaler)
    assert r0["local_finite"] == [True, True, False, True, True]
    assert r1["local_finite"] == [True] * 5
    assert r0["skipped"] == r1["skipped"] == [False, False, True, False, False]
    assert r0["scales"] == r1["scales"] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0]
    assert r0["ref_scale"] == 32768.0
    assert_equal(r0["fe"], r1["fe"], "ranks agree")
    assert_equal(r0["fe"], r0["torch"], "amp('float16') + accumulate(2) vs FSDP2 + GradScaler")


@slow
def test_ema_on_shards_and_evaluation_with_ema_weights(ran):
    r0 = load(ran, "ema_eval")
    assert_equal(r0["ema"], r0["ref_ema"], "EMA of the shards == lerp of the full params")
    assert torch.equal(r0["out"], r0["plain_out"])  # evaluated with the EMA weights
    assert_equal(r0["after"], r0["live"], "live weights restored after the EMA pass")


@slow
def test_checkpoints_resume_exactly_and_load_in_one_process(ran, tmp_path):
    r0, r1 = load(ran, "fit_resume", 0), load(ran, "fit_resume", 1)
    for r in (r0, r1):
        assert_trees_equal(r["resumed"], r["straight"], "resumed at update 4 == straight")
        assert_trees_equal(r["noval"], r["straight"], "validating (EMA weights) changes no bit")
        assert_trees_equal(r["loaded"], r["at4"], "load re-shards what was gathered")
        assert r["shared"]  # the loaded state still holds the module's own params
    assert_trees_equal(r0["straight"], r1["straight"], "ranks agree")
    assert sorted(p.name for p in (ran / "straight").iterdir()) == [
        ".fengine.lock", "iter_4.safetensors", "iter_8.safetensors", "last_checkpoint"]  # fmt: skip
    # the same file format as a run without sharding: full tensors, loadable in one process
    path = ran / "resumed" / "iter_4.safetensors"
    assert fe.checkpoint.read_meta(path)["meta"]["run"]["world_size"] == 2
    plain = fe.train_step(
        ce_loss,
        optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2)),
        fe.amp("float16"),
        fe.accumulate(2),
        fe.ema(0.9),
    )
    state = fe.checkpoint.load(path, like=plain.init(deep_mlp(seed=4), seed=0))
    assert_equal(state.params, r0["at4"]["params"], "1 process loads the gathered params")
    assert_trees_equal(state.opt_state, r0["at4"]["opt_state"], "and the optimizer state")
    assert_trees_equal(state.extra, r0["at4"]["extra"], "and the scaler and EMA")
    # validation under fsdp (EMA weights, gathered metrics) == one process evaluating the checkpoint
    final = fe.checkpoint.load(ran / "straight" / "iter_8.safetensors", like=plain.init(deep_mlp()))
    val = fe.data.Loader(fit_data(), 8, seed=0, shuffle=False)
    acc = fe.evaluate(final, fe.default_predict, val, [fe.metrics.Accuracy()])["accuracy"]
    assert len(r0["accuracy"]) == 4 and r0["accuracy"] == r1["accuracy"]
    assert float(acc) == r0["accuracy"][-1]
    # and one process trains on from the 2-process checkpoint
    train = fe.data.Loader(fit_data(), 4, seed=0)
    more = fe.fit(plain.init(deep_mlp()), plain, train, max_steps=10, handlers=[],
                  work_dir=tmp_path / "w", resume=ran / "straight" / "iter_8.safetensors")  # fmt: skip
    assert more.step == 10


@slow
def test_multi_step_parts_under_fsdp(ran):
    got = load(ran, "multi")
    step = fe.multi_step(multi_parts())
    state = step.init(deep_mlp(), seed=0)
    for b in global_batches(3):
        state, _ = step(state, b)
    for n in state.params:
        torch.testing.assert_close(got[n], state.params[n].detach(), **ONE_PROCESS)


@slow
def test_activation_checkpointing_composes_with_fsdp(ran):
    r0 = load(ran, "remat")
    assert_equal(r0[True], r0[False], "checkpoint_activations(nn.Linear) + fsdp() == fsdp() alone")


@slow
def test_batchnorm_buffers_are_shared_synced_and_resumed(ran):
    r0, r1 = load(ran, "batchnorm", 0), load(ran, "batchnorm", 1)
    for r in (r0, r1):
        assert_trees_equal(r["resumed"], r["straight"], "resumed at epoch 1 == straight")
    assert_trees_equal(
        r0["straight"], r1["straight"], "params agree, buffers synced after each epoch"
    )


@slow
def test_dropout_keys_are_shared_by_default_and_per_rank_with_diff_rank_seed(ran):
    r0, r1 = load(ran, "dropout", 0), load(ran, "dropout", 1)
    assert torch.equal(r0[False], r1[False])
    assert not torch.equal(r0[True], r1[True])


@slow
def test_unsupported_combinations_are_refused_with_a_reason(ran):
    for rank in (0, 1):
        msgs = load(ran, "errors", rank)
        assert "fsdp() and data_parallel() in one step" in msgs["with_data_parallel"]
        assert "fsdp() and data_parallel() in one step" in msgs["data_parallel_first"]
        assert (
            "must be the innermost" in msgs["not_innermost"] and "(last)" in msgs["not_innermost"]
        )
        assert "fsdp is given twice" in msgs["twice"]
        assert "add fengine.fsdp() to the step" in msgs["no_fsdp"]
        assert (
            "not sharded" in msgs["not_sharded"]
            and "fengine.distributed.shard" in msgs["not_sharded"]
        )
        assert (
            "not the sharded model's own tensor" in msgs["no_donate"]
            and "donate=False" in msgs["no_donate"]
        )
        assert "sharded across processes (a DTensor)" in msgs["save_sharded"]
        assert "gather_state" in msgs["save_sharded"]
        assert "or fengine.fsdp()" in msgs["fit_without"]
        assert "no submodule(s) ['nope']" in msgs["units"]
        assert "sharded already" in msgs["twice_sharded"]
        assert "different numbers of batches ([1, 2], by rank)" in msgs["uneven_eval"]


# ---------------------------------------------------------------- one process, no torchrun
def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="no process group.*fengine.distributed.setup"):
        fe.distributed.shard(deep_mlp(), units=torch.nn.Linear)


def test_fsdp_refuses_a_model_that_is_not_sharded():
    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp())
    with pytest.raises(ValueError, match="not sharded.*fengine.distributed.shard"):
        step(step.init(deep_mlp()), shards(1, 0, 1)[0])


def test_fsdp_must_be_innermost():
    fe.train_step(
        ce_loss, optim.sgd(0.1), fe.amp("bfloat16"), fe.accumulate(2), fe.ema(0.9), fe.fsdp()
    )
    with pytest.raises(ValueError, match="innermost"):
        fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp(), fe.accumulate(2))
    with pytest.raises(ValueError, match="innermost"):
        fe.train_step(
            ce_loss,
            optim.sgd(0.1),
            fe.fsdp(),
            fe.forward_wrapper(lambda g: lambda *a, **kw: g(*a, **kw)),
        )
    with pytest.raises(ValueError, match="data_parallel"):
        fe.train_step(ce_loss, optim.sgd(0.1), fe.fsdp(), fe.data_parallel())


def test_accumulate_publishes_the_micro_batch_position():
    seen = []

    def record(grad_fn):
        def wrapped(state, batch, **kw):
            seen.append(micro_batch_position())
            return grad_fn(state, batch, **kw)

        return wrapped

    step = fe.train_step(ce_loss, optim.sgd(0.1), fe.accumulate(3), fe.forward_wrapper(record))
    state = step.init(deep_mlp())
    state, _ = step(state, fe.MicroBatches(shards(3, 0, 1)))
    state, _ = step(state, fe.MicroBatches(shards(2, 0, 1)))
    assert seen == [(0, 3), (1, 3), (2, 3), (0, 2), (1, 2)]
    assert micro_batch_position() is None


def test_gather_state_without_sharded_leaves_is_the_state_itself():
    step = fe.train_step(ce_loss, optim.adamw(1e-3), fe.ema(0.9))
    state = step.init(deep_mlp())
    assert fe.sharding.gather_state(state) is state
    assert not fe.sharding.is_sharded(state.model)


@pytest.mark.parametrize(
    ("name", "value"), [("defer_reduce", "false"), ("diff_rank_seed", "no"), ("defer_reduce", [0])]
)
def test_fsdp_flags_must_be_bools(name, value):
    """A string "false" (from a config) would turn the option on."""
    with pytest.raises(TypeError) as e:
        fe.fsdp(**{name: value})
    assert str(e.value) == f"fsdp: {name} must be a bool (True or False), got {value!r}"
    assert repr(fe.fsdp(defer_reduce=True)) == "fsdp(defer_reduce=True, diff_rank_seed=False)"
