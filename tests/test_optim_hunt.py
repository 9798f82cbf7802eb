"""Optimizer edge cases vs torch.optim / torch.nn.utils (bitwise): mixed dtypes, complex params,
late gradients, momentum schedules, partitions, from_torch, checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fengine as fe
from fengine import checkpoint, optim, schedules as S
from fengine.optim.base import step_params


def _interleaved(seed: int) -> dict[str, torch.Tensor]:
    """Tensors whose dtypes alternate, so param order and (device, dtype) order differ."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate([(37,), (37,), (5, 7), (5, 7), (100,), (100,)]):
        dtype = torch.bfloat16 if i % 2 else torch.float32
        out[f"g{i}"] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return out


def _torch_params(init: dict[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(p.clone()) for n, p in init.items()}


# ---------------------------------------------------------------- clip_by_global_norm
@pytest.mark.parametrize("seed", [0, 5, 7])
def test_clip_mixed_dtypes_bitwise_clip_grad_norm(seed):
    """torch stacks the per-tensor norms grouped by (device, dtype), not in param order."""
    grads = _interleaved(seed)
    ps = _torch_params({n: torch.zeros_like(g) for n, g in grads.items()})
    for p, g in zip(ps.values(), grads.values()):
        p.grad = g.clone()
    ref = torch.nn.utils.clip_grad_norm_(ps.values(), 0.5, foreach=True)
    tx = optim.clip_by_global_norm(0.5)
    out, state = tx.update({n: g.clone() for n, g in grads.items()}, tx.init(grads))
    assert state.grad_norm.dtype == ref.dtype
    assert torch.equal(state.grad_norm, ref)
    for n, p in ps.items():
        assert torch.equal(out[n], p.grad), n


def _linear(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)


def _loss(model, batch):
    return model(batch).float().pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_clip_state_checkpoint_round_trip(dtype, tmp_path):
    """The norm's state has the norm's dtype from init on, so a mid-run checkpoint loads."""
    step = fe.train_step(_loss, optim.chain(optim.clip_by_global_norm(0.1), optim.sgd(0.1)))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 4, generator=g).to(dtype) for _ in range(4)]
    state = step.init(_linear(dtype), seed=0)
    for b in batches[:2]:
        state, _ = step(state, b)
    path = checkpoint.save(str(tmp_path / "c.safetensors"), state)
    resumed = checkpoint.load(path, like=step.init(_linear(dtype), seed=0))
    for b in batches[2:]:
        state, _ = step(state, b)
        resumed, _ = step(resumed, b)
    for n in state.params:
        assert torch.equal(state.params[n], resumed.params[n]), n
    assert torch.equal(state.opt_state[0].grad_norm, resumed.opt_state[0].grad_norm)
    assert step.init(_linear(dtype), seed=0).opt_state[0].grad_norm.dtype == dtype


