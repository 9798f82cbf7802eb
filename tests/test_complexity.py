"""fengine.complexity: a ResNet-50 against MMEngine's reference docs' table, small models by
hand and against MMEngine 0.10.7's FlopAnalyzer, MMEngine's units."""

from __future__ import annotations

import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.print_helper import _format_size
from torch import nn
from torch.nn import functional as F

from fengine import complexity


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (v1.5: the stride on the 3x3 convolution)."""

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, n, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, stride if j == 0 else 1))
                cin = width * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# MMEngine's docs (get_model_complexity_info on torchvision's resnet50, 1x3x224x224):
# the table's rows to depth 2 (module, #parameters, #flops).
DOC_ROWS = [
    ("conv1", "9.408K", "0.118G"),
    ("bn1", "0.128K", "4.014M"),
    ("layer1", "0.216M", "0.69G"),
    ("layer2", "1.22M", "1.043G"),
    ("layer3", "7.098M", "1.475G"),
    ("layer4", "14.965M", "0.812G"),
    ("fc", "2.049M", "2.048M"),
    ("avgpool", "", "0.1M"),
    ("layer1.0", "75.008K", "0.241G"),
    ("layer1.1", "70.4K", "0.224G"),
    ("layer1.2", "70.4K", "0.224G"),
    ("layer2.0", "0.379M", "0.379G"),
    ("layer2.1", "0.28M", "0.221G"),
    ("layer2.2", "0.28M", "0.221G"),
    ("layer2.3", "0.28M", "0.221G"),
    ("layer3.0", "1.512M", "0.376G"),
    ("layer3.1", "1.117M", "0.22G"),
    ("layer3.2", "1.117M", "0.22G"),
    ("layer3.3", "1.117M", "0.22G"),
    ("layer3.4", "1.117M", "0.22G"),
    ("layer3.5", "1.117M", "0.22G"),
    ("layer4.0", "6.04M", "0.374G"),
    ("layer4.1", "4.463M", "0.219G"),
    ("layer4.2", "4.463M", "0.219G"),
]


def test_resnet50_matches_the_reference_docs_figures():
    torch.manual_seed(0)
    model = ResNet50()  # training mode, as built (as in MMEngine's docs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 224, 224)
    c = complexity.analyze(model, x)
    assert (c.params_str, c.flops_str) == ("25.557M", "4.145G")
    # exact: MMEngine 0.10.7's get_model_complexity_info on this model gives 4144854528
    # (training mode) and 4111512576 (eval mode); 25557032 params (torchvision's count)
    assert (c.params, c.flops) == (25557032, 4144854528)
    assert c.flops * 2 == sum(  # torch's unit: 2 per multiply-add
        v * 2 for v in c.by_operator.values()
    )
    for name, params, flops in DOC_ROWS:
        m = c.modules[name]
        got = (
            complexity.format_size(m.params) if m.params else "",
            complexity.format_size(m.flops),
        )
        assert got == (params, flops), name
    # conv1 by hand: 64 x 112 x 112 outputs, 7 x 7 x 3 multiply-adds each
    assert c.modules["conv1"].flops == 64 * 112 * 112 * 7 * 7 * 3
    assert c.modules["bn1"].flops == 5 * 64 * 112 * 112  # training-mode BatchNorm
    assert c.modules["fc"].flops == 2048 * 1000
    # the meta-device pass changed nothing (BatchNorm statistics included)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    c = complexity.analyze(model, x)
    assert c.flops == 4111512576
    # eval mode: the rows MMEngine 0.10.7 prints for this model (BatchNorm 2 per element);
    # relu / maxpool have neither params nor counted FLOPs: left out, as MMEngine does
    assert f"{c.table(max_depth=1)}\n{c}" == EVAL_TABLE


EVAL_TABLE = """\
+----------+-------------+---------+
| module   | #parameters | #flops  |
+----------+-------------+---------+
| model    | 25.557M     | 4.112G  |
|  conv1   |  9.408K     |  0.118G |
|  bn1     |  0.128K     |  1.606M |
|  layer1  |  0.216M     |  0.677G |
|  layer2  |  1.22M      |  1.034G |
|  layer3  |  7.098M     |  1.469G |
|  layer4  |  14.965M    |  0.81G  |
|  avgpool |             |  0.1M   |
|  fc      |  2.049M     |  2.048M |
+----------+-------------+---------+
Model Flops:4.112G
Model Parameters:25.557M"""


class InnerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 10)
        self.fc2 = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class DocsTestNet(nn.Module):
    """The docs' TestNet: #params 0.44K, #flops 0.4K; each Linear 0.11K, 100."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 10)
        self.fc2 = nn.Linear(10, 10)
        self.inner = InnerNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.fc2(self.inner(x)))


def test_small_models_by_hand():
    # the docs' definition example: Conv2d(3, 10, 3) on 1x3x10x10
    c = complexity.analyze(nn.Conv2d(3, 10, 3), torch.randn(1, 3, 10, 10))
    assert (c.flops, c.params) == (17280, 280) == (10 * 8 * 8 * 3 * 3 * 3, 3 * 10 * 9 + 10)
    c = complexity.analyze(DocsTestNet(), torch.randn(1, 10))
    assert (c.params_str, c.flops_str) == ("0.44K", "0.4K")
    assert c.modules["inner"] == complexity.ModuleCost(params=220, flops=200)
    assert c.modules["inner.fc2"] == complexity.ModuleCost(params=110, flops=100)
    assert str(c) == "Model Flops:0.4K\nModel Parameters:0.44K"
    lines = complexity.summary(DocsTestNet(), torch.randn(1, 10)).splitlines()
    assert lines[3:9] == [  # the docs' figures for TestNet
        "| model       | 0.44K       | 0.4K   |",
        "|  fc1        |  0.11K      |  100   |",
        "|  fc2        |  0.11K      |  100   |",
        "|  inner      |  0.22K      |  0.2K  |",
        "|   inner.fc1 |   0.11K     |   100  |",
        "|   inner.fc2 |   0.11K     |   100  |",
    ]


