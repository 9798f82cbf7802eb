"""Optimizers and gradient transformations vs torch.optim / torch.nn.utils (bitwise)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_dicts_equal, ce_loss, cnn_batches, mlp, mlp_batches, small_cnn
from torch import nn

import fengine as fe
from fengine import optim
from fengine.rng import fold_in


# (fengine factory, torch class, kwargs, {torch state key: fengine state field})
CASES = [
    ("sgd", optim.sgd, torch.optim.SGD, dict(lr=0.05), {}),
    ("sgd_wd", optim.sgd, torch.optim.SGD, dict(lr=0.05, weight_decay=1e-2), {}),
    (
        "momentum",
        optim.sgd,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        {"momentum_buffer": "momentum_buffer"},
    ),
    (
        "nesterov",
        optim.sgd,
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        {"momentum_buffer": "momentum_buffer"},
    ),
    (
        "sgd_maximize",
        optim.sgd,
        torch.optim.SGD,
        dict(lr=0.01, momentum=0.5, maximize=True, weight_decay=1e-3),
        {"momentum_buffer": "momentum_buffer"},
    ),
    (
        "adam",
        optim.adam,
        torch.optim.Adam,
        dict(lr=1e-2, weight_decay=1e-3),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    ),
    (
        "adam_amsgrad",
        optim.adam,
        torch.optim.Adam,
        dict(lr=1e-2, amsgrad=True),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "max_exp_avg_sq"},
    ),
    (
        "adamw",
        optim.adamw,
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=5e-2),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    ),
    (
        "rmsprop",
        optim.rmsprop,
        torch.optim.RMSprop,
        dict(lr=1e-3, weight_decay=1e-3),
        {"square_avg": "square_avg"},
    ),
    (
        "rmsprop_centered_momentum",
        optim.rmsprop,
        torch.optim.RMSprop,
        dict(lr=1e-3, momentum=0.9, centered=True),
        {"square_avg": "square_avg", "grad_avg": "grad_avg", "momentum_buffer": "momentum_buffer"},
    ),
    (
        "adagrad",
        optim.adagrad,
        torch.optim.Adagrad,
        dict(lr=1e-2, lr_decay=1e-3, weight_decay=1e-3, initial_accumulator_value=0.1),
        {"sum": "sum"},
    ),
]

# torch's fused kernels: SGD, Adam, AdamW, Adagrad (all CASES but RMSprop), plus the flags that only they read
FUSED_CASES = [c for c in CASES if c[1] is not optim.rmsprop] + [
    (
        "adam_maximize",
        optim.adam,
        torch.optim.Adam,
        dict(lr=1e-2, weight_decay=1e-3, maximize=True),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    ),
    (
        "adamw_amsgrad",
        optim.adamw,
        torch.optim.AdamW,
        dict(lr=1e-2, weight_decay=5e-2, amsgrad=True),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "max_exp_avg_sq"},
    ),
    (
        "adagrad_maximize",
        optim.adagrad,
        torch.optim.Adagrad,
        dict(lr=1e-2, maximize=True),
        {"sum": "sum"},
    ),
]


# torch names the betas as a tuple
def _torch_kwargs(kw):
    return dict(kw)


def _run_reference(model, torch_cls, kw, batches, seed, clip=None, fused=False, lr_schedule=None):
    """The hand-written loop fengine must reproduce bit for bit (``torch_cls(fused=True)`` with ``fused``)."""
    impl = dict(fused=True) if fused else dict(foreach=True)
    opt = torch_cls(model.parameters(), **impl, **_torch_kwargs(kw))
    for t, batch in enumerate(batches):
        torch.manual_seed(fold_in(seed, t, 0))  # same dropout draws as the functional step
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(t)
        opt.zero_grad(set_to_none=True)
        ce_loss(model, batch).backward()
        if clip is not None:
            clip(model.parameters())
        opt.step()
    return opt


def _run_fengine(model, tx, batches, seed, donate=True):
    step = fe.train_step(ce_loss, tx, donate=donate)
    state = step.init(model, seed=seed)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def _assert_matches_torch(name, factory, torch_cls, kw, state_map, net, fused=False):
    make, batches = (
        (lambda: mlp(dropout=0.2), mlp_batches(100))
        if net == "mlp"
        else (small_cnn, cnn_batches(100))
    )
    ref_model, model = make(), make()
    opt = _run_reference(ref_model, torch_cls, kw, batches, seed=7, fused=fused)
    state, _ = _run_fengine(
        model, factory(**kw, **(dict(fused=True) if fused else {})), batches, seed=7
    )

    assert_dicts_equal(
        state.params, {n: p.detach() for n, p in ref_model.named_parameters()}, "params"
    )
    assert_dicts_equal(state.buffers, dict(ref_model.named_buffers()), "buffers")
    for n, p in ref_model.named_parameters():
        for torch_key, field in state_map.items():
            ours = getattr(state.opt_state, field)[n]
            assert torch.equal(ours, opt.state[p][torch_key]), f"{name}: {field}[{n}] differs"
    assert state.opt_state.num_updates == 100 == state.step


@pytest.mark.parametrize("name,factory,torch_cls,kw,state_map", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("net", ["mlp", "cnn_bn"])
def test_optimizer_matches_torch_bitwise(name, factory, torch_cls, kw, state_map, net):
    _assert_matches_torch(name, factory, torch_cls, kw, state_map, net)


@pytest.mark.parametrize(
    "name,factory,torch_cls,kw,state_map", FUSED_CASES, ids=[c[0] for c in FUSED_CASES]
)
@pytest.mark.parametrize("net", ["mlp", "cnn_bn"])
def test_fused_optimizer_matches_torch_fused_bitwise(name, factory, torch_cls, kw, state_map, net):
    _assert_matches_torch(name, factory, torch_cls, kw, state_map, net, fused=True)


def test_fused_with_scheduled_lr_matches_torch():
    sched = lambda t: 1e-2 / (1 + t)  # noqa: E731
    ref_model, model = mlp(), mlp()
    _run_reference(
        ref_model,
        torch.optim.AdamW,
        dict(lr=1e-2),
        mlp_batches(20),
        seed=0,
        fused=True,
        lr_schedule=sched,
    )
    state, metrics = _run_fengine(model, optim.adamw(lr=sched, fused=True), mlp_batches(20), seed=0)
    assert_dicts_equal(
        state.params, {n: p.detach() for n, p in ref_model.named_parameters()}, "params"
    )
    assert metrics[-1]["lr"] == sched(19)


@pytest.mark.parametrize(
    "factory,torch_cls,kernel",
    [
        (optim.sgd, torch.optim.SGD, "_fused_sgd_"),
        (optim.adam, torch.optim.Adam, "_fused_adam_"),
        (optim.adamw, torch.optim.AdamW, "_fused_adamw_"),
        (optim.adagrad, torch.optim.Adagrad, "_fused_adagrad_"),
    ],
)
def test_fused_calls_the_fused_kernel_once_per_device_and_dtype(
    factory, torch_cls, kernel, monkeypatch
):
    """Mixed float32/float64 params: one kernel call per dtype group (as torch), and bitwise torch fused."""
    g = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(5, 3, generator=g),
        "b": torch.randn(7, generator=g, dtype=torch.float64),
        "c": torch.randn(4, generator=g),
    }
    steps = [
        {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        for _ in range(3)
    ]
    ref = [p.clone().requires_grad_() for p in params.values()]
    opt = torch_cls(ref, lr=0.1, weight_decay=1e-2, fused=True)
    for grads in steps:
        for r, gr in zip(ref, grads.values()):
            r.grad = gr.clone()
        opt.step()

    calls = []
    real = getattr(torch, kernel)
    monkeypatch.setattr(
        torch,
        kernel,
        lambda params, *a, **k: (calls.append(params[0].dtype), real(params, *a, **k)),
    )
    tx = factory(0.1, weight_decay=1e-2, fused=True)
    state = tx.init(params)
    for t, grads in enumerate(steps):
        params, state = optim.step_params(tx, grads, state, params, step=t)
    assert (
        calls == [torch.float32, torch.float64] * 3 or calls == [torch.float64, torch.float32] * 3
    )
    assert_dicts_equal(params, {n: r.detach() for n, r in zip(params, ref)}, "params")


@pytest.mark.parametrize("factory", [optim.sgd, optim.adam, optim.adamw, optim.adagrad])
@pytest.mark.parametrize(
    "param",
    [
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(2, device="meta"),
    ],
    ids=["int64", "complex64", "meta"],
)
def test_fused_rejects_what_torch_fused_rejects(factory, param):
    with pytest.raises(ValueError, match="fused=True needs floating-point params .* param 'w'"):
        factory(0.1, fused=True).init({"w": param})


def test_betas_naming_and_schedule_are_used():
    model = mlp()
    sched = lambda t: 0.1 / (1 + t)  # noqa: E731
    state, metrics = _run_fengine(model, optim.sgd(lr=sched), mlp_batches(3), seed=0)
    assert [m["lr"] for m in metrics] == [0.1, 0.05, 0.1 / 3]


def test_clip_by_global_norm_matches_clip_grad_norm_():
    ref_model, model = mlp(), mlp()
    clip = lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm=0.5, foreach=True)  # noqa: E731
    _run_reference(ref_model, torch.optim.AdamW, dict(lr=1e-2), mlp_batches(50), seed=0, clip=clip)
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(lr=1e-2))
    state, metrics = _run_fengine(model, tx, mlp_batches(50), seed=0)
    assert_dicts_equal(
        state.params, {n: p.detach() for n, p in ref_model.named_parameters()}, "params"
    )
    # the reported norm is the pre-clip norm that clip_grad_norm_ returns
    probe = mlp()
    ce_loss(probe, mlp_batches(1)[0]).backward()
    expected = torch.nn.utils.clip_grad_norm_(probe.parameters(), 0.5, foreach=True)
    first = _run_fengine(mlp(), tx, mlp_batches(1), seed=0)[1][0]
    assert torch.equal(first["grad_norm"], expected)
    assert expected > 0.5  # the test exercises actual clipping


def test_clip_by_value_matches_clip_grad_value_():
    ref_model, model = mlp(), mlp()
    clip = lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.01, foreach=True)  # noqa: E731
    _run_reference(ref_model, torch.optim.SGD, dict(lr=0.1), mlp_batches(20), seed=0, clip=clip)
    state, _ = _run_fengine(
        model, optim.chain(optim.clip_by_value(0.01), optim.sgd(lr=0.1)), mlp_batches(20), seed=0
    )
    assert_dicts_equal(
        state.params, {n: p.detach() for n, p in ref_model.named_parameters()}, "params"
    )


def test_chain_of_plain_transforms_is_sgd():
    """add_decayed_weights + scale(-lr) + apply_updates == torch SGD with weight decay (same ops)."""
    ref_model, model = mlp(), mlp()
    _run_reference(
        ref_model, torch.optim.SGD, dict(lr=0.1, weight_decay=0.01), mlp_batches(10), seed=0
    )
    tx = optim.chain(optim.add_decayed_weights(0.01), optim.scale(-0.1))
    assert tx.apply is None
    state, _ = _run_fengine(model, tx, mlp_batches(10), seed=0)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(state.params[n], p.detach(), rtol=1e-6, atol=1e-7)


def test_from_torch_matches_torch():
    ref_model, model = mlp(), mlp()
    _run_reference(ref_model, torch.optim.NAdam, dict(lr=1e-2), mlp_batches(30), seed=0)
    state, metrics = _run_fengine(
        model, optim.from_torch(torch.optim.NAdam, lr=1e-2, foreach=True), mlp_batches(30), seed=0
    )
    assert_dicts_equal(
        state.params, {n: p.detach() for n, p in ref_model.named_parameters()}, "params"
    )
    assert set(state.opt_state.per_param["0.weight"]) == {
        "step",
        "exp_avg",
        "exp_avg_sq",
        "mu_product",
    }
    assert metrics[-1]["lr"] == 1e-2


def test_from_torch_rejects_bad_input():
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        optim.from_torch(nn.Linear)
    with pytest.raises(ValueError, match="NAdam"):
        optim.from_torch(torch.optim.NAdam, lr=-1.0).init({"w": torch.zeros(2, requires_grad=True)})


def test_partition_runs_each_group_with_its_own_optimizer():
    """Two groups with different lrs == torch.optim.SGD with two param groups."""
    ref_model, model = mlp(), mlp()
    groups = [
        {"params": [p for n, p in ref_model.named_parameters() if n.startswith("0.")], "lr": 0.1},
        {"params": [p for n, p in ref_model.named_parameters() if n.startswith("2.")], "lr": 0.01},
    ]
    opt = torch.optim.SGD(groups, momentum=0.9, foreach=True)
    for batch in mlp_batches(20):
        opt.zero_grad()
        ce_loss(ref_model, batch).backward()
        opt.step()
    tx = optim.partition(
        {"a": optim.sgd(0.1, momentum=0.9), "b": optim.sgd(0.01, momentum=0.9)},
        lambda name, _: "a" if name.startswith("0.") else "b",
    )
    state, metrics = _run_fengine(model, tx, mlp_batches(20), seed=0)
    assert_dicts_equal(
        state.params, {n: p.detach() for n, p in ref_model.named_parameters()}, "params"
    )
    assert metrics[0]["a/lr"] == 0.1 and metrics[0]["b/lr"] == 0.01


def test_partition_reports_unlabelled_param():
    tx = optim.partition({"a": optim.sgd(0.1)}, {"w": "a", "b": "oops"})
    with pytest.raises(KeyError, match="'b' has label 'oops'"):
        tx.init({"w": torch.zeros(2), "b": torch.zeros(2)})


def test_frozen_param_and_unused_param_are_not_updated():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(16, 10)
            self.unused = nn.Linear(3, 3)
            self.frozen = nn.Linear(16, 10)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.used(x) + self.frozen(x)

    torch.manual_seed(0)
    net = Net()
    tx = optim.adamw(1e-2)
    state = fe.train_step(ce_loss, tx).init(net)
    assert "frozen.weight" not in state.opt_state.exp_avg  # tx sees trainable params only
    before = {n: p.clone() for n, p in state.params.items()}
    state, _ = fe.train_step(ce_loss, tx)(state, mlp_batches(1)[0])
    for n in ("unused.weight", "frozen.weight"):
        assert torch.equal(state.params[n], before[n]), n
    assert not torch.equal(state.params["used.weight"], before["used.weight"])


@pytest.mark.parametrize(
    "factory,kw,match",
    [
        (optim.sgd, dict(lr=-1.0), "invalid lr"),
        (optim.adam, dict(b1=1.0), "invalid b1"),
        (optim.adamw, dict(lr="fast"), "lr must be a number or a schedule"),
        (optim.sgd, dict(lr=0.1, nesterov=True), "nesterov=True requires momentum"),
        # NaN: torch.optim refuses it ("Invalid learning rate: nan"); it was accepted and the run
        # failed later with a non-finite loss, blaming the loss
        (optim.adamw, dict(lr=float("nan")), "invalid lr nan"),
        (optim.adamw, dict(lr=1e-3, weight_decay=float("nan")), "invalid weight_decay nan"),
        (optim.adam, dict(lr=1e-3, b1=float("nan")), r"invalid b1 nan; expected a value in \[0"),
        (optim.sgd, dict(lr=lambda t: float("nan")), "invalid lr nan"),
        (
            optim.sgd,
            dict(lr=lambda t: torch.tensor(0.1)),
            r"the lr schedule .* returned Tensor tensor\(0.1000\) at step 0",
        ),  # fmt: skip
    ],
)
def test_bad_hyperparameters_are_named(factory, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory(**kw)


def test_clip_bad_input():
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        optim.clip_by_global_norm(0)
    with pytest.raises(ValueError, match="clip_value must be a positive number"):
        optim.clip_by_value(-1)


def test_chain_rejects_foreign_state():
    tx = optim.chain(optim.clip_by_value(1.0), optim.sgd(0.1))
    with pytest.raises(ValueError, match="was it made by this chain's init"):
        tx.update({"w": torch.zeros(1)}, (), {"w": torch.zeros(1)})
