"""The model registry: a sweep's selected trial becomes `mnist-mlp@champion`, so code that serves or evaluates the
model loads `models:/mnist-mlp@champion` instead of a run id copied from the UI."""

from __future__ import annotations

import logging
from pathlib import Path

from mnistlab.metrics import OBJECTIVE
from mnistlab.tracking.run import fluent_uri, log_torch_model
from mnistlab.tracking.tags import CHECKPOINT_TAG, REUSED_TAG

log = logging.getLogger("mnistlab.registry")
MODEL_NAME = "mnist-mlp"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the name train.py's log_model gives the model


def test_examples(processed_dir: Path, n: int = 5):
    """The first `n` test images as the model takes them (flat, scaled to [0, 1]): the registered model's input
    example, read from data/processed without loading the data module."""
    import numpy as np

    x_test = np.load(Path(processed_dir) / "x_test.npy", mmap_mode="r")
    return (x_test[:n].reshape(n, -1) / 255.0).astype(np.float32)


def register_champion(client, run_id: str, sweep_run_id: str | None, input_example, name: str = MODEL_NAME) -> str | None:
    """Register the model of run `run_id` as a new version of `name`, point the alias `champion` at it and tag it
    with its run and sweep; returns the version, or None when the run has no model and no checkpoint. A run that
    logged no model (a study's trials do not: logger.log_model=false) gets one now, from the checkpoint its test
    scored, so only the chosen trial pays for it."""
    import mlflow

    run = client.get_run(run_id)
    if not _logged_model(client, run) and not _log_model_from_checkpoint(client, run, input_example):
        log.info("run %s logged no model and left no checkpoint: nothing to register", run_id)
        return None
    tags = {"mnistlab.run_id": run_id, "mnistlab.run_name": run.info.run_name or "",
            "mnistlab.sweep_run_id": sweep_run_id or "",
            **{k: str(v) for k, v in run.data.metrics.items() if k in (OBJECTIVE, "test/acc")}}
    with fluent_uri(client.tracking_uri):
        version = mlflow.register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", name, tags=tags).version
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_tag(run_id, "mnistlab.registered_as", f"{name}@{CHAMPION} (version {version})")
    log.info("registered %s version %s (alias %s) from run %s", name, version, CHAMPION, run_id)
    return str(version)


def _logged_model(client, run) -> bool:
    return any(m.name == MODEL_ARTIFACT for m in client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"))


def _log_model_from_checkpoint(client, run, input_example) -> bool:
    """Log the run's model from the checkpoint of its tested weights (CHECKPOINT_TAG), when that file is here."""
    import torch

    from mnistlab.model import plain_net

    tags = run.data.tags
    if REUSED_TAG in tags:  # a reused trial stands for the run that trained it
        tags = client.get_run(tags[REUSED_TAG]).data.tags
    path = Path(tags.get(CHECKPOINT_TAG, ""))
    if not path.is_file():
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    log_torch_model(client.tracking_uri, run.info.run_id, plain_net(ckpt["hyper_parameters"]["model"], ckpt["state_dict"]),
                    input_example)
    log.info("logged the model of run %s from %s", run.info.run_id, path)
    return True
