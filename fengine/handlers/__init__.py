"""Built-in event handlers (MMEngine's hooks): logging, timing, checkpoints, early stopping, ..."""

from fengine.events import Handler as Handler, Priority as Priority, Stop as Stop
from fengine.handlers.checkpointer import Checkpointer as Checkpointer
from fengine.handlers.early_stopping import (
    EarlyStopping as EarlyStopping,
    MissingMetricError as MissingMetricError,
)
from fengine.handlers.history import History as History
from fengine.handlers.log import (
    Logger as Logger,
    ScalarHistory as ScalarHistory,
    Stat as Stat,
    get_logger as get_logger,
    should_log as should_log,
)
from fengine.handlers.misc import (
    EmptyCache as EmptyCache,
    Profiler as Profiler,
    ScheduleRecorder as ScheduleRecorder,
)
from fengine.handlers.progress import ProgressBar as ProgressBar
from fengine.handlers.tensorboard import TensorBoard as TensorBoard
from fengine.handlers.timing import Timer as Timer
from fengine.handlers.trackers import MLflow as MLflow, Tracker as Tracker, WandB as WandB


def default_handlers() -> list:
    """The handlers `fit` uses when none are given: ``[Timer(), Logger(interval=10, timer=<that Timer>)]``
    (MMEngine's IterTimerHook and LoggerHook; the Timer is shared)."""
    timer = Timer()
    return [timer, Logger(interval=10, timer=timer)]
