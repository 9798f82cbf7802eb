"""The train step: donation, loss parsing, randomness, buffers."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import assert_dicts_equal, ce_loss, cnn_batches, mlp, mlp_batches, small_cnn
from torch import nn

import fengine as fe
from fengine import optim


def _state(model=None, tx=None, seed=0):
    model = model or mlp(dropout=0.3)
    return fe.train_step(ce_loss, tx or optim.adamw(1e-2)).init(model, seed=seed)


def test_use_after_donate_raises_naming_the_steps():
    tx = optim.adamw(1e-2)
    step = fe.train_step(ce_loss, tx)
    s0 = _state(tx=tx)
    s1, _ = step(s0, mlp_batches(1)[0])
    with pytest.raises(fe.DonatedStateError, match="state at step 0 was donated to step 1"):
        _ = s0.params
    with pytest.raises(fe.DonatedStateError):
        step(s0, mlp_batches(1)[0])
    s2, _ = step(s1, mlp_batches(1)[0])
    with pytest.raises(fe.DonatedStateError, match="state at step 1 was donated to step 2"):
        pytree.tree_leaves(s1)
    assert s2.step == 2


def test_donate_false_keeps_input_and_gives_same_bits():
    tx = optim.adamw(1e-2)
    batches = mlp_batches(5)
    keep = fe.train_step(ce_loss, tx, donate=False)
    donate = fe.train_step(ce_loss, tx, donate=True)
    a = b = None
    a, b = _state(tx=tx), _state(tx=tx)
    snapshot = a.clone()
    for batch in batches:
        a_next, ma = keep(a, batch)
        assert_dicts_equal(a.params, snapshot.params, "input state was modified")
        a = a_next
        snapshot = a.clone()
        b, mb = donate(b, batch)
        assert torch.equal(ma["loss"], mb["loss"])
    assert_dicts_equal(a.params, b.params, "params")
    assert_dicts_equal(a.opt_state.exp_avg, b.opt_state.exp_avg, "exp_avg")


def test_dropout_is_a_function_of_seed_and_step_and_leaves_global_rng_alone():
    tx = optim.sgd(0.1)
    step = fe.train_step(ce_loss, tx, donate=False)
    s = _state(model=mlp(dropout=0.5), tx=tx, seed=3)
    batch = mlp_batches(1)[0]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = step(s, batch)
    b, _ = step(s, batch)
    assert torch.equal(torch.get_rng_state(), before)
    assert_dicts_equal(a.params, b.params, "same state + batch")
    c, _ = step(s.replace(seed=4), batch)
    assert not torch.equal(
        a.params["3.weight"], c.params["3.weight"]
    )  # other seed, other dropout mask
    d, _ = step(s.replace(step=5), batch)
    assert not torch.equal(a.params["3.weight"], d.params["3.weight"])


def test_batchnorm_buffers_are_carried_in_state():
    tx = optim.sgd(0.1)
    state = fe.train_step(ce_loss, tx).init(small_cnn())
    assert set(state.buffers) == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "4.running_mean",
        "4.running_var",
        "4.num_batches_tracked",
    }
    step = fe.train_step(ce_loss, tx)
    for batch in cnn_batches(3):
        state, _ = step(state, batch)
    assert int(state.buffers["1.num_batches_tracked"]) == 3
    assert not torch.equal(state.buffers["1.running_mean"], torch.zeros(4))


def test_loss_dict_follows_mmengine_parse_losses():
    from mmengine.model import BaseModel

    class Oracle(BaseModel):
        def forward(self, *a, **k):
            raise NotImplementedError

    losses = {
        "loss_cls": torch.tensor([1.0, 2.0]),
        "loss_box": [torch.tensor(0.5), torch.tensor([1.0, 3.0])],
        "acc": torch.tensor(0.75),  # logged, not optimised
    }
    total, log_vars = Oracle().parse_losses(losses)
    loss, metrics = fe.parse_losses(losses)
    assert torch.equal(loss, total)
    assert list(metrics) == list(log_vars)
    for k, v in log_vars.items():
        assert torch.equal(metrics[k], v), k


def test_loss_forms_and_errors():
    x = torch.tensor(2.0, requires_grad=True)
    loss, m = fe.parse_losses((x * 3, {"lr_probe": 1.0}))
    assert loss.item() == 6.0 and m["lr_probe"] == 1.0 and m["loss"].item() == 6.0
    with pytest.raises(ValueError, match="no key containing 'loss'"):
        fe.parse_losses({"acc": x})
    with pytest.raises(TypeError, match="each value must be a tensor"):
        fe.parse_losses({"loss": 1.0})
    with pytest.raises(TypeError, match=r"expected \(loss, aux\)"):
        fe.parse_losses((x, x, x))
    with pytest.raises(TypeError, match="must return a tensor"):
        fe.parse_losses("loss")


def test_metrics_are_tensors_not_host_values():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    step = fe.train_step(lambda m, b: {"loss": ce_loss(m, b), "aux": ce_loss(m, b) * 0}, tx)
    _, metrics = step(_state(tx=tx), mlp_batches(1)[0])
    for k in ("loss", "aux", "grad_norm"):
        assert (
            isinstance(metrics[k], torch.Tensor)
            and metrics[k].ndim == 0
            and not metrics[k].requires_grad
        )


def test_state_is_a_pytree_and_replace_is_functional():
    s = _state()
    leaves, spec = pytree.tree_flatten(s)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert rebuilt.model is s.model and rebuilt.step == s.step
    assert_dicts_equal(rebuilt.params, s.params)
    t = s.replace(epoch=3)
    assert (s.epoch, t.epoch) == (0, 3)
    with pytest.raises(TypeError, match="unknown fields"):
        s.replace(lr=1.0)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 3


def test_create_validates_input():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fe.TrainState.create("net")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        fe.train_step(ce_loss, optim.sgd(0.1)).init(mlp(), seed=-1)
    with pytest.raises(TypeError, match="tx must be a GradientTransformation"):
        fe.train_step(ce_loss, torch.optim.SGD)


def test_loss_fn_can_use_submodules_with_bound_params():
    """model attributes (not only model(...)) see the state's params."""
    net = nn.Sequential(nn.Linear(16, 10))
    tx = optim.sgd(1.0)
    state = fe.train_step(ce_loss, tx).init(net)
    with torch.no_grad():
        state.params["0.weight"].zero_()
        state.params["0.bias"].zero_()
    seen = {}

    def loss_fn(model, batch):
        seen["w"] = model[0].weight.detach().clone()
        return ce_loss(model, batch)

    fe.train_step(loss_fn, tx)(state, mlp_batches(1)[0])
    assert torch.equal(seen["w"], torch.zeros(10, 16))
    assert not torch.equal(
        net[0].weight, torch.zeros(10, 16)
    )  # the module's own tensors are untouched


