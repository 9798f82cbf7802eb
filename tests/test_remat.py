"""checkpoint_activations: bitwise parity with the same step without it, real memory savings.

References: the same step built without the wrapper (gradients, params, buffers and
metrics must be bitwise equal, dropout active), torch's saved-tensor hooks
(``torch.autograd.graph.saved_tensors_hooks``) counting the bytes autograd keeps
for backward, and one block run on its own under the same hooks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_dicts_equal
from torch import nn
from torch.nn import functional as F

import fengine as fe
from fengine import optim


# ---------------------------------------------------------------- models
class Block(nn.Module):
    """A pre-activation MLP block with dropout inside (what checkpointing must replay)."""

    def __init__(self, d: int, p: float = 0.3) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(F.gelu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, depth: int = 4, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(16, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class ConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.drop = nn.Dropout2d(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(F.relu(self.bn1(self.conv1(x))))
        return F.relu(x + self.bn2(self.conv2(y)))


class ConvNet(nn.Module):
    def __init__(self, depth: int = 4, c: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvBlock(c) for _ in range(depth)])
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def mlp_data(n: int, batch: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 16, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(n)
    ]


def conv_data(n: int, batch: int = 4, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 1, size, size, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def recorder(log: list):
    """A forward wrapper (written outermost) that keeps a copy of every step's gradients."""

    def record(grad_fn):
        def wrapped(state, batch, **kw):
            g = grad_fn(state, batch, **kw)
            log.append({n: t.clone() for n, t in g.grads.items()})
            return g

        return wrapped

    return fe.forward_wrapper(record)


def train(make_model, data, wrappers, *, seed=0, group=1, tx=None):
    """Run a step over ``data``; returns (state, per-step grads, per-step metrics)."""
    grads: list = []
    step = fe.train_step(ce, tx or optim.adamw(1e-2), recorder(grads), *wrappers)
    state = step.init(make_model(), seed=seed)
    metrics = []
    for i in range(0, len(data), group):
        batch = fe.MicroBatches(data[i : i + group]) if group > 1 else data[i]
        state, m = step(state, batch)
        metrics.append({k: v.clone() if torch.is_tensor(v) else v for k, v in m.items()})
    return state, grads, metrics


def assert_runs_equal(a, b):
    (sa, ga, ma), (sb, gb, mb) = a, b
    assert len(ga) == len(gb) > 0
    for i, (x, y) in enumerate(zip(ga, gb)):
        assert_dicts_equal(x, y, f"grads of step {i}")
    for i, (x, y) in enumerate(zip(ma, mb)):
        assert list(x) == list(y)
        for k in x:
            same = torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
            assert same, f"metric {k} of step {i}: {x[k]} != {y[k]}"
    assert_dicts_equal(sa.params, sb.params, "params")
    assert_dicts_equal(sa.buffers, sb.buffers, "buffers")


# ---------------------------------------------------------------- bitwise parity
CKPT = fe.checkpoint_activations("blocks.*")

