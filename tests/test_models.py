"""fengine.models check their arguments up front: ResNet's sizes and input, the GAN's data
shape, noise and samples, GPT's token ids and generate's arguments are refused with the class
or method, the argument, the value and what was expected; valid models still build and run."""

from __future__ import annotations

import re

import pytest
import torch

from fengine.models import Block, ResNet
from fengine.models.gan import GAN, Discriminator, Generator
from fengine.models.gpt import GPT


# ---------------------------------------------------------------------- ResNet
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"width": 0}, ValueError, r"ResNet: width must be an int >= 1, got 0"),
        ({"width": 2.5}, TypeError, r"ResNet: width must be an int >= 1, got 2\.5"),
        ({"width": True}, TypeError, r"ResNet: width must be an int >= 1, got True"),
        ({"blocks": -1}, ValueError, r"ResNet: blocks must be an int >= 0, got -1"),
        ({"classes": 0}, ValueError, r"ResNet: classes must be an int >= 1, got 0"),
        ({"in_channels": 0}, ValueError, r"ResNet: in_channels must be an int >= 1, got 0"),
        ({"in_channels": "3"}, TypeError, r"ResNet: in_channels must be an int >= 1, got '3'"),
    ],
)
def test_resnet_refuses_bad_sizes(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResNet(**kwargs)


def test_block_refuses_a_bad_width():
    with pytest.raises(ValueError, match=r"Block: width must be an int >= 1, got 0"):
        Block(0)


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 8, 8), (8, 8)])
def test_resnet_refuses_input_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"ResNet: expected images \(batch, 1, height, width\)"):
        ResNet(8, 1)(torch.randn(shape))


def test_resnet_still_builds_and_runs():
    assert ResNet(8, 0)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert ResNet(8, 1, classes=1, in_channels=3)(torch.randn(2, 3, 4, 4)).shape == (2, 1)


# ------------------------------------------------------------------------- GAN
@pytest.mark.parametrize(
    "shape, error",
    [((), ValueError), ((0,), ValueError), ((-1, 4), ValueError), (4, TypeError),
     ((2.0, 2), TypeError), ((True, 2), TypeError), ("12", TypeError)],
)  # fmt: skip
def test_gan_refuses_a_bad_data_shape(shape, error):
    expected = r"data_shape must be a non-empty tuple of ints >= 1, e\.g\. \(1, 8, 8\), got "
    with pytest.raises(error, match=r"GAN: " + expected + re.escape(repr(shape))):
        GAN(8, shape)
    with pytest.raises(error, match=r"Generator: " + expected):
        Generator(8, shape)
    with pytest.raises(error, match=r"Discriminator: " + expected):
        Discriminator(shape)


def test_gan_parts_refuse_bad_widths_and_noise_size():
    with pytest.raises(ValueError, match=r"Generator: widths must be ints >= 1, got \(8, 0\)"):
        Generator(4, (2,), widths=(8, 0))
    with pytest.raises(ValueError, match=r"Generator: noise_size must be an int >= 1, got 0"):
        Generator(0, (2,))
    with pytest.raises(ValueError, match=r"Discriminator: widths must be ints >= 1, got 8"):
        Discriminator((2,), widths=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"GAN: disc_widths must be ints >= 1, got \(-1,\)"):
        GAN(4, (2,), disc_widths=(-1,))


def test_gan_refuses_noise_and_samples_of_the_wrong_shape_or_dtype():
    model = GAN(8, (1, 2, 2))
    with pytest.raises(
        ValueError, match=r"Generator: expected noise \(batch, 8\), got shape \(2, 7\)"
    ):
        model(torch.randn(2, 7))
    with pytest.raises(
        ValueError, match=r"Generator: expected noise \(batch, 8\), got shape \(8,\)"
    ):
        model(torch.randn(8))
    with pytest.raises(
        ValueError,
        match=r"Discriminator: expected samples \(batch, \*\(1, 2, 2\)\), got shape \(2, 5\)",
    ):
        model.disc(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"Discriminator: expected samples .* got shape \(4,\)"):
        model.disc(torch.randn(4))
    with pytest.raises(
        TypeError, match=r"GAN\.noise: like must be a floating-point tensor .* torch\.uint8"
    ):
        model.noise(2, torch.zeros(2, 4, dtype=torch.uint8))  # fmt: skip


