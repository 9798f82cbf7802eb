"""fengine.data wrappers against MMEngine 0.10.7's: ``BaseDataset(indices=)``, ``RepeatDataset``,
``ClassBalancedDataset``, ``ConcatDataset`` (same lengths, same index maps, same repeat factors),
plus hand-computed repeat factors and position-based resume through the Loader."""

from __future__ import annotations

import itertools
import math
import pickle

import mmengine.dataset as mmd
import pytest
import torch
from torch.utils.data import TensorDataset

import fengine.data as fd


# Categories per sample: category 0 is common, 1 and 3 are rare, 2 is in between; one sample
# has none (repeat factor 1) and some have several (the rarest wins).
CATS = [
    [0], [0], [0, 2], [0], [1], [0], [2], [0], [0, 2], [],
    [0], [0, 3], [2], [0], [0], [0, 1, 2], [0], [2, 2], [0], [0],
]  # fmt: skip


class Toy(mmd.BaseDataset):
    """An MMEngine dataset of dicts ``{"id": i, "cat_ids": CATS[i]}`` (no annotation file)."""

    def __init__(self, n: int = len(CATS), offset: int = 0, **kw):
        self.n, self.offset = n, offset
        super().__init__(**kw)

    def load_data_list(self):
        return [
            {"id": self.offset + i, "cat_ids": CATS[(self.offset + i) % len(CATS)]}
            for i in range(self.n)
        ]

    def get_cat_ids(self, idx):
        return self.get_data_info(idx)["cat_ids"]


def ids(dataset, positions=None):
    positions = range(len(dataset)) if positions is None else positions
    return [dataset[i]["id"] for i in positions]


# ---------------------------------------------------------------- against MMEngine


@pytest.mark.parametrize(
    "indices, serialize",
    [
        *((i, ser) for i in (5, -3, 19, [3, 1, 1, -1, 7], (0, 19, -2)) for ser in (True, False)),
        # MMEngine's serialized path cannot build an empty dataset (np.concatenate of [])
        (0, False),
        ([], False),
    ],
)
def test_subset_matches_base_dataset_indices(indices, serialize):
    reference = Toy(indices=indices, serialize_data=serialize)
    ours = fd.Subset(Toy(), indices)
    assert len(ours) == len(reference)
    assert ids(ours) == ids(reference)
    assert [ours.get_cat_ids(i) for i in range(len(ours))] == [
        reference.get_cat_ids(i) for i in range(len(reference))
    ]


def test_subset_takes_an_index_tensor_and_negative_positions():
    ours = fd.Subset(Toy(), torch.tensor([4, -1, 0]))
    assert ids(ours) == [4, 19, 0]
    assert ids(ours, [-1, -3]) == [0, 4]
    assert ours.source_index(-2) == 19


@pytest.mark.parametrize("times", [1, 3])
def test_repeat_dataset_matches_mmengine(times):
    reference = mmd.RepeatDataset(Toy(n=7), times=times)
    ours = fd.RepeatDataset(Toy(n=7), times)
    assert len(ours) == len(reference) == 7 * times
    assert ids(ours) == ids(reference)
    assert ids(ours, [-1, -7]) == ids(reference, [-1, -7])


