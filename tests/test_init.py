"""fengine.init: each initialiser bitwise vs torch.nn.init / MMEngine, init_cfg selection vs
MMEngine 0.10.7's ``initialize`` and ``BaseModule.init_weights``, the report, determinism."""

from __future__ import annotations

import copy
import zlib

import pytest
import safetensors.torch
import torch
from mmengine.model import BaseModule, initialize, weight_init as mm
from torch import nn

from fengine import init
from fengine.rng import fold_in


class MyConv(nn.Conv2d):  # matches "Conv2d" through its direct base
    pass


class DeepConv(MyConv):  # "Conv2d" is not a direct base: MMEngine does not match it
    pass


class Block(nn.Module):  # a module with its own weight and children: the order matters
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))
        self.inner = nn.Conv2d(2, 2, 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.mine = MyConv(8, 8, 3)
        self.deep = DeepConv(8, 4, 1)
        self.reg = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Linear(4, 6))
        self.cls = nn.Linear(6, 5)
        self.conv1d = nn.Conv1d(2, 3, 2, bias=False)
        self.block = Block()


def _net() -> Net:
    torch.manual_seed(123)
    return Net()


def _mm(cfg, seed: int = 7) -> dict[str, torch.Tensor]:
    m = _net()
    torch.manual_seed(seed)
    initialize(m, copy.deepcopy(cfg))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _ours(specs, seed: int = 7) -> tuple[dict[str, torch.Tensor], init.InitReport]:
    m = _net()
    rep = init.apply(m, specs, generator=torch.Generator().manual_seed(seed))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}, rep


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad}"


# ------------------------------------------------------------ each initialiser, bitwise

TORCH_CASES = [
    (init.Normal(mean=0.5, std=0.2), lambda t, g: nn.init.normal_(t, 0.5, 0.2, generator=g)),
    (init.Uniform(a=-0.3, b=0.7), lambda t, g: nn.init.uniform_(t, -0.3, 0.7, generator=g)),
    (init.Xavier(gain=2.0), lambda t, g: nn.init.xavier_normal_(t, gain=2.0, generator=g)),
    (
        init.Xavier(distribution="uniform"),
        lambda t, g: nn.init.xavier_uniform_(t, gain=1, generator=g),
    ),
    (
        init.Kaiming(),
        lambda t, g: nn.init.kaiming_normal_(t, 0, "fan_out", "relu", generator=g),
    ),
    (
        init.Kaiming(a=0.1, mode="fan_in", nonlinearity="leaky_relu", distribution="uniform"),
        lambda t, g: nn.init.kaiming_uniform_(t, 0.1, "fan_in", "leaky_relu", generator=g),
    ),
    (
        init.Caffe2Xavier(),
        lambda t, g: nn.init.kaiming_uniform_(t, 1, "fan_in", "leaky_relu", generator=g),
    ),
    (init.Constant(val=0.25), lambda t, g: nn.init.constant_(t, 0.25)),
]


@pytest.mark.parametrize("spec,ref", TORCH_CASES, ids=lambda x: type(x).__name__)
def test_each_initialiser_equals_torch_nn_init_with_the_same_generator(spec, ref):
    for layer in (nn.Conv2d(4, 6, 3), nn.Linear(9, 5)):
        m = nn.Sequential(layer)
        spec = type(spec)(**{**spec.__dict__, "layer": type(layer), "bias": 0.5})
        init.apply(m, spec, seed=11)
        # the documented key: fold_in(seed, tag, crc32(parameter name))
        g = torch.Generator().manual_seed(fold_in(11, init._TAG, zlib.crc32(b"0.weight")))
        want = ref(torch.empty_like(layer.weight), g)
        assert torch.equal(layer.weight, want)
        assert torch.equal(layer.bias, torch.full_like(layer.bias, 0.5))
        # one explicit generator: the same draws as torch.nn.init with it
        init.apply(m, spec, generator=torch.Generator().manual_seed(3))
        assert torch.equal(
            layer.weight, ref(torch.empty_like(layer.weight), torch.Generator().manual_seed(3))
        )


