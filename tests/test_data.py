"""fengine.data against independent references: MMEngine's samplers, collate functions and
ImgDataPreprocessor, torch's DataLoader, scikit-learn's digits and hand computation."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter, OrderedDict, namedtuple

import mmengine.dataset as mmd
import mmengine.dataset.sampler as mm_sampler
import numpy as np
import pytest
import torch
from mmengine.model import ImgDataPreprocessor
from torch.utils.data import DataLoader, TensorDataset

import fengine.data as fd
from fengine import rng
from fengine.data import loader as loader_module


# ---------------------------------------------------------------- helpers


def assert_tree_equal(a, b):
    """Same container types, same keys/lengths, bitwise-equal tensors (dtype included)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    else:
        assert a == b


def mm_default_sampler(
    monkeypatch, n, *, seed, epoch, shuffle=True, rank=0, world=1, round_up=True
):
    monkeypatch.setattr(mm_sampler, "get_dist_info", lambda: (rank, world))
    s = mmd.DefaultSampler(range(n), shuffle=shuffle, seed=seed, round_up=round_up)
    s.set_epoch(epoch)
    return s


def sample_generator(seed, epoch, index):
    """The documented per-sample key: fold_in(seed, the loader's augmentation tag, epoch, index)."""
    return rng.generator(seed, loader_module._SAMPLE_TAG, epoch, index)


def reference_batches(dataset, indices, batch_size, drop_last, transform=None, seed=0, epoch=0):
    """Hand-built batches: fetch in the given order, transform with sample_generator(seed, epoch, i)."""
    samples = [
        dataset[i] if transform is None else transform(dataset[i], sample_generator(seed, epoch, i))
        for i in indices
    ]
    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    return [torch.utils.data.default_collate(c) for c in chunks]


def jitter(sample, g):
    """A random per-sample augmentation that draws only from the generator it is given."""
    x, y = sample
    flip = torch.rand((), generator=g) < 0.5
    x = torch.where(flip, x.flip(-1), x) + 0.1 * torch.randn(x.shape, generator=g)
    return x, y


class DictDataset(torch.utils.data.Dataset):
    """A generic map-style dataset (no vectorised fast path) returning dicts."""

    def __init__(self, n):
        self.x = torch.arange(n * 3, dtype=torch.float32).view(n, 3)

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"x": self.x[i], "y": int(i) % 5, "name": f"s{i}"}


def tensor_dataset(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 4, generator=g), torch.randint(0, 10, (n,), generator=g))


# ---------------------------------------------------------------- samplers

SAMPLER_CASES = [
    # n, seed, epoch, rank, world, shuffle, round_up
    (10, 0, 0, 0, 1, True, True),
    (10, 3, 5, 0, 1, True, True),
    (10, 0, 1, 2, 3, True, True),
    (10, 7, 2, 2, 3, True, False),
    (11, 1, 0, 3, 4, True, True),
    (11, 1, 4, 3, 4, False, True),
    (11, 1, 4, 1, 4, False, False),
    (3, 9, 1, 4, 5, True, True),  # fewer samples than ranks: padding repeats the permutation
    (3, 9, 1, 4, 5, True, False),
    (1, 0, 0, 0, 2, True, True),
    (1000, 1234, 17, 5, 8, True, True),
]


@pytest.mark.parametrize("n, seed, epoch, rank, world, shuffle, round_up", SAMPLER_CASES)
def test_epoch_indices_match_mmengine(monkeypatch, n, seed, epoch, rank, world, shuffle, round_up):
    ref = mm_default_sampler(
        monkeypatch,
        n,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        rank=rank,
        world=world,
        round_up=round_up,
    )
    got = fd.epoch_indices(
        n, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world, round_up=round_up
    )
    assert got == list(ref)
    assert fd.samples_per_rank(n, rank=rank, world_size=world, round_up=round_up) == len(ref)
    sampler = fd.Sampler(
        n, seed=seed, shuffle=shuffle, rank=rank, world_size=world, round_up=round_up
    )
    assert len(sampler) == len(ref)
    assert list(sampler.epoch(epoch)) == list(ref)


