"""trainer=ddp on CPU (gloo, 2 processes): one MLflow run from rank 0, every sample counted, the same test split."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, checkpoint_test_acc, cli_env, fast_overrides
from mnistlab.tracking.store import default_tracking_uri


def _train(tmp, processed, extra: list[str]):
    args = [sys.executable, "-m", "mnistlab.train", *fast_overrides(tmp, processed, epochs=2), "logger.log_model=false", *extra]
    return subprocess.run(args, cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.cluster
def test_cpu_ddp_trains_with_one_run_and_all_samples(tmp_path, processed_dir):
    ddp = _train(tmp_path / "ddp", processed_dir, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    assert "sync_dist=True" not in ddp.stderr, "epoch-level metrics must be synced across ranks"
    single = _train(tmp_path / "one", processed_dir, ["trainer=cpu"])
    assert single.returncode == 0, single.stderr[-4000:]

    m_ddp = json.loads((tmp_path / "ddp" / "out" / "metrics.json").read_text())
    m_one = json.loads((tmp_path / "one" / "out" / "metrics.json").read_text())
    train_size = json.loads((processed_dir / "meta.json").read_text())["counts"]["train"]
    assert m_ddp["samples_seen"] == m_one["samples_seen"] == 2 * train_size
    # the ranks' test pass counted each test image once (a sampler padding the split would count some twice):
    # its test/acc is the one plain pass over the split gives for the same weights
    assert m_ddp["test/acc"] == pytest.approx(
        checkpoint_test_acc(tmp_path / "ddp" / "out" / "checkpoints" / "best.ckpt", processed_dir), abs=1e-6)

    client = MlflowClient(default_tracking_uri(tmp_path / "ddp" / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("mnistlab").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/acc"] == pytest.approx(m_ddp["test/acc"])
    assert run.data.metrics["samples_seen"] == m_ddp["samples_seen"]
    assert "confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    print(f"\nDDP 2x CPU: {m_ddp}\none process: {m_one}")
