"""A real MLflow store: one run per training with its params, tags, curves and artifacts; failures end FAILED/KILLED."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import lightning
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import BIN, PROJECT_ROOT, cli_env, compose, fast_overrides, free_port, run_train, store_runs
from mnistlab.tracking.store import VENV_URI_ENV, default_tracking_uri, resolve_tracking_uri
from mnistlab.train import train

ARTIFACTS = {"config.yaml", "overrides.txt", "curves.png", "confusion_matrix.png", "misclassified.png", "checkpoints",
             "test_acc_per_class.json"}


def _client(tmp_path) -> MlflowClient:
    return MlflowClient(default_tracking_uri(tmp_path / "mlruns"))


def _runs(client, **filters):
    exp = client.get_experiment_by_name("mnistlab")
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, processed_dir):
    tmp = tmp_path_factory.mktemp("tracked")
    metrics = train(compose(fast_overrides(tmp, processed_dir, epochs=2)))
    client = _client(tmp)
    (run,) = _runs(client)
    return tmp, client, run, metrics


def test_one_finished_run_with_params_metrics_and_tags(finished_run, processed_dir):
    tmp, client, run, metrics = finished_run
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "rmsprop lr=0.001 bs=32"
    p = run.data.params
    assert (p["optimizer"], p["lr"], p["batch_size"], p["alpha"], p["max_epochs"], p["seed"]) == (
        "rmsprop", "0.001", "32", "0.9", "2", "42")
    assert {"momentum", "eps", "weight_decay", "hidden_sizes", "precision", "accelerator", "val_size"} <= set(p)
    assert not any(k.startswith("model/") for k in p), "Lightning's hparams dump duplicates the curated params"
    m = run.data.metrics
    assert m["test/acc"] == pytest.approx(metrics["test/acc"])
    assert not any(k.startswith("test/acc_class") for k in m), "per-class accuracy is one table, not 10 metrics"
    assert m["test/acc"] == float(str(np.float32(m["test/acc"]))), "no float32 noise in logged values"
    val_acc = client.get_metric_history(run.info.run_id, "val/acc")
    assert [h.step for h in val_acc] == [1, 2], "epoch metrics are charted against the epoch"
    best = client.get_metric_history(run.info.run_id, "val/acc_best")
    assert [h.step for h in best] == [1, 2], "val/acc_best once per epoch, no stray point at the global step"
    table = json.loads(open(client.download_artifacts(run.info.run_id, "test_acc_per_class.json", str(tmp))).read())
    rows = dict(zip(table["columns"], zip(*table["data"])))
    assert list(rows["digit"]) == list(range(10)) and sum(rows["count"]) == 200  # the fixture's test split
    assert sum(a * c for a, c in zip(rows["test/acc"], rows["count"])) / 200 == pytest.approx(m["test/acc"], abs=1e-6)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "fit_seconds", "samples_per_second"} <= set(m)
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) >= 3
    meta = json.loads((processed_dir / "meta.json").read_text())
    t = run.data.tags
    assert t["mnistlab.data_checksum"] == meta["data_checksum"]
    # the run's root is paths.root (tmp): its git commit, or "unknown" outside a repo
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp, capture_output=True, text=True).stdout.strip()
    assert t["mlflow.source.git.commit"] == (head or "unknown")
    assert t["mnistlab.host"] == socket.gethostname() and t["mnistlab.device"].startswith(f"cpu ({os.uname().machine}")
    assert (t["version.torch"], t["version.lightning"], t["version.mlflow"]) == (
        torch.__version__, lightning.__version__, mlflow.__version__)
    assert t.get("mnistlab.command")
    assert t["mnistlab.device"].startswith("cpu")


def test_artifacts_config_plots_checkpoint(finished_run):
    tmp, client, run, _ = finished_run
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert ARTIFACTS <= names, ARTIFACTS - names
    cfg_text = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp / "dl"))
    assert "optimizer:" in open(cfg_text).read() and "_target_: torch.optim.RMSprop" in open(cfg_text).read()
    ckpts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert ckpts == ["checkpoints/best.ckpt"]
    for png in ("curves.png", "confusion_matrix.png", "misclassified.png"):
        local = client.download_artifacts(run.info.run_id, png, str(tmp / "dl"))
        assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_logged_model_round_trip_scores_the_same(finished_run, processed_dir):
    import mlflow.pytorch

    from mnistlab.tracking.run import fluent_uri

    tmp, client, run, metrics = finished_run
    with fluent_uri(default_tracking_uri(tmp / "mlruns")):
        model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    x = torch.from_numpy(np.load(processed_dir / "x_test.npy").reshape(-1, 784)).float() / 255.0
    y = torch.from_numpy(np.load(processed_dir / "y_test.npy")).long()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_non_finite_loss_ends_failed_with_the_error(tmp_path, processed_dir):
    from mnistlab.callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        train(compose(fast_overrides(tmp_path, processed_dir) + ["optimizer=sgd", "optimizer.lr=1e30"]))
    (run,) = _runs(_client(tmp_path))
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["mnistlab.error"] and "lr=1e+30" in run.data.tags["mnistlab.error"]
    assert "error.txt" in {a.path for a in _client(tmp_path).list_artifacts(run.info.run_id)}
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("signum, error, code", [(signal.SIGINT, "KeyboardInterrupt", 130), (signal.SIGTERM, "SIGTERMException", 143)])
def test_interrupt_or_sigterm_ends_killed(tmp_path, processed_dir, signum, error, code):
    """In-process; test_faults.py checks the exit status of a real `python -m mnistlab.train` process."""
    from mnistlab.exits import interrupt_exit_code

    overrides = fast_overrides(tmp_path, processed_dir, epochs=3) + [
        "+callbacks.interrupt._target_=test_train.SigintAtEpoch", "+callbacks.interrupt.epoch=1",
        f"+callbacks.interrupt.signum={int(signum)}"]
    with pytest.raises(SystemExit) as raised:
        train(compose(overrides))
    assert interrupt_exit_code(raised.value) == code, "the exit status mnistlab-train gives this exception"
    (run,) = _runs(_client(tmp_path))
    assert run.info.status == "KILLED"
    assert error in run.data.tags["mnistlab.error"]
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_server_serves_runs_and_metric_histories(finished_run):
    tmp, client, run, metrics = finished_run
    port = free_port()
    # `make ui` as the README gives it (mlflow ui on loopback over the project's store), pointed at this store
    server = subprocess.Popen(
        ["make", "--no-print-directory", "-o", "setup", "ui", f"MLRUNS={tmp / 'mlruns'}", f"UI_PORT={port}", f"VENV={BIN.parent}"],
        cwd=PROJECT_ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        exp = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mnistlab")["experiment"]
        # the link make ui prints lands on the training runs, with the project's columns (tracking/ui.py)
        link = ""
        for _ in range(5):  # make's own lines (e.g. under `make test`) may come first
            link += server.stdout.readline()
            if "training runs" in link:
                break
        assert f"{base}/#/experiments/{exp['experiment_id']}/runs?viewStateShareKey=mnistlab" in link, link
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        assert "metrics.`test/acc`" in json.loads(tags["mlflow.sharedViewState.mnistlab"])["selectedColumns"]
        found = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert [r["info"]["run_id"] for r in found] == [run.info.run_id]
        hist = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run.info.run_id}&metric_key=val/acc")["metrics"]
        assert len(hist) == 2
        served = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
        assert served["test/acc"] == pytest.approx(metrics["test/acc"])
        page = urllib.request.urlopen(f"{base}/", timeout=10).read().decode()
        assert "<html" in page.lower()
        import psutil

        bound = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        assert bound == {"127.0.0.1"}, f"make ui must bind loopback only, bound {bound}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_partial_test_split_still_gets_its_plots(tmp_path, processed_dir):
    """trainer.limit_test_batches scores part of the test split; the misclassified grid must use that part."""
    overrides = fast_overrides(tmp_path, processed_dir, epochs=1) + [
        "trainer.limit_test_batches=1", "data.eval_batch_size=50", "logger.log_model=false"]
    train(compose(overrides))
    (run,) = _runs(_client(tmp_path))
    assert run.info.status == "FINISHED"
    assert "misclassified.png" in {a.path for a in _client(tmp_path).list_artifacts(run.info.run_id)}


def test_a_run_that_fails_while_starting_ends_failed_not_running(tmp_path):
    """A run whose start fails after MLflow created it (here: a dataset input the store rejects) is closed FAILED
    with the reason, and the error carries its id (so a sweep does not record a second, empty run)."""
    from mlflow.entities import Dataset, DatasetInput
    from mlflow.exceptions import MlflowException

    from mnistlab.tracking.run import TrackedRun
    from mnistlab.tracking.store import ensure_experiment

    uri = default_tracking_uri(tmp_path / "mlruns")
    exp_id = ensure_experiment(uri, "start-fails", tmp_path / "mlruns")
    bad = DatasetInput(Dataset(name="mnist-train", digest="d" * 100, source_type="local", source="{}"))
    run = TrackedRun(uri, exp_id, "starts", {}, synchronous=True, inputs=[bad])
    with pytest.raises(MlflowException) as err:
        with run:
            pytest.fail("the body must not run")
    (stored,) = MlflowClient(uri).search_runs([exp_id])
    assert stored.info.run_id == err.value.mlflow_run_id == run.run_id
    assert stored.info.status == "FAILED" and "digest" in stored.data.tags["mnistlab.error"]


def test_make_ui_on_a_busy_port_fails_before_printing_a_link(tmp_path):
    """`make ui` on a port another program listens on: exit 2 with the port and UI_PORT= named, no link printed (it
    used to print the link, then fail in the server with "Address already in use" and exit 0)."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = subprocess.run(
            ["make", "--no-print-directory", "-o", "setup", "ui", f"MLRUNS={tmp_path / 'mlruns'}", f"UI_PORT={port}",
             f"VENV={BIN.parent}"],
            cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot serve the MLflow UI on 127.0.0.1:{port}" in proc.stderr
    assert f"UI_PORT={port + 1}" in proc.stderr and "Nothing was started." in proc.stderr
    assert "http://" not in proc.stdout and not (tmp_path / "mlruns").exists()