def test_sampler_start_skips_by_index_and_keeps_no_epoch_state(monkeypatch):
    s = fd.Sampler(50, seed=4, rank=1, world_size=3)
    for epoch, start in [(2, 0), (2, 7), (0, 16), (2, 17)]:  # epoch 2 again after epoch 0
        ref = list(mm_default_sampler(monkeypatch, 50, seed=4, epoch=epoch, rank=1, world=3))
        assert list(s.epoch(epoch, start=start)) == ref[start:]
    with pytest.raises(ValueError, match="start"):
        s.epoch(0, start=18)
    with pytest.raises(ValueError, match="rank"):
        fd.Sampler(5, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("rank, world", [(0, 1), (0, 3), (2, 3)])
def test_infinite_first_pass_matches_mmengine(monkeypatch, shuffle, rank, world):
    n, seed = 23, 5
    monkeypatch.setattr(mm_sampler, "get_dist_info", lambda: (rank, world))
    ref = mmd.InfiniteSampler(range(n), shuffle=shuffle, seed=seed)
    first_pass = fd.samples_per_rank(n, rank=rank, world_size=world, round_up=False)
    mine = fd.InfiniteSampler(n, seed=seed, shuffle=shuffle, rank=rank, world_size=world)
    assert list(itertools.islice(mine, first_pass)) == list(itertools.islice(ref, first_pass))
    assert len(mine) == len(ref)


def test_infinite_stream_is_default_sampler_epochs_and_resumes_by_position(monkeypatch):
    n, seed, world = 13, 2, 3
    # Reference: MMEngine DefaultSampler orders of epochs 0..5 (single process), concatenated.
    stream = []
    for epoch in range(6):
        stream += list(mm_default_sampler(monkeypatch, n, seed=seed, epoch=epoch, round_up=False))
    for rank in range(world):
        rank_stream = stream[rank::world]
        s = fd.InfiniteSampler(n, seed=seed, rank=rank, world_size=world)
        assert list(itertools.islice(s.stream(), 20)) == rank_stream[:20]
        for start in (0, 4, 9, 15):  # resume anywhere, including across pass boundaries
            assert list(itertools.islice(s.stream(start), 8)) == rank_stream[start : start + 8]
            assert s.indices(start, 8) == rank_stream[start : start + 8]
            assert (
                fd.stream_indices(n, seed=seed, start=start, count=8, rank=rank, world_size=world)
                == rank_stream[start : start + 8]
            )


# ---------------------------------------------------------------- loader


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("make", [DictDataset, tensor_dataset])
def test_loader_matches_torch_dataloader_with_mmengine_sampler(monkeypatch, make, drop_last):
    ds, bs, seed = make(23), 4, 11
    loader = fd.Loader(ds, bs, seed=seed, drop_last=drop_last)
    for epoch in (0, 1, 3):
        sampler = mm_default_sampler(monkeypatch, len(ds), seed=seed, epoch=epoch)
        ref = list(DataLoader(ds, bs, sampler=sampler, drop_last=drop_last))
        assert len(loader) == len(ref)
        got = list(loader.epoch(epoch))
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert_tree_equal(a, b)


def test_loader_rank_shard_and_mid_epoch_start_match_reference(monkeypatch):
    ds, bs, seed, world = tensor_dataset(30), 3, 7, 4
    for rank in (0, 3):
        loader = fd.Loader(ds, bs, seed=seed, rank=rank, world_size=world)
        sampler = mm_default_sampler(
            monkeypatch, len(ds), seed=seed, epoch=2, rank=rank, world=world
        )
        ref = list(DataLoader(ds, bs, sampler=sampler))
        assert len(loader) == len(ref) == 3  # ceil(ceil(30 / 4) / 3)
        for start in range(len(ref) + 1):  # start == len(loader): resume at the epoch's end
            got = list(loader.epoch(2, start_batch=start))
            assert len(got) == len(ref) - start
            for a, b in zip(got, ref[start:]):
                assert_tree_equal(a, b)


def test_loader_pseudo_collate(monkeypatch):
    ds, seed = DictDataset(10), 3
    loader = fd.Loader(ds, 4, seed=seed, collate_fn=fd.pseudo_collate)
    sampler = mm_default_sampler(monkeypatch, 10, seed=seed, epoch=1)
    ref = list(DataLoader(ds, 4, sampler=sampler, collate_fn=mmd.pseudo_collate))
    for a, b in zip(loader.epoch(1), ref, strict=True):
        assert_tree_equal(a, b)


def test_augmented_batches_same_for_0_and_2_workers_and_mid_epoch(monkeypatch):
    ds, bs, seed = tensor_dataset(21), 4, 5
    refs = {
        epoch: reference_batches(
            ds,
            list(mm_default_sampler(monkeypatch, 21, seed=seed, epoch=epoch)),
            bs,
            False,
            transform=jitter,
            seed=seed,
            epoch=epoch,
        )
        for epoch in (0, 1)
    }
    rng_before = torch.get_rng_state()
    serial = fd.Loader(ds, bs, seed=seed, transform=jitter)
    workers = fd.Loader(ds, bs, seed=seed, transform=jitter, num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 0):  # persistent workers reused across epochs, order not monotone
        for loader in (serial, workers):
            got = list(loader.epoch(epoch))
            assert len(got) == len(refs[epoch])
            for a, b in zip(got, refs[epoch]):
                assert_tree_equal(a, b)
        for start in (2, 5):
            got = list(workers.epoch(epoch, start_batch=start))
            for a, b in zip(got, refs[epoch][start:], strict=True):
                assert_tree_equal(a, b)
    # Neither the loader nor its worker seeding consumed the caller's global RNG.
    assert torch.equal(torch.get_rng_state(), rng_before)


class GlobalDraws(torch.utils.data.Dataset):
    """``__getitem__`` draws from torch's, numpy's and Python's global generators, as torchvision,
    mmcv and albumentations transforms do."""

    def __len__(self):
        return 21

    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item(), np.random.rand(), random.random()])


