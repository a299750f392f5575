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