def test_gan_still_builds_and_runs():
    model = GAN(8, [1, 2, 2], gen_widths=(), disc_widths=())
    assert model(torch.randn(3, 8)).shape == (3, 1, 2, 2)
    assert model.disc(torch.randn(3, 1, 2, 2)).shape == (3, 1)
    assert model.disc(torch.randn(3, 4)).shape == (3, 1)  # the same features, flattened
    assert GAN(4, torch.Size([2]))(torch.randn(2, 4)).shape == (2, 2)


# ------------------------------------------------------------------------- GPT
def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(10, 8, layers=1, heads=2, dim=8, dropout=0.0).eval()


@pytest.mark.parametrize(
    "idx, error, match",
    [
        (torch.tensor([1, 2, 3]), ValueError, r"GPT: idx must be token ids of shape \(batch, t\) .*got shape \(3,\)"),
        (torch.zeros(2, 3, 4, dtype=torch.long), ValueError, r"GPT: idx .*got shape \(2, 3, 4\)"),
        (torch.ones(1, 3), TypeError, r"GPT: idx must be integer token ids, got dtype torch\.float32"),
        (torch.ones(1, 3, dtype=torch.bool), TypeError, r"GPT: idx must be integer .*torch\.bool"),
        ([[1, 2]], ValueError, r"GPT: idx must be token ids .*got \[\[1, 2\]\]"),
    ],
)  # fmt: skip
def test_gpt_forward_refuses_ids_that_are_not_a_batch_of_integer_sequences(idx, error, match):
    with pytest.raises(error, match=match):
        _gpt()(idx)


@pytest.mark.parametrize(
    "idx, kwargs, match",
    [
        (torch.tensor([[1]]), {"top_k": 0}, r"top_k must be None or an int >= 1, got 0"),
        (torch.tensor([[1]]), {"top_k": -1}, r"top_k must be None or an int >= 1, got -1"),
        (torch.tensor([[1]]), {"top_k": 2.5}, r"top_k must be None or an int >= 1, got 2\.5"),
        (torch.tensor([[1]]), {"new_tokens": -2}, r"new_tokens must be an int >= 0, got -2"),
        (torch.tensor([[1]]), {"temperature": float("nan")}, r"temperature must be > 0, got nan"),
        (torch.tensor([[1]]), {"temperature": 0.0}, r"temperature must be > 0, got 0\.0"),
        (torch.zeros(1, 0, dtype=torch.long), {}, r"idx must hold at least one token per row"),
        (torch.tensor([1, 2]), {}, r"idx must be token ids of shape \(batch, t\) .*got shape \(2,\)"),
    ],
)  # fmt: skip
def test_gpt_generate_refuses_bad_arguments(idx, kwargs, match):
    args = {"new_tokens": 3, **kwargs}
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"GPT\.generate: " + match):
        _gpt().generate(idx, args.pop("new_tokens"), generator=generator, **args)


def test_gpt_still_builds_runs_and_generates():
    model = _gpt()
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 10)
    assert model(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 10)
    prompt = torch.tensor([[1, 2]], dtype=torch.int32)
    out = model.generate(prompt.long(), 4, generator=torch.Generator().manual_seed(0), top_k=3)
    again = model.generate(prompt.long(), 4, generator=torch.Generator().manual_seed(0), top_k=3)
    assert out.shape == (1, 6) and torch.equal(out, again)
    assert torch.equal(model.generate(prompt, 0, generator=torch.Generator()), prompt)