def test_a_dataset_drawing_from_global_generators_gets_the_same_batches_anywhere():
    """The global generators are seeded from the batch's key while it loads: 0 or 2 workers, and a
    pass started at batch k (a resume), give the same numbers; the caller's generators are put
    back. Before, the draws depended on the worker and on where the run started."""
    ds = GlobalDraws()
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    serial = list(fd.Loader(ds, 4, seed=5).epoch(1))
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]
    workers = list(fd.Loader(ds, 4, seed=5, num_workers=2).epoch(1))
    resumed = list(fd.Loader(ds, 4, seed=5).epoch(1, start_batch=3))
    for a, b in zip(serial, workers, strict=True):
        assert_tree_equal(a, b)
    for a, b in zip(serial[3:], resumed, strict=True):
        assert_tree_equal(a, b)
    draws = torch.cat(serial)[:, 1:]
    assert len(set(draws.flatten().tolist())) == draws.numel()  # no batch repeats another's
    # seed_globals=False (a dataset that draws nothing): the globals are the caller's, as torch's
    list(fd.Loader(ds, 4, seed=5, seed_globals=False).epoch(1))
    assert not torch.equal(torch.get_rng_state(), before[0])


def test_loader_stream_matches_concatenated_epochs_and_resumes(monkeypatch):
    ds, bs, seed = tensor_dataset(10), 4, 8
    # Reference: MMEngine epoch orders 0..4 concatenated; batches cross epoch boundaries and a
    # sample's augmentation key is the epoch (permutation number) it belongs to.
    keyed = [
        (epoch, i)
        for epoch in range(5)
        for i in mm_default_sampler(monkeypatch, 10, seed=seed, epoch=epoch, round_up=False)
    ]
    samples = [jitter(ds[i], sample_generator(seed, epoch, i)) for epoch, i in keyed]
    ref = [torch.utils.data.default_collate(samples[k : k + bs]) for k in range(0, 48, bs)]
    loader = fd.Loader(ds, bs, seed=seed, transform=jitter)
    for start in (0, 3, 7):
        got = list(itertools.islice(loader.stream(start_batch=start), 12 - start))
        for a, b in zip(got, ref[start:], strict=True):
            assert_tree_equal(a, b)


def test_loader_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"`dataset` is empty.*at least one sample"):
        fd.Loader(TensorDataset(torch.zeros(0, 3)), 2, seed=0)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1"):
            fd.Loader(tensor_dataset(5), bad, seed=0)
    with pytest.raises(ValueError, match=r"drop_last=True with batch_size=8 leaves zero batches"):
        fd.Loader(tensor_dataset(5), 8, seed=0, drop_last=True)
    with pytest.raises(ValueError, match=r"drop_last=True.*rank 1 of 4 gets 2 samples"):
        fd.Loader(tensor_dataset(5), 3, seed=0, drop_last=True, rank=1, world_size=4)
    loader = fd.Loader(tensor_dataset(5), 2, seed=0)
    with pytest.raises(ValueError, match=r"`start_batch` must be in \[0, 3\]"):
        loader.epoch(0, start_batch=4)
    with pytest.raises(ValueError, match="persistent_workers"):
        fd.Loader(tensor_dataset(5), 2, seed=0, persistent_workers=True)
    with pytest.raises(TypeError, match="map-style"):
        fd.Loader(iter([1, 2]), 2, seed=0)
    # each was a TypeError from deep inside at the first epoch ("NoneType + int", ...)
    for seed in (None, "0", 1.5, True):
        with pytest.raises(
            TypeError, match=rf"Loader: `seed` must be an int, got {re.escape(repr(seed))}"
        ):
            fd.Loader(tensor_dataset(5), 2, seed=seed)
    with pytest.raises(TypeError, match=r"Loader.epoch: `epoch` must be an int, got 1.0"):
        loader.epoch(1.0)
    with pytest.raises(ValueError, match=r"Loader.epoch: `epoch` must be >= 0, got -1"):
        loader.epoch(-1)
    with pytest.raises(TypeError, match=r"Loader.epoch: `start_batch` must be an int, got 1.5"):
        loader.epoch(0, start_batch=1.5)
    with pytest.raises(TypeError, match=r"Sampler: `seed` must be an int"):
        fd.Sampler(5, seed=None)


