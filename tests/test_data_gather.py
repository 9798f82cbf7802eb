"""fengine.data.gather: a DataLoader over a TensorDataset, gathered, is the DataLoader's own batches."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

import fengine
from fengine.data.gather import gathered


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 5, generator=g)
    return TensorDataset(
        x,
        torch.randint(0, 9, (23,), generator=g),  # 1-D: each sample a 0-d tensor
        torch.randn(4, 23, 3, generator=g).permute(1, 0, 2),  # not contiguous
        torch.arange(23, dtype=torch.float64).reshape(23, 1, 1).expand(23, 2, 2),  # stride 0
    )


def _same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert type(a) is type(b) is list  # default_collate of tuple samples gives a list
        for x, y in zip(a, b, strict=True):
            assert (x.dtype, x.shape, x.stride()) == (y.dtype, y.shape, y.stride())
            assert torch.equal(x, y)


def _count_getitem(monkeypatch) -> list[int]:
    """The indices every ``TensorDataset.__getitem__`` call from now on receives (still answered)."""
    real, gets = TensorDataset.__getitem__, []
    monkeypatch.setattr(
        TensorDataset, "__getitem__", lambda self, i: gets.append(i) or real(self, i)
    )
    return gets


LOADERS = {
    "shuffled, seeded": lambda ds: DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3)
    ),
    "shuffled, global RNG": lambda ds: DataLoader(ds, batch_size=5, shuffle=True),
    "drop_last": lambda ds: DataLoader(ds, batch_size=4, shuffle=True, drop_last=True),
    "in order": lambda ds: DataLoader(ds, batch_size=7),
    "batch_sampler": lambda ds: DataLoader(
        ds, batch_sampler=BatchSampler(SequentialSampler(ds), 6, drop_last=False)
    ),
    "negative indices": lambda ds: DataLoader(ds, batch_sampler=[[0, -1, 3], [-23, 2]]),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_gathered_batches_are_the_dataloaders_bit_for_bit_with_the_same_rng_draws(name):
    make = LOADERS[name]
    torch.manual_seed(11)
    loader = make(_dataset())
    want = [list(loader) for _ in range(2)]  # two passes (epochs)
    after_want = torch.get_rng_state()
    torch.manual_seed(11)
    loader = make(_dataset())
    got = [list(gathered(loader)) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), after_want)  # base seed and shuffle drawn alike
    for g, w in zip(got, want):
        _same(g, w)


@pytest.mark.parametrize("start", [0, 1, 3, 5, 6, 9])
def test_gathered_from_a_batch_index_skips_without_loading(start, monkeypatch):
    ds = _dataset()
    make = LOADERS["shuffled, seeded"]
    want = list(make(ds))[start:]
    loader = make(ds)
    gets = _count_getitem(monkeypatch)
    _same(list(gathered(loader, start)), want)
    assert gets == []  # neither the skipped batches nor the others went through __getitem__


def test_out_of_range_indices_raise_the_dataloaders_error():
    ds = _dataset()
    with pytest.raises(IndexError) as want:
        list(DataLoader(ds, batch_sampler=[[0, 23]]))
    with pytest.raises(IndexError) as got:
        list(gathered(DataLoader(ds, batch_sampler=[[0, 23]])))
    assert str(got.value) == str(want.value)


class _Sub(TensorDataset):
    def __getitem__(self, i):
        return tuple(t[i] * 2 for t in self.tensors)


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader(_Sub(torch.ones(4, 2)), batch_size=2),  # __getitem__ overridden
        DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2, collate_fn=lambda b: b),
        DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=None),  # no collation
        DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2, num_workers=1),
        DataLoader([torch.ones(2)] * 4, batch_size=2),  # not a TensorDataset
        [torch.ones(2)] * 4,
    ],
    ids=["subclass", "collate_fn", "unbatched", "workers", "list dataset", "list"],
)
def test_anything_else_goes_the_dataloaders_way(loader):
    assert gathered(loader) is None


def test_fit_over_a_dataloader_matches_the_hand_written_loop_bitwise(monkeypatch):
    """fit (which gathers: no __getitem__ call) = torch.optim over the DataLoader's own batches,
    through two epoch boundaries."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))

    def loader():
        return DataLoader(
            ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)
        )

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    loss = nn.functional.cross_entropy
    hand = model()
    opt = torch.optim.AdamW(hand.parameters(), lr=1e-2, foreach=True)
    data = loader()
    for x, y in itertools.islice(itertools.chain.from_iterable(itertools.repeat(data, 3)), 13):
        opt.zero_grad()
        loss(hand(x), y).backward()
        opt.step()

    step = fengine.train_step(lambda m, b: loss(m(b[0]), b[1]), fengine.optim.adamw(1e-2))
    data = loader()
    gets = _count_getitem(monkeypatch)
    state = fengine.fit(step.init(model()), step, data, max_steps=13, handlers=[])
    assert gets == []
    for name, p in hand.named_parameters():
        assert torch.equal(state.params[name], p.detach()), name


