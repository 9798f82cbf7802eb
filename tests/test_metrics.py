"""Tests for `fengine.metrics`.

References are independent of the code under test: hand-computed numbers, the rank of
the label among the logits counted directly (instead of `torch.topk`), and MMEngine's
own `BaseMetric`/`Evaluator` (the quick-start Accuracy metric, a per-sample metric for
offline and distributed evaluation) as an oracle over the same batches.
"""

from __future__ import annotations

import json
import os
import statistics
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.evaluator import BaseMetric, Evaluator as MMEvaluator

from fengine.metrics import Accuracy, BatchStats, Evaluator, MeanLoss, Metric, SumMetric


# -- MMEngine oracles -----------------------------------------------------------------


class QuickStartAccuracy(BaseMetric):
    """MMEngine's quick-start metric, verbatim in substance (docs: "15 minutes")."""

    def process(self, data_batch, data_samples):
        score, gt = data_samples
        self.results.append(
            {"batch_size": len(gt), "correct": (score.argmax(dim=1) == gt).sum().cpu()}
        )

    def compute_metrics(self, results):
        total_correct = sum(item["correct"] for item in results)
        total_size = sum(item["batch_size"] for item in results)
        return dict(accuracy=100 * total_correct / total_size)


class PerSampleMetric(BaseMetric):
    """One result per sample, so MMEngine's `collect_results(size)` truncation is exact."""

    def process(self, data_batch, data_samples):
        for s in data_samples:
            rank = int((s["pred"] > s["pred"][s["gt"]]).sum()) + 1  # 1 = the arg-max
            self.results.append(
                {"top1": rank <= 1, "top3": rank <= 3, "loss": float(s.get("loss", 0.0))}
            )

    def compute_metrics(self, results):
        n = len(results)
        return {
            "accuracy": 100.0 * sum(r["top1"] for r in results) / n,
            "accuracy_top3": 100.0 * sum(r["top3"] for r in results) / n,
            "loss": sum(r["loss"] for r in results) / n,
        }


def fold(metric, pairs):
    acc = metric.init()
    for batch, outputs in pairs:
        acc = metric.update(acc, batch, outputs)
    return acc


def random_batches(sizes, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        logits = torch.randn(n, classes, generator=g)
        labels = torch.randint(0, classes, (n,), generator=g)
        out.append((logits, labels))
    return out


def label_rank(logits, labels):
    """1 + how many classes score strictly higher than the label (no topk involved)."""
    return (logits > logits.gather(1, labels[:, None])).sum(dim=1) + 1


# -- Accuracy ---------------------------------------------------------------------------


def test_top1_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 2, 1])  # right, wrong, right, wrong
    m = Accuracy()
    assert m.compute(fold(m, [((None, labels), logits)])) == {"accuracy": 50.0}


def test_topk_hand_computed():
    # Rank of the label among each row's scores, read off by hand:
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.2],  # label 1 is the largest          -> rank 1
            [0.9, 0.1, 0.5, 0.0],  # label 2: only 0.9 beats it       -> rank 2
            [0.2, 0.3, 0.1, 0.4],  # label 0: 0.4 and 0.3 beat it     -> rank 3
            [0.0, 0.1, 0.2, 0.3],  # label 0: everything beats it     -> rank 4
        ]
    )
    labels = torch.tensor([1, 2, 0, 0])
    # top-k correct iff rank <= k: top1 1/4, top2 2/4, top3 3/4, top4 4/4.
    m = Accuracy(topk=(1, 2, 3, 4))
    got = m.compute(fold(m, [((None, labels), logits)]))
    assert got == {
        "accuracy": 25.0,
        "accuracy_top2": 50.0,
        "accuracy_top3": 75.0,
        "accuracy_top4": 100.0,
    }
    # torch.topk agrees with the reasoning: label 0 of row 2 is in topk(3) but not topk(2).
    assert 0 in torch.topk(logits[2], 3).indices.tolist()
    assert 0 not in torch.topk(logits[2], 2).indices.tolist()


def test_topk_matches_label_rank_on_random_batches():
    batches = random_batches([16, 16, 7], classes=10, seed=1)
    m = Accuracy(topk=(1, 5, 3))
    got = m.compute(fold(m, [((None, y), x) for x, y in batches]))
    ranks = torch.cat([label_rank(x, y) for x, y in batches])
    n = ranks.numel()
    assert list(got) == ["accuracy", "accuracy_top5", "accuracy_top3"]
    for k, key in [(1, "accuracy"), (5, "accuracy_top5"), (3, "accuracy_top3")]:
        assert got[key] == 100.0 * int((ranks <= k).sum()) / n
    assert got["accuracy"] <= got["accuracy_top3"] <= got["accuracy_top5"]


def test_matches_mmengine_quickstart_accuracy():
    batches = random_batches([32, 32, 32, 32, 17], classes=10, seed=2)
    oracle = QuickStartAccuracy()
    for x, y in batches:
        oracle.process((torch.zeros(len(y), 3), y), (x, y))
    expected = oracle.evaluate(sum(len(y) for _, y in batches))

    m = Accuracy()
    got = m.compute(fold(m, [((torch.zeros(len(y), 3), y), x) for x, y in batches]))
    assert got.keys() == expected.keys() == {"accuracy"}
    # MMEngine divides int64 tensors (float32 result); ours is a float64 Python float.
    assert got["accuracy"] == pytest.approx(float(expected["accuracy"]), rel=1e-6)
    assert isinstance(got["accuracy"], float)


