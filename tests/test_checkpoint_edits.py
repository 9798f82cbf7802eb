"""Checkpoints edited with every digest recomputed (as anyone can): the values a run never makes
are refused at load, naming the file and the field, instead of failing mid-training (a raw
KeyError, a complex-number error) or training on (a wrong Adam bias correction)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint_hardening import assemble, split
from torch import nn

import fengine as fe
from fengine import checkpoint as ckpt
from fengine.checkpoint import CheckpointError, CheckpointMismatchError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def _saved(tmp_path: Path, tx: Any, *wrappers: Any) -> tuple[Path, Any]:
    """A state after one update (per-param dicts filled), saved; and the step to build templates."""
    step = fe.train_step(lambda model, b: model(b).sum(), tx, *wrappers)
    state, _ = step(step.init(_model(), seed=0), torch.randn(5, 3))
    path = ckpt.save(tmp_path / "ck.safetensors", state)
    return path, step


def _edit(path: Path, fn) -> Path:
    """``fn(table, structure, scalars)`` edits the header; the digests are recomputed."""
    table, md, payload = split(path.read_bytes())
    structure, scalars = json.loads(md["fengine.structure"]), json.loads(md["fengine.scalars"])
    fn(table, structure, scalars)
    md["fengine.structure"], md["fengine.scalars"] = json.dumps(structure), json.dumps(scalars)
    out = path.with_name("edited.safetensors")
    out.write_bytes(assemble(table, md, payload))
    return out


def _rename(old: str, new: str):
    """Move a tensor entry to another name (its data stays)."""

    def fn(table, structure, scalars):
        table[new] = table.pop(old)
        for e in structure:
            if e[0] == old:
                e[0], e[2][-1][1] = new, new.rsplit("/", 1)[1]

    return fn


def _counts(counts: dict[str, Any]):
    """Give ``opt_state/missed`` (empty in the file) entries."""

    def fn(table, structure, scalars):
        structure[:] = [e for e in structure if e[0] != "opt_state/missed"]
        for name, k in counts.items():
            path = [["a", "opt_state"], ["a", "missed"], ["k", name]]
            structure.append([f"opt_state/missed/{name}", "scalar", path])
            scalars[f"opt_state/missed/{name}"] = k

    return fn


def _scalar(name: str, value: Any):
    def fn(table, structure, scalars):
        scalars[name] = value

    return fn


def test_the_unedited_file_and_a_valid_edit_load(tmp_path):
    path, step = _saved(tmp_path, fe.optim.adamw(0.1))
    ckpt.load(path, step.init(_model(), seed=0))
    # a count a run can make (a param that sat out one of the file's one update) loads
    state = ckpt.load(_edit(path, _counts({"1.weight": 1})), step.init(_model(), seed=0))
    assert state.opt_state.missed == {"1.weight": 1}


@pytest.mark.parametrize("count", [-3, 2, 1.0, True])
def test_a_missed_count_out_of_range_is_refused(tmp_path, count):
    path, step = _saved(tmp_path, fe.optim.adamw(0.1))
    edited = _edit(path, _counts({"1.weight": count}))
    with pytest.raises(CheckpointError, match=r"edited\.safetensors.*missed\['1\.weight'\] is "):
        ckpt.load(edited, step.init(_model(), seed=0))


def test_a_missed_count_for_no_param_is_refused(tmp_path):
    path, step = _saved(tmp_path, fe.optim.adamw(0.1))
    edited = _edit(path, _counts({"head.weight": 0}))
    with pytest.raises(CheckpointError, match=r"missed\['head\.weight'\] names no param"):
        ckpt.load(edited, step.init(_model(), seed=0))


def test_a_renamed_per_param_tensor_is_refused(tmp_path):
    # where the template holds the dict's entries, a rename is a mismatch
    path, step = _saved(tmp_path, fe.optim.sgd(0.1, momentum=0.9))
    nope = _edit(path, _rename("opt_state/momentum_buffer/0.bias", "opt_state/momentum_buffer/x"))
    with pytest.raises(
        CheckpointMismatchError, match=r"(?s)unexpected in the file.*momentum_buffer/x"
    ):
        ckpt.load(nope, step.init(_model(), seed=0))
    # where the file fills an empty one (amsgrad's maxima, into a template without amsgrad),
    # its entries must still name params and have their shapes
    path, _ = _saved(tmp_path, fe.optim.adamw(0.1, amsgrad=True))
    template = fe.train_step(lambda model, b: model(b).sum(), fe.optim.adamw(0.1))
    assert ckpt.load(path, template.init(_model(), seed=0)).opt_state.max_exp_avg_sq
    key = "opt_state/max_exp_avg_sq/"
    with pytest.raises(CheckpointError, match=r"max_exp_avg_sq\['x'\] names no param"):
        ckpt.load(_edit(path, _rename(key + "0.bias", key + "x")), template.init(_model(), seed=0))

    def swap(table, structure, scalars):
        _rename(key + "0.bias", key + "tmp")(table, structure, scalars)
        _rename(key + "1.bias", key + "0.bias")(table, structure, scalars)
        _rename(key + "tmp", key + "1.bias")(table, structure, scalars)

    with pytest.raises(
        CheckpointError,
        match=r"max_exp_avg_sq\['0\.bias'\] is torch\.float32 \[2\], the param torch\.float32 \[4\]",
    ):
        ckpt.load(_edit(path, swap), template.init(_model(), seed=0))


def test_an_ema_buffer_the_model_does_not_have_is_refused(tmp_path):
    path, step = _saved(tmp_path, fe.optim.sgd(0.1), fe.wrappers.ema(0.9))

    def add(table, structure, scalars):
        table["extra/ema/buffers/nope"] = table.pop("extra/ema/params/0.bias")
        structure[:] = [
            e for e in structure if e[0] not in ("extra/ema/buffers", "extra/ema/params/0.bias")
        ]
        path = [["k", "extra"], ["k", "ema"], ["a", "buffers"], ["k", "nope"]]
        structure.append(["extra/ema/buffers/nope", "tensor", path, "cpu"])

    with pytest.raises(CheckpointError):  # 0.bias's average is now missing: a mismatch
        ckpt.load(_edit(path, add), step.init(_model(), seed=0))
    with pytest.raises(CheckpointError, match=r"extra\['ema'\]\.steps is -1, expected an int >= 0"):
        ckpt.load(_edit(path, _scalar("extra/ema/steps", -1)), step.init(_model(), seed=0))


@pytest.mark.parametrize("value", ["x", 1.5, True, -5])
def test_an_update_count_no_run_makes_is_refused(tmp_path, value):
    path, step = _saved(tmp_path, fe.optim.adamw(0.1))
    with pytest.raises(
        CheckpointError, match=rf"opt_state\.num_updates is {value!r}, expected an int >= 0"
    ):
        ckpt.load(_edit(path, _scalar("opt_state/num_updates", value)), step.init(_model(), seed=0))


def test_an_int_lr_in_the_file_still_loads(tmp_path):
    # JSON writes a float like 1.0 as 1.0, but a file from another writer may say 1
    path, step = _saved(tmp_path, fe.optim.adamw(1.0))
    state = ckpt.load(_edit(path, _scalar("opt_state/lr", 1)), step.init(_model(), seed=0))
    assert state.opt_state.lr == 1