def test_trunc_normal_is_mmengines_sampler_bitwise():
    t = torch.empty(64, 33)
    for kw in ({}, dict(mean=0.1, std=0.02, a=-0.04, b=0.04)):
        torch.manual_seed(5)
        want = mm.trunc_normal_(torch.empty_like(t), **kw)
        got = init.trunc_normal_(t, **kw, generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, want)
    lin = nn.Linear(300, 200)
    init.apply(lin, init.TruncNormal(layer="Linear", std=0.02, a=-0.04, b=0.04), seed=0)
    w = lin.weight
    assert w.min() >= -0.04 and w.max() <= 0.04
    # truncated at 2 std: the std of the truncated normal is 0.02 * 0.8796
    assert abs(w.std().item() - 0.02 * 0.8796) < 0.0005


def test_bias_prob_equals_mmengines_bias_init_with_prob():
    for p in (0.01, 0.1, 0.5, 0.9):
        assert init.bias_init_with_prob(p) == mm.bias_init_with_prob(p)
        m = nn.Linear(3, 4)
        init.apply(m, init.Constant(val=0, layer="Linear", bias_prob=p))
        assert torch.equal(m.bias, torch.full((4,), mm.bias_init_with_prob(p)))


# ------------------------------------------------------- selection, vs MMEngine initialize

CFGS = [
    dict(type="Kaiming", layer="Conv2d"),
    [dict(type="Kaiming", layer="Conv2d"), dict(type="Xavier", layer="Linear", gain=3)],
    dict(type="Normal", layer=["Conv2d", "Linear"], std=0.1, bias=0.3),
    dict(type="Uniform", layer="_ConvNd", a=-1, b=2, bias_prob=0.2),  # a base class name
    dict(type="Constant", layer="MyConv", val=4),
    dict(type="TruncNormal", layer="Linear", std=0.5),
    dict(type="Caffe2Xavier", layer="Conv2d"),
    dict(type="Xavier", layer="Conv2d", distribution="uniform", override=dict(name="reg")),
    dict(
        type="Kaiming",
        layer="Conv2d",
        override=[
            dict(name="reg", type="Normal", std=0.01),
            dict(name="cls", type="Constant", val=2),
        ],
    ),
    dict(
        type="Constant",
        val=1,
        bias=2,
        layer="Conv2d",
        override=dict(type="Constant", name="reg", val=3, bias=4),
    ),
    dict(type="Normal", std=0.3, override=dict(name="bn")),  # no layer: only the override
    dict(type="Normal", layer=["Block", "Conv2d"]),
    dict(type="Xavier", layer="Linear", override=dict(name="block", type="Kaiming")),
]


@pytest.mark.parametrize("cfg", CFGS, ids=range(len(CFGS)))
def test_init_cfg_selection_equals_mmengine_initialize_bitwise(cfg):
    want = _mm(cfg)
    got, rep = _ours(cfg)
    _assert_same(got, want)
    typed, _ = _ours(init.from_cfg(cfg))
    _assert_same(typed, want)
    assert any(rep.writes.values())


