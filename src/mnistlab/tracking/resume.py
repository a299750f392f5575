"""Resume a sweep by skipping trials that already FINISHED: a hash of what changes a trial's result, and the
reused child run that stands in for the original in the new sweep.

Hand-written because neither Hydra's sweepers nor MLflow know which runs are "the same trial": the hash
covers the semantic config (optimizer, lr, batch size, seed, model, data split, epochs, precision ...),
the data checksum, the torch version and the source of the modules that compute the result; not paths,
logging, launcher, thread count or progress bar.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mnistlab.tracking.tags import CONFIG_HASH_TAG, NOTE_TAG, REUSED_TAG

# Top-level keys that say where a run writes, how it logs or how the sweep runs, not what it trains.
_NOT_SEMANTIC = ("paths", "logger", "hydra", "num_threads", "task_name", "ckpt_path", "study", "reuse_finished",
                 "optimized_metric")
_NOT_SEMANTIC_NESTED = (
    "data.raw_dir", "data.processed_dir", "data.verify_checksums",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "callbacks.rich_progress_bar", "callbacks.model_checkpoint.dirpath", "callbacks.model_checkpoint.save_last",
    "callbacks.finite_loss.check_every_n_steps",
)
# The modules whose code decides a trial's numbers; editing one of them invalidates earlier results.
_NUMERIC_MODULES = ("model.py", "nets.py", "callbacks.py", "data/datamodule.py", "optim.py")


def _code_digest() -> str:
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _NUMERIC_MODULES:
        h.update(rel.encode() + b"\0" + (pkg / rel).read_bytes())
    return h.hexdigest()[:16]


def semantic_config(cfg: DictConfig) -> dict:
    """The part of the resolved config that changes a trial's result."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_SEMANTIC:
        data.pop(key, None)
    for dotted in _NOT_SEMANTIC_NESTED:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def config_hash(cfg: DictConfig, data_checksum: str, resumed_from: str | None = None) -> str:
    """Stable 16-hex-digit hash of the semantic config, data checksum, torch version and numeric code; a run
    resumed from a checkpoint (`resumed_from`: its file's sha256) is another trial than a fresh one."""
    import torch

    payload = {
        "config": semantic_config(cfg),
        "data_checksum": data_checksum,
        "torch": torch.__version__,
        "code": _code_digest(),
        **({"resumed_from": resumed_from} if resumed_from else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file read in blocks (a checkpoint a run resumes from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_finished(client, experiment_id: str, chash: str):
    """The newest FINISHED run that trained (not reused) this config hash, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{CONFIG_HASH_TAG}` = '{chash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    trained = [r for r in runs if REUSED_TAG not in r.data.tags]
    return trained[0] if trained else None


def copy_results(client, original, run_id: str) -> None:
    """Give `run_id` the original's params and every metric's full history (curves included)."""
    from mlflow.entities import Metric, Param

    params = [Param(k, v) for k, v in original.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    metrics = []
    for key in original.data.metrics:
        metrics += [Metric(m.key, m.value, m.timestamp, m.step) for m in client.get_metric_history(original.info.run_id, key)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(original.info.start_time / 1000))
    client.set_tag(run_id, REUSED_TAG, original.info.run_id)
    client.set_tag(run_id, NOTE_TAG, f"**Reused**: same config hash as run {original.info.run_id} "
                                     f"({original.info.run_name}, trained {started}); not retrained. "
                                     f"Artifacts (model, checkpoint, plots) are on that run.")