def test_the_run_records_the_precision_it_trained_in(tmp_path, processed_dir):
    """trainer.precision=16 on a CPU: Lightning trains in bf16-mixed, and the run now says so (it recorded 16)."""
    proc = run_train(tmp_path, *fast_overrides(tmp_path, processed_dir, epochs=1), "trainer.precision=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, (run,) = store_runs(tmp_path / "mlruns")
    assert run.data.params["precision"] == "bf16-mixed"


def test_the_mlflow_cli_of_an_activated_venv_sees_the_projects_store(tmp_path, monkeypatch):
    """After `source .venv/bin/activate`, `mlflow experiments search` read a new ./mlflow.db wherever it was typed.
    make setup's hook points the CLI at the project's store, leaves a user's MLFLOW_TRACKING_URI alone, and
    deactivate takes it back; mnistlab itself still follows paths.mlruns_dir under the hook's URI."""
    venv, store, elsewhere = tmp_path / "venv", tmp_path / "mlruns", tmp_path / "elsewhere"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "bin" / "mnistlab-runs").symlink_to(BIN / "mnistlab-runs")
    digest = hashlib.sha256((PROJECT_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()  # the install is done: `make setup` only adds the hook
    for _ in range(2):
        made = subprocess.run(["make", "--no-print-directory", "setup", f"VENV={venv}", f"MLRUNS={store}"],
                              cwd=PROJECT_ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
    assert (venv / "bin" / "activate").read_text().count("mnistlab-runs activate-hook") == 1
    MlflowClient(default_tracking_uri(store)).create_experiment("hook-check")
    elsewhere.mkdir()

    def shell(script: str, **env) -> str:
        done = subprocess.run(["bash", "-c", f"source {venv}/bin/activate && {script}"], cwd=elsewhere,
                              env=cli_env(**env), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "hook-check" in shell(f"{BIN / 'mlflow'} experiments search")
    assert not list(elsewhere.iterdir()), "the CLI opened a store of its own"
    assert shell('deactivate; echo "[${MLFLOW_TRACKING_URI-unset}] [${MLFLOW_BACKEND_STORE_URI-unset}]"').split() == [
        "[unset]", "[unset]"]
    team = "http://team-server:5000"
    assert shell('echo "$MLFLOW_TRACKING_URI"; deactivate; echo "$MLFLOW_TRACKING_URI"',
                 MLFLOW_TRACKING_URI=team).split() == [team, team]

    hook_uri = default_tracking_uri(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", hook_uri)
    monkeypatch.setenv(VENV_URI_ENV, hook_uri)
    assert resolve_tracking_uri(None, tmp_path / "other") == default_tracking_uri(tmp_path / "other")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team)
    assert resolve_tracking_uri(None, tmp_path / "other") == team
