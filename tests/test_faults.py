"""Faults and bad input as a user or a scheduler meets them: real signals, real concurrent processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from mlflow import MlflowClient

from conftest import PROJECT_ROOT, cli_env, dvc, fast_overrides, meta, read_csv, redirect, set_params, store_runs
from mnistlab.tracking.store import default_tracking_uri

TESTS_DIR = Path(__file__).resolve().parent
SIGNAL_AT_EPOCH = ["+callbacks.interrupt._target_=test_train.SigintAtEpoch", "+callbacks.interrupt.epoch=1"]


class StallAtEpoch(pl.Callback):
    """In the trial with learning rate `lr`: write this process's pid into `marker_dir` at epoch 1, then wait to be
    killed (the test plays the OOM killer) or sent SIGTERM."""

    def __init__(self, lr: float, marker_dir: str, seconds: float = 600):
        self.lr, self.marker_dir, self.seconds = lr, Path(marker_dir), seconds

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1 and pl_module.hparams["optimizer"]["lr"] == self.lr:
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            (self.marker_dir / str(os.getpid())).write_text("")
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline and not trainer.received_sigterm:  # Lightning stops at the next batch
                time.sleep(0.1)


def _env(**extra):
    return cli_env(PYTHONPATH=str(TESTS_DIR), **extra)


def _train(args: list[str], cwd: Path = PROJECT_ROOT, timeout=600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnistlab.train", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnistlab.train", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sweep_args(tmp: Path, processed: Path) -> list[str]:
    """A multirun on fixture data; unlike fast_overrides, Hydra picks the dirs (no paths.output_dir)."""
    return [
        "-m", f"data.processed_dir={processed}", "data.val_size=100", "data.batch_size=32", "data.eval_batch_size=100",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "callbacks.finite_loss.check_every_n_steps=1",
        f"paths.root={tmp}", f"paths.mlruns_dir={tmp / 'mlruns'}", f"paths.sweep_reports_dir={tmp / 'reports'}",
        "logger.log_model=false", "logger.plots=false", "num_threads=1",
    ]


# --- 2. exit status: SIGTERM 143, Ctrl-C 130, for a single run and for a sweep ----------------------------------

@pytest.mark.parametrize("signum, code, error", [(signal.SIGTERM, 143, "SIGTERMException"), (signal.SIGINT, 130, "KeyboardInterrupt")])
def test_signal_during_a_run_gives_the_shell_status_and_a_killed_run(tmp_path, processed_dir, signum, code, error):
    """`python -m mnistlab.train` receiving a real signal mid-training (issue 14: SIGTERM exited 0)."""
    proc = _train(fast_overrides(tmp_path, processed_dir, epochs=3) + SIGNAL_AT_EPOCH
                  + [f"+callbacks.interrupt.signum={int(signum)}"])
    assert proc.returncode == code, proc.stderr[-3000:]
    (run,) = store_runs(tmp_path / "mlruns")[1]
    assert run.info.status == "KILLED" and error in run.data.tags["mnistlab.error"]
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_sigterm_stops_a_sweep_with_143_and_nothing_left_running(tmp_path, processed_dir):
    proc = _train(_sweep_args(tmp_path, processed_dir) + ["launcher=basic", "optimizer=sgd,rmsprop", "trainer.max_epochs=3",
                                                          *SIGNAL_AT_EPOCH, f"+callbacks.interrupt.signum={int(signal.SIGTERM)}"])
    assert proc.returncode == 143, proc.stderr[-3000:]
    runs = store_runs(tmp_path / "mlruns")[1]
    statuses = sorted((r.data.tags.get("mnistlab.sweep", "trial"), r.info.status) for r in runs)
    assert statuses == [("trial", "KILLED"), ("true", "KILLED")], "the sweep stops at the first trial's SIGTERM"


# --- 3. a trial whose process dies is FAILED and the sweep goes on, on every parallel launcher ---------------------

def _signal_the_stalled_trial(tmp_path: Path, processed_dir: Path, signum: int, launcher: list[str]) -> str:
    """A 3-trial sweep (sgd lr 0.01, 0.02, 0.03) whose lr-0.02 trial stalls at epoch 1 and gets `signum`: the sweep
    must exit 1 (its report written, but an incomplete sweep is no success); its stderr."""
    marker = tmp_path / "stalled"
    proc = _start(_sweep_args(tmp_path, processed_dir) + [*launcher, "optimizer=sgd", "optimizer.lr=0.01,0.02,0.03",
        "trainer.max_epochs=3", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        "+callbacks.stall._target_=test_faults.StallAtEpoch", "+callbacks.stall.lr=0.02",
        f"+callbacks.stall.marker_dir={marker}"], cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 600
    while not (marker.is_dir() and any(marker.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    (victim,) = [int(p.name) for p in marker.iterdir()]
    os.kill(victim, signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    return err


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_killed_trial_process_is_failed_and_the_sweep_goes_on(tmp_path, processed_dir, launcher):
    """`kill -9` of a trial process (as the OOM killer would) ended a joblib sweep with TerminatedWorkerError."""
    err = _signal_the_stalled_trial(tmp_path, processed_dir, signal.SIGKILL, [f"launcher={launcher}"])
    reason = "SIGKILL" if launcher == "joblib" else "died without a result"  # submitit does not pass the signal on
    assert "1 of 3 trials were stopped or died before they ended" in err and reason in err
    runs = store_runs(tmp_path / "mlruns")[1]
    trials = {float(r.data.params["lr"]): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert {lr: r.info.status for lr, r in trials.items()} == {0.01: "FINISHED", 0.02: "FAILED", 0.03: "FINISHED"}
    assert reason in trials[0.02].data.tags["mnistlab.error"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sorted(r["status"] for r in read_csv(tmp_path / "reports" / "sweep.csv")) == ["FAILED", "FINISHED", "FINISHED"]


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["mlflow", "none"])
def test_sigterm_to_one_trial_alone_ends_it_killed_the_others_finish_and_the_sweep_exits_1(tmp_path, processed_dir,
                                                                                          logger):
    """README: a trial stopped by a signal to it alone (scancel of one job, kill) ends KILLED, the other trials
    finish, and the sweep exits 1 naming the stopped trial; the verdict comes from the trial's status file, so it
    holds with logger=none too."""
    err = _signal_the_stalled_trial(tmp_path, processed_dir, signal.SIGTERM,
                                    ["launcher=joblib", "hydra.launcher.n_jobs=2", f"logger={logger}"])
    assert "error: 1 of 3 trials were stopped or died before they ended: " in err
    stopped = [line for line in err.splitlines() if "were stopped or died" in line][0]
    assert f"{tmp_path / 'multirun' / '1'}: KILLED" in stopped, stopped  # the trial with lr 0.02, by its dir
    statuses = {d.name: json.loads((d / ".mnistlab_trial.json").read_text())["status"]
                for d in (tmp_path / "multirun").iterdir() if (d / ".mnistlab_trial.json").is_file()}
    assert statuses == {"0": "FINISHED", "1": "KILLED", "2": "FINISHED"}
    if logger == "mlflow":
        trials = {float(r.data.params["lr"]): r.info.status for r in store_runs(tmp_path / "mlruns")[1]
                  if "mlflow.parentRunId" in r.data.tags}
        assert trials == {0.01: "FINISHED", 0.02: "KILLED", 0.03: "FINISHED"}
    else:
        assert not (tmp_path / "mlruns" / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stack_stopped_in_its_fit_records_each_trial_killed(tmp_path, processed_dir, signum, code):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM of a launcher=stacked sweep while a stack fits: the
    stack's trials had no run yet and vanished (issue 23). Now each has a KILLED run (params, config) and a KILLED
    status file, and the sweep exits with the shell's status."""
    args = [a for a in _sweep_args(tmp_path, processed_dir) if not a.startswith("trainer.max_epochs=")]
    sweep = tmp_path / "multirun"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnistlab.train", *args, "launcher=stacked", "optimizer=sgd", "optimizer.lr=0.01,0.02",
         "trainer.max_epochs=3000", f"hydra.sweep.dir={sweep}"],
        cwd=PROJECT_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group, as a terminal's foreground job
    seen = []
    for line in proc.stdout:  # the stack worker logs its start (Hydra's log: stdout); then let it fit a moment
        seen.append(line)
        if "stacked fit of trials [0, 1]: started" in line:
            break
    assert proc.poll() is None, "".join(seen)[-3000:]
    time.sleep(3)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # what Ctrl-C does: every process of the foreground group
    else:
        proc.send_signal(signum)  # scancel / kill: the sweep's process only
    err = proc.stdout.read()
    assert proc.wait(timeout=120) == code, err[-3000:]
    runs = store_runs(tmp_path / "mlruns")[1]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(float(r.data.params["lr"]) for r in trials) == [0.01, 0.02], [(r.info.status, r.data.tags.get("mnistlab.error"), r.data.tags.get("mnistlab.pid")) for r in trials]
    assert all(r.info.status == "KILLED" and "in its stack's fit" in r.data.tags["mnistlab.error"] for r in trials)
    client = MlflowClient(default_tracking_uri(tmp_path / "mlruns"))
    assert all("config.yaml" in {a.path for a in client.list_artifacts(r.info.run_id)} for r in trials)
    assert not [r for r in runs if r.info.status == "RUNNING"], "the parent ends KILLED too"
    statuses = [json.loads(f.read_text())["status"] for f in sweep.glob("*/.mnistlab_trial.json")]
    assert statuses == ["KILLED", "KILLED"]


