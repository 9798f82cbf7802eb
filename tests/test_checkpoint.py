"""fengine.checkpoint: round trips, file format, structure errors, corruption, crashes, disk errors, weights-only loading."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch as st
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from safetensors import safe_open
from torch import nn

import fengine
from fengine import checkpoint as ckpt
from fengine.checkpoint import CheckpointError, CheckpointMismatchError


# ----------------------------------------------------------------- helpers
def make_model(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def clip_adamw():
    return fengine.optim.chain(fengine.optim.clip_by_global_norm(1.0), fengine.optim.adamw(1e-3))


def leaves(state) -> dict:
    return {pytree.keystr(k): v for k, v in pytree.tree_flatten_with_path(state)[0]}


def assert_same(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert list(la) == list(lb)
    for name, x in la.items():
        y = lb[name]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), name
            assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, name
            assert torch.equal(x, y), name
            assert x.requires_grad == y.requires_grad, name
        else:
            assert type(x) is type(y) and x == y, (name, x, y)


def train(step, state, data):
    for b in data:
        state, _ = step(state, b)
    return state


CONFIGS = {
    "clip_adamw": dict(tx=clip_adamw, transforms=(), bn=False),
    "amp_bf16_ema": dict(
        tx=clip_adamw,
        transforms=(lambda: fengine.amp("bfloat16"), lambda: fengine.ema(0.99)),
        bn=False,
    ),
    "amp_fp16_scaler_ema": dict(
        tx=clip_adamw,
        transforms=(lambda: fengine.amp("float16"), lambda: fengine.ema(0.9)),
        bn=True,
    ),
    "batchnorm": dict(tx=clip_adamw, transforms=(), bn=True),
    "from_torch_adam": dict(
        tx=lambda: fengine.optim.from_torch(torch.optim.Adam, lr=1e-3), transforms=(), bn=True
    ),
}


def build(name: str):
    cfg = CONFIGS[name]
    model, tx = make_model(cfg["bn"]), cfg["tx"]()
    step = fengine.train_step(loss_fn, tx, *(t() for t in cfg["transforms"]))

    def template():
        return step.init(model, seed=7)

    return step, template


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bitwise_and_training_continues_identically(tmp_path, name):
    step, template = build(name)
    n_before = 1 if name == "from_torch_adam" else 3
    state = train(step, template(), batches(n_before))
    state = state.replace(epoch=2, batch_in_epoch=5)
    path = ckpt.save(tmp_path / "ck.safetensors", state, {"recipe": name, "lr": 1e-3})

    like = template()  # fresh: from_torch's per-param dicts are still empty here
    like_before = like.clone()
    loaded = ckpt.load(path, like)
    assert_same(loaded, state)
    assert loaded.model is like.model
    assert all(p.requires_grad for p in loaded.params.values())
    assert_same(like, like_before)  # the template is untouched
    if name == "from_torch_adam":
        assert set(loaded.opt_state.per_param["0.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
        assert loaded.opt_state.per_param["0.weight"]["step"].device.type == "cpu"

    more = batches(3, seed=2)
    continued_original = train(step, state, more)
    continued_loaded = train(step, loaded, more)
    assert_same(continued_loaded, continued_original)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_into_reads_the_file_into_the_templates_own_tensors(tmp_path, name):
    """``into=True``: the same values as a fresh load, held by the template's own tensor objects
    (no second copy of the state), and the template is consumed; training continues identically."""
    step, template = build(name)
    state = train(step, template(), batches(1 if name == "from_torch_adam" else 3))
    path = ckpt.save(tmp_path / "ck.safetensors", state)
    like = template()
    own = {k: v for k, v in leaves(like).items() if isinstance(v, torch.Tensor) and v.numel()}
    loaded = ckpt.load(path, like, into=True)
    assert_same(loaded, ckpt.load(path, template()))
    got = leaves(loaded)
    assert own and all(got[k] is v for k, v in own.items())
    with pytest.raises(fengine.DonatedStateError, match="into=True"):
        _ = like.params
    more = batches(3, seed=2)
    assert_same(train(step, loaded, more), train(step, state, more))


@pytest.mark.gpu
def test_load_into_a_cuda_state_fills_its_own_device_memory(tmp_path):
    """On CUDA, ``into=True`` copies the values into the template's device tensors: the same
    objects, the same values as a fresh load, and no second copy of the ~50 MB state on the
    device (a fresh load allocates one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.Linear(2048, 3))
    step = fengine.train_step(loss_fn, fengine.optim.adamw(1e-3))
    model = model.cuda()
    state = train(step, step.init(model), [(x.cuda(), y.cuda()) for x, y in batches(2)])
    path = ckpt.save(tmp_path / "ck.safetensors", state)
    del state

    def peak_growth(like, into):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loaded = ckpt.load(path, like, into=into)
        torch.cuda.synchronize()
        return loaded, torch.cuda.max_memory_allocated() - before

    fresh, grew_fresh = peak_growth(step.init(model), into=False)
    like = step.init(model)
    own = {k: v for k, v in leaves(like).items() if isinstance(v, torch.Tensor) and v.is_cuda}
    loaded, grew = peak_growth(like, into=True)
    assert grew_fresh > 40 << 20 and grew < 1 << 20, (grew_fresh, grew)
    assert_same(loaded, fresh)
    got = leaves(loaded)
    assert own and all(got[k] is v for k, v in own.items())


