"""Several optimizers in one step: MMEngine's ``OptimWrapperDict`` (GANs), the functional way.

MMEngine trains a GAN with one optimizer wrapper per submodule and a model
``train_step`` that updates them in turn (discriminator, then generator). Here
that is `multi_step`: a `Step` of named ``(loss_fn, tx, params)`` parts, updated
one after the other within one call, each part seeing the params the parts
before it just updated::

    step = multi_step(
        {"disc": (disc_loss, optim.adam(2e-4, b1=0.5), "disc"),   # params under model.disc
         "gen": (gen_loss, optim.adam(2e-4, b1=0.5), "gen")},
        fe.amp("float16"),                # each part gets its own loss scaler (AmpOptimWrapper each)
        fe.ema(0.999, params="gen"),      # EMA of the generator only
    )
    state = step.init(model, seed=0)      # opt_state == {"disc": ..., "gen": ...}
    state, metrics = step(state, batch)   # disc/loss, disc/lr, gen/loss, gen/lr, ...

Each part's gradient is taken with respect to its own params only, and its
optimizer state is ``state.opt_state[name]``. Wrappers apply to every part:
forward wrappers to each part's gradient computation, gradient wrappers to each
part's update, post-update wrappers to the whole step. Metrics are prefixed
``"<name>/"`` (MMEngine logs ``gen.lr``/``disc.lr``). One call is one step:
``state.step`` advances by one whatever the number of parts, and every part's
schedule sees the same step. Dropout in part ``i`` draws from
``fold_in(seed, step, i, micro)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fengine.optim.base import GradientTransformation
from fengine.step import LossFn, Part, Step, selector
from fengine.wrappers import Wrapper


__all__ = ["multi_step"]


def multi_step(
    parts: Mapping[str, tuple[LossFn, GradientTransformation, str | Callable[[str], bool]]],
    *wrappers: Wrapper,
    order: tuple[str, ...] | list[str] | None = None,
    donate: bool = True,
    compile: bool | Mapping[str, Any] = False,
) -> Step:
    """A step that updates each named part with its own loss and optimizer, in ``order``.

    Args:
      parts: name -> ``(loss_fn, tx, params)``. ``loss_fn(model, batch)`` and ``tx`` (ending
        in an optimizer) as for `fengine.train_step` (``loss_fn`` sees the whole model);
        ``params`` is a submodule name (``"gen"`` owns ``gen.*``) or a function
        ``param_name -> bool``. Every trainable param must belong to exactly one part.
      wrappers: as for `fengine.train_step`.
      order: the update order (default: the order of ``parts``). For a GAN list
        the discriminator first, as MMEngine's GAN models do.
      donate, compile: as for `fengine.train_step` (``donate`` True or False).
    """
    if not isinstance(parts, Mapping) or not parts:
        raise TypeError("multi_step: parts must be a non-empty dict name -> (loss_fn, tx, params)")
    bad = [name for name in parts if not isinstance(name, str) or not name]
    if bad:
        raise TypeError(
            f"multi_step: part names must be non-empty strings (they key the state and prefix the "
            f"metrics), got {bad!r}"
        )
    if isinstance(order, str):
        raise TypeError(f"multi_step: order must be a list of part names, got the string {order!r}")
    order = list(parts) if order is None else list(order)
    if sorted(order) != sorted(parts):
        raise ValueError(
            f"multi_step: order {order} must list each part once; parts are {list(parts)}"
        )
    built = []
    for i, name in enumerate(order):
        spec = parts[name]
        if not isinstance(spec, (tuple, list)) or len(spec) != 3:
            raise TypeError(
                f"multi_step: part {name!r} must be (loss_fn, tx, params), got {spec!r}"
            )
        loss_fn, tx, select = spec
        if not callable(loss_fn):
            raise TypeError(
                f"multi_step: part {name!r}: loss_fn must be callable, got {type(loss_fn).__name__}"
            )
        if not isinstance(tx, GradientTransformation):
            raise TypeError(
                f"multi_step: part {name!r}: tx must be a GradientTransformation, got {type(tx).__name__}"
            )
        built.append(Part(name, loss_fn, tx, selector(select, f"multi_step: part {name!r}"), i))
    return Step(built, wrappers, donate=donate, compile=compile)