def test_prefix_matches_mmengine_keys():
    batches = random_batches([8, 5], classes=4, seed=3)
    oracle = QuickStartAccuracy(prefix="ACC")
    for x, y in batches:
        oracle.process(None, (x, y))
    expected = oracle.evaluate(13)
    m = Accuracy(prefix="ACC")
    got = m.compute(fold(m, [((None, y), x) for x, y in batches]))
    assert list(got) == list(expected) == ["ACC/accuracy"]
    assert got["ACC/accuracy"] == pytest.approx(float(expected["ACC/accuracy"]), rel=1e-6)


def test_default_prefix_and_empty_prefix_fall_back_like_mmengine():
    class ValAccuracy(Accuracy):
        default_prefix = "ACC"

    class MMValAccuracy(QuickStartAccuracy):
        default_prefix = "ACC"

    batch = random_batches([6], classes=3, seed=4)[0]
    for prefix, key in [(None, "ACC/accuracy"), ("", "ACC/accuracy"), ("val", "val/accuracy")]:
        m = ValAccuracy(prefix=prefix)
        assert m.keys == (key,)
        assert list(m.compute(fold(m, [((None, batch[1]), batch[0])]))) == [key]
        oracle = MMValAccuracy(prefix=prefix)
        oracle.process(None, batch)
        assert list(oracle.evaluate(6)) == [key]
    assert Accuracy(topk=(1, 5), prefix="ACC").keys == ("ACC/accuracy", "ACC/accuracy_top5")


def test_label_sources():
    x, y = random_batches([9], classes=5, seed=5)[0]
    want = 100.0 * int((x.argmax(1) == y).sum()) / 9
    m = Accuracy()
    for batch, outputs in [
        ((torch.zeros(9, 2), y), x),  # tuple batch: labels at index 1
        ([torch.zeros(9, 2), y.tolist()], x),  # list batch, labels as a list
        ({"img": torch.zeros(9, 2), "label": y}, x),
        ({"img": torch.zeros(9, 2), "labels": y}, {"logits": x}),
        (None, {"logits": x, "label": y}),  # offline without data
    ]:
        assert m.compute(m.update(m.init(), batch, outputs)) == {"accuracy": want}
    custom = Accuracy(
        logits=lambda batch, outputs: outputs[0], target=lambda batch, outputs: batch["gt"]["cls"]
    )
    assert custom.compute(custom.update(custom.init(), {"gt": {"cls": y}}, (x, None))) == {
        "accuracy": want
    }


def test_argmax_tie_rule_and_topk_monotone():
    # All-equal logits: argmax picks class 0; top-k can never be below top-1.
    logits = torch.zeros(4, 6)
    labels = torch.tensor([0, 0, 1, 5])
    m = Accuracy(topk=(1, 2))
    got = m.compute(fold(m, [((None, labels), logits)]))
    assert got["accuracy"] == 50.0
    assert got["accuracy_top2"] >= got["accuracy"]


def test_tied_logits_fill_exactly_k_places():
    """A dead head (all logits tied), every class equally often: the top k holds k of the 10
    classes, so top-5 is 50.0 (mmpretrain's topk rule). Before: argmax's class 0 was added to
    torch.topk's 5 others, 6 classes counted: 60.0."""
    labels = torch.arange(1000) % 10
    m = Accuracy(topk=(1, 5, 3, 10))
    got = m.compute(fold(m, [((None, labels), torch.zeros(1000, 10))]))
    assert got == {
        "accuracy": 10.0,
        "accuracy_top5": 50.0,
        "accuracy_top3": 30.0,
        "accuracy_top10": 100.0,
    }


def test_topk_with_ties_matches_a_hand_counted_rank():
    """Logits from {0, 1, 2} (many ties): the label's place is the classes scoring higher plus the
    tied ones of lower index (argmax's rule), counted by loops; correct at k iff place < k."""
    g = torch.Generator().manual_seed(13)
    logits = torch.randint(0, 3, (64, 7), generator=g).float()
    labels = torch.randint(0, 7, (64,), generator=g)
    places = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        places.append(sum(v > row[y] or (v == row[y] and j < y) for j, v in enumerate(row)))
    m = Accuracy(topk=(1, 2, 3, 6))
    got = m.compute(
        fold(m, [((None, labels[:40]), logits[:40]), ((None, labels[40:]), logits[40:])])
    )
    want = [100.0 * sum(p < k for p in places) / 64 for k in (1, 2, 3, 6)]
    assert list(got.values()) == want
    assert want == [17.1875, 28.125, 42.1875, 84.375]  # 11, 18, 27, 54 of 64
    top1 = Accuracy()  # topk=(1,) asks argmax alone: the same first place
    assert top1.compute(fold(top1, [((None, labels), logits)])) == {"accuracy": want[0]}


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "outputs", "exc", "pattern"),
    [
        (
            (None, torch.tensor([0, 1, 2, 3])),
            torch.zeros(4),
            ValueError,
            r"Accuracy: expected logits of shape \(N, C\), got shape \(4,\)",
        ),
        (
            (None, torch.tensor([0, 1, 2])),
            torch.zeros(4, 5),
            ValueError,
            r"Accuracy: expected integer labels of shape \(4,\).*shape \(4, 5\).*shape \(3,\)",
        ),
        (
            (None, torch.zeros(4)),
            torch.zeros(4, 5),
            ValueError,
            r"Accuracy: expected integer labels.*torch.float32",
        ),
        (
            (None, torch.tensor([0, 1, 2, 3])),
            [[0.0] * 5] * 4,
            TypeError,
            r"Accuracy: expected logits as a tensor.*got a list",
        ),
        (
            {"img": torch.zeros(4), "target": torch.zeros(4)},
            torch.zeros(4, 5),
            KeyError,
            r"Accuracy: the batch is a dict without a 'label' or 'labels' key.*'img', 'target'",
        ),
        (
            (torch.zeros(4),),
            torch.zeros(4, 5),
            ValueError,
            r"Accuracy: expected a batch \(inputs, labels, ...\).*length 1",
        ),
        (None, torch.zeros(4, 5), ValueError, r"Accuracy: the batch is None"),
        ("text", torch.zeros(4, 5), TypeError, r"Accuracy: cannot find labels.*str"),
    ],
)
def test_accuracy_bad_input(batch, outputs, exc, pattern):
    m = Accuracy()
    with pytest.raises(exc, match=pattern):
        m.update(m.init(), batch, outputs)