# ---------------------------------------------------------------- collate

Point = namedtuple("Point", ["x", "y"])

COLLATE_BATCHES = [
    [(torch.ones(2), 1), (torch.zeros(2), 2)],
    [
        {"img": np.arange(6).reshape(2, 3), "label": 3, "meta": "a"},
        {"img": np.ones((2, 3), dtype=np.int64), "label": 4, "meta": "b"},
    ],
    [Point(torch.tensor([1.0]), 2.5), Point(torch.tensor([2.0]), 3.5)],
    [[torch.ones(1), {"k": torch.zeros(2)}], [torch.zeros(1), {"k": torch.ones(2)}]],
    [OrderedDict(a=torch.ones(2, 2), b=[1, 2]), OrderedDict(a=torch.zeros(2, 2), b=[3, 4])],
    ["x", "y", "z"],
]


@pytest.mark.parametrize("batch", COLLATE_BATCHES)
def test_collate_functions_match_mmengine(batch):
    assert_tree_equal(fd.pseudo_collate(batch), mmd.pseudo_collate(batch))
    assert_tree_equal(fd.default_collate(batch), mmd.default_collate(batch))


def test_pseudo_collate_keeps_unequal_shapes_and_checks_lengths():
    batch = [{"img": torch.ones(3, 4, 5)}, {"img": torch.ones(3, 6, 2)}]
    assert_tree_equal(fd.pseudo_collate(batch), mmd.pseudo_collate(batch))
    with pytest.raises(RuntimeError):
        mmd.pseudo_collate([[1, 2], [3]])
    with pytest.raises(RuntimeError, match="same length"):
        fd.pseudo_collate([[1, 2], [3]])


# ---------------------------------------------------------------- preprocessing


def uint8_images(n=4, c=3, h=5, w=6):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def test_image_preprocessor_matches_mmengine_img_data_preprocessor():
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    imgs = uint8_images()
    ref = ImgDataPreprocessor(mean=mean, std=std)({"inputs": imgs.clone()}, False)["inputs"]
    pre = fd.ImagePreprocessor(mean, std, device="cpu")
    assert_tree_equal(pre({"inputs": imgs}, training=False)["inputs"], ref)
    # pseudo_collate'd list of images is stacked first, as MMEngine does
    as_list = list(imgs)
    ref_list = ImgDataPreprocessor(mean=mean, std=std)({"inputs": list(as_list)}, False)["inputs"]
    assert_tree_equal(pre({"inputs": as_list}, training=False)["inputs"], ref_list)


@pytest.mark.parametrize(("divisor", "value"), [(1, 0.0), (4, 2.5)])
def test_image_preprocessor_pads_as_mmengine(divisor, value):
    """Images of different sizes (pseudo_collate) are normalised, then padded at the bottom and
    right to the largest (rounded up to pad_size_divisor) with pad_value, as MMEngine's
    ImgDataPreprocessor + stack_batch (bitwise); a stacked batch is padded to the divisor. Before,
    a list of unequal images failed in torch.stack with a message naming neither."""
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8) for h, w in
              ((8, 8), (6, 7), (5, 9))]  # fmt: skip
    kw = dict(pad_size_divisor=divisor, pad_value=value)
    mm = ImgDataPreprocessor(mean=mean, std=std, **kw)
    pre = fd.ImagePreprocessor(mean, std, **kw)
    ours = pre({"inputs": images}, training=False)["inputs"]
    assert ours.shape == (3, 3, 8, 12 if divisor == 4 else 9)
    assert_tree_equal(ours, mm({"inputs": [i.clone() for i in images]}, False)["inputs"])
    stacked = uint8_images(h=5, w=6)
    assert_tree_equal(
        pre({"inputs": stacked}, training=False)["inputs"],
        mm({"inputs": stacked.clone()}, False)["inputs"],
    )
    channels_last = fd.ImagePreprocessor(mean, std, channels_last=True, **kw)
    out = channels_last({"inputs": images}, training=False)["inputs"]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_tree_equal(out.contiguous(), ours)