def test_tied_and_shared_weights_are_bound_everywhere():
    """A weight used by two modules (tied) and a module used twice: same training as torch."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(16, 16, bias=False)
            self.dec = nn.Linear(16, 16, bias=False)
            self.dec.weight = self.enc.weight  # tied
            self.shared = nn.Linear(16, 16)
            self.blocks = nn.ModuleList([self.shared, self.shared])  # one module, two places
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.dec(torch.tanh(self.enc(x)))
            for block in self.blocks:
                x = torch.relu(block(x))
            return self.head(x)

    torch.manual_seed(0)
    ref = Tied()
    torch.manual_seed(0)
    net = Tied()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=True)
    tx = optim.sgd(0.1, momentum=0.9)
    state = fe.train_step(ce_loss, tx).init(net)
    assert "dec.weight" not in state.params  # tied weights are one entry
    step = fe.train_step(ce_loss, tx)
    for batch in mlp_batches(5):
        opt.zero_grad()
        ce_loss(ref, batch).backward()
        opt.step()
        state, _ = step(state, batch)
    assert_dicts_equal(state.params, {n: p.detach() for n, p in ref.named_parameters()}, "params")
    assert net.dec.weight is net.enc.weight and isinstance(
        net.enc.weight, nn.Parameter
    )  # module restored


def test_a_donated_state_cannot_be_replaced_or_cloned():
    tx = optim.sgd(0.1)
    s0 = _state(tx=tx)
    fe.train_step(ce_loss, tx)(s0, mlp_batches(1)[0])
    for use in (lambda: s0.replace(epoch=1), lambda: s0.clone(), lambda: s0.model):
        with pytest.raises(fe.DonatedStateError):
            use()


def test_scalar_grads_are_autograd_grads_and_defer_to_it_off_the_common_case():
    """The step's direct engine call gives torch.autograd.grad's tensors bit for bit, None for
    an unused input, and the same errors (it hands every unusual case to autograd.grad)."""
    from fengine.autograd import scalar_grads

    torch.manual_seed(0)
    w, b, unused = (
        torch.randn(5, 3, requires_grad=True),
        torch.randn(3, requires_grad=True),
        torch.randn(2, requires_grad=True),
    )
    x = torch.randn(7, 5)

    def loss() -> torch.Tensor:
        return torch.tanh(x @ w + b).square().mean()

    ours = scalar_grads(loss(), (w, b, unused))
    ref = torch.autograd.grad(loss(), (w, b, unused), allow_unused=True)
    assert ours[2] is None and ref[2] is None
    assert all(torch.equal(o, r) for o, r in zip(ours[:2], ref[:2]))
    assert w.grad is None and b.grad is None  # nothing accumulated
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        scalar_grads(torch.tanh(x @ w), (w,))  # a vector loss: autograd.grad's own error
    with pytest.raises(RuntimeError, match="does not require grad"):
        scalar_grads(x.sum(), (w,))

    class Tagged(
        torch.Tensor
    ):  # a __torch_function__ subclass goes through autograd.grad's override path
        pass

    wt = torch.randn(5, 3).as_subclass(Tagged).requires_grad_()
    (g,) = scalar_grads((x @ wt).sum(), (wt,))
    assert torch.equal(g.as_subclass(torch.Tensor), x.sum(0, keepdim=True).T.expand(5, 3))


def test_picker_lists_values_in_name_order():
    from fengine.optim.alias import picker

    d = {"a": 1, "b": 2, "c": 3}
    assert picker(("c", "a"))(d) == [3, 1]
    assert picker(("b",))(d) == [2]
    assert picker(())(d) == []
    with pytest.raises(KeyError):
        picker(("z",))(d)


def test_fold_in_is_splitmix64_of_its_inputs_in_order():
    """Keys are part of every saved run's bits (dropout draws, sample order): they must not
    change with how fold_in is computed. Checked against the SplitMix64 definition."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def reference(seed: int, *data: int) -> int:
        key = mix(seed & mask)
        for d in data:
            key = mix(key ^ mix(d & mask))
        return key >> 1

    cases = [(0,), (0, 0, 0), (1, 2, 3), (-1, 5), (2**63 + 7, 2**40, 0), (42, *range(6))]
    cases += [(seed, step, micro) for seed in (0, 3) for step in range(200) for micro in (0, 1)]
    for args in cases:
        assert fe.rng.fold_in(*args) == reference(*args), args
    # pinned (the value before fold_in was cached): a run's keys never move
    assert fe.rng.fold_in(0, 1, 2) == 5997377655079452530


