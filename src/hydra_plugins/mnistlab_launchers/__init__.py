"""Hydra launchers of mnistlab (a hydra_plugins package, so Hydra discovers them): joblib and submitit_local
that survive a dead trial and cap concurrency by cores and memory. The logic is in mnistlab.launching."""