def test_a_killed_stack_process_fails_its_trials_and_the_sweep_goes_on(tmp_path, processed_dir):
    """`kill -9` of a launcher=stacked process in its stack's fit: its trials had no MLflow run yet (a member's run
    opens after the fit) and vanished from MLflow. Now they are DIED in the sweep and FAILED in MLflow with the reason,
    their params and config; the other stack's trials FINISHED, nothing RUNNING, exit 1."""
    import psutil

    args = [a for a in _sweep_args(tmp_path, processed_dir) if not a.startswith("trainer.max_epochs=")]
    sweep = tmp_path / "multirun"
    proc = _start(args + ["launcher=stacked", "hydra.launcher.n_jobs=2", "optimizer=sgd", "optimizer.lr=0.01,0.02",
                          "trainer.max_epochs=2,3000", f"hydra.sweep.dir={sweep}"], cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 300  # until the 2-epoch stack's trials are done; the 3000-epoch stack still fits

    def finished() -> int:
        return sum(json.loads(f.read_text()).get("status") == "FINISHED" for f in sweep.glob("*/.mnistlab_trial.json"))

    while finished() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    def cpu(w: psutil.Process) -> float:
        try:
            return w.cpu_percent(None)
        except psutil.NoSuchProcess:  # a helper process that ended meanwhile
            return -1.0

    workers = psutil.Process(proc.pid).children(recursive=True)
    for w in workers:
        cpu(w)
    time.sleep(1.0)
    busy = max(workers, key=cpu)  # the process training the 3000-epoch stack
    busy.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "launcher=stacked: 4 trials in 2 stack(s) of [2, 2], 0 on their own" in out + err
    assert "2 of 4 trials were stopped or died before they ended" in err and "SIGKILL" in err, err[-3000:]
    runs = store_runs(tmp_path / "mlruns")[1]
    trials = {(float(r.data.params["lr"]), int(r.data.params["max_epochs"])): r for r in runs
              if "mlflow.parentRunId" in r.data.tags}
    assert {k: r.info.status for k, r in trials.items()} == {
        (0.01, 2): "FINISHED", (0.02, 2): "FINISHED", (0.01, 3000): "FAILED", (0.02, 3000): "FAILED"}
    parent = {r.data.tags["mlflow.parentRunId"] for r in trials.values()}
    assert len(parent) == 1
    for key in ((0.01, 3000), (0.02, 3000)):
        assert "SIGKILL" in trials[key].data.tags["mnistlab.error"]
        client = MlflowClient(default_tracking_uri(tmp_path / "mlruns"))
        assert "config.yaml" in {a.path for a in client.list_artifacts(trials[key].info.run_id)}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sorted(r["status"] for r in read_csv(tmp_path / "reports" / "sweep.csv")) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]


