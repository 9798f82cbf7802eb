"""Experiment trackers: the scalars `Logger` prints, sent to TensorBoard, Weights & Biases or MLflow.

`Tracker` is what they share (MMEngine's visualizer backends driven by its LoggerHook):
rank 0 only; training scalars smoothed and picked at the iterations the logger logs,
written as ``train/<key>`` at ``step`` (MMEngine's ``iter + 1``); validation results as
``val/<key>`` at the epoch in epoch-based runs (``log_metric_by_epoch=True``, MMEngine's
default) or at the step; ``test/<key>`` at the step; and the resolved run config
(``fit(config=...)``) once at the start. A backend implements `Tracker._start`,
`Tracker._log` and `Tracker._finish`.

`WandB` and `MLflow` need their packages (``pip install fengine[wandb]``,
``fengine[mlflow]``); each is imported only by the rank that writes, when the run starts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fengine.events import Snapshot
from fengine.handlers.banner import format_config
from fengine.handlers.log import (
    MEAN_PATTERN,
    _epoch_label,
    _host_items,
    _is_number,
    _rank as _rank,  # the base class's rank check; tests patch it here too
    _TrainScalars,
)
from fengine.handlers.timing import Timer


__all__ = ["MLflow", "Tracker", "WandB", "flatten_config"]


def flatten_config(config: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (MMEngine's ``MLflowVisBackend._flatten``:
    lists of mappings are numbered, other lists kept whole)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key, sep))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                if isinstance(x, Mapping):
                    out.update(flatten_config(x, f"{key}{sep}{i}", sep))
                else:
                    out[f"{key}{sep}{i}"] = x
        else:
            out[key] = v
    return out


class Tracker(_TrainScalars):
    """Base of the scalar trackers (`TensorBoard`, `WandB`, `MLflow`): when and what to write.

    Args:
        interval, window_size, ignore_last, mean_pattern: as for `Logger` (same
            iterations, same smoothing).
        timer: a `Timer` that is also in the handlers, to log ``time`` and ``data_time``.
        log_metric_by_epoch: in epoch-based runs, write validation results at the
            epoch (MMEngine's LoggerHook default); False: at the step. Iteration-based
            runs always use the step (MMEngine wants this flag switched off there).
        log_config: record the run's resolved config at the start.
    """

    def __init__(
        self,
        *,
        interval: int = 10,
        window_size: int = 10,
        ignore_last: bool = True,
        timer: Timer | None = None,
        log_metric_by_epoch: bool = True,
        log_config: bool = True,
        mean_pattern: str = MEAN_PATTERN,
        priority: int | str | None = None,
        name: str | None = None,
    ) -> None:
        handler = name
        name = type(self).__name__
        if timer is not None and not isinstance(timer, Timer):
            raise TypeError(
                f"{name}: timer must be a fengine.handlers.Timer or None, got {type(timer).__name__}"
            )
        for flag, value in (
            ("log_metric_by_epoch", log_metric_by_epoch),
            ("log_config", log_config),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {flag} must be a bool, got {value!r}")
        super().__init__(
            interval, window_size, ignore_last, timer, (), mean_pattern, priority, handler
        )
        self.log_metric_by_epoch = log_metric_by_epoch
        self.log_config = log_config
        self._started = False

    # ------------------------------------------------------------------ the backend
    def _start(self, snap: Snapshot) -> None:
        """Open the backend (rank 0, at ``before_run``)."""
        raise NotImplementedError

    def _log(self, scalars: Mapping[str, float], step: int, snap: Snapshot) -> None:
        """Write ``scalars`` (keys already ``train/...``, ``val/...``) at ``step``."""
        raise NotImplementedError

    def _log_config(self, config: Mapping[str, Any], snap: Snapshot) -> None:
        """Record the resolved config (default: nothing)."""
        del config, snap

    def _finish(self) -> None:
        """Flush and close the backend."""

    def close(self) -> None:
        """Flush and close (idempotent; `fit` calls it at ``after_run``)."""
        if self._started:
            self._started = False
            self._finish()

    # ------------------------------------------------------------------ steps
    def eval_step(self, snap: Snapshot) -> int:
        """The step validation/test results are written at: the epoch for validation in an
        epoch-based run with ``log_metric_by_epoch`` (MMEngine's ``runner.epoch``), else the step."""
        if snap.phase == "val" and snap.run.by_epoch and self.log_metric_by_epoch:
            return _epoch_label(snap)
        return snap.step

    # ------------------------------------------------------------------ events
    def on_before_run(self, snap: Snapshot) -> None:
        super().on_before_run(snap)
        if not self._active:
            return
        self.close()  # a tracker reused by a second fit starts afresh
        self._start(snap)
        self._started = True
        if self.log_config and snap.run.config:
            self._log_config(snap.run.config, snap)

    def on_after_run(self, snap: Snapshot) -> None:
        self.close()

    def on_after_train_iter(self, snap: Snapshot) -> None:
        tag = self._train_scalars(snap)
        if tag is not None:
            self._write(snap, {f"train/{k}": v for k, v in tag.items()}, snap.step)

    def _after_eval_epoch(self, snap: Snapshot) -> None:
        if self._is_active():
            results = _host_items(snap.metrics)
            numbers = {k: v for k, v in results.items() if _is_number(v)}
            tag = self._eval_scalars(snap.phase, numbers)  # as the Logger's (MMEngine's val tag)
            scalars = {f"{snap.phase}/{k}": float(v) for k, v in tag.items()}
            if self.timer is not None:  # the pass's mean times, as MMEngine's val tag has them
                for key in ("data_time", "time"):
                    value = self.timer.mean(key, snap.phase, "epoch")
                    if value is not None:
                        scalars[f"{snap.phase}/{key}"] = value
            self._write(snap, scalars, self.eval_step(snap))

    on_after_val_epoch = _after_eval_epoch
    on_after_test_epoch = _after_eval_epoch

    def _write(self, snap: Snapshot, scalars: Mapping[str, float], step: int) -> None:
        if not self._started:  # an evaluation outside fit, or a handler used without before_run
            self._start(snap)
            self._started = True
        self._log(scalars, step, snap)


def _work_dir(snap: Snapshot, what: str) -> Path:
    if snap.run.work_dir is None:
        raise ValueError(f"{what}; pass it, or fit(..., work_dir=...)")
    return Path(snap.run.work_dir)


class WandB(Tracker):
    """Weights & Biases (MMEngine's ``WandbVisBackend``): scalars and the resolved config.

    Each write is one ``run.log`` row with the global ``step`` and ``epoch`` as columns;
    ``train/*`` is plotted against ``step`` and ``val/*`` against ``epoch`` (epoch-based
    runs with ``log_metric_by_epoch``) or ``step`` (``define_metric``), so the rows stay
    in wandb's own increasing order whatever the x-axis. The config goes to
    ``wandb.init(config=...)`` (``run.config``).

    Args:
        project, name, mode, dir: ``wandb.init``'s (``mode="offline"`` writes only to
            ``dir``, for ``wandb sync`` later; ``dir`` defaults to the work dir).
        init_kwargs: more ``wandb.init`` arguments (MMEngine's ``init_kwargs``).
        Others: as for `Tracker`.
    """

    name = "wandb"  # its smoothing windows are checkpointed (state_dict)

    def __init__(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        mode: str | None = None,
        dir: str | Path | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.project, self.run_name, self.mode = project, name, mode
        self.dir = Path(dir) if dir is not None else None
        self.init_kwargs = dict(init_kwargs or {})
        self.run: Any = None

    def _start(self, snap: Snapshot) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandB needs the wandb package: pip install 'fengine[wandb]'") from e
        directory = self.dir or _work_dir(snap, "WandB: no dir and no work_dir")
        directory.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"dir": str(directory)}
        for key, value in (("project", self.project), ("name", self.run_name), ("mode", self.mode)):
            if value is not None:
                kwargs[key] = value
        if self.log_config and snap.run.config:  # recorded with the run itself
            kwargs["config"] = dict(snap.run.config)
        kwargs.update(self.init_kwargs)
        self.run = wandb.init(**kwargs)
        val_axis = "epoch" if snap.run.by_epoch and self.log_metric_by_epoch else "step"
        self.run.define_metric("step")
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="step")
        self.run.define_metric("val/*", step_metric=val_axis)
        self.run.define_metric("test/*", step_metric="step")

    def _log(self, scalars: Mapping[str, float], step: int, snap: Snapshot) -> None:
        row = dict(scalars)
        if snap.phase == "val" and snap.run.by_epoch and self.log_metric_by_epoch:
            row.update(epoch=step, step=snap.step)
        else:
            row.update(step=step, epoch=_epoch_label(snap))
        self.run.log(row)

    def _finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MLflow(Tracker):
    """MLflow tracking (MMEngine's ``MLflowVisBackend``): metrics at their step, the flattened
    config as params, the config text and the work dir's logs as artifacts.

    Uses an ``MlflowClient`` of its own (no global active run is started or changed).

    Args:
        experiment: the experiment name (created if missing; MMEngine's ``exp_name``,
            default ``"Default"``).
        run_name: the run's name; tags: run tags.
        tracking_uri: where to track; default ``$MLFLOW_TRACKING_URI``, else a local file
            store ``<work_dir>/mlruns`` (MMEngine's default). MLflow 3 refuses new file
            stores unless ``MLFLOW_ALLOW_FILE_STORE=true``: for that default store the
            handler allows it (for the store it opens only); pass a ``sqlite:///...`` URI
            (needs the full ``mlflow`` package) to use a database.
        artifact_suffix: files at the top of the work dir uploaded when the run ends
            (MMEngine's: ``.json``, ``.log``, ``.py``, ``yaml``; and ``.jsonl``, the scalars and run
            logs); links are not followed; ``()``: none.
        Others: as for `Tracker`.
    """

    name = "mlflow"  # its smoothing windows are checkpointed (state_dict)

    def __init__(
        self,
        experiment: str = "Default",
        *,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        tracking_uri: str | None = None,
        artifact_suffix: tuple[str, ...] = (".json", ".jsonl", ".log", ".py", "yaml"),
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.experiment, self.run_name = experiment, run_name
        self.tags = dict(tags or {})
        self.tracking_uri = tracking_uri
        # a single suffix is one suffix (MMEngine's str.endswith), not its characters
        suffixes = (
            (artifact_suffix,) if isinstance(artifact_suffix, str) else tuple(artifact_suffix)
        )
        if not all(isinstance(x, str) for x in suffixes):
            raise TypeError(
                f"MLflow: artifact_suffix must be a str or strs, got {artifact_suffix!r}"
            )
        self.artifact_suffix = suffixes
        self.client: Any = None
        self.run_id: str | None = None
        self._work_dir: Path | None = None

    def _uri(self, snap: Snapshot) -> tuple[str, bool]:
        if self.tracking_uri is not None:
            return self.tracking_uri, False
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env, False
        root = _work_dir(snap, "MLflow: no tracking_uri and no work_dir") / "mlruns"
        root.mkdir(parents=True, exist_ok=True)
        return root.resolve().as_uri(), True

    def _start(self, snap: Snapshot) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ImportError(
                "MLflow needs the mlflow package: pip install 'fengine[mlflow]'"
            ) from e
        uri, default_store = self._uri(snap)
        key, before = "MLFLOW_ALLOW_FILE_STORE", os.environ.get("MLFLOW_ALLOW_FILE_STORE")
        if default_store and before is None:
            os.environ[key] = "true"  # the client builds (and caches) its store now
        try:
            self.client = MlflowClient(tracking_uri=uri)
        finally:
            if default_store and before is None:
                del os.environ[key]
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.experiment)
        )
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        self._work_dir = Path(snap.run.work_dir) if snap.run.work_dir is not None else None

    def _log_config(self, config: Mapping[str, Any], snap: Snapshot) -> None:
        from mlflow.entities import Param

        params = [
            Param(k, v if isinstance(v, str) else json.dumps(v, default=str))
            for k, v in flatten_config(config).items()
        ]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, format_config(config), "config.py")
        self.client.log_text(
            self.run_id, json.dumps(dict(config), indent=2, default=str) + "\n", "config.json"
        )

    def _log(self, scalars: Mapping[str, float], step: int, snap: Snapshot) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def _finish(self) -> None:
        if self.client is None or self.run_id is None:
            return
        if self._work_dir is not None and self.artifact_suffix:
            for path in sorted(self._work_dir.iterdir()):  # a link planted there is not followed
                if (not path.is_symlink() and path.is_file()
                        and path.name.endswith(self.artifact_suffix)):  # fmt: skip
                    self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.client, self.run_id = None, None
