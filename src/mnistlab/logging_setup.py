"""Route Lightning's console messages through Hydra's logging once (Lightning also attaches its own handler)."""

from __future__ import annotations

import logging
import os
import warnings

_NOISE = ("litlogger", "LitLogger")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in _NOISE)


def quiet_lightning() -> None:
    # Lightning 2.6's own _pytree.py still builds torch's LeafSpec(), which torch >= 2.10 deprecates with a
    # FutureWarning on every fit (Lightning-AI/pytorch-lightning#21326); nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    hydra_owns_root = bool(logging.getLogger().handlers)
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")]
    for name in names:
        logger = logging.getLogger(name)
        if hydra_owns_root:  # Hydra configured the root logger: let it print each message once
            logger.handlers.clear()
            logger.propagate = True
        logger.addFilter(_DropNoise())
    if "SLURM_JOB_ID" not in os.environ:
        # Lightning warns on every run where SLURM's `srun` is installed but not used, to catch a multi-GPU job
        # started without it; outside a SLURM job it only means this machine has SLURM's client tools.
        warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