def test_clip_state_keeps_its_dtype_when_a_wider_param_has_no_gradient(tmp_path):
    """A bf16 body with a float32 head the loss does not reach: the step's norm is bf16, the state's
    float32 (promoted over the params); the state keeps its dtype, so a checkpoint loads."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 2).bfloat16(), nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    step = fe.train_step(lambda m, b: m(b).float().pow(2).mean(), tx)
    state, _ = step(step.init(Model(), seed=0), torch.randn(3, 4).bfloat16())
    assert state.opt_state[0].grad_norm.dtype == torch.float32
    path = checkpoint.save(str(tmp_path / "c.safetensors"), state)
    checkpoint.load(path, like=step.init(Model(), seed=0))


# ---------------------------------------------------------------- complex params
@pytest.mark.parametrize("make", [optim.adam, optim.adamw, optim.rmsprop, optim.adagrad])
def test_complex_params_refused_at_init(make):
    """torch.optim updates complex params as real pairs; these optimizers refuse them."""
    tx = make(lr=0.1)
    params = {"real": torch.zeros(3), "w": torch.zeros(4, dtype=torch.complex64)}
    with pytest.raises(ValueError, match=r"param 'w' is torch\.complex64.*not supported"):
        tx.init(params)


# ---------------------------------------------------------------- SGD momentum
def _run_both(tx, opt, tp, fp, grads_per_step, moms=None):
    """Step torch ``opt`` on ``tp`` and ``tx`` on ``fp`` with the same gradients."""
    state = tx.init(fp)
    for t, grads in enumerate(grads_per_step):
        if moms is not None:
            opt.param_groups[0]["momentum"] = moms(t)
        for n, p in tp.items():
            p.grad = grads[n].clone() if n in grads else None
        opt.step()
        fp, state = step_params(tx, {n: g.clone() for n, g in grads.items()}, state, fp, step=t)
    return fp, state


def _assert_sgd_matches(tp, opt, fp, state):
    for n, p in tp.items():
        assert torch.equal(fp[n], p.detach()), n
        buf = opt.state[p].get("momentum_buffer")
        if buf is not None:
            assert torch.equal(state.momentum_buffer[n], buf), n


def test_sgd_momentum_late_param_mixed_dtypes():
    """torch starts a late param's buffer per (device, dtype) group: the other groups keep
    their foreach kernels."""
    torch.manual_seed(0)
    init = {"a": torch.randn(8), "b": torch.randn(64).bfloat16(), "c": torch.randn(9)}
    steps = [
        {"b": torch.randn(64).bfloat16(), "c": torch.randn(9)},  # a unused
        {"a": torch.randn(8), "b": torch.randn(64).bfloat16(), "c": torch.randn(9)},
        {"a": torch.randn(8), "b": torch.randn(64).bfloat16(), "c": torch.randn(9)},
    ]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.2)
    tp = _torch_params(init)
    opt = torch.optim.SGD(tp.values(), foreach=True, **kw)
    fp, state = _run_both(optim.sgd(**kw), opt, tp, dict(init), steps)
    _assert_sgd_matches(tp, opt, fp, state)


def _momentum_from_zero(t):
    return 0.0 if t < 2 else (0.0 if t == 4 else 0.9)  # a warm-up from 0, and 0 again at 4


@pytest.mark.parametrize("fused", [False, True])
def test_sgd_scheduled_momentum_from_zero(fused):
    """torch starts the buffer as a copy of the gradient at the first update with momentum
    != 0 (not at the first update), and leaves it alone while momentum is 0."""
    torch.manual_seed(0)
    init = {"w": torch.randn(5), "v": torch.randn(3, 2)}
    steps = [{n: torch.randn_like(p) for n, p in init.items()} for _ in range(7)]
    del steps[3]["v"]  # and a param without a gradient once
    tp = _torch_params(init)
    opt = torch.optim.SGD(tp.values(), lr=0.1, momentum=0.9, dampening=0.5, fused=fused)
    tx = optim.sgd(0.1, momentum=_momentum_from_zero, dampening=0.5, fused=fused)
    fp, state = _run_both(tx, opt, tp, dict(init), steps, moms=_momentum_from_zero)
    _assert_sgd_matches(tp, opt, fp, state)


# ---------------------------------------------------------------- partition
def test_partition_keeps_fused_apply_of_groups_that_have_one():
    """A group without ``apply`` (a hand-made chain) does not cost the others their kernels."""
    torch.manual_seed(0)
    init = {"body": torch.randn(1000), "head": torch.randn(10)}
    steps = [{n: torch.randn_like(p) for n, p in init.items()} for _ in range(5)]
    body = nn.Parameter(init["body"].clone())
    opt = torch.optim.AdamW([body], lr=1e-2, foreach=True)
    head = init["head"].clone()
    for g in steps:
        body.grad = g["body"].clone()
        opt.step()
        head = head + g["head"] * -0.1
    hand_made = optim.chain(optim.add_decayed_weights(0.0), optim.scale(-0.1))
    tx = optim.partition({"body": optim.adamw(1e-2), "head": hand_made}, lambda n, t: n)
    assert tx.apply is not None
    fp = dict(init)
    state = tx.init(fp)
    for t, g in enumerate(steps):
        fp, state = step_params(tx, {n: v.clone() for n, v in g.items()}, state, fp, step=t)
    assert torch.equal(fp["body"], body.detach())
    assert torch.equal(fp["head"], head)


# ---------------------------------------------------------------- from_torch
def test_from_torch_muon_checks_the_real_params():
    """Hyper-parameters are checked on the params themselves (Muon wants 2-D params)."""
    torch.manual_seed(0)
    init = {"w1": torch.randn(8, 4), "w2": torch.randn(3, 8)}
    steps = [{n: torch.randn_like(p) for n, p in init.items()} for _ in range(3)]
    tp = _torch_params(init)
    opt = torch.optim.Muon(tp.values(), lr=0.02)
    fp, _ = _run_both(optim.from_torch(torch.optim.Muon, lr=0.02), opt, tp, dict(init), steps)
    for n, p in tp.items():
        assert torch.equal(fp[n], p.detach()), n
    with pytest.raises(ValueError, match=r"from_torch\(Muon, \.\.\.\): .*2D"):
        optim.from_torch(torch.optim.Muon, lr=0.02).init({"b": torch.zeros(3)})


# ---------------------------------------------------------------- unschedulable hyper-parameters
def _schedule(t):
    return 0.1


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: optim.adam(eps=_schedule), "eps"),
        (lambda: optim.adamw(eps=_schedule), "eps"),
        (lambda: optim.rmsprop(alpha=_schedule), "alpha"),
        (lambda: optim.rmsprop(eps=_schedule), "eps"),
        (lambda: optim.adagrad(lr_decay=_schedule), "lr_decay"),
        (lambda: optim.adagrad(eps=_schedule), "eps"),
        (lambda: optim.adagrad(initial_accumulator_value=_schedule), "initial_accumulator_value"),
        (lambda: optim.sgd(0.1, momentum=0.9, dampening=_schedule), "dampening"),
    ],
)
def test_unschedulable_hyper_refused_with_its_name(make, name):
    with pytest.raises(TypeError, match=rf": {name} cannot be scheduled; expected a number"):
        make()


def test_sgd_dampening_must_be_a_number():
    with pytest.raises(TypeError, match=r"sgd: dampening must be a number, got '0\.1'"):
        optim.sgd(0.1, momentum=0.9, dampening="0.1")


# ---------------------------------------------------------------- an update without gradients
def _loss_head(m, batch):
    return m["body"](batch["x"]).pow(2).mean()


def _loss_aux(m, batch):
    """Reaches the ``aux`` part's params only on batches that carry its target."""
    out = m["body"](batch["x"]).pow(2).mean()
    return out + m["aux"](batch["x"]).pow(2).mean() if batch["has_aux"] else out


