"""Per-parameter lr / weight decay (`fengine.optim.paramwise`) against MMEngine and MMDet.

References: MMEngine 0.10.7's ``DefaultOptimWrapperConstructor`` (run here, as an
oracle), MMDet's ``LearningRateDecayOptimizerConstructor`` (transcribed below from
its source; mmdet/mmcv are not installed), the golden numbers of FEATURES C2-C5,
and ``torch.optim`` (foreach) for the built optimizers, compared bitwise.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from fengine import schedules as S
from fengine.optim import adamw, collect_metrics, hyperparams, sgd, step_params
from fengine.optim.paramwise import ParamGroups, Scaled, layer_decay, paramwise


dc = pytest.importorskip("mmengine.optim.optimizer.default_constructor")

LR, WD = 0.01, 1e-4


# ---------------------------------------------------------------- models
class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer0 = nn.Conv2d(3, 8, 3)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.gn = nn.GroupNorm(2, 8)
        self.head_proj = nn.Linear(8, 8)  # 'head' is a substring of its name
        self.layer1 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.ones(8))  # 1-D, not in a norm layer
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)  # its bias stays trainable

    def forward(self, x):
        x = self.gn(self.inorm(self.dw(self.bn0(self.layer0(x))))).mean((2, 3))
        x = self.frozen(torch.relu(self.layer1(torch.relu(self.head_proj(x)))))
        return self.ln(x) * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        self.gamma = nn.Parameter(torch.ones(4))  # top-level param
        self.unused = nn.Linear(2, 2)  # never in the forward: no gradients

    def forward(self, x):
        return self.head(self.backbone(x)) * self.gamma


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


class ToyModel(nn.Module):
    """The ToyModel of MMEngine's paramwise_cfg docs (T12/T13)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleDict(dict(layer0=nn.Linear(1, 1), layer1=nn.Linear(1, 1)))
        self.head = nn.ModuleDict(dict(linear=nn.Linear(1, 1), bn=nn.BatchNorm1d(1)))


# ---------------------------------------------------------------- MMEngine oracle
def mmengine_build(model, paramwise_cfg, monkeypatch, optimizer="SGD", lr=LR, wd=WD, **opt):
    """The torch optimizer MMEngine builds, its per-name (lr, wd, group) and its paramwise log lines."""
    lines = []
    monkeypatch.setattr(dc, "print_log", lambda msg, *a, **k: lines.append(msg))
    cfg = dict(type=optimizer, lr=lr, weight_decay=wd, **opt)
    wrapper = dc.DefaultOptimWrapperConstructor(dict(optimizer=cfg), paramwise_cfg)(model)
    names = {id(p): n for n, p in model.named_parameters()}
    per_name = {}
    for g in wrapper.optimizer.param_groups:
        for p in g["params"]:
            per_name[names[id(p)]] = g
    logs = [m for m in lines if m.startswith("paramwise_options")]
    return wrapper.optimizer, per_name, logs


def assert_matches_mmengine(groups: ParamGroups, model, cfg, monkeypatch, **kw):
    _, mm, logs = mmengine_build(model, cfg, monkeypatch, **kw)
    ours = {s.name: (s.lr, s.weight_decay) for s in groups}
    theirs = {n: (g["lr"], g["weight_decay"]) for n, g in mm.items()}
    assert list(ours) == list(theirs)  # same params (frozen ones excluded), same order
    for name in ours:  # exact float equality, param by param
        assert ours[name] == theirs[name], (name, ours[name], theirs[name])
        assert groups.lr_of(name) == theirs[name][0]
        assert groups.weight_decay_of(name) == theirs[name][1]
    assert groups.log_lines() == logs
    return mm


TYPEWISE = [
    dict(norm_decay_mult=0.0),
    dict(bias_lr_mult=2.0, bias_decay_mult=0.5),
    dict(dwconv_decay_mult=0.3),
    dict(flat_decay_mult=0.0),
    dict(
        bias_lr_mult=2.0,
        bias_decay_mult=0.5,
        norm_decay_mult=0.0,
        dwconv_decay_mult=0.3,
        flat_decay_mult=0.1,
    ),
    dict(bias_decay_mult=0.0, flat_decay_mult=0.5),  # dw bias: bias rule wins over dwconv
]

CUSTOM = [
    # the documented example: the longer key wins
    dict(
        custom_keys={
            "backbone.layer0": dict(lr_mult=0, decay_mult=0),
            "backbone": dict(lr_mult=1),
            "head": dict(lr_mult=0.1),
        }
    ),
    # a custom match turns the type-wise rules off for that param
    dict(
        custom_keys={"head": dict(lr_mult=0.1, decay_mult=2.0)},
        norm_decay_mult=0.0,
        bias_lr_mult=2.0,
        flat_decay_mult=0.3,
    ),
    # equal lengths: alphabetical order decides ('1.bias' < 'layer1')
    dict(custom_keys={"layer1": dict(lr_mult=0.5), "1.bias": dict(lr_mult=0.25, decay_mult=3.0)}),
    # a top-level param is matched as '.gamma'
    dict(custom_keys={".gamma": dict(lr_mult=3.0), "scale": dict(decay_mult=0.0)}),
]


@pytest.mark.parametrize(
    "cfg",
    TYPEWISE + CUSTOM,
    ids=lambda c: ",".join(sorted(c)) + str(sorted(c.get("custom_keys", {}))),
)
def test_paramwise_matches_mmengine(cfg, monkeypatch):
    model = make_net()
    groups = paramwise(model, lr=LR, weight_decay=WD, **cfg)
    assert_matches_mmengine(groups, model, cfg, monkeypatch)
    assert groups.skipped == (("backbone.frozen.weight", "requires_grad=False"),)
    assert groups.names == tuple(n for n, p in model.named_parameters() if p.requires_grad)


