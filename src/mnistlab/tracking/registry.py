"""The model registry: a sweep's selected trial becomes `mnist-mlp@champion`, so code that serves or evaluates the
model loads `models:/mnist-mlp@champion` instead of a run id copied from the UI."""

from __future__ import annotations

import logging

from mnistlab.metrics import OBJECTIVE
from mnistlab.tracking.run import fluent_uri

log = logging.getLogger("mnistlab.registry")
MODEL_NAME = "mnist-mlp"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the name train.py's log_model gives the model


def register_champion(client, run_id: str, sweep_run_id: str | None, name: str = MODEL_NAME) -> str | None:
    """Register the model logged by run `run_id` as a new version of `name`, point the alias `champion` at it and
    tag it with its run and sweep; returns the version, or None when the run logged no model."""
    import mlflow

    run = client.get_run(run_id)
    if not any(m.name == MODEL_ARTIFACT for m in client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")):
        log.info("run %s logged no model (logger.log_model=false): nothing to register", run_id)
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