def test_image_preprocessor_refuses_images_that_padding_cannot_join():
    pre = fd.ImagePreprocessor()
    with pytest.raises(ValueError, match=r"agree on every dimension but height and width.*"
                       r"\(3, 4, 4\), \(1, 4, 4\)"):  # fmt: skip
        pre({"inputs": [torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)]}, training=False)
    with pytest.raises(ValueError, match="pad_size_divisor` must be an int >= 1, got 0"):
        fd.ImagePreprocessor(pad_size_divisor=0)


def test_image_preprocessor_tuple_batch_vs_hand_computation_and_channels_last():
    imgs, labels = uint8_images(), torch.arange(4)
    out_x, out_y = fd.ImagePreprocessor([127.5], [127.5], channels_last=True)((imgs, labels), False)
    expected = (imgs.to(torch.float64) - 127.5) / 127.5
    assert out_x.dtype == torch.float32
    torch.testing.assert_close(out_x.double(), expected, rtol=0, atol=1e-6)
    assert out_x.is_contiguous(memory_format=torch.channels_last)
    assert_tree_equal(out_y, labels)  # non-image entries are not converted
    # without mean/std: only the uint8 -> float conversion
    assert_tree_equal(fd.ImagePreprocessor()(imgs, True), imgs.float())
    with pytest.raises(ValueError, match="3 channels"):
        fd.ImagePreprocessor([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])(torch.zeros(2, 1, 4, 4), False)
    with pytest.raises(ValueError, match="both"):
        fd.ImagePreprocessor(mean=[0.5])


def test_image_preprocessor_refuses_what_it_would_mangle():
    """Shared statistics broadcast as (C, 1, 1): a (8, 16) batch came back (1, 8, 16), a (8,) one
    (1, 1, 8) (MMEngine asserts a 4-D batch). A dict without the image key was a bare KeyError."""
    pre = fd.ImagePreprocessor([0.5], [2.0])
    for shape in [(8, 16), (8,)]:
        with pytest.raises(ValueError, match=rf"has shape {re.escape(str(shape))} \(expected"):
            pre(torch.zeros(shape), False)
    assert pre(torch.zeros(2, 1, 4, 4), False).shape == (2, 1, 4, 4)
    with pytest.raises(KeyError, match=r"no key 'inputs' \(its keys: \['img'\]\); pass inputs="):
        pre({"img": torch.zeros(2, 1, 4, 4)}, False)


def test_image_preprocessor_refuses_a_list_of_bare_images_and_keeps_image_mask_pairs():
    """pseudo_collate over bare (C, H, W) images gives a list of them: the first was taken as
    the image and the rest passed through unconverted. It is refused (a guess would also take
    a default_collated (grayscale image, same-shape mask) pair for images)."""
    from torch.utils.data import default_collate

    pre = fd.ImagePreprocessor([127.5], [127.5])
    images = [torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (0, 127, 255)]
    with pytest.raises(ValueError, match=r"a sequence of 3 equally shaped \(1, 2, 2\) tensors"):
        pre(fd.pseudo_collate(images), False)
    x, y = torch.zeros(4, 8, 8, dtype=torch.uint8), torch.ones(4, 8, 8, dtype=torch.uint8)
    out = pre(default_collate(list(zip(x, y))), False)
    assert torch.equal(out[0], (x.float() - 127.5) / 127.5) and torch.equal(out[1], y)
    # inputs=0 says the first is the image
    first = fd.ImagePreprocessor([127.5], [127.5], inputs=0)(fd.pseudo_collate(images), False)
    assert first[0].dtype == torch.float32 and first[1].dtype == torch.uint8
    # inputs="all" says they are all images: stacked and normalised as MMEngine's preprocessor does
    from mmengine.model import ImgDataPreprocessor

    every = fd.ImagePreprocessor([127.5], [127.5], inputs="all")(fd.pseudo_collate(images), False)
    ref = ImgDataPreprocessor(mean=[127.5], std=[127.5])({"inputs": list(images)})["inputs"]
    assert torch.equal(every, ref) and every.shape == (3, 1, 2, 2)
    with pytest.raises(TypeError, match="inputs='all' takes a batch that is a sequence of image"):
        fd.ImagePreprocessor(inputs="all")(images[0][0].tolist(), False)
    keyed = fd.ImagePreprocessor([127.5], [127.5], inputs="all")({"all": every}, False)
    assert torch.equal(keyed["all"], (every - 127.5) / 127.5)  # a mapping's key "all" stays a key


def test_image_preprocessor_augment_only_in_training_with_callers_generator():
    calls = []

    def augment(batch, g):
        calls.append(g)
        x, y = batch
        return x + torch.rand(x.shape, generator=g), y

    pre = fd.ImagePreprocessor(augment=augment)
    imgs, labels = uint8_images(), torch.arange(4)
    x_eval, _ = pre((imgs, labels), training=False)
    assert calls == []
    assert_tree_equal(x_eval, imgs.float())
    g = rng.generator(0, 42)
    x_train, _ = pre((imgs, labels), training=True, generator=g)
    assert calls == [g]
    noise = torch.rand(imgs.shape, generator=rng.generator(0, 42))
    assert_tree_equal(x_train, imgs.float() + noise)
    with pytest.raises(ValueError, match="generator"):
        pre((imgs, labels), training=True)


