"""NCCL on one GPU: fengine's collectives against torch's DDP and FSDP2, bit for bit.

Two NCCL ranks cannot share one device (NCCL refuses a duplicate GPU), so on a one-GPU machine
this runs a world-size-1 process group: every collective (the bucketed all-reduce of
``data_parallel``, FSDP2's all-gather and reduce-scatter, the gathered checkpoint) runs through
NCCL on CUDA tensors; the two-rank arithmetic is covered by tests/test_distributed.py and
tests/test_fsdp.py (gloo). Prints one line per check and exits 1 if one differs. Run by
tests/test_one_process_group.py (gloo here, nccl where there is a GPU).

    python tests/nccl_check.py                              # cuda, nccl (a GPU machine)
    python tests/nccl_check.py --device cpu --backend gloo  # the same script on CPU
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ce_loss, mlp, mlp_batches  # noqa: E402

import fengine as fe  # noqa: E402
from fengine import optim  # noqa: E402
from fengine.handlers import Checkpointer  # noqa: E402


def deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)
    )


def same(name: str, a: dict, b: dict) -> bool:
    ok = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{'OK  ' if ok else 'DIFF'} {name}", flush=True)
    return ok


def full(params) -> dict:
    return {
        n: (p.full_tensor() if fe.sharding.is_dtensor(p) else p).detach().cpu() for n, p in params
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="nccl")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)  # DDP's device_ids and set_device need the index
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free port
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(args.backend, rank=0, world_size=1)
    data = [(x.to(dev), y.to(dev)) for x, y in mlp_batches(6)]
    results = []

    # data_parallel vs DDP: SGD + momentum
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.data_parallel())
    state = step.init(mlp(), seed=0, device=dev)
    for b in data:
        state, _ = step(state, b)
    ref = DDP(mlp().to(dev), device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    results.append(
        same(
            "data_parallel sgd == DDP",
            full(state.params.items()),
            full(ref.module.named_parameters()),
        )
    )

    # fp16 dynamic loss scaling + accumulate(2) vs DDP + GradScaler + no_sync (bf16 on CPU)
    half = torch.float16 if dev.type == "cuda" else torch.bfloat16
    groups = [data[2 * i : 2 * i + 2] for i in range(3)]
    amp_step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.data_parallel(),
                             fe.amp(str(half).split(".")[1]), fe.accumulate(2))  # fmt: skip
    amp_state = amp_step.init(mlp(), seed=0, device=dev)
    for g in groups:
        amp_state, _ = amp_step(amp_state, fe.MicroBatches(g))
    amp_ref = DDP(mlp().to(dev), device_ids=[dev.index] if dev.type == "cuda" else None)
    amp_opt = torch.optim.SGD(amp_ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=half == torch.float16)
    for g in groups:
        amp_opt.zero_grad(set_to_none=True)
        with amp_ref.no_sync():
            with torch.autocast(dev.type, dtype=half):
                loss = ce_loss(amp_ref, g[0])
            scaler.scale(loss * 0.5).backward()
        with torch.autocast(dev.type, dtype=half):
            loss = ce_loss(amp_ref, g[1])
        scaler.scale(loss * 0.5).backward()
        scaler.step(amp_opt)
        scaler.update()
    results.append(same(f"data_parallel {half} accumulate(2) == DDP + GradScaler + no_sync",
                        full(amp_state.params.items()), full(amp_ref.module.named_parameters())))  # fmt: skip

    # fsdp (FSDP2 fully_shard) with clipping + AdamW vs FSDP2 + torch.optim + clip_grad_norm_
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.01))
    fstep = fe.train_step(ce_loss, tx, fe.fsdp())
    fstate = fstep.init(fe.distributed.shard(deep_mlp().to(dev), units=nn.Linear), seed=0)
    for b in data:
        fstate, _ = fstep(fstate, b)
    fref = deep_mlp().to(dev)
    for m in fref.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(fref)
    fopt = torch.optim.AdamW(fref.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)
    for x, y in data:
        fopt.zero_grad(set_to_none=True)
        F.cross_entropy(fref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(fref.parameters(), 0.5, foreach=True)
        fopt.step()
    results.append(
        same(
            "fsdp adamw + clip == FSDP2 + torch.optim",
            full(fstate.params.items()),
            full(fref.named_parameters()),
        )
    )

    # fit of the sharded model saves a gathered checkpoint; one unsharded process loads it
    with tempfile.TemporaryDirectory() as work:
        gstep = fe.train_step(ce_loss, optim.adamw(1e-2), fe.fsdp())
        done = fe.fit(gstep.init(fe.distributed.shard(deep_mlp().to(dev), units=nn.Linear), seed=0),
                      gstep, data, max_steps=6, handlers=[Checkpointer(3, by_epoch=False)], work_dir=work)  # fmt: skip
        plain = fe.train_step(ce_loss, optim.adamw(1e-2))
        loaded = fe.checkpoint.load(
            Path(work) / "iter_6.safetensors", plain.init(deep_mlp(), seed=0)
        )
        results.append(same("fsdp fit's gathered checkpoint == its params", full(done.params.items()),
                            full(loaded.params.items())))  # fmt: skip
    dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