def test_paramwise_golden_rules():
    g = paramwise(
        make_net(),
        lr=LR,
        weight_decay=WD,
        bias_lr_mult=2.0,
        bias_decay_mult=0.5,
        norm_decay_mult=0.0,
        dwconv_decay_mult=0.3,
        flat_decay_mult=0.1,
    )
    assert g["backbone.bn0.weight"].rule == "norm_decay_mult"
    assert (g.lr_of("backbone.bn0.bias"), g.weight_decay_of("backbone.bn0.bias")) == (
        LR,
        0.0,
    )  # norm: no bias_lr_mult
    assert g["backbone.layer0.bias"].rule == "bias_lr_mult + bias_decay_mult"
    assert (g.lr_of("backbone.layer0.bias"), g.weight_decay_of("backbone.layer0.bias")) == (
        LR * 2.0,
        WD * 0.5,
    )
    assert g["backbone.dw.weight"].rule == "dwconv_decay_mult"
    assert g["backbone.dw.bias"].rule == "bias_lr_mult + bias_decay_mult"  # bias > dwconv
    assert g["backbone.scale"].rule == "flat_decay_mult"
    assert g["backbone.ln.weight"].rule == "norm_decay_mult"  # norm > flat
    assert g["backbone.layer1.weight"].rule == "default"
    assert (g["backbone.bn0.weight"].lr_mult, g["backbone.bn0.weight"].decay_mult) == (1.0, 0.0)
    assert "backbone.frozen.weight" not in g
    with pytest.raises(KeyError, match="requires_grad=False"):
        g.lr_of("backbone.frozen.weight")
    with pytest.raises(KeyError, match="no param named"):
        g.lr_of("nope")


def test_doc_toy_model_log_lines(monkeypatch):
    """T12 / T13: the log lines of MMEngine's paramwise_cfg docs, on their ToyModel."""
    model = ToyModel()
    g = paramwise(model, lr=LR, weight_decay=WD, norm_decay_mult=0)
    assert g.log_lines() == [
        "paramwise_options -- head.bn.weight:weight_decay=0.0",
        "paramwise_options -- head.bn.bias:weight_decay=0.0",
    ]
    assert_matches_mmengine(g, model, dict(norm_decay_mult=0), monkeypatch)

    keys = {
        "backbone.layer0": dict(lr_mult=0, decay_mult=0),
        "backbone": dict(lr_mult=1),
        "head": dict(lr_mult=0.1),
    }
    g = paramwise(model, lr=LR, weight_decay=WD, custom_keys=keys)
    lines = g.log_lines()
    assert lines[:4] == [
        "paramwise_options -- backbone.layer0.weight:lr=0.0",
        "paramwise_options -- backbone.layer0.weight:weight_decay=0.0",
        "paramwise_options -- backbone.layer0.weight:lr_mult=0",
        "paramwise_options -- backbone.layer0.weight:decay_mult=0",
    ]
    assert "paramwise_options -- backbone.layer1.bias:lr=0.01" in lines
    assert "paramwise_options -- head.bn.bias:lr=0.001" in lines
    assert g.lr_of("head.linear.weight") == 0.001
    assert_matches_mmengine(g, model, dict(custom_keys=keys), monkeypatch)


def test_custom_keys_substring_surprise(monkeypatch):
    """'head' is matched as a substring: it also catches backbone.head_proj.* (MMEngine does the same)."""
    model = make_net()
    cfg = dict(custom_keys={"head": dict(lr_mult=0.1)})
    g = paramwise(model, lr=LR, weight_decay=WD, **cfg)
    mm = assert_matches_mmengine(g, model, cfg, monkeypatch)
    assert mm["backbone.head_proj.weight"]["lr"] == LR * 0.1
    assert g.lr_of("backbone.head_proj.weight") == LR * 0.1
    assert "substring inside a name component" in g["backbone.head_proj.weight"].rule
    assert g["head.0.weight"].rule == "custom_keys['head']"
    assert "substring inside" in str(g)


def test_custom_keys_extra_options_go_to_the_group(monkeypatch):
    model = make_net()
    cfg = dict(custom_keys={"head.0": dict(lr_mult=0.1, momentum=0.5)})
    g = paramwise(model, lr=LR, weight_decay=WD, **cfg)
    _, mm, _ = mmengine_build(model, cfg, monkeypatch, momentum=0.9)
    for s in g:
        assert dict(s.options).get("momentum", 0.9) == mm[s.name]["momentum"]
    labels = g.labels()
    assert labels["head.0.weight"] == labels["head.0.bias"] != labels["head.1.weight"]
    assert "momentum=0.5" in labels["head.0.weight"]


