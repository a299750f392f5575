"""Wall time of a 12-trial optimizer study run as real Hydra multiruns, against the training floor.

The grid: optimizer sgd, momentum, rmsprop x optimizer.lr 0.0003, 0.001, 0.003, 0.01 (batch 128, 1 epoch each,
real MNIST). The learning rates stay at or below 0.01 because a diverging trial (RMSprop at 0.03+) stops early
with a NonFiniteLossError and would make the timing meaningless; speed does not depend on the rate otherwise.

It runs `python -m mnistlab.train -m ...` as a subprocess twice, each into its own temp store and sweep dir:
  basic    launcher=basic: trials one after another in one process (torch threads = all cores)
  joblib   launcher=joblib hydra.launcher.n_jobs=2: one forked process per trial, 2 at a time (mnistlab's
           launcher, src/mnistlab/launching.py); each trial gets cores / n_jobs torch threads (OMP_NUM_THREADS is set to the same for the subprocess)
with MLflow tracking on (the default) and logger.log_model=false; plots, checkpoints and the sweep report stay on,
as in a real study. Each trial's fit_seconds comes from its <sweep dir>/<n>/timing.json and is cross-checked with
the MLflow store (child runs, tag mlflow.parentRunId, metric fit_seconds), which also gives run durations.

Definitions (printed with the results):
  overhead per trial, basic  = (wall - sum of fit_seconds) / trials
  overhead per trial, joblib = (wall x n_jobs - sum of fit_seconds) / trials  (worker-seconds not spent fitting)
  speedup                    = wall(basic) / wall(joblib)
  floor                      = in-process forward+backward+step on pre-made float batches (epoch_speed.py's (b)),
                               per optimizer at batch 128, measured with 1 thread and with all cores
  target (the goal: "study within 1.3 x the sum of floor epoch times + 2 s per trial"), per launcher with P
  trials in parallel and T = cores // P torch threads each:
      target_wall = (1.3 x sum over trials of floor_epoch(optimizer, T threads) + 2 s x trials) / P
  i.e. the same budget in worker-seconds (1.3 x floor + 2 s per trial) spread over P workers.

    .venv/bin/python benchmarks/sweep_speed.py          # full: two 12-trial sweeps, a few minutes on 2 cores
    .venv/bin/python benchmarks/sweep_speed.py --quick  # 2 trials x 5 batches: checks the script, not a benchmark

Results: a table on stdout and benchmarks/results/sweep_speed.json (--quick: sweep_speed_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import (  # noqa: E402
    DEFAULT_DATA, ROOT, check_processed, environment, floor_batches, load_train_arrays, time_floor,
    verdict, write_json,
)

OPTIMIZERS = ("sgd", "momentum", "rmsprop")
LRS = ("0.0003", "0.001", "0.003", "0.01")
QUICK_OPTIMIZERS, QUICK_LRS, QUICK_BATCHES = ("sgd", "rmsprop"), ("0.001",), 5
BATCH = 128
N_TRAIN = 55000
FLOOR_FACTOR, SECONDS_PER_TRIAL = 1.3, 2.0


def run_multirun(name: str, launcher: list[str], n_jobs: int, data_dir: Path, tmp: Path, optimizers, lrs,
                 quick: bool, cores: int) -> dict:
    sweep_dir, mlruns = tmp / name, tmp / f"mlruns_{name}"
    cmd = [
        sys.executable, "-m", "mnistlab.train", "-m",
        f"optimizer={','.join(optimizers)}", f"optimizer.lr={','.join(lrs)}",
        f"data.batch_size={BATCH}", "trainer.max_epochs=1",
        f"data.processed_dir={data_dir}",
        f"paths.mlruns_dir={mlruns}", f"paths.sweep_reports_dir={tmp / f'reports_{name}'}",
        f"hydra.sweep.dir={sweep_dir}",
        "logger.log_model=false", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
        *launcher,
    ]
    if quick:
        # not trainer.limit_test_batches: with logger.plots on, a partial test split crashes the trial in
        # plots.misclassified_figure (predictions for the tested batches vs labels of the whole split)
        cmd += [f"trainer.limit_train_batches={QUICK_BATCHES}", "trainer.limit_val_batches=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT")}
    threads = max(1, cores // n_jobs)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "1"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = tmp / f"{name}.log"
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-25:]
        print(f"[{name}] multirun exited {proc.returncode}; last lines of its log:\n  " + "\n  ".join(tail))

    trials = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)) \
        if sweep_dir.is_dir() else []
    fits, missing = [], []
    for d in trials:
        m = d / "timing.json"
        if m.is_file():
            fits.append(json.loads(m.read_text())["fit_seconds"])
        else:
            missing.append(d.name)
    return {
        "launcher": name, "n_jobs": n_jobs, "torch_threads": threads, "returncode": proc.returncode,
        "wall_seconds": wall, "trials": len(trials), "trials_with_metrics": len(fits), "trials_missing_metrics": missing,
        "fit_seconds": fits, "sum_fit_seconds": sum(fits), "mlflow": read_mlflow(mlruns), "command": cmd[1:],
    }


def read_mlflow(mlruns: Path) -> dict:
    """Child runs of the sweep's parent in the temp store: status, fit_seconds, run durations."""
    db = mlruns / "mlflow.db"
    if not db.is_file():
        return {"error": f"no store at {db}"}
    try:
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("mnistlab")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
    except Exception as e:  # the timing stands without it
        return {"error": f"{type(e).__name__}: {e}"}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]

    def dur(r):
        return (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else None

    child_durs = [d for d in (dur(r) for r in children) if d is not None]
    return {
        "child_runs": len(children),
        "statuses": sorted({r.info.status for r in children}),
        "sum_fit_seconds": sum(r.data.metrics.get("fit_seconds", 0.0) for r in children),
        "sum_child_run_seconds": sum(child_durs),
        "parent_run_seconds": dur(parents[0]) if len(parents) == 1 else None,
    }


def measure_floor(data_dir: Path, thread_counts: list[int], quick: bool) -> dict:
    """Seconds per training batch of the floor, per optimizer and thread count."""
    import torch

    x, y = load_train_arrays(data_dir)
    batches = floor_batches(x, y, BATCH)
    max_batches = 20 if quick else None
    warmup = 20 if quick else 100
    torch.set_num_threads(max(thread_counts))
    time_floor(batches, "rmsprop", 1, warmup, max_batches=1)  # process warm-up (allocator, oneDNN), discarded
    out: dict = {}
    for t in thread_counts:
        torch.set_num_threads(t)
        for opt in OPTIMIZERS:
            r = time_floor(batches, opt, 1, warmup, max_batches)
            out.setdefault(str(t), {})[opt] = r["epoch_seconds"][0] / r["batches_per_epoch"]
            print(f"  floor {opt:<9} {t} thread(s): {out[str(t)][opt] * 1000:.2f} ms/batch "
                  f"= {out[str(t)][opt] * math.ceil(N_TRAIN / BATCH):.2f} s/epoch", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"2 trials x {QUICK_BATCHES} batches: checks the script runs")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"processed splits (default {DEFAULT_DATA})")
    ap.add_argument("--n-jobs", type=int, default=2, help="joblib workers (default 2)")
    ap.add_argument("--skip", choices=("basic", "joblib"), action="append", default=[], help="leave out a launcher")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (sweep dirs, stores, logs) and print it")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/)")
    args = ap.parse_args(argv)

    data_dir = check_processed(args.data_dir)
    cores = os.cpu_count() or 1
    optimizers, lrs = (QUICK_OPTIMIZERS, QUICK_LRS) if args.quick else (OPTIMIZERS, LRS)
    grid = [(o, lr) for o in optimizers for lr in lrs]
    batches_per_trial = min(QUICK_BATCHES, math.ceil(N_TRAIN / BATCH)) if args.quick else math.ceil(N_TRAIN / BATCH)
    env = environment()
    print(f"sweep_speed: {env['cpu']}, {cores} cores, torch {env['torch']}, git {env['git']}; data {data_dir}")
    print(f"grid: optimizer {','.join(optimizers)} x lr {','.join(lrs)} = {len(grid)} trials, batch {BATCH}, 1 epoch"
          + (f" limited to {QUICK_BATCHES} batches (QUICK MODE: not a benchmark)" if args.quick else ""))

    launchers = [("basic", ["launcher=basic"], 1),
                 ("joblib", ["launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"], args.n_jobs)]
    launchers = [l for l in launchers if l[0] not in args.skip]
    thread_counts = sorted({max(1, cores // p) for _, _, p in launchers} | {1, cores})

    print("floor (in-process, pre-made float batches, one pass per optimizer):", flush=True)
    floor = measure_floor(data_dir, thread_counts, args.quick)

    tmp = Path(tempfile.mkdtemp(prefix="mnistlab-sweep-speed-"))
    results = []
    try:
        for name, launcher, p in launchers:
            r = run_multirun(name, launcher, p, data_dir, tmp, optimizers, lrs, args.quick, cores)
            t = r["torch_threads"]
            floor_sum = sum(floor[str(t)][o] * batches_per_trial for o, _ in grid)
            n = len(grid)
            r.update({
                "planned_trials": n,
                "floor_sum_seconds": floor_sum,
                "target_wall_seconds": (FLOOR_FACTOR * floor_sum + SECONDS_PER_TRIAL * n) / p,
                "overhead_per_trial_seconds": (r["wall_seconds"] * p - r["sum_fit_seconds"]) / n,
            })
            r["pass"] = r["wall_seconds"] <= r["target_wall_seconds"] and r["trials_with_metrics"] == n
            results.append(r)
            print(f"[{name}] wall {r['wall_seconds']:.1f}s, {r['trials_with_metrics']}/{n} trials with metrics, "
                  f"sum fit {r['sum_fit_seconds']:.1f}s", flush=True)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- report
    print()
    print(f"{'launcher':<9}{'P':>3}{'thr':>4}{'trials':>8}{'wall s':>9}{'sum fit':>9}{'fit/trial':>10}"
          f"{'ovh/trial':>10}{'floor sum':>10}{'target s':>9}  verdict")
    for r in results:
        ok = r["trials_with_metrics"]
        print(f"{r['launcher']:<9}{r['n_jobs']:>3}{r['torch_threads']:>4}{str(ok) + '/' + str(r['planned_trials']):>8}"
              f"{r['wall_seconds']:>9.1f}{r['sum_fit_seconds']:>9.1f}{r['sum_fit_seconds'] / max(1, ok):>10.2f}"
              f"{r['overhead_per_trial_seconds']:>10.2f}{r['floor_sum_seconds']:>10.1f}{r['target_wall_seconds']:>9.1f}"
              f"  {verdict(r['pass'])}")
    print("P = trials in parallel, thr = torch threads per trial.")
    print("ovh/trial: basic = (wall - sum fit) / trials; joblib = (wall x n_jobs - sum fit) / trials "
          "(worker-seconds per trial not spent in Trainer.fit).")
    print(f"target = ({FLOOR_FACTOR} x sum over trials of floor_epoch(optimizer, thr) + {SECONDS_PER_TRIAL:g} s x trials) / P; "
          f"floor_epoch = floor s/batch x {batches_per_trial} batches.")
    for r in results:
        m = r["mlflow"]
        if "error" in m:
            print(f"  {r['launcher']}: MLflow cross-check unavailable: {m['error']}")
            continue
        line = (f"  {r['launcher']}: MLflow has {m['child_runs']} child runs ({', '.join(m['statuses']) or '-'}), "
                f"sum fit_seconds {m['sum_fit_seconds']:.1f}s, sum child run durations {m['sum_child_run_seconds']:.1f}s")
        if m.get("parent_run_seconds") is not None:
            line += f", parent run {m['parent_run_seconds']:.1f}s of the {r['wall_seconds']:.1f}s wall"
        print(line)
    by = {r["launcher"]: r for r in results}
    speedup = None
    if "basic" in by and "joblib" in by:
        speedup = by["basic"]["wall_seconds"] / by["joblib"]["wall_seconds"]
        print(f"speedup basic/joblib (wall): {speedup:.2f}x with n_jobs={args.n_jobs} on {cores} cores")
    if args.quick:
        print("QUICK MODE: 5-batch trials are all overhead; the verdicts mean nothing. Run without --quick.")

    payload = {
        "benchmark": "sweep_speed",
        "quick": args.quick,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": env,
        "grid": {"optimizers": list(optimizers), "lrs": list(lrs), "batch_size": BATCH, "epochs": 1,
                 "batches_per_trial": batches_per_trial},
        "floor_seconds_per_batch": floor,
        "formulas": {
            "overhead_per_trial": "(wall x P - sum fit_seconds) / trials; P = 1 for basic, n_jobs for joblib",
            "target_wall": f"({FLOOR_FACTOR} x sum_trials floor_epoch(optimizer, cores//P threads) + "
                           f"{SECONDS_PER_TRIAL} x trials) / P",
            "speedup": "wall(basic) / wall(joblib)",
        },
        "launchers": results,
        "speedup_basic_over_joblib": speedup,
    }
    path = write_json(payload, "sweep_speed_quick.json" if args.quick else "sweep_speed.json", args.json)
    print(f"results: {path}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
