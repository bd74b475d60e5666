"""Experiment tracking: every stage and round of a pipeline or loop, in MLflow and TensorBoard.

One parent MLflow run per pipeline or loop (its resolved config as parameters) and one nested run
per stage (its outputs: numbers as metrics, the rest as parameters, files as artifacts). The store
is a local file store inside the run folder (``<run>/mlruns``) unless ``MLFLOW_TRACKING_URI``
names another (a server, a database); the same scalars go to TensorBoard event files in
``<run>/tensorboard``. The parent run's id is kept in ``<run>/tracking.json`` so a resumed run
logs into the run it started, not a new one.

Tracking is a record, not part of the work: if MLflow is missing or its store fails, the run goes
on and the problem is logged once as a warning, never raised.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nat_ray import safe_files

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
MLRUNS_DIR = "mlruns"
TENSORBOARD_DIR = "tensorboard"
MAX_PARAM_CHARS = 500  # longer values are cut: a parameter is a label, not a payload
MAX_KEYS = 300  # per log call; a huge nested output is summarised, not mirrored
_BATCH = 100  # MLflow's limit of parameters or metrics in one request
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as one level of dotted keys: ``{"a": {"b": [1, 2]}}`` -> ``a.b.0``, ``a.b.1``."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list | tuple):
        items = enumerate(data)
    else:
        return {prefix: data} if prefix else {}
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict | list | tuple) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def clean_key(key: str) -> str:
    """A key MLflow accepts (letters, digits, ``_ - . / space``); anything else becomes ``-``."""
    return _BAD_KEY_CHARS.sub("-", key)[:250]


def split_values(data: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Flatten ``data`` into metrics (finite numbers, booleans excluded) and parameters (the rest, as text)."""
    metrics, params = {}, {}
    for key, value in flatten(data).items():
        key = clean_key(key)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                metrics[key] = float(value)
        elif value is not None:
            params[key] = str(value)[:MAX_PARAM_CHARS]
    return dict(list(metrics.items())[:MAX_KEYS]), dict(list(params.items())[:MAX_KEYS])


def tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a file store in ``<run_dir>/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / MLRUNS_DIR).as_uri()


