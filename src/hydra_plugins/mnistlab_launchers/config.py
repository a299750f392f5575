"""`hydra/launcher: mnistlab_joblib`, `mnistlab_submitit_local` and `mnistlab_stacked`: only settings the launcher
honours (mnistlab_joblib keeps joblib's n_jobs, not its pool's settings: it runs its own processes)."""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

# Peak RSS of one trial on real MNIST (55k/5k/10k, batch 32, 5 epochs, MLflow with plots and model), measured with
# /usr/bin/time -v: 1.48 GB (1,481,764 kB); the probe saw 1.1-1.3 GB. The default rounds that up.
MEM_PER_TRIAL_GB = 1.6


@dataclass
class ContainedJoblibConf:
    _target_: str = "hydra_plugins.mnistlab_launchers.launchers.ContainedJoblibLauncher"
    # trials at once (-1: one per core); capped by cores and memory
    n_jobs: int = -1
    # peak memory of one trial: at most available memory / this many trials run at once
    mem_per_trial_gb: float = MEM_PER_TRIAL_GB


@dataclass
class CappedLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.mnistlab_launchers.launchers.CappedLocalLauncher"
    mem_per_trial_gb: float = MEM_PER_TRIAL_GB
    # at most this many trials at once (null: the cores); memory may cap it further
    max_parallel: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="mnistlab_joblib", node=ContainedJoblibConf, provider="mnistlab")
ConfigStore.instance().store(group="hydra/launcher", name="mnistlab_submitit_local", node=CappedLocalConf, provider="mnistlab")


@dataclass
class StackedConf:
    _target_: str = "hydra_plugins.mnistlab_launchers.launchers.StackedLauncher"
    # at most this many trials per stack
    max_members: int = 12
    # stacks trained at once, each in its own process with cores / n_jobs torch threads (-1: one per core). On this
    # 2-core CPU two 1-thread stacks beat one 2-thread stack: a small gemm uses 2 threads at ~75 % efficiency.
    n_jobs: int = -1
    # one stack process's peak before its members (the ordinary trial's ~1.2 GB): caps n_jobs by available memory
    mem_per_trial_gb: float = 1.5
    # what one member adds to a stack's memory (measured ~9 MB resident at batch 128, benchmarks/sweep_speed.py), with
    # margin: at most available memory / this many members per stack
    mem_per_member_mb: float = 32.0


ConfigStore.instance().store(group="hydra/launcher", name="mnistlab_stacked", node=StackedConf, provider="mnistlab")
