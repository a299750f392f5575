"""`mnistlab-runs clean-stale`: mark RUNNING runs whose process is gone as KILLED (and `ui`, `activate-hook`).

A SIGKILL (or a power cut) cannot be caught, so such a run would stay RUNNING forever; each run records
its host, pid and process start time, which tells a dead process from a live one (or a reused pid).
"""

from __future__ import annotations

import argparse
import socket

import psutil

from mnistlab.tracking.status import end_run
from mnistlab.tracking.store import (
    VENV_URI_ENV, artifact_location, default_tracking_uri, ensure_experiment, project_store,
)
from mnistlab.tracking.tags import HOST_TAG, PID_TAG, PROC_START_TAG
from mnistlab.tracking.ui import runs_url, set_experiment_view


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
            end_run(client, run.info.run_id, "KILLED",
                    note=f"**KILLED** by clean-stale: process {tags[PID_TAG]} on {host} is gone")
        print(f"{'would kill' if dry_run else 'killed'} {run.info.run_id} {run.info.run_name!r} (pid {tags[PID_TAG]} gone)")
    return killed


def end_runs_of_process(client, pid: int, status: str, reason: str) -> list[str]:
    """End the RUNNING runs that process `pid` on this host opened (a sweep trial whose process died) with
    `status` and `reason` on the run, as a failed run carries its error."""
    host = socket.gethostname()
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=f"attributes.status = 'RUNNING' and tags.`{PID_TAG}` = '{int(pid)}' and tags.`{HOST_TAG}` = '{host}'",
        max_results=100,
    )
    for run in runs:
        end_run(client, run.info.run_id, status, reason)
    return [r.info.run_id for r in runs]
def port_problem(host: str, port: int) -> str | None:
    """Why `mlflow ui` could not listen on host:port (None: it can), found by binding it for a moment."""
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as e:
        return (f"cannot serve the MLflow UI on {host}:{port}: {e.strerror or e}. Another program (an earlier "
                f"`make ui`?) holds that port: stop it, or pick another with `make ui UI_PORT={port + 1}` "
                f"(`mnistlab-runs ui --port {port + 1}`). Nothing was started.")


def serve_ui(host: str, port: int, experiment: str | None = None, overrides: list[str] | None = None) -> None:
    """Print the link to the experiment's training runs, then become `mlflow ui` over the project's store."""
    import os
    import shutil
    import sys

    from mlflow import MlflowClient

    problem = port_problem(host, port)
    if problem:  # before any link is printed: a link to a port another program holds leads nowhere
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    uri, name, mlruns = project_store(overrides)
    exp_id = ensure_experiment(uri, experiment or name, mlruns)
    set_experiment_view(MlflowClient(uri), exp_id)  # also for an experiment made before the project set it
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"MLflow UI for {uri}\n  training runs of {experiment or name!r}: {runs_url(f'http://{shown}:{port}', exp_id)}",
          flush=True)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    args = [mlflow, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        args += ["--default-artifact-root", artifact_location(mlruns)]
    # mlflow 3.17's server imports starlette's deprecated WSGI middleware: a StarletteDeprecationWarning (a
    # UserWarning) per server process on every start, nothing a user can act on
    os.environ.setdefault("PYTHONWARNINGS", "ignore:starlette.middleware.wsgi is deprecated")
    os.execv(mlflow, args)


def activate_hook(uri: str) -> str:
    """Lines for .venv/bin/activate (make setup appends them): the `mlflow` CLI (runs, experiments, ui) of an activated
    shell sees the project's store instead of opening a new ./mlflow.db, unless MLFLOW_TRACKING_URI already names a
    store; `deactivate` takes back what it set. mnistlab itself tells this URI from a user's by VENV_URI_ENV."""
    return f"""
# mnistlab: the mlflow CLI sees the project's store (mnistlab-runs activate-hook)
if [ -z "${{MLFLOW_TRACKING_URI:-}}" ]; then
    export MLFLOW_TRACKING_URI="{uri}" MLFLOW_BACKEND_STORE_URI="{uri}" {VENV_URI_ENV}="{uri}"
fi
eval "_mnistlab_venv_deactivate () $(declare -f deactivate | tail -n +2)"
deactivate () {{
    if [ -n "${{{VENV_URI_ENV}:-}}" ]; then
        unset MLFLOW_TRACKING_URI MLFLOW_BACKEND_STORE_URI {VENV_URI_ENV}
    fi
    _mnistlab_venv_deactivate "$@"
}}
"""


def main(argv: list[str] | None = None) -> None:
    from mlflow import MlflowClient

    ap = argparse.ArgumentParser(prog="mnistlab-runs", description="Housekeeping for the project's MLflow store.")
    sub = ap.add_subparsers(dest="command", required=True)
    cs = sub.add_parser("clean-stale", help="mark RUNNING runs whose process is gone as KILLED")
    cs.add_argument("--tracking-uri", default=None, help="default: the store conf/ defines")
    cs.add_argument("--experiment", action="append", help="limit to these experiments (default: all)")
    cs.add_argument("--dry-run", action="store_true")
    ui = sub.add_parser("ui", help="mlflow ui over the project's store, printing the link to its training runs")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--experiment", default=None, help="default: logger.experiment_name in conf/")
    ui.add_argument("overrides", nargs="*", help="config overrides, e.g. paths.mlruns_dir=/elsewhere")
    hook = sub.add_parser("activate-hook", help="lines for .venv/bin/activate that point the mlflow CLI at the store")
    hook.add_argument("overrides", nargs="*", help="config overrides, e.g. paths.mlruns_dir=/elsewhere")
    args = ap.parse_args(argv)
    if args.command == "activate-hook":
        print(activate_hook(default_tracking_uri(project_store(args.overrides)[2])))
        return
    if args.command == "ui":
        serve_ui(args.host, args.port, args.experiment, args.overrides)
        return
    uri = args.tracking_uri or project_store()[0]
    killed = clean_stale(MlflowClient(uri), args.experiment, args.dry_run)
    print(f"{len(killed)} stale run(s) {'found' if args.dry_run else 'marked KILLED'}")


if __name__ == "__main__":
    main()
