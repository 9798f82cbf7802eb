"""Step wrappers: the pieces `fengine.train_step` composes around the gradient and the update.

A wrapper overrides the hooks of the stages it acts at (see `fengine.step`):
``forward(grad_fn, part)``, ``gradient(apply, part)``, ``after(step_fn)``.
Within a stage the first written is the outermost (post-update wrappers: the innermost, so they
act in the order written), so
``train_step(loss, tx, amp("float16"), accumulate(4), ema(0.999))`` runs:
autocast forward -> loss x scale -> backward (x 4 micro-batches) -> unscale once
-> skip on inf -> ``tx`` (clip, optimizer: true gradients) -> scale update -> EMA.

A wrapper that keeps state names it (``name``): it lives in ``state.extra[name]``,
is built by ``init`` when the step builds the state, and is read through the
wrapper (``ema.params(state)``, ``amp.scaler(state)``), never by key elsewhere.
"""

from fengine.wrappers.accumulate import MicroBatches as MicroBatches, accumulate as accumulate
from fengine.wrappers.amp import ScalerState as ScalerState, amp as amp
from fengine.wrappers.base import (
    Wrapper as Wrapper,
    check_finite as check_finite,
    check_wrappers as check_wrappers,
    forward_wrapper as forward_wrapper,
    post_update as post_update,
)
from fengine.wrappers.data_parallel import data_parallel as data_parallel
from fengine.wrappers.ema import EmaState as EmaState, ema as ema, swa as swa
from fengine.wrappers.fsdp import fsdp as fsdp
from fengine.wrappers.remat import checkpoint_activations as checkpoint_activations
