"""Beyond one process: 2 CPU processes (gloo) launched by torchrun, against DistributedDataParallel and
against one process on the same work (tests/dist_worker.py holds the per-rank code)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import position_data, position_run
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches

import fengine as fe
from fengine import optim


pytestmark = pytest.mark.slow  # each torchrun launch starts two Python processes (seconds)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def torchrun(out: Path, *scenarios: str, script: Path | None = None, args: tuple[str, ...] = ()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script or HERE / "dist_worker.py"), *((str(out), *scenarios) if script is None else args)]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out)
    return done


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    done = torchrun(out, "fengine_dp", "fit_run", "dropout", "refuse", "preempt", "two_to_one",
                    "uneven", "replicas", "nan_one_rank", "mismatch", "disagree")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def load(out, name, rank):
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def test_data_parallel_equals_ddp_bitwise_and_one_process_on_the_whole_batch(ran):
    r0, r1 = load(ran, "dp", 0), load(ran, "dp", 1)
    assert_dicts_equal(r0["fe"], r1["fe"], "ranks agree")
    assert_dicts_equal(r0["fe"], r0["ddp"], "fengine data_parallel vs DDP")
    assert_dicts_equal(
        r0["fe_amp"], r0["ddp_amp"], "fp16 + accumulate(2) vs DDP + GradScaler + no_sync"
    )
    assert r0["scale"] == r0["ddp_scale"]
    # one process on the concatenated batches: the same mean gradient, summed in another order
    from dist_worker import shards

    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9))
    state = step.init(mlp(), seed=0)
    for a, b in zip(shards(6, 0, 2), shards(6, 1, 2)):
        state, _ = step(state, (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])))
    for n in state.params:
        torch.testing.assert_close(r0["fe"][n], state.params[n], rtol=1e-5, atol=1e-6)


def test_unequal_sample_counts_give_the_global_mean(ran):
    """Rank 0 holds 4 samples, rank 1 holds 10: weighted by count, the update is the mean over all 14."""
    xs, ys = zip(*(mlp_batches(1, batch=4 + 6 * r, seed=50 + r)[0] for r in range(2)))
    step = fe.train_step(ce_loss, optim.sgd(0.5))
    ref, _ = step(step.init(mlp(), seed=0), (torch.cat(xs), torch.cat(ys)))
    got = load(ran, "dp", 0)["weighted"]
    for n in ref.params:
        torch.testing.assert_close(got[n], ref.params[n], rtol=1e-5, atol=1e-6)


def test_fit_writes_from_rank_0_syncs_buffers_gathers_metrics_and_resumes_exactly(ran):
    r0, r1 = load(ran, "fit", 0), load(ran, "fit", 1)
    assert_dicts_equal(r0["params"], r1["params"], "params agree")
    assert_dicts_equal(r0["buffers"], r1["buffers"], "BatchNorm statistics synced after each epoch")
    assert_dicts_equal(r0["resumed"], r0["params"], "resumed at the same world size == straight")
    (b0,), (b1,) = r0["buffers_at_val"], r1["buffers_at_val"]  # iteration-based, update 4
    assert_dicts_equal(b0, b1, "BatchNorm statistics synced before a validation mid-epoch")
    assert r0["position"] == (18, 3, 0)  # 48 samples / 2 ranks / batch 4 = 6 updates per epoch
    assert r0["val"] == r1["val"] and len(r0["val"]) == 3
    assert (
        r0["evaluate"] == r1["evaluate"] == r0["val"][-1]
    )  # gathered over all 48 samples, no padding
    files = sorted(p.name for p in (ran / "fit").iterdir())
    assert files == [
        ".fengine.lock",
        "epoch_2.safetensors",
        "epoch_3.safetensors",
        "last_checkpoint",
    ]
    assert (
        fe.checkpoint.read_meta(ran / "fit" / "epoch_3.safetensors")["meta"]["run"]["world_size"]
        == 2
    )


def test_dropout_is_shared_by_default_and_per_rank_with_diff_rank_seed(ran):
    r0, r1 = load(ran, "dropout", 0), load(ran, "dropout", 1)
    for acc in (False, True):  # with accumulate too (it dropped the rank's offset)
        assert torch.equal(r0[(acc, False)], r1[(acc, False)])
        assert not torch.equal(r0[(acc, True)], r1[(acc, True)])


def test_replicas_start_from_rank_0s_weights_as_ddp(ran):
    r0, r1 = load(ran, "replicas", 0), load(ran, "replicas", 1)
    # initialised per rank: trained as if both began from rank 0's init, and equal
    assert_dicts_equal(r0["per_rank"], r1["per_rank"], "replicas")
    assert_dicts_equal(r0["per_rank"], r0["rank_0"], "from rank 0's init")
    assert_dicts_equal(r1["per_rank"], r1["rank_0"], "from rank 0's init")


def test_a_nan_on_one_rank_raises_on_every_rank_and_saves_nothing(ran):
    r0, r1 = load(ran, "nan_one_rank", 0), load(ran, "nan_one_rank", 1)
    error0, files0, _ = r0[False]
    error1, _, _ = r1[False]
    assert error1.startswith("non-finite loss at step 3: loss=nan")
    assert error0.startswith("non-finite loss on another rank")
    assert "iter_3.safetensors" not in files0  # the NaN weights are never saved
    for (error, _, finite), other in (
        (r0[True], "on another rank at step 3"),
        (r1[True], "at step 3"),
    ):
        assert other in error and finite  # check_finite: both stop before the update


def test_ranks_that_would_not_run_one_training_are_refused_naming_the_difference(ran):
    for rank in (0, 1):
        steps, unsharded, partial, seeds, same, val, unshuffled, own = load(ran, "mismatch", rank)
        assert unshuffled is None and own is None  # no false refusal
        assert steps.startswith("fit: the ranks differ in plan: rank ") and "every rank" in steps
        assert "train_data's sampler shards the data 1 way(s)" in unsharded
        assert partial is None  # its repr's address differs between the ranks, the wrapper not
        # each rank its own seed: shards of two different permutations overlap (a sample read
        # twice, another never); the same shard on both ranks: half the data, twice
        other = 1 - rank
        assert seeds.startswith(
            f"fit: the ranks differ in data order (seed, shuffle, padding): rank {rank} has "
            f"({rank}, True, True), rank {other} has ({other}, True, True)"
        )
        assert "diff_rank_seed=True) is for dropout" in seeds
        assert same.startswith("fit: the ranks read shards [0, 0] of train_data")
        assert "2 processes but the val data's sampler shards the data 1 way(s)" in val


def test_ranks_configured_apart_are_refused_naming_the_field_and_each_value(ran):
    """Before: another lr, weight decay or state seed was accepted (replicas apart; a resume
    not the straight run), another Val or Checkpointer interval a gloo abort."""
    for rank in (0, 1):
        found, other = load(ran, "disagree", rank), 1 - rank
        assert found["same"] is None and found["first"] is None  # no false refusal
        assert found["rank0_only"] is None  # the cadence of saving / stopping handlers only
        assert found["lr"].startswith(
            "ValueError: fit: the ranks differ in optimizer hyper-parameters: "
        )
        assert f"rank {rank} has {{'sgd.lr': '{0.1 * (1 + rank)}'" in found["lr"]
        assert f"rank {other} has {{'sgd.lr': '{0.1 * (1 + other)}'" in found["lr"]
        assert f"'sgd.weight_decay': '{0.5 * rank}'" in found["weight_decay"]
        assert f"'sgd.weight_decay': '{0.5 * other}'" in found["weight_decay"]
        assert found["seed"].startswith(
            f"ValueError: fit: the ranks differ in seed (step.init(model, seed=)): rank {rank} "
            f"has {100 + rank}, rank {other} has {100 + other}; "
        )
        assert "diff_rank_seed=True" in found["seed"]
        assert (
            "the ranks differ in validation (interval, begin, dynamic_intervals, params, "
            f"autocast): rank {rank} has ({2 + rank}, 1, [], 'auto', None), rank {other} has "
            f"({2 + other}, 1, [], 'auto', None)"
        ) in found["val"]
        assert (
            f"the ranks differ in handlers (cadence): rank {rank} has ['Checkpointer(interval="
            f"{2 + rank}, by_epoch=False, "
        ) in found["checkpointer"]
        assert f"rank {other} has ['Checkpointer(interval={2 + other}, " in found["checkpointer"]


def test_ranks_that_resume_from_different_checkpoints_are_refused_naming_each(ran):
    """Each rank its own work dir (per-node local disks): rank 0 resumed at step 2, rank 1 found
    nothing and started at 0; before, they trained on until gloo aborted (SIGABRT)."""
    r0, r1 = load(ran, "disagree", 0), load(ran, "disagree", 1)
    assert r0["resume"] == r1["resume"]  # one error, the same on every rank
    message = r0["resume"]
    assert message.startswith(
        "ValueError: fit: the ranks resumed from different checkpoints or positions: rank 0: "
        f"{ran / 'disagree_r0' / 'iter_2.safetensors'} at step 2 (epoch 0, batch 2, header digest "
    )
    assert (
        f"; rank 1: no checkpoint found (in {ran / 'disagree_r1'}) at step 0 (epoch 0, batch 0); "
        in message
    )
    assert "put work_dir on storage every rank reads" in message
    assert r1["resume_on_one"].startswith(
        "ValueError: fit: the ranks differ in resume: rank 1 has False, rank 0 has True; "
    )
    # a file rank 1 cannot read: its own error there, and rank 0 told of it (not left waiting)
    assert "disagree_r1/iter_2.safetensors" in r1["missing"]
    assert r0["missing"].startswith("RuntimeError: fit: rank 1 could not resume (")
    assert "disagree_r1/iter_2.safetensors" in r0["missing"]
    # copies of one file at other paths: the same content, accepted
    assert r0["copies"] is None and r1["copies"] is None


def test_a_step_without_data_parallel_is_refused(ran):
    for rank in (0, 1):
        msg = (ran / f"refuse_rank{rank}.txt").read_text()
        assert (
            "2 processes but the step does not average gradients" in msg
            and "data_parallel()" in msg
        )


def test_preemption_seen_by_one_rank_stops_both_at_the_same_step(ran):
    got = [(ran / f"preempt_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert got[0] == got[1] == ["10", "143"]  # agreed at the next 10-update boundary
    assert (ran / "pre" / "step_10.safetensors").is_file()


def test_two_processes_resume_in_one_at_the_same_sample(ran):
    first = load(ran, "two_to_one", 0) + load(ran, "two_to_one", 1)
    assert len(first) == 8
    seen = position_run(ran / "two", 0, 1, max_epochs=1, resume=True)
    everything = [float(x[0]) for x, _ in position_data()]
    assert sorted(first + seen) == sorted(everything)  # each of the 48 samples once in the epoch


def test_one_process_resumes_in_two_at_the_same_sample(tmp_path):
    first = position_run(tmp_path / "one", 0, 1, max_steps=2)
    done = torchrun(tmp_path, "one_to_two")
    assert done.returncode == 0, done.stderr[-3000:]
    rest = load(tmp_path, "one_to_two", 0) + load(tmp_path, "one_to_two", 1)
    everything = [float(x[0]) for x, _ in position_data()]
    assert sorted(first + rest) == sorted(everything)


def test_ranks_with_different_batch_counts_are_refused_up_front(ran):
    for rank in (0, 1):
        message = load(ran, "uneven", rank)
        assert message is not None and "different numbers of batches per epoch ([3, 2]" in message


def test_one_process_at_an_epoch_end_resumes_in_two_at_the_next_epoch(tmp_path):
    """The saving run's 13 batches per epoch are not divisible by 2: before, refused as a
    mid-epoch position although the epoch was complete."""
    position_run(tmp_path / "one_end", 0, 1, n=52, max_epochs=1)
    done = torchrun(tmp_path, "one_to_two_at_epoch_end")
    assert done.returncode == 0, done.stderr[-3000:]
    rest = load(tmp_path, "one_to_two_at_epoch_end", 0) + load(
        tmp_path, "one_to_two_at_epoch_end", 1
    )
    everything = sorted(float(x[0]) for x, _ in position_data(52))
    assert sorted(rest) == everything  # epoch 2: each of the 52 samples once


def test_launched_by_torchrun_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    step = fe.train_step(ce_loss, optim.sgd(0.1))
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 .* no process group .* its own copy"):
        fe.fit(step.init(mlp()), step, mlp_batches(2), max_epochs=1, handlers=[])


RECIPE_ARGS = ("--no-tensorboard", "--model.width", "8", "--model.blocks", "1", "--device", "cpu")


def replay_under_torchrun(work_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fengine", "replay", str(work_dir)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_recipe_under_torchrun(tmp_path):
    """README's command: one work dir written by rank 0, one log with world_size and devices; the
    run resumed at a validation (iteration-based: the ranks average their BatchNorm statistics
    before it) replays bit for bit under torchrun, reported once."""
    w = tmp_path / "w"
    args = ("--work-dir", str(w), *RECIPE_ARGS)
    done = torchrun(
        tmp_path, script=ROOT / "recipes" / "classify.py", args=(*args, "--max-steps", "6")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logs = list(w.glob("*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "world_size: 2" in text and "rank 0: cpu, rank 1: cpu" in text
    resumed = torchrun(tmp_path, script=ROOT / "recipes" / "classify.py",
                       args=(*args, "--max-steps", "12", "--resume"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("final validation accuracy") == 1
    assert (w / "iter_12.safetensors").is_file()
    replayed = replay_under_torchrun(w)
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    assert replayed.stdout.count("REPLAY OK") == 1, replayed.stdout  # rank 0 reports
    assert "resumed from iter_6.safetensors" in replayed.stdout
    # step 6 has two recorded states (before and after the averaging for its validation)
    table = replayed.stdout.split(" ok\n", 1)[1].split("checkpoint ", 1)[0]
    assert sum(line.split()[0] == "6" for line in table.splitlines()) == 2, table
    assert " NO" not in table
    # in one process it is refused, naming the launch that replays it
    plain = subprocess.run([sys.executable, "-m", "fengine", "replay", str(w)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert plain.returncode == 2, plain.stdout[-2000:] + plain.stderr[-2000:]
    assert f"torchrun --nproc_per_node=2 -m fengine replay {w}" in plain.stderr


def test_epoch_based_recipe_replays_under_torchrun(tmp_path):
    """Epoch ends average the ranks' BatchNorm statistics (MMEngine's SyncBuffersHook): replay
    does too, so the epoch checkpoints replay bit for bit."""
    w = tmp_path / "w"
    args = ("--work-dir", str(w), "--max-epochs", "2", "--data.batch-size", "256", *RECIPE_ARGS)
    done = torchrun(tmp_path, script=ROOT / "recipes" / "classify.py", args=args)
    assert done.returncode == 0, done.stderr[-3000:]
    replayed = replay_under_torchrun(w)
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-3000:]
    assert "epoch_2.safetensors: every tensor bitwise equal" in replayed.stdout
    assert replayed.stdout.count("REPLAY OK") == 1


# --- setup's timeout_s and data_parallel's flag are checked before anything runs ---


@pytest.mark.parametrize(
    ("value", "error", "said"),
    [
        ("30", TypeError, "setup: timeout_s must be a number of seconds (an int or float), got str '30'"),
        (True, TypeError, "setup: timeout_s must be a number of seconds (an int or float), got bool True"),
        (0, ValueError, "setup: timeout_s must be a finite number of seconds > 0, got 0"),
        (-5.0, ValueError, "setup: timeout_s must be a finite number of seconds > 0, got -5.0"),
        (float("nan"), ValueError, "setup: timeout_s must be a finite number of seconds > 0, got nan"),
        (10**20, ValueError,
         "setup: timeout_s=100000000000000000000 is too large: at most 86400000000000 seconds"),
    ],
)  # fmt: skip
def test_setup_refuses_a_bad_timeout_in_one_process(value, error, said):
    """Not accepted silently where no process group is made (it would fail the same script under
    torchrun)."""
    with pytest.raises(error) as e:
        fe.distributed.setup("cpu", timeout_s=value)
    assert str(e.value) == said
    assert fe.distributed.setup("cpu", timeout_s=2.5).world_size == 1


def test_a_bad_timeout_under_torchrun_is_named_not_blamed_on_the_rendezvous(monkeypatch):
    """torchrun's environment (nothing listens at the port): the value is named before any rendezvous."""
    env = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(TypeError) as e:
        fe.distributed.setup("cpu", timeout_s="30")
    assert str(e.value).startswith("setup: timeout_s must be a number of seconds")
    assert "MASTER_ADDR" not in str(e.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_data_parallel_diff_rank_seed_must_be_a_bool(value):
    """A string "false" (from a config) would turn per-rank dropout on."""
    with pytest.raises(TypeError) as e:
        fe.data_parallel(diff_rank_seed=value)
    assert (
        str(e.value)
        == f"data_parallel: diff_rank_seed must be a bool (True or False), got {value!r}"
    )
    assert fe.data_parallel(diff_rank_seed=True).diff_rank_seed is True
