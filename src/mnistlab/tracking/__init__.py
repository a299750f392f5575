"""MLflow tracking: the store (store.py), one run's lifecycle (run.py), a training trial's run (trial.py), its plots
(plots.py), housekeeping (cli.py)."""
