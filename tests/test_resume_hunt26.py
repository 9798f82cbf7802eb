"""Resume edge cases (hunt 26): a mid-epoch checkpoint resumed with another batching."""

from __future__ import annotations

import pytest
from helpers import ce_loss, mlp

import fengine as fe
from fengine import optim
from fengine.handlers import Checkpointer


def _fit(tmp_path, batch_size: int, **kw) -> fe.TrainState:
    ds = fe.data.synthetic_classification(32, num_features=16, num_classes=10, seed=0)
    step = fe.train_step(ce_loss, optim.sgd(0.05))
    return fe.fit(step.init(mlp(), seed=0), step, fe.data.Loader(ds, batch_size, seed=0),
                  work_dir=tmp_path, handlers=[Checkpointer(1, by_epoch=False)], **kw)  # fmt: skip


def test_a_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path):
    """Saved at batch 3 of 8 (batch size 4): with batch size 8, batch 3 is samples 24-31 and 12
    of the epoch's first 24 were never seen; the resume is refused, naming both batchings. The
    same data resumes; an epoch boundary resumes with any batch size."""
    _fit(tmp_path, 4, max_steps=3)
    with pytest.raises(ValueError) as e:
        _fit(tmp_path, 8, max_steps=6, resume=tmp_path / "iter_3.safetensors")
    assert str(e.value) == (
        f"{tmp_path / 'iter_3.safetensors'} was saved at batch 3 of an epoch of 8 batches; this "
        "run's data has 4 batches per epoch (another batch size or dataset), so resuming "
        "mid-epoch would skip some of the epoch's samples and repeat others; resume with the "
        "run's data, or from the end of an epoch"
    )
    assert _fit(tmp_path, 4, max_steps=5, resume=tmp_path / "iter_3.safetensors").step == 5
    _fit(tmp_path, 4, max_steps=8, resume=tmp_path / "iter_5.safetensors")
    assert _fit(tmp_path, 8, max_steps=10, resume=tmp_path / "iter_8.safetensors").step == 10