class Mixed(nn.Module):
    """Every operator family counted besides matmul/conv, and a shared weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(4, 3)
        self.tied = self.head  # shared: counted once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.bn(self.conv(x)))
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        x = self.ln(x)
        x = F.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("training", [True, False])
def test_per_module_counts_equal_mmengines_flop_analyzer(training):
    torch.manual_seed(0)
    model = Mixed().train(training)
    x = torch.randn(2, 3, 4, 4)
    want = FlopAnalyzer(model, (x,))
    want.unsupported_ops_warnings(False)
    want.uncalled_modules_warnings(False)
    ref = want.by_module()
    c = complexity.analyze(model, x)
    assert c.flops == want.total() and c.flops > 0
    for name in ("", "conv", "bn", "gn", "ln", "head"):
        assert c.modules[name].flops == ref[name], name
    # by hand: BatchNorm without affine 4 (training) / 1 (eval) per element; GroupNorm 5
    n = 2 * 4 * 4 * 4
    assert c.modules["bn"].flops == (4 if training else 1) * n
    assert c.modules["gn"].flops == 5 * n
    assert (
        c.params == sum(p.numel() for p in model.parameters()) == 112 + 8 + 16 + 15
    )  # conv, gn, ln, head
    assert "tied" not in c.modules  # an alias of head: one module (named_modules), counted once


class Stacked(nn.Module):
    """What torch's per-module counts missed: an iterated ModuleList (its own forward never
    runs), a module shared by two parents, a matrix times a vector, unbatched global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        shared = nn.Linear(8, 8)
        self.enc, self.dec = nn.Sequential(shared), nn.Sequential(shared)
        self.w = nn.Parameter(torch.randn(8))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        x = self.dec(self.enc(x))
        return (x @ self.w).sum() + self.pool(x.view(4, 2, 4)).sum()


@pytest.mark.parametrize("meta", [True, False])
def test_containers_shared_modules_vectors_and_unbatched_pools_as_mmengine(meta):
    torch.manual_seed(0)
    model = Stacked()
    before = {n: p.clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 8)
    want = FlopAnalyzer(model, (x,))
    want.unsupported_ops_warnings(False)
    want.uncalled_modules_warnings(False)
    ref = want.by_module()
    c = complexity.analyze(model, x, meta=meta)
    assert c.flops == want.total() == 3 * 256 + 2 * 256 + 32 + 32
    for name in ("", "layers", "layers.0", "enc", "enc.0", "dec", "pool"):
        assert c.modules[name].flops == ref[name], (name, c.modules[name].flops, ref[name])
    # the model is as it was: the shared Linear's weights went back as meta tensors
    for n, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.equal(p, before[n]), n
    model(x)


def test_real_forward_counts_the_same_and_restores_buffers_and_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    x = torch.randn(4, 6)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    real = complexity.analyze(model, x, meta=False)
    assert real == complexity.analyze(model, x)
    assert real.flops == 4 * 6 * 6 + 5 * 4 * 6 + 4 * 6 * 2
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_a_real_forward_counts_an_lstms_matmuls_as_the_meta_one():
    """On CPU the LSTM ran as one mkldnn op, which no counter knows: 0 FLOPs with meta=False.
    4 gates x (input 4 + hidden 6) x 6 units x 2 multiply-adds... counted per addmm, as meta."""
    torch.manual_seed(0)
    for model, x in ((nn.LSTM(4, 6), torch.randn(3, 2, 4)),
                     (nn.GRU(4, 6, batch_first=True), torch.randn(2, 3, 4))):  # fmt: skip
        real, meta = complexity.analyze(model, x, meta=False), complexity.analyze(model, x)
        assert real.flops == meta.flops > 0, type(model).__name__
    assert complexity.analyze(nn.LSTM(4, 6), torch.randn(3, 2, 4)).flops == 3 * 2 * 4 * 6 * (4 + 6)


def test_a_wrong_input_on_the_meta_device_is_not_blamed_on_meta():
    """It advised meta=False, which fails the same way: the input does not fit the model."""
    with pytest.raises(
        RuntimeError, match=r"same reduction dim.*is the input right for this model"
    ):
        complexity.analyze(nn.Linear(5, 3), torch.randn(2, 4))


def test_format_size_is_mmengines():
    for x in (
        0,
        7,
        100,
        101,
        999,
        1000,
        12345,
        100001,
        2048000,
        25557032,
        4144854528,
        10**12,
        2 * 10**15,
    ):
        assert complexity.format_size(x) == _format_size(x), x


class ValueDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


def test_meta_failure_says_to_use_a_real_forward():
    with pytest.raises(RuntimeError, match="meta=False"):
        complexity.analyze(ValueDependent(), torch.ones(1, 3))
    assert complexity.analyze(ValueDependent(), torch.ones(1, 3), meta=False).flops == 9
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        complexity.analyze(lambda x: x, torch.ones(1))  # type: ignore[arg-type]


def test_tuple_inputs_are_positional_arguments_and_kwargs_pass_through():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(3, 2)

        def forward(self, x, y, scale=1.0):
            return self.a(x) * scale + self.b(y)

    c = complexity.analyze(Two(), (torch.ones(5, 4), torch.ones(5, 3)), kwargs={"scale": 2.0})
    assert c.flops == 5 * 4 * 2 + 5 * 3 * 2
