"""Built-in event handlers (MMEngine's hooks): logging, timing, checkpoints, early stopping, ..."""

from fengine.events import Handler as Handler, Priority as Priority, Stop as Stop


def default_handlers() -> list:
    """The handlers `fit` uses when none are given."""
    return []