# ---------------------------------------------------------------- DCN (mmcv stand-ins)
class DeformConv2d(nn.Module):
    """Stand-in with mmcv's class name and layout (a ``conv_offset`` child conv)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.bias = nn.Parameter(torch.zeros(4))
        self.conv_offset = nn.Conv2d(4, 18, 3)
        self.extra = nn.Linear(4, 4)  # any child of a DCN module counts as "in a DCN"


class ModulatedDeformConv2d(DeformConv2d):
    pass


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):  # mmcv's subclasses are DCNs too
    pass


class DcnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.dcn = DeformConv2d()
        self.neck = nn.Sequential(ModulatedDeformConv2dPack())
        self.conv = nn.Conv2d(4, 4, 1)
        self.norm = nn.BatchNorm2d(4)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(
            bias_lr_mult=2.0,
            dcn_offset_lr_mult=0.1,
            bias_decay_mult=0.5,
            flat_decay_mult=0.3,
            dwconv_decay_mult=0.7,
        ),
        dict(dcn_offset_lr_mult=0.1, norm_decay_mult=0.0, flat_decay_mult=0.0),
        dict(bias_lr_mult=3.0, custom_keys={"neck": dict(lr_mult=0.2)}, dcn_offset_lr_mult=0.1),
    ],
)
def test_dcn_offset_rules_match_mmengine(cfg, monkeypatch):
    fake_ops = types.ModuleType("mmcv.ops")
    fake_ops.DeformConv2d = DeformConv2d
    fake_ops.ModulatedDeformConv2d = ModulatedDeformConv2d
    monkeypatch.setitem(sys.modules, "mmcv", types.ModuleType("mmcv"))
    monkeypatch.setitem(sys.modules, "mmcv.ops", fake_ops)
    monkeypatch.setattr(dc, "mmcv_full_available", lambda: True)
    torch.manual_seed(0)
    model = DcnNet()
    g = paramwise(model, lr=LR, weight_decay=WD, **cfg)
    assert_matches_mmengine(g, model, cfg, monkeypatch)
    if "custom_keys" not in cfg:
        assert g["dcn.conv_offset.bias"].rule.startswith("dcn_offset_lr_mult")
        assert g.lr_of("dcn.conv_offset.weight") == LR * 0.1


# ---------------------------------------------------------------- duplicates
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # a shared param
        self.block = nn.Sequential(self.a)  # a shared module under another parent


def test_bypass_duplicate(monkeypatch):
    model = Tied()
    cfg = dict(bypass_duplicate=True, bias_lr_mult=2.0)
    g = paramwise(model, lr=LR, weight_decay=WD, **cfg)
    assert_matches_mmengine(g, model, cfg, monkeypatch)
    assert [n for n, _ in g.skipped] == ["b.weight", "block.0.weight", "block.0.bias"]
    with pytest.raises(
        ValueError, match=r"'b.weight' is the same tensor as 'a.weight'.*bypass_duplicate=True"
    ):
        paramwise(model, lr=LR, weight_decay=WD, bias_lr_mult=2.0)
    with pytest.raises(ValueError):  # MMEngine fails too (torch rejects a param in two groups)
        mmengine_build(model, dict(bias_lr_mult=2.0), monkeypatch)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(norm_decay_mult=0.0), ValueError, r"norm_decay_mult=0.0 .*weight_decay is 0"),
        (dict(flat_decay_mult=0.5), ValueError, r"flat_decay_mult=0.5"),
        (
            dict(custom_keys={"head": dict(decay_mult=0)}),
            ValueError,
            r"custom_keys\['head'\]\['decay_mult'\]=0",
        ),
    ],
)
def test_decay_mult_without_weight_decay(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        paramwise(make_net(), lr=LR, **kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            dict(bias_lr_mult=-1.0),
            ValueError,
            r"bias_lr_mult must be a finite number >= 0, got -1.0",
        ),
        (dict(dwconv_decay_mult="0"), TypeError, r"dwconv_decay_mult must be a number, got '0'"),
        (dict(bias_decay_mult=math.nan), ValueError, r"bias_decay_mult"),
        (dict(custom_keys=["head"]), TypeError, r"custom_keys must be a dict"),
        (dict(custom_keys={"head": 0.1}), TypeError, r"custom_keys\['head'\] must be a dict"),
        (
            dict(custom_keys={"head": dict(lr=0.1)}),
            ValueError,
            r"custom_keys\['head'\] sets 'lr'=0.1; give lr_mult",
        ),
        (
            dict(custom_keys={"head": dict(lr_mult=-2)}),
            ValueError,
            r"custom_keys\['head'\]\['lr_mult'\] must be",
        ),
        (dict(lr=-0.1), ValueError, r"invalid lr -0.1"),
        (dict(lr="0.1"), TypeError, r"lr must be a number or a schedule"),
        (dict(bypass_duplicate=1), TypeError, r"bypass_duplicate must be a bool"),
    ],
)
def test_paramwise_errors_name_the_option(kwargs, exc, match):
    kwargs = dict(dict(lr=LR, weight_decay=WD), **kwargs)
    with pytest.raises(exc, match=match):
        paramwise(make_net(), **kwargs)


def test_table_and_repr():
    g = paramwise(
        make_net(),
        lr=LR,
        weight_decay=WD,
        norm_decay_mult=0.0,
        custom_keys={"head": dict(lr_mult=0.1)},
    )
    text = str(g)
    lines = text.splitlines()
    assert lines[0].startswith("paramwise: ")
    assert lines[1].split() == [
        "name",
        "shape",
        "lr",
        "weight_decay",
        "lr_mult",
        "decay_mult",
        "rule",
    ]
    assert sum(
        1 for ln in lines if ln.startswith(("backbone.", "head.", "gamma", "unused."))
    ) == len(g)
    row = next(ln for ln in lines if ln.startswith("backbone.bn0.weight "))
    assert row.split()[1:6] == ["8", "0.01", "0", "1", "0"]
    assert "skipped: backbone.frozen.weight (requires_grad=False)" in text
    assert g.table() == text
    assert repr(g).startswith("ParamGroups(paramwise: ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.lr = 1.0


# ---------------------------------------------------------------- layer decay
class Block(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pwconv = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        y = self.pwconv(self.norm(self.dwconv(x).permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A tiny backbone with ConvNeXt's (MMDet/mmcls) param names; stage 2 has 6 blocks."""

    def __init__(self, depths=(1, 1, 6, 1), d=4):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3 if i == 0 else d, d, 1), nn.GroupNorm(1, d))
                for i in range(4)
            ]
        )
        self.stages = nn.ModuleList([nn.Sequential(*[Block(d) for _ in range(n)]) for n in depths])
        self.pos_embed = nn.Parameter(torch.zeros(1, d, 1, 1))  # qualified name: decayed by MMDet

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x) + self.pos_embed)
        return x.mean((2, 3))


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ConvNeXt()
        self.cls_token = nn.Parameter(torch.zeros(1, 4))  # unqualified 'cls_token': no decay
        self.neck = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def forward(self, x):
        return self.head(torch.relu(self.neck(self.backbone(x) + self.cls_token)))


# MMDet's code (mmdet/core/optimizers/layer_decay_optimizer_constructor.py), transcribed as
# the reference: logging and the mmcv base class dropped, the group logic unchanged.
def mmdet_get_layer_id_for_convnext(var_name, max_layer_id):
    if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    elif var_name.startswith("backbone.downsample_layers"):
        stage_id = int(var_name.split(".")[2])
        if stage_id == 0:
            layer_id = 0
        elif stage_id == 1:
            layer_id = 2
        elif stage_id == 2:
            layer_id = 3
        elif stage_id == 3:
            layer_id = max_layer_id
        return layer_id
    elif var_name.startswith("backbone.stages"):
        stage_id = int(var_name.split(".")[2])
        block_id = int(var_name.split(".")[3])
        if stage_id == 0:
            layer_id = 1
        elif stage_id == 1:
            layer_id = 2
        elif stage_id == 2:
            layer_id = 3 + block_id // 3
        elif stage_id == 3:
            layer_id = max_layer_id
        return layer_id
    else:
        return max_layer_id + 1


def mmdet_get_stage_id_for_convnext(var_name, max_stage_id):
    if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    elif var_name.startswith("backbone.downsample_layers"):
        return 0
    elif var_name.startswith("backbone.stages"):
        stage_id = int(var_name.split(".")[2])
        return stage_id + 1
    else:
        return max_stage_id - 1


