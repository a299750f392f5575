"""Scale-out on the real engines: SLURM job arrays (slurmctld + slurmd + munged), the team MLflow server on
PostgreSQL with proxied artifacts, scancel and requeue of a running trial, the local-store refusal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster_fixtures import daemons, mlflow_server, postgres_uri, slurm  # noqa: F401  (session fixtures)
from conftest import BIN, PROJECT_ROOT, cli_env, read_csv

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _sweep_args(tmp: Path, processed: Path, grid: list[str], experiment: str) -> list[str]:
    return [
        sys.executable, "-m", "mnistlab.train", "-m", "launcher=slurm", *grid,
        "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=15", f"hydra.sweep.dir={tmp / 'multirun'}",
        f"data.processed_dir={processed}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "trainer.log_every_n_steps=4", "callbacks.finite_loss.check_every_n_steps=1", "num_threads=1",
        f"paths.root={tmp}", f"paths.mlruns_dir={tmp / 'mlruns'}", f"paths.sweep_reports_dir={tmp / 'reports'}",
        f"logger.experiment_name={experiment}",
    ]


def _env(slurm, server: str | None) -> dict[str, str]:
    return cli_env(**slurm.env, **({"MLFLOW_TRACKING_URI": server} if server else {}))


def _runs(server: str, experiment: str):
    client = MlflowClient(server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("mnistlab.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, exp, parents, children


class _Sweep:
    """A sweep in the background, its output in files: a PIPE nobody reads while the test polls MLflow would block
    the sweep once it fills (64 KiB) and look like a hung cluster."""

    def __init__(self, args: list[str], env: dict[str, str], tmp: Path):
        self.out, self.err = tmp / "sweep.out", tmp / "sweep.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=err)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait(self, timeout: float = 600) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, self.stderr()

    def abort(self, slurm) -> None:
        """After a failed wait: the sweep killed and its jobs cancelled, so a 400-epoch trial does not slow the
        tests that follow."""
        self.proc.kill()
        self.proc.wait()
        slurm.run("scancel", "--user", str(os.getuid()), check=False)


def _wait_epochs(server: str, experiment: str, n: int, sweep: _Sweep, slurm, tmp: Path, **tag):
    """The trial run (with tag key=value) once it has logged `n` epochs of val/acc. Fails at once, with the sweep's
    stderr, if the sweep ends first; on a timeout, with the runs, SLURM's view and the jobs' logs (a CI run once
    timed out here with nothing to go on)."""
    client = MlflowClient(server)
    timeout = 300
    deadline = time.time() + timeout
    seen: list[str] = []
    while time.time() < deadline:
        exp = client.get_experiment_by_name(experiment)
        seen = []
        for r in client.search_runs([exp.experiment_id], max_results=100) if exp else []:
            count = len(client.get_metric_history(r.info.run_id, "val/acc"))
            seen.append(f"{r.info.run_name} trial={r.data.tags.get('mnistlab.trial')} {r.info.status} val/acc x{count}")
            if all(r.data.tags.get(k) == v for k, v in tag.items()) and r.info.status == "RUNNING" and count >= n:
                return r
        if sweep.proc.poll() is not None:
            raise AssertionError(f"the sweep exited {sweep.proc.returncode} before trial {tag} reached {n} epochs; "
                                 f"runs: {seen}\n{sweep.stderr()[-4000:]}")
        time.sleep(1)
    sweep.proc.kill()
    logs = "".join(f"--- {p}:\n{p.read_text(errors='replace')[-1500:]}\n" for p in sorted(tmp.rglob("*_log.*")))
    raise TimeoutError(f"no RUNNING trial {tag} reached {n} epochs in {timeout}s; runs: {seen}\n{slurm.diagnose()}\n"
                       f"{logs}sweep stderr:\n{sweep.stderr()[-3000:]}")


def _job_of(slurm, before: set[str], trial: int) -> str:
    """The SLURM job id of trial `trial` among the jobs submitted since `before` ("12_1" in an array, "12" alone)."""
    for _ in range(60):
        new = [j for j in slurm.jobs() if j not in before]
        if len(new) == 1:
            return new[0]
        if any(j.endswith(f"_{trial}") for j in new):
            return next(j for j in new if j.endswith(f"_{trial}"))
        time.sleep(1)
    raise TimeoutError(f"no job for trial {trial}")


def test_slurm_sweep_on_the_postgres_server(tmp_path, processed_dir, slurm, mlflow_server):
    """A job array of three trials (one diverging) on the team server: parent + children, artifacts through the
    server's proxy, the model, the report rebuilt from the server."""
    exp_name = "cluster-sweep"
    proc = subprocess.run(
        _sweep_args(tmp_path, processed_dir, ["optimizer=sgd", "optimizer.lr=0.1,1e30,0.01", "trainer.max_epochs=2"], exp_name),
        cwd=PROJECT_ROOT, env=_env(slurm, mlflow_server), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client, exp, (parent,), children = _runs(mlflow_server, exp_name)
    assert parent.info.status == "FINISHED"
    seen = [(c.data.tags.get("mnistlab.trial"), c.info.run_name, c.info.status, c.data.tags.get("mnistlab.error", "")[:200])
            for c in children]
    assert len(children) == 3 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}, seen
    by_lr = {float(c.data.params["lr"]): c for c in children}
    assert by_lr[0.1].info.status == by_lr[0.01].info.status == "FINISHED"
    assert by_lr[1e30].info.status == "FAILED" and "NonFiniteLossError" in by_lr[1e30].data.tags["mnistlab.error"]
    assert len({c.data.tags["mnistlab.pid"] for c in children}) == 3, "each trial is its own SLURM job"
    # artifacts went through the server (mlflow-artifacts:/ URIs), into its --artifacts-destination
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    ok = by_lr[0.1]
    names = {a.path for a in client.list_artifacts(ok.info.run_id)}
    assert {"config.yaml", "curves.png", "checkpoints"} <= names, names
    stored = list(Path(mlflow_server.artifacts_dir).rglob("config.yaml"))
    assert any(ok.info.run_id in str(p) for p in stored)
    import mlflow.pytorch

    from mnistlab.tracking.run import fluent_uri

    with fluent_uri(mlflow_server):
        model = mlflow.pytorch.load_model(f"runs:/{ok.info.run_id}/model")
    import torch

    assert model(torch.zeros(3, 784)).shape == (3, 10)
    # the report, rebuilt from the server by the CLI, matches what the sweep wrote
    rep = subprocess.run([str(BIN / "mnistlab-report"), "--experiment", exp_name, "--out", str(tmp_path / "rep")],
                         cwd=tmp_path, env=_env(slurm, mlflow_server), capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    rows = {float(r["lr"]): r for r in read_csv(tmp_path / "rep" / "sweep.csv")}
    assert rows == {float(r["lr"]): r for r in read_csv(tmp_path / "reports" / "sweep.csv")}
    assert rows[1e30]["status"] == "FAILED" and rows[0.1]["status"] == "FINISHED"
    assert float(rows[0.1]["test/acc"]) == pytest.approx(ok.data.metrics["test/acc"])
    assert json.loads((tmp_path / "rep" / "study.json").read_text())["finished"] == 2


def test_scancel_of_a_trial_ends_killed_and_the_sweep_reports_it(tmp_path, processed_dir, slurm, mlflow_server):
    exp_name = "cluster-scancel"
    before = set(slurm.jobs())
    sweep = _Sweep(_sweep_args(tmp_path, processed_dir, ["trainer.max_epochs=2,400", "logger.log_model=false"], exp_name),
                   _env(slurm, mlflow_server), tmp_path)
    try:
        victim = _wait_epochs(mlflow_server, exp_name, 2, sweep, slurm, tmp_path, **{"mnistlab.trial": "1"})
        job = _job_of(slurm, before, 1)
        slurm.run("scancel", job)
    except BaseException:
        sweep.abort(slurm)
        raise
    code, err = sweep.wait()
    # the sweep is incomplete: it reports the cancelled trial and exits 1 (a scheduler must not read success)
    assert code == 1, err[-4000:]
    assert "1 of 2 trials were stopped or died before they ended" in err and "KILLED" in err and "scancel" in err
    client, _, (parent,), children = _runs(mlflow_server, exp_name)
    status = {c.data.tags["mnistlab.trial"]: c.info.status for c in children}
    assert status == {"0": "FINISHED", "1": "KILLED"}
    killed = client.get_run(victim.info.run_id)
    assert "SIGTERMException" in killed.data.tags["mnistlab.error"], "the trial itself closes its run on SIGTERM"
    assert parent.info.status == "FINISHED"
    rows = {r["run_id"]: r["status"] for r in read_csv(tmp_path / "reports" / "sweep.csv")}
    assert rows[victim.info.run_id] == "KILLED"
    assert slurm.jobs()[job] == "CANCELLED"


def test_requeued_trial_resumes_its_run_from_the_last_checkpoint(tmp_path, processed_dir, slurm, mlflow_server):
    """`scontrol requeue` (what preemption and requeue-on-timeout do): the job restarts in the same job dir, reopens
    its MLflow run and continues from checkpoints/last.ckpt; one FINISHED run holds every epoch."""
    exp_name = "cluster-requeue"
    before = set(slurm.jobs())
    epochs = 30  # batches of 4: ~0.5 s per epoch here, so the requeue lands mid-training
    sweep = _Sweep(_sweep_args(tmp_path, processed_dir, [f"trainer.max_epochs={epochs}", "logger.log_model=false"],
                               exp_name) + ["data.batch_size=4"], _env(slurm, mlflow_server), tmp_path)
    try:
        first = _wait_epochs(mlflow_server, exp_name, 3, sweep, slurm, tmp_path, **{"mnistlab.trial": "0"})
        job = _job_of(slurm, before, 0)
        slurm.run("scontrol", "requeue", job)
    except BaseException:
        sweep.abort(slurm)
        raise
    code, err = sweep.wait()
    assert code == 0, err[-4000:]
    client, _, (parent,), children = _runs(mlflow_server, exp_name)
    (run,) = children
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["mnistlab.slurm_restarts"] == "1" and "mnistlab.error" not in run.data.tags
    assert "previous one ended KILLED (SIGTERMException" in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["epochs"] == epochs
    val = client.get_metric_history(run.info.run_id, "val/acc")
    assert len({m.step for m in val}) == epochs, "one val/acc per epoch, across both starts"
    # resumed, not restarted: a fresh start would have logged the >= 3 epochs before the requeue again into the
    # same run (MLflow keeps each point); at most the epoch in flight at the requeue may be validated twice
    assert len(val) <= epochs + 1, sorted(m.step for m in val)
    job_dir = tmp_path / "multirun" / "0"
    log = "".join(p.read_text() for p in (tmp_path / "multirun" / ".submitit").rglob("*_log.*"))
    assert "resuming from" in log and str(job_dir / "checkpoints" / "last.ckpt") in log
    curves = read_csv(job_dir / "curves.csv")
    assert [int(r["epoch"]) for r in curves] == list(range(1, epochs + 1))
    steps = client.get_metric_history(run.info.run_id, "train/loss_step")
    print(f"\nrequeued run {run.info.run_id}: val/acc {len(val)} points over {len({m.step for m in val})} steps, "
          f"train/loss_step {len(steps)} points over {len({m.step for m in steps})} steps; note: "
          f"{run.data.tags['mlflow.note.content']!r}")


def test_slurm_sweep_refuses_the_local_sqlite_store(tmp_path, processed_dir, slurm):
    before = set(slurm.jobs())
    proc = subprocess.run(_sweep_args(tmp_path, processed_dir, ["optimizer=sgd,rmsprop"], "refused"),
                          cwd=PROJECT_ROOT, env=_env(slurm, None), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "MLFLOW_TRACKING_URI" in proc.stderr and "cluster.allow_local_store=true" in proc.stderr
    assert "Nothing was submitted" in proc.stderr
    assert set(slurm.jobs()) == before
    assert not (tmp_path / "mlruns" / "mlflow.db").exists() and not (tmp_path / "multirun" / ".submitit").exists()


def test_clean_stale_on_the_server_leaves_other_hosts_runs(tmp_path, mlflow_server):
    """clean-stale via MLFLOW_TRACKING_URI: a dead process of this host is KILLED; a run of another host (whose
    pid means nothing here) and a live one stay RUNNING."""
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("cluster-clean-stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    gone = client.create_run(exp, tags={"mnistlab.host": here, "mnistlab.pid": str(dead.pid)})
    elsewhere = client.create_run(exp, tags={"mnistlab.host": "node-17", "mnistlab.pid": str(dead.pid)})
    out = subprocess.run([str(BIN / "mnistlab-runs"), "clean-stale", "--experiment", "cluster-clean-stale"],
                         cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=mlflow_server), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert client.get_run(gone.info.run_id).info.status == "KILLED"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"
    client.set_terminated(elsewhere.info.run_id, "FINISHED")


def test_srun_hint_is_silenced_outside_slurm_jobs(tmp_path, processed_dir, slurm):
    """With SLURM's srun installed, a plain run must not tell the user to prepend srun."""
    import shutil

    from conftest import fast_overrides

    assert shutil.which("srun", path=cli_env()["PATH"])
    proc = subprocess.run([sys.executable, "-m", "mnistlab.train", *fast_overrides(tmp_path, processed_dir, epochs=1),
                           "logger=none"], cwd=PROJECT_ROOT, env=_env(slurm, None), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The `srun` command is available" not in proc.stderr + proc.stdout


def test_trials_starting_together_log_the_same_datasets_on_the_server(processed_dir, mlflow_server):
    """Rounds of 8 trials of one experiment open their runs at the same instant on the PostgreSQL server, each
    logging the same three datasets, new to the store. MLflow's store looks a dataset up, then inserts it, so they
    collide on its unique key (a CI run lost a SLURM trial to this). Every run starts, holds the three datasets and
    ends FINISHED."""
    import threading

    from mnistlab.data.preprocess import load_processed
    from mnistlab.tracking.lineage import dataset_inputs
    from mnistlab.tracking.run import TrackedRun
    from mnistlab.tracking.store import ensure_experiment

    _, meta = load_processed(processed_dir)
    exp_id = ensure_experiment(mlflow_server, f"start-race-{time.time_ns()}", Path("unused"))
    errors: list[str] = []
    rounds, n = 6, 8
    for k in range(rounds):
        inputs = dataset_inputs({**meta, "data_checksum": f"race-{time.time_ns()}-{k}"}, "")
        barrier = threading.Barrier(n)

        def start(i: int) -> None:
            run = TrackedRun(mlflow_server, exp_id, f"round {k} trial {i}", {}, synchronous=True, inputs=inputs)
            barrier.wait()
            try:
                with run:
                    pass
            except Exception as e:
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")

        threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, f"{len(errors)} of {rounds * n} runs failed to start: {errors[:3]}"
    stored = MlflowClient(mlflow_server).search_runs([exp_id], max_results=1000)
    assert len(stored) == rounds * n and {r.info.status for r in stored} == {"FINISHED"}
    assert all(len(r.inputs.dataset_inputs) == 3 for r in stored)
