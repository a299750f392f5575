"""Wall time of the optimizer study (`sweep=optimizers`, 36 trials with study.seeds=1) with launcher=joblib and with
launcher=stacked, in one run of this script on real MNIST, against the trials' bare compute floor.

  joblib   launcher=joblib hydra.launcher.n_jobs=2: one process per trial, 2 at a time, 1 torch thread each
  stacked  the default launcher of sweep=optimizers (no launcher override): compatible trials (same batch size: 6
           stacks of 6) trained as one stacked model each, 2 stacks at a time in their own processes, 1 torch thread
           each (hydra.launcher.n_jobs: one per core);
           each trial still its own job dir, MLflow child run, checkpoint and report row
Both run `python -m mnistlab.train sweep=optimizers study.seeds=1 ...` as a subprocess into a fresh temp store and
sweep dir each run, with the study's defaults (MLflow, plots, checkpoints and models on); --repeats runs each launcher
that many times (the median is quoted).

  floor       each trial's bare forward+backward+step epoch (the median of 3; epoch_speed.py's time_floor: pre-made
              float batches, denormals flushed) at its optimizer and batch size with 1 thread, x epochs, summed over the trials and divided by the
              cores: the wall time of the study's arithmetic at the same total thread count (cores x 1 thread)
  ratio       wall(joblib) / wall(stacked)
  step time   one stacked forward+backward+update (StackedMLP + StackedOptimizer, rmsprop, batch 128, threads = cores;
              a stack of the study runs with cores / stacks-at-once threads)
              at 1, 4 and 12 members, and what one member adds to the resident memory (12 members vs 1)

    .venv/bin/python benchmarks/sweep_speed.py                # full: the 36-trial study twice, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/sweep_speed.py --launchers stacked --repeats 3  # the default study command, median 3
    .venv/bin/python benchmarks/sweep_speed.py --seeds 3      # the seed-replicated study (108 trials)
    .venv/bin/python benchmarks/sweep_speed.py --quick        # 3 trials x 5 batches: checks the script, not a benchmark

Results: a table on stdout and benchmarks/results/sweep_speed.json (--quick: sweep_speed_quick.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import (  # noqa: E402
    DEFAULT_DATA, ROOT, check_processed, environment, floor_batches, load_train_arrays, rss_now_mb, time_floor,
    write_json,
)

N_TRAIN = 55000
QUICK = ["study.seeds=1", "study.lrs=[0.01]", "study.batch_sizes=[128]", "study.max_epochs=1",
         "trainer.limit_train_batches=5", "trainer.limit_val_batches=1"]


def study_grid(overrides: list[str]) -> tuple[list[tuple[str, float, int]], int]:
    """The study's trials as (optimizer, lr, batch size) per seed, and its epochs, composed as the CLI would."""
    from hydra import compose, initialize_config_dir

    import mnistlab.train  # noqa: F401  (registers the sweep_values resolver)
    from mnistlab.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=optimizers", *overrides])
    s = cfg.study
    trials = [(o, float(lr), int(bs)) for o in s.optimizers for lr in s.lrs for bs in s.batch_sizes for _ in range(s.seeds)]
    return trials, int(s.max_epochs)


