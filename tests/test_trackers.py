"""Experiment trackers beside TensorBoard: `WandB` and `MLflow`, run offline.

Each fit writes through the real package -- wandb in ``mode="offline"`` (its run file
under a temp dir, read back record by record), MLflow to a file store in a temp dir (read
back with ``MlflowClient``) -- and the scalars are compared with the `Logger`'s JSON-lines
file of the same run: same iterations, same smoothing, validation at the epoch
(MMEngine's ``log_metric_by_epoch=True``), the resolved config recorded once. A test
skips, naming the package, when its tracker's package is not installed
(``pip install 'fengine[wandb]'`` / ``'fengine[mlflow]'``; the ``test`` extra has both).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from helpers import ce_loss, mlp

import fengine as fe
from fengine import data, optim
from fengine.handlers import MLflow, TensorBoard, Timer, WandB
from fengine.handlers.trackers import flatten_config


CONFIG = {"seed": 0, "optim": {"lr": 0.01, "momentum": 0.0}, "data": {"batch_size": 2}, "tag": "t"}


def fit(work_dir, tracker, *, max_epochs=None, max_steps=None, val_interval=None, logger=None):
    """A real fit on 50 samples (25 updates/epoch), validated, with a Logger sharing the Timer."""
    timer = tracker.timer or Timer()
    loader = data.Loader(data.synthetic_classification(50, 16, 10), 2, seed=0)
    val = fe.Val(
        data.Loader(data.synthetic_classification(20, 16, 10, seed=1), 2, seed=0, shuffle=False),
        [fe.metrics.Accuracy()],
        interval=val_interval,
    )
    step = fe.train_step(ce_loss, optim.sgd(0.01))
    handlers = [timer, logger or fe.handlers.Logger(timer=timer, env=False), tracker]
    fe.fit(step.init(mlp(), seed=0), step, loader, max_epochs=max_epochs, max_steps=max_steps,
           val=val, handlers=handlers, work_dir=work_dir, config=CONFIG)  # fmt: skip
    return [
        json.loads(line) for line in (Path(work_dir) / "scalars.jsonl").read_text().splitlines()
    ]


def expected_series(records, key):
    """``(steps, values)`` of ``train/<key>`` in the Logger's records."""
    rows = [r for r in records if key in r and "loss" in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def same_series(got, expected, rel):
    """``got``, ``(step, value)`` pairs, against `expected_series`."""
    steps, values = expected
    assert [s for s, _ in got] == steps
    assert [v for _, v in got] == pytest.approx(values, rel=rel)


# ------------------------------------------------------------------ wandb
def wandb_records(path):
    """The records of a wandb run file (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, buf, out = Path(path).read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = raw[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def finished_records(path, timeout=120.0):
    """The run file's records once wandb's service has written them all (its ``exit`` record):
    ``run.finish()`` returns before the service has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'fengine[wandb]'")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_scalars_and_config(tmp_path, offline_wandb):
    timer = Timer()
    tracker = WandB("fengine-test", name="toy", mode="offline", timer=timer)
    records = fit(tmp_path / "w", tracker, max_epochs=2)
    assert tracker.run is None  # finished at after_run
    (run_file,) = (tmp_path / "w").glob("wandb/offline-run-*/run-*.wandb")  # dir: the work dir
    rows, config, metrics = [], {}, {}
    for rec in finished_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "metric":
            metrics[rec.metric.glob_name or rec.metric.name] = rec.metric.step_metric
        elif kind == "run":
            assert rec.run.display_name == "toy" and rec.run.project == "fengine-test"
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert {k: config.get(k) for k in CONFIG} == CONFIG
    assert metrics["train/*"] == "step" and metrics["val/*"] == "epoch"
    train = [r for r in rows if "train/loss" in r]
    for key in ("loss", "lr", "time", "data_time"):
        got = [(r["step"], r[f"train/{key}"]) for r in train]
        same_series(got, expected_series(records, key), rel=1e-12)
    assert [r["step"] for r in train] == [10, 20, 35, 45]
    val = [r for r in rows if "val/accuracy" in r]
    assert [(r["epoch"], r["step"]) for r in val] == [(1, 25), (2, 50)]
    assert [r["val/accuracy"] for r in val] == [
        r["val/accuracy"] for r in records if "val/accuracy" in r
    ]
    assert [r["_step"] for r in rows] == list(range(len(rows)))  # wandb's own order: no row dropped


def test_wandb_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'fengine\[wandb\]'"):
        fit(tmp_path, WandB(mode="offline"), max_steps=2)


# ------------------------------------------------------------------ mlflow
@pytest.fixture
def mlflow_client(monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'fengine[mlflow]'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow.tracking import MlflowClient

    return MlflowClient


def test_mlflow_file_store_scalars_params_and_artifacts(tmp_path, mlflow_client):
    import os

    timer = Timer()
    tracker = MLflow("fengine-test", run_name="toy", timer=timer)
    records = fit(tmp_path / "w", tracker, max_epochs=2)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # allowed only while opening its store
    client = mlflow_client(tracking_uri=(tmp_path / "w" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fengine-test").experiment_id])
    assert run.info.run_name == "toy" and run.info.status == "FINISHED"
    for key in ("loss", "lr", "time", "data_time"):
        got = [
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"train/{key}")
        ]
        same_series(sorted(got), expected_series(records, key), rel=1e-12)
    val = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/accuracy")
    )
    assert val == list(enumerate((r["val/accuracy"] for r in records if "val/accuracy" in r), 1))
    for key in ("val/time", "val/data_time"):  # the pass's mean times, as the Logger's records
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in got] == [1, 2]
        assert [v for _, v in got] == pytest.approx([r[key] for r in records if key in r], rel=1e-9)
    assert run.data.params == {k: json.dumps(v) if not isinstance(v, str) else v
                               for k, v in flatten_config(CONFIG).items()}  # fmt: skip
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    log_file = next((tmp_path / "w").glob("*.log")).name
    assert {"config.py", "config.json", log_file, "scalars.jsonl"} <= names


def test_mlflow_uploads_no_file_a_link_in_the_work_dir_points_to(tmp_path, mlflow_client):
    """The work dir is untrusted: a planted link (named like an artifact) chooses no file to upload."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "x"}')
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "planted.json").symlink_to(secret)
    fit(tmp_path / "w", MLflow("fengine-test"), max_steps=2)
    client = mlflow_client(tracking_uri=(tmp_path / "w" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fengine-test").experiment_id])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "planted.json" not in names and "scalars.jsonl" in names


def test_mlflow_iteration_based_validation_at_the_step(tmp_path, mlflow_client):
    fit(tmp_path, MLflow(artifact_suffix=()), max_steps=30, val_interval=20)
    client = mlflow_client(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [20, 30]
    # no work-dir files (artifact_suffix=()), only the config texts
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.py", "config.json"}


# ------------------------------------------------------------------ shared rules
def test_flatten_config_is_mmengines():
    MLflowVisBackend = pytest.importorskip("mmengine.visualization").MLflowVisBackend
    cfg = {"a": 1, "b": {"c": [1, 2], "d": {"e": "x"}}, "f": [{"g": 1}, {"h": 2}]}
    assert flatten_config(cfg) == MLflowVisBackend("unused")._flatten(cfg)


def test_tracker_arguments_are_checked():
    with pytest.raises(TypeError, match="log_metric_by_epoch"):
        TensorBoard(log_metric_by_epoch=1)
    with pytest.raises(TypeError, match="timer"):
        MLflow(timer=object())


def test_tensorboard_records_the_config(tmp_path):
    from tensorboardX.proto.event_pb2 import Event

    fit(tmp_path, TensorBoard(), max_steps=3)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    raw, pos, texts = events.read_bytes(), 0, []
    while pos < len(raw):
        (n,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = Event.FromString(raw[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
        texts += [
            v.tensor.string_val[0].decode()
            for v in event.summary.value
            if v.tag.startswith("config")
        ]
    assert texts == [fe.handlers.banner.format_config(CONFIG)]