def test_bind_names_a_missing_tensor_and_leaves_the_module_as_it_was():
    from fengine.bind import bind

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    own = {n: p for n, p in model.named_parameters()}
    own_buffers = dict(model.named_buffers())
    params = {n: torch.zeros_like(p) for n, p in own.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with bind(model, params, buffers):
        assert (
            model[0].weight is params["0.weight"]
            and model[1].running_mean is buffers["1.running_mean"]
        )
    assert all(dict(model.named_parameters())[n] is p for n, p in own.items())
    del buffers["1.running_var"]
    with pytest.raises(KeyError, match=r"no buffers\['1.running_var'\]"):
        with bind(model, params, buffers):
            pass
    assert all(dict(model.named_parameters())[n] is p for n, p in own.items())
    assert all(dict(model.named_buffers())[n] is b for n, b in own_buffers.items())


def test_init_without_a_copy_trains_the_modules_own_tensors_bit_for_bit():
    """``copy=False``: the state holds the module's tensors (no second copy of the weights), a
    donating step updates them in place (the module holds the live weights, as in a hand-written
    loop), and the run is bitwise the default (copying) one's."""
    step = fe.train_step(ce_loss, optim.adamw(1e-2, weight_decay=0.1), fe.ema(0.9))
    copied = step.init(mlp(), seed=0)
    model = mlp()
    shared = step.init(model, seed=0, copy=False)
    own = dict(model.named_parameters())
    assert all(t.data_ptr() == own[n].data_ptr() for n, t in shared.params.items())
    assert all(t.data_ptr() != own[n].data_ptr() for n, t in copied.params.items())
    for batch in mlp_batches(5):
        copied, _ = step(copied, batch)
        shared, _ = step(shared, batch)
    assert_dicts_equal(copied.params, shared.params, "params")
    assert_dicts_equal(copied.extra["ema"].params, shared.extra["ema"].params, "ema")
    assert_dicts_equal(
        {n: p.detach() for n, p in model.named_parameters()}, shared.params, "module"
    )
    with pytest.raises(TypeError, match="^step.init: copy must be a bool, got 'no'"):
        step.init(mlp(), copy="no")