@pytest.mark.parametrize(
    "cfg",
    [
        dict(type="Normal", layer="Conv2d", std=0.1),
        dict(type="Kaiming", layer="Conv2d"),
        dict(type="Uniform", layer="Conv2d"),
        dict(type="TruncNormal", layer="Conv2d", std=0.1),
        dict(type="Xavier", layer="Conv2d", distribution="uniform"),
    ],  # fmt: skip
)
def test_a_channels_last_model_is_drawn_as_mmengine_draws_it(cfg):
    """MMEngine draws in place, in the weight's memory layout; the generator mode drew into a
    contiguous tensor, so a channels_last conv got other values (not even the same multiset)."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    ours = ours.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(ours)
    torch.manual_seed(5)
    initialize(ref, copy.deepcopy(cfg))
    init.apply(ours, cfg, generator=torch.Generator().manual_seed(5))
    _assert_same(ours.state_dict(), ref.state_dict())
    assert ours[0].weight.is_contiguous(memory_format=torch.channels_last)
    # per-name keys: the values do not depend on the layout
    flat = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    init.apply(flat, cfg, seed=3)
    init.apply(ours, cfg, seed=3)
    _assert_same(flat.state_dict(), ours.state_dict())


@pytest.mark.parametrize("seed", [1.5, "7", True, 2**64, -1])
def test_a_seed_that_is_not_a_63_bit_int_is_refused(seed):
    """It was folded into the keys of another seed (1.5 and True as 1, 2**64 as 0)."""
    with pytest.raises(ValueError, match=r"seed must be a non-negative int below 2\*\*63"):
        init.apply(nn.Linear(2, 2), init.Normal(), seed=seed)


def test_typed_specs_with_classes_select_like_names():
    by_name, _ = _ours([init.Kaiming(layer="Conv2d"), init.Normal(layer="Linear")])
    by_class, _ = _ours([init.Kaiming(layer=nn.Conv2d), init.Normal(layer=[nn.Linear])])
    _assert_same(by_class, by_name)
    before = _net()
    _, rep = _ours(init.Constant(val=1, layer=nn.Conv2d))
    assert rep.last("mine.weight") is not None  # MyConv: Conv2d is a direct base
    assert rep.last("deep.weight") is None  # DeepConv: it is not (MMEngine's rule)
    assert rep.last("conv1d.weight") is None
    assert torch.equal(
        _ours(init.Constant(val=1, layer=nn.Conv2d))[0]["deep.weight"], before.deep.weight
    )


def test_per_name_keys_make_a_weight_independent_of_other_layers():
    a, b = _net(), _net()
    init.apply(a, [init.Kaiming(layer="Conv2d")], seed=4)
    init.apply(b, [init.Normal(layer="Linear"), init.Kaiming(layer="Conv2d")], seed=4)
    assert torch.equal(a.feat.weight, b.feat.weight)
    assert torch.equal(a.reg[0].weight, b.reg[0].weight)


def test_same_seed_same_bits_other_seed_differs():
    specs = [init.Kaiming(layer="Conv2d"), init.TruncNormal(layer="Linear", std=0.02)]
    runs = []
    for seed in (0, 0, 1):
        m = _net()
        init.apply(m, specs, seed=seed)
        runs.append(m.state_dict())
    _assert_same(runs[0], runs[1])
    for k in ("feat.weight", "cls.weight", "reg.1.weight"):
        assert not torch.equal(runs[0][k], runs[2][k])
    # and the keys are not the ones any other seed-derived stream uses
    m = _net()
    init.apply(m, init.Normal(layer="Linear"), seed=0)
    assert not torch.equal(
        m.cls.weight, torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    )


@pytest.mark.gpu
def test_values_do_not_depend_on_the_device():
    cpu, cuda = _net(), _net().cuda()
    for m in (cpu, cuda):
        init.apply(m, [init.Kaiming(layer="Conv2d"), init.TruncNormal(layer="Linear")], seed=2)
    _assert_same(cpu.state_dict(), {k: v.cpu() for k, v in cuda.state_dict().items()})


# ------------------------------------------------------------------ report, BaseModule


class ToyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.linear = nn.Linear(1, 1)


def _mm_labels(module: BaseModule) -> dict[str, str]:
    """MMEngine's init info per parameter (what init_weights logs)."""
    seen: dict[str, str] = {}

    def dump(self):
        seen.update({n: self._params_init_info[p]["init_info"] for n, p in self.named_parameters()})

    orig = BaseModule._dump_init_info
    BaseModule._dump_init_info = dump
    try:
        module.init_weights()
    finally:
        BaseModule._dump_init_info = orig
    return seen


class MMToy(BaseModule):
    def __init__(self, init_cfg) -> None:
        super().__init__(init_cfg)
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.linear = nn.Linear(1, 1)


def test_report_names_the_same_initialisers_as_mmengines_log():
    # the docs' examples (T17-T19): Kaiming(Conv2d) + Xavier(Linear); override conv2 -> Xavier
    cfgs = [
        [dict(type="Kaiming", layer="Conv2d"), dict(type="Xavier", layer="Linear")],
        dict(type="Kaiming", layer=["Conv2d", "Linear"]),
        dict(type="Kaiming", layer="Conv2d", override=dict(name="conv2", type="Xavier")),
    ]
    for cfg in cfgs:
        torch.manual_seed(0)
        mmodel = MMToy(copy.deepcopy(cfg))
        ours = copy.deepcopy(mmodel)
        torch.manual_seed(9)
        labels = _mm_labels(mmodel)
        rep = init.apply(ours, cfg, generator=torch.Generator().manual_seed(9))
        _assert_same(ours.state_dict(), mmodel.state_dict())
        for name, label in labels.items():
            if name == "conv2.bias" and "override" in cfg:
                # MMEngine infers the label from a change of the mean: the override set the
                # bias to the same 0, so it still says Kaiming; the report records the write
                assert label.startswith("KaimingInit") and rep.last(name).startswith("XavierInit")
            elif label.startswith("The value is the same"):
                assert rep.last(name) is None
            else:
                assert rep.last(name) == label, name
    text = str(rep)
    assert "conv1.weight - torch.Size([1, 1, 1, 1]): \nKaimingInit: a=0, mode=fan_out" in text
    assert "linear.weight - torch.Size([1, 1]): \nThe value is the same" in text