def mmdet_param_groups(module, base_lr, base_wd, paramwise_cfg):
    parameter_groups = {}
    num_layers = paramwise_cfg.get("num_layers") + 2
    decay_rate = paramwise_cfg.get("decay_rate")
    decay_type = paramwise_cfg.get("decay_type", "layer_wise")
    weight_decay = base_wd
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights
        if len(param.shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"):
            group_name = "no_decay"
            this_weight_decay = 0.0
        else:
            group_name = "decay"
            this_weight_decay = weight_decay
        if "layer_wise" in decay_type:
            if "ConvNeXt" in module.backbone.__class__.__name__:
                layer_id = mmdet_get_layer_id_for_convnext(name, paramwise_cfg.get("num_layers"))
            else:
                raise NotImplementedError()
        elif decay_type == "stage_wise":
            if "ConvNeXt" in module.backbone.__class__.__name__:
                layer_id = mmdet_get_stage_id_for_convnext(name, num_layers)
            else:
                raise NotImplementedError()
        group_name = f"layer_{layer_id}_{group_name}"
        if group_name not in parameter_groups:
            scale = decay_rate ** (num_layers - layer_id - 1)
            parameter_groups[group_name] = {
                "weight_decay": this_weight_decay,
                "params": [],
                "param_names": [],
                "lr_scale": scale,
                "group_name": group_name,
                "lr": scale * base_lr,
            }
        parameter_groups[group_name]["params"].append(param)
        parameter_groups[group_name]["param_names"].append(name)
    return list(parameter_groups.values())


def by_name(mmdet_groups):
    return {n: g for g in mmdet_groups for n in g["param_names"]}


@pytest.mark.parametrize("decay_type", ["layer_wise", "stage_wise"])
def test_layer_decay_matches_mmdet(decay_type):
    torch.manual_seed(0)
    model = Detector()
    cfg = dict(decay_rate=0.95, decay_type=decay_type, num_layers=6)
    g = layer_decay(model, lr=1e-4, weight_decay=0.05, **cfg)
    ref = by_name(mmdet_param_groups(model, 1e-4, 0.05, cfg))
    assert set(g.names) == set(ref)
    assert g.names == tuple(n for n, p in model.named_parameters() if p.requires_grad)
    for s in g:
        r = ref[s.name]
        assert (s.lr, s.weight_decay, s.group, s.lr_mult) == (
            r["lr"],
            r["weight_decay"],
            r["group_name"],
            r["lr_scale"],
        ), s.name
    assert g.skipped == (("frozen", "requires_grad=False"),)
    # build() groups params exactly as MMDet does (one label per MMDet group)
    groups = {grp.label: set(grp.names) for grp in g.groups()}
    assert groups == {
        rg["group_name"]: set(rg["param_names"])
        for rg in mmdet_param_groups(model, 1e-4, 0.05, cfg)
    }


def test_layer_decay_golden_numbers():
    """FEATURES C5: decay_rate 0.95, num_layers 6 -> scale(id) = 0.95 ** (7 - id); lr 1e-4 -> 6.9834e-5 at id 0."""
    g = layer_decay(Detector(), lr=1e-4, weight_decay=0.05, decay_rate=0.95, num_layers=6)
    golden = {
        0: 0.69834,
        1: 0.73509,
        2: 0.77378,
        3: 0.81451,
        4: 0.85737,
        5: 0.9025,
        6: 0.95,
        7: 1.0,
    }
    ids = {
        "backbone.pos_embed": 0,
        "backbone.downsample_layers.0.0.weight": 0,
        "backbone.stages.0.0.pwconv.weight": 1,
        "backbone.downsample_layers.1.0.weight": 2,
        "backbone.stages.1.0.dwconv.weight": 2,
        "backbone.downsample_layers.2.0.weight": 3,
        "backbone.stages.2.2.pwconv.weight": 3,
        "backbone.stages.2.3.pwconv.weight": 4,
        "backbone.stages.2.5.norm.weight": 4,
        "backbone.downsample_layers.3.0.weight": 6,
        "backbone.stages.3.0.pwconv.weight": 6,
        "neck.weight": 7,
        "head.weight": 7,
        "cls_token": 7,
    }
    for name, lid in ids.items():
        assert g[name].lr_mult == pytest.approx(golden[lid], abs=5e-6), name
        assert g[name].group.startswith(f"layer_{lid}_")
    assert g.lr_of("backbone.downsample_layers.0.0.weight") == pytest.approx(6.9834e-5, rel=1e-4)
    assert g.lr_of("head.weight") == 1e-4
    # no-decay rules: 1-D, '.bias', unqualified pos_embed/cls_token; 'backbone.pos_embed' is decayed
    assert g.weight_decay_of("backbone.stages.0.0.gamma") == 0.0  # 1-D
    assert g.weight_decay_of("backbone.stages.0.0.norm.weight") == 0.0  # 1-D
    assert g.weight_decay_of("head.bias") == 0.0
    assert g.weight_decay_of("cls_token") == 0.0
    assert g["cls_token"].rule.endswith("no_decay: cls_token")
    assert g.weight_decay_of("backbone.pos_embed") == 0.05
    assert g.weight_decay_of("backbone.stages.2.0.pwconv.weight") == 0.05
    assert g["backbone.stages.2.0.pwconv.bias"].decay_mult == 0.0
    assert str(g).startswith("layer_decay(convnext layer_wise, decay_rate=0.95, num_layers=6)")


def test_layer_decay_user_function():
    def lid(name):
        return 0 if name.startswith("backbone.") else 3

    g = layer_decay(
        Detector(), lr=0.1, weight_decay=0.01, decay_rate=0.5, num_layers=2, layer_id=lid
    )
    assert g.lr_of("backbone.stages.0.0.pwconv.weight") == 0.5**3 * 0.1
    assert g.lr_of("neck.weight") == 0.1
    assert g.weight_decay_of("neck.weight") == 0.01
    with pytest.warns(UserWarning, match="layer id 9, outside 0..3"):
        layer_decay(
            Detector(), lr=0.1, weight_decay=0.0, decay_rate=0.5, num_layers=2, layer_id=lambda n: 9
        )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            dict(decay_type="block_wise"),
            ValueError,
            r"decay_type must be 'layer_wise' or 'stage_wise', got 'block_wise'",
        ),
        (dict(layer_id="vit"), ValueError, r"layer_id must be 'convnext' or a function"),
        (
            dict(layer_id=lambda n: 0, decay_type="stage_wise"),
            ValueError,
            r"decay_type='stage_wise' picks a built-in",
        ),
        (dict(layer_id=lambda n: "0"), TypeError, r"returned '0', expected an int"),
        (dict(decay_rate=0), ValueError, r"decay_rate must be a number > 0, got 0"),
        (dict(num_layers=-1), ValueError, r"num_layers must be an int >= 0, got -1"),
        (dict(weight_decay=-1.0), ValueError, r"invalid weight_decay -1.0"),
    ],
)
def test_layer_decay_errors(kwargs, exc, match):
    kwargs = dict(dict(lr=1e-4, weight_decay=0.05, decay_rate=0.95, num_layers=6), **kwargs)
    with pytest.raises(exc, match=match):
        layer_decay(Detector(), **kwargs)


