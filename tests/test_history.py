"""`History` and `ScalarHistory` against MMEngine 0.10.7's ``HistoryBuffer`` (test oracle)
and the numbers its documentation prints (FEATURES.md item 19, docs L10571-L10738)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fengine.handlers import History, ScalarHistory, Stat


HistoryBuffer = pytest.importorskip("mmengine.logging").HistoryBuffer


def test_docs_initialisation_and_update():
    assert [list(a) for a in History().data] == [[], []]
    assert [list(a) for a in History([1, 2, 3], [1, 2, 3]).data] == [[1, 2, 3], [1, 2, 3]]
    with pytest.warns(UserWarning) as got:
        h = History([1, 2, 3], [1, 2, 3], max_length=2)
    assert str(got[0].message) == (
        "The length of history buffer(3) exceeds the max_length(2), the first few elements will be ignored."
    )
    assert [list(a) for a in h.data] == [[2, 3], [2, 3]]
    h = History([1, 2, 3], [1, 1, 1])
    h.update(4)
    assert [list(a) for a in h.data] == [[1, 2, 3, 4], [1, 1, 1, 1]]
    h.update(5, 2)
    assert [list(a) for a in h.data] == [[1, 2, 3, 4, 5], [1, 1, 1, 1, 2]]
    h = History(max_length=2)
    for v in (1, 2, 3):
        h.update(v)
    assert [list(a) for a in h.data] == [[2, 3], [1, 1]]


def test_docs_statistics():
    h = History([1, 2, 3], [1, 1, 1])
    assert (h.min(2), h.min(), h.max(2), h.max()) == (2, 1, 3, 3)
    assert h.mean(2) == 2.5 and h.mean() == 2
    assert History([1, 2, 3], [2, 2, 2]).mean() == 1  # count-weighted: 6 / 6
    h.update(4, 1)
    assert h.current() == 4
    h = History([1, 2, 3], [1, 1, 1])
    assert h.statistics("mean") == 2 and h.statistics("mean", 2) == 2.5
    with pytest.raises(TypeError):
        h.statistics("mean", 2, 3)
    with pytest.raises(KeyError, match="no statistic 'data'"):
        h.statistics("data")
    with pytest.raises(ValueError, match="empty"):
        History().current()


def test_docs_usage_example_exact():
    """The docs' linear-lr, 1/iter loss demo: the printed numbers, digit for digit."""
    printed = []
    for cls in (History, HistoryBuffer):
        logs = dict(lr=cls(), loss=cls())
        for it in range(1, 11):
            logs["lr"].update(it / 10 * 0.1, 1)
            logs["loss"].update(1 / it, 1)
            if it % 5 == 0:
                printed.append(
                    f"lr:   {logs['lr'].statistics('current')}\n"
                    f"loss: {logs['loss'].statistics('mean', 5)}"
                )
    ours, theirs = printed[:2], printed[2:]
    assert (
        ours
        == theirs
        == [
            "lr:   0.05\nloss: 0.45666666666666667",
            "lr:   0.1\nloss: 0.12912698412698415",
        ]
    )


def weighted_mean(self, window_size, weight):
    """Weights over the last ``window_size`` values, per count (MMEngine's docs example,
    divided by the sum of the counts as its comment computes)."""
    assert len(weight) == window_size
    return (self._log_history[-window_size:] * np.array(weight)).sum() / self._count_history[
        -window_size:
    ].sum()


@pytest.fixture
def registered():
    """``weighted_mean`` registered on both buffers (the same function: it ports as is)."""
    History.register_statistics(weighted_mean)
    HistoryBuffer.register_statistics(weighted_mean)
    yield
    History.unregister_statistics("weighted_mean")
    HistoryBuffer._statistics_methods.pop("weighted_mean", None)


def test_register_statistics(registered):
    ours = History([1, 2], [1, 1]).statistics("weighted_mean", 2, [2, 1])
    assert ours == HistoryBuffer([1, 2], [1, 1]).statistics("weighted_mean", 2, [2, 1]) == 2
    with pytest.raises(ValueError, match="already"):
        History.register_statistics(weighted_mean)
    with pytest.raises(ValueError, match="already"):

        @History.register_statistics
        def mean(self):  # a built-in name
            return 0


def test_random_histories_equal_history_buffer():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        values = [rng.uniform(-5, 5) for _ in range(n)]
        counts = [rng.choice([1, 1, 2, 8, 0.5]) for _ in range(n)]
        max_length = rng.choice([3, 10, 1_000_000])
        ours, ref = History(max_length=max_length), HistoryBuffer(max_length=max_length)
        for v, c in zip(values, counts):
            ours.update(v, c)
            ref.update(v, c)
        for w in (None, 1, 2, 7, 8, 9, 10, 33, 100):
            for name in ("mean", "min", "max"):
                assert ours.statistics(name, w) == ref.statistics(name, w), (name, w)
        assert ours.current() == ref.current()
        assert [a.tolist() for a in ours.data] == [a.tolist() for a in ref.data]


# ------------------------------------------------------------------ the logger's store
def test_scalar_history_counts_max_length_and_whole_history():
    """Device-lazy ScalarHistory with counts: the numbers of a HistoryBuffer fed the same."""
    rng = random.Random(1)
    for max_length in (None, 5, 12):
        h = ScalarHistory(
            window_size=4,
            stats=[
                Stat("loss", "mean", None, "loss_all"),
                Stat("loss", "max", None, "loss_max"),
                Stat("loss", "min", 6, "loss_min6"),
            ],
            max_length=max_length,
        )
        ref = HistoryBuffer(max_length=max_length or 1_000_000)
        for i in range(30):
            v, c = rng.uniform(0, 3), rng.choice([1, 2, 4])
            h.append(
                "loss", torch.tensor(v * c, dtype=torch.float64), count=c
            )  # a sum of c samples
            ref.update(v * c, c)
            if i % 4 == 3:
                tag = h.collect()
                assert tag["loss"] == ref.mean(4)
                assert tag["loss_all"] == pytest.approx(ref.mean(), rel=1e-14)
                assert tag["loss_max"] == ref.max()
                assert tag["loss_min6"] == ref.min(6)
                assert h.stat("loss", "mean", None) == pytest.approx(ref.mean(), rel=1e-14)
        if max_length is not None:
            assert [list(a) for a in h.history("loss").data] == [a.tolist() for a in ref.data]


def test_scalar_history_registered_statistic(registered):
    h = ScalarHistory(stats=[Stat("loss", "weighted_mean", 3, "wm", {"weight": [1, 2, 3]})])
    ref = HistoryBuffer()
    for v in (0.5, 1.5, 2.0, 4.0):
        h.append("loss", torch.tensor(v, dtype=torch.float64))
        ref.update(v)
    assert h.collect()["wm"] == ref.statistics("weighted_mean", 3, [1, 2, 3])
    assert Stat.from_mmengine(
        dict(data_src="loss", method_name="weighted_mean", window_size=3, weight=[1, 2, 3])
    ) == Stat("loss", "weighted_mean", 3, None, {"weight": [1, 2, 3]})
    assert len({Stat("loss", "weighted_mean", 3, None, {"weight": [1, 2, 3]}), Stat("loss")}) == 2


def test_stat_rejects_unknown_methods_and_options():
    with pytest.raises(ValueError, match="register_statistics"):
        Stat("loss", "median")
    with pytest.raises(ValueError, match="unknown keys"):
        Stat.from_mmengine(dict(data_src="loss", method_name="max", weight=[1]))