def test_topk_larger_than_classes():
    m = Accuracy(topk=(1, 5))
    with pytest.raises(ValueError, match=r"Accuracy: topk=\(1, 5\) asks for the top 5.*only 3"):
        m.update(m.init(), (None, torch.tensor([0, 1])), torch.zeros(2, 3))


@pytest.mark.parametrize("topk", [(), (0,), (1, 1), (1.0,), -1, (True,)])
def test_bad_topk(topk):
    with pytest.raises(ValueError, match="Accuracy: topk"):
        Accuracy(topk=topk)


def test_compute_without_samples():
    m = Accuracy()
    with pytest.raises(ValueError, match="Accuracy: no samples"):
        m.compute(m.init())
    # An empty batch is a no-op, not an error.
    acc = m.update(m.init(), (None, torch.zeros(0, dtype=torch.long)), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="no samples"):
        m.compute(acc)


# -- the fold is pure and holds sufficient statistics ---------------------------------


def test_update_is_pure_and_acc_is_constant_size():
    m = Accuracy(topk=(1, 3))
    batches = random_batches([5] * 20, classes=4, seed=6)
    acc0 = m.init()
    snapshot = {k: v.clone() for k, v in acc0.items()}
    acc1 = m.update(acc0, (None, batches[0][1]), batches[0][0])
    for k in snapshot:
        assert torch.equal(acc0[k], snapshot[k])
    again = m.update(acc0, (None, batches[0][1]), batches[0][0])
    assert all(torch.equal(acc1[k], again[k]) for k in acc1)
    acc = fold(m, [((None, y), x) for x, y in batches])
    assert {k: v.shape for k, v in acc.items()} == {k: v.shape for k, v in acc1.items()}
    assert all(isinstance(v, torch.Tensor) for v in acc.values())
    assert acc["n"].tolist() == [100]


