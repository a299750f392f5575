"""A trial's verdict file in its job dir: written by the trial itself (and DIED by a launcher that saw its process
end without one), read by the sweep for its exit code. A file, so a verdict survives the store and the process."""

from __future__ import annotations

import json
import os
from pathlib import Path

TRIAL_STATUS_FILE = ".mnistlab_trial.json"


def write_trial_status(trial_dir: Path, status: str, error: str = "", pid: int | None = None) -> None:
    """RUNNING at the start, FINISHED/FAILED at the end, KILLED when a signal stopped it (or DIED, written by the
    launcher when the trial's process is gone); one that stays RUNNING never ended."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    tmp = trial_dir / f".{TRIAL_STATUS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"status": status, "error": error[:2000], "pid": pid}) + "\n")
    tmp.replace(trial_dir / TRIAL_STATUS_FILE)


def read_trial_status(trial_dir: Path) -> dict:
    """The verdict in `trial_dir` ({} when there is none or it cannot be read)."""
    path = trial_dir / TRIAL_STATUS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def mark_died(trial_dir: Path, reason: str, pid: int | None = None) -> int | None:
    """The one writer of DIED, for every launcher: a trial whose process or job ended without writing its own
    verdict (the OOM killer, SIGKILL after scancel's grace period, a lost node) is DIED, so the sweep's exit code
    counts it; a verdict the trial wrote (FINISHED, FAILED, KILLED) stays. Returns the trial's pid (written at its
    start) when the caller has none."""
    previous = read_trial_status(trial_dir)
    pid = pid if pid is not None else previous.get("pid")
    if previous.get("status", "RUNNING") == "RUNNING":
        write_trial_status(trial_dir, "DIED", reason, pid)
    return pid


def read_trial_statuses(sweep_dir: Path) -> list[dict]:
    out = []
    for f in sorted(sweep_dir.glob(f"**/{TRIAL_STATUS_FILE}")):
        try:
            out.append({**json.loads(f.read_text()), "dir": str(f.parent)})
        except ValueError:
            out.append({"status": "UNREADABLE", "dir": str(f.parent)})
    return out
