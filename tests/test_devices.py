"""Devices: where the state lives, batches moved there, errors naming both sides; the CUDA paths
(fp16/bf16 on CUDA, CUDA dropout determinism, checkpoints across devices) run on a GPU machine."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from helpers import assert_dicts_equal, ce_loss, mlp, mlp_batches
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import checkpoint, optim
from fengine.devices import devices_in, to_device


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_to_device_moves_nested_batches_and_keeps_what_is_there():
    x, y = torch.randn(2, 3), torch.arange(2)
    batch = {"inputs": (x, [y, "meta-data"]), "pair": Pair(x, y), "n": 3}
    assert to_device(batch, torch.device("cpu")) is batch  # nothing to move: the same object
    moved = to_device(batch, torch.device("meta"))
    assert moved["inputs"][0].device.type == "meta" and moved["inputs"][1][0].device.type == "meta"
    assert moved["inputs"][1][1] == "meta-data" and moved["n"] == 3
    assert isinstance(moved["pair"], Pair) and moved["pair"].y.device.type == "meta"
    group = to_device(fe.MicroBatches([(x, y), (x, y)]), torch.device("meta"))
    assert isinstance(group, fe.MicroBatches) and group[1][0].device.type == "meta"
    assert devices_in(moved) == {torch.device("meta")}


def test_init_places_the_state_and_a_batch_elsewhere_is_named():
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9), fe.ema(0.9))
    model = mlp()
    state = step.init(model, device="cpu")
    assert all(p.device.type == "cpu" for p in state.params.values())
    assert state.params["0.weight"] is not model[0].weight  # a copy: the module keeps its own
    x, y = mlp_batches(1)[0]
    with pytest.raises(RuntimeError) as info:
        step(state, (x.to("meta"), y.to("meta")))
    assert any(
        "the state is on cpu but the batch has tensors on ['meta']" in n
        for n in info.value.__notes__
    )


# ----------------------------------------------------------------- CUDA (a GPU machine runs these)
def _cuda_batches(n=6):
    return [(x.pin_memory(), y.pin_memory()) for x, y in mlp_batches(n)]


@pytest.mark.gpu
def test_fit_on_cuda_moves_pinned_batches_and_matches_a_cuda_torch_loop():
    step = fe.train_step(ce_loss, optim.sgd(0.1, momentum=0.9))
    final = fe.fit(
        step.init(mlp(), device="cuda"), step, _cuda_batches(), max_epochs=2, handlers=[]
    )
    assert final.params["0.weight"].device.type == "cuda"
    ref = mlp().cuda()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    for _ in range(2):
        for x, y in _cuda_batches():
            opt.zero_grad(set_to_none=True)
            ce_loss(ref, (x.cuda(), y.cuda())).backward()
            opt.step()
    assert_dicts_equal(final.params, {n: p.detach() for n, p in ref.named_parameters()})


@pytest.mark.gpu
def test_fp16_dynamic_scaling_on_cuda_matches_gradscaler():
    step = fe.train_step(
        ce_loss, optim.sgd(0.1, momentum=0.9), amp := fe.amp("float16", growth_interval=2)
    )
    state = step.init(mlp(), device="cuda")
    ref = mlp().cuda()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cuda", growth_interval=2)
    for x, y in mlp_batches(8):
        x, y = x.cuda(), y.cuda()
        state, _ = step(state, (x, y))
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = ce_loss(ref, (x, y))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert float(amp.scaler(state).scale) == scaler.get_scale()
    assert_dicts_equal(state.params, {n: p.detach() for n, p in ref.named_parameters()})


@pytest.mark.gpu
def test_bf16_and_cuda_dropout_are_deterministic_run_to_run():
    def run(seed):
        step = fe.train_step(ce_loss, optim.adamw(1e-2), fe.amp("bfloat16"))
        state = step.init(mlp(dropout=0.5), seed=seed, device="cuda")
        for b in mlp_batches(5):
            state, _ = step(state, to_device(b, torch.device("cuda")))
        return state

    a, b, c = run(0), run(0), run(1)
    assert_dicts_equal(a.params, b.params, "same seed, same bits")
    assert not torch.equal(a.params["3.weight"], c.params["3.weight"])


@pytest.mark.gpu
def test_checkpoints_move_between_cpu_and_cuda_and_resume_exactly(tmp_path):
    step = fe.train_step(ce_loss, optim.adamw(1e-2))
    cpu = fe.fit(
        step.init(mlp()), step, mlp_batches(4), max_steps=3, handlers=[], work_dir=tmp_path / "a"
    )
    path = checkpoint.save(tmp_path / "cpu.safetensors", cpu)
    on_gpu = checkpoint.load(path, like=step.init(mlp(), device="cuda"))
    assert on_gpu.params["0.weight"].device.type == "cuda"
    assert_dicts_equal({n: t.cpu() for n, t in on_gpu.params.items()}, cpu.params)
    back = checkpoint.load(
        checkpoint.save(tmp_path / "gpu.safetensors", on_gpu), like=step.init(mlp())
    )
    assert_dicts_equal(back.params, cpu.params)
    straight = fe.fit(
        step.init(mlp(), device="cuda"), step, mlp_batches(4), max_steps=8, handlers=[]
    )
    half = fe.fit(step.init(mlp(), device="cuda"), step, mlp_batches(4), max_steps=4, handlers=[],
                  work_dir=tmp_path / "r")  # fmt: skip
    checkpoint.save(tmp_path / "r" / "mid.safetensors", half, update_latest=True)
    resumed = fe.fit(step.init(mlp(), device="cuda"), step, mlp_batches(4), max_steps=8, handlers=[],
                     work_dir=tmp_path / "r", resume=True)  # fmt: skip
    assert_dicts_equal(resumed.params, straight.params, "1-GPU resume == straight")


@pytest.mark.gpu
def test_evaluate_on_cuda_gathers_the_right_accuracy():
    model = nn.Sequential(nn.Linear(16, 10))
    step = fe.train_step(lambda m, b: F.cross_entropy(m(b[0]), b[1]), optim.sgd(0.1))
    state = step.init(model, device="cuda")
    out = fe.evaluate(state, fe.default_predict, mlp_batches(3), [fe.metrics.Accuracy()])
    with torch.no_grad():
        ref = sum(int((model(x).argmax(1) == y).sum()) for x, y in mlp_batches(3)) / 24 * 100
    assert out["accuracy"] == pytest.approx(ref)


def test_setup_names_the_device_flag_for_an_unknown_device():
    """Before: torch's long list of device types, naming neither --device nor the value."""
    with pytest.raises(ValueError, match=r"--device must be 'cpu', 'cuda' or 'cuda:N'.*got 'tpu'"):
        fe.distributed.setup("tpu")


