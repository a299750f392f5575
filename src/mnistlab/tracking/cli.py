"""`mnistlab-runs clean-stale`: mark RUNNING runs whose process is gone as KILLED.

A SIGKILL (or a power cut) cannot be caught, so such a run would stay RUNNING forever; each run records
its host, pid and process start time, which tells a dead process from a live one (or a reused pid).
"""

from __future__ import annotations

import argparse
import socket

import psutil

from mnistlab.tracking.tags import HOST_TAG, NOTE_TAG, PID_TAG, PROC_START_TAG


def process_alive(pid: int, start_time: str | None) -> bool:
    try:
        proc = psutil.Process(pid)
        return start_time is None or abs(proc.create_time() - float(start_time)) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def clean_stale(client, experiment_names: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """KILL every RUNNING run started on this host whose process is gone; returns their ids."""
    host = socket.gethostname()
    exps = [e.experiment_id for e in client.search_experiments()
            if not experiment_names or e.name in experiment_names]
    killed = []
    for run in client.search_runs(exps, filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        if process_alive(int(tags[PID_TAG]), tags.get(PROC_START_TAG)):
            continue
        killed.append(run.info.run_id)
        if not dry_run:
            client.set_tag(run.info.run_id, NOTE_TAG, f"**KILLED** by clean-stale: process {tags[PID_TAG]} on {host} is gone")
            client.set_terminated(run.info.run_id, "KILLED")
        print(f"{'would kill' if dry_run else 'killed'} {run.info.run_id} {run.info.run_name!r} (pid {tags[PID_TAG]} gone)")
    return killed


def end_runs_of_process(client, pid: int, status: str, reason: str) -> list[str]:
    """End the RUNNING runs that process `pid` on this host opened (a sweep trial whose process died) with
    `status` and `reason` on the run, as a failed run carries its error."""
    from mnistlab.tracking.tags import ERROR_TAG

    host = socket.gethostname()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=f"attributes.status = 'RUNNING' and tags.`{PID_TAG}` = '{int(pid)}' and tags.`{HOST_TAG}` = '{host}'",
        max_results=100,
    )
    for run in runs:
        client.set_tag(run.info.run_id, ERROR_TAG, reason)
        client.set_tag(run.info.run_id, NOTE_TAG, f"**{status}**: {reason}")
        client.set_terminated(run.info.run_id, status)
    return [r.info.run_id for r in runs]


def main(argv: list[str] | None = None) -> None:
    from mlflow import MlflowClient

    from mnistlab.paths import workspace_root
    from mnistlab.tracking.store import resolve_tracking_uri

    ap = argparse.ArgumentParser(prog="mnistlab-runs", description="Housekeeping for the project's MLflow store.")
    sub = ap.add_subparsers(dest="command", required=True)
    cs = sub.add_parser("clean-stale", help="mark RUNNING runs whose process is gone as KILLED")
    cs.add_argument("--tracking-uri", default=None)
    cs.add_argument("--experiment", action="append", help="limit to these experiments (default: all)")
    cs.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri, workspace_root() / "mlruns")
    killed = clean_stale(MlflowClient(uri), args.experiment, args.dry_run)
    print(f"{len(killed)} stale run(s) {'found' if args.dry_run else 'marked KILLED'}")


if __name__ == "__main__":
    main()
