"""Seconds per epoch of the command a user types, `python -m mnistlab.train` with the default config (progress bar,
MLflow, checkpoints, real MNIST), beside the floor measured in the same sitting.

  pty     the command in a terminal (a pseudo-terminal: the progress bar draws as on a screen)
  file    stdout and stderr to a file (a batch job, `dvc repro`, CI)
  nobar   to a file with trainer.enable_progress_bar=false: what the bar costs (callbacks.rich_progress_bar=null
          alone is not that: Lightning then adds its own RichProgressBar, which redraws after every batch)
  floor   forward + backward + step of the same MLP and optimizer on pre-made float batches of the same 55k training
          images (epoch_speed.py's time_floor), in this process, with the threads the command uses (all cores),
          measured right before and after each command run (the median of those epochs)

An epoch of the command is timed from the run's own records: the median gap between the val/acc timestamps MLflow
stored for consecutive epochs (so an epoch includes its validation and checkpoint; epoch 1, with start-up and the
sanity check, has no gap before it). Each command run sits between two floor measurements and counts only when the
machine kept one speed throughout (steady_run); each ratio is the median over the repeats of (command epoch / the
floor around it).

    .venv/bin/python benchmarks/command_speed.py                 # 3 repeats x 3 variants x 6 epochs: 6-15 minutes
    .venv/bin/python benchmarks/command_speed.py --quick         # 1 repeat, 2 epochs: checks the script

Results: a table on stdout and benchmarks/results/command_speed.json (--quick: command_speed_quick.json).
"""

from __future__ import annotations

import argparse
import os
import pty
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import (  # noqa: E402
    DEFAULT_DATA, ROOT, check_processed, environment, floor_batches, load_train_arrays, time_floor, write_json,
)

VARIANTS = {"pty": [], "file": [], "nobar": ["trainer.enable_progress_bar=false"]}


