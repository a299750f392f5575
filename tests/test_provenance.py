"""Provenance against real values: the repo's commit and dirty state, the live process's pid/host/start time
(what clean-stale relies on), and params that match what actually trained."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import BIN, cli_env, compose, fast_overrides, git, store_runs
from mnistlab.tracking.store import default_tracking_uri
from mnistlab.tracking.tags import HOST_TAG, NOTE_TAG, PID_TAG, PROC_START_TAG
from mnistlab.tracking.trial import curated_params
from mnistlab.train import train

COMMIT_TAG, DIRTY_TAG = "mlflow.source.git.commit", "mnistlab.git_dirty"


def _latest_run(mlruns):
    _, runs = store_runs(mlruns)
    return max(runs, key=lambda r: r.info.start_time)


def test_commit_and_dirty_flag_follow_the_repo(project_copy, processed_dir):
    """Clean, then a tracked source file edited, then that edit committed: each run records exactly that."""
    proj = project_copy
    overrides = fast_overrides(proj, processed_dir, epochs=1) + ["logger.log_model=false", "logger.plots=false"]
    assert git(proj, "status", "--porcelain", "--untracked-files=no") == ""
    first = git(proj, "rev-parse", "HEAD").strip()

    train(compose(overrides))
    tags = _latest_run(proj / "mlruns").data.tags
    assert (tags[COMMIT_TAG], tags[DIRTY_TAG]) == (first, "false")

    with open(proj / "src" / "mnistlab" / "model.py", "a") as f:
        f.write("# an uncommitted edit\n")
    train(compose(overrides))
    tags = _latest_run(proj / "mlruns").data.tags
    assert (tags[COMMIT_TAG], tags[DIRTY_TAG]) == (first, "true")

    git(proj, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "edit")
    second = git(proj, "rev-parse", "HEAD").strip()
    assert second != first
    train(compose(overrides))
    tags = _latest_run(proj / "mlruns").data.tags
    assert (tags[COMMIT_TAG], tags[DIRTY_TAG]) == (second, "false")


@pytest.mark.slow
def test_cli_run_records_its_process_repo_and_what_trained(project_copy, processed_dir, tmp_path):
    """`python -m mnistlab.train` in a clone (root found from the cwd): the tags name this clone's HEAD and this
    process; the params equal the composed config; the checkpoint's optimizer state and step count agree."""
    proj = project_copy
    overrides = [
        "optimizer=momentum", "optimizer.lr=0.03", "data.batch_size=64", "seed=7", "trainer.max_epochs=2",
        f"data.processed_dir={processed_dir}", "data.val_size=100", "data.eval_batch_size=100",
        "trainer.log_every_n_steps=4", "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
        f"paths.output_dir={tmp_path / 'out'}", "logger.log_model=false", "logger.plots=false", "num_threads=1",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "mnistlab.train", *overrides], cwd=proj, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

    client, (run,) = store_runs(proj / "mlruns")  # the clone's own store: mlruns/ under the root found from cwd
    tags = run.data.tags
    assert tags[COMMIT_TAG] == git(proj, "rev-parse", "HEAD").strip()
    assert tags[DIRTY_TAG] == "false"
    assert (tags[PID_TAG], tags[HOST_TAG]) == (str(proc.pid), socket.gethostname())
    assert "optimizer.lr=0.03" in tags["mnistlab.command"]

    cfg = compose(overrides)
    # the config's curated params, and the precision the trainer used (read from it, not from the config)
    assert run.data.params == {**{k: str(v) for k, v in curated_params(cfg).items()}, "precision": "32-true"}
    p = run.data.params
    assert (p["optimizer"], p["lr"], p["momentum"], p["batch_size"], p["seed"], p["max_epochs"]) == (
        "momentum", "0.03", "0.9", "64", "7", "2")
    logged_cfg = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))))
    assert logged_cfg == OmegaConf.to_container(cfg, resolve=True)

    # What really trained: the optimizer torch stepped with, and how many steps it took.
    ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert (group["lr"], group["momentum"]) == (0.03, 0.9)
    n_train = 600 - 100
    assert ckpt["global_step"] == 2 * math.ceil(n_train / 64)
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2


@pytest.mark.slow
def test_clean_stale_marks_a_sigkilled_training_killed(tmp_path, processed_dir):
    """A real training process, SIGKILLed mid-run: its run stays RUNNING (nothing can catch SIGKILL) until
    clean-stale, which left it alone while the process lived, marks it KILLED."""
    overrides = fast_overrides(tmp_path, processed_dir, epochs=100_000) + ["logger.log_model=false"]
    proc = subprocess.Popen([sys.executable, "-m", "mnistlab.train", *overrides], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    uri = default_tracking_uri(tmp_path / "mlruns")

    def clean_stale() -> str:
        done = subprocess.run([str(BIN / "mnistlab-runs"), "clean-stale", "--tracking-uri", uri], env=cli_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        last_ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"  # written after the first epoch is logged
        deadline = time.monotonic() + 240
        while not last_ckpt.exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training did not finish its first epoch"
            time.sleep(0.2)
        client, (run,) = store_runs(tmp_path / "mlruns")
        tags = run.data.tags
        assert run.info.status == "RUNNING"
        assert tags[PID_TAG] == str(proc.pid) and tags[HOST_TAG] == socket.gethostname()
        assert tags[PROC_START_TAG] == f"{psutil.Process(proc.pid).create_time():.3f}"

        assert "0 stale run(s) marked KILLED" in clean_stale()
        assert client.get_run(run.info.run_id).info.status == "RUNNING", "a live training must be left alone"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    report = clean_stale()
    assert f"killed {run.info.run_id}" in report and "1 stale run(s) marked KILLED" in report, report
    after = client.get_run(run.info.run_id)
    assert after.info.status == "KILLED"
    assert f"process {proc.pid} on {socket.gethostname()} is gone" in after.data.tags[NOTE_TAG]
