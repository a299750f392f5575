"""DVC users' path with the real DVC CLI: `dvc exp run -S` (Hydra composition), the queue, metrics and plots;
queued experiments run in a temp copy but must log to the workspace's MLflow store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import checkpoint_test_acc, dvc, fake_mnist, store_runs, write_npz

# Fixture data is not MNIST: verification off; small and fast.
FAST = ["data.verify_checksums=false", "data.val_size=100", "trainer.max_epochs=1", "data.batch_size=64",
        "logger.log_model=false", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null"]


def _s(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("-S", o)]


@pytest.fixture
def exp_repo(project_copy, tmp_path) -> Path:
    mirror = tmp_path / "mirror"
    write_npz(mirror, fake_mnist())
    dvc(project_copy, "remote", "modify", "--local", "mnist-source", "url", str(mirror))
    return project_copy


def _runs(repo: Path):
    return store_runs(repo / "mlruns")[1]


def _exp_table(repo: Path) -> dict[str, tuple[str, float | None]]:
    """{experiment name: (optimizer name, test/acc)} from `dvc exp show --json` (experiments only, not the
    workspace or the baseline commit, whose metrics are the committed ones)."""
    out = {}
    for entry in json.loads(dvc(repo, "exp", "show", "--json").stdout):
        for e in entry.get("experiments") or []:
            for rev in e.get("revs") or [e]:
                data = rev.get("data") or {}
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = (data.get("metrics") or {}).get("reports/metrics.json", {}).get("data", {})
                out[rev.get("name") or rev.get("rev")] = (params.get("optimizer", {}).get("name"), metrics.get("test/acc"))
    return out


@pytest.mark.slow
def test_exp_run_set_param_trains_and_shows_test_acc(exp_repo):
    proc = dvc(exp_repo, "exp", "run", *_s(["optimizer=sgd", "optimizer.lr=0.05", *FAST]))
    assert "Ran experiment" in proc.stdout + proc.stderr
    params = yaml.safe_load((exp_repo / "params.yaml").read_text())
    assert params["optimizer"]["name"] == "sgd" and params["optimizer"]["lr"] == 0.05
    assert params["optimizer"]["_target_"] == "torch.optim.SGD", "the optimizer group was switched, not just a key"
    metrics = json.loads((exp_repo / "reports" / "metrics.json").read_text())
    assert metrics["epochs"] == 1  # and test/acc is the stage's best.ckpt's, recomputed from the repo's data
    assert metrics["test/acc"] == pytest.approx(
        checkpoint_test_acc(exp_repo / "models" / "best.ckpt", exp_repo / "data" / "processed"), abs=1e-6)
    shown = json.loads(dvc(exp_repo, "metrics", "show", "--json").stdout)
    assert shown[""]["data"]["reports/metrics.json"]["data"]["test/acc"] == pytest.approx(metrics["test/acc"])
    table = _exp_table(exp_repo)
    assert ("sgd", pytest.approx(metrics["test/acc"])) in table.values()
    (run,) = _runs(exp_repo)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("sgd lr=0.05 bs=64 [dvc exp ")
    assert run.data.tags["dvc.exp_name"] in table
    # the pipeline is now up to date: a second repro does nothing
    again = dvc(exp_repo, "repro")
    assert "didn't change, skipping" in again.stdout and "Running stage" not in again.stdout
    plots = json.loads(dvc(exp_repo, "plots", "show", "--json").stdout)
    assert {"loss", "accuracy"} <= set(plots["data"]) and plots["data"]["loss"]
    assert not [e for e in plots.get("errors", []) if "curves.csv" in e.get("source", "")]


@pytest.mark.slow
def test_queued_experiments_run_in_temp_copies_but_log_to_the_workspace_store(exp_repo):
    for opt in ("momentum", "rmsprop"):
        dvc(exp_repo, "exp", "run", "--queue", *_s([f"optimizer={opt}", *FAST]))
    dvc(exp_repo, "queue", "start", "-j", "2")
    deadline = time.time() + 400
    while True:
        status = dvc(exp_repo, "queue", "status").stdout
        if "Running" not in status and "Queued" not in status:
            break
        assert time.time() < deadline, status
        time.sleep(3)
    dvc(exp_repo, "queue", "stop", check=False)
    assert status.count("Success") == 2, status
    table = _exp_table(exp_repo)
    done = {name: acc for name, (opt, acc) in table.items() if opt in ("momentum", "rmsprop") and acc is not None}
    assert len(done) == 2, table
    runs = _runs(exp_repo)
    assert {r.data.tags.get("dvc.exp_name") for r in runs} == set(done)
    assert {r.data.params["optimizer"] for r in runs} == {"momentum", "rmsprop"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not list((exp_repo / ".dvc" / "tmp").rglob("mlflow.db")), "a temp copy got its own MLflow store"