def _checkpoint(tmp_path, kind: str) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(42)
    src = {f"backbone.{k}": v for k, v in ToyConv().state_dict().items()}
    src["head.weight"] = torch.randn(3, 3)
    path = tmp_path / f"pre.{kind}"
    if kind == "pth":
        torch.save({"state_dict": src}, path)
    else:
        safetensors.torch.save_file(src, path)
    return str(path), src


class MMNet(BaseModule):
    def __init__(self, path: str) -> None:
        super().__init__(init_cfg=dict(type="Normal", layer="Linear", std=0.5))
        self.backbone = MMToyBackbone(path)
        self.head = nn.Linear(1, 2)


class MMToyBackbone(BaseModule):
    def __init__(self, path: str) -> None:
        super().__init__(
            init_cfg=[
                dict(type="Pretrained", checkpoint=path, prefix="backbone."),
                dict(type="Constant", layer=["Conv2d", "Linear"], val=7),
            ]
        )
        self.conv1 = nn.Conv2d(1, 1, 1)
        self.conv2 = nn.Conv2d(1, 1, 1)
        self.linear = nn.Linear(1, 1)


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_pretrained_with_prefix_per_scope_equals_mmengine_init_weights(tmp_path, kind):
    path, src = _checkpoint(tmp_path, kind)
    torch.manual_seed(0)
    mmodel = MMNet(path)
    ours = copy.deepcopy(mmodel)
    torch.manual_seed(3)
    if kind == "pth":
        labels = _mm_labels(mmodel)
    else:  # MMEngine reads .pth only: its reference is the same file saved as .pth
        path_pth, _ = _checkpoint(tmp_path, "pth")
        mmodel = MMNet(path_pth)
        mmodel.load_state_dict(ours.state_dict())
        torch.manual_seed(3)
        labels = _mm_labels(mmodel)
    specs = {
        "": init.Normal(layer="Linear", std=0.5),
        # Pretrained listed first runs last in its scope (it wins over Constant)
        "backbone": [
            init.Pretrained(path, prefix="backbone."),
            init.Constant(val=7, layer=[nn.Conv2d, nn.Linear]),
        ],
    }
    rep = init.apply(ours, specs, generator=torch.Generator().manual_seed(3))
    _assert_same(ours.state_dict(), mmodel.state_dict())
    for k in ("conv1.weight", "conv2.bias", "linear.weight"):
        assert torch.equal(ours.backbone.get_parameter(k), src[f"backbone.{k}"])
    assert rep.last("backbone.conv1.weight") == f"PretrainedInit: load from {path}"
    assert rep.writes["backbone.conv1.weight"][0].startswith("ConstantInit")
    assert rep.last("head.weight") == labels["head.weight"]
    assert rep.last("backbone.linear.bias").startswith("PretrainedInit")
    # the dict form reads the same (a prefix without its dot as MMEngine: "backbone.")
    again = copy.deepcopy(ours)
    init.apply(again, init.Constant(val=0, layer="Conv2d"))
    init.apply(again, {"backbone": [dict(type="Pretrained", checkpoint=path, prefix="backbone")]})
    _assert_same(again.state_dict(), ours.state_dict())


def test_pretrained_without_prefix_loads_matching_names(tmp_path):
    path = tmp_path / "w.safetensors"
    torch.manual_seed(1)
    donor = ToyConv()
    safetensors.torch.save_file(donor.state_dict(), path)
    m = ToyConv()
    rep = init.apply(m, init.Pretrained(path), seed=0)
    _assert_same(m.state_dict(), donor.state_dict())
    assert all(w == (f"PretrainedInit: load from {path}",) for w in rep.writes.values())


