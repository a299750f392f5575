"""One MLflow run's lifecycle: created with its tags, fed by Lightning's MLFlowLogger, always ended with a status.

The run, not the logger, owns the status: MLFlowLogger.finalize marks a run FINISHED when fit ends, before
test and artifacts; here the run ends FINISHED only after everything is logged, FAILED with the error on an
exception, KILLED on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnistlab.callbacks import clean_float
from mnistlab.tracking.status import end_run, first_line, is_store_failure
from mnistlab.tracking.tags import ERROR_TAG, NOTE_TAG, SWEEP_DIR_TAG



class RunOwnedMLFlowLogger(MLFlowLogger):
    """MLFlowLogger writing into a run it did not create, in batches; finalize() leaves the status to TrackedRun.

Epoch-level metrics are logged at step = epoch number (1-based, as curves.csv), so MLflow charts them against
the epoch; per-step ones (`*_step`) keep the global step. Values lose their float32 noise (clean_float).

    Per-step metrics are buffered and written with the next epoch-level metrics in one log_batch: each write is
    a SQLite transaction, and one per logging step cost ~0.3 s per MNIST epoch (a fifth of it) in benchmarks.
    """

    MAX_PENDING = 500  # MLflow accepts up to 1000 metrics per log_batch

    def __init__(self, run: "TrackedRun", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run  # whose store_error says the store has failed
        self._pending: list = []
        self._last_step_values: dict[str, float] = {}
        # what MLFlowLogger passes to log_batch itself (it keeps it in a private attribute)
        self.batch_kwargs = {} if kwargs.get("synchronous") is None else {"synchronous": kwargs["synchronous"]}

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        epoch_level = any(k != "epoch" and not k.endswith("_step") for k in metrics)
        if epoch_level and "epoch" in metrics:  # charted against the epoch (1, 2, ...), as in curves.csv
            step = int(metrics["epoch"]) + 1
        metrics = {k: clean_float(v) for k, v in metrics.items() if not isinstance(v, str)}
        # Once a fit should stop (max_time, early stopping) Lightning flushes its cached step metrics on every step:
        # a `*_step` value equal to the last one written is that stale cache, not a new point.
        stale = {k for k, v in metrics.items() if k.endswith("_step") and self._last_step_values.get(k) == v}
        self._last_step_values.update({k: v for k, v in metrics.items() if k.endswith("_step")})
        self._pending += [Metric(k, v, ts, step or 0) for k, v in metrics.items() if k not in stale]
        if epoch_level or len(self._pending) >= self.MAX_PENDING:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        if self._pending and self.run.store_error is None:
            try:
                self.experiment.log_batch(run_id=self.run_id, metrics=self._pending, **self.batch_kwargs)
            except Exception as e:  # the store failed: training goes on, the results land locally (train.py)
                if not is_store_failure(e):
                    raise
                self.run.store_failed(e)
        self._pending = []

    def finalize(self, status: str = "success") -> None:
        self.flush()


@contextmanager
def keep_tracking_uri_env():
    """Restore $MLFLOW_TRACKING_URI on exit.

    mlflow.set_tracking_uri (also called inside Lightning's MLFlowLogger) exports it, which would silently send
    every later run in this process (and its children) to that store; the store stays a per-run decision.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


@contextmanager
def fluent_uri(uri: str):
    """Point MLflow's global (fluent) API at `uri` for a moment, then restore it."""
    import mlflow

    with keep_tracking_uri_env():
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)


def flush_async(uri: str) -> None:
    """Wait for metric writes queued by async logging (synchronous=False) to land in `uri`."""
    import mlflow

    with fluent_uri(uri):
        mlflow.flush_async_logging()


class _ExceptionRecorder(pl.Callback):
    """Keeps the exception Lightning saw: it turns Ctrl-C into SystemExit(1) before we get it."""

    def __init__(self, run: "TrackedRun"):
        self.run = run

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.run.seen_exception = exception


