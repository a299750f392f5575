"""Every private name of a library that mnistlab uses, in one place, each with why no public API does it. Tested with
lightning 2.6.6, hydra-core 1.3.8, hydra-submitit-launcher 1.2.0, mlflow 3.17.2 and torch 2.14.1; pyproject.toml caps
each of them below its next minor release, so an upgrade that moves one of these names is a deliberate change here."""

from __future__ import annotations

import inspect

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401  (tests/test_device.py: no public export)


def compiled_graphs() -> int:
    """How many graphs torch.compile has captured in this process (tests: that compile=... really compiled); dynamo's
    counters have no public reader."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --- Lightning ---

def count_manual_step(optimizer, step) -> None:
    """Run `step()` (a plain optimizer.step) counted as Lightning counts a manual step: global_step, log_every_n_steps,
    checkpoints and MLflow's step axis depend on the LightningOptimizer's _on_before_step/_on_after_step, which its
    public step() calls around the step together with the precision and strategy hooks this path skips."""
    optimizer._on_before_step()
    step()
    optimizer._on_after_step()


def set_fit_progress(trainer, epochs: int, steps: int) -> None:
    """The trainer as a fit of `epochs` epochs and `steps` steps leaves it (a stacked member's adopted fit), so test/*
    and the summary metrics are logged at the ordinary run's steps: Lightning reads these counters and has no setter."""
    trainer.fit_loop.epoch_progress.current.completed = epochs
    loop = trainer.fit_loop.epoch_loop
    loop.automatic_optimization.optim_progress.optimizer.step.total.completed = steps
    loop.manual_optimization.optim_step_progress.total.completed = steps
    loop._batches_that_stepped = steps


def freeze_signature(fn) -> None:
    """Lightning decides whether to pass batch_idx by reading training_step's signature with inspect on EVERY step
    (~1.5 % of a steady-state epoch, py-spy); inspect returns a function's precomputed __signature__ first."""
    fn.__signature__ = inspect.signature(fn)


# --- Hydra ---

def basic_sweep_batches(parsed_overrides) -> list:
    """The job batches Hydra's basic sweeper will launch for these overrides (its static split_arguments; the sweeper
    is in hydra._internal and has no public way to count a sweep before it runs)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return BasicSweeper.split_arguments(parsed_overrides, None)


def submitit_cluster(launcher) -> str:
    """The submitit cluster ("local", "slurm") of one of hydra-submitit-launcher's launchers: its class attribute
    _EXECUTOR, which its own launch() reads to build the executor (no public accessor)."""
    return launcher._EXECUTOR


# --- MLflow ---

def system_metrics_monitor(run_id: str, tracking_uri: str):
    """MLflow's system-metrics sampler for a run the client created: the public switch (mlflow.start_run(
    log_system_metrics=True)) only serves fluent runs, and a TrackedRun owns its run through the client."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
