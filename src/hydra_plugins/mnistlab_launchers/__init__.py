"""Hydra launchers of mnistlab (a hydra_plugins package, so Hydra discovers them): joblib and submitit_local
that survive a dead trial and cap concurrency by cores and memory (logic in mnistlab.launching), and the SLURM
launcher that survives a cancelled trial (logic in mnistlab.cluster)."""
