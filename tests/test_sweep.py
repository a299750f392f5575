"""The optimizer study as real Hydra multiruns: grid expansion, launchers, the parent run, the sweep report."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, LAUNCHERS, cli_env, multirun, read_csv, sweep_store
from mnistlab.tracking.store import default_tracking_uri


def test_study_grid_expands_to_36_configs_times_3_seeds():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import mnistlab.train  # noqa: F401  (registers the sweep_values resolver)
    from mnistlab.paths import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["sweep=optimizers"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.trainer.max_epochs == 5
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    jobs = [dict(o.split("=", 1) for o in job) for job in batch]
    assert len(jobs) == 108 and cfg.reuse_finished is True
    assert {j["seed"] for j in jobs} == {"0", "1", "2"}, "3 seeds per config by default"
    assert len({tuple(sorted((k, v) for k, v in j.items() if k != "seed")) for j in jobs}) == 36
    assert {j["optimizer"] for j in jobs} == {"sgd", "momentum", "rmsprop"}
    assert {j["data.batch_size"] for j in jobs} == {"32", "128", "512"}
    lrs = sorted({float(j["optimizer.lr"]) for j in jobs})
    assert len(lrs) == 4 and all(b / a == pytest.approx(10) for a, b in zip(lrs, lrs[1:])), "log-spaced"
    assert len({tuple(sorted(j.items())) for j in jobs}) == 108


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# torch threads per trial: all cores one trial at a time; cores split over joblib's 2 workers; submitit_local
# starts every trial at once, so 1 each.
THREADS = {"basic": _cores, "joblib": lambda: max(1, _cores() // 2), "submitit_local": lambda: 1}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_gives_one_parent_four_children_and_the_report(tmp_path, processed_dir, launcher):
    proc = multirun(tmp_path, processed_dir, ["optimizer=sgd,rmsprop", "optimizer.lr=0.001,0.1"], LAUNCHERS[launcher])
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, parents, children = sweep_store(tmp_path)
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert len({c.info.run_name for c in children}) == 4, "trial names must be unique"
    assert {c.data.tags["mnistlab.torch_threads"] for c in children} == {str(THREADS[launcher]())}

    rows = read_csv(tmp_path / "reports" / "sweep.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED"}
    assert {(r["optimizer"], float(r["lr"])) for r in rows} == {(o, lr) for o in ("sgd", "rmsprop") for lr in (0.001, 0.1)}
    by_id = {c.info.run_id: c for c in children}
    for r in rows:
        assert float(r["test/acc"]) == pytest.approx(by_id[r["run_id"]].data.metrics["test/acc"])
    study = json.loads((tmp_path / "reports" / "study.json").read_text())
    assert set(study["chosen_on_val"]) == {"sgd", "rmsprop"}
    for opt, chosen in study["chosen_on_val"].items():  # one seed here: the chosen config is the val winner
        assert chosen["val_acc_mean"] == pytest.approx(max(float(r["val/acc_best"]) for r in rows if r["optimizer"] == opt))
    assert (tmp_path / "reports" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "multirun" / "study.md").is_file()
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.csv", "sweep.png", "study.json", "study.csv", "study.md"} <= parent_files
    assert client.get_run(parent.info.run_id).data.metrics["best/val_acc_mean"] == pytest.approx(
        max(float(r["val/acc_best"]) for r in rows))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_failed_trial_is_failed_on_every_launcher_and_the_others_finish(tmp_path, processed_dir, launcher):
    """The diverging trial comes first; the sweep goes on, exits 0, and MLflow and the report say which failed."""
    proc = multirun(tmp_path, processed_dir, ["optimizer=sgd", "optimizer.lr=1e30,0.1"], LAUNCHERS[launcher])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {float(r["lr"]): r for r in read_csv(tmp_path / "reports" / "sweep.csv")}
    assert rows[1e30]["status"] == "FAILED" and rows[1e30]["test/acc"] == ""
    assert rows[0.1]["status"] == "FINISHED"
    _, (parent,), children = sweep_store(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 2
    by_lr = {c.data.params["lr"]: c for c in children}
    failed, finished = by_lr["1e+30"], by_lr["0.1"]
    assert failed.info.status == "FAILED" and finished.info.status == "FINISHED"
    assert "NonFiniteLossError" in failed.data.tags["mnistlab.error"]
    assert float(rows[0.1]["test/acc"]) == pytest.approx(finished.data.metrics["test/acc"], abs=1e-9)
    assert "sweep: 2/2 trials done (1 finished, 1 failed), 0 running" in proc.stdout + proc.stderr  # on every launcher
    assert failed.data.tags["mlflow.note.content"].startswith("**FAILED**: NonFiniteLossError")
    assert finished.data.tags["mnistlab.torch_threads"] == str(THREADS[launcher]())


@pytest.mark.slow
def test_sweep_where_every_trial_fails_exits_nonzero_with_runs_recorded(tmp_path, processed_dir):
    proc = multirun(tmp_path, processed_dir, ["optimizer=sgd", "optimizer.lr=-1,-2"], ["launcher=basic"])
    assert proc.returncode == 1, proc.stderr[-2000:]  # a sweep where nothing trained: exit 1
    assert "all 2 trials of the sweep failed" in proc.stderr
    rows = read_csv(tmp_path / "reports" / "sweep.csv")
    assert [r["status"] for r in rows] == ["FAILED", "FAILED"]
    _, (parent,), _ = sweep_store(tmp_path)
    assert parent.info.status == "FAILED"


@pytest.mark.slow
def test_report_cli_picks_the_latest_of_two_sweeps(tmp_path, processed_dir):
    """Two real sweeps in one store: `mnistlab-report` rebuilds the newer by default, the older with --parent."""
    older = multirun(tmp_path, processed_dir, ["optimizer=sgd"], LAUNCHERS["basic"], sweep_dir="older")
    assert older.returncode == 0, older.stderr[-3000:]
    newer = multirun(tmp_path, processed_dir, ["optimizer=momentum,rmsprop"], LAUNCHERS["basic"], sweep_dir="newer")
    assert newer.returncode == 0, newer.stderr[-3000:]
    _, parents, children = sweep_store(tmp_path)
    parent_of = {Path(p.data.tags["mnistlab.sweep_dir"]).name: p.info.run_id for p in parents}
    assert set(parent_of) == {"older", "newer"}
    children_of = {name: [c for c in children if c.data.tags["mlflow.parentRunId"] == pid] for name, pid in parent_of.items()}
    uri = default_tracking_uri(tmp_path / "mlruns")

    def report(*args: str) -> dict:
        proc = subprocess.run([str(BIN / "mnistlab-report"), "--tracking-uri", uri, "--out", str(tmp_path / "rep"), *args],
                              cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def reported_trials() -> dict[str, str]:
        return {r["run_id"]: r["optimizer"] for r in read_csv(tmp_path / "rep" / "sweep.csv")}

    latest = report()
    assert reported_trials() == {c.info.run_id: c.data.params["optimizer"] for c in children_of["newer"]}
    assert latest["trials"] == 2 and set(latest["chosen_on_val"]) == {"momentum", "rmsprop"}
    chosen = report("--parent", parent_of["older"])
    assert reported_trials() == {c.info.run_id: "sgd" for c in children_of["older"]}
    assert chosen["trials"] == 1 and set(chosen["chosen_on_val"]) == {"sgd"}


@pytest.mark.slow
def test_a_rerun_reuses_finished_trials_and_retries_failed_ones(tmp_path, processed_dir):
    """README: with reuse_finished=true a re-run trains only what is missing, and FAILED/KILLED trials are retried
    (they are not results to reuse); a reused trial's run is tagged with the run it reuses."""
    grid = ["optimizer=sgd", "optimizer.lr=1e30,0.1", "reuse_finished=true"]
    first = multirun(tmp_path, processed_dir, grid, LAUNCHERS["basic"])
    second = multirun(tmp_path, processed_dir, grid, LAUNCHERS["basic"], sweep_dir="multirun2")
    assert first.returncode == second.returncode == 0, second.stderr[-3000:]
    _, parents, children = sweep_store(tmp_path)
    latest = max(parents, key=lambda r: r.info.start_time).info.run_id
    before = {c.data.params["lr"]: c for c in children if c.data.tags["mlflow.parentRunId"] != latest}
    after = {c.data.params["lr"]: c for c in children if c.data.tags["mlflow.parentRunId"] == latest}
    assert after["0.1"].data.tags.get("mnistlab.reused_from") == before["0.1"].info.run_id
    assert "mnistlab.reused_from" not in after["1e+30"].data.tags, "a FAILED trial is trained again, not reused"
    assert after["1e+30"].info.status == "FAILED" and "NonFiniteLossError" in after["1e+30"].data.tags["mnistlab.error"]
