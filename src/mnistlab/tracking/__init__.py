"""MLflow tracking: the store (store.py), one run's lifecycle (run.py), its plots (plots.py), housekeeping (cli.py)."""