def test_layer_decay_convnext_needs_convnext_names():
    with pytest.raises(ValueError, match="expects ConvNeXt param names"):
        layer_decay(make_net(), lr=1e-4, weight_decay=0.05, decay_rate=0.95, num_layers=6)


# ---------------------------------------------------------------- build(): bitwise vs torch.optim
def functional_copy(model):
    return {
        n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()
    }


def train_both(model, torch_opt, tx, steps=5, *, x_shape=(4, 3, 8, 8), set_lr=None):
    """Train ``model`` with ``torch_opt`` and a copy with ``tx``; return both params."""
    fmodel = copy.deepcopy(model)
    params = functional_copy(model)
    trainable = [n for n, p in params.items() if p.requires_grad]
    state = tx.init({n: params[n] for n in trainable})
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(x_shape, generator=gen)
        if set_lr is not None:
            set_lr(t)
        torch_opt.zero_grad()
        (model(x) ** 2).mean().backward()
        torch_opt.step()
        loss = (torch.func.functional_call(fmodel, params, (x,)) ** 2).mean()
        grads = torch.autograd.grad(loss, [params[n] for n in trainable], allow_unused=True)
        grads = {n: g for n, g in zip(trainable, grads) if g is not None}
        params, state = step_params(tx, grads, state, params, step=t)
    return dict(model.named_parameters()), params, state


BUILD_CFG = dict(
    custom_keys={
        "backbone.layer0": dict(lr_mult=0, decay_mult=0),
        "head": dict(lr_mult=0.1),
        "unused": dict(lr_mult=0.5),
    },
    norm_decay_mult=0.0,
    bias_lr_mult=2.0,
    dwconv_decay_mult=0.3,
    flat_decay_mult=0.1,
)