def restore_sigint() -> None:
    """Lightning ignores Ctrl-C after the first one while it shuts down; give the user their Ctrl-C back (from the
    main thread: only it may set a handler, and a run closed in another thread has no Ctrl-C of its own)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def status_for(exc: BaseException | None, seen: BaseException | None) -> str:
    """MLflow status for how a run ended: FINISHED, KILLED (interrupt/SIGTERM) or FAILED."""
    if exc is None:
        return "FINISHED"
    for e in (exc, seen):
        if isinstance(e, (KeyboardInterrupt, SIGTERMException)):
            return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    return "FAILED"


_UNIQUE_VIOLATION = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed")


def log_inputs(client, run_id: str, datasets: list, attempts: int = 4) -> None:
    """client.log_inputs, retried when another run inserted the same dataset at the same moment. MLflow's store looks
    a dataset up and inserts it in one transaction, so two trials of one experiment starting together collide on the
    datasets table's unique key (seen in CI: a SLURM trial FAILED with psycopg's UniqueViolation on "dataset_pk");
    on a retry the lookup finds the other run's row."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as e:
            if attempt == attempts - 1 or not any(m in str(e) for m in _UNIQUE_VIOLATION):
                raise
            time.sleep(0.2 * (attempt + 1))


class _NoStoreTracebacks(logging.Filter):
    """MLflow's SQL store logs every database error with its traceback before raising it; a run reports a failing
    store itself, in one line (TrackedRun.store_failed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


_STORE_LOG = logging.getLogger("mlflow.store.db.utils")


class TrackedRun:
    """Context manager around one MLflow run (a single training or one sweep trial)."""

    def __init__(self, tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str], synchronous: bool,
                 reopen: str | None = None, system_metrics: bool = False, inputs: list | None = None):
        from mlflow import MlflowClient

        self.tracking_uri, self.experiment_id, self.run_name = tracking_uri, experiment_id, run_name
        self.tags, self.synchronous = tags, synchronous
        self.system_metrics, self.inputs, self._monitor = system_metrics, inputs or [], None
        self.client = MlflowClient(tracking_uri)
        self.run_id: str | None = reopen  # a run to continue (a requeued SLURM job), else a new one
        self.status: str | None = None
        self.seen_exception: BaseException | None = None
        self.store_error: BaseException | None = None  # the store failed mid-run (store_failed)
        self._quiet_store = _NoStoreTracebacks()

    def __enter__(self) -> "TrackedRun":
        _STORE_LOG.addFilter(self._quiet_store)
        new = self.run_id is None
        if new:
            self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags).info.run_id
        try:
            self._start(new)
        except BaseException as e:  # the run exists now: it ends FAILED (or KILLED) with the reason, never RUNNING
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _start(self, new: bool) -> None:
        """What follows the run's creation (or reopening): its datasets, or the reopened run's state; system metrics."""
        if new:
            if self.inputs:  # the run page's "Datasets used" (tracking/lineage.py)
                log_inputs(self.client, self.run_id, self.inputs)
        else:
            # Continue the run of this job's previous start: RUNNING again, this process's tags, its error cleared.
            from mlflow.entities import RunTag

            before = self.client.get_run(self.run_id)
            self.run_name = before.info.run_name
            self.client.update_run(self.run_id, status="RUNNING")
            note = f"Continued in a new process after its previous one ended {before.info.status}"
            if before.data.tags.get(ERROR_TAG):
                self.client.delete_tag(self.run_id, ERROR_TAG)
                note += f" ({before.data.tags[ERROR_TAG]})"
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in {**self.tags, NOTE_TAG: note}.items()])
        if self.system_metrics:  # CPU, memory, disk, network (GPU when present) as system/* metrics
            from mnistlab.compat import system_metrics_monitor

            self._monitor = system_metrics_monitor(self.run_id, self.tracking_uri)
            self._monitor.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        _STORE_LOG.removeFilter(self._quiet_store)
        restore_sigint()
        if self._monitor is not None:
            self._monitor.finish()
        self.status = status_for(exc, self.seen_exception)
        if exc is not None:
            try:
                exc.mlflow_run_id = self.run_id
            except AttributeError:
                pass
        message = ""
        if self.store_error is not None:  # it stays RUNNING until clean-stale, once the store works again
            return False
        try:
            try:
                flush_async(self.tracking_uri)
                if self.status != "FINISHED":
                    cause = self.seen_exception if isinstance(exc, SystemExit) and self.seen_exception else exc
                    message = f"{type(cause).__name__}: {cause}"
                    text = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
                    self.client.log_text(self.run_id, text, "error.txt")
            finally:
                end_run(self.client, self.run_id, self.status, message)
        except Exception as e:
            if not is_store_failure(e):
                raise
            self.store_failed(e)
        return False

    def logger(self) -> RunOwnedMLFlowLogger:
        return RunOwnedMLFlowLogger(self, run_id=self.run_id, tracking_uri=self.tracking_uri, synchronous=self.synchronous)

    def store_failed(self, error: BaseException) -> None:
        """The store failed mid-run: said once; from here on nothing more is sent to it (train() writes the
        results locally and exits with EXIT_NOT_RECORDED, 3)."""
        if self.store_error is None:
            self.store_error = error
            logging.getLogger("mnistlab.tracking").error(
                "the MLflow store %s failed (%s); training goes on, results are written locally only",
                self.tracking_uri, first_line(error))

    def recording(self, what: Callable[[], Any]) -> None:
        """Send something to the store unless it has failed; a failure of the store is recorded, not raised."""
        if self.store_error is not None:
            return
        try:
            what()
        except Exception as e:
            if not is_store_failure(e):
                raise
            self.store_failed(e)

    def callback(self) -> pl.Callback:
        return _ExceptionRecorder(self)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_model(self, model, input_example) -> None:
        log_torch_model(self.tracking_uri, self.run_id, model, input_example)

INPUT_NOTE = "float32 [N, 784]: the 28x28 pixels row by row, scaled to [0, 1] (uint8 / 255); output: 10 logits"


def log_torch_model(tracking_uri: str, run_id: str, model, input_example) -> None:
    """The model as TorchScript under the run's `model`: loaded back by mlflow.pytorch.load_model it is a module
    (.eval(), .train(), .to() work, unlike the pt2 graph MLflow writes by default) and loading runs no pickled
    Python. The signature cannot say the input's range, so the metadata does."""
    import warnings

    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    signature = infer_signature(input_example, output)
    flavor_log = logging.getLogger("mlflow.pytorch")
    level = flavor_log.level
    # start_run(run_id) resumes the run for the fluent API; the run's status stays its owner's to set.
    # MLflow's "pickle is unsafe" warning is about pickled modules; a TorchScript archive is not one. torch 2.14
    # marks TorchScript deprecated (FutureWarnings on script and on the load MLflow does to check the example).
    flavor_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), fluent_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.(script|load).* deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive", category=UserWarning)
            scripted = torch.jit.script(model)
            mlflow.pytorch.log_model(
                scripted, name="model", signature=signature, input_example=input_example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], serialization_format="pickle",
                metadata={"input": INPUT_NOTE},
            )
    finally:
        flavor_log.setLevel(level)