# ------------------------------------------------------------------------------ errors


def test_bad_specs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="distribution must be one of"):
        init.Xavier(distribution="gauss")
    with pytest.raises(ValueError, match="mode must be one of"):
        init.Kaiming(mode="in")
    with pytest.raises(ValueError, match=r"bias_prob must be in \(0, 1\), got 1.5"):
        init.Normal(bias_prob=1.5)
    with pytest.raises(TypeError, match="bias must be a number"):
        init.Normal(bias="0")
    with pytest.raises(TypeError, match="layer must be a class name"):
        init.Normal(layer=[3])
    with pytest.raises(ValueError, match="type must be one of"):
        init.from_cfg(dict(type="Gaussian"))
    with pytest.raises(TypeError, match=r"unknown keys \['sigma'\]"):
        init.from_cfg(dict(type="Normal", sigma=1))
    with pytest.raises(ValueError, match='must contain the key "name"'):
        init.from_cfg(dict(type="Normal", override=dict(type="Constant", val=1)))
    with pytest.raises(ValueError, match='needs a "type" key'):
        init.from_cfg(dict(type="Normal", override=dict(name="cls", val=1)))
    with pytest.raises(ValueError, match="override names 'nope'"):
        init.apply(_net(), init.Normal(override={"nope": None}))
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        init.apply(_net(), {"nope": init.Normal()})
    with pytest.raises(ValueError, match=r"Kaiming on bn.weight \(8,\)"):
        init.apply(_net(), init.Kaiming(layer="BatchNorm2d"))
    with pytest.raises(TypeError, match="expected an init spec"):
        init.apply(_net(), [3])
    # an init_cfg dict without "type" read as submodule -> specs, 'Linear' iterated by letter
    with pytest.raises(ValueError, match=r"has no 'type'.*specs\['layer'\] is 'Linear'"):
        init.apply(_net(), dict(layer="Linear", val=1))


def test_a_shared_module_is_reported_under_its_name_and_a_partial_pretrained_warns(
    tmp_path, caplog
):
    """Writes through another path to the same module (an alias) were dropped from the report
    (it said the first rule wrote the weight); a Pretrained that left params missing or
    mismatched said nothing (MMEngine logs them)."""
    import logging

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a
            self.c = nn.Linear(3, 2)

    cfg = dict(type="Normal", layer="Linear", std=1.0,
               override=dict(name="b", type="Constant", val=5.0, bias=1.0))  # fmt: skip
    torch.manual_seed(0)
    m = Shared()
    ref = copy.deepcopy(m)
    torch.manual_seed(7)
    initialize(ref, cfg)
    rep = init.apply(m, cfg, generator=torch.Generator().manual_seed(7))
    _assert_same(m.state_dict(), ref.state_dict())
    assert rep.last("a.weight") == rep.last("a.bias") == "ConstantInit: val=5.0, bias=1.0"
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a.weight": torch.ones(3, 3), "c.weight": torch.ones(4, 3)}, path)
    with caplog.at_level(logging.WARNING, logger="fengine"):
        init.apply(Shared(), init.Pretrained(path))
    (said,) = [r.getMessage() for r in caplog.records if "Pretrained" in r.getMessage()]
    assert "c.weight: [4, 3] vs [2, 3]" in said and "a.bias" in said