COMBOS = {
    "plain": ([CKPT], [], 1),
    "amp-bf16": ([fe.amp("bfloat16"), CKPT], [fe.amp("bfloat16")], 1),
    "ckpt-outside-amp-bf16": ([CKPT, fe.amp("bfloat16")], [fe.amp("bfloat16")], 1),
    "amp-fp16-scaled": ([fe.amp("float16"), CKPT], [fe.amp("float16")], 1),
    "accumulate-2": ([fe.accumulate(2), CKPT], [fe.accumulate(2)], 2),
    "amp-bf16-accumulate-2-ckpt-outermost": (
        [CKPT, fe.amp("bfloat16"), fe.accumulate(2)],
        [fe.amp("bfloat16"), fe.accumulate(2)],
        2,
    ),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_grads_bitwise_equal_to_the_step_without_checkpointing(combo):
    """Dropout inside every checkpointed block, several steps (so the state's params have
    left the module's own), under fengine's derived-RNG scope, autocast and accumulation."""
    with_ckpt, without, group = COMBOS[combo]
    data = mlp_data(6)
    ref = train(Net, data, without, group=group)
    got = train(Net, data, with_ckpt, group=group)
    assert_runs_equal(got, ref)


def test_dropout_is_live_so_parity_is_not_trivial():
    """The parity above compares masks that matter: another seed changes every step's grads,
    and a checkpointed step with another seed matches the plain step with that seed."""
    data = mlp_data(2)
    _, g0, _ = train(Net, data, [CKPT], seed=0)
    _, g1, _ = train(Net, data, [CKPT], seed=1)
    assert not torch.equal(g0[0]["blocks.0.fc1.weight"], g1[0]["blocks.0.fc1.weight"])
    assert_runs_equal(train(Net, data, [CKPT], seed=1), train(Net, data, [], seed=1))


def test_matches_mmengine_activation_checkpointing_in_a_torch_loop():
    """Independent reference: MMEngine's ``turn_on_activation_checkpointing`` (the
    ``activation_checkpointing=[...]`` config key) on a plain torch loop with torch.optim.SGD,
    dropout seeded as fengine derives it (``fold_in(seed, step, 0)``)."""
    import warnings

    from mmengine.runner import turn_on_activation_checkpointing

    names = ["blocks.0", "blocks.1", "blocks.2"]
    data, seed = mlp_data(4), 5
    got_state, got_grads, _ = train(
        lambda: Net(depth=3),
        data,
        [fe.checkpoint_activations(names)],
        seed=seed,
        tx=optim.sgd(0.1, momentum=0.9),
    )

    model = Net(depth=3)
    turn_on_activation_checkpointing(model, names)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    for t, batch in enumerate(data):
        torch.manual_seed(fe.rng.fold_in(seed, t, 0))
        opt.zero_grad()
        with warnings.catch_warnings():  # mmengine calls checkpoint without use_reentrant
            warnings.simplefilter("ignore", UserWarning)
            ce(model, batch).backward()
        assert_dicts_equal(
            got_grads[t], {n: p.grad for n, p in model.named_parameters()}, f"grads {t}"
        )
        opt.step()
    assert_dicts_equal(got_state.params, {n: p.detach() for n, p in model.named_parameters()})


def test_conv_net_with_batchnorm_params_buffers_bitwise_equal():
    """BatchNorm inside checkpointed blocks: the running statistics are updated once (by the
    forward, not again by the recomputation), so buffers match too."""
    data = conv_data(4)
    got = train(
        ConvNet, data, [fe.checkpoint_activations(ConvBlock)], tx=optim.sgd(0.1, momentum=0.9)
    )
    ref = train(ConvNet, data, [], tx=optim.sgd(0.1, momentum=0.9))
    assert_runs_equal(got, ref)
    assert int(got[0].buffers["blocks.0.bn1.num_batches_tracked"]) == 4


def test_multi_step_parts_checkpointed_bitwise_equal():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.gen, self.disc = Net(depth=2, seed=0), Net(depth=2, seed=1)

    def gen_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model.gen(x), y) + 0.1 * model.disc(x).square().mean()

    def disc_loss(model, batch):
        x, y = batch
        return F.cross_entropy(model.disc(x), y)

    def run(*wrappers):
        grads: list = []
        step = fe.multi_step(
            {
                "disc": (disc_loss, optim.adam(1e-2), "disc"),
                "gen": (gen_loss, optim.adam(1e-2), "gen"),
            },
            recorder(grads),
            *wrappers,
        )
        state = step.init(Pair(), seed=0)
        metrics = []
        for b in mlp_data(3):
            state, m = step(state, b)
            metrics.append(m)
        return state, grads, metrics

    ckpt = fe.checkpoint_activations(Block)
    assert ckpt.modules(Pair()) == [f"{p}.blocks.{i}" for p in ("gen", "disc") for i in range(2)]
    assert_runs_equal(run(fe.amp("bfloat16"), ckpt), run(fe.amp("bfloat16")))