class Box:
    """A data sample with its own ``to(device)`` (no ``non_blocking``), as a user might write."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def to(self, device):
        return Box(self.t.to(device))


def test_to_device_moves_leaves_with_a_to_method_as_mmengines_cast_data():
    """Before, MMEngine's BaseDataElement (and any object with `.to`) stayed on the CPU."""
    from mmengine.model import BaseDataPreprocessor
    from mmengine.structures import BaseDataElement

    sample = BaseDataElement(gt_label=torch.tensor([3]), metainfo=dict(img_shape=(4, 4)))
    batch = {"inputs": torch.zeros(2, 3), "data_samples": [sample, Box(torch.ones(2))], "n": "x"}
    moved = to_device(batch, torch.device("meta"))
    out, box = moved["data_samples"]
    assert out.gt_label.device.type == "meta" and out.img_shape == (4, 4)
    assert type(box) is Box and box.t.device.type == "meta" and moved["n"] == "x"
    ref = BaseDataPreprocessor()
    ref._device = torch.device("meta")  # what .to("meta") sets
    assert ref.cast_data(batch)["data_samples"][0].gt_label.device == out.gt_label.device
    assert sample.gt_label.device.type == "cpu"  # the caller's sample is left as it was
    assert to_device({"kind": Box}, torch.device("meta"))["kind"] is Box  # a class: not moved