def test_readme_block_runs(monkeypatch):
    """README's "Initialisers and model complexity" block, on a small conv net with a head."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = next(
        c for c in re.findall(r"```python\n(.+?)\n```", readme, flags=re.S) if "init.apply" in c
    )

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    import fengine as fe
    from fengine import optim

    printed: list = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(a))
    model = Model()
    cfg = type("Cfg", (), {"seed": 3})
    step = fe.train_step(lambda m, b: m(b).sum(), optim.sgd(0.1))
    env = {"model": model, "nn": nn, "torch": torch, "cfg": cfg, "step": step}
    exec(compile(code, "README.md", "exec"), env)
    assert env["report"].last("head.weight").startswith("ConstantInit: val=0")
    assert env["report"].last("conv.weight").startswith("KaimingInit")
    assert torch.equal(env["state"].params["head.weight"], torch.zeros(2, 4))
    assert "Model Parameters:" in printed[-1][0]


def test_specs_check_their_arguments_up_front():
    """Each was accepted and failed at the first apply (or never: a NaN gain, a NaN bias)."""
    with pytest.raises(TypeError, match="Normal: std must be a number, got '1'"):
        init.Normal(std="1")
    with pytest.raises(ValueError, match="Xavier: gain must be finite, got nan"):
        init.Xavier(gain=float("nan"))
    with pytest.raises(ValueError, match="Normal: bias must be finite, got nan"):
        init.Normal(bias=float("nan"))
    with pytest.raises(ValueError, match="Kaiming: nonlinearity: Unsupported nonlinearity foo"):
        init.Kaiming(nonlinearity="foo")
    for override in ("head", ["head"]):  # was "dictionary update sequence element #0 ..."
        with pytest.raises(TypeError, match="override must be a dict or a list of dicts"):
            init.from_cfg(dict(type="Normal", override=override))
    with pytest.raises(ValueError, match="is a URL; fengine downloads nothing"):
        init.Pretrained("https://example.com/x.pth")


def test_layer_none_selects_no_class_as_in_mmengine():
    cfg = dict(type="Constant", val=2.0, layer=None, override=dict(name="cls"))
    want = _mm(cfg)
    got, _ = _ours(cfg)
    _assert_same(got, want)


def test_a_pretrained_prefix_matching_nothing_names_the_prefix(tmp_path):
    """It suggested prefix_map= and allow_empty=True, which Pretrained does not take."""
    path = tmp_path / "a.pth"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(Exception, match=r"Pretrained\(.*prefix='backbone'\) into the model loads "
                       r"nothing: no weight of the file under 'backbone\.'"):  # fmt: skip
        init.apply(nn.Linear(3, 2), init.Pretrained(path, prefix="backbone"))


# ------------------------------------------------ truncation bounds, selection, name keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trunc_normal_of_a_half_precision_weight_keeps_its_std_off_the_bounds(dtype):
    """A bf16 / fp16 weight was drawn in its own dtype: values near ±1 in CDF space rounded to
    ±1, erfinv gave ±inf, clamped to ±2 (100 std): bf16 std 0.0905, 2050 weights above 0.2."""
    lin = nn.Linear(1024, 1024).to(dtype)
    init.apply(lin, init.TruncNormal(layer="Linear", std=0.02), seed=0)
    w = lin.weight.float()
    assert abs(w.std().item() - 0.02) < 0.02 * 0.02
    assert w.abs().max().item() < 8 * 0.02
    # the float32 draw, rounded: per-name keys and one generator alike
    lin32 = nn.Linear(1024, 1024)
    init.apply(lin32, init.TruncNormal(layer="Linear", std=0.02), seed=0)
    assert torch.equal(lin.weight, lin32.weight.to(dtype))
    g = torch.Generator
    half = init.trunc_normal_(
        torch.empty(64, 33, dtype=dtype), std=0.02, generator=g().manual_seed(5)
    )
    full = init.trunc_normal_(torch.empty(64, 33), std=0.02, generator=g().manual_seed(5))
    assert torch.equal(half, full.to(dtype))


def test_trunc_normal_of_a_float32_weight_never_lands_on_the_bound():
    """A float32 uniform draw is exactly -1 about once in 2**24: erfinv gave -inf, clamped to
    a=-2 (100 std). Seed 1 hits it in a Linear(1024, 1024); MMEngine's sampler, with the same
    draws, still puts that weight at -2.0. Every other weight keeps MMEngine's bits."""
    lin = nn.Linear(1024, 1024, bias=False)
    init.apply(lin, init.TruncNormal(layer="Linear", std=0.02), seed=1)
    torch.manual_seed(fold_in(1, init._TAG, zlib.crc32(b"weight")))
    theirs = mm.trunc_normal_(torch.empty(1024, 1024), std=0.02)
    at_bound = theirs == -2.0
    assert at_bound.sum().item() == 1
    w = lin.weight.detach()
    assert torch.equal(w[~at_bound], theirs[~at_bound])
    assert w.abs().max().item() < 8 * 0.02
    # the float32 next above -1 instead: erfinv(-(1 - 2**-24)) * sqrt(2) = -5.42 std
    assert w[at_bound].item() == pytest.approx(-5.42 * 0.02, rel=1e-3)