PARENT_ENV = "MNISTLAB_PARENT_RUN_ID"
PARENT_FILE = ".mlflow_parent_run_id"


def parent_run_id(sweep_dir: Path | None, client=None) -> str | None:
    """The sweep's parent run: from the file the sweep callback wrote in the sweep dir (works on any
    launcher, even on cluster nodes that share the filesystem), else from the environment.

    In a sweep, the parent must be the run of *this* sweep dir (its `mnistlab.sweep_dir` tag): a stale
    environment variable or a file from another sweep never attaches a trial to the wrong parent."""
    file = Path(sweep_dir) / PARENT_FILE if sweep_dir is not None else None
    found = (file.read_text().strip() if file is not None and file.is_file() else "") or os.environ.get(PARENT_ENV, "")
    if not found or sweep_dir is None or client is None:
        return found or None
    tagged = client.get_run(found).data.tags.get(SWEEP_DIR_TAG, "")
    if tagged and Path(tagged).resolve() == Path(sweep_dir).resolve():
        return found
    logging.getLogger(__name__).warning(
        "parent run %s belongs to sweep dir %s, not %s: this trial is recorded without a parent", found, tagged, sweep_dir
    )
    return None


def unique_run_name(client, experiment_id: str, base: str) -> str:
    """`base`, or `base #N` when the experiment already has runs of that name (re-runs of one config)."""
    quoted = base.replace("'", "")
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name LIKE '{quoted}%'", max_results=1000)
    taken = {r.info.run_name for r in runs}
    if base not in taken:
        return base
    n = 2
    while f"{base} #{n}" in taken:
        n += 1
    return f"{base} #{n}"