def test_caller_rng_untouched():
    data = mlp_data(1)
    step = fe.train_step(ce, optim.sgd(0.1), CKPT)
    state = step.init(Net(), seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    step(state, data[0])
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- cost and memory
def test_cost_is_one_extra_forward_of_each_block():
    calls: dict[str, int] = {}
    model = Net(depth=3)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(
                lambda mod, i, o, name=name: calls.update({name: calls.get(name, 0) + 1})
            )
    step = fe.train_step(ce, optim.sgd(0.1), fe.checkpoint_activations("blocks.1"))
    step(step.init(model), mlp_data(1)[0])
    assert calls == {
        "stem": 1,
        "blocks.0.fc1": 1,
        "blocks.0.fc2": 1,
        "blocks.1.fc1": 2,  # the forward, and its recomputation in backward
        "blocks.1.fc2": 2,
        "blocks.2.fc1": 1,
        "blocks.2.fc2": 1,
        "head": 1,
    }


def saved_bytes(state, step, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward during one step, weights excluded."""
    weights = {
        t.untyped_storage().data_ptr() for t in [*state.params.values(), *state.buffers.values()]
    }
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(state, batch)
    return sum(seen.values())


def measure(make_model, batch, *wrappers):
    step = fe.train_step(ce, optim.sgd(0.1), *wrappers)
    return saved_bytes(step.init(make_model()), step, batch)


def test_saved_activation_memory_drops_mlp():
    """8 blocks, batch 64, width 64: checkpointed, each block keeps only its input.

    Independent check: the saving equals, per block, what the block saves when run on
    its own minus its input (hand count: fc1 input 16 KiB, gelu input and fc2 input
    64 KiB each, dropout noise 16 KiB; input 16 KiB)."""
    depth, b, d = 8, 64, 64
    batch = mlp_data(1, batch=b)[0]
    make = lambda: Net(depth=depth, d=d)  # noqa: E731
    plain = measure(make, batch)
    ckpt = measure(make, batch, fe.checkpoint_activations(Block))

    seen: dict[int, int] = {}
    x = torch.randn(b, d, requires_grad=True)
    block = Block(d)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    one_block = sum(seen.values())
    input_bytes = b * d * 4
    assert one_block == input_bytes + 2 * (b * 4 * d * 4) + b * d * 4  # x; gelu, fc2 inputs; noise
    assert plain - ckpt == depth * (one_block - input_bytes)
    assert ckpt * 5 < plain, (plain, ckpt)  # measured: 1334276 -> 154628 bytes (8.6x)


def test_saved_activation_memory_drops_conv():
    batch = conv_data(1, batch=8, size=16)[0]
    make = lambda: ConvNet(depth=6, c=16)  # noqa: E731
    plain = measure(make, batch)
    ckpt = measure(make, batch, fe.checkpoint_activations("blocks.*"))
    assert ckpt * 3 < plain, (plain, ckpt)


# ---------------------------------------------------------------- the module is left as it was
def _forward_patched(model) -> list[str]:
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


def test_module_restored_after_step_and_on_exceptions():
    model = Net(depth=2)
    step = fe.train_step(ce, optim.sgd(0.1), CKPT)
    state = step.init(model)
    state, _ = step(state, mlp_data(1)[0])
    assert _forward_patched(model) == []

    def failing_loss(model, batch):
        model(batch[0])
        raise RuntimeError("boom in the loss")

    bad = fe.train_step(failing_loss, optim.sgd(0.1), CKPT)
    with pytest.raises(RuntimeError, match="boom in the loss"):
        bad(bad.init(model), mlp_data(1)[0])
    assert _forward_patched(model) == []

    class Explodes(nn.Module):
        def forward(self, x):
            raise ValueError("boom in a block")

    other = Net(depth=2)
    other.blocks[1].fc2 = Explodes()
    with pytest.raises(ValueError, match="boom in a block"):
        step(step.init(other), mlp_data(1)[0])
    assert _forward_patched(other) == []
    # the model's own weights were never touched
    assert_dicts_equal(dict(model.named_parameters()), dict(Net(depth=2).named_parameters()))


def test_a_forward_the_user_patched_is_kept():
    model = Net(depth=1)
    calls = []
    original = model.blocks[0].forward

    def mine(x):
        calls.append(1)
        return original(x)

    model.blocks[0].forward = mine
    step = fe.train_step(ce, optim.sgd(0.1), CKPT)
    step(step.init(model), mlp_data(1)[0])
    assert model.blocks[0].__dict__["forward"] is mine
    assert len(calls) == 2  # forward + recomputation, both through the user's patch


# ---------------------------------------------------------------- choosing modules
def test_choices_by_name_glob_type_predicate():
    model = Net(depth=3)
    assert fe.checkpoint_activations("blocks.0", "blocks.2").modules(model) == [
        "blocks.0",
        "blocks.2",
    ]
    assert fe.checkpoint_activations(["blocks.0", "blocks.1"]).modules(model) == [
        "blocks.0",
        "blocks.1",
    ]
    assert fe.checkpoint_activations("blocks.*").modules(model) == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]
    assert fe.checkpoint_activations(Block).modules(model) == ["blocks.0", "blocks.1", "blocks.2"]
    assert fe.checkpoint_activations(lambda n: n.endswith(".fc1")).modules(model) == [
        f"blocks.{i}.fc1" for i in range(3)
    ]
    # the outermost match covers what is inside it
    assert fe.checkpoint_activations("blocks", "blocks.1").modules(model) == ["blocks"]
    assert (
        repr(fe.checkpoint_activations("blocks.*", Block))
        == "checkpoint_activations('blocks.*', Block)"
    )


def test_unknown_name_is_a_clear_error_on_first_call_and_the_state_survives():
    model = Net(depth=2)
    step = fe.train_step(ce, optim.sgd(0.1), fe.checkpoint_activations("block.0"))
    state = step.init(model)
    with pytest.raises(ValueError) as err:
        step(state, mlp_data(1)[0])
    msg = str(err.value)
    assert "no submodule 'block.0'" in msg and "Did you mean 'blocks.0'" in msg
    assert "'stem'" in msg and "'blocks.1.fc2'" in msg and "'head'" in msg  # lists the names
    assert state.step == 0  # not donated: the step failed before touching it
    assert _forward_patched(model) == []


@pytest.mark.parametrize(
    "spec, shown",
    [("layers.*", "'layers.*'"), (nn.Conv2d, "Conv2d"), (lambda n: False, "<lambda>")],
)
def test_a_choice_matching_nothing_is_an_error(spec, shown):
    with pytest.raises(ValueError, match=f"{shown} matches no submodule of Net"):
        fe.checkpoint_activations(spec).modules(Net(depth=1))


def test_bad_arguments_refused_when_built():
    with pytest.raises(ValueError, match="at least one"):
        fe.checkpoint_activations()
    with pytest.raises(TypeError, match="not an nn.Module type"):
        fe.checkpoint_activations(int)
    with pytest.raises(TypeError, match="got int"):
        fe.checkpoint_activations(3)
    with pytest.raises(ValueError, match="given twice"):
        fe.train_step(ce, optim.sgd(0.1), CKPT, fe.checkpoint_activations(Block))
