"""The one writer of a run's end, for every path: a trial's own exit (TrackedRun), a dead process, a lost SLURM
job, clean-stale, a sweep's parent. No heavy imports: the mnistlab-runs CLI uses it."""

from __future__ import annotations

from mnistlab.tracking.tags import ERROR_TAG, NOTE_TAG

MAX_TAG_CHARS = 5000


def end_run(client, run_id: str, status: str, reason: str = "", note: str | None = None) -> None:
    """A run that did not finish carries why (the error tag and the run's note), then its terminal status."""
    if reason and status != "FINISHED":
        reason = reason[:MAX_TAG_CHARS]
        client.set_tag(run_id, ERROR_TAG, reason)
        client.set_tag(run_id, NOTE_TAG, note or f"**{status}**: {reason}")
    elif note:
        client.set_tag(run_id, NOTE_TAG, note)
    client.set_terminated(run_id, status)


def is_store_failure(e: BaseException) -> bool:
    """An error of the tracking store itself (MLflow's, the database's or the filesystem's), not of our code."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, (MlflowException, OSError)) or type(e).__module__.startswith(("sqlalchemy", "sqlite3"))


def first_line(e: BaseException) -> str:
    """An error in one line: a database error's own line when it wraps one (`(sqlite3.OperationalError) ...`)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    db = [line for line in lines if line.startswith("(") and "Error) " in line]
    return f"{type(e).__name__}: {(db or lines or [''])[0][:300]}"