def val_acc_times(db: Path) -> list[float]:
    """The val/acc timestamps (s) of the one run in the SQLite store `db`, in epoch order."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT step, timestamp FROM metrics WHERE key = 'val/acc' ORDER BY step").fetchall()
    return [t / 1000 for _, t in rows]


def epoch_gaps(db: Path) -> list[float]:
    stamps = val_acc_times(db)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_in_pty(cmd: list[str], log: Path, timeout: float) -> int:
    """The command with a pseudo-terminal as its stdin, stdout and stderr; what it draws is drained into `log`."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), "TERM": "xterm-256color", "COLUMNS": "120"},
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)

    def drain():
        with open(log, "wb") as out:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed its end
                    return
                if not chunk:
                    return
                out.write(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        reader.join(timeout=10)
        os.close(master)
    return rc


def command_epoch(variant: str, data_dir: Path, epochs: int, tmp: Path, timeout: float = 600) -> dict:
    mlruns, run_dir = tmp / "mlruns", tmp / "run"
    cmd = [sys.executable, "-m", "mnistlab.train", f"trainer.max_epochs={epochs}", f"data.processed_dir={data_dir}",
           f"paths.mlruns_dir={mlruns}", f"hydra.run.dir={run_dir}", *VARIANTS[variant]]
    log = tmp / f"{variant}.log"
    t0 = time.perf_counter()
    if variant == "pty":
        rc = _run_in_pty(cmd, log, timeout)
    else:
        with open(log, "w") as out:
            rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{variant}: exit {rc}; last lines:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    gaps = epoch_gaps(mlruns / "mlflow.db")
    return {"epoch_seconds": statistics.median(gaps), "gaps": [round(g, 3) for g in gaps], "wall_seconds": round(wall, 2)}


def steady_run(variant: str, batches: list, data_dir: Path, epochs: int, floor_epochs: int, tolerance: float,
               tries: int) -> dict:
    """One command run between two floor measurements, tried again while the machine changed speed under it.

    This shared VM switches between speeds (the floor's epoch goes 0.93 s <-> 1.3 s, CPU time as much as wall time,
    for tens of seconds at a time), so a ratio counts only when every floor epoch before and after and every epoch
    gap of the command lie within `tolerance` of their medians. After `tries` unsteady tries the last one is kept,
    marked steady=false."""
    for attempt in range(tries):
        before = time_floor(batches, "rmsprop", floor_epochs, 50)["epoch_seconds"]
        with tempfile.TemporaryDirectory(prefix=f"mnistlab-cmd-{variant}-") as tmp:
            run = command_epoch(variant, data_dir, epochs, Path(tmp))
        after = time_floor(batches, "rmsprop", floor_epochs, 50)["epoch_seconds"]
        floors = before + after
        floor = statistics.median(floors)
        steady = (max(floors) <= floor * (1 + tolerance) and min(floors) >= floor * (1 - tolerance)
                  and max(run["gaps"]) <= run["epoch_seconds"] * (1 + tolerance)
                  and min(run["gaps"]) >= run["epoch_seconds"] * (1 - tolerance))
        if steady:
            break
    return {**run, "floor": floor, "floor_epochs": [round(f, 3) for f in floors],
            "over_floor": run["epoch_seconds"] / floor, "steady": steady, "rejected": attempt + (0 if steady else 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--floor-epochs", type=int, default=2, help="floor epochs before and after each command run")
    ap.add_argument("--tolerance", type=float, default=0.08, help="how far an epoch may lie from its median")
    ap.add_argument("--tries", type=int, default=4, help="tries per repeat while the machine is unsteady")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true", help="1 repeat of 2 epochs: checks the script, not a benchmark")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    repeats, epochs, floor_epochs = (1, 2, 1) if args.quick else (args.repeats, args.epochs, args.floor_epochs)

    import torch

    data_dir = check_processed(args.data_dir)
    cores = os.cpu_count() or 1
    torch.set_flush_denormal(True)  # as the command (flush_denormal: true), before the first parallel op
    torch.set_num_threads(cores)  # the command's threads: num_threads null = cores / 1 job
    batches = floor_batches(*load_train_arrays(data_dir), 128)
    env = environment()
    print(f"command_speed: {env['cpu']}, {cores} cores, torch {env['torch']}, git {env['git']}; {repeats} repeats x "
          f"{epochs} epochs", flush=True)
    rows: list[dict] = []
    for r in range(repeats):
        row = {"repeat": r}
        for variant in VARIANTS:
            row[variant] = steady_run(variant, batches, data_dir, epochs, floor_epochs, args.tolerance, args.tries)
            m = row[variant]
            print(f"  repeat {r}: {variant:<5} {m['epoch_seconds']:.3f} s/epoch ({m['over_floor']:.2f}x the floor "
                  f"{m['floor']:.3f} s; {m['rejected']} unsteady tries set aside)", flush=True)
        rows.append(row)
    summary = {v: {"median_epoch_seconds": statistics.median(row[v]["epoch_seconds"] for row in rows),
                   "median_over_floor": statistics.median(row[v]["over_floor"] for row in rows)} for v in VARIANTS}
    summary["floor"] = {"median_epoch_seconds": statistics.median(row[v]["floor"] for row in rows for v in VARIANTS)}
    print(f"\n{'variant':<8}{'s/epoch':>10}{'/ floor':>10}")
    for v in VARIANTS:
        print(f"{v:<8}{summary[v]['median_epoch_seconds']:>10.3f}{summary[v]['median_over_floor']:>10.2f}")
    print(f"{'floor':<8}{summary['floor']['median_epoch_seconds']:>10.3f}")
    if args.quick:
        print("QUICK MODE: 2-epoch runs, one repeat; the numbers mean little. Run without --quick.")
    path = write_json({"benchmark": "command_speed", "quick": args.quick, "environment": env, "epochs": epochs,
                       "repeats": rows, "summary": summary},
                      "command_speed_quick.json" if args.quick else "command_speed.json", args.json)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
