"""Where a steady-state mnistlab epoch goes: cProfile over epochs 2..N of ONE default run (real MNIST, batch 128,
RMSprop, MLflow on, default callbacks incl. the RichProgressBar, validation and checkpoint included), split into
the parts issue 13 names. Times are inclusive (cumulative) per part, per training step (total / steps).

    .venv/bin/python benchmarks/epoch_profile.py [--epochs 3] [--threads 2] [extra Hydra overrides ...]

cProfile inflates Python-heavy parts (a hook call costs more under the profiler than without), so read the table
for where the time goes, and epoch_speed.py for how long an epoch takes. "Lightning loop + hooks (rest)" is the
profiled epoch minus every named part: the fit loop, hook dispatch, closure, optimizer wrappers, result collection.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_speed import DEFAULT_DATA, check_processed, compose  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

# part -> (filename fragment, function name) of the entry points whose inclusive time the part is.
PARTS = [
    ("forward (net)", [("torch/nn/modules/container.py", "forward")]),
    ("backward", [("torch/autograd/__init__.py", "backward")]),
    ("optimizer math (RMSprop)", [("torch/optim/rmsprop.py", "rmsprop")]),
    ("zero_grad", [("torch/optim/optimizer.py", "zero_grad")]),
    ("batch iterator (DeviceBatches)", [("mnistlab/data/datamodule.py", "__iter__")]),
    ("train metrics update (torchmetrics / on-device sums)", [("torchmetrics/metric.py", "wrapped_func"),
                                                             ("mnistlab/model.py", "_accumulate_train")]),
    ("self.log (training)", [("lightning/pytorch/core/module.py", "log")]),
    ("progress bar", [("lightning/pytorch/callbacks/progress/rich_progress.py", "on_train_batch_end"),
                      ("lightning/pytorch/callbacks/progress/tqdm_progress.py", "on_train_batch_end")]),
    ("logger (MLflow) writes", [("lightning/pytorch/loggers/mlflow.py", "log_metrics")]),
    ("validation loop (5k images)", [("lightning/pytorch/loops/evaluation_loop.py", "run")]),
    ("checkpoint save", [("lightning/pytorch/callbacks/model_checkpoint.py", "_save_checkpoint")]),
]


class ProfileEpochs(pl.Callback):
    """Profiles from the start of the 2nd training epoch to the end of training (checkpoint + validation inside)."""

    def __init__(self):
        self.prof = cProfile.Profile()
        self.t0 = self.t1 = 0.0
        self.steps0 = self.steps1 = 0

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.steps0 = trainer.global_step
            self.t0 = time.perf_counter()
            self.prof.enable()

    def on_train_end(self, trainer, pl_module):
        self.prof.disable()
        self.t1 = time.perf_counter()
        self.steps1 = trainer.global_step


def cumtime(stats: pstats.Stats, fragment: str, func: str) -> float:
    # the largest entry that matches: inner recursive calls of the same function are included in it
    times = [v[3] for (fn, _, name), v in stats.stats.items() if fragment in fn.replace(os.sep, "/") and name == func]
    return max(times, default=0.0) if func != "wrapped_func" else sum(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3, help="epochs in the run; the first is not profiled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    data = check_processed(args.data_dir)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mnistlab.train import train

    tmp = Path(tempfile.mkdtemp(prefix="mnistlab-profile-"))
    prof = ProfileEpochs()
    ProfileEpochs.current = prof
    ov = [f"data.processed_dir={data}", "data.batch_size=128", "optimizer=rmsprop", f"trainer.max_epochs={args.epochs}",
          "logger.log_model=false", "logger.plots=false", f"paths.root={tmp}", f"paths.output_dir={tmp / 'out'}",
          f"paths.mlruns_dir={tmp / 'mlruns'}", f"paths.sweep_reports_dir={tmp / 'reports'}",
          f"num_threads={args.threads}", f"+callbacks.zz_profile._target_={__name__}.current",
          *args.overrides]
    train(compose(ov))
    stats = pstats.Stats(prof.prof)
    steps = prof.steps1 - prof.steps0
    total = stats.total_tt
    print(f"\nprofiled {args.epochs - 1} epochs, {steps} training steps, {total:.2f}s under cProfile "
          f"({(prof.t1 - prof.t0):.2f}s wall), load average {os.getloadavg()[0]:.2f}")
    print(f"| part | s/epoch | µs/step | share |\n| --- | ---: | ---: | ---: |")
    named = 0.0
    epochs = args.epochs - 1
    rows = []
    for part, entries in PARTS:
        t = sum(cumtime(stats, f, n) for f, n in entries)
        named += t
        rows.append((part, t))
    rows.append(("Lightning loop + hooks (rest)", total - named))
    for part, t in rows:
        print(f"| {part} | {t / epochs:.3f} | {t / steps * 1e6:.0f} | {t / total:.0%} |")
    print(f"| **epoch under cProfile** | {total / epochs:.3f} | {total / steps * 1e6:.0f} | 100% |")
    if os.environ.get("PROFILE_TOP"):
        stats.sort_stats("tottime").print_stats(int(os.environ["PROFILE_TOP"]))
    if os.environ.get("PROFILE_CALLERS"):
        stats.print_callers(os.environ["PROFILE_CALLERS"])
    return 0


def current():
    return ProfileEpochs.current


if __name__ == "__main__":
    sys.exit(main())
