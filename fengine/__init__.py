"""fengine: a functional training engine for PyTorch.

The whole training state is one value (`TrainState`), built by the step that
trains it (``state = step.init(model, seed=0)``); a step is a function from state
to state; AMP, accumulation, finite checks and EMA are wrappers composed in
reading order around it.
"""

from fengine import (
    allocator as allocator,
    checkpoint as checkpoint,
    complexity as complexity,
    config as config,
    data as data,
    distributed as distributed,
    handlers as handlers,
    init as init,
    metrics as metrics,
    optim as optim,
    replay as replay,
    rng as rng,
    schedules as schedules,
    sharding as sharding,
    vector_math as vector_math,  # initialises MKL's vector math on import (bitwise runs)
)
from fengine.compiled import CompileFallbackWarning as CompileFallbackWarning
from fengine.evaluation import default_predict as default_predict, evaluate as evaluate
from fengine.events import (
    Handler as Handler,
    Priority as Priority,
    Retire as Retire,
    RunInfo as RunInfo,
    Save as Save,
    Snapshot as Snapshot,
    Stop as Stop,
    on as on,
)
from fengine.loop import (
    Plan as Plan,
    Preempted as Preempted,
    Tick as Tick,
    Val as Val,
    fit as fit,
    plan as plan,
    should_validate as should_validate,
    train_steps as train_steps,
)
from fengine.multi import multi_step as multi_step
from fengine.plateau import reduce_on_plateau as reduce_on_plateau
from fengine.rng import seed_everything as seed_everything
from fengine.state import DonatedStateError as DonatedStateError, TrainState as TrainState
from fengine.step import (
    Grads as Grads,
    Part as Part,
    Step as Step,
    StepMismatchError as StepMismatchError,
    parse_losses as parse_losses,
    train_step as train_step,
)
from fengine.workdir import WorkDirLocked as WorkDirLocked, lock_work_dir as lock_work_dir
from fengine.wrappers import (
    MicroBatches as MicroBatches,
    Wrapper as Wrapper,
    accumulate as accumulate,
    amp as amp,
    check_finite as check_finite,
    checkpoint_activations as checkpoint_activations,
    data_parallel as data_parallel,
    ema as ema,
    forward_wrapper as forward_wrapper,
    fsdp as fsdp,
    post_update as post_update,
    swa as swa,
)


__version__ = "0.2.0"
