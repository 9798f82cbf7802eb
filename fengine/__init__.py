"""fengine: a functional training engine for PyTorch.

The whole training state is one value (`TrainState`); a step is a function from
state to state; AMP, accumulation, clipping and EMA are composable transforms.
"""

from fengine import (
    checkpoint as checkpoint,
    config as config,
    data as data,
    handlers as handlers,
    metrics as metrics,
    multi as multi,
    optim as optim,
    replay as replay,
    rng as rng,
    schedules as schedules,
)
from fengine.events import (
    Handler as Handler,
    Priority as Priority,
    RunInfo as RunInfo,
    Save as Save,
    Snapshot as Snapshot,
    Stop as Stop,
)
from fengine.loop import (
    Val as Val,
    evaluate as evaluate,
    fit as fit,
    should_validate as should_validate,
)
from fengine.state import DonatedStateError as DonatedStateError, TrainState as TrainState
from fengine.step import (
    GradResult as GradResult,
    Step as Step,
    parse_losses as parse_losses,
    train_step as train_step,
)
from fengine.transforms import (
    MicroBatches as MicroBatches,
    accumulate as accumulate,
    amp as amp,
    check_finite as check_finite,
    compose as compose,
    ema as ema,
    ema_params as ema_params,
)


__version__ = "0.1.0"