def test_image_preprocessor_moves_nested_batches_and_keeps_structure():
    Sample = namedtuple("Sample", ["boxes", "tag"])
    batch = OrderedDict(
        inputs=uint8_images(),
        data_samples=[Sample(torch.ones(2, 4), "a"), Sample(torch.zeros(1, 4), "b")],
        extra=(torch.arange(3), None, 7, "text"),
    )
    out = fd.ImagePreprocessor([0.0], [1.0], device="meta")(batch, training=False)
    assert type(out) is OrderedDict and list(out) == list(batch)
    assert out["inputs"].device.type == "meta" and out["inputs"].dtype == torch.float32
    assert out["inputs"].shape == batch["inputs"].shape
    s0 = out["data_samples"][0]
    assert type(out["data_samples"]) is list and type(s0) is Sample and s0.tag == "a"
    assert s0.boxes.device.type == "meta"
    assert type(out["extra"]) is tuple and out["extra"][1:] == (None, 7, "text")
    assert out["extra"][0].device.type == "meta" and out["extra"][0].dtype == torch.int64
    # device=None leaves everything where it is; CPU -> CPU keeps values
    assert fd.to_device(batch, None) is batch
    assert_tree_equal(fd.to_device(batch, "cpu"), batch)


@pytest.mark.gpu
def test_pinned_loader_and_preprocessor_on_cuda():
    ds = TensorDataset(uint8_images(16), torch.arange(16))
    loader = fd.Loader(ds, 8, seed=0, pin_memory=True, num_workers=1)
    pre = fd.ImagePreprocessor([127.5], [127.5], device="cuda")
    for x, y in loader.epoch(0):
        assert x.is_pinned()
        out_x, out_y = pre((x, y), training=False)
        assert out_x.is_cuda and out_y.is_cuda
        torch.testing.assert_close(out_x.cpu(), (x.float() - 127.5) / 127.5)


# ---------------------------------------------------------------- datasets


def test_digits_split_is_a_deterministic_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    sk = load_digits()
    train, val = fd.digits("train"), fd.digits("val", seed=0)
    assert len(val) == round(len(sk.target) * 0.2) and len(train) + len(val) == len(sk.target)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    ours = Counter()
    for ds in (train, val):
        images, labels = ds.tensors
        assert images.min() >= 0 and images.max() <= 1
        ours.update(
            zip(map(tuple, (images * 16).round().long().flatten(1).tolist()), labels.tolist())
        )
    theirs = Counter(
        zip(map(tuple, sk.images.reshape(-1, 64).astype(int).tolist()), sk.target.tolist())
    )
    assert ours == theirs
    assert_tree_equal(list(fd.digits("val", seed=0).tensors), list(val.tensors))
    assert not torch.equal(fd.digits("val", seed=1).tensors[1], val.tensors[1])
    with pytest.raises(ValueError, match="split"):
        fd.digits("test")