@pytest.mark.parametrize("which", ["sgd", "adamw"])
def test_build_bitwise_vs_torch(which, monkeypatch):
    model = make_net()
    g = paramwise(model, lr=LR, weight_decay=WD, **BUILD_CFG)
    if which == "sgd":
        _, mm, _ = mmengine_build(model, BUILD_CFG, monkeypatch, momentum=0.9)
        tx = g.build(sgd, momentum=0.9)
        make = lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9, foreach=True)  # noqa: E731
    else:
        _, mm, _ = mmengine_build(model, BUILD_CFG, monkeypatch, optimizer="AdamW")
        tx = g.build(adamw)
        make = lambda groups: torch.optim.AdamW(groups, lr=LR, foreach=True)  # noqa: E731
    # torch gets MMEngine's per-param lr / weight decay, one group per param
    torch_groups = [
        dict(params=[p], lr=mm[n]["lr"], weight_decay=mm[n]["weight_decay"])
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    init = functional_copy(make_net())
    ref, ours, _ = train_both(model, make(torch_groups), tx)
    assert ref.keys() == ours.keys()
    for n in ref:
        assert torch.equal(ref[n], ours[n]), n
    moved = {n for n in ours if not torch.equal(ours[n], init[n])}
    assert len(moved) > 10
    assert "backbone.layer0.weight" not in moved  # lr_mult 0
    assert "backbone.frozen.weight" not in moved and "unused.weight" not in moved


def test_build_layer_decay_bitwise_vs_torch():
    torch.manual_seed(0)
    model = Detector()
    cfg = dict(decay_rate=0.9, num_layers=6)
    g = layer_decay(model, lr=1e-3, weight_decay=0.05, **cfg)
    ref_groups = mmdet_param_groups(model, 1e-3, 0.05, cfg)
    opt = torch.optim.AdamW(
        [
            {k: v for k, v in rg.items() if k in ("params", "lr", "weight_decay")}
            for rg in ref_groups
        ],
        lr=1e-3,
        foreach=True,
    )
    ref, ours, state = train_both(model, opt, g.build(adamw), steps=3, x_shape=(2, 3, 4, 4))
    for n in ref:
        assert torch.equal(ref[n], ours[n]), n
    assert set(state.inner) == {rg["group_name"] for rg in ref_groups}


def test_build_with_scheduled_lr_scales_each_group():
    model = make_net()
    g = paramwise(
        model,
        lr=LR,
        weight_decay=WD,
        custom_keys={"head": dict(lr_mult=0.1), "backbone.layer0": dict(lr_mult=0)},
        norm_decay_mult=0.0,
    )

    def sched(step):
        return 0.05 * 0.5**step

    plan = {grp.label: grp for grp in g.groups(lr=sched)}
    assert plan["default"].lr is sched  # mult 1 keeps the schedule itself
    head = plan[g.labels()["head.0.weight"]]
    assert isinstance(head.lr, Scaled) and head.lr(3) == 0.1 * sched(3)
    assert plan[g.labels()["backbone.layer0.weight"]].lr == 0.0
    assert plan[g.labels()["backbone.bn0.weight"]].weight_decay == 0.0

    tx = g.build(sgd, lr=sched, momentum=0.9)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params_of = dict(model.named_parameters())
    torch_groups = [
        dict(params=[params_of[n] for n in grp.names], weight_decay=grp.weight_decay)
        for grp in plan.values()
    ]
    opt = torch.optim.SGD(torch_groups, lr=sched(0), momentum=0.9, foreach=True)

    def set_lr(t):
        for tg, grp in zip(opt.param_groups, plan.values()):
            tg["lr"] = grp.lr_mult * sched(t)

    ref, ours, state = train_both(model, opt, tx, steps=4, set_lr=set_lr)
    for n in names:
        assert torch.equal(ref[n], ours[n]), n
    metrics = collect_metrics(state)
    assert metrics["default/lr"] == sched(3)
    assert metrics[f"{g.labels()['head.0.weight']}/lr"] == 0.1 * sched(3)


@pytest.mark.parametrize(
    "cfg",
    [{}, dict(bias_lr_mult=1.0), dict(bypass_duplicate=True), dict(custom_keys={}), BUILD_CFG],
    ids=["no option", "a mult of 1", "bypass_duplicate", "empty custom_keys", "every rule"],
)
def test_build_reports_base_lr_as_mmengine_optim_wrapper(cfg, monkeypatch):
    """MMEngine's constructor makes one param group per param given any paramwise_cfg (one for
    the model without); with several, its OptimWrapper's get_lr() has ``base_lr``: the
    optimizer's lr, scheduled like the groups (a warm-up here), without any mult. The state of
    `ParamGroups.build` reports the same value each update, in its metrics (before the groups'
    lrs) and `optim.hyperparams`; with one group, neither has it."""
    from mmengine.optim import LinearLR, OptimWrapper

    model = make_net()
    mm_opt, _, _ = mmengine_build(model, cfg, monkeypatch)
    wrapper = OptimWrapper(mm_opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warmup = LinearLR(wrapper, start_factor=0.25, by_epoch=False, begin=0, end=4)
    g = paramwise(model, lr=LR, weight_decay=WD, **cfg)
    assert g.mmengine_groups == len(mm_opt.param_groups)
    tx = g.build(sgd, lr=S.linear(LR, start_factor=0.25, end=4))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if n in g}
    state = tx.init(params)
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    for t in range(6):
        want = wrapper.get_lr()  # what RuntimeInfoHook logs for update t
        params, state = step_params(tx, grads, state, params, step=t)
        metrics, hyper = collect_metrics(state), hyperparams(state)
        if len(mm_opt.param_groups) == 1:
            assert "base_lr" not in want and "base_lr" not in metrics and "base_lr" not in hyper
        else:
            assert metrics["base_lr"] == hyper["base_lr"] == pytest.approx(want["base_lr"][0])
            assert list(metrics)[0] == "base_lr"
        warmup.step()
    assert want["lr"][0] == pytest.approx(LR)  # the warm-up is over


def test_layer_decay_counts_mmdets_param_groups():
    """MMDet's layer decay makes one param group per group name: several, so base_lr is logged."""
    torch.manual_seed(0)
    model = Detector()
    cfg = dict(decay_rate=0.9, num_layers=6)
    g = layer_decay(model, lr=1e-3, weight_decay=0.05, **cfg)
    assert g.mmengine_groups == len(mmdet_param_groups(model, 1e-3, 0.05, cfg)) > 1
    state = g.build(adamw).init({n: p.detach() for n, p in model.named_parameters() if n in g})
    assert collect_metrics(state)["base_lr"] == 1e-3


def test_schedule_as_constructor_base():
    def sched(step):
        return 0.1 / (1 + step)

    g = paramwise(make_net(), lr=sched, weight_decay=WD, bias_lr_mult=2.0)
    assert g.lr_of("backbone.layer1.weight") is sched
    bias_lr = g.lr_of("backbone.layer1.bias")
    assert isinstance(bias_lr, Scaled) and bias_lr(4) == 2.0 * sched(4)
    assert "(sched)" in str(g)
    tx = g.build(sgd)  # uses the constructor's schedule
    params = {n: p.detach().clone() for n, p in make_net().named_parameters() if p.requires_grad}
    state = tx.init(params)
    _, state = step_params(
        tx, {n: torch.ones_like(p) for n, p in params.items()}, state, params, step=2
    )
    lrs = {k: v for k, v in collect_metrics(state).items() if k.endswith("/lr")}
    assert sorted(lrs.values()) == [sched(2), 2.0 * sched(2)]


def test_build_errors():
    g = paramwise(
        make_net(),
        lr=LR,
        weight_decay=WD,
        custom_keys={"head": dict(lr_mult=0.1, betas=(0.9, 0.99))},
    )
    with pytest.raises(
        TypeError,
        match=r"ParamGroups.build: sgd\(.*betas=\(0.9, 0.99\)\) for group .*'backbone.head_proj.weight'",
    ):
        g.build(sgd)
    with pytest.raises(ValueError, match="invalid lr -1"):
        g.build(sgd, lr=-1.0)
    with pytest.raises(TypeError, match="optimizer must be a function"):
        g.build("sgd")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable params \(skipped: \['weight', 'bias'\]\)"):
        paramwise(frozen, lr=LR).build(sgd)


# ---------------------------------------------------------------- schedules per group vs MMEngine
ms = pytest.importorskip("mmengine.optim.scheduler")

GROUP_CFG = dict(custom_keys={"head": dict(lr_mult=10.0, decay_mult=2.0)}, bias_lr_mult=2.0)
N_STEPS = 40


def _mm_group_values(model, paramwise_cfg, makers, monkeypatch, key="lr", n=N_STEPS, **opt):
    """name -> the value MMEngine's schedulers put in that param's group before each iteration."""
    cfg = dict(type="SGD", lr=0.05, weight_decay=1e-3, momentum=0.9, **opt)
    monkeypatch.setattr(dc, "print_log", lambda *a, **k: None)
    wrapper = dc.DefaultOptimWrapperConstructor(dict(optimizer=cfg), paramwise_cfg)(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = [make(wrapper) for make in makers]
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: g for g in wrapper.optimizer.param_groups for p in g["params"]}
    out: dict[str, list[float]] = {name: [] for name in groups}
    for _ in range(n):
        for name, g in groups.items():
            out[name].append(g[key])
        wrapper.optimizer.step()  # no grads: a no-op update
        for s in scheds:
            s.step()
    return out


SCHEDULE_CASES = [
    (
        "poly eta_min",
        S.poly(0.05, eta_min=1e-3, power=1.0, end=30),
        [lambda o: ms.PolyLR(o, eta_min=1e-3, power=1.0, begin=0, end=30, by_epoch=False)],
    ),
    (
        "poly power 2",
        S.poly(0.05, eta_min=2e-3, power=2.0, begin=5, end=35),
        [lambda o: ms.PolyLR(o, eta_min=2e-3, power=2.0, begin=5, end=35, by_epoch=False)],
    ),
    (
        "cosine eta_min",
        S.cosine(0.05, eta_min=5e-3, end=30),
        [lambda o: ms.CosineAnnealingLR(o, T_max=30, eta_min=5e-3, end=30, by_epoch=False)],
    ),
    (
        "cosine eta_min_ratio",
        S.cosine(0.05, eta_min_ratio=0.1, end=30),
        [lambda o: ms.CosineAnnealingLR(o, T_max=30, eta_min_ratio=0.1, end=30, by_epoch=False)],
    ),
    (
        "warmup + cosine eta_min",
        S.join(S.linear(0.05, 0.1, 1.0, end=6), S.cosine(0.05, eta_min=1e-3, begin=5, end=40)),
        [
            lambda o: ms.LinearLR(o, start_factor=0.1, end=6, by_epoch=False),
            lambda o: ms.CosineAnnealingLR(
                o, T_max=35, eta_min=1e-3, begin=5, end=40, by_epoch=False
            ),
        ],
    ),
    (
        "cosine_restart eta_min",
        S.cosine_restart(0.05, periods=(10, 20), restart_weights=(1.0, 0.5), eta_min=1e-3),
        [
            lambda o: ms.CosineRestartLR(
                o, periods=[10, 20], restart_weights=[1.0, 0.5], eta_min=1e-3, by_epoch=False
            )
        ],
    ),
    (
        "onecycle",
        S.onecycle(0.05, eta_max=0.3, total_steps=40),
        [lambda o: ms.OneCycleLR(o, eta_max=0.3, total_steps=40, by_epoch=False)],
    ),
    (
        "multistep",
        S.multistep(0.05, milestones=(10, 25), gamma=0.2),
        [lambda o: ms.MultiStepLR(o, milestones=[10, 25], gamma=0.2, by_epoch=False)],
    ),
]


@pytest.mark.parametrize(
    "schedule,makers", [c[1:] for c in SCHEDULE_CASES], ids=[c[0] for c in SCHEDULE_CASES]
)
def test_scheduled_lr_per_group_matches_mmengine(schedule, makers, monkeypatch):
    """Each group runs the schedule on its own initial lr: floors and onecycle stay absolute."""
    model = make_net()
    theirs = _mm_group_values(model, GROUP_CFG, makers, monkeypatch)
    g = paramwise(model, lr=0.05, weight_decay=1e-3, **GROUP_CFG)
    lrs = {grp.label: grp.lr for grp in g.groups(lr=schedule)}
    labels = g.labels()
    mults = {s.name: s.lr_mult for s in g}
    assert set(mults.values()) == {1.0, 2.0, 10.0}
    for name, want in theirs.items():
        lr = lrs[labels[name]]
        got = [lr(t) for t in range(N_STEPS)]
        for t, (a, b) in enumerate(zip(got, want)):
            assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15), (name, t, a, b)