def quiet_mlflow() -> None:
    """MLflow's info lines and progress bars would bury the stages' own log."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    for name in ("mlflow", "alembic", "git", "databricks"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """A parent MLflow run and a TensorBoard writer for one run folder; stages log in nested runs.

    Args:
        run_dir: the pipeline's or loop's folder.
        name: the experiment and parent run name (the run's name).
        kind: ``"pipeline"`` or ``"loop"``: a tag, so runs of both kinds can share a server.
        params: the parent run's parameters (the resolved config), logged once.
    """

    def __init__(self, run_dir: str | Path, name: str, kind: str, params: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.name = name
        self.uri = tracking_uri(self.run_dir)
        self.client = None
        self.parent_id: str | None = None
        self.writer = None
        self._warned = False
        self._guard("start MLflow", lambda: self._start_mlflow(kind, params or {}))
        self._guard("start TensorBoard", self._start_tensorboard)

    # -- setup ---------------------------------------------------------------------------------

    def _start_mlflow(self, kind: str, params: dict) -> None:
        quiet_mlflow()
        if self.uri.startswith("file:"):
            # MLflow 3 keeps the file store only behind this switch; the file store needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.name)
        experiment_id = (
            experiment.experiment_id if experiment is not None else client.create_experiment(self.name)
        )
        state_file = self.run_dir / STATE_FILE
        parent_id = self._saved_parent(client, state_file)
        if parent_id is None:
            run = client.create_run(experiment_id, run_name=self.name, tags={"nat_ray.kind": kind})
            parent_id = run.info.run_id
            safe_files.write_json(state_file, {"tracking_uri": self.uri, "parent_run_id": parent_id})
            self.client, self.parent_id = client, parent_id
            self._log_params(parent_id, params)
        else:
            client.update_run(parent_id, status="RUNNING")
            self.client, self.parent_id = client, parent_id

    def _saved_parent(self, client, state_file: Path) -> str | None:
        """The parent run a resumed run continues, if it is in this store and still exists."""
        try:
            state = safe_files.read_json(state_file)
        except FileNotFoundError:
            return None
        except safe_files.DamagedFile as damaged:
            log.warning("tracking: %s; starting a new parent run", damaged)
            return None
        if state.get("tracking_uri") != self.uri:
            return None
        try:
            client.get_run(state["parent_run_id"])
        except Exception:  # noqa: BLE001 - deleted or unknown run: start a new one
            return None
        return state["parent_run_id"]

    def _start_tensorboard(self) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a tracking call; a failure is one warning (the first) and a debug line, never an error."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - tracking must never stop the work it records
            if not self._warned:
                log.warning("tracking: cannot %s (%s: %s); the run goes on", what, type(err).__name__, err)
                self._warned = True
            else:
                log.debug("tracking: cannot %s: %s", what, err)
            return None

    # -- logging -------------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        values = {clean_key(k): str(v)[:MAX_PARAM_CHARS] for k, v in flatten(params).items() if v is not None}
        items = [Param(k, v) for k, v in list(values.items())[: 10 * MAX_KEYS]]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict, step: int = 0, prefix: str = "", run_id: str | None = None) -> None:
        """Numbers of ``metrics`` (nested is fine) on the parent run (or ``run_id``) and in TensorBoard."""
        values, _ = split_values(metrics)
        if self.client is not None and (run_id or self.parent_id):
            self._guard("log metrics", lambda: self._log_metrics(run_id or self.parent_id, values, step))
        if self.writer is not None:
            for key, value in values.items():
                tag = f"{prefix}/{key}" if prefix else key
                self._guard("write TensorBoard", lambda t=tag, v=value: self.writer.add_scalar(t, v, step))
            self._guard("flush TensorBoard", self.writer.flush)

    def log_artifacts(
        self, paths: list[str | Path], run_id: str | None = None, under: str | None = None
    ) -> None:
        """Copy files or folders into the run's artifacts (missing ones are skipped)."""
        if self.client is None:
            return
        target = run_id or self.parent_id
        for path in map(Path, paths):
            if path.is_dir():
                self._guard(
                    f"log {path}", lambda p=path: self.client.log_artifacts(target, str(p), under or p.name)
                )
            elif path.is_file():
                self._guard(f"log {path}", lambda p=path: self.client.log_artifact(target, str(p), under))

    @contextlib.contextmanager
    def child(self, name: str, params: dict | None = None) -> Iterator[str | None]:
        """A nested run for one stage or round; yields its id (None when MLflow is off).

        The run ends FINISHED, or FAILED when the block raises (the error goes on).
        """
        run_id = None
        if self.client is not None:
            run = self._guard(
                f"start run {name}",
                lambda: self.client.create_run(
                    self.client.get_run(self.parent_id).info.experiment_id,
                    run_name=name,
                    tags={"mlflow.parentRunId": self.parent_id, "nat_ray.stage": name},
                ),
            )
            run_id = run.info.run_id if run is not None else None
            if run_id and params:
                self._guard("log parameters", lambda: self._log_params(run_id, params))
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            if run_id:
                self._guard("end run", lambda: self.client.set_terminated(run_id, status))

    def stage(
        self, name: str, fn: Callable[[], dict], step: int = 0, artifacts: tuple = ()
    ) -> Callable[[], dict]:
        """``fn`` wrapped so that running it opens a nested run and logs its outputs there.

        For :func:`nat_ray.experiment.manifest.run_stage`: a stage the manifest skips is not logged again.
        A ``history`` list of ``{"step", ...}`` records in the outputs becomes metrics by step.
        """

        def tracked() -> dict:
            with self.child(name) as run_id:
                outputs = fn()
                self.log_outputs(name, outputs, step=step, run_id=run_id, artifacts=artifacts)
            return outputs

        return tracked

    def log_outputs(
        self, name: str, outputs: dict, step: int = 0, run_id: str | None = None, artifacts: tuple = ()
    ) -> None:
        """A stage's outputs: numbers as metrics, text as parameters, ``history`` by step, files."""
        outputs = dict(outputs)
        history = outputs.pop("history", None)
        metrics, params = split_values(outputs)
        prefix = clean_key(name).replace(" ", "_")
        if run_id:
            self._guard("log parameters", lambda: self._log_params(run_id, params))
        self.log_metrics(metrics, step=step, prefix=prefix, run_id=run_id)
        if isinstance(history, list):
            for record in history:
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    rest = {k: v for k, v in record.items() if k != "step"}
                    self.log_metrics(rest, step=record["step"], prefix=f"{prefix}/history", run_id=run_id)
        if artifacts:
            self.log_artifacts(list(artifacts), run_id=run_id)

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run and flush TensorBoard."""
        if self.client is not None and self.parent_id:
            self._guard("end the parent run", lambda: self.client.set_terminated(self.parent_id, status))
        if self.writer is not None:
            self._guard("close TensorBoard", self.writer.close)


@contextlib.contextmanager
def tracked_run(run_dir: str | Path, name: str, kind: str, params: dict | None = None) -> Iterator[Tracker]:
    """A :class:`Tracker` whose parent run ends FINISHED, or FAILED when the block raises."""
    tracker = Tracker(run_dir, name, kind, params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.close(status)
