"""The project's MLflow store: one SQLite database under mlruns/, created and migrated once under a lock."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

from mnistlab.paths import conf_dir, resolve, root_of, workspace_root

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
# SQLite waits this long for a writer's lock instead of failing at once with "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60


def default_tracking_uri(mlruns_dir: Path) -> str:
    return f"sqlite:///{Path(mlruns_dir).resolve() / DB_NAME}?timeout={SQLITE_BUSY_TIMEOUT_S}"


# Set by the Makefile's hook in .venv/bin/activate to the URI it exported for the `mlflow` CLI: that is the project's
# own store, not a team server, so paths.mlruns_dir still decides.
VENV_URI_ENV = "MNISTLAB_VENV_TRACKING_URI"


def env_tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI when the user set it (a team server or another store), None when unset or the venv's."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return None if uri and uri == os.environ.get(VENV_URI_ENV) else uri or None


def resolve_tracking_uri(configured: str | None, mlruns_dir: Path) -> str:
    """Config key first, then $MLFLOW_TRACKING_URI (a team server), then the project's own SQLite store."""
    return configured or env_tracking_uri() or default_tracking_uri(mlruns_dir)


def artifact_location(mlruns_dir: Path) -> str:
    return (Path(mlruns_dir).resolve() / ARTIFACTS_DIR).as_uri()


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_store(mlruns_dir: str, tracking_uri: str | None, experiment_name: str, root: Path) -> tuple[str, str]:
    """(tracking URI, experiment id) for a run or sweep of the project at `root`; a DVC temp copy maps back to
    its workspace, so every process writes to one store."""
    uri, mlruns = store_uri(mlruns_dir, tracking_uri, root)
    return uri, ensure_experiment(uri, experiment_name, mlruns)


def store_uri(mlruns_dir: str, tracking_uri: str | None, root: Path) -> tuple[str, Path]:
    """(tracking URI, local mlruns dir) a run of the project at `root` would use, without touching the store."""

    mlruns = resolve(mlruns_dir, workspace_root(root))
    return resolve_tracking_uri(tracking_uri, mlruns), mlruns


def ensure_experiment(tracking_uri: str, experiment_name: str, mlruns_dir: Path) -> str:
    """Create/migrate the store (once, under a file lock) and the experiment; returns its id.

    A fresh SQLite database hit by several processes at once fails its schema migration, so the
    first process to get the lock creates it and the others find it ready.
    """
    from mlflow import MlflowClient

    is_local = tracking_uri.startswith("sqlite:")
    lock = Path(mlruns_dir) / ".store.lock"
    ctx = _file_lock(lock) if is_local else nullcontext()
    with ctx:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment_name)
        if exp is not None and exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if exp is None:
            from mlflow.exceptions import MlflowException

            from mnistlab.tracking.ui import set_experiment_view

            location = artifact_location(mlruns_dir) if is_local else None
            try:
                exp_id = client.create_experiment(experiment_name, artifact_location=location)
            except MlflowException:  # a team server: another process created it first
                return client.get_experiment_by_name(experiment_name).experiment_id
            set_experiment_view(client, exp_id)
            return exp_id
        return exp.experiment_id


def project_store(overrides: list[str] | None = None) -> tuple[str, str, Path]:
    """(tracking URI, experiment name, mlruns dir) as conf/ defines them (paths.mlruns_dir, logger.*), for the
    commands that read the store outside a training run: make ui, mnistlab-report, mnistlab-runs."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides or []))
    root = workspace_root(root_of(cfg.paths.root))
    mlruns = resolve(cfg.paths.mlruns_dir, root)
    return resolve_tracking_uri(cfg.logger.tracking_uri, mlruns), cfg.logger.experiment_name, mlruns