def test_scheduled_lr_floor_is_absolute_the_issue_numbers(monkeypatch):
    """Issue 11: PolyLR(eta_min=0.001) takes a lr_mult=10 group from 0.5 to 0.001 (not 0.01)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    cfg = dict(custom_keys={"1.": dict(lr_mult=10.0)})
    poly = S.poly(0.05, eta_min=1e-3, end=10)
    theirs = _mm_group_values(
        model,
        cfg,
        [lambda o: ms.PolyLR(o, eta_min=1e-3, begin=0, end=10, by_epoch=False)],
        monkeypatch,
        n=12,
    )
    g = paramwise(model, lr=0.05, **cfg)
    fast = g.groups(lr=poly)[1]
    assert fast.names == ("1.weight", "1.bias") and fast.lr_mult == 10.0
    assert theirs["1.weight"][0] == 0.5 and theirs["1.weight"][-1] == 0.001
    assert fast.lr(0) == 0.5 and fast.lr(11) == 0.001
    assert math.isclose(fast.lr(1), theirs["1.weight"][1], rel_tol=1e-12)  # 0.44455..., not 0.4455
    assert repr(fast.lr).startswith("10.0 * Poly(")


def test_scheduled_weight_decay_per_group_matches_mmengine(monkeypatch):
    """decay_mult rebuilds a weight-decay schedule the same way (MMEngine's generic scheduler)."""
    model = make_net()
    makers = [
        lambda o: ms.CosineAnnealingParamScheduler(
            o, "weight_decay", T_max=30, eta_min=1e-4, end=30, by_epoch=False
        )
    ]
    theirs = _mm_group_values(model, GROUP_CFG, makers, monkeypatch, key="weight_decay")
    g = paramwise(model, lr=0.05, weight_decay=1e-3, **GROUP_CFG)
    wds = {
        grp.label: grp.weight_decay
        for grp in g.groups(weight_decay=S.cosine(1e-3, eta_min=1e-4, end=30))
    }
    labels = g.labels()
    assert {s.decay_mult for s in g} == {1.0, 2.0}
    for name, want in theirs.items():
        got = [wds[labels[name]](t) for t in range(N_STEPS)]
        for t, (a, b) in enumerate(zip(got, want)):
            assert math.isclose(a, b, rel_tol=1e-12), (name, t, a, b)


def test_scale_lr_then_paramwise_matches_mmengine(monkeypatch):
    """auto_scale_lr's scaled base, then a group's mult: MMEngine builds schedulers on lr * scale * mult."""
    from fengine.optim import scale_lr

    model = make_net()
    scaled = scale_lr(S.cosine(0.025, eta_min=1e-3, end=30), base_batch_size=16, batch_size=32)
    assert scaled.base == 0.05
    makers = [lambda o: ms.CosineAnnealingLR(o, T_max=30, eta_min=1e-3, end=30, by_epoch=False)]
    theirs = _mm_group_values(model, GROUP_CFG, makers, monkeypatch)
    g = paramwise(model, lr=scaled, weight_decay=1e-3, **GROUP_CFG)
    lrs = {grp.label: grp.lr for grp in g.groups()}
    for name, want in theirs.items():
        got = [lrs[g.labels()[name]](t) for t in range(N_STEPS)]
        for t, (a, b) in enumerate(zip(got, want)):
            assert math.isclose(a, b, rel_tol=1e-12), (name, t, a, b)


def test_a_group_without_gradients_reports_its_scheduled_lr_as_mmengine(monkeypatch):
    """The first group (the logged ``lr``) gets no gradient (an unused head): MMEngine's scheduler
    moves its lr anyway and ``get_lr()['lr'][0]`` reports it; it stayed at the step-0 value."""
    import fengine as fe

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(4, 4)  # first param group, unused by the loss
            self.body = nn.Linear(4, 3)

    torch.manual_seed(0)
    model = Net()
    cfg = dict(custom_keys={"aux": dict(lr_mult=0.5)})
    optimizer, _, _ = mmengine_build(model, cfg, monkeypatch, lr=0.1, wd=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = ms.LinearLR(optimizer, start_factor=0.1, end=6, by_epoch=False)
    want = []
    for _ in range(8):
        want.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()

    tx = paramwise(model, lr=0.1, **cfg).build(sgd, lr=S.linear(0.1, 0.1, 1.0, end=6))
    step = fe.train_step(lambda m, b: nn.functional.cross_entropy(m.body(b[0]), b[1]), tx)
    state = step.init(model, seed=0)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    got = []
    for _ in range(8):
        state, metrics = step(state, batch)
        got.append(float(metrics["lr_mult=0.5,decay_mult=1.0/lr"]))
    assert got == pytest.approx(want, rel=1e-12) and got[0] != got[-1]


def test_lr_mult_zero_stays_frozen_under_a_floor_deviation(monkeypatch):
    """Deliberate deviation: MMEngine's PolyLR lifts a lr_mult=0 group to eta_min; fengine keeps 0."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    cfg = dict(custom_keys={"0.": dict(lr_mult=0.0)})
    theirs = _mm_group_values(
        model,
        cfg,
        [lambda o: ms.PolyLR(o, eta_min=1e-3, begin=0, end=10, by_epoch=False)],
        monkeypatch,
        n=12,
    )
    assert theirs["0.weight"][0] == 0.0 and theirs["0.weight"][-1] == 0.001  # MMEngine trains it
    g = paramwise(model, lr=0.05, **cfg)
    frozen = g.groups(lr=S.poly(0.05, eta_min=1e-3, end=10))[0]
    assert frozen.names == ("0.weight", "0.bias") and frozen.lr == 0.0


def test_scaled_opaque_callable_is_multiplied():
    """A plain function has no base to rebuild on: it is multiplied (floors and all)."""
    fn = lambda step: 0.1 / (1 + step)  # noqa: E731
    assert Scaled(3.0, fn)(4) == 3.0 * fn(4)
    sched = S.cosine(0.1, eta_min=0.01, end=10)
    assert Scaled(3.0, sched)(9) != 3.0 * sched(9)
    want = 0.01 + (0.3 - 0.01) * (1 + math.cos(math.pi * 9 / 10)) / 2  # cosine on base 0.3
    assert math.isclose(Scaled(3.0, sched)(9), want, rel_tol=1e-12)


MOMENTUM_CASES = [
    (
        "linear",
        S.linear(0.9, 0.5, end=11),
        [lambda o: ms.LinearMomentum(o, start_factor=0.5, end=11, by_epoch=False)],
    ),
    (
        "linear + cosine eta_min",
        S.join(S.linear(0.9, 0.5, end=11), S.cosine(0.9, eta_min=0.1, begin=10, end=30)),
        [
            lambda o: ms.LinearMomentum(o, start_factor=0.5, end=11, by_epoch=False),
            lambda o: ms.CosineAnnealingMomentum(
                o, T_max=20, eta_min=0.1, begin=10, end=30, by_epoch=False
            ),
        ],
    ),
]


@pytest.mark.parametrize(
    "schedule,makers", [c[1:] for c in MOMENTUM_CASES], ids=[c[0] for c in MOMENTUM_CASES]
)
def test_custom_keys_momentum_option_is_scheduled_as_mmengine(schedule, makers, monkeypatch):
    """``custom_keys`` ``momentum=0.5`` is the group's initial momentum, which MMEngine's momentum
    schedulers run on (0.25 at step 0 under LinearMomentum(start_factor=0.5)): not a constant."""
    model = make_net()
    cfg = dict(custom_keys={"head": dict(lr_mult=2.0, momentum=0.5)})
    theirs = _mm_group_values(model, cfg, makers, monkeypatch, key="momentum", n=32)
    g = paramwise(model, lr=0.05, weight_decay=1e-3, **cfg)
    tx = g.build(sgd, momentum=schedule)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = tx.init(params)
    labels = g.labels()
    assert theirs["head.0.weight"][0] == 0.25 and theirs["backbone.layer0.weight"][0] == 0.45
    for t in range(32):
        grads = {n: torch.ones_like(p) for n, p in params.items()}
        params, state = step_params(tx, grads, state, params, step=t)
        for name, want in theirs.items():
            got = state.inner[labels[name]].momentum
            assert math.isclose(got, want[t], rel_tol=1e-12), (name, t, got, want[t])


def test_custom_keys_momentum_over_a_plateau_momentum_is_reduced_as_mmengine():
    """``momentum=0.5`` for the head over ``rop(0.9)``: MMEngine's ReduceOnPlateauMomentum
    reduces every group's own value (0.09 and 0.05 after one plateau); it was held at 0.5."""
    from mmengine.optim import OptimWrapper
    from mmengine.optim.scheduler import ReduceOnPlateauMomentum

    import fengine as fe
    from fengine import plateau

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    rop = fe.reduce_on_plateau("loss", patience=0, factor=0.1)
    groups = paramwise(model, lr=0.1, custom_keys={"head": dict(momentum=0.5)})
    step = fe.train_step(lambda m, b: m(b).pow(2).mean(), groups.build(sgd, momentum=rop(0.9)), rop)
    state = step.init(model)
    ref = torch.optim.SGD([{"params": model.backbone.parameters(), "momentum": 0.9},
                           {"params": model.head.parameters(), "momentum": 0.5}], lr=0.1)  # fmt: skip
    mm = ReduceOnPlateauMomentum(OptimWrapper(ref), monitor="loss", factor=0.1, patience=0)
    for value in (1.0, 1.0):  # the second validation is no better: one reduction
        state = plateau.observe(state, {"loss": value})
        mm.step({"loss": value})
    state, _ = step(state, torch.randn(8, 4))
    labels = groups.labels()
    got = [state.opt_state.inner[labels[n]].momentum for n in ("backbone.weight", "head.weight")]
    assert got == [g["momentum"] for g in ref.param_groups]


def test_the_table_shows_a_schedules_base_not_its_warm_ups_first_value():
    """``--dry-run``'s table: a warmed-up lr is shown by its base (MMEngine's ``base_lr``,
    0.003), each group's by its share of it; it showed the warm-up's first value (3e-06)."""
    lr = S.warmup(S.cosine(0.003, T_max=100), steps=10, start_factor=1e-3)
    g = paramwise(make_net(), lr=lr, weight_decay=WD, bias_lr_mult=2.0)
    text = str(g)
    assert "base lr=0.003 (sched)" in text
    bias_row = next(r for r in text.splitlines() if r.startswith("backbone.layer1.bias"))
    assert "0.006 (sched)" in bias_row and "3e-06" not in text

    def opaque(step):  # no base to show: its first value, said so
        return 0.1 / (1 + step)

    assert "base lr=0.1 (sched) at update 0" in str(paramwise(make_net(), lr=opaque))