@pytest.mark.parametrize("thr", [1e-3, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_class_balanced_matches_mmengine(thr):
    reference = mmd.ClassBalancedDataset(Toy(), oversample_thr=thr)
    ours = fd.ClassBalancedDataset(Toy(), thr)
    # Bitwise-equal floats: the same arithmetic in the same order.
    assert ours.repeat_factors == reference._get_repeat_factors(reference.dataset, thr)
    assert ours.repeat_indices == reference.repeat_indices
    assert len(ours) == len(reference)
    assert ids(ours) == ids(reference)
    assert [ours.get_cat_ids(i) for i in range(len(ours))] == [
        reference.get_cat_ids(i) for i in range(len(reference))
    ]
    if thr == 0.5:
        assert len(ours) > len(CATS)  # the case oversamples something


def test_class_balanced_repeat_factors_by_hand():
    # f(0) = 3/4 -> r = 1; f(1) = 1/4 -> r = sqrt(0.5 / 0.25) = sqrt(2) -> 2 copies.
    labels = torch.tensor([0, 0, 0, 1])
    ds = TensorDataset(torch.arange(4.0), labels)
    cb = fd.ClassBalancedDataset(ds, 0.5, get_cat_ids=lambda i: [labels[i]])  # 0-d tensors
    assert cb.repeat_factors == [1.0, 1.0, 1.0, math.sqrt(2.0)]
    assert cb.repeat_indices == [0, 1, 2, 3, 3]
    assert [float(cb[i][0]) for i in range(len(cb))] == [0.0, 1.0, 2.0, 3.0, 3.0]
    # Numpy/tensor integer ids are counted as the same category as the plain int.
    assert fd.repeat_factors(3, lambda i: [[1, torch.tensor(1)][i % 2]], 1.0) == [1.0] * 3
    # The callable is not kept: the wrapper pickles (workers) and round-trips.
    again = pickle.loads(pickle.dumps(cb))
    assert again.repeat_indices == cb.repeat_indices


def test_concat_dataset_matches_mmengine():
    parts = [(5, 0), (7, 5), (3, 12)]
    reference = mmd.ConcatDataset([Toy(n=n, offset=o) for n, o in parts])
    ours = fd.ConcatDataset([Toy(n=n, offset=o) for n, o in parts])
    assert len(ours) == len(reference) == 15
    assert ours.cumulative_sizes == reference.cumulative_sizes
    assert ids(ours) == ids(reference)
    assert ids(ours, [-1, -15, -6]) == ids(reference, [-1, -15, -6])


def test_wrappers_nest_and_forward_get_cat_ids():
    keep = [0, 4, 6, 9, 15, 17]
    with pytest.raises(
        TypeError, match="BaseDataset"
    ):  # MMEngine's wrappers wrap BaseDatasets only
        mmd.ClassBalancedDataset(mmd.RepeatDataset(Toy(indices=keep), times=2), oversample_thr=0.6)
    ours = fd.ClassBalancedDataset(fd.RepeatDataset(fd.Subset(Toy(), keep), 2), 0.6)
    # The same samples as one MMEngine dataset: what the nested wrappers must amount to.
    flat = mmd.ClassBalancedDataset(Toy(indices=keep * 2), oversample_thr=0.6)
    assert ours.repeat_factors == flat._get_repeat_factors(flat.dataset, 0.6)
    assert ours.repeat_indices == flat.repeat_indices
    assert ids(ours) == ids(flat)


# ---------------------------------------------------------------- errors


def test_wrapper_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"Subset: `indices`=21 .* \(20\)"):
        fd.Subset(Toy(), 21)
    with pytest.raises(IndexError, match="Subset: index 20 out of range for length 20"):
        fd.Subset(Toy(), [20])
    with pytest.raises(TypeError, match="Subset: a tensor of `indices` must be 1-D"):
        fd.Subset(Toy(), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="Subset: a tensor of `indices` must be 1-D"):
        fd.Subset(Toy(), torch.tensor([True, False]))  # a mask is not a list of positions
    with pytest.raises(TypeError, match="Subset: index must be an integer, got bool"):
        fd.Subset(Toy(), [True, 3])
    with pytest.raises(TypeError, match="`indices` must be an int or a sequence"):
        fd.Subset(Toy(), 2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Subset: `dataset` must be a map-style dataset"):
        fd.Subset(iter(range(3)), 2)
    with pytest.raises(ValueError, match="RepeatDataset: `times` must be an int >= 1, got 0"):
        fd.RepeatDataset(Toy(), 0)
    with pytest.raises(IndexError, match="RepeatDataset: index 40 out of range for length 40"):
        fd.RepeatDataset(Toy(), 2)[40]  # MMEngine would silently wrap to sample 0
    with pytest.raises(ValueError, match="`oversample_thr` must be a finite number >= 0"):
        fd.ClassBalancedDataset(Toy(), -0.1)
    with pytest.raises(TypeError, match="TensorDataset has no `get_cat_ids.*pass `get_cat_ids=`"):
        fd.ClassBalancedDataset(TensorDataset(torch.zeros(3)), 0.1)
    with pytest.raises(TypeError, match=r"Subset.get_cat_ids: the wrapped TensorDataset"):
        fd.Subset(TensorDataset(torch.zeros(3)), 2).get_cat_ids(0)
    for bare in (3, "cat"):  # an int failed in iteration; a str's characters were the ids
        with pytest.raises(TypeError, match=r"get_cat_ids\(0\) must return the sample's category"):
            fd.ClassBalancedDataset(Toy(), 0.1, get_cat_ids=lambda i, bare=bare: bare)
    with pytest.raises(ValueError, match="ConcatDataset: `datasets` is empty"):
        fd.ConcatDataset([])
    with pytest.raises(
        TypeError, match=r"ClassBalancedDataset: get_cat_ids gave the tensor tensor\(1\.\)"
    ):
        fd.ClassBalancedDataset(Toy(), 0.1, get_cat_ids=lambda i: [torch.tensor(1.0)])
    with pytest.raises(TypeError, match=r"ConcatDataset: `datasets\[1\]` must be a map-style"):
        fd.ConcatDataset([Toy(), 3])
    with pytest.raises(IndexError, match="ConcatDataset: index -41"):
        fd.ConcatDataset([Toy(), Toy()])[-41]
    with pytest.raises(TypeError, match="index must be an integer, got str"):
        fd.ConcatDataset([Toy()])["0"]


# ---------------------------------------------------------------- Loader resume by position


def jitter(sample, g):
    x, y = sample
    return x + torch.randn(x.shape, generator=g), y


def base(n=13):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.arange(n) % 3)


def wrapper_cases():
    b = base()
    labels = b.tensors[1]
    return {
        "subset": fd.Subset(b, [12, 0, 5, 5, -2, 3, 7, 1]),
        "first_n": fd.Subset(b, 9),
        "repeat": fd.RepeatDataset(b, 3),
        "class_balanced": fd.ClassBalancedDataset(
            fd.Subset(b, [0, 1, 2, 3, 4, 5, 6, 8, 9, 11]),
            0.6,
            get_cat_ids=lambda i: [int(labels[[0, 1, 2, 3, 4, 5, 6, 8, 9, 11][i]])],
        ),
        "concat": fd.ConcatDataset([b, fd.Subset(b, 4), fd.RepeatDataset(fd.Subset(b, -2), 2)]),
    }


@pytest.mark.parametrize("name", ["subset", "first_n", "repeat", "class_balanced", "concat"])
def test_loader_over_wrapper_resumes_by_position(name):
    ds, bs, seed, epoch = wrapper_cases()[name], 3, 11, 2
    loader = fd.Loader(ds, bs, seed=seed, transform=jitter)
    full = list(loader.epoch(epoch))
    # Reference built by hand: the sampler's order, samples keyed by the wrapper index.
    order = fd.epoch_indices(len(ds), seed=seed, epoch=epoch)
    samples = [jitter(ds[i], fd.augment_generator(seed, epoch, i)) for i in order]
    ref = [torch.utils.data.default_collate(samples[k : k + bs]) for k in range(0, len(ds), bs)]
    assert len(full) == len(ref) == len(loader)
    for (x, y), (rx, ry) in zip(full, ref, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    for start in (1, len(loader) - 1):
        resumed = list(loader.epoch(epoch, start_batch=start))
        for (x, y), (rx, ry) in zip(resumed, full[start:], strict=True):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    stream = list(itertools.islice(loader.stream(), 9))
    for (x, y), (rx, ry) in zip(
        itertools.islice(loader.stream(start_batch=4), 5), stream[4:], strict=True
    ):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_nested_wrappers_load_the_same_with_two_workers():
    ds = wrapper_cases()["class_balanced"]
    serial = list(fd.Loader(ds, 4, seed=3, transform=jitter).epoch(1, start_batch=1))
    workers = list(
        fd.Loader(ds, 4, seed=3, transform=jitter, num_workers=2).epoch(1, start_batch=1)
    )
    for (x, y), (rx, ry) in zip(workers, serial, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