def test_a_resume_mid_epoch_skips_the_gathered_batches_it_already_trained_on(tmp_path):
    """Stopped after 3 of 5 batches and resumed with a fresh, identically seeded DataLoader: the
    resumed run draws the 3 batches' indices without loading them and ends bitwise where the
    uninterrupted run ends (the same DataLoader read the DataLoader's own way: a custom collate)."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))

    def loader(**kw):
        return DataLoader(
            ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1), **kw
        )

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    step = fengine.train_step(
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), fengine.optim.adamw(1e-2)
    )
    straight = fengine.fit(
        step.init(model()), step, loader(collate_fn=lambda b: torch.utils.data.default_collate(b)),
        max_steps=5, handlers=[],
    )  # fmt: skip
    fengine.fit(step.init(model()), step, loader(), max_steps=3, work_dir=tmp_path)
    resumed = fengine.fit(
        step.init(model()), step, loader(), max_steps=5, work_dir=tmp_path, resume=True
    )
    assert resumed.step == 5
    for name, p in straight.params.items():
        assert torch.equal(resumed.params[name], p), name


def test_evaluation_over_a_dataloader_reads_the_same_batches_gathered(monkeypatch):
    """fe.evaluate over a TensorDataset DataLoader: the batches gathered (no __getitem__), the
    metric what the DataLoader's own batches give, the order of a shuffled one its own."""
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(30, 6, generator=g), torch.randint(0, 3, (30,), generator=g))
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    state = fengine.train_step(lambda m, b: m(b[0]).sum(), fengine.optim.sgd(0.1)).init(model)
    seen: list[torch.Tensor] = []

    def predict(m, batch):
        seen.append(batch[1])
        return m(batch[0])

    def loader(**kw):
        return DataLoader(
            ds, batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(4), **kw
        )

    slow = loader(collate_fn=lambda b: torch.utils.data.default_collate(b))
    want = fengine.evaluate(state, predict, slow, [fengine.metrics.Accuracy()])
    want_seen, seen[:] = list(seen), []
    gets = _count_getitem(monkeypatch)
    got = fengine.evaluate(state, predict, loader(), [fengine.metrics.Accuracy()])
    assert got == want and gets == []
    assert len(seen) == len(want_seen) == 5
    assert all(torch.equal(a, b) for a, b in zip(seen, want_seen))


@pytest.mark.gpu
def test_a_pinning_dataloaders_batches_are_gathered_pinned():
    ds = _dataset()
    make = lambda: DataLoader(ds, batch_size=4, shuffle=True, pin_memory=True,  # noqa: E731
                              generator=torch.Generator().manual_seed(3))  # fmt: skip
    want, got = list(make()), list(gathered(make()))
    _same(got, want)
    assert all(t.is_pinned() for batch in got for t in batch)