def test_a_layer_that_selects_no_module_raises_naming_it_and_the_module_classes():
    """init.Kaiming(layer="Conv") (for Conv2d) or layer="linear" initialised nothing, silently:
    a name no module class has raises; a class this model lacks (mmpretrain's VGG default
    init_cfg names _BatchNorm, absent without BN) warns, as MMEngine skips it."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2))
    before = copy.deepcopy(model.state_dict())
    classes = "its module classes are ['Conv2d', 'Linear', 'Sequential']"
    cases = [
        (init.Kaiming(layer="Conv"), "Kaiming(layer=['Conv'])", "['Conv']"),
        (dict(type="Normal", layer="linear"), "Normal(layer=['linear'])", "['linear']"),
        ([init.Normal(layer="Linear"), init.Kaiming(layer=[nn.Conv1d, "BatchNorm2e"])],
         "Kaiming(layer=['Conv1d', 'BatchNorm2e'])", "['BatchNorm2e']"),
    ]  # fmt: skip
    for specs, named, unknown in cases:
        with pytest.raises(ValueError) as e:
            init.apply(model, specs, seed=0)
        assert str(e.value).startswith(f"init: {named} selects no module of the model: ")
        assert str(e.value).endswith(f"{classes}; no module class is named {unknown}")
        _assert_same(model.state_dict(), before)  # refused before anything was written
    with pytest.warns(UserWarning, match=r"Constant\(layer=\['_BatchNorm'\]\) selects no module"):
        rep = init.apply(
            model, [init.Kaiming(layer="Conv2d"), init.Constant(layer="_BatchNorm", val=1)]
        )
    assert rep.last("0.weight").startswith("KaimingInit")
    # one of the listed layers matching is enough (a config naming BatchNorm2d and GroupNorm)
    rep = init.apply(model, init.Normal(layer=["Linear", "GroupNorm"]), seed=0)
    assert rep.last("1.weight").startswith("NormalInit")


def test_a_scope_of_a_mapping_lacking_the_layer_warns_and_the_rest_applies():
    """A mapping ports nested init_cfg: a BaseModule's default (Kaiming on Conv2d) on a module
    without a conv is skipped by MMEngine without a word; here it warns, naming the scope."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2))
    specs = {
        "": init.Kaiming(layer="Conv2d"),
        "1": [init.Kaiming(layer="Conv2d"), init.Normal(layer="Linear")],
    }
    with pytest.warns(UserWarning) as said:
        rep = init.apply(model, specs, seed=0)
    (msg,) = [str(w.message) for w in said]
    assert msg == (
        "init: Kaiming(layer=['Conv2d']) selects no module of 1: layer names a module class or a "
        "direct base (case-sensitive); its module classes are ['Linear']"
    )
    assert rep.last("0.weight").startswith("KaimingInit")
    assert rep.last("1.weight").startswith("NormalInit")


def test_per_name_values_are_keyed_by_the_parameter_name_not_the_path_or_a_wrapper():
    """A module shared as p1.0 and p2.0 was keyed by the last path (p2.0.weight): renaming the
    second parent changed p1.0.weight; torch.compile's _orig_mod. prefix changed every value."""

    class TwoParents(nn.Module):
        def __init__(self, second: str) -> None:
            super().__init__()
            shared = nn.Linear(4, 4)
            self.p1 = nn.Sequential(shared)
            setattr(self, second, nn.Sequential(shared))

    spec = init.Normal(layer="Linear")
    a, b = TwoParents("p2"), TwoParents("zz")
    init.apply(a, spec, seed=0)
    init.apply(b, spec, seed=0)
    g = torch.Generator().manual_seed(fold_in(0, init._TAG, zlib.crc32(b"p1.0.weight")))
    want = nn.init.normal_(torch.empty(4, 4), generator=g)
    assert torch.equal(a.p1[0].weight, want) and torch.equal(b.p1[0].weight, want)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    init.apply(plain, spec, seed=0)
    for wrap in (torch.compile, nn.DataParallel):  # _orig_mod., module. (CPU: no replicas)
        inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        rep = init.apply(wrap(inner), spec, seed=0)
        _assert_same(inner.state_dict(), plain.state_dict())
        assert all(rep.writes.values())