@pytest.mark.parametrize(
    "make_tx, make_opt",
    [
        (
            lambda: optim.sgd(0.1, momentum=0.9, dampening=0.1),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, foreach=True),
        ),
        (
            lambda: optim.adamw(1e-2),
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
        ),
        (
            lambda: optim.from_torch(torch.optim.NAdam, lr=1e-2),
            lambda ps: torch.optim.NAdam(ps, lr=1e-2),
        ),
    ],
    ids=["sgd_momentum", "adamw", "from_torch_nadam"],
)
def test_multi_step_part_without_gradients_is_torch_no_op(make_tx, make_opt):
    """A part whose loss reaches none of its params: torch.optim's ``step()`` changes nothing
    (no step count moves), so later updates (the momentum buffer's start, bias corrections)
    are bitwise those of torch; the first update of ``aux`` is the step-0 one, empty."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 1), "aux": nn.Linear(4, 1)})
    ref = nn.ModuleDict({"body": nn.Linear(4, 1), "aux": nn.Linear(4, 1)})
    ref.load_state_dict(model.state_dict())
    step = fe.multi_step(
        {"body": (_loss_head, optim.sgd(0.1), "body"), "aux": (_loss_aux, make_tx(), "aux")}
    )
    state = step.init(model, seed=0)
    opt_body = torch.optim.SGD(ref["body"].parameters(), lr=0.1, foreach=True)
    opt_aux = make_opt(list(ref["aux"].parameters()))
    g = torch.Generator().manual_seed(1)
    for has_aux in [False, True, False, True, True]:
        batch = {"x": torch.randn(8, 4, generator=g), "has_aux": has_aux}
        state, _ = step(state, batch)
        for loss_fn, opt in [(_loss_head, opt_body), (_loss_aux, opt_aux)]:
            ref.zero_grad(set_to_none=True)
            loss_fn(ref, batch).backward()
            opt.step()
    assert state.opt_state["aux"].num_updates == 3
    for n, p in ref.named_parameters():
        assert torch.equal(state.params[n], p.detach()), n


def test_step_params_without_gradients_reports_the_scheduled_lr():
    """No gradient: params and state as they were, but the lr reported at this step."""
    tx = optim.adam(lambda t: 0.1 / (t + 1))
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    new, new_state = step_params(tx, {}, state, params, step=4)
    assert new is params and torch.equal(params["w"], torch.ones(3))
    assert new_state.num_updates == 0 and new_state.missed == {}
    assert new_state.lr == pytest.approx(0.02)


# ---------------------------------------------------------------- past 2**24 updates
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "make_tx, make_opt, moments",
    [
        (
            lambda: optim.adam(0.1, b2=1 - 1e-8),
            lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.9, 1 - 1e-8), foreach=True),
            ("exp_avg", "exp_avg_sq"),
        ),
        (
            lambda: optim.adamw(0.1, b2=1 - 1e-8, amsgrad=True),
            lambda ps: torch.optim.AdamW(
                ps, lr=0.1, betas=(0.9, 1 - 1e-8), amsgrad=True, foreach=True
            ),
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        ),
        (
            lambda: optim.adagrad(0.1, lr_decay=1e-6),
            lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=1e-6, foreach=True),
            ("sum",),
        ),
    ],
    ids=["adam", "adamw_amsgrad", "adagrad"],
)
def test_foreach_step_count_past_2_24_bitwise(make_tx, make_opt, moments, default_dtype):
    """torch's foreach ``state['step']`` is float32 (float64 under a float64 default dtype):
    it stops at 2**24, so the bias corrections / lr decay stop there too. ``v`` missed two
    updates, so its own count crosses 2**24 one update later."""
    n = 2**24
    old = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        g = torch.Generator().manual_seed(0)
        init = {k: torch.randn(5, generator=g, dtype=torch.float64) for k in ("w", "v")}
        steps = [{k: torch.randn(5, generator=g, dtype=torch.float64) for k in init} for _ in "abc"]
        tp = _torch_params(init)
        opt = make_opt(list(tp.values()))
        for p in tp.values():  # one update of zeros makes torch's state, then both are moved on
            p.grad = torch.zeros_like(p)
        opt.step()
        tx = make_tx()
        fp = {k: v.clone() for k, v in init.items()}
        state = tx.init(fp)
        with torch.no_grad():
            for k, p in tp.items():
                p.copy_(init[k])
                opt.state[p]["step"].fill_(n - (2 if k == "v" else 0))
                for field in moments:
                    opt.state[p][field].fill_(0.5)
                    getattr(state, field)[k].fill_(0.5)
        state = state._replace(num_updates=n, missed={"v": 2})
        for t, grads in enumerate(steps):
            for k, p in tp.items():
                p.grad = grads[k].clone()
            opt.step()
            fp, state = step_params(tx, {k: v.clone() for k, v in grads.items()}, state, fp, step=t)
            for k, p in tp.items():
                assert torch.equal(fp[k], p.detach()), (t, k)
    finally:
        torch.set_default_dtype(old)
    assert opt.state[tp["w"]]["step"].item() == (n if default_dtype == torch.float32 else n + 3)


# ---------------------------------------------------------------- nesterov with a momentum schedule
@pytest.mark.parametrize(
    "momentum, dampening, shown",
    [
        (S.linear(0.9, 0.5, end=10), 0.1, r"momentum=Linear\(base=0\.9.*dampening=0\.1$"),
        (_schedule, 0.5, r"momentum=<function _schedule .*dampening=0\.5$"),
        (S.constant(0.0, 1.0), 0.0, r"momentum=Constant\(base=0\.0.*dampening=0\.0$"),
    ],
    ids=["schedule_dampening", "callable_dampening", "schedule_base_0"],
)
def test_sgd_nesterov_checks_a_momentum_schedule(momentum, dampening, shown):
    """torch's SGD refuses nesterov with dampening != 0 or momentum <= 0 (a fengine schedule's
    base is the momentum MMEngine builds the optimizer with)."""
    with pytest.raises(
        ValueError, match=r"sgd: nesterov=True requires momentum > 0 and dampening = 0"
    ):
        optim.sgd(0.1, momentum=momentum, dampening=dampening, nesterov=True)
    with pytest.raises(ValueError, match=shown):
        optim.sgd(0.1, momentum=momentum, dampening=dampening, nesterov=True)


def test_sgd_nesterov_accepts_a_momentum_schedule_from_zero():
    """MMEngine builds SGD with its initial momentum (0.9) and may schedule 0 at step 0."""
    optim.sgd(0.1, momentum=S.linear(0.9, 0.0, end=10), nesterov=True)


def test_an_update_without_gradients_reports_no_stale_grad_norm():
    """A part with no gradient is not updated: its metrics keep the scheduled lr, not the
    previous update's grad_norm (as an fp16-skipped update's)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 1), "aux": nn.Linear(4, 1)})
    aux_tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lambda t: 0.1 / (t + 1)))
    step = fe.multi_step(
        {"body": (_loss_head, optim.sgd(0.1), "body"), "aux": (_loss_aux, aux_tx, "aux")}
    )
    state = step.init(model, seed=0)
    state, with_aux = step(state, {"x": torch.ones(2, 4), "has_aux": True})
    state, without = step(state, {"x": torch.ones(2, 4), "has_aux": False})
    assert "aux/grad_norm" in with_aux
    assert "aux/grad_norm" not in without
    assert float(without["aux/lr"]) == pytest.approx(0.05)