def run_study(name: str, launcher: list[str], data_dir: Path, tmp: Path, overrides: list[str]) -> dict:
    sweep_dir, mlruns = tmp / name, tmp / f"mlruns_{name}"
    cmd = [sys.executable, "-m", "mnistlab.train", "sweep=optimizers", *launcher, *overrides,
           f"data.processed_dir={data_dir}", f"paths.mlruns_dir={mlruns}", f"paths.sweep_reports_dir={tmp / f'reports_{name}'}",
           f"hydra.sweep.dir={sweep_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT")}
    env.update({"HYDRA_FULL_ERROR": "1",  # no thread variables: each launcher sets its processes' threads itself
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"{name}.log"
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"[{name}] exited {proc.returncode}; last lines of its log:\n  " + "\n  ".join(log_path.read_text().splitlines()[-25:]))
    statuses = [json.loads(f.read_text())["status"] for f in sweep_dir.glob("*/.mnistlab_trial.json")] if sweep_dir.is_dir() else []
    stacks = [line.split("launcher=stacked: ", 1)[1] for line in log_path.read_text().splitlines() if "launcher=stacked: " in line]
    print(f"[{name}] wall {wall:.1f}s, trials {len(statuses)} ({statuses.count('FINISHED')} finished)", flush=True)
    return {"launcher": name, "returncode": proc.returncode, "wall_seconds": wall,
            "trials": len(statuses), "finished": statuses.count("FINISHED"), "failed": statuses.count("FAILED"),
            "stacks": stacks, "command": cmd[1:]}


def measure_floor(data_dir: Path, trials, epochs: int, cores: int, quick: bool) -> dict:
    """Seconds of one bare epoch per (optimizer, batch size) at 1 thread, and the study's floor wall time."""
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    x, y = load_train_arrays(data_dir)
    per_epoch = {}
    for opt, bs in sorted({(o, b) for o, _, b in trials}):
        batches = floor_batches(x, y, bs)
        r = time_floor(batches, opt, 1 if quick else 3, 10 if quick else 50, max_batches=10 if quick else None)
        epoch = statistics.median(r["epoch_seconds"])  # 3 epochs: this VM changes speed for seconds at a time
        per_epoch[f"{opt} bs{bs}"] = epoch / r["batches_per_epoch"] * math.ceil(N_TRAIN / bs)
        print(f"  floor {opt:<9} bs {bs:<4} 1 thread: {per_epoch[f'{opt} bs{bs}']:.2f} s/epoch", flush=True)
    total = sum(per_epoch[f"{o} bs{b}"] for o, _, b in trials) * epochs
    return {"epoch_seconds": per_epoch, "sum_trial_seconds": total, "wall_seconds": total / cores}


def stacked_steps(cores: int, quick: bool) -> dict:
    """ms per stacked training step (rmsprop, batch 128) at 1, 4 and 12 members, each member its own batch (members
    of different seeds) and one batch for all (one seed: the wide first-layer gemm), and resident MB per member."""
    import torch

    from mnistlab.nets import MLP
    from mnistlab.stacked.nets import StackedMLP, StackedOptimizer, member_losses

    torch.set_num_threads(cores)
    opt_cfg = {"_target_": "torch.optim.RMSprop", "lr": 1e-3, "alpha": 0.9, "eps": 1e-7}
    out, shared, rss = {}, {}, {}
    for m in (1, 4, 12):
        stack = StackedMLP([MLP(784, [512], 10, "relu", 0.0) for _ in range(m)])
        opt = StackedOptimizer(stack.parameters(), ["rmsprop"] * m, [opt_cfg] * m)
        x, y = torch.rand(m, 128, 784), torch.randint(0, 10, (m, 128))
        steps = 5 if quick else 100
        for into, batch in ((out, x), (shared, x[0])):
            for i in range(steps + 5):
                if i == 5:
                    t0 = time.perf_counter()
                opt.zero_grad()
                member_losses(stack(batch), y).sum().backward()
                opt.step()
            into[m] = (time.perf_counter() - t0) / steps * 1000
        rss[m] = rss_now_mb()
        print(f"  stacked step, {m:>2} members: {out[m]:.2f} ms ({out[m] / m:.2f} ms per member); one shared batch "
              f"{shared[m]:.2f} ms ({shared[m] / m:.2f} per member)", flush=True)
        del stack, opt, x, y
    per_member = (rss[12] - rss[1]) / 11 if rss[1] is not None else None
    return {"ms_per_step": out, "ms_per_step_shared_batch": shared, "rss_mb_per_member": per_member}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 trials x 5 batches: checks the script runs")
    ap.add_argument("--seeds", type=int, default=1, help="study.seeds (1: the 36-trial study; 3: the 108-trial one)")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help=f"processed splits (default {DEFAULT_DATA})")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each launcher (median; the issue's figure: 3)")
    ap.add_argument("--launchers", default="joblib,stacked", help="which launchers to time (default: both)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (sweep dirs, stores, logs) and print it")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/)")
    args = ap.parse_args(argv)
    launchers = {"joblib": ["launcher=joblib", "hydra.launcher.n_jobs=2"], "stacked": []}  # stacked: the default
    chosen = [name for name in args.launchers.split(",") if name]
    if not chosen or set(chosen) - set(launchers):
        ap.error(f"--launchers: a comma-separated subset of {','.join(launchers)}")

    data_dir = check_processed(args.data_dir)
    cores = os.cpu_count() or 1
    overrides = QUICK if args.quick else [f"study.seeds={args.seeds}"]
    trials, epochs = study_grid(overrides)
    env = environment()
    print(f"sweep_speed: {env['cpu']}, {cores} cores, torch {env['torch']}, git {env['git']}; data {data_dir}")
    print(f"study: {len(trials)} trials x {epochs} epochs" + ("  (QUICK MODE: 5 batches per trial, not a benchmark)" if args.quick else ""))
    print("floor (bare epochs, 1 thread):", flush=True)
    floor = measure_floor(data_dir, trials, epochs, cores, args.quick)
    if args.quick:  # 5 batches per trial, not whole epochs
        floor["wall_seconds"] *= 5 / math.ceil(N_TRAIN / 128)
    print("stacked step time (threads = cores):", flush=True)
    steps = stacked_steps(cores, args.quick)

    tmp = Path(tempfile.mkdtemp(prefix="mnistlab-sweep-speed-"))
    results = []
    try:
        for r in range(1 if args.quick else args.repeats):
            for name in chosen:  # a fresh store and sweep dir each run
                results.append({**run_study(name, launchers[name], data_dir, tmp / f"r{r}", overrides),
                                "repeat": r})
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    by = {name: statistics.median(r["wall_seconds"] for r in results if r["launcher"] == name) for name in chosen}
    ratio = by["joblib"] / by["stacked"] if {"joblib", "stacked"} <= set(by) else None
    print()
    print(f"{'launcher':<9}{'runs':>5}{'trials':>8}{'finished':>10}{'median wall s':>15}{'wall/floor':>12}")
    for name in chosen:
        runs = [r for r in results if r["launcher"] == name]
        print(f"{name:<9}{len(runs):>5}{runs[0]['trials']:>8}{min(r['finished'] for r in runs):>10}{by[name]:>15.1f}"
              f"{by[name] / floor['wall_seconds']:>12.2f}")
    print(f"floor    {'':>5}{len(trials):>8}{'':>10}{floor['wall_seconds']:>15.1f}   (sum of the trials' bare 1-thread "
          f"epochs {floor['sum_trial_seconds']:.1f}s / {cores} cores)")
    if ratio:
        print(f"ratio joblib/stacked: {ratio:.2f}x")
    print("stacks: " + "; ".join(next((r["stacks"] for r in results if r["launcher"] == "stacked"), [])))
    print("stacked step, batch 128: " + ", ".join(f"{m} members {t:.2f} ms" for m, t in steps["ms_per_step"].items())
          + "; one shared batch: " + ", ".join(f"{t:.2f}" for t in steps["ms_per_step_shared_batch"].values()) + " ms"
          + (f"; one member adds ~{steps['rss_mb_per_member']:.1f} MB resident" if steps["rss_mb_per_member"] else ""))
    if args.quick:
        print("QUICK MODE: 5-batch trials are all overhead; the numbers mean nothing. Run without --quick.")
    payload = {"benchmark": "sweep_speed", "quick": args.quick, "environment": env, "trials": len(trials), "epochs": epochs,
               "overrides": overrides, "floor": floor, "stacked_steps": steps, "launchers": results, "median_wall_seconds": by,
               "median_over_floor": {k: v / floor["wall_seconds"] for k, v in by.items()}, "ratio_joblib_over_stacked": ratio}
    path = write_json(payload, "sweep_speed_quick.json" if args.quick else "sweep_speed.json", args.json)
    print(f"results: {path}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