def test_synthetic_classification_is_seeded_balanced_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    ds = fd.synthetic_classification(100, 6, 4, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    x, y = ds.tensors
    assert x.shape == (100, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [25, 25, 25, 25]
    assert_tree_equal(list(fd.synthetic_classification(100, 6, 4, seed=3).tensors), [x, y])
    assert not torch.equal(fd.synthetic_classification(100, 6, 4, seed=4).tensors[0], x)


def test_a_rank_without_samples_is_named_not_blamed_on_drop_last():
    """round_up=False over fewer samples than ranks: before, the message said to set
    drop_last=False, which it already was."""
    ds = torch.utils.data.TensorDataset(torch.arange(2))
    with pytest.raises(
        ValueError, match=r"rank 3 of 4 gets no sample of the 2 with round_up=False"
    ):
        fd.Loader(ds, 4, seed=0, round_up=False, drop_last=False, rank=3, world_size=4)


def test_iterating_a_loader_says_how():
    """``for batch in loader`` would repeat one epoch's order every epoch: refused with the way."""
    loader = fd.Loader(tensor_dataset(8), 4, seed=0)
    with pytest.raises(TypeError, match=r"loader.epoch\(e\) gives epoch e's batches.*next\(iter"):
        next(iter(loader))
    assert len(next(iter(loader.epoch(0)))[0]) == 4


@pytest.mark.parametrize(
    "name", ["shuffle", "drop_last", "round_up", "pin_memory", "persistent_workers", "seed_globals"]
)
def test_loader_flags_must_be_bools(name):
    """A string "no" (from a config) would be truthy: round_up="no" padded, drop_last="no" dropped."""
    ds = fd.synthetic_classification(13, num_features=4, num_classes=2, seed=0)
    with pytest.raises(TypeError) as e:
        fd.Loader(ds, 4, seed=0, rank=1, world_size=2, **{name: "no"})
    assert str(e.value) == f"Loader: {name} must be a bool (True or False), got 'no'"
    loader = fd.Loader(ds, 4, seed=0, rank=1, world_size=2, round_up=False, drop_last=False)
    assert (len(loader), len(loader.sampler)) == (2, 6)


# ---------------------------------------------------------------- findings: keys, devices, flags


def test_augmentation_keys_are_apart_from_dropout_keys():
    """Untagged, sample m's augmentation in epoch e was seeded with fold_in(seed, e, m): the key
    of micro-batch m's dropout at step e (`fengine.step.rng_key`), so both drew the same numbers."""
    from types import SimpleNamespace

    from fengine.step import rng_key

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return i

    seeds = {}

    def record(i, g):
        seeds[i] = g.initial_seed()
        return i

    loader = fd.Loader(Indexed(), 3, seed=7, transform=record)
    for epoch in (0, 2):
        seeds.clear()
        list(loader.epoch(epoch))
        assert sorted(seeds) == list(range(6))
        for i, got in seeds.items():
            assert got != rng_key(SimpleNamespace(seed=7, step=epoch), None, i, False)
            assert got == rng.fold_in(7, loader_module._SAMPLE_TAG, epoch, i)
    # the key ImagePreprocessor's message suggests for batch augmentation is no step's dropout key
    batch_key = loader_module.augment_generator(7, 3).initial_seed()
    assert batch_key not in (
        rng.fold_in(7, 3),
        rng_key(SimpleNamespace(seed=7, step=3), None, 0, False),
    )
    pre = fd.ImagePreprocessor(augment=lambda b, g: b)
    with pytest.raises(ValueError, match=r"augment_generator\(state.seed, state.step\)"):
        pre(uint8_images(), training=True)


class Box:
    """A data sample with its own ``to(device)`` and no ``non_blocking``."""

    def __init__(self, t):
        self.t = t

    def to(self, device):
        return Box(self.t.to(device))


def test_to_device_and_preprocessor_move_data_samples_with_their_to():
    """MMEngine's cast_data moves BaseDataElement data samples; to_device left them on the CPU."""
    from mmengine.model import BaseDataPreprocessor
    from mmengine.structures import BaseDataElement

    sample = BaseDataElement(gt_label=torch.tensor([3]), metainfo=dict(img_shape=(4, 4)))
    batch = {"inputs": uint8_images(2), "data_samples": [sample, Box(torch.ones(2))], "k": Box}
    ref = BaseDataPreprocessor()
    ref._device = torch.device("meta")  # what .to("meta") sets
    want = ref.cast_data({"inputs": batch["inputs"], "data_samples": [sample]})
    for out in (
        fd.to_device(batch, "meta"),
        fd.ImagePreprocessor(device="meta")(batch, training=False),
    ):
        moved, box = out["data_samples"]
        assert moved.gt_label.device == want["data_samples"][0].gt_label.device
        assert moved.img_shape == (4, 4) and out["inputs"].device.type == "meta"
        assert type(box) is Box and box.t.device.type == "meta"  # a `to` without non_blocking
        assert out["k"] is Box  # a class's unbound `to` is not called
    calls = []

    class Pinned:
        def to(self, device, *, non_blocking=False):
            calls.append((torch.device(device), non_blocking))
            return self

    fd.to_device([Pinned()], "meta", non_blocking=True)
    assert calls == [(torch.device("meta"), True)]


@pytest.mark.parametrize("flag", ["bgr_to_rgb", "rgb_to_bgr"])
def test_image_preprocessor_channel_flip_matches_mmengine(flag):
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    imgs = uint8_images()
    mm = ImgDataPreprocessor(mean=mean, std=std, **{flag: True})
    ref = mm({"inputs": imgs.clone()}, False)["inputs"]
    ours = fd.ImagePreprocessor(mean, std, **{flag: True})({"inputs": imgs}, training=False)
    assert_tree_equal(ours["inputs"], ref)
    assert not torch.equal(ref, fd.ImagePreprocessor(mean, std)(imgs, False))  # it flipped
    last = fd.ImagePreprocessor(mean, std, channels_last=True, **{flag: True})(imgs, False)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, ref)
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8) for h, w in
              ((8, 8), (6, 7))]  # fmt: skip
    ref_list = mm({"inputs": list(images)}, False)["inputs"]
    got = fd.ImagePreprocessor(mean, std, **{flag: True})({"inputs": images}, False)["inputs"]
    assert_tree_equal(got, ref_list)


