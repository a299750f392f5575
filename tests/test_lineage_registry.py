"""A real sweep reports its progress and ends with its selected model in the registry (mnist-mlp@champion);
every run names its datasets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, cli_env
from mnistlab.tracking.store import default_tracking_uri


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, processed_dir):
    tmp = tmp_path_factory.mktemp("registry")
    args = [
        sys.executable, "-m", "mnistlab.train", "-m", "launcher=basic", "optimizer=sgd,rmsprop", "optimizer.lr=0.1",
        f"data.processed_dir={processed_dir}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "logger.plots=false", "logger.log_checkpoint=false",
        f"paths.root={tmp}", f"paths.mlruns_dir={tmp / 'mlruns'}", f"paths.sweep_reports_dir={tmp / 'reports'}",
        f"hydra.sweep.dir={tmp / 'multirun'}", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
        "num_threads=1", "logger.register_champion=true", "logger.log_model=false",  # as the study: model of the chosen
    ]
    proc = subprocess.run(args, cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(default_tracking_uri(tmp / "mlruns"))
    exp = client.get_experiment_by_name("mnistlab")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`mnistlab.sweep` = 'true'")
    return tmp, client, parent, proc.stderr + proc.stdout


@pytest.mark.slow
def test_sweep_registers_its_selected_model_as_champion_and_it_scores_its_test_acc(small_sweep, processed_dir):
    import mlflow.pytorch

    from mnistlab.tracking.run import fluent_uri

    tmp, client, parent, log = small_sweep
    best_id = parent.data.tags["mnistlab.best_run"]  # the report's choice (on validation)
    version = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert version.run_id == best_id and version.tags["mnistlab.run_id"] == best_id
    assert version.tags["mnistlab.sweep_run_id"] == parent.info.run_id
    assert "registered mnist-mlp version 1 (alias champion)" in log

    # log_model=false: only the chosen trial got a model, at registration, from the checkpoint its test scored
    exp_id = parent.info.experiment_id
    logged = client.search_logged_models(experiment_ids=[exp_id])
    assert [m.source_run_id for m in logged] == [best_id]
    assert f"logged the model of run {best_id} from " in log

    with fluent_uri(default_tracking_uri(tmp / "mlruns")):
        model = mlflow.pytorch.load_model("models:/mnist-mlp@champion")
        info = mlflow.models.get_model_info("models:/mnist-mlp@champion")
    assert "scaled to [0, 1]" in info.metadata["input"]
    x = torch.from_numpy(np.load(processed_dir / "x_test.npy").reshape(-1, 784)).float() / 255.0
    y = torch.from_numpy(np.load(processed_dir / "y_test.npy")).long()
    model = model.to("cpu").train().eval()  # the standard idiom works on the loaded module
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(client.get_run(best_id).data.metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_each_run_logs_its_three_dataset_splits_and_mlflow_context_tags(small_sweep, processed_dir):
    tmp, client, parent, _ = small_sweep
    meta = json.loads((processed_dir / "meta.json").read_text())
    run = client.get_run(parent.data.tags["mnistlab.best_run"])
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test"}
    assert {d.name for d in inputs.values()} == {"mnist-train", "mnist-val", "mnist-test"}
    assert {d.digest for d in inputs.values()} == {meta["data_checksum"]}
    assert json.loads(inputs["val"].profile)["num_rows"] == meta["counts"]["val"] == 100
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    assert not any(k.startswith("system/") for k in run.data.metrics), "system metrics are off by default"


@pytest.mark.slow
def test_sweep_prints_trials_done_out_of_total(small_sweep):
    *_, log = small_sweep
    assert "sweep: 0/2 trials done (0 finished, 0 failed)" in log
    assert "sweep: 2/2 trials done (2 finished, 0 failed), 0 running" in log