@pytest.mark.gpu
def test_update_does_not_sync_with_the_device():
    batches = random_batches([8, 8, 3], classes=6, seed=7)
    ev = Evaluator([Accuracy(topk=(1, 2)), MeanLoss()])
    on_device = [(x.cuda(), y) for x, y in batches]  # labels stay on the CPU (raw batch)
    acc = ev.init()
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # torch warns that the debug mode is a prototype
        warnings.filterwarnings("ignore", "Synchronization debug mode", UserWarning)
        torch.cuda.set_sync_debug_mode("error")  # any blocking copy or .item() now raises
    try:
        for xd, y in on_device:
            acc = ev.update(acc, (None, y), {"logits": xd, "loss": xd.mean(1)})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert acc[0]["total"].device.type == "cuda"
    cpu = Evaluator([Accuracy(topk=(1, 2)), MeanLoss()])
    want = cpu.compute(
        fold(cpu, [((None, y), {"logits": x, "loss": x.mean(1)}) for x, y in batches])
    )
    got = ev.compute(acc)
    assert got["accuracy"] == want["accuracy"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


@pytest.mark.gpu
def test_labels_on_the_device_with_logits_on_the_host_are_read_after_they_arrive():
    """eval_fn returning CPU logits while the batch is on CUDA: the labels' device-to-host copy
    must complete before the comparison reads them (a non_blocking one returned at once)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1 << 20, 4, generator=g)
    labels = torch.randint(0, 4, (1 << 20,), generator=g)
    want = Accuracy().compute(Accuracy().update(Accuracy().init(), (None, labels), logits))
    for _ in range(3):
        busy = torch.randn(4096, 4096, device="cuda")
        on_device = (labels.cuda() + (busy @ busy).sum() * 0).long()  # queued behind the matmul
        acc = Accuracy().update(Accuracy().init(), (None, on_device), logits)
        assert Accuracy().compute(acc) == want


# -- MeanLoss ---------------------------------------------------------------------------


def test_mean_loss_is_sample_weighted():
    # Batch sizes 3, 1, 4 with batch-mean losses 1.0, 2.0, 0.5:
    # (3*1.0 + 1*2.0 + 4*0.5) / (3 + 1 + 4) = 7 / 8.
    pairs = [
        ((torch.zeros(3, 2), torch.zeros(3)), torch.tensor(1.0)),
        ((torch.zeros(1, 2), torch.zeros(1)), {"loss": torch.tensor(2.0)}),
        ({"x": torch.zeros(4, 2)}, 0.5),
    ]
    m = MeanLoss()
    got = m.compute(fold(m, pairs))
    assert got == {"loss": 0.875}
    assert got["loss"] != pytest.approx((1.0 + 2.0 + 0.5) / 3)  # the per-batch mean


def test_mean_loss_per_sample_and_options():
    # Per-sample losses (reduction="none"): mean over all 8 samples = 36 / 8.
    pairs = [
        (None, {"nll": torch.tensor([1.0, 2.0, 3.0])}),
        (None, {"nll": torch.tensor([4.0])}),
        (None, {"nll": torch.tensor([5.0, 6.0, 7.0, 8.0])}),
    ]
    m = MeanLoss("nll", name="val_nll", prefix="val")
    assert m.keys == ("val/val_nll",)
    assert m.compute(fold(m, pairs)) == {"val/val_nll": 4.5}
    sized = MeanLoss(loss=lambda b, o: o[0], batch_size=lambda b, o: o[1])
    got = sized.compute(
        fold(sized, [(None, (torch.tensor(2.0), 1)), (None, (torch.tensor(1.0), 3))])
    )
    assert got == {"loss": 1.25}  # (2*1 + 1*3) / 4


@pytest.mark.parametrize(
    ("m", "batch", "outputs", "exc", "pattern"),
    [
        (
            MeanLoss(),
            None,
            {"nll": torch.tensor(1.0)},
            KeyError,
            r"MeanLoss: the outputs are a dict without the key 'loss'.*'nll'",
        ),
        (
            MeanLoss(),
            None,
            torch.zeros(2, 2),
            ValueError,
            r"MeanLoss: expected a scalar.*shape \(2, 2\)",
        ),
        (
            MeanLoss(),
            None,
            torch.tensor(1.0),
            ValueError,
            r"MeanLoss: cannot weight a batch-mean loss.*NoneType",
        ),
        (MeanLoss(), None, "x", TypeError, r"MeanLoss: expected the loss as a tensor"),
        (
            MeanLoss(batch_size=lambda b, o: 3),
            None,
            torch.zeros(2),
            ValueError,
            r"MeanLoss: batch_size says 3.*\(2,\)",
        ),
        (  # a batch mean kept as shape (1,): it was counted as one sample of every batch
            MeanLoss(),
            (torch.zeros(4, 3), torch.zeros(4)),
            torch.ones(1),
            ValueError,
            r"MeanLoss: a 1-d loss is one value per sample, but it has 1 values for a batch of 4",
        ),
    ],
)
def test_mean_loss_bad_input(m, batch, outputs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        m.update(m.init(), batch, outputs)


# -- Evaluator ----------------------------------------------------------------------------


def test_evaluator_merges_results():
    x, y = random_batches([10], classes=5, seed=8)[0]
    ev = Evaluator([Accuracy(topk=(1, 2), prefix="ACC"), MeanLoss()])
    got = ev.compute(ev.update(ev.init(), (None, y), {"logits": x, "loss": torch.tensor(0.25)}))
    ranks = label_rank(x, y)
    assert got == {
        "ACC/accuracy": 100.0 * int((ranks <= 1).sum()) / 10,
        "ACC/accuracy_top2": 100.0 * int((ranks <= 2).sum()) / 10,
        "loss": 0.25,
    }
    assert Evaluator(Accuracy()).metrics[0].keys == ("accuracy",)  # a single metric is accepted


def test_duplicate_keys_raise_like_mmengine():
    with pytest.raises(ValueError, match=r"'accuracy'.*prefix"):
        Evaluator([Accuracy(), Accuracy(topk=(1, 5))])
    Evaluator([Accuracy(), Accuracy(topk=(1, 5), prefix="b")])  # fine with a prefix

    # MMEngine raises a ValueError in the same situation, at evaluate time.
    mm = MMEvaluator([QuickStartAccuracy(), QuickStartAccuracy()])
    x, y = random_batches([4], classes=3, seed=9)[0]
    mm.process([x, y])
    with pytest.raises(ValueError, match="same metric name accuracy"):
        mm.evaluate(4)

    class Plain:  # duck-typed metric: no `keys`, so the clash is found by compute
        prefix = None

        def init(self):
            return 0

        def update(self, acc, batch, outputs):
            return acc + 1

        def compute(self, acc):
            return {"accuracy": float(acc)}

    class Explicit(Metric):  # subclassing the protocol gives the identity reduce
        prefix = None

    assert Explicit().reduce({"n": 1}) == {"n": 1}
    ev = Evaluator([Accuracy(), Plain()])
    acc = ev.update(ev.init(), (None, y), x)
    with pytest.raises(ValueError, match=r"'accuracy'.*Plain.*prefix"):
        ev.compute(acc)
    assert Evaluator([Plain()]).compute((3,)) == {"accuracy": 3.0}


def test_evaluator_bad_use():
    with pytest.raises(TypeError, match="Evaluator: .* lacks update, compute"):
        Evaluator([type("NotAMetric", (), {"init": lambda self: 0})()])
    ev = Evaluator([Accuracy(), MeanLoss()])
    with pytest.raises(ValueError, match="1 entries for 2 metrics"):
        ev.update((Accuracy().init(),), None, None)


class SimpleAccuracy:
    """MMEngine docs' SimpleAccuracy, functional: a per-sample list and ``compute(acc)``, which
    the protocol says suffices (the Evaluator cuts the list to size)."""

    prefix = "ACC"

    def init(self):
        return []

    def update(self, acc, batch, outputs):
        return acc + (outputs.argmax(1) == batch[1]).tolist()

    def compute(self, acc):
        return {"ACC/accuracy": 100.0 * sum(acc) / len(acc), "ACC/n": len(acc)}


class SummedWithoutSize(Metric):
    """Its own ``reduce`` (a sum over ranks) and a ``compute`` without size: padding stays in."""

    def init(self):
        return torch.zeros((), dtype=torch.float64)

    def update(self, acc, batch, outputs):
        return acc + outputs["loss"].sum()

    def reduce(self, acc):
        acc = acc.clone()
        if dist.is_initialized():
            dist.all_reduce(acc)
        return acc

    def compute(self, acc):
        return {"total": float(acc)}


class SummedWithSize(SummedWithoutSize):
    def compute(self, acc, size=None):
        return {"total": float(acc), "size": size}


def test_evaluator_passes_size_only_to_a_compute_that_takes_it():
    """Before: ``compute(acc, size)`` whenever a size was known (every multi-rank evaluation and
    every offline one), a TypeError for a ``compute(acc)`` the protocol allows."""
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.eye(3)[[0, 2, 2, 1]]  # predicts 0, 2, 2, 1: samples 0 and 2 right
    ev = Evaluator([SimpleAccuracy()])
    acc = ev.update(ev.init(), (None, labels), logits)
    assert ev.compute(acc, size=4) == {"ACC/accuracy": 50.0, "ACC/n": 4}
    assert ev.offline(list(logits), list(zip(logits, labels)), 3) == {
        "ACC/accuracy": 50.0,
        "ACC/n": 4,
    }
    sized = Evaluator([SummedWithSize()])
    assert sized.compute((torch.tensor(2.5),), size=4) == {"total": 2.5, "size": 4}
    assert sized.compute((torch.tensor(2.5),)) == {"total": 2.5, "size": None}
    own = Evaluator([SummedWithoutSize()])
    assert own.compute((torch.tensor(2.5),)) == {"total": 2.5}
    with pytest.raises(
        TypeError,
        match=r"^SummedWithoutSize: Evaluator.compute got size=4 .* but "
        r"SummedWithoutSize.compute\(acc\) takes no size.*define compute\(self, acc, size=None\)",
    ):
        own.compute((torch.tensor(2.5),), size=4)


def test_custom_sum_metric():
    class ErrorRate(SumMetric):
        default_prefix = "err"
        names = ("rate",)

        def batch_stats(self, batch, outputs):
            wrong = (outputs.argmax(1) != batch[1]).to(torch.int64)
            return BatchStats(len(wrong), wrong.sum().reshape(1), wrong[-1:])

        def finalize(self, n, totals):
            return {"rate": totals[0] / n}

    x, y = random_batches([12], classes=3, seed=10)[0]
    m = ErrorRate()
    assert m.compute(fold(m, [((None, y), x)])) == {"err/rate": int((x.argmax(1) != y).sum()) / 12}


# -- offline evaluation -------------------------------------------------------------------


def _online_run(batch_size=8, n=37, classes=6, seed=11):
    """An 'online' evaluation over a DataLoader; returns its pairs and saved predictions."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 4, generator=g)
    ys = torch.randint(0, classes, (n,), generator=g)
    w = torch.randn(4, classes, generator=g)
    dataset = list(zip(xs, ys))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    pairs, preds = [], []
    for batch in loader:
        logits = batch[0] @ w
        per_sample = torch.nn.functional.cross_entropy(logits, batch[1], reduction="none")
        out = {"logits": logits, "loss": per_sample}
        pairs.append((batch, out))
        preds.extend({"logits": lg, "loss": ls} for lg, ls in zip(logits, per_sample))
    return dataset, pairs, preds


def test_offline_equals_online():
    dataset, pairs, preds = _online_run(batch_size=8)
    ev = Evaluator([Accuracy(topk=(1, 3)), MeanLoss()])
    online = ev.compute(fold(ev, pairs), size=len(dataset))
    for chunk_size in (1, 3, 8, 37, 100):
        offline = ev.offline(preds, dataset, chunk_size=chunk_size)
        assert offline.keys() == online.keys()
        assert offline["accuracy"] == online["accuracy"]  # integer counts: bitwise
        assert offline["accuracy_top3"] == online["accuracy_top3"]
        if chunk_size == 8:  # same grouping as the loader: float sums are bitwise too
            assert offline == online
        else:
            assert offline["loss"] == pytest.approx(online["loss"], rel=1e-12)
    # Predictions that carry their labels need no data (MMEngine data_samples with gt).
    labelled = [dict(p, label=y) for p, (_, y) in zip(preds, dataset)]
    assert ev.offline(labelled, chunk_size=8) == online
    assert ev.offline(iter(labelled), chunk_size=5)["accuracy"] == online["accuracy"]


def test_offline_matches_mmengine_offline_evaluate():
    dataset, _, preds = _online_run(batch_size=8, n=23)
    samples = [
        {"pred": p["logits"], "gt": y, "loss": p["loss"]} for p, (_, y) in zip(preds, dataset)
    ]
    expected = MMEvaluator(PerSampleMetric(prefix="ACC")).offline_evaluate(samples, chunk_size=5)
    ev = Evaluator(
        [
            Accuracy(
                topk=(1, 3),
                prefix="ACC",
                logits=lambda b, o: o["pred"],
                target=lambda b, o: o["gt"],
            ),
            MeanLoss(prefix="ACC"),
        ]
    )
    got = ev.offline(samples, chunk_size=5)
    assert set(got) == set(expected) == {"ACC/accuracy", "ACC/accuracy_top3", "ACC/loss"}
    assert got["ACC/accuracy"] == expected["ACC/accuracy"]
    assert got["ACC/accuracy_top3"] == expected["ACC/accuracy_top3"]
    assert got["ACC/loss"] == pytest.approx(expected["ACC/loss"], rel=1e-6)


def test_offline_bad_input():
    dataset, _, preds = _online_run(n=10)
    ev = Evaluator([Accuracy()])
    with pytest.raises(ValueError, match="same length, got 10 predictions and 9"):
        ev.offline(preds, dataset[:9])
    with pytest.raises(ValueError, match="data ran out"):
        ev.offline(preds, iter(dataset[:9]), chunk_size=4)
    with pytest.raises(ValueError, match="more samples than the 10"):
        ev.offline(iter(preds), iter(dataset + dataset[:1]))
    with pytest.raises(ValueError, match="chunk_size"):
        ev.offline(preds, dataset, chunk_size=0)


# -- size: dropping round_up padding ------------------------------------------------------


def test_size_drops_a_padded_duplicate_in_one_process():
    dataset, pairs, _ = _online_run(batch_size=4, n=10)
    # Pad like DefaultSampler(round_up=True) would: repeat sample 0 at the end.
    x0, y0 = dataset[0]
    padded = pairs + [
        (
            (torch.stack([x0]), y0[None]),
            {"logits": pairs[0][1]["logits"][:1], "loss": pairs[0][1]["loss"][:1]},
        )
    ]
    ev = Evaluator([Accuracy(topk=(1, 3)), MeanLoss()])
    clean = ev.compute(fold(ev, pairs))
    dropped = ev.compute(fold(ev, padded), size=10)
    assert dropped["accuracy"] == clean["accuracy"]
    assert dropped["accuracy_top3"] == clean["accuracy_top3"]
    assert dropped["loss"] == pytest.approx(clean["loss"], rel=1e-12)
    assert ev.compute(fold(ev, pairs), size=10) == clean

    m = Accuracy()
    acc = fold(m, [(b, o) for b, o in padded])
    assert m.compute(acc, size=12) == m.compute(acc)  # fewer than size: all kept (MMEngine)
    with pytest.raises(ValueError, match="2 padded duplicates.*at most one per rank"):
        m.compute(acc, size=9)
    batch_mean = MeanLoss()
    acc = fold(batch_mean, [(b, o["loss"].mean()) for b, o in padded])
    with pytest.raises(ValueError, match="MeanLoss: cannot drop.*per-sample losses"):
        batch_mean.compute(acc, size=10)


@pytest.mark.parametrize("loader_kind", ["subset sampler", "drop_last"])
def test_evaluate_over_a_loader_that_skips_samples_matches_mmengine(loader_kind):
    """`evaluate` passes the dataset's length as ``size``; a loader that visits fewer samples
    (a sampler over a subset, ``drop_last``) is valid: MMEngine's ``collect_results`` keeps
    every sample seen (it raised "samples are missing")."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    import fengine as fe
    from fengine import optim

    g = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.randn(100, 4, generator=g), torch.randint(0, 3, (100,), generator=g))
    if loader_kind == "subset sampler":
        sampler = SubsetRandomSampler(range(40), generator=torch.Generator().manual_seed(0))
        loader = DataLoader(ds, batch_size=16, sampler=sampler)
    else:
        loader = DataLoader(ds, batch_size=16, drop_last=True)
    model = torch.nn.Linear(4, 3)
    state = fe.train_step(lambda m, b: m(b[0]).sum(), optim.sgd(0.1)).init(model, seed=0)
    ours = fe.evaluate(state, fe.default_predict, loader, [Accuracy()])
    mm = MMEvaluator(QuickStartAccuracy())
    with torch.no_grad():
        for x, y in loader:
            mm.process(data_samples=(model(x), y))
    expected = mm.evaluate(size=len(ds))["accuracy"]
    assert ours["accuracy"] == pytest.approx(float(expected), rel=1e-6)


def _dist_data(size):
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(size, 5, generator=g)
    labels = torch.randint(0, 5, (size,), generator=g)
    losses = torch.rand(size, generator=g, dtype=torch.float64)
    return logits, labels, losses


class MedianLoss:
    """A metric of fengine's protocol without its own ``reduce``: its accumulator is a list of
    per-sample (index, loss), which `collect_results` gathers in the sampler's order."""

    prefix = None

    def init(self):
        return []

    def update(self, acc, batch, outputs):
        return [*acc, *zip(batch[0].tolist(), outputs["loss"].tolist())]

    def compute(self, acc, size=None):
        return {"median_loss": statistics.median(x for _, x in acc), "order": [i for i, _ in acc]}


class MMMedianLoss(BaseMetric):
    """MMEngine's oracle for `MedianLoss`: one result per sample, collect_results(size)."""

    def process(self, data_batch, data_samples):
        self.results.extend((s["index"], s["loss"]) for s in data_samples)

    def compute_metrics(self, results):
        return {
            "median_loss": statistics.median(x for _, x in results),
            "order": [i for i, _ in results],
        }


class RankOfCompute(Metric):
    """Reports the rank that computed it: every rank must see rank 0's results."""

    def init(self):
        return []

    def update(self, acc, batch, outputs):
        return acc

    def compute(self, acc, size=None):
        return {"computed_on": dist.get_rank()}


class TwoPerSample(Metric):
    """A list of two entries per sample (per token, say): not MMEngine's per-sample results."""

    def init(self):
        return []

    def update(self, acc, batch, outputs):
        return [*acc, *(batch[0].tolist() * 2), 0, 0, 0]

    def compute(self, acc, size=None):
        return {"n": len(acc)}


class SumWithoutReduce(Metric):
    """A tensor accumulator and no ``reduce``: refused in a multi-rank run (it would be computed
    on one rank's share of the data)."""

    def init(self):
        return torch.zeros(())

    def update(self, acc, batch, outputs):
        return acc + outputs["loss"].sum()

    def compute(self, acc, size=None):
        return {"total": float(acc)}


def _dist_worker(rank, world, store, out_dir, size):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from mmengine.dataset import DefaultSampler

        logits, labels, losses = _dist_data(size)
        # MMEngine's own sampler decides this rank's shard and its padding.
        idx = list(DefaultSampler(list(range(size)), shuffle=False, round_up=True))
        chunks = [torch.tensor(idx[i : i + 2]) for i in range(0, len(idx), 2)]

        ev = Evaluator([Accuracy(topk=(1, 3)), MeanLoss()])
        acc = ev.init()
        oracle = PerSampleMetric()
        for t in chunks:
            acc = ev.update(acc, (t, labels[t]), {"logits": logits[t], "loss": losses[t]})
            oracle.process(
                None,
                [{"pred": logits[i], "gt": labels[i], "loss": losses[i]} for i in t.tolist()],
            )
        custom, mm_custom = Evaluator([MedianLoss(), RankOfCompute()]), MMMedianLoss()
        cacc = custom.init()
        for t in chunks:
            cacc = custom.update(cacc, (t, labels[t]), {"loss": losses[t]})
            mm_custom.process(None, [{"index": i, "loss": float(losses[i])} for i in t.tolist()])
        per_token = Evaluator([TwoPerSample()])
        try:
            per_token.compute(per_token.update(per_token.init(), (chunks[0], None), None), size)
            too_long = None
        except ValueError as e:
            too_long = str(e)
        refused = Evaluator([SumWithoutReduce()])
        try:
            refused.compute(refused.update(refused.init(), None, {"loss": losses[:2]}), size)
            refusal = None
        except TypeError as e:
            refusal = str(e)
        whole = Evaluator([Accuracy()])  # every rank folds every sample: not sharded
        try:
            whole.compute(whole.update(whole.init(), (None, labels), logits), size=size)
            unsharded = None
        except ValueError as e:
            unsharded = str(e)
        simple = Evaluator([SimpleAccuracy()])
        sacc = simple.init()
        for t in chunks:
            sacc = simple.update(sacc, (t, labels[t]), logits[t])
        own = Evaluator([SummedWithoutSize()])
        try:
            own.compute(own.update(own.init(), None, {"loss": losses[:2]}), size)
            own_refusal = None
        except TypeError as e:
            own_refusal = str(e)
        result = {
            "simple": simple.compute(sacc, size=size),
            "own_refusal": own_refusal,
            "too_long": too_long,
            "unsharded": unsharded,
            "ours": ev.compute(acc, size=size),
            "ours_no_size": ev.compute(acc),
            "mmengine": oracle.evaluate(size),
            "custom": custom.compute(cacc, size=size),
            "mm_custom": mm_custom.evaluate(size),
            "refusal": refusal,
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """Every rank's results of `_dist_worker`: 7 samples on 3 ranks (9 slots, the last sample of
    ranks 1 and 2 is padding)."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    world, size, tmp_path = 3, 7, tmp_path_factory.mktemp("dist_metrics")
    # fork: the workers reuse the imported torch/mmengine (spawn costs seconds).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _dist_worker,
        args=(world, str(tmp_path / "store"), str(tmp_path), size),
        nprocs=world,
        join=True,
        start_method=method,
    )
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_distributed_reduce_drops_round_up_padding(dist_results):
    results, size = dist_results, 7
    for r in results:
        assert r == results[0]  # every rank computes the same numbers
    logits, labels, losses = _dist_data(size)
    ev = Evaluator([Accuracy(topk=(1, 3)), MeanLoss()])
    single = ev.compute(fold(ev, [((None, labels), {"logits": logits, "loss": losses})]))
    ours, mm = results[0]["ours"], results[0]["mmengine"]
    assert ours["accuracy"] == mm["accuracy"] == single["accuracy"]
    assert ours["accuracy_top3"] == mm["accuracy_top3"] == single["accuracy_top3"]
    assert ours["loss"] == pytest.approx(mm["loss"], rel=1e-12)
    assert ours["loss"] == pytest.approx(single["loss"], rel=1e-12)
    # Without size the two duplicates are counted; the check above has teeth.
    assert results[0]["ours_no_size"]["loss"] != pytest.approx(single["loss"], rel=1e-9)


def test_distributed_metrics_without_reduce_gather_as_mmengine_and_share_rank_0s_results(
    dist_results,
):
    """A metric with no ``reduce`` of its own and a list of per-sample results is gathered as
    MMEngine's collect_results (the ranks' lists interleaved in the sampler's order, cut to size):
    the same median and sample order as MMEngine's BaseMetric.evaluate. Before, each rank computed
    on its own share (rank 0 logged one number, the others acted on theirs). Every rank gets rank
    0's results; another accumulator without ``reduce`` is refused, naming the metric."""
    results, world, size = dist_results, 3, 7
    custom = results[0]["custom"]
    assert custom["order"] == list(range(size))  # every sample once, in the dataset's order
    assert custom["median_loss"] == results[0]["mm_custom"]["median_loss"]
    assert custom["order"] == results[0]["mm_custom"]["order"]
    _, _, losses = _dist_data(size)
    assert custom["median_loss"] == float(losses.median())  # 7 samples: the middle one, exactly
    assert [r["custom"] for r in results] == [custom] * world
    assert custom["computed_on"] == 0
    for r in results:  # 3 ranks x (2 x 2 + 3) entries for 7 samples: cut would shorten it
        assert r["too_long"].startswith("TwoPerSample: its list accumulator holds 21 entries for 7")
        assert r["unsharded"].startswith(
            "Accuracy: each of the 3 ranks saw all 7 samples: the evaluation data is not sharded"
        )
        assert "SumWithoutReduce: a 3-process evaluation must combine" in r["refusal"]
        assert "define reduce(acc)" in r["refusal"]


# ----------------------------------------------------------------- MeanLoss: a batch's size
def test_mean_loss_weights_pseudo_collated_batches_by_their_samples():
    """pseudo_collate (MMEngine's default) gives per-sample lists: before, dim 0 of the first image
    (its 3 channels) weighted every batch-mean loss: 2.75 instead of the mean 2.0."""
    from fengine.data import pseudo_collate

    g = torch.Generator().manual_seed(0)
    losses = torch.arange(5, dtype=torch.float64)  # sample i's loss is i
    for sample in (
        lambda i: (torch.rand(3, 4, 4, generator=g), i),
        lambda i: {"inputs": torch.rand(3, 4, 4, generator=g), "label": i},
    ):
        samples, m = [sample(i) for i in range(5)], MeanLoss()
        acc = m.init()
        for part in (slice(0, 4), slice(4, 5)):
            acc = m.update(acc, pseudo_collate(samples[part]), losses[part].mean())
        assert m.compute(acc) == {"loss": 2.0}  # (0+1+2+3+4) / 5, exact in float64


def test_mean_loss_refuses_a_batch_whose_fields_disagree_on_its_size():
    """Before: dim 0 of whichever tensor came first (here 10 class weights) weighted the batch."""
    m = MeanLoss()
    batch = {"class_weights": torch.ones(10), "inputs": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"fields have sizes \[\(2,\), \(10,\)\].*batch_size="):
        m.update(m.init(), batch, torch.tensor(1.0))
    m = MeanLoss(batch_size=lambda batch, outputs: batch["inputs"].shape[0])
    assert m.compute(m.update(m.init(), batch, torch.tensor(1.0))) == {"loss": 1.0}


def test_mean_loss_default_collated_batches_still_weigh_by_dim_0():
    m = MeanLoss()
    acc = m.init()
    for n, loss in ((4, 1.0), (1, 3.0)):  # [x, y] and a nested [x, [y, z]] (default_collate)
        x, y = torch.zeros(n, 3), torch.zeros(n, dtype=torch.long)
        acc = m.update(acc, [x, [y, y.clone()]] if n == 1 else [x, y], torch.tensor(loss))
    assert m.compute(acc) == {"loss": (4 * 1.0 + 3.0) / 5}


def test_distributed_compute_without_size_gets_the_cut_list(dist_results):
    """SimpleAccuracy's ``compute(acc)`` on 3 ranks: the gathered list cut to the 7 samples (only
    sample 6 is predicted right: 100/7; the 2 padded duplicates, both wrong, would give 100/9).
    Before: a TypeError on every rank. A metric with its own reduce and no size is refused on
    every rank, naming it."""
    logits, labels, _ = _dist_data(7)
    assert (logits.argmax(1) == labels).tolist() == [False] * 6 + [True]
    for r in dist_results:
        assert r["simple"] == {"ACC/accuracy": 100.0 / 7, "ACC/n": 7}
        assert r["own_refusal"].startswith("SummedWithoutSize: Evaluator.compute got size=7")
        assert "SummedWithoutSize.compute(acc) takes no size" in r["own_refusal"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_topk_takes_small_integer_labels(dtype):
    """uint8 / int8 / int16 labels are valid (gather needs int64: converted)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 10, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    want = Accuracy(topk=(1, 5)).batch_stats((scores, labels), scores).total
    got = Accuracy(topk=(1, 5)).batch_stats((scores, labels.to(dtype)), scores).total
    assert torch.equal(got, want)


def test_label_rank_counts_as_a_stable_sort_on_both_paths():
    """The CPU path (two counting passes, exact rows where a tie or NaN needs it) and the exact
    path a GPU takes give a stable descending sort's rank, NaN, ±inf and ties included."""
    from fengine.metrics import _exact_rank, _label_rank

    g = torch.Generator().manual_seed(0)
    pool = torch.tensor([0.0, 1.0, -1.0, 2.0, float("nan"), float("inf"), -float("inf"), -0.0])
    for _ in range(200):
        n, c = int(torch.randint(1, 9, (), generator=g)), int(torch.randint(1, 12, (), generator=g))
        s = pool[torch.randint(0, len(pool), (n, c), generator=g)]
        y = torch.randint(0, c, (n,), generator=g)
        order = s.sort(dim=1, descending=True, stable=True).indices
        ref = (order == y[:, None]).int().argmax(dim=1)
        assert torch.equal(_label_rank(s, y), ref)
        assert torch.equal(_exact_rank(s, s.gather(1, y[:, None]), y), ref)