def test_image_preprocessor_channel_flip_refusals():
    with pytest.raises(ValueError, match=r"`bgr_to_rgb` and `rgb_to_bgr` cannot both be True"):
        fd.ImagePreprocessor(bgr_to_rgb=True, rgb_to_bgr=True)
    with pytest.raises(
        TypeError,
        match=r"^ImagePreprocessor: rgb_to_bgr must be a bool \(True or False\), got 'no'$",
    ):
        fd.ImagePreprocessor(rgb_to_bgr="no")
    with pytest.raises(
        ValueError, match=r"reverse 3 channels, but the image has shape \(2, 1, 5, 6\)"
    ):
        fd.ImagePreprocessor(bgr_to_rgb=True)(uint8_images(2, 1), False)


def test_sampler_flags_must_be_bools():
    """shuffle="False" shuffled and round_up="no" padded in Sampler, InfiniteSampler and the
    functions (Loader already refused them)."""
    bad = r"{} must be a bool \(True or False\), got 'False'"
    calls = {
        "Sampler": lambda v: fd.Sampler(10, seed=0, shuffle=v),
        "InfiniteSampler": lambda v: fd.InfiniteSampler(10, seed=0, shuffle=v),
        "sampler": lambda v: fd.epoch_indices(10, seed=0, epoch=0, shuffle=v),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match="^" + where + ": " + bad.format("shuffle")):
            call("False")
    with pytest.raises(TypeError, match=bad.format("shuffle")):
        fd.stream_indices(10, seed=0, start=0, count=3, shuffle="False")
    with pytest.raises(TypeError, match=r"^Sampler: " + bad.format("round_up")):
        fd.Sampler(10, seed=0, rank=2, world_size=3, round_up="False")
    with pytest.raises(TypeError, match=bad.format("round_up")):
        fd.samples_per_rank(10, rank=2, world_size=3, round_up="False")
    assert len(fd.Sampler(10, seed=0, rank=2, world_size=3, round_up=False)) == 3


def test_seeds_must_fit_torchs_generators():
    """seed=2**64-1 was accepted and epoch 1 died in torch ("Overflow when unpacking long long")."""
    for bad in (-1, 2**63, 2**64 - 1):
        msg = rf"must be a non-negative int below 2\*\*63, got {bad}$"
        with pytest.raises(ValueError, match=r"^Loader: `seed` " + msg):
            fd.Loader(tensor_dataset(5), 2, seed=bad)
        with pytest.raises(ValueError, match=r"^Sampler: `seed` " + msg):
            fd.Sampler(5, seed=bad)
        with pytest.raises(ValueError, match=r"^InfiniteSampler: `seed` " + msg):
            fd.InfiniteSampler(5, seed=bad)
        with pytest.raises(ValueError, match=r"^sampler: `seed` " + msg):
            fd.epoch_indices(5, seed=bad, epoch=0)
    largest = fd.Loader(tensor_dataset(5), 2, seed=2**63 - 1)
    assert len(list(largest.epoch(1))) == 3  # seed + epoch still fits torch's uint64 seed


def test_loader_checks_workers_collate_and_transform_up_front():
    """Each was accepted and failed only at the first batch naming no argument (or ran 1 worker
    for num_workers=True)."""
    ds = tensor_dataset(10)
    for bad, kind, msg in ((True, TypeError, "an int, got True"), (2.0, TypeError, "an int, got 2.0"),
                           (-1, ValueError, ">= 0, got -1")):  # fmt: skip
        with pytest.raises(kind, match=rf"^Loader: `num_workers` must be {re.escape(msg)}$"):
            fd.Loader(ds, 4, seed=0, num_workers=bad)
    with pytest.raises(
        TypeError, match=r"^Loader: `transform` must be a function \(or None\), got int 1$"
    ):
        fd.Loader(ds, 4, seed=0, transform=1)
    with pytest.raises(
        TypeError, match=r"^Loader: `collate_fn` must be a function \(or None\), got str 'stack'$"
    ):
        fd.Loader(ds, 4, seed=0, collate_fn="stack")
    # collate_fn=None is the default collate, as torch's DataLoader takes it
    ours = list(fd.Loader(ds, 4, seed=0, collate_fn=None).epoch(1))
    for a, b in zip(ours, fd.Loader(ds, 4, seed=0).epoch(1), strict=True):
        assert_tree_equal(a, b)
