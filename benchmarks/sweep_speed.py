"""Wall time of the optimizer study (`sweep=optimizers`, 36 trials with study.seeds=1) with launcher=joblib and with
launcher=stacked, in one run of this script on real MNIST, against the trials' bare compute floor.

  joblib   launcher=joblib hydra.launcher.n_jobs=2: one process per trial, 2 at a time, 1 torch thread each
  stacked  launcher=stacked: compatible trials (same batch size: 6 stacks of 6) trained as one stacked model each,
           2 stacks at a time in their own processes, 1 torch thread each (hydra.launcher.n_jobs: one per core);
           each trial still its own job dir, MLflow child run, checkpoint and report row
Both run `python -m mnistlab.train sweep=optimizers ...` as a subprocess into their own temp store and sweep dir,
with the study's defaults (MLflow, plots, checkpoints and models on).

  floor       each trial's bare forward+backward+step epoch (epoch_speed.py's time_floor: pre-made float batches, denormals
              flushed) at its optimizer and batch size with 1 thread, x epochs, summed over the trials and divided by the
              cores: the wall time of the study's arithmetic at the same total thread count (cores x 1 thread)
  ratio       wall(joblib) / wall(stacked)
  step time   one stacked forward+backward+update (StackedMLP + StackedOptimizer, rmsprop, batch 128, threads = cores;
              a stack of the study runs with cores / stacks-at-once threads)
              at 1, 4 and 12 members, and what one member adds to the resident memory (12 members vs 1)

    .venv/bin/python benchmarks/sweep_speed.py                # full: the 36-trial study twice, ~10 minutes on 2 cores
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


def run_study(name: str, launcher: list[str], threads: int, data_dir: Path, tmp: Path, overrides: list[str]) -> dict:
    sweep_dir, mlruns = tmp / name, tmp / f"mlruns_{name}"
    cmd = [sys.executable, "-m", "mnistlab.train", "sweep=optimizers", *launcher, *overrides,
           f"data.processed_dir={data_dir}", f"paths.mlruns_dir={mlruns}", f"paths.sweep_reports_dir={tmp / f'reports_{name}'}",
           f"hydra.sweep.dir={sweep_dir}", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNISTLAB_PARENT_RUN_ID", "MNISTLAB_ROOT")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
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
    return {"launcher": name, "threads": threads, "returncode": proc.returncode, "wall_seconds": wall,
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
        r = time_floor(batches, opt, 1, 10 if quick else 50, max_batches=10 if quick else None)
        per_epoch[f"{opt} bs{bs}"] = r["epoch_seconds"][0] / r["batches_per_epoch"] * math.ceil(N_TRAIN / bs)
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
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (sweep dirs, stores, logs) and print it")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/)")
    args = ap.parse_args(argv)

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
    try:
        results = [run_study("joblib", ["launcher=joblib", "hydra.launcher.n_jobs=2"], max(1, cores // 2), data_dir, tmp, overrides),
                   run_study("stacked", ["launcher=stacked"], max(1, cores // 2), data_dir, tmp, overrides)]
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    by = {r["launcher"]: r for r in results}
    ratio = by["joblib"]["wall_seconds"] / by["stacked"]["wall_seconds"]
    print()
    print(f"{'launcher':<9}{'trials':>8}{'finished':>10}{'wall s':>9}{'wall/floor':>12}")
    for r in results:
        print(f"{r['launcher']:<9}{r['trials']:>8}{r['finished']:>10}{r['wall_seconds']:>9.1f}"
              f"{r['wall_seconds'] / floor['wall_seconds']:>12.2f}")
    print(f"floor    {len(trials):>8}{'':>10}{floor['wall_seconds']:>9.1f}   (sum of the trials' bare 1-thread epochs "
          f"{floor['sum_trial_seconds']:.1f}s / {cores} cores)")
    print(f"ratio joblib/stacked: {ratio:.2f}x (target >= 1.4x on the 36-trial study)")
    print(f"stacks: {'; '.join(by['stacked']['stacks'])}")
    print("stacked step, batch 128: " + ", ".join(f"{m} members {t:.2f} ms" for m, t in steps["ms_per_step"].items())
          + "; one shared batch: " + ", ".join(f"{t:.2f}" for t in steps["ms_per_step_shared_batch"].values()) + " ms"
          + (f"; one member adds ~{steps['rss_mb_per_member']:.1f} MB resident" if steps["rss_mb_per_member"] else ""))
    if args.quick:
        print("QUICK MODE: 5-batch trials are all overhead; the numbers mean nothing. Run without --quick.")
    payload = {"benchmark": "sweep_speed", "quick": args.quick, "environment": env, "trials": len(trials), "epochs": epochs,
               "overrides": overrides, "floor": floor, "stacked_steps": steps, "launchers": results, "ratio_joblib_over_stacked": ratio}
    path = write_json(payload, "sweep_speed_quick.json" if args.quick else "sweep_speed.json", args.json)
    print(f"results: {path}")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