@pytest.mark.slow
def test_a_killed_forkserver_loses_no_trial_and_no_report(tmp_path, processed_dir):
    """`kill -9` of the joblib launcher's forkserver (the process that forks each trial) while the first two trials
    train: under load it once left 2 of 4 trials unrecorded and no sweep.csv (issue 23). The running trials finish,
    the later ones start from a new forkserver, and the report holds all four."""
    import psutil

    sweep = tmp_path / "multirun"
    proc = _start(_sweep_args(tmp_path, processed_dir) + [
        "launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer=sgd", "optimizer.lr=0.01,0.02,0.03,0.04",
        "trainer.max_epochs=6", f"hydra.sweep.dir={sweep}"], cwd=PROJECT_ROOT)

    def forkserver() -> psutil.Process | None:
        for child in psutil.Process(proc.pid).children():
            try:
                if any("forkserver" in part for part in child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                pass
        return None

    deadline = time.monotonic() + 300
    while (forkserver() is None or len(psutil.Process(proc.pid).children(recursive=True)) < 3) and \
            proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the forkserver has forked the first trials
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    forkserver().send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    trials = [r for r in store_runs(tmp_path / "mlruns")[1] if "mlflow.parentRunId" in r.data.tags]
    assert sorted((float(r.data.params["lr"]), r.info.status) for r in trials) == [
        (lr, "FINISHED") for lr in (0.01, 0.02, 0.03, 0.04)]
    assert sorted(r["status"] for r in read_csv(tmp_path / "reports" / "sweep.csv")) == ["FINISHED"] * 4


# --- 4. parallel launchers never start more trials than the machine holds -----------------------------------------

def test_trial_capacity_is_capped_by_cores_and_by_memory(caplog):
    import psutil

    from mnistlab.launching import GIB, trial_capacity
    from mnistlab.threads import available_cores

    cores = available_cores()
    assert trial_capacity(36, mem_per_trial_gb=0.001) == min(36, cores)
    assert trial_capacity(36, mem_per_trial_gb=psutil.virtual_memory().total / GIB * 2) == 1
    assert "running 1 trials at a time, not 36" in caplog.text and "GB per trial" in caplog.text


@pytest.mark.slow
def test_submitit_local_runs_no_more_trials_at_once_than_memory_allows(tmp_path, processed_dir):
    """The 36-trial study on submitit_local started 36 processes at once (~1.5 GB each: the OOM killer)."""
    proc = _train(_sweep_args(tmp_path, processed_dir) + [
        "launcher=submitit_local", "optimizer=sgd", "optimizer.lr=0.01,0.02,0.03", "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}", "hydra.launcher.mem_per_trial_gb=1000000", "num_threads=null"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running 1 trials at a time, not 3" in proc.stdout
    spans = sorted((r.info.start_time, r.info.end_time) for r in store_runs(tmp_path / "mlruns")[1] if "mlflow.parentRunId" in r.data.tags)
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"trials overlapped: {spans}"
    assert {r.data.tags["mnistlab.torch_threads"] for r in store_runs(tmp_path / "mlruns")[1] if "mnistlab.trial" in r.data.tags} == {
        str(len(os.sched_getaffinity(0)))}, "one trial at a time gets every core"


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweep_stops_its_trials_killed_and_exits_143(tmp_path, processed_dir):
    """What a scheduler does to a sweep it cancels: SIGTERM to the sweep's process only."""
    marker = tmp_path / "running"
    proc = _start(_sweep_args(tmp_path, processed_dir) + [
        "launcher=joblib", "optimizer=sgd", "optimizer.lr=0.01,0.02", "trainer.max_epochs=1000",
        f"hydra.sweep.dir={tmp_path / 'multirun'}", "+callbacks.stall._target_=test_faults.StallAtEpoch",
        "+callbacks.stall.lr=0.01", f"+callbacks.stall.marker_dir={marker}", "+callbacks.stall.seconds=0",
    ], cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 600
    while not (marker.is_dir() and any(marker.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    runs = store_runs(tmp_path / "mlruns")[1]
    # the parent, the trial that was training and (unless SIGTERM came before it opened its run) the other one
    assert len(runs) >= 2 and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


# --- 1. every run and sweep has its own dir, even when started at the same instant ----------------------------

@pytest.mark.slow
def test_two_sweeps_started_together_get_their_own_dirs_and_parents(tmp_path, processed_dir):
    """Hydra's default dirs (1-second `${now:}`) made two such sweeps share a dir and one parent-id file."""
    common = _sweep_args(tmp_path, processed_dir) + ["launcher=basic", "trainer.max_epochs=1"]
    grids = {"sgd": ["optimizer=sgd", "optimizer.lr=0.01,0.1"], "rmsprop": ["optimizer=rmsprop", "optimizer.lr=0.001,0.01"]}
    procs = {opt: _start(common + grid, cwd=tmp_path) for opt, grid in grids.items()}  # Hydra's dirs land under cwd
    for opt, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    sweep_dirs = sorted((tmp_path / "logs" / "multiruns").iterdir())
    assert len(sweep_dirs) == 2, sweep_dirs
    runs = store_runs(tmp_path / "mlruns")[1]
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("mnistlab.sweep") == "true"}
    assert {p.data.tags["mnistlab.sweep_dir"] for p in parents.values()} == {str(d.resolve()) for d in sweep_dirs}
    for pid, parent in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
        assert len(children) == 2 and len({c.data.params["optimizer"] for c in children}) == 1, "one sweep's trials"
        sweep_dir = Path(parent.data.tags["mnistlab.sweep_dir"])
        assert {r["run_id"] for r in read_csv(sweep_dir / "sweep.csv")} == {c.info.run_id for c in children}
        assert len(list(sweep_dir.glob("*/.mnistlab_trial.json"))) == 2


@pytest.mark.slow
def test_two_runs_started_together_write_to_their_own_dirs(tmp_path, processed_dir):
    args = [a for a in fast_overrides(tmp_path, processed_dir, epochs=1) if not a.startswith("paths.output_dir")]
    procs = [_start(args + ["logger=none", f"seed={s}"], cwd=tmp_path) for s in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    run_dirs = sorted((tmp_path / "logs" / "runs").iterdir())
    assert len(run_dirs) == 2
    assert {(d / ".hydra" / "overrides.yaml").read_text().count("seed=") for d in run_dirs} == {1}
    seeds = {next(line for line in (d / ".hydra" / "overrides.yaml").read_text().splitlines() if "seed=" in line)
             for d in run_dirs}
    assert seeds == {"- seed=1", "- seed=2"}
    assert all((d / "metrics.json").is_file() for d in run_dirs)


def test_a_parent_id_from_another_sweep_is_not_used(tmp_path, monkeypatch):
    """A stale MNISTLAB_PARENT_RUN_ID (or a file copied from another sweep) must not adopt a trial."""
    from mnistlab.tracking.run import PARENT_ENV, PARENT_FILE, parent_run_id
    from mnistlab.tracking.store import ensure_experiment

    uri = default_tracking_uri(tmp_path / "mlruns")
    client = MlflowClient(uri)
    exp = ensure_experiment(uri, "mnistlab", tmp_path / "mlruns")
    mine, other = tmp_path / "a", tmp_path / "b"
    parent = client.create_run(exp, tags={"mnistlab.sweep": "true", "mnistlab.sweep_dir": str(other)}).info.run_id
    monkeypatch.setenv(PARENT_ENV, parent)
    assert parent_run_id(mine, client) is None
    assert parent_run_id(other, client) == parent
    mine.mkdir()
    (mine / PARENT_FILE).write_text(parent + "\n")
    assert parent_run_id(mine, client) is None


# --- 2/4. a sweep where every trial failed exits non-zero even without a usable MLflow store ---------------------

@pytest.mark.slow
@pytest.mark.parametrize("store", ["logger=none", "corrupt-db"])
def test_all_trials_failed_exits_nonzero_without_mlflow(tmp_path, processed_dir, store):
    """The exit code came from the MLflow parent-run callback: with tracking off or the store broken, it was 0."""
    extra = ["logger=none"] if store == "logger=none" else []
    if store == "corrupt-db":
        (tmp_path / "mlruns").mkdir()
        (tmp_path / "mlruns" / "mlflow.db").write_bytes(b"not a database " * 100)
    proc = _train(_sweep_args(tmp_path, processed_dir) + ["launcher=basic", f"hydra.sweep.dir={tmp_path / 'multirun'}",
                                                          "optimizer=sgd", "optimizer.lr=0.01,0.1", "seed=-1", *extra])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "all 2 trials of the sweep failed" in proc.stderr


# --- 6. overrides that cannot take effect at train time are refused ---------------------------------------------

def test_split_overrides_that_preprocess_fixed_are_refused(tmp_path, processed_dir):
    """data.val_size/split_seed at train time trained on the old split but were recorded (params, run name)."""
    proc = _train(fast_overrides(tmp_path, processed_dir) + ["data.val_size=50", "data.split_seed=7"])
    assert proc.returncode == 2
    err = proc.stderr
    assert err.startswith("error:") and "data.val_size=50" in err and "data.split_seed=7" in err
    assert "was split with data.val_size=100" in err and "dvc repro preprocess" in err and "Traceback" not in err
    assert store_runs(tmp_path / "mlruns")[1] == [] and not (tmp_path / "out").exists(), "nothing may start"


# --- 7. inputs validated before data loads or a run opens --------------------------------------------------------

def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    (tmp / "a-file").write_text("")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "mlflow.db").write_bytes(b"\x00garbage" * 512)
    return {
        "seed": (["seed=-1"], "seed=-1: must be an integer in 0..4294967295"),
        "missing ckpt": ([f"ckpt_path={tmp / 'nope.ckpt'}"], "nope.ckpt': no such file"),
        "text ckpt": ([f"ckpt_path={tmp / 'notes.txt'}"], "not a PyTorch/Lightning checkpoint"),
        "store dir": ([f"paths.mlruns_dir={tmp / 'a-file' / 'mlruns'}"], "the MLflow store's folder is not usable"),
        "corrupt db": ([f"paths.mlruns_dir={tmp / 'corrupt'}"], f"{tmp / 'corrupt' / 'mlflow.db'} is corrupt"),
    }


@pytest.mark.parametrize("case", ["seed", "missing ckpt", "text ckpt", "store dir", "corrupt db"])
def test_bad_input_fails_at_once_with_one_paragraph(tmp_path, processed_dir, case):
    args, message = _bad_inputs(tmp_path)[case]
    proc = _train(fast_overrides(tmp_path, processed_dir) + args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error:") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 3
    assert not (tmp_path / "out").exists(), "nothing may start"
    if case != "corrupt db":
        assert store_runs(tmp_path / "mlruns")[1] == []


# --- 5. a bad MNIST source leaves the good data/processed in place ----------------------------------------------

def test_bad_source_keeps_the_good_processed_data(project_copy, tmp_path):
    """DVC deleted the stage's out before running it, so a refused source lost the good split."""
    import numpy as np

    from conftest import fake_mnist, write_npz

    proj, mirror = project_copy, tmp_path / "mirror"
    write_npz(mirror, fake_mnist())
    set_params(proj, "data.verify_checksums=false", "data.val_size=100")
    redirect(proj, mirror)
    dvc(proj, "repro", "preprocess")
    good, lock = meta(proj), (proj / "dvc.lock").read_text()
    x_good = np.load(proj / "data" / "processed" / "x_train.npy")

    bad = fake_mnist(seed=3)
    bad["x_train"] = bad["x_train"][:, :27, :27]  # not 28x28 images: the stage refuses it
    write_npz(mirror, bad)
    proc = dvc(proj, "repro", "preprocess", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed to reproduce 'preprocess'" in out, out
    assert "was not changed: the previous split is still in place" in out and "dvc checkout data/processed" in out, out
    assert meta(proj) == good and np.array_equal(np.load(proj / "data" / "processed" / "x_train.npy"), x_good)
    assert (proj / "dvc.lock").read_text() == lock, "a failed stage records nothing"


@pytest.mark.slow
def test_sigterm_under_dvc_repro_fails_the_stage_and_records_nothing(project_copy, tmp_path):
    """`dvc repro` saw a SIGTERMed train stage as a success (exit 0) and recorded its partial checkpoint."""
    import yaml

    from conftest import fake_mnist, write_npz

    proj, mirror = project_copy, tmp_path / "mirror"
    write_npz(mirror, fake_mnist())
    set_params(proj, "data.verify_checksums=false", "data.val_size=100", "trainer.max_epochs=3", "logger=none",
               "data.batch_size=32", "data.eval_batch_size=100", *SIGNAL_AT_EPOCH, f"+callbacks.interrupt.signum={int(signal.SIGTERM)}")
    redirect(proj, mirror)
    lock = lambda: yaml.safe_load((proj / "dvc.lock").read_text())["stages"].get("train")  # noqa: E731
    lock_before = lock()
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "train"], cwd=proj, env=_env(),
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "failed to reproduce 'train'" in out, out
    assert "stopped by SIGTERM; exit status 143" in out, out
    assert lock() == lock_before, "a failed stage records nothing in dvc.lock"
    assert not (proj / "reports" / "metrics.json").exists(), "DVC removed the stage's metrics; no partial ones written"
    assert "train" in json.loads(dvc(proj, "status", "--json", "train").stdout), "the stage stays to be run"
