"""Deterministic, resumable data: samplers, a loader, collate functions, preprocessing, datasets.

Everything here is a function of ``(seed, epoch, index)`` (or stream position):
resuming a run needs its position, never an RNG snapshot.
"""

from fengine.data.cifar import CIFAR10, CIFAR10_MEAN, CIFAR10_STD, cifar10
from fengine.data.collate import default_collate, pseudo_collate
from fengine.data.datasets import digits, synthetic_classification
from fengine.data.loader import Loader, augment_generator
from fengine.data.preprocess import ImagePreprocessor, to_device
from fengine.data.sampler import (
    InfiniteSampler,
    Sampler,
    epoch_indices,
    samples_per_rank,
    stream_indices,
)
from fengine.data.text import STDLIB_FILES, CharCorpus, char_corpus, stdlib_corpus
from fengine.data.wrappers import (
    ClassBalancedDataset,
    ConcatDataset,
    RepeatDataset,
    Subset,
    repeat_factors,
)


__all__ = [
    "STDLIB_FILES",
    "CharCorpus",
    "char_corpus",
    "stdlib_corpus",
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "cifar10",
    "ClassBalancedDataset",
    "ConcatDataset",
    "RepeatDataset",
    "Subset",
    "repeat_factors",
    "ImagePreprocessor",
    "InfiniteSampler",
    "Loader",
    "augment_generator",
    "Sampler",
    "default_collate",
    "digits",
    "epoch_indices",
    "pseudo_collate",
    "samples_per_rank",
    "stream_indices",
    "synthetic_classification",
    "to_device",
]
