"""States made by `TrainState.replace` share their tensors: a step that consumes one consumes
them all (DESIGN principle 3), so a later step, save or evaluation of another raises
`DonatedStateError` instead of running on weights another step updated in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fengine as fe
from fengine import checkpoint as ckpt


def _step(**kw):
    return fe.train_step(lambda model, b: model(b).square().mean(), fe.optim.sgd(0.1), **kw)


def _start(step):
    torch.manual_seed(0)
    return step.init(nn.Linear(3, 2), seed=0)


BATCH = torch.ones(4, 3)


def test_an_alias_of_a_consumed_state_is_refused_by_step_save_and_evaluate(tmp_path):
    step = _step()
    s = _start(step)
    keep = s.replace(epoch=5)  # made before: shares s's tensors
    new, _ = step(s, BATCH)
    with pytest.raises(fe.DonatedStateError, match="donated to step 1"):
        step(keep, BATCH)
    with pytest.raises(fe.DonatedStateError, match="donated to step 1"):
        keep.params  # noqa: B018 - consumed where it was used: every field raises now
    other = s  # the given state itself, as before
    with pytest.raises(fe.DonatedStateError):
        other.params  # noqa: B018
    assert new.step == 1  # the step's own result lives on


@pytest.mark.parametrize("use", ["save", "evaluate"])
def test_stepping_an_alias_consumes_the_original(tmp_path, use):
    step = _step()
    s = _start(step)
    t = s.replace(epoch=s.epoch)
    new, _ = step(t, BATCH)
    with pytest.raises(fe.DonatedStateError, match="donated to step 1"):
        if use == "save":
            ckpt.save(tmp_path / "s.safetensors", s)
        else:
            fe.evaluate(s, lambda model, b: model(b), [BATCH], [])
    # the result trains on, and its own aliases are fine until one of them is consumed
    again = new.replace(batch_in_epoch=1)
    for _ in range(3):
        again, _ = step(again.replace(batch_in_epoch=again.batch_in_epoch + 1), BATCH)
    assert again.step == 4
    ckpt.save(tmp_path / "again.safetensors", again)


def test_without_donation_aliases_stay_valid():
    step = _step(donate=False)
    s = _start(step)
    keep = s.replace(epoch=1)
    before = keep.params["weight"].clone()
    new, _ = step(s, BATCH)
    torch.testing.assert_close(keep.params["weight"], before, rtol=0, atol=0)
    new2, _ = step(keep, BATCH)
    torch.testing.assert_close(new2.params["weight"], new.params["weight"], rtol=0, atol=0)


def test_the_unedited_hunt_case_counts_updates_right():
    """The hunt's case: stepping the original after its alias was stepped applied a second
    update to the same tensors and returned step=2 after three updates."""
    step = _step()
    s = _start(step)
    t = s.replace(epoch=s.epoch)
    t2, _ = step(t, BATCH)
    with pytest.raises(fe.DonatedStateError):
        step(s, BATCH)
    t3, _ = step(t2, BATCH)
    assert t3.step == 2
