"""``--dry-run``: what a recipe would train, shown before a single step runs.

`report` prints the resolved config, the plan (updates, epochs), the parameter-group table
(each param's lr and weight decay with their multipliers: `fengine.optim.ParamGroups`), the
model complexity (`fengine.complexity`: params and FLOPs per module), and
writes ``work_dir/hyperparams.png``: every scheduled hyper-parameter (lr, momentum, weight
decay; each param group's own) at every update of the run. The plot needs matplotlib
(``pip install fengine[plot]``); without it the values are still summarised in text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from fengine import complexity
from fengine.config import to_dict
from fengine.optim.base import resolve


__all__ = ["complexity_text", "plot", "report", "schedule_values"]

Out = Callable[[str], Any]


def schedule_values(exp: Any) -> dict[str, list[float]]:
    """Each hyper-parameter's value at updates 0 .. total-1 (the value update t+1 uses), by name:
    the experiment's ``hyperparams``, then each param group's ``<label>/lr`` / ``<label>/weight_decay``
    when the groups differ from the base."""
    total = exp.plan.total_steps
    values: dict[str, list[float]] = {}
    for name, hyper in exp.hyperparams.items():
        values[name] = [float(resolve(hyper, t)) for t in range(total)]
    groups = exp.param_groups
    if groups is not None and len(groups.groups()) > 1:
        for g in groups.groups():
            values[f"{g.label}/lr"] = [float(resolve(g.lr, t)) for t in range(total)]
            values[f"{g.label}/weight_decay"] = [
                float(resolve(g.weight_decay, t)) for t in range(total)
            ]
    return values


def plot(
    values: Mapping[str, list[float]], path: Path, *, title: str = "", steps_per_epoch: int = 0
) -> Path | None:
    """One panel per kind (lr, momentum, weight_decay, others), a line per name; None without matplotlib."""
    if not values:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    kinds: dict[str, list[str]] = {}
    for name in values:
        kinds.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    fig, axes = plt.subplots(
        len(kinds), 1, figsize=(7, 2.4 * len(kinds)), sharex=True, squeeze=False
    )
    for ax, (kind, names) in zip(axes[:, 0], kinds.items()):
        for name in names:
            ax.plot(range(len(values[name])), values[name], label=name)
        total = max((len(values[n]) for n in names), default=0)
        if steps_per_epoch and total // steps_per_epoch <= 50:
            for e in range(steps_per_epoch, total, steps_per_epoch):
                ax.axvline(e, color="0.85", linewidth=0.6, zorder=0)
        ax.set_ylabel(kind)
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("update (step)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def complexity_text(model: nn.Module | None, example_input: Any) -> str:
    """`fengine.complexity.summary` (MMEngine's table: params and FLOPs per module) on
    ``example_input``; without one, the parameter count of the model and of each top-level module."""
    if model is None:
        return "model complexity: no model"
    if example_input is not None:
        return complexity.summary(model, example_input)
    total = sum(p.numel() for p in model.parameters())
    lines = [f"model complexity: {total:,} parameters (no example input: FLOPs not counted)"]
    for name, child in model.named_children():
        lines.append(f"  {name}: {sum(p.numel() for p in child.parameters()):,}")
    return "\n".join(lines)


def _groups_text(exp: Any) -> str:
    if exp.param_groups is not None:
        return str(exp.param_groups)
    params = exp.state.params

    def rows(names: Any) -> str:
        return "\n  ".join(f"{n}  {'x'.join(map(str, params[n].shape)) or 'scalar'}" for n in names)

    parts = [p for p in getattr(exp.step, "parts", ()) if p.name is not None]
    if not parts:  # one optimizer over every param
        return "parameters (one group: the optimizer's lr and weight decay, x1 each):\n  " + rows(
            params
        )
    # a multi_step: each part's optimizer over its params (its hyper-parameters are named
    # "<part>/lr" etc. in the lines below)
    return "\n".join(
        f"parameters of part {p.name!r} (its optimizer's <{p.name}/...> hyper-parameters, x1 each):"
        f"\n  {rows(p.owned(params))}"
        for p in parts
    )


def report(cfg: Any, exp: Any, *, out: Out = print) -> Path | None:
    """Print what the run would do and write the hyper-parameter plot; returns the plot's path
    (None without matplotlib)."""
    p = exp.plan
    out("Config:\n" + json.dumps(to_dict(cfg), indent=2))
    horizon = (
        f"{p.max_epochs} epochs x {p.steps_per_epoch} updates per epoch"
        if p.by_epoch
        else f"max_steps {p.total_steps}, {p.steps_per_epoch} updates per epoch"
    )
    out(f"plan: {p.total_steps} updates ({horizon}; {p.micro_batches} micro-batch(es) each)")
    out(_groups_text(exp))
    example = exp.example_input
    out(complexity_text(getattr(exp.state, "model", None), example))
    values = schedule_values(exp)
    for name, v in values.items():
        out(
            f"{name}: {v[0]:.4g} at update 1, max {max(v):.4g}, min {min(v):.4g}, {v[-1]:.4g} at update {len(v)}"
        )
    path = plot(
        values,
        Path(cfg.work_dir) / "hyperparams.png",
        title=f"{len(values)} hyper-parameters over {p.total_steps} updates",
        steps_per_epoch=p.steps_per_epoch,
    )
    if path is None:
        why = (
            "no hyper-parameters to plot"
            if not values
            else "install matplotlib (pip install fengine[plot])"
        )
        out(f"hyperparams.png not written: {why}")
    else:
        out(f"wrote {path}")
    out("dry run: no step was run")
    return path