def test_load_into_leaves_tied_and_shared_tensors_to_fresh_copies(tmp_path):
    """Tied leaves and views of one storage are never read into: each gets the file's own value."""
    w, base = torch.randn(4, 5), torch.randn(2, 6)
    state = fengine.TrainState(
        params={"a": w, "b": w.clone() + 1}, buffers={"lo": base[0], "hi": base[1]}
    )
    path = ckpt.save(tmp_path / "s.safetensors", state)
    z, flat = torch.zeros(4, 5), torch.zeros(2, 6)
    like = fengine.TrainState(params={"a": z, "b": z}, buffers={"lo": flat[0], "hi": flat[1]})
    loaded = ckpt.load(path, like, into=True)
    assert torch.equal(loaded.params["a"], w) and torch.equal(loaded.params["b"], w + 1)
    assert torch.equal(loaded.buffers["lo"], base[0]) and torch.equal(loaded.buffers["hi"], base[1])
    assert loaded.params["a"] is not z and loaded.buffers["lo"] is not flat[0]
    assert not z.any() and not flat.any()  # nothing was written into the shared storages


def test_load_into_a_damaged_file_raises_and_consumes_the_template(saved, tmp_path):
    path, template = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80  # the last tensor's data: read (into the template) before the check fails
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    like = template()
    with pytest.raises(CheckpointError, match="CRC-32 mismatch"):
        ckpt.load(bad, like, into=True)
    assert like.is_donated
    fresh = template()
    mismatched = fresh.replace(params={**fresh.params, "0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError):  # found before any read: the template stays
        ckpt.load(path, mismatched, into=True)
    assert not mismatched.is_donated


def test_large_tensors_round_trip_and_train_on(tmp_path):
    """MiB-sized tensors (read in 1 MiB pieces on several threads): bitwise equal,
    writable, shareable, and training continues identically."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 3))
    step = fengine.train_step(loss_fn, fengine.optim.adamw(1e-3))
    state = train(step, step.init(model), batches(2))
    path = ckpt.save(tmp_path / "big.safetensors", state)
    loaded = ckpt.load(path, step.init(model))
    assert_same(loaded, state)
    big = loaded.opt_state.exp_avg["2.weight"]
    assert big.nbytes >= 2 << 20 and big.is_contiguous()
    assert torch.equal(big, state.opt_state.exp_avg["2.weight"])
    more = batches(3, seed=2)
    assert_same(train(step, loaded, more), train(step, state, more))
    copy = big.clone()
    big.share_memory_()  # e.g. handed to worker processes: the data moves with it
    assert big.is_shared() and torch.equal(big, copy)


def test_lazy_torch_optimizer_state_before_the_first_step(tmp_path):
    step, template = build("from_torch_adam")
    fresh = template()
    path = ckpt.save(tmp_path / "ck.safetensors", fresh, fsync=False)
    loaded = ckpt.load(path, template())
    assert_same(loaded, fresh)
    assert loaded.opt_state.per_param["0.weight"] == {}


def test_file_is_plain_safetensors_with_readable_names(tmp_path):
    step, template = build("amp_fp16_scaler_ema")
    state = train(step, template(), batches(2))
    path = ckpt.save(tmp_path / "ck.safetensors", state, {"cfg": {"lr": 0.001, "layers": [1, 2]}})
    tensors = st.load_file(path)
    for name in (
        "params/0.weight",
        "buffers/1.running_mean",
        "buffers/1.num_batches_tracked",
        "opt_state/0/grad_norm",
        "opt_state/1/exp_avg/0.weight",
        "opt_state/1/exp_avg_sq/4.bias",
        "extra/amp/scale",
        "extra/amp/growth_tracker",
        "extra/ema/params/4.weight",
    ):
        assert name in tensors, name
    assert torch.equal(tensors["params/0.weight"], state.params["0.weight"].detach())
    assert torch.equal(tensors["extra/amp/scale"], state.extra["amp"].scale)
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["fengine.format"] == "fengine.checkpoint"
    assert json.loads(md["fengine.position"]) == {
        "step": 2,
        "epoch": 0,
        "batch_in_epoch": 0,
        "seed": 7,
    }

    meta = ckpt.read_meta(path)
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"], meta["seed"]) == (2, 0, 0, 7)
    assert meta["meta"] == {"cfg": {"lr": 0.001, "layers": [1, 2]}}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["scalars"]["opt_state/1/num_updates"] == 2
    assert meta["tensors"]["params/0.weight"] == {"dtype": "F32", "shape": [16, 6]}
    kinds = {e[0]: e[1] for e in meta["structure"]}
    assert kinds["opt_state/1/lr"] == "scalar" and kinds["opt_state/1/max_exp_avg_sq"] == "empty"


def test_tied_and_non_contiguous_tensors_save_and_tied_stay_tied(tmp_path):
    w = torch.randn(4, 5, requires_grad=True)
    base = torch.randn(6, 4)
    state = fengine.TrainState(
        step=3,
        params={"enc.weight": w, "dec.weight": w},
        buffers={"t": base.t(), "strided": base[::2], "scalar": torch.tensor(2.5)},
        opt_state=(),
        extra={"f": 1.5, "name": "x", "none": None, "flag": True},
    )
    path = ckpt.save(tmp_path / "tied.safetensors", state)
    raw = st.load_file(path)
    assert torch.equal(raw["params/enc.weight"], raw["params/dec.weight"])
    assert torch.equal(raw["buffers/t"], base.t()) and torch.equal(
        raw["buffers/strided"], base[::2]
    )
    like = fengine.TrainState(
        step=0,
        params={"enc.weight": (z := torch.zeros(4, 5, requires_grad=True)), "dec.weight": z},
        buffers={"t": torch.zeros(4, 6), "strided": torch.zeros(3, 4), "scalar": torch.tensor(0.0)},
        opt_state=(),
        extra={"f": 0.0, "name": "", "none": None, "flag": False},
    )
    loaded = ckpt.load(path, like)
    assert loaded.params["enc.weight"] is loaded.params["dec.weight"]
    assert loaded.params["enc.weight"].requires_grad
    assert loaded.extra == {"f": 1.5, "name": "x", "none": None, "flag": True}
    assert torch.equal(loaded.buffers["t"], base.t()) and loaded.step == 3


def test_donated_state_is_refused(tmp_path):
    step, template = build("clip_adamw")
    old = template()
    step(old, batches(1)[0])
    with pytest.raises(fengine.DonatedStateError):
        ckpt.save(tmp_path / "x.safetensors", old)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_leaf_and_meta_are_type_errors(tmp_path):
    step, template = build("clip_adamw")
    state = template()
    with pytest.raises(TypeError, match="extra/bad"):
        ckpt.save(tmp_path / "x.safetensors", state.replace(extra={"bad": object()}))
    with pytest.raises(TypeError, match="JSON"):
        ckpt.save(tmp_path / "x.safetensors", state, {"obj": object()})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- structure errors
def test_structure_mismatch_lists_every_problem_by_name(tmp_path):
    step, template = build("clip_adamw")
    state = train(step, template(), batches(1))
    path = ckpt.save(tmp_path / "ck.safetensors", state)

    other = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4)
    )  # 3.weight/3.bias: shape
    other.add_module("5", nn.Linear(2, 2))  # 5.weight, 5.bias: missing in the file
    like = fengine.train_step(loss_fn, clip_adamw()).init(other)
    params = dict(like.params)
    params["0.bias"] = params["0.bias"].double()  # dtype
    like = like.replace(params=params, extra={"ema_like": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load(path, like)
    e, msg = info.value, str(info.value)
    assert str(path) in msg
    for name in (
        "params/5.weight",
        "params/5.bias",
        "opt_state/1/exp_avg/5.weight",
        "extra/ema_like",
    ):
        assert name in msg and any(m.startswith(name) for m in e.missing), name
    assert {s[0] for s in e.shape} >= {
        "params/3.weight",
        "params/3.bias",
        "opt_state/1/exp_avg_sq/3.weight",
    }
    assert ("params/3.weight", [3, 16], [4, 16]) in e.shape
    assert ("params/0.bias", "torch.float32", "torch.float64") in e.dtype
    assert (
        "params/3.weight: [3, 16] vs [4, 16]" in msg
        and "params/0.bias: torch.float32 vs torch.float64" in msg
    )

    # the file has things the template lacks -> unexpected, with a hint for transform state
    step2, template2 = build("amp_bf16_ema")
    state2 = train(step2, template2(), batches(1))
    path2 = ckpt.save(tmp_path / "ema.safetensors", state2)
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load(path2, fengine.train_step(loss_fn, clip_adamw()).init(make_model()))
    assert "extra/ema/params/0.weight" in info.value.unexpected
    assert "step.init(model" in str(info.value)


def test_a_reconfigured_wrapper_is_hinted_only_when_the_model_matches(tmp_path):
    """The file and the template both have EMA state, with other entries (update_buffers changed):
    the hint names the wrapper and the likely cause; a changed model gets no such hint."""
    ema = lambda u: fengine.train_step(loss_fn, clip_adamw(), fengine.ema(0.9, update_buffers=u))  # noqa: E731
    saved = ema(True).init(make_model(bn=True))
    path = ckpt.save(tmp_path / "ck.safetensors", saved)
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load(path, ema(False).init(make_model(bn=True)))  # narrowed: buffers unexpected
    assert info.value.unexpected[0] == "extra/ema/buffers/1.running_mean" and not info.value.missing
    assert "hint: the model matches, but the file's ema state has other entries than the " in str(
        info.value
    )
    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load(path, ema(False).init(make_model(bn=False)))  # the model differs too
    assert "params/1.weight" in info.value.unexpected and "the model matches" not in str(info.value)


def test_scalar_vs_tensor_mismatch(tmp_path):
    state = fengine.TrainState(step=1, params={"w": torch.ones(2)}, buffers={}, extra={"x": 3})
    path = ckpt.save(tmp_path / "s.safetensors", state)
    like = fengine.TrainState(
        step=0, params={"w": torch.ones(2)}, buffers={}, extra={"x": torch.zeros(1)}
    )
    with pytest.raises(CheckpointMismatchError, match="extra/x") as info:
        ckpt.load(path, like)
    assert info.value.kind


# ----------------------------------------------------------------- damaged and foreign files
@pytest.fixture
def saved(tmp_path):
    step, template = build("amp_fp16_scaler_ema")
    state = train(step, template(), batches(2))
    path = ckpt.save(tmp_path / "good.safetensors", state)
    return path, template


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _corrupt_cases(data: bytes):
    rng = random.Random(1234)
    h = _header_len(data)
    yield "truncated-half", data[: len(data) // 2]
    yield "truncated-last-byte", data[:-1]
    yield "truncated-in-header", data[: h // 2]
    yield "truncated-4-bytes", data[:4]
    yield "empty", b""
    yield "trailing-garbage", data + b"\0" * 16
    for i in [0, 1, 3, 7, 8, 9, h - 1] + rng.sample(range(10, h - 1), 25):
        bad = bytearray(data)
        bad[i] ^= 0x01
        yield f"header-bitflip-{i}", bytes(bad)
    for i in [h, len(data) - 1] + rng.sample(range(h, len(data)), 20):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            yield f"data-bitflip-{i}-{mask}", bytes(bad)


def test_every_corruption_is_detected_and_nothing_is_returned(saved, tmp_path):
    path, template = saved
    data = path.read_bytes()
    like = template()
    like_before = like.clone()
    n = 0
    for case, content in _corrupt_cases(data):
        bad = tmp_path / f"{case}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            ckpt.load(bad, like)
        assert str(bad) in str(info.value), (case, str(info.value))
        if case.startswith("data-bitflip"):
            assert "CRC-32 mismatch" in str(info.value) and "in tensors" in str(info.value), case
        if case.startswith("truncated-half") or case == "truncated-last-byte":
            assert "truncated" in str(info.value), case
        n += 1
    assert n > 70
    assert_same(like, like_before)


def test_foreign_files_point_to_load_params(tmp_path, saved):
    path, template = saved
    like = template()
    model = make_model(bn=True)

    plain = tmp_path / "plain.safetensors"
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, plain)
    pth = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict()}, pth)
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    published = ckpt.publish(ckpt.load(path, like), tmp_path / "pub")
    for f, words in [
        (plain, "without fengine metadata"),
        (pth, "zip archive"),
        (legacy, "pickle"),
        (published, "params-only"),
    ]:
        with pytest.raises(CheckpointError) as info:
            ckpt.load(f, like)
        msg = str(info.value)
        assert str(f) in msg and words in msg and "load_params" in msg, msg

    with pytest.raises(CheckpointError, match="is a directory"):
        ckpt.load(tmp_path, like)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.load(tmp_path / "nope.safetensors", like)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.read_meta(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------- latest / pointer
def test_latest_pointer_and_fallback(tmp_path):
    step, template = build("clip_adamw")
    state = template()
    assert ckpt.latest(tmp_path) is None
    assert ckpt.latest(tmp_path / "missing_dir") is None
    paths = []
    for i, b in enumerate(batches(3)):
        state, _ = step(state, b)
        paths.append(ckpt.save(tmp_path / f"iter_{i + 1}.safetensors", state, update_latest=True))
        os.utime(paths[-1], ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # distinct mtimes
    assert (tmp_path / "last_checkpoint").read_text().strip() == "iter_3.safetensors"
    assert ckpt.latest(tmp_path) == paths[2]

    # pointed-to file corrupted -> newest readable one, with a warning
    data = bytearray(paths[2].read_bytes())
    data[-10] ^= 0x55
    paths[2].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="falling back"):
        assert ckpt.latest(tmp_path) == paths[1]
    # pointed-to file gone -> same
    paths[2].unlink()
    with pytest.warns(UserWarning, match="iter_2"):
        got = ckpt.latest(tmp_path)
    assert got == paths[1]
    assert ckpt.load(got, template()).step == 2
    # nothing usable at all -> a clear error, not a silent fresh start
    for p in paths[:2]:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no other readable checkpoint"):
        ckpt.latest(tmp_path)


def test_mark_latest_refuses_incomplete_files(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="x.safetensors"):
        ckpt.mark_latest(tmp_path, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError):
        ckpt.mark_latest(tmp_path, tmp_path / "missing.safetensors")
    assert not (tmp_path / "last_checkpoint").exists()


# ----------------------------------------------------------------- kill -9
_KILL_SHAPES = {"a.weight": (512, 768), "a.bias": (512,), "b.weight": (640, 512)}


def _kill_state(step: int) -> fengine.TrainState:
    """State number ``step``: every tensor is a fixed random tensor + step (about 7 MB in all)."""
    g = torch.Generator().manual_seed(99)
    base = {k: torch.randn(s, generator=g) for k, s in _KILL_SHAPES.items()}
    params = {k: (v + step).requires_grad_(True) for k, v in base.items()}
    moments = fengine.optim.AdamState(
        step,
        {k: v * 0.5 + step for k, v in base.items()},
        {k: v.abs() + step for k, v in base.items()},
        {},
        1e-3,
    )
    return fengine.TrainState(
        step=step, params=params, buffers={}, opt_state=moments, epoch=step // 10
    )


def _writer(work_dir: Path, first: int) -> None:  # runs in the forked child, until killed
    step = first
    while True:
        state = _kill_state(step)
        ckpt.save(
            work_dir / f"iter_{step % 3}.safetensors", state, {"step": step}, update_latest=True
        )
        step += 1


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_during_saves_always_leaves_a_loadable_latest(tmp_path):
    rng = random.Random(20240601)
    like = _kill_state(0)
    expected_cache: dict[int, fengine.TrainState] = {}
    kills, torn, loaded_steps = 30, 0, []
    for cycle in range(kills):
        first = 1000 * (cycle + 1)
        pid = os.fork()
        if pid == 0:  # child: save forever; never return into pytest
            try:
                torch.set_num_threads(
                    1
                )  # as DataLoader workers do: the parent's OpenMP pool is gone after fork
                _writer(tmp_path, first)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        leftovers = list(
            tmp_path.glob(".*.tmp")
        )  # the killed write's temp file, if it was mid-write
        torn += bool(leftovers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = ckpt.latest(tmp_path)
        if (tmp_path / "last_checkpoint").exists():
            assert not caught, caught[0].message  # the pointer itself names a good file
        else:  # killed between the first save and its pointer: that save is found, with a warning
            assert all("last_checkpoint does not exist" in str(w.message) for w in caught)
        for p in leftovers:
            p.unlink()
        if path is None:
            assert not loaded_steps, "the pointer disappeared"
            continue
        assert not path.name.endswith(".tmp")
        state = ckpt.load(path, like)
        s = state.step
        assert loaded_steps == [] or s >= loaded_steps[-1]
        exp = expected_cache.setdefault(s, _kill_state(s))
        assert_same(state, exp)
        loaded_steps.append(s)
    assert len(loaded_steps) >= kills - 3, loaded_steps
    assert torn >= 1, "no kill landed during a write; the test is not exercising anything"


# ----------------------------------------------------------------- disk full / unwritable
def _dir_snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["write", "preallocate"])
def test_disk_full_leaves_previous_checkpoints_and_pointer_untouched(tmp_path, monkeypatch, where):
    step, template = build("clip_adamw")
    state = train(step, template(), batches(1))
    first = ckpt.save(tmp_path / "iter_1.safetensors", state, update_latest=True)
    state = train(step, state, batches(1, seed=3))
    before = _dir_snapshot(tmp_path)

    calls = {"n": 0}

    def no_space(*args, **kwargs):
        calls["n"] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "_pwrite_all" if where == "write" else "_preallocate", no_space)
    for target in (
        "iter_2.safetensors",
        "iter_1.safetensors",
    ):  # a new name, and overwriting the previous one
        with pytest.raises(OSError) as info:
            ckpt.save(tmp_path / target, state, update_latest=True)
        assert info.value.errno == errno.ENOSPC
        assert str(tmp_path / target) in str(info.value) and "untouched" in str(info.value)
    assert calls["n"] >= 2
    assert _dir_snapshot(tmp_path) == before  # no temp file, old file and pointer byte-identical
    monkeypatch.undo()
    assert ckpt.latest(tmp_path) == first
    assert ckpt.load(first, template()).step == 1


def test_unwritable_destination_names_the_path(tmp_path):
    step, template = build("clip_adamw")
    state = template()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("I am a file")
    for target in (blocker / "ck.safetensors", blocker / "sub" / "ck.safetensors"):
        with pytest.raises(OSError) as info:
            ckpt.save(target, state)
        assert str(target) in str(info.value) and "not a directory" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]
    assert blocker.read_text() == "I am a file"


def test_save_creates_parents_and_overwrites_atomically(tmp_path):
    step, template = build("clip_adamw")
    s0 = template()
    p = ckpt.save(tmp_path / "a" / "b" / "ck.safetensors", s0)
    s1 = train(step, s0.clone(), batches(1))
    ckpt.save(p, s1)
    assert ckpt.load(p, template()).step == 1
    assert [x.name for x in p.parent.iterdir()] == ["ck.safetensors"]


# ----------------------------------------------------------------- load_params
class Detector(nn.Module):
    def __init__(self, head_out: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, head_out)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_load_params_prefix_map_into_a_train_state(tmp_path):
    torch.manual_seed(0)
    det = Detector()
    det_state = fengine.train_step(loss_fn, clip_adamw()).init(det)
    path = ckpt.save(tmp_path / "det.safetensors", det_state)

    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16))
    target = fengine.train_step(loss_fn, clip_adamw()).init(backbone)
    new, report = ckpt.load_params(path, target, prefix_map={"backbone.": ""})
    assert report.ok and report.format == "fengine"
    assert set(report.loaded) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert torch.equal(new.params["0.weight"], det.backbone[0].weight.detach())
    assert new.params["0.weight"].requires_grad
    assert new.params["0.weight"] is not det_state.params["backbone.0.weight"]
    assert not torch.equal(target.params["0.weight"], new.params["0.weight"])  # into is unchanged
    assert new.opt_state is target.opt_state and new.model is backbone


def test_load_params_report_and_strict(tmp_path):
    torch.manual_seed(0)
    src = Detector(head_out=3)
    path = tmp_path / "src.safetensors"
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)

    class Wider(Detector):
        def __init__(self):
            super().__init__(head_out=5)  # head: shape mismatch
            self.extra = nn.Linear(2, 2)  # missing in the file

    target = Wider()
    del target.backbone[1]  # backbone.1.*: unexpected in the file
    sd, report = ckpt.load_params(path, target)
    assert report.format == "safetensors"
    assert set(report.missing) == {"extra.weight", "extra.bias"}
    assert set(report.unexpected) == {
        "backbone.1.weight",
        "backbone.1.bias",
        "backbone.1.running_mean",
        "backbone.1.running_var",
        "backbone.1.num_batches_tracked",
    }
    assert ("head.weight", (3, 16), (5, 16)) in report.mismatched
    assert set(report.loaded) == {"backbone.0.weight", "backbone.0.bias"}
    assert torch.equal(sd["backbone.0.weight"], src.backbone[0].weight.detach())
    assert sd["head.weight"].shape == (5, 16) and list(sd) == list(target.state_dict())
    assert not torch.equal(
        target.backbone[0].weight, src.backbone[0].weight
    )  # the module is not modified
    target.load_state_dict(sd)
    assert "extra.weight" in str(report) and "head.weight" in str(report)

    with pytest.raises(CheckpointMismatchError) as info:
        ckpt.load_params(path, target, strict=True)
    msg = str(info.value)
    for name in ("extra.weight", "backbone.1.running_mean", "head.weight"):
        assert name in msg
    _, ok = ckpt.load_params(path, Detector(), strict=True)
    assert ok.ok


def test_load_params_from_torch_pth_with_wrapper_and_module_prefix(tmp_path):
    torch.manual_seed(0)
    src = Detector()
    wrapped = {
        "meta": {"epoch": 3},
        "state_dict": {"module." + k: v for k, v in src.state_dict().items()},
    }
    pth = tmp_path / "epoch_3.pth"
    torch.save(wrapped, pth)
    torch.manual_seed(5)
    target = fengine.train_step(loss_fn, clip_adamw()).init(Detector())
    target = target.replace(
        params={k: v.detach().double().requires_grad_(True) for k, v in target.params.items()}
    )
    new, report = ckpt.load_params(pth, target, strict=True)
    assert report.format == "torch" and not report.missing and not report.unexpected
    for k, v in src.state_dict().items():
        got = new.params.get(k, new.buffers.get(k))
        assert torch.equal(got, v.to(got.dtype)), k
    assert (
        new.params["head.weight"].dtype == torch.float64 and new.params["head.weight"].requires_grad
    )

    legacy = tmp_path / "legacy.pth"
    torch.save(src.state_dict(), legacy, _use_new_zipfile_serialization=False)
    _, report = ckpt.load_params(legacy, Detector(), strict=True)
    assert report.ok

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        ckpt.load_params(garbage, Detector())


def test_load_params_ema_weights_and_corruption(tmp_path):
    step, template = build("amp_bf16_ema")
    state = train(step, template(), batches(3))
    path = ckpt.save(tmp_path / "ck.safetensors", state)
    new, report = ckpt.load_params(path, template(), strict=True)  # the eval weights: EMA's
    for k, v in state.extra["ema"].params.items():
        assert torch.equal(new.params[k], v)
    live, _ = ckpt.load_params(path, template(), strict=True, weights="live")
    for k, v in state.params.items():
        assert torch.equal(live.params[k], v)
    assert not torch.equal(live.params["0.weight"], new.params["0.weight"])
    # the target's EMA starts from the loaded weights (MMEngine's EMAHook loads load_from into
    # its averaged model): it kept the fresh init's, which evaluation and publish then used
    ema = new.extra["ema"]
    assert ema.params.keys() and all(torch.equal(ema.params[k], new.params[k]) for k in ema.params)
    assert all(ema.params[k].data_ptr() != new.params[k].data_ptr() for k in ema.params)
    assert all(
        torch.equal(a, b) for a, b in zip(new.eval_weights()[0].values(), new.params.values())
    )
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32"):
        ckpt.load_params(path, template())


def test_load_params_live_reads_an_mmengine_ema_checkpoints_trained_weights(tmp_path):
    """MMEngine's EMAHook.before_save_checkpoint swaps the EMA weights into ``state_dict`` and the
    trained ones into ``ema_state_dict`` (``module.<name>``): weights="live" read the EMA ones."""
    from types import SimpleNamespace

    hooks = pytest.importorskip("mmengine.hooks")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    w0 = model[0].weight.detach().clone()
    runner = SimpleNamespace(model=model, iter=0, epoch=0, max_epochs=1, max_iters=10)
    hook = hooks.EMAHook(momentum=0.5, update_buffers=True)
    hook.before_run(runner)
    hook.before_train(runner)
    for i in range(3):
        with torch.no_grad():
            for t in (model[0].weight, model[0].bias, model[1].running_mean):
                t.add_(1.0)
        runner.iter = i
        hook.after_train_iter(runner, i)
    live, ema = model.state_dict(), hook.ema_model.module.state_dict()
    saved = {"meta": {}, "state_dict": {k: v.clone() for k, v in live.items()}}
    hook.before_save_checkpoint(runner, saved)  # MMEngine's own swap
    torch.save(saved, tmp_path / "epoch_1.pth")

    def fresh():
        return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))

    got = {w: ckpt.load_params(tmp_path / "epoch_1.pth", fresh(), strict=True, weights=w)[0]
           for w in ("eval", "live")}  # fmt: skip
    for k in live:
        assert torch.equal(got["eval"][k], ema[k]) and torch.equal(got["live"][k], live[k]), k
    assert torch.equal(got["live"]["0.weight"] - w0, torch.full_like(w0, 3.0))
    assert torch.allclose(got["eval"]["0.weight"] - w0, torch.full_like(w0, 2.25))  # 1, 1.5, 2.25
    torch.save({"state_dict": live}, tmp_path / "plain.pth")  # one set of weights: both read it
    for w in ("eval", "live"):
        sd, _ = ckpt.load_params(tmp_path / "plain.pth", fresh(), strict=True, weights=w)
        assert all(torch.equal(sd[k], live[k]) for k in live)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # one tensor, two state-dict names

    def forward(self, x):
        return self.head(self.emb(x))


def test_load_params_strict_loads_a_tied_modules_alias_from_the_one_saved_tensor(tmp_path):
    """A weight-tied module's state dict names the tensor twice, fengine's files once: the alias
    (head.weight) was reported missing, so strict=True always failed and the returned dict held
    the module's old value under it."""
    step = fengine.train_step(loss_fn, fengine.optim.sgd(0.5), ema := fengine.ema(momentum=0.3))
    state = step.init(TiedLM())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        state, _ = step(state, (torch.randint(0, 10, (8,), generator=g),) * 2)
    assert list(state.params) == ["emb.weight"]
    want = ema.params(state)["emb.weight"]
    assert not torch.equal(want, TiedLM().emb.weight)
    published = ckpt.publish(state, tmp_path / "pub")
    saved = ckpt.save(tmp_path / "ck.safetensors", state)
    for path in (published, saved):
        target = TiedLM()
        sd, report = ckpt.load_params(path, target, strict=True)
        assert report.loaded == ("emb.weight", "head.weight") and report.missing == (), path
        assert sd["head.weight"] is sd["emb.weight"] and torch.equal(sd["emb.weight"], want)
        target.load_state_dict(sd)
        assert target.head.weight is target.emb.weight and torch.equal(target.emb.weight, want)
    live, _ = ckpt.load_params(saved, TiedLM(), strict=True, weights="live")
    assert live["head.weight"] is live["emb.weight"]
    assert torch.equal(live["head.weight"], state.params["emb.weight"])


# ----------------------------------------------------------------- publish
def test_publish_names_the_file_by_its_sha256(tmp_path):
    step, template = build("amp_bf16_ema")
    state = train(step, template(), batches(2))
    out = ckpt.publish(state, tmp_path / "epoch_2", weights="live")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert out.name == f"epoch_2-{digest[:8]}.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    sd = st.load_file(out)
    assert set(sd) == set(state.params) | set(state.buffers)
    model = make_model()
    model.load_state_dict(sd)
    assert ckpt.read_meta(out)["kind"] == "params"
    again = ckpt.publish(state, tmp_path / "epoch_2.safetensors", weights="live")
    assert again == out  # deterministic bytes, same name
    ema = ckpt.publish(state, tmp_path / "ema")  # default: the eval weights (EMA's)
    assert torch.equal(st.load_file(ema)["0.weight"], state.extra["ema"].params["0.weight"])
    _, report = ckpt.load_params(out, template(), strict=True)
    assert report.format == "fengine-params"


def test_a_durable_save_hands_every_data_byte_to_the_disk_as_it_goes(tmp_path, monkeypatch):
    """``fsync=True``: after each piece is written, the kernel is asked to start writing it out
    (``sync_file_range``), so the final fsync waits for the tail only; every data byte exactly
    once, on the save's own file. ``fsync=False`` asks nothing. The real call works on Linux."""
    from fengine.checkpoint import _io

    if sys.platform.startswith("linux"):
        assert _io._SYNC_FILE_RANGE is not None
        with open(tmp_path / "f", "wb") as f:
            f.write(b"x" * 4096)
            _io.start_writeback(f.fileno(), 0, 4096)
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(_io, "_SYNC_FILE_RANGE", lambda *a: calls.append(a) or 0)
    torch.manual_seed(0)
    big = {"a": torch.randn(700_000), "b": torch.randn(3, 5), "c": torch.randn(300_000)}
    state = fengine.TrainState(params=big, buffers={})
    path = ckpt.save(tmp_path / "s.safetensors", state, fsync=False)
    assert calls == []
    path = ckpt.save(tmp_path / "s.safetensors", state)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    spans = sorted((offset, length) for _, offset, length, _ in calls)
    assert len({fd for fd, *_ in calls}) == 1 and {flag for *_, flag in calls} == {2}
    assert spans[0][0] == header and sum(n for _, n in spans) == path.stat().st_size - header
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))  # contiguous, no overlap
    assert len(spans) > 3  # in pieces, while writing
    assert_same(
        ckpt.load(
            path,
            fengine.TrainState(params={k: torch.zeros_like(v) for k, v in big.items()}, buffers={}),
        ),
        state,
    )


def test_a_safetensors_file_whose_header_length_looks_like_a_pickle_loads(tmp_path):
    """A header of 640, 896, 1152 or 1408 bytes (mod 65536) starts the file with a pickle's
    bytes (\\x80\\x02..\\x05): about one file in 2048 went to torch.load and failed, or half-loaded
    without its checks. Told apart by the header: its length fits and it opens with '{'."""
    model = nn.Linear(3, 2)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for pad in range(0, 2048, 8):
        path = tmp_path / f"w{pad}.safetensors"
        st.save_file(sd, path, metadata={"pad": "x" * pad})
        if ckpt._format.foreign(path.read_bytes()[:8]):
            break
    else:
        pytest.fail("no padding gave a pickle-like header length")
    loaded, report = ckpt.load_params(path, nn.Linear(3, 2))
    assert report.ok and all(torch.equal(loaded[k], v) for k, v in sd.items())
    bin_path = tmp_path / "weights.bin"  # not the .safetensors suffix torch special-cases
    bin_path.write_bytes(path.read_bytes())
    loaded, report = ckpt.load_params(bin_path, nn.Linear(3, 2))
    assert report.ok
